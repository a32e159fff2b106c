//! S3 and S3-compatible servers through aws-sdk-s3. Credentials come from
//! aws-config's standard chain (env, profile, instance role); they are never
//! logged. Retries with backoff and jitter of requests (throttling, 5xx,
//! timeouts, connection errors, bodies of parts included) are the SDK's
//! standard retry mode; a GET whose response *body* breaks (a reset, fewer
//! bytes than its Content-Length, no data for `store.read_timeout`) is
//! retried here ([`S3Store::get_body`]), since the SDK hands the body over
//! before it is read.

use std::ops::Range;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use tokio::task::JoinSet;

use super::{Chunk, PendingUpload, Store, StoreError, Transfer, Upload, UploadRecord};
use crate::config::StoreConfig;

pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    transfer: Transfer,
    /// Attempts of one GET whose body broke (`store.max_attempts`).
    max_attempts: u32,
    /// Longest wait for the next piece of a body (`store.read_timeout`).
    read_timeout: Duration,
    /// What every object written carries (storage class, encryption, lock).
    put_options: PutOptions,
    /// Set once the store answered a conditional write NotImplemented.
    no_conditional: std::sync::atomic::AtomicBool,
}

/// The headers every PutObject and CreateMultipartUpload carries, from
/// `store.storage_class`, `store.sse`, `store.sse_kms_key_id`,
/// `store.object_lock_days` and `store.object_lock_mode`. S3 wants a
/// Content-MD5 or a checksum on writes with a retention: the SDK's default
/// CRC32 checksum of every PutObject and UploadPart is that checksum.
#[derive(Debug, Clone, Default)]
struct PutOptions {
    storage_class: Option<aws_sdk_s3::types::StorageClass>,
    sse: Option<aws_sdk_s3::types::ServerSideEncryption>,
    kms_key_id: Option<String>,
    lock: Option<(aws_sdk_s3::types::ObjectLockMode, u32)>,
}

impl PutOptions {
    fn from_config(cfg: &StoreConfig) -> PutOptions {
        use aws_sdk_s3::types::{ObjectLockMode, ServerSideEncryption, StorageClass};
        PutOptions {
            storage_class: cfg.storage_class.map(|c| StorageClass::from(c.as_str())),
            sse: cfg.sse.map(|e| ServerSideEncryption::from(e.as_str())),
            kms_key_id: cfg.sse_kms_key_id.as_ref().map(|k| k.as_str().to_string()),
            lock: cfg
                .object_lock()
                .map(|(mode, days)| (ObjectLockMode::from(mode.as_str()), days)),
        }
    }

    /// The retention's end for an object written now: `object_lock_days`
    /// from now, in whole seconds.
    fn retain_until(&self) -> Option<aws_sdk_s3::primitives::DateTime> {
        self.lock.as_ref().map(|(_, days)| {
            let until = time::OffsetDateTime::now_utc() + time::Duration::days(i64::from(*days));
            aws_sdk_s3::primitives::DateTime::from_secs(until.unix_timestamp())
        })
    }
}

/// Sets the [`PutOptions`] on a PutObject or CreateMultipartUpload
/// builder (the two have the same setters, but no common trait).
macro_rules! with_put_options {
    ($req:expr, $o:expr) => {{
        let o: &PutOptions = $o;
        $req.set_storage_class(o.storage_class.clone())
            .set_server_side_encryption(o.sse.clone())
            .set_ssekms_key_id(o.kms_key_id.clone())
            .set_object_lock_mode(o.lock.as_ref().map(|(m, _)| m.clone()))
            .set_object_lock_retain_until_date(o.retain_until())
    }};
}

/// Most pages of ListMultipartUploads (1,000 uploads each) one listing reads.
const MAX_UPLOAD_PAGES: usize = 100;

/// First and largest pause between attempts (before jitter).
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(20);

/// The pause before attempt `attempt + 1`: exponential, capped, with full
/// jitter (a random share of it), so clients that failed together do not
/// retry together.
fn backoff(attempt: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let cap = INITIAL_BACKOFF
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    cap.mul_f64((random >> 11) as f64 / (1u64 << 53) as f64)
}

/// Why reading a response body failed: a broken transfer is worth another
/// attempt, a store sending too much is not.
enum BodyError {
    Broken(String),
    Refused(anyhow::Error),
}

/// The typed error of an S3 call: the operation, the object, the server's
/// code and what to do.
fn s3_error<E>(op: &str, url: &str, err: SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    // HEAD requests (HeadBucket, HeadObject) get no body: only the status says why.
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().map(str::to_string).or(match status {
        Some(403) => Some("Forbidden".to_string()),
        Some(404) if op == "HeadBucket" => Some("NoSuchBucket".to_string()),
        _ => None,
    });
    let detail = match (&code, err.message()) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.clone(),
        (None, _) => match status {
            Some(s) => format!("HTTP {s}"),
            None => DisplayErrorContext(&err).to_string(),
        },
    };
    let (op, url) = (op.to_string(), url.to_string());
    match code.as_deref() {
        Some("NoSuchBucket") => StoreError::NotFound {
            op,
            url,
            hint: " (the bucket does not exist: create it or fix store.url)",
        },
        Some("NoSuchKey" | "NotFound") => StoreError::NotFound { op, url, hint: "" },
        Some("AccessDenied") => StoreError::Denied {
            op,
            url,
            detail,
            hint: " (the credentials lack permission for this bucket and prefix)",
        },
        Some("InvalidAccessKeyId") => StoreError::Denied {
            op,
            url,
            detail,
            hint: " (check the AWS credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profile or instance role)",
        },
        Some("SignatureDoesNotMatch") => StoreError::Denied {
            op,
            url,
            detail,
            hint: " (a wrong secret key, or this host's clock is off: check AWS_SECRET_ACCESS_KEY, the profile or instance role, and the time)",
        },
        Some("RequestTimeTooSkewed") => StoreError::Denied {
            op,
            url,
            detail,
            hint: " (this host's clock is too far from the store's: fix the time, e.g. with chrony or systemd-timesyncd)",
        },
        Some("Forbidden") => StoreError::Denied {
            op,
            url,
            detail,
            hint: " (HTTP 403 without a reason: wrong credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profile or instance role), this host's clock off, or no permission for this bucket)",
        },
        Some("PreconditionFailed") => StoreError::Exists { op, url, hint: "" },
        Some("SlowDown" | "ServiceUnavailable" | "InternalError" | "RequestTimeout") => {
            StoreError::Failing { op, url, detail }
        }
        _ if status.is_some_and(|s| s >= 500) => StoreError::Failing { op, url, detail },
        Some("AuthorizationHeaderMalformed") => StoreError::Denied {
            op,
            url,
            detail,
            hint: " (the request was signed for another region: set store.region to the bucket's region)",
        },
        _ if matches!(err, SdkError::DispatchFailure(_) | SdkError::TimeoutError(_)) => {
            StoreError::Unreachable { op, url, detail }
        }
        _ => StoreError::Other { op, url, detail },
    }
}

/// Reads a response body, refusing more than `limit` bytes (a store that
/// sends more than asked is not trusted with memory), waiting at most
/// `timeout` for each piece, and checking it got all of `expected` bytes
/// (the Content-Length) when the store said how many.
async fn read_body(
    mut body: ByteStream,
    url: &str,
    limit: u64,
    expected: Option<u64>,
    timeout: Duration,
) -> Result<Bytes, BodyError> {
    let mut buf = bytes::BytesMut::new();
    loop {
        let chunk = match tokio::time::timeout(timeout, body.try_next()).await {
            Err(_) => {
                return Err(BodyError::Broken(format!(
                    "no data for {timeout:?} after {} bytes (store.read_timeout)",
                    buf.len()
                )))
            }
            Ok(Err(e)) => {
                return Err(BodyError::Broken(format!(
                    "the body broke after {} bytes: {}",
                    buf.len(),
                    DisplayErrorContext(&e)
                )))
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(chunk))) => chunk,
        };
        if (buf.len() + chunk.len()) as u64 > limit {
            return Err(BodyError::Refused(
                StoreError::TooLarge {
                    url: url.to_string(),
                    limit,
                }
                .into(),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    match expected {
        Some(n) if (buf.len() as u64) < n => Err(BodyError::Broken(format!(
            "the body ended after {} of its {n} bytes",
            buf.len()
        ))),
        _ => Ok(buf.freeze()),
    }
}

impl S3Store {
    pub async fn new(cfg: &StoreConfig, bucket: String, prefix: String) -> anyhow::Result<S3Store> {
        // Every request is bounded: connecting, and waiting for its response.
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &cfg.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        let sdk = loader.load().await;
        let mut b = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(cfg.path_style())
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(cfg.max_attempts)
                    .with_initial_backoff(INITIAL_BACKOFF)
                    .with_max_backoff(MAX_BACKOFF),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(cfg.connect_timeout)
                    .read_timeout(cfg.read_timeout)
                    .build(),
            );
        if sdk.region().is_none() {
            b = b.region(aws_config::Region::new("us-east-1"));
        }
        if let Some(endpoint) = &cfg.endpoint {
            b = b.endpoint_url(endpoint);
        }
        if !cfg.sdk_checksums() {
            use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
            b = b
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        }
        Ok(S3Store {
            client: Client::from_conf(b.build()),
            bucket,
            prefix,
            transfer: Transfer::from_config(cfg),
            max_attempts: cfg.max_attempts,
            read_timeout: cfg.read_timeout,
            put_options: PutOptions::from_config(cfg),
            no_conditional: Default::default(),
        })
    }

    /// GETs `key` (bytes `range`, or all of it) and reads the body, at most
    /// `limit` bytes. The request itself is retried by the SDK; a body that
    /// breaks is asked for again, up to `store.max_attempts` times with
    /// backoff and jitter, with a warning for each retry.
    async fn get_body(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        limit: u64,
    ) -> anyhow::Result<Bytes> {
        let url = self.url(key);
        let what = match &range {
            Some(r) => format!("{url} bytes {}-{}", r.start, r.end - 1),
            None => url.clone(),
        };
        let mut attempt = 1;
        loop {
            let out = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(self.key(key))
                .set_range(
                    range
                        .as_ref()
                        .map(|r| format!("bytes={}-{}", r.start, r.end - 1)),
                )
                .send()
                .await
                .map_err(|e| s3_error("GetObject", &url, e))?;
            let expected = out.content_length().and_then(|n| u64::try_from(n).ok());
            if expected.is_some_and(|n| n > limit) {
                return Err(StoreError::TooLarge { url, limit }.into());
            }
            let broken = match read_body(out.body, &url, limit, expected, self.read_timeout).await {
                Ok(b) => return Ok(b),
                Err(BodyError::Refused(e)) => return Err(e),
                Err(BodyError::Broken(why)) => why,
            };
            if attempt >= self.max_attempts {
                anyhow::bail!(StoreError::Unreachable {
                    op: "GetObject".into(),
                    url: what,
                    detail: format!("{broken}, {attempt} attempts (store.max_attempts)"),
                });
            }
            let pause = backoff(attempt);
            tracing::warn!(
                "GetObject {what}: {broken}; retrying in {pause:.1?} (attempt {} of {})",
                attempt + 1,
                self.max_attempts
            );
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    /// One PutObject; `if_absent`: only when `key` does not exist.
    async fn put_object(&self, key: &str, body: Bytes, if_absent: bool) -> anyhow::Result<()> {
        loop {
            let conditional = if_absent && self.conditional_writes();
            if if_absent && !conditional {
                self.refuse_existing("PutObject", &self.key(key), &self.url(key))
                    .await?;
            }
            let req = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(self.key(key))
                .set_if_none_match(conditional.then(|| "*".to_string()))
                .body(ByteStream::from(body.clone()));
            match with_put_options!(req, &self.put_options).send().await {
                Ok(_) => return Ok(()),
                Err(e) if conditional && not_implemented(&e) => {
                    self.no_conditional_writes(&s3_error("PutObject", &self.url(key), e));
                }
                Err(e) => return Err(s3_error("PutObject", &self.url(key), e).into()),
            }
        }
    }

    /// Without conditional writes: `Exists` when object `full` (at `url`)
    /// is there already.
    async fn refuse_existing(&self, op: &str, full: &str, url: &str) -> anyhow::Result<()> {
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await;
        match head {
            Ok(_) => Err(StoreError::Exists {
                op: op.to_string(),
                url: url.to_string(),
                hint: "",
            }
            .into()),
            Err(SdkError::ServiceError(e)) if e.err().is_not_found() => Ok(()),
            Err(e) => Err(s3_error("HeadObject", url, e).into()),
        }
    }

    /// Whether create-only writes still carry `If-None-Match: *`: until the
    /// store answered one NotImplemented.
    fn conditional_writes(&self) -> bool {
        !self
            .no_conditional
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The store does not implement conditional writes: from now on a
    /// create-only write checks that the key is absent (HEAD), then writes.
    /// Another writer between the two is not detected: one warning says so.
    fn no_conditional_writes(&self, e: &dyn std::fmt::Display) {
        use std::sync::atomic::Ordering;
        if !self.no_conditional.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "s3://{} does not implement conditional writes (If-None-Match: *): {e}; create-only writes now check that the key is absent first, which cannot tell two writers of the same key apart: give each host its own backup.name",
                self.bucket
            );
        }
    }

    async fn abort(&self, full: &str, upload_id: &str) -> Result<(), StoreError> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("NoSuchUpload") => Ok(()),
            Err(e) => Err(s3_error(
                "AbortMultipartUpload",
                &format!("s3://{}/{full}", self.bucket),
                e,
            )),
        }
    }

    fn key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    async fn multipart(&self, key: &str, first: Bytes, upload: &mut Upload) -> anyhow::Result<u64> {
        let url = self.url(key);
        let full = self.key(key);
        let req = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full);
        let created = with_put_options!(req, &self.put_options)
            .send()
            .await
            .map_err(|e| s3_error("CreateMultipartUpload", &url, e))?;
        let upload_id = created
            .upload_id()
            .context("CreateMultipartUpload returned no upload id")?
            .to_string();
        // Recorded before the first part: a run killed from now on leaves a
        // record the next run aborts.
        let record = match &upload.log {
            None => None,
            Some(log) => match log.record(&UploadRecord {
                url: url.clone(),
                key: key.to_string(),
                upload_id: upload_id.clone(),
            }) {
                Ok(r) => Some(r),
                Err(e) => {
                    if let Err(a) = self.abort(&full, &upload_id).await {
                        tracing::warn!("{a}");
                    }
                    return Err(e.context(format!("upload to {url} not started")));
                }
            },
        };
        let result = self
            .upload_parts(&full, &url, &upload_id, first, upload)
            .await;
        let finished = match &result {
            Ok(_) => true,
            // Leave nothing behind: a failed upload must not cost storage or look complete.
            Err(_) => match self.abort(&full, &upload_id).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(
                        "{e}; {}",
                        if record.is_some() {
                            "the next archiver run aborts it"
                        } else {
                            "abort it with the store's tools or a lifecycle rule"
                        }
                    );
                    false
                }
            },
        };
        if let (true, Some(r)) = (finished, record) {
            r.remove();
        }
        result
    }

    async fn upload_parts(
        &self,
        full: &str,
        url: &str,
        upload_id: &str,
        first: Bytes,
        upload: &mut Upload,
    ) -> anyhow::Result<u64> {
        let (parts, concurrency) = (&mut upload.parts, upload.in_flight.max(1));
        let mut inflight: JoinSet<anyhow::Result<CompletedPart>> = JoinSet::new();
        let mut done: Vec<CompletedPart> = Vec::new();
        let mut total = 0u64;
        let mut next = Some(first);
        let mut number = 0i32;
        loop {
            let Some(data) = next.take() else {
                match parts.recv().await {
                    Some(Chunk::Data(b)) => next = Some(b),
                    Some(Chunk::End) => break,
                    None => {
                        anyhow::bail!("the archive stream ended before its end; upload aborted")
                    }
                }
                continue;
            };
            while inflight.len() >= concurrency {
                done.push(inflight.join_next().await.expect("set is not empty")??);
            }
            number += 1;
            anyhow::ensure!(
                number as u64 <= super::MAX_PARTS,
                "upload to {url} needs more than 10,000 parts"
            );
            total += data.len() as u64;
            let req = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(data));
            let url = url.to_string();
            inflight.spawn(async move {
                // The part's integrity is covered by the SDK's checksum and
                // our SHA-256 end to end; hashing it again for SigV4 costs
                // a core's worth of SHA-256 on an uncompressed stream.
                let out = req
                    .customize()
                    .disable_payload_signing()
                    .send()
                    .await
                    .map_err(|e| s3_error(&format!("UploadPart {number} of"), &url, e))?;
                Ok(CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag().map(str::to_string))
                    .build())
            });
        }
        while let Some(r) = inflight.join_next().await {
            done.push(r??);
        }
        done.sort_by_key(|p| p.part_number());
        let etag = multipart_etag(&done);
        let completed = loop {
            let conditional = upload.create_only && self.conditional_writes();
            if upload.create_only && !conditional {
                // The caller aborts the upload on this error.
                self.refuse_existing("CompleteMultipartUpload", full, url)
                    .await?;
            }
            let sent = self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(done.clone()))
                        .build(),
                )
                .set_if_none_match(conditional.then(|| "*".to_string()))
                .send()
                .await;
            match sent {
                Err(e) if conditional && not_implemented(&e) => {
                    self.no_conditional_writes(&s3_error("CompleteMultipartUpload", url, e));
                }
                other => break other,
            }
        };
        if let Err(e) = completed {
            // A CompleteMultipartUpload whose answer was lost is retried by
            // the SDK, and the retry refused (the upload is gone, or the
            // object exists): the object carrying this upload's ETag is
            // the proof that it completed.
            let err = s3_error("CompleteMultipartUpload", url, e);
            if etag.is_none() || self.etag(full).await != etag {
                return Err(err.into());
            }
            tracing::warn!("{err}; but {url} is this upload's object: it completed");
            // Had the store refused it after all (an object of the very same
            // bytes existed), the upload must not stay behind; after a
            // completion the store refuses the abort, which is fine.
            if let Err(e) = self.abort(full, upload_id).await {
                tracing::debug!("{e}");
            }
        }
        Ok(total)
    }

    /// The ETag of object `full`, when it exists and the store says.
    async fn etag(&self, full: &str) -> Option<String> {
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .ok()?;
        Some(out.e_tag()?.trim_matches('"').to_string())
    }
}

/// Whether the store answered that it does not implement the call or a
/// header of it (S3's `NotImplemented`, HTTP 501).
fn not_implemented<E: ProvideErrorMetadata>(e: &SdkError<E, HttpResponse>) -> bool {
    e.code() == Some("NotImplemented")
        || e.raw_response().is_some_and(|r| r.status().as_u16() == 501)
}

/// The ETag S3 gives the object of a completed multipart upload: the MD5 of
/// its parts' MD5s (their ETags), then `-<parts>`; `None` when a part's ETag
/// is not an MD5 (some encryption modes).
fn multipart_etag(parts: &[CompletedPart]) -> Option<String> {
    use md5::Digest;
    let mut md5s = Vec::with_capacity(parts.len() * 16);
    for p in parts {
        let one = hex::decode(p.e_tag()?.trim_matches('"')).ok()?;
        if one.len() != 16 {
            return None;
        }
        md5s.extend(one);
    }
    Some(format!(
        "{}-{}",
        hex::encode(md5::Md5::digest(&md5s)),
        parts.len()
    ))
}

#[async_trait]
impl Store for S3Store {
    fn url(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.key(key))
    }

    async fn check(&self) -> anyhow::Result<()> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| {
                let not_found =
                    matches!(&e, SdkError::ServiceError(s) if s.raw().status().as_u16() == 404);
                if not_found {
                    anyhow::anyhow!(
                        "bucket {} does not exist: create it or fix store.url",
                        self.bucket
                    )
                } else {
                    s3_error("HeadBucket", &format!("s3://{}", self.bucket), e).into()
                }
            })?;
        Ok(())
    }

    async fn put(&self, key: &str, body: Bytes) -> anyhow::Result<()> {
        self.put_object(key, body, false).await
    }

    async fn put_new(&self, key: &str, body: Bytes) -> anyhow::Result<()> {
        self.put_object(key, body, true).await
    }

    async fn abort_upload(&self, key: &str, upload_id: &str) -> anyhow::Result<()> {
        Ok(self.abort(&self.key(key), upload_id).await?)
    }

    fn transfer(&self) -> Transfer {
        self.transfer
    }

    async fn put_stream(&self, key: &str, mut upload: Upload) -> anyhow::Result<u64> {
        let create_only = upload.create_only;
        let parts = &mut upload.parts;
        let first = match parts.recv().await {
            Some(Chunk::Data(b)) => b,
            Some(Chunk::End) => Bytes::new(),
            None => anyhow::bail!(
                "the archive stream for {} ended before its end; nothing uploaded",
                self.url(key)
            ),
        };
        // One part and the end: a single PutObject.
        if first.len() < super::MIN_PART as usize {
            return match parts.recv().await {
                Some(Chunk::End) | None if first.is_empty() => {
                    self.put_object(key, first, create_only).await.map(|()| 0)
                }
                Some(Chunk::End) => {
                    let n = first.len() as u64;
                    self.put_object(key, first, create_only).await.map(|()| n)
                }
                Some(Chunk::Data(_)) => anyhow::bail!(
                    "upload to {}: a part smaller than 5 MiB before the last",
                    self.url(key)
                ),
                None => anyhow::bail!(
                    "the archive stream for {} ended before its end; nothing uploaded",
                    self.url(key)
                ),
            };
        }
        self.multipart(key, first, &mut upload).await
    }

    async fn size(&self, key: &str) -> anyhow::Result<Option<u64>> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .send()
            .await
        {
            Ok(out) => Ok(Some(out.content_length().unwrap_or(0) as u64)),
            Err(SdkError::ServiceError(e)) if e.err().is_not_found() => Ok(None),
            Err(e) => Err(s3_error("HeadObject", &self.url(key), e).into()),
        }
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> anyhow::Result<Bytes> {
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        let limit = range.end - range.start;
        self.get_body(key, Some(range), limit).await
    }

    async fn get(&self, key: &str, limit: u64) -> anyhow::Result<Bytes> {
        self.get_body(key, None, limit).await
    }

    async fn list(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let full = self.key(prefix);
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| s3_error("ListObjectsV2", &self.url(prefix), e))?;
            // A key outside the prefix asked for (a broken or hostile
            // server) is ignored.
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .filter(|k| k.starts_with(&full))
                    .filter_map(|k| k.get(strip..))
                    .map(str::to_string),
            );
        }
        keys.sort();
        Ok(keys)
    }

    async fn list_uploads(&self, prefix: &str) -> anyhow::Result<Option<Vec<PendingUpload>>> {
        let full = self.key(prefix);
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker) = (None, None);
        for _ in 0..MAX_UPLOAD_PAGES {
            let page = match self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(&full)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
            {
                Ok(p) => p,
                Err(e) if not_implemented(&e) => return Ok(None),
                Err(e) => return Err(s3_error("ListMultipartUploads", &self.url(prefix), e).into()),
            };
            // An upload outside the prefix asked for (a broken or hostile
            // server) is ignored.
            out.extend(page.uploads().iter().filter_map(|u| {
                let key = u.key().filter(|k| k.starts_with(&full))?;
                Some(PendingUpload {
                    key: key.get(strip..)?.to_string(),
                    upload_id: u.upload_id()?.to_string(),
                    initiated: u
                        .initiated()
                        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.secs()).ok()),
                })
            }));
            if page.is_truncated() != Some(true) {
                return Ok(Some(out));
            }
            key_marker = page.next_key_marker().map(str::to_string);
            id_marker = page.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() && id_marker.is_none() {
                return Ok(Some(out));
            }
        }
        tracing::warn!(
            "{}: more than {MAX_UPLOAD_PAGES} pages of multipart uploads; looked at the first ones only",
            self.url(prefix)
        );
        Ok(Some(out))
    }

    async fn delete(&self, key: &str) -> anyhow::Result<()> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .send()
            .await
            .map_err(|e| s3_error("DeleteObject", &self.url(key), e))?;
        Ok(())
    }
}
