//! Project automation: `cargo xtask ci | backup | bench | demo`.
//!
//! `ci` is what `.ci/run` runs: it installs what the tests need on a fresh
//! Debian machine (as root), then checks formatting, lints with warnings
//! denied, and runs every test against the real parts (MYSNAP_REAL=1, where a
//! missing prerequisite fails a test instead of skipping it).
//!
//! Every command installs only the Debian packages its own code runs, quietly
//! (one line per set; apt's output goes to `target/xtask-install.log`, shown
//! when it fails), and every release build is the one a user types,
//! `cargo build --release --workspace --bins`, so `demo`, `bench` and a
//! user's release build share one set of artifacts.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  demo                    a full backup and restore round trip on a loop-backed volume (root)
  ci                      install test prerequisites when missing, then fmt, clippy, all tests, vm-test
  vm-test                 the LVM end to end test (volprep, backup, restore, overflow) in a
                          virtme-ng VM (root; software emulation, several minutes)
  backup --config PATH    snapshotter, then archiver (a full backup)
  bench [--size 1GiB] [--runs 3] [--lock-runs 10] [--scale 4]
                          mysnap vs mariabackup, mysqldump, mydumper and the
                          hardware limits, 1× and 4× the data (root);
                          writes target/bench/report.{md,json} and bench.png
  install-extras [--prefix /usr/local] [--bin-dir DIR]
                          man pages and bash/zsh/fish completions of the four programs
                          (found on PATH, or in DIR) into <prefix>/share (root for /usr/local)
";

/// Debian packages, each with a command (or file) that shows it is there.
type Packages = &'static [(&'static str, &'static str)];

/// A MariaDB with sysbench data on a btrfs loop volume: what the demo runs,
/// and the base of the bench and the tests.
const SERVER_PACKAGES: Packages = &[
    ("mariadb-server", "mariadbd"),
    ("mariadb-client", "mariadb"),
    ("sysbench", "sysbench"),
    ("btrfs-progs", "mkfs.btrfs"),
    ("util-linux", "losetup"),
];

/// What the tests run besides (xfs and ext4 volumes, the zstd and xz tools).
const TEST_PACKAGES: Packages = &[
    ("xfsprogs", "mkfs.xfs"),
    ("zstd", "zstd"),
    ("xz-utils", "xz"),
];

/// The LVM test's VM (vm-test); the kernel is checked for separately.
const VM_PACKAGES: Packages = &[
    ("lvm2", "lvcreate"),
    ("qemu-system-x86", "qemu-system-x86_64"),
    // virtme-ng's init needs a static busybox: Debian's dynamic `busybox`
    // (on many machines already) puts a `busybox` on PATH all the same.
    ("busybox-static", "/usr/share/doc/busybox-static"),
];

/// What `cargo xtask bench` runs besides the server: the limits' zstd, the
/// peers, curl and the AWS CLI (the S3 limits), the chart's font.
const BENCH_PACKAGES: Packages = &[
    ("zstd", "zstd"),
    ("mariadb-backup", "mariabackup"),
    ("mydumper", "mydumper"),
    ("curl", "curl"),
    ("awscli", "aws"),
    (
        "fonts-dejavu-core",
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    ),
];

/// Where apt's and pip's output goes; printed only when they fail.
const INSTALL_LOG: &str = "target/xtask-install.log";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("vm-test") => vm_test(),
        Some("demo") => demo(),
        Some("backup") => backup(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("install-extras") => install_extras(&args[1..]),
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

/// Cargo's target directory: `CARGO_TARGET_DIR` when set, else `target`.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => std::env::current_dir().unwrap_or_default().join(d),
        None => root().join("target"),
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = shown(cmd);
    eprintln!("xtask: running {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn have(cmd: &str) -> bool {
    if cmd.starts_with('/') {
        return Path::new(cmd).exists();
    }
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

/// Installs what the tests and vm-test need (`ci`, `vm-test`; needs root):
/// every package set, the kernel image for the VM, and virtme-ng.
fn install_prerequisites() -> anyhow::Result<()> {
    let mut missing = missing(&[SERVER_PACKAGES, TEST_PACKAGES, VM_PACKAGES]);
    if vm_kernel().is_none() {
        missing.push("linux-image-amd64");
    }
    install_packages("the tests", &missing)?;
    install_virtme_ng()
}

/// The packages of `sets` whose command (or file) is not there, each once.
fn missing(sets: &[Packages]) -> Vec<&'static str> {
    let mut missing = Vec::new();
    for (p, cmd) in sets.iter().copied().flatten() {
        if !missing.contains(p) && !have(cmd) {
            missing.push(*p);
        }
    }
    missing
}

/// Installs `missing` with apt-get (root), on one line of output; apt's own
/// output goes to [`INSTALL_LOG`] and is shown only when it fails.
fn install_packages(what: &str, missing: &[&str]) -> anyhow::Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "{what}: missing {}; run as root, or install them: apt-get install {}",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let log = install_log()?;
    quiet(Command::new("apt-get").args(["update", "-qq"]), &log)?;
    quiet(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        &log,
    )
}

/// [`INSTALL_LOG`], emptied.
fn install_log() -> anyhow::Result<PathBuf> {
    let log = root().join(INSTALL_LOG);
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(&log, "").with_context(|| format!("cannot write {}", log.display()))?;
    Ok(log)
}

/// Runs `cmd` with its output appended to `log`; when it fails, prints the
/// log and names it in the error.
fn quiet(cmd: &mut Command, log: &Path) -> anyhow::Result<()> {
    let open = || {
        std::fs::OpenOptions::new()
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))
    };
    let status = cmd
        .stdin(Stdio::null())
        .stdout(open()?)
        .stderr(open()?)
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        eprint!("{}", std::fs::read_to_string(log).unwrap_or_default());
        bail!(
            "{cmd:?} failed ({status}); its output is above and in {}",
            log.display()
        );
    }
    Ok(())
}

/// `vng` (virtme-ng, from PyPI) boots the host's kernel and root filesystem in a VM.
fn install_virtme_ng() -> anyhow::Result<()> {
    if vng().is_some() {
        return Ok(());
    }
    eprintln!("xtask: installing virtme-ng (pip)");
    let log = install_log()?;
    let pip = |extra: &[&str]| {
        quiet(
            Command::new("python3")
                .args(["-m", "pip", "install", "-q", "virtme-ng"])
                .args(extra),
            &log,
        )
    };
    if pip(&[]).is_err() {
        // Debian's own python refuses without this; the VM tools live outside any venv.
        pip(&["--break-system-packages"])?;
    }
    vng()
        .map(|_| ())
        .context("pip installed virtme-ng, but `vng` is not on PATH")
}

/// The `vng` program: on PATH, else in python's scripts directory.
fn vng() -> Option<PathBuf> {
    if have("vng") {
        return Some(PathBuf::from("vng"));
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("vng");
    p.is_file().then_some(p)
}

/// The newest Debian kernel in /boot (`vmlinuz-*-amd64`).
fn vm_kernel() -> Option<PathBuf> {
    let mut k: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-amd64"))
        })
        .collect();
    k.sort();
    k.pop()
}

/// The LVM end to end test in a virtme-ng VM: tests/vm/inside.sh with the
/// host's target/debug binaries. Fails (never skips) when the VM cannot boot.
///
/// A step that hangs inside the VM is ended by the script's own watchdog,
/// which writes a diagnosis. A VM that stops responding altogether (its
/// heartbeat file no longer changes: a guest kernel or file-sharing stall
/// under software emulation, where nothing inside can report) is killed and
/// run once more, saying so; any other failure fails at once.
fn vm_test() -> anyhow::Result<()> {
    install_prerequisites()?;
    if !is_root() {
        bail!("vm-test needs root (the VM runs LVM as root): run cargo xtask vm-test as root");
    }
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    if let VmEnd::Unresponsive(why) = vm_run()? {
        eprintln!("xtask: vm-test: {why}; running the VM test once more");
        if let VmEnd::Unresponsive(why) = vm_run()? {
            bail!("vm-test failed: {why}, twice in a row; the VM's output is above");
        }
    }
    Ok(())
}

/// How a VM run that did not fail a step ended.
enum VmEnd {
    /// The VM ran the test to its end and it passed.
    Exited,
    /// The VM stopped responding and was killed: why, and the step.
    Unresponsive(String),
}

/// The VM's heartbeat (tests/vm/inside.sh counts in it every 5 s): a VM
/// whose heartbeat has not changed for this long has stopped responding.
const VM_STALL: std::time::Duration = std::time::Duration::from_secs(300);
/// The whole run, boot included; the script's watchdog ends a hung step at
/// 1500 s after the script starts.
const VM_DEADLINE: std::time::Duration = std::time::Duration::from_secs(1800);

/// Copies `from` to this process's stderr, in a thread of its own.
fn echo(mut from: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut std::io::stderr());
    })
}

/// One boot of the VM running the test. Err when a step failed.
fn vm_run() -> anyhow::Result<VmEnd> {
    use std::time::{Duration, Instant};
    let kernel =
        vm_kernel().context("no /boot/vmlinuz-*-amd64: apt-get install linux-image-amd64")?;
    let vng = vng().context("no vng: pip install virtme-ng")?;
    let out = root().join("target/vm-test");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let script = root().join("tests/vm/inside.sh");
    let bin = target_dir().join("debug");
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', "'\\''"));
    let started = Instant::now();
    // No --net: the VM has only its loopback. --force-9p: run as root,
    // virtme-ng would otherwise share the host's root through QEMU 7.2's C
    // virtiofsd (Debian 12's qemu-system-common), which virtme-ng itself
    // means to avoid; a CI run hung there with the whole guest stalled.
    let mut cmd = Command::new(&vng);
    cmd.arg("-r")
        .arg(&kernel)
        .args([
            "--disable-kvm",
            "--force-9p",
            "--user",
            "root",
            "--memory",
            "3G",
            "--cpus",
            "2",
        ])
        .arg("--rwdir")
        .arg(&out)
        .arg("--exec")
        .arg(format!(
            "bash {} {} {}",
            quote(&script),
            quote(&bin),
            quote(&out)
        ))
        .stdin(Stdio::null())
        // Through this process: QEMU reopens its standard output by path,
        // which would truncate a log file that our own output goes to.
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A group of its own, so that ending the VM ends QEMU and its helpers.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", vng.display()))?;
    let console = [child.stdout.take().map(echo), child.stderr.take().map(echo)];
    let heartbeat = out.join("heartbeat");
    let step = || {
        std::fs::read_to_string(out.join("step"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "(none started)".into())
    };
    // The heartbeat's content (a count) and when it last changed, by this
    // host's clock (the guest's may differ).
    let mut beat: Option<(String, Instant)> = None;
    let (status, stalled) = loop {
        if let Some(status) = child.try_wait()? {
            break (status, None);
        }
        std::thread::sleep(Duration::from_secs(1));
        if let Ok(now) = std::fs::read_to_string(&heartbeat) {
            if beat.as_ref().is_none_or(|(last, _)| *last != now) {
                beat = Some((now, Instant::now()));
            }
        }
        let beat_age = beat.as_ref().map(|(_, at)| at.elapsed());
        let stalled = match beat_age {
            Some(age) if age > VM_STALL => Some(format!(
                "the VM stopped responding: no heartbeat for {}s, in step \"{}\"",
                age.as_secs(),
                step()
            )),
            None if started.elapsed() > VM_STALL * 2 => Some(format!(
                "the VM did not start the test within {}s",
                started.elapsed().as_secs()
            )),
            _ if started.elapsed() > VM_DEADLINE => Some(format!(
                "the VM test did not end within {}s (step \"{}\")",
                VM_DEADLINE.as_secs(),
                step()
            )),
            _ => None,
        };
        if let Some(why) = stalled {
            let group = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
            let waited = Instant::now();
            while child.try_wait()?.is_none() && waited.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            break (child.wait()?, Some(why));
        }
    };
    // The console's last lines before the report (not longer: a helper
    // QEMU left behind may hold the pipes open).
    let copied = Instant::now();
    while !console.iter().flatten().all(|c| c.is_finished())
        && copied.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let wall = started.elapsed().as_secs_f64();
    let result = std::fs::read_to_string(out.join("result"))
        .unwrap_or_else(|_| "FAIL: the VM did not boot or the test did not start".into());
    let metrics = std::fs::read_to_string(out.join("metrics")).unwrap_or_default();
    let report = format!(
        "vm-test: {} in {wall:.0}s wall (VM boot included; {})\n{metrics}",
        result.trim(),
        kernel.display()
    );
    std::fs::write(out.join("report.txt"), &report)?;
    eprint!("xtask: {report}");
    let diag = std::fs::read_to_string(out.join("diag")).ok();
    if status.success() && result.trim() == "PASS" {
        return Ok(VmEnd::Exited);
    }
    // The console may be cut; the step and the watchdog's diagnosis
    // (tests/vm/inside.sh) are files in the shared directory.
    eprintln!("xtask: vm-test: last step started: {}", step());
    for line in diag.iter().flat_map(|d| d.lines()) {
        eprintln!("xtask: vm-test diag: {line}");
    }
    match stalled {
        // Nothing inside the VM could tell what happened (no diagnosis, no
        // step's exit): a stall, not a failed step.
        Some(why) if diag.is_none() && !result.contains("(exit ") => Ok(VmEnd::Unresponsive(why)),
        Some(why) => bail!("vm-test failed: {} ({why})", result.trim()),
        None => bail!(
            "vm-test failed: {} (vng exited {status}); the VM's output is above",
            result.trim()
        ),
    }
}

/// A command as a reader wants it: the variables it sets and its argv,
/// not the variables it removes (`cargo()` removes a dozen).
fn shown(cmd: &Command) -> String {
    let vars = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy())));
    let argv = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned());
    vars.chain(argv)
        .collect::<Vec<_>>()
        .join(" ")
        .replace("  ", " ")
}

/// Cargo, in the workspace, without the variables `cargo run` set for this
/// xtask (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, …): build scripts such as
/// ring's rerun when those change (`rerun-if-env-changed`), so with them an
/// xtask build and a user's `cargo build` would rebuild each other's artifacts.
fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|p| k.starts_with(p))
            || k == "CARGO_PRIMARY_PACKAGE"
        {
            c.env_remove(&key);
        }
    }
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
    vm_test()?;
    eprintln!("xtask: ci passed");
    Ok(())
}

/// The one release build (every program and the demo and bench drivers):
/// what a user's `cargo build --release --workspace` builds, with the same
/// packages and features, so each shares the other's artifacts. Its directory.
fn build_release() -> anyhow::Result<PathBuf> {
    run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    Ok(target_dir().join("release"))
}

/// Release builds of the programs and the demo driver, then the demo.
fn demo() -> anyhow::Result<()> {
    install_packages("the demo", &missing(&[SERVER_PACKAGES]))?;
    if !is_root() {
        bail!("the demo needs root (loop devices, mount, btrfs): run cargo xtask demo as root");
    }
    let release = build_release()?;
    run(Command::new(release.join("mysnap-demo"))
        .arg("--bin-dir")
        .arg(&release))
}

/// Release builds of the programs and the bench driver, then the bench.
fn bench(args: &[String]) -> anyhow::Result<()> {
    install_packages("the bench", &missing(&[SERVER_PACKAGES, BENCH_PACKAGES]))?;
    let release = build_release()?;
    run(Command::new(release.join("mysnap-bench"))
        .arg("--bin-dir")
        .arg(&release)
        .arg("--out")
        .arg(root().join("target/bench"))
        .args(args))
}

/// The programs with man pages and completions.
const PROGRAMS: [&str; 4] = ["snapshotter", "archiver", "restorer", "volprep"];

/// Where each shell looks for completions below `<prefix>/share`, and the
/// file name of program `p`'s script there.
const COMPLETIONS: [(&str, &str, &str, &str); 3] = [
    ("bash", "bash-completion/completions", "", ""),
    ("zsh", "zsh/site-functions", "_", ""),
    ("fish", "fish/vendor_completions.d", "", ".fish"),
];

/// `cargo xtask install-extras`: man pages and completions from each
/// program's hidden `--generate-man DIR` and `--generate-completions SHELL`.
fn install_extras(args: &[String]) -> anyhow::Result<()> {
    let mut prefix = PathBuf::from("/usr/local");
    let mut bin_dir = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .map(PathBuf::from)
                .with_context(|| format!("{a} needs a directory"))
        };
        match a.as_str() {
            "--prefix" => prefix = value()?,
            "--bin-dir" => bin_dir = Some(value()?),
            _ => bail!("install-extras: unknown argument {a:?} (--prefix DIR, --bin-dir DIR)"),
        }
    }
    for p in PROGRAMS {
        let program = match &bin_dir {
            Some(d) => d.join(p),
            None => find_on_path(p).with_context(|| {
                format!("{p} is not on PATH: install the programs first (cargo install --path crates/{p}), or pass --bin-dir target/release")
            })?,
        };
        for path in install_program_extras(&program, p, &prefix)? {
            eprintln!("xtask: installed {}", path.display());
        }
    }
    Ok(())
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Writes program `name`'s man pages and completions below `prefix`;
/// returns the files written. Each completion is written to a temporary
/// name and renamed into place, so a shell never reads half a script.
fn install_program_extras(
    program: &Path,
    name: &str,
    prefix: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    let share = prefix.join("share");
    let mut written = Vec::new();
    for (shell, dir, before, after) in COMPLETIONS {
        let dir = share.join(dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let out = Command::new(program)
            .args(["--generate-completions", shell])
            .output()
            .with_context(|| format!("cannot run {}", program.display()))?;
        if !out.status.success() || out.stdout.is_empty() {
            bail!(
                "{} --generate-completions {shell} failed ({}): {}",
                program.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let path = dir.join(format!("{before}{name}{after}"));
        let tmp = dir.join(format!(".{before}{name}{after}.tmp"));
        std::fs::write(&tmp, &out.stdout)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }
    let man = share.join("man/man1");
    std::fs::create_dir_all(&man).with_context(|| format!("cannot create {}", man.display()))?;
    run(Command::new(program).arg("--generate-man").arg(&man))?;
    let pages = man_pages(&man, name)?;
    anyhow::ensure!(
        pages.iter().any(|p| p.ends_with(format!("{name}.1"))),
        "{} --generate-man wrote no {name}.1 into {}",
        program.display(),
        man.display()
    );
    written.extend(pages);
    Ok(written)
}

/// The man pages of `name` in `dir`: `<name>.1` and `<name>-<subcommand>.1`.
fn man_pages(dir: &Path, name: &str) -> anyhow::Result<std::collections::BTreeSet<PathBuf>> {
    let mut out = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let e = e?;
        let f = e.file_name().to_string_lossy().into_owned();
        if f == format!("{name}.1") || (f.starts_with(&format!("{name}-")) && f.ends_with(".1")) {
            out.insert(e.path());
        }
    }
    Ok(out)
}

fn bin(name: &str) -> PathBuf {
    target_dir().join("debug").join(name)
}

/// snapshotter | archiver, as the contract composes them. The debug build
/// is the one `ci` and `vm-test` make (`--workspace --bins`), so it is shared.
fn backup(args: &[String]) -> anyhow::Result<()> {
    run(cargo().args(["build", "--quiet", "--workspace", "--bins"]))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_lists_each_package_once() {
        const A: Packages = &[("here", "sh"), ("gone", "/nonexistent/xtask-test")];
        const B: Packages = &[
            ("gone", "/nonexistent/xtask-test"),
            ("other", "no-such-cmd-xtask"),
        ];
        assert_eq!(missing(&[A, B]), ["gone", "other"]);
    }

    #[test]
    fn quiet_keeps_output_in_the_log() {
        let log = std::env::temp_dir().join(format!("xtask-quiet-{}.log", std::process::id()));
        std::fs::write(&log, "").unwrap();
        quiet(
            Command::new("sh").args(["-c", "echo out; echo err >&2"]),
            &log,
        )
        .unwrap();
        let e = quiet(
            Command::new("sh").args(["-c", "echo failing; exit 3"]),
            &log,
        )
        .unwrap_err();
        assert!(e.to_string().contains("xtask-quiet-"), "{e}");
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text, "out\nerr\nfailing\n");
        std::fs::remove_file(&log).unwrap();
    }

    /// The layout below the prefix, with a stand-in for a program that
    /// answers the two hidden flags as the real ones do.
    #[test]
    fn install_extras_writes_each_shell_and_the_man_pages_under_the_prefix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("xtask-extras-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let program = dir.join("fake");
        let source = dir.join("fake.sh");
        std::fs::write(
            &source,
            "#!/bin/sh\ncase \"$1\" in\n--generate-completions) echo \"# $2 completion\";;\n\
             --generate-man) : > \"$2/fake.1\"; : > \"$2/fake-list.1\";;\n*) exit 2;;\nesac\n",
        )
        .unwrap();
        // Copied by a child: a file this process held open for writing
        // could still be open in a child another test forks (until its
        // exec), and running it would then fail with ETXTBSY.
        assert!(Command::new("cp")
            .arg(&source)
            .arg(&program)
            .status()
            .unwrap()
            .success());
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        let prefix = dir.join("prefix");
        let written = install_program_extras(&program, "fake", &prefix).unwrap();
        let rel: Vec<String> = written
            .iter()
            .map(|p| p.strip_prefix(&prefix).unwrap().display().to_string())
            .collect();
        assert_eq!(
            rel,
            [
                "share/bash-completion/completions/fake",
                "share/zsh/site-functions/_fake",
                "share/fish/vendor_completions.d/fake.fish",
                "share/man/man1/fake-list.1",
                "share/man/man1/fake.1",
            ]
        );
        let zsh = std::fs::read_to_string(prefix.join("share/zsh/site-functions/_fake")).unwrap();
        assert_eq!(zsh, "# zsh completion\n");
        // A program that fails is an error naming it.
        let err = install_program_extras(&dir.join("missing"), "missing", &prefix).unwrap_err();
        assert!(format!("{err:#}").contains("missing"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
