use std::net::IpAddr;

use super::*;
use crate::applied::{AppliedSnat, BackendKey, HealthStatus, ProxyBackendInfo, ProxyListenerInfo};
use crate::config::Protocol;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn listener(name: &str, vip: &str, kind: GroupKind, ring_input: &[(u32, u32)]) -> AppliedListener {
    AppliedListener {
        name: name.into(),
        protocol: Protocol::Tcp,
        vip: ip(vip),
        port: 80,
        group: "pool".into(),
        group_kind: kind,
        index: 0,
        ring: 0,
        ring_input: ring_input.to_vec(),
        flags: 0,
        persistence_timeout_s: None,
        idle_timeout_s: 300,
        health_check: true,
        snat: None,
        acl: None,
        new_flow_limit: None,
    }
}

fn backend(listener: &str, id: u32, weight: u32, healthy: Option<bool>) -> AppliedBackend {
    AppliedBackend {
        id,
        key: BackendKey {
            listener: listener.into(),
            address: ip(&format!("10.1.0.{id}")),
            port: 80,
        },
        group: "pool".into(),
        weight,
        max_connections: None,
        role: None,
        health: healthy.map(|healthy| HealthStatus {
            healthy,
            reason: String::new(),
            since_unix_ns: 0,
            confirmed: true,
            slow_start_percent: None,
        }),
    }
}

/// A VIP as the plan would give it, without a reason or a health change.
fn announcement(address: &str, announced: bool) -> Announcement {
    Announcement {
        address: ip(address),
        role: AddressRole::Vip,
        announced,
        reason: String::new(),
        health_changed_unix_ns: 0,
    }
}

fn announced(plan: &[Announcement]) -> Vec<(IpAddr, bool)> {
    plan.iter().map(|a| (a.address, a.announced)).collect()
}

#[test]
fn a_vip_is_announced_while_one_of_its_listeners_takes_new_flows() {
    // web: one healthy backend of two; dns: both unhealthy, on_all_unhealthy = "drop".
    let state = AppliedState {
        listeners: vec![
            listener("web", "192.0.2.1", GroupKind::Vserver, &[(1, 0), (2, 3)]),
            listener("dns", "192.0.2.1", GroupKind::Vserver, &[(3, 0), (4, 0)]),
            listener("api", "192.0.2.2", GroupKind::Vserver, &[(5, 0), (6, 0)]),
        ],
        backends: vec![
            backend("web", 1, 1, Some(false)),
            backend("web", 2, 3, Some(true)),
            backend("dns", 3, 1, Some(false)),
            backend("dns", 4, 1, Some(false)),
            backend("api", 5, 1, Some(false)),
            backend("api", 6, 2, Some(false)),
        ],
        ..Default::default()
    };
    let plan = plan(&[], &state, &Ok(()));
    assert_eq!(
        announced(&plan),
        [(ip("192.0.2.1"), true), (ip("192.0.2.2"), false)]
    );
    assert_eq!(plan[0].reason, "served by web");
    assert!(
        plan[1]
            .reason
            .contains("api: every backend with weight is unhealthy")
            && plan[1].reason.contains("on_all_unhealthy = \"drop\""),
        "{}",
        plan[1].reason
    );
}

#[test]
fn drained_backends_and_listenerless_vips_withdraw_and_say_so() {
    let state = AppliedState {
        listeners: vec![listener("web", "192.0.2.1", GroupKind::Vserver, &[(1, 0)])],
        backends: vec![backend("web", 1, 0, None)],
        ..Default::default()
    };
    let plan = plan(&[ip("192.0.2.9"), ip("192.0.2.1")], &state, &Ok(()));
    assert_eq!(
        announced(&plan),
        [(ip("192.0.2.1"), false), (ip("192.0.2.9"), false)]
    );
    assert_eq!(
        plan[0].reason,
        "no listener can take new flows (web: all 1 backend(s) have weight 0)"
    );
    assert_eq!(plan[1].reason, "no listener on this VIP");
}

#[test]
fn forwarding_to_all_when_all_are_down_keeps_the_vip() {
    // on_all_unhealthy = "forward-all": the ring keeps the weights.
    let state = AppliedState {
        listeners: vec![listener("web", "192.0.2.1", GroupKind::Vserver, &[(1, 2)])],
        backends: vec![backend("web", 1, 2, Some(false))],
        ..Default::default()
    };
    assert_eq!(
        announced(&plan(&[], &state, &Ok(()))),
        [(ip("192.0.2.1"), true)]
    );
}

#[test]
fn an_active_standby_vip_stays_announced_when_the_active_fails() {
    let state = AppliedState {
        listeners: vec![listener("db", "2001:db8::1", GroupKind::ActiveStandby, &[])],
        backends: vec![backend("db", 1, 1, Some(false)), backend("db", 2, 1, None)],
        ..Default::default()
    };
    assert_eq!(
        announced(&plan(&[], &state, &Ok(()))),
        [(ip("2001:db8::1"), true)]
    );
}

#[test]
fn a_proxy_listener_counts_its_healthy_backends_with_weight() {
    let proxy = |weight, healthy| ProxyListenerInfo {
        name: "http".into(),
        protocol: Protocol::Http,
        vip: ip("192.0.2.3"),
        port: 80,
        cookie_persistence: false,
        backends: vec![ProxyBackendInfo {
            group: "pool".into(),
            address: ip("10.1.0.1"),
            port: 8080,
            weight,
            health: Some(HealthStatus {
                healthy,
                reason: String::new(),
                since_unix_ns: 0,
                confirmed: true,
                slow_start_percent: None,
            }),
        }],
    };
    let mut state = AppliedState::default();
    for (weight, healthy, expected) in [(1, true, true), (1, false, false), (0, true, false)] {
        state.proxy_listeners = vec![proxy(weight, healthy)];
        assert_eq!(
            announced(&plan(&[], &state, &Ok(()))),
            [(ip("192.0.2.3"), expected)],
            "weight {weight}, healthy {healthy}"
        );
    }
}

#[test]
fn nothing_is_announced_while_the_node_cannot_serve_and_snat_addresses_follow_the_node() {
    let mut state = AppliedState::default();
    let mut fullnat = listener("web", "192.0.2.1", GroupKind::Vserver, &[(1, 0)]);
    fullnat.snat = Some(AppliedSnat {
        addresses: vec![ip("198.51.100.1"), ip("198.51.100.2")],
        first_port: 1024,
        last_port: 32767,
    });
    state.listeners = vec![fullnat];
    state.backends = vec![backend("web", 1, 1, Some(false))];
    // The SNAT addresses stay announced though no backend takes new flows: the replies of
    // established flows come back to them.
    let serving = plan(&[], &state, &Ok(()));
    assert_eq!(
        announced(&serving),
        [
            (ip("192.0.2.1"), false),
            (ip("198.51.100.1"), true),
            (ip("198.51.100.2"), true)
        ]
    );
    assert_eq!(serving[1].role, AddressRole::Snat);
    let stopped = plan(
        &[],
        &state,
        &Err("the data plane is not attached to eth1".into()),
    );
    assert!(stopped
        .iter()
        .all(|a| !a.announced && a.reason == "the data plane is not attached to eth1"));
}

#[test]
fn the_include_file_holds_both_families_protocols_with_the_announced_routes() {
    let text = render(
        "slb_web",
        "web",
        &[
            announcement("192.0.2.1", true),
            announcement("192.0.2.2", false),
            announcement("2001:db8::1", true),
        ],
    );
    assert_eq!(
        text,
        "# Written by slb for instance \"web\": the addresses this node can serve now.\n\
         # slb rewrites this file and has BIRD re-read its config; do not edit it.\n\
         protocol static slb_web_v4 {\n\tipv4;\n\troute 192.0.2.1/32 blackhole;\n}\n\
         protocol static slb_web_v6 {\n\tipv6;\n\troute 2001:db8::1/128 blackhole;\n}\n"
    );
    let empty = render("p", "web", &[]);
    assert!(
        empty.contains("protocol static p_v4 {\n\tipv4;\n}\n"),
        "{empty}"
    );
}

#[test]
fn an_address_comes_back_only_once_its_checks_have_settled() {
    const S: u128 = 1_000_000_000;
    let wanted = |address: &str, announced, changed_s: u128| Announcement {
        address: ip(address),
        role: AddressRole::Vip,
        announced,
        reason: "served by web".into(),
        health_changed_unix_ns: changed_s * S,
    };
    let plan = [
        // Withdrawn until now; its last backend came back at 100 s.
        wanted("192.0.2.1", true, 100),
        // Announced all along: a verdict changing does not hold it back.
        wanted("192.0.2.2", true, 101),
        // Withdrawn: never held.
        wanted("192.0.2.3", false, 101),
        // Back, and settled.
        wanted("192.0.2.4", true, 90),
    ];
    let in_bird = [ip("192.0.2.2"), ip("192.0.2.3")].into_iter().collect();
    let (now, next) = settle(&plan, &in_bird, 101 * S, Duration::from_secs(2));
    assert_eq!(
        announced(&now),
        [
            (ip("192.0.2.1"), false),
            (ip("192.0.2.2"), true),
            (ip("192.0.2.3"), false),
            (ip("192.0.2.4"), true)
        ]
    );
    assert_eq!(next, Some(102 * S));
    assert_eq!(
        now[0].reason,
        "served by web; held back until its checks have settled (no verdict changed for 2s)"
    );
    let (later, next) = settle(&plan, &in_bird, 102 * S, Duration::from_secs(2));
    assert!(later[0].announced);
    assert_eq!(next, None);

    // A backend without its first verdict: held until the plan changes, with no timer.
    let mut unconfirmed = wanted("192.0.2.5", true, 0);
    unconfirmed.health_changed_unix_ns = UNCONFIRMED;
    let (held, next) = settle(&[unconfirmed], &in_bird, 200 * S, Duration::from_secs(2));
    assert!(!held[0].announced);
    assert_eq!(
        held[0].reason,
        "served by web; held back until the first checks of its backends have answered"
    );
    assert_eq!(next, None);
}

#[test]
fn the_announced_addresses_read_back_from_the_include_file() {
    let text = render(
        "p",
        "web",
        &[
            announcement("192.0.2.1", true),
            announcement("192.0.2.2", false),
            announcement("2001:db8::1", true),
        ],
    );
    assert_eq!(
        announced_in(&text),
        [ip("192.0.2.1"), ip("2001:db8::1")].into_iter().collect()
    );
}

#[test]
fn a_vip_with_a_backend_not_checked_yet_is_unconfirmed() {
    let mut unchecked = backend("web", 2, 1, Some(true));
    unchecked.health.as_mut().unwrap().confirmed = false;
    let state = AppliedState {
        listeners: vec![listener(
            "web",
            "192.0.2.1",
            GroupKind::Vserver,
            &[(1, 1), (2, 1)],
        )],
        backends: vec![backend("web", 1, 1, Some(true)), unchecked],
        ..Default::default()
    };
    assert_eq!(
        plan(&[], &state, &Ok(()))[0].health_changed_unix_ns,
        UNCONFIRMED
    );
}

#[test]
fn the_plan_names_the_latest_health_change_of_each_vip() {
    let at = |mut b: AppliedBackend, ns| {
        b.health.as_mut().unwrap().since_unix_ns = ns;
        b
    };
    let state = AppliedState {
        listeners: vec![
            listener("web", "192.0.2.1", GroupKind::Vserver, &[(1, 1), (2, 1)]),
            listener("dns", "192.0.2.1", GroupKind::Vserver, &[(3, 1)]),
        ],
        backends: vec![
            at(backend("web", 1, 1, Some(true)), 5),
            at(backend("web", 2, 1, Some(true)), 9),
            at(backend("dns", 3, 1, Some(true)), 7),
        ],
        ..Default::default()
    };
    assert_eq!(plan(&[], &state, &Ok(()))[0].health_changed_unix_ns, 9);
}

/// A one-connection stand-in for BIRD's control socket that answers with `reply`.
async fn fake_bird(
    reply: &'static str,
) -> (tempfile::TempDir, PathBuf, tokio::task::JoinHandle<String>) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("bird.ctl");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        write.write_all(b"0001 BIRD 2.0.12 ready.\n").await.unwrap();
        let mut lines = BufReader::new(read).lines();
        let command = lines.next_line().await.unwrap().unwrap_or_default();
        write.write_all(reply.as_bytes()).await.unwrap();
        command
    });
    (dir, socket, task)
}

#[tokio::test]
async fn a_bird_reply_is_read_to_its_final_line() {
    let (_dir, socket, bird) = fake_bird(
        "0002-Reading configuration from /etc/bird/bird.conf\n continued\n0003 Reconfigured\n",
    )
    .await;
    let reply = bird_command(&socket, "configure").await.unwrap();
    assert_eq!(bird.await.unwrap(), "configure");
    assert_eq!(
        reply,
        [
            ReplyLine {
                code: 2,
                text: "Reading configuration from /etc/bird/bird.conf".into()
            },
            ReplyLine {
                code: 2,
                text: "continued".into()
            },
            ReplyLine {
                code: 3,
                text: "Reconfigured".into()
            },
        ]
    );
}

#[tokio::test]
async fn birds_errors_and_strangers_are_named() {
    let (_dir, socket, _bird) =
        fake_bird("0002-Reading configuration from /etc/bird/bird.conf\n8002 /run/slb/bird/web.conf:3:8 syntax error\n").await;
    let e = bird_command(&socket, "configure").await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "BIRD refused `configure`: 8002 /run/slb/bird/web.conf:3:8 syntax error"
    );

    let (_dir, socket, _bird) = fake_bird("HTTP/1.1 400 Bad Request\n").await;
    let e = bird_command(&socket, "configure").await.unwrap_err();
    assert!(matches!(e, BirdError::Garbled { .. }), "{e}");

    let missing = Path::new("/nonexistent/bird.ctl");
    let e = bird_command(missing, "configure").await.unwrap_err();
    assert!(
        e.to_string()
            .starts_with("cannot reach BIRD at /nonexistent/bird.ctl: "),
        "{e}"
    );
}

/// A stand-in for BIRD's control socket that serves connections until dropped: `configure`
/// succeeds, `show protocols P` lists P if `includes` (else "8003 No protocols match"). It
/// records the commands.
struct FakeBird {
    commands: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeBird {
    fn serve(socket: &Path, includes: bool) -> FakeBird {
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        let commands = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = commands.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (read, mut write) = stream.into_split();
                let _ = write.write_all(b"0001 BIRD 2.0.12 ready.\n").await;
                let mut lines = BufReader::new(read).lines();
                let Ok(Some(command)) = lines.next_line().await else {
                    continue;
                };
                let reply = if command == "configure" {
                    "0002-Reading configuration from /etc/bird/bird.conf\n0003 Reconfigured\n"
                        .to_string()
                } else if includes {
                    format!(
                        "2002-Name       Proto      Table      State  Since         Info\n\
                         1002-{}     Static     master4    up     12:00:00.000\n0000 \n",
                        command.trim_start_matches("show protocols ")
                    )
                } else {
                    "8003 No protocols match\n".to_string()
                };
                seen.lock().unwrap().push(command);
                let _ = write.write_all(reply.as_bytes()).await;
            }
        });
        FakeBird { commands, task }
    }
}

impl Drop for FakeBird {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn test_target(dir: &Path) -> Target {
    Target {
        bird_socket: dir.join("bird.ctl"),
        include_file: dir.join("announce").join("slb.conf"),
        protocol: "slb_t".into(),
        withdraw_grace: Duration::ZERO,
        settle_time: Duration::from_millis(300),
    }
}

#[tokio::test]
async fn the_announcer_waits_for_the_daemon_then_retries_until_bird_answers() {
    let dir = tempfile::tempdir().unwrap();
    let target = test_target(dir.path());
    // An instance without a state directory: the status file is not written.
    let (desired_tx, desired) = watch::channel(Desired::default());
    let (applied_tx, mut applied) = watch::channel(Applied::default());
    let task = tokio::spawn(run(
        "announce-test-no-state".into(),
        target.clone(),
        None,
        desired,
        applied_tx,
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !target.include_file.exists(),
        "nothing is written before the daemon's first word"
    );

    // BIRD is not there yet: refused, reported as down.
    desired_tx.send_replace(Desired {
        seq: 1,
        announcements: vec![announcement("192.0.2.1", true)],
    });
    let down = *applied.wait_for(|a| a.seq == 1).await.unwrap();
    assert!(down.bird_down);

    // BIRD comes: the next retry (within a second) announces.
    let bird = FakeBird::serve(&target.bird_socket, true);
    tokio::time::timeout(
        Duration::from_secs(3),
        applied.wait_for(|a| a.seq == 1 && !a.bird_down),
    )
    .await
    .expect("announced within the retry")
    .unwrap();
    let text = std::fs::read_to_string(&target.include_file).unwrap();
    assert!(text.contains("route 192.0.2.1/32 blackhole;"), "{text}");
    assert_eq!(
        bird.commands.lock().unwrap().clone(),
        ["configure", "show protocols slb_t_v4"]
    );
    task.abort();
}

#[tokio::test]
async fn a_new_address_waits_for_the_settle_time_and_a_missing_include_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let target = test_target(dir.path());
    let bird = FakeBird::serve(&target.bird_socket, true);
    let (desired_tx, desired) = watch::channel(Desired::default());
    let (applied_tx, mut applied) = watch::channel(Applied::default());
    let task = tokio::spawn(run(
        "announce-test-no-state".into(),
        target.clone(),
        None,
        desired,
        applied_tx,
    ));
    let mut fresh = announcement("192.0.2.1", true);
    fresh.health_changed_unix_ns = unix_ns(SystemTime::now());
    desired_tx.send_replace(Desired {
        seq: 1,
        announcements: vec![fresh],
    });
    applied.wait_for(|a| a.seq == 1).await.unwrap();
    let held = std::fs::read_to_string(&target.include_file).unwrap();
    assert!(!held.contains("route "), "held back at first: {held}");
    // The task wakes itself when the settle time is over.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !std::fs::read_to_string(&target.include_file)
        .unwrap()
        .contains("route 192.0.2.1/32")
    {
        assert!(std::time::Instant::now() < deadline, "never announced");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    drop(bird);

    // A BIRD whose config lacks the include: named as such.
    std::fs::remove_file(&target.bird_socket).unwrap();
    let _bird = FakeBird::serve(&target.bird_socket, false);
    let e = announce(&target, "").await.unwrap_err();
    assert!(
        e.to_string().starts_with(
            "BIRD re-read its config but has no protocol slb_t_v4: its config does not include"
        ),
        "{e}"
    );
}
