//! Internal callers: the platform's services that call the internal listener. Each one
//! presents a service token (`authorization: Bearer dgs_…`) or, with mTLS, a client
//! certificate; configuration holds only the token's SHA-256, the caller's name and the
//! internal RPCs it may call, so a leaked configuration leaks no credential.
//!
//! `DEVGATE_SERVICE_TOKENS` syntax: entries separated by `;`, each `NAME:SHA256:RPCS` where
//! NAME is `[a-z0-9._-]{1,64}`, SHA256 is the token's digest in hex (or `-` for a caller
//! that authenticates only with a client certificate named NAME) and RPCS is `*` (every
//! internal RPC) or a comma-separated list such as `UsageService/GrantCredits,ApiKeyService/VerifyApiKey`.

use std::{collections::BTreeSet, fmt, str::FromStr, sync::Arc};

use base64::Engine;

/// The gRPC package of the internal services; their paths are `/<package>.<Service>/<Method>`.
pub const INTERNAL_PACKAGE: &str = "devgate.internal.v1";

/// Every internal RPC, as `Service/Method` within [`INTERNAL_PACKAGE`].
pub const INTERNAL_RPCS: &[&str] = &[
    "ApiKeyService/VerifyApiKey",
    "UsageService/SetPlan",
    "UsageService/GrantCredits",
    "UsageService/RecordUsage",
    "WebhookService/PublishEvent",
];

/// Prefix of service tokens, so secret scanners can tell them from API keys.
pub const TOKEN_PREFIX: &str = "dgs_";

type Digest = [u8; 32];

/// One configured internal caller.
#[derive(Clone)]
pub struct ServiceCaller {
    pub name: Arc<str>,
    token_sha256: Option<Digest>,
    allowed: Allowed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Allowed {
    Every,
    Only(BTreeSet<&'static str>),
}

impl ServiceCaller {
    /// Whether the caller may call `rpc` (`Service/Method` within the internal package).
    pub fn may_call(&self, rpc: &str) -> bool {
        match &self.allowed {
            Allowed::Every => INTERNAL_RPCS.contains(&rpc),
            Allowed::Only(set) => set.contains(rpc),
        }
    }
}

impl fmt::Debug for ServiceCaller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The digest is not secret, but there is no reason to print it either.
        f.debug_struct("ServiceCaller")
            .field("name", &self.name)
            .field("allowed", &self.allowed)
            .finish_non_exhaustive()
    }
}

/// Every configured internal caller.
#[derive(Clone, Debug, Default)]
pub struct ServiceCallers(Vec<ServiceCaller>);

impl ServiceCallers {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|c| &*c.name)
    }

    /// The caller whose token this is. The presented token is hashed and compared with
    /// every configured digest in constant time, without stopping at a match.
    pub fn by_token(&self, token: &str) -> Option<&ServiceCaller> {
        let presented = sha256(token);
        let mut found = None;
        for caller in &self.0 {
            if let Some(expected) = &caller.token_sha256
                && constant_time_eq(expected, &presented)
            {
                found = Some(caller);
            }
        }
        found
    }

    /// The caller a verified client certificate names (mTLS).
    pub fn by_name(&self, name: &str) -> Option<&ServiceCaller> {
        self.0.iter().find(|c| &*c.name == name)
    }
}

fn constant_time_eq(a: &Digest, b: &Digest) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn sha256(token: &str) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// The SHA-256 of a token in lowercase hex, as configuration holds it.
pub fn token_digest_hex(token: &str) -> String {
    sha256(token).iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random service token: `dgs_` and 32 bytes from the system CSPRNG, base64url.
pub fn generate_token() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system CSPRNG is available");
    format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// The configuration entry for a caller: `NAME:SHA256:RPCS`.
pub fn config_entry(name: &str, token: &str, allow: &[String]) -> String {
    let rpcs = if allow.is_empty() {
        "*".to_string()
    } else {
        allow.join(",")
    };
    format!("{name}:{}:{rpcs}", token_digest_hex(token))
}

/// Checks a caller name (the CLI uses it too).
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "caller name {name:?} must be 1 to 64 of a-z, 0-9, '.', '_', '-'"
        ))
    }
}

/// Checks one RPC name, accepting `Service/Method` or the full `/devgate.internal.v1.Service/Method`.
pub fn parse_rpc(rpc: &str) -> Result<&'static str, String> {
    let short = rpc
        .trim()
        .trim_start_matches('/')
        .trim_start_matches(INTERNAL_PACKAGE)
        .trim_start_matches('.');
    INTERNAL_RPCS
        .iter()
        .copied()
        .find(|r| *r == short)
        .ok_or_else(|| {
            format!(
                "unknown internal RPC {rpc:?}; expected * or one of {}",
                INTERNAL_RPCS.join(", ")
            )
        })
}

impl FromStr for ServiceCallers {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut callers: Vec<ServiceCaller> = Vec::new();
        for entry in s.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let mut parts = entry.splitn(3, ':');
            let (Some(name), Some(digest), Some(rpcs)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err("each entry is NAME:SHA256:RPCS (see the README)".into());
            };
            validate_name(name)?;
            let token_sha256 = match digest {
                "-" => None,
                hex => Some(parse_hex_digest(hex).ok_or_else(|| {
                    format!("{name}: the token digest must be 64 hex characters (SHA-256) or -")
                })?),
            };
            let allowed = if rpcs.trim() == "*" {
                Allowed::Every
            } else {
                let set = rpcs
                    .split(',')
                    .map(parse_rpc)
                    .collect::<Result<BTreeSet<_>, _>>()
                    .map_err(|e| format!("{name}: {e}"))?;
                Allowed::Only(set)
            };
            if callers.iter().any(|c| &*c.name == name) {
                return Err(format!("caller {name} is configured twice"));
            }
            if token_sha256.is_some() && callers.iter().any(|c| c.token_sha256 == token_sha256) {
                return Err(format!("{name}: another caller has the same token"));
            }
            callers.push(ServiceCaller {
                name: name.into(),
                token_sha256,
                allowed,
            });
        }
        Ok(ServiceCallers(callers))
    }
}

fn parse_hex_digest(hex: &str) -> Option<Digest> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_authenticate_only_their_caller() {
        let billing = generate_token();
        let gateway = generate_token();
        assert!(billing.starts_with(TOKEN_PREFIX) && billing.len() == 4 + 43);
        let config = format!(
            "{};{}",
            config_entry("billing", &billing, &["UsageService/GrantCredits".into()]),
            config_entry("gateway", &gateway, &[]),
        );
        let callers: ServiceCallers = config.parse().unwrap();
        let b = callers.by_token(&billing).unwrap();
        assert_eq!(&*b.name, "billing");
        assert!(b.may_call("UsageService/GrantCredits"));
        assert!(!b.may_call("UsageService/SetPlan"));
        let g = callers.by_token(&gateway).unwrap();
        assert!(g.may_call("UsageService/SetPlan"));
        assert!(!g.may_call("UsageService/DropTables"));
        assert!(callers.by_token("dgs_wrong").is_none());
        assert!(callers.by_token("").is_none());
    }

    #[test]
    fn bad_entries_are_refused_with_a_reason() {
        let digest = token_digest_hex("x");
        for bad in [
            "billing".to_string(),
            format!("Billing:{digest}:*"),
            "billing:abc:*".to_string(),
            format!("billing:{digest}:UsageService/Nope"),
            format!("a:{digest}:*;a:-:*"),
            format!("a:{digest}:*;b:{digest}:*"),
        ] {
            assert!(bad.parse::<ServiceCallers>().is_err(), "{bad} was accepted");
        }
        let ok: ServiceCallers =
            format!("a:{digest}:/devgate.internal.v1.UsageService/SetPlan ; cert-only:-:*")
                .parse()
                .unwrap();
        assert!(ok.by_name("a").unwrap().may_call("UsageService/SetPlan"));
        assert!(ok.by_name("cert-only").is_some());
        assert!("".parse::<ServiceCallers>().unwrap().is_empty());
    }
}
