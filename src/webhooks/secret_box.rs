//! Secrets at rest: AES-256-GCM (ring) under a key ring, so a database dump alone reveals no
//! webhook secret and the master key can be rotated without re-encrypting every row at once.
//!
//! `DEVGATE_ENCRYPTION_KEYS` = `id:base64key[,id2:base64key2…]`: the first key encrypts, every
//! key decrypts. Stored form: `v1:<key id>:<base64(nonce ‖ ciphertext ‖ tag)>` with a random
//! 96-bit nonce per encryption (far below GCM's 2³² random-nonce budget per key for the
//! number of secrets a tenant base holds). The associated data binds each ciphertext to its
//! row (see [`row_context`]), so a ciphertext copied into another row does not decrypt.

use std::{collections::HashMap, fmt, str::FromStr, sync::Arc};

use base64::{Engine, engine::general_purpose::STANDARD};
use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    rand::{SecureRandom, SystemRandom},
};

const FORMAT: &str = "v1";
const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
const MAX_KEY_ID_LEN: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretBoxError {
    /// Configuration errors name the entry by position and id, never the key material.
    #[error("entry {index}: expected `id:base64key`")]
    MalformedEntry { index: usize },
    #[error("entry {index}: the key id must be 1-{MAX_KEY_ID_LEN} characters of [A-Za-z0-9_-]")]
    BadKeyId { index: usize },
    #[error("entry {index} (key id {id}): the key must be base64 of exactly {KEY_LEN} bytes")]
    BadKey { index: usize, id: String },
    #[error("key id {0} appears twice")]
    DuplicateKeyId(String),
    #[error("no encryption key is configured")]
    Empty,
    #[error("the stored secret is not in the `v1:<key id>:<base64>` form")]
    Malformed,
    #[error("the stored secret was encrypted under key id {0}, which is not in the key ring")]
    UnknownKeyId(String),
    /// Wrong key, wrong row, or a modified ciphertext: GCM cannot tell them apart.
    #[error("the stored secret does not decrypt (tampered, or bound to another row)")]
    Decrypt,
    #[error("the system random generator failed")]
    Random,
    #[error("encryption failed")]
    Seal,
}

struct RingKey {
    id: String,
    key: LessSafeKey,
}

/// The key ring. Cheap to clone; Debug shows key ids only.
#[derive(Clone)]
pub struct KeyRing {
    /// Index 0 encrypts.
    keys: Arc<Vec<RingKey>>,
    by_id: Arc<HashMap<String, usize>>,
    rng: SystemRandom,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        f.debug_struct("KeyRing").field("key_ids", &ids).finish()
    }
}

impl FromStr for KeyRing {
    type Err = SecretBoxError;

    /// Parses `id:base64key,…`; errors never contain key material.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut keys = Vec::new();
        let mut by_id = HashMap::new();
        for (index, entry) in s.split(',').map(str::trim).enumerate() {
            let (id, b64) = entry
                .split_once(':')
                .ok_or(SecretBoxError::MalformedEntry { index })?;
            let id_ok = !id.is_empty()
                && id.len() <= MAX_KEY_ID_LEN
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !id_ok {
                return Err(SecretBoxError::BadKeyId { index });
            }
            let bad_key = || SecretBoxError::BadKey {
                index,
                id: id.to_string(),
            };
            let mut raw = STANDARD.decode(b64.trim()).map_err(|_| bad_key())?;
            if raw.len() != KEY_LEN {
                raw.fill(0);
                return Err(bad_key());
            }
            let unbound = UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| bad_key())?;
            raw.fill(0);
            if by_id.insert(id.to_string(), keys.len()).is_some() {
                return Err(SecretBoxError::DuplicateKeyId(id.to_string()));
            }
            keys.push(RingKey {
                id: id.to_string(),
                key: LessSafeKey::new(unbound),
            });
        }
        if keys.is_empty() {
            return Err(SecretBoxError::Empty);
        }
        Ok(Self {
            keys: Arc::new(keys),
            by_id: Arc::new(by_id),
            rng: SystemRandom::new(),
        })
    }
}

/// The associated data of a webhook endpoint's secret: what the ciphertext is, and whose.
pub fn row_context(tenant_id: uuid::Uuid, endpoint_id: uuid::Uuid) -> Vec<u8> {
    format!("devgate/webhook_endpoint_secret/{tenant_id}/{endpoint_id}").into_bytes()
}

/// Binds the stored header too, so the key id cannot be edited to another ring member.
fn full_aad(key_id: &str, context: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(FORMAT.len() + key_id.len() + context.len() + 2);
    aad.extend_from_slice(FORMAT.as_bytes());
    aad.push(b':');
    aad.extend_from_slice(key_id.as_bytes());
    aad.push(b':');
    aad.extend_from_slice(context);
    aad
}

impl KeyRing {
    /// The id of the key that encrypts (the first one).
    pub fn current_key_id(&self) -> &str {
        &self.keys[0].id
    }

    /// Encrypts `plaintext` under the current key, bound to `context` (e.g. [`row_context`]).
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Result<String, SecretBoxError> {
        let key = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| SecretBoxError::Random)?;
        let mut in_out = plaintext.to_vec();
        key.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(full_aad(&key.id, context)),
                &mut in_out,
            )
            .map_err(|_| SecretBoxError::Seal)?;
        let mut blob = Vec::with_capacity(NONCE_LEN + in_out.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&in_out);
        in_out.fill(0);
        Ok(format!("{FORMAT}:{}:{}", key.id, STANDARD.encode(blob)))
    }

    /// Decrypts a stored value with whichever ring key it names, checking `context`.
    pub fn open(&self, stored: &str, context: &[u8]) -> Result<Vec<u8>, SecretBoxError> {
        let mut parts = stored.splitn(3, ':');
        let (Some(FORMAT), Some(key_id), Some(b64)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(SecretBoxError::Malformed);
        };
        let key = self
            .by_id
            .get(key_id)
            .map(|&i| &self.keys[i])
            .ok_or_else(|| SecretBoxError::UnknownKeyId(key_id.to_string()))?;
        let blob = STANDARD
            .decode(b64)
            .map_err(|_| SecretBoxError::Malformed)?;
        if blob.len() < NONCE_LEN + TAG_LEN {
            return Err(SecretBoxError::Malformed);
        }
        let (nonce, sealed) = blob.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| SecretBoxError::Malformed)?;
        let mut in_out = sealed.to_vec();
        let plain = key
            .key
            .open_in_place(nonce, Aad::from(full_aad(key_id, context)), &mut in_out)
            .map_err(|_| SecretBoxError::Decrypt)?;
        let out = plain.to_vec();
        in_out.fill(0);
        Ok(out)
    }

    /// True when `stored` is under an older key: a re-encryption pass can rewrite it.
    pub fn needs_reseal(&self, stored: &str) -> bool {
        stored
            .split(':')
            .nth(1)
            .is_some_and(|id| id != self.current_key_id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn key_b64(byte: u8) -> String {
        STANDARD.encode([byte; KEY_LEN])
    }

    fn ring(spec: &[(&str, u8)]) -> KeyRing {
        spec.iter()
            .map(|(id, b)| format!("{id}:{}", key_b64(*b)))
            .collect::<Vec<_>>()
            .join(",")
            .parse()
            .unwrap()
    }

    #[test]
    fn round_trip_with_fresh_nonces() {
        let ring = ring(&[("k1", 1)]);
        let ctx = row_context(Uuid::now_v7(), Uuid::now_v7());
        let a = ring.seal(b"whsec secret bytes", &ctx).unwrap();
        let b = ring.seal(b"whsec secret bytes", &ctx).unwrap();
        assert!(a.starts_with("v1:k1:"));
        assert_ne!(a, b, "a random nonce per encryption");
        assert!(!a.contains("whsec"));
        assert_eq!(ring.open(&a, &ctx).unwrap(), b"whsec secret bytes");
        assert_eq!(ring.open(&b, &ctx).unwrap(), b"whsec secret bytes");
    }

    #[test]
    fn rotation_old_decrypts_new_encrypts() {
        let ctx = row_context(Uuid::now_v7(), Uuid::now_v7());
        let old_ring = ring(&[("old", 1)]);
        let stored_old = old_ring.seal(b"s1", &ctx).unwrap();
        let rotated = ring(&[("new", 2), ("old", 1)]);
        assert_eq!(rotated.current_key_id(), "new");
        assert_eq!(rotated.open(&stored_old, &ctx).unwrap(), b"s1");
        assert!(rotated.needs_reseal(&stored_old));
        let stored_new = rotated.seal(b"s2", &ctx).unwrap();
        assert!(stored_new.starts_with("v1:new:"));
        assert!(!rotated.needs_reseal(&stored_new));
        assert_eq!(rotated.open(&stored_new, &ctx).unwrap(), b"s2");
        // Once "old" leaves the ring, its ciphertexts are refused by name.
        let only_new = ring(&[("new", 2)]);
        assert_eq!(
            only_new.open(&stored_old, &ctx),
            Err(SecretBoxError::UnknownKeyId("old".into()))
        );
    }

    #[test]
    fn tampering_and_wrong_rows_are_refused() {
        let ring = ring(&[("a", 1), ("b", 9)]);
        let tenant = Uuid::now_v7();
        let ctx = row_context(tenant, Uuid::now_v7());
        let stored = ring.seal(b"secret", &ctx).unwrap();
        // Another endpoint of the same tenant, or the same endpoint id under another tenant.
        assert_eq!(
            ring.open(&stored, &row_context(tenant, Uuid::now_v7())),
            Err(SecretBoxError::Decrypt)
        );
        // Flip every byte of the blob in turn: nonce, ciphertext and tag are all covered.
        let blob = STANDARD.decode(stored.rsplit(':').next().unwrap()).unwrap();
        for i in 0..blob.len() {
            let mut t = blob.clone();
            t[i] ^= 0x01;
            let forged = format!("v1:a:{}", STANDARD.encode(&t));
            assert_eq!(
                ring.open(&forged, &ctx),
                Err(SecretBoxError::Decrypt),
                "byte {i}"
            );
        }
        // Relabelled to the other ring key: the key id is authenticated too.
        let relabelled = stored.replacen("v1:a:", "v1:b:", 1);
        assert_eq!(ring.open(&relabelled, &ctx), Err(SecretBoxError::Decrypt));
        assert_eq!(
            ring.open(&stored.replacen("v1:a:", "v1:zz:", 1), &ctx),
            Err(SecretBoxError::UnknownKeyId("zz".into()))
        );
        for bad in ["", "v1:a", "v2:a:AAAA", "v1:a:!!!", "v1:a:AAAA"] {
            assert_eq!(
                ring.open(bad, &ctx),
                Err(SecretBoxError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_config_never_echoes_key_material() {
        let secretish = STANDARD.encode([0xAB; 31]);
        let cases = [
            format!("k1{secretish}"),
            format!(":{secretish}"),
            format!("bad id:{secretish}"),
            format!("k1:{secretish}"),
            format!("k1:{}!", key_b64(3)),
            format!("k1:{},k1:{}", key_b64(3), key_b64(4)),
            format!("k1:{},", key_b64(3)),
        ];
        for spec in &cases {
            let err = spec.parse::<KeyRing>().unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains(&secretish), "{shown}");
            assert!(!shown.contains(&key_b64(3)), "{shown}");
        }
        assert_eq!(
            format!("k1:{secretish}").parse::<KeyRing>().unwrap_err(),
            SecretBoxError::BadKey {
                index: 0,
                id: "k1".into()
            }
        );
        assert_eq!(
            format!("k1:{},k1:{}", key_b64(3), key_b64(4))
                .parse::<KeyRing>()
                .unwrap_err(),
            SecretBoxError::DuplicateKeyId("k1".into())
        );
        let ring = ring(&[("k1", 3), ("k2", 4)]);
        let debug = format!("{ring:?}");
        assert!(debug.contains("k1") && debug.contains("k2"));
        assert!(!debug.contains(&key_b64(3)));
    }
}
