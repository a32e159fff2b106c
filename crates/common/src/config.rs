//! The one TOML configuration file (README, "Configuration"). Unknown keys are an error
//! that names the key and the file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use crate::error::config_err;
pub use crate::grammar::check_name;
pub use crate::ids::LvmName;

/// Where the config is read from when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/mysnap/mysnap.toml";
pub const CONFIG_ENV: &str = "MYSNAP_CONFIG";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub mysql: MysqlConfig,
    pub volume: VolumeConfig,
    pub store: StoreConfig,
    #[serde(default)]
    pub archive: ArchiveConfig,
    pub backup: BackupConfig,
    /// Absent: `restorer prune` does nothing.
    pub retention: Option<crate::retention::RetentionConfig>,
    #[serde(default)]
    pub drill: DrillConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub encryption: EncryptionConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub binlog: BinlogConfig,
}

/// `[binlog]`: how `archiver binlogs` ships binary logs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BinlogConfig {
    /// How often the open binary log is closed (`FLUSH BINARY LOGS`, only
    /// when it holds a transaction) and the closed ones shipped: the bound
    /// on what a restore to the latest point loses, plus the upload's time.
    #[serde(with = "humantime_serde", default = "default_rotate_interval")]
    pub rotate_interval: Duration,
}

impl Default for BinlogConfig {
    fn default() -> Self {
        BinlogConfig {
            rotate_interval: default_rotate_interval(),
        }
    }
}

fn default_rotate_interval() -> Duration {
    Duration::from_secs(30)
}

/// `[encryption]`: client-side encryption of archives (`common::crypt`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    /// Backup hosts: age public keys (`age1…`), one per line; set: every
    /// new archive is encrypted to all of them.
    pub recipients_file: Option<PathBuf>,
    /// Restore hosts: age identities (`AGE-SECRET-KEY-1…`), one per line
    /// (mode 0600). `MYSNAP_IDENTITY_FILE`, then systemd's
    /// `$CREDENTIALS_DIRECTORY/mysnap-identity`, come before it.
    pub identity_file: Option<PathBuf>,
}

/// `[auth]`: authenticated manifests (`common::crypt::AuthKey`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// An HMAC-SHA256 key, hex (at least 32 bytes), mode 0600, on backup
    /// and restore hosts alike; set: manifests are MACed and checked.
    pub key_file: Option<PathBuf>,
}

/// `[metrics]`: Prometheus textfile metrics (`common::metrics`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// node_exporter's `--collector.textfile.directory`; absent: no metrics.
    pub textfile_dir: Option<PathBuf>,
}

/// `[drill]`: how `restorer drill` restores a backup into a scratch
/// directory and checks it with a throwaway server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillConfig {
    /// Where the scratch directory is made (`--scratch` overrides); never
    /// inside `volume.datadir`.
    #[serde(default = "default_scratch_dir")]
    pub scratch_dir: PathBuf,
    /// The server program; else `mariadbd` or `mysqld` from `PATH`, then `/usr/sbin`.
    pub server_binary: Option<PathBuf>,
    /// Longest wait for the throwaway server to answer (InnoDB recovery included).
    #[serde(with = "humantime_serde", default = "default_drill_start_timeout")]
    pub start_timeout: Duration,
    /// Extra server options (`--name=value`), after mysnap's own.
    #[serde(default)]
    pub server_options: Vec<String>,
}

impl Default for DrillConfig {
    fn default() -> Self {
        DrillConfig {
            scratch_dir: default_scratch_dir(),
            server_binary: None,
            start_timeout: default_drill_start_timeout(),
            server_options: Vec::new(),
        }
    }
}

/// The server options `restorer drill` sets itself, which would let the
/// throwaway server reach the live one's files, network or replication
/// source: refused in `drill.server_options`.
pub const DRILL_OWN_OPTIONS: &[&str] = &[
    "defaults-file",
    "defaults-extra-file",
    "no-defaults",
    "datadir",
    "socket",
    "pid-file",
    "log-error",
    "tmpdir",
    "user",
    "port",
    "bind-address",
    "networking",
    "log-bin",
    "log-basename",
    "slave-start",
    "replica-start",
    "grant-tables",
    "event-scheduler",
    "mysqlx",
    "init-file",
    "init-connect",
    "plugin-dir",
    "secure-file-priv",
];

/// Checks one `drill.server_options` entry: `--name` or `--name=value`, no
/// control characters, not one of [`DRILL_OWN_OPTIONS`] (in any spelling:
/// `_` for `-`, `loose-`, `skip-`, `enable-`, `disable-`), nor `log-bin*` or
/// `wsrep*`, and no path (no `/`).
fn check_server_option(opt: &str) -> Result<(), String> {
    let bad = |why: String| Err(format!("drill.server_options {opt:?}: {why}"));
    let Some(body) = opt.strip_prefix("--") else {
        return bad(
            "must start with -- (e.g. \"--innodb-data-file-path=ibdata1:12M:autoextend\")".into(),
        );
    };
    if opt.chars().any(char::is_control) || opt.len() > 4096 {
        return bad("holds control characters or is longer than 4096 bytes".into());
    }
    let name = body.split('=').next().unwrap_or("").replace('_', "-");
    // `--loose-x` and `--enable-x`/`--disable-x` are spellings of `x`.
    let bare = name.strip_prefix("loose-").unwrap_or(&name);
    let bare = ["enable-", "disable-", "skip-", "maximum-"]
        .iter()
        .fold(bare, |n, p| n.strip_prefix(p).unwrap_or(n));
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return bad("is not an option name".into());
    }
    if DRILL_OWN_OPTIONS.contains(&bare) || bare.starts_with("log-bin") || bare.starts_with("wsrep")
    {
        return bad("restorer drill sets this option itself (the throwaway server must stay away from the live server's files, network and replication source)".into());
    }
    if body.contains('/') {
        return bad("names a path: the throwaway server's files all live in its scratch directory, and a path could lead it to the live server's files".into());
    }
    Ok(())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MysqlConfig {
    pub socket: Option<PathBuf>,
    pub host: Option<String>,
    #[serde(default = "default_port")]
    pub port: u16,
    pub user: Option<String>,
    /// A file holding only the password; must not be readable by group or others.
    pub password_file: Option<PathBuf>,
    /// A my.cnf-style file whose `[client]` section gives user, password, socket.
    pub defaults_file: Option<PathBuf>,
    /// Longest one lock attempt may wait (FLUSH TABLES WITH READ LOCK, or
    /// BACKUP STAGE START up to BLOCK_COMMIT).
    #[serde(with = "humantime_serde", default = "default_lock_timeout")]
    pub lock_timeout: Duration,
    #[serde(default = "default_lock_retries")]
    pub lock_retries: u32,
    /// How the server is held still for the snapshot.
    #[serde(default)]
    pub lock_method: LockMethod,
    /// How long to wait for running long queries to finish before the first attempt.
    #[serde(with = "humantime_serde", default = "default_long_query_wait")]
    pub long_query_wait: Duration,
    /// The hard bound on the hold: from the lock that blocks commits being
    /// granted to its end. Everything under the lock gets only what is left
    /// of it; when it passes, the lock is ended and the run fails (exit 3).
    #[serde(with = "humantime_serde", default = "default_max_hold")]
    pub max_hold: Duration,
    #[serde(default)]
    pub stop_command: Vec<String>,
    #[serde(default)]
    pub start_command: Vec<String>,
    /// A restore runs `stop_command` when its unpack has about this long
    /// left (estimated from its rate so far), so that the stop overlaps the
    /// end of the unpack; `0s`: only once everything is written and checked.
    #[serde(with = "humantime_serde", default = "default_stop_ahead")]
    pub stop_ahead: Duration,
}

impl Default for MysqlConfig {
    fn default() -> Self {
        MysqlConfig {
            socket: None,
            host: None,
            port: default_port(),
            user: None,
            password_file: None,
            defaults_file: None,
            lock_timeout: default_lock_timeout(),
            lock_retries: default_lock_retries(),
            lock_method: LockMethod::Auto,
            long_query_wait: default_long_query_wait(),
            max_hold: default_max_hold(),
            stop_command: Vec::new(),
            start_command: Vec::new(),
            stop_ahead: default_stop_ahead(),
        }
    }
}

/// `mysql.lock_method`: what holds the server still while it is snapshotted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LockMethod {
    /// The measured better one for the server: see `ServerVersion::lock_method`.
    #[default]
    Auto,
    /// FLUSH TABLES WITH READ LOCK (every flavor and version).
    Ftwrl,
    /// BACKUP STAGE START … BLOCK_COMMIT … END (MariaDB 10.4 and later).
    BackupStage,
}

impl LockMethod {
    /// The name in the config and the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            LockMethod::Auto => "auto",
            LockMethod::Ftwrl => "ftwrl",
            LockMethod::BackupStage => "backup_stage",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Lvm,
    Btrfs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    Xfs,
    Ext4,
}

/// `[volume]`: where the data lives and how it is snapshotted. The keys of
/// one backend exist only in its variant ([`VolumeBackend`]); the file's
/// flat table is checked and converted once, when the config is read.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawVolume")]
pub struct VolumeConfig {
    /// Block device(s) for volprep: one path or a list.
    pub device: Option<Devices>,
    /// lvm: where the LV is mounted; btrfs: the subvolume that is snapshotted.
    pub mountpoint: PathBuf,
    /// Where the data directory lives (volprep creates it, restorer restores into it).
    pub datadir: PathBuf,
    /// Owner of restored files (default: the `mysql` user where it exists).
    pub owner: Option<String>,
    pub backend: VolumeBackend,
}

/// The backend and the keys only it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeBackend {
    Lvm(LvmVolume),
    Btrfs(BtrfsVolume),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvmVolume {
    pub vg: LvmName,
    pub lv: LvmName,
    pub filesystem: Filesystem,
    /// Share of the VG volprep leaves free for snapshots (1-90).
    pub snapshot_reserve_percent: u8,
    /// The snapshot's copy-on-write size (`volume.snapshot_size`).
    pub snapshot_size: SnapshotSize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BtrfsVolume {
    /// Where read-only snapshots are created (`volume.snapshot_dir`, default
    /// `<mountpoint>/.mysnap-snapshots`).
    pub snapshot_dir: PathBuf,
}

impl VolumeConfig {
    pub fn kind(&self) -> Backend {
        match self.backend {
            VolumeBackend::Lvm(_) => Backend::Lvm,
            VolumeBackend::Btrfs(_) => Backend::Btrfs,
        }
    }
    /// The uid and gid of the data directory's owner: `volume.owner`, else
    /// the `mysql` user where it exists, else `None`. A configured owner
    /// that is not a user here is a configuration error (exit 2).
    pub fn owner_ids(&self) -> anyhow::Result<Option<(u32, u32)>> {
        let name = self.owner.as_deref();
        let user = nix::unistd::User::from_name(name.unwrap_or("mysql")).map_err(|e| {
            anyhow::anyhow!("cannot read the user database looking up volume.owner: {e}")
        })?;
        match (user, name) {
            (Some(u), _) => Ok(Some((u.uid.as_raw(), u.gid.as_raw()))),
            (None, Some(n)) => Err(config_err(format!(
                "volume.owner {n:?} is not a user on this machine: create it, or fix volume.owner"
            ))),
            (None, None) => Ok(None),
        }
    }

    /// The LVM keys, when the backend is LVM.
    pub fn lvm(&self) -> Option<&LvmVolume> {
        match &self.backend {
            VolumeBackend::Lvm(l) => Some(l),
            VolumeBackend::Btrfs(_) => None,
        }
    }
}

/// `[volume]` as written in the file: one flat table for every backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    backend: Backend,
    #[serde(default)]
    device: Option<Devices>,
    vg: Option<String>,
    lv: Option<String>,
    mountpoint: PathBuf,
    filesystem: Option<Filesystem>,
    snapshot_reserve_percent: Option<u8>,
    datadir: PathBuf,
    owner: Option<String>,
    snapshot_dir: Option<PathBuf>,
    snapshot_size: Option<String>,
}

impl TryFrom<RawVolume> for VolumeConfig {
    type Error = String;
    fn try_from(r: RawVolume) -> Result<VolumeConfig, String> {
        for (key, p) in [
            ("volume.mountpoint", Some(&r.mountpoint)),
            ("volume.datadir", Some(&r.datadir)),
            ("volume.snapshot_dir", r.snapshot_dir.as_ref()),
        ] {
            if let Some(p) = p.filter(|p| !p.is_absolute()) {
                return Err(format!(
                    "{key} must be an absolute path, got {}",
                    p.display()
                ));
            }
        }
        if !r.datadir.starts_with(&r.mountpoint) {
            return Err(format!(
                "volume.datadir {} is not under volume.mountpoint {}",
                r.datadir.display(),
                r.mountpoint.display()
            ));
        }
        let backend = match r.backend {
            Backend::Lvm => VolumeBackend::Lvm(lvm_volume(&r)?),
            Backend::Btrfs => VolumeBackend::Btrfs(btrfs_volume(&r)?),
        };
        Ok(VolumeConfig {
            device: r.device,
            mountpoint: r.mountpoint,
            datadir: r.datadir,
            owner: r.owner,
            backend,
        })
    }
}

fn only_for(backend: &str, set: &[(&str, bool)]) -> Result<(), String> {
    match set.iter().find(|(_, is_set)| *is_set) {
        Some((key, _)) => Err(format!(
            "volume.{key} is not a key of backend = \"{backend}\": remove it"
        )),
        None => Ok(()),
    }
}

fn lvm_volume(r: &RawVolume) -> Result<LvmVolume, String> {
    only_for("lvm", &[("snapshot_dir", r.snapshot_dir.is_some())])?;
    let vg =
        r.vg.as_deref()
            .ok_or("volume.vg is required with backend = \"lvm\"")?;
    let lv =
        r.lv.as_deref()
            .ok_or("volume.lv is required with backend = \"lvm\"")?;
    let reserve = r.snapshot_reserve_percent.unwrap_or(20);
    if !(1..=90).contains(&reserve) {
        return Err("volume.snapshot_reserve_percent must be between 1 and 90".into());
    }
    let snapshot_size = match &r.snapshot_size {
        Some(s) => SnapshotSize::parse(s).map_err(|e| format!("volume.snapshot_size: {e}"))?,
        None => SnapshotSize::default(),
    };
    Ok(LvmVolume {
        vg: LvmName::parse(vg).map_err(|e| format!("volume.vg: {e}"))?,
        lv: LvmName::parse(lv).map_err(|e| format!("volume.lv: {e}"))?,
        filesystem: r.filesystem.unwrap_or(Filesystem::Xfs),
        snapshot_reserve_percent: reserve,
        snapshot_size,
    })
}

fn btrfs_volume(r: &RawVolume) -> Result<BtrfsVolume, String> {
    only_for(
        "btrfs",
        &[
            ("vg", r.vg.is_some()),
            ("lv", r.lv.is_some()),
            ("filesystem", r.filesystem.is_some()),
            (
                "snapshot_reserve_percent",
                r.snapshot_reserve_percent.is_some(),
            ),
            ("snapshot_size", r.snapshot_size.is_some()),
        ],
    )?;
    let snapshot_dir = r
        .snapshot_dir
        .clone()
        .unwrap_or_else(|| r.mountpoint.join(".mysnap-snapshots"));
    if snapshot_dir.starts_with(&r.datadir) {
        return Err(format!(
            "the snapshot directory {} is inside volume.datadir; set volume.snapshot_dir to a directory on the same btrfs volume outside the data directory",
            snapshot_dir.display()
        ));
    }
    Ok(BtrfsVolume { snapshot_dir })
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Devices {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `s3://bucket/prefix` or `file:///dir`.
    pub url: StoreUrl,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`); unset: with an
    /// `endpoint` (S3-compatible stores, whose DNS rarely has a name per
    /// bucket), else virtual-hosted (AWS).
    pub force_path_style: Option<bool>,
    #[serde(default = "default_part_size")]
    pub part_size: ByteSize,
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// The most bytes of parts one upload or download holds in memory
    /// (in flight, queued and being filled); concurrency is lowered to fit.
    #[serde(default = "default_memory_limit")]
    pub memory_limit: ByteSize,
    /// Attempts per request on throttling, 5xx and timeouts.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Longest wait for a connection to the store.
    #[serde(with = "humantime_serde", default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    /// Longest wait for a response, and for each piece of a body being read.
    #[serde(with = "humantime_serde", default = "default_read_timeout")]
    pub read_timeout: Duration,
    /// S3 only: the storage class of every object written (`x-amz-storage-class`).
    pub storage_class: Option<StorageClass>,
    /// S3 only: server-side encryption of every object written.
    pub sse: Option<Sse>,
    /// S3 only, with `sse = "aws:kms"`: the KMS key (else the bucket's default key).
    pub sse_kms_key_id: Option<KmsKeyId>,
    /// S3 only: Object Lock retention set on every object written, in days.
    pub object_lock_days: Option<u32>,
    /// S3 only: the Object Lock mode (default GOVERNANCE); needs `object_lock_days`.
    pub object_lock_mode: Option<ObjectLockMode>,
    /// Most bytes per second handed to the store by an upload.
    pub upload_rate_limit: Option<ByteSize>,
    /// S3 only: when the SDK adds its own checksums to requests (and
    /// checks them on responses).
    #[serde(default)]
    pub checksums: Checksums,
}

/// `store.checksums`: the AWS SDK's request checksums (a CRC32 on every
/// write, sent as a header or an `aws-chunked` trailer) and response
/// validation. Many S3-compatible stores refuse one or the other; mysnap's
/// own SHA-256 covers every byte end to end either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Checksums {
    /// `when_supported` against AWS (no `store.endpoint`) or with Object
    /// Lock (a retention needs a checksum); `when_required` otherwise.
    #[default]
    Auto,
    /// On every request that can carry one (the SDK's default).
    WhenSupported,
    /// Only where the operation requires one.
    WhenRequired,
}

impl StoreConfig {
    /// `store.force_path_style`, with its default resolved.
    pub fn path_style(&self) -> bool {
        self.force_path_style.unwrap_or(self.endpoint.is_some())
    }

    /// Whether the SDK adds checksums to every request that can carry one
    /// (`store.checksums`, with `auto` resolved).
    pub fn sdk_checksums(&self) -> bool {
        match self.checksums {
            Checksums::WhenSupported => true,
            Checksums::WhenRequired => false,
            Checksums::Auto => self.endpoint.is_none() || self.object_lock_days.is_some(),
        }
    }

    /// The Object Lock retention every object gets, when configured.
    pub fn object_lock(&self) -> Option<(ObjectLockMode, u32)> {
        self.object_lock_days
            .map(|d| (self.object_lock_mode.unwrap_or_default(), d))
    }
}

/// `store.storage_class`: one of the classes S3 documents, spelled as S3
/// does (case-sensitive). GLACIER and DEEP_ARCHIVE are refused: their
/// objects cannot be read before a RestoreObject, so `restorer list` and
/// `restore` could not read the backups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageClass(&'static str);

impl<'de> Deserialize<'de> for StorageClass {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<StorageClass, D::Error> {
        StorageClass::try_from(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl StorageClass {
    pub const ALLOWED: [&'static str; 9] = [
        "STANDARD",
        "STANDARD_IA",
        "ONEZONE_IA",
        "INTELLIGENT_TIERING",
        "GLACIER_IR",
        "REDUCED_REDUNDANCY",
        "EXPRESS_ONEZONE",
        "OUTPOSTS",
        "SNOW",
    ];
    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl TryFrom<String> for StorageClass {
    type Error = String;
    fn try_from(s: String) -> Result<StorageClass, String> {
        if let Some(c) = StorageClass::ALLOWED.iter().find(|c| **c == s) {
            return Ok(StorageClass(c));
        }
        if s == "GLACIER" || s == "DEEP_ARCHIVE" {
            return Err(format!(
                "store.storage_class {s:?} is refused: objects in it must be restored (RestoreObject) before they can be read, so mysnap could neither list nor restore the backups; use GLACIER_IR, or a lifecycle rule that transitions old backups"
            ));
        }
        Err(format!(
            "store.storage_class {:?} is not an S3 storage class (case-sensitive): one of {}",
            shown(&s),
            StorageClass::ALLOWED.join(", ")
        ))
    }
}

/// A config value quoted in an error, at most 64 characters of it.
fn shown(s: &str) -> String {
    s.chars().take(64).collect()
}

/// `store.sse`: server-side encryption requested on every write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Sse {
    /// `AES256`: keys managed by S3 (SSE-S3).
    Aes256,
    /// `aws:kms`: SSE-KMS, with `store.sse_kms_key_id` or the bucket's default key.
    AwsKms,
}

impl Sse {
    pub fn as_str(self) -> &'static str {
        match self {
            Sse::Aes256 => "AES256",
            Sse::AwsKms => "aws:kms",
        }
    }
}

impl TryFrom<String> for Sse {
    type Error = String;
    fn try_from(s: String) -> Result<Sse, String> {
        match s.as_str() {
            "AES256" => Ok(Sse::Aes256),
            "aws:kms" => Ok(Sse::AwsKms),
            _ => Err(format!(
                "store.sse {:?} is neither \"AES256\" nor \"aws:kms\" (case-sensitive)",
                shown(&s)
            )),
        }
    }
}

/// `store.sse_kms_key_id`: a KMS key id, ARN or alias. Not a secret, but
/// not repeated in error messages either; it is checked only for shape
/// (S3 says whether the key exists).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct KmsKeyId(String);

impl KmsKeyId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for KmsKeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KmsKeyId(..)")
    }
}

impl TryFrom<String> for KmsKeyId {
    type Error = String;
    fn try_from(s: String) -> Result<KmsKeyId, String> {
        let ok = !s.is_empty()
            && s.len() <= 2048
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || ":/-_.".contains(c));
        if ok {
            Ok(KmsKeyId(s))
        } else {
            Err("store.sse_kms_key_id must be a KMS key id, ARN or alias (letters, digits and : / - _ ., at most 2048 characters)".into())
        }
    }
}

/// `store.object_lock_mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ObjectLockMode {
    /// Users with `s3:BypassGovernanceRetention` can still delete.
    #[default]
    Governance,
    /// Nobody, not even the root account, can delete before the date.
    Compliance,
}

impl ObjectLockMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectLockMode::Governance => "GOVERNANCE",
            ObjectLockMode::Compliance => "COMPLIANCE",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
    Xz,
    None,
}

impl Compression {
    /// The archive's file name in the store.
    pub fn file_name(self) -> &'static str {
        match self {
            Compression::Zstd => "data.tar.zst",
            Compression::Xz => "data.tar.xz",
            Compression::None => "data.tar",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveConfig {
    #[serde(default = "default_compression")]
    pub compression: Compression,
    /// Compression level (zstd 1-19, xz 0-9); default 3 for zstd and 1 for xz.
    pub level: Option<u32>,
    /// Compression threads; 0 = all cores.
    #[serde(default)]
    pub threads: u32,
    /// Most bytes per second read from the snapshot.
    pub read_rate_limit: Option<ByteSize>,
    /// zstd archives as indexed frames (manifest format 3, or 5 when
    /// encrypted; the default); `false`: one stream (format 1, or 2).
    #[serde(default = "default_indexed")]
    pub indexed: bool,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            compression: default_compression(),
            level: None,
            threads: 0,
            read_rate_limit: None,
            indexed: default_indexed(),
        }
    }
}

fn default_indexed() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    /// Namespace of this server's backups in the store.
    pub name: String,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// How long a manifest the snapshotter handed on stays reserved for its
    /// archiver: within it a later snapshotter neither removes that backup
    /// nor starts another; after it, an unclaimed backup is stale.
    #[serde(with = "humantime_serde", default = "default_handoff_grace")]
    pub handoff_grace: Duration,
    /// Every how many backups one is full: 1 (default) every one; N > 1,
    /// up to N-1 incremental backups (indexed archives only) after each full one.
    #[serde(default = "default_full_every")]
    pub full_every: u32,
}

fn default_full_every() -> u32 {
    1
}

/// `store.url`, parsed when the config is read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum StoreUrl {
    S3 { bucket: String, prefix: String },
    File { root: PathBuf },
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<StoreUrl, String> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let ok = (3..=63).contains(&bucket.len())
                && bucket
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-".contains(c));
            if !ok {
                return Err(format!("{bucket:?} is not a valid S3 bucket name (3-63 lowercase letters, digits, '.', '-')"));
            }
            Ok(StoreUrl::S3 {
                bucket: bucket.into(),
                prefix: prefix.trim_matches('/').into(),
            })
        } else if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{url:?}: a file store needs an absolute path, like file:///var/backups/mysnap"
                ));
            }
            Ok(StoreUrl::File {
                root: PathBuf::from(path),
            })
        } else {
            Err(format!(
                "{url:?} is neither s3://bucket/prefix nor file:///path"
            ))
        }
    }
}

impl TryFrom<String> for StoreUrl {
    type Error = String;
    fn try_from(s: String) -> Result<StoreUrl, String> {
        StoreUrl::parse(&s).map_err(|e| format!("store.url: {e}"))
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            StoreUrl::File { root } => write!(f, "file://{}", root.display()),
        }
    }
}

/// How big the snapshot's copy-on-write space is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotSize {
    /// `-l N%FREE` (or `%VG`, `%ORIGIN`): a share of the extents.
    Percent { percent: u8, of: &'static str },
    /// `-L <KiB>k`: a fixed size, rounded up to whole KiB (LVM rounds up to extents).
    Bytes(u64),
}

impl Default for SnapshotSize {
    fn default() -> Self {
        SnapshotSize::Percent {
            percent: 100,
            of: "FREE",
        }
    }
}

impl SnapshotSize {
    /// `"100%FREE"`, `"50%VG"`, `"20%ORIGIN"`, or a size such as `"10GiB"`.
    pub fn parse(text: &str) -> Result<SnapshotSize, String> {
        let t = text.trim();
        if let Some((num, of)) = t.split_once('%') {
            let of = match of.to_ascii_uppercase().as_str() {
                "FREE" => "FREE",
                "VG" => "VG",
                "ORIGIN" => "ORIGIN",
                _ => {
                    return Err(format!(
                        "{text:?}: a share must be N%FREE, N%VG or N%ORIGIN"
                    ))
                }
            };
            let percent: u8 = num
                .trim()
                .parse()
                .ok()
                .filter(|p| (1..=100).contains(p))
                .ok_or_else(|| format!("{text:?}: the percentage must be 1 to 100"))?;
            return Ok(SnapshotSize::Percent { percent, of });
        }
        let bytes: bytesize::ByteSize = t.parse().map_err(|e| {
            format!("{text:?} is neither a size (\"10GiB\") nor a share (\"50%FREE\"): {e}")
        })?;
        if bytes.as_u64() < 1 << 20 {
            return Err(format!(
                "{text:?} is too small for a snapshot (at least 1MiB)"
            ));
        }
        Ok(SnapshotSize::Bytes(bytes.as_u64()))
    }

    /// The lvcreate arguments for this size.
    pub fn lvcreate_args(&self) -> [String; 2] {
        match self {
            SnapshotSize::Percent { percent, of } => ["-l".into(), format!("{percent}%{of}")],
            SnapshotSize::Bytes(b) => ["-L".into(), format!("{}k", b.div_ceil(1024))],
        }
    }
}

impl std::fmt::Display for SnapshotSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotSize::Percent { percent, of } => write!(f, "{percent}%{of}"),
            SnapshotSize::Bytes(b) => write!(f, "{}", bytesize::ByteSize(*b)),
        }
    }
}

fn default_port() -> u16 {
    3306
}
fn default_lock_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_lock_retries() -> u32 {
    3
}
fn default_long_query_wait() -> Duration {
    Duration::from_secs(60)
}
fn default_stop_ahead() -> Duration {
    Duration::from_millis(500)
}
fn default_max_hold() -> Duration {
    Duration::from_secs(10)
}
/// The least rate limit accepted (`store.upload_rate_limit`,
/// `archive.read_rate_limit`): below it a backup of any size takes days.
pub const MIN_RATE_LIMIT: ByteSize = ByteSize::mib(1);
/// The longest Object Lock retention accepted (100 years).
pub const MAX_OBJECT_LOCK_DAYS: u32 = 36500;
/// The least `mysql.max_hold` accepted: a snapshot needs some time.
pub const MIN_MAX_HOLD: Duration = Duration::from_secs(1);
fn default_handoff_grace() -> Duration {
    Duration::from_secs(10 * 60)
}
fn default_part_size() -> ByteSize {
    ByteSize::mib(16)
}
fn default_concurrency() -> usize {
    8
}
fn default_memory_limit() -> ByteSize {
    ByteSize::mib(256)
}
fn default_max_attempts() -> u32 {
    5
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_read_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_compression() -> Compression {
    Compression::Zstd
}
fn default_scratch_dir() -> PathBuf {
    PathBuf::from("/var/tmp")
}
fn default_drill_start_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/mysnap")
}

/// The config path: the flag, else `MYSNAP_CONFIG`, else the default.
pub fn resolve_path(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
}

/// The `section.key` of the `key = value` line holding byte `at` of
/// `text`, when it is one (for messages only).
fn key_at(text: &str, at: usize) -> Option<String> {
    let start = text.get(..at)?.rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let plain = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    if !plain(key) {
        return None;
    }
    let section = text[..start].lines().rev().find_map(|l| {
        let l = l.trim();
        l.strip_prefix('[')?.strip_suffix(']').map(str::trim)
    });
    Some(match section {
        Some(sec) if plain(sec) => format!("{sec}.{key}"),
        _ => key.to_string(),
    })
}

impl Config {
    /// Reads and validates the config file; every problem is a one-line error (exit 2).
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            config_err(format!(
                "cannot read config {}: {e} (pass --config PATH or set {CONFIG_ENV})",
                path.display()
            ))
        })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> anyhow::Result<Config> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| format!(" line {}", text[..s.start].matches('\n').count() + 1))
                .unwrap_or_default();
            let message = e.message().trim();
            // Name the key whose value was refused, unless the message does.
            let key = e
                .span()
                .and_then(|s| key_at(text, s.start))
                .filter(|k| !message.contains(k.as_str()))
                .map(|k| format!("{k}: "))
                .unwrap_or_default();
            config_err(format!("config {}{line}: {key}{message}", path.display()))
        })?;
        cfg.validate()
            .map_err(|e| config_err(format!("config {}: {e}", path.display())))?;
        Ok(cfg)
    }

    /// Checks across keys of one section; each key's own grammar was
    /// checked when it was read (typed fields, [`VolumeConfig`]).
    fn validate(&self) -> Result<(), String> {
        check_name("backup.name", &self.backup.name)?;
        for (key, p) in [
            ("backup.state_dir", Some(&self.backup.state_dir)),
            ("mysql.socket", self.mysql.socket.as_ref()),
            ("metrics.textfile_dir", self.metrics.textfile_dir.as_ref()),
            (
                "encryption.recipients_file",
                self.encryption.recipients_file.as_ref(),
            ),
            (
                "encryption.identity_file",
                self.encryption.identity_file.as_ref(),
            ),
            ("auth.key_file", self.auth.key_file.as_ref()),
        ] {
            if let Some(p) = p.filter(|p| !p.is_absolute()) {
                return Err(format!(
                    "{key} must be an absolute path, got {}",
                    p.display()
                ));
            }
        }
        if self.binlog.rotate_interval < Duration::from_secs(1) {
            return Err(format!(
                "binlog.rotate_interval must be at least 1s, got {:?}",
                self.binlog.rotate_interval
            ));
        }
        if self.mysql.lock_timeout < Duration::from_millis(100) {
            return Err("mysql.lock_timeout must be at least 100ms".into());
        }
        if self.mysql.max_hold < MIN_MAX_HOLD {
            return Err(format!(
                "mysql.max_hold must be at least {MIN_MAX_HOLD:?} (the snapshot is taken within it), got {:?}",
                self.mysql.max_hold
            ));
        }
        if self.backup.handoff_grace < Duration::from_secs(10) {
            return Err(format!(
                "backup.handoff_grace must be at least 10s (the archiver's time to start), got {:?}",
                self.backup.handoff_grace
            ));
        }
        let most = crate::manifest::MAX_BASES as u32 + 1;
        if self.backup.full_every == 0 || self.backup.full_every > most {
            return Err(format!(
                "backup.full_every must be between 1 (every backup full) and {most}, got {}",
                self.backup.full_every
            ));
        }
        if self.backup.full_every > 1
            && (!self.archive.indexed || self.archive.compression != Compression::Zstd)
        {
            return Err(format!(
                "backup.full_every = {} makes incremental backups, which need indexed archives: set archive.indexed = true with archive.compression = \"zstd\", or backup.full_every = 1",
                self.backup.full_every
            ));
        }
        if self.mysql.password_file.is_some() && self.mysql.defaults_file.is_some() {
            return Err("set mysql.password_file or mysql.defaults_file, not both".into());
        }
        if self.store.concurrency == 0 || self.store.concurrency > 64 {
            return Err("store.concurrency must be between 1 and 64".into());
        }
        if self.store.part_size < ByteSize::mib(5) || self.store.part_size > ByteSize::gib(5) {
            return Err(format!(
                "store.part_size must be between 5MiB and 5GiB (S3's limits), got {}",
                self.store.part_size
            ));
        }
        if self.store.memory_limit < self.store.part_size * 3u64 {
            return Err(format!(
                "store.memory_limit ({}) must hold at least 3 parts of store.part_size ({}): one being filled, one queued, one in flight",
                self.store.memory_limit, self.store.part_size
            ));
        }
        if self.store.max_attempts == 0 {
            return Err("store.max_attempts must be at least 1".into());
        }
        for (key, d) in [
            ("store.connect_timeout", self.store.connect_timeout),
            ("store.read_timeout", self.store.read_timeout),
        ] {
            if d < Duration::from_millis(100) {
                return Err(format!("{key} must be at least 100ms, got {d:?}"));
            }
        }
        for (key, p) in [
            ("drill.scratch_dir", Some(&self.drill.scratch_dir)),
            ("drill.server_binary", self.drill.server_binary.as_ref()),
        ] {
            if let Some(p) = p.filter(|p| !p.is_absolute()) {
                return Err(format!(
                    "{key} must be an absolute path, got {}",
                    p.display()
                ));
            }
        }
        if self.drill.start_timeout < Duration::from_secs(1) {
            return Err(format!(
                "drill.start_timeout must be at least 1s, got {:?}",
                self.drill.start_timeout
            ));
        }
        for opt in &self.drill.server_options {
            check_server_option(opt)?;
        }
        self.validate_s3_options()?;
        for (key, limit) in [
            ("store.upload_rate_limit", self.store.upload_rate_limit),
            ("archive.read_rate_limit", self.archive.read_rate_limit),
        ] {
            if limit.is_some_and(|l| l < MIN_RATE_LIMIT) {
                return Err(format!(
                    "{key} must be at least {MIN_RATE_LIMIT} (bytes per second), got {}",
                    limit.unwrap_or_default()
                ));
            }
        }
        if self.retention.as_ref().is_some_and(|r| r.keeps_nothing()) {
            return Err("[retention] keeps no backup but the newest (every keep_* is 0 and no keep_within): it would delete every other backup; set a keep_* key, or remove the section to keep everything".into());
        }
        Ok(())
    }

    /// The keys only an S3 store has, and how they fit together.
    fn validate_s3_options(&self) -> Result<(), String> {
        let s = &self.store;
        if matches!(s.url, StoreUrl::File { .. }) {
            for (key, set) in [
                ("storage_class", s.storage_class.is_some()),
                ("sse", s.sse.is_some()),
                ("sse_kms_key_id", s.sse_kms_key_id.is_some()),
                ("object_lock_days", s.object_lock_days.is_some()),
                ("object_lock_mode", s.object_lock_mode.is_some()),
                ("checksums", s.checksums != Checksums::Auto),
            ] {
                if set {
                    return Err(format!(
                        "store.{key} applies only to an s3:// store.url, and this store is a directory: remove it"
                    ));
                }
            }
        }
        if s.sse_kms_key_id.is_some() && s.sse != Some(Sse::AwsKms) {
            return Err(
                "store.sse_kms_key_id needs store.sse = \"aws:kms\": set it, or remove the key id"
                    .into(),
            );
        }
        if s.object_lock_mode.is_some() && s.object_lock_days.is_none() {
            return Err("store.object_lock_mode needs store.object_lock_days: set the days, or remove the mode".into());
        }
        if let Some(d) = s.object_lock_days {
            if !(1..=MAX_OBJECT_LOCK_DAYS).contains(&d) {
                return Err(format!(
                    "store.object_lock_days must be between 1 and {MAX_OBJECT_LOCK_DAYS}, got {d}"
                ));
            }
        }
        Ok(())
    }

    /// The compression level in effect.
    pub fn level(&self) -> u32 {
        self.archive
            .level
            .unwrap_or(match self.archive.compression {
                Compression::Xz => 1,
                _ => 3,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[volume]
backend = "btrfs"
mountpoint = "/mnt"
datadir = "/mnt/mysql"
[store]
url = "file:///var/backups/mysnap"
[backup]
name = "db1"
"#;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("/etc/mysnap/mysnap.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.mysql.lock_timeout, Duration::from_secs(5));
        assert_eq!(c.mysql.lock_retries, 3);
        assert_eq!(c.mysql.lock_method, LockMethod::Auto);
        assert_eq!(c.store.part_size, ByteSize::mib(16));
        assert_eq!(c.store.memory_limit, ByteSize::mib(256));
        assert_eq!(c.store.concurrency, 8);
        assert_eq!(c.store.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.store.read_timeout, Duration::from_secs(120));
        assert_eq!(c.archive.compression, Compression::Zstd);
        assert_eq!(c.level(), 3);
        assert_eq!(c.backup.state_dir, PathBuf::from("/var/lib/mysnap"));
        assert_eq!(c.mysql.max_hold, Duration::from_secs(10));
        assert_eq!(c.backup.handoff_grace, Duration::from_secs(600));
        let VolumeBackend::Btrfs(b) = &c.volume.backend else {
            panic!("btrfs")
        };
        assert_eq!(b.snapshot_dir, PathBuf::from("/mnt/.mysnap-snapshots"));
    }

    #[test]
    fn retention_section() {
        assert_eq!(parse(MINIMAL).unwrap().retention, None);
        let c = parse(&format!(
            "{MINIMAL}[retention]\nkeep_daily = 7\nkeep_within = \"14d\"\npin = [\"20261101T000000Z\"]\n"
        ))
        .unwrap();
        let r = c.retention.unwrap();
        assert_eq!(r.keep_daily, 7);
        assert_eq!(r.keep_within, Some(Duration::from_secs(14 * 86400)));
        assert_eq!(r.pin[0], "20261101T000000Z");
        for (bad, why) in [
            ("[retention]\n", "keeps no backup but the newest"),
            (
                "[retention]\nkeep_last = 0\n",
                "keeps no backup but the newest",
            ),
            (
                "[retention]\nkeep_last = 1\npin = [\"2026\"]\n",
                "not a backup id",
            ),
            ("[retention]\nkeep_lats = 1\n", "unknown field"),
        ] {
            let e = parse(&format!("{MINIMAL}{bad}")).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn drill_section() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.drill.scratch_dir, PathBuf::from("/var/tmp"));
        assert_eq!(c.drill.server_binary, None);
        assert_eq!(c.drill.start_timeout, Duration::from_secs(600));
        assert!(c.drill.server_options.is_empty());
        let c = parse(&format!(
            "{MINIMAL}[drill]\nscratch_dir = \"/srv/scratch\"\nserver_binary = \"/opt/mariadb/bin/mariadbd\"\nstart_timeout = \"2m\"\nserver_options = [\"--innodb-data-file-path=ibdata1:64M:autoextend\", \"--innodb_page_size=8k\"]\n"
        ))
        .unwrap();
        assert_eq!(c.drill.scratch_dir, PathBuf::from("/srv/scratch"));
        assert_eq!(c.drill.start_timeout, Duration::from_secs(120));
        assert_eq!(c.drill.server_options.len(), 2);
        for (bad, why) in [
            (
                "scratch_dir = \"tmp\"",
                "drill.scratch_dir must be an absolute path",
            ),
            (
                "server_binary = \"mariadbd\"",
                "drill.server_binary must be an absolute path",
            ),
            ("start_timeout = \"0s\"", "drill.start_timeout"),
            (
                "server_options = [\"innodb-page-size=8k\"]",
                "must start with --",
            ),
            (
                "server_options = [\"--datadir=/var/lib/mysql\"]",
                "sets this option itself",
            ),
            (
                "server_options = [\"--loose-skip_networking=0\"]",
                "sets this option itself",
            ),
            (
                "server_options = [\"--skip-slave-start=0\"]",
                "sets this option itself",
            ),
            (
                "server_options = [\"--wsrep_on=ON\"]",
                "sets this option itself",
            ),
            ("server_options = [\"--a b\"]", "is not an option name"),
            (
                "server_options = [\"--innodb-data-home-dir=/var/lib/mysql\"]",
                "names a path",
            ),
            (
                "server_options = [\"--innodb-data-file-path=/dev/sdb:10Gnewraw\"]",
                "names a path",
            ),
            (
                "server_options = [\"--loose-networking\"]",
                "sets this option itself",
            ),
            (
                "server_options = [\"--log_bin=x\"]",
                "sets this option itself",
            ),
            (
                "server_options = [\"--port=3306\"]",
                "sets this option itself",
            ),
            ("server_options = [\"--x\\n\"]", "control characters"),
            ("scratch = \"/x\"", "unknown field"),
        ] {
            let e = parse(&format!("{MINIMAL}[drill]\n{bad}\n")).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn encryption_and_auth_sections() {
        let c = parse(MINIMAL).unwrap();
        assert!(c.encryption.recipients_file.is_none() && c.auth.key_file.is_none());
        let c = parse(&format!(
            "{MINIMAL}[encryption]\nrecipients_file = \"/etc/mysnap/recipients\"\nidentity_file = \"/etc/mysnap/identity\"\n[auth]\nkey_file = \"/etc/mysnap/auth.key\"\n"
        ))
        .unwrap();
        assert_eq!(c.auth.key_file, Some(PathBuf::from("/etc/mysnap/auth.key")));
        for (bad, why) in [
            (
                "[encryption]\nrecipients_file = \"recipients\"\n",
                "encryption.recipients_file must be an absolute path",
            ),
            (
                "[encryption]\nidentity_file = \"id\"\n",
                "encryption.identity_file must be an absolute path",
            ),
            (
                "[auth]\nkey_file = \"k\"\n",
                "auth.key_file must be an absolute path",
            ),
            ("[auth]\nkey = \"00\"\n", "unknown field `key`"),
            (
                "[encryption]\nidentity = \"x\"\n",
                "unknown field `identity`",
            ),
        ] {
            let e = parse(&format!("{MINIMAL}{bad}")).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn metrics_section() {
        assert_eq!(parse(MINIMAL).unwrap().metrics.textfile_dir, None);
        let c = parse(&format!(
            "{MINIMAL}[metrics]\ntextfile_dir = \"/var/lib/prometheus/node-exporter\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.metrics.textfile_dir,
            Some(PathBuf::from("/var/lib/prometheus/node-exporter"))
        );
        for (bad, why) in [
            (
                "[metrics]\ntextfile_dir = \"node-exporter\"\n",
                "metrics.textfile_dir must be an absolute path",
            ),
            ("[metrics]\ntextfile = \"/x\"\n", "unknown field `textfile`"),
            (
                "[metrics]\ntextfile_dir = 3\n",
                "line 11: metrics.textfile_dir: invalid type",
            ),
        ] {
            let e = parse(&format!("{MINIMAL}{bad}")).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn the_example_drill_section_parses_uncommented() {
        let text = include_str!("../../../deploy/mysnap.example.toml");
        let start = text
            .find("# [drill]")
            .expect("a [drill] section in the example");
        let block: String = text[start..]
            .lines()
            .take_while(|l| l.starts_with("# "))
            .map(|l| format!("{}\n", &l[2..]))
            .collect();
        let c = parse(&format!("{MINIMAL}{block}")).unwrap();
        assert_eq!(
            c.drill.server_binary,
            Some(PathBuf::from("/usr/sbin/mariadbd"))
        );
        assert_eq!(c.drill.start_timeout, Duration::from_secs(600));
        assert_eq!(c.drill.server_options.len(), 1);
    }

    #[test]
    fn contract_example_parses() {
        let text = include_str!("../../../deploy/mysnap.example.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.volume.kind(), Backend::Lvm);
        assert_eq!(c.mysql.stop_command, ["systemctl", "stop", "mariadb"]);
    }

    #[test]
    fn human_sizes_and_durations() {
        let text = MINIMAL.replace(
            "[store]",
            "[store]\npart_size = \"16MiB\"\nread_timeout = \"2s\"\nconnect_timeout = \"500ms\"",
        ) + "[mysql]\nlock_timeout = \"1500ms\"\n";
        let c = parse(&text).unwrap();
        assert_eq!(c.store.part_size, ByteSize::mib(16));
        assert_eq!(c.store.read_timeout, Duration::from_secs(2));
        assert_eq!(c.store.connect_timeout, Duration::from_millis(500));
        assert_eq!(c.mysql.lock_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn max_hold_and_handoff_grace_have_floors() {
        let with = |section: &str, kv: &str| {
            MINIMAL.replace(&format!("[{section}]"), &format!("[{section}]\n{kv}"))
        };
        let mysql = |kv: &str| MINIMAL.to_string() + "[mysql]\n" + kv + "\n";
        let c = parse(&mysql("max_hold = \"2s\"")).unwrap();
        assert_eq!(c.mysql.max_hold, Duration::from_secs(2));
        for bad in ["0s", "500ms"] {
            let err = parse(&mysql(&format!("max_hold = \"{bad}\""))).unwrap_err();
            assert!(err.contains("mysql.max_hold must be at least 1s"), "{err}");
        }
        let c = parse(&with("backup", "handoff_grace = \"30m\"")).unwrap();
        assert_eq!(c.backup.handoff_grace, Duration::from_secs(1800));
        let err = parse(&with("backup", "handoff_grace = \"1s\"")).unwrap_err();
        assert!(
            err.contains("backup.handoff_grace must be at least 10s"),
            "{err}"
        );
    }

    #[test]
    fn memory_limit_must_hold_three_parts() {
        let text = MINIMAL.replace(
            "[store]",
            "[store]\npart_size = \"64MiB\"\nmemory_limit = \"128MiB\"",
        );
        let err = parse(&text).unwrap_err();
        assert!(err.contains("store.memory_limit"), "{err}");
    }

    #[test]
    fn sdk_checksums_are_off_only_for_other_s3_stores_without_object_lock() {
        let s3 = |extra: &str| {
            let text = MINIMAL.replace(
                "url = \"file:///var/backups/mysnap\"",
                &format!("url = \"s3://bucket/p\"\n{extra}"),
            );
            parse(&text).map(|c| c.store.sdk_checksums())
        };
        assert_eq!(s3(""), Ok(true), "AWS itself");
        let path_style = |extra: &str| {
            let text = MINIMAL.replace(
                "url = \"file:///var/backups/mysnap\"",
                &format!("url = \"s3://bucket/p\"\n{extra}"),
            );
            parse(&text).unwrap().store.path_style()
        };
        assert!(!path_style(""), "AWS: virtual-hosted");
        assert!(path_style("endpoint = \"http://minio:9000\""));
        assert!(!path_style(
            "endpoint = \"http://minio:9000\"\nforce_path_style = false"
        ));
        assert_eq!(s3("endpoint = \"http://minio:9000\""), Ok(false));
        assert_eq!(
            s3("endpoint = \"http://minio:9000\"\nobject_lock_days = 7"),
            Ok(true)
        );
        assert_eq!(
            s3("endpoint = \"http://minio:9000\"\nchecksums = \"when_supported\""),
            Ok(true)
        );
        assert_eq!(s3("checksums = \"when_required\""), Ok(false));
        let err = s3("checksums = \"always\"").unwrap_err();
        assert!(err.contains("checksums"), "{err}");
        let err = parse(&MINIMAL.replace("[store]", "[store]\nchecksums = \"when_required\""))
            .unwrap_err();
        assert!(
            err.contains("store.checksums applies only to an s3://"),
            "{err}"
        );
    }

    #[test]
    fn lock_methods() {
        for (v, m) in [
            ("auto", LockMethod::Auto),
            ("ftwrl", LockMethod::Ftwrl),
            ("backup_stage", LockMethod::BackupStage),
        ] {
            let c = parse(&format!("{MINIMAL}[mysql]\nlock_method = \"{v}\"\n")).unwrap();
            assert_eq!(c.mysql.lock_method, m);
            assert_eq!(m.as_str(), v);
        }
        let err = parse(&format!(
            "{MINIMAL}[mysql]\nlock_method = \"backup-stage\"\n"
        ))
        .unwrap_err();
        assert!(err.contains("backup_stage"), "{err}");
    }

    #[test]
    fn s3_write_options() {
        let s3 = |kv: &str| {
            MINIMAL.replace(
                "url = \"file:///var/backups/mysnap\"",
                &format!("url = \"s3://bucket/p\"\n{kv}"),
            )
        };
        let c = parse(&s3("storage_class = \"GLACIER_IR\"\nsse = \"aws:kms\"\nsse_kms_key_id = \"arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab\"\nobject_lock_days = 30")).unwrap();
        assert_eq!(c.store.storage_class.unwrap().as_str(), "GLACIER_IR");
        assert_eq!(c.store.sse, Some(Sse::AwsKms));
        assert_eq!(
            c.store.object_lock(),
            Some((ObjectLockMode::Governance, 30))
        );
        let c = parse(&s3(
            "sse = \"AES256\"\nobject_lock_days = 7\nobject_lock_mode = \"COMPLIANCE\"",
        ))
        .unwrap();
        assert_eq!(c.store.sse, Some(Sse::Aes256));
        assert_eq!(c.store.object_lock(), Some((ObjectLockMode::Compliance, 7)));
        let none = parse(MINIMAL).unwrap();
        assert_eq!(none.store.object_lock(), None);
        assert_eq!(none.store.storage_class, None);
        for (kv, needle) in [
            (
                "storage_class = \"standard_ia\"",
                "store.storage_class \"standard_ia\" is not",
            ),
            (
                "storage_class = \"GLACIER\"",
                "store.storage_class \"GLACIER\" is refused",
            ),
            ("storage_class = \"DEEP_ARCHIVE\"", "RestoreObject"),
            ("sse = \"aes256\"", "store.sse"),
            (
                "sse = \"AES256\"\nsse_kms_key_id = \"k\"",
                "store.sse_kms_key_id needs",
            ),
            (
                "sse = \"aws:kms\"\nsse_kms_key_id = \"a b\"",
                "store.sse_kms_key_id must be",
            ),
            (
                "object_lock_mode = \"COMPLIANCE\"",
                "store.object_lock_mode needs",
            ),
            (
                "object_lock_days = 7\nobject_lock_mode = \"compliance\"",
                "COMPLIANCE",
            ),
            (
                "object_lock_days = 0",
                "store.object_lock_days must be between 1",
            ),
            ("object_lock_days = -1", "object_lock_days"),
            (
                "upload_rate_limit = \"100KiB\"",
                "store.upload_rate_limit must be at least",
            ),
        ] {
            let e = parse(&s3(kv)).unwrap_err();
            assert!(e.contains(needle), "{kv}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        // The key id is not repeated in errors.
        let e = parse(&s3(
            "sse = \"AES256\"\nsse_kms_key_id = \"alias/secretish\"",
        ))
        .unwrap_err();
        assert!(!e.contains("secretish"), "{e}");
        // A directory store refuses the S3-only keys.
        for kv in [
            "storage_class = \"STANDARD\"",
            "sse = \"AES256\"",
            "object_lock_days = 3",
        ] {
            let text = MINIMAL.replace("[store]", &format!("[store]\n{kv}"));
            let e = parse(&text).unwrap_err();
            assert!(
                e.contains("applies only to an s3:// store.url"),
                "{kv}: {e}"
            );
        }
    }

    #[test]
    fn rate_limits() {
        let text = MINIMAL.replace("[store]", "[store]\nupload_rate_limit = \"50MiB\"")
            + "[archive]\nread_rate_limit = \"20MB\"\n";
        let c = parse(&text).unwrap();
        assert_eq!(c.store.upload_rate_limit, Some(ByteSize::mib(50)));
        assert_eq!(c.archive.read_rate_limit, Some(ByteSize::mb(20)));
        let e = parse(&(MINIMAL.to_string() + "[archive]\nread_rate_limit = \"0\"\n")).unwrap_err();
        assert!(
            e.contains("archive.read_rate_limit must be at least"),
            "{e}"
        );
        let e =
            parse(&(MINIMAL.to_string() + "[archive]\nread_rate_limit = \"fast\"\n")).unwrap_err();
        assert!(e.contains("read_rate_limit"), "{e}");
    }

    #[test]
    fn unknown_key_names_key_file_and_line() {
        let err = parse(&MINIMAL.replace("[backup]", "[backup]\nnmae = \"x\"")).unwrap_err();
        assert!(err.contains("nmae"), "{err}");
        assert!(err.contains("/etc/mysnap/mysnap.toml line 9"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn bad_values_are_refused() {
        for (from, to, needle) in [
            ("name = \"db1\"", "name = \"../x\"", "backup.name"),
            (
                "datadir = \"/mnt/mysql\"",
                "datadir = \"/srv/mysql\"",
                "not under volume.mountpoint",
            ),
            ("file:///var", "ftp:///var", "store.url"),
            ("backend = \"btrfs\"", "backend = \"lvm\"", "volume.vg"),
            (
                "backend = \"btrfs\"",
                "backend = \"lvm\"\nvg = \"v\"\nlv = \"l\"\nsnapshot_size = \"lots\"",
                "volume.snapshot_size",
            ),
            (
                "datadir = \"/mnt/mysql\"",
                "datadir = \"/mnt\"",
                "volume.snapshot_dir",
            ),
            // A backend's keys exist only for it.
            (
                "backend = \"btrfs\"",
                "backend = \"btrfs\"\nvg = \"v\"",
                "volume.vg is not a key of backend = \"btrfs\"",
            ),
            (
                "backend = \"btrfs\"",
                "backend = \"lvm\"\nvg = \"v\"\nlv = \"l\"\nsnapshot_dir = \"/mnt/s\"",
                "volume.snapshot_dir is not a key of backend = \"lvm\"",
            ),
            (
                "backend = \"btrfs\"",
                "backend = \"lvm\"\nvg = \"v g\"\nlv = \"l\"",
                "volume.vg",
            ),
            ("mountpoint = \"/mnt\"", "mountpoint = \"mnt\"", "absolute"),
        ] {
            let err = parse(&MINIMAL.replace(from, to)).unwrap_err();
            assert!(err.contains(needle), "{to}: {err}");
        }
    }
}
