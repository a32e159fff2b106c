//! `restorer prune` on a directory store with planted backups (no MariaDB):
//! a dry run changes nothing, `--apply` removes exactly the listed backups
//! and nothing else, `restorer list` then shows the kept ones.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mysnap_tests::bin;

struct Rig {
    _tmp: tempfile::TempDir,
    store: PathBuf,
    config: PathBuf,
}

impl Rig {
    fn new(retention: &str) -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        std::fs::create_dir_all(&store).unwrap();
        let config = tmp.path().join("mysnap.toml");
        std::fs::write(
            &config,
            format!(
                "[volume]\nbackend = \"btrfs\"\nmountpoint = \"/mnt\"\ndatadir = \"/mnt/mysql\"\n\
                 [store]\nurl = \"file://{}\"\n[backup]\nname = \"db1\"\nstate_dir = \"{}\"\n{retention}",
                store.display(),
                tmp.path().join("state").display()
            ),
        )
        .unwrap();
        Rig {
            _tmp: tmp,
            store,
            config,
        }
    }

    /// Plants backup `id` of db1: its archive, and `manifest` when given.
    fn plant(&self, id: &str, manifest: Option<&str>) {
        mysnap_tests::plant(&self.store, "db1", id, manifest);
    }

    /// Plants a complete backup of db1.
    fn plant_backup(&self, id: &str) {
        mysnap_tests::plant_backup(&self.store, "db1", id);
    }

    fn restorer(&self, args: &[&str]) -> Output {
        Command::new(bin("restorer"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.restorer(args);
        assert!(
            out.status.success(),
            "restorer {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Every file in the store, relative to it.
    fn files(&self) -> BTreeSet<String> {
        mysnap_tests::files_below(&self.store)
    }
}

#[test]
fn prune_dry_run_changes_nothing_and_apply_removes_exactly_the_listed_backups() {
    // Fri 2020-01-10 is in ISO week 2020-W02; 2020-W01 ends Sun 2020-01-05.
    let rig =
        Rig::new("[retention]\nkeep_last = 3\nkeep_weekly = 2\npin = [\"20200102T030000Z\"]\n");
    for day in 1..=10 {
        let id = format!("202001{day:02}T030000Z");
        rig.plant_backup(&id);
    }
    // An archive without a manifest, years old (a killed run's): garbage,
    // removed; one younger than a day (an upload under way) and a manifest that does not
    // parse: never deleted.
    rig.plant("20200105T120000Z", None);
    rig.plant("20991231T000000Z", None);
    rig.plant("20191231T030000Z", Some("not a manifest"));
    let before = rig.files();

    let dry = rig.ok(&["prune"]);
    let expected = "\
keep 20200110T030000Z  newest, last 1, weekly 2020-W02
keep 20200109T030000Z  last 2
keep 20200108T030000Z  last 3
remove 20200107T030000Z
remove 20200106T030000Z
keep 20200105T030000Z  weekly 2020-W01
remove 20200104T030000Z
remove 20200103T030000Z
keep 20200102T030000Z  pinned
remove 20200101T030000Z
";
    let (lines, skipped) = dry.split_at(expected.len());
    assert_eq!(lines, expected);
    let skipped: Vec<&str> = skipped.lines().collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(
        skipped[0].starts_with("skip 20191231T030000Z  "),
        "{skipped:?}"
    );
    assert_eq!(
        skipped[1],
        "remove db1/20200105T120000Z/data.tar.zst  an archive without a manifest"
    );
    assert_eq!(rig.files(), before, "a dry run changes nothing");
    let json: serde_json::Value = serde_json::from_str(&rig.ok(&["prune", "--json"])).unwrap();
    assert_eq!(json["applied"], false);
    assert_eq!(json["decisions"].as_array().unwrap().len(), 10);
    assert_eq!(rig.files(), before, "a dry run changes nothing");

    let applied = rig.ok(&["prune", "--apply"]);
    let expected_applied = expected.replace("remove ", "removed ");
    assert!(applied.starts_with(&expected_applied), "{applied}");
    assert!(applied
        .ends_with("removed db1/20200105T120000Z/data.tar.zst  an archive without a manifest\n"));
    let removed = ["07", "06", "04", "03", "01"];
    let mut after = before.clone();
    assert!(after.remove("db1/20200105T120000Z/data.tar.zst"));
    for d in removed {
        for f in ["manifest.toml", "data.tar.zst"] {
            assert!(after.remove(&format!("db1/202001{d}T030000Z/{f}")));
        }
    }
    assert_eq!(rig.files(), after, "exactly the listed backups are removed");

    let list: serde_json::Value = serde_json::from_str(&rig.ok(&["list", "--json"])).unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["backup_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "20200110T030000Z",
            "20200109T030000Z",
            "20200108T030000Z",
            "20200105T030000Z",
            "20200102T030000Z"
        ]
    );
    // Applying again removes nothing more.
    assert!(!rig.ok(&["prune", "--apply"]).contains("removed"));
    assert_eq!(rig.files(), after);
}

/// The directory store's incomplete uploads are its writes' temporary
/// files (`.<name>.partial-<pid>`): those of an archive, more than a day
/// old (by id and by mtime), are aborted (removed) with `--apply`.
#[test]
fn prune_removes_old_temporary_files_of_archives_in_a_directory_store() {
    let rig = Rig::new("[retention]\nkeep_last = 1\n");
    rig.plant_backup("20200110T030000Z");
    let partial = |id: &str, name: &str, old: bool| {
        let dir = rig.store.join("db1").join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, b"part").unwrap();
        if old {
            let ok = Command::new("touch")
                .args(["-d", "2020-01-02 00:00:00 UTC"])
                .arg(&p)
                .status()
                .unwrap()
                .success();
            assert!(ok, "touch -d");
        }
    };
    partial("20200101T030000Z", ".data.tar.zst.partial-4242", true); // aborted
    partial("20200102T030000Z", ".data.tar.zst.partial-4243", false); // written just now
    partial("20200103T030000Z", ".manifest.toml.partial-4244", true); // not an archive
    partial("20200104T030000Z", ".data.tar.zst.partial-x", true); // not a pid
    let before = rig.files();
    assert_eq!(
        rig.ok(&["prune"]),
        "keep 20200110T030000Z  newest, last 1\n\
         abort db1/20200101T030000Z/data.tar.zst  an incomplete upload started 2020-01-02T00:00:00Z\n"
    );
    assert_eq!(rig.files(), before, "a dry run changes nothing");
    let applied = rig.ok(&["prune", "--apply"]);
    assert!(
        applied.ends_with("aborted db1/20200101T030000Z/data.tar.zst  an incomplete upload started 2020-01-02T00:00:00Z\n"),
        "{applied}"
    );
    let mut after = before;
    assert!(after.remove("db1/20200101T030000Z/.data.tar.zst.partial-4242"));
    assert_eq!(rig.files(), after);
}

#[test]
fn prune_without_a_policy_does_nothing_and_a_policy_of_zeros_is_refused() {
    let rig = Rig::new("");
    rig.plant_backup("20200101T030000Z");
    rig.plant_backup("20200102T030000Z");
    let before = rig.files();
    assert_eq!(
        rig.ok(&["prune", "--apply"]),
        "no [retention] policy: nothing to do\n"
    );
    assert_eq!(rig.files(), before);

    let zeros = Rig::new("[retention]\nkeep_daily = 0\n");
    zeros.plant_backup("20200101T030000Z");
    let out = zeros.restorer(&["prune", "--apply"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keeps no backup but the newest"), "{err}");
    assert_eq!(zeros.files().len(), 2);
}

/// `deploy/mysnap-backup` with stand-ins for snapshotter and archiver (no
/// MariaDB): after the backup it prunes with the real restorer; a failing
/// prune still prints the backup id and exits 6.
#[test]
fn the_deploy_wrapper_prunes_after_a_backup_and_a_failed_prune_exits_6() {
    use std::os::unix::fs::PermissionsExt;
    let rig = Rig::new("[retention]\nkeep_last = 1\n");
    for id in ["20200101T030000Z", "20200102T030000Z"] {
        rig.plant_backup(id);
    }
    let bin_dir = rig.store.parent().unwrap().join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let script = |name: &str, body: &str| {
        let p = bin_dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    script("snapshotter", "echo /tmp/pending.toml");
    script("archiver", "echo 20200102T030000Z");
    script(
        "restorer",
        &format!("exec {} \"$@\"", bin("restorer").display()),
    );
    let wrapper = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mysnap-backup");
    let run = || {
        Command::new("sh")
            .arg(&wrapper)
            .arg("--config")
            .arg(&rig.config)
            .env("MYSNAP_BIN_DIR", &bin_dir)
            .output()
            .unwrap()
    };
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"20200102T030000Z\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("removed 20200101T030000Z"));
    assert!(!rig
        .store
        .join("db1/20200101T030000Z/manifest.toml")
        .exists());
    assert!(rig
        .store
        .join("db1/20200102T030000Z/manifest.toml")
        .exists());

    script("restorer", "exit 1");
    let out = run();
    assert_eq!(out.status.code(), Some(6));
    assert_eq!(out.stdout, b"20200102T030000Z\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("prune --apply failed (exit 1)"));
}

/// The backup ids `restorer list --json` shows, newest first.
fn listed(rig: &Rig) -> Vec<String> {
    let list: serde_json::Value = serde_json::from_str(&rig.ok(&["list", "--json"])).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|m| m["backup_id"].as_str().unwrap().to_string())
        .collect()
}

/// Keys no archiver writes, in the store and beside it: prune (a dry run
/// and `--apply`) removes what its policy removes and the one old archive
/// without a manifest, and leaves every forged key, and everything outside
/// the store, as it was; an archive with a far-future id is neither garbage
/// nor the newest backup.
#[test]
fn prune_leaves_forged_keys_and_everything_outside_the_store_alone() {
    use std::os::unix::fs::symlink;
    let rig = Rig::new("[retention]\nkeep_last = 1\n");
    for id in ["20200101T030000Z", "20200102T030000Z", "20200103T030000Z"] {
        rig.plant_backup(id);
    }
    // The one real piece of garbage: an old archive without a manifest.
    rig.plant("20200104T030000Z", None);

    let outside = rig.store.parent().unwrap().join("outside");
    std::fs::create_dir_all(outside.join("20200105T030000Z")).unwrap();
    std::fs::write(outside.join("victim"), "not the store's").unwrap();
    std::fs::write(
        outside.join("20200105T030000Z/data.tar.zst"),
        "not the store's",
    )
    .unwrap();
    let forge = |key: &str| {
        let path = rig.store.join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "forged").unwrap();
    };
    // What `db1/../x/data.tar.zst` would name (the file store holds no `..`
    // key), other names, ids that are not times, archives one level down,
    // and names no codec has.
    for key in [
        "x/data.tar.zst",
        "db2/20200101T030000Z/data.tar.zst",
        "db1x/20200101T030000Z/data.tar.zst",
        "db1/29991231T000000Z/data.tar.zst",
        "db1/nonsense/data.tar.zst",
        "db1/20201301T000000Z/data.tar.zst",
        "db1/.../data.tar.zst",
        "db1/20200101T040000Z/sub/data.tar.zst",
        "db1/20200101T050000Z/data.tar.gz",
        "db1/20200101T050000Z/data.tar.zst.bak",
    ] {
        forge(key);
    }
    // Links out of the store, as an archive and as a backup's directory.
    std::fs::create_dir_all(rig.store.join("db1/20200101T060000Z")).unwrap();
    symlink(
        outside.join("victim"),
        rig.store.join("db1/20200101T060000Z/data.tar.zst"),
    )
    .unwrap();
    symlink(
        outside.join("20200105T030000Z"),
        rig.store.join("db1/20200101T070000Z"),
    )
    .unwrap();
    // A manifest under another backup's key, and one whose archive key
    // leaves its backup: both refused, neither deleted.
    let newest = mysnap_tests::synthetic_manifest("db1", "20200103T030000Z");
    rig.plant("20200106T030000Z", Some(&newest));
    let leaving = mysnap_tests::synthetic_manifest("db1", "20200107T030000Z").replace(
        "key = \"db1/20200107T030000Z/data.tar.zst\"",
        "key = \"db1/../outside/victim\"",
    );
    rig.plant("20200107T030000Z", Some(&leaving));

    let before = rig.files();
    let outside_before = mysnap_tests::files_below(&outside);
    let expected = |verb: &str| {
        format!(
            "keep 20200103T030000Z  newest, last 1\n\
             {verb} 20200102T030000Z\n\
             {verb} 20200101T030000Z\n"
        )
    };
    let garbage = "db1/20200104T030000Z/data.tar.zst  an archive without a manifest\n";
    let check = |out: &str, verb: &str| {
        let (decided, rest) = out.split_at(expected(verb).len().min(out.len()));
        assert_eq!(decided, expected(verb), "{out}");
        let rest: Vec<&str> = rest.lines().collect();
        assert_eq!(rest.len(), 3, "{out}");
        assert!(rest[0].starts_with("skip 20200106T030000Z  "), "{out}");
        assert!(rest[1].starts_with("skip 20200107T030000Z  "), "{out}");
        assert_eq!(
            format!("{}\n", rest[2]),
            format!("{verb} {garbage}"),
            "{out}"
        );
    };

    check(&rig.ok(&["prune"]), "remove");
    assert_eq!(rig.files(), before, "a dry run changes nothing");
    let json: serde_json::Value = serde_json::from_str(&rig.ok(&["prune", "--json"])).unwrap();
    assert_eq!(
        json["garbage"],
        serde_json::json!(["db1/20200104T030000Z/data.tar.zst"])
    );

    check(&rig.ok(&["prune", "--apply"]), "removed");
    let mut after = before.clone();
    for key in [
        "db1/20200102T030000Z/manifest.toml",
        "db1/20200102T030000Z/data.tar.zst",
        "db1/20200101T030000Z/manifest.toml",
        "db1/20200101T030000Z/data.tar.zst",
        "db1/20200104T030000Z/data.tar.zst",
    ] {
        assert!(after.remove(key), "{key}");
    }
    assert_eq!(rig.files(), after, "only the decided keys are deleted");
    assert_eq!(mysnap_tests::files_below(&outside), outside_before);
    assert_eq!(
        std::fs::read_to_string(outside.join("victim")).unwrap(),
        "not the store's"
    );
    assert_eq!(listed(&rig), ["20200103T030000Z"]);
    // Again: nothing more is removed, the forged keys stay.
    let again = rig.ok(&["prune", "--apply"]);
    assert!(!again.contains("removed"), "{again}");
    assert_eq!(rig.files(), after);
}

/// `restorer prune --apply` killed (`kill -9`) between a backup's manifest
/// and its archive: `list` never shows the half-deleted backup, and the next
/// prune finishes the job: the archive without a manifest is garbage once
/// its id is older than the grace (a day), and left alone before that.
#[test]
fn a_prune_killed_between_a_manifest_and_its_archive_is_finished_by_the_next_one() {
    let rig = Rig::new("[retention]\nkeep_last = 1\n");
    let killed_at_first_deletion = || {
        let mut cmd = Command::new(bin("restorer"));
        cmd.arg("--config")
            .arg(&rig.config)
            .args(["prune", "--apply"])
            .env("MYSNAP_TEST_PAUSE_AT", "prune-manifest-deleted")
            .stdout(std::process::Stdio::null());
        let want = "paused at prune-manifest-deleted";
        let (mut child, _) =
            mysnap_tests::spawn_until_line(&mut cmd, want, std::time::Duration::from_secs(60));
        let during = listed(&rig);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        during
    };

    // Old ids: the half-deleted backup's archive is garbage at once.
    for id in ["20200101T030000Z", "20200102T030000Z", "20200103T030000Z"] {
        rig.plant_backup(id);
    }
    let before = rig.files();
    let during = killed_at_first_deletion();
    let mut half = before.clone();
    assert!(half.remove("db1/20200102T030000Z/manifest.toml"));
    assert_eq!(rig.files(), half, "the manifest is deleted first");
    assert_eq!(during, ["20200103T030000Z", "20200101T030000Z"]);
    assert_eq!(listed(&rig), during, "never the half-deleted backup");
    assert_eq!(
        rig.ok(&["prune", "--apply"]),
        "keep 20200103T030000Z  newest, last 1\n\
         removed 20200101T030000Z\n\
         removed db1/20200102T030000Z/data.tar.zst  an archive without a manifest\n"
    );
    let only = |id: &str| {
        ["manifest.toml", "data.tar.zst"]
            .map(|f| format!("db1/{id}/{f}"))
            .into_iter()
            .collect::<BTreeSet<String>>()
    };
    assert_eq!(rig.files(), only("20200103T030000Z"));

    // Ids of the last hours: its archive waits out the grace.
    let hour = std::time::Duration::from_secs(3600);
    let (older, newer) = (
        mysnap_tests::id_ago(3 * hour),
        mysnap_tests::id_ago(2 * hour),
    );
    rig.plant_backup(&older);
    rig.plant_backup(&newer);
    let during = killed_at_first_deletion();
    assert_eq!(during, [newer.clone(), "20200103T030000Z".to_string()]);
    assert_eq!(listed(&rig), during);
    assert_eq!(
        rig.ok(&["prune", "--apply"]),
        format!("keep {newer}  newest, last 1\nremoved 20200103T030000Z\n")
    );
    let mut left = only(&newer);
    left.insert(format!("db1/{older}/data.tar.zst"));
    assert_eq!(
        rig.files(),
        left,
        "a young archive without a manifest stays"
    );
    assert_eq!(listed(&rig), [newer]);
}

/// A synthetic incremental backup `id` on `bases` (format 4; nothing here
/// reads its archive or index).
fn incremental_manifest(id: &str, bases: &[&str]) -> String {
    let mut m = common::manifest::Manifest::parse(
        &mysnap_tests::synthetic_manifest("db1", id),
        "synthetic",
    )
    .unwrap();
    m.format_version = common::manifest::INCREMENTAL_FORMAT_VERSION;
    let a = m.archive.as_mut().unwrap();
    a.index = Some(common::manifest::IndexInfo {
        key: format!("db1/{id}/index.json.zst"),
        size: 10,
        sha256: common::manifest::Sha256Hex::parse(&"cd".repeat(32)).unwrap(),
    });
    a.bases = bases
        .iter()
        .map(|b| common::manifest::BackupId::parse(b).unwrap())
        .collect();
    a.chain = bases.len() as u32;
    m.to_toml()
}

/// Retention never deletes a backup a kept incremental one reads from: the
/// newest (kept by `keep_last = 1`) is incremental on two older ones, which
/// stay (`base of …`), while an older chain goes; `--apply` deletes only it.
#[test]
fn prune_keeps_the_bases_of_a_kept_incremental_backup() {
    let rig = Rig::new("[retention]\nkeep_last = 1\n");
    let (old_full, old_incr) = ("20200101T030000Z", "20200102T030000Z");
    let (full, incr1, incr2) = ("20200103T030000Z", "20200104T030000Z", "20200105T030000Z");
    rig.plant_backup(old_full);
    rig.plant(old_incr, Some(&incremental_manifest(old_incr, &[old_full])));
    rig.plant_backup(full);
    rig.plant(incr1, Some(&incremental_manifest(incr1, &[full])));
    rig.plant(incr2, Some(&incremental_manifest(incr2, &[full, incr1])));
    let dry = rig.ok(&["prune"]);
    for (id, reason) in [
        (full, format!("base of {incr2}")),
        (incr1, format!("base of {incr2}")),
    ] {
        let line = dry
            .lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("{id} in {dry}"));
        assert!(line.starts_with("keep") && line.contains(&reason), "{dry}");
    }
    for id in [old_full, old_incr] {
        assert!(dry.contains(&format!("remove {id}")), "{dry}");
    }
    rig.ok(&["prune", "--apply"]);
    assert_eq!(listed(&rig), [incr2, incr1, full]);
    let table = rig.ok(&["list"]);
    assert!(
        table.contains(&format!("incremental 2 on {incr1}")),
        "{table}"
    );
}
