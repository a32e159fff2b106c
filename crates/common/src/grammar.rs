//! The grammars of the names and values mysnap passes on to a server, a
//! command or a path: everything that arrives from a manifest (untrusted) or
//! a flag is checked against these before it is used. Each function returns
//! why a value does not match, for an error message.

/// A binary log file name as the server writes it: `binlog.000042`, `mysql-bin.000001`.
/// Letters, digits, `.`, `_`, `-`; no path separators; at most 255 bytes.
pub fn binlog_file(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a binary log file name (letters, digits, '.', '_', '-', at most 255)"
        ))
    }
}

/// A host name or address for replication: DNS names, IPv4, IPv6 (without
/// brackets). At most 255 bytes.
pub fn host(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a host name or address (letters, digits, '.', '-', '_', ':')"
        ))
    }
}

/// A MySQL/MariaDB account name (the user part): printable ASCII without
/// quotes, backslashes or spaces; 1 to 80 bytes.
pub fn user(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 80
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !b"'\"`\\;".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a user name (printable ASCII without quotes, backslash, ';' or spaces, at most 80)"
        ))
    }
}

/// Names that reach argv or store keys: letters, digits, `_`, `-`, `.`, `+`; not
/// starting with `-` or `.`.
pub fn check_name(key: &str, value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 127
        && !value.starts_with(['-', '.'])
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.+".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{key} = {value:?} is not a valid name (use letters, digits, '_', '-', '.', '+'; not starting with '-' or '.')"
        ))
    }
}

/// A `backup.name` as the config accepts it ([`check_name`]):
/// letters, digits, `_`, `-`, `.`, `+`, not starting with `-` or `.`; at most
/// 127 bytes. It is a store key component and part of snapshot names.
pub fn backup_name(s: &str) -> Result<(), String> {
    check_name("backup.name", s)
}

/// A GTID set as the server reports it, in either flavor, or "" (empty set):
/// MariaDB `domain-server-seq[,…]` (`0-1-42,1-2-7`), MySQL
/// `uuid:interval[:interval…][,…]` with optional tags (MySQL 8.4:
/// `uuid:tag:1-5`) and the newlines MySQL puts after commas. At most 64 KiB.
pub fn gtid_set(s: &str) -> Result<(), String> {
    let bad = |why: &str| {
        let shown: String = s.chars().take(80).collect();
        Err(format!("{shown:?} is not a GTID set: {why}"))
    };
    if s.len() > 64 << 10 {
        return bad("longer than 64 KiB");
    }
    if s.trim().is_empty() {
        return Ok(());
    }
    for item in s.split(',') {
        let item = item.trim_matches([' ', '\n', '\r', '\t']);
        if item.is_empty() {
            return bad("an empty element");
        }
        if item.contains(':') {
            let mut parts = item.split(':');
            let uuid = parts.next().unwrap_or("");
            if !is_uuid(uuid) {
                return bad("a MySQL GTID must start with the server UUID");
            }
            let mut intervals = 0;
            for p in parts {
                if is_interval(p) {
                    intervals += 1;
                } else if !is_tag(p) {
                    return bad("intervals are N or N-M, tags [a-z_][a-z0-9_]{0,31}");
                }
            }
            if intervals == 0 {
                return bad("a MySQL GTID needs at least one interval");
            }
        } else {
            let nums: Vec<&str> = item.split('-').collect();
            if nums.len() != 3 || !nums.iter().all(|n| is_number(n)) {
                return bad("a MariaDB GTID is domain-server-sequence (three numbers)");
            }
        }
    }
    Ok(())
}

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit())
}

fn is_interval(s: &str) -> bool {
    match s.split_once('-') {
        Some((a, b)) => is_number(a) && is_number(b),
        None => is_number(s),
    }
}

fn is_tag(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                *c == b'-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

/// Text shown to an operator (versions, host names, times from a manifest):
/// printable, no control characters (terminal escapes), at most `max` bytes.
pub fn display_text(s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("longer than {max} bytes"));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{s:?} holds control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binlog_files() {
        for ok in ["binlog.000001", "mysql-bin.000042", "db1_bin.1"] {
            assert_eq!(binlog_file(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "../binlog.000001",
            "/var/lib/mysql/binlog.000001",
            "b'; DROP TABLE x; --",
            ".hidden",
            "a b",
            "binlog\n.1",
        ] {
            assert!(binlog_file(bad).is_err(), "{bad}");
        }
        assert!(binlog_file(&"a".repeat(256)).is_err());
    }

    #[test]
    fn hosts_and_users() {
        for ok in ["db1.example", "10.0.0.1", "fe80::1", "db_1"] {
            assert_eq!(host(ok), Ok(()), "{ok}");
        }
        for bad in ["", "db1' , MASTER_HOST='x", "a b", "-oProxy", "h\\"] {
            assert!(host(bad).is_err(), "{bad}");
        }
        for ok in ["repl", "repl@x", "r-e.p_l"] {
            assert_eq!(user(ok), Ok(()), "{ok}");
        }
        for bad in ["", "r'", "a b", "x\\", "a;b", &"u".repeat(81)] {
            assert!(user(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backup_names() {
        for ok in ["db1", "db1-x", "prod.eu_1", "a+b"] {
            assert_eq!(backup_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "..", ".db", "a/b", "a b", "-x", &"n".repeat(128)] {
            assert!(backup_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn gtid_sets() {
        for ok in [
            "",
            "0-1-42",
            "0-1-42,1-2-7",
            "3E11FA47-71CA-11E1-9E33-C80AA9429562:23",
            "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5:11-18,\n2174b383-5441-11e8-b90a-c80aa9429562:1-3",
            "3e11fa47-71ca-11e1-9e33-c80aa9429562:tag_1:1-5",
        ] {
            assert_eq!(gtid_set(ok), Ok(()), "{ok}");
        }
        for bad in [
            "0-1-42'; DROP DATABASE mysql; --",
            "0-1",
            "0-1-x",
            "0-1-42,,1-2-3",
            "3e11fa47:1-5",
            "3e11fa47-71ca-11e1-9e33-c80aa9429562",
            "3e11fa47-71ca-11e1-9e33-c80aa9429562:Tag:1",
            "0-1-42\\",
        ] {
            assert!(gtid_set(bad).is_err(), "{bad}");
        }
        assert!(gtid_set(&"0-1-1,".repeat(20_000)).is_err());
    }

    #[test]
    fn display() {
        assert_eq!(display_text("10.11.6-MariaDB-log", 128), Ok(()));
        assert!(display_text("x\x1b[2J", 128).is_err());
        assert!(display_text(&"x".repeat(129), 128).is_err());
    }
}
