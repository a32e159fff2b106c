//! Reading what the store holds about a backup: its manifest (MAC checked
//! with `[auth]`, parsed, under its own key, not from the future) and its
//! index (size and SHA-256 bound by the manifest, then parsed and checked
//! whole). The one reader of both for the restorer (list, verify, restore,
//! prune) and the archiver (an incremental backup's base).

use std::io::Read;
use std::time::Duration;

use crate::archive::index::{Index, MAX_INDEX_STORED};
use crate::archive::ArchiveError;
use crate::crypt::AuthKey;
use crate::keys;
use crate::manifest::{
    ArchiveInfo, BackupId, BackupName, IndexInfo, Manifest, ManifestError, MAX_MANIFEST_BYTES,
};
use crate::store::Store;

/// How far in the future a backup id may lie (clock skew between hosts);
/// a later one is refused, so a forged id cannot stay `latest` forever.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(24 * 3600);

/// Reads and parses the manifest of backup `id`: at most
/// `MAX_MANIFEST_BYTES`, authenticated by its MAC object when `auth` is
/// given (before it is parsed), every field in its grammar, stored under
/// its own key, and not from the future.
pub async fn read_manifest(
    store: &dyn Store,
    name: &BackupName,
    id: &BackupId,
    auth: Option<&AuthKey>,
) -> anyhow::Result<Manifest> {
    let key = keys::manifest(name, id);
    let url = store.url(&key);
    let bad = |why: String| -> anyhow::Error {
        ManifestError {
            origin: url.clone(),
            why,
        }
        .into()
    };
    match store.size(&key).await? {
        None => anyhow::bail!(
            "backup {id} of {name:?} does not exist or is incomplete (no {url}): see restorer list"
        ),
        Some(n) if n > MAX_MANIFEST_BYTES => {
            return Err(bad(format!(
                "is {n} bytes, larger than any manifest ({MAX_MANIFEST_BYTES})"
            )))
        }
        Some(_) => {}
    }
    let bytes = store.get(&key, MAX_MANIFEST_BYTES).await?;
    if let Some(auth) = auth {
        let mac_key = keys::manifest_mac(name, id);
        let mac = match store.size(&mac_key).await? {
            None => {
                return Err(bad(format!(
                    "has no MAC ({} is missing) and auth.key_file {} is set: an unauthenticated backup (forged, or taken before [auth] was configured) is refused",
                    store.url(&mac_key),
                    auth.path().display()
                )))
            }
            Some(n) if n > crate::crypt::MAX_MAC_BYTES => {
                return Err(bad(format!(
                    "has a MAC object of {n} bytes, larger than any MAC: forged"
                )))
            }
            Some(_) => store.get(&mac_key, crate::crypt::MAX_MAC_BYTES).await?,
        };
        auth.verify(&key, &bytes, &mac).map_err(bad)?;
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("is not UTF-8 text".into()))?;
    let m = Manifest::parse_stored(text, &key, &url)?;
    let skew = time::Duration::try_from(MAX_CLOCK_SKEW).expect("a day fits");
    if m.backup_id.time() > time::OffsetDateTime::now_utc() + skew {
        return Err(bad(format!(
            "names a time more than a day in the future ({}): a wrong clock or a forgery",
            m.backup_id
        )));
    }
    Ok(m)
}

/// Reads the index `ix` of backup `m`'s archive `info`: its size and
/// SHA-256 the manifest's, decrypted with `identities` when the archive
/// is encrypted, then parsed and checked whole against the manifest
/// ([`Index::parse`]).
pub async fn read_index(
    store: &dyn Store,
    m: &Manifest,
    info: &ArchiveInfo,
    ix: &IndexInfo,
    identities: Option<&crate::crypt::Identities>,
) -> anyhow::Result<Index> {
    let index_url = store.url(&ix.key);
    match store.size(&ix.key).await? {
        None => return Err(ArchiveError::Missing { url: index_url }.into()),
        Some(n) if n != ix.size || n > MAX_INDEX_STORED => {
            return Err(ArchiveError::SizeMismatch {
                url: index_url,
                got: n,
                want: ix.size,
            }
            .into())
        }
        Some(_) => {}
    }
    let stored = store.get(&ix.key, MAX_INDEX_STORED).await?;
    let sha = crate::codec::sha256_hex(&stored);
    if sha != ix.sha256.as_str() {
        return Err(ArchiveError::ChecksumMismatch {
            url: index_url,
            got: sha,
            want: ix.sha256.to_string(),
        }
        .into());
    }
    let stored = match &info.encryption {
        None => stored.to_vec(),
        Some(enc) => {
            let bad = |why: String| ArchiveError::Corrupt {
                url: index_url.clone(),
                why: format!("its index: {why}"),
            };
            let mut plain = Vec::new();
            crate::crypt::open(&stored[..], Some(enc), identities)
                .map_err(|why| ArchiveError::Key {
                    url: index_url.clone(),
                    why,
                })?
                .take(MAX_INDEX_STORED + 1)
                .read_to_end(&mut plain)
                .map_err(|e| bad(e.to_string()))?;
            plain
        }
    };
    Ok(Index::parse(&stored, &index_url, info, &m.data.paths)?)
}
