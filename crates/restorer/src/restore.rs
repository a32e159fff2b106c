//! Restore, as a sequence of phases run by [`restore`]:
//!
//! 1. [`Phase::Check`]: the backup chosen and its manifest read, the flags,
//!    the server's version and the room checked; nothing is touched.
//! 2. [`Phase::Stage`]: the archive unpacked and verified into a staging
//!    directory beside the data directory ([`crate::stage`]), while the server
//!    runs. With `--stop-first` the server is stopped and the data directory
//!    set aside before this phase instead of after it.
//! 3. [`Phase::Stop`]: the server stopped.
//! 4. [`Phase::Swap`]: every live path set aside as `<name>.old-<time>`, the
//!    staged one moved in.
//! 5. [`Phase::Commit`]: from here the restored data stays; the staging
//!    directory is removed.
//! 6. [`Phase::Start`]: the server started, and answering.
//! 7. [`Phase::Replicate`]: with `--replica-of`, replication set up and running.
//!
//! Two guards undo what is not committed, on every error path (and when the
//! future is dropped): [`Staging`] removes the staging directory, and
//! [`SwapGuard`] moves every path it moved back, newest first, and starts the
//! server again if it stopped it. After the commit a failure leaves the
//! restored data in place and says how to roll back by hand.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use common::archive::Streamed;
use common::cmd;
use common::config::Config;
use common::dialect::{self, ServerVersion};
use common::error::config_err;
use common::manifest::{ArchiveInfo, Manifest};
use common::mysql::ConnectInfo;
use common::progress::Progress;
use common::store::Store;
use serde::Serialize;

use crate::replica::{self, ReplicaFlags, ReplicaOf, StartAt};

/// How to restore.
#[derive(Clone, Default)]
pub struct RestoreOpts {
    /// Backup id, or `latest`.
    pub id: String,
    /// `--replica-of`, `--replica-of-source` and the replication user's flags.
    pub replica: ReplicaFlags,
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

/// The phases of a restore; [`Phase::order`] is the order [`restore`] runs them in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Manifest, flags, version and room checked; nothing touched.
    Check,
    /// The archive unpacked and verified into the staging directory.
    Stage,
    /// The server stopped.
    Stop,
    /// The live paths set aside and the staged ones moved in.
    Swap,
    /// The restored data stays; the staging directory is removed.
    Commit,
    /// The server started and answering.
    Start,
    /// Replication set up and running (`--replica-of`).
    Replicate,
}

impl Phase {
    /// The phases in the order they run: `--stop-first` stops before staging.
    pub fn order(stop_first: bool) -> [Phase; 7] {
        use Phase::*;
        if stop_first {
            [Check, Stop, Stage, Swap, Commit, Start, Replicate]
        } else {
            [Check, Stage, Stop, Swap, Commit, Start, Replicate]
        }
    }

    /// Logs the start of this phase.
    fn enter(self) {
        tracing::debug!("restore phase: {self:?}");
    }
}

/// Restores backup `opts.id` into `volume.datadir`: every phase, in
/// [`Phase::order`]; the guards undo what is not committed on any error.
pub async fn restore(
    cfg: &Config,
    opts: &RestoreOpts,
    progress: &dyn Progress,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    Phase::Check.enter();
    let plan = check(cfg, opts).await?;
    let staging = Staging::create(&plan.staging)?;
    let mut live = SwapGuard::new(&cfg.mysql.start_command);
    let mut down_since = None;
    if opts.stop_first {
        Phase::Stop.enter();
        down_since = Some(stop_first(cfg, &plan, &mut live)?);
    }
    Phase::Stage.enter();
    let (streamed, unpack_secs) = stage(cfg, &plan, progress).await?;
    if !opts.stop_first {
        Phase::Stop.enter();
        down_since = Some(stop(cfg, &plan, &mut live)?);
    }
    Phase::Swap.enter();
    swap(cfg, &plan, &mut live)?;
    Phase::Commit.enter();
    let old_datadir = live.commit(&plan.datadir);
    drop(staging);
    Phase::Start.enter();
    let downtime = start(cfg, opts, &plan, old_datadir.as_deref(), down_since).await?;
    let mut lag = None;
    if let Some((to, at)) = &plan.replica {
        Phase::Replicate.enter();
        lag = start_replication(cfg, to, at).await?;
    }
    Ok(Report {
        backup_id: plan.m.backup_id.to_string(),
        datadir: plan.datadir,
        old_datadir,
        bytes: streamed.file_bytes,
        unpack_secs,
        downtime_secs: downtime,
        total_secs: started.elapsed().as_secs_f64(),
        replication_lag_secs: lag,
    })
}

/// What [`Phase::Check`] resolved: everything the later phases need.
struct Plan {
    store: Arc<dyn Store>,
    m: Manifest,
    info: ArchiveInfo,
    /// Where to replicate from, and from which coordinates.
    replica: Option<(ReplicaOf, StartAt)>,
    datadir: PathBuf,
    staging: PathBuf,
    /// The time in the names of the set-aside paths (`<name>.old-<stamp>`).
    stamp: String,
    owner: Option<(u32, u32)>,
    /// Held until the restore ends: one restore at a time per data directory.
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Plan {
    /// Where live path `to` is set aside.
    fn aside(&self, to: &Path) -> PathBuf {
        let name = to
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        to.with_file_name(format!("{name}.old-{}", self.stamp))
    }

    /// Each staged directory and the live path it replaces, the data directory first.
    fn moves(&self, cfg: &Config) -> Vec<(PathBuf, PathBuf)> {
        let d = &self.m.data;
        let mut moves = vec![(self.staging.join(&d.datadir), self.datadir.clone())];
        for p in d.paths.iter().filter(|p| **p != d.datadir) {
            moves.push((self.staging.join(p), cfg.volume.mountpoint.join(p)));
        }
        moves
    }
}

/// [`Phase::Check`]: the commands, the flags, the backup, the server's
/// version and the target directory; nothing is changed but `volume.datadir`'s
/// parent created.
async fn check(cfg: &Config, opts: &RestoreOpts) -> anyhow::Result<Plan> {
    if cfg.mysql.stop_command.is_empty() || cfg.mysql.start_command.is_empty() {
        return Err(config_err(
            "mysql.stop_command and mysql.start_command are required to restore (argv lists, e.g. [\"systemctl\", \"stop\", \"mariadb\"])",
        ));
    }
    // Flags that need no manifest are refused before the store is asked.
    if !opts.replica.wants_recorded_source() {
        opts.replica.resolve(None)?;
    }
    common::snapshot::check_mounted(&cfg.volume)?;
    let chosen = crate::choose(cfg, &opts.id).await?;
    let replica = replica_plan(opts, &chosen.manifest)?;
    let datadir = cfg.volume.datadir.clone();
    let parent = datadir_parent(&datadir)?;
    if !opts.ignore_version {
        check_version(&chosen.manifest, installed_version(cfg).await.as_ref())?;
    }
    let name = datadir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // One restore at a time into this data directory (this config's), for
    // the whole run: `<backup.state_dir>/restore.lock`.
    let state_dir = &cfg.backup.state_dir;
    common::state::create_private_dir(state_dir).with_context(|| {
        format!(
            "cannot create state directory {} (backup.state_dir)",
            state_dir.display()
        )
    })?;
    let lock = common::state::lock_file(
        &state_dir.join("restore.lock"),
        &format!("another restore into {} is running", datadir.display()),
    )?;
    let staging = parent.join(format!(
        ".{name}.mysnap-restore-{}",
        chosen.manifest.backup_id
    ));
    // What a restore that did not finish left is not counted against the room.
    Staging::remove_leftover(&staging)?;
    check_space(&parent, &chosen.info)?;
    check_not_mount_point(&datadir, &parent)?;
    let owner = cfg.volume.owner_ids()?;
    Ok(Plan {
        store: chosen.store,
        m: chosen.manifest,
        info: chosen.info,
        replica,
        datadir,
        staging,
        stamp: common::manifest::backup_id(time::OffsetDateTime::now_utc()).to_string(),
        owner,
        _lock: lock,
    })
}

/// Where and from which coordinates to replicate, if asked to; the source
/// comes from the manifest with `--replica-of-source` (and no `--replica-of`).
fn replica_plan(opts: &RestoreOpts, m: &Manifest) -> anyhow::Result<Option<(ReplicaOf, StartAt)>> {
    let flags = &opts.replica;
    let recorded = if flags.wants_recorded_source() {
        let s = m.source.as_ref().ok_or_else(|| {
            config_err(format!(
                "backup {} records no source (it was not taken on a replica): use --replica-of HOST:PORT",
                opts.id
            ))
        })?;
        Some((s.host.to_string(), s.port))
    } else {
        None
    };
    let Some(to) = flags.resolve(recorded)? else {
        return Ok(None);
    };
    let at = replica::start_at(m, flags.from_source)?;
    Ok(Some((to, at)))
}

/// The directory holding `datadir` (created if missing).
fn datadir_parent(datadir: &Path) -> anyhow::Result<PathBuf> {
    let parent = datadir.parent().ok_or_else(|| {
        config_err(format!(
            "volume.datadir {} has no parent directory",
            datadir.display()
        ))
    })?;
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    Ok(parent.to_path_buf())
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

/// Refuses a data directory that is a mount point: it cannot be renamed.
fn check_not_mount_point(datadir: &Path, parent: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(d), Ok(p)) = (std::fs::metadata(datadir), std::fs::metadata(parent)) {
        if d.dev() != p.dev() {
            return Err(config_err(format!(
                "volume.datadir {} is a mount point, which restore cannot rename: use a directory below the mount point (volprep lays out <mountpoint>/mysql)",
                datadir.display()
            )));
        }
    }
    Ok(())
}

/// Why the server counts as running, or `None` when it is down: a process
/// whose working directory is the data directory (MySQL and MariaDB change
/// into it at start, and keep it while they run, recovery included), or a
/// server listening on the configured socket or host and port.
fn server_running(cfg: &Config, datadir: &Path) -> Option<String> {
    if let Some(pid) = process_in(datadir) {
        return Some(format!("process {pid} works in {}", datadir.display()));
    }
    // Unable to tell (an unreadable password or defaults file): it may run.
    let info = match ConnectInfo::from_config(&cfg.mysql) {
        Ok(info) => info,
        Err(e) => return Some(format!("cannot tell whether it listens: {e:#}")),
    };
    info.listening()
        .then(|| format!("a server listens on {}", info.target()))
}

/// A process whose working directory is `dir` (after resolving links).
fn process_in(dir: &Path) -> Option<u32> {
    let dir = dir.canonicalize().ok()?;
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        (std::fs::read_link(e.path().join("cwd")).ok()? == dir).then_some(pid)
    })
}

/// The staging directory: created empty (0700), removed when dropped. The
/// staged paths leave it in [`Phase::Swap`]; what is left then is removed.
struct Staging(PathBuf);

impl Staging {
    /// Removes what an earlier restore that did not finish left at `path`.
    fn remove_leftover(path: &Path) -> anyhow::Result<()> {
        if path.exists() {
            tracing::warn!(
                "removing {} left by an earlier restore that did not finish",
                path.display()
            );
            std::fs::remove_dir_all(path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
        Ok(())
    }

    /// Creates `path` empty, removing what an earlier restore left there.
    fn create(path: &Path) -> anyhow::Result<Staging> {
        use std::os::unix::fs::DirBuilderExt;
        Staging::remove_leftover(path)?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Staging(path.to_path_buf()))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!("cannot remove staging directory {}: {e}", self.0.display());
            }
        }
    }
}

/// What [`SwapGuard::rollback`] achieved.
enum Undone {
    /// Every path is back; the server was not stopped by this restore.
    NotStopped,
    /// Every path is back and the server was started again.
    Started,
    /// Every path is back, but the server did not start.
    StartFailed(anyhow::Error),
    /// A path could not be moved back (logged); the server was left stopped.
    NotMovedBack,
}

/// The live side of a restore: whether this restore stopped the server, and
/// the renames it made (`from` → `to`, in order). Dropped before
/// [`SwapGuard::commit`], it moves every path back, newest first, and starts
/// the server again if it stopped it.
struct SwapGuard<'a> {
    start_command: &'a [String],
    stopped: bool,
    moved: Vec<(PathBuf, PathBuf)>,
}

impl<'a> SwapGuard<'a> {
    fn new(start_command: &'a [String]) -> Self {
        SwapGuard {
            start_command,
            stopped: false,
            moved: Vec::new(),
        }
    }

    /// Runs `mysql.stop_command` when the server runs ([`server_running`]);
    /// returns when it is down. A server that is down already (the usual
    /// case after a crash, or on a new instance) is left as it is, and a
    /// rollback does not start it.
    fn stop_server(&mut self, cfg: &Config, datadir: &Path) -> anyhow::Result<Instant> {
        match server_running(cfg, datadir) {
            Some(evidence) => {
                tracing::info!("stopping the server ({evidence})");
                run_service("mysql.stop_command", &cfg.mysql.stop_command)?;
                self.stopped = true;
            }
            None => tracing::info!(
                "the server is not running (no process works in {}, nothing listens on its socket or port): not stopping it",
                datadir.display()
            ),
        }
        Ok(Instant::now())
    }

    /// Renames `from` to `to`, to be undone unless committed.
    fn rename(&mut self, from: &Path, to: &Path) -> anyhow::Result<()> {
        std::fs::rename(from, to)
            .with_context(|| format!("cannot move {} to {}", from.display(), to.display()))?;
        self.moved.push((from.to_path_buf(), to.to_path_buf()));
        Ok(())
    }

    /// Whether live path `p` was set aside already.
    fn set_aside(&self, p: &Path) -> bool {
        self.moved.iter().any(|(from, _)| from == p)
    }

    /// Keeps every rename; returns where the previous data directory was set aside.
    fn commit(&mut self, datadir: &Path) -> Option<PathBuf> {
        self.stopped = false;
        let old = self.moved.iter().find(|(from, _)| from == datadir);
        let old = old.map(|(_, to)| to.clone());
        self.moved.clear();
        old
    }

    /// Moves every path back, newest first, and starts the server again if it was stopped.
    fn rollback(&mut self) -> Undone {
        let mut back = true;
        for (from, to) in self.moved.drain(..).rev() {
            if let Err(e) = std::fs::rename(&to, &from) {
                back = false;
                tracing::error!(
                    "cannot move {} back to {}: {e}",
                    to.display(),
                    from.display()
                );
            }
        }
        match (std::mem::take(&mut self.stopped), back) {
            (_, false) => Undone::NotMovedBack,
            (false, true) => Undone::NotStopped,
            (true, true) => match run_service("mysql.start_command", self.start_command) {
                Ok(()) => Undone::Started,
                Err(e) => Undone::StartFailed(e),
            },
        }
    }
}

impl Drop for SwapGuard<'_> {
    fn drop(&mut self) {
        match self.rollback() {
            Undone::StartFailed(e) => tracing::error!("cannot start the server again: {e:#}"),
            Undone::NotMovedBack => tracing::error!(
                "the server was left stopped: move the paths above back and start it by hand"
            ),
            Undone::NotStopped | Undone::Started => {}
        }
    }
}

/// [`Phase::Stop`] with `--stop-first`: the server stopped and the data
/// directory set aside before unpacking.
fn stop_first(cfg: &Config, plan: &Plan, live: &mut SwapGuard) -> anyhow::Result<Instant> {
    let down = live.stop_server(cfg, &plan.datadir)?;
    if plan.datadir.exists() {
        live.rename(&plan.datadir, &plan.aside(&plan.datadir))?;
    }
    Ok(down)
}

/// [`Phase::Stage`]: the archive unpacked into the staging directory;
/// returns what was streamed and how long it took.
async fn stage(
    cfg: &Config,
    plan: &Plan,
    progress: &dyn Progress,
) -> anyhow::Result<(Streamed, f64)> {
    tracing::info!(
        "restoring backup {} ({}) into {}",
        plan.m.backup_id,
        bytesize::ByteSize(plan.info.size),
        plan.staging.display()
    );
    let t = Instant::now();
    let store = plan.store.clone();
    let s = crate::stage(
        cfg,
        store,
        &plan.m,
        &plan.info,
        &plan.staging,
        plan.owner,
        progress,
    )
    .await
    .context("restore failed; the data directory is unchanged")?;
    Ok((s, t.elapsed().as_secs_f64()))
}

/// [`Phase::Stop`]: the server stopped right before the swap, the only
/// moment it is down (unless `--stop-first`).
fn stop(cfg: &Config, plan: &Plan, live: &mut SwapGuard) -> anyhow::Result<Instant> {
    live.stop_server(cfg, &plan.datadir)
        .map_err(|e| e.context("nothing was changed; the server was not stopped"))
}

/// [`Phase::Swap`]: each live path set aside as `<name>.old-<stamp>` and the
/// staged one moved in. On failure everything is moved back and the server
/// started again.
fn swap(cfg: &Config, plan: &Plan, live: &mut SwapGuard) -> anyhow::Result<()> {
    let moved = (|| -> anyhow::Result<()> {
        for (from, to) in plan.moves(cfg) {
            if to.exists() && !live.set_aside(&to) {
                live.rename(&to, &plan.aside(&to))?;
            }
            if let Some(dir) = to.parent() {
                std::fs::create_dir_all(dir)?;
            }
            live.rename(&from, &to)?;
        }
        Ok(())
    })();
    let Err(e) = moved else {
        return Ok(());
    };
    let state = match live.rollback() {
        Undone::Started | Undone::NotStopped => {
            "the old data directory is back in place and the server was started again"
        }
        Undone::StartFailed(_) => {
            "the old data directory is back in place, but the server did not start: start it by hand"
        }
        Undone::NotMovedBack => {
            "not everything could be moved back (see above) and the server is stopped: move the paths back and start it by hand"
        }
    };
    Err(e.context(format!("restore failed during the swap; {state}")))
}

/// [`Phase::Start`]: the server started and answering; returns the downtime.
/// A failure leaves the restored data and says how to roll back.
async fn start(
    cfg: &Config,
    opts: &RestoreOpts,
    plan: &Plan,
    old: Option<&Path>,
    down_since: Option<Instant>,
) -> anyhow::Result<f64> {
    let rollback = || by_hand(old, &plan.datadir);
    run_service("mysql.start_command", &cfg.mysql.start_command)
        .map_err(|e| e.context(rollback()))?;
    wait_ready(cfg, opts.start_timeout)
        .await
        .map_err(|e| e.context(rollback()))?;
    let downtime = down_since.map_or(0.0, |d| d.elapsed().as_secs_f64());
    tracing::info!(
        "backup {} restored; the server answers (down for {downtime:.1}s)",
        plan.m.backup_id
    );
    Ok(downtime)
}

/// How to roll back by hand once the swap is committed.
fn by_hand(old: Option<&Path>, datadir: &Path) -> String {
    let Some(old) = old else {
        return "there was no previous data directory".to_string();
    };
    format!(
        "the previous data directory is intact at {old}: to roll back, stop the server, `mv {new} {new}.failed && mv {old} {new}`, and start it",
        old = old.display(),
        new = datadir.display()
    )
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
    cmd::run_for(argv, Some(cmd::SERVICE_TIMEOUT)).with_context(|| format!("{cfg_key} failed"))?;
    Ok(())
}

/// [`Phase::Replicate`]: points the restored server at its source and waits
/// until both replication threads run; returns the lag it reports.
async fn start_replication(
    cfg: &Config,
    to: &ReplicaOf,
    at: &StartAt,
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
    let lag = wait_replicating(&mut conn, &version, &redact).await?;
    let _ = conn.disconnect().await;
    Ok(lag)
}

/// Waits until both replication threads run; returns the lag reported.
async fn wait_replicating(
    conn: &mut mysql_async::Conn,
    version: &ServerVersion,
    redact: &dyn Fn(String) -> String,
) -> anyhow::Result<Option<u64>> {
    let start = Instant::now();
    loop {
        let r = dialect::replica_status(conn, version).await?;
        if let Some(r) = r.as_ref().filter(|r| r.running()) {
            let lag = r.seconds_behind;
            tracing::info!(
                "replication runs; lag {} s",
                lag.map_or("unknown".into(), |l: u64| l.to_string())
            );
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
    fn one_restore_at_a_time_per_datadir() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("restore.lock");
        let first = common::state::lock_file(&path, "another restore into /x is running").unwrap();
        let err = common::state::lock_file(&path, "another restore into /x is running")
            .unwrap_err()
            .to_string();
        assert!(err.contains("another restore into /x is running"), "{err}");
        drop(first);
        common::state::lock_file(&path, "busy").expect("free again");
    }

    #[test]
    fn a_process_working_in_the_datadir_is_found_and_none_in_an_unused_one() {
        let used = tempfile::tempdir().unwrap();
        let unused = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(used.path())
            .spawn()
            .unwrap();
        // Through a link, as a data directory often is.
        let link = unused.path().join("link");
        std::os::unix::fs::symlink(used.path(), &link).unwrap();
        let found = process_in(used.path());
        let through_link = process_in(&link);
        let none = process_in(unused.path());
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(found, Some(child.id()));
        assert_eq!(through_link, Some(child.id()));
        assert_eq!(none, None);
    }

    #[test]
    fn stop_first_stops_before_staging() {
        use Phase::*;
        assert_eq!(
            Phase::order(false),
            [Check, Stage, Stop, Swap, Commit, Start, Replicate]
        );
        assert_eq!(
            Phase::order(true),
            [Check, Stop, Stage, Swap, Commit, Start, Replicate]
        );
    }

    #[test]
    fn the_staging_directory_is_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".mysql.mysnap-restore-x");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("left-over"), b"x").unwrap();
        let staging = Staging::create(&path).unwrap();
        assert_eq!(std::fs::read_dir(&path).unwrap().count(), 0, "emptied");
        std::fs::write(path.join("f"), b"x").unwrap();
        drop(staging);
        assert!(!path.exists());
    }

    /// Two live paths swapped for staged ones; `started` is touched by the start command.
    fn swapped(dir: &Path) -> (Vec<String>, SwapGuard<'static>) {
        let started = dir.join("started").to_string_lossy().into_owned();
        let start: &'static [String] = vec!["touch".to_string(), started].leak();
        let mut live = SwapGuard::new(start);
        live.stopped = true;
        for name in ["mysql", "binlogs"] {
            let (to, staged) = (dir.join(name), dir.join(format!("staged-{name}")));
            std::fs::create_dir(&to).unwrap();
            std::fs::write(to.join("old"), b"").unwrap();
            std::fs::create_dir(&staged).unwrap();
            std::fs::write(staged.join("new"), b"").unwrap();
            live.rename(&to, &dir.join(format!("{name}.old-1")))
                .unwrap();
            live.rename(&staged, &to).unwrap();
        }
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        (names, live)
    }

    #[test]
    fn an_uncommitted_swap_is_undone_on_drop_and_the_server_started_again() {
        let dir = tempfile::tempdir().unwrap();
        let (names, live) = swapped(dir.path());
        assert_eq!(names, ["binlogs", "binlogs.old-1", "mysql", "mysql.old-1"]);
        drop(live);
        for name in ["mysql", "binlogs"] {
            assert!(dir.path().join(name).join("old").exists(), "{name} is back");
            let staged = dir.path().join(format!("staged-{name}/new"));
            assert!(staged.exists(), "{name}: staged copy is back in staging");
            assert!(!dir.path().join(format!("{name}.old-1")).exists());
        }
        assert!(
            dir.path().join("started").exists(),
            "the server was started"
        );
    }

    #[test]
    fn a_committed_swap_stays_and_names_the_old_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut live) = swapped(dir.path());
        let old = live.commit(&dir.path().join("mysql"));
        assert_eq!(old, Some(dir.path().join("mysql.old-1")));
        drop(live);
        assert!(dir.path().join("mysql/new").exists());
        assert!(dir.path().join("mysql.old-1/old").exists());
        assert!(
            !dir.path().join("started").exists(),
            "not started by the guard"
        );
    }
}
