//! `mysnap-bench`: what `cargo xtask bench` runs. Prepares a sysbench dataset
//! on a btrfs loop volume and measures mysnap side by side with the
//! hardware's limits on the same data, in one run, with the page cache
//! dropped before every contender. Reports medians and ratios; checks nothing.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use common::manifest::Manifest;
use mysnap_tests::{sysbench_prepare, sysbench_run, BtrfsVolume, MariaDb, MariaOpts, S3Server};

#[derive(Parser)]
#[command(about = "Benchmark mysnap against the hardware's limits")]
struct Args {
    /// Size of the sysbench dataset (on disk, about)
    #[arg(long, default_value = "1GiB")]
    size: bytesize::ByteSize,
    /// Runs of each measurement (the median is reported)
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Snapshots for the lock-hold figures, idle and under load each
    #[arg(long, default_value_t = 10)]
    lock_runs: usize,
    /// Directory of the release binaries
    #[arg(long)]
    bin_dir: PathBuf,
    /// Where the report goes
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

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

struct Run {
    peak_rss_kib: u64,
}

/// Runs `cmd`, sampling its peak RSS (VmHWM) until it exits.
fn measured(cmd: &mut Command) -> Run {
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
    Run { peak_rss_kib: peak }
}

struct Bench {
    args: Args,
    db: MariaDb,
    s3: S3Server,
    vol: BtrfsVolume,
    tmp: tempfile::TempDir,
}

impl Bench {
    fn config(&self, store_url: &str, compression: &str) -> PathBuf {
        let path = self.tmp.path().join("mysnap.toml");
        let endpoint = if store_url.starts_with("s3://") {
            format!(
                "endpoint = \"{}\"\nforce_path_style = true\nregion = \"us-east-1\"\n",
                self.s3.endpoint
            )
        } else {
            String::new()
        };
        std::fs::write(
            &path,
            format!(
                "[mysql]\nsocket = \"{}\"\nlock_timeout = \"5s\"\n[volume]\nbackend = \"btrfs\"\nmountpoint = \"{vol}\"\ndatadir = \"{vol}/mysql\"\n\
                 [store]\nurl = \"{store_url}\"\n{endpoint}[archive]\ncompression = \"{compression}\"\n[backup]\nname = \"bench\"\nstate_dir = \"{}\"\n",
                self.db.socket.display(),
                self.tmp.path().join("state").display(),
                vol = self.vol.subvol.display(),
            ),
        )
        .unwrap();
        path
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

    fn snapshot(&self, config: &Path) -> PathBuf {
        let out = self
            .cmd("snapshotter", config)
            .stdout(Stdio::piped())
            .output()
            .unwrap();
        assert!(out.status.success(), "snapshotter failed");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
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

    /// Lock wait and hold of `n` snapshots.
    fn lock_times(&self, n: usize) -> (Vec<f64>, Vec<f64>) {
        let config = self.config(
            &format!("file://{}", self.tmp.path().join("store").display()),
            "zstd",
        );
        let (mut wait, mut hold) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let m = self.snapshot(&config);
            let lock = Manifest::load(&m).unwrap().lock;
            wait.push(lock.wait_secs);
            hold.push(lock.hold_secs);
            self.discard(&m);
        }
        (wait, hold)
    }

    fn clear_stores(&self) {
        for d in [
            self.tmp.path().join("store/bench"),
            self.s3.root.join("bench/bench"),
        ] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn du(path: &Path) -> u64 {
    walkdir::WalkDir::new(path)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

fn shell_time(script: &str) -> f64 {
    drop_caches();
    let t = Instant::now();
    let ok = Command::new("bash")
        .args(["-o", "pipefail", "-c", script])
        .status()
        .unwrap();
    assert!(ok.success(), "{script} failed");
    t.elapsed().as_secs_f64()
}

fn main() {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out).unwrap();
    let tmp = tempfile::Builder::new()
        .prefix("mysnap-bench-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let vol = BtrfsVolume::new(tmp.path(), (args.size.as_u64() >> 20) * 3 + 3072);
    let db = MariaDb::start(&vol.subvol.join("mysql"), MariaOpts::default());
    let s3 = S3Server::start(&tmp.path().join("s3"));
    s3.create_bucket("bench");
    std::fs::create_dir_all(tmp.path().join("store")).unwrap();
    // About 480 bytes per sysbench row on disk, in 8 tables.
    let rows = (args.size.as_u64() / (8 * 480)).max(1000) as u32;
    eprintln!("bench: preparing 8 sysbench tables of {rows} rows");
    let t = Instant::now();
    sysbench_prepare(&db.socket, 8, rows);
    db.sql("FLUSH TABLES");
    eprintln!("bench: prepared in {:.0}s", t.elapsed().as_secs_f64());
    let b = Bench {
        args,
        db,
        s3,
        vol,
        tmp,
    };
    let data_bytes = du(&b.vol.subvol.join("mysql"));
    let mut report = String::new();
    let host = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    writeln!(
        report,
        "# mysnap bench\n\nData: {} in 8 sysbench tables × {rows} rows, on btrfs on a loop device. Machine: {} cores, {host}. \
         Page cache dropped before every timed run. Medians of {} runs.\n",
        bytesize::ByteSize(data_bytes),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        b.args.runs
    )
    .unwrap();

    // The lock: idle and under a sysbench read/write load.
    let (iw, ih) = b.lock_times(b.args.lock_runs);
    let mut load = sysbench_run(&b.db.socket, 8, rows, 3600);
    std::thread::sleep(Duration::from_secs(3));
    let (lw, lh) = b.lock_times(b.args.lock_runs);
    let _ = load.kill();
    let _ = load.wait();
    writeln!(report, "## Lock ({} snapshots each)\n\n| | wait median | hold median | hold max |\n|---|---|---|---|", b.args.lock_runs).unwrap();
    for (what, w, h) in [("idle", iw, ih), ("under sysbench", lw, lh)] {
        let max = h.iter().copied().fold(0.0, f64::max);
        writeln!(
            report,
            "| {what} | {:.1} ms | {:.1} ms | {:.1} ms |",
            median(w) * 1e3,
            median(h) * 1e3,
            max * 1e3
        )
        .unwrap();
    }

    // The hardware's limits on the same snapshot.
    let config = b.config(
        &format!("file://{}", b.tmp.path().join("store").display()),
        "zstd",
    );
    let m = b.snapshot(&config);
    let snap = Manifest::load(&m).unwrap().snapshot.path;
    let tar_zstd = median(
        (0..b.args.runs)
            .map(|_| {
                shell_time(&format!(
                    "tar -cf - -C {} mysql | zstd -T0 -3 -q > /dev/null",
                    snap.display()
                ))
            })
            .collect(),
    );
    let tar_only = median(
        (0..b.args.runs)
            .map(|_| {
                shell_time(&format!(
                    "tar -cf - -C {} mysql | cat > /dev/null",
                    snap.display()
                ))
            })
            .collect(),
    );
    b.discard(&m);

    // mysnap backups: snapshotter + archiver, each store and codec.
    writeln!(
        report,
        "\n## Backup\n\n| contender | time | MB/s | × limit | archive | peak RSS |\n|---|---|---|---|---|---|\n\
         | limit: `tar -cf - mysql \\| zstd -T0 -3 > /dev/null` | {tar_zstd:.2} s | {:.0} | 1.00 | | |\n\
         | limit: `tar -cf - mysql \\| cat > /dev/null` (read) | {tar_only:.2} s | {:.0} | | | |",
        data_bytes as f64 / 1e6 / tar_zstd,
        data_bytes as f64 / 1e6 / tar_only
    )
    .unwrap();
    let s3_url = "s3://bench/bench".to_string();
    let file_url = format!("file://{}", b.tmp.path().join("store").display());
    for (label, url, compression, limit) in [
        ("mysnap zstd → S3", &s3_url, "zstd", tar_zstd),
        ("mysnap zstd → file://", &file_url, "zstd", tar_zstd),
        ("mysnap none → S3", &s3_url, "none", tar_only),
        ("mysnap none → file://", &file_url, "none", tar_only),
    ] {
        let config = b.config(url, compression);
        let (mut secs, mut rss, mut size) = (Vec::new(), Vec::new(), 0);
        for _ in 0..b.args.runs {
            b.clear_stores();
            drop_caches();
            let t = Instant::now();
            let m = b.snapshot(&config);
            let run = measured(
                b.cmd("archiver", &config)
                    .args(["--manifest", m.to_str().unwrap()])
                    .stdout(Stdio::null()),
            );
            secs.push(t.elapsed().as_secs_f64());
            rss.push(run.peak_rss_kib as f64);
            let root = if url.starts_with("s3") {
                b.s3.root.join("bench/bench")
            } else {
                b.tmp.path().join("store/bench")
            };
            size = walkdir::WalkDir::new(root)
                .into_iter()
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("data.tar"))
                .map(|e| e.metadata().unwrap().len())
                .sum();
        }
        let (s, r) = (median(secs), median(rss));
        writeln!(
            report,
            "| {label} | {s:.2} s | {:.0} | {:.2} | {} | {:.0} MiB |",
            data_bytes as f64 / 1e6 / s,
            s / limit,
            bytesize::ByteSize(size),
            r / 1024.0
        )
        .unwrap();
    }
    b.clear_stores();
    writeln!(
        report,
        "\n(`× limit` is mysnap's time ÷ the limit with the same compression work.)"
    )
    .unwrap();
    restore(&b, &mut report);
    print!("{report}");
    std::fs::write(b.args.out.join("report.md"), &report).unwrap();
}

/// Restore: archive in the store → server answering, onto a second server;
/// next to the decompress + write limit on the same archive.
fn restore(b: &Bench, report: &mut String) {
    b.clear_stores();
    let config = b.config("s3://bench/bench", "zstd");
    let m = b.snapshot(&config);
    let out = b
        .cmd("archiver", &config)
        .args(["--manifest", m.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "archiver");
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let stored = b.s3.root.join(format!("bench/bench/bench/{id}"));
    let archive = stored.join("data.tar.zst");
    let manifest = Manifest::parse(
        &std::fs::read_to_string(stored.join("manifest.toml")).unwrap(),
        "bench",
    )
    .unwrap();
    let unpacked = manifest.archive.as_ref().unwrap().unpacked_size;
    let scratch = b.tmp.path().join("scratch");
    let untar = median(
        (0..b.args.runs)
            .map(|_| {
                let _ = std::fs::remove_dir_all(&scratch);
                std::fs::create_dir_all(&scratch).unwrap();
                shell_time(&format!(
                    "zstd -dc -q {} | tar -x -C {} && sync",
                    archive.display(),
                    scratch.display()
                ))
            })
            .collect(),
    );
    let _ = std::fs::remove_dir_all(&scratch);
    let target_root = b.tmp.path().join("target");
    let target = MariaDb::start(
        &target_root.join("mysql"),
        MariaOpts {
            server_id: 2,
            ..MariaOpts::default()
        },
    );
    let (stop, start) = target.service_commands();
    let tcfg = b.tmp.path().join("target.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text
        .replace(
            &format!("socket = \"{}\"", b.db.socket.display()),
            &format!(
                "socket = \"{}\"\nstop_command = {stop:?}\nstart_command = {start:?}",
                target.socket.display()
            ),
        )
        .replace(
            &format!("mountpoint = \"{}\"", b.vol.subvol.display()),
            &format!("mountpoint = \"{}\"", target_root.display()),
        )
        .replace(
            &format!("datadir = \"{}/mysql\"", b.vol.subvol.display()),
            &format!(
                "datadir = \"{}/mysql\"\nowner = \"root\"",
                target_root.display()
            ),
        );
    std::fs::write(&tcfg, text).unwrap();
    let (mut secs, mut rss, mut down) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..b.args.runs {
        drop_caches();
        let out_path = b.tmp.path().join("restore.json");
        let t = Instant::now();
        let run = measured(
            b.cmd("restorer", &tcfg)
                .args(["restore", &id])
                .stdout(std::fs::File::create(&out_path).unwrap()),
        );
        secs.push(t.elapsed().as_secs_f64());
        rss.push(run.peak_rss_kib as f64);
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
        down.push(r["downtime_secs"].as_f64().unwrap_or(f64::NAN));
        if let Some(old) = r["old_datadir"].as_str() {
            std::fs::remove_dir_all(old).unwrap();
        }
    }
    let s = median(secs);
    writeln!(
        report,
        "\n## Restore ({} unpacked, zstd)\n\n| contender | time | MB/s | × limit | peak RSS |\n|---|---|---|---|---|\n\
         | limit: `zstd -dc archive \\| tar -x` + sync | {untar:.2} s | {:.0} | 1.00 | |\n\
         | mysnap restore from S3 → server answering | {s:.2} s | {:.0} | {:.2} | {:.0} MiB |\n\n\
         Server down during the swap: {:.2} s (median).",
        bytesize::ByteSize(unpacked),
        unpacked as f64 / 1e6 / untar,
        unpacked as f64 / 1e6 / s,
        s / untar,
        median(rss) / 1024.0,
        median(down)
    )
    .unwrap();
    drop(target);
    b.clear_stores();
}
