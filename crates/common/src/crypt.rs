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

use std::io::{self, Read, Seek, Write};
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
        self.0.read(buf).map_err(decryption_failed)
    }
}

fn decryption_failed(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => io::Error::new(
            e.kind(),
            format!("decryption failed ({e}): the ciphertext was changed or cut short"),
        ),
        _ => e,
    }
}

/// Plaintext bytes in one chunk of age's payload (STREAM, ChaCha20-Poly1305).
const AGE_CHUNK: u64 = 64 << 10;
/// A chunk as stored: its plaintext and its 16-byte tag.
const AGE_SEALED_CHUNK: u64 = AGE_CHUNK + 16;
/// The payload nonce between an age header and its chunks.
const AGE_NONCE: u64 = 16;
/// The first bytes of an encrypted object read to find its header: more
/// than the header of an archive to [`MAX_RECIPIENTS`] recipients.
pub const AGE_HEAD: u64 = 64 << 10;

/// The bytes an age file holds after its header for `plain` bytes of
/// plaintext: the payload nonce, then the chunks, each with its tag (an
/// empty file has one empty chunk).
pub fn sealed_payload_len(plain: u64) -> u64 {
    AGE_NONCE + plain + 16 * plain.div_ceil(AGE_CHUNK).max(1)
}

/// Ranges of the plaintext of an encrypted object read from ranges of its
/// stored bytes (an indexed archive's frames, fetched and decrypted in
/// parallel): age's payload is a sequence of 64 KiB chunks, each
/// authenticated with its number and whether it is the last, so any run
/// of whole chunks decrypts alone, and a chunk moved, changed or cut is
/// an error, never different data.
pub struct Ranged<'a> {
    /// The first [`AGE_HEAD`] stored bytes (or all): the header.
    head: bytes::Bytes,
    /// The header's length, the payload nonce included.
    header: u64,
    /// The object's stored size.
    total: u64,
    ids: &'a Identities,
}

impl<'a> Ranged<'a> {
    /// The object of `total` stored bytes beginning with `head` (its first
    /// [`AGE_HEAD`] bytes, or all of them), encrypted as `encryption`
    /// says; `Err` is why it cannot be read with `ids`.
    pub fn new(
        head: bytes::Bytes,
        total: u64,
        encryption: &Encryption,
        ids: &'a Identities,
    ) -> Result<Ranged<'a>, String> {
        ids.check(encryption)?;
        let mut r = Ranged {
            head,
            header: 0,
            total,
            ids,
        };
        let mut at = io::Cursor::new(r.head.clone());
        age::Decryptor::new(&mut at).map_err(|e| match e {
            age::DecryptError::Io(_) => format!(
                "its age header is not within its first {} bytes: forged or damaged",
                r.head.len()
            ),
            e => format!("its age header is invalid: {e}"),
        })?;
        // The header and the payload nonce after it.
        r.header = at.position();
        let payload = total.saturating_sub(r.header);
        let last = payload % AGE_SEALED_CHUNK;
        if payload < 16 || (last > 0 && last < 16) || (last == 16 && payload > 16) {
            return Err(format!(
                "its {total} stored bytes are not an age file's length after its {}-byte header: cut short or forged",
                r.header
            ));
        }
        r.decrypting()?;
        Ok(r)
    }

    /// Plaintext bytes the object holds.
    pub fn plain_len(&self) -> u64 {
        let payload = self.total - self.header;
        payload - 16 * payload.div_ceil(AGE_SEALED_CHUNK)
    }

    /// The first plaintext byte read for `plain`: one before it at a
    /// chunk's start, so that the reader never asks for the object's end.
    fn from(plain: &std::ops::Range<u64>) -> u64 {
        match plain.start {
            s if s > 0 && s.is_multiple_of(AGE_CHUNK) => s - 1,
            s => s,
        }
    }

    /// The stored bytes to fetch to read `plain` (a non-empty range of
    /// the plaintext): its chunks, whole.
    pub fn stored_range(&self, plain: &std::ops::Range<u64>) -> std::ops::Range<u64> {
        let first = Self::from(plain) / AGE_CHUNK;
        let last = plain.end.max(plain.start + 1).div_ceil(AGE_CHUNK);
        let at = self.header;
        (at + first * AGE_SEALED_CHUNK).min(self.total)
            ..(at + last * AGE_SEALED_CHUNK).min(self.total)
    }

    /// The plaintext `plain`, from `stored`: the bytes of
    /// [`Ranged::stored_range`] of it. An error when a chunk does not
    /// decrypt (changed, moved or cut).
    pub fn read(&self, plain: std::ops::Range<u64>, stored: &[u8]) -> io::Result<bytes::Bytes> {
        let range = self.stored_range(&plain);
        if stored.len() as u64 != range.end - range.start || plain.end > self.plain_len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "plaintext bytes {}..{} of {} are not in the {} stored bytes read",
                    plain.start,
                    plain.end,
                    self.plain_len(),
                    stored.len()
                ),
            ));
        }
        let window = Window {
            head: &self.head,
            body: stored,
            body_at: range.start,
            total: self.total,
            pos: 0,
        };
        let mut r = self.decrypting_from(window).map_err(io::Error::other)?;
        let from = Self::from(&plain);
        // (Seeking decrypts the chunk it lands in.)
        r.seek(io::SeekFrom::Start(from))
            .map_err(decryption_failed)?;
        let mut out = vec![0; (plain.end - from) as usize];
        Decrypting(&mut r).read_exact(&mut out)?;
        Ok(bytes::Bytes::from(out).slice((plain.start - from) as usize..))
    }

    /// Whether one of the identities opens the header.
    fn decrypting(&self) -> Result<(), String> {
        let window = Window {
            head: &self.head,
            body: &[],
            body_at: self.total,
            total: self.total,
            pos: 0,
        };
        self.decrypting_from(window).map(|_| ())
    }

    fn decrypting_from<'w>(
        &self,
        window: Window<'w>,
    ) -> Result<age::stream::StreamReader<Window<'w>>, String> {
        let d = age::Decryptor::new(window).map_err(|e| format!("its age header: {e}"))?;
        d.decrypt(self.ids.keys.iter().map(|i| i as &dyn age::Identity))
            .map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => format!(
                    "none of the identities in {} decrypts it (its header names other recipients than its manifest: forged or damaged)",
                    self.ids.source
                ),
                e => format!("it cannot be decrypted with {}: {e}", self.ids.source),
            })
    }
}

/// An encrypted object as age's reader sees it when only its head and
/// one range were read: reading elsewhere is an error.
struct Window<'a> {
    head: &'a [u8],
    body: &'a [u8],
    body_at: u64,
    total: u64,
    pos: u64,
}

impl Read for Window<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (from, at) =
            if self.pos >= self.body_at && self.pos < self.body_at + self.body.len() as u64 {
                (self.body, self.pos - self.body_at)
            } else if self.pos < self.head.len() as u64 {
                (self.head, self.pos)
            } else if self.pos >= self.total {
                return Ok(0);
            } else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("stored byte {} was not read", self.pos),
                ));
            };
        // (Where the head and the body overlap, they hold the same bytes.)
        let rest = &from[at as usize..];
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl io::Seek for Window<'_> {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        let pos = match to {
            io::SeekFrom::Start(p) => Some(p),
            io::SeekFrom::End(d) => self.total.checked_add_signed(d),
            io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| io::Error::other("a seek before the start"))?;
        Ok(self.pos)
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

    /// Every range of an encrypted object read from only its head and the
    /// stored bytes `stored_range` names, at chunk edges too; a changed,
    /// cut or foreign object is refused, never read differently.
    #[test]
    fn ranges_of_an_encrypted_object_decrypt_alone() {
        let k = keys(2);
        let enc = k.recipients.encryption();
        const C: u64 = AGE_CHUNK;
        for len in [1, C - 1, C, 2 * C, 3 * C + 1000] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let stored = seal(&plain, &k.recipients);
            let head =
                bytes::Bytes::copy_from_slice(&stored[..stored.len().min(AGE_HEAD as usize)]);
            let total = stored.len() as u64;
            let r = Ranged::new(head.clone(), total, &enc, &k.ids[1]).unwrap();
            assert_eq!(r.plain_len(), len, "length of {len}");
            assert_eq!(r.header + sealed_payload_len(len) - AGE_NONCE, total);
            let edges = [0, 1, C - 1, C, C + 1, 2 * C, len - 1, len];
            for &a in &edges {
                for &b in &edges {
                    if a >= b || b > len {
                        continue;
                    }
                    let s = r.stored_range(&(a..b));
                    let got = r
                        .read(a..b, &stored[s.start as usize..s.end as usize])
                        .unwrap_or_else(|e| panic!("{a}..{b} of {len}: {e}"));
                    assert_eq!(got, &plain[a as usize..b as usize], "{a}..{b} of {len}");
                }
            }
            // A changed byte in the range read: an error.
            let s = r.stored_range(&(0..len));
            let mut bad = stored[s.start as usize..s.end as usize].to_vec();
            let mid = bad.len() / 2;
            bad[mid] ^= 1;
            let err = r.read(0..len, &bad).unwrap_err();
            assert!(err.to_string().contains("decryption failed"), "{err}");
            // Cut short: refused by its length, or its last chunk fails.
            if len > C {
                let cut = total - 20;
                let r = Ranged::new(head.clone(), cut, &enc, &k.ids[0]).unwrap();
                let s = r.stored_range(&(0..r.plain_len()));
                assert!(r
                    .read(0..r.plain_len(), &stored[s.start as usize..s.end as usize])
                    .is_err());
            }
        }
        // Another recipient's key, or a header cut off: refused up front.
        let stored = seal(b"rows", &k.recipients);
        let refused = |head: &[u8], ids: &Identities| {
            let head = bytes::Bytes::copy_from_slice(head);
            Ranged::new(head, stored.len() as u64, &enc, ids)
                .err()
                .unwrap()
        };
        let err = refused(&stored, &keys(1).ids[0]);
        assert!(err.contains("holds none of them"), "{err}");
        let err = refused(&stored[..40], &k.ids[0]);
        assert!(err.contains("not within its first 40 bytes"), "{err}");
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
