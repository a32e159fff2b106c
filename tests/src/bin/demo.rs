//! `mysnap-demo`: what `cargo xtask demo` runs. A full round trip on this
//! machine: a MariaDB with sample data on a loop-backed btrfs volume, a backup
//! to a local store, a restore onto a second server, every table's CHECKSUM
//! TABLE compared, a summary, and everything cleaned up.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::Parser;
use common::manifest::Manifest;
use mysnap_tests::{sysbench_prepare, BtrfsVolume, MariaDb, MariaOpts};

#[derive(Parser)]
#[command(about = "A full mysnap backup and restore round trip")]
struct Args {
    /// Directory of the mysnap binaries
    #[arg(long)]
    bin_dir: PathBuf,
    /// Rows per sysbench table (4 tables)
    #[arg(long, default_value_t = 100_000)]
    rows: u32,
}

fn config(
    path: &Path,
    db: &MariaDb,
    mountpoint: &Path,
    store: &Path,
    state: &Path,
    service: Option<(Vec<String>, Vec<String>)>,
) {
    let mut text = format!(
        "[mysql]\nsocket = \"{}\"\nuser = \"root\"\n",
        db.socket.display()
    );
    if let Some((stop, start)) = service {
        text += &format!("stop_command = {stop:?}\nstart_command = {start:?}\n");
    }
    text += &format!(
        "[volume]\nbackend = \"btrfs\"\nmountpoint = \"{m}\"\ndatadir = \"{m}/mysql\"\nowner = \"root\"\n\
         [store]\nurl = \"file://{}\"\n[archive]\ncompression = \"zstd\"\n[backup]\nname = \"demo\"\nstate_dir = \"{}\"\n",
        store.display(),
        state.display(),
        m = mountpoint.display()
    );
    std::fs::write(path, text).unwrap();
}

fn mysnap(bin_dir: &Path, name: &str, config: &Path, args: &[&str]) -> String {
    let out = Command::new(bin_dir.join(name))
        .env("MYSNAP_CONFIG", config)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed ({})",
        out.status
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn main() {
    let args = Args::parse();
    let tmp = tempfile::Builder::new()
        .prefix("mysnap-demo-")
        .tempdir_in("/var/tmp")
        .unwrap();
    println!(
        "demo: a btrfs volume on a loop device in {}",
        tmp.path().display()
    );
    let vol = BtrfsVolume::new(tmp.path(), 4096);
    let source = MariaDb::start(&vol.subvol.join("mysql"), MariaOpts::default());
    println!("demo: MariaDB with 4 sysbench tables of {} rows", args.rows);
    sysbench_prepare(&source.socket, 4, args.rows);
    source.sql("CREATE DATABASE demo; CREATE TABLE demo.notes (id INT PRIMARY KEY, note TEXT); INSERT INTO demo.notes VALUES (1, 'backed up by mysnap')");
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let src_cfg = tmp.path().join("source.toml");
    let src_state = tmp.path().join("state-source");
    config(&src_cfg, &source, &vol.subvol, &store, &src_state, None);
    let backup = backup(&args.bin_dir, &src_cfg, &store);

    println!("demo: restore onto a second server");
    let target_root = tmp.path().join("target");
    let target = MariaDb::start(
        &target_root.join("mysql"),
        MariaOpts {
            server_id: 2,
            ..MariaOpts::default()
        },
    );
    let tgt_cfg = tmp.path().join("target.toml");
    let services = Some(target.service_commands());
    let tgt_state = tmp.path().join("state-target");
    config(
        &tgt_cfg,
        &target,
        &target_root,
        &store,
        &tgt_state,
        services,
    );
    let restore = restore(&args.bin_dir, &tgt_cfg, &backup.id);

    let mut mismatched = Vec::new();
    let mut tables = 0;
    for db in ["sbtest", "demo"] {
        let (s, r) = (source.checksums(db), target.checksums(db));
        tables += s.len();
        if s != r {
            mismatched.push(db);
        }
    }
    summary(&backup, &restore, tables, &mismatched);
    drop(target);
    drop(source);
    drop(vol);
    println!("demo: cleaned up");
    if !mismatched.is_empty() {
        std::process::exit(1);
    }
}

struct Backup {
    id: String,
    secs: f64,
    manifest: Manifest,
}

/// snapshotter, then archiver, to the file store; the stored manifest.
fn backup(bin_dir: &Path, cfg: &Path, store: &Path) -> Backup {
    println!(
        "demo: backup (snapshotter | archiver) to file://{}",
        store.display()
    );
    let t = Instant::now();
    let manifest = mysnap(bin_dir, "snapshotter", cfg, &[]);
    let id = mysnap(bin_dir, "archiver", cfg, &["--manifest", &manifest]);
    let secs = t.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(store.join(format!("demo/{id}/manifest.toml"))).unwrap();
    let manifest = Manifest::parse(&text, "store").unwrap();
    Backup { id, secs, manifest }
}

/// `restorer verify`, then `restorer restore`: seconds and the report.
fn restore(bin_dir: &Path, cfg: &Path, id: &str) -> (f64, serde_json::Value) {
    mysnap(bin_dir, "restorer", cfg, &["verify", id]);
    let t = Instant::now();
    let out = mysnap(bin_dir, "restorer", cfg, &["restore", id]);
    (
        t.elapsed().as_secs_f64(),
        serde_json::from_str(&out).unwrap(),
    )
}

fn summary(
    b: &Backup,
    (restore_secs, report): &(f64, serde_json::Value),
    tables: usize,
    mismatched: &[&str],
) {
    let mb = |b: u64| b as f64 / 1e6;
    let (m, a) = (&b.manifest, b.manifest.archive.as_ref().unwrap());
    println!(
        "\nmysnap demo: backup {}\n\
         - lock held {:.1} ms (waited {:.1} ms)\n\
         - data {:.0} MB → archive {:.0} MB (zstd level {})\n\
         - backup  {:.1} s ({:.0} MB/s)\n\
         - restore {restore_secs:.1} s ({:.0} MB/s), server down {:.1} s during the swap\n\
         - CHECKSUM TABLE: {tables} tables, {}",
        b.id,
        m.lock.hold_secs * 1e3,
        m.lock.wait_secs * 1e3,
        mb(a.unpacked_size),
        mb(a.size),
        a.level,
        b.secs,
        mb(a.unpacked_size) / b.secs,
        mb(a.unpacked_size) / restore_secs,
        report["downtime_secs"].as_f64().unwrap_or(f64::NAN),
        if mismatched.is_empty() {
            "all match".to_string()
        } else {
            format!("MISMATCH in {mismatched:?}")
        }
    );
}
