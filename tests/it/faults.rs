//! The S3 store against a flaky S3: the real server (s3s-fs, signatures
//! checked) behind the fault-injecting proxy. Transient faults are retried
//! and the bytes arrive intact; persistent ones fail in a bounded time with
//! a message naming the object, and leave no upload behind.

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::store::{abort_leftovers, open, Store, UploadLog};
use mysnap_tests::faults::{Fault, FaultProxy, On, Times};
use mysnap_tests::{s3_config, S3Server};

use crate::store::{data, sha, stream, stream_new, uploads_on_server};

const MIB: usize = 1 << 20;

/// A server, the proxy in front of it, and a store through the proxy with
/// a 2 s read timeout.
struct Flaky {
    server: S3Server,
    proxy: FaultProxy,
    store: Box<dyn Store>,
    _tmp: tempfile::TempDir,
}

impl Flaky {
    async fn new() -> Flaky {
        let tmp = tempfile::tempdir().unwrap();
        let server = S3Server::with_bucket(&tmp.path().join("s3"));
        let proxy = FaultProxy::start(&server.endpoint);
        let mut cfg = s3_config(&proxy.endpoint);
        cfg.read_timeout = Duration::from_secs(2);
        let store = open(&cfg).await.unwrap();
        Flaky {
            server,
            proxy,
            store,
            _tmp: tmp,
        }
    }

    /// The store without the proxy.
    async fn direct(&self) -> Box<dyn Store> {
        open(&s3_config(&self.server.endpoint)).await.unwrap()
    }

    /// Every range of `key` (`len` bytes) as the restorer reads it: in
    /// ranges of a part, concatenated.
    async fn download(&self, key: &str, len: u64) -> anyhow::Result<Vec<u8>> {
        let (range, _) = self.store.transfer().download();
        let mut out = Vec::new();
        let mut at = 0;
        while at < len {
            let end = (at + range).min(len);
            out.extend_from_slice(&self.store.get_range(key, at..end).await?);
            at = end;
        }
        Ok(out)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_proxy_requests_arrive_unchanged_and_pass_the_signature_check() {
    let f = Flaky::new().await;
    let body = data(13 * MIB, 1);
    stream(&*f.store, "a/data.bin", body.clone(), true)
        .await
        .unwrap();
    f.store
        .put("a/small", Bytes::from_static(b"small"))
        .await
        .unwrap();
    assert_eq!(f.store.list("a/").await.unwrap(), ["a/data.bin", "a/small"]);
    let got = f.download("a/data.bin", body.len() as u64).await.unwrap();
    assert_eq!(sha(&got), sha(&body));
    assert!(
        f.proxy.forwarded() >= 8,
        "requests went through the proxy: {}",
        f.proxy.forwarded()
    );
    assert_eq!(f.proxy.injected(), 0);
    // `store.checksums = "auto"` with an endpoint (an S3-compatible store):
    // no SDK checksum on writes, so stores that refuse them take the data.
    for r in f.proxy.seen() {
        let sdk_checksum = r
            .headers
            .iter()
            .any(|(n, _)| n.starts_with("x-amz-checksum-") || n == "x-amz-trailer");
        assert!(!sdk_checksum, "{}: {:?}", r.describe(), r.headers);
    }
}

/// The server behind the proxy still checks signatures: a request whose
/// signature is wrong is refused as such, not let through.
#[test]
fn through_the_proxy_a_wrong_signature_is_still_refused() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let server = S3Server::start(&tmp.path().join("s3"));
    server.create_bucket("mysnap-test");
    let proxy = FaultProxy::start(&server.endpoint);
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y%m%dT%H%M%SZ"])
        .output()
        .unwrap();
    let now = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let addr = proxy.endpoint.strip_prefix("http://").unwrap();
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "GET /mysnap-test/ HTTP/1.1\r\nHost: {addr}\r\nx-amz-date: {now}\r\nx-amz-content-sha256: UNSIGNED-PAYLOAD\r\nAuthorization: AWS4-HMAC-SHA256 Credential={}/{}/us-east-1/s3/aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={}\r\nConnection: close\r\n\r\n",
        server.access_key,
        &now[..8],
        "0".repeat(64)
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 403") && answer.contains("SignatureDoesNotMatch"),
        "{answer}"
    );
    assert_eq!(proxy.forwarded(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_faults_on_upload_are_retried_and_the_object_is_intact() {
    let f = Flaky::new().await;
    let body = data(13 * MIB + 7, 2);
    for (i, (fault, on)) in [
        (Fault::SlowDown503, On::UploadPart),
        (Fault::InternalError500, On::UploadPart),
        (Fault::ResetRequestBody, On::UploadPart),
        (Fault::StallResponse, On::UploadPart),
        (Fault::SlowDown503, On::CreateMultipartUpload),
        (Fault::InternalError500, On::CompleteMultipartUpload),
        (Fault::ResetRequestBody, On::PutObject),
    ]
    .into_iter()
    .enumerate()
    {
        f.proxy.inject(fault, on.clone(), Times::First(2));
        let before = f.proxy.injected();
        let key = format!("up/{i}");
        let len = if on == On::PutObject { MIB } else { body.len() };
        stream(&*f.store, &key, body[..len].to_vec(), true)
            .await
            .unwrap_or_else(|e| panic!("{fault:?} on {on:?} twice: {e:#}"));
        assert_eq!(
            f.proxy.injected() - before,
            2,
            "{fault:?} on {on:?}: {:?}",
            f.proxy.log()
        );
        let got = f.direct().await.get(&key, 1 << 30).await.unwrap();
        assert_eq!(sha(&got), sha(&body[..len]), "{fault:?} on {on:?}");
    }
    assert!(uploads_on_server(&f.server.root).is_empty());

    // A CompleteMultipartUpload that the store carried out but whose answer
    // was lost: the SDK's retry is refused (the upload is gone, and the
    // object exists), yet the object is this upload's.
    for fault in [Fault::StallResponse, Fault::TruncateResponseBody] {
        f.proxy
            .inject(fault, On::CompleteMultipartUpload, Times::First(1));
        let key = format!("lost/{fault:?}");
        let before = f.proxy.injected();
        stream_new(&*f.store, &key, body.clone())
            .await
            .unwrap_or_else(|e| panic!("{fault:?} on the completion: {e:#}"));
        assert_eq!(f.proxy.injected() - before, 1, "{fault:?}");
        let got = f.direct().await.get(&key, 1 << 30).await.unwrap();
        assert_eq!(sha(&got), sha(&body), "{fault:?}");
    }
    assert!(uploads_on_server(&f.server.root).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_faults_on_download_are_retried_and_the_bytes_are_intact() {
    let f = Flaky::new().await;
    let body = data(13 * MIB + 7, 3);
    stream(&*f.direct().await, "down/data.bin", body.clone(), true)
        .await
        .unwrap();
    for fault in [
        Fault::SlowDown503,
        Fault::InternalError500,
        Fault::ResetResponseBody,
        Fault::TruncateResponseBody,
        Fault::StallResponseBody,
        Fault::StallResponse,
    ] {
        f.proxy.inject(fault, On::GetObject, Times::First(2));
        let before = f.proxy.injected();
        let got = f
            .download("down/data.bin", body.len() as u64)
            .await
            .unwrap_or_else(|e| panic!("{fault:?} twice: {e:#}"));
        assert_eq!(f.proxy.injected() - before, 2, "{fault:?}");
        assert_eq!(sha(&got), sha(&body), "{fault:?}");
        // The small-object GET (manifests) too.
        f.proxy.inject(fault, On::GetObject, Times::First(1));
        let got = f.store.get("down/data.bin", 1 << 30).await.unwrap();
        assert_eq!(sha(&got), sha(&body), "{fault:?}, whole object");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_503_fails_the_upload_naming_the_object_and_leaves_no_upload() {
    let f = Flaky::new().await;
    let state = tempfile::tempdir().unwrap();
    let log = UploadLog::in_state_dir(state.path());
    f.proxy
        .inject(Fault::SlowDown503, On::UploadPart, Times::Always);
    let started = Instant::now();
    let err = stream_logged(&*f.store, "p/data.bin", data(13 * MIB, 4), &log)
        .await
        .expect_err("an upload whose every part gets 503 must fail");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("s3://mysnap-test/pfx/p/data.bin") && msg.contains("SlowDown"),
        "{msg}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(f.direct().await.size("p/data.bin").await.unwrap(), None);
    assert!(
        uploads_on_server(&f.server.root).is_empty(),
        "the upload was aborted"
    );
    assert!(log.records().unwrap().is_empty(), "its record is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_stall_fails_within_the_read_timeouts() {
    let f = Flaky::new().await;
    f.direct()
        .await
        .put("s/obj", Bytes::from(data(MIB, 5)))
        .await
        .unwrap();
    for fault in [Fault::StallResponse, Fault::StallResponseBody] {
        f.proxy.clear();
        f.proxy.inject(fault, On::GetObject, Times::Always);
        let started = Instant::now();
        let err = f
            .store
            .get_range("s/obj", 0..MIB as u64)
            .await
            .expect_err("a GET that never answers must fail");
        // 3 attempts of 2 s, plus backoff.
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{fault:?}: {:?}",
            started.elapsed()
        );
        let msg = format!("{err:#}");
        assert!(
            msg.contains("s3://mysnap-test/pfx/s/obj"),
            "{fault:?}: {msg}"
        );
    }
    f.proxy.clear();
    f.proxy
        .inject(Fault::StallResponse, On::UploadPart, Times::Always);
    let started = Instant::now();
    let err = stream(&*f.store, "s/up", data(6 * MIB, 6), true)
        .await
        .expect_err("an upload that never gets an answer must fail");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(
        format!("{err:#}").contains("s3://mysnap-test/pfx/s/up"),
        "{err:#}"
    );
    assert!(uploads_on_server(&f.server.root).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_abort_fails_stays_recorded_and_the_next_run_aborts_it() {
    let f = Flaky::new().await;
    let state = tempfile::tempdir().unwrap();
    let log = UploadLog::in_state_dir(state.path());
    // The store answers nothing but 503 once the upload began: its parts and
    // its abort fail.
    f.proxy
        .inject(Fault::SlowDown503, On::UploadPart, Times::Always);
    f.proxy
        .inject(Fault::SlowDown503, On::AbortMultipartUpload, Times::Always);
    stream_logged(&*f.store, "l/data.bin", data(13 * MIB, 7), &log)
        .await
        .expect_err("must fail");
    assert_eq!(
        uploads_on_server(&f.server.root).len(),
        1,
        "an upload is left"
    );
    assert_eq!(log.records().unwrap().len(), 1, "and recorded");

    // The next run, with a working store.
    f.proxy.clear();
    assert_eq!(abort_leftovers(&*f.store, &log).await.unwrap(), 1);
    assert!(uploads_on_server(&f.server.root).is_empty());
    assert!(log.records().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_endpoint_went_away_stays_recorded_and_the_next_run_aborts_it() {
    let mut f = Flaky::new().await;
    let state = tempfile::tempdir().unwrap();
    let log = UploadLog::in_state_dir(state.path());
    f.proxy
        .inject(Fault::StallResponse, On::UploadPart, Times::Always);
    let Flaky {
        server,
        proxy,
        store,
        ..
    } = &mut f;
    let upload = stream_logged(&**store, "gone/data.bin", data(13 * MIB, 8), &log);
    let went_away = async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while uploads_on_server(&server.root).is_empty() || log.records().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the upload never began");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Connections drop, new ones are refused: the abort cannot reach it.
        tokio::task::block_in_place(|| proxy.stop());
    };
    let (result, ()) = tokio::join!(upload, went_away);
    let err = result.expect_err("an upload whose endpoint went away must fail");
    assert!(
        format!("{err:#}").contains("s3://mysnap-test/pfx/gone/data.bin"),
        "{err:#}"
    );
    assert_eq!(
        uploads_on_server(&f.server.root).len(),
        1,
        "the upload is left"
    );
    assert_eq!(log.records().unwrap().len(), 1, "and recorded");

    // The next run reaches the store again.
    let direct = f.direct().await;
    assert_eq!(abort_leftovers(&*direct, &log).await.unwrap(), 1);
    assert!(uploads_on_server(&f.server.root).is_empty());
    assert!(log.records().unwrap().is_empty());
}

/// [`stream`] with the upload recorded in `log`.
async fn stream_logged(
    store: &dyn Store,
    key: &str,
    body: Vec<u8>,
    log: &UploadLog,
) -> anyhow::Result<u64> {
    use std::io::Write;
    let (mut w, mut upload) = store.transfer().upload(body.len() as u64);
    upload.log = Some(log.clone());
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        w.write_all(&body)?;
        w.finish()
    });
    let result = store.put_stream(key, upload).await;
    let _ = writer.join();
    result
}

/// A store without conditional writes (it answers `If-None-Match: *`
/// 501 NotImplemented, as S3 itself did before 2024 and some compatible
/// stores still do): create-only writes, whole and multipart, fall back to
/// a check that the key is absent, so backups still store and an existing
/// key is still refused; the store is asked conditionally only once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_conditional_writes_still_refuses_to_overwrite() {
    let f = Flaky::new().await;
    let not_implemented = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>NotImplemented</Code><Message>A header you provided implies functionality that is not implemented</Message><Header>If-None-Match</Header><RequestId>fault-proxy</RequestId></Error>";
    f.proxy.answer_with(
        On::ConditionalWrite,
        hyper::StatusCode::NOT_IMPLEMENTED,
        not_implemented,
    );
    f.store
        .put_new("new/m", Bytes::from_static(b"first"))
        .await
        .unwrap();
    let e = f
        .store
        .put_new("new/m", Bytes::from_static(b"second"))
        .await
        .expect_err("put_new of an existing key must fail");
    assert!(crate::store::is_exists(&e), "{e:#}");
    let body = data(13 * MIB, 3);
    stream_new(&*f.store, "new/data.bin", body.clone())
        .await
        .unwrap();
    let e = stream_new(&*f.store, "new/data.bin", data(13 * MIB, 4))
        .await
        .expect_err("a multipart create-only write of an existing key must fail");
    assert!(crate::store::is_exists(&e), "{e:#}");
    let direct = f.direct().await;
    assert_eq!(direct.get("new/m", 64).await.unwrap(), &b"first"[..]);
    let got = direct.get("new/data.bin", 14 * MIB as u64).await.unwrap();
    assert_eq!(sha(&got), sha(&body));
    assert!(
        uploads_on_server(&f.server.root).is_empty(),
        "no upload left"
    );
    let conditional = f
        .proxy
        .seen()
        .iter()
        .filter(|r| r.header("if-none-match").is_some())
        .count();
    assert_eq!(
        conditional, 1,
        "asked conditionally once, then checked first"
    );
}
