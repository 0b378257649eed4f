//! The config file: what the user writes ([`schema`]), its validation ([`validate`]), the
//! listeners with their groups and effective backend ports ([`resolve`]), and the changes the
//! admin API makes to a running config ([`edit`]).

use std::path::Path;

mod certificates;
pub mod edit;
pub mod resolve;
pub mod schema;
mod validate;

pub use certificates::LoadedCertificates;
pub use edit::{BackendEdit, BackendName, EditAction, EditError, EndpointSyntaxError};
pub use resolve::{Endpoint, ResolvedBackend, ResolvedGroup, ResolvedListener};
pub use schema::*;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// A config larger than this is a mistake (a wrong path, a log file), not a config.
const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let read_error = |source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        };
        // Looked at before it is opened: opening a FIFO waits for a writer, forever.
        let metadata = std::fs::metadata(path).map_err(read_error)?;
        if !metadata.is_file() {
            return Err(read_error(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        if metadata.len() > MAX_CONFIG_BYTES {
            return Err(read_error(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} bytes, more than a config's {MAX_CONFIG_BYTES}",
                    metadata.len()
                ),
            )));
        }
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses, validates and loads the certificates; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        config.validate()?;
        config.certificates = LoadedCertificates::load(&config)?;
        Ok(config)
    }
}

#[cfg(test)]
pub(crate) mod tests;
