//! The locked phase: FLUSH TABLES WITH READ LOCK or BACKUP STAGE, bounded
//! and retried, and what happens under it. The server is never left locked:
//! UNLOCK TABLES (or BACKUP STAGE END) runs in every outcome, and a broken
//! connection releases the lock server-side.
//!
//! `ftwrl`: FLUSH NO_WRITE_TO_BINLOG TABLES (closes tables first, so the
//! locked flush is short), then FLUSH TABLES WITH READ LOCK, which waits for
//! every running write statement while blocking all other writes. Under it:
//! FLUSH BINARY LOGS, FLUSH ENGINE LOGS, coordinates, snapshot.
//!
//! `backup_stage` (MariaDB 10.4.1+): FLUSH BINARY LOGS before the lock (the
//! position need not be at a file start), then BACKUP STAGE START (one backup
//! at a time), FLUSH (non-transactional tables not in use are flushed and
//! closed), BLOCK_DDL (waits for DDL and MyISAM writes in progress; from here
//! they wait), BLOCK_COMMIT (waits only for commits in progress; from here no
//! transaction commits and nothing is written to the binary log; running
//! InnoDB and Aria statements go on). Under BLOCK_COMMIT: FLUSH ENGINE LOGS,
//! coordinates, snapshot; then BACKUP STAGE END. InnoDB and Aria recover the
//! snapshot to exactly the commits in its binary log, which ends at the
//! recorded position; MyISAM tables were closed and are not written to.
//!
//! Lock *wait* is the time until the lock that blocks commits is granted
//! (FLUSH TABLES WITH READ LOCK; BACKUP STAGE START to BLOCK_COMMIT). Lock
//! *hold* is the time commits are blocked: from that grant to UNLOCK TABLES or
//! BACKUP STAGE END returning. (With `backup_stage`, MyISAM writes and DDL
//! already wait from BLOCK_DDL on, which is inside the wait.)

use std::time::{Duration, Instant};

use common::config::{LockMethod, MysqlConfig};
use common::dialect::{self, ServerVersion};
use common::error::Error;
use common::manifest::{Binlog, BinlogFile, GtidSet, LockTimes, SourceCoordinates};
use common::mysql::{exec, query_rows};
use common::snapshot::{Snapshot, SnapshotBackend};
use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use rand::Rng;
use tokio::sync::oneshot;

/// What the locked phase produced.
#[derive(Debug)]
pub struct LockOutcome {
    pub snapshot: Snapshot,
    pub lock: LockTimes,
    pub binlog: Option<Binlog>,
    pub gtid: Option<GtidSet>,
    pub source: Option<SourceCoordinates>,
    /// When the snapshot was taken.
    pub at: time::OffsetDateTime,
}

/// Waits (at most `max_wait`) while a statement has been running longer than
/// `lock_timeout`: a lock attempt now would only stall writers behind it.
pub async fn wait_for_long_queries(
    conn: &mut Conn,
    lock_timeout: Duration,
    max_wait: Duration,
) -> anyhow::Result<()> {
    let sql = format!(
        "SELECT ID, USER, TIME FROM information_schema.PROCESSLIST \
         WHERE COMMAND = 'Query' AND ID <> CONNECTION_ID() AND TIME >= {} ORDER BY TIME DESC LIMIT 1",
        lock_timeout.as_secs().max(1)
    );
    let start = Instant::now();
    loop {
        let rows = query_rows(conn, &sql).await?;
        let Some(row) = rows.first() else {
            return Ok(());
        };
        let describe = || {
            format!(
                "statement id {} of user {} has been running {}s",
                row.get("ID").cloned().flatten().unwrap_or_default(),
                row.get("USER").cloned().flatten().unwrap_or_default(),
                row.get("TIME").cloned().flatten().unwrap_or_default()
            )
        };
        if start.elapsed() >= max_wait {
            tracing::warn!(
                "{}; trying the lock anyway after waiting {:?}",
                describe(),
                max_wait
            );
            return Ok(());
        }
        if start.elapsed() < Duration::from_secs(1) {
            tracing::info!(
                "{}; waiting up to {:?} (mysql.long_query_wait) before locking",
                describe(),
                max_wait
            );
        }
        tokio::time::sleep(Duration::from_secs(1).min(max_wait)).await;
    }
}

/// The server error code in an error chain, if any.
fn server_code(e: &anyhow::Error) -> Option<u16> {
    e.chain()
        .find_map(|c| match c.downcast_ref::<mysql_async::Error>() {
            Some(mysql_async::Error::Server(s)) => Some(s.code),
            _ => None,
        })
}

/// Lock wait timeout (1205) or the watcher's KILL QUERY (1317, 1927).
fn is_lock_timeout(e: &anyhow::Error) -> bool {
    matches!(server_code(e), Some(1205 | 1317 | 1927))
}

/// Kills the query of connection `target` if `cancel` does not fire within
/// `after`. Returns its connection and whether it killed.
async fn watch(
    mut w: Conn,
    target: u32,
    after: Duration,
    cancel: oneshot::Receiver<()>,
) -> (Conn, bool) {
    tokio::select! {
        _ = cancel => (w, false),
        () = tokio::time::sleep(after) => {
            if let Err(e) = w.query_drop(format!("KILL QUERY {target}")).await {
                tracing::warn!("KILL QUERY {target} failed: {e}");
            }
            (w, true)
        }
    }
}

/// Runs the statements of one lock attempt; `wait` is set to how long the
/// lock that blocks commits took to be granted.
async fn attempt(conn: &mut Conn, method: LockMethod, wait: &mut Duration) -> anyhow::Result<()> {
    let t = match method {
        LockMethod::BackupStage => {
            let t = Instant::now();
            for stage in ["START", "FLUSH", "BLOCK_DDL", "BLOCK_COMMIT"] {
                exec(conn, &format!("BACKUP STAGE {stage}")).await?;
            }
            t
        }
        _ => {
            exec(conn, "FLUSH NO_WRITE_TO_BINLOG TABLES").await?;
            let t = Instant::now();
            exec(conn, "FLUSH TABLES WITH READ LOCK").await?;
            t
        }
    };
    *wait = t.elapsed();
    Ok(())
}

/// The statement that releases what `method` holds, in whatever stage it got to.
fn release_sql(method: LockMethod) -> &'static str {
    match method {
        LockMethod::BackupStage => "BACKUP STAGE END",
        _ => "UNLOCK TABLES",
    }
}

/// Releases what `method` holds. BACKUP STAGE END without a stage (START
/// itself failed) is error 4146: nothing is held, which is the point.
async fn release(conn: &mut Conn, method: LockMethod) -> anyhow::Result<()> {
    match exec(conn, release_sql(method)).await {
        Err(e) if method == LockMethod::BackupStage && server_code(&e) == Some(4146) => Ok(()),
        r => r,
    }
}

/// What `method` takes, for messages.
fn lock_name(method: LockMethod) -> &'static str {
    match method {
        LockMethod::BackupStage => "BACKUP STAGE (START to BLOCK_COMMIT)",
        _ => "FLUSH TABLES WITH READ LOCK",
    }
}

/// Takes the lock with `method` (`ftwrl` or `backup_stage`, already
/// resolved; bounded, retried), runs `create` under it with the coordinates
/// recorded, and releases it.
#[allow(clippy::too_many_arguments)]
pub async fn locked_snapshot(
    mut conn: Conn,
    mut watcher: Conn,
    version: &ServerVersion,
    log_bin: bool,
    method: LockMethod,
    policy: &MysqlConfig,
    backend: &dyn SnapshotBackend,
    name: &str,
) -> anyhow::Result<LockOutcome> {
    let (timeout, retries) = (policy.lock_timeout, policy.lock_retries);
    let what = lock_name(method);
    let secs = timeout.as_secs_f64().ceil().max(1.0) as u64;
    exec(
        &mut conn,
        &format!("SET SESSION lock_wait_timeout = {secs}"),
    )
    .await?;
    let stage = method == LockMethod::BackupStage;
    if stage && log_bin {
        // Not under BLOCK_COMMIT, where it would lengthen the hold: the
        // coordinates read under it need not be at a file start.
        exec(&mut conn, "FLUSH BINARY LOGS").await?;
    }
    let conn_id = conn.id();
    let attempts = retries + 1;
    let mut granted = None;
    for attempt_no in 1..=attempts {
        let (cancel_tx, cancel_rx) = oneshot::channel();
        // One watcher bounds the whole attempt, every stage of it.
        let w = tokio::spawn(watch(
            watcher,
            conn_id,
            timeout + Duration::from_millis(250),
            cancel_rx,
        ));
        let mut wait = Duration::ZERO;
        let r = attempt(&mut conn, method, &mut wait).await;
        let _ = cancel_tx.send(());
        let (w, killed) = w.await?;
        watcher = w;
        match r {
            Ok(()) => {
                granted = Some((attempt_no, wait));
                break;
            }
            Err(e) if is_lock_timeout(&e) || killed => {
                // Make sure nothing is held before backing off.
                release(&mut conn, method).await?;
                tracing::warn!(
                    "{what} attempt {attempt_no} of {attempts} gave up after {:.1}s (mysql.lock_timeout): {e:#}",
                    timeout.as_secs_f64()
                );
                if attempt_no < attempts {
                    let backoff = timeout.min(Duration::from_secs(attempt_no as u64))
                        + Duration::from_millis(rand::thread_rng().gen_range(0..500));
                    tokio::time::sleep(backoff).await;
                }
            }
            Err(e) => {
                let _ = release(&mut conn, method).await;
                return Err(e);
            }
        }
    }
    let Some((attempt_no, wait)) = granted else {
        let culprit = longest_writer(&mut watcher).await.unwrap_or_default();
        let _ = watcher.disconnect().await;
        let _ = conn.disconnect().await;
        return Err(Error::LockTimeout(format!(
            "could not take {what} within {:?} in {attempts} attempts{culprit}; nothing is locked and no snapshot was taken: retry later or raise mysql.lock_timeout",
            timeout
        ))
        .into());
    };

    let locked_at = Instant::now();
    let mut snapshot = None;
    let inner = async {
        let (binlog, gtid) = coordinates(&mut conn, version, log_bin, !stage).await?;
        let source = replica_source(&mut conn, version).await?;
        let at = time::OffsetDateTime::now_utc();
        snapshot = Some(backend.create(name)?);
        anyhow::Ok((binlog, gtid, source, at))
    }
    .await;
    let unlocked = release(&mut conn, method).await;
    let hold = locked_at.elapsed();
    if unlocked.is_err() {
        // The server drops the lock (and ends the backup stage) with the connection.
        drop(conn);
    } else {
        let _ = conn.disconnect().await;
    }
    let _ = watcher.disconnect().await;
    match (inner, unlocked) {
        (Ok((binlog, gtid, source, at)), Ok(())) => Ok(LockOutcome {
            snapshot: snapshot.expect("created when inner succeeded"),
            lock: LockTimes {
                method,
                attempts: attempt_no,
                wait_secs: wait.as_secs_f64(),
                hold_secs: hold.as_secs_f64(),
            },
            binlog,
            gtid,
            source,
            at,
        }),
        (Err(e), _) | (Ok(_), Err(e)) => {
            if let Some(s) = snapshot {
                tracing::warn!("removing snapshot {} of a failed locked phase", s.name);
                if let Err(e2) = backend.remove(&s.name) {
                    tracing::error!("cannot remove snapshot {}: {e2:#}", s.name);
                }
            }
            Err(e)
        }
    }
}

/// Binary log file and position, and the GTID state, under the lock;
/// `flush_binlog`: rotate the binary log first (FTWRL; BACKUP STAGE did before the lock).
async fn coordinates(
    conn: &mut Conn,
    version: &ServerVersion,
    log_bin: bool,
    flush_binlog: bool,
) -> anyhow::Result<(Option<Binlog>, Option<GtidSet>)> {
    if !log_bin {
        tracing::warn!(
            "the binary log is off: the backup records no coordinates and cannot seed replicas"
        );
        return Ok((None, None));
    }
    if flush_binlog {
        exec(conn, "FLUSH BINARY LOGS").await?;
    }
    // With the binary log on, InnoDB may keep commit records in its log buffer
    // (prepare was made durable, the binary log decides at recovery). Writing
    // them out makes the snapshot hold exactly the transactions of these coordinates.
    exec(conn, "FLUSH NO_WRITE_TO_BINLOG ENGINE LOGS").await?;
    let binlog = match dialect::binlog_status(conn, version).await? {
        Some(b) => Some(Binlog {
            file: BinlogFile::parse(&b.file)
                .map_err(|e| anyhow::anyhow!("`{}` reported {e}", version.binlog_status_sql()))?,
            position: b.position,
        }),
        None => None,
    };
    let gtid = dialect::gtid_state(conn, version)
        .await?
        .and_then(|g| checked("GTID state", &g));
    Ok((binlog, gtid))
}

/// Where this server replicates from, when it is a replica.
async fn replica_source(
    conn: &mut Conn,
    version: &ServerVersion,
) -> anyhow::Result<Option<SourceCoordinates>> {
    let Some(r) = dialect::replica_status(conn, version).await? else {
        return Ok(None);
    };
    let (Some(host), Some(file)) = (
        checked("replica source host", &r.host),
        checked("replica source binary log file", &r.file),
    ) else {
        return Ok(None);
    };
    Ok(Some(SourceCoordinates {
        host,
        port: r.port,
        file,
        position: r.position,
        gtid: r.gtid.and_then(|g| checked("replica GTID state", &g)),
    }))
}

/// A value the server reported, in its manifest type; one that does not
/// parse is left out of the manifest with a warning (the backup goes on).
fn checked<T: TryFrom<String, Error = String>>(what: &str, value: &str) -> Option<T> {
    match T::try_from(value.to_string()) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!("the server reported {what} {e}; the backup records none");
            None
        }
    }
}

/// ", the longest running statement is id N of user U (Ts)" for the lock timeout message.
async fn longest_writer(conn: &mut Conn) -> anyhow::Result<String> {
    let rows = query_rows(
        conn,
        "SELECT ID, USER, TIME FROM information_schema.PROCESSLIST WHERE COMMAND = 'Query' AND ID <> CONNECTION_ID() ORDER BY TIME DESC LIMIT 1",
    )
    .await?;
    Ok(rows
        .first()
        .map(|r| {
            let g = |k: &str| r.get(k).cloned().flatten().unwrap_or_default();
            format!(
                "; the longest running statement is id {} of user {} ({}s, see SHOW PROCESSLIST)",
                g("ID"),
                g("USER"),
                g("TIME")
            )
        })
        .unwrap_or_default())
}
