//! The SSRF guard: tenant-supplied webhook URLs must never reach devgate's own network
//! (loopback, private ranges, link-local and the cloud metadata address, CGNAT, …).
//!
//! Two layers, because checking the URL when the endpoint is created is not enough (the
//! name may resolve elsewhere later — DNS rebinding):
//! 1. [`validate_url`] at creation: shape (absolute, http(s), https in production, no
//!    userinfo, ≤ 2 KiB) and every address the host resolves to.
//! 2. [`GuardedClient`] at delivery: a reqwest client whose resolver ([`GuardResolver`])
//!    drops blocked addresses and fails when none remain, so the TCP connection can only go
//!    to an address checked at that moment. IP-literal hosts never reach a resolver (hyper
//!    connects to them directly), so [`GuardedClient::execute`] checks those itself; the
//!    inner client is private, follows no redirects and uses no proxy, so the request URL
//!    is the only place a connection can go.
//!
//! [`DEVGATE_WEBHOOK_ALLOWED_CIDRS`](AllowList) re-opens chosen ranges (e.g. `127.0.0.0/8`
//! for a local receiver in development).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use ipnetwork::IpNetwork;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

/// Longest URL accepted (bytes).
pub const MAX_URL_LEN: usize = 2048;

/// Why an address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockReason {
    Loopback,
    Private,
    LinkLocal,
    SharedCgnat,
    Multicast,
    Unspecified,
    Broadcast,
    /// Documentation, benchmarking, IETF protocol assignments, future use, discard-only.
    Reserved,
    UniqueLocal,
}

impl fmt::Display for BlockReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::LinkLocal => "link-local",
            Self::SharedCgnat => "shared (CGNAT)",
            Self::Multicast => "multicast",
            Self::Unspecified => "unspecified",
            Self::Broadcast => "broadcast",
            Self::Reserved => "reserved",
            Self::UniqueLocal => "unique local",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SsrfError {
    #[error("the URL is longer than {MAX_URL_LEN} bytes")]
    TooLong,
    #[error("not an absolute URL: {0}")]
    Parse(#[from] url::ParseError),
    #[error("the scheme must be https")]
    HttpsRequired,
    #[error("the scheme must be http or https")]
    Scheme,
    #[error("the URL must not carry a user name or password")]
    UserInfo,
    #[error("the URL has no host")]
    NoHost,
    /// An IP literal in the URL (its own address is no secret to whoever wrote it).
    #[error("{addr} is a {reason} address")]
    BlockedAddress { addr: IpAddr, reason: BlockReason },
    /// A name: the resolved address is not echoed, so tenants cannot map internal DNS.
    #[error("{host} resolves to a {reason} address")]
    BlockedName { host: String, reason: BlockReason },
    #[error("{host} does not resolve")]
    Unresolvable { host: String },
    #[error("a bad CIDR in the allow-list: {0}")]
    AllowList(String),
    #[error("building the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// Anything else while sending (timeout, connect, TLS, …); classify with
    /// [`reqwest::Error`]'s predicates.
    #[error("sending: {0}")]
    Transport(#[source] reqwest::Error),
}

impl SsrfError {
    /// True for a refusal by the guard (the `refused_by_ssrf_guard` error kind of an attempt).
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::BlockedAddress { .. } | Self::BlockedName { .. })
    }

    /// A copy of a refusal raised inside the resolver, found in a reqwest error's chain.
    fn refusal_copy(&self) -> Option<Self> {
        match self {
            Self::BlockedAddress { addr, reason } => Some(Self::BlockedAddress {
                addr: *addr,
                reason: *reason,
            }),
            Self::BlockedName { host, reason } => Some(Self::BlockedName {
                host: host.clone(),
                reason: *reason,
            }),
            Self::Unresolvable { host } => Some(Self::Unresolvable { host: host.clone() }),
            _ => None,
        }
    }
}

/// The ranges a tenant URL may never reach, before the allow-list; `None` = public.
pub fn classify(addr: IpAddr) -> Option<BlockReason> {
    match addr {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(a: Ipv4Addr) -> Option<BlockReason> {
    let o = a.octets();
    Some(match o {
        [0, ..] => BlockReason::Unspecified, // 0/8 "this network", 0.0.0.0 included
        [127, ..] => BlockReason::Loopback,
        [10, ..] => BlockReason::Private,
        [172, b, ..] if (16..32).contains(&b) => BlockReason::Private,
        [192, 168, ..] => BlockReason::Private,
        [169, 254, ..] => BlockReason::LinkLocal, // 169.254.169.254: cloud metadata
        [100, b, ..] if (64..128).contains(&b) => BlockReason::SharedCgnat, // incl. 100.100.100.200
        [192, 0, 0, _] => BlockReason::Reserved,  // IETF protocol assignments
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => BlockReason::Reserved,
        [198, b, ..] if b == 18 || b == 19 => BlockReason::Reserved, // benchmarking
        [255, 255, 255, 255] => BlockReason::Broadcast,
        [a0, ..] if (224..240).contains(&a0) => BlockReason::Multicast,
        [a0, ..] if a0 >= 240 => BlockReason::Reserved,
        _ => return None,
    })
}

/// The IPv4 address an IPv6 address stands for, when it embeds one: IPv4-mapped
/// (::ffff:0:0/96), IPv4-compatible (::/96, deprecated), NAT64 (64:ff9b::/96) and 6to4
/// (2002::/16). A blocked IPv4 inside any of them is blocked.
fn embedded_v4(a: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = a.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(tail),
        [0, 0, 0, 0, 0, 0, _, _] if !(s[6] == 0 && s[7] <= 1) => Some(tail),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(tail),
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::new(
            (hi >> 8) as u8,
            hi as u8,
            (lo >> 8) as u8,
            lo as u8,
        )),
        _ => None,
    }
}

fn classify_v6(a: Ipv6Addr) -> Option<BlockReason> {
    if a.is_unspecified() {
        return Some(BlockReason::Unspecified);
    }
    if a.is_loopback() {
        return Some(BlockReason::Loopback);
    }
    if let Some(v4) = embedded_v4(a) {
        return classify_v4(v4);
    }
    let s = a.segments();
    Some(match s[0] {
        x if x & 0xfe00 == 0xfc00 => BlockReason::UniqueLocal, // fc00::/7 (AWS fd00:ec2::254)
        x if x & 0xffc0 == 0xfe80 => BlockReason::LinkLocal,   // fe80::/10
        x if x & 0xffc0 == 0xfec0 => BlockReason::Private,     // fec0::/10 site-local
        x if x & 0xff00 == 0xff00 => BlockReason::Multicast,   // ff00::/8
        0x0064 if s[1] == 0xff9b && s[2] == 1 => BlockReason::Private, // 64:ff9b:1::/48 local NAT64
        0x0100 if s[1..4] == [0, 0, 0] => BlockReason::Reserved, // 100::/64 discard-only
        0x2001 if s[1] == 0x0db8 => BlockReason::Reserved,     // documentation
        0x2001 if s[1] == 0 => BlockReason::Reserved,          // Teredo: embeds an obfuscated IPv4
        _ => return None,
    })
}

/// `DEVGATE_WEBHOOK_ALLOWED_CIDRS`: ranges re-opened despite [`classify`]. Empty by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(Vec<IpNetwork>);

impl FromStr for AllowList {
    type Err = SsrfError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(|c| {
                c.parse::<IpNetwork>()
                    .map_err(|e| SsrfError::AllowList(format!("{c}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }
}

impl AllowList {
    /// True when `addr` (or the IPv4 address it embeds) lies in an allowed range.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let embedded = match addr {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        self.0
            .iter()
            .any(|net| net.contains(addr) || embedded.is_some_and(|e| net.contains(e)))
    }
}

/// What tenant URLs may be: the allow-list and whether http is still accepted.
#[derive(Debug, Clone)]
pub struct Policy {
    allow: AllowList,
    https_only: bool,
}

impl Policy {
    /// `https_only` in production (`DEVGATE_ENVIRONMENT=production`).
    pub fn new(allow: AllowList, https_only: bool) -> Self {
        Self { allow, https_only }
    }

    /// The block decision for one address: `Some(reason)` when refused.
    pub fn check(&self, addr: IpAddr) -> Option<BlockReason> {
        classify(addr).filter(|_| !self.allow.contains(addr))
    }

    /// Shape checks plus, for IP-literal hosts, the address check. Returns the host name
    /// when the host is a name (still to be resolved), else `None`.
    fn check_shape(&self, url: &Url) -> Result<Option<String>, SsrfError> {
        if url.as_str().len() > MAX_URL_LEN {
            return Err(SsrfError::TooLong);
        }
        match (url.scheme(), self.https_only) {
            ("https", _) => {}
            ("http", true) => return Err(SsrfError::HttpsRequired),
            ("http", false) => {}
            _ => return Err(SsrfError::Scheme),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(SsrfError::UserInfo);
        }
        let addr = match url.host().ok_or(SsrfError::NoHost)? {
            Host::Domain(d) => return Ok(Some(d.to_string())),
            Host::Ipv4(a) => IpAddr::V4(a),
            Host::Ipv6(a) => IpAddr::V6(a),
        };
        match self.check(addr) {
            Some(reason) => Err(SsrfError::BlockedAddress { addr, reason }),
            None => Ok(None),
        }
    }
}

/// Validates a webhook URL for endpoint creation or update: shape, and every address its
/// host resolves to now (all must pass: a name with one internal address is refused).
pub async fn validate_url(raw: &str, policy: &Policy) -> Result<Url, SsrfError> {
    if raw.len() > MAX_URL_LEN {
        return Err(SsrfError::TooLong);
    }
    let url = Url::parse(raw)?;
    if let Some(host) = policy.check_shape(&url)? {
        let addrs = lookup(&host).await?;
        if let Some(reason) = addrs.iter().find_map(|a| policy.check(*a)) {
            return Err(SsrfError::BlockedName { host, reason });
        }
    }
    Ok(url)
}

/// System resolution (getaddrinfo on tokio's blocking pool, never on a runtime thread).
async fn lookup(host: &str) -> Result<Vec<IpAddr>, SsrfError> {
    let unresolvable = || SsrfError::Unresolvable {
        host: host.to_string(),
    };
    let addrs: Vec<IpAddr> = tokio::net::lookup_host((host, 0))
        .await
        .map_err(|_| unresolvable())?
        .map(|sa| sa.ip())
        .collect();
    if addrs.is_empty() {
        return Err(unresolvable());
    }
    Ok(addrs)
}

/// The delivery client's resolver: resolves with the system, drops blocked addresses,
/// fails with a refusal when none remain.
#[derive(Debug, Clone)]
pub struct GuardResolver {
    policy: Arc<Policy>,
}

impl GuardResolver {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl Resolve for GuardResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = lookup(&host).await?;
            let mut refusal = None;
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match policy.check(*a) {
                    Some(reason) => {
                        refusal.get_or_insert(reason);
                        false
                    }
                    None => true,
                })
                .map(|a| SocketAddr::new(a, 0))
                .collect();
            if allowed.is_empty() {
                let reason = refusal.unwrap_or(BlockReason::Unspecified);
                return Err(SsrfError::BlockedName { host, reason }.into());
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// Timeouts of the delivery client.
#[derive(Debug, Clone, Copy)]
pub struct ClientTimeouts {
    /// Whole request, headers and body (DEVGATE_WEBHOOK_TIMEOUT, 30 s by default).
    pub total: Duration,
    pub connect: Duration,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        Self {
            total: Duration::from_secs(30),
            connect: Duration::from_secs(10),
        }
    }
}

/// The only HTTP client that may talk to tenant URLs (pooled; clone freely).
#[derive(Debug, Clone)]
pub struct GuardedClient {
    client: reqwest::Client,
    policy: Arc<Policy>,
}

impl GuardedClient {
    pub fn new(policy: Policy, timeouts: ClientTimeouts) -> Result<Self, SsrfError> {
        let policy = Arc::new(policy);
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardResolver {
                policy: policy.clone(),
            }))
            // A redirect would be a second, unchecked URL; a proxy would make the resolver
            // check the proxy instead of the target (reqwest reads HTTP(S)_PROXY otherwise).
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .https_only(policy.https_only)
            .timeout(timeouts.total)
            .connect_timeout(timeouts.connect)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("devgate-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(SsrfError::Client)?;
        Ok(Self { client, policy })
    }

    /// Sends `request` unless its URL is refused; a refusal by the resolver comes back as
    /// the same [`SsrfError`] refusal, not as an opaque transport error.
    pub async fn execute(&self, request: reqwest::Request) -> Result<reqwest::Response, SsrfError> {
        self.policy.check_shape(request.url())?;
        self.client.execute(request).await.map_err(|e| {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = source {
                if let Some(copy) = s
                    .downcast_ref::<SsrfError>()
                    .and_then(SsrfError::refusal_copy)
                {
                    return copy;
                }
                source = s.source();
            }
            SsrfError::Transport(e)
        })
    }

    /// A POST of `body` with `headers` to `url` through [`Self::execute`].
    pub async fn post(
        &self,
        url: Url,
        headers: reqwest::header::HeaderMap,
        body: bytes::Bytes,
    ) -> Result<reqwest::Response, SsrfError> {
        let mut request = reqwest::Request::new(reqwest::Method::POST, url);
        *request.headers_mut() = headers;
        *request.body_mut() = Some(body.into());
        self.execute(request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_matrix_is_blocked() {
        for (addr, reason) in [
            ("127.0.0.1", BlockReason::Loopback),
            ("127.255.255.254", BlockReason::Loopback),
            ("::1", BlockReason::Loopback),
            ("10.0.0.1", BlockReason::Private),
            ("10.255.255.255", BlockReason::Private),
            ("172.16.0.1", BlockReason::Private),
            ("172.31.255.255", BlockReason::Private),
            ("192.168.1.1", BlockReason::Private),
            ("169.254.169.254", BlockReason::LinkLocal),
            ("100.64.0.1", BlockReason::SharedCgnat),
            ("100.127.255.255", BlockReason::SharedCgnat),
            ("100.100.100.200", BlockReason::SharedCgnat),
            ("0.0.0.0", BlockReason::Unspecified),
            ("0.1.2.3", BlockReason::Unspecified),
            ("::", BlockReason::Unspecified),
            ("255.255.255.255", BlockReason::Broadcast),
            ("224.0.0.1", BlockReason::Multicast),
            ("239.255.255.250", BlockReason::Multicast),
            ("240.0.0.1", BlockReason::Reserved),
            ("192.0.0.170", BlockReason::Reserved),
            ("198.18.0.1", BlockReason::Reserved),
            ("::ffff:127.0.0.1", BlockReason::Loopback),
            ("::ffff:169.254.169.254", BlockReason::LinkLocal),
            ("::ffff:10.1.2.3", BlockReason::Private),
            ("::127.0.0.1", BlockReason::Loopback),
            ("64:ff9b::a9fe:a9fe", BlockReason::LinkLocal),
            ("2002:7f00:1::", BlockReason::Loopback),
            ("2002:c0a8:101::1", BlockReason::Private),
            ("fc00::1", BlockReason::UniqueLocal),
            ("fd00:ec2::254", BlockReason::UniqueLocal),
            ("fe80::1", BlockReason::LinkLocal),
            ("fec0::1", BlockReason::Private),
            ("ff02::1", BlockReason::Multicast),
            ("2001:db8::1", BlockReason::Reserved),
            ("2001:0:4136:e378::1", BlockReason::Reserved),
            ("64:ff9b:1::1", BlockReason::Private),
        ] {
            assert_eq!(classify(ip(addr)), Some(reason), "{addr}");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for addr in [
            "1.1.1.1",
            "8.8.8.8",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "169.253.0.1",
            "192.169.0.1",
            "11.0.0.1",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2a00:1450:4001::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(classify(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn the_allow_list_reopens_ranges() {
        let allow: AllowList = "127.0.0.0/8, 10.1.0.0/16".parse().unwrap();
        let policy = Policy::new(allow, false);
        assert_eq!(policy.check(ip("127.0.0.1")), None);
        assert_eq!(
            policy.check(ip("::ffff:127.0.0.1")),
            None,
            "mapped form too"
        );
        assert_eq!(policy.check(ip("10.1.2.3")), None);
        assert_eq!(policy.check(ip("10.2.0.1")), Some(BlockReason::Private));
        assert_eq!(policy.check(ip("::1")), Some(BlockReason::Loopback));
        assert_eq!("".parse::<AllowList>().unwrap(), AllowList::default());
        assert!(matches!(
            "127.0.0.0/33".parse::<AllowList>(),
            Err(SsrfError::AllowList(_))
        ));
    }

    #[tokio::test]
    async fn url_shape() {
        let prod = Policy::new(AllowList::default(), true);
        let dev = Policy::new(AllowList::default(), false);
        validate_url("https://93.184.215.14/hook", &prod)
            .await
            .unwrap();
        validate_url("http://93.184.215.14/hook", &dev)
            .await
            .unwrap();
        let refused = |r: Result<Url, SsrfError>| r.unwrap_err();
        assert!(matches!(
            refused(validate_url("http://93.184.215.14/", &prod).await),
            SsrfError::HttpsRequired
        ));
        assert!(matches!(
            refused(validate_url("ftp://93.184.215.14/", &dev).await),
            SsrfError::Scheme
        ));
        assert!(matches!(
            refused(validate_url("/relative/path", &dev).await),
            SsrfError::Parse(_)
        ));
        assert!(matches!(
            refused(validate_url("https://user:pw@93.184.215.14/", &dev).await),
            SsrfError::UserInfo
        ));
        assert!(matches!(
            refused(validate_url("https://user@93.184.215.14/", &dev).await),
            SsrfError::UserInfo
        ));
        let long = format!("https://93.184.215.14/{}", "a".repeat(MAX_URL_LEN));
        assert!(matches!(
            refused(validate_url(&long, &dev).await),
            SsrfError::TooLong
        ));
        // Numeric IPv4 spellings are normalised by the URL parser before the check.
        for sneaky in [
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            "http://[::ffff:7f00:1]/",
            "http://[0:0:0:0:0:ffff:127.0.0.1]/",
        ] {
            let err = refused(validate_url(sneaky, &dev).await);
            assert!(
                matches!(
                    err,
                    SsrfError::BlockedAddress {
                        reason: BlockReason::Loopback,
                        ..
                    }
                ),
                "{sneaky}: {err}"
            );
        }
    }
}
