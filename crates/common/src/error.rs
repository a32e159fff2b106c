//! Error kinds that decide the exit code of every mysnap program.
//!
//! Library code returns `anyhow::Error` with context; where the kind of failure
//! matters to the operator (configuration, lock, integrity), the chain holds a
//! typed error that knows its exit code ([`Error`] here; the archive, store and
//! manifest errors in their modules), and `cli::exit_code_of` finds the first.
//! A leaf module: it knows no other module of this crate.

/// The documented exit codes (README, "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    Success = 0,
    Failure = 1,
    Usage = 2,
    LockTimeout = 3,
    Integrity = 4,
    /// `restorer status --max-age`: a backup name's newest complete backup
    /// is older than the limit, or there is none.
    Stale = 5,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration or usage: exit 2.
    #[error("{0}")]
    Config(String),
    /// The lock could not be taken within its retries, or was ended because it
    /// was held for `mysql.max_hold`: exit 3.
    #[error("{0}")]
    LockTimeout(String),
    /// Checksum, size, truncated or unsafe archive: exit 4.
    #[error("{0}")]
    Integrity(String),
    /// A backup older than `restorer status --max-age`, or none: exit 5.
    #[error("{0}")]
    Stale(String),
}

impl Error {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Config(_) => ExitCode::Usage,
            Error::LockTimeout(_) => ExitCode::LockTimeout,
            Error::Integrity(_) => ExitCode::Integrity,
            Error::Stale(_) => ExitCode::Stale,
        }
    }
}

/// Shorthand for a configuration error (exit 2).
pub fn config_err(msg: impl Into<String>) -> anyhow::Error {
    Error::Config(msg.into()).into()
}

/// Shorthand for an integrity error (exit 4).
pub fn integrity_err(msg: impl Into<String>) -> anyhow::Error {
    Error::Integrity(msg.into()).into()
}
