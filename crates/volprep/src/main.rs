//! volprep: prepares the volume the server's data lives on (see lib.rs).

use std::path::PathBuf;

use clap::Parser;
use common::cli::{exit_with, GlobalArgs};

#[derive(Parser)]
#[command(
    version,
    about = "Prepare the data volume: PV, VG, LV, filesystem, mount and data directory (lvm), or btrfs and a subvolume; idempotent",
    after_help = "Exit codes: 0 done (or everything already in place), 1 failure or refusal, 2 usage or configuration error."
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    /// Also add an fstab line for the mount (with nofail)
    #[arg(long)]
    fstab: bool,
    /// The fstab file to edit with --fstab
    #[arg(long, value_name = "PATH", default_value = "/etc/fstab", hide = true)]
    fstab_file: PathBuf,
    /// Wipe a device (or mount over a directory) holding something volprep did not create
    #[arg(long)]
    force: bool,
    /// Print the commands that would change something (stdout), changing nothing
    #[arg(long)]
    dry_run: bool,
    /// Move an existing data directory onto the volume (stops and starts the server
    /// with mysql.stop_command/start_command; the old one is kept and replaced by a symlink)
    #[arg(long, value_name = "FROM")]
    move_datadir: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let cli: Cli = common::cli::parse();
    cli.global.init_logging();
    exit_with((|| {
        let cfg = cli.global.load_config()?;
        let opts = volprep::Options {
            fstab: cli.fstab,
            fstab_file: cli.fstab_file.clone(),
            force: cli.force,
            dry_run: cli.dry_run,
            move_datadir: cli.move_datadir.clone(),
        };
        let report = volprep::run(&cfg, &opts)?;
        if cli.dry_run {
            for line in &report.planned {
                println!("{line}");
            }
            if report.planned.is_empty() {
                tracing::info!("dry run: everything is in place, nothing would change");
            }
        } else if report.changed.is_empty() {
            tracing::info!(
                "everything is in place ({} checks), nothing changed",
                report.in_place.len()
            );
        } else {
            tracing::info!(
                "volume ready: {} change(s), {} already in place",
                report.changed.len(),
                report.in_place.len()
            );
        }
        Ok(())
    })())
}
