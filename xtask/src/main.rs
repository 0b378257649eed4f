//! Project tasks: `cargo xtask setup | test | demo | bench | package`.

// Everything but `setup` needs slb-tests, whose slb-user dependency builds the eBPF program
// with what `setup` installs; so `cargo xtask` first builds without them (feature `full` off),
// sets up, and runs itself again with them.
#[cfg(feature = "full")]
mod bench;
#[cfg(feature = "full")]
mod demo;
#[cfg(feature = "full")]
mod package;
#[cfg(feature = "full")]
mod scale_out_demo;
#[cfg(feature = "full")]
mod tasks;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context as _};

#[cfg(feature = "full")]
fn main() -> anyhow::Result<()> {
    tasks::main()
}

/// Sets up, then runs `cargo xtask ARGS` again built with every task (the first build can hold
/// only `setup`: see the modules above).
#[cfg(not(feature = "full"))]
fn main() -> anyhow::Result<()> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let asks_help = args.is_empty()
        || args
            .iter()
            .any(|a| a == "-h" || a == "--help" || a == "help");
    if !asks_help {
        setup()?;
        if args.first().is_some_and(|a| a == "setup") {
            return Ok(());
        }
    }
    let status = cargo()
        .args([
            "run",
            "--quiet",
            "--package",
            "xtask",
            "--features",
            "full",
            "--",
        ])
        .args(&args)
        .status()
        .context("cannot start cargo to run the tasks")?;
    std::process::exit(status.code().unwrap_or(1));
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// The cargo that runs us (`cargo xtask` sets `CARGO`), else the one on PATH.
pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs `cmd` with inherited output; a failure names the command.
pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = describe(cmd);
    eprintln!("xtask: running {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{shown}`"))?;
    ensure!(status.success(), "`{shown}` failed ({status})");
    Ok(())
}

/// Runs `cmd` quietly and returns its trimmed stdout if it succeeded.
pub(crate) fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub(crate) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---- setup ----

pub(crate) fn setup() -> anyhow::Result<()> {
    let sysroot = ensure_nightly_rust_src()?;
    ensure_bpf_linker(&sysroot)?;
    ensure_packages()?;
    Ok(())
}

/// Makes sure the nightly toolchain (which aya-build uses to build the eBPF program) has
/// rust-src, and returns its sysroot.
fn ensure_nightly_rust_src() -> anyhow::Result<PathBuf> {
    let sysroot = || output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]));
    let sysroot = match sysroot() {
        Some(s) => PathBuf::from(s),
        None => {
            run(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))?;
            PathBuf::from(sysroot().context("rustc +nightly still does not run")?)
        }
    };
    if !sysroot.join("lib/rustlib/src").is_dir() {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(sysroot)
}

/// Installs bpf-linker against the LLVM that ships with the nightly toolchain, unless a working
/// one is already on PATH.
fn ensure_bpf_linker(nightly_sysroot: &Path) -> anyhow::Result<()> {
    if output(Command::new("bpf-linker").arg("--version")).is_some() {
        return Ok(());
    }
    let lib_dir = nightly_sysroot.join("lib");
    let mut libs: Vec<PathBuf> = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(OsStr::to_str)
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .collect();
    libs.sort();
    let Some(llvm) = libs.pop() else {
        bail!("no libLLVM.so.* in {}", lib_dir.display());
    };
    let versioned = llvm
        .file_name()
        .and_then(OsStr::to_str)
        .context("non-UTF-8 libLLVM name")?
        .to_owned();
    // libLLVM.so.22.1-rust-1.97.0-nightly -> 22
    let major = versioned
        .trim_start_matches("libLLVM.so.")
        .split(['.', '-'])
        .next()
        .filter(|m| !m.is_empty() && m.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("cannot read the LLVM major version from {versioned}"))?
        .to_owned();

    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = Path::new(&home).join(".cache/slb/llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for name in ["libLLVM.so", versioned.as_str()] {
        let link = prefix_lib.join(name);
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&llvm, &link)
            .with_context(|| format!("linking {} to {}", link.display(), llvm.display()))?;
    }
    run(cargo()
        .env("LLVM_PREFIX", &prefix)
        .args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}")))?;
    ensure!(
        output(Command::new("bpf-linker").arg("--version")).is_some(),
        "bpf-linker was installed but does not run (is ~/.cargo/bin on PATH?)"
    );
    Ok(())
}

/// Debian packages the tests and the demo use, by the binary each provides.
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("ping", "iputils-ping"),
    ("bpftool", "bpftool"),
    // The scale-out tests and demo run BIRD on the router and on every slb node.
    ("bird", "bird2"),
    ("nft", "nftables"),
];

fn ensure_packages() -> anyhow::Result<()> {
    ensure_package_list(PACKAGES)
}

pub(crate) fn ensure_package_list(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(bin, _)| find_program(bin).is_none())
        .map(|&(_, pkg)| pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let install = || {
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing))
    };
    if install().is_err() {
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .arg("update"))?;
        install().with_context(|| format!("installing {}", missing.join(" ")))?;
    }
    Ok(())
}

/// Looks `name` up on PATH and in the sbin directories, which a non-login PATH may lack.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}
