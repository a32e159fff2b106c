//! volprep: prepares the volume a server's data lives on, idempotently.
//!
//! lvm: PV(s) → VG → an LV of (100 − `snapshot_reserve_percent`)% of the VG
//! (the rest stays free for snapshots) → xfs or ext4 → mounted at
//! `volume.mountpoint` → `volume.datadir` owned by the mysql user.
//! btrfs: `mkfs.btrfs` → subvolume `mysnap` mounted at `volume.mountpoint`.
//!
//! Every step first looks at what is there: what is in place is left alone
//! (a second run changes nothing), what it did not create (a filesystem,
//! partition table or LVM signature) is refused unless `--force`. With
//! `--dry-run` only the inspections run; the commands that would change
//! something are returned instead. All commands go through `common::cmd`.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use common::cmd::{self, display_argv};
use common::config::{Backend, Config, Devices, Filesystem};
use common::error::config_err;

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
    /// Dry run: the commands (argv rendered) that would change something, in order.
    pub planned: Vec<String>,
    /// Changes made.
    pub changed: Vec<String>,
    /// Things found in place.
    pub in_place: Vec<String>,
}

struct Exec {
    dry: bool,
    report: Report,
    /// Loop devices this run attached: detached again if the run fails.
    attached: Vec<String>,
}

impl Exec {
    /// Runs a command that changes something (or, dry, records it).
    fn change(&mut self, what: &str, argv: &[String]) -> anyhow::Result<String> {
        if self.dry {
            self.report.planned.push(display_argv(argv));
            return Ok(String::new());
        }
        tracing::info!("{what}: {}", display_argv(argv));
        let out = cmd::run(argv)?;
        self.report.changed.push(what.to_string());
        Ok(out)
    }

    /// A change made in-process (mkdir, chown, fstab), shown as its shell equivalent.
    fn change_fn(
        &mut self,
        what: &str,
        shown: String,
        f: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        if self.dry {
            self.report.planned.push(shown);
            return Ok(());
        }
        tracing::info!("{what}");
        f()?;
        self.report.changed.push(what.to_string());
        Ok(())
    }

    fn in_place(&mut self, what: String) {
        tracing::info!("in place: {what}");
        self.report.in_place.push(what);
    }
}

fn s(x: impl AsRef<std::ffi::OsStr>) -> String {
    x.as_ref().to_string_lossy().into_owned()
}

// ---------------------------------------------------------------------------
// Pure parts

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
        mountpoint.to_string_lossy().replace(' ', "\\040")
    )
}

/// The fstab entry (its spec) already mounting `mountpoint`, if any.
pub fn fstab_entry_for<'a>(fstab: &'a str, mountpoint: &Path) -> Option<&'a str> {
    let want = mountpoint.to_string_lossy().replace(' ', "\\040");
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

/// `(major:minor, source)` of the mount at `mountpoint` in mountinfo text.
pub fn mount_source(info: &str, mountpoint: &Path) -> Option<(String, String)> {
    let want = mountpoint.to_string_lossy().replace(' ', "\\040");
    info.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        if f.get(4) != Some(&want.as_str()) {
            return None;
        }
        let dash = f.iter().position(|x| *x == "-")?;
        Some((f.get(2)?.to_string(), f.get(dash + 2)?.to_string()))
    })
}

/// The loop device attached to `file`, from `losetup -j FILE` output.
pub fn parse_losetup_j(out: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.split_once(':').map(|(d, _)| d.trim().to_string()))
        .filter(|d| d.starts_with("/dev/"))
}

// ---------------------------------------------------------------------------
// Inspection (read-only; also runs in a dry run)

/// `blkid -p -o export DEV`; exit 2 means nothing was found.
fn probe(dev: &str) -> anyhow::Result<Signature> {
    match cmd::output(&["blkid", "-p", "-o", "export", dev]) {
        Ok(out) => Ok(parse_blkid(&String::from_utf8_lossy(&out.stdout))),
        Err(cmd::CmdError::Failed { status, .. }) if status.ends_with(" 2") => {
            Ok(Signature::default())
        }
        Err(e) => Err(e).with_context(|| format!("cannot probe {dev}")),
    }
}

/// The VG a PV belongs to ("" when none).
fn pv_vg(dev: &str) -> anyhow::Result<String> {
    let out = cmd::run(&["pvs", "--noheadings", "-o", "vg_name", dev])
        .with_context(|| format!("cannot read LVM physical volume {dev}"))?;
    Ok(out.trim().to_string())
}

fn vg_exists(vg: &str) -> bool {
    cmd::run(&["vgs", "--noheadings", "-o", "vg_name", vg]).is_ok()
}

fn lv_exists(vg: &str, lv: &str) -> bool {
    cmd::run(&[
        "lvs",
        "--noheadings",
        "-o",
        "lv_name",
        &format!("{vg}/{lv}"),
    ])
    .is_ok()
}

fn same_device(a: &str, b: &Path) -> bool {
    match (Path::new(a).canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

fn dir_is_empty(p: &Path) -> bool {
    std::fs::read_dir(p).map_or(true, |mut d| d.next().is_none())
}

// ---------------------------------------------------------------------------
// The run

/// Prepares the volume of `cfg`.
pub fn run(cfg: &Config, opts: &Options) -> anyhow::Result<Report> {
    let mut x = Exec {
        dry: opts.dry_run,
        report: Report::default(),
        attached: Vec::new(),
    };
    let result = prepare(&mut x, cfg, opts);
    if result.is_err() {
        for lo in &x.attached {
            // Still in use (a VG on it) sets autoclear instead.
            let _ = cmd::run(&["losetup", "-d", lo]);
        }
    }
    result.map(|()| x.report)
}

fn prepare(x: &mut Exec, cfg: &Config, opts: &Options) -> anyhow::Result<()> {
    let devices: Vec<PathBuf> = match &cfg.volume.device {
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
    for d in &devices {
        if !d.is_absolute() {
            return Err(config_err(format!(
                "volume.device {} must be an absolute path",
                d.display()
            )));
        }
        if !d.exists() {
            return Err(config_err(format!(
                "volume.device {} does not exist: attach the disk, or fix volume.device",
                d.display()
            )));
        }
    }
    if let Some(from) = &opts.move_datadir {
        if !from.is_absolute() {
            return Err(config_err("--move-datadir needs an absolute path"));
        }
        if cfg.mysql.stop_command.is_empty() || cfg.mysql.start_command.is_empty() {
            return Err(config_err(
                "--move-datadir stops and starts the server: set mysql.stop_command and mysql.start_command",
            ));
        }
    }
    let devs: Vec<String> = devices
        .iter()
        .map(|d| attach_loop(x, d))
        .collect::<anyhow::Result<_>>()?;

    let (dev, fstype, mount_opts, fstab_spec) = match cfg.volume.kind() {
        Backend::Lvm => prepare_lvm(x, cfg, opts, &devs)?,
        Backend::Btrfs => prepare_btrfs(x, cfg, opts, &devs)?,
    };
    mount(x, cfg, opts, &dev, fstype, &mount_opts)?;
    if opts.fstab {
        fstab(x, cfg, opts, &fstab_spec, fstype, &mount_opts)?;
    }
    let owner = owner(cfg)?;
    match &opts.move_datadir {
        Some(from) => move_datadir(x, cfg, from, owner),
        None => datadir(x, &cfg.volume.datadir, owner),
    }
}

/// A regular file (a trial volume) is attached to a loop device; a block device is used as is.
fn attach_loop(x: &mut Exec, dev: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(dev).with_context(|| format!("cannot stat {}", dev.display()))?;
    if !meta.is_file() {
        return Ok(s(dev));
    }
    let attached = cmd::run(&["losetup".as_ref(), "-j".as_ref(), dev.as_os_str()])
        .ok()
        .and_then(|o| parse_losetup_j(&o));
    if let Some(lo) = attached {
        x.in_place(format!("{} is attached to {lo}", dev.display()));
        return Ok(lo);
    }
    tracing::warn!(
        "{} is a regular file: attaching it to a loop device (for trials; it is not re-attached at boot)",
        dev.display()
    );
    if x.dry {
        x.report
            .planned
            .push(display_argv(&["losetup", "-f", "--show", &s(dev)]));
        // The file itself can be probed in its place.
        return Ok(s(dev));
    }
    let lo = x
        .change(
            &format!("attach {} to a loop device", dev.display()),
            &["losetup".into(), "-f".into(), "--show".into(), s(dev)],
        )?
        .trim()
        .to_string();
    anyhow::ensure!(lo.starts_with("/dev/"), "losetup printed {lo:?}");
    x.attached.push(lo.clone());
    Ok(lo)
}

fn refuse(dev: &str, sig: &Signature, hint: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{dev} holds {} that volprep did not create{hint}; check volume.device, or pass --force to wipe it",
        sig.describe()
    )
}

type Prepared = (String, &'static str, String, String);

fn prepare_lvm(
    x: &mut Exec,
    cfg: &Config,
    opts: &Options,
    devs: &[String],
) -> anyhow::Result<Prepared> {
    let lvm = cfg
        .volume
        .lvm()
        .expect("prepare_lvm runs for backend = \"lvm\"");
    let (vg, lv) = (lvm.vg.as_str(), lvm.lv.as_str());
    let mut new_pvs = Vec::new();
    let mut orphan_pvs = Vec::new();
    for dev in devs {
        let sig = probe(dev)?;
        if sig.fs_type.as_deref() == Some("LVM2_member") {
            let owner_vg = pv_vg(dev)?;
            if owner_vg == vg {
                x.in_place(format!("{dev} is a physical volume of {vg}"));
                continue;
            }
            if !opts.force {
                let hint = if owner_vg.is_empty() {
                    " (a physical volume in no volume group)".to_string()
                } else {
                    format!(" (a physical volume of volume group {owner_vg})")
                };
                return Err(refuse(dev, &sig, &hint));
            }
            if owner_vg.is_empty() {
                orphan_pvs.push(dev.clone());
                continue;
            }
            return Err(anyhow::anyhow!(
                "{dev} belongs to volume group {owner_vg}, not {vg}: --force does not take a disk from another volume group; remove it from {owner_vg} first (vgreduce)"
            ));
        }
        if !sig.is_empty() {
            if !opts.force {
                return Err(refuse(dev, &sig, ""));
            }
            x.change(
                &format!("wipe signatures of {dev} (--force)"),
                &["wipefs".into(), "-a".into(), dev.clone()],
            )?;
        }
        new_pvs.push(dev.clone());
    }
    if !new_pvs.is_empty() {
        let mut argv = vec!["pvcreate".to_string(), "-q".into()];
        argv.extend(new_pvs.iter().cloned());
        x.change(
            &format!("create physical volume(s) {}", new_pvs.join(" ")),
            &argv,
        )?;
    }
    let fresh: Vec<String> = new_pvs.into_iter().chain(orphan_pvs).collect();
    let vg_there = vg_exists(vg);
    if !vg_there {
        let mut argv = vec!["vgcreate".to_string(), "-q".into(), vg.to_string()];
        argv.extend(fresh.iter().cloned());
        x.change(&format!("create volume group {vg}"), &argv)?;
    } else if !fresh.is_empty() {
        let mut argv = vec!["vgextend".to_string(), "-q".into(), vg.to_string()];
        argv.extend(fresh.iter().cloned());
        x.change(&format!("extend volume group {vg}"), &argv)?;
    } else {
        x.in_place(format!("volume group {vg}"));
    }
    let lv_there = vg_there && lv_exists(vg, lv);
    let dev = format!("/dev/{vg}/{lv}");
    if lv_there {
        x.in_place(format!("logical volume {vg}/{lv}"));
    } else {
        let extents = lv_extents(lvm.snapshot_reserve_percent);
        x.change(
            &format!(
                "create logical volume {vg}/{lv} ({extents}, {}% kept free for snapshots)",
                lvm.snapshot_reserve_percent
            ),
            &[
                "lvcreate".into(),
                "-q".into(),
                "-y".into(),
                "-Wy".into(),
                "-n".into(),
                lv.into(),
                "-l".into(),
                extents,
                vg.into(),
            ],
        )?;
    }
    let fs = lvm.filesystem;
    let want = fs_name(fs);
    let sig = if lv_there {
        probe(&dev)?
    } else {
        Signature::default()
    };
    match sig.fs_type.as_deref() {
        Some(t) if t == want => x.in_place(format!("{want} filesystem on {dev}")),
        Some(_) if !opts.force => {
            return Err(anyhow::anyhow!(
                "{dev} holds {}, but volume.filesystem is {want}: fix volume.filesystem, or pass --force to make a new {want} filesystem (destroying its data)",
                sig.describe()
            ))
        }
        other => {
            x.change(
                &format!("make a {want} filesystem on {dev}"),
                &mkfs_argv(fs, &dev, other.is_some()),
            )?;
        }
    }
    Ok((dev.clone(), want, "defaults".into(), dev))
}

fn prepare_btrfs(
    x: &mut Exec,
    _cfg: &Config,
    opts: &Options,
    devs: &[String],
) -> anyhow::Result<Prepared> {
    let mut ours = 0;
    let mut uuid = None;
    for dev in devs {
        let sig = probe(dev)?;
        if sig.fs_type.as_deref() == Some("btrfs") && sig.label.as_deref() == Some(BTRFS_LABEL) {
            ours += 1;
            uuid = sig.uuid.clone();
        } else if !sig.is_empty() && !opts.force {
            return Err(refuse(dev, &sig, ""));
        }
    }
    let dev = devs[0].clone();
    if ours == devs.len() {
        x.in_place(format!(
            "btrfs filesystem {BTRFS_LABEL} on {}",
            devs.join(" ")
        ));
    } else if ours > 0 && !opts.force {
        return Err(anyhow::anyhow!(
            "only some of {} hold volprep's btrfs filesystem: check volume.device, or pass --force to make a new one",
            devs.join(" ")
        ));
    } else {
        let mut argv = vec![
            "mkfs.btrfs".to_string(),
            "-q".into(),
            "-L".into(),
            BTRFS_LABEL.into(),
        ];
        if opts.force {
            argv.push("-f".into());
        }
        argv.extend(devs.iter().cloned());
        x.change(
            &format!("make a btrfs filesystem on {}", devs.join(" ")),
            &argv,
        )?;
        uuid = None;
    }
    // The subvolume: looked for (and created) through a private mount of the top level.
    let top = std::env::temp_dir().join(format!("mysnap-volprep-{}", std::process::id()));
    let fresh = ours != devs.len();
    if fresh && x.dry {
        x.report.planned.push(display_argv(&[
            "btrfs",
            "subvolume",
            "create",
            &format!("<top level of {dev}>/{BTRFS_SUBVOLUME}"),
        ]));
    } else if x.dry {
        x.in_place(format!(
            "btrfs on {dev} (its subvolume {BTRFS_SUBVOLUME} is not looked for in a dry run)"
        ));
    } else {
        create_subvolume(x, &dev, &top)?;
    }
    if uuid.is_none() && !x.dry {
        uuid = probe(&dev)?.uuid;
    }
    let spec = uuid.map_or_else(|| dev.clone(), |u| format!("UUID={u}"));
    Ok((dev, "btrfs", format!("subvol={BTRFS_SUBVOLUME}"), spec))
}

fn create_subvolume(x: &mut Exec, dev: &str, top: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(top).with_context(|| format!("cannot create {}", top.display()))?;
    cmd::run(&[
        "mount".into(),
        "-t".into(),
        "btrfs".into(),
        dev.to_string(),
        s(top),
    ])
    .with_context(|| format!("cannot mount {dev}"))?;
    let sub = top.join(BTRFS_SUBVOLUME);
    let result = if sub.exists() {
        x.in_place(format!("subvolume {BTRFS_SUBVOLUME} on {dev}"));
        Ok(())
    } else {
        x.change(
            &format!("create subvolume {BTRFS_SUBVOLUME} on {dev}"),
            &["btrfs".into(), "subvolume".into(), "create".into(), s(&sub)],
        )
        .map(|_| ())
    };
    let unmounted = cmd::run(&["umount".into(), s(top)]);
    let _ = std::fs::remove_dir(top);
    result?;
    unmounted?;
    Ok(())
}

fn mount(
    x: &mut Exec,
    cfg: &Config,
    opts: &Options,
    dev: &str,
    fstype: &str,
    mount_opts: &str,
) -> anyhow::Result<()> {
    let mp = &cfg.volume.mountpoint;
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if let Some((_, source)) = mount_source(&info, mp) {
        if same_device(&source, Path::new(dev)) {
            x.in_place(format!("{dev} mounted at {}", mp.display()));
            return Ok(());
        }
        return Err(anyhow::anyhow!(
            "{} is already a mount point of {source}, not {dev}: unmount it, or set volume.mountpoint to another directory",
            mp.display()
        ));
    }
    if mp.exists() && !dir_is_empty(mp) && !opts.force {
        return Err(anyhow::anyhow!(
            "{} is not empty: mounting over it would hide its files; move them away, or pass --force",
            mp.display()
        ));
    }
    if !mp.exists() {
        x.change_fn(
            &format!("create {}", mp.display()),
            display_argv(&["mkdir", "-p", &s(mp)]),
            || {
                std::fs::create_dir_all(mp)
                    .with_context(|| format!("cannot create {}", mp.display()))
            },
        )?;
    }
    x.change(
        &format!("mount {dev} at {}", mp.display()),
        &[
            "mount".into(),
            "-t".into(),
            fstype.into(),
            "-o".into(),
            mount_opts.into(),
            dev.into(),
            s(mp),
        ],
    )?;
    Ok(())
}

fn fstab(
    x: &mut Exec,
    cfg: &Config,
    opts: &Options,
    spec: &str,
    fstype: &str,
    mount_opts: &str,
) -> anyhow::Result<()> {
    let path = &opts.fstab_file;
    let mp = &cfg.volume.mountpoint;
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    };
    if let Some(existing) = fstab_entry_for(&text, mp) {
        if existing == spec {
            x.in_place(format!("{} entry for {}", path.display(), mp.display()));
            return Ok(());
        }
        return Err(anyhow::anyhow!(
            "{} already mounts {existing} at {}: edit that line by hand, or run without --fstab",
            path.display(),
            mp.display()
        ));
    }
    let line = fstab_line(spec, mp, fstype, mount_opts);
    x.change_fn(
        &format!("add to {}: {line}", path.display()),
        format!("echo '{line}' >> {}", path.display()),
        || {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let sep = if text.is_empty() || text.ends_with('\n') {
                ""
            } else {
                "\n"
            };
            writeln!(f, "{sep}{line}")
                .and_then(|()| f.sync_all())
                .with_context(|| format!("cannot write {}", path.display()))
        },
    )
}

/// `(uid, gid)` of the data directory's owner ([`common::config::VolumeConfig::owner_ids`]), else root.
fn owner(cfg: &Config) -> anyhow::Result<(u32, u32)> {
    Ok(cfg.volume.owner_ids()?.unwrap_or_else(|| {
        tracing::warn!(
            "there is no user mysql: the data directory will belong to root (set volume.owner)"
        );
        (0, 0)
    }))
}

fn datadir(x: &mut Exec, dir: &Path, (uid, gid): (u32, u32)) -> anyhow::Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => Err(anyhow::anyhow!(
            "{} exists and is not a directory: move it away, or fix volume.datadir",
            dir.display()
        )),
        Ok(m) if m.uid() == uid && m.gid() == gid => {
            x.in_place(format!("{} owned by {uid}:{gid}", dir.display()));
            Ok(())
        }
        Ok(_) => x.change_fn(
            &format!("give {} to {uid}:{gid}", dir.display()),
            display_argv(&["chown", &format!("{uid}:{gid}"), &s(dir)]),
            || chown(dir, uid, gid),
        ),
        Err(_) => x.change_fn(
            &format!("create {} owned by {uid}:{gid}", dir.display()),
            display_argv(&[
                "install",
                "-d",
                "-m",
                "750",
                "-o",
                &uid.to_string(),
                "-g",
                &gid.to_string(),
                &s(dir),
            ]),
            || {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))?;
                chown(dir, uid, gid)
            },
        ),
    }
}

fn chown(p: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::chown(p, Some(uid), Some(gid))
        .with_context(|| format!("cannot chown {}", p.display()))
}

/// Copies an existing data directory onto the volume with the server stopped;
/// the old one is kept as `<from>.volprep-old-<time>` and replaced by a
/// symlink to the new one, so the server's configuration need not change.
fn move_datadir(x: &mut Exec, cfg: &Config, from: &Path, owner: (u32, u32)) -> anyhow::Result<()> {
    let to = &cfg.volume.datadir;
    if std::fs::read_link(from).is_ok_and(|t| t == *to) {
        x.in_place(format!("{} is moved to {}", from.display(), to.display()));
        return datadir(x, to, owner);
    }
    if !from.is_dir() {
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
    if to.exists() && !dir_is_empty(to) {
        return Err(anyhow::anyhow!(
            "volume.datadir {} is not empty: --move-datadir only moves into an empty directory; move its files away first",
            to.display()
        ));
    }
    datadir(x, to, owner)?;
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let old = PathBuf::from(format!("{}.volprep-old-{stamp}", from.display()));
    x.change("stop the server", &cfg.mysql.stop_command.clone())?;
    let copy = x.change(
        &format!("copy {} to {}", from.display(), to.display()),
        &[
            "cp".into(),
            "-a".into(),
            format!("{}/.", from.display()),
            format!("{}/", to.display()),
        ],
    );
    if let Err(e) = copy {
        let started = cmd::run(&cfg.mysql.start_command);
        return Err(e.context(format!(
            "the data directory {} is untouched{}; remove the partial copy in {} before trying again",
            from.display(),
            if started.is_ok() { " and the server was started again" } else { " but the server could not be started again (start it by hand)" },
            to.display()
        )));
    }
    x.change_fn(
        &format!(
            "keep the old data directory as {} and link {} to {}",
            old.display(),
            from.display(),
            to.display()
        ),
        format!(
            "{} && {}",
            display_argv(&["mv", &s(from), &s(&old)]),
            display_argv(&["ln", "-s", &s(to), &s(from)])
        ),
        || {
            std::fs::rename(from, &old)
                .with_context(|| format!("cannot rename {}", from.display()))?;
            std::os::unix::fs::symlink(to, from)
                .with_context(|| format!("cannot link {} to {}", from.display(), to.display()))
        },
    )?;
    x.change("start the server", &cfg.mysql.start_command.clone())
        .context("the data directory was moved but the server did not start: see its error log")?;
    Ok(())
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
    fn mountinfo_and_losetup() {
        let info =
            "29 1 253:0 / /mnt rw,relatime shared:1 - xfs /dev/mapper/mysnap-mysql rw,attr2\n";
        assert_eq!(
            mount_source(info, Path::new("/mnt")),
            Some(("253:0".into(), "/dev/mapper/mysnap-mysql".into()))
        );
        assert_eq!(mount_source(info, Path::new("/")), None);
        assert_eq!(
            parse_losetup_j("/dev/loop3: [2049]:1234 (/work/vol.img)\n").as_deref(),
            Some("/dev/loop3")
        );
        assert_eq!(parse_losetup_j(""), None);
    }
}
