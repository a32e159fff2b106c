//! The write side of an indexed archive: [`FrameWriter`] takes the tar
//! stream [`super::write_tar`] writes, cuts it into frames (at an entry's
//! start once a frame holds [`FRAME_TARGET`] bytes, or inside a file's data
//! when it reaches it), compresses the frames on a few threads (one
//! single-threaded zstd compressor each, at most `workers` frames in
//! flight), writes them in order to the next stage, and builds the
//! [`Index`] as it goes. It reads the tar headers it is given (its own
//! writer's, trusted), so `write_tar` needs no change.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

use super::index::{Chunk, Entry, EntryKind, Frame, Index, FRAME_TARGET, INDEX_VERSION};
use crate::ids::Sha256Hex;

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

type Compressed = io::Result<(Vec<u8>, Sha256Hex)>;

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
    in_flight: VecDeque<JoinHandle<Compressed>>,
    index: Index,
    state: State,
    block: Vec<u8>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    /// The content of the file being read, of its chunk in this frame.
    chunk: Option<(Sha256, u64)>,
}

impl<W: Write> FrameWriter<W> {
    /// Writes frames compressed at zstd `level` to `out`, `workers` at a time.
    pub fn new(out: W, level: i32, workers: usize) -> Self {
        Self::with_target(out, level, workers, FRAME_TARGET)
    }

    /// As [`FrameWriter::new`], cutting frames after `target` tar bytes
    /// (at most [`super::index::MAX_FRAME_TAR`] minus a few headers).
    pub fn with_target(out: W, level: i32, workers: usize, target: u64) -> Self {
        let target = target.clamp(512, FRAME_TARGET * 2);
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
        }
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
        let tar = std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(self.target as usize + (64 << 10)),
        );
        let tar_len = tar.len() as u64;
        self.index.frames.push(Frame {
            tar_offset: self.tar - tar_len,
            tar_len,
            stored_offset: 0,
            stored_len: 0,
            sha256: Sha256Hex::parse(&"0".repeat(64)).expect("a SHA-256"),
            source: None,
        });
        while self.in_flight.len() >= self.workers {
            self.emit_one()?;
        }
        let level = self.level;
        self.in_flight
            .push_back(std::thread::spawn(move || compress(&tar, level)));
        Ok(())
    }

    /// Waits for the oldest frame and writes it out.
    fn emit_one(&mut self) -> io::Result<()> {
        let Some(h) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let (bytes, sha) = h
            .join()
            .map_err(|_| io::Error::other("a compression thread panicked"))??;
        let f = &mut self.index.frames[self.emitted];
        self.emitted += 1;
        f.stored_offset = self.stored;
        f.stored_len = bytes.len() as u64;
        f.sha256 = sha;
        self.stored += f.stored_len;
        self.out.write_all(&bytes)
    }

    fn close_chunk(&mut self) {
        let Some((hasher, len)) = self.chunk.take() else {
            return;
        };
        if len == 0 {
            return;
        }
        let frame = self.index.frames.len() as u32;
        let e = self.index.entries.last_mut().expect("a file is open");
        let offset = e.chunks.last().map_or(0, |c| c.offset + c.len);
        e.chunks.push(Chunk {
            frame,
            offset,
            len,
            sha256: Sha256Hex::parse(&hex::encode(hasher.finalize())).expect("a SHA-256"),
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
            self.chunk = Some((Sha256::new(), 0));
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

/// One frame, compressed alone (with a checksum), and its SHA-256.
fn compress(tar: &[u8], level: i32) -> Compressed {
    let mut c = zstd::bulk::Compressor::new(level)?;
    c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
    let bytes = c.compress(tar)?;
    let sha = crate::codec::sha256_hex(&bytes);
    Ok((bytes, Sha256Hex::parse(&sha).expect("a SHA-256")))
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
                    if self.buf.len() as u64 >= self.target {
                        self.cut()?;
                        self.chunk = Some((Sha256::new(), 0));
                    }
                    let room = self.target.saturating_sub(self.buf.len() as u64).max(1);
                    let n = (rest.len() as u64).min(left).min(room) as usize;
                    if let Some((h, len)) = self.chunk.as_mut() {
                        h.update(&rest[..n]);
                        *len += n as u64;
                    }
                    self.take(&rest[..n]);
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
