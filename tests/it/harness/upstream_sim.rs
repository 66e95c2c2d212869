//! The upstream simulator (`devgate-upstream-sim`, examples/upstream_sim/) as a real
//! process: the orchestrator on RabbitMQ and the Asset and User/Team gRPC services, on
//! free ports, under a test's own RabbitMQ prefix.

use std::{
    collections::BTreeMap,
    io::BufRead,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use devgate::{
    mq::{Mq, MqConfig, QueueType},
    proto::upstream::{
        assets::v1::asset_service_client::AssetServiceClient,
        users::v1::user_team_service_client::UserTeamServiceClient,
    },
};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use serde::Deserialize;
use tonic::transport::Channel;
use uuid::Uuid;

/// The ids the simulator seeded for one tenant (its ready line).
#[derive(Debug, Clone, Deserialize)]
pub struct SeededTenant {
    pub tenant_id: Uuid,
    pub projects: BTreeMap<String, String>,
    pub users: BTreeMap<String, String>,
    pub teams: BTreeMap<String, String>,
    pub assets: Vec<String>,
}

/// What the simulator prints once it serves.
#[derive(Debug, Clone, Deserialize)]
pub struct Ready {
    pub asset_addr: SocketAddr,
    pub user_team_addr: SocketAddr,
    pub jobs_exchange: String,
    pub updates_queue: String,
    pub jobs_queue: String,
    pub cancels_queue: String,
    pub tenants: Vec<SeededTenant>,
}

/// A running simulator; killed, and its RabbitMQ objects deleted, when dropped.
pub struct UpstreamSim {
    pub ready: Ready,
    /// The RabbitMQ prefix it runs under (a test's own).
    pub prefix: String,
    child: Child,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_devgate-upstream-sim")
}

/// The local broker under `prefix` (what a devgate instance with that prefix uses).
pub fn mq(prefix: &str) -> Mq {
    Mq::new(MqConfig {
        url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_string().into(),
        queue_type: QueueType::Classic,
        prefix: prefix.to_string(),
    })
}

impl UpstreamSim {
    /// Starts the simulator under RabbitMQ `prefix`, seeding `tenants`, with `args` added
    /// (e.g. `--job-duration 200ms`), and waits for its ready line.
    pub async fn start(prefix: &str, tenants: &[Uuid], args: &[&str]) -> UpstreamSim {
        Self::start_at(prefix, tenants, "127.0.0.1:0", "127.0.0.1:0", args).await
    }

    /// [`start`](Self::start) on given addresses, e.g. those of a simulator that was stopped
    /// (a restarted upstream).
    pub async fn start_at(
        prefix: &str,
        tenants: &[Uuid],
        asset_addr: &str,
        user_team_addr: &str,
        args: &[&str],
    ) -> UpstreamSim {
        let mut command = Command::new(binary());
        command
            .args([
                "--asset-addr",
                asset_addr,
                "--user-team-addr",
                user_team_addr,
            ])
            .args(["--rabbitmq-prefix", prefix]);
        for tenant in tenants {
            command.args(["--seed-tenant", &tenant.to_string()]);
        }
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env(
                "UPSTREAM_SIM_LOG",
                std::env::var("TEST_LOG").map_or("error".into(), |_| "info".to_string()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().expect("spawn devgate-upstream-sim");
        let stdout = child.stdout.take().expect("piped stdout");
        // Reading blocks: on a thread of its own, bounded by a deadline.
        let line = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                std::io::BufReader::new(stdout).read_line(&mut line).ok();
                line
            }),
        )
        .await
        .expect("the simulator printed its ready line within 60 s")
        .unwrap();
        let ready: Ready = match serde_json::from_str(&line) {
            Ok(ready) => ready,
            Err(e) => {
                let _ = child.kill();
                let status = child.wait();
                panic!("no ready line from the simulator ({e}): {line:?}, exit: {status:?}");
            }
        };
        UpstreamSim {
            ready,
            prefix: prefix.to_string(),
            child,
        }
    }

    pub fn tenant(&self, tenant: Uuid) -> &SeededTenant {
        self.ready
            .tenants
            .iter()
            .find(|t| t.tenant_id == tenant)
            .expect("a seeded tenant")
    }

    pub async fn assets(&self) -> AssetServiceClient<Channel> {
        AssetServiceClient::new(super::channel(self.ready.asset_addr).await)
    }

    pub async fn users(&self) -> UserTeamServiceClient<Channel> {
        UserTeamServiceClient::new(super::channel(self.ready.user_team_addr).await)
    }
}

impl Drop for UpstreamSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let ready = self.ready.clone();
        let prefix = self.prefix.clone();
        // A thread of its own: Drop runs inside the test's runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mq = mq(&prefix);
                let Ok(channel) = mq.channel().await else {
                    return;
                };
                for queue in [
                    &ready.jobs_queue,
                    &ready.cancels_queue,
                    &ready.updates_queue,
                ] {
                    let _ = channel
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                for exchange in [&ready.jobs_exchange, &mq.events_exchange()] {
                    let _ = channel
                        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                }
            });
        })
        .join();
    }
}
