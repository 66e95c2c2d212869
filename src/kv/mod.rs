//! Redis: one multiplexed, self-reconnecting connection per process (to a standalone server
//! or to a Redis Cluster), the deployment's key prefix, and pub/sub subscriptions.
//!
//! On a cluster every multi-key command and script must keep its keys in one slot: callers
//! hash-tag their keys (`…{tenant}…`), and nothing here can fix a key that is not.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use redis::{
    Cmd, Pipeline, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::{ClusterClient, ClusterConfig},
    cluster_async::ClusterConnection,
};
use secrecy::{ExposeSecret, SecretString};

/// The `DEVGATE_REDIS_*` section, composed by `crate::config`.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: SecretString,
    /// Seed nodes of a Redis Cluster (empty: standalone Redis at `url`). URLs may hold a
    /// password, hence secret.
    pub cluster_nodes: Vec<SecretString>,
    pub prefix: String,
}

/// How long one Redis call may take before the caller treats Redis as down.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct Redis {
    conn: Connection,
    /// Where SUBSCRIBE goes: the server, or every cluster node in turn (PUBLISH on a cluster
    /// reaches subscribers on every node, so any one node will do).
    pubsub_clients: Arc<[redis::Client]>,
    next_pubsub: Arc<AtomicUsize>,
    prefix: Arc<str>,
}

/// The shared connection: callers use it through [`ConnectionLike`] (commands, scripts,
/// pipelines) and never need to know which kind of deployment they talk to.
#[derive(Clone)]
pub enum Connection {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Standalone(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Standalone(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

impl Redis {
    /// Prepares the connection without dialling: Redis may be down when the process starts;
    /// the connection connects on first use and reconnects after failures. With
    /// `cluster_nodes` set it talks to a Redis Cluster (and must run inside the runtime: the
    /// cluster connection spawns its driver task).
    pub fn connect(config: &RedisConfig) -> redis::RedisResult<Self> {
        if !config.cluster_nodes.is_empty() {
            return Self::connect_cluster(config);
        }
        let client = redis::Client::open(config.url.expose_secret())?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)?;
        Ok(Self {
            conn: Connection::Standalone(conn),
            pubsub_clients: Arc::new([client]),
            next_pubsub: Arc::default(),
            prefix: config.prefix.as_str().into(),
        })
    }

    fn connect_cluster(config: &RedisConfig) -> redis::RedisResult<Self> {
        let nodes: Vec<&str> = config
            .cluster_nodes
            .iter()
            .map(|n| n.expose_secret())
            .collect();
        let pubsub_clients = nodes
            .iter()
            .map(|n| redis::Client::open(*n))
            .collect::<redis::RedisResult<Vec<_>>>()?;
        let client = ClusterClient::builder(nodes)
            .retries(1)
            .min_retry_wait(10)
            .max_retry_wait(200)
            .build()?;
        let cluster_config = ClusterConfig::new()
            .set_connection_timeout(RESPONSE_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT);
        let conn = client.get_pending_async_connection_with_config(cluster_config);
        Ok(Self {
            conn: Connection::Cluster(conn),
            pubsub_clients: pubsub_clients.into(),
            next_pubsub: Arc::default(),
            prefix: config.prefix.as_str().into(),
        })
    }

    /// True when talking to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Connection::Cluster(_))
    }

    /// A cheap clone of the shared multiplexed connection.
    pub fn conn(&self) -> Connection {
        self.conn.clone()
    }

    /// The key or channel name `name` under this deployment's prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{}", self.prefix, name)
    }

    /// [`Redis::key`] of `format_args!(…)`, written in one allocation: for keys built on
    /// every call (the limiter's), where `key(&format!(…))` would allocate twice.
    pub fn key_fmt(&self, name: std::fmt::Arguments<'_>) -> String {
        use std::fmt::Write;
        let mut key = String::with_capacity(self.prefix.len() + 64);
        key.push_str(&self.prefix);
        key.write_fmt(name)
            .expect("writing to a String cannot fail");
        key
    }

    /// A dedicated connection for SUBSCRIBE (pub/sub cannot share the multiplexed one). On a
    /// cluster each call tries the next seed node, so a resubscription after a node failure
    /// lands on another node.
    pub async fn pubsub(&self) -> redis::RedisResult<redis::aio::PubSub> {
        let i = self.next_pubsub.fetch_add(1, Ordering::Relaxed) % self.pubsub_clients.len();
        let client = &self.pubsub_clients[i];
        tokio::time::timeout(RESPONSE_TIMEOUT * 4, client.get_async_pubsub())
            .await
            .map_err(|_| {
                redis::RedisError::from((redis::ErrorKind::Io, "timed out connecting for pub/sub"))
            })?
    }
}

/// Logs a Redis outage once when it starts and once when it ends, however many calls fail
/// in between (a log line per failed call would flood the logs exactly when they matter).
pub struct OutageLog {
    what: &'static str,
    down: std::sync::atomic::AtomicBool,
}

impl OutageLog {
    /// `what` names the feature that degrades, e.g. "rate limiting".
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            down: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The value on success; `None` (after logging a start of outage) on failure.
    pub fn observe<T>(&self, result: redis::RedisResult<T>) -> Option<T> {
        use std::sync::atomic::Ordering;
        match result {
            Ok(v) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!(feature = self.what, "redis is back");
                }
                Some(v)
            }
            Err(e) => {
                if !self.down.swap(true, Ordering::Relaxed) {
                    tracing::warn!(feature = self.what, error = %e, "redis unavailable: degraded until it returns");
                }
                None
            }
        }
    }

    pub fn is_down(&self) -> bool {
        self.down.load(std::sync::atomic::Ordering::Relaxed)
    }
}
