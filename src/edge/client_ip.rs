//! The client's address, for key allow-lists and the request log. A header is only as
//! trustworthy as the hop that set it: `x-forwarded-for` is read only when the TCP peer is
//! a trusted proxy (Envoy), and then the client is the right-most address in it that is not
//! itself a trusted proxy (everything left of that was written by the client and may be
//! forged).

use std::{net::IpAddr, str::FromStr};

use ipnetwork::IpNetwork;
use tonic::transport::server::TcpConnectInfo;

/// The proxies whose `x-forwarded-for` is believed (`DEVGATE_TRUSTED_PROXIES`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNetwork>);

impl TrustedProxies {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|net| net.contains(ip))
    }

    /// The client address of a call that arrived from `peer` with these
    /// `x-forwarded-for` header values (in header order).
    pub fn client_ip<'a>(
        &self,
        peer: Option<IpAddr>,
        forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
    ) -> Option<IpAddr> {
        let peer = peer.map(canonical)?;
        if !self.contains(peer) {
            return Some(peer);
        }
        let mut client = peer;
        // Right to left: each hop was appended by the proxy to its right; stop at the first
        // one that is not a trusted proxy (or cannot be parsed: nothing left of it counts).
        for value in forwarded_for.rev() {
            for hop in value.rsplit(',').map(str::trim) {
                match parse_hop(hop) {
                    Some(ip) if self.contains(ip) => client = ip,
                    Some(ip) => return Some(ip),
                    None => return Some(client),
                }
            }
        }
        Some(client)
    }

    /// The client address of a request (see [`TrustedProxies::client_ip`]).
    pub fn of_request<B>(&self, req: &http::Request<B>) -> Option<IpAddr> {
        let peer = req
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(|info| info.remote_addr())
            .map(|a| a.ip());
        let values = req
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok());
        self.client_ip(peer, values)
    }
}

/// `::ffff:a.b.c.d` is the IPv4 address it maps.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A hop as proxies write it: an address, possibly `[v6]:port` or `v4:port`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(addr) = hop.parse::<std::net::SocketAddr>() {
        return Some(canonical(addr.ip()));
    }
    None
}

impl FromStr for TrustedProxies {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().eq_ignore_ascii_case("none") {
            return Ok(Self::default());
        }
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse::<IpNetwork>()
                    .map_err(|e| format!("{p:?} is not a CIDR: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_cannot_name_the_client() {
        let trusted: TrustedProxies = "127.0.0.2/32".parse().unwrap();
        let got = trusted.client_ip(Some(ip("127.0.0.1")), ["203.0.113.7"].into_iter());
        assert_eq!(got, Some(ip("127.0.0.1")));
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_client() {
        let trusted: TrustedProxies = "10.0.0.0/8,127.0.0.2/32".parse().unwrap();
        // The client forged 1.2.3.4; the edge proxy appended the real address; an inner
        // trusted proxy appended the edge's address.
        let got = trusted.client_ip(
            Some(ip("127.0.0.2")),
            ["1.2.3.4, 198.51.100.9", "10.1.2.3"].into_iter(),
        );
        assert_eq!(got, Some(ip("198.51.100.9")));
        // No header: the trusted peer itself.
        assert_eq!(
            trusted.client_ip(Some(ip("127.0.0.2")), std::iter::empty()),
            Some(ip("127.0.0.2"))
        );
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(
            trusted.client_ip(
                Some(ip("127.0.0.2")),
                ["1.2.3.4, junk, 10.0.0.1"].into_iter()
            ),
            Some(ip("10.0.0.1"))
        );
        // Ports and mapped addresses are understood.
        assert_eq!(
            trusted.client_ip(
                Some(ip("::ffff:127.0.0.2")),
                ["[2001:db8::1]:4711"].into_iter()
            ),
            Some(ip("2001:db8::1"))
        );
    }

    #[test]
    fn none_trusts_nobody() {
        let trusted: TrustedProxies = "none".parse().unwrap();
        assert_eq!(
            trusted.client_ip(Some(ip("127.0.0.1")), ["1.2.3.4"].into_iter()),
            Some(ip("127.0.0.1"))
        );
        assert!("10.0.0.0/33".parse::<TrustedProxies>().is_err());
    }
}
