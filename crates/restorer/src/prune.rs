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
use common::config::{Compression, Config};
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
}

/// How old (by its id, the backup's start) an archive without a manifest
/// must be before prune deletes it: an archive is stored only moments
/// before its manifest, so a day-old one will never get one.
pub const GARBAGE_GRACE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The archive and drill record keys in `listed` of backups with no
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
    let prefix = keys::backups_of(name);
    let mut out = Vec::new();
    for key in listed {
        let Some((id, file)) = key.strip_prefix(&prefix).and_then(|r| r.split_once('/')) else {
            continue;
        };
        let Ok(id) = BackupId::parse(id) else {
            continue;
        };
        let old = id.time() + GARBAGE_GRACE < now;
        let archive = [Compression::Zstd, Compression::Xz, Compression::None]
            .iter()
            .any(|c| keys::archive(name, &id, *c) == *key && c.file_name() == file);
        let drill = keys::drill_of(name, key).is_some_and(|(of, _)| of == id);
        if (archive || drill) && old && !manifests.contains(&id) {
            out.push(key.clone());
        }
    }
    out
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
        });
    };
    let store = store::open(&cfg.store).await?;
    let store = store.as_ref();
    let name = crate::backup_name(cfg)?;
    let listed = store.list(&keys::backups_of(&name)).await?;
    let mut complete = Vec::new();
    let mut unreadable = Vec::new();
    for key in &listed {
        let Some(id) = keys::manifest_id(&name, key) else {
            continue;
        };
        match crate::read_manifest(store, &name, &id).await {
            Ok(m) if m.archive.is_some() => complete.push(id),
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
    let decisions = retention::apply(policy, &complete);
    let garbage = garbage(&listed, &name, time::OffsetDateTime::now_utc());
    if apply {
        for d in decisions.iter().filter(|d| !d.keep()) {
            delete(store, &listed, &name, &d.id).await?;
        }
        for key in &garbage {
            store.delete(key).await?;
            tracing::info!("deleted {} ({})", store.url(key), garbage_kind(key));
        }
    }
    Ok(PruneReport {
        policy: true,
        applied: apply,
        decisions,
        unreadable,
        garbage,
    })
}

/// The test hook's pause point ([`crate::PAUSE_ENV`]) between a backup's
/// manifest deleted and its archive: a prune killed here leaves an archive
/// without a manifest, garbage for the next prune once older than
/// [`GARBAGE_GRACE`].
pub const MANIFEST_DELETED: &str = "prune-manifest-deleted";

async fn delete(
    store: &dyn Store,
    listed: &[String],
    name: &common::manifest::BackupName,
    id: &BackupId,
) -> anyhow::Result<()> {
    let manifest = keys::manifest(name, id);
    store.delete(&manifest).await?;
    tracing::info!("deleted {}", store.url(&manifest));
    crate::restore::pause_at(MANIFEST_DELETED, None);
    for c in [Compression::Zstd, Compression::Xz, Compression::None] {
        let key = keys::archive(name, id, c);
        if listed.contains(&key) {
            store.delete(&key).await?;
            tracing::info!("deleted {}", store.url(&key));
        }
    }
    for key in listed
        .iter()
        .filter(|k| keys::drill_of(name, k).is_some_and(|(of, _)| of == *id))
    {
        store.delete(key).await?;
        tracing::info!("deleted {}", store.url(key));
    }
    Ok(())
}

/// What a garbage key (an archive or a drill record, from [`garbage`]) is, for people.
fn garbage_kind(key: &str) -> &'static str {
    match key
        .rsplit('/')
        .next()
        .is_some_and(|f| f.starts_with("drill-"))
    {
        true => "a drill record without a manifest",
        false => "an archive without a manifest",
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
        out += &format!("{verb} {key}  {}\n", garbage_kind(key));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_old_archive_without_a_manifest() {
        let name = common::manifest::BackupName::parse("db1").unwrap();
        let listed: Vec<String> = [
            "db1/20261120T030000Z/data.tar.zst", // old, no manifest: garbage
            "db1/20261121T030000Z/data.tar.xz",  // has a manifest
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
                "db1/20261120T030000Z/drill-20261121T030000Z.toml"
            ]
        );
    }
}
