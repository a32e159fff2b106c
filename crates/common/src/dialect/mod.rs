//! The SQL that differs by flavor (MySQL, MariaDB) and version, in one place:
//! which statement to run ([`ServerVersion`]) and the typed rows it answers
//! ([`BinlogStatus`], [`ReplicaStatus`], the GTID state). Column names are
//! looked up here, once; callers see fields.
//!
//! The parsing is a pure function over a row's `(column, value)` pairs
//! ([`FromColumns`]), tested on rows recorded from real servers
//! (`testdata/`), the way `snapshot::lvm` is tested on recorded `lvs` output.

mod rows;

pub use rows::{BinlogStatus, FromColumns, GtidState, ReplicaStatus};

use anyhow::Context;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Row};

use crate::config::LockMethod;
use crate::error::config_err;
use crate::manifest::Flavor;

/// The server's product and version, from `SELECT VERSION()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerVersion {
    pub flavor: Flavor,
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
    pub text: String,
}

impl ServerVersion {
    pub fn parse(text: &str) -> ServerVersion {
        let flavor = if text.to_ascii_lowercase().contains("mariadb") {
            Flavor::Mariadb
        } else {
            Flavor::Mysql
        };
        // "5.5.5-10.11.6-MariaDB" is how old clients were shown MariaDB 10+.
        let core = text.strip_prefix("5.5.5-").unwrap_or(text);
        let mut nums = core
            .split(|c: char| !c.is_ascii_digit())
            .take(3)
            .map(|n| n.parse::<u32>().unwrap_or(0));
        ServerVersion {
            flavor,
            major: nums.next().unwrap_or(0),
            minor: nums.next().unwrap_or(0),
            patch: nums.next().unwrap_or(0),
            text: text.to_string(),
        }
    }

    /// The version a server binary reports for `--version`:
    /// `mariadbd  Ver 10.11.6-MariaDB-0+deb12u1 for debian-linux-gnu on x86_64`.
    pub fn from_version_output(out: &str) -> Option<ServerVersion> {
        out.split_whitespace()
            .skip_while(|w| *w != "Ver")
            .nth(1)
            .map(ServerVersion::parse)
    }

    fn at_least(&self, major: u32, minor: u32, patch: u32) -> bool {
        (self.major, self.minor, self.patch) >= (major, minor, patch)
    }

    fn mysql_at_least(&self, major: u32, minor: u32, patch: u32) -> bool {
        self.flavor == Flavor::Mysql && self.at_least(major, minor, patch)
    }

    /// Whether the server has `BACKUP STAGE` (MariaDB 10.4.1 and later).
    pub fn has_backup_stage(&self) -> bool {
        self.flavor == Flavor::Mariadb && self.at_least(10, 4, 1)
    }

    /// The lock method to use for `mysql.lock_method = configured`.
    ///
    /// `auto` is BACKUP STAGE where the server has it, FLUSH TABLES WITH READ
    /// LOCK elsewhere. Measured with `cargo xtask bench --size 1GiB
    /// --lock-only --lock-runs 30` (MariaDB 10.11, btrfs on a loop device, 2
    /// cores, release build, the methods alternating; stall: the longest one
    /// autocommit `UPDATE` from another connection took during a snapshotter
    /// run; hold: how long commits were blocked), medians (max) of 30:
    ///
    /// | server   | hold ftwrl      | hold backup_stage | stall ftwrl      | stall backup_stage |
    /// |----------|-----------------|-------------------|------------------|--------------------|
    /// | idle     | 16.9 (27.6) ms  | 14.3 (17.7) ms    | 17.7 (168) ms    | 17.4 (54) ms       |
    /// | sysbench | 27.6 (743) ms   | 22.2 (68) ms      | 47.2 (3169) ms   | 39.0 (925) ms      |
    ///
    /// BACKUP STAGE holds commits a little shorter (no table flush, no wait
    /// on running statements) and its worst cases are far milder; the
    /// writer's stall is mostly the snapshot's own I/O. The deciding difference: a
    /// long-running write makes FLUSH TABLES WITH READ LOCK wait, with every
    /// other writer queued behind it, and give up (exit 3); BACKUP STAGE
    /// BLOCK_COMMIT waits only for commits in progress and goes ahead.
    pub fn lock_method(&self, configured: LockMethod) -> anyhow::Result<LockMethod> {
        match configured {
            LockMethod::Auto if self.has_backup_stage() => Ok(LockMethod::BackupStage),
            LockMethod::Auto => Ok(LockMethod::Ftwrl),
            LockMethod::BackupStage if !self.has_backup_stage() => Err(config_err(format!(
                "mysql.lock_method = \"backup_stage\" needs MariaDB 10.4.1 or later, but the server is {}: set mysql.lock_method to \"ftwrl\" or \"auto\"",
                self.text
            ))),
            m => Ok(m),
        }
    }

    /// The statement that reports the binary log file and position.
    pub fn binlog_status_sql(&self) -> &'static str {
        if self.mysql_at_least(8, 2, 0) {
            "SHOW BINARY LOG STATUS"
        } else {
            "SHOW MASTER STATUS"
        }
    }

    /// The statement that reports replication from a source.
    pub fn replica_status_sql(&self) -> &'static str {
        if self.mysql_at_least(8, 0, 22) {
            "SHOW REPLICA STATUS"
        } else {
            "SHOW SLAVE STATUS"
        }
    }

    /// The query of the GTID state of what this server has written (one
    /// column, `gtid`; NULL on MySQL without GTIDs).
    pub fn gtid_sql(&self) -> &'static str {
        match self.flavor {
            Flavor::Mariadb => "SELECT @@GLOBAL.gtid_binlog_pos AS gtid",
            Flavor::Mysql => {
                "SELECT IF(@@GLOBAL.gtid_mode = 'ON', @@GLOBAL.gtid_executed, NULL) AS gtid"
            }
        }
    }

    /// The query of a replica's GTID position when its status row lacks it:
    /// MariaDB's `SHOW SLAVE STATUS` has no `Gtid_Slave_Pos` column, so it is
    /// read from `@@gtid_slave_pos` (one column, `gtid`). MySQL's row has
    /// `Executed_Gtid_Set`.
    pub fn replica_gtid_sql(&self) -> Option<&'static str> {
        match self.flavor {
            Flavor::Mariadb => Some("SELECT @@GLOBAL.gtid_slave_pos AS gtid"),
            Flavor::Mysql => None,
        }
    }

    /// The words of the statements that point a server at its source.
    pub fn replication_sql(&self) -> ReplicationSql {
        let mysql_gtid = |reset, option| GtidStart {
            reset: Some(reset),
            variable: "gtid_purged",
            option,
        };
        if self.mysql_at_least(8, 0, 23) {
            ReplicationSql {
                stop: "STOP REPLICA",
                start: "START REPLICA",
                change: "CHANGE REPLICATION SOURCE TO",
                host: "SOURCE_HOST",
                port: "SOURCE_PORT",
                user: "SOURCE_USER",
                password: "SOURCE_PASSWORD",
                log_file: "SOURCE_LOG_FILE",
                log_pos: "SOURCE_LOG_POS",
                // RESET MASTER is gone in 8.4; its new name came in 8.2.0.
                gtid: mysql_gtid(
                    if self.at_least(8, 2, 0) {
                        "RESET BINARY LOGS AND GTIDS"
                    } else {
                        "RESET MASTER"
                    },
                    "SOURCE_AUTO_POSITION=1",
                ),
            }
        } else {
            ReplicationSql {
                stop: "STOP SLAVE",
                start: "START SLAVE",
                change: "CHANGE MASTER TO",
                host: "MASTER_HOST",
                port: "MASTER_PORT",
                user: "MASTER_USER",
                password: "MASTER_PASSWORD",
                log_file: "MASTER_LOG_FILE",
                log_pos: "MASTER_LOG_POS",
                gtid: match self.flavor {
                    Flavor::Mariadb => GtidStart {
                        reset: None,
                        variable: "gtid_slave_pos",
                        option: "MASTER_USE_GTID=slave_pos",
                    },
                    Flavor::Mysql => mysql_gtid("RESET MASTER", "MASTER_AUTO_POSITION=1"),
                },
            }
        }
    }
}

/// The keywords of the replication statements of one server version: the
/// statement names and the options of CHANGE MASTER / CHANGE REPLICATION
/// SOURCE. Values are not here: the restorer checks, quotes and binds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicationSql {
    pub stop: &'static str,
    pub start: &'static str,
    /// `CHANGE MASTER TO` or `CHANGE REPLICATION SOURCE TO`.
    pub change: &'static str,
    pub host: &'static str,
    pub port: &'static str,
    pub user: &'static str,
    pub password: &'static str,
    pub log_file: &'static str,
    pub log_pos: &'static str,
    pub gtid: GtidStart,
}

/// How a replica is started from a GTID set: optionally a statement that
/// clears the server's own GTID history, then `SET GLOBAL <variable> = set`,
/// then `option` appended to the CHANGE statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GtidStart {
    pub reset: Option<&'static str>,
    pub variable: &'static str,
    pub option: &'static str,
}

/// The first row of `sql` as `T`, `None` when there is none.
async fn first_row<T: FromColumns>(conn: &mut Conn, sql: &str) -> anyhow::Result<Option<T>> {
    let rows: Vec<Row> = conn
        .query(sql)
        .await
        .with_context(|| format!("SQL `{sql}` failed"))?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let owned = crate::mysql::row_columns(row);
    let cols: Vec<(&str, Option<&str>)> = owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_deref()))
        .collect();
    T::from_columns(sql, &cols).map(Some)
}

/// The server's version (`SELECT VERSION()`).
pub async fn server_version(conn: &mut Conn) -> anyhow::Result<ServerVersion> {
    let sql = "SELECT VERSION() AS version";
    let row: Option<rows::Version> = first_row(conn, sql).await?;
    Ok(ServerVersion::parse(&row.map(|v| v.0).unwrap_or_default()))
}

/// The binary log file and position (`SHOW MASTER STATUS` or `SHOW BINARY
/// LOG STATUS`); `None` when the binary log is off.
pub async fn binlog_status(
    conn: &mut Conn,
    v: &ServerVersion,
) -> anyhow::Result<Option<BinlogStatus>> {
    first_row(conn, v.binlog_status_sql()).await
}

/// The GTID state of what this server has written; `None` when empty or
/// when GTIDs are off.
pub async fn gtid_state(conn: &mut Conn, v: &ServerVersion) -> anyhow::Result<Option<String>> {
    Ok(first_row::<GtidState>(conn, v.gtid_sql())
        .await?
        .and_then(|g| g.gtid))
}

/// How this server replicates (`SHOW SLAVE STATUS` or `SHOW REPLICA
/// STATUS`), with the GTID position it has executed up to where the
/// server keeps it apart ([`ServerVersion::replica_gtid_sql`]); `None` when
/// it is no replica.
pub async fn replica_status(
    conn: &mut Conn,
    v: &ServerVersion,
) -> anyhow::Result<Option<ReplicaStatus>> {
    let Some(mut status) = first_row::<ReplicaStatus>(conn, v.replica_status_sql()).await? else {
        return Ok(None);
    };
    if let (None, Some(sql)) = (&status.gtid, v.replica_gtid_sql()) {
        status.gtid = first_row::<GtidState>(conn, sql)
            .await?
            .and_then(|g| g.gtid);
    }
    Ok(Some(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_pick_the_right_sql() {
        let maria = ServerVersion::parse("10.11.6-MariaDB-0+deb12u1-log");
        assert_eq!(
            (maria.flavor, maria.major, maria.minor, maria.patch),
            (Flavor::Mariadb, 10, 11, 6)
        );
        assert_eq!(maria.binlog_status_sql(), "SHOW MASTER STATUS");
        assert_eq!(maria.replica_status_sql(), "SHOW SLAVE STATUS");
        assert!(maria.gtid_sql().contains("gtid_binlog_pos"));
        assert!(maria.replica_gtid_sql().unwrap().contains("gtid_slave_pos"));
        let old = ServerVersion::parse("5.5.5-10.3.39-MariaDB");
        assert_eq!((old.flavor, old.major, old.minor), (Flavor::Mariadb, 10, 3));
        let my80 = ServerVersion::parse("8.0.21");
        assert_eq!(my80.flavor, Flavor::Mysql);
        assert_eq!(my80.replica_gtid_sql(), None);
        assert_eq!(my80.binlog_status_sql(), "SHOW MASTER STATUS");
        assert_eq!(my80.replica_status_sql(), "SHOW SLAVE STATUS");
        let my8022 = ServerVersion::parse("8.0.36-0ubuntu0.22.04.1");
        assert_eq!(my8022.replica_status_sql(), "SHOW REPLICA STATUS");
        let my84 = ServerVersion::parse("8.4.3");
        assert_eq!(my84.binlog_status_sql(), "SHOW BINARY LOG STATUS");
        assert!(my84.gtid_sql().contains("gtid_executed"));
    }

    #[test]
    fn replication_words_by_version() {
        let maria = ServerVersion::parse("10.11.6-MariaDB").replication_sql();
        assert_eq!(
            (maria.change, maria.start),
            ("CHANGE MASTER TO", "START SLAVE")
        );
        assert_eq!(maria.gtid.reset, None);
        assert_eq!(maria.gtid.variable, "gtid_slave_pos");
        let my8022 = ServerVersion::parse("8.0.22").replication_sql();
        assert_eq!(my8022.change, "CHANGE MASTER TO");
        assert_eq!(my8022.gtid.reset, Some("RESET MASTER"));
        assert_eq!(my8022.gtid.option, "MASTER_AUTO_POSITION=1");
        let my8023 = ServerVersion::parse("8.0.23").replication_sql();
        assert_eq!(my8023.change, "CHANGE REPLICATION SOURCE TO");
        assert_eq!(my8023.gtid.reset, Some("RESET MASTER"));
        let my84 = ServerVersion::parse("8.4.3").replication_sql();
        assert_eq!(
            (my84.stop, my84.log_pos),
            ("STOP REPLICA", "SOURCE_LOG_POS")
        );
        assert_eq!(my84.gtid.reset, Some("RESET BINARY LOGS AND GTIDS"));
        assert_eq!(my84.gtid.option, "SOURCE_AUTO_POSITION=1");
    }

    #[test]
    fn version_of_a_server_binary() {
        let v = ServerVersion::from_version_output(
            "mariadbd  Ver 10.11.6-MariaDB-0+deb12u1 for debian-linux-gnu on x86_64 (Debian 12)\n",
        )
        .unwrap();
        assert_eq!((v.flavor, v.major, v.minor), (Flavor::Mariadb, 10, 11));
        let v = ServerVersion::from_version_output(
            "/usr/sbin/mysqld  Ver 8.0.36-0ubuntu0.22.04.1 for Linux on x86_64 ((Ubuntu))",
        )
        .unwrap();
        assert_eq!(
            (v.flavor, v.major, v.minor, v.patch),
            (Flavor::Mysql, 8, 0, 36)
        );
        assert_eq!(ServerVersion::from_version_output("garbage"), None);
    }

    #[test]
    fn lock_method_by_server() {
        let auto = |v: &str| {
            ServerVersion::parse(v)
                .lock_method(LockMethod::Auto)
                .unwrap()
        };
        assert_eq!(auto("10.11.6-MariaDB-log"), LockMethod::BackupStage);
        assert_eq!(auto("5.5.5-10.4.1-MariaDB"), LockMethod::BackupStage);
        assert_eq!(auto("10.3.39-MariaDB"), LockMethod::Ftwrl);
        assert_eq!(auto("8.0.36"), LockMethod::Ftwrl);
        for v in ["8.0.36", "10.3.39-MariaDB"] {
            let err = ServerVersion::parse(v)
                .lock_method(LockMethod::BackupStage)
                .unwrap_err();
            assert_eq!(crate::cli::exit_code_of(&err), crate::ExitCode::Usage);
            assert!(err.to_string().contains("mysql.lock_method"), "{err}");
            assert!(err.to_string().contains(v), "{err}");
        }
        let maria = ServerVersion::parse("10.11.6-MariaDB");
        assert_eq!(
            maria.lock_method(LockMethod::Ftwrl).unwrap(),
            LockMethod::Ftwrl
        );
    }
}
