//! Prometheus textfile metrics (README, Operations, "Metrics"): after each
//! job run, one file per (backup name, job kind) in `metrics.textfile_dir`,
//! `mysnap_<name>_<kind>.prom`, for node_exporter's textfile collector.
//!
//! The one entry point is [`track`] (or [`record`] when the start and the
//! end are apart): every program's job goes through it, and it never fails
//! the job: a file that cannot be written is a warning, the job's own exit
//! code stands. The file is replaced atomically (mode 0644, the collector
//! runs as another user), so the collector never reads a partial file.
//!
//! The text exposition format is rendered here by hand: a handful of gauges
//! with two labels are ~40 lines, while the `prometheus` and
//! `prometheus-client` crates bring a registry, atomics and (the latter) the
//! OpenMetrics dialect, and neither reads a file back, which a failed run
//! must do to keep the last success.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use crate::config::Config;
use crate::error::ExitCode;

/// The file mode: node_exporter runs as its own user. Metrics hold names,
/// times, sizes and counts, nothing secret.
pub const FILE_MODE: u32 = 0o644;

/// The most of an earlier metrics file read back (ours are about 2 KiB).
const MAX_PREVIOUS: u64 = 64 * 1024;

/// What ran: the `kind` label and the file name's last part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// snapshotter + archiver (the archiver's end; the snapshotter when it fails).
    Backup,
    /// `restorer prune --apply`.
    Prune,
    /// `restorer verify`.
    Verify,
    /// `restorer drill`.
    Drill,
    /// Each cycle of `archiver binlogs`.
    Binlogs,
}

impl Job {
    pub fn as_str(self) -> &'static str {
        match self {
            Job::Backup => "backup",
            Job::Prune => "prune",
            Job::Verify => "verify",
            Job::Drill => "drill",
            Job::Binlogs => "binlogs",
        }
    }
}

/// Every metric mysnap writes. The run metrics are in every file; the
/// others only in their job's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    LastRunTimestamp,
    LastSuccessTimestamp,
    LastExitCode,
    LastDuration,
    BackupBytes,
    BackupUnpackedBytes,
    BackupFiles,
    BackupLockWait,
    BackupLockHold,
    BackupSnapshotCowUsed,
    PruneKept,
    PruneRemoved,
    PruneGarbageRemoved,
    PruneUnreadable,
    VerifyBytes,
    VerifyUnpackedBytes,
    BinlogsShipped,
    BinlogsNewestEvent,
    BinlogsLastGap,
}

impl Metric {
    /// In the order they are written.
    pub const ALL: [Metric; 19] = [
        Metric::LastRunTimestamp,
        Metric::LastSuccessTimestamp,
        Metric::LastExitCode,
        Metric::LastDuration,
        Metric::BackupBytes,
        Metric::BackupUnpackedBytes,
        Metric::BackupFiles,
        Metric::BackupLockWait,
        Metric::BackupLockHold,
        Metric::BackupSnapshotCowUsed,
        Metric::PruneKept,
        Metric::PruneRemoved,
        Metric::PruneGarbageRemoved,
        Metric::PruneUnreadable,
        Metric::VerifyBytes,
        Metric::VerifyUnpackedBytes,
        Metric::BinlogsShipped,
        Metric::BinlogsNewestEvent,
        Metric::BinlogsLastGap,
    ];

    pub fn name(self) -> &'static str {
        self.describe().0
    }

    /// Name, HELP text, and the job it belongs to (`None`: every job). The
    /// HELP text is the same in every file: the collector refuses a metric
    /// whose files disagree.
    fn describe(self) -> (&'static str, &'static str, Option<Job>) {
        use Metric::*;
        match self {
            LastRunTimestamp => ("mysnap_last_run_timestamp_seconds", "When the last run of the job ended (Unix time).", None),
            LastSuccessTimestamp => ("mysnap_last_success_timestamp_seconds", "When the last successful run of the job ended (Unix time).", None),
            LastExitCode => ("mysnap_last_exit_code", "Exit code of the last run of the job (0 success; see README, Exit codes).", None),
            LastDuration => ("mysnap_last_duration_seconds", "How long the last run of the job took.", None),
            BackupBytes => ("mysnap_backup_bytes", "Size of the last successful backup's stored archive.", Some(Job::Backup)),
            BackupUnpackedBytes => ("mysnap_backup_unpacked_bytes", "Bytes of file data in the last successful backup.", Some(Job::Backup)),
            BackupFiles => ("mysnap_backup_files", "Regular files in the last successful backup.", Some(Job::Backup)),
            BackupLockWait => ("mysnap_backup_lock_wait_seconds", "Seconds the last successful backup waited for its lock.", Some(Job::Backup)),
            BackupLockHold => ("mysnap_backup_lock_hold_seconds", "Seconds commits were blocked by the last successful backup's lock.", Some(Job::Backup)),
            BackupSnapshotCowUsed => ("mysnap_backup_snapshot_cow_used_ratio", "Share of the LVM snapshot's copy-on-write space used at the end of the last successful backup.", Some(Job::Backup)),
            PruneKept => ("mysnap_prune_kept", "Complete backups the last successful prune kept.", Some(Job::Prune)),
            PruneRemoved => ("mysnap_prune_removed", "Complete backups the last successful prune deleted.", Some(Job::Prune)),
            PruneGarbageRemoved => ("mysnap_prune_garbage_removed", "Archives without a manifest the last successful prune deleted.", Some(Job::Prune)),
            PruneUnreadable => ("mysnap_prune_unreadable", "Manifests the last successful prune could not read (never deleted).", Some(Job::Prune)),
            VerifyBytes => ("mysnap_verify_bytes", "Bytes of stored archive the last successful verify read and checked.", Some(Job::Verify)),
            VerifyUnpackedBytes => ("mysnap_verify_unpacked_bytes", "Bytes of file data the last successful verify checked.", Some(Job::Verify)),
            BinlogsShipped => ("mysnap_binlogs_shipped", "Binary log segments the last cycle of archiver binlogs shipped.", Some(Job::Binlogs)),
            BinlogsNewestEvent => ("mysnap_binlogs_newest_event_timestamp_seconds", "Time of the last event of the newest binary log segment archiver binlogs shipped (Unix time).", Some(Job::Binlogs)),
            BinlogsLastGap => ("mysnap_binlogs_last_gap_timestamp_seconds", "When archiver binlogs last found binary logs purged before they were shipped (Unix time).", Some(Job::Binlogs)),
        }
    }

    fn is_for(self, job: Job) -> bool {
        self.describe().2.is_none_or(|j| j == job)
    }

    fn is_run_metric(self) -> bool {
        self.describe().2.is_none()
    }
}

/// One value a job measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample(pub Metric, pub f64);

/// What a job's result contributes to its metrics file beyond the run
/// metrics (none by default).
pub trait Measured {
    fn samples(&self) -> Vec<Sample> {
        Vec::new()
    }
}

impl Measured for () {}

/// When a job started.
#[derive(Debug, Clone, Copy)]
pub struct Started(Instant);

impl Started {
    pub fn now() -> Started {
        Started(Instant::now())
    }
}

/// Runs `job` and records it: `metrics::track(&cfg, Job::Drill, drill(..)).await`.
pub async fn track<T: Measured>(
    cfg: &Config,
    job: Job,
    body: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let started = Started::now();
    let result = body.await;
    record(cfg, job, started, &result);
    result
}

/// Writes `job`'s metrics file for a run that began at `started` and ended
/// now with `result`, when `metrics.textfile_dir` is set. Never fails: a
/// file that cannot be written is one warning naming it and the fix.
pub fn record<T: Measured>(cfg: &Config, job: Job, started: Started, result: &anyhow::Result<T>) {
    let (code, samples) = match result {
        Ok(t) => (ExitCode::Success, t.samples()),
        Err(e) => (crate::cli::exit_code_of(e), Vec::new()),
    };
    record_samples(cfg, job, started, code, &samples);
}

/// [`record`] with the exit code and samples given: a failed run's
/// samples replace those kept from the earlier file (`archiver binlogs`
/// records when it found a gap in a cycle that fails for it).
pub fn record_samples(
    cfg: &Config,
    job: Job,
    started: Started,
    code: ExitCode,
    samples: &[Sample],
) {
    let Some(dir) = &cfg.metrics.textfile_dir else {
        return;
    };
    let run = Run {
        ended: unix_now(),
        duration: millis(started.0.elapsed().as_secs_f64()),
        exit_code: code as u8,
    };
    if let Err(e) = write(dir, &cfg.backup.name, job, &run, samples) {
        let outcome = match code {
            ExitCode::Success => "succeeded".to_string(),
            c => format!("failed with exit {}", c as u8),
        };
        tracing::warn!(
            "{e:#}; the {} itself {outcome}; check that metrics.textfile_dir {} exists and this user may write to it",
            job.as_str(),
            dir.display()
        );
    }
}

/// The run metrics of one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Run {
    /// Unix time, seconds.
    pub ended: f64,
    pub duration: f64,
    pub exit_code: u8,
}

fn unix_now() -> f64 {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    millis(t.as_secs_f64())
}

/// Seconds rounded to milliseconds: shorter lines, nothing lost that matters.
fn millis(secs: f64) -> f64 {
    (secs * 1000.0).round() / 1000.0
}

/// `mysnap_<name>_<kind>.prom`.
pub fn file_path(dir: &Path, name: &str, job: Job) -> PathBuf {
    dir.join(format!("mysnap_{name}_{}.prom", job.as_str()))
}

/// Writes the file of (`name`, `job`) in `dir` for `run`. A failed run
/// keeps the earlier file's last success and job metrics (they describe
/// the last successful run); a successful one replaces them.
pub fn write(
    dir: &Path,
    name: &str,
    job: Job,
    run: &Run,
    samples: &[Sample],
) -> anyhow::Result<PathBuf> {
    let path = file_path(dir, name, job);
    let mut values = vec![
        Sample(Metric::LastRunTimestamp, run.ended),
        Sample(Metric::LastExitCode, f64::from(run.exit_code)),
        Sample(Metric::LastDuration, run.duration),
    ];
    if run.exit_code == 0 {
        values.push(Sample(Metric::LastSuccessTimestamp, run.ended));
        values.extend_from_slice(samples);
    } else {
        let previous = read_previous(&path)
            .map(|text| parse(&text, name, job))
            .unwrap_or_default();
        values.extend_from_slice(samples);
        values.extend(previous.into_iter().filter(|s| {
            (!s.0.is_run_metric() || s.0 == Metric::LastSuccessTimestamp)
                && !samples.iter().any(|n| n.0 == s.0)
        }));
    }
    // A run killed mid-write left its temporary file: it does not pile up.
    for stale in crate::state::remove_stale_temps(&path) {
        tracing::info!("removed {}, left by a run that was killed", stale.display());
    }
    crate::state::write_atomic_with_mode(&path, render(name, job, &values).as_bytes(), FILE_MODE)
        .map_err(|e| anyhow::anyhow!("metrics not written: {e:#}"))?;
    Ok(path)
}

/// The samples of (`name`, `job`) in `dir`'s file as it is now (none when
/// there is none or it cannot be read): what a restarted long-running job
/// carries on from.
pub fn previous(dir: &Path, name: &str, job: Job) -> Vec<Sample> {
    read_previous(&file_path(dir, name, job))
        .map(|text| parse(&text, name, job))
        .unwrap_or_default()
}

/// The earlier file, if it is a regular file (never following a link),
/// read up to [`MAX_PREVIOUS`] bytes.
fn read_previous(path: &Path) -> Option<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(MAX_PREVIOUS).read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The text exposition format: HELP, TYPE and one sample per metric of
/// `values` (in [`Metric::ALL`]'s order; values that are not finite are
/// left out).
pub fn render(name: &str, job: Job, values: &[Sample]) -> String {
    let labels = labels(name, job);
    let mut out = String::new();
    for m in Metric::ALL {
        let Some(Sample(_, v)) = values.iter().find(|s| s.0 == m && s.1.is_finite()) else {
            continue;
        };
        let (metric, help, _) = m.describe();
        out.push_str(&format!(
            "# HELP {metric} {}\n# TYPE {metric} gauge\n{metric}{labels} {v}\n",
            escape_help(help)
        ));
    }
    out
}

/// The samples of (`name`, `job`) in an earlier file: only lines of a known
/// metric of this job with exactly our labels and a finite value; anything
/// else is ignored.
pub fn parse(text: &str, name: &str, job: Job) -> Vec<Sample> {
    let labels = labels(name, job);
    let mut out: Vec<Sample> = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some(metric) = series.strip_suffix(labels.as_str()).and_then(|n| {
            Metric::ALL
                .into_iter()
                .find(|m| m.name() == n && m.is_for(job))
        }) else {
            continue;
        };
        let Some(v) = value.parse::<f64>().ok().filter(|v| v.is_finite()) else {
            continue;
        };
        if !out.iter().any(|s| s.0 == metric) {
            out.push(Sample(metric, v));
        }
    }
    out
}

fn labels(name: &str, job: Job) -> String {
    format!(
        "{{name=\"{}\",kind=\"{}\"}}",
        escape_label(name),
        escape_label(job.as_str())
    )
}

/// A label value: backslash, double quote and line feed escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', r#"\""#)
        .replace('\n', r"\n")
}

/// A HELP text: backslash and line feed escaped.
fn escape_help(v: &str) -> String {
    v.replace('\\', r"\\").replace('\n', r"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(ended: f64, exit_code: u8) -> Run {
        Run {
            ended,
            duration: 1.5,
            exit_code,
        }
    }

    #[test]
    fn renders_the_exposition_format_with_escaped_labels() {
        let text = render(
            "db1",
            Job::Backup,
            &[
                Sample(Metric::LastRunTimestamp, 1764295200.25),
                Sample(Metric::BackupBytes, 4831838208.0),
                Sample(Metric::PruneKept, 3.0),
                Sample(Metric::BackupLockHold, f64::NAN),
            ],
        );
        assert_eq!(
            text,
            "# HELP mysnap_last_run_timestamp_seconds When the last run of the job ended (Unix time).\n\
             # TYPE mysnap_last_run_timestamp_seconds gauge\n\
             mysnap_last_run_timestamp_seconds{name=\"db1\",kind=\"backup\"} 1764295200.25\n\
             # HELP mysnap_backup_bytes Size of the last successful backup's stored archive.\n\
             # TYPE mysnap_backup_bytes gauge\n\
             mysnap_backup_bytes{name=\"db1\",kind=\"backup\"} 4831838208\n\
             # HELP mysnap_prune_kept Complete backups the last successful prune kept.\n\
             # TYPE mysnap_prune_kept gauge\n\
             mysnap_prune_kept{name=\"db1\",kind=\"backup\"} 3\n"
        );
        assert_eq!(
            labels("a\"b\\c\nd", Job::Drill),
            r#"{name="a\"b\\c\nd",kind="drill"}"#
        );
        assert_eq!(escape_help("a\\b\nc\""), r#"a\\b\nc""#);
        // Rendering and parsing agree, also on a name that needs escaping.
        let odd = "x\"y\\z";
        let values = [
            Sample(Metric::LastExitCode, 4.0),
            Sample(Metric::VerifyBytes, 7.5),
        ];
        assert_eq!(
            parse(&render(odd, Job::Verify, &values), odd, Job::Verify),
            values
        );
    }

    #[test]
    fn parsing_an_earlier_file_takes_only_our_metrics_labels_and_finite_values() {
        let text = "\
# HELP mysnap_last_success_timestamp_seconds x
mysnap_last_success_timestamp_seconds{name=\"db1\",kind=\"backup\"} 100
mysnap_last_success_timestamp_seconds{name=\"db2\",kind=\"backup\"} 200
mysnap_backup_bytes{name=\"db1\",kind=\"prune\"} 5
mysnap_prune_kept{name=\"db1\",kind=\"backup\"} 5
mysnap_backup_bytes{name=\"db1\",kind=\"backup\"} NaN
mysnap_backup_files{name=\"db1\",kind=\"backup\"} +Inf
mysnap_backup_unpacked_bytes{name=\"db1\",kind=\"backup\"} 12 1764295200000
mysnap_other{name=\"db1\",kind=\"backup\"} 1
mysnap_backup_lock_hold_seconds{name=\"db1\",kind=\"backup\"} 0.02
mysnap_backup_lock_hold_seconds{name=\"db1\",kind=\"backup\"} 9
garbage \u{0} line without labels
";
        assert_eq!(
            parse(text, "db1", Job::Backup),
            [
                Sample(Metric::LastSuccessTimestamp, 100.0),
                Sample(Metric::BackupLockHold, 0.02),
            ]
        );
    }

    #[test]
    fn a_failed_run_keeps_the_last_success_and_the_job_metrics_atomically() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ok = [
            Sample(Metric::BackupBytes, 1000.0),
            Sample(Metric::BackupLockHold, 0.02),
        ];
        let path = write(dir.path(), "db1", Job::Backup, &run(100.0, 0), &ok).unwrap();
        assert_eq!(path, dir.path().join("mysnap_db1_backup.prom"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let first = parse(&std::fs::read_to_string(&path).unwrap(), "db1", Job::Backup);
        assert!(first.contains(&Sample(Metric::LastSuccessTimestamp, 100.0)));
        assert!(first.contains(&Sample(Metric::BackupBytes, 1000.0)));

        write(dir.path(), "db1", Job::Backup, &run(200.0, 3), &[]).unwrap();
        let second = parse(&std::fs::read_to_string(&path).unwrap(), "db1", Job::Backup);
        for s in [
            Sample(Metric::LastRunTimestamp, 200.0),
            Sample(Metric::LastExitCode, 3.0),
            Sample(Metric::LastSuccessTimestamp, 100.0),
            Sample(Metric::BackupBytes, 1000.0),
            Sample(Metric::BackupLockHold, 0.02),
        ] {
            assert!(second.contains(&s), "{s:?} in {second:?}");
        }
        // A failed run's own samples replace the kept ones.
        let gap = [Sample(Metric::BackupBytes, 7.0)];
        write(dir.path(), "db1", Job::Backup, &run(250.0, 1), &gap).unwrap();
        let third = previous(dir.path(), "db1", Job::Backup);
        assert!(third.contains(&gap[0]), "{third:?}");
        assert!(!third.contains(&Sample(Metric::BackupBytes, 1000.0)));
        assert!(third.contains(&Sample(Metric::LastSuccessTimestamp, 100.0)));
        // Another job's file is its own.
        write(dir.path(), "db1", Job::Prune, &run(300.0, 1), &[]).unwrap();
        let prune = std::fs::read_to_string(dir.path().join("mysnap_db1_prune.prom")).unwrap();
        assert!(
            !prune.contains("mysnap_last_success_timestamp_seconds{"),
            "{prune}"
        );
        // No temporary file is left, and nothing but the two files.
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["mysnap_db1_backup.prom", "mysnap_db1_prune.prom"]);
        // A success replaces what was kept.
        write(dir.path(), "db1", Job::Backup, &run(400.0, 0), &[]).unwrap();
        let third = parse(&std::fs::read_to_string(&path).unwrap(), "db1", Job::Backup);
        assert!(third.contains(&Sample(Metric::LastSuccessTimestamp, 400.0)));
        assert!(
            !third.iter().any(|s| s.0 == Metric::BackupBytes),
            "{third:?}"
        );
    }

    #[test]
    fn an_earlier_file_that_is_a_link_or_huge_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(
            &elsewhere,
            "mysnap_last_success_timestamp_seconds{name=\"db1\",kind=\"verify\"} 5\n",
        )
        .unwrap();
        let path = file_path(dir.path(), "db1", Job::Verify);
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        write(dir.path(), "db1", Job::Verify, &run(9.0, 4), &[]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("mysnap_last_success"), "{text}");
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        // Past 64 KiB nothing is read.
        let mut big = "#".repeat(MAX_PREVIOUS as usize);
        big.push_str("\nmysnap_last_success_timestamp_seconds{name=\"db1\",kind=\"verify\"} 5\n");
        std::fs::write(&path, big).unwrap();
        write(dir.path(), "db1", Job::Verify, &run(10.0, 4), &[]).unwrap();
        assert!(!std::fs::read_to_string(&path)
            .unwrap()
            .contains("mysnap_last_success"));
    }

    #[test]
    fn temporary_files_of_killed_writers_are_removed_and_no_others() {
        let dir = tempfile::tempdir().unwrap();
        // Writers that ended (kill -9 mid-write), and one that still runs.
        let ended = || {
            let mut gone = std::process::Command::new("true").spawn().unwrap();
            gone.wait().unwrap();
            gone.id()
        };
        let (dead, dead_link) = (ended(), ended());
        let mut running = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let live = running.id();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "not ours").unwrap();
        let tmp = |file: &str, pid: u32| dir.path().join(format!(".{file}.tmp-{pid}"));
        let ours = "mysnap_db1_backup.prom";
        std::fs::write(tmp(ours, dead), "partial").unwrap();
        std::fs::write(tmp(ours, live), "being written").unwrap();
        std::os::unix::fs::symlink(&outside, tmp(ours, dead_link)).unwrap();
        let other = tmp("mysnap_db2_backup.prom", dead);
        std::fs::write(&other, "another file's").unwrap();
        let odd = dir.path().join(format!(".{ours}.tmp-{dead}x"));
        std::fs::write(&odd, "not a pid").unwrap();

        write(dir.path(), "db1", Job::Backup, &run(1.0, 0), &[]).unwrap();
        let _ = running.kill();
        let _ = running.wait();
        assert!(!tmp(ours, dead).exists(), "a dead writer's file is removed");
        assert!(
            tmp(ours, dead_link).symlink_metadata().is_err(),
            "and a link"
        );
        assert!(tmp(ours, live).exists(), "a running writer's file is kept");
        assert!(other.exists() && odd.exists(), "other names are kept");
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "not ours");
        assert!(file_path(dir.path(), "db1", Job::Backup).is_file());
    }

    #[test]
    fn a_directory_that_cannot_be_written_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = write(&missing, "db1", Job::Backup, &run(1.0, 0), &[]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("missing/mysnap_db1_backup.prom"), "{msg}");
    }

    #[test]
    fn every_job_has_its_kind_and_metrics() {
        for (job, kind) in [
            (Job::Backup, "backup"),
            (Job::Prune, "prune"),
            (Job::Verify, "verify"),
            (Job::Drill, "drill"),
            (Job::Binlogs, "binlogs"),
        ] {
            assert_eq!(job.as_str(), kind);
            assert!(Metric::LastExitCode.is_for(job));
        }
        assert!(!Metric::BackupBytes.is_for(Job::Drill));
        assert!(Metric::ALL.iter().all(|m| m.name().starts_with("mysnap_")));
    }
}
