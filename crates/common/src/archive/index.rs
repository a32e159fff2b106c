//! The frame index of an indexed archive (manifest format 3).
//!
//! An indexed archive is still one `.tar.zst` (`zstd -dc | tar -x` restores
//! it by hand), cut into independent zstd frames: a frame ends only at an
//! entry's start or inside a file's data, so small files share a frame and a
//! large file spans several. The index, stored beside the archive
//! (`keys::index`, zstd-compressed JSON) and bound by the manifest (size,
//! SHA-256), says where each frame lies in the stored object and in the tar
//! stream, with its stored SHA-256, and for each entry its path, kind, size,
//! mode, mtime, link target, where its header and data are in the tar
//! stream, and its data's chunks (one per frame it spans) with the SHA-256
//! of each. The reader fetches frames by range, decompresses them on all
//! cores and checks every chunk against its own hash.
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
use crate::ids::{RelPath, Sha256Hex};
use crate::manifest::ArchiveInfo;

/// The index format this mysnap writes and reads.
pub const INDEX_VERSION: u32 = 1;
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
    /// SHA-256 of the frame's stored bytes.
    pub sha256: Sha256Hex,
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
    /// SHA-256 of the piece's content.
    pub sha256: Sha256Hex,
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    pub version: u32,
    pub frames: Vec<Frame>,
    pub entries: Vec<Entry>,
}

impl Index {
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

    /// The frame holding tar offset `at`.
    pub fn frame_at(&self, at: u64) -> Option<usize> {
        let i = self
            .frames
            .partition_point(|f| f.tar_offset + f.tar_len <= at);
        (i < self.frames.len() && self.frames[i].tar_offset <= at).then_some(i)
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
        if self.version != INDEX_VERSION {
            return Err(bad(format!(
                "version {}, this mysnap reads {INDEX_VERSION}: upgrade mysnap",
                self.version
            )));
        }
        if self.frames.is_empty() || self.frames.len() > u32::MAX as usize {
            return Err(bad(format!("{} frames", self.frames.len())));
        }
        let (mut tar, mut stored) = (0u64, 0u64);
        for (i, f) in self.frames.iter().enumerate() {
            if f.tar_offset != tar || f.stored_offset != stored {
                return Err(bad(format!(
                    "frame {i} does not follow the one before it (tar offset {}, stored offset {}; expected {tar}, {stored})",
                    f.tar_offset, f.stored_offset
                )));
            }
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
            tar += f.tar_len;
            stored += f.stored_len;
        }
        if tar != info.tar_size || stored != info.size {
            return Err(bad(format!(
                "its frames hold {tar} tar bytes in {stored} stored bytes, the manifest says {} in {}",
                info.tar_size, info.size
            )));
        }
        let mut policy = Policy::new(roots);
        let (mut files, mut bytes) = (0u64, 0u64);
        // The end of the previous entry (its data padded to 512 bytes).
        let mut end = 0u64;
        for e in &self.entries {
            let shown: String = e.path.chars().take(200).collect();
            let at = |why: String| bad(format!("{shown}: {why}"));
            let kind = Kind::from(e.kind);
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
            let ok = e.header >= end
                && e.header % 512 == 0
                && e.data >= e.header.saturating_add(512)
                && e.data - e.header <= 512 * 12
                && entry_end.is_some_and(|x| x <= info.tar_size);
            if !ok {
                return Err(at(format!(
                    "header at {} and data at {} do not fit after the previous entry (ending at {end}) in {} tar bytes",
                    e.header, e.data, info.tar_size
                )));
            }
            // Every header block of an entry is in one frame, with its data's start.
            if self.frame_at(e.header) != self.frame_at(e.data - 1) {
                return Err(at("its header blocks span two frames".into()));
            }
            end = entry_end.unwrap_or(u64::MAX);
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
                // `e.data + off` fits: the entry ends inside the tar stream.
                let start = e.data + off;
                let inside = frame.is_some_and(|f| {
                    c.len > 0
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
