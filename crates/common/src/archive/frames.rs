//! The write side of an indexed archive: [`FrameWriter`] takes the tar
//! stream [`super::write_tar`] writes, cuts it into frames (at an entry's
//! start once a frame holds [`FRAME_TARGET`] bytes, or inside a file's data
//! when it reaches it), compresses the frames on a few threads (one
//! single-threaded zstd compressor each, at most `workers` frames in
//! flight), writes them in order to the next stage, and builds the
//! [`Index`] as it goes. It reads the tar headers it is given (its own
//! writer's, trusted), so `write_tar` needs no change.
//!
//! The thread that runs `write_tar` only reads, copies and parses: the
//! digest of each chunk, like the compression and the frame's digest, is
//! computed by the frame's compression thread ([`compress`]), and the
//! frame buffers and compressors go back to the writer to be reused
//! ([`Spare`]): no allocation per frame once `workers + 1` exist.
//!
//! A file's chunks start at multiples of the frame target in the file
//! (a frame is cut there), so the same file's chunks line up between two
//! backups. An incremental backup gives the writer its base's chunks
//! ([`FrameWriter::reusing`]): a chunk of at least [`MIN_REUSED_CHUNK`]
//! bytes whose digest equals the base's chunk at the same offset and of
//! the same length is written as zeros (the tar stream stays whole and
//! compresses them to almost nothing) and listed by
//! [`FrameWriter::reused_chunks`], for the index to point at the base's
//! bytes instead ([`super::incremental::Planner::finish`]).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::ops::Range;
use std::thread::JoinHandle;

use super::index::{
    Chunk, Digest, Entry, EntryKind, Frame, Index, PieceHash, FRAME_TARGET, INDEX_VERSION,
};

/// Where the tar parser is.
enum State {
    /// Collecting a header block; `first` is the tar offset of the entry's
    /// first header block (a GNU long name's comes first).
    Header {
        first: Option<u64>,
    },
    /// The data of a GNU long name (`link`: long link name) entry.
    LongName {
        left: u64,
        padding: u64,
        link: bool,
        first: u64,
    },
    /// A file's data: `left` bytes, then `padding`.
    Data {
        left: u64,
        padding: u64,
    },
    Padding {
        left: u64,
    },
    /// The end-of-archive blocks and whatever follows.
    Trailer,
}

/// What a compression thread needs besides the frame's tar bytes, and gives
/// back to the writer for a later frame: the frame's buffer, the buffer of
/// its stored bytes and its compressor.
struct Spare {
    tar: Vec<u8>,
    stored: Vec<u8>,
    zstd: zstd::bulk::Compressor<'static>,
}

/// A compressed frame: its stored bytes (in `spare.stored`), their digest,
/// the digest of each of its chunks, in order.
struct Compressed {
    spare: Spare,
    digest: Digest,
    chunks: Vec<Digest>,
}

/// The chunks of a base's files by path: (offset, length, digest).
pub type BaseChunks = HashMap<String, Vec<(u64, u64, Digest)>>;

/// The smallest chunk an incremental backup refers to in its base instead
/// of storing it (a smaller one would make a restore fetch a base frame
/// for a few bytes); a frame target below it is the smallest.
pub const MIN_REUSED_CHUNK: u64 = 1 << 20;

/// A frame being compressed and the (entry, chunk) numbers of its chunks.
type InFlight = (JoinHandle<io::Result<Compressed>>, Vec<(usize, usize)>);

/// Cuts, compresses and indexes a tar stream; see the module.
pub struct FrameWriter<W: Write> {
    out: W,
    level: i32,
    workers: usize,
    /// Tar bytes after which a frame is cut.
    target: u64,
    /// Tar bytes of the frame being filled.
    buf: Vec<u8>,
    /// Tar bytes taken so far.
    tar: u64,
    stored: u64,
    /// Frames written out.
    emitted: usize,
    in_flight: VecDeque<InFlight>,
    /// Buffers and compressors back from frames written out.
    spares: Vec<Spare>,
    /// The frame's chunks so far: where each lies in `buf`, and its
    /// (entry, chunk) numbers.
    ranges: Vec<Range<usize>>,
    pieces: Vec<(usize, usize)>,
    index: Index,
    state: State,
    block: Vec<u8>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    /// Where the content of the file being read starts in `buf`: its
    /// chunk in this frame.
    chunk: Option<usize>,
    /// Bytes of the current file's data taken so far.
    file_off: u64,
    /// The base's chunks ([`FrameWriter::reusing`]) and those of the
    /// current file's path.
    base: BaseChunks,
    base_file: Option<Vec<(u64, u64, Digest)>>,
    /// (entry, chunk) numbers of the chunks written as zeros.
    reused: Vec<(usize, usize)>,
}

impl<W: Write> FrameWriter<W> {
    /// Writes frames compressed at zstd `level` to `out`, `workers` at a time.
    pub fn new(out: W, level: i32, workers: usize) -> Self {
        Self::with_target(out, level, workers, FRAME_TARGET)
    }

    /// As [`FrameWriter::new`], cutting frames after `target` tar bytes
    /// (a multiple of 512, at most [`FRAME_TARGET`]: a frame holds less
    /// than twice that).
    pub fn with_target(out: W, level: i32, workers: usize, target: u64) -> Self {
        let target = (target.clamp(512, FRAME_TARGET) / 512) * 512;
        FrameWriter {
            out,
            level,
            workers: workers.max(1),
            target,
            buf: Vec::new(),
            tar: 0,
            stored: 0,
            emitted: 0,
            in_flight: VecDeque::new(),
            spares: Vec::new(),
            ranges: Vec::new(),
            pieces: Vec::new(),
            index: Index {
                version: INDEX_VERSION,
                sources: Vec::new(),
                frames: Vec::new(),
                entries: Vec::new(),
            },
            state: State::Header { first: None },
            block: Vec::with_capacity(512),
            long_name: None,
            long_link: None,
            chunk: None,
            file_off: 0,
            base: HashMap::new(),
            base_file: None,
            reused: Vec::new(),
        }
    }

    /// Writes an index of an older `version` (its digests of that
    /// version's hash), for tests that an archive of an older mysnap is
    /// still read.
    pub fn index_version(mut self, version: u32) -> Self {
        assert!(
            PieceHash::of_version(version).is_some(),
            "an index version mysnap reads"
        );
        self.index.version = version;
        self
    }

    /// Compares each chunk with `base`'s chunk of the same path, offset
    /// and length (see the module); `base` holds digests of this writer's
    /// index version.
    pub fn reusing(mut self, base: BaseChunks) -> Self {
        self.base = base;
        self
    }

    /// The smallest chunk compared with the base's.
    fn min_reused(&self) -> u64 {
        MIN_REUSED_CHUNK.min(self.target)
    }

    /// The (entry, chunk) numbers of the chunks written as zeros because
    /// the base holds the same bytes; complete once the tar stream is.
    pub fn reused_chunks(&self) -> Vec<(usize, usize)> {
        self.reused.clone()
    }

    /// Compresses the last frame, writes everything out; returns the next
    /// stage and the index.
    pub fn finish(mut self) -> io::Result<(W, Index)> {
        if !matches!(self.state, State::Trailer | State::Header { first: None })
            || !self.block.is_empty()
        {
            return Err(io::Error::other("the tar stream ended inside an entry"));
        }
        self.cut()?;
        while !self.in_flight.is_empty() {
            self.emit_one()?;
        }
        Ok((self.out, self.index))
    }

    /// Ends the frame being filled: its current file's chunk closed, its
    /// compression started.
    fn cut(&mut self) -> io::Result<()> {
        self.close_chunk();
        if self.buf.is_empty() {
            return Ok(());
        }
        let tar_len = self.buf.len() as u64;
        self.index.frames.push(Frame {
            tar_offset: self.tar - tar_len,
            tar_len,
            stored_offset: 0,
            stored_len: 0,
            digest: unknown_digest(),
            source: None,
        });
        while self.in_flight.len() >= self.workers {
            self.emit_one()?;
        }
        let mut spare = match self.spares.pop() {
            Some(s) => s,
            None => Spare {
                tar: Vec::new(),
                stored: Vec::new(),
                zstd: compressor(self.level)?,
            },
        };
        // The next frame fills the spare's buffer (its capacity kept).
        std::mem::swap(&mut spare.tar, &mut self.buf);
        self.buf.clear();
        self.buf.reserve(self.target as usize + (64 << 10));
        let ranges = std::mem::take(&mut self.ranges);
        let pieces = std::mem::take(&mut self.pieces);
        let hash = self.index.hash();
        self.in_flight.push_back((
            std::thread::spawn(move || compress(spare, ranges, hash)),
            pieces,
        ));
        Ok(())
    }

    /// Waits for the oldest frame and writes it out.
    fn emit_one(&mut self) -> io::Result<()> {
        let Some((h, pieces)) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let done = h
            .join()
            .map_err(|_| io::Error::other("a compression thread panicked"))??;
        for ((e, c), digest) in pieces.into_iter().zip(done.chunks) {
            self.index.entries[e].chunks[c].digest = digest;
        }
        let f = &mut self.index.frames[self.emitted];
        self.emitted += 1;
        f.stored_offset = self.stored;
        f.stored_len = done.spare.stored.len() as u64;
        f.digest = done.digest;
        self.stored += f.stored_len;
        self.out.write_all(&done.spare.stored)?;
        self.spares.push(done.spare);
        Ok(())
    }

    /// Ends the open file's chunk in this frame; its digest is filled in
    /// when the frame is written out.
    fn close_chunk(&mut self) {
        let Some(start) = self.chunk.take() else {
            return;
        };
        let len = (self.buf.len() - start) as u64;
        if len == 0 {
            return;
        }
        let min = self.min_reused();
        let frame = self.index.frames.len() as u32;
        let hash = self.index.hash();
        let entry = self.index.entries.len() - 1;
        let e = &mut self.index.entries[entry];
        let offset = e.chunks.last().map_or(0, |c| c.offset + c.len);
        let in_base = self.base_file.as_ref().and_then(|b| {
            b.iter()
                .find(|(o, l, _)| *o == offset && *l == len && len >= min)
        });
        let mut digest = unknown_digest();
        if let Some((_, _, base_digest)) = in_base {
            // Hashed here, not on the compression thread: the bytes go
            // out as zeros when the base holds them.
            digest = hash.digest(&self.buf[start..]);
            if digest == *base_digest {
                self.buf[start..].fill(0);
                self.reused.push((entry, e.chunks.len()));
            }
        } else {
            self.ranges.push(start..self.buf.len());
            self.pieces.push((entry, e.chunks.len()));
        }
        e.chunks.push(Chunk {
            frame,
            offset,
            len,
            digest,
            at: None,
        });
    }

    /// Takes up to `n` bytes of `data` into the frame.
    fn take(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        self.tar += data.len() as u64;
    }

    /// A complete header block at `self.tar - 512`.
    fn header(&mut self, first: u64) -> io::Result<()> {
        let block: [u8; 512] = self.block[..].try_into().expect("a block");
        self.block.clear();
        if block.iter().all(|b| *b == 0) {
            self.state = State::Trailer;
            return Ok(());
        }
        let h = tar::Header::from_byte_slice(&block);
        let size = h.entry_size()?;
        let ty = h.entry_type();
        let padding = size.div_ceil(512) * 512 - size;
        if ty.is_gnu_longname() || ty.is_gnu_longlink() {
            self.state = State::LongName {
                left: size,
                padding,
                link: ty.is_gnu_longlink(),
                first,
            };
            return Ok(());
        }
        let kind = match ty {
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink => EntryKind::Symlink,
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
            other => return Err(io::Error::other(format!("unexpected tar entry {other:?}"))),
        };
        let name = self
            .long_name
            .take()
            .unwrap_or_else(|| h.path_bytes().into_owned());
        let link = self
            .long_link
            .take()
            .or_else(|| h.link_name_bytes().map(|l| l.into_owned()));
        let text = |b: Vec<u8>| {
            let mut b = b;
            while b.last() == Some(&0) {
                b.pop();
            }
            String::from_utf8(b).map_err(|_| io::Error::other("a tar name that is not UTF-8"))
        };
        let path = text(name)?.trim_end_matches('/').to_string();
        let link = match (kind, link) {
            (EntryKind::Symlink, Some(l)) => Some(text(l)?),
            _ => None,
        };
        let size = if kind == EntryKind::File { size } else { 0 };
        self.file_off = 0;
        let min = self.min_reused();
        self.base_file = match kind {
            EntryKind::File if size >= min => self.base.get(&path).cloned(),
            _ => None,
        };
        self.index.entries.push(Entry {
            path,
            kind,
            size,
            mode: h.mode().unwrap_or(0o600),
            mtime: h.mtime().unwrap_or(0),
            link,
            header: first,
            data: self.tar,
            chunks: Vec::new(),
            mtime_ns: None,
            ino: None,
            source: None,
        });
        self.state = if size > 0 {
            self.chunk = Some(self.buf.len());
            State::Data {
                left: size,
                padding,
            }
        } else {
            State::Header { first: None }
        };
        Ok(())
    }
}

/// A placeholder until the frame's compression thread has hashed the chunk.
fn unknown_digest() -> Digest {
    Digest::parse(&"0".repeat(64)).expect("64 hex digits")
}

/// A compressor of frames: zstd at `level`, each frame with its checksum.
fn compressor(level: i32) -> io::Result<zstd::bulk::Compressor<'static>> {
    let mut c = zstd::bulk::Compressor::new(level)?;
    c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
    Ok(c)
}

/// One frame (`spare.tar`), compressed alone into `spare.stored`; its
/// digest and the digest of each of its chunks (`chunks`: where they lie
/// in the frame), with `hash`.
fn compress(
    mut spare: Spare,
    chunks: Vec<Range<usize>>,
    hash: PieceHash,
) -> io::Result<Compressed> {
    let chunks = chunks
        .into_iter()
        .map(|r| hash.digest(&spare.tar[r]))
        .collect();
    spare.stored.clear();
    spare
        .stored
        .reserve(zstd::zstd_safe::compress_bound(spare.tar.len()));
    spare
        .zstd
        .compress_to_buffer(&spare.tar, &mut spare.stored)?;
    let digest = hash.digest(&spare.stored);
    Ok(Compressed {
        spare,
        digest,
        chunks,
    })
}

impl<W: Write> Write for FrameWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut rest = data;
        while !rest.is_empty() {
            match self.state {
                State::Header { first } => {
                    let first = match first {
                        Some(f) => f,
                        None => {
                            // An entry starts here: the place to end a full frame.
                            if self.block.is_empty() && self.buf.len() as u64 >= self.target {
                                self.cut()?;
                            }
                            let f = self.tar - self.block.len() as u64;
                            self.state = State::Header { first: Some(f) };
                            f
                        }
                    };
                    let n = rest.len().min(512 - self.block.len());
                    self.block.extend_from_slice(&rest[..n]);
                    self.take(&rest[..n]);
                    rest = &rest[n..];
                    if self.block.len() == 512 {
                        self.header(first)?;
                    }
                }
                State::LongName {
                    left,
                    padding,
                    link,
                    first,
                } => {
                    let n = rest.len().min((left + padding) as usize);
                    let slot = if link {
                        &mut self.long_link
                    } else {
                        &mut self.long_name
                    };
                    let v = slot.get_or_insert_with(Vec::new);
                    let name_bytes = (left as usize).min(n);
                    if v.len() + name_bytes <= super::policy::MAX_PATH + 1 {
                        v.extend_from_slice(&rest[..name_bytes]);
                    } else {
                        return Err(io::Error::other("a tar long name over 4 KiB"));
                    }
                    self.take(&rest[..n]);
                    rest = &rest[n..];
                    let done = n as u64;
                    let (left, padding) = if done >= left {
                        (0, padding - (done - left))
                    } else {
                        (left - done, padding)
                    };
                    self.state = if left == 0 && padding == 0 {
                        State::Header { first: Some(first) }
                    } else {
                        State::LongName {
                            left,
                            padding,
                            link,
                            first,
                        }
                    };
                }
                State::Data { left, padding } => {
                    // Chunks start at multiples of the target in the file.
                    if self.file_off > 0 && self.file_off.is_multiple_of(self.target) {
                        let started = self.chunk.map_or(0, |c| self.buf.len() - c);
                        if started > 0 {
                            self.cut()?;
                            self.chunk = Some(0);
                        }
                    }
                    let room = self.target - self.file_off % self.target;
                    let n = (rest.len() as u64).min(left).min(room) as usize;
                    self.take(&rest[..n]);
                    self.file_off += n as u64;
                    rest = &rest[n..];
                    let left = left - n as u64;
                    self.state = if left > 0 {
                        State::Data { left, padding }
                    } else {
                        self.close_chunk();
                        State::Padding { left: padding }
                    };
                    if left == 0 && padding == 0 {
                        self.state = State::Header { first: None };
                    }
                }
                State::Padding { left } => {
                    let n = (rest.len() as u64).min(left) as usize;
                    self.take(&rest[..n]);
                    rest = &rest[n..];
                    let left = left - n as u64;
                    self.state = if left > 0 {
                        State::Padding { left }
                    } else {
                        State::Header { first: None }
                    };
                }
                State::Trailer => {
                    let n = rest.len();
                    self.take(rest);
                    rest = &rest[n..];
                }
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
