//! The test-support guards themselves: MariaDB on a btrfs subvolume, sysbench,
//! snapshots, and clean teardown.

use std::process::Command;

use mysnap_tests::{gate, sysbench_prepare, sysbench_run, BtrfsVolume, MariaDb, MariaOpts};

#[test]
fn mariadb_on_btrfs_with_sysbench() {
    if !gate("mariadb_on_btrfs_with_sysbench") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let vol = BtrfsVolume::new(tmp.path(), 1024);
    let mut db = MariaDb::start(&vol.subvol.join("mysql"), MariaOpts::default());
    assert_eq!(db.sql("select 1"), "1");
    assert!(db.try_sql("select * from no_such_db.t").is_err());

    sysbench_prepare(&db.socket, 2, 1000);
    let sums = db.checksums("sbtest");
    assert_eq!(sums.len(), 2, "{sums:?}");
    assert_eq!(sums[0].0, "sbtest1");
    assert_eq!(db.sql("select count(*) from sbtest.sbtest2"), "1000");

    let status = sysbench_run(&db.socket, 2, 1000, 2).wait().unwrap();
    assert!(status.success(), "sysbench run: {status}");

    // A read-only snapshot, which the volume's Drop must delete before unmounting.
    let snap = vol.mnt.join(".snap-1");
    let out = Command::new("btrfs")
        .args(["subvolume", "snapshot", "-r"])
        .arg(&vol.subvol)
        .arg(&snap)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Restart on the same datadir: no re-initialization, same data.
    let before = db.checksums("sbtest");
    db.stop();
    db.stop();
    drop(db);
    let db = MariaDb::start(
        &vol.subvol.join("mysql"),
        MariaOpts {
            server_id: 2,
            ..MariaOpts::default()
        },
    );
    assert_eq!(db.checksums("sbtest"), before);
    assert_eq!(db.sql("select @@server_id"), "2");
}
