//! restorer: list, verify and restore backups; provision replicas.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use common::cli::{exit_with, runtime, GlobalArgs};
use common::error::{config_err, integrity_err};
use restorer::{ReplicaOf, RestoreOpts};

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
    },
}

fn replica_opts(
    replica_of: Option<String>,
    from_source: bool,
    user: Option<String>,
    password_file: Option<PathBuf>,
    m_source: Option<(String, u16)>,
) -> anyhow::Result<Option<ReplicaOf>> {
    let target = match (replica_of, from_source) {
        (Some(hp), _) => {
            let (host, port) = hp.rsplit_once(':').unwrap_or((&hp, "3306"));
            let port = port.parse().map_err(|_| {
                config_err(format!("--replica-of {hp:?}: the port is not a number"))
            })?;
            common::grammar::host(host)
                .map_err(|e| config_err(format!("--replica-of {hp:?}: {e}")))?;
            Some((host.to_string(), port))
        }
        (None, true) => {
            if let Some((host, _)) = &m_source {
                // Recorded in the manifest, which the store's writers control.
                common::grammar::host(host).map_err(|e| {
                    integrity_err(format!(
                        "the source host recorded in the backup (--replica-of-source): {e}; use --replica-of HOST:PORT"
                    ))
                })?;
            }
            m_source
        }
        (None, false) => None,
    };
    let Some((host, port)) = target else {
        if user.is_some() || password_file.is_some() {
            return Err(config_err(
                "--replication-user and --replication-password-file need --replica-of HOST:PORT",
            ));
        }
        return Ok(None);
    };
    let user = user.ok_or_else(|| config_err("--replica-of needs --replication-user"))?;
    common::grammar::user(&user).map_err(|e| config_err(format!("--replication-user: {e}")))?;
    let file = password_file
        .ok_or_else(|| config_err("--replica-of needs --replication-password-file"))?;
    let password = common::mysql::read_secret_file(&file, "--replication-password-file")?
        .trim_end_matches(['\n', '\r'])
        .to_string();
    restorer::replica::check_password(&password)?;
    Ok(Some(ReplicaOf {
        host,
        port,
        user,
        password,
    }))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    cli.global.init_logging();
    let quiet = cli.global.quiet();
    exit_with(runtime().block_on(async {
        let cfg = cli.global.load_config()?;
        match cli.command {
            Cmd::List { json } => {
                let backups = restorer::list(&cfg).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&backups)?);
                } else {
                    println!("{:<17} {:<20} {:>10} {:<5} {:<28} server", "id", "time", "size", "codec", "binlog");
                    for m in &backups {
                        let a = m.archive.as_ref().expect("listed backups are complete");
                        let binlog = m.binlog.as_ref().map_or("-".to_string(), |b| format!("{}:{}", b.file, b.position));
                        println!(
                            "{:<17} {:<20} {:>10} {:<5} {:<28} {}",
                            m.backup_id,
                            m.created_at.get(..19).unwrap_or(&m.created_at),
                            bytesize::ByteSize(a.size).to_string(),
                            format!("{:?}", a.compression).to_lowercase(),
                            binlog,
                            m.server.version
                        );
                    }
                }
            }
            Cmd::Verify { id } => {
                let progress = common::progress::for_stderr("verifying", quiet);
                let (m, s) = restorer::verify(&cfg, &id, progress.as_ref()).await?;
                tracing::info!("backup {} is intact: {} entries, {} files", m.backup_id, s.entries, s.files);
                println!("{}", m.backup_id);
            }
            Cmd::Restore {
                id,
                replica_of,
                replica_of_source,
                replication_user,
                replication_password_file,
                stop_first,
                ignore_version,
                start_timeout,
            } => {
                // Resolved before anything is touched; the source host comes from the manifest
                // only with --replica-of-source, which restore checks again.
                let from_manifest = if replica_of_source && replica_of.is_none() {
                    let m = restorer::list(&cfg).await?;
                    let m = if id == "latest" { m.into_iter().next() } else { m.into_iter().find(|m| m.backup_id == id) };
                    m.and_then(|m| m.source).map(|s| (s.host.to_string(), s.port))
                } else {
                    None
                };
                if replica_of_source && replica_of.is_none() && from_manifest.is_none() {
                    return Err(config_err(format!("backup {id} records no source (it was not taken on a replica): use --replica-of HOST:PORT")));
                }
                let replica = replica_opts(replica_of, replica_of_source, replication_user, replication_password_file, from_manifest)?;
                let opts = RestoreOpts { id, replica_of: replica, replica_of_source, stop_first, ignore_version, start_timeout };
                let progress = common::progress::for_stderr("restoring", quiet);
                let report = restorer::restore(&cfg, &opts, progress.as_ref()).await?;
                println!("{}", serde_json::to_string(&report)?);
            }
        }
        Ok(())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::cli::exit_code_of;
    use common::ExitCode;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replica_flags_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let pass = |text: &str| {
            let p = dir.path().join("pass");
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            Some(p)
        };
        let ok = replica_opts(
            Some("db1:3307".into()),
            false,
            Some("repl".into()),
            pass("p'w\\%\n"),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (ok.host.as_str(), ok.port, ok.password.as_str()),
            ("db1", 3307, "p'w\\%")
        );
        let cases = [
            (
                Some("db1',MASTER_HOST='x:3306".to_string()),
                "repl",
                "pw\n",
                None,
                "--replica-of",
                ExitCode::Usage,
            ),
            (
                Some("db1:3306".to_string()),
                "r'; --",
                "pw\n",
                None,
                "--replication-user",
                ExitCode::Usage,
            ),
            (
                Some("db1:3306".to_string()),
                "repl",
                "pw\nSTART SLAVE\n",
                None,
                "--replication-password-file",
                ExitCode::Usage,
            ),
            (
                Some("db1:3306".to_string()),
                "repl",
                "p\0w",
                None,
                "--replication-password-file",
                ExitCode::Usage,
            ),
            (
                None,
                "repl",
                "pw",
                Some(("db1' x".to_string(), 3306)),
                "--replica-of-source",
                ExitCode::Integrity,
            ),
        ];
        for (replica_of, user, pw, source, flag, code) in cases {
            let from_source = replica_of.is_none();
            let err = replica_opts(replica_of, from_source, Some(user.into()), pass(pw), source)
                .unwrap_err();
            assert_eq!(exit_code_of(&err), code, "{err}");
            assert!(err.to_string().contains(flag), "{err}");
            assert!(!err.to_string().contains("START SLAVE"), "{err}");
        }
    }
}
