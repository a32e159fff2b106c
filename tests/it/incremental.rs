//! Incremental backups end to end: a real server on real btrfs, backed up
//! full then incrementally (`backup.full_every`), restored onto a second
//! server from the frames of several archives.

use common::archive::index::Index;
use common::manifest::{Manifest, INCREMENTAL_FORMAT_VERSION, INDEXED_FORMAT_VERSION};
use mysnap_tests::gate;

use crate::backup::{assert_ok, error_line, set, Rig, StoreKind};
use crate::restore::Target;

const TABLES: u32 = 20;

fn manifest(src: &Rig, id: &str) -> Manifest {
    let text = String::from_utf8(src.fetch(&format!("db1/{id}/manifest.toml"))).unwrap();
    Manifest::parse(&text, id).unwrap()
}

fn index(src: &Rig, m: &Manifest) -> Index {
    let info = m.archive.as_ref().unwrap();
    let stored = src.fetch(&info.index.as_ref().unwrap().key);
    Index::parse(&stored, "index", info, &m.data.paths).unwrap()
}

/// Changes table `t`, writes its pages to its file (`FOR EXPORT` flushes
/// them; otherwise they may wait in the buffer pool, the change only in the
/// redo log) and waits until the file is older than the racy window of the
/// next snapshot.
fn change(src: &Rig, t: u32) {
    src.db.sql(&format!(
        "UPDATE d.t{t} SET v = REPEAT(MD5(RAND()), 32) WHERE id % 3 = 0; \
         FLUSH TABLES d.t{t} FOR EXPORT; UNLOCK TABLES"
    ));
    settle(src);
}

fn settle(src: &Rig) {
    // Every table's pages written out, so that none of its file changes
    // later behind the snapshot's back (background flushing would).
    let tables = src.db.sql(
        "SELECT GROUP_CONCAT(CONCAT('d.', table_name)) FROM information_schema.tables WHERE table_schema = 'd' AND table_name LIKE 't%'",
    );
    src.db.sql(&format!(
        "FLUSH TABLES {} FOR EXPORT; UNLOCK TABLES",
        tables.trim()
    ));
    std::thread::sleep(std::time::Duration::from_secs(4));
}

/// A rig with `archive.indexed` and `backup.full_every = full_every`, and
/// `tables` InnoDB tables `d.t0…` of `rows` rows each, their pages on disk.
fn indexed_rig(kind: StoreKind, full_every: u32, tables: u32, rows: u32) -> Rig {
    let src = Rig::new(kind);
    src.write_config(|t| {
        set(t, "archive", "indexed", true);
        set(t, "backup", "full_every", full_every);
    });
    src.db.sql("SET GLOBAL innodb_max_dirty_pages_pct = 0");
    src.db.sql("CREATE DATABASE d");
    for t in 0..tables {
        src.db.sql(&format!(
            "CREATE TABLE d.t{t} (id INT PRIMARY KEY, v TEXT) ENGINE=InnoDB; \
             INSERT INTO d.t{t} SELECT seq, REPEAT(MD5(RAND()), 32) FROM d.seq_1_to_{rows}"
        ));
    }
    settle(&src);
    src
}

/// The entry of table `t`'s file: whether it is a reference to a base.
fn referenced(ix: &Index, t: u32) -> bool {
    let e = ix
        .entries
        .iter()
        .find(|e| e.path.ends_with(&format!("/d/t{t}.ibd")))
        .unwrap_or_else(|| panic!("d/t{t}.ibd in the index"));
    e.source.is_some()
}

#[test]
fn incremental_backups_store_only_changed_tables_restore_whole_and_full_every_bounds_the_chain() {
    if !gate("incremental_backups_store_only_changed_tables_restore_whole_and_full_every_bounds_the_chain") {
        return;
    }
    let src = indexed_rig(StoreKind::S3, 3, TABLES, 1500);
    let full = src.backup();
    let m0 = manifest(&src, &full);
    assert_eq!(m0.format_version, INDEXED_FORMAT_VERSION);
    let full_size = m0.archive.as_ref().unwrap().size;

    // 1 table of 20 changed: only it (and the server's own logs) stored again.
    change(&src, 3);
    let incr1 = src.backup();
    let m1 = manifest(&src, &incr1);
    let a1 = m1.archive.clone().unwrap();
    assert_eq!(m1.format_version, INCREMENTAL_FORMAT_VERSION);
    assert_eq!(
        (a1.bases.clone(), a1.chain),
        (vec![m0.backup_id.clone()], 1)
    );
    let ix1 = index(&src, &m1);
    assert!(!referenced(&ix1, 3), "the changed table is stored again");
    for t in (0..TABLES).filter(|t| *t != 3) {
        assert!(referenced(&ix1, t), "d/t{t}.ibd unchanged, referenced");
    }
    // What changes anyway (redo and undo logs, ibdata1) is stored again:
    // the ratio depends on the data's size against theirs (see the bench).
    assert!(
        a1.size < full_size,
        "incremental {} bytes, full {full_size}",
        a1.size
    );
    let own: u64 = ix1
        .entries
        .iter()
        .filter(|e| e.source.is_none())
        .map(|e| e.size)
        .sum();
    assert!(
        own + 19 * 1_000_000 < a1.unpacked_size,
        "the 19 unchanged tables are not in the incremental's own archive ({own} of {} bytes)",
        a1.unpacked_size
    );
    // The whole tree's totals, not only what this archive holds.
    // (Each backup rotates the binary log: one file more than the full.)
    let whole = ix1
        .entries
        .iter()
        .filter(|e| e.kind == common::archive::index::EntryKind::File)
        .count() as u64;
    assert_eq!(a1.files, whole);
    assert!(a1.files >= m0.archive.as_ref().unwrap().files);

    // A second incremental: a chain of two, its bytes in up to three archives.
    change(&src, 5);
    let incr2 = src.backup();
    let m2 = manifest(&src, &incr2);
    let a2 = m2.archive.clone().unwrap();
    assert_eq!(a2.chain, 2);
    assert!(a2.bases.contains(&m0.backup_id), "{:?}", a2.bases);
    let ix2 = index(&src, &m2);
    assert!(!referenced(&ix2, 5) && referenced(&ix2, 0));
    let want = src.db.checksums("d");
    let out = src.run("restorer", &["status", "--json"]);
    assert_ok(&out, "status");
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let newest = &st["names"][0]["newest"];
    assert_eq!(newest["chain"], 2, "{st}");
    assert_eq!(newest["base"], a2.bases.last().unwrap().as_str(), "{st}");

    // full_every = 3: after two incrementals, a full one.
    let third = src.backup();
    let m3 = manifest(&src, &third);
    assert_eq!(m3.format_version, INDEXED_FORMAT_VERSION);
    assert!(m3.archive.as_ref().unwrap().bases.is_empty());
    // --full forces one whatever the chain.
    let snap = src.snapshot();
    let out = src.run(
        "archiver",
        &["--full", "--manifest", snap.to_str().unwrap()],
    );
    assert_ok(&out, "archiver --full");

    // The incremental of the incremental restores the whole server.
    let target = Target::second(&src);
    assert_ok(&target.restorer(&src, &["verify", &incr2]), "verify incr2");
    assert_ok(
        &target.restorer(&src, &["restore", &incr2]),
        "restore incr2",
    );
    assert_eq!(target.db.checksums("d"), want);
}

#[test]
fn a_forged_incremental_index_or_a_missing_base_is_refused_before_anything_changes() {
    if !gate("a_forged_incremental_index_or_a_missing_base_is_refused_before_anything_changes") {
        return;
    }
    let src = indexed_rig(StoreKind::File, 2, 4, 300);
    let full = src.backup();
    change(&src, 1);
    let incr = src.backup();
    let m = manifest(&src, &incr);
    assert_eq!(m.format_version, INCREMENTAL_FORMAT_VERSION);
    let good = index(&src, &m);
    let store_root = src.tmp.path().join("store");
    let target = Target::second(&src);

    // Each forgery planted as a backup of its own (index bound by its manifest).
    // A frame's own digest is checked by verify; a restore checks each
    // piece it writes (every byte it writes is in one).
    type Forge = fn(&mut Index);
    let forgeries: &[(&str, Forge, &str)] = &[
        (
            "referenced frame's digest",
            |i| {
                let f = i.frames.iter_mut().find(|f| f.source.is_some()).unwrap();
                f.digest = common::manifest::Sha256Hex::parse(&"ab".repeat(32)).unwrap();
            },
            "corrupted",
        ),
        (
            "digest of a piece in a referenced frame",
            |i| {
                let own = i.own_frames() as u32;
                let c = i
                    .entries
                    .iter_mut()
                    .flat_map(|e| e.chunks.iter_mut())
                    .find(|c| c.frame >= own)
                    .unwrap();
                c.digest = common::manifest::Sha256Hex::parse(&"ab".repeat(32)).unwrap();
            },
            "corrupted",
        ),
        (
            "referenced frame past the base's end",
            |i| {
                let f = i
                    .frames
                    .iter_mut()
                    .rev()
                    .find(|f| f.source.is_some())
                    .unwrap();
                f.stored_offset += 1 << 30;
            },
            "past the end",
        ),
    ];
    for (n, (what, forge, says)) in forgeries.iter().enumerate() {
        let id = soon(n as i64);
        let mut ix = good.clone();
        forge(&mut ix);
        plant_incremental(&store_root, &m, &incr, &id, &ix, None);
        let cmds: &[&str] = match n {
            0 => &["verify"],
            _ => &["verify", "restore"],
        };
        for &cmd in cmds {
            let line = error_line(&target.restorer(&src, &[cmd, &id]), 4);
            assert!(line.contains(says), "{what}: {cmd}: {line}");
            target.assert_untouched(what);
        }
    }
    // A source id changed in the index and the manifest alike: a backup
    // that is not there is refused too.
    let id = soon(10);
    let mut ix = good.clone();
    let other = common::manifest::BackupId::parse("20260101T000000Z").unwrap();
    ix.sources = vec![other.clone()];
    plant_incremental(&store_root, &m, &incr, &id, &ix, Some(vec![other]));
    for cmd in ["verify", "restore"] {
        let out = target.restorer(&src, &[cmd, &id]);
        assert!(!out.status.success(), "{cmd} of a backup on a missing base");
        target.assert_untouched("missing base");
    }
    assert!(full < incr);
    assert_ok(
        &target.restorer(&src, &["restore", &incr]),
        "the real one restores",
    );
}

/// Backup `id`: the archive of `real_id` with `index` and a manifest bound to it.
fn plant_incremental(
    store_root: &std::path::Path,
    real: &Manifest,
    real_id: &str,
    id: &str,
    index: &Index,
    bases: Option<Vec<common::manifest::BackupId>>,
) {
    let dir = store_root.join(format!("db1/{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        store_root.join(format!("db1/{real_id}/data.tar.zst")),
        dir.join("data.tar.zst"),
    )
    .unwrap();
    let stored = index.to_stored().unwrap();
    std::fs::write(dir.join("index.json.zst"), &stored).unwrap();
    let mut m = real.clone();
    m.backup_id = common::manifest::BackupId::parse(id).unwrap();
    let a = m.archive.as_mut().unwrap();
    a.key = format!("db1/{id}/data.tar.zst");
    if let Some(b) = bases {
        a.bases = b;
    }
    let ix = a.index.as_mut().unwrap();
    ix.key = format!("db1/{id}/index.json.zst");
    ix.size = stored.len() as u64;
    ix.sha256 = common::manifest::Sha256Hex::parse(&common::codec::sha256_hex(&stored)).unwrap();
    std::fs::write(dir.join("manifest.toml"), m.to_toml()).unwrap();
}

/// A backup id `n` seconds after an hour from now: newer than any backup
/// of the test, not from the future by a day.
fn soon(n: i64) -> String {
    let t = time::OffsetDateTime::now_utc() + time::Duration::seconds(3600 + n);
    common::manifest::BackupId::from_time(t).to_string()
}

/// `kill -9` of the archiver of an incremental backup at several moments
/// (reading the base, compressing, uploading): nothing is ever listed that
/// is not whole, the next run takes an incremental backup on the same base,
/// and it restores the server.
#[test]
fn an_incremental_backup_killed_at_any_moment_is_never_listed_and_the_next_one_restores() {
    if !gate("an_incremental_backup_killed_at_any_moment_is_never_listed_and_the_next_one_restores")
    {
        return;
    }
    let src = indexed_rig(StoreKind::S3, 10, TABLES, 1500);
    let full = src.backup();
    let listed = |src: &Rig| -> Vec<String> {
        src.store_keys()
            .into_iter()
            .filter(|k| k.ends_with("/manifest.toml"))
            .collect()
    };
    let mut killed = 0;
    for (n, delay_ms) in [150u64, 500, 1200, 2500].into_iter().enumerate() {
        change(&src, n as u32);
        // Slow compression keeps the archiver busy long enough (each
        // write_config starts from the rig's defaults).
        src.write_config(|t| {
            set(t, "archive", "indexed", true);
            set(t, "backup", "full_every", 10);
            set(t, "archive", "level", 19);
            set(t, "archive", "threads", 1);
            set(t, "store", "concurrency", 1);
        });
        let snap = src.snapshot();
        let id = Manifest::load(&snap).unwrap().backup_id.to_string();
        let mut archiver = src
            .cmd("archiver")
            .args(["--manifest", snap.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let finished = archiver.try_wait().unwrap().is_some();
        let _ = archiver.kill();
        let _ = archiver.wait();
        let key = format!("db1/{id}/manifest.toml");
        if finished || listed(&src).contains(&key) {
            // Done before the kill: then it is whole.
            assert_ok(&src.run("restorer", &["verify", &id]), "verify");
        } else {
            killed += 1;
            assert!(
                !listed(&src).contains(&key),
                "killed after {delay_ms} ms: {:?}",
                src.store_keys()
            );
        }
    }
    assert!(
        killed >= 2,
        "only {killed} archivers were killed before they finished"
    );
    src.write_config(|t| {
        set(t, "archive", "indexed", true);
        set(t, "backup", "full_every", 10);
    });
    change(&src, 7);
    let last = src.backup();
    let m = manifest(&src, &last);
    let a = m.archive.clone().unwrap();
    assert!(
        a.chain >= 1 && a.bases.iter().any(|b| b.as_str() == full),
        "{a:?}"
    );
    assert!(src.snapshots().is_empty(), "{:?}", src.snapshots());
    assert!(src.pending().is_empty(), "{:?}", src.pending());
    let want = src.db.checksums("d");
    let target = Target::second(&src);
    assert_ok(
        &target.restorer(&src, &["restore", &last]),
        "restore of the last incremental",
    );
    assert_eq!(target.db.checksums("d"), want);
}

/// Encrypted incremental backups (format 5 with bases): the backup host
/// keeps the index of its last backup (it holds no identity to read the
/// stored one), the incremental stores only what changed and restores
/// whole from both encrypted archives; without that kept index (another
/// host, lost state) the next backup is a full one, never a failed one.
#[test]
fn encrypted_incremental_backups_restore_whole_and_a_lost_kept_index_means_a_full_one() {
    if !gate("encrypted_incremental_backups_restore_whole_and_a_lost_kept_index_means_a_full_one") {
        return;
    }
    let src = indexed_rig(StoreKind::File, 3, 4, 1500);
    let keys = src.tmp.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let (identity, public) = crate::crypt::identity(&keys, "identity");
    let recipients = keys.join("recipients");
    crate::crypt::write_recipients(&recipients, &[&public]);
    src.write_config(|t| {
        set(t, "archive", "indexed", true);
        set(t, "backup", "full_every", 3);
        set(
            t,
            "encryption",
            "recipients_file",
            recipients.to_str().unwrap(),
        );
    });
    let full = src.backup();
    let m0 = manifest(&src, &full);
    assert_eq!(
        m0.format_version,
        common::manifest::ENCRYPTED_INDEXED_FORMAT_VERSION
    );
    change(&src, 2);
    let incr = src.backup();
    let m1 = manifest(&src, &incr);
    let a1 = m1.archive.clone().unwrap();
    assert_eq!(
        m1.format_version,
        common::manifest::ENCRYPTED_INDEXED_FORMAT_VERSION
    );
    assert_eq!(
        (a1.bases.clone(), a1.chain),
        (vec![m0.backup_id.clone()], 1)
    );
    assert!(a1.key.ends_with("data.tar.zst.age"), "{}", a1.key);
    assert!(
        a1.size < m0.archive.as_ref().unwrap().size,
        "the incremental stores less than the full one"
    );
    let want = src.db.checksums("d");

    let target = Target::second(&src);
    let line = error_line(
        &crate::crypt::restorer(&src, &target, None, &["restore", &incr]),
        4,
    );
    assert!(line.contains("no identity is configured"), "{line}");
    target.assert_untouched("restore without an identity");
    for cmd in ["verify", "restore"] {
        assert_ok(
            &crate::crypt::restorer(&src, &target, Some(&identity), &[cmd, &incr]),
            cmd,
        );
    }
    assert_eq!(target.db.checksums("d"), want);

    // A kept index whose binding names another backup (another host's, or
    // one a kill -9 left between the two files): not used, a full backup.
    let binding = src.state.join("index-db1.toml");
    let text = std::fs::read_to_string(&binding).unwrap();
    assert!(text.contains(&incr), "{text}");
    std::fs::write(&binding, text.replace(&incr, &full)).unwrap();
    change(&src, 0);
    let after_stale = src.backup();
    let a = manifest(&src, &after_stale).archive.unwrap();
    assert!(a.bases.is_empty() && a.chain == 0, "{:?}", a.bases);

    // The kept index gone: the next backup is full too.
    let kept: Vec<_> = std::fs::read_dir(&src.state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("index-")
        })
        .collect();
    assert_eq!(kept.len(), 2, "the kept index and its binding: {kept:?}");
    for p in kept {
        std::fs::remove_file(p).unwrap();
    }
    change(&src, 1);
    let next = src.backup();
    let a2 = manifest(&src, &next).archive.unwrap();
    assert!(a2.bases.is_empty() && a2.chain == 0, "{:?}", a2.bases);
}

/// A full backup whose index an older mysnap wrote (version 1: SHA-256
/// digests, under the key `sha256`) still verifies and restores; it is no
/// base for an incremental backup (its digests are of another hash): the
/// next backup is a full one and says why, and the one after it is
/// incremental again.
#[test]
fn an_index_of_an_older_mysnap_restores_and_the_next_backup_is_full() {
    if !gate("an_index_of_an_older_mysnap_restores_and_the_next_backup_is_full") {
        return;
    }
    let src = indexed_rig(StoreKind::File, 3, 4, 300);
    let full = src.backup();
    let m = manifest(&src, &full);
    let mut ix = index(&src, &m);
    assert_eq!(ix.version, 2);
    // Rewritten as version 1, every digest a SHA-256 of the same bytes.
    let store_root = src.tmp.path().join("store");
    let stored = std::fs::read(store_root.join(format!("db1/{full}/data.tar.zst"))).unwrap();
    let tar = zstd::stream::decode_all(&stored[..]).unwrap();
    let sha = |b: &[u8]| common::manifest::Sha256Hex::parse(&common::codec::sha256_hex(b)).unwrap();
    ix.version = 1;
    for f in &mut ix.frames {
        f.digest =
            sha(&stored[f.stored_offset as usize..(f.stored_offset + f.stored_len) as usize]);
    }
    for e in &mut ix.entries {
        let data = e.data;
        for c in &mut e.chunks {
            let at = c.at.unwrap_or(data + c.offset) as usize;
            c.digest = sha(&tar[at..at + c.len as usize]);
        }
    }
    let json = serde_json::to_string(&ix)
        .unwrap()
        .replace("\"digest\":", "\"sha256\":");
    let old = zstd::bulk::compress(json.as_bytes(), 9).unwrap();
    std::fs::write(store_root.join(format!("db1/{full}/index.json.zst")), &old).unwrap();
    let mut m1 = m.clone();
    let info = m1.archive.as_mut().unwrap().index.as_mut().unwrap();
    info.size = old.len() as u64;
    info.sha256 = sha(&old);
    std::fs::write(
        store_root.join(format!("db1/{full}/manifest.toml")),
        m1.to_toml(),
    )
    .unwrap();

    let want = src.db.checksums("d");
    let target = Target::second(&src);
    assert_ok(
        &target.restorer(&src, &["verify", &full]),
        "verify of a version 1 index",
    );
    assert_ok(
        &target.restorer(&src, &["restore", &full]),
        "restore of a version 1 index",
    );
    assert_eq!(target.db.checksums("d"), want);

    change(&src, 1);
    let snap = src.snapshot();
    let out = src.run("archiver", &["--manifest", snap.to_str().unwrap()]);
    assert_ok(&out, "archiver on a version 1 base");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("taking a full backup") && said.contains("version 1 (SHA-256 digests)"),
        "{said}"
    );
    let ids: Vec<String> = src
        .store_keys()
        .into_iter()
        .filter_map(|k| {
            k.strip_suffix("/manifest.toml")
                .map(|k| k.trim_start_matches("db1/").to_string())
        })
        .collect();
    let second = ids.iter().max().unwrap().clone();
    assert_ne!(second, full);
    let m2 = manifest(&src, &second);
    assert_eq!(m2.format_version, INDEXED_FORMAT_VERSION, "a full backup");
    change(&src, 2);
    let third = src.backup();
    let a3 = manifest(&src, &third).archive.unwrap();
    assert_eq!((a3.bases, a3.chain), (vec![m2.backup_id.clone()], 1));
}
