//! File system access below a directory that never follows a symbolic link:
//! every directory is opened one component at a time with `O_NOFOLLOW`,
//! files are created with `O_EXCL | O_NOFOLLOW`, and everything else works on
//! a directory descriptor (`*at` calls). Restore writes and post-processes
//! the staged copy only through this, so even a link the policy missed could
//! not lead a write out of the tree.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstat, futimens, mkdirat, Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};

/// Owner (uid, gid) given to what is created.
pub type Owner = Option<(u32, u32)>;

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// An open directory; `path` only names it in messages.
pub struct SafeDir {
    fd: OwnedFd,
    path: PathBuf,
}

fn err(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

const DIR_FLAGS: OFlag = OFlag::O_DIRECTORY
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC)
    .union(OFlag::O_RDONLY);

fn chown_fd(fd: impl AsFd, owner: Owner) -> io::Result<()> {
    if let Some((u, g)) = owner {
        fchown(fd, Some(Uid::from_raw(u)), Some(Gid::from_raw(g))).map_err(err)?;
    }
    Ok(())
}

impl SafeDir {
    /// Opens the directory `path` (its last component must not be a link).
    pub fn open(path: &Path) -> io::Result<SafeDir> {
        let fd = nix::fcntl::open(path, DIR_FLAGS, Mode::empty()).map_err(err)?;
        Ok(SafeDir {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` in this directory, for messages.
    pub fn shown(&self, name: &Path) -> PathBuf {
        self.path.join(name)
    }

    /// The directory `rel` below this one, walked one component at a time
    /// without following links; missing ones are made (mode 0700, `owner`)
    /// when `create` is set. `rel` may hold only normal components.
    pub fn subdir(&self, rel: &Path, create: bool, owner: Owner) -> io::Result<SafeDir> {
        let mut cur: Option<OwnedFd> = None;
        let mut path = self.path.clone();
        for c in rel.components() {
            let Component::Normal(name) = c else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: not a plain relative path", rel.display()),
                ));
            };
            let parent = cur.as_ref().map_or(self.fd.as_fd(), |f| f.as_fd());
            let opened = match openat(parent, name, DIR_FLAGS, Mode::empty()) {
                Err(Errno::ENOENT) if create => {
                    match mkdirat(parent, name, Mode::from_bits_truncate(0o700)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(err(e)),
                    }
                    let fd = openat(parent, name, DIR_FLAGS, Mode::empty()).map_err(err)?;
                    chown_fd(&fd, owner)?;
                    fd
                }
                r => r.map_err(err)?,
            };
            path.push(name);
            cur = Some(opened);
        }
        let fd = match cur {
            Some(fd) => fd,
            None => self.fd.try_clone()?,
        };
        Ok(SafeDir { fd, path })
    }

    /// Makes the directory `name` with `mode` (or, when it exists as a
    /// directory, sets `mode` on it); owned by `owner`.
    pub fn mkdir(&self, name: &Path, mode: u32, owner: Owner) -> io::Result<()> {
        match mkdirat(&self.fd, name, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(err(e)),
        }
        let fd = openat(&self.fd, name, DIR_FLAGS, Mode::empty()).map_err(err)?;
        chown_fd(&fd, owner)?;
        fchmod(&fd, Mode::from_bits_truncate(mode & 0o777)).map_err(err)
    }

    /// Creates the file `name`, which must not exist (never through a link).
    pub fn create_file(&self, name: &Path) -> io::Result<File> {
        let fd = openat(
            &self.fd,
            name,
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(err)?;
        Ok(File::from(fd))
    }

    /// Opens the existing file `name` for writing (never through a link, never
    /// creating it): a file [`SafeDir::create_file`] made, written in pieces.
    pub fn open_file(&self, name: &Path) -> io::Result<File> {
        let fd = openat(
            &self.fd,
            name,
            OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(err)?;
        Ok(File::from(fd))
    }

    /// Gives a file made by [`SafeDir::create_file`] its owner, mode
    /// (permission bits only: never set-id) and mtime.
    pub fn finish_file(f: &File, mode: u32, owner: Owner, mtime: Option<u64>) -> io::Result<()> {
        chown_fd(f, owner)?;
        fchmod(f, Mode::from_bits_truncate(mode & 0o777)).map_err(err)?;
        if let Some(t) = mtime {
            let t = TimeSpec::new(t.min(i64::MAX as u64) as i64, 0);
            futimens(f, &t, &t).map_err(err)?;
        }
        Ok(())
    }

    /// Creates the symbolic link `name` → `target`, owned by `owner`.
    pub fn symlink(&self, target: &Path, name: &Path, owner: Owner) -> io::Result<()> {
        symlinkat(target, &self.fd, name).map_err(err)?;
        if let Some((u, g)) = owner {
            fchownat(
                &self.fd,
                name,
                Some(Uid::from_raw(u)),
                Some(Gid::from_raw(g)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(err)?;
        }
        Ok(())
    }

    /// The names in this directory with what each is (a link is a link,
    /// never what it points to), without `.` and `..`.
    pub fn entries(&self) -> io::Result<Vec<(OsString, FileKind)>> {
        let mut dir = nix::dir::Dir::from_fd(self.fd.try_clone()?).map_err(err)?;
        let mut out = Vec::new();
        for e in dir.iter() {
            let e = e.map_err(err)?;
            let name = e.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = OsString::from_vec(name.to_vec());
            let st =
                nix::sys::stat::fstatat(&self.fd, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(err)?;
            let kind = match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
                SFlag::S_IFREG => FileKind::File,
                SFlag::S_IFDIR => FileKind::Dir,
                SFlag::S_IFLNK => FileKind::Symlink,
                _ => FileKind::Other,
            };
            out.push((name, kind));
        }
        Ok(out)
    }

    /// Removes the file or link `name` (never a directory).
    pub fn remove_file(&self, name: &Path) -> io::Result<()> {
        unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir).map_err(err)
    }

    /// Reads the regular file `name`, at most `max` bytes (more is an error).
    pub fn read_file(&self, name: &Path, max: u64) -> io::Result<Vec<u8>> {
        let f = self.open_read(name)?;
        let mut buf = Vec::new();
        f.take(max + 1).read_to_end(&mut buf)?;
        if buf.len() as u64 > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is larger than {max} bytes", self.shown(name).display()),
            ));
        }
        Ok(buf)
    }

    /// Replaces the regular file `name` with `bytes`, keeping its owner and
    /// mode: a new file beside it, fsync, rename over it.
    pub fn replace_file(&self, name: &Path, bytes: &[u8]) -> io::Result<()> {
        let st =
            nix::sys::stat::fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(err)?;
        let mut tmp_name = OsString::from(".mysnap-tmp-");
        tmp_name.push(name.as_os_str());
        let tmp = Path::new(&tmp_name);
        let _ = unlinkat(&self.fd, tmp, UnlinkatFlags::NoRemoveDir);
        let result = (|| {
            let mut f = self.create_file(tmp)?;
            f.write_all(bytes)?;
            fchown(
                &f,
                Some(Uid::from_raw(st.st_uid)),
                Some(Gid::from_raw(st.st_gid)),
            )
            .map_err(err)?;
            fchmod(&f, Mode::from_bits_truncate(st.st_mode & 0o777)).map_err(err)?;
            f.sync_all()?;
            nix::fcntl::renameat(&self.fd, tmp, &self.fd, name).map_err(err)
        })();
        if result.is_err() {
            let _ = unlinkat(&self.fd, tmp, UnlinkatFlags::NoRemoveDir);
        }
        result
    }

    /// Flushes the whole file system this directory is on.
    pub fn syncfs(&self) -> io::Result<()> {
        nix::unistd::syncfs(&self.fd).map_err(err)
    }

    /// What `name` is (a link is a link), with its size and mtime.
    pub fn stat(&self, name: &Path) -> io::Result<nix::sys::stat::FileStat> {
        nix::sys::stat::fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(err)
    }

    /// Opens the regular file `name` for reading (never through a link).
    pub fn open_read(&self, name: &Path) -> io::Result<File> {
        let fd = openat(
            &self.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::empty(),
        )
        .map_err(err)?;
        let st = fstat(&fd).map_err(err)?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", self.shown(name).display()),
            ));
        }
        Ok(File::from(fd))
    }

    /// Makes `to_name` in directory `to` a hard link of the file `name` here
    /// (a link is linked as itself, never followed; `to_name` must not exist).
    pub fn hard_link(&self, name: &Path, to: &SafeDir, to_name: &Path) -> io::Result<()> {
        nix::unistd::linkat(&self.fd, name, &to.fd, to_name, AtFlags::empty()).map_err(err)
    }
}

/// Zero ranges of at least this many bytes, aligned to it in the file, are
/// allocated but not written by [`ZeroSkipping`].
pub const ZERO_BLOCK: usize = 64 << 10;

/// Writes a new file from its start, in order, without writing its
/// all-zero blocks: each aligned [`ZERO_BLOCK`] of zeros is allocated with
/// `fallocate` (an unwritten extent: no data written, none to flush, the
/// space reserved, so a server writing there later cannot run out of room
/// where a fully written file would not), or left as a hole where the file
/// system cannot allocate that way. Both read back as zeros; [`finish`]
/// makes the length exact. InnoDB's preallocated extents and its redo
/// log's unused part are such blocks.
///
/// Written bytes are handed to the disk as they go ([`start_writeback`],
/// every [`WRITEBACK_STEP`] and at the end of a piece or file), so that the
/// restore's final flush waits for little instead of writing everything.
///
/// [`finish`]: ZeroSkipping::finish
pub struct ZeroSkipping<'a> {
    f: &'a File,
    /// Bytes of the file given so far (written or skipped).
    pos: u64,
    /// Where the written bytes not yet handed to the disk begin.
    kicked: u64,
    /// Whether `fallocate` works on this file's file system.
    allocate: bool,
    /// Consecutive zero blocks not allocated yet (start, length): one
    /// `fallocate` for all of them keeps them in one extent.
    run: Option<(u64, u64)>,
}

impl<'a> ZeroSkipping<'a> {
    /// A writer of the empty file `f` (just created).
    pub fn new(f: &'a File) -> Self {
        Self::at(f, 0)
    }

    /// A writer of `f` from offset `pos` (a piece of a file written in
    /// pieces, in any order: the parallel restore); end it with
    /// [`ZeroSkipping::end_piece`], and give the file its length once all
    /// pieces are in.
    pub fn at(f: &'a File, pos: u64) -> Self {
        ZeroSkipping {
            f,
            pos,
            kicked: pos,
            allocate: true,
            run: None,
        }
    }

    /// Allocates what is pending of this piece, without touching the
    /// file's length beyond it.
    pub fn end_piece(mut self) -> io::Result<()> {
        self.kick();
        self.allocate_run()
    }

    /// Starts the writeback of what was written since the last call.
    fn kick(&mut self) {
        if self.pos > self.kicked {
            start_writeback(self.f, self.kicked, self.pos - self.kicked);
            self.kicked = self.pos;
        }
    }

    /// Appends `buf`: written, but for the aligned zero blocks it covers whole.
    pub fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let block = ZERO_BLOCK as u64;
        // The range of `buf` waiting to be written, as offsets into `buf`.
        let (mut pending, mut i) = (0usize, 0usize);
        while i < buf.len() {
            let at = self.pos + i as u64;
            let end = ((at / block + 1) * block - self.pos) as usize;
            let whole = at.is_multiple_of(block) && end <= buf.len();
            let end = end.min(buf.len());
            if whole && is_zero(&buf[i..end]) {
                self.f
                    .write_all_at(&buf[pending..i], self.pos + pending as u64)?;
                match self.run {
                    Some((start, len)) if start + len == at => {
                        self.run = Some((start, len + block))
                    }
                    _ => {
                        self.allocate_run()?;
                        self.run = Some((at, block));
                    }
                }
                pending = end;
            }
            i = end;
        }
        self.f
            .write_all_at(&buf[pending..], self.pos + pending as u64)?;
        self.pos += buf.len() as u64;
        if self.pos - self.kicked >= WRITEBACK_STEP {
            self.kick();
        }
        Ok(())
    }

    /// Allocates the run of zero blocks (a hole where that cannot be done).
    fn allocate_run(&mut self) -> io::Result<()> {
        let Some((at, len)) = self.run.take() else {
            return Ok(());
        };
        if !self.allocate {
            return Ok(());
        }
        let r = nix::fcntl::fallocate(
            self.f,
            nix::fcntl::FallocateFlags::empty(),
            at as i64,
            len as i64,
        );
        match r {
            Ok(()) => Ok(()),
            Err(Errno::EOPNOTSUPP) => {
                self.allocate = false;
                Ok(())
            }
            Err(e) => Err(err(e)),
        }
    }

    /// Gives the file its exact length (the zeros at its end included);
    /// returns the bytes given.
    pub fn finish(mut self) -> io::Result<u64> {
        self.kick();
        self.allocate_run()?;
        if self.f.metadata()?.len() != self.pos {
            self.f.set_len(self.pos)?;
        }
        Ok(self.pos)
    }
}

/// Bytes written to a file between two [`start_writeback`]s.
pub const WRITEBACK_STEP: u64 = 8 << 20;

/// Starts writing `len` bytes of `f` from `at` to the disk without waiting
/// for it. Without this, nothing of a restore smaller than the kernel's
/// dirty limits reaches the disk before the flush that makes the copy
/// durable (`syncfs`), which then writes it all while the server stops.
///
/// `posix_fadvise(POSIX_FADV_DONTNEED)`: on Linux it starts the writeback
/// of the range's dirty pages (`WB_SYNC_NONE`, no wait), then drops the
/// range's clean pages from the cache (pages being written stay) — the
/// safe call that does what `sync_file_range(SYNC_FILE_RANGE_WRITE)` does,
/// as PostgreSQL's `pg_flush_data` uses it where that is missing. A hint:
/// an error is ignored (`syncfs` reports real ones).
pub fn start_writeback(f: &File, at: u64, len: u64) {
    let (Ok(at), Ok(len)) = (i64::try_from(at), i64::try_from(len)) else {
        return;
    };
    let _ = nix::fcntl::posix_fadvise(
        f,
        at,
        len,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// Whether every byte of `b` is zero.
fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && words.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_goes_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("canary"), b"alive").unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("l")).unwrap();
        let t = SafeDir::open(&root).unwrap();
        assert!(t.subdir(Path::new("l"), true, None).is_err());
        assert!(t.subdir(Path::new("l/x"), true, None).is_err());
        assert!(t.subdir(Path::new("../outside"), true, None).is_err());
        assert!(t.create_file(Path::new("l")).is_err());
        assert!(t.read_file(Path::new("l"), 100).is_err());
        assert!(t.mkdir(Path::new("l"), 0o755, None).is_err());
        let sub = t.subdir(Path::new("a/b"), true, None).unwrap();
        sub.create_file(Path::new("f"))
            .unwrap()
            .write_all(b"x")
            .unwrap();
        assert!(sub.create_file(Path::new("f")).is_err(), "O_EXCL");
        sub.replace_file(Path::new("f"), b"new").unwrap();
        assert_eq!(std::fs::read(root.join("a/b/f")).unwrap(), b"new");
        let names: Vec<_> = t.entries().unwrap();
        assert_eq!(names.len(), 2);
        t.remove_file(Path::new("l")).unwrap();
        assert_eq!(std::fs::read(outside.join("canary")).unwrap(), b"alive");
    }
}
