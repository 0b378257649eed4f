//! Health checks: one tokio task per checked backend probes it every interval and feeds a
//! small state machine; only changes of state reach the daemon, as [`HealthEvent`]s.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::SystemTime;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::applied::{BackendKey, HealthStatus};
use crate::config::{CheckKind, HealthCheck, InitialHealth};

/// Consecutive results → verdict. A backend starts from the daemon's verdict (healthy at start
/// unless its group says otherwise, unhealthy when added to a running daemon);
/// `unhealthy_threshold` failures in a row make it unhealthy and `healthy_threshold` successes
/// in a row bring it back. Until its first verdict it is not `confirmed`: the first
/// `healthy_threshold` successes or `unhealthy_threshold` failures confirm where it started
/// (reported like a change), so that what waits for real verdicts (the announcements) need not
/// wait for a change that never comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthMachine {
    pub healthy: bool,
    pub confirmed: bool,
    successes: u32,
    failures: u32,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

impl HealthMachine {
    pub fn new(healthy_threshold: u32, unhealthy_threshold: u32) -> HealthMachine {
        HealthMachine {
            healthy: true,
            confirmed: false,
            successes: 0,
            failures: 0,
            healthy_threshold,
            unhealthy_threshold,
        }
    }

    /// Records one probe result; returns the verdict when it changed or was first confirmed.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if (!self.healthy || !self.confirmed) && self.successes >= self.healthy_threshold {
                self.healthy = true;
                self.confirmed = true;
                return Some(true);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if (self.healthy || !self.confirmed) && self.failures >= self.unhealthy_threshold {
                self.healthy = false;
                self.confirmed = true;
                return Some(false);
            }
        }
        None
    }
}

/// What a probe found, in words for logs and `slb status`.
pub type ProbeResult = Result<String, String>;

pub async fn probe(check: &HealthCheck, target: SocketAddr) -> ProbeResult {
    match tokio::time::timeout(check.timeout, probe_inner(check, target)).await {
        Ok(result) => result,
        Err(_) => match check.kind {
            // Silence for the whole timeout: no ICMP port-unreachable came back.
            CheckKind::Udp if check.expect.is_none() => {
                Ok("no reply and no ICMP error within the timeout".into())
            }
            _ => Err(format!(
                "no answer within {}",
                humantime::format_duration(check.timeout)
            )),
        },
    }
}

async fn probe_inner(check: &HealthCheck, target: SocketAddr) -> ProbeResult {
    match check.kind {
        CheckKind::Tcp => {
            TcpStream::connect(target)
                .await
                .map_err(|e| format!("tcp connect: {e}"))?;
            Ok("tcp connect succeeded".into())
        }
        CheckKind::Http => probe_http(check, target).await,
        CheckKind::Udp => probe_udp(check, target).await,
    }
}

async fn probe_http(check: &HealthCheck, target: SocketAddr) -> ProbeResult {
    let mut stream = TcpStream::connect(target)
        .await
        .map_err(|e| format!("http connect: {e}"))?;
    let host = check.host.clone().unwrap_or_else(|| host_header(target));
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: slb-health-check\r\nConnection: close\r\n\r\n",
        check.path()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("http write: {e}"))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("http read: {e}"))?;
        if n == 0 {
            return Err("http: connection closed before a complete status line and headers".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let code = response.code.unwrap_or(0);
                return if check.accepts_status(code) {
                    Ok(format!("http {code}"))
                } else {
                    Err(format!("http status {code} is not expected"))
                };
            }
            Ok(httparse::Status::Partial) if buf.len() < 16 * 1024 => continue,
            Ok(httparse::Status::Partial) => {
                return Err("http: response headers larger than 16 KiB".into())
            }
            Err(e) => return Err(format!("http: malformed response: {e}")),
        }
    }
}

/// The Host header that names `target` itself, as a client that was given its address would
/// send it: an IPv6 address in brackets (RFC 3986's IP-literal, else its colons would read as a
/// port), and the port unless it is HTTP's own.
fn host_header(target: SocketAddr) -> String {
    match (target.ip(), target.port()) {
        (std::net::IpAddr::V4(v4), 80) => v4.to_string(),
        (std::net::IpAddr::V6(v6), 80) => format!("[{v6}]"),
        _ => target.to_string(),
    }
}

async fn probe_udp(check: &HealthCheck, target: SocketAddr) -> ProbeResult {
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("literal");
    let socket = UdpSocket::bind(bind)
        .await
        .map_err(|e| format!("udp bind: {e}"))?;
    // Connected, so an ICMP port-unreachable surfaces as ECONNREFUSED on recv.
    socket
        .connect(target)
        .await
        .map_err(|e| format!("udp connect: {e}"))?;
    socket
        .send(check.payload().as_bytes())
        .await
        .map_err(|e| format!("udp send: {e}"))?;
    let mut buf = [0u8; 2048];
    match socket.recv(&mut buf).await {
        Ok(n) => match &check.expect {
            Some(expect) if !String::from_utf8_lossy(&buf[..n]).contains(expect.as_str()) => {
                Err(format!("udp reply does not contain {expect:?}"))
            }
            _ => Ok("udp reply".into()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err("udp: ICMP port unreachable".into())
        }
        Err(e) => Err(format!("udp recv: {e}")),
    }
}

/// A verdict change, sent to the daemon.
#[derive(Debug, Clone)]
pub struct HealthEvent {
    pub key: BackendKey,
    pub healthy: bool,
    pub reason: String,
    pub at: SystemTime,
}

pub fn unix_ns(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// One checked backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckTarget {
    pub key: BackendKey,
    pub address: SocketAddr,
    pub check: HealthCheck,
    /// Its health before its first checks answer, at the daemon's start (its group's).
    pub initial_health: InitialHealth,
}

/// The running checker tasks. Re-targeting keeps the tasks whose target did not change, so a
/// reload does not reset their state (no flapping).
pub struct HealthMonitor {
    tasks: BTreeMap<BackendKey, (CheckTarget, JoinHandle<()>)>,
    events: mpsc::Sender<HealthEvent>,
}

impl HealthMonitor {
    pub fn new(events: mpsc::Sender<HealthEvent>) -> HealthMonitor {
        HealthMonitor {
            tasks: BTreeMap::new(),
            events,
        }
    }

    /// Makes the running checks exactly `targets`; returns the keys whose checks were stopped.
    /// A new check starts from the verdict in `known` (e.g. carried over a restart), else healthy.
    pub fn set_targets(
        &mut self,
        targets: Vec<CheckTarget>,
        known: &BTreeMap<BackendKey, HealthStatus>,
    ) -> Vec<BackendKey> {
        let wanted: BTreeMap<BackendKey, CheckTarget> =
            targets.into_iter().map(|t| (t.key.clone(), t)).collect();
        let mut stopped = Vec::new();
        self.tasks.retain(|key, (target, handle)| {
            if wanted.get(key) == Some(target) {
                true
            } else {
                handle.abort();
                stopped.push(key.clone());
                false
            }
        });
        for (key, target) in wanted {
            if !self.tasks.contains_key(&key) {
                let known = known.get(&key);
                let healthy = known.is_none_or(|h| h.healthy);
                let confirmed = known.is_some_and(|h| h.confirmed);
                let handle = tokio::spawn(run_checks(
                    target.clone(),
                    healthy,
                    confirmed,
                    self.events.clone(),
                ));
                self.tasks.insert(key, (target, handle));
            }
        }
        stopped
    }
}

impl Drop for HealthMonitor {
    fn drop(&mut self) {
        for (_, handle) in self.tasks.values() {
            handle.abort();
        }
    }
}

async fn run_checks(
    target: CheckTarget,
    healthy: bool,
    confirmed: bool,
    events: mpsc::Sender<HealthEvent>,
) {
    let check = &target.check;
    let mut machine = HealthMachine::new(check.healthy_threshold, check.unhealthy_threshold);
    machine.healthy = healthy;
    machine.confirmed = confirmed;
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = probe(check, target.address).await;
        let ok = result.is_ok();
        if let Some(healthy) = machine.record(ok) {
            let reason = match result {
                Ok(r) => format!("{r} ({} in a row)", check.healthy_threshold),
                Err(r) => format!("{r} ({} in a row)", check.unhealthy_threshold),
            };
            let event = HealthEvent {
                key: target.key.clone(),
                healthy,
                reason,
                at: SystemTime::now(),
            };
            if events.send(event).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_needs_consecutive_results_to_change() {
        let mut m = HealthMachine::new(2, 3);
        assert!(m.healthy);
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(true), None, "a success resets the failure count");
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(false), Some(false));
        assert_eq!(m.record(false), None, "only changes are reported");
        assert_eq!(m.record(true), None);
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(true), None);
        assert_eq!(m.record(true), Some(true));
        assert!(m.healthy);
    }

    #[test]
    fn the_first_successes_confirm_a_backend_that_started_healthy() {
        let mut m = HealthMachine::new(2, 3);
        assert!(m.healthy && !m.confirmed);
        assert_eq!(m.record(true), None);
        assert_eq!(m.record(true), Some(true), "confirmed healthy");
        assert!(m.confirmed);
        assert_eq!(m.record(true), None, "confirmed once");
        let mut m = HealthMachine::new(2, 3);
        for _ in 0..2 {
            assert_eq!(m.record(false), None);
        }
        assert_eq!(m.record(false), Some(false));
        assert!(m.confirmed);
        // Added to a running daemon: starts unhealthy, unconfirmed; its failures confirm that.
        let mut m = HealthMachine::new(2, 3);
        m.healthy = false;
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(false), Some(false), "confirmed unhealthy");
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(true), None);
        assert_eq!(m.record(true), Some(true));
    }

    fn check(kind: CheckKind) -> HealthCheck {
        use std::time::Duration;
        HealthCheck {
            kind,
            port: None,
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(200),
            healthy_threshold: 1,
            unhealthy_threshold: 1,
            path: None,
            host: None,
            expected_codes: None,
            payload: None,
            expect: None,
        }
    }

    #[tokio::test]
    async fn tcp_probe_sees_a_listener_and_a_closed_port() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(probe(&check(CheckKind::Tcp), addr).await.is_ok());
        drop(listener);
        let err = probe(&check(CheckKind::Tcp), addr).await.unwrap_err();
        assert!(err.contains("refused"), "{err}");
    }

    #[tokio::test]
    async fn http_probe_checks_the_status_class() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable", "204 No Content"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                assert!(String::from_utf8_lossy(&buf[..n])
                    .starts_with("GET /health HTTP/1.1\r\nHost: app.example\r\n"));
                s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
            }
        });
        let mut c = check(CheckKind::Http);
        c.path = Some("/health".into());
        c.host = Some("app.example".into());
        assert_eq!(probe(&c, addr).await, Ok("http 200".into()));
        assert!(probe(&c, addr).await.unwrap_err().contains("503"));
        c.expected_codes = Some(vec!["3xx".into()]);
        assert!(probe(&c, addr).await.unwrap_err().contains("204"));
        server.await.unwrap();
    }

    #[test]
    fn the_default_host_header_brackets_ipv6_and_names_a_port_other_than_80() {
        let host = |text: &str| host_header(text.parse().unwrap());
        assert_eq!(host("10.0.1.2:80"), "10.0.1.2");
        assert_eq!(host("10.0.1.2:8080"), "10.0.1.2:8080");
        assert_eq!(host("[2001:db8::1]:80"), "[2001:db8::1]");
        assert_eq!(host("[2001:db8::1]:8080"), "[2001:db8::1]:8080");
    }

    #[tokio::test]
    async fn tcp_probe_sees_an_ipv6_listener_and_a_closed_port() {
        let listener = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(probe(&check(CheckKind::Tcp), addr).await.is_ok());
        drop(listener);
        let err = probe(&check(CheckKind::Tcp), addr).await.unwrap_err();
        assert!(err.contains("refused"), "{err}");
    }

    #[tokio::test]
    async fn http_probe_of_an_ipv6_backend_names_it_in_brackets() {
        let listener = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        assert_eq!(
            probe(&check(CheckKind::Http), addr).await,
            Ok("http 200".into())
        );
        let request = server.await.unwrap();
        assert!(
            request.starts_with(&format!(
                "GET / HTTP/1.1\r\nHost: [::1]:{}\r\n",
                addr.port()
            )),
            "{request}"
        );
    }

    #[tokio::test]
    async fn udp_probe_reads_ipv6_replies_and_port_unreachable() {
        let server = UdpSocket::bind("[::1]:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                let (n, peer) = server.recv_from(&mut buf).await.unwrap();
                let reply = format!("pong {}", String::from_utf8_lossy(&buf[..n]));
                server.send_to(reply.as_bytes(), peer).await.unwrap();
            }
        });
        let mut c = check(CheckKind::Udp);
        c.expect = Some("pong".into());
        assert_eq!(probe(&c, addr).await, Ok("udp reply".into()));

        let closed = {
            let s = std::net::UdpSocket::bind("[::1]:0").unwrap();
            s.local_addr().unwrap()
        };
        let err = probe(&check(CheckKind::Udp), closed).await.unwrap_err();
        assert!(err.contains("port unreachable"), "{err}");
    }

    #[tokio::test]
    async fn udp_probe_reads_replies_and_port_unreachable() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                let (n, peer) = server.recv_from(&mut buf).await.unwrap();
                let reply = format!("pong {}", String::from_utf8_lossy(&buf[..n]));
                server.send_to(reply.as_bytes(), peer).await.unwrap();
            }
        });
        let mut c = check(CheckKind::Udp);
        c.expect = Some("pong".into());
        assert_eq!(probe(&c, addr).await, Ok("udp reply".into()));
        c.expect = Some("other".into());
        assert!(probe(&c, addr).await.is_err());

        let closed = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        let c = check(CheckKind::Udp);
        let err = probe(&c, closed).await.unwrap_err();
        assert!(err.contains("port unreachable"), "{err}");
    }
}
