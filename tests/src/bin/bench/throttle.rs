//! The throttling figures: mysnap's backup (zstd → file://) while sysbench
//! and the single-row writer load the same server, unthrottled and with
//! `archive.read_rate_limit` at a quarter of the unthrottled read rate, and
//! what the writers saw during each backup.

use std::fmt::Write as _;
use std::io::BufRead as _;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::dataset::Bench;
use crate::lock::Writer;
use crate::measure::{drop_caches, median};
use crate::report::Report;

/// The key's floor: `archive.read_rate_limit` is at least 1 MiB/s.
const FLOOR: u64 = 1 << 20;

/// A 2-thread sysbench read/write load reporting every second: when each
/// report arrived, its transactions per second and 95th percentile latency (ms).
struct Load {
    child: Child,
    samples: Arc<Mutex<Vec<(Instant, f64, f64)>>>,
}

impl Load {
    fn start(b: &Bench) -> Load {
        let mut child = mysnap_tests::sysbench(&b.db.socket, 8, b.rows)
            .args(["--time=3600", "--threads=2", "--report-interval=1", "run"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run sysbench: {e} (apt-get install sysbench)"));
        let out = child.stdout.take().unwrap();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let s = samples.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let (Some(tps), Some(p95)) =
                    (field(&line, "tps:"), field(&line, "lat (ms,95%):"))
                {
                    s.lock().unwrap().push((Instant::now(), tps, p95));
                }
            }
        });
        Load { child, samples }
    }

    /// Mean tps and median p95 (ms) over the one-second reports that overlap
    /// `from..to`.
    fn during(&self, from: Instant, to: Instant) -> (f64, f64) {
        let s = self.samples.lock().unwrap();
        let w: Vec<_> = s
            .iter()
            .filter(|(t, _, _)| *t > from && *t - Duration::from_secs(1) < to)
            .collect();
        let tps = w.iter().map(|x| x.1).sum::<f64>() / w.len() as f64;
        (tps, median(w.iter().map(|x| x.2).collect()))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The number after `name` in a sysbench report line.
fn field(line: &str, name: &str) -> Option<f64> {
    line.split_once(name)?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// One throttling row's medians.
struct Figures {
    secs: f64,
    tps: f64,
    p95: f64,
    stall: f64,
}

/// `--runs` backups (snapshotter | archiver, zstd → file://) from a dropped
/// cache with `config`, under `load` and `writer`: medians per figure.
fn backups(b: &Bench, config: &Path, load: &Load, writer: &Writer) -> Figures {
    let (mut secs, mut tps, mut p95, mut stall) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..b.args.runs {
        b.clear_stores();
        drop_caches();
        writer.take_max();
        let t = Instant::now();
        let m = b.snapshot(config).expect("snapshotter");
        let ok = b
            .cmd("archiver", config)
            .args(["--manifest", m.to_str().unwrap()])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "archiver: {ok}");
        let end = Instant::now();
        stall.push(writer.take_max());
        secs.push((end - t).as_secs_f64());
        // The report of the second the backup ended in.
        std::thread::sleep(Duration::from_millis(1100));
        let (x, p) = load.during(t, end);
        tps.push(x);
        p95.push(p);
    }
    b.clear_stores();
    Figures {
        secs: median(secs),
        tps: median(tps),
        p95: median(p95),
        stall: median(stall),
    }
}

/// The throttling table: no backup, an unthrottled backup, and one with
/// `archive.read_rate_limit` at a quarter of the unthrottled rate (at least
/// the key's floor), each under a sysbench load, with `writer` running.
pub fn measure(b: &Bench, data_bytes: u64, writer: &Writer, report: &mut Report) {
    let load = Load::start(b);
    std::thread::sleep(Duration::from_secs(3));
    writer.take_max();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let (idle_tps, idle_p95) = load.during(t + Duration::from_secs(1), Instant::now());
    let idle_stall = writer.take_max();

    let plain = b.source_config(&b.file_url(), "zstd", "");
    let full = backups(b, &plain, &load, writer);
    let limit = ((data_bytes as f64 / full.secs / 4.0) as u64).max(FLOOR);
    let throttled_config = b.tmp.path().join("mysnap-throttled.toml");
    let text = std::fs::read_to_string(&plain).unwrap().replacen(
        "[archive]\n",
        &format!("[archive]\nread_rate_limit = \"{}KiB\"\n", limit >> 10),
        1,
    );
    std::fs::write(&throttled_config, text).unwrap();
    let slow = backups(b, &throttled_config, &load, writer);
    drop(load);

    writeln!(
        report.md,
        "\n## Throttling (backup zstd → file:// under sysbench 2 threads and the single-row writer; \
         tps and p95: sysbench's per-second reports during the backup; stall: the longest single-row UPDATE)\n\n\
         | backup | time | MB/s | sysbench tps | p95 latency | writer stall |\n|---|---|---|---|---|---|"
    )
    .unwrap();
    writeln!(
        report.md,
        "| none (5 s of the load alone) | | | {idle_tps:.0} | {idle_p95:.1} ms | {:.1} ms |",
        idle_stall * 1e3
    )
    .unwrap();
    let label = format!(
        "`read_rate_limit = \"{}\"`",
        bytesize::ByteSize(limit >> 10 << 10).display().iec()
    );
    let mut json = vec![serde_json::json!({"backup": "none", "secs": null,
        "tps": idle_tps, "p95_ms": idle_p95, "stall_secs": idle_stall})];
    for (what, key, limit, f) in [
        ("unthrottled", "unthrottled", None, &full),
        (label.as_str(), "throttled", Some(limit), &slow),
    ] {
        let mbs = data_bytes as f64 / 1e6 / f.secs;
        writeln!(
            report.md,
            "| {what} | {:.2} s | {mbs:.0} | {:.0} | {:.1} ms | {:.1} ms |",
            f.secs,
            f.tps,
            f.p95,
            f.stall * 1e3
        )
        .unwrap();
        json.push(
            serde_json::json!({"backup": key, "read_rate_limit": limit, "secs": f.secs,
            "mb_per_s": mbs, "tps": f.tps, "p95_ms": f.p95, "stall_secs": f.stall}),
        );
    }
    report.json.insert("throttling".into(), json.into());
}
