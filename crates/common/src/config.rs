//! The one TOML configuration file (README, "Configuration"). Unknown keys are an error
//! that names the key and the file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use crate::error::config_err;

/// Where the config is read from when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/mysnap/mysnap.toml";
pub const CONFIG_ENV: &str = "MYSNAP_CONFIG";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub mysql: MysqlConfig,
    pub volume: VolumeConfig,
    pub store: StoreConfig,
    #[serde(default)]
    pub archive: ArchiveConfig,
    pub backup: BackupConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
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
    #[serde(default)]
    pub stop_command: Vec<String>,
    #[serde(default)]
    pub start_command: Vec<String>,
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
            stop_command: Vec::new(),
            start_command: Vec::new(),
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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub backend: Backend,
    /// Block device(s) for volprep: one path or a list.
    #[serde(default)]
    pub device: Option<Devices>,
    pub vg: Option<String>,
    pub lv: Option<String>,
    /// lvm: where the LV is mounted; btrfs: the subvolume that is snapshotted.
    pub mountpoint: PathBuf,
    #[serde(default = "default_fs")]
    pub filesystem: Filesystem,
    #[serde(default = "default_reserve")]
    pub snapshot_reserve_percent: u8,
    /// Where the data directory lives (volprep creates it, restorer restores into it).
    pub datadir: PathBuf,
    /// Owner of restored files (default: the `mysql` user where it exists).
    pub owner: Option<String>,
    /// btrfs: where read-only snapshots are created (default `<mountpoint>/.mysnap-snapshots`).
    pub snapshot_dir: Option<PathBuf>,
    /// lvm: the snapshot's copy-on-write size: a size ("10GiB") or a share of the
    /// VG's free space ("50%FREE"); default all free extents ("100%FREE").
    pub snapshot_size: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Devices {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `s3://bucket/prefix` or `file:///dir`.
    pub url: String,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    #[serde(default)]
    pub force_path_style: bool,
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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveConfig {
    #[serde(default = "default_compression")]
    pub compression: Compression,
    /// Compression level (zstd 1-19, xz 0-9); default 3 for zstd and 1 for xz.
    pub level: Option<u32>,
    /// Compression threads; 0 = all cores.
    #[serde(default)]
    pub threads: u32,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            compression: default_compression(),
            level: None,
            threads: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    /// Namespace of this server's backups in the store.
    pub name: String,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
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
fn default_fs() -> Filesystem {
    Filesystem::Xfs
}
fn default_reserve() -> u8 {
    20
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
fn default_compression() -> Compression {
    Compression::Zstd
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
            config_err(format!(
                "config {}{line}: {}",
                path.display(),
                e.message().trim()
            ))
        })?;
        cfg.validate()
            .map_err(|e| config_err(format!("config {}: {e}", path.display())))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        check_name("backup.name", &self.backup.name)?;
        for (key, p) in [
            ("volume.mountpoint", Some(&self.volume.mountpoint)),
            ("volume.datadir", Some(&self.volume.datadir)),
            ("backup.state_dir", Some(&self.backup.state_dir)),
            ("volume.snapshot_dir", self.volume.snapshot_dir.as_ref()),
            ("mysql.socket", self.mysql.socket.as_ref()),
        ] {
            if let Some(p) = p {
                if !p.is_absolute() {
                    return Err(format!(
                        "{key} must be an absolute path, got {}",
                        p.display()
                    ));
                }
            }
        }
        if !self.volume.datadir.starts_with(&self.volume.mountpoint) {
            return Err(format!(
                "volume.datadir {} is not under volume.mountpoint {}",
                self.volume.datadir.display(),
                self.volume.mountpoint.display()
            ));
        }
        if self.volume.backend == Backend::Lvm {
            let vg = self
                .volume
                .vg
                .as_deref()
                .ok_or("volume.vg is required with backend = \"lvm\"")?;
            let lv = self
                .volume
                .lv
                .as_deref()
                .ok_or("volume.lv is required with backend = \"lvm\"")?;
            check_name("volume.vg", vg)?;
            check_name("volume.lv", lv)?;
            if let Some(size) = &self.volume.snapshot_size {
                crate::snapshot::SnapshotSize::parse(size)
                    .map_err(|e| format!("volume.snapshot_size: {e}"))?;
            }
        }
        if self.volume.backend == Backend::Btrfs
            && self.snapshot_dir().starts_with(&self.volume.datadir)
        {
            return Err(format!(
                "the snapshot directory {} is inside volume.datadir; set volume.snapshot_dir to a directory on the same btrfs volume outside the data directory",
                self.snapshot_dir().display()
            ));
        }
        if !(1..=90).contains(&self.volume.snapshot_reserve_percent) {
            return Err("volume.snapshot_reserve_percent must be between 1 and 90".into());
        }
        if self.mysql.lock_timeout < Duration::from_millis(100) {
            return Err("mysql.lock_timeout must be at least 100ms".into());
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
        crate::store::StoreUrl::parse(&self.store.url).map_err(|e| format!("store.url: {e}"))?;
        Ok(())
    }

    /// Where btrfs snapshots are created.
    pub fn snapshot_dir(&self) -> PathBuf {
        self.volume
            .snapshot_dir
            .clone()
            .unwrap_or_else(|| self.volume.mountpoint.join(".mysnap-snapshots"))
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

/// Names that reach argv or store keys: letters, digits, `_`, `-`, `.`, `+`; not
/// starting with `-` or `.`.
pub fn check_name(key: &str, value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 127
        && !value.starts_with(['-', '.'])
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.+".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{key} = {value:?} is not a valid name (use letters, digits, '_', '-', '.', '+'; not starting with '-' or '.')"
        ))
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
        assert_eq!(c.archive.compression, Compression::Zstd);
        assert_eq!(c.level(), 3);
        assert_eq!(c.backup.state_dir, PathBuf::from("/var/lib/mysnap"));
        assert_eq!(c.snapshot_dir(), PathBuf::from("/mnt/.mysnap-snapshots"));
    }

    #[test]
    fn contract_example_parses() {
        let text = include_str!("../../../deploy/mysnap.example.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.volume.backend, Backend::Lvm);
        assert_eq!(c.mysql.stop_command, ["systemctl", "stop", "mariadb"]);
    }

    #[test]
    fn human_sizes_and_durations() {
        let text = MINIMAL.replace("[store]", "[store]\npart_size = \"16MiB\"")
            + "[mysql]\nlock_timeout = \"1500ms\"\n";
        let c = parse(&text).unwrap();
        assert_eq!(c.store.part_size, ByteSize::mib(16));
        assert_eq!(c.mysql.lock_timeout, Duration::from_millis(1500));
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
        ] {
            let err = parse(&MINIMAL.replace(from, to)).unwrap_err();
            assert!(err.contains(needle), "{to}: {err}");
        }
    }
}
