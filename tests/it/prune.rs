//! `restorer prune` on a directory store with planted backups (no MariaDB):
//! a dry run changes nothing, `--apply` removes exactly the listed backups
//! and nothing else, `restorer list` then shows the kept ones.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mysnap_tests::bin;

/// A manifest as the archiver writes it, for backup `id` of db1.
pub fn manifest(id: &str) -> String {
    format!(
        r#"format_version = 1
backup_id = "{id}"
name = "db1"
created_at = "2020-01-01T03:00:00Z"
[server]
flavor = "mariadb"
version = "10.11.6-MariaDB-log"
hostname = "db1"
server_id = 1
[lock]
method = "ftwrl"
attempts = 1
wait_secs = 0.01
hold_secs = 0.02
[snapshot]
backend = "btrfs"
name = "mysnap-db1-{id}"
path = "/mnt/.mysnap-snapshots/mysnap-db1-{id}"
[data]
volume_root = "/mnt"
datadir = "mysql"
paths = ["mysql"]
exclude = []
[archive]
key = "db1/{id}/data.tar.zst"
size = 4
compression = "zstd"
level = 3
sha256 = "{sha}"
tar_size = 10240
unpacked_size = 4096
files = 2
archive_secs = 1.0
"#,
        sha = "ab".repeat(32)
    )
}

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

    fn plant(&self, id: &str, manifest: Option<&str>) {
        let dir = self.store.join("db1").join(id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("data.tar.zst"), b"zstd").unwrap();
        if let Some(m) = manifest {
            std::fs::write(dir.join("manifest.toml"), m).unwrap();
        }
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
        fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(root, &p, out);
                } else {
                    out.insert(p.strip_prefix(root).unwrap().display().to_string());
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(&self.store, &self.store, &mut out);
        out
    }
}

#[test]
fn prune_dry_run_changes_nothing_and_apply_removes_exactly_the_listed_backups() {
    // Fri 2020-01-10 is in ISO week 2020-W02; 2020-W01 ends Sun 2020-01-05.
    let rig =
        Rig::new("[retention]\nkeep_last = 3\nkeep_weekly = 2\npin = [\"20200102T030000Z\"]\n");
    for day in 1..=10 {
        let id = format!("202001{day:02}T030000Z");
        rig.plant(&id, Some(&manifest(&id)));
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
    rig.plant("20200110T030000Z", Some(&manifest("20200110T030000Z")));
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
    rig.plant("20200101T030000Z", Some(&manifest("20200101T030000Z")));
    rig.plant("20200102T030000Z", Some(&manifest("20200102T030000Z")));
    let before = rig.files();
    assert_eq!(
        rig.ok(&["prune", "--apply"]),
        "no [retention] policy: nothing to do\n"
    );
    assert_eq!(rig.files(), before);

    let zeros = Rig::new("[retention]\nkeep_daily = 0\n");
    zeros.plant("20200101T030000Z", Some(&manifest("20200101T030000Z")));
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
        rig.plant(id, Some(&manifest(id)));
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
