//! Client-side encryption of stored objects and authentication of manifests,
//! one home.
//!
//! - Encryption: an archive (or any streamed object) is an age v1 file
//!   (`age` crate: X25519 recipients, ChaCha20-Poly1305 in 64 KiB chunks,
//!   each authenticated, the last one marked) between the codec and the
//!   SHA-256: `tar → codec → [`Sealer`] → SHA-256 → store` and
//!   `store → SHA-256 → [`open`] → decode → unpack`. Backup hosts hold only
//!   public keys ([`Recipients`]); restore hosts the identity
//!   ([`Identities`]). The manifest records the recipients' fingerprints
//!   ([`fingerprint`]), never a key.
//! - Authentication: [`AuthKey`], an HMAC-SHA256 key neither the bucket nor
//!   its writers hold; the archiver stores the manifest's MAC
//!   (`keys::manifest_mac`) before the manifest, the restorer checks it
//!   before it uses the manifest.
//!
//! Key files are read once, refused when group or others may read them
//! (secrets) or write them (recipients), and never logged.

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Once;

use age::secrecy::ExposeSecret;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::config::Config;
use crate::error::config_err;
use crate::manifest::{Encryption, EncryptionScheme, Sha256Hex, MAX_RECIPIENTS};

/// An environment variable naming the identity file (restore hosts).
pub const IDENTITY_ENV: &str = "MYSNAP_IDENTITY_FILE";
/// The systemd credential (`LoadCredential=mysnap-identity:…`) read from
/// `$CREDENTIALS_DIRECTORY` when set.
pub const IDENTITY_CREDENTIAL: &str = "mysnap-identity";
/// The largest key file read.
const MAX_KEY_FILE: u64 = 64 << 10;
/// The largest MAC object read from the store.
pub const MAX_MAC_BYTES: u64 = 1024;
/// The smallest HMAC key, in bytes.
pub const MIN_AUTH_KEY_BYTES: usize = 32;

/// The fingerprint of a recipient as the manifest records it: the SHA-256
/// of its `age1…` string, in hex.
pub fn fingerprint(recipient: &age::x25519::Recipient) -> String {
    hex::encode(Sha256::digest(recipient.to_string().as_bytes()))
}

/// Reads a key file named by config key `key`: at most 64 KiB of UTF-8;
/// a `secret` one only when no group or other may read it, a public one
/// only when no group or other may write it.
fn read_key_file(path: &Path, key: &str, secret: bool) -> anyhow::Result<Zeroizing<String>> {
    let io_err = |e: io::Error| config_err(format!("{key} {}: {e}", path.display()));
    // The mode is checked on the file opened, not on the name.
    let file = std::fs::File::open(path).map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(config_err(format!(
            "{key} {} is not a regular file",
            path.display()
        )));
    }
    let mode = meta.permissions().mode() & 0o777;
    if secret && mode & 0o077 != 0 {
        return Err(config_err(format!(
            "{key} {} may be read by group or others (mode {mode:o}): run `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    if !secret && mode & 0o022 != 0 {
        return Err(config_err(format!(
            "{key} {} may be written by group or others (mode {mode:o}), who could add their own key: run `chmod 644 {}`",
            path.display(),
            path.display()
        )));
    }
    if meta.len() > MAX_KEY_FILE {
        return Err(config_err(format!(
            "{key} {} is {} bytes, larger than any key file ({MAX_KEY_FILE})",
            path.display(),
            meta.len()
        )));
    }
    let mut text = Zeroizing::new(String::new());
    file.take(MAX_KEY_FILE)
        .read_to_string(&mut text)
        .map_err(io_err)?;
    Ok(text)
}

/// The lines of a key file that hold keys: no blank lines, no `#` comments.
fn key_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

/// The age public keys new archives are encrypted to (backup hosts).
pub struct Recipients {
    keys: Vec<age::x25519::Recipient>,
}

impl Recipients {
    /// Reads `encryption.recipients_file`: `age1…` keys, one per line.
    pub fn load(path: &Path) -> anyhow::Result<Recipients> {
        const KEY: &str = "encryption.recipients_file";
        let text = read_key_file(path, KEY, false)?;
        let mut keys = Vec::new();
        for (n, line) in key_lines(&text) {
            let r = age::x25519::Recipient::from_str(line).map_err(|e| {
                config_err(format!(
                    "{KEY} {} line {n}: not an age X25519 public key (age1…): {e}",
                    path.display()
                ))
            })?;
            keys.push(r);
        }
        if keys.is_empty() || keys.len() > MAX_RECIPIENTS {
            return Err(config_err(format!(
                "{KEY} {} holds {} public keys: 1 to {MAX_RECIPIENTS} allowed (make one with `restorer keygen`)",
                path.display(),
                keys.len()
            )));
        }
        Ok(Recipients { keys })
    }

    /// `encryption.recipients_file` of `cfg`; `None`: archives are not encrypted.
    pub fn from_config(cfg: &Config) -> anyhow::Result<Option<Recipients>> {
        cfg.encryption
            .recipients_file
            .as_deref()
            .map(Recipients::load)
            .transpose()
    }

    /// What the manifest records: the scheme and each recipient's fingerprint.
    pub fn encryption(&self) -> Encryption {
        Encryption {
            scheme: EncryptionScheme::AgeX25519,
            recipients: self
                .keys
                .iter()
                .map(|r| Sha256Hex::parse(&fingerprint(r)).expect("a SHA-256 in hex"))
                .collect(),
        }
    }
}

/// The age identities that decrypt archives (restore hosts).
pub struct Identities {
    keys: Vec<age::x25519::Identity>,
    /// Where they were read (a path, or the variable that named it).
    source: String,
}

impl Identities {
    /// Reads an identity file (`AGE-SECRET-KEY-1…`, one per line, mode
    /// 0600); `key` names where its path came from in errors.
    pub fn load(path: &Path, key: &str) -> anyhow::Result<Identities> {
        let text = read_key_file(path, key, true)?;
        let mut keys = Vec::new();
        for (n, line) in key_lines(&text) {
            let id = age::x25519::Identity::from_str(line).map_err(|_| {
                config_err(format!(
                    "{key} {} line {n}: not an age X25519 identity (AGE-SECRET-KEY-1…)",
                    path.display()
                ))
            })?;
            keys.push(id);
        }
        if keys.is_empty() {
            return Err(config_err(format!(
                "{key} {} holds no identity (AGE-SECRET-KEY-1…)",
                path.display()
            )));
        }
        Ok(Identities {
            keys,
            source: format!("{key} {}", path.display()),
        })
    }

    /// The identities of this host: the file named by `MYSNAP_IDENTITY_FILE`,
    /// else systemd's credential `mysnap-identity`, else
    /// `encryption.identity_file`; `None` when there is none.
    pub fn from_config(cfg: &Config) -> anyhow::Result<Option<Identities>> {
        if let Some(p) = std::env::var_os(IDENTITY_ENV).filter(|p| !p.is_empty()) {
            return Identities::load(Path::new(&p), IDENTITY_ENV).map(Some);
        }
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let p = PathBuf::from(dir).join(IDENTITY_CREDENTIAL);
            if p.exists() {
                return Identities::load(&p, "the systemd credential").map(Some);
            }
        }
        cfg.encryption
            .identity_file
            .as_deref()
            .map(|p| Identities::load(p, "encryption.identity_file"))
            .transpose()
    }

    /// The fingerprints of these identities' recipients.
    pub fn fingerprints(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|i| fingerprint(&i.to_public()))
            .collect()
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether one of these identities is among the recipients `enc`
    /// records; the reason to refuse when not.
    pub fn check(&self, enc: &Encryption) -> Result<(), String> {
        let mine = self.fingerprints();
        if enc
            .recipients
            .iter()
            .any(|r| mine.iter().any(|m| m == r.as_str()))
        {
            return Ok(());
        }
        Err(format!(
            "it is encrypted to recipients {} and {} holds none of them ({}): use the identity of one of those recipients (an older one after a key rotation)",
            short(enc.recipients.iter().map(|r| r.as_str())),
            self.source,
            short(mine.iter().map(String::as_str)),
        ))
    }
}

/// Fingerprints shortened for messages (16 hex digits each).
fn short<'a>(fps: impl Iterator<Item = &'a str>) -> String {
    fps.map(|f| f.get(..16).unwrap_or(f))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The one write-side wrapper of a streamed object: plain, or an age file
/// to the recipients. Call [`Sealer::finish`] (the last chunk is marked; an
/// unfinished stream never decrypts).
pub enum Sealer<W: Write> {
    Plain(W),
    Age(age::stream::StreamWriter<W>),
}

impl<W: Write> Sealer<W> {
    pub fn new(inner: W, to: Option<&Recipients>) -> io::Result<Sealer<W>> {
        let Some(to) = to else {
            return Ok(Sealer::Plain(inner));
        };
        let enc = age::Encryptor::with_recipients(to.keys.iter().map(|r| r as &dyn age::Recipient))
            .map_err(io::Error::other)?;
        Ok(Sealer::Age(enc.wrap_output(inner)?))
    }

    pub fn finish(self) -> io::Result<W> {
        match self {
            Sealer::Plain(w) => Ok(w),
            Sealer::Age(w) => w.finish(),
        }
    }
}

impl<W: Write> Write for Sealer<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sealer::Plain(w) => w.write(buf),
            Sealer::Age(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sealer::Plain(w) => w.flush(),
            Sealer::Age(w) => w.flush(),
        }
    }
}

/// Whether an object with `encryption` can be opened with `identities`
/// (the recipients the manifest records); the reason when not. Checked
/// before anything is read, so a missing or wrong key changes nothing.
pub fn check_keys(
    encryption: Option<&Encryption>,
    identities: Option<&Identities>,
) -> Result<(), String> {
    match (encryption, identities) {
        (None, _) => Ok(()),
        (Some(enc), None) => Err(format!(
            "it is encrypted (age, to recipients {}) and no identity is configured: set encryption.identity_file, {IDENTITY_ENV} or the systemd credential {IDENTITY_CREDENTIAL} to the identity file of one of those recipients",
            short(enc.recipients.iter().map(|r| r.as_str()))
        )),
        (Some(enc), Some(ids)) => ids.check(enc),
    }
}

/// The one read-side wrapper: the stored bytes as the codec wrote them.
/// An encrypted object needs an identity among its recipients; every chunk
/// is authenticated before it is returned, so a changed byte or a cut
/// stream is a read error, never different data. `Err` is why it cannot
/// be opened (a missing or wrong key, a header that is not age's).
pub fn open<'a, R: Read + 'a>(
    stored: R,
    encryption: Option<&Encryption>,
    identities: Option<&Identities>,
) -> Result<Box<dyn Read + 'a>, String> {
    let (Some(enc), Some(ids)) = (encryption, identities) else {
        check_keys(encryption, identities)?;
        return Ok(Box::new(stored));
    };
    ids.check(enc)?;
    let d = age::Decryptor::new(stored).map_err(|e| match e {
        age::DecryptError::Io(e) => format!("cannot read its age header: {e}"),
        e => format!("its age header is invalid: {e}"),
    })?;
    let r = d
        .decrypt(ids.keys.iter().map(|i| i as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => format!(
                "none of the identities in {} decrypts it (its header names other recipients than its manifest: forged or damaged)",
                ids.source
            ),
            e => format!("it cannot be decrypted with {}: {e}", ids.source),
        })?;
    Ok(Box::new(Decrypting(r)))
}

/// Says what a failed chunk means.
struct Decrypting<R>(R);

impl<R: Read> Read for Decrypting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => io::Error::new(
                e.kind(),
                format!("decryption failed ({e}): the ciphertext was changed or cut short"),
            ),
            _ => e,
        })
    }
}

/// A new identity and its recipient (`restorer keygen`): the secret key
/// text to store in a 0600 file, the public `age1…` string and its fingerprint.
pub fn generate_identity() -> (Zeroizing<String>, String, String) {
    let id = age::x25519::Identity::generate();
    let public = id.to_public();
    let fp = fingerprint(&public);
    let text = Zeroizing::new(format!(
        "# created by mysnap: restore hosts only; keep a copy offline\n# public key: {public}\n# fingerprint: {fp}\n{}\n",
        id.to_string().expose_secret()
    ));
    (text, public.to_string(), fp)
}

/// A new HMAC key for `[auth] key_file`: 32 random bytes in hex.
pub fn generate_auth_key() -> Zeroizing<String> {
    use rand::{rngs::OsRng, RngCore};
    let mut key = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(key.as_mut());
    Zeroizing::new(format!("{}\n", hex::encode(key.as_ref())))
}

/// The manifests' HMAC-SHA256 key (`[auth] key_file`).
pub struct AuthKey {
    key: Zeroizing<Vec<u8>>,
    /// 16 hex digits of a hash of the key: tells "another key" from "changed".
    id: String,
    path: PathBuf,
}

const MAC_SCHEME: &str = "mysnap-hmac-sha256-v1";

impl AuthKey {
    /// Reads `auth.key_file`: one line of hex, at least 32 bytes, mode 0600.
    pub fn load(path: &Path) -> anyhow::Result<AuthKey> {
        const KEY: &str = "auth.key_file";
        let text = read_key_file(path, KEY, true)?;
        let bad = || {
            config_err(format!(
                "{KEY} {} must hold one line of at least {} hex digits (make one with `restorer keygen --auth-key {}`)",
                path.display(),
                MIN_AUTH_KEY_BYTES * 2,
                path.display()
            ))
        };
        let mut lines = key_lines(&text);
        let (Some((_, line)), None) = (lines.next(), lines.next()) else {
            return Err(bad());
        };
        let key = Zeroizing::new(hex::decode(line).map_err(|_| bad())?);
        if key.len() < MIN_AUTH_KEY_BYTES {
            return Err(bad());
        }
        let id = hex::encode(
            &Sha256::new_with_prefix(b"mysnap auth key id\0")
                .chain_update(&key[..])
                .finalize()[..8],
        );
        Ok(AuthKey {
            key,
            id,
            path: path.to_path_buf(),
        })
    }

    /// `auth.key_file` of `cfg`; `None` (with one warning per process
    /// saying so) when authentication is off.
    pub fn from_config(cfg: &Config) -> anyhow::Result<Option<AuthKey>> {
        match &cfg.auth.key_file {
            Some(p) => AuthKey::load(p).map(Some),
            None => {
                static WARNED: Once = Once::new();
                WARNED.call_once(|| {
                    tracing::warn!(
                        "authentication is off (auth.key_file is not set): a manifest that anyone who can write to the bucket forged would be accepted; see README, \"Encryption and authentication\""
                    )
                });
                Ok(None)
            }
        }
    }

    fn mac(&self, manifest_key: &str, manifest: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        mac.update(MAC_SCHEME.as_bytes());
        mac.update(b"\0");
        mac.update(manifest_key.as_bytes());
        mac.update(b"\0");
        mac.update(manifest);
        mac
    }

    /// The MAC object of the manifest `manifest` stored at `manifest_key`.
    pub fn tag(&self, manifest_key: &str, manifest: &[u8]) -> String {
        let tag = self.mac(manifest_key, manifest).finalize().into_bytes();
        format!("{MAC_SCHEME} {} {}\n", self.id, hex::encode(tag))
    }

    /// Checks the MAC object `stored` of `manifest` (at `manifest_key`);
    /// the reason to refuse it when it does not verify.
    pub fn verify(&self, manifest_key: &str, manifest: &[u8], stored: &[u8]) -> Result<(), String> {
        let text = std::str::from_utf8(stored).unwrap_or("");
        let mut parts = text.trim_end_matches('\n').split(' ');
        let (Some(MAC_SCHEME), Some(id), Some(tag), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "its MAC object is not a {MAC_SCHEME} MAC: forged or damaged"
            ));
        };
        if id != self.id {
            return Err(format!(
                "it was authenticated with another key (key id {}) than auth.key_file {} (key id {}): forged, or written with another key",
                id.chars().take(16).collect::<String>(),
                self.path.display(),
                self.id
            ));
        }
        let tag =
            hex::decode(tag).map_err(|_| "its MAC is not hex: forged or damaged".to_string())?;
        self.mac(manifest_key, manifest)
            .verify_slice(&tag)
            .map_err(|_| {
                format!(
                    "it does not verify with auth.key_file {}: the manifest (or its MAC) was changed after it was written",
                    self.path.display()
                )
            })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

// Debug shows where keys came from and their fingerprints, never a key.
impl std::fmt::Debug for Recipients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fps: Vec<_> = self.keys.iter().map(fingerprint).collect();
        f.debug_struct("Recipients")
            .field("fingerprints", &fps)
            .finish()
    }
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities")
            .field("source", &self.source)
            .field("fingerprints", &self.fingerprints())
            .finish()
    }
}

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthKey")
            .field("id", &self.id)
            .field("path", &self.path)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    fn write_key(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&p)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    struct Keys {
        _dir: tempfile::TempDir,
        recipients: Recipients,
        ids: Vec<Identities>,
    }

    /// `n` identities, and recipients of all of them.
    fn keys(n: usize) -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let mut pubs = String::from("# recipients\n\n");
        let mut ids = Vec::new();
        for i in 0..n {
            let (secret, public, _) = generate_identity();
            let p = write_key(dir.path(), &format!("id{i}"), &secret, 0o600);
            ids.push(Identities::load(&p, "test").unwrap());
            pubs += &format!("{public}\n");
        }
        let rp = write_key(dir.path(), "recipients", &pubs, 0o644);
        Keys {
            recipients: Recipients::load(&rp).unwrap(),
            _dir: dir,
            ids,
        }
    }

    fn seal(data: &[u8], to: &Recipients) -> Vec<u8> {
        let mut s = Sealer::new(Vec::new(), Some(to)).unwrap();
        // In pieces, as the codec writes.
        for piece in data.chunks(10_000) {
            s.write_all(piece).unwrap();
        }
        s.finish().unwrap()
    }

    fn unseal(
        stored: &[u8],
        enc: &Encryption,
        ids: Option<&Identities>,
    ) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        open(stored, Some(enc), ids)?
            .read_to_end(&mut out)
            .map_err(|e| e.to_string())?;
        Ok(out)
    }

    fn data() -> Vec<u8> {
        (0..400_000u32)
            .flat_map(|i| (i % 253).to_le_bytes())
            .collect()
    }

    #[test]
    fn round_trip_to_several_recipients() {
        let k = keys(2);
        let enc = k.recipients.encryption();
        assert_eq!(enc.recipients.len(), 2);
        let stored = seal(&data(), &k.recipients);
        assert_ne!(&stored[..], &data()[..]);
        for id in &k.ids {
            assert_eq!(unseal(&stored, &enc, Some(id)).unwrap(), data());
        }
        // Unencrypted objects pass through.
        let mut plain = Vec::new();
        open(&data()[..], None, Some(&k.ids[0]))
            .unwrap()
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(plain, data());
    }

    #[test]
    fn a_wrong_or_missing_identity_is_refused_before_reading() {
        let (k, other) = (keys(1), keys(1));
        let enc = k.recipients.encryption();
        let stored = seal(&data(), &k.recipients);
        let err = unseal(&stored, &enc, Some(&other.ids[0])).unwrap_err();
        assert!(err.contains("holds none of them"), "{err}");
        let err = unseal(&stored, &enc, None).unwrap_err();
        assert!(err.contains("no identity is configured"), "{err}");
        // A manifest lying about its recipients: age itself refuses.
        let lying = other.recipients.encryption();
        let err = unseal(&stored, &lying, Some(&other.ids[0])).unwrap_err();
        assert!(err.contains("none of the identities"), "{err}");
    }

    #[test]
    fn a_flipped_byte_or_a_cut_stream_is_a_read_error() {
        let k = keys(1);
        let enc = k.recipients.encryption();
        let stored = seal(&data(), &k.recipients);
        for at in [stored.len() / 2, stored.len() - 5] {
            let mut bad = stored.clone();
            bad[at] ^= 1;
            let err = unseal(&bad, &enc, Some(&k.ids[0])).unwrap_err();
            assert!(err.contains("changed or cut short"), "flip at {at}: {err}");
        }
        // Cut at a chunk boundary (header + 64 KiB + tag) and mid-chunk.
        let header = stored.len() - data().len() - data().len().div_ceil(64 << 10) * 16;
        for cut in [header + (64 << 10) + 16, stored.len() - 100] {
            let err = unseal(&stored[..cut], &enc, Some(&k.ids[0])).unwrap_err();
            assert!(err.contains("changed or cut short"), "cut at {cut}: {err}");
        }
    }

    #[test]
    fn key_files_readable_by_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (secret, _, _) = generate_identity();
        let p = write_key(dir.path(), "id", &secret, 0o640);
        let err = Identities::load(&p, "encryption.identity_file").unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("chmod 600") && msg.contains("encryption.identity_file"),
            "{msg}"
        );
        assert_eq!(crate::cli::exit_code_of(&err), crate::ExitCode::Usage);
        let p = write_key(dir.path(), "auth", &generate_auth_key(), 0o604);
        assert!(format!("{:#}", AuthKey::load(&p).unwrap_err()).contains("chmod 600"));
        let p = write_key(dir.path(), "pubs", "age1x\n", 0o666);
        assert!(format!("{:#}", Recipients::load(&p).unwrap_err()).contains("chmod 644"));
        let p = write_key(dir.path(), "short", "abcd\n", 0o600);
        assert!(format!("{:#}", AuthKey::load(&p).unwrap_err()).contains("64 hex digits"));
    }

    #[test]
    fn manifests_verify_only_with_their_key_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = AuthKey::load(&write_key(dir.path(), "k1", &generate_auth_key(), 0o600)).unwrap();
        let k2 = AuthKey::load(&write_key(dir.path(), "k2", &generate_auth_key(), 0o600)).unwrap();
        let (key, text) = (
            "db1/20261126T093000Z/manifest.toml",
            b"format_version = 1\n",
        );
        let tag = k1.tag(key, text);
        assert!(tag.len() as u64 <= MAX_MAC_BYTES);
        k1.verify(key, text, tag.as_bytes()).unwrap();
        let err = k1
            .verify(key, b"format_version = 2\n", tag.as_bytes())
            .unwrap_err();
        assert!(err.contains("was changed"), "{err}");
        let err = k1
            .verify("db1/20261127T093000Z/manifest.toml", text, tag.as_bytes())
            .unwrap_err();
        assert!(err.contains("was changed"), "{err}");
        let err = k2.verify(key, text, tag.as_bytes()).unwrap_err();
        assert!(err.contains("another key"), "{err}");
        assert!(k1.verify(key, text, b"garbage").is_err());
    }
}
