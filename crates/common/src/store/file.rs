//! A store in a local or NFS directory: objects are files under the root,
//! written to a temporary name (`.<name>.partial-<pid>`), fsynced and renamed
//! into place, or linked when they must not replace an object (`link`
//! refuses an existing name). Objects are mode 0600 and the directories
//! created for them 0700, whatever the umask.

use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::Context;
use async_trait::async_trait;
use bytes::Bytes;

use super::{Chunk, PendingUpload, Store, StoreError, Transfer, Upload, UploadRecord};

pub struct FileStore {
    root: PathBuf,
    transfer: Transfer,
}

impl FileStore {
    pub fn new(root: PathBuf, transfer: Transfer) -> FileStore {
        FileStore { root, transfer }
    }

    /// The file of `key`: keys are relative paths of normal components
    /// only, so no key names a file outside the root.
    fn path(&self, key: &str) -> anyhow::Result<PathBuf> {
        let normal = !key.is_empty()
            && Path::new(key)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        anyhow::ensure!(
            normal,
            "{key:?} is not a store key (a relative path without '.' or '..')"
        );
        Ok(self.root.join(key))
    }

    /// The temporary file of an upload of `path` by process `pid`.
    fn temp_path(path: &Path, pid: u32) -> PathBuf {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        path.with_file_name(format!(".{name}.partial-{pid}"))
    }
}

/// Moves the finished temporary file `tmp` to `path`: a rename, or with
/// `create_only` a link, which fails when `path` exists (then `tmp` is left
/// for the caller to remove).
fn publish(tmp: &Path, path: &Path, url: &str, create_only: bool) -> anyhow::Result<()> {
    if !create_only {
        return Ok(std::fs::rename(tmp, path)?);
    }
    match std::fs::hard_link(tmp, path) {
        Ok(()) => Ok(std::fs::remove_file(tmp)?),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(StoreError::Exists {
            op: "create".into(),
            url: url.to_string(),
            hint: "",
        }
        .into()),
        Err(e) => Err(e.into()),
    }
}

/// Opens an object for reading: a regular file, not through a link as its
/// last component, never blocking on a fifo someone put in the store.
fn open_object(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(f)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("store task panicked")?
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[async_trait]
impl Store for FileStore {
    fn url(&self, key: &str) -> String {
        format!("file://{}", self.root.join(key).display())
    }

    async fn check(&self) -> anyhow::Result<()> {
        let root = self.root.clone();
        blocking(move || {
            let md = std::fs::metadata(&root).with_context(|| {
                format!(
                    "store directory {} does not exist: create it or fix store.url",
                    root.display()
                )
            })?;
            anyhow::ensure!(
                md.is_dir(),
                "store path {} is not a directory (store.url)",
                root.display()
            );
            let probe = root.join(format!(".mysnap-probe-{}", std::process::id()));
            crate::state::create_private_file(&probe)
                .with_context(|| format!("store directory {} is not writable", root.display()))?;
            let _ = std::fs::remove_file(probe);
            Ok(())
        })
        .await
    }

    async fn put(&self, key: &str, body: Bytes) -> anyhow::Result<()> {
        let path = self.path(key)?;
        blocking(move || {
            let dir = path.parent().context("key has no parent")?;
            crate::state::create_private_dir(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            crate::state::write_atomic(&path, &body)
        })
        .await
    }

    async fn put_new(&self, key: &str, body: Bytes) -> anyhow::Result<()> {
        let path = self.path(key)?;
        let url = self.url(key);
        blocking(move || {
            let dir = path.parent().context("key has no parent")?;
            crate::state::create_private_dir(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let tmp = Self::temp_path(&path, std::process::id());
            let written = (|| -> anyhow::Result<()> {
                let mut f = crate::state::create_private_file(&tmp)?;
                f.write_all(&body)?;
                f.sync_all()?;
                publish(&tmp, &path, &url, true)?;
                Ok(sync_dir(dir)?)
            })();
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            written.with_context(|| format!("cannot write {url}"))
        })
        .await
    }

    /// `upload_id` is the process id in the temporary file's name.
    async fn abort_upload(&self, key: &str, upload_id: &str) -> anyhow::Result<()> {
        let pid: u32 = upload_id
            .parse()
            .with_context(|| format!("{upload_id:?} is not an upload of the file store"))?;
        let tmp = Self::temp_path(&self.path(key)?, pid);
        match tokio::fs::remove_file(&tmp).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove {}", tmp.display()))
            }
            _ => Ok(()),
        }
    }

    fn transfer(&self) -> Transfer {
        self.transfer
    }

    /// Parts are written in order, one at a time: a local disk gains
    /// nothing from parallel writes of one file.
    async fn put_stream(&self, key: &str, upload: Upload) -> anyhow::Result<u64> {
        let mut parts = upload.parts;
        let path = self.path(key)?;
        let pid = std::process::id();
        let tmp = Self::temp_path(&path, pid);
        let url = self.url(key);
        let record = match &upload.log {
            None => None,
            Some(log) => Some(log.record(&UploadRecord {
                url: url.clone(),
                key: key.to_string(),
                upload_id: pid.to_string(),
            })?),
        };
        let create_only = upload.create_only;
        let (tmp2, path2, url2) = (tmp.clone(), path.clone(), url.clone());
        let result = blocking(move || {
            let dir = path2.parent().context("key has no parent")?;
            crate::state::create_private_dir(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let mut f = std::io::BufWriter::with_capacity(
                1 << 20,
                crate::state::create_private_file(&tmp2)
                    .with_context(|| format!("cannot create {}", tmp2.display()))?,
            );
            let mut total = 0u64;
            loop {
                match parts.blocking_recv() {
                    Some(Chunk::Data(b)) => {
                        f.write_all(&b)
                            .with_context(|| format!("cannot write {}", tmp2.display()))?;
                        total += b.len() as u64;
                    }
                    Some(Chunk::End) => break,
                    None => {
                        anyhow::bail!("the archive stream ended before its end; upload abandoned")
                    }
                }
            }
            let f = f.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            publish(&tmp2, &path2, &url2, create_only)?;
            sync_dir(dir)?;
            Ok(total)
        })
        .await;
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        if let Some(r) = record {
            r.remove();
        }
        result.with_context(|| format!("upload to {url} failed"))
    }

    async fn size(&self, key: &str) -> anyhow::Result<Option<u64>> {
        match tokio::fs::metadata(self.path(key)?).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot stat {}", self.url(key))),
        }
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> anyhow::Result<Bytes> {
        let path = self.path(key)?;
        let url = self.url(key);
        blocking(move || {
            let mut f = open_object(&path)?;
            f.seek(SeekFrom::Start(range.start))?;
            let mut buf = Vec::with_capacity((range.end - range.start) as usize);
            f.take(range.end - range.start).read_to_end(&mut buf)?;
            Ok(Bytes::from(buf))
        })
        .await
        .with_context(|| format!("cannot read {url}"))
    }

    async fn get(&self, key: &str, limit: u64) -> anyhow::Result<Bytes> {
        let path = self.path(key)?;
        let url = self.url(key);
        blocking(move || {
            let f = open_object(&path).with_context(|| format!("cannot read {url}"))?;
            let mut buf = Vec::new();
            f.take(limit + 1)
                .read_to_end(&mut buf)
                .with_context(|| format!("cannot read {url}"))?;
            if buf.len() as u64 > limit {
                return Err(super::StoreError::TooLarge { url, limit }.into());
            }
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn list(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        blocking(move || {
            // Walk the deepest directory the prefix names, then filter.
            let dir_part = prefix.rsplit_once('/').map_or("", |(d, _)| d);
            let start = root.join(dir_part);
            let mut keys = Vec::new();
            if !start.exists() {
                return Ok(keys);
            }
            for entry in walkdir::WalkDir::new(&start) {
                let entry = entry.with_context(|| format!("cannot list {}", start.display()))?;
                if !entry.file_type().is_file()
                    || entry.file_name().to_string_lossy().starts_with('.')
                {
                    continue;
                }
                let key = entry
                    .path()
                    .strip_prefix(&root)?
                    .to_string_lossy()
                    .into_owned();
                if key.starts_with(&prefix) {
                    keys.push(key);
                }
            }
            keys.sort();
            Ok(keys)
        })
        .await
    }

    /// The temporary files `.<name>.partial-<pid>` under `prefix`: the
    /// writes of a process that was killed (or is still running).
    async fn list_uploads(&self, prefix: &str) -> anyhow::Result<Option<Vec<PendingUpload>>> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        blocking(move || {
            let dir_part = prefix.rsplit_once('/').map_or("", |(d, _)| d);
            let start = root.join(dir_part);
            let mut out = Vec::new();
            if !start.exists() {
                return Ok(Some(out));
            }
            for entry in walkdir::WalkDir::new(&start) {
                let entry = entry.with_context(|| format!("cannot list {}", start.display()))?;
                if !entry.file_type().is_file() {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some((object, pid)) = name
                    .strip_prefix('.')
                    .and_then(|n| n.rsplit_once(".partial-"))
                    .filter(|(o, p)| !o.is_empty() && p.parse::<u32>().is_ok())
                else {
                    continue;
                };
                let dir = entry.path().parent().unwrap_or(&root).strip_prefix(&root)?;
                let key = dir.join(object).to_string_lossy().into_owned();
                if !key.starts_with(&prefix) {
                    continue;
                }
                let initiated = entry
                    .metadata()
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .map(time::OffsetDateTime::from);
                out.push(PendingUpload {
                    key,
                    upload_id: pid.to_string(),
                    initiated,
                });
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(Some(out))
        })
        .await
    }

    async fn delete(&self, key: &str) -> anyhow::Result<()> {
        match tokio::fs::remove_file(self.path(key)?).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot delete {}", self.url(key))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// The one test that changes the umask (process-wide, and tests run in
    /// threads): it covers the file store and the state directory.
    #[test]
    fn files_are_0600_and_dirs_0700_under_umask_022() {
        use nix::sys::stat::{umask, Mode};
        let old = umask(Mode::from_bits_truncate(0o022));
        let dir = tempfile::tempdir().unwrap();

        let root = dir.path().join("store");
        std::fs::create_dir(&root).unwrap();
        let transfer = Transfer {
            part_size: 5 << 20,
            concurrency: 1,
            memory_limit: 16 << 20,
            upload_rate: None,
        };
        let store = FileStore::new(root.clone(), transfer);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            store.check().await.unwrap();
            store
                .put(
                    "db1/20250101T000000Z/manifest.toml",
                    Bytes::from_static(b"m"),
                )
                .await
                .unwrap();
            let (tx, parts) = tokio::sync::mpsc::channel(4);
            tx.send(Chunk::Data(Bytes::from_static(b"data")))
                .await
                .unwrap();
            tx.send(Chunk::End).await.unwrap();
            let upload = Upload {
                parts,
                part_size: 5 << 20,
                in_flight: 1,
                log: None,
                create_only: false,
            };
            let n = store
                .put_stream("db2/x/data.tar.zst", upload)
                .await
                .unwrap();
            assert_eq!(n, 4);
        });
        for d in ["db1", "db1/20250101T000000Z", "db2", "db2/x"] {
            assert_eq!(mode(&root.join(d)), 0o700, "{d}");
        }
        for f in ["db1/20250101T000000Z/manifest.toml", "db2/x/data.tar.zst"] {
            assert_eq!(mode(&root.join(f)), 0o600, "{f}");
        }

        let state = dir.path().join("state/sub");
        let lock = crate::state::StateLock::acquire(&state).unwrap();
        assert_eq!(mode(&dir.path().join("state")), 0o700);
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join("lock")), 0o600);
        let backup = lock.backup_dir("20250101T000000Z");
        crate::state::create_private_dir(&backup).unwrap();
        assert_eq!(mode(&backup), 0o700);
        let m = backup.join("manifest.toml");
        // A temporary file left by an earlier process with a wider mode is replaced.
        let stale = backup.join(format!(".manifest.toml.tmp-{}", std::process::id()));
        std::fs::write(&stale, b"old").unwrap();
        std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o644)).unwrap();
        crate::state::write_atomic(&m, b"x").unwrap();
        assert_eq!(mode(&m), 0o600);
        assert!(!stale.exists());

        umask(old);
    }
}
