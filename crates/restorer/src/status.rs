//! `restorer status`: did last night's backup happen? For each backup name,
//! the newest complete backup, its age and what its manifest records, read
//! through the same checked path as `restorer list` ([`crate::backups_in`]),
//! and the newest restore drill recorded ([`crate::drill::last_drill`]).

use std::collections::BTreeSet;
use std::time::Duration;

use common::config::Config;
use common::error::Error;
use common::manifest::{BackupName, Manifest};
use common::store::{self, Store};
use serde::Serialize;

/// What `restorer status --json` prints (README, "Status").
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// RFC 3339 UTC time of the check.
    pub checked_at: String,
    /// `--max-age` in seconds, or `null` without it.
    pub max_age_secs: Option<u64>,
    /// `false` when `--max-age` was given and a name is stale.
    pub ok: bool,
    pub names: Vec<NameStatus>,
}

/// One backup name.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NameStatus {
    /// The name as found in the store (not trusted when `valid` is false).
    pub name: String,
    /// Whether `name` is a valid `backup.name`; an invalid one is reported
    /// and never read.
    pub valid: bool,
    /// Why the name was not read (invalid), else `null`.
    pub problem: Option<String>,
    /// Complete backups (a manifest that parses, with an archive).
    pub complete_backups: usize,
    /// The newest complete backup, or `null` when there is none.
    pub newest: Option<Newest>,
    /// Older than `--max-age`, or no complete backup (always false without it).
    pub stale: bool,
    /// The newest restore drill of any complete backup, or `null`.
    pub last_drill: Option<LastDrill>,
    /// The spans a restore can reach with `--until`: per server, from a
    /// backup's time to the end of the unbroken binary log archive after it
    /// (overlapping spans merged); empty without archived binary logs.
    pub recoverable: Vec<Window>,
}

/// Any time from `from` to `to` (RFC 3339 UTC) can be restored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Window {
    pub server_id: u64,
    pub from: String,
    pub to: String,
}

/// What the newest drill record says (`restorer drill`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LastDrill {
    /// The backup it restored.
    pub backup_id: String,
    /// RFC 3339 UTC time the drill started.
    pub at: String,
    /// Whether it passed.
    pub ok: bool,
    pub tables_checked: u64,
    pub tables_with_errors: u64,
    /// Why it failed, else `null`.
    pub problem: Option<String>,
}

impl LastDrill {
    fn of(r: &common::drill::DrillRecord) -> LastDrill {
        LastDrill {
            backup_id: r.backup_id.to_string(),
            at: rfc3339(r.started.time()),
            ok: r.result == common::drill::Outcome::Ok,
            tables_checked: r.tables_checked,
            tables_with_errors: r.tables_with_errors,
            problem: r.problem.as_ref().map(|p| p.to_string()),
        }
    }
}

/// What the newest complete backup's manifest records.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Newest {
    pub id: String,
    /// RFC 3339 time of the snapshot.
    pub created_at: String,
    /// Seconds from the backup's start (its id) to `checked_at`.
    pub age_secs: u64,
    /// Bytes of the stored archive.
    pub size: u64,
    /// Seconds commits were blocked by the lock.
    pub lock_hold_secs: f64,
    /// Seconds the archiver took (start to upload complete).
    pub archive_secs: f64,
    /// Its place in an incremental chain: 0, a full backup; n, the n-th
    /// incremental one since the last full one.
    pub chain: u32,
    /// An incremental backup's newest base (`null` for a full one).
    pub base: Option<String>,
}

/// Checks `backup.name` (or, with `all`, every name in the store) against
/// `max_age`.
pub async fn status(cfg: &Config, all: bool, max_age: Option<Duration>) -> anyhow::Result<Status> {
    let auth = common::crypt::AuthKey::from_config(cfg)?;
    let store = store::open(&cfg.store).await?;
    let own = crate::backup_name(cfg)?;
    let now = time::OffsetDateTime::now_utc();
    status_in(store.as_ref(), auth.as_ref(), &own, all, max_age, now).await
}

async fn status_in(
    store: &dyn Store,
    auth: Option<&common::crypt::AuthKey>,
    own: &BackupName,
    all: bool,
    max_age: Option<Duration>,
    now: time::OffsetDateTime,
) -> anyhow::Result<Status> {
    let mut names = BTreeSet::from([own.to_string()]);
    if all {
        names.extend(names_in(&store.list("").await?));
    }
    let mut out = Vec::new();
    for raw in names {
        let name = match BackupName::parse(&raw) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("not reading {}: {e}", store.url(&raw));
                out.push(NameStatus {
                    name: raw,
                    valid: false,
                    problem: Some(format!("not a backup name: {e}")),
                    complete_backups: 0,
                    newest: None,
                    stale: false,
                    last_drill: None,
                    recoverable: Vec::new(),
                });
                continue;
            }
        };
        let keys = store.list(&common::keys::backups_of(&name)).await?;
        let backups = crate::backups_in(store, &name, &keys, auth).await?;
        let mut st = name_status(&name, &backups, max_age, now);
        let ids: Vec<_> = backups.iter().map(|m| m.backup_id.clone()).collect();
        st.last_drill = crate::drill::last_drill(store, &name, &keys, &ids)
            .await?
            .as_ref()
            .map(LastDrill::of);
        st.recoverable = windows(
            &backups,
            &crate::segments_in(store, &name, &keys, auth).await?,
        );
        out.push(st);
    }
    Ok(Status {
        checked_at: rfc3339(now),
        max_age_secs: max_age.map(|d| d.as_secs()),
        ok: !out.iter().any(|n| n.stale),
        names: out,
    })
}

/// The names in a listing of the whole store: the first component of every
/// key below one.
fn names_in(keys: &[String]) -> BTreeSet<String> {
    keys.iter()
        .filter_map(|k| k.split_once('/').map(|(n, _)| n.to_string()))
        .collect()
}

/// The status of `name` from its complete backups, newest first.
fn name_status(
    name: &BackupName,
    backups: &[Manifest],
    max_age: Option<Duration>,
    now: time::OffsetDateTime,
) -> NameStatus {
    let newest = backups.first().map(|m| Newest {
        id: m.backup_id.to_string(),
        created_at: m.created_at.to_string(),
        age_secs: age(m, now).as_secs(),
        size: m.archive.as_ref().map_or(0, |a| a.size),
        lock_hold_secs: m.lock.hold_secs,
        archive_secs: m.archive.as_ref().map_or(0.0, |a| a.archive_secs),
        chain: m.archive.as_ref().map_or(0, |a| a.chain),
        base: m
            .archive
            .as_ref()
            .and_then(|a| a.bases.last())
            .map(|b| b.to_string()),
    });
    let stale = match (max_age, &newest) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(max), Some(n)) => n.age_secs > max.as_secs(),
    };
    NameStatus {
        name: name.to_string(),
        valid: true,
        problem: None,
        complete_backups: backups.len(),
        newest,
        stale,
        last_drill: None,
        recoverable: Vec::new(),
    }
}

/// The recoverable spans of `backups` with `segments`, merged per server.
pub fn windows(backups: &[Manifest], segments: &[common::binlog::SegmentMeta]) -> Vec<Window> {
    let mut spans: Vec<(u64, time::OffsetDateTime, time::OffsetDateTime)> = backups
        .iter()
        .filter_map(|m| {
            let b = m.binlog.as_ref()?;
            let sid = m.server.server_id;
            let (from, to) = common::binlog::window(segments, sid, &b.file, m.snapshot_time())?;
            Some((sid, from, to))
        })
        .collect();
    spans.sort();
    let mut merged: Vec<(u64, time::OffsetDateTime, time::OffsetDateTime)> = Vec::new();
    for (sid, from, to) in spans {
        match merged.last_mut() {
            Some(last) if last.0 == sid && from <= last.2 => last.2 = last.2.max(to),
            _ => merged.push((sid, from, to)),
        }
    }
    merged
        .into_iter()
        .map(|(server_id, from, to)| Window {
            server_id,
            from: rfc3339(from),
            to: rfc3339(to),
        })
        .collect()
}

/// Time since the backup started (its id); zero for one from the (near) future.
fn age(m: &Manifest, now: time::OffsetDateTime) -> Duration {
    Duration::try_from(now - m.backup_id.time()).unwrap_or(Duration::ZERO)
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .expect("a UTC time formats")
}

/// An age for people: whole seconds below an hour, whole minutes above.
pub fn fmt_age(secs: u64) -> String {
    let secs = if secs >= 3600 { secs / 60 * 60 } else { secs };
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// Seconds with the precision that matters (lock holds are milliseconds).
fn fmt_secs(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.3}s")
    } else {
        fmt_age(s.round() as u64)
    }
}

/// The text `restorer status` prints: one line per name.
pub fn status_text(st: &Status) -> String {
    let mut out = String::new();
    for n in &st.names {
        let mark = if n.stale { " STALE" } else { "" };
        let line = match (&n.problem, &n.newest) {
            (Some(p), _) => format!("{:?}: skipped, {p}", n.name),
            (None, None) => format!("{}:{mark} no complete backup", n.name),
            (None, Some(b)) => format!(
                "{}:{mark} newest {}{}, {} old, {}, lock held {}, archived in {}, {} complete backup{}",
                n.name,
                b.id,
                match &b.base {
                    Some(base) => format!(" (incremental {} on {base})", b.chain),
                    None => String::new(),
                },
                fmt_age(b.age_secs),
                bytesize::ByteSize(b.size),
                fmt_secs(b.lock_hold_secs),
                fmt_secs(b.archive_secs),
                n.complete_backups,
                if n.complete_backups == 1 { "" } else { "s" }
            ),
        };
        out += &line;
        if let Some(d) = &n.last_drill {
            out += &match d.ok {
                true => format!(
                    ", last verified {} (drill ok of {}, {} tables)",
                    d.at, d.backup_id, d.tables_checked
                ),
                false => format!(
                    ", last drill FAILED {} (of {}: {})",
                    d.at,
                    d.backup_id,
                    d.problem.as_deref().unwrap_or("no reason recorded")
                ),
            };
        }
        for w in &n.recoverable {
            out += &format!(
                ", server {} recoverable any time from {} to {}",
                w.server_id, w.from, w.to
            );
        }
        out.push('\n');
    }
    out
}

/// The error (exit 5) for a status with stale names, naming each and its
/// age; `None` when all is well.
pub fn stale_error(st: &Status) -> Option<anyhow::Error> {
    let max = fmt_age(st.max_age_secs?);
    let stale: Vec<String> = st
        .names
        .iter()
        .filter(|n| n.stale)
        .map(|n| match &n.newest {
            Some(b) => format!(
                "the newest backup of {} ({}) is {} old, older than --max-age {max}",
                n.name,
                b.id,
                fmt_age(b.age_secs)
            ),
            None => format!("{} has no complete backup", n.name),
        })
        .collect();
    (!stale.is_empty()).then(|| Error::Stale(stale.join("; ")).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forged::Rig;

    fn name(s: &str) -> BackupName {
        BackupName::parse(s).unwrap()
    }

    #[test]
    fn ages_read_as_people_say_them() {
        for (secs, want) in [
            (0, "0s"),
            (59, "59s"),
            (3599, "59m 59s"),
            (3600 + 59, "1h"),
            (26 * 3600 + 61, "1day 2h 1m"),
        ] {
            assert_eq!(fmt_age(secs), want, "{secs}");
        }
        assert_eq!(fmt_secs(0.0234), "0.023s");
        assert_eq!(fmt_secs(75.4), "1m 15s");
    }

    #[test]
    fn names_are_first_key_components() {
        let keys = [
            "db1/20261126T093000Z/manifest.toml",
            "db1/20261126T093000Z/data.tar.zst",
            "Bad Name/x",
            "stray-file",
        ]
        .map(String::from);
        assert_eq!(
            names_in(&keys),
            BTreeSet::from(["Bad Name".to_string(), "db1".to_string()])
        );
    }

    /// The id is stamped before the lock; the binary log rotated under the
    /// lock may be created seconds later, and is still the backup's own.
    #[test]
    fn a_window_starts_at_the_snapshot_not_at_the_id() {
        let mut rig = Rig::new();
        let mut m = rig.backup(&["mysql"], &[crate::forged::dir("mysql")]);
        m.backup_id = common::manifest::BackupId::parse("20261126T090000Z").unwrap();
        m.created_at = common::ids::Text::parse("2026-11-26T09:00:02Z").unwrap();
        let at = |s: &str| common::manifest::BackupId::parse(s).unwrap();
        let seg = common::binlog::SegmentMeta {
            format_version: common::binlog::FORMAT_VERSION,
            name: name("db1"),
            server_id: 1,
            file: common::ids::BinlogFile::parse("binlog.000001").unwrap(),
            created: at("20261126T090002Z"),
            size: 1,
            stored_size: 1,
            sha256: common::ids::Sha256Hex::parse(&"ab".repeat(32)).unwrap(),
            compression: common::config::Compression::Zstd,
            first_gtid: None,
            last_gtid: None,
            transactions: 1,
            first_event: at("20261126T090002Z"),
            last_event: at("20261126T091000Z"),
            encryption: None,
        };
        let w = windows(&[m], &[seg]);
        assert_eq!(
            (w.len(), w[0].from.as_str(), w[0].to.as_str()),
            (1, "2026-11-26T09:00:02Z", "2026-11-26T09:10:00Z")
        );
    }

    #[test]
    fn stale_means_older_than_max_age_or_none() {
        let mut rig = Rig::new();
        let m = rig.backup(&["mysql"], &[crate::forged::dir("mysql")]);
        let t = m.backup_id.time();
        let n = name("db1");
        let hour = Some(Duration::from_secs(3600));
        let fresh = name_status(
            &n,
            std::slice::from_ref(&m),
            hour,
            t + time::Duration::minutes(59),
        );
        assert!(!fresh.stale);
        assert_eq!(fresh.newest.as_ref().unwrap().age_secs, 59 * 60);
        assert_eq!(fresh.complete_backups, 1);
        assert!(
            name_status(
                &n,
                std::slice::from_ref(&m),
                hour,
                t + time::Duration::minutes(61)
            )
            .stale
        );
        assert!(
            !name_status(
                &n,
                std::slice::from_ref(&m),
                None,
                t + time::Duration::days(9)
            )
            .stale
        );
        assert!(name_status(&n, &[], hour, t).stale);
        assert!(!name_status(&n, &[], None, t).stale);
        // A backup from the near future is 0 s old, not an overflow.
        let early = name_status(&n, &[m], hour, t - time::Duration::minutes(5));
        assert_eq!(early.newest.unwrap().age_secs, 0);
    }

    #[test]
    fn all_reports_every_name_and_a_bad_one_without_reading_it() {
        let mut rig = Rig::new();
        let m = rig.backup(&["mysql"], &[crate::forged::dir("mysql")]);
        let store_dir = rig.root().join("store");
        std::fs::create_dir_all(store_dir.join("Bad Name/x")).unwrap();
        std::fs::write(store_dir.join("Bad Name/x/manifest.toml"), "junk").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let store = rt.block_on(store::open(&rig.cfg.store)).unwrap();
        let now = m.backup_id.time() + time::Duration::hours(2);
        let max = Some(Duration::from_secs(3600));
        let st = rt
            .block_on(status_in(
                store.as_ref(),
                None,
                &name("db2"),
                true,
                max,
                now,
            ))
            .unwrap();
        let shown: Vec<(&str, bool, bool)> = st
            .names
            .iter()
            .map(|n| (n.name.as_str(), n.valid, n.stale))
            .collect();
        assert_eq!(
            shown,
            [
                ("Bad Name", false, false),
                ("db1", true, true),
                ("db2", true, true)
            ]
        );
        assert!(!st.ok);
        let text = status_text(&st);
        assert!(
            text.contains("\"Bad Name\": skipped, not a backup name"),
            "{text}"
        );
        assert!(text.contains("db2: STALE no complete backup"), "{text}");
        assert!(
            text.contains(&format!("db1: STALE newest {}, 2h old,", m.backup_id)),
            "{text}"
        );
        let err = format!("{}", stale_error(&st).unwrap());
        assert!(err.contains("db1") && err.contains("2h old"), "{err}");
        assert!(err.contains("db2 has no complete backup"), "{err}");
        let code = common::cli::exit_code_of(&stale_error(&st).unwrap());
        assert_eq!(code, common::ExitCode::Stale);

        // Without --all, only this config's name; without --max-age, never stale.
        let st = rt
            .block_on(status_in(
                store.as_ref(),
                None,
                &name("db1"),
                false,
                None,
                now,
            ))
            .unwrap();
        assert_eq!(st.names.len(), 1);
        assert!(st.ok && stale_error(&st).is_none());
    }
}
