//! The manifest: written by snapshotter to `STATE_DIR/<id>/manifest.toml`,
//! completed by archiver, and stored last beside the archive. A backup exists
//! exactly when its manifest is in the store.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::config::Compression;

/// The format this mysnap writes; it reads this and every older one.
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.toml";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    Mariadb,
    Mysql,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// UTC start time, `YYYYMMDDTHHMMSSZ`.
    pub backup_id: String,
    /// `backup.name` of the config that took it.
    pub name: String,
    /// RFC 3339 time of the snapshot.
    pub created_at: String,
    pub server: Server,
    /// Binary log coordinates under the lock (absent when the binary log is off).
    pub binlog: Option<Binlog>,
    /// GTID state under the lock: `gtid_binlog_pos` (MariaDB) or `gtid_executed` (MySQL).
    pub gtid: Option<String>,
    /// Where the server was replicating from, when it is itself a replica.
    pub source: Option<SourceCoordinates>,
    pub lock: LockTimes,
    pub snapshot: SnapshotInfo,
    pub data: DataLayout,
    /// Filled in by archiver; a manifest without it was never stored.
    pub archive: Option<ArchiveInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    pub flavor: Flavor,
    /// `SELECT VERSION()`, e.g. `10.11.6-MariaDB-0+deb12u1-log`.
    pub version: String,
    pub hostname: String,
    pub server_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binlog {
    pub file: String,
    pub position: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCoordinates {
    pub host: String,
    pub port: u16,
    /// The source's binary log file and position this replica had executed up to.
    pub file: String,
    pub position: u64,
    /// `gtid_slave_pos` (MariaDB) or `gtid_executed` (MySQL) of the replica.
    pub gtid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockTimes {
    /// `ftwrl` or `backup_stage` (`mysql.lock_method` as resolved); manifests
    /// written before `backup_stage` existed may lack it and mean `ftwrl`.
    #[serde(default = "ftwrl")]
    pub method: String,
    /// Attempts it took (1 = first try).
    pub attempts: u32,
    /// Seconds waited for the lock on the successful attempt: FLUSH TABLES
    /// WITH READ LOCK, or BACKUP STAGE START until BLOCK_COMMIT was granted.
    pub wait_secs: f64,
    /// Seconds commits were blocked: from the lock (FLUSH TABLES WITH READ
    /// LOCK, or BACKUP STAGE BLOCK_COMMIT) being granted to UNLOCK TABLES (or
    /// BACKUP STAGE END) returning.
    pub hold_secs: f64,
}

fn ftwrl() -> String {
    "ftwrl".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// `btrfs` or `lvm`.
    pub backend: crate::config::Backend,
    /// Name of the snapshot (btrfs subvolume name, LV name).
    pub name: String,
    /// Where the snapshot's files can be read while it exists.
    pub path: PathBuf,
}

/// What to archive, as paths relative to the volume root (the snapshot root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataLayout {
    /// The live volume root (`volume.mountpoint`) when the backup was taken.
    pub volume_root: PathBuf,
    /// The data directory, relative to the volume root ("" when it is the root).
    pub datadir: String,
    /// Directories to archive, relative to the volume root; the data directory first.
    pub paths: Vec<String>,
    /// Files to leave out (pid file, socket, ibtmp1), relative to the volume root.
    pub exclude: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchiveInfo {
    /// Key of the archive in the store, relative to the store's prefix.
    pub key: String,
    /// Bytes stored.
    pub size: u64,
    pub compression: Compression,
    pub level: u32,
    /// SHA-256 of the stored bytes, lowercase hex.
    pub sha256: String,
    /// Size of the uncompressed tar stream.
    pub tar_size: u64,
    /// Bytes of file contents (what unpacking writes).
    pub unpacked_size: u64,
    pub files: u64,
    /// Seconds from the start of the archiver to the archive's upload completing.
    pub archive_secs: f64,
}

#[derive(Deserialize)]
struct VersionOnly {
    format_version: u32,
}

impl Manifest {
    /// Parses a manifest, refusing formats newer than this program knows.
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<Manifest> {
        let v: VersionOnly = toml::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "manifest {origin} is not a mysnap manifest: {}",
                e.message()
            )
        })?;
        if v.format_version > FORMAT_VERSION {
            return Err(crate::error::integrity_err(format!(
                "manifest {origin} has format version {}, this mysnap reads up to {FORMAT_VERSION}: upgrade mysnap",
                v.format_version
            )));
        }
        toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("manifest {origin} is malformed: {}", e.message()))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a manifest always serializes")
    }

    pub fn load(path: &Path) -> anyhow::Result<Manifest> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read manifest {}", path.display()))?;
        Manifest::parse(&text, &path.display().to_string())
    }

    /// Writes atomically: a temporary file, fsync, rename.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        crate::state::write_atomic(path, self.to_toml().as_bytes())
    }

    /// Store key of the manifest: `<name>/<id>/manifest.toml`.
    pub fn key(&self) -> String {
        format!("{}/{}/{MANIFEST_FILE}", self.name, self.backup_id)
    }
}

/// Backup ids are the UTC start time, `YYYYMMDDTHHMMSSZ`.
pub fn backup_id(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    t.format(time::macros::format_description!(
        "[year][month][day]T[hour][minute][second]Z"
    ))
    .expect("formatting a UTC time cannot fail")
}

/// Whether `s` has the shape of a backup id.
pub fn is_backup_id(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 16
        && b[8] == b'T'
        && b[15] == b'Z'
        && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            backup_id: "20261126T093000Z".into(),
            name: "db1".into(),
            created_at: "2026-11-26T09:30:00Z".into(),
            server: Server {
                flavor: Flavor::Mariadb,
                version: "10.11.6-MariaDB-log".into(),
                hostname: "db1".into(),
                server_id: 1,
            },
            binlog: Some(Binlog {
                file: "binlog.000002".into(),
                position: 385,
            }),
            gtid: Some("0-1-42".into()),
            source: None,
            lock: LockTimes {
                method: "ftwrl".into(),
                attempts: 1,
                wait_secs: 0.01,
                hold_secs: 0.02,
            },
            snapshot: SnapshotInfo {
                backend: crate::config::Backend::Btrfs,
                name: "mysnap-db1-20261126T093000Z".into(),
                path: "/mnt/.mysnap-snapshots/mysnap-db1-20261126T093000Z".into(),
            },
            data: DataLayout {
                volume_root: "/mnt".into(),
                datadir: "mysql".into(),
                paths: vec!["mysql".into()],
                exclude: vec!["mysql/ibtmp1".into()],
            },
            archive: None,
        }
    }

    #[test]
    fn round_trips_through_toml() {
        let m = sample();
        assert_eq!(Manifest::parse(&m.to_toml(), "test").unwrap(), m);
        assert_eq!(m.key(), "db1/20261126T093000Z/manifest.toml");
    }

    #[test]
    fn a_manifest_without_lock_method_means_ftwrl() {
        let mut m = sample();
        m.lock.method = "backup_stage".into();
        let text = m.to_toml();
        assert!(text.contains("method = \"backup_stage\""), "{text}");
        let old = text.replace("method = \"backup_stage\"\n", "");
        assert_ne!(old, text);
        assert_eq!(Manifest::parse(&old, "test").unwrap().lock.method, "ftwrl");
    }

    #[test]
    fn newer_format_is_refused_with_advice() {
        let text = sample()
            .to_toml()
            .replace("format_version = 1", "format_version = 9");
        let err = Manifest::parse(&text, "s3://b/db1/x/manifest.toml").unwrap_err();
        assert_eq!(crate::error::exit_code_of(&err), crate::ExitCode::Integrity);
        assert!(err.to_string().contains("upgrade mysnap"), "{err}");
    }

    #[test]
    fn ids() {
        let t = time::macros::datetime!(2026-11-26 09:30:05 UTC);
        assert_eq!(backup_id(t), "20261126T093005Z");
        assert!(is_backup_id("20261126T093005Z"));
        assert!(!is_backup_id("20261126T093005"));
        assert!(!is_backup_id("2026112xT093005Z"));
    }
}
