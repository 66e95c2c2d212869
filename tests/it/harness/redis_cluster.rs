//! A private 3-node Redis Cluster (3 masters, no replicas) on free 127.0.0.1 ports, in a temp
//! directory; the processes are killed when the value is dropped.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::Duration,
};

pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

/// A port whose cluster bus port (port + 10000) is free too.
fn free_port_pair() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

fn server_binary() -> String {
    std::env::var("DEVGATE_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

fn cli_binary() -> String {
    std::env::var("DEVGATE_TEST_REDIS_CLI").unwrap_or_else(|_| "redis-cli".into())
}

fn sync_conn(port: u16) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_connection_with_timeout(Duration::from_millis(200))
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < 3 {
            let p = free_port_pair();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let children = ports
            .iter()
            .map(|port| {
                Command::new(server_binary())
                    .current_dir(dir.path())
                    .args([
                        "--port",
                        &port.to_string(),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &format!("nodes-{port}.conf"),
                        "--cluster-node-timeout",
                        "2000",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server is installed")
            })
            .collect();
        let cluster = RedisCluster {
            ports: ports.clone(),
            children,
            _dir: dir,
        };
        for &port in &ports {
            super::wait_until(Duration::from_secs(10), || async move {
                sync_conn(port)
                    .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                    .is_ok()
            })
            .await;
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let output = tokio::task::spawn_blocking(move || {
            Command::new(cli_binary())
                .arg("--cluster")
                .arg("create")
                .args(&nodes)
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .output()
                .expect("redis-cli is installed")
        })
        .await
        .unwrap();
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        for &port in &ports {
            super::wait_until(Duration::from_secs(20), || async move {
                sync_conn(port)
                    .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query::<String>(&mut c))
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            })
            .await;
        }
        cluster
    }

    /// The value of DEVGATE_REDIS_CLUSTER_NODES, seed nodes starting at node `first`.
    pub fn nodes_from(&self, first: usize) -> String {
        (0..self.ports.len())
            .map(|i| {
                format!(
                    "redis://127.0.0.1:{}",
                    self.ports[(first + i) % self.ports.len()]
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node that serves `key`'s slot.
    pub fn node_of(&self, key: &str) -> u16 {
        let mut c = sync_conn(self.ports[0]).unwrap();
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut c)
            .unwrap();
        let slots: redis::Value = redis::cmd("CLUSTER").arg("SLOTS").query(&mut c).unwrap();
        let redis::Value::Array(ranges) = slots else {
            panic!("CLUSTER SLOTS: {slots:?}")
        };
        for range in ranges {
            let redis::Value::Array(r) = range else {
                continue;
            };
            let (redis::Value::Int(lo), redis::Value::Int(hi), redis::Value::Array(master)) =
                (&r[0], &r[1], &r[2])
            else {
                continue;
            };
            if (*lo..=*hi).contains(&slot)
                && let redis::Value::Int(port) = master[1]
            {
                return port as u16;
            }
        }
        panic!("no node serves slot {slot}")
    }

    /// A direct connection to one node (not cluster-aware).
    pub fn node(&self, port: u16) -> redis::Connection {
        sync_conn(port).unwrap()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
