//! Weighted balancing of TCP connections and UDP flows through `slb` in network namespaces.

mod balance_common;

use slb_tests::{require_root, Family};

#[test]
fn balances_tcp_and_udp_by_weight() {
    require_root("balances_tcp_and_udp_by_weight");
    balance_common::balances_tcp_and_udp_by_weight(Family::V4, "bal");
}
