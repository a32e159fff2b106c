//! Compression codecs (zstd, xz, none) as writers and readers, and the
//! SHA-256 of the bytes that reach the store.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

use crate::config::Compression;

/// Compression threads for `threads = 0`: all cores.
pub fn threads(configured: u32) -> u32 {
    if configured > 0 {
        configured
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
    }
}

/// A compressing writer; call [`Encoder::finish`] to flush the codec's trailer.
pub enum Encoder<W: Write> {
    Zstd(zstd::Encoder<'static, W>),
    Xz(xz2::write::XzEncoder<W>),
    None(W),
}

impl<W: Write> Encoder<W> {
    pub fn new(inner: W, compression: Compression, level: u32, threads: u32) -> io::Result<Self> {
        Ok(match compression {
            Compression::Zstd => {
                let mut e = zstd::Encoder::new(inner, level as i32)?;
                // A frame checksum catches corruption while decoding, before the SHA-256 at the end.
                e.include_checksum(true)?;
                if threads > 1 {
                    e.multithread(threads)?;
                }
                Encoder::Zstd(e)
            }
            Compression::Xz => {
                let stream = xz2::stream::MtStreamBuilder::new()
                    .preset(level)
                    .threads(threads.max(1))
                    .check(xz2::stream::Check::Crc64)
                    .encoder()
                    .map_err(io::Error::other)?;
                Encoder::Xz(xz2::write::XzEncoder::new_stream(inner, stream))
            }
            Compression::None => Encoder::None(inner),
        })
    }

    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Zstd(e) => e.finish(),
            Encoder::Xz(e) => e.finish(),
            Encoder::None(w) => Ok(w),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Xz(e) => e.write(buf),
            Encoder::None(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Zstd(e) => e.flush(),
            Encoder::Xz(e) => e.flush(),
            Encoder::None(w) => w.flush(),
        }
    }
}

/// The most memory a decoder may use: zstd's window (2^27 = 128 MiB, its
/// default limit; mysnap's levels use at most 8 MiB) and xz's whole decoder
/// (256 MiB; preset 9 needs 65 MiB). A stream asking for more is refused.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 27;
pub const XZ_MEMLIMIT: u64 = 256 << 20;

/// A decompressing reader over the stored bytes, with bounded memory.
pub fn decoder<'a, R: Read + 'a>(
    inner: R,
    compression: Compression,
) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        Compression::Zstd => {
            let mut d = zstd::Decoder::new(inner)?;
            d.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
            Box::new(d)
        }
        Compression::Xz => {
            let stream = xz2::stream::Stream::new_stream_decoder(XZ_MEMLIMIT, 0)
                .map_err(io::Error::other)?;
            Box::new(xz2::read::XzDecoder::new_stream(
                io::BufReader::with_capacity(1 << 20, inner),
                stream,
            ))
        }
        Compression::None => Box::new(inner),
    })
}

/// The lowercase hex SHA-256 of `bytes` (a frame, an index, a chunk).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Counts and hashes what passes through, in either direction.
pub struct Hashing<T> {
    inner: T,
    hasher: Sha256,
    bytes: u64,
}

impl<T> Hashing<T> {
    pub fn new(inner: T) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    /// The inner value, the byte count and the lowercase hex SHA-256.
    pub fn finish(self) -> (T, u64, String) {
        (self.inner, self.bytes, hex::encode(self.hasher.finalize()))
    }
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Counts what passes through a writer or reader.
pub struct Counting<T> {
    pub inner: T,
    pub bytes: u64,
}

impl<T> Counting<T> {
    pub fn new(inner: T) -> Self {
        Counting { inner, bytes: 0 }
    }
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Bytes per buffer a [`Handoff`] passes to its drain.
pub const HANDOFF_CHUNK: usize = 1 << 20;

/// The writing end of a hand-off between two threads of one pipeline: what
/// is written here is written, in order, by another thread
/// ([`HandoffDrain::drain`]) into the next stage. The backup's producer
/// runs tar and the codec on one thread and encryption and the SHA-256 on
/// the other, so those stages overlap instead of adding up. At most
/// `depth` buffers of [`HANDOFF_CHUNK`] are in the channel; buffers come
/// back to the writer to be refilled (no allocation per chunk).
pub struct Handoff {
    full: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    empty: std::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
}

/// The reading end of a [`Handoff`], for the other thread.
pub struct HandoffDrain {
    full: std::sync::mpsc::Receiver<Vec<u8>>,
    empty: std::sync::mpsc::SyncSender<Vec<u8>>,
}

impl Handoff {
    pub fn new(depth: usize) -> (Handoff, HandoffDrain) {
        let (full_tx, full_rx) = std::sync::mpsc::sync_channel(depth);
        let (empty_tx, empty_rx) = std::sync::mpsc::sync_channel(depth + 1);
        (
            Handoff {
                full: Some(full_tx),
                empty: empty_rx,
                buf: Vec::with_capacity(HANDOFF_CHUNK),
            },
            HandoffDrain {
                full: full_rx,
                empty: empty_tx,
            },
        )
    }

    fn send(&mut self) -> io::Result<()> {
        let next = self
            .empty
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(HANDOFF_CHUNK));
        let full = std::mem::replace(&mut self.buf, next);
        let gone = || io::Error::new(io::ErrorKind::BrokenPipe, "the next stage stopped");
        self.full
            .as_ref()
            .ok_or_else(gone)?
            .send(full)
            .map_err(|_| gone())
    }

    /// Hands over what is buffered and closes the channel: the drain ends
    /// once it has written everything. (Dropped without `finish`, the
    /// buffered bytes are lost: the stream is incomplete, as on an error.)
    pub fn finish(mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        self.full = None;
        Ok(())
    }
}

impl Write for Handoff {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(HANDOFF_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == HANDOFF_CHUNK {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl HandoffDrain {
    /// Writes every buffer into `out` until the [`Handoff`] is finished or
    /// dropped. On an error it returns at once: the writer's next hand-over
    /// fails with `BrokenPipe`.
    pub fn drain<W: Write>(self, out: &mut W) -> io::Result<()> {
        for mut buf in self.full.iter() {
            out.write_all(&buf)?;
            buf.clear();
            let _ = self.empty.try_send(buf);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handoff_delivers_every_byte_in_order_and_reuses_its_buffers() {
        let data: Vec<u8> = (0..5 * HANDOFF_CHUNK + 123)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let (mut front, back) = Handoff::new(2);
        let got = std::thread::scope(|s| {
            let t = s.spawn(|| {
                let mut out = Vec::new();
                back.drain(&mut out).unwrap();
                out
            });
            for piece in data.chunks(300_001) {
                front.write_all(piece).unwrap();
            }
            front.finish().unwrap();
            t.join().unwrap()
        });
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes changed or reordered");
    }

    #[test]
    fn a_failed_drain_fails_the_writer_and_a_dropped_writer_ends_the_drain() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (mut front, back) = Handoff::new(1);
        let err = std::thread::scope(|s| {
            let t = s.spawn(|| back.drain(&mut Broken));
            let chunk = vec![0u8; HANDOFF_CHUNK];
            let mut result = Ok(());
            for _ in 0..10 {
                result = front.write_all(&chunk);
                if result.is_err() {
                    break;
                }
            }
            assert_eq!(result.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
            t.join().unwrap().unwrap_err()
        });
        assert!(err.to_string().contains("disk on fire"), "{err}");
        let (front, back) = Handoff::new(1);
        drop(front);
        let mut out = Vec::new();
        back.drain(&mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn every_codec_round_trips_and_hashes_stored_bytes() {
        let data: Vec<u8> = (0..300_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for c in [Compression::Zstd, Compression::Xz, Compression::None] {
            let mut enc = Encoder::new(Hashing::new(Vec::new()), c, 1, 2).unwrap();
            enc.write_all(&data).unwrap();
            let (stored, n, sha) = enc.finish().unwrap().finish();
            assert_eq!(n as usize, stored.len());
            assert_eq!(sha, hex::encode(Sha256::digest(&stored)));
            let mut back = Vec::new();
            decoder(&stored[..], c)
                .unwrap()
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, data, "{c:?}");
        }
    }

    /// A zstd frame that asks for a window larger than the limit is refused
    /// while decoding, before the window is allocated.
    #[test]
    fn a_zstd_frame_asking_for_a_huge_window_is_refused() {
        let mut enc = zstd::Encoder::new(Vec::new(), 1).unwrap();
        enc.set_parameter(zstd::zstd_safe::CParameter::WindowLog(
            ZSTD_WINDOW_LOG_MAX + 1,
        ))
        .unwrap();
        enc.write_all(&[1u8; 4096]).unwrap();
        let stored = enc.finish().unwrap();
        let err = decoder(&stored[..], Compression::Zstd)
            .unwrap()
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("memory"), "{err}");
    }

    /// An xz block whose LZMA2 dictionary (4 GiB) needs more than the
    /// decoder's memory limit is refused before the dictionary is allocated.
    #[test]
    fn an_xz_block_asking_for_a_huge_dictionary_is_refused() {
        let mut enc = xz2::write::XzEncoder::new(Vec::new(), 1);
        enc.write_all(&[1u8; 4096]).unwrap();
        let mut stored = enc.finish().unwrap();
        // Stream header (12 bytes), then the block header: its size, flags
        // (no optional sizes from this encoder), one filter: LZMA2 (0x21)
        // with one property byte, the dictionary size; padding; CRC32.
        let start = 12;
        let len = (usize::from(stored[start]) + 1) * 4;
        assert_eq!(stored[start + 1], 0, "block flags");
        assert_eq!(&stored[start + 2..start + 4], &[0x21, 0x01], "LZMA2 filter");
        stored[start + 4] = 40; // 4 GiB - 1, the largest dictionary
        let crc = crc32fast::hash(&stored[start..start + len - 4]);
        stored[start + len - 4..start + len].copy_from_slice(&crc.to_le_bytes());
        let err = decoder(&stored[..], Compression::Xz)
            .unwrap()
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().to_lowercase().contains("memory"), "{err}");
    }
}
