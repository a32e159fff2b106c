//! The restore journal, `<backup.state_dir>/restore.journal`: what a restore
//! that is under way has done, or is about to do, to the live data, so that
//! a restore killed at any instant (`kill -9`, a power loss) is finished or
//! undone by the next restore or `restorer recover`.
//!
//! It is written (atomically, fsynced) before each irreversible step:
//! creating the staging directory, stopping the server, each batch of
//! renames, the commit, the start. It records the moves *planned*; which of
//! them are done is read from the file system ([`decide`]): the moves run in
//! order, so the done ones are a prefix, ending at the last one whose source
//! is gone and whose target exists. Every recovery step is idempotent: a
//! recovery that is itself killed is finished by the next.
//!
//! Local state, but still parsed into types and refused when its paths are
//! not the ones the current config implies ([`Journal::check`]).

use std::path::{Component, Path, PathBuf};

use anyhow::Context;
use common::config::Config;
use common::error::config_err;
use common::manifest::BackupId;
use serde::{Deserialize, Serialize};

/// The phases of a restore; [`Phase::order`] is the order `restore::restore`
/// runs them in. The journal records the phase entered last by its [`Phase::name`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Manifest, flags, version and room checked; nothing touched.
    Check,
    /// The archive unpacked and verified into the staging directory.
    Stage,
    /// The server stopped.
    Stop,
    /// The live paths set aside and the staged ones moved in.
    Swap,
    /// The restored data stays; the staging directory is removed.
    Commit,
    /// The server started and answering.
    Start,
    /// Replication set up and running (`--replica-of`).
    Replicate,
}

impl Phase {
    /// The phases in the order they run: `--stop-first` stops before staging.
    pub fn order(stop_first: bool) -> [Phase; 7] {
        use Phase::*;
        if stop_first {
            [Check, Stop, Stage, Swap, Commit, Start, Replicate]
        } else {
            [Check, Stage, Stop, Swap, Commit, Start, Replicate]
        }
    }

    /// The name in the journal, the logs and `MYSNAP_TEST_PAUSE_AT`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Check => "check",
            Phase::Stage => "stage",
            Phase::Stop => "stop",
            Phase::Swap => "swap",
            Phase::Commit => "commit",
            Phase::Start => "start",
            Phase::Replicate => "replicate",
        }
    }
}

/// The journal's file name in `backup.state_dir`.
pub const FILE: &str = "restore.journal";
/// The format this mysnap writes and reads.
const VERSION: u32 = 1;
/// No journal is larger (a few paths).
const MAX_BYTES: u64 = 1 << 20;

/// One restore's record of the live side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    pub version: u32,
    pub backup_id: BackupId,
    /// `volume.datadir`.
    pub datadir: PathBuf,
    /// The staging directory beside it ([`staging_dir`]).
    pub staging: PathBuf,
    /// Whether this restore stops (or stopped) the server: recovery before
    /// the commit starts it again.
    pub stopped_server: bool,
    /// The phase entered last; from [`Phase::Commit`] on the restored data stays.
    pub phase: Phase,
    /// Renames in the order they run: live → `<live>.old-<stamp>` (set aside)
    /// and `<staging>/<path>` → live (moved in).
    pub moves: Vec<Move>,
    /// A delta restore (`--delta`): the restored paths share files (hard
    /// links) with the set-aside ones, which are no copy of the old data
    /// once the server writes: from the commit on they are removed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delta: bool,
}

/// One rename.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Move {
    pub from: PathBuf,
    pub to: PathBuf,
}

/// The staging directory of a restore of backup `id` into `datadir`:
/// `.<name>.mysnap-restore-<id>` beside it.
pub fn staging_dir(datadir: &Path, id: &BackupId) -> PathBuf {
    let name = datadir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    datadir.with_file_name(format!(".{name}.mysnap-restore-{id}"))
}

/// Where live path `live` is set aside by a restore stamped `stamp`.
pub fn aside_of(live: &Path, stamp: &BackupId) -> PathBuf {
    let name = live
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    live.with_file_name(format!("{name}.old-{stamp}"))
}

impl Journal {
    pub fn new(backup_id: BackupId, datadir: PathBuf, phase: Phase) -> Journal {
        Journal {
            version: VERSION,
            staging: staging_dir(&datadir, &backup_id),
            backup_id,
            datadir,
            stopped_server: false,
            phase,
            moves: Vec::new(),
            delta: false,
        }
    }

    /// Whether the restore reached its commit point: its data stays.
    pub fn committed(&self) -> bool {
        matches!(self.phase, Phase::Commit | Phase::Start | Phase::Replicate)
    }

    /// Writes the journal to `path` atomically (0600; file and directory fsynced).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self).context("cannot encode the journal")?;
        common::state::write_atomic(path, text.as_bytes())
    }

    /// Reads and parses the journal at `path`; `None` when there is none.
    pub fn load(path: &Path) -> anyhow::Result<Option<Journal>> {
        use std::io::Read;
        let file = match std::fs::File::open(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            other => other.with_context(|| format!("cannot open {}", path.display()))?,
        };
        let mut text = String::new();
        file.take(MAX_BYTES)
            .read_to_string(&mut text)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Journal::parse(&text)
            .map(Some)
            .map_err(|why| {
                anyhow::anyhow!(
                    "the restore journal {} cannot be read ({why}): it is damaged or from another mysnap version; check the data directory and its .old-* siblings by hand, start the server, then remove the journal",
                    path.display()
                )
            })
    }

    fn parse(text: &str) -> Result<Journal, String> {
        let j: Journal = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if j.version != VERSION {
            return Err(format!(
                "format version {}, this mysnap reads {VERSION}",
                j.version
            ));
        }
        Ok(j)
    }

    /// Refuses a journal whose paths are not the ones `cfg` implies: the
    /// data directory, its staging directory, and moves that only set aside
    /// or move in paths under `volume.mountpoint`. Recovery renames and
    /// removes what the journal names, so it must name nothing else.
    pub fn check(&self, cfg: &Config, path: &Path) -> anyhow::Result<()> {
        let refuse = |what: String| {
            config_err(format!(
                "the restore journal {} does not fit this config: {what}; run `restorer recover --config FILE` with the config of the restore that wrote it, or, if you already put the data directory right by hand, remove {}",
                path.display(),
                path.display()
            ))
        };
        let datadir = &cfg.volume.datadir;
        if &self.datadir != datadir {
            return Err(refuse(format!(
                "it restored into {}, volume.datadir is {}",
                self.datadir.display(),
                datadir.display()
            )));
        }
        let staging = staging_dir(datadir, &self.backup_id);
        if self.staging != staging {
            return Err(refuse(format!(
                "its staging directory {} is not {}",
                self.staging.display(),
                staging.display()
            )));
        }
        let live = |p: &Path| {
            p == datadir
                || p.strip_prefix(&cfg.volume.mountpoint)
                    .is_ok_and(|rel| normal_relative(rel) && rel.as_os_str() != "")
        };
        for m in &self.moves {
            let set_aside = live(&m.from) && is_aside_of(&m.to, &m.from);
            let moved_in = live(&m.to)
                && m.from
                    .strip_prefix(&staging)
                    .is_ok_and(|rel| normal_relative(rel) && rel.as_os_str() != "");
            if !(set_aside || moved_in) {
                return Err(refuse(format!(
                    "it moves {} to {}, which is neither setting aside a path under {} nor moving one in from {}",
                    m.from.display(),
                    m.to.display(),
                    cfg.volume.mountpoint.display(),
                    staging.display()
                )));
            }
        }
        Ok(())
    }
}

/// Relative, and only normal components (no `..`, `.`, root).
fn normal_relative(p: &Path) -> bool {
    p.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Whether `aside` is `<live>.old-<backup id>` beside `live`.
fn is_aside_of(aside: &Path, live: &Path) -> bool {
    let (Some(name), Some(aside_name)) = (live.file_name(), aside.file_name()) else {
        return false;
    };
    let prefix = format!("{}.old-", name.to_string_lossy());
    aside.parent() == live.parent()
        && aside_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .is_some_and(|stamp| BackupId::parse(stamp).is_ok())
}

/// One step of a recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Rename `from` (a move's target) back to `to` (its source).
    MoveBack { from: PathBuf, to: PathBuf },
    /// Remove the staging directory and what is in it.
    RemoveStaging(PathBuf),
    /// Run `mysql.start_command`.
    StartServer,
    /// Remove a set-aside path and what is in it (a delta restore's, after
    /// its commit: it shares files with the restored data).
    RemoveAside(PathBuf),
    /// Remove the journal: nothing is left to finish or undo.
    RemoveJournal,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::MoveBack { from, to } => {
                write!(f, "moving {} back to {}", from.display(), to.display())
            }
            Action::RemoveStaging(dir) => write!(f, "removing {}", dir.display()),
            Action::RemoveAside(dir) => write!(
                f,
                "removing {} (it shares files with the restored data)",
                dir.display()
            ),
            Action::StartServer => write!(f, "starting the server"),
            Action::RemoveJournal => write!(f, "removing the journal"),
        }
    }
}

/// What recovering from `j` takes, given what exists now (`exists`, without
/// following a final link) and whether the server runs: before the commit
/// every move done is undone, newest first, and the server started again if
/// this restore stopped it; from the commit on the restored data stays and
/// the server is started if it is down. Either way the staging directory and
/// the journal go. Refuses a file system that fits no prefix of the moves.
pub fn decide(
    j: &Journal,
    exists: &dyn Fn(&Path) -> bool,
    running: bool,
) -> anyhow::Result<Vec<Action>> {
    let mut actions = Vec::new();
    if !j.committed() {
        // The moves run in order: the last one whose source is gone and
        // whose target exists ends the prefix that is done. (An earlier one
        // can look undone: a path set aside, then a staged one moved in.)
        let done = j
            .moves
            .iter()
            .rposition(|m| !exists(&m.from) && exists(&m.to))
            .map_or(0, |i| i + 1);
        if let Some(m) = j.moves[done..].iter().find(|m| !exists(&m.from)) {
            anyhow::bail!(
                "the restore journal says {} was still to be moved to {}, but {} does not exist: this is not a state a restore leaves; put the data directory right by hand (see its .old-* siblings), start the server, then remove the journal",
                m.from.display(),
                m.to.display(),
                m.from.display()
            );
        }
        for m in j.moves[..done].iter().rev() {
            actions.push(Action::MoveBack {
                from: m.to.clone(),
                to: m.from.clone(),
            });
        }
    }
    let start = if j.committed() {
        !running
    } else {
        j.stopped_server && !running
    };
    // The server first: the staging directory can wait.
    if start {
        actions.push(Action::StartServer);
    }
    if j.committed() && j.delta {
        for m in j.moves.iter().filter(|m| !m.from.starts_with(&j.staging)) {
            actions.push(Action::RemoveAside(m.to.clone()));
        }
    }
    actions.push(Action::RemoveStaging(j.staging.clone()));
    actions.push(Action::RemoveJournal);
    Ok(actions)
}

/// One line for the operator: what was found, and what `actions` do.
pub fn describe(j: &Journal, actions: &[Action]) -> String {
    let moved_back = actions
        .iter()
        .filter(|a| matches!(a, Action::MoveBack { .. }))
        .count();
    let started = actions.contains(&Action::StartServer);
    let found = format!(
        "found the journal of a restore of backup {} into {} that was interrupted in phase {}",
        j.backup_id,
        j.datadir.display(),
        j.phase.name()
    );
    let asides = actions
        .iter()
        .filter(|a| matches!(a, Action::RemoveAside(_)))
        .count();
    let kept = if j.committed() && asides > 0 {
        format!("after its commit: kept the restored data, removed the {asides} set-aside path(s) sharing its files (a delta restore)")
    } else if j.committed() {
        "after its commit: kept the restored data".to_string()
    } else {
        format!("before its commit: moved {moved_back} path(s) back, kept the previous data")
    };
    let server = if started {
        "started the server"
    } else if j.committed() || j.stopped_server {
        "the server was running already"
    } else {
        "the restore had not stopped the server"
    };
    format!("{found}, {kept}, removed the staging directory; {server}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn id(s: &str) -> BackupId {
        BackupId::parse(s).unwrap()
    }

    fn cfg(mountpoint: &str, datadir: &str) -> Config {
        let text = format!(
            r#"
[backup]
name = "db1"
state_dir = "/var/lib/mysnap"
[volume]
backend = "btrfs"
mountpoint = "{mountpoint}"
datadir = "{datadir}"
[store]
url = "file:///srv/backups"
"#
        );
        Config::parse(&text, Path::new("test.toml")).unwrap()
    }

    /// A restore of 20261101T000000Z into /srv/mysql with binlogs in
    /// /srv/binlogs, stamped 20261128T120000Z: every move of its swap.
    fn swapping() -> Journal {
        let mut j = Journal::new(id("20261101T000000Z"), "/srv/mysql".into(), Phase::Swap);
        j.stopped_server = true;
        let stamp = id("20261128T120000Z");
        let staging = j.staging.clone();
        for (staged, live) in [("mysql", "/srv/mysql"), ("binlogs", "/srv/binlogs")] {
            let live = PathBuf::from(live);
            j.moves.push(Move {
                from: live.clone(),
                to: aside_of(&live, &stamp),
            });
            j.moves.push(Move {
                from: staging.join(staged),
                to: live,
            });
        }
        j
    }

    /// The file system after the first `done` moves of `j`, all paths
    /// present before the swap.
    fn after(j: &Journal, done: usize) -> HashSet<PathBuf> {
        let mut fs: HashSet<PathBuf> = j.moves.iter().map(|m| m.from.clone()).collect();
        fs.insert(j.staging.clone());
        for m in &j.moves[..done] {
            assert!(fs.remove(&m.from));
            fs.insert(m.to.clone());
        }
        fs
    }

    fn apply(fs: &mut HashSet<PathBuf>, actions: &[Action]) {
        for a in actions {
            match a {
                Action::MoveBack { from, to } => {
                    assert!(fs.remove(from), "{from:?} exists");
                    assert!(fs.insert(to.clone()), "{to:?} is free");
                }
                Action::RemoveStaging(p) | Action::RemoveAside(p) => {
                    fs.retain(|f| !f.starts_with(p))
                }
                Action::StartServer | Action::RemoveJournal => {}
            }
        }
    }

    #[test]
    fn the_staging_name_and_the_set_aside_name_follow_the_data_directory() {
        let i = id("20261101T000000Z");
        assert_eq!(
            staging_dir(Path::new("/srv/mysql"), &i),
            Path::new("/srv/.mysql.mysnap-restore-20261101T000000Z")
        );
        assert_eq!(
            aside_of(Path::new("/srv/mysql"), &i),
            Path::new("/srv/mysql.old-20261101T000000Z")
        );
    }

    #[test]
    fn a_journal_round_trips_and_a_damaged_or_foreign_one_is_refused() {
        let j = swapping();
        let text = serde_json::to_string_pretty(&j).unwrap();
        assert_eq!(Journal::parse(&text).unwrap(), j);
        for (bad, why) in [
            (text.replace("\"version\": 1", "\"version\": 2"), "version"),
            (text.replace("\"swap\"", "\"dance\""), "unknown variant"),
            (
                text.replace("20261101T000000Z\"", "yesterday\""),
                "backup id",
            ),
            (
                text.replace("\"phase\"", "\"extra\": 1, \"phase\""),
                "unknown field",
            ),
            (text[..text.len() / 2].to_string(), "EOF"),
        ] {
            let err = Journal::parse(&bad).unwrap_err();
            assert!(err.contains(why), "{why}: {err}");
        }
        // Through the file: the error names it and says what to do.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        assert_eq!(Journal::load(&path).unwrap(), None);
        j.save(&path).unwrap();
        assert_eq!(Journal::load(&path).unwrap(), Some(j));
        std::fs::write(&path, "{").unwrap();
        let err = Journal::load(&path).unwrap_err().to_string();
        assert!(
            err.contains(FILE) && err.contains("remove the journal"),
            "{err}"
        );
    }

    #[test]
    fn a_journal_naming_paths_this_config_does_not_imply_is_refused() {
        let cfg = cfg("/srv", "/srv/mysql");
        let path = Path::new("/var/lib/mysnap/restore.journal");
        swapping().check(&cfg, path).unwrap();
        let refused = |j: Journal, why: &str| {
            let err = j.check(&cfg, path).unwrap_err();
            assert_eq!(
                common::cli::exit_code_of(&err),
                common::ExitCode::Usage,
                "{why}"
            );
            let err = err.to_string();
            assert!(
                err.contains(why) && err.contains("restorer recover --config"),
                "{err}"
            );
        };
        let mut j = swapping();
        j.datadir = "/other/mysql".into();
        refused(j, "volume.datadir is /srv/mysql");
        let mut j = swapping();
        j.staging = "/srv/.mysql.mysnap-restore-x".into();
        refused(j, "staging directory");
        for (from, to) in [
            ("/etc", "/etc.old-20261128T120000Z"),
            ("/srv/mysql", "/tmp/mysql.old-20261128T120000Z"),
            ("/srv/mysql", "/srv/mysql.old-now"),
            ("/srv/../etc", "/srv/../etc.old-20261128T120000Z"),
            (
                "/srv/.mysql.mysnap-restore-20261101T000000Z/../../etc",
                "/srv/mysql",
            ),
            (
                "/srv/.mysql.mysnap-restore-20261101T000000Z/mysql",
                "/etc/passwd",
            ),
            ("/srv/elsewhere/mysql", "/srv/mysql"),
        ] {
            let mut j = swapping();
            j.moves.push(Move {
                from: from.into(),
                to: to.into(),
            });
            refused(j, "neither setting aside");
        }
    }

    #[test]
    fn before_the_commit_every_move_done_is_undone_newest_first_from_any_instant() {
        let j = swapping();
        for done in 0..=j.moves.len() {
            let mut fs = after(&j, done);
            let before = after(&j, 0);
            let actions = decide(&j, &|p| fs.contains(p), false).unwrap();
            let back = actions
                .iter()
                .filter(|a| matches!(a, Action::MoveBack { .. }))
                .count();
            assert_eq!(back, done, "after {done} moves");
            assert_eq!(actions[done], Action::StartServer);
            assert_eq!(actions[actions.len() - 1], Action::RemoveJournal);
            apply(&mut fs, &actions);
            let mut want = before.clone();
            want.remove(&j.staging);
            want.retain(|p| !p.starts_with(&j.staging));
            assert_eq!(fs, want, "after {done} moves: the live paths are back");
            // Killed in the middle of the recovery: the next one finishes it.
            for undone in 0..back {
                let mut fs = after(&j, done);
                apply(&mut fs, &actions[..undone]);
                let again = decide(&j, &|p| fs.contains(p), false).unwrap();
                apply(&mut fs, &again);
                assert_eq!(fs, want, "after {done} moves, {undone} undone");
            }
        }
    }

    #[test]
    fn the_server_is_started_only_when_this_restore_stopped_it_or_after_the_commit() {
        let mut j = swapping();
        let fs = after(&j, 0);
        let exists = |p: &Path| fs.contains(p);
        assert!(decide(&j, &exists, false)
            .unwrap()
            .contains(&Action::StartServer));
        assert!(!decide(&j, &exists, true)
            .unwrap()
            .contains(&Action::StartServer));
        j.stopped_server = false;
        assert!(!decide(&j, &exists, false)
            .unwrap()
            .contains(&Action::StartServer));
        // Committed: the data stays, the server is started when it is down.
        let fs = after(&j, j.moves.len());
        let exists = |p: &Path| fs.contains(p);
        for phase in [Phase::Commit, Phase::Start] {
            j.phase = phase;
            let actions = decide(&j, &exists, false).unwrap();
            assert_eq!(
                actions,
                [
                    Action::StartServer,
                    Action::RemoveStaging(j.staging.clone()),
                    Action::RemoveJournal
                ]
            );
            let line = describe(&j, &actions);
            assert!(
                line.contains("kept the restored data") && line.contains("started"),
                "{line}"
            );
            assert!(!decide(&j, &exists, true)
                .unwrap()
                .contains(&Action::StartServer));
        }
    }

    #[test]
    fn a_file_system_no_restore_leaves_is_refused() {
        let j = swapping();
        // The staged data directory vanished before it was moved in.
        let mut fs = after(&j, 1);
        fs.remove(&j.moves[1].from);
        let err = decide(&j, &|p| fs.contains(p), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("does not exist") && err.contains("by hand"),
            "{err}"
        );
    }

    #[test]
    fn stop_first_journals_undo_the_set_aside_data_directory() {
        let mut j = Journal::new(id("20261101T000000Z"), "/srv/mysql".into(), Phase::Stage);
        j.stopped_server = true;
        j.moves.push(Move {
            from: "/srv/mysql".into(),
            to: aside_of(Path::new("/srv/mysql"), &id("20261128T120000Z")),
        });
        let mut fs = after(&j, 1);
        let actions = decide(&j, &|p| fs.contains(p), false).unwrap();
        let line = describe(&j, &actions);
        apply(&mut fs, &actions);
        assert!(fs.contains(Path::new("/srv/mysql")));
        assert!(line.contains("moved 1 path(s) back"), "{line}");
        assert!(line.contains("phase stage"), "{line}");
    }

    #[test]
    fn a_committed_delta_restore_removes_the_set_aside_paths_and_an_uncommitted_one_moves_them_back(
    ) {
        let mut j = swapping();
        j.delta = true;
        let n = j.moves.len();
        // Before the commit: as any restore, everything goes back.
        let mut fs = after(&j, n);
        let actions = decide(&j, &|p| fs.contains(p), false).unwrap();
        assert!(!actions.iter().any(|a| matches!(a, Action::RemoveAside(_))));
        apply(&mut fs, &actions);
        assert!(!fs.contains(Path::new("/srv/mysql.old-20261128T120000Z")));
        assert!(fs.contains(Path::new("/srv/mysql")));
        // From the commit on: the set-aside paths go, the restored ones stay.
        j.phase = Phase::Start;
        let text = serde_json::to_string(&j).unwrap();
        assert_eq!(Journal::parse(&text).unwrap(), j);
        let mut fs = after(&j, n);
        let actions = decide(&j, &|p| fs.contains(p), true).unwrap();
        let line = describe(&j, &actions);
        apply(&mut fs, &actions);
        for live in ["/srv/mysql", "/srv/binlogs"] {
            assert!(fs.contains(Path::new(live)), "{live}");
            let aside = aside_of(Path::new(live), &id("20261128T120000Z"));
            assert!(!fs.contains(&aside), "{aside:?}");
        }
        assert!(line.contains("removed the 2 set-aside path(s)"), "{line}");
        // Not a delta restore: they stay.
        j.delta = false;
        let actions = decide(&j, &|p| after(&j, n).contains(p), true).unwrap();
        assert!(!actions.iter().any(|a| matches!(a, Action::RemoveAside(_))));
    }
}
