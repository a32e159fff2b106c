//! What every mysnap binary shares: global flags, logging to stderr, and the
//! mapping of errors to documented exit codes.

use std::path::PathBuf;

use crate::config::{self, Config};
use crate::error::{Error, ExitCode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flags common to every program (README, "Operations").
#[derive(Debug, Clone, clap::Args)]
pub struct GlobalArgs {
    /// Config file [default: $MYSNAP_CONFIG, else /etc/mysnap/mysnap.toml]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// More log output (-v debug, -vv trace)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less log output (-q warnings only, -qq errors only); no progress
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub quiet: u8,
    /// Log format on stderr
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl GlobalArgs {
    pub fn init_logging(&self) {
        let level = match i16::from(self.verbose) - i16::from(self.quiet) {
            i16::MIN..=-2 => "error",
            -1 => "warn",
            0 => "info",
            1 => "debug",
            _ => "trace",
        };
        // Our crates at `level`; the SDK and friends only warn.
        let filter = tracing_subscriber::EnvFilter::try_from_env("MYSNAP_LOG").unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!(
                "warn,common={level},snapshotter={level},archiver={level},restorer={level},volprep={level}"
            ))
        });
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        let _ = match self.log_format {
            LogFormat::Text => builder.with_target(false).try_init(),
            LogFormat::Json => builder.json().try_init(),
        };
    }

    pub fn load_config(&self) -> anyhow::Result<Config> {
        Config::load(&config::resolve_path(self.config.as_deref()))
    }

    pub fn quiet(&self) -> bool {
        self.quiet > 0
    }
}

/// Runs a binary's body and turns its outcome into the documented exit code,
/// printing a failure as one line on stderr.
pub fn exit_with(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code_of(&e);
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            std::process::ExitCode::from(code as u8)
        }
    }
}

/// A multi-threaded tokio runtime for a binary.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime")
}

impl From<ExitCode> for std::process::ExitCode {
    fn from(c: ExitCode) -> Self {
        std::process::ExitCode::from(c as u8)
    }
}

/// The exit code for an error chain: the first typed error in it decides, else 1.
pub fn exit_code_of(err: &anyhow::Error) -> ExitCode {
    err.chain()
        .find_map(|e| {
            if let Some(e) = e.downcast_ref::<Error>() {
                Some(e.exit_code())
            } else if let Some(e) = e.downcast_ref::<crate::archive::ArchiveError>() {
                Some(e.exit_code())
            } else if let Some(e) = e.downcast_ref::<crate::store::StoreError>() {
                Some(e.exit_code())
            } else {
                e.downcast_ref::<crate::manifest::ManifestError>()
                    .map(|_| ExitCode::Integrity)
            }
        })
        .unwrap_or(ExitCode::Failure)
}

/// Parses the command line of program `C`. Two hidden first arguments, for
/// packaging (README, "Shell completions and man pages"), print instead
/// and exit: `--generate-completions bash|zsh|fish|elvish|powershell` (a
/// completion script on stdout) and `--generate-man DIR` (`<program>.1` and
/// one page per subcommand, `<program>-<subcommand>.1`, into DIR).
pub fn parse<C: clap::Parser>() -> C {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let first = args.get(1).and_then(|a| a.to_str());
    let value = args.get(2).and_then(|a| a.to_str());
    match (first, value) {
        (Some("--generate-completions"), shell) => {
            std::process::exit(generate_completions::<C>(shell))
        }
        (Some("--generate-man"), dir) => std::process::exit(generate_man::<C>(dir)),
        _ => C::parse(),
    }
}

fn generate_completions<C: clap::CommandFactory>(shell: Option<&str>) -> i32 {
    use clap::ValueEnum;
    let Some(shell) = shell.and_then(|s| clap_complete::Shell::from_str(s, true).ok()) else {
        eprintln!(
            "error: --generate-completions takes a shell: bash, zsh, fish, elvish or powershell"
        );
        return ExitCode::Usage as i32;
    };
    let mut cmd = C::command();
    let name = cmd.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    match std::io::Write::write_all(&mut std::io::stdout(), &script) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: cannot write the completion script: {e}");
            ExitCode::Failure as i32
        }
    }
}

fn generate_man<C: clap::CommandFactory>(dir: Option<&str>) -> i32 {
    let Some(dir) = dir else {
        eprintln!("error: --generate-man takes the directory to write the pages into");
        return ExitCode::Usage as i32;
    };
    match clap_mangen::generate_to(C::command(), dir) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: cannot write man pages into {dir}: {e}");
            ExitCode::Failure as i32
        }
    }
}

#[cfg(test)]
mod tests {
    /// A program like mysnap's: global flags and a required subcommand.
    #[derive(clap::Parser)]
    #[command(name = "prog", version, about = "A program")]
    struct Cli {
        #[command(flatten)]
        global: super::GlobalArgs,
        #[command(subcommand)]
        command: Cmd,
    }

    #[derive(clap::Subcommand)]
    enum Cmd {
        /// Shows the status
        Status,
    }

    #[test]
    fn completions_and_man_pages_are_generated_for_every_shell_and_subcommand() {
        use clap::CommandFactory;
        for shell in ["bash", "zsh", "fish"] {
            let mut out = Vec::new();
            let s = <clap_complete::Shell as clap::ValueEnum>::from_str(shell, true).unwrap();
            clap_complete::generate(s, &mut Cli::command(), "prog", &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.contains("status") && text.contains("config"),
                "{shell}"
            );
        }
        assert_eq!(super::generate_completions::<Cli>(Some("tcsh")), 2);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(super::generate_man::<Cli>(dir.path().to_str()), 0);
        let page = std::fs::read_to_string(dir.path().join("prog.1")).unwrap();
        assert!(
            page.contains("A program") && page.contains("config"),
            "{page}"
        );
        assert!(dir.path().join("prog-status.1").is_file());
    }
}
