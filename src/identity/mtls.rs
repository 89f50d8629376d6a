//! Identity from a client certificate: the TLS stack has already verified
//! the chain against `client_ca`; this captures the names the certificate
//! carries once the handshake completes, for the request to map to a tenant.

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use pingora::tls::nid::Nid;

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
}

#[async_trait]
impl TlsAccept for CertCallbacks {
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
