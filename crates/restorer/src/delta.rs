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
//! With `--delta` (size and mtime) the comparison and the unpack are made
//! twice: first while the server stops (it compares the running server's
//! files, as a hint: [`compare`] only reads their metadata), unpacking what
//! differs; then, once it is down and its data directory set aside, again,
//! unpacking what the server changed since (the first pass had found it
//! the backup's) and linking the files both found the backup's
//! ([`Reuse::after`]). The stop and the bulk of the download overlap, and
//! the server is down for the second pass only. `--delta=checksum` reads
//! every file whole: it compares once, the server down.
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
    /// The index's size of each of `paths`.
    sizes: Vec<u64>,
    set: HashSet<String>,
    /// After a first pass ([`Reuse::after`]): the files it reused, the only
    /// ones not staged already.
    left: Option<HashSet<String>>,
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

    /// Whether the unpack writes the archive entry `path`: not taken from
    /// the local copy, nor staged by a first pass already.
    pub fn writes(&self, path: &str) -> bool {
        !self.set.contains(path) && self.left.as_ref().is_none_or(|l| l.contains(path))
    }

    /// This comparison, made once the server stopped, narrowed by `first`,
    /// made while it ran, whose unpack staged every entry it did not
    /// reuse: reused are the files both found the backup's; written now
    /// are the files only `first` did (the server changed them since).
    pub fn after(mut self, first: &Reuse) -> Reuse {
        let mut kept = Reuse {
            roots: std::mem::take(&mut self.roots),
            pieces: self.pieces,
            copy: self.copy,
            ..Reuse::default()
        };
        for ((path, attrs), size) in self.paths.into_iter().zip(self.attrs).zip(self.sizes) {
            if first.set.contains(&path) {
                kept.push(path, attrs, size);
            }
        }
        let changed: Vec<&String> = first
            .paths
            .iter()
            .filter(|p| !kept.set.contains(*p))
            .collect();
        if !changed.is_empty() {
            tracing::info!(
                "{} file(s) changed while the server stopped, fetched now: {}",
                changed.len(),
                changed
                    .iter()
                    .take(5)
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        kept.left = Some(first.set.clone());
        kept
    }

    fn push(&mut self, path: String, attrs: (u32, u64), size: u64) {
        self.set.insert(path.clone());
        self.paths.push(path);
        self.attrs.push(attrs);
        self.sizes.push(size);
        self.files += 1;
        self.bytes += size;
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

/// Files a MariaDB or MySQL server writes when it stops, by name, at the
/// top of its data directory (or of another of the backup's `data.paths`,
/// where the redo log or undo tablespaces may live): the buffer pool dump,
/// Aria's log and control file, the system, undo and temporary
/// tablespaces, the redo log.
fn written_at_stop(name: &str) -> bool {
    matches!(name, "ib_buffer_pool" | "aria_log_control" | "mysql.ibd")
        || ["aria_log.", "ibdata", "ib_logfile", "undo", "ibtmp", "#ib_"]
            .iter()
            .any(|p| name.starts_with(p))
}

/// Compares the index's files with the live copies under `roots`; returns
/// what can be reused. With `running` (the first pass, made while the
/// server runs) the files it writes when it stops ([`written_at_stop`])
/// are not reused: the second pass would find them changed and fetch each
/// one's whole frame again. Stops when `cancelled` says so.
pub fn compare(
    index: &Index,
    roots: Vec<LiveRoot>,
    mode: DeltaMode,
    running: bool,
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
        if running && rest.as_os_str().is_empty() && written_at_stop(name) {
            continue;
        }
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
            reuse.push(e.path.clone(), (e.mode, e.mtime), e.size);
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

    /// A second comparison after a first: reused only what both reused;
    /// written now only what the first reused and the second did not.
    #[test]
    fn a_second_pass_links_what_both_reused_and_writes_what_changed_since_the_first() {
        let of = |paths: &[(&str, u64)]| {
            let mut r = Reuse::default();
            for (p, size) in paths {
                r.push(p.to_string(), (0o640, 1), *size);
            }
            r
        };
        // While running: t1, t2, t3 unchanged; t4 differed (staged already).
        let first = of(&[("d/t1.ibd", 10), ("d/t2.ibd", 20), ("d/t3.ibd", 30)]);
        // Stopped: t2 changed since; t4 now matches (it was staged anyway).
        let second = of(&[("d/t1.ibd", 10), ("d/t3.ibd", 30), ("d/t4.ibd", 40)]).after(&first);
        assert_eq!(second.paths, ["d/t1.ibd", "d/t3.ibd"]);
        assert_eq!((second.files, second.bytes), (2, 40));
        assert!(second.writes("d/t2.ibd"), "changed since the first pass");
        for staged_or_linked in ["d/t1.ibd", "d/t3.ibd", "d/t4.ibd", "d", "d/t5.ibd"] {
            assert!(!second.writes(staged_or_linked), "{staged_or_linked}");
        }
        // Without a first pass every entry not reused is written.
        assert!(first.writes("d/t4.ibd") && first.writes("d") && !first.writes("d/t1.ibd"));
    }

    #[test]
    fn the_files_a_server_writes_when_it_stops_are_known_by_name() {
        for name in [
            "ib_buffer_pool",
            "aria_log_control",
            "aria_log.00000001",
            "ibdata1",
            "ib_logfile0",
            "undo001",
            "ibtmp1",
            "mysql.ibd",
            "#ib_16384_0.dblwr",
        ] {
            assert!(written_at_stop(name), "{name}");
        }
        for name in ["t1.ibd", "binlog.000001", "db.opt", "multi-master.info"] {
            assert!(!written_at_stop(name), "{name}");
        }
    }

    #[test]
    fn modes_parse_and_anything_else_is_refused() {
        assert_eq!("".parse::<DeltaMode>(), Ok(DeltaMode::Mtime));
        assert_eq!("mtime".parse::<DeltaMode>(), Ok(DeltaMode::Mtime));
        assert_eq!("checksum".parse::<DeltaMode>(), Ok(DeltaMode::Checksum));
        let err = "hash".parse::<DeltaMode>().unwrap_err();
        assert!(err.contains("--delta=checksum"), "{err}");
    }
}
