//! The read path of `verify` and `restore`: stored bytes → SHA-256 →
//! decrypt (`crypt::open`, when the manifest says it is encrypted) →
//! decompress (bounded: no more than the manifest's `tar_size`) → tar entries
//! admitted by the [`Policy`] → unpacked through [`SafeDir`] (restore) or read
//! and discarded (verify). Size and SHA-256 are compared at the end.
//!
//! This thread hashes and decompresses; a second one checks and unpacks the
//! entries, so the two overlap.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use bytes::Bytes;
use tar::EntryType;

use super::policy::{Kind, Policy, MAX_PATH};
use super::tree::{Owner, SafeDir, ZeroSkipping};
use super::ArchiveError;
use crate::codec::{decoder, Hashing};
use crate::crypt::{self, Identities};
use crate::manifest::{ArchiveInfo, RelPath};
use crate::progress::Progress;
use crate::reader::{ChunkReader, ProgressReader};

/// Where entries go.
pub enum Target<'a> {
    /// Read and discard (verify).
    Discard,
    /// Unpack below `root` (an empty directory), owned by `owner` (uid, gid) when given.
    Dir { root: &'a Path, owner: Owner },
    /// As [`Target::Dir`], but only the entries `select` chooses (by path
    /// and kind); the others are checked like every entry, not written, and
    /// an indexed archive's frames that hold no chosen file are not read.
    Subset {
        root: &'a Path,
        owner: Owner,
        select: Select<'a>,
        /// Where an indexed archive's pieces of a chosen file may be read
        /// instead of fetched (a delta restore's local copy).
        local: Option<&'a dyn Pieces>,
    },
}

/// A local copy of files a [`Target::Subset`] writes: a piece found there
/// with the index's digest is written from it, not fetched.
pub trait Pieces: Sync {
    /// Reads the `chunk.len` bytes at `chunk.offset` of the local copy of
    /// the archive's file `path` into `buf` (cleared first); `false` when
    /// there is no such copy or it is shorter. The caller checks them.
    fn read(&self, path: &str, chunk: &super::index::Chunk, buf: &mut Vec<u8>) -> bool;
}

/// Which entries a [`Target::Subset`] writes: path (relative to the volume
/// root, as in the archive) and kind.
pub type Select<'a> = &'a (dyn Fn(&str, Kind) -> bool + Sync);

impl Target<'_> {
    /// Whether the entry `path` of `kind` is to be written (or read, with
    /// [`Target::Discard`]).
    pub fn selects(&self, path: &str, kind: Kind) -> bool {
        match self {
            Target::Subset { select, .. } => select(path, kind),
            Target::Discard | Target::Dir { .. } => true,
        }
    }

    /// The local copy of a [`Target::Subset`], if any.
    pub fn local(&self) -> Option<&dyn Pieces> {
        match self {
            Target::Subset { local, .. } => *local,
            _ => None,
        }
    }

    /// Whether only some entries are written.
    pub fn is_subset(&self) -> bool {
        matches!(self, Target::Subset { .. })
    }
}

/// What the stream held.
#[derive(Debug, Default, Clone, Copy)]
pub struct Streamed {
    pub entries: u64,
    pub files: u64,
    pub file_bytes: u64,
    /// Files written (all of them, unless a [`Target::Subset`]).
    pub written_files: u64,
    /// Stored bytes read from the store.
    pub fetched_bytes: u64,
    /// Bytes of files' pieces written from [`Target::Subset`]'s local copy.
    pub local_bytes: u64,
}

/// Decompressed bytes travel from the decoding thread to the unpacking
/// thread in chunks of this size, at most [`QUEUED`] of them waiting.
const CHUNK: u64 = 1 << 20;
const QUEUED: usize = 8;

/// Streams the archive read from `stored` (the bytes as stored at `url`)
/// into `target`. `roots` are the manifest's `data.paths`; `store_failed` is
/// set by the download when the store, not the data, failed; `identities`
/// decrypt an encrypted archive.
#[allow(clippy::too_many_arguments)]
pub fn stream(
    stored: impl Read + Send,
    url: &str,
    info: &ArchiveInfo,
    roots: &[RelPath],
    target: Target<'_>,
    progress: &dyn Progress,
    store_failed: &AtomicBool,
    identities: Option<&Identities>,
) -> Result<Streamed, ArchiveError> {
    // A missing or wrong key is refused before anything is read or written.
    crypt::check_keys(info.encryption.as_ref(), identities).map_err(|why| ArchiveError::Key {
        url: url.to_string(),
        why,
    })?;
    let (tx, rx) = mpsc::sync_channel(QUEUED);
    let (decoded, unpacked) = std::thread::scope(|scope| {
        let unpacking = scope.spawn(|| {
            let mut chunks = ChunkReader::new(rx);
            let r = entries(&mut chunks, url, info, roots, &target);
            // Take the end-of-archive padding, so the decoder runs to its
            // end; on an error, dropping `chunks` stops it.
            r.and_then(|s| {
                io::copy(&mut chunks, &mut io::sink())
                    .map(|_| s)
                    .map_err(|e| corrupt(url, e))
            })
        });
        let mut hashing = Hashing::new(ProgressReader::new(stored, progress));
        let decoded = if info.encryption.is_none() {
            decode(&mut hashing, url, info, &tx, store_failed).and_then(|()| {
                drop(tx);
                // Whatever follows the end of the compressed stream is hashed too.
                io::copy(&mut hashing, &mut io::sink())
                    .map_err(|e| read_error(url, e, store_failed))?;
                let (_, size, sha) = hashing.finish();
                Ok((size, sha))
            })
        } else {
            // Decryption costs about what decompression does: it runs on
            // a thread of its own, ahead of the decoder.
            let (plain_tx, plain_rx) = mpsc::sync_channel(QUEUED);
            let opening = scope
                .spawn(move || decrypt(hashing, url, info, &plain_tx, store_failed, identities));
            let mut plain = ChunkReader::new(plain_rx);
            let decoded = decode(&mut plain, url, info, &tx, store_failed).and_then(|()| {
                drop(tx);
                // What follows the compressed stream is decrypted and dropped.
                io::copy(&mut plain, &mut io::sink())
                    .map(|_| ())
                    .map_err(|e| read_error(url, e, store_failed))
            });
            drop(plain);
            let opened = opening.join().unwrap_or_else(|_| {
                Err(ArchiveError::Corrupt {
                    url: url.to_string(),
                    why: "the decrypting thread panicked".into(),
                })
            });
            match (opened, decoded) {
                // The decryption's own error (a key, the store, a changed
                // chunk) says more than the decoder's view of it.
                (Err(o), _) if !matches!(o, ArchiveError::Stopped) => Err(o),
                (_, Err(d)) => Err(d),
                (o, Ok(())) => o,
            }
        };
        let unpacked = unpacking.join().unwrap_or_else(|_| {
            Err(ArchiveError::Corrupt {
                url: url.to_string(),
                why: "the unpacking thread panicked".into(),
            })
        });
        (decoded, unpacked)
    });
    let ((size, sha), streamed) = match (decoded, unpacked) {
        // The decoder stopped because unpacking did: unpacking's error says why.
        (Err(ArchiveError::Stopped), Err(u)) => return Err(u),
        // Both failed: an entry refused on its own says more than a stream
        // that also ends wrong (a forged archive is usually both).
        (
            Err(_),
            Err(
                u @ (ArchiveError::Unsafe { .. }
                | ArchiveError::TooLarge { .. }
                | ArchiveError::Write { .. }),
            ),
        ) => return Err(u),
        (Err(d), _) => return Err(d),
        (Ok(_), Err(u)) => return Err(u),
        (Ok(hashed), Ok(streamed)) => (hashed, streamed),
    };
    if size != info.size {
        return Err(ArchiveError::SizeMismatch {
            url: url.to_string(),
            got: size,
            want: info.size,
        });
    }
    if sha != info.sha256.as_str() {
        return Err(ArchiveError::ChecksumMismatch {
            url: url.to_string(),
            got: sha,
            want: info.sha256.to_string(),
        });
    }
    Ok(Streamed {
        fetched_bytes: size,
        ..streamed
    })
}

fn corrupt(url: &str, e: impl std::fmt::Display) -> ArchiveError {
    ArchiveError::Corrupt {
        url: url.to_string(),
        why: e.to_string(),
    }
}

fn read_error(url: &str, e: io::Error, store_failed: &AtomicBool) -> ArchiveError {
    if store_failed.load(Ordering::SeqCst) {
        ArchiveError::Store {
            url: url.to_string(),
            why: e.to_string(),
        }
    } else {
        corrupt(url, e)
    }
}

/// Reads `stored` whole (hashing it), decrypted, into chunks for the
/// decoder; an error is sent on too, so the decoder stops. The stored size
/// and SHA-256 once the whole object is read.
fn decrypt<R: Read>(
    mut stored: Hashing<R>,
    url: &str,
    info: &ArchiveInfo,
    tx: &mpsc::SyncSender<io::Result<Bytes>>,
    store_failed: &AtomicBool,
    identities: Option<&Identities>,
) -> Result<(u64, String), ArchiveError> {
    let fail = |e: ArchiveError| {
        let _ = tx.send(Err(io::Error::other(e.to_string())));
        e
    };
    let mut plain =
        crypt::open(&mut stored, info.encryption.as_ref(), identities).map_err(|why| {
            fail(if store_failed.load(Ordering::SeqCst) {
                ArchiveError::Store {
                    url: url.to_string(),
                    why,
                }
            } else {
                ArchiveError::Key {
                    url: url.to_string(),
                    why,
                }
            })
        })?;
    loop {
        let mut chunk = Vec::with_capacity(CHUNK as usize);
        if let Err(e) = (&mut plain).take(CHUNK).read_to_end(&mut chunk) {
            return Err(fail(read_error(url, e, store_failed)));
        }
        if chunk.is_empty() {
            break;
        }
        tx.send(Ok(Bytes::from(chunk)))
            .map_err(|_| ArchiveError::Stopped)?;
    }
    drop(plain);
    // Whatever follows the end of the age stream is hashed too.
    io::copy(&mut stored, &mut io::sink()).map_err(|e| fail(read_error(url, e, store_failed)))?;
    let (_, size, sha) = stored.finish();
    Ok((size, sha))
}

/// Decompresses `plain` (the stored bytes, decrypted) into chunks for the
/// unpacking thread, no more than `info.tar_size` bytes; an error is sent
/// on too, so unpacking stops.
fn decode<R: Read>(
    plain: &mut R,
    url: &str,
    info: &ArchiveInfo,
    tx: &mpsc::SyncSender<io::Result<Bytes>>,
    store_failed: &AtomicBool,
) -> Result<(), ArchiveError> {
    let fail = |e: ArchiveError| {
        let _ = tx.send(Err(io::Error::other(e.to_string())));
        e
    };
    let mut decoded =
        decoder(plain, info.compression).map_err(|e| fail(read_error(url, e, store_failed)))?;
    let mut total = 0u64;
    loop {
        let mut chunk = Vec::with_capacity(CHUNK as usize);
        // One byte more than allowed shows a stream longer than declared;
        // whole chunks otherwise (no reallocation).
        let room = (info.tar_size - total + 1).min(CHUNK);
        if let Err(e) = (&mut decoded).take(room).read_to_end(&mut chunk) {
            return Err(fail(read_error(url, e, store_failed)));
        }
        total += chunk.len() as u64;
        if total > info.tar_size {
            return Err(fail(ArchiveError::TooLarge {
                url: url.to_string(),
                what: format!(
                    "it decompresses to more than the {} bytes of tar stream its manifest declares",
                    info.tar_size
                ),
            }));
        }
        if chunk.is_empty() {
            break;
        }
        tx.send(Ok(Bytes::from(chunk)))
            .map_err(|_| ArchiveError::Stopped)?;
    }
    if total < info.tar_size {
        return Err(fail(ArchiveError::Truncated {
            url: url.to_string(),
            why: format!(
                "it decompresses to {total} bytes of tar stream, its manifest declares {}",
                info.tar_size
            ),
        }));
    }
    Ok(())
}

/// Reads the data of a GNU long name/link entry: at most [`MAX_PATH`] bytes.
fn long_name(e: &mut impl Read, size: u64, url: &str, what: &str) -> Result<Vec<u8>, ArchiveError> {
    if size > MAX_PATH as u64 + 1 {
        return Err(ArchiveError::TooLarge {
            url: url.to_string(),
            what: format!(
                "a GNU long {what} of {size} bytes (at most {} allowed)",
                MAX_PATH + 1
            ),
        });
    }
    let mut v = Vec::with_capacity(size as usize);
    e.take(size)
        .read_to_end(&mut v)
        .map_err(|e| corrupt(url, e))?;
    while v.last() == Some(&0) {
        v.pop();
    }
    Ok(v)
}

/// Checks and unpacks (or discards) the tar entries of the decoded stream.
/// The tar crate parses headers; GNU long names are applied here (raw mode),
/// so their size is bounded.
fn entries(
    decoded: &mut impl Read,
    url: &str,
    info: &ArchiveInfo,
    roots: &[RelPath],
    target: &Target<'_>,
) -> Result<Streamed, ArchiveError> {
    let mut policy = Policy::new(roots);
    let mut unpacker = Unpacker::for_target(target)?;
    let mut ar = tar::Archive::new(decoded);
    let mut s = Streamed::default();
    let (mut name, mut link): (Option<Vec<u8>>, Option<Vec<u8>>) = (None, None);
    for entry in ar.entries().map_err(|e| corrupt(url, e))?.raw(true) {
        let mut e = entry.map_err(|e| corrupt(url, e))?;
        let ty = e.header().entry_type();
        let size = e.size();
        if ty.is_gnu_longname() {
            name = Some(long_name(&mut e, size, url, "name")?);
            continue;
        }
        if ty.is_gnu_longlink() {
            link = Some(long_name(&mut e, size, url, "link name")?);
            continue;
        }
        let path_bytes = name
            .take()
            .unwrap_or_else(|| e.header().path_bytes().into_owned());
        let link_bytes = link
            .take()
            .or_else(|| e.header().link_name_bytes().map(|l| l.into_owned()));
        let path = String::from_utf8_lossy(&path_bytes).into_owned();
        let unsafe_entry = |why: String| ArchiveError::Unsafe {
            url: url.to_string(),
            path: path.chars().take(200).collect(),
            why,
        };
        if std::str::from_utf8(&path_bytes).is_err() {
            return Err(unsafe_entry("a name that is not UTF-8".into()));
        }
        let kind = kind_of(ty).map_err(unsafe_entry)?;
        let link_text = match (&link_bytes, kind) {
            (Some(l), Kind::Symlink) => Some(
                std::str::from_utf8(l)
                    .map_err(|_| unsafe_entry("a link target that is not UTF-8".into()))?
                    .to_string(),
            ),
            _ => None,
        };
        policy
            .admit(&path, kind, link_text.as_deref())
            .map_err(unsafe_entry)?;
        let len = s
            .count(kind, size, info)
            .map_err(|what| ArchiveError::TooLarge {
                url: url.to_string(),
                what: format!("{what} (at {path})"),
            })?;
        let copied = match unpacker.as_mut().filter(|_| target.selects(&path, kind)) {
            None => io::copy(&mut (&mut e).take(len), &mut io::sink())
                .map_err(|err| corrupt(url, err))?,
            Some(u) => {
                if kind == Kind::File {
                    s.written_files += 1;
                }
                let mode = e.header().mode().unwrap_or(0o600);
                let mtime = e.header().mtime().ok();
                u.put(
                    &path,
                    kind,
                    link_text.as_deref(),
                    &mut e,
                    len,
                    mode,
                    mtime,
                    url,
                )?
            }
        };
        if copied != len {
            return Err(ArchiveError::Truncated {
                url: url.to_string(),
                why: format!("{path} ends after {copied} of its {len} bytes"),
            });
        }
    }
    if name.is_some() || link.is_some() {
        return Err(ArchiveError::Truncated {
            url: url.to_string(),
            why: "a long name with no entry after it".into(),
        });
    }
    policy.finish().map_err(|why| corrupt(url, why))?;
    Ok(s)
}

/// What an entry of tar type `ty` is; every type mysnap never writes is refused.
fn kind_of(ty: EntryType) -> Result<Kind, String> {
    Ok(match ty {
        EntryType::Regular | EntryType::Continuous => Kind::File,
        EntryType::Directory => Kind::Dir,
        EntryType::Symlink => Kind::Symlink,
        EntryType::Link => return Err("a hard link (mysnap never writes them)".into()),
        EntryType::Char | EntryType::Block => return Err("a device node".into()),
        EntryType::Fifo => return Err("a fifo".into()),
        EntryType::XHeader | EntryType::XGlobalHeader => {
            return Err("a pax extended header (mysnap never writes them)".into())
        }
        other => return Err(format!("an entry of type {other:?}")),
    })
}

impl Streamed {
    /// Counts an admitted entry of `size` bytes; returns the bytes it
    /// writes. More files or bytes than the manifest declares is refused.
    fn count(&mut self, kind: Kind, size: u64, info: &ArchiveInfo) -> Result<u64, String> {
        self.entries += 1;
        if kind != Kind::File {
            return Ok(0);
        }
        self.files += 1;
        self.file_bytes += size;
        if self.files > info.files || self.file_bytes > info.unpacked_size {
            return Err(format!(
                "it holds more than the {} files and {} bytes of file contents its manifest declares",
                info.files, info.unpacked_size
            ));
        }
        Ok(size)
    }
}

/// Writes admitted entries below the root, never through a link.
pub(super) struct Unpacker {
    pub(super) root: SafeDir,
    pub(super) owner: Owner,
    /// The directory of the previous entry (entries come grouped by directory).
    parent: Option<(String, SafeDir)>,
}

impl Unpacker {
    /// The unpacker of `target`; none when the archive is only read.
    pub(super) fn for_target(target: &Target<'_>) -> Result<Option<Unpacker>, ArchiveError> {
        let (root, owner) = match target {
            Target::Discard => return Ok(None),
            Target::Dir { root, owner } | Target::Subset { root, owner, .. } => (root, owner),
        };
        let root = SafeDir::open(root).map_err(|e| ArchiveError::Write {
            path: root.to_path_buf(),
            source: e,
        })?;
        Ok(Some(Unpacker {
            root,
            owner: *owner,
            parent: None,
        }))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn put(
        &mut self,
        path: &str,
        kind: Kind,
        link: Option<&str>,
        data: &mut impl Read,
        len: u64,
        mode: u32,
        mtime: Option<u64>,
        url: &str,
    ) -> Result<u64, ArchiveError> {
        let path = path.trim_end_matches('/');
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let shown = self.root.shown(Path::new(path));
        let write_err = |e: io::Error| ArchiveError::Write {
            path: shown.clone(),
            source: e,
        };
        // What the policy admitted cannot meet a link or an existing file; if
        // the file system says otherwise, the archive is what is wrong.
        let classify = |e: io::Error| match e.raw_os_error().map(nix::errno::Errno::from_raw) {
            Some(
                nix::errno::Errno::ELOOP | nix::errno::Errno::EEXIST | nix::errno::Errno::ENOTDIR,
            ) => ArchiveError::Unsafe {
                url: url.to_string(),
                path: path.to_string(),
                why: format!("the file system refused it: {e}"),
            },
            _ => write_err(e),
        };
        if self.parent.as_ref().is_none_or(|(p, _)| p != dir) {
            let d = self
                .root
                .subdir(Path::new(dir), true, self.owner)
                .map_err(classify)?;
            self.parent = Some((dir.to_string(), d));
        }
        let parent = &self.parent.as_ref().expect("set above").1;
        let name = Path::new(name);
        match kind {
            Kind::Dir => {
                parent.mkdir(name, mode, self.owner).map_err(classify)?;
                Ok(0)
            }
            Kind::Symlink => {
                parent
                    .symlink(Path::new(link.unwrap_or("")), name, self.owner)
                    .map_err(classify)?;
                Ok(0)
            }
            Kind::File => {
                let f = parent.create_file(name).map_err(classify)?;
                let copied = copy(&mut data.take(len), &f, url, &shown)?;
                SafeDir::finish_file(&f, mode, self.owner, mtime).map_err(write_err)?;
                Ok(copied)
            }
        }
    }
}

/// Copies into the new file `f`, its zero blocks allocated but not written
/// ([`ZeroSkipping`]), telling read failures (the archive) from write
/// failures (the target).
fn copy(r: &mut impl Read, f: &File, url: &str, path: &Path) -> Result<u64, ArchiveError> {
    let write_err = |e| ArchiveError::Write {
        path: PathBuf::from(path),
        source: e,
    };
    let mut buf = vec![0u8; 256 << 10];
    let mut w = ZeroSkipping::new(f);
    // Whole buffers, so the zero blocks' alignment in the file is kept.
    let mut filled = 0;
    loop {
        match r.read(&mut buf[filled..]) {
            Ok(0) => {
                w.write_all(&buf[..filled]).map_err(write_err)?;
                return w.finish().map_err(write_err);
            }
            Ok(got) => filled += got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(corrupt(url, e)),
        };
        if filled == buf.len() {
            w.write_all(&buf).map_err(write_err)?;
            filled = 0;
        }
    }
}
