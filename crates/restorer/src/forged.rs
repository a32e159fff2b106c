//! Forged backups against the real read path, rootless and in-process: a
//! file store in a temporary directory, [`crate::verify`] and
//! [`crate::stage`] (everything restore does before it touches the server,
//! post-processing included). Each forged archive must be refused with its
//! typed error and exit code, by verify and restore alike, and leave the
//! canary outside the target untouched. A property test throws random entry
//! sequences at it and checks that nothing is ever created outside.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::archive::frames::FrameWriter;
use common::archive::index::Index;
use common::archive::ArchiveError;
use common::config::{Compression, Config};
use common::manifest::{
    ArchiveInfo, BackupId, Binlog, DataLayout, Flavor, IndexInfo, LockTimes, Manifest, Server,
    SnapshotInfo, FORMAT_VERSION, INDEXED_FORMAT_VERSION,
};
use common::progress::Silent;
use common::store::{FileStore, Store};
use common::ExitCode;
use sha2::{Digest, Sha256};

/// One raw tar entry, written byte for byte (names that `tar::Builder`
/// would refuse included).
#[derive(Debug, Clone)]
pub struct Raw {
    pub name: Vec<u8>,
    pub kind: tar::EntryType,
    pub link: Vec<u8>,
    pub data: Vec<u8>,
    /// The size the header claims (default: the data's).
    pub claimed: Option<u64>,
}

pub fn dir(name: &str) -> Raw {
    raw(name, tar::EntryType::Directory, "", b"")
}
pub fn file(name: &str, data: &[u8]) -> Raw {
    raw(name, tar::EntryType::Regular, "", data)
}
pub fn link(name: &str, target: &str) -> Raw {
    raw(name, tar::EntryType::Symlink, target, b"")
}
pub fn raw(name: &str, kind: tar::EntryType, link: &str, data: &[u8]) -> Raw {
    Raw {
        name: name.as_bytes().to_vec(),
        kind,
        link: link.as_bytes().to_vec(),
        data: data.to_vec(),
        claimed: None,
    }
}

fn header(name: &[u8], kind: tar::EntryType, link: &[u8], size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    let n = name.len().min(100);
    h.as_old_mut().name[..n].copy_from_slice(&name[..n]);
    let l = link.len().min(100);
    h.as_old_mut().linkname[..l].copy_from_slice(&link[..l]);
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
    }
    h.set_cksum();
    h
}

/// The tar bytes of `entries`: GNU long name/link entries where a name is
/// longer than 100 bytes, then the header and the data, padded.
pub fn tar_of(entries: &[Raw]) -> Vec<u8> {
    let mut out = Vec::new();
    let block = |out: &mut Vec<u8>, h: &tar::Header, data: &[u8]| {
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    };
    for e in entries {
        for (long, kind) in [
            (&e.name, tar::EntryType::GNULongName),
            (&e.link, tar::EntryType::GNULongLink),
        ] {
            if long.len() > 100 {
                let mut data = long.clone();
                data.push(0);
                block(
                    &mut out,
                    &header(b"././@LongLink", kind, b"", data.len() as u64),
                    &data,
                );
            }
        }
        let size = e.claimed.unwrap_or(e.data.len() as u64);
        block(&mut out, &header(&e.name, e.kind, &e.link, size), &e.data);
    }
    out.extend_from_slice(&[0; 1024]);
    out
}

fn compress(tar: &[u8], c: Compression) -> Vec<u8> {
    let mut enc = common::codec::Encoder::new(Vec::new(), c, 1, 1).unwrap();
    enc.write_all(tar).unwrap();
    enc.finish().unwrap()
}

/// A checked manifest value (panics when it does not parse).
fn v<T: TryFrom<String, Error = String>>(s: &str) -> T {
    T::try_from(s.to_string()).unwrap()
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// A temporary store, staging directory and canary.
pub struct Rig {
    pub tmp: tempfile::TempDir,
    pub cfg: Config,
    next: u32,
}

const CANARY: &[u8] = b"the canary lives";

impl Rig {
    pub fn new() -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for d in ["store", "vol", "stage", "outside", "state"] {
            std::fs::create_dir(root.join(d)).unwrap();
        }
        std::fs::write(root.join("outside/canary"), CANARY).unwrap();
        std::fs::write(root.join("vol/canary"), CANARY).unwrap();
        let text = format!(
            "[mysql]\nstop_command = [\"true\"]\nstart_command = [\"true\"]\n\
             [volume]\nbackend = \"btrfs\"\nmountpoint = \"{r}/vol\"\ndatadir = \"{r}/vol/mysql\"\n\
             [store]\nurl = \"file://{r}/store\"\n\
             [backup]\nname = \"db1\"\nstate_dir = \"{r}/state\"\n",
            r = root.display()
        );
        let cfg = Config::parse(&text, Path::new("test.toml")).unwrap();
        Rig { tmp, cfg, next: 0 }
    }

    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// A backup id not used yet.
    fn id(&mut self) -> BackupId {
        self.next += 1;
        BackupId::parse(&format!(
            "20261126T09{:02}{:02}Z",
            self.next / 60,
            self.next % 60
        ))
        .unwrap()
    }

    /// The manifest of a backup of `paths` (the data directory first) whose
    /// archive is `stored`, its tar stream `tar`.
    pub fn manifest(
        &mut self,
        paths: &[&str],
        tar: &[u8],
        stored: &[u8],
        c: Compression,
    ) -> Manifest {
        let id = self.id();
        let mut files = 0;
        let mut bytes = 0;
        for e in tar::Archive::new(tar)
            .entries()
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.header().entry_type().is_file() {
                files += 1;
                bytes += e.header().size().unwrap_or(0);
            }
        }
        Manifest {
            format_version: FORMAT_VERSION,
            backup_id: id.clone(),
            name: v("db1"),
            created_at: v("2026-11-26T09:00:00Z"),
            server: Server {
                flavor: Flavor::Mariadb,
                version: v("10.11.6-MariaDB"),
                hostname: v("db1"),
                server_id: 1,
            },
            binlog: Some(Binlog {
                file: v("binlog.000001"),
                position: 4,
            }),
            gtid: None,
            source: None,
            lock: LockTimes {
                method: common::config::LockMethod::Ftwrl,
                attempts: 1,
                wait_secs: 0.0,
                hold_secs: 0.0,
            },
            snapshot: SnapshotInfo {
                backend: common::config::Backend::Btrfs,
                name: v("snap"),
                path: "/nonexistent".into(),
            },
            data: DataLayout {
                volume_root: "/src".into(),
                datadir: v(paths[0]),
                paths: paths.iter().map(|p| v(p)).collect(),
                exclude: vec![],
            },
            archive: Some(ArchiveInfo {
                key: common::archive::keys::archive(&v("db1"), &id, c),
                size: stored.len() as u64,
                compression: c,
                level: 1,
                sha256: v(&sha(stored)),
                tar_size: tar.len() as u64,
                unpacked_size: bytes,
                files,
                archive_secs: 0.0,
                encryption: None,
                index: None,
                bases: vec![],
                chain: 0,
            }),
        }
    }

    /// Stores `stored` and the manifest `m` (as text, after `edit`).
    pub fn plant(&self, m: &Manifest, stored: &[u8], edit: impl FnOnce(String) -> String) {
        let info = m.archive.as_ref().unwrap();
        let store = self.root().join("store");
        let key = store.join(&info.key);
        std::fs::create_dir_all(key.parent().unwrap()).unwrap();
        std::fs::write(&key, stored).unwrap();
        std::fs::write(store.join(m.key()), edit(m.to_toml())).unwrap();
    }

    /// A backup of `entries` under `paths`, stored as is.
    pub fn backup(&mut self, paths: &[&str], entries: &[Raw]) -> Manifest {
        let tar = tar_of(entries);
        let stored = compress(&tar, Compression::Zstd);
        let m = self.manifest(paths, &tar, &stored, Compression::Zstd);
        self.plant(&m, &stored, |t| t);
        m
    }

    /// Keys for encrypted backups: an identity this rig's restores use
    /// (`encryption.identity_file`) and its recipient.
    pub fn keys(&mut self) -> common::crypt::Recipients {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.root().join("keys");
        std::fs::create_dir_all(&dir).unwrap();
        let (secret, public, _) = common::crypt::generate_identity();
        let (id, to) = (dir.join("identity"), dir.join("recipients"));
        std::fs::write(&id, secret.as_bytes()).unwrap();
        std::fs::set_permissions(&id, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&to, format!("{public}\n")).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).unwrap();
        self.cfg.encryption.identity_file = Some(id);
        common::crypt::Recipients::load(&to).unwrap()
    }

    /// An indexed backup (format 3) of `entries` under `paths`, in frames
    /// of `target` tar bytes; `forge` edits its index before it is stored
    /// (the manifest then binds the forged index: size and SHA-256).
    pub fn indexed(
        &mut self,
        paths: &[&str],
        entries: &[Raw],
        target: u64,
        forge: impl FnOnce(&mut Index),
    ) -> Manifest {
        self.framed(paths, entries, target, forge, None, |_| {})
    }

    /// An encrypted indexed backup (format 5) of `entries` under `paths`,
    /// in frames of `target` tar bytes; `forge` edits the stored (encrypted)
    /// archive, whose size and SHA-256 the manifest then records.
    pub fn sealed(
        &mut self,
        to: &common::crypt::Recipients,
        paths: &[&str],
        entries: &[Raw],
        target: u64,
        forge: impl FnOnce(&mut Vec<u8>),
    ) -> Manifest {
        self.framed(paths, entries, target, |_| {}, Some(to), forge)
    }

    /// [`Rig::indexed`], encrypted to `to` when given ([`Rig::sealed`]).
    fn framed(
        &mut self,
        paths: &[&str],
        entries: &[Raw],
        target: u64,
        forge_index: impl FnOnce(&mut Index),
        to: Option<&common::crypt::Recipients>,
        forge_stored: impl FnOnce(&mut Vec<u8>),
    ) -> Manifest {
        let seal = |plain: &[u8]| {
            let mut w = common::crypt::Sealer::new(Vec::new(), to).unwrap();
            w.write_all(plain).unwrap();
            w.finish().unwrap()
        };
        let tar = tar_of(entries);
        let mut w = FrameWriter::with_target(Vec::new(), 1, 2, target);
        w.write_all(&tar).unwrap();
        let (frames, mut index) = w.finish().unwrap();
        let mut stored = seal(&frames);
        forge_stored(&mut stored);
        let mut m = self.manifest(paths, &tar, &stored, Compression::Zstd);
        forge_index(&mut index);
        let bytes = seal(&index.to_stored().unwrap());
        let encrypted = to.is_some();
        let key = common::archive::keys::index(&m.name, &m.backup_id, encrypted);
        let path = self.root().join("store").join(&key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        m.format_version = match encrypted {
            false => INDEXED_FORMAT_VERSION,
            true => common::manifest::ENCRYPTED_INDEXED_FORMAT_VERSION,
        };
        let a = m.archive.as_mut().unwrap();
        a.key =
            common::archive::keys::archive_key(&m.name, &m.backup_id, Compression::Zstd, encrypted);
        a.encryption = to.map(|t| t.encryption());
        a.index = Some(IndexInfo {
            key,
            size: bytes.len() as u64,
            sha256: v(&sha(&bytes)),
        });
        self.plant(&m, &stored, |t| t);
        m
    }

    /// verify and stage of backup `id` (stage into a fresh staging directory).
    pub async fn try_both(&self, id: &str) -> (anyhow::Result<()>, anyhow::Result<()>) {
        let verified = crate::verify(&self.cfg, id, &Silent).await.map(|_| ());
        let staged = self
            .try_stage(id, &std::sync::atomic::AtomicBool::new(false))
            .await;
        (verified, staged)
    }

    /// stage of backup `id` into a fresh staging directory, stopped by `cancel`.
    pub async fn try_stage(
        &self,
        id: &str,
        cancel: &std::sync::atomic::AtomicBool,
    ) -> anyhow::Result<()> {
        let staging = self.root().join("stage/s");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir(&staging).unwrap();
        async {
            let store: Arc<dyn Store> = Arc::new(FileStore::new(
                self.root().join("store"),
                common::store::Transfer::from_config(&self.cfg.store),
            ));
            let (m, info) = crate::resolve(store.as_ref(), &self.cfg, id).await?;
            crate::stage(
                &self.cfg,
                store,
                &m,
                &info,
                crate::StageDir {
                    dir: &staging,
                    owner: None,
                    cancel,
                    in_place: None,
                    reuse: None,
                },
                &Silent,
            )
            .await?;
            anyhow::Ok(())
        }
        .await
    }

    /// Everything under the rig's directory outside `stage/` and `store/`,
    /// with contents: it must never change.
    pub fn outside(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        for e in walkdir::WalkDir::new(self.root()).follow_links(false) {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(self.root()).unwrap().to_path_buf();
            if rel.starts_with("stage") || rel.starts_with("store") {
                continue;
            }
            let data = if e.file_type().is_file() {
                std::fs::read(e.path()).unwrap()
            } else {
                Vec::new()
            };
            out.insert(rel, data);
        }
        out
    }

    /// Every link the staged copy holds resolves inside the staging directory.
    pub fn staged_links_stay_inside(&self) {
        let staging = self.root().join("stage/s").canonicalize().unwrap();
        for e in walkdir::WalkDir::new(&staging).follow_links(false) {
            let Ok(e) = e else { continue };
            if !e.path_is_symlink() {
                continue;
            }
            if let Ok(to) = e.path().canonicalize() {
                assert!(
                    to.starts_with(&staging),
                    "{} resolves to {}",
                    e.path().display(),
                    to.display()
                );
            }
        }
    }
}

fn code(r: &anyhow::Result<()>) -> ExitCode {
    common::cli::exit_code_of(r.as_ref().expect_err("refused"))
}

fn archive_error(r: &anyhow::Result<()>) -> Option<&ArchiveError> {
    r.as_ref()
        .err()?
        .chain()
        .find_map(|e| e.downcast_ref::<ArchiveError>())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_cancelled_stage_stops_at_its_first_read_and_writes_nothing() {
    rt().block_on(async {
        let mut rig = Rig::new();
        let m = rig.backup(&["mysql"], &[dir("mysql"), file("mysql/t.ibd", b"rows")]);
        let before = rig.outside();
        let cancel = std::sync::atomic::AtomicBool::new(true);
        let err = rig.try_stage(&m.backup_id, &cancel).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("interrupted by a signal"),
            "{err:#}"
        );
        let staged = rig.root().join("stage/s");
        assert_eq!(std::fs::read_dir(&staged).unwrap().count(), 0);
        assert_eq!(rig.outside(), before);
    });
}

#[test]
fn a_plain_backup_round_trips() {
    rt().block_on(async {
        let mut rig = Rig::new();
        let long = format!("mysql/{}/t.ibd", "d".repeat(150));
        let m = rig.backup(
            &["mysql", "binlogs"],
            &[
                dir("mysql"),
                dir("mysql/db"),
                file("mysql/db/t.ibd", b"rows"),
                file("mysql/auto.cnf", b"[auto]\nserver-uuid=x\n"),
                file(&long, b"long"),
                file("mysql/binlog.index", b"/src/binlogs/binlog.000001\n"),
                dir("binlogs"),
                file("binlogs/binlog.000001", b"events"),
                link("mysql/db/l", "t.ibd"),
            ],
        );
        let before = rig.outside();
        let (v, s) = rig.try_both(&m.backup_id).await;
        v.unwrap();
        s.unwrap();
        let st = rig.root().join("stage/s");
        assert_eq!(std::fs::read(st.join("mysql/db/t.ibd")).unwrap(), b"rows");
        assert_eq!(std::fs::read(st.join(&long)).unwrap(), b"long");
        assert!(!st.join("mysql/auto.cnf").exists(), "clone hygiene");
        assert_eq!(
            std::fs::read_to_string(st.join("mysql/binlog.index")).unwrap(),
            format!("{}/vol/binlogs/binlog.000001\n", rig.root().display())
        );
        assert_eq!(
            std::fs::read_link(st.join("mysql/db/l")).unwrap(),
            Path::new("t.ibd")
        );
        assert_eq!(rig.outside(), before);
        // every codec
        for c in [Compression::Xz, Compression::None] {
            let tar = tar_of(&[dir("mysql"), file("mysql/f", b"x")]);
            let stored = compress(&tar, c);
            let m = rig.manifest(&["mysql"], &tar, &stored, c);
            rig.plant(&m, &stored, |t| t);
            let (v, s) = rig.try_both(&m.backup_id).await;
            v.unwrap();
            s.unwrap();
        }
    });
}

/// Zero blocks (InnoDB's preallocated extents, a redo log's unused part)
/// are allocated, not written: the staged file has the same length and
/// bytes, and its zero range reads as a hole (no data written), which a
/// file written whole would not have.
#[test]
fn zero_blocks_are_staged_unwritten_with_the_same_bytes() {
    use common::archive::tree::ZERO_BLOCK;
    use nix::unistd::{lseek, Whence};
    use sha2::Digest;
    rt().block_on(async {
        let mut rig = Rig::new();
        // Data, 4 zero blocks from an unaligned offset, data, a zero tail
        // that ends off a block boundary.
        let mut sparse = vec![7u8; 1000];
        sparse.resize(1000 + 4 * ZERO_BLOCK, 0);
        sparse.extend_from_slice(&[9u8; 3000]);
        sparse.resize(sparse.len() + 2 * ZERO_BLOCK + 5, 0);
        let dense: Vec<u8> = (0..3 * ZERO_BLOCK).map(|i| (i % 251) as u8 | 1).collect();
        let m = rig.backup(
            &["mysql"],
            &[
                dir("mysql"),
                file("mysql/ib_logfile0", &sparse),
                file("mysql/t.ibd", &dense),
            ],
        );
        rig.try_stage(&m.backup_id, &std::sync::atomic::AtomicBool::new(false))
            .await
            .unwrap();
        let st = rig.root().join("stage/s/mysql");
        let hole = |name: &str| {
            let f = std::fs::File::open(st.join(name)).unwrap();
            lseek(&f, 0, Whence::SeekHole).unwrap() as u64
        };
        // Before reading: zeros read into the page cache count as data.
        // The first whole zero block starts at the first aligned offset.
        assert_eq!(
            hole("ib_logfile0"),
            ZERO_BLOCK as u64,
            "zero blocks written"
        );
        assert_eq!(hole("t.ibd"), dense.len() as u64, "data left out");
        for (name, want) in [("ib_logfile0", &sparse), ("t.ibd", &dense)] {
            let got = std::fs::read(st.join(name)).unwrap();
            assert_eq!(got.len(), want.len(), "{name}: length");
            assert_eq!(
                sha2::Sha256::digest(&got),
                sha2::Sha256::digest(want),
                "{name}: SHA-256"
            );
        }
    });
}

/// An indexed backup through the real wiring (the index read by size and
/// SHA-256, parsed, frames fetched by range from the file store): it
/// round-trips; a forged index the manifest binds is refused before
/// anything is written; an index that is missing, or is not the one the
/// manifest binds, is exit 4; a signal stops it at once.
#[test]
fn indexed_backups_round_trip_and_forged_indexes_touch_nothing() {
    rt().block_on(async {
        let mut rig = Rig::new();
        let big: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let entries = [
            dir("mysql"),
            dir("mysql/db"),
            file("mysql/db/t.ibd", &big),
            file("mysql/binlog.index", b"/src/mysql/binlog.000001\n"),
            file(&format!("mysql/{}", "l".repeat(120)), b"long"),
            link("mysql/db/l", "t.ibd"),
        ];
        let m = rig.indexed(&["mysql"], &entries, 1024, |_| {});
        let before = rig.outside();
        let (v, s) = rig.try_both(&m.backup_id).await;
        v.unwrap();
        s.unwrap();
        let st = rig.root().join("stage/s");
        assert_eq!(std::fs::read(st.join("mysql/db/t.ibd")).unwrap(), big);
        assert_eq!(
            std::fs::read_link(st.join("mysql/db/l")).unwrap(),
            Path::new("t.ibd")
        );
        assert_eq!(rig.outside(), before);

        let cancel = std::sync::atomic::AtomicBool::new(true);
        let err = rig.try_stage(&m.backup_id, &cancel).await.unwrap_err();
        assert!(format!("{err:#}").contains("interrupted by a signal"), "{err:#}");
        assert_eq!(std::fs::read_dir(&st).unwrap().count(), 0);

        type Forge = fn(&mut Index);
        let forgeries: &[(&str, Forge, &str)] = &[
            ("escape", |i| i.entries[2].path = "mysql/../../outside/canary".into(), "'..'"),
            ("absolute", |i| i.entries[2].path = "/tmp/mysnap-forged".into(), "absolute"),
            ("link out", |i| {
                let l = i.entries.iter_mut().find(|e| e.link.is_some()).unwrap();
                l.link = Some("../../../outside".into());
            }, "leaves"),
            ("chunk elsewhere", |i| i.entries[2].chunks[0].frame = 0, "inside its frame"),
        ];
        for (what, forge, says) in forgeries {
            let m = rig.indexed(&["mysql"], &entries, 1024, forge);
            let (v, s) = rig.try_both(&m.backup_id).await;
            for r in [&v, &s] {
                assert_eq!(code(r), ExitCode::Integrity, "{what}: {r:?}");
                let msg = format!("{:#}", r.as_ref().unwrap_err());
                assert!(msg.contains(says), "{what}: {msg}");
            }
            assert_eq!(std::fs::read_dir(&st).unwrap().count(), 0, "{what}");
            assert_eq!(rig.outside(), before, "{what}");
        }
        assert!(!Path::new("/tmp/mysnap-forged").exists());

        // The index changed after the manifest was written; then gone.
        let m = rig.indexed(&["mysql"], &entries, 1024, |_| {});
        let ix = rig.root().join("store").join(&m.archive.as_ref().unwrap().index.as_ref().unwrap().key);
        let mut bytes = std::fs::read(&ix).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&ix, &bytes).unwrap();
        let (v, s) = rig.try_both(&m.backup_id).await;
        for r in [&v, &s] {
            assert!(matches!(archive_error(r), Some(ArchiveError::ChecksumMismatch { url, .. }) if url.ends_with("index.json.zst")), "{r:?}");
        }
        std::fs::remove_file(&ix).unwrap();
        let (v, _) = rig.try_both(&m.backup_id).await;
        assert!(matches!(archive_error(&v), Some(ArchiveError::Missing { .. })), "{v:?}");
        assert_eq!(code(&v), ExitCode::Integrity);
    });
}

/// Encrypted and indexed (format 5): restored by ranges of age chunks; an
/// archive cut short by whole chunks, with one chunk changed, or sealed
/// from other frames is refused with exit 4 by verify and restore alike.
#[test]
fn encrypted_indexed_backups_round_trip_and_cut_or_changed_ones_touch_nothing() {
    rt().block_on(async {
        let mut rig = Rig::new();
        let to = rig.keys();
        // Bytes zstd cannot shrink: the archive spans several age chunks.
        let mut x = 0x9e37_79b9_u32;
        let big: Vec<u8> = (0..300_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let entries = [
            dir("mysql"),
            dir("mysql/db"),
            file("mysql/db/t.ibd", &big),
            file("mysql/binlog.index", b"/src/mysql/binlog.000001\n"),
        ];
        let m = rig.sealed(&to, &["mysql"], &entries, 64 << 10, |_| {});
        let before = rig.outside();
        let (v, s) = rig.try_both(&m.backup_id).await;
        v.unwrap();
        s.unwrap();
        let st = rig.root().join("stage/s");
        assert_eq!(std::fs::read(st.join("mysql/db/t.ibd")).unwrap(), big);

        type Forge = fn(&mut Vec<u8>);
        let forgeries: &[(&str, Forge, &[&str])] = &[
            (
                "cut by a whole chunk",
                |a| a.truncate(a.len() - (64 << 10) - 16),
                &["cut short", "decryption failed"],
            ),
            (
                "a chunk changed",
                |a| {
                    let mid = a.len() / 2;
                    a[mid] ^= 1
                },
                &["decryption failed"],
            ),
        ];
        for (what, forge, says) in forgeries {
            let m = rig.sealed(&to, &["mysql"], &entries, 64 << 10, forge);
            let (v, s) = rig.try_both(&m.backup_id).await;
            for r in [&v, &s] {
                assert_eq!(code(r), ExitCode::Integrity, "{what}: {r:?}");
                let msg = format!("{:#}", r.as_ref().unwrap_err());
                assert!(says.iter().any(|x| msg.contains(x)), "{what}: {msg}");
            }
            // (What was staged is the caller's to remove: restore does.)
            assert_eq!(rig.outside(), before, "{what}");
        }
    });
}

/// One forged archive per class: refused with exit 4 and the typed error,
/// by verify and by restore's staging, with nothing changed outside.
#[test]
fn forged_archives_are_refused_and_touch_nothing_outside() {
    type Check = fn(&ArchiveError) -> bool;
    let unsafe_: Check = |e| matches!(e, ArchiveError::Unsafe { .. });
    let too_large: Check = |e| matches!(e, ArchiveError::TooLarge { .. });
    let huge_name = Raw {
        claimed: Some(1 << 40),
        ..raw("././@LongLink", tar::EntryType::GNULongName, "", b"x")
    };
    let base = || vec![dir("mysql"), dir("mysql/d"), file("mysql/d/f", b"data")];
    let with = |extra: Vec<Raw>| {
        let mut v = base();
        v.extend(extra);
        v
    };
    let cases: Vec<(&str, Vec<Raw>, Check, &str)> = vec![
        (
            "absolute",
            with(vec![file("/tmp/mysnap-forged", b"x")]),
            unsafe_,
            "absolute",
        ),
        (
            "dotdot",
            with(vec![file("mysql/../outside/x", b"x")]),
            unsafe_,
            "'..'",
        ),
        (
            "outside paths",
            with(vec![file("outside/canary", b"x")]),
            unsafe_,
            "outside the archived",
        ),
        (
            "abs link",
            with(vec![link("mysql/l", "/etc")]),
            unsafe_,
            "absolute",
        ),
        (
            "up link",
            with(vec![link("mysql/l", "../outside")]),
            unsafe_,
            "leaves",
        ),
        (
            "link chain a->. b->a/..",
            with(vec![
                link("mysql/a", "."),
                link("mysql/b", "a/../../outside"),
            ]),
            unsafe_,
            "before the archive made it",
        ),
        (
            "link chain d/a->.. b->d/a/..",
            with(vec![link("mysql/d/a", ".."), link("mysql/b", "d/a/..")]),
            unsafe_,
            "link",
        ),
        (
            "write through a link",
            with(vec![link("mysql/l", "d"), file("mysql/l/x", b"x")]),
            unsafe_,
            "goes through the symbolic link",
        ),
        (
            "hard link out",
            with(vec![raw(
                "mysql/h",
                tar::EntryType::Link,
                "../outside/canary",
                b"",
            )]),
            unsafe_,
            "hard link",
        ),
        (
            "hard link in",
            with(vec![raw("mysql/h", tar::EntryType::Link, "mysql/d/f", b"")]),
            unsafe_,
            "hard link",
        ),
        (
            "device",
            with(vec![raw("mysql/null", tar::EntryType::Char, "", b"")]),
            unsafe_,
            "device",
        ),
        (
            "block",
            with(vec![raw("mysql/sda", tar::EntryType::Block, "", b"")]),
            unsafe_,
            "device",
        ),
        (
            "fifo",
            with(vec![raw("mysql/p", tar::EntryType::Fifo, "", b"")]),
            unsafe_,
            "fifo",
        ),
        (
            "pax",
            with(vec![raw(
                "mysql/x",
                tar::EntryType::XHeader,
                "",
                b"11 path=/x\n",
            )]),
            unsafe_,
            "pax",
        ),
        (
            "duplicate",
            with(vec![file("mysql/d/f", b"again")]),
            unsafe_,
            "replaces",
        ),
        ("root a link", vec![link("mysql", "/")], unsafe_, ""),
        (
            "giant long name",
            with(vec![huge_name]),
            too_large,
            "long name",
        ),
        (
            "long name past 4 KiB",
            with(vec![file(&format!("mysql/{}", "n".repeat(5000)), b"x")]),
            too_large,
            "long name",
        ),
    ];
    rt().block_on(async {
        let mut rig = Rig::new();
        let before = rig.outside();
        for (what, entries, check, needle) in cases {
            let m = rig.backup(&["mysql"], &entries);
            let (v, s) = rig.try_both(&m.backup_id).await;
            for (step, r) in [("verify", &v), ("restore", &s)] {
                let msg = format!("{:#}", r.as_ref().err().unwrap_or(&anyhow::anyhow!("ok")));
                assert_eq!(code(r), ExitCode::Integrity, "{what}: {step}: {msg}");
                let e = archive_error(r).unwrap_or_else(|| panic!("{what}: {step}: {msg}"));
                assert!(check(e), "{what}: {step}: {e:?}");
                assert!(msg.contains(needle), "{what}: {step}: {msg}");
            }
            assert_eq!(rig.outside(), before, "{what}");
        }
        assert!(!Path::new("/tmp/mysnap-forged").exists());
    });
}

/// Archives whose bytes disagree with their manifest.
#[test]
fn archives_that_disagree_with_their_manifest_are_refused() {
    rt().block_on(async {
        let mut rig = Rig::new();
        let before = rig.outside();
        let entries = [dir("mysql"), file("mysql/f", &[7u8; 100_000])];
        let tar = tar_of(&entries);
        let stored = compress(&tar, Compression::Zstd);
        type Case = (&'static str, fn(&mut Manifest, &mut Vec<u8>), &'static str);
        let cases: Vec<Case> = vec![
            (
                "flipped byte",
                |_, s| {
                    let mid = s.len() / 2;
                    s[mid] ^= 0x40
                },
                "",
            ),
            (
                "truncated",
                |_, s| s.truncate(s.len() / 2),
                "bytes, its manifest says",
            ),
            (
                "longer than declared (tar)",
                |m, _| m.archive.as_mut().unwrap().tar_size -= 512,
                "decompresses to more",
            ),
            (
                "shorter than declared (tar)",
                |m, _| m.archive.as_mut().unwrap().tar_size += 512,
                "truncated",
            ),
            (
                "more file bytes than declared",
                |m, _| m.archive.as_mut().unwrap().unpacked_size = 10,
                "file contents",
            ),
            (
                "more files than declared",
                |m, _| m.archive.as_mut().unwrap().files = 0,
                "files",
            ),
            (
                "another checksum",
                |m, _| m.archive.as_mut().unwrap().sha256 = "0".repeat(64).try_into().unwrap(),
                "SHA-256",
            ),
        ];
        for (what, edit, needle) in cases {
            let mut m = rig.manifest(&["mysql"], &tar, &stored, Compression::Zstd);
            let mut bytes = stored.clone();
            edit(&mut m, &mut bytes);
            // The manifest keeps the stored size unless the case changes the bytes.
            if what == "flipped byte" {
                m.archive.as_mut().unwrap().sha256 = sha(&stored).try_into().unwrap();
            }
            rig.plant(&m, &bytes, |t| t);
            let (v, s) = rig.try_both(&m.backup_id).await;
            for (step, r) in [("verify", &v), ("restore", &s)] {
                let msg = format!("{:#}", r.as_ref().err().unwrap_or(&anyhow::anyhow!("ok")));
                assert_eq!(code(r), ExitCode::Integrity, "{what}: {step}: {msg}");
                assert!(msg.contains(needle), "{what}: {step}: {msg}");
            }
            assert_eq!(rig.outside(), before, "{what}");
        }
    });
}

/// A corrupted tar header (no codec to notice it first) is corruption:
/// exit 4, named as such, not a failure to write.
#[test]
fn a_corrupted_tar_header_is_exit_4() {
    rt().block_on(async {
        let mut rig = Rig::new();
        let mut tar = tar_of(&[dir("mysql"), file("mysql/f", b"data")]);
        tar[512 + 3] ^= 0x20; // the second header's name
        let m = rig.manifest(&["mysql"], &tar, &tar, Compression::None);
        rig.plant(&m, &tar, |t| t);
        let (v, s) = rig.try_both(&m.backup_id).await;
        for r in [&v, &s] {
            assert_eq!(code(r), ExitCode::Integrity, "{r:?}");
            assert!(
                matches!(archive_error(r), Some(ArchiveError::Corrupt { .. })),
                "{r:?}"
            );
        }
    });
}

/// Manifests made hostile field by field: the backup is refused (exit 4),
/// `list` skips it with the others still listed, and `latest` is not fooled.
#[test]
fn hostile_manifests_are_refused_and_do_not_break_list() {
    rt().block_on(async {
        let mut rig = Rig::new();
        let good = rig.backup(&["mysql"], &[dir("mysql"), file("mysql/f", b"x")]);
        let tar = tar_of(&[dir("mysql"), file("mysql/f", b"x")]);
        let stored = compress(&tar, Compression::Zstd);
        let cases: &[(&str, &str)] = &[
            ("datadir = \"mysql\"", "datadir = \"/etc\""),
            ("paths = [\"mysql\"]", "paths = [\"../../etc\"]"),
            ("key = \"db1/", "key = \"/etc/shadow\"\nx = \"db1/"),
            ("format_version = 1", "format_version = 7"),
            (
                "file = \"binlog.000001\"",
                "file = \"binlog'; DROP DATABASE mysql; --\"",
            ),
            ("name = \"db1\"", "name = \"db2\""),
        ];
        let mut forged = Vec::new();
        for (from, to) in cases {
            let m = rig.manifest(&["mysql"], &tar, &stored, Compression::Zstd);
            rig.plant(&m, &stored, |t| {
                assert!(t.contains(from), "{from}");
                t.replacen(from, to, 1)
            });
            forged.push(m.backup_id.clone());
        }
        // Not a manifest at all, and one claiming a far-future id under its own key.
        let junk = rig.manifest(&["mysql"], &tar, &stored, Compression::Zstd);
        rig.plant(&junk, &stored, |_| "\u{0}\u{1}garbage".into());
        forged.push(junk.backup_id.clone());
        let mut future = rig.manifest(&["mysql"], &tar, &stored, Compression::Zstd);
        future.backup_id = BackupId::parse("29991231T235959Z").unwrap();
        future.archive.as_mut().unwrap().key =
            common::archive::keys::archive(&future.name, &future.backup_id, Compression::Zstd);
        rig.plant(&future, &stored, |t| t);
        forged.push(future.backup_id.clone());
        for id in &forged {
            let (v, s) = rig.try_both(id).await;
            assert_eq!(code(&v), ExitCode::Integrity, "verify {id}: {v:?}");
            assert_eq!(code(&s), ExitCode::Integrity, "restore {id}: {s:?}");
        }
        let listed: Vec<String> = crate::list(&rig.cfg)
            .await
            .unwrap()
            .iter()
            .map(|m| m.backup_id.to_string())
            .collect();
        assert!(listed.contains(&good.backup_id.to_string()), "{listed:?}");
        for id in &forged {
            assert!(!listed.contains(&id.to_string()), "{id} listed: {listed:?}");
        }
        // `latest` is the newest that parses, not the forged future one.
        let (v, _) = rig.try_both("latest").await;
        v.unwrap();
        // A manifest larger than any real one is refused before it is read.
        let big = rig.manifest(&["mysql"], &tar, &stored, Compression::Zstd);
        rig.plant(&big, &stored, |t| format!("{t}\n#{}", "x".repeat(2 << 20)));
        let (v, _) = rig.try_both(&big.backup_id).await;
        assert_eq!(code(&v), ExitCode::Integrity, "{v:?}");
    });
}

mod random {
    use super::*;
    use proptest::prelude::*;

    /// Names from a small alphabet, so entries meet each other often.
    fn name() -> impl Strategy<Value = String> {
        let comp = prop::sample::select(vec![
            "a",
            "b",
            "d",
            "..",
            ".",
            "",
            "binlog.index",
            "auto.cnf",
            "mysql",
        ]);
        (
            prop::sample::select(vec!["mysql", "mysql/d", "", "mysql/a", "/tmp", "binlogs"]),
            prop::collection::vec(comp, 0..3),
        )
            .prop_map(|(start, rest)| {
                let mut p = start.to_string();
                for c in rest {
                    p.push('/');
                    p.push_str(c);
                }
                p
            })
    }

    fn target() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(vec![
                "..", "..", "..", ".", "a", "b", "d", "mysql", "outside", "canary", "",
            ]),
            1..5,
        )
        .prop_map(|v| v.join("/"))
    }

    fn entry() -> impl Strategy<Value = Raw> {
        prop_oneof![
            name().prop_map(|n| dir(&n)),
            name().prop_map(|n| file(&n, b"/etc/shadow\n../outside/canary\n")),
            (name(), target()).prop_map(|(n, t)| link(&n, &t)),
            (name(), target()).prop_map(|(n, t)| link(&n, &format!("/{t}"))),
            (name(), target()).prop_map(|(n, t)| raw(&n, tar::EntryType::Link, &t, b"")),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]
        /// Whatever the entries, nothing outside the staging directory
        /// changes, no staged link resolves outside it, and verify and
        /// restore agree.
        #[test]
        fn nothing_is_ever_created_outside(entries in prop::collection::vec(entry(), 1..12)) {
            let entries: Vec<Raw> = std::iter::once(dir("mysql")).chain(entries).collect();
            rt().block_on(async {
                let mut rig = Rig::new();
                let before = rig.outside();
                let m = rig.backup(&["mysql", "binlogs"], &entries);
                let (v, s) = rig.try_both(&m.backup_id).await;
                assert_eq!(rig.outside(), before, "{entries:?}");
                rig.staged_links_stay_inside();
                match (&v, &s) {
                    (Ok(()), Ok(())) => {}
                    // Only restore knows where the copy goes, so only it can
                    // refuse a binary log index naming a file outside it.
                    (Ok(()), Err(e)) if format!("{e:#}").contains("the binary log index") => {
                        assert_eq!(code(&s), ExitCode::Integrity, "{s:?}");
                    }
                    (Ok(()), Err(e)) => panic!("restore refused what verify took: {e:#}"),
                    (Err(_), Err(_)) => {
                        assert_eq!(code(&v), ExitCode::Integrity, "{v:?}");
                        assert_eq!(code(&s), ExitCode::Integrity, "{s:?}");
                    }
                    (Err(e), Ok(())) => panic!("verify refused what restore took: {e:#}"),
                }
            });
        }
    }
}
