//! What `slb run` keeps on disk (state, lock, socket, history) is root's alone, as the systemd
//! unit's `UMask=0077` implies, also when it is run by hand from a shell with umask 022; other
//! users are told what slb needs; a log that is not a terminal gets no colour codes.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use slb_tests::slb::{slb_binary, unique_instance};
use slb_tests::{require_root, SlbConfig, SlbDaemon, Topology};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn the_state_directory_and_its_files_are_private() {
    if !require_root("the_state_directory_and_its_files_are_private") {
        return;
    }
    let topo = Topology::builder()
        .tag("perm")
        .backends(1)
        .build()
        .expect("create topology");
    let config = SlbConfig::standard(&unique_instance("perm"), &[1]);
    let dir = Path::new("/run/slb").join(&config.instance);
    // A directory left world-readable by an earlier run is closed too.
    std::fs::create_dir_all(&dir).expect("state dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let daemon = SlbDaemon::start(&slb_binary(), topo.slb_ns(), &config).expect("start slb");
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
