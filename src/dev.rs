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
    /// The `scope` claim.
    pub scope: &'a str,
}

/// The scope dev tokens carry: what the shipped policy asks of a caller.
pub const DEV_SCOPE: &str = "inference:write";

/// Signs a token with an Ed25519 PKCS#8 PEM key.
pub fn mint(private_pem: &[u8], req: &MintRequest<'_>) -> Result<String, String> {
    let key = EncodingKey::from_ed_pem(private_pem).map_err(|e| format!("signing key: {e}"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let claims = serde_json::json!({
        "iss": req.issuer, "aud": req.audience, "sub": req.subject,
        "tenant": req.tenant, "iat": now, "exp": now + req.ttl_seconds, "scope": req.scope,
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
    /// Every certificate written, with its key beside it (`.key`).
    pub certificates: Vec<PathBuf>,
}

/// A dev certificate to issue from the dev CA.
struct Leaf<'a> {
    name: &'a str,
    common_name: &'a str,
    /// DNS names and IP addresses.
    hosts: Vec<String>,
    uri: Option<&'a str>,
    usage: rcgen::ExtendedKeyUsagePurpose,
}

/// Writes a dev PKI into `out`: a CA with an empty CRL, the gateway's server certificate,
/// the router's, the gateway's client certificate for the router, and one
/// client certificate per `(tenant, identity)`.
fn write_pki(out: &Path, tenants: &[(String, String)]) -> Result<Vec<PathBuf>, String> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
        DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType,
        SerialNumber,
    };
    let err = |e: rcgen::Error| e.to_string();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Portcullis dev CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(err)?;
    // An empty revocation list, so `[server.tls] crl` can be tried at once.
    let now = time::OffsetDateTime::now_utc();
    let crl = CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::days(30),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: Vec::new(),
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&ca)
    .and_then(|crl| crl.pem())
    .map_err(err)?;
    let mut written = Vec::new();
    let mut save = |name: &str, cert: String, key: String| -> Result<(), String> {
        let crt = out.join(format!("{name}.crt"));
        std::fs::write(&crt, cert).map_err(|e| format!("{}: {e}", crt.display()))?;
        let k = out.join(format!("{name}.key"));
        write_private(&k, key.as_bytes()).map_err(|e| format!("{}: {e}", k.display()))?;
        written.push(crt);
        Ok(())
    };
    save("ca", ca.pem(), ca_key_pem)?;

    let local = || vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let mut leaves = vec![
        Leaf {
            name: "gateway",
            common_name: "gateway.internal",
            hosts: [vec!["gateway.internal".to_string()], local()].concat(),
            uri: None,
            usage: ExtendedKeyUsagePurpose::ServerAuth,
        },
        Leaf {
            name: "router",
            common_name: "router.internal",
            hosts: [vec!["router.internal".to_string()], local()].concat(),
            uri: None,
            usage: ExtendedKeyUsagePurpose::ServerAuth,
        },
        Leaf {
            name: "gateway-client",
            common_name: "portcullis-gateway",
            hosts: vec![],
            uri: Some("spiffe://portcullis/gateway"),
            usage: ExtendedKeyUsagePurpose::ClientAuth,
        },
    ];
    let tenant_names: Vec<String> = tenants
        .iter()
        .map(|(id, _)| format!("tenant-{id}"))
        .collect();
    for ((id, identity), name) in tenants.iter().zip(&tenant_names) {
        leaves.push(Leaf {
            name,
            common_name: id,
            hosts: vec![],
            uri: Some(identity),
            usage: ExtendedKeyUsagePurpose::ClientAuth,
        });
    }
    for leaf in leaves {
        let mut params = CertificateParams::new(leaf.hosts).map_err(err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, leaf.common_name);
        if let Some(uri) = leaf.uri {
            let uri = uri.try_into().map_err(|e: rcgen::Error| e.to_string())?;
            params.subject_alt_names.push(SanType::URI(uri));
        }
        params.extended_key_usages = vec![leaf.usage];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.signed_by(&key, &ca).map_err(err)?;
        save(leaf.name, cert.pem(), key.serialize_pem())?;
    }
    let crl_path = out.join("ca.crl");
    std::fs::write(&crl_path, crl).map_err(|e| format!("{}: {e}", crl_path.display()))?;
    written.push(crl_path);
    Ok(written)
}

/// Generates a JWT key, its JWKS, a context key and a dev PKI into `out`
/// (JWKS at `jwks`); `tenants` lists `(id, mTLS identity)` pairs to issue
/// client certificates for.
pub fn write_dev_credentials(
    out: &Path,
    jwks: &Path,
    tenants: &[(String, String)],
) -> Result<DevFiles, String> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let files = DevFiles {
        jwt_key: out.join("dev-jwt.pem"),
        jwks: jwks.to_path_buf(),
        context_key: out.join("context.key"),
        certificates: Vec::new(),
    };
    let mut files = files;
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
    files.certificates = write_pki(out, tenants)?;
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
                scope: DEV_SCOPE,
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
