//! The token format: `dg_<live|test>_<key id>_<secret><checksum>`.
//!
//! - `dg_` and the environment make leaked tokens easy for secret scanners to match;
//! - the key id (12 base62 characters) is public: safe to show, log and look up by;
//! - the secret is 32 random bytes as 44 base62 characters (two fixed-width 128-bit halves);
//! - the checksum is the CRC-32 of everything before it, as 6 base62 characters, so typos
//!   and truncations are rejected without touching the database.

use ring::rand::{SecureRandom, SystemRandom};

use crate::identity::{Environment, KEY_ID_LEN, KeyId, TokenError, is_base62};

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const SECRET_LEN: usize = 44;
const CHECKSUM_LEN: usize = 6;

/// A token split into its parts (the checksum already verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToken<'a> {
    pub environment: Environment,
    pub key_id: KeyId,
    /// The random part the argon2 hash is of.
    pub secret: &'a str,
}

/// A freshly generated token. Its `Debug` hides the token.
pub struct NewToken {
    pub key_id: KeyId,
    pub token: String,
}

impl NewToken {
    /// The random part, for hashing.
    pub fn secret(&self) -> &str {
        let start = self.token.len() - SECRET_LEN - CHECKSUM_LEN;
        &self.token[start..start + SECRET_LEN]
    }
}

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewToken")
            .field("key_id", &self.key_id)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// A new random key id (about 71 bits).
pub fn new_key_id() -> KeyId {
    KeyId::new_unchecked(random_base62(KEY_ID_LEN))
}

/// A new token for `key_id` with a fresh random secret.
pub fn generate(environment: Environment, key_id: &KeyId) -> NewToken {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the OS random source failed");
    let mut secret = String::with_capacity(SECRET_LEN);
    for half in bytes.chunks_exact(16) {
        let n = u128::from_be_bytes(half.try_into().expect("16 bytes"));
        push_base62_fixed(&mut secret, n, SECRET_LEN / 2);
    }
    let body = format!("dg_{}_{}_{}", environment.as_str(), key_id, secret);
    let token = format!("{body}{}", checksum(&body));
    NewToken {
        key_id: key_id.clone(),
        token,
    }
}

/// Splits and checks a presented token. No I/O: a malformed token costs microseconds.
pub fn parse(token: &str) -> Result<ParsedToken<'_>, TokenError> {
    let rest = token.strip_prefix("dg_").ok_or(TokenError::Prefix)?;
    let (environment, rest) = if let Some(rest) = rest.strip_prefix("live_") {
        (Environment::Live, rest)
    } else if let Some(rest) = rest.strip_prefix("test_") {
        (Environment::Test, rest)
    } else {
        return Err(TokenError::Prefix);
    };
    let (key_id, tail) = rest.split_once('_').ok_or(TokenError::Shape)?;
    if key_id.len() != KEY_ID_LEN
        || tail.len() != SECRET_LEN + CHECKSUM_LEN
        || !is_base62(key_id)
        || !is_base62(tail)
    {
        return Err(TokenError::Shape);
    }
    let (secret, sum) = tail.split_at(SECRET_LEN);
    let body = &token[..token.len() - CHECKSUM_LEN];
    if checksum(body) != sum {
        return Err(TokenError::Checksum);
    }
    Ok(ParsedToken {
        environment,
        key_id: KeyId::new_unchecked(key_id.to_string()),
        secret,
    })
}

fn checksum(body: &str) -> String {
    let mut out = String::with_capacity(CHECKSUM_LEN);
    push_base62_fixed(
        &mut out,
        u128::from(crc32fast::hash(body.as_bytes())),
        CHECKSUM_LEN,
    );
    out
}

/// Appends `n` in base62, most significant digit first, left-padded with '0' to `width`.
fn push_base62_fixed(out: &mut String, mut n: u128, width: usize) {
    let mut digits = vec![b'0'; width];
    for d in digits.iter_mut().rev() {
        *d = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    debug_assert_eq!(n, 0, "value does not fit in {width} base62 digits");
    out.push_str(std::str::from_utf8(&digits).expect("ASCII"));
}

/// `len` uniformly random base62 characters (rejection sampling, no modulo bias).
fn random_base62(len: usize) -> String {
    let rng = SystemRandom::new();
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 32];
    while out.len() < len {
        rng.fill(&mut buf).expect("the OS random source failed");
        for b in buf {
            if b < 248 && out.len() < len {
                out.push(ALPHABET[(b % 62) as usize] as char);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_back() {
        for env in [Environment::Live, Environment::Test] {
            let id = new_key_id();
            let t = generate(env, &id);
            assert_eq!(t.token.len(), 3 + 5 + 12 + 1 + 44 + 6);
            assert!(t.token.starts_with(&format!("dg_{}_{}_", env.as_str(), id)));
            let parsed = parse(&t.token).unwrap();
            assert_eq!(parsed.environment, env);
            assert_eq!(parsed.key_id, id);
            assert_eq!(parsed.secret, t.secret());
            assert!(
                !format!("{t:?}").contains(t.secret()),
                "Debug hides the token"
            );
        }
    }

    #[test]
    fn tokens_are_unique() {
        let id = new_key_id();
        let a = generate(Environment::Live, &id);
        let b = generate(Environment::Live, &id);
        assert_ne!(a.token, b.token);
        assert_ne!(new_key_id(), new_key_id());
    }

    #[test]
    fn typos_fail_the_checksum() {
        let t = generate(Environment::Live, &new_key_id()).token;
        // Change one character of the secret.
        let mut chars: Vec<char> = t.chars().collect();
        let i = 30;
        chars[i] = if chars[i] == 'a' { 'b' } else { 'a' };
        let typo: String = chars.into_iter().collect();
        assert_eq!(parse(&typo), Err(TokenError::Checksum));
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        let t = generate(Environment::Test, &new_key_id()).token;
        assert_eq!(parse(""), Err(TokenError::Prefix));
        assert_eq!(parse("sk_live_abc"), Err(TokenError::Prefix));
        assert_eq!(
            parse(&t.replacen("dg_test_", "dg_prod_", 1)),
            Err(TokenError::Prefix)
        );
        assert_eq!(parse(&t[..t.len() - 1]), Err(TokenError::Shape));
        assert_eq!(parse(&format!("{t}x")), Err(TokenError::Shape));
        assert_eq!(parse(&t.replacen('_', "-", 3)), Err(TokenError::Prefix));
        let mut bad = t.clone();
        bad.replace_range(20..21, "!");
        assert!(parse(&bad).is_err());
        // Switching the environment changes the checksummed body.
        assert_eq!(
            parse(&t.replacen("dg_test_", "dg_live_", 1)),
            Err(TokenError::Checksum)
        );
    }

    #[test]
    fn fixed_width_base62() {
        let mut s = String::new();
        push_base62_fixed(&mut s, 0, 6);
        assert_eq!(s, "000000");
        s.clear();
        push_base62_fixed(&mut s, u128::from(u32::MAX), 6);
        assert_eq!(s.len(), 6);
        s.clear();
        push_base62_fixed(&mut s, u128::MAX, 22);
        assert_eq!(s.len(), 22);
    }
}
