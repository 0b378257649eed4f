//! Weighted balancing over IPv6: the IPv4 balance test's twin on an IPv6 VIP with IPv6
//! backends (3000 TCP connections, 3000 UDP flows, weights 1:2:3, ±5 percentage points, the
//! client's IPv6 address seen by the backends, `slb status` in agreement).

mod balance_common;

use slb_tests::{require_root, Family};

#[test]
fn balances_tcp_and_udp_by_weight_over_ipv6() {
    require_root("balances_tcp_and_udp_by_weight_over_ipv6");
    balance_common::balances_tcp_and_udp_by_weight(Family::V6, "bal6");
}
