//! The one way mysnap runs external commands: argv, never a shell string;
//! stderr captured and quoted in the error.

use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("cannot start `{cmd}`: {source} (is it installed and on PATH?)")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
}

/// Renders argv for messages, quoting arguments with spaces.
pub fn display_argv<S: AsRef<OsStr>>(argv: &[S]) -> String {
    argv.iter()
        .map(|a| {
            let a = a.as_ref().to_string_lossy();
            if a.is_empty() || a.contains(char::is_whitespace) {
                format!("'{a}'")
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `argv`, returns its stdout; a non-zero exit is an error quoting the
/// command and the last lines of its stderr.
pub fn run<S: AsRef<OsStr>>(argv: &[S]) -> Result<String, CmdError> {
    let out = output(argv)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`run`], but returns the whole output.
pub fn output<S: AsRef<OsStr>>(argv: &[S]) -> Result<Output, CmdError> {
    let cmd = display_argv(argv);
    let (prog, args) = argv.split_first().ok_or_else(|| CmdError::Spawn {
        cmd: cmd.clone(),
        source: std::io::Error::other("empty command"),
    })?;
    tracing::debug!(command = %cmd, "run");
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .map_err(|source| CmdError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(out)
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = tail[tail.len().saturating_sub(3)..].join(" | ");
        Err(CmdError::Failed {
            cmd,
            status: out.status.to_string(),
            stderr: tail,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_quotes_command_and_stderr() {
        let err = run(&["sh", "-c", "echo boom >&2; exit 3", "arg with space"]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("`sh -c 'echo boom >&2; exit 3' 'arg with space'`"),
            "{msg}"
        );
        assert!(msg.contains("boom"), "{msg}");
    }

    #[test]
    fn missing_program_says_so() {
        let err = run(&["/nonexistent/mysnap-prog"]).unwrap_err().to_string();
        assert!(
            err.contains("cannot start `/nonexistent/mysnap-prog`"),
            "{err}"
        );
    }

    #[test]
    fn stdout_is_returned() {
        assert_eq!(run(&["echo", "hi"]).unwrap(), "hi\n");
    }
}
