//! Binary logs: what `archiver binlogs` learns from a closed binary log
//! file ([`scan`], a bounded walk over its event headers) and the metadata
//! it stores after the data ([`SegmentMeta`], `meta.toml` beside
//! `binlog.zst`, keys in [`crate::keys::SegmentId`]).
//!
//! The walk reads only the server's own files, but it is bounded all the
//! same: every event length is checked against the bytes left in the file,
//! and no event body is held in memory beyond the 13 bytes of a GTID event
//! it decodes. (`mysql_common`'s binlog parser knows no MariaDB event
//! types, GTID events among them; the few fields needed here are read by
//! hand.)
//!
//! Metadata read back from the store is untrusted like a manifest: at most
//! [`MAX_META_BYTES`], every string one of the checked [`crate::ids`]
//! types, and stored under its own key ([`SegmentMeta::parse_stored`]).

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

use crate::config::Compression;
use crate::ids::{BackupId, BackupName, BinlogFile, GtidSet, Sha256Hex};
use crate::keys::SegmentId;

/// The format this mysnap writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The largest metadata read (real ones are under 1 KiB).
pub const MAX_META_BYTES: u64 = 16 << 10;
/// The four bytes every binary log file starts with.
pub const MAGIC: [u8; 4] = [0xfe, b'b', b'i', b'n'];
/// An event header (v4): timestamp u32, type u8, server_id u32, length u32,
/// next position u32, flags u16; all little-endian.
pub const HEADER_LEN: u64 = 19;

const FORMAT_DESCRIPTION_EVENT: u8 = 0x0f;
/// MariaDB's GTID event: seq_no u64, domain_id u32, flags u8, ...
const MARIADB_GTID_EVENT: u8 = 0xa2;

/// One MariaDB GTID, `domain-server_id-seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gtid {
    pub domain: u32,
    pub server_id: u32,
    pub seq: u64,
}

impl std::fmt::Display for Gtid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}-{}", self.domain, self.server_id, self.seq)
    }
}

/// What a walk over a binary log's events found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanned {
    /// The Format_description event's timestamp (the file's creation), UTC seconds.
    pub created: u32,
    /// The server id in the Format_description event's header.
    pub server_id: u32,
    /// Bytes walked (the file's size, or the prefix asked for).
    pub size: u64,
    pub events: u64,
    /// The GTID events' first and last GTID, and how many.
    pub first_gtid: Option<Gtid>,
    pub last_gtid: Option<Gtid>,
    pub transactions: u64,
    /// The first and last event's timestamp (UTC seconds).
    pub first_time: u32,
    pub last_time: u32,
    /// The prefix walked ended inside an event (a file being written).
    pub partial: bool,
}

/// Why a file is not a binary log this walk understands.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("does not start with the binary log magic \\xfebin")]
    Magic,
    #[error("its first event is of type {0:#04x}, not Format_description (0x0f): not a binary log of format v4")]
    NoFormatDescription(u8),
    #[error("the event at position {pos} claims {len} bytes, {why}")]
    BadLength { pos: u64, len: u64, why: String },
}

/// The creation time and server id from a binary log's first 23 bytes.
pub fn header_of(head: &[u8]) -> Result<(u32, u32), ScanError> {
    if head.len() < 4 || head[..4] != MAGIC {
        return Err(ScanError::Magic);
    }
    if head.len() < 4 + HEADER_LEN as usize {
        return Err(ScanError::BadLength {
            pos: 4,
            len: 0,
            why: "but the file ends before its header".into(),
        });
    }
    let h = &head[4..4 + HEADER_LEN as usize];
    if h[4] != FORMAT_DESCRIPTION_EVENT {
        return Err(ScanError::NoFormatDescription(h[4]));
    }
    Ok((le32(&h[0..4]), le32(&h[5..9])))
}

/// Walks the events of the first `size` bytes of a binary log read from
/// `r`: each header, the 13 bytes of a GTID event, everything else
/// skipped. With `allow_partial`, a prefix that ends inside an event (the
/// open binary log) is no error (`partial`).
pub fn scan<R: Read>(r: R, size: u64, allow_partial: bool) -> Result<Scanned, ScanError> {
    walk(r, size, allow_partial, false)
}

/// Whether the first `size` bytes of a binary log (the open one, being
/// written) hold a transaction (a GTID event); stops at the first.
pub fn holds_transaction<R: Read>(r: R, size: u64) -> Result<bool, ScanError> {
    Ok(walk(r, size, true, true)?.transactions > 0)
}

fn walk<R: Read>(
    mut r: R,
    size: u64,
    allow_partial: bool,
    stop_at_transaction: bool,
) -> Result<Scanned, ScanError> {
    let mut head = [0u8; 4 + HEADER_LEN as usize];
    if size < head.len() as u64 {
        return Err(ScanError::Magic);
    }
    r.read_exact(&mut head)?;
    let (created, server_id) = header_of(&head)?;
    let mut out = Scanned {
        created,
        server_id,
        size,
        events: 0,
        first_gtid: None,
        last_gtid: None,
        transactions: 0,
        first_time: created,
        last_time: created,
        partial: false,
    };
    let mut pos = 4u64;
    let mut header = [0u8; HEADER_LEN as usize];
    header.copy_from_slice(&head[4..]);
    loop {
        let len = u64::from(le32(&header[9..13]));
        let left = size - pos;
        if len < HEADER_LEN {
            return Err(ScanError::BadLength {
                pos,
                len,
                why: format!("less than the {HEADER_LEN}-byte header"),
            });
        }
        if len > left {
            if allow_partial {
                out.partial = true;
                out.size = pos;
                return Ok(out);
            }
            return Err(ScanError::BadLength {
                pos,
                len,
                why: format!("but only {left} bytes are left in the file"),
            });
        }
        let time = le32(&header[0..4]);
        out.events += 1;
        // The newest, should the clock have stepped back.
        out.last_time = out.last_time.max(time);
        let mut body_left = len - HEADER_LEN;
        if header[4] == MARIADB_GTID_EVENT && body_left >= 12 {
            let mut b = [0u8; 12];
            r.read_exact(&mut b)?;
            body_left -= 12;
            let gtid = Gtid {
                seq: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
                domain: le32(&b[8..12]),
                server_id: le32(&header[5..9]),
            };
            out.first_gtid.get_or_insert(gtid);
            out.last_gtid = Some(gtid);
            out.transactions += 1;
            if stop_at_transaction {
                return Ok(out);
            }
        }
        let skipped = io::copy(&mut (&mut r).take(body_left), &mut io::sink())?;
        if skipped != body_left {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        pos += len;
        if pos == size {
            return Ok(out);
        }
        if size - pos < HEADER_LEN {
            if allow_partial {
                out.partial = true;
                out.size = pos;
                return Ok(out);
            }
            return Err(ScanError::BadLength {
                pos,
                len: size - pos,
                why: "left after the last event: less than a header".into(),
            });
        }
        r.read_exact(&mut header)?;
    }
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

/// A UTC time of whole seconds as a [`BackupId`] (`YYYYMMDDTHHMMSSZ`).
pub fn utc_second(secs: u32) -> BackupId {
    BackupId::from_time(
        time::OffsetDateTime::from_unix_timestamp(i64::from(secs))
            .expect("a u32 of seconds is a valid time"),
    )
}

/// A segment's metadata (`meta.toml`), stored after its data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentMeta {
    pub format_version: u32,
    pub name: BackupName,
    pub server_id: u64,
    pub file: BinlogFile,
    /// The file's creation time (its Format_description event).
    pub created: BackupId,
    /// Bytes of the binary log file.
    pub size: u64,
    /// Bytes stored (`binlog.zst`), and their SHA-256.
    pub stored_size: u64,
    pub sha256: Sha256Hex,
    pub compression: Compression,
    /// The first and last GTID of its transactions; absent when it has none.
    pub first_gtid: Option<GtidSet>,
    pub last_gtid: Option<GtidSet>,
    pub transactions: u64,
    /// The first and last event's time (UTC seconds).
    pub first_event: BackupId,
    pub last_event: BackupId,
    /// Set when the stored bytes are encrypted (`[encryption]`): to whom,
    /// as for a backup's archive. (Older mysnap refuses such metadata.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crate::manifest::Encryption>,
}

/// Metadata that cannot be used: skipped with a warning naming it.
#[derive(Debug, thiserror::Error)]
#[error("binary log metadata {origin} {why}")]
pub struct MetaError {
    pub origin: String,
    pub why: String,
}

impl SegmentMeta {
    /// The metadata of a file walked by [`scan`], stored as `stored_size`
    /// bytes with `sha256`.
    pub fn of(
        name: &BackupName,
        file: &BinlogFile,
        scanned: &Scanned,
        stored_size: u64,
        sha256: Sha256Hex,
    ) -> SegmentMeta {
        let gtid = |g: Option<Gtid>| g.map(|g| GtidSet::parse(&g.to_string()).expect("a GTID"));
        SegmentMeta {
            format_version: FORMAT_VERSION,
            name: name.clone(),
            server_id: u64::from(scanned.server_id),
            file: file.clone(),
            created: utc_second(scanned.created),
            size: scanned.size,
            stored_size,
            sha256,
            compression: Compression::Zstd,
            first_gtid: gtid(scanned.first_gtid),
            last_gtid: gtid(scanned.last_gtid),
            transactions: scanned.transactions,
            first_event: utc_second(scanned.first_time),
            last_event: utc_second(scanned.last_time),
            encryption: None,
        }
    }

    pub fn segment(&self) -> SegmentId {
        SegmentId {
            server_id: self.server_id,
            file: self.file.clone(),
            created: self.created.clone(),
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("segment metadata serializes")
    }

    /// Parses metadata read from the store at `key` (`origin` is its URL):
    /// bounded, every field in its grammar, zstd, and naming the segment
    /// its key names.
    pub fn parse_stored(
        text: &str,
        key: &str,
        origin: &str,
        name: &BackupName,
    ) -> Result<SegmentMeta, MetaError> {
        let err = |why: String| MetaError {
            origin: origin.to_string(),
            why,
        };
        if text.len() as u64 > MAX_META_BYTES {
            return Err(err(format!("is larger than {MAX_META_BYTES} bytes")));
        }
        let m: SegmentMeta = toml::from_str(text)
            .map_err(|e| err(format!("is malformed: {}", e.message().trim_end())))?;
        if m.format_version != FORMAT_VERSION {
            return Err(err(format!(
                "has format version {}, this mysnap reads {FORMAT_VERSION}",
                m.format_version
            )));
        }
        if m.compression != Compression::Zstd {
            return Err(err("names a compression other than zstd".into()));
        }
        if m.name != *name || m.segment().meta_key(name) != key {
            return Err(err(format!(
                "is of {} of server {} created {}, which is not where it is stored: forged or misplaced",
                m.file, m.server_id, m.created
            )));
        }
        Ok(m)
    }
}

/// The number of a binary log file name (`binlog.000042` → 42): the digits
/// after the last '.'.
pub fn file_number(file: &str) -> Option<u64> {
    let (_, n) = file.rsplit_once('.')?;
    if n.is_empty() || n.len() > 18 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// How far a restore replays binary logs after a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every transaction archived (up to the first gap).
    Latest,
    /// Up to this UTC time (events after it are not replayed).
    Time(time::OffsetDateTime),
    /// Up to and including this transaction (MariaDB GTID); later ones of
    /// its domain are not replayed.
    Gtid(Gtid),
}

impl Gtid {
    /// `domain-server_id-seq`, each a decimal number.
    pub fn parse(s: &str) -> Result<Gtid, String> {
        let bad = || format!("{s:?} is not a MariaDB GTID (domain-server_id-seq, e.g. 0-1-42)");
        let mut p = s.split('-');
        let (d, sid, seq) = (p.next(), p.next(), p.next());
        if p.next().is_some() {
            return Err(bad());
        }
        fn number<T: std::str::FromStr>(x: Option<&str>) -> Option<T> {
            x.filter(|x| !x.is_empty() && x.len() <= 20 && x.bytes().all(|b| b.is_ascii_digit()))?
                .parse()
                .ok()
        }
        Ok(Gtid {
            domain: number(d).ok_or_else(bad)?,
            server_id: number(sid).ok_or_else(bad)?,
            seq: number(seq).ok_or_else(bad)?,
        })
    }
}

/// Where a replay to a target stops in one binary log: at the start of
/// the first transaction past it, so no transaction is cut in two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    /// The offset of that transaction's GTID event; `None`: every
    /// transaction of the file is replayed.
    pub at: Option<u64>,
    /// The last transaction replayed from this file (from `from` on) of
    /// each domain, in the order the domains first appear.
    pub last: Vec<Gtid>,
}

impl Stop {
    /// `set` (a GTID position, `d-s-n` per domain, comma-separated) moved
    /// on to the last transaction of each domain in `last`.
    pub fn advance(set: &str, last: &[Gtid]) -> String {
        let mut out: Vec<String> = set
            .split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(|x| match Gtid::parse(x) {
                Ok(g) => match last.iter().find(|l| l.domain == g.domain) {
                    Some(l) => l.to_string(),
                    None => x.to_string(),
                },
                Err(_) => x.to_string(),
            })
            .collect();
        for l in last {
            let present = set
                .split(',')
                .any(|x| Gtid::parse(x.trim()).is_ok_and(|g| g.domain == l.domain));
            if !present {
                out.push(l.to_string());
            }
        }
        out.join(",")
    }
}

/// [`Stop`] of a replay to `target` in the first `size` bytes of a binary
/// log, considering transactions from offset `from` on (the backup's
/// position in its own file, else 4). A transaction is past a time target
/// when its GTID event is stamped after the target's second, past a GTID
/// target when it is a later one of the target's domain; nothing is past
/// [`Target::Latest`].
pub fn stop_in<R: Read>(
    mut r: R,
    size: u64,
    from: u64,
    target: &Target,
) -> Result<Stop, ScanError> {
    let mut head = [0u8; 4 + HEADER_LEN as usize];
    if size < head.len() as u64 {
        return Err(ScanError::Magic);
    }
    r.read_exact(&mut head)?;
    header_of(&head)?;
    let mut pos = 4u64;
    let mut header = [0u8; HEADER_LEN as usize];
    header.copy_from_slice(&head[4..]);
    let mut last: Vec<Gtid> = Vec::new();
    loop {
        let len = u64::from(le32(&header[9..13]));
        if len < HEADER_LEN || len > size - pos {
            return Err(ScanError::BadLength {
                pos,
                len,
                why: "outside the file".into(),
            });
        }
        let mut body_left = len - HEADER_LEN;
        if header[4] == MARIADB_GTID_EVENT && body_left >= 12 {
            let mut b = [0u8; 12];
            r.read_exact(&mut b)?;
            body_left -= 12;
            let gtid = Gtid {
                domain: le32(&b[8..12]),
                server_id: le32(&header[5..9]),
                seq: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
            };
            if pos >= from {
                let past = match target {
                    Target::Latest => false,
                    Target::Time(t) => i64::from(le32(&header[0..4])) > t.unix_timestamp(),
                    Target::Gtid(g) => gtid.domain == g.domain && gtid.seq > g.seq,
                };
                if past {
                    return Ok(Stop {
                        at: Some(pos),
                        last,
                    });
                }
                match last.iter_mut().find(|l| l.domain == gtid.domain) {
                    Some(l) => *l = gtid,
                    None => last.push(gtid),
                }
            }
        }
        let skipped = io::copy(&mut (&mut r).take(body_left), &mut io::sink())?;
        if skipped != body_left {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        pos += len;
        if size - pos < HEADER_LEN {
            return Ok(Stop { at: None, last });
        }
        r.read_exact(&mut header)?;
    }
}

/// Why no chain of segments reaches a target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("the backup's binary log {file} of server {server_id} is not in the archive: no point after the backup can be recovered from it (was `archiver binlogs` running when it was taken?)")]
    NotArchived { server_id: u64, file: String },
    #[error("the binary log archive of server {server_id} has a gap: {from} to {to} are missing (purged before they were shipped); the archive reaches {reaches}; restore to a point before it, or from a backup taken after the gap")]
    Gap {
        server_id: u64,
        from: String,
        to: String,
        reaches: String,
    },
    #[error("the binary log archive of server {server_id} ends at {reaches}, before the target {target}: a restore to the target would silently stop short (is `archiver binlogs` running?)")]
    Short {
        server_id: u64,
        reaches: String,
        target: String,
    },
}

/// The segments a restore replays after a backup of server `server_id`
/// taken at `backup_time` at binary log `file`: that file's segment (the
/// newest created no later than the backup), then each next file number
/// created no earlier than the one before, up to the first whose last event
/// reaches `target`. A missing number before the target is a gap, refused
/// with the range; a target past the archive's end is refused too.
pub fn chain(
    segments: &[SegmentMeta],
    server_id: u64,
    file: &BinlogFile,
    backup_time: time::OffsetDateTime,
    target: &Target,
) -> Result<Vec<SegmentMeta>, ChainError> {
    let (reach, gap) = reach(segments, server_id, file, backup_time)?;
    let mut out = Vec::new();
    for s in reach {
        let last = s.last_event.time();
        out.push(s);
        let reached = match target {
            Target::Latest => false,
            Target::Time(t) => last >= *t,
            Target::Gtid(g) => out
                .last()
                .and_then(|s| s.last_gtid.as_ref())
                .is_some_and(|l| {
                    Gtid::parse(l).is_ok_and(|l| l.domain == g.domain && l.seq >= g.seq)
                }),
        };
        if reached {
            return Ok(out);
        }
    }
    let reaches = out
        .last()
        .map_or_else(String::new, |s| rfc3339(s.last_event.time()));
    match (gap, target) {
        (Some((from, to)), _) => Err(ChainError::Gap {
            server_id,
            from,
            to,
            reaches,
        }),
        (None, Target::Latest) => Ok(out),
        (None, Target::Time(t)) => Err(ChainError::Short {
            server_id,
            reaches,
            target: rfc3339(*t),
        }),
        (None, Target::Gtid(g)) => Err(ChainError::Short {
            server_id,
            reaches,
            target: g.to_string(),
        }),
    }
}

/// The first and last file name of a gap.
type Missing = (String, String);

/// The unbroken run of segments from the backup's file on, and the missing
/// range after it when a later segment of the server exists (a gap).
fn reach(
    segments: &[SegmentMeta],
    server_id: u64,
    file: &BinlogFile,
    backup_time: time::OffsetDateTime,
) -> Result<(Vec<SegmentMeta>, Option<Missing>), ChainError> {
    let mine: Vec<&SegmentMeta> = segments
        .iter()
        .filter(|s| s.server_id == server_id)
        .collect();
    let not_archived = || ChainError::NotArchived {
        server_id,
        file: file.to_string(),
    };
    let first = mine
        .iter()
        .filter(|s| s.file == *file && s.created.time() <= backup_time)
        .max_by_key(|s| s.created.clone())
        .ok_or_else(not_archived)?;
    let stem = |f: &str| {
        f.rsplit_once('.')
            .map_or(f.to_string(), |(s, _)| s.to_string())
    };
    let digits = |f: &str| f.rsplit_once('.').map_or(0, |(_, n)| n.len());
    let mut out = vec![(*first).clone()];
    loop {
        let cur = out.last().expect("one at least");
        let n = file_number(&cur.file).ok_or_else(not_archived)?;
        let later =
            |s: &&&SegmentMeta| stem(&s.file) == stem(&cur.file) && s.created >= cur.created;
        let next = mine
            .iter()
            .filter(later)
            .filter(|s| file_number(&s.file) == Some(n + 1))
            .min_by_key(|s| s.created.clone());
        match next {
            Some(s) => out.push((*s).clone()),
            None => {
                let beyond = mine
                    .iter()
                    .filter(later)
                    .filter_map(|s| file_number(&s.file).filter(|k| *k > n + 1))
                    .min();
                let gap = beyond.map(|k| {
                    let (st, w) = (stem(&cur.file), digits(&cur.file));
                    (format!("{st}.{:0w$}", n + 1), format!("{st}.{:0w$}", k - 1))
                });
                return Ok((out, gap));
            }
        }
    }
}

/// The span a backup can be rolled forward over: from its own time to the
/// last event of the unbroken run of segments from its binary log on;
/// `None` when its binary log is not archived.
pub fn window(
    segments: &[SegmentMeta],
    server_id: u64,
    file: &BinlogFile,
    backup_time: time::OffsetDateTime,
) -> Option<(time::OffsetDateTime, time::OffsetDateTime)> {
    let (run, _) = reach(segments, server_id, file, backup_time).ok()?;
    let end = run.last()?.last_event.time().max(backup_time);
    Some((backup_time, end))
}

/// The segments no kept backup needs, for `restorer prune`: of a server
/// with a kept backup, those created before the segment of the oldest kept
/// backup's binary log file and whose last event is before that backup.
/// Everything else is kept: segments of a server without a kept backup,
/// and all of a server whose oldest kept backup's file is not archived.
/// `kept`: server_id, binary log file and time of each kept backup.
pub fn unneeded(
    segments: &[SegmentMeta],
    kept: &[(u64, BinlogFile, time::OffsetDateTime)],
) -> Vec<SegmentMeta> {
    let firsts = first_needed(segments, kept);
    segments
        .iter()
        .filter(|s| {
            firsts
                .get(&s.server_id)
                .is_some_and(|(first, t)| s.created < first.created && s.last_event.time() < *t)
        })
        .cloned()
        .collect()
}

/// Of `orphans` (segments whose data or MAC is stored without metadata: a
/// prune or an `archiver binlogs` killed between two writes), those no kept
/// backup can need: of a server with a kept backup, created before the
/// segment of the oldest kept backup's binary log file. A later orphan may
/// be a segment being shipped right now: kept.
pub fn unneeded_orphans(
    orphans: &[SegmentId],
    segments: &[SegmentMeta],
    kept: &[(u64, BinlogFile, time::OffsetDateTime)],
) -> Vec<SegmentId> {
    let firsts = first_needed(segments, kept);
    orphans
        .iter()
        .filter(|o| {
            firsts
                .get(&o.server_id)
                .is_some_and(|(first, _)| o.created < first.created)
        })
        .cloned()
        .collect()
}

/// Per server with a kept backup whose binary log file is archived: that
/// file's segment for the oldest kept backup, and the backup's time.
fn first_needed<'a>(
    segments: &'a [SegmentMeta],
    kept: &[(u64, BinlogFile, time::OffsetDateTime)],
) -> std::collections::BTreeMap<u64, (&'a SegmentMeta, time::OffsetDateTime)> {
    let mut oldest: std::collections::BTreeMap<u64, (&BinlogFile, time::OffsetDateTime)> =
        std::collections::BTreeMap::new();
    for (sid, file, t) in kept {
        let e = oldest.entry(*sid).or_insert((file, *t));
        if *t < e.1 {
            *e = (file, *t);
        }
    }
    oldest
        .into_iter()
        .filter_map(|(sid, (file, t))| {
            let first = segments
                .iter()
                .filter(|s| s.server_id == sid && s.file == *file && s.created.time() <= t)
                .max_by_key(|s| s.created.clone())?;
            Some((sid, (first, t)))
        })
        .collect()
}

/// RFC 3339, UTC, whole seconds.
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .expect("a UTC time formats")
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::ids::tests::v;

    /// An event: header (time, type, server id, length, next position, flags) and body.
    fn event(out: &mut Vec<u8>, time: u32, kind: u8, server_id: u32, body: &[u8]) {
        let len = HEADER_LEN as u32 + body.len() as u32;
        let next = out.len() as u32 + len;
        out.extend(time.to_le_bytes());
        out.push(kind);
        out.extend(server_id.to_le_bytes());
        out.extend(len.to_le_bytes());
        out.extend(next.to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out.extend(body);
    }

    fn gtid_body(seq: u64, domain: u32) -> Vec<u8> {
        let mut b = seq.to_le_bytes().to_vec();
        b.extend(domain.to_le_bytes());
        b.push(0);
        b
    }

    /// A binary log: FDE at `t`, two transactions of server 7, a rotate.
    pub fn sample(t: u32) -> Vec<u8> {
        let mut f = MAGIC.to_vec();
        event(&mut f, t, FORMAT_DESCRIPTION_EVENT, 7, &[0; 100]);
        event(&mut f, t, 0xa3, 7, &[0; 8]); // Gtid_list
        event(&mut f, t + 5, MARIADB_GTID_EVENT, 7, &gtid_body(41, 0));
        event(&mut f, t + 5, 0x02, 7, b"INSERT INTO t VALUES (1)");
        event(&mut f, t + 9, MARIADB_GTID_EVENT, 7, &gtid_body(42, 0));
        event(&mut f, t + 9, 0x10, 7, &[0; 8]); // Xid
        event(&mut f, t + 30, 0x04, 7, b"\x04\0\0\0\0\0\0\0binlog.000043"); // Rotate
        f
    }

    #[test]
    fn walks_events_to_gtids_and_times() {
        let f = sample(1_795_000_000);
        let s = scan(&f[..], f.len() as u64, false).unwrap();
        assert_eq!((s.created, s.server_id, s.events), (1_795_000_000, 7, 7));
        assert_eq!(s.first_gtid.unwrap().to_string(), "0-7-41");
        assert_eq!(s.last_gtid.unwrap().to_string(), "0-7-42");
        assert_eq!(s.transactions, 2);
        assert_eq!((s.first_time, s.last_time), (1_795_000_000, 1_795_000_030));
        assert!(!s.partial);
        assert_eq!(header_of(&f[..23]).unwrap(), (1_795_000_000, 7));
    }

    #[test]
    fn refuses_what_is_not_a_whole_binary_log() {
        let f = sample(1_795_000_000);
        let size = f.len() as u64;
        // Cut inside an event: refused, or a partial walk of an open file.
        let cut = &f[..f.len() - 3];
        let err = scan(cut, size - 3, false).unwrap_err();
        assert!(
            err.to_string().contains("bytes are left in the file"),
            "{err}"
        );
        let s = scan(cut, size - 3, true).unwrap();
        assert!(s.partial && s.transactions == 2 && s.size < size - 3);
        assert!(holds_transaction(cut, size - 3).unwrap());
        // Only the header events: no transaction yet.
        let header_only = 4 + 2 * HEADER_LEN as usize + 108;
        assert!(!holds_transaction(&f[..header_only], header_only as u64).unwrap());
        // Not a binary log.
        assert!(matches!(
            scan(&b"hello world, not a binlog"[..], 25, false),
            Err(ScanError::Magic)
        ));
        // A length smaller than a header, and one past the end.
        for len in [3u32, 1 << 30] {
            let mut bad = f.clone();
            bad[4 + 9..4 + 13].copy_from_slice(&len.to_le_bytes());
            assert!(matches!(
                scan(&bad[..], size, false),
                Err(ScanError::BadLength { .. })
            ));
        }
        // A first event that is not a Format_description.
        let mut bad = f.clone();
        bad[4 + 4] = 0x02;
        assert!(matches!(
            scan(&bad[..], size, false),
            Err(ScanError::NoFormatDescription(2))
        ));
        // A reader shorter than the size claimed: an error, not a hang or a panic.
        assert!(scan(&f[..40], size, false).is_err());
    }

    fn meta() -> SegmentMeta {
        let f = sample(1_795_000_000);
        let s = scan(&f[..], f.len() as u64, false).unwrap();
        SegmentMeta::of(&v("db1"), &v("binlog.000042"), &s, 99, v(&"ab".repeat(32)))
    }

    #[test]
    fn metadata_round_trips_under_its_own_key_only() {
        let m = meta();
        assert_eq!(m.created, "20261118T110640Z");
        let key = m.segment().meta_key(&m.name);
        let back = SegmentMeta::parse_stored(&m.to_toml(), &key, "s3://b/k", &m.name).unwrap();
        assert_eq!(back, m);
        // Moved under another segment's key, or another name: refused.
        let other = SegmentId {
            file: v("binlog.000043"),
            ..m.segment()
        };
        let e =
            SegmentMeta::parse_stored(&m.to_toml(), &other.meta_key(&m.name), "s3://b/k", &m.name)
                .unwrap_err();
        assert!(e.to_string().contains("forged or misplaced"), "{e}");
        assert!(SegmentMeta::parse_stored(&m.to_toml(), &key, "o", &v("db2")).is_err());
    }

    #[test]
    fn metadata_with_bad_values_does_not_parse() {
        let m = meta();
        let key = m.segment().meta_key(&m.name);
        let text = m.to_toml();
        for (from, to) in [
            ("file = \"binlog.000042\"", "file = \"../../etc/passwd\""),
            (
                "first_gtid = \"0-7-41\"",
                "first_gtid = \"0-7-41'; DROP DATABASE mysql; --\"",
            ),
            ("compression = \"zstd\"", "compression = \"xz\""),
            ("format_version = 1", "format_version = 2"),
            ("transactions = 2", "transactions = 2\nextra = 1"),
        ] {
            assert!(text.contains(from), "{from} in {text}");
            let bad = text.replace(from, to);
            assert!(
                SegmentMeta::parse_stored(&bad, &key, "o", &m.name).is_err(),
                "{to}"
            );
        }
        let huge = format!("{text}\n# {}", "x".repeat(MAX_META_BYTES as usize));
        assert!(SegmentMeta::parse_stored(&huge, &key, "o", &m.name).is_err());
    }

    #[test]
    fn file_numbers() {
        assert_eq!(file_number("binlog.000042"), Some(42));
        assert_eq!(file_number("my-bin.1"), Some(1));
        for bad in [
            "binlog",
            "binlog.",
            "binlog.x1",
            "binlog.0000000000000000001",
        ] {
            assert_eq!(file_number(bad), None, "{bad}");
        }
    }

    /// A segment of server 1: `file`, created at minute `c`, events until minute `last`.
    fn seg(file: &str, c: i64, last: i64) -> SegmentMeta {
        let t0 = time::macros::datetime!(2026-11-28 10:00 UTC);
        let at = |m: i64| BackupId::from_time(t0 + time::Duration::minutes(m));
        SegmentMeta {
            format_version: FORMAT_VERSION,
            name: v("db1"),
            server_id: 1,
            file: v(file),
            created: at(c),
            size: 1,
            stored_size: 1,
            sha256: v(&"ab".repeat(32)),
            compression: Compression::Zstd,
            first_gtid: None,
            last_gtid: None,
            transactions: 0,
            first_event: at(c),
            last_event: at(last),
            encryption: None,
        }
    }

    fn minute(m: i64) -> time::OffsetDateTime {
        time::macros::datetime!(2026-11-28 10:00 UTC) + time::Duration::minutes(m)
    }

    fn files(c: &[SegmentMeta]) -> Vec<&str> {
        c.iter().map(|s| s.file.as_str()).collect()
    }

    #[test]
    fn a_chain_runs_from_the_backups_file_to_the_target() {
        let segs = vec![
            seg("binlog.000001", 0, 10),
            seg("binlog.000002", 10, 20),
            seg("binlog.000003", 20, 30),
            seg("binlog.000004", 30, 40),
            // Another server, and a restored server's later file of the same name.
            SegmentMeta {
                server_id: 2,
                ..seg("binlog.000003", 20, 30)
            },
            seg("binlog.000003", 50, 60),
        ];
        let f: BinlogFile = v("binlog.000002");
        let c = chain(&segs, 1, &f, minute(15), &Target::Time(minute(25))).unwrap();
        assert_eq!(files(&c), ["binlog.000002", "binlog.000003"]);
        assert_eq!(c[1].created, seg("binlog.000003", 20, 30).created);
        let c = chain(&segs, 1, &f, minute(15), &Target::Latest).unwrap();
        assert_eq!(
            files(&c),
            ["binlog.000002", "binlog.000003", "binlog.000004"]
        );
        // Past the end: refused, saying where the archive ends.
        let e = chain(&segs, 1, &f, minute(15), &Target::Time(minute(45))).unwrap_err();
        assert!(
            e.to_string().contains("ends at 2026-11-28T10:40:00Z"),
            "{e}"
        );
        // The backup's file not archived.
        let e = chain(&segs, 1, &v("binlog.000009"), minute(15), &Target::Latest).unwrap_err();
        assert!(matches!(e, ChainError::NotArchived { .. }), "{e}");
        assert_eq!(
            window(&segs, 1, &f, minute(15)),
            Some((minute(15), minute(40)))
        );
        assert_eq!(window(&segs, 1, &v("binlog.000009"), minute(15)), None);
    }

    #[test]
    fn a_gap_before_the_target_is_refused_with_the_missing_range() {
        let segs = vec![
            seg("binlog.000001", 0, 10),
            seg("binlog.000002", 10, 20),
            seg("binlog.000005", 40, 50),
        ];
        let f: BinlogFile = v("binlog.000001");
        let e = chain(&segs, 1, &f, minute(5), &Target::Time(minute(45))).unwrap_err();
        assert_eq!(
            e,
            ChainError::Gap {
                server_id: 1,
                from: "binlog.000003".into(),
                to: "binlog.000004".into(),
                reaches: "2026-11-28T10:20:00Z".into()
            }
        );
        assert!(
            e.to_string()
                .contains("binlog.000003 to binlog.000004 are missing"),
            "{e}"
        );
        assert!(chain(&segs, 1, &f, minute(5), &Target::Latest).is_err());
        // Before the gap: fine.
        let c = chain(&segs, 1, &f, minute(5), &Target::Time(minute(15))).unwrap();
        assert_eq!(files(&c), ["binlog.000001", "binlog.000002"]);
        assert_eq!(
            window(&segs, 1, &f, minute(5)),
            Some((minute(5), minute(20)))
        );
    }

    #[test]
    fn prune_keeps_what_the_oldest_kept_backup_needs() {
        let segs = vec![
            seg("binlog.000001", 0, 10),
            seg("binlog.000002", 10, 20),
            seg("binlog.000003", 20, 30),
            SegmentMeta {
                server_id: 2,
                ..seg("binlog.000001", 0, 10)
            },
        ];
        // Backups at minute 15 (in file 2) and 25 (in file 3) kept.
        let kept = vec![
            (1, v("binlog.000003"), minute(25)),
            (1, v("binlog.000002"), minute(15)),
        ];
        let gone = unneeded(&segs, &kept);
        assert_eq!(files(&gone), ["binlog.000001"]);
        assert_eq!(gone[0].server_id, 1);
        // The oldest kept backup's file not archived: everything kept.
        assert!(unneeded(&segs, &[(1, v("binlog.000009"), minute(15))]).is_empty());
        // No kept backup: nothing is decided.
        assert!(unneeded(&segs, &[]).is_empty());
        // Orphans: only those created before the first needed segment.
        let orphan = |file: &str, c: i64| seg(file, c, c).segment();
        let orphans = [orphan("binlog.000001", 1), orphan("binlog.000009", 90)];
        assert_eq!(
            unneeded_orphans(&orphans, &segs, &kept),
            vec![orphans[0].clone()]
        );
        assert!(unneeded_orphans(&orphans, &segs, &[]).is_empty());
    }

    /// Where a replay through `seq` of `domain` stops in a whole file.
    fn stop_after(f: &[u8], size: u64, domain: u32, seq: u64) -> Result<Option<u64>, ScanError> {
        let target = Target::Gtid(Gtid {
            domain,
            server_id: 0,
            seq,
        });
        Ok(stop_in(f, size, 0, &target)?.at)
    }

    #[test]
    fn a_gtid_target_stops_right_before_the_next_transaction_of_its_domain() {
        assert_eq!(Gtid::parse("0-7-42").unwrap().to_string(), "0-7-42");
        for bad in ["", "0-7", "0-7-42-1", "0-x-1", "0--1", "0-7-1; DROP"] {
            assert!(Gtid::parse(bad).is_err(), "{bad}");
        }
        let f = sample(1_795_000_000);
        let size = f.len() as u64;
        // Through 41: stop at the GTID event of 42, the fourth event.
        let at = stop_after(&f[..], size, 0, 41).unwrap().unwrap();
        assert_eq!(&f[at as usize + 4], &MARIADB_GTID_EVENT);
        assert!(at > 4 && at < size);
        assert_eq!(stop_after(&f[..], size, 0, 42).unwrap(), None);
        assert_eq!(stop_after(&f[..], size, 1, 0).unwrap(), None);
        assert_eq!(
            stop_after(&f[..], size, 0, 0).unwrap().map(|p| p < at),
            Some(true)
        );
    }

    #[test]
    fn a_time_target_stops_at_the_first_transaction_stamped_after_its_second() {
        let t0: u32 = 1_795_000_000;
        let f = sample(t0);
        let size = f.len() as u64;
        let at = |secs: u32| {
            Target::Time(time::OffsetDateTime::from_unix_timestamp(secs.into()).unwrap())
        };
        let gtid = |seq| Gtid {
            domain: 0,
            server_id: 7,
            seq,
        };
        // 41 at t0+5, 42 at t0+9.
        let before_both = stop_in(&f[..], size, 4, &at(t0 + 4)).unwrap();
        assert_eq!(before_both.last, []);
        let first = before_both.at.unwrap();
        assert_eq!(&f[first as usize + 4], &MARIADB_GTID_EVENT);
        // The target's second is included: 41 at t0+5 is replayed.
        let one = stop_in(&f[..], size, 4, &at(t0 + 5)).unwrap();
        assert_eq!(one.last, [gtid(41)]);
        assert_eq!(one.at, stop_after(&f[..], size, 0, 41).unwrap());
        let all = stop_in(&f[..], size, 4, &at(t0 + 9)).unwrap();
        assert_eq!(
            all,
            Stop {
                at: None,
                last: vec![gtid(42)]
            }
        );
        assert_eq!(stop_in(&f[..], size, 4, &Target::Latest).unwrap(), all);
        // Transactions before `from` (in the backup) are neither a stop nor replayed.
        let after_41 = one.at.unwrap();
        let from_42 = stop_in(&f[..], size, after_41, &at(t0 + 4)).unwrap();
        assert_eq!(
            from_42,
            Stop {
                at: Some(after_41),
                last: vec![]
            }
        );
        let latest_from_42 = stop_in(&f[..], size, after_41, &Target::Latest).unwrap();
        assert_eq!(latest_from_42.last, [gtid(42)]);
        // A position moved on per domain; a new domain appended.
        let other = Gtid {
            domain: 3,
            server_id: 9,
            seq: 5,
        };
        assert_eq!(Stop::advance("0-7-40,1-2-3", &[gtid(42)]), "0-7-42,1-2-3");
        assert_eq!(Stop::advance("0-7-40", &[gtid(42), other]), "0-7-42,3-9-5");
        assert_eq!(Stop::advance("", &[gtid(42)]), "0-7-42");
        assert_eq!(Stop::advance("0-7-40", &[]), "0-7-40");
    }
}
