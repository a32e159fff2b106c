//! The record of a restore drill (`restorer drill`), stored beside the
//! manifest as `<name>/<id>/drill-<time>.toml` ([`crate::keys::drill`]),
//! create-only; the manifest is never rewritten.
//!
//! A record read back from the store is untrusted like a manifest: at most
//! [`MAX_RECORD_BYTES`], every string one of the checked [`crate::ids`]
//! types, at most [`MAX_NAMED_TABLES`] table names, and stored under its
//! own key ([`DrillRecord::parse_stored`]). Readers skip one that does not
//! parse, with a warning.

use serde::{Deserialize, Serialize};

use crate::ids::{BackupId, BackupName, Text};

/// The format this mysnap writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The largest record read (real ones are well under 16 KiB).
pub const MAX_RECORD_BYTES: u64 = 64 << 10;
/// How many tables with errors a record names; `tables_with_errors` counts all.
pub const MAX_NAMED_TABLES: usize = 50;

/// What a drill concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Unpacked, the server started, every table passed CHECK TABLE.
    Ok,
    /// The archive was refused, the server did not start, or a table failed CHECK TABLE.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillRecord {
    pub format_version: u32,
    pub name: BackupName,
    pub backup_id: BackupId,
    /// When the drill started (UTC, the time in the record's key).
    pub started: BackupId,
    /// Host the drill ran on.
    pub host: Text,
    pub result: Outcome,
    /// Why it failed (the first problem), absent when it passed.
    pub problem: Option<Text>,
    /// The throwaway server's `VERSION()`, absent when it did not start.
    pub server_version: Option<Text>,
    /// Base tables CHECK TABLE ran on.
    pub tables_checked: u64,
    /// How many of them reported an error.
    pub tables_with_errors: u64,
    /// The first [`MAX_NAMED_TABLES`] of them, `` `db`.`table`: message ``.
    pub errors: Vec<Text>,
    pub unpacked_bytes: u64,
    pub unpack_secs: f64,
    /// From the server's start until it answered (InnoDB recovery included).
    pub start_secs: f64,
    pub check_secs: f64,
    pub total_secs: f64,
    /// The mysnap version that ran the drill.
    pub mysnap_version: Text,
}

/// A record that cannot be used: skipped with a warning naming it.
#[derive(Debug, thiserror::Error)]
#[error("drill record {origin} {why}")]
pub struct RecordError {
    pub origin: String,
    pub why: String,
}

impl DrillRecord {
    /// The record's TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a drill record serializes")
    }

    /// Parses a record read from the store at `key` (relative to the
    /// store's prefix; `origin` is its URL): bounded, every field in its
    /// grammar, and naming the backup and time its key names.
    pub fn parse_stored(
        text: &str,
        key: &str,
        origin: &str,
        name: &BackupName,
    ) -> Result<DrillRecord, RecordError> {
        let err = |why: String| RecordError {
            origin: origin.to_string(),
            why,
        };
        if text.len() as u64 > MAX_RECORD_BYTES {
            return Err(err(format!("is larger than {MAX_RECORD_BYTES} bytes")));
        }
        let r: DrillRecord = toml::from_str(text)
            .map_err(|e| err(format!("is malformed: {}", e.message().trim_end())))?;
        if r.format_version != FORMAT_VERSION {
            return Err(err(format!(
                "has format version {}, this mysnap reads {FORMAT_VERSION}",
                r.format_version
            )));
        }
        if r.errors.len() > MAX_NAMED_TABLES {
            return Err(err(format!(
                "names {} tables, more than {MAX_NAMED_TABLES}",
                r.errors.len()
            )));
        }
        if r.name != *name || crate::keys::drill(&r.name, &r.backup_id, &r.started) != key {
            return Err(err(format!(
                "is of backup {}/{} at {}, which is not where it is stored: forged or misplaced",
                r.name, r.backup_id, r.started
            )));
        }
        Ok(r)
    }
}

/// `s` as a [`Text`]: control characters escaped, cut to fit 255 bytes.
pub fn text(s: &str) -> Text {
    let mut out: String = s
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    if out.len() > 255 {
        let mut cut = 252;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("...");
    }
    Text::parse(&out).expect("escaped and cut to fit")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::tests::v;

    fn record() -> DrillRecord {
        DrillRecord {
            format_version: FORMAT_VERSION,
            name: v("db1"),
            backup_id: v("20261126T093000Z"),
            started: v("20261128T220500Z"),
            host: v("drill1"),
            result: Outcome::Failed,
            problem: Some(v("1 of 3 tables failed CHECK TABLE")),
            server_version: Some(v("10.11.6-MariaDB")),
            tables_checked: 3,
            tables_with_errors: 1,
            errors: vec![text("`d`.`t`: Corrupt")],
            unpacked_bytes: 1 << 20,
            unpack_secs: 0.5,
            start_secs: 1.5,
            check_secs: 0.25,
            total_secs: 2.5,
            mysnap_version: v("0.1.0"),
        }
    }

    const KEY: &str = "db1/20261126T093000Z/drill-20261128T220500Z.toml";

    #[test]
    fn round_trip_under_its_own_key() {
        let r = record();
        let name: BackupName = v("db1");
        assert_eq!(
            DrillRecord::parse_stored(&r.to_toml(), KEY, "s3://b/x", &name).unwrap(),
            r
        );
    }

    #[test]
    fn untrusted_records_are_refused() {
        let name: BackupName = v("db1");
        let good = record().to_toml();
        let parse = |text: &str, key: &str| {
            DrillRecord::parse_stored(text, key, "s3://b/x", &name)
                .unwrap_err()
                .to_string()
        };
        let other = "db1/20261126T093000Z/drill-20261128T220501Z.toml";
        assert!(parse(&good, other).contains("not where it is stored"));
        let huge = format!("{good}\n#{}", "x".repeat(MAX_RECORD_BYTES as usize));
        assert!(parse(&huge, KEY).contains("larger than"));
        let esc = good.replace("drill1", "drill\\u001b[31m");
        assert!(parse(&esc, KEY).contains("control characters"), "{esc}");
        let many = {
            let mut r = record();
            r.errors = vec![text("x"); MAX_NAMED_TABLES + 1];
            r.to_toml()
        };
        assert!(parse(&many, KEY).contains("more than"));
        assert!(parse(&good.replace("\"failed\"", "\"maybe\""), KEY).contains("malformed"));
        assert!(parse(&format!("{good}extra = 1\n"), KEY).contains("malformed"));
        assert!(parse(
            &good.replace("format_version = 1", "format_version = 2"),
            KEY
        )
        .contains("format version"));
    }

    #[test]
    fn text_escapes_and_cuts() {
        assert_eq!(text("a\nb").as_str(), "a\\nb");
        let long = text(&"é".repeat(300));
        assert!(long.len() <= 255 && long.ends_with("..."));
    }
}
