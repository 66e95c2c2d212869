//! User JWTs: the algorithms and claims devgate accepts, with keys made for the test by
//! `openssl` (RSA 2048 and Ed25519), and one end-to-end call with an EdDSA token.

use std::{path::Path, process::Command, time::Duration};

use base64::Engine;
use devgate::{auth::config::AuthConfig, auth::jwt::JwtVerifier};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::*;

const SECRET: &str = "jwt-test-secret-jwt-test-secret-0123456789";

/// Key files made by openssl (the same tool an operator would use).
struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("openssl runs");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        for name in ["rsa", "rsa_other"] {
            let private = format!("{name}.pem");
            run(&[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                &private,
            ]);
            run(&[
                "pkey",
                "-in",
                &private,
                "-pubout",
                "-out",
                &format!("{name}.pub"),
            ]);
        }
        run(&["genpkey", "-algorithm", "ed25519", "-out", "ed.pem"]);
        run(&["pkey", "-in", "ed.pem", "-pubout", "-out", "ed.pub"]);
        Keys { dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }
}

fn config(public_key: Option<&Path>, hs256: bool) -> AuthConfig {
    AuthConfig {
        jwt_hs256_secret: hs256.then(|| SECRET.to_string().into()),
        jwt_public_key_path: public_key.map(Path::to_path_buf),
        jwt_issuer: None,
        jwt_audience: None,
        jwt_leeway: Duration::from_secs(30),
        service_callers: Default::default(),
        internal_tls: None,
    }
}

fn verifier(config: &AuthConfig) -> JwtVerifier {
    JwtVerifier::from_config(config).unwrap().unwrap()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn claims(extra: Value) -> Value {
    let mut c = json!({
        "sub": "alice",
        "tenant_id": Uuid::new_v4(),
        "roles": ["admin"],
        "iat": now(),
        "exp": now() + 600,
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn hs256(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[test]
fn unsigned_and_confused_tokens_are_rejected() {
    let keys = Keys::new();
    let rsa_only = verifier(&config(Some(&keys.path("rsa.pub")), false));
    let both = verifier(&config(Some(&keys.path("rsa.pub")), true));
    let c = claims(json!({}));

    // alg: none, with and without a trailing signature.
    let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let body = b64(c.to_string().as_bytes());
    for token in [format!("{header}.{body}."), format!("{header}.{body}")] {
        assert!(rsa_only.verify(&token).is_err(), "alg none accepted");
        assert!(both.verify(&token).is_err(), "alg none accepted");
    }

    // HS256 "signed" with the RSA public key as the HMAC secret (the classic confusion).
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &c,
        &EncodingKey::from_secret(&keys.read("rsa.pub")),
    )
    .unwrap();
    assert!(
        rsa_only.verify(&confused).is_err(),
        "HS256 with RSA pub key"
    );
    assert!(both.verify(&confused).is_err(), "HS256 with RSA pub key");

    // A header naming RS256 over an HMAC signature.
    let mut header = Header::new(Algorithm::HS256);
    let hmac =
        jsonwebtoken::encode(&header, &c, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap();
    header.alg = Algorithm::RS256;
    let relabelled = format!(
        "{}.{}",
        b64(serde_json::to_string(&header).unwrap().as_bytes()),
        hmac.split_once('.').unwrap().1
    );
    assert!(both.verify(&relabelled).is_err(), "relabelled alg");
}

#[test]
fn rs256_and_eddsa_keys_verify_their_own_tokens_only() {
    let keys = Keys::new();
    let rsa = verifier(&config(Some(&keys.path("rsa.pub")), false));
    let ed = verifier(&config(Some(&keys.path("ed.pub")), false));
    let c = claims(json!({}));
    let rs_token = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &c,
        &EncodingKey::from_rsa_pem(&keys.read("rsa.pem")).unwrap(),
    )
    .unwrap();
    let user = rsa.verify(&rs_token).expect("RS256 verifies");
    assert_eq!(user.user_id, "alice");
    assert!(
        ed.verify(&rs_token).is_err(),
        "RS256 token on an Ed25519 key"
    );

    let other = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &c,
        &EncodingKey::from_rsa_pem(&keys.read("rsa_other.pem")).unwrap(),
    )
    .unwrap();
    assert!(rsa.verify(&other).is_err(), "another RSA key's token");

    let ed_token = jsonwebtoken::encode(
        &Header::new(Algorithm::EdDSA),
        &c,
        &EncodingKey::from_ed_pem(&keys.read("ed.pem")).unwrap(),
    )
    .unwrap();
    ed.verify(&ed_token).expect("EdDSA verifies");
    assert!(rsa.verify(&ed_token).is_err(), "EdDSA token on an RSA key");
}

#[test]
fn time_claims_honour_the_configured_leeway() {
    let v = verifier(&config(None, true));
    assert!(
        v.verify(&hs256(&claims(json!({"exp": null})))).is_err(),
        "missing exp"
    );
    assert!(
        v.verify(&hs256(&claims(json!({"sub": null})))).is_err(),
        "missing sub"
    );
    assert!(
        v.verify(&hs256(&claims(json!({"exp": now() - 120}))))
            .is_err()
    );
    v.verify(&hs256(&claims(json!({"exp": now() - 10}))))
        .expect("within 30 s of leeway");
    // nbf: honoured, with the same leeway.
    assert!(
        v.verify(&hs256(&claims(json!({"nbf": now() + 300}))))
            .is_err(),
        "not valid before nbf"
    );
    v.verify(&hs256(&claims(json!({"nbf": now() + 10}))))
        .expect("nbf within leeway");
    v.verify(&hs256(&claims(json!({"nbf": now() - 10}))))
        .expect("nbf passed");

    let mut strict = config(None, true);
    strict.jwt_leeway = Duration::ZERO;
    let strict = verifier(&strict);
    assert!(
        strict
            .verify(&hs256(&claims(json!({"exp": now() - 10}))))
            .is_err()
    );
    assert!(
        strict
            .verify(&hs256(&claims(json!({"nbf": now() + 10}))))
            .is_err()
    );
}

#[test]
fn audience_may_be_a_string_or_an_array() {
    let mut c = config(None, true);
    c.jwt_audience = Some("devgate".into());
    let v = verifier(&c);
    v.verify(&hs256(&claims(json!({"aud": "devgate"}))))
        .expect("aud string");
    v.verify(&hs256(&claims(json!({"aud": ["portal", "devgate"]}))))
        .expect("aud array");
    assert!(v.verify(&hs256(&claims(json!({"aud": "portal"})))).is_err());
    assert!(
        v.verify(&hs256(&claims(json!({"aud": ["portal", "other"]}))))
            .is_err()
    );
    assert!(v.verify(&hs256(&claims(json!({})))).is_err(), "aud missing");
    // Without a configured audience, an array does not break parsing either.
    verifier(&config(None, true))
        .verify(&hs256(&claims(json!({"aud": ["a", "b"]}))))
        .expect("aud ignored");
}

/// A devgate configured with an Ed25519 key serves a user holding an EdDSA token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eddsa_user_token_authenticates_end_to_end() {
    let keys = Keys::new();
    let key_path = keys.path("ed.pub");
    let w = World::with(|s| {
        s.set("DEVGATE_JWT_PUBLIC_KEY_PATH", key_path.to_str().unwrap())
            .set("DEVGATE_JWT_AUDIENCE", "devgate")
    })
    .await;
    let tenant = Uuid::new_v4();
    let sign = |c: &Value| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::EdDSA),
            c,
            &EncodingKey::from_ed_pem(&keys.read("ed.pem")).unwrap(),
        )
        .unwrap()
    };
    let token = sign(&claims(
        json!({"tenant_id": tenant, "aud": ["portal", "devgate"]}),
    ));
    let mut client = w.app.public_client().await;
    client
        .list_api_keys(bearer(Default::default(), &token))
        .await
        .expect("EdDSA user token accepted");
    let early = sign(&claims(
        json!({"tenant_id": tenant, "aud": "devgate", "nbf": now() + 3600}),
    ));
    let status = client
        .list_api_keys(bearer(Default::default(), &early))
        .await
        .unwrap_err();
    assert_refused(&status, tonic::Code::Unauthenticated, "INVALID_CREDENTIALS");
    // The HS256 dev secret is configured too; an HMAC over the Ed25519 public key is not
    // a signature.
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(json!({"tenant_id": tenant, "aud": "devgate"})),
        &EncodingKey::from_secret(&keys.read("ed.pub")),
    )
    .unwrap();
    let status = client
        .list_api_keys(bearer(Default::default(), &confused))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
}
