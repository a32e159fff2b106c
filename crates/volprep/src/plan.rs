//! Planning: from the config, the options and an [`Inventory`], the steps
//! that prepare the volume, or a refusal. Pure: no I/O.

use std::fmt;
use std::path::{Path, PathBuf};

use common::cmd::display_argv;
use common::config::{Config, Filesystem};
use common::error::config_err;

use crate::{
    fs_name, fstab_entry_for, fstab_line, lv_extents, mkfs_argv, Inventory, LvmTarget, Options,
    PathState, Signature, Target, BTRFS_LABEL, BTRFS_SUBVOLUME,
};

/// A device as planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dev {
    Path(String),
    /// The loop device an earlier [`Step::AttachLoop`] attaches this file to.
    /// Shown as the file (what a dry run can name).
    LoopOf(PathBuf),
}

impl fmt::Display for Dev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dev::Path(p) => f.write_str(p),
            Dev::LoopOf(file) => write!(f, "{}", file.display()),
        }
    }
}

/// One argument of a planned command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    Lit(String),
    Dev(Dev),
}

impl fmt::Display for Arg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arg::Lit(s) => f.write_str(s),
            Arg::Dev(d) => d.fmt(f),
        }
    }
}

/// The first field of an fstab line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    Text(String),
    /// `UUID=` of the filesystem an earlier step makes on this device (the
    /// device itself if it has none); shown as the device.
    UuidOf(Dev),
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Spec::Text(s) => f.write_str(s),
            Spec::UuidOf(d) => d.fmt(f),
        }
    }
}

/// One change. `Display` renders it as the shell command a dry run prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `losetup -f --show FILE`; later steps name the device as [`Dev::LoopOf`].
    AttachLoop {
        file: PathBuf,
    },
    /// An external command (`what` says why, for the log).
    Command {
        what: String,
        argv: Vec<Arg>,
    },
    /// Mounts the btrfs top level privately, creates the subvolume
    /// [`BTRFS_SUBVOLUME`] unless it is there, unmounts.
    CreateSubvolume {
        dev: Dev,
    },
    /// `mkdir -p`.
    CreateDir {
        path: PathBuf,
    },
    /// Mounts the volume: what is on it (the data directory) is only known
    /// after this step, so a run inspects and plans again after it.
    Mount {
        dev: Dev,
        fstype: String,
        options: String,
        mountpoint: PathBuf,
    },
    /// Appends the fstab line (after a newline if the file lacks a last one).
    AppendFstab {
        file: PathBuf,
        spec: Spec,
        mountpoint: PathBuf,
        fstype: String,
        options: String,
        newline_first: bool,
    },
    /// `install -d -m 750 -o UID -g GID`.
    InstallDir {
        path: PathBuf,
        uid: u32,
        gid: u32,
    },
    Chown {
        path: PathBuf,
        uid: u32,
        gid: u32,
    },
    /// With the server stopped, copies `from` into `to`, keeps `from` as
    /// `old` and links `from` to `to`; starts the server again.
    MoveDatadir {
        from: PathBuf,
        to: PathBuf,
        old: PathBuf,
        stop: Vec<String>,
        start: Vec<String>,
    },
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::AppendFstab { file, .. } => write!(
                f,
                "echo '{}' >> {}",
                self.fstab_text().unwrap_or_default(),
                file.display()
            ),
            Step::MoveDatadir {
                from,
                to,
                old,
                stop,
                start,
            } => {
                let cp = [
                    "cp",
                    "-a",
                    &format!("{}/.", s(from)),
                    &format!("{}/", s(to)),
                ];
                let mv = display_argv(&["mv", &s(from), &s(old)]);
                let ln = display_argv(&["ln", "-s", &s(to), &s(from)]);
                let (stop, cp, start) =
                    (display_argv(stop), display_argv(&cp), display_argv(start));
                write!(f, "{stop}\n{cp}\n{mv} && {ln}\n{start}")
            }
            step => f.write_str(&display_argv(&step.shown_argv())),
        }
    }
}

impl Step {
    /// The command line of a step that is one command (as a dry run shows it).
    fn shown_argv(&self) -> Vec<String> {
        let argv: Vec<String> = match self {
            Step::AttachLoop { file } => vec!["losetup -f --show".into(), s(file)],
            Step::Command { argv, .. } => return argv.iter().map(Arg::to_string).collect(),
            Step::CreateSubvolume { dev } => vec![
                "btrfs subvolume create".into(),
                format!("<top level of {dev}>/{BTRFS_SUBVOLUME}"),
            ],
            Step::CreateDir { path } => vec!["mkdir -p".into(), s(path)],
            Step::Mount {
                dev,
                fstype,
                options,
                mountpoint,
            } => vec![
                format!("mount -t {fstype} -o {options}"),
                dev.to_string(),
                s(mountpoint),
            ],
            Step::InstallDir { path, uid, gid } => {
                vec![format!("install -d -m 750 -o {uid} -g {gid}"), s(path)]
            }
            Step::Chown { path, uid, gid } => vec![format!("chown {uid}:{gid}"), s(path)],
            Step::AppendFstab { .. } | Step::MoveDatadir { .. } => Vec::new(),
        };
        // The fixed words are split so that display_argv quotes only the paths.
        argv.iter()
            .enumerate()
            .flat_map(|(i, a)| match i {
                0 => a.split(' ').map(str::to_string).collect::<Vec<_>>(),
                _ => vec![a.clone()],
            })
            .collect()
    }
}

impl Step {
    /// The fstab line of an [`Step::AppendFstab`], its spec as shown.
    fn fstab_text(&self) -> Option<String> {
        match self {
            Step::AppendFstab {
                spec,
                mountpoint,
                fstype,
                options,
                ..
            } => Some(fstab_line(&spec.to_string(), mountpoint, fstype, options)),
            _ => None,
        }
    }

    fn cmd(what: impl Into<String>, argv: Vec<Arg>) -> Step {
        Step::Command {
            what: what.into(),
            argv,
        }
    }
}

fn lit(argv: &[&str]) -> Vec<Arg> {
    argv.iter().map(|a| Arg::Lit((*a).to_string())).collect()
}

fn devs_args(devs: &[Dev]) -> impl Iterator<Item = Arg> + '_ {
    devs.iter().cloned().map(Arg::Dev)
}

fn joined(devs: &[Dev]) -> String {
    devs.iter()
        .map(Dev::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The steps, and what was found in place (for the log).
#[derive(Debug, Default)]
pub(crate) struct Planned {
    pub steps: Vec<Step>,
    pub in_place: Vec<String>,
}

/// The steps that prepare the volume of `cfg` on a machine as `inv` found it.
pub fn plan(cfg: &Config, opts: &Options, inv: &Inventory) -> anyhow::Result<Vec<Step>> {
    plan_noted(cfg, opts, inv).map(|p| p.steps)
}

/// The volume as the mount needs it.
struct Volume {
    dev: Dev,
    fstype: &'static str,
    options: String,
    spec: Spec,
}

struct Planner<'a> {
    cfg: &'a Config,
    opts: &'a Options,
    inv: &'a Inventory,
    out: Planned,
}

pub(crate) fn plan_noted(cfg: &Config, opts: &Options, inv: &Inventory) -> anyhow::Result<Planned> {
    let target = Target::new(cfg, opts)?;
    let mut p = Planner {
        cfg,
        opts,
        inv,
        out: Planned::default(),
    };
    let devs = p.devices(&target)?;
    let vol = match &target.lvm {
        Some(lvm) => p.lvm(lvm, &devs)?,
        None => p.btrfs(&devs)?,
    };
    p.mount(&vol)?;
    if opts.fstab {
        p.fstab(&vol)?;
    }
    match &opts.move_datadir {
        Some(from) => p.move_datadir(from)?,
        None => p.datadir(&cfg.volume.datadir)?,
    }
    Ok(p.out)
}

fn refuse(dev: &Dev, sig: &Signature, hint: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{dev} holds {} that volprep did not create{hint}; check volume.device, or pass --force to wipe it",
        sig.describe()
    )
}

impl Planner<'_> {
    fn step(&mut self, step: Step) {
        self.out.steps.push(step);
    }

    fn in_place(&mut self, what: String) {
        self.out.in_place.push(what);
    }

    /// The devices as later steps name them; a file not yet on a loop device is attached.
    fn devices(&mut self, target: &Target) -> anyhow::Result<Vec<Dev>> {
        anyhow::ensure!(
            self.inv.devices.len() == target.devices.len(),
            "the inventory has {} devices, the config {}",
            self.inv.devices.len(),
            target.devices.len()
        );
        if let Some(d) = self.inv.devices.iter().find(|d| !d.exists) {
            return Err(config_err(format!(
                "volume.device {} does not exist: attach the disk, or fix volume.device",
                d.path.display()
            )));
        }
        let mut devs = Vec::new();
        for d in &self.inv.devices {
            devs.push(match (&d.loop_dev, d.is_file) {
                (_, false) => Dev::Path(s(&d.path)),
                (Some(lo), true) => {
                    self.in_place(format!("{} is attached to {lo}", d.path.display()));
                    Dev::Path(lo.clone())
                }
                (None, true) => {
                    self.step(Step::AttachLoop {
                        file: d.path.clone(),
                    });
                    Dev::LoopOf(d.path.clone())
                }
            });
        }
        Ok(devs)
    }

    fn lvm(&mut self, t: &LvmTarget, devs: &[Dev]) -> anyhow::Result<Volume> {
        let fresh = self.lvm_pvs(t, devs)?;
        self.lvm_vg(t, &fresh);
        let dev = t.dev();
        if self.inv.lvm.lv_exists {
            self.in_place(format!("logical volume {}/{}", t.vg, t.lv));
        } else {
            let extents = lv_extents(t.reserve_percent);
            let what = format!(
                "create logical volume {}/{} ({extents}, {}% kept free for snapshots)",
                t.vg, t.lv, t.reserve_percent
            );
            let argv = [
                "lvcreate", "-q", "-y", "-Wy", "-n", &t.lv, "-l", &extents, &t.vg,
            ];
            self.step(Step::cmd(what, lit(&argv)));
        }
        self.lvm_fs(t.filesystem, &dev)?;
        Ok(Volume {
            dev: Dev::Path(dev.clone()),
            fstype: fs_name(t.filesystem),
            options: "defaults".into(),
            spec: Spec::Text(dev),
        })
    }

    /// Physical volumes: returns the devices to add to the VG.
    fn lvm_pvs(&mut self, t: &LvmTarget, devs: &[Dev]) -> anyhow::Result<Vec<Dev>> {
        let (mut new_pvs, mut orphan_pvs) = (Vec::new(), Vec::new());
        for (dev, d) in devs.iter().zip(&self.inv.devices) {
            if let Some(owner_vg) = &d.pv_vg {
                if *owner_vg == t.vg {
                    self.in_place(format!("{dev} is a physical volume of {}", t.vg));
                } else if !self.opts.force {
                    let hint = if owner_vg.is_empty() {
                        " (a physical volume in no volume group)".to_string()
                    } else {
                        format!(" (a physical volume of volume group {owner_vg})")
                    };
                    return Err(refuse(dev, &d.sig, &hint));
                } else if owner_vg.is_empty() {
                    orphan_pvs.push(dev.clone());
                } else {
                    return Err(anyhow::anyhow!(
                        "{dev} belongs to volume group {owner_vg}, not {}: --force does not take a disk from another volume group; remove it from {owner_vg} first (vgreduce)",
                        t.vg
                    ));
                }
                continue;
            }
            if !d.sig.is_empty() {
                if !self.opts.force {
                    return Err(refuse(dev, &d.sig, ""));
                }
                let argv = vec![
                    Arg::Lit("wipefs".into()),
                    Arg::Lit("-a".into()),
                    Arg::Dev(dev.clone()),
                ];
                self.step(Step::cmd(
                    format!("wipe signatures of {dev} (--force)"),
                    argv,
                ));
            }
            new_pvs.push(dev.clone());
        }
        if !new_pvs.is_empty() {
            let argv = lit(&["pvcreate", "-q"])
                .into_iter()
                .chain(devs_args(&new_pvs))
                .collect();
            self.step(Step::cmd(
                format!("create physical volume(s) {}", joined(&new_pvs)),
                argv,
            ));
        }
        new_pvs.extend(orphan_pvs);
        Ok(new_pvs)
    }

    fn lvm_vg(&mut self, t: &LvmTarget, fresh: &[Dev]) {
        let (verb, what) = if !self.inv.lvm.vg_exists {
            ("vgcreate", "create")
        } else if !fresh.is_empty() {
            ("vgextend", "extend")
        } else {
            self.in_place(format!("volume group {}", t.vg));
            return;
        };
        let argv = lit(&[verb, "-q", &t.vg])
            .into_iter()
            .chain(devs_args(fresh))
            .collect();
        self.step(Step::cmd(format!("{what} volume group {}", t.vg), argv));
    }

    fn lvm_fs(&mut self, fs: Filesystem, dev: &str) -> anyhow::Result<()> {
        let want = fs_name(fs);
        let sig = &self.inv.lvm.lv_sig;
        match sig.fs_type.as_deref() {
            Some(t) if t == want => self.in_place(format!("{want} filesystem on {dev}")),
            Some(_) if !self.opts.force => {
                return Err(anyhow::anyhow!(
                    "{dev} holds {}, but volume.filesystem is {want}: fix volume.filesystem, or pass --force to make a new {want} filesystem (destroying its data)",
                    sig.describe()
                ))
            }
            other => {
                let argv = mkfs_argv(fs, dev, other.is_some()).into_iter().map(Arg::Lit).collect();
                self.step(Step::cmd(format!("make a {want} filesystem on {dev}"), argv));
            }
        }
        Ok(())
    }

    fn btrfs(&mut self, devs: &[Dev]) -> anyhow::Result<Volume> {
        let mut ours = 0;
        let mut uuid = None;
        for (dev, d) in devs.iter().zip(&self.inv.devices) {
            if d.sig.fs_type.as_deref() == Some("btrfs")
                && d.sig.label.as_deref() == Some(BTRFS_LABEL)
            {
                ours += 1;
                uuid = d.sig.uuid.clone();
            } else if !d.sig.is_empty() && !self.opts.force {
                return Err(refuse(dev, &d.sig, ""));
            }
        }
        let dev = devs[0].clone();
        let made = ours != devs.len();
        if !made {
            self.in_place(format!(
                "btrfs filesystem {BTRFS_LABEL} on {}",
                joined(devs)
            ));
        } else if ours > 0 && !self.opts.force {
            return Err(anyhow::anyhow!(
                "only some of {} hold volprep's btrfs filesystem: check volume.device, or pass --force to make a new one",
                joined(devs)
            ));
        } else {
            let mut argv = lit(&["mkfs.btrfs", "-q", "-L", BTRFS_LABEL]);
            if self.opts.force {
                argv.push(Arg::Lit("-f".into()));
            }
            argv.extend(devs_args(devs));
            self.step(Step::cmd(
                format!("make a btrfs filesystem on {}", joined(devs)),
                argv,
            ));
        }
        if !made && self.inv.btrfs_subvolume == Some(true) {
            self.in_place(format!("subvolume {BTRFS_SUBVOLUME} on {dev}"));
        } else {
            self.step(Step::CreateSubvolume { dev: dev.clone() });
        }
        let spec = match uuid.filter(|_| !made) {
            Some(u) => Spec::Text(format!("UUID={u}")),
            None => Spec::UuidOf(dev.clone()),
        };
        Ok(Volume {
            dev,
            fstype: "btrfs",
            options: format!("subvol={BTRFS_SUBVOLUME}"),
            spec,
        })
    }

    /// Whether the planned device is the mount source (both resolved by inspect).
    fn same_device(&self, source: &str, dev: &Dev) -> bool {
        let Dev::Path(dev) = dev else { return false };
        match (self.inv.realpaths.get(source), self.inv.realpaths.get(dev)) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        }
    }

    fn mount(&mut self, vol: &Volume) -> anyhow::Result<()> {
        let mp = &self.cfg.volume.mountpoint;
        let dev = &vol.dev;
        if let Some(source) = &self.inv.mount_source {
            if self.same_device(source, dev) {
                self.in_place(format!("{dev} mounted at {}", mp.display()));
                return Ok(());
            }
            return Err(anyhow::anyhow!(
                "{} is already a mount point of {source}, not {dev}: unmount it, or set volume.mountpoint to another directory",
                mp.display()
            ));
        }
        match self.inv.mountpoint {
            PathState::Dir { empty: false, .. } if !self.opts.force => {
                return Err(anyhow::anyhow!(
                    "{} is not empty: mounting over it would hide its files; move them away, or pass --force",
                    mp.display()
                ))
            }
            PathState::Missing => self.step(Step::CreateDir { path: mp.clone() }),
            _ => {}
        }
        self.step(Step::Mount {
            dev: dev.clone(),
            fstype: vol.fstype.into(),
            options: vol.options.clone(),
            mountpoint: mp.clone(),
        });
        Ok(())
    }

    fn fstab(&mut self, vol: &Volume) -> anyhow::Result<()> {
        let path = &self.opts.fstab_file;
        let mp = &self.cfg.volume.mountpoint;
        let text = self.inv.fstab.as_deref().unwrap_or_default();
        if let Some(existing) = fstab_entry_for(text, mp) {
            if matches!(&vol.spec, Spec::Text(spec) if spec == existing) {
                self.in_place(format!("{} entry for {}", path.display(), mp.display()));
                return Ok(());
            }
            return Err(anyhow::anyhow!(
                "{} already mounts {existing} at {}: edit that line by hand, or run without --fstab",
                path.display(),
                mp.display()
            ));
        }
        self.step(Step::AppendFstab {
            file: path.clone(),
            spec: vol.spec.clone(),
            mountpoint: mp.clone(),
            fstype: vol.fstype.into(),
            options: vol.options.clone(),
            newline_first: !text.is_empty() && !text.ends_with('\n'),
        });
        Ok(())
    }

    fn datadir(&mut self, dir: &Path) -> anyhow::Result<()> {
        let (uid, gid) = self.inv.owner;
        let path = dir.to_path_buf();
        match self.inv.datadir {
            PathState::NotDir => {
                return Err(anyhow::anyhow!(
                    "{} exists and is not a directory: move it away, or fix volume.datadir",
                    dir.display()
                ))
            }
            PathState::Dir { uid: u, gid: g, .. } if (u, g) == (uid, gid) => {
                self.in_place(format!("{} owned by {uid}:{gid}", dir.display()));
            }
            PathState::Dir { .. } => self.step(Step::Chown { path, uid, gid }),
            PathState::Missing => self.step(Step::InstallDir { path, uid, gid }),
        }
        Ok(())
    }

    /// Copies an existing data directory onto the volume with the server
    /// stopped; the old one is kept as `<from>.volprep-old-<time>` and
    /// replaced by a symlink to the new one, so the server's configuration
    /// need not change.
    fn move_datadir(&mut self, from: &Path) -> anyhow::Result<()> {
        let to = &self.cfg.volume.datadir;
        let moved = self.inv.move_from.clone().unwrap_or_default();
        if moved.link.as_ref() == Some(to) {
            self.in_place(format!("{} is moved to {}", from.display(), to.display()));
            return self.datadir(to);
        }
        if !moved.is_dir {
            return Err(config_err(format!(
                "--move-datadir {} is not a directory: name the server's current data directory",
                from.display()
            )));
        }
        if to.starts_with(from) || from.starts_with(to) {
            return Err(config_err(format!(
                "--move-datadir {} and volume.datadir {} overlap",
                from.display(),
                to.display()
            )));
        }
        if matches!(self.inv.datadir, PathState::Dir { empty: false, .. }) {
            return Err(anyhow::anyhow!(
                "volume.datadir {} is not empty: --move-datadir only moves into an empty directory; move its files away first",
                to.display()
            ));
        }
        self.datadir(to)?;
        self.step(Step::MoveDatadir {
            from: from.to_path_buf(),
            to: to.clone(),
            old: PathBuf::from(format!("{}.volprep-old-{}", from.display(), self.inv.now)),
            stop: self.cfg.mysql.stop_command.clone(),
            start: self.cfg.mysql.start_command.clone(),
        });
        Ok(())
    }
}
