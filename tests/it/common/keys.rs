//! Signing material: keys for every accepted algorithm, tokens, forged tokens.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use portcullis::dev::DevJwtKey;
use portcullis::identity::api_key;
use serde_json::{json, Value};

pub const ISSUER: &str = "https://issuer.test";
pub const AUDIENCE: &str = "portcullis-test";

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Signing material for every accepted algorithm, plus the JWKS that
/// publishes the public halves. Only RSA is a fixed (TEST-ONLY) fixture.
#[derive(Clone)]
pub struct Keys {
    pub rsa_private: Vec<u8>,
    pub rsa_public_pem: Vec<u8>,
    pub ec_private: String,
    pub ed_private: String,
    pub hs_secret: Vec<u8>,
    pub jwks: Value,
    pub acme_key: String,
    /// An API key of tenant `omni`, which has every route.
    pub omni_key: String,
    /// An API key of tenant `throttled`: a burst of 2, then 429.
    pub throttled_key: String,
    /// Key objects of tenant `omni2`: `ci-bot` (only m-small), `old`
    /// (expired), `off` (disabled).
    pub ci_key: String,
    /// Tenant `metered` (quota scopes): a listed key, a key object
    /// `capped` with limits and a budget of its own, and `other-bot`.
    pub metered_key: String,
    pub capped_key: String,
    pub other_key: String,
    /// Tenant `budgeted`: 0.06 a day at `[prices]`.
    pub budget_key: String,
    pub expired_key: String,
    pub disabled_key: String,
    pub context_key: Vec<u8>,
}

impl Keys {
    pub fn generate() -> Keys {
        let rsa_jwk: Value =
            serde_json::from_slice(&std::fs::read(fixture("TEST-ONLY-rsa-2048.jwk.json")).unwrap())
                .unwrap();
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = ec.public_key_raw(); // 0x04 || x || y
        let ec_jwk = json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": "ec-1",
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65])});
        let ed = DevJwtKey::generate("ed-1").unwrap();
        let hs_secret: Vec<u8> = (0..32).map(|_| rand::random::<u8>()).collect();
        let hs_jwk = json!({"kty": "oct", "alg": "HS256", "kid": "hs-1",
            "k": URL_SAFE_NO_PAD.encode(&hs_secret)});
        Keys {
            rsa_private: std::fs::read(fixture("TEST-ONLY-rsa-2048.pem")).unwrap(),
            rsa_public_pem: std::fs::read(fixture("TEST-ONLY-rsa-2048.pub.pem")).unwrap(),
            ec_private: ec.serialize_pem(),
            ed_private: ed.private_pem,
            hs_secret,
            jwks: json!({"keys": [rsa_jwk, ec_jwk, ed.jwks["keys"][0].clone(), hs_jwk]}),
            acme_key: api_key::generate(),
            omni_key: api_key::generate(),
            throttled_key: api_key::generate(),
            ci_key: api_key::generate(),
            metered_key: api_key::generate(),
            capped_key: api_key::generate(),
            other_key: api_key::generate(),
            budget_key: api_key::generate(),
            expired_key: api_key::generate(),
            disabled_key: api_key::generate(),
            context_key: (0..32).map(|_| rand::random::<u8>()).collect(),
        }
    }

    /// Standard claims for `tenant`, valid for an hour.
    pub fn claims(&self, tenant: &str) -> Value {
        json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "tenant": tenant,
               "iat": now(), "exp": now() + 3600})
    }

    /// Signs `claims` with the key for `alg`, under header `kid`.
    pub fn sign(&self, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&self.rsa_private).unwrap(),
            Algorithm::ES256 => EncodingKey::from_ec_pem(self.ec_private.as_bytes()).unwrap(),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(self.ed_private.as_bytes()).unwrap(),
            Algorithm::HS256 => EncodingKey::from_secret(&self.hs_secret).unwrap(),
            other => panic!("no test key for {other:?}"),
        };
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        encode(&header, claims, &key).unwrap()
    }

    /// A valid RS256 token for `tenant`.
    pub fn token(&self, tenant: &str) -> String {
        self.sign(Algorithm::RS256, Some("rsa-1"), &self.claims(tenant))
    }
}

/// Builds a JWT from raw header and claims JSON with an HMAC signature
/// over `secret`: the tool of an attacker who controls the header.
pub fn forge_hs256(header: &Value, claims: &Value, secret: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let h = URL_SAFE_NO_PAD.encode(header.to_string());
    let c = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(format!("{h}.{c}").as_bytes());
    format!(
        "{h}.{c}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}
