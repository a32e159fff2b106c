//! Mount points as the kernel lists them (`/proc/self/mountinfo`) and as
//! fstab spells them: paths with the kernel's octal escapes for `\`, space,
//! tab and newline. The one reader of both formats.

use std::path::Path;

/// `path` as mountinfo and fstab write it.
pub fn escape(path: &Path) -> String {
    path.to_string_lossy()
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012")
}

/// One mountinfo line's fields that mysnap uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `major:minor` of the mounted device.
    pub device: String,
    pub fstype: String,
    /// The mount source (`/dev/mapper/vg-lv`, a loop device, …).
    pub source: String,
}

/// The mount at `path` in mountinfo text `info` (the last one, which is
/// the visible one when several are stacked).
pub fn find(info: &str, path: &Path) -> Option<Mount> {
    let want = escape(path);
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        if f.get(4) != Some(&want.as_str()) {
            return None;
        }
        let dash = f.iter().position(|x| *x == "-")?;
        Some(Mount {
            device: f.get(2)?.to_string(),
            fstype: f.get(dash + 1)?.to_string(),
            source: f.get(dash + 2)?.to_string(),
        })
    })
}

/// Whether `path` is a mount point now.
pub fn is_mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| find(&info, path).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recorded from /proc/self/mountinfo (Debian 12), with a mount point
    /// holding a space and a stacked mount.
    const INFO: &str = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n\
36 35 253:1 / /var/lib/mysnap/mnt/with\\040space ro,relatime - xfs /dev/mapper/x ro\n\
40 22 7:0 /mysnap /mnt rw,relatime shared:5 - btrfs /dev/loop0 rw,space_cache=v2,subvol=/mysnap\n\
41 40 253:2 / /mnt rw,relatime - xfs /dev/mapper/vg-lv rw\n";

    #[test]
    fn finds_escaped_and_stacked_mounts() {
        let m = find(INFO, Path::new("/var/lib/mysnap/mnt/with space")).unwrap();
        assert_eq!(m.fstype, "xfs");
        assert_eq!(m.source, "/dev/mapper/x");
        let top = find(INFO, Path::new("/mnt")).unwrap();
        assert_eq!(
            top,
            Mount {
                device: "253:2".into(),
                fstype: "xfs".into(),
                source: "/dev/mapper/vg-lv".into()
            }
        );
        assert_eq!(find(INFO, Path::new("/mn")), None);
        assert_eq!(find(INFO, Path::new("/var/lib/mysnap/mnt/with")), None);
    }

    #[test]
    fn escapes_like_the_kernel() {
        assert_eq!(escape(Path::new("/a b\\c\td")), "/a\\040b\\134c\\011d");
    }
}
