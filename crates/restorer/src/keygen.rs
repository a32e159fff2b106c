//! `restorer keygen`: new key files for `[encryption]` and `[auth]`,
//! written create-only with mode 0600 (and fsynced), never printed; the
//! identity's public key (for `encryption.recipients_file`) is returned.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;

/// Writes `text` to a new file `path` (0600, refused if it exists).
fn write_new(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            common::error::config_err(format!(
                "cannot create {}: {e} (keygen never replaces a key file: choose a new path)",
                path.display()
            ))
        })?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    common::state::sync_dir(dir.unwrap_or(Path::new(".")))?;
    Ok(())
}

/// A new age identity in `path`; returns the line to print: its public
/// key and fingerprint.
pub fn identity(path: &Path) -> anyhow::Result<String> {
    let (secret, public, fp) = common::crypt::generate_identity();
    write_new(path, &secret)?;
    Ok(format!("{public} (fingerprint {})", &fp[..16]))
}

/// A new HMAC key for `auth.key_file` in `path`.
pub fn auth_key(path: &Path) -> anyhow::Result<()> {
    write_new(path, &common::crypt::generate_auth_key())
}
