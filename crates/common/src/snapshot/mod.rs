//! Filesystem snapshots behind one trait. Only snapshotter creates them and
//! only archiver (or the next snapshotter, for a killed run) removes them.

mod btrfs;
mod lvm;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Backend, VolumeBackend, VolumeConfig};

pub use crate::mountinfo::is_mounted;
pub use btrfs::Btrfs;
pub use lvm::{parse_lvs, LvRow, Lvm};

/// A snapshot that exists: its name, and where its files can be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub name: String,
    pub path: PathBuf,
}

pub trait SnapshotBackend: Send + Sync {
    fn kind(&self) -> Backend;
    /// Creates a read-only snapshot of the volume named `name`, whose files
    /// [`SnapshotBackend::make_readable`] makes readable at the returned path.
    /// Called under the server's lock: must be quick, and its command is
    /// killed after `timeout` (what is left of `mysql.max_hold`). A killed
    /// command may still have made the snapshot: the caller then finds it
    /// with [`SnapshotBackend::list`] and removes it.
    fn create(&self, name: &str, timeout: Duration) -> anyhow::Result<Snapshot>;
    /// Makes a created snapshot's files readable at its path (LVM: mounts it).
    /// Called after the server's lock is released, so that work is not under
    /// the lock; idempotent (the archiver calls it again).
    fn make_readable(&self, _snapshot: &Snapshot) -> anyhow::Result<()> {
        Ok(())
    }
    /// Removes the snapshot `name` (unmounting it where needed). Removing one
    /// that does not exist is not an error.
    fn remove(&self, name: &str) -> anyhow::Result<()>;
    /// Names of existing snapshots whose name starts with `prefix`.
    fn list(&self, prefix: &str) -> anyhow::Result<Vec<String>>;
    /// Checks, before the archive is declared complete, that the snapshot is
    /// still whole (an LVM snapshot can overflow). Returns the share of its
    /// copy-on-write space used (0 to 1) where the backend has one (LVM).
    fn check_valid(&self, name: &str) -> anyhow::Result<Option<f64>>;
}

/// The name of this config's snapshot for one backup: `mysnap-<name>-<id>`.
pub fn snapshot_name(backup_name: &str, id: &str) -> String {
    format!("{}{id}", snapshot_prefix(backup_name))
}

/// The prefix that marks a snapshot as this config's.
pub fn snapshot_prefix(backup_name: &str) -> String {
    format!("mysnap-{backup_name}-")
}

/// Whether snapshot `name` is one of this config's: the prefix followed by
/// exactly a backup id, so `mysnap-db1-…` never claims `mysnap-db1-x-…`.
pub fn is_own_snapshot(backup_name: &str, name: &str) -> bool {
    name.strip_prefix(&snapshot_prefix(backup_name))
        .is_some_and(crate::ids::is_backup_id)
}

/// The backend `volume` names; LVM snapshots are mounted under
/// [`lvm_mount_dir`] of `state_dir`.
pub fn backend(volume: &VolumeConfig, state_dir: &Path) -> Box<dyn SnapshotBackend> {
    match &volume.backend {
        VolumeBackend::Btrfs(b) => Box::new(Btrfs::new(
            volume.mountpoint.clone(),
            b.snapshot_dir.clone(),
        )),
        VolumeBackend::Lvm(l) => Box::new(Lvm::new(l, lvm_mount_dir(state_dir))),
    }
}

/// LVM: refuses to work unless the LV is mounted at `volume.mountpoint`.
/// A mount point that is an empty directory of the root filesystem (an
/// fstab `nofail` line on a dead disk) would have a backup snapshot the LV
/// while the server writes elsewhere, and a restore fill the root
/// filesystem. (btrfs: the snapshot command itself refuses a path that is
/// not on btrfs.)
pub fn check_mounted(volume: &VolumeConfig) -> anyhow::Result<()> {
    let Some(lvm) = volume.lvm() else {
        return Ok(());
    };
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| anyhow::anyhow!("cannot read /proc/self/mountinfo: {e}"))?;
    let lv = PathBuf::from(format!("/dev/{}/{}", lvm.vg, lvm.lv));
    mounted_check(
        crate::mountinfo::find(&info, &volume.mountpoint),
        &volume.mountpoint,
        &lv,
    )
}

fn mounted_check(
    mount: Option<crate::mountinfo::Mount>,
    mountpoint: &Path,
    lv: &Path,
) -> anyhow::Result<()> {
    let same = |source: &str| {
        let (a, b) = (Path::new(source).canonicalize(), lv.canonicalize());
        matches!((a, b), (Ok(a), Ok(b)) if a == b)
    };
    match mount {
        Some(m) if same(&m.source) => Ok(()),
        Some(m) => anyhow::bail!(
            "volume.mountpoint {} holds {} ({}), not the logical volume {}: mount the volume there (volprep --fstab writes its fstab line), or fix volume.vg/volume.lv",
            mountpoint.display(),
            m.source,
            m.fstype,
            lv.display()
        ),
        None => anyhow::bail!(
            "volume.mountpoint {} is not mounted (the logical volume {} should be): mount it first (is the disk there? volprep --fstab writes its fstab line); refusing to work on the filesystem below it",
            mountpoint.display(),
            lv.display()
        ),
    }
}

/// Where LVM snapshots are mounted for the archiver: `<backup.state_dir>/mnt`.
pub fn lvm_mount_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("mnt")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unmounted_or_foreign_mount_point_is_refused() {
        let lv = Path::new("/dev/null");
        let mp = Path::new("/mnt");
        let err = mounted_check(None, mp, lv).unwrap_err().to_string();
        assert!(err.contains("/mnt is not mounted"), "{err}");
        let other = crate::mountinfo::Mount {
            device: "8:1".into(),
            fstype: "ext4".into(),
            source: "/dev/zero".into(),
        };
        let err = mounted_check(Some(other), mp, lv).unwrap_err().to_string();
        assert!(
            err.contains("holds /dev/zero (ext4), not the logical volume /dev/null"),
            "{err}"
        );
        let right = crate::mountinfo::Mount {
            device: "1:3".into(),
            fstype: "xfs".into(),
            source: "/dev/null".into(),
        };
        mounted_check(Some(right), mp, lv).unwrap();
    }

    #[test]
    fn own_snapshots_only() {
        let id = "20261126T120000Z";
        assert!(is_own_snapshot("db1", &snapshot_name("db1", id)));
        assert!(!is_own_snapshot("db1", &snapshot_name("db1-x", id)));
        assert!(!is_own_snapshot("db1", "mysnap-db1-manual"));
        assert!(!is_own_snapshot("db1-x", &snapshot_name("db1", id)));
    }
}
