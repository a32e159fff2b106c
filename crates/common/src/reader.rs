//! The two `Read` adapters of the data path, in one place:
//! [`ChunkReader`] turns a sequence of byte chunks (parts of a download,
//! blocks from a decoder thread) into a blocking reader without copying
//! them again, and [`ProgressReader`] reports bytes read to a [`Progress`]
//! (and stops on cancellation).

use std::io::{self, Read};

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

/// A reader that reports what it reads to `progress`, and fails once
/// `cancelled` says so.
pub struct ProgressReader<'a, R> {
    inner: R,
    progress: &'a dyn Progress,
    cancelled: &'a dyn Fn() -> bool,
}

impl<'a, R: Read> ProgressReader<'a, R> {
    pub fn new(inner: R, progress: &'a dyn Progress) -> Self {
        ProgressReader {
            inner,
            progress,
            cancelled: &|| false,
        }
    }

    /// Reads fail with "interrupted by a signal" once `cancelled()` is true.
    pub fn cancelled_by(mut self, cancelled: &'a dyn Fn() -> bool) -> Self {
        self.cancelled = cancelled;
        self
    }
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if (self.cancelled)() {
            return Err(io::Error::other("interrupted by a signal"));
        }
        let n = self.inner.read(buf)?;
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
