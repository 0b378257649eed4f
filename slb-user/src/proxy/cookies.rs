//! Session persistence by cookie. *Insert*: slb sets `SLB_SERVER=<backend token>`. *Rewrite*:
//! the application's own cookie value is prefixed with `<token>.` on the way out and the prefix
//! is stripped on the way in, so the application sees its value unchanged.

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper::header::{self, HeaderValue};
use hyper::HeaderMap;

use crate::config::{CookiePersistence, INSERT_COOKIE};

/// The secret that keys the backend tokens in cookies. An unkeyed hash of the backend's
/// address could be reversed by trying addresses (it took 0.8 s); with the key, a token says
/// nothing about the backend to whoever does not hold the file.
#[derive(Clone)]
pub struct CookieKey(Arc<ring::hmac::Key>);

#[derive(Debug, thiserror::Error)]
pub enum CookieKeyError {
    #[error("cookie_secret_file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cookie_secret_file {path}: {len} bytes, a secret needs at least {MIN_SECRET_BYTES} \
         (delete it to have slb create one)"
    )]
    TooShort { path: PathBuf, len: usize },
}

/// Shortest secret accepted from a file.
const MIN_SECRET_BYTES: usize = 16;

impl CookieKey {
    /// The secret in `path` (its bytes, surrounding whitespace trimmed); a missing file is
    /// created first with 32 random bytes in hex, readable by root only.
    pub fn load_or_create(path: &Path) -> Result<CookieKey, CookieKeyError> {
        let io = |source| CookieKeyError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(key) = CookieKey::load(path)? {
            return Ok(key);
        }
        create_secret(path).map_err(io)?;
        CookieKey::load(path)?.ok_or_else(|| io(std::io::ErrorKind::NotFound.into()))
    }

    /// The secret in `path`, `None` when there is no such file (`slb check-config` reports
    /// that without creating one).
    pub fn load(path: &Path) -> Result<Option<CookieKey>, CookieKeyError> {
        let secret = match std::fs::read(path) {
            Ok(secret) => secret,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CookieKeyError::Io {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let secret = secret.trim_ascii();
        if secret.len() < MIN_SECRET_BYTES {
            return Err(CookieKeyError::TooShort {
                path: path.to_owned(),
                len: secret.len(),
            });
        }
        Ok(Some(CookieKey::from_secret(secret)))
    }

    pub fn from_secret(secret: &[u8]) -> CookieKey {
        CookieKey(Arc::new(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            secret,
        )))
    }

    /// The token naming the backend at `addr` in cookies: the same on every node with the same
    /// secret.
    pub fn token(&self, addr: SocketAddr) -> String {
        let tag = ring::hmac::sign(&self.0, addr.to_string().as_bytes());
        tag.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Writes a new random secret at `path`, unless another slb wrote one first.
fn create_secret(path: &Path) -> std::io::Result<()> {
    use ring::rand::SecureRandom as _;
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut secret = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| std::io::Error::other("no randomness from the system"))?;
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut file) => {
            writeln!(file, "{hex}")?;
            file.sync_all()?;
            tracing::warn!(
                path = %path.display(),
                "created a new cookie secret; copy this file to every slb node that serves the same listeners, or their cookies will not agree"
            );
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// What a request's cookies say about its session.
#[derive(Debug, Default, PartialEq)]
pub struct Session {
    /// The token of the backend the client was sent to before.
    pub token: Option<String>,
    /// Rewrite mode: the application's cookie name and its value without the token.
    application_cookie: Option<(String, String)>,
}

impl Session {
    pub fn read(headers: &HeaderMap, persistence: Option<&CookiePersistence>) -> Session {
        match persistence {
            Some(CookiePersistence::Insert { .. }) => Session {
                token: cookie_values(headers, INSERT_COOKIE)
                    .next()
                    .map(String::from),
                application_cookie: None,
            },
            Some(CookiePersistence::Rewrite { name }) => {
                match cookie_values(headers, name).find_map(|v| v.split_once('.')) {
                    Some((token, original)) => Session {
                        token: Some(token.to_string()),
                        application_cookie: Some((name.clone(), original.to_string())),
                    },
                    None => Session::default(),
                }
            }
            None => Session::default(),
        }
    }

    /// Rewrite mode: gives the application its own cookie value back in the request headers.
    pub fn restore_application_cookie(&self, headers: &mut HeaderMap) {
        let Some((name, original)) = &self.application_cookie else {
            return;
        };
        let cookies: Vec<String> = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .map(|pair| {
                let pair = pair.trim();
                match pair.split_once('=') {
                    Some((k, _)) if k == name => format!("{name}={original}"),
                    _ => pair.to_string(),
                }
            })
            .collect();
        if let Ok(v) = HeaderValue::from_str(&cookies.join("; ")) {
            headers.insert(header::COOKIE, v);
        }
    }
}

/// Names the backend in the response's cookies: insert mode sets slb's cookie unless the client
/// already has it for this backend (`sticky`); rewrite mode prefixes the application's cookie.
pub fn name_backend_in_response(
    headers: &mut HeaderMap,
    persistence: Option<&CookiePersistence>,
    token: &str,
    sticky: bool,
) {
    match persistence {
        Some(CookiePersistence::Insert { timeout }) if !sticky => {
            let cookie = format!(
                "{INSERT_COOKIE}={token}; Max-Age={}; Path=/; HttpOnly",
                timeout.as_secs()
            );
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                headers.append(header::SET_COOKIE, v);
            }
        }
        Some(CookiePersistence::Rewrite { name }) => rewrite_set_cookies(headers, name, token),
        _ => {}
    }
}

/// Values of the request's cookies named `name`.
fn cookie_values<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// Prefixes the application's session cookie with the backend's token, so the next request
/// names its backend.
fn rewrite_set_cookies(headers: &mut HeaderMap, name: &str, token: &str) {
    let values: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .cloned()
        .collect();
    if values.is_empty() {
        return;
    }
    headers.remove(header::SET_COOKIE);
    for v in values {
        let rewritten = v.to_str().ok().and_then(|s| {
            let rest = s.strip_prefix(name)?.strip_prefix('=')?;
            HeaderValue::from_str(&format!("{name}={token}.{rest}")).ok()
        });
        headers.append(header::SET_COOKIE, rewritten.unwrap_or(v));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_missing_secret_is_created_and_the_same_secret_gives_the_same_tokens() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("cookie-secret");
        let addr: SocketAddr = "10.0.1.2:8080".parse().unwrap();
        let first = CookieKey::load_or_create(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64, "32 random bytes in hex: {text:?}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = CookieKey::load_or_create(&path).unwrap();
        assert_eq!(first.token(addr), again.token(addr));
        assert_eq!(first.token(addr).len(), 16);
        assert_ne!(
            first.token(addr),
            first.token("10.0.1.3:8080".parse().unwrap())
        );
        // Another node's own secret names the backend otherwise.
        let other = dir.path().join("other");
        std::fs::write(&other, "another secret of enough bytes\n").unwrap();
        let other = CookieKey::load_or_create(&other).unwrap();
        assert_ne!(first.token(addr), other.token(addr));
    }

    #[test]
    fn a_short_secret_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short");
        std::fs::write(&path, "tiny\n").unwrap();
        let Err(e) = CookieKey::load_or_create(&path) else {
            panic!("a 4-byte secret was accepted");
        };
        let message = e.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("4 bytes"), "{message}");
    }

    fn headers(name: header::HeaderName, values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(name.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn values(h: &HeaderMap, name: header::HeaderName) -> Vec<&str> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn insert_mode_reads_its_cookie_and_sets_it_only_when_the_client_lacks_it() {
        let insert = CookiePersistence::Insert {
            timeout: Duration::from_secs(60),
        };
        let request = headers(header::COOKIE, &["a=1; SLB_SERVER=abc", "b=2"]);
        let session = Session::read(&request, Some(&insert));
        assert_eq!(session.token.as_deref(), Some("abc"));
        let mut response = HeaderMap::new();
        name_backend_in_response(&mut response, Some(&insert), "abc", true);
        assert!(response.is_empty(), "sticky: the client has the cookie");
        name_backend_in_response(&mut response, Some(&insert), "def", false);
        assert_eq!(
            values(&response, header::SET_COOKIE),
            ["SLB_SERVER=def; Max-Age=60; Path=/; HttpOnly"]
        );
    }

    #[test]
    fn rewrite_mode_prefixes_the_application_cookie_out_and_strips_it_in() {
        let rewrite = CookiePersistence::Rewrite {
            name: "JSESSIONID".into(),
        };
        let mut response = headers(
            header::SET_COOKIE,
            &["JSESSIONID=s1; Path=/", "other=x", "JSESSIONIDX=y"],
        );
        name_backend_in_response(&mut response, Some(&rewrite), "tok", true);
        assert_eq!(
            values(&response, header::SET_COOKIE),
            ["JSESSIONID=tok.s1; Path=/", "other=x", "JSESSIONIDX=y"]
        );

        let mut request = headers(header::COOKIE, &["a=1; JSESSIONID=tok.s1.more"]);
        let session = Session::read(&request, Some(&rewrite));
        assert_eq!(session.token.as_deref(), Some("tok"));
        session.restore_application_cookie(&mut request);
        assert_eq!(
            values(&request, header::COOKIE),
            ["a=1; JSESSIONID=s1.more"]
        );

        let unprefixed = headers(header::COOKIE, &["JSESSIONID=plain"]);
        assert_eq!(
            Session::read(&unprefixed, Some(&rewrite)),
            Session::default()
        );
        assert_eq!(Session::read(&request, None), Session::default());
    }
}
