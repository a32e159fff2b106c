//! restorer: lists, verifies and restores backups, and provisions replicas.
//!
//! Restore streams the archive (parallel ranged GETs → SHA-256 → decompress →
//! safe untar) into a staging directory beside the data directory while the
//! server keeps running; only then it stops the server, keeps the old data
//! directory as `<datadir>.old-<time>`, moves the new one in and starts the
//! server. Any failure before the swap leaves the live data untouched.
//! The restorer never writes to the store.

#[cfg(test)]
mod forged;
pub mod replica;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use common::archive::tree::{FileKind, SafeDir};
use common::archive::{keys, ArchiveError, Streamed, Target};
use common::cmd;
use common::config::Config;
use common::dialect::{self, ServerVersion};
use common::error::config_err;
use common::manifest::{
    ArchiveInfo, BackupId, BackupName, Manifest, ManifestError, MAX_MANIFEST_BYTES,
};
use common::mysql::ConnectInfo;
use common::progress::Progress;
use common::store::{self, Download, Store};
use serde::Serialize;

pub use replica::ReplicaOf;

/// How far in the future a backup id may lie (clock skew between hosts);
/// a later one is refused, so a forged id cannot stay `latest` forever.
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(24 * 3600);

/// The complete backups of `backup.name`, newest first. A manifest that
/// does not parse is skipped with a warning naming its key.
pub async fn list(cfg: &Config) -> anyhow::Result<Vec<Manifest>> {
    let store = store::open(&cfg.store).await?;
    list_in(store.as_ref(), &backup_name(cfg)?).await
}

fn backup_name(cfg: &Config) -> anyhow::Result<BackupName> {
    BackupName::parse(&cfg.backup.name).map_err(|e| config_err(format!("backup.name: {e}")))
}

async fn list_in(store: &dyn Store, name: &BackupName) -> anyhow::Result<Vec<Manifest>> {
    let keys = store.list(&keys::backups_of(name)).await?;
    let mut out = Vec::new();
    for key in &keys {
        let Some(id) = keys::manifest_id(name, key) else {
            continue;
        };
        match read_manifest(store, name, &id).await {
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

/// Reads and parses the manifest of backup `id`: at most
/// `MAX_MANIFEST_BYTES`, every field in its grammar, stored under its own key,
/// and not from the future.
async fn read_manifest(
    store: &dyn Store,
    name: &BackupName,
    id: &BackupId,
) -> anyhow::Result<Manifest> {
    let key = keys::manifest(name, id);
    let url = store.url(&key);
    let bad = |why: String| -> anyhow::Error {
        ManifestError {
            origin: url.clone(),
            why,
        }
        .into()
    };
    match store.size(&key).await? {
        None => anyhow::bail!(
            "backup {id} of {name:?} does not exist or is incomplete (no {url}): see restorer list"
        ),
        Some(n) if n > MAX_MANIFEST_BYTES => {
            return Err(bad(format!(
                "is {n} bytes, larger than any manifest ({MAX_MANIFEST_BYTES})"
            )))
        }
        Some(_) => {}
    }
    let bytes = store.get(&key, MAX_MANIFEST_BYTES).await?;
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("is not UTF-8 text".into()))?;
    let m = Manifest::parse_stored(text, &key, &url)?;
    let skew = time::Duration::try_from(MAX_CLOCK_SKEW).expect("a day fits");
    if m.backup_id.time() > time::OffsetDateTime::now_utc() + skew {
        return Err(bad(format!(
            "names a time more than a day in the future ({}): a wrong clock or a forgery",
            m.backup_id
        )));
    }
    Ok(m)
}

/// The manifest of backup `id` (or the newest complete one for `latest`).
async fn resolve(
    store: &dyn Store,
    cfg: &Config,
    id: &str,
) -> anyhow::Result<(Manifest, ArchiveInfo)> {
    let name = backup_name(cfg)?;
    let m = if id == "latest" {
        list_in(store, &name)
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
        read_manifest(store, &name, &id).await?
    };
    let info = m.archive.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "backup {} has no archive in its manifest: it never completed",
            m.backup_id
        )
    })?;
    Ok((m, info))
}

/// Streams the archive of `m` into `target`: the one code path of verify and restore.
async fn stream_archive(
    store: Arc<dyn Store>,
    m: &Manifest,
    info: &ArchiveInfo,
    target: Target<'_>,
    progress: &dyn Progress,
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
    let failed = Arc::new(AtomicBool::new(false));
    let download = Download::start(store, info.key.clone(), info.size, failed.clone());
    let r = tokio::task::block_in_place(|| {
        common::archive::stream(
            download,
            &url,
            info,
            &m.data.paths,
            target,
            progress,
            &failed,
        )
    });
    progress.finish();
    Ok(r?)
}

/// Unpacks backup `m` into the empty directory `staging` and prepares the
/// copy for this server (clone hygiene, binary log index pointed at
/// `volume.datadir` and `volume.mountpoint`, one syncfs): everything restore
/// does before it touches the server. Nothing outside `staging` is written.
pub async fn stage(
    cfg: &Config,
    store: Arc<dyn Store>,
    m: &Manifest,
    info: &ArchiveInfo,
    staging: &Path,
    owner: Option<(u32, u32)>,
    progress: &dyn Progress,
) -> anyhow::Result<Streamed> {
    let s = stream_archive(
        store.clone(),
        m,
        info,
        Target::Dir {
            root: staging,
            owner,
        },
        progress,
    )
    .await?;
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
    let mut moves = vec![(
        m.data.volume_root.join(&m.data.datadir),
        cfg.volume.datadir.clone(),
    )];
    for p in m.data.paths.iter().filter(|p| **p != m.data.datadir) {
        moves.push((m.data.volume_root.join(p), cfg.volume.mountpoint.join(p)));
    }
    for dir in &roots {
        rewrite_binlog_indexes(dir, &moves)?;
    }
    // One flush of the whole filesystem instead of an fsync per file.
    staged.syncfs().context("syncfs")?;
    Ok(s)
}

/// Reads the whole archive as restore would, writing nothing.
pub async fn verify(
    cfg: &Config,
    id: &str,
    progress: &dyn Progress,
) -> anyhow::Result<(Manifest, Streamed)> {
    let store: Arc<dyn Store> = store::open(&cfg.store).await?.into();
    let (m, info) = resolve(store.as_ref(), cfg, id).await?;
    let s = stream_archive(store, &m, &info, Target::Discard, progress).await?;
    Ok((m, s))
}

/// How to restore.
#[derive(Clone, Default)]
pub struct RestoreOpts {
    pub id: String,
    pub replica_of: Option<ReplicaOf>,
    /// Use the recorded source's coordinates (a backup taken on a replica).
    pub replica_of_source: bool,
    /// Stop the server before unpacking (the seed's order).
    pub stop_first: bool,
    /// Restore even when the server's flavor or major version differs.
    pub ignore_version: bool,
    /// Longest wait for the server to answer after start.
    pub start_timeout: Duration,
}

/// What a restore did (printed as JSON on stdout).
#[derive(Debug, Serialize)]
pub struct Report {
    pub backup_id: String,
    pub datadir: PathBuf,
    pub old_datadir: Option<PathBuf>,
    pub bytes: u64,
    pub unpack_secs: f64,
    /// From stop_command to the server answering.
    pub downtime_secs: f64,
    pub total_secs: f64,
    pub replication_lag_secs: Option<u64>,
}

/// The installed server's version: the running server's answer, else the binary's.
async fn installed_version(cfg: &Config) -> Option<ServerVersion> {
    if let Ok(info) = ConnectInfo::from_config(&cfg.mysql) {
        if let Ok(Ok(mut conn)) = tokio::time::timeout(Duration::from_secs(5), info.connect()).await
        {
            let version = dialect::server_version(&mut conn).await;
            let _ = conn.disconnect().await;
            if let Ok(v) = version {
                return Some(v);
            }
        }
    }
    for prog in ["mariadbd", "mysqld"] {
        if let Ok(out) = cmd::run(&[prog, "--version"]) {
            if let Some(v) = ServerVersion::from_version_output(&out) {
                return Some(v);
            }
        }
    }
    None
}

fn check_version(m: &Manifest, installed: Option<&ServerVersion>) -> anyhow::Result<()> {
    let backup = ServerVersion::parse(&m.server.version);
    let Some(v) = installed else {
        tracing::warn!(
            "cannot tell the installed server's version; restoring a {} backup",
            m.server.version
        );
        return Ok(());
    };
    if v.flavor != backup.flavor || (v.major, v.minor) != (backup.major, backup.minor) {
        return Err(config_err(format!(
            "backup {} is of {} but the installed server is {}: a data directory only works on the same flavor and major version (pass --ignore-version to restore anyway)",
            m.backup_id, m.server.version, v.text
        )));
    }
    Ok(())
}

fn check_space(dir: &Path, info: &ArchiveInfo) -> anyhow::Result<()> {
    let st = nix::sys::statvfs::statvfs(dir)
        .with_context(|| format!("cannot stat the filesystem of {}", dir.display()))?;
    let avail = st.blocks_available() as u64 * st.fragment_size() as u64;
    let need = info.unpacked_size + info.unpacked_size / 20 + (64 << 20);
    if avail < need {
        anyhow::bail!(
            "not enough room in {}: the backup unpacks to {} and needs about {}, but only {} are free; nothing was changed",
            dir.display(),
            bytesize::ByteSize(info.unpacked_size),
            bytesize::ByteSize(need),
            bytesize::ByteSize(avail)
        );
    }
    Ok(())
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

/// Moves each staged directory into place, keeping what was there as
/// `<name>.old-<stamp>`; on failure, undoes every step it made.
fn swap_in(
    moves: &[(PathBuf, PathBuf)],
    stamp: &str,
    old_already_moved: bool,
) -> anyhow::Result<()> {
    let mut done: Vec<(PathBuf, PathBuf)> = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for (i, (from, to)) in moves.iter().enumerate() {
            let name = to
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let old = to.with_file_name(format!("{name}.old-{stamp}"));
            // The data directory was moved away already with --stop-first.
            if to.exists() && !(i == 0 && old_already_moved) {
                std::fs::rename(to, &old).with_context(|| {
                    format!("cannot move {} to {}", to.display(), old.display())
                })?;
                done.push((to.clone(), old));
            }
            if let Some(dir) = to.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::rename(from, to)
                .with_context(|| format!("cannot move {} to {}", from.display(), to.display()))?;
            done.push((from.clone(), to.clone()));
        }
        Ok(())
    })();
    if result.is_err() {
        for (from, to) in done.iter().rev() {
            if let Err(e) = std::fs::rename(to, from) {
                tracing::error!(
                    "cannot move {} back to {}: {e}",
                    to.display(),
                    from.display()
                );
            }
        }
    }
    result
}

/// Removes the staging directory unless disarmed.
struct Staging(Option<PathBuf>);

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            if let Err(e) = std::fs::remove_dir_all(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::error!("cannot remove staging directory {}: {e}", p.display());
                }
            }
        }
    }
}

async fn wait_ready(cfg: &Config, timeout: Duration) -> anyhow::Result<()> {
    let info = ConnectInfo::from_config(&cfg.mysql)?;
    let start = Instant::now();
    loop {
        match info.connect().await {
            Ok(c) => {
                let _ = c.disconnect().await;
                return Ok(());
            }
            Err(e) if start.elapsed() > timeout => {
                return Err(e.context(format!(
                    "the server did not answer within {timeout:?} after start"
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn run_service(cfg_key: &str, argv: &[String]) -> anyhow::Result<()> {
    if argv.is_empty() {
        return Err(config_err(format!(
            "{cfg_key} is empty: restore needs it to stop and start the server"
        )));
    }
    cmd::run(argv).with_context(|| format!("{cfg_key} failed"))?;
    Ok(())
}

/// Restores backup `opts.id` into `volume.datadir`.
pub async fn restore(
    cfg: &Config,
    opts: &RestoreOpts,
    progress: &dyn Progress,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    if cfg.mysql.stop_command.is_empty() || cfg.mysql.start_command.is_empty() {
        return Err(config_err(
            "mysql.stop_command and mysql.start_command are required to restore (argv lists, e.g. [\"systemctl\", \"stop\", \"mariadb\"])",
        ));
    }
    let store: Arc<dyn Store> = store::open(&cfg.store).await?.into();
    let (m, info) = resolve(store.as_ref(), cfg, &opts.id).await?;
    let start_at = match &opts.replica_of {
        Some(_) => Some(replica::start_at(&m, opts.replica_of_source)?),
        None => None,
    };
    let datadir = cfg.volume.datadir.clone();
    let parent = datadir
        .parent()
        .ok_or_else(|| {
            config_err(format!(
                "volume.datadir {} has no parent directory",
                datadir.display()
            ))
        })?
        .to_path_buf();
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    if !opts.ignore_version {
        check_version(&m, installed_version(cfg).await.as_ref())?;
    }
    check_space(&parent, &info)?;
    if let (Ok(d), Ok(p)) = (std::fs::metadata(&datadir), std::fs::metadata(&parent)) {
        use std::os::unix::fs::MetadataExt;
        if d.dev() != p.dev() {
            return Err(config_err(format!(
                "volume.datadir {} is a mount point, which restore cannot rename: use a directory below the mount point (volprep lays out <mountpoint>/mysql)",
                datadir.display()
            )));
        }
    }
    let owner = cfg.volume.owner_ids()?;
    let stamp = common::manifest::backup_id(time::OffsetDateTime::now_utc());
    let name = datadir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let old = datadir.with_file_name(format!("{name}.old-{stamp}"));
    let staging_path = parent.join(format!(".{name}.mysnap-restore-{}", m.backup_id));
    if staging_path.exists() {
        tracing::warn!(
            "removing {} left by an earlier restore that did not finish",
            staging_path.display()
        );
        std::fs::remove_dir_all(&staging_path)?;
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging_path)
            .with_context(|| format!("cannot create {}", staging_path.display()))?;
    }
    let staging = Staging(Some(staging_path.clone()));

    let mut down_since = None;
    let mut moved_old = false;
    if opts.stop_first {
        run_service("mysql.stop_command", &cfg.mysql.stop_command)?;
        down_since = Some(Instant::now());
        if datadir.exists() {
            std::fs::rename(&datadir, &old).with_context(|| {
                format!("cannot move {} to {}", datadir.display(), old.display())
            })?;
            moved_old = true;
        }
    }
    tracing::info!(
        "restoring backup {} ({}) into {}",
        m.backup_id,
        bytesize::ByteSize(info.size),
        staging_path.display()
    );
    let t = Instant::now();
    let unpacked = stage(
        cfg,
        store.clone(),
        &m,
        &info,
        &staging_path,
        owner,
        progress,
    )
    .await;
    let streamed = match unpacked {
        Ok(s) => s,
        Err(e) => {
            drop(staging);
            if moved_old {
                // --stop-first: put the old data back and start the server again.
                std::fs::rename(&old, &datadir).with_context(|| {
                    format!(
                        "cannot move {} back to {}",
                        old.display(),
                        datadir.display()
                    )
                })?;
                if let Err(e2) = run_service("mysql.start_command", &cfg.mysql.start_command) {
                    tracing::error!("cannot start the server again: {e2:#}");
                }
            }
            return Err(e.context("restore failed; the data directory is unchanged"));
        }
    };
    let unpack_secs = t.elapsed().as_secs_f64();

    // The swap: the only moment the server is down (unless --stop-first).
    if !opts.stop_first {
        run_service("mysql.stop_command", &cfg.mysql.stop_command)
            .map_err(|e| e.context("nothing was changed; the server was not stopped"))?;
        down_since = Some(Instant::now());
    }
    let mut moves = vec![(staging_path.join(&m.data.datadir), datadir.clone())];
    for p in m.data.paths.iter().filter(|p| **p != m.data.datadir) {
        moves.push((staging_path.join(p), cfg.volume.mountpoint.join(p)));
    }
    if let Err(e) = swap_in(&moves, &stamp, opts.stop_first) {
        // Everything was put back: start the server on its old data.
        let started = run_service("mysql.start_command", &cfg.mysql.start_command);
        let state = match started {
            Ok(()) => "the old data directory is back in place and the server was started again",
            Err(_) => "the old data directory is back in place, but the server did not start: start it by hand",
        };
        return Err(e.context(format!("restore failed during the swap; {state}")));
    }
    moved_old = moved_old || old.exists();
    drop(staging);
    let rollback = || {
        if moved_old {
            format!(
                "the previous data directory is intact at {old}: to roll back, stop the server, `mv {new} {new}.failed && mv {old} {new}`, and start it",
                old = old.display(),
                new = datadir.display()
            )
        } else {
            "there was no previous data directory".to_string()
        }
    };
    run_service("mysql.start_command", &cfg.mysql.start_command)
        .map_err(|e| e.context(rollback()))?;
    wait_ready(cfg, opts.start_timeout)
        .await
        .map_err(|e| e.context(rollback()))?;
    let downtime = down_since.map_or(0.0, |d| d.elapsed().as_secs_f64());
    tracing::info!(
        "backup {} restored; the server answers (down for {downtime:.1}s)",
        m.backup_id
    );

    let mut lag = None;
    if let (Some(to), Some(at)) = (&opts.replica_of, &start_at) {
        lag = start_replication(cfg, to, at).await?;
    }
    Ok(Report {
        backup_id: m.backup_id.to_string(),
        datadir,
        old_datadir: moved_old.then_some(old),
        bytes: streamed.file_bytes,
        unpack_secs,
        downtime_secs: downtime,
        total_secs: started.elapsed().as_secs_f64(),
        replication_lag_secs: lag,
    })
}

/// Points the restored server at its source and waits until both replication
/// threads run; returns the lag it reports.
async fn start_replication(
    cfg: &Config,
    to: &ReplicaOf,
    at: &replica::StartAt,
) -> anyhow::Result<Option<u64>> {
    let mut conn = ConnectInfo::from_config(&cfg.mysql)?.connect().await?;
    let version = dialect::server_version(&mut conn).await?;
    // Every string shown (statements, server errors, replica status errors)
    // passes through it: the password in any form it can take is `***`.
    let redactor = common::mysql::Redactor::new(&to.password);
    let redact = |s: String| redactor.redact(&s);
    for st in replica::statements(&version, to, at)? {
        use mysql_async::prelude::Queryable;
        // A prepared statement: the server takes exactly one statement, so
        // nothing in a value can append another (mysql_async announces
        // CLIENT_MULTI_STATEMENTS on every connection).
        let params = if st.params.is_empty() {
            mysql_async::Params::Empty
        } else {
            mysql_async::Params::Positional(st.params.iter().map(|p| p.as_str().into()).collect())
        };
        tracing::debug!("replication: {}", redact(st.shown.clone()));
        conn.exec_drop(st.sql.as_str(), params).await.map_err(|e| {
            anyhow::anyhow!(
                "setting up replication: SQL `{}` failed: {}",
                redact(st.shown.clone()),
                redact(e.to_string())
            )
        })?;
    }
    tracing::info!(
        "replicating from {}:{} as {} starting at {:?}",
        to.host,
        to.port,
        to.user,
        at
    );
    let start = Instant::now();
    loop {
        let r = dialect::replica_status(&mut conn, &version).await?;
        if let Some(r) = r.as_ref().filter(|r| r.running()) {
            let lag = r.seconds_behind;
            tracing::info!(
                "replication runs; lag {} s",
                lag.map_or("unknown".into(), |l: u64| l.to_string())
            );
            let _ = conn.disconnect().await;
            return Ok(lag);
        }
        let r = r.unwrap_or_default();
        // A reported error that persists is not going to fix itself.
        let stuck = (!r.last_io_error.is_empty() || !r.last_sql_error.is_empty())
            && start.elapsed() > Duration::from_secs(10);
        if stuck || start.elapsed() > Duration::from_secs(60) {
            anyhow::bail!(
                "replication did not start (IO thread: {}, SQL thread: {}; {}{}): the data is restored and the server runs; fix the cause and run {}",
                r.io_running,
                r.sql_running,
                redact(r.last_io_error),
                redact(r.last_sql_error),
                version.replication_sql().start
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
