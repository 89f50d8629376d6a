//! Development credentials: an Ed25519 JWT signing key with its JWKS, dev
//! tokens, and the context-signing key. Everything here is generated on the
//! machine that uses it; none of it is ever committed.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use rand::RngCore;

/// The `kid` of dev signing keys.
pub const DEV_KID: &str = "dev-ed25519";
/// Issuer and audience of dev tokens; they match `deploy/gateway.toml`.
pub const DEV_ISSUER: &str = "https://idp.example.com";
pub const DEV_AUDIENCE: &str = "portcullis";

/// A generated Ed25519 key: its PKCS#8 PEM and its public JWKS document.
pub struct DevJwtKey {
    pub private_pem: String,
    pub jwks: serde_json::Value,
}

impl DevJwtKey {
    pub fn generate(kid: &str) -> Result<Self, String> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(|e| e.to_string())?;
        let jwks = serde_json::json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(key.public_key_raw()),
        }]});
        Ok(DevJwtKey {
            private_pem: key.serialize_pem(),
            jwks,
        })
    }
}

/// What a minted dev token says.
pub struct MintRequest<'a> {
    pub tenant: &'a str,
    pub subject: &'a str,
    pub issuer: &'a str,
    pub audience: &'a str,
    pub kid: &'a str,
    pub ttl_seconds: u64,
}

/// Signs a token with an Ed25519 PKCS#8 PEM key.
pub fn mint(private_pem: &[u8], req: &MintRequest<'_>) -> Result<String, String> {
    let key = EncodingKey::from_ed_pem(private_pem).map_err(|e| format!("signing key: {e}"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let claims = serde_json::json!({
        "iss": req.issuer, "aud": req.audience, "sub": req.subject,
        "tenant": req.tenant, "iat": now, "exp": now + req.ttl_seconds,
    });
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(req.kid.to_string());
    encode(&header, &claims, &key).map_err(|e| e.to_string())
}

/// 32 random bytes as hex: the `[context] signing_key_file` format.
pub fn context_key_hex() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    hex::encode(key) + "\n"
}

/// Writes a file readable only by its owner (private keys).
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents)
}

/// The files `certs dev` writes.
pub struct DevFiles {
    pub jwt_key: PathBuf,
    pub jwks: PathBuf,
    pub context_key: PathBuf,
}

/// Generates a JWT key, its JWKS and a context key into `out` (JWKS at `jwks`).
pub fn write_dev_credentials(out: &Path, jwks: &Path) -> Result<DevFiles, String> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let files = DevFiles {
        jwt_key: out.join("dev-jwt.pem"),
        jwks: jwks.to_path_buf(),
        context_key: out.join("context.key"),
    };
    let key = DevJwtKey::generate(DEV_KID)?;
    let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    write_private(&files.jwt_key, key.private_pem.as_bytes()).map_err(|e| io(&files.jwt_key, e))?;
    write_private(&files.context_key, context_key_hex().as_bytes())
        .map_err(|e| io(&files.context_key, e))?;
    if let Some(dir) = jwks.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    let doc = serde_json::to_vec_pretty(&key.jwks).map_err(|e| e.to_string())?;
    std::fs::write(&files.jwks, doc).map_err(|e| io(&files.jwks, e))?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::jwks::KeySet;

    #[test]
    fn minted_tokens_verify_against_the_generated_jwks() {
        let key = DevJwtKey::generate("k1").unwrap();
        let token = mint(
            key.private_pem.as_bytes(),
            &MintRequest {
                tenant: "acme",
                subject: "dev",
                issuer: DEV_ISSUER,
                audience: DEV_AUDIENCE,
                kid: "k1",
                ttl_seconds: 60,
            },
        )
        .unwrap();
        let set = KeySet::from_json(key.jwks.to_string().as_bytes(), &[Algorithm::EdDSA]).unwrap();
        let pinned = set.select(Some("k1"), Algorithm::EdDSA).unwrap();
        let mut v = jsonwebtoken::Validation::new(Algorithm::EdDSA);
        v.set_audience(&[DEV_AUDIENCE]);
        let data = jsonwebtoken::decode::<serde_json::Value>(&token, &pinned.key, &v).unwrap();
        assert_eq!(data.claims["tenant"], "acme");
    }
}
