//! The store's key layout, in one place. Keys are relative to the store's
//! prefix (`store.url`):
//!
//! ```text
//! <backup.name>/<backup id>/data.tar.zst | data.tar.xz | data.tar   the archive, written first
//!                                  (+ `.age` when encrypted: data.tar.zst.age, ...)
//! <backup.name>/<backup id>/manifest.toml.mac                        its HMAC, before the manifest ([auth])
//! <backup.name>/<backup id>/manifest.toml                            written last: the backup exists
//! <backup.name>/<backup id>/drill-<time>.toml                        a restore drill's result (`restorer drill`)
//! ```

use crate::config::Compression;
use crate::ids::{BackupId, BackupName};

/// The manifest's file name, in the store and in the state directory.
pub const MANIFEST_FILE: &str = "manifest.toml";

/// The prefix under which every backup of `name` lives.
pub fn backups_of(name: &BackupName) -> String {
    format!("{name}/")
}

pub fn manifest(name: &BackupName, id: &BackupId) -> String {
    format!("{name}/{id}/{MANIFEST_FILE}")
}

pub fn archive(name: &BackupName, id: &BackupId, compression: Compression) -> String {
    archive_of(name, id, compression, false)
}

/// The suffix of an encrypted archive's key (an age file).
pub const ENCRYPTED_SUFFIX: &str = ".age";

/// The archive's key, `encrypted` or not: `data.tar.zst` or `data.tar.zst.age`.
pub fn archive_of(
    name: &BackupName,
    id: &BackupId,
    compression: Compression,
    encrypted: bool,
) -> String {
    let suffix = if encrypted { ENCRYPTED_SUFFIX } else { "" };
    format!("{name}/{id}/{}{suffix}", compression.file_name())
}

/// Every key an archive of backup `id` may have (each codec, encrypted or not).
pub fn archives(name: &BackupName, id: &BackupId) -> Vec<String> {
    [Compression::Zstd, Compression::Xz, Compression::None]
        .into_iter()
        .flat_map(|c| [false, true].map(|e| archive_of(name, id, c, e)))
        .collect()
}

/// The manifest's MAC (`[auth]`): stored before the manifest.
pub fn manifest_mac(name: &BackupName, id: &BackupId) -> String {
    format!("{}{MAC_SUFFIX}", manifest(name, id))
}

const MAC_SUFFIX: &str = ".mac";

/// The record of a restore drill of backup `id` that started at `at` (a
/// UTC time in the form of a backup id).
pub fn drill(name: &BackupName, id: &BackupId, at: &BackupId) -> String {
    format!("{name}/{id}/{DRILL_PREFIX}{at}{DRILL_SUFFIX}")
}

const DRILL_PREFIX: &str = "drill-";
const DRILL_SUFFIX: &str = ".toml";

/// The backup id and drill time of a drill record key of `name`
/// (`<name>/<id>/drill-<time>.toml`); `None` for every other key.
pub fn drill_of(name: &BackupName, key: &str) -> Option<(BackupId, BackupId)> {
    let rest = key.strip_prefix(name.as_str())?.strip_prefix('/')?;
    let (id, file) = rest.split_once('/')?;
    let at = file
        .strip_prefix(DRILL_PREFIX)?
        .strip_suffix(DRILL_SUFFIX)?;
    Some((BackupId::parse(id).ok()?, BackupId::parse(at).ok()?))
}

/// The backup id of a manifest key of `name` (`<name>/<id>/manifest.toml`);
/// `None` for every other key.
pub fn manifest_id(name: &BackupName, key: &str) -> Option<BackupId> {
    let rest = key.strip_prefix(name.as_str())?.strip_prefix('/')?;
    let id = rest.strip_suffix(MANIFEST_FILE)?.strip_suffix('/')?;
    BackupId::parse(id).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::tests::v;

    #[test]
    fn layout() {
        let (n, id): (BackupName, BackupId) = (v("db1"), v("20261126T093000Z"));
        assert_eq!(manifest(&n, &id), "db1/20261126T093000Z/manifest.toml");
        assert_eq!(
            archive(&n, &id, Compression::Xz),
            "db1/20261126T093000Z/data.tar.xz"
        );
        assert_eq!(
            archive_of(&n, &id, Compression::Zstd, true),
            "db1/20261126T093000Z/data.tar.zst.age"
        );
        assert_eq!(archives(&n, &id).len(), 6);
        assert_eq!(
            manifest_mac(&n, &id),
            "db1/20261126T093000Z/manifest.toml.mac"
        );
        assert_eq!(manifest_id(&n, &manifest_mac(&n, &id)), None);
        assert_eq!(manifest_id(&n, &manifest(&n, &id)), Some(id));
        for other in [
            "db1/20261126T093000Z/data.tar.zst",
            "db1-x/20261126T093000Z/manifest.toml",
            "db1/x/20261126T093000Z/manifest.toml",
            "db1/2026/manifest.toml",
            "db1/20261126T093000Z/manifest.toml.bak",
        ] {
            assert_eq!(manifest_id(&n, other), None, "{other}");
        }
    }

    #[test]
    fn drill_records() {
        let (n, id, at): (BackupName, BackupId, BackupId) =
            (v("db1"), v("20261126T093000Z"), v("20261128T220500Z"));
        let key = drill(&n, &id, &at);
        assert_eq!(key, "db1/20261126T093000Z/drill-20261128T220500Z.toml");
        assert_eq!(drill_of(&n, &key), Some((id.clone(), at)));
        assert_eq!(manifest_id(&n, &key), None);
        for other in [
            "db1/20261126T093000Z/manifest.toml",
            "db1/20261126T093000Z/data.tar.zst",
            "db1-x/20261126T093000Z/drill-20261128T220500Z.toml",
            "db1/20261126T093000Z/drill-20261128T220500Z.toml.bak",
            "db1/20261126T093000Z/drill-x.toml",
            "db1/20261126T093000Z/x/drill-20261128T220500Z.toml",
            "db1/x/drill-20261128T220500Z.toml",
        ] {
            assert_eq!(drill_of(&n, other), None, "{other}");
        }
    }
}
