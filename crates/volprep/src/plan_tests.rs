//! `plan()` on inventories built from recorded command output
//! (`testdata/`), through the parsers `inspect` uses.

use std::path::{Path, PathBuf};

use common::cli::exit_code_of;
use common::config::Config;
use common::error::ExitCode;
use common::mountinfo::find;

use crate::*;

fn data(name: &str) -> String {
    let path = format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

const OWNER: (u32, u32) = (27, 27);
const MOUNTED_DIR: PathState = PathState::Dir {
    uid: 0,
    gid: 0,
    empty: false,
};
const DATADIR_OWNED: PathState = PathState::Dir {
    uid: 27,
    gid: 27,
    empty: true,
};

fn config(backend: &str, devices: &[&str]) -> Config {
    let lvm_keys = if backend == "lvm" {
        "vg = \"mysnap\"\nlv = \"mysql\"\nsnapshot_reserve_percent = 30"
    } else {
        ""
    };
    let text = format!(
        r#"[volume]
backend = "{backend}"
device = {devices:?}
{lvm_keys}
mountpoint = "/mnt"
datadir = "/mnt/mysql"
[mysql]
stop_command = ["systemctl", "stop", "mariadb"]
start_command = ["systemctl", "start", "mariadb"]
[store]
url = "file:///var/backups/mysnap"
[backup]
name = "db1"
"#
    );
    Config::parse(&text, Path::new("test.toml")).unwrap()
}

fn opts() -> Options {
    Options {
        fstab: false,
        fstab_file: "/etc/fstab".into(),
        force: false,
        dry_run: true,
        move_datadir: None,
    }
}

/// A block device, as blkid (and, for a PV, pvs) saw it.
fn block(path: &str, blkid: &str, pvs: Option<&str>) -> Device {
    Device {
        path: path.into(),
        exists: true,
        is_file: false,
        loop_dev: None,
        sig: parse_blkid(&data(blkid)),
        pv_vg: pvs.map(|f| parse_pvs_vg(&data(f))),
    }
}

/// A regular file, with `losetup -j` output.
fn file(path: &str, losetup: &str, blkid: &str) -> Device {
    Device {
        is_file: true,
        loop_dev: parse_losetup_j(&data(losetup)),
        ..block(path, blkid, None)
    }
}

/// A machine where nothing is prepared yet.
fn fresh(devices: Vec<Device>) -> Inventory {
    Inventory {
        devices,
        mount_source: find(&data("mountinfo-none.txt"), Path::new("/mnt")).map(|m| m.source),
        owner: OWNER,
        now: 1_700_000_000,
        ..Inventory::default()
    }
}

/// The machine after a run on LVM: mounted (source resolved like the LV), datadir owned.
fn prepared_lvm() -> Inventory {
    let mut inv = fresh(vec![block(
        "/dev/sdb",
        "blkid-lvm2-member.txt",
        Some("pvs-vg-mysnap.txt"),
    )]);
    inv.lvm = LvmState {
        vg_exists: listed(&data("vgs-mysnap.txt"), "mysnap"),
        lv_exists: listed(&data("lvs-mysql.txt"), "mysql"),
        lv_sig: parse_blkid(&data("blkid-xfs.txt")),
    };
    inv.mount_source = find(&data("mountinfo-lvm.txt"), Path::new("/mnt")).map(|m| m.source);
    for p in ["/dev/mapper/mysnap-mysql", "/dev/mysnap/mysql"] {
        inv.realpaths.insert(p.into(), "/dev/dm-0".into());
    }
    inv.mountpoint = MOUNTED_DIR;
    inv.datadir = DATADIR_OWNED;
    inv
}

/// The machine after a run on btrfs on a loop file.
fn prepared_btrfs() -> Inventory {
    let dev = file(
        "/work/vol.img",
        "losetup-j-attached.txt",
        "blkid-btrfs-mysnap.txt",
    );
    let mut inv = fresh(vec![dev]);
    inv.btrfs_subvolume = Some(
        parse_btrfs_subvolumes(&data("btrfs-dump-tree-root.txt")).contains(&"mysnap".to_string()),
    );
    inv.mount_source = find(&data("mountinfo-btrfs.txt"), Path::new("/mnt")).map(|m| m.source);
    inv.realpaths
        .insert("/dev/loop0".into(), "/dev/loop0".into());
    inv.mountpoint = MOUNTED_DIR;
    inv.datadir = DATADIR_OWNED;
    inv
}

fn shown(steps: &[Step]) -> Vec<String> {
    steps.iter().map(Step::to_string).collect()
}

fn refusal(cfg: &Config, opts: &Options, inv: &Inventory) -> (String, ExitCode) {
    let err = plan(cfg, opts, inv).expect_err("the plan should refuse");
    (err.to_string(), exit_code_of(&err))
}

const LVM_TAIL: [&str; 5] = [
    "lvcreate -q -y -Wy -n mysql -l 70%VG mysnap",
    "mkfs.xfs -q /dev/mysnap/mysql",
    "mkdir -p /mnt",
    "mount -t xfs -o defaults /dev/mysnap/mysql /mnt",
    "install -d -m 750 -o 27 -g 27 /mnt/mysql",
];

#[test]
fn fresh_lvm_device_gets_pv_vg_lv_xfs_mount_and_datadir() {
    let cfg = config("lvm", &["/dev/sdb"]);
    let inv = fresh(vec![block("/dev/sdb", "blkid-empty.txt", None)]);
    let steps = plan(&cfg, &opts(), &inv).unwrap();
    let mut want = vec!["pvcreate -q /dev/sdb", "vgcreate -q mysnap /dev/sdb"];
    want.extend(LVM_TAIL);
    assert_eq!(shown(&steps), want);
}

#[test]
fn fresh_btrfs_device_gets_mkfs_subvolume_mount_fstab_and_datadir() {
    let cfg = config("btrfs", &["/dev/sdb"]);
    let inv = Inventory {
        fstab: Some(data("fstab-plain.txt")),
        ..fresh(vec![block("/dev/sdb", "blkid-empty.txt", None)])
    };
    let opts = Options {
        fstab: true,
        ..opts()
    };
    let steps = plan(&cfg, &opts, &inv).unwrap();
    assert_eq!(
        shown(&steps),
        [
            "mkfs.btrfs -q -L mysnap /dev/sdb",
            "btrfs subvolume create '<top level of /dev/sdb>/mysnap'",
            "mkdir -p /mnt",
            "mount -t btrfs -o subvol=mysnap /dev/sdb /mnt",
            "echo '/dev/sdb /mnt btrfs subvol=mysnap,nofail 0 0' >> /etc/fstab",
            "install -d -m 750 -o 27 -g 27 /mnt/mysql",
        ]
    );
    // The new filesystem's UUID is only known once it is made.
    assert!(matches!(
        &steps[4],
        Step::AppendFstab { spec: Spec::UuidOf(Dev::Path(d)), newline_first: false, .. } if d == "/dev/sdb"
    ));
}

#[test]
fn prepared_machines_plan_nothing() {
    let fstab = Options {
        fstab: true,
        ..opts()
    };
    let lvm = Inventory {
        fstab: Some(data("fstab-lvm.txt")),
        ..prepared_lvm()
    };
    assert_eq!(
        plan(&config("lvm", &["/dev/sdb"]), &fstab, &lvm).unwrap(),
        []
    );
    let btrfs = Inventory {
        fstab: Some(data("fstab-btrfs.txt")),
        ..prepared_btrfs()
    };
    let cfg = config("btrfs", &["/work/vol.img"]);
    assert_eq!(plan(&cfg, &fstab, &btrfs).unwrap(), []);
}

#[test]
fn btrfs_without_the_subvolume_gets_it_and_the_fstab_line_names_the_uuid() {
    let mut inv = prepared_btrfs();
    inv.btrfs_subvolume = Some(
        parse_btrfs_subvolumes(&data("btrfs-dump-tree-root-fresh.txt"))
            .contains(&"mysnap".to_string()),
    );
    inv.mount_source = None;
    inv.mountpoint = PathState::Missing;
    inv.fstab = Some(data("fstab-no-final-newline.txt"));
    let opts = Options {
        fstab: true,
        ..opts()
    };
    let steps = plan(&config("btrfs", &["/work/vol.img"]), &opts, &inv).unwrap();
    assert_eq!(
        shown(&steps),
        [
            "btrfs subvolume create '<top level of /dev/loop0>/mysnap'",
            "mkdir -p /mnt",
            "mount -t btrfs -o subvol=mysnap /dev/loop0 /mnt",
            "echo 'UUID=2c6defcd-182a-4b27-98e0-63ea10930114 /mnt btrfs subvol=mysnap,nofail 0 0' >> /etc/fstab",
        ]
    );
    assert!(matches!(
        &steps[3],
        Step::AppendFstab {
            newline_first: true,
            ..
        }
    ));
}

#[test]
fn foreign_ext4_is_refused_and_wiped_with_force() {
    let inv = fresh(vec![block("/dev/sdb", "blkid-ext4.txt", None)]);
    let want = "/dev/sdb holds an ext4 filesystem that volprep did not create; check volume.device, or pass --force to wipe it";
    for backend in ["lvm", "btrfs"] {
        let (err, code) = refusal(&config(backend, &["/dev/sdb"]), &opts(), &inv);
        assert_eq!((err.as_str(), code), (want, ExitCode::Failure), "{backend}");
    }
    let force = Options {
        force: true,
        ..opts()
    };
    let steps = plan(&config("lvm", &["/dev/sdb"]), &force, &inv).unwrap();
    let mut want = vec![
        "wipefs -a /dev/sdb",
        "pvcreate -q /dev/sdb",
        "vgcreate -q mysnap /dev/sdb",
    ];
    want.extend(LVM_TAIL);
    assert_eq!(shown(&steps), want);
    let steps = plan(&config("btrfs", &["/dev/sdb"]), &force, &inv).unwrap();
    assert_eq!(shown(&steps)[0], "mkfs.btrfs -q -L mysnap -f /dev/sdb");
}

#[test]
fn foreign_physical_volumes_are_refused_orphans_taken_with_force() {
    let cfg = config("lvm", &["/dev/sdb"]);
    let inv = fresh(vec![block(
        "/dev/sdb",
        "blkid-lvm2-member.txt",
        Some("pvs-no-vg.txt"),
    )]);
    assert_eq!(
        refusal(&cfg, &opts(), &inv).0,
        "/dev/sdb holds an LVM physical volume that volprep did not create (a physical volume in no volume group); check volume.device, or pass --force to wipe it"
    );
    let force = Options {
        force: true,
        ..opts()
    };
    let steps = plan(&cfg, &force, &inv).unwrap();
    let mut want = vec!["vgcreate -q mysnap /dev/sdb"];
    want.extend(LVM_TAIL);
    assert_eq!(shown(&steps), want);

    let mut other = config("lvm", &["/dev/sdb"]);
    if let common::config::VolumeBackend::Lvm(l) = &mut other.volume.backend {
        l.vg = common::config::LvmName::parse("other").unwrap();
    }
    let inv = fresh(vec![block(
        "/dev/sdb",
        "blkid-lvm2-member.txt",
        Some("pvs-vg-mysnap.txt"),
    )]);
    assert!(refusal(&other, &force, &inv)
        .0
        .starts_with("/dev/sdb belongs to volume group mysnap, not other: --force does not take"));
}

#[test]
fn a_wrong_filesystem_on_the_lv_is_refused_and_remade_with_force() {
    let cfg = config("lvm", &["/dev/sdb"]);
    let mut inv = prepared_lvm();
    inv.lvm.lv_sig = parse_blkid(&data("blkid-ext4.txt"));
    inv.mount_source = None;
    inv.mountpoint = PathState::Missing;
    assert_eq!(
        refusal(&cfg, &opts(), &inv),
        (
            "/dev/mysnap/mysql holds an ext4 filesystem, but volume.filesystem is xfs: fix volume.filesystem, or pass --force to make a new xfs filesystem (destroying its data)".into(),
            ExitCode::Failure
        )
    );
    let force = Options {
        force: true,
        ..opts()
    };
    assert_eq!(
        shown(&plan(&cfg, &force, &inv).unwrap()),
        [
            "mkfs.xfs -q -f /dev/mysnap/mysql",
            "mkdir -p /mnt",
            "mount -t xfs -o defaults /dev/mysnap/mysql /mnt",
        ]
    );
}

#[test]
fn a_partial_btrfs_set_is_refused() {
    let cfg = config("btrfs", &["/dev/sdb", "/dev/sdc"]);
    let inv = fresh(vec![
        block("/dev/sdb", "blkid-btrfs-mysnap.txt", None),
        block("/dev/sdc", "blkid-empty.txt", None),
    ]);
    assert_eq!(
        refusal(&cfg, &opts(), &inv).0,
        "only some of /dev/sdb /dev/sdc hold volprep's btrfs filesystem: check volume.device, or pass --force to make a new one"
    );
}

#[test]
fn a_loop_file_is_attached_first_and_named_by_the_steps_after() {
    let cfg = config("lvm", &["/work/vol.img"]);
    let inv = fresh(vec![file(
        "/work/vol.img",
        "losetup-j-none.txt",
        "blkid-empty.txt",
    )]);
    let steps = plan(&cfg, &opts(), &inv).unwrap();
    let img = PathBuf::from("/work/vol.img");
    assert_eq!(steps[0], Step::AttachLoop { file: img.clone() });
    assert_eq!(
        steps[1],
        Step::Command {
            what: "create physical volume(s) /work/vol.img".into(),
            argv: vec![
                Arg::Lit("pvcreate".into()),
                Arg::Lit("-q".into()),
                Arg::Dev(Dev::LoopOf(img))
            ],
        }
    );
    let mut want = vec![
        "losetup -f --show /work/vol.img",
        "pvcreate -q /work/vol.img",
        "vgcreate -q mysnap /work/vol.img",
    ];
    want.extend(LVM_TAIL);
    assert_eq!(shown(&steps), want);

    // Attached already: its loop device is used.
    let inv = fresh(vec![file(
        "/work/vol.img",
        "losetup-j-attached.txt",
        "blkid-empty.txt",
    )]);
    let steps = plan(&cfg, &opts(), &inv).unwrap();
    assert_eq!(
        shown(&steps)[..2],
        ["pvcreate -q /dev/loop0", "vgcreate -q mysnap /dev/loop0"]
    );
}

#[test]
fn move_datadir_copies_with_the_server_stopped_once() {
    let cfg = config("lvm", &["/dev/sdb"]);
    let opts = Options {
        move_datadir: Some("/var/lib/mysql".into()),
        ..opts()
    };
    let inv = Inventory {
        move_from: Some(MoveFrom {
            link: None,
            is_dir: true,
        }),
        ..fresh(vec![block("/dev/sdb", "blkid-empty.txt", None)])
    };
    let steps = shown(&plan(&cfg, &opts, &inv).unwrap());
    assert_eq!(steps.len(), 8);
    assert_eq!(steps[6], "install -d -m 750 -o 27 -g 27 /mnt/mysql");
    assert_eq!(
        steps[7],
        "systemctl stop mariadb\n\
         cp -a /var/lib/mysql/. /mnt/mysql/\n\
         mv /var/lib/mysql /var/lib/mysql.volprep-old-1700000000 && ln -s /mnt/mysql /var/lib/mysql\n\
         systemctl start mariadb"
    );

    // Moved already: nothing.
    let moved = Inventory {
        move_from: Some(MoveFrom {
            link: Some("/mnt/mysql".into()),
            is_dir: true,
        }),
        ..prepared_lvm()
    };
    assert_eq!(plan(&cfg, &opts, &moved).unwrap(), []);

    // Into a data directory that has files: refused.
    let full = Inventory {
        datadir: PathState::Dir {
            uid: 27,
            gid: 27,
            empty: false,
        },
        ..moved.clone()
    };
    let full = Inventory {
        move_from: Some(MoveFrom {
            link: None,
            is_dir: true,
        }),
        ..full
    };
    assert!(refusal(&cfg, &opts, &full)
        .0
        .starts_with("volume.datadir /mnt/mysql is not empty"));
    // Not a directory: a usage error.
    let none = Inventory {
        move_from: Some(MoveFrom::default()),
        ..moved
    };
    assert_eq!(
        refusal(&cfg, &opts, &none),
        (
            "--move-datadir /var/lib/mysql is not a directory: name the server's current data directory".into(),
            ExitCode::Usage
        )
    );
}

#[test]
fn fstab_lines_are_added_once_and_other_entries_refused() {
    let cfg = config("lvm", &["/dev/sdb"]);
    let opts = Options {
        fstab: true,
        ..opts()
    };
    let missing = Inventory {
        fstab: Some(data("fstab-plain.txt")),
        ..prepared_lvm()
    };
    assert_eq!(
        shown(&plan(&cfg, &opts, &missing).unwrap()),
        ["echo '/dev/mysnap/mysql /mnt xfs defaults,nofail 0 0' >> /etc/fstab"]
    );
    let there = Inventory {
        fstab: Some(data("fstab-lvm.txt")),
        ..prepared_lvm()
    };
    assert_eq!(plan(&cfg, &opts, &there).unwrap(), []);
    // Another device's line for the mount point (the btrfs one here).
    let other = Inventory {
        fstab: Some(data("fstab-btrfs.txt")),
        ..prepared_lvm()
    };
    assert!(refusal(&cfg, &opts, &other).0.starts_with(
        "/etc/fstab already mounts UUID=2c6defcd-182a-4b27-98e0-63ea10930114 at /mnt: edit that line by hand"
    ));
}

#[test]
fn mount_points_of_other_devices_and_missing_devices_are_refused() {
    let cfg = config("lvm", &["/dev/sdb"]);
    let mut inv = prepared_lvm();
    inv.realpaths
        .insert("/dev/mapper/mysnap-mysql".into(), "/dev/dm-7".into());
    assert_eq!(
        refusal(&cfg, &opts(), &inv).0,
        "/mnt is already a mount point of /dev/mapper/mysnap-mysql, not /dev/mysnap/mysql: unmount it, or set volume.mountpoint to another directory"
    );
    let mut inv = prepared_lvm();
    inv.mount_source = None;
    assert!(refusal(&cfg, &opts(), &inv)
        .0
        .starts_with("/mnt is not empty"));
    let mut inv = fresh(vec![block("/dev/sdb", "blkid-empty.txt", None)]);
    inv.devices[0].exists = false;
    assert_eq!(
        refusal(&cfg, &opts(), &inv),
        (
            "volume.device /dev/sdb does not exist: attach the disk, or fix volume.device".into(),
            ExitCode::Usage
        )
    );
}

#[test]
fn recorded_outputs_parse() {
    assert_eq!(
        parse_btrfs_subvolumes(&data("btrfs-dump-tree-root.txt")),
        ["mysnap"]
    );
    assert!(parse_btrfs_subvolumes(&data("btrfs-dump-tree-root-fresh.txt")).is_empty());
    assert_eq!(parse_pvs_vg(&data("pvs-no-vg.txt")), "");
    assert!(!listed(&data("vgs-mysnap.txt"), "mysnapsrc"));
    let cfg = config("lvm", &["/dev/sdb"]);
    assert_eq!(
        lvm_target(&cfg).unwrap(),
        LvmTarget {
            vg: "mysnap".into(),
            lv: "mysql".into(),
            filesystem: common::config::Filesystem::Xfs,
            reserve_percent: 30,
        }
    );
}
