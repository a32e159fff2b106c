//! `archiver binlogs`: ships the server's binary logs to the store.
//!
//! Each cycle (every `binlog.rotate_interval`): close the open binary log
//! (`FLUSH BINARY LOGS`) when it holds a transaction, then ship every
//! closed one the store does not have: the file walked for its metadata
//! ([`common::binlog::scan`]), streamed through zstd and SHA-256 into
//! `binlog.zst`, then `meta.toml` written create-only after it. A segment
//! exists exactly when its metadata does: one whose data is stored without
//! metadata (a run killed between the two) is shipped again, its data
//! overwritten. A kill at any instant therefore loses nothing (the file is
//! still on the server) and duplicates nothing (one key per file and
//! creation time).
//!
//! Gaps: a binary log the server purged before it was shipped. Found when
//! the oldest file on the server is numbered past the newest stored one + 1;
//! logged as an error naming the missing files, and the run keeps shipping
//! (`--once` then exits 1).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use common::binlog::{self, SegmentMeta};
use common::config::{Compression, Config};
use common::ids::{BackupName, BinlogFile, Sha256Hex};
use common::keys::{self, SegmentId, SegmentPart};
use common::mysql::{exec, query_rows, ConnectInfo};
use common::signal::Interrupt;
use common::store::{self, Store};

/// zstd level of shipped binary logs: fast, and binary logs compress well.
const ZSTD_LEVEL: u32 = 3;

/// What one cycle did.
#[derive(Debug, Default, Clone)]
pub struct Cycle {
    pub server_id: u64,
    /// Whether it closed the open binary log.
    pub rotated: bool,
    pub shipped: Vec<SegmentMeta>,
    /// Binary log files missing from the archive: purged before shipped.
    pub missing: Vec<String>,
}

/// The binary logs the server has, oldest first: name and size.
struct ServerLogs {
    server_id: u64,
    dir: PathBuf,
    logs: Vec<(BinlogFile, u64)>,
}

/// Runs cycles every `binlog.rotate_interval` until SIGINT/SIGTERM (or,
/// with `once`, one cycle). A failed cycle is logged and retried at the
/// next interval; with `once` it is the run's error.
pub async fn run(cfg: &Config, once: bool, cancel: &Interrupt) -> anyhow::Result<Cycle> {
    let name = BackupName::parse(&cfg.backup.name)
        .map_err(|e| common::error::config_err(format!("backup.name: {e}")))?;
    common::state::create_private_dir(&cfg.backup.state_dir).with_context(|| {
        format!(
            "cannot create backup.state_dir {}",
            cfg.backup.state_dir.display()
        )
    })?;
    let _lock = common::state::lock_file(
        &cfg.backup.state_dir.join("binlogs.lock"),
        "another `archiver binlogs` of this config is running",
    )?;
    // Keys first: a bad key file fails before anything is shipped.
    let keys = Keys {
        recipients: common::crypt::Recipients::from_config(cfg)?,
        auth: common::crypt::AuthKey::from_config(cfg)?,
    };
    let store = store::open(&cfg.store).await?;
    let info = ConnectInfo::from_config(&cfg.mysql)?;
    let mut stored: Option<Stored> = None;
    let mut reported: BTreeSet<String> = BTreeSet::new();
    let mut watch = Watch::resume(cfg);
    loop {
        let started = Instant::now();
        let measured = common::metrics::Started::now();
        let result = cycle(&name, store.as_ref(), &keys, &info, &mut stored, cancel).await;
        watch.record(cfg, measured, &result);
        match result {
            Ok(c) => {
                let new: Vec<&String> = c
                    .missing
                    .iter()
                    .filter(|m| !reported.contains(*m))
                    .collect();
                if !new.is_empty() {
                    tracing::error!(
                        "gap in the binary log archive of server {}: {} purged before it was shipped; a restore to a point after the gap needs a backup taken after it (raise expire_logs_days / binlog_expire_logs_seconds, check that `archiver binlogs` runs)",
                        c.server_id,
                        join(&new)
                    );
                    reported.extend(c.missing.iter().cloned());
                }
                if once {
                    if !c.missing.is_empty() {
                        anyhow::bail!(
                            "the binary log archive of server {} has a gap: {} purged before shipped ({} shipped in this run)",
                            c.server_id,
                            c.missing.join(", "),
                            c.shipped.len()
                        );
                    }
                    return Ok(c);
                }
            }
            Err(e) if once => return Err(e),
            Err(e) => {
                // The server or the store may come back: list again then.
                stored = None;
                tracing::error!("{e:#}; trying again in {:?}", cfg.binlog.rotate_interval);
            }
        }
        let next = started + cfg.binlog.rotate_interval;
        while Instant::now() < next {
            if cancel.is_set() {
                tracing::info!("signal received: stopped");
                return Ok(Cycle::default());
            }
            tokio::time::sleep(Duration::from_millis(100).min(next - Instant::now())).await;
        }
    }
}

/// What the `binlogs` metrics file carries from cycle to cycle (and, read
/// back when the archiver starts, from the run before): the newest event
/// shipped and when a gap was last found.
#[derive(Debug, Default)]
struct Watch {
    newest_event: Option<f64>,
    last_gap: Option<f64>,
}

impl Watch {
    fn resume(cfg: &Config) -> Watch {
        use common::metrics::{Job, Metric, Sample};
        let mut w = Watch::default();
        let Some(dir) = &cfg.metrics.textfile_dir else {
            return w;
        };
        for Sample(m, v) in common::metrics::previous(dir, &cfg.backup.name, Job::Binlogs) {
            match m {
                Metric::BinlogsNewestEvent => w.newest_event = Some(v),
                Metric::BinlogsLastGap => w.last_gap = Some(v),
                _ => {}
            }
        }
        w
    }

    /// Writes the cycle's metrics: a cycle that found a gap counts as
    /// failed (exit 1), as `--once` does.
    fn record(
        &mut self,
        cfg: &Config,
        started: common::metrics::Started,
        r: &anyhow::Result<Cycle>,
    ) {
        use common::error::ExitCode;
        use common::metrics::{Job, Metric, Sample};
        let c = match r {
            Ok(c) => c,
            Err(e) => {
                let code = common::cli::exit_code_of(e);
                return common::metrics::record_samples(cfg, Job::Binlogs, started, code, &[]);
            }
        };
        for m in &c.shipped {
            let t = m.last_event.time().unix_timestamp() as f64;
            self.newest_event = Some(self.newest_event.map_or(t, |n| n.max(t)));
        }
        if !c.missing.is_empty() {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            self.last_gap = Some(now.unwrap_or_default().as_secs() as f64);
        }
        let mut samples = vec![Sample(Metric::BinlogsShipped, c.shipped.len() as f64)];
        samples.extend(
            self.newest_event
                .map(|t| Sample(Metric::BinlogsNewestEvent, t)),
        );
        samples.extend(self.last_gap.map(|t| Sample(Metric::BinlogsLastGap, t)));
        let code = if c.missing.is_empty() {
            ExitCode::Success
        } else {
            ExitCode::Failure
        };
        common::metrics::record_samples(cfg, Job::Binlogs, started, code, &samples);
    }
}

/// What segments are sealed with: `[encryption]` recipients (the data is
/// encrypted to them, as archives are) and the `[auth]` key (the metadata,
/// which holds the data's SHA-256, is MACed before it is stored).
struct Keys {
    recipients: Option<common::crypt::Recipients>,
    auth: Option<common::crypt::AuthKey>,
}

/// The segments stored for one server: whether each has its metadata.
#[derive(Debug, Default)]
struct Stored {
    server_id: u64,
    segments: BTreeMap<SegmentId, bool>,
}

impl Stored {
    async fn list(store: &dyn Store, name: &BackupName, server_id: u64) -> anyhow::Result<Stored> {
        let mut out = Stored {
            server_id,
            ..Stored::default()
        };
        for key in store
            .list(&keys::binlogs_of_server(name, server_id))
            .await?
        {
            match keys::segment_of(name, &key) {
                Some((seg, part)) if seg.server_id == server_id => {
                    let has_meta = out.segments.entry(seg).or_insert(false);
                    *has_meta |= part == SegmentPart::Meta;
                }
                _ => tracing::warn!(
                    "ignoring {}: not a binary log segment's key",
                    store.url(&key)
                ),
            }
        }
        Ok(out)
    }

    /// The newest complete segment: by creation time, then file number.
    fn newest(&self) -> Option<&SegmentId> {
        self.segments
            .iter()
            .filter(|(_, meta)| **meta)
            .map(|(s, _)| s)
            .max_by_key(|s| (s.created.clone(), binlog::file_number(&s.file)))
    }

    fn complete(&self, seg: &SegmentId) -> bool {
        self.segments.get(seg).copied().unwrap_or(false)
    }
}

async fn cycle(
    name: &BackupName,
    store: &dyn Store,
    keys: &Keys,
    info: &ConnectInfo,
    stored: &mut Option<Stored>,
    cancel: &Interrupt,
) -> anyhow::Result<Cycle> {
    let mut conn = info.connect().await?;
    let mut logs = server_logs(&mut conn).await?;
    let mut out = Cycle {
        server_id: logs.server_id,
        ..Cycle::default()
    };
    // Close the open binary log when it holds a transaction.
    if let Some((open, size)) = logs.logs.last() {
        let path = logs.dir.join(open.as_str());
        let held = std::fs::File::open(&path)
            .map_err(anyhow::Error::from)
            .and_then(|f| {
                Ok(binlog::holds_transaction(
                    std::io::BufReader::new(f),
                    *size,
                )?)
            })
            .with_context(|| format!("cannot read the open binary log {}", path.display()))?;
        if held {
            exec(&mut conn, "FLUSH BINARY LOGS").await?;
            out.rotated = true;
            logs = server_logs(&mut conn).await?;
        }
    }
    drop(conn);
    if stored
        .as_ref()
        .is_none_or(|s| s.server_id != logs.server_id)
    {
        *stored = Some(Stored::list(store, name, logs.server_id).await?);
    }
    let stored = stored.as_mut().expect("listed above");
    // A gap: the oldest file on the server is past the newest stored + 1.
    if let (Some(newest), Some((oldest, _))) = (stored.newest(), logs.logs.first()) {
        if let (Some(n), Some(o)) = (
            binlog::file_number(&newest.file),
            binlog::file_number(oldest),
        ) {
            if o > n + 1 && stem(&newest.file) == stem(oldest) {
                let digits = oldest.len() - stem(oldest).len() - 1;
                out.missing = (n + 1..o)
                    .map(|k| format!("{}.{k:0digits$}", stem(oldest)))
                    .collect();
            }
        }
    }
    let closed = logs.logs.len().saturating_sub(1);
    for (file, _) in &logs.logs[..closed] {
        if cancel.is_set() {
            break;
        }
        let path = logs.dir.join(file.as_str());
        let head = match read_head(&path) {
            Ok(h) => h,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!("{} was purged while this cycle ran", path.display());
                continue;
            }
            Err(e) => {
                return Err(
                    anyhow::Error::from(e).context(format!("cannot read {}", path.display()))
                )
            }
        };
        let (created, file_server_id) = binlog::header_of(&head)
            .with_context(|| format!("{} is not a binary log", path.display()))?;
        let seg = SegmentId {
            server_id: u64::from(file_server_id),
            file: file.clone(),
            created: binlog::utc_second(created),
        };
        if seg.server_id != logs.server_id {
            // Written before server_id changed: another server's archive.
            tracing::debug!(
                "{} was written by server {}: skipped",
                path.display(),
                seg.server_id
            );
            continue;
        }
        if stored.complete(&seg) {
            continue;
        }
        let meta = ship(store, name, keys, &path, file, &seg).await?;
        stored.segments.insert(seg, true);
        out.shipped.push(meta);
    }
    Ok(out)
}

/// `SELECT @@server_id, @@log_bin_basename` and `SHOW BINARY LOGS`.
async fn server_logs(conn: &mut mysql_async::Conn) -> anyhow::Result<ServerLogs> {
    let sql =
        "SELECT @@server_id AS server_id, @@log_bin AS log_bin, @@log_bin_basename AS basename";
    let rows = query_rows(conn, sql).await?;
    let row = rows.first().context("SELECT @@server_id returned no row")?;
    let get = |k: &str| row.get(k).cloned().flatten().unwrap_or_default();
    anyhow::ensure!(
        get("log_bin") == "1",
        "the server does not write binary logs (@@log_bin is OFF): set log_bin in its config and restart it"
    );
    let server_id: u64 = get("server_id")
        .parse()
        .with_context(|| format!("@@server_id {:?} is not a number", get("server_id")))?;
    let basename = PathBuf::from(get("basename"));
    anyhow::ensure!(
        basename.is_absolute(),
        "@@log_bin_basename {:?} is not an absolute path",
        basename.display()
    );
    let dir = basename
        .parent()
        .context("@@log_bin_basename has no directory")?
        .to_path_buf();
    let mut logs = Vec::new();
    for row in query_rows(conn, "SHOW BINARY LOGS").await? {
        let file = row.get("Log_name").cloned().flatten().unwrap_or_default();
        let file =
            BinlogFile::parse(&file).map_err(|e| anyhow::anyhow!("SHOW BINARY LOGS: {e}"))?;
        let size = row.get("File_size").cloned().flatten().unwrap_or_default();
        let size: u64 = size
            .parse()
            .with_context(|| format!("SHOW BINARY LOGS: File_size {size:?} of {file}"))?;
        logs.push((file, size));
    }
    Ok(ServerLogs {
        server_id,
        dir,
        logs,
    })
}

fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(23);
    std::fs::File::open(path)?.take(23).read_to_end(&mut head)?;
    Ok(head)
}

/// The name before the number: `binlog` of `binlog.000042`.
fn stem(file: &str) -> &str {
    file.rsplit_once('.').map_or(file, |(s, _)| s)
}

fn join(files: &[&String]) -> String {
    files
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The test hook: pauses between a segment's data and its metadata.
pub const PAUSE_DATA_STORED: &str = "binlog-data-stored";

/// Ships one closed binary log: walk, data (zstd, SHA-256), metadata last.
async fn ship(
    store: &dyn Store,
    name: &BackupName,
    keys: &Keys,
    path: &Path,
    file: &BinlogFile,
    seg: &SegmentId,
) -> anyhow::Result<SegmentMeta> {
    let started = Instant::now();
    let size = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    let walked = {
        let owned = path.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&owned)?;
            Ok::<_, anyhow::Error>(binlog::scan(std::io::BufReader::new(f), size, false)?)
        })
        .await?
        .with_context(|| format!("binary log {} is not whole", path.display()))?
    };
    anyhow::ensure!(
        binlog::utc_second(walked.created) == seg.created,
        "{} changed while it was read",
        path.display()
    );
    let (stored_size, sha) = upload_data(store, &seg.data_key(name), keys, path, size).await?;
    pause_at(PAUSE_DATA_STORED);
    let mut meta = SegmentMeta::of(
        name,
        file,
        &walked,
        stored_size,
        Sha256Hex::parse(&sha).map_err(anyhow::Error::msg)?,
    );
    meta.encryption = keys.recipients.as_ref().map(|r| r.encryption());
    store_meta(store, name, keys, seg, &meta, path).await?;
    let meta_key = seg.meta_key(name);
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        "shipped {} ({} bytes, {} transactions{}) to {} in {secs:.2}s",
        file,
        size,
        meta.transactions,
        match (&meta.first_gtid, &meta.last_gtid) {
            (Some(a), Some(b)) => format!(", {a} to {b}"),
            _ => String::new(),
        },
        store.url(&meta_key)
    );
    Ok(meta)
}

/// The binary log at `path` (`size` bytes) → zstd → encryption (with
/// `[encryption]`) → SHA-256 → the store's streamed upload of `data_key`:
/// the bytes stored and their SHA-256.
async fn upload_data(
    store: &dyn Store,
    data_key: &str,
    keys: &Keys,
    path: &Path,
    size: u64,
) -> anyhow::Result<(u64, String)> {
    let (writer, upload) = store.transfer().upload(size);
    let (produced, uploaded) = std::thread::scope(|scope| {
        let producer = scope.spawn(|| -> anyhow::Result<(u64, String)> {
            let mut src = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?
                .take(size);
            let mut hashing = common::codec::Hashing::new(writer);
            let sealed = common::crypt::Sealer::new(&mut hashing, keys.recipients.as_ref())
                .context("starting encryption")?;
            let mut enc = common::codec::Encoder::new(sealed, Compression::Zstd, ZSTD_LEVEL, 1)?;
            let copied = std::io::copy(&mut src, &mut enc)?;
            anyhow::ensure!(
                copied == size,
                "{} shrank while it was read",
                path.display()
            );
            enc.finish()
                .context("finishing compression")?
                .finish()
                .context("finishing encryption")?;
            let (writer, stored, sha) = hashing.finish();
            writer
                .finish()
                .context("handing the last part to the upload")?;
            Ok((stored, sha))
        });
        let uploaded = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(store.put_stream(data_key, upload))
        });
        let produced = producer
            .join()
            .map_err(|_| anyhow::anyhow!("the compression thread panicked"));
        (produced, uploaded)
    });
    match (produced?, uploaded) {
        (Ok(p), Ok(n)) if p.0 == n => Ok(p),
        (Ok(p), Ok(n)) => anyhow::bail!(
            "stored {n} bytes of {} but produced {}",
            store.url(data_key),
            p.0
        ),
        (_, Err(u)) => Err(u.context(format!(
            "upload of {} failed; it is shipped again on the next cycle",
            store.url(data_key)
        ))),
        (Err(p), Ok(_)) => Err(p),
    }
}

/// The metadata of `seg` stored after its data: its MAC first (with
/// `[auth]`), then the metadata, create-only; metadata already there from
/// an attempt whose answer was lost must describe the same data.
async fn store_meta(
    store: &dyn Store,
    name: &BackupName,
    keys: &Keys,
    seg: &SegmentId,
    meta: &SegmentMeta,
    path: &Path,
) -> anyhow::Result<()> {
    let meta_key = seg.meta_key(name);
    // The MAC before the metadata: metadata is never visible without it.
    // (Replaced freely: without its metadata, a MAC stands for nothing.)
    if let Some(auth) = &keys.auth {
        let text = meta.to_toml();
        store
            .put(
                &seg.mac_key(name),
                auth.tag(&meta_key, text.as_bytes()).into(),
            )
            .await?;
    }
    match store.put_new(&meta_key, meta.to_toml().into()).await {
        Ok(()) => {}
        Err(e)
            if e.chain()
                .any(|c| matches!(c.downcast_ref(), Some(store::StoreError::Exists { .. }))) =>
        {
            // Ours, from an attempt whose answer was lost (one key per file
            // and creation time): the stored one must say the same.
            let text = store.get(&meta_key, binlog::MAX_META_BYTES).await?;
            let text = String::from_utf8_lossy(&text);
            let theirs = SegmentMeta::parse_stored(&text, &meta_key, &store.url(&meta_key), name)?;
            anyhow::ensure!(
                theirs.sha256 == meta.sha256,
                "{} exists and describes other data than {}: two archivers of server {} with backup.name {:?}? give each its own server_id",
                store.url(&meta_key),
                path.display(),
                seg.server_id,
                name.as_str()
            );
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// `MYSNAP_TEST_PAUSE_AT=<point>`: says `paused at <point>` on stderr and
/// waits until the process is killed. Only the tests set it.
fn pause_at(point: &str) {
    if std::env::var_os("MYSNAP_TEST_PAUSE_AT").is_some_and(|v| v == point) {
        eprintln!("paused at {point}");
        tokio::task::block_in_place(|| loop {
            std::thread::sleep(Duration::from_secs(1));
        });
    }
}
