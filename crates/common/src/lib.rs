//! Shared library of mysnap: everything the four programs have in common.
//!
//! - [`config`]: the one TOML file of the contract.
//! - [`manifest`]: the hand-off file between snapshotter, archiver and restorer.
//! - [`drill`]: the record of a restore drill, stored beside the manifest.
//! - [`binlog`]: binary logs: the walk over their events, and the metadata of an archived one.
//! - [`retention`]: which backups a `[retention]` policy keeps (pure).
//! - [`store`]: where archives live (S3 or a directory), behind one trait.
//! - [`archive`]: the archive format: store keys, the write and the read path.
//! - [`codec`]: zstd, xz, none; and the SHA-256 of the stored bytes.
//! - [`snapshot`]: filesystem snapshots (btrfs, lvm) behind one trait.
//! - [`mysql`]: connecting to the server, SQL literals, redaction.
//! - [`dialect`]: the SQL that differs by flavor and version, and its typed rows.
//! - [`reader`]: the `Read` adapters of the data path (chunks, progress).
//! - [`mountinfo`]: mount points as the kernel and fstab spell them.
//! - [`cmd`]: the one way external commands are run (argv, never a shell string).
//! - [`grammar`]: what names and values from a manifest or a flag may look like.
//! - [`cli`]: flags, logging and exit codes shared by the binaries.
//! - [`metrics`]: Prometheus textfile metrics of each job run.

pub mod archive;
pub mod binlog;
pub mod catalog;
pub mod cli;
pub mod cmd;
pub mod codec;
pub mod config;
pub mod crypt;
pub mod dialect;
pub mod drill;
pub mod error;
pub mod grammar;
pub mod ids;
pub mod keys;
pub mod manifest;
pub mod metrics;
pub mod mountinfo;
pub mod mysql;
pub mod progress;
pub mod reader;
pub mod retention;
pub mod signal;
pub mod snapshot;
pub mod state;
pub mod store;

pub use error::{Error, ExitCode};
