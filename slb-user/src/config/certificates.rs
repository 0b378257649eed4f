//! Certificates of HTTPS listeners, loaded from their PEM files once, when a config is loaded:
//! a file that is missing or does not match refuses the config, and the proxy serves the keys
//! loaded then. A renewed certificate file is read at the next reload, never behind the
//! operator's back (a health verdict or a backend change does not touch the files).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_rustls::rustls::crypto::ring::sign::any_supported_type;
use tokio_rustls::rustls::sign::CertifiedKey;

use super::{invalid, Certificate, Config, ConfigError};

/// Which files a certificate was loaded from.
type CertificateFiles = (PathBuf, PathBuf);

/// The loaded key of every certificate of a config's HTTPS listeners. Cheap to clone: a config
/// edited at runtime shares the keys of the config it was made from.
#[derive(Clone, Default)]
pub struct LoadedCertificates(Arc<BTreeMap<CertificateFiles, Arc<CertifiedKey>>>);

impl LoadedCertificates {
    /// Loads each certificate of `config`'s listeners once (a pair of files several listeners
    /// share is read once too); the error names the listener's certificate and the file.
    pub(super) fn load(config: &Config) -> Result<LoadedCertificates, ConfigError> {
        let mut loaded = BTreeMap::new();
        for (i, l) in config.listeners.iter().enumerate() {
            for (j, spec) in l.certificates.iter().enumerate() {
                let files = (spec.cert.clone(), spec.key.clone());
                if loaded.contains_key(&files) {
                    continue;
                }
                let key = load_certified_key(spec).map_err(|message| {
                    invalid(
                        format!("listeners[{i}] ({}).certificates[{j}]", l.name),
                        message,
                    )
                })?;
                loaded.insert(files, Arc::new(key));
            }
        }
        Ok(LoadedCertificates(Arc::new(loaded)))
    }

    /// The key loaded for `spec`; `None` for a certificate the config was not loaded with
    /// (a config built in code without [`Config::parse`]).
    pub fn get(&self, spec: &Certificate) -> Option<Arc<CertifiedKey>> {
        self.0.get(&(spec.cert.clone(), spec.key.clone())).cloned()
    }
}

impl fmt::Debug for LoadedCertificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

/// The same files with the same certificate chains (the key was checked to match its chain).
impl PartialEq for LoadedCertificates {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(other.0.iter())
                .all(|((files, key), (other_files, other_key))| {
                    files == other_files && key.cert == other_key.cert
                })
    }
}

/// Loads one certificate chain and its key; the error names the file and what is wrong.
fn load_certified_key(spec: &Certificate) -> Result<CertifiedKey, String> {
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
