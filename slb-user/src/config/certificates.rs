//! Certificates of HTTPS listeners, loaded from their PEM files: validation loads each to refuse
//! a config whose files are missing or do not match, and the proxy serves what it loads.

use tokio_rustls::rustls::crypto::ring::sign::any_supported_type;
use tokio_rustls::rustls::sign::CertifiedKey;

use super::Certificate;

/// Loads one certificate chain and its key; the error names the file and what is wrong.
pub fn load_certified_key(spec: &Certificate) -> Result<CertifiedKey, String> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let cert_pem = read(&spec.cert)?;
    let chain: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", spec.cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: contains no PEM certificate",
            spec.cert.display()
        ));
    }
    let key_pem = read(&spec.key)?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| format!("{}: not a PEM key file: {e}", spec.key.display()))?
        .ok_or_else(|| format!("{}: contains no PEM private key", spec.key.display()))?;
    let signing_key = any_supported_type(&key)
        .map_err(|e| format!("{}: unsupported private key: {e}", spec.key.display()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|e| {
        format!(
            "{} and {} do not belong together: {e}",
            spec.cert.display(),
            spec.key.display()
        )
    })?;
    Ok(certified)
}
