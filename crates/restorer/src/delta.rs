//! `restorer restore --delta`: a stale copy of the same server (a broken or
//! lagging replica) re-seeded by fetching only what differs.
//!
//! [`compare`] reads the indexed backup's entries against the data the
//! server left (stopped, so nothing changes under the comparison): a
//! regular file at the same path with the same size and mtime (seconds; a
//! restore sets them from the index), or with [`DeltaMode::Checksum`] the
//! same size and the same digest for every chunk the index lists, is
//! reused. The unpack then writes every other entry ([`Reuse::contains`]
//! selects what it skips; only frames holding a piece of a written file are
//! fetched) and [`link`] hard-links the reused files into the staging
//! directory (beside the data directory: the same file system). Nothing of
//! the old data is written: every file the unpack writes is new, and a
//! reused one is only linked.
//!
//! With [`DeltaMode::Checksum`] a file that is not reused whole may still
//! be in part: the unpack asks [`Reuse`] (a [`Pieces`]) for each of its
//! chunks of at least
//! [`MIN_REUSED_CHUNK`](common::archive::frames::MIN_REUSED_CHUNK) bytes and writes the local bytes when their digest
//! is the index's (a redo log or a big tablespace that changed in a few
//! places is fetched only there); it reads the local copy, never writes it.
//!
//! The set-aside data directory shares those files' inodes with the
//! restored one, so once the server writes it is no copy of the old state:
//! the restore removes it once the server answers (journaled: recovery
//! removes it from the commit on).
//!
//! With `--until` ([`Reuse::copy`]) the reused files are copied instead
//! (`copy_file_range`, which btrfs and XFS answer with a reflink: no bytes
//! written), because the replay writes into the staged copy before the
//! swap, and a failed replay must leave the set-aside data directory as it
//! was: it is then kept like a full restore's.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use common::archive::index::{Chunk, EntryKind, Index, PieceHash};
use common::archive::read::Pieces;
use common::archive::tree::{Owner, SafeDir};

/// How `--delta` tells a local file is the backup's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaMode {
    /// Same size and mtime (`--delta`, `--delta=mtime`).
    Mtime,
    /// Same size and the same digest of every chunk (`--delta=checksum`):
    /// reads every candidate file whole; catches a file changed with its
    /// size and mtime kept.
    Checksum,
}

impl std::str::FromStr for DeltaMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "mtime" => Ok(DeltaMode::Mtime),
            "checksum" => Ok(DeltaMode::Checksum),
            other => Err(format!(
                "--delta={other}: expected --delta (same as --delta=mtime) or --delta=checksum"
            )),
        }
    }
}

/// One of the backup's `data.paths` and where its live copy is now (the
/// data directory set aside, or a path under `volume.mountpoint`).
#[derive(Debug, Clone)]
pub struct LiveRoot {
    pub rel: PathBuf,
    pub dir: PathBuf,
}

/// The files a delta restore takes from the local copy instead of the store.
#[derive(Debug, Default)]
pub struct Reuse {
    roots: Vec<LiveRoot>,
    /// Archive paths of the reused files, in index order.
    paths: Vec<String>,
    /// The index's mode and mtime of each of `paths` (for a copy).
    attrs: Vec<(u32, u64)>,
    set: HashSet<String>,
    /// Files and bytes reused.
    pub files: u64,
    pub bytes: u64,
    /// Whether the other files' pieces are looked for in the local copy
    /// too ([`DeltaMode::Checksum`]: reading a changed file locally costs
    /// more than it saves when the store is as near as the disk and most
    /// pieces changed; when the store is far, it saves downloads).
    pub pieces: bool,
    /// Whether [`link`] copies the reused files instead of hard-linking
    /// them: the staged copy is written before the swap (a replay).
    pub copy: bool,
}

impl Reuse {
    /// Whether the archive entry `path` is taken from the local copy.
    pub fn contains(&self, path: &str) -> bool {
        self.set.contains(path)
    }
}

impl Pieces for Reuse {
    /// Called by the unpack's workers at once: each opens the file itself
    /// (a few system calls next to reading up to 16 MiB).
    fn read(&self, path: &str, chunk: &Chunk, buf: &mut Vec<u8>) -> bool {
        buf.clear();
        let file = live_of(&self.roots, path).and_then(|(root, rest, name)| {
            SafeDir::open(&root.dir)
                .and_then(|r| r.subdir(&rest, false, None))
                .and_then(|d| d.open_read(Path::new(name)))
                .ok()
        });
        let Some(f) = file else {
            return false;
        };
        // At most a frame's tar bytes (checked by the index).
        buf.resize(chunk.len as usize, 0);
        if f.read_exact_at(buf, chunk.offset).is_err() {
            buf.clear();
            return false;
        }
        true
    }
}

/// The live directory of archive path `path` and its file name, by the root
/// holding it.
fn live_of<'a>(roots: &'a [LiveRoot], path: &'a str) -> Option<(&'a LiveRoot, PathBuf, &'a str)> {
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    roots.iter().find_map(|r| {
        let rest = Path::new(dir).strip_prefix(&r.rel).ok()?;
        Some((r, rest.to_path_buf(), name))
    })
}

/// Compares the index's files with the live copies under `roots`; returns
/// what can be reused. Stops when `cancelled` says so.
pub fn compare(
    index: &Index,
    roots: Vec<LiveRoot>,
    mode: DeltaMode,
    cancelled: &dyn Fn() -> bool,
) -> anyhow::Result<Reuse> {
    let mut reuse = Reuse::default();
    let opened: Vec<Option<SafeDir>> = roots.iter().map(|r| SafeDir::open(&r.dir).ok()).collect();
    // Entries come grouped by directory: the last one opened is kept.
    let mut last: Option<(PathBuf, PathBuf, Option<SafeDir>)> = None;
    for (n, e) in index.entries.iter().enumerate() {
        if n % 256 == 255 && cancelled() {
            return Err(common::signal::Interrupted.into());
        }
        // Empty files cost nothing to make.
        if e.kind != EntryKind::File || e.size == 0 {
            continue;
        }
        let Some((root, rest, name)) = live_of(&roots, &e.path) else {
            continue;
        };
        let i = roots.iter().position(|r| r.rel == root.rel).expect("found");
        let Some(base) = &opened[i] else { continue };
        if last
            .as_ref()
            .is_none_or(|(r, d, _)| r != &root.rel || d != &rest)
        {
            let d = base.subdir(&rest, false, None).ok();
            last = Some((root.rel.clone(), rest.clone(), d));
        }
        let Some(dir) = last.as_ref().and_then(|(_, _, d)| d.as_ref()) else {
            continue;
        };
        let same = same(dir, Path::new(name), e, index.hash(), mode);
        if !same {
            tracing::debug!("{}: not the backup's ({} bytes): fetched", e.path, e.size);
        }
        if same {
            reuse.paths.push(e.path.clone());
            reuse.attrs.push((e.mode, e.mtime));
            reuse.set.insert(e.path.clone());
            reuse.files += 1;
            reuse.bytes += e.size;
        }
    }
    reuse.roots = roots;
    reuse.pieces = mode == DeltaMode::Checksum;
    Ok(reuse)
}

/// Whether the file `name` in `dir` is the index's: a regular file (never
/// through a link) of the entry's size with its mtime, or with its chunks'
/// digests (of `hash`). Anything unreadable is not.
fn same(
    dir: &SafeDir,
    name: &Path,
    e: &common::archive::index::Entry,
    hash: PieceHash,
    mode: DeltaMode,
) -> bool {
    let (size, mtime) = (e.size, e.mtime);
    use nix::sys::stat::SFlag;
    let Ok(st) = dir.stat(name) else {
        return false;
    };
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG
        || st.st_size as u64 != size
    {
        return false;
    }
    match mode {
        DeltaMode::Mtime => st.st_mtime >= 0 && st.st_mtime as u64 == mtime,
        DeltaMode::Checksum => {
            let Ok(f) = dir.open_read(name) else {
                return false;
            };
            chunks_match(f, &e.chunks, hash).unwrap_or_else(|e| {
                tracing::debug!("{}: {e}", dir.shown(name).display());
                false
            })
        }
    }
}

/// Whether `f` read from its start has the digest (of `hash`) of each of
/// `chunks` (contiguous from offset 0, as the index checked).
fn chunks_match(mut f: std::fs::File, chunks: &[Chunk], hash: PieceHash) -> std::io::Result<bool> {
    let mut buf = vec![0u8; 1 << 20];
    for c in chunks {
        let mut h = hash.hasher();
        let mut left = c.len;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            f.read_exact(&mut buf[..want])?;
            h.update(&buf[..want]);
            left -= want as u64;
        }
        if h.finish() != c.digest {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Hard-links every reused file into `staging` (whose directories the
/// unpack made), at its archive path; with [`Reuse::copy`], copies it
/// there with the index's mode and mtime and `owner`.
pub fn link(reuse: &Reuse, staging: &Path, owner: Owner) -> anyhow::Result<()> {
    let staged =
        SafeDir::open(staging).with_context(|| format!("cannot open {}", staging.display()))?;
    let mut last: Option<(String, SafeDir, SafeDir)> = None;
    for (path, &(mode, mtime)) in reuse.paths.iter().zip(&reuse.attrs) {
        let (root, rest, name) = live_of(&reuse.roots, path).expect("compared");
        let (dir, _) = path.rsplit_once('/').unwrap_or(("", path));
        if last.as_ref().is_none_or(|(d, _, _)| d != dir) {
            let from = SafeDir::open(&root.dir)
                .and_then(|r| r.subdir(&rest, false, None))
                .with_context(|| format!("cannot open {}", root.dir.join(&rest).display()))?;
            let to = staged
                .subdir(Path::new(dir), false, None)
                .with_context(|| {
                    format!("cannot open {}", staged.shown(Path::new(dir)).display())
                })?;
            last = Some((dir.to_string(), from, to));
        }
        let (_, from, to) = last.as_ref().expect("set above");
        if reuse.copy {
            copy(from, to, Path::new(name), (mode, mtime), owner)?;
            continue;
        }
        from.hard_link(Path::new(name), to, Path::new(name))
            .with_context(|| {
                format!(
                    "cannot link {} into {} (a delta restore links unchanged files into the staging directory beside the data directory: they must be on one file system); restore without --delta",
                    from.shown(Path::new(name)).display(),
                    to.shown(Path::new(name)).display()
                )
            })?;
    }
    Ok(())
}

/// Copies the regular file `name` of `from` into `to` (never through a
/// link on either side; the copy must not exist) with the index's mode
/// and mtime and `owner`. `std::io::copy` between two files is
/// `copy_file_range`: a reflink where the file system shares extents.
fn copy(
    from: &SafeDir,
    to: &SafeDir,
    name: &Path,
    (mode, mtime): (u32, u64),
    owner: Owner,
) -> anyhow::Result<()> {
    let failed = || {
        format!(
            "cannot copy {} to {} (a delta restore with --until copies unchanged files into the staging directory); restore without --delta",
            from.shown(name).display(),
            to.shown(name).display()
        )
    };
    let mut src = from.open_read(name).with_context(failed)?;
    let want = src.metadata().with_context(failed)?.len();
    let dst = to.create_file(name).with_context(failed)?;
    let copied = std::io::copy(&mut src, &mut &dst).with_context(failed)?;
    anyhow::ensure!(
        copied == want,
        "{}: copied {copied} bytes of {want}; restore without --delta",
        failed()
    );
    SafeDir::finish_file(&dst, mode, owner, Some(mtime)).with_context(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_anything_else_is_refused() {
        assert_eq!("".parse::<DeltaMode>(), Ok(DeltaMode::Mtime));
        assert_eq!("mtime".parse::<DeltaMode>(), Ok(DeltaMode::Mtime));
        assert_eq!("checksum".parse::<DeltaMode>(), Ok(DeltaMode::Checksum));
        let err = "hash".parse::<DeltaMode>().unwrap_err();
        assert!(err.contains("--delta=checksum"), "{err}");
    }
}
