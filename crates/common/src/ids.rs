//! Checked names and ids: every string that can reach a path, a store key,
//! argv or SQL has a type whose constructor checks its grammar
//! ([`crate::grammar`]) and which deserializes through the same check, so a
//! manifest or config with a bad value does not parse. A leaf module: it
//! knows nothing of configs, manifests or stores.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::grammar;

/// A string newtype whose constructor checks a grammar; it deserializes
/// through the same check, so a manifest with a bad value does not parse.
macro_rules! checked_string {
    ($(#[$meta:meta])* $name:ident, $check:expr) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Checks `s` against the grammar of this type.
            pub fn parse(s: &str) -> Result<$name, String> {
                $name::try_from(s.to_string())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<$name, String> {
                let check: fn(&str) -> Result<(), String> = $check;
                check(&s)?;
                Ok($name(s))
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }
        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }
        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }
        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }
    };
}

checked_string!(
    /// A backup id: the UTC start time `YYYYMMDDTHHMMSSZ`, a real time.
    /// Ordering ids orders backups by time.
    BackupId,
    check_backup_id
);
checked_string!(
    /// `backup.name`: a store key component (see [`grammar::backup_name`]).
    BackupName,
    grammar::backup_name
);
checked_string!(
    /// A path relative to the volume root: "" (the root itself) or normal
    /// components only: no `/` at either end, no `.`, `..` or empty component.
    RelPath,
    check_rel_path
);
checked_string!(
    /// A binary log file name, no directory (see [`grammar::binlog_file`]).
    BinlogFile,
    grammar::binlog_file
);
checked_string!(
    /// A GTID set in either flavor's syntax (see [`grammar::gtid_set`]).
    GtidSet,
    grammar::gtid_set
);
checked_string!(
    /// A replication source's host (see [`grammar::host`]).
    HostName,
    grammar::host
);
checked_string!(
    /// An LVM volume group or logical volume name (`volume.vg`, `volume.lv`;
    /// see [`grammar::check_name`]).
    LvmName,
    |s| grammar::check_name("the name", s)
);
checked_string!(
    /// A SHA-256 as 64 lowercase hex digits.
    Sha256Hex,
    check_sha256
);
checked_string!(
    /// Text only shown to an operator: no control characters, at most 255 bytes.
    Text,
    |s| grammar::display_text(s, 255)
);

fn check_backup_id(s: &str) -> Result<(), String> {
    BackupId::time_of(s).map(|_| ())
}

fn check_rel_path(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Ok(());
    }
    let bad = |why: &str| {
        Err(format!(
            "{s:?} is not a relative path inside the volume: {why}"
        ))
    };
    if s.len() > 4096 {
        return bad("longer than 4096 bytes");
    }
    if s.contains('\0') || s.chars().any(char::is_control) {
        return bad("control characters");
    }
    if s.starts_with('/') {
        return bad("absolute");
    }
    for c in s.split('/') {
        match c {
            "" => return bad("an empty component"),
            "." | ".." => return bad("a '.' or '..' component"),
            _ => {}
        }
    }
    Ok(())
}

fn check_sha256(s: &str) -> Result<(), String> {
    if s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(format!("{s:?} is not a SHA-256 (64 lowercase hex digits)"))
    }
}

impl BackupId {
    /// The id of the UTC time `t` (seconds).
    pub fn from_time(t: time::OffsetDateTime) -> BackupId {
        let t = t.to_offset(time::UtcOffset::UTC);
        BackupId(
            t.format(time::macros::format_description!(
                "[year][month][day]T[hour][minute][second]Z"
            ))
            .expect("formatting a UTC time cannot fail"),
        )
    }

    /// The time an id names.
    pub fn time(&self) -> time::OffsetDateTime {
        BackupId::time_of(&self.0).expect("a BackupId was checked")
    }

    fn time_of(s: &str) -> Result<time::OffsetDateTime, String> {
        let b = s.as_bytes();
        let shaped = b.len() == 16
            && b[8] == b'T'
            && b[15] == b'Z'
            && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit);
        let bad = || format!("{s:?} is not a backup id (a UTC time, YYYYMMDDTHHMMSSZ)");
        if !shaped {
            return Err(bad());
        }
        time::PrimitiveDateTime::parse(
            s,
            time::macros::format_description!("[year][month][day]T[hour][minute][second]Z"),
        )
        .map(|t| t.assume_utc())
        .map_err(|_| bad())
    }
}

impl RelPath {
    pub fn as_path(&self) -> &Path {
        Path::new(&self.0)
    }
    /// Whether `self` is `other` or inside it.
    pub fn is_within(&self, other: &RelPath) -> bool {
        other.0.is_empty() || self.as_path().starts_with(other.as_path())
    }
}

impl AsRef<Path> for RelPath {
    fn as_ref(&self) -> &Path {
        self.as_path()
    }
}

/// Backup ids are the UTC start time, `YYYYMMDDTHHMMSSZ`.
pub fn backup_id(t: time::OffsetDateTime) -> BackupId {
    BackupId::from_time(t)
}

/// Whether `s` is a backup id.
pub fn is_backup_id(s: &str) -> bool {
    BackupId::parse(s).is_ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A checked value in a test (panics when it does not parse).
    pub fn v<T: TryFrom<String, Error = String>>(s: &str) -> T {
        T::try_from(s.to_string()).unwrap()
    }

    #[test]
    fn ids() {
        let t = time::macros::datetime!(2026-11-26 09:30:05 UTC);
        assert_eq!(backup_id(t), "20261126T093005Z");
        assert_eq!(backup_id(t).time(), t);
        assert!(is_backup_id("20261126T093005Z"));
        assert!(!is_backup_id("20261126T093005"));
        assert!(!is_backup_id("2026112xT093005Z"));
        // The shape of an id, but not a time.
        assert!(!is_backup_id("99991399T999999Z"));
        assert!(!is_backup_id("20260230T000000Z"));
    }
}
