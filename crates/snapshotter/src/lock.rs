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
/// `after`. Returns whether it killed.
async fn watch(w: &mut Conn, target: u32, after: Duration, cancel: oneshot::Receiver<()>) -> bool {
    tokio::select! {
        _ = cancel => false,
        () = tokio::time::sleep(after) => {
            if let Err(e) = w.query_drop(format!("KILL QUERY {target}")).await {
                tracing::warn!("KILL QUERY {target} failed: {e}");
            }
            true
        }
    }
}

/// Runs the statements that take the lock; returns how long the lock that
/// blocks commits took to be granted.
async fn take(conn: &mut Conn, method: LockMethod) -> anyhow::Result<Duration> {
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
    Ok(t.elapsed())
}

/// The statement that releases what `method` holds, in whatever stage it got to.
fn release_sql(method: LockMethod) -> &'static str {
    match method {
        LockMethod::BackupStage => "BACKUP STAGE END",
        _ => "UNLOCK TABLES",
    }
}

/// What `method` takes, for messages.
fn lock_name(method: LockMethod) -> &'static str {
    match method {
        LockMethod::BackupStage => "BACKUP STAGE (START to BLOCK_COMMIT)",
        _ => "FLUSH TABLES WITH READ LOCK",
    }
}

/// How to lock: the method (`ftwrl` or `backup_stage`, already resolved)
/// and its bounds.
#[derive(Clone, Copy, Debug)]
pub struct LockPolicy {
    pub method: LockMethod,
    /// The longest wait of one attempt (`mysql.lock_timeout`).
    pub timeout: Duration,
    /// Attempts after the first (`mysql.lock_retries`).
    pub retries: u32,
}

impl LockPolicy {
    /// `method` with the bounds of the `[mysql]` section.
    pub fn new(method: LockMethod, cfg: &MysqlConfig) -> LockPolicy {
        LockPolicy {
            method,
            timeout: cfg.lock_timeout,
            retries: cfg.lock_retries,
        }
    }
}

/// The server a lock session works on.
#[derive(Clone, Copy, Debug)]
pub struct ServerInfo<'a> {
    pub version: &'a ServerVersion,
    /// Whether the binary log is on (there are coordinates to record).
    pub log_bin: bool,
}

/// The lock that was granted.
#[derive(Clone, Copy, Debug)]
pub struct Granted {
    /// Which attempt got it (1 for the first).
    pub attempt: u32,
    /// How long it took to be granted.
    pub wait: Duration,
    /// When it was granted: the hold starts.
    pub at: Instant,
}

/// A connection that takes the lock, and a watcher connection that
/// `KILL QUERY`s a lock attempt outliving its timeout. The lock is released
/// by [`LockSession::release`] on every path of [`LockSession::locked_snapshot`];
/// a session dropped in any other way closes its connections, and the server
/// drops the lock (and ends the backup stage) with the connection.
pub struct LockSession<'a> {
    conn: Conn,
    watcher: Conn,
    server: ServerInfo<'a>,
    policy: LockPolicy,
}

impl<'a> LockSession<'a> {
    /// Bounds every lock statement of `conn` by the policy's timeout (the
    /// session's `lock_wait_timeout`); the watcher bounds them again.
    pub async fn open(
        mut conn: Conn,
        watcher: Conn,
        server: ServerInfo<'a>,
        policy: LockPolicy,
    ) -> anyhow::Result<LockSession<'a>> {
        let secs = policy.timeout.as_secs_f64().ceil().max(1.0) as u64;
        exec(
            &mut conn,
            &format!("SET SESSION lock_wait_timeout = {secs}"),
        )
        .await?;
        Ok(LockSession {
            conn,
            watcher,
            server,
            policy,
        })
    }

    fn stage(&self) -> bool {
        self.policy.method == LockMethod::BackupStage
    }

    /// Takes the lock, runs `backend.create(name)` under it with the
    /// coordinates recorded, and releases it, in every outcome. A snapshot
    /// of a failed locked phase is removed.
    pub async fn locked_snapshot(
        mut self,
        backend: &dyn SnapshotBackend,
        name: &str,
    ) -> anyhow::Result<LockOutcome> {
        let granted = match self.acquire().await {
            Ok(g) => g,
            Err(e) => {
                // Released (or the release failed): closing drops anything held.
                self.close(false).await;
                return Err(e);
            }
        };
        let recorded = self.record(backend, name).await;
        let unlocked = self.release().await;
        let hold = granted.at.elapsed();
        let method = self.policy.method;
        self.close(unlocked.is_ok()).await;
        match (recorded, unlocked) {
            (Ok(r), Ok(())) => Ok(r.outcome(method, granted, hold)),
            (Ok(r), Err(e)) => {
                tracing::warn!(
                    "removing snapshot {} of a failed locked phase",
                    r.snapshot.name
                );
                if let Err(e2) = backend.remove(&r.snapshot.name) {
                    tracing::error!("cannot remove snapshot {}: {e2:#}", r.snapshot.name);
                }
                Err(e)
            }
            (Err(e), _) => Err(e),
        }
    }

    /// Takes the lock: at most `retries + 1` attempts, each bounded twice
    /// (`lock_wait_timeout` and the watcher), with a growing, jittered back-off
    /// between them. Nothing is held when it fails.
    pub async fn acquire(&mut self) -> anyhow::Result<Granted> {
        if self.stage() && self.server.log_bin {
            // Not under BLOCK_COMMIT, where it would lengthen the hold: the
            // coordinates read under it need not be at a file start.
            exec(&mut self.conn, "FLUSH BINARY LOGS").await?;
        }
        let attempts = self.policy.retries + 1;
        for attempt in 1..=attempts {
            if let Some(wait) = self.attempt(attempt, attempts).await? {
                return Ok(Granted {
                    attempt,
                    wait,
                    at: Instant::now(),
                });
            }
            if attempt < attempts {
                let timeout = self.policy.timeout;
                let backoff = timeout.min(Duration::from_secs(attempt as u64))
                    + Duration::from_millis(rand::thread_rng().gen_range(0..500));
                tokio::time::sleep(backoff).await;
            }
        }
        Err(self.timed_out(attempts).await)
    }

    /// One lock attempt, every stage of it bounded by one watcher: the wait
    /// when granted, `None` when it timed out (and nothing is held).
    async fn attempt(&mut self, attempt: u32, attempts: u32) -> anyhow::Result<Option<Duration>> {
        let (method, timeout) = (self.policy.method, self.policy.timeout);
        let Self { conn, watcher, .. } = self;
        let conn_id = conn.id();
        let (cancel_tx, cancel_rx) = oneshot::channel();
        let taking = async {
            let r = take(conn, method).await;
            let _ = cancel_tx.send(());
            r
        };
        let after = timeout + Duration::from_millis(250);
        let (r, killed) = tokio::join!(taking, watch(watcher, conn_id, after, cancel_rx));
        match r {
            Ok(wait) => Ok(Some(wait)),
            Err(e) if is_lock_timeout(&e) || killed => {
                // Make sure nothing is held before backing off.
                self.release().await?;
                tracing::warn!(
                    "{} attempt {attempt} of {attempts} gave up after {:.1}s (mysql.lock_timeout): {e:#}",
                    lock_name(method),
                    timeout.as_secs_f64()
                );
                Ok(None)
            }
            Err(e) => {
                let _ = self.release().await;
                Err(e)
            }
        }
    }

    /// The lock timeout error, naming the longest running statement.
    async fn timed_out(&mut self, attempts: u32) -> anyhow::Error {
        let culprit = longest_writer(&mut self.watcher).await.unwrap_or_default();
        Error::LockTimeout(format!(
            "could not take {} within {:?} in {attempts} attempts{culprit}; nothing is locked and no snapshot was taken: retry later or raise mysql.lock_timeout",
            lock_name(self.policy.method),
            self.policy.timeout
        ))
        .into()
    }

    /// Under the lock: the coordinates, the source's, the time, the snapshot.
    async fn record(
        &mut self,
        backend: &dyn SnapshotBackend,
        name: &str,
    ) -> anyhow::Result<Recorded> {
        let (binlog, gtid) = self.coordinates().await?;
        let source = replica_source(&mut self.conn, self.server.version).await?;
        let at = time::OffsetDateTime::now_utc();
        let snapshot = backend.create(name)?;
        Ok(Recorded {
            snapshot,
            binlog,
            gtid,
            source,
            at,
        })
    }

    /// Binary log file and position, and the GTID state, under the lock.
    pub async fn coordinates(&mut self) -> anyhow::Result<(Option<Binlog>, Option<GtidSet>)> {
        let (version, log_bin) = (self.server.version, self.server.log_bin);
        // BACKUP STAGE rotated the binary log before the lock.
        let flush_binlog = !self.stage();
        coordinates(&mut self.conn, version, log_bin, flush_binlog).await
    }

    /// Releases what the method holds, in whatever stage it got to. BACKUP
    /// STAGE END without a stage (START itself failed) is error 4146:
    /// nothing is held, which is the point.
    pub async fn release(&mut self) -> anyhow::Result<()> {
        let method = self.policy.method;
        match exec(&mut self.conn, release_sql(method)).await {
            Err(e) if method == LockMethod::BackupStage && server_code(&e) == Some(4146) => Ok(()),
            r => r,
        }
    }

    /// Closes both connections; `clean`: the lock connection says goodbye,
    /// else it is dropped (the server drops the lock with the connection).
    async fn close(self, clean: bool) {
        if clean {
            let _ = self.conn.disconnect().await;
        } else {
            drop(self.conn);
        }
        let _ = self.watcher.disconnect().await;
    }
}

/// What was recorded under the lock.
struct Recorded {
    snapshot: Snapshot,
    binlog: Option<Binlog>,
    gtid: Option<GtidSet>,
    source: Option<SourceCoordinates>,
    at: time::OffsetDateTime,
}

impl Recorded {
    fn outcome(self, method: LockMethod, granted: Granted, hold: Duration) -> LockOutcome {
        LockOutcome {
            snapshot: self.snapshot,
            lock: LockTimes {
                method,
                attempts: granted.attempt,
                wait_secs: granted.wait.as_secs_f64(),
                hold_secs: hold.as_secs_f64(),
            },
            binlog: self.binlog,
            gtid: self.gtid,
            source: self.source,
            at: self.at,
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
