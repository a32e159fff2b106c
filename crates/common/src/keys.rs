//! The store's key layout, in one place. Keys are relative to the store's
//! prefix (`store.url`):
//!
//! ```text
//! <backup.name>/<backup id>/data.tar.zst | data.tar.xz | data.tar   the archive, written first
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
    format!("{name}/{id}/{}", compression.file_name())
}

/// The record of a restore drill of backup `id` that started at `at` (a
/// UTC time in the form of a backup id).
pub fn drill(name: &BackupName, id: &BackupId, at: &BackupId) -> String {
    format!("{name}/{id}/{DRILL_PREFIX}{at}{DRILL_SUFFIX}")
}

const DRILL_PREFIX: &str = "drill-";
const DRILL_SUFFIX: &str = ".toml";

/// What a key of the layout names, below its backup's `<name>/<id>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Manifest,
    /// The archive, in the compression its file name says.
    Archive(Compression),
    /// A drill record, with the drill's start.
    Drill(BackupId),
}

/// A key of the layout, parsed: `<name>/<id>/<object>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub name: BackupName,
    pub id: BackupId,
    pub object: Object,
}

/// Parses a listed key; `None` for every key outside the layout (a name or
/// id that does not parse, another depth, another file name).
pub fn parse(key: &str) -> Option<Key> {
    let (name, rest) = key.split_once('/')?;
    let (id, file) = rest.split_once('/')?;
    let object = match file {
        MANIFEST_FILE => Object::Manifest,
        _ => match [Compression::Zstd, Compression::Xz, Compression::None]
            .into_iter()
            .find(|c| c.file_name() == file)
        {
            Some(c) => Object::Archive(c),
            None => Object::Drill(
                BackupId::parse(
                    file.strip_prefix(DRILL_PREFIX)?
                        .strip_suffix(DRILL_SUFFIX)?,
                )
                .ok()?,
            ),
        },
    };
    Some(Key {
        name: BackupName::parse(name).ok()?,
        id: BackupId::parse(id).ok()?,
        object,
    })
}

/// [`parse`], for a key of `name` only.
fn parse_of(name: &BackupName, key: &str) -> Option<(BackupId, Object)> {
    parse(key)
        .filter(|k| k.name == *name)
        .map(|k| (k.id, k.object))
}

/// The backup id and drill time of a drill record key of `name`
/// (`<name>/<id>/drill-<time>.toml`); `None` for every other key.
pub fn drill_of(name: &BackupName, key: &str) -> Option<(BackupId, BackupId)> {
    match parse_of(name, key)? {
        (id, Object::Drill(at)) => Some((id, at)),
        _ => None,
    }
}

/// The backup id of a manifest key of `name` (`<name>/<id>/manifest.toml`);
/// `None` for every other key.
pub fn manifest_id(name: &BackupName, key: &str) -> Option<BackupId> {
    match parse_of(name, key)? {
        (id, Object::Manifest) => Some(id),
        _ => None,
    }
}

/// The backup id and compression of an archive key of `name`
/// (`<name>/<id>/data.tar[.zst|.xz]`); `None` for every other key.
pub fn archive_of(name: &BackupName, key: &str) -> Option<(BackupId, Compression)> {
    match parse_of(name, key)? {
        (id, Object::Archive(c)) => Some((id, c)),
        _ => None,
    }
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

    #[test]
    fn archives() {
        let (n, id): (BackupName, BackupId) = (v("db1"), v("20261126T093000Z"));
        for c in [Compression::Zstd, Compression::Xz, Compression::None] {
            let key = archive(&n, &id, c);
            assert_eq!(archive_of(&n, &key), Some((id.clone(), c)), "{key}");
            assert_eq!(manifest_id(&n, &key), None);
            assert_eq!(drill_of(&n, &key), None);
        }
        for other in [
            "db1/20261126T093000Z/manifest.toml",
            "db1/20261126T093000Z/drill-20261128T220500Z.toml",
            "db1-x/20261126T093000Z/data.tar.zst",
            "db10/20261126T093000Z/data.tar.zst",
            "db1/20261126T093000Z/data.tar.zst.bak",
            "db1/20261126T093000Z/data.tar.gz",
            "db1/20261126T093000Z/x/data.tar.zst",
            "db1/2026/data.tar.zst",
            "db1/data.tar.zst",
            "../20261126T093000Z/data.tar.zst",
        ] {
            assert_eq!(archive_of(&n, other), None, "{other}");
        }
        assert_eq!(
            parse("db2/20261126T093000Z/data.tar.xz"),
            Some(Key {
                name: v("db2"),
                id,
                object: Object::Archive(Compression::Xz)
            })
        );
    }
}
