//! `restorer prune`: applies the `[retention]` policy to the store. The only
//! code of the restorer that writes to the store, and only by deleting.
//!
//! Only complete backups (a manifest that parses, under its own key, with an
//! archive) are considered; a manifest that does not parse is reported and
//! never deleted; keys without a manifest (an upload under way, a killed
//! run) are left alone. A backup is deleted manifest first, so a
//! half-deleted backup is never listed, then its archive, by the key
//! [`keys::archive`] gives (never a key read from the manifest), then its
//! drill records (`restorer drill`), recognised by [`keys::drill_of`].

use common::archive::keys;
use common::config::Config;
use common::manifest::BackupId;
use common::retention::{self, Decision};
use common::store::{self, Store};
use serde::Serialize;

/// What prune decided (and, with `apply`, did).
#[derive(Debug, Serialize)]
pub struct PruneReport {
    /// False when the config has no `[retention]` section: nothing decided.
    pub policy: bool,
    pub applied: bool,
    /// One per complete backup, newest first.
    pub decisions: Vec<Decision>,
    /// Backups whose manifest could not be read: never deleted.
    pub unreadable: Vec<Unreadable>,
    /// Archive (and drill record) keys without a manifest whose id is older
    /// than [`GARBAGE_GRACE`]: left by a killed run or a prune stopped
    /// half-way; deleted with `apply`.
    pub garbage: Vec<String>,
    /// Keys kept because they are still under Object Lock: garbage whose
    /// retention has not ended, and objects whose delete the store refused.
    pub locked: Vec<Locked>,
    /// Incomplete multipart uploads of this name's archives started more
    /// than [`GARBAGE_GRACE`] ago (aborted with `apply`).
    pub uploads: Vec<StaleUpload>,
    /// False when the store cannot list incomplete uploads (then a
    /// lifecycle rule must remove them).
    pub uploads_listed: bool,
    /// Metadata keys of binary log segments no kept backup needs
    /// ([`common::binlog::unneeded`]); deleted with `apply`, metadata first.
    pub binlog_segments: Vec<String>,
}

/// An incomplete multipart upload prune aborts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StaleUpload {
    pub key: String,
    pub upload_id: String,
    /// RFC 3339, when the store said.
    pub initiated: Option<String>,
}

/// The uploads in `pending` that prune aborts: of an archive key of `name`
/// (checked as listed keys are: a real backup id, the archive name
/// [`keys::archive`] gives), with an upload id of at most 1 KiB of visible
/// ASCII, whose backup id and start (when the store says) are both more
/// than [`GARBAGE_GRACE`] old; or of a binary log segment's data (an
/// `archiver binlogs` killed mid-upload) whose start the store says is
/// more than [`GARBAGE_GRACE`] old (a binary log may be shipped long after
/// it was created, so its creation time does not tell). Every other upload
/// is left alone.
pub fn stale_uploads(
    pending: &[store::PendingUpload],
    name: &common::manifest::BackupName,
    now: time::OffsetDateTime,
) -> Vec<StaleUpload> {
    pending
        .iter()
        .filter(|u| {
            let id_ok = (1..=1024).contains(&u.upload_id.len())
                && u.upload_id.bytes().all(|b| b.is_ascii_graphic());
            let started_long_ago = |t: time::OffsetDateTime| t + GARBAGE_GRACE < now;
            let old = match keys::archive_of(name, &u.key) {
                Some((id, _)) => {
                    started_long_ago(id.time()) && u.initiated.is_none_or(started_long_ago)
                }
                None => {
                    matches!(
                        keys::segment_of(name, &u.key),
                        Some((_, keys::SegmentPart::Data))
                    ) && u.initiated.is_some_and(started_long_ago)
                }
            };
            id_ok && old
        })
        .map(|u| StaleUpload {
            key: u.key.clone(),
            upload_id: u.upload_id.clone(),
            initiated: u.initiated.map(rfc3339),
        })
        .collect()
}

/// A key prune leaves because of Object Lock, and until when (or why).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Locked {
    pub key: String,
    pub why: String,
}

/// How long after a backup's id its objects are written at the latest: each
/// object's retention runs `store.object_lock_days` from its own write, and
/// an archive is stored within a day of its start (as [`GARBAGE_GRACE`]).
pub const LOCK_SLACK: std::time::Duration = GARBAGE_GRACE;

/// Until when the objects of backup `id` may be locked with a retention
/// of `days`: the id plus the days plus [`LOCK_SLACK`].
pub fn locked_until(id: &BackupId, days: u32) -> time::OffsetDateTime {
    id.time() + time::Duration::days(i64::from(days)) + LOCK_SLACK
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// Object Lock and the policy: a backup the policy would remove is kept
/// (reason `locked until <date>`) while its objects may be locked, and
/// garbage archives likewise (moved from `garbage` to the returned list).
/// Nothing changes without a lock (`lock_days` `None`).
pub fn hold_locked(
    decisions: &mut [Decision],
    garbage: &mut Vec<String>,
    name: &common::manifest::BackupName,
    lock_days: Option<u32>,
    now: time::OffsetDateTime,
) -> Vec<Locked> {
    let Some(days) = lock_days else {
        return Vec::new();
    };
    for d in decisions.iter_mut().filter(|d| !d.keep()) {
        let until = locked_until(&d.id, days);
        if until > now {
            d.reasons.push(format!("locked until {}", rfc3339(until)));
        }
    }
    let mut locked = Vec::new();
    garbage.retain(|key| {
        let id = keys::parse(key).filter(|k| k.name == *name).map(|k| k.id);
        match id.map(|id| locked_until(&id, days)) {
            Some(until) if until > now => {
                locked.push(Locked {
                    key: key.clone(),
                    why: format!(
                        "an archive without a manifest, locked until {}",
                        rfc3339(until)
                    ),
                });
                false
            }
            _ => true,
        }
    });
    locked
}

/// How old (by its id, the backup's start) an archive without a manifest
/// must be before prune deletes it: an archive is stored only moments
/// before its manifest, so a day-old one will never get one.
pub const GARBAGE_GRACE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The archive, index, MAC and drill record keys in `listed` of backups with no
/// manifest in `listed` and an id older than `now - GARBAGE_GRACE`.
pub fn garbage(
    listed: &[String],
    name: &common::manifest::BackupName,
    now: time::OffsetDateTime,
) -> Vec<String> {
    let manifests: std::collections::BTreeSet<BackupId> = listed
        .iter()
        .filter_map(|k| keys::manifest_id(name, k))
        .collect();
    listed
        .iter()
        .filter(|key| {
            let id = match keys::parse(key).filter(|k| k.name == *name) {
                Some(keys::Key {
                    id,
                    object:
                        keys::Object::Archive { .. }
                        | keys::Object::Index
                        | keys::Object::ManifestMac
                        | keys::Object::Drill(_),
                    ..
                }) => id,
                _ => return false,
            };
            id.time() + GARBAGE_GRACE < now && !manifests.contains(&id)
        })
        .cloned()
        .collect()
}

/// The keys in `listed` of segment data and MACs without metadata (what a
/// prune or an `archiver binlogs` killed between two writes leaves) that no
/// kept backup can need ([`common::binlog::unneeded_orphans`]).
fn orphan_keys(
    listed: &[String],
    name: &common::manifest::BackupName,
    segments: &[common::binlog::SegmentMeta],
    kept: &[(u64, common::ids::BinlogFile, time::OffsetDateTime)],
) -> Vec<String> {
    use keys::SegmentPart;
    let mut parts: std::collections::BTreeMap<keys::SegmentId, bool> = Default::default();
    for key in listed {
        if let Some((seg, part)) = keys::segment_of(name, key) {
            *parts.entry(seg).or_default() |= part == SegmentPart::Meta;
        }
    }
    let orphans: Vec<keys::SegmentId> = parts
        .into_iter()
        .filter(|(_, meta)| !meta)
        .map(|(seg, _)| seg)
        .collect();
    common::binlog::unneeded_orphans(&orphans, segments, kept)
        .iter()
        .flat_map(|seg| [seg.mac_key(name), seg.data_key(name)])
        .filter(|key| listed.contains(key))
        .collect()
}

/// Recorded only for `--apply` (a dry run changes nothing).
impl common::metrics::Measured for PruneReport {
    fn samples(&self) -> Vec<common::metrics::Sample> {
        use common::metrics::{Metric, Sample};
        if !self.policy {
            return Vec::new();
        }
        let kept = self.decisions.iter().filter(|d| d.keep()).count();
        vec![
            Sample(Metric::PruneKept, kept as f64),
            Sample(Metric::PruneRemoved, (self.decisions.len() - kept) as f64),
            Sample(Metric::PruneGarbageRemoved, self.garbage.len() as f64),
            Sample(Metric::PruneUnreadable, self.unreadable.len() as f64),
        ]
    }
}

#[derive(Debug, Serialize)]
pub struct Unreadable {
    pub id: BackupId,
    pub why: String,
}

/// Decides with the config's policy and, when `apply`, deletes the removed
/// backups. Without a `[retention]` section, does nothing.
pub async fn prune(cfg: &Config, apply: bool) -> anyhow::Result<PruneReport> {
    let Some(policy) = &cfg.retention else {
        return Ok(PruneReport {
            policy: false,
            applied: apply,
            decisions: Vec::new(),
            unreadable: Vec::new(),
            garbage: Vec::new(),
            locked: Vec::new(),
            uploads: Vec::new(),
            uploads_listed: false,
            binlog_segments: Vec::new(),
        });
    };
    // With auth.key_file, a manifest that does not verify is unreadable:
    // never deleted and not counted, so forged manifests cannot push real
    // backups out of the policy.
    let auth = common::crypt::AuthKey::from_config(cfg)?;
    let store = store::open(&cfg.store).await?;
    let store = store.as_ref();
    let name = crate::backup_name(cfg)?;
    let listed = store.list(&keys::backups_of(&name)).await?;
    let Manifests {
        complete,
        bases_of,
        binlog_of,
        unreadable,
    } = read_manifests(store, &name, &listed, auth.as_ref()).await?;
    let now = time::OffsetDateTime::now_utc();
    let mut decisions = retention::apply(policy, &complete);
    // A kept incremental backup keeps the backups its frames are in.
    retention::keep_bases(&mut decisions, &bases_of);
    let mut garbage = garbage(&listed, &name, now);
    let lock_days = cfg.store.object_lock().map(|(_, days)| days);
    let locked = hold_locked(&mut decisions, &mut garbage, &name, lock_days, now);
    // Binary log segments older than what the oldest kept backup needs.
    let kept: Vec<_> = decisions
        .iter()
        .filter(|d| d.keep())
        .filter_map(|d| {
            let (sid, file, at) = binlog_of.get(&d.id)?;
            Some((*sid, file.clone(), *at))
        })
        .collect();
    let segments = crate::segments_in(store, &name, &listed, auth.as_ref()).await?;
    let unneeded = common::binlog::unneeded(&segments, &kept);
    garbage.extend(orphan_keys(&listed, &name, &segments, &kept));
    let binlog_segments = unneeded
        .iter()
        .map(|s| s.segment().meta_key(&name))
        .collect();
    let (uploads, uploads_listed) = list_stale_uploads(store, &name, now).await?;
    let mut report = PruneReport {
        policy: true,
        applied: apply,
        decisions,
        unreadable,
        garbage,
        locked,
        uploads,
        uploads_listed,
        binlog_segments,
    };
    if apply {
        let locking = lock_days.is_some();
        apply_report(store, &listed, &name, locking, &unneeded, &mut report).await?;
    }
    Ok(report)
}

/// What the manifests in `listed` say.
struct Manifests {
    /// The ids of the complete backups.
    complete: Vec<BackupId>,
    /// Each complete backup's bases (an incremental backup's `archive.bases`).
    bases_of: std::collections::BTreeMap<BackupId, Vec<BackupId>>,
    /// Each complete backup's server id and binary log file.
    binlog_of:
        std::collections::BTreeMap<BackupId, (u64, common::ids::BinlogFile, time::OffsetDateTime)>,
    /// The manifests that cannot be read (never deleted).
    unreadable: Vec<Unreadable>,
}

/// The manifests in `listed`, read (and authenticated with `auth`).
async fn read_manifests(
    store: &dyn Store,
    name: &common::manifest::BackupName,
    listed: &[String],
    auth: Option<&common::crypt::AuthKey>,
) -> anyhow::Result<Manifests> {
    let mut complete = Vec::new();
    let mut bases_of = std::collections::BTreeMap::new();
    let mut binlog_of = std::collections::BTreeMap::new();
    let mut unreadable = Vec::new();
    for id in listed.iter().filter_map(|k| keys::manifest_id(name, k)) {
        match crate::read_manifest(store, name, &id, auth).await {
            Ok(m) if m.archive.is_some() => {
                if let Some(b) = &m.binlog {
                    binlog_of.insert(
                        id.clone(),
                        (m.server.server_id, b.file.clone(), m.snapshot_time()),
                    );
                }
                let bases = m.archive.as_ref().map(|a| a.bases.clone());
                bases_of.insert(id.clone(), bases.unwrap_or_default());
                complete.push(id)
            }
            Ok(_) => unreadable.push(Unreadable {
                id,
                why: "a manifest without an archive (never completed)".into(),
            }),
            Err(e) if common::cli::exit_code_of(&e) == common::ExitCode::Integrity => unreadable
                .push(Unreadable {
                    id,
                    why: format!("{e:#}"),
                }),
            Err(e) => return Err(e),
        }
    }
    Ok(Manifests {
        complete,
        bases_of,
        binlog_of,
        unreadable,
    })
}

/// The incomplete uploads to abort ([`stale_uploads`]), and whether the
/// store could list them (a store or credentials that cannot: a warning
/// naming the lifecycle rule or the permission).
async fn list_stale_uploads(
    store: &dyn Store,
    name: &common::manifest::BackupName,
    now: time::OffsetDateTime,
) -> anyhow::Result<(Vec<StaleUpload>, bool)> {
    match store.list_uploads(&keys::backups_of(name)).await {
        Ok(Some(pending)) => Ok((stale_uploads(&pending, name, now), true)),
        // Credentials made for prune before it listed uploads may lack the
        // permission: the backups are still pruned.
        Err(e) if is_denied(&e) => {
            tracing::warn!(
                "{e:#}; incomplete uploads not checked: grant s3:ListBucketMultipartUploads and s3:AbortMultipartUpload, or rely on a lifecycle rule (AbortIncompleteMultipartUpload)"
            );
            Ok((Vec::new(), false))
        }
        Err(e) => Err(e),
        Ok(None) => {
            tracing::warn!(
                "{}: this store cannot list multipart uploads (ListMultipartUploads): set a lifecycle rule (AbortIncompleteMultipartUpload) on the bucket to remove those killed runs left",
                store.url(&keys::backups_of(name))
            );
            Ok((Vec::new(), false))
        }
    }
}

/// `--apply`: the stale uploads aborted, the removed backups deleted
/// (manifest first), then the garbage; what the store refuses under
/// Object Lock (`locking`) is kept and added to `r.locked`.
async fn apply_report(
    store: &dyn Store,
    listed: &[String],
    name: &common::manifest::BackupName,
    locking: bool,
    unneeded: &[common::binlog::SegmentMeta],
    r: &mut PruneReport,
) -> anyhow::Result<()> {
    for u in &r.uploads {
        match store.abort_upload(&u.key, &u.upload_id).await {
            Ok(()) => {
                tracing::info!("aborted an incomplete upload of {}", store.url(&u.key));
                crate::restore::pause_at(UPLOAD_ABORTED, None);
            }
            Err(e) if is_denied(&e) => tracing::warn!(
                "{e:#}; left: grant s3:AbortMultipartUpload, or rely on a lifecycle rule (AbortIncompleteMultipartUpload)"
            ),
            Err(e) => return Err(e),
        }
    }
    for d in r.decisions.iter_mut().filter(|d| !d.keep()) {
        if !delete(store, listed, name, &d.id, locking, &mut r.locked).await? {
            d.reasons.push(REFUSED.to_string());
        }
    }
    for s in unneeded {
        let seg = s.segment();
        // Metadata first: a segment half deleted is never counted.
        for key in [seg.meta_key(name), seg.mac_key(name), seg.data_key(name)] {
            if !delete_one(store, &key, locking).await? {
                r.locked.push(Locked {
                    key,
                    why: REFUSED.into(),
                });
                break;
            }
        }
    }
    for key in &r.garbage {
        if delete_one(store, key, locking).await? {
            tracing::info!("deleted {} ({})", store.url(key), garbage_kind(key));
        } else {
            r.locked.push(Locked {
                key: key.clone(),
                why: REFUSED.into(),
            });
        }
    }
    Ok(())
}

/// The test hook's pause point ([`crate::PAUSE_ENV`]) between a backup's
/// manifest deleted and its archive: a prune killed here leaves an archive
/// without a manifest, garbage for the next prune once older than
/// [`GARBAGE_GRACE`].
pub const MANIFEST_DELETED: &str = "prune-manifest-deleted";

/// The test hook's pause point after each incomplete upload aborted: a
/// prune killed here leaves the others to the next prune, which counts an
/// upload the store no longer knows as aborted.
pub const UPLOAD_ABORTED: &str = "prune-upload-aborted";

/// Why a backup or key is kept whose delete the store refused.
const REFUSED: &str = "the store refused the delete: locked (Object Lock)";

/// Deletes `key`; when the store refuses it (access denied) and Object
/// Lock is configured, the object is still locked: it is kept, with a
/// warning, and prune goes on. Returns whether it was deleted.
async fn delete_one(store: &dyn Store, key: &str, locking: bool) -> anyhow::Result<bool> {
    match store.delete(key).await {
        Ok(()) => Ok(true),
        Err(e) if locking && is_denied(&e) => {
            tracing::warn!(
                "kept {}: the store refused the delete (still locked by Object Lock?): {e:#}",
                store.url(key)
            );
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn is_denied(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref(),
            Some(common::store::StoreError::Denied { .. })
        )
    })
}

/// Deletes backup `id`, manifest first; returns false when the store
/// refused the manifest's delete (the backup stays whole and listed). An
/// archive whose delete is refused after its manifest went is reported in
/// `locked`: garbage for a later prune.
async fn delete(
    store: &dyn Store,
    listed: &[String],
    name: &common::manifest::BackupName,
    id: &BackupId,
    locking: bool,
    locked: &mut Vec<Locked>,
) -> anyhow::Result<bool> {
    let manifest = keys::manifest(name, id);
    if !delete_one(store, &manifest, locking).await? {
        return Ok(false);
    }
    tracing::info!("deleted {}", store.url(&manifest));
    crate::restore::pause_at(MANIFEST_DELETED, None);
    let objects = keys::archives(name, id)
        .into_iter()
        .chain(keys::indexes(name, id))
        .chain([keys::manifest_mac(name, id)]);
    for key in objects {
        if !listed.contains(&key) {
            continue;
        }
        if delete_one(store, &key, locking).await? {
            tracing::info!("deleted {}", store.url(&key));
        } else {
            locked.push(Locked {
                key,
                why: format!("{REFUSED}; its manifest was deleted"),
            });
        }
    }
    for key in listed
        .iter()
        .filter(|k| keys::drill_of(name, k).is_some_and(|(of, _)| of == *id))
    {
        if delete_one(store, key, locking).await? {
            tracing::info!("deleted {}", store.url(key));
        } else {
            locked.push(Locked {
                key: key.clone(),
                why: format!("{REFUSED}; its manifest was deleted"),
            });
        }
    }
    Ok(true)
}

/// What a garbage key (an archive, an index or a drill record, from [`garbage`]) is, for people.
fn garbage_kind(key: &str) -> &'static str {
    match keys::parse(key).map(|k| k.object) {
        Some(keys::Object::Drill(_)) => "a drill record without a manifest",
        Some(keys::Object::Index) => "an index without a manifest",
        None if key.ends_with(keys::BINLOG_DATA_FILE) => {
            "a binary log segment's data without its metadata, older than any kept backup needs"
        }
        None if key.ends_with(".mac") => {
            "a binary log segment's MAC without its metadata, older than any kept backup needs"
        }
        _ => "an archive without a manifest",
    }
}

/// The lines `restorer prune` prints: `keep <id>  <reasons>`, `remove <id>`
/// (`removed` once applied), `skip <id>  <why>` for an unreadable manifest,
/// `remove <key>  an archive without a manifest` for garbage.
pub fn prune_lines(r: &PruneReport) -> String {
    if !r.policy {
        return "no [retention] policy: nothing to do\n".into();
    }
    let mut out = String::new();
    for d in &r.decisions {
        if d.keep() {
            out += &format!("keep {}  {}\n", d.id, d.reasons.join(", "));
        } else if r.applied {
            out += &format!("removed {}\n", d.id);
        } else {
            out += &format!("remove {}\n", d.id);
        }
    }
    for u in &r.unreadable {
        out += &format!("skip {}  {}\n", u.id, u.why);
    }
    let verb = if r.applied { "removed" } else { "remove" };
    for key in &r.garbage {
        if !r.locked.iter().any(|l| l.key == *key) {
            out += &format!("{verb} {key}  {}\n", garbage_kind(key));
        }
    }
    for key in &r.binlog_segments {
        if !r.locked.iter().any(|l| l.key == *key) {
            out += &format!("{verb} {key}  a binary log segment no kept backup needs\n");
        }
    }
    for l in &r.locked {
        out += &format!("keep {}  {}\n", l.key, l.why);
    }
    let verb = if r.applied { "aborted" } else { "abort" };
    for u in &r.uploads {
        let since = u
            .initiated
            .as_deref()
            .map(|t| format!(" started {t}"))
            .unwrap_or_default();
        out += &format!("{verb} {}  an incomplete upload{since}\n", u.key);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_lock_keeps_what_may_still_be_locked() {
        let name = common::manifest::BackupName::parse("db1").unwrap();
        let id = |s: &str| BackupId::parse(s).unwrap();
        let now = time::macros::datetime!(2026-11-28 03:00 UTC);
        let policy = common::retention::RetentionConfig {
            keep_last: 1,
            ..Default::default()
        };
        let ids = [
            id("20261128T020000Z"), // newest
            id("20261120T030000Z"), // + 7 days + 1 day slack = 11-28 03:00: free now
            id("20261121T030000Z"), // locked until 11-29 03:00
        ];
        let mut garbage = vec![
            "db1/20261101T030000Z/data.tar.zst".to_string(),
            "db1/20261125T030000Z/data.tar.zst".to_string(),
        ];
        // Without a lock nothing changes.
        let mut d = retention::apply(&policy, &ids);
        let mut g = garbage.clone();
        assert!(hold_locked(&mut d, &mut g, &name, None, now).is_empty());
        assert_eq!(d.iter().filter(|d| d.keep()).count(), 1);
        assert_eq!(g.len(), 2);

        let mut d = retention::apply(&policy, &ids);
        let locked = hold_locked(&mut d, &mut garbage, &name, Some(7), now);
        let kept: Vec<_> = d
            .iter()
            .map(|d| (d.id.to_string(), d.reasons.clone()))
            .collect();
        assert_eq!(
            kept,
            [
                (
                    "20261128T020000Z".to_string(),
                    vec!["newest".to_string(), "last 1".to_string()]
                ),
                (
                    "20261121T030000Z".to_string(),
                    vec!["locked until 2026-11-29T03:00:00Z".to_string()]
                ),
                ("20261120T030000Z".to_string(), vec![]),
            ]
        );
        assert_eq!(garbage, ["db1/20261101T030000Z/data.tar.zst"]);
        assert_eq!(
            locked,
            [Locked {
                key: "db1/20261125T030000Z/data.tar.zst".into(),
                why: "an archive without a manifest, locked until 2026-12-03T03:00:00Z".into(),
            }]
        );
        let report = PruneReport {
            policy: true,
            applied: false,
            decisions: d,
            unreadable: Vec::new(),
            garbage,
            locked,
            uploads: Vec::new(),
            uploads_listed: true,
            binlog_segments: Vec::new(),
        };
        assert_eq!(
            prune_lines(&report),
            "keep 20261128T020000Z  newest, last 1\n\
             keep 20261121T030000Z  locked until 2026-11-29T03:00:00Z\n\
             remove 20261120T030000Z\n\
             remove db1/20261101T030000Z/data.tar.zst  an archive without a manifest\n\
             keep db1/20261125T030000Z/data.tar.zst  an archive without a manifest, locked until 2026-12-03T03:00:00Z\n"
        );
    }

    #[test]
    fn stale_uploads_are_old_uploads_of_archive_keys() {
        let name = common::manifest::BackupName::parse("db1").unwrap();
        let now = time::macros::datetime!(2026-11-28 03:00 UTC);
        let up =
            |key: &str, id: &str, initiated: Option<time::OffsetDateTime>| store::PendingUpload {
                key: key.into(),
                upload_id: id.into(),
                initiated,
            };
        let old = Some(time::macros::datetime!(2026-11-20 03:05 UTC));
        let pending = [
            up("db1/20261120T030000Z/data.tar.zst", "u1", old), // aborted
            up("db1/20261120T030000Z/data.tar.xz", "u2", None), // aborted: the id is old
            up("db1/20261127T040000Z/data.tar.zst", "u3", None), // younger than the grace
            up("db1/20261120T030000Z/data.tar.zst", "u4", Some(now)), // started just now
            up("db1/20261120T030000Z/manifest.toml", "u5", old), // not an archive
            up("db1/2026/data.tar.zst", "u6", old),             // not an id
            up("db10/20261120T030000Z/data.tar.zst", "u7", old), // another name
            up("db1/20261120T030000Z/data.tar.zst", "bad id", old), // not an upload id
            up("db1/20261120T030000Z/data.tar.zst", "", old),
            // A binary log segment's data: only by when the upload started.
            up(
                "db1/binlogs/1/binlog.000042-20261128T020000Z/binlog.zst",
                "u8",
                old,
            ), // aborted
            up(
                "db1/binlogs/1/binlog.000042-20261101T020000Z/binlog.zst",
                "u9",
                Some(now),
            ), // an old file shipped just now
            up(
                "db1/binlogs/1/binlog.000042-20261101T020000Z/binlog.zst",
                "u10",
                None,
            ), // the store does not say when
            up(
                "db1/binlogs/1/binlog.000042-20261101T020000Z/meta.toml",
                "u11",
                old,
            ), // not segment data
        ];
        let got: Vec<_> = stale_uploads(&pending, &name, now)
            .into_iter()
            .map(|u| (u.key, u.upload_id, u.initiated))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "db1/20261120T030000Z/data.tar.zst".to_string(),
                    "u1".to_string(),
                    Some("2026-11-20T03:05:00Z".to_string())
                ),
                (
                    "db1/20261120T030000Z/data.tar.xz".to_string(),
                    "u2".to_string(),
                    None
                ),
                (
                    "db1/binlogs/1/binlog.000042-20261128T020000Z/binlog.zst".to_string(),
                    "u8".to_string(),
                    Some("2026-11-20T03:05:00Z".to_string())
                ),
            ]
        );
    }

    #[test]
    fn garbage_is_named_by_its_parsed_key() {
        for (key, kind) in [
            (
                "db1/20261120T030000Z/data.tar.zst",
                "an archive without a manifest",
            ),
            (
                "db1/20261120T030000Z/data.tar",
                "an archive without a manifest",
            ),
            (
                "db1/20261120T030000Z/drill-20261121T030000Z.toml",
                "a drill record without a manifest",
            ),
            (
                "db1/20261120T030000Z/index.json.zst",
                "an index without a manifest",
            ),
        ] {
            assert_eq!(garbage_kind(key), kind, "{key}");
        }
    }

    #[test]
    fn garbage_is_an_old_archive_without_a_manifest() {
        let name = common::manifest::BackupName::parse("db1").unwrap();
        let listed: Vec<String> = [
            "db1/20261120T030000Z/data.tar.zst", // old, no manifest: garbage
            "db1/20261120T030000Z/index.json.zst", // its index: garbage
            "db1/20261121T030000Z/index.json.zst", // has a manifest
            "db1/20261119T030000Z/data.tar.age", // encrypted, old, no manifest: garbage
            "db1/20261119T030000Z/manifest.toml.mac", // its MAC: garbage
            "db1/20261121T030000Z/data.tar.xz",  // has a manifest
            "db1/20261121T030000Z/manifest.toml.mac",
            "db1/20261121T030000Z/manifest.toml",
            "db1/20261122T030000Z/notes.txt",    // not an archive
            "db1/20261127T040000Z/data.tar.zst", // younger than the grace
            "db1/nonsense/data.tar.zst",
            "db1/20261120T030000Z/drill-20261121T030000Z.toml", // of the garbage archive
            "db1/20261121T030000Z/drill-20261122T030000Z.toml", // has a manifest
            "db1/20261127T040000Z/drill-20261127T050000Z.toml", // younger than the grace
        ]
        .map(String::from)
        .to_vec();
        let now = time::macros::datetime!(2026-11-28 03:00 UTC);
        assert_eq!(
            garbage(&listed, &name, now),
            [
                "db1/20261120T030000Z/data.tar.zst",
                "db1/20261120T030000Z/index.json.zst",
                "db1/20261119T030000Z/data.tar.age",
                "db1/20261119T030000Z/manifest.toml.mac",
                "db1/20261120T030000Z/drill-20261121T030000Z.toml"
            ]
        );
    }
}
