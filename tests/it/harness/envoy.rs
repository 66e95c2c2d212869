//! A private Envoy in front of one test instance, started from the committed
//! envoy/envoy.yaml with only its ports and descriptor path replaced.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

pub struct Envoy {
    pub base: String,
    child: Child,
    _dir: tempfile::TempDir,
}

pub fn envoy_binary() -> PathBuf {
    std::env::var_os("DEVGATE_TEST_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::manifest_dir().join(".venv/bin/envoy"))
}

pub fn grpcurl_binary() -> PathBuf {
    std::env::var_os("DEVGATE_TEST_GRPCURL")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::manifest_dir().join(".venv/bin/grpcurl"))
}

/// Writes the descriptor set to `dir` (what `devgate descriptor --out` writes).
pub fn write_descriptor(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("devgate.pb");
    std::fs::write(&path, devgate::proto::FILE_DESCRIPTOR_SET).unwrap();
    path
}

impl Envoy {
    pub async fn start(upstream: SocketAddr) -> Envoy {
        let binary = envoy_binary();
        assert!(
            binary.exists(),
            "Envoy not found at {} (deploy/local/test.sh installs it)",
            binary.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let descriptor = write_descriptor(dir.path());
        let committed =
            std::fs::read_to_string(super::manifest_dir().join("envoy/envoy.yaml")).unwrap();
        for needle in [
            "port_value: 8080",
            "port_value: 9901",
            "port_value: 50051",
            "target/devgate.pb",
        ] {
            assert_eq!(
                committed.matches(needle).count(),
                1,
                "envoy.yaml must contain {needle:?} exactly once"
            );
        }
        let config = committed
            .replace("port_value: 8080", "port_value: 0")
            .replace("port_value: 9901", "port_value: 0")
            .replace(
                "port_value: 50051",
                &format!("port_value: {}", upstream.port()),
            )
            .replace("target/devgate.pb", descriptor.to_str().unwrap());
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, config).unwrap();
        let admin_path = dir.path().join("admin.txt");
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config_path)
            .arg("--use-dynamic-base-id")
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["--log-level", "warn", "--concurrency", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start envoy");
        let mut envoy = Envoy {
            base: String::new(),
            child,
            _dir: dir,
        };
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "envoy did not become ready"
            );
            if let Some(status) = envoy.child.try_wait().unwrap() {
                panic!("envoy exited: {status}");
            }
            if let Ok(admin) = std::fs::read_to_string(&admin_path) {
                let admin = admin.trim().to_string();
                let ready = http
                    .get(format!("http://{admin}/ready"))
                    .send()
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false);
                if ready {
                    let listeners: serde_json::Value = http
                        .get(format!("http://{admin}/listeners?format=json"))
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    let port = listeners["listener_statuses"][0]["local_address"]["socket_address"]
                        ["port_value"]
                        .as_u64()
                        .expect("listener port");
                    envoy.base = format!("http://127.0.0.1:{port}");
                    return envoy;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A devgate world with an Envoy in front of it and an HTTP client: the REST edge as a
/// developer sees it. Test files add the request helpers they need.
pub struct Edge {
    pub world: super::World,
    /// Held so Envoy runs as long as the edge.
    _envoy: Envoy,
    pub base: String,
    pub http: reqwest::Client,
}

impl Edge {
    pub async fn start() -> Edge {
        Self::on(super::World::new().await).await
    }

    /// Envoy in front of a world the test built (e.g. an API-only one).
    pub async fn on(world: super::World) -> Edge {
        let envoy = Envoy::start(world.app.public).await;
        let base = envoy.base.clone();
        Edge {
            world,
            _envoy: envoy,
            base,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }
}
