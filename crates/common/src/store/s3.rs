//! S3 and S3-compatible servers through aws-sdk-s3. Credentials come from
//! aws-config's standard chain (env, profile, instance role); they are never
//! logged. Retries with backoff and jitter (throttling, 5xx, timeouts) are the
//! SDK's standard retry mode.

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
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{Chunk, Store, StoreError, Transfer, Upload};
use crate::config::StoreConfig;

pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    transfer: Transfer,
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
/// sends more than asked is not trusted with memory).
async fn read_body(
    mut body: aws_sdk_s3::primitives::ByteStream,
    url: &str,
    limit: u64,
) -> anyhow::Result<Bytes> {
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = body
        .try_next()
        .await
        .with_context(|| format!("reading {url}"))?
    {
        if (buf.len() + chunk.len()) as u64 > limit {
            return Err(StoreError::TooLarge {
                url: url.to_string(),
                limit,
            }
            .into());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

impl S3Store {
    pub async fn new(cfg: &StoreConfig, bucket: String, prefix: String) -> anyhow::Result<S3Store> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &cfg.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        let sdk = loader.load().await;
        let mut b = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(cfg.force_path_style)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(cfg.max_attempts)
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(20)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .read_timeout(Duration::from_secs(120))
                    .build(),
            );
        if sdk.region().is_none() {
            b = b.region(aws_config::Region::new("us-east-1"));
        }
        if let Some(endpoint) = &cfg.endpoint {
            b = b.endpoint_url(endpoint);
        }
        Ok(S3Store {
            client: Client::from_conf(b.build()),
            bucket,
            prefix,
            transfer: Transfer::from_config(cfg),
        })
    }

    fn key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    async fn multipart(
        &self,
        key: &str,
        first: Bytes,
        parts: &mut mpsc::Receiver<Chunk>,
        concurrency: usize,
    ) -> anyhow::Result<u64> {
        let url = self.url(key);
        let full = self.key(key);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| s3_error("CreateMultipartUpload", &url, e))?;
        let upload_id = created
            .upload_id()
            .context("CreateMultipartUpload returned no upload id")?
            .to_string();
        let result = self
            .upload_parts(&full, &url, &upload_id, first, parts, concurrency)
            .await;
        if result.is_err() {
            // Leave nothing behind: a failed upload must not cost storage or look complete.
            if let Err(e) = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .send()
                .await
            {
                tracing::warn!("{}", s3_error("AbortMultipartUpload", &url, e));
            }
        }
        result
    }

    async fn upload_parts(
        &self,
        full: &str,
        url: &str,
        upload_id: &str,
        first: Bytes,
        parts: &mut mpsc::Receiver<Chunk>,
        concurrency: usize,
    ) -> anyhow::Result<u64> {
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
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(done))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| s3_error("CompleteMultipartUpload", url, e))?;
        Ok(total)
    }
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
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| s3_error("PutObject", &self.url(key), e))?;
        Ok(())
    }

    fn transfer(&self) -> Transfer {
        self.transfer
    }

    async fn put_stream(&self, key: &str, upload: Upload) -> anyhow::Result<u64> {
        let (mut parts, concurrency) = (upload.parts, upload.in_flight);
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
                    self.put(key, first).await.map(|()| 0)
                }
                Some(Chunk::End) => {
                    let n = first.len() as u64;
                    self.put(key, first).await.map(|()| n)
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
        self.multipart(key, first, &mut parts, concurrency.max(1))
            .await
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
        let url = self.url(key);
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .range(format!("bytes={}-{}", range.start, range.end - 1))
            .send()
            .await
            .map_err(|e| s3_error("GetObject", &url, e))?;
        read_body(out.body, &url, range.end - range.start).await
    }

    async fn get(&self, key: &str, limit: u64) -> anyhow::Result<Bytes> {
        let url = self.url(key);
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .send()
            .await
            .map_err(|e| s3_error("GetObject", &url, e))?;
        if out.content_length().is_some_and(|n| n as u64 > limit) {
            return Err(StoreError::TooLarge { url, limit }.into());
        }
        read_body(out.body, &url, limit).await
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
