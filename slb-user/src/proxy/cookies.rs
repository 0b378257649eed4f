//! Session persistence by cookie. *Insert*: slb sets `SLB_SERVER=<backend token>`. *Rewrite*:
//! the application's own cookie value is prefixed with `<token>.` on the way out and the prefix
//! is stripped on the way in, so the application sees its value unchanged.

use hyper::header::{self, HeaderValue};
use hyper::HeaderMap;

use crate::config::{CookiePersistence, INSERT_COOKIE};

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
