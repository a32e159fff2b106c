//! Point-in-time recovery: `restorer restore --until TIME|latest` rolls the
//! staged backup forward with archived binary logs, **before** the swap.
//!
//! The segments the backup needs ([`common::binlog::chain`]: from its
//! binary log file and position on, a gap refused with the missing range)
//! are downloaded into the staging directory (size and SHA-256 checked
//! against their metadata, then decompressed), a throwaway server is started
//! on the staged data directory (the drill's: `--no-defaults`, its socket
//! in a 0700 directory, no network, no binary log, no replication, so it
//! writes no GTID of its own), `mariadb-binlog --start-position=<the
//! backup's position> <files> [--stop-position]` (the start of the first
//! transaction past the target, by [`common::binlog::stop_in`]) is piped into `mariadb`
//! connected to it, and the server is shut down cleanly. Only then does the
//! restore stop the live server and swap: a replay that fails or is killed
//! leaves nothing but the staging directory, which every later restore
//! (and `restorer recover`) removes, its server first. The live server is
//! down only for the swap, however long the replay takes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use common::binlog::{SegmentMeta, Target};
use common::config::Config;
use common::manifest::Manifest;
use common::signal::Interrupt;
use common::store::Store;
use sha2::Digest;

use crate::drill::{Scratch, Server};

/// The directory inside the staging directory the replay works in.
pub const REPLAY_DIR: &str = ".mysnap-replay";

/// Both ends of the replay take statements up to the server's largest.
const MAX_PACKET: &str = "--max-allowed-packet=1073741824";

/// The test hook's point: the throwaway server runs on the staged data,
/// nothing replayed yet.
pub const PAUSE_REPLAY: &str = "replay";

/// What a restore replays.
#[derive(Debug, Clone)]
pub struct Replay {
    pub target: Target,
    pub segments: Vec<SegmentMeta>,
    /// The identities encrypted segments are opened with.
    pub identities: Option<Arc<common::crypt::Identities>>,
}

impl Replay {
    /// With `ids` for the encrypted segments: every segment's recipients
    /// checked now, before anything changes (exit 4 naming both sides).
    pub fn with_identities(
        mut self,
        ids: Option<common::crypt::Identities>,
    ) -> anyhow::Result<Replay> {
        for s in &self.segments {
            common::crypt::check_keys(s.encryption.as_ref(), ids.as_ref()).map_err(|why| {
                common::error::integrity_err(format!(
                    "binary log segment {} of server {} cannot be opened: {why}",
                    s.file, s.server_id
                ))
            })?;
        }
        self.identities = ids.map(Arc::new);
        Ok(self)
    }
}

/// What a replay did.
#[derive(Debug, Clone, Default)]
pub struct Replayed {
    /// Bytes of binary log read, from the backup's position on.
    pub bytes: u64,
    /// Transactions in the segments replayed (an upper bound with a time target).
    pub transactions: u64,
    pub download_secs: f64,
    pub apply_secs: f64,
    /// Where the replay stopped in the backed-up server's binary log.
    pub stop: StopPoint,
}

/// Where a replay stopped: the next transaction of the backed-up server's
/// binary log it did not apply (file and offset, the end of the last file
/// when it applied all), and the last transaction of each GTID domain it
/// applied. A replica set up after the replay starts here.
#[derive(Debug, Clone, Default)]
pub struct StopPoint {
    pub file: String,
    pub position: u64,
    pub last: Vec<common::binlog::Gtid>,
}

/// Chooses the segments that roll backup `m` forward to `target`.
pub async fn plan(
    store: &dyn Store,
    m: &Manifest,
    target: &Target,
    auth: Option<&common::crypt::AuthKey>,
) -> anyhow::Result<Replay> {
    let b = m.binlog.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "backup {} recorded no binary log position (its server ran without log_bin): it cannot be rolled forward; restore it without --until",
            m.backup_id
        )
    })?;
    if let Target::Time(t) = target {
        anyhow::ensure!(
            *t >= m.snapshot_time(),
            "--until {} is before backup {}: choose an older backup",
            common::binlog::rfc3339(*t),
            m.backup_id
        );
    }
    if let Target::Gtid(g) = target {
        let in_backup = m.gtid.as_ref().is_some_and(|set| {
            set.split(',').any(|x| {
                common::binlog::Gtid::parse(x.trim())
                    .is_ok_and(|b| b.domain == g.domain && b.seq >= g.seq)
            })
        });
        anyhow::ensure!(
            !in_backup,
            "--until-gtid {g} is in backup {} already (its GTID position is {}): choose an older backup",
            m.backup_id,
            m.gtid.as_deref().unwrap_or_default()
        );
    }
    let keys = store.list(&common::keys::binlogs_of(&m.name)).await?;
    let segments = crate::segments_in(store, &m.name, &keys, auth).await?;
    let chain = common::binlog::chain(
        &segments,
        m.server.server_id,
        &b.file,
        m.snapshot_time(),
        target,
    )?;
    tracing::info!(
        "replaying {} binary log segment(s) of server {} from {}:{}",
        chain.len(),
        m.server.server_id,
        b.file,
        b.position
    );
    Ok(Replay {
        target: target.clone(),
        segments: chain,
        identities: None,
    })
}

/// Rolls the data directory staged at `datadir` (of backup `m`) forward.
#[allow(clippy::too_many_arguments)]
pub async fn replay(
    cfg: &Config,
    store: Arc<dyn Store>,
    m: &Manifest,
    r: &Replay,
    staging: &Path,
    datadir: &Path,
    owner: Option<(u32, u32)>,
    timeout: Duration,
    int: &Interrupt,
) -> anyhow::Result<Replayed> {
    let b = m
        .binlog
        .as_ref()
        .expect("planned with a binary log position");
    let binary = crate::drill::server_binary(cfg)?;
    let dir = staging.join(REPLAY_DIR);
    let mut scratch = Scratch::create(&dir, owner)?;
    let logs = scratch.data();
    let mut out = Replayed::default();

    // Download: each segment checked against its metadata, then decompressed.
    let t = Instant::now();
    let mut files = Vec::new();
    for s in &r.segments {
        int.stop_if_set()?;
        files.push(download(store.as_ref(), m, s, r.identities.clone(), &logs).await?);
        out.bytes += s.size;
        out.transactions += s.transactions;
    }
    out.bytes = out.bytes.saturating_sub(b.position);
    out.download_secs = t.elapsed().as_secs_f64();

    // The throwaway server on the staged data directory.
    let server = Server {
        binary: binary.clone(),
        flavor: Some(m.server.flavor),
        owner,
        run_as: nix::unistd::geteuid()
            .is_root()
            .then(|| owner.map_or("root".to_string(), |(uid, _)| uid.to_string())),
        timeout,
    };
    // Row events of a large transaction come as one statement each.
    scratch.start(&server, datadir, &[MAX_PACKET.to_string()])?;
    let conn = scratch.wait_ready(timeout, int).await?;
    let _ = conn.disconnect().await;
    crate::restore::pause_at(PAUSE_REPLAY, Some(int));
    int.stop_if_set()?;

    let t = Instant::now();
    let mut argv: Vec<String> = vec![
        tool(&["mariadb-binlog", "mysqlbinlog"])?,
        "--no-defaults".into(),
        format!("--start-position={}", b.position),
    ];
    // Where to stop, by the segments' own events: before the first
    // transaction past the target, never inside one.
    let (paths, start, target) = (files.clone(), b.position, r.target.clone());
    let (used, stop_at, last) =
        tokio::task::spawn_blocking(move || stop_of(&paths, start, &target)).await??;
    if let Some(pos) = stop_at {
        argv.push(format!("--stop-position={pos}"));
    }
    let last_segment = r
        .segments
        .get(used.wrapping_sub(1))
        .context("no binary log segment to replay")?;
    out.stop = StopPoint {
        file: last_segment.file.to_string(),
        position: stop_at.unwrap_or(last_segment.size),
        last,
    };
    files.truncate(used);
    argv.extend(files.iter().map(|f| f.display().to_string()));
    let client: Vec<String> = vec![
        tool(&["mariadb", "mysql"])?,
        "--no-defaults".into(),
        format!("--socket={}", scratch.socket().display()),
        "--user=root".into(),
        "--binary-mode".into(),
        MAX_PACKET.into(),
    ];
    let flag = int.clone();
    tokio::task::spawn_blocking(move || pipe(&argv, &client, &flag)).await??;
    out.apply_secs = t.elapsed().as_secs_f64();
    // A clean shutdown: the replayed data is durable before the swap.
    scratch.stop_server();
    drop(scratch);
    let secs = out.apply_secs.max(1e-3);
    tracing::info!(
        "replayed {} of binary log ({} transactions at most) in {:.1}s: {}/s",
        bytesize::ByteSize(out.bytes),
        out.transactions,
        out.apply_secs,
        bytesize::ByteSize((out.bytes as f64 / secs) as u64)
    );
    Ok(out)
}

/// How many of `files` (in order; the first read from the backup's
/// position `start`) a replay to `target` reads, the offset in the last of
/// them to stop at (`None`: its end), and the last transaction of each
/// domain it applies.
fn stop_of(
    files: &[PathBuf],
    start: u64,
    target: &Target,
) -> anyhow::Result<(usize, Option<u64>, Vec<common::binlog::Gtid>)> {
    let mut last: Vec<common::binlog::Gtid> = Vec::new();
    for (i, path) in files.iter().enumerate() {
        let size = std::fs::metadata(path)?.len();
        let f = std::io::BufReader::new(std::fs::File::open(path)?);
        let from = if i == 0 { start } else { 4 };
        let stop = common::binlog::stop_in(f, size, from, target)
            .with_context(|| format!("cannot read binary log {}", path.display()))?;
        for g in stop.last {
            match last.iter_mut().find(|l| l.domain == g.domain) {
                Some(l) => *l = g,
                None => last.push(g),
            }
        }
        if stop.at.is_some() {
            return Ok((i + 1, stop.at, last));
        }
    }
    Ok((files.len(), None, last))
}

/// The first of `names` found in `PATH` (or /usr/bin).
fn tool(names: &[&str]) -> anyhow::Result<String> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push("/usr/bin".into());
    names
        .iter()
        .flat_map(|n| dirs.iter().map(move |d| d.join(n)))
        .find(|p| p.is_absolute() && p.is_file())
        .map(|p| p.display().to_string())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no {} in PATH or /usr/bin: install the server's client programs (mariadb-client)",
                names.join(" or ")
            )
        })
}

/// `decoder | client`, both bounded by the interrupt flag; the error names
/// the program that failed and its stderr.
fn pipe(decoder: &[String], client: &[String], int: &Interrupt) -> anyhow::Result<()> {
    let mut dec = Command::new(&decoder[0])
        .args(&decoder[1..])
        .env("TZ", "UTC")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", decoder[0]))?;
    let mut cli = Command::new(&client[0])
        .args(&client[1..])
        .stdin(dec.stdout.take().expect("piped"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", client[0]))?;
    // Both stderrs drained as they come (a full pipe would block the
    // program writing to it); the last 4 KiB of each kept for the error.
    let drain = |e: Option<std::process::ChildStderr>| {
        std::thread::spawn(move || {
            let mut tail: Vec<u8> = Vec::new();
            if let Some(mut e) = e {
                let mut buf = [0u8; 8192];
                while let Ok(n) = std::io::Read::read(&mut e, &mut buf) {
                    if n == 0 {
                        break;
                    }
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > 8192 {
                        tail.drain(..tail.len() - 4096);
                    }
                }
            }
            common::drill::text(String::from_utf8_lossy(&tail).trim()).to_string()
        })
    };
    let (dec_err, cli_err) = (drain(dec.stderr.take()), drain(cli.stderr.take()));
    let (mut dec_done, mut cli_done) = (None, None);
    while dec_done.is_none() || cli_done.is_none() {
        if int.is_set() {
            let _ = dec.kill();
            let _ = cli.kill();
            let _ = dec.wait();
            let _ = cli.wait();
            return Err(common::signal::Interrupted.into());
        }
        if dec_done.is_none() {
            dec_done = dec.try_wait()?;
        }
        if cli_done.is_none() {
            cli_done = cli.try_wait()?;
            // The client gone: the decoder would block on a pipe no one reads.
            if cli_done.is_some() && dec_done.is_none() {
                let _ = dec.kill();
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let dec_text = dec_err.join().unwrap_or_default();
    let cli_text = cli_err.join().unwrap_or_default();
    let (dec_status, cli_status) = (dec_done.expect("done"), cli_done.expect("done"));
    if !cli_status.success() {
        anyhow::bail!(
            "replaying the binary logs failed: {} exited with {cli_status}: {}; the live server and its data were not touched",
            client[0],
            cli_text
        );
    }
    if !dec_status.success() {
        anyhow::bail!(
            "replaying the binary logs failed: {} exited with {dec_status}: {}; the live server and its data were not touched",
            decoder[0],
            dec_text
        );
    }
    Ok(())
}

/// Downloads segment `s` into `dir` as its file name: the stored bytes
/// checked (size, SHA-256) against the metadata, then decompressed.
async fn download(
    store: &dyn Store,
    m: &Manifest,
    s: &SegmentMeta,
    ids: Option<Arc<common::crypt::Identities>>,
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    let key = s.segment().data_key(&m.name);
    let url = store.url(&key);
    let zst = dir.join(format!("{}.zst", s.file));
    let mut f =
        std::fs::File::create(&zst).with_context(|| format!("cannot create {}", zst.display()))?;
    let mut sha = sha2::Sha256::new();
    let part = store.transfer().download().0.max(1 << 20);
    let mut off = 0;
    while off < s.stored_size {
        let end = (off + part).min(s.stored_size);
        let bytes = store.get_range(&key, off..end).await?;
        anyhow::ensure!(
            bytes.len() as u64 == end - off,
            "{url}: the store sent {} bytes for range {off}..{end}",
            bytes.len()
        );
        sha.update(&bytes);
        f.write_all(&bytes)?;
        off = end;
    }
    if store.size(&key).await? != Some(s.stored_size) {
        return Err(common::error::integrity_err(format!(
            "{url} is not the {} bytes its metadata records: refused",
            s.stored_size
        )));
    }
    if hex::encode(sha.finalize()) != s.sha256.as_str() {
        return Err(common::error::integrity_err(format!(
            "{url} does not match the SHA-256 its metadata records: refused"
        )));
    }
    f.sync_all()?;
    let out = dir.join(s.file.as_str());
    let (from, to) = (zst.clone(), out.clone());
    let (size, encryption) = (s.size, s.encryption.clone());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let src = std::fs::File::open(&from)?;
        let src = common::crypt::open(src, encryption.as_ref(), ids.as_deref())
            .map_err(anyhow::Error::msg)?;
        let mut dec = zstd::stream::read::Decoder::new(src)?;
        let mut dst = std::fs::File::create(&to)?;
        // At most the size recorded, plus one byte to notice more.
        let n = std::io::copy(&mut std::io::Read::take(&mut dec, size + 1), &mut dst)?;
        anyhow::ensure!(n == size, "decompressed to {n} bytes, not {size}");
        std::fs::remove_file(&from)?;
        Ok(())
    })
    .await?
    .map_err(|e| common::error::integrity_err(format!("{url}: {e:#}")))?;
    Ok(out)
}
