//! The data set and the rig around it: a btrfs loop volume holding a MariaDB
//! with sysbench tables, an S3 server, a file store, and the mysnap configs
//! and commands that point at them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use common::manifest::Manifest;
use mysnap_tests::{sysbench_prepare, BtrfsVolume, MariaDb, MariaOpts, S3Server};

use crate::measure::du;
use crate::Args;

/// The S3 store every S3 contender uses.
pub const S3_URL: &str = "s3://bench/bench";

pub struct Bench {
    pub args: Args,
    pub db: MariaDb,
    pub s3: S3Server,
    pub vol: BtrfsVolume,
    pub tmp: tempfile::TempDir,
    /// Rows in each of the 8 sysbench tables.
    pub rows: u32,
}

/// What one mysnap config points at.
pub struct Target<'a> {
    pub socket: &'a Path,
    pub mountpoint: &'a Path,
    /// `mysql.stop_command` and `start_command`, for a restore target.
    pub service: Option<(Vec<String>, Vec<String>)>,
}

impl Bench {
    /// The volume (room for `--scale`× the data, twice), a server on it
    /// loaded with 8 sysbench tables of about `--size` together, the S3
    /// server and the file store.
    pub fn prepare(args: Args) -> Bench {
        std::fs::create_dir_all(&args.out).unwrap();
        let tmp = tempfile::Builder::new()
            .prefix("mysnap-bench-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let size_mib = args.size.as_u64() >> 20;
        let vol = BtrfsVolume::new(
            tmp.path(),
            size_mib * u64::from(args.scale.max(1)) * 2 + 3072,
        );
        let db = MariaDb::start(&vol.subvol.join("mysql"), MariaOpts::default());
        let s3 = S3Server::start(&tmp.path().join("s3"));
        s3.create_bucket("bench");
        std::fs::create_dir_all(tmp.path().join("store")).unwrap();
        // About 300 bytes per sysbench row on disk, in 8 tables.
        let rows = (args.size.as_u64() / (8 * 300)).max(1000) as u32;
        eprintln!("bench: preparing 8 sysbench tables of {rows} rows");
        let t = Instant::now();
        sysbench_prepare(&db.socket, 8, rows);
        // A production server keeps a few binary logs (expire_logs_days), not
        // one the size of its data; the peers copy no binary logs at all.
        db.sql("FLUSH TABLES; RESET MASTER");
        eprintln!("bench: prepared in {:.0}s", t.elapsed().as_secs_f64());
        Bench {
            args,
            db,
            s3,
            vol,
            tmp,
            rows,
        }
    }

    /// Grows the data to `--scale`× by copying the 8 tables.
    pub fn grow(&self) {
        eprintln!("bench: growing the data to {}×", self.args.scale);
        for i in 9..=8 * self.args.scale {
            let from = (i - 1) % 8 + 1;
            self.db.sql(&format!(
                "SET sql_log_bin = 0; CREATE TABLE sbtest.sbtest{i} LIKE sbtest.sbtest{from}; \
                 INSERT INTO sbtest.sbtest{i} SELECT * FROM sbtest.sbtest{from}"
            ));
        }
        self.db.sql("FLUSH TABLES; RESET MASTER");
    }

    pub fn data_bytes(&self) -> u64 {
        du(&self.vol.subvol.join("mysql"))
    }

    pub fn file_url(&self) -> String {
        format!("file://{}", self.tmp.path().join("store").display())
    }

    pub fn config(
        &self,
        t: &Target,
        store_url: &str,
        compression: &str,
        mysql_extra: &str,
    ) -> PathBuf {
        let mut text = format!(
            "[mysql]\nsocket = \"{}\"\nlock_timeout = \"5s\"\n{mysql_extra}",
            t.socket.display()
        );
        if let Some((stop, start)) = &t.service {
            writeln!(text, "stop_command = {stop:?}\nstart_command = {start:?}").unwrap();
        }
        write!(
            text,
            "[volume]\nbackend = \"btrfs\"\nmountpoint = \"{vol}\"\ndatadir = \"{vol}/mysql\"\nowner = \"root\"\n\
             [store]\nurl = \"{store_url}\"\n",
            vol = t.mountpoint.display()
        )
        .unwrap();
        if store_url.starts_with("s3://") {
            write!(
                text,
                "endpoint = \"{}\"\nforce_path_style = true\nregion = \"us-east-1\"\n",
                self.s3.endpoint
            )
            .unwrap();
        }
        write!(
            text,
            "[archive]\n{}[backup]\nname = \"bench\"\nstate_dir = \"{}\"\n",
            archive_lines(compression),
            self.tmp.path().join("state").display()
        )
        .unwrap();
        let path = self.tmp.path().join(format!(
            "mysnap-{}.toml",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A config that backs up the bench's server.
    pub fn source_config(&self, store_url: &str, compression: &str, mysql_extra: &str) -> PathBuf {
        self.config(
            &Target {
                socket: &self.db.socket,
                mountpoint: &self.vol.subvol,
                service: None,
            },
            store_url,
            compression,
            mysql_extra,
        )
    }

    /// A release binary of mysnap with `config`, quiet, S3 credentials set.
    pub fn cmd(&self, name: &str, config: &Path) -> Command {
        let mut c = Command::new(self.args.bin_dir.join(name));
        c.env("MYSNAP_CONFIG", config)
            .envs(self.s3.env())
            .arg("-q")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        c
    }

    /// Runs the snapshotter: the manifest's path.
    pub fn snapshot(&self, config: &Path) -> Result<PathBuf, String> {
        let out = self
            .cmd("snapshotter", config)
            .stdout(Stdio::piped())
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(format!("snapshotter failed ({})", out.status));
        }
        Ok(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
    }

    /// Removes a snapshot the bench took without archiving it.
    pub fn discard(&self, manifest: &Path) {
        let m = Manifest::load(manifest).unwrap();
        let ok = Command::new("btrfs")
            .args(["subvolume", "delete"])
            .arg(&m.snapshot.path)
            .stdout(Stdio::null())
            .status();
        assert!(ok.is_ok_and(|s| s.success()));
        std::fs::remove_dir_all(manifest.parent().unwrap()).unwrap();
    }

    /// Copies the stored backup of `archive` (every object beside it: the
    /// archive, its index when indexed, the manifest) from the S3 server's
    /// directory into the file:// store of [`Bench::file_url`].
    pub fn copy_to_file_store(&self, archive: &Path) {
        let dir = archive.parent().unwrap();
        let copied = self
            .tmp
            .path()
            .join("store/bench")
            .join(dir.file_name().unwrap());
        std::fs::create_dir_all(&copied).unwrap();
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), copied.join(e.file_name())).unwrap();
        }
    }

    pub fn clear_stores(&self) {
        for d in [
            self.tmp.path().join("store/bench"),
            self.s3.root.join("bench/bench"),
        ] {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    /// A second server for restores (mysnap, dump reloads).
    pub fn target_server(&self, name: &str) -> MariaDb {
        MariaDb::start(
            &self.tmp.path().join(name).join("mysql"),
            MariaOpts {
                server_id: 2,
                ..MariaOpts::default()
            },
        )
    }
}

/// Cores, CPU model and memory of this machine, for the report.
pub fn host() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or(String::new(), |k| {
            format!(", {}", bytesize::ByteSize::kib(k).display().iec())
        });
    format!(
        "{} cores, {cpu}{mem}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    )
}

/// The `[archive]` lines of a bench config for `compression`: a codec, or
/// `zstd-indexed`, zstd in indexed frames (manifest format 3, `indexed = true`).
/// `[archive]` for `compression`: `zstd-indexed` indexed frames (format
/// 3), any other codec one stream (format 1), as the rows were measured
/// before indexed archives became the default.
fn archive_lines(compression: &str) -> String {
    match compression.strip_suffix("-indexed") {
        Some(codec) => format!("compression = \"{codec}\"\nindexed = true\n"),
        None => format!("compression = \"{compression}\"\nindexed = false\n"),
    }
}
