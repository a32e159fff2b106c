//! restorer: lists, verifies and restores backups, and provisions replicas.
//!
//! Restore streams the archive (parallel ranged GETs → SHA-256 → decompress →
//! safe untar) into a staging directory beside the data directory while the
//! server keeps running; its stop begins as the unpack nears its end
//! (`mysql.stop_ahead`); then it keeps the old data directory as
//! `<datadir>.old-<time>`, moves the new one in and starts the server. Any
//! failure before the swap leaves the live data untouched and the server
//! running, started again if it was stopped (`restore.rs`: the phases and
//! their guards), and a restore killed at any
//! instant is finished or undone by the next one or `restorer recover`
//! (`journal.rs`).
//! The restorer is the store's reader and administrator: it writes to the
//! store only in `restorer prune` (`prune.rs`), only by deleting, and in
//! `restorer drill` (`drill.rs`), only a new drill record beside a manifest.

pub mod delta;
pub mod drill;
#[cfg(test)]
mod forged;
pub mod journal;
pub mod keygen;
pub mod only;
pub mod prune;
pub mod replay;
pub mod replica;
mod restore;
pub mod status;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use common::archive::tree::{FileKind, SafeDir};
use common::archive::{keys, ArchiveError, Streamed, Target};
use common::config::Config;
use common::crypt::{AuthKey, Identities};
use common::error::config_err;
use common::manifest::{ArchiveInfo, BackupId, BackupName, Manifest};
use common::progress::Progress;
use common::store::{self, Download, Store};

pub use delta::DeltaMode;
pub use replica::{ReplicaFlags, ReplicaOf};
pub use restore::{recover, restore, Interrupt, Phase, Report, RestoreOpts, PAUSE_ENV, SWAP_ASIDE};

/// The complete backups of `backup.name`, newest first. A manifest that
/// does not parse, or does not verify with `auth.key_file`, is skipped
/// with a warning naming its key.
pub async fn list(cfg: &Config) -> anyhow::Result<Vec<Manifest>> {
    let auth = AuthKey::from_config(cfg)?;
    let store = store::open(&cfg.store).await?;
    list_in(store.as_ref(), &backup_name(cfg)?, auth.as_ref()).await
}

pub(crate) fn backup_name(cfg: &Config) -> anyhow::Result<BackupName> {
    BackupName::parse(&cfg.backup.name).map_err(|e| config_err(format!("backup.name: {e}")))
}

/// Manifests read at once by `list` (one GET each): a year of daily backups
/// lists in a few round trips' time, not 365.
const LIST_READS_IN_FLIGHT: usize = 16;

async fn list_in(
    store: &dyn Store,
    name: &BackupName,
    auth: Option<&AuthKey>,
) -> anyhow::Result<Vec<Manifest>> {
    let keys = store.list(&keys::backups_of(name)).await?;
    backups_in(store, name, &keys, auth).await
}

/// The complete backups of `name` among `keys` (a listing of its prefix),
/// newest first, as [`list_in`].
pub(crate) async fn backups_in(
    store: &dyn Store,
    name: &BackupName,
    keys: &[String],
    auth: Option<&AuthKey>,
) -> anyhow::Result<Vec<Manifest>> {
    use futures::stream::{self, StreamExt};
    let ids: Vec<(&String, BackupId)> = keys
        .iter()
        .filter_map(|key| Some((key, keys::manifest_id(name, key)?)))
        .collect();
    let read: Vec<_> = stream::iter(&ids)
        .map(|(key, id)| async move { (*key, read_manifest(store, name, id, auth).await) })
        .buffered(LIST_READS_IN_FLIGHT)
        .collect()
        .await;
    let mut out = Vec::new();
    for (key, result) in read {
        match result {
            Ok(m) if m.archive.is_some() => out.push(m),
            Ok(_) => tracing::warn!(
                "skipping {}: a manifest without an archive (never completed)",
                store.url(key)
            ),
            Err(e) if common::cli::exit_code_of(&e) == common::ExitCode::Integrity => {
                tracing::warn!("skipping {}: {e:#}", store.url(key))
            }
            Err(e) => return Err(e),
        }
    }
    out.sort_by(|a, b| b.backup_id.cmp(&a.backup_id));
    Ok(out)
}

/// The archived binary log segments of `name` among `keys` (a listing of
/// its prefix): each metadata object read (at most
/// [`common::binlog::MAX_META_BYTES`]) and parsed as untrusted; one that
/// does not parse is skipped with a warning (its segment counts as missing).
/// With `auth`, so is one whose MAC object is missing or does not verify.
pub(crate) async fn segments_in(
    store: &dyn Store,
    name: &BackupName,
    keys: &[String],
    auth: Option<&AuthKey>,
) -> anyhow::Result<Vec<common::binlog::SegmentMeta>> {
    use common::keys::SegmentPart;
    use futures::stream::{self, StreamExt};
    let metas: Vec<&String> = keys
        .iter()
        .filter(|k| matches!(keys::segment_of(name, k), Some((_, SegmentPart::Meta))))
        .collect();
    let read: Vec<_> = stream::iter(metas)
        .map(|key| async move {
            let meta = store.get(key, common::binlog::MAX_META_BYTES).await;
            let mac = match auth {
                Some(_) => Some(
                    store
                        .get(&format!("{key}.mac"), common::crypt::MAX_MAC_BYTES)
                        .await,
                ),
                None => None,
            };
            (key, meta, mac)
        })
        .buffered(LIST_READS_IN_FLIGHT)
        .collect()
        .await;
    let mut out = Vec::new();
    for (key, got, mac) in read {
        let text = match got {
            Ok(b) => b,
            Err(e) if common::cli::exit_code_of(&e) == common::ExitCode::Integrity => {
                tracing::warn!("skipping {}: {e:#}", store.url(key));
                continue;
            }
            Err(e) => return Err(e),
        };
        if let (Some(auth), Some(mac)) = (auth, mac) {
            let verified = match mac {
                Ok(stored) => auth.verify(key, &text, &stored),
                Err(e)
                    if common::cli::exit_code_of(&e) == common::ExitCode::Integrity
                        || e.chain().any(|c| {
                            matches!(
                                c.downcast_ref(),
                                Some(common::store::StoreError::NotFound { .. })
                            )
                        }) =>
                {
                    Err(format!("{e:#}"))
                }
                Err(e) => return Err(e),
            };
            if let Err(why) = verified {
                tracing::warn!(
                    "skipping {}: its MAC does not verify with auth.key_file ({why}): forged, or written with another key",
                    store.url(key)
                );
                continue;
            }
        }
        let text = String::from_utf8_lossy(&text);
        match common::binlog::SegmentMeta::parse_stored(&text, key, &store.url(key), name) {
            Ok(m) => out.push(m),
            Err(e) => tracing::warn!("skipping: {e}"),
        }
    }
    Ok(out)
}

/// Reads and parses the manifest of backup `id`: [`common::catalog::read_manifest`].
async fn read_manifest(
    store: &dyn Store,
    name: &BackupName,
    id: &BackupId,
    auth: Option<&AuthKey>,
) -> anyhow::Result<Manifest> {
    common::catalog::read_manifest(store, name, id, auth).await
}

/// The manifest of backup `id` (or the newest complete one for `latest`).
async fn resolve(
    store: &dyn Store,
    cfg: &Config,
    id: &str,
) -> anyhow::Result<(Manifest, ArchiveInfo)> {
    let name = backup_name(cfg)?;
    let auth = AuthKey::from_config(cfg)?;
    let auth = auth.as_ref();
    let m = if id == "latest" {
        list_in(store, &name, auth)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no complete backup of {name:?} in {} (backup.name, store.url)",
                    store.url(&keys::backups_of(&name))
                )
            })?
    } else {
        let id = BackupId::parse(id).map_err(|e| config_err(format!("{e}, or \"latest\"")))?;
        read_manifest(store, &name, &id, auth).await?
    };
    let info = m.archive.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "backup {} has no archive in its manifest: it never completed",
            m.backup_id
        )
    })?;
    Ok((m, info))
}

/// A backup chosen by id or `latest`, its manifest read and checked: what
/// verify and restore work on.
pub struct Chosen {
    store: Arc<dyn Store>,
    pub manifest: Manifest,
    info: ArchiveInfo,
}

/// Opens the store and chooses backup `id` (or the newest complete one for
/// `latest`): the one resolver of verify and restore.
pub async fn choose(cfg: &Config, id: &str) -> anyhow::Result<Chosen> {
    let store: Arc<dyn Store> = store::open(&cfg.store).await?.into();
    let (manifest, info) = resolve(store.as_ref(), cfg, id).await?;
    // A missing or wrong identity is refused before anything is read or changed.
    if info.encryption.is_some() {
        let ids = Identities::from_config(cfg)?;
        common::crypt::check_keys(info.encryption.as_ref(), ids.as_ref()).map_err(|why| {
            ArchiveError::Key {
                url: store.url(&info.key),
                why,
            }
        })?;
    }
    Ok(Chosen {
        store,
        manifest,
        info,
    })
}

/// The table `restorer list` prints: a header and one line per backup.
pub fn list_table(backups: &[Manifest]) -> String {
    let mut out = format!(
        "{:<17} {:<20} {:>10} {:<5} {:<28} server\n",
        "id", "time", "size", "codec", "binlog"
    );
    for m in backups {
        let (size, codec) = m.archive.as_ref().map_or(("-".into(), "-".into()), |a| {
            (
                bytesize::ByteSize(a.size).to_string(),
                format!("{:?}", a.compression).to_lowercase(),
            )
        });
        let binlog = m
            .binlog
            .as_ref()
            .map_or("-".to_string(), |b| format!("{}:{}", b.file, b.position));
        // An incremental backup names the newest backup it reads from.
        let incremental = m
            .archive
            .as_ref()
            .and_then(|a| Some(format!("  incremental {} on {}", a.chain, a.bases.last()?)))
            .unwrap_or_default();
        out += &format!(
            "{:<17} {:<20} {:>10} {:<5} {:<28} {}{incremental}\n",
            m.backup_id.as_str(),
            m.created_at.get(..19).unwrap_or(&m.created_at),
            size,
            codec,
            binlog,
            m.server.version
        );
    }
    out
}

/// Streams the archive of `m` into `target`: the one code path of verify and restore.
#[allow(clippy::too_many_arguments)]
async fn stream_archive(
    store: Arc<dyn Store>,
    m: &Manifest,
    info: &ArchiveInfo,
    target: Target<'_>,
    progress: &dyn Progress,
    cancel: &AtomicBool,
    identities: Option<&Identities>,
    auth: Option<&AuthKey>,
) -> anyhow::Result<Streamed> {
    let url = store.url(&info.key);
    match store.size(&info.key).await? {
        None => return Err(ArchiveError::Missing { url }.into()),
        Some(n) if n != info.size => {
            return Err(ArchiveError::SizeMismatch {
                url,
                got: n,
                want: info.size,
            }
            .into())
        }
        Some(_) => {}
    }
    progress.set_total(info.size);
    if let Some(ix) = &info.index {
        let r = stream_indexed(
            store, m, info, ix, target, progress, cancel, identities, auth,
        )
        .await;
        progress.finish();
        return r;
    }
    let failed = Arc::new(AtomicBool::new(false));
    let download = Download::start(store, info.key.clone(), info.size, failed.clone());
    let cancelled = || cancel.load(std::sync::atomic::Ordering::SeqCst);
    let r = tokio::task::block_in_place(|| {
        // A signal stops the stream at the next read: both threads end, the
        // download is dropped.
        let download = common::reader::ProgressReader::new(download, &common::progress::Silent)
            .cancelled_by(&cancelled);
        common::archive::stream(
            download,
            &url,
            info,
            &m.data.paths,
            target,
            progress,
            &failed,
            identities,
        )
    });
    progress.finish();
    Ok(r?)
}

/// [`stream_archive`] of an indexed archive (format 3): its index read and
/// checked against the manifest (size, SHA-256, then every path and
/// offset), then its frames fetched by range and unpacked on all cores.
#[allow(clippy::too_many_arguments)]
async fn stream_indexed(
    store: Arc<dyn Store>,
    m: &Manifest,
    info: &ArchiveInfo,
    ix: &common::manifest::IndexInfo,
    target: Target<'_>,
    progress: &dyn Progress,
    cancel: &AtomicBool,
    identities: Option<&Identities>,
    auth: Option<&AuthKey>,
) -> anyhow::Result<Streamed> {
    let url = store.url(&info.key);
    let key_err = |why: String| ArchiveError::Key {
        url: url.clone(),
        why,
    };
    if let Some(enc) = &info.encryption {
        // A missing or wrong identity refused before anything is read.
        common::crypt::check_keys(Some(enc), identities).map_err(key_err)?;
    }
    let index = common::catalog::read_index(store.as_ref(), m, info, ix, identities).await?;
    // Encrypted (format 5): frames are decrypted from the age chunks
    // that hold them, its header read once.
    let sealed = match identities.filter(|_| info.encryption.is_some()) {
        Some(ids) => {
            let r = sealed_archive(store.as_ref(), &info.key, info, ids).await?;
            let own = index.own_frames();
            let frames_end = index.frames[..own]
                .last()
                .map_or(0, |f| f.stored_offset + f.stored_len);
            if r.plain_len() != frames_end {
                return Err(ArchiveError::Corrupt {
                    url: url.clone(),
                    why: format!(
                        "it decrypts to {} bytes, its index's frames hold {frames_end}: cut short or forged",
                        r.plain_len()
                    ),
                }
                .into());
            }
            Some(r)
        }
        _ => None,
    };
    // An incremental backup's bases: their archives' keys from their ids
    // (and, encrypted, each one's age header read once).
    let bases = bases_of(store.as_ref(), m, &index, auth).await?;
    let mut sealed_bases = Vec::new();
    if let Some(ids) = identities.filter(|_| sealed.is_some()) {
        for (key, base) in &bases {
            sealed_bases.push(sealed_archive(store.as_ref(), key, base, ids).await?);
        }
    }
    // All cores decompress; more requests than cores keep a remote store
    // busy; store.memory_limit bounds the frames held.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // A worker holds a frame's tar bytes and stored bytes (encrypted: its
    // ciphertext too, until it is decrypted).
    let copies = if sealed.is_some() { 2 } else { 1 };
    let largest = index
        .frames
        .iter()
        .map(|f| f.tar_len + copies * f.stored_len)
        .max()
        .unwrap_or(1);
    let workers = frame_workers(store.transfer().frame_workers(largest, cores), &url, cores);
    let handle = tokio::runtime::Handle::current();
    let fetch = |source: Option<u32>, r: std::ops::Range<u64>| {
        let (key, sealed) = match source {
            None => (&info.key, sealed.as_ref()),
            Some(k) => (&bases[k as usize].0, sealed_bases.get(k as usize)),
        };
        let get = |r| {
            handle
                .block_on(store.get_range(key, r))
                .map_err(|e| ArchiveError::Store {
                    url: store.url(key),
                    why: format!("{e:#}"),
                })
        };
        match sealed {
            Some(sealed) => {
                let stored = get(sealed.stored_range(&r))?;
                let plain = sealed.read(r, &stored).map_err(|e| ArchiveError::Corrupt {
                    url: store.url(key),
                    why: e.to_string(),
                })?;
                Ok(plain)
            }
            None => get(r),
        }
    };
    let cancelled = || cancel.load(std::sync::atomic::Ordering::SeqCst);
    let r = tokio::task::block_in_place(|| {
        common::archive::parallel::unpack(
            &index, &url, target, &fetch, workers, progress, &cancelled,
        )
    });
    Ok(r?)
}

/// The encrypted archive `info` at `key`, for ranged reads: its age header
/// read (its first bytes) and opened with `ids`.
async fn sealed_archive<'a>(
    store: &dyn Store,
    key: &str,
    info: &ArchiveInfo,
    ids: &'a Identities,
) -> anyhow::Result<common::crypt::Ranged<'a>> {
    let enc = info
        .encryption
        .as_ref()
        .expect("called for an encrypted archive");
    let head = store
        .get_range(key, 0..info.size.min(common::crypt::AGE_HEAD))
        .await?;
    let r =
        common::crypt::Ranged::new(head, info.size, enc, ids).map_err(|why| ArchiveError::Key {
            url: store.url(key),
            why,
        })?;
    Ok(r)
}

/// The archive keys and manifest archive entries of the sources of
/// `index` (an incremental backup `m`'s bases,
/// [`common::archive::index::Index::sources`]), in order: each base's
/// manifest read like any (MAC checked with `[auth]`), of the same name,
/// indexed, encrypted exactly when `m` is, older than `m`; its archive's
/// key derived from its id, its size the manifest's, and every frame of it
/// that `index` names inside it. Anything else refuses the backup before
/// anything is written.
async fn bases_of(
    store: &dyn Store,
    m: &Manifest,
    index: &common::archive::index::Index,
    auth: Option<&AuthKey>,
) -> anyhow::Result<Vec<(String, ArchiveInfo)>> {
    if index.sources.is_empty() {
        return Ok(Vec::new());
    }
    let mut keys_out = Vec::new();
    for (k, id) in index.sources.iter().enumerate() {
        let broken = |why: String| ArchiveError::Corrupt {
            url: store.url(&keys::manifest(&m.name, &m.backup_id)),
            why: format!("its base {id}: {why}; restore a full backup (restorer list) instead"),
        };
        let base = read_manifest(store, &m.name, id, auth)
            .await
            .map_err(|e| broken(format!("{e:#}")))?;
        let info = base
            .archive
            .as_ref()
            .filter(|a| a.is_indexed() && base.backup_id < m.backup_id)
            .ok_or_else(|| broken("not an indexed backup older than this one".into()))?;
        let encrypted = m.archive.as_ref().is_some_and(|a| a.encryption.is_some());
        if info.encryption.is_some() != encrypted {
            return Err(
                broken("encrypted where this backup is not, or the other way".into()).into(),
            );
        }
        let key = keys::archive_key(&m.name, id, common::config::Compression::Zstd, encrypted);
        if info.key != key {
            return Err(broken(format!("its archive is {}, not {key}", info.key)).into());
        }
        match store.size(&key).await? {
            None => {
                return Err(ArchiveError::Missing {
                    url: store.url(&key),
                }
                .into())
            }
            Some(n) if n != info.size => {
                return Err(ArchiveError::SizeMismatch {
                    url: store.url(&key),
                    got: n,
                    want: info.size,
                }
                .into())
            }
            Some(_) => {}
        }
        let past = index
            .frames
            .iter()
            .filter(|f| f.source == Some(k as u32))
            .any(|f| f.stored_offset + f.stored_len > info.size);
        if past {
            return Err(broken(format!(
                "this backup's index names bytes past the end of its archive ({} bytes): forged",
                info.size
            ))
            .into());
        }
        keys_out.push((key, info.clone()));
    }
    Ok(keys_out)
}

/// Workers of an indexed read from the store at `url`: `planned` (every
/// core, or `store.concurrency` when more, within `store.memory_limit`);
/// from a file:// store, whose reads wait on no network, two per core (one
/// reading while the other decompresses; more would only hold more frames
/// in memory).
fn frame_workers(planned: usize, url: &str, cores: usize) -> usize {
    if url.starts_with("file://") {
        planned.min(2 * cores.max(1))
    } else {
        planned
    }
}

/// Where [`stage`] unpacks: an empty directory, the owner of what it
/// writes, the flag that stops it (SIGINT/SIGTERM), and where the copy
/// will be used.
pub struct StageDir<'a> {
    pub dir: &'a Path,
    pub owner: Option<(u32, u32)>,
    pub cancel: &'a AtomicBool,
    /// `None`: the copy is moved to `volume.datadir` and
    /// `volume.mountpoint` (restore); `Some(root)`: it is used where it is
    /// unpacked, `root` standing for the volume root (a drill's scratch).
    pub in_place: Option<&'a Path>,
    /// `--delta`: the files taken from the local copy (hard-linked into
    /// `dir` after the unpack wrote everything else).
    pub reuse: Option<&'a delta::Reuse>,
}

/// The entries of backup `m` that `to.reuse` does not take from the local
/// copy ([`delta::Reuse::writes`]; all of them without), unpacked into
/// `to.dir`: the first pass of a two-pass `--delta` ([`delta`]), and the
/// first step of [`stage`].
pub async fn unpack_into(
    cfg: &Config,
    store: Arc<dyn Store>,
    m: &Manifest,
    info: &ArchiveInfo,
    to: &StageDir<'_>,
    progress: &dyn Progress,
) -> anyhow::Result<Streamed> {
    let (staging, owner, reuse) = (to.dir, to.owner, to.reuse);
    let ids = Identities::from_config(cfg)?;
    let written = |path: &str, _| reuse.is_none_or(|r| r.writes(path));
    let target = match reuse {
        None => Target::Dir {
            root: staging,
            owner,
        },
        Some(r) => Target::Subset {
            root: staging,
            owner,
            select: &written,
            local: match r.pieces {
                true => Some(r),
                false => None,
            },
        },
    };
    stream_archive(
        store,
        m,
        info,
        target,
        progress,
        to.cancel,
        ids.as_ref(),
        AuthKey::from_config(cfg)?.as_ref(),
    )
    .await
}

/// Unpacks backup `m` into `to.dir` (`staging`: empty, or holding what a
/// first pass of `--delta` wrote) and prepares the
/// copy for this server (clone hygiene, binary log index pointed at
/// `volume.datadir` and `volume.mountpoint`, or at the copy itself with
/// `to.in_place`): everything restore does before it touches the server but
/// the flush ([`flush_staged`]), which it runs while the server stops.
/// Nothing outside `staging` is written.
pub async fn stage(
    cfg: &Config,
    store: Arc<dyn Store>,
    m: &Manifest,
    info: &ArchiveInfo,
    to: StageDir<'_>,
    progress: &dyn Progress,
) -> anyhow::Result<Streamed> {
    let t = std::time::Instant::now();
    let s = unpack_into(cfg, store.clone(), m, info, &to, progress).await?;
    let StageDir {
        dir: staging,
        owner,
        in_place,
        reuse,
        ..
    } = to;
    if let Some(r) = reuse {
        delta::link(r, staging, owner)?;
        tracing::info!(
            "{} file(s), {}, taken from the local copy; {} fetched",
            r.files,
            bytesize::ByteSize(r.bytes),
            bytesize::ByteSize(s.fetched_bytes)
        );
    }
    tracing::debug!(
        "archive streamed and unpacked in {:.3}s",
        t.elapsed().as_secs_f64()
    );
    // Every archived directory must be there, as a plain directory.
    let staged =
        SafeDir::open(staging).with_context(|| format!("cannot open {}", staging.display()))?;
    let mut roots = Vec::new();
    for p in &m.data.paths {
        let dir = staged.subdir(p.as_path(), false, None).map_err(|e| {
            common::error::integrity_err(format!(
                "the archive {} has no directory {p:?} of its data.paths (or not as a plain directory): {e}",
                store.url(&info.key)
            ))
        })?;
        roots.push(dir);
    }
    let removed = clone_hygiene(&roots[0])?;
    if !removed.is_empty() {
        tracing::info!("removed from the copy: {}", removed.join(", "));
    }
    // The binary log index names files by the source's paths.
    let (datadir, root) = match in_place {
        None => (cfg.volume.datadir.clone(), cfg.volume.mountpoint.as_path()),
        Some(root) => (root.join(&m.data.datadir), root),
    };
    let mut moves = vec![(m.data.volume_root.join(&m.data.datadir), datadir)];
    for p in m.data.paths.iter().filter(|p| **p != m.data.datadir) {
        moves.push((m.data.volume_root.join(p), root.join(p)));
    }
    for dir in &roots {
        rewrite_binlog_indexes(dir, &moves)?;
    }
    Ok(s)
}

/// Makes the staged copy at `dir` durable before the swap puts it live: one
/// flush of its whole filesystem (`syncfs`) instead of an fsync per file.
pub fn flush_staged(dir: &Path) -> anyhow::Result<()> {
    let t = std::time::Instant::now();
    SafeDir::open(dir)
        .and_then(|d| d.syncfs())
        .with_context(|| format!("cannot flush the staged copy {} (syncfs)", dir.display()))?;
    tracing::debug!(
        "staged copy flushed (syncfs) in {:.3}s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A backup `verify` read whole.
#[derive(Debug)]
pub struct Verified {
    pub manifest: Manifest,
    /// Bytes of the stored archive read and checked.
    pub size: u64,
    pub streamed: Streamed,
}

impl common::metrics::Measured for Verified {
    fn samples(&self) -> Vec<common::metrics::Sample> {
        use common::metrics::{Metric, Sample};
        vec![
            Sample(Metric::VerifyBytes, self.size as f64),
            Sample(Metric::VerifyUnpackedBytes, self.streamed.file_bytes as f64),
        ]
    }
}

/// Reads the whole archive as restore would, writing nothing; logs that
/// the backup is intact.
pub async fn verify(cfg: &Config, id: &str, progress: &dyn Progress) -> anyhow::Result<Verified> {
    let c = choose(cfg, id).await?;
    let never = AtomicBool::new(false);
    let ids = Identities::from_config(cfg)?;
    let s = stream_archive(
        c.store,
        &c.manifest,
        &c.info,
        Target::Discard,
        progress,
        &never,
        ids.as_ref(),
        AuthKey::from_config(cfg)?.as_ref(),
    )
    .await?;
    tracing::info!(
        "backup {} is intact: {} entries, {} files",
        c.manifest.backup_id,
        s.entries,
        s.files
    );
    Ok(Verified {
        manifest: c.manifest,
        size: c.info.size,
        streamed: s,
    })
}

/// Removes what must not travel to another server: the server UUID, pid and
/// socket files, relay logs and replication state of the source. Works on
/// the staged directory without following links.
pub fn clone_hygiene(datadir: &SafeDir) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    let entries = datadir
        .entries()
        .with_context(|| format!("cannot list {}", datadir.path().display()))?;
    for (name, kind) in entries {
        let Some(name) = name.to_str().map(str::to_string) else {
            continue;
        };
        let drop = name == "auto.cnf"
            || name.ends_with(".pid")
            || name.ends_with(".sock")
            || name.ends_with(".sock.lock")
            || name.contains("relay-bin")
            || name.contains("relay-log")
            || name == "master.info"
            || name == "multi-master.info"
            || (name.starts_with("master-") && name.ends_with(".info"));
        if drop && kind != FileKind::Dir {
            datadir.remove_file(Path::new(&name)).with_context(|| {
                format!(
                    "cannot remove {}",
                    datadir.shown(Path::new(&name)).display()
                )
            })?;
            removed.push(name);
        }
    }
    removed.sort();
    Ok(removed)
}

/// The largest binary log index restore reads (one line per binary log).
const MAX_INDEX_BYTES: u64 = 16 << 20;

/// Points binary log index entries that name the source's directories at the
/// same files in this server's directories (`moves`: source dir → target
/// dir). Entries relative to the data directory are left alone. An entry
/// that would make the server open a file elsewhere (absolute outside the
/// restored directories, or with `..`) refuses the backup: the server reads,
/// and purges, what its index names.
pub fn rewrite_binlog_indexes(dir: &SafeDir, moves: &[(PathBuf, PathBuf)]) -> anyhow::Result<()> {
    let entries = dir
        .entries()
        .with_context(|| format!("cannot list {}", dir.path().display()))?;
    for (name, kind) in entries {
        let name = Path::new(&name);
        if kind != FileKind::File || name.extension().is_none_or(|x| x != "index") {
            continue;
        }
        let shown = dir.shown(name);
        let bytes = dir
            .read_file(name, MAX_INDEX_BYTES)
            .with_context(|| format!("cannot read {}", shown.display()))?;
        let text = String::from_utf8_lossy(&bytes);
        let mut changed = false;
        let mut lines = Vec::new();
        for line in text.lines() {
            let p = Path::new(line);
            let moved = moves
                .iter()
                .find_map(|(from, to)| Some(to.join(p.strip_prefix(from).ok()?)));
            let new = match moved {
                Some(new) if p.is_absolute() => {
                    changed = true;
                    new
                }
                _ => p.to_path_buf(),
            };
            let inside = !new
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
                && (new.is_relative() || moves.iter().any(|(_, to)| new.starts_with(to)));
            if !line.is_empty() && !inside {
                return Err(common::error::integrity_err(format!(
                    "the binary log index {} names {line:?}, outside the restored directories: refused",
                    shown.display()
                )));
            }
            lines.push(new.to_string_lossy().into_owned());
        }
        if changed {
            dir.replace_file(name, (lines.join("\n") + "\n").as_bytes())
                .with_context(|| format!("cannot write {}", shown.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_store_is_read_by_two_frame_workers_per_core_and_s3_by_more() {
        assert_eq!(frame_workers(8, "file:///srv/b/db1/x/data.tar.zst", 2), 4);
        assert_eq!(frame_workers(1, "file:///srv/b/db1/x/data.tar.zst", 2), 1);
        assert_eq!(frame_workers(8, "s3://bucket/db1/x/data.tar.zst", 2), 8);
    }

    fn v<T: TryFrom<String, Error = String>>(s: &str) -> T {
        T::try_from(s.to_string()).unwrap()
    }

    fn manifest(id: &str, binlog: Option<(&str, u64)>, size: u64) -> Manifest {
        use common::config::{Backend, Compression, LockMethod};
        use common::manifest::{
            Binlog, DataLayout, Flavor, LockTimes, Server, SnapshotInfo, FORMAT_VERSION,
        };
        let id: BackupId = v(id);
        Manifest {
            format_version: FORMAT_VERSION,
            backup_id: id.clone(),
            name: v("db1"),
            created_at: v("2026-11-26T09:30:00.123456Z"),
            server: Server {
                flavor: Flavor::Mariadb,
                version: v("10.11.6-MariaDB-log"),
                hostname: v("db1"),
                server_id: 1,
            },
            binlog: binlog.map(|(file, position)| Binlog {
                file: v(file),
                position,
            }),
            gtid: None,
            source: None,
            lock: LockTimes {
                method: LockMethod::Ftwrl,
                attempts: 1,
                wait_secs: 0.0,
                hold_secs: 0.0,
            },
            snapshot: SnapshotInfo {
                backend: Backend::Btrfs,
                name: v("snap"),
                path: "/nonexistent".into(),
            },
            data: DataLayout {
                volume_root: "/src".into(),
                datadir: v("mysql"),
                paths: vec![v("mysql")],
                exclude: vec![],
            },
            archive: Some(ArchiveInfo {
                key: keys::archive(&v("db1"), &id, Compression::Zstd),
                size,
                compression: Compression::Zstd,
                level: 3,
                sha256: v(&"ab".repeat(32)),
                tar_size: 0,
                unpacked_size: 0,
                files: 0,
                archive_secs: 0.0,
                encryption: None,
                index: None,
                bases: vec![],
                chain: 0,
            }),
        }
    }

    #[test]
    fn list_table_has_a_header_and_a_line_per_backup() {
        let table = list_table(&[
            manifest("20261126T093000Z", Some(("binlog.000002", 385)), 3 << 20),
            manifest("20261125T093000Z", None, 1000),
        ]);
        let want = "\
id                time                       size codec binlog                       server
20261126T093000Z  2026-11-26T09:30:00     3.0 MiB zstd  binlog.000002:385            10.11.6-MariaDB-log
20261125T093000Z  2026-11-26T09:30:00      1000 B zstd  -                            10.11.6-MariaDB-log
";
        assert_eq!(table, want);
        assert_eq!(list_table(&[]).lines().count(), 1);
    }

    #[test]
    fn binlog_index_follows_the_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let idx = dir.path().join("binlog.index");
        std::fs::write(
            &idx,
            "/src/mysql/binlog.000001\n/src/mysql/binlog.000002\n./rel.000003\n",
        )
        .unwrap();
        let moves = vec![(PathBuf::from("/src/mysql"), PathBuf::from("/dst/db"))];
        let safe = SafeDir::open(dir.path()).unwrap();
        rewrite_binlog_indexes(&safe, &moves).unwrap();
        assert_eq!(
            std::fs::read_to_string(&idx).unwrap(),
            "/dst/db/binlog.000001\n/dst/db/binlog.000002\n./rel.000003\n"
        );
        // An index that would make the server open (and purge) files elsewhere.
        for bad in ["/etc/shadow", "../../etc/shadow", "/src/mysql/../../etc/x"] {
            std::fs::write(&idx, format!("./rel.000003\n{bad}\n")).unwrap();
            let err = rewrite_binlog_indexes(&safe, &moves).unwrap_err();
            assert_eq!(
                common::cli::exit_code_of(&err),
                common::ExitCode::Integrity,
                "{bad}"
            );
            assert!(err.to_string().contains("outside the restored"), "{err}");
        }
    }

    #[test]
    fn clone_hygiene_removes_identity_and_replication_state_only() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "auto.cnf",
            "db1.pid",
            "db1-relay-bin.000001",
            "db1-relay-bin.index",
            "relay-log.info",
            "master.info",
            "ibdata1",
            "ib_logfile0",
            "binlog.000001",
            "aria_log_control",
        ] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        std::fs::create_dir(dir.path().join("mysql")).unwrap();
        let removed = clone_hygiene(&SafeDir::open(dir.path()).unwrap()).unwrap();
        assert_eq!(
            removed,
            [
                "auto.cnf",
                "db1-relay-bin.000001",
                "db1-relay-bin.index",
                "db1.pid",
                "master.info",
                "relay-log.info"
            ]
        );
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "aria_log_control",
                "binlog.000001",
                "ib_logfile0",
                "ibdata1",
                "mysql"
            ]
        );
    }
}
