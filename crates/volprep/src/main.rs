//! volprep: not yet implemented (see the open issues); exits 1 so that no script
//! mistakes it for a success.

use clap::Parser;
use common::cli::{exit_with, GlobalArgs};

#[derive(Parser)]
#[command(version, about = "mysnap volprep (not yet implemented)")]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    /// Arguments for later versions
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    rest: Vec<String>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    cli.global.init_logging();
    let _ = cli.rest;
    exit_with(Err(anyhow::anyhow!(
        "volprep is not yet implemented in this version of mysnap"
    )))
}
