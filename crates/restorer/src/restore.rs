//! Restore, as a journaled sequence of phases run by [`restore`]:
//!
//! 1. [`Phase::Check`]: the restore lock taken, a restore that was killed
//!    finished or undone ([`recover`]), the backup chosen and its manifest
//!    read, the flags, the server's version and the room checked; nothing is
//!    touched.
//! 2. [`Phase::Stage`]: the archive unpacked and verified into a staging
//!    directory beside the data directory ([`crate::stage`]), while the server
//!    runs. With `--stop-first` the server is stopped and the data directory
//!    set aside before this phase instead of after it.
//! 3. [`Phase::Stop`]: the server stopped while the staged copy is flushed
//!    (one `syncfs`; with `--stop-first`, flushed after staging). It begins
//!    during the staging, when the unpack has about `mysql.stop_ahead` left
//!    ([`stage_stopping_ahead`]; not with `--until`, whose replay follows
//!    the unpack): a staging that fails after it starts the server again.
//! 4. [`Phase::Swap`]: every live path set aside as `<name>.old-<time>`, the
//!    staged one moved in.
//! 5. [`Phase::Commit`]: from here the restored data stays; the staging
//!    directory is removed.
//! 6. [`Phase::Start`]: the server started, and answering.
//! 7. [`Phase::Replicate`]: with `--replica-of`, replication set up and running.
//!
//! With `--delta` ([`crate::delta`]) the running server's files are
//! compared with the backup's index and what differs is unpacked while the
//! server stops ([`first_pass`]; `--delta=checksum` and `--stop-first` skip
//! it); then, as with `--stop-first`, the data directory is set aside and
//! compared, what changed since is fetched and the unchanged files are
//! hard-linked into the staging directory; once the server answers the
//! set-aside paths, which share those files, are removed (journaled:
//! recovery from the commit on removes them too).
//!
//! Before each irreversible step (creating the staging directory, stopping
//! the server, the renames, the commit, the start) the journal
//! ([`crate::journal`]) records it, so a restore killed at any instant is
//! finished or undone by the next restore or `restorer recover`. Within the
//! process two guards do the same on every error path (and when the future
//! is dropped): [`Staging`] removes the staging directory, and [`SwapGuard`]
//! runs the journal's recovery: before the commit every path moved goes
//! back, newest first, and the server is started again if this restore
//! stopped it. After the commit a failure to start leaves the restored data
//! in place and says how to roll back by hand.
//!
//! SIGINT and SIGTERM ([`Interrupt`]) stop a restore at the next phase
//! boundary (staging at once); from the stop to the commit they wait until
//! the swap is committed (the server is then started) or undone.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use common::archive::Streamed;
use common::cmd;
use common::config::Config;
use common::dialect::{self, ServerVersion};
use common::error::config_err;
use common::manifest::{ArchiveInfo, BackupId, Manifest};
use common::mysql::ConnectInfo;
use common::progress::Progress;
use common::store::Store;
use serde::Serialize;

use crate::delta::{self, DeltaMode, LiveRoot, Reuse};
pub use crate::journal::Phase;
use crate::journal::{self, Action, Journal, Move};
use crate::replica::{self, ReplicaFlags, ReplicaOf, StartAt};

/// Set by SIGINT or SIGTERM: a restore stops at the next phase boundary
/// (staging at once, through the unpacking's reader); from the stop to the
/// commit the swap is finished first (then committed and the server
/// started) or undone, so a signal never leaves the server stopped.
pub use common::signal::Interrupt;

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
    /// Set by SIGINT/SIGTERM ([`Interrupt::on_signals`]).
    pub interrupt: Interrupt,
    /// `--until`: roll the backup forward with archived binary logs.
    pub until: Option<common::binlog::Target>,
    /// `--delta`: take the files the local copy has unchanged from it
    /// ([`crate::delta`]); stops the server first.
    pub delta: Option<DeltaMode>,
}

impl RestoreOpts {
    /// Whether the server stops before the staging: `--stop-first`, or
    /// `--delta` (the local files must not change under the comparison).
    fn stops_first(&self) -> bool {
        self.stop_first || self.delta.is_some()
    }

    /// Whether the restored data shares files with the set-aside data
    /// directory: `--delta` links the unchanged files, unless `--until`
    /// (the replay writes the staged copy before the swap: they are copied).
    fn shares_files(&self) -> bool {
        self.delta.is_some() && self.until.is_none()
    }

    /// Whether `--delta` compares and unpacks a first time while the server
    /// stops ([`crate::delta`]): by size and mtime, without `--stop-first`.
    fn two_pass(&self) -> bool {
        self.delta == Some(DeltaMode::Mtime) && !self.stop_first
    }
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
    /// With `--until`: bytes of binary log replayed and the seconds it took.
    pub replayed_bytes: Option<u64>,
    pub replay_secs: Option<f64>,
    pub replayed_transactions: Option<u64>,
    /// Stored bytes read from the store.
    pub fetched_bytes: u64,
    /// With `--delta`: files and bytes taken from the local copy.
    pub reused_files: Option<u64>,
    pub reused_bytes: Option<u64>,
}

/// The test hook: `MYSNAP_TEST_PAUSE_AT=<point>` pauses a restore at that
/// point (a [`Phase::name`], [`SWAP_ASIDE`], [`FIRST_PASS`] or
/// [`STOPPED_AHEAD`]), or a prune at
/// [`crate::prune::MANIFEST_DELETED`], until it is killed.
pub const PAUSE_ENV: &str = "MYSNAP_TEST_PAUSE_AT";
/// With the test hook: a pause also ends once the file this names exists.
pub const RESUME_ENV: &str = "MYSNAP_TEST_RESUME";
/// The pause point inside the swap: the data directory set aside, the staged
/// one not yet moved in.
pub const SWAP_ASIDE: &str = "swap-aside";
/// The pause point after a first pass of `--delta` ([`crate::delta`]): the
/// server stopped, what differed staged, the data directory not yet set aside.
pub const FIRST_PASS: &str = "first-pass";
/// The pause point after the stop ahead ([`stage_stopping_ahead`]): the
/// server down, the unpack going on or done, nothing swapped.
pub const STOPPED_AHEAD: &str = "stopped-ahead";

impl Phase {
    /// Logs the start of this phase (and pauses there when the test hook says so).
    fn enter(self, int: &Interrupt) {
        tracing::debug!("restore phase: {}", self.name());
        pause_at(self.name(), Some(int));
    }
}

/// The test hook ([`PAUSE_ENV`], documented in ARCHITECTURE.md as such):
/// says `paused at <point>` on stderr and waits until the process is killed
/// (or, after SIGINT/SIGTERM, goes on, so the signal is handled as anywhere
/// else at this point; or goes on once the file [`RESUME_ENV`] names exists).
/// `int`: the run's signal flag; without one (a run that catches no
/// signal) only the resume file or the end of the process ends the pause.
pub(crate) fn pause_at(point: &str, int: Option<&Interrupt>) {
    if std::env::var_os(PAUSE_ENV).is_some_and(|v| v == point) {
        // The one print of this library: a test waits for this line.
        eprintln!("paused at {point}");
        let resume = std::env::var_os(RESUME_ENV).map(PathBuf::from);
        let resumed = || resume.as_ref().is_some_and(|f| f.exists());
        tokio::task::block_in_place(|| {
            while !int.is_some_and(Interrupt::is_set) && !resumed() {
                std::thread::sleep(Duration::from_millis(20));
            }
        });
    }
}

/// Restores backup `opts.id` into `volume.datadir`: every phase, in
/// [`Phase::order`], each irreversible step journaled first; the guards undo
/// what is not committed on any error.
pub async fn restore(
    cfg: &Config,
    opts: &RestoreOpts,
    progress: &dyn Progress,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let int = &opts.interrupt;
    Phase::Check.enter(int);
    check_commands(cfg)?;
    let lock = lock_restores(cfg)?;
    if let Some(line) = recover_locked(cfg, opts.start_timeout).await? {
        tracing::warn!("{line}");
    }
    let plan = check(cfg, opts, lock).await?;
    int.stop_if_set()?;
    // The journal first: a restore killed now leaves its staging directory
    // for the next restore or `restorer recover` to remove.
    let mut live = SwapGuard::new(cfg, &plan);
    live.journal.delta = opts.shares_files();
    let first = Phase::order(opts.stops_first())[1];
    live.journal.phase = first;
    live.save()?;
    live.staging = Some(Staging::create(&plan.staging)?);
    first.enter(int);
    int.stop_if_set()?;
    let mut down_since = None;
    let mut first = None;
    if opts.stops_first() {
        if opts.two_pass() {
            let (pass, down) = first_pass(cfg, &plan, &mut live, int, progress)?;
            first = Some(pass);
            down_since = Some(down);
            pause_at(FIRST_PASS, Some(int));
        } else {
            down_since = Some(live.stop_server()?);
        }
        set_aside(&plan, &mut live)?;
        live.enter(Phase::Stage, int)?;
    }
    let reuse = match opts.delta {
        None => None,
        Some(mode) => {
            let mut reuse = compare(cfg, &plan, live.old_datadir(), mode, false, int).await?;
            reuse.copy = !opts.shares_files();
            if let Some(first) = &first {
                reuse = reuse.after(&first.reuse);
            }
            Some(reuse)
        }
    };
    // The stop begins during the unpack's end unless a replay follows it.
    let ahead = !opts.stops_first() && plan.replay.is_none() && !cfg.mysql.stop_ahead.is_zero();
    let mut stopped_early = None;
    let (mut streamed, mut unpack_secs) = if ahead {
        let (staged, stopped) = stage_stopping_ahead(cfg, &plan, &mut live, int, progress);
        match (staged, stopped) {
            (Err(e), Some(_)) => {
                let undid = undone(
                    &mut live,
                    e,
                    "the unpack failed after the server began to stop",
                );
                return Err(undid.answering(cfg, opts.start_timeout).await);
            }
            (Err(e), None) => return Err(e),
            (Ok(staged), stopped) => {
                stopped_early = stopped;
                staged
            }
        }
    } else {
        stage(cfg, &plan, reuse.as_ref(), int, progress).await?
    };
    if let Some(first) = &first {
        streamed.fetched_bytes += first.streamed.fetched_bytes;
        unpack_secs += first.secs;
    }
    int.stop_if_set()?;
    // Rolled forward in the staging directory, before the live server stops.
    let replayed = roll_forward(cfg, opts, &plan).await?;
    int.stop_if_set()?;
    if opts.stops_first() {
        crate::flush_staged(&plan.staging)
            .map_err(|e| e.context("restore failed; the data directory is unchanged"))?;
    } else {
        if stopped_early.is_none() {
            live.enter(Phase::Stop, int)?;
            int.stop_if_set()?;
        }
        down_since = match stop(&plan.staging, &mut live, stopped_early) {
            Ok(down) => Some(down),
            Err(undid) => return Err(undid.answering(cfg, opts.start_timeout).await),
        };
        // A signal during the stop waits until here: the guard starts the
        // server again.
        int.stop_if_set()?;
    }
    swap(cfg, &plan, &mut live, int)?;
    // A signal during the swap waits until here: the guard undoes it.
    int.stop_if_set()?;
    live.enter(Phase::Commit, int)?;
    let mut old_datadir = live.old_datadir();
    drop(live.staging.take());
    live.enter(Phase::Start, int)?;
    let downtime = start(cfg, opts, &plan, old_datadir.as_deref(), down_since).await;
    if downtime.is_ok() && opts.shares_files() {
        // It shares files with the restored data, which the server writes.
        live.remove_asides();
        old_datadir = None;
    }
    // The restore is over, whether the server answers or not (the error
    // says how to roll back by hand).
    live.finish();
    let downtime = downtime?;
    let mut lag = None;
    if let Some((to, at)) = &plan.replica {
        // After a replay, from where it stopped.
        let at = match &replayed {
            Some(r) => replica::after_replay(at, &r.stop),
            None => at.clone(),
        };
        let at = &at;
        if int.is_set() {
            anyhow::bail!(
                "interrupted after the restore: backup {} is in place and the server runs, but replication was not set up",
                plan.m.backup_id
            );
        }
        Phase::Replicate.enter(int);
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
        replayed_bytes: replayed.as_ref().map(|r| r.bytes),
        replay_secs: replayed.as_ref().map(|r| r.apply_secs),
        replayed_transactions: replayed.as_ref().map(|r| r.transactions),
        fetched_bytes: streamed.fetched_bytes,
        reused_files: reuse.as_ref().map(|r| r.files),
        reused_bytes: reuse.as_ref().map(|r| r.bytes + streamed.local_bytes),
    })
}

/// `--delta`: the index read and compared with the local copy: the data
/// directory set aside (`old_datadir`, the server stopped), or where it is
/// while the server runs (`running`: a first pass), and the other
/// `data.paths` where they are.
async fn compare(
    cfg: &Config,
    plan: &Plan,
    old_datadir: Option<PathBuf>,
    mode: DeltaMode,
    running: bool,
    int: &Interrupt,
) -> anyhow::Result<Reuse> {
    let ix = plan.info.index.as_ref().expect("checked: indexed");
    let ids = common::crypt::Identities::from_config(cfg)?;
    let index =
        common::catalog::read_index(plan.store.as_ref(), &plan.m, &plan.info, ix, ids.as_ref())
            .await?;
    let d = &plan.m.data;
    let roots = d
        .paths
        .iter()
        .filter_map(|p| {
            let dir = match *p == d.datadir {
                true => old_datadir.clone()?,
                false => cfg.volume.mountpoint.join(p),
            };
            Some(LiveRoot {
                rel: p.as_path().to_path_buf(),
                dir,
            })
        })
        .collect();
    let t = Instant::now();
    let reuse = tokio::task::block_in_place(|| {
        delta::compare(&index, roots, mode, running, &|| int.is_set())
    })?;
    tracing::info!(
        "compared the local copy with backup {} ({mode:?}) in {:.1}s: {} file(s), {}, are the backup's",
        plan.m.backup_id,
        t.elapsed().as_secs_f64(),
        reuse.files,
        bytesize::ByteSize(reuse.bytes)
    );
    Ok(reuse)
}

/// `restorer recover`: finishes or undoes a restore that was killed, under
/// the restore lock. Returns the line saying what was found and done, or
/// `None` when there was no journal.
pub async fn recover(cfg: &Config, start_timeout: Duration) -> anyhow::Result<Option<String>> {
    check_commands(cfg)?;
    let _lock = lock_restores(cfg)?;
    recover_locked(cfg, start_timeout).await
}

/// Where the journal of this config's restores is.
fn journal_path(cfg: &Config) -> PathBuf {
    cfg.backup.state_dir.join(journal::FILE)
}

/// Recovers from the journal, if there is one (a server it starts must
/// answer within `start_timeout`); the restore lock is held.
async fn recover_locked(cfg: &Config, start_timeout: Duration) -> anyhow::Result<Option<String>> {
    let path = journal_path(cfg);
    let Some(j) = Journal::load(&path)? else {
        return Ok(None);
    };
    j.check(cfg, &path)?;
    let running = running_settled(cfg, &j.datadir, SETTLE).await;
    let actions = journal::decide(&j, &|p| p.symlink_metadata().is_ok(), running)?;
    let line = journal::describe(&j, &actions);
    if let Err((action, e)) = run_actions(cfg, &actions, &path) {
        return Err(e.context(format!(
            "recovery from {} failed ({action}); the journal stays: fix the cause and run `restorer recover` again",
            path.display()
        )));
    }
    if actions.contains(&Action::StartServer) {
        wait_ready(cfg, start_timeout)
            .await
            .with_context(|| format!("{line}, but the server does not answer"))?;
    }
    Ok(Some(line))
}

/// How long recovery waits for a server that is neither up nor gone.
const SETTLE: Duration = Duration::from_secs(60);

/// Whether the server runs, as recovery must know it. A process working in
/// the data directory that does not listen (yet, or any more) is starting
/// or stopping (the stop command of a killed restore may still run): wait
/// until it listens or is gone, up to `patience`; still undecided then, it
/// counts as running (never two servers on one data directory).
async fn running_settled(cfg: &Config, datadir: &Path, patience: Duration) -> bool {
    // Unable to tell (an unreadable password or defaults file): it may run.
    let listening = || ConnectInfo::from_config(&cfg.mysql).map_or(true, |i| i.listening());
    let start = Instant::now();
    let mut said = false;
    loop {
        match (process_in(datadir), listening()) {
            (_, true) => return true,
            (None, false) => return false,
            (Some(_), false) if start.elapsed() >= patience => return true,
            (Some(pid), false) => {
                if !std::mem::replace(&mut said, true) {
                    tracing::info!(
                        "process {pid} works in {} but the server does not listen: waiting up to {patience:?} until it is up or gone",
                        datadir.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Runs recovery `actions` in order, each idempotent; stops at the first
/// that fails, returning it (the journal is removed only by the last action,
/// so a recovery that fails or is killed is tried again).
fn run_actions(
    cfg: &Config,
    actions: &[Action],
    path: &Path,
) -> Result<(), (Action, anyhow::Error)> {
    for a in actions {
        let r = match a {
            // A staged path goes back into the staging directory, which may
            // be gone already.
            Action::MoveBack { from, to } => to
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .map_err(anyhow::Error::from)
                .and_then(|()| common::state::rename_durably(from, to)),
            Action::StartServer => run_service("mysql.start_command", &cfg.mysql.start_command),
            Action::RemoveStaging(dir) => {
                // A replay's throwaway server working in it is stopped first.
                for pid in crate::drill::processes_in(dir) {
                    crate::drill::stop_pid(pid, None);
                }
                remove_durably(dir, true)
            }
            Action::RemoveAside(dir) => remove_durably(dir, true),
            Action::RemoveJournal => remove_durably(path, false),
        };
        r.map_err(|e| (a.clone(), e))?;
    }
    Ok(())
}

/// Removes `path` (a directory with what is in it when `dir`; nothing to do
/// when it is gone) and flushes its parent directory.
fn remove_durably(path: &Path, dir: bool) -> anyhow::Result<()> {
    let r = if dir {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(anyhow::anyhow!("cannot remove {}: {e}", path.display()))
        }
        _ => {}
    }
    match path.parent() {
        Some(parent) => common::state::sync_dir(parent),
        None => Ok(()),
    }
}

/// `--until`: the staged data directory rolled forward with the archived
/// binary logs (`crate::replay`), before the live server is touched.
async fn roll_forward(
    cfg: &Config,
    opts: &RestoreOpts,
    plan: &Plan,
) -> anyhow::Result<Option<crate::replay::Replayed>> {
    let int = &opts.interrupt;
    Ok(match &plan.replay {
        None => None,
        Some(r) => Some(
            crate::replay::replay(
                cfg,
                plan.store.clone(),
                &plan.m,
                r,
                &plan.staging,
                &plan.staging.join(&plan.m.data.datadir),
                plan.owner,
                opts.start_timeout,
                int,
            )
            .await
            .map_err(|e| {
                if int.is_set() {
                    common::signal::Interrupted.into()
                } else {
                    e.context("restore failed while replaying binary logs; the data directory is unchanged")
                }
            })?,
        ),
    })
}

/// What [`Phase::Check`] resolved: everything the later phases need.
struct Plan {
    store: Arc<dyn Store>,
    m: Manifest,
    info: ArchiveInfo,
    /// Where to replicate from, and from which coordinates.
    replica: Option<(ReplicaOf, StartAt)>,
    /// `--until`: the binary log segments to roll forward with.
    replay: Option<crate::replay::Replay>,
    datadir: PathBuf,
    staging: PathBuf,
    /// The time in the names of the set-aside paths (`<name>.old-<stamp>`).
    stamp: BackupId,
    owner: Option<(u32, u32)>,
    /// Held until the restore ends: one restore at a time per data directory.
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Plan {
    /// Where live path `to` is set aside.
    fn aside(&self, to: &Path) -> PathBuf {
        journal::aside_of(to, &self.stamp)
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

/// The commands restore and recovery run.
fn check_commands(cfg: &Config) -> anyhow::Result<()> {
    if cfg.mysql.stop_command.is_empty() || cfg.mysql.start_command.is_empty() {
        return Err(config_err(
            "mysql.stop_command and mysql.start_command are required to restore (argv lists, e.g. [\"systemctl\", \"stop\", \"mariadb\"])",
        ));
    }
    Ok(())
}

/// One restore (or recovery) at a time into this data directory (this
/// config's), for the whole run: `<backup.state_dir>/restore.lock`. With
/// LVM, the volume must be mounted first.
fn lock_restores(cfg: &Config) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    common::snapshot::check_mounted(&cfg.volume)?;
    let state_dir = &cfg.backup.state_dir;
    common::state::create_private_dir(state_dir).with_context(|| {
        format!(
            "cannot create state directory {} (backup.state_dir)",
            state_dir.display()
        )
    })?;
    common::state::lock_file(
        &state_dir.join("restore.lock"),
        &format!(
            "another restore into {} is running",
            cfg.volume.datadir.display()
        ),
    )
}

/// [`Phase::Check`]: the flags, the backup, the server's version and the
/// target directory; nothing is changed but `volume.datadir`'s parent
/// created (and a staging directory an earlier restore left removed).
async fn check(
    cfg: &Config,
    opts: &RestoreOpts,
    lock: nix::fcntl::Flock<std::fs::File>,
) -> anyhow::Result<Plan> {
    // Flags that need no manifest are refused before the store is asked.
    if !opts.replica.wants_recorded_source() {
        opts.replica.resolve(None)?;
    }
    let id = match (&opts.until, opts.id.as_str()) {
        (Some(target @ common::binlog::Target::Time(_)), "latest")
        | (Some(target @ common::binlog::Target::Gtid(_)), "latest") => {
            newest_before(cfg, target).await?
        }
        _ => opts.id.clone(),
    };
    let chosen = crate::choose(cfg, &id).await?;
    if opts.delta.is_some() && chosen.info.index.is_none() {
        return Err(config_err(format!(
            "--delta needs an indexed backup (archive.indexed = true when it was taken), and backup {} is not indexed: restore it without --delta",
            chosen.manifest.backup_id
        )));
    }
    let replay = match &opts.until {
        None => None,
        Some(target) => {
            let auth = common::crypt::AuthKey::from_config(cfg)?;
            let ids = common::crypt::Identities::from_config(cfg)?;
            let plan = crate::replay::plan(
                chosen.store.as_ref(),
                &chosen.manifest,
                target,
                auth.as_ref(),
            );
            Some(plan.await?.with_identities(ids)?)
        }
    };
    let replica = replica_plan(opts, &chosen.manifest)?;
    if let (Some(_), Some((_, StartAt::File { .. }))) = (&replay, &replica) {
        if opts.replica.from_source {
            return Err(config_err(format!(
                "--until with --replica-of-source needs GTIDs: backup {} records its source's position by file and offset, and after a replay only this server's own binary log position is known; use --replica-of with this server's address, or restore without --until",
                chosen.manifest.backup_id
            )));
        }
    }
    let datadir = cfg.volume.datadir.clone();
    let parent = datadir_parent(&datadir)?;
    if !opts.ignore_version {
        check_version(&chosen.manifest, installed_version(cfg).await.as_ref())?;
    }
    let staging = journal::staging_dir(&datadir, &chosen.manifest.backup_id);
    // What a restore that did not finish left is not counted against the room.
    Staging::remove_leftover(&staging)?;
    // The binary logs a replay downloads are decompressed into the staging
    // directory too (each bounded by the size its metadata declares).
    let binlogs = replay.as_ref().map_or(0, |r| {
        r.segments
            .iter()
            .fold(0u64, |n, s| n.saturating_add(s.size))
    });
    // --delta links the files the data directory has unchanged: they need
    // no room (estimated now by size and mtime, the server still running).
    // With --until they are copied: a reflink would need none, a copy all
    // of it, and which one the file system does is not known beforehand.
    let reusable = match opts.shares_files() {
        true => reusable_bytes(cfg, &chosen).await?,
        false => 0,
    };
    check_space(&parent, &chosen.info, binlogs, reusable)?;
    check_not_mount_point(&datadir, &parent)?;
    let owner = cfg.volume.owner_ids()?;
    let mut plan = Plan {
        store: chosen.store,
        m: chosen.manifest,
        info: chosen.info,
        replica,
        replay,
        datadir,
        staging,
        stamp: common::manifest::backup_id(time::OffsetDateTime::now_utc()),
        owner,
        _lock: lock,
    };
    // A restore in the same second as the one before (whose `.old-` names
    // are taken) sets aside under the next free second.
    let taken = |plan: &Plan| {
        plan.moves(cfg)
            .iter()
            .any(|(_, live)| plan.aside(live).symlink_metadata().is_ok())
    };
    while taken(&plan) {
        plan.stamp = BackupId::from_time(plan.stamp.time() + time::Duration::seconds(1));
    }
    Ok(plan)
}

/// The newest complete backup of `backup.name` before `target`: taken at
/// or before its time, or whose GTID position is before its GTID.
async fn newest_before(cfg: &Config, target: &common::binlog::Target) -> anyhow::Result<String> {
    use common::binlog::{Gtid, Target};
    let store = common::store::open(&cfg.store).await?;
    let name = crate::backup_name(cfg)?;
    let auth = common::crypt::AuthKey::from_config(cfg)?;
    let keys = store.list(&common::keys::backups_of(&name)).await?;
    let backups = crate::backups_in(store.as_ref(), &name, &keys, auth.as_ref()).await?;
    let before = |m: &Manifest| match target {
        Target::Time(t) => m.snapshot_time() <= *t,
        Target::Gtid(g) => !m.gtid.as_ref().is_some_and(|set| {
            set.split(',').any(|x| {
                Gtid::parse(x.trim()).is_ok_and(|b| b.domain == g.domain && b.seq >= g.seq)
            })
        }),
        Target::Latest => true,
    };
    backups
        .iter()
        .find(|m| before(m))
        .map(|m| m.backup_id.to_string())
        .ok_or_else(|| {
            let what = match target {
                Target::Time(t) => format!("--until {}", common::binlog::rfc3339(*t)),
                Target::Gtid(g) => format!("--until-gtid {g}"),
                Target::Latest => "--until latest".into(),
            };
            anyhow::anyhow!(
                "no complete backup of {name} was taken before {what}: nothing to roll forward from"
            )
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

pub(crate) fn check_version(m: &Manifest, installed: Option<&ServerVersion>) -> anyhow::Result<()> {
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

/// The bytes of the backup's files that the live data (`volume.datadir`
/// and the other `data.paths` under `volume.mountpoint`) has with the same
/// size and mtime: what a `--delta` restore would link rather than write.
async fn reusable_bytes(cfg: &Config, chosen: &crate::Chosen) -> anyhow::Result<u64> {
    let Some(ix) = chosen.info.index.as_ref() else {
        return Ok(0);
    };
    let m = &chosen.manifest;
    let ids = common::crypt::Identities::from_config(cfg)?;
    let index =
        common::catalog::read_index(chosen.store.as_ref(), m, &chosen.info, ix, ids.as_ref())
            .await?;
    let roots = m
        .data
        .paths
        .iter()
        .map(|p| LiveRoot {
            rel: p.as_path().to_path_buf(),
            dir: match *p == m.data.datadir {
                true => cfg.volume.datadir.clone(),
                false => cfg.volume.mountpoint.join(p),
            },
        })
        .collect();
    let reuse = tokio::task::block_in_place(|| {
        delta::compare(&index, roots, DeltaMode::Mtime, true, &|| false)
    })?;
    Ok(reuse.bytes)
}

/// Refuses a restore whose unpacked backup (less `reused` bytes a
/// `--delta` links from the data directory, plus `binlogs` bytes of binary
/// logs to replay) would not fit in `dir`'s file system, with a margin.
pub(crate) fn check_space(
    dir: &Path,
    info: &ArchiveInfo,
    binlogs: u64,
    reused: u64,
) -> anyhow::Result<()> {
    let st = nix::sys::statvfs::statvfs(dir)
        .with_context(|| format!("cannot stat the filesystem of {}", dir.display()))?;
    let avail = st.blocks_available() as u64 * st.fragment_size() as u64;
    let written = info.unpacked_size.saturating_sub(reused);
    let need = (written + info.unpacked_size / 20 + (64 << 20)).saturating_add(binlogs);
    if avail < need {
        let logs = if binlogs > 0 {
            format!(
                " and its binary logs to replay to {}",
                bytesize::ByteSize(binlogs)
            )
        } else {
            String::new()
        };
        let linked = match reused {
            0 => String::new(),
            n => format!(
                " ({} of it linked from the data directory by --delta)",
                bytesize::ByteSize(n)
            ),
        };
        anyhow::bail!(
            "not enough room in {}: the backup unpacks to {}{linked}{logs} and needs about {}, but only {} are free; nothing was changed",
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

/// Waits until the server is down ([`server_running`] says none), up to
/// `patience`, looking every 20 ms: a stop command may return before the
/// server has exited (`SHUTDOWN`, `systemctl stop --no-block`), and one
/// that waits may look only once a second (`mariadb-admin shutdown`), so
/// the restore neither swaps under a server still writing nor waits
/// longer than the server takes.
fn wait_down(cfg: &Config, datadir: &Path, patience: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let Some(evidence) = server_running(cfg, datadir) else {
            tracing::debug!(
                "the server is down {:.3}s after mysql.stop_command returned",
                start.elapsed().as_secs_f64()
            );
            return Ok(());
        };
        if start.elapsed() >= patience {
            anyhow::bail!(
                "mysql.stop_command returned, but {patience:?} later the server is still up ({evidence}): find out why it does not exit, then restore again"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process whose working directory is `dir` (after resolving links).
/// Only a server counts (its command name begins `mysqld` or `mariadbd`): an
/// operator's shell or a `tail -f` sitting in the data directory does not
/// hold up a restore.
fn process_in(dir: &Path) -> Option<u32> {
    let dir = dir.canonicalize().ok()?;
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        if std::fs::read_link(e.path().join("cwd")).ok()? != dir {
            return None;
        }
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        is_server_name(comm.trim_end()).then_some(pid)
    })
}

/// Whether a process's command name (`/proc/<pid>/comm`) is a server's.
fn is_server_name(comm: &str) -> bool {
    comm.starts_with("mysqld") || comm.starts_with("mariadbd")
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
            // A replay's throwaway server (restore killed mid-replay) first.
            for pid in crate::drill::processes_in(path) {
                tracing::warn!("stopping process {pid}, a replay server left by that restore");
                crate::drill::stop_pid(pid, None);
            }
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

/// The live side of a restore, kept in its journal: whether this restore
/// stopped the server, the renames planned, the phase. Every change is saved
/// before the step it describes. Dropped before [`SwapGuard::finish`], it runs
/// the journal's recovery ([`journal::decide`]): before the commit every path
/// moved goes back, newest first, and the server is started again if this
/// restore stopped it; after it the server is started if it is down.
struct SwapGuard<'a> {
    cfg: &'a Config,
    path: PathBuf,
    journal: Journal,
    /// The journal is (or may be) on disk, and this guard still owns it.
    saved: bool,
    /// `mysql.stop_command` ran to its end: the server is down, even while
    /// its process is still seen leaving the data directory.
    stop_ran: bool,
    /// Removed after the recovery of a drop (which may move staged paths
    /// back into it), or at the commit.
    staging: Option<Staging>,
}

impl<'a> SwapGuard<'a> {
    fn new(cfg: &'a Config, plan: &Plan) -> Self {
        SwapGuard {
            cfg,
            path: journal_path(cfg),
            journal: Journal::new(plan.m.backup_id.clone(), plan.datadir.clone(), Phase::Check),
            saved: false,
            stop_ran: false,
            staging: None,
        }
    }

    /// Writes the journal (atomically, fsynced).
    fn save(&mut self) -> anyhow::Result<()> {
        self.saved = true;
        self.journal.save(&self.path)
    }

    /// Records that `phase` begins, then enters it. When the journal
    /// cannot be written, the phase is not entered (a drop then recovers
    /// from the phase before, as a recovery from the file would).
    fn enter(&mut self, phase: Phase, int: &Interrupt) -> anyhow::Result<()> {
        let before = std::mem::replace(&mut self.journal.phase, phase);
        if let Err(e) = self.save() {
            self.journal.phase = before;
            return Err(e);
        }
        phase.enter(int);
        Ok(())
    }

    /// Runs `mysql.stop_command` when the server runs ([`server_running`]);
    /// returns when it is down: the command has returned and no process
    /// works in the data directory or listens ([`wait_down`]). A server
    /// that is down already (the usual case after a crash, or on a new
    /// instance) is left as it is, and a rollback does not start it.
    fn stop_server(&mut self) -> anyhow::Result<Instant> {
        let datadir = self.journal.datadir.clone();
        match server_running(self.cfg, &datadir) {
            Some(evidence) => {
                tracing::info!("stopping the server ({evidence})");
                self.journal.stopped_server = true;
                self.save()?;
                run_service("mysql.stop_command", &self.cfg.mysql.stop_command)?;
                wait_down(self.cfg, &datadir, cmd::SERVICE_TIMEOUT)?;
                self.stop_ran = true;
            }
            None => tracing::info!(
                "the server is not running (no process works in {}, nothing listens on its socket or port): not stopping it",
                datadir.display()
            ),
        }
        Ok(Instant::now())
    }

    /// Renames as journaled (durably: both directories flushed).
    fn rename(&self, m: &Move) -> anyhow::Result<()> {
        common::state::rename_durably(&m.from, &m.to)
    }

    /// Whether live path `p` is set aside already (or planned to be).
    fn set_aside(&self, p: &Path) -> bool {
        self.journal.moves.iter().any(|m| m.from == p)
    }

    /// Where the previous data directory was set aside.
    fn old_datadir(&self) -> Option<PathBuf> {
        let datadir = &self.journal.datadir;
        let old = self.journal.moves.iter().find(|m| &m.from == datadir);
        old.map(|m| m.to.clone())
    }

    /// A delta restore whose server answers: the set-aside paths, which
    /// share files with the restored ones, are removed (as recovery would,
    /// [`journal::decide`]).
    fn remove_asides(&mut self) {
        let t = Instant::now();
        let staging = &self.journal.staging;
        for m in self
            .journal
            .moves
            .iter()
            .filter(|m| !m.from.starts_with(staging))
        {
            if let Err(e) = remove_durably(&m.to, true) {
                tracing::error!("{e:#}; remove it by hand");
            }
        }
        tracing::debug!(
            "set-aside paths removed in {:.3}s",
            t.elapsed().as_secs_f64()
        );
    }

    /// The restore is over: the journal goes (the staging directory's
    /// removal flushed first).
    fn finish(&mut self) {
        self.saved = false;
        let staging = &self.journal.staging;
        let r = remove_durably(staging, true).and_then(|()| remove_durably(&self.path, false));
        if let Err(e) = r {
            tracing::error!("{e:#}");
        }
    }

    /// Runs the journal's recovery ([`journal::decide`]) now.
    fn rollback(&mut self) -> Undone {
        if !std::mem::take(&mut self.saved) {
            return Undone::NotStopped;
        }
        let running = !self.stop_ran && server_running(self.cfg, &self.journal.datadir).is_some();
        let actions =
            match journal::decide(&self.journal, &|p| p.symlink_metadata().is_ok(), running) {
                Ok(actions) => actions,
                Err(e) => {
                    tracing::error!("{e:#}");
                    return Undone::NotMovedBack;
                }
            };
        let started = actions.contains(&Action::StartServer);
        match run_actions(self.cfg, &actions, &self.path) {
            Ok(()) if started => Undone::Started,
            Ok(()) => Undone::NotStopped,
            Err((what @ Action::MoveBack { .. }, e)) => {
                tracing::error!("{what}: {e:#}");
                Undone::NotMovedBack
            }
            Err((Action::StartServer, e)) => Undone::StartFailed(e),
            Err((what, e)) => {
                tracing::error!("{what}: {e:#}");
                if started {
                    Undone::Started
                } else {
                    Undone::NotStopped
                }
            }
        }
    }
}

impl Drop for SwapGuard<'_> {
    fn drop(&mut self) {
        match self.rollback() {
            Undone::StartFailed(e) => tracing::error!(
                "cannot start the server again: {e:#}; start it by hand, then run `restorer recover`"
            ),
            Undone::NotMovedBack => tracing::error!(
                "the server was left stopped: move the paths above back and start it by hand, or fix the cause and run `restorer recover`"
            ),
            Undone::NotStopped | Undone::Started => {}
        }
    }
}

/// A first pass of `--delta`: the comparison, what was streamed, its time.
struct First {
    reuse: Reuse,
    streamed: Streamed,
    secs: f64,
}

/// [`Phase::Stop`] of a two-pass `--delta` ([`crate::delta`]): the server
/// stopped while the running server's files are compared with the backup
/// by size and mtime and what differs is unpacked into the staging
/// directory. Returns that pass and when the server was down; a failure
/// of either leaves the data directory unchanged (the guard starts the
/// server again).
fn first_pass(
    cfg: &Config,
    plan: &Plan,
    live: &mut SwapGuard,
    int: &Interrupt,
    progress: &dyn Progress,
) -> anyhow::Result<(First, Instant)> {
    let handle = tokio::runtime::Handle::current();
    let pass = async {
        let t = Instant::now();
        let reuse = compare(
            cfg,
            plan,
            Some(plan.datadir.clone()),
            DeltaMode::Mtime,
            true,
            int,
        )
        .await?;
        let to = crate::StageDir {
            dir: &plan.staging,
            owner: plan.owner,
            cancel: int.flag(),
            in_place: None,
            reuse: Some(&reuse),
        };
        let streamed =
            crate::unpack_into(cfg, plan.store.clone(), &plan.m, &plan.info, &to, progress).await?;
        tracing::info!(
            "first pass, while the server stops: {} fetched",
            bytesize::ByteSize(streamed.fetched_bytes)
        );
        anyhow::Ok(First {
            reuse,
            streamed,
            secs: t.elapsed().as_secs_f64(),
        })
    };
    let (pass, stopped) = tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            let stopping = s.spawn(|| live.stop_server());
            let pass = handle.block_on(pass);
            let stopped = stopping
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("stopping the server panicked")));
            (pass, stopped)
        })
    });
    let down = stopped?;
    let pass = pass.map_err(|e| {
        if int.is_set() {
            common::signal::Interrupted.into()
        } else {
            e.context("restore failed; the data directory is unchanged")
        }
    })?;
    Ok((pass, down))
}

/// [`Phase::Stop`] with `--stop-first` or `--delta`, the server stopped:
/// the data directory set aside before unpacking (again).
fn set_aside(plan: &Plan, live: &mut SwapGuard) -> anyhow::Result<()> {
    if plan.datadir.symlink_metadata().is_ok() {
        let m = Move {
            from: plan.datadir.clone(),
            to: plan.aside(&plan.datadir),
        };
        live.journal.moves.push(m.clone());
        live.save()?;
        live.rename(&m)?;
    }
    Ok(())
}

/// [`Phase::Stage`]: the archive unpacked into the staging directory;
/// returns what was streamed and how long it took. A signal stops it at once.
async fn stage(
    cfg: &Config,
    plan: &Plan,
    reuse: Option<&Reuse>,
    int: &Interrupt,
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
        crate::StageDir {
            dir: &plan.staging,
            owner: plan.owner,
            cancel: int.flag(),
            in_place: None,
            reuse,
        },
        progress,
    )
    .await
    .map_err(|e| {
        if int.is_set() {
            common::signal::Interrupted.into()
        } else {
            e.context("restore failed; the data directory is unchanged")
        }
    })?;
    Ok((s, t.elapsed().as_secs_f64()))
}

/// [`Phase::Stage`] with the stop ahead: the server is stopped
/// ([`Phase::Stop`], in a thread of its own) once the unpack has about
/// `mysql.stop_ahead` left at its rate so far ([`StopAhead`]), so that the
/// stop, which waits on the server's shutdown, overlaps the end of the
/// unpack. Returns the staging and, when the stop began, how it ended
/// (when it is down).
#[allow(clippy::type_complexity)]
fn stage_stopping_ahead(
    cfg: &Config,
    plan: &Plan,
    live: &mut SwapGuard,
    int: &Interrupt,
    progress: &dyn Progress,
) -> (
    anyhow::Result<(Streamed, f64)>,
    Option<anyhow::Result<Instant>>,
) {
    let handle = tokio::runtime::Handle::current();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let ahead = StopAhead::new(progress, cfg.mysql.stop_ahead, tx);
    tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            let stopping = s.spawn(move || {
                // No message: the unpack ended (or failed) first.
                rx.recv().ok()?;
                // A signal ends the unpack: no stop to undo.
                if int.is_set() {
                    return None;
                }
                tracing::info!(
                    "the unpack has about {} left: stopping the server",
                    humantime::format_duration(cfg.mysql.stop_ahead)
                );
                let stopped = live
                    .enter(Phase::Stop, int)
                    .and_then(|()| live.stop_server());
                pause_at(STOPPED_AHEAD, Some(int));
                Some(stopped)
            });
            let staged = handle.block_on(stage(cfg, plan, None, int, &ahead));
            ahead.disarm();
            let stopped = stopping
                .join()
                .unwrap_or_else(|_| Some(Err(anyhow::anyhow!("stopping the server panicked"))));
            (staged, stopped)
        })
    })
}

/// The progress of an unpack, passed on to `inner`, that sends on `stop`
/// once the estimated time left (the bytes left at the rate so far) is at
/// most `ahead`; once.
struct StopAhead<'a> {
    inner: &'a dyn Progress,
    ahead: Duration,
    began: Instant,
    total: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicU64,
    stop: std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

impl<'a> StopAhead<'a> {
    fn new(inner: &'a dyn Progress, ahead: Duration, stop: std::sync::mpsc::Sender<()>) -> Self {
        StopAhead {
            inner,
            ahead,
            began: Instant::now(),
            total: 0.into(),
            done: 0.into(),
            stop: std::sync::Mutex::new(Some(stop)),
        }
    }

    /// No stop from here on (the unpack ended).
    fn disarm(&self) {
        drop(self.stop.lock().unwrap_or_else(|p| p.into_inner()).take());
    }

    /// Whether `done` of `total` bytes in `elapsed` leaves at most `ahead`.
    fn near_end(done: u64, total: u64, elapsed: Duration, ahead: Duration) -> bool {
        if done == 0 || total == 0 {
            return false;
        }
        let left = total.saturating_sub(done) as f64 * elapsed.as_secs_f64() / done as f64;
        left <= ahead.as_secs_f64()
    }
}

impl Progress for StopAhead<'_> {
    fn set_total(&self, bytes: u64) {
        self.total.store(bytes, std::sync::atomic::Ordering::SeqCst);
        self.inner.set_total(bytes);
    }

    fn advance(&self, bytes: u64) {
        self.inner.advance(bytes);
        let done = self
            .done
            .fetch_add(bytes, std::sync::atomic::Ordering::SeqCst)
            + bytes;
        let total = self.total.load(std::sync::atomic::Ordering::SeqCst);
        if Self::near_end(done, total, self.began.elapsed(), self.ahead) {
            let mut stop = self.stop.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(tx) = stop.take() {
                let _ = tx.send(());
            }
        }
    }

    fn finish(&self) {
        self.inner.finish();
    }
}

/// A restore that failed after it stopped the server, and was undone.
struct Undid {
    error: anyhow::Error,
    /// The recovery started the server again.
    started: bool,
}

impl Undid {
    /// The error, once the server started again answers (or its wait
    /// for that failed, which the error then says too).
    async fn answering(self, cfg: &Config, timeout: Duration) -> anyhow::Error {
        if !self.started {
            return self.error;
        }
        match wait_ready(cfg, timeout).await {
            Ok(()) => self.error,
            Err(e) => self
                .error
                .context(format!("but it does not answer: {e:#}; see its error log")),
        }
    }
}

/// `e`, after the guard's recovery ran ([`SwapGuard::rollback`]), saying
/// where that left the server and the data directory.
fn undone(live: &mut SwapGuard, e: anyhow::Error, what: &str) -> Undid {
    let undone = live.rollback();
    let started = matches!(undone, Undone::Started);
    if e.downcast_ref::<common::signal::Interrupted>().is_some() {
        return Undid { error: e, started };
    }
    let state = match undone {
        Undone::Started => "the data directory is unchanged and the server was started again",
        Undone::NotStopped => "the data directory is unchanged (the server was not running)",
        Undone::StartFailed(_) => {
            "the data directory is unchanged, but the server did not start again: start it by hand"
        }
        Undone::NotMovedBack => "the server is stopped: start it by hand",
    };
    Undid {
        error: e.context(format!("{what}; {state}")),
        started,
    }
}

/// [`Phase::Stop`]: the server stopped right before the swap, the only
/// moment it is down (unless `--stop-first`), while the copy in `staging`
/// is flushed ([`crate::flush_staged`]): every byte of it is written and
/// checked by now, so only an I/O error can fail the flush, and then the
/// server is started again on the unchanged data directory. `stopped`:
/// how a stop begun already ended ([`stage_stopping_ahead`]).
fn stop(
    staging: &Path,
    live: &mut SwapGuard,
    stopped: Option<anyhow::Result<Instant>>,
) -> Result<Instant, Undid> {
    let (flushed, stopped) = std::thread::scope(|s| {
        let flush = s.spawn(|| crate::flush_staged(staging));
        let stopped = stopped.unwrap_or_else(|| live.stop_server());
        let flushed = flush
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the flush of the staged copy panicked")));
        (flushed, stopped)
    });
    let down = stopped.map_err(|e| Undid {
        error: e.context("nothing was changed; the server was not stopped"),
        started: false,
    })?;
    if let Err(e) = flushed {
        return Err(undone(live, e, "restore failed before the swap"));
    }
    Ok(down)
}

/// [`Phase::Swap`]: each live path set aside as `<name>.old-<stamp>` and the
/// staged one moved in, all of them journaled first. On failure everything
/// is moved back and the server started again.
fn swap(cfg: &Config, plan: &Plan, live: &mut SwapGuard, int: &Interrupt) -> anyhow::Result<()> {
    let mut planned = Vec::new();
    for (from, to) in plan.moves(cfg) {
        if to.symlink_metadata().is_ok() && !live.set_aside(&to) {
            planned.push(Move {
                from: to.clone(),
                to: plan.aside(&to),
            });
        }
        planned.push(Move { from, to });
    }
    live.journal.moves.extend(planned.iter().cloned());
    live.enter(Phase::Swap, int)?;
    let moved = (|| -> anyhow::Result<()> {
        for m in &planned {
            if m.to == plan.datadir {
                pause_at(SWAP_ASIDE, Some(int));
            }
            if let Some(dir) = m.to.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            live.rename(m)?;
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
    let rollback = || by_hand(old, &plan.datadir, opts.shares_files());
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
fn by_hand(old: Option<&Path>, datadir: &Path, delta: bool) -> String {
    let Some(old) = old else {
        return "there was no previous data directory".to_string();
    };
    if delta {
        return format!(
            "the previous data directory {} shares its unchanged files with the restored one (a delta restore), so it is no copy of the old data: find out why the server does not start (its error log), then remove it",
            old.display()
        );
    }
    format!(
        "the previous data directory is intact at {old}: to roll back, stop the server, `mv {new} {new}.failed && mv {old} {new}`, and start it",
        old = old.display(),
        new = datadir.display()
    )
}

/// Connects every 10 ms until the server answers: a refused connection to
/// a socket costs microseconds, and each poll's wait is downtime.
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
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

fn run_service(cfg_key: &str, argv: &[String]) -> anyhow::Result<()> {
    if argv.is_empty() {
        return Err(config_err(format!(
            "{cfg_key} is empty: restore needs it to stop and start the server"
        )));
    }
    // Out of reach of a Ctrl-C: a signal waits until the command is done.
    cmd::run_own_group_for(argv, Some(cmd::SERVICE_TIMEOUT))
        .with_context(|| format!("{cfg_key} failed"))?;
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

    /// A backup as large as the free space does not fit; with `--delta`
    /// linking all but 100 MiB of it, it does, and the refusal names what
    /// --delta links.
    #[test]
    fn the_room_check_counts_what_delta_links_as_free() {
        let dir = tempfile::tempdir().unwrap();
        let st = nix::sys::statvfs::statvfs(dir.path()).unwrap();
        let avail = st.blocks_available() as u64 * st.fragment_size() as u64;
        let info = ArchiveInfo {
            key: "db1/20261126T093000Z/data.tar.zst".into(),
            size: 1,
            compression: common::config::Compression::Zstd,
            level: 3,
            sha256: common::manifest::Sha256Hex::parse(&"ab".repeat(32)).unwrap(),
            tar_size: 0,
            unpacked_size: avail,
            files: 1,
            archive_secs: 0.0,
            encryption: None,
            index: None,
            bases: vec![],
            chain: 0,
        };
        let err = check_space(dir.path(), &info, 0, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not enough room"), "{err}");
        check_space(dir.path(), &info, 0, avail - (100 << 20)).unwrap();
        let err = check_space(dir.path(), &info, 0, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("linked from the data directory by --delta"),
            "{err}"
        );
    }

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

    /// `sleep secs` under the name of a server (`mariadbd`), working in `dir`.
    fn fake_server(dir: &Path, secs: &str) -> (std::process::Child, tempfile::TempDir) {
        let bin = tempfile::tempdir().unwrap();
        let exe = bin.path().join("mariadbd");
        let sleep = ["/usr/bin/sleep", "/bin/sleep"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("sleep");
        std::fs::copy(sleep, &exe).unwrap();
        let child = std::process::Command::new(&exe)
            .arg(secs)
            .current_dir(dir)
            .spawn()
            .unwrap();
        (child, bin)
    }

    #[test]
    fn a_server_working_in_the_datadir_is_found_and_nothing_else() {
        let used = tempfile::tempdir().unwrap();
        let unused = tempfile::tempdir().unwrap();
        // An operator's shell (here `sleep`) in the data directory is not a server.
        let mut shell = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(unused.path())
            .spawn()
            .unwrap();
        let (mut child, _bin) = fake_server(used.path(), "30");
        // The new process's name is set once it has exec'd.
        let t = Instant::now();
        while process_in(used.path()).is_none() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Through a link, as a data directory often is.
        let link = unused.path().join("link");
        std::os::unix::fs::symlink(used.path(), &link).unwrap();
        let found = process_in(used.path());
        let through_link = process_in(&link);
        let none = process_in(unused.path());
        child.kill().unwrap();
        child.wait().unwrap();
        shell.kill().unwrap();
        shell.wait().unwrap();
        assert_eq!(found, Some(child.id()));
        assert_eq!(through_link, Some(child.id()));
        assert_eq!(none, None);
    }

    /// A config whose server is `socket` (nothing listens there) and data
    /// directory `datadir`.
    fn config_of(socket: &Path, datadir: &Path) -> Config {
        let text = format!(
            "[mysql]\nsocket = {socket:?}\nstop_command = [\"true\"]\nstart_command = [\"true\"]\n\
             [volume]\nbackend = \"btrfs\"\nmountpoint = {root:?}\ndatadir = {datadir:?}\n\
             [store]\nurl = \"file:///nonexistent\"\n\
             [backup]\nname = \"db1\"\nstate_dir = \"/nonexistent\"\n",
            root = datadir.parent().unwrap(),
        );
        Config::parse(&text, Path::new("test.toml")).unwrap()
    }

    #[test]
    fn the_stop_waits_until_no_process_works_in_the_datadir() {
        let dir = tempfile::tempdir().unwrap();
        let datadir = dir.path().join("mysql");
        std::fs::create_dir(&datadir).unwrap();
        let cfg = config_of(&dir.path().join("my.sock"), &datadir);
        // A server that exits 0.5 s after its stop command returned.
        let (mut child, _bin) = fake_server(&datadir, "0.5");
        while process_in(&datadir).is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let t = Instant::now();
        let waited = wait_down(&cfg, &datadir, Duration::from_secs(20));
        let took = t.elapsed();
        child.wait().unwrap();
        waited.unwrap();
        assert!(
            took >= Duration::from_millis(400),
            "returned after {took:?}"
        );
        assert!(took < Duration::from_secs(5), "returned after {took:?}");
        // One that does not exit: refused after the patience, naming it.
        let (mut child, _bin2) = fake_server(&datadir, "30");
        while process_in(&datadir).is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let err = wait_down(&cfg, &datadir, Duration::from_millis(200));
        child.kill().unwrap();
        child.wait().unwrap();
        let err = format!("{:#}", err.unwrap_err());
        assert!(
            err.contains(&format!("process {} works in", child.id())),
            "{err}"
        );
        // Nothing there: at once.
        wait_down(&cfg, &datadir, Duration::ZERO).unwrap();
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

    /// A config whose start command touches `<dir>/started`.
    fn config(dir: &Path) -> &'static Config {
        let d = dir.display();
        let text = format!(
            "[mysql]\nsocket = \"{d}/none.sock\"\nstop_command = [\"true\"]\nstart_command = [\"touch\", \"{d}/started\"]\n\
             [volume]\nbackend = \"btrfs\"\nmountpoint = \"{d}\"\ndatadir = \"{d}/mysql\"\n\
             [store]\nurl = \"file://{d}/store\"\n\
             [backup]\nname = \"db1\"\nstate_dir = \"{d}/state\"\n"
        );
        std::fs::create_dir_all(dir.join("state")).unwrap();
        Box::leak(Box::new(
            Config::parse(&text, Path::new("test.toml")).unwrap(),
        ))
    }

    /// Two live paths swapped for staged ones, journaled, by a restore that
    /// stopped the server.
    fn swapped(dir: &Path) -> (Vec<String>, SwapGuard<'static>) {
        let cfg = config(dir);
        let id = BackupId::parse("20261101T000000Z").unwrap();
        let stamp = BackupId::parse("20261128T120000Z").unwrap();
        let mut live = SwapGuard {
            cfg,
            path: journal_path(cfg),
            journal: Journal::new(id, cfg.volume.datadir.clone(), Phase::Swap),
            saved: false,
            stop_ran: true,
            staging: None,
        };
        live.journal.stopped_server = true;
        let staging = live.journal.staging.clone();
        live.staging = Some(Staging::create(&staging).unwrap());
        for name in ["mysql", "binlogs"] {
            let (to, staged) = (dir.join(name), staging.join(name));
            std::fs::create_dir(&to).unwrap();
            std::fs::write(to.join("old"), b"").unwrap();
            std::fs::create_dir(&staged).unwrap();
            std::fs::write(staged.join("new"), b"").unwrap();
            for m in [
                Move {
                    from: to.clone(),
                    to: journal::aside_of(&to, &stamp),
                },
                Move { from: staged, to },
            ] {
                live.journal.moves.push(m.clone());
                live.save().unwrap();
                live.rename(&m).unwrap();
            }
        }
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        (names, live)
    }

    /// The flush runs while the server stops; when it fails the server is
    /// started again and the error says so.
    #[test]
    fn a_failed_flush_during_the_stop_starts_the_server_again() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        std::fs::create_dir(&cfg.volume.datadir).unwrap();
        let id = BackupId::parse("20261101T000000Z").unwrap();
        let mut live = SwapGuard {
            cfg,
            path: journal_path(cfg),
            journal: Journal::new(id.clone(), cfg.volume.datadir.clone(), Phase::Stop),
            saved: false,
            stop_ran: false,
            staging: None,
        };
        live.save().unwrap();
        // A server that exits 0.2 s after its stop command (`true`) returns.
        let (mut child, _bin) = fake_server(&cfg.volume.datadir, "0.2");
        while process_in(&cfg.volume.datadir).is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let staging = dir.path().join("no-such-staging");
        let err = format!("{:#}", stop(&staging, &mut live, None).unwrap_err().error);
        child.wait().unwrap();
        assert!(err.contains("cannot flush the staged copy"), "{err}");
        assert!(err.contains("the server was started again"), "{err}");
        assert!(dir.path().join("started").exists(), "started again");
        assert!(!live.path.exists(), "journal removed");
        // With a staged copy: flushed, stopped, nothing started.
        std::fs::remove_file(dir.path().join("started")).unwrap();
        let mut live = SwapGuard {
            cfg,
            path: journal_path(cfg),
            journal: Journal::new(id, cfg.volume.datadir.clone(), Phase::Stop),
            saved: false,
            stop_ran: false,
            staging: None,
        };
        live.save().unwrap();
        assert!(stop(dir.path(), &mut live, None).is_ok());
        live.finish();
        drop(live);
        assert!(!dir.path().join("started").exists());
    }

    #[test]
    fn the_stop_is_sent_once_when_the_time_left_at_the_rate_so_far_is_within_ahead() {
        let ms = Duration::from_millis;
        // 100 of 1000 bytes in 1 s: 9 s left.
        assert!(!StopAhead::near_end(100, 1000, ms(1000), ms(500)));
        assert!(StopAhead::near_end(100, 1000, ms(1000), ms(9000)));
        // 950 of 1000 in 1 s: about 53 ms left.
        assert!(StopAhead::near_end(950, 1000, ms(1000), ms(500)));
        assert!(!StopAhead::near_end(950, 1000, ms(1000), ms(50)));
        // Nothing done yet, or no total: no estimate.
        assert!(!StopAhead::near_end(0, 1000, ms(1000), ms(9000)));
        assert!(!StopAhead::near_end(10, 0, ms(1000), ms(9000)));
        let (tx, rx) = std::sync::mpsc::channel();
        let p = StopAhead::new(&common::progress::Silent, ms(3_600_000), tx);
        p.set_total(1000);
        p.advance(1);
        p.advance(1);
        p.disarm();
        assert_eq!(rx.iter().count(), 1, "sent once");
        let (tx, rx) = std::sync::mpsc::channel();
        let p = StopAhead::new(&common::progress::Silent, Duration::ZERO, tx);
        p.set_total(1000);
        p.advance(10);
        p.disarm();
        assert_eq!(rx.iter().count(), 0, "not sent far from the end");
    }

    #[test]
    fn an_uncommitted_swap_is_undone_on_drop_and_the_server_started_again() {
        let dir = tempfile::tempdir().unwrap();
        let (names, live) = swapped(dir.path());
        assert_eq!(
            names,
            [
                "binlogs",
                "binlogs.old-20261128T120000Z",
                "mysql",
                "mysql.old-20261128T120000Z",
                "state"
            ]
        );
        let journal = live.path.clone();
        let staging = live.journal.staging.clone();
        assert!(journal.exists());
        drop(live);
        for name in ["mysql", "binlogs"] {
            assert!(dir.path().join(name).join("old").exists(), "{name} is back");
            assert!(!dir
                .path()
                .join(format!("{name}.old-20261128T120000Z"))
                .exists());
        }
        assert!(!staging.exists(), "staging removed");
        assert!(!journal.exists(), "journal removed");
        assert!(
            dir.path().join("started").exists(),
            "the server was started"
        );
    }

    #[test]
    fn a_committed_swap_stays_names_the_old_data_directory_and_finishing_removes_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut live) = swapped(dir.path());
        live.enter(Phase::Commit, &Interrupt::default()).unwrap();
        let old = live.old_datadir();
        assert_eq!(old, Some(dir.path().join("mysql.old-20261128T120000Z")));
        drop(live.staging.take());
        let journal = live.path.clone();
        live.finish();
        drop(live);
        assert!(dir.path().join("mysql/new").exists());
        assert!(dir.path().join("mysql.old-20261128T120000Z/old").exists());
        assert!(!journal.exists());
        assert!(
            !dir.path().join("started").exists(),
            "not started by the guard"
        );
    }

    #[test]
    fn a_committed_swap_dropped_before_the_start_keeps_the_data_and_starts_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut live) = swapped(dir.path());
        live.enter(Phase::Commit, &Interrupt::default()).unwrap();
        let journal = live.path.clone();
        drop(live);
        assert!(dir.path().join("mysql/new").exists());
        assert!(!journal.exists());
        assert!(dir.path().join("started").exists());
    }

    #[test]
    fn a_killed_swap_is_undone_by_recovery_from_the_journal_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (_, live) = swapped(dir.path());
        let cfg = live.cfg;
        // As after kill -9: nothing of the process runs its guards.
        std::mem::forget(live);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Nothing answers on the socket of this config.
        let err = rt
            .block_on(recover_locked(cfg, Duration::ZERO))
            .unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("moved 4 path(s) back"), "{err}");
        assert!(err.contains("does not answer"), "{err}");
        assert!(dir.path().join("mysql/old").exists());
        assert!(dir.path().join("started").exists());
        assert!(!journal_path(cfg).exists());
        assert_eq!(
            rt.block_on(recover_locked(cfg, Duration::ZERO)).unwrap(),
            None
        );
    }
}
