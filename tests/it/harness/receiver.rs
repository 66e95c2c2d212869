//! A webhook receiver process (tests/it/harness/receiver.py) that verifies deliveries with
//! the official Standard Webhooks library and answers as each test scripts it.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde::Deserialize;
use serde_json::{Value, json};

use super::{manifest_dir, wait_until};

pub struct Receiver {
    child: Child,
    port: u16,
    http: reqwest::Client,
}

/// One delivery as the receiver saw it.
#[derive(Debug, Clone, Deserialize)]
pub struct Received {
    /// Unix seconds, fractional.
    pub time: f64,
    /// Lower-case names.
    pub headers: std::collections::HashMap<String, String>,
    pub body: String,
    /// Indexes of the configured secrets whose signature verified.
    pub verified_by: Vec<usize>,
    /// What the receiver answered.
    #[allow(dead_code)] // shown when a test prints a delivery
    pub status: u16,
}

impl Received {
    pub fn webhook_id(&self) -> &str {
        &self.headers["webhook-id"]
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }
}

/// What a hook received, for thousands of deliveries.
#[derive(Debug, Clone, Deserialize)]
pub struct Summary {
    pub received: usize,
    /// webhook-id → how many times it arrived.
    pub ids: std::collections::HashMap<String, usize>,
    /// Deliveries no configured secret verified.
    pub unverified: usize,
}

/// A scripted answer.
pub fn respond(status: u16) -> Value {
    json!({ "status": status })
}

/// The Python that has the `standardwebhooks` package: `DEVGATE_TEST_PYTHON`, or the
/// project venv's (deploy/local/common.sh creates it).
pub fn python_binary() -> std::path::PathBuf {
    std::env::var_os("DEVGATE_TEST_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join(".venv/bin/python"))
}

impl Receiver {
    pub async fn start() -> Receiver {
        let python = python_binary();
        let mut child = Command::new(&python)
            .arg(manifest_dir().join("tests/it/harness/receiver.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{} not runnable ({e}); deploy/local/common.sh creates the venv",
                    python.display()
                )
            });
        let stdout = child.stdout.take().unwrap();
        let port = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).unwrap();
            line.trim()
                .parse::<u16>()
                .expect("the receiver prints its port")
        })
        .await
        .unwrap();
        Receiver {
            child,
            port,
            http: reqwest::Client::new(),
        }
    }

    /// An endpoint of `tenant` (created by its admin on the public listener) that sends the
    /// `types` to this receiver's `name` path, with its secret configured here; its id.
    pub async fn subscribe(
        &self,
        app: &super::TestApp,
        tenant: uuid::Uuid,
        name: &str,
        types: &[&str],
    ) -> String {
        use devgate::proto::v1::{self, webhook_service_client::WebhookServiceClient};
        let created = WebhookServiceClient::new(super::channel(app.public).await)
            .create_webhook_endpoint(super::bearer(
                v1::CreateWebhookEndpointRequest {
                    url: self.url(name),
                    event_types: types.iter().map(|t| t.to_string()).collect(),
                    ..Default::default()
                },
                &super::admin_token(tenant),
            ))
            .await
            .expect("create endpoint")
            .into_inner();
        self.configure(name, &[&created.secret], vec![], None).await;
        created.webhook_endpoint.expect("the endpoint").id
    }

    /// The URL of hook `name`.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/hooks/{name}", self.port)
    }

    /// Which secrets hook `name` verifies with, and its answers: `responses` in order, then
    /// `default` (200 when `None`).
    pub async fn configure(
        &self,
        name: &str,
        secrets: &[&str],
        responses: Vec<Value>,
        default: Option<Value>,
    ) {
        self.http
            .put(format!("http://127.0.0.1:{}/_config/{name}", self.port))
            .json(&json!({ "secrets": secrets, "responses": responses, "default": default }))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap();
    }

    pub async fn log(&self, name: &str) -> Vec<Received> {
        self.http
            .get(format!("http://127.0.0.1:{}/_log/{name}", self.port))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn summary(&self, name: &str) -> Summary {
        self.http
            .get(format!("http://127.0.0.1:{}/_summary/{name}", self.port))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until hook `name` got at least `n` deliveries; returns them.
    pub async fn wait_for(&self, name: &str, n: usize, within: Duration) -> Vec<Received> {
        wait_until(within, || async { self.log(name).await.len() >= n }).await;
        self.log(name).await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
