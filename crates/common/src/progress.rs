//! Progress reporting. Library code reports through [`Progress`]; binaries
//! choose [`for_stderr`]: a bar on a terminal, periodic log lines otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub trait Progress: Send + Sync {
    /// Total bytes expected (an estimate is fine).
    fn set_total(&self, bytes: u64);
    /// `bytes` more were processed.
    fn advance(&self, bytes: u64);
    fn finish(&self);
}

/// Reports nothing (tests, `-q`).
pub struct Silent;

impl Progress for Silent {
    fn set_total(&self, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// A progress bar when stderr is a terminal, else a log line every 10 seconds.
pub fn for_stderr(what: &str, quiet: bool) -> Box<dyn Progress> {
    if quiet {
        Box::new(Silent)
    } else if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("static template"),
        );
        bar.set_message(what.to_string());
        Box::new(Bar(bar))
    } else {
        Box::new(LogLines {
            what: what.to_string(),
            start: Instant::now(),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            last: Mutex::new(Instant::now()),
        })
    }
}

struct Bar(indicatif::ProgressBar);

impl Progress for Bar {
    fn set_total(&self, bytes: u64) {
        self.0.set_length(bytes);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

struct LogLines {
    what: String,
    start: Instant,
    total: AtomicU64,
    done: AtomicU64,
    last: Mutex<Instant>,
}

impl Progress for LogLines {
    fn set_total(&self, bytes: u64) {
        self.total.store(bytes, Ordering::Relaxed);
    }
    fn advance(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let mut last = self.last.lock().expect("progress lock");
        if last.elapsed() < Duration::from_secs(10) {
            return;
        }
        *last = Instant::now();
        let secs = self.start.elapsed().as_secs_f64();
        let rate = done as f64 / secs.max(1e-3);
        let total = self.total.load(Ordering::Relaxed);
        let eta = if total > done && rate > 0.0 {
            format!("{:.0}s", (total - done) as f64 / rate)
        } else {
            "-".into()
        };
        tracing::info!(
            "{}: {} of {} read, {}/s, ETA {eta}",
            self.what,
            bytesize::ByteSize(done),
            bytesize::ByteSize(total),
            bytesize::ByteSize(rate as u64)
        );
    }
    fn finish(&self) {}
}
