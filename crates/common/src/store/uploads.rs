//! Uploads begun and not finished, recorded in the state directory
//! (`<state_dir>/uploads/<hash>.toml`: the store URL of the key, the key and
//! the upload id) before the first part is sent and removed after the upload
//! completed or was aborted. A run killed mid-upload (`kill -9`, an endpoint
//! that went away before the abort) leaves its record; the next archiver run
//! aborts every recorded upload ([`abort_leftovers`]) before it uploads.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::Store;

/// One upload in progress: enough to abort it from another process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadRecord {
    /// The object's full address (`s3://bucket/prefix/key`): a record of
    /// another store is not this store's to abort.
    pub url: String,
    /// The key relative to the store's prefix.
    pub key: String,
    /// The S3 upload id, or the file store's temporary file suffix.
    pub upload_id: String,
}

/// The directory of upload records of one config.
#[derive(Debug, Clone)]
pub struct UploadLog {
    dir: PathBuf,
}

/// A written record; [`Recorded::remove`] once the upload is finished.
#[derive(Debug)]
pub struct Recorded(PathBuf);

impl Recorded {
    pub fn remove(self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove upload record {}: {e}", self.0.display());
            }
        }
    }
}

impl UploadLog {
    /// The records under `<state_dir>/uploads`.
    pub fn in_state_dir(state_dir: &Path) -> UploadLog {
        UploadLog {
            dir: state_dir.join("uploads"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `rec` atomically (mode 0600); its file name is a hash, so no
    /// upload id chooses a path.
    pub fn record(&self, rec: &UploadRecord) -> anyhow::Result<Recorded> {
        crate::state::create_private_dir(&self.dir)
            .with_context(|| format!("cannot create {} (backup.state_dir)", self.dir.display()))?;
        let hash = Sha256::digest(format!("{}\n{}", rec.url, rec.upload_id));
        let path = self.dir.join(format!("{}.toml", hex::encode(&hash[..16])));
        let text = toml::to_string(rec).context("upload record")?;
        crate::state::write_atomic(&path, text.as_bytes())?;
        Ok(Recorded(path))
    }

    /// Every record, with its file; a file that does not parse is reported
    /// and skipped.
    pub fn records(&self) -> anyhow::Result<Vec<(Recorded, UploadRecord)>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", self.dir.display())),
        };
        let mut out = Vec::new();
        for entry in entries {
            let path = entry
                .with_context(|| format!("cannot list {}", self.dir.display()))?
                .path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let parsed = std::fs::read_to_string(&path)
                .map_err(anyhow::Error::from)
                .and_then(|t| Ok(toml::from_str::<UploadRecord>(&t)?));
            match parsed {
                Ok(rec) => out.push((Recorded(path), rec)),
                Err(e) => tracing::warn!(
                    "upload record {} is unreadable ({e:#}); remove it by hand",
                    path.display()
                ),
            }
        }
        Ok(out)
    }
}

/// Aborts every upload recorded in `log` for `store` and removes its record
/// (an upload the store no longer knows counts as aborted). A record of
/// another store, or an abort that fails, is kept and reported: the next run
/// tries again. Returns how many uploads were aborted.
pub async fn abort_leftovers(store: &dyn Store, log: &UploadLog) -> anyhow::Result<usize> {
    let mut aborted = 0;
    for (file, rec) in log.records()? {
        if store.url(&rec.key) != rec.url {
            tracing::warn!(
                "upload record {} is for {}, not this config's store: abort it there, then remove the record",
                file.0.display(),
                rec.url
            );
            continue;
        }
        match store.abort_upload(&rec.key, &rec.upload_id).await {
            Ok(()) => {
                tracing::warn!(
                    "aborted the upload of {} left by an earlier run (upload id {})",
                    rec.url,
                    rec.upload_id
                );
                file.remove();
                aborted += 1;
            }
            Err(e) => tracing::warn!(
                "cannot abort the upload of {} left by an earlier run ({e:#}); the next run tries again (record {})",
                rec.url,
                file.0.display()
            ),
        }
    }
    Ok(aborted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let log = UploadLog::in_state_dir(dir.path());
        assert!(log.records().unwrap().is_empty());
        let rec = UploadRecord {
            url: "s3://b/p/db1/x/data.tar.zst".into(),
            key: "db1/x/data.tar.zst".into(),
            upload_id: "../../etc/passwd".into(),
        };
        let written = log.record(&rec).unwrap();
        let name = written
            .0
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert_eq!(name.len(), 32 + ".toml".len(), "{name}");
        let all = log.records().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1, rec);
        written.remove();
        assert!(log.records().unwrap().is_empty());
    }
}
