//! What an idempotent request is: its key (validated), the fingerprint of what it asks for,
//! and what a stored record says about a new attempt with the same key.

use std::{fmt, time::Duration};

use ring::digest;

use crate::validation::Violations;

/// The gRPC metadata key (Envoy passes the HTTP header `Idempotency-Key` through as it).
pub const METADATA_KEY: &str = "idempotency-key";
/// The response metadata (HTTP header through Envoy) set on every replayed answer.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// The field BadRequest details name for a bad or reused key.
pub const FIELD: &str = "idempotency_key";
/// The longest key accepted (Stripe's limit).
pub const MAX_KEY_LEN: usize = 255;
/// How long a completed key answers with its first response.
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);
/// How long a reservation holds off other attempts with the same key. Longer than any
/// create takes (the statement timeout bounds each query); when it passes without the
/// attempt completing or releasing (the process died), a retry takes the key over.
pub const LEASE: Duration = Duration::from_secs(60);

/// A client's idempotency key: 1–255 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(raw: &[u8]) -> Result<Self, Violations> {
        if raw.is_empty() || raw.len() > MAX_KEY_LEN {
            return Err(Violations::one(
                FIELD,
                format!("must be 1 to {MAX_KEY_LEN} characters long"),
            ));
        }
        if !raw.iter().all(|b| (0x20..=0x7e).contains(b)) {
            return Err(Violations::one(
                FIELD,
                "must be printable ASCII characters only",
            ));
        }
        // Printable ASCII is UTF-8.
        Ok(Self(String::from_utf8_lossy(raw).into_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// SHA-256 of the RPC name and the encoded request: the same key may only be used again
/// for the same RPC with the same request. Deterministic because every map field of the
/// API is generated as a BTreeMap (build.rs): prost encodes map entries in iteration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHash(pub [u8; 32]);

impl RequestHash {
    pub fn of(rpc: &str, request: &impl prost::Message) -> Self {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(rpc.as_bytes());
        // The name cannot contain a NUL: it separates it from the message.
        ctx.update(&[0]);
        ctx.update(&request.encode_to_vec());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        Self(out)
    }
}

/// A request that asks to be carried out once per key: what `Idempotency::begin` takes.
#[derive(Debug, Clone)]
pub struct Claim {
    pub key: IdempotencyKey,
    /// The full method name, `devgate.v1.<Service>/<Method>`.
    pub rpc: &'static str,
    pub hash: RequestHash,
}

impl Claim {
    pub fn new(key: IdempotencyKey, rpc: &'static str, request: &impl prost::Message) -> Self {
        Self {
            hash: RequestHash::of(rpc, request),
            key,
            rpc,
        }
    }
}

/// A stored key, as a later attempt finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub rpc: String,
    pub hash: Vec<u8>,
    pub state: RecordState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordState {
    /// Another attempt holds the key (its lease has not expired).
    InFlight,
    Completed {
        /// The encoded response; None when it held a secret.
        response: Option<Vec<u8>>,
        resource_id: String,
    },
}

/// What a stored record means for a new attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The same request completed: answer as it did.
    Replay {
        response: Option<Vec<u8>>,
        resource_id: String,
    },
    /// Another request used the key (`rpc` names its RPC).
    OtherRequest { rpc: String },
    /// The same request is still running.
    InFlight,
}

impl Record {
    /// The request is compared first: another request under a used key is a client error
    /// whether or not the first has finished.
    pub fn verdict(self, claim: &Claim) -> Verdict {
        if self.rpc != claim.rpc || self.hash != claim.hash.0 {
            return Verdict::OtherRequest { rpc: self.rpc };
        }
        match self.state {
            RecordState::InFlight => Verdict::InFlight,
            RecordState::Completed {
                response,
                resource_id,
            } => Verdict::Replay {
                response,
                resource_id,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1;

    #[test]
    fn keys_are_1_to_255_printable_ascii() {
        assert!(IdempotencyKey::parse(b"order-42 retry").is_ok());
        assert!(IdempotencyKey::parse(&[b'k'; 255]).is_ok());
        for bad in [
            &b""[..],
            &[b'k'; 256],
            b"tab\there",
            b"caf\xc3\xa9",
            b"nl\n",
        ] {
            let v = IdempotencyKey::parse(bad).unwrap_err();
            assert_eq!(v.iter().next().unwrap().field, FIELD, "{bad:?}");
        }
    }

    #[test]
    fn the_hash_covers_the_rpc_and_every_field() {
        let req = |url: &str| v1::CreateWebhookEndpointRequest {
            url: url.into(),
            headers: [("b", "2"), ("a", "1"), ("c", "3")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let a = RequestHash::of("devgate.v1.WebhookService/CreateWebhookEndpoint", &req("u"));
        // Same content built again (maps inserted in another order): same hash.
        let mut again = req("u");
        again.headers = [("c", "3"), ("a", "1"), ("b", "2")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            a,
            RequestHash::of("devgate.v1.WebhookService/CreateWebhookEndpoint", &again)
        );
        assert_ne!(
            a,
            RequestHash::of("devgate.v1.WebhookService/CreateWebhookEndpoint", &req("v"))
        );
        assert_ne!(a, RequestHash::of("devgate.v1.Other/Create", &req("u")));
    }

    #[test]
    fn a_record_is_judged_by_request_then_state() {
        let claim = Claim {
            key: IdempotencyKey::parse(b"k").unwrap(),
            rpc: "devgate.v1.S/Create",
            hash: RequestHash([1; 32]),
        };
        let record = |rpc: &str, hash: u8, state| Record {
            rpc: rpc.into(),
            hash: vec![hash; 32],
            state,
        };
        let done = RecordState::Completed {
            response: None,
            resource_id: "id1".into(),
        };
        assert_eq!(
            record("devgate.v1.S/Create", 1, done.clone()).verdict(&claim),
            Verdict::Replay {
                response: None,
                resource_id: "id1".into()
            }
        );
        assert_eq!(
            record("devgate.v1.S/Create", 1, RecordState::InFlight).verdict(&claim),
            Verdict::InFlight
        );
        for (rpc, hash, state) in [
            ("devgate.v1.S/Create", 2, done.clone()),
            ("devgate.v1.S/Create", 2, RecordState::InFlight),
            ("devgate.v1.T/Create", 1, done),
        ] {
            assert!(matches!(
                record(rpc, hash, state).verdict(&claim),
                Verdict::OtherRequest { .. }
            ));
        }
    }
}
