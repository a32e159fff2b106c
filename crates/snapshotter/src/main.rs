//! snapshotter: lock, flush, snapshot, unlock; writes the manifest and prints its path.

use clap::Parser;
use common::cli::{exit_with, runtime, GlobalArgs};

/// Takes a consistent filesystem snapshot of the MySQL/MariaDB volume and
/// prints the path of its manifest (hand it to `archiver`).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    cli.global.init_logging();
    exit_with(runtime().block_on(async {
        let cfg = cli.global.load_config()?;
        let path = snapshotter::run(&cfg).await?;
        println!("{}", path.display());
        Ok(())
    }))
}
