//! Pointing a restored server at its source: the statement for each flavor
//! and version, with the password never logged or shown in an error.

use common::manifest::{Flavor, Manifest};
use common::mysql::ServerVersion;

/// Where and as whom to replicate.
#[derive(Clone)]
pub struct ReplicaOf {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
}

/// The coordinates to start from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAt {
    Gtid(String),
    File { file: String, position: u64 },
}

/// Which coordinates of the manifest to use: the server's own (replicating
/// from the backed-up server) or, with `from_source`, its source's.
pub fn start_at(m: &Manifest, from_source: bool) -> anyhow::Result<StartAt> {
    if from_source {
        let s = m.source.as_ref().ok_or_else(|| {
            common::error::config_err(format!(
                "backup {} was not taken on a replica: it has no source coordinates (drop --replica-of-source)",
                m.backup_id
            ))
        })?;
        return Ok(match &s.gtid {
            Some(g) => StartAt::Gtid(g.to_string()),
            None => StartAt::File {
                file: s.file.to_string(),
                position: s.position,
            },
        });
    }
    if let Some(g) = &m.gtid {
        return Ok(StartAt::Gtid(g.to_string()));
    }
    let b = m.binlog.as_ref().ok_or_else(|| {
        common::error::config_err(format!(
            "backup {} has no binary log coordinates (the binary log was off): it cannot seed a replica",
            m.backup_id
        ))
    })?;
    Ok(StartAt::File {
        file: b.file.to_string(),
        position: b.position,
    })
}

/// A string literal for SQL.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The statements that make the server replicate, in order. The password is
/// inside; never log them.
pub fn statements(v: &ServerVersion, to: &ReplicaOf, at: &StartAt) -> Vec<String> {
    let new_syntax = v.flavor == Flavor::Mysql && (v.major, v.minor, v.patch) >= (8, 0, 23);
    let (change, host, port, user, pass, file, pos) = if new_syntax {
        (
            "CHANGE REPLICATION SOURCE TO",
            "SOURCE_HOST",
            "SOURCE_PORT",
            "SOURCE_USER",
            "SOURCE_PASSWORD",
            "SOURCE_LOG_FILE",
            "SOURCE_LOG_POS",
        )
    } else {
        (
            "CHANGE MASTER TO",
            "MASTER_HOST",
            "MASTER_PORT",
            "MASTER_USER",
            "MASTER_PASSWORD",
            "MASTER_LOG_FILE",
            "MASTER_LOG_POS",
        )
    };
    let mut sql = Vec::new();
    let stop = if new_syntax {
        "STOP REPLICA"
    } else {
        "STOP SLAVE"
    };
    sql.push(stop.to_string());
    let mut change_sql = format!(
        "{change} {host}={}, {port}={}, {user}={}, {pass}={}",
        quote(&to.host),
        to.port,
        quote(&to.user),
        quote(&to.password)
    );
    match (at, v.flavor) {
        (StartAt::Gtid(g), Flavor::Mariadb) => {
            sql.push(format!("SET GLOBAL gtid_slave_pos = {}", quote(g)));
            change_sql.push_str(", MASTER_USE_GTID=slave_pos");
        }
        (StartAt::Gtid(g), Flavor::Mysql) => {
            sql.push("RESET MASTER".into());
            sql.push(format!("SET GLOBAL gtid_purged = {}", quote(g)));
            change_sql.push_str(if new_syntax {
                ", SOURCE_AUTO_POSITION=1"
            } else {
                ", MASTER_AUTO_POSITION=1"
            });
        }
        (StartAt::File { file: f, position }, _) => {
            change_sql.push_str(&format!(", {file}={}, {pos}={position}", quote(f)));
        }
    }
    sql.push(change_sql);
    sql.push(
        if new_syntax {
            "START REPLICA"
        } else {
            "START SLAVE"
        }
        .into(),
    );
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to() -> ReplicaOf {
        ReplicaOf {
            host: "db1".into(),
            port: 3306,
            user: "repl".into(),
            password: "p'w".into(),
        }
    }

    #[test]
    fn mariadb_with_gtid() {
        let v = ServerVersion::parse("10.11.6-MariaDB");
        let s = statements(&v, &to(), &StartAt::Gtid("0-1-42".into()));
        assert_eq!(
            s,
            [
                "STOP SLAVE",
                "SET GLOBAL gtid_slave_pos = '0-1-42'",
                "CHANGE MASTER TO MASTER_HOST='db1', MASTER_PORT=3306, MASTER_USER='repl', MASTER_PASSWORD='p\\'w', MASTER_USE_GTID=slave_pos",
                "START SLAVE"
            ]
        );
    }

    #[test]
    fn mysql_old_and_new_syntax() {
        let at = StartAt::File {
            file: "binlog.000002".into(),
            position: 385,
        };
        let old = statements(&ServerVersion::parse("8.0.22"), &to(), &at);
        assert!(old[1].starts_with("CHANGE MASTER TO MASTER_HOST='db1'"));
        assert!(old[1].ends_with("MASTER_LOG_FILE='binlog.000002', MASTER_LOG_POS=385"));
        let new = statements(
            &ServerVersion::parse("8.4.3"),
            &to(),
            &StartAt::Gtid("uuid:1-9".into()),
        );
        assert_eq!(new[0], "STOP REPLICA");
        assert_eq!(new[2], "SET GLOBAL gtid_purged = 'uuid:1-9'");
        assert!(new[3].starts_with("CHANGE REPLICATION SOURCE TO SOURCE_HOST='db1'"));
        assert!(new[3].ends_with("SOURCE_AUTO_POSITION=1"));
        assert_eq!(new[4], "START REPLICA");
    }
}
