//! Delta and partial restores end to end: a stale copy of the source
//! re-seeded from an indexed backup, fetching only what changed; tables
//! extracted by name and put back with transportable tablespaces.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use mysnap_tests::{gate, send_signal, MariaDb, MariaOpts};

use crate::backup::{assert_ok, error_line, set, Rig, StoreKind};
use crate::restore::Target;

/// Tables of the source (`d.t0` …), of about 3 MB of random rows each.
const TABLES: u32 = 10;
/// Tables of the source whose delta restore is measured: enough that the
/// frames of the files a started server always changes (redo log, system
/// tablespace, logs; 16 MiB of tar each) are not most of the archive.
const MANY_TABLES: u32 = 30;

/// A source with `tables` tables taking indexed backups, every page
/// flushed (a file's mtime changes only when its table does); the load is
/// not in the binary log.
/// A small redo log: it holds every change of its size, so the server's
/// 64 MiB would be most of the bytes that always differ.
fn source(tables: u32) -> Rig {
    let src = Rig::with(
        StoreKind::File,
        MariaOpts {
            extra: vec!["--innodb-log-file-size=8M".into()],
            ..MariaOpts::default()
        },
    );
    src.write_config(|t| set(t, "archive", "indexed", true));
    src.db.sql("CREATE DATABASE d");
    for i in 0..tables {
        src.db.sql(&format!(
            "SET sql_log_bin = 0; CREATE TABLE d.t{i} (id INT PRIMARY KEY, v VARBINARY(1000)); \
             INSERT INTO d.t{i} SELECT seq, RANDOM_BYTES(1000) FROM d.seq_1_to_3000"
        ));
    }
    flushed(&src.db);
    src
}

/// Waits until the server has no dirty page left.
fn flushed(db: &MariaDb) {
    db.sql("SET GLOBAL innodb_max_dirty_pages_pct_lwm = 0.001; SET GLOBAL innodb_max_dirty_pages_pct = 0");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let dirty = db.sql("SELECT variable_value FROM information_schema.global_status WHERE variable_name = 'INNODB_BUFFER_POOL_PAGES_DIRTY'");
        if dirty.trim() == "0" {
            return;
        }
        assert!(Instant::now() < deadline, "{dirty} dirty pages left");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The restorer's JSON report of a run that succeeded.
fn report(out: &Output, what: &str) -> serde_json::Value {
    assert_ok(out, what);
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{what}: {e}: {stdout}"))
}

fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// A full restore of `id` onto `target`; the data directory it set aside is removed.
fn full_restore(target: &Target, src: &Rig, id: &str) -> serde_json::Value {
    let r = report(&target.restorer(src, &["restore", id]), "full restore");
    let old = r["old_datadir"].as_str().expect("set aside");
    std::fs::remove_dir_all(old).unwrap();
    r
}

/// Names beside the data directory other than the data directory itself.
fn beside(target: &Target) -> Vec<String> {
    let parent = target.datadir.parent().unwrap();
    std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "mysql" && n != "state" && !n.ends_with(".toml"))
        .collect()
}

/// An all-zero (free) page of an InnoDB file, from its end: bytes there are
/// never read by the server.
fn free_page(path: &Path) -> u64 {
    let data = std::fs::read(path).unwrap();
    let page = 16 << 10;
    (0..data.len() / page)
        .rev()
        .find(|&i| data[i * page..(i + 1) * page].iter().all(|&b| b == 0))
        .map(|i| (i * page + 100) as u64)
        .unwrap_or_else(|| panic!("no free page in {}", path.display()))
}

/// Changes one byte of `path` at `at`, keeping its size and mtime.
fn corrupt_keeping_mtime(path: &Path, at: u64) {
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[0x5a], at).unwrap();
    f.set_modified(mtime).unwrap();
    f.sync_all().unwrap();
}

fn byte_at(path: &Path, at: u64) -> u8 {
    let mut b = [0u8];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    b[0]
}

/// A source of `tables` tables backed up and restored onto a second
/// server (the full restore's report), then one table changed and backed
/// up again (the newer backup's id): the second server is a stale copy.
fn stale_copy(tables: u32) -> (Rig, Target, serde_json::Value, String) {
    let src = source(tables);
    let b1 = src.backup();
    let target = Target::second(&src);
    let full = full_restore(&target, &src, &b1);
    src.db
        .sql("UPDATE d.t3 SET v = RANDOM_BYTES(1000) WHERE id % 2 = 0");
    flushed(&src.db);
    let b2 = src.backup();
    (src, target, full, b2)
}

#[test]
fn a_delta_restore_of_a_stale_copy_fetches_only_what_changed_and_matches_the_source() {
    if !gate("a_delta_restore_of_a_stale_copy_fetches_only_what_changed_and_matches_the_source") {
        return;
    }
    let (src, target, full, b2) = stale_copy(MANY_TABLES);
    assert_ne!(src.db.checksums("d"), target.db.checksums("d"));
    let out = target.restorer(&src, &["restore", &b2, "--delta", "-v"]);
    for l in String::from_utf8_lossy(&out.stderr).lines() {
        if l.contains("fetched") {
            eprintln!("{l}");
        }
    }
    let delta = report(&out, "delta restore");
    assert_eq!(src.db.checksums("d"), target.db.checksums("d"));
    let (fetched_full, fetched_delta) = (num(&full, "fetched_bytes"), num(&delta, "fetched_bytes"));
    eprintln!(
        "full restore fetched {fetched_full} bytes, the delta restore {fetched_delta} ({} files reused, {} bytes with pieces)",
        num(&delta, "reused_files"),
        num(&delta, "reused_bytes")
    );
    assert!(
        num(&delta, "reused_files") >= u64::from(MANY_TABLES) - 1,
        "the unchanged tables are reused: {delta}"
    );
    assert!(
        fetched_delta * 2 < fetched_full,
        "a delta restore fetches far less: {fetched_delta} of {fetched_full}"
    );
    assert!(delta["old_datadir"].is_null(), "{delta}");
    assert!(beside(&target).is_empty(), "left: {:?}", beside(&target));

    // A byte changed with size and mtime kept: --delta keeps it,
    // --delta=checksum fetches the file again.
    let file = target.datadir.join("d/t5.ibd");
    let at = free_page(&file);
    let good = byte_at(&file, at);
    corrupt_keeping_mtime(&file, at);
    let again = report(
        &target.restorer(&src, &["restore", &b2, "--delta"]),
        "delta restore again",
    );
    assert_eq!(
        byte_at(&file, at),
        0x5a,
        "--delta compares size and mtime only"
    );
    let checked = report(
        &target.restorer(&src, &["restore", &b2, "--delta=checksum"]),
        "delta restore with checksums",
    );
    assert_eq!(
        byte_at(&file, at),
        good,
        "--delta=checksum fetched it again"
    );
    // (Reused-file counts of the two modes differ by more than t5: --delta
    // fetches the files a server writes when it stops in its first pass.)
    assert!(
        num(&checked, "reused_files") >= u64::from(MANY_TABLES) - 1,
        "the other tables are still reused: {checked} (before: {again})"
    );
    assert_eq!(src.db.checksums("d"), target.db.checksums("d"));
    assert!(beside(&target).is_empty(), "left: {:?}", beside(&target));

    // A backup that is not indexed: refused before anything changes.
    src.write_config(|t| set(t, "archive", "indexed", false));
    let b3 = src.backup();
    let line = error_line(&target.restorer(&src, &["restore", &b3, "--delta"]), 2);
    assert!(
        line.contains("not indexed") && line.contains("without --delta"),
        "{line}"
    );
    assert_eq!(src.db.checksums("d"), target.db.checksums("d"));
    assert!(beside(&target).is_empty(), "left: {:?}", beside(&target));
}

/// `--delta --until`: the files the stale copy has unchanged are copied
/// from it, not linked (the replay writes the staged copy before the
/// swap), only what changed is fetched, the binary logs are replayed, and
/// the data directory set aside stays as it was, kept like a full
/// restore's.
#[test]
fn a_delta_restore_until_a_point_copies_the_unchanged_files_and_replays() {
    use std::os::unix::fs::MetadataExt;
    if !gate("a_delta_restore_until_a_point_copies_the_unchanged_files_and_replays") {
        return;
    }
    let (src, target, full, b2) = stale_copy(TABLES);
    // After the backup, in the binary log only: what the replay applies.
    src.db
        .sql("INSERT INTO d.t1 VALUES (100000, 'after the backup')");
    assert_ok(&crate::pitr::ship_once(&src), "archiver binlogs --once");
    let want = src.db.checksums("d");
    let stale = target.datadir.join("d/t5.ibd");
    let (ino, bytes) = (
        std::fs::metadata(&stale).unwrap().ino(),
        std::fs::read(&stale).unwrap(),
    );
    let out = target.restorer(&src, &["restore", &b2, "--delta", "--until", "latest"]);
    let r = report(&out, "delta restore --until latest");
    assert_eq!(target.db.checksums("d"), want);
    assert_eq!(
        target.db.sql("SELECT v FROM d.t1 WHERE id = 100000"),
        "after the backup"
    );
    assert!(
        num(&r, "reused_files") >= u64::from(TABLES) - 1,
        "the unchanged tables are reused: {r}"
    );
    // (With ten tables the redo log and system tablespace, which always
    // change, are much of it: the first test measures the ratio.)
    assert!(
        num(&r, "fetched_bytes") < num(&full, "fetched_bytes"),
        "fetched less than a full restore: {r} vs {full}"
    );
    // Copied: the restored file is another inode, and the set-aside one
    // is the stale copy's, unchanged, kept for a rollback by hand.
    let now = target.datadir.join("d/t5.ibd");
    assert_ne!(std::fs::metadata(&now).unwrap().ino(), ino);
    let old = std::path::PathBuf::from(r["old_datadir"].as_str().expect("kept: {r}"));
    let kept = old.join("d/t5.ibd");
    assert_eq!(std::fs::metadata(&kept).unwrap().ino(), ino);
    assert_eq!(std::fs::read(&kept).unwrap(), bytes);
    std::fs::remove_dir_all(&old).unwrap();
    assert!(beside(&target).is_empty(), "left: {:?}", beside(&target));
}

#[test]
fn a_delta_restore_killed_at_any_phase_is_finished_or_undone_by_recover() {
    if !gate("a_delta_restore_killed_at_any_phase_is_finished_or_undone_by_recover") {
        return;
    }
    killed_at_each_phase(false);
}

/// `--delta --until`: the server stopped first, the unchanged files copied,
/// a throwaway server replaying in the staging directory; killed at each
/// phase (the replay too), recovery puts the stale copy back or keeps the
/// replayed data, and stops the throwaway server.
#[test]
fn a_delta_restore_until_a_point_killed_at_any_phase_is_finished_or_undone_by_recover() {
    if !gate("a_delta_restore_until_a_point_killed_at_any_phase_is_finished_or_undone_by_recover") {
        return;
    }
    killed_at_each_phase(true);
}

/// A delta restore (with `--until latest` when `until`) of a stale copy,
/// killed (SIGKILL) at each of its phases, then `restorer recover`: before
/// the commit the stale copy is back and answering, from it the new data
/// stays; nothing is left beside the data directory but, for a restore that
/// copies (`--until`), the kept old data directory.
fn killed_at_each_phase(until: bool) {
    let src = source(TABLES);
    let b1 = src.backup();
    let target = Target::second(&src);
    full_restore(&target, &src, &b1);
    let old = target.db.checksums("d");
    src.db
        .sql("UPDATE d.t3 SET v = RANDOM_BYTES(1000) WHERE id < 100");
    flushed(&src.db);
    let b2 = src.backup();
    let mut args = vec!["restore", b2.as_str(), "--delta"];
    // first-pass: the server stopped while what differs was unpacked, the
    // data directory not yet set aside.
    let mut points = vec![
        "stop",
        "first-pass",
        "stage",
        "swap",
        "swap-aside",
        "commit",
        "start",
    ];
    if until {
        // In the binary log only: what the replay applies.
        src.db
            .sql("INSERT INTO d.t1 VALUES (100000, 'after the backup')");
        assert_ok(&crate::pitr::ship_once(&src), "archiver binlogs --once");
        args.extend(["--until", "latest"]);
        points.insert(3, "replay");
    }
    let new = src.db.checksums("d");
    assert_ne!(old, new);
    let parent = target.datadir.parent().unwrap().to_path_buf();
    for point in points {
        let stays = matches!(point, "commit" | "start");
        let what = format!("killed at {point}");
        let mut child = target.paused(&src, &args, point);
        send_signal(&child, nix::sys::signal::Signal::SIGKILL);
        child.wait().unwrap();
        let out = target.restorer(&src, &["recover"]);
        assert_ok(&out, &what);
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        eprintln!("{what}: {line}");
        assert!(line.contains("found the journal"), "{what}: {line}");
        wait_up(&target.db, &what);
        let want = if stays { &new } else { &old };
        assert_eq!(&target.db.checksums("d"), want, "{what}: {line}");
        let mut left = beside(&target);
        if until && stays {
            // Copied, not shared: the old data directory is kept.
            assert_eq!(left.len(), 1, "{what}: left {left:?}");
            assert!(left[0].starts_with("mysql.old-"), "{what}: left {left:?}");
            std::fs::remove_dir_all(parent.join(left.remove(0))).unwrap();
        }
        assert!(left.is_empty(), "{what}: left {left:?}");
        assert!(!target.journal().exists(), "{what}: journal left");
        // No throwaway server outlives recovery; the live one works in
        // the data directory.
        let strays: Vec<i32> = mysnap_tests::processes_in(&parent)
            .into_iter()
            .filter(|p| {
                std::fs::read_link(format!("/proc/{p}/cwd"))
                    .map(|c| !c.starts_with(&target.datadir))
                    .unwrap_or(false)
            })
            .collect();
        assert!(strays.is_empty(), "{what}: processes left: {strays:?}");
        if stays {
            // Back to the old backup, by a delta restore too.
            let back = report(
                &target.restorer(&src, &["restore", &b1, "--delta"]),
                &format!("{what}: back to {b1}"),
            );
            assert!(num(&back, "reused_files") > 0, "{back}");
            assert_eq!(target.db.checksums("d"), old, "{what}: back");
        }
    }
}

fn wait_up(db: &MariaDb, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while db.try_sql("SELECT 1").is_err() {
        assert!(
            Instant::now() < deadline,
            "{what}: the server does not answer"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The files below `dir`, relative to it.
fn files_in(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = mysnap_tests::files_below(dir).into_iter().collect();
    out.sort();
    out
}

#[test]
fn only_extracts_the_named_tables_files_without_touching_the_server_and_they_import() {
    if !gate("only_extracts_the_named_tables_files_without_touching_the_server_and_they_import") {
        return;
    }
    let src = source(TABLES);
    let b1 = src.backup();
    let target = Target::second(&src);
    full_restore(&target, &src, &b1);
    let want = target.db.checksums("d");
    let size = std::fs::metadata(src.tmp.path().join(format!("store/db1/{b1}/data.tar.zst")))
        .unwrap()
        .len();
    let conn = || -> u64 {
        target
            .db
            .sql("SELECT CONNECTION_ID()")
            .trim()
            .parse()
            .unwrap()
    };
    let before = conn();
    let out_dir = src.tmp.path().join("only");
    let r = report(
        &target.restorer(
            &src,
            &[
                "restore",
                &b1,
                "--only",
                "d.t3,d.t7",
                "--into",
                out_dir.to_str().unwrap(),
            ],
        ),
        "--only",
    );
    assert_eq!(
        files_in(&out_dir),
        [
            "mysql/d/t3.frm",
            "mysql/d/t3.ibd",
            "mysql/d/t7.frm",
            "mysql/d/t7.ibd"
        ],
        "{r}"
    );
    assert_eq!(num(&r, "files"), 4);
    assert!(
        num(&r, "fetched_bytes") * 2 < size,
        "only the frames of those files: {r} of {size}"
    );
    // The server was not touched: same process (the connection ids go on),
    // nothing beside its data directory.
    assert!(conn() > before);
    assert!(beside(&target).is_empty(), "{:?}", beside(&target));

    // Put d.t3 back by hand with a transportable tablespace.
    target.db.sql("DELETE FROM d.t3 WHERE id > 10");
    assert_ne!(target.db.checksums("d"), want);
    target.db.sql("ALTER TABLE d.t3 DISCARD TABLESPACE");
    std::fs::copy(
        out_dir.join("mysql/d/t3.ibd"),
        target.datadir.join("d/t3.ibd"),
    )
    .unwrap();
    target.db.sql("ALTER TABLE d.t3 IMPORT TABLESPACE");
    assert_eq!(target.db.checksums("d"), want);

    // A whole database; from a single-stream backup too.
    src.write_config(|t| set(t, "archive", "indexed", false));
    let b2 = src.backup();
    let whole = src.tmp.path().join("whole");
    let r = report(
        &target.restorer(
            &src,
            &[
                "restore",
                &b2,
                "--only",
                "d",
                "--into",
                whole.to_str().unwrap(),
            ],
        ),
        "--only d",
    );
    let files = files_in(&whole);
    assert_eq!(files.len() as u64, 2 * u64::from(TABLES) + 1, "{files:?}");
    assert!(files.contains(&"mysql/d/db.opt".to_string()), "{files:?}");
    assert!(files.iter().all(|f| f.starts_with("mysql/d/")), "{files:?}");
    assert_eq!(num(&r, "files"), files.len() as u64);

    // Refused: a table the backup lacks (nothing made), a directory
    // inside the data directory, one that is not empty, --only alone.
    let nope = src.tmp.path().join("nope");
    for (args, says) in [
        (
            vec!["--only", "d.t3,d.nope", "--into", nope.to_str().unwrap()],
            "d.nope",
        ),
        (
            vec![
                "--only",
                "d.t3",
                "--into",
                target.datadir.join("x").to_str().unwrap(),
            ],
            "volume.datadir",
        ),
        (
            vec!["--only", "d.t3", "--into", whole.to_str().unwrap()],
            "not empty",
        ),
        (
            vec!["--only", "d.t-3", "--into", nope.to_str().unwrap()],
            "@002d",
        ),
    ] {
        let mut all = vec!["restore", b1.as_str()];
        all.extend(args.iter().copied());
        let line = error_line(&target.restorer(&src, &all), 2);
        assert!(line.contains(says), "{args:?}: {line}");
        assert!(!nope.exists(), "{args:?}");
    }
    assert!(!target.datadir.join("x").exists());
    let out = target.restorer(&src, &["restore", &b1, "--only", "d.t3"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--into"));
}
