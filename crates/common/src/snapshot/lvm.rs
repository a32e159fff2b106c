//! LVM: a classic (copy-on-write) snapshot of `vg/lv`, sized from the VG's
//! free extents, mounted read-only at a private mountpoint for the archiver.
//!
//! A classic snapshot overflows when more blocks of the origin change than
//! its copy-on-write space holds: the kernel then marks it invalid, and
//! [`SnapshotBackend::check_valid`] fails the backup before its manifest is
//! stored. The pure parts (argv, parsing, sizes) are unit-tested; the rest
//! runs on real LVM in `cargo xtask vm-test`.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::{Snapshot, SnapshotBackend};
use crate::cmd;
use crate::config::{check_name, Backend, Filesystem, LvmVolume, SnapshotSize};
use crate::mountinfo::is_mounted;

/// One row of `lvs --noheadings --separator | -o lv_name,data_percent,lv_attr`.
#[derive(Debug, Clone, PartialEq)]
pub struct LvRow {
    pub name: String,
    /// Copy-on-write usage of a snapshot, percent; `None` when LVM shows none.
    pub data_percent: Option<f64>,
    pub attr: String,
}

impl LvRow {
    /// A snapshot LV (attr type `s`, or `S` while merging).
    pub fn is_snapshot(&self) -> bool {
        matches!(self.attr.chars().next(), Some('s' | 'S'))
    }

    /// The share of the copy-on-write space used, 0 to 1.
    pub fn cow_used(&self) -> Option<f64> {
        self.data_percent.map(|p| p / 100.0)
    }

    /// Why the snapshot can no longer be trusted, if it cannot.
    pub fn invalid_reason(&self) -> Option<String> {
        match self.attr.chars().nth(4) {
            Some('I') => return Some("LVM marked it invalid (attr state 'I')".into()),
            Some('S') => {
                return Some("LVM marked it invalid and suspended (attr state 'S')".into())
            }
            _ => {}
        }
        match self.data_percent {
            Some(p) if p >= 100.0 => Some(format!("its copy-on-write space is full ({p:.2}%)")),
            _ => None,
        }
    }
}

pub const LVS_FIELDS: &str = "lv_name,data_percent,lv_attr";

/// Parses `lvs --noheadings --separator '|' -o lv_name,data_percent,lv_attr`.
pub fn parse_lvs(out: &str) -> Vec<LvRow> {
    out.lines()
        .filter_map(|line| {
            let mut f = line.split('|').map(str::trim);
            let name = f.next().filter(|n| !n.is_empty())?.to_string();
            let data_percent = f.next().and_then(|p| p.parse().ok());
            let attr = f.next().unwrap_or("").to_string();
            Some(LvRow {
                name,
                data_percent,
                attr,
            })
        })
        .collect()
}

pub struct Lvm {
    vg: String,
    lv: String,
    fs: Filesystem,
    size: SnapshotSize,
    /// Snapshots are mounted at `<mount_dir>/<name>`.
    mount_dir: PathBuf,
}

impl Lvm {
    /// The LVM backend of `volume` (names checked when the config was
    /// read); snapshots are mounted under `mount_dir`.
    pub fn new(volume: &LvmVolume, mount_dir: PathBuf) -> Lvm {
        Lvm {
            vg: volume.vg.to_string(),
            lv: volume.lv.to_string(),
            fs: volume.filesystem,
            size: volume.snapshot_size.clone(),
            mount_dir,
        }
    }

    fn checked<'a>(&self, name: &'a str) -> anyhow::Result<&'a str> {
        check_name("snapshot name", name).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            name != self.lv,
            "refusing to treat the origin LV {}/{} as a snapshot",
            self.vg,
            self.lv
        );
        Ok(name)
    }

    /// Where snapshot `name` is mounted.
    pub fn mount_path(&self, name: &str) -> PathBuf {
        self.mount_dir.join(name)
    }

    /// `/dev/<vg>/<name>`.
    pub fn device(&self, name: &str) -> PathBuf {
        Path::new("/dev").join(&self.vg).join(name)
    }

    pub fn lvcreate_argv(&self, name: &str) -> Vec<String> {
        let mut argv = vec![
            "lvcreate".to_string(),
            "-s".into(),
            "-n".into(),
            name.into(),
        ];
        argv.extend(self.size.lvcreate_args());
        argv.push(format!("{}/{}", self.vg, self.lv));
        argv
    }

    pub fn mount_argv(&self, name: &str) -> Vec<String> {
        let (fstype, opts) = match self.fs {
            // The snapshot has the origin's UUID; its log is replayed in memory.
            Filesystem::Xfs => ("xfs", "ro,nouuid"),
            // No journal replay onto the snapshot.
            Filesystem::Ext4 => ("ext4", "ro,noload"),
        };
        vec![
            "mount".into(),
            "-t".into(),
            fstype.into(),
            "-o".into(),
            opts.into(),
            self.device(name).to_string_lossy().into_owned(),
            self.mount_path(name).to_string_lossy().into_owned(),
        ]
    }

    pub fn lvremove_argv(&self, name: &str) -> Vec<String> {
        vec![
            "lvremove".into(),
            "-f".into(),
            format!("{}/{}", self.vg, name),
        ]
    }

    pub fn lvs_argv(&self, target: &str) -> Vec<String> {
        vec![
            "lvs".into(),
            "--noheadings".into(),
            "--separator".into(),
            "|".into(),
            "-o".into(),
            LVS_FIELDS.into(),
            target.into(),
        ]
    }

    /// Every LV of the VG.
    fn lvs(&self) -> anyhow::Result<Vec<LvRow>> {
        let out = cmd::run(&self.lvs_argv(&self.vg))
            .with_context(|| format!("cannot list the LVs of volume group {}", self.vg))?;
        Ok(parse_lvs(&out))
    }

    fn unmount(&self, path: &Path) -> anyhow::Result<()> {
        for attempt in 0..10 {
            if !is_mounted(path) {
                return Ok(());
            }
            match cmd::run(&["umount".as_ref(), path.as_os_str()]) {
                Ok(_) => return Ok(()),
                Err(e) if attempt == 9 => {
                    return Err(e).with_context(|| {
                        format!(
                            "cannot unmount snapshot {} (is a process using it?)",
                            path.display()
                        )
                    })
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(300)),
            }
        }
        Ok(())
    }
}

impl SnapshotBackend for Lvm {
    fn kind(&self) -> Backend {
        Backend::Lvm
    }

    fn create(&self, name: &str, timeout: std::time::Duration) -> anyhow::Result<Snapshot> {
        // Under the server's lock: only the snapshot itself; the mount comes after.
        let name = self.checked(name)?;
        cmd::run_for(&self.lvcreate_argv(name), Some(timeout)).map_err(|e| {
            let why = match &e {
                cmd::CmdError::TimedOut { .. } => format!(
                    "the snapshot of {}/{} took too long (mysql.max_hold)",
                    self.vg, self.lv
                ),
                _ => format!(
                    "cannot snapshot {}/{} with {} of copy-on-write space (volume group {} needs free extents: volprep keeps volume.snapshot_reserve_percent free; see volume.snapshot_size)",
                    self.vg, self.lv, self.size, self.vg
                ),
            };
            anyhow::Error::new(e).context(why)
        })?;
        Ok(Snapshot {
            name: name.to_string(),
            path: self.mount_path(name),
        })
    }

    fn make_readable(&self, snapshot: &Snapshot) -> anyhow::Result<()> {
        let name = self.checked(&snapshot.name)?;
        let path = self.mount_path(name);
        if is_mounted(&path) {
            return Ok(());
        }
        crate::state::create_private_dir(&path)
            .with_context(|| format!("cannot create snapshot mountpoint {}", path.display()))?;
        cmd::run(&self.mount_argv(name)).with_context(|| {
            format!(
                "cannot mount snapshot {}/{name} read-only at {}",
                self.vg,
                path.display()
            )
        })?;
        Ok(())
    }

    fn remove(&self, name: &str) -> anyhow::Result<()> {
        let name = self.checked(name)?;
        let path = self.mount_path(name);
        // Unmount and lvremove are both attempted; the first error is returned.
        let unmounted = self.unmount(&path);
        if unmounted.is_ok() {
            let _ = std::fs::remove_dir(&path);
        }
        let removed = if self.lvs()?.iter().any(|r| r.name == name) {
            cmd::run(&self.lvremove_argv(name))
                .map(|_| ())
                .with_context(|| format!("cannot remove snapshot LV {}/{name}", self.vg))
        } else {
            Ok(())
        };
        unmounted.and(removed)
    }

    fn list(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let mut names: Vec<String> = self
            .lvs()?
            .into_iter()
            .filter(|r| r.is_snapshot() && r.name.starts_with(prefix))
            .map(|r| r.name)
            .collect();
        // A leftover mountpoint without its LV (killed between the two steps).
        if let Ok(entries) = std::fs::read_dir(&self.mount_dir) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(prefix) && !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn check_valid(&self, name: &str) -> anyhow::Result<Option<f64>> {
        let name = self.checked(name)?;
        let target = format!("{}/{name}", self.vg);
        let out = cmd::run(&self.lvs_argv(&target))
            .with_context(|| format!("snapshot {target} disappeared during the backup"))?;
        let row = parse_lvs(&out)
            .into_iter()
            .find(|r| r.name == name)
            .ok_or_else(|| anyhow::anyhow!("snapshot {target} disappeared during the backup"))?;
        if let Some(why) = row.invalid_reason() {
            anyhow::bail!(
                "snapshot {target} overflowed: {why}; give it more room (volume.snapshot_reserve_percent when running volprep, or volume.snapshot_size), or back up at a quieter time"
            );
        }
        tracing::info!(
            "snapshot {target} is whole ({:.2}% of its copy-on-write space used)",
            row.data_percent.unwrap_or(0.0)
        );
        Ok(row.cow_used())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lvm(size: &str) -> Lvm {
        let volume = LvmVolume {
            vg: crate::config::LvmName::parse("mysnap").unwrap(),
            lv: crate::config::LvmName::parse("mysql").unwrap(),
            filesystem: Filesystem::Xfs,
            snapshot_reserve_percent: 20,
            snapshot_size: SnapshotSize::parse(size).unwrap(),
        };
        Lvm::new(&volume, PathBuf::from("/var/lib/mysnap/mnt"))
    }

    #[test]
    fn sizes_parse_to_lvcreate_arguments() {
        assert_eq!(
            SnapshotSize::default().lvcreate_args(),
            ["-l".to_string(), "100%FREE".into()]
        );
        assert_eq!(
            SnapshotSize::parse("50%free").unwrap().lvcreate_args(),
            ["-l".to_string(), "50%FREE".into()]
        );
        assert_eq!(
            SnapshotSize::parse("10GiB").unwrap().lvcreate_args(),
            ["-L".to_string(), "10485760k".into()]
        );
        assert_eq!(
            SnapshotSize::parse("1500KB").unwrap().lvcreate_args(),
            ["-L".to_string(), "1465k".into()]
        );
        for bad in ["0%FREE", "101%FREE", "50%PVS", "ten", "1KiB", "%FREE"] {
            assert!(SnapshotSize::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn argv_of_each_step() {
        let l = lvm("100%FREE");
        assert_eq!(
            l.lvcreate_argv("mysnap-db1-20260101T000000Z"),
            [
                "lvcreate",
                "-s",
                "-n",
                "mysnap-db1-20260101T000000Z",
                "-l",
                "100%FREE",
                "mysnap/mysql"
            ]
        );
        assert_eq!(
            l.mount_argv("s1"),
            [
                "mount",
                "-t",
                "xfs",
                "-o",
                "ro,nouuid",
                "/dev/mysnap/s1",
                "/var/lib/mysnap/mnt/s1"
            ]
        );
        let ext4 = Lvm {
            fs: Filesystem::Ext4,
            ..lvm("2GiB")
        };
        assert_eq!(ext4.mount_argv("s1")[4], "ro,noload");
        assert_eq!(ext4.lvcreate_argv("s1")[4..6], ["-L", "2097152k"]);
        assert_eq!(l.lvremove_argv("s1"), ["lvremove", "-f", "mysnap/s1"]);
        assert_eq!(
            l.lvs_argv("mysnap/s1"),
            [
                "lvs",
                "--noheadings",
                "--separator",
                "|",
                "-o",
                "lv_name,data_percent,lv_attr",
                "mysnap/s1"
            ]
        );
    }

    #[test]
    fn names_are_checked_and_the_origin_is_never_removed() {
        let l = lvm("100%FREE");
        assert!(l.checked("-rf").is_err());
        assert!(l.checked("a/b").is_err());
        assert!(l.checked("mysql").is_err());
        assert!(crate::config::LvmName::parse("bad vg").is_err());
    }

    #[test]
    fn lvs_output_is_parsed_and_overflow_detected() {
        // Recorded from lvm2 2.03.16: a healthy snapshot, an overflowed one, the origin.
        let out = "  mysql|  |owi-aos---\n  mysnap-db1-20260101T000000Z|12.34|swi-aos---\n  mysnap-db1-20260101T000001Z|100.00|swi-I-s---\n  other||-wi-a-----\n";
        let rows = parse_lvs(out);
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0].name, "mysql");
        assert!(!rows[0].is_snapshot());
        assert_eq!(rows[1].data_percent, Some(12.34));
        assert!(rows[1].is_snapshot());
        assert_eq!(rows[1].invalid_reason(), None);
        assert!((rows[1].cow_used().unwrap() - 0.1234).abs() < 1e-9);
        assert_eq!(rows[0].cow_used(), None);
        assert!(rows[2].invalid_reason().unwrap().contains("'I'"));
        assert_eq!(rows[3].data_percent, None);
        let full = LvRow {
            name: "s".into(),
            data_percent: Some(100.0),
            attr: "swi-a-s---".into(),
        };
        assert!(full.invalid_reason().unwrap().contains("full"));
        let invalid_no_percent = LvRow {
            name: "s".into(),
            data_percent: None,
            attr: "swi-I-s---".into(),
        };
        assert!(invalid_no_percent.invalid_reason().is_some());
    }
}
