//! `restorer drill`: proves that a backup restores, without touching the
//! live server. The backup is unpacked through the restore's read path
//! ([`crate::stage`], every untrusted-archive check included) into a
//! scratch directory, a throwaway server is started on it (no my.cnf, its
//! own socket, no networking, no replication, no binary log, no grant
//! tables), `CHECK TABLE` runs on every base table, the server is stopped
//! and the scratch removed, and the result is stored beside the manifest as
//! a new `drill-<time>.toml` ([`common::drill`]).
//!
//! Invariants: the scratch directory is never inside `volume.datadir` (exit
//! 2); the live server, its socket and its port are never used; the
//! throwaway server is stopped and the scratch removed on every path
//! ([`Scratch`]: errors, SIGINT/SIGTERM; after a `kill -9`, by the next
//! drill of the same `backup.name`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use common::config::{Config, MysqlConfig};
use common::dialect::ServerVersion;
use common::drill::{self, DrillRecord, Outcome};
use common::error::{config_err, integrity_err};
use common::keys;
use common::manifest::{BackupId, BackupName, Flavor};
use common::mysql::ConnectInfo;
use common::progress::Progress;
use common::ExitCode;
use mysql_async::prelude::Queryable;
use serde::Serialize;

use crate::restore::{check_space, check_version};
use crate::Interrupt;

/// What `restorer drill` was asked.
pub struct DrillOpts {
    /// Backup id, or `latest`.
    pub id: String,
    /// `--scratch`, overriding `drill.scratch_dir`.
    pub scratch: Option<PathBuf>,
    /// `--start-timeout`, overriding `drill.start_timeout`.
    pub start_timeout: Option<Duration>,
    pub ignore_version: bool,
    pub interrupt: Interrupt,
}

/// The stored record and where it is.
#[derive(Debug, Serialize)]
pub struct DrillReport {
    /// The record's URL in the store.
    pub url: String,
    #[serde(flatten)]
    pub record: DrillRecord,
}

/// A drill's metrics file has the run metrics only (README, "Metrics"): its
/// details are in the drill record beside the manifest.
impl common::metrics::Measured for DrillReport {}

/// The line `restorer drill` prints.
pub fn report_line(r: &DrillReport) -> String {
    let d = &r.record;
    format!(
        "drill of {} {} ok: {} tables passed CHECK TABLE on {}; unpacked {} in {:.1}s, server answered in {:.1}s, checked in {:.1}s; recorded {}",
        d.name,
        d.backup_id,
        d.tables_checked,
        d.server_version.as_deref().unwrap_or("the server"),
        bytesize::ByteSize(d.unpacked_bytes),
        d.unpack_secs,
        d.start_secs,
        d.check_secs,
        r.url
    )
}

/// The throwaway server did not start or answer: recorded as a failed drill, exit 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NotStarted(String);

/// How long the throwaway server may take to shut down before it is killed.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(120);
/// How many lines of the throwaway server's error log a failure shows.
const LOG_TAIL_LINES: usize = 20;

/// Runs a drill of backup `opts.id`; the record is stored whenever the
/// drill reached a verdict on the backup (passed; the archive refused or a
/// table failed CHECK TABLE: exit 4; the server did not start: exit 1).
pub async fn drill(
    cfg: &Config,
    opts: &DrillOpts,
    progress: &dyn Progress,
) -> anyhow::Result<DrillReport> {
    let started = Instant::now();
    let started_at = common::manifest::backup_id(time::OffsetDateTime::now_utc());
    let int = &opts.interrupt;
    let p = prepare(cfg, opts).await?;
    int.stop_if_set()?;
    let (m, info) = (&p.chosen.manifest, &p.chosen.info);
    tracing::info!(
        "drill of backup {} ({}) in {}",
        m.backup_id,
        bytesize::ByteSize(info.size),
        p.run_dir.display()
    );
    let mut scratch = Scratch::create(&p.run_dir, p.server.owner)?;
    let mut rec = new_record(&p.name, &m.backup_id, &started_at);
    let verdict = steps(cfg, &p, &mut scratch, &mut rec, int, progress).await;
    // The server stopped and the scratch removed before anything is stored.
    scratch.stop_server();
    drop(scratch);
    let verdict = judge(verdict, &mut rec, int)?;
    rec.total_secs = started.elapsed().as_secs_f64();
    let url = store_record(&p, &started_at, &rec).await?;
    verdict.map_err(|e| {
        e.context(format!(
            "drill of backup {} failed (recorded {url})",
            m.backup_id
        ))
    })?;
    Ok(DrillReport { url, record: rec })
}

/// What a drill checked and chose before it creates anything.
struct Prepared {
    name: BackupName,
    run_dir: PathBuf,
    chosen: crate::Chosen,
    server: Server,
    /// `drill.lock`, held for the whole drill.
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// The prepare phase: the scratch checked against the live data directory,
/// the server binary found, one drill at a time, the backup chosen and its
/// server version checked, a killed drill's leftovers removed, the room
/// checked, the owner found.
async fn prepare(cfg: &Config, opts: &DrillOpts) -> anyhow::Result<Prepared> {
    let name = crate::backup_name(cfg)?;
    let scratch = scratch_dir(cfg, opts.scratch.as_deref())?;
    let run_dir = scratch.join(format!("mysnap-drill-{name}"));
    refuse_live(cfg, &run_dir)?;
    let binary = server_binary(cfg)?;
    let installed = common::cmd::run(&[binary.as_os_str(), "--version".as_ref()])
        .ok()
        .and_then(|out| ServerVersion::from_version_output(&out));
    let lock = lock_drills(cfg)?;
    let chosen = crate::choose(cfg, &opts.id).await?;
    if !opts.ignore_version {
        check_version(&chosen.manifest, installed.as_ref())?;
    }
    Scratch::remove_leftover(&run_dir)?;
    check_space(&scratch, &chosen.info, 0, 0)?;
    // The server drops root for the data's owner; run as another user, it
    // keeps its own.
    let root = nix::unistd::geteuid().is_root();
    let owner = match root {
        true => cfg.volume.owner_ids()?,
        false => None,
    };
    if let Some((uid, gid)) = owner {
        warn_unreachable(&scratch, uid, gid);
    }
    let server = Server {
        binary,
        flavor: installed.as_ref().map(|v| v.flavor),
        owner,
        // As root, the server must be told whom to run as: the data's owner
        // (root only when no owner is configured or found).
        run_as: root.then(|| owner.map_or("root".to_string(), |(uid, _)| uid.to_string())),
        timeout: opts.start_timeout.unwrap_or(cfg.drill.start_timeout),
    };
    Ok(Prepared {
        name,
        run_dir,
        chosen,
        server,
        _lock: lock,
    })
}

/// The record of a drill of backup `id` of `name` that started at
/// `started_at`, before any step: a pass with nothing measured.
fn new_record(name: &BackupName, id: &BackupId, started_at: &BackupId) -> DrillRecord {
    DrillRecord {
        format_version: drill::FORMAT_VERSION,
        name: name.clone(),
        backup_id: id.clone(),
        started: started_at.clone(),
        host: drill::text(
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_default()
                .trim(),
        ),
        result: Outcome::Ok,
        problem: None,
        server_version: None,
        tables_checked: 0,
        tables_with_errors: 0,
        errors: Vec::new(),
        unpacked_bytes: 0,
        unpack_secs: 0.0,
        start_secs: 0.0,
        check_secs: 0.0,
        total_secs: 0.0,
        mysnap_version: drill::text(env!("CARGO_PKG_VERSION")),
    }
}

/// What the steps' outcome means: `Ok(verdict)` when it is to be recorded
/// (a failure that is a verdict on the backup marks `rec` failed), `Err`
/// for a failure that is not (interrupted, a store or local failure):
/// nothing is recorded then.
fn judge(
    steps: anyhow::Result<()>,
    rec: &mut DrillRecord,
    int: &Interrupt,
) -> anyhow::Result<anyhow::Result<()>> {
    match steps {
        Ok(()) => Ok(Ok(())),
        Err(_) if int.is_set() => Err(anyhow::anyhow!(
            "interrupted; the throwaway server was stopped and the scratch directory removed, nothing was recorded"
        )),
        Err(e) if recorded(&e) => {
            rec.result = Outcome::Failed;
            if rec.problem.is_none() {
                rec.problem = Some(drill::text(&format!("{e:#}")));
            }
            Ok(Err(e))
        }
        Err(e) => Err(e),
    }
}

/// The record phase: `rec` stored beside the manifest, create-only;
/// returns its URL.
async fn store_record(
    p: &Prepared,
    started_at: &BackupId,
    rec: &DrillRecord,
) -> anyhow::Result<String> {
    let id = &p.chosen.manifest.backup_id;
    let key = keys::drill(&p.name, id, started_at);
    let url = p.chosen.store.url(&key);
    p.chosen
        .store
        .put_new(&key, rec.to_toml().into_bytes().into())
        .await
        .with_context(|| {
            format!(
                "the drill of backup {id} ended ({:?}) but its record could not be stored",
                rec.result
            )
        })?;
    tracing::info!("recorded {url}");
    Ok(url)
}

/// Whether a failure is a verdict on the backup (stored as a failed drill):
/// an integrity failure, or a server that would not start on the data.
fn recorded(e: &anyhow::Error) -> bool {
    common::cli::exit_code_of(e) == ExitCode::Integrity
        || e.chain().any(|c| c.downcast_ref::<NotStarted>().is_some())
}

/// How the throwaway server is started.
pub(crate) struct Server {
    pub(crate) binary: PathBuf,
    pub(crate) flavor: Option<Flavor>,
    /// Owner of the unpacked files.
    pub(crate) owner: Option<(u32, u32)>,
    /// `--user`, when run as root.
    pub(crate) run_as: Option<String>,
    pub(crate) timeout: Duration,
}

/// The stage, start and check phases, each filling its part of `rec`.
async fn steps(
    cfg: &Config,
    p: &Prepared,
    scratch: &mut Scratch,
    rec: &mut DrillRecord,
    int: &Interrupt,
    progress: &dyn Progress,
) -> anyhow::Result<()> {
    stage(cfg, p, scratch, rec, int, progress).await?;
    int.stop_if_set()?;
    let t = Instant::now();
    let datadir = scratch.data().join(&p.chosen.manifest.data.datadir);
    scratch.start(&p.server, &datadir, &cfg.drill.server_options)?;
    let mut conn = scratch.wait_ready(p.server.timeout, int).await?;
    rec.start_secs = t.elapsed().as_secs_f64();
    let version: Option<String> = conn.query_first("SELECT VERSION()").await?;
    rec.server_version = version.as_deref().map(drill::text);

    let t = Instant::now();
    let checked = check_tables(&mut conn, scratch, int).await;
    rec.check_secs = t.elapsed().as_secs_f64();
    let _ = conn.disconnect().await;
    record_checked(rec, checked?)
}

/// The stage phase: the backup unpacked through the restore's read path
/// into the scratch's data directory, in place.
async fn stage(
    cfg: &Config,
    p: &Prepared,
    scratch: &Scratch,
    rec: &mut DrillRecord,
    int: &Interrupt,
    progress: &dyn Progress,
) -> anyhow::Result<()> {
    let t = Instant::now();
    let data = scratch.data();
    let streamed = crate::stage(
        cfg,
        p.chosen.store.clone(),
        &p.chosen.manifest,
        &p.chosen.info,
        crate::StageDir {
            dir: &data,
            owner: p.server.owner,
            cancel: int.flag(),
            in_place: Some(&data),
            reuse: None,
        },
        progress,
    )
    .await?;
    rec.unpacked_bytes = streamed.file_bytes;
    rec.unpack_secs = t.elapsed().as_secs_f64();
    Ok(())
}

/// What CHECK TABLE found, into `rec`; a table with an error is an
/// integrity failure naming the first three.
fn record_checked(rec: &mut DrillRecord, checked: Checked) -> anyhow::Result<()> {
    rec.tables_checked = checked.checked;
    rec.tables_with_errors = checked.errors.len() as u64;
    rec.errors = checked
        .errors
        .iter()
        .take(drill::MAX_NAMED_TABLES)
        .map(|e| drill::text(e))
        .collect();
    if !checked.errors.is_empty() {
        let shown: Vec<&str> = checked.errors.iter().take(3).map(String::as_str).collect();
        let problem = format!(
            "{} of {} tables failed CHECK TABLE: {}{}",
            checked.errors.len(),
            checked.checked,
            shown.join("; "),
            if checked.errors.len() > 3 {
                "; …"
            } else {
                ""
            }
        );
        rec.problem = Some(drill::text(&problem));
        return Err(integrity_err(format!(
            "the restored copy is damaged: {problem}"
        )));
    }
    tracing::info!(
        "{} tables passed CHECK TABLE in {:.1}s",
        checked.checked,
        rec.check_secs
    );
    Ok(())
}

/// What CHECK TABLE found.
struct Checked {
    checked: u64,
    /// `` `db`.`table`: message `` per table with an error.
    errors: Vec<String>,
}

impl Checked {
    /// Table `shown` failed with `why`: logged and kept.
    fn failed(&mut self, shown: &str, why: &dyn std::fmt::Display) {
        tracing::error!("CHECK TABLE {shown}: {why}");
        self.errors.push(format!("{shown}: {why}"));
    }
}

/// The base tables of every schema but the virtual ones.
const LIST_TABLES: &str = "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES \
     WHERE TABLE_TYPE IN ('BASE TABLE', 'SYSTEM VERSIONED') \
     AND TABLE_SCHEMA NOT IN ('information_schema', 'performance_schema') \
     ORDER BY TABLE_SCHEMA, TABLE_NAME";

/// Runs CHECK TABLE on every base table. A statement the server refuses is
/// that table's error; a connection lost (the server died on the data) is
/// an integrity failure.
async fn check_tables(
    conn: &mut mysql_async::Conn,
    scratch: &Scratch,
    int: &Interrupt,
) -> anyhow::Result<Checked> {
    let tables: Vec<(String, String)> = conn
        .query(LIST_TABLES)
        .await
        .context("cannot list the tables of the throwaway server")?;
    let mut out = Checked {
        checked: 0,
        errors: Vec::new(),
    };
    for (db, table) in &tables {
        int.stop_if_set()?;
        let shown = format!("{}.{}", quote_ident(db), quote_ident(table));
        let sql = format!("CHECK TABLE {shown}");
        let rows: Result<Vec<mysql_async::Row>, _> = conn.query(sql.as_str()).await;
        out.checked += 1;
        match rows {
            Ok(rows) => {
                let rows: Vec<(String, String)> = rows
                    .iter()
                    .map(|r| {
                        let c = common::mysql::row_map(r);
                        let get = |k: &str| c.get(k).cloned().flatten().unwrap_or_default();
                        (get("Msg_type"), get("Msg_text"))
                    })
                    .collect();
                if let Some(why) = check_verdict(&rows) {
                    out.failed(&shown, &why);
                }
            }
            Err(mysql_async::Error::Server(e)) => out.failed(&shown, &e),
            Err(e) => {
                let tail = scratch.log_tail();
                return Err(integrity_err(format!(
                    "the throwaway server stopped answering during CHECK TABLE {shown} ({e}): it failed on the backup's data{tail}"
                )));
            }
        }
    }
    Ok(out)
}

/// An identifier in backquotes, a backquote doubled: the only way a name
/// from the backup reaches SQL.
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// The error CHECK TABLE's rows (`Msg_type`, `Msg_text`) report, if any: an
/// `error` row, or a last `status` that is not OK. Notes and warnings (an
/// engine that cannot check) pass.
fn check_verdict(rows: &[(String, String)]) -> Option<String> {
    if let Some((_, text)) = rows.iter().find(|(t, _)| t.eq_ignore_ascii_case("error")) {
        return Some(text.clone());
    }
    match rows
        .iter()
        .rev()
        .find(|(t, _)| t.eq_ignore_ascii_case("status"))
    {
        Some((_, text))
            if text.eq_ignore_ascii_case("OK")
                || text.eq_ignore_ascii_case("Table is already up to date") =>
        {
            None
        }
        Some((_, text)) => Some(text.clone()),
        None => None,
    }
}

/// The scratch directory of the flag or `drill.scratch_dir`: an existing
/// directory, never inside (or equal to) `volume.datadir` (exit 2).
fn scratch_dir(cfg: &Config, flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    let (key, dir) = match flag {
        Some(d) => ("--scratch", d),
        None => ("drill.scratch_dir", cfg.drill.scratch_dir.as_path()),
    };
    if !dir.is_absolute() {
        return Err(config_err(format!(
            "{key} must be an absolute path, got {}",
            dir.display()
        )));
    }
    let real = dir.canonicalize().map_err(|e| {
        config_err(format!(
            "{key} {}: {e} (create it, or choose another directory)",
            dir.display()
        ))
    })?;
    if !real.is_dir() {
        return Err(config_err(format!(
            "{key} {} is not a directory",
            dir.display()
        )));
    }
    let live = live_datadir(cfg);
    if real.starts_with(&live) {
        return Err(config_err(format!(
            "{key} {} is inside volume.datadir {}: a drill never writes into the live data directory; choose a directory elsewhere",
            dir.display(),
            live.display()
        )));
    }
    Ok(real)
}

/// `volume.datadir` with its links resolved (as written when it does not exist).
pub(crate) fn live_datadir(cfg: &Config) -> PathBuf {
    cfg.volume
        .datadir
        .canonicalize()
        .unwrap_or_else(|_| cfg.volume.datadir.clone())
}

/// Refuses a drill directory that holds the live data directory (its
/// removal would remove the live data).
fn refuse_live(cfg: &Config, run_dir: &Path) -> anyhow::Result<()> {
    let live = live_datadir(cfg);
    if live.starts_with(run_dir) || run_dir.starts_with(&live) {
        return Err(config_err(format!(
            "the drill directory {} and volume.datadir {} overlap: choose another drill.scratch_dir",
            run_dir.display(),
            live.display()
        )));
    }
    Ok(())
}

/// `drill.server_binary`, else `mariadbd` or `mysqld` from `PATH`, then `/usr/sbin`.
pub(crate) fn server_binary(cfg: &Config) -> anyhow::Result<PathBuf> {
    if let Some(p) = &cfg.drill.server_binary {
        if !is_executable(p) {
            return Err(config_err(format!(
                "drill.server_binary {} is not an executable file",
                p.display()
            )));
        }
        return Ok(p.clone());
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push("/usr/sbin".into());
    ["mariadbd", "mysqld"]
        .iter()
        .flat_map(|n| dirs.iter().map(move |d| d.join(n)))
        .find(|p| p.is_absolute() && is_executable(p))
        .ok_or_else(|| {
            config_err(
                "no mariadbd or mysqld in PATH or /usr/sbin: install the server, or set drill.server_binary",
            )
        })
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// One drill at a time per config: `<backup.state_dir>/drill.lock`.
fn lock_drills(cfg: &Config) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let state_dir = &cfg.backup.state_dir;
    common::state::create_private_dir(state_dir).with_context(|| {
        format!(
            "cannot create state directory {} (backup.state_dir)",
            state_dir.display()
        )
    })?;
    common::state::lock_file(
        &state_dir.join("drill.lock"),
        &format!("another drill of {} is running", cfg.backup.name),
    )
}

/// Warns when a directory on the way to `scratch` cannot be entered by the
/// user the server runs as (it would fail to start).
fn warn_unreachable(scratch: &Path, uid: u32, gid: u32) {
    for dir in scratch.ancestors() {
        let Ok(md) = std::fs::metadata(dir) else {
            continue;
        };
        let mode = md.mode();
        let ok = uid == 0
            || (md.uid() == uid && mode & 0o100 != 0)
            || (md.gid() == gid && mode & 0o010 != 0)
            || mode & 0o001 != 0;
        if !ok {
            tracing::warn!(
                "{} (mode {:o}) cannot be entered by uid {uid} (volume.owner), which the throwaway server runs as: it will not start; choose a drill.scratch_dir it can reach (such as /var/tmp)",
                dir.display(),
                mode & 0o7777
            );
            return;
        }
    }
}

/// The drill's directory and its server: on drop, the server is stopped
/// (SIGTERM, SIGKILL after [`SHUTDOWN_TIMEOUT`]) and the directory removed.
pub(crate) struct Scratch {
    dir: PathBuf,
    server: Option<Child>,
}

impl Scratch {
    /// Removes what a drill killed with `kill -9` left at `dir`: its server
    /// (a process working inside `dir`) first.
    pub(crate) fn remove_leftover(dir: &Path) -> anyhow::Result<()> {
        if dir.symlink_metadata().is_err() {
            return Ok(());
        }
        tracing::warn!(
            "removing {} left by a drill that did not finish",
            dir.display()
        );
        for pid in processes_in(dir) {
            tracing::warn!("stopping process {pid}, a server left by that drill");
            stop_pid(pid, None);
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))
    }

    /// Creates `dir` (0700, owned by `owner`) with `data/` and `tmp/`.
    pub(crate) fn create(dir: &Path, owner: Option<(u32, u32)>) -> anyhow::Result<Scratch> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let scratch = Scratch {
            dir: dir.to_path_buf(),
            server: None,
        };
        for d in [dir.to_path_buf(), scratch.data(), dir.join("tmp")] {
            if d != dir {
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&d)
                    .with_context(|| format!("cannot create {}", d.display()))?;
            }
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(&d, Some(uid), Some(gid))
                    .with_context(|| format!("cannot give {} to volume.owner", d.display()))?;
            }
        }
        Ok(scratch)
    }

    /// Where the backup is unpacked (the volume root of the copy).
    pub(crate) fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub(crate) fn socket(&self) -> PathBuf {
        self.dir.join("drill.sock")
    }

    fn error_log(&self) -> PathBuf {
        self.dir.join("error.log")
    }

    /// The throwaway server's argv: nothing from a my.cnf, everything in
    /// the scratch, no network, no replication, no binary log, no grant
    /// tables (safe: reachable only through a socket in a 0700 directory).
    fn argv(&self, server: &Server, datadir: &Path, extra: &[String]) -> Vec<String> {
        let at = |p: PathBuf| p.display().to_string();
        let mut argv = vec![
            server.binary.display().to_string(),
            "--no-defaults".into(),
            format!("--datadir={}", datadir.display()),
            format!("--socket={}", at(self.socket())),
            format!("--pid-file={}", at(self.dir.join("drill.pid"))),
            format!("--log-error={}", at(self.error_log())),
            format!("--tmpdir={}", at(self.dir.join("tmp"))),
            "--skip-networking".into(),
            "--skip-slave-start".into(),
            "--skip-log-bin".into(),
            "--skip-grant-tables".into(),
            "--event-scheduler=DISABLED".into(),
        ];
        if server.flavor == Some(Flavor::Mysql) {
            argv.push("--mysqlx=OFF".into());
        }
        if let Some(user) = &server.run_as {
            argv.push(format!("--user={user}"));
        }
        argv.extend(extra.iter().cloned());
        argv
    }

    /// Starts the throwaway server in a process group of its own (a
    /// terminal's Ctrl-C reaches only the restorer, which stops it).
    pub(crate) fn start(
        &mut self,
        server: &Server,
        datadir: &Path,
        extra: &[String],
    ) -> anyhow::Result<()> {
        use std::os::unix::process::CommandExt;
        let argv = self.argv(server, datadir, extra);
        tracing::info!("starting {}", common::cmd::display_argv(&argv));
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| NotStarted(format!("cannot run {}: {e}", argv[0])))?;
        self.server = Some(child);
        Ok(())
    }

    /// Waits until the server answers on its socket, up to `timeout`.
    pub(crate) async fn wait_ready(
        &mut self,
        timeout: Duration,
        int: &Interrupt,
    ) -> anyhow::Result<mysql_async::Conn> {
        let info = ConnectInfo::from_config(&MysqlConfig {
            socket: Some(self.socket()),
            user: Some("root".into()),
            ..MysqlConfig::default()
        })?;
        let start = Instant::now();
        loop {
            int.stop_if_set()?;
            if let Some(status) = self
                .server
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.server = None;
                return Err(NotStarted(format!(
                    "the throwaway server exited ({status}) while starting on the backup{}",
                    self.log_tail()
                ))
                .into());
            }
            if info.listening() {
                if let Ok(conn) = info.connect().await {
                    return Ok(conn);
                }
            }
            if start.elapsed() > timeout {
                return Err(NotStarted(format!(
                    "the throwaway server did not answer within {} (drill.start_timeout, --start-timeout){}",
                    humantime::format_duration(timeout),
                    self.log_tail()
                ))
                .into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The last lines of the server's error log, logged one by one; the last
    /// one returned for the error line.
    fn log_tail(&self) -> String {
        let Ok(bytes) = std::fs::read(self.error_log()) else {
            return String::new();
        };
        let text = String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(64 << 10)..]);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        for l in tail {
            tracing::error!("server log: {}", drill::text(l));
        }
        match tail.last() {
            Some(l) => format!("; its error log ends (more above): {}", drill::text(l)),
            None => String::new(),
        }
    }

    /// Stops the server if it runs: SIGTERM, then SIGKILL after [`SHUTDOWN_TIMEOUT`].
    pub(crate) fn stop_server(&mut self) {
        if let Some(mut child) = self.server.take() {
            stop_pid(child.id(), Some(&mut child));
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.stop_server();
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!("cannot remove drill directory {}: {e}", self.dir.display());
            }
        }
    }
}

/// Stops process `pid` (our `child`, or a server a killed drill left):
/// SIGTERM, wait, SIGKILL after [`SHUTDOWN_TIMEOUT`].
pub(crate) fn stop_pid(pid: u32, mut child: Option<&mut Child>) {
    use nix::sys::signal::{kill, Signal};
    let pid_t = nix::unistd::Pid::from_raw(pid as i32);
    let gone = |child: &mut Option<&mut Child>| match child {
        Some(c) => c.try_wait().map_or(true, |s| s.is_some()),
        None => kill(pid_t, None).is_err(),
    };
    if gone(&mut child) {
        return;
    }
    let _ = kill(pid_t, Signal::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < SHUTDOWN_TIMEOUT {
        if gone(&mut child) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    tracing::warn!(
        "the throwaway server (process {pid}) did not stop within {SHUTDOWN_TIMEOUT:?}: killing it"
    );
    let _ = kill(pid_t, Signal::SIGKILL);
    if let Some(c) = child {
        let _ = c.wait();
    } else {
        while kill(pid_t, None).is_ok() && start.elapsed() < SHUTDOWN_TIMEOUT * 2 {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Processes whose working directory is `dir` or inside it.
pub(crate) fn processes_in(dir: &Path) -> Vec<u32> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            std::fs::read_link(e.path().join("cwd"))
                .ok()?
                .starts_with(&dir)
                .then_some(pid)
        })
        .collect()
}

/// The newest drill record among `keys` (a listing of `name`'s prefix) of
/// one of `complete` (ids of complete backups): the newest by drill time
/// that parses; one that does not is skipped with a warning.
pub async fn last_drill(
    store: &dyn common::store::Store,
    name: &BackupName,
    keys: &[String],
    complete: &[BackupId],
) -> anyhow::Result<Option<DrillRecord>> {
    let mut found: Vec<(BackupId, &String)> = keys
        .iter()
        .filter_map(|k| {
            let (id, at) = keys::drill_of(name, k)?;
            complete.contains(&id).then_some((at, k))
        })
        .collect();
    found.sort();
    for (_, key) in found.iter().rev() {
        let url = store.url(key);
        let bytes = match store.get(key, drill::MAX_RECORD_BYTES).await {
            Ok(b) => b,
            Err(e) if common::cli::exit_code_of(&e) == ExitCode::Integrity => {
                tracing::warn!("skipping {url}: {e:#}");
                continue;
            }
            // Deleted since the listing (a prune), or a store failure.
            Err(e) => match store.size(key).await? {
                None => continue,
                Some(_) => return Err(e),
            },
        };
        let parsed = std::str::from_utf8(&bytes)
            .map_err(|_| format!("drill record {url} is not UTF-8 text"))
            .and_then(|t| DrillRecord::parse_stored(t, key, &url, name).map_err(|e| e.to_string()));
        match parsed {
            Ok(r) => return Ok(Some(r)),
            Err(e) => tracing::warn!("skipping {e}"),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(r: &[(&str, &str)]) -> Vec<(String, String)> {
        r.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn record(id: &str, at: &str, result: Outcome) -> DrillRecord {
        DrillRecord {
            format_version: drill::FORMAT_VERSION,
            name: BackupName::parse("db1").unwrap(),
            backup_id: BackupId::parse(id).unwrap(),
            started: BackupId::parse(at).unwrap(),
            host: drill::text("h"),
            result,
            problem: None,
            server_version: None,
            tables_checked: 7,
            tables_with_errors: 0,
            errors: Vec::new(),
            unpacked_bytes: 0,
            unpack_secs: 0.0,
            start_secs: 0.0,
            check_secs: 0.0,
            total_secs: 0.0,
            mysnap_version: drill::text("0"),
        }
    }

    #[test]
    fn the_last_drill_is_the_newest_that_parses_of_a_complete_backup() {
        use common::store::{FileStore, Store, Transfer};
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::new(
            tmp.path().to_path_buf(),
            Transfer {
                part_size: 5 << 20,
                concurrency: 1,
                memory_limit: 15 << 20,
                upload_rate: None,
            },
        );
        let name = BackupName::parse("db1").unwrap();
        let (a, b) = ("20261120T030000Z", "20261121T030000Z");
        let complete = [BackupId::parse(a).unwrap(), BackupId::parse(b).unwrap()];
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let put = |key: String, text: String| {
                let store = &store;
                async move { store.put(&key, text.into_bytes().into()).await.unwrap() }
            };
            let key = |id: &str, at: &str| {
                keys::drill(
                    &name,
                    &BackupId::parse(id).unwrap(),
                    &BackupId::parse(at).unwrap(),
                )
            };
            // An older drill of b, a newer one of a, and newer ones that do not count.
            let old = record(b, "20261122T050000Z", Outcome::Ok);
            put(key(b, "20261122T050000Z"), old.to_toml()).await;
            let newest = record(a, "20261123T050000Z", Outcome::Failed);
            put(key(a, "20261123T050000Z"), newest.to_toml()).await;
            // A forged one (another backup's record under this key) and one of
            // a backup that is not complete are newer still.
            let forged = record(b, "20261123T050000Z", Outcome::Ok);
            put(key(a, "20261124T050000Z"), forged.to_toml()).await;
            let orphan = record("20261119T030000Z", "20261125T050000Z", Outcome::Ok);
            put(
                key("20261119T030000Z", "20261125T050000Z"),
                orphan.to_toml(),
            )
            .await;
            let listed = store.list("db1/").await.unwrap();
            let got = last_drill(&store, &name, &listed, &complete).await.unwrap();
            assert_eq!(got, Some(newest));
            // A record deleted since the listing is skipped too.
            let mut more = listed.clone();
            more.push(key(b, "20261126T050000Z"));
            let got = last_drill(&store, &name, &more, &complete).await.unwrap();
            assert_eq!(got.unwrap().started.as_str(), "20261123T050000Z");
            assert_eq!(last_drill(&store, &name, &listed, &[]).await.unwrap(), None);
        });
    }

    #[test]
    fn check_table_verdicts() {
        assert_eq!(check_verdict(&rows(&[("status", "OK")])), None);
        assert_eq!(
            check_verdict(&rows(&[(
                "note",
                "The storage engine for the table doesn't support check"
            )])),
            None
        );
        assert_eq!(
            check_verdict(&rows(&[
                ("warning", "Size of datafile is: 7"),
                ("status", "OK")
            ])),
            None
        );
        assert_eq!(
            check_verdict(&rows(&[("error", "Corrupt")])),
            Some("Corrupt".into())
        );
        assert_eq!(
            check_verdict(&rows(&[
                (
                    "Warning",
                    "InnoDB: The B-tree of index PRIMARY is corrupted."
                ),
                ("error", "Corrupt")
            ])),
            Some("Corrupt".into())
        );
        assert_eq!(
            check_verdict(&rows(&[("status", "Operation failed")])),
            Some("Operation failed".into())
        );
    }

    #[test]
    fn identifiers_are_backquoted_with_backquotes_doubled() {
        assert_eq!(quote_ident("t"), "`t`");
        assert_eq!(quote_ident("a`b"), "`a``b`");
        assert_eq!(
            quote_ident("x`; DROP TABLE y; --"),
            "`x``; DROP TABLE y; --`"
        );
        assert_eq!(quote_ident("é.ü"), "`é.ü`");
    }

    #[test]
    fn the_throwaway_server_gets_no_network_no_replication_and_no_my_cnf() {
        let s = Scratch {
            dir: "/var/tmp/mysnap-drill-db1".into(),
            server: None,
        };
        let server = Server {
            binary: "/usr/sbin/mariadbd".into(),
            flavor: Some(Flavor::Mariadb),
            owner: Some((102, 105)),
            run_as: Some("102".into()),
            timeout: Duration::from_secs(1),
        };
        let argv = s.argv(
            &server,
            Path::new("/var/tmp/mysnap-drill-db1/data/mysql"),
            &["--innodb-page-size=8k".into()],
        );
        assert_eq!(argv[1], "--no-defaults", "must come first");
        for want in [
            "--datadir=/var/tmp/mysnap-drill-db1/data/mysql",
            "--socket=/var/tmp/mysnap-drill-db1/drill.sock",
            "--skip-networking",
            "--skip-slave-start",
            "--skip-log-bin",
            "--skip-grant-tables",
            "--user=102",
        ] {
            assert!(argv.iter().any(|a| a == want), "{want}: {argv:?}");
        }
        assert_eq!(argv.last().unwrap(), "--innodb-page-size=8k");
        assert!(!argv.iter().any(|a| a.starts_with("--mysqlx")));
        let mysql = Server {
            flavor: Some(Flavor::Mysql),
            owner: None,
            run_as: None,
            ..server
        };
        let argv = s.argv(&mysql, Path::new("/d"), &[]);
        assert!(argv.iter().any(|a| a == "--mysqlx=OFF"));
        assert!(!argv.iter().any(|a| a.starts_with("--user")));
    }

    #[test]
    fn the_scratch_is_never_inside_the_live_data_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let datadir = tmp.path().join("mysql");
        std::fs::create_dir_all(datadir.join("sub")).unwrap();
        let text = format!(
            "[volume]\nbackend = \"btrfs\"\nmountpoint = \"{0}\"\ndatadir = \"{1}\"\n[store]\nurl = \"file:///x\"\n[backup]\nname = \"db1\"\n",
            tmp.path().display(),
            datadir.display()
        );
        let cfg = Config::parse(&text, Path::new("/c.toml")).unwrap();
        for bad in [datadir.clone(), datadir.join("sub"), datadir.join("sub/..")] {
            let e = scratch_dir(&cfg, Some(&bad)).unwrap_err();
            assert_eq!(common::cli::exit_code_of(&e), ExitCode::Usage, "{bad:?}");
            assert!(e.to_string().contains("inside volume.datadir"), "{e}");
        }
        // A link to the data directory is the data directory.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&datadir, &link).unwrap();
        assert!(scratch_dir(&cfg, Some(&link)).is_err());
        for bad in [Path::new("relative"), &tmp.path().join("missing")] {
            let e = scratch_dir(&cfg, Some(bad)).unwrap_err();
            assert_eq!(common::cli::exit_code_of(&e), ExitCode::Usage, "{bad:?}");
        }
        assert_eq!(
            scratch_dir(&cfg, Some(tmp.path())).unwrap(),
            tmp.path().canonicalize().unwrap()
        );
        // The drill's own directory may not hold the data directory either.
        assert!(refuse_live(&cfg, tmp.path()).is_err());
        assert!(refuse_live(&cfg, &tmp.path().join("mysnap-drill-db1")).is_ok());
    }
}
