//! Certificates for HTTPS listeners: PEM files → rustls keys, chosen by SNI.

use std::sync::Arc;

use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::ServerConfig;

use crate::config::{Certificate, LoadedCertificates};

/// Picks a certificate by SNI: exact name first, then the longest matching `*.` wildcard, then
/// the first certificate.
#[derive(Debug)]
pub struct SniResolver {
    entries: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

impl SniResolver {
    pub fn pick(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let name = server_name.map(|n| n.to_ascii_lowercase());
        if let Some(name) = &name {
            let exact = self
                .entries
                .iter()
                .find(|(domains, _)| domains.iter().any(|d| d == name));
            if let Some((_, key)) = exact {
                return Some(key.clone());
            }
            let wildcard = self
                .entries
                .iter()
                .flat_map(|(domains, key)| domains.iter().map(move |d| (d, key)))
                .filter(|(d, _)| {
                    d.strip_prefix("*.")
                        .is_some_and(|suffix| name.ends_with(&format!(".{suffix}")))
                })
                .max_by_key(|(d, _)| d.len());
            if let Some((_, key)) = wildcard {
                return Some(key.clone());
            }
        }
        self.entries.first().map(|(_, key)| key.clone())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

/// A TLS server config for a listener's certificates, with the keys loaded with the config,
/// offering HTTP/2 and HTTP/1.x by ALPN and choosing the cipher suite in the server's order.
pub fn server_config(
    certificates: &[Certificate],
    loaded: &LoadedCertificates,
) -> Result<Arc<ServerConfig>, String> {
    let entries = certificates
        .iter()
        .map(|c| {
            let domains = c.domains.iter().map(|d| d.to_ascii_lowercase()).collect();
            let key = loaded.get(c).ok_or_else(|| {
                format!(
                    "{}: not loaded with the config (a config must come from Config::parse)",
                    c.cert.display()
                )
            })?;
            Ok((domains, key))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { entries }));
    // http/1.0 too: a client that offers only it (`curl --http1.0`) would otherwise be refused
    // with no_application_protocol; its requests are served as HTTP/1.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
    // The provider lists its suites strongest first; a client's order would let it pick a
    // weaker one.
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}
