//! Uploads begun and not finished, recorded in the state directory
//! (`<state_dir>/uploads/<hash>.toml`: the store URL of the key, the key and
//! the upload id) before the first part is sent and removed after the upload
//! completed or was aborted. A run killed mid-upload (`kill -9`, an endpoint
//! that went away before the abort) leaves its record; the next archiver run
//! aborts every recorded upload ([`abort_leftovers`]) before it uploads,
//! also one whose record was whole but not yet renamed into place.

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
    /// and skipped. A record still being written (its temporary file) is
    /// not one yet.
    pub fn records(&self) -> anyhow::Result<Vec<(Recorded, UploadRecord)>> {
        let mut out = Vec::new();
        for (path, parsed) in self.scan(false)? {
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

    /// The records of runs that ended, for [`abort_leftovers`]: every record,
    /// and also the temporary file of a record whose writer was killed
    /// before the rename, when it parses (it is whole: the upload it names
    /// may have begun). A temporary file that does not parse is removed:
    /// the run was killed while writing it, before any part was sent, and
    /// what it names cannot be read (a bucket lifecycle rule ends such an
    /// upload). Only under the state lock, so no run is writing a record
    /// meanwhile.
    pub fn leftovers(&self) -> anyhow::Result<Vec<(Recorded, UploadRecord)>> {
        let mut out = Vec::new();
        for (path, parsed) in self.scan(true)? {
            let temp = is_temp(&path);
            match parsed {
                Ok(rec) => out.push((Recorded(path), rec)),
                Err(e) if temp => {
                    tracing::warn!(
                        "removing {}, an upload record cut short by a killed run ({e:#}): no part was sent; the upload it was for cannot be named (a bucket lifecycle rule AbortIncompleteMultipartUpload ends it)",
                        path.display()
                    );
                    Recorded(path).remove();
                }
                Err(e) => tracing::warn!(
                    "upload record {} is unreadable ({e:#}); remove it by hand",
                    path.display()
                ),
            }
        }
        Ok(out)
    }

    /// Every record file (with `temps`, also the temporary files
    /// [`crate::state::write_atomic`] writes them through), parsed.
    fn scan(&self, temps: bool) -> anyhow::Result<Vec<(PathBuf, anyhow::Result<UploadRecord>)>> {
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
            let record = path.extension().is_some_and(|e| e == "toml") && !is_temp(&path);
            if !(record || temps && is_temp(&path)) {
                continue;
            }
            let parsed = std::fs::read_to_string(&path)
                .map_err(anyhow::Error::from)
                .and_then(|t| Ok(toml::from_str::<UploadRecord>(&t)?));
            out.push((path, parsed));
        }
        Ok(out)
    }
}

/// Whether `path` is the temporary file of a record: `.<hash>.toml.tmp-<pid>`
/// ([`crate::state::write_atomic`]'s name).
fn is_temp(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix('.'))
        .and_then(|n| n.split_once(".toml.tmp-"))
        .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Aborts every upload recorded in `log` for `store` and removes its record
/// (an upload the store no longer knows counts as aborted), also one whose
/// record a killed run left half-written ([`UploadLog::leftovers`]). A
/// record of another store, or an abort that fails, is kept and reported:
/// the next run tries again. Returns how many uploads were aborted. Call it
/// under the state lock only (no run of this config is uploading).
pub async fn abort_leftovers(store: &dyn Store, log: &UploadLog) -> anyhow::Result<usize> {
    let mut aborted = 0;
    for (file, rec) in log.leftovers()? {
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

    /// A killed archiver's record as it left it: written, but still under
    /// its temporary name (`cut`: only its first half written).
    fn left_in_temp(log: &UploadLog, rec: &UploadRecord, cut: bool) -> PathBuf {
        let written = log.record(rec).unwrap().0;
        let name = written.file_name().unwrap().to_string_lossy().into_owned();
        let temp = written.with_file_name(format!(".{name}.tmp-4321"));
        std::fs::rename(&written, &temp).unwrap();
        if cut {
            let text = std::fs::read(&temp).unwrap();
            std::fs::write(&temp, &text[..text.len() / 2]).unwrap();
        }
        temp
    }

    #[tokio::test]
    async fn a_whole_temporary_record_is_aborted_and_a_cut_one_removed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let transfer = crate::store::Transfer {
            part_size: 5 << 20,
            concurrency: 1,
            memory_limit: 16 << 20,
            upload_rate: None,
        };
        let store = crate::store::FileStore::new(root.clone(), transfer);
        let log = UploadLog::in_state_dir(&dir.path().join("state"));
        // A file store's upload is its `.partial-<pid>` file; the upload id is the pid.
        let upload = |id: &str, pid: &str| {
            let key = format!("db1/{id}/data.tar.zst");
            let partial = root.join(format!("db1/{id}/.data.tar.zst.partial-{pid}"));
            std::fs::create_dir_all(partial.parent().unwrap()).unwrap();
            std::fs::write(&partial, b"part").unwrap();
            let rec = UploadRecord {
                url: store.url(&key),
                key,
                upload_id: pid.into(),
            };
            (rec, partial)
        };
        let (recorded, recorded_part) = upload("20261101T000000Z", "1001");
        log.record(&recorded).unwrap();
        let (whole, whole_part) = upload("20261102T000000Z", "1002");
        let whole_temp = left_in_temp(&log, &whole, false);
        let (cut, cut_part) = upload("20261103T000000Z", "1003");
        let cut_temp = left_in_temp(&log, &cut, true);
        let unreadable = log.dir().join("0123.toml");
        std::fs::write(&unreadable, "not a record").unwrap();
        let other = log.dir().join(".notes.tmp-12");
        std::fs::write(&other, "not ours").unwrap();

        // A reader without the state lock sees only the renamed record.
        let seen: Vec<UploadRecord> = log.records().unwrap().into_iter().map(|r| r.1).collect();
        assert_eq!(seen, std::slice::from_ref(&recorded));
        assert!(whole_temp.exists() && cut_temp.exists());

        assert_eq!(abort_leftovers(&store, &log).await.unwrap(), 2);
        assert!(
            !recorded_part.exists() && !whole_part.exists(),
            "both aborted"
        );
        assert!(
            !whole_temp.exists(),
            "the whole temporary record is removed"
        );
        assert!(!cut_temp.exists(), "the cut one too");
        assert!(
            cut_part.exists(),
            "what a cut record named is not guessed at"
        );
        assert!(
            unreadable.exists() && other.exists(),
            "the rest is left alone"
        );
        assert!(log.leftovers().unwrap().is_empty());
    }
}
