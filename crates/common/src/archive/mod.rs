//! The archive format, in one home: the store's key layout ([`keys`]), the
//! write path (snapshot → tar → codec → SHA-256 → sink, [`write`]) and the
//! read path (source → SHA-256 → decode → checked unpack, [`read`]), with the
//! entry policy both sides share ([`policy`]) and the no-follow file system
//! access restore writes through ([`tree`]).
//!
//! Format 1: one tar stream (GNU headers; directories, regular files and
//! symbolic links only; paths relative to the volume root, under the
//! manifest's `data.paths`), compressed as one zstd or xz stream or not at
//! all. `zstd -dc data.tar.zst | tar -x` restores it by hand. An encrypted
//! archive (manifest format 2, `archive.encryption`, key `….age`) is that
//! stream as an age v1 file (`crypt`): `age -d -i KEY data.tar.zst.age |
//! zstd -dc | tar -x`.
//!
//! Indexed (manifest format 3, unencrypted zstd only): the same tar stream,
//! cut into independent zstd frames at entry starts or inside file data
//! ([`frames`]), with an [`index`] stored beside it; `zstd -dc | tar -x`
//! still restores it by hand, and [`parallel`] restores it frame by frame on
//! all cores, each file's pieces checked against their own digest.
//!
//! An archive read from the store is untrusted: nothing in it chooses a path
//! outside the target, and nothing makes the reader hold or write more than
//! the manifest declares (`tar_size`, `files`, `unpacked_size`), with long
//! names capped at 4 KiB and the decoders' memory capped.

pub use crate::keys;
pub mod frames;
pub mod incremental;
pub mod index;
pub mod parallel;
pub mod policy;
pub mod read;
pub mod tree;
pub mod write;

use std::path::PathBuf;

use crate::error::ExitCode;

pub use read::{stream, Select, Streamed, Target};
pub use write::{write_tar, write_tar_with, TarStats};

/// Why reading (or writing) an archive failed. The exit code follows from
/// the variant: the archive is bad (4), or the store or the target is (1).
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("the archive {url} is missing from the store")]
    Missing { url: String },
    #[error("the archive {url} is {got} bytes, its manifest says {want}: truncated or replaced")]
    SizeMismatch { url: String, got: u64, want: u64 },
    #[error("the archive {url} is truncated: {why}")]
    Truncated { url: String, why: String },
    #[error("the archive {url} is corrupt: {why}")]
    Corrupt { url: String, why: String },
    #[error("the archive {url} has SHA-256 {got}, its manifest says {want}: corrupted")]
    ChecksumMismatch {
        url: String,
        got: String,
        want: String,
    },
    #[error("the archive {url} holds an unsafe entry, refused: {path}: {why}")]
    Unsafe {
        url: String,
        path: String,
        why: String,
    },
    #[error("the archive {url} is larger than its manifest says: {what}")]
    TooLarge { url: String, what: String },
    #[error("the archive {url} cannot be decrypted: {why}")]
    Key { url: String, why: String },
    #[error("reading {url} from the store failed: {why}")]
    Store { url: String, why: String },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The decoding side stopped because the unpacking side did (internal).
    #[error("unpacking stopped")]
    Stopped,
}

impl ArchiveError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            ArchiveError::Store { .. } | ArchiveError::Write { .. } | ArchiveError::Stopped => {
                ExitCode::Failure
            }
            _ => ExitCode::Integrity,
        }
    }
}
