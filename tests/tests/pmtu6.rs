//! Path MTU discovery over IPv6, where routers never fragment: slb's link towards the backend
//! has the IPv6 minimum MTU, 1280, while the client and the backend have 1500 (the backend
//! advertises an MSS for 1500, as a backend behind a smaller router hop would). Uploads of
//! 1 MiB to the IPv6 VIP arrive 10 times out of 10, because slb answers the client's
//! full-size segments with ICMPv6 Packet Too Big quoting them as sent (to the VIP).

mod pmtu_common;

use slb_tests::{require_root, Family};

#[test]
fn uploads_through_the_ipv6_vip_discover_a_1280_mtu_hop() {
    require_root("uploads_through_the_ipv6_vip_discover_a_1280_mtu_hop");
    pmtu_common::uploads_discover_a_smaller_backend_side_mtu(Family::V6, "pmtu6", 1280, 1 << 20);
}
