//! Retention: which backups a `[retention]` policy keeps. Pure: ids in,
//! decisions out; `restorer prune` does the listing and deleting.
//!
//! The semantics are restic's `forget`: backups are taken newest first;
//! `keep_last = N` keeps the N newest; each bucket rule (`keep_hourly`,
//! `keep_daily`, `keep_weekly` (ISO weeks), `keep_monthly`, `keep_yearly`)
//! keeps the newest backup of each of the last N hours/days/… that have a
//! backup; `keep_within` keeps every backup not older than the *newest
//! backup* minus the duration (relative to the newest backup, not to now, as
//! restic does: a host whose backups stopped does not lose them to the
//! clock). A backup kept by several rules lists every reason. Two invariants
//! hold whatever the policy: the newest backup is always kept, and pinned
//! ids (`retention.pin`) are always kept. All times are UTC.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::BackupId;

/// The `[retention]` section. Absent: prune does nothing. Each `keep_*`
/// count is a number from 0, or -1 for no limit ([`UNLIMITED`]: every
/// backup, or the newest of every hour/day/… that has one), as in restic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    #[serde(default, deserialize_with = "keep_count")]
    pub keep_last: u32,
    #[serde(default, deserialize_with = "keep_count")]
    pub keep_hourly: u32,
    #[serde(default, deserialize_with = "keep_count")]
    pub keep_daily: u32,
    #[serde(default, deserialize_with = "keep_count")]
    pub keep_weekly: u32,
    #[serde(default, deserialize_with = "keep_count")]
    pub keep_monthly: u32,
    #[serde(default, deserialize_with = "keep_count")]
    pub keep_yearly: u32,
    #[serde(with = "humantime_serde", default)]
    pub keep_within: Option<Duration>,
    /// Backups never removed by prune, by id.
    #[serde(default)]
    pub pin: Vec<BackupId>,
}

/// A `keep_*` count of -1: no limit.
pub const UNLIMITED: u32 = u32::MAX;

/// A `keep_*` value: -1 is [`UNLIMITED`], 0 and up a count.
fn keep_count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = i64::deserialize(d)?;
    match n {
        -1 => Ok(UNLIMITED),
        0.. if n < i64::from(UNLIMITED) => Ok(n as u32),
        _ => Err(serde::de::Error::custom(format!(
            "a retention.keep_* count must be -1 (no limit) or a number from 0, got {n}"
        ))),
    }
}

impl RetentionConfig {
    /// Whether the policy keeps nothing but the newest and pinned backups:
    /// such a section is refused (config error), since it is almost surely
    /// a mistake that would delete every other backup.
    pub fn keeps_nothing(&self) -> bool {
        self.counts().iter().all(|(_, n)| *n == 0) && self.keep_within.is_none_or(|d| d.is_zero())
    }

    fn counts(&self) -> [(Rule, u32); 6] {
        [
            (Rule::Last, self.keep_last),
            (Rule::Hourly, self.keep_hourly),
            (Rule::Daily, self.keep_daily),
            (Rule::Weekly, self.keep_weekly),
            (Rule::Monthly, self.keep_monthly),
            (Rule::Yearly, self.keep_yearly),
        ]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Rule {
    /// The bucket of `t` under this rule, as shown in a reason
    /// (`daily 2026-11-20`); `Last` has one bucket per backup.
    fn bucket(self, t: time::OffsetDateTime, index: usize) -> String {
        let (y, m, d, h) = (t.year(), u8::from(t.month()), t.day(), t.hour());
        match self {
            Rule::Last => format!("last {}", index + 1),
            Rule::Hourly => format!("hourly {y:04}-{m:02}-{d:02}T{h:02}"),
            Rule::Daily => format!("daily {y:04}-{m:02}-{d:02}"),
            Rule::Weekly => {
                let (wy, w, _) = t.to_iso_week_date();
                format!("weekly {wy:04}-W{w:02}")
            }
            Rule::Monthly => format!("monthly {y:04}-{m:02}"),
            Rule::Yearly => format!("yearly {y:04}"),
        }
    }
}

/// What the policy decided for one backup: kept with its reasons, or
/// removed (no reasons).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub id: BackupId,
    /// Why it is kept ("newest", "pinned", "last 2", "daily 2026-11-20",
    /// "within 14d"); empty: remove.
    pub reasons: Vec<String>,
}

impl Decision {
    pub fn keep(&self) -> bool {
        !self.reasons.is_empty()
    }
}

/// Keeps every backup a kept backup is incremental on (its
/// `archive.bases`, and theirs), with the reason `base of <id>`: retention
/// never deletes a backup a kept one still reads from.
pub fn keep_bases(
    decisions: &mut [Decision],
    bases_of: &std::collections::BTreeMap<BackupId, Vec<BackupId>>,
) {
    loop {
        let wanted: Vec<(BackupId, BackupId)> = decisions
            .iter()
            .filter(|d| d.keep())
            .flat_map(|d| {
                let bases = bases_of.get(&d.id).map_or(&[][..], |b| &b[..]);
                bases.iter().map(|b| (b.clone(), d.id.clone()))
            })
            .collect();
        let mut changed = false;
        for (base, of) in wanted {
            let reason = format!("base of {of}");
            if let Some(d) = decisions.iter_mut().find(|d| d.id == base) {
                if !d.reasons.contains(&reason) {
                    changed |= !d.keep();
                    d.reasons.push(reason);
                }
            }
        }
        if !changed {
            return;
        }
    }
}

/// Applies `policy` to the complete backups `ids` (any order, duplicates
/// ignored): one decision per backup, newest first.
pub fn apply(policy: &RetentionConfig, ids: &[BackupId]) -> Vec<Decision> {
    let ids: BTreeSet<&BackupId> = ids.iter().collect();
    let newest = ids.iter().next_back().map(|id| id.time());
    let pinned: BTreeSet<&BackupId> = policy.pin.iter().collect();
    let mut left = policy.counts();
    let mut last_bucket: [Option<String>; 6] = Default::default();
    let mut out = Vec::new();
    for (i, id) in ids.iter().rev().enumerate() {
        let t = id.time();
        let mut reasons = Vec::new();
        if i == 0 {
            reasons.push("newest".to_string());
        }
        if pinned.contains(id) {
            reasons.push("pinned".to_string());
        }
        for ((rule, n), last) in left.iter_mut().zip(&mut last_bucket) {
            if *n == 0 {
                continue;
            }
            let bucket = rule.bucket(t, i);
            if last.as_ref() != Some(&bucket) {
                reasons.push(bucket.clone());
                *last = Some(bucket);
                if *n != UNLIMITED {
                    *n -= 1;
                }
            }
        }
        if let (Some(d), Some(newest)) = (policy.keep_within, newest) {
            if t >= newest - d {
                reasons.push(format!("within {}", humantime::format_duration(d)));
            }
        }
        out.push(Decision {
            id: (*id).clone(),
            reasons,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::tests::v;

    fn ids(from: time::OffsetDateTime, step: time::Duration, n: usize) -> Vec<BackupId> {
        (0..n)
            .map(|i| BackupId::from_time(from + step * i as u32))
            .collect()
    }

    /// The ids kept, newest first.
    fn kept(policy: &RetentionConfig, ids: &[BackupId]) -> Vec<String> {
        apply(policy, ids)
            .into_iter()
            .filter(Decision::keep)
            .map(|d| d.id.to_string())
            .collect()
    }

    fn check(policy: &RetentionConfig, ids: &[BackupId], expected: &[&str]) {
        assert_eq!(kept(policy, ids), expected, "{policy:?}");
    }

    fn year_of_dailies() -> Vec<BackupId> {
        // 2026-01-01 .. 2026-12-31 at 03:00, one a day (365).
        ids(
            time::macros::datetime!(2026-01-01 03:00 UTC),
            time::Duration::days(1),
            365,
        )
    }

    #[test]
    fn a_kept_incremental_keeps_its_bases_and_theirs() {
        let all = ids(
            time::macros::datetime!(2026-11-01 03:00 UTC),
            time::Duration::days(1),
            6,
        );
        let policy = RetentionConfig {
            keep_last: 1,
            ..RetentionConfig::default()
        };
        // 0 full, 1 on 0, 2 on 0 and 1; 3 full, 4 on 3, 5 on 3 and 4 (the newest).
        let bases: std::collections::BTreeMap<BackupId, Vec<BackupId>> =
            [(1, vec![0]), (2, vec![0, 1]), (4, vec![3]), (5, vec![3, 4])]
                .into_iter()
                .map(|(i, b)| {
                    (
                        all[i].clone(),
                        b.into_iter().map(|j| all[j].clone()).collect(),
                    )
                })
                .collect();
        let mut d = apply(&policy, &all);
        assert_eq!(d.iter().filter(|d| d.keep()).count(), 1);
        keep_bases(&mut d, &bases);
        let kept: Vec<(String, Vec<String>)> = d
            .iter()
            .filter(|d| d.keep())
            .map(|d| (d.id.to_string(), d.reasons.clone()))
            .collect();
        assert_eq!(kept.len(), 3, "{kept:?}");
        assert_eq!(kept[1].1, [format!("base of {}", all[5])]);
        assert!(kept[2].1.contains(&format!("base of {}", all[5])));
        assert!(d.iter().filter(|d| !d.keep()).all(|d| d.id < all[3]));
    }

    #[test]
    fn daily_weekly_monthly_over_a_year() {
        let policy = RetentionConfig {
            keep_daily: 7,
            keep_weekly: 4,
            keep_monthly: 12,
            ..Default::default()
        };
        // Newest is Thu 2026-12-31 (ISO 2026-W53, which runs Mon 12-28 .. Sun 2027-01-03).
        // daily: 12-31 .. 12-25 (7 days).
        // weekly: newest of W53 (12-31), W52 (Sun 12-27), W51 (Sun 12-20), W50 (Sun 12-13).
        // monthly: last day of each month, Dec .. Jan (12 months).
        let expected = [
            "20261231T030000Z",
            "20261230T030000Z",
            "20261229T030000Z",
            "20261228T030000Z",
            "20261227T030000Z",
            "20261226T030000Z",
            "20261225T030000Z",
            "20261220T030000Z",
            "20261213T030000Z",
            "20261130T030000Z",
            "20261031T030000Z",
            "20260930T030000Z",
            "20260831T030000Z",
            "20260731T030000Z",
            "20260630T030000Z",
            "20260531T030000Z",
            "20260430T030000Z",
            "20260331T030000Z",
            "20260228T030000Z",
            "20260131T030000Z",
        ];
        check(&policy, &year_of_dailies(), &expected);
        let d = apply(&policy, &year_of_dailies());
        assert_eq!(
            d[0].reasons,
            [
                "newest",
                "daily 2026-12-31",
                "weekly 2026-W53",
                "monthly 2026-12"
            ]
        );
        assert_eq!(d[4].reasons, ["daily 2026-12-27", "weekly 2026-W52"]);
        assert_eq!(d.len(), 365);
    }

    #[test]
    fn yearly_keeps_the_newest_of_each_year() {
        let mut v = year_of_dailies();
        v.extend(ids(
            time::macros::datetime!(2025-06-01 00:00 UTC),
            time::Duration::days(30),
            3,
        ));
        let policy = RetentionConfig {
            keep_yearly: 5,
            ..Default::default()
        };
        // 2025: 06-01, 07-01, 07-31.
        check(&policy, &v, &["20261231T030000Z", "20250731T000000Z"]);
    }

    #[test]
    fn keep_last() {
        let policy = RetentionConfig {
            keep_last: 3,
            ..Default::default()
        };
        check(
            &policy,
            &year_of_dailies(),
            &["20261231T030000Z", "20261230T030000Z", "20261229T030000Z"],
        );
        assert_eq!(apply(&policy, &year_of_dailies())[2].reasons, ["last 3"]);
    }

    #[test]
    fn keep_within_is_relative_to_the_newest_backup_and_inclusive() {
        let policy = RetentionConfig {
            keep_within: Some(Duration::from_secs(2 * 86400)),
            ..Default::default()
        };
        // newest 12-31 03:00; 12-29 03:00 is exactly 2 days older: kept.
        check(
            &policy,
            &year_of_dailies(),
            &["20261231T030000Z", "20261230T030000Z", "20261229T030000Z"],
        );
        assert_eq!(
            apply(&policy, &year_of_dailies())[1].reasons,
            ["within 2days"]
        );
    }

    #[test]
    fn hourly_keeps_the_newest_of_each_hour() {
        // Every 20 minutes from 10:00 to 12:40: hours 10, 11, 12 with 3 each.
        let v = ids(
            time::macros::datetime!(2026-11-20 10:00 UTC),
            time::Duration::minutes(20),
            9,
        );
        let policy = RetentionConfig {
            keep_hourly: 2,
            ..Default::default()
        };
        check(&policy, &v, &["20261120T124000Z", "20261120T114000Z"]);
        assert_eq!(
            apply(&policy, &v)[0].reasons,
            ["newest", "hourly 2026-11-20T12"]
        );
    }

    #[test]
    fn pinned_and_newest_are_always_kept() {
        let policy = RetentionConfig {
            keep_daily: 1,
            pin: vec![v("20260301T030000Z"), v("20200101T000000Z")],
            ..Default::default()
        };
        check(
            &policy,
            &year_of_dailies(),
            &["20261231T030000Z", "20260301T030000Z"],
        );
        // The newest is kept even if no rule reaches it (here: nothing but pins).
        let only_pin = RetentionConfig {
            keep_within: Some(Duration::from_secs(1)),
            ..Default::default()
        };
        check(&only_pin, &year_of_dailies(), &["20261231T030000Z"]);
        assert_eq!(
            apply(&only_pin, &year_of_dailies())[0].reasons,
            ["newest", "within 1s"]
        );
    }

    #[test]
    fn empty_input_and_order() {
        let policy = RetentionConfig {
            keep_last: 1,
            ..Default::default()
        };
        assert!(apply(&policy, &[]).is_empty());
        let mut v = year_of_dailies();
        v.reverse();
        v.push(v[0].clone());
        let d = apply(&policy, &v);
        assert_eq!(d.len(), 365);
        assert!(d.windows(2).all(|w| w[0].id > w[1].id));
    }

    /// `-1` in the config: no limit (restic's semantics).
    #[test]
    fn minus_one_is_unlimited() {
        let parse = |text: &str| toml::from_str::<RetentionConfig>(text).map_err(|e| e.to_string());
        for (text, expected) in [
            (
                "keep_last = -1",
                RetentionConfig {
                    keep_last: UNLIMITED,
                    ..Default::default()
                },
            ),
            (
                "keep_daily = -1\nkeep_weekly = 4",
                RetentionConfig {
                    keep_daily: UNLIMITED,
                    keep_weekly: 4,
                    ..Default::default()
                },
            ),
            (
                "keep_yearly = 0\nkeep_monthly = -1",
                RetentionConfig {
                    keep_monthly: UNLIMITED,
                    ..Default::default()
                },
            ),
            (
                "keep_hourly = 4294967294",
                RetentionConfig {
                    keep_hourly: 4294967294,
                    ..Default::default()
                },
            ),
        ] {
            assert_eq!(parse(text).unwrap(), expected, "{text}");
        }
        for bad in [
            "keep_last = -2",
            "keep_daily = 4294967295",
            "keep_weekly = -100",
            "keep_last = \"all\"",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("keep"), "{bad}: {e}");
        }
        assert!(!parse("keep_last = -1").unwrap().keeps_nothing());

        // Table: the policy, and how many of the year of dailies it keeps.
        let v = year_of_dailies();
        for (policy, kept_count, oldest_kept) in [
            (
                RetentionConfig {
                    keep_last: UNLIMITED,
                    ..Default::default()
                },
                365,
                "20260101T030000Z",
            ),
            (
                RetentionConfig {
                    keep_daily: UNLIMITED,
                    ..Default::default()
                },
                365,
                "20260101T030000Z",
            ),
            // One per month, every month: Dec .. Jan.
            (
                RetentionConfig {
                    keep_monthly: UNLIMITED,
                    ..Default::default()
                },
                12,
                "20260131T030000Z",
            ),
            // 2026 has ISO weeks W01 (from Mon 12-29-2025) .. W53: the newest of each.
            (
                RetentionConfig {
                    keep_weekly: UNLIMITED,
                    ..Default::default()
                },
                53,
                "20260104T030000Z",
            ),
            (
                RetentionConfig {
                    keep_yearly: UNLIMITED,
                    ..Default::default()
                },
                1,
                "20261231T030000Z",
            ),
            // Unlimited monthly plus 7 dailies: 12 months, 6 more days in December.
            (
                RetentionConfig {
                    keep_monthly: UNLIMITED,
                    keep_daily: 7,
                    ..Default::default()
                },
                18,
                "20260131T030000Z",
            ),
        ] {
            let kept = kept(&policy, &v);
            assert_eq!(kept.len(), kept_count, "{policy:?}");
            assert_eq!(kept.last().unwrap(), oldest_kept, "{policy:?}");
        }
    }

    #[test]
    fn a_policy_of_zeros_keeps_nothing() {
        assert!(RetentionConfig::default().keeps_nothing());
        assert!(RetentionConfig {
            keep_within: Some(Duration::ZERO),
            pin: vec![v("20260301T030000Z")],
            ..Default::default()
        }
        .keeps_nothing());
        assert!(!RetentionConfig {
            keep_yearly: 1,
            ..Default::default()
        }
        .keeps_nothing());
    }
}
