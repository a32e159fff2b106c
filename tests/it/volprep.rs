//! volprep on the host: the btrfs backend on a loop file (LVM needs the VM:
//! `cargo xtask vm-test`), and what it refuses.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use mysnap_tests::{bin, gate};

use crate::backup::{assert_ok, error_line};

/// Unmounts and detaches what a volprep run left, also when the test fails.
struct Cleanup {
    mnt: PathBuf,
    imgs: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        for img in &self.imgs {
            let out = Command::new("losetup").arg("-j").arg(img).output();
            if let Ok(out) = out {
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    if let Some((dev, _)) = line.split_once(':') {
                        let _ = Command::new("losetup").args(["-d", dev]).status();
                    }
                }
            }
        }
    }
}

fn write_config(dir: &Path, device: &Path, mnt: &Path) -> PathBuf {
    let cfg = dir.join("mysnap.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[volume]
backend = "btrfs"
device = "{dev}"
mountpoint = "{mnt}"
datadir = "{mnt}/mysql"
owner = "root"
[store]
url = "file://{dir}/store"
[backup]
name = "db1"
state_dir = "{dir}/state"
"#,
            dev = device.display(),
            mnt = mnt.display(),
            dir = dir.display()
        ),
    )
    .unwrap();
    cfg
}

fn volprep(cfg: &Path, args: &[&str]) -> Output {
    Command::new(bin("volprep"))
        .arg("--config")
        .arg(cfg)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn mounted(p: &Path) -> bool {
    common::mountinfo::is_mounted(p)
}

#[test]
fn volprep_btrfs_is_idempotent_dry_runs_change_nothing_and_foreign_filesystems_are_refused() {
    if !gate(
        "volprep_btrfs_is_idempotent_dry_runs_change_nothing_and_foreign_filesystems_are_refused",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().canonicalize().unwrap();
    let img = dir.join("vol.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    let foreign = dir.join("foreign.img");
    std::fs::File::create(&foreign)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mnt = dir.join("mnt");
    let _cleanup = Cleanup {
        mnt: mnt.clone(),
        imgs: vec![img.clone(), foreign.clone()],
    };
    let cfg = write_config(&dir, &img, &mnt);
    let fstab = dir.join("fstab");
    let fstab_arg = fstab.to_str().unwrap();

    // Dry run: the commands on stdout, nothing attached, made or mounted.
    let out = volprep(&cfg, &["--dry-run", "--fstab", "--fstab-file", fstab_arg]);
    assert_ok(&out, "volprep --dry-run");
    let plan = String::from_utf8_lossy(&out.stdout);
    for c in [
        "losetup -f --show",
        "mkfs.btrfs",
        "mount -t btrfs -o subvol=mysnap",
        "install -d",
    ] {
        assert!(plan.contains(c), "dry run lacks {c}: {plan}");
    }
    assert!(
        !mnt.exists() && !fstab.exists(),
        "the dry run changed something"
    );

    // The real run, then a second one that changes nothing.
    let out = volprep(&cfg, &["--fstab", "--fstab-file", fstab_arg]);
    assert_ok(&out, "volprep");
    assert!(mounted(&mnt), "{} is not mounted", mnt.display());
    assert!(mnt.join("mysql").is_dir());
    let line = std::fs::read_to_string(&fstab).unwrap();
    assert!(
        line.starts_with("UUID=") && line.contains(" btrfs subvol=mysnap,nofail 0 0"),
        "{line}"
    );
    let out = volprep(&cfg, &["--fstab", "--fstab-file", fstab_arg]);
    assert_ok(&out, "volprep (again)");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing changed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&fstab).unwrap(),
        line,
        "fstab changed"
    );
    let out = volprep(&cfg, &["--dry-run"]);
    assert_ok(&out, "volprep --dry-run (in place)");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "nothing to do");

    // A device with a filesystem volprep did not make: refused, exit 1, one line.
    assert!(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&foreign)
        .status()
        .unwrap()
        .success());
    let other_mnt = dir.join("other");
    let cfg2 = write_config(&dir, &foreign, &other_mnt);
    let err = error_line(&volprep(&cfg2, &[]), 1);
    assert!(
        err.contains("holds an ext4 filesystem that volprep did not create")
            && err.contains("--force"),
        "{err}"
    );
    assert!(!other_mnt.exists(), "refused, yet something was made");

    // A bad name never reaches argv: exit 2.
    let text = std::fs::read_to_string(&cfg2).unwrap().replace(
        "backend = \"btrfs\"",
        "backend = \"lvm\"\nvg = \"-rf\"\nlv = \"x\"",
    );
    std::fs::write(&cfg2, text).unwrap();
    let err = error_line(&volprep(&cfg2, &[]), 2);
    assert!(err.contains("volume.vg"), "{err}");
}
