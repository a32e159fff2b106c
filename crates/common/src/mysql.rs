//! Connecting to the server (socket or TCP, password never from argv) and the
//! SQL that differs between MySQL and MariaDB, chosen from the version string.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, Row, Value};

use crate::config::{LockMethod, MysqlConfig};
use crate::error::config_err;
use crate::manifest::Flavor;

/// Where and as whom to connect, resolved from the config and its files.
#[derive(Clone)]
pub struct ConnectInfo {
    pub socket: Option<std::path::PathBuf>,
    pub host: Option<String>,
    pub port: u16,
    pub user: String,
    password: Option<String>,
}

impl std::fmt::Debug for ConnectInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} as {}", self.target(), self.user)
    }
}

/// Reads a secret file, refusing one that group or others can read.
pub fn read_secret_file(path: &Path, key: &str) -> anyhow::Result<String> {
    let md = std::fs::metadata(path)
        .map_err(|e| config_err(format!("{key} {}: {e}", path.display())))?;
    if md.permissions().mode() & 0o044 != 0 {
        return Err(config_err(format!(
            "{key} {} is readable by group or others; run chmod 600 on it",
            path.display()
        )));
    }
    std::fs::read_to_string(path).map_err(|e| config_err(format!("{key} {}: {e}", path.display())))
}

/// The `[client]` section of a my.cnf-style file.
pub fn parse_client_section(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut in_client = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if line.starts_with('[') {
            in_client = line.trim_matches(['[', ']']).trim() == "client";
            continue;
        }
        if !in_client {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            out.insert(k.trim().replace('-', "_"), v.to_string());
        }
    }
    out
}

impl ConnectInfo {
    pub fn from_config(cfg: &MysqlConfig) -> anyhow::Result<ConnectInfo> {
        let mut info = ConnectInfo {
            socket: cfg.socket.clone(),
            host: cfg.host.clone(),
            port: cfg.port,
            user: cfg.user.clone().unwrap_or_else(|| "root".into()),
            password: None,
        };
        if let Some(path) = &cfg.password_file {
            let pw = read_secret_file(path, "mysql.password_file")?;
            info.password = Some(pw.trim_end_matches(['\n', '\r']).to_string());
        }
        if let Some(path) = &cfg.defaults_file {
            let client = parse_client_section(&read_secret_file(path, "mysql.defaults_file")?);
            if cfg.user.is_none() {
                if let Some(u) = client.get("user") {
                    info.user = u.clone();
                }
            }
            info.password = client.get("password").cloned();
            if info.socket.is_none() && info.host.is_none() {
                info.socket = client.get("socket").map(Into::into);
                info.host = client.get("host").cloned();
                if let Some(p) = client.get("port") {
                    info.port = p.parse().map_err(|_| {
                        config_err(format!(
                            "mysql.defaults_file {}: port {p:?} is not a number",
                            path.display()
                        ))
                    })?;
                }
            }
        }
        if info.socket.is_none() && info.host.is_none() {
            info.socket = Some("/run/mysqld/mysqld.sock".into());
        }
        Ok(info)
    }

    /// Where it connects, for messages.
    pub fn target(&self) -> String {
        match (&self.socket, &self.host) {
            (Some(s), _) => format!("socket {}", s.display()),
            (None, Some(h)) => format!("{h}:{}", self.port),
            (None, None) => "the default socket".into(),
        }
    }

    pub async fn connect(&self) -> anyhow::Result<Conn> {
        let mut opts = OptsBuilder::default()
            .user(Some(&self.user))
            .pass(self.password.clone());
        opts = match (&self.socket, &self.host) {
            (Some(s), _) => opts.socket(Some(s.to_string_lossy())),
            (None, h) => opts
                .ip_or_hostname(h.clone().unwrap_or_else(|| "127.0.0.1".into()))
                .tcp_port(self.port),
        }
        .prefer_socket(false);
        let conn = tokio::time::timeout(Duration::from_secs(15), Conn::new(opts))
            .await
            .map_err(|_| anyhow::anyhow!("cannot connect to MySQL at {}: no answer within 15s (check mysql.host and mysql.port)", self.target()))?;
        let mut conn = conn.map_err(|e| {
            let hint = match &e {
                mysql_async::Error::Server(s) if s.code == 1045 => {
                    " (check mysql.user and the password in mysql.password_file or mysql.defaults_file)"
                }
                _ => " (check mysql.socket or mysql.host/port, and that the server is running)",
            };
            anyhow::anyhow!("cannot connect to MySQL at {} as {}: {e}{hint}", self.target(), self.user)
        })?;
        exec(&mut conn, SESSION_SQL_MODE).await.with_context(|| {
            format!(
                "cannot set the session's sql_mode on MySQL at {}",
                self.target()
            )
        })?;
        Ok(conn)
    }
}

/// Set on every connection right after connecting, whatever the server's
/// (or `init_connect`'s) `sql_mode`: the literals mysnap writes
/// ([`quote_literal`]) are escaped for this mode, which has neither
/// `NO_BACKSLASH_ESCAPES` (under which a backslash is an ordinary character,
/// so `\'` would end a string) nor `ANSI_QUOTES` (under which `"` quotes
/// identifiers).
pub const SESSION_SQL_MODE: &str = "SET SESSION sql_mode = 'NO_ENGINE_SUBSTITUTION'";

/// A string literal for SQL on a connection in [`SESSION_SQL_MODE`]:
/// backslashes doubled, `'` as `''`. NUL is refused: no value mysnap writes
/// has one. The error does not show the value (it may be a password).
pub fn quote_literal(s: &str) -> anyhow::Result<String> {
    anyhow::ensure!(!s.contains('\0'), "a value for SQL contains a NUL byte");
    Ok(format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''")))
}

/// Removes a secret from text shown to anyone (errors, logs): the secret as
/// it is, and each form a statement or a message can carry it in (quoted for
/// SQL with `''` or `\'`, escaped as Rust's `{:?}` shows strings).
#[derive(Clone)]
pub struct Redactor {
    forms: Vec<String>,
}

impl Redactor {
    pub fn new(secret: &str) -> Redactor {
        let mut forms = Vec::new();
        if !secret.is_empty() {
            let backslashes = secret.replace('\\', "\\\\");
            forms.push(secret.to_string());
            forms.push(backslashes.replace('\'', "''"));
            forms.push(backslashes.replace('\'', "\\'"));
            let debug = format!("{secret:?}");
            forms.push(debug[1..debug.len() - 1].to_string());
        }
        // Longest first: a form that contains another is replaced whole.
        forms.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        forms.dedup();
        Redactor { forms }
    }

    /// `text` with every form of the secret replaced by `***`.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for f in &self.forms {
            out = out.replace(f.as_str(), "***");
        }
        out
    }
}

/// Runs `sql`, naming the statement when it fails.
pub async fn query_rows(
    conn: &mut Conn,
    sql: &str,
) -> anyhow::Result<Vec<HashMap<String, Option<String>>>> {
    let rows: Vec<Row> = conn
        .query(sql)
        .await
        .with_context(|| format!("SQL `{sql}` failed"))?;
    Ok(rows.iter().map(row_map).collect())
}

/// Runs a statement that returns nothing, naming it when it fails.
pub async fn exec(conn: &mut Conn, sql: &str) -> anyhow::Result<()> {
    conn.query_drop(sql)
        .await
        .with_context(|| format!("SQL `{sql}` failed"))
}

/// A row as column name → text value.
pub fn row_map(row: &Row) -> HashMap<String, Option<String>> {
    let cols = row.columns_ref();
    (0..row.len())
        .map(|i| {
            let v = match row.as_ref(i) {
                None | Some(Value::NULL) => None,
                Some(Value::Bytes(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                Some(Value::Int(n)) => Some(n.to_string()),
                Some(Value::UInt(n)) => Some(n.to_string()),
                Some(other) => Some(other.as_sql(true).trim_matches('\'').to_string()),
            };
            (cols[i].name_str().into_owned(), v)
        })
        .collect()
}

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

    fn at_least(&self, major: u32, minor: u32, patch: u32) -> bool {
        (self.major, self.minor, self.patch) >= (major, minor, patch)
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
        match self.flavor {
            Flavor::Mysql if self.at_least(8, 2, 0) => "SHOW BINARY LOG STATUS",
            _ => "SHOW MASTER STATUS",
        }
    }

    /// The statement that reports replication from a source.
    pub fn replica_status_sql(&self) -> &'static str {
        match self.flavor {
            Flavor::Mysql if self.at_least(8, 0, 22) => "SHOW REPLICA STATUS",
            _ => "SHOW SLAVE STATUS",
        }
    }

    /// The variable holding the GTID state of what this server has written.
    pub fn gtid_sql(&self) -> &'static str {
        match self.flavor {
            Flavor::Mariadb => "SELECT @@GLOBAL.gtid_binlog_pos AS gtid",
            Flavor::Mysql => {
                "SELECT IF(@@GLOBAL.gtid_mode = 'ON', @@GLOBAL.gtid_executed, NULL) AS gtid"
            }
        }
    }

    /// The column names of the replica status row: host, port, file, position, gtid.
    pub fn replica_columns(&self) -> [&'static str; 5] {
        match self.replica_status_sql() {
            "SHOW REPLICA STATUS" => [
                "Source_Host",
                "Source_Port",
                "Relay_Source_Log_File",
                "Exec_Source_Log_Pos",
                "Executed_Gtid_Set",
            ],
            _ if self.flavor == Flavor::Mariadb => [
                "Master_Host",
                "Master_Port",
                "Relay_Master_Log_File",
                "Exec_Master_Log_Pos",
                "Gtid_Slave_Pos",
            ],
            _ => [
                "Master_Host",
                "Master_Port",
                "Relay_Master_Log_File",
                "Exec_Master_Log_Pos",
                "Executed_Gtid_Set",
            ],
        }
    }
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
        let old = ServerVersion::parse("5.5.5-10.3.39-MariaDB");
        assert_eq!((old.flavor, old.major, old.minor), (Flavor::Mariadb, 10, 3));
        let my80 = ServerVersion::parse("8.0.21");
        assert_eq!(my80.flavor, Flavor::Mysql);
        assert_eq!(my80.binlog_status_sql(), "SHOW MASTER STATUS");
        assert_eq!(my80.replica_status_sql(), "SHOW SLAVE STATUS");
        let my8022 = ServerVersion::parse("8.0.36-0ubuntu0.22.04.1");
        assert_eq!(my8022.replica_status_sql(), "SHOW REPLICA STATUS");
        assert_eq!(my8022.replica_columns()[0], "Source_Host");
        let my84 = ServerVersion::parse("8.4.3");
        assert_eq!(my84.binlog_status_sql(), "SHOW BINARY LOG STATUS");
        assert!(my84.gtid_sql().contains("gtid_executed"));
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
            assert_eq!(crate::error::exit_code_of(&err), crate::ExitCode::Usage);
            assert!(err.to_string().contains("mysql.lock_method"), "{err}");
            assert!(err.to_string().contains(v), "{err}");
        }
        let maria = ServerVersion::parse("10.11.6-MariaDB");
        assert_eq!(
            maria.lock_method(LockMethod::Ftwrl).unwrap(),
            LockMethod::Ftwrl
        );
    }

    #[test]
    fn client_section_of_a_defaults_file() {
        let text = "[mysqld]\nuser = mysql\n[client]\nhost     = localhost\nuser     = debian-sys-maint\npassword = \"s3cr=t\"\nsocket   = /run/mysqld/mysqld.sock\n[mysql_upgrade]\nuser = x\n";
        let c = parse_client_section(text);
        assert_eq!(c["user"], "debian-sys-maint");
        assert_eq!(c["password"], "s3cr=t");
        assert_eq!(c["socket"], "/run/mysqld/mysqld.sock");
    }

    #[test]
    fn literals_are_safe_without_backslash_escapes_too() {
        assert_eq!(quote_literal("p'w").unwrap(), r"'p''w'");
        assert_eq!(quote_literal(r"a\").unwrap(), r"'a\\'");
        // Under NO_BACKSLASH_ESCAPES the old `\'` form ends the string after
        // the backslash; `''` is one quote in every mode, and the session
        // never has that mode anyway.
        assert_eq!(quote_literal(r"\', x='").unwrap(), r"'\\'', x='''");
        assert!(quote_literal("a\0b").is_err());
        assert!(!SESSION_SQL_MODE.contains("NO_BACKSLASH_ESCAPES"));
        assert!(!SESSION_SQL_MODE.contains("ANSI"));
    }

    #[test]
    fn every_form_of_a_secret_is_redacted() {
        let pw = r#"p'w\%"x"#;
        let r = Redactor::new(pw);
        let quoted = quote_literal(pw).unwrap();
        let texts = [
            format!("SQL `CHANGE MASTER TO MASTER_PASSWORD={quoted}` failed"),
            format!("You have an error near '{}' at line 1", &quoted[1..]),
            r#"near 'p\'w\\%"x'"#.to_string(),
            format!("{:?}", format!("Access denied: {pw}")),
            format!("raw {pw} raw"),
        ];
        for t in &texts {
            let shown = r.redact(t);
            assert!(shown.contains("***"), "{shown}");
            for needle in ["p'w", "p''w", r"p\'w", r"w\%", r"w\\%", r#"%"x"#, r#"%\"x"#] {
                assert!(!shown.contains(needle), "{needle} in {shown}");
            }
        }
        assert_eq!(Redactor::new("").redact("a b"), "a b");
    }

    #[test]
    fn password_file_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pass");
        std::fs::write(&p, "pw\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret_file(&p, "mysql.password_file").unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        assert_eq!(crate::error::exit_code_of(&err), crate::ExitCode::Usage);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let cfg = MysqlConfig {
            password_file: Some(p),
            ..MysqlConfig::default()
        };
        let info = ConnectInfo::from_config(&cfg).unwrap();
        assert_eq!(info.password.as_deref(), Some("pw"));
        assert!(!format!("{info:?}").contains("pw"));
    }
}
