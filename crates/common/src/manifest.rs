//! The manifest: written by snapshotter to `STATE_DIR/<id>/manifest.toml`,
//! completed by archiver, and stored last beside the archive. A backup exists
//! exactly when its manifest is in the store.
//!
//! A manifest read from the store is untrusted input. Every field that could
//! choose a path, a statement or an allocation has a type that checks its
//! grammar while it is deserialized ([`BackupId`], [`BackupName`], [`RelPath`],
//! [`BinlogFile`], [`GtidSet`], [`HostName`], [`Sha256Hex`], [`Text`]), and
//! [`Manifest::parse`] checks how the fields fit together (the archive key is
//! the one derived from name, id and codec; the data directory is one of the
//! archived paths, none inside another). What does not parse is refused with a
//! [`ManifestError`] (exit 4).

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Compression, LockMethod};
pub use crate::ids::{
    backup_id, is_backup_id, BackupId, BackupName, BinlogFile, GtidSet, HostName, RelPath,
    Sha256Hex, Text,
};

/// The format this mysnap writes for an unencrypted backup (older mysnap
/// reads it too).
pub const FORMAT_VERSION: u32 = 1;
/// The format of a backup whose archive is encrypted (`archive.encryption`):
/// a mysnap without encryption refuses it ("upgrade mysnap") instead of
/// misreading it.
pub const ENCRYPTED_FORMAT_VERSION: u32 = 2;
/// The format of a backup whose archive is indexed (unencrypted zstd cut
/// into independent frames, `archive.index`): restored in parallel, by
/// ranges. A mysnap that predates it refuses it ("upgrade mysnap").
pub const INDEXED_FORMAT_VERSION: u32 = 3;
/// The format of an incremental backup: indexed (format 3), with frames
/// in the archives of its `archive.bases`. A mysnap that predates it
/// refuses it ("upgrade mysnap") instead of restoring only what changed.
pub const INCREMENTAL_FORMAT_VERSION: u32 = 4;
/// The format of a backup whose archive is indexed and encrypted: zstd
/// frames in one age file, its index an age file too; restored in
/// parallel, by ranges of whole age chunks. A mysnap that predates it
/// refuses it ("upgrade mysnap").
pub const ENCRYPTED_INDEXED_FORMAT_VERSION: u32 = 5;
/// The newest format this mysnap reads (and every older one).
pub const MAX_FORMAT_VERSION: u32 = ENCRYPTED_INDEXED_FORMAT_VERSION;
/// The most bases an incremental backup may name (`backup.full_every`
/// is at most this plus one).
pub const MAX_BASES: usize = 99;
/// The most recipients a manifest may name.
pub const MAX_RECIPIENTS: usize = 64;
pub use crate::keys::MANIFEST_FILE;
/// The largest manifest mysnap reads (real ones are about 2 KiB).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    Mariadb,
    Mysql,
}

/// A manifest that cannot be used: malformed, from the future, or with a
/// field outside its grammar. Exit 4 for that backup; `list` skips it.
#[derive(Debug, thiserror::Error)]
#[error("manifest {origin} {why}")]
pub struct ManifestError {
    /// Where it was read (store URL or local path).
    pub origin: String,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// UTC start time, `YYYYMMDDTHHMMSSZ`.
    pub backup_id: BackupId,
    /// `backup.name` of the config that took it.
    pub name: BackupName,
    /// RFC 3339 time of the snapshot.
    pub created_at: Text,
    pub server: Server,
    /// Binary log coordinates under the lock (absent when the binary log is off).
    pub binlog: Option<Binlog>,
    /// GTID state under the lock: `gtid_binlog_pos` (MariaDB) or `gtid_executed` (MySQL).
    pub gtid: Option<GtidSet>,
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
    pub version: Text,
    pub hostname: Text,
    pub server_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binlog {
    pub file: BinlogFile,
    pub position: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCoordinates {
    pub host: HostName,
    pub port: u16,
    /// The source's binary log file and position this replica had executed up to.
    pub file: BinlogFile,
    pub position: u64,
    /// `gtid_slave_pos` (MariaDB) or `gtid_executed` (MySQL) of the replica.
    pub gtid: Option<GtidSet>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockTimes {
    /// `ftwrl` or `backup_stage` (`mysql.lock_method` as resolved); manifests
    /// written before `backup_stage` existed may lack it and mean `ftwrl`.
    #[serde(default = "ftwrl")]
    pub method: LockMethod,
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

fn ftwrl() -> LockMethod {
    LockMethod::Ftwrl
}

/// The snapshot a backup was read from. Only archiver uses it, from the
/// local state directory; nothing read from the store uses these fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// `btrfs` or `lvm`.
    pub backend: crate::config::Backend,
    /// Name of the snapshot (btrfs subvolume name, LV name).
    pub name: Text,
    /// Where the snapshot's files can be read while it exists.
    pub path: PathBuf,
}

/// What to archive, as paths relative to the volume root (the snapshot root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataLayout {
    /// The live volume root (`volume.mountpoint`) when the backup was taken.
    /// Restore only compares binary log index lines with it.
    pub volume_root: PathBuf,
    /// The data directory, relative to the volume root ("" when it is the root).
    pub datadir: RelPath,
    /// Directories to archive, relative to the volume root; the data
    /// directory first, none inside another.
    pub paths: Vec<RelPath>,
    /// Files to leave out (pid file, socket, ibtmp1), relative to the volume root.
    pub exclude: Vec<RelPath>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchiveInfo {
    /// Key of the archive in the store, relative to the store's prefix:
    /// always `<name>/<id>/<data.tar.zst|data.tar.xz|data.tar>`.
    pub key: String,
    /// Bytes stored.
    pub size: u64,
    pub compression: Compression,
    pub level: u32,
    /// SHA-256 of the stored bytes.
    pub sha256: Sha256Hex,
    /// Size of the uncompressed tar stream.
    pub tar_size: u64,
    /// Bytes of file contents (what unpacking writes).
    pub unpacked_size: u64,
    pub files: u64,
    /// Seconds from the start of the archiver to the archive's upload completing.
    pub archive_secs: f64,
    /// Present when the stored bytes are an age file (encrypted after the
    /// codec): what finds the key, never a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// Present when the archive is indexed (format 3): its frame index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<IndexInfo>,
    /// An incremental backup (format 4): the backups of the same name
    /// whose archives hold the frames it does not (oldest first). A
    /// restore reads their archives too; prune keeps them while this one
    /// is kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bases: Vec<BackupId>,
    /// Incremental backups since the last full one, this one included
    /// (0: a full backup); `backup.full_every` bounds it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chain: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl ArchiveInfo {
    /// Whether the backup is indexed (format 3 or 4): restorable by ranges,
    /// and a possible base of an incremental one.
    pub fn is_indexed(&self) -> bool {
        self.index.is_some()
    }
}

/// The frame index of an indexed archive, stored beside it before the
/// manifest; the manifest (and its MAC) bind it by size and SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexInfo {
    /// Always `<name>/<id>/index.json.zst`.
    pub key: String,
    /// Bytes stored (at most `archive::index::MAX_INDEX_STORED`).
    pub size: u64,
    pub sha256: Sha256Hex,
}

/// How an archive is encrypted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    pub scheme: EncryptionScheme,
    /// SHA-256 of each recipient (`age1…` string) it was encrypted to:
    /// `restorer keygen` and the errors print the same fingerprint.
    pub recipients: Vec<Sha256Hex>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EncryptionScheme {
    /// age v1 (age-encryption.org/v1) to X25519 recipients.
    #[serde(rename = "age-x25519")]
    AgeX25519,
}

#[derive(Deserialize)]
struct VersionOnly {
    format_version: u32,
}

impl Manifest {
    /// When the snapshot was taken (`created_at`): after the binary log was
    /// rotated under the lock, so no later than any write the backup lacks.
    /// The backup id is stamped before the lock and may be seconds earlier.
    pub fn snapshot_time(&self) -> time::OffsetDateTime {
        time::OffsetDateTime::parse(
            &self.created_at,
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap_or_else(|_| self.backup_id.time())
    }

    /// Parses a manifest read from `origin` (a store URL or a local path):
    /// every field in its grammar, the fields consistent with each other,
    /// and a format this program knows. Anything else is a [`ManifestError`].
    pub fn parse(text: &str, origin: &str) -> Result<Manifest, ManifestError> {
        let err = |why: String| ManifestError {
            origin: origin.to_string(),
            why,
        };
        if text.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(err(format!("is larger than {MAX_MANIFEST_BYTES} bytes")));
        }
        let v: VersionOnly = toml::from_str(text)
            .map_err(|e| err(format!("is not a mysnap manifest: {}", e.message())))?;
        if v.format_version > MAX_FORMAT_VERSION {
            return Err(err(format!(
                "has format version {}, this mysnap reads up to {MAX_FORMAT_VERSION}: upgrade mysnap",
                v.format_version
            )));
        }
        if v.format_version == 0 {
            return Err(err("has format version 0, which never existed".into()));
        }
        let m: Manifest = toml::from_str(text)
            .map_err(|e| err(format!("is malformed: {}", e.message().trim_end())))?;
        m.check().map_err(err)?;
        Ok(m)
    }

    /// Parses a manifest read from the store at `key` (relative to the
    /// store's prefix; `origin` is its URL): as [`Manifest::parse`], and its
    /// name and id must be the ones its key names.
    pub fn parse_stored(text: &str, key: &str, origin: &str) -> Result<Manifest, ManifestError> {
        let m = Manifest::parse(text, origin)?;
        if key != m.key() {
            return Err(ManifestError {
                origin: origin.to_string(),
                why: format!(
                    "names backup {}/{}, which is not where it is stored: forged or misplaced",
                    m.name, m.backup_id
                ),
            });
        }
        Ok(m)
    }

    /// How the fields fit together.
    fn check(&self) -> Result<(), String> {
        time::OffsetDateTime::parse(
            &self.created_at,
            &time::format_description::well_known::Rfc3339,
        )
        .map_err(|_| format!("created_at {:?} is not an RFC 3339 time", self.created_at))?;
        let d = &self.data;
        let root = &d.volume_root;
        let normal = root.is_absolute()
            && root.as_os_str().len() <= 4096
            && root
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !normal {
            return Err(format!(
                "data.volume_root {} is not an absolute path without '.' or '..'",
                root.display()
            ));
        }
        if d.paths.first() != Some(&d.datadir) {
            return Err(format!(
                "data.paths {:?} does not start with the data directory {:?}",
                d.paths, d.datadir
            ));
        }
        for (i, a) in d.paths.iter().enumerate() {
            for b in &d.paths[i + 1..] {
                if a.is_within(b) || b.is_within(a) {
                    return Err(format!(
                        "data.paths {a:?} and {b:?} overlap: one is inside the other"
                    ));
                }
            }
        }
        if let Some(x) = d
            .exclude
            .iter()
            .find(|x| !d.paths.iter().any(|p| x.is_within(p)))
        {
            return Err(format!("data.exclude {x:?} is not inside data.paths"));
        }
        if let Some(a) = &self.archive {
            if let Some(e) = &a.encryption {
                if self.format_version < ENCRYPTED_FORMAT_VERSION {
                    return Err(format!(
                        "has archive.encryption but format version {}: encrypted backups are format {ENCRYPTED_FORMAT_VERSION}",
                        self.format_version
                    ));
                }
                if e.recipients.is_empty() || e.recipients.len() > MAX_RECIPIENTS {
                    return Err(format!(
                        "archive.encryption.recipients has {} entries (1 to {MAX_RECIPIENTS} allowed)",
                        e.recipients.len()
                    ));
                }
            }
            let want = crate::keys::archive_key(
                &self.name,
                &self.backup_id,
                a.compression,
                a.encryption.is_some(),
            );
            if a.key != want {
                return Err(format!(
                    "archive.key {:?} is not {want:?}, the key of this backup's archive",
                    a.key
                ));
            }
            // Format 5 (encrypted, indexed) is full or incremental.
            let incremental = match self.format_version {
                INCREMENTAL_FORMAT_VERSION => true,
                ENCRYPTED_INDEXED_FORMAT_VERSION => !a.bases.is_empty() || a.chain > 0,
                _ => false,
            };
            if incremental == a.bases.is_empty() || incremental != (a.chain > 0) {
                return Err(format!(
                    "has {} archive.bases and archive.chain {} in format version {}: incremental backups are format {INCREMENTAL_FORMAT_VERSION} ({ENCRYPTED_INDEXED_FORMAT_VERSION} when encrypted), with both",
                    a.bases.len(),
                    a.chain,
                    self.format_version
                ));
            }
            let ordered = a.bases.windows(2).all(|w| w[0] < w[1]);
            if a.bases.len() > MAX_BASES
                || !ordered
                || a.bases.last().is_some_and(|b| *b >= self.backup_id)
                || a.chain as usize > MAX_BASES
            {
                return Err(format!(
                    "archive.bases {:?} (chain {}) are not up to {MAX_BASES} distinct backups older than this one, oldest first",
                    a.bases, a.chain
                ));
            }
            const INDEXED: [u32; 3] = [
                INDEXED_FORMAT_VERSION,
                INCREMENTAL_FORMAT_VERSION,
                ENCRYPTED_INDEXED_FORMAT_VERSION,
            ];
            match (&a.index, self.format_version) {
                (None, v) if INDEXED.contains(&v) => {
                    return Err(format!("has format version {v} but no archive.index"))
                }
                (None, _) => {}
                (Some(_), v) if !INDEXED.contains(&v) => {
                    return Err(format!(
                        "has archive.index but format version {v}: indexed backups are format {INDEXED_FORMAT_VERSION}, {INCREMENTAL_FORMAT_VERSION} or {ENCRYPTED_INDEXED_FORMAT_VERSION}"
                    ))
                }
                (Some(i), v) => {
                    if a.compression != Compression::Zstd {
                        return Err("has archive.index on an archive that is not zstd".into());
                    }
                    let encrypted = a.encryption.is_some();
                    if encrypted != (v == ENCRYPTED_INDEXED_FORMAT_VERSION) {
                        return Err(format!(
                            "has archive.index{} in format version {v}: encrypted indexed backups are format {ENCRYPTED_INDEXED_FORMAT_VERSION}, unencrypted ones {INDEXED_FORMAT_VERSION} or {INCREMENTAL_FORMAT_VERSION}",
                            if encrypted { " and archive.encryption" } else { "" }
                        ));
                    }
                    let want = crate::keys::index(&self.name, &self.backup_id, encrypted);
                    if i.key != want {
                        return Err(format!(
                            "archive.index.key {:?} is not {want:?}, the key of this backup's index",
                            i.key
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a manifest always serializes")
    }

    /// Reads a manifest from the local state directory.
    pub fn load(path: &Path) -> anyhow::Result<Manifest> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read manifest {}", path.display()))?;
        Ok(Manifest::parse(&text, &path.display().to_string())?)
    }

    /// Writes atomically: a temporary file, fsync, rename.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        crate::state::write_atomic(path, self.to_toml().as_bytes())
    }

    /// Store key of the manifest: `<name>/<id>/manifest.toml`.
    pub fn key(&self) -> String {
        crate::keys::manifest(&self.name, &self.backup_id)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub use crate::ids::tests::v;

    pub fn sample() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            backup_id: v("20261126T093000Z"),
            name: v("db1"),
            created_at: v("2026-11-26T09:30:00Z"),
            server: Server {
                flavor: Flavor::Mariadb,
                version: v("10.11.6-MariaDB-log"),
                hostname: v("db1"),
                server_id: 1,
            },
            binlog: Some(Binlog {
                file: v("binlog.000002"),
                position: 385,
            }),
            gtid: Some(v("0-1-42")),
            source: None,
            lock: LockTimes {
                method: LockMethod::Ftwrl,
                attempts: 1,
                wait_secs: 0.01,
                hold_secs: 0.02,
            },
            snapshot: SnapshotInfo {
                backend: crate::config::Backend::Btrfs,
                name: v("mysnap-db1-20261126T093000Z"),
                path: "/mnt/.mysnap-snapshots/mysnap-db1-20261126T093000Z".into(),
            },
            data: DataLayout {
                volume_root: "/mnt".into(),
                datadir: v("mysql"),
                paths: vec![v("mysql")],
                exclude: vec![v("mysql/ibtmp1")],
            },
            archive: None,
        }
    }

    pub fn sample_stored() -> Manifest {
        let mut m = sample();
        m.archive = Some(ArchiveInfo {
            key: "db1/20261126T093000Z/data.tar.zst".into(),
            size: 100,
            compression: Compression::Zstd,
            level: 3,
            sha256: v(&"ab".repeat(32)),
            tar_size: 10240,
            unpacked_size: 4096,
            files: 2,
            archive_secs: 1.0,
            encryption: None,
            index: None,
            bases: vec![],
            chain: 0,
        });
        m
    }

    #[test]
    fn an_encrypted_archive_needs_format_2_and_its_own_key() {
        let mut m = sample_stored();
        let a = m.archive.as_mut().unwrap();
        a.encryption = Some(Encryption {
            scheme: EncryptionScheme::AgeX25519,
            recipients: vec![v(&"cd".repeat(32))],
        });
        let err = Manifest::parse(&m.to_toml(), "t").unwrap_err();
        assert!(err.why.contains("format version 1"), "{err}");
        m.format_version = ENCRYPTED_FORMAT_VERSION;
        let err = Manifest::parse(&m.to_toml(), "t").unwrap_err();
        assert!(err.why.contains("data.tar.zst.age"), "{err}");
        m.archive.as_mut().unwrap().key = "db1/20261126T093000Z/data.tar.zst.age".into();
        assert_eq!(Manifest::parse(&m.to_toml(), "t").unwrap(), m);
        m.archive
            .as_mut()
            .unwrap()
            .encryption
            .as_mut()
            .unwrap()
            .recipients
            .clear();
        let err = Manifest::parse(&m.to_toml(), "t").unwrap_err();
        assert!(err.why.contains("recipients"), "{err}");
    }

    #[test]
    fn an_indexed_archive_needs_format_3_or_5_when_encrypted_zstd_and_its_own_index_key() {
        let mut m = sample_stored();
        m.archive.as_mut().unwrap().index = Some(IndexInfo {
            key: "db1/20261126T093000Z/index.json.zst".into(),
            size: 10,
            sha256: v(&"ef".repeat(32)),
        });
        let err = Manifest::parse(&m.to_toml(), "t").unwrap_err();
        assert!(err.why.contains("format version 1"), "{err}");
        m.format_version = INDEXED_FORMAT_VERSION;
        assert_eq!(Manifest::parse(&m.to_toml(), "t").unwrap(), m);
        let mut other = m.clone();
        other.archive.as_mut().unwrap().index.as_mut().unwrap().key =
            "db1/20261126T093001Z/index.json.zst".into();
        let err = Manifest::parse(&other.to_toml(), "t").unwrap_err();
        assert!(err.why.contains("archive.index.key"), "{err}");
        let mut xz = m.clone();
        let a = xz.archive.as_mut().unwrap();
        a.compression = Compression::Xz;
        a.key = "db1/20261126T093000Z/data.tar.xz".into();
        let err = Manifest::parse(&xz.to_toml(), "t").unwrap_err();
        assert!(err.why.contains("not zstd"), "{err}");
        // Encrypted and indexed: format 5, its index key `.age` too.
        let mut sealed = m.clone();
        let a = sealed.archive.as_mut().unwrap();
        a.key = "db1/20261126T093000Z/data.tar.zst.age".into();
        a.encryption = Some(Encryption {
            scheme: EncryptionScheme::AgeX25519,
            recipients: vec![v(&"cd".repeat(32))],
        });
        let err = Manifest::parse(&sealed.to_toml(), "t").unwrap_err();
        assert!(err.why.contains("format 5"), "{err}");
        sealed.format_version = ENCRYPTED_INDEXED_FORMAT_VERSION;
        let err = Manifest::parse(&sealed.to_toml(), "t").unwrap_err();
        assert!(err.why.contains("index.json.zst.age"), "{err}");
        let ix = sealed.archive.as_mut().unwrap().index.as_mut().unwrap();
        ix.key = "db1/20261126T093000Z/index.json.zst.age".into();
        assert_eq!(Manifest::parse(&sealed.to_toml(), "t").unwrap(), sealed);
        let mut plain_5 = m.clone();
        plain_5.format_version = ENCRYPTED_INDEXED_FORMAT_VERSION;
        let err = Manifest::parse(&plain_5.to_toml(), "t").unwrap_err();
        assert!(err.why.contains("format 5"), "{err}");
        m.archive.as_mut().unwrap().index = None;
        let err = Manifest::parse(&m.to_toml(), "t").unwrap_err();
        assert!(err.why.contains("no archive.index"), "{err}");
    }

    #[test]
    fn round_trips_through_toml() {
        let m = sample_stored();
        assert_eq!(Manifest::parse(&m.to_toml(), "test").unwrap(), m);
        assert_eq!(m.key(), "db1/20261126T093000Z/manifest.toml");
        assert_eq!(
            Manifest::parse_stored(&m.to_toml(), &m.key(), "test").unwrap(),
            m
        );
    }

    #[test]
    fn a_manifest_without_lock_method_means_ftwrl() {
        let mut m = sample();
        m.lock.method = LockMethod::BackupStage;
        let text = m.to_toml();
        assert!(text.contains("method = \"backup_stage\""), "{text}");
        let old = text.replace("method = \"backup_stage\"\n", "");
        assert_ne!(old, text);
        assert_eq!(
            Manifest::parse(&old, "test").unwrap().lock.method,
            LockMethod::Ftwrl
        );
    }

    #[test]
    fn newer_format_is_refused_with_advice() {
        let text = sample()
            .to_toml()
            .replace("format_version = 1", "format_version = 9");
        let err: anyhow::Error = Manifest::parse(&text, "s3://b/db1/x/manifest.toml")
            .unwrap_err()
            .into();
        assert_eq!(crate::cli::exit_code_of(&err), crate::ExitCode::Integrity);
        assert!(err.to_string().contains("upgrade mysnap"), "{err}");
    }

    /// Every field that reaches a path, a key, SQL or a terminal, made
    /// hostile: the manifest is refused, naming the field's problem.
    #[test]
    fn hostile_fields_are_refused() {
        let good = sample_stored().to_toml();
        let cases: &[(&str, &str, &str)] = &[
            ("datadir = \"mysql\"", "datadir = \"/etc\"", "absolute"),
            ("datadir = \"mysql\"", "datadir = \"../etc\"", "'..'"),
            (
                "paths = [\"mysql\"]",
                "paths = [\"mysql\", \"mysql/x\"]",
                "overlap",
            ),
            (
                "paths = [\"mysql\"]",
                "paths = [\"other\"]",
                "does not start",
            ),
            (
                "paths = [\"mysql\"]",
                "paths = [\"mysql\", \"/\"]",
                "absolute",
            ),
            (
                "paths = [\"mysql\"]",
                "paths = [\"mysql\", \"a//b\"]",
                "empty component",
            ),
            (
                "exclude = [\"mysql/ibtmp1\"]",
                "exclude = [\"../x\"]",
                "'..'",
            ),
            (
                "exclude = [\"mysql/ibtmp1\"]",
                "exclude = [\"elsewhere\"]",
                "not inside",
            ),
            (
                "volume_root = \"/mnt\"",
                "volume_root = \"mnt\"",
                "volume_root",
            ),
            (
                "volume_root = \"/mnt\"",
                "volume_root = \"/mnt/../etc\"",
                "volume_root",
            ),
            (
                "key = \"db1/20261126T093000Z/data.tar.zst\"",
                "key = \"/etc/shadow\"",
                "archive.key",
            ),
            (
                "key = \"db1/20261126T093000Z/data.tar.zst\"",
                "key = \"db2/20261126T093000Z/data.tar.zst\"",
                "archive.key",
            ),
            (
                "backup_id = \"20261126T093000Z\"",
                "backup_id = \"99999999T999999Z\"",
                "backup id",
            ),
            (
                "backup_id = \"20261126T093000Z\"",
                "backup_id = \"../../x\"",
                "backup id",
            ),
            ("name = \"db1\"", "name = \"../db1\"", "valid name"),
            (
                "gtid = \"0-1-42\"",
                "gtid = \"0-1-42'; DROP DATABASE mysql; --\"",
                "GTID",
            ),
            (
                "file = \"binlog.000002\"",
                "file = \"../../etc/passwd\"",
                "binary log",
            ),
            ("sha256 = ", "sha256 = \"XYZ\"\nx = ", "SHA-256"),
            (
                "version = \"10.11.6-MariaDB-log\"",
                "version = \"\\u001b[2J\"",
                "control",
            ),
            ("format_version = 1", "format_version = 0", "version 0"),
            (
                "created_at = \"2026-11-26T09:30:00Z\"",
                "created_at = \"yesterday\"",
                "RFC 3339",
            ),
        ];
        for (from, to, needle) in cases {
            assert!(good.contains(from), "{from} not in {good}");
            let text = good.replacen(from, to, 1);
            let err = Manifest::parse(&text, "test").unwrap_err().to_string();
            assert!(err.contains(needle), "{to}: {err}");
        }
        // A manifest stored under another backup's key.
        let m = sample_stored();
        let err = Manifest::parse_stored(&good, "db1/20261126T093001Z/manifest.toml", "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not where it is stored"), "{err}");
        assert!(Manifest::parse_stored(&good, &m.key(), "x").is_ok());
        // A huge manifest is refused before it is parsed.
        let huge = format!("{good}\n# {}", "x".repeat(MAX_MANIFEST_BYTES as usize));
        let err = Manifest::parse(&huge, "test").unwrap_err().to_string();
        assert!(err.contains("larger than"), "{err}");
    }
}
