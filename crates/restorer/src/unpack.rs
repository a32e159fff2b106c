//! One path for `verify` and `restore`: download → SHA-256 of the stored
//! bytes → decompress → tar entries checked for safety → unpacked (restore)
//! or read and discarded (verify). Size and SHA-256 are compared at the end.

use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use common::codec::{decoder, Hashing};
use common::error::{integrity_err, Error};
use common::manifest::ArchiveInfo;
use common::progress::Progress;
use tar::EntryType;

/// Where entries go.
pub enum Target<'a> {
    /// Read and discard (verify).
    Discard,
    /// Unpack below `root`, owned by `owner` (uid, gid) when given.
    Dir {
        root: &'a Path,
        owner: Option<(u32, u32)>,
    },
}

/// What the stream held.
#[derive(Debug, Default, Clone, Copy)]
pub struct Streamed {
    pub entries: u64,
    pub files: u64,
    pub file_bytes: u64,
}

/// Marks `flag` when a read fails, so the failure can be told apart from a
/// failure to write.
struct FlagOnError<R> {
    inner: R,
    flag: Arc<AtomicBool>,
}

impl<R: Read> Read for FlagOnError<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => Ok(n),
            Err(e) => {
                self.flag.store(true, Ordering::SeqCst);
                Err(e)
            }
        }
    }
}

/// Why an entry may not be unpacked, or `None` when it is safe: no absolute
/// paths, no `..`, no links leaving the tree, no device nodes or fifos.
pub fn unsafe_entry(path: &Path, kind: EntryType, link: Option<&Path>) -> Option<String> {
    let shown = path.display();
    if path.as_os_str().is_empty() {
        return Some("an entry with an empty name".into());
    }
    for c in path.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => {
                return Some(format!("{shown}: an absolute path"))
            }
            Component::ParentDir => return Some(format!("{shown}: a '..' component")),
            _ => {}
        }
    }
    match kind {
        EntryType::Regular | EntryType::Continuous | EntryType::Directory => None,
        EntryType::Symlink => {
            let Some(target) = link else {
                return Some(format!("{shown}: a symlink without a target"));
            };
            if target.is_absolute() {
                return Some(format!(
                    "{shown}: a symlink to an absolute path {}",
                    target.display()
                ));
            }
            // Walk from the link's directory; the depth must never go below the root.
            let mut depth: i64 = path.components().count() as i64 - 1;
            for c in target.components() {
                match c {
                    Component::ParentDir => depth -= 1,
                    Component::Normal(_) => depth += 1,
                    _ => {}
                }
                if depth < 0 {
                    return Some(format!(
                        "{shown}: a symlink to {} outside the data directory",
                        target.display()
                    ));
                }
            }
            None
        }
        EntryType::Link => {
            let Some(target) = link else {
                return Some(format!("{shown}: a hard link without a target"));
            };
            if target.is_absolute()
                || target
                    .components()
                    .any(|c| matches!(c, Component::ParentDir))
            {
                return Some(format!(
                    "{shown}: a hard link to {} outside the data directory",
                    target.display()
                ));
            }
            None
        }
        EntryType::Char | EntryType::Block => Some(format!("{shown}: a device node")),
        EntryType::Fifo => Some(format!("{shown}: a fifo")),
        other => Some(format!("{shown}: an entry of type {other:?}")),
    }
}

/// Decompressed bytes travel from the decoding thread to the unpacking
/// thread in chunks of this size, at most [`QUEUED`] of them waiting.
const CHUNK: u64 = 1 << 20;
const QUEUED: usize = 8;

/// Streams the archive read from `stored` (the bytes as stored) into `target`.
/// This thread hashes and decompresses; a second one checks and unpacks the
/// tar entries, so the two overlap. Read and integrity failures are exit 4;
/// failures to write are exit 1; `store_failed` tells a failing download
/// apart (exit 1).
pub fn stream(
    stored: impl Read,
    info: &ArchiveInfo,
    target: Target<'_>,
    progress: &dyn Progress,
    store_failed: &AtomicBool,
) -> anyhow::Result<Streamed> {
    let read_failed = Arc::new(AtomicBool::new(false));
    let classify = |e: anyhow::Error| -> anyhow::Error {
        if e.chain().any(|c| c.downcast_ref::<Error>().is_some()) {
            e
        } else if store_failed.load(Ordering::SeqCst) {
            e.context("the download from the store failed")
        } else if read_failed.load(Ordering::SeqCst) {
            integrity_err(format!(
                "the archive {} is corrupt or truncated: {e:#}",
                info.key
            ))
        } else {
            e
        }
    };
    let (tx, rx) = mpsc::sync_channel(QUEUED);
    let (decoded, unpacked) = std::thread::scope(|scope| {
        let unpacking = scope.spawn(|| {
            let mut chunks = Chunks {
                rx,
                current: Vec::new(),
                pos: 0,
            };
            let r = entries(&mut chunks, info, &target);
            // Take what follows the end of the tar stream, so the decoder
            // runs to its end; on an error, dropping `chunks` stops it.
            r.and_then(|s| Ok(io::copy(&mut chunks, &mut io::sink()).map(|_| s)?))
        });
        let mut hashing = Hashing::new(ProgressRead {
            inner: stored,
            progress,
        });
        let decoded = decode(&mut hashing, info, &tx, &read_failed).and_then(|()| {
            drop(tx);
            // Whatever follows the end of the compressed stream is hashed too.
            io::copy(&mut hashing, &mut io::sink())?;
            Ok(hashing.finish())
        });
        let unpacked = unpacking
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the unpacking thread panicked")));
        (decoded, unpacked)
    });
    let ((_, size, sha), streamed) = match (decoded, unpacked) {
        // The decoder stopped because unpacking did: unpacking's error says why.
        (Err(e), Err(u)) if e.kind() == io::ErrorKind::BrokenPipe => return Err(classify(u)),
        (Err(e), _) => return Err(classify(e.into())),
        (Ok(_), Err(u)) => return Err(classify(u)),
        (Ok(hashed), Ok(streamed)) => (hashed, streamed),
    };
    if size != info.size {
        return Err(integrity_err(format!(
            "the archive {} is {size} bytes, its manifest says {}: truncated or replaced",
            info.key, info.size
        )));
    }
    if sha != info.sha256 {
        return Err(integrity_err(format!(
            "the archive {} has SHA-256 {sha}, its manifest says {}: corrupted",
            info.key, info.sha256
        )));
    }
    Ok(streamed)
}

/// Decompresses `stored` into chunks for the unpacking thread; a decoding
/// error is sent on too, and marks `read_failed`.
fn decode<R: Read>(
    stored: &mut R,
    info: &ArchiveInfo,
    tx: &mpsc::SyncSender<io::Result<Vec<u8>>>,
    read_failed: &Arc<AtomicBool>,
) -> io::Result<()> {
    let mut decoded = FlagOnError {
        inner: decoder(stored, info.compression)?,
        flag: read_failed.clone(),
    };
    let stopped = || io::Error::new(io::ErrorKind::BrokenPipe, "unpacking stopped");
    loop {
        let mut chunk = Vec::with_capacity(CHUNK as usize);
        if let Err(e) = (&mut decoded).take(CHUNK).read_to_end(&mut chunk) {
            let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
            return Err(e);
        }
        if chunk.is_empty() {
            return Ok(());
        }
        tx.send(Ok(chunk)).map_err(|_| stopped())?;
    }
}

/// The unpacking end: a `Read` over the decoded chunks.
struct Chunks {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    current: Vec<u8>,
    pos: usize,
}

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => (self.current, self.pos) = (chunk, 0),
                Ok(Err(e)) => return Err(e),
                // The decoder finished (or failed, and says so itself).
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

struct ProgressRead<'a, R> {
    inner: R,
    progress: &'a dyn Progress,
}

impl<R: Read> Read for ProgressRead<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
}

/// Checks and unpacks (or discards) the tar entries of the decoded stream.
fn entries(
    decoded: &mut impl Read,
    info: &ArchiveInfo,
    target: &Target<'_>,
) -> anyhow::Result<Streamed> {
    let mut ar = tar::Archive::new(decoded);
    ar.set_preserve_permissions(true);
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(true);
    let mut s = Streamed::default();
    for entry in ar.entries()? {
        let mut e = entry?;
        let path: PathBuf = e.path()?.into_owned();
        let kind = e.header().entry_type();
        let link = e.link_name()?.map(|l| l.into_owned());
        if let Some(why) = unsafe_entry(&path, kind, link.as_deref()) {
            return Err(integrity_err(format!(
                "the archive {} holds an unsafe entry, refused: {why}",
                info.key
            )));
        }
        s.entries += 1;
        if kind.is_file() {
            s.files += 1;
            s.file_bytes += e.header().size()?;
        }
        match target {
            Target::Discard => {
                io::copy(&mut e, &mut io::sink())?;
            }
            Target::Dir { root, owner } => {
                if !e.unpack_in(root).map_err(|err| {
                    anyhow::Error::new(err).context(format!("cannot unpack {}", path.display()))
                })? {
                    return Err(integrity_err(format!(
                        "the archive {} holds an unsafe entry, refused: {}",
                        info.key,
                        path.display()
                    )));
                }
                if let Some((uid, gid)) = owner {
                    let p = root.join(&path);
                    std::os::unix::fs::lchown(&p, Some(*uid), Some(*gid))
                        .map_err(|err| anyhow::anyhow!("cannot chown {}: {err}", p.display()))?;
                }
            }
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(path: &str, kind: EntryType, link: Option<&str>) -> Option<String> {
        unsafe_entry(Path::new(path), kind, link.map(Path::new))
    }

    #[test]
    fn safe_and_unsafe_entries() {
        assert_eq!(check("mysql/db/t.ibd", EntryType::Regular, None), None);
        assert_eq!(check("mysql", EntryType::Directory, None), None);
        assert_eq!(
            check("mysql/link", EntryType::Symlink, Some("db/t.ibd")),
            None
        );
        assert_eq!(
            check("mysql/db/link", EntryType::Symlink, Some("../other")),
            None
        );
        assert!(check("/etc/passwd", EntryType::Regular, None)
            .unwrap()
            .contains("absolute"));
        assert!(check("mysql/../../etc/x", EntryType::Regular, None)
            .unwrap()
            .contains("'..'"));
        assert!(check("mysql/l", EntryType::Symlink, Some("/etc"))
            .unwrap()
            .contains("absolute"));
        assert!(check("mysql/l", EntryType::Symlink, Some("../../etc"))
            .unwrap()
            .contains("outside"));
        assert!(check("l", EntryType::Symlink, Some("a/../../b"))
            .unwrap()
            .contains("outside"));
        assert!(check("mysql/h", EntryType::Link, Some("../x"))
            .unwrap()
            .contains("outside"));
        assert_eq!(
            check("mysql/h", EntryType::Link, Some("mysql/db/t.ibd")),
            None
        );
        assert!(check("mysql/null", EntryType::Char, None)
            .unwrap()
            .contains("device node"));
        assert!(check("mysql/sda", EntryType::Block, None)
            .unwrap()
            .contains("device node"));
        assert!(check("mysql/p", EntryType::Fifo, None)
            .unwrap()
            .contains("fifo"));
    }
}
