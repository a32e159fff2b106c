//! The local state directory (`backup.state_dir`): one directory per pending
//! backup holding its manifest, and the lock that keeps two runs of the same
//! config apart.
//!
//! The hand-off: the snapshotter saves the manifest and releases the state
//! lock; its archiver takes the lock and then claims the backup (an `flock`
//! on `<id>/claim`, held while it works). Between the two nobody holds the
//! lock, so a later snapshotter must tell a backup waiting for its archiver
//! from one left by a killed run: [`judge`] says which pending backup is stale.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    write_atomic_with_mode(path, bytes, PRIVATE_FILE_MODE)
}

/// [`write_atomic`] with file mode `mode`, exactly, whatever the umask (a
/// reader never sees a partial file: the temporary one, `.<name>.tmp-<pid>`,
/// is renamed over `path` only once complete and flushed).
pub fn write_atomic_with_mode(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
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
        if mode != PRIVATE_FILE_MODE {
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
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

/// The temporary files of `path` that writers killed mid-write left
/// (`.<name>.tmp-<pid>` of [`write_atomic_with_mode`], whose process no
/// longer runs) are removed; a link among them is removed, never followed.
/// Returns those removed. Best effort: what cannot be listed or removed is
/// left for the next writer.
pub fn remove_stale_temps(path: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Vec::new();
    };
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let dead = |pid: &str| {
        let Ok(pid) = pid.parse::<i32>() else {
            return false;
        };
        pid > 0
            && pid as u32 != std::process::id()
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                == Err(nix::errno::Errno::ESRCH)
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .is_some_and(|pid| pid.bytes().all(|b| b.is_ascii_digit()) && dead(pid))
        })
        .map(|e| e.path())
        .filter(|p| std::fs::remove_file(p).is_ok())
        .collect()
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

    /// How a later run sees pending backup `id` (see [`judge`]).
    pub fn verdict(&self, id: &str, grace: Duration) -> anyhow::Result<Verdict> {
        let dir = self.backup_dir(id);
        let claim = match OpenOptions::new().write(true).open(dir.join(CLAIM_FILE)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Claim::None,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot open {}", dir.join(CLAIM_FILE).display()))
            }
            Ok(f) => match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                Ok(_unlocked_on_drop) => Claim::Abandoned,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => Claim::Held,
                Err((_, e)) => anyhow::bail!("cannot lock {}: {e}", dir.join(CLAIM_FILE).display()),
            },
        };
        let manifest = dir.join(crate::keys::MANIFEST_FILE);
        let age = match std::fs::metadata(&manifest) {
            Ok(m) => Some(
                m.modified()
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .unwrap_or_default(),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", manifest.display())),
        };
        Ok(judge(age, claim, grace))
    }

    /// The archiver's claim on pending backup `id`: while it is held, no
    /// later run counts the backup as stale.
    pub fn claim(&self, id: &str) -> anyhow::Result<ClaimLock> {
        let dir = self.backup_dir(id);
        create_private_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let lock = lock_file(
            &self.backup_dir(id).join(CLAIM_FILE),
            &format!("another archiver is archiving backup {id}"),
        )?;
        Ok(ClaimLock { _lock: lock })
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

/// The claim file of a pending backup, locked by the archiver working on it.
pub const CLAIM_FILE: &str = "claim";

/// Whether a pending backup's archiver claim is there, and held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// No archiver took it yet.
    None,
    /// An archiver holds it: at work.
    Held,
    /// An archiver took it and went away (killed) without cleaning up.
    Abandoned,
}

/// What a later run may do with a pending backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Handed off `age` ago, not claimed yet: its archiver may still come.
    HandedOff { age: Duration },
    /// An archiver is working on it.
    InUse,
    /// Left by a run that did not finish: remove it (why, for the log).
    Stale(String),
}

/// Judges a pending backup: `manifest_age` is how long ago its manifest was
/// saved (`None`: there is none, the snapshotter did not finish).
pub fn judge(manifest_age: Option<Duration>, claim: Claim, grace: Duration) -> Verdict {
    match (claim, manifest_age) {
        (Claim::Held, _) => Verdict::InUse,
        (Claim::Abandoned, _) => Verdict::Stale("its archiver went away before finishing".into()),
        (Claim::None, None) => {
            Verdict::Stale("it has no manifest: its snapshotter did not finish".into())
        }
        (Claim::None, Some(age)) if age < grace => Verdict::HandedOff { age },
        (Claim::None, Some(age)) => Verdict::Stale(format!(
            "its manifest was handed off {}s ago and no archiver claimed it within backup.handoff_grace ({}s)",
            age.as_secs(),
            grace.as_secs()
        )),
    }
}

/// An archiver's claim on one pending backup, held until dropped (or the
/// process dies).
pub struct ClaimLock {
    _lock: Flock<File>,
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
    fn a_handed_off_backup_is_stale_only_without_manifest_after_the_grace_or_when_abandoned() {
        let grace = Duration::from_secs(600);
        let min = |m: u64| Some(Duration::from_secs(60 * m));
        assert_eq!(
            judge(min(1), Claim::None, grace),
            Verdict::HandedOff {
                age: Duration::from_secs(60)
            }
        );
        assert!(
            matches!(judge(min(11), Claim::None, grace), Verdict::Stale(w) if w.contains("backup.handoff_grace"))
        );
        assert!(
            matches!(judge(None, Claim::None, grace), Verdict::Stale(w) if w.contains("no manifest"))
        );
        assert!(
            matches!(judge(min(1), Claim::Abandoned, grace), Verdict::Stale(w) if w.contains("archiver went away"))
        );
        // A claim held is never stale, however old.
        assert_eq!(judge(min(600), Claim::Held, grace), Verdict::InUse);
        assert_eq!(judge(None, Claim::Held, grace), Verdict::InUse);
    }

    #[test]
    fn a_claim_is_held_while_its_lock_lives_and_abandoned_after() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateLock::acquire(dir.path()).unwrap();
        let id = "20261128T120000Z";
        create_private_dir(&state.backup_dir(id)).unwrap();
        let grace = Duration::from_secs(600);
        assert!(matches!(
            state.verdict(id, grace).unwrap(),
            Verdict::Stale(_)
        ));
        std::fs::write(state.backup_dir(id).join(crate::keys::MANIFEST_FILE), "x").unwrap();
        assert!(matches!(
            state.verdict(id, grace).unwrap(),
            Verdict::HandedOff { .. }
        ));
        let claim = state.claim(id).unwrap();
        assert!(state.claim(id).is_err(), "one archiver per backup");
        assert_eq!(state.verdict(id, grace).unwrap(), Verdict::InUse);
        drop(claim);
        assert!(
            matches!(state.verdict(id, grace).unwrap(), Verdict::Stale(w) if w.contains("went away"))
        );
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
