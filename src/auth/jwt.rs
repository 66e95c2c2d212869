//! User JWTs from the platform's auth service: HS256 with a shared secret and/or RS256 or
//! EdDSA with a public key. Claims: `sub` (user id), `tenant_id`, `roles`, `exp` (required),
//! `nbf` (honoured when present), `iss` and `aud` (checked when configured; `aud` may be a
//! string or an array, as RFC 7519 allows). The token's `alg` must be one a configured key is
//! for, and the key decides: `none`, or HS256 signed with the RSA public key, never verify.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::config::AuthConfig;
use super::{AuthError, UserPrincipal};
use crate::identity::TenantId;
use crate::identity::{Scope, Scopes};

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub tenant_id: Uuid,
    #[serde(default)]
    pub roles: Vec<String>,
    pub exp: i64,
    #[serde(default)]
    pub iat: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
}

/// RFC 7519 §4.1.3: one audience as a string, or several as an array.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// Verifies user JWTs with every configured key; the token's `alg` picks the key.
#[derive(Clone)]
pub struct JwtVerifier {
    keys: Vec<(Algorithm, DecodingKey)>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Duration,
}

impl JwtVerifier {
    /// `None` when no JWT key is configured (then only API keys authenticate).
    pub fn from_config(config: &AuthConfig) -> anyhow::Result<Option<Self>> {
        let mut keys = Vec::new();
        if let Some(secret) = &config.jwt_hs256_secret {
            keys.push((
                Algorithm::HS256,
                DecodingKey::from_secret(secret.expose_secret().as_bytes()),
            ));
        }
        if let Some(path) = &config.jwt_public_key_path {
            let pem = std::fs::read(path).map_err(|e| {
                anyhow::anyhow!(
                    "DEVGATE_JWT_PUBLIC_KEY_PATH: cannot read {}: {e}",
                    path.display()
                )
            })?;
            if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
                keys.push((Algorithm::EdDSA, key));
            } else {
                let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                    anyhow::anyhow!("DEVGATE_JWT_PUBLIC_KEY_PATH: {} is neither an Ed25519 nor an RSA public key: {e}", path.display())
                })?;
                keys.push((Algorithm::RS256, key));
            }
        }
        Ok((!keys.is_empty()).then(|| Self {
            keys,
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
            leeway: config.jwt_leeway,
        }))
    }

    pub fn verify(&self, token: &str) -> Result<UserPrincipal, AuthError> {
        let invalid =
            |why: String| AuthError::InvalidCredentials(format!("user token rejected: {why}"));
        let header = jsonwebtoken::decode_header(token).map_err(|e| invalid(e.to_string()))?;
        let (alg, key) = self
            .keys
            .iter()
            .find(|(alg, _)| *alg == header.alg)
            .ok_or_else(|| invalid(format!("algorithm {:?} is not accepted", header.alg)))?;
        let mut validation = Validation::new(*alg);
        // A configured audience or issuer is required, not only checked when present.
        let mut required = vec!["exp", "sub"];
        required.extend(self.audience.as_ref().map(|_| "aud"));
        required.extend(self.issuer.as_ref().map(|_| "iss"));
        validation.set_required_spec_claims(&required);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = self.leeway.as_secs();
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
        }
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(|e| invalid(e.to_string()))?
            .claims;
        if claims.sub.is_empty() || claims.sub.len() > 200 {
            return Err(invalid("sub must be 1 to 200 characters".into()));
        }
        Ok(UserPrincipal {
            tenant_id: TenantId(claims.tenant_id),
            scopes: scopes_for_roles(&claims.roles),
            user_id: claims.sub,
            roles: claims.roles,
        })
    }
}

/// `admin` manages everything in its tenant; other members read.
pub fn scopes_for_roles(roles: &[String]) -> Scopes {
    if roles.iter().any(|r| r == "admin") {
        Scopes::all()
    } else {
        Scope::EVERY.into_iter().filter(|s| s.is_read()).collect()
    }
}

/// Signs an HS256 user token (the `dev-token` command, tests).
pub fn mint_hs256(
    secret: &str,
    tenant: Uuid,
    user: &str,
    roles: &[String],
    ttl: Duration,
) -> anyhow::Result<String> {
    let now = chrono::Utc::now().timestamp();
    let claims = Claims {
        sub: user.to_string(),
        tenant_id: tenant,
        roles: roles.to_vec(),
        iat: now,
        exp: now + i64::try_from(ttl.as_secs())?,
        nbf: None,
        iss: None,
        aud: None,
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "test-secret-test-secret-test-secret-0123";

    fn verifier() -> JwtVerifier {
        let config = AuthConfig {
            jwt_hs256_secret: Some(SECRET.to_string().into()),
            jwt_public_key_path: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway: Duration::from_secs(30),
            service_callers: Default::default(),
            internal_tls: None,
        };
        JwtVerifier::from_config(&config).unwrap().unwrap()
    }

    #[test]
    fn minted_tokens_verify_and_carry_roles() {
        let tenant = Uuid::new_v4();
        let token = mint_hs256(
            SECRET,
            tenant,
            "alice",
            &["admin".into()],
            Duration::from_secs(60),
        )
        .unwrap();
        let user = verifier().verify(&token).unwrap();
        assert_eq!(user.tenant_id, TenantId(tenant));
        assert_eq!(user.user_id, "alice");
        assert!(user.scopes.grants(Scope::ApiKeysWrite));

        let member = mint_hs256(SECRET, tenant, "bob", &[], Duration::from_secs(60)).unwrap();
        let user = verifier().verify(&member).unwrap();
        assert!(user.scopes.grants(Scope::ApiKeysRead));
        assert!(!user.scopes.grants(Scope::ApiKeysWrite));
    }

    #[test]
    fn wrong_secret_and_expired_tokens_fail() {
        let tenant = Uuid::new_v4();
        let forged = mint_hs256(
            "another-secret-another-secret-another-1",
            tenant,
            "eve",
            &[],
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(verifier().verify(&forged).is_err());
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            sub: "a".into(),
            tenant_id: tenant,
            roles: vec![],
            iat: now - 7200,
            exp: now - 3600,
            nbf: None,
            iss: None,
            aud: None,
        };
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(verifier().verify(&expired).is_err());
        assert!(verifier().verify("not.a.jwt").is_err());
    }
}
