//! Pointing a restored server at its source: the statements, in the words
//! `common::dialect` chooses for the flavor and version. The store is not
//! trusted: every name and coordinate is checked against `common::grammar`
//! before it is written into SQL, each statement runs as a prepared statement
//! (the server takes exactly one statement, nothing can be appended) with the
//! GTID set as a parameter, and the password is shown only as `'***'`.

use std::path::PathBuf;

use common::dialect::ServerVersion;
use common::error::{config_err, integrity_err};
use common::grammar;
use common::manifest::Manifest;
use common::mysql::quote_literal;

/// Where and as whom to replicate.
#[derive(Clone)]
pub struct ReplicaOf {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for ReplicaOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{} as {}", self.host, self.port, self.user)
    }
}

impl ReplicaOf {
    /// Refuses a host, user or password that cannot go into a statement.
    pub fn check(&self) -> anyhow::Result<()> {
        grammar::host(&self.host).map_err(|e| config_err(format!("--replica-of: {e}")))?;
        grammar::user(&self.user).map_err(|e| config_err(format!("--replication-user: {e}")))?;
        check_password(&self.password)
    }
}

/// Refuses a replication password with a NUL or a line break inside (the
/// file holds one line; a trailing line break is not part of it).
pub fn check_password(password: &str) -> anyhow::Result<()> {
    if password.contains(['\0', '\n', '\r']) {
        return Err(config_err(
            "--replication-password-file: the password contains a NUL byte or a line break; the file must hold the password on one line",
        ));
    }
    Ok(())
}

/// The replication flags of `restorer restore`, as given.
#[derive(Clone, Debug, Default)]
pub struct ReplicaFlags {
    /// `--replica-of HOST[:PORT]`.
    pub replica_of: Option<String>,
    /// `--replica-of-source`: the source's coordinates (and, without
    /// `--replica-of`, its host and port) recorded in the backup.
    pub from_source: bool,
    /// `--replication-user`.
    pub user: Option<String>,
    /// `--replication-password-file`.
    pub password_file: Option<PathBuf>,
}

impl ReplicaFlags {
    /// Whether the host to replicate from is the source recorded in the backup.
    pub fn wants_recorded_source(&self) -> bool {
        self.from_source && self.replica_of.is_none()
    }

    /// Where and as whom to replicate, if at all: every value checked, the
    /// password read from its file. `recorded`: the source host and port the
    /// backup records (used with `--replica-of-source` alone).
    pub fn resolve(&self, recorded: Option<(String, u16)>) -> anyhow::Result<Option<ReplicaOf>> {
        let target = match (&self.replica_of, self.from_source) {
            (Some(hp), _) => Some(host_port(hp)?),
            (None, true) => {
                if let Some((host, _)) = &recorded {
                    // Recorded in the manifest, which the store's writers control.
                    grammar::host(host).map_err(|e| {
                        integrity_err(format!(
                            "the source host recorded in the backup (--replica-of-source): {e}; use --replica-of HOST:PORT"
                        ))
                    })?;
                }
                recorded
            }
            (None, false) => None,
        };
        let Some((host, port)) = target else {
            if self.user.is_some() || self.password_file.is_some() {
                return Err(config_err(
                    "--replication-user and --replication-password-file need --replica-of HOST:PORT",
                ));
            }
            return Ok(None);
        };
        let user = self
            .user
            .clone()
            .ok_or_else(|| config_err("--replica-of needs --replication-user"))?;
        grammar::user(&user).map_err(|e| config_err(format!("--replication-user: {e}")))?;
        let file = self
            .password_file
            .as_ref()
            .ok_or_else(|| config_err("--replica-of needs --replication-password-file"))?;
        let password = common::mysql::read_secret_file(file, "--replication-password-file")?
            .trim_end_matches(['\n', '\r'])
            .to_string();
        check_password(&password)?;
        Ok(Some(ReplicaOf {
            host,
            port,
            user,
            password,
        }))
    }
}

/// `HOST[:PORT]` of `--replica-of` (port 3306 by default).
fn host_port(hp: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = hp.rsplit_once(':').unwrap_or((hp, "3306"));
    let port = port
        .parse()
        .map_err(|_| config_err(format!("--replica-of {hp:?}: the port is not a number")))?;
    grammar::host(host).map_err(|e| config_err(format!("--replica-of {hp:?}: {e}")))?;
    Ok((host.to_string(), port))
}

/// The coordinates to start from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAt {
    Gtid(String),
    File { file: String, position: u64 },
}

impl StartAt {
    /// Why these coordinates cannot go into a statement, if they cannot.
    fn invalid(&self) -> Option<String> {
        match self {
            StartAt::Gtid(g) => grammar::gtid_set(g).err(),
            StartAt::File { file, .. } => grammar::binlog_file(file).err(),
        }
    }

    /// Refuses coordinates (from a manifest of backup `backup_id`) that are
    /// not a GTID set or a binary log file name: exit 4.
    pub fn checked(self, backup_id: &str) -> anyhow::Result<StartAt> {
        match self.invalid() {
            None => Ok(self),
            Some(why) => Err(integrity_err(format!(
                "backup {backup_id} records replication coordinates that cannot be used: {why}"
            ))),
        }
    }
}

/// Which coordinates of the manifest to use: the server's own (replicating
/// from the backed-up server) or, with `from_source`, its source's.
pub fn start_at(m: &Manifest, from_source: bool) -> anyhow::Result<StartAt> {
    let at = if from_source {
        let s = m.source.as_ref().ok_or_else(|| {
            config_err(format!(
                "backup {} was not taken on a replica: it has no source coordinates (drop --replica-of-source)",
                m.backup_id
            ))
        })?;
        match &s.gtid {
            Some(g) => StartAt::Gtid(g.to_string()),
            None => StartAt::File {
                file: s.file.to_string(),
                position: s.position,
            },
        }
    } else if let Some(g) = &m.gtid {
        StartAt::Gtid(g.to_string())
    } else {
        let b = m.binlog.as_ref().ok_or_else(|| {
            config_err(format!(
                "backup {} has no binary log coordinates (the binary log was off): it cannot seed a replica",
                m.backup_id
            ))
        })?;
        StartAt::File {
            file: b.file.to_string(),
            position: b.position,
        }
    };
    at.checked(&m.backup_id)
}

/// The coordinates `at` (from the manifest) moved on to where a replay
/// stopped: each GTID domain to its last replayed transaction, or the
/// backed-up server's binary log file and offset of the first one not
/// replayed. (A file position of the source's, `--replica-of-source`, is
/// refused before the restore: the replay knows only this server's log.)
pub fn after_replay(at: &StartAt, stop: &crate::replay::StopPoint) -> StartAt {
    match at {
        StartAt::Gtid(set) => StartAt::Gtid(common::binlog::Stop::advance(set, &stop.last)),
        StartAt::File { .. } => StartAt::File {
            file: stop.file.clone(),
            position: stop.position,
        },
    }
}

/// One replication statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// The SQL for a prepared statement: `?` for each parameter, literals
    /// (quoted by [`quote_literal`]) where the syntax allows no parameter.
    /// Holds the password: never show it.
    pub sql: String,
    /// The values of the `?`, in order.
    pub params: Vec<String>,
    /// The statement as shown in logs and errors: parameters inlined, the
    /// password as `'***'`.
    pub shown: String,
}

impl Statement {
    fn plain(sql: &str) -> Statement {
        Statement {
            sql: sql.into(),
            params: Vec::new(),
            shown: sql.into(),
        }
    }

    /// `<prefix> ?` with `value` as its parameter.
    fn with_param(prefix: &str, value: &str) -> anyhow::Result<Statement> {
        Ok(Statement {
            sql: format!("{prefix} ?"),
            params: vec![value.into()],
            shown: format!("{prefix} {}", quote_literal(value)?),
        })
    }
}

/// The statements that make the server replicate, in order. Refuses what
/// [`ReplicaOf::check`] and [`StartAt::checked`] refuse.
pub fn statements(
    v: &ServerVersion,
    to: &ReplicaOf,
    at: &StartAt,
) -> anyhow::Result<Vec<Statement>> {
    to.check()?;
    if let Some(why) = at.invalid() {
        return Err(integrity_err(format!(
            "the backup's replication coordinates cannot be used: {why}"
        )));
    }
    let w = v.replication_sql();
    let mut out = vec![Statement::plain(w.stop)];
    // CHANGE MASTER takes no parameters: its options are literals.
    let head = format!(
        "{} {}={}, {}={}, {}={}, {}=",
        w.change,
        w.host,
        quote_literal(&to.host)?,
        w.port,
        to.port,
        w.user,
        quote_literal(&to.user)?,
        w.password,
    );
    let tail = match at {
        StartAt::Gtid(g) => {
            if let Some(reset) = w.gtid.reset {
                out.push(Statement::plain(reset));
            }
            out.push(Statement::with_param(
                &format!("SET GLOBAL {} =", w.gtid.variable),
                g,
            )?);
            format!(", {}", w.gtid.option)
        }
        StartAt::File { file, position } => format!(
            ", {}={}, {}={position}",
            w.log_file,
            quote_literal(file)?,
            w.log_pos
        ),
    };
    out.push(Statement {
        sql: format!("{head}{}{tail}", quote_literal(&to.password)?),
        params: Vec::new(),
        shown: format!("{head}'***'{tail}"),
    });
    out.push(Statement::plain(w.start));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::cli::exit_code_of;
    use common::mysql::Redactor;
    use common::ExitCode;

    fn to() -> ReplicaOf {
        ReplicaOf {
            host: "db1".into(),
            port: 3306,
            user: "repl".into(),
            password: "p'w".into(),
        }
    }

    fn shown(s: &[Statement]) -> Vec<&str> {
        s.iter().map(|s| s.shown.as_str()).collect()
    }

    #[test]
    fn after_a_replay_the_coordinates_are_where_it_stopped() {
        let stop = crate::replay::StopPoint {
            file: "binlog.000009".into(),
            position: 1234,
            last: vec![common::binlog::Gtid::parse("0-1-57").unwrap()],
        };
        assert_eq!(
            after_replay(&StartAt::Gtid("0-1-42,1-3-7".into()), &stop),
            StartAt::Gtid("0-1-57,1-3-7".into())
        );
        assert_eq!(
            after_replay(
                &StartAt::File {
                    file: "binlog.000002".into(),
                    position: 4
                },
                &stop
            ),
            StartAt::File {
                file: "binlog.000009".into(),
                position: 1234
            }
        );
    }

    #[test]
    fn mariadb_with_gtid() {
        let v = ServerVersion::parse("10.11.6-MariaDB");
        let s = statements(&v, &to(), &StartAt::Gtid("0-1-42".into())).unwrap();
        assert_eq!(
            shown(&s),
            [
                "STOP SLAVE",
                "SET GLOBAL gtid_slave_pos = '0-1-42'",
                "CHANGE MASTER TO MASTER_HOST='db1', MASTER_PORT=3306, MASTER_USER='repl', MASTER_PASSWORD='***', MASTER_USE_GTID=slave_pos",
                "START SLAVE"
            ]
        );
        assert_eq!(s[1].sql, "SET GLOBAL gtid_slave_pos = ?");
        assert_eq!(s[1].params, ["0-1-42"]);
        assert_eq!(
            s[2].sql,
            "CHANGE MASTER TO MASTER_HOST='db1', MASTER_PORT=3306, MASTER_USER='repl', MASTER_PASSWORD='p''w', MASTER_USE_GTID=slave_pos"
        );
        for st in [&s[0], &s[2], &s[3]] {
            assert!(st.params.is_empty() && !st.sql.contains('?'), "{st:?}");
        }
    }

    #[test]
    fn mysql_old_and_new_syntax() {
        let at = StartAt::File {
            file: "binlog.000002".into(),
            position: 385,
        };
        let old = statements(&ServerVersion::parse("8.0.22"), &to(), &at).unwrap();
        assert!(old[1].sql.starts_with("CHANGE MASTER TO MASTER_HOST='db1'"));
        assert!(old[1]
            .sql
            .ends_with("MASTER_LOG_FILE='binlog.000002', MASTER_LOG_POS=385"));
        assert!(old[1].shown.contains("MASTER_PASSWORD='***'"));
        let new = statements(
            &ServerVersion::parse("8.4.3"),
            &to(),
            &StartAt::Gtid("3e11fa47-71ca-11e1-9e33-c80aa9429562:1-9".into()),
        )
        .unwrap();
        assert_eq!(
            shown(&new)[..2],
            ["STOP REPLICA", "RESET BINARY LOGS AND GTIDS"]
        );
        assert_eq!(new[2].sql, "SET GLOBAL gtid_purged = ?");
        assert_eq!(new[2].params, ["3e11fa47-71ca-11e1-9e33-c80aa9429562:1-9"]);
        assert!(new[3]
            .sql
            .starts_with("CHANGE REPLICATION SOURCE TO SOURCE_HOST='db1'"));
        assert!(new[3].sql.ends_with("SOURCE_AUTO_POSITION=1"));
        assert_eq!(new[4].shown, "START REPLICA");
    }

    /// Where a literal starting at `s[0]` ends (one past its closing quote),
    /// read with or without NO_BACKSLASH_ESCAPES.
    fn literal_end(s: &str, backslash_escapes: bool) -> Option<usize> {
        let b = s.as_bytes();
        assert_eq!(b[0], b'\'');
        let mut i = 1;
        while i < b.len() {
            match b[i] {
                b'\\' if backslash_escapes => i += 2,
                b'\'' if b.get(i + 1) == Some(&b'\'') => i += 2,
                b'\'' => return Some(i + 1),
                _ => i += 1,
            }
        }
        None
    }

    #[test]
    fn literals_end_in_the_same_place_with_or_without_backslash_escapes() {
        for pw in [
            r"p'w",
            r"p\",
            r"\'",
            r"\\'",
            r"', MASTER_HOST='evil",
            r"x\'; DROP TABLE t; --",
            "'''",
        ] {
            let at = StartAt::File {
                file: "binlog.000001".into(),
                position: 4,
            };
            let to = ReplicaOf {
                password: pw.into(),
                ..to()
            };
            let s = statements(&ServerVersion::parse("10.11.6-MariaDB"), &to, &at).unwrap();
            let change = &s[1].sql;
            let start = change.find("MASTER_PASSWORD=").unwrap() + "MASTER_PASSWORD=".len();
            let lit = &change[start..];
            let end = literal_end(lit, true).unwrap();
            assert_eq!(literal_end(lit, false), Some(end), "{pw}");
            assert!(
                lit[end..].starts_with(", MASTER_LOG_FILE='binlog.000001'"),
                "{pw}: {lit}"
            );
        }
    }

    #[test]
    fn hostile_values_are_refused() {
        let v = ServerVersion::parse("10.11.6-MariaDB");
        let file = |f: &str| StartAt::File {
            file: f.into(),
            position: 4,
        };
        for at in [
            StartAt::Gtid("0-1-42'; DROP DATABASE mysql; --".into()),
            StartAt::Gtid("0-1-42\\".into()),
            file("b'; DROP DATABASE mysql; --"),
            file("../../etc/passwd"),
        ] {
            let err = statements(&v, &to(), &at).unwrap_err();
            assert_eq!(exit_code_of(&err), ExitCode::Integrity, "{err}");
            let err = at.clone().checked("20250101T000000Z").unwrap_err();
            assert_eq!(exit_code_of(&err), ExitCode::Integrity, "{err}");
            assert!(err.to_string().contains("backup 20250101T000000Z"), "{err}");
        }
        let at = StartAt::Gtid("0-1-42".into());
        for (bad, flag) in [
            (
                ReplicaOf {
                    host: "db1', MASTER_HOST='evil".into(),
                    ..to()
                },
                "--replica-of",
            ),
            (
                ReplicaOf {
                    user: "r'; --".into(),
                    ..to()
                },
                "--replication-user",
            ),
            (
                ReplicaOf {
                    password: "a\0b".into(),
                    ..to()
                },
                "--replication-password-file",
            ),
            (
                ReplicaOf {
                    password: "a\nSTART SLAVE".into(),
                    ..to()
                },
                "--replication-password-file",
            ),
        ] {
            let err = statements(&v, &bad, &at).unwrap_err();
            assert_eq!(exit_code_of(&err), ExitCode::Usage, "{err}");
            assert!(err.to_string().contains(flag), "{err}");
            assert!(!err.to_string().contains("a\0b"), "{err}");
        }
    }

    #[test]
    fn the_password_never_shows_in_any_form() {
        let pw = r"50%' OR '\x";
        let to = ReplicaOf {
            password: pw.into(),
            ..to()
        };
        let r = Redactor::new(pw);
        let forms = [
            pw.to_string(),
            r"50%'' OR ''\\x".to_string(),
            r"50%\' OR \'\\x".to_string(),
        ];
        for v in ["10.11.6-MariaDB", "8.0.22", "8.4.3"] {
            let at = StartAt::File {
                file: "binlog.000001".into(),
                position: 4,
            };
            let s = statements(&ServerVersion::parse(v), &to, &at).unwrap();
            assert!(s.iter().any(|s| s.sql.contains(&forms[1])));
            let error = format!(
                "SQL `{}` failed: You have an error in your SQL syntax; near '{}' at line 1",
                s[1].sql,
                &s[1].sql[40..]
            );
            for text in s.iter().map(|s| s.shown.clone()).chain([r.redact(&error)]) {
                for f in &forms {
                    assert!(!text.contains(f.as_str()), "{f} in {text}");
                }
                assert!(!text.contains("50%"), "{text}");
            }
        }
    }

    #[test]
    fn replica_flags_are_validated() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pass = |text: &str| {
            let p = dir.path().join("pass");
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            Some(p)
        };
        let flags = |replica_of: Option<String>, user: &str, pw: &str| ReplicaFlags {
            from_source: replica_of.is_none(),
            replica_of,
            user: Some(user.into()),
            password_file: pass(pw),
        };
        let ok = flags(Some("db1:3307".into()), "repl", "p'w\\%\n")
            .resolve(None)
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
            let err = flags(replica_of, user, pw).resolve(source).unwrap_err();
            assert_eq!(exit_code_of(&err), code, "{err}");
            assert!(err.to_string().contains(flag), "{err}");
            assert!(!err.to_string().contains("START SLAVE"), "{err}");
        }
    }
}
