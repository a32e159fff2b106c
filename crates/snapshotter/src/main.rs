//! snapshotter: lock, flush, snapshot, unlock; writes the manifest and prints its path.

use std::io::Write;

use clap::Parser;
use common::cli::{exit_with, runtime, GlobalArgs};
use common::metrics::{self, Job, Started};

/// Takes a consistent filesystem snapshot of the MySQL/MariaDB volume and
/// prints the path of its manifest (hand it to `archiver`).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
}

fn main() -> std::process::ExitCode {
    let cli: Cli = common::cli::parse();
    cli.global.init_logging();
    exit_with(runtime().block_on(async {
        let cfg = cli.global.load_config()?;
        let started = Started::now();
        let result = snapshot_and_hand_on(&cfg).await;
        // The archiver records the backup; a failure here means there is none.
        if result.is_err() {
            metrics::record(&cfg, Job::Backup, started, &result);
        }
        result
    }))
}

/// Snapshots and prints the manifest's path for the archiver.
async fn snapshot_and_hand_on(cfg: &common::config::Config) -> anyhow::Result<()> {
    let path = snapshotter::run(cfg).await?;
    // A closed stdout (the archiver of `snapshotter | archiver` went
    // away) is an error, not a panic, and leaves no snapshot behind.
    let mut out = std::io::stdout().lock();
    let handed = writeln!(out, "{}", path.display()).and_then(|()| out.flush());
    if let Err(e) = handed {
        let why = format!(
            "cannot hand the manifest {} on: stdout: {e} (did the archiver exit?)",
            path.display()
        );
        return match snapshotter::abandon(cfg, &path) {
            Ok(()) => Err(anyhow::anyhow!("{why}; the snapshot was removed")),
            Err(c) => Err(c.context(why)),
        };
    }
    Ok(())
}
