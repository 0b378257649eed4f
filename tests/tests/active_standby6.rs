//! Active/standby failover over IPv6: the IPv4 test's twin on an IPv6 VIP with IPv6 backends.
//! When the active's server dies, new TCP connections and the UDP stream move to the standby;
//! when it is back, new flows return to it. The standby is never probed, and the backends see
//! the client's IPv6 address.

mod active_standby_common;

use active_standby_common::{INTERVAL, THRESHOLD, TIMEOUT};
use slb_tests::config::{health_check, CheckKind};
use slb_tests::{require_root, Family};

/// The UDP check expects the test server's echo of the probe payload, as in the IPv4 test of
/// the same name.
#[test]
fn active_standby_fails_over_and_back_over_ipv6() {
    require_root("active_standby_fails_over_and_back_over_ipv6");
    let mut udp_check = health_check(CheckKind::Udp, INTERVAL, TIMEOUT, THRESHOLD, THRESHOLD);
    udp_check.expect = Some("slb-health-check".to_owned());
    active_standby_common::fails_over_and_back(Family::V6, "as6", udp_check, INTERVAL);
}
