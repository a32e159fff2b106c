//! Test support for mysnap's end-to-end tests: guards around real components
//! (a private MariaDB, btrfs on a loop device, an in-process S3 server) that
//! clean up in `Drop`, also when a test panics.
//!
//! Tests that need root, MariaDB or loop devices call [`gate`] first: they are
//! skipped unless `MYSNAP_REAL=1`; with it, every missing prerequisite panics.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub mod faults;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

/// True when the real-component tests are enabled (`MYSNAP_REAL=1`).
pub fn real() -> bool {
    std::env::var("MYSNAP_REAL").is_ok_and(|v| v == "1")
}

/// Whether `test` should run: prints why it is skipped when it should not.
pub fn gate(test: &str) -> bool {
    if real() {
        return true;
    }
    eprintln!("skipped {test}: set MYSNAP_REAL=1 (cargo xtask ci does)");
    false
}

/// The path of a workspace binary built in the same profile as this test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/it-xxxx -> target/<profile>
    let mut dir = exe
        .parent()
        .expect("test executable has a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "{} does not exist: build the workspace binaries first: cargo build --workspace --bins",
            path.display()
        );
    }
    path
}

/// A free TCP port on 127.0.0.1 (free when asked; another process may take it later).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Runs `cmd` to completion, panicking with a clear message when it cannot start.
fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null());
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e} (is it installed?)", program(cmd)))
}

/// Runs `cmd` and panics with its stderr when it fails; returns stdout.
fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    if !out.status.success() {
        panic!(
            "{} failed ({}): {}{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` for its side effect, ignoring failures (for cleanup).
fn run_quiet(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.status().is_ok_and(|s| s.success())
}

fn program(cmd: &Command) -> String {
    cmd.get_program().to_string_lossy().into_owned()
}

fn describe(cmd: &Command) -> String {
    let mut s = program(cmd);
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// The last `max` bytes of a file, for error messages.
fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return format!("({} does not exist)", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

fn random_hex() -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// A directory for sockets and logs: /dev/shm when usable (a Unix socket cannot
/// live on a 9p share, as inside the VM), else the system temp dir.
fn runtime_tempdir(prefix: &str) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    let dir = if shm.is_dir() {
        b.tempdir_in(shm).or_else(|_| b.tempdir())
    } else {
        b.tempdir()
    };
    dir.unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"))
        .keep()
}

// ---------------------------------------------------------------------------
// MariaDB

/// How to start a [`MariaDb`].
#[derive(Debug, Clone)]
pub struct MariaOpts {
    pub server_id: u32,
    /// `None`: `--skip-networking` (socket only).
    pub port: Option<u16>,
    /// `--log-bin=<datadir>/binlog`.
    pub log_bin: bool,
    /// More server options (`--name=value`), after the others.
    pub extra: Vec<String>,
}

impl Default for MariaOpts {
    fn default() -> Self {
        MariaOpts {
            server_id: 1,
            port: None,
            log_bin: true,
            extra: Vec::new(),
        }
    }
}

/// A private MariaDB server (own socket, pid file and error log in `dir`);
/// stopped and its `dir` removed on drop. The datadir is the caller's.
pub struct MariaDb {
    /// This instance's own temp dir (socket, pid file, error log).
    pub dir: PathBuf,
    pub datadir: PathBuf,
    pub socket: PathBuf,
    pub port: Option<u16>,
    /// The arguments `mariadbd` was started with.
    args: Vec<String>,
    child: Option<Child>,
}

impl MariaDb {
    /// Initializes `datadir` when it is empty (or missing), starts `mariadbd`
    /// on it and waits until it answers (up to 60 s).
    pub fn start(datadir: &Path, opts: MariaOpts) -> MariaDb {
        std::fs::create_dir_all(datadir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", datadir.display()));
        let empty = std::fs::read_dir(datadir)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", datadir.display()))
            .next()
            .is_none();
        let dir = runtime_tempdir("mysnap-mariadb-");
        // A private tmpdir: parallel installs and servers sharing /tmp have
        // collided on internal temporary table names (CI: "Unknown table
        // 'mysql.tmp_user_sys'").
        let tmpdir = dir.join("tmp");
        std::fs::create_dir_all(&tmpdir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", tmpdir.display()));
        if empty {
            run(Command::new("mariadb-install-db")
                .arg("--user=root")
                .arg(format!("--datadir={}", datadir.display()))
                .arg(format!("--tmpdir={}", tmpdir.display()))
                .arg("--auth-root-authentication-method=normal"));
        }
        let socket = dir.join("my.sock");
        let mut args = vec![
            "--user=root".to_string(),
            format!("--datadir={}", datadir.display()),
            format!("--socket={}", socket.display()),
            format!("--pid-file={}", dir.join("my.pid").display()),
            format!("--log-error={}", dir.join("err.log").display()),
            format!("--tmpdir={}", tmpdir.display()),
            format!("--server-id={}", opts.server_id),
        ];
        if opts.log_bin {
            args.push(format!("--log-bin={}", datadir.join("binlog").display()));
        }
        match opts.port {
            None => args.push("--skip-networking".into()),
            Some(p) => {
                args.push(format!("--port={p}"));
                args.push("--bind-address=127.0.0.1".into());
            }
        }
        args.push("--innodb-buffer-pool-size=128M".into());
        args.push("--innodb-log-file-size=64M".into());
        args.extend(opts.extra.iter().cloned());
        let mut cmd = Command::new("mariadbd");
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run mariadbd: {e} (apt-get install mariadb-server)")
        });
        let mut db = MariaDb {
            dir,
            datadir: datadir.to_path_buf(),
            socket,
            port: opts.port,
            args,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if db.try_sql("select 1").is_ok() {
                return db;
            }
            if let Some(status) = db.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                db.child = None;
                panic!(
                    "mariadbd exited ({status}) while starting; tail of err.log:\n{}",
                    db.err_log_tail()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "mariadbd did not answer within 60 s; tail of err.log:\n{}",
                    db.err_log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `mysql.stop_command` and `mysql.start_command` for mysnap's restorer:
    /// shut this server down, and start it again the same way, detached.
    /// The stop is the `SHUTDOWN` statement, which returns as soon as the
    /// shutdown begins (like `systemctl stop --no-block`): the restorer
    /// waits until the server has exited. (`mariadb-admin shutdown` waits
    /// too, but looks only once a second.)
    pub fn service_commands(&self) -> (Vec<String>, Vec<String>) {
        let stop = [
            "mariadb",
            "-S",
            &self.socket.to_string_lossy(),
            "-uroot",
            "-e",
            "SHUTDOWN",
        ]
        .map(String::from)
        .to_vec();
        let mariadbd = ["/usr/sbin/mariadbd", "/usr/bin/mariadbd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("mariadbd");
        let pid = self.dir.join("my.pid").to_string_lossy().into_owned();
        let mut start: Vec<String> = [
            "start-stop-daemon",
            "--start",
            "--background",
            "--pidfile",
            &pid,
            "--exec",
            mariadbd,
            "--",
        ]
        .map(String::from)
        .to_vec();
        start.extend(self.args.iter().cloned());
        (stop, start)
    }

    /// The last few KiB of the server's error log.
    pub fn err_log_tail(&self) -> String {
        tail(&self.dir.join("err.log"), 4096)
    }

    /// Runs SQL as root through the socket; panics with the client's stderr on failure.
    pub fn sql(&self, sql: &str) -> String {
        self.try_sql(sql)
            .unwrap_or_else(|e| panic!("SQL failed: {sql}: {e}"))
    }

    /// Runs SQL as root through the socket (`-N -B`); trimmed stdout, or stderr.
    pub fn try_sql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new("mariadb")
            .arg("-S")
            .arg(&self.socket)
            .args(["-uroot", "-N", "-B", "-e", sql])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run mariadb (the client): {e} (apt-get install mariadb-client)")
            });
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// `(table, checksum)` of every base table of `db` (`CHECKSUM TABLE`), sorted by table.
    pub fn checksums(&self, db: &str) -> Vec<(String, String)> {
        let esc = db.replace('\'', "''");
        let tables = self.sql(&format!(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = '{esc}' \
             AND table_type = 'BASE TABLE' ORDER BY table_name"
        ));
        let tables: Vec<&str> = tables.lines().filter(|l| !l.is_empty()).collect();
        if tables.is_empty() {
            return Vec::new();
        }
        let q = |s: &str| format!("`{}`", s.replace('`', "``"));
        let list: Vec<String> = tables
            .iter()
            .map(|t| format!("{}.{}", q(db), q(t)))
            .collect();
        let out = self.sql(&format!("CHECKSUM TABLE {}", list.join(", ")));
        let mut sums: Vec<(String, String)> = out
            .lines()
            .map(|line| {
                let (name, sum) = line.rsplit_once('\t').unwrap_or((line, ""));
                let name = name.strip_prefix(&format!("{db}.")).unwrap_or(name);
                (name.to_string(), sum.to_string())
            })
            .collect();
        sums.sort();
        sums
    }

    fn pid_from_file(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("my.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Shuts the server down (`mariadb-admin shutdown`) and waits for it to exit;
    /// `kill -9` after 30 s. Also stops a server restarted on this socket and pid
    /// file by someone else. Idempotent.
    pub fn stop(&mut self) {
        let file_pid = self.pid_from_file();
        let own_pid = self.child.as_ref().map(|c| c.id() as i32);
        let other = file_pid.filter(|p| Some(*p) != own_pid && alive(*p));
        if self.child.is_none() && other.is_none() {
            return;
        }
        run_quiet(
            Command::new("mariadb-admin")
                .arg("-S")
                .arg(&self.socket)
                .args(["-uroot", "shutdown"]),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let child_done = match &mut self.child {
                Some(c) => c.try_wait().map(|s| s.is_some()).unwrap_or(true),
                None => true,
            };
            let other_done = other.is_none_or(|p| !alive(p));
            if child_done && other_done {
                break;
            }
            if Instant::now() > deadline {
                eprintln!(
                    "mariadbd on {} did not shut down in 30 s: killing it",
                    self.socket.display()
                );
                if let Some(c) = &mut self.child {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                if let Some(p) = other {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    let until = Instant::now() + Duration::from_secs(10);
                    while alive(p) && Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = None;
    }
}

/// Starts `cmd` with its stderr piped and returns once it printed the line
/// `want` (a test hook's `paused at <point>`), with the rest of its stderr,
/// by line. Panics with what it printed when `want` does not come within
/// `within` (the child is killed).
pub fn spawn_until_line(
    cmd: &mut Command,
    want: &str,
    within: Duration,
) -> (Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(cmd)));
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line == want => return (child, rx),
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not print {want:?} within {within:?}; stderr:\n{}",
                    describe(cmd),
                    seen.join("\n")
                );
            }
        }
    }
}

/// Sends `signal` to `child` (SIGTERM, SIGKILL, ...).
pub fn send_signal(child: &Child, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, signal)
        .unwrap_or_else(|e| panic!("cannot send {signal} to process {pid}: {e}"));
}

/// The processes working in `dir` or below it (their current directory):
/// a server a test or a killed run left there.
pub fn processes_in(dir: &Path) -> Vec<i32> {
    let dir = dir
        .canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cwd = std::fs::read_link(e.path().join("cwd")).ok()?;
            cwd.starts_with(&dir).then_some(pid)
        })
        .collect()
}

/// Whether process `pid` exists (and is not a zombie).
fn alive(pid: i32) -> bool {
    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
        return false;
    }
    // A zombie (exited, not reaped by its parent) counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_none_or(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// sysbench

/// A sysbench `oltp_read_write` command on `tables` tables of `rows` rows;
/// the caller adds the options and the action.
pub fn sysbench(socket: &Path, tables: u32, rows: u32) -> Command {
    let mut cmd = Command::new("sysbench");
    cmd.arg("oltp_read_write")
        .arg("--db-driver=mysql")
        .arg(format!("--mysql-socket={}", socket.display()))
        .arg("--mysql-user=root")
        .arg("--mysql-db=sbtest")
        .arg(format!("--tables={tables}"))
        .arg(format!("--table-size={rows}"));
    cmd
}

/// Creates database `sbtest` (if missing) and `tables` sysbench tables of `rows` rows.
pub fn sysbench_prepare(socket: &Path, tables: u32, rows: u32) {
    run(Command::new("mariadb").arg("-S").arg(socket).args([
        "-uroot",
        "-e",
        "CREATE DATABASE IF NOT EXISTS sbtest",
    ]));
    run(sysbench(socket, tables, rows).arg("prepare"));
}

/// Starts a sysbench read/write load (2 threads) for `secs` seconds; wait on the child.
pub fn sysbench_run(socket: &Path, tables: u32, rows: u32, secs: u32) -> Child {
    sysbench(socket, tables, rows)
        .arg(format!("--time={secs}"))
        .arg("--threads=2")
        .arg("--report-interval=0")
        .arg("run")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run sysbench: {e} (apt-get install sysbench)"))
}

// ---------------------------------------------------------------------------
// btrfs on a loop device

/// A btrfs filesystem on a loop device, mounted at `mnt`, with subvolume
/// `mnt/vol` (`subvol`, mysnap's `volume.mountpoint`). Drop deletes every
/// subvolume, unmounts, detaches the loop device and removes the image.
pub struct BtrfsVolume {
    pub img: PathBuf,
    pub loopdev: String,
    pub mnt: PathBuf,
    pub subvol: PathBuf,
}

impl BtrfsVolume {
    /// A sparse image of `size_mib` MiB in `dir` (at least about 120 MiB for btrfs).
    pub fn new(dir: &Path, size_mib: u64) -> BtrfsVolume {
        assert!(
            nix::unistd::geteuid().is_root(),
            "BtrfsVolume needs root (losetup, mount)"
        );
        let dir = dir
            .canonicalize()
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let img = dir.join("btrfs.img");
        let f = std::fs::File::create(&img)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", img.display()));
        f.set_len(size_mib << 20)
            .unwrap_or_else(|e| panic!("cannot size {}: {e}", img.display()));
        drop(f);
        let loopdev = run(Command::new("losetup").arg("-f").arg("--show").arg(&img))
            .trim()
            .to_string();
        assert!(loopdev.starts_with("/dev/"), "losetup printed {loopdev:?}");
        // From here on the guard exists, so a panic detaches the loop device.
        let vol = BtrfsVolume {
            img,
            loopdev,
            mnt: dir.join("mnt"),
            subvol: dir.join("mnt").join("vol"),
        };
        run(Command::new("mkfs.btrfs").arg("-q").arg(&vol.loopdev));
        std::fs::create_dir_all(&vol.mnt)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", vol.mnt.display()));
        run(Command::new("mount").arg(&vol.loopdev).arg(&vol.mnt));
        run(Command::new("btrfs")
            .args(["subvolume", "create"])
            .arg(&vol.subvol));
        vol
    }

    /// Every subvolume below `mnt` (paths relative to it), deepest first.
    fn subvolumes(&self) -> Vec<String> {
        let Ok(out) = Command::new("btrfs")
            .args(["subvolume", "list"])
            .arg(&self.mnt)
            .stdin(Stdio::null())
            .output()
        else {
            return Vec::new();
        };
        let mut paths: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(" path ").map(|(_, p)| p.to_string()))
            .collect();
        paths.sort_by_key(|p| std::cmp::Reverse((p.matches('/').count(), p.len())));
        paths
    }
}

impl Drop for BtrfsVolume {
    fn drop(&mut self) {
        if common::mountinfo::is_mounted(&self.mnt) {
            for p in self.subvolumes() {
                let path = self.mnt.join(&p);
                if !run_quiet(
                    Command::new("btrfs")
                        .args(["subvolume", "delete"])
                        .arg(&path),
                ) {
                    eprintln!("BtrfsVolume: could not delete subvolume {}", path.display());
                }
            }
            let mut unmounted = false;
            for _ in 0..20 {
                if run_quiet(Command::new("umount").arg(&self.mnt))
                    || !common::mountinfo::is_mounted(&self.mnt)
                {
                    unmounted = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            if !unmounted {
                eprintln!("BtrfsVolume: {} is busy: lazy unmount", self.mnt.display());
                run_quiet(Command::new("umount").arg("-l").arg(&self.mnt));
            }
        }
        // On a still-busy device (lazy unmount) this sets autoclear instead.
        let mut detached = false;
        for _ in 0..20 {
            if run_quiet(Command::new("losetup").arg("-d").arg(&self.loopdev)) {
                detached = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        if !detached {
            eprintln!("BtrfsVolume: could not detach {}", self.loopdev);
        }
        let _ = std::fs::remove_dir(&self.mnt);
        let _ = std::fs::remove_file(&self.img);
    }
}

// ---------------------------------------------------------------------------
// S3

/// The credentials of the S3 servers of this process: random per process, the
/// same for every server, so a test process can put them in its environment
/// once for the AWS SDK's default chain.
fn process_credentials() -> &'static (String, String) {
    static CREDS: OnceLock<(String, String)> = OnceLock::new();
    CREDS.get_or_init(|| {
        (
            format!("MYSNAPTEST{}", random_hex().to_uppercase()),
            random_hex() + &random_hex(),
        )
    })
}

/// Serves `root` (one directory per bucket) over the S3 protocol with SigV4
/// authentication until the future is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    root: PathBuf,
    access_key: String,
    secret_key: String,
) -> anyhow::Result<()> {
    let fs = s3s_fs::FileSystem::new(&root)
        .map_err(|e| anyhow::anyhow!("s3s-fs on {}: {e:?}", root.display()))?;
    let service = {
        let mut b = S3ServiceBuilder::new(fs);
        b.set_auth(SimpleAuth::from_single(access_key, secret_key));
        b.build()
    };
    // s3s-fs checks `If-None-Match: *` and then writes, which lets two
    // writers racing for one key both succeed; S3 (and MinIO, Ceph RGW)
    // decide atomically. One lock around every conditional write makes
    // this server do the same.
    let conditional = Arc::new(tokio::sync::Mutex::new(()));
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let (service, conditional) = (service.clone(), conditional.clone());
        async move {
            let _held = match req.headers().contains_key("if-none-match") {
                true => Some(conditional.lock_owned().await),
                false => None,
            };
            hyper::service::Service::call(&service, req).await
        }
    });
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let (socket, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("s3 test server: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let conn = http
            .serve_connection(TokioIo::new(socket), service.clone())
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

/// A server on 127.0.0.1, in a background thread with its own tokio
/// runtime (2 workers), until [`ServerThread::stop`] or drop: then its port
/// refuses connections, and what it still serves is dropped with the runtime
/// after at most `linger`.
pub struct ServerThread {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    /// Binds a free port and runs `serve(listener)` on it, in a thread named
    /// `<name>-<port>`.
    pub fn start<F, Fut>(name: &str, linger: Duration, serve: F) -> ServerThread
    where
        F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).expect("set_nonblocking");
        let addr: SocketAddr = listener.local_addr().expect("local_addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    tokio::select! {
                        () = serve(listener) => {}
                        _ = stop_rx => {}
                    }
                });
                rt.shutdown_timeout(linger);
            })
            .unwrap_or_else(|e| panic!("cannot spawn the {name} thread: {e}"));
        ServerThread {
            endpoint: format!("http://{addr}"),
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Stops listening and drops every connection. Idempotent.
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An S3 server on 127.0.0.1 serving `root`, in a [`ServerThread`]; shut
/// down on drop.
pub struct S3Server {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub root: PathBuf,
    _server: ServerThread,
}

impl S3Server {
    pub fn start(root: &Path) -> S3Server {
        std::fs::create_dir_all(root)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", root.display()));
        let root = root
            .canonicalize()
            .unwrap_or_else(|e| panic!("{}: {e}", root.display()));
        let (access_key, secret_key) = process_credentials().clone();
        let (ak, sk, r) = (access_key.clone(), secret_key.clone(), root.clone());
        let server = ServerThread::start(
            "s3-test-server",
            Duration::from_secs(2),
            move |listener| async move {
                if let Err(e) = serve(listener, r, ak, sk).await {
                    eprintln!("s3 test server stopped: {e:#}");
                }
            },
        );
        S3Server {
            endpoint: server.endpoint.clone(),
            access_key,
            secret_key,
            root,
            _server: server,
        }
    }

    /// Creates bucket `name` (a directory under the root).
    pub fn create_bucket(&self, name: &str) {
        let path = self.root.join(name);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create bucket {}: {e}", path.display()));
    }

    /// Environment for a client of this server (AWS SDK default chain).
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", self.access_key.as_str()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.as_str()),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Puts [`S3Server::env`] into this process's environment, once per process
    /// (every server of a process has the same credentials).
    pub fn set_process_env(&self) {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            for (k, v) in self.env() {
                std::env::set_var(k, v);
            }
        });
    }
}

/// The bucket of the tests' S3 stores, and the store URL under it.
pub const TEST_BUCKET: &str = "mysnap-test";
pub const TEST_S3_URL: &str = "s3://mysnap-test/pfx";

impl S3Server {
    /// A server on `root` with [`TEST_BUCKET`], its credentials in this
    /// process's environment (for stores opened in the test itself).
    pub fn with_bucket(root: &Path) -> S3Server {
        let server = S3Server::start(root);
        server.create_bucket(TEST_BUCKET);
        server.set_process_env();
        server
    }

    /// The `[store]` keys of an S3 store reached at `endpoint` (this
    /// server, or a proxy in front of it), beside `url`.
    pub fn store_keys(endpoint: &str) -> toml::Table {
        let mut t = toml::Table::new();
        t.insert("endpoint".into(), endpoint.into());
        t.insert("force_path_style".into(), true.into());
        t.insert("region".into(), "us-east-1".into());
        t
    }
}

/// A store config for `url`, reached at `endpoint` for S3 (this server or
/// a proxy), with small parts and short timeouts.
pub fn store_config(url: &str, endpoint: Option<&str>) -> common::config::StoreConfig {
    common::config::StoreConfig {
        url: common::config::StoreUrl::parse(url).unwrap(),
        region: endpoint.map(|_| "us-east-1".to_string()),
        endpoint: endpoint.map(str::to_string),
        force_path_style: None,
        part_size: bytesize::ByteSize::mib(5),
        concurrency: 4,
        memory_limit: bytesize::ByteSize::mib(256),
        max_attempts: 3,
        connect_timeout: Duration::from_secs(10),
        read_timeout: Duration::from_secs(120),
        storage_class: None,
        sse: None,
        sse_kms_key_id: None,
        object_lock_days: None,
        object_lock_mode: None,
        upload_rate_limit: None,
        checksums: Default::default(),
    }
}

/// [`store_config`] of [`TEST_S3_URL`] at `endpoint`.
pub fn s3_config(endpoint: &str) -> common::config::StoreConfig {
    store_config(TEST_S3_URL, Some(endpoint))
}

// ---------------------------------------------------------------------------
// Planted backups: a directory store filled by hand (no MariaDB needed)

/// The backup id of the time `ago` before now.
pub fn id_ago(ago: Duration) -> String {
    let t = time::OffsetDateTime::now_utc() - ago;
    common::manifest::BackupId::from_time(t).to_string()
}

/// The manifest the archiver stores for backup `id` of `name`, created at
/// the time of its id: a 1 MiB zstd archive, the lock held 0.042 s,
/// archived in 12.25 s.
pub fn synthetic_manifest(name: &str, id: &str) -> String {
    let created = common::manifest::BackupId::parse(id)
        .unwrap_or_else(|e| panic!("{id:?} is not a backup id: {e}"))
        .time()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    format!(
        r#"format_version = 1
backup_id = "{id}"
name = "{name}"
created_at = "{created}"

[server]
flavor = "mariadb"
version = "10.11.6-MariaDB-log"
hostname = "db1"
server_id = 1

[lock]
method = "ftwrl"
attempts = 1
wait_secs = 0.01
hold_secs = 0.042

[snapshot]
backend = "btrfs"
name = "mysnap-{name}-{id}"
path = "/mnt/.mysnap-snapshots/mysnap-{name}-{id}"

[data]
volume_root = "/mnt"
datadir = "mysql"
paths = ["mysql"]
exclude = []

[archive]
key = "{name}/{id}/data.tar.zst"
size = 1048576
compression = "zstd"
level = 3
sha256 = "{sha}"
tar_size = 2097152
unpacked_size = 2000000
files = 10
archive_secs = 12.25
"#,
        sha = "ab".repeat(32)
    )
}

/// Plants backup `id` of `name` in the directory store `store`: its archive
/// `data.tar.zst` (a few bytes: nothing here reads it) and, when given,
/// `manifest.toml` with `manifest` as its text.
pub fn plant(store: &Path, name: &str, id: &str, manifest: Option<&str>) {
    let dir = store.join(name).join(id);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    std::fs::write(dir.join("data.tar.zst"), b"zstd").unwrap();
    if let Some(m) = manifest {
        std::fs::write(dir.join("manifest.toml"), m).unwrap();
    }
}

/// Plants a complete backup ([`synthetic_manifest`]) of `name` as `id`.
pub fn plant_backup(store: &Path, name: &str, id: &str) {
    plant(store, name, id, Some(&synthetic_manifest(name, id)));
}

/// `real`'s manifest moved to backup `id` of db1 with `archive` as its
/// archive (key, size, SHA-256), stored with it in the directory store
/// `store_root`; `edit` adjusts the archive's entry first.
fn plant_moved(
    store_root: &Path,
    real: &common::manifest::Manifest,
    id: &str,
    archive: &[u8],
    edit: impl FnOnce(&mut common::manifest::Manifest, &mut common::manifest::ArchiveInfo),
) -> PathBuf {
    let mut m = real.clone();
    m.backup_id = common::manifest::BackupId::parse(id).unwrap();
    let mut info = m.archive.clone().unwrap();
    info.key = format!("db1/{id}/data.tar.zst");
    info.size = archive.len() as u64;
    info.sha256 = common::manifest::Sha256Hex::parse(&common::codec::sha256_hex(archive)).unwrap();
    edit(&mut m, &mut info);
    m.archive = Some(info);
    let dir = store_root.join("db1").join(id);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("data.tar.zst"), archive).unwrap();
    std::fs::write(dir.join("manifest.toml"), m.to_toml()).unwrap();
    dir
}

/// Stores `archive` (zstd) as backup `id` of db1 in the directory store
/// `store_root`, with `real`'s manifest adjusted to it (key, size, SHA-256,
/// format 1, no index): a crafted or damaged copy of a real backup.
pub fn plant_archive(
    store_root: &Path,
    real: &common::manifest::Manifest,
    id: &str,
    archive: &[u8],
) {
    plant_moved(store_root, real, id, archive, |m, info| {
        // A single-stream archive: format 1 (an indexed backup's index would not fit it).
        info.index = None;
        m.format_version = common::manifest::FORMAT_VERSION;
    });
}

/// Stores `archive`, an indexed archive of the same frames as `real`'s,
/// as backup `id` of db1 in the directory store `store_root`, with `real`'s
/// index copied from `real_id` and its manifest moved to `id` (keys, and the
/// archive's size and whole SHA-256): a damaged copy of a real indexed backup.
pub fn plant_indexed(
    store_root: &Path,
    real: &common::manifest::Manifest,
    real_id: &str,
    id: &str,
    archive: &[u8],
) {
    let dir = plant_moved(store_root, real, id, archive, |_, info| {
        let ix = info.index.as_mut().expect("an indexed backup");
        ix.key = format!("db1/{id}/index.json.zst");
    });
    std::fs::copy(
        store_root.join(format!("db1/{real_id}/index.json.zst")),
        dir.join("index.json.zst"),
    )
    .unwrap();
}

/// Every file below `root` (relative paths; links are listed, not followed).
pub fn files_below(root: &Path) -> std::collections::BTreeSet<String> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .map(|e| e.unwrap_or_else(|e| panic!("cannot list {}: {e}", root.display())))
        .filter(|e| !e.file_type().is_dir())
        .map(|e| e.path().strip_prefix(root).unwrap().display().to_string())
        .collect()
}
