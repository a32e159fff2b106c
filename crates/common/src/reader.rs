//! The two `Read` adapters of the data path, in one place:
//! [`ChunkReader`] turns a sequence of byte chunks (parts of a download,
//! blocks from a decoder thread) into a blocking reader without copying
//! them again, and [`ProgressReader`] reports bytes read to a [`Progress`]
//! (and stops on cancellation) and keeps to a [`RateLimit`].

use std::io::{self, Read};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};

use crate::progress::Progress;

/// Where a [`ChunkReader`] takes its chunks from.
pub trait ChunkSource {
    /// The next chunk; `Ok(None)` at the end.
    fn next_chunk(&mut self) -> io::Result<Option<Bytes>>;
}

/// A blocking `Read` over the chunks of a [`ChunkSource`].
pub struct ChunkReader<S> {
    source: S,
    current: Bytes,
}

impl<S: ChunkSource> ChunkReader<S> {
    pub fn new(source: S) -> ChunkReader<S> {
        ChunkReader {
            source,
            current: Bytes::new(),
        }
    }
}

impl<S: ChunkSource> Read for ChunkReader<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.source.next_chunk()? {
                Some(b) => self.current = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

/// Chunks from another thread; the channel closing is the end (a sender
/// that failed says so with an `Err` first).
impl ChunkSource for std::sync::mpsc::Receiver<io::Result<Bytes>> {
    fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        match self.recv() {
            Ok(chunk) => chunk.map(Some),
            Err(_) => Ok(None),
        }
    }
}

/// A limit on bytes per second (`archive.read_rate_limit`,
/// `store.upload_rate_limit`), shared by every thread that moves such
/// bytes: each asks [`RateLimit::reserve`] before it moves its bytes and
/// waits what it is told, so that from the first byte on, at most `rate`
/// bytes per second pass on average (no credit is saved up while idle).
///
/// A few lines rather than a crate: the users are a blocking `Read` and a
/// blocking part writer handing bytes to an async upload, in pieces of any
/// size; rate limiters such as `governor` count cells with a burst that a
/// piece must not exceed, and need a clock and an async wait of their own.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_sec: u64,
    /// When the bytes reserved so far will have passed at the rate.
    next: Mutex<Option<Instant>>,
}

impl RateLimit {
    pub fn new(bytes_per_sec: u64) -> RateLimit {
        RateLimit {
            bytes_per_sec: bytes_per_sec.max(1),
            next: Mutex::new(None),
        }
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    /// Reserves `n` bytes; returns how long to wait before moving them.
    pub fn reserve(&self, n: u64) -> Duration {
        let now = Instant::now();
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let start = next.map_or(now, |t| t.max(now));
        let end = start + Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
        *next = Some(end);
        end - now
    }

    /// Reserves `n` bytes and sleeps until they may be moved.
    pub fn take_blocking(&self, n: u64) {
        let wait = self.reserve(n);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// The largest piece to move at once: about a tenth of a second's worth
    /// (at least 64 KiB), so that waits stay short and smooth.
    pub fn piece(&self) -> usize {
        usize::try_from(self.bytes_per_sec / 10)
            .unwrap_or(usize::MAX)
            .max(64 << 10)
    }
}

/// A reader that reports what it reads to `progress`, fails once
/// `cancelled` says so, and keeps to a [`RateLimit`] when given one.
pub struct ProgressReader<'a, R> {
    inner: R,
    progress: &'a dyn Progress,
    cancelled: &'a (dyn Fn() -> bool + Sync),
    limit: Option<&'a RateLimit>,
}

impl<'a, R: Read> ProgressReader<'a, R> {
    pub fn new(inner: R, progress: &'a dyn Progress) -> Self {
        ProgressReader {
            inner,
            progress,
            cancelled: &|| false,
            limit: None,
        }
    }

    /// Reads keep to `limit` (none: as fast as the source gives).
    pub fn limited_by(mut self, limit: Option<&'a RateLimit>) -> Self {
        self.limit = limit;
        self
    }

    /// Reads fail with "interrupted by a signal" once `cancelled()` is true.
    pub fn cancelled_by(mut self, cancelled: &'a (dyn Fn() -> bool + Sync)) -> Self {
        self.cancelled = cancelled;
        self
    }
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if (self.cancelled)() {
            return Err(io::Error::other("interrupted by a signal"));
        }
        let n = match self.limit {
            None => self.inner.read(buf)?,
            Some(limit) => {
                let len = buf.len().min(limit.piece());
                let n = self.inner.read(&mut buf[..len])?;
                limit.take_blocking(n as u64);
                n
            }
        };
        self.progress.advance(n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Parts(Vec<&'static [u8]>);
    impl ChunkSource for Parts {
        fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
            Ok((!self.0.is_empty()).then(|| Bytes::from_static(self.0.remove(0))))
        }
    }

    #[test]
    fn chunks_read_as_one_stream_and_empty_chunks_are_skipped() {
        let mut r = ChunkReader::new(Parts(vec![b"ab", b"", b"cde", b"f"]));
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "abcdef");
    }

    #[test]
    fn a_failed_sender_is_an_error_and_a_closed_channel_the_end() {
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send(Ok(Bytes::from_static(b"x"))).unwrap();
        tx.send(Err(io::Error::other("boom"))).unwrap();
        drop(tx);
        let mut r = ChunkReader::new(rx);
        let mut b = [0u8; 4];
        assert_eq!(r.read(&mut b).unwrap(), 1);
        assert_eq!(r.read(&mut b).unwrap_err().to_string(), "boom");
        assert_eq!(r.read(&mut b).unwrap(), 0);
    }

    #[test]
    fn a_rate_limited_read_takes_at_least_its_share_of_time() {
        // 3 MiB at 4 MiB/s: at least 0.75 s (a lower bound; a busy machine
        // only makes it slower).
        let limit = RateLimit::new(4 << 20);
        let data = vec![7u8; 3 << 20];
        let start = Instant::now();
        let mut out = Vec::new();
        ProgressReader::new(&data[..], &crate::progress::Silent)
            .limited_by(Some(&limit))
            .read_to_end(&mut out)
            .unwrap();
        let took = start.elapsed();
        assert_eq!(out, data);
        assert!(took >= Duration::from_millis(740), "{took:?}");
        // Shared by two threads, the limit is their sum.
        let limit = RateLimit::new(4 << 20);
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..6 {
                        limit.take_blocking(256 << 10);
                    }
                });
            }
        });
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(740), "two threads: {took:?}");
    }

    #[test]
    fn reserving_without_a_wait_gives_no_credit_for_idle_time() {
        let limit = RateLimit::new(1 << 20);
        assert!(limit.reserve(1 << 20) >= Duration::from_millis(999));
        assert!(limit.reserve(1 << 20) >= Duration::from_millis(1999));
        assert_eq!(limit.piece(), 104857);
        assert_eq!(RateLimit::new(1).piece(), 64 << 10);
    }

    #[test]
    fn progress_counts_and_cancellation_stops() {
        struct Count(std::sync::atomic::AtomicU64);
        impl Progress for Count {
            fn set_total(&self, _: u64) {}
            fn advance(&self, n: u64) {
                self.0.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
            }
            fn finish(&self) {}
        }
        let c = Count(0.into());
        let mut out = Vec::new();
        ProgressReader::new(&b"hello"[..], &c)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(c.0.load(std::sync::atomic::Ordering::SeqCst), 5);
        let err = ProgressReader::new(&b"hello"[..], &c)
            .cancelled_by(&|| true)
            .read_to_end(&mut out)
            .unwrap_err();
        assert!(err.to_string().contains("signal"), "{err}");
    }
}
