//! Inspection: reads the machine into an [`Inventory`]; changes nothing.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use common::cmd;
use common::config::Config;

use crate::{
    listed, owner, parse_blkid, parse_btrfs_subvolumes, parse_losetup_j, parse_pvs_vg, LvmTarget,
    Options, Signature, Target, BTRFS_LABEL,
};

/// What volprep found on the machine, as far as its plan depends on it.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// One per configured device, in config order.
    pub devices: Vec<Device>,
    /// lvm backend only.
    pub lvm: LvmState,
    /// btrfs: whether volprep's filesystem has the subvolume; `None` when
    /// there is no such filesystem or it could not be read.
    pub btrfs_subvolume: Option<bool>,
    /// The source of the mount at `volume.mountpoint`, if it is one.
    pub mount_source: Option<String>,
    /// Canonical paths of the devices compared with the mount source.
    pub realpaths: BTreeMap<String, PathBuf>,
    pub mountpoint: PathState,
    /// The fstab text (with `--fstab`; "" when the file does not exist).
    pub fstab: Option<String>,
    /// `(uid, gid)` the data directory should belong to.
    pub owner: (u32, u32),
    pub datadir: PathState,
    pub move_from: Option<MoveFrom>,
    /// Unix time of the inspection (names the kept old data directory).
    pub now: i64,
}

/// A configured device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Device {
    pub path: PathBuf,
    pub exists: bool,
    /// A regular file (a trial volume), used through a loop device.
    pub is_file: bool,
    /// The loop device the file is attached to (`losetup -j`).
    pub loop_dev: Option<String>,
    /// What blkid found (on the loop device if attached, else on the path).
    pub sig: Signature,
    /// An LVM physical volume: its VG ("" for none).
    pub pv_vg: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LvmState {
    pub vg_exists: bool,
    pub lv_exists: bool,
    /// What blkid found on the LV (if it exists).
    pub lv_sig: Signature,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PathState {
    #[default]
    Missing,
    NotDir,
    Dir {
        uid: u32,
        gid: u32,
        empty: bool,
    },
}

/// The directory `--move-datadir` names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MoveFrom {
    /// Where it links to, if it is a symlink.
    pub link: Option<PathBuf>,
    pub is_dir: bool,
}

/// Reads what the plan for `cfg` depends on. Config errors that need no
/// machine (names, paths) are reported first, before any command runs.
pub fn inspect(cfg: &Config, opts: &Options) -> anyhow::Result<Inventory> {
    let target = Target::new(cfg, opts)?;
    let mut inv = Inventory {
        devices: target
            .devices
            .iter()
            .map(|d| device(d, target.lvm.is_some()))
            .collect::<anyhow::Result<_>>()?,
        ..Inventory::default()
    };
    if inv.devices.iter().any(|d| !d.exists) {
        return Ok(inv); // refused by the plan
    }
    match &target.lvm {
        Some(lvm) => inv.lvm = lvm_state(lvm)?,
        None => inv.btrfs_subvolume = btrfs_subvolume(&inv.devices),
    }
    let mp = &cfg.volume.mountpoint;
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    inv.mount_source = common::mountinfo::find(&info, mp).map(|m| m.source);
    inv.realpaths = realpaths(&inv, target.lvm.as_ref());
    inv.mountpoint = path_state(mp);
    if opts.fstab {
        inv.fstab = Some(read_fstab(&opts.fstab_file)?);
    }
    inv.owner = owner(cfg)?;
    inv.datadir = path_state(&cfg.volume.datadir);
    inv.move_from = opts.move_datadir.as_deref().map(|from| MoveFrom {
        link: std::fs::read_link(from).ok(),
        is_dir: from.is_dir(),
    });
    inv.now = time::OffsetDateTime::now_utc().unix_timestamp();
    Ok(inv)
}

fn device(path: &Path, lvm: bool) -> anyhow::Result<Device> {
    let mut d = Device {
        path: path.to_path_buf(),
        exists: path.exists(),
        ..Device::default()
    };
    if !d.exists {
        return Ok(d);
    }
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    d.is_file = meta.is_file();
    if d.is_file {
        d.loop_dev = cmd::run(&["losetup".as_ref(), "-j".as_ref(), path.as_os_str()])
            .ok()
            .and_then(|o| parse_losetup_j(&o));
    }
    // An unattached file is probed in its place.
    let probed = d
        .loop_dev
        .clone()
        .unwrap_or_else(|| path.to_string_lossy().into_owned());
    d.sig = probe(&probed)?;
    if lvm && d.sig.fs_type.as_deref() == Some("LVM2_member") {
        let out = cmd::run(&["pvs", "--noheadings", "-o", "vg_name", &probed])
            .with_context(|| format!("cannot read LVM physical volume {probed}"))?;
        d.pv_vg = Some(parse_pvs_vg(&out));
    }
    Ok(d)
}

/// `blkid -p -o export DEV`; exit 2 means nothing was found.
pub(crate) fn probe(dev: &str) -> anyhow::Result<Signature> {
    match cmd::output(&["blkid", "-p", "-o", "export", dev]) {
        Ok(out) => Ok(parse_blkid(&String::from_utf8_lossy(&out.stdout))),
        Err(cmd::CmdError::Failed { status, .. }) if status.ends_with(" 2") => {
            Ok(Signature::default())
        }
        Err(e) => Err(e).with_context(|| format!("cannot probe {dev}")),
    }
}

fn lvm_state(t: &LvmTarget) -> anyhow::Result<LvmState> {
    let mut st = LvmState {
        vg_exists: cmd::run(&["vgs", "--noheadings", "-o", "vg_name", &t.vg])
            .is_ok_and(|o| listed(&o, &t.vg)),
        ..LvmState::default()
    };
    let lv = format!("{}/{}", t.vg, t.lv);
    st.lv_exists = st.vg_exists
        && cmd::run(&["lvs", "--noheadings", "-o", "lv_name", &lv])
            .is_ok_and(|o| listed(&o, &t.lv));
    if st.lv_exists {
        st.lv_sig = probe(&t.dev())?;
    }
    Ok(st)
}

/// Looks for the subvolume on volprep's btrfs (read-only, also unmounted).
fn btrfs_subvolume(devices: &[Device]) -> Option<bool> {
    let ours = |d: &Device| {
        d.sig.fs_type.as_deref() == Some("btrfs") && d.sig.label.as_deref() == Some(BTRFS_LABEL)
    };
    let first = devices.first().filter(|d| ours(d))?;
    let dev = first
        .loop_dev
        .clone()
        .unwrap_or_else(|| first.path.to_string_lossy().into_owned());
    let out = cmd::run(&["btrfs", "inspect-internal", "dump-tree", "-t", "root", &dev]).ok()?;
    Some(
        parse_btrfs_subvolumes(&out)
            .iter()
            .any(|n| n == crate::BTRFS_SUBVOLUME),
    )
}

/// Canonical paths of the mount source and of the devices the plan may mount.
fn realpaths(inv: &Inventory, lvm: Option<&LvmTarget>) -> BTreeMap<String, PathBuf> {
    let mut paths: Vec<String> = inv.mount_source.iter().cloned().collect();
    paths.extend(lvm.map(LvmTarget::dev));
    for d in &inv.devices {
        paths.extend(d.loop_dev.clone());
        paths.push(d.path.to_string_lossy().into_owned());
    }
    paths
        .into_iter()
        .filter_map(|p| Path::new(&p).canonicalize().ok().map(|c| (p, c)))
        .collect()
}

fn path_state(p: &Path) -> PathState {
    match std::fs::metadata(p) {
        Err(_) => PathState::Missing,
        Ok(m) if !m.is_dir() => PathState::NotDir,
        Ok(m) => PathState::Dir {
            uid: m.uid(),
            gid: m.gid(),
            empty: std::fs::read_dir(p).map_or(true, |mut d| d.next().is_none()),
        },
    }
}

fn read_fstab(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}
