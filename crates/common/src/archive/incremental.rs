//! Incremental backups (manifest format 4): a backup whose unchanged files
//! are references to the frames of a base's archive instead of being stored
//! again.
//!
//! [`Planner`] is the write side's hook into the walk
//! ([`super::write::write_tar_with`]): it records every file's mtime
//! nanoseconds and inode (for the next backup to compare), and with a
//! [`Base`] leaves out a file whose path, size, mtime to the nanosecond,
//! inode and mode are the base's (btrfs and LVM snapshots keep inode
//! numbers), unless the base's mtime is within [`RACY_WINDOW`] of the
//! base's snapshot time or after it: a write in the same clock tick right
//! after that snapshot could have left size and mtime unchanged (git's
//! racy-clean rule). [`Planner::finish`] merges the entries written with
//! the references, in the walk's order, into the index: the frames a
//! reference needs are copied from the base's index with their source (the
//! archive that really holds their bytes: a chain reads at most
//! `backup.full_every` archives), and the manifest's totals describe the
//! whole restored tree.
//!
//! A changed file's chunks that the base holds byte for byte (same path,
//! offset, length and digest; the frame writer compares them,
//! [`super::frames::FrameWriter::reusing`]) are written as zeros and
//! pointed at the base's bytes ([`super::index::Chunk::at`]): a redo log
//! or a large tablespace that changed in a few places is stored only
//! where it changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;

use super::index::{Entry, EntryKind, Index};
use crate::ids::BackupId;

/// A base file whose mtime is this close to the base's snapshot (or after
/// it) is never reused.
pub const RACY_WINDOW: time::Duration = time::Duration::seconds(2);

/// The backup an incremental one refers to: its id, snapshot time, chain
/// position and (checked) index.
#[derive(Debug)]
pub struct Base {
    pub id: BackupId,
    pub snapshot_time: time::OffsetDateTime,
    /// `archive.chain` of the base (0: a full backup).
    pub chain: u32,
    pub index: Index,
}

enum Walked {
    /// A directory or a file written to this archive (a file's mtime
    /// nanoseconds and inode).
    Written(Option<(u32, u64)>),
    /// A file left out: the base's entry.
    Reused(usize),
}

/// What the walk did; see the module.
pub struct Planner<'a> {
    base: Option<&'a Base>,
    /// The base's regular files with content, by path.
    files: HashMap<&'a str, usize>,
    walked: Vec<Walked>,
    /// The header offset of the last reused entry per source of the base
    /// (entries of one source stay in its tar order).
    last: HashMap<Option<u32>, u64>,
    /// Nanoseconds since the epoch before which a base file's mtime is safe.
    safe_before: i128,
    pub reused_files: u64,
    pub reused_bytes: u64,
}

/// The whole tree's totals, for the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub files: u64,
    pub bytes: u64,
}

impl<'a> Planner<'a> {
    pub fn new(base: Option<&'a Base>) -> Planner<'a> {
        let files = base.map_or_else(HashMap::new, |b| {
            b.index
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.kind == EntryKind::File && e.size > 0)
                .map(|(i, e)| (e.path.as_str(), i))
                .collect()
        });
        let safe_before = base.map_or(0, |b| {
            (b.snapshot_time - RACY_WINDOW).unix_timestamp_nanos()
        });
        Planner {
            base,
            files,
            walked: Vec::new(),
            last: HashMap::new(),
            safe_before,
            reused_files: 0,
            reused_bytes: 0,
        }
    }

    /// The hook of [`super::write::write_tar_with`]: `false` for a file
    /// the base holds unchanged.
    pub fn keep(&mut self, name: &str, md: &std::fs::Metadata) -> bool {
        if !md.is_file() {
            self.walked.push(Walked::Written(None));
            return true;
        }
        let ns = md.mtime_nsec().clamp(0, 999_999_999) as u32;
        if let Some(i) = self.reusable(name, md, ns) {
            let e = &self.base.expect("a base").index.entries[i];
            self.last.insert(e.source, e.header);
            self.reused_files += 1;
            self.reused_bytes += e.size;
            self.walked.push(Walked::Reused(i));
            return false;
        }
        self.walked.push(Walked::Written(Some((ns, md.ino()))));
        true
    }

    fn reusable(&self, name: &str, md: &std::fs::Metadata, ns: u32) -> Option<usize> {
        let base = self.base?;
        let i = *self.files.get(name)?;
        let e = &base.index.entries[i];
        let base_mtime = (e.mtime as i128) * 1_000_000_000 + e.mtime_ns? as i128;
        let same = e.size == md.len()
            && md.mtime() >= 0
            && e.mtime == md.mtime() as u64
            && e.mtime_ns == Some(ns)
            && e.ino == Some(md.ino())
            && e.mode == md.mode()
            && base_mtime < self.safe_before
            // Entries of one source stay in its tar order.
            && self.last.get(&e.source).is_none_or(|l| e.header > *l);
        same.then_some(i)
    }

    /// The chunks of the base's files, for the frame writer to compare
    /// a changed file's chunks with
    /// ([`super::frames::FrameWriter::reusing`]).
    pub fn base_chunks(&self) -> super::frames::BaseChunks {
        let Some(base) = self.base else {
            return Default::default();
        };
        self.files
            .iter()
            .map(|(path, &i)| {
                let e = &base.index.entries[i];
                let chunks = e.chunks.iter().map(|c| (c.offset, c.len, c.digest.clone()));
                (path.to_string(), chunks.collect())
            })
            .collect()
    }

    /// The index of the archive: `own`, the frame writer's index of what
    /// was written (`reused`: its (entry, chunk) numbers written as zeros,
    /// [`super::frames::FrameWriter::reused_chunks`]), merged with the
    /// references in the walk's order; and the whole tree's totals
    /// (`written`: files and bytes in the stream).
    pub fn finish(
        mut self,
        mut own: Index,
        reused: &[(usize, usize)],
        written: Totals,
    ) -> std::io::Result<(Index, Totals)> {
        let bad = |why: String| std::io::Error::other(format!("merging the index: {why}"));
        // Each reused chunk: the base's chunk it refers to (entry, chunk).
        let mut pieces = Vec::with_capacity(reused.len());
        if let Some(base) = self.base {
            // One index holds digests of one hash.
            if base.index.version != own.version {
                return Err(bad(format!(
                    "the base's index is of version {}, this one of {}",
                    base.index.version, own.version
                )));
            }
            for &(e, c) in reused {
                let entry = own
                    .entries
                    .get(e)
                    .ok_or_else(|| bad(format!("no entry {e}")))?;
                let chunk = &entry.chunks[c];
                let i = *self
                    .files
                    .get(entry.path.as_str())
                    .ok_or_else(|| bad(format!("{} is not in the base", entry.path)))?;
                let j = base.index.entries[i]
                    .chunks
                    .iter()
                    .position(|b| {
                        b.offset == chunk.offset && b.len == chunk.len && b.digest == chunk.digest
                    })
                    .ok_or_else(|| bad(format!("{}: no such chunk in the base", entry.path)))?;
                self.reused_bytes += chunk.len;
                pieces.push((e, c, i, j));
            }
        }
        let mut out = Index {
            version: own.version,
            sources: Vec::new(),
            frames: std::mem::take(&mut own.frames),
            entries: Vec::with_capacity(self.walked.len()),
        };
        let Some(base) = self
            .base
            .filter(|_| self.reused_files > 0 || !pieces.is_empty())
        else {
            let mut own_entries = own.entries.into_iter();
            // A full backup: every entry its own, with its mtime and inode.
            for w in self.walked {
                let mut e = own_entries
                    .next()
                    .ok_or_else(|| bad("fewer entries than walked".into()))?;
                if let Walked::Written(Some((ns, ino))) = w {
                    e.mtime_ns = Some(ns);
                    e.ino = Some(ino);
                }
                out.entries.push(e);
            }
            out.entries.extend(own_entries);
            return Ok((out, written));
        };
        // Where each reused entry's bytes are: the base's archive, or its source.
        let source_of = |s: Option<u32>| match s {
            None => base.id.clone(),
            Some(k) => base.index.sources[k as usize].clone(),
        };
        let mut frames: BTreeSet<(BackupId, u64, usize)> = BTreeSet::new();
        for &(_, _, i, j) in &pieces {
            let fr = &base.index.frames[base.index.entries[i].chunks[j].frame as usize];
            let f = base.index.entries[i].chunks[j].frame as usize;
            frames.insert((source_of(fr.source), fr.tar_offset, f));
        }
        for w in &self.walked {
            if let Walked::Reused(i) = w {
                let e = &base.index.entries[*i];
                let header = base
                    .index
                    .frame_at(e.source, e.header)
                    .ok_or_else(|| bad(format!("no frame holds {}'s header", e.path)))?;
                for f in std::iter::once(header).chain(e.chunks.iter().map(|c| c.frame as usize)) {
                    let fr = &base.index.frames[f];
                    frames.insert((source_of(fr.source), fr.tar_offset, f));
                }
            }
        }
        let sources: Vec<BackupId> = frames
            .iter()
            .map(|(s, _, _)| s.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let source_no: BTreeMap<&BackupId, u32> = sources
            .iter()
            .enumerate()
            .map(|(k, s)| (s, k as u32))
            .collect();
        let mut frame_no: HashMap<usize, u32> = HashMap::new();
        for (s, _, f) in &frames {
            frame_no.insert(*f, out.frames.len() as u32);
            let mut fr = base.index.frames[*f].clone();
            fr.source = Some(source_no[s]);
            out.frames.push(fr);
        }
        for &(e, c, i, j) in &pieces {
            let b = &base.index.entries[i];
            let bc = &b.chunks[j];
            let at = bc.tar_at(b);
            let chunk = &mut own.entries[e].chunks[c];
            chunk.frame = frame_no[&(bc.frame as usize)];
            chunk.at = Some(at);
        }
        let mut own_entries = own.entries.into_iter();
        let mut totals = written;
        for w in self.walked {
            match w {
                Walked::Written(meta) => {
                    let mut e = own_entries
                        .next()
                        .ok_or_else(|| bad("fewer entries than walked".into()))?;
                    if let Some((ns, ino)) = meta {
                        e.mtime_ns = Some(ns);
                        e.ino = Some(ino);
                    }
                    out.entries.push(e);
                }
                Walked::Reused(i) => {
                    let mut e: Entry = base.index.entries[i].clone();
                    e.source = Some(source_no[&source_of(e.source)]);
                    for c in &mut e.chunks {
                        c.frame = frame_no[&(c.frame as usize)];
                    }
                    totals.files += 1;
                    totals.bytes += e.size;
                    out.entries.push(e);
                }
            }
        }
        out.entries.extend(own_entries);
        out.sources = sources;
        Ok((out, totals))
    }
}

#[cfg(test)]
mod tests {
    use super::super::frames::FrameWriter;
    use super::super::index::Index;
    use super::super::parallel::unpack;
    use super::super::read::Target;
    use super::super::write::write_tar_with;
    use super::*;
    use crate::config::Compression;
    use crate::ids::tests::v;
    use crate::manifest::{ArchiveInfo, DataLayout, Sha256Hex};
    use bytes::Bytes;
    use std::path::Path;

    fn layout() -> DataLayout {
        DataLayout {
            volume_root: "/".into(),
            datadir: v("d"),
            paths: vec![v("d")],
            exclude: vec![],
        }
    }

    /// The archive of `root` (incremental on `base`): stored bytes, index, manifest info.
    fn backup(root: &Path, id: &str, base: Option<&Base>) -> (Vec<u8>, Index, ArchiveInfo) {
        let mut p = Planner::new(base);
        let w = FrameWriter::with_target(Vec::new(), 3, 2, 64 << 10).reusing(p.base_chunks());
        let (w, stats) = write_tar_with(
            root,
            &layout(),
            w,
            &crate::progress::Silent,
            &|| false,
            None,
            &mut |n, md| p.keep(n, md),
        )
        .unwrap();
        let reused = w.reused_chunks();
        let (stored, own) = w.finish().unwrap();
        let written = Totals {
            files: stats.files,
            bytes: stats.content_bytes,
        };
        let (index, whole) = p.finish(own, &reused, written).unwrap();
        let info = ArchiveInfo {
            key: format!("db1/{id}/data.tar.zst"),
            size: stored.len() as u64,
            compression: Compression::Zstd,
            level: 3,
            sha256: Sha256Hex::parse(&crate::codec::sha256_hex(&stored)).unwrap(),
            tar_size: stats.tar_size,
            unpacked_size: whole.bytes,
            files: whole.files,
            archive_secs: 0.0,
            encryption: None,
            index: None,
            bases: index.sources.clone(),
            chain: 0,
        };
        index.check("u", &info, &layout().paths).unwrap();
        (stored, index, info)
    }

    /// `index` restored into a new directory: its own frames from `incr`,
    /// its base's from `full`.
    fn restore(index: &Index, full: &[u8], incr: &[u8]) -> tempfile::TempDir {
        let fetch = |s: Option<u32>, r: std::ops::Range<u64>| {
            let from = if s.is_some() { full } else { incr };
            Ok(Bytes::copy_from_slice(
                &from[r.start as usize..r.end as usize],
            ))
        };
        let out = tempfile::tempdir().unwrap();
        let target = Target::Dir {
            root: out.path(),
            owner: None,
        };
        unpack(
            index,
            "u",
            target,
            &fetch,
            3,
            &crate::progress::Silent,
            &|| false,
        )
        .unwrap();
        out
    }

    fn tree(root: &Path) {
        std::fs::create_dir_all(root.join("d/db1")).unwrap();
        for i in 0..20 {
            let body: Vec<u8> = (0..30_000u32).map(|j| ((i * 31 + j) % 251) as u8).collect();
            std::fs::write(root.join(format!("d/db1/t{i}.ibd")), body).unwrap();
        }
        std::fs::write(root.join("d/empty"), b"").unwrap();
    }

    #[test]
    fn unchanged_files_are_references_to_the_base_and_restore_from_both_archives() {
        let src = tempfile::tempdir().unwrap();
        tree(src.path());
        let (full, full_index, _) = backup(src.path(), "20261126T093000Z", None);
        assert!(full_index
            .entries
            .iter()
            .all(|e| e.kind != EntryKind::File || (e.ino.is_some() && e.mtime_ns.is_some())));
        let base = Base {
            id: v("20261126T093000Z"),
            snapshot_time: time::OffsetDateTime::now_utc() + time::Duration::seconds(10),
            chain: 0,
            index: full_index.clone(),
        };
        // One file changed (same size), one new, one removed.
        let t3 = src.path().join("d/db1/t3.ibd");
        let mut body = std::fs::read(&t3).unwrap();
        body[100] ^= 0xff;
        std::fs::write(&t3, &body).unwrap();
        std::fs::write(src.path().join("d/db1/new.ibd"), b"new table").unwrap();
        std::fs::remove_file(src.path().join("d/db1/t7.ibd")).unwrap();
        let (incr, index, info) = backup(src.path(), "20261127T093000Z", Some(&base));
        assert_eq!(index.sources, vec![base.id.clone()]);
        assert!(
            incr.len() * 5 < full.len(),
            "{} vs {}",
            incr.len(),
            full.len()
        );
        assert_eq!(info.files, 21);
        let out = restore(&index, &full, &incr);
        for e in walkdir::WalkDir::new(src.path().join("d")) {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(src.path()).unwrap();
            if e.file_type().is_file() {
                assert_eq!(
                    std::fs::read(out.path().join(rel)).unwrap(),
                    std::fs::read(e.path()).unwrap(),
                    "{rel:?}"
                );
            }
        }
        assert!(!out.path().join("d/db1/t7.ibd").exists());
        // The racy rule: a base taken within 2 s of the files' mtimes reuses nothing.
        let racy = Base {
            snapshot_time: time::OffsetDateTime::now_utc(),
            ..base
        };
        let (_, index, _) = backup(src.path(), "20261128T093000Z", Some(&racy));
        assert!(index.sources.is_empty() && index.entries.iter().all(|e| e.source.is_none()));
    }

    /// A big file (17 chunks of the tests' 64 KiB target) changed in one
    /// place: only that chunk is stored again, the others refer to the
    /// base's bytes, and a restore from both archives is byte-identical.
    #[test]
    fn a_changed_big_file_stores_only_its_changed_chunks() {
        let src = tempfile::tempdir().unwrap();
        tree(src.path());
        let big = src.path().join("d/db1/big.ibd");
        let body: Vec<u8> = (0..(17 * 65536 + 1000) as u64)
            .map(|j| (j.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(&big, &body).unwrap();
        let (full, full_index, _) = backup(src.path(), "20261126T093000Z", None);
        let e = full_index
            .entries
            .iter()
            .find(|e| e.path == "d/db1/big.ibd")
            .unwrap();
        assert!(
            e.chunks.iter().all(|c| c.offset % 65536 == 0),
            "chunks start at multiples of the target: {:?}",
            e.chunks
        );
        let base = Base {
            id: v("20261126T093000Z"),
            snapshot_time: time::OffsetDateTime::now_utc() + time::Duration::seconds(10),
            chain: 0,
            index: full_index.clone(),
        };
        let mut changed = body.clone();
        changed[5 * 65536 + 77] ^= 0x5a;
        std::fs::write(&big, &changed).unwrap();
        let (incr, index, info) = backup(src.path(), "20261127T093000Z", Some(&base));
        let e = index
            .entries
            .iter()
            .find(|e| e.path == "d/db1/big.ibd")
            .unwrap();
        assert_eq!(e.source, None, "the file itself is stored again");
        let elsewhere: Vec<u64> = e
            .chunks
            .iter()
            .filter(|c| c.at.is_some())
            .map(|c| c.offset / 65536)
            .collect();
        assert_eq!(
            elsewhere,
            (0..17).filter(|k| *k != 5).collect::<Vec<u64>>(),
            "every full chunk but the changed one is the base's"
        );
        assert!(
            incr.len() * 4 < full.len(),
            "{} vs {}",
            incr.len(),
            full.len()
        );
        let out = restore(&index, &full, &incr);
        assert!(std::fs::read(out.path().join("d/db1/big.ibd")).unwrap() == changed);
        // A piece pointed at this archive's own frame, or past its base
        // frame's end, is refused.
        let i = index
            .entries
            .iter()
            .position(|e| e.path == "d/db1/big.ibd")
            .unwrap();
        let c = e.chunks.iter().position(|c| c.at.is_some()).unwrap();
        let mut own = index.clone();
        own.entries[i].chunks[c].frame = 0;
        let mut past = index.clone();
        past.entries[i].chunks[c].at = Some(u64::MAX - 10);
        for forged in [own, past] {
            let err = forged
                .check("u", &info, &layout().paths)
                .unwrap_err()
                .to_string();
            assert!(err.contains("inside its frame"), "{err}");
        }
        // Two pieces pointed at the same bytes of a base frame: the check
        // cannot tell, the unpack refuses before writing either twice.
        let mut twice = index.clone();
        let at: Vec<usize> = e
            .chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| c.at.is_some())
            .map(|(k, _)| k)
            .take(2)
            .collect();
        let first = twice.entries[i].chunks[at[0]].clone();
        let second = &mut twice.entries[i].chunks[at[1]];
        (second.frame, second.at) = (first.frame, first.at);
        twice.check("u", &info, &layout().paths).unwrap();
        let fetch = |s: Option<u32>, r: std::ops::Range<u64>| {
            let from = if s.is_some() { &full } else { &incr };
            Ok(Bytes::copy_from_slice(
                &from[r.start as usize..r.end as usize],
            ))
        };
        let err = unpack(
            &twice,
            "u",
            Target::Discard,
            &fetch,
            3,
            &crate::progress::Silent,
            &|| false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("overlap: forged"), "{err}");
    }

    #[test]
    fn forged_references_are_refused_by_the_check() {
        let src = tempfile::tempdir().unwrap();
        tree(src.path());
        let (_, full_index, _) = backup(src.path(), "20261126T093000Z", None);
        let base = Base {
            id: v("20261126T093000Z"),
            snapshot_time: time::OffsetDateTime::now_utc() + time::Duration::seconds(10),
            chain: 0,
            index: full_index,
        };
        std::fs::write(src.path().join("d/db1/new.ibd"), b"new table").unwrap();
        let (_, index, info) = backup(src.path(), "20261127T093000Z", Some(&base));
        type Forge = fn(&mut Index, &mut ArchiveInfo);
        let forgeries: &[(&str, Forge, &str)] = &[
            (
                "source not in manifest",
                |i, _| i.sources[0] = v("20261125T093000Z"),
                "archive.bases",
            ),
            (
                "frame source out of range",
                |i, _| {
                    let f = i
                        .frames
                        .iter_mut()
                        .rev()
                        .find(|f| f.source.is_some())
                        .unwrap();
                    f.source = Some(5);
                },
                "source 5",
            ),
            (
                "entry source out of range",
                |i, _| {
                    let e = i.entries.iter_mut().find(|e| e.source.is_some()).unwrap();
                    e.source = Some(3);
                },
                "source 3",
            ),
            (
                "directory from a base",
                |i, _| i.entries[0].source = Some(0),
                "not a base's file",
            ),
            (
                "chunk in another source's frame",
                |i, _| {
                    let e = i
                        .entries
                        .iter_mut()
                        .find(|e| e.source.is_some() && !e.chunks.is_empty())
                        .unwrap();
                    e.chunks[0].frame = 0;
                },
                "inside its frame",
            ),
            (
                "own frame after a base's",
                |i, _| {
                    let own = i.frames.iter().position(|f| f.source.is_some()).unwrap();
                    let f = i.frames.remove(0);
                    i.frames.insert(own, f);
                },
                "frame",
            ),
            (
                "huge base frame",
                |i, _| {
                    let f = i
                        .frames
                        .iter_mut()
                        .rev()
                        .find(|f| f.source.is_some())
                        .unwrap();
                    f.stored_len = u64::MAX;
                },
                "stored bytes",
            ),
            (
                "base frames out of order",
                |i, _| {
                    let n = i.frames.len();
                    i.frames.swap(n - 1, n - 2);
                },
                "not after",
            ),
        ];
        for (what, forge, says) in forgeries {
            let (mut i, mut inf) = (index.clone(), info.clone());
            forge(&mut i, &mut inf);
            let err = i
                .check("u", &inf, &layout().paths)
                .expect_err(what)
                .to_string();
            assert!(err.to_lowercase().contains(says), "{what}: {err}");
        }
        // An index of format 3 (no new fields) still parses.
        let json = serde_json::to_string(&index).unwrap();
        assert!(json.contains("\"sources\""));
        let (_, old, _) = backup(src.path(), "20261128T093000Z", None);
        let mut plain = serde_json::to_value(&old).unwrap();
        for e in plain["entries"].as_array_mut().unwrap() {
            e.as_object_mut().unwrap().remove("ino");
            e.as_object_mut().unwrap().remove("mtime_ns");
        }
        let back: Index = serde_json::from_value(plain).unwrap();
        assert!(back.sources.is_empty());
    }
}
