//! `cargo xtask package`: the Debian package, `target/debian/slb_<version>-1_<arch>.deb`.
//!
//! What it contains is listed once, in slb-user's `[package.metadata.deb]`; this module builds
//! the release binary, generates the files that come from it (the man page and the shell
//! completions, from the same clap definition the binary parses with) and runs cargo-deb on the
//! result.
//!
//! cargo-deb runs as a program, installed at a pinned version under `<target>/tools` on first
//! use, rather than linked in as a library: its library API is not the interface it keeps
//! stable (the command line and the metadata table are), and linking it would add its
//! dependency tree to every `cargo xtask` build, which the other tasks do not need.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{ensure, Context as _};

use crate::tasks::target_dir;
use crate::{cargo, ensure_package_list, output, run, workspace_root};

/// The cargo-deb release `cargo xtask package` installs and uses.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// Debian packages cargo-deb needs, by the program each provides: `dpkg-shlibdeps` computes
/// the Depends line, `strip` shrinks the binary, `gzip` compresses the man page.
const PACKAGING_TOOLS: &[(&str, &str)] = &[
    ("dpkg-shlibdeps", "dpkg-dev"),
    ("strip", "binutils"),
    ("gzip", "gzip"),
];

/// Directory under `<target>/release` for the generated files; the asset paths in
/// slb-user/Cargo.toml name the same directory.
const GENERATED_DIR: &str = "slb-deb";

/// Builds the package and returns the path of the `.deb`.
pub fn package() -> anyhow::Result<PathBuf> {
    ensure_package_list(PACKAGING_TOOLS)?;
    let target = target_dir()?;
    let cargo_deb = ensure_cargo_deb(&target.join("tools"))?;
    run(cargo().args(["build", "--release", "-p", "slb-user", "--bin", "slb"]))?;
    let release = target.join("release");
    generate_from_binary(&release.join("slb"), &release.join(GENERATED_DIR))?;

    let mut deb = Command::new(&cargo_deb);
    deb.current_dir(workspace_root())
        .args(["--no-build", "-p", "slb-user", "--output"])
        .arg(target.join("debian"));
    let shown = crate::describe(&deb);
    eprintln!("xtask: running {shown}");
    // cargo-deb prints the path of the package it wrote on stdout, its progress on stderr.
    let out = deb
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start `{shown}`"))?;
    ensure!(out.status.success(), "`{shown}` failed ({})", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("`{shown}` named no .deb on stdout: {stdout:?}"))?;
    ensure!(
        path.is_file(),
        "`{shown}` named {}, which does not exist",
        path.display()
    );
    Ok(path)
}

/// Returns `<tools_root>/bin/cargo-deb`, installing [`CARGO_DEB_VERSION`] there from crates.io
/// unless that version is already there.
fn ensure_cargo_deb(tools_root: &Path) -> anyhow::Result<PathBuf> {
    let bin = tools_root.join("bin").join("cargo-deb");
    let installed = || output(Command::new(&bin).arg("--version"));
    // `cargo-deb --version` prints "cargo-deb <version>".
    let is_pinned = |v: &str| v.split_whitespace().last() == Some(CARGO_DEB_VERSION);
    if installed().is_some_and(|v| is_pinned(&v)) {
        return Ok(bin);
    }
    run(cargo()
        // Build in cargo's own temporary directory, not among the workspace's artefacts.
        .env_remove("CARGO_TARGET_DIR")
        .args(["install", "--locked", "cargo-deb", "--version"])
        .arg(format!("={CARGO_DEB_VERSION}"))
        .arg("--root")
        .arg(tools_root))?;
    let version = installed().context("cargo-deb was installed but does not run")?;
    ensure!(
        is_pinned(&version),
        "installed cargo-deb reports {version:?}, expected {CARGO_DEB_VERSION}"
    );
    Ok(bin)
}

/// Writes the man pages (`man/`, gzipped as Debian policy wants them) and the bash, zsh and fish
/// completions that `slb` generates into `dir`, replacing what an earlier run left there.
fn generate_from_binary(slb: &Path, dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let man_dir = dir.join("man");
    std::fs::create_dir_all(&man_dir).with_context(|| format!("creating {}", man_dir.display()))?;
    run(Command::new(slb).arg("manpage").arg("--dir").arg(&man_dir))?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&man_dir)
        .with_context(|| format!("reading {}", man_dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    pages.sort();
    ensure!(
        pages.iter().any(|p| p.ends_with("slb.1")),
        "`slb manpage --dir` wrote no slb.1 into {}",
        man_dir.display()
    );
    // -n: no name or time stamp in the header, so the same page compresses to the same bytes.
    run(Command::new("gzip").args(["-9", "-n", "-f"]).args(&pages))?;
    let generate = |args: &[&str], file: &str| -> anyhow::Result<()> {
        let out = Command::new(slb)
            .args(args)
            .output()
            .with_context(|| format!("running {} {}", slb.display(), args.join(" ")))?;
        ensure!(
            out.status.success() && !out.stdout.is_empty(),
            "`slb {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let path = dir.join(file);
        std::fs::write(&path, &out.stdout).with_context(|| format!("writing {}", path.display()))
    };
    generate(&["completions", "bash"], "slb.bash")?;
    generate(&["completions", "zsh"], "_slb")?;
    generate(&["completions", "fish"], "slb.fish")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Builds the package the way `cargo xtask package` does, unpacks it and checks what an
    //! operator would get from `apt install`.

    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt as _;
    use std::time::Instant;

    use super::*;

    /// Where the man pages are; the package holds slb.1.gz and one page per subcommand.
    const MAN_DIR: &str = "./usr/share/man/man1/";

    /// Every other file the package holds, with its mode as `dpkg-deb -c` shows it.
    const EXPECTED_FILES: &[(&str, &str)] = &[
        ("./usr/bin/slb", "-rwxr-xr-x"),
        ("./usr/share/bash-completion/completions/slb", "-rw-r--r--"),
        ("./usr/share/zsh/vendor-completions/_slb", "-rw-r--r--"),
        (
            "./usr/share/fish/vendor_completions.d/slb.fish",
            "-rw-r--r--",
        ),
        ("./etc/slb/slb.toml", "-rw-r--r--"),
        ("./usr/lib/systemd/system/slb.service", "-rw-r--r--"),
        ("./usr/lib/tmpfiles.d/slb.conf", "-rw-r--r--"),
        ("./usr/share/doc/slb/README.md", "-rw-r--r--"),
        ("./usr/share/doc/slb/copyright", "-rw-r--r--"),
    ];

    /// Files of `dpkg-deb -c`: path → (mode, owner).
    type Listing<'a> = BTreeMap<&'a str, (&'a str, &'a str)>;

    /// Runs `program args` and returns its stdout; panics with its output if it fails.
    fn stdout_of(program: &str, args: &[&str]) -> String {
        stdout_of_cmd(Command::new(program).args(args))
    }

    fn stdout_of_cmd(cmd: &mut Command) -> String {
        let shown = crate::describe(cmd);
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run `{shown}`: {e}"));
        assert!(
            out.status.success(),
            "`{shown}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap_or_else(|e| panic!("`{shown}`: not UTF-8: {e}"))
    }

    /// The subcommands `slb --help` lists under "Commands:", except clap's own `help`.
    fn subcommands(help: &str) -> Vec<String> {
        help.lines()
            .skip_while(|l| !l.starts_with("Commands:"))
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|name| *name != "help")
            .map(str::to_owned)
            .collect()
    }

    /// The values of `key=` lines in a unit file.
    fn unit_values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
        unit.lines()
            .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
            .collect()
    }

    #[test]
    fn debian_package_installs_a_verifiable_service() {
        let started = Instant::now();
        let deb = package().expect("cargo xtask package");
        println!(
            "built {} ({} bytes) in {:.1?}",
            deb.display(),
            std::fs::metadata(&deb).unwrap().len(),
            started.elapsed()
        );
        let deb_arg = deb.to_str().expect("UTF-8 path");

        // Contents: exactly the expected files, owned by root (uid/gid 0/0), with their modes.
        let listing = stdout_of("dpkg-deb", &["-c", deb_arg]);
        println!("dpkg-deb -c:\n{listing}");
        let (man_pages, files): (Listing, Listing) = listing
            .lines()
            .filter(|l| !l.starts_with('d'))
            .map(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                assert!(fields.len() >= 6, "unexpected dpkg-deb -c line: {l}");
                (fields[5], (fields[0], fields[1]))
            })
            .partition(|(path, _)| path.starts_with(MAN_DIR));
        let expected: Listing = EXPECTED_FILES
            .iter()
            .map(|&(path, mode)| (path, (mode, "0/0")))
            .collect();
        assert_eq!(files, expected, "files in the package (mode, owner)");
        for (path, mode_owner) in &man_pages {
            let name = path.strip_prefix(MAN_DIR).unwrap();
            assert!(
                (name == "slb.1.gz" || name.starts_with("slb-")) && name.ends_with(".1.gz"),
                "unexpected man page {path}"
            );
            assert_eq!(*mode_owner, ("-rw-r--r--", "0/0"), "{path}");
        }

        // Control fields.
        let field = |name: &str| {
            stdout_of("dpkg-deb", &["-f", deb_arg, name])
                .trim()
                .to_owned()
        };
        assert_eq!(field("Package"), "slb");
        let version = field("Version");
        assert!(
            version.starts_with(&format!("{}-", env!("CARGO_PKG_VERSION"))),
            "Version {version:?} is not the workspace version {}",
            env!("CARGO_PKG_VERSION")
        );
        let arch = stdout_of("dpkg", &["--print-architecture"]);
        assert_eq!(field("Architecture"), arch.trim());
        let depends = field("Depends");
        assert!(
            depends
                .split(',')
                .any(|d| d.trim().starts_with("libc6 (>=")),
            "Depends should hold a versioned libc6, from the binary's symbols: {depends:?}"
        );
        assert_eq!(field("Section"), "net");
        let description = field("Description");
        assert_eq!(
            description.lines().next(),
            Some("eBPF/XDP server load balancer"),
            "the synopsis, from slb-user's description: {description:?}"
        );
        let conffiles = stdout_of("dpkg-deb", &["-I", deb_arg, "conffiles"]);
        assert_eq!(
            conffiles.lines().collect::<Vec<_>>(),
            ["/etc/slb/slb.toml"],
            "conffiles"
        );
        // The maintainer scripts cargo-deb generated: /var/log/slb from tmpfiles.d when the
        // package is configured, the unit neither enabled nor started on install, restarted
        // (if it runs) after an upgrade, stopped on removal.
        let postinst = stdout_of("dpkg-deb", &["-I", deb_arg, "postinst"]);
        for line in [
            "systemd-tmpfiles --create slb.conf",
            "deb-systemd-helper update-state slb.service",
            "deb-systemd-invoke try-restart slb.service",
        ] {
            assert!(
                postinst.contains(line),
                "postinst lacks {line:?}:\n{postinst}"
            );
        }
        assert!(
            !postinst.contains("deb-systemd-invoke start")
                && !postinst.contains("_dh_action=start"),
            "postinst starts the service on install:\n{postinst}"
        );
        let prerm = stdout_of("dpkg-deb", &["-I", deb_arg, "prerm"]);
        assert!(
            prerm.contains("\"$1\" = remove")
                && prerm.contains("deb-systemd-invoke stop slb.service"),
            "prerm should stop the service on removal only:\n{prerm}"
        );

        // Unpack.
        let root = tempfile::tempdir().expect("temporary directory");
        let root_path = root.path();
        stdout_of_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root_path));
        for (path, mode) in EXPECTED_FILES {
            let file = root_path.join(path);
            let meta = std::fs::metadata(&file)
                .unwrap_or_else(|e| panic!("{} after dpkg-deb -x: {e}", file.display()));
            let want = if mode.starts_with("-rwx") {
                0o755
            } else {
                0o644
            };
            assert_eq!(
                meta.permissions().mode() & 0o7777,
                want,
                "mode of {}",
                file.display()
            );
        }
        let slb = root_path.join("usr/bin/slb");
        let version_line = stdout_of_cmd(Command::new(&slb).arg("--version"));
        assert_eq!(
            version_line.trim(),
            format!("slb {}", env!("CARGO_PKG_VERSION")),
            "the packaged binary's --version"
        );
        let commands = subcommands(&stdout_of_cmd(Command::new(&slb).arg("--help")));
        println!("subcommands: {commands:?}");
        for expected in [
            "run",
            "check-config",
            "status",
            "stop",
            "manpage",
            "completions",
        ] {
            assert!(
                commands.iter().any(|c| c == expected),
                "slb --help lists no {expected}: {commands:?}"
            );
        }

        // The config skeleton is a valid config, for the instance the CLI uses by default.
        let config = root_path.join("etc/slb/slb.toml");
        let checked = stdout_of_cmd(Command::new(&slb).arg("check-config").arg(&config));
        println!("slb check-config: {}", checked.trim());
        assert!(
            checked.contains(": ok — instance")
                && checked.contains("\"default\"")
                && checked.contains("1 listener(s)")
                && checked.contains("1 interface(s)"),
            "check-config of the skeleton: {checked}"
        );

        // The man pages: roff that man renders without warnings; slb(1) lists every
        // subcommand, and the page it refers to for each is in the package.
        ensure_package_list(&[("man", "man-db")]).expect("install man");
        let mut rendered_pages = BTreeMap::new();
        for path in man_pages.keys() {
            let page = root_path.join(path);
            let roff = stdout_of_cmd(Command::new("gzip").arg("-dc").arg(&page));
            assert!(roff.contains(".TH slb"), "{path}: no .TH slb header");
            let mut man = Command::new("man");
            // The C locale renders hyphens as ASCII.
            man.env("MANWIDTH", "100")
                .env("LC_ALL", "C")
                .args(["--warnings", "-P", "cat", "-l"])
                .arg(&page);
            let out = man.output().expect("run man -l");
            let warnings = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "man -l {path} failed ({}): {warnings}",
                out.status
            );
            assert!(
                warnings.trim().is_empty(),
                "man -l {path} warns:\n{warnings}"
            );
            let name = path
                .strip_prefix(MAN_DIR)
                .unwrap()
                .trim_end_matches(".1.gz");
            rendered_pages.insert(name, String::from_utf8_lossy(&out.stdout).into_owned());
        }
        println!("man pages: {:?}", rendered_pages.keys().collect::<Vec<_>>());
        let main_page = rendered_pages.get("slb").expect("slb.1.gz in the package");
        assert!(
            main_page.contains("NAME") && main_page.contains("slb - eBPF/XDP server load balancer"),
            "slb(1) has no NAME section for slb:\n{main_page}"
        );
        for command in &commands {
            assert!(
                main_page.contains(&format!("slb-{command}(1)")),
                "slb(1)'s SUBCOMMANDS do not list {command}"
            );
            let page = rendered_pages
                .get(format!("slb-{command}").as_str())
                .unwrap_or_else(|| panic!("slb(1) refers to slb-{command}(1), not in the package"));
            assert!(
                page.contains(&format!("slb-{command}")),
                "slb-{command}(1) does not name itself:\n{page}"
            );
        }

        // Completions, in the place each shell looks, complete every subcommand.
        for (path, marker) in [
            (
                "usr/share/bash-completion/completions/slb",
                "complete -F _slb",
            ),
            ("usr/share/zsh/vendor-completions/_slb", "#compdef slb"),
            (
                "usr/share/fish/vendor_completions.d/slb.fish",
                "complete -c slb",
            ),
        ] {
            let text = std::fs::read_to_string(root_path.join(path)).expect(path);
            assert!(text.contains(marker), "{path} lacks {marker:?}");
            for command in &commands {
                assert!(
                    text.contains(command.as_str()),
                    "{path} does not complete {command}"
                );
            }
        }

        // /var/log/slb: the postinst's `systemd-tmpfiles --create slb.conf`, run on the
        // unpacked tree, finds the packaged entry and creates the directory.
        stdout_of_cmd(
            Command::new("systemd-tmpfiles")
                .arg("--create")
                .arg(format!("--root={}", root_path.display()))
                .arg("slb.conf"),
        );
        let log_dir = root_path.join("var/log/slb");
        let meta = std::fs::metadata(&log_dir).expect("systemd-tmpfiles created var/log/slb");
        assert!(meta.is_dir());
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            0o750,
            "mode of /var/log/slb"
        );

        // The packaged unit runs the packaged binary on the packaged config, may write to the
        // log directory, and systemd-analyze verify accepts it inside the unpacked tree.
        let unit_path = root_path.join("usr/lib/systemd/system/slb.service");
        let unit = std::fs::read_to_string(&unit_path).expect("read the unit");
        assert_eq!(
            unit_values(&unit, "Environment"),
            ["SLB_CONFIG=/etc/slb/slb.toml"]
        );
        for key in ["ExecStartPre", "ExecStart"] {
            let values = unit_values(&unit, key);
            assert!(
                values.len() == 1 && values[0].starts_with("/usr/bin/slb "),
                "{key} should run the packaged /usr/bin/slb: {values:?}"
            );
        }
        let writable = unit_values(&unit, "ReadWritePaths");
        assert!(
            writable.len() == 1 && writable[0].split_whitespace().any(|p| p == "/var/log/slb"),
            "ReadWritePaths should hold /var/log/slb: {writable:?}"
        );
        verify_unit(&unit, &slb);

        balance_with(&slb);
    }

    /// The packaged (release, stripped) binary loads the XDP program embedded in it and
    /// balances TCP connections over two backends in network namespaces.
    fn balance_with(slb: &Path) {
        slb_tests::require_root("debian_package_installs_a_verifiable_service");
        run(cargo().args(["build", "-p", "slb-tests", "--bin", "slb-test-server"]))
            .expect("build the test backend server");
        let server = target_dir()
            .expect("target directory")
            .join("debug")
            .join("slb-test-server");
        let topo = slb_tests::Topology::builder()
            .tag("deb")
            .backends(2)
            .test_servers(&server)
            .build()
            .expect("create the namespaces");
        let config =
            slb_tests::SlbConfig::standard(&slb_tests::slb::unique_instance("deb"), &[1, 1]);
        let daemon = slb_tests::SlbDaemon::start(slb, topo.slb_ns(), &config)
            .expect("start the packaged slb");
        let report = slb_tests::traffic::tcp_connections(
            topo.client_ns(),
            slb_tests::vip_tcp(),
            &slb_tests::TrafficOptions::new(200),
        )
        .expect("TCP connections through the packaged slb");
        println!("{}", report.summary("packaged slb, TCP"));
        let exit = daemon.stop().expect("stop the packaged slb");
        assert!(
            report.failures.is_empty() && report.answered() == 200,
            "{}",
            report.summary("packaged slb, TCP")
        );
        assert_eq!(
            report.counts.len(),
            2,
            "both backends should get connections: {:?}",
            report.counts
        );
        assert!(exit.success(), "the packaged slb exited with {exit}");
    }

    /// `systemd-analyze verify` on the packaged unit with `/usr/bin/slb` pointing at the unpacked
    /// binary (`--root` on the unpacked tree would also need the host's targets and `kill`).
    fn verify_unit(unit: &str, slb: &Path) {
        let slb = slb.to_str().expect("UTF-8 path");
        let dir = tempfile::tempdir().expect("temporary directory");
        let unit_path = dir.path().join("slb.service");
        let rewritten = unit.replace("/usr/bin/slb", slb);
        assert_eq!(
            rewritten.matches(slb).count(),
            2,
            "ExecStartPre and ExecStart should be the only mentions of /usr/bin/slb"
        );
        std::fs::write(&unit_path, &rewritten).expect("write the unit");
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit_path)
            .output()
            .expect("run systemd-analyze verify");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!(
            "systemd-analyze verify: {} with output {text:?}",
            out.status
        );
        assert!(
            out.status.success(),
            "systemd-analyze verify failed:\n{text}"
        );
        let about_unit: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("slb.service") || l.contains(dir.path().to_str().unwrap()))
            .collect();
        assert!(
            about_unit.is_empty(),
            "systemd-analyze verify complains about the unit:\n{}",
            about_unit.join("\n")
        );
    }
}
