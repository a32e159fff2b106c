//! The hardware's limits: the same work as a contender done by plain tools
//! (`tar | zstd`, `zstd -dc | tar -x`, one curl PUT or GET against the same
//! S3 server), each from a dropped page cache.

use std::path::Path;

use crate::dataset::Bench;
use crate::measure::{fresh_dir, shell_time, timed};

/// `tar -cf - mysql | zstd -T0 -3 > /dev/null` of a snapshot.
pub fn tar_zstd(b: &Bench, snap: &Path) -> f64 {
    timed(
        b.args.runs,
        || {},
        || {
            shell_time(&format!(
                "tar -cf - -C {} mysql | zstd -T0 -3 -q > /dev/null",
                snap.display()
            ))
        },
    )
    .expect("tar | zstd")
}

/// `tar -cf - mysql | cat > /dev/null` of a snapshot: reading it.
pub fn tar_read(b: &Bench, snap: &Path) -> f64 {
    timed(
        b.args.runs,
        || {},
        || {
            shell_time(&format!(
                "tar -cf - -C {} mysql | cat > /dev/null",
                snap.display()
            ))
        },
    )
    .expect("tar | cat")
}

/// `zstd -dc archive | tar -x` + sync into a scratch directory.
pub fn untar(b: &Bench, archive: &Path) -> f64 {
    let scratch = b.tmp.path().join("scratch");
    let t = timed(
        b.args.runs,
        || fresh_dir(&scratch),
        || {
            shell_time(&format!(
                "zstd -dc -q {} | tar -x -C {} && sync",
                archive.display(),
                scratch.display()
            ))
        },
    )
    .expect("zstd -dc | tar -x");
    let _ = std::fs::remove_dir_all(&scratch);
    t
}

/// One PUT of `file` to the S3 server (the object is removed after).
pub fn put(b: &Bench, file: &Path) -> Result<f64, String> {
    let t = timed(
        b.args.runs,
        || {},
        || {
            curl(
                b,
                &format!("-o /dev/null -T {}", file.display()),
                "put-limit",
            )
        },
    );
    let _ = std::fs::remove_file(b.s3.root.join("bench/put-limit"));
    t
}

/// One GET of the object `key` of the bucket from the S3 server.
pub fn get(b: &Bench, key: &str) -> Result<f64, String> {
    timed(b.args.runs, || {}, || curl(b, "-o /dev/null", key))
}

/// One curl request to the S3 server, signed (SigV4, credentials from a
/// file, not argv), from a dropped page cache: its wall time.
fn curl(b: &Bench, args: &str, key: &str) -> Result<f64, String> {
    let keys = b.s3.env();
    let cfg = b.tmp.path().join("curl.cfg");
    std::fs::write(&cfg, format!("user = \"{}:{}\"\n", keys[0].1, keys[1].1)).unwrap();
    shell_time(&format!(
        "curl -sSf -K {} --aws-sigv4 aws:amz:us-east-1:s3 -H x-amz-content-sha256:UNSIGNED-PAYLOAD {args} {}/bench/{key}",
        cfg.display(),
        b.s3.endpoint
    ))
}
