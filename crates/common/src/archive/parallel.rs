//! The read path of an indexed archive (manifest format 3): the index,
//! parsed and checked first ([`Index::parse`]: every path through the
//! [`super::policy::Policy`], every offset), then directories, links and
//! empty files made in the index's order through [`SafeDir`], then `workers`
//! threads each take the next frame: a ranged read of its stored bytes,
//! their digest when verifying, decompression a slice at a time bounded by
//! the frame's tar length, each header in the frame compared with its
//! index entry as it passes, each chunk checked against its own digest (a
//! corrupt file is named) and written at its offset in its file as it
//! decompresses. Modes, owners and mtimes of files are set last.

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::Bytes;

use super::frames::MIN_REUSED_CHUNK;
use super::index::{EntryKind, Index};
use super::read::{Streamed, Target, Unpacker};
use super::tree::{SafeDir, ZeroSkipping};
use super::ArchiveError;
use crate::progress::Progress;

/// Reads stored bytes by range (the store's ranged GET) of the archive
/// of a frame's source: `None`, this backup's; `Some(k)`, the archive of
/// [`Index::sources`]`[k]` (an incremental backup's base).
pub type Fetch<'a> = &'a (dyn Fn(Option<u32>, Range<u64>) -> Result<Bytes, ArchiveError> + Sync);

/// Unpacks (or, with [`Target::Discard`], checks) the indexed archive at
/// `url` described by `index` (already checked: [`Index::parse`]); `fetch`
/// reads its stored bytes, `cancelled` stops every worker at its next frame.
/// With [`Target::Subset`] only the chosen entries are made, and only the
/// frames holding a piece of a chosen file are fetched.
#[allow(clippy::too_many_arguments)]
pub fn unpack(
    index: &Index,
    url: &str,
    target: Target<'_>,
    fetch: Fetch<'_>,
    workers: usize,
    progress: &dyn Progress,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<Streamed, ArchiveError> {
    let interrupted = || ArchiveError::Store {
        url: url.to_string(),
        why: "interrupted by a signal".into(),
    };
    if cancelled() {
        return Err(interrupted());
    }
    let mut unpacker = Unpacker::for_target(&target)?;
    // What each frame holds: (entry, chunk) pairs and the entries whose header it holds.
    let mut chunks: Vec<Vec<(usize, usize)>> = vec![Vec::new(); index.frames.len()];
    let mut headers: Vec<Vec<usize>> = vec![Vec::new(); index.frames.len()];
    let mut s = Streamed::default();
    for (i, e) in index.entries.iter().enumerate() {
        if i % 1024 == 1023 && cancelled() {
            return Err(interrupted());
        }
        s.entries += 1;
        if e.kind == EntryKind::File {
            s.files += 1;
            s.file_bytes += e.size;
        }
        if !target.selects(&e.path, e.kind.into()) {
            continue;
        }
        let frame = index
            .frame_at(e.source, e.header)
            .expect("checked: inside its source's tar stream");
        headers[frame].push(i);
        if let Some(u) = unpacker.as_mut() {
            // Files are made empty now and filled by the workers; their mode last.
            let mode = if e.kind == EntryKind::File {
                0o600
            } else {
                e.mode
            };
            u.put(
                &e.path,
                e.kind.into(),
                e.link.as_deref(),
                &mut std::io::empty(),
                0,
                mode,
                None,
                url,
            )?;
        }
        for (j, c) in e.chunks.iter().enumerate() {
            chunks[c.frame as usize].push((i, j));
        }
    }
    let root = unpacker.as_ref().map(|u| &u.root);
    // A subset's local copy: a frame's pieces found there are not fetched.
    let local = target.local().filter(|_| root.is_some());
    let (fetched, from_copy) = (AtomicU64::new(0), AtomicU64::new(0));
    // A subset reads only the frames holding a piece of a chosen file.
    let todo: Vec<usize> = (0..index.frames.len())
        .filter(|&i| !target.is_subset() || !chunks[i].is_empty())
        .collect();
    // What may be fetched: a base's frames too, a subset's only.
    progress.set_total(todo.iter().map(|&i| index.frames[i].stored_len).sum());
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let failure: Mutex<Option<ArchiveError>> = Mutex::new(None);
    let workers = workers.clamp(1, todo.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let mut parent: Option<(String, SafeDir)> = None;
                let mut scratch: Option<Scratch> = None;
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= todo.len() || stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let i = todo[n];
                    let r = if cancelled() {
                        Err(interrupted())
                    } else {
                        frame(
                            index,
                            i,
                            &chunks[i],
                            &headers[i],
                            url,
                            fetch,
                            root,
                            local,
                            &mut parent,
                            &mut scratch,
                        )
                    };
                    match r {
                        Ok(done) => {
                            if done.fetched {
                                fetched.fetch_add(index.frames[i].stored_len, Ordering::Relaxed);
                            }
                            from_copy.fetch_add(done.local_bytes, Ordering::Relaxed);
                            progress.advance(index.frames[i].stored_len)
                        }
                        Err(e) => {
                            stop.store(true, Ordering::SeqCst);
                            let mut f = failure.lock().unwrap_or_else(|p| p.into_inner());
                            f.get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    s.fetched_bytes = fetched.into_inner();
    s.local_bytes = from_copy.into_inner();
    if let Some(u) = unpacker.as_ref() {
        let chosen = |e: &&super::index::Entry| {
            e.kind == EntryKind::File && target.selects(&e.path, e.kind.into())
        };
        for e in index.entries.iter().filter(chosen) {
            s.written_files += 1;
            let (dir, name) = split(&e.path);
            let shown = u.root.shown(Path::new(&e.path));
            let write_err = |source| ArchiveError::Write {
                path: shown.clone(),
                source,
            };
            let d = u
                .root
                .subdir(Path::new(dir), false, None)
                .map_err(write_err)?;
            let f = d.open_file(Path::new(name)).map_err(write_err)?;
            // Zeros at the end left as a hole (no fallocate) are not counted.
            if f.metadata().map_err(write_err)?.len() != e.size {
                f.set_len(e.size).map_err(write_err)?;
            }
            SafeDir::finish_file(&f, e.mode, u.owner, Some(e.mtime)).map_err(write_err)?;
        }
    }
    Ok(s)
}

/// Piece `c` of file `e` written below `root` from the local copy `l`
/// when it is there with the index's digest (of `hash`); `false`: to be
/// fetched.
fn from_local(
    hash: super::index::PieceHash,
    l: &dyn super::read::Pieces,
    root: &SafeDir,
    e: &super::index::Entry,
    c: &super::index::Chunk,
    buf: &mut Vec<u8>,
) -> Result<bool, ArchiveError> {
    if !l.read(&e.path, c, buf) || buf.len() as u64 != c.len || hash.digest(buf) != c.digest {
        return Ok(false);
    }
    let (dir, name) = split(&e.path);
    let write_err = |source| ArchiveError::Write {
        path: root.shown(Path::new(&e.path)),
        source,
    };
    let file = root
        .subdir(Path::new(dir), false, None)
        .and_then(|d| d.open_file(Path::new(name)))
        .map_err(write_err)?;
    let mut w = ZeroSkipping::at(&file, c.offset);
    w.write_all(buf)
        .and_then(|()| w.end_piece())
        .map_err(write_err)?;
    Ok(true)
}

/// Bytes of a piece hashed and written at a time: a slice a core's cache
/// holds, read twice (hash, then write) without going back to memory.
const CACHED_SLICE: usize = 256 << 10;

/// What a worker keeps from one frame to the next: its decompression
/// context and a slice of decompressed bytes, so that a frame costs no
/// allocation and no buffer of its whole tar bytes: a frame is
/// decompressed a slice at a time, each hashed and written while it is in
/// the core's cache.
struct Scratch {
    dctx: zstd::zstd_safe::DCtx<'static>,
    slice: Vec<u8>,
    /// A piece read from a local copy.
    local: Vec<u8>,
}

impl Scratch {
    fn new() -> std::io::Result<Scratch> {
        let mut dctx = zstd::zstd_safe::DCtx::try_create()
            .ok_or_else(|| std::io::Error::other("cannot create a zstd decompression context"))?;
        // A frame's window: at most its content (which its header gives),
        // and for a forged header without one, at most the largest frame
        // (what the buffer of a whole frame's tar bytes held before).
        dctx.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
            super::index::MAX_FRAME_TAR.trailing_zeros(),
        ))
        .map_err(|c| std::io::Error::other(zstd::zstd_safe::get_error_name(c)))?;
        Ok(Scratch {
            dctx,
            slice: vec![0; CACHED_SLICE],
            local: Vec::new(),
        })
    }
}

/// A frame's tar bytes as they decompress, in order: [`Tar::skip_to`] an
/// offset in the frame, [`Tar::take`] the next bytes. Never more than the
/// frame's tar length; a decompression error is kept apart from a write
/// error (`Err` of the outer and the inner result).
struct Tar<'a> {
    zstd: zstd::stream::read::Decoder<'a, &'a [u8]>,
    slice: &'a mut [u8],
    /// The slice's bytes not taken yet: `slice[from..to]`.
    from: usize,
    to: usize,
    /// The frame offset of `slice[to]`.
    at: u64,
    len: u64,
}

impl<'a> Tar<'a> {
    fn new(stored: &'a [u8], s: &'a mut Scratch, len: u64) -> std::io::Result<Tar<'a>> {
        s.dctx
            .reset(zstd::zstd_safe::ResetDirective::SessionOnly)
            .map_err(|c| std::io::Error::other(zstd::zstd_safe::get_error_name(c)))?;
        Ok(Tar {
            zstd: zstd::stream::read::Decoder::with_context(stored, &mut s.dctx).single_frame(),
            slice: &mut s.slice,
            from: 0,
            to: 0,
            at: 0,
            len,
        })
    }

    /// The frame offset of the next byte [`Tar::take`] gives.
    fn pos(&self) -> u64 {
        self.at - (self.to - self.from) as u64
    }

    /// Decompresses the next slice; `false` at the frame's end.
    fn fill(&mut self) -> std::io::Result<bool> {
        use std::io::Read;
        // At most one byte past the frame's tar length: that is an error.
        let room = (self.len + 1 - self.at).min(self.slice.len() as u64) as usize;
        let n = self.zstd.read(&mut self.slice[..room])?;
        self.from = 0;
        self.to = n;
        self.at += n as u64;
        Ok(n > 0)
    }

    /// Up to `max` of the next bytes (none at the frame's end).
    fn take(&mut self, max: usize) -> std::io::Result<&[u8]> {
        if self.from == self.to && !self.fill()? {
            return Ok(&[]);
        }
        let n = max.min(self.to - self.from);
        let from = self.from;
        self.from += n;
        Ok(&self.slice[from..from + n])
    }

    /// Drops the bytes before frame offset `to` (at or after [`Tar::pos`]).
    fn skip_to(&mut self, to: u64) -> std::io::Result<()> {
        while self.pos() < to {
            let want = (to - self.pos()).min(usize::MAX as u64) as usize;
            if self.take(want)?.is_empty() {
                break;
            }
        }
        Ok(())
    }
}

/// A header block to compare with its entry, or piece `(entry, chunk)` to
/// hash and write.
enum Event {
    Header(usize),
    Piece(usize, usize),
}

/// The last header block of entry `e`, compared with the index.
fn check_header(e: &super::index::Entry, block: &[u8; 512], url: &str) -> Result<(), ArchiveError> {
    let h = tar::Header::from_byte_slice(block);
    let kind = match h.entry_type() {
        tar::EntryType::Directory => Some(EntryKind::Dir),
        tar::EntryType::Symlink => Some(EntryKind::Symlink),
        tar::EntryType::Regular | tar::EntryType::Continuous => Some(EntryKind::File),
        _ => None,
    };
    let size = h.entry_size().ok();
    let short_name = e.data - e.header == 512;
    let path = h.path_bytes();
    let name_agrees = !short_name || path.strip_suffix(b"/").unwrap_or(&path) == e.path.as_bytes();
    let size_agrees = e.kind != EntryKind::File || size == Some(e.size);
    if kind != Some(e.kind) || !size_agrees || !name_agrees {
        return Err(ArchiveError::Unsafe {
            url: url.to_string(),
            path: e.path.chars().take(200).collect(),
            why: "its tar header does not agree with the index (name, type or size): forged".into(),
        });
    }
    Ok(())
}

fn split(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

/// What became of a frame: whether it was fetched, and the bytes of its
/// pieces written from the local copy instead.
struct Done {
    fetched: bool,
    local_bytes: u64,
}

/// Fetches, checks, decompresses and writes frame `i`; with `local` (a
/// subset's local copy), first writes the pieces of at least
/// [`MIN_REUSED_CHUNK`] found there, and fetches the frame only if a piece
/// is still missing.
#[allow(clippy::too_many_arguments)]
fn frame(
    index: &Index,
    i: usize,
    chunks: &[(usize, usize)],
    headers: &[usize],
    url: &str,
    fetch: Fetch<'_>,
    root: Option<&SafeDir>,
    local: Option<&dyn super::read::Pieces>,
    parent: &mut Option<(String, SafeDir)>,
    scratch: &mut Option<Scratch>,
) -> Result<Done, ArchiveError> {
    let f = &index.frames[i];
    let corrupt = |why: String| ArchiveError::Corrupt {
        url: url.to_string(),
        why,
    };
    let s = match scratch {
        Some(s) => s,
        None => scratch.insert(Scratch::new().map_err(|e| corrupt(e.to_string()))?),
    };
    // Pieces taken from the local copy (by their place in `chunks`).
    let mut done = Done {
        fetched: false,
        local_bytes: 0,
    };
    let mut copied = vec![false; chunks.len()];
    if let (Some(l), Some(root)) = (local, root) {
        for (k, &(e, c)) in chunks.iter().enumerate() {
            let entry = &index.entries[e];
            let c = &entry.chunks[c];
            if c.len >= MIN_REUSED_CHUNK
                && from_local(index.hash(), l, root, entry, c, &mut s.local)?
            {
                copied[k] = true;
                done.local_bytes += c.len;
            }
        }
        if copied.iter().all(|c| *c) {
            return Ok(done);
        }
    }
    done.fetched = true;
    let holds = || {
        let first = chunks
            .first()
            .map(|(e, _)| index.entries[*e].path.as_str())
            .or_else(|| headers.first().map(|e| index.entries[*e].path.as_str()))
            .unwrap_or("no file");
        let more = chunks.len().saturating_sub(1);
        if more > 0 {
            format!("{first} and {more} more")
        } else {
            first.to_string()
        }
    };
    let stored = fetch(f.source, f.stored_offset..f.stored_offset + f.stored_len)?;
    if stored.len() as u64 != f.stored_len {
        return Err(ArchiveError::Truncated {
            url: url.to_string(),
            why: format!(
                "frame {i} (holding {}) is {} bytes, its index says {}",
                holds(),
                stored.len(),
                f.stored_len
            ),
        });
    }
    // A restore's output is the index's (checked) entries and pieces each
    // checked against its own digest below: the frame's digest is checked
    // first when nothing is written (verify), which answers for every
    // stored byte, and by a restore only to say why a frame does not
    // decompress.
    let hash = index.hash();
    let hash_differs = |stored: &[u8]| {
        let got = hash.digest(stored);
        (got != f.digest).then(|| {
            corrupt(format!(
                "frame {i} (stored bytes {}..{}, holding {}) has {} {got}, its index says {}: corrupted",
                f.stored_offset,
                f.stored_offset + f.stored_len,
                holds(),
                hash.name(),
                f.digest
            ))
        })
    };
    if root.is_none() {
        if let Some(e) = hash_differs(&stored) {
            return Err(e);
        }
    }
    // What is checked or written, in the frame's tar order: the last
    // header block of each entry starting here, and each piece to write.
    // Pieces and headers of a real index never overlap; a forged one's
    // may, and is refused.
    let mut events: Vec<(u64, u64, Event)> = headers
        .iter()
        .map(|&e| {
            let at = index.entries[e].data - 512 - f.tar_offset;
            (at, at + 512, Event::Header(e))
        })
        .chain(
            chunks
                .iter()
                .zip(&copied)
                .filter(|(_, copied)| !**copied)
                .map(|(&(e, c), _)| {
                    let entry = &index.entries[e];
                    let at = entry.chunks[c].tar_at(entry) - f.tar_offset;
                    (at, at + entry.chunks[c].len, Event::Piece(e, c))
                }),
        )
        .collect();
    events.sort_by_key(|(at, _, _)| *at);
    if events.windows(2).any(|w| w[1].0 < w[0].1) {
        return Err(corrupt(format!(
            "frame {i} (holding {}): pieces or headers in its index overlap: forged",
            holds()
        )));
    }
    let not_zstd = |e: std::io::Error| {
        hash_differs(&stored).unwrap_or_else(|| {
            corrupt(format!(
                "frame {i} (holding {}) does not decompress to its {} tar bytes: {e}: corrupted",
                holds(),
                f.tar_len
            ))
        })
    };
    // The frame ended at `got` bytes: its digest explains it if it differs.
    let cut = |got: u64| {
        hash_differs(&stored).unwrap_or_else(|| {
            corrupt(format!(
                "frame {i} (holding {}) decompresses to {got} bytes, its index says {}: corrupted",
                holds(),
                f.tar_len
            ))
        })
    };
    let mut tar = Tar::new(&stored, s, f.tar_len).map_err(|e| corrupt(e.to_string()))?;
    for (at, end, event) in events {
        tar.skip_to(at).map_err(not_zstd)?;
        if tar.pos() < at {
            return Err(cut(tar.pos()));
        }
        match event {
            Event::Header(e) => {
                let mut block = [0u8; 512];
                let mut got = 0;
                while got < 512 {
                    let b = tar.take(512 - got).map_err(not_zstd)?;
                    if b.is_empty() {
                        return Err(cut(tar.pos()));
                    }
                    block[got..got + b.len()].copy_from_slice(b);
                    got += b.len();
                }
                check_header(&index.entries[e], &block, url)?;
            }
            Event::Piece(e, c) => {
                let entry = &index.entries[e];
                let c = &entry.chunks[c];
                let mut file = None;
                let shown = root.map(|r| r.shown(Path::new(&entry.path)));
                let write_err = |source| ArchiveError::Write {
                    path: shown.clone().unwrap_or_default(),
                    source,
                };
                if let Some(root) = root {
                    let (dir, name) = split(&entry.path);
                    if parent.as_ref().is_none_or(|(p, _)| p != dir) {
                        let d = root
                            .subdir(Path::new(dir), false, None)
                            .map_err(write_err)?;
                        *parent = Some((dir.to_string(), d));
                    }
                    let d = &parent.as_ref().expect("set above").1;
                    file = Some(d.open_file(Path::new(name)).map_err(write_err)?);
                }
                // Hashed and written a slice at a time as it decompresses,
                // while it is in the core's cache. Zero blocks allocated,
                // not written, as in a one-stream restore. A piece whose
                // hash then differs fails the restore, whose files are not
                // in place yet.
                let mut h = hash.hasher();
                let mut w = file.as_ref().map(|f| ZeroSkipping::at(f, c.offset));
                while tar.pos() < end {
                    let b = tar
                        .take((end - tar.pos()).min(CACHED_SLICE as u64) as usize)
                        .map_err(not_zstd)?;
                    if b.is_empty() {
                        return Err(cut(tar.pos()));
                    }
                    h.update(b);
                    if let Some(w) = w.as_mut() {
                        w.write_all(b).map_err(write_err)?;
                    }
                }
                let got = h.finish();
                if got != c.digest {
                    return Err(corrupt(format!(
                        "{} (bytes {}..{}) has {} {got}, the index says {}: corrupted",
                        entry.path,
                        c.offset,
                        c.offset + c.len,
                        hash.name(),
                        c.digest
                    )));
                }
                if let Some(w) = w {
                    w.end_piece().map_err(write_err)?;
                }
            }
        }
    }
    // The rest, to its end: exactly the index's tar length, one frame.
    tar.skip_to(f.tar_len + 1).map_err(not_zstd)?;
    if tar.pos() != f.tar_len {
        return Err(cut(tar.pos()));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::super::frames::FrameWriter;
    use super::super::index::{Chunk, Frame};
    use super::super::write::write_tar;
    use super::*;
    use crate::config::Compression;
    use crate::ids::tests::v;
    use crate::manifest::{ArchiveInfo, DataLayout, RelPath, Sha256Hex};
    use std::os::unix::fs::symlink;

    /// A tree under `d`: a file spanning several frames, small files sharing
    /// frames, a long name, an empty file, a link.
    fn tree(root: &Path) {
        let d = root.join("d/sub");
        std::fs::create_dir_all(&d).unwrap();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(root.join("d/big"), &big).unwrap();
        for i in 0..40 {
            std::fs::write(d.join(format!("f{i}")), format!("file {i}").repeat(i * 100)).unwrap();
        }
        std::fs::write(d.join("x".repeat(150)), b"long name").unwrap();
        std::fs::write(d.join("empty"), b"").unwrap();
        symlink("sub/f1", root.join("d/link")).unwrap();
    }

    struct Archive {
        stored: Vec<u8>,
        plain_tar: Vec<u8>,
        index: Index,
        info: ArchiveInfo,
        roots: Vec<RelPath>,
    }

    fn archive(root: &Path, target: u64) -> Archive {
        archive_of(root, target, super::super::index::INDEX_VERSION)
    }

    /// As [`archive`], with an index of `version`.
    fn archive_of(root: &Path, target: u64, version: u32) -> Archive {
        let layout = DataLayout {
            volume_root: "/".into(),
            datadir: v("d"),
            paths: vec![v("d")],
            exclude: vec![],
        };
        let silent = crate::progress::Silent;
        let (plain_tar, _) =
            write_tar(root, &layout, Vec::new(), &silent, &|| false, None).unwrap();
        let w = FrameWriter::with_target(Vec::new(), 3, 3, target).index_version(version);
        let (w, stats) = write_tar(root, &layout, w, &silent, &|| false, None).unwrap();
        let (stored, index) = w.finish().unwrap();
        let info = ArchiveInfo {
            key: "db1/20261126T093000Z/data.tar.zst".into(),
            size: stored.len() as u64,
            compression: Compression::Zstd,
            level: 3,
            sha256: Sha256Hex::parse(&crate::codec::sha256_hex(&stored)).unwrap(),
            tar_size: stats.tar_size,
            unpacked_size: stats.content_bytes,
            files: stats.files,
            archive_secs: 0.0,
            encryption: None,
            index: None,
            bases: vec![],
            chain: 0,
        };
        Archive {
            stored,
            plain_tar,
            index,
            info,
            roots: layout.paths,
        }
    }

    fn run(a: &Archive, target: Target<'_>) -> Result<Streamed, ArchiveError> {
        let fetch = |_: Option<u32>, r: Range<u64>| -> Result<Bytes, ArchiveError> {
            Ok(Bytes::copy_from_slice(
                &a.stored[r.start as usize..r.end as usize],
            ))
        };
        unpack(
            &a.index,
            "file:///s/data.tar.zst",
            target,
            &fetch,
            4,
            &crate::progress::Silent,
            &|| false,
        )
    }

    #[test]
    fn frames_are_one_zstd_stream_of_the_same_tar_and_unpack_in_parallel() {
        let src = tempfile::tempdir().unwrap();
        tree(src.path());
        let a = archive(src.path(), 64 << 10);
        // The escape hatch: `zstd -dc` of the concatenated frames is the tar stream.
        assert_eq!(
            zstd::stream::decode_all(&a.stored[..]).unwrap(),
            a.plain_tar
        );
        assert!(a.index.frames.len() > 3, "{} frames", a.index.frames.len());
        let big = a.index.entries.iter().find(|e| e.path == "d/big").unwrap();
        assert!(big.chunks.len() >= 4, "{:?}", big.chunks);
        // Stored and parsed back, checked against the manifest's totals.
        let stored = a.index.to_stored().unwrap();
        let parsed = Index::parse(&stored, "u", &a.info, &a.roots).unwrap();
        assert_eq!(parsed, a.index);
        let out = tempfile::tempdir().unwrap();
        let s = run(
            &a,
            Target::Dir {
                root: out.path(),
                owner: None,
            },
        )
        .unwrap();
        assert_eq!(s.files, a.info.files);
        assert_eq!(s.file_bytes, a.info.unpacked_size);
        for f in [
            "d/big",
            "d/sub/f7",
            "d/sub/f39",
            "d/sub/empty",
            &format!("d/sub/{}", "x".repeat(150)),
        ] {
            assert_eq!(
                std::fs::read(out.path().join(f)).unwrap(),
                std::fs::read(src.path().join(f)).unwrap(),
                "{f}"
            );
        }
        assert_eq!(
            std::fs::read_link(out.path().join("d/link")).unwrap(),
            Path::new("sub/f1")
        );
        // Tar keeps whole seconds.
        let mtime = |p: &Path| {
            let t = std::fs::metadata(p).unwrap().modified().unwrap();
            t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
        };
        assert_eq!(
            mtime(&out.path().join("d/big")),
            mtime(&src.path().join("d/big"))
        );
        run(&a, Target::Discard).unwrap();
    }

    /// Version 2 digests are BLAKE3; an archive of an older mysnap (index
    /// version 1: SHA-256 digests under the key `sha256`) is still read
    /// and checked; a version this mysnap does not know is refused.
    #[test]
    fn digests_are_blake3_and_a_version_1_index_of_sha256_is_still_read() {
        use super::super::index::PieceHash;
        let src = tempfile::tempdir().unwrap();
        tree(src.path());
        let big = std::fs::read(src.path().join("d/big")).unwrap();
        let first = |a: &Archive| {
            let e = a.index.entries.iter().find(|e| e.path == "d/big").unwrap();
            let c = e.chunks[0].clone();
            (c.digest.to_string(), &big[..c.len as usize])
        };
        let now = archive(src.path(), 64 << 10);
        assert_eq!(now.index.version, 2);
        let (digest, bytes) = first(&now);
        assert_eq!(digest, blake3::hash(bytes).to_hex().as_str());

        let mut a = archive_of(src.path(), 64 << 10, 1);
        assert_eq!(a.index.hash(), PieceHash::Sha256);
        let (digest, bytes) = first(&a);
        assert_eq!(digest, crate::codec::sha256_hex(bytes));
        // As an older mysnap stored it: `sha256` where version 2 says `digest`.
        let json = serde_json::to_string(&a.index)
            .unwrap()
            .replace("\"digest\":", "\"sha256\":");
        assert!(!json.contains("digest"));
        let stored = zstd::bulk::compress(json.as_bytes(), 3).unwrap();
        a.index = Index::parse(&stored, "u", &a.info, &a.roots).unwrap();
        let out = tempfile::tempdir().unwrap();
        let dir = |p| Target::Dir {
            root: p,
            owner: None,
        };
        run(&a, dir(out.path())).unwrap();
        assert_eq!(std::fs::read(out.path().join("d/big")).unwrap(), big);
        run(&a, Target::Discard).unwrap();
        // The same digests taken for BLAKE3 do not match.
        a.index.version = 2;
        let out2 = tempfile::tempdir().unwrap();
        let err = run(&a, dir(out2.path())).unwrap_err();
        assert!(err.to_string().contains("has BLAKE3"), "{err}");
        a.index.version = 1;
        // A changed digest is named with its hash.
        let e = a
            .index
            .entries
            .iter_mut()
            .find(|e| e.path == "d/big")
            .unwrap();
        e.chunks[1].digest = Sha256Hex::parse(&"ab".repeat(32)).unwrap();
        let out3 = tempfile::tempdir().unwrap();
        let err = run(&a, dir(out3.path())).unwrap_err();
        assert!(err.to_string().contains("has SHA-256"), "{err}");
        // A version this mysnap does not know.
        a.index.version = 3;
        let err = a.index.check("u", &a.info, &a.roots).unwrap_err();
        assert!(err.to_string().contains("upgrade mysnap"), "{err}");
    }

    /// A file whose zero blocks span frames: each piece's aligned zero
    /// blocks are allocated, not written; the file has its bytes and length,
    /// also when it ends in zeros.
    #[test]
    fn zero_blocks_in_pieces_are_allocated_not_written() {
        use super::super::tree::ZERO_BLOCK;
        use nix::unistd::{lseek, Whence};
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join("d")).unwrap();
        let mut z = vec![5u8; 1000];
        z.resize(1000 + 6 * ZERO_BLOCK, 0);
        z.extend_from_slice(&[3u8; 70_000]);
        z.resize(z.len() + 3 * ZERO_BLOCK + 7, 0);
        std::fs::write(src.path().join("d/z"), &z).unwrap();
        let a = archive(src.path(), 96 << 10);
        let e = a.index.entries.iter().find(|e| e.path == "d/z").unwrap();
        assert!(e.chunks.len() >= 4, "in pieces: {:?}", e.chunks);
        let out = tempfile::tempdir().unwrap();
        let target = Target::Dir {
            root: out.path(),
            owner: None,
        };
        run(&a, target).unwrap();
        let path = out.path().join("d/z");
        let f = std::fs::File::open(&path).unwrap();
        // Before reading: zeros read into the page cache would count as data.
        let hole = lseek(&f, 0, Whence::SeekHole).unwrap() as usize;
        // The first aligned zero block that lies whole in one piece.
        let zeros = 1000..1000 + 6 * ZERO_BLOCK;
        let first = e
            .chunks
            .iter()
            .filter_map(|c| {
                let (from, to) = (c.offset as usize, (c.offset + c.len) as usize);
                let b = from.max(zeros.start).div_ceil(ZERO_BLOCK) * ZERO_BLOCK;
                (b + ZERO_BLOCK <= to.min(zeros.end)).then_some(b)
            })
            .min()
            .expect("a whole zero block in a piece");
        assert_eq!(hole, first, "the first whole zero block is not written");
        assert_eq!(std::fs::read(&path).unwrap(), z);
    }

    /// A fetch of `stored` that records where each read starts in `log`.
    fn recording<'a>(
        stored: &'a [u8],
        log: &'a Mutex<Vec<u64>>,
    ) -> impl Fn(Option<u32>, Range<u64>) -> Result<Bytes, ArchiveError> + Sync + 'a {
        move |_, r| {
            log.lock().unwrap().push(r.start);
            Ok(Bytes::copy_from_slice(
                &stored[r.start as usize..r.end as usize],
            ))
        }
    }

    /// A local copy (a delta restore's) of a big file changed in one
    /// piece and one byte too short: the pieces it holds with the index's
    /// digest are written from it, only the others fetched, and the file
    /// is the archive's.
    #[test]
    fn a_subset_takes_the_pieces_a_local_copy_holds_and_fetches_the_rest() {
        struct Local(Vec<u8>);
        impl super::super::read::Pieces for Local {
            fn read(&self, path: &str, c: &super::super::index::Chunk, buf: &mut Vec<u8>) -> bool {
                buf.clear();
                let (from, to) = (c.offset as usize, (c.offset + c.len) as usize);
                if path != "d/huge" || to > self.0.len() {
                    return false;
                }
                buf.extend_from_slice(&self.0[from..to]);
                true
            }
        }
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join("d")).unwrap();
        let body: Vec<u8> = (0..(6 << 20) as u64)
            .map(|i| (i * 13 % 241) as u8)
            .collect();
        std::fs::write(src.path().join("d/huge"), &body).unwrap();
        let a = archive(src.path(), 1 << 20);
        let e = a.index.entries.iter().find(|e| e.path == "d/huge").unwrap();
        assert_eq!(e.chunks.len(), 6, "{:?}", e.chunks);
        let mut local = body.clone();
        local[(2 << 20) + 5] ^= 1;
        local.pop();
        let fetched = Mutex::new(Vec::new());
        let fetch = recording(&a.stored, &fetched);
        let out = tempfile::tempdir().unwrap();
        let local = Local(local);
        let s = unpack(
            &a.index,
            "u",
            Target::Subset {
                root: out.path(),
                owner: None,
                select: &|_, _| true,
                local: Some(&local),
            },
            &fetch,
            2,
            &crate::progress::Silent,
            &|| false,
        )
        .unwrap();
        assert_eq!(s.local_bytes, 4 << 20, "pieces 0, 1, 3 and 4 from the copy");
        let mut got = fetched.lock().unwrap().clone();
        got.sort();
        let want: Vec<u64> = [2usize, 5]
            .iter()
            .map(|&k| a.index.frames[e.chunks[k].frame as usize].stored_offset)
            .collect();
        assert_eq!(
            got, want,
            "only the changed piece's and the short one's frames"
        );
        assert!(std::fs::read(out.path().join("d/huge")).unwrap() == body);
    }

    #[test]
    fn a_subset_writes_only_the_chosen_entries_and_fetches_only_their_frames() {
        let src = tempfile::tempdir().unwrap();
        tree(src.path());
        let a = archive(src.path(), 64 << 10);
        let big = a.index.entries.iter().find(|e| e.path == "d/big").unwrap();
        let frames: std::collections::BTreeSet<u64> =
            big.chunks.iter().map(|c| u64::from(c.frame)).collect();
        let read = Mutex::new(Vec::new());
        let fetch = recording(&a.stored, &read);
        let out = tempfile::tempdir().unwrap();
        let select = |p: &str, k: super::super::policy::Kind| {
            p == "d/big" || k == super::super::policy::Kind::Dir
        };
        let s = unpack(
            &a.index,
            "u",
            Target::Subset {
                root: out.path(),
                owner: None,
                select: &select,
                local: None,
            },
            &fetch,
            2,
            &crate::progress::Silent,
            &|| false,
        )
        .unwrap();
        assert_eq!(s.written_files, 1);
        assert_eq!(s.files, a.info.files, "every entry is still counted");
        let mut read = read.lock().unwrap().clone();
        read.sort();
        let want: Vec<u64> = frames
            .iter()
            .map(|&f| a.index.frames[f as usize].stored_offset)
            .collect();
        assert_eq!(read, want, "only the frames of d/big");
        assert!(read.len() < a.index.frames.len());
        assert_eq!(
            s.fetched_bytes,
            frames
                .iter()
                .map(|&f| a.index.frames[f as usize].stored_len)
                .sum::<u64>()
        );
        assert_eq!(
            std::fs::read(out.path().join("d/big")).unwrap(),
            std::fs::read(src.path().join("d/big")).unwrap()
        );
        assert!(out.path().join("d/sub").is_dir());
        assert!(!out.path().join("d/sub/f1").exists());
        assert!(!out.path().join("d/link").exists());
    }

    #[test]
    fn a_flipped_byte_names_the_file_of_its_frame_and_a_bad_chunk_names_its_file() {
        let src = tempfile::tempdir().unwrap();
        tree(src.path());
        let mut a = archive(src.path(), 64 << 10);
        let big = a.index.entries.iter().find(|e| e.path == "d/big").unwrap();
        let frame = &a.index.frames[big.chunks[2].frame as usize];
        let at = (frame.stored_offset + frame.stored_len / 2) as usize;
        a.stored[at] ^= 1;
        let err = run(&a, Target::Discard).unwrap_err().to_string();
        assert!(err.contains("d/big") && err.contains("corrupted"), "{err}");
        a.stored[at] ^= 1;
        let e = a
            .index
            .entries
            .iter_mut()
            .find(|e| e.path == "d/sub/f3")
            .unwrap();
        e.chunks[0].digest = Sha256Hex::parse(&"0".repeat(64)).unwrap();
        let err = run(&a, Target::Discard).unwrap_err();
        assert_eq!(err.exit_code(), crate::error::ExitCode::Integrity);
        assert!(err.to_string().contains("d/sub/f3 (bytes 0.."), "{err}");
    }

    /// Each forgery of a good index, and what its refusal says.
    #[test]
    fn forged_indexes_are_refused_before_anything_is_read() {
        let src = tempfile::tempdir().unwrap();
        tree(src.path());
        let a = archive(src.path(), 64 << 10);
        type Forge = fn(&mut Index);
        let forgeries: &[(&str, Forge, &str)] = &[
            (
                "path out",
                |i| i.entries[3].path = "d/../../etc/passwd".into(),
                "unsafe",
            ),
            (
                "absolute",
                |i| i.entries[3].path = "/etc/passwd".into(),
                "unsafe",
            ),
            (
                "outside roots",
                |i| i.entries[0].path = "e".into(),
                "unsafe",
            ),
            (
                "link out",
                |i| {
                    let l = i.entries.iter_mut().find(|e| e.link.is_some()).unwrap();
                    l.link = Some("../../etc".into());
                },
                "unsafe",
            ),
            (
                "replaces",
                |i| {
                    let p = i.entries[2].path.clone();
                    i.entries[3].path = p;
                },
                "unsafe",
            ),
            ("gap", |i| i.frames[1].tar_offset += 1, "does not follow"),
            (
                "stored gap",
                |i| i.frames[1].stored_offset += 1,
                "does not follow",
            ),
            (
                "huge frame",
                |i| i.frames[0].tar_len = 1 << 40,
                "frame 0 holds",
            ),
            (
                "chunk outside",
                |i| {
                    let f = i.entries.iter_mut().find(|e| e.path == "d/big").unwrap();
                    f.chunks[0].frame += 1;
                },
                "inside its frame",
            ),
            (
                "chunk overflow",
                |i| {
                    let f = i.entries.iter_mut().find(|e| e.path == "d/big").unwrap();
                    f.chunks[0].len = u64::MAX;
                },
                "inside its frame",
            ),
            (
                "size",
                |i| {
                    let f = i.entries.iter_mut().find(|e| e.path == "d/big").unwrap();
                    f.size = u64::MAX - 3;
                },
                "a size of",
            ),
            (
                "more files",
                |i| {
                    let mut e = i
                        .entries
                        .iter()
                        .find(|e| e.path == "d/sub/empty")
                        .unwrap()
                        .clone();
                    e.path = "d/sub/extra".into();
                    e.header = i.entries.last().unwrap().data + 512;
                    e.data = e.header + 512;
                    i.entries.push(e);
                },
                "more than",
            ),
            (
                "overlap",
                |i| i.entries[2].header = i.entries[1].header,
                "do not fit",
            ),
            (
                "content on dir",
                |i| {
                    i.entries[0].chunks.push(Chunk {
                        frame: 0,
                        offset: 0,
                        len: 1,
                        digest: Sha256Hex::parse(&"0".repeat(64)).unwrap(),
                        at: None,
                    });
                },
                "not a file",
            ),
            ("no frames", |i| i.frames.clear(), "0 frames"),
            ("version", |i| i.version = 9, "upgrade mysnap"),
            (
                "extra frame",
                |i| {
                    let last = i.frames.last().unwrap().clone();
                    i.frames.push(Frame {
                        tar_offset: last.tar_offset + last.tar_len,
                        stored_offset: last.stored_offset + last.stored_len,
                        ..last
                    });
                },
                "the manifest says",
            ),
            (
                "missing entry",
                |i| {
                    i.entries.retain(|e| e.path != "d/sub/f5");
                },
                "the manifest says",
            ),
        ];
        for (what, forge, says) in forgeries {
            let mut i = a.index.clone();
            forge(&mut i);
            let err = Index::parse(&i.to_stored().unwrap(), "u", &a.info, &a.roots)
                .expect_err(what)
                .to_string();
            assert!(err.to_lowercase().contains(says), "{what}: {err}");
        }
        // Not an index at all; too large; an unknown field.
        let err = Index::parse(b"garbage", "u", &a.info, &a.roots).unwrap_err();
        assert!(err.to_string().contains("its index"), "{err}");
        let big = vec![0u8; (super::super::index::MAX_INDEX_STORED + 1) as usize];
        assert!(matches!(
            Index::parse(&big, "u", &a.info, &a.roots),
            Err(ArchiveError::TooLarge { .. })
        ));
        let json = br#"{"version":1,"frames":[],"entries":[],"extra":1}"#;
        let err = Index::parse(
            &zstd::bulk::compress(json, 1).unwrap(),
            "u",
            &a.info,
            &a.roots,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    /// A frame whose header asks for a window larger than any frame (and
    /// declares no content size, which would bound it) is refused before
    /// its window is allocated, though its bytes are the right tar stream.
    #[test]
    fn a_frame_asking_for_a_window_larger_than_a_frame_is_refused() {
        use zstd::zstd_safe::CParameter;
        let src = tempfile::tempdir().unwrap();
        tree(src.path());
        let mut a = archive(src.path(), 64 << 20);
        assert_eq!(a.index.frames.len(), 1, "one frame");
        let mut e = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        e.set_parameter(CParameter::WindowLog(27)).unwrap();
        e.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut e, &a.plain_tar).unwrap();
        a.stored = e.finish().unwrap();
        // Its digest and length in the index are its own (the index is
        // forged too, or unauthenticated).
        a.index.frames[0].stored_len = a.stored.len() as u64;
        a.index.frames[0].digest = a.index.hash().digest(&a.stored);
        a.info.size = a.stored.len() as u64;
        a.index.check("u", &a.info, &a.roots).unwrap();
        let out = tempfile::tempdir().unwrap();
        for target in [
            Target::Discard,
            Target::Dir {
                root: out.path(),
                owner: None,
            },
        ] {
            let err = run(&a, target).unwrap_err().to_string();
            assert!(
                err.contains("does not decompress") && err.contains("corrupted"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_header_that_disagrees_with_the_index_is_refused() {
        let src = tempfile::tempdir().unwrap();
        tree(src.path());
        let mut a = archive(src.path(), 64 << 10);
        // Two small files of the same size swap names in the index: paths,
        // chunks and totals all fit, the tar headers do not.
        let i = a
            .index
            .entries
            .iter()
            .position(|e| e.path == "d/sub/f10")
            .unwrap();
        a.index.entries[i].path = "d/sub/g10".into();
        a.index.check("u", &a.info, &a.roots).unwrap();
        let err = run(&a, Target::Discard).unwrap_err().to_string();
        assert!(
            err.contains("d/sub/g10") && err.contains("does not agree"),
            "{err}"
        );
    }
}
