//! `restorer restore ID --only db1,db2.t1 --into DIR`: a partial restore,
//! the files of some databases or tables extracted into a directory of
//! their own (to recover one table by hand, e.g. with transportable
//! tablespaces), while the server runs untouched.
//!
//! A database is every file in its directory; a table `db.t` is the files
//! MariaDB and MySQL keep for it there: `t.<ext>` for the extensions of
//! [`TABLE_EXTENSIONS`] and its partitions (`t#P#…`, `t#p#…`). Names are
//! given as the server stores them on disk: letters, digits and `_` are
//! themselves, anything else is in the server's filename encoding
//! (`my-table` is `my@002dtable`). An indexed backup fetches only the
//! frames holding those files; a single-stream one is read whole and only
//! the chosen entries are written (the one read path, with a
//! [`Target::Subset`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use common::archive::policy::Kind;
use common::archive::Target;
use common::config::Config;
use common::crypt::Identities;
use common::error::config_err;
use common::progress::Progress;
use serde::Serialize;

/// The files of table `t` are `t.<one of these>` (InnoDB, the table
/// definition, MyISAM, Aria, CSV, Archive, partitioning, InnoDB's link file
/// and exported metadata, triggers), and its partitions' `t#P#…`/`t#p#…`.
pub const TABLE_EXTENSIONS: &[&str] = &[
    "ibd", "frm", "MYD", "MYI", "MAD", "MAI", "CSV", "CSM", "ARZ", "par", "isl", "cfg", "TRG",
];

/// What `--only` names: databases and tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Only(Vec<Item>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    db: String,
    table: Option<String>,
}

impl std::fmt::Display for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.table {
            Some(t) => write!(f, "{}.{t}", self.db),
            None => write!(f, "{}", self.db),
        }
    }
}

/// A database or table name as stored on disk.
fn check_name(name: &str, item: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 256 {
        return Err(format!("--only {item}: an empty or too long name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '@'))
    {
        return Err(format!(
            "--only {item}: {c:?} is not in a name as the server stores it on disk; give names in its filename encoding (letters, digits and _ as they are, anything else as @ and four hex digits: my-table is my@002dtable), as `ls` shows them in the data directory"
        ));
    }
    Ok(())
}

impl std::str::FromStr for Only {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut items = Vec::new();
        for raw in s.split(',').map(str::trim) {
            let (db, table) = match raw.split_once('.') {
                Some((d, t)) => (d, Some(t)),
                None => (raw, None),
            };
            check_name(db, raw)?;
            if let Some(t) = table {
                check_name(t, raw)?;
            }
            let item = Item {
                db: db.to_string(),
                table: table.map(str::to_string),
            };
            if !items.contains(&item) {
                items.push(item);
            }
        }
        Ok(Only(items))
    }
}

impl Only {
    /// Which item the archive path `path` (of `kind`, in a backup whose
    /// data directory is `datadir`) belongs to: a file of a named database
    /// or table. `None` for anything else.
    fn item_of(&self, datadir: &Path, path: &str, kind: Kind) -> Option<usize> {
        if kind != Kind::File {
            return None;
        }
        let rest = Path::new(path).strip_prefix(datadir).ok()?.to_str()?;
        let (db, name) = rest.split_once('/')?;
        if name.contains('/') {
            return None;
        }
        self.0.iter().position(|i| {
            i.db == db
                && i.table.as_deref().is_none_or(|t| {
                    name.strip_prefix(t).is_some_and(|after| {
                        after.starts_with("#P#")
                            || after.starts_with("#p#")
                            || after
                                .strip_prefix('.')
                                .is_some_and(|ext| TABLE_EXTENSIONS.contains(&ext))
                    })
                })
        })
    }

    /// Whether the entry is extracted: a file of a named item, or a
    /// directory holding one (the data directory, a named database's).
    fn selects(&self, datadir: &Path, path: &str, kind: Kind) -> bool {
        match kind {
            Kind::File => self.item_of(datadir, path, kind).is_some(),
            Kind::Dir => {
                let p = Path::new(path);
                p == datadir
                    || p.strip_prefix(datadir)
                        .ok()
                        .and_then(Path::to_str)
                        .is_some_and(|db| self.0.iter().any(|i| i.db == db))
            }
            Kind::Symlink => false,
        }
    }
}

/// What a partial restore extracted (printed as JSON on stdout).
#[derive(Debug, Serialize)]
pub struct Extracted {
    pub backup_id: String,
    /// Where the files are: `<into>/<the backup's data directory>/<db>/…`.
    pub dir: PathBuf,
    pub files: u64,
    /// Stored bytes read from the store.
    pub fetched_bytes: u64,
}

/// Extracts the files of `only` from backup `id` into `into` (made, or
/// empty; never in or around `volume.datadir`). Nothing else is touched;
/// on failure what was extracted is removed.
pub async fn extract(
    cfg: &Config,
    id: &str,
    only: &Only,
    into: &Path,
    cancel: &AtomicBool,
    progress: &dyn Progress,
) -> anyhow::Result<Extracted> {
    let (into, made) = target_dir(cfg, into)?;
    let out = Cleanup {
        dir: &into,
        made,
        done: false,
    };
    let chosen = crate::choose(cfg, id).await?;
    let (m, info) = (&chosen.manifest, &chosen.info);
    let datadir = m.data.datadir.as_path();
    let found: Vec<AtomicBool> = only.0.iter().map(|_| AtomicBool::new(false)).collect();
    let missing = |found: &[AtomicBool]| {
        let names: Vec<String> = only
            .0
            .iter()
            .zip(found)
            .filter(|(_, f)| !f.load(Ordering::SeqCst))
            .map(|(i, _)| i.to_string())
            .collect();
        (!names.is_empty()).then(|| {
            config_err(format!(
                "--only: backup {} has no files of {} in its data directory (names are as the server stores them on disk, case included; `restorer restore --only` takes db or db.table); nothing was extracted",
                m.backup_id,
                names.join(", ")
            ))
        })
    };
    // An indexed backup says what it holds before anything is fetched.
    if let Some(ix) = &info.index {
        let ids = Identities::from_config(cfg)?;
        let index =
            common::catalog::read_index(chosen.store.as_ref(), m, info, ix, ids.as_ref()).await?;
        for e in &index.entries {
            if let Some(i) = only.item_of(datadir, &e.path, e.kind.into()) {
                found[i].store(true, Ordering::SeqCst);
            }
        }
        if let Some(e) = missing(&found) {
            return Err(e);
        }
    }
    let select = |path: &str, kind: Kind| {
        if let Some(i) = only.item_of(datadir, path, kind) {
            found[i].store(true, Ordering::SeqCst);
        }
        only.selects(datadir, path, kind)
    };
    let ids = Identities::from_config(cfg)?;
    let target = Target::Subset {
        root: &into,
        owner: cfg.volume.owner_ids()?,
        select: &select,
        local: None,
    };
    let s = crate::stream_archive(
        chosen.store.clone(),
        m,
        info,
        target,
        progress,
        cancel,
        ids.as_ref(),
        common::crypt::AuthKey::from_config(cfg)?.as_ref(),
    )
    .await
    .map_err(|e| {
        if cancel.load(Ordering::SeqCst) {
            common::signal::Interrupted.into()
        } else {
            e
        }
    })?;
    if let Some(e) = missing(&found) {
        return Err(e);
    }
    std::fs::File::open(&into)
        .and_then(|d| nix::unistd::syncfs(&d).map_err(Into::into))
        .with_context(|| format!("syncfs {}", into.display()))?;
    let mut out = out;
    out.done = true;
    Ok(Extracted {
        backup_id: m.backup_id.to_string(),
        dir: into.join(datadir),
        files: s.written_files,
        fetched_bytes: s.fetched_bytes,
    })
}

/// `--into`: made (0700), or an empty directory; absolute; never
/// `volume.datadir`, inside it, or holding it. Returns it with links
/// resolved, and whether it was made.
fn target_dir(cfg: &Config, into: &Path) -> anyhow::Result<(PathBuf, bool)> {
    use std::os::unix::fs::DirBuilderExt;
    let refuse = |why: String| Err(config_err(format!("--into {}: {why}", into.display())));
    let (Some(parent), Some(name)) = (into.parent(), into.file_name()) else {
        return refuse("not a directory to make".into());
    };
    if !into.is_absolute() {
        return refuse("must be an absolute path".into());
    }
    // Links resolved, before anything is made.
    let real = match into.canonicalize() {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match parent.canonicalize() {
            Ok(p) => p.join(name),
            Err(e) => return refuse(format!("its parent directory: {e}")),
        },
        Err(e) => return refuse(e.to_string()),
    };
    let live = crate::drill::live_datadir(cfg);
    if real.starts_with(&live) || live.starts_with(&real) {
        return refuse(format!(
            "it overlaps volume.datadir {}: a partial restore never writes into the live data directory; choose a directory elsewhere",
            live.display()
        ));
    }
    match std::fs::DirBuilder::new().mode(0o700).create(&real) {
        Ok(()) => return Ok((real, true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return refuse(format!("cannot create it: {e}")),
    }
    match std::fs::read_dir(&real).map(|mut d| d.next().is_none()) {
        Err(e) => refuse(format!("not a readable directory: {e}")),
        Ok(false) => refuse("it is not empty; give a new or empty directory".into()),
        Ok(true) => Ok((real, false)),
    }
}

/// Removes what a partial restore that failed extracted.
struct Cleanup<'a> {
    dir: &'a Path,
    made: bool,
    done: bool,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let r = if self.made {
            std::fs::remove_dir_all(self.dir)
        } else {
            std::fs::read_dir(self.dir).and_then(|d| {
                d.flatten().try_for_each(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => std::fs::remove_dir_all(e.path()),
                    _ => std::fs::remove_file(e.path()),
                })
            })
        };
        if let Err(e) = r {
            tracing::error!(
                "cannot remove what was extracted into {}: {e}",
                self.dir.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_map_to_their_files_and_databases_to_their_directory() {
        let only: Only = "db1, db2.t1,shop.order@0020items".parse().unwrap();
        let d = Path::new("mysql");
        let f = |p: &str| only.item_of(d, p, Kind::File);
        for (path, item) in [
            ("mysql/db1/anything.ibd", Some(0)),
            ("mysql/db1/db.opt", Some(0)),
            ("mysql/db2/t1.ibd", Some(1)),
            ("mysql/db2/t1.frm", Some(1)),
            ("mysql/db2/t1.MYD", Some(1)),
            ("mysql/db2/t1.MAI", Some(1)),
            ("mysql/db2/t1#P#p0.ibd", Some(1)),
            ("mysql/db2/t1#p#p1#sp#s0.ibd", Some(1)),
            ("mysql/shop/order@0020items.ibd", Some(2)),
            ("mysql/db2/t10.ibd", None),
            ("mysql/db2/t1.ibd.bak", None),
            ("mysql/db2/t1_x.ibd", None),
            ("mysql/db2/db.opt", None),
            ("mysql/db3/t1.ibd", None),
            ("mysql/ibdata1", None),
            ("mysql/db1/sub/x", None),
            ("binlogs/db1/t1.ibd", None),
        ] {
            assert_eq!(f(path), item, "{path}");
        }
        assert!(only.selects(d, "mysql", Kind::Dir));
        assert!(only.selects(d, "mysql/db2", Kind::Dir));
        assert!(!only.selects(d, "mysql/db3", Kind::Dir));
        assert!(!only.selects(d, "mysql/db2/t1.ibd", Kind::Symlink));
    }

    #[test]
    fn names_outside_the_servers_filename_encoding_are_refused() {
        for bad in ["db-1", "db1.t-1", "", "db1.", "a/b", "db.t.x", "db1,,db2"] {
            let err = bad.parse::<Only>().unwrap_err();
            assert!(err.contains("--only"), "{bad}: {err}");
        }
        let err = "shop.order items".parse::<Only>().unwrap_err();
        assert!(err.contains("@002d") || err.contains("@"), "{err}");
    }
}
