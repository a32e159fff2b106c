//! archiver: streams a snapshot to the store and prints the backup id.

use std::io::BufRead;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use common::cli::{exit_with, runtime, GlobalArgs};
use common::metrics::{self, Job, Started};

/// Archives the snapshot a manifest names (tar, compress, SHA-256) straight
/// into the store, stores the manifest last, and removes the snapshot.
#[derive(Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    /// The manifest snapshotter printed [default: one line on stdin]
    #[arg(long, value_name = "PATH")]
    manifest: Option<PathBuf>,
    /// A full backup, also when backup.full_every would make it incremental
    #[arg(long)]
    full: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Ships the server's binary logs to the store, for point-in-time
    /// recovery: every binlog.rotate_interval the open binary log is closed
    /// (when it holds a transaction) and every closed one not yet stored is
    /// shipped. Runs until SIGINT/SIGTERM; resumes from what is stored.
    Binlogs {
        /// One cycle (close, ship what is closed), then exit: for cron and tests
        #[arg(long)]
        once: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli: Cli = common::cli::parse();
    cli.global.init_logging();
    exit_with(runtime().block_on(async {
        let cfg = cli.global.load_config()?;
        if let Some(Command::Binlogs { once }) = cli.command {
            let cancel = common::signal::Interrupt::default();
            cancel.on_signals("stopping after the segment being shipped")?;
            let cycle = archiver::binlogs::run(&cfg, once, &cancel).await?;
            if once {
                for m in &cycle.shipped {
                    println!("{}", m.segment().meta_key(&m.name));
                }
            }
            return Ok(());
        }
        let manifest = match cli.manifest {
            Some(p) => p,
            None => {
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line)?;
                let line = line.trim();
                if line.is_empty() {
                    return Err(common::error::config_err(
                        "no manifest: pass --manifest PATH or pipe snapshotter's output in (snapshotter | archiver)",
                    ));
                }
                PathBuf::from(line)
            }
        };
        // From here on the run is a backup's end: recorded as the backup job
        // (without a manifest the snapshotter failed, and recorded that).
        let started = Started::now();
        let result = async {
            // SIGINT/SIGTERM: the pipeline stops, the upload is aborted, the snapshot removed.
            let cancel = common::signal::Interrupt::default();
            cancel.on_signals("aborting the upload and removing the snapshot")?;
            let progress = common::progress::for_stderr("archiving", cli.global.quiet());
            let archived = archiver::run(&cfg, &manifest, progress.as_ref(), &cancel, cli.full).await?;
            println!("{}", archived.backup_id);
            Ok(archived)
        }
        .await;
        metrics::record(&cfg, Job::Backup, started, &result);
        result.map(drop)
    }))
}
