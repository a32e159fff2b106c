//! What the S3 store puts on the wire for `store.storage_class`,
//! `store.sse`, `store.sse_kms_key_id` and Object Lock: the fault proxy
//! records every request's headers in front of the real server (s3s-fs,
//! signatures checked), and every write must carry them.

use bytes::Bytes;
use common::config::{KmsKeyId, ObjectLockMode, Sse, StorageClass};
use common::store::open;
use mysnap_tests::faults::{Fault, FaultProxy, On, Times};
use mysnap_tests::{s3_config, S3Server};

use crate::store::{data, sha, stream, stream_new};

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_carries_storage_class_encryption_and_object_lock() {
    let tmp = tempfile::tempdir().unwrap();
    let server = S3Server::with_bucket(&tmp.path().join("s3"));
    let proxy = FaultProxy::start(&server.endpoint);
    let mut cfg = s3_config(&proxy.endpoint);
    // s3s-fs refuses a PutObject in a class other than STANDARD and
    // REDUCED_REDUNDANCY; it ignores the encryption and lock headers.
    cfg.storage_class = Some(StorageClass::try_from("REDUCED_REDUNDANCY".to_string()).unwrap());
    cfg.sse = Some(Sse::try_from("aws:kms".to_string()).unwrap());
    cfg.sse_kms_key_id = Some(KmsKeyId::try_from("alias/mysnap-test".to_string()).unwrap());
    cfg.object_lock_days = Some(30);
    cfg.object_lock_mode = Some(ObjectLockMode::Compliance);
    let store = open(&cfg).await.unwrap();

    let before = time::OffsetDateTime::now_utc();
    let body = data(13 * MIB, 7);
    stream(&*store, "a/data.bin", body.clone(), true)
        .await
        .unwrap();
    stream_new(&*store, "a/new.bin", body[..11 * MIB].to_vec())
        .await
        .unwrap();
    store
        .put("a/small", Bytes::from_static(b"small"))
        .await
        .unwrap();
    store
        .put_new("a/manifest.toml", Bytes::from_static(b"m"))
        .await
        .unwrap();
    let after = time::OffsetDateTime::now_utc();
    let got = store.get("a/data.bin", 1 << 30).await.unwrap();
    assert_eq!(sha(&got), sha(&body));

    let seen = proxy.seen();
    let writes: Vec<_> = seen
        .iter()
        .filter(|r| r.is(&On::PutObject) || r.is(&On::CreateMultipartUpload))
        .collect();
    assert_eq!(writes.len(), 4, "two PutObject, two CreateMultipartUpload");
    let fmt = time::format_description::well_known::Rfc3339;
    for r in &writes {
        let what = r.describe();
        assert_eq!(
            r.header("x-amz-storage-class"),
            Some("REDUCED_REDUNDANCY"),
            "{what}"
        );
        assert_eq!(
            r.header("x-amz-server-side-encryption"),
            Some("aws:kms"),
            "{what}"
        );
        assert_eq!(
            r.header("x-amz-server-side-encryption-aws-kms-key-id"),
            Some("alias/mysnap-test"),
            "{what}"
        );
        assert_eq!(
            r.header("x-amz-object-lock-mode"),
            Some("COMPLIANCE"),
            "{what}"
        );
        let until = r
            .header("x-amz-object-lock-retain-until-date")
            .unwrap_or_else(|| panic!("{what}: no retain-until date"));
        let until = time::OffsetDateTime::parse(until, &fmt).unwrap();
        let days = time::Duration::days(30);
        assert!(
            until >= before + days - time::Duration::seconds(1) && until <= after + days,
            "{what}: retain until {until}"
        );
    }
    // S3 takes a write with a retention only with Content-MD5 or a
    // checksum: every PutObject and UploadPart has the SDK's.
    for r in seen
        .iter()
        .filter(|r| r.is(&On::PutObject) || r.is(&On::UploadPart))
    {
        let checksum = r.headers.iter().any(|(n, _)| {
            n == "content-md5" || n.starts_with("x-amz-checksum-") || n == "x-amz-trailer"
        });
        assert!(checksum, "{}: no checksum: {:?}", r.describe(), r.headers);
    }
    // Reads and parts carry none of the write options.
    for r in seen
        .iter()
        .filter(|r| r.is(&On::GetObject) || r.is(&On::UploadPart))
    {
        assert_eq!(r.header("x-amz-storage-class"), None, "{}", r.describe());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_options_no_such_header_is_sent() {
    let tmp = tempfile::tempdir().unwrap();
    let server = S3Server::with_bucket(&tmp.path().join("s3"));
    let proxy = FaultProxy::start(&server.endpoint);
    let store = open(&s3_config(&proxy.endpoint)).await.unwrap();
    store
        .put("a/small", Bytes::from_static(b"small"))
        .await
        .unwrap();
    let seen = proxy.seen();
    let put = seen.iter().find(|r| r.is(&On::PutObject)).unwrap();
    for h in [
        "x-amz-storage-class",
        "x-amz-server-side-encryption",
        "x-amz-object-lock-mode",
        "x-amz-object-lock-retain-until-date",
    ] {
        assert_eq!(put.header(h), None, "{h}");
    }
}

/// The prune tests' set-up: the S3 server with the tests' bucket, the
/// fault proxy in front of it, and a store opened on each.
struct PruneRig {
    tmp: tempfile::TempDir,
    server: S3Server,
    proxy: FaultProxy,
    /// The store on the server itself, and through the proxy.
    direct: Box<dyn common::store::Store>,
    proxied: Box<dyn common::store::Store>,
}

impl PruneRig {
    async fn new() -> PruneRig {
        let tmp = tempfile::tempdir().unwrap();
        let server = S3Server::with_bucket(&tmp.path().join("s3"));
        let proxy = FaultProxy::start(&server.endpoint);
        let direct = open(&s3_config(&server.endpoint)).await.unwrap();
        let proxied = open(&s3_config(&proxy.endpoint)).await.unwrap();
        PruneRig {
            tmp,
            server,
            proxy,
            direct,
            proxied,
        }
    }

    /// A config for the restorer binary with the store at `endpoint` (the
    /// server's or the proxy's), `[retention] keep_last = 1`, and `extra`
    /// in `[store]`.
    fn config(&self, endpoint: &str, extra: &str) -> std::path::PathBuf {
        let dir = self.tmp.path();
        let config = dir.join("mysnap.toml");
        let keys = toml::to_string(&S3Server::store_keys(endpoint)).unwrap();
        std::fs::write(
            &config,
            format!(
                "[volume]\nbackend = \"btrfs\"\nmountpoint = \"/mnt\"\ndatadir = \"/mnt/mysql\"\n\
                 [store]\nurl = \"{}\"\n{keys}max_attempts = 2\n{extra}\n\
                 [backup]\nname = \"db1\"\nstate_dir = \"{}\"\n[retention]\nkeep_last = 1\n",
                mysnap_tests::TEST_S3_URL,
                dir.join("state").display()
            ),
        )
        .unwrap();
        config
    }

    /// The restorer binary with `config` and `args`.
    fn restorer(&self, config: &std::path::Path, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(mysnap_tests::bin("restorer"));
        cmd.arg("--config")
            .arg(config)
            .args(args)
            .envs(self.server.env());
        cmd
    }

    /// Runs the restorer; panics with its stderr when it fails.
    fn restorer_ok(&self, config: &std::path::Path, args: &[&str]) -> (String, String) {
        let out = self.restorer(config, args).output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(out.status.success(), "restorer {args:?}: {stderr}");
        (stdout, stderr)
    }
}

/// The test server has no ListMultipartUploads (s3s answers
/// NotImplemented): prune says so, names the lifecycle rule, and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_on_a_store_without_list_multipart_uploads_warns_and_goes_on() {
    let rig = PruneRig::new().await;
    assert_eq!(rig.direct.list_uploads("db1/").await.unwrap(), None);
    let config = rig.config(&rig.server.endpoint, "");
    let (_, stderr) = rig.restorer_ok(&config, &["prune", "--apply"]);
    assert!(
        stderr.contains("this store cannot list multipart uploads")
            && stderr.contains("AbortIncompleteMultipartUpload"),
        "{stderr}"
    );
}

impl PruneRig {
    /// Leaves an incomplete upload of `key` on the server, as a killed run
    /// does (the abort after the failed stream fails too); returns its id.
    async fn leave_upload(&self, key: &str, seed: u64) -> String {
        let before = crate::store::uploads_on_server(&self.server.root).len();
        self.proxy.inject(
            Fault::InternalError500,
            On::AbortMultipartUpload,
            Times::Always,
        );
        assert!(stream(&*self.proxied, key, data(11 * MIB, seed), false)
            .await
            .is_err());
        self.proxy.clear();
        assert_eq!(
            crate::store::uploads_on_server(&self.server.root).len(),
            before + 1
        );
        self.proxy
            .seen()
            .iter()
            .filter(|r| r.is(&On::AbortMultipartUpload) && r.describe().contains(key))
            .find_map(|r| {
                r.describe()
                    .split(['?', '&'])
                    .find_map(|p| p.strip_prefix("uploadId=").map(str::to_string))
            })
            .expect("an AbortMultipartUpload with its uploadId")
    }

    /// The proxy answers ListMultipartUploads (which the server lacks)
    /// with `uploads`: (key, upload id, initiated).
    fn list_uploads_as(&self, uploads: &[(&str, &str, &str)]) {
        let listed: String = uploads
            .iter()
            .map(|(key, id, initiated)| {
                format!("<Upload><Key>pfx/{key}</Key><UploadId>{id}</UploadId><Initiated>{initiated}</Initiated><StorageClass>STANDARD</StorageClass></Upload>")
            })
            .collect();
        self.proxy.answer(
            On::ListMultipartUploads,
            &format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListMultipartUploadsResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Bucket>mysnap-test</Bucket><Prefix>pfx/db1/</Prefix><MaxUploads>1000</MaxUploads><IsTruncated>false</IsTruncated>{listed}</ListMultipartUploadsResult>"
            ),
        );
    }

    /// The upload ids of the AbortMultipartUpload requests seen.
    fn aborts(&self) -> Vec<String> {
        self.proxy
            .seen()
            .iter()
            .filter(|r| r.is(&On::AbortMultipartUpload))
            .map(|r| r.describe())
            .collect()
    }
}

/// A store that lists incomplete uploads (the proxy answers
/// ListMultipartUploads for the server): prune aborts exactly the old
/// upload of an archive key, on the real server, and leaves the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_aborts_old_incomplete_uploads_of_archives_and_only_those() {
    let rig = PruneRig::new().await;
    let key = "db1/20261120T030000Z/data.tar.zst";
    let upload_id = rig.leave_upload(key, 9).await;
    let young = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    rig.list_uploads_as(&[
        (key, &upload_id, "2026-11-20T03:00:05.000Z"),
        // Started just now (a run in progress), not an archive, another name.
        ("db1/20261120T030000Z/data.tar.xz", "young", &young),
        (
            "db1/20261120T030000Z/manifest.toml",
            "m",
            "2026-11-20T03:00:05.000Z",
        ),
        (
            "db10/20261120T030000Z/data.tar.zst",
            "x",
            "2026-11-20T03:00:05.000Z",
        ),
    ]);
    let config = rig.config(&rig.proxy.endpoint, "");
    let (stdout, _) = rig.restorer_ok(&config, &["prune"]);
    assert_eq!(
        stdout,
        format!("abort {key}  an incomplete upload started 2026-11-20T03:00:05Z\n")
    );
    assert_eq!(
        crate::store::uploads_on_server(&rig.server.root).len(),
        1,
        "a dry run"
    );
    let (stdout, _) = rig.restorer_ok(&config, &["prune", "--apply"]);
    assert!(stdout.contains(&format!("aborted {key}")));
    assert!(crate::store::uploads_on_server(&rig.server.root).is_empty());
    let aborts = rig.aborts();
    // The one the failed stream tried (500s, retried) and the prune's.
    let pruned: Vec<_> = aborts.iter().filter(|a| a.contains(&upload_id)).collect();
    assert!(
        !pruned.is_empty() && aborts.iter().all(|a| a.contains(&upload_id)),
        "{aborts:?}"
    );
}

/// `kill -9` of `restorer prune --apply` between two aborts of stale
/// uploads (test hook `prune-upload-aborted`), then a rerun: the rerun
/// finishes (the upload aborted already counts as aborted), every stale
/// upload is gone, and the backup kept is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_killed_while_aborting_uploads_finishes_on_rerun_and_loses_nothing() {
    let rig = PruneRig::new().await;
    let id = "20200103T030000Z";
    rig.direct
        .put(
            &format!("db1/{id}/manifest.toml"),
            Bytes::from(mysnap_tests::synthetic_manifest("db1", id)),
        )
        .await
        .unwrap();
    rig.direct
        .put(
            &format!("db1/{id}/data.tar.zst"),
            Bytes::from_static(b"zstd"),
        )
        .await
        .unwrap();
    let keys = [
        "db1/20261120T030000Z/data.tar.zst",
        "db1/20261121T030000Z/data.tar.zst",
    ];
    let mut ids = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        ids.push(rig.leave_upload(key, 20 + i as u64).await);
    }
    let at = "2026-11-21T03:00:05.000Z";
    rig.list_uploads_as(&[(keys[0], &ids[0], at), (keys[1], &ids[1], at)]);
    let config = rig.config(&rig.proxy.endpoint, "");
    let mut cmd = rig.restorer(&config, &["prune", "--apply"]);
    cmd.env("MYSNAP_TEST_PAUSE_AT", "prune-upload-aborted");
    let (child, _) = mysnap_tests::spawn_until_line(
        &mut cmd,
        "paused at prune-upload-aborted",
        std::time::Duration::from_secs(60),
    );
    mysnap_tests::send_signal(&child, nix::sys::signal::Signal::SIGKILL);
    let mut child = child;
    child.wait().unwrap();
    assert_eq!(
        crate::store::uploads_on_server(&rig.server.root).len(),
        1,
        "killed after the first abort"
    );

    let (stdout, _) = rig.restorer_ok(&config, &["prune", "--apply"]);
    for key in keys {
        assert!(stdout.contains(&format!("aborted {key}")), "{stdout}");
    }
    assert!(crate::store::uploads_on_server(&rig.server.root).is_empty());
    assert_eq!(
        rig.direct.list("db1/").await.unwrap(),
        [
            format!("db1/{id}/data.tar.zst"),
            format!("db1/{id}/manifest.toml")
        ]
    );
    let (stdout, _) = rig.restorer_ok(&config, &["list"]);
    assert!(stdout.contains(id), "{stdout}");
}

/// With Object Lock configured, a delete the store refuses (403
/// AccessDenied: still locked) keeps that backup, whole and listed, and
/// prune goes on; credentials that may not list multipart uploads get a
/// warning naming the permission, not a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_keeps_a_backup_whose_delete_the_store_refuses_under_object_lock() {
    let rig = PruneRig::new().await;
    let ids = ["20200101T030000Z", "20200102T030000Z", "20200103T030000Z"];
    for id in ids {
        let m = mysnap_tests::synthetic_manifest("db1", id);
        rig.direct
            .put(&format!("db1/{id}/manifest.toml"), Bytes::from(m))
            .await
            .unwrap();
        rig.direct
            .put(
                &format!("db1/{id}/data.tar.zst"),
                Bytes::from_static(b"zstd"),
            )
            .await
            .unwrap();
    }
    let denied = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied because object protected by object lock.</Message><RequestId>fault-proxy</RequestId></Error>";
    rig.proxy.answer_with(
        On::DeleteObject("20200101T030000Z/manifest.toml".into()),
        hyper::StatusCode::FORBIDDEN,
        denied,
    );
    rig.proxy.answer_with(
        On::ListMultipartUploads,
        hyper::StatusCode::FORBIDDEN,
        denied,
    );
    // A day's retention: long over for backups of 2020.
    let config = rig.config(&rig.proxy.endpoint, "object_lock_days = 1");
    let (stdout, stderr) = rig.restorer_ok(&config, &["prune", "--apply"]);
    assert_eq!(
        stdout,
        "keep 20200103T030000Z  newest, last 1\n\
         removed 20200102T030000Z\n\
         keep 20200101T030000Z  the store refused the delete: locked (Object Lock)\n"
    );
    assert!(stderr.contains("s3:ListBucketMultipartUploads"), "{stderr}");
    assert_eq!(
        rig.direct.list("db1/").await.unwrap(),
        [
            "db1/20200101T030000Z/data.tar.zst",
            "db1/20200101T030000Z/manifest.toml",
            "db1/20200103T030000Z/data.tar.zst",
            "db1/20200103T030000Z/manifest.toml",
        ]
    );
}
