//! Certificates for HTTPS listeners: PEM files → rustls keys, chosen by SNI.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::ServerConfig;

use super::counters::{ProxyCounters, ProxyEvent};
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

/// TLS 1.2 renegotiation attempts the proxy refused since start. rustls refuses each with a
/// warning alert and one WARN log line; clients can repeat that at will, so [`RustlsLogFilter`]
/// counts the lines here instead and [`report_refused_renegotiations`] logs the count.
static RENEGOTIATIONS_REFUSED: AtomicU64 = AtomicU64::new(0);

/// The refused renegotiations since start.
pub fn renegotiations_refused() -> u64 {
    RENEGOTIATIONS_REFUSED.load(Ordering::Relaxed)
}

/// A logging layer that takes rustls's line for each refused renegotiation out of the log and
/// counts it.
pub struct RustlsLogFilter;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RustlsLogFilter {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        if *event.metadata().level() != tracing::Level::WARN {
            return true;
        }
        let mut fields = LogFields::default();
        event.record(&mut fields);
        let from_rustls =
            fields.target.starts_with("rustls") || event.metadata().target().starts_with("rustls");
        if from_rustls && fields.message.contains("NoRenegotiation") {
            RENEGOTIATIONS_REFUSED.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }
}

/// The message and, for lines that came through the `log` crate, the target they were logged
/// with.
#[derive(Default)]
struct LogFields {
    message: String,
    target: String,
}

impl tracing::field::Visit for LogFields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "log.target" {
            self.target = value.to_owned();
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
}

/// Adds the renegotiations refused since the last tick to `counters` and logs them, at most
/// once every `every`.
pub async fn report_refused_renegotiations(
    every: std::time::Duration,
    counters: Arc<ProxyCounters>,
) {
    let mut reported = renegotiations_refused();
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let now = renegotiations_refused();
        if now > reported {
            counters.add(ProxyEvent::RenegotiationRefused, now - reported);
            tracing::warn!(
                refused = now - reported,
                refused_since_start = now,
                "TLS: clients asked to renegotiate; refused (counted, not logged one by one)"
            );
            reported = now;
        }
    }
}
