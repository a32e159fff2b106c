//! Point-in-time recovery end to end: `archiver binlogs` shipping a real
//! MariaDB's binary logs to the in-process S3 server.

use std::collections::BTreeMap;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::binlog::SegmentMeta;
use common::ids::BackupName;
use common::keys::{self, SegmentPart};
use mysnap_tests::{gate, spawn_until_line};
use sha2::{Digest, Sha256};

use crate::backup::{assert_ok, error_line, set, Rig, StoreKind};

fn name() -> BackupName {
    BackupName::parse("db1").unwrap()
}

/// The complete segments in the store (their metadata, parsed as the store's
/// untrusted input is), by metadata key; and the keys of data without metadata.
fn segments(rig: &Rig) -> (BTreeMap<String, SegmentMeta>, Vec<String>) {
    let n = name();
    let keys = rig.store_keys();
    let prefix = "fleet/"; // the rig's S3 prefix
    let mut metas = BTreeMap::new();
    let mut data = Vec::new();
    for full in &keys {
        let key = full.strip_prefix(prefix).unwrap_or(full);
        match keys::segment_of(&n, key) {
            Some((_, SegmentPart::Meta)) => {
                let text = String::from_utf8(rig.fetch(key)).unwrap();
                let meta = SegmentMeta::parse_stored(&text, key, key, &n)
                    .unwrap_or_else(|e| panic!("{e}"));
                metas.insert(key.to_string(), meta);
            }
            Some((_, SegmentPart::Data)) => data.push(key.to_string()),
            Some((_, SegmentPart::Mac)) | None => {}
        }
    }
    let orphans = data
        .into_iter()
        .filter(|d| !metas.values().any(|m| m.segment().data_key(&n) == *d))
        .collect();
    (metas, orphans)
}

pub(crate) fn ship_once(rig: &Rig) -> Output {
    rig.run("archiver", &["binlogs", "--once"])
}

fn shipped_keys(out: &Output) -> Vec<String> {
    assert_ok(out, "archiver binlogs --once");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

/// The server's binary log `file`, as bytes.
fn binlog_bytes(rig: &Rig, file: &str) -> Vec<u8> {
    std::fs::read(rig.db.datadir.join(file)).unwrap()
}

/// Checks that the stored data of `meta` is the server's file, whole.
fn assert_stored_is_the_file(rig: &Rig, meta: &SegmentMeta) {
    let stored = rig.fetch(&meta.segment().data_key(&name()));
    assert_eq!(stored.len() as u64, meta.stored_size);
    assert_eq!(hex::encode(Sha256::digest(&stored)), meta.sha256.as_str());
    let plain = zstd::decode_all(&stored[..]).unwrap();
    assert_eq!(
        plain,
        binlog_bytes(rig, meta.file.as_str()),
        "{}",
        meta.file
    );
    assert_eq!(plain.len() as u64, meta.size);
}

fn seq_of(gtid_pos: &str) -> u64 {
    gtid_pos.rsplit('-').next().unwrap().parse().unwrap()
}

#[test]
fn binlogs_are_shipped_whole_once_resumed_and_a_purged_one_is_a_gap() {
    if !gate("binlogs_are_shipped_whole_once_resumed_and_a_purged_one_is_a_gap") {
        return;
    }
    let rig = Rig::new(StoreKind::S3);
    let textfile = rig.tmp.path().join("textfile");
    std::fs::create_dir(&textfile).unwrap();
    let dir = textfile.to_str().unwrap().to_string();
    rig.write_config(|t| set(t, "metrics", "textfile_dir", dir.as_str()));
    let metrics =
        || crate::metrics::read_metrics(&textfile.join("mysnap_db1_binlogs.prom"), "binlogs");
    rig.db.sql(
        "CREATE DATABASE app; CREATE TABLE app.t (id INT PRIMARY KEY, v VARCHAR(20)); \
         INSERT INTO app.t VALUES (1, 'one'), (2, 'two')",
    );
    let pos = rig.db.sql("SELECT @@gtid_binlog_pos");

    // First run: the open binary log held transactions, so it was closed;
    // every closed file is shipped, whole, with metadata after the data.
    let first = shipped_keys(&ship_once(&rig));
    assert!(!first.is_empty());
    let (metas, orphans) = segments(&rig);
    assert!(orphans.is_empty(), "{orphans:?}");
    assert_eq!(first, metas.keys().cloned().collect::<Vec<_>>());
    let logs = rig.db.sql("SHOW BINARY LOGS");
    assert_eq!(logs.lines().count(), metas.len() + 1, "{logs}");
    for m in metas.values() {
        assert_eq!(m.server_id, 1);
        assert_stored_is_the_file(&rig, m);
    }
    let newest = metas.values().max_by_key(|m| m.file.clone()).unwrap();
    assert_eq!(
        newest.last_gtid.as_ref().map(|g| g.to_string()),
        Some(pos.clone()),
        "the newest segment ends with the last commit"
    );
    let transactions: u64 = metas.values().map(|m| m.transactions).sum();
    assert_eq!(transactions, seq_of(&pos), "every transaction shipped once");
    // The cycle's metrics: what it shipped, up to which event.
    let m = metrics();
    let newest_event = newest.last_event.time().unix_timestamp() as f64;
    assert_eq!(m["mysnap_last_exit_code"], 0.0, "{m:?}");
    assert_eq!(m["mysnap_binlogs_shipped"], first.len() as f64, "{m:?}");
    assert_eq!(
        m["mysnap_binlogs_newest_event_timestamp_seconds"],
        newest_event
    );
    assert!(!m.contains_key("mysnap_binlogs_last_gap_timestamp_seconds"));

    // Nothing written since: nothing closed, nothing shipped.
    assert_eq!(shipped_keys(&ship_once(&rig)), Vec::<String>::new());
    assert_eq!(rig.db.sql("SHOW BINARY LOGS"), logs);
    // A new run carries the newest event on from the file.
    let m = metrics();
    assert_eq!(m["mysnap_binlogs_shipped"], 0.0, "{m:?}");
    assert_eq!(
        m["mysnap_binlogs_newest_event_timestamp_seconds"],
        newest_event
    );

    // A segment whose metadata is missing (a run killed between data and
    // metadata) is shipped again, and only it.
    let (victim, _) = metas.iter().next().unwrap();
    let cfg = rig.store_cfg();
    rig.block_on(async {
        let store = common::store::open(&cfg).await.unwrap();
        store.delete(victim).await.unwrap();
    });
    assert_eq!(shipped_keys(&ship_once(&rig)), vec![victim.clone()]);
    assert_eq!(segments(&rig).0, metas);

    // A gap: two binary logs closed and purged before any run shipped them.
    for i in 3..5 {
        rig.db.sql(&format!(
            "INSERT INTO app.t VALUES ({i}, 'x'); FLUSH BINARY LOGS"
        ));
    }
    let files: Vec<String> = rig
        .db
        .sql("SHOW BINARY LOGS")
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_string())
        .collect();
    let current = files.last().unwrap();
    // MariaDB keeps a binary log until InnoDB checkpointed its commits:
    // purge until the current one is the only one left.
    let deadline = Instant::now() + Duration::from_secs(20);
    while rig.db.sql("SHOW BINARY LOGS").lines().count() > 1 {
        assert!(
            Instant::now() < deadline,
            "PURGE BINARY LOGS left older files"
        );
        rig.db.sql(&format!("PURGE BINARY LOGS TO '{current}'"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let missing = &files[files.len() - 3..files.len() - 1];
    rig.db.sql("INSERT INTO app.t VALUES (9, 'after')");
    let out = ship_once(&rig);
    let line = error_line(&out, 1);
    assert!(
        line.contains(&format!("gap: {}, {} purged", missing[0], missing[1])),
        "{line}"
    );
    // It kept shipping: what came after the gap is stored.
    let (after, _) = segments(&rig);
    assert!(
        after.values().any(|m| m.file == *current.as_str()),
        "{after:?}"
    );
    // The metrics say so: the cycle failed, when the gap was found, and
    // what it shipped all the same.
    let m = metrics();
    assert_eq!(m["mysnap_last_exit_code"], 1.0, "{m:?}");
    assert!(
        m["mysnap_binlogs_last_gap_timestamp_seconds"]
            >= m["mysnap_last_success_timestamp_seconds"],
        "{m:?}"
    );
    assert!(m["mysnap_binlogs_shipped"] >= 1.0, "{m:?}");
    assert!(
        m["mysnap_binlogs_newest_event_timestamp_seconds"] >= newest_event,
        "{m:?}"
    );
}

#[test]
fn a_binlog_archiver_killed_between_data_and_metadata_loses_and_duplicates_nothing() {
    if !gate("a_binlog_archiver_killed_between_data_and_metadata_loses_and_duplicates_nothing") {
        return;
    }
    let rig = Rig::new(StoreKind::S3);
    rig.db.sql(
        "CREATE DATABASE app; CREATE TABLE app.t (id INT PRIMARY KEY); \
         INSERT INTO app.t VALUES (1), (2), (3)",
    );
    let mut cmd = rig.cmd("archiver");
    cmd.args(["binlogs", "--once"])
        .env("MYSNAP_TEST_PAUSE_AT", "binlog-data-stored")
        .stdout(Stdio::null());
    let (mut child, _) = spawn_until_line(
        &mut cmd,
        "paused at binlog-data-stored",
        Duration::from_secs(60),
    );
    mysnap_tests::send_signal(&child, nix::sys::signal::Signal::SIGKILL);
    child.wait().unwrap();
    let (metas, orphans) = segments(&rig);
    assert!(metas.is_empty(), "{metas:?}");
    assert_eq!(orphans.len(), 1, "the data of the segment killed mid-way");

    // Rerun: the segment is shipped again, whole; each file once.
    rig.db.sql("INSERT INTO app.t VALUES (4)");
    let shipped = shipped_keys(&ship_once(&rig));
    let (metas, orphans) = segments(&rig);
    assert!(orphans.is_empty(), "{orphans:?}");
    assert_eq!(shipped, metas.keys().cloned().collect::<Vec<_>>());
    let logs = rig.db.sql("SHOW BINARY LOGS");
    assert_eq!(metas.len() + 1, logs.lines().count(), "{logs}");
    for m in metas.values() {
        assert_stored_is_the_file(&rig, m);
    }
    let transactions: u64 = metas.values().map(|m| m.transactions).sum();
    assert_eq!(
        transactions,
        seq_of(&rig.db.sql("SELECT @@gtid_binlog_pos"))
    );
}

/// The recovery point: a running `archiver binlogs` with a 2 s interval,
/// a commit every 250 ms for 20 s; for each commit, the time until a
/// segment's metadata holding it is in the store.
#[test]
fn the_binlog_archiver_keeps_the_recovery_point_within_its_interval() {
    if !gate("the_binlog_archiver_keeps_the_recovery_point_within_its_interval") {
        return;
    }
    let rig = Rig::new(StoreKind::S3);
    rig.write_config(|t| set(t, "binlog", "rotate_interval", "2s"));
    rig.db
        .sql("CREATE DATABASE app; CREATE TABLE app.t (id INT PRIMARY KEY, at DATETIME(6))");
    let mut archiver = rig
        .cmd("archiver")
        .arg("binlogs")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut commits: Vec<(u64, Instant)> = Vec::new();
    let mut lags: Vec<f64> = Vec::new();
    let mut covered = 0u64;
    let start = Instant::now();
    let mut next_write = start;
    let mut id = 0;
    // 20 s of writes, then up to the 60 s target for the last one to ship.
    while start.elapsed() < Duration::from_secs(80) && (id < 80 || lags.len() < commits.len()) {
        if id < 80 && Instant::now() >= next_write {
            id += 1;
            let pos = rig.db.sql(&format!(
                "INSERT INTO app.t VALUES ({id}, NOW(6)); SELECT @@gtid_binlog_pos"
            ));
            commits.push((seq_of(&pos), Instant::now()));
            next_write += Duration::from_millis(250);
        }
        let (metas, _) = segments(&rig);
        let now = Instant::now();
        let newest = metas
            .values()
            .filter_map(|m| m.last_gtid.as_ref().map(|g| seq_of(g)))
            .max()
            .unwrap_or(0);
        for (seq, at) in &commits {
            if *seq > covered && *seq <= newest {
                lags.push(now.duration_since(*at).as_secs_f64());
            }
        }
        covered = covered.max(newest);
        std::thread::sleep(Duration::from_millis(100));
    }
    mysnap_tests::send_signal(&archiver, nix::sys::signal::Signal::SIGTERM);
    let status = archiver.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(archiver.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert_eq!(lags.len(), commits.len(), "every commit shipped: {stderr}");
    lags.sort_by(|a, b| a.total_cmp(b));
    let (median, max) = (lags[lags.len() / 2], lags[lags.len() - 1]);
    eprintln!(
        "recovery point (rotate_interval 2s, a commit every 250 ms, {} commits): median {median:.2}s, max {max:.2}s",
        lags.len()
    );
    assert!(max < 60.0, "recovery point {max:.1}s, over the 60 s target");
}

/// `restorer status` shows the recoverable window: from the backup to the
/// end of the unbroken archive after it (a gap ends it), on a directory
/// store with a planted backup and planted segments (no MariaDB needed).
#[test]
fn status_shows_the_recoverable_window_up_to_a_gap() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = dir.join("store");
    let id = mysnap_tests::id_ago(Duration::from_secs(3600));
    let backup = common::ids::BackupId::parse(&id).unwrap().time();
    let manifest = mysnap_tests::synthetic_manifest("db1", &id).replace(
        "[server]",
        "[binlog]\nfile = \"binlog.000002\"\nposition = 400\n\n[server]",
    );
    mysnap_tests::plant(&store, "db1", &id, Some(&manifest));
    let n = name();
    let plant_segment =
        |file: &str, created: i64, last: i64| plant_segment_at(&store, backup, file, created, last);
    plant_segment("binlog.000002", -1, 10);
    plant_segment("binlog.000003", 10, 20);
    plant_segment("binlog.000005", 40, 50);
    // Metadata moved under another segment's key: skipped, not trusted.
    let forged = plant_segment("binlog.000004", 20, 40);
    let (data, meta) = (forged.segment().data_key(&n), forged.segment().meta_key(&n));
    let elsewhere = common::keys::SegmentId {
        file: common::ids::BinlogFile::parse("binlog.000009").unwrap(),
        ..forged.segment()
    };
    for (from, to) in [
        (data, elsewhere.data_key(&n)),
        (meta, elsewhere.meta_key(&n)),
    ] {
        std::fs::create_dir_all(store.join(&to).parent().unwrap()).unwrap();
        std::fs::rename(store.join(from), store.join(to)).unwrap();
    }
    std::fs::remove_dir(store.join(forged.segment().data_key(&n)).parent().unwrap()).unwrap();

    let config = planted_config(dir, "");
    let out = std::process::Command::new(mysnap_tests::bin("restorer"))
        .arg("--config")
        .arg(&config)
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert_ok(&out, "restorer status --json");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("forged or misplaced"), "{stderr}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let windows = &doc["names"][0]["recoverable"];
    let rfc = |t: time::OffsetDateTime| common::binlog::rfc3339(t);
    assert_eq!(
        windows,
        &serde_json::json!([{
            "server_id": 1,
            "from": rfc(backup),
            "to": rfc(backup + time::Duration::minutes(20)),
        }]),
        "{doc}"
    );
    let out = std::process::Command::new(mysnap_tests::bin("restorer"))
        .arg("--config")
        .arg(&config)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "server 1 recoverable any time from {} to {}",
            rfc(backup),
            rfc(backup + time::Duration::minutes(20))
        )),
        "{text}"
    );
}

/// Runs `sql` as one session whose statements are logged at UTC second `at`.
fn sql_at(db: &mysnap_tests::MariaDb, at: i64, sql: &str) {
    db.sql(&format!("SET timestamp = {at}; {sql}"));
}

/// The point-in-time restore: writes at known times before and after a
/// backup, a DDL in between, a row deleted by mistake at T; a restore
/// `--until T-1s` onto another server matches (CHECKSUM TABLE) a reference
/// server that applied the same statements up to T-1s. Then a gap: a
/// restore beyond it is refused, naming the missing files, and changes
/// nothing.
#[test]
fn a_restore_until_a_time_replays_to_exactly_that_point_and_a_gap_is_refused() {
    if !gate("a_restore_until_a_time_replays_to_exactly_that_point_and_a_gap_is_refused") {
        return;
    }
    let rig = Rig::new(StoreKind::S3);
    let reference = mysnap_tests::MariaDb::start(
        &rig.tmp.path().join("reference/mysql"),
        mysnap_tests::MariaOpts {
            server_id: 9,
            log_bin: false,
            ..Default::default()
        },
    );
    let before = [
        "CREATE DATABASE app",
        "CREATE TABLE app.t (id INT PRIMARY KEY, v VARCHAR(20))",
        "INSERT INTO app.t VALUES (1, 'one'), (2, 'two'), (3, 'three')",
        "CREATE TABLE app.bulk (id INT PRIMARY KEY, v VARCHAR(100))",
    ];
    for s in before {
        rig.db.sql(s);
        reference.sql(s);
    }
    rig.backup();
    // After the backup, at known times (in the future of the backup's id).
    let base = time::OffsetDateTime::now_utc().unix_timestamp() + 60;
    let t = base + 4;
    let after = [
        (base, "INSERT INTO app.t VALUES (4, 'four')"),
        (
            base + 1,
            "ALTER TABLE app.t ADD COLUMN c INT NOT NULL DEFAULT 7",
        ),
        (base + 2, "INSERT INTO app.t VALUES (5, 'five', 8)"),
        (base + 3, "UPDATE app.t SET c = 9 WHERE id = 1"),
        // Replay's throughput: 200,000 rows as row events.
        (
            base + 3,
            "SET SESSION binlog_format = ROW; USE app; INSERT INTO bulk SELECT seq, REPEAT('x', 100) FROM seq_1_to_200000",
        ),
    ];
    let mut gtids = Vec::new();
    for (at, s) in after {
        sql_at(&rig.db, at, s);
        reference.sql(s);
        gtids.push(rig.db.sql("SELECT @@gtid_binlog_pos"));
    }
    sql_at(&rig.db, t, "DELETE FROM app.t WHERE id = 2"); // the mistake, at T
    sql_at(&rig.db, t + 5, "INSERT INTO app.t VALUES (6, 'six', 0)");
    sql_at(&rig.db, t + 100, "INSERT INTO app.t VALUES (7, 'later', 0)");
    assert_ok(&ship_once(&rig), "archiver binlogs --once");

    let target = crate::restore::Target::second(&rig);
    let until = common::binlog::rfc3339(time::OffsetDateTime::from_unix_timestamp(t - 1).unwrap());
    let out = target.restorer(&rig, &["restore", "--until", &until]);
    assert_ok(&out, "restorer restore --until");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        target
            .db
            .sql("SELECT GROUP_CONCAT(id ORDER BY id) FROM app.t"),
        "1,2,3,4,5"
    );
    assert_eq!(target.db.checksums("app"), reference.checksums("app"));
    let (bytes, secs) = (
        report["replayed_bytes"].as_u64().unwrap(),
        report["replay_secs"].as_f64().unwrap(),
    );
    eprintln!(
        "replay: {:.1} MiB of binary log (200,000 rows as row events) in {secs:.2}s: {:.1} MiB/s, {:.0} rows/s",
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / secs.max(1e-3) / (1 << 20) as f64,
        200_000.0 / secs.max(1e-3)
    );
    assert!(bytes > 10 << 20, "{bytes} bytes replayed");

    // --until-gtid: through the insert of 5, exactly: neither the UPDATE
    // nor the bulk insert after it.
    let out = target.restorer(&rig, &["restore", "--until-gtid", &gtids[2]]);
    assert_ok(&out, "restorer restore --until-gtid");
    assert_eq!(
        target
            .db
            .sql("SELECT GROUP_CONCAT(CONCAT(id, ':', c) ORDER BY id) FROM app.t"),
        "1:7,2:7,3:7,4:7,5:8"
    );
    assert_eq!(target.db.sql("SELECT COUNT(*) FROM app.bulk"), "0");
    // Back to T-1s for what follows.
    assert_ok(
        &target.restorer(&rig, &["restore", "--until", &until]),
        "restorer restore --until, again",
    );

    // A gap: two binary logs purged before they were shipped.
    for i in 10..12 {
        rig.db.sql(&format!(
            "INSERT INTO app.t VALUES ({i}, 'x', 0); FLUSH BINARY LOGS"
        ));
    }
    let files: Vec<String> = rig
        .db
        .sql("SHOW BINARY LOGS")
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_string())
        .collect();
    let current = files.last().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while rig.db.sql("SHOW BINARY LOGS").lines().count() > 1 {
        assert!(
            Instant::now() < deadline,
            "PURGE BINARY LOGS left older files"
        );
        rig.db.sql(&format!("PURGE BINARY LOGS TO '{current}'"));
        std::thread::sleep(Duration::from_millis(200));
    }
    rig.db
        .sql("INSERT INTO app.t VALUES (20, 'after the gap', 0)");
    let _ = ship_once(&rig); // exits 1: the gap
    let missing = &files[files.len() - 3..files.len() - 1];
    let out = target.restorer(&rig, &["restore", "--until", "latest"]);
    let line = error_line(&out, 1);
    assert!(
        line.contains(&format!("{} to {} are missing", missing[0], missing[1])),
        "{line}"
    );
    // Nothing changed: still the restored point.
    assert_eq!(
        target
            .db
            .sql("SELECT GROUP_CONCAT(id ORDER BY id) FROM app.t"),
        "1,2,3,4,5"
    );
}

/// `--until` with `--replica-of`: the restored server replicates from
/// where the replay stopped, so it applies the rest of the source's
/// history (the mistaken delete at T included: a replica at a point, not a
/// repair) exactly once: a transaction replayed and then fetched again
/// would stop its SQL thread on a duplicate key, one skipped would leave
/// the tables different.
#[test]
fn a_replica_restored_to_a_point_replicates_from_where_the_replay_stopped() {
    if !gate("a_replica_restored_to_a_point_replicates_from_where_the_replay_stopped") {
        return;
    }
    let (src, src_port) = crate::restore::replication_source(StoreKind::File);
    src.db.sql(
        "CREATE DATABASE app; CREATE TABLE app.t (id INT PRIMARY KEY, v VARCHAR(20)); \
         INSERT INTO app.t VALUES (1, 'one')",
    );
    src.backup();
    let base = time::OffsetDateTime::now_utc().unix_timestamp() + 60;
    let t = base + 3;
    sql_at(&src.db, base, "INSERT INTO app.t VALUES (2, 'two')");
    sql_at(&src.db, base + 1, "INSERT INTO app.t VALUES (3, 'three')");
    sql_at(&src.db, t, "DELETE FROM app.t WHERE id = 2");
    sql_at(&src.db, t + 1, "INSERT INTO app.t VALUES (4, 'four')");
    assert_ok(&ship_once(&src), "archiver binlogs --once");
    // After the archive's end: only replication brings it.
    src.db.sql("INSERT INTO app.t VALUES (5, 'five')");

    let target = crate::restore::Target::replica(&src, 2);
    let pw = target.replication_password_file();
    let until = common::binlog::rfc3339(time::OffsetDateTime::from_unix_timestamp(t - 1).unwrap());
    let out = target.restorer(
        &src,
        &[
            "restore",
            "--until",
            &until,
            "--replica-of",
            &format!("127.0.0.1:{src_port}"),
            "--replication-user",
            "repl",
            "--replication-password-file",
            pw.to_str().unwrap(),
        ],
    );
    assert_ok(&out, "restorer restore --until --replica-of");
    let want = src.db.sql("SELECT @@gtid_binlog_pos");
    let deadline = Instant::now() + Duration::from_secs(60);
    while target.db.sql("SELECT @@gtid_slave_pos") != want {
        let status = target.db.sql("SHOW SLAVE STATUS\\G");
        assert!(
            Instant::now() < deadline && !status.contains("Slave_SQL_Running: No"),
            "the replica did not catch up: {status}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        target
            .db
            .sql("SELECT GROUP_CONCAT(id ORDER BY id) FROM app.t"),
        "1,3,4,5"
    );
    assert_eq!(target.db.checksums("app"), src.db.checksums("app"));
}

/// A restore killed (kill -9) while its throwaway server runs on the staged
/// data: the live server never stopped and its data is untouched; `restorer
/// recover` stops the leftover server and removes the staging; the same
/// restore then succeeds.
#[test]
fn a_restore_killed_mid_replay_leaves_the_live_server_untouched_and_reruns() {
    if !gate("a_restore_killed_mid_replay_leaves_the_live_server_untouched_and_reruns") {
        return;
    }
    let rig = Rig::new(StoreKind::File);
    rig.db.sql(
        "CREATE DATABASE app; CREATE TABLE app.t (id INT PRIMARY KEY); INSERT INTO app.t VALUES (1)",
    );
    rig.backup();
    rig.db.sql("INSERT INTO app.t VALUES (2), (3)");
    assert_ok(&ship_once(&rig), "archiver binlogs --once");
    let target = crate::restore::Target::second(&rig);
    let mut cmd = std::process::Command::new(mysnap_tests::bin("restorer"));
    cmd.env("MYSNAP_CONFIG", &target.config)
        .env("MYSNAP_TEST_PAUSE_AT", "replay")
        .args(["restore", "--until", "latest"])
        .stdout(Stdio::null());
    let (mut child, _) = spawn_until_line(&mut cmd, "paused at replay", Duration::from_secs(120));
    mysnap_tests::send_signal(&child, nix::sys::signal::Signal::SIGKILL);
    child.wait().unwrap();
    let parent = target.datadir.parent().unwrap().to_path_buf();
    assert!(
        !mysnap_tests::processes_in(&parent).is_empty(),
        "the throwaway server outlives the kill (what recovery must stop)"
    );
    // The live server still serves its old data.
    assert_eq!(target.db.sql("SELECT v FROM target.marker"), "old data");
    assert_ok(&target.restorer(&rig, &["recover"]), "restorer recover");
    target.assert_untouched("after a restore killed mid-replay and recovered");
    let left: Vec<i32> = mysnap_tests::processes_in(&parent)
        .into_iter()
        .filter(|p| {
            // The live server itself works in its data directory.
            std::fs::read_link(format!("/proc/{p}/cwd"))
                .map(|c| !c.starts_with(&target.datadir))
                .unwrap_or(false)
        })
        .collect();
    assert!(left.is_empty(), "processes left in the staging: {left:?}");
    let out = target.restorer(&rig, &["restore", "--until", "latest"]);
    assert_ok(&out, "restorer restore --until latest, again");
    assert_eq!(
        target
            .db
            .sql("SELECT GROUP_CONCAT(id ORDER BY id) FROM app.t"),
        "1,2,3"
    );
}

/// After a failover the new primary (another server_id, with
/// log_slave_updates: its binary logs hold the old primary's transactions)
/// ships under its own server_id: nothing of the old primary's archive is
/// replaced, though the file names are the same.
#[test]
fn a_new_primary_after_failover_never_overwrites_the_old_primarys_archive() {
    if !gate("a_new_primary_after_failover_never_overwrites_the_old_primarys_archive") {
        return;
    }
    let rig = Rig::with(
        StoreKind::S3,
        mysnap_tests::MariaOpts {
            port: Some(mysnap_tests::free_port()),
            ..Default::default()
        },
    );
    rig.db.sql(
        "CREATE DATABASE app; CREATE TABLE app.t (id INT PRIMARY KEY); INSERT INTO app.t VALUES (1), (2); \
         CREATE USER repl@'127.0.0.1' IDENTIFIED BY 'r'; GRANT REPLICATION SLAVE ON *.* TO repl@'127.0.0.1'",
    );
    let old = shipped_keys(&ship_once(&rig));
    let before: BTreeMap<String, Vec<u8>> = old.iter().map(|k| (k.clone(), rig.fetch(k))).collect();

    // A replica with log_slave_updates and gtid_strict_mode, caught up.
    let replica_dir = rig.tmp.path().join("replica");
    let replica = mysnap_tests::MariaDb::start(
        &replica_dir.join("mysql"),
        mysnap_tests::MariaOpts {
            server_id: 2,
            port: Some(mysnap_tests::free_port()),
            extra: vec!["--log-slave-updates".into(), "--gtid-strict-mode=ON".into()],
            ..Default::default()
        },
    );
    replica.sql(&format!(
        "CHANGE MASTER TO master_host = '127.0.0.1', master_port = {}, \
         master_user = 'repl', master_password = 'r', master_use_gtid = slave_pos; START SLAVE",
        rig.db.port.unwrap()
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    while replica
        .try_sql("SELECT COUNT(*) FROM app.t")
        .ok()
        .as_deref()
        != Some("2")
    {
        assert!(Instant::now() < deadline, "the replica did not catch up");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Failover: the replica is promoted and written to.
    replica.sql("STOP SLAVE; RESET SLAVE ALL; INSERT INTO app.t VALUES (3)");
    assert_eq!(
        replica.sql("SELECT @@log_slave_updates, @@gtid_strict_mode"),
        "1\t1"
    );
    let config = rig.tmp.path().join("replica.toml");
    let text = std::fs::read_to_string(&rig.config).unwrap().replace(
        &rig.db.socket.display().to_string(),
        &replica.socket.display().to_string(),
    );
    std::fs::write(&config, text).unwrap();
    let out = rig
        .cmd("archiver")
        .env("MYSNAP_CONFIG", &config)
        .args(["binlogs", "--once"])
        .output()
        .unwrap();
    let new = shipped_keys(&out);
    assert!(!new.is_empty());
    assert!(
        new.iter().all(|k| k.starts_with("db1/binlogs/2/")),
        "{new:?}"
    );
    assert!(
        old.iter().all(|k| k.starts_with("db1/binlogs/1/")),
        "{old:?}"
    );
    // The same file names on both servers, apart in the store; nothing replaced.
    let (metas, _) = segments(&rig);
    let names = |sid: u64| -> Vec<String> {
        metas
            .values()
            .filter(|m| m.server_id == sid)
            .map(|m| m.file.to_string())
            .collect()
    };
    assert!(names(2).iter().any(|f| names(1).contains(f)), "{metas:?}");
    for (k, v) in &before {
        assert_eq!(&rig.fetch(k), v, "{k} replaced");
    }
    // The new primary's archive holds the old primary's transactions too
    // (log_slave_updates) and its own, in GTID order.
    let transactions: u64 = metas
        .values()
        .filter(|m| m.server_id == 2)
        .map(|m| m.transactions)
        .sum();
    assert!(transactions >= 3, "{metas:?}");
}

/// Plants a complete segment of server 1 in the directory store `store`:
/// `file` created `created` minutes after `t0`, its last event `last` minutes after.
fn plant_segment_at(
    store: &std::path::Path,
    t0: time::OffsetDateTime,
    file: &str,
    created: i64,
    last: i64,
) -> SegmentMeta {
    let n = name();
    let at = |min: i64| common::ids::BackupId::from_time(t0 + time::Duration::minutes(min));
    let meta = SegmentMeta {
        format_version: common::binlog::FORMAT_VERSION,
        name: n.clone(),
        server_id: 1,
        file: common::ids::BinlogFile::parse(file).unwrap(),
        created: at(created),
        size: 100,
        stored_size: 50,
        sha256: common::ids::Sha256Hex::parse(&"ab".repeat(32)).unwrap(),
        compression: common::config::Compression::Zstd,
        first_gtid: None,
        last_gtid: None,
        transactions: 1,
        first_event: at(created),
        last_event: at(last),
        encryption: None,
    };
    let seg = meta.segment();
    for (key, body) in [
        (seg.data_key(&n), b"zstd".to_vec()),
        (seg.meta_key(&n), meta.to_toml().into_bytes()),
    ] {
        let path = store.join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, body).unwrap();
    }
    meta
}

/// Binary log segments whose metadata declares more than the file system
/// holds (forged, without `[auth]`, or just large) are refused by the room
/// check before anything is downloaded or changed.
#[test]
fn a_replay_that_would_not_fit_is_refused_before_anything_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = dir.join("store");
    let backup = plant_backup_at(&store, Duration::from_secs(3600), "binlog.000002");
    let seg = plant_segment_at(&store, backup, "binlog.000002", -1, 10).segment();
    let key = store.join(seg.meta_key(&name()));
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(text.contains("\nsize = 100\n"), "{text}");
    std::fs::write(
        &key,
        text.replace("\nsize = 100\n", "\nsize = 4611686018427387904\n"),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("vol/mysql")).unwrap();
    std::fs::write(dir.join("vol/mysql/ibdata1"), "live").unwrap();
    let config = planted_config(dir, "");
    let out = std::process::Command::new(mysnap_tests::bin("restorer"))
        .arg("--config")
        .arg(&config)
        .args(["restore", "--until", "latest", "--ignore-version"])
        .output()
        .unwrap();
    let line = error_line(&out, 1);
    assert!(
        line.contains("not enough room")
            && line.contains("binary logs to replay")
            && line.contains("nothing was changed"),
        "{line}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("vol/mysql/ibdata1")).unwrap(),
        "live"
    );
    let left: Vec<_> = std::fs::read_dir(dir.join("vol"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["mysql"], "nothing staged");
}

/// The config of a test on a planted directory store in `dir` (`dir/store`,
/// a data directory `dir/vol/mysql`, no server: stop and start do nothing),
/// with `extra` appended.
fn planted_config(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let config = dir.join("db1.toml");
    std::fs::write(
        &config,
        format!(
            "[mysql]\nstop_command = [\"true\"]\nstart_command = [\"true\"]\n\
             [volume]\nbackend = \"btrfs\"\nmountpoint = \"{r}/vol\"\ndatadir = \"{r}/vol/mysql\"\n\
             [store]\nurl = \"file://{r}/store\"\n\
             [backup]\nname = \"db1\"\nstate_dir = \"{r}/state\"\n{extra}",
            r = dir.display()
        ),
    )
    .unwrap();
    config
}

/// A planted backup of `db1` `ago` before now whose manifest records binary log `file`.
fn plant_backup_at(store: &std::path::Path, ago: Duration, file: &str) -> time::OffsetDateTime {
    let id = mysnap_tests::id_ago(ago);
    let manifest = mysnap_tests::synthetic_manifest("db1", &id).replace(
        "[server]",
        &format!("[binlog]\nfile = \"{file}\"\nposition = 400\n\n[server]"),
    );
    mysnap_tests::plant(store, "db1", &id, Some(&manifest));
    common::ids::BackupId::parse(&id).unwrap().time()
}

/// `restorer prune --apply` deletes the segments no kept backup needs (those
/// before the oldest kept backup's binary log), metadata first, and keeps
/// every one from that file on.
#[test]
fn prune_deletes_only_the_segments_before_the_oldest_kept_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = dir.join("store");
    // Two backups, 2 h and 1 h ago, in files 2 and 4; keep_last = 1.
    let old = plant_backup_at(&store, Duration::from_secs(7200), "binlog.000002");
    let kept = plant_backup_at(&store, Duration::from_secs(3600), "binlog.000004");
    let t0 = old - time::Duration::minutes(30);
    let rel = |t: time::OffsetDateTime| (t - t0).whole_minutes();
    let segs: Vec<SegmentMeta> = [
        ("binlog.000001", 0, 20),
        ("binlog.000002", 20, 50),
        ("binlog.000003", 50, rel(kept) - 10),
        ("binlog.000004", rel(kept) - 10, rel(kept) + 10),
        ("binlog.000005", rel(kept) + 10, rel(kept) + 20),
    ]
    .iter()
    .map(|(f, c, l)| plant_segment_at(&store, t0, f, *c, *l))
    .collect();
    // What a killed prune or archiver leaves: data and MAC without
    // metadata, one before what the kept backup needs, one after it (maybe
    // being shipped right now).
    let n = name();
    let orphans: Vec<_> = [("binlog.000001", -5), ("binlog.000006", rel(kept) + 20)]
        .iter()
        .map(|(f, c)| {
            let seg = plant_segment_at(&store, t0, f, *c, *c).segment();
            std::fs::remove_file(store.join(seg.meta_key(&n))).unwrap();
            std::fs::write(store.join(seg.mac_key(&n)), "mac").unwrap();
            seg
        })
        .collect();
    let config = planted_config(dir, "[retention]\nkeep_last = 1\n");
    let out = std::process::Command::new(mysnap_tests::bin("restorer"))
        .arg("--config")
        .arg(&config)
        .args(["prune", "--apply"])
        .output()
        .unwrap();
    assert_ok(&out, "restorer prune --apply");
    let text = String::from_utf8_lossy(&out.stdout);
    for (seg, gone) in orphans.iter().zip([true, false]) {
        for key in [seg.mac_key(&n), seg.data_key(&n)] {
            assert_eq!(!store.join(&key).exists(), gone, "{key}: {text}");
            assert_eq!(
                text.contains(&format!("removed {key}  a binary log segment's")),
                gone,
                "{text}"
            );
        }
    }
    for (i, s) in segs.iter().enumerate() {
        let seg = s.segment();
        let gone = i < 3;
        for key in [seg.meta_key(&n), seg.data_key(&n)] {
            assert_eq!(!store.join(&key).exists(), gone, "{key}: {text}");
        }
        assert_eq!(
            text.contains(&format!(
                "removed {}  a binary log segment",
                seg.meta_key(&n)
            )),
            gone,
            "{text}"
        );
    }
}
