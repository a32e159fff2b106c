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
//!
//! The hold is bounded by `mysql.max_hold` ([`Hold`]): every step under the
//! lock gets only what is left of it (the snapshot command is killed after
//! that), and a [`Watchdog`] on the watcher connection ends the lock when the
//! bound passes with `KILL CONNECTION` of the lock connection. Not `KILL
//! QUERY`: the lock connection is idle while the snapshot command runs, and
//! only the end of the connection frees writers at once, in any state: the
//! server releases the global read lock and ends the backup stage when it
//! drops a connection. (UNLOCK TABLES and BACKUP STAGE END can only be sent
//! on the lock connection itself, which may be stuck in a statement.)

use std::time::{Duration, Instant};

use common::config::{Backend, LockMethod, MysqlConfig};
use common::dialect::{self, ServerVersion};
use common::error::Error;
use common::manifest::{Binlog, BinlogFile, GtidSet, LockTimes, SourceCoordinates};
use common::mysql::{exec, query_rows};
use common::snapshot::{Snapshot, SnapshotBackend};
use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use rand::Rng;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

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
    /// The longest the lock that blocks commits may be held (`mysql.max_hold`).
    pub max_hold: Duration,
}

impl LockPolicy {
    /// `method` with the bounds of the `[mysql]` section.
    pub fn new(method: LockMethod, cfg: &MysqlConfig) -> LockPolicy {
        LockPolicy {
            method,
            timeout: cfg.lock_timeout,
            retries: cfg.lock_retries,
            max_hold: cfg.max_hold,
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

/// The bound on one hold: from when the lock was granted, at most `max`.
#[derive(Clone, Copy, Debug)]
pub struct Hold {
    pub from: Instant,
    pub max: Duration,
}

impl Hold {
    /// When the lock must be ended.
    pub fn deadline(&self) -> Instant {
        self.from + self.max
    }

    /// What is left of the bound at `now` (zero once it passed).
    pub fn left_at(&self, now: Instant) -> Duration {
        self.deadline().saturating_duration_since(now)
    }

    pub fn left(&self) -> Duration {
        self.left_at(Instant::now())
    }
}

/// Ends the lock when its hold passes the bound: `KILL CONNECTION` of the
/// lock connection, sent on the watcher connection from a task of its own
/// (so a blocking step of the locked phase cannot delay it).
struct Watchdog {
    stop: oneshot::Sender<()>,
    task: JoinHandle<(Conn, bool)>,
}

impl Watchdog {
    fn start(mut watcher: Conn, target: u32, deadline: Instant) -> Watchdog {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            tokio::select! {
                _ = stopped => (watcher, false),
                () = tokio::time::sleep_until(deadline.into()) => {
                    match watcher.query_drop(format!("KILL CONNECTION {target}")).await {
                        Ok(()) => tracing::error!(
                            "the lock was held for mysql.max_hold: ended it (KILL CONNECTION {target})"
                        ),
                        Err(e) => tracing::error!(
                            "the lock was held for mysql.max_hold, but KILL CONNECTION {target} failed: {e} (the lock ends when this process exits)"
                        ),
                    }
                    (watcher, true)
                }
            }
        });
        Watchdog { stop, task }
    }

    /// Stops watching; the watcher connection back, and whether it fired.
    async fn stop(self) -> anyhow::Result<(Conn, bool)> {
        let _ = self.stop.send(());
        self.task
            .await
            .map_err(|e| anyhow::anyhow!("the lock watchdog failed: {e}"))
    }
}

/// A connection that takes the lock, and a watcher connection that
/// `KILL QUERY`s a lock attempt outliving its timeout and, as the
/// [`Watchdog`], ends a hold outliving `mysql.max_hold`. The lock is released
/// by [`LockSession::release`] on every path of [`LockSession::locked_snapshot`];
/// a session dropped in any other way closes its connections, and the server
/// drops the lock (and ends the backup stage) with the connection.
pub struct LockSession<'a> {
    conn: Conn,
    /// `None` only while the watchdog has it.
    watcher: Option<Conn>,
    server: ServerInfo<'a>,
    policy: LockPolicy,
    /// The step under the lock that runs now, for the `max_hold` error.
    step: &'static str,
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
            watcher: Some(watcher),
            server,
            policy,
            step: "",
        })
    }

    fn stage(&self) -> bool {
        self.policy.method == LockMethod::BackupStage
    }

    /// Takes the lock, runs `backend.create(name)` under it with the
    /// coordinates recorded, and releases it, in every outcome, within
    /// `mysql.max_hold` of the grant (else the watchdog ends it and the run
    /// fails with exit 3). A snapshot of a failed locked phase is removed,
    /// also one a killed snapshot command made after all.
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
        let hold = Hold {
            from: granted.at,
            max: self.policy.max_hold,
        };
        let watcher = self
            .watcher
            .take()
            .expect("the watcher is back after acquire");
        let watchdog = Watchdog::start(watcher, self.conn.id(), hold.deadline());
        let recorded = self.record(backend, name, hold).await;
        let unlocked = if recorded.is_ok() {
            self.step = release_sql(self.policy.method);
            self.release().await
        } else {
            // The lock connection is closed below, which ends the lock even
            // where this cannot (the watchdog killed it).
            let _ = self.release().await;
            Ok(())
        };
        let held = granted.at.elapsed();
        let fired = match watchdog.stop().await {
            Ok((w, fired)) => {
                self.watcher = Some(w);
                fired
            }
            Err(e) => {
                tracing::error!("{e:#}");
                true
            }
        };
        let (method, policy, step) = (self.policy.method, self.policy, self.step);
        self.close(recorded.is_ok() && unlocked.is_ok() && !fired)
            .await;
        let err = match (recorded, unlocked) {
            (Ok(r), Ok(())) => return Ok(r.outcome(method, granted, held)),
            (Ok(r), Err(e)) => {
                remove_failed(backend, &r.snapshot.name);
                e
            }
            (Err(e), _) => {
                if step == SNAPSHOT_STEP {
                    remove_if_made(backend, name);
                }
                e
            }
        };
        // Judged on the hold itself, not on the time the removal took.
        if fired || held >= hold.max {
            return Err(hold_exceeded(&policy, step, backend.kind(), held, &err));
        }
        Err(err)
    }

    /// Takes the lock: at most `retries + 1` attempts, each bounded twice
    /// (`lock_wait_timeout` and the watcher), with a growing, jittered back-off
    /// between them. Nothing is held when it fails.
    pub async fn acquire(&mut self) -> anyhow::Result<Granted> {
        if self.stage() && self.server.log_bin {
            // Not under BLOCK_COMMIT, where it would lengthen the hold: the
            // coordinates read under it need not be at a file start.
            self.bounded("FLUSH BINARY LOGS").await?;
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

    /// Runs `sql` on the lock connection before the lock, bounded by the
    /// lock timeout: the watcher `KILL QUERY`s it when it outlives that (a
    /// server waiting for disk space to write its binary log waits for ever).
    async fn bounded(&mut self, sql: &str) -> anyhow::Result<()> {
        let timeout = self.policy.timeout;
        let Self { conn, watcher, .. } = self;
        let watcher = watcher
            .as_mut()
            .expect("the watcher is here before the lock");
        let conn_id = conn.id();
        let (done_tx, done_rx) = oneshot::channel();
        let running = async {
            let r = exec(conn, sql).await;
            let _ = done_tx.send(());
            r
        };
        let after = timeout + Duration::from_millis(250);
        let (r, killed) = tokio::join!(running, watch(watcher, conn_id, after, done_rx));
        match r {
            Err(e) if killed => Err(e.context(format!(
                "`{sql}` did not finish within {timeout:?} (mysql.lock_timeout) and was killed; nothing is locked: is the volume full (the server waits for space to write)? see the server's error log"
            ))),
            r => r,
        }
    }

    /// One lock attempt, every stage of it bounded by one watcher: the wait
    /// when granted, `None` when it timed out (and nothing is held).
    async fn attempt(&mut self, attempt: u32, attempts: u32) -> anyhow::Result<Option<Duration>> {
        let (method, timeout) = (self.policy.method, self.policy.timeout);
        let Self { conn, watcher, .. } = self;
        let watcher = watcher
            .as_mut()
            .expect("the watcher is here while acquiring");
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
        let culprit = match self.watcher.as_mut() {
            Some(w) => longest_writer(w).await.unwrap_or_default(),
            None => String::new(),
        };
        Error::LockTimeout(format!(
            "could not take {} within {:?} in {attempts} attempts{culprit}; nothing is locked and no snapshot was taken: retry later or raise mysql.lock_timeout",
            lock_name(self.policy.method),
            self.policy.timeout
        ))
        .into()
    }

    /// Under the lock: the coordinates, the source's, the time, the
    /// snapshot; each step named in `self.step`, the snapshot command
    /// bounded by what is left of `hold` (the watchdog bounds the statements).
    async fn record(
        &mut self,
        backend: &dyn SnapshotBackend,
        name: &str,
        hold: Hold,
    ) -> anyhow::Result<Recorded> {
        let (version, log_bin) = (self.server.version, self.server.log_bin);
        let (binlog, gtid) = if log_bin {
            if !self.stage() {
                // BACKUP STAGE rotated the binary log before the lock.
                self.step = "FLUSH BINARY LOGS";
                exec(&mut self.conn, "FLUSH BINARY LOGS").await?;
            }
            self.step = "FLUSH ENGINE LOGS";
            flush_engine_logs(&mut self.conn).await?;
            self.step = version.binlog_status_sql();
            let binlog = binlog_coordinates(&mut self.conn, version).await?;
            self.step = "the GTID state";
            let gtid = dialect::gtid_state(&mut self.conn, version)
                .await?
                .and_then(|g| checked("GTID state", &g));
            (binlog, gtid)
        } else {
            tracing::warn!(
                "the binary log is off: the backup records no coordinates and cannot seed replicas"
            );
            (None, None)
        };
        self.step = "the replica status";
        let source = replica_source(&mut self.conn, version).await?;
        let at = time::OffsetDateTime::now_utc();
        self.step = SNAPSHOT_STEP;
        let left = hold.left();
        anyhow::ensure!(!left.is_zero(), "no time left for the snapshot");
        let snapshot = blocking(|| backend.create(name, left))?;
        Ok(Recorded {
            snapshot,
            binlog,
            gtid,
            source,
            at,
        })
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
        if let Some(w) = self.watcher {
            let _ = w.disconnect().await;
        }
    }
}

/// The error of a hold that passed `mysql.max_hold` during `step`.
fn hold_exceeded(
    policy: &LockPolicy,
    step: &str,
    backend: Backend,
    held: Duration,
    cause: &anyhow::Error,
) -> anyhow::Error {
    let step = if step == SNAPSHOT_STEP {
        match backend {
            Backend::Lvm => "the snapshot command `lvcreate -s`".to_string(),
            _ => "the snapshot command `btrfs subvolume snapshot`".to_string(),
        }
    } else {
        format!("`{step}`")
    };
    Error::LockTimeout(format!(
        "{step} was still running when the lock ({}) reached mysql.max_hold ({:?}): the lock was ended after {:.1}s so writers could go on, no snapshot was kept and nothing was saved; find out why it was slow ({cause:#}), or raise mysql.max_hold",
        policy.method.as_str(),
        policy.max_hold,
        held.as_secs_f64(),
    ))
    .into()
}

/// The step that runs the snapshot command.
const SNAPSHOT_STEP: &str = "the snapshot";

/// Runs a blocking step (an external command) without holding up the
/// runtime's other tasks, among them the watchdog.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Removes the snapshot of a failed locked phase.
fn remove_failed(backend: &dyn SnapshotBackend, name: &str) {
    tracing::warn!("removing snapshot {name} of a failed locked phase");
    if let Err(e) = backend.remove(name) {
        tracing::error!("cannot remove snapshot {name}: {e:#}");
    }
}

/// After a snapshot command failed or was killed: it may have made the
/// snapshot all the same (a killed `lvcreate` may have got that far), so
/// list the snapshots and remove it when it is there.
fn remove_if_made(backend: &dyn SnapshotBackend, name: &str) {
    match backend.list(name) {
        Ok(names) if names.iter().any(|n| n == name) => remove_failed(backend, name),
        Ok(_) => {}
        Err(e) => tracing::error!(
            "cannot list snapshots to remove {name}, which a failed snapshot command may have made: {e:#}; remove it by hand if it exists"
        ),
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

/// With the binary log on, InnoDB may keep commit records in its log buffer
/// (prepare was made durable, the binary log decides at recovery). Writing
/// them out makes the snapshot hold exactly the transactions of the coordinates.
async fn flush_engine_logs(conn: &mut Conn) -> anyhow::Result<()> {
    exec(conn, "FLUSH NO_WRITE_TO_BINLOG ENGINE LOGS").await
}

/// Binary log file and position, under the lock.
async fn binlog_coordinates(
    conn: &mut Conn,
    version: &ServerVersion,
) -> anyhow::Result<Option<Binlog>> {
    Ok(match dialect::binlog_status(conn, version).await? {
        Some(b) => Some(Binlog {
            file: BinlogFile::parse(&b.file)
                .map_err(|e| anyhow::anyhow!("`{}` reported {e}", version.binlog_status_sql()))?,
            position: b.position,
        }),
        None => None,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_left_of_the_hold() {
        let from = Instant::now();
        let hold = Hold {
            from,
            max: Duration::from_secs(2),
        };
        assert_eq!(hold.deadline(), from + Duration::from_secs(2));
        assert_eq!(hold.left_at(from), Duration::from_secs(2));
        assert_eq!(
            hold.left_at(from + Duration::from_millis(500)),
            Duration::from_millis(1500)
        );
        assert_eq!(
            hold.left_at(from + Duration::from_millis(1999)),
            Duration::from_millis(1)
        );
        // Once passed: nothing left, never a negative or wrapped duration.
        assert_eq!(hold.left_at(from + Duration::from_secs(2)), Duration::ZERO);
        assert_eq!(hold.left_at(from + Duration::from_secs(3)), Duration::ZERO);
    }
}
