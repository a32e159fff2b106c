//! Encryption and authentication end to end: real MariaDB, btrfs, the S3
//! protocol server (and a directory store where a test tampers with objects),
//! keys made by `restorer keygen`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::manifest::Manifest;
use mysnap_tests::gate;

use crate::backup::{assert_ok, edit_config, error_line, set, Rig, StoreKind};
use crate::restore::Target;

/// A row no compressor could hide in plain text: an encrypted archive must not hold it.
const MARKER: &str = "mysnap-plaintext-marker-0123456789";

/// Key files made by `restorer keygen` in `dir`: (identity file, public key).
pub(crate) fn identity(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let out = Command::new(mysnap_tests::bin("restorer"))
        .args(["keygen", "--identity", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ok(&out, "restorer keygen --identity");
    let line = String::from_utf8(out.stdout).unwrap();
    let public = line.split_whitespace().next().unwrap().to_string();
    assert!(public.starts_with("age1"), "{line}");
    let secret = std::fs::read_to_string(&path).unwrap();
    assert!(
        !line.contains("AGE-SECRET-KEY"),
        "keygen printed the secret"
    );
    assert!(secret.contains("AGE-SECRET-KEY-1"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    (path, public)
}

fn auth_key(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new(mysnap_tests::bin("restorer"))
        .args(["keygen", "--auth-key", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ok(&out, "restorer keygen --auth-key");
    path
}

pub(crate) fn write_recipients(path: &Path, publics: &[&str]) {
    let _ = std::fs::remove_file(path);
    std::fs::write(path, publics.join("\n") + "\n").unwrap();
}

/// The restorer on the target, with `MYSNAP_IDENTITY_FILE` when given.
pub(crate) fn restorer(
    src: &Rig,
    target: &Target,
    identity: Option<&Path>,
    args: &[&str],
) -> Output {
    let mut c = Command::new(mysnap_tests::bin("restorer"));
    c.env("MYSNAP_CONFIG", &target.config)
        .env_remove(common::crypt::IDENTITY_ENV)
        .env_remove("CREDENTIALS_DIRECTORY")
        .args(args)
        .stdin(Stdio::null());
    if let Some(p) = identity {
        c.env(common::crypt::IDENTITY_ENV, p);
    }
    if let Some(s3) = &src.s3 {
        c.envs(s3.env());
    }
    c.output().unwrap()
}

fn rows(target: &Target) -> String {
    target
        .db
        .sql("SELECT GROUP_CONCAT(id ORDER BY id) FROM d.t")
}

fn archive_key(id: &str, file: &str) -> String {
    format!("db1/{id}/{file}")
}

#[test]
fn encrypted_backups_round_trip_with_zstd_and_none_and_survive_a_key_rotation() {
    if !gate("encrypted_backups_round_trip_with_zstd_and_none_and_survive_a_key_rotation") {
        return;
    }
    let src = Rig::new(StoreKind::S3);
    let keys = src.tmp.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let (id1, pub1) = identity(&keys, "identity-1");
    let (id2, pub2) = identity(&keys, "identity-2");
    let auth = auth_key(&keys, "auth.key");
    let recipients = keys.join("recipients");
    write_recipients(&recipients, &[&pub1]);
    let configure = |compression: &str| {
        src.write_config(|t| {
            set(t, "archive", "compression", compression);
            // One stream (format 2); indexed and encrypted (format 5, the
            // default with zstd) has its own test below.
            set(t, "archive", "indexed", false);
            set(
                t,
                "encryption",
                "recipients_file",
                recipients.to_str().unwrap(),
            );
            set(t, "auth", "key_file", auth.to_str().unwrap());
        })
    };
    src.db.sql(&format!(
        "CREATE DATABASE d; CREATE TABLE d.t (id INT PRIMARY KEY, v TEXT); INSERT INTO d.t VALUES (1, '{MARKER}')"
    ));

    // Backup A: zstd, to key 1.
    configure("zstd");
    let a = src.backup();
    // Key rotation: backup B (no compression, so plaintext would show) to key 2 only.
    write_recipients(&recipients, &[&pub2]);
    configure("none");
    src.db.sql("INSERT INTO d.t VALUES (2, 'second')");
    let b = src.backup();

    let stored = src.store_keys();
    for (id, file) in [(&a, "data.tar.zst.age"), (&b, "data.tar.age")] {
        for f in [file, "manifest.toml.mac", "manifest.toml"] {
            assert!(
                stored.contains(&archive_key(id, f)),
                "{f} of {id} not in {stored:?}"
            );
        }
        let bytes = src.fetch(&archive_key(id, file));
        assert!(bytes.starts_with(b"age-encryption.org/v1\n"), "{id}");
        assert!(
            !bytes.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
            "{id}: the plaintext is visible in the store"
        );
        let m = Manifest::parse(
            std::str::from_utf8(&src.fetch(&archive_key(id, "manifest.toml"))).unwrap(),
            "stored",
        )
        .unwrap();
        assert_eq!(m.format_version, common::manifest::ENCRYPTED_FORMAT_VERSION);
        let enc = m.archive.unwrap().encryption.unwrap();
        assert_eq!(enc.recipients.len(), 1);
        // The manifest names fingerprints, never a key.
        let text = String::from_utf8(src.fetch(&archive_key(id, "manifest.toml"))).unwrap();
        assert!(
            !text.contains("age1") && !text.contains("AGE-SECRET"),
            "{text}"
        );
    }

    // The backup host lists them without any identity.
    let out = src.run("restorer", &["list"]);
    assert_ok(&out, "list on the backup host");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains(&a) && table.contains(&b), "{table}");

    let target = Target::second(&src);
    edit_config(&target.config, |t| {
        set(t, "encryption", "identity_file", id1.to_str().unwrap())
    });
    // Wrong identity (key 1 for B), and none at all: exit 4, nothing changed.
    let line = error_line(&restorer(&src, &target, None, &["restore", &b]), 4);
    assert!(line.contains("holds none of them"), "{line}");
    target.assert_untouched("restore with the wrong identity");
    let line = error_line(&restorer(&src, &target, None, &["verify", &b]), 4);
    assert!(line.contains("holds none of them"), "{line}");
    edit_config(&target.config, |t| {
        t.remove("encryption");
    });
    let line = error_line(&restorer(&src, &target, None, &["restore", &a]), 4);
    assert!(line.contains("no identity is configured"), "{line}");
    target.assert_untouched("restore without an identity");

    // A with identity 1 (the config), B with identity 2 (the environment).
    edit_config(&target.config, |t| {
        set(t, "encryption", "identity_file", id1.to_str().unwrap())
    });
    assert_ok(&restorer(&src, &target, None, &["verify", &a]), "verify A");
    assert_ok(
        &restorer(&src, &target, None, &["restore", &a]),
        "restore A",
    );
    assert_eq!(rows(&target), "1");
    assert_ok(
        &restorer(&src, &target, Some(&id2), &["restore", &b]),
        "restore B with identity 2",
    );
    assert_eq!(rows(&target), "1,2");
    // After a rotation a restore host holds both identities in one file.
    let both = keys.join("identities");
    let text = std::fs::read_to_string(&id1).unwrap() + &std::fs::read_to_string(&id2).unwrap();
    std::fs::write(&both, text).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&both, std::fs::Permissions::from_mode(0o600)).unwrap();
    for id in [&a, &b] {
        assert_ok(
            &restorer(&src, &target, Some(&both), &["verify", id]),
            "verify with both identities",
        );
    }
    // An identity file others may read is refused, naming it and the chmod.
    std::fs::set_permissions(&both, std::fs::Permissions::from_mode(0o644)).unwrap();
    let line = error_line(&restorer(&src, &target, Some(&both), &["verify", &a]), 2);
    assert!(
        line.contains("chmod 600") && line.contains(both.to_str().unwrap()),
        "{line}"
    );
}

#[test]
fn tampered_ciphertext_and_manifests_signed_with_another_key_are_refused_with_exit_4() {
    if !gate("tampered_ciphertext_and_manifests_signed_with_another_key_are_refused_with_exit_4") {
        return;
    }
    let src = Rig::new(StoreKind::File);
    let keys = src.tmp.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let (id1, pub1) = identity(&keys, "identity");
    let auth = auth_key(&keys, "auth.key");
    let other = auth_key(&keys, "other.key");
    let recipients = keys.join("recipients");
    write_recipients(&recipients, &[&pub1]);
    src.write_config(|t| {
        set(
            t,
            "encryption",
            "recipients_file",
            recipients.to_str().unwrap(),
        );
        set(t, "encryption", "identity_file", id1.to_str().unwrap());
        set(t, "auth", "key_file", auth.to_str().unwrap());
    });
    src.db.sql(
        "CREATE DATABASE d; CREATE TABLE d.t (id INT PRIMARY KEY); INSERT INTO d.t VALUES (7)",
    );
    let id = src.backup();
    let dir = src.tmp.path().join("store/db1").join(&id);
    let target = Target::second(&src);

    let refused = |what: &str, needle: &str| {
        for cmd in ["verify", "restore"] {
            let line = error_line(&target.restorer(&src, &[cmd, &id]), 4);
            assert!(line.contains(needle), "{what}: {cmd}: {line}");
            target.assert_untouched(&format!("{what}: {cmd}"));
        }
        // list skips it with a warning naming the key.
        let out = target.restorer(&src, &["list"]);
        assert_ok(&out, "list");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains(&id),
            "{what}: listed"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("manifest.toml"),
            "{what}: no warning"
        );
    };

    // A flipped byte in the ciphertext (the manifest and its MAC intact).
    let archive = dir.join("data.tar.zst.age");
    let good = std::fs::read(&archive).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    std::fs::write(&archive, &bad).unwrap();
    for cmd in ["verify", "restore"] {
        let line = error_line(&target.restorer(&src, &[cmd, &id]), 4);
        assert!(
            line.contains("data.tar.zst.age") && line.contains("changed or cut short"),
            "{cmd}: {line}"
        );
        target.assert_untouched(&format!("flipped byte: {cmd}"));
    }
    std::fs::write(&archive, &good).unwrap();
    assert_ok(&target.restorer(&src, &["verify", &id]), "verify, repaired");

    // A manifest changed (another SHA-256, for an archive of the forger's
    // choice) and re-signed with another key.
    let manifest = dir.join("manifest.toml");
    let mac = dir.join("manifest.toml.mac");
    let (text, tag) = (
        std::fs::read(&manifest).unwrap(),
        std::fs::read(&mac).unwrap(),
    );
    let mut m = Manifest::parse(std::str::from_utf8(&text).unwrap(), "x").unwrap();
    m.archive.as_mut().unwrap().sha256 =
        common::manifest::Sha256Hex::parse(&"ab".repeat(32)).unwrap();
    let forged = m.to_toml();
    let other = common::crypt::AuthKey::load(&other).unwrap();
    let key = format!("db1/{id}/manifest.toml");
    std::fs::write(&manifest, &forged).unwrap();
    std::fs::write(&mac, other.tag(&key, forged.as_bytes())).unwrap();
    refused("re-signed with another key", "another key");
    // The same change under the real MAC.
    std::fs::write(&mac, &tag).unwrap();
    refused("changed manifest", "was changed");
    // No MAC at all.
    std::fs::write(&manifest, &text).unwrap();
    std::fs::remove_file(&mac).unwrap();
    refused("no MAC", "has no MAC");
    std::fs::write(&mac, &tag).unwrap();
    assert_ok(
        &target.restorer(&src, &["restore", &id]),
        "restore, repaired",
    );
    assert_eq!(target.db.sql("SELECT id FROM d.t"), "7");
    // A drill unpacks the encrypted backup through the same layer.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(src.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let scratch = src.tmp.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = src.run(
        "restorer",
        &["drill", "--scratch", scratch.to_str().unwrap(), &id],
    );
    assert_ok(&out, "drill of the encrypted backup");

    // Without [auth], the restorer says once that authentication is off.
    edit_config(&target.config, |t| {
        t.remove("auth");
    });
    let out = target.restorer(&src, &["list"]);
    assert_ok(&out, "list without auth");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("authentication is off").count(),
        1,
        "{stderr}"
    );
}

/// Binary log segments are sealed like archives: with `[encryption]` the
/// stored binary log is age ciphertext (no row in plain text), with
/// `[auth]` its metadata (which holds the data's SHA-256) is MACed. A
/// restore `--until` opens them with the identity; a segment whose
/// metadata was changed in the store is never replayed: the restore is
/// refused naming what is missing, and the restored server is untouched.
#[test]
fn binlog_segments_are_encrypted_and_authenticated_and_a_forged_one_is_not_replayed() {
    if !gate("binlog_segments_are_encrypted_and_authenticated_and_a_forged_one_is_not_replayed") {
        return;
    }
    let src = Rig::new(StoreKind::File);
    let keys = src.tmp.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let (id, public) = identity(&keys, "identity");
    let auth = auth_key(&keys, "auth.key");
    let recipients = keys.join("recipients");
    write_recipients(&recipients, &[&public]);
    src.write_config(|t| {
        set(
            t,
            "encryption",
            "recipients_file",
            recipients.to_str().unwrap(),
        );
        set(t, "encryption", "identity_file", id.to_str().unwrap());
        set(t, "auth", "key_file", auth.to_str().unwrap());
    });
    src.db
        .sql("CREATE DATABASE d; CREATE TABLE d.t (id INT PRIMARY KEY, v TEXT); INSERT INTO d.t VALUES (1, 'one')");
    src.backup();
    src.db
        .sql(&format!("INSERT INTO d.t VALUES (2, '{MARKER}')"));
    assert_ok(&crate::pitr::ship_once(&src), "archiver binlogs --once");

    let stored = src.store_keys();
    let metas: Vec<&String> = stored
        .iter()
        .filter(|k| k.contains("/binlogs/") && k.ends_with("/meta.toml"))
        .collect();
    assert!(!metas.is_empty(), "no segment in {stored:?}");
    let mut marked = false;
    for meta in &metas {
        assert!(stored.contains(&format!("{meta}.mac")), "{meta}: no MAC");
        let text = String::from_utf8(src.fetch(meta)).unwrap();
        assert!(text.contains("age-x25519"), "{meta}: {text}");
        let data = src.fetch(&meta.replace("/meta.toml", "/binlog.zst"));
        assert!(data.starts_with(b"age-encryption.org/v1\n"), "{meta}");
        marked |= data.windows(MARKER.len()).any(|w| w == MARKER.as_bytes());
    }
    assert!(!marked, "a row is visible in a stored binary log");

    let target = Target::second(&src);
    assert_ok(
        &target.restorer(&src, &["restore", "--until", "latest"]),
        "restore --until latest of encrypted segments",
    );
    assert_eq!(rows(&target), "1,2");

    // A byte of each segment's data changed in the store, the metadata
    // intact: refused (exit 4) before the live server is touched.
    let data: Vec<(std::path::PathBuf, Vec<u8>)> = metas
        .iter()
        .map(|m| {
            let p = src
                .tmp
                .path()
                .join("store")
                .join(m.replace("/meta.toml", "/binlog.zst"));
            let good = std::fs::read(&p).unwrap();
            (p, good)
        })
        .collect();
    for (p, good) in &data {
        let mut bad = good.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x01;
        std::fs::write(p, &bad).unwrap();
    }
    let line = error_line(&target.restorer(&src, &["restore", "--until", "latest"]), 4);
    assert!(line.contains("does not match the SHA-256"), "{line}");
    assert_eq!(rows(&target), "1,2");
    for (p, good) in &data {
        std::fs::write(p, good).unwrap();
    }

    // Metadata changed in the store: its MAC no longer verifies.
    for meta in &metas {
        let path = src.tmp.path().join("store").join(meta);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("# changed\n");
        std::fs::write(&path, text).unwrap();
    }
    let out = target.restorer(&src, &["restore", "--until", "latest"]);
    let line = error_line(&out, 1);
    assert!(line.contains("is not in the archive"), "{line}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not verify"),
        "no warning naming the forged metadata"
    );
    assert_eq!(rows(&target), "1,2");
}

/// `store` object `key` replaced by `bytes` (a tampered object).
fn replace(src: &Rig, key: &str, bytes: Vec<u8>) {
    let cfg = src.store_cfg();
    src.block_on(async {
        let store = common::store::open(&cfg).await.unwrap();
        store.delete(key).await.unwrap();
        store.put_new(key, bytes.into()).await.unwrap();
    })
}

/// Encrypted and indexed (format 5): the frames are one age file and so is
/// the index, neither shows a row or a file name; the archive still opens
/// by hand (decrypt, `zstd -dc`, tar); a restore reads its frames by
/// ranges of whole age chunks from S3; no identity, or a changed byte, is
/// refused with exit 4 before the data directory changes.
#[test]
fn an_encrypted_indexed_backup_restores_by_ranges_and_by_hand_and_a_changed_byte_is_refused() {
    if !gate(
        "an_encrypted_indexed_backup_restores_by_ranges_and_by_hand_and_a_changed_byte_is_refused",
    ) {
        return;
    }
    let src = Rig::new(StoreKind::S3);
    let keys = src.tmp.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let (id1, pub1) = identity(&keys, "identity");
    let recipients = keys.join("recipients");
    write_recipients(&recipients, &[&pub1]);
    src.write_config(|t| {
        set(t, "archive", "indexed", true);
        set(
            t,
            "encryption",
            "recipients_file",
            recipients.to_str().unwrap(),
        );
    });
    src.db.sql(&format!(
        "CREATE DATABASE d; CREATE TABLE d.t (id INT PRIMARY KEY, v TEXT); INSERT INTO d.t VALUES (1, '{MARKER}')"
    ));
    let id = src.backup();
    let stored = src.store_keys();
    assert!(
        !stored.contains(&archive_key(&id, "index.json.zst")),
        "{stored:?}"
    );
    let archive = src.fetch(&archive_key(&id, "data.tar.zst.age"));
    let index = src.fetch(&archive_key(&id, "index.json.zst.age"));
    for (what, bytes) in [("archive", &archive), ("index", &index)] {
        assert!(bytes.starts_with(b"age-encryption.org/v1\n"), "{what}");
        for visible in [MARKER, "d/t.ibd"] {
            assert!(
                !bytes
                    .windows(visible.len())
                    .any(|w| w == visible.as_bytes()),
                "{what}: {visible} is visible in the store"
            );
        }
    }
    let m = Manifest::parse(
        std::str::from_utf8(&src.fetch(&archive_key(&id, "manifest.toml"))).unwrap(),
        "stored",
    )
    .unwrap();
    assert_eq!(
        m.format_version,
        common::manifest::ENCRYPTED_INDEXED_FORMAT_VERSION
    );
    let info = m.archive.clone().unwrap();
    let ix = info.index.as_ref().unwrap();
    assert_eq!(ix.key, archive_key(&id, "index.json.zst.age"));

    // By hand: `age -d`, then `zstd -dc | tar -t` read the frames as one stream.
    let ids = common::crypt::Identities::load(&id1, "test").unwrap();
    let plain = common::crypt::open(&archive[..], info.encryption.as_ref(), Some(&ids)).unwrap();
    let names: Vec<String> = tar::Archive::new(zstd::Decoder::new(plain).unwrap())
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n.ends_with("d/t.ibd")), "{names:?}");

    let target = Target::second(&src);
    let line = error_line(&restorer(&src, &target, None, &["restore", &id]), 4);
    assert!(line.contains("no identity is configured"), "{line}");
    target.assert_untouched("restore without an identity");
    assert_ok(
        &restorer(&src, &target, Some(&id1), &["verify", &id]),
        "verify",
    );
    // A byte changed in the middle of the ciphertext (same size).
    let mut changed = archive.clone();
    let mid = changed.len() / 2;
    changed[mid] ^= 0x20;
    replace(&src, &archive_key(&id, "data.tar.zst.age"), changed);
    for cmd in ["verify", "restore"] {
        let line = error_line(&restorer(&src, &target, Some(&id1), &[cmd, &id]), 4);
        assert!(line.contains("decryption failed"), "{cmd}: {line}");
        target.assert_untouched(&format!("{cmd} of a changed ciphertext"));
    }
    replace(&src, &archive_key(&id, "data.tar.zst.age"), archive);
    assert_ok(
        &restorer(&src, &target, Some(&id1), &["restore", &id]),
        "restore",
    );
    assert_eq!(rows(&target), "1");
}
