//! The contenders: mysnap's backup and restore, and its peers (mariabackup,
//! mysqldump, mydumper) doing the same jobs on the same server.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use common::manifest::Manifest;
use mysnap_tests::MariaDb;

use crate::dataset::{Bench, Target, S3_URL};
use crate::measure::{
    drop_caches, du, fresh_dir, measured, median, shell_time, timed, until_answering,
};
use crate::report::Row;

/// mysnap backup: median time, archiver's peak RSS, stored size.
#[derive(Clone, Copy)]
pub struct Backup {
    pub secs: f64,
    pub rss_mib: f64,
    pub size: u64,
}

/// mysnap restore: medians of time, restorer's peak RSS and server downtime.
#[derive(Clone, Copy)]
pub struct Restore {
    pub secs: f64,
    pub rss_mib: f64,
    pub down: f64,
    /// Download → unpacked and synced, before the swap.
    pub unpack: f64,
}

impl Bench {
    /// snapshotter + archiver from a dropped cache: time, archiver's peak RSS, stored size.
    pub fn mysnap_backup(&self, url: &str, compression: &str) -> Backup {
        self.mysnap_backup_with(url, compression, "")
    }

    /// [`Bench::mysnap_backup`] with `tail` appended to the config (`[encryption]`, `[auth]`).
    pub fn mysnap_backup_with(&self, url: &str, compression: &str, tail: &str) -> Backup {
        let config = self.source_config(url, compression, "");
        append(&config, tail);
        let (mut secs, mut rss, mut size) = (Vec::new(), Vec::new(), 0);
        for _ in 0..self.args.runs {
            self.clear_stores();
            drop_caches();
            let t = Instant::now();
            let m = self.snapshot(&config).expect("snapshotter");
            let peak = measured(
                self.cmd("archiver", &config)
                    .args(["--manifest", m.to_str().unwrap()])
                    .stdout(Stdio::null()),
            );
            secs.push(t.elapsed().as_secs_f64());
            rss.push(peak as f64 / 1024.0);
            let root = if url.starts_with("s3") {
                self.s3.root.join("bench/bench")
            } else {
                self.tmp.path().join("store/bench")
            };
            size = walkdir::WalkDir::new(root)
                .into_iter()
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("data.tar"))
                .map(|e| e.metadata().unwrap().len())
                .sum();
        }
        Backup {
            secs: median(secs),
            rss_mib: median(rss),
            size,
        }
    }

    /// One zstd backup into the S3 store: its id, stored archive path and
    /// unpacked size.
    pub fn stored_backup(&self) -> (String, PathBuf, u64) {
        self.stored_backup_with("")
    }

    /// [`Bench::stored_backup`] with `tail` appended to the config.
    pub fn stored_backup_with(&self, tail: &str) -> (String, PathBuf, u64) {
        self.stored_backup_as("zstd", tail)
    }

    /// [`Bench::stored_backup_with`] in `compression` (`zstd-indexed`:
    /// indexed frames, format 3).
    pub fn stored_backup_as(&self, compression: &str, tail: &str) -> (String, PathBuf, u64) {
        self.clear_stores();
        let config = self.source_config(S3_URL, compression, "");
        append(&config, tail);
        let m = self.snapshot(&config).expect("snapshotter");
        let out = self
            .cmd("archiver", &config)
            .args(["--manifest", m.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "archiver");
        let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let stored = self.s3.root.join(format!("bench/bench/bench/{id}"));
        let manifest = Manifest::parse(
            &std::fs::read_to_string(stored.join("manifest.toml")).unwrap(),
            "bench",
        )
        .unwrap();
        let archive = manifest.archive.as_ref().unwrap();
        let file = archive.key.rsplit('/').next().unwrap().to_string();
        (id, stored.join(file), archive.unpacked_size)
    }

    /// `restorer restore ID` onto `target` from a dropped cache: time, peak
    /// RSS, server downtime; the `.old` directory is removed after each run.
    pub fn mysnap_restore(&self, target: &MariaDb, id: &str, store_url: &str) -> Restore {
        self.mysnap_restore_with(target, id, store_url, "")
    }

    /// [`Bench::mysnap_restore`] with `tail` appended to the config.
    pub fn mysnap_restore_with(
        &self,
        target: &MariaDb,
        id: &str,
        store_url: &str,
        tail: &str,
    ) -> Restore {
        let root = target.datadir.parent().unwrap();
        let config = self.config(
            &Target {
                socket: &target.socket,
                mountpoint: root,
                service: Some(target.service_commands()),
            },
            store_url,
            "zstd",
            "",
        );
        append(&config, tail);
        let (mut secs, mut rss, mut down, mut unpack) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.args.runs {
            drop_caches();
            let out_path = self.tmp.path().join("restore.json");
            let t = Instant::now();
            let peak = measured(
                self.cmd("restorer", &config)
                    .args(["restore", id])
                    .stdout(std::fs::File::create(&out_path).unwrap()),
            );
            secs.push(t.elapsed().as_secs_f64());
            rss.push(peak as f64 / 1024.0);
            let r: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
            down.push(r["downtime_secs"].as_f64().unwrap_or(f64::NAN));
            unpack.push(r["unpack_secs"].as_f64().unwrap_or(f64::NAN));
            if let Some(old) = r["old_datadir"].as_str() {
                std::fs::remove_dir_all(old).unwrap();
            }
        }
        Restore {
            secs: median(secs),
            rss_mib: median(rss),
            down: median(down),
            unpack: median(unpack),
        }
    }
}

/// Where the peers' backups go; they stay there for the peers' restores.
pub struct Peers {
    pub dir: PathBuf,
    sock: String,
    xb_dir: PathBuf,
    xb_stream: PathBuf,
    dump: PathBuf,
    mydumper_dir: PathBuf,
    xb_restore: PathBuf,
}

type Job<'a> = Box<dyn Fn() -> Result<f64, String> + 'a>;

impl Peers {
    pub fn new(b: &Bench) -> Peers {
        let dir = b.tmp.path().join("peers");
        Peers {
            sock: b.db.socket.display().to_string(),
            xb_dir: dir.join("xb"),
            xb_stream: dir.join("xb.xbstream.zst"),
            dump: dir.join("dump.sql"),
            mydumper_dir: dir.join("mydumper"),
            xb_restore: dir.join("xb-restore"),
            dir,
        }
    }

    /// The peers' backups of the running server: a row each, `÷ mysnap`
    /// against `mysnap` and `× limit` against `limit_zstd` where they compress.
    pub fn backups(&self, runs: usize, mysnap: f64, limit_zstd: f64) -> Vec<Row> {
        let Peers {
            dir: peers,
            sock,
            xb_dir,
            xb_stream,
            dump,
            mydumper_dir,
            ..
        } = self;
        let jobs: Vec<(&str, Job, &Path)> = vec![
            (
                "mariabackup --backup (plain copy)",
                Box::new(|| {
                    fresh_dir(xb_dir);
                    shell_time(&format!(
                        "mariabackup --backup --socket={sock} --user=root --target-dir={} 2>/dev/null",
                        xb_dir.display()
                    ))
                }),
                xb_dir.as_path(),
            ),
            (
                "mariabackup --backup --stream=xbstream \\| zstd -T0 -3 > file",
                Box::new(|| self.xbstream_backup()),
                xb_stream.as_path(),
            ),
            (
                "mysqldump --single-transaction sbtest > file",
                Box::new(|| {
                    shell_time(&format!(
                        "mariadb-dump --single-transaction --quick -S {sock} -uroot --databases sbtest > {}",
                        dump.display()
                    ))
                }),
                dump.as_path(),
            ),
            (
                "mydumper -t 2 sbtest",
                Box::new(|| {
                    fresh_dir(mydumper_dir);
                    shell_time(&format!(
                        "mydumper -S {sock} -u root -B sbtest -t 2 -o {}",
                        mydumper_dir.display()
                    ))
                }),
                mydumper_dir.as_path(),
            ),
        ];
        std::fs::create_dir_all(peers).unwrap();
        let mut rows = Vec::new();
        for (label, f, out) in &jobs {
            eprintln!("bench: {label}");
            let r = timed(runs, || {}, f);
            rows.push(Row {
                mysnap: Some(mysnap),
                size: r.is_ok().then(|| {
                    if out.is_dir() {
                        du(out)
                    } else {
                        std::fs::metadata(out).map_or(0, |m| m.len())
                    }
                }),
                limit: label.contains("zstd").then_some(limit_zstd),
                ..Row::new(*label, r)
            });
        }
        rows
    }

    /// `mariabackup --backup --stream=xbstream | zstd -T0 -3 > file`: the
    /// backup [`Peers::mbstream_restore`] restores.
    pub fn xbstream_backup(&self) -> Result<f64, String> {
        let tmp = self.dir.join("xbtmp");
        fresh_dir(&tmp);
        shell_time(&format!(
            "mariabackup --backup --stream=xbstream --socket={} --user=root --target-dir={} 2>/dev/null \
             | zstd -T0 -3 -q > {}",
            self.sock,
            tmp.display(),
            self.xb_stream.display()
        ))
    }

    /// mariabackup's fastest path: mbstream straight into the new data
    /// directory, --prepare, start the server until it answers.
    pub fn mbstream_restore(&self, runs: usize) -> Result<f64, String> {
        let d = self.xb_restore.join("mysql");
        timed(
            runs,
            || fresh_dir(&d),
            || {
                until_answering(&d, &format!(
                    "zstd -dc -q {} | mbstream -x -C {d} && mariabackup --prepare --target-dir={d} 2>/dev/null && sync",
                    self.xb_stream.display(),
                    d = d.display()
                ))
            },
        )
    }

    /// mariabackup's documented path: --prepare the plain copy, --copy-back,
    /// start the server until it answers.
    pub fn copy_back_restore(&self, runs: usize) -> Result<f64, String> {
        let d = self.xb_restore.join("mysql");
        let prepared = self.dir.join("xb-prepared");
        timed(
            runs,
            || {
                fresh_dir(&d);
                let _ = std::fs::remove_dir_all(&prepared);
                Command::new("cp")
                    .args(["-a"])
                    .arg(&self.xb_dir)
                    .arg(&prepared)
                    .status()
                    .unwrap();
            },
            || {
                until_answering(
                    &d,
                    &format!(
                        "mariabackup --prepare --target-dir={p} 2>/dev/null && \
                 mariabackup --copy-back --target-dir={p} --datadir={d} 2>/dev/null && sync",
                        p = prepared.display(),
                        d = d.display()
                    ),
                )
            },
        )
    }

    /// The mysqldump file loaded into `target` (sbtest dropped before each run).
    pub fn dump_reload(&self, runs: usize, target: &MariaDb) -> Result<f64, String> {
        let tsock = target.socket.display().to_string();
        timed(
            runs,
            || reset(target),
            || {
                shell_time(&format!(
                    "mariadb -S {tsock} -uroot < {}",
                    self.dump.display()
                ))
            },
        )
    }

    /// myloader of the mydumper directory into `target` (sbtest dropped before each run).
    pub fn myloader_reload(&self, runs: usize, target: &MariaDb) -> Result<f64, String> {
        let tsock = target.socket.display().to_string();
        timed(
            runs,
            || reset(target),
            || {
                shell_time(&format!(
                    "myloader -S {tsock} -u root -t 2 -o -d {}",
                    self.mydumper_dir.display()
                ))
            },
        )
    }
}

/// Drops what the reloads loaded into `target`.
pub fn reset(target: &MariaDb) {
    target.sql("DROP DATABASE IF EXISTS sbtest");
}

/// Appends `tail` (whole sections) to the config file at `path`.
fn append(path: &std::path::Path, tail: &str) {
    if !tail.is_empty() {
        let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        std::io::Write::write_all(&mut f, tail.as_bytes()).unwrap();
    }
}

/// Key files for the encrypted rows, made in `dir`: the config sections of
/// a backup host (recipients, auth key) and of a restore host (identity,
/// auth key).
pub fn crypt_configs(dir: &std::path::Path) -> (String, String) {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let write = |name: &str, text: &str, mode: u32| {
        let p = dir.join(name);
        let _ = std::fs::remove_file(&p);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&p)
            .unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        p
    };
    let (secret, public, _) = common::crypt::generate_identity();
    let identity = write("identity", &secret, 0o600);
    let recipients = write("recipients", &format!("{public}\n"), 0o644);
    let auth = write("auth.key", &common::crypt::generate_auth_key(), 0o600);
    (
        format!(
            "[encryption]\nrecipients_file = {:?}\n[auth]\nkey_file = {:?}\n",
            recipients.display().to_string(),
            auth.display().to_string()
        ),
        format!(
            "[encryption]\nidentity_file = {:?}\n[auth]\nkey_file = {:?}\n",
            identity.display().to_string(),
            auth.display().to_string()
        ),
    )
}
