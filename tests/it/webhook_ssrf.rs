//! The SSRF matrix of issue 7: every internal address refused when an endpoint is created
//! AND when a delivery connects, proven by local HTTP receivers that must see nothing;
//! the allow-list re-opens a range and the receiver then gets the request.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use devgate::webhooks::ssrf::{
    AllowList, ClientTimeouts, GuardResolver, GuardedClient, Policy, SsrfError, validate_url,
};
use reqwest::header::HeaderMap;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

/// A real HTTP/1.1 receiver counting the requests it gets. `/redirect` answers 302 to
/// `redirect_to`, everything else 204.
struct Receiver {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(bind: &str, redirect_to: Option<String>) -> Option<Receiver> {
        let listener = TcpListener::bind(bind).await.ok()?;
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let counter = counter.clone();
                let redirect_to = redirect_to.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let head_end = loop {
                        let Ok(n) = sock.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + length {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    let response = match (&redirect_to, head.contains(" /redirect ")) {
                        (Some(to), true) => format!(
                            "HTTP/1.1 302 Found\r\nlocation: {to}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        ),
                        _ => "HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n".to_string(),
                    };
                    let _ = sock.write_all(response.as_bytes()).await;
                });
            }
        });
        Some(Receiver { addr, hits, task })
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn client(allow: &str) -> GuardedClient {
    let timeouts = ClientTimeouts {
        total: Duration::from_secs(10),
        connect: Duration::from_secs(5),
    };
    GuardedClient::new(Policy::new(allow.parse().unwrap(), false), timeouts).unwrap()
}

fn policy(allow: &str) -> Policy {
    Policy::new(allow.parse::<AllowList>().unwrap(), false)
}

async fn post(client: &GuardedClient, url: &str) -> Result<reqwest::Response, SsrfError> {
    client
        .post(
            url.parse().unwrap(),
            HeaderMap::new(),
            r#"{"type":"webhook.test"}"#.into(),
        )
        .await
}

/// The matrix URLs that point at the local receivers (v4 on 127.0.0.1, v6 on [::1]).
fn local_matrix(v4: u16, v6: Option<u16>) -> Vec<String> {
    let mut urls = vec![
        format!("http://127.0.0.1:{v4}/hook"),
        // 0.0.0.0 reaches the local host on Linux; ::ffff:127.0.0.1 reaches 127.0.0.1
        // through a dual-stack socket; 2130706433 is 127.0.0.1 spelt as one number.
        format!("http://0.0.0.0:{v4}/hook"),
        format!("http://[::ffff:127.0.0.1]:{v4}/hook"),
        format!("http://2130706433:{v4}/hook"),
        // A name that resolves to loopback: only resolution can tell.
        format!("http://localhost:{v4}/hook"),
    ];
    if let Some(v6) = v6 {
        urls.push(format!("http://[::1]:{v6}/hook"));
    }
    urls
}

/// Internal ranges with no local receiver: the refusal must come from the guard, at once,
/// not from a connect attempt or timeout.
const REMOTE_MATRIX: &[&str] = &[
    "http://10.0.0.1/hook",
    "http://10.255.1.2:8443/hook",
    "http://172.16.0.1/hook",
    "http://172.31.255.254/hook",
    "http://192.168.0.1/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/hook",
    "http://100.100.100.200/hook",
    "http://[fd00:ec2::254]/hook",
    "http://[fe80::1]/hook",
    "http://[::ffff:169.254.169.254]/hook",
    "http://[64:ff9b::a9fe:a9fe]/hook",
];

#[tokio::test]
async fn the_matrix_is_refused_at_validation_and_at_connect_time() {
    let v4 = Receiver::start("127.0.0.1:0", None).await.unwrap();
    let v6 = Receiver::start("[::1]:0", None).await;
    let urls = local_matrix(v4.addr.port(), v6.as_ref().map(|r| r.addr.port()));
    let strict = policy("");
    let client = client("");

    for url in urls
        .iter()
        .map(String::as_str)
        .chain(REMOTE_MATRIX.iter().copied())
    {
        let err = validate_url(url, &strict).await.unwrap_err();
        assert!(err.is_refusal(), "{url} at validation: {err}");

        let started = Instant::now();
        let err = post(&client, url).await.unwrap_err();
        assert!(err.is_refusal(), "{url} at connect time: {err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{url}: refused by the guard, not by a timeout"
        );
    }
    // The name is refused by the resolver, the literals before any connection.
    let err = post(
        &client,
        &format!("http://localhost:{}/hook", v4.addr.port()),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, SsrfError::BlockedName { ref host, .. } if host == "localhost"),
        "{err:?}"
    );
    assert!(
        !err.to_string().contains("127.0.0.1"),
        "resolved addresses are not echoed: {err}"
    );

    assert_eq!(v4.hits(), 0, "the IPv4 receiver got a request");
    if let Some(v6) = &v6 {
        assert_eq!(v6.hits(), 0, "the IPv6 receiver got a request");
    }
}

#[tokio::test]
async fn the_allow_list_lets_deliveries_reach_the_listed_ranges() {
    let v4 = Receiver::start("127.0.0.1:0", None).await.unwrap();
    let v6 = Receiver::start("[::1]:0", None).await;
    let urls = local_matrix(v4.addr.port(), v6.as_ref().map(|r| r.addr.port()));
    let allow = "127.0.0.0/8,::1/128,0.0.0.0/32";
    let open = policy(allow);
    let client = client(allow);

    for url in &urls {
        validate_url(url, &open)
            .await
            .unwrap_or_else(|e| panic!("{url} allowed at validation: {e}"));
        let response = post(&client, url)
            .await
            .unwrap_or_else(|e| panic!("{url} allowed at connect time: {e:?}"));
        assert_eq!(response.status(), 204, "{url}");
    }
    let v6_hits = v6.as_ref().map_or(0, Receiver::hits);
    assert_eq!(
        v4.hits() + v6_hits,
        urls.len(),
        "every allowed request arrived"
    );
    assert_eq!(v6_hits, usize::from(v6.is_some()));

    // The allow-list opens only what it lists.
    for url in REMOTE_MATRIX {
        assert!(
            validate_url(url, &open).await.unwrap_err().is_refusal(),
            "{url}"
        );
        assert!(post(&client, url).await.unwrap_err().is_refusal(), "{url}");
    }
}

#[tokio::test]
async fn literals_bypass_a_resolver_so_the_client_checks_them_itself() {
    // Why GuardedClient::execute checks IP literals: with the guard resolver alone, a
    // plain reqwest client connects to 127.0.0.1 without asking any resolver.
    let receiver = Receiver::start("127.0.0.1:0", None).await.unwrap();
    let url = format!("http://127.0.0.1:{}/hook", receiver.addr.port());
    let resolver_only = reqwest::Client::builder()
        .dns_resolver(Arc::new(GuardResolver::new(policy(""))))
        .no_proxy()
        .build()
        .unwrap();
    let response = resolver_only.post(&url).send().await.unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(receiver.hits(), 1, "the literal went past the resolver");
    // The same resolver does stop the name.
    let by_name = format!("http://localhost:{}/hook", receiver.addr.port());
    assert!(resolver_only.post(&by_name).send().await.is_err());
    assert_eq!(receiver.hits(), 1);

    // The guarded client refuses the literal before connecting.
    let err = post(&client(""), &url).await.unwrap_err();
    assert!(err.is_refusal(), "{err:?}");
    assert_eq!(receiver.hits(), 1);
}

#[tokio::test]
async fn redirects_are_not_followed_and_production_requires_https() {
    let target = Receiver::start("127.0.0.1:0", None).await.unwrap();
    let to = format!("http://127.0.0.1:{}/stolen", target.addr.port());
    let redirector = Receiver::start("127.0.0.1:0", Some(to)).await.unwrap();
    let client = client("127.0.0.0/8");
    let response = post(
        &client,
        &format!("http://127.0.0.1:{}/redirect", redirector.addr.port()),
    )
    .await
    .unwrap();
    assert_eq!(
        response.status(),
        302,
        "the redirect is the delivery's answer"
    );
    assert_eq!(redirector.hits(), 1);
    assert_eq!(target.hits(), 0, "the redirect target was not visited");

    let production = GuardedClient::new(
        Policy::new("127.0.0.0/8".parse().unwrap(), true),
        ClientTimeouts::default(),
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{}/hook", target.addr.port());
    let err = post(&production, &url).await.unwrap_err();
    assert!(matches!(err, SsrfError::HttpsRequired), "{err:?}");
    let err = validate_url(&url, &Policy::new(AllowList::default(), true))
        .await
        .unwrap_err();
    assert!(matches!(err, SsrfError::HttpsRequired), "{err:?}");
    assert_eq!(target.hits(), 0);
}
