//! archiver: the streaming half of a backup.
//!
//! tar (relative paths, modes, owners, mtimes) → codec → SHA-256 → store,
//! with no local staging: a blocking thread produces parts, the store uploads
//! them with bounded concurrency. The manifest is stored last, only after the
//! archive is complete and the snapshot proved whole. The snapshot and the
//! local state are removed in every outcome.

pub mod binlogs;

use std::path::Path;
use std::time::Instant;

use std::io::{Read, Write};

use anyhow::Context;
use common::config::Config;
use common::manifest::{ArchiveInfo, Manifest};
use common::progress::Progress;
use common::signal::Interrupt;
use common::snapshot::{self, SnapshotBackend};
use common::state::StateLock;
use common::store;

use common::archive::{self as format, TarStats};

/// How long the archiver waits for the state lock: the snapshotter that
/// handed it the manifest may still be exiting, or a later one deciding
/// that this backup is not stale (it then refuses to start).
pub const STATE_LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// A stored backup, as the archiver saw it.
#[derive(Debug, Clone)]
pub struct Archived {
    pub backup_id: String,
    /// Bytes of the stored archive.
    pub size: u64,
    /// Bytes of file data in it.
    pub unpacked_size: u64,
    pub files: u64,
    /// The lock's wait and hold, from the snapshotter's manifest.
    pub lock: common::manifest::LockTimes,
    /// LVM: the share of the snapshot's copy-on-write space used when the
    /// archive was complete (0 to 1).
    pub cow_used: Option<f64>,
}

impl common::metrics::Measured for Archived {
    fn samples(&self) -> Vec<common::metrics::Sample> {
        use common::metrics::{Metric, Sample};
        let mut s = vec![
            Sample(Metric::BackupBytes, self.size as f64),
            Sample(Metric::BackupUnpackedBytes, self.unpacked_size as f64),
            Sample(Metric::BackupFiles, self.files as f64),
            Sample(Metric::BackupLockWait, self.lock.wait_secs),
            Sample(Metric::BackupLockHold, self.lock.hold_secs),
        ];
        s.extend(
            self.cow_used
                .map(|c| Sample(Metric::BackupSnapshotCowUsed, c)),
        );
        s
    }
}

/// Archives the snapshot of `manifest_path`; returns what was stored.
/// With `backup.full_every` > 1 the backup is incremental unless `full`
/// or the chain since the last full one is long enough ([`choose_base`]).
pub async fn run(
    cfg: &Config,
    manifest_path: &Path,
    progress: &dyn Progress,
    cancel: &Interrupt,
    full: bool,
) -> anyhow::Result<Archived> {
    let state = StateLock::acquire_waiting(&cfg.backup.state_dir, STATE_LOCK_PATIENCE)
        .with_context(|| {
            format!(
                "waited {}s for the state lock; the backup of {} stays pending: run `archiver --manifest {}` again once that run has finished (a later snapshotter keeps it for backup.handoff_grace)",
                STATE_LOCK_PATIENCE.as_secs(),
                manifest_path.display(),
                manifest_path.display()
            )
        })?;
    let manifest = Manifest::load(manifest_path)?;
    anyhow::ensure!(
        manifest.name == cfg.backup.name,
        "manifest {} belongs to backup.name {:?}, this config is {:?}",
        manifest_path.display(),
        manifest.name,
        cfg.backup.name
    );
    anyhow::ensure!(
        manifest.archive.is_none(),
        "manifest {} was archived already (backup {})",
        manifest_path.display(),
        manifest.backup_id
    );
    // Held while archiving: a later snapshotter never counts this backup stale.
    let _claim = state.claim(&manifest.backup_id)?;
    let backend = snapshot::backend(&cfg.volume, &cfg.backup.state_dir);
    let result = archive(cfg, &manifest, backend.as_ref(), progress, cancel, full).await;
    // A read error from an overflowed (LVM) snapshot is reported as what it is.
    let result = result.map_err(|e| {
        if backend.kind() != common::config::Backend::Lvm || cancel.is_set() {
            return e;
        }
        match backend.check_valid(&manifest.snapshot.name) {
            Err(invalid) => e.context(format!("{invalid:#}")),
            Ok(_) => e,
        }
    });
    // Every outcome: no snapshot and no pending state left behind.
    let removed = backend.remove(&manifest.snapshot.name);
    let state_dir = state.backup_dir(&manifest.backup_id);
    if let Err(e) = std::fs::remove_dir_all(&state_dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", state_dir.display());
        }
    }
    match (result, removed) {
        (Ok(archived), Ok(())) => Ok(archived),
        (Ok(_), Err(e)) => {
            tracing::error!(
                "backup {} is complete, but its snapshot could not be removed: {e:#}",
                manifest.backup_id
            );
            Err(e.context(format!("remove snapshot {}", manifest.snapshot.name)))
        }
        (Err(e), removed) => {
            if let Err(e2) = removed {
                tracing::error!("cannot remove snapshot {}: {e2:#}", manifest.snapshot.name);
            }
            Err(e)
        }
    }
}

/// The archive phases: make the snapshot readable and check that the id
/// is free ([`precheck`]), stream it to the store ([`stream`]), prove the
/// snapshot stayed whole ([`settle`]), store the manifest last and read it
/// back ([`store_manifest`]), then what was stored ([`archived`]).
async fn archive(
    cfg: &Config,
    manifest: &Manifest,
    backend: &dyn SnapshotBackend,
    progress: &dyn Progress,
    cancel: &Interrupt,
    full: bool,
) -> anyhow::Result<Archived> {
    let started = Instant::now();
    // Keys first: a bad key file fails before anything is written.
    let recipients = common::crypt::Recipients::from_config(cfg)?;
    let auth = common::crypt::AuthKey::from_config(cfg)?;
    let (store, uploads, key) = precheck(cfg, manifest, backend, recipients.is_some()).await?;
    let store = store.as_ref();
    let base = match full || !indexed(cfg) {
        true => None,
        false => choose_base(cfg, manifest, store, auth.as_ref(), recipients.is_some()).await,
    };
    let sink = Sink {
        store,
        key: &key,
        recipients: recipients.as_ref(),
        base: base.as_ref(),
    };
    let (stats, size, index) = stream(cfg, manifest, &sink, uploads, progress, cancel)
        .await
        .map_err(|e| exists_is_taken(e, cfg, manifest, &store.url(&key)))?;
    let cow_used = settle(manifest, backend, store, &key, cancel).await?;
    let bases = index
        .as_ref()
        .map(|i| i.sources.clone())
        .unwrap_or_default();
    let chain = match (&base, bases.is_empty()) {
        (Some(b), false) => b.chain + 1,
        _ => 0,
    };
    let plain_index = index;
    let index = match &plain_index {
        Some(index) => Some(store_index(cfg, manifest, store, index, recipients.as_ref()).await?),
        None => None,
    };
    let mut complete = manifest.clone();
    complete.archive = Some(ArchiveInfo {
        key,
        size,
        compression: cfg.archive.compression,
        level: cfg.level(),
        sha256: common::manifest::Sha256Hex::parse(&stats.sha256).map_err(anyhow::Error::msg)?,
        tar_size: stats.tar_size,
        unpacked_size: stats.content_bytes,
        files: stats.files,
        archive_secs: started.elapsed().as_secs_f64(),
        encryption: recipients.as_ref().map(|r| r.encryption()),
        index: index.clone(),
        bases,
        chain,
    });
    if recipients.is_some() {
        complete.format_version = common::manifest::ENCRYPTED_FORMAT_VERSION;
    }
    if index.is_some() {
        complete.format_version = common::manifest::INDEXED_FORMAT_VERSION;
    }
    if chain > 0 {
        complete.format_version = common::manifest::INCREMENTAL_FORMAT_VERSION;
    }
    if index.is_some() && recipients.is_some() {
        // Encrypted, full or incremental.
        complete.format_version = common::manifest::ENCRYPTED_INDEXED_FORMAT_VERSION;
    }
    store_manifest(cfg, &complete, store, auth.as_ref()).await?;
    if let (Some(plain), Some(info), Some(_)) = (&plain_index, &index, &recipients) {
        // The next incremental backup's base index, kept once this backup
        // is complete: this host cannot decrypt the stored one.
        if cfg.backup.full_every > 1 {
            if let Err(e) = cache_index(cfg, manifest, plain, info) {
                tracing::warn!("the next backup will be a full one: {e:#}");
            }
        }
    }
    Ok(archived(&complete, &stats, size, cow_used, started))
}

/// The pre-check phase: the snapshot made readable and there, the store
/// opened, uploads of killed runs aborted, and this backup's archive and
/// manifest keys free (and its MAC's). Returns the store, the upload log and
/// the archive key (`.age` when `encrypted`).
async fn precheck(
    cfg: &Config,
    manifest: &Manifest,
    backend: &dyn SnapshotBackend,
    encrypted: bool,
) -> anyhow::Result<(Box<dyn store::Store>, store::UploadLog, String)> {
    let snap = &manifest.snapshot.path;
    backend.make_readable(&common::snapshot::Snapshot {
        name: manifest.snapshot.name.to_string(),
        path: snap.clone(),
    })?;
    anyhow::ensure!(
        snap.is_dir(),
        "snapshot {} does not exist (was it removed by a later run?)",
        snap.display()
    );
    let store = store::open(&cfg.store).await?;
    // Uploads of runs killed mid-way (kill -9, a store that went away
    // before the abort) are aborted before this one starts.
    let uploads = store::UploadLog::in_state_dir(&cfg.backup.state_dir);
    if let Err(e) = store::abort_leftovers(store.as_ref(), &uploads).await {
        tracing::warn!("cannot clean up the uploads of earlier runs: {e:#}");
    }
    let key = format::keys::archive_key(
        &manifest.name,
        &manifest.backup_id,
        cfg.archive.compression,
        encrypted,
    );
    let mac_key = format::keys::manifest_mac(&manifest.name, &manifest.backup_id);
    // Another host writing under the same backup.name may have taken this
    // id: refuse now rather than after the upload. (The archive and the
    // manifest are also written only if absent, for a race.)
    let index_key = format::keys::index(&manifest.name, &manifest.backup_id, encrypted);
    for k in [&key, &index_key, &mac_key, &manifest.key()] {
        if store.size(k).await?.is_some() {
            return Err(taken(cfg, manifest, &store.url(k)));
        }
    }
    Ok((store, uploads, key))
}

/// After the stream: the archive at `key` is deleted when a signal came
/// or the snapshot overflowed (LVM: the archive may be inconsistent).
/// Returns the share of the snapshot's copy-on-write space used.
async fn settle(
    manifest: &Manifest,
    backend: &dyn SnapshotBackend,
    store: &dyn store::Store,
    key: &str,
    cancel: &Interrupt,
) -> anyhow::Result<Option<f64>> {
    if cancel.is_set() {
        store.delete(key).await?;
        anyhow::bail!("interrupted by a signal; the backup is incomplete and not listed");
    }
    match backend.check_valid(&manifest.snapshot.name) {
        Ok(used) => Ok(used),
        Err(e) => {
            let _ = store.delete(key).await;
            Err(e.context("the snapshot became invalid during the backup; the archive was deleted"))
        }
    }
}

/// Whether this config writes an indexed archive (manifest format 3, 4
/// or, encrypted, 5): zstd, unless `archive.indexed = false`. xz and
/// uncompressed archives stay one stream (format 1 or 2).
fn indexed(cfg: &Config) -> bool {
    cfg.archive.indexed && cfg.archive.compression == common::config::Compression::Zstd
}

/// The base of an incremental backup of `manifest`, when
/// `backup.full_every` > 1: the newest complete backup of the same
/// `backup.name` older than it, if it is indexed, of the same server and
/// data paths, and its chain is shorter than `full_every` - 1. A base
/// whose manifest or index cannot be read or checked (`[auth]` included)
/// makes this backup a full one, with a warning: never a failed backup.
async fn choose_base(
    cfg: &Config,
    manifest: &Manifest,
    store: &dyn store::Store,
    auth: Option<&common::crypt::AuthKey>,
    encrypted: bool,
) -> Option<format::incremental::Base> {
    if cfg.backup.full_every <= 1 {
        return None;
    }
    match find_base(cfg, manifest, store, auth, encrypted).await {
        Ok(Some(base)) => {
            tracing::info!(
                "incremental backup on {} (chain {} of up to {})",
                base.id,
                base.chain + 1,
                cfg.backup.full_every - 1
            );
            Some(base)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("taking a full backup: the last backup cannot be a base: {e:#}");
            None
        }
    }
}

async fn find_base(
    cfg: &Config,
    manifest: &Manifest,
    store: &dyn store::Store,
    auth: Option<&common::crypt::AuthKey>,
    encrypted: bool,
) -> anyhow::Result<Option<format::incremental::Base>> {
    let name = &manifest.name;
    let listed = store.list(&format::keys::backups_of(name)).await?;
    let mut ids: Vec<_> = listed
        .iter()
        .filter_map(|k| format::keys::manifest_id(name, k))
        .filter(|id| *id < manifest.backup_id)
        .collect();
    ids.sort();
    let Some(id) = ids.pop() else {
        return Ok(None);
    };
    let m = common::catalog::read_manifest(store, name, &id, auth).await?;
    let Some(info) = m.archive.as_ref() else {
        anyhow::bail!("backup {id} never completed");
    };
    let Some(ix) = info.index.as_ref() else {
        tracing::info!("taking a full backup: the last backup {id} is not indexed");
        return Ok(None);
    };
    if info.encryption.is_some() != encrypted {
        tracing::info!(
            "taking a full backup: the last backup {id} is {}encrypted, this one is {}",
            if encrypted { "not " } else { "" },
            if encrypted { "encrypted" } else { "not" }
        );
        return Ok(None);
    }
    if info.chain + 1 >= cfg.backup.full_every {
        tracing::info!(
            "taking a full backup: {} incremental backups since the last full one (backup.full_every = {})",
            info.chain,
            cfg.backup.full_every
        );
        return Ok(None);
    }
    anyhow::ensure!(
        m.server.server_id == manifest.server.server_id
            && m.server.hostname == manifest.server.hostname
            && m.data.paths == manifest.data.paths
            && m.data.datadir == manifest.data.datadir,
        "backup {id} is of another server or other data paths"
    );
    let index = match encrypted {
        false => common::catalog::read_index(store, &m, info, ix, None).await?,
        true => cached_index(cfg, &m, info, ix)?,
    };
    if index.version != format::index::INDEX_VERSION {
        // Its digests are of another hash than this backup's.
        tracing::info!(
            "taking a full backup: the last backup {id} has an index of version {} ({} digests), this mysnap writes version {} ({})",
            index.version,
            index.hash().name(),
            format::index::INDEX_VERSION,
            format::index::PieceHash::of_version(format::index::INDEX_VERSION)
                .expect("this mysnap reads what it writes")
                .name()
        );
        return Ok(None);
    }
    Ok(Some(format::incremental::Base {
        id,
        snapshot_time: m.snapshot_time(),
        chain: info.chain,
        index,
    }))
}

/// Where the archiver keeps the index of its last encrypted backup of
/// `backup.name` (zstd JSON, as stored before encryption) and what binds
/// it to that backup's manifest (its id, the SHA-256 of the stored
/// encrypted index, the SHA-256 of these bytes).
fn index_cache(cfg: &Config) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = &cfg.backup.state_dir;
    let name = &cfg.backup.name;
    (
        dir.join(format!("index-{name}.json.zst")),
        dir.join(format!("index-{name}.toml")),
    )
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CachedIndex {
    backup_id: common::manifest::BackupId,
    stored_sha256: common::manifest::Sha256Hex,
    plain_sha256: common::manifest::Sha256Hex,
}

/// Keeps `index` of encrypted backup `manifest` (stored as `info`) for the
/// next incremental backup: the bytes, then what binds them, each
/// written atomically (a crash between them leaves a binding that does not
/// match, and a full backup next).
fn cache_index(
    cfg: &Config,
    manifest: &Manifest,
    index: &format::index::Index,
    info: &common::manifest::IndexInfo,
) -> anyhow::Result<()> {
    let (bytes_path, binding) = index_cache(cfg);
    let bytes = index.to_stored()?;
    common::state::write_atomic(&bytes_path, &bytes)?;
    let cached = CachedIndex {
        backup_id: manifest.backup_id.clone(),
        stored_sha256: info.sha256.clone(),
        plain_sha256: common::manifest::Sha256Hex::parse(&common::codec::sha256_hex(&bytes))
            .map_err(anyhow::Error::msg)?,
    };
    common::state::write_atomic(&binding, toml::to_string(&cached)?.as_bytes())
}

/// The index of encrypted base `m` kept by [`cache_index`], if it is that
/// backup's (its id, and the stored index the manifest binds), checked
/// against the manifest like one read from the store.
fn cached_index(
    cfg: &Config,
    m: &Manifest,
    info: &ArchiveInfo,
    ix: &common::manifest::IndexInfo,
) -> anyhow::Result<format::index::Index> {
    let (bytes_path, binding) = index_cache(cfg);
    let text = std::fs::read_to_string(&binding).with_context(|| {
        format!(
            "this host keeps no index of its last encrypted backup ({}; it cannot decrypt the stored one)",
            binding.display()
        )
    })?;
    let cached: CachedIndex = toml::from_str(&text)
        .with_context(|| format!("{} is not an index binding", binding.display()))?;
    anyhow::ensure!(
        cached.backup_id == m.backup_id && cached.stored_sha256 == ix.sha256,
        "{} holds the index of backup {}, not of {} (taken by another host, or this host's state was lost)",
        binding.display(),
        cached.backup_id,
        m.backup_id
    );
    let mut bytes = Vec::new();
    std::fs::File::open(&bytes_path)
        .and_then(|f| {
            f.take(format::index::MAX_INDEX_STORED + 1)
                .read_to_end(&mut bytes)
        })
        .with_context(|| format!("cannot read {}", bytes_path.display()))?;
    anyhow::ensure!(
        common::codec::sha256_hex(&bytes) == cached.plain_sha256.as_str(),
        "{} is not the index {} binds",
        bytes_path.display(),
        binding.display()
    );
    let url = bytes_path.display().to_string();
    Ok(format::index::Index::parse(
        &bytes,
        &url,
        info,
        &m.data.paths,
    )?)
}

/// The index phase: the frame index of the archive stored create-only
/// after the archive, before the manifest (which binds it by size and
/// SHA-256). Without a manifest it is garbage, like the archive.
async fn store_index(
    cfg: &Config,
    manifest: &Manifest,
    store: &dyn store::Store,
    index: &format::index::Index,
    recipients: Option<&common::crypt::Recipients>,
) -> anyhow::Result<common::manifest::IndexInfo> {
    let key = format::keys::index(&manifest.name, &manifest.backup_id, recipients.is_some());
    let bytes = index
        .to_stored()
        .context("compressing the archive's index")?;
    // Encrypted like its archive: an index names every file and its size.
    let mut sealed = common::crypt::Sealer::new(Vec::new(), recipients)?;
    sealed.write_all(&bytes)?;
    let bytes = sealed.finish().context("encrypting the archive's index")?;
    anyhow::ensure!(
        bytes.len() as u64 <= format::index::MAX_INDEX_STORED,
        "the archive's index is {} bytes, more than the {} a restore reads: too many files for an indexed archive; set archive.compression = \"xz\" for this server",
        bytes.len(),
        format::index::MAX_INDEX_STORED
    );
    let sha = common::codec::sha256_hex(&bytes);
    let size = bytes.len() as u64;
    store
        .put_new(&key, bytes.into())
        .await
        .map_err(|e| exists_is_taken(e, cfg, manifest, &store.url(&key)))?;
    Ok(common::manifest::IndexInfo {
        key,
        size,
        sha256: common::manifest::Sha256Hex::parse(&sha).map_err(anyhow::Error::msg)?,
    })
}

/// The manifest phase: its MAC first (`[auth]`: a manifest is never
/// visible without it), then `complete` stored create-only, then read
/// back: the stored manifest must be this one. A PutObject whose answer was lost is
/// retried and refused as existing, though it is ours; a store that
/// ignores If-None-Match (older S3-compatible servers) lets another host's
/// write replace it unnoticed.
async fn store_manifest(
    cfg: &Config,
    complete: &Manifest,
    store: &dyn store::Store,
    auth: Option<&common::crypt::AuthKey>,
) -> anyhow::Result<()> {
    let text = complete.to_toml();
    let manifest_key = complete.key();
    if let Some(auth) = auth {
        let mac_key = format::keys::manifest_mac(&complete.name, &complete.backup_id);
        store
            .put_new(&mac_key, auth.tag(&manifest_key, text.as_bytes()).into())
            .await
            .map_err(|e| exists_is_taken(e, cfg, complete, &store.url(&mac_key)))?;
    }
    let put = store.put_new(&manifest_key, text.clone().into()).await;
    let stored = store.get(&manifest_key, 1 << 20).await;
    match (put, stored) {
        (_, Ok(stored)) if stored == text.as_bytes() => Ok(()),
        (Err(e), _) => Err(exists_is_taken(
            e,
            cfg,
            complete,
            &store.url(&manifest_key),
        )),
        (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(_)) => anyhow::bail!(
            "{} changed right after this run wrote it: another host wrote backup {} under the same backup.name {:?} at the same time, and the store did not refuse the second write (it ignores If-None-Match or does not apply it atomically); give every host its own backup.name and check both backups with `restorer verify`",
            store.url(&manifest_key),
            complete.backup_id,
            cfg.backup.name
        ),
    }
}

/// The last phase: what was stored, logged and returned for the metrics.
fn archived(
    complete: &Manifest,
    stats: &TarStats,
    size: u64,
    cow_used: Option<f64>,
    started: Instant,
) -> Archived {
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        "backup {} complete: {} files, {} of data stored as {} in {secs:.1}s ({}/s)",
        complete.backup_id,
        stats.files,
        bytesize(stats.content_bytes),
        bytesize(size),
        bytesize((stats.content_bytes as f64 / secs.max(1e-3)) as u64)
    );
    Archived {
        backup_id: complete.backup_id.to_string(),
        size,
        unpacked_size: stats.content_bytes,
        files: stats.files,
        lock: complete.lock.clone(),
        cow_used,
    }
}

/// The error of a run whose backup id another host took: `url` exists.
fn taken(cfg: &Config, manifest: &Manifest, url: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "backup {} exists already: {url} is in the store; another host writes backups under the same backup.name {:?}: give every host its own backup.name (this run stored nothing)",
        manifest.backup_id,
        cfg.backup.name
    )
}

/// `err`, or [`taken`] when it is the store refusing to replace `url`.
fn exists_is_taken(
    err: anyhow::Error,
    cfg: &Config,
    manifest: &Manifest,
    url: &str,
) -> anyhow::Error {
    let exists = err
        .chain()
        .any(|c| matches!(c.downcast_ref(), Some(store::StoreError::Exists { .. })));
    if exists {
        taken(cfg, manifest, url)
    } else {
        err
    }
}

/// Where [`stream`] puts the archive: the store, its key, and the
/// recipients it is encrypted to (none: not encrypted).
struct Sink<'a> {
    store: &'a dyn store::Store,
    key: &'a str,
    recipients: Option<&'a common::crypt::Recipients>,
    /// The base of an incremental backup.
    base: Option<&'a format::incremental::Base>,
}

/// tar → codec → encryption → SHA-256 → the store's streamed upload of `key` (recorded
/// in `uploads` while it runs, and never replacing an existing object): a
/// blocking thread produces parts while the store uploads them. Returns the
/// tar statistics and the bytes stored; on any failure nothing is stored.
async fn stream(
    cfg: &Config,
    manifest: &Manifest,
    sink: &Sink<'_>,
    uploads: store::UploadLog,
    progress: &dyn Progress,
    cancel: &Interrupt,
) -> anyhow::Result<(TarStats, u64, Option<format::index::Index>)> {
    let (store, key) = (sink.store, sink.key);
    let snap = &manifest.snapshot.path;
    let estimate = format::write::estimate(snap, &manifest.data)?;
    progress.set_total(estimate);
    let (writer, mut upload) = store.transfer().upload(estimate);
    upload.log = Some(uploads);
    upload.create_only = true;
    tracing::info!(
        "archiving {} (about {}) to {} in parts of {}, {} in flight",
        snap.display(),
        bytesize(estimate),
        store.url(key),
        bytesize(upload.part_size),
        upload.in_flight
    );
    if upload.memory() > cfg.store.memory_limit.as_u64() {
        tracing::warn!(
            "parts of {} (grown so the archive fits in 10,000 parts) hold {} in memory, over store.memory_limit ({})",
            bytesize(upload.part_size),
            bytesize(upload.memory()),
            cfg.store.memory_limit
        );
    }
    let (produced, uploaded) = std::thread::scope(|scope| {
        let producer = scope.spawn(|| produce(cfg, manifest, writer, sink, progress, cancel));
        let uploaded = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(store.put_stream(key, upload))
        });
        let produced = producer
            .join()
            .map_err(|_| anyhow::anyhow!("the archive thread panicked"));
        (produced, uploaded)
    });
    progress.finish();
    let incomplete = || {
        format!(
            "upload of {} failed; the backup is incomplete and not listed",
            store.url(key)
        )
    };
    let ((stats, index), size) = match (produced?, uploaded) {
        (Ok(produced), Ok(size)) => (produced, size),
        // The upload stopped first: its error is the cause.
        (Err(p), Err(u)) if is_broken_pipe(&p) => return Err(u.context(incomplete())),
        (Err(p), _) => return Err(p.context("the backup is incomplete and not listed")),
        (Ok(_), Err(u)) => return Err(u.context(incomplete())),
    };
    anyhow::ensure!(
        size == stats.stored_size,
        "stored {size} bytes but produced {}",
        stats.stored_size
    );
    Ok((stats, size, index))
}

/// Buffers of [`common::codec::HANDOFF_CHUNK`] between the producer's two
/// threads: enough to ride out a stall of either, 4 MiB at most.
const HANDOFF_DEPTH: usize = 4;

/// The producing thread of [`stream`]: tar → codec → encryption (when
/// `recipients`) → SHA-256 → `writer`, the upload's parts; with unencrypted
/// zstd, the codec is the frame writer, and the index is returned too;
/// `archive.read_rate_limit` on the snapshot's reads.
fn produce(
    cfg: &Config,
    manifest: &Manifest,
    writer: store::PartWriter,
    sink: &Sink<'_>,
    progress: &dyn Progress,
    cancel: &Interrupt,
) -> anyhow::Result<(TarStats, Option<format::index::Index>)> {
    let recipients = sink.recipients;
    let (compression, level) = (cfg.archive.compression, cfg.level());
    let threads = common::codec::threads(cfg.archive.threads);
    let read_limit = cfg
        .archive
        .read_rate_limit
        .map(|r| common::reader::RateLimit::new(r.as_u64()));
    let mut enc = common::codec::Hashing::new(writer);
    // Threads: tar and the codec here; encryption on the next; the SHA-256
    // (and the parts) on the last, or with the encryption when there is
    // none: their costs overlap instead of adding up.
    let (front, back) = common::codec::Handoff::new(HANDOFF_DEPTH);
    let (sealed_front, sealed_back) = common::codec::Handoff::new(HANDOFF_DEPTH);
    let (to_hash, to_seal) = match recipients {
        Some(_) => (Some(&mut enc), None),
        None => (None, Some(&mut enc)),
    };
    let (stats, index) = std::thread::scope(
        |scope| -> anyhow::Result<(TarStats, Option<format::index::Index>)> {
            let hashing = scope.spawn(move || -> anyhow::Result<()> {
                if let Some(enc) = to_hash {
                    sealed_back.drain(enc)?;
                }
                Ok(())
            });
            let sealing = scope.spawn(move || -> anyhow::Result<()> {
                match to_seal {
                    Some(enc) => {
                        let mut plain = common::crypt::Sealer::new(enc, None)?;
                        back.drain(&mut plain)?;
                    }
                    None => {
                        let mut sealed = common::crypt::Sealer::new(sealed_front, recipients)
                            .context("starting encryption")?;
                        back.drain(&mut sealed)?;
                        sealed.finish().context("finishing encryption")?.finish()?;
                    }
                }
                Ok(())
            });
            let tarred = (|| -> anyhow::Result<(TarStats, Option<format::index::Index>)> {
                if indexed(cfg) {
                    // Each file's mtime and inode recorded; with a base, unchanged
                    // files left out and a changed file's unchanged chunks referred to.
                    let mut planner = format::incremental::Planner::new(sink.base);
                    // Independent frames, compressed `threads` at a time, and their index.
                    let frames =
                        format::frames::FrameWriter::new(front, level as i32, threads as usize)
                            .reusing(planner.base_chunks());
                    let (frames, mut stats) = format::write_tar_with(
                        &manifest.snapshot.path,
                        &manifest.data,
                        frames,
                        progress,
                        &|| cancel.is_set(),
                        read_limit.as_ref(),
                        &mut |name, md| planner.keep(name, md),
                    )?;
                    let reused = frames.reused_chunks();
                    let (front, own) = frames.finish().context("finishing compression")?;
                    front.finish()?;
                    let written = format::incremental::Totals {
                        files: stats.files,
                        bytes: stats.content_bytes,
                    };
                    let (index, whole) = planner.finish(own, &reused, written)?;
                    stats.files = whole.files;
                    stats.content_bytes = whole.bytes;
                    return Ok((stats, Some(index)));
                }
                let enc_writer = common::codec::Encoder::new(front, compression, level, threads)?;
                let (enc_writer, stats) = format::write_tar(
                    &manifest.snapshot.path,
                    &manifest.data,
                    enc_writer,
                    progress,
                    &|| cancel.is_set(),
                    read_limit.as_ref(),
                )?;
                enc_writer
                    .finish()
                    .context("finishing compression")?
                    .finish()?;
                Ok((stats, None))
            })();
            let sealed = sealing
                .join()
                .map_err(|_| anyhow::anyhow!("the encryption thread panicked"))?;
            // The last stage's error first: the others then stop on a closed hand-off.
            hashing
                .join()
                .map_err(|_| anyhow::anyhow!("the hashing thread panicked"))??;
            match (tarred, sealed) {
                (Ok(produced), Ok(())) => Ok(produced),
                // The later stage stopped first: its error is the cause.
                (Err(t), Err(s)) if is_broken_pipe(&t) => Err(s),
                (Err(t), _) => Err(t),
                (Ok(_), Err(s)) => Err(s),
            }
        },
    )?;
    let (writer, size, sha) = enc.finish();
    writer
        .finish()
        .context("handing the last part to the upload")?;
    Ok((
        TarStats {
            stored_size: size,
            sha256: sha,
            ..stats
        },
        index,
    ))
}

fn bytesize(n: u64) -> String {
    bytesize::ByteSize(n).to_string()
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
