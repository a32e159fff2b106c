//! The frame index of an indexed archive (manifest format 3).
//!
//! An indexed archive is still one `.tar.zst` (`zstd -dc | tar -x` restores
//! it by hand), cut into independent zstd frames: a frame ends only at an
//! entry's start or inside a file's data, so small files share a frame and a
//! large file spans several. The index, stored beside the archive
//! (`keys::index`, zstd-compressed JSON) and bound by the manifest (size,
//! SHA-256), says where each frame lies in the stored object and in the tar
//! stream, with the digest of its stored bytes, and for each entry its
//! path, kind, size, mode, mtime, link target, where its header and data
//! are in the tar stream, and its data's chunks (one per frame it spans)
//! with the digest of each. The reader fetches frames by range,
//! decompresses them on all cores and checks every chunk against its own
//! digest.
//!
//! The digests are BLAKE3 in index version 2 (what this mysnap writes: it
//! hashes 2.4 times faster than SHA-256 with SHA extensions, and a backup
//! and a restore hash every byte of file data) and SHA-256 in version 1,
//! which is still read ([`Index::hash`]).
//!
//! Encrypted (format 5), the frames are one age file (`age -d | zstd -dc |
//! tar -x` still restores it by hand) and so is the index; a frame's
//! offsets and digest are those of its zstd bytes, the plaintext the
//! reader decrypts from the age chunks that hold it
//! ([`crate::crypt::Ranged`]).
//!
//! An index read from the store is untrusted like the archive: [`Index::parse`]
//! reads at most [`MAX_INDEX_STORED`] stored and [`MAX_INDEX_JSON`]
//! decompressed bytes, runs every path through the [`Policy`] restore
//! applies to tar entries, and checks that the offsets fit together (frames
//! contiguous and no larger than [`MAX_FRAME_TAR`], chunks contiguous inside
//! their frames and adding up to their file's size, the totals the
//! manifest's), before anything is fetched or written.

use std::io::Read;

use serde::{Deserialize, Serialize};

use super::policy::{Kind, Policy};
use super::ArchiveError;
use crate::ids::{BackupId, RelPath, Sha256Hex};
use crate::manifest::ArchiveInfo;

/// The index format this mysnap writes: BLAKE3 digests.
pub const INDEX_VERSION: u32 = 2;
/// The oldest index format this mysnap reads: SHA-256 digests.
pub const MIN_INDEX_VERSION: u32 = 1;

/// A digest in an index: 64 lowercase hex digits, of the algorithm its
/// index's version names ([`Index::hash`]).
pub type Digest = Sha256Hex;

/// The hash of an index's digests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceHash {
    /// Index version 1.
    Sha256,
    /// Index version 2.
    Blake3,
}

impl PieceHash {
    /// The hash of index `version`, if this mysnap reads it.
    pub fn of_version(version: u32) -> Option<PieceHash> {
        match version {
            1 => Some(PieceHash::Sha256),
            2 => Some(PieceHash::Blake3),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PieceHash::Sha256 => "SHA-256",
            PieceHash::Blake3 => "BLAKE3",
        }
    }

    /// The digest of `bytes`.
    pub fn digest(self, bytes: &[u8]) -> Digest {
        let mut h = self.hasher();
        h.update(bytes);
        h.finish()
    }

    /// A digest computed piece by piece.
    pub fn hasher(self) -> Hasher {
        match self {
            PieceHash::Sha256 => Hasher::Sha256(sha2::Sha256::default()),
            PieceHash::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }
}

/// See [`PieceHash::hasher`].
pub enum Hasher {
    Sha256(sha2::Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => sha2::Digest::update(h, bytes),
            Hasher::Blake3(h) => {
                h.update(bytes);
            }
        }
    }

    pub fn finish(self) -> Digest {
        let hex = match self {
            Hasher::Sha256(h) => hex::encode(sha2::Digest::finalize(h)),
            Hasher::Blake3(h) => h.finalize().to_hex().to_string(),
        };
        Digest::parse(&hex).expect("64 hex digits")
    }
}
/// Tar bytes after which the writer cuts a frame (at the next entry, or
/// inside a file's data).
pub const FRAME_TARGET: u64 = 16 << 20;
/// The most tar bytes a frame may hold (the reader's buffer per frame).
pub const MAX_FRAME_TAR: u64 = 64 << 20;
/// The most stored bytes a frame may take (zstd's bound for
/// [`MAX_FRAME_TAR`] with room to spare).
pub const MAX_FRAME_STORED: u64 = MAX_FRAME_TAR + (1 << 20);
/// The largest stored index mysnap reads.
pub const MAX_INDEX_STORED: u64 = 64 << 20;
/// The most bytes a stored index may decompress to.
pub const MAX_INDEX_JSON: u64 = 256 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Dir,
    File,
    Symlink,
}

impl From<EntryKind> for Kind {
    fn from(k: EntryKind) -> Kind {
        match k {
            EntryKind::Dir => Kind::Dir,
            EntryKind::File => Kind::File,
            EntryKind::Symlink => Kind::Symlink,
        }
    }
}

/// One zstd frame: where its bytes are in the stored object and what part
/// of the tar stream they decompress to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Frame {
    pub tar_offset: u64,
    pub tar_len: u64,
    pub stored_offset: u64,
    pub stored_len: u64,
    /// The digest of the frame's stored bytes (`sha256` in version 1).
    #[serde(rename = "digest", alias = "sha256")]
    pub digest: Digest,
    /// Whose archive holds it: `None`, this backup's; `Some(k)`, the
    /// archive of [`Index::sources`]`[k]` (an incremental backup's frame
    /// of a base), whose offsets these are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<u32>,
}

/// A piece of a file's data that lies in one frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunk {
    /// The frame's number in [`Index::frames`].
    pub frame: u32,
    /// Where the piece starts in the file.
    pub offset: u64,
    pub len: u64,
    /// The digest of the piece's content (`sha256` in version 1).
    #[serde(rename = "digest", alias = "sha256")]
    pub digest: Digest,
    /// Where the piece is in the tar stream of its frame's source, when
    /// that is not its entry's (an incremental backup's changed file whose
    /// piece the base holds unchanged); `None`: at the entry's data plus
    /// [`Chunk::offset`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<u64>,
}

impl Chunk {
    /// The tar offset of the piece in its frame's stream.
    pub fn tar_at(&self, entry: &Entry) -> u64 {
        self.at.unwrap_or(entry.data + self.offset)
    }
}

/// One tar entry (a GNU long name's extra header belongs to its entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Relative to the volume root, as in the tar stream (no trailing `/`).
    pub path: String,
    pub kind: EntryKind,
    /// Bytes of content (0 unless a file).
    pub size: u64,
    pub mode: u32,
    pub mtime: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// Tar offset of the entry's first header block.
    pub header: u64,
    /// Tar offset of its data (right after its last header block).
    pub data: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<Chunk>,
    /// The nanoseconds of the file's mtime (tar keeps whole seconds):
    /// with [`Entry::ino`], what an incremental backup compares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime_ns: Option<u32>,
    /// The file's inode number in the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ino: Option<u64>,
    /// Whose tar stream holds the entry (as [`Frame::source`]); its
    /// header, data and chunks are in that stream's frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    pub version: u32,
    /// The backups whose archives hold the frames of an incremental
    /// backup that are not its own (the manifest's `archive.bases`, oldest
    /// first); empty for a full backup. Flattened: a frame is always in the
    /// archive that holds its bytes, never a reference to a reference.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<BackupId>,
    /// This archive's frames first, contiguous from offset 0, then those
    /// of each source in order, each source's by offset.
    pub frames: Vec<Frame>,
    pub entries: Vec<Entry>,
}

impl Index {
    /// The hash of this index's digests (its version is checked by
    /// [`Index::check`]).
    pub fn hash(&self) -> PieceHash {
        PieceHash::of_version(self.version).unwrap_or(PieceHash::Blake3)
    }

    /// The stored form: zstd-compressed JSON.
    pub fn to_stored(&self) -> std::io::Result<Vec<u8>> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        zstd::bulk::compress(&json, 9)
    }

    /// Parses the stored index of the archive `info` (read from `url`) and
    /// checks it against the manifest's `roots` (`data.paths`) and totals.
    pub fn parse(
        stored: &[u8],
        url: &str,
        info: &ArchiveInfo,
        roots: &[RelPath],
    ) -> Result<Index, ArchiveError> {
        let bad = |why: String| ArchiveError::Corrupt {
            url: url.to_string(),
            why: format!("its index: {why}"),
        };
        if stored.len() as u64 > MAX_INDEX_STORED {
            return Err(ArchiveError::TooLarge {
                url: url.to_string(),
                what: format!("an index of more than {MAX_INDEX_STORED} bytes"),
            });
        }
        let mut d = zstd::Decoder::new(stored).map_err(|e| bad(e.to_string()))?;
        d.window_log_max(crate::codec::ZSTD_WINDOW_LOG_MAX)
            .map_err(|e| bad(e.to_string()))?;
        let mut json = Vec::new();
        d.take(MAX_INDEX_JSON + 1)
            .read_to_end(&mut json)
            .map_err(|e| bad(format!("cannot decompress it: {e}")))?;
        if json.len() as u64 > MAX_INDEX_JSON {
            return Err(ArchiveError::TooLarge {
                url: url.to_string(),
                what: format!("an index that decompresses to more than {MAX_INDEX_JSON} bytes"),
            });
        }
        let index: Index = serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))?;
        index.check(url, info, roots)?;
        Ok(index)
    }

    /// The frame holding tar offset `at` of the tar stream of `source`
    /// (`None`: this archive's). Frames are ordered by source, then offset
    /// (checked by [`Index::check`]).
    pub fn frame_at(&self, source: Option<u32>, at: u64) -> Option<usize> {
        let from = self.frames.partition_point(|f| f.source < source);
        let to = self.frames.partition_point(|f| f.source <= source);
        let these = &self.frames[from..to];
        let i = these.partition_point(|f| f.tar_offset.saturating_add(f.tar_len) <= at);
        (i < these.len() && these[i].tar_offset <= at).then_some(from + i)
    }

    /// The frames of this archive (not a base's).
    pub fn own_frames(&self) -> usize {
        self.frames.partition_point(|f| f.source.is_none())
    }

    /// How the index fits together and with the manifest: see the module.
    pub fn check(
        &self,
        url: &str,
        info: &ArchiveInfo,
        roots: &[RelPath],
    ) -> Result<(), ArchiveError> {
        let bad = |why: String| ArchiveError::Corrupt {
            url: url.to_string(),
            why: format!("its index: {why}"),
        };
        if PieceHash::of_version(self.version).is_none() {
            return Err(bad(format!(
                "version {}, this mysnap reads {MIN_INDEX_VERSION} to {INDEX_VERSION}: upgrade mysnap",
                self.version
            )));
        }
        if self.frames.is_empty() || self.frames.len() > u32::MAX as usize {
            return Err(bad(format!("{} frames", self.frames.len())));
        }
        if self.sources != info.bases {
            return Err(bad(format!(
                "its sources {:?} are not the manifest's archive.bases {:?}",
                self.sources, info.bases
            )));
        }
        let limits = |i: usize, f: &Frame| {
            if f.tar_len == 0
                || f.tar_len > MAX_FRAME_TAR
                || f.stored_len == 0
                || f.stored_len > MAX_FRAME_STORED
            {
                return Err(bad(format!(
                    "frame {i} holds {} tar bytes in {} stored bytes (1 to {MAX_FRAME_TAR} and {MAX_FRAME_STORED} allowed)",
                    f.tar_len, f.stored_len
                )));
            }
            Ok(())
        };
        let own = self.own_frames();
        let (mut tar, mut stored) = (0u64, 0u64);
        for (i, f) in self.frames[..own].iter().enumerate() {
            if f.tar_offset != tar || f.stored_offset != stored {
                return Err(bad(format!(
                    "frame {i} does not follow the one before it (tar offset {}, stored offset {}; expected {tar}, {stored})",
                    f.tar_offset, f.stored_offset
                )));
            }
            limits(i, f)?;
            tar += f.tar_len;
            stored += f.stored_len;
        }
        let stored_agrees = match &info.encryption {
            None => stored == info.size,
            // One age file: a header, then the frames' bytes in chunks (its
            // exact length is checked once its header is read).
            Some(_) => {
                let payload = crate::crypt::sealed_payload_len(stored);
                info.size > payload && info.size - payload <= crate::crypt::AGE_HEAD
            }
        };
        if tar != info.tar_size || !stored_agrees {
            return Err(bad(match info.encryption {
                None => format!(
                    "its frames hold {tar} tar bytes in {stored} stored bytes, the manifest says {} in {}",
                    info.tar_size, info.size
                ),
                Some(_) => format!(
                    "its frames hold {tar} tar bytes in {stored} bytes of zstd, the manifest says {} tar bytes in an age file of {} bytes, which cannot hold them: cut short or forged",
                    info.tar_size, info.size
                ),
            }));
        }
        // A base's frames: ordered by source, then offset, none overlapping
        // another (in the tar stream or the stored bytes), none past u64.
        let mut prev: Option<(u32, u64, u64)> = None;
        for (i, f) in self.frames.iter().enumerate().skip(own) {
            limits(i, f)?;
            let Some(s) = f.source else {
                return Err(bad(format!(
                    "frame {i} of this archive follows a base's frame"
                )));
            };
            let (tar_end, stored_end) = (
                f.tar_offset.checked_add(f.tar_len),
                f.stored_offset.checked_add(f.stored_len),
            );
            let ordered = match prev {
                Some((p, t, st)) if p == s => f.tar_offset >= t && f.stored_offset >= st,
                Some((p, _, _)) => s > p,
                None => true,
            };
            if s as usize >= self.sources.len()
                || !ordered
                || tar_end.is_none()
                || stored_end.is_none()
            {
                return Err(bad(format!(
                    "frame {i} of source {s} is not after the one before it in a source of the {} it names",
                    self.sources.len()
                )));
            }
            prev = Some((s, tar_end.unwrap_or(0), stored_end.unwrap_or(0)));
        }
        let mut policy = Policy::new(roots);
        let (mut files, mut bytes) = (0u64, 0u64);
        // The end of the previous entry of each source (its data padded to 512 bytes).
        let mut ends = vec![0u64; self.sources.len() + 1];
        for e in &self.entries {
            let shown: String = e.path.chars().take(200).collect();
            let at = |why: String| bad(format!("{shown}: {why}"));
            let kind = Kind::from(e.kind);
            let slot = match e.source {
                None => 0,
                Some(s) if (s as usize) < self.sources.len() && kind == Kind::File => {
                    s as usize + 1
                }
                Some(s) => {
                    return Err(at(format!(
                        "in source {s}, which is not a base's file among the {} sources",
                        self.sources.len()
                    )))
                }
            };
            let end = ends[slot];
            if e.link.is_some() != (kind == Kind::Symlink) {
                return Err(at(
                    "a link target on an entry that is not a link, or none on a link".into(),
                ));
            }
            policy
                .admit(&e.path, kind, e.link.as_deref())
                .map_err(|why| ArchiveError::Unsafe {
                    url: url.to_string(),
                    path: shown.clone(),
                    why,
                })?;
            let padded = e.size.div_ceil(512).checked_mul(512);
            // Sizes are bounded by the manifest before any offset is added.
            if e.size > info.unpacked_size {
                return Err(ArchiveError::TooLarge {
                    url: url.to_string(),
                    what: format!(
                        "its index gives {shown} a size of {} bytes, more than the {} bytes of file contents its manifest declares",
                        e.size, info.unpacked_size
                    ),
                });
            }
            let entry_end = padded.and_then(|p| e.data.checked_add(p));
            // A base's entry is bounded by its frames (below).
            let ok = e.header >= end
                && e.header % 512 == 0
                && e.data >= e.header.saturating_add(512)
                && e.data - e.header <= 512 * 12
                && entry_end.is_some_and(|x| e.source.is_some() || x <= info.tar_size);
            if !ok {
                return Err(at(format!(
                    "header at {} and data at {} do not fit after the previous entry (ending at {end}) in {} tar bytes",
                    e.header, e.data, info.tar_size
                )));
            }
            // Every header block of an entry is in one frame, with its data's start.
            let frame = self.frame_at(e.source, e.header);
            if frame.is_none() || frame != self.frame_at(e.source, e.data - 1) {
                return Err(at(
                    "its header blocks are not in one frame of its source".into()
                ));
            }
            ends[slot] = entry_end.unwrap_or(u64::MAX);
            if kind != Kind::File {
                if e.size != 0 || !e.chunks.is_empty() {
                    return Err(at("content on an entry that is not a file".into()));
                }
                continue;
            }
            files += 1;
            bytes = bytes.saturating_add(e.size);
            if files > info.files || bytes > info.unpacked_size {
                return Err(ArchiveError::TooLarge {
                    url: url.to_string(),
                    what: format!(
                        "its index holds more than the {} files and {} bytes of file contents its manifest declares (at {shown})",
                        info.files, info.unpacked_size
                    ),
                });
            }
            let mut off = 0u64;
            for c in &e.chunks {
                let frame = self.frames.get(c.frame as usize);
                // `e.data + off` fits: the entry ends inside the tar stream;
                // a piece elsewhere is in another source's frame.
                let start = c.at.unwrap_or(e.data + off);
                let inside = frame.is_some_and(|f| {
                    c.len > 0
                        && match c.at {
                            None => f.source == e.source,
                            Some(_) => f.source.is_some() && f.source != e.source,
                        }
                        && start >= f.tar_offset
                        && start
                            .checked_add(c.len)
                            .is_some_and(|x| x <= f.tar_offset + f.tar_len)
                });
                if c.offset != off || !inside {
                    return Err(at(format!(
                        "chunk at {} of {} bytes in frame {} does not follow the one before it inside its frame",
                        c.offset, c.len, c.frame
                    )));
                }
                off += c.len;
            }
            if off != e.size {
                return Err(at(format!(
                    "chunks of {off} bytes for a file of {}",
                    e.size
                )));
            }
        }
        if files != info.files || bytes != info.unpacked_size {
            return Err(bad(format!(
                "{files} files of {bytes} bytes, the manifest says {} of {}",
                info.files, info.unpacked_size
            )));
        }
        policy.finish().map_err(bad)?;
        Ok(())
    }
}
