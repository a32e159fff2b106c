//! `mysnap-lock-stall`: how long a concurrent writer stalls while the
//! snapshotter takes a snapshot, FLUSH TABLES WITH READ LOCK against BACKUP
//! STAGE, on an idle server and under a sysbench read/write load.
//!
//! A separate connection runs `UPDATE d.t SET v = v + 1 WHERE id = 1`
//! (autocommit) in a tight loop while one snapshotter runs; the figure of a
//! snapshot is the longest one statement took. The methods alternate, so
//! drift hits both alike. Needs root (btrfs loop volume), MariaDB, sysbench
//! and the workspace binaries (`cargo build --workspace --bins`). Checks nothing.
//!
//! `cargo run -p mysnap-tests --bin mysnap-lock-stall -- --runs 10`

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use common::manifest::Manifest;
use mysnap_tests::{sysbench_prepare, sysbench_run, BtrfsVolume, MariaDb, MariaOpts};
use mysql_async::prelude::Queryable;

#[derive(Parser)]
#[command(about = "Writer stall during a snapshot: ftwrl vs backup_stage")]
struct Args {
    /// Snapshots per method and scenario (the median is reported)
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Directory of the mysnap binaries
    #[arg(long, default_value = "target/debug")]
    bin_dir: PathBuf,
}

const METHODS: [&str; 2] = ["ftwrl", "backup_stage"];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs the UPDATE loop on its own thread until `stop`; the longest statement.
fn writer(socket: &Path, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Duration> {
    let socket = socket.to_string_lossy().into_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let opts = mysql_async::OptsBuilder::default()
                .user(Some("root"))
                .socket(Some(socket));
            let mut c = mysql_async::Conn::new(opts).await.unwrap();
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                c.query_drop("UPDATE d.t SET v = v + 1 WHERE id = 1")
                    .await
                    .unwrap();
                worst = worst.max(t.elapsed());
            }
            worst
        })
    })
}

struct Rig {
    args: Args,
    db: MariaDb,
    _vol: BtrfsVolume,
    tmp: tempfile::TempDir,
    vol_root: PathBuf,
}

impl Rig {
    fn config(&self, method: &str) -> PathBuf {
        let path = self.tmp.path().join(format!("{method}.toml"));
        std::fs::write(
            &path,
            format!(
                "[mysql]\nsocket = \"{}\"\nlock_timeout = \"5s\"\nlock_method = \"{method}\"\n\
                 [volume]\nbackend = \"btrfs\"\nmountpoint = \"{vol}\"\ndatadir = \"{vol}/mysql\"\n\
                 [store]\nurl = \"file://{}\"\n[backup]\nname = \"stall\"\nstate_dir = \"{}\"\n",
                self.db.socket.display(),
                self.tmp.path().join("store").display(),
                self.tmp.path().join("state").display(),
                vol = self.vol_root.display(),
            ),
        )
        .unwrap();
        path
    }

    /// One snapshot with `method` under the writer: (worst statement, lock
    /// hold) in seconds. Stalls over 300 ms are shown with the lock's times.
    fn one(&self, method: &str) -> (f64, f64) {
        let config = self.config(method);
        let stop = Arc::new(AtomicBool::new(false));
        let w = writer(&self.db.socket, stop.clone());
        std::thread::sleep(Duration::from_millis(300));
        let out = Command::new(self.args.bin_dir.join("snapshotter"))
            .env("MYSNAP_CONFIG", &config)
            .arg("-q")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        let worst = w.join().unwrap();
        assert!(out.status.success(), "snapshotter failed");
        let manifest = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        let m = Manifest::load(&manifest).unwrap();
        assert_eq!(m.lock.method, method);
        let ok = Command::new("btrfs")
            .args(["subvolume", "delete"])
            .arg(&m.snapshot.path)
            .stdout(Stdio::null())
            .status();
        assert!(ok.is_ok_and(|s| s.success()));
        std::fs::remove_dir_all(manifest.parent().unwrap()).unwrap();
        if worst > Duration::from_millis(300) {
            eprintln!(
                "{method}: a writer stalled {worst:?}; lock waited {:.3}s, held {:.3}s",
                m.lock.wait_secs, m.lock.hold_secs
            );
        }
        (worst.as_secs_f64(), m.lock.hold_secs)
    }

    fn scenario(&self, name: &str) {
        let mut stall = [Vec::new(), Vec::new()];
        let mut hold = [Vec::new(), Vec::new()];
        for _ in 0..self.args.runs {
            for (i, method) in METHODS.iter().enumerate() {
                let (s, h) = self.one(method);
                stall[i].push(s * 1000.0);
                hold[i].push(h * 1000.0);
            }
        }
        for (i, method) in METHODS.iter().enumerate() {
            let mut sorted = stall[i].clone();
            sorted.sort_by(f64::total_cmp);
            let p90 = sorted[(sorted.len() * 9 / 10).min(sorted.len() - 1)];
            println!(
                "| {name} | {method} | {:.1} | {p90:.1} | {:.1} | {:.1} |",
                median(stall[i].clone()),
                sorted.last().copied().unwrap_or(f64::NAN),
                median(hold[i].clone())
            );
        }
    }
}

fn main() {
    let args = Args::parse();
    let tmp = tempfile::Builder::new()
        .prefix("mysnap-lock-stall-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let vol = BtrfsVolume::new(tmp.path(), 2048);
    let db = MariaDb::start(&vol.subvol.join("mysql"), MariaOpts::default());
    db.sql("CREATE DATABASE d; CREATE TABLE d.t (id INT PRIMARY KEY, v BIGINT) ENGINE=InnoDB; INSERT INTO d.t VALUES (1, 0)");
    sysbench_prepare(&db.socket, 4, 10_000);
    std::fs::create_dir_all(tmp.path().join("store")).unwrap();
    let rig = Rig {
        vol_root: vol.subvol.clone(),
        args,
        db,
        _vol: vol,
        tmp,
    };
    println!(
        "{} snapshots per row; worst UPDATE latency during one snapshot (ms)\n",
        rig.args.runs
    );
    println!("| server | method | stall median | stall p90 | stall max | hold median |\n|---|---|---|---|---|---|");
    rig.scenario("idle");
    let mut load = sysbench_run(&rig.db.socket, 4, 10_000, 3600);
    std::thread::sleep(Duration::from_secs(3));
    rig.scenario("sysbench");
    let _ = load.kill();
    let _ = load.wait();
}
