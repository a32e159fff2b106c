//! The store's key layout, in one place. Keys are relative to the store's
//! prefix (`store.url`):
//!
//! ```text
//! <backup.name>/<backup id>/data.tar.zst | data.tar.xz | data.tar   the archive, written first
//!                                  (+ `.age` when encrypted: data.tar.zst.age, ...)
//! <backup.name>/<backup id>/index.json.zst                          format 3: the frame index, after the archive
//! <backup.name>/<backup id>/manifest.toml.mac                        its HMAC, before the manifest ([auth])
//! <backup.name>/<backup id>/manifest.toml                            written last: the backup exists
//! <backup.name>/<backup id>/drill-<time>.toml                        a restore drill's result (`restorer drill`)
//! <backup.name>/binlogs/<server_id>/<file>-<created>/binlog.zst       a binary log, zstd (`archiver binlogs`), written first
//! <backup.name>/binlogs/<server_id>/<file>-<created>/meta.toml        its metadata, written last: the segment exists
//! ```
//!
//! A binary log segment is keyed by the server's `server_id`, the file's
//! name and its creation time (from its Format_description event, UTC
//! seconds as a backup id): names repeat across servers, and a restored
//! server continues the old numbering, but never with the same creation
//! time, so no archive overwrites another's.

use crate::config::Compression;
use crate::ids::{BackupId, BackupName, BinlogFile};

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
    archive_key(name, id, compression, false)
}

/// The suffix of an encrypted archive's key (an age file).
pub const ENCRYPTED_SUFFIX: &str = ".age";

/// The archive's key, `encrypted` or not: `data.tar.zst` or `data.tar.zst.age`.
pub fn archive_key(
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
        .flat_map(|c| [false, true].map(|e| archive_key(name, id, c, e)))
        .collect()
}

/// The frame index's file name (format 3: an archive of independent zstd frames).
pub const INDEX_FILE: &str = "index.json.zst";

/// The frame index of backup `id` (`index.json.zst`, `.age` when its
/// archive is `encrypted`): stored after the archive, before the manifest.
pub fn index(name: &BackupName, id: &BackupId, encrypted: bool) -> String {
    let suffix = if encrypted { ENCRYPTED_SUFFIX } else { "" };
    format!("{name}/{id}/{INDEX_FILE}{suffix}")
}

/// Every key an index of backup `id` may have.
pub fn indexes(name: &BackupName, id: &BackupId) -> [String; 2] {
    [false, true].map(|e| index(name, id, e))
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

/// What a key of the layout names, below its backup's `<name>/<id>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Manifest,
    /// The manifest's MAC (`manifest.toml.mac`).
    ManifestMac,
    /// The archive, in the compression its file name says, encrypted when
    /// it ends in `.age`.
    Archive {
        compression: Compression,
        encrypted: bool,
    },
    /// The frame index of an indexed archive (`index.json.zst`, `.age`
    /// when encrypted).
    Index,
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
    let mac = format!("{MANIFEST_FILE}{MAC_SUFFIX}");
    let (plain, encrypted) = match file.strip_suffix(ENCRYPTED_SUFFIX) {
        Some(plain) => (plain, true),
        None => (file, false),
    };
    let compression = [Compression::Zstd, Compression::Xz, Compression::None]
        .into_iter()
        .find(|c| c.file_name() == plain);
    let object = match (file, compression) {
        (MANIFEST_FILE, _) => Object::Manifest,
        (f, _) if f == mac => Object::ManifestMac,
        _ if plain == INDEX_FILE => Object::Index,
        (_, Some(compression)) => Object::Archive {
            compression,
            encrypted,
        },
        (_, None) => Object::Drill(
            BackupId::parse(
                file.strip_prefix(DRILL_PREFIX)?
                    .strip_suffix(DRILL_SUFFIX)?,
            )
            .ok()?,
        ),
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
/// (`<name>/<id>/data.tar[.zst|.xz][.age]`); `None` for every other key.
pub fn archive_of(name: &BackupName, key: &str) -> Option<(BackupId, Compression)> {
    match parse_of(name, key)? {
        (id, Object::Archive { compression, .. }) => Some((id, compression)),
        _ => None,
    }
}

/// The backup id of an index key of `name` (`<name>/<id>/index.json.zst`);
/// `None` for every other key.
pub fn index_of(name: &BackupName, key: &str) -> Option<BackupId> {
    match parse_of(name, key)? {
        (id, Object::Index) => Some(id),
        _ => None,
    }
}

/// The component under `<backup.name>/` that holds binary logs; never a
/// backup id, so listings of backups skip it.
pub const BINLOGS_DIR: &str = "binlogs";
/// The stored binary log's file name in its segment (always zstd).
pub const BINLOG_DATA_FILE: &str = "binlog.zst";
/// The segment's metadata file name.
pub const BINLOG_META_FILE: &str = "meta.toml";

/// The prefix of every archived binary log of `name`.
pub fn binlogs_of(name: &BackupName) -> String {
    format!("{name}/{BINLOGS_DIR}/")
}

/// The prefix of the archived binary logs of server `server_id`.
pub fn binlogs_of_server(name: &BackupName, server_id: u64) -> String {
    format!("{name}/{BINLOGS_DIR}/{server_id}/")
}

/// One segment: a binary log file of a server, created at `created`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId {
    pub server_id: u64,
    pub file: BinlogFile,
    pub created: BackupId,
}

/// Which object of a segment a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentPart {
    Data,
    Meta,
    /// The metadata's MAC (`[auth]`).
    Mac,
}

impl SegmentId {
    fn dir(&self, name: &BackupName) -> String {
        format!(
            "{}{}-{}/",
            binlogs_of_server(name, self.server_id),
            self.file,
            self.created
        )
    }
    /// The stored binary log (zstd), written first.
    pub fn data_key(&self, name: &BackupName) -> String {
        format!("{}{BINLOG_DATA_FILE}", self.dir(name))
    }
    /// The segment's metadata, written last.
    pub fn meta_key(&self, name: &BackupName) -> String {
        format!("{}{BINLOG_META_FILE}", self.dir(name))
    }
    /// The metadata's MAC (`[auth]`), written before the metadata.
    pub fn mac_key(&self, name: &BackupName) -> String {
        format!("{}{MAC_SUFFIX}", self.meta_key(name))
    }
}

/// The segment and part a listed key of `name` names; `None` for every
/// other key (and for names that do not parse: a file that is not a
/// binary log name, a time that is not one).
pub fn segment_of(name: &BackupName, key: &str) -> Option<(SegmentId, SegmentPart)> {
    let rest = key.strip_prefix(&binlogs_of(name))?;
    let mut parts = rest.split('/');
    let (sid, seg, file) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || sid.is_empty() || !sid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let server_id: u64 = sid.parse().ok()?;
    if server_id.to_string() != sid {
        return None;
    }
    let part = match file {
        BINLOG_DATA_FILE => SegmentPart::Data,
        BINLOG_META_FILE => SegmentPart::Meta,
        f if f.strip_prefix(BINLOG_META_FILE) == Some(MAC_SUFFIX) => SegmentPart::Mac,
        _ => return None,
    };
    // The creation time is the last 16 bytes, after a '-'.
    let cut = seg.len().checked_sub(17)?;
    if !seg.is_char_boundary(cut) || seg.as_bytes()[cut] != b'-' {
        return None;
    }
    let file = BinlogFile::parse(&seg[..cut]).ok()?;
    let created = BackupId::parse(&seg[cut + 1..]).ok()?;
    Some((
        SegmentId {
            server_id,
            file,
            created,
        },
        part,
    ))
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
            archive_key(&n, &id, Compression::Zstd, true),
            "db1/20261126T093000Z/data.tar.zst.age"
        );
        assert_eq!(super::archives(&n, &id).len(), 6);
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
    fn index_key() {
        let (n, id): (BackupName, BackupId) = (v("db1"), v("20261126T093000Z"));
        let key = index(&n, &id, false);
        assert_eq!(key, "db1/20261126T093000Z/index.json.zst");
        let sealed = index(&n, &id, true);
        assert_eq!(sealed, "db1/20261126T093000Z/index.json.zst.age");
        assert_eq!(indexes(&n, &id), [key.clone(), sealed.clone()]);
        for key in [&key, &sealed] {
            assert_eq!(index_of(&n, key), Some(id.clone()));
            assert_eq!(parse(key).map(|k| k.object), Some(Object::Index));
            assert_eq!(manifest_id(&n, key), None);
            assert_eq!(archive_of(&n, key), None);
        }
        for other in [
            "db1/20261126T093000Z/index.json",
            "db1-x/20261126T093000Z/index.json.zst",
            "db1/20261126T093000Z/index.json.age",
        ] {
            assert_eq!(index_of(&n, other), None, "{other}");
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
                object: Object::Archive {
                    compression: Compression::Xz,
                    encrypted: false
                }
            })
        );
        for key in super::archives(&n, &v("20261126T093000Z")) {
            let encrypted = key.ends_with(".age");
            assert!(
                matches!(parse(&key), Some(Key { object: Object::Archive { encrypted: e, .. }, .. }) if e == encrypted),
                "{key}"
            );
        }
        assert_eq!(
            parse("db1/20261126T093000Z/manifest.toml.mac").map(|k| k.object),
            Some(Object::ManifestMac)
        );
        for other in [
            "db1/20261126T093000Z/data.tar.zst.age.age",
            "db1/20261126T093000Z/manifest.toml.age",
            "db1/20261126T093000Z/drill-20261128T220500Z.toml.age",
        ] {
            assert_eq!(parse(other), None, "{other}");
        }
    }

    #[test]
    fn binlog_segments() {
        let n: BackupName = v("db1");
        let seg = SegmentId {
            server_id: 7,
            file: v("binlog.000042"),
            created: v("20261128T101500Z"),
        };
        let data = seg.data_key(&n);
        let meta = seg.meta_key(&n);
        assert_eq!(
            data,
            "db1/binlogs/7/binlog.000042-20261128T101500Z/binlog.zst"
        );
        assert_eq!(
            meta,
            "db1/binlogs/7/binlog.000042-20261128T101500Z/meta.toml"
        );
        assert_eq!(
            segment_of(&n, &data),
            Some((seg.clone(), SegmentPart::Data))
        );
        assert_eq!(
            segment_of(&n, &meta),
            Some((seg.clone(), SegmentPart::Meta))
        );
        assert_eq!(
            segment_of(&n, &seg.mac_key(&n)),
            Some((seg.clone(), SegmentPart::Mac))
        );
        // A file name with dashes of its own.
        let dashed = SegmentId {
            file: v("my-bin-1.000001"),
            ..seg.clone()
        };
        assert_eq!(
            segment_of(&n, &dashed.meta_key(&n)),
            Some((dashed, SegmentPart::Meta))
        );
        // Not a backup's manifest, nor a drill record.
        assert_eq!(manifest_id(&n, &meta), None);
        assert_eq!(drill_of(&n, &meta), None);
        for other in [
            "db1/binlogs/7/binlog.000042-20261128T101500Z/meta.toml.bak",
            "db1/binlogs/7/binlog.000042-20261128T101500Z/x/meta.toml",
            "db1/binlogs/07/binlog.000042-20261128T101500Z/meta.toml",
            "db1/binlogs/x/binlog.000042-20261128T101500Z/meta.toml",
            "db1/binlogs/7/binlog.000042-20261128T991500Z/meta.toml",
            "db1/binlogs/7/binlog.000042_20261128T101500Z/meta.toml",
            "db1/binlogs/7/-20261128T101500Z/meta.toml",
            "db1/binlogs/7/..-20261128T101500Z/meta.toml",
            "db1/binlogs/7/20261128T101500Z/meta.toml",
            "db1-x/binlogs/7/binlog.000042-20261128T101500Z/meta.toml",
            "db1/binlogs/99999999999999999999999/binlog.000042-20261128T101500Z/meta.toml",
        ] {
            assert_eq!(segment_of(&n, other), None, "{other}");
        }
    }
}
