//! The lock figures: wait and hold from the snapshotter's manifest, and the
//! worst stall a single-row writer saw during each snapshotter run.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::manifest::Manifest;
use mysnap_tests::{sysbench_run, MariaDb};

use crate::dataset::Bench;
use crate::measure::{max, median};
use crate::report::Report;

/// A single-row autocommit writer in a loop, on its own connection: the
/// longest one statement took since the last [`Writer::take_max`] is the
/// worst stall a writer saw.
pub struct Writer {
    max_us: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub fn start(db: &MariaDb) -> Writer {
        db.sql(
            "CREATE DATABASE IF NOT EXISTS bench; \
             CREATE TABLE IF NOT EXISTS bench.w (id INT PRIMARY KEY, v BIGINT) ENGINE=InnoDB; \
             REPLACE INTO bench.w VALUES (1, 0)",
        );
        let (max_us, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let socket = db.socket.to_string_lossy().into_owned();
        let (m, s) = (max_us.clone(), stop.clone());
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
                while !s.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    conn.query_drop("UPDATE bench.w SET v = v + 1 WHERE id = 1")
                        .await
                        .expect("writer's UPDATE");
                    m.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
            });
        });
        Writer {
            max_us,
            stop,
            thread: Some(thread),
        }
    }

    /// The worst latency since the last call, in seconds.
    pub fn take_max(&self) -> f64 {
        self.max_us.swap(0, Ordering::Relaxed) as f64 / 1e6
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Lock wait, hold and writer stall of some snapshotter runs, in seconds.
#[derive(Default)]
pub struct Lock {
    pub wait: Vec<f64>,
    pub hold: Vec<f64>,
    pub stall: Vec<f64>,
}

impl Bench {
    /// `n` snapshots with `method`: lock wait, hold, and the worst stall of a
    /// single-row writer during each snapshotter run.
    pub fn lock_times(
        &self,
        n: usize,
        method: Option<&str>,
        writer: &Writer,
    ) -> Result<Lock, String> {
        let extra = method.map_or(String::new(), |m| format!("lock_method = \"{m}\"\n"));
        let config = self.source_config(&self.file_url(), "zstd", &extra);
        let mut l = Lock::default();
        for _ in 0..n {
            writer.take_max();
            let m = self.snapshot(&config)?;
            l.stall.push(writer.take_max());
            let lock = Manifest::load(&m).unwrap().lock;
            l.wait.push(lock.wait_secs);
            l.hold.push(lock.hold_secs);
            self.discard(&m);
        }
        Ok(l)
    }
}

/// The lock table: `--lock-runs` snapshots per method, idle and under a
/// sysbench read/write load, with `writer` running throughout.
pub fn measure(b: &Bench, writer: &Writer, report: &mut Report) {
    writeln!(
        report.md,
        "## Lock ({} snapshots each; stall: the longest one single-row UPDATE took during a snapshotter run)\n\n\
         | method | load | wait median | hold median | hold max | writer stall median | stall max |\n|---|---|---|---|---|---|---|",
        b.args.lock_runs
    )
    .unwrap();
    let mut lock_json = Vec::new();
    for loaded in [false, true] {
        let mut load = loaded.then(|| sysbench_run(&b.db.socket, 8, b.rows, 3600));
        if loaded {
            std::thread::sleep(Duration::from_secs(3));
        }
        // The methods alternate, so drift in the machine's load hits both alike.
        let methods = ["ftwrl", "backup_stage"];
        let mut results: Vec<Result<Lock, String>> =
            methods.iter().map(|_| Ok(Lock::default())).collect();
        for _ in 0..b.args.lock_runs {
            for (method, acc) in methods.iter().zip(results.iter_mut()) {
                if let Ok(a) = acc {
                    match b.lock_times(1, Some(method), writer) {
                        Ok(l) => {
                            a.wait.extend(l.wait);
                            a.hold.extend(l.hold);
                            a.stall.extend(l.stall);
                        }
                        Err(e) => *acc = Err(e),
                    }
                }
            }
        }
        if let Some(l) = load.as_mut() {
            let _ = l.kill();
            let _ = l.wait();
        }
        let load = if loaded { "sysbench 2 threads" } else { "idle" };
        for (method, r) in methods.iter().zip(results) {
            match r {
                Ok(l) => {
                    writeln!(
                        report.md,
                        "| {method} | {load} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
                        median(l.wait.clone()) * 1e3,
                        median(l.hold.clone()) * 1e3,
                        max(&l.hold) * 1e3,
                        median(l.stall.clone()) * 1e3,
                        max(&l.stall) * 1e3
                    )
                    .unwrap();
                    lock_json.push(serde_json::json!({"method": method, "load": load,
                        "wait": l.wait, "hold": l.hold, "stall": l.stall}));
                }
                Err(e) => writeln!(report.md, "| {method} | {load} | {e} | | | | |").unwrap(),
            }
        }
    }
    report.json.insert("lock".into(), lock_json.into());
}
