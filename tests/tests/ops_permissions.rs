//! What `slb run` keeps on disk (state, lock, socket, history) is root's alone, as the systemd
//! unit's `UMask=0077` implies, also when it is run by hand from a shell with umask 022; other
//! users are told what slb needs; a log that is not a terminal gets no colour codes; the daemon
//! takes all the file descriptors the hard limit allows.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use slb_tests::slb::{slb_binary, state_dir, unique_instance};
use slb_tests::{require_root, SlbConfig, SlbDaemon, Topology};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Lowers this process's soft limit on open files (its children inherit it); returns the hard one.
fn lower_soft_descriptor_limit(soft: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        let lowered = libc::rlimit {
            rlim_cur: soft.min(limit.rlim_max),
            rlim_max: limit.rlim_max,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lowered), 0);
    }
    limit.rlim_max
}

#[test]
fn the_daemon_keeps_its_files_private_and_raises_its_descriptor_limit() {
    require_root("the_daemon_keeps_its_files_private_and_raises_its_descriptor_limit");
    let topo = Topology::builder()
        .tag("perm")
        .backends(1)
        .build()
        .expect("create topology");
    let config = SlbConfig::standard(&unique_instance("perm"), &[1]);
    let dir = state_dir(&config.instance);
    // A directory left world-readable by an earlier run is closed too.
    std::fs::create_dir_all(&dir).expect("state dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // Started with a soft limit on open files below the hard one, as a login shell has it.
    let hard = lower_soft_descriptor_limit(256);
    let daemon = SlbDaemon::start(&slb_binary(), topo.slb_ns(), &config).expect("start slb");
    let pid = daemon.pid().expect("daemon pid");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let soft: u64 = open_files
        .split_whitespace()
        .nth(3)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        soft, hard,
        "the daemon raised its soft limit to the hard one: {open_files}"
    );
    assert!(daemon.log().contains("file descriptor budget"));
    assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    for entry in std::fs::read_dir(&dir).expect("read state dir") {
        let path = entry.expect("entry").path();
        let m = mode(&path);
        assert_eq!(m & 0o077, 0, "{} is mode {m:o}", path.display());
    }
    assert!(dir.join("state.json").exists());

    // Someone else is told what slb needs, not only "Permission denied".
    let as_nobody = |args: &[&str]| {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(slb_binary())
            .args(args)
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("run slb as nobody");
        assert!(!out.status.success(), "slb {args:?} as nobody succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = as_nobody(&["status", "-i", &config.instance]);
    assert!(e.contains("slb needs root"), "{e}");
    let file = std::env::temp_dir().join(format!("{}.toml", config.instance));
    std::fs::write(&file, config.to_toml()).expect("write config");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let e = as_nobody(&["run", "-c", file.to_str().expect("utf-8")]);
    let _ = std::fs::remove_file(&file);
    assert!(e.contains("slb needs root"), "{e}");
    // Its log goes to a file here: no colour codes in it.
    let log = daemon.log();
    assert!(log.contains("INFO") && !log.contains('\u{1b}'), "{log}");
    daemon.stop().expect("stop slb");
}
