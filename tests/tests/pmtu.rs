//! Path MTU discovery through the VIP: the balancer's link towards the backend has a smaller
//! MTU (1400) than the client's path; uploads of 1 MiB still arrive, because slb answers the
//! client's full-size segments with ICMP "fragmentation needed" quoting them as sent.

mod pmtu_common;

use slb_tests::{require_root, Family};

#[test]
fn uploads_through_the_vip_discover_a_smaller_backend_side_mtu() {
    require_root("uploads_through_the_vip_discover_a_smaller_backend_side_mtu");
    pmtu_common::uploads_discover_a_smaller_backend_side_mtu(Family::V4, "pmtu", 1400, 1 << 20);
}
