//! The write path: the tar stream of a snapshot, the recorded directories as
//! paths relative to the volume root, keeping mode, owner ids and mtimes;
//! excluded files (pid file, socket, ibtmp1) and special files left out.
//! Every entry passes the same [`Policy`] restore applies, so a backup that
//! restore would refuse (a link to outside the archived directories, a name
//! that is not UTF-8) fails here, when it is taken, not at 3 a.m.

use std::fs::File;
use std::io::{self, BufReader, Write};
use std::path::Path;

use anyhow::Context;

use super::policy::{Kind, Policy};
use crate::codec::Counting;
use crate::manifest::DataLayout;
use crate::progress::Progress;
use crate::reader::{ProgressReader, RateLimit};
use tar::{Builder, EntryType, Header, HeaderMode};
use walkdir::WalkDir;

/// What the tar stream held, and (filled in by the caller) what was stored.
#[derive(Debug, Clone, Default)]
pub struct TarStats {
    pub files: u64,
    pub content_bytes: u64,
    pub tar_size: u64,
    pub stored_size: u64,
    pub sha256: String,
}

fn entries<'a>(
    snap: &'a Path,
    layout: &'a DataLayout,
) -> impl Iterator<Item = anyhow::Result<(String, walkdir::DirEntry)>> + 'a {
    layout.paths.iter().flat_map(move |rel| {
        WalkDir::new(snap.join(rel))
            .follow_links(false)
            .sort_by_file_name()
            .into_iter()
            .filter_map(move |e| {
                let e = match e {
                    Ok(e) => e,
                    Err(err) => {
                        return Some(Err(anyhow::Error::new(err)
                            .context(format!("cannot read snapshot {}", snap.display()))))
                    }
                };
                let rel = e.path().strip_prefix(snap).ok()?;
                let Some(name) = rel.to_str().map(str::to_string) else {
                    return Some(Err(anyhow::anyhow!(
                        "{} has a name that is not UTF-8, which mysnap archives cannot hold: rename it",
                        e.path().display()
                    )));
                };
                if name.is_empty() || layout.exclude.iter().any(|x| *x == name) {
                    return None;
                }
                Some(Ok((name, e)))
            })
    })
}

/// Bytes the tar stream will be about (file contents plus headers): sizes the
/// upload's parts and the progress bar.
pub fn estimate(snap: &Path, layout: &DataLayout) -> anyhow::Result<u64> {
    let mut total = 1024;
    for e in entries(snap, layout) {
        let (_, e) = e?;
        let len = e
            .metadata()
            .map(|m| if m.is_file() { m.len() } else { 0 })
            .unwrap_or(0);
        total += 512 + len.div_ceil(512) * 512;
    }
    Ok(total)
}

fn refused(path: &Path, why: String) -> anyhow::Error {
    anyhow::anyhow!(
        "{} cannot be archived: restore would refuse it ({why}); move what it points to into the data directory, or remove it",
        path.display()
    )
}

/// Writes the tar stream of the snapshot into `out`; returns `out` and the stats.
pub fn write_tar<W: Write>(
    snap: &Path,
    layout: &DataLayout,
    out: W,
    progress: &dyn Progress,
    cancelled: &(dyn Fn() -> bool + Sync),
    read_limit: Option<&RateLimit>,
) -> anyhow::Result<(W, TarStats)> {
    write_tar_with(
        snap,
        layout,
        out,
        progress,
        cancelled,
        read_limit,
        &mut |_, _| true,
    )
}

/// Asked about each directory and regular file, in the order of the walk
/// (the tar stream's, links last), with its path and metadata before it is
/// written: `false` leaves a file out of the stream (an incremental
/// backup's unchanged file); directories are always written.
pub type Keep<'a> = &'a mut dyn FnMut(&str, &std::fs::Metadata) -> bool;

/// [`write_tar`], asking `keep` about each entry first.
pub fn write_tar_with<W: Write>(
    snap: &Path,
    layout: &DataLayout,
    out: W,
    progress: &dyn Progress,
    cancelled: &(dyn Fn() -> bool + Sync),
    read_limit: Option<&RateLimit>,
    keep: Keep<'_>,
) -> anyhow::Result<(W, TarStats)> {
    let mut tar = Builder::new(Counting::new(out));
    tar.mode(HeaderMode::Complete);
    tar.follow_symlinks(false);
    let mut stats = TarStats::default();
    let mut policy = Policy::new(&layout.paths);
    // Links go last, after every directory they may walk through.
    let mut links = Vec::new();
    for e in entries(snap, layout) {
        let (name, e) = e?;
        if cancelled() {
            anyhow::bail!("interrupted by a signal");
        }
        let path = e.path();
        let md = e
            .metadata()
            .with_context(|| format!("cannot stat {}", path.display()))?;
        let mut header = Header::new_gnu();
        header.set_metadata_in_mode(&md, HeaderMode::Complete);
        let ft = md.file_type();
        let result = if ft.is_dir() {
            policy
                .admit(&name, Kind::Dir, None)
                .map_err(|why| refused(path, why))?;
            keep(&name, &md);
            tar.append_data(&mut header, &name, io::empty())
        } else if ft.is_file() {
            policy
                .admit(&name, Kind::File, None)
                .map_err(|why| refused(path, why))?;
            if !keep(&name, &md) {
                continue;
            }
            let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            let reader = ProgressReader::new(BufReader::with_capacity(1 << 20, f), progress)
                .cancelled_by(cancelled)
                .limited_by(read_limit);
            stats.files += 1;
            stats.content_bytes += md.len();
            tar.append_data(&mut header, &name, reader)
        } else if ft.is_symlink() {
            links.push((name, path.to_path_buf(), header));
            continue;
        } else {
            tracing::warn!(
                "leaving out {} (not a file, directory or symlink)",
                path.display()
            );
            continue;
        };
        result.with_context(|| format!("cannot archive {}", path.display()))?;
    }
    for (name, path, mut header) in links {
        let target = std::fs::read_link(&path)
            .with_context(|| format!("cannot read link {}", path.display()))?;
        let text = target
            .to_str()
            .ok_or_else(|| refused(&path, "a link target that is not UTF-8".into()))?;
        policy
            .admit(&name, Kind::Symlink, Some(text))
            .map_err(|why| refused(&path, why))?;
        header.set_entry_type(EntryType::Symlink);
        header.set_size(0);
        tar.append_link(&mut header, &name, &target)
            .with_context(|| format!("cannot archive {}", path.display()))?;
    }
    let counting = tar.into_inner().context("cannot finish the tar stream")?;
    stats.tar_size = counting.bytes;
    Ok((counting.inner, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::tests::v;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn archives_relative_paths_with_modes_and_leaves_out_excluded_and_special_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("mysql/db1")).unwrap();
        std::fs::write(root.join("mysql/ibdata1"), vec![7u8; 70_000]).unwrap();
        std::fs::write(root.join("mysql/ibtmp1"), b"tmp").unwrap();
        std::fs::write(root.join("mysql/db1/t.ibd"), b"rows").unwrap();
        std::fs::set_permissions(
            root.join("mysql/db1/t.ibd"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        symlink("db1/t.ibd", root.join("mysql/link")).unwrap();
        nix::unistd::mkfifo(&root.join("mysql/fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::write(root.join("outside"), b"not archived").unwrap();
        let layout = DataLayout {
            volume_root: "/mnt".into(),
            datadir: v("mysql"),
            paths: vec![v("mysql")],
            exclude: vec![v("mysql/ibtmp1")],
        };
        let (bytes, stats) = write_tar(
            root,
            &layout,
            Vec::new(),
            &crate::progress::Silent,
            &|| false,
            None,
        )
        .unwrap();
        assert_eq!(stats.files, 2);
        assert_eq!(stats.content_bytes, 70_004);
        assert_eq!(stats.tar_size, bytes.len() as u64);
        assert!(estimate(root, &layout).unwrap() >= 70_004);
        let mut names = Vec::new();
        for e in tar::Archive::new(&bytes[..]).entries().unwrap() {
            let e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            if name == "mysql/db1/t.ibd" {
                assert_eq!(e.header().mode().unwrap() & 0o777, 0o640);
            }
            names.push(name);
        }
        assert_eq!(
            names,
            [
                "mysql",
                "mysql/db1",
                "mysql/db1/t.ibd",
                "mysql/ibdata1",
                "mysql/link"
            ]
        );
    }

    /// The tar stream of the directory `d` below `root`.
    fn tar_of_d(
        root: &Path,
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> anyhow::Result<(Vec<u8>, TarStats)> {
        let layout = DataLayout {
            volume_root: "/".into(),
            datadir: v("d"),
            paths: vec![v("d")],
            exclude: vec![],
        };
        write_tar(
            root,
            &layout,
            Vec::new(),
            &crate::progress::Silent,
            cancelled,
            None,
        )
    }

    #[test]
    fn cancellation_stops_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/f"), b"x").unwrap();
        let err = tar_of_d(dir.path(), &|| true).unwrap_err();
        assert!(err.to_string().contains("interrupted"), "{err}");
    }

    #[test]
    fn a_link_restore_would_refuse_fails_the_backup() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("d")).unwrap();
        symlink("/var/lib/elsewhere/t.MYD", dir.path().join("d/t.MYD")).unwrap();
        let err = tar_of_d(dir.path(), &|| false).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("d/t.MYD") && msg.contains("restore would refuse"),
            "{msg}"
        );
    }
}
