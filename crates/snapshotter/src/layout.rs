//! Where the server keeps its data, and what of it to archive. Every path the
//! server needs must be on the snapshotted volume: a backup missing ibdata,
//! the redo log or the binary logs would be silently broken.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use common::error::config_err;
use common::manifest::{DataLayout, RelPath};

/// The server variables that say where its files are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataVars {
    pub datadir: PathBuf,
    pub innodb_data_home_dir: String,
    pub innodb_data_file_path: String,
    pub innodb_log_group_home_dir: String,
    pub innodb_undo_directory: String,
    pub innodb_temp_data_file_path: String,
    pub log_bin: bool,
    pub log_bin_basename: Option<String>,
    pub relay_log_basename: Option<String>,
    pub pid_file: Option<String>,
    pub socket: Option<String>,
}

const NAMES: &[&str] = &[
    "datadir",
    "innodb_data_home_dir",
    "innodb_data_file_path",
    "innodb_log_group_home_dir",
    "innodb_undo_directory",
    "innodb_temp_data_file_path",
    "log_bin",
    "log_bin_basename",
    "relay_log_basename",
    "pid_file",
    "socket",
];

impl DataVars {
    pub async fn query(conn: &mut mysql_async::Conn) -> anyhow::Result<DataVars> {
        let list = NAMES
            .iter()
            .map(|n| format!("'{n}'"))
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!("SHOW GLOBAL VARIABLES WHERE Variable_name IN ({list})");
        let rows = common::mysql::query_rows(conn, &sql).await?;
        let vars: HashMap<String, String> = rows
            .into_iter()
            .filter_map(|mut r| {
                Some((
                    r.remove("Variable_name")??,
                    r.remove("Value")?.unwrap_or_default(),
                ))
            })
            .collect();
        Ok(DataVars::from_map(&vars))
    }

    pub fn from_map(vars: &HashMap<String, String>) -> DataVars {
        let get = |k: &str| vars.get(k).cloned().unwrap_or_default();
        let opt = |k: &str| vars.get(k).filter(|v| !v.is_empty()).cloned();
        DataVars {
            datadir: PathBuf::from(get("datadir")),
            innodb_data_home_dir: get("innodb_data_home_dir"),
            innodb_data_file_path: get("innodb_data_file_path"),
            innodb_log_group_home_dir: get("innodb_log_group_home_dir"),
            innodb_undo_directory: get("innodb_undo_directory"),
            innodb_temp_data_file_path: get("innodb_temp_data_file_path"),
            log_bin: matches!(get("log_bin").as_str(), "ON" | "1"),
            log_bin_basename: opt("log_bin_basename"),
            relay_log_basename: opt("relay_log_basename"),
            pid_file: opt("pid_file"),
            socket: opt("socket"),
        }
    }
}

/// Resolves `p` against `base`, removing `.` and `..` lexically, then follows
/// symlinks where the path exists.
fn resolve(base: &Path, p: &str) -> PathBuf {
    let joined = if p.is_empty() {
        base.to_path_buf()
    } else {
        base.join(p)
    };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out.canonicalize().unwrap_or(out)
}

/// The file names of an InnoDB file path spec (`ibdata1:12M;ibdata2:1G:autoextend`).
fn spec_files(spec: &str) -> impl Iterator<Item = &str> {
    spec.split(';')
        .filter_map(|f| f.split(':').next())
        .filter(|f| !f.is_empty())
}

fn relative(root: &Path, p: &Path) -> anyhow::Result<RelPath> {
    let r = p.strip_prefix(root).unwrap_or(Path::new(""));
    let text = r.to_str().ok_or_else(|| {
        config_err(format!(
            "{} is not UTF-8, which a mysnap manifest cannot hold: rename it",
            p.display()
        ))
    })?;
    RelPath::parse(text).map_err(|e| config_err(format!("{}: {e}", p.display())))
}

/// Decides what to archive, refusing any data path that is not on the volume.
pub fn plan_layout(vars: &DataVars, mountpoint: &Path) -> anyhow::Result<DataLayout> {
    let root = mountpoint
        .canonicalize()
        .map_err(|e| config_err(format!("volume.mountpoint {}: {e}", mountpoint.display())))?;
    let datadir = resolve(Path::new("/"), &vars.datadir.to_string_lossy());
    let data_home = resolve(&datadir, &vars.innodb_data_home_dir);

    let mut needed: Vec<(String, PathBuf)> = vec![("datadir".into(), datadir.clone())];
    for f in spec_files(&vars.innodb_data_file_path) {
        let file = resolve(&data_home, f);
        needed.push((
            "innodb_data_file_path".into(),
            file.parent().unwrap_or(&file).to_path_buf(),
        ));
    }
    needed.push((
        "innodb_log_group_home_dir".into(),
        resolve(&datadir, &vars.innodb_log_group_home_dir),
    ));
    needed.push((
        "innodb_undo_directory".into(),
        resolve(&datadir, &vars.innodb_undo_directory),
    ));
    for (key, base) in [
        ("log_bin_basename", &vars.log_bin_basename),
        ("relay_log_basename", &vars.relay_log_basename),
    ] {
        if let Some(b) = base {
            // The basename names no file: resolve symlinks through its directory
            // (a data directory reached through a link, as volprep --move-datadir leaves it).
            let b = resolve(&datadir, b);
            let dir = b.parent().unwrap_or(&b).to_path_buf();
            needed.push((key.into(), dir.canonicalize().unwrap_or(dir)));
        }
    }
    for (key, dir) in &needed {
        if !dir.starts_with(&root) {
            return Err(config_err(format!(
                "the server's {key} is in {}, which is not on the snapshotted volume {} (volume.mountpoint): a backup without it would be broken; move it onto the volume or fix volume.mountpoint",
                dir.display(),
                root.display()
            )));
        }
    }

    let mut paths: Vec<RelPath> = Vec::new();
    let mut dirs: Vec<&PathBuf> = needed.iter().map(|(_, d)| d).collect();
    // The data directory first; then others not inside one already listed.
    dirs.sort_by_key(|d| (*d != &datadir, d.components().count()));
    let mut kept: Vec<&PathBuf> = Vec::new();
    for d in dirs {
        if !kept.iter().any(|k| d.starts_with(k)) {
            kept.push(d);
            paths.push(relative(&root, d)?);
        }
    }

    let mut exclude = Vec::new();
    let mut skip = |p: PathBuf| -> anyhow::Result<()> {
        if p.starts_with(&root) && kept.iter().any(|k| p.starts_with(k)) {
            let r = relative(&root, &p)?;
            if !exclude.contains(&r) {
                exclude.push(r);
            }
        }
        Ok(())
    };
    for f in spec_files(&vars.innodb_temp_data_file_path) {
        skip(resolve(&datadir, f))?;
    }
    for p in [&vars.pid_file, &vars.socket].into_iter().flatten() {
        skip(resolve(&datadir, p))?;
    }

    Ok(DataLayout {
        volume_root: root.clone(),
        datadir: relative(&root, &datadir)?,
        paths,
        exclude,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(datadir: &str) -> DataVars {
        DataVars {
            datadir: datadir.into(),
            innodb_data_home_dir: "".into(),
            innodb_data_file_path: "ibdata1:12M:autoextend".into(),
            innodb_log_group_home_dir: "./".into(),
            innodb_undo_directory: "./".into(),
            innodb_temp_data_file_path: "ibtmp1:12M:autoextend".into(),
            log_bin: true,
            log_bin_basename: Some(format!("{datadir}binlog")),
            relay_log_basename: Some(format!("{datadir}db1-relay-bin")),
            pid_file: Some(format!("{datadir}db1.pid")),
            socket: Some("/run/mysqld/mysqld.sock".into()),
        }
    }

    #[test]
    fn everything_in_the_datadir() {
        let l = plan_layout(&vars("/mnt/mysql/"), Path::new("/mnt")).unwrap();
        assert_eq!(l.datadir, "mysql");
        assert_eq!(l.paths, ["mysql"]);
        assert_eq!(l.exclude, ["mysql/ibtmp1", "mysql/db1.pid"]);
    }

    #[test]
    fn extra_directories_on_the_volume_are_archived() {
        let mut v = vars("/mnt/mysql/");
        v.innodb_log_group_home_dir = "/mnt/redo".into();
        v.log_bin_basename = Some("/mnt/binlogs/mysql-bin".into());
        v.innodb_data_home_dir = "/mnt/ibdata".into();
        let l = plan_layout(&v, Path::new("/mnt")).unwrap();
        assert_eq!(l.paths, ["mysql", "ibdata", "redo", "binlogs"]);
    }

    #[test]
    fn a_data_path_off_the_volume_is_refused_naming_the_variable() {
        let mut v = vars("/mnt/mysql/");
        v.innodb_log_group_home_dir = "/var/lib/redo".into();
        let err = plan_layout(&v, Path::new("/mnt")).unwrap_err();
        assert!(
            err.to_string()
                .contains("innodb_log_group_home_dir is in /var/lib/redo"),
            "{err}"
        );
        assert_eq!(common::cli::exit_code_of(&err), common::ExitCode::Usage);
        let err = plan_layout(&vars("/var/lib/mysql/"), Path::new("/mnt")).unwrap_err();
        assert!(
            err.to_string().contains("datadir is in /var/lib/mysql"),
            "{err}"
        );
    }

    #[test]
    fn datadir_at_the_volume_root() {
        let l = plan_layout(&vars("/mnt/"), Path::new("/mnt")).unwrap();
        assert_eq!(l.datadir, "");
        assert_eq!(l.paths, [""]);
        assert_eq!(l.exclude, ["ibtmp1", "db1.pid"]);
    }
}
