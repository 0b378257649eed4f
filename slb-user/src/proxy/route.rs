//! Forwarding rules of an HTTP(S) listener, checked in this order: rules with an exact domain,
//! rules with a wildcard domain (longest suffix first), rules with only a path (longest prefix
//! first); within each kind, a rule with a path wins over one without, longer paths first.
//! Unmatched requests go to the listener's group. Paths are matched in their normal form
//! ([`normalize_path`]), so `/%73tatic` or `/x/../static` meet a `/static` rule.

use crate::config::Rule;

#[derive(Debug, Clone, PartialEq, Eq)]
enum DomainMatch {
    Exact(String),
    /// `*.example.com` stored as `.example.com`: matches any subdomain depth, not the apex.
    Suffix(String),
    Any,
}

#[derive(Debug, Clone)]
struct CompiledRule {
    domain: DomainMatch,
    path: Option<String>,
    target: usize,
}

/// Rules compiled into match order; `target` is an index the caller chose per rule.
#[derive(Debug, Clone, Default)]
pub struct Router {
    rules: Vec<CompiledRule>,
}

impl Router {
    /// `targets[i]` is what rule `i` routes to.
    pub fn new(rules: &[Rule], targets: &[usize]) -> Router {
        let mut compiled: Vec<CompiledRule> = rules
            .iter()
            .zip(targets)
            .map(|(r, &target)| CompiledRule {
                domain: match &r.domain {
                    None => DomainMatch::Any,
                    Some(d) => match d.strip_prefix('*') {
                        Some(suffix) => DomainMatch::Suffix(suffix.to_ascii_lowercase()),
                        None => DomainMatch::Exact(d.to_ascii_lowercase()),
                    },
                },
                path: r.path.clone(),
                target,
            })
            .collect();
        let rank = |r: &CompiledRule| {
            let (kind, domain_len) = match &r.domain {
                DomainMatch::Exact(d) => (0, d.len()),
                DomainMatch::Suffix(s) => (1, s.len()),
                DomainMatch::Any => (2, 0),
            };
            let path_len = r.path.as_ref().map_or(0, |p| p.len());
            (
                kind,
                std::cmp::Reverse(domain_len),
                std::cmp::Reverse(path_len),
            )
        };
        // Stable: rules of equal rank keep their config order.
        compiled.sort_by_key(rank);
        Router { rules: compiled }
    }

    /// The target of the first matching rule. `host` may carry a port; it is ignored. `path`
    /// is matched once normalised.
    pub fn route(&self, host: &str, path: &str) -> Option<usize> {
        let host = host_without_port(host).to_ascii_lowercase();
        let path = normalize_path(path);
        self.rules
            .iter()
            .find(|r| {
                let domain_ok = match &r.domain {
                    DomainMatch::Exact(d) => *d == host,
                    DomainMatch::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
                    DomainMatch::Any => true,
                };
                domain_ok && r.path.as_ref().is_none_or(|p| path.starts_with(p.as_str()))
            })
            .map(|r| r.target)
    }
}

/// The path as the backend will most likely read it, so that spelling it differently cannot
/// skip a rule: percent-encoded unreserved characters decoded (RFC 3986 §6.2.2.2), other
/// percent-encodings upper-cased, `.` and `..` segments removed (§5.2.4).
fn normalize_path(path: &str) -> String {
    if !path.starts_with('/') {
        // Not a path (`*`, or a target refused before routing matters): left as it is.
        return path.to_owned();
    }
    remove_dot_segments(&decode_unreserved(path))
}

fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| path.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(b) if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => out.push(b as char),
            Some(b) => out.push_str(&format!("%{b:02X}")),
            None => {
                // Not an escape: copy the character (paths may hold UTF-8 over HTTP/2).
                let c = path[i..].chars().next().expect("i is on a char boundary");
                out.push(c);
                i += c.len_utf8();
                continue;
            }
        }
        i += 3;
    }
    out
}

/// RFC 3986 §5.2.4 on an absolute path: `/a/./b/../c` becomes `/a/c`; `..` never climbs
/// above the root.
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    for (k, segment) in segments.iter().enumerate() {
        let last = k + 1 == segments.len();
        match *segment {
            "." | ".." => {
                if *segment == ".." {
                    kept.pop();
                }
                // `/a/..` is the directory `/`, not the file `/a`.
                if last {
                    kept.push("");
                }
            }
            other => kept.push(other),
        }
    }
    format!("/{}", kept.join("/"))
}

fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host
            .split(']')
            .next()
            .map_or(host, |h| &host[..h.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(domain: Option<&str>, path: Option<&str>) -> Rule {
        Rule {
            domain: domain.map(String::from),
            path: path.map(String::from),
            group: String::new(),
        }
    }

    #[test]
    fn exact_domain_beats_wildcard_beats_path() {
        let rules = [
            rule(None, Some("/api")),
            rule(Some("*.example.com"), None),
            rule(Some("www.example.com"), None),
            rule(Some("*.shop.example.com"), None),
            rule(Some("www.example.com"), Some("/static")),
        ];
        let router = Router::new(&rules, &[0, 1, 2, 3, 4]);
        assert_eq!(router.route("www.example.com", "/"), Some(2));
        assert_eq!(
            router.route("WWW.Example.com:8080", "/static/a.css"),
            Some(4)
        );
        assert_eq!(
            router.route("img.example.com", "/api/x"),
            Some(1),
            "a domain rule wins over a path rule"
        );
        assert_eq!(
            router.route("a.shop.example.com", "/"),
            Some(3),
            "the longest wildcard wins"
        );
        assert_eq!(
            router.route("example.com", "/"),
            None,
            "a wildcard does not match the apex"
        );
        assert_eq!(router.route("other.org", "/api/v1"), Some(0));
        assert_eq!(router.route("other.org", "/"), None);
    }

    #[test]
    fn paths_match_in_normal_form() {
        let router = Router::new(&[rule(None, Some("/static"))], &[7]);
        for spelling in [
            "/%73tatic/a.css",
            "/%73%74%61%74%69%63",
            "/x/../static/a.css",
            "/./static",
            "/../static",
            "/static/x/..",
        ] {
            assert_eq!(router.route("h", spelling), Some(7), "{spelling}");
        }
        assert_eq!(router.route("h", "/stat%2Fic"), None);
        assert_eq!(router.route("h", "/static/../admin"), None);
    }

    #[test]
    fn normal_form() {
        assert_eq!(normalize_path("/"), "/");
        assert_eq!(normalize_path("/a/./b/../c"), "/a/c");
        assert_eq!(normalize_path("/a/b/.."), "/a/");
        assert_eq!(normalize_path("/a/%2f%7e%41"), "/a/%2F~A");
        assert_eq!(normalize_path("/a%zz/%4"), "/a%zz/%4");
        assert_eq!(normalize_path("/caf\u{e9}"), "/caf\u{e9}");
        assert_eq!(normalize_path("/a//b"), "/a//b");
        assert_eq!(normalize_path("*"), "*");
    }
}
