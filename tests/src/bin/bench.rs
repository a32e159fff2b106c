//! `mysnap-bench`: what `cargo xtask bench` runs. Prepares a sysbench dataset
//! on a btrfs loop volume and measures, in one run and on the same data,
//! mysnap next to its peers (mariabackup, mysqldump, mydumper) and the
//! hardware's limits, with the page cache dropped before every timed run.
//! Then grows the data to `--scale`× and measures the core figures again.
//! Reports medians and ratios (Markdown, JSON and a PNG chart in `--out`);
//! checks nothing.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use common::manifest::Manifest;
use mysnap_tests::{sysbench_prepare, sysbench_run, BtrfsVolume, MariaDb, MariaOpts, S3Server};

#[derive(Parser)]
#[command(about = "Benchmark mysnap against its peers and the hardware's limits")]
struct Args {
    /// Size of the sysbench dataset (on disk, about)
    #[arg(long, default_value = "1GiB")]
    size: bytesize::ByteSize,
    /// Runs of each measurement (the median is reported)
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Snapshots for the lock figures, per lock method, idle and under load each
    #[arg(long, default_value_t = 10)]
    lock_runs: usize,
    /// Grow the data to this many times --size and measure the core figures
    /// again (1: don't)
    #[arg(long, default_value_t = 4)]
    scale: u32,
    /// Measure the lock only (both methods, idle and loaded), then stop
    #[arg(long)]
    lock_only: bool,
    /// Directory of the release binaries
    #[arg(long)]
    bin_dir: PathBuf,
    /// Where the report goes
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

// ---------------------------------------------------------------------------
// Measuring

fn drop_caches() {
    let _ = Command::new("sync").status();
    if std::fs::write("/proc/sys/vm/drop_caches", "3").is_err() {
        eprintln!("bench: cannot drop the page cache (not root?): figures are warm");
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

/// Runs `cmd` to success, sampling its peak RSS (VmHWM, KiB) until it exits.
fn measured(cmd: &mut Command) -> u64 {
    let mut child = cmd.spawn().expect("spawn");
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    let status = loop {
        if let Ok(s) = std::fs::read_to_string(&status_path) {
            if let Some(kib) = s
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
            {
                peak = kib;
            }
        }
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{cmd:?} failed: {status}");
    peak
}

/// Runs a bash pipeline (pipefail) from a dropped page cache; its wall time.
fn shell_time(script: &str) -> Result<f64, String> {
    drop_caches();
    let t = Instant::now();
    let out = Command::new("bash")
        .args(["-o", "pipefail", "-c", script])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("").to_string();
        eprintln!("bench: `{script}` failed: {err}");
        return Err(format!("failed: {last}"));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// `script`'s time plus starting a server on `datadir` until it answers.
fn until_answering(datadir: &Path, script: &str) -> Result<f64, String> {
    let t = shell_time(script)?;
    let s = Instant::now();
    let server = MariaDb::start(datadir, MariaOpts::default());
    let t = t + s.elapsed().as_secs_f64();
    drop(server);
    Ok(t)
}

/// Median over `runs` of `f`, each preceded by `setup`; the first error ends it.
fn timed(
    runs: usize,
    mut setup: impl FnMut(),
    mut f: impl FnMut() -> Result<f64, String>,
) -> Result<f64, String> {
    let mut v = Vec::new();
    for _ in 0..runs {
        setup();
        v.push(f()?);
    }
    Ok(median(v))
}

fn du(path: &Path) -> u64 {
    walkdir::WalkDir::new(path)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

fn fresh_dir(path: &Path) {
    let _ = std::fs::remove_dir_all(path);
    std::fs::create_dir_all(path).unwrap();
}

/// A single-row autocommit writer in a loop, on its own connection: the
/// longest one statement took since the last [`Writer::take_max`] is the
/// worst stall a writer saw.
struct Writer {
    max_us: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(db: &MariaDb) -> Writer {
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
    fn take_max(&self) -> f64 {
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

// ---------------------------------------------------------------------------
// The rig

struct Bench {
    args: Args,
    db: MariaDb,
    s3: S3Server,
    vol: BtrfsVolume,
    tmp: tempfile::TempDir,
}

/// What one mysnap config points at.
struct Target<'a> {
    socket: &'a Path,
    mountpoint: &'a Path,
    /// `mysql.stop_command` and `start_command`, for a restore target.
    service: Option<(Vec<String>, Vec<String>)>,
}

impl Bench {
    fn file_url(&self) -> String {
        format!("file://{}", self.tmp.path().join("store").display())
    }

    fn config(&self, t: &Target, store_url: &str, compression: &str, mysql_extra: &str) -> PathBuf {
        let mut text = format!(
            "[mysql]\nsocket = \"{}\"\nlock_timeout = \"5s\"\n{mysql_extra}",
            t.socket.display()
        );
        if let Some((stop, start)) = &t.service {
            writeln!(text, "stop_command = {stop:?}\nstart_command = {start:?}").unwrap();
        }
        write!(
            text,
            "[volume]\nbackend = \"btrfs\"\nmountpoint = \"{vol}\"\ndatadir = \"{vol}/mysql\"\nowner = \"root\"\n\
             [store]\nurl = \"{store_url}\"\n",
            vol = t.mountpoint.display()
        )
        .unwrap();
        if store_url.starts_with("s3://") {
            write!(
                text,
                "endpoint = \"{}\"\nforce_path_style = true\nregion = \"us-east-1\"\n",
                self.s3.endpoint
            )
            .unwrap();
        }
        write!(
            text,
            "[archive]\ncompression = \"{compression}\"\n[backup]\nname = \"bench\"\nstate_dir = \"{}\"\n",
            self.tmp.path().join("state").display()
        )
        .unwrap();
        let path = self.tmp.path().join(format!(
            "mysnap-{}.toml",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn source_config(&self, store_url: &str, compression: &str, mysql_extra: &str) -> PathBuf {
        self.config(
            &Target {
                socket: &self.db.socket,
                mountpoint: &self.vol.subvol,
                service: None,
            },
            store_url,
            compression,
            mysql_extra,
        )
    }

    fn cmd(&self, name: &str, config: &Path) -> Command {
        let mut c = Command::new(self.args.bin_dir.join(name));
        c.env("MYSNAP_CONFIG", config)
            .envs(self.s3.env())
            .arg("-q")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        c
    }

    fn snapshot(&self, config: &Path) -> Result<PathBuf, String> {
        let out = self
            .cmd("snapshotter", config)
            .stdout(Stdio::piped())
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(format!("snapshotter failed ({})", out.status));
        }
        Ok(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
    }

    /// Removes a snapshot the bench took without archiving it.
    fn discard(&self, manifest: &Path) {
        let m = Manifest::load(manifest).unwrap();
        let ok = Command::new("btrfs")
            .args(["subvolume", "delete"])
            .arg(&m.snapshot.path)
            .stdout(Stdio::null())
            .status();
        assert!(ok.is_ok_and(|s| s.success()));
        std::fs::remove_dir_all(manifest.parent().unwrap()).unwrap();
    }

    /// `n` snapshots with `method`: lock wait, hold, and the worst stall of a
    /// single-row writer during each snapshotter run.
    fn lock_times(&self, n: usize, method: Option<&str>, writer: &Writer) -> Result<Lock, String> {
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

    /// One curl request to the S3 server, signed (SigV4, credentials from a
    /// file, not argv), from a dropped page cache: its wall time.
    fn curl(&self, args: &str, key: &str) -> Result<f64, String> {
        let keys = self.s3.env();
        let cfg = self.tmp.path().join("curl.cfg");
        std::fs::write(&cfg, format!("user = \"{}:{}\"\n", keys[0].1, keys[1].1)).unwrap();
        shell_time(&format!(
            "curl -sSf -K {} --aws-sigv4 aws:amz:us-east-1:s3 -H x-amz-content-sha256:UNSIGNED-PAYLOAD {args} {}/bench/{key}",
            cfg.display(),
            self.s3.endpoint
        ))
    }

    fn clear_stores(&self) {
        for d in [
            self.tmp.path().join("store/bench"),
            self.s3.root.join("bench/bench"),
        ] {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    fn data_bytes(&self) -> u64 {
        du(&self.vol.subvol.join("mysql"))
    }

    /// snapshotter + archiver from a dropped cache: time, archiver's peak RSS, stored size.
    fn mysnap_backup(&self, url: &str, compression: &str) -> Backup {
        let config = self.source_config(url, compression, "");
        let (mut secs, mut rss, mut size) = (Vec::new(), Vec::new(), 0);
        for _ in 0..self.args.runs {
            self.clear_stores();
            drop_caches();
            let t = Instant::now();
            let m = self.snapshot(&config).expect("snapshotter");
            let peak = measured(
                self.cmd("archiver", &config)
                    .args(["--manifest", m.to_str().unwrap()])
                    .stdout(Stdio::null()),
            );
            secs.push(t.elapsed().as_secs_f64());
            rss.push(peak as f64 / 1024.0);
            let root = if url.starts_with("s3") {
                self.s3.root.join("bench/bench")
            } else {
                self.tmp.path().join("store/bench")
            };
            size = walkdir::WalkDir::new(root)
                .into_iter()
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("data.tar"))
                .map(|e| e.metadata().unwrap().len())
                .sum();
        }
        Backup {
            secs: median(secs),
            rss_mib: median(rss),
            size,
        }
    }

    /// One zstd backup into the S3 store: its id and stored archive path.
    fn stored_backup(&self) -> (String, PathBuf, u64) {
        self.clear_stores();
        let config = self.source_config("s3://bench/bench", "zstd", "");
        let m = self.snapshot(&config).expect("snapshotter");
        let out = self
            .cmd("archiver", &config)
            .args(["--manifest", m.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "archiver");
        let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let stored = self.s3.root.join(format!("bench/bench/bench/{id}"));
        let manifest = Manifest::parse(
            &std::fs::read_to_string(stored.join("manifest.toml")).unwrap(),
            "bench",
        )
        .unwrap();
        let unpacked = manifest.archive.as_ref().unwrap().unpacked_size;
        (id, stored.join("data.tar.zst"), unpacked)
    }

    /// `restorer restore ID` onto `target` from a dropped cache: time, peak
    /// RSS, server downtime; the `.old` directory is removed after each run.
    fn mysnap_restore(&self, target: &MariaDb, id: &str, store_url: &str) -> Restore {
        let root = target.datadir.parent().unwrap();
        let config = self.config(
            &Target {
                socket: &target.socket,
                mountpoint: root,
                service: Some(target.service_commands()),
            },
            store_url,
            "zstd",
            "",
        );
        let (mut secs, mut rss, mut down, mut unpack) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.args.runs {
            drop_caches();
            let out_path = self.tmp.path().join("restore.json");
            let t = Instant::now();
            let peak = measured(
                self.cmd("restorer", &config)
                    .args(["restore", id])
                    .stdout(std::fs::File::create(&out_path).unwrap()),
            );
            secs.push(t.elapsed().as_secs_f64());
            rss.push(peak as f64 / 1024.0);
            let r: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
            down.push(r["downtime_secs"].as_f64().unwrap_or(f64::NAN));
            unpack.push(r["unpack_secs"].as_f64().unwrap_or(f64::NAN));
            if let Some(old) = r["old_datadir"].as_str() {
                std::fs::remove_dir_all(old).unwrap();
            }
        }
        Restore {
            secs: median(secs),
            rss_mib: median(rss),
            down: median(down),
            unpack: median(unpack),
        }
    }

    /// A second server for restores (mysnap, dump reloads).
    fn target_server(&self, name: &str) -> MariaDb {
        MariaDb::start(
            &self.tmp.path().join(name).join("mysql"),
            MariaOpts {
                server_id: 2,
                ..MariaOpts::default()
            },
        )
    }
}

#[derive(Default)]
struct Lock {
    wait: Vec<f64>,
    hold: Vec<f64>,
    stall: Vec<f64>,
}

#[derive(Clone, Copy)]
struct Backup {
    secs: f64,
    rss_mib: f64,
    size: u64,
}

#[derive(Clone, Copy)]
struct Restore {
    secs: f64,
    rss_mib: f64,
    down: f64,
    /// Download → unpacked and synced, before the swap.
    unpack: f64,
}

// ---------------------------------------------------------------------------
// Reporting

/// One row of a contender table.
struct Row {
    label: String,
    /// Time in seconds, or why there is none.
    secs: Result<f64, String>,
    /// The limit with the same work (for `× limit`).
    limit: Option<f64>,
    /// mysnap's time for the same job (for `÷ mysnap`, peers only).
    mysnap: Option<f64>,
    size: Option<u64>,
    rss_mib: Option<f64>,
}

impl Row {
    fn new(label: impl Into<String>, secs: Result<f64, String>) -> Row {
        Row {
            label: label.into(),
            secs,
            limit: None,
            mysnap: None,
            size: None,
            rss_mib: None,
        }
    }
}

fn table(report: &mut String, rows: &[Row], bytes: u64) {
    writeln!(
        report,
        "| contender | time | MB/s | × limit | ÷ mysnap | output | peak RSS |\n|---|---|---|---|---|---|---|"
    )
    .unwrap();
    for r in rows {
        let opt = |v: Option<String>| v.unwrap_or_default();
        match &r.secs {
            Ok(s) => writeln!(
                report,
                "| {} | {s:.2} s | {:.0} | {} | {} | {} | {} |",
                r.label,
                bytes as f64 / 1e6 / s,
                opt(r.limit.map(|l| format!("{:.2}", s / l))),
                opt(r.mysnap.map(|m| format!("{:.2}", s / m))),
                opt(r.size.map(|b| bytesize::ByteSize(b).to_string())),
                opt(r.rss_mib.map(|m| format!("{m:.0} MiB"))),
            ),
            Err(e) => writeln!(report, "| {} | {e} | | | | | |", r.label),
        }
        .unwrap();
    }
}

fn json_rows(rows: &[Row]) -> serde_json::Value {
    rows.iter()
        .map(|r| {
            serde_json::json!({
                "label": r.label,
                "secs": r.secs.as_ref().ok(),
                "error": r.secs.as_ref().err(),
                "limit_secs": r.limit,
                "mysnap_secs": r.mysnap,
                "size": r.size,
                "peak_rss_mib": r.rss_mib,
            })
        })
        .collect()
}

/// Horizontal bar charts (backup, restore) of the contenders' times, each
/// bar labelled with its contender and time.
fn chart(path: &Path, sections: &[(&str, &[Row])]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .map_err(|e| anyhow::anyhow!("DejaVuSans.ttf: {e} (apt-get install fonts-dejavu-core)"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into()))
        .map_err(|_| anyhow::anyhow!("DejaVuSans.ttf is not a usable font"))?;
    let heights: Vec<u32> = sections
        .iter()
        .map(|(_, rows)| 90 + 34 * rows.len() as u32)
        .collect();
    let root = BitMapBackend::new(path, (1200, heights.iter().sum::<u32>())).into_drawing_area();
    root.fill(&WHITE)?;
    let mut rest = root.clone();
    for ((title, rows), h) in sections.iter().zip(&heights) {
        let (area, below) = rest.split_vertically(*h);
        rest = below;
        let rows: Vec<(String, f64)> = rows
            .iter()
            .filter_map(|r| {
                let label = r.label.replace("\\|", "|").replace('`', "");
                r.secs.as_ref().ok().map(|s| (label, *s))
            })
            .collect();
        let longest = rows.iter().map(|r| r.1).fold(1.0, f64::max);
        // Room on the right of the longest bar for its label.
        let right = longest * 1.9;
        let mut c = ChartBuilder::on(&area)
            .caption(*title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(30)
            .build_cartesian_2d(0f64..right, 0f64..rows.len() as f64)?;
        c.configure_mesh()
            .disable_y_mesh()
            .disable_y_axis()
            .x_desc("seconds")
            .draw()?;
        for (i, (label, s)) in rows.iter().enumerate() {
            let y = (rows.len() - 1 - i) as f64;
            let color = if label.starts_with("mysnap") {
                BLUE.mix(0.7)
            } else if label.starts_with("limit") {
                BLACK.mix(0.35)
            } else {
                RED.mix(0.5)
            };
            c.draw_series([Rectangle::new(
                [(0.0, y + 0.15), (*s, y + 0.85)],
                color.filled(),
            )])?;
            c.draw_series([Text::new(
                format!("{s:.1} s  {label}"),
                (s + longest * 0.01, y + 0.7),
                ("sans-serif", 14),
            )])?;
        }
    }
    root.present()?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The run

/// The figures measured again at each scale.
struct Core {
    data: u64,
    lock_hold: f64,
    stall: f64,
    tar_zstd: f64,
    backup: Backup,
    untar: f64,
    restore: Restore,
}

fn tar_zstd(b: &Bench, snap: &Path) -> f64 {
    timed(
        b.args.runs,
        || {},
        || {
            shell_time(&format!(
                "tar -cf - -C {} mysql | zstd -T0 -3 -q > /dev/null",
                snap.display()
            ))
        },
    )
    .expect("tar | zstd")
}

fn untar(b: &Bench, archive: &Path) -> f64 {
    let scratch = b.tmp.path().join("scratch");
    let t = timed(
        b.args.runs,
        || fresh_dir(&scratch),
        || {
            shell_time(&format!(
                "zstd -dc -q {} | tar -x -C {} && sync",
                archive.display(),
                scratch.display()
            ))
        },
    )
    .expect("zstd -dc | tar -x");
    let _ = std::fs::remove_dir_all(&scratch);
    t
}

/// The figures of the scaling table, at the data's current size.
fn core(b: &Bench, target: &MariaDb, writer: &Writer) -> Core {
    let lock = b
        .lock_times(b.args.lock_runs.min(5), None, writer)
        .expect("lock");
    let stats = (median(lock.hold), median(lock.stall));
    let config = b.source_config(&b.file_url(), "zstd", "");
    let m = b.snapshot(&config).expect("snapshotter");
    let snap = Manifest::load(&m).unwrap().snapshot.path;
    let tz = tar_zstd(b, &snap);
    b.discard(&m);
    let backup = b.mysnap_backup("s3://bench/bench", "zstd");
    let (id, archive, _) = b.stored_backup();
    let ut = untar(b, &archive);
    let restore = b.mysnap_restore(target, &id, "s3://bench/bench");
    b.clear_stores();
    Core {
        data: b.data_bytes(),
        lock_hold: stats.0,
        stall: stats.1,
        tar_zstd: tz,
        backup,
        untar: ut,
        restore,
    }
}

fn host() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or(String::new(), |k| {
            format!(", {}", bytesize::ByteSize::kib(k).display().iec())
        });
    format!(
        "{} cores, {cpu}{mem}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    )
}

fn main() {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out).unwrap();
    let tmp = tempfile::Builder::new()
        .prefix("mysnap-bench-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let size_mib = args.size.as_u64() >> 20;
    let vol = BtrfsVolume::new(
        tmp.path(),
        size_mib * u64::from(args.scale.max(1)) * 2 + 3072,
    );
    let db = MariaDb::start(&vol.subvol.join("mysql"), MariaOpts::default());
    let s3 = S3Server::start(&tmp.path().join("s3"));
    s3.create_bucket("bench");
    std::fs::create_dir_all(tmp.path().join("store")).unwrap();
    // About 300 bytes per sysbench row on disk, in 8 tables.
    let rows = (args.size.as_u64() / (8 * 300)).max(1000) as u32;
    eprintln!("bench: preparing 8 sysbench tables of {rows} rows");
    let t = Instant::now();
    sysbench_prepare(&db.socket, 8, rows);
    // A production server keeps a few binary logs (expire_logs_days), not
    // one the size of its data; the peers copy no binary logs at all.
    db.sql("FLUSH TABLES; RESET MASTER");
    eprintln!("bench: prepared in {:.0}s", t.elapsed().as_secs_f64());
    let b = Bench {
        args,
        db,
        s3,
        vol,
        tmp,
    };
    let data_bytes = b.data_bytes();
    let runs = b.args.runs;
    let mut report = String::new();
    let mut json = serde_json::Map::new();
    writeln!(
        report,
        "# mysnap bench\n\nData: {} in 8 sysbench tables × {rows} rows (MariaDB {}), on btrfs on a loop device; binary logs reset after loading. \
         Machine: {}. Page cache dropped before every timed run. Medians of {runs} runs. \
         `× limit`: time ÷ the hardware limit with the same work; `÷ mysnap`: a peer's time ÷ mysnap's for the same job \
         (above 1: mysnap is faster).\n",
        bytesize::ByteSize(data_bytes),
        b.db.sql("SELECT VERSION()").trim(),
        host(),
    )
    .unwrap();

    // The lock, per method, idle and under a sysbench read/write load, with
    // a single-row writer running throughout.
    eprintln!("bench: lock");
    let writer = Writer::start(&b.db);
    writeln!(
        report,
        "## Lock ({} snapshots each; stall: the longest one single-row UPDATE took during a snapshotter run)\n\n\
         | method | load | wait median | hold median | hold max | writer stall median | stall max |\n|---|---|---|---|---|---|---|",
        b.args.lock_runs
    )
    .unwrap();
    let mut lock_json = Vec::new();
    for loaded in [false, true] {
        let mut load = loaded.then(|| sysbench_run(&b.db.socket, 8, rows, 3600));
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
                    match b.lock_times(1, Some(method), &writer) {
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
                        report,
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
                Err(e) => writeln!(report, "| {method} | {load} | {e} | | | | |").unwrap(),
            }
        }
    }
    json.insert("lock".into(), lock_json.into());
    if b.args.lock_only {
        drop(writer);
        finish(&b.args.out, &report, json);
        return;
    }

    // Backup: the limits on the same snapshot, mysnap, the peers.
    eprintln!("bench: backup limits");
    let config = b.source_config(&b.file_url(), "zstd", "");
    let m = b.snapshot(&config).expect("snapshotter");
    let snap = Manifest::load(&m).unwrap().snapshot.path;
    let limit_zstd = tar_zstd(&b, &snap);
    let limit_read = timed(
        runs,
        || {},
        || {
            shell_time(&format!(
                "tar -cf - -C {} mysql | cat > /dev/null",
                snap.display()
            ))
        },
    )
    .expect("tar | cat");
    b.discard(&m);
    let mut backup = vec![
        Row {
            limit: Some(limit_zstd),
            ..Row::new(
                "limit: `tar -cf - mysql \\| zstd -T0 -3 > /dev/null`",
                Ok(limit_zstd),
            )
        },
        Row {
            limit: Some(limit_read),
            ..Row::new(
                "limit: `tar -cf - mysql \\| cat > /dev/null` (read)",
                Ok(limit_read),
            )
        },
    ];
    let s3_url = "s3://bench/bench";
    let file_url = b.file_url();
    let mut mysnap_zstd_file = f64::NAN;
    let mut mysnap_zstd_s3 = None;
    for (label, url, compression, limit) in [
        ("mysnap zstd → S3", s3_url, "zstd", limit_zstd),
        (
            "mysnap zstd → file://",
            file_url.as_str(),
            "zstd",
            limit_zstd,
        ),
        ("mysnap none → S3", s3_url, "none", limit_read),
        (
            "mysnap none → file://",
            file_url.as_str(),
            "none",
            limit_read,
        ),
    ] {
        eprintln!("bench: {label}");
        let r = b.mysnap_backup(url, compression);
        if label == "mysnap zstd → file://" {
            mysnap_zstd_file = r.secs;
            // Keep its archive for the S3 server's upload limit below.
            let stored = walkdir::WalkDir::new(b.tmp.path().join("store/bench"))
                .into_iter()
                .filter_map(Result::ok)
                .find(|e| e.file_name() == "data.tar.zst")
                .expect("the archive in the file store");
            std::fs::copy(stored.path(), b.tmp.path().join("put.zst")).unwrap();
        }
        if label == "mysnap zstd → S3" {
            mysnap_zstd_s3 = Some(r);
        }
        backup.push(Row {
            limit: Some(limit),
            size: Some(r.size),
            rss_mib: Some(r.rss_mib),
            ..Row::new(label, Ok(r.secs))
        });
    }
    b.clear_stores();
    let put = b.tmp.path().join("put.zst");
    let put_limit = timed(
        runs,
        || {},
        || b.curl(&format!("-o /dev/null -T {}", put.display()), "put-limit"),
    );
    backup.insert(
        2,
        Row {
            size: std::fs::metadata(&put).ok().map(|m| m.len()),
            ..Row::new(
                "limit: one PUT of mysnap's zstd archive to the S3 server",
                put_limit,
            )
        },
    );
    let _ = std::fs::remove_file(&put);
    let _ = std::fs::remove_file(b.s3.root.join("bench/put-limit"));

    // Peers on the same running server. Their outputs stay for the restore.
    let peers = b.tmp.path().join("peers");
    let sock = b.db.socket.display().to_string();
    let xb_dir = peers.join("xb");
    let xb_stream = peers.join("xb.xbstream.zst");
    let dump = peers.join("dump.sql");
    let mydumper_dir = peers.join("mydumper");
    eprintln!("bench: peers' backups");
    type Job<'a> = Box<dyn Fn() -> Result<f64, String> + 'a>;
    let peer_backups: Vec<(&str, Job, PathBuf)> = vec![
        (
            "mariabackup --backup (plain copy)",
            Box::new(|| {
                fresh_dir(&xb_dir);
                shell_time(&format!(
                    "mariabackup --backup --socket={sock} --user=root --target-dir={} 2>/dev/null",
                    xb_dir.display()
                ))
            }),
            xb_dir.clone(),
        ),
        (
            "mariabackup --backup --stream=xbstream \\| zstd -T0 -3 > file",
            Box::new(|| {
                fresh_dir(&peers.join("xbtmp"));
                shell_time(&format!(
                    "mariabackup --backup --stream=xbstream --socket={sock} --user=root --target-dir={} 2>/dev/null \
                     | zstd -T0 -3 -q > {}",
                    peers.join("xbtmp").display(),
                    xb_stream.display()
                ))
            }),
            xb_stream.clone(),
        ),
        (
            "mysqldump --single-transaction sbtest > file",
            Box::new(|| {
                shell_time(&format!(
                    "mariadb-dump --single-transaction --quick -S {sock} -uroot --databases sbtest > {}",
                    dump.display()
                ))
            }),
            dump.clone(),
        ),
        (
            "mydumper -t 2 sbtest",
            Box::new(|| {
                fresh_dir(&mydumper_dir);
                shell_time(&format!(
                    "mydumper -S {sock} -u root -B sbtest -t 2 -o {}",
                    mydumper_dir.display()
                ))
            }),
            mydumper_dir.clone(),
        ),
    ];
    std::fs::create_dir_all(&peers).unwrap();
    for (label, f, out) in &peer_backups {
        eprintln!("bench: {label}");
        let r = timed(runs, || {}, f);
        backup.push(Row {
            mysnap: Some(mysnap_zstd_file),
            size: r.is_ok().then(|| {
                if out.is_dir() {
                    du(out)
                } else {
                    std::fs::metadata(out).map_or(0, |m| m.len())
                }
            }),
            limit: label.contains("zstd").then_some(limit_zstd),
            ..Row::new(*label, r)
        });
    }
    writeln!(report, "\n## Backup (running server → archive)\n").unwrap();
    table(&mut report, &backup, data_bytes);
    writeln!(
        report,
        "\nmysnap's times include the lock and snapshot; `÷ mysnap` compares with mysnap zstd → file://, \
         which writes a compressed archive like the streamed mariabackup does."
    )
    .unwrap();

    // Restore: archive → server answering.
    eprintln!("bench: restore");
    let (id, archive, unpacked) = b.stored_backup();
    let limit_untar = untar(&b, &archive);
    let key = format!(
        "bench/bench/{id}/{}",
        archive.file_name().unwrap().to_string_lossy()
    );
    let get_limit = timed(runs, || {}, || b.curl("-o /dev/null", &key));
    let target = b.target_server("target");
    let r = b.mysnap_restore(&target, &id, "s3://bench/bench");
    let mysnap_restore = r.secs;
    // The same backup from a file:// store: the pipeline without the S3
    // server, which shares this machine's cores.
    let copied = b.tmp.path().join(format!("store/bench/{id}"));
    std::fs::create_dir_all(&copied).unwrap();
    for f in ["data.tar.zst", "manifest.toml"] {
        std::fs::copy(archive.with_file_name(f), copied.join(f)).unwrap();
    }
    let rf = b.mysnap_restore(&target, &id, &b.file_url());
    let mut restore = vec![
        Row {
            limit: Some(limit_untar),
            ..Row::new(
                "limit: `zstd -dc archive \\| tar -x` + sync",
                Ok(limit_untar),
            )
        },
        Row::new(
            "limit: one GET of the archive from the S3 server",
            get_limit,
        ),
        Row {
            limit: Some(limit_untar),
            rss_mib: Some(r.rss_mib),
            ..Row::new("mysnap restore: S3 → server answering", Ok(r.secs))
        },
        Row {
            limit: Some(limit_untar),
            rss_mib: Some(rf.rss_mib),
            ..Row::new("mysnap restore: file:// → server answering", Ok(rf.secs))
        },
    ];
    // mariabackup's fastest path: mbstream straight into the new data
    // directory, --prepare, start the server until it answers.
    let xb_restore = peers.join("xb-restore");
    let mb = timed(
        runs,
        || fresh_dir(&xb_restore.join("mysql")),
        || {
            until_answering(&xb_restore.join("mysql"), &format!(
                "zstd -dc -q {} | mbstream -x -C {d} && mariabackup --prepare --target-dir={d} 2>/dev/null && sync",
                xb_stream.display(),
                d = xb_restore.join("mysql").display()
            ))
        },
    );
    restore.push(Row {
        limit: Some(limit_untar),
        mysnap: Some(mysnap_restore),
        ..Row::new(
            "mariabackup: `zstd -dc \\| mbstream -x`, --prepare, server answering",
            mb,
        )
    });
    // And its documented path: --prepare the plain copy, --copy-back.
    let copy_back = timed(
        runs,
        || {
            fresh_dir(&xb_restore.join("mysql"));
            let _ = std::fs::remove_dir_all(peers.join("xb-prepared"));
            Command::new("cp")
                .args(["-a"])
                .arg(&xb_dir)
                .arg(peers.join("xb-prepared"))
                .status()
                .unwrap();
        },
        || {
            until_answering(
                &xb_restore.join("mysql"),
                &format!(
                    "mariabackup --prepare --target-dir={p} 2>/dev/null && \
                 mariabackup --copy-back --target-dir={p} --datadir={d} 2>/dev/null && sync",
                    p = peers.join("xb-prepared").display(),
                    d = xb_restore.join("mysql").display()
                ),
            )
        },
    );
    restore.push(Row {
        mysnap: Some(mysnap_restore),
        ..Row::new(
            "mariabackup: --prepare, --copy-back, server answering",
            copy_back,
        )
    });
    let tsock = target.socket.display().to_string();
    let reset = || {
        target.sql("DROP DATABASE IF EXISTS sbtest");
    };
    let reload = timed(runs, reset, || {
        shell_time(&format!("mariadb -S {tsock} -uroot < {}", dump.display()))
    });
    restore.push(Row {
        mysnap: Some(mysnap_restore),
        ..Row::new("mysqldump reload into a running server", reload)
    });
    let myloader = timed(runs, reset, || {
        shell_time(&format!(
            "myloader -S {tsock} -u root -t 2 -o -d {}",
            mydumper_dir.display()
        ))
    });
    restore.push(Row {
        mysnap: Some(mysnap_restore),
        ..Row::new("myloader -t 2 into a running server", myloader)
    });
    reset();
    writeln!(
        report,
        "\n## Restore (archive → server answering; {} unpacked, MB/s of the unpacked size)\n",
        bytesize::ByteSize(unpacked)
    )
    .unwrap();
    table(&mut report, &restore, unpacked);
    writeln!(
        report,
        "\nmysnap's restore includes the download, checks, stopping the old server, the swap and the restart: \
         streaming and syncing took {:.2} s of it, and the server was down {:.2} s (medians). \
         mariabackup's rows include starting a server on the result.",
        r.unpack, r.down
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(&peers);
    b.clear_stores();

    // Scaling: the core figures at 1× and at --scale×.
    if b.args.scale > 1 {
        // 1×: what was measured above, and the default lock method's figures.
        let lock = b
            .lock_times(b.args.lock_runs.min(5), None, &writer)
            .expect("lock");
        let one = Core {
            data: data_bytes,
            lock_hold: median(lock.hold),
            stall: median(lock.stall),
            tar_zstd: limit_zstd,
            backup: mysnap_zstd_s3.expect("measured above"),
            untar: limit_untar,
            restore: r,
        };
        eprintln!("bench: growing the data to {}×", b.args.scale);
        for i in 9..=8 * b.args.scale {
            let from = (i - 1) % 8 + 1;
            b.db.sql(&format!(
                "SET sql_log_bin = 0; CREATE TABLE sbtest.sbtest{i} LIKE sbtest.sbtest{from}; \
                 INSERT INTO sbtest.sbtest{i} SELECT * FROM sbtest.sbtest{from}"
            ));
        }
        b.db.sql("FLUSH TABLES; RESET MASTER");
        eprintln!("bench: scaling, at {}×", b.args.scale);
        let n = core(&b, &target, &writer);
        writeln!(
            report,
            "\n## Scaling (1× → {}×)\n\n| figure | 1× ({}) | {}× ({}) | growth |\n|---|---|---|---|",
            b.args.scale,
            bytesize::ByteSize(one.data),
            b.args.scale,
            bytesize::ByteSize(n.data)
        )
        .unwrap();
        let rows: [(&str, f64, f64, &str); 9] = [
            (
                "lock hold median",
                one.lock_hold * 1e3,
                n.lock_hold * 1e3,
                "ms",
            ),
            ("writer stall median", one.stall * 1e3, n.stall * 1e3, "ms"),
            ("limit: tar \\| zstd", one.tar_zstd, n.tar_zstd, "s"),
            (
                "mysnap backup zstd → S3",
                one.backup.secs,
                n.backup.secs,
                "s",
            ),
            (
                "archiver peak RSS",
                one.backup.rss_mib,
                n.backup.rss_mib,
                "MiB",
            ),
            ("limit: zstd -dc \\| tar -x", one.untar, n.untar, "s"),
            (
                "mysnap restore S3 → answering",
                one.restore.secs,
                n.restore.secs,
                "s",
            ),
            (
                "restorer peak RSS",
                one.restore.rss_mib,
                n.restore.rss_mib,
                "MiB",
            ),
            (
                "server down during swap",
                one.restore.down,
                n.restore.down,
                "s",
            ),
        ];
        for (what, a, z, unit) in rows {
            writeln!(
                report,
                "| {what} | {a:.2} {unit} | {z:.2} {unit} | {:.2}× |",
                z / a
            )
            .unwrap();
        }
        json.insert(
            "scaling".into(),
            rows.iter()
                .map(|(w, a, z, u)| serde_json::json!({"figure": w, "one": a, "scaled": z, "unit": u}))
                .collect::<Vec<_>>()
                .into(),
        );
    }
    drop(writer);
    drop(target);

    json.insert("backup".into(), json_rows(&backup));
    json.insert("restore".into(), json_rows(&restore));
    let png = b.args.out.join("bench.png");
    match chart(
        &png,
        &[
            ("Backup (s, lower is better)", &backup),
            ("Restore (s, lower is better)", &restore),
        ],
    ) {
        Ok(()) => writeln!(
            report,
            "\n![bench chart]({})",
            png.file_name().unwrap().to_string_lossy()
        )
        .unwrap(),
        Err(e) => eprintln!("bench: no chart: {e:#}"),
    }
    finish(&b.args.out, &report, json);
}

fn finish(out: &Path, report: &str, json: serde_json::Map<String, serde_json::Value>) {
    print!("{report}");
    std::fs::write(out.join("report.md"), report).unwrap();
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&serde_json::Value::Object(json)).unwrap(),
    )
    .unwrap();
}
