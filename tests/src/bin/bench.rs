//! `mysnap-bench`: what `cargo xtask bench` runs. Prepares a sysbench dataset
//! on a btrfs loop volume and measures, in one run and on the same data,
//! mysnap next to its peers (mariabackup, mysqldump, mydumper) and the
//! hardware's limits, with the page cache dropped before every timed run.
//! Then grows the data to `--scale`× and measures the core figures again.
//! Reports medians and ratios (Markdown, JSON and a PNG chart in `--out`);
//! checks nothing.
//!
//! `main` is the sequence of measurements; the modules beside this file hold
//! the parts: `dataset` (the rig and its data), `measure` (timing), `lock`,
//! `limits`, `contenders` (mysnap and its peers), `throttle` (a backup under
//! load, with and without a read limit), `report` and `chart`.

#[path = "bench/chart.rs"]
mod chart;
#[path = "bench/contenders.rs"]
mod contenders;
#[path = "bench/dataset.rs"]
mod dataset;
#[path = "bench/delta.rs"]
mod delta;
#[path = "bench/limits.rs"]
mod limits;
#[path = "bench/lock.rs"]
mod lock;
#[path = "bench/measure.rs"]
mod measure;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/throttle.rs"]
mod throttle;

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Parser;
use common::manifest::Manifest;
use mysnap_tests::MariaDb;

use contenders::{Backup, Peers, Restore};
use dataset::{Bench, S3_URL};
use lock::Writer;
use measure::median;
use report::{json_rows, Core, Report, Row};

#[derive(Parser)]
#[command(about = "Benchmark mysnap against its peers and the hardware's limits")]
pub struct Args {
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
    /// Measure only mysnap's backup and restore through S3, unencrypted
    /// and encrypted + authenticated, then stop
    #[arg(long)]
    crypt_only: bool,
    /// Measure only the archive formats: full backup and restore through a
    /// file:// store as one stream (format 1) and indexed (format 3), and
    /// the `zstd -dc | tar -x` + sync limit, then stop
    #[arg(long)]
    formats_only: bool,
    /// Measure only incremental backups: a full backup (indexed), one of
    /// 20 tables (5%) changed, then an incremental backup, into a file://
    /// store; time and bytes of the incremental ÷ the full one; then stop
    #[arg(long)]
    incremental_only: bool,
    /// Measure only the restore table's limits, mysnap and mariabackup's
    /// `mbstream` path, then stop
    #[arg(long)]
    restore_only: bool,
    /// Measure only the delta restore row (full vs `restore --delta` of a
    /// replica 5% stale, indexed, file://), then stop
    #[arg(long)]
    delta_only: bool,
    /// Directory of the release binaries
    #[arg(long)]
    bin_dir: PathBuf,
    /// Where the report goes
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

fn main() {
    let b = Bench::prepare(Args::parse());
    let data_bytes = b.data_bytes();
    let mut report = Report::default();
    header(&b, data_bytes, &mut report);
    if b.args.crypt_only {
        crypt_only(&b, data_bytes, &mut report);
        report.finish(&b.args.out);
        return;
    }
    if b.args.delta_only {
        delta::measure(&b, &mut report);
        report.finish(&b.args.out);
        return;
    }
    if b.args.incremental_only {
        incremental_only(&b, &mut report);
        report.finish(&b.args.out);
        return;
    }
    if b.args.formats_only {
        formats_only(&b, data_bytes, &mut report);
        report.finish(&b.args.out);
        return;
    }

    if b.args.restore_only {
        let peers = Peers::new(&b);
        std::fs::create_dir_all(&peers.dir).unwrap();
        eprintln!("bench: mariabackup's stream, for its restore");
        peers
            .xbstream_backup()
            .expect("mariabackup --backup --stream");
        let restore = restore(&b, &peers, &mut report, false);
        report
            .json
            .insert("restore".into(), json_rows(&restore.rows));
        report.finish(&b.args.out);
        return;
    }

    // The lock, per method, idle and under a sysbench read/write load, with
    // a single-row writer running throughout.
    eprintln!("bench: lock");
    let writer = Writer::start(&b.db);
    lock::measure(&b, &writer, &mut report);
    if b.args.lock_only {
        drop(writer);
        report.finish(&b.args.out);
        return;
    }

    // Backup: the limits on the same snapshot, mysnap, the peers.
    let peers = Peers::new(&b);
    let backup = backup(&b, &peers, data_bytes, &mut report);

    // Throttling: a backup under load, unthrottled and with a read limit.
    eprintln!("bench: throttling");
    throttle::measure(&b, data_bytes, &writer, &mut report);

    // Restore: archive → server answering, from what the backups left.
    let restore = restore(&b, &peers, &mut report, true);
    let target = &restore.target;

    // Archive formats: one stream vs indexed frames, on the same data.
    formats_only(&b, data_bytes, &mut report);

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
            tar_zstd: backup.limit_zstd,
            backup: backup.mysnap_zstd_s3,
            untar: restore.limit_untar,
            restore: restore.mysnap_s3,
        };
        b.grow();
        eprintln!("bench: scaling, at {}×", b.args.scale);
        let n = core(&b, target, &writer);
        report.scaling(b.args.scale, &one, &n);
    }
    drop(writer);
    drop(restore.target);

    // Delta restore and incremental backups: last, they add tables (the
    // scaled data has them already).
    delta::measure(&b, &mut report);
    incremental_only(&b, &mut report);

    report.json.insert("backup".into(), json_rows(&backup.rows));
    report
        .json
        .insert("restore".into(), json_rows(&restore.rows));
    let png = b.args.out.join("bench.png");
    match chart::chart(
        &png,
        &[
            ("Backup (s, lower is better)", &backup.rows),
            ("Restore (s, lower is better)", &restore.rows),
        ],
    ) {
        Ok(()) => writeln!(
            report.md,
            "\n![bench chart]({})",
            png.file_name().unwrap().to_string_lossy()
        )
        .unwrap(),
        Err(e) => eprintln!("bench: no chart: {e:#}"),
    }
    report.finish(&b.args.out);
}

/// The report's first paragraph: the data, the machine, how it measures.
fn header(b: &Bench, data_bytes: u64, report: &mut Report) {
    writeln!(
        report.md,
        "# mysnap bench\n\nData: {} in 8 sysbench tables × {} rows (MariaDB {}), on btrfs on a loop device; binary logs reset after loading. \
         Machine: {}. Page cache dropped before every timed run. Medians of {} runs. \
         `× limit`: time ÷ the hardware limit with the same work; `÷ mysnap`: a peer's time ÷ mysnap's for the same job \
         (above 1: mysnap is faster).\n",
        bytesize::ByteSize(data_bytes),
        b.rows,
        b.db.sql("SELECT VERSION()").trim(),
        dataset::host(),
        b.args.runs,
    )
    .unwrap();
}

/// The backup table and the figures the scaling table reuses.
struct BackupFigures {
    rows: Vec<Row>,
    limit_zstd: f64,
    mysnap_zstd_s3: Backup,
}

/// Backup (running server → archive): the limits on one snapshot, mysnap
/// zstd/none → S3/file://, one PUT of mysnap's archive, then the peers.
fn backup(b: &Bench, peers: &Peers, data_bytes: u64, report: &mut Report) -> BackupFigures {
    eprintln!("bench: backup limits");
    let config = b.source_config(&b.file_url(), "zstd", "");
    let m = b.snapshot(&config).expect("snapshotter");
    let snap = Manifest::load(&m).unwrap().snapshot.path;
    let limit_zstd = limits::tar_zstd(b, &snap);
    let limit_read = limits::tar_read(b, &snap);
    // The same pipelines into the S3 server: what an S3 row is compared with.
    eprintln!("bench: backup limits through the S3 server");
    let limit_zstd_put = limits::tar_put(b, &snap, true);
    let limit_put = limits::tar_put(b, &snap, false);
    b.discard(&m);
    let mut rows = vec![
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
        Row {
            limit: limit_zstd_put.as_ref().ok().copied(),
            ..Row::new(
                "limit: `tar -cf - mysql \\| zstd -T0 -3 \\| aws s3 cp -` (to the S3 server)",
                limit_zstd_put.clone(),
            )
        },
        Row {
            limit: limit_put.as_ref().ok().copied(),
            ..Row::new(
                "limit: `tar -cf - mysql \\| aws s3 cp -` (to the S3 server)",
                limit_put.clone(),
            )
        },
    ];
    // An S3 row against the pipeline through the same S3 server (like with
    // like); where that limit failed, against the local one.
    let zstd_s3 = limit_zstd_put.unwrap_or(limit_zstd);
    let none_s3 = limit_put.unwrap_or(limit_read);
    let file_url = b.file_url();
    let mut mysnap_zstd_file = f64::NAN;
    let mut mysnap_zstd_s3 = None;
    for (label, url, compression, limit) in [
        ("mysnap zstd → S3", S3_URL, "zstd", zstd_s3),
        (
            "mysnap zstd → file://",
            file_url.as_str(),
            "zstd",
            limit_zstd,
        ),
        ("mysnap none → S3", S3_URL, "none", none_s3),
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
        rows.push(Row {
            limit: Some(limit),
            size: Some(r.size),
            rss_mib: Some(r.rss_mib),
            ..Row::new(label, Ok(r.secs))
        });
    }
    // Encrypted (age) and authenticated (HMAC): `÷ mysnap` is this row's
    // time ÷ the unencrypted S3 row's (1.00: no cost; target: at most 1.05).
    let (backup_tail, _) = contenders::crypt_configs(&b.tmp.path().join("keys"));
    for (compression, limit) in [("zstd", zstd_s3), ("none", none_s3)] {
        let label = format!("mysnap {compression} → S3, encrypted + authenticated");
        eprintln!("bench: {label}");
        let plain = rows
            .iter()
            .find(|r| r.label == format!("mysnap {compression} → S3"))
            .and_then(|r| r.secs.as_ref().ok().copied());
        let r = b.mysnap_backup_with(S3_URL, compression, &backup_tail);
        rows.push(Row {
            limit: Some(limit),
            size: Some(r.size),
            rss_mib: Some(r.rss_mib),
            mysnap: plain,
            ..Row::new(label, Ok(r.secs))
        });
    }
    b.clear_stores();
    let put = b.tmp.path().join("put.zst");
    let put_limit = limits::put(b, &put);
    rows.insert(
        4,
        Row {
            size: std::fs::metadata(&put).ok().map(|m| m.len()),
            ..Row::new(
                "limit: one PUT of mysnap's zstd archive to the S3 server",
                put_limit,
            )
        },
    );
    let _ = std::fs::remove_file(&put);

    // Peers on the same running server. Their outputs stay for the restore.
    eprintln!("bench: peers' backups");
    rows.extend(peers.backups(b.args.runs, mysnap_zstd_file, limit_zstd));
    writeln!(report.md, "\n## Backup (running server → archive)\n").unwrap();
    report.table(&rows, data_bytes);
    writeln!(
        report.md,
        "\nmysnap's times include the lock and snapshot; `÷ mysnap` compares with mysnap zstd → file://, \
         which writes a compressed archive like the streamed mariabackup does; \
         `× limit` of an S3 row is its time ÷ the same pipeline into the same S3 server (`\\| aws s3 cp -`); \
         for the encrypted rows it is their time ÷ the same row's unencrypted (1.00: encryption costs nothing)."
    )
    .unwrap();
    BackupFigures {
        rows,
        limit_zstd,
        mysnap_zstd_s3: mysnap_zstd_s3.expect("measured above"),
    }
}

/// The restore table, the figures the scaling table reuses, and the server
/// restores go to.
struct RestoreFigures {
    rows: Vec<Row>,
    target: MariaDb,
    limit_untar: f64,
    mysnap_s3: Restore,
}

/// Restore (archive → server answering): the limits, mysnap from S3 and
/// from file:// onto a second server, then the peers from their backups
/// (`all` false: mariabackup's `mbstream` path only).
fn restore(b: &Bench, peers: &Peers, report: &mut Report, all: bool) -> RestoreFigures {
    let runs = b.args.runs;
    eprintln!("bench: restore");
    let (id, archive, unpacked) = b.stored_backup();
    let limit_untar = limits::untar(b, &archive);
    let key = format!(
        "bench/bench/{id}/{}",
        archive.file_name().unwrap().to_string_lossy()
    );
    let get_limit = limits::get(b, &key);
    let limit_get_untar = limits::get_untar(b, &key);
    // An S3 row against the pipeline from the same S3 server (like with
    // like); where that limit failed, against the local one.
    let s3_limit = *limit_get_untar.as_ref().unwrap_or(&limit_untar);
    let server = b.target_server("target");
    let target = &server;
    let r = b.mysnap_restore(target, &id, S3_URL);
    // The same backup from a file:// store: the pipeline without the S3
    // server, which shares this machine's cores.
    b.copy_to_file_store(&archive);
    let rf = b.mysnap_restore(target, &id, &b.file_url());
    // The same data encrypted and authenticated, from S3.
    eprintln!("bench: restore, encrypted");
    let (backup_tail, restore_tail) = contenders::crypt_configs(&b.tmp.path().join("keys"));
    let (eid, _, _) = b.stored_backup_with(&backup_tail);
    let re = b.mysnap_restore_with(target, &eid, S3_URL, &restore_tail);
    // Indexed frames (format 3, the default), from S3 and from file://.
    eprintln!("bench: restore, indexed");
    let (iid, iarchive, _) = b.stored_backup_as("zstd-indexed", "");
    let ri = b.mysnap_restore(target, &iid, S3_URL);
    b.copy_to_file_store(&iarchive);
    let rfi = b.mysnap_restore(target, &iid, &b.file_url());
    let mut rows = vec![
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
            limit: limit_get_untar.as_ref().ok().copied(),
            ..Row::new(
                "limit: `curl GET \\| zstd -dc \\| tar -x` + sync (from the S3 server)",
                limit_get_untar.clone(),
            )
        },
        Row {
            limit: Some(s3_limit),
            rss_mib: Some(r.rss_mib),
            ..Row::new("mysnap restore: S3 → server answering", Ok(r.secs))
        },
        Row {
            limit: Some(limit_untar),
            rss_mib: Some(rf.rss_mib),
            ..Row::new("mysnap restore: file:// → server answering", Ok(rf.secs))
        },
        Row {
            limit: Some(s3_limit),
            rss_mib: Some(ri.rss_mib),
            mysnap: Some(r.secs),
            ..Row::new(
                "mysnap restore: S3, indexed (format 3) → server answering (÷ mysnap: this ÷ one stream from S3)",
                Ok(ri.secs),
            )
        },
        Row {
            limit: Some(limit_untar),
            rss_mib: Some(rfi.rss_mib),
            mysnap: Some(rf.secs),
            ..Row::new(
                "mysnap restore: file://, indexed (format 3) → server answering (÷ mysnap: this ÷ one stream from file://)",
                Ok(rfi.secs),
            )
        },
        Row {
            limit: Some(s3_limit),
            rss_mib: Some(re.rss_mib),
            mysnap: Some(r.secs),
            ..Row::new(
                "mysnap restore: S3, encrypted + authenticated → server answering (÷ mysnap: this ÷ unencrypted S3)",
                Ok(re.secs),
            )
        },
    ];
    let mysnap = Some(r.secs);
    rows.push(Row {
        limit: Some(limit_untar),
        mysnap,
        ..Row::new(
            "mariabackup: `zstd -dc \\| mbstream -x`, --prepare, server answering",
            peers.mbstream_restore(runs),
        )
    });
    if all {
        rows.push(Row {
            mysnap,
            ..Row::new(
                "mariabackup: --prepare, --copy-back, server answering",
                peers.copy_back_restore(runs),
            )
        });
        rows.push(Row {
            mysnap,
            ..Row::new(
                "mysqldump reload into a running server",
                peers.dump_reload(runs, target),
            )
        });
        rows.push(Row {
            mysnap,
            ..Row::new(
                "myloader -t 2 into a running server",
                peers.myloader_reload(runs, target),
            )
        });
    }
    contenders::reset(target);
    writeln!(
        report.md,
        "\n## Restore (archive → server answering; {} unpacked, MB/s of the unpacked size)\n",
        bytesize::ByteSize(unpacked)
    )
    .unwrap();
    report.table(&rows, unpacked);
    writeln!(
        report.md,
        "\nmysnap's restore includes the download, checks, stopping the old server, the swap and the restart: \
         streaming and syncing took {:.2} s of it, and the server was down {:.2} s (medians). \
         mariabackup's rows include starting a server on the result. \
         `× limit` of an S3 row is its time ÷ the same pipeline from the same S3 server (`curl GET \\|`).",
        r.unpack, r.down
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(&peers.dir);
    b.clear_stores();
    RestoreFigures {
        rows,
        target: server,
        limit_untar,
        mysnap_s3: r,
    }
}

/// `--crypt-only`: mysnap's backups (zstd, none) and zstd restore through
/// S3, each unencrypted and then encrypted + authenticated; `÷ mysnap` of
/// an encrypted row is its time ÷ the unencrypted one's.
fn crypt_only(b: &Bench, data_bytes: u64, report: &mut Report) {
    let (backup_tail, restore_tail) = contenders::crypt_configs(&b.tmp.path().join("keys"));
    let mut rows = Vec::new();
    for compression in ["zstd", "none"] {
        eprintln!("bench: mysnap {compression} → S3, plain and encrypted");
        let plain = b.mysnap_backup(S3_URL, compression);
        let enc = b.mysnap_backup_with(S3_URL, compression, &backup_tail);
        for (label, r, mysnap) in [
            (format!("mysnap {compression} → S3"), plain, None),
            (
                format!("mysnap {compression} → S3, encrypted + authenticated"),
                enc,
                Some(plain.secs),
            ),
        ] {
            rows.push(Row {
                size: Some(r.size),
                rss_mib: Some(r.rss_mib),
                mysnap,
                ..Row::new(label, Ok(r.secs))
            });
        }
    }
    writeln!(report.md, "\n## Encryption: backup (running server → S3)\n").unwrap();
    report.table(&rows, data_bytes);
    eprintln!("bench: restore, plain and encrypted");
    let target = b.target_server("target");
    let (id, _, unpacked) = b.stored_backup();
    let plain = b.mysnap_restore(&target, &id, S3_URL);
    let (eid, _, _) = b.stored_backup_with(&backup_tail);
    let enc = b.mysnap_restore_with(&target, &eid, S3_URL, &restore_tail);
    // Indexed (format 3), and indexed and encrypted (format 5): frames
    // decrypted by ranges of age chunks.
    let (iid, _, _) = b.stored_backup_as("zstd-indexed", "");
    let indexed = b.mysnap_restore(&target, &iid, S3_URL);
    let (eiid, _, _) = b.stored_backup_as("zstd-indexed", &backup_tail);
    let enc_indexed = b.mysnap_restore_with(&target, &eiid, S3_URL, &restore_tail);
    let restore_rows = vec![
        Row {
            rss_mib: Some(plain.rss_mib),
            ..Row::new("mysnap restore: S3 → server answering", Ok(plain.secs))
        },
        Row {
            rss_mib: Some(enc.rss_mib),
            mysnap: Some(plain.secs),
            ..Row::new(
                "mysnap restore: S3, encrypted + authenticated → server answering",
                Ok(enc.secs),
            )
        },
        Row {
            rss_mib: Some(indexed.rss_mib),
            ..Row::new(
                "mysnap restore: S3, indexed (format 3) → server answering",
                Ok(indexed.secs),
            )
        },
        Row {
            rss_mib: Some(enc_indexed.rss_mib),
            mysnap: Some(indexed.secs),
            ..Row::new(
                "mysnap restore: S3, indexed, encrypted + authenticated (format 5) → server answering",
                Ok(enc_indexed.secs),
            )
        },
    ];
    writeln!(
        report.md,
        "\n## Encryption: restore (S3 → server answering)\n"
    )
    .unwrap();
    report.table(&restore_rows, unpacked);
    writeln!(
        report.md,
        "\n`÷ mysnap` of an encrypted row: its time ÷ the same row unencrypted, one stream or indexed (1.00: no cost)."
    )
    .unwrap();
    b.clear_stores();
}

/// `--formats-only`: mysnap's full backup to a file:// store and its
/// restore from it, one stream (format 1) and indexed (format 3), beside
/// the `zstd -dc | tar -x` + sync limit of the format 1 archive.
fn formats_only(b: &Bench, data_bytes: u64, report: &mut Report) {
    let url = b.file_url();
    eprintln!("bench: backup, format 1 and 3");
    let one = b.mysnap_backup(&url, "zstd");
    let three = b.mysnap_backup(&url, "zstd-indexed");
    let rows = vec![
        Row {
            size: Some(one.size),
            rss_mib: Some(one.rss_mib),
            ..Row::new("mysnap zstd → file, one stream (format 1)", Ok(one.secs))
        },
        Row {
            size: Some(three.size),
            rss_mib: Some(three.rss_mib),
            mysnap: Some(one.secs),
            ..Row::new(
                "mysnap zstd → file, indexed frames (format 3)",
                Ok(three.secs),
            )
        },
    ];
    writeln!(
        report.md,
        "\n## Archive formats: full backup (running server → file://)\n"
    )
    .unwrap();
    report.table(&rows, data_bytes);
    eprintln!("bench: restore, format 1 and 3");
    // Beside the restore table's target (a full run keeps it for scaling).
    let target = b.target_server("formats-target");
    let (id, archive, unpacked) = b.stored_backup_as("zstd", "");
    let limit_untar = limits::untar(b, &archive);
    b.copy_to_file_store(&archive);
    let r1 = b.mysnap_restore(&target, &id, &url);
    let (id, archive, _) = b.stored_backup_as("zstd-indexed", "");
    b.copy_to_file_store(&archive);
    let r3 = b.mysnap_restore(&target, &id, &url);
    let rows = vec![
        Row {
            limit: Some(limit_untar),
            ..Row::new(
                "limit: `zstd -dc archive \\| tar -x` + sync",
                Ok(limit_untar),
            )
        },
        Row {
            limit: Some(limit_untar),
            rss_mib: Some(r1.rss_mib),
            ..Row::new(
                "mysnap restore: file, one stream (format 1) → server answering",
                Ok(r1.secs),
            )
        },
        Row {
            limit: Some(limit_untar),
            rss_mib: Some(r3.rss_mib),
            mysnap: Some(r1.secs),
            ..Row::new(
                "mysnap restore: file, indexed frames (format 3) → server answering",
                Ok(r3.secs),
            )
        },
    ];
    writeln!(
        report.md,
        "\n## Archive formats: restore (file:// → server answering)\n"
    )
    .unwrap();
    report.table(&rows, unpacked);
    writeln!(
        report.md,
        "\n`÷ mysnap` of a format 3 row: its time ÷ the same row in format 1. Unpack only (no stop, swap, start): format 1 {:.2} s, format 3 {:.2} s.",
        r1.unpack, r3.unpack
    )
    .unwrap();
    b.clear_stores();
}

/// `--incremental-only`: 20 tables (the 8 copied to 20, so one is 5%), a
/// full indexed backup, one table changed (pages on disk and older than the
/// racy window of the next snapshot), an incremental backup
/// (`backup.full_every = 2`); each timed from cold caches, runs × both,
/// medians; stored bytes of each backup's own archive.
fn incremental_only(b: &Bench, report: &mut Report) {
    use measure::{drop_caches, measured};
    eprintln!("bench: 20 tables for the incremental row");
    for i in 9..=20 {
        let from = (i - 1) % 8 + 1;
        b.db.sql(&format!(
            "SET sql_log_bin = 0; CREATE TABLE IF NOT EXISTS sbtest.sbtest{i} LIKE sbtest.sbtest{from}; \
             INSERT IGNORE INTO sbtest.sbtest{i} SELECT * FROM sbtest.sbtest{from}"
        ));
    }
    let data_bytes = b.data_bytes();
    let config = b.source_config(&b.file_url(), "zstd-indexed", "");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&config)
        .unwrap();
    std::io::Write::write_all(&mut f, b"full_every = 2\n").unwrap();
    let settle = || {
        b.db.sql("FLUSH TABLES");
        std::thread::sleep(std::time::Duration::from_secs(4));
    };
    let backup = || {
        drop_caches();
        let t = std::time::Instant::now();
        let m = b.snapshot(&config).expect("snapshotter");
        measured(
            b.cmd("archiver", &config)
                .args(["--manifest", m.to_str().unwrap()])
                .stdout(std::process::Stdio::null()),
        );
        t.elapsed().as_secs_f64()
    };
    let newest = || {
        let root = b.tmp.path().join("store/bench");
        let mut ids: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.join("manifest.toml").exists())
            .collect();
        ids.sort();
        let m = Manifest::parse(
            &std::fs::read_to_string(ids.last().unwrap().join("manifest.toml")).unwrap(),
            "bench",
        )
        .unwrap();
        (m.archive.clone().unwrap(), m)
    };
    let (mut full, mut incr, mut sizes) = (Vec::new(), Vec::new(), (0, 0));
    let mut again = Vec::new();
    for run in 0..b.args.runs {
        b.clear_stores();
        settle();
        full.push(backup());
        let (f, _) = newest();
        b.db.sql(&format!(
            "UPDATE sbtest.sbtest{} SET k = k + 1",
            run % 20 + 1
        ));
        settle();
        incr.push(backup());
        let (i, m) = newest();
        assert_eq!(i.chain, 1, "the second backup is incremental");
        sizes = (f.size, i.size);
        again = stored_again(b, &m);
    }
    let (full, incr) = (median(full), median(incr));
    let rows = vec![
        Row {
            size: Some(sizes.0),
            ..Row::new("mysnap full backup, indexed → file", Ok(full))
        },
        Row {
            size: Some(sizes.1),
            mysnap: Some(full),
            ..Row::new(
                "mysnap incremental backup after 5% change (1 of 20 tables) → file",
                Ok(incr),
            )
        },
    ];
    writeln!(
        report.md,
        "\n## Incremental backup after 5% change (running server → file://)\n"
    )
    .unwrap();
    report.table(&rows, data_bytes);
    writeln!(
        report.md,
        "\nIncremental ÷ full: time {:.2}, bytes {:.2} (target ≤ 0.15 each).",
        incr / full,
        sizes.1 as f64 / sizes.0 as f64
    )
    .unwrap();
    writeln!(
        report.md,
        "\nWhat the incremental stored again (its own archive's plain bytes per file, largest first):\n\n| file | MiB |\n|---|---:|"
    )
    .unwrap();
    for (path, bytes) in again.iter().take(12) {
        writeln!(report.md, "| `{path}` | {:.1} |", *bytes as f64 / 1048576.0).unwrap();
    }
    report.json.insert(
        "incremental".into(),
        serde_json::json!({"full_secs": full, "incremental_secs": incr, "full_bytes": sizes.0, "incremental_bytes": sizes.1}),
    );
    b.clear_stores();
}

/// The files backup `m` (an incremental, in the file:// store) stored
/// again itself, with the plain bytes of their chunks it stored (not
/// referred to in the base), largest first.
fn stored_again(b: &Bench, m: &Manifest) -> Vec<(String, u64)> {
    use common::archive::index::Index;
    let info = m.archive.as_ref().unwrap();
    let ix = info.index.as_ref().unwrap();
    let stored = std::fs::read(b.tmp.path().join("store").join(&ix.key)).unwrap();
    let index = Index::parse(&stored, &ix.key, info, &m.data.paths).unwrap();
    let mut again: Vec<(String, u64)> = index
        .entries
        .iter()
        .filter(|e| e.source.is_none())
        .map(|e| {
            let own = e.chunks.iter().filter(|c| c.at.is_none()).map(|c| c.len);
            (e.path.clone(), own.sum())
        })
        .filter(|(_, bytes)| *bytes > 0)
        .collect();
    again.sort_by_key(|(_, bytes)| std::cmp::Reverse(*bytes));
    again
}

/// The figures of the scaling table, at the data's current size.
fn core(b: &Bench, target: &MariaDb, writer: &Writer) -> Core {
    let lock = b
        .lock_times(b.args.lock_runs.min(5), None, writer)
        .expect("lock");
    let config = b.source_config(&b.file_url(), "zstd", "");
    let m = b.snapshot(&config).expect("snapshotter");
    let snap = Manifest::load(&m).unwrap().snapshot.path;
    let tar_zstd = limits::tar_zstd(b, &snap);
    b.discard(&m);
    let backup = b.mysnap_backup(S3_URL, "zstd");
    let (id, archive, _) = b.stored_backup();
    let untar = limits::untar(b, &archive);
    let restore = b.mysnap_restore(target, &id, S3_URL);
    b.clear_stores();
    Core {
        data: b.data_bytes(),
        lock_hold: median(lock.hold),
        stall: median(lock.stall),
        tar_zstd,
        backup,
        untar,
        restore,
    }
}
