//! The delta restore row: a replica 5% stale re-seeded with `restore
//! --delta` against a full restore of the same backup, from a file:// store.
//! The data is spread over at least 20 tables (the 8 sysbench tables and
//! copies of them), one of which changes between the two backups.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use mysnap_tests::MariaDb;

use crate::dataset::{Bench, Target};
use crate::measure::{drop_caches, median};
use crate::report::{Report, Row};

/// Tables of the data set for this row, at least; one changes.
const TABLES: u32 = 20;

/// Waits until the server has written every dirty page (so a table's file
/// changes only when the table does, as on a server at rest).
fn flushed(db: &MariaDb) {
    db.sql("SET GLOBAL innodb_max_dirty_pages_pct_lwm = 0.001; SET GLOBAL innodb_max_dirty_pages_pct = 0");
    let deadline = Instant::now() + Duration::from_secs(600);
    while db
        .sql("SELECT variable_value FROM information_schema.global_status WHERE variable_name = 'INNODB_BUFFER_POOL_PAGES_DIRTY'")
        .trim()
        != "0"
    {
        assert!(Instant::now() < deadline, "dirty pages are not flushed");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `restorer ARGS` onto `target` from a dropped cache: seconds and its JSON report.
fn restore(b: &Bench, target: &MariaDb, args: &[&str]) -> (f64, serde_json::Value) {
    let config = b.config(
        &Target {
            socket: &target.socket,
            mountpoint: target.datadir.parent().unwrap(),
            service: Some(target.service_commands()),
        },
        &b.file_url(),
        "zstd",
        "",
    );
    drop_caches();
    let t = Instant::now();
    let out = b.cmd("restorer", &config).args(args).output().unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "restorer {args:?}");
    let r: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    if let Some(old) = r["old_datadir"].as_str() {
        std::fs::remove_dir_all(old).unwrap();
    }
    (secs, r)
}

/// Copies the stored backup in `dir` (archive, index, manifest) to `to`.
fn copy_dir(dir: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The row: full restore and delta restore of the newer backup onto a copy
/// of the older one, interleaved, medians of `--runs`.
pub fn measure(b: &Bench, report: &mut Report) {
    let have: u32 =
        b.db.sql("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'sbtest'")
            .trim()
            .parse()
            .unwrap();
    let tables = have.max(TABLES);
    eprintln!("bench: delta restore: {tables} tables");
    for i in have + 1..=tables {
        let from = (i - 1) % 8 + 1;
        b.db.sql(&format!(
            "SET sql_log_bin = 0; CREATE TABLE IF NOT EXISTS sbtest.sbtest{i} LIKE sbtest.sbtest{from}; \
             INSERT INTO sbtest.sbtest{i} SELECT * FROM sbtest.sbtest{from}"
        ));
    }
    b.db.sql("FLUSH TABLES; RESET MASTER");
    flushed(&b.db);
    let (old_id, old_archive, _) = b.stored_backup_as("zstd-indexed", "");
    let keep = b.tmp.path().join("delta-keep");
    copy_dir(old_archive.parent().unwrap(), &keep);
    // 1 table of 20 (5%) changed (every row), and backed up again.
    b.db.sql("UPDATE sbtest.sbtest1 SET c = REPEAT(MD5(RAND()), 3)");
    flushed(&b.db);
    let (new_id, new_archive, unpacked) = b.stored_backup_as("zstd-indexed", "");
    b.copy_to_file_store(&new_archive);
    copy_dir(&keep, &b.tmp.path().join("store/bench").join(&old_id));
    let target = b.target_server("delta-target");
    let (mut full, mut delta, mut fetched, mut fetched_full) = (Vec::new(), Vec::new(), 0u64, 0u64);
    let mut reused = 0u64;
    // (unpack, downtime) seconds of the last delta and full restore.
    let (mut split_delta, mut split_full) = ((0.0, 0.0), (0.0, 0.0));
    let split = |r: &serde_json::Value| {
        (
            r["unpack_secs"].as_f64().unwrap_or(0.0),
            r["downtime_secs"].as_f64().unwrap_or(0.0),
        )
    };
    for run in 0..b.args.runs {
        eprintln!("bench: delta restore, run {}", run + 1);
        // The stale replica: the older backup, restored and started.
        restore(b, &target, &["restore", &old_id]);
        let (secs, r) = restore(b, &target, &["restore", &new_id, "--delta"]);
        delta.push(secs);
        fetched = r["fetched_bytes"].as_u64().unwrap_or(0);
        reused = r["reused_bytes"].as_u64().unwrap_or(0);
        split_delta = split(&r);
        let (secs, r) = restore(b, &target, &["restore", &new_id]);
        full.push(secs);
        fetched_full = r["fetched_bytes"].as_u64().unwrap_or(0);
        split_full = split(&r);
    }
    let (full, delta) = (median(full), median(delta));
    let rows = vec![
        Row::new("mysnap restore: file, indexed, full → server answering", Ok(full)),
        Row {
            mysnap: Some(full),
            ..Row::new(
                format!(
                    "mysnap restore --delta: a stale replica (1 of {tables} tables changed) → server answering"
                ),
                Ok(delta),
            )
        },
    ];
    writeln!(
        report.md,
        "\n## Delta restore (file:// → server answering)\n"
    )
    .unwrap();
    report.table(&rows, unpacked);
    writeln!(
        report.md,
        "\n`÷ mysnap` of the delta row: its time ÷ the full restore's ({:.2}; target ≤ 0.20). Fetched: {:.1} MiB of {:.1} MiB stored; taken from the local copy: {:.1} MiB of files (linked whole or copied by piece).",
        delta / full,
        fetched as f64 / 1048576.0,
        fetched_full as f64 / 1048576.0,
        reused as f64 / 1048576.0
    )
    .unwrap();
    writeln!(
        report.md,
        "\nLast run, from each restore's JSON: the delta unpacked in {:.2} s and the server was down {:.2} s (it stops during the first pass); the full restore unpacked in {:.2} s, down {:.2} s.",
        split_delta.0, split_delta.1, split_full.0, split_full.1
    )
    .unwrap();
    report.json.insert(
        "delta_restore".into(),
        serde_json::json!({
            "full_secs": full,
            "delta_secs": delta,
            "ratio": delta / full,
            "fetched_bytes": fetched,
            "fetched_bytes_full": fetched_full,
            "reused_bytes": reused,
        }),
    );
    b.clear_stores();
}
