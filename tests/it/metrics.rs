//! Prometheus textfile metrics end to end: real backups to the S3 server
//! with `[metrics] textfile_dir` set, a failed archiver and snapshotter
//! (wrong S3 credentials), prune, verify, and a directory that cannot be
//! written.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use common::manifest::Manifest;
use mysnap_tests::gate;

use crate::backup::{assert_ok, error_line, set, Rig, StoreKind};

/// The samples of a metrics file, by metric name; every sample must carry
/// exactly the labels of (`db1`, `kind`) and a HELP and TYPE gauge line.
pub fn read_metrics(path: &Path, kind: &str) -> BTreeMap<String, f64> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let labels = format!("{{name=\"db1\",kind=\"{kind}\"}}");
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.split_once(' ').expect(line);
        let name = series
            .strip_suffix(&labels)
            .unwrap_or_else(|| panic!("labels of {line:?} in {text}"));
        assert!(text.contains(&format!("# TYPE {name} gauge\n")), "{text}");
        assert!(text.contains(&format!("# HELP {name} ")), "{text}");
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        assert!(out.insert(name.to_string(), v).is_none(), "twice: {line}");
    }
    out
}

/// A secret key the test S3 server refuses.
const WRONG_SECRET: &str = "Wr0ngSecretKeyForTheTestServer";

fn now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn newest(rig: &Rig) -> Manifest {
    let out = rig.run("restorer", &["list", "--json"]);
    assert_ok(&out, "restorer list");
    let list: Vec<Manifest> = serde_json::from_slice(&out.stdout).unwrap();
    list.into_iter().next().expect("a backup")
}

fn assert_run(m: &BTreeMap<String, f64>, before: f64, after: f64, code: f64) {
    let run = m["mysnap_last_run_timestamp_seconds"];
    assert!(
        before - 0.01 <= run && run <= after + 0.01,
        "{before} <= {run} <= {after}"
    );
    assert_eq!(m["mysnap_last_exit_code"], code, "{m:?}");
    let took = m["mysnap_last_duration_seconds"];
    assert!(took > 0.0 && took <= after - before + 0.01, "{took}: {m:?}");
}

/// Runs `step`, then reads `file`'s metrics of `kind` and checks the run
/// they record: within the step's time, with exit `code`.
fn recorded<T>(
    file: &Path,
    kind: &str,
    code: f64,
    step: impl FnOnce() -> T,
) -> (T, BTreeMap<String, f64>) {
    let before = now();
    let out = step();
    let after = now();
    let m = read_metrics(file, kind);
    assert_run(&m, before, after, code);
    (out, m)
}

#[test]
fn backups_prune_and_verify_write_their_metrics_and_a_failure_keeps_the_last_success() {
    if !gate("backups_prune_and_verify_write_their_metrics_and_a_failure_keeps_the_last_success") {
        return;
    }
    let rig = Rig::new(StoreKind::S3);
    let dir = rig.tmp.path().join("textfile");
    std::fs::create_dir(&dir).unwrap();
    let textfile_dir = dir.to_str().unwrap().to_string();
    rig.write_config(|t| {
        set(t, "metrics", "textfile_dir", textfile_dir.as_str());
        set(t, "retention", "keep_last", 1);
    });
    rig.db
        .sql("CREATE DATABASE m; CREATE TABLE m.t (id INT PRIMARY KEY); INSERT INTO m.t VALUES (1),(2),(3)");
    let backup_file = dir.join("mysnap_db1_backup.prom");

    // A backup: run metrics, and the backup's from its manifest.
    let (id1, m) = recorded(&backup_file, "backup", 0.0, || rig.backup());
    let success = m["mysnap_last_success_timestamp_seconds"];
    assert_eq!(success, m["mysnap_last_run_timestamp_seconds"]);
    let manifest = newest(&rig);
    assert_eq!(manifest.backup_id.to_string(), id1);
    let archive = manifest.archive.as_ref().unwrap();
    assert_eq!(m["mysnap_backup_bytes"], archive.size as f64);
    assert_eq!(
        m["mysnap_backup_unpacked_bytes"],
        archive.unpacked_size as f64
    );
    assert_eq!(m["mysnap_backup_files"], archive.files as f64);
    assert_eq!(
        m["mysnap_backup_lock_wait_seconds"],
        manifest.lock.wait_secs
    );
    assert_eq!(
        m["mysnap_backup_lock_hold_seconds"],
        manifest.lock.hold_secs
    );
    assert!(m["mysnap_backup_lock_hold_seconds"] > 0.0, "{m:?}");
    // btrfs has no copy-on-write space to report.
    assert!(!m.contains_key("mysnap_backup_snapshot_cow_used_ratio"));
    let mode = std::fs::metadata(&backup_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);

    // The archiver fails (the store refuses its credentials): exit 1
    // recorded, the last success and the backup's figures kept.
    let manifest_path = rig.snapshot();
    let (out, failed) = recorded(&backup_file, "backup", 1.0, || {
        rig.cmd("archiver")
            .args(["--manifest", manifest_path.to_str().unwrap()])
            .env("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)
            .output()
            .unwrap()
    });
    error_line(&out, 1);
    assert_eq!(failed["mysnap_last_success_timestamp_seconds"], success);
    for kept in [
        "mysnap_backup_bytes",
        "mysnap_backup_lock_hold_seconds",
        "mysnap_backup_files",
    ] {
        assert_eq!(failed[kept], m[kept], "{kept}");
    }

    // The snapshotter fails: it records the backup's failure itself.
    let (out, failed) = recorded(&backup_file, "backup", 1.0, || {
        rig.cmd("snapshotter")
            .env("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)
            .output()
            .unwrap()
    });
    error_line(&out, 1);
    assert_eq!(failed["mysnap_last_success_timestamp_seconds"], success);
    assert_eq!(failed["mysnap_backup_bytes"], m["mysnap_backup_bytes"]);

    // `snapshotter | archiver` as deployed: a success again.
    let id2 = rig.backup_piped();
    assert_ne!(id1, id2);
    let m2 = read_metrics(&backup_file, "backup");
    assert_eq!(m2["mysnap_last_exit_code"], 0.0);
    assert!(m2["mysnap_last_success_timestamp_seconds"] > success);

    // Prune: a dry run records nothing; --apply records kept and removed.
    let prune_file = dir.join("mysnap_db1_prune.prom");
    assert_ok(&rig.run("restorer", &["prune"]), "prune");
    assert!(!prune_file.exists());
    let (out, p) = recorded(&prune_file, "prune", 0.0, || {
        rig.run("restorer", &["prune", "--apply"])
    });
    assert_ok(&out, "prune --apply");
    assert_eq!(p["mysnap_prune_kept"], 1.0);
    assert_eq!(p["mysnap_prune_removed"], 1.0);
    assert_eq!(p["mysnap_prune_garbage_removed"], 0.0);
    assert_eq!(p["mysnap_prune_unreadable"], 0.0);

    // Verify: the stored bytes it read.
    let verify_file = dir.join("mysnap_db1_verify.prom");
    let (out, v) = recorded(&verify_file, "verify", 0.0, || {
        rig.run("restorer", &["verify", "latest"])
    });
    assert_ok(&out, "verify");
    let latest = newest(&rig);
    assert_eq!(latest.backup_id.to_string(), id2);
    let archive = latest.archive.as_ref().unwrap();
    assert_eq!(v["mysnap_verify_bytes"], archive.size as f64);
    assert_eq!(
        v["mysnap_verify_unpacked_bytes"],
        archive.unpacked_size as f64
    );
    // A verify of a backup that is not there fails and keeps the last success.
    let out = rig.run("restorer", &["verify", "20200101T000000Z"]);
    assert_ne!(out.status.code(), Some(0));
    let vf = read_metrics(&verify_file, "verify");
    assert_eq!(
        vf["mysnap_last_exit_code"],
        f64::from(out.status.code().unwrap())
    );
    assert_eq!(
        vf["mysnap_last_success_timestamp_seconds"],
        v["mysnap_last_success_timestamp_seconds"]
    );
    assert_eq!(vf["mysnap_verify_bytes"], v["mysnap_verify_bytes"]);

    // Only the three files, no temporary ones.
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "mysnap_db1_backup.prom",
            "mysnap_db1_prune.prom",
            "mysnap_db1_verify.prom"
        ]
    );
}

#[test]
fn a_metrics_directory_that_cannot_be_written_warns_and_the_backup_still_succeeds() {
    if !gate("a_metrics_directory_that_cannot_be_written_warns_and_the_backup_still_succeeds") {
        return;
    }
    let rig = Rig::new(StoreKind::File);
    let missing: PathBuf = rig.tmp.path().join("no-such-dir");
    let textfile_dir = missing.to_str().unwrap().to_string();
    rig.write_config(|t| set(t, "metrics", "textfile_dir", textfile_dir.as_str()));
    let manifest = rig.snapshot();
    let out = rig.run("archiver", &["--manifest", manifest.to_str().unwrap()]);
    assert_ok(&out, "archiver");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warning = stderr
        .lines()
        .find(|l| l.contains("metrics not written"))
        .unwrap_or_else(|| panic!("no warning: {stderr}"));
    assert!(
        warning.contains(&format!("{textfile_dir}/mysnap_db1_backup.prom"))
            && warning.contains("the backup itself succeeded")
            && warning.contains("metrics.textfile_dir"),
        "{warning}"
    );
    assert!(!missing.exists());
    let id = String::from_utf8(out.stdout).unwrap();
    assert!(common::manifest::is_backup_id(id.trim()), "{id}");
    // The relative path is refused when the config is read (exit 2).
    rig.write_config(|t| set(t, "metrics", "textfile_dir", "metrics"));
    let line = error_line(&rig.run("restorer", &["list"]), 2);
    assert!(
        line.contains("metrics.textfile_dir must be an absolute path"),
        "{line}"
    );
}

/// A hostile old metrics file in `metrics.textfile_dir` (garbage, huge, a
/// FIFO, a link out of the directory), and a temporary file a killed
/// writer left: a failed `restorer verify`, which reads the old file back
/// to keep the last success, replaces it with a regular 0644 file of its
/// own metrics, atomically, never following the link, never reading past
/// 64 KiB, never blocking on the FIFO; the killed writer's file is removed.
#[test]
fn a_hostile_old_metrics_file_is_replaced_and_never_followed_or_read_unbounded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    crate::status::plant(dir, "db1", 60);
    let config = crate::status::config(dir, "db1");
    let textfile = dir.join("textfile");
    std::fs::create_dir(&textfile).unwrap();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[metrics]\ntextfile_dir = \"{}\"\n",
        textfile.display()
    ));
    std::fs::write(&config, text).unwrap();
    let file = textfile.join("mysnap_db1_verify.prom");
    let success = "mysnap_last_success_timestamp_seconds{name=\"db1\",kind=\"verify\"} 5\n";
    let outside = dir.join("outside.prom");
    std::fs::write(&outside, success).unwrap();
    let ended = {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        c.wait().unwrap();
        c.id()
    };
    let stale_tmp = textfile.join(format!(".mysnap_db1_verify.prom.tmp-{ended}"));

    type Plant<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: [(&str, Plant); 4] = [
        (
            "garbage",
            Box::new(|p: &Path| {
                let mut bytes = vec![0xff, 0xfe, 0, 1, b'\n'];
                bytes.extend_from_slice(
                    b"mysnap_last_success_timestamp_seconds{name=\"db2\",kind=\"verify\"} 5\n",
                );
                bytes.extend_from_slice(
                    b"mysnap_last_exit_code{name=\"db1\",kind=\"verify\"} NaN\n",
                );
                std::fs::write(p, bytes).unwrap();
            }),
        ),
        (
            "huge",
            Box::new(|p: &Path| {
                // 8 GiB, sparse: a success line past the 64 KiB read bound.
                let f = std::fs::File::create(p).unwrap();
                f.set_len(8 << 30).unwrap();
                use std::os::unix::fs::FileExt;
                f.write_all_at(
                    b"\nmysnap_last_success_timestamp_seconds{name=\"db1\",kind=\"verify\"} 5\n",
                    1 << 20,
                )
                .unwrap();
            }),
        ),
        (
            "a FIFO",
            Box::new(|p: &Path| {
                nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap()
            }),
        ),
        (
            "a link out of the directory",
            Box::new(move |p: &Path| {
                std::os::unix::fs::symlink(dir.join("outside.prom"), p).unwrap()
            }),
        ),
    ];
    for (what, plant) in &cases {
        let _ = std::fs::remove_file(&file);
        plant(&file);
        std::fs::write(&stale_tmp, "partial").unwrap();
        let started = std::time::Instant::now();
        let out = std::process::Command::new(mysnap_tests::bin("restorer"))
            .arg("--config")
            .arg(&config)
            .args(["verify", "20200101T000000Z"])
            .output()
            .unwrap();
        let code = out.status.code().expect("exited");
        assert_ne!(code, 0, "{what}: a verify of a missing backup fails");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{what}: took {:?}",
            started.elapsed()
        );
        let md = std::fs::symlink_metadata(&file).unwrap();
        assert!(md.is_file(), "{what}: replaced by a regular file");
        assert_eq!(md.permissions().mode() & 0o777, 0o644, "{what}");
        assert!(md.len() < 4096, "{what}: {} bytes", md.len());
        let m = read_metrics(&file, "verify");
        assert_eq!(m["mysnap_last_exit_code"], f64::from(code), "{what}");
        assert!(
            !m.contains_key("mysnap_last_success_timestamp_seconds"),
            "{what}: a success that was never ours: {m:?}"
        );
        assert_eq!(
            std::fs::read_to_string(&outside).unwrap(),
            success,
            "{what}: the link's target is untouched"
        );
        let names: Vec<String> = std::fs::read_dir(&textfile)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["mysnap_db1_verify.prom"], "{what}");
    }
}
