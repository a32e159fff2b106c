//! The store's key layout, in one place. Keys are relative to the store's
//! prefix (`store.url`):
//!
//! ```text
//! <backup.name>/<backup id>/data.tar.zst | data.tar.xz | data.tar   the archive, written first
//! <backup.name>/<backup id>/manifest.toml                            written last: the backup exists
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
    format!("{name}/{id}/{}", compression.file_name())
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
}
