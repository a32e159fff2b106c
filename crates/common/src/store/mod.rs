//! Where archives live: S3 (or an S3-compatible server) or a local/NFS
//! directory, behind one trait. Keys are relative to the store's prefix.

mod download;
mod file;
mod s3;
mod uploads;

use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::config::{StoreConfig, StoreUrl};
use crate::reader::RateLimit;

pub use download::Download;
pub use file::FileStore;
pub use s3::S3Store;
pub use uploads::{abort_leftovers, Recorded, UploadLog, UploadRecord};

/// Why a store operation failed, in the style of object_store's errors:
/// the operation, the object, and what the operator can do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {url}: not found{hint}")]
    NotFound {
        op: String,
        url: String,
        hint: &'static str,
    },
    #[error("{op} {url}: access denied: {detail}{hint}")]
    Denied {
        op: String,
        url: String,
        detail: String,
        hint: &'static str,
    },
    #[error("{op} {url}: the store did not answer: {detail} (check store.endpoint, store.region and the network)")]
    Unreachable {
        op: String,
        url: String,
        detail: String,
    },
    #[error("{op} {url}: the store kept failing: {detail} (each request was tried store.max_attempts times: the store is overloaded or failing; try again later, or raise store.max_attempts)")]
    Failing {
        op: String,
        url: String,
        detail: String,
    },
    #[error("{op} {url}: the object exists already{hint}")]
    Exists {
        op: String,
        url: String,
        hint: &'static str,
    },
    #[error("{url} is larger than the {limit} bytes mysnap reads for it: refused")]
    TooLarge { url: String, limit: u64 },
    #[error("{op} {url}: {detail}")]
    Other {
        op: String,
        url: String,
        detail: String,
    },
}

impl StoreError {
    /// A store that answers with more than it should is not trusted (exit
    /// 4); every other store failure is exit 1.
    pub fn exit_code(&self) -> crate::ExitCode {
        match self {
            StoreError::TooLarge { .. } => crate::ExitCode::Integrity,
            _ => crate::ExitCode::Failure,
        }
    }
}

/// An upload in progress, as [`Store::list_uploads`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpload {
    /// The key being written, relative to the store's prefix.
    pub key: String,
    /// What [`Store::abort_upload`] takes to abort it.
    pub upload_id: String,
    /// When it was started, when the store says.
    pub initiated: Option<time::OffsetDateTime>,
}

/// S3's limit on the number of parts of one upload.
pub const MAX_PARTS: u64 = 10_000;
/// S3's smallest part (all but the last).
pub const MIN_PART: u64 = 5 << 20;
/// S3's largest part.
pub const MAX_PART: u64 = 5 << 30;

/// One message of a streamed upload: a part, or the end of a complete stream.
/// A stream whose sender goes away without [`Chunk::End`] is aborted.
#[derive(Debug)]
pub enum Chunk {
    Data(Bytes),
    End,
}

#[async_trait]
pub trait Store: Send + Sync {
    /// The full address of `key`, for messages (`s3://bucket/prefix/key`).
    fn url(&self, key: &str) -> String;
    /// Fails with a clear message when the store cannot be written (missing bucket,
    /// directory, credentials).
    async fn check(&self) -> anyhow::Result<()>;
    /// Writes a small object in one request.
    async fn put(&self, key: &str, body: Bytes) -> anyhow::Result<()>;
    /// Writes a small object that must not exist yet: when it does,
    /// [`StoreError::Exists`] and the object is left as it was (S3:
    /// `If-None-Match: *`; a directory: `link`, which refuses to replace).
    async fn put_new(&self, key: &str, body: Bytes) -> anyhow::Result<()>;
    /// How this store moves data (fixed when it was opened).
    fn transfer(&self) -> Transfer;
    /// Streams the parts of `upload` (from [`Transfer::upload`]) to `key`
    /// with up to `upload.in_flight` in flight; the object appears only
    /// after [`Chunk::End`]; any failure aborts the upload and leaves no
    /// object. With `upload.log`, the upload is recorded there while it
    /// runs; with `upload.create_only`, an existing `key` is not replaced
    /// ([`StoreError::Exists`]). Returns the bytes written.
    async fn put_stream(&self, key: &str, upload: Upload) -> anyhow::Result<u64>;
    /// Aborts an upload of `key` that a [`UploadRecord`] names (left by a
    /// killed run); one the store no longer knows counts as aborted.
    async fn abort_upload(&self, key: &str, upload_id: &str) -> anyhow::Result<()>;
    /// Size of `key`, or `None` when it does not exist.
    async fn size(&self, key: &str) -> anyhow::Result<Option<u64>>;
    /// Bytes `range` of `key`; a store that sends more is refused.
    async fn get_range(&self, key: &str, range: Range<u64>) -> anyhow::Result<Bytes>;
    /// The whole of a small object, at most `limit` bytes
    /// ([`StoreError::TooLarge`] beyond: nothing larger is held in memory).
    async fn get(&self, key: &str, limit: u64) -> anyhow::Result<Bytes>;
    /// Every key that starts with `prefix`, sorted.
    async fn list(&self, prefix: &str) -> anyhow::Result<Vec<String>>;
    /// The uploads under `prefix` that were started and neither completed
    /// nor aborted (S3: ListMultipartUploads; a directory: the temporary
    /// files of its writes), for [`Store::abort_upload`]; `Ok(None)` when
    /// the store cannot list them. Keys and ids are as the store sent them:
    /// untrusted until the caller checks them.
    async fn list_uploads(&self, prefix: &str) -> anyhow::Result<Option<Vec<PendingUpload>>>;
    async fn delete(&self, key: &str) -> anyhow::Result<()>;
}

/// Opens the store named by the config.
pub async fn open(cfg: &StoreConfig) -> anyhow::Result<Box<dyn Store>> {
    match &cfg.url {
        StoreUrl::S3 { bucket, prefix } => Ok(Box::new(
            S3Store::new(cfg, bucket.clone(), prefix.clone()).await?,
        )),
        StoreUrl::File { root } => Ok(Box::new(FileStore::new(
            root.clone(),
            Transfer::from_config(cfg),
        ))),
    }
}

/// The largest ranged GET of a download (8 MiB: 8 in flight are as fast as
/// 16 MiB ones on the bench machine, and hold half the memory).
pub const DOWNLOAD_RANGE: u64 = 8 << 20;

/// How a store moves data, fixed when it is opened from `store.part_size`,
/// `store.concurrency` and `store.memory_limit`: callers ask it for an
/// upload or a download plan instead of computing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    pub part_size: u64,
    pub concurrency: usize,
    pub memory_limit: u64,
    /// Most bytes per second an upload hands over (`store.upload_rate_limit`).
    pub upload_rate: Option<u64>,
}

/// The receiving end of a streamed upload, with its plan.
#[derive(Debug)]
pub struct Upload {
    pub parts: mpsc::Receiver<Chunk>,
    /// Bytes per part (all but the last).
    pub part_size: u64,
    /// Parts uploaded at once.
    pub in_flight: usize,
    /// Where the upload is recorded while it runs (see [`UploadLog`]).
    pub log: Option<UploadLog>,
    /// Refuse to replace an existing object.
    pub create_only: bool,
}

impl Upload {
    /// Bytes of parts held at most: those in flight, one queued, one being filled.
    pub fn memory(&self) -> u64 {
        self.part_size * (self.in_flight as u64 + 2)
    }
}

impl Transfer {
    pub fn from_config(cfg: &StoreConfig) -> Transfer {
        Transfer {
            part_size: cfg.part_size.as_u64(),
            concurrency: cfg.concurrency,
            memory_limit: cfg.memory_limit.as_u64(),
            upload_rate: cfg.upload_rate_limit.map(|r| r.as_u64()),
        }
    }

    /// An upload of about `expected` bytes: the writer a blocking producer
    /// fills, and the [`Upload`] to hand to [`Store::put_stream`]. Parts are
    /// the configured size, grown so the upload stays within 10,000 parts;
    /// as many in flight as `memory_limit` holds.
    pub fn upload(&self, expected: u64) -> (PartWriter, Upload) {
        let part_size = plan_part_size(self.part_size, expected);
        let (mut writer, parts) = part_channel(part_size);
        writer.limit = self.upload_rate.map(RateLimit::new);
        let in_flight = in_flight(self.memory_limit, part_size, self.concurrency);
        (
            writer,
            Upload {
                parts,
                part_size,
                in_flight,
                log: None,
                create_only: false,
            },
        )
    }

    /// A ranged download: the range size (at most [`DOWNLOAD_RANGE`]) and
    /// the GETs in flight that `memory_limit` holds.
    pub fn download(&self) -> (u64, usize) {
        let range = self.part_size.min(DOWNLOAD_RANGE);
        (range, in_flight(self.memory_limit, range, self.concurrency))
    }

    /// Workers of an indexed read, each holding one frame at a time
    /// (`frame_bytes`: its stored and decompressed bytes together): one per
    /// core, or `concurrency` when more, as many as `memory_limit` holds
    /// (at least one).
    pub fn frame_workers(&self, frame_bytes: u64, cores: usize) -> usize {
        let fit = (self.memory_limit / frame_bytes.max(1)) as usize;
        self.concurrency.max(cores).min(fit).max(1)
    }
}

/// The part size for an upload expected to be about `expected` bytes: the
/// configured size, grown so the upload stays within 10,000 parts.
fn plan_part_size(configured: u64, expected: u64) -> u64 {
    let needed = (expected + expected / 50 + (64 << 20)).div_ceil(MAX_PARTS - 100);
    let mib = 1 << 20;
    configured
        .max(needed.div_ceil(mib) * mib)
        .clamp(MIN_PART, MAX_PART)
}

/// How many parts of `part_size` may be in flight so that, with one part
/// being filled and one queued, at most `memory_limit` bytes of parts are held:
/// between 1 and `concurrency`.
fn in_flight(memory_limit: u64, part_size: u64, concurrency: usize) -> usize {
    let fit = (memory_limit / part_size.max(1)).saturating_sub(2);
    (fit as usize).clamp(1, concurrency.max(1))
}

/// The writing end of a streamed upload: a blocking `Write` that cuts the
/// stream into parts of `part_size` and hands them over without copying,
/// no faster than `store.upload_rate_limit` when set (the parts in flight
/// are at most one part's time ahead of it: the channel holds one).
///
/// Part buffers are recycled: a part handed over returns to the writer's
/// pool when the store drops its last reference, so the stream touches the
/// same few buffers from the second part on. A fresh allocation per part
/// costs the kernel a page fault for every 4 KiB of every part, which was
/// half the CPU time of a `none` backup and made it vary by 2x between runs.
pub struct PartWriter {
    tx: mpsc::Sender<Chunk>,
    buf: Vec<u8>,
    part_size: usize,
    pool: Pool,
    limit: Option<RateLimit>,
}

/// Buffers of parts the store is done with. It holds at most as many as
/// were alive at once (parts in flight, one queued, one being filled).
type Pool = Arc<Mutex<Vec<Vec<u8>>>>;

/// A part's bytes: back into the pool when the last reference goes.
struct PooledPart {
    buf: Vec<u8>,
    pool: Pool,
}

impl AsRef<[u8]> for PooledPart {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PooledPart {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        if let Ok(mut pool) = self.pool.lock() {
            pool.push(buf);
        }
    }
}

/// A part channel: the writer for a blocking producer, the receiver for
/// [`Store::put_stream`]. One part is queued besides those in flight.
fn part_channel(part_size: u64) -> (PartWriter, mpsc::Receiver<Chunk>) {
    let (tx, rx) = mpsc::channel(1);
    let part_size = part_size as usize;
    (
        PartWriter {
            tx,
            buf: Vec::with_capacity(part_size),
            part_size,
            pool: Pool::default(),
            limit: None,
        },
        rx,
    )
}

impl PartWriter {
    fn send(&mut self, chunk: Chunk) -> io::Result<()> {
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }

    /// The filled buffer as a part; a recycled (or new) empty one in its place.
    fn take_part(&mut self) -> Bytes {
        let recycled = self.pool.lock().ok().and_then(|mut pool| pool.pop());
        let next = recycled.unwrap_or_else(|| Vec::with_capacity(self.part_size));
        let buf = std::mem::replace(&mut self.buf, next);
        Bytes::from_owner(PooledPart {
            buf,
            pool: self.pool.clone(),
        })
    }

    /// Sends the last part and marks the stream complete.
    pub fn finish(mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let part = self.take_part();
            self.send(Chunk::Data(part))?;
        }
        self.send(Chunk::End)
    }
}

impl io::Write for PartWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut n = data.len().min(self.part_size - self.buf.len());
        if let Some(limit) = &self.limit {
            n = n.min(limit.piece());
            limit.take_blocking(n as u64);
        }
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.part_size {
            let part = self.take_part();
            self.send(Chunk::Data(part))?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            StoreUrl::parse("s3://my-bucket/a/b/").unwrap(),
            StoreUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            StoreUrl::parse("s3://my-bucket").unwrap(),
            StoreUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            StoreUrl::parse("file:///srv/b").unwrap(),
            StoreUrl::File {
                root: "/srv/b".into()
            }
        );
        assert!(StoreUrl::parse("file://rel").is_err());
        assert!(StoreUrl::parse("s3://A_B").is_err());
        assert!(StoreUrl::parse("/srv").is_err());
    }

    #[test]
    fn part_size_grows_so_5_tb_fits_in_10000_parts() {
        assert_eq!(plan_part_size(64 << 20, 1 << 30), 64 << 20);
        let tb5 = 5u64 << 40;
        let p = plan_part_size(64 << 20, tb5);
        assert!(tb5.div_ceil(p) < MAX_PARTS, "{p}");
        assert_eq!(p % (1 << 20), 0);
        assert_eq!(plan_part_size(1, 0), MIN_PART);
    }

    #[test]
    fn memory_limit_lowers_concurrency() {
        let mib = 1 << 20;
        assert_eq!(in_flight(256 * mib, 16 * mib, 8), 8);
        assert_eq!(in_flight(256 * mib, 64 * mib, 8), 2);
        assert_eq!(in_flight(256 * mib, 600 * mib, 8), 1);
        assert_eq!(in_flight(256 * mib, 5 * mib, 4), 4);
    }

    #[test]
    fn frame_workers_are_every_core_within_the_memory_limit() {
        let mib = 1 << 20;
        let t = |memory_limit, concurrency| Transfer {
            part_size: 16 * mib,
            concurrency,
            memory_limit,
            upload_rate: None,
        };
        assert_eq!(t(512 * mib, 2).frame_workers(24 * mib, 4), 4);
        assert_eq!(t(512 * mib, 8).frame_workers(24 * mib, 2), 8);
        assert_eq!(t(64 * mib, 8).frame_workers(24 * mib, 8), 2);
        assert_eq!(t(16 * mib, 8).frame_workers(24 * mib, 8), 1);
    }

    #[test]
    fn an_upload_rate_limit_holds_the_part_writer_back() {
        // 3 MiB at 4 MiB/s: at least 0.75 s (a lower bound).
        let transfer = Transfer {
            part_size: 5 << 20,
            concurrency: 2,
            memory_limit: 64 << 20,
            upload_rate: Some(4 << 20),
        };
        let (mut w, mut upload) = transfer.upload(3 << 20);
        let start = std::time::Instant::now();
        let t = std::thread::spawn(move || {
            io::Write::write_all(&mut w, &vec![1u8; 3 << 20]).unwrap();
            w.finish().unwrap();
        });
        let mut got = 0;
        while let Some(Chunk::Data(b)) = upload.parts.blocking_recv() {
            got += b.len();
        }
        t.join().unwrap();
        let took = start.elapsed();
        assert_eq!(got, 3 << 20);
        assert!(took >= std::time::Duration::from_millis(740), "{took:?}");
    }

    #[test]
    fn part_writer_cuts_exact_parts_and_ends() {
        let (mut w, mut rx) = part_channel(8);
        let t = std::thread::spawn(move || {
            io::Write::write_all(&mut w, b"0123456789abcdefXYZ").unwrap();
            w.finish().unwrap();
        });
        let mut got = Vec::new();
        while let Some(c) = rx.blocking_recv() {
            got.push(match c {
                Chunk::Data(b) => String::from_utf8(b.to_vec()).unwrap(),
                Chunk::End => "END".into(),
            });
        }
        t.join().unwrap();
        assert_eq!(got, ["01234567", "89abcdef", "XYZ", "END"]);
    }

    #[test]
    fn part_buffers_come_back_to_the_writer_when_the_store_drops_them() {
        let (mut w, mut rx) = part_channel(8);
        io::Write::write_all(&mut w, b"01234567").unwrap();
        let Some(Chunk::Data(first)) = rx.blocking_recv() else {
            panic!("no part")
        };
        let first_ptr = first.as_ptr();
        let held = first.clone();
        drop(first);
        assert!(
            w.pool.lock().unwrap().is_empty(),
            "a part still referenced is not reused"
        );
        drop(held);
        assert_eq!(w.pool.lock().unwrap().len(), 1);
        // The buffer being filled was allocated before; the recycled one is
        // used for the part after it.
        io::Write::write_all(&mut w, b"89abcdefXY").unwrap();
        let Some(Chunk::Data(second)) = rx.blocking_recv() else {
            panic!("no part")
        };
        assert_eq!(&second[..], b"89abcdef");
        drop(second);
        io::Write::write_all(&mut w, b"ZZZZZZ").unwrap();
        let Some(Chunk::Data(third)) = rx.blocking_recv() else {
            panic!("no part")
        };
        assert_eq!(&third[..], b"XYZZZZZZ");
        assert_eq!(
            third.as_ptr(),
            first_ptr,
            "the first part's buffer was not reused"
        );
    }
}
