//! Generates the gRPC server/client code and the FileDescriptorSets that reflection
//! (grpcurl) and Envoy's JSON transcoder read.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc and the well-known google/protobuf includes come from a vendored crate, so a
    // build needs no system protoc.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the env.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos: Vec<PathBuf> = [
        "proto/devgate/v1/common.proto",
        "proto/devgate/v1/api_keys.proto",
        "proto/devgate/v1/usage.proto",
        "proto/devgate/v1/webhooks.proto",
        "proto/devgate/v1/generations.proto",
        // Served only on the internal listener.
        "proto/devgate/internal/v1/api_keys.proto",
        "proto/devgate/internal/v1/usage.proto",
        "proto/devgate/internal/v1/webhooks.proto",
        // Compiled only so their types are in the descriptor: Envoy then prints error
        // details as typed JSON. The Rust types come from tonic-types (extern_path).
        "proto/google/rpc/status.proto",
        "proto/google/rpc/error_details.proto",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    let includes: Vec<PathBuf> = vec![PathBuf::from("proto"), well_known];

    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("devgate_descriptor.bin"))
        .extern_path(".google.rpc", "::tonic_types")
        // Maps as BTreeMaps: prost encodes map entries in iteration order, and a request's
        // encoding must be deterministic for its Idempotency-Key hash (a HashMap's order
        // differs between two maps with the same entries).
        .btree_map(".")
        .compile_protos(&protos, &includes)?;

    // The contracts devgate is a client of (proto/upstream/): client and server code (the
    // server side is for the simulator, examples/upstream_sim.rs) and a descriptor set of
    // their own, kept out of devgate's: Envoy and devgate's reflection never see them.
    // Type names (`prost::Name`) give the AMQP `type` property of the orchestrator messages.
    let upstream: Vec<PathBuf> = [
        "proto/upstream/orchestrator/v1/orchestrator.proto",
        "proto/upstream/assets/v1/assets.proto",
        "proto/upstream/users/v1/users.proto",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("upstream_descriptor.bin"))
        .compile_with_config(config, &upstream, &includes)?;

    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
