//! `h2load` (nghttp2) as the HTTP suite's HTTP/2-over-TLS client: the command, and the figures
//! of one run, read from its report (rate, request counts, negotiated protocol and cipher) and
//! from its per-request log (latency percentiles; the report has only min/max/mean/sd).

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use serde::Deserialize;
use serde_json::json;

/// Latencies of one run, in microseconds (wrk's script and h2load's log give the same ones).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
    pub max: f64,
}

/// The figures of one h2load run.
#[derive(Debug, Clone, PartialEq)]
pub struct H2loadResult {
    /// h2load's own rate: requests completed in the main duration over that duration.
    pub requests_per_sec: f64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub timeout: u64,
    /// Answers with a 4xx or 5xx status.
    pub status_4xx_5xx: u64,
    /// ALPN protocol h2load negotiated (`h2` expected).
    pub protocol: String,
    /// TLS cipher suite h2load negotiated.
    pub cipher: String,
    /// Of the succeeded requests, from the per-request log.
    pub latency_us: Latency,
}

/// `h2load` arguments: `clients` connections with `streams` concurrent streams each, one
/// thread, for `duration` (no warm-up: measure one with a separate run), logging each request
/// to `log`.
pub fn args(url: &str, clients: u32, streams: u32, duration: Duration, log: &Path) -> Vec<String> {
    vec![
        "h2load".to_owned(),
        "-t1".to_owned(),
        "-c".to_owned(),
        clients.to_string(),
        "-m".to_owned(),
        streams.to_string(),
        "-D".to_owned(),
        duration.as_secs().max(1).to_string(),
        format!("--log-file={}", log.display()),
        url.to_owned(),
    ]
}

/// The value after `prefix` on the first line that starts with it.
fn line_after<'a>(stdout: &'a str, prefix: &str) -> anyhow::Result<&'a str> {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .map(str::trim)
        .with_context(|| format!("h2load printed no {prefix:?} line:\n{stdout}"))
}

/// The number before `label` in a comma-separated list such as `10 total, 9 done`.
fn count(list: &str, label: &str) -> anyhow::Result<u64> {
    list.split(',')
        .map(str::trim)
        .find_map(|item| item.strip_suffix(label).map(str::trim))
        .with_context(|| format!("no {label:?} count in {list:?}"))?
        .parse()
        .with_context(|| format!("the {label:?} count in {list:?}"))
}

impl H2loadResult {
    /// Reads h2load's report (stdout) and its per-request log file's contents.
    pub fn parse(stdout: &str, log: &str) -> anyhow::Result<H2loadResult> {
        let finished = line_after(stdout, "finished in")?;
        let requests_per_sec = finished
            .split(',')
            .find_map(|item| item.trim().strip_suffix("req/s"))
            .with_context(|| format!("no req/s in {finished:?}"))?
            .trim()
            .parse()
            .with_context(|| format!("the req/s of {finished:?}"))?;
        let requests = line_after(stdout, "requests:")?;
        let statuses = line_after(stdout, "status codes:")?;
        Ok(H2loadResult {
            requests_per_sec,
            succeeded: count(requests, "succeeded")?,
            failed: count(requests, "failed")?,
            errored: count(requests, "errored")?,
            timeout: count(requests, "timeout")?,
            status_4xx_5xx: count(statuses, "4xx")? + count(statuses, "5xx")?,
            protocol: line_after(stdout, "Application protocol:")?.to_owned(),
            cipher: line_after(stdout, "Cipher:")?.to_owned(),
            latency_us: log_latency(log, count(requests, "succeeded")?)?,
        })
    }

    /// Requests that did not succeed (failed, errored or timed out; h2load counts errored and
    /// timed-out ones among the failed, so failed is the total).
    pub fn errors(&self) -> u64 {
        self.failed
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "succeeded": self.succeeded,
            "failed": self.failed,
            "errored": self.errored,
            "timeout": self.timeout,
            "status_4xx_5xx": self.status_4xx_5xx,
            "protocol": self.protocol,
            "cipher": self.cipher,
        })
    }
}

/// Latency percentiles (nearest rank), mean and maximum of the successful requests (status
/// 2xx or 3xx) of h2load's log: tab-separated start time, status (-1 for a failed stream),
/// microseconds to the response's end. The log must hold as many of them as the report's
/// `succeeded` (h2load appends to a log: one left from another run would skew the figures).
fn log_latency(log: &str, succeeded: u64) -> anyhow::Result<Latency> {
    let mut times = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split('\t').collect();
        let (Some(status), Some(time)) = (fields.get(1), fields.get(2)) else {
            anyhow::bail!("h2load log line with fewer than 3 columns: {line:?}");
        };
        let status: i32 = status.trim().parse().with_context(|| format!("{line:?}"))?;
        // h2load's "succeeded": answers with a 2xx or 3xx status.
        if (200..400).contains(&status) {
            times.push(
                time.trim()
                    .parse::<u64>()
                    .with_context(|| format!("{line:?}"))?,
            );
        }
    }
    ensure!(!times.is_empty(), "h2load logged no successful request");
    ensure!(
        times.len() as u64 == succeeded,
        "h2load's log has {} successful requests, its report {succeeded}",
        times.len()
    );
    times.sort_unstable();
    let rank = |p: f64| {
        let i = ((p / 100.0 * times.len() as f64).ceil() as usize).clamp(1, times.len());
        times[i - 1] as f64
    };
    Ok(Latency {
        p50: rank(50.0),
        p90: rank(90.0),
        p99: rank(99.0),
        mean: times.iter().sum::<u64>() as f64 / times.len() as f64,
        max: *times.last().unwrap_or(&0) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// h2load 1.52's report of a timing-based run.
    const REPORT: &str = "starting benchmark...
spawning thread #0: 10 total client(s). Timing-based test with 0s of warm-up time and 2s of main duration for measurements.
TLS Protocol: TLSv1.3
Cipher: TLS_AES_256_GCM_SHA384
Server Temp Key: X25519 253 bits
Application protocol: h2
Main benchmark duration is over for thread #0. Stopping all clients.

finished in 2.99s, 57825.00 req/s, 2.15MB/s
requests: 110 total, 110 started, 110 done, 100 succeeded, 10 failed, 3 errored, 2 timeout
status codes: 95 2xx, 0 3xx, 4 4xx, 1 5xx
traffic: 4.30MB (4510350) total, 2.86MB (2995040) headers (space savings 65.96%), 914.01KB (935950) data
                     min         max         mean         sd        +/- sd
time for request:       64us     25.19ms      1.52ms      3.20ms    91.81%
";

    #[test]
    fn parses_the_report_and_the_log() {
        let log: String = (1..=100)
            .map(|i| format!("1796073734485876\t200\t{}\n", i * 10))
            .chain(["1796073734485877\t-1\t999999\n".to_owned()])
            .collect();
        let r = H2loadResult::parse(REPORT, &log).unwrap();
        assert_eq!(r.requests_per_sec, 57825.0);
        assert_eq!(
            (r.succeeded, r.failed, r.errored, r.timeout),
            (100, 10, 3, 2)
        );
        assert_eq!(r.status_4xx_5xx, 5);
        assert_eq!(r.protocol, "h2");
        assert_eq!(r.cipher, "TLS_AES_256_GCM_SHA384");
        assert_eq!((r.latency_us.p50, r.latency_us.p90), (500.0, 900.0));
        assert_eq!((r.latency_us.p99, r.latency_us.max), (990.0, 1000.0));
        assert_eq!(r.latency_us.mean, 505.0);
    }

    #[test]
    fn a_report_without_a_protocol_or_a_log_of_other_runs_is_an_error() {
        let log: String = (1..=100).map(|i| format!("1\t200\t{i}\n")).collect();
        assert!(H2loadResult::parse(REPORT, &log).is_ok());
        let no_alpn = REPORT.replace("Application protocol: h2\n", "");
        assert!(H2loadResult::parse(&no_alpn, &log).is_err());
        assert!(H2loadResult::parse(REPORT, "1\t-1\t10\n").is_err());
        // The log of an earlier run left in the file (h2load appends).
        let twice = log.repeat(2);
        assert!(H2loadResult::parse(REPORT, &twice).is_err());
    }
}
