//! Announcing the VIPs over BGP through BIRD, so that several slb nodes behind an ECMP router
//! share them (see the README's "Running several slb nodes").
//!
//! slb does not speak BGP. It owns one file that BIRD's config includes: a `static` protocol
//! per address family with a route for every address this node can serve now. When the answer
//! changes (a reload, a health verdict, an interface gone, a stop), the announcer rewrites the
//! file and has BIRD re-read its config over BIRD's control socket; BIRD's BGP sessions then
//! announce or withdraw the routes. A restart with `--keep-serving` leaves the file as it is,
//! so nothing is withdrawn while the data plane keeps forwarding.
//!
//! [`plan`] decides (pure, unit-tested); [`render`] writes BIRD's syntax; [`run`] is the task
//! that owns the file and BIRD; [`Announcer`] is the daemon's handle on it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::sync::watch;

use crate::applied::{AppliedBackend, AppliedListener, AppliedState};
use crate::config::{Announce, GroupKind};
use crate::health::unix_ns;

/// How long one exchange with BIRD may take before it counts as failed.
const BIRD_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a stop waits for BIRD to take the withdrawal: two slow attempts and the pause
/// between them.
pub const WITHDRAW_TIMEOUT: Duration = Duration::from_secs(7);
/// How soon a failed announcement (BIRD down, its config refused) is tried again.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Longest reply slb reads from BIRD: `configure` answers in a few lines.
const MAX_REPLY_LINES: usize = 1000;

/// What an announced address is to slb.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressRole {
    /// A listener's VIP: announced while a listener on it can take new flows.
    Vip,
    /// A full NAT listener's SNAT address: its flows' replies come back to it, so it is
    /// announced while the data plane runs, whatever the backends' health.
    Snat,
}

impl AddressRole {
    pub fn as_str(self) -> &'static str {
        match self {
            AddressRole::Vip => "vip",
            AddressRole::Snat => "snat",
        }
    }
}

/// `address` as the host route BIRD announces: /32 or /128.
pub fn host_prefix(address: IpAddr) -> String {
    let len = if address.is_ipv4() { 32 } else { 128 };
    format!("{address}/{len}")
}

/// One address and whether this node announces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    pub address: IpAddr,
    pub role: AddressRole,
    pub announced: bool,
    /// Why, for `slb status`.
    pub reason: String,
    /// When a health verdict of the address's backends last changed (Unix ns; 0 for none;
    /// [`UNCONFIRMED`] while one has no verdict yet): a withdrawn address is announced again
    /// only once they have settled (see [`settle`]).
    #[serde(default)]
    pub health_changed_unix_ns: u128,
}

/// [`Announcement::health_changed_unix_ns`] of an address one of whose backends has not had
/// its first verdict: it is held back until every check has answered.
pub const UNCONFIRMED: u128 = u128::MAX;

/// Which addresses this node announces, and why: every VIP (the config's `vips` and every
/// listener's) while `serving` is `Ok` and at least one listener on it has a backend that takes
/// new flows; every SNAT address while `serving` is `Ok`. Sorted by role, then address.
pub fn plan(
    vips: &[IpAddr],
    state: &AppliedState,
    serving: &Result<(), String>,
) -> Vec<Announcement> {
    let mut by_vip: BTreeMap<IpAddr, Vec<(String, Option<String>)>> =
        vips.iter().map(|v| (*v, Vec::new())).collect();
    let mut health_changed: BTreeMap<IpAddr, u128> = BTreeMap::new();
    let mut changed = |vip: IpAddr, health: Option<&crate::applied::HealthStatus>| {
        if let Some(h) = health {
            let latest = health_changed.entry(vip).or_default();
            // A backend whose checks have not answered yet may still turn out unhealthy.
            let at = if h.confirmed {
                h.since_unix_ns
            } else {
                UNCONFIRMED
            };
            *latest = (*latest).max(at);
        }
    };
    for l in &state.listeners {
        let backends: Vec<&AppliedBackend> = state
            .backends
            .iter()
            .filter(|b| b.key.listener == l.name)
            .collect();
        for b in &backends {
            changed(l.vip, b.health.as_ref());
        }
        by_vip
            .entry(l.vip)
            .or_default()
            .push((l.name.clone(), l4_takes_new_flows(l, &backends).err()));
    }
    for l in &state.proxy_listeners {
        for b in &l.backends {
            changed(l.vip, b.health.as_ref());
        }
        let usable = l
            .backends
            .iter()
            .filter(|b| b.weight > 0 && b.health.as_ref().is_none_or(|h| h.healthy))
            .count();
        let verdict = (usable == 0).then(|| {
            format!(
                "none of its {} backend(s) has weight and passes its check",
                l.backends.len()
            )
        });
        by_vip
            .entry(l.vip)
            .or_default()
            .push((l.name.clone(), verdict));
    }
    let mut announcements = Vec::new();
    for (vip, listeners) in by_vip {
        let (announced, reason) = match serving {
            Err(why) => (false, why.clone()),
            Ok(()) if listeners.is_empty() => (false, "no listener on this VIP".to_string()),
            Ok(()) => {
                let usable: Vec<&str> = listeners
                    .iter()
                    .filter(|(_, why_not)| why_not.is_none())
                    .map(|(name, _)| name.as_str())
                    .collect();
                if usable.is_empty() {
                    let why: Vec<String> = listeners
                        .iter()
                        .filter_map(|(name, why_not)| {
                            why_not.as_ref().map(|w| format!("{name}: {w}"))
                        })
                        .collect();
                    (
                        false,
                        format!("no listener can take new flows ({})", why.join("; ")),
                    )
                } else {
                    (true, format!("served by {}", usable.join(", ")))
                }
            }
        };
        announcements.push(Announcement {
            address: vip,
            role: AddressRole::Vip,
            announced,
            reason,
            health_changed_unix_ns: health_changed.get(&vip).copied().unwrap_or(0),
        });
    }
    let mut snat: BTreeMap<IpAddr, Vec<&str>> = BTreeMap::new();
    for l in &state.listeners {
        for address in l.snat.iter().flat_map(|s| &s.addresses) {
            snat.entry(*address).or_default().push(&l.name);
        }
    }
    for (address, listeners) in snat {
        let (announced, reason) = match serving {
            Err(why) => (false, why.clone()),
            Ok(()) => (
                true,
                format!(
                    "SNAT address of {}: their replies come here",
                    listeners.join(", ")
                ),
            ),
        };
        announcements.push(Announcement {
            address,
            role: AddressRole::Snat,
            announced,
            reason,
            health_changed_unix_ns: 0,
        });
    }
    announcements
}

/// `wanted` as it may go to BIRD at `now_ns`, and when to look again. An address that BIRD
/// does not announce yet (`in_bird` lacks it) is held back until its backends' health verdicts
/// have not changed for `settle`: a node coming back (or starting) would otherwise take flows
/// from the other nodes while its checks still disagree with theirs (the first backend healthy
/// again, the rest not yet), and send the flows it had not seen to other backends than theirs.
/// Withdrawals are never held back.
pub fn settle(
    wanted: &[Announcement],
    in_bird: &std::collections::BTreeSet<IpAddr>,
    now_ns: u128,
    settle: Duration,
) -> (Vec<Announcement>, Option<u128>) {
    let mut next: Option<u128> = None;
    let out = wanted
        .iter()
        .map(|a| {
            let held = a.announced && !in_bird.contains(&a.address);
            if held && a.health_changed_unix_ns == UNCONFIRMED {
                // Looked at again when the last check answers (the plan changes then).
                Announcement {
                    announced: false,
                    reason: format!(
                        "{}; held back until the first checks of its backends have answered",
                        a.reason
                    ),
                    ..a.clone()
                }
            } else if held && now_ns < a.health_changed_unix_ns + settle.as_nanos() {
                let settled_at = a.health_changed_unix_ns + settle.as_nanos();
                next = Some(next.map_or(settled_at, |n| n.min(settled_at)));
                Announcement {
                    announced: false,
                    reason: format!(
                        "{}; held back until its checks have settled (no verdict changed for {})",
                        a.reason,
                        humantime::format_duration(settle)
                    ),
                    ..a.clone()
                }
            } else {
                a.clone()
            }
        })
        .collect();
    (out, next)
}

/// The addresses an include file announces (as [`render`] writes them).
pub fn announced_in(text: &str) -> std::collections::BTreeSet<IpAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("route "))
        .filter_map(|r| r.split('/').next())
        .filter_map(|a| a.parse().ok())
        .collect()
}

/// Whether a TCP/UDP listener sends new flows somewhere, or why not.
fn l4_takes_new_flows(l: &AppliedListener, backends: &[&AppliedBackend]) -> Result<(), String> {
    if l.group_kind == GroupKind::ActiveStandby {
        // The standby is never probed: when the active fails, it takes the flows.
        return Ok(());
    }
    // The ring's input already has the weights health leaves (all of them when the listener
    // forwards to every backend because all are down).
    if l.ring_input.iter().any(|&(_, weight)| weight > 0) {
        return Ok(());
    }
    if backends.is_empty() {
        Err("it has no backends".to_string())
    } else if backends.iter().all(|b| b.weight == 0) {
        Err(format!("all {} backend(s) have weight 0", backends.len()))
    } else {
        Err(format!(
            "every backend with weight is unhealthy and on_all_unhealthy = \"drop\" ({} backend(s))",
            backends.len()
        ))
    }
}

/// The names of the two protocols slb writes, for IPv4 and IPv6.
pub fn protocol_names(prefix: &str) -> [String; 2] {
    [format!("{prefix}_v4"), format!("{prefix}_v6")]
}

/// The include file: one `static` protocol per family (both always there, so the operator's
/// filters and `birdc show protocols` find them), a blackhole route for each announced address.
pub fn render(prefix: &str, instance: &str, announcements: &[Announcement]) -> String {
    let [v4, v6] = protocol_names(prefix);
    let mut text = format!(
        "# Written by slb for instance {instance:?}: the addresses this node can serve now.\n\
         # slb rewrites this file and has BIRD re-read its config; do not edit it.\n"
    );
    for (name, channel, is_v4) in [(v4, "ipv4", true), (v6, "ipv6", false)] {
        text.push_str(&format!("protocol static {name} {{\n\t{channel};\n"));
        for a in announcements
            .iter()
            .filter(|a| a.announced && a.address.is_ipv4() == is_v4)
        {
            text.push_str(&format!("\troute {} blackhole;\n", host_prefix(a.address)));
        }
        text.push_str("}\n");
    }
    text
}

/// Where slb announces, resolved from `[announce]` for an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub bird_socket: PathBuf,
    pub include_file: PathBuf,
    pub protocol: String,
    #[serde(with = "humantime_serde")]
    pub withdraw_grace: Duration,
    #[serde(with = "humantime_serde", default)]
    pub settle_time: Duration,
}

impl Target {
    /// Whether `other` announces through the same file, protocols and BIRD.
    pub fn same_place(&self, other: &Target) -> bool {
        self.bird_socket == other.bird_socket
            && self.include_file == other.include_file
            && self.protocol == other.protocol
    }

    pub fn of(announce: &Announce, instance: &str) -> Target {
        Target {
            bird_socket: announce.bird_socket.clone(),
            include_file: announce.include_file(instance),
            protocol: announce.protocol(instance),
            withdraw_grace: announce.withdraw_grace,
            settle_time: announce.settle_time,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BirdError {
    #[error("cannot reach BIRD at {}: {source} (is bird running with `-s {}`?)", socket.display(), socket.display())]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to BIRD at {}: {source}", socket.display())]
    Io {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("BIRD at {} did not answer within {}", socket.display(), humantime::format_duration(BIRD_TIMEOUT))]
    Timeout { socket: PathBuf },
    #[error("BIRD refused `{command}`: {code:04} {message}")]
    Refused {
        command: String,
        code: u16,
        message: String,
    },
    #[error("BIRD's reply to `{command}` is not BIRD's protocol: {line:?}")]
    Garbled { command: String, line: String },
    #[error(
        "BIRD re-read its config but has no protocol {protocol}: its config does not include {} \
         (add `include \"{}\";` to it)",
        file.display(),
        file.display()
    )]
    NotIncluded { protocol: String, file: PathBuf },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One line of a BIRD reply: its code and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyLine {
    pub code: u16,
    pub text: String,
}

/// Sends `command` over BIRD's control socket and returns the reply's lines, the last one
/// being the reply's final line. A reply whose final code is 8000 or more (BIRD's errors) is
/// [`BirdError::Refused`].
pub async fn bird_command(socket: &Path, command: &str) -> Result<Vec<ReplyLine>, BirdError> {
    match tokio::time::timeout(BIRD_TIMEOUT, exchange(socket, command)).await {
        Ok(result) => result,
        Err(_) => Err(BirdError::Timeout {
            socket: socket.to_owned(),
        }),
    }
}

async fn exchange(socket: &Path, command: &str) -> Result<Vec<ReplyLine>, BirdError> {
    let io = |source| BirdError::Io {
        socket: socket.to_owned(),
        source,
    };
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| BirdError::Connect {
            socket: socket.to_owned(),
            source,
        })?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    // The greeting ("0001 BIRD 2.0.12 ready.") is a reply of its own.
    read_reply(&mut lines, "(greeting)")
        .await
        .map_err(|e| match e {
            ReadError::Io(source) => io(source),
            ReadError::Bird(e) => e,
        })?;
    write
        .write_all(format!("{command}\n").as_bytes())
        .await
        .map_err(io)?;
    read_reply(&mut lines, command).await.map_err(|e| match e {
        ReadError::Io(source) => io(source),
        ReadError::Bird(e) => e,
    })
}

enum ReadError {
    Io(std::io::Error),
    Bird(BirdError),
}

/// Reads one reply: lines "CODE-text" (more follow), " text" (continues the previous code) and
/// finally "CODE text".
async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
    command: &str,
) -> Result<Vec<ReplyLine>, ReadError> {
    let garbled = |line: &str| {
        ReadError::Bird(BirdError::Garbled {
            command: command.to_owned(),
            line: line.to_owned(),
        })
    };
    let mut reply: Vec<ReplyLine> = Vec::new();
    loop {
        let Some(line) = lines.next_line().await.map_err(ReadError::Io)? else {
            return Err(ReadError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "BIRD closed the connection mid-reply",
            )));
        };
        if reply.len() >= MAX_REPLY_LINES {
            return Err(garbled("(a reply of more than 1000 lines)"));
        }
        if let Some(text) = line.strip_prefix(' ') {
            let code = reply.last().map_or(0, |l| l.code);
            reply.push(ReplyLine {
                code,
                text: text.to_owned(),
            });
            continue;
        }
        let (code, rest) = match (line.get(..4), line.get(4..5), line.get(5..)) {
            (Some(code), Some(sep), Some(rest)) if code.bytes().all(|b| b.is_ascii_digit()) => (
                code.parse::<u16>().map_err(|_| garbled(&line))?,
                (sep, rest),
            ),
            _ => return Err(garbled(&line)),
        };
        reply.push(ReplyLine {
            code,
            text: rest.1.to_owned(),
        });
        match rest.0 {
            "-" => continue,
            " " if code >= 8000 => {
                return Err(ReadError::Bird(BirdError::Refused {
                    command: command.to_owned(),
                    code,
                    message: rest.1.to_owned(),
                }))
            }
            " " => return Ok(reply),
            _ => return Err(garbled(&line)),
        }
    }
}

/// Writes `text` to `path` whole (BIRD never reads half a file), creating its directory.
fn write_include(path: &Path, text: &str) -> Result<(), BirdError> {
    let write = |source| BirdError::Write {
        path: path.to_owned(),
        source,
    };
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(write)?;
    }
    // "<name>.conf.tmp": not matched by an `include ".../*.conf"` glob.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text).map_err(write)?;
    // BIRD reads its config as its own user (Debian's runs as bird), whatever slb's umask.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).map_err(write)?;
    std::fs::rename(&tmp, path).map_err(write)
}

/// Writes the file and has BIRD re-read its config; then asks BIRD for slb's protocol, since
/// BIRD reconfigures happily with a config that does not include the file.
async fn announce(target: &Target, text: &str) -> Result<String, BirdError> {
    write_include(&target.include_file, text)?;
    let reply = bird_command(&target.bird_socket, "configure").await?;
    let [v4, _] = protocol_names(&target.protocol);
    match bird_command(&target.bird_socket, &format!("show protocols {v4}")).await {
        Err(BirdError::Refused { code: 8003, .. }) => {
            return Err(BirdError::NotIncluded {
                protocol: v4,
                file: target.include_file.clone(),
            })
        }
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    Ok(reply
        .last()
        .map(|l| format!("{:04} {}", l.code, l.text))
        .unwrap_or_default())
}

/// What the daemon wants announced; `seq` grows with every change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    pub seq: u64,
    pub announcements: Vec<Announcement>,
}

/// The last exchange with BIRD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BirdOutcome {
    pub ok: bool,
    /// BIRD's answer, or the error.
    pub message: String,
    pub at_unix_ns: u128,
}

/// What `slb status` shows of the announcements (the announcer's file in the state directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceStatus {
    pub target: Target,
    /// As BIRD was last told successfully (or as slb is trying to tell it).
    pub announcements: Vec<Announcement>,
    /// Whether BIRD has `announcements`; false while slb retries.
    pub in_bird: bool,
    pub last: Option<BirdOutcome>,
}

impl AnnounceStatus {
    pub fn read(instance: &str) -> Option<AnnounceStatus> {
        let text = std::fs::read_to_string(crate::instance::announce_file(instance)).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn write(&self, instance: &str) -> std::io::Result<()> {
        let path = crate::instance::announce_file(instance);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &path)
    }
}

/// How far the announcer got with a [`Desired`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub seq: u64,
    /// Not in BIRD because BIRD does not run (nothing is announced through it either).
    pub bird_down: bool,
}

/// The announcer: keeps the include file and BIRD at what `desired` says, retrying every
/// second while BIRD cannot be reached or refuses; reports in `applied` how far it got.
pub async fn run(
    instance: String,
    target: Target,
    previous: Option<AnnounceStatus>,
    mut desired: watch::Receiver<Desired>,
    applied: watch::Sender<Applied>,
) {
    // Nothing is written before the daemon's first word: a restart with --keep-serving finds
    // the file announcing what the data plane serves, and must not withdraw it meanwhile.
    if desired.wait_for(|d| d.seq > 0).await.is_err() {
        return;
    }
    let mut in_bird: Option<String> = None;
    let mut last: Option<BirdOutcome> = None;
    let mut bird_down = false;
    // What BIRD announces at first: what the previous run (a restart with --keep-serving) had
    // BIRD confirm, else what the file says.
    let mut announced = match &previous {
        Some(p) if p.target.same_place(&target) && p.in_bird => p
            .announcements
            .iter()
            .filter(|a| a.announced)
            .map(|a| a.address)
            .collect(),
        _ => std::fs::read_to_string(&target.include_file)
            .map(|text| announced_in(&text))
            .unwrap_or_default(),
    };
    if let Some(p) = previous.filter(|p| !p.target.same_place(&target)) {
        retire(&instance, &p.target).await;
    }
    loop {
        let want = desired.borrow_and_update().clone();
        let (effective, look_again) = settle(
            &want.announcements,
            &announced,
            unix_ns(SystemTime::now()),
            target.settle_time,
        );
        let text = render(&target.protocol, &instance, &effective);
        if in_bird.as_deref() != Some(text.as_str()) {
            let outcome = announce(&target, &text).await;
            bird_down = matches!(
                &outcome,
                Err(BirdError::Connect { source, .. })
                    if matches!(source.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound)
            );
            let at_unix_ns = unix_ns(SystemTime::now());
            last = Some(match outcome {
                Ok(answer) => {
                    announced = announced_in(&text);
                    tracing::info!(
                        announced = ?announced,
                        bird = %answer,
                        "BIRD has the announcements"
                    );
                    in_bird = Some(text.clone());
                    BirdOutcome {
                        ok: true,
                        message: answer,
                        at_unix_ns,
                    }
                }
                Err(e) => {
                    // Logged once per change of error, not every retry.
                    if last
                        .as_ref()
                        .is_none_or(|l| l.ok || l.message != e.to_string())
                    {
                        tracing::error!(
                            "announcing through BIRD failed (retrying every second): {e}"
                        );
                    }
                    in_bird = None;
                    BirdOutcome {
                        ok: false,
                        message: e.to_string(),
                        at_unix_ns,
                    }
                }
            });
        }
        let status = AnnounceStatus {
            target: target.clone(),
            announcements: effective,
            in_bird: in_bird.is_some(),
            last: last.clone(),
        };
        if let Err(e) = status.write(&instance) {
            tracing::warn!(
                "writing {}: {e}",
                crate::instance::announce_file(&instance).display()
            );
        }
        let wake_in = look_again.map(|at| {
            Duration::from_nanos(
                u64::try_from(at.saturating_sub(unix_ns(SystemTime::now()))).unwrap_or(u64::MAX),
            )
        });
        if in_bird.is_some() {
            applied.send_replace(Applied {
                seq: want.seq,
                bird_down: false,
            });
            tokio::select! {
                changed = desired.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(wake_in.unwrap_or(Duration::MAX)), if wake_in.is_some() => {}
            }
        } else {
            if bird_down {
                applied.send_replace(Applied {
                    seq: want.seq,
                    bird_down: true,
                });
            }
            tokio::select! {
                changed = desired.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(RETRY_INTERVAL) => {}
            }
        }
    }
}

/// Withdraws everything a previous run announced through `target` (a restart whose config
/// announces elsewhere, or not at all), so that no route outlives the config that made it.
pub async fn retire(instance: &str, target: &Target) {
    match announce(target, &render(&target.protocol, instance, &[])).await {
        Ok(answer) => tracing::info!(
            file = %target.include_file.display(),
            bird = %answer,
            "withdrew what the previous run announced"
        ),
        Err(e) => tracing::error!(
            "withdrawing what the previous run announced through {} failed (its routes may \
             stay announced; `birdc configure` once BIRD is reachable finishes it): {e}",
            target.include_file.display()
        ),
    }
}

/// After a daemon died without withdrawing (`kill -9`, a crash), `slb stop` withdraws what it
/// had announced, as its status file names it; returns BIRD's answer and the grace to forward
/// on for. `Ok(None)` when it announced nothing.
pub fn withdraw_left_over(instance: &str) -> Result<Option<(String, Duration)>, BirdError> {
    let Some(status) = AnnounceStatus::read(instance) else {
        return Ok(None);
    };
    let text = render(&status.target.protocol, instance, &[]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| BirdError::Io {
            socket: status.target.bird_socket.clone(),
            source,
        })?;
    let answer = runtime.block_on(announce(&status.target, &text))?;
    Ok(Some((answer, status.target.withdraw_grace)))
}

/// The daemon's handle on the announcer task.
pub struct Announcer {
    desired: watch::Sender<Desired>,
    applied: watch::Receiver<Applied>,
    grace: Duration,
    task: tokio::task::JoinHandle<()>,
}

impl Announcer {
    /// Starts the task; the daemon's first [`update`](Self::update) says what to announce.
    /// `previous`: what the previous run of the instance announced, if anything (its status
    /// file): kept when it announced through the same place, else withdrawn first.
    pub fn start(instance: &str, target: Target, previous: Option<AnnounceStatus>) -> Announcer {
        let (desired, desired_rx) = watch::channel(Desired::default());
        let (applied_tx, applied) = watch::channel(Applied::default());
        let grace = target.withdraw_grace;
        let task = tokio::spawn(run(
            instance.to_owned(),
            target,
            previous,
            desired_rx,
            applied_tx,
        ));
        Announcer {
            desired,
            applied,
            grace,
            task,
        }
    }

    /// Asks for `announcements` (a no-op when they are what was asked last).
    pub fn update(&self, announcements: Vec<Announcement>) {
        self.desired.send_if_modified(|d| {
            if d.seq > 0 && d.announcements == announcements {
                return false;
            }
            d.seq += 1;
            d.announcements = announcements;
            true
        });
    }

    /// Withdraws everything, waits (up to `timeout`) until BIRD has it, then keeps serving for
    /// the configured grace while the routers move the flows elsewhere; stops the task.
    pub async fn withdraw_all(mut self, reason: &str, timeout: Duration) {
        let withdrawn: Vec<Announcement> = self
            .desired
            .borrow()
            .announcements
            .iter()
            .map(|a| Announcement {
                announced: false,
                reason: reason.to_owned(),
                ..a.clone()
            })
            .collect();
        self.update(withdrawn);
        let seq = self.desired.borrow().seq;
        let done = tokio::time::timeout(timeout, self.applied.wait_for(|a| a.seq >= seq))
            .await
            .map(|a| a.map(|a| *a));
        match done {
            Ok(Ok(Applied {
                bird_down: true, ..
            })) => tracing::warn!(
                "BIRD does not run: no route of this node is announced through it; detaching"
            ),
            Ok(Ok(_)) => {
                tracing::info!(
                    grace = %humantime::format_duration(self.grace),
                    "withdrawn from BIRD; forwarding on through the grace period"
                );
                tokio::time::sleep(self.grace).await;
            }
            _ => tracing::error!(
                "BIRD did not take the withdrawal within {}: the routers may still send traffic here",
                humantime::format_duration(timeout)
            ),
        }
        self.stop().await;
    }

    /// Stops the task, leaving the file and BIRD as they are; returns once it has stopped, so
    /// that nothing of it writes after the daemon's clean-up.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests;
