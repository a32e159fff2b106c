//! Which tar entries may be unpacked: the one decision of `verify` and
//! `restore`, made on a model of the tree the entries build, before anything
//! is written.
//!
//! The policy:
//! - Every entry lies inside one of the manifest's `data.paths` (its *root*):
//!   relative, normal components only (no `/` at the start, no `.` or `..`),
//!   at most 4096 bytes; each root itself is a directory.
//! - Only directories, regular files and symbolic links. No hard links, device
//!   nodes, fifos, sparse or unknown entries (mysnap never writes them).
//! - An entry never goes through a symbolic link or a file: every ancestor
//!   inside its root is a directory of the archive (or made for it).
//! - An entry never replaces an earlier one; a directory may be named again.
//! - A symbolic link's target is relative and stays inside the link's root
//!   when walked from the link's directory; every component it walks through
//!   (all but the last) is a directory the archive already made, never
//!   another link. Its last component may be anything: when that is a link,
//!   it was held to the same rule, so no chain of links leaves the root.
//! - At most [`MAX_ENTRIES`] entries (the model holds 16 bytes per entry).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use crate::manifest::RelPath;

/// The most entries an archive may hold (a server with a table per file
/// has far fewer); bounds the model's memory to about 512 MiB.
pub const MAX_ENTRIES: u64 = 16_000_000;
/// The longest path or link target.
pub const MAX_PATH: usize = 4096;

/// What an entry is, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

/// The model of the tree built so far: a 128-bit keyed hash of each path
/// (keys random per run, so no archive can aim for a collision) and its kind.
pub struct Policy {
    roots: Vec<Vec<String>>,
    seen: HashMap<u128, Kind>,
    keys: (RandomState, RandomState),
    entries: u64,
}

impl Policy {
    pub fn new(roots: &[RelPath]) -> Policy {
        Policy {
            roots: roots.iter().map(|r| components(r.as_str())).collect(),
            seen: HashMap::new(),
            keys: (RandomState::new(), RandomState::new()),
            entries: 0,
        }
    }

    fn key(&self, comps: &[String]) -> u128 {
        let a = self.keys.0.hash_one(comps) as u128;
        let b = self.keys.1.hash_one(comps) as u128;
        (a << 64) | b
    }

    fn kind(&self, comps: &[String]) -> Option<Kind> {
        self.seen.get(&self.key(comps)).copied()
    }

    /// Checks one entry and records it. `path` is the entry's name as
    /// stored (a directory may end in `/`); `link` the target of a symlink.
    /// The error says why the entry is refused.
    pub fn admit(&mut self, path: &str, kind: Kind, link: Option<&str>) -> Result<(), String> {
        self.entries += 1;
        if self.entries > MAX_ENTRIES {
            return Err(format!("more than {MAX_ENTRIES} entries"));
        }
        let name = match kind {
            Kind::Dir => path.strip_suffix('/').unwrap_or(path),
            _ => path,
        };
        check_name(name)?;
        let comps = components(name);
        let root = self
            .roots
            .iter()
            .filter(|r| comps.starts_with(r))
            .max_by_key(|r| r.len())
            .ok_or("outside the archived directories (data.paths)")?
            .len();
        if comps.len() == root && kind != Kind::Dir {
            return Err("an archived directory (data.paths) that is not a directory".into());
        }
        // Every ancestor inside the root is a directory (or becomes one).
        for depth in root..comps.len() {
            match self.kind(&comps[..depth]) {
                None => {
                    let k = self.key(&comps[..depth]);
                    self.seen.insert(k, Kind::Dir);
                }
                Some(Kind::Dir) => {}
                Some(Kind::Symlink) => {
                    return Err(format!(
                        "goes through the symbolic link {}",
                        comps[..depth].join("/")
                    ))
                }
                Some(Kind::File) => {
                    return Err(format!(
                        "goes through the file {}",
                        comps[..depth].join("/")
                    ))
                }
            }
        }
        match (self.kind(&comps), kind) {
            (None, _) | (Some(Kind::Dir), Kind::Dir) => {}
            (Some(_), _) => return Err("replaces an earlier entry of the same name".into()),
        }
        if kind == Kind::Symlink {
            self.check_link(&comps, root, link.unwrap_or(""))?;
        }
        let k = self.key(&comps);
        self.seen.insert(k, kind);
        Ok(())
    }

    /// After the last entry: every archived directory is there.
    pub fn finish(&self) -> Result<(), String> {
        for r in &self.roots {
            if !r.is_empty() && self.kind(r) != Some(Kind::Dir) {
                return Err(format!(
                    "the archive has no directory {} of its data.paths",
                    r.join("/")
                ));
            }
        }
        Ok(())
    }

    /// A link at `comps` (inside the root of `root` components) to `target`.
    fn check_link(&self, comps: &[String], root: usize, target: &str) -> Result<(), String> {
        if target.is_empty() {
            return Err("a symbolic link without a target".into());
        }
        if target.len() > MAX_PATH || target.contains('\0') {
            return Err("a symbolic link target longer than 4096 bytes or with a NUL".into());
        }
        if target.starts_with('/') {
            return Err(format!("a symbolic link to an absolute path {target}"));
        }
        let outside = || {
            format!("a symbolic link to {target}, which leaves its archived directory (data.paths)")
        };
        let mut at: Vec<String> = comps[..comps.len() - 1].to_vec();
        let steps: Vec<&str> = target.split('/').filter(|s| !s.is_empty()).collect();
        for (i, step) in steps.iter().enumerate() {
            let last = i + 1 == steps.len();
            match *step {
                "." => {}
                ".." => {
                    if at.len() <= root {
                        return Err(outside());
                    }
                    at.pop();
                }
                name => at.push(name.to_string()),
            }
            // Where the walk stands must be a directory of the archive,
            // except after the last step when that names something.
            if !last || matches!(*step, "." | "..") {
                if at.len() < root {
                    return Err(outside());
                }
                if self.kind(&at) != Some(Kind::Dir) {
                    return Err(format!(
                        "a symbolic link to {target}, which goes through {} before the archive made it a directory",
                        if at.is_empty() { ".".to_string() } else { at.join("/") }
                    ));
                }
            }
        }
        if at.len() < root {
            return Err(outside());
        }
        Ok(())
    }
}

fn components(p: &str) -> Vec<String> {
    p.split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

/// An entry name: relative, normal components, no NUL or control characters.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an entry with an empty name".into());
    }
    if name.len() > MAX_PATH {
        return Err("a name longer than 4096 bytes".into());
    }
    if name.contains('\0') {
        return Err("a name with a NUL".into());
    }
    if name.starts_with('/') {
        return Err("an absolute path".into());
    }
    for c in name.split('/') {
        match c {
            "" => return Err("an empty path component".into()),
            "." => return Err("a '.' component".into()),
            ".." => return Err("a '..' component".into()),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::tests::v;

    /// Admits `entries` in order; returns the error of the first refused one
    /// (with its index), or None.
    fn check(roots: &[&str], entries: &[(&str, Kind, Option<&str>)]) -> Option<(usize, String)> {
        let roots: Vec<RelPath> = roots.iter().map(|r| v(r)).collect();
        let mut p = Policy::new(&roots);
        entries
            .iter()
            .enumerate()
            .find_map(|(i, (path, kind, link))| p.admit(path, *kind, *link).err().map(|e| (i, e)))
    }

    use Kind::*;

    #[test]
    fn what_mysnap_writes_is_admitted() {
        assert_eq!(
            check(
                &["mysql", "binlogs"],
                &[
                    ("mysql", Dir, None),
                    ("mysql/db1", Dir, None),
                    ("mysql/db1/t.ibd", File, None),
                    ("mysql/ibdata1", File, None),
                    ("mysql/db1/link", Symlink, Some("t.ibd")),
                    ("mysql/up", Symlink, Some("db1/..")),
                    ("mysql/self", Symlink, Some(".")),
                    ("mysql/db2/", Dir, None),
                    ("mysql/later", Symlink, Some("db2/x")),
                    ("binlogs", Dir, None),
                    ("binlogs/binlog.000001", File, None),
                ]
            ),
            None
        );
        // The data directory at the volume root.
        assert_eq!(
            check(
                &[""],
                &[
                    ("ibdata1", File, None),
                    ("db/x", Symlink, Some("../ibdata1"))
                ]
            ),
            None
        );
    }

    /// One refused entry per class, each after harmless ones.
    #[test]
    fn forged_entries_are_refused() {
        let m =
            |p: &'static str, k, l| vec![("mysql", Dir, None), ("mysql/d", Dir, None), (p, k, l)];
        type Entries = Vec<(&'static str, Kind, Option<&'static str>)>;
        let cases: Vec<(Entries, &str)> = vec![
            (m("/etc/passwd", File, None), "absolute"),
            (m("mysql/../../etc/x", File, None), "'..'"),
            (m("mysql/./x", File, None), "'.'"),
            (m("etc/passwd", File, None), "outside the archived"),
            (m("mysql/l", Symlink, Some("/etc")), "absolute"),
            (m("mysql/l", Symlink, Some("../../etc")), "leaves"),
            (m("mysql/l", Symlink, Some("..")), "leaves"),
            (m("mysql/d/l", Symlink, Some("../..")), "leaves"),
            (m("mysql/l", Symlink, Some("d/../../x")), "leaves"),
            (m("mysql/l", Symlink, Some("")), "without a target"),
            (
                m("mysql/l", Symlink, Some("nowhere/../x")),
                "before the archive made it",
            ),
            (m("mysql/d", File, None), "replaces"),
            (m("mysql", File, None), "not a directory"),
        ];
        for (entries, needle) in cases {
            let (i, why) = check(&["mysql"], &entries).expect("refused");
            assert_eq!(i, entries.len() - 1, "{entries:?}: {why}");
            assert!(why.contains(needle), "{entries:?}: {why}");
        }
    }

    /// Chains of links, each harmless alone, that climb out together.
    #[test]
    fn link_chains_are_refused() {
        let chains: &[&[(&str, Kind, Option<&str>)]] = &[
            // a -> . ; b -> a/.. (walks through the link a)
            &[
                ("mysql", Dir, None),
                ("mysql/a", Symlink, Some(".")),
                ("mysql/b", Symlink, Some("a/..")),
            ],
            // d/a -> .. ; b -> d/a/.. : through a link again
            &[
                ("mysql", Dir, None),
                ("mysql/d", Dir, None),
                ("mysql/d/a", Symlink, Some("..")),
                ("mysql/b", Symlink, Some("d/a/../..")),
            ],
            // an entry written through a link
            &[
                ("mysql", Dir, None),
                ("mysql/d", Dir, None),
                ("mysql/l", Symlink, Some("d")),
                ("mysql/l/x", File, None),
            ],
            // a link made first, the directory it walks through later a link
            &[("mysql", Dir, None), ("mysql/x", Symlink, Some("d/../.."))],
            // a directory replaced by a link after a link walked through it
            &[
                ("mysql", Dir, None),
                ("mysql/d", Dir, None),
                ("mysql/x", Symlink, Some("d/..")),
                ("mysql/d", Symlink, Some("..")),
            ],
            // the root itself a link
            &[("mysql", Symlink, Some("."))],
        ];
        for chain in chains {
            let got = check(&["mysql"], chain);
            assert!(got.is_some(), "{chain:?} was admitted");
        }
    }

    #[test]
    fn the_model_is_bounded() {
        let roots = [v("m")];
        let mut p = Policy::new(&roots);
        p.entries = MAX_ENTRIES;
        let err = p.admit("m", Kind::Dir, None).unwrap_err();
        assert!(err.contains("more than"), "{err}");
        let long = format!("m/{}", "x".repeat(MAX_PATH));
        let mut p = Policy::new(&roots);
        assert!(p
            .admit(&long, Kind::File, None)
            .unwrap_err()
            .contains("longer"));
    }
}
