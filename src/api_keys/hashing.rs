//! argon2id hashing of key secrets, off the async threads and bounded, so a burst of
//! cold verifications can neither stall the runtime nor take every core.
//!
//! Each computation needs `m_cost` KiB of working memory (19 MiB with OWASP parameters).
//! Letting the crate allocate it per call made every blocking thread's malloc arena keep
//! its own copy (hundreds of MiB of RSS under a cold-verification burst), so the buffers are
//! allocated once per permit and reused.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use argon2::{
    Algorithm, Argon2, Block, Params, Version,
    password_hash::{Output, ParamsString, PasswordHash, Salt, SaltString},
};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::Semaphore;

use super::config::Argon2Params;

const SALT_LEN: usize = 16;
const OUTPUT_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("argon2: {0}")]
    Argon2(String),
    #[error("hashing task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl From<argon2::Error> for HashError {
    fn from(e: argon2::Error) -> Self {
        HashError::Argon2(e.to_string())
    }
}

impl From<argon2::password_hash::Error> for HashError {
    fn from(e: argon2::password_hash::Error) -> Self {
        HashError::Argon2(e.to_string())
    }
}

pub struct SecretHasher {
    params: Params,
    permits: Semaphore,
    /// Working memory, one buffer per permit, reused across calls.
    buffers: Arc<Mutex<Vec<Vec<Block>>>>,
    /// argon2id computations started, so tests and operators can see the hot path stay
    /// hash-free (also logged at debug level, one line per computation).
    runs: AtomicU64,
}

impl SecretHasher {
    pub fn new(params: Argon2Params, concurrency: usize) -> Self {
        let params = Params::new(
            params.memory_kib,
            params.iterations,
            params.parallelism,
            Some(OUTPUT_LEN),
        )
        .expect("argon2 parameters are validated with the configuration");
        Self {
            params,
            permits: Semaphore::new(concurrency),
            buffers: Arc::new(Mutex::new(Vec::new())),
            runs: AtomicU64::new(0),
        }
    }

    /// How many argon2id computations (hash or verify) this hasher has started.
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// A PHC string (`$argon2id$v=19$m=…`) of `secret` with a fresh random salt.
    pub async fn hash(&self, secret: &str) -> Result<String, HashError> {
        let params = self.params.clone();
        let secret = secret.to_string();
        self.blocking(move |memory| {
            let mut salt = [0u8; SALT_LEN];
            SystemRandom::new()
                .fill(&mut salt)
                .map_err(|_| HashError::Argon2("OS random source failed".into()))?;
            let mut out = [0u8; OUTPUT_LEN];
            compute(&params, secret.as_bytes(), &salt, &mut out, memory)?;
            let salt = SaltString::encode_b64(&salt)?;
            let phc = PasswordHash {
                algorithm: Algorithm::Argon2id.ident(),
                version: Some(Version::V0x13.into()),
                params: ParamsString::try_from(&params)?,
                salt: Some(Salt::from(&salt)),
                hash: Some(Output::new(&out)?),
            };
            Ok(phc.to_string())
        })
        .await
    }

    /// Whether `secret` matches `phc`. The parameters come from the PHC string, so hashes
    /// made under older settings keep verifying. The comparison is constant-time.
    pub async fn verify(&self, secret: &str, phc: &str) -> Result<bool, HashError> {
        let secret = secret.to_string();
        let phc = phc.to_string();
        self.blocking(move |memory| {
            let parsed = PasswordHash::new(&phc)?;
            if parsed.algorithm != Algorithm::Argon2id.ident() {
                return Err(HashError::Argon2(format!(
                    "unexpected algorithm {}",
                    parsed.algorithm
                )));
            }
            let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
                return Err(HashError::Argon2("PHC string without salt or hash".into()));
            };
            let params = Params::try_from(&parsed)?;
            let mut salt_buf = [0u8; 64];
            let salt = salt.decode_b64(&mut salt_buf)?;
            let mut out = vec![0u8; expected.len()];
            compute(&params, secret.as_bytes(), salt, &mut out, memory)?;
            // `Output`'s equality is constant-time.
            Ok(Output::new(&out)? == expected)
        })
        .await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Vec<Block>) -> Result<T, HashError> + Send + 'static,
    ) -> Result<T, HashError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("the hashing semaphore is never closed");
        let runs = self.runs.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(runs, "argon2id computation");
        let buffers = self.buffers.clone();
        tokio::task::spawn_blocking(move || {
            let mut memory = buffers
                .lock()
                .expect("buffer pool")
                .pop()
                .unwrap_or_default();
            let result = work(&mut memory);
            buffers.lock().expect("buffer pool").push(memory);
            result
        })
        .await?
    }
}

/// argon2id of `secret` into `out`, in `memory` (grown to the parameters' block count).
fn compute(
    params: &Params,
    secret: &[u8],
    salt: &[u8],
    out: &mut [u8],
    memory: &mut Vec<Block>,
) -> Result<(), HashError> {
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password_into_with_memory(secret, salt, out, &mut memory[..blocks])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use argon2::{PasswordHasher, PasswordVerifier};

    use super::*;

    fn hasher() -> SecretHasher {
        SecretHasher::new(
            Argon2Params {
                memory_kib: 1024,
                iterations: 1,
                parallelism: 1,
            },
            2,
        )
    }

    #[tokio::test]
    async fn hash_and_verify() {
        let hasher = hasher();
        let phc = hasher.hash("s3cret").await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"));
        assert!(hasher.verify("s3cret", &phc).await.unwrap());
        assert!(!hasher.verify("s3cres", &phc).await.unwrap());
        assert_ne!(phc, hasher.hash("s3cret").await.unwrap(), "salted");
        assert!(hasher.verify("s3cret", "not a phc string").await.is_err());
        assert_eq!(hasher.runs(), 5, "every hash and verify is counted");
    }

    #[tokio::test]
    async fn interoperates_with_the_reference_api() {
        // Hashes made by the argon2 crate's own API (other parameters too) verify here,
        // and ours verify there.
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let theirs = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(2048, 2, 1, None).unwrap(),
        )
        .hash_password(b"pw", &salt)
        .unwrap()
        .to_string();
        let hasher = hasher();
        assert!(hasher.verify("pw", &theirs).await.unwrap());
        assert!(!hasher.verify("px", &theirs).await.unwrap());
        let ours = hasher.hash("pw").await.unwrap();
        Argon2::default()
            .verify_password(b"pw", &PasswordHash::new(&ours).unwrap())
            .unwrap();
    }
}
