//! The TLS listener's handshake callbacks: serve the current certificate
//! (so a rotated one takes effect for new connections without a restart)
//! and, once the client's certificate has been verified against
//! `client_ca`, capture the names it carries for the request to map to a
//! tenant.

use std::any::Any;
use std::net::SocketAddr;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use pingora::tls::error::ErrorStack;
use pingora::tls::ext;
use pingora::tls::nid::Nid;
use pingora::tls::pkey::{PKey, Private};
use pingora::tls::ssl::SslFiletype;
use pingora::tls::x509::store::{X509Lookup, X509Store, X509StoreBuilder};
use pingora::tls::x509::verify::X509VerifyFlags;

use crate::connection::proxy_header::ProxyProtocol;
use pingora::tls::x509::{X509Crl, X509PurposeId, X509};

/// Whether TLS listeners ask for, or demand, a client certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientCertMode {
    #[default]
    None,
    Optional,
    Required,
}

#[derive(Debug, Clone)]
pub struct TlsListenerConfig {
    pub listen: Vec<SocketAddr>,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    /// When set, every client certificate is checked against these CRLs;
    /// one without a current CRL from its issuer is refused.
    pub crl: Option<PathBuf>,
    pub client_cert: ClientCertMode,
    pub proxy_protocol: ProxyProtocol,
    /// From accept to the end of the handshake.
    pub handshake_timeout: Duration,
}

/// The certificate chain, key and client CA a listener serves with.
pub struct TlsMaterial {
    chain: Vec<X509>,
    key: PKey<Private>,
    client_ca: Option<X509Store>,
}

impl TlsMaterial {
    /// Loads and checks the listener's files; an error leaves the current
    /// material in force.
    pub fn load(tls: &TlsListenerConfig) -> Result<Self, String> {
        let chain = X509::stack_from_pem(&read(&tls.cert)?)
            .map_err(|e| format!("{}: {e}", tls.cert.display()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| format!("{}: no certificate", tls.cert.display()))?;
        let key = PKey::private_key_from_pem(&read(&tls.key)?)
            .map_err(|e| format!("{}: {e}", tls.key.display()))?;
        let matches = leaf
            .public_key()
            .map(|public| public.public_eq(&key))
            .unwrap_or(false);
        if !matches {
            return Err(format!(
                "{} is not the key of {}",
                tls.key.display(),
                tls.cert.display()
            ));
        }
        let client_ca = match &tls.client_ca {
            None => None,
            Some(ca) => Some(client_verify_store(ca, tls.crl.as_deref())?),
        };
        Ok(TlsMaterial {
            chain,
            key,
            client_ca,
        })
    }
}

/// Prefixes an OpenSSL error with the file it came from.
fn err(p: &Path) -> impl Fn(ErrorStack) -> String + '_ {
    move |e| format!("{}: {e}", p.display())
}

fn read(p: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// The store client certificates are verified against: the client CA,
/// the clientAuth purpose (a serverAuth-only certificate is refused), and,
/// with a CRL file, revocation of the leaf. With CRL checking on, OpenSSL
/// refuses a certificate whose issuer has no current CRL in the file: an
/// expired CRL fails closed.
pub fn client_verify_store(ca: &Path, crl: Option<&Path>) -> Result<X509Store, String> {
    let mut store = X509StoreBuilder::new().map_err(|e| e.to_string())?;
    let cas = X509::stack_from_pem(&read(ca)?).map_err(err(ca))?;
    if cas.is_empty() {
        return Err(format!("{}: no certificate", ca.display()));
    }
    for cert in cas {
        store.add_cert(cert).map_err(err(ca))?;
    }
    store
        .set_purpose(X509PurposeId::SSL_CLIENT)
        .map_err(err(ca))?;
    if let Some(crl) = crl {
        // Parse first: a file without a CRL is a configuration error, not
        // an empty revocation list.
        X509Crl::from_pem(&read(crl)?).map_err(err(crl))?;
        store
            .add_lookup(X509Lookup::file())
            .map_err(err(crl))?
            .load_crl_file(crl, SslFiletype::PEM)
            .map_err(err(crl))?;
        store
            .set_flags(X509VerifyFlags::CRL_CHECK)
            .map_err(err(crl))?;
    }
    Ok(store.build())
}

/// The names in a verified client certificate, most specific first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertIdentity {
    /// SAN URIs (such as `spiffe://tenants/acme`), then SAN DNS names, then
    /// the subject CN.
    pub names: Vec<String>,
    /// Whether the listener requires a certificate (`client_cert = "required"`).
    pub required: bool,
}

/// Pingora handshake callbacks for one TLS listener.
pub struct CertCallbacks {
    pub required: bool,
    /// Swapped by the reloader when the files change.
    pub material: Arc<ArcSwap<TlsMaterial>>,
}

#[async_trait]
impl TlsAccept for CertCallbacks {
    async fn certificate_callback(&self, ssl: &mut TlsRef) {
        let m = self.material.load();
        let Some((leaf, rest)) = m.chain.split_first() else {
            return;
        };
        // A failure leaves the listener's configured certificate in place.
        let _ = ext::ssl_use_certificate(ssl, leaf);
        for c in rest {
            let _ = ext::ssl_add_chain_cert(ssl, c);
        }
        let _ = ext::ssl_use_private_key(ssl, &m.key);
        if let Some(store) = &m.client_ca {
            let _ = ext::ssl_set_verify_cert_store(ssl, store);
        }
    }

    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        let cert = tls.peer_certificate()?;
        let mut uris = Vec::new();
        let mut dns = Vec::new();
        for san in cert.subject_alt_names().into_iter().flatten() {
            if let Some(u) = san.uri() {
                uris.push(u.to_string());
            } else if let Some(d) = san.dnsname() {
                dns.push(d.to_string());
            }
        }
        let cn = cert
            .subject_name()
            .entries_by_nid(Nid::COMMONNAME)
            .next()
            .map(|e| String::from_utf8_lossy(e.data().as_slice()).into_owned());
        let names = uris.into_iter().chain(dns).chain(cn).collect();
        Some(Arc::new(CertIdentity {
            names,
            required: self.required,
        }))
    }
}
