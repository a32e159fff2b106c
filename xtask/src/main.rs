//! Project automation: `cargo xtask ci | backup | bench | demo`.
//!
//! `ci` is what `.ci/run` runs: it installs what the tests need on a fresh
//! Debian machine (as root), then checks formatting, lints with warnings
//! denied, and runs every test against the real parts (MYSNAP_REAL=1, where a
//! missing prerequisite fails a test instead of skipping it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  demo                    a full backup and restore round trip on a loop-backed volume (root)
  ci                      install test prerequisites when missing, then fmt, clippy and all tests
  backup --config PATH    snapshotter, then archiver (a full backup)
  bench [--size 1GiB] [--runs 3] [--lock-runs 10]
                          measure backups against the hardware's limits (root);
                          writes target/bench/report.md
";

/// Debian packages the tests need, each with a command that shows it is there.
const PACKAGES: &[(&str, &str)] = &[
    ("mariadb-server", "mariadbd"),
    ("mariadb-client", "mariadb"),
    ("sysbench", "sysbench"),
    ("btrfs-progs", "mkfs.btrfs"),
    ("xfsprogs", "mkfs.xfs"),
    ("zstd", "zstd"),
    ("xz-utils", "xz"),
    ("util-linux", "losetup"),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("demo") => demo(),
        Some("backup") => backup(&args[1..]),
        Some("bench") => bench(&args[1..]),
        _ => {
            eprint!("{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args([
            "-c",
            "command -v \"$1\" >/dev/null || [ -x \"/usr/sbin/$1\" ] || [ -x \"/sbin/$1\" ]",
            "sh",
            cmd,
        ])
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// Installs the missing Debian packages (needs root).
fn install_prerequisites() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, cmd)| !have(cmd))
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "the tests need {} (missing); run as root, or install them: apt-get install {}",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn ci() -> anyhow::Result<()> {
    install_prerequisites()?;
    if !is_root() {
        bail!("the end-to-end tests need root (loop devices, mount, btrfs); run cargo xtask ci as root");
    }
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    run(cargo()
        .args(["test", "--workspace"])
        .env("MYSNAP_REAL", "1"))?;
    eprintln!("xtask: ci passed");
    Ok(())
}

/// Release builds of the programs and the demo driver, then the demo.
fn demo() -> anyhow::Result<()> {
    install_prerequisites()?;
    if !is_root() {
        bail!("the demo needs root (loop devices, mount, btrfs): run cargo xtask demo as root");
    }
    run(cargo().args(["build", "--release", "--bins", "-p", "snapshotter", "-p", "archiver", "-p", "restorer", "-p", "mysnap-tests"]))?;
    let release = root().join("target/release");
    run(Command::new(release.join("mysnap-demo")).arg("--bin-dir").arg(&release))
}

/// Release builds of the programs and the bench driver, then the bench.
fn bench(args: &[String]) -> anyhow::Result<()> {
    install_prerequisites()?;
    run(cargo().args([
        "build",
        "--release",
        "--bins",
        "-p",
        "snapshotter",
        "-p",
        "archiver",
        "-p",
        "mysnap-tests",
    ]))?;
    let release = root().join("target/release");
    run(Command::new(release.join("mysnap-bench"))
        .arg("--bin-dir")
        .arg(&release)
        .arg("--out")
        .arg(root().join("target/bench"))
        .args(args))
}

fn bin(name: &str) -> PathBuf {
    root().join("target/debug").join(name)
}

/// snapshotter | archiver, as the contract composes them.
fn backup(args: &[String]) -> anyhow::Result<()> {
    run(cargo().args([
        "build",
        "--quiet",
        "--bins",
        "-p",
        "snapshotter",
        "-p",
        "archiver",
    ]))?;
    let snap = Command::new(bin("snapshotter"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()?;
    if !snap.status.success() {
        std::process::exit(snap.status.code().unwrap_or(1));
    }
    let manifest = String::from_utf8(snap.stdout)?.trim().to_string();
    let status = Command::new(bin("archiver"))
        .args(args)
        .args(["--manifest", &manifest])
        .status()?;
    std::process::exit(status.code().unwrap_or(1));
}
