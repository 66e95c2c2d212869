//! The `devgate` binary: parse the command line and hand over to the library.

/// mimalloc instead of glibc's malloc: allocation and free were about a fifth of the CPU of
/// an authorized call (README, "Performance").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    devgate::cli::main()
}
