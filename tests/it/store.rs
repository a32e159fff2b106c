//! One conformance suite for both store implementations: the file store and
//! the S3 store against the in-process S3 server (real protocol, SigV4).

use std::io::Write;
use std::path::Path;

use bytes::Bytes;
use common::store::{open, Store};
use mysnap_tests::{s3_config, store_config, S3Server};
use sha2::{Digest, Sha256};

const MIB: usize = 1 << 20;

/// Deterministic incompressible-looking bytes (xorshift).
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Streams `body` through a part channel from a blocking thread; `finish`
/// false drops the writer without finishing (an aborted stream).
pub async fn stream(
    store: &dyn Store,
    key: &str,
    body: Vec<u8>,
    finish: bool,
) -> anyhow::Result<u64> {
    let (mut w, upload) = store.transfer().upload(body.len() as u64);
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        w.write_all(&body)?;
        if finish {
            w.finish()?;
        }
        Ok(())
    });
    let result = store.put_stream(key, upload).await;
    let written = writer.join().expect("writer thread panicked");
    if result.is_ok() {
        written.expect("writer failed although the upload succeeded");
    }
    result
}

/// Multipart uploads the S3 test server holds (s3s-fs keeps one
/// `.upload-<id>.json` per upload in its root).
pub fn uploads_on_server(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".upload-") && n.ends_with(".json"))
        .collect()
}

/// Streams `body` to `key` with `create_only`.
pub async fn stream_new(store: &dyn Store, key: &str, body: Vec<u8>) -> anyhow::Result<u64> {
    let (mut w, mut upload) = store.transfer().upload(body.len() as u64);
    upload.create_only = true;
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&body).and_then(|()| w.finish());
    });
    let result = store.put_stream(key, upload).await;
    writer.join().expect("writer thread panicked");
    result
}

pub fn is_exists(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref(),
            Some(common::store::StoreError::Exists { .. })
        )
    })
}

fn keys(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The behaviour every store must have. `sibling` is a store next to `store`
/// (same bucket or parent directory, another prefix); `missing` names a bucket
/// or directory that does not exist.
async fn conformance(store: &dyn Store, sibling: &dyn Store, missing: &dyn Store) {
    // check
    store.check().await.expect("check() of a usable store");
    let err = missing
        .check()
        .await
        .expect_err("check() of a missing bucket/directory must fail");
    assert!(
        format!("{err:#}").contains("does not exist"),
        "check() message: {err:#}"
    );

    // put + get + size; overwrite
    store
        .put("small/hello.txt", Bytes::from_static(b"hello"))
        .await
        .unwrap();
    assert_eq!(
        store.get("small/hello.txt", 1 << 20).await.unwrap(),
        Bytes::from_static(b"hello")
    );
    assert_eq!(store.size("small/hello.txt").await.unwrap(), Some(5));
    store
        .put("small/hello.txt", Bytes::from_static(b"hello, world"))
        .await
        .unwrap();
    assert_eq!(
        store.get("small/hello.txt", 1 << 20).await.unwrap(),
        Bytes::from_static(b"hello, world")
    );
    assert_eq!(store.size("small/none.txt").await.unwrap(), None);
    assert!(
        store.get("small/none.txt", 1 << 20).await.is_err(),
        "get of a missing key must fail"
    );

    // put_stream of ~13 MiB in 5 MiB parts: 5 + 5 + ~3
    let big = data(13 * MIB + 12_345, 42);
    let n = stream(store, "big/data.bin", big.clone(), true)
        .await
        .expect("put_stream");
    assert_eq!(n, big.len() as u64, "bytes written");
    assert_eq!(
        store.size("big/data.bin").await.unwrap(),
        Some(big.len() as u64)
    );
    let got = store.get("big/data.bin", 1 << 30).await.unwrap();
    assert_eq!(got.len(), big.len());
    assert_eq!(sha(&got), sha(&big), "SHA-256 of the streamed object");

    // get_range: across the first part boundary, and the tail
    let (a, b) = (5 * MIB - 1000, 10 * MIB + 1000);
    let r = store
        .get_range("big/data.bin", a as u64..b as u64)
        .await
        .unwrap();
    assert_eq!(r.len(), b - a);
    assert!(r[..] == big[a..b], "get_range {a}..{b} returns those bytes");
    let end = big.len();
    let r = store
        .get_range("big/data.bin", (end - 10) as u64..end as u64)
        .await
        .unwrap();
    assert!(r[..] == big[end - 10..], "get_range of the last bytes");
    assert!(store
        .get_range("big/data.bin", 7..7)
        .await
        .unwrap()
        .is_empty());

    // a small stream (one part, smaller than a part) and an empty one
    let small = data(1000, 7);
    assert_eq!(
        stream(store, "small/stream.bin", small.clone(), true)
            .await
            .unwrap(),
        1000
    );
    assert_eq!(
        store.get("small/stream.bin", 1 << 30).await.unwrap(),
        Bytes::from(small)
    );
    assert_eq!(
        stream(store, "small/empty.bin", Vec::new(), true)
            .await
            .unwrap(),
        0
    );
    assert_eq!(store.size("small/empty.bin").await.unwrap(), Some(0));

    // list: exactly the keys under the prefix, sorted, relative to the store
    for k in ["l/b/1", "l/a/2", "l/ab", "l/a/1"] {
        store
            .put(k, Bytes::from(k.as_bytes().to_vec()))
            .await
            .unwrap();
    }
    sibling
        .put("l/a/0-sibling", Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(store.list("l/a/").await.unwrap(), keys(&["l/a/1", "l/a/2"]));
    assert_eq!(
        store.list("l/a").await.unwrap(),
        keys(&["l/a/1", "l/a/2", "l/ab"])
    );
    assert_eq!(
        store.list("l/").await.unwrap(),
        keys(&["l/a/1", "l/a/2", "l/ab", "l/b/1"])
    );
    assert_eq!(store.list("nothing/").await.unwrap(), Vec::<String>::new());
    let all = keys(&[
        "big/data.bin",
        "l/a/1",
        "l/a/2",
        "l/ab",
        "l/b/1",
        "small/empty.bin",
        "small/hello.txt",
        "small/stream.bin",
    ]);
    assert_eq!(
        store.list("").await.unwrap(),
        all,
        "list of the whole store"
    );
    assert_eq!(sibling.list("").await.unwrap(), keys(&["l/a/0-sibling"]));

    // delete
    store.delete("l/a/1").await.unwrap();
    assert_eq!(store.size("l/a/1").await.unwrap(), None);
    assert_eq!(store.list("l/a/").await.unwrap(), keys(&["l/a/2"]));
    store
        .delete("l/a/1")
        .await
        .expect("deleting a missing key is not an error");
    store.delete("big/data.bin").await.unwrap();
    assert_eq!(store.size("big/data.bin").await.unwrap(), None);

    // create-only writes refuse an existing object and leave it as it was
    store
        .put_new("new/m", Bytes::from_static(b"first"))
        .await
        .unwrap();
    let err = store
        .put_new("new/m", Bytes::from_static(b"second"))
        .await
        .expect_err("put_new of an existing key must fail");
    assert!(is_exists(&err), "{err:#}");
    let first = data(11 * MIB, 11);
    stream_new(store, "new/big", first.clone()).await.unwrap();
    for (len, what) in [(11 * MIB, "multipart"), (100, "single put")] {
        let err = stream_new(store, "new/big", data(len, 12))
            .await
            .expect_err("a create-only stream onto an existing key must fail");
        assert!(is_exists(&err), "{what}: {err:#}");
        let got = store.get("new/big", 1 << 30).await.unwrap();
        assert_eq!(sha(&got), sha(&first), "{what}: the first object is intact");
    }
    for k in ["new/m", "new/big"] {
        store.delete(k).await.unwrap();
    }

    // abort: the writer goes away without finish()
    for (key, len) in [
        ("abort/multipart.bin", 12 * MIB),
        ("abort/small.bin", MIB),
        ("abort/nothing.bin", 0),
    ] {
        let err = stream(store, key, data(len, 9), false).await;
        assert!(
            err.is_err(),
            "put_stream of {key} whose writer was dropped must fail"
        );
        assert_eq!(
            store.size(key).await.unwrap(),
            None,
            "{key} must not exist after an aborted upload"
        );
    }
    assert_eq!(store.list("abort/").await.unwrap(), Vec::<String>::new());
    assert_eq!(
        store.list("").await.unwrap().len(),
        all.len() - 2,
        "nothing left by aborted uploads"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_conformance() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    std::fs::create_dir(&root).unwrap();
    let url = |p: &Path| format!("file://{}", p.display());
    let store = open(&store_config(&url(&root), None)).await.unwrap();
    let sibling = open(&store_config(&url(&tmp.path().join("store2")), None))
        .await
        .unwrap();
    let missing = open(&store_config(&url(&tmp.path().join("missing")), None))
        .await
        .unwrap();
    assert_eq!(store.url("a/b"), format!("file://{}/a/b", root.display()));

    conformance(&*store, &*sibling, &*missing).await;

    let leftovers: Vec<_> = walkdir::WalkDir::new(&root)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path().display().to_string())
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary files left behind: {leftovers:?}"
    );
}

/// base64url without padding, as s3s-fs names its metadata files.
fn b64url(s: &str) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for c in s.as_bytes().chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..=c.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_conformance() {
    let tmp = tempfile::tempdir().unwrap();
    let server = S3Server::with_bucket(&tmp.path().join("s3"));
    let ep = Some(server.endpoint.as_str());
    let store = open(&s3_config(&server.endpoint)).await.unwrap();
    let sibling = open(&store_config("s3://mysnap-test/pfx2", ep))
        .await
        .unwrap();
    let missing = open(&store_config("s3://no-such-bucket/pfx", ep))
        .await
        .unwrap();
    assert_eq!(store.url("a/b"), "s3://mysnap-test/pfx/a/b");

    // Before the suite deletes it, check the 13 MiB stream really was a 3-part
    // multipart upload: s3s-fs records the ETag, `<md5 of md5s>-<parts>`.
    let probe = data(13 * MIB + 12_345, 42);
    stream(&*store, "probe/data.bin", probe, true)
        .await
        .unwrap();
    let info = server.root.join(format!(
        ".bucket-{}.object-{}.internal.json",
        b64url("mysnap-test"),
        b64url("pfx/probe/data.bin")
    ));
    let info = std::fs::read_to_string(&info).unwrap_or_else(|e| panic!("{}: {e}", info.display()));
    assert!(info.contains("-3\""), "expected a 3-part ETag in {info}");
    store.delete("probe/data.bin").await.unwrap();

    conformance(&*store, &*sibling, &*missing).await;

    // Again with the SDK's checksums on every request (`store.checksums =
    // "when_supported"`, the default against AWS itself).
    let with_checksums = |url: &str| common::config::StoreConfig {
        checksums: common::config::Checksums::WhenSupported,
        ..store_config(url, ep)
    };
    let store = open(&with_checksums("s3://mysnap-test/pfx3"))
        .await
        .unwrap();
    let sibling = open(&with_checksums("s3://mysnap-test/pfx4"))
        .await
        .unwrap();
    let missing = open(&with_checksums("s3://no-such-bucket/pfx"))
        .await
        .unwrap();
    conformance(&*store, &*sibling, &*missing).await;

    // Aborted multipart uploads leave no parts behind on the server.
    let leftovers = uploads_on_server(&server.root);
    assert!(
        leftovers.is_empty(),
        "multipart uploads left on the server: {leftovers:?}"
    );
}

#[test]
fn b64url_matches_known_values() {
    assert_eq!(b64url("f"), "Zg");
    assert_eq!(b64url("fo"), "Zm8");
    assert_eq!(b64url("foo"), "Zm9v");
    assert_eq!(b64url("foob?"), "Zm9vYj8");
}
