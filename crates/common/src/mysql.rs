//! Connecting to the server (socket or TCP, password never from argv), SQL
//! literals and redaction, and running statements. The SQL that differs
//! between MySQL and MariaDB, and its typed rows, is in [`crate::dialect`].

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, Row, Value};

use crate::config::MysqlConfig;
use crate::error::config_err;

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

    /// Whether a server listens where this connects (its socket or
    /// host:port accepts a connection within a second), without logging in.
    pub fn listening(&self) -> bool {
        let second = std::time::Duration::from_secs(1);
        match (&self.socket, &self.host) {
            (Some(s), _) => std::os::unix::net::UnixStream::connect(s).is_ok(),
            (None, Some(h)) => {
                use std::net::ToSocketAddrs;
                (h.as_str(), self.port)
                    .to_socket_addrs()
                    .is_ok_and(|mut a| {
                        a.any(|a| std::net::TcpStream::connect_timeout(&a, second).is_ok())
                    })
            }
            (None, None) => false,
        }
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
    row_columns(row).into_iter().collect()
}

/// A row's columns in order, each with its value as text (`None`: NULL).
pub fn row_columns(row: &Row) -> Vec<(String, Option<String>)> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(crate::cli::exit_code_of(&err), crate::ExitCode::Usage);
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
