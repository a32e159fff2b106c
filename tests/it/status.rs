//! `restorer status` end to end: the real program on a directory store with
//! planted manifests (no MariaDB needed, so it always runs).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mysnap_tests::bin;

use crate::backup::{assert_ok, error_line};

/// A config for backup name `name` on the directory store `<dir>/store`.
fn config(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "[mysql]\nstop_command = [\"true\"]\nstart_command = [\"true\"]\n\
         [volume]\nbackend = \"btrfs\"\nmountpoint = \"{r}/vol\"\ndatadir = \"{r}/vol/mysql\"\n\
         [store]\nurl = \"file://{r}/store\"\n\
         [backup]\nname = \"{name}\"\nstate_dir = \"{r}/state\"\n",
        r = dir.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Plants a complete backup of `name` that started `ago` seconds ago.
fn plant(dir: &Path, name: &str, ago: u64) -> String {
    let id = mysnap_tests::id_ago(std::time::Duration::from_secs(ago));
    mysnap_tests::plant_backup(&dir.join("store"), name, &id);
    id
}

fn status(config: &Path, args: &[&str]) -> Output {
    Command::new(bin("restorer"))
        .arg("--config")
        .arg(config)
        .arg("status")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn status_shows_the_newest_backup_and_fails_a_stale_or_missing_one_with_exit_5() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    plant(dir, "db1", 3 * 3600);
    let newest = plant(dir, "db1", 10);
    // db3 has only an archive: no complete backup.
    mysnap_tests::plant(&dir.join("store"), "db3", "20261126T093000Z", None);
    let db1 = config(dir, "db1");

    let out = status(&db1, &["--max-age", "1h"]);
    assert_ok(&out, "restorer status --max-age 1h");
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.starts_with(&format!("db1: newest {newest}, ")),
        "{text}"
    );
    assert!(
        text.contains("1.0 MiB, lock held 0.042s, archived in 12s, 2 complete backups"),
        "{text}"
    );

    // Older than --max-age: exit 5, naming the name and the age.
    let line = error_line(&status(&db1, &["--max-age", "5s"]), 5);
    assert!(line.contains("db1") && line.contains(&newest), "{line}");
    assert!(line.contains("older than --max-age 5s"), "{line}");

    // --all with a config whose name has no backup: every name, as JSON.
    let db2 = config(dir, "db2");
    let out = status(&db2, &["--all", "--json", "--max-age", "1h"]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["max_age_secs"], 3600);
    assert!(doc["checked_at"].is_string());
    let names = doc["names"].as_array().unwrap();
    let shown: Vec<&str> = names.iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(shown, ["db1", "db2", "db3"]);
    let n = &names[0];
    assert_eq!(n["valid"], true);
    assert_eq!(n["stale"], false);
    assert_eq!(n["complete_backups"], 2);
    assert_eq!(n["newest"]["id"], newest.as_str());
    assert_eq!(n["newest"]["size"], 1048576);
    assert_eq!(n["newest"]["lock_hold_secs"], 0.042);
    assert_eq!(n["newest"]["archive_secs"], 12.25);
    assert!(n["newest"]["age_secs"].as_u64().unwrap() >= 10);
    for n in &names[1..] {
        assert_eq!(n["stale"], true, "{n}");
        assert_eq!(n["complete_backups"], 0, "{n}");
        assert!(n["newest"].is_null(), "{n}");
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("db2 has no complete backup"), "{err}");
    assert!(err.contains("db3 has no complete backup"), "{err}");
}
