//! The hardware's limits: the same work as a contender done by plain tools
//! (`tar | zstd`, `zstd -dc | tar -x`, one curl PUT or GET against the same
//! S3 server, and the pipelines through it: `tar | zstd | aws s3 cp -` (a
//! streamed multipart upload, as S3 takes no PUT of unknown length),
//! `curl GET | zstd -dc | tar -x`), each from a dropped page cache.

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
            shell_time(&curl(
                b,
                &format!("-o /dev/null -T {}", file.display()),
                PUT_KEY,
            ))
        },
    );
    let _ = std::fs::remove_file(b.s3.root.join("bench").join(PUT_KEY));
    t
}

/// One GET of the object `key` of the bucket from the S3 server.
pub fn get(b: &Bench, key: &str) -> Result<f64, String> {
    timed(
        b.args.runs,
        || {},
        || shell_time(&curl(b, "-o /dev/null", key)),
    )
}

/// `tar -cf - mysql | zstd -T0 -3 | aws s3 cp - URL` of a snapshot into
/// the S3 server (`compress` false: no zstd): the backup pipeline's limit
/// through the same S3 server on the same cores, a multipart upload of
/// unknown length like mysnap's. The object is removed after.
pub fn tar_put(b: &Bench, snap: &Path, compress: bool) -> Result<f64, String> {
    let zstd = if compress { "| zstd -T0 -3 -q " } else { "" };
    // Credentials from a file, not argv.
    let keys = b.s3.env();
    let creds = b.tmp.path().join("aws.credentials");
    std::fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            keys[0].1, keys[1].1
        ),
    )
    .unwrap();
    let t = timed(
        b.args.runs,
        || {},
        || {
            shell_time(&format!(
                "tar -cf - -C {} mysql {zstd}| AWS_SHARED_CREDENTIALS_FILE={} AWS_CONFIG_FILE=/dev/null \
                 AWS_DEFAULT_REGION=us-east-1 aws s3 cp - s3://bench/{PUT_KEY} --endpoint-url {} --only-show-errors",
                snap.display(),
                creds.display(),
                b.s3.endpoint
            ))
        },
    );
    let _ = std::fs::remove_file(b.s3.root.join("bench").join(PUT_KEY));
    t
}

/// `curl GET | zstd -dc | tar -x` + sync of the object `key` into a
/// scratch directory: the restore pipeline's limit through the same S3
/// server on the same cores.
pub fn get_untar(b: &Bench, key: &str) -> Result<f64, String> {
    let scratch = b.tmp.path().join("scratch");
    let t = timed(
        b.args.runs,
        || fresh_dir(&scratch),
        || {
            shell_time(&format!(
                "{} | zstd -dc -q | tar -x -C {} && sync",
                curl(b, "-o -", key),
                scratch.display()
            ))
        },
    );
    let _ = std::fs::remove_dir_all(&scratch);
    t
}

/// The key of the bucket the PUT limits write.
const PUT_KEY: &str = "put-limit";

/// One curl request to the S3 server, signed (SigV4, credentials from a
/// file, not argv), as a shell command (for [`shell_time`], which drops the
/// page cache first).
fn curl(b: &Bench, args: &str, key: &str) -> String {
    let keys = b.s3.env();
    let cfg = b.tmp.path().join("curl.cfg");
    std::fs::write(&cfg, format!("user = \"{}:{}\"\n", keys[0].1, keys[1].1)).unwrap();
    format!(
        "curl -sSf -K {} --aws-sigv4 aws:amz:us-east-1:s3 -H x-amz-content-sha256:UNSIGNED-PAYLOAD {args} {}/bench/{key}",
        cfg.display(),
        b.s3.endpoint
    )
}
