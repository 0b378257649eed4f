//! An active/standby group behind a UDP and a TCP listener: when the active server dies,
//! traffic moves to the standby; when it is back, new flows return to it. The standby is
//! never probed.
//!
//! Two UDP check styles: one that expects the server's reply (fast, every 200 ms), and one that
//! learns of a dead server only from ICMP port unreachable, which the backends' kernels send at
//! most once a second per destination (after a burst of 6) — slb requires such checks to probe
//! at most once a second, and the test runs it at that pace with the kernel's defaults.

mod active_standby_common;

use std::time::Duration;

use active_standby_common::{INTERVAL, THRESHOLD, TIMEOUT};
use slb_tests::config::{health_check, CheckKind};
use slb_tests::{require_root, Family};

/// The UDP check expects the test server's echo of the probe payload.
#[test]
fn active_standby_fails_over_and_back() {
    require_root("active_standby_fails_over_and_back");
    let mut udp_check = health_check(CheckKind::Udp, INTERVAL, TIMEOUT, THRESHOLD, THRESHOLD);
    udp_check.expect = Some("slb-health-check".to_owned());
    active_standby_common::fails_over_and_back(Family::V4, "as", udp_check, INTERVAL);
}

/// The UDP check relies on ICMP port unreachable alone (no `expect`), at one probe a second.
#[test]
fn active_standby_fails_over_and_back_with_an_icmp_only_udp_check() {
    require_root("active_standby_fails_over_and_back_with_an_icmp_only_udp_check");
    let interval = Duration::from_secs(1);
    let udp_check = health_check(
        CheckKind::Udp,
        interval,
        Duration::from_millis(500),
        THRESHOLD,
        THRESHOLD,
    );
    active_standby_common::fails_over_and_back(Family::V4, "asicmp", udp_check, interval);
}
