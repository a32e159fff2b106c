//! Restores end to end: the real restorer onto a second real server.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::manifest::Manifest;
use mysnap_tests::{
    free_port, gate, plant_archive, plant_indexed, send_signal, sysbench_prepare, sysbench_run,
    BtrfsVolume, MariaDb, MariaOpts,
};

use crate::backup::{assert_ok, edit_config, error_line, set, Rig, StoreKind};

/// A second server to restore onto, with a config sharing the source's store.
pub(crate) struct Target {
    pub(crate) db: MariaDb,
    pub(crate) config: PathBuf,
    pub(crate) datadir: PathBuf,
    _vol: Option<BtrfsVolume>,
    _tmp: tempfile::TempDir,
}

impl Target {
    /// A fresh server in `tmp/srv/mysql`, or on a small btrfs volume of `vol_mib`.
    fn new(src: &Rig, opts: MariaOpts, vol_mib: Option<u64>) -> Target {
        let tmp = tempfile::tempdir().unwrap();
        let vol = vol_mib.map(|mib| BtrfsVolume::new(tmp.path(), mib));
        let root = vol
            .as_ref()
            .map_or_else(|| tmp.path().join("srv"), |v| v.subvol.clone());
        let datadir = root.join("mysql");
        let db = MariaDb::start(&datadir, opts);
        db.sql("CREATE DATABASE target; CREATE TABLE target.marker (v TEXT); INSERT INTO target.marker VALUES ('old data')");
        let (stop, start) = db.service_commands();
        let config = tmp.path().join("target.toml");
        let mut t: toml::Table =
            toml::from_str(&std::fs::read_to_string(&src.config).unwrap()).unwrap();
        set(&mut t, "mysql", "socket", db.socket.to_str().unwrap());
        set(&mut t, "mysql", "stop_command", stop);
        set(&mut t, "mysql", "start_command", start);
        set(&mut t, "volume", "mountpoint", root.to_str().unwrap());
        set(&mut t, "volume", "datadir", datadir.to_str().unwrap());
        set(&mut t, "volume", "owner", "root");
        set(
            &mut t,
            "backup",
            "state_dir",
            tmp.path().join("state").to_str().unwrap(),
        );
        std::fs::write(&config, toml::to_string(&t).unwrap()).unwrap();
        Target {
            db,
            config,
            datadir,
            _vol: vol,
            _tmp: tmp,
        }
    }

    /// A fresh server (server id 2) in `tmp/srv/mysql`.
    pub(crate) fn second(src: &Rig) -> Target {
        Target::new(
            src,
            MariaOpts {
                server_id: 2,
                ..MariaOpts::default()
            },
            None,
        )
    }

    /// A fresh server with server id `server_id`, a port and a binary
    /// log: a replica to be.
    pub(crate) fn replica(src: &Rig, server_id: u32) -> Target {
        Target::new(
            src,
            MariaOpts {
                server_id,
                port: Some(free_port()),
                log_bin: true,
                extra: Vec::new(),
            },
            None,
        )
    }

    /// The replication user's password in a 0600 file, for
    /// `--replication-password-file`.
    pub(crate) fn replication_password_file(&self) -> PathBuf {
        let pw = self._tmp.path().join("repl.pass");
        std::fs::write(&pw, format!("{REPL_SECRET}\n")).unwrap();
        std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        pw
    }

    /// Where a restore keeps its journal.
    pub(crate) fn journal(&self) -> PathBuf {
        self._tmp.path().join("state/restore.journal")
    }

    pub(crate) fn restorer(&self, src: &Rig, args: &[&str]) -> Output {
        let mut c = Command::new(mysnap_tests::bin("restorer"));
        c.env("MYSNAP_CONFIG", &self.config)
            .args(args)
            .stdin(Stdio::null());
        if let Some(s3) = &src.s3 {
            c.envs(s3.env());
        }
        c.output().unwrap()
    }

    /// The live data directory is the old one, untouched, and the server still serves it.
    pub(crate) fn assert_untouched(&self, what: &str) {
        assert_eq!(
            self.db.sql("SELECT v FROM target.marker"),
            "old data",
            "{what}"
        );
        let parent = self.datadir.parent().unwrap();
        let others: Vec<String> = std::fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "mysql" && n != ".mysnap-snapshots")
            .collect();
        assert!(
            others.is_empty(),
            "{what}: staging or .old left in {}: {others:?}",
            parent.display()
        );
    }
}

#[test]
fn a_backup_under_load_restores_as_a_replica_that_matches_the_source() {
    if !gate("a_backup_under_load_restores_as_a_replica_that_matches_the_source") {
        return;
    }
    restore_under_load("ftwrl");
}

#[test]
fn a_backup_stage_backup_under_load_restores_as_a_replica_that_matches_the_source() {
    if !gate("a_backup_stage_backup_under_load_restores_as_a_replica_that_matches_the_source") {
        return;
    }
    restore_under_load("backup_stage");
}

/// The replication user's password on a [`replication_source`].
const REPL_SECRET: &str = "repl-secret";

/// A source server (server id 1, a port, a binary log) with the
/// replication user `repl`; returns it and its port.
pub(crate) fn replication_source(kind: StoreKind) -> (Rig, u16) {
    let port = free_port();
    let src = Rig::with(
        kind,
        MariaOpts {
            server_id: 1,
            port: Some(port),
            log_bin: true,
            extra: Vec::new(),
        },
    );
    // Both host forms: MariaDB's anonymous ''@localhost would otherwise shadow repl@'%'.
    src.db.sql(&format!(
        "CREATE USER repl@'%' IDENTIFIED BY '{REPL_SECRET}'; GRANT REPLICATION SLAVE ON *.* TO repl@'%'; \
         CREATE USER repl@localhost IDENTIFIED BY '{REPL_SECRET}'; GRANT REPLICATION SLAVE ON *.* TO repl@localhost",
    ));
    (src, port)
}

/// Backs up with `lock_method` under sysbench (InnoDB) and a writer of MyISAM,
/// Aria and InnoDB counters, restores as a replica, and compares every table.
fn restore_under_load(lock_method: &str) {
    let (src, src_port) = replication_source(StoreKind::S3);
    src.write_config(|t| set(t, "mysql", "lock_method", lock_method));
    src.db.sql(
        "CREATE DATABASE d; CREATE TABLE d.m (id INT PRIMARY KEY, v INT) ENGINE=MyISAM; \
         CREATE TABLE d.a (id INT PRIMARY KEY, v INT) ENGINE=Aria; \
         CREATE TABLE d.i (id INT PRIMARY KEY, v INT) ENGINE=InnoDB; \
         INSERT INTO d.m VALUES (1, 0); INSERT INTO d.a VALUES (1, 0); INSERT INTO d.i VALUES (1, 0)",
    );
    sysbench_prepare(&src.db.socket, 4, 10_000);
    let mut load = sysbench_run(&src.db.socket, 4, 10_000, 15);
    // Counters that drift apart if the snapshot and its coordinates disagree.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let counters = {
        let (socket, stop) = (src.db.socket.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let ok = Command::new("mariadb")
                    .arg("-S")
                    .arg(&socket)
                    .args([
                        "-uroot",
                        "-e",
                        "UPDATE d.m SET v = v + 1; UPDATE d.a SET v = v + 1; UPDATE d.i SET v = v + 1",
                    ])
                    .status()
                    .unwrap();
                assert!(ok.success(), "counter update");
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let id = src.backup();
    let m = Manifest::parse(
        &String::from_utf8(src.fetch(&format!("db1/{id}/manifest.toml"))).unwrap(),
        "store",
    )
    .unwrap();
    assert_eq!(m.lock.method.as_str(), lock_method);

    let target = Target::replica(&src, 2);
    let pw = target.replication_password_file();
    let out = target.restorer(
        &src,
        &[
            "restore",
            "latest",
            "--replica-of",
            &format!("127.0.0.1:{src_port}"),
            "--replication-user",
            "repl",
            "--replication-password-file",
            pw.to_str().unwrap(),
        ],
    );
    assert_ok(&out, "restorer restore --replica-of");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains(REPL_SECRET),
        "the password leaked"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["backup_id"], id.as_str());
    let old = PathBuf::from(report["old_datadir"].as_str().unwrap());
    assert!(
        old.join("target").is_dir(),
        "the old data directory is kept"
    );
    assert!(!target.datadir.join("auto.cnf").exists());

    assert!(load.wait().unwrap().success(), "sysbench");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    counters.join().unwrap();
    // Once the load stops and the replica catches up, every table matches.
    let source_pos = src.db.sql("SELECT @@gtid_binlog_pos");
    let deadline = Instant::now() + Duration::from_secs(120);
    while target.db.sql("SELECT @@gtid_slave_pos") != source_pos {
        assert!(
            Instant::now() < deadline,
            "the replica did not catch up: {}",
            target.db.sql("SHOW SLAVE STATUS\\G")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (a, b) = (src.db.checksums("sbtest"), target.db.checksums("sbtest"));
    assert_eq!(a.len(), 4);
    assert_eq!(a, b);
    let counters = "SELECT CONCAT_WS(' ', m.v, a.v, i.v) FROM d.m, d.a, d.i";
    let n = src.db.sql(counters);
    assert_eq!(target.db.sql(counters), n);
    assert_ne!(n, "0 0 0");
    assert!(
        target.db.try_sql("SELECT 1 FROM target.marker").is_err(),
        "the restored server has the source's data"
    );
}

/// A backup taken on a MariaDB replica records where the replica was in its
/// source's history as a GTID position (`@@gtid_slave_pos`, which `SHOW SLAVE
/// STATUS` lacks), and `--replica-of-source` seeds a sibling replica from it
/// that catches up with the source.
#[test]
fn a_backup_of_a_replica_seeds_a_sibling_replica_of_its_source_by_gtid() {
    if !gate("a_backup_of_a_replica_seeds_a_sibling_replica_of_its_source_by_gtid") {
        return;
    }
    let (src, src_port) = replication_source(StoreKind::File);
    src.db.sql(
        "CREATE DATABASE d; CREATE TABLE d.t (id INT PRIMARY KEY) ENGINE=InnoDB; \
         INSERT INTO d.t VALUES (1), (2), (3)",
    );
    let replica = Rig::with(
        StoreKind::File,
        MariaOpts {
            server_id: 2,
            port: Some(free_port()),
            log_bin: true,
            extra: Vec::new(),
        },
    );
    replica.db.sql(&format!(
        "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={src_port}, MASTER_USER='repl', \
         MASTER_PASSWORD='{REPL_SECRET}', MASTER_USE_GTID=slave_pos; START SLAVE"
    ));
    let caught_up = |db: &MariaDb| {
        let want = src.db.sql("SELECT @@gtid_binlog_pos");
        let deadline = Instant::now() + Duration::from_secs(60);
        while db.sql("SELECT @@gtid_slave_pos") != want {
            assert!(
                Instant::now() < deadline,
                "no catching up with {want}: {}",
                db.sql("SHOW SLAVE STATUS\\G")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        want
    };
    let at_backup = caught_up(&replica.db);
    let id = replica.backup();
    let m = Manifest::parse(
        &String::from_utf8(replica.fetch(&format!("db1/{id}/manifest.toml"))).unwrap(),
        "store",
    )
    .unwrap();
    let source = m.source.expect("a backup of a replica records its source");
    assert_eq!(source.port, src_port);
    assert_eq!(
        source.gtid.as_ref().map(|g| g.to_string()),
        Some(at_backup),
        "the replica's GTID position in its source's history"
    );
    // Written after the backup: the sibling must fetch these from the source.
    src.db.sql("INSERT INTO d.t VALUES (4), (5)");

    let sibling = Target::replica(&replica, 3);
    let pw = sibling.replication_password_file();
    let out = sibling.restorer(
        &replica,
        &[
            "restore",
            &id,
            "--replica-of-source",
            "--replication-user",
            "repl",
            "--replication-password-file",
            pw.to_str().unwrap(),
        ],
    );
    assert_ok(&out, "restorer restore --replica-of-source");
    caught_up(&sibling.db);
    assert_eq!(
        sibling
            .db
            .sql("SELECT GROUP_CONCAT(id ORDER BY id) FROM d.t"),
        "1,2,3,4,5"
    );
}

/// A zstd tar with one crafted entry after a harmless directory; names are raw bytes.
fn crafted(name: &str, kind: tar::EntryType, link: &str) -> Vec<u8> {
    crafted_many(&[(name, kind, link)])
}

/// A zstd tar with crafted entries after a harmless directory.
fn crafted_many(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    b.append_data(&mut dir, "mysql", std::io::empty()).unwrap();
    for &(name, kind, link) in entries {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(0o644);
        let data: &[u8] = if kind == tar::EntryType::Regular {
            b"evil"
        } else {
            b""
        };
        h.set_size(data.len() as u64);
        if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    zstd::encode_all(&b.into_inner().unwrap()[..], 3).unwrap()
}

/// A source with table `d.t` holding `row`, backed up to a file store: the
/// rig, the backup id, the store's root and the stored manifest.
fn backed_up_source(row: u32) -> (Rig, String, PathBuf, Manifest) {
    backed_up_source_as(row, false)
}

/// [`backed_up_source`], its archive `indexed` (format 3) or one stream.
fn backed_up_source_as(row: u32, indexed: bool) -> (Rig, String, PathBuf, Manifest) {
    let src = Rig::new(StoreKind::File);
    src.write_config(|t| crate::backup::set(t, "archive", "indexed", indexed));
    src.db.sql(&format!(
        "CREATE DATABASE d; CREATE TABLE d.t (id INT PRIMARY KEY); INSERT INTO d.t VALUES ({row})"
    ));
    let id = src.backup();
    let store_root = src.tmp.path().join("store");
    let text = std::fs::read_to_string(store_root.join(format!("db1/{id}/manifest.toml"))).unwrap();
    let real = Manifest::parse(&text, "real").unwrap();
    (src, id, store_root, real)
}

#[test]
fn tampered_and_unsafe_archives_are_refused_with_exit_4_and_the_target_keeps_serving() {
    if !gate("tampered_and_unsafe_archives_are_refused_with_exit_4_and_the_target_keeps_serving") {
        return;
    }
    let (src, id, store_root, real) = backed_up_source(1);
    let archive = std::fs::read(store_root.join(format!("db1/{id}/data.tar.zst"))).unwrap();

    let mut flipped = archive.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("20261101T000001Z", flipped, "corrupt"),
        (
            "20261101T000002Z",
            archive[..archive.len() / 2].to_vec(),
            "truncated",
        ),
        (
            "20261101T000003Z",
            crafted("mysql/../../evil", tar::EntryType::Regular, ""),
            "'..'",
        ),
        (
            "20261101T000004Z",
            crafted("/tmp/mysnap-evil", tar::EntryType::Regular, ""),
            "absolute",
        ),
        (
            "20261101T000005Z",
            crafted("mysql/link", tar::EntryType::Symlink, "../../../../etc"),
            "leaves",
        ),
        (
            "20261101T000006Z",
            crafted("mysql/null", tar::EntryType::Char, ""),
            "device node",
        ),
        (
            // A chain of links, each harmless alone, climbing out together.
            "20261101T000007Z",
            crafted_many(&[
                ("mysql/a", tar::EntryType::Symlink, "."),
                ("mysql/b", tar::EntryType::Symlink, "a/../../../etc"),
                ("mysql/b/evil", tar::EntryType::Regular, ""),
            ]),
            "symbolic link",
        ),
    ];
    for (cid, bytes, _) in &cases {
        plant_archive(&store_root, &real, cid, bytes);
    }
    // The flipped byte: keep the real SHA-256, as if the object had rotted in the store.
    let rotten = store_root.join("db1/20261101T000001Z/manifest.toml");
    let text = std::fs::read_to_string(&rotten).unwrap();
    let mut m = Manifest::parse(&text, "x").unwrap();
    m.archive.as_mut().unwrap().sha256 = real.archive.as_ref().unwrap().sha256.clone();
    std::fs::write(&rotten, m.to_toml()).unwrap();
    // The truncated archive: its manifest still says the full size.
    let short = store_root.join("db1/20261101T000002Z/manifest.toml");
    let mut m = Manifest::parse(&std::fs::read_to_string(&short).unwrap(), "x").unwrap();
    m.archive.as_mut().unwrap().size = archive.len() as u64;
    std::fs::write(&short, m.to_toml()).unwrap();

    let target = Target::second(&src);
    for (cid, _, needle) in &cases {
        for cmd in ["verify", "restore"] {
            let out = target.restorer(&src, &[cmd, cid]);
            let line = error_line(&out, 4);
            assert!(line.contains(needle), "{cmd} {cid}: {line}");
            target.assert_untouched(&format!("{cmd} {cid}"));
        }
    }
    assert!(!Path::new("/tmp/mysnap-evil").exists());
    // The real backup still verifies.
    assert_ok(
        &target.restorer(&src, &["verify", &id]),
        "verify of the real backup",
    );
}

#[test]
fn a_flipped_byte_in_an_indexed_archive_names_its_file_and_a_format_1_backup_still_restores() {
    if !gate(
        "a_flipped_byte_in_an_indexed_archive_names_its_file_and_a_format_1_backup_still_restores",
    ) {
        return;
    }
    let (src, id, store_root, real) = backed_up_source_as(7, true);
    assert_eq!(
        real.format_version,
        common::manifest::INDEXED_FORMAT_VERSION
    );
    let info = real.archive.clone().unwrap();
    let archive = std::fs::read(store_root.join(format!("db1/{id}/data.tar.zst"))).unwrap();
    let index_bytes = std::fs::read(store_root.join(format!("db1/{id}/index.json.zst"))).unwrap();
    let index =
        common::archive::index::Index::parse(&index_bytes, "index", &info, &real.data.paths)
            .unwrap();
    // The frame holding the middle of the table's file, flipped there.
    let victim = index
        .entries
        .iter()
        .find(|e| e.path.ends_with("d/t.ibd"))
        .expect("d/t.ibd in the index");
    let frame = victim.chunks.last().unwrap().frame;
    let f = &index.frames[frame as usize];
    let in_frame: Vec<&str> = index
        .entries
        .iter()
        .filter(|e| e.chunks.iter().any(|c| c.frame == frame))
        .map(|e| e.path.as_str())
        .collect();
    let mut flipped = archive.clone();
    flipped[(f.stored_offset + f.stored_len / 2) as usize] ^= 0x40;
    let rotten = "20261101T000010Z";
    plant_indexed(&store_root, &real, &id, rotten, &flipped);
    // The same archive as a single-stream format 1 backup (`zstd -dc` reads
    // the frames as one stream): what an older mysnap stored.
    let old = "20261101T000011Z";
    plant_archive(&store_root, &real, old, &archive);
    let target = Target::second(&src);
    for cmd in ["verify", "restore"] {
        let out = target.restorer(&src, &[cmd, rotten]);
        let line = error_line(&out, 4);
        assert!(
            line.contains("corrupted") && in_frame.iter().any(|p| line.contains(p)),
            "{cmd}: {line} (frame {frame} holds {in_frame:?})"
        );
        target.assert_untouched(cmd);
    }
    let m = Manifest::parse(
        &std::fs::read_to_string(store_root.join(format!("db1/{old}/manifest.toml"))).unwrap(),
        "planted",
    )
    .unwrap();
    assert_eq!(m.format_version, common::manifest::FORMAT_VERSION);
    assert!(m.archive.unwrap().index.is_none());
    assert_ok(
        &target.restorer(&src, &["verify", old]),
        "verify of format 1",
    );
    assert_ok(
        &target.restorer(&src, &["restore", old]),
        "restore of format 1",
    );
    assert_eq!(target.db.sql("SELECT id FROM d.t"), "7");
}

/// The stop begins near the end of the unpack (`mysql.stop_ahead`): a
/// backup found bad only at its end has had the server stopped by then,
/// which is started again on the unchanged data directory; a good one is
/// swapped in with the stop overlapping the unpack.
#[test]
fn a_restore_that_fails_after_the_stop_began_starts_the_server_again() {
    if !gate("a_restore_that_fails_after_the_stop_began_starts_the_server_again") {
        return;
    }
    let (src, id, store_root, real) = backed_up_source_as(7, false);
    let archive = std::fs::read(store_root.join(format!("db1/{id}/data.tar.zst"))).unwrap();
    // One stream whose manifest names another SHA-256: checked once the
    // whole stream is unpacked.
    let wrong = "20261101T000012Z";
    plant_archive(&store_root, &real, wrong, &archive);
    let path = store_root.join(format!("db1/{wrong}/manifest.toml"));
    let mut m = Manifest::parse(&std::fs::read_to_string(&path).unwrap(), "planted").unwrap();
    m.archive.as_mut().unwrap().sha256 =
        common::manifest::Sha256Hex::parse(&"ab".repeat(32)).unwrap();
    std::fs::write(&path, m.to_toml()).unwrap();
    let target = Target::second(&src);
    // Every moment of the unpack is within an hour of its end: the stop
    // begins at its first bytes.
    edit_config(&target.config, |t| set(t, "mysql", "stop_ahead", "1h"));
    let out = target.restorer(&src, &["restore", wrong]);
    let line = error_line(&out, 4);
    assert!(
        line.contains("the unpack failed after the server began to stop")
            && line.contains("the server was started again"),
        "{line}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("left: stopping the server"), "{stderr}");
    target.assert_untouched("failed after the stop began");
    let out = target.restorer(&src, &["restore", &id]);
    assert_ok(&out, "restore with the stop ahead");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("left: stopping the server"), "{stderr}");
    assert_eq!(target.db.sql("SELECT id FROM d.t"), "7");
}

/// Killed (SIGKILL) once the stop ahead has stopped the server while the
/// unpack goes on: `restorer recover` starts the server again on the old
/// data; killed there again, the next restore finds the journal, undoes
/// it and restores.
#[test]
fn a_restore_killed_after_the_stop_ahead_is_undone_by_recover_or_the_next_restore() {
    if !gate("a_restore_killed_after_the_stop_ahead_is_undone_by_recover_or_the_next_restore") {
        return;
    }
    let (src, id, _, _) = backed_up_source(7);
    let target = Target::second(&src);
    edit_config(&target.config, |t| set(t, "mysql", "stop_ahead", "1h"));
    let args = ["restore", id.as_str()];
    let mut child = target.paused(&src, &args, "stopped-ahead");
    assert!(
        target.db.try_sql("SELECT 1").is_err(),
        "the server answers after the stop ahead"
    );
    send_signal(&child, nix::sys::signal::Signal::SIGKILL);
    child.wait().unwrap();
    let out = target.restorer(&src, &["recover"]);
    assert_ok(&out, "recover after the stop ahead");
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(line.contains("found the journal"), "{line}");
    assert!(target.serves_old_data(7, "recovered"), "{line}");
    target.assert_clean_and_drop_old("recovered");
    let mut child = target.paused(&src, &args, "stopped-ahead");
    send_signal(&child, nix::sys::signal::Signal::SIGKILL);
    child.wait().unwrap();
    let out = target.restorer(&src, &args);
    assert_ok(&out, "the next restore");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("found the journal"), "{log}");
    assert!(!target.serves_old_data(7, "restored"), "restored");
    target.assert_clean_and_drop_old("restored");
}

#[test]
fn a_target_without_room_is_refused_before_anything_changes_and_an_understated_size_stops_early() {
    if !gate("a_target_without_room_is_refused_before_anything_changes_and_an_understated_size_stops_early")
    {
        return;
    }
    let src = Rig::new(StoreKind::File);
    sysbench_prepare(&src.db.socket, 4, 80_000);
    let id = src.backup();
    let store_manifest = src.tmp.path().join(format!("store/db1/{id}/manifest.toml"));
    let unpacked = Manifest::parse(&std::fs::read_to_string(&store_manifest).unwrap(), "x")
        .unwrap()
        .archive
        .unwrap()
        .unpacked_size;
    // Room for a fresh server (about 100 MiB), btrfs' own overhead (which
    // varies from run to run by tens of MiB), half the backup, and the 64
    // MiB margin the room check adds, so that the understated manifest
    // below passes the check whatever btrfs took, and the real one never does.
    let target = Target::new(
        &src,
        MariaOpts {
            server_id: 2,
            ..MariaOpts::default()
        },
        Some(250 + 64 + (unpacked >> 21)),
    );

    let out = target.restorer(&src, &["restore", &id]);
    let line = error_line(&out, 1);
    assert!(line.contains("not enough room"), "{line}");
    target.assert_untouched("too small");

    // A manifest that understates the unpacked size (so the room check
    // passes): unpacking stops at the declared size, long before the disk
    // fills, and the backup is refused as larger than its manifest says.
    let path = src.tmp.path().join(format!("store/db1/{id}/manifest.toml"));
    let mut m = Manifest::parse(&std::fs::read_to_string(&path).unwrap(), "x").unwrap();
    m.archive.as_mut().unwrap().unpacked_size = 1 << 20;
    std::fs::write(&path, m.to_toml()).unwrap();
    let out = target.restorer(&src, &["restore", &id]);
    let line = error_line(&out, 4);
    assert!(line.contains("larger than its manifest says"), "{line}");
    target.assert_untouched("understated size");
}

#[test]
fn latest_is_the_newest_complete_backup() {
    if !gate("latest_is_the_newest_complete_backup") {
        return;
    }
    let src = Rig::new(StoreKind::S3);
    let first = src.backup();
    let second = src.backup();
    assert!(second > first);
    // A newer backup whose manifest never made it: not listed, not "latest".
    let s3 = src.s3.as_ref().unwrap();
    let orphan = s3.root.join("backups/fleet/db1/20991231T235959Z");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("data.tar.zst"), b"half an archive").unwrap();

    let out = src.run("restorer", &["list", "--json"]);
    assert_ok(&out, "list");
    let list: Vec<Manifest> = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = list.iter().map(|m| m.backup_id.as_str()).collect();
    assert_eq!(ids, [second.as_str(), first.as_str()]);
    let out = src.run("restorer", &["list"]);
    assert_ok(&out, "list");
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.lines().nth(1).unwrap().starts_with(&second),
        "{table}"
    );

    let out = src.run("restorer", &["verify", "latest"]);
    assert_ok(&out, "verify latest");
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), second);
}

#[test]
fn stop_first_puts_the_old_data_back_when_refused_and_a_server_that_is_down_is_not_stopped() {
    if !gate(
        "stop_first_puts_the_old_data_back_when_refused_and_a_server_that_is_down_is_not_stopped",
    ) {
        return;
    }
    let (src, id, store_root, real) = backed_up_source(7);
    // A byte flipped in the stored archive, its manifest keeping the real SHA-256.
    let mut rotten = std::fs::read(store_root.join(format!("db1/{id}/data.tar.zst"))).unwrap();
    let mid = rotten.len() / 2;
    rotten[mid] ^= 0x40;
    let bad = "20261101T000001Z";
    plant_archive(&store_root, &real, bad, &rotten);
    let path = store_root.join(format!("db1/{bad}/manifest.toml"));
    let mut m = Manifest::parse(&std::fs::read_to_string(&path).unwrap(), "x").unwrap();
    m.archive.as_mut().unwrap().sha256 = real.archive.as_ref().unwrap().sha256.clone();
    std::fs::write(&path, m.to_toml()).unwrap();

    let mut target = Target::second(&src);
    // The server is stopped and its data set aside before unpacking; the
    // refusal puts the data back and starts the server again.
    let out = target.restorer(&src, &["restore", "--stop-first", bad]);
    let line = error_line(&out, 4);
    assert!(line.contains("corrupt"), "{line}");
    // The start command returns before the server answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    while target.db.try_sql("SELECT 1").is_err() {
        assert!(
            Instant::now() < deadline,
            "the server was not started again"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    target.assert_untouched("--stop-first of a corrupt archive");

    let out = target.restorer(&src, &["restore", "--stop-first", &id]);
    assert_ok(&out, "restorer restore --stop-first");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let old = PathBuf::from(report["old_datadir"].as_str().unwrap());
    assert!(
        old.join("target").is_dir(),
        "the old data directory is kept"
    );
    assert_eq!(target.db.sql("SELECT id FROM d.t"), "7");

    // A server that is down already (crashed, or a new instance): restore
    // does not run mysql.stop_command (its `SHUTDOWN` would fail on
    // it), restores, and starts the server.
    target.db.sql("INSERT INTO d.t VALUES (8)");
    target.db.stop();
    assert!(target.db.try_sql("SELECT 1").is_err(), "the server is down");
    // The `.old-` names of this and the next seconds are taken (restores in
    // quick succession): the restore sets aside under a free one.
    let name = old.file_name().unwrap().to_str().unwrap();
    let prefix = &name[..name.find(".old-").unwrap() + 5];
    let now = time::OffsetDateTime::now_utc();
    let taken: Vec<PathBuf> = (0..8)
        .map(|s| {
            let t = common::manifest::backup_id(now + time::Duration::seconds(s));
            let dir = old.with_file_name(format!("{prefix}{t}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("earlier"), "kept").unwrap();
            dir
        })
        .collect();
    let out = target.restorer(&src, &["restore", &id]);
    assert_ok(&out, "restorer restore onto a server that is down");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let aside = PathBuf::from(report["old_datadir"].as_str().unwrap());
    assert!(!taken.contains(&aside), "{aside:?} was taken");
    for dir in &taken {
        assert_eq!(
            std::fs::read_to_string(dir.join("earlier")).unwrap(),
            "kept"
        );
    }
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("the server is not running"), "{log}");
    assert_eq!(target.db.sql("SELECT id FROM d.t"), "7");
}

/// Every pause point of a restore (`MYSNAP_TEST_PAUSE_AT`), in the order of
/// `--stop-first`'s run or the default one, and whether the restored data
/// stays when the restore is killed there (from the commit on).
fn pause_points(stop_first: bool) -> [(&'static str, bool); 6] {
    let (a, b) = if stop_first {
        ("stop", "stage")
    } else {
        ("stage", "stop")
    };
    [
        (a, false),
        (b, false),
        ("swap", false),
        ("swap-aside", false),
        ("commit", true),
        ("start", true),
    ]
}

impl Target {
    /// Starts `restorer ARGS` pausing at `point`; returns once it says so.
    pub(crate) fn paused(&self, src: &Rig, args: &[&str], point: &str) -> std::process::Child {
        self.paused_with(src, args, point, &[]).0
    }

    /// [`Target::paused`] with more environment; also returns the rest of stderr, by line.
    fn paused_with(
        &self,
        src: &Rig,
        args: &[&str],
        point: &str,
        env: &[(&str, &Path)],
    ) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
        let mut c = Command::new(mysnap_tests::bin("restorer"));
        c.env("MYSNAP_CONFIG", &self.config)
            .env("MYSNAP_TEST_PAUSE_AT", point)
            .envs(env.iter().copied())
            .args(args)
            .stdout(Stdio::null());
        if let Some(s3) = &src.s3 {
            c.envs(s3.env());
        }
        mysnap_tests::spawn_until_line(
            &mut c,
            &format!("paused at {point}"),
            Duration::from_secs(120),
        )
    }

    /// Whether the server serves the data it had before the restores (the
    /// marker) or the backup's (`d.t` = `row`); panics when it serves
    /// nothing or something else.
    fn serves_old_data(&self, row: u32, what: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.db.try_sql("SELECT 1").is_err() {
            assert!(
                Instant::now() < deadline,
                "{what}: the server does not answer"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        match self.db.try_sql("SELECT v FROM target.marker") {
            Ok(v) => {
                assert_eq!(v, "old data", "{what}");
                true
            }
            Err(_) => {
                assert_eq!(self.db.sql("SELECT id FROM d.t"), row.to_string(), "{what}");
                false
            }
        }
    }

    /// No staging directory and no journal are left; the set-aside data
    /// directories are removed (so the next round starts clean).
    fn assert_clean_and_drop_old(&self, what: &str) {
        let parent = self.datadir.parent().unwrap();
        for e in std::fs::read_dir(parent).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                !name.contains("mysnap-restore"),
                "{what}: staging left: {name}"
            );
            if name.starts_with("mysql.old-") {
                std::fs::remove_dir_all(e.path()).unwrap();
            }
        }
        assert!(!self.journal().exists(), "{what}: journal left");
    }
}

#[test]
fn a_restore_killed_at_any_phase_is_finished_or_undone_by_recover_or_the_next_restore() {
    if !gate("a_restore_killed_at_any_phase_is_finished_or_undone_by_recover_or_the_next_restore") {
        return;
    }
    let (src, id, _, _) = backed_up_source(7);
    let target = Target::second(&src);
    let out = target.restorer(&src, &["recover"]);
    assert_ok(&out, "recover without a journal");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "nothing to recover"
    );
    for stop_first in [false, true] {
        for (point, stays) in pause_points(stop_first) {
            let what = format!("killed at {point} (stop first: {stop_first})");
            // The server serves the marker: "old data".
            if target.db.try_sql("SELECT 1 FROM target.marker").is_err() {
                target.db.sql("CREATE DATABASE IF NOT EXISTS target; CREATE TABLE target.marker (v TEXT); INSERT INTO target.marker VALUES ('old data')");
            }
            let mut args = vec!["restore", id.as_str()];
            if stop_first {
                args.push("--stop-first");
            }
            let mut child = target.paused(&src, &args, point);
            send_signal(&child, nix::sys::signal::Signal::SIGKILL);
            child.wait().unwrap();
            // Some are recovered by the next restore, the others by `recover`.
            let rerun = matches!(
                (point, stop_first),
                ("swap-aside", false) | ("stop", true) | ("start", false)
            );
            if rerun {
                let out = target.restorer(&src, &["restore", &id]);
                assert_ok(&out, &what);
                let log = String::from_utf8_lossy(&out.stderr);
                assert!(log.contains("found the journal"), "{what}: {log}");
                assert!(!target.serves_old_data(7, &what), "{what}: restored");
            } else {
                let out = target.restorer(&src, &["recover"]);
                assert_ok(&out, &what);
                let line = String::from_utf8_lossy(&out.stdout);
                eprintln!("{what}: {}", line.trim());
                assert!(line.contains("found the journal"), "{what}: {line}");
                assert_eq!(target.serves_old_data(7, &what), !stays, "{what}: {line}");
            }
            target.assert_clean_and_drop_old(&what);
        }
    }
    // A journal naming another data directory (written with another
    // config) is refused with exit 2, and nothing is touched.
    let journal = target.journal();
    std::fs::write(
        &journal,
        format!(
            r#"{{"version": 1, "backup_id": "{id}", "datadir": "/elsewhere/mysql",
            "staging": "/elsewhere/.mysql.mysnap-restore-{id}", "stopped_server": true,
            "phase": "swap", "moves": []}}"#
        ),
    )
    .unwrap();
    for cmd in [vec!["recover"], vec!["restore", id.as_str()]] {
        let line = error_line(&target.restorer(&src, &cmd), 2);
        assert!(line.contains("does not fit this config"), "{cmd:?}: {line}");
        assert!(journal.exists());
    }
    std::fs::remove_file(&journal).unwrap();
    assert!(!target.serves_old_data(7, "after a refused journal"));
}

#[test]
fn sigterm_stops_a_restore_fast_a_swap_under_way_is_undone_first_and_a_committed_one_finishes() {
    if !gate("sigterm_stops_a_restore_fast_a_swap_under_way_is_undone_first_and_a_committed_one_finishes") {
        return;
    }
    let (src, id, _, _) = backed_up_source(7);
    let target = Target::second(&src);
    // During staging; and in the middle of the swap, the server stopped and
    // the data directory set aside: finished, then undone.
    for (point, args) in [
        ("stage", vec!["restore", id.as_str()]),
        ("swap-aside", vec!["restore", id.as_str()]),
        ("stage", vec!["restore", "--stop-first", id.as_str()]),
    ] {
        let what = format!("SIGTERM at {point} ({args:?})");
        let mut child = target.paused(&src, &args, point);
        let t = Instant::now();
        mysnap_tests::send_signal(&child, nix::sys::signal::Signal::SIGTERM);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{what}: still running"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(status.code(), Some(1), "{what}");
        if point == "stage" && args.len() == 2 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{what}: {:?}",
                t.elapsed()
            );
        }
        assert!(target.serves_old_data(7, &what), "{what}");
        target.assert_untouched(&what);
        assert!(!target.journal().exists(), "{what}: journal left");
    }
    // After the commit the restore finishes: the server is started, with
    // the restored data.
    let mut child = target.paused(&src, &["restore", &id], "commit");
    mysnap_tests::send_signal(&child, nix::sys::signal::Signal::SIGTERM);
    assert!(child.wait().unwrap().success(), "SIGTERM after the commit");
    assert!(!target.serves_old_data(7, "SIGTERM after the commit"));
    assert!(!target.journal().exists());
}

#[test]
fn a_filesystem_that_fills_up_while_unpacking_stops_the_restore_and_changes_nothing() {
    if !gate("a_filesystem_that_fills_up_while_unpacking_stops_the_restore_and_changes_nothing") {
        return;
    }
    // Tables of random strings: tens of MiB that neither compress nor stay sparse.
    let src = Rig::new(StoreKind::File);
    src.db.sql(
        "CREATE DATABASE d; CREATE TABLE d.t (id INT PRIMARY KEY); INSERT INTO d.t VALUES (7)",
    );
    sysbench_prepare(&src.db.socket, 2, 40_000);
    let id = src.backup();
    let target = Target::new(
        &src,
        MariaOpts {
            server_id: 2,
            ..MariaOpts::default()
        },
        Some(800),
    );
    let parent = target.datadir.parent().unwrap().to_path_buf();
    let resume = target._tmp.path().join("resume");
    // Room enough at the check; then, before unpacking, the disk fills up
    // (another writer) but for 1 MiB.
    let (mut child, stderr) = target.paused_with(
        &src,
        &["restore", &id],
        "stage",
        &[("MYSNAP_TEST_RESUME", &resume)],
    );
    let st = nix::sys::statvfs::statvfs(&parent).unwrap();
    let avail = st.blocks_available() as u64 * st.fragment_size() as u64;
    let filler = parent.join("filler");
    let ok = Command::new("fallocate")
        .args(["-l", &(avail - (1 << 20)).to_string()])
        .arg(&filler)
        .status()
        .unwrap();
    assert!(ok.success(), "fallocate");
    std::fs::write(&resume, b"").unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "still running");
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(200));
    let log: Vec<String> = stderr.try_iter().collect();
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(status.code(), Some(1), "{log:?}");
    let line = log.iter().find(|l| l.starts_with("error:")).unwrap();
    eprintln!("{line}");
    assert!(line.contains("No space left on device"), "{line}");
    assert!(target.serves_old_data(7, "disk full"));
    target.assert_untouched("disk full");
    assert!(!target.journal().exists());
}
