//! restorer: list, verify and restore backups; provision replicas.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use common::cli::{exit_with, runtime, GlobalArgs};
use common::config::Config;
use common::metrics::{self, Job};
use restorer::drill::DrillOpts;
use restorer::{ReplicaFlags, RestoreOpts};

/// Lists, verifies and restores mysnap backups.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The complete backups of backup.name, newest first
    List {
        /// One JSON array of manifests on stdout
        #[arg(long)]
        json: bool,
    },
    /// Newest complete backup, its age and size, per backup name (exit 5 when older than --max-age)
    Status {
        /// Every backup name in the store, not only backup.name
        #[arg(long)]
        all: bool,
        /// Exit 5 when a shown name's newest complete backup is older than this (e.g. 26h), or it has none
        #[arg(long, value_name = "AGE", value_parser = humantime::parse_duration)]
        max_age: Option<Duration>,
        /// One JSON document on stdout (README, "Status")
        #[arg(long)]
        json: bool,
    },
    /// Read the whole archive as restore would; check size, SHA-256 and every entry (exit 4 on failure)
    Verify {
        /// Backup id, or "latest"
        #[arg(default_value = "latest")]
        id: String,
    },
    /// Restore a backup into volume.datadir (the old one is kept as <datadir>.old-<time>)
    Restore {
        /// Backup id, or "latest"
        #[arg(default_value = "latest")]
        id: String,
        /// After start, replicate from this source (HOST:PORT)
        #[arg(long, value_name = "HOST:PORT")]
        replica_of: Option<String>,
        /// Replicate from the source recorded in the backup (a backup taken on a replica)
        #[arg(long)]
        replica_of_source: bool,
        /// Replication user on the source
        #[arg(long, value_name = "USER")]
        replication_user: Option<String>,
        /// File holding the replication user's password (mode 600)
        #[arg(long, value_name = "PATH")]
        replication_password_file: Option<PathBuf>,
        /// Stop the server before unpacking (for machines without room to unpack beside the old data)
        #[arg(long)]
        stop_first: bool,
        /// Restore even if the installed server's flavor or major version differs from the backup's
        #[arg(long)]
        ignore_version: bool,
        /// Longest wait for the server to answer after start
        #[arg(long, default_value = "5min", value_parser = humantime::parse_duration)]
        start_timeout: Duration,
        /// Roll the backup forward with archived binary logs up to this UTC time (RFC 3339,
        /// included), or "latest" (everything archived); with the id "latest", the newest backup
        /// taken before it
        #[arg(long, value_name = "TIME|latest")]
        until: Option<String>,
        /// Roll the backup forward up to and including this MariaDB GTID (domain-server_id-seq)
        #[arg(long, value_name = "GTID", conflicts_with = "until")]
        until_gtid: Option<String>,
        /// Re-seed a stale copy of the same server in volume.datadir: stop the server, keep the
        /// files whose size and mtime (or with =checksum, the digest of every piece) match the
        /// indexed backup, fetch only the others; the old data directory is removed once the
        /// server answers (with --until the kept files are copied and it stays)
        #[arg(long, value_name = "HOW", num_args = 0..=1, require_equals = true,
              default_missing_value = "mtime")]
        delta: Option<restorer::DeltaMode>,
        /// Extract only these databases and tables (db1,db2.t1, names as stored on disk) into
        /// --into; the server and volume.datadir are not touched
        #[arg(long, value_name = "DB[.TABLE],...", requires = "into",
              conflicts_with_all = ["replica_of", "replica_of_source", "stop_first", "until", "until_gtid", "delta"])]
        only: Option<restorer::only::Only>,
        /// With --only: the directory to extract into (new or empty, outside volume.datadir)
        #[arg(long, value_name = "DIR", requires = "only")]
        into: Option<PathBuf>,
    },
    /// Apply the [retention] policy: print keep/remove per backup; delete only with --apply
    Prune {
        /// Delete the backups marked remove (default: a dry run)
        #[arg(long)]
        apply: bool,
        /// One JSON object on stdout
        #[arg(long)]
        json: bool,
    },
    /// Prove a backup restores: unpack it into a scratch directory, start a throwaway server on it,
    /// CHECK TABLE every table, remove it all, and store the result beside the manifest (exit 4 when
    /// the backup is damaged)
    Drill {
        /// Backup id, or "latest"
        #[arg(default_value = "latest")]
        id: String,
        /// Directory to make the scratch in (default: drill.scratch_dir); never inside volume.datadir
        #[arg(long, value_name = "DIR")]
        scratch: Option<PathBuf>,
        /// Longest wait for the throwaway server to answer (default: drill.start_timeout)
        #[arg(long, value_parser = humantime::parse_duration)]
        start_timeout: Option<Duration>,
        /// Drill even if the installed server's flavor or major version differs from the backup's
        #[arg(long)]
        ignore_version: bool,
        /// Print the stored record as one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Finish or undo a restore that was killed (kill -9, power loss), from its journal
    Recover {
        /// Longest wait for the server to answer after start
        #[arg(long, default_value = "5min", value_parser = humantime::parse_duration)]
        start_timeout: Duration,
    },
    /// Make key files: an age identity (restore hosts; its public key is printed for
    /// encryption.recipients_file) and/or an HMAC key for auth.key_file; mode 0600, never replaced
    Keygen {
        /// Write a new age identity here (needs no config)
        #[arg(long, value_name = "FILE", required_unless_present = "auth_key")]
        identity: Option<PathBuf>,
        /// Write a new HMAC-SHA256 key for auth.key_file here (needs no config)
        #[arg(long, value_name = "FILE")]
        auth_key: Option<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    let cli: Cli = common::cli::parse();
    cli.global.init_logging();
    let quiet = cli.global.quiet();
    exit_with(runtime().block_on(async {
        if let Cmd::Keygen { identity, auth_key } = &cli.command {
            return keygen(identity.as_deref(), auth_key.as_deref());
        }
        let cfg = cli.global.load_config()?;
        match cli.command {
            Cmd::List { json } => list(&cfg, json).await,
            Cmd::Status { all, max_age, json } => status(&cfg, all, max_age, json).await,
            Cmd::Verify { id } => verify(&cfg, &id, quiet).await,
            Cmd::Restore {
                id,
                replica_of,
                replica_of_source,
                replication_user,
                replication_password_file,
                stop_first,
                ignore_version,
                start_timeout,
                until,
                until_gtid,
                delta,
                only,
                into,
            } => {
                if let (Some(only), Some(into)) = (&only, &into) {
                    return extract(&cfg, &id, only, into, quiet).await;
                }
                let until = match until_gtid {
                    Some(g) => Some(common::binlog::Target::Gtid(
                        common::binlog::Gtid::parse(&g)
                            .map_err(|e| common::error::config_err(format!("--until-gtid: {e}")))?,
                    )),
                    None => until.as_deref().map(parse_until).transpose()?,
                };
                let replica = ReplicaFlags {
                    replica_of,
                    from_source: replica_of_source,
                    user: replication_user,
                    password_file: replication_password_file,
                };
                let opts = RestoreOpts {
                    id,
                    replica,
                    stop_first,
                    ignore_version,
                    start_timeout,
                    interrupt: restorer::Interrupt::default(),
                    until,
                    delta,
                };
                restore(&cfg, &opts, quiet).await
            }
            Cmd::Prune { apply, json } => prune(&cfg, apply, json).await,
            Cmd::Drill {
                id,
                scratch,
                start_timeout,
                ignore_version,
                json,
            } => {
                let opts = DrillOpts {
                    id,
                    scratch,
                    start_timeout,
                    ignore_version,
                    interrupt: restorer::Interrupt::default(),
                };
                drill(&cfg, &opts, json, quiet).await
            }
            Cmd::Keygen { .. } => unreachable!("handled before the config is read"),
            Cmd::Recover { start_timeout } => recover(&cfg, start_timeout).await,
        }
    }))
}

/// `restorer list`: a table, or one JSON array.
async fn list(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let backups = restorer::list(cfg).await?;
    match json {
        true => println!("{}", serde_json::to_string_pretty(&backups)?),
        false => print!("{}", restorer::list_table(&backups)),
    }
    Ok(())
}

/// `restorer status`: exit 5 when a shown name is stale.
async fn status(
    cfg: &Config,
    all: bool,
    max_age: Option<Duration>,
    json: bool,
) -> anyhow::Result<()> {
    let st = restorer::status::status(cfg, all, max_age).await?;
    match json {
        true => println!("{}", serde_json::to_string_pretty(&st)?),
        false => print!("{}", restorer::status::status_text(&st)),
    }
    restorer::status::stale_error(&st).map_or(Ok(()), Err)
}

/// `restorer verify`: the id of the intact backup on stdout; metrics.
async fn verify(cfg: &Config, id: &str, quiet: bool) -> anyhow::Result<()> {
    let progress = common::progress::for_stderr("verifying", quiet);
    let verify = restorer::verify(cfg, id, progress.as_ref());
    let v = metrics::track(cfg, Job::Verify, verify).await?;
    println!("{}", v.manifest.backup_id);
    Ok(())
}

/// `restorer restore`: the report as one JSON line.
async fn restore(cfg: &Config, opts: &RestoreOpts, quiet: bool) -> anyhow::Result<()> {
    opts.interrupt
        .on_signals("stopping the restore (a swap under way is committed or undone first)")?;
    let progress = common::progress::for_stderr("restoring", quiet);
    let report = restorer::restore(cfg, opts, progress.as_ref()).await?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// `restorer restore --only`: the report as one JSON line.
async fn extract(
    cfg: &Config,
    id: &str,
    only: &restorer::only::Only,
    into: &std::path::Path,
    quiet: bool,
) -> anyhow::Result<()> {
    let int = restorer::Interrupt::default();
    int.on_signals("stopping the partial restore")?;
    let progress = common::progress::for_stderr("extracting", quiet);
    let r = restorer::only::extract(cfg, id, only, into, int.flag(), progress.as_ref()).await?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

/// `restorer prune`: metrics only with `--apply` (a dry run changes nothing).
async fn prune(cfg: &Config, apply: bool, json: bool) -> anyhow::Result<()> {
    let prune = restorer::prune::prune(cfg, apply);
    let report = match apply {
        true => metrics::track(cfg, Job::Prune, prune).await?,
        false => prune.await?,
    };
    match json {
        true => println!("{}", serde_json::to_string_pretty(&report)?),
        false => print!("{}", restorer::prune::prune_lines(&report)),
    }
    Ok(())
}

/// `restorer drill`: the record's line, or the record as JSON; metrics.
async fn drill(cfg: &Config, opts: &DrillOpts, json: bool, quiet: bool) -> anyhow::Result<()> {
    opts.interrupt
        .on_signals("stopping the drill (its server is stopped and its scratch removed)")?;
    let progress = common::progress::for_stderr("drilling", quiet);
    let drill = restorer::drill::drill(cfg, opts, progress.as_ref());
    let report = metrics::track(cfg, Job::Drill, drill).await?;
    match json {
        true => println!("{}", serde_json::to_string(&report)?),
        false => println!("{}", restorer::drill::report_line(&report)),
    }
    Ok(())
}

/// `restorer recover`: what was done, or that nothing was to do.
async fn recover(cfg: &Config, start_timeout: Duration) -> anyhow::Result<()> {
    match restorer::recover(cfg, start_timeout).await? {
        Some(line) => println!("{line}"),
        None => println!("nothing to recover"),
    }
    Ok(())
}

/// `restorer keygen`: new key files (mode 0600); the public key on stdout.
fn keygen(identity: Option<&Path>, auth_key: Option<&Path>) -> anyhow::Result<()> {
    if let Some(p) = identity {
        println!("{}", restorer::keygen::identity(p)?);
    }
    if let Some(p) = auth_key {
        restorer::keygen::auth_key(p)?;
        tracing::info!("wrote a new auth key to {}", p.display());
    }
    Ok(())
}

/// `--until`: "latest" or an RFC 3339 time.
fn parse_until(s: &str) -> anyhow::Result<common::binlog::Target> {
    use common::binlog::Target;
    if s == "latest" {
        return Ok(Target::Latest);
    }
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| Target::Time(t.to_offset(time::UtcOffset::UTC)))
        .map_err(|e| {
            common::error::config_err(format!(
                "--until {s:?}: {e}: give an RFC 3339 time such as 2026-11-28T10:15:00Z, or latest"
            ))
        })
}
