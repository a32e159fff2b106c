//! Timing primitives: a cold page cache, medians, wall times of shell
//! pipelines, peak RSS of a process.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mysnap_tests::{MariaDb, MariaOpts};

pub fn drop_caches() {
    let _ = Command::new("sync").status();
    if std::fs::write("/proc/sys/vm/drop_caches", "3").is_err() {
        eprintln!("bench: cannot drop the page cache (not root?): figures are warm");
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

/// Runs `cmd` to success, sampling its peak RSS (VmHWM, KiB) until it exits.
pub fn measured(cmd: &mut Command) -> u64 {
    let mut child = cmd.spawn().expect("spawn");
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    let status = loop {
        if let Ok(s) = std::fs::read_to_string(&status_path) {
            if let Some(kib) = s
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
            {
                peak = kib;
            }
        }
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{cmd:?} failed: {status}");
    peak
}

/// Runs a bash pipeline (pipefail) from a dropped page cache; its wall time.
pub fn shell_time(script: &str) -> Result<f64, String> {
    drop_caches();
    let t = Instant::now();
    let out = Command::new("bash")
        .args(["-o", "pipefail", "-c", script])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("").to_string();
        eprintln!("bench: `{script}` failed: {err}");
        return Err(format!("failed: {last}"));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// `script`'s time plus starting a server on `datadir` until it answers.
pub fn until_answering(datadir: &Path, script: &str) -> Result<f64, String> {
    let t = shell_time(script)?;
    let s = Instant::now();
    let server = MariaDb::start(datadir, MariaOpts::default());
    let t = t + s.elapsed().as_secs_f64();
    drop(server);
    Ok(t)
}

/// Median over `runs` of `f`, each preceded by `setup`; the first error ends it.
pub fn timed(
    runs: usize,
    mut setup: impl FnMut(),
    mut f: impl FnMut() -> Result<f64, String>,
) -> Result<f64, String> {
    let mut v = Vec::new();
    for _ in 0..runs {
        setup();
        v.push(f()?);
    }
    Ok(median(v))
}

pub fn du(path: &Path) -> u64 {
    walkdir::WalkDir::new(path)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

pub fn fresh_dir(path: &Path) {
    let _ = std::fs::remove_dir_all(path);
    std::fs::create_dir_all(path).unwrap();
}
