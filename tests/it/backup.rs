//! Backups end to end: real MariaDB on btrfs, the real binaries, S3 and
//! directory stores.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::config::Compression;
use common::manifest::{Manifest, RelPath};
use mysnap_tests::faults::{Fault, FaultProxy, On, Times};
use mysnap_tests::{
    bin, gate, sysbench_prepare, sysbench_run, BtrfsVolume, MariaDb, MariaOpts, S3Server,
};

use crate::store::uploads_on_server;
use sha2::{Digest, Sha256};

pub enum StoreKind {
    File,
    S3,
}

/// A MariaDB on a btrfs subvolume, a store, a state dir and a config.
/// Fields drop in order: server, S3, volume, then the temp dir.
pub struct Rig {
    pub db: MariaDb,
    pub s3: Option<S3Server>,
    pub vol: BtrfsVolume,
    pub config: PathBuf,
    pub state: PathBuf,
    pub store_url: String,
    pub tmp: tempfile::TempDir,
}

impl Rig {
    pub fn new(store: StoreKind) -> Rig {
        Rig::with(store, MariaOpts::default())
    }

    pub fn with(store: StoreKind, opts: MariaOpts) -> Rig {
        let tmp = tempfile::tempdir().expect("tempdir");
        let vol = BtrfsVolume::new(tmp.path(), 2048);
        let db = MariaDb::start(&vol.subvol.join("mysql"), opts);
        let (s3, store_url) = match store {
            StoreKind::File => {
                let dir = tmp.path().join("store");
                std::fs::create_dir_all(&dir).unwrap();
                (None, format!("file://{}", dir.display()))
            }
            StoreKind::S3 => {
                let s3 = S3Server::start(&tmp.path().join("s3"));
                s3.create_bucket("backups");
                s3.set_process_env();
                (Some(s3), "s3://backups/fleet".to_string())
            }
        };
        let state = tmp.path().join("state");
        let config = tmp.path().join("mysnap.toml");
        let rig = Rig {
            db,
            s3,
            vol,
            config,
            state,
            store_url,
            tmp,
        };
        rig.write_config(|_| {});
        rig
    }

    /// Writes the config, after `tweak` edits its table.
    pub fn write_config(&self, tweak: impl FnOnce(&mut toml::Table)) {
        let mut store = toml::Table::new();
        store.insert("url".into(), self.store_url.clone().into());
        store.insert("part_size".into(), "5MiB".into());
        store.insert("concurrency".into(), 4.into());
        if let Some(s3) = &self.s3 {
            store.extend(S3Server::store_keys(&s3.endpoint));
        }
        let mut t: toml::Table = toml::from_str(&format!(
            r#"
[mysql]
socket = "{sock}"
user = "root"
lock_timeout = "2s"
lock_retries = 1
long_query_wait = "1s"
[volume]
backend = "btrfs"
mountpoint = "{vol}"
datadir = "{vol}/mysql"
[archive]
compression = "zstd"
[backup]
name = "db1"
state_dir = "{state}"
"#,
            sock = self.db.socket.display(),
            vol = self.vol.subvol.display(),
            state = self.state.display()
        ))
        .unwrap();
        t.insert("store".into(), store.into());
        tweak(&mut t);
        std::fs::write(&self.config, toml::to_string(&t).unwrap()).unwrap();
    }

    /// Runs a mysnap binary with this rig's config and store credentials.
    pub fn cmd(&self, name: &str) -> Command {
        let mut c = Command::new(bin(name));
        c.env("MYSNAP_CONFIG", &self.config).stdin(Stdio::null());
        if let Some(s3) = &self.s3 {
            c.envs(s3.env());
        }
        c
    }

    pub fn run(&self, name: &str, args: &[&str]) -> Output {
        self.cmd(name).args(args).output().unwrap()
    }

    /// snapshotter; the manifest path it printed.
    pub fn snapshot(&self) -> PathBuf {
        let out = self.run("snapshotter", &[]);
        assert_ok(&out, "snapshotter");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    }

    /// archiver; the backup id it printed.
    pub fn archive(&self, manifest: &Path) -> String {
        let out = self.run("archiver", &["--manifest", manifest.to_str().unwrap()]);
        assert_ok(&out, "archiver");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub fn backup(&self) -> String {
        let m = self.snapshot();
        self.archive(&m)
    }

    /// `snapshotter | archiver`, through a real pipe; the backup id.
    pub fn backup_piped(&self) -> String {
        let mut snap = self
            .cmd("snapshotter")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = self
            .cmd("archiver")
            .stdin(snap.stdout.take().unwrap())
            .output()
            .unwrap();
        assert!(snap.wait().unwrap().success(), "snapshotter");
        assert_ok(&out, "archiver");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub fn snapshot_dir(&self) -> PathBuf {
        self.vol.subvol.join(".mysnap-snapshots")
    }

    /// Snapshots that exist now.
    pub fn snapshots(&self) -> Vec<String> {
        std::fs::read_dir(self.snapshot_dir())
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Backup ids with local state (pending or left by a killed run).
    pub fn pending(&self) -> Vec<String> {
        std::fs::read_dir(&self.state)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| common::manifest::is_backup_id(n))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The rig's store, independent of the config file (which tests break on purpose).
    pub fn store_cfg(&self) -> common::config::StoreConfig {
        let endpoint = self.s3.as_ref().map(|s| s.endpoint.as_str());
        mysnap_tests::store_config(&self.store_url, endpoint)
    }

    pub fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// Every key in the store.
    pub fn store_keys(&self) -> Vec<String> {
        let cfg = self.store_cfg();
        self.block_on(async {
            common::store::open(&cfg)
                .await
                .unwrap()
                .list("")
                .await
                .unwrap()
        })
    }

    pub fn fetch(&self, key: &str) -> Vec<u8> {
        let cfg = self.store_cfg();
        let key = key.to_string();
        self.block_on(async {
            common::store::open(&cfg)
                .await
                .unwrap()
                .get(&key, u64::MAX / 2)
                .await
                .unwrap()
                .to_vec()
        })
    }
}

/// Sets `[section] key = value` in a config table.
pub fn set(t: &mut toml::Table, section: &str, key: &str, value: impl Into<toml::Value>) {
    t.entry(section)
        .or_insert_with(|| toml::Table::new().into())
        .as_table_mut()
        .unwrap()
        .insert(key.into(), value.into());
}

/// Edits the config file at `path`.
pub(crate) fn edit_config(path: &Path, tweak: impl FnOnce(&mut toml::Table)) {
    let mut t: toml::Table = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    tweak(&mut t);
    std::fs::write(path, toml::to_string(&t).unwrap()).unwrap();
}

/// Snapshots, starts an archiver slowed down by level-19 single-threaded
/// compression, and sends it `signal` while it is still archiving.
fn archiver_signalled_mid_way(
    rig: &Rig,
    signal: nix::sys::signal::Signal,
) -> (PathBuf, std::process::Child) {
    rig.write_config(|t| {
        set(t, "archive", "level", 19);
        set(t, "archive", "threads", 1);
        set(t, "store", "concurrency", 1);
    });
    let manifest = rig.snapshot();
    let mut archiver = rig
        .cmd("archiver")
        .args(["--manifest", manifest.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        archiver.try_wait().unwrap().is_none(),
        "the archiver finished before the {signal}"
    );
    mysnap_tests::send_signal(&archiver, signal);
    (manifest, archiver)
}

pub fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The one `error:` line of a failed run; asserts the exit code.
pub fn error_line(out: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "exit code; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line: {stderr}");
    lines[0].to_string()
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Relative path → SHA-256 (files) or "dir"/"link:<target>", of `paths` under `root`.
fn listing(root: &Path, paths: &[RelPath], exclude: &[RelPath]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for p in paths {
        for e in walkdir::WalkDir::new(root.join(p)) {
            let e = e.unwrap();
            let rel = e
                .path()
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if rel.is_empty() || exclude.iter().any(|x| *x == rel) {
                continue;
            }
            let v = if e.file_type().is_dir() {
                "dir".to_string()
            } else if e.file_type().is_symlink() {
                format!("link:{}", std::fs::read_link(e.path()).unwrap().display())
            } else {
                sha(&std::fs::read(e.path()).unwrap())
            };
            out.insert(rel, v);
        }
    }
    out
}

/// The same listing, of a tar stream.
fn tar_listing(data: impl Read) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut ar = tar::Archive::new(data);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches('/')
            .to_string();
        let v = match e.header().entry_type() {
            tar::EntryType::Directory => "dir".to_string(),
            tar::EntryType::Symlink => {
                format!("link:{}", e.link_name().unwrap().unwrap().display())
            }
            _ => {
                let mut buf = Vec::new();
                e.read_to_end(&mut buf).unwrap();
                sha(&buf)
            }
        };
        out.insert(name, v);
    }
    out
}

#[test]
fn a_backup_under_load_records_the_locked_coordinates_and_archives_the_snapshot() {
    if !gate("a_backup_under_load_records_the_locked_coordinates_and_archives_the_snapshot") {
        return;
    }
    backup_under_load("ftwrl");
}

#[test]
fn a_backup_stage_backup_under_load_records_the_locked_coordinates_and_archives_the_snapshot() {
    if !gate(
        "a_backup_stage_backup_under_load_records_the_locked_coordinates_and_archives_the_snapshot",
    ) {
        return;
    }
    backup_under_load("backup_stage");
}

/// A backup with `lock_method` while sysbench writes: the coordinates are
/// those of the snapshot, and the archive holds exactly the snapshot.
fn backup_under_load(lock_method: &str) {
    let rig = Rig::new(StoreKind::S3);
    // One stream (format 1, `archive.indexed = false`) with BACKUP STAGE, indexed frames
    // (format 3) with FTWRL: both formats of a real backup under load.
    let indexed = lock_method == "ftwrl";
    rig.write_config(|t| {
        set(t, "mysql", "lock_method", lock_method);
        set(t, "archive", "indexed", indexed);
    });
    sysbench_prepare(&rig.db.socket, 4, 10_000);
    let mut load = sysbench_run(&rig.db.socket, 4, 10_000, 120);
    std::thread::sleep(Duration::from_secs(3));

    let manifest_path = rig.snapshot();
    let m = Manifest::load(&manifest_path).unwrap();
    assert!(m.snapshot.path.is_dir());
    assert_eq!(m.lock.method.as_str(), lock_method);
    // Under the lock nothing is committed: in the snapshot's current binary
    // log, no transaction follows the recorded position (only the server's
    // own Binlog_checkpoint event may, written after a rotation on its own
    // schedule), and it is the newest one.
    let binlog = m.binlog.clone().expect("binlog coordinates");
    let datadir = m.snapshot.path.join(&m.data.datadir);
    let size = std::fs::metadata(datadir.join(binlog.file.as_str()))
        .unwrap()
        .len();
    assert!(
        size >= binlog.position,
        "binlog {} in the snapshot",
        binlog.file
    );
    if size > binlog.position {
        let out = Command::new("mariadb-binlog")
            .arg(format!("--start-position={}", binlog.position))
            .arg(datadir.join(binlog.file.as_str()))
            .output()
            .unwrap();
        assert_ok(&out, "mariadb-binlog");
        let text = String::from_utf8_lossy(&out.stdout);
        let events: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with('#') && l.contains("end_log_pos"))
            .filter(|l| {
                l.split("end_log_pos ")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|p| p.parse::<u64>().ok())
                    .is_some_and(|p| p > binlog.position)
            })
            .collect();
        assert!(
            !events.is_empty() && events.iter().all(|l| l.contains("Binlog checkpoint")),
            "{} bytes past the recorded position {} of {}: {events:#?}",
            size - binlog.position,
            binlog.position,
            binlog.file
        );
    }
    let index = std::fs::read_to_string(datadir.join("binlog.index")).unwrap();
    assert!(index.trim_end().ends_with(binlog.file.as_str()), "{index}");
    assert!(
        m.gtid.as_deref().is_some_and(|g| g.starts_with("0-1-")),
        "{:?}",
        m.gtid
    );
    assert!(m.lock.hold_secs < 10.0 && m.lock.attempts >= 1);
    let expected = listing(&m.snapshot.path, &m.data.paths, &m.data.exclude);
    assert!(expected.keys().any(|k| k.ends_with("sbtest/sbtest1.ibd")));
    assert!(!expected.contains_key("mysql/ibtmp1"));

    let id = rig.archive(&manifest_path);
    let _ = load.kill();
    let _ = load.wait();
    assert_eq!(id, m.backup_id);
    assert!(!m.snapshot.path.exists(), "snapshot removed");
    assert!(rig.pending().is_empty());

    let stored =
        Manifest::parse(&String::from_utf8(rig.fetch(&m.key())).unwrap(), "store").unwrap();
    let info = stored.archive.clone().expect("archive info");
    assert_eq!(
        Manifest {
            archive: None,
            format_version: m.format_version,
            ..stored.clone()
        },
        m
    );
    assert_eq!(info.key, format!("db1/{id}/data.tar.zst"));
    let data = rig.fetch(&info.key);
    assert_eq!(data.len() as u64, info.size);
    assert_eq!(sha(&data), info.sha256);
    let got = tar_listing(common::codec::decoder(&data[..], Compression::Zstd).unwrap());
    assert_eq!(
        got, expected,
        "the archive holds exactly the snapshot's files"
    );
    if !indexed {
        assert_eq!(stored.format_version, common::manifest::FORMAT_VERSION);
        assert!(info.index.is_none());
        assert_eq!(
            rig.store_keys(),
            [
                format!("db1/{id}/data.tar.zst"),
                format!("db1/{id}/manifest.toml")
            ]
        );
        return;
    }
    // Indexed (format 3): the index stored beside it, bound by the manifest.
    assert_eq!(
        stored.format_version,
        common::manifest::INDEXED_FORMAT_VERSION
    );
    let ix = info.index.clone().expect("an indexed archive");
    assert_eq!(ix.key, format!("db1/{id}/index.json.zst"));
    let ix_bytes = rig.fetch(&ix.key);
    assert_eq!(
        (ix_bytes.len() as u64, sha(&ix_bytes)),
        (ix.size, ix.sha256.to_string())
    );
    let index = common::archive::index::Index::parse(&ix_bytes, "index", &info, &stored.data.paths)
        .unwrap();
    assert!(index.frames.len() >= 2, "{} frames", index.frames.len());
    // The escape hatch: `zstd -dc data.tar.zst | tar -x` restores it by hand.
    let by_hand = tempfile::tempdir().unwrap();
    let file = by_hand.path().join("data.tar.zst");
    std::fs::write(&file, &data).unwrap();
    let out_dir = by_hand.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let mut zstd = Command::new("zstd")
        .arg("-dc")
        .arg(&file)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let tar_out = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&out_dir)
        .stdin(zstd.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(zstd.wait().unwrap().success(), "zstd -dc");
    assert_ok(&tar_out, "tar -x");
    assert_eq!(
        listing(&out_dir, &m.data.paths, &m.data.exclude),
        expected,
        "zstd -dc | tar -x restores the snapshot's files"
    );
    assert_eq!(
        rig.store_keys(),
        [
            format!("db1/{id}/data.tar.zst"),
            format!("db1/{id}/index.json.zst"),
            format!("db1/{id}/manifest.toml")
        ]
    );
}

#[test]
fn a_backup_to_a_directory_store_with_xz() {
    if !gate("a_backup_to_a_directory_store_with_xz") {
        return;
    }
    let rig = Rig::new(StoreKind::File);
    rig.write_config(|t| {
        set(t, "archive", "compression", "xz");
    });
    rig.db.sql("CREATE DATABASE d; CREATE TABLE d.t (id INT PRIMARY KEY, v TEXT); INSERT INTO d.t VALUES (1, 'one'), (2, 'two')");
    let id = rig.backup_piped();
    let m = Manifest::parse(
        &String::from_utf8(rig.fetch(&format!("db1/{id}/manifest.toml"))).unwrap(),
        "store",
    )
    .unwrap();
    let info = m.archive.unwrap();
    assert_eq!(info.compression, Compression::Xz);
    let data = rig.fetch(&info.key);
    assert_eq!(sha(&data), info.sha256);
    let got = tar_listing(common::codec::decoder(&data[..], Compression::Xz).unwrap());
    assert!(
        got.contains_key("mysql/d/t.ibd"),
        "{:?}",
        got.keys().collect::<Vec<_>>()
    );
    assert!(rig.snapshots().is_empty());
    // No temporary files are left in the store directory.
    let leftovers: Vec<_> = walkdir::WalkDir::new(rig.tmp.path().join("store"))
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Runs `sql` through the mariadb client in the background.
fn background_sql(rig: &Rig, sql: &str) -> std::process::Child {
    Command::new("mariadb")
        .arg("-S")
        .arg(&rig.db.socket)
        .args(["-uroot", "-e", sql])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A rig whose snapshotter tries `lock_method` once more after a first
/// attempt of 1 s, on a server where `setup` (SQL) ran.
fn lock_contention_rig(lock_method: &str, setup: &str) -> Rig {
    let rig = Rig::new(StoreKind::File);
    rig.write_config(|t| {
        set(t, "mysql", "lock_timeout", "1s");
        set(t, "mysql", "lock_retries", 1);
        set(t, "mysql", "lock_method", lock_method);
    });
    rig.db.sql(setup);
    rig
}

/// The tables of the long-write tests: `d.t`, which the long write holds,
/// and `d.w`, where a writer inserts.
const LONG_WRITE_TABLES: &str = "CREATE DATABASE d; CREATE TABLE d.t (id INT PRIMARY KEY); \
    INSERT INTO d.t VALUES (1); CREATE TABLE d.w (id INT AUTO_INCREMENT PRIMARY KEY)";

/// A write that runs for 30 s: FLUSH TABLES WITH READ LOCK must wait for it.
const LONG_WRITE: &str = "UPDATE d.t SET id = id + 0 WHERE SLEEP(30) = 0";

/// Runs the snapshotter while inserting into `d.w` one row after another:
/// the longest an INSERT took, and the snapshotter's output.
fn snapshot_while_inserting(rig: &Rig) -> (Duration, Output) {
    let mut snap = rig
        .cmd("snapshotter")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut worst = Duration::ZERO;
    while snap.try_wait().unwrap().is_none() {
        let t = Instant::now();
        rig.db.sql("INSERT INTO d.w VALUES ()");
        worst = worst.max(t.elapsed());
    }
    (worst, snap.wait_with_output().unwrap())
}

/// Nothing holds a lock: an INSERT into `d.w` goes through within `limit`.
fn assert_insert_within(rig: &Rig, limit: Duration) {
    let t = Instant::now();
    rig.db.sql("INSERT INTO d.w VALUES ()");
    assert!(t.elapsed() < limit, "an INSERT took {:?}", t.elapsed());
}

#[test]
fn a_long_write_makes_the_lock_give_up_with_exit_3_and_writers_barely_wait() {
    if !gate("a_long_write_makes_the_lock_give_up_with_exit_3_and_writers_barely_wait") {
        return;
    }
    let rig = lock_contention_rig("ftwrl", LONG_WRITE_TABLES);
    let mut long = background_sql(&rig, LONG_WRITE);
    std::thread::sleep(Duration::from_millis(1500));

    let started = Instant::now();
    // A concurrent writer: every INSERT's latency while the snapshotter tries.
    let (worst, out) = snapshot_while_inserting(&rig);
    let line = error_line(&out, 3);
    assert!(
        line.contains("could not take FLUSH TABLES WITH READ LOCK"),
        "{line}"
    );
    assert!(line.contains("2 attempts"), "{line}");
    // One attempt is bounded by lock_timeout (1 s) plus the watcher's margin.
    assert!(
        worst < Duration::from_millis(3000),
        "a writer waited {worst:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        rig.snapshots().is_empty(),
        "no snapshot: {:?}",
        rig.snapshots()
    );
    assert!(rig.pending().is_empty());
    assert_insert_within(&rig, Duration::from_secs(2));
    let _ = long.kill();
    let _ = long.wait();
}

#[test]
fn a_long_write_does_not_hold_up_a_backup_stage_snapshot_and_writers_keep_committing() {
    if !gate("a_long_write_does_not_hold_up_a_backup_stage_snapshot_and_writers_keep_committing") {
        return;
    }
    let rig = lock_contention_rig("backup_stage", LONG_WRITE_TABLES);
    // The write that makes FLUSH TABLES WITH READ LOCK give up (the test
    // above): BACKUP STAGE BLOCK_COMMIT waits only for commits in progress.
    let mut long = background_sql(&rig, LONG_WRITE);
    std::thread::sleep(Duration::from_millis(1500));

    let (worst, out) = snapshot_while_inserting(&rig);
    assert_ok(&out, "snapshotter");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lock (backup_stage) waited"), "{stderr}");
    let m = Manifest::load(Path::new(String::from_utf8_lossy(&out.stdout).trim())).unwrap();
    assert_eq!(m.lock.method.as_str(), "backup_stage");
    assert_eq!(m.lock.attempts, 1, "no retry: {stderr}");
    assert!(m.lock.wait_secs < 1.0, "waited {}s", m.lock.wait_secs);
    // Writers are held only while BLOCK_COMMIT is (the snapshot).
    assert!(
        worst < Duration::from_millis(1000),
        "a writer waited {worst:?}"
    );
    // The long write is still running, and writers commit as before.
    assert!(
        long.try_wait().unwrap().is_none(),
        "the long write ended early"
    );
    assert_insert_within(&rig, Duration::from_secs(1));
    let _ = long.kill();
    let _ = long.wait();
    rig.archive(Path::new(String::from_utf8_lossy(&out.stdout).trim()));
}

#[test]
fn a_commit_that_blocks_backup_stage_block_commit_makes_it_give_up_with_exit_3() {
    if !gate("a_commit_that_blocks_backup_stage_block_commit_makes_it_give_up_with_exit_3") {
        return;
    }
    let rig = lock_contention_rig(
        "backup_stage",
        "CREATE DATABASE d; CREATE TABLE d.w (id INT AUTO_INCREMENT PRIMARY KEY); \
         CREATE TABLE d.b (id INT AUTO_INCREMENT PRIMARY KEY)",
    );
    // A commit in progress for 12 s: binary log group commit waits for a
    // second commit to join it (binlog_commit_wait_count), which never comes.
    rig.db
        .sql("SET GLOBAL binlog_commit_wait_count = 2, binlog_commit_wait_usec = 12000000");
    let mut slow = background_sql(&rig, "INSERT INTO d.b VALUES ()");
    std::thread::sleep(Duration::from_millis(500));
    // Other commits must not join its group (that would let it through).
    rig.db
        .sql("SET GLOBAL binlog_commit_wait_count = 0, binlog_commit_wait_usec = 100000");

    let started = Instant::now();
    let out = rig.run("snapshotter", &[]);
    let line = error_line(&out, 3);
    assert!(
        line.contains("could not take BACKUP STAGE") && line.contains("2 attempts"),
        "{line}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`BACKUP STAGE BLOCK_COMMIT` failed"),
        "the stage that waited is named: {stderr}"
    );
    assert!(
        slow.try_wait().unwrap().is_none(),
        "the blocking commit ended before the snapshotter gave up"
    );
    assert!(rig.snapshots().is_empty(), "{:?}", rig.snapshots());
    assert!(rig.pending().is_empty());
    // Nothing is held: once that commit is through, writes go through at
    // once, and another backup can start its stages.
    assert!(slow.wait().unwrap().success());
    assert_insert_within(&rig, Duration::from_secs(1));
    rig.db
        .sql("SET SESSION lock_wait_timeout = 1; BACKUP STAGE START; BACKUP STAGE BLOCK_COMMIT; BACKUP STAGE END");

    // Another backup in progress (one at a time): START waits, and gives up alike.
    let mut other = background_sql(&rig, "BACKUP STAGE START; SELECT SLEEP(12)");
    std::thread::sleep(Duration::from_millis(500));
    let line = error_line(&rig.run("snapshotter", &[]), 3);
    assert!(line.contains("could not take BACKUP STAGE"), "{line}");
    assert!(
        other.try_wait().unwrap().is_none(),
        "the other backup ended before the snapshotter gave up"
    );
    let _ = other.kill();
    let _ = other.wait();
    assert!(rig.snapshots().is_empty(), "{:?}", rig.snapshots());
    assert_insert_within(&rig, Duration::from_secs(1));
}

#[test]
fn an_archiver_killed_mid_upload_leaves_no_listed_backup_and_the_next_run_cleans_up() {
    if !gate("an_archiver_killed_mid_upload_leaves_no_listed_backup_and_the_next_run_cleans_up") {
        return;
    }
    let rig = Rig::new(StoreKind::S3);
    sysbench_prepare(&rig.db.socket, 4, 20_000);
    // Slow compression keeps the archiver busy long enough to be killed mid-way.
    let (manifest, archiver) = archiver_signalled_mid_way(&rig, nix::sys::signal::Signal::SIGKILL);
    let m = Manifest::load(&manifest).unwrap();
    let _ = archiver.wait_with_output();
    assert!(
        rig.snapshots().contains(&m.snapshot.name.to_string()),
        "kill -9 leaves the snapshot"
    );
    assert!(
        manifests(&rig).is_empty(),
        "a killed backup is never listed: {:?}",
        rig.store_keys()
    );

    rig.write_config(|_| {});
    let id = rig.backup();
    assert_ne!(id, m.backup_id);
    assert!(
        rig.snapshots().is_empty(),
        "the stale snapshot was removed: {:?}",
        rig.snapshots()
    );
    assert!(rig.pending().is_empty());
    assert_eq!(manifests(&rig), [format!("db1/{id}/manifest.toml")]);
    assert!(
        !rig.store_keys()
            .iter()
            .any(|k| k.contains(m.backup_id.as_str())),
        "{:?}",
        rig.store_keys()
    );
}

#[test]
fn bad_input_is_one_clear_line_with_the_right_exit_code_and_leaves_nothing() {
    if !gate("bad_input_is_one_clear_line_with_the_right_exit_code_and_leaves_nothing") {
        return;
    }
    let rig = Rig::new(StoreKind::S3);
    let check_clean = |what: &str| {
        assert!(
            rig.snapshots().is_empty(),
            "{what}: snapshots {:?}",
            rig.snapshots()
        );
        assert!(
            rig.pending().is_empty(),
            "{what}: state {:?}",
            rig.pending()
        );
        assert!(
            rig.store_keys().is_empty(),
            "{what}: store {:?}",
            rig.store_keys()
        );
        let t = Instant::now();
        rig.db
            .sql("CREATE DATABASE IF NOT EXISTS probe; DROP DATABASE probe");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{what}: the server is locked"
        );
    };

    // An unknown (mistyped) key: exit 2, naming the key and the file.
    rig.write_config(|t| {
        set(t, "mysql", "lock_timout", "5s");
    });
    let line = error_line(&rig.run("snapshotter", &[]), 2);
    assert!(
        line.contains("lock_timout") && line.contains(rig.config.to_str().unwrap()),
        "{line}"
    );
    check_clean("unknown key");

    // An unreachable server.
    rig.write_config(|t| {
        set(t, "mysql", "socket", "/nonexistent/mysqld.sock");
    });
    let line = error_line(&rig.run("snapshotter", &[]), 1);
    assert!(
        line.contains("cannot connect to MySQL at socket /nonexistent/mysqld.sock"),
        "{line}"
    );
    check_clean("unreachable server");

    // A wrong password: the error says access was denied, never the password.
    rig.db.sql("CREATE USER mysnap@localhost IDENTIFIED BY 'right-pw'; GRANT RELOAD, PROCESS, SUPER ON *.* TO mysnap@localhost");
    let pw = rig.tmp.path().join("mysql.pass");
    std::fs::write(&pw, "wrong-pw\n").unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    rig.write_config(|t| {
        set(t, "mysql", "user", "mysnap");
        set(t, "mysql", "password_file", pw.to_str().unwrap());
    });
    let out = rig.run("snapshotter", &[]);
    let line = error_line(&out, 1);
    assert!(
        line.contains("Access denied") && line.contains("mysql.password_file"),
        "{line}"
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("wrong-pw"));
    check_clean("wrong password");

    // A password file others can read: exit 2.
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let line = error_line(&rig.run("snapshotter", &[]), 2);
    assert!(line.contains("chmod 600"), "{line}");
    check_clean("readable password file");

    // A missing bucket.
    rig.write_config(|t| {
        set(t, "store", "url", "s3://no-such-bucket/x");
    });
    let line = error_line(&rig.run("snapshotter", &[]), 1);
    assert!(
        line.contains("no-such-bucket") && line.contains("does not exist"),
        "{line}"
    );
    check_clean("missing bucket");

    // Wrong S3 credentials: the error names the code and what to check,
    // never the secret.
    rig.write_config(|_| {});
    let wrong = "Wr0ngSecretKeyForTheTestServer";
    let out = rig
        .cmd("snapshotter")
        .env("AWS_SECRET_ACCESS_KEY", wrong)
        .output()
        .unwrap();
    let line = error_line(&out, 1);
    // (The check is a HEAD request: S3 answers it with a bare 403, no code.)
    assert!(
        (line.contains("SignatureDoesNotMatch") || line.contains("HTTP 403"))
            && line.contains("AWS_SECRET_ACCESS_KEY")
            && line.contains("clock"),
        "{line}"
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains(wrong));
    check_clean("wrong S3 credentials");

    // The server's data directory is not on the snapshotted volume.
    let other = rig.vol.mnt.join("other");
    assert!(Command::new("btrfs")
        .args(["subvolume", "create"])
        .arg(&other)
        .status()
        .unwrap()
        .success());
    rig.write_config(|t| {
        set(t, "volume", "mountpoint", other.to_str().unwrap());
        set(
            t,
            "volume",
            "datadir",
            other.join("mysql").to_str().unwrap(),
        );
    });
    let line = error_line(&rig.run("snapshotter", &[]), 2);
    assert!(
        line.contains("datadir") && line.contains("not on the snapshotted volume"),
        "{line}"
    );
    assert!(
        std::fs::read_dir(other.join(".mysnap-snapshots")).map_or(true, |mut d| d.next().is_none())
    );
    check_clean("datadir off the volume");

    // And with everything right again, a backup works.
    rig.write_config(|_| {});
    rig.backup();
}

#[test]
fn a_snapshotter_whose_reader_went_away_exits_1_and_removes_its_snapshot() {
    if !gate("a_snapshotter_whose_reader_went_away_exits_1_and_removes_its_snapshot") {
        return;
    }
    let rig = Rig::new(StoreKind::File);
    // `snapshotter | archiver` whose archiver died at once: the pipe's read
    // end is closed before the snapshotter prints the manifest path.
    let mut child = rig
        .cmd("snapshotter")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let line = error_line(&out, 1);
    assert!(
        line.contains("cannot hand the manifest") && line.contains("the snapshot was removed"),
        "{line}"
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    assert!(rig.snapshots().is_empty(), "{:?}", rig.snapshots());
    assert!(rig.pending().is_empty(), "{:?}", rig.pending());
    rig.backup();
}

#[test]
fn sigterm_stops_the_archiver_which_aborts_the_upload_and_removes_the_snapshot() {
    if !gate("sigterm_stops_the_archiver_which_aborts_the_upload_and_removes_the_snapshot") {
        return;
    }
    let rig = Rig::new(StoreKind::S3);
    sysbench_prepare(&rig.db.socket, 4, 20_000);
    let (_, archiver) = archiver_signalled_mid_way(&rig, nix::sys::signal::Signal::SIGTERM);
    let out = archiver.wait_with_output().unwrap();
    let line = error_line(&out, 1);
    assert!(line.contains("interrupted"), "{line}");
    assert!(out.stdout.is_empty(), "no backup id is printed");
    assert!(
        rig.snapshots().is_empty(),
        "the snapshot was removed: {:?}",
        rig.snapshots()
    );
    assert!(rig.pending().is_empty());
    assert!(
        rig.store_keys().is_empty(),
        "nothing stored: {:?}",
        rig.store_keys()
    );
    // No multipart upload is left behind on the server (s3s-fs keeps parts as dotfiles in its root).
    let s3 = rig.s3.as_ref().unwrap();
    let parts: Vec<_> = std::fs::read_dir(&s3.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".upload"))
        .collect();
    assert!(parts.is_empty(), "multipart leftovers: {parts:?}");
}

#[test]
fn the_deploy_wrapper_backs_up_and_passes_on_the_failing_programs_exit_code() {
    if !gate("the_deploy_wrapper_backs_up_and_passes_on_the_failing_programs_exit_code") {
        return;
    }
    let rig = Rig::new(StoreKind::File);
    let wrapper = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mysnap-backup");
    let bin_dir = bin("snapshotter").parent().unwrap().to_path_buf();
    let run = || {
        Command::new("sh")
            .arg(&wrapper)
            .arg("-q")
            .env("MYSNAP_BIN_DIR", &bin_dir)
            .env("MYSNAP_CONFIG", &rig.config)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = run();
    assert_ok(&out, "deploy/mysnap-backup");
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(common::manifest::is_backup_id(&id), "stdout: {id:?}");
    let list = rig.run("restorer", &["list", "--json"]);
    assert_ok(&list, "restorer list");
    assert!(String::from_utf8_lossy(&list.stdout).contains(&id));
    assert!(rig.snapshots().is_empty());

    // A configuration error in snapshotter: its exit code, and no archiver run.
    rig.write_config(|t| set(t, "mysql", "lock_methd", "ftwrl"));
    let out = run();
    assert!(error_line(&out, 2).contains("lock_methd"));
    assert!(out.stdout.is_empty());
}

// ---------------------------------------------------------------------------
// A flaky S3: the real server behind the fault-injecting proxy.

/// A rig whose store is reached through a fault proxy (returned), with the
/// archive uncompressed (so it is a multipart upload), `read_timeout` and
/// the default 5 attempts per request. (The test server joins 80 MiB of
/// parts in a few seconds: a read timeout shorter than that fails the
/// CompleteMultipartUpload.)
fn flaky_rig(read_timeout: &str) -> (Rig, FaultProxy) {
    let rig = Rig::new(StoreKind::S3);
    let proxy = FaultProxy::start(&rig.s3.as_ref().unwrap().endpoint);
    rig.write_config(|t| {
        set(t, "store", "endpoint", proxy.endpoint.clone());
        set(t, "store", "read_timeout", read_timeout);
        set(t, "archive", "compression", "none");
    });
    (rig, proxy)
}

fn manifests(rig: &Rig) -> Vec<String> {
    rig.store_keys()
        .into_iter()
        .filter(|k| k.ends_with("manifest.toml"))
        .collect()
}

/// The upload records in the state directory (not a record still being
/// written: its temporary file is a dot file).
fn upload_records(rig: &Rig) -> Vec<String> {
    std::fs::read_dir(rig.state.join("uploads"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn transient_s3_faults_leave_the_backup_and_its_verify_intact() {
    if !gate("transient_s3_faults_leave_the_backup_and_its_verify_intact") {
        return;
    }
    let (rig, proxy) = flaky_rig("10s");
    for (fault, on) in [
        (Fault::SlowDown503, On::UploadPart),
        (Fault::ResetRequestBody, On::UploadPart),
        (Fault::InternalError500, On::UploadPart),
        (Fault::SlowDown503, On::CreateMultipartUpload),
        (Fault::InternalError500, On::CompleteMultipartUpload),
        // Carried out, but the answer is lost: the retry is refused.
        (Fault::TruncateResponseBody, On::CompleteMultipartUpload),
        (Fault::ResetRequestBody, On::PutObject),
        (Fault::StallResponse, On::PutObject),
    ] {
        proxy.inject(fault, on, Times::First(1));
    }
    let id = rig.backup();
    assert_eq!(proxy.injected(), 8, "{:?}", proxy.log());
    let key = format!("db1/{id}/manifest.toml");
    assert_eq!(manifests(&rig), std::slice::from_ref(&key));
    let m = Manifest::parse(&String::from_utf8(rig.fetch(&key)).unwrap(), &key).unwrap();
    let info = m.archive.expect("a stored manifest has its archive");
    assert!(info.size > 10 << 20, "a multipart upload: {}", info.size);
    assert_eq!(sha(&rig.fetch(&info.key)), info.sha256.as_str());
    assert!(uploads_on_server(&rig.s3.as_ref().unwrap().root).is_empty());
    assert!(upload_records(&rig).is_empty());

    for fault in [
        Fault::ResetResponseBody,
        Fault::TruncateResponseBody,
        Fault::SlowDown503,
        Fault::InternalError500,
        Fault::StallResponseBody,
    ] {
        proxy.inject(fault, On::GetObject, Times::First(1));
    }
    let out = rig.run("restorer", &["verify", &id]);
    assert_ok(&out, "restorer verify through a flaky S3");
    assert_eq!(proxy.injected(), 13, "{:?}", proxy.log());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("retrying"), "a warning per retry: {stderr}");
}

/// Snapshots, then archives through a store where `fault` hits every
/// UploadPart: the archiver fails with exit 1 within its bounds (5 attempts
/// per request, with backoff), names the store, and leaves nothing: no
/// object, no multipart upload, no upload record, no snapshot. Its error line.
fn archiver_failing_on_every_part(fault: Fault, read_timeout: &str) -> String {
    let (rig, proxy) = flaky_rig(read_timeout);
    proxy.inject(fault, On::UploadPart, Times::Always);
    let manifest = rig.snapshot();
    let started = Instant::now();
    let out = rig.run("archiver", &["--manifest", manifest.to_str().unwrap()]);
    let line = error_line(&out, 1);
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "{:?}: {line}",
        started.elapsed()
    );
    assert!(line.contains("s3://backups/fleet/db1/"), "{line}");
    assert!(rig.store_keys().is_empty(), "{:?}", rig.store_keys());
    assert!(uploads_on_server(&rig.s3.as_ref().unwrap().root).is_empty());
    assert!(upload_records(&rig).is_empty());
    assert!(rig.snapshots().is_empty());
    line
}

#[test]
fn a_persistent_503_fails_the_archiver_with_exit_1_and_leaves_nothing() {
    if !gate("a_persistent_503_fails_the_archiver_with_exit_1_and_leaves_nothing") {
        return;
    }
    let line = archiver_failing_on_every_part(Fault::SlowDown503, "10s");
    assert!(
        line.contains("SlowDown")
            && line.contains("store.max_attempts")
            && line.contains("not listed"),
        "{line}"
    );
}

#[test]
fn a_stalled_s3_fails_the_archiver_within_its_timeouts() {
    if !gate("a_stalled_s3_fails_the_archiver_within_its_timeouts") {
        return;
    }
    // 5 attempts of 2 s per part, plus backoff.
    archiver_failing_on_every_part(Fault::StallResponse, "2s");
}

#[test]
fn an_upload_left_by_a_killed_archiver_is_aborted_by_the_next_run() {
    if !gate("an_upload_left_by_a_killed_archiver_is_aborted_by_the_next_run") {
        return;
    }
    let (rig, proxy) = flaky_rig("10s");
    let root = rig.s3.as_ref().unwrap().root.clone();
    // The store stops answering parts: the archiver waits, with its upload begun.
    proxy.inject(Fault::StallResponse, On::UploadPart, Times::Always);
    let manifest = rig.snapshot();
    let mut archiver = rig
        .cmd("archiver")
        .args(["--manifest", manifest.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while upload_records(&rig).is_empty() || uploads_on_server(&root).is_empty() {
        assert!(Instant::now() < deadline, "the upload never began");
        std::thread::sleep(Duration::from_millis(50));
    }
    archiver.kill().unwrap(); // SIGKILL
    let _ = archiver.wait();
    assert_eq!(
        uploads_on_server(&root).len(),
        1,
        "kill -9 leaves the upload"
    );
    assert_eq!(upload_records(&rig).len(), 1, "and its record");

    proxy.clear();
    let manifest = rig.snapshot();
    let out = rig.run("archiver", &["--manifest", manifest.to_str().unwrap()]);
    assert_ok(&out, "the next archiver");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        uploads_on_server(&root).is_empty(),
        "the next run aborted it: {:?} left; records {:?}; proxy {:?}; {stderr}",
        uploads_on_server(&root),
        upload_records(&rig),
        proxy.log()
    );
    assert!(upload_records(&rig).is_empty(), "{stderr}");
    assert!(stderr.contains("aborted the upload"), "{stderr}");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(manifests(&rig), [format!("db1/{id}/manifest.toml")]);
}

#[test]
fn two_hosts_with_one_backup_name_and_id_store_one_intact_backup_and_the_other_fails() {
    if !gate("two_hosts_with_one_backup_name_and_id_store_one_intact_backup_and_the_other_fails") {
        return;
    }
    let rig = Rig::new(StoreKind::S3);
    rig.write_config(|t| set(t, "archive", "compression", "none"));
    let manifest_a = rig.snapshot();
    let a = Manifest::load(&manifest_a).unwrap();

    // Host B: its own state and snapshot directories, the same backup.name,
    // and (by a clock or a crafted manifest) the same backup id.
    let state_b = rig.tmp.path().join("state-b");
    let snaps_b = rig.vol.subvol.join(".snapshots-b");
    std::fs::create_dir_all(&snaps_b).unwrap();
    let snap_b = snaps_b.join(a.snapshot.name.as_str());
    let status = Command::new("btrfs")
        .args(["subvolume", "snapshot", "-r"])
        .arg(&a.snapshot.path)
        .arg(&snap_b)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let mut b = a.clone();
    b.snapshot.path = snap_b;
    let dir_b = state_b.join(a.backup_id.as_str());
    std::fs::create_dir_all(&dir_b).unwrap();
    let manifest_b = dir_b.join("manifest.toml");
    std::fs::write(&manifest_b, b.to_toml()).unwrap();
    let mut t: toml::Table =
        toml::from_str(&std::fs::read_to_string(&rig.config).unwrap()).unwrap();
    set(&mut t, "backup", "state_dir", state_b.to_str().unwrap());
    set(&mut t, "volume", "snapshot_dir", snaps_b.to_str().unwrap());
    let config_b = rig.tmp.path().join("b.toml");
    std::fs::write(&config_b, toml::to_string(&t).unwrap()).unwrap();

    let spawn = |config: &Path, manifest: &Path| {
        rig.cmd("archiver")
            .env("MYSNAP_CONFIG", config)
            .args(["--manifest", manifest.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (run_a, run_b) = (
        spawn(&rig.config, &manifest_a),
        spawn(&config_b, &manifest_b),
    );
    let outs = [
        run_a.wait_with_output().unwrap(),
        run_b.wait_with_output().unwrap(),
    ];
    let ok: Vec<&Output> = outs.iter().filter(|o| o.status.success()).collect();
    assert_eq!(
        ok.len(),
        1,
        "exactly one host stores the backup: {:?}",
        outs.iter()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .collect::<Vec<_>>()
    );
    let failed = outs.iter().find(|o| !o.status.success()).unwrap();
    let line = error_line(failed, 1);
    assert!(
        line.contains("exists already")
            && line.contains("backup.name")
            && line.contains(&format!("db1/{}", a.backup_id)),
        "{line}"
    );
    assert_eq!(
        manifests(&rig),
        [format!("db1/{}/manifest.toml", a.backup_id)]
    );
    assert!(uploads_on_server(&rig.s3.as_ref().unwrap().root).is_empty());
    let out = rig.run("restorer", &["verify", a.backup_id.as_str()]);
    assert_ok(&out, "verify of the one stored backup");
}

/// A writer inserting timestamped rows one after another on its own
/// connection until stopped: the longest gap between two consecutive
/// successful commits, and how many committed.
struct StallWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(Duration, usize)>,
}

impl StallWriter {
    fn start(db: &MariaDb) -> StallWriter {
        db.sql(
            "CREATE DATABASE IF NOT EXISTS d; \
             CREATE TABLE d.ticks (id INT AUTO_INCREMENT PRIMARY KEY, at DATETIME(6)) ENGINE=InnoDB",
        );
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, socket) = (stop.clone(), db.socket.to_string_lossy().into_owned());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                use mysql_async::prelude::Queryable;
                let opts = mysql_async::OptsBuilder::default()
                    .socket(Some(socket))
                    .user(Some("root"));
                let mut conn = mysql_async::Conn::new(opts).await.expect("writer connects");
                let (mut last, mut worst, mut n) = (Instant::now(), Duration::ZERO, 0);
                while !s.load(std::sync::atomic::Ordering::Relaxed) {
                    conn.query_drop("INSERT INTO d.ticks (at) VALUES (NOW(6))")
                        .await
                        .expect("writer's INSERT");
                    worst = worst.max(last.elapsed());
                    last = Instant::now();
                    n += 1;
                }
                (worst, n)
            })
        });
        StallWriter { stop, thread }
    }

    /// Stops it: the longest gap between consecutive commits, and the commits.
    fn finish(self) -> (Duration, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("writer thread")
    }
}

/// A directory holding a `btrfs` that runs the real one, but after
/// `subvolume snapshot` (which it does make) hangs for 30 s, as a snapshot
/// command stuck in the kernel or on a lock would.
fn hanging_btrfs(dir: &Path) -> PathBuf {
    let real = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v btrfs"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    assert!(real.starts_with('/'), "btrfs not found: {real:?}");
    let bin = dir.join("hang-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = bin.join("btrfs");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ \"$1 $2\" = \"subvolume snapshot\" ]; then\n  {real} \"$@\" || exit $?\n  exec sleep 30\nfi\nexec {real} \"$@\"\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// Subvolumes of the rig's btrfs filesystem other than the snapshotted one.
fn extra_subvolumes(rig: &Rig) -> Vec<String> {
    let out = Command::new("btrfs")
        .args(["subvolume", "list"])
        .arg(&rig.vol.mnt)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(" path ").map(|(_, p)| p.to_string()))
        .filter(|p| p != "vol")
        .collect()
}

/// The snapshot command hangs under the lock: the lock is ended at
/// `mysql.max_hold`, the run fails with exit 3 naming the step and the key,
/// the snapshot the command made is removed, nothing is saved, and a
/// writer's longest stall stays near the bound.
fn a_hanging_snapshot_command_is_cut_off_at_max_hold(lock_method: &str) {
    let rig = Rig::new(StoreKind::File);
    rig.write_config(|t| {
        set(t, "mysql", "max_hold", "2s");
        set(t, "mysql", "lock_method", lock_method);
    });
    let hang = hanging_btrfs(rig.tmp.path());
    let path = format!(
        "{}:{}",
        hang.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let writer = StallWriter::start(&rig.db);
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let out = rig.cmd("snapshotter").env("PATH", path).output().unwrap();
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let (stall, commits) = writer.finish();
    eprintln!(
        "{lock_method}: snapshotter ran {took:?}; the writer's longest stall {stall:?} over {commits} commits"
    );
    let line = error_line(&out, 3);
    eprintln!("{line}");
    assert!(
        line.contains("mysql.max_hold") && line.contains("btrfs subvolume snapshot"),
        "{line}"
    );
    assert!(
        stall < Duration::from_secs(4),
        "a writer stalled {stall:?} (max_hold 2s)"
    );
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert!(rig.snapshots().is_empty(), "{:?}", rig.snapshots());
    assert!(
        extra_subvolumes(&rig).is_empty(),
        "{:?}",
        extra_subvolumes(&rig)
    );
    assert!(rig.pending().is_empty(), "{:?}", rig.pending());
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("manifest"),
        "no manifest path printed"
    );
    // Writers go on at once.
    let t = Instant::now();
    rig.db.sql("INSERT INTO d.ticks (at) VALUES (NOW(6))");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // And the next backup, with the real command, works.
    rig.backup();
}

#[test]
fn a_hanging_snapshot_command_is_cut_off_at_max_hold_with_backup_stage() {
    if !gate("a_hanging_snapshot_command_is_cut_off_at_max_hold_with_backup_stage") {
        return;
    }
    a_hanging_snapshot_command_is_cut_off_at_max_hold("backup_stage");
}

#[test]
fn a_hanging_snapshot_command_is_cut_off_at_max_hold_with_ftwrl() {
    if !gate("a_hanging_snapshot_command_is_cut_off_at_max_hold_with_ftwrl") {
        return;
    }
    a_hanging_snapshot_command_is_cut_off_at_max_hold("ftwrl");
}

#[test]
fn a_second_snapshotter_leaves_a_handed_off_backup_to_its_late_archiver() {
    if !gate("a_second_snapshotter_leaves_a_handed_off_backup_to_its_late_archiver") {
        return;
    }
    let rig = Rig::new(StoreKind::File);
    let first = rig.snapshot();
    let m = Manifest::load(&first).unwrap();
    // Cron overlap: another snapshotter starts before the archiver did.
    let line = error_line(&rig.run("snapshotter", &[]), 1);
    assert!(
        line.contains(&format!("backup {} ", m.backup_id))
            && line.contains("was handed off")
            && line.contains("backup.handoff_grace"),
        "{line}"
    );
    assert_eq!(rig.snapshots(), [m.snapshot.name.to_string()]);
    assert_eq!(rig.pending(), [m.backup_id.to_string()]);

    // The archiver comes late, and while another run holds the state lock
    // for a moment: it waits, then archives the first snapshot.
    std::thread::sleep(Duration::from_secs(2));
    let mut holder = Command::new("flock")
        .arg(rig.state.join("lock"))
        .args(["sleep", "3"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let id = rig.archive(&first);
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(holder.wait().unwrap().success());
    assert_eq!(id, m.backup_id.as_str());
    assert!(rig.snapshots().is_empty(), "{:?}", rig.snapshots());
    assert!(rig.pending().is_empty(), "{:?}", rig.pending());
    assert!(rig
        .store_keys()
        .contains(&format!("db1/{id}/manifest.toml")));

    // A backup no archiver claimed within backup.handoff_grace is a killed
    // run's: the next snapshotter removes it and goes on.
    rig.write_config(|t| set(t, "backup", "handoff_grace", "10s"));
    let orphan = rig.snapshot();
    let o = Manifest::load(&orphan).unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&orphan)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let out = rig.run("snapshotter", &[]);
    assert_ok(&out, "snapshotter");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("removing snapshot {}", o.snapshot.name))
            && stderr.contains("no archiver claimed it within backup.handoff_grace"),
        "{stderr}"
    );
    let third = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let t = Manifest::load(&third).unwrap();
    assert_eq!(rig.snapshots(), [t.snapshot.name.to_string()]);
    assert_eq!(rig.pending(), [t.backup_id.to_string()]);
    rig.archive(&third);
}

/// Fills the filesystem of `file` with that one file until ENOSPC, by
/// `fallocate` in halving steps: milliseconds, not the seconds a write of
/// every byte takes, so the server's own writes barely meet a full
/// file system (on btrfs the free space `statvfs` reports is only right
/// once it is truly full).
fn fill_until_full(file: &Path) -> std::fs::File {
    use nix::fcntl::{fallocate, FallocateFlags};
    let f = std::fs::File::create(file).unwrap();
    let (mut len, mut step) = (0i64, 1i64 << 30);
    while step >= 4096 {
        match fallocate(&f, FallocateFlags::empty(), len, step) {
            Ok(()) => len += step,
            Err(nix::errno::Errno::ENOSPC) => step /= 2,
            Err(e) => panic!("filling {}: {e}", file.display()),
        }
    }
    f
}

#[test]
fn a_backup_on_a_full_btrfs_volume_fails_cleanly_before_the_lock() {
    if !gate("a_backup_on_a_full_btrfs_volume_fails_cleanly_before_the_lock") {
        return;
    }
    let rig = Rig::new(StoreKind::File);
    rig.db.sql(
        "CREATE DATABASE d; CREATE TABLE d.w (id INT AUTO_INCREMENT PRIMARY KEY) ENGINE=InnoDB; \
         INSERT INTO d.w VALUES ()",
    );
    let fill = rig.vol.mnt.join("fill");
    let f = fill_until_full(&fill);
    // Give 16 MiB back at once: still under the snapshotter's 64 MiB floor,
    // but the server itself (InnoDB, Aria, the binary log) is not left
    // without a block, which can make MariaDB give up and exit.
    let len = f.metadata().unwrap().len();
    f.set_len(len.saturating_sub(16 << 20)).unwrap();
    f.sync_all().unwrap();
    drop(f);
    Command::new("sync").status().unwrap();
    let started = Instant::now();
    let out = rig.run("snapshotter", &[]);
    let line = error_line(&out, 1);
    assert!(
        line.contains("is full") && line.contains("free space on it first"),
        "{line}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(rig.snapshots().is_empty(), "{:?}", rig.snapshots());
    assert!(
        extra_subvolumes(&rig).is_empty(),
        "{:?}",
        extra_subvolumes(&rig)
    );
    assert!(rig.pending().is_empty(), "{:?}", rig.pending());
    assert!(rig.store_keys().is_empty(), "{:?}", rig.store_keys());
    // Nothing was locked: once there is room, a write goes through at once,
    // and so does a backup.
    std::fs::remove_file(&fill).unwrap();
    Command::new("sync").status().unwrap();
    assert_insert_within(&rig, Duration::from_secs(2));
    rig.backup();
}

/// `archive.read_rate_limit` and `store.upload_rate_limit`: the backup
/// takes at least as long as its bytes need at those rates (a lower bound:
/// a busy machine only makes it slower) and is intact.
#[test]
fn a_rate_limited_backup_keeps_to_its_limits_and_is_intact() {
    if !gate("a_rate_limited_backup_keeps_to_its_limits_and_is_intact") {
        return;
    }
    let rig = Rig::new(StoreKind::S3);
    let (read_rate, upload_rate) = (40u64 << 20, 1u64 << 20);
    rig.write_config(|t| {
        set(t, "archive", "read_rate_limit", "40MiB");
        set(t, "store", "upload_rate_limit", "1MiB");
    });
    rig.db.sql("CREATE DATABASE d; CREATE TABLE d.t (id INT PRIMARY KEY, v TEXT); INSERT INTO d.t VALUES (1, 'one')");
    let id = rig.backup();
    let m = Manifest::parse(
        &String::from_utf8(rig.fetch(&format!("db1/{id}/manifest.toml"))).unwrap(),
        "store",
    )
    .unwrap();
    let a = m.archive.unwrap();
    let need = (a.unpacked_size as f64 / read_rate as f64).max(a.size as f64 / upload_rate as f64);
    assert!(
        a.archive_secs >= need * 0.95,
        "archived {} bytes ({} stored) in {:.2} s, under the {need:.2} s the limits allow",
        a.unpacked_size,
        a.size,
        a.archive_secs
    );
    let out = rig.run("restorer", &["verify", &id]);
    assert_ok(&out, "restorer verify of a rate-limited backup");
}
