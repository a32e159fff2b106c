//! volprep: prepares the volume a server's data lives on, idempotently.
//!
//! lvm: PV(s) → VG → an LV of (100 − `snapshot_reserve_percent`)% of the VG
//! (the rest stays free for snapshots) → xfs or ext4 → mounted at
//! `volume.mountpoint` → `volume.datadir` owned by the mysql user.
//! btrfs: `mkfs.btrfs` → subvolume `mysnap` mounted at `volume.mountpoint`.
//!
//! A run has three phases:
//! - [`inspect`] reads the machine (blkid signatures, loop attachments,
//!   LVM state, mountinfo, fstab, the data directory) into an [`Inventory`],
//!   changing nothing;
//! - [`plan`] is pure: from the config, the options and the inventory it
//!   decides every [`Step`], or refuses. What is in place is left alone (a
//!   second run plans nothing); what volprep did not create (a filesystem,
//!   partition table or LVM signature) is refused unless `--force`;
//! - [`execute`] runs the steps in order. A step may name the loop device an
//!   earlier step attaches ([`Dev::LoopOf`]), resolved when it runs. After
//!   mounting the volume a run inspects and plans again (see [`run`]).
//!
//! `--dry-run` is inspect + plan, printing the steps. All commands go
//! through `common::cmd`.

use std::path::{Path, PathBuf};

use common::config::{Config, Devices, Filesystem};
use common::error::config_err;

mod execute;
mod inspect;
mod plan;
#[cfg(test)]
mod plan_tests;

pub use execute::execute;
pub use inspect::{inspect, Device, Inventory, LvmState, MoveFrom, PathState};
pub use plan::{plan, Arg, Dev, Spec, Step};

/// The btrfs subvolume volprep creates and mounts at `volume.mountpoint`.
pub const BTRFS_SUBVOLUME: &str = "mysnap";
/// The label volprep gives a btrfs filesystem, by which it knows its own.
pub const BTRFS_LABEL: &str = "mysnap";

#[derive(Debug, Clone)]
pub struct Options {
    pub fstab: bool,
    pub fstab_file: PathBuf,
    pub force: bool,
    pub dry_run: bool,
    pub move_datadir: Option<PathBuf>,
}

/// What a run did, or (dry run) would do.
#[derive(Debug, Default)]
pub struct Report {
    /// Dry run: the steps (rendered as shell commands) that would change something, in order.
    pub planned: Vec<String>,
    /// Changes made.
    pub changed: Vec<String>,
    /// Things found in place.
    pub in_place: Vec<String>,
}

/// Prepares the volume of `cfg`: inspect, plan, then (unless a dry run)
/// execute. A run that mounts the volume executes the steps up to the mount,
/// then inspects and plans again: what is on the volume (the data
/// directory) is only known once it is mounted.
pub fn run(cfg: &Config, opts: &Options) -> anyhow::Result<Report> {
    let planned = inspect_and_plan(cfg, opts)?;
    if opts.dry_run {
        return Ok(Report {
            planned: planned.steps.iter().map(Step::to_string).collect(),
            in_place: planned.in_place,
            ..Report::default()
        });
    }
    let mounted = planned
        .steps
        .iter()
        .position(|s| matches!(s, Step::Mount { .. }));
    let Some(mounted) = mounted else {
        let changed = execute(&planned.steps)?;
        return Ok(Report {
            changed,
            in_place: planned.in_place,
            ..Report::default()
        });
    };
    let mut changed = execute(&planned.steps[..=mounted])?;
    let again = inspect_and_plan(cfg, opts)?;
    changed.extend(execute(&again.steps)?);
    Ok(Report {
        changed,
        in_place: again.in_place,
        ..Report::default()
    })
}

fn inspect_and_plan(cfg: &Config, opts: &Options) -> anyhow::Result<plan::Planned> {
    let inv = inspect(cfg, opts)?;
    let planned = plan::plan_noted(cfg, opts, &inv)?;
    for what in &planned.in_place {
        tracing::info!("in place: {what}");
    }
    for step in &planned.steps {
        if let Step::AttachLoop { file } = step {
            tracing::warn!(
                "{} is a regular file: attaching it to a loop device (for trials; it is not re-attached at boot)",
                file.display()
            );
        }
    }
    Ok(planned)
}

// ---------------------------------------------------------------------------
// The config, read and checked in one place (no I/O)

/// What the LVM backend needs from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvmTarget {
    pub vg: String,
    pub lv: String,
    pub filesystem: Filesystem,
    pub reserve_percent: u8,
}

impl LvmTarget {
    /// The LV's device path.
    pub fn dev(&self) -> String {
        format!("/dev/{}/{}", self.vg, self.lv)
    }
}

/// The only place volprep reads the LVM keys of the volume config (their
/// grammar was checked when the config was read); `None` for btrfs.
pub fn lvm_target(cfg: &Config) -> Option<LvmTarget> {
    let lvm = cfg.volume.lvm()?;
    Some(LvmTarget {
        vg: lvm.vg.to_string(),
        lv: lvm.lv.to_string(),
        filesystem: lvm.filesystem,
        reserve_percent: lvm.snapshot_reserve_percent,
    })
}

/// The configured volume, checked as far as it can be without the machine.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub devices: Vec<PathBuf>,
    /// `Some` for the lvm backend.
    pub lvm: Option<LvmTarget>,
}

impl Target {
    pub fn new(cfg: &Config, opts: &Options) -> anyhow::Result<Target> {
        let devices = config_devices(cfg)?;
        check_move_datadir(cfg, opts)?;
        Ok(Target {
            devices,
            lvm: lvm_target(cfg),
        })
    }
}

fn config_devices(cfg: &Config) -> anyhow::Result<Vec<PathBuf>> {
    let devices = match &cfg.volume.device {
        None => {
            return Err(config_err(
                "volume.device is not set: name the block device(s) volprep should prepare",
            ))
        }
        Some(Devices::One(p)) => vec![p.clone()],
        Some(Devices::Many(v)) if v.is_empty() => {
            return Err(config_err("volume.device is an empty list"))
        }
        Some(Devices::Many(v)) => v.clone(),
    };
    if let Some(d) = devices.iter().find(|d| !d.is_absolute()) {
        return Err(config_err(format!(
            "volume.device {} must be an absolute path",
            d.display()
        )));
    }
    Ok(devices)
}

fn check_move_datadir(cfg: &Config, opts: &Options) -> anyhow::Result<()> {
    let Some(from) = &opts.move_datadir else {
        return Ok(());
    };
    if !from.is_absolute() {
        return Err(config_err("--move-datadir needs an absolute path"));
    }
    if cfg.mysql.stop_command.is_empty() || cfg.mysql.start_command.is_empty() {
        return Err(config_err(
            "--move-datadir stops and starts the server: set mysql.stop_command and mysql.start_command",
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Pure parts: the parsers inspect uses, and argv builders

/// What `blkid -p -o export` found on a device.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Signature {
    pub fs_type: Option<String>,
    pub pt_type: Option<String>,
    pub label: Option<String>,
    pub uuid: Option<String>,
}

impl Signature {
    pub fn is_empty(&self) -> bool {
        self.fs_type.is_none() && self.pt_type.is_none()
    }

    pub fn describe(&self) -> String {
        match (&self.fs_type, &self.pt_type) {
            (Some(t), _) if t == "LVM2_member" => "an LVM physical volume".into(),
            (Some(t), _) if t.starts_with(['a', 'e', 'i', 'o', 'u', 'x']) => {
                format!("an {t} filesystem")
            }
            (Some(t), _) => format!("a {t} filesystem"),
            (None, Some(p)) => format!("a {p} partition table"),
            (None, None) => "nothing".into(),
        }
    }
}

/// Parses `blkid -p -o export` output (KEY=value lines).
pub fn parse_blkid(out: &str) -> Signature {
    let mut sig = Signature::default();
    for line in out.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = Some(v.trim().to_string()).filter(|v| !v.is_empty());
        match k.trim() {
            "TYPE" => sig.fs_type = v,
            "PTTYPE" => sig.pt_type = v,
            "LABEL" => sig.label = v,
            "UUID" => sig.uuid = v,
            _ => {}
        }
    }
    sig
}

/// The `-l` share of the VG for the data LV.
pub fn lv_extents(reserve_percent: u8) -> String {
    format!("{}%VG", 100 - u32::from(reserve_percent.min(99)))
}

pub fn fs_name(fs: Filesystem) -> &'static str {
    match fs {
        Filesystem::Xfs => "xfs",
        Filesystem::Ext4 => "ext4",
    }
}

pub fn mkfs_argv(fs: Filesystem, dev: &str, force: bool) -> Vec<String> {
    let mut argv = match fs {
        Filesystem::Xfs => vec!["mkfs.xfs".to_string(), "-q".into()],
        Filesystem::Ext4 => vec!["mkfs.ext4".to_string(), "-q".into()],
    };
    if force {
        argv.push(if fs == Filesystem::Xfs { "-f" } else { "-F" }.into());
    }
    argv.push(dev.into());
    argv
}

/// The fstab line for the volume; `nofail` so a missing volume does not stop the boot.
pub fn fstab_line(spec: &str, mountpoint: &Path, fstype: &str, opts: &str) -> String {
    let pass = if fstype == "ext4" { 2 } else { 0 };
    format!(
        "{spec} {} {fstype} {opts},nofail 0 {pass}",
        common::mountinfo::escape(mountpoint)
    )
}

/// The fstab entry (its spec) already mounting `mountpoint`, if any.
pub fn fstab_entry_for<'a>(fstab: &'a str, mountpoint: &Path) -> Option<&'a str> {
    let want = common::mountinfo::escape(mountpoint);
    fstab
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let spec = f.next()?;
            (f.next()? == want).then_some(spec)
        })
}

/// The loop device attached to `file`, from `losetup -j FILE` output.
pub fn parse_losetup_j(out: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.split_once(':').map(|(d, _)| d.trim().to_string()))
        .filter(|d| d.starts_with("/dev/"))
}

/// The VG named by `pvs --noheadings -o vg_name DEV` ("" when none).
pub fn parse_pvs_vg(out: &str) -> String {
    out.trim().to_string()
}

/// Whether `name` is a line of `vgs`/`lvs --noheadings -o vg_name|lv_name` output.
pub fn listed(out: &str, name: &str) -> bool {
    out.lines().any(|l| l.trim() == name)
}

/// The top-level subvolumes in `btrfs inspect-internal dump-tree -t root` output
/// (the names of the `FS_TREE ROOT_REF` items).
pub fn parse_btrfs_subvolumes(out: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_ref = false;
    for line in out.lines() {
        if line.contains(" key (") {
            in_ref = line.contains("key (FS_TREE ROOT_REF ");
        } else if in_ref {
            if let Some((_, name)) = line.split_once(" name ") {
                names.push(name.trim().to_string());
            }
            in_ref = false;
        }
    }
    names
}

/// `(uid, gid)` of the data directory's owner
/// ([`common::config::VolumeConfig::owner_ids`]), else root.
fn owner(cfg: &Config) -> anyhow::Result<(u32, u32)> {
    Ok(cfg.volume.owner_ids()?.unwrap_or_else(|| {
        tracing::warn!(
            "there is no user mysql: the data directory will belong to root (set volume.owner)"
        );
        (0, 0)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkid_export_is_parsed() {
        let sig = parse_blkid(
            "DEVNAME=/dev/loop0\nUUID=abc\nVERSION=LVM2 001\nTYPE=LVM2_member\nUSAGE=raid\n",
        );
        assert_eq!(sig.fs_type.as_deref(), Some("LVM2_member"));
        assert_eq!(sig.describe(), "an LVM physical volume");
        let pt = parse_blkid("DEVNAME=/dev/sdb\nPTUUID=1234\nPTTYPE=gpt\n");
        assert_eq!(pt.describe(), "a gpt partition table");
        assert!(!pt.is_empty());
        assert!(parse_blkid("").is_empty());
        let b = parse_blkid("LABEL=mysnap\nUUID=u-1\nTYPE=btrfs\n");
        assert_eq!(
            (b.label.as_deref(), b.uuid.as_deref()),
            (Some("mysnap"), Some("u-1"))
        );
    }

    #[test]
    fn sizes_and_argv() {
        assert_eq!(lv_extents(20), "80%VG");
        assert_eq!(lv_extents(1), "99%VG");
        assert_eq!(
            mkfs_argv(Filesystem::Xfs, "/dev/v/l", false),
            ["mkfs.xfs", "-q", "/dev/v/l"]
        );
        assert_eq!(
            mkfs_argv(Filesystem::Ext4, "/dev/v/l", true),
            ["mkfs.ext4", "-q", "-F", "/dev/v/l"]
        );
    }

    #[test]
    fn fstab_lines_and_lookup() {
        let line = fstab_line("/dev/mysnap/mysql", Path::new("/mnt"), "xfs", "defaults");
        assert_eq!(line, "/dev/mysnap/mysql /mnt xfs defaults,nofail 0 0");
        assert_eq!(
            fstab_line("UUID=x", Path::new("/srv/my vol"), "btrfs", "subvol=mysnap"),
            "UUID=x /srv/my\\040vol btrfs subvol=mysnap,nofail 0 0"
        );
        let fstab = "# /mnt old\nUUID=1 / ext4 defaults 0 1\n/dev/mysnap/mysql\t/mnt xfs defaults,nofail 0 0\n";
        assert_eq!(
            fstab_entry_for(fstab, Path::new("/mnt")),
            Some("/dev/mysnap/mysql")
        );
        assert_eq!(fstab_entry_for(fstab, Path::new("/srv")), None);
    }

    #[test]
    fn losetup() {
        assert_eq!(
            parse_losetup_j("/dev/loop3: [2049]:1234 (/work/vol.img)\n").as_deref(),
            Some("/dev/loop3")
        );
        assert_eq!(parse_losetup_j(""), None);
    }
}
