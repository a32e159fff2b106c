//! Restore drills end to end: the real restorer unpacks a real backup into
//! a scratch directory, starts a throwaway MariaDB on it, checks every
//! table, and records the result beside the manifest.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::drill::{DrillRecord, Outcome};
use common::manifest::{BackupName, Manifest};
use mysnap_tests::{gate, plant_archive, processes_in, send_signal, MariaDb, MariaOpts};

use crate::backup::{assert_ok, error_line, set, Rig, StoreKind};

/// A scratch directory the throwaway server (run as `mysql`, the default
/// `volume.owner`) can reach: the rig's temp dir is opened to others.
fn scratch(rig: &Rig) -> PathBuf {
    std::fs::set_permissions(rig.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = rig.tmp.path().join("scratch");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn drill(rig: &Rig, args: &[&str]) -> Output {
    let mut all = vec!["drill"];
    all.extend_from_slice(args);
    rig.run("restorer", &all)
}

/// The drill records in the store, parsed as status parses them.
fn records(rig: &Rig) -> Vec<DrillRecord> {
    let name = BackupName::parse("db1").unwrap();
    rig.store_keys()
        .iter()
        .filter(|k| common::keys::drill_of(&name, k).is_some())
        .map(|k| {
            let text = String::from_utf8(rig.fetch(k)).unwrap();
            DrillRecord::parse_stored(&text, k, k, &name).unwrap()
        })
        .collect()
}

/// Nothing left in the scratch directory, and no process working in it.
fn assert_clean(scratch: &Path, what: &str) {
    let left: Vec<_> = std::fs::read_dir(scratch)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{what}: left in the scratch: {left:?}");
    let working = processes_in(scratch);
    assert!(
        working.is_empty(),
        "{what}: processes {working:?} still work in {}",
        scratch.display()
    );
}

/// The live server's data directory entries (names), and its answer.
fn live(rig: &Rig) -> (Vec<String>, String) {
    let mut names: Vec<String> = walk(&rig.db.datadir);
    names.sort();
    (
        names,
        rig.db.sql("SELECT GROUP_CONCAT(v ORDER BY id) FROM d.i"),
    )
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        out.push(p.strip_prefix(dir).unwrap().display().to_string());
        if e.file_type().unwrap().is_dir() {
            out.extend(
                walk(&p)
                    .into_iter()
                    .map(|s| format!("{}/{s}", e.file_name().to_string_lossy())),
            );
        }
    }
    out
}

#[test]
fn a_drill_checks_every_table_of_a_real_backup_records_it_and_leaves_the_live_server_alone() {
    if !gate(
        "a_drill_checks_every_table_of_a_real_backup_records_it_and_leaves_the_live_server_alone",
    ) {
        return;
    }
    let rig = Rig::new(StoreKind::S3);
    rig.db.sql(
        "CREATE DATABASE d; CREATE TABLE d.i (id INT PRIMARY KEY, v TEXT) ENGINE=InnoDB; \
         CREATE TABLE d.m (id INT PRIMARY KEY) ENGINE=MyISAM; CREATE TABLE d.a (id INT PRIMARY KEY) ENGINE=Aria; \
         CREATE TABLE d.`we``ird; DROP TABLE d.i; --` (id INT) ENGINE=InnoDB; \
         INSERT INTO d.i VALUES (1, 'one'), (2, 'two'); INSERT INTO d.m VALUES (1); INSERT INTO d.a VALUES (1)",
    );
    let id = rig.backup();
    let scratch = scratch(&rig);
    let before = live(&rig);

    // A scratch inside the live data directory is refused before anything.
    let inside = rig.db.datadir.join("d");
    let line = error_line(&drill(&rig, &["--scratch", inside.to_str().unwrap()]), 2);
    assert!(line.contains("inside volume.datadir"), "{line}");

    let out = drill(&rig, &["latest", "--scratch", scratch.to_str().unwrap()]);
    assert_ok(&out, "restorer drill");
    let stdout = String::from_utf8(out.stdout).unwrap();
    eprintln!("{stdout}");
    assert!(
        stdout.starts_with(&format!("drill of db1 {id} ok: ")),
        "{stdout}"
    );
    assert_clean(&scratch, "after the drill");
    assert_eq!(
        live(&rig),
        before,
        "the live data directory or server changed"
    );

    let recs = records(&rig);
    assert_eq!(recs.len(), 1, "{recs:?}");
    let r = &recs[0];
    assert_eq!(r.result, Outcome::Ok, "{r:?}");
    assert_eq!(r.backup_id.as_str(), id);
    // d's four tables and the mysql schema's.
    assert!(r.tables_checked > 10, "{r:?}");
    assert_eq!(r.tables_with_errors, 0);
    assert!(r.server_version.as_ref().unwrap().contains("MariaDB"));
    assert!(stdout.contains(&format!("{} tables passed", r.tables_checked)));
    // The manifest was not rewritten.
    let m = Manifest::parse(
        &String::from_utf8(rig.fetch(&format!("db1/{id}/manifest.toml"))).unwrap(),
        "store",
    )
    .unwrap();
    assert_eq!(m.backup_id.as_str(), id);

    let out = rig.run("restorer", &["status"]);
    assert_ok(&out, "restorer status");
    let text = String::from_utf8(out.stdout).unwrap();
    eprintln!("{text}");
    assert!(text.contains(", last verified "), "{text}");
    assert!(text.contains(&format!("(drill ok of {id}, ")), "{text}");
    let out = rig.run("restorer", &["status", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = &doc["names"][0]["last_drill"];
    assert_eq!(d["ok"], true, "{doc}");
    assert_eq!(d["backup_id"], id.as_str());
    assert_eq!(d["tables_checked"], r.tables_checked);
}

/// Flips bytes inside the pages (from page 3 on: the index pages) of
/// `file` in a zstd tar, and returns the new archive.
fn corrupt_pages(archive: &[u8], file: &str) -> Vec<u8> {
    let mut tar = zstd::decode_all(archive).unwrap();
    let (pos, size) = {
        let mut a = tar::Archive::new(&tar[..]);
        let e = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.path().unwrap().to_string_lossy() == file)
            .unwrap_or_else(|| panic!("{file} is not in the archive"));
        (e.raw_file_position() as usize, e.size() as usize)
    };
    assert!(size >= 5 * 16384, "{file} is {size} bytes");
    let mut page = 3;
    while (page + 1) * 16384 <= size {
        for b in &mut tar[pos + page * 16384 + 200..pos + page * 16384 + 1200] {
            *b ^= 0x5a;
        }
        page += 1;
    }
    zstd::encode_all(&tar[..], 3).unwrap()
}

#[test]
fn a_drill_of_a_damaged_backup_exits_4_records_the_failure_and_leaves_nothing_behind() {
    if !gate("a_drill_of_a_damaged_backup_exits_4_records_the_failure_and_leaves_nothing_behind") {
        return;
    }
    let mut rig = Rig::new(StoreKind::File);
    rig.db.sql(
        "CREATE DATABASE d; CREATE TABLE d.i (id INT PRIMARY KEY, v TEXT) ENGINE=InnoDB; \
         INSERT INTO d.i VALUES (1, 'one'); \
         CREATE TABLE d.big (id INT PRIMARY KEY, v VARCHAR(500)) ENGINE=InnoDB; \
         INSERT INTO d.big SELECT seq, REPEAT('x', 400) FROM d.seq_1_to_2000",
    );
    // A clean shutdown, so crash recovery of the copy never reads d.big's pages.
    rig.db.stop();
    rig.db = MariaDb::start(&rig.vol.subvol.join("mysql"), MariaOpts::default());
    rig.write_config(|_| {});
    let id = rig.backup();
    let scratch = scratch(&rig);
    let before = live(&rig);
    let store_root = rig.tmp.path().join("store");
    let real = Manifest::parse(
        &std::fs::read_to_string(store_root.join(format!("db1/{id}/manifest.toml"))).unwrap(),
        "real",
    )
    .unwrap();
    let archive = std::fs::read(store_root.join(format!("db1/{id}/data.tar.zst"))).unwrap();

    // A backup whose archive is intact, but whose table d.big is damaged
    // inside it (a forged or rotten backup that passes every archive check).
    let damaged = "20261101T000001Z";
    plant_archive(
        &store_root,
        &real,
        damaged,
        &corrupt_pages(&archive, "mysql/d/big.ibd"),
    );
    let out = drill(&rig, &[damaged, "--scratch", scratch.to_str().unwrap()]);
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let line = error_line(&out, 4);
    assert!(line.contains("`d`.`big`"), "{line}");
    assert!(line.contains("recorded"), "{line}");
    assert_clean(&scratch, "after the drill of a damaged table");
    assert_eq!(
        live(&rig),
        before,
        "the live data directory or server changed"
    );

    // An archive that fails its checksum: refused while unpacking.
    let rotten = "20261101T000002Z";
    let mut flipped = archive.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    plant_archive(&store_root, &real, rotten, &flipped);
    let m = store_root.join(format!("db1/{rotten}/manifest.toml"));
    let mut forged = Manifest::parse(&std::fs::read_to_string(&m).unwrap(), "x").unwrap();
    forged.archive.as_mut().unwrap().sha256 = real.archive.as_ref().unwrap().sha256.clone();
    std::fs::write(&m, forged.to_toml()).unwrap();
    let out = drill(&rig, &[rotten, "--scratch", scratch.to_str().unwrap()]);
    let line = error_line(&out, 4);
    assert!(
        line.contains("corrupt") || line.contains("SHA-256"),
        "{line}"
    );
    assert_clean(&scratch, "after the drill of a corrupt archive");
    assert_eq!(
        live(&rig),
        before,
        "the live data directory or server changed"
    );

    let recs = records(&rig);
    assert_eq!(recs.len(), 2, "{recs:?}");
    for r in &recs {
        assert_eq!(r.result, Outcome::Failed, "{r:?}");
        assert!(r.problem.is_some(), "{r:?}");
    }
    let big = recs
        .iter()
        .find(|r| r.backup_id.as_str() == damaged)
        .unwrap();
    assert_eq!(big.tables_with_errors, 1, "{big:?}");
    assert!(big.errors[0].starts_with("`d`.`big`: "), "{big:?}");
    // The real backup is newest: its (absent) drill is not what status
    // shows; the newest drill of any backup is, and it failed.
    let out = rig.run("restorer", &["status"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(", last drill FAILED "), "{text}");

    // Prune removes drill records with their backup.
    rig.write_config(|t| set(t, "retention", "keep_last", 1));
    assert_ok(
        &rig.run("restorer", &["prune", "--apply"]),
        "restorer prune --apply",
    );
    assert!(records(&rig).is_empty(), "{:?}", rig.store_keys());
    assert!(
        rig.store_keys()
            .iter()
            .all(|k| k.starts_with(&format!("db1/{id}/"))),
        "{:?}",
        rig.store_keys()
    );
}

#[test]
fn a_drill_stopped_by_a_signal_or_kill_9_leaves_no_server_and_no_scratch_behind() {
    if !gate("a_drill_stopped_by_a_signal_or_kill_9_leaves_no_server_and_no_scratch_behind") {
        return;
    }
    use nix::sys::signal::Signal;
    let rig = Rig::new(StoreKind::File);
    let id = rig.backup();
    let scratch = scratch(&rig);
    // A server that listens elsewhere (a later --socket wins): the drill
    // waits for it, with the server running in the scratch, until stopped.
    let elsewhere = format!("/tmp/mysnap-drill-test-{}.sock", std::process::id());
    let wrapper = rig.tmp.path().join("slow-mariadbd");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec /usr/sbin/mariadbd \"$@\" --socket={elsewhere}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    rig.write_config(|t| set(t, "drill", "server_binary", wrapper.to_str().unwrap()));
    let all_records = || {
        rig.store_keys()
            .iter()
            .filter(|k| k.contains("/drill-"))
            .count()
    };

    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        let mut child = rig
            .cmd("restorer")
            .args(["drill", &id, "--scratch", scratch.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        // The throwaway server runs once a process works in the copy's data directory.
        let data = scratch.join("mysnap-drill-db1/data");
        while !data.exists() || processes_in(&data).is_empty() {
            assert!(std::time::Instant::now() < deadline, "no server started");
            assert!(child.try_wait().unwrap().is_none(), "the drill ended early");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        send_signal(&child, signal);
        let out = child.wait_with_output().unwrap();
        if signal == Signal::SIGTERM {
            let line = error_line(&out, 1);
            assert!(line.contains("interrupted"), "{line}");
            assert_clean(&scratch, "after SIGTERM");
        } else {
            // kill -9 leaves the server and the scratch to the next drill.
            assert!(
                !processes_in(&data).is_empty(),
                "the server went with the drill"
            );
        }
        assert_eq!(all_records(), 0, "an interrupted drill recorded something");
    }

    // The next drill (a real server) stops the leftover server, removes
    // the leftover scratch, and passes.
    rig.write_config(|_| {});
    let out = drill(&rig, &[&id, "--scratch", scratch.to_str().unwrap()]);
    assert_ok(&out, "the drill after a kill -9");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("left by a drill that did not finish"),
        "{stderr}"
    );
    assert_clean(&scratch, "after the drill after a kill -9");
    assert_eq!(all_records(), 1);
    let _ = std::fs::remove_file(&elsewhere);
    let _ = std::fs::remove_file(format!("{elsewhere}.lock"));
}
