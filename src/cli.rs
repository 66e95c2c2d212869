//! The command line: `serve`, `worker`, `all`, `migrate`, `descriptor`, `dev-token`,
//! `service-token`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;

use crate::{
    app::{Application, Roles},
    config::Config,
};

#[derive(Parser)]
#[command(
    name = "devgate",
    version,
    about = "devgate: API keys, webhooks, usage and generations behind one gRPC/REST door"
)]
struct Cli {
    /// Read KEY=value lines from this file first (variables already set win).
    #[arg(long, global = true, env = "DEVGATE_ENV_FILE")]
    env_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the public and internal gRPC APIs.
    Serve {
        /// Run pending migrations first.
        #[arg(long)]
        migrate: bool,
    },
    /// Run the background worker tasks.
    Worker,
    /// The API and the worker in one process (the local default).
    All {
        /// Run pending migrations first.
        #[arg(long)]
        migrate: bool,
    },
    /// Run pending database migrations and exit.
    Migrate,
    /// Write the API's FileDescriptorSet (for Envoy's JSON transcoder, grpcurl -protoset).
    Descriptor {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a user JWT signed with DEVGATE_JWT_HS256_SECRET, for local use and tests.
    DevToken {
        /// The tenant's UUID.
        #[arg(long)]
        tenant: uuid::Uuid,
        /// The user id (the token's `sub`).
        #[arg(long)]
        user: String,
        /// Comma-separated roles; `admin` manages keys.
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Print a new service token for an internal caller and its DEVGATE_SERVICE_TOKENS entry.
    /// Give the token to the caller; put only the entry in devgate's configuration.
    ServiceToken {
        /// The caller's name (a-z, 0-9, '.', '_', '-'), recorded on what it does.
        #[arg(long)]
        name: String,
        /// Comma-separated internal RPCs it may call, e.g. UsageService/GrantCredits;
        /// default every internal RPC.
        #[arg(long, value_delimiter = ',')]
        allow: Vec<String>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(path) = &cli.env_file
        && let Err(e) = dotenvy::from_path(path)
    {
        eprintln!("devgate: cannot read env file {}: {e}", path.display());
        return ExitCode::from(2);
    }
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("devgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    if let Command::Descriptor { out } = &command {
        std::fs::write(out, crate::proto::FILE_DESCRIPTOR_SET)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
        return Ok(());
    }
    if let Command::ServiceToken { name, allow } = &command {
        use crate::auth::service_token;
        service_token::validate_name(name).map_err(anyhow::Error::msg)?;
        let allow = allow
            .iter()
            .map(|rpc| service_token::parse_rpc(rpc).map(str::to_string))
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)?;
        let token = service_token::generate_token();
        println!("token (give it to {name}; it is not stored anywhere):\n{token}");
        println!(
            "configuration entry (append to DEVGATE_SERVICE_TOKENS, entries separated by ';'):\n{}",
            service_token::config_entry(name, &token, &allow)
        );
        return Ok(());
    }
    let config = Config::from_env().map_err(|e| anyhow::anyhow!("configuration error: {e}"))?;
    if let Command::DevToken {
        tenant,
        user,
        roles,
        ttl,
    } = &command
    {
        let secret = config.auth.jwt_hs256_secret.as_ref().ok_or_else(|| {
            anyhow::anyhow!("DEVGATE_JWT_HS256_SECRET is not set: dev tokens are signed with it (try --env-file deploy/local/devgate.env)")
        })?;
        println!(
            "{}",
            crate::auth::jwt::mint_hs256(secret.expose_secret(), *tenant, user, roles, *ttl)?
        );
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let _telemetry = crate::telemetry::init(&config.log)?;
        let (roles, migrate) = match command {
            Command::Serve { migrate } => (Roles::API, migrate),
            Command::Worker => (Roles::WORKER, false),
            Command::All { migrate } => (Roles::ALL, migrate),
            Command::Migrate => (Roles::API, true),
            Command::Descriptor { .. }
            | Command::DevToken { .. }
            | Command::ServiceToken { .. } => unreachable!("handled above"),
        };
        if migrate {
            let applied = crate::db::migrate(&config.database.url).await?;
            tracing::info!(applied = ?applied, "migrations up to date");
            if matches!(command, Command::Migrate) {
                return Ok(());
            }
        }
        Application::build(config, roles)
            .await?
            .run_until_stopped()
            .await
    })
}
