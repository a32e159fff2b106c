//! Execution: runs planned steps in order, resolving the devices earlier
//! steps made.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use common::cmd::{self, display_argv};

use crate::inspect::probe;
use crate::{fstab_line, Arg, Dev, Spec, Step, BTRFS_SUBVOLUME};

#[derive(Default)]
struct Exec {
    /// File → the loop device this run attached it to.
    loops: BTreeMap<PathBuf, String>,
    /// Changes made (for the report).
    changed: Vec<String>,
}

/// Runs `steps` in order; returns what was changed. On failure, loop
/// devices the run attached are detached again.
pub fn execute(steps: &[Step]) -> anyhow::Result<Vec<String>> {
    let mut x = Exec::default();
    let result = steps.iter().try_for_each(|step| x.step(step));
    if result.is_err() {
        for lo in x.loops.values() {
            // Still in use (a VG on it) sets autoclear instead.
            let _ = cmd::run(&["losetup", "-d", lo]);
        }
    }
    result.map(|()| x.changed)
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Exec {
    fn step(&mut self, step: &Step) -> anyhow::Result<()> {
        match step {
            Step::AttachLoop { file } => self.attach(file),
            Step::Command { what, argv } => {
                let argv = argv
                    .iter()
                    .map(|a| self.arg(a))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                self.run(what, &argv).map(drop)
            }
            Step::CreateSubvolume { dev } => {
                let dev = self.dev(dev)?;
                self.create_subvolume(&dev)
            }
            Step::CreateDir { path } => self.change(&format!("create {}", path.display()), || {
                std::fs::create_dir_all(path)
                    .with_context(|| format!("cannot create {}", path.display()))
            }),
            Step::Mount {
                dev,
                fstype,
                options,
                mountpoint,
            } => {
                let dev = self.dev(dev)?;
                let what = format!("mount {dev} at {}", mountpoint.display());
                let argv = ["mount", "-t", fstype, "-o", options, &dev, &s(mountpoint)];
                self.run(&what, &argv.map(String::from)).map(drop)
            }
            Step::AppendFstab { .. } => self.append_fstab(step),
            Step::InstallDir { path, uid, gid } => {
                let what = format!("create {} owned by {uid}:{gid}", path.display());
                self.change(&what, || {
                    std::fs::create_dir_all(path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o750))?;
                    chown(path, *uid, *gid)
                })
            }
            Step::Chown { path, uid, gid } => {
                let what = format!("give {} to {uid}:{gid}", path.display());
                self.change(&what, || chown(path, *uid, *gid))
            }
            Step::MoveDatadir {
                from,
                to,
                old,
                stop,
                start,
            } => self.move_datadir(from, to, old, stop, start),
        }
    }

    fn dev(&self, dev: &Dev) -> anyhow::Result<String> {
        match dev {
            Dev::Path(p) => Ok(p.clone()),
            Dev::LoopOf(file) => self
                .loops
                .get(file)
                .cloned()
                .with_context(|| format!("no loop device was attached for {}", file.display())),
        }
    }

    fn arg(&self, arg: &Arg) -> anyhow::Result<String> {
        match arg {
            Arg::Lit(a) => Ok(a.clone()),
            Arg::Dev(d) => self.dev(d),
        }
    }

    /// Runs a command that changes something, within [`cmd::DEFAULT_TIMEOUT`].
    fn run(&mut self, what: &str, argv: &[String]) -> anyhow::Result<String> {
        self.run_for(what, argv, Some(cmd::DEFAULT_TIMEOUT))
    }

    /// Runs a command that changes something, within `timeout`.
    fn run_for(
        &mut self,
        what: &str,
        argv: &[String],
        timeout: Option<std::time::Duration>,
    ) -> anyhow::Result<String> {
        tracing::info!("{what}: {}", display_argv(argv));
        let out = cmd::run_for(argv, timeout)?;
        self.changed.push(what.to_string());
        Ok(out)
    }

    /// A change made in-process.
    fn change(&mut self, what: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
        tracing::info!("{what}");
        f()?;
        self.changed.push(what.to_string());
        Ok(())
    }

    fn attach(&mut self, file: &Path) -> anyhow::Result<()> {
        let what = format!("attach {} to a loop device", file.display());
        let argv = ["losetup".into(), "-f".into(), "--show".into(), s(file)];
        let lo = self.run(&what, &argv)?.trim().to_string();
        anyhow::ensure!(lo.starts_with("/dev/"), "losetup printed {lo:?}");
        self.loops.insert(file.to_path_buf(), lo);
        Ok(())
    }

    /// Looks for (and creates) the subvolume through a private mount of the top level.
    fn create_subvolume(&mut self, dev: &str) -> anyhow::Result<()> {
        let top = std::env::temp_dir().join(format!("mysnap-volprep-{}", std::process::id()));
        std::fs::create_dir_all(&top)
            .with_context(|| format!("cannot create {}", top.display()))?;
        cmd::run(&[
            "mount".into(),
            "-t".into(),
            "btrfs".into(),
            dev.to_string(),
            s(&top),
        ])
        .with_context(|| format!("cannot mount {dev}"))?;
        let sub = top.join(BTRFS_SUBVOLUME);
        let result = if sub.exists() {
            tracing::info!("in place: subvolume {BTRFS_SUBVOLUME} on {dev}");
            Ok(())
        } else {
            let what = format!("create subvolume {BTRFS_SUBVOLUME} on {dev}");
            self.run(
                &what,
                &["btrfs".into(), "subvolume".into(), "create".into(), s(&sub)],
            )
            .map(drop)
        };
        let unmounted = cmd::run(&["umount".into(), s(&top)]);
        let _ = std::fs::remove_dir(&top);
        result?;
        unmounted?;
        Ok(())
    }

    fn append_fstab(&mut self, step: &Step) -> anyhow::Result<()> {
        let Step::AppendFstab {
            file,
            spec,
            mountpoint,
            fstype,
            options,
            newline_first,
        } = step
        else {
            unreachable!("append_fstab of {step:?}");
        };
        let spec = match spec {
            Spec::Text(t) => t.clone(),
            Spec::UuidOf(dev) => {
                let dev = self.dev(dev)?;
                probe(&dev)?.uuid.map_or(dev, |u| format!("UUID={u}"))
            }
        };
        let line = fstab_line(&spec, mountpoint, fstype, options);
        let sep = if *newline_first { "\n" } else { "" };
        self.change(&format!("add to {}: {line}", file.display()), || {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(file)
                .with_context(|| format!("cannot open {}", file.display()))?;
            writeln!(f, "{sep}{line}")
                .and_then(|()| f.sync_all())
                .with_context(|| format!("cannot write {}", file.display()))
        })
    }

    fn move_datadir(
        &mut self,
        from: &Path,
        to: &Path,
        old: &Path,
        stop: &[String],
        start: &[String],
    ) -> anyhow::Result<()> {
        self.run_for("stop the server", stop, Some(cmd::SERVICE_TIMEOUT))?;
        let what = format!("copy {} to {}", from.display(), to.display());
        let argv = [
            "cp".into(),
            "-a".into(),
            format!("{}/.", from.display()),
            format!("{}/", to.display()),
        ];
        // A copy of a whole data directory: as long as it takes.
        if let Err(e) = self.run_for(&what, &argv, None) {
            let started = cmd::run_for(start, Some(cmd::SERVICE_TIMEOUT));
            return Err(e.context(format!(
                "the data directory {} is untouched{}; remove the partial copy in {} before trying again",
                from.display(),
                if started.is_ok() { " and the server was started again" } else { " but the server could not be started again (start it by hand)" },
                to.display()
            )));
        }
        let what = format!(
            "keep the old data directory as {} and link {} to {}",
            old.display(),
            from.display(),
            to.display()
        );
        self.change(&what, || {
            std::fs::rename(from, old)
                .with_context(|| format!("cannot rename {}", from.display()))?;
            std::os::unix::fs::symlink(to, from)
                .with_context(|| format!("cannot link {} to {}", from.display(), to.display()))
        })?;
        self.run_for("start the server", start, Some(cmd::SERVICE_TIMEOUT))
            .context(
                "the data directory was moved but the server did not start: see its error log",
            )?;
        Ok(())
    }
}

fn chown(p: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::chown(p, Some(uid), Some(gid))
        .with_context(|| format!("cannot chown {}", p.display()))
}
