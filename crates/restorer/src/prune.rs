//! `restorer prune`: applies the `[retention]` policy to the store. The only
//! code of the restorer that writes to the store, and only by deleting.
//!
//! Only complete backups (a manifest that parses, under its own key, with an
//! archive) are considered; a manifest that does not parse is reported and
//! never deleted; keys without a manifest (an upload under way, a killed
//! run) are left alone. A backup is deleted manifest first, so a
//! half-deleted backup is never listed, then its archive, by the key
//! [`keys::archive`] gives (never a key read from the manifest).

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
    if apply {
        for d in decisions.iter().filter(|d| !d.keep()) {
            delete(store, &listed, &name, &d.id).await?;
        }
    }
    Ok(PruneReport {
        policy: true,
        applied: apply,
        decisions,
        unreadable,
    })
}

async fn delete(
    store: &dyn Store,
    listed: &[String],
    name: &common::manifest::BackupName,
    id: &BackupId,
) -> anyhow::Result<()> {
    let manifest = keys::manifest(name, id);
    store.delete(&manifest).await?;
    tracing::info!("deleted {}", store.url(&manifest));
    for c in [Compression::Zstd, Compression::Xz, Compression::None] {
        let key = keys::archive(name, id, c);
        if listed.contains(&key) {
            store.delete(&key).await?;
            tracing::info!("deleted {}", store.url(&key));
        }
    }
    Ok(())
}

/// The lines `restorer prune` prints: `keep <id>  <reasons>`, `remove <id>`
/// (`removed` once applied), `skip <id>  <why>` for an unreadable manifest.
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
    out
}
