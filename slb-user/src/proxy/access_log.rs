//! The access log: one JSON line per request, the [`AccessLogRecord`] that `slb report` reads back
//! with the same type. Requests hand their record to a writer thread over a bounded queue and never
//! wait for the disk: when the queue is full (the disk is slower than the traffic), the record is
//! dropped and counted, and the writer warns with the count once it catches up. Dropping the
//! `AccessLog` (the daemon stopping) waits until what is queued is written.

use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

/// Records waiting for the writer; about 1.5 MiB at the most. A disk that stalls this long
/// behind the requests costs log lines, not latency.
const QUEUE_RECORDS: usize = 8192;

/// Dropped records and failed writes are reported at most this often, so an overloaded or full
/// disk does not also flood the daemon's own log.
const WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// One request as the access log records it (a JSON object on one line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessLogRecord {
    /// When the response headers were ready (RFC 3339, milliseconds, UTC).
    #[serde(with = "rfc3339_millis")]
    pub time: SystemTime,
    pub listener: String,
    pub client: SocketAddr,
    /// The Host header (or the request URI's authority); empty when there is neither.
    pub host: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub group: String,
    /// The backend the request went to; `None` when none was (503: no healthy backend).
    pub backend: Option<SocketAddr>,
    /// From the request's arrival to its response headers.
    pub duration_ms: f64,
    /// From sending the request to the backend to its response headers.
    pub backend_ms: Option<f64>,
}

impl AccessLogRecord {
    /// The record of one line; `None` for a line that is not one (a torn last line, say).
    pub fn parse(line: &str) -> Option<AccessLogRecord> {
        serde_json::from_str(line).ok()
    }
}

mod rfc3339_millis {
    use std::time::SystemTime;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(*time))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        humantime::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("access_log: cannot open {}: {source}", path.display())]
pub struct OpenError {
    path: PathBuf,
    source: std::io::Error,
}

/// The request side of the access log: queues records for the writer thread.
pub struct AccessLog {
    /// `None` only while dropping, so the writer sees the queue close.
    queue: Option<SyncSender<AccessLogRecord>>,
    /// The file the writer switches to before its next batch; `Some(None)` turns logging off.
    next_file: Arc<Mutex<Option<Option<File>>>>,
    /// Whether a file is configured, so that requests skip building records nobody writes.
    enabled: AtomicBool,
    /// Records dropped because the queue was full, since the start.
    dropped: Arc<AtomicU64>,
    writer_gone_reported: AtomicBool,
    writer_thread: Option<std::thread::JoinHandle<()>>,
}

impl AccessLog {
    /// Starts the writer thread, with no file until [`AccessLog::set_file`].
    pub fn start() -> AccessLog {
        let (mut log, writer) = AccessLog::with_queue(QUEUE_RECORDS);
        let thread = std::thread::Builder::new()
            .name("slb-access-log".into())
            .spawn(move || writer.run())
            .expect("spawning the access log writer thread");
        log.writer_thread = Some(thread);
        log
    }

    /// The log and the writer that empties its queue of `capacity` records, not yet running.
    fn with_queue(capacity: usize) -> (AccessLog, Writer) {
        let (queue, records) = std::sync::mpsc::sync_channel(capacity);
        let next_file = Arc::new(Mutex::new(None));
        let dropped = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            records,
            next_file: next_file.clone(),
            dropped: dropped.clone(),
            dropped_reported: 0,
            failed_writes: 0,
            last_write_error: None,
            file: None,
            last_warning: None,
        };
        let log = AccessLog {
            queue: Some(queue),
            next_file,
            enabled: false.into(),
            dropped,
            writer_gone_reported: false.into(),
            writer_thread: None,
        };
        (log, writer)
    }

    /// Opens `path` for appending (or turns the log off with `None`); the writer switches to it
    /// before its next batch. Opened again on every apply, so a reload after a log rotation
    /// writes to the new file.
    pub fn set_file(&self, path: Option<&Path>) -> Result<(), OpenError> {
        let file = match path {
            None => None,
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| OpenError {
                        path: path.to_owned(),
                        source,
                    })?,
            ),
        };
        self.enabled.store(file.is_some(), Ordering::Relaxed);
        // Only this and the writer thread take the lock, never a request.
        *self.next_file.lock().expect("access log file lock") = Some(file);
        Ok(())
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Queues `record` without waiting; a full queue drops it and counts it.
    pub fn write(&self, record: AccessLogRecord) {
        let Some(queue) = &self.queue else { return };
        match queue.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {
                // Only after the writer panicked; said once, not for every request after.
                if !self.writer_gone_reported.swap(true, Ordering::Relaxed) {
                    tracing::error!("the access log writer thread has ended; records are lost");
                }
            }
        }
    }
}

impl Drop for AccessLog {
    /// Waits for the writer to write what is queued (at most the queue's records), so a daemon
    /// that stops loses no lines.
    fn drop(&mut self) {
        self.queue = None;
        if let Some(thread) = self.writer_thread.take() {
            let _ = thread.join();
        }
    }
}

struct Writer {
    records: Receiver<AccessLogRecord>,
    next_file: Arc<Mutex<Option<Option<File>>>>,
    /// Records dropped since the start, and how many of them a warning has named.
    dropped: Arc<AtomicU64>,
    dropped_reported: u64,
    /// Writes that failed since the last warning (a full disk, say), and the last error.
    failed_writes: u64,
    last_write_error: Option<std::io::Error>,
    file: Option<BufWriter<File>>,
    last_warning: Option<Instant>,
}

impl Writer {
    /// Writes what is queued in one go and flushes once the queue is empty, so a reader sees
    /// whole lines soon after their requests.
    fn run(mut self) {
        while let Ok(first) = self.records.recv() {
            self.switch_file_if_asked();
            self.write_line(&first);
            while let Ok(record) = self.records.try_recv() {
                self.write_line(&record);
            }
            if let Some(file) = &mut self.file {
                if let Err(e) = file.flush() {
                    self.write_failed(e);
                }
            }
            self.warn_about_losses();
        }
    }

    fn switch_file_if_asked(&mut self) {
        let next = self.next_file.lock().expect("access log file lock").take();
        if let Some(next) = next {
            if let Some(mut old) = self.file.take() {
                let _ = old.flush();
            }
            self.file = next.map(BufWriter::new);
        }
    }

    fn write_line(&mut self, record: &AccessLogRecord) {
        let Some(file) = &mut self.file else { return };
        let mut line = serde_json::to_vec(record).expect("an access log record serializes");
        line.push(b'\n');
        if let Err(e) = file.write_all(&line) {
            self.write_failed(e);
        }
    }

    fn write_failed(&mut self, error: std::io::Error) {
        self.failed_writes += 1;
        self.last_write_error = Some(error);
    }

    /// Warns about records dropped and writes failed since the last warning, at most once per
    /// [`WARNING_INTERVAL`]: a disk that is full fails every write.
    fn warn_about_losses(&mut self) {
        if self
            .last_warning
            .is_some_and(|at| at.elapsed() < WARNING_INTERVAL)
        {
            return;
        }
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > self.dropped_reported {
            tracing::warn!(
                dropped = dropped - self.dropped_reported,
                dropped_since_start = dropped,
                "access log: the writer fell behind; records dropped instead of delaying requests"
            );
            self.dropped_reported = dropped;
            self.last_warning = Some(Instant::now());
        }
        if let Some(error) = self.last_write_error.take() {
            tracing::warn!(
                failed_writes = self.failed_writes,
                "access log: writing failed, lines are lost: {error}"
            );
            self.failed_writes = 0;
            self.last_warning = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(path: &str) -> AccessLogRecord {
        AccessLogRecord {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_790_000_000_123),
            listener: "web".into(),
            client: "10.0.0.1:40000".parse().unwrap(),
            host: "www.example.com".into(),
            method: "GET".into(),
            path: path.into(),
            status: 200,
            group: "default".into(),
            backend: Some("10.0.1.2:8080".parse().unwrap()),
            duration_ms: 1.5,
            backend_ms: Some(1.25),
        }
    }

    #[test]
    fn a_record_is_one_json_line_with_the_logged_fields_and_reads_back_the_same() {
        let line = serde_json::to_string(&record("/a")).unwrap();
        assert_eq!(
            line,
            r#"{"time":"2026-09-21T14:13:20.123Z","listener":"web","client":"10.0.0.1:40000","host":"www.example.com","method":"GET","path":"/a","status":200,"group":"default","backend":"10.0.1.2:8080","duration_ms":1.5,"backend_ms":1.25}"#
        );
        assert_eq!(AccessLogRecord::parse(&line), Some(record("/a")));
        let written_before_the_type = r#"{"backend":"10.0.1.2:8080","backend_ms":1.25,"client":"10.0.0.1:40000","duration_ms":1.5,"group":"default","host":"www.example.com","listener":"web","method":"GET","path":"/a","status":200,"time":"2026-09-21T14:13:20.123Z"}"#;
        assert_eq!(
            AccessLogRecord::parse(written_before_the_type),
            Some(record("/a")),
            "lines of earlier versions (keys in alphabetical order) read the same"
        );
        let unanswered = AccessLogRecord {
            backend: None,
            backend_ms: None,
            ..record("/b")
        };
        let line = serde_json::to_string(&unanswered).unwrap();
        assert!(line.contains(r#""backend":null"#), "{line}");
        assert_eq!(AccessLogRecord::parse(&line), Some(unanswered));
        assert_eq!(AccessLogRecord::parse(r#"{"time":"#), None);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting_and_the_rest_is_written_in_order() {
        let dir = std::env::temp_dir().join(format!("slb-access-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let _ = std::fs::remove_file(&path);
        let (log, writer) = AccessLog::with_queue(4);
        assert!(!log.enabled());
        log.set_file(Some(&path)).unwrap();
        assert!(log.enabled());
        // The writer is not running yet: the queue fills, then records are dropped.
        for i in 0..10 {
            log.write(record(&format!("/{i}")));
        }
        assert_eq!(log.dropped.load(Ordering::Relaxed), 6);
        let writer = std::thread::spawn(move || writer.run());
        drop(log);
        writer.join().unwrap();
        let written: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| AccessLogRecord::parse(l).expect("whole lines").path)
            .collect();
        assert_eq!(written, ["/0", "/1", "/2", "/3"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_disk_loses_lines_but_not_the_writer() {
        let (log, writer) = AccessLog::with_queue(16);
        // /dev/full fails every write with ENOSPC.
        log.set_file(Some(Path::new("/dev/full"))).unwrap();
        let writer = std::thread::spawn(move || writer.run());
        for i in 0..1000 {
            log.write(record(&format!("/{i}")));
        }
        assert!(
            !log.writer_gone_reported.load(Ordering::Relaxed),
            "the writer is still there"
        );
        drop(log);
        writer.join().expect("the writer ends without panicking");
    }
}
