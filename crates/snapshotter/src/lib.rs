//! snapshotter: the locked phase of a backup.
//!
//! Connect, read where the server keeps its data and refuse paths off the
//! volume (before any lock), pick the lock method (`mysql.lock_method`), wait
//! out long queries (FTWRL only), take the lock bounded by `lock_timeout`
//! (session `lock_wait_timeout` plus a watcher that `KILL QUERY`s the
//! attempt), and under it record coordinates and snapshot within
//! `mysql.max_hold` (see `lock.rs`). `UNLOCK TABLES` / `BACKUP STAGE END`
//! runs in every outcome. The manifest goes to `STATE_DIR/<id>/manifest.toml`;
//! a later snapshotter leaves it to its archiver (`remove_stale`).

mod layout;
mod lock;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use common::config::{Config, LockMethod};
use common::dialect;
use common::manifest::{self, Manifest, SnapshotInfo, FORMAT_VERSION, MANIFEST_FILE};
use common::mysql::{query_rows, ConnectInfo};
use common::snapshot::{self, SnapshotBackend};
use common::state::{StateLock, Verdict};

pub use layout::{plan_layout, DataVars};
pub use lock::LockOutcome;

/// Takes one snapshot and returns the path of its manifest.
pub async fn run(cfg: &Config) -> anyhow::Result<PathBuf> {
    let state = StateLock::acquire(&cfg.backup.state_dir)?;
    let backend = snapshot::backend(&cfg.volume, &cfg.backup.state_dir);
    remove_stale(
        &state,
        backend.as_ref(),
        &cfg.backup.name,
        cfg.backup.handoff_grace,
    )?;
    let ready = prepare(cfg).await?;
    let id = next_backup_id(&state).await?;
    let name = snapshot::snapshot_name(&cfg.backup.name, &id);
    let (outcome, server, layout) = snapshot(cfg, ready, backend.as_ref(), &name).await?;
    let m = Manifest {
        format_version: FORMAT_VERSION,
        backup_id: manifest::BackupId::parse(&id).map_err(anyhow::Error::msg)?,
        name: manifest::BackupName::parse(&cfg.backup.name).map_err(anyhow::Error::msg)?,
        created_at: text(
            "the snapshot time",
            &outcome
                .at
                .format(&time::format_description::well_known::Rfc3339)?,
        )?,
        server,
        binlog: outcome.binlog,
        gtid: outcome.gtid,
        source: outcome.source,
        lock: outcome.lock,
        snapshot: SnapshotInfo {
            backend: backend.kind(),
            name: text("the snapshot name", &outcome.snapshot.name)?,
            path: outcome.snapshot.path,
        },
        data: layout,
        archive: None,
    };
    let dir = state.backup_dir(&id);
    let path = dir.join(MANIFEST_FILE);
    let saved = common::state::create_private_dir(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))
        .and_then(|()| m.save(&path));
    if let Err(e) = saved {
        // No manifest, no archiver to remove the snapshot: remove it now.
        if let Err(e2) = backend.remove(&name) {
            tracing::error!("cannot remove snapshot {name}: {e2:#}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    Ok(path)
}

/// What was learnt and opened before the lock.
struct Ready {
    conn: mysql_async::Conn,
    watcher: mysql_async::Conn,
    version: dialect::ServerVersion,
    method: LockMethod,
    vars: DataVars,
    layout: manifest::DataLayout,
    server: manifest::Server,
}

/// Everything that can be checked is checked before the server is locked:
/// the store, both connections, the lock method, where the data is.
async fn prepare(cfg: &Config) -> anyhow::Result<Ready> {
    snapshot::check_mounted(&cfg.volume)?;
    check_free_space(&cfg.volume.mountpoint)?;
    // The archiver reads the key files again; a bad one fails here, before the lock.
    common::crypt::Recipients::from_config(cfg)?;
    if let Some(p) = &cfg.auth.key_file {
        common::crypt::AuthKey::load(p)?;
    }
    let store = common::store::open(&cfg.store).await?;
    store.check().await?;
    let info = ConnectInfo::from_config(&cfg.mysql)?;
    let mut conn = info.connect().await?;
    let watcher = info.connect().await?;
    let version = dialect::server_version(&mut conn).await?;
    let method = version.lock_method(cfg.mysql.lock_method)?;
    let vars = DataVars::query(&mut conn).await?;
    let layout = plan_layout(&vars, &cfg.volume.mountpoint)?;
    if vars.datadir.canonicalize().ok() != cfg.volume.datadir.canonicalize().ok() {
        tracing::warn!(
            "the server's datadir {} differs from volume.datadir {}; backing up the server's",
            vars.datadir.display(),
            cfg.volume.datadir.display()
        );
    }
    let hostname = query_one(&mut conn, "SELECT @@hostname").await?;
    let server = manifest::Server {
        flavor: version.flavor,
        version: text("the server version", &version.text)?,
        hostname: text("@@hostname", &hostname.unwrap_or_default())?,
        server_id: query_one(&mut conn, "SELECT @@server_id")
            .await?
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
    };
    Ok(Ready {
        conn,
        watcher,
        version,
        method,
        vars,
        layout,
        server,
    })
}

/// The least free space the volume must have for a backup to start. Under
/// the lock the server writes a new binary log and a btrfs snapshot needs
/// metadata space; on a full volume the server waits for space to write
/// (commits blocked) and the snapshot fails: refused before, not found out
/// under the lock.
pub const MIN_FREE_BYTES: u64 = 64 << 20;

/// Refuses a volume with less than [`MIN_FREE_BYTES`] free.
fn check_free_space(mountpoint: &std::path::Path) -> anyhow::Result<()> {
    let st = nix::sys::statvfs::statvfs(mountpoint).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the free space of {} (volume.mountpoint): {e}",
            mountpoint.display()
        )
    })?;
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    anyhow::ensure!(
        free >= MIN_FREE_BYTES,
        "the volume at {} (volume.mountpoint) is full: {} MiB free, less than the {} MiB a backup needs (the server writes a new binary log and a snapshot needs metadata space, with commits blocked); free space on it first, nothing was locked or snapshotted",
        mountpoint.display(),
        free >> 20,
        MIN_FREE_BYTES >> 20
    );
    Ok(())
}

/// The locked phase and what follows it at once: long queries waited out
/// (FTWRL), dirty pages written, the snapshot taken under the lock, then
/// made readable (after the unlock: mounting is not the server's wait).
async fn snapshot(
    cfg: &Config,
    mut ready: Ready,
    backend: &dyn SnapshotBackend,
    name: &str,
) -> anyhow::Result<(LockOutcome, manifest::Server, manifest::DataLayout)> {
    if ready.method == LockMethod::Ftwrl {
        // BACKUP STAGE BLOCK_COMMIT does not wait for running statements, only
        // for commits in progress: nothing to wait out.
        let (timeout, wait) = (cfg.mysql.lock_timeout, cfg.mysql.long_query_wait);
        lock::wait_for_long_queries(&mut ready.conn, timeout, wait).await?;
    }
    // Write dirty pages out now, so the snapshot under the lock has little left to flush.
    if let Ok(f) = std::fs::File::open(&cfg.volume.mountpoint) {
        if let Err(e) = nix::unistd::syncfs(&f) {
            tracing::warn!("syncfs of {} failed: {e}", cfg.volume.mountpoint.display());
        }
    }
    let on = lock::ServerInfo {
        version: &ready.version,
        log_bin: ready.vars.log_bin,
    };
    let policy = lock::LockPolicy::new(ready.method, &cfg.mysql);
    let session = lock::LockSession::open(ready.conn, ready.watcher, on, policy).await?;
    let outcome = session.locked_snapshot(backend, name).await?;
    if let Err(e) = backend.make_readable(&outcome.snapshot) {
        if let Err(e2) = backend.remove(name) {
            tracing::error!("cannot remove snapshot {name}: {e2:#}");
        }
        return Err(e);
    }
    tracing::info!(
        "snapshot {} taken: lock ({}) waited {:.3}s, held {:.3}s ({} attempt(s))",
        outcome.snapshot.name,
        outcome.lock.method.as_str(),
        outcome.lock.wait_secs,
        outcome.lock.hold_secs,
        outcome.lock.attempts
    );
    Ok((outcome, ready.server, ready.layout))
}

/// Undoes a run whose manifest could not be handed on (the archiver went
/// away): removes the snapshot and the backup's state directory.
pub fn abandon(cfg: &Config, manifest_path: &std::path::Path) -> anyhow::Result<()> {
    let state = StateLock::acquire(&cfg.backup.state_dir)?;
    let m = Manifest::load(manifest_path)?;
    let backend = snapshot::backend(&cfg.volume, &cfg.backup.state_dir);
    backend
        .remove(&m.snapshot.name)
        .with_context(|| format!("cannot remove snapshot {}", m.snapshot.name))?;
    let dir = state.backup_dir(&m.backup_id);
    std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))
}

/// Removes snapshots and state left by earlier runs that did not finish
/// (only this config's, known by the naming and the state directory), and
/// refuses to start while a backup handed off to its archiver is pending:
/// between the snapshotter's exit and the archiver's start nobody holds the
/// state lock, and that backup is not stale ([`common::state::judge`]).
fn remove_stale(
    state: &StateLock,
    backend: &dyn SnapshotBackend,
    backup_name: &str,
    grace: Duration,
) -> anyhow::Result<()> {
    let mut stale = Vec::new();
    let mut kept = Vec::new();
    for id in state.pending_ids()? {
        match state.verdict(&id, grace)? {
            Verdict::Stale(why) => stale.push((id, why)),
            busy => kept.push((id, busy)),
        }
    }
    let prefix = snapshot::snapshot_prefix(backup_name);
    for name in backend.list(&prefix)? {
        if !snapshot::is_own_snapshot(backup_name, &name)
            || kept
                .iter()
                .any(|(id, _)| name.strip_prefix(&prefix) == Some(id))
        {
            continue;
        }
        tracing::warn!("removing snapshot {name} left by an earlier run that did not finish");
        backend
            .remove(&name)
            .with_context(|| format!("cannot remove stale snapshot {name}"))?;
    }
    for (id, why) in stale {
        let dir = state.backup_dir(&id);
        tracing::warn!(
            "removing state {} of backup {id}, which never completed: {why}",
            dir.display()
        );
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    if let Some((id, verdict)) = kept.first() {
        let manifest = state.backup_dir(id).join(MANIFEST_FILE);
        let what = match verdict {
            Verdict::HandedOff { age } => format!(
                "was handed off {}s ago and its archiver has not started",
                age.as_secs()
            ),
            _ => "is being archived".to_string(),
        };
        anyhow::bail!(
            "backup {id} ({}) {what}: not starting another backup over it; wait for its archiver (or run `archiver --manifest {}`); a backup no archiver claims within backup.handoff_grace ({}s) is removed by the next snapshotter",
            manifest.display(),
            manifest.display(),
            grace.as_secs()
        );
    }
    Ok(())
}

/// The backup id for now; strictly after the previous one of this config, so
/// two backups in the same second cannot share an id.
async fn next_backup_id(state: &StateLock) -> anyhow::Result<String> {
    let last_path = state.dir().join("last-id");
    let last = std::fs::read_to_string(&last_path)
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut id = manifest::backup_id(time::OffsetDateTime::now_utc()).to_string();
    for _ in 0..25 {
        if id > last {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        id = manifest::backup_id(time::OffsetDateTime::now_utc()).to_string();
    }
    anyhow::ensure!(
        id > last,
        "the clock says {id}, but the previous backup of this config was {last} ({}): check the system clock",
        last_path.display()
    );
    common::state::write_atomic(&last_path, id.as_bytes())?;
    Ok(id)
}

/// A value for a manifest's text field.
fn text(what: &str, value: &str) -> anyhow::Result<manifest::Text> {
    manifest::Text::parse(value).map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

async fn query_one(conn: &mut mysql_async::Conn, sql: &str) -> anyhow::Result<Option<String>> {
    Ok(query_rows(conn, sql)
        .await?
        .into_iter()
        .next()
        .and_then(|r| r.into_values().next().flatten()))
}
