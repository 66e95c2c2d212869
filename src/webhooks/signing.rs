//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>): endpoint secrets
//! `whsec_<base64>` and the `webhook-signature` header `v1,<base64 HMAC-SHA256>` over
//! `"{webhook-id}.{webhook-timestamp}.{body}"`, one signature per secret valid at send time
//! (both during a rotation grace), space-separated, so any Standard Webhooks library verifies.

use base64::{Engine, engine::general_purpose::STANDARD};
use ring::{hmac, rand::SecureRandom};
use secrecy::{ExposeSecret, SecretSlice};

/// Prefix of every endpoint secret, as the Standard Webhooks libraries expect.
pub const SECRET_PREFIX: &str = "whsec_";
/// Secret key sizes accepted: the spec asks for 24 to 64 bytes.
pub const MIN_SECRET_BYTES: usize = 24;
pub const MAX_SECRET_BYTES: usize = 64;
/// Size of generated secrets (256 bits, the HMAC-SHA256 block-size sweet spot).
pub const GENERATED_SECRET_BYTES: usize = 32;
/// Receivers refuse timestamps further than this from their clock (the spec's default).
pub const DEFAULT_TOLERANCE_SECS: i64 = 5 * 60;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SigningError {
    #[error("a webhook secret must start with `{SECRET_PREFIX}`")]
    MissingPrefix,
    #[error("a webhook secret must be base64 after `{SECRET_PREFIX}`")]
    NotBase64,
    #[error("a webhook secret must hold {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, not {0}")]
    BadLength(usize),
    #[error("no secret to sign with")]
    NoSecrets,
    #[error("the system random generator failed")]
    Random,
    #[error("webhook-timestamp is not a Unix time in seconds")]
    BadTimestamp,
    #[error("webhook-timestamp is outside the tolerance")]
    TimestampOutOfTolerance,
    #[error("no signature matches")]
    NoMatch,
}

/// An endpoint's signing key. Never printed: Debug is redacted, and the `whsec_` form comes
/// only from [`Secret::expose_whsec`], for the one response that shows it to the tenant.
#[derive(Clone)]
pub struct Secret(SecretSlice<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// A fresh secret of [`GENERATED_SECRET_BYTES`] from the system CSPRNG.
    pub fn generate() -> Result<Self, SigningError> {
        let mut key = vec![0u8; GENERATED_SECRET_BYTES];
        ring::rand::SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| SigningError::Random)?;
        Ok(Self(key.into()))
    }

    /// Parses `whsec_<base64>` (padding optional, as the reference libraries accept).
    pub fn parse(whsec: &str) -> Result<Self, SigningError> {
        let b64 = whsec
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SigningError::MissingPrefix)?;
        let key = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        )
        .decode(b64)
        .map_err(|_| SigningError::NotBase64)?;
        Self::from_bytes(key)
    }

    /// Wraps raw key bytes (e.g. decrypted from the database), checking the length.
    pub fn from_bytes(key: Vec<u8>) -> Result<Self, SigningError> {
        if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&key.len()) {
            return Err(SigningError::BadLength(key.len()));
        }
        Ok(Self(key.into()))
    }

    /// The raw key, for encryption at rest.
    pub fn expose_bytes(&self) -> &[u8] {
        self.0.expose_secret()
    }

    /// The `whsec_<base64>` form given to the tenant. Never log it.
    pub fn expose_whsec(&self) -> String {
        format!("{SECRET_PREFIX}{}", STANDARD.encode(self.0.expose_secret()))
    }

    fn hmac_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, self.0.expose_secret())
    }
}

/// The secrets that sign a delivery at `now`: the current one, plus the previous one while
/// its rotation grace lasts (`previous_expires` is a Unix time in seconds).
pub fn secrets_valid_at<'a>(
    current: &'a Secret,
    previous: Option<(&'a Secret, i64)>,
    now: i64,
) -> Vec<&'a Secret> {
    let mut out = vec![current];
    if let Some((prev, expires)) = previous
        && now < expires
    {
        out.push(prev);
    }
    out
}

fn signed_content(msg_id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut content = Vec::with_capacity(msg_id.len() + body.len() + 24);
    content.extend_from_slice(msg_id.as_bytes());
    content.push(b'.');
    content.extend_from_slice(timestamp.to_string().as_bytes());
    content.push(b'.');
    content.extend_from_slice(body);
    content
}

/// The `webhook-signature` header value: `v1,<sig>` per secret, space-separated.
pub fn sign<S: std::borrow::Borrow<Secret>>(
    secrets: &[S],
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<String, SigningError> {
    if secrets.is_empty() {
        return Err(SigningError::NoSecrets);
    }
    let content = signed_content(msg_id, timestamp, body);
    let signatures: Vec<String> = secrets
        .iter()
        .map(|s| {
            let tag = hmac::sign(&s.borrow().hmac_key(), &content);
            format!("v1,{}", STANDARD.encode(tag.as_ref()))
        })
        .collect();
    Ok(signatures.join(" "))
}

/// Checks a delivery the way a receiver does: the timestamp within `tolerance_secs` of
/// `now`, and at least one `v1` signature made by `secret` (constant-time compare). Used by
/// the tests and the load generator's sink.
pub fn verify(
    secret: &Secret,
    msg_id: &str,
    timestamp_header: &str,
    signature_header: &str,
    body: &[u8],
    now: i64,
    tolerance_secs: i64,
) -> Result<(), SigningError> {
    let timestamp: i64 = timestamp_header
        .trim()
        .parse()
        .map_err(|_| SigningError::BadTimestamp)?;
    if (now - timestamp).abs() > tolerance_secs {
        return Err(SigningError::TimestampOutOfTolerance);
    }
    let content = signed_content(msg_id, timestamp, body);
    let key = secret.hmac_key();
    let matched = signature_header
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(|b64| STANDARD.decode(b64).ok())
        .any(|tag| hmac::verify(&key, &content, &tag).is_ok());
    if matched {
        Ok(())
    } else {
        Err(SigningError::NoMatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The test vector published with the Standard Webhooks spec (and used by its
    // reference libraries' tests).
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TS: i64 = 1_614_265_330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signs_the_spec_vector() {
        let secret = Secret::parse(SPEC_SECRET).unwrap();
        assert_eq!(
            sign(&[&secret], SPEC_ID, SPEC_TS, SPEC_BODY).unwrap(),
            SPEC_SIG
        );
        assert_eq!(secret.expose_whsec(), SPEC_SECRET, "round trips");
        verify(
            &secret,
            SPEC_ID,
            "1614265330",
            SPEC_SIG,
            SPEC_BODY,
            SPEC_TS,
            300,
        )
        .unwrap();
    }

    #[test]
    fn verify_refuses_changes() {
        let secret = Secret::parse(SPEC_SECRET).unwrap();
        let v = |id: &str, ts: &str, sig: &str, body: &[u8], now: i64| {
            verify(&secret, id, ts, sig, body, now, DEFAULT_TOLERANCE_SECS)
        };
        assert_eq!(
            v(
                SPEC_ID,
                "1614265330",
                SPEC_SIG,
                br#"{"test": 2432232315}"#,
                SPEC_TS
            ),
            Err(SigningError::NoMatch)
        );
        assert_eq!(
            v("msg_other", "1614265330", SPEC_SIG, SPEC_BODY, SPEC_TS),
            Err(SigningError::NoMatch)
        );
        assert_eq!(
            v(SPEC_ID, "1614265331", SPEC_SIG, SPEC_BODY, SPEC_TS),
            Err(SigningError::NoMatch)
        );
        assert_eq!(
            v(SPEC_ID, "1614265330", SPEC_SIG, SPEC_BODY, SPEC_TS + 301),
            Err(SigningError::TimestampOutOfTolerance)
        );
        assert_eq!(
            v(SPEC_ID, "soon", SPEC_SIG, SPEC_BODY, SPEC_TS),
            Err(SigningError::BadTimestamp)
        );
        // Another version tag with the same bytes is not a v1 signature.
        let v2 = SPEC_SIG.replace("v1,", "v2,");
        assert_eq!(
            v(SPEC_ID, "1614265330", &v2, SPEC_BODY, SPEC_TS),
            Err(SigningError::NoMatch)
        );
        let other = Secret::generate().unwrap();
        assert_eq!(
            verify(
                &other,
                SPEC_ID,
                "1614265330",
                SPEC_SIG,
                SPEC_BODY,
                SPEC_TS,
                300
            ),
            Err(SigningError::NoMatch)
        );
    }

    #[test]
    fn rotation_signs_with_every_valid_secret() {
        let new = Secret::generate().unwrap();
        let old = Secret::parse(SPEC_SECRET).unwrap();
        let during = secrets_valid_at(&new, Some((&old, 1000)), 999);
        assert_eq!(during.len(), 2);
        let header = sign(&during, SPEC_ID, SPEC_TS, SPEC_BODY).unwrap();
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1], SPEC_SIG, "the old secret still signs");
        for s in [&new, &old] {
            verify(s, SPEC_ID, "1614265330", &header, SPEC_BODY, SPEC_TS, 300).unwrap();
        }
        let after = secrets_valid_at(&new, Some((&old, 1000)), 1000);
        assert_eq!(after.len(), 1);
        let header = sign(&after, SPEC_ID, SPEC_TS, SPEC_BODY).unwrap();
        assert_eq!(
            verify(
                &old,
                SPEC_ID,
                "1614265330",
                &header,
                SPEC_BODY,
                SPEC_TS,
                300
            ),
            Err(SigningError::NoMatch)
        );
        assert_eq!(
            sign::<&Secret>(&[], SPEC_ID, SPEC_TS, SPEC_BODY),
            Err(SigningError::NoSecrets)
        );
    }

    #[test]
    fn secrets_are_validated_and_never_printed() {
        let s = Secret::generate().unwrap();
        assert_eq!(s.expose_bytes().len(), GENERATED_SECRET_BYTES);
        let whsec = s.expose_whsec();
        assert!(whsec.starts_with("whsec_"));
        assert_eq!(
            Secret::parse(&whsec).unwrap().expose_bytes(),
            s.expose_bytes()
        );
        assert_ne!(Secret::generate().unwrap().expose_bytes(), s.expose_bytes());
        assert!(!format!("{s:?}").contains(&whsec[6..]));
        // Unpadded base64 is accepted like the reference libraries do.
        let unpadded = format!("whsec_{}", STANDARD.encode([7u8; 25]).trim_end_matches('='));
        assert_eq!(Secret::parse(&unpadded).unwrap().expose_bytes(), [7u8; 25]);
        assert_eq!(
            Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_err(),
            SigningError::MissingPrefix
        );
        assert_eq!(
            Secret::parse("whsec_not base64!").unwrap_err(),
            SigningError::NotBase64
        );
        let short = format!("whsec_{}", STANDARD.encode([1u8; 23]));
        assert_eq!(
            Secret::parse(&short).unwrap_err(),
            SigningError::BadLength(23)
        );
        let long = format!("whsec_{}", STANDARD.encode([1u8; 65]));
        assert_eq!(
            Secret::parse(&long).unwrap_err(),
            SigningError::BadLength(65)
        );
        Secret::from_bytes(vec![0; 64]).unwrap();
    }
}
