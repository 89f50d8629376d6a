//! The TLS listener's handshake callbacks: serve the current certificate
//! (so a rotated one takes effect for new connections without a restart)
//! and, once the client's certificate has been verified against
//! `client_ca`, capture the names it carries for the request to map to a
//! tenant.

use std::any::Any;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use pingora::tls::ext;
use pingora::tls::nid::Nid;
use pingora::tls::pkey::{PKey, Private};
use pingora::tls::x509::store::{X509Store, X509StoreBuilder};
use pingora::tls::x509::X509;

/// The certificate chain, key and client CA a listener serves with.
pub struct TlsMaterial {
    chain: Vec<X509>,
    key: PKey<Private>,
    client_ca: Option<X509Store>,
}

impl TlsMaterial {
    /// Loads and checks the files; an error leaves the current material.
    pub fn load(cert: &Path, key_file: &Path, client_ca: Option<&Path>) -> Result<Self, String> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let chain =
            X509::stack_from_pem(&read(cert)?).map_err(|e| format!("{}: {e}", cert.display()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| format!("{}: no certificate", cert.display()))?;
        let key = PKey::private_key_from_pem(&read(key_file)?)
            .map_err(|e| format!("{}: {e}", key_file.display()))?;
        let matches = leaf
            .public_key()
            .map(|public| public.public_eq(&key))
            .unwrap_or(false);
        if !matches {
            return Err(format!(
                "{} is not the key of {}",
                key_file.display(),
                cert.display()
            ));
        }
        let client_ca = match client_ca {
            None => None,
            Some(p) => {
                let mut store = X509StoreBuilder::new().map_err(|e| e.to_string())?;
                for ca in
                    X509::stack_from_pem(&read(p)?).map_err(|e| format!("{}: {e}", p.display()))?
                {
                    store
                        .add_cert(ca)
                        .map_err(|e| format!("{}: {e}", p.display()))?;
                }
                Some(store.build())
            }
        };
        Ok(TlsMaterial {
            chain,
            key,
            client_ca,
        })
    }
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
