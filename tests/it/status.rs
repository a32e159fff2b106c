//! `restorer status` end to end: the real program on a directory store with
//! planted manifests (no MariaDB needed, so it always runs).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mysnap_tests::bin;

use crate::backup::{assert_ok, error_line};

/// A config for backup name `name` on the directory store `<dir>/store`.
pub fn config(dir: &Path, name: &str) -> PathBuf {
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
pub fn plant(dir: &Path, name: &str, ago: u64) -> String {
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

/// A drill record of backup `id` of db1 that started at `at`, as a drill
/// writes it.
fn record(id: &str, at: &str) -> common::drill::DrillRecord {
    use common::drill::{text, DrillRecord, Outcome, FORMAT_VERSION};
    use common::manifest::{BackupId, BackupName};
    DrillRecord {
        format_version: FORMAT_VERSION,
        name: BackupName::parse("db1").unwrap(),
        backup_id: BackupId::parse(id).unwrap(),
        started: BackupId::parse(at).unwrap(),
        host: text("h"),
        result: Outcome::Ok,
        problem: None,
        server_version: None,
        tables_checked: 7,
        tables_with_errors: 0,
        errors: Vec::new(),
        unpacked_bytes: 0,
        unpack_secs: 0.0,
        start_secs: 0.0,
        check_secs: 0.0,
        total_secs: 0.0,
        mysnap_version: text("0"),
    }
}

/// Forged drill records in the store (a huge one, one with SQL and
/// terminal control in a table name, one planted under another backup's
/// key), all newer than the one real record: `restorer status` skips each
/// with a warning naming its key, shows the real one, and exits 0.
#[test]
fn status_skips_forged_drill_records_with_a_warning_naming_each() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = dir.join("store");
    let older = plant(dir, "db1", 600);
    let newest = plant(dir, "db1", 10);
    let key = |id: &str, at: &str| format!("db1/{id}/drill-{at}.toml");
    let put = |key: &str, text: &str| std::fs::write(store.join(key), text).unwrap();
    let at = |secs: u64| mysnap_tests::id_ago(std::time::Duration::from_secs(secs));
    let (real_at, huge_at, sql_at, moved_at) = (at(5), at(4), at(3), at(2));
    put(
        &key(&newest, &real_at),
        &record(&newest, &real_at).to_toml(),
    );
    // Huge: a valid record padded far past the bound with a comment.
    let mut huge = record(&newest, &huge_at).to_toml();
    huge.push_str(&format!("# {}\n", "x".repeat(8 << 20)));
    put(&key(&newest, &huge_at), &huge);
    // SQL in a table name, with a line break and an escape sequence that
    // would rewrite the operator's terminal.
    let mut sql = record(&newest, &sql_at);
    sql.result = common::drill::Outcome::Failed;
    sql.tables_with_errors = 1;
    let text = sql.to_toml().replace(
        "errors = []",
        "errors = [\"`shop`.`t`; DROP TABLE mysql.user; --\\n\\u001b[2Jall good: Corrupt\"]",
    );
    assert_ne!(text, sql.to_toml(), "the forged table name was planted");
    put(&key(&newest, &sql_at), &text);
    // The older backup's record, copied under the newest backup's key.
    put(
        &key(&newest, &moved_at),
        &record(&older, &moved_at).to_toml(),
    );

    let db1 = config(dir, "db1");
    let out = status(&db1, &["--max-age", "1h"]);
    assert_ok(&out, "restorer status with forged drill records");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains(&format!("(drill ok of {newest}, 7 tables)")),
        "{stdout}"
    );
    assert!(
        !stdout.contains("DROP") && !stdout.contains('\u{1b}'),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    for forged in [&huge_at, &sql_at, &moved_at] {
        let k = key(&newest, forged);
        assert!(
            stderr
                .lines()
                .any(|l| l.contains("WARN") && l.contains("skipping") && l.contains(&k)),
            "no warning naming {k}: {stderr}"
        );
    }
    let json = status(&db1, &["--json"]);
    assert_ok(&json, "restorer status --json");
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let shown = &doc["names"][0]["last_drill"];
    assert_eq!(shown["backup_id"], newest.as_str(), "{doc}");
    assert_eq!(shown["tables_checked"], 7, "{doc}");
    let real = common::manifest::BackupId::parse(&real_at).unwrap().time();
    let real = real
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert_eq!(shown["at"], real.as_str(), "{doc}");
}
