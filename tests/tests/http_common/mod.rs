//! Shared setup of the HTTP/HTTPS listener tests (`http_*.rs`): a topology with
//! `slb-http-backend` servers and an `slb` with L7 listeners, reqwest clients that run in the
//! client namespace, and test certificates.

#![allow(dead_code)] // each test file uses a different part

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use slb_tests::config::Certificate;
use slb_tests::http::{add_local_vip, tcp_connect_in, vip_http, Echo, HttpBackends, NetnsRuntime};
use slb_tests::slb::{slb_binary, unique_instance};
use slb_tests::{SlbConfig, SlbDaemon, Topology, BACKEND_PORT};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

pub const BACKEND: &str = env!("CARGO_BIN_EXE_slb-http-backend");

/// A running L7 setup. Fields drop in declaration order: the daemon stops first, then the
/// backends, then the namespaces go.
pub struct L7Setup {
    pub daemon: SlbDaemon,
    pub backends: HttpBackends,
    pub client: NetnsRuntime,
    pub topo: Topology,
    pub config: SlbConfig,
    /// Access log, certificates and other files of the test.
    pub dir: tempfile::TempDir,
}

impl L7Setup {
    /// Creates a topology with `backends` backends (each running `slb-http-backend` as
    /// `b<i>`), puts the VIP on the slb namespace's `lo`, and starts slb on the config
    /// `make_config` fills in (it gets a config with the interfaces and an access log in
    /// `dir`, and `dir` for certificates).
    pub fn start(
        tag: &str,
        backends: usize,
        make_config: impl FnOnce(&mut SlbConfig, &Path),
    ) -> L7Setup {
        Self::start_edited(tag, backends, make_config, |_| {})
    }

    /// [`start`](Self::start), with the config's TOML edited by `edit_toml` before slb reads
    /// it (for values [`SlbConfig`] cannot hold).
    pub fn start_edited(
        tag: &str,
        backends: usize,
        make_config: impl FnOnce(&mut SlbConfig, &Path),
        edit_toml: impl FnOnce(&mut toml::Table),
    ) -> L7Setup {
        Self::start_full(tag, backends, make_config, edit_toml, &[])
    }

    /// [`start`](Self::start) with `slb run --worker-threads 1`: one proxy thread, which keeps
    /// each connection it accepts (with more, each goes to the next thread in turn).
    pub fn start_on_one_thread(
        tag: &str,
        backends: usize,
        make_config: impl FnOnce(&mut SlbConfig, &Path),
    ) -> L7Setup {
        Self::start_full(
            tag,
            backends,
            make_config,
            |_| {},
            &["--worker-threads", "1"],
        )
    }

    fn start_full(
        tag: &str,
        backends: usize,
        make_config: impl FnOnce(&mut SlbConfig, &Path),
        edit_toml: impl FnOnce(&mut toml::Table),
        run_options: &[&str],
    ) -> L7Setup {
        let dir = tempfile::Builder::new()
            .prefix(&format!("slb-{tag}-"))
            .tempdir()
            .expect("temp dir");
        let topo = Topology::builder()
            .tag(tag)
            .backends(backends)
            .build()
            .expect("create topology");
        add_local_vip(&topo).expect("put the VIP on lo in the slb namespace");
        let http_backends =
            HttpBackends::start_all(&topo, Path::new(BACKEND)).expect("start HTTP backends");
        let mut config = SlbConfig::new(&unique_instance(tag), backends);
        config.access_log(dir.path().join("access.log"));
        // slb's default is a file of the machine's (/var/lib/slb): tests keep theirs apart.
        config.cookie_secret_file = dir.path().join("cookie-secret");
        make_config(&mut config, dir.path());
        let mut table: toml::Table = config.to_toml().parse().expect("the config is TOML");
        edit_toml(&mut table);
        let text = table.to_string();
        let daemon = SlbDaemon::start_toml_with(
            &slb_binary(),
            topo.slb_ns(),
            config.instance(),
            &text,
            run_options,
        )
        .unwrap_or_else(|e| panic!("start slb: {e:#}\nconfig:\n{text}"));
        let client = NetnsRuntime::new(topo.client_ns()).expect("client runtime");
        L7Setup {
            daemon,
            backends: http_backends,
            client,
            topo,
            config,
            dir,
        }
    }

    pub fn access_log(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }
}

/// A reqwest client for the tests: no proxy, each of `domains` resolving to `vip` (the port
/// comes from the URL), at most `timeout` per request.
pub fn client_builder(
    domains: &[&str],
    vip: SocketAddr,
    timeout: Duration,
) -> reqwest::ClientBuilder {
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(3));
    for d in domains {
        b = b.resolve(d, vip);
    }
    b
}

/// The answer to one request, body read in full.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub version: reqwest::Version,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
    pub elapsed: Duration,
}

impl Answer {
    pub fn echo(&self) -> Echo {
        Echo::parse(&self.body).unwrap_or_else(|e| panic!("status {}: {e:#}", self.status))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `X-Backend` header the backend put on the answer, if any.
    pub fn backend(&self) -> Option<String> {
        self.headers
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect()
    }
}

/// Sends `req` and reads the whole answer.
pub async fn send(req: reqwest::RequestBuilder) -> Result<Answer, reqwest::Error> {
    let started = Instant::now();
    let response = req.send().await?;
    let status = response.status().as_u16();
    let version = response.version();
    let headers = response.headers().clone();
    let body = response.bytes().await?.to_vec();
    Ok(Answer {
        status,
        version,
        headers,
        body,
        elapsed: started.elapsed(),
    })
}

/// `GET url` with `client`, read in full.
pub async fn get(client: &reqwest::Client, url: &str) -> Result<Answer, reqwest::Error> {
    send(client.get(url)).await
}

/// Answers per backend name (from `X-Backend`), `"<status>"` for answers without one.
pub fn count_backends<'a>(
    answers: impl IntoIterator<Item = &'a Answer>,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for a in answers {
        let key = a.backend().unwrap_or_else(|| format!("<{}>", a.status));
        *counts.entry(key).or_default() += 1;
    }
    counts
}

/// A test CA and leaf certificates it signed, written as PEM files.
pub struct TestPki {
    pub ca_pem: String,
    /// Per domain: certificate file, key file, certificate DER.
    pub leaves: BTreeMap<String, (PathBuf, PathBuf, Vec<u8>)>,
}

impl TestPki {
    /// A CA plus one leaf certificate per entry of `domains` (its SAN and CN), written to
    /// `<dir>/<domain>.pem` and `<dir>/<domain>.key`.
    pub fn generate(dir: &Path, domains: &[&str]) -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "slb test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign the CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let mut leaves = BTreeMap::new();
        for domain in domains {
            let key = KeyPair::generate().expect("leaf key");
            let mut params = CertificateParams::new(vec![domain.to_string()]).expect("params");
            params.distinguished_name.push(DnType::CommonName, *domain);
            let cert = params.signed_by(&key, &issuer).expect("sign leaf");
            let cert_path = dir.join(format!("{domain}.pem"));
            let key_path = dir.join(format!("{domain}.key"));
            std::fs::write(&cert_path, cert.pem()).expect("write cert");
            std::fs::write(&key_path, key.serialize_pem()).expect("write key");
            leaves.insert(
                domain.to_string(),
                (cert_path, key_path, cert.der().to_vec()),
            );
        }
        TestPki {
            ca_pem: ca_cert.pem(),
            leaves,
        }
    }

    pub fn root(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).expect("CA PEM")
    }

    /// `certificates` entry serving `domain` with its own certificate.
    pub fn certificate_config(&self, domain: &str) -> Certificate {
        let (cert, key, _) = &self.leaves[domain];
        Certificate {
            cert: cert.clone(),
            key: key.clone(),
            domains: vec![domain.to_owned()],
        }
    }

    /// The domain whose certificate has this DER, if any.
    pub fn domain_of(&self, der: &[u8]) -> Option<&str> {
        self.leaves
            .iter()
            .find(|(_, (_, _, d))| d.as_slice() == der)
            .map(|(domain, _)| domain.as_str())
    }
}

/// What came back on a raw connection: the bytes, how reading ended, and when.
pub struct RawOutcome {
    pub bytes: Vec<u8>,
    pub end: String,
    pub after: Duration,
}

impl RawOutcome {
    pub fn status_line(&self) -> String {
        String::from_utf8_lossy(&self.bytes)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()
    }
}

/// Reads from `stream` until EOF, an error, or `limit`.
pub fn read_to_end(stream: &mut TcpStream, limit: Duration) -> RawOutcome {
    let started = Instant::now();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        let left = limit.saturating_sub(started.elapsed());
        if left.is_zero() {
            break "still open".to_owned();
        }
        stream.set_read_timeout(Some(left)).expect("read timeout");
        match stream.read(&mut buf) {
            Ok(0) => break "closed (EOF)".to_owned(),
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break "still open".to_owned()
            }
            Err(e) => break format!("closed ({e})"),
        }
    };
    RawOutcome {
        bytes,
        end,
        after: started.elapsed(),
    }
}

/// Sends `request` as it is on a new connection from `ns` to the HTTP listener, and reads what
/// comes back within `limit`.
pub fn raw_exchange(ns: &str, request: &[u8], limit: Duration) -> RawOutcome {
    let mut s = tcp_connect_in(ns, vip_http(), Duration::from_secs(3)).expect("connect");
    s.write_all(request).expect("send");
    read_to_end(&mut s, limit)
}

/// A backend that records the head of each request it gets, as it came on the wire, in place
/// of `slb-http-backend` in a backend namespace. It answers `200` (keep-alive), or `101` and
/// closes when the request asks for a WebSocket; request bodies are not expected.
pub struct RecordingBackend {
    heads: Arc<Mutex<Vec<String>>>,
    _runtime: NetnsRuntime,
}

impl RecordingBackend {
    /// Listens on the backend port in `ns` (stop the `slb-http-backend` there first).
    pub fn start_in(ns: &str) -> RecordingBackend {
        let runtime = NetnsRuntime::new(ns).expect("backend runtime");
        let listener = runtime
            .run(tokio::net::TcpListener::bind(("0.0.0.0", BACKEND_PORT)))
            .expect("listen on the backend port");
        let heads = Arc::new(Mutex::new(Vec::new()));
        let recorded = heads.clone();
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(record_connection(stream, recorded.clone()));
            }
        });
        RecordingBackend {
            heads,
            _runtime: runtime,
        }
    }

    /// The request heads recorded so far whose request line contains `marker`.
    pub fn heads_with(&self, marker: &str) -> Vec<String> {
        let heads = self.heads.lock().expect("heads");
        heads
            .iter()
            .filter(|h| h.lines().next().is_some_and(|l| l.contains(marker)))
            .cloned()
            .collect()
    }
}

async fn record_connection(mut stream: tokio::net::TcpStream, heads: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            buf.drain(..end + 4);
            let websocket = head.to_ascii_lowercase().contains("upgrade: websocket");
            heads.lock().expect("heads").push(head);
            let answer: &[u8] = if websocket {
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n"
            };
            if stream.write_all(answer).await.is_err() || websocket {
                return;
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
