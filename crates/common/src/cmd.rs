//! The one way mysnap runs external commands: argv, never a shell string;
//! stderr captured and quoted in the error; a timeout on every command
//! (killed when it passes it), so no step waits forever on a stuck tool.

use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The bound of [`run`] and [`output`]: LVM, btrfs, mount, mkfs, blkid.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// The bound of `mysql.stop_command` and `mysql.start_command` (a clean
/// InnoDB shutdown or a crash recovery can take long).
pub const SERVICE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("cannot start `{cmd}`: {source} (is it installed and on PATH?)")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("`{cmd}` did not finish within {after:?} and was killed")]
    TimedOut { cmd: String, after: Duration },
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

/// Runs `argv` within [`DEFAULT_TIMEOUT`], returns its stdout; a non-zero
/// exit is an error quoting the command and the last lines of its stderr.
pub fn run<S: AsRef<OsStr>>(argv: &[S]) -> Result<String, CmdError> {
    run_for(argv, Some(DEFAULT_TIMEOUT))
}

/// Like [`run`], with its own bound (`None`: none, for a copy of a whole
/// data directory).
pub fn run_for<S: AsRef<OsStr>>(argv: &[S], timeout: Option<Duration>) -> Result<String, CmdError> {
    let out = output_for(argv, timeout)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`run_for`], in a process group of its own: a Ctrl-C in the
/// terminal (SIGINT to the foreground group) does not reach it, so the
/// caller decides what a signal means (the restorer lets the server's stop
/// and start commands finish, then undoes or finishes the swap).
pub fn run_own_group_for<S: AsRef<OsStr>>(
    argv: &[S],
    timeout: Option<Duration>,
) -> Result<String, CmdError> {
    let out = output_with(argv, timeout, true)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`run`], but returns the whole output.
pub fn output<S: AsRef<OsStr>>(argv: &[S]) -> Result<Output, CmdError> {
    output_for(argv, Some(DEFAULT_TIMEOUT))
}

/// Like [`output`], with its own bound. The command waits in a thread, so
/// its end is seen at once (a command run under the server's lock must not
/// wait for a poll); when the bound passes it is killed (SIGKILL).
pub fn output_for<S: AsRef<OsStr>>(
    argv: &[S],
    timeout: Option<Duration>,
) -> Result<Output, CmdError> {
    output_with(argv, timeout, false)
}

fn output_with<S: AsRef<OsStr>>(
    argv: &[S],
    timeout: Option<Duration>,
    own_group: bool,
) -> Result<Output, CmdError> {
    let cmd = display_argv(argv);
    let (prog, args) = argv.split_first().ok_or_else(|| CmdError::Spawn {
        cmd: cmd.clone(),
        source: std::io::Error::other("empty command"),
    })?;
    tracing::debug!(command = %cmd, "run");
    let spawn_err = |source| CmdError::Spawn {
        cmd: cmd.clone(),
        source,
    };
    let mut command = Command::new(prog);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("LVM_SUPPRESS_FD_WARNINGS", "1");
    if own_group {
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
    }
    let child = command.spawn().map_err(spawn_err)?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let waited = match timeout {
        Some(t) => rx.recv_timeout(t),
        None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
    };
    let out = match waited {
        Ok(r) => r.map_err(spawn_err)?,
        Err(_) => {
            // Not reaped yet (the waiting thread has not returned), so the pid is still its own.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = rx.recv_timeout(Duration::from_secs(5));
            return Err(CmdError::TimedOut {
                cmd,
                after: timeout.unwrap_or_default(),
            });
        }
    };
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
    fn a_command_past_its_bound_is_killed_and_named() {
        let t = std::time::Instant::now();
        let err = run_for(&["sleep", "37"], Some(Duration::from_millis(200))).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(
            err.to_string()
                .contains("`sleep 37` did not finish within 200ms and was killed"),
            "{err}"
        );
        // Killed, not left running.
        let out = std::process::Command::new("pgrep")
            .args(["-x", "-f", "sleep 37"])
            .output()
            .unwrap();
        assert!(out.stdout.is_empty(), "still running: {:?}", out.stdout);
    }

    #[test]
    fn a_command_of_its_own_group_is_out_of_reach_of_the_terminal_s_ctrl_c() {
        let ours = nix::unistd::getpgrp().as_raw().to_string();
        let group_of = ["sh", "-c", "ps -o pgid= -p $$"];
        let shared = run(&group_of).unwrap();
        let own = run_own_group_for(&group_of, None).unwrap();
        assert_eq!(shared.trim(), ours);
        assert_ne!(own.trim(), ours);
    }

    #[test]
    fn stdout_is_returned() {
        assert_eq!(run(&["echo", "hi"]).unwrap(), "hi\n");
    }
}
