//! Bounded TCP SYN flood for the slb tests: sends SYNs with spoofed source addresses (random
//! address in `--source-cidr`, random source port, random sequence number) to `--target`, from
//! an `AF_PACKET` socket on `--interface` with a precomputed Ethernet header and `sendmmsg`.
//! Stops after `--count` packets or `--duration` seconds, whichever comes first; `--rate` caps
//! the packets per second. Prints one JSON line: sent, seconds, pps.
//!
//! Only for the test namespaces: it refuses to run in the host's network namespace, and both
//! bounds are capped.

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::unix::fs::MetadataExt as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _};
use clap::Parser;
use serde_json::json;

/// Hard caps on the bounds, whatever the command line says.
const MAX_COUNT: u64 = 10_000_000;
const MAX_DURATION_S: f64 = 120.0;

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
/// TCP header with one option (MSS), as a real client's SYN carries some.
const TCP_LEN: usize = 24;
const FRAME_LEN: usize = ETH_LEN + IP_LEN + TCP_LEN;

#[derive(Debug, Parser)]
#[command(about = "Bounded spoofed-source TCP SYN flood for the slb namespace tests")]
struct Args {
    /// Interface to send on (in the current network namespace).
    #[arg(long, default_value = "c0")]
    interface: String,
    /// Destination of the SYNs (the VIP and port).
    #[arg(long)]
    target: SocketAddrV4,
    /// Spoofed source addresses are drawn from this IPv4 CIDR.
    #[arg(long, default_value = "10.251.0.0/16")]
    source_cidr: String,
    /// Stop after this many packets.
    #[arg(long)]
    count: u64,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Packets per second at most; 0: as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Destination MAC (aa:bb:cc:dd:ee:ff); default: the ARP entry of the interface's default
    /// gateway.
    #[arg(long)]
    dst_mac: Option<String>,
    /// Packets per sendmmsg call.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Seed of the random generator (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.count <= MAX_COUNT,
        "--count {} is above the cap of {MAX_COUNT}",
        args.count
    );
    ensure!(
        args.duration > 0.0 && args.duration <= MAX_DURATION_S,
        "--duration must be in (0, {MAX_DURATION_S}] seconds"
    );
    ensure!(
        (1..=1024).contains(&args.batch),
        "--batch must be in 1..=1024"
    );
    refuse_host_namespace()?;
    let (net, prefix) = parse_cidr(&args.source_cidr)?;
    let host_mask: u32 = if prefix == 32 { 0 } else { u32::MAX >> prefix };
    let ifindex = if_index(&args.interface)?;
    let src_mac = if_mac(&args.interface)?;
    let dst_mac = match &args.dst_mac {
        Some(text) => parse_mac(text)?,
        None => gateway_mac(&args.interface)?,
    };
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let mut rng = XorShift::new(seed);

    let socket = PacketSocket::open(ifindex)?;
    let batch = args.batch;
    let mut frames = vec![[0u8; FRAME_LEN]; batch];
    for frame in &mut frames {
        frame[0..6].copy_from_slice(&dst_mac);
        frame[6..12].copy_from_slice(&src_mac);
        frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    }
    let dst_ip = *args.target.ip();
    let dst_port = args.target.port();

    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.duration);
    let mut sent: u64 = 0;
    let mut send_errors: u64 = 0;
    let mut first_error: Option<String> = None;
    while sent < args.count {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if args.rate > 0 {
            // Ahead of the schedule: wait until the next batch is due.
            let due = start + Duration::from_secs_f64(sent as f64 / args.rate as f64);
            if due > now {
                std::thread::sleep((due - now).min(deadline - now));
                continue;
            }
        }
        let n = (args.count - sent).min(batch as u64) as usize;
        for frame in &mut frames[..n] {
            let r = rng.next();
            let mut host = (r as u32) & host_mask;
            if host_mask >= 3 && (host == 0 || host == host_mask) {
                host = 1;
            }
            let src_ip = Ipv4Addr::from(net | host);
            let src_port = 1024 + ((r >> 32) as u16 % (65535 - 1024));
            let r2 = rng.next();
            write_syn(
                frame,
                src_ip,
                dst_ip,
                src_port,
                dst_port,
                r2 as u32,
                (r2 >> 32) as u16,
            );
        }
        match socket.send_batch(&frames[..n]) {
            Ok(k) => sent += k as u64,
            Err(e) => {
                // ENOBUFS and the like: the device queue is full; back off a little.
                send_errors += 1;
                if first_error.is_none() {
                    first_error = Some(e.to_string());
                }
                if send_errors > 1_000_000 {
                    bail!("giving up after {send_errors} send errors: {e}");
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({
            "sent": sent,
            "seconds": seconds,
            "pps": if seconds > 0.0 { sent as f64 / seconds } else { 0.0 },
            "send_errors": send_errors,
            "first_error": first_error,
            "interface": args.interface,
            "target": args.target.to_string(),
            "source_cidr": args.source_cidr,
        })
    );
    Ok(())
}

/// Refuses to flood from the host: the network namespace must not be PID 1's.
fn refuse_host_namespace() -> anyhow::Result<()> {
    let own = fs::metadata("/proc/self/ns/net").context("stat /proc/self/ns/net")?;
    if let Ok(init) = fs::metadata("/proc/1/ns/net") {
        ensure!(
            (own.dev(), own.ino()) != (init.dev(), init.ino()),
            "refusing to flood from the host's network namespace; run me inside a test namespace"
        );
    }
    Ok(())
}

fn parse_cidr(text: &str) -> anyhow::Result<(u32, u32)> {
    let (addr, prefix) = text
        .split_once('/')
        .with_context(|| format!("{text:?} is not a CIDR (a.b.c.d/len)"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .with_context(|| format!("bad address in {text:?}"))?;
    let prefix: u32 = prefix
        .parse()
        .with_context(|| format!("bad prefix length in {text:?}"))?;
    ensure!(
        (8..=32).contains(&prefix),
        "prefix length of {text:?} must be 8..=32"
    );
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    Ok((u32::from(addr) & mask, prefix))
}

fn parse_mac(text: &str) -> anyhow::Result<[u8; 6]> {
    let parts: Vec<u8> = text
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC address {text:?}"))?;
    parts
        .try_into()
        .map_err(|_| anyhow::anyhow!("bad MAC address {text:?}: need 6 bytes"))
}

fn if_index(name: &str) -> anyhow::Result<i32> {
    let cname = std::ffi::CString::new(name)?;
    // SAFETY: cname is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    ensure!(index != 0, "no interface {name:?} in this namespace");
    Ok(index as i32)
}

/// The interface's MAC address (SIOCGIFHWADDR).
fn if_mac(name: &str) -> anyhow::Result<[u8; 6]> {
    ensure!(name.len() < libc::IFNAMSIZ, "interface name too long");
    // SAFETY: plain socket call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: ifreq is plain data; zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: req is a valid ifreq with the name set; the kernel fills ifru_hwaddr.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    let err = std::io::Error::last_os_error();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    ensure!(rc == 0, "SIOCGIFHWADDR {name}: {err}");
    // SAFETY: SIOCGIFHWADDR filled the hwaddr member of the union.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data.iter()) {
        *m = *d as u8;
    }
    Ok(mac)
}

/// The MAC of the default gateway of `interface`, from the ARP table; pokes the gateway with a
/// UDP datagram (port 9, discard) and waits up to 2 s if the entry is missing.
fn gateway_mac(interface: &str) -> anyhow::Result<[u8; 6]> {
    let route = fs::read_to_string("/proc/net/route").context("reading /proc/net/route")?;
    let gateway = route
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[0] == interface && f[1] == "00000000")
                .then(|| u32::from_str_radix(f[2], 16).ok())
                .flatten()
        })
        .next()
        .with_context(|| format!("no default route on {interface}; give --dst-mac"))?;
    // /proc/net/route prints the address's in-memory (network order) bytes as a native u32.
    let gateway = Ipv4Addr::from(gateway.to_ne_bytes());
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut poked = false;
    loop {
        let arp = fs::read_to_string("/proc/net/arp").context("reading /proc/net/arp")?;
        for line in arp.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // IP address, HW type, Flags, HW address, Mask, Device
            if f.len() >= 6
                && f[0] == gateway.to_string()
                && f[5] == interface
                && u32::from_str_radix(f[2].trim_start_matches("0x"), 16).unwrap_or(0) & 0x2 != 0
            {
                return parse_mac(f[3]);
            }
        }
        if Instant::now() >= deadline {
            bail!("no ARP entry for gateway {gateway} on {interface}; give --dst-mac");
        }
        if !poked {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            let _ = socket.send_to(b"arp", (gateway, 9));
            poked = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Fills `frame` (Ethernet header already set) with an IPv4 TCP SYN with correct checksums.
fn write_syn(
    frame: &mut [u8; FRAME_LEN],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    seq: u32,
    ip_id: u16,
) {
    let ip = &mut frame[ETH_LEN..ETH_LEN + IP_LEN];
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2..4].copy_from_slice(&((IP_LEN + TCP_LEN) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&ip_id.to_be_bytes());
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let ip_sum = fold(sum_be16(ip, 0));
    ip[10..12].copy_from_slice(&(!ip_sum).to_be_bytes());

    let tcp = &mut frame[ETH_LEN + IP_LEN..];
    tcp[0..2].copy_from_slice(&src_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst_port.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&[0; 4]);
    tcp[12] = ((TCP_LEN / 4) as u8) << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp[16..18].copy_from_slice(&[0, 0]);
    tcp[18..20].copy_from_slice(&[0, 0]);
    tcp[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460
    let mut sum = 0u32;
    sum = sum_be16(&src.octets(), sum);
    sum = sum_be16(&dst.octets(), sum);
    sum += 6;
    sum += TCP_LEN as u32;
    sum = sum_be16(tcp, sum);
    let tcp_sum = !fold(sum);
    tcp[16..18].copy_from_slice(&tcp_sum.to_be_bytes());
}

/// Adds `data` as big-endian 16-bit words (even length) to `sum`.
fn sum_be16(data: &[u8], mut sum: u32) -> u32 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// An `AF_PACKET` raw socket bound to one interface (send only).
struct PacketSocket {
    fd: i32,
}

impl PacketSocket {
    fn open(ifindex: i32) -> anyhow::Result<Self> {
        // Protocol 0: the socket receives nothing, it only sends.
        // SAFETY: plain socket call.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        ensure!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let socket = PacketSocket { fd };
        // SAFETY: sockaddr_ll is plain data; zero is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex;
        // SAFETY: addr is a valid sockaddr_ll of the given length.
        let rc = unsafe {
            libc::bind(
                fd,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        ensure!(
            rc == 0,
            "bind AF_PACKET to ifindex {ifindex}: {}",
            std::io::Error::last_os_error()
        );
        let sndbuf: libc::c_int = 4 << 20;
        // SAFETY: setsockopt with a valid int option; failure only leaves the default.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&sndbuf as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
        Ok(socket)
    }

    /// Sends the frames with one sendmmsg; returns how many the kernel took.
    fn send_batch(&self, frames: &[[u8; FRAME_LEN]]) -> std::io::Result<usize> {
        let mut iovecs: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: FRAME_LEN,
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovecs
            .iter_mut()
            .map(|iov| {
                // SAFETY: mmsghdr is plain data; zero is valid.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: msgs point at iovecs that point at frames; all outlive the call.
        let rc = unsafe { libc::sendmmsg(self.fd, msgs.as_mut_ptr(), msgs.len() as u32, 0) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc as usize)
        }
    }
}

impl Drop for PacketSocket {
    fn drop(&mut self) {
        // SAFETY: the fd is ours.
        unsafe { libc::close(self.fd) };
    }
}
