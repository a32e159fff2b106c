//! btrfs: a read-only snapshot of the subvolume at `volume.mountpoint`,
//! created in the snapshot directory on the same filesystem.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::{Snapshot, SnapshotBackend};
use crate::cmd;
use crate::config::Backend;

pub struct Btrfs {
    subvolume: PathBuf,
    dir: PathBuf,
}

impl Btrfs {
    pub fn new(subvolume: PathBuf, dir: PathBuf) -> Btrfs {
        Btrfs { subvolume, dir }
    }

    fn path(&self, name: &str) -> anyhow::Result<PathBuf> {
        crate::config::check_name("snapshot name", name).map_err(anyhow::Error::msg)?;
        Ok(self.dir.join(name))
    }
}

impl SnapshotBackend for Btrfs {
    fn kind(&self) -> Backend {
        Backend::Btrfs
    }

    fn create(&self, name: &str, timeout: Duration) -> anyhow::Result<Snapshot> {
        let path = self.path(name)?;
        crate::state::create_private_dir(&self.dir)
            .with_context(|| format!("cannot create snapshot directory {}", self.dir.display()))?;
        cmd::run_for(
            &[
                "btrfs".as_ref(),
                "subvolume".as_ref(),
                "snapshot".as_ref(),
                "-r".as_ref(),
                self.subvolume.as_os_str(),
                path.as_os_str(),
            ],
            Some(timeout),
        )
        .map_err(|e| {
            let why = match &e {
                cmd::CmdError::Failed { stderr, .. } if stderr.contains("No space left") => format!(
                    "the btrfs filesystem of {} is full (a snapshot needs free metadata space; see `btrfs filesystem usage`): free space on it",
                    self.subvolume.display()
                ),
                cmd::CmdError::TimedOut { .. } => format!(
                    "the snapshot of {} took too long (mysql.max_hold)",
                    self.subvolume.display()
                ),
                _ => format!(
                    "cannot snapshot {} (volume.mountpoint must be a btrfs subvolume)",
                    self.subvolume.display()
                ),
            };
            anyhow::Error::new(e).context(why)
        })?;
        Ok(Snapshot {
            name: name.to_string(),
            path,
        })
    }

    fn remove(&self, name: &str) -> anyhow::Result<()> {
        let path = self.path(name)?;
        if !path.exists() {
            return Ok(());
        }
        cmd::run(&[
            "btrfs".as_ref(),
            "subvolume".as_ref(),
            "delete".as_ref(),
            path.as_os_str(),
        ])?;
        Ok(())
    }

    fn list(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let mut names = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", self.dir.display())),
        };
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn check_valid(&self, name: &str) -> anyhow::Result<Option<f64>> {
        let path = self.path(name)?;
        anyhow::ensure!(
            path.is_dir(),
            "snapshot {} disappeared during the backup",
            path.display()
        );
        Ok(None)
    }
}
