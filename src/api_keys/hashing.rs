//! argon2id hashing of key secrets, off the async threads and bounded, so a burst of
//! cold verifications can neither stall the runtime nor take every core.

use std::sync::Arc;

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier, password_hash::SaltString};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::Semaphore;

use crate::config::Argon2Params;

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("argon2: {0}")]
    Argon2(String),
    #[error("hashing task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

pub struct SecretHasher {
    argon2: Argon2<'static>,
    permits: Arc<Semaphore>,
}

impl SecretHasher {
    pub fn new(params: Argon2Params, concurrency: usize) -> Self {
        let params = argon2::Params::new(
            params.memory_kib,
            params.iterations,
            params.parallelism,
            None,
        )
        .expect("argon2 parameters are validated with the configuration");
        Self {
            argon2: Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params),
            permits: Arc::new(Semaphore::new(concurrency)),
        }
    }

    /// A PHC string (`$argon2id$v=19$m=…`) of `secret` with a fresh random salt.
    pub async fn hash(&self, secret: &str) -> Result<String, HashError> {
        let argon2 = self.argon2.clone();
        let secret = secret.to_string();
        self.blocking(move || {
            let mut salt = [0u8; 16];
            SystemRandom::new()
                .fill(&mut salt)
                .map_err(|_| HashError::Argon2("OS random source failed".into()))?;
            let salt =
                SaltString::encode_b64(&salt).map_err(|e| HashError::Argon2(e.to_string()))?;
            argon2
                .hash_password(secret.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| HashError::Argon2(e.to_string()))
        })
        .await
    }

    /// Whether `secret` matches `phc`. The parameters come from the PHC string, so hashes
    /// made under older settings keep verifying.
    pub async fn verify(&self, secret: &str, phc: &str) -> Result<bool, HashError> {
        let argon2 = self.argon2.clone();
        let secret = secret.to_string();
        let phc = phc.to_string();
        self.blocking(move || {
            let parsed = PasswordHash::new(&phc).map_err(|e| HashError::Argon2(e.to_string()))?;
            Ok(argon2.verify_password(secret.as_bytes(), &parsed).is_ok())
        })
        .await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, HashError> + Send + 'static,
    ) -> Result<T, HashError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("the hashing semaphore is never closed");
        tokio::task::spawn_blocking(work).await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hash_and_verify() {
        let hasher = SecretHasher::new(
            Argon2Params {
                memory_kib: 1024,
                iterations: 1,
                parallelism: 1,
            },
            2,
        );
        let phc = hasher.hash("s3cret").await.unwrap();
        assert!(phc.starts_with("$argon2id$"));
        assert!(hasher.verify("s3cret", &phc).await.unwrap());
        assert!(!hasher.verify("s3cres", &phc).await.unwrap());
        assert_ne!(phc, hasher.hash("s3cret").await.unwrap(), "salted");
    }
}
