//! The local state directory (`backup.state_dir`): one directory per pending
//! backup holding its manifest, and the lock that keeps two runs of the same
//! config apart.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};

/// Mode of every file mysnap writes (manifests, state, file store objects):
/// they describe or hold a whole database. The umask can only remove bits.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of every directory mysnap creates for them.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Creates `dir` and its missing parents with mode 0700 (existing ones are
/// left as they are).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
}

/// Creates a new file with mode 0600 for writing, replacing one of that name
/// left by an earlier process (whose mode could be wider); never follows a
/// symlink there.
pub fn create_private_file(path: &Path) -> std::io::Result<File> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE_MODE)
        .open(path)
}

/// Writes `bytes` to `path` atomically: a temporary file beside it (mode
/// 0600), fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("path has no parent directory")?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .context("path has no file name")?
            .to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = create_private_file(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::anyhow!("cannot write {}: {e}", path.display())
    })
}

/// Flushes directory `dir` itself (its entries: a rename, a creation or a
/// removal in it) to disk, so the change survives a power loss.
pub fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| anyhow::anyhow!("cannot flush directory {} to disk: {e}", dir.display()))
}

/// Renames `from` to `to` and flushes both parent directories, so the
/// rename survives a power loss.
pub fn rename_durably(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::rename(from, to)
        .with_context(|| format!("cannot move {} to {}", from.display(), to.display()))?;
    let (a, b) = (from.parent(), to.parent());
    if let Some(a) = a {
        sync_dir(a)?;
    }
    if let Some(b) = b.filter(|b| Some(*b) != a) {
        sync_dir(b)?;
    }
    Ok(())
}

/// The state lock of one config: held by snapshotter and archiver while they run.
/// Released when dropped (and by the kernel when the process dies).
pub struct StateLock {
    _lock: Flock<File>,
    dir: PathBuf,
}

/// An exclusive `flock` on `path` (created 0600 if missing), held until
/// dropped; the kernel releases it when the process dies, even by kill -9.
/// Held by another process: an error saying `busy` and the file.
pub fn lock_file(path: &Path, busy: &str) -> anyhow::Result<Flock<std::fs::File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(PRIVATE_FILE_MODE)
        .open(path)
        .with_context(|| format!("cannot open lock file {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "{busy} (it holds {}: {e}); wait for it to finish",
            path.display()
        )
    })
}

impl StateLock {
    /// Takes the lock without waiting; another run holding it is an error.
    pub fn acquire(state_dir: &Path) -> anyhow::Result<StateLock> {
        create_private_dir(state_dir).with_context(|| {
            format!(
                "cannot create state directory {} (backup.state_dir)",
                state_dir.display()
            )
        })?;
        let lock = lock_file(
            &state_dir.join("lock"),
            "another snapshotter or archiver of this config is running",
        )?;
        Ok(StateLock {
            _lock: lock,
            dir: state_dir.to_path_buf(),
        })
    }

    /// Like [`StateLock::acquire`], but waits up to `patience` for a run that is
    /// finishing (in `snapshotter | archiver`, the snapshotter may still be exiting).
    pub fn acquire_waiting(
        state_dir: &Path,
        patience: std::time::Duration,
    ) -> anyhow::Result<StateLock> {
        let deadline = std::time::Instant::now() + patience;
        loop {
            match StateLock::acquire(state_dir) {
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(100))
                }
                other => return other,
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory of one backup's local state.
    pub fn backup_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Ids of backups with a local state directory (pending or left by a killed run).
    pub fn pending_ids(&self) -> anyhow::Result<Vec<String>> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&self.dir)
            .with_context(|| format!("cannot list state directory {}", self.dir.display()))?
        {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if crate::ids::is_backup_id(&name) {
                ids.push(name);
            }
        }
        ids.sort();
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_until_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::acquire(dir.path()).unwrap();
        let err = StateLock::acquire(dir.path()).err().unwrap().to_string();
        assert!(err.contains("another snapshotter or archiver"), "{err}");
        drop(first);
        StateLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn a_durable_rename_moves_and_a_missing_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("sub/b"));
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(&a, b"x").unwrap();
        rename_durably(&a, &b).unwrap();
        assert!(!a.exists() && b.exists());
        let err = sync_dir(&dir.path().join("none")).unwrap_err().to_string();
        assert!(err.contains("none"), "{err}");
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.toml");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
