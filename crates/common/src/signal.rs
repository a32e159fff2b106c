//! SIGINT and SIGTERM as a flag: a program that must clean up before it
//! ends (abort an upload, remove a snapshot, undo a swap) catches them
//! instead of ending, and its work looks at the flag where it can stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Set by SIGINT or SIGTERM once [`Interrupt::on_signals`] was called (or
/// by [`Interrupt::set`]); every clone shares the one flag.
#[derive(Clone, Debug, Default)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    /// From now on SIGINT and SIGTERM set this instead of ending the
    /// process; the first one logs a warning saying `then` (what the
    /// program does next). Needs a tokio runtime.
    pub fn on_signals(&self, then: &'static str) -> anyhow::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let me = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            tracing::warn!("signal received: {then}");
            me.set();
        });
        Ok(())
    }

    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// The flag itself, for code that polls an `AtomicBool` (a reader).
    pub fn flag(&self) -> &AtomicBool {
        &self.0
    }

    /// [`Interrupted`] once a signal came: where work may stop, its
    /// guards then undo what is not committed.
    pub fn stop_if_set(&self) -> Result<(), Interrupted> {
        match self.is_set() {
            true => Err(Interrupted),
            false => Ok(()),
        }
    }
}

/// The error of work stopped by a signal before it changed anything (its
/// guards put back what it had begun).
#[derive(Debug, thiserror::Error)]
#[error("interrupted; nothing was changed")]
pub struct Interrupted;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_flag() {
        let a = Interrupt::default();
        let b = a.clone();
        assert!(!b.is_set());
        assert!(b.stop_if_set().is_ok());
        a.set();
        assert!(b.is_set() && b.flag().load(Ordering::SeqCst));
        let e = b.stop_if_set().unwrap_err();
        assert_eq!(e.to_string(), "interrupted; nothing was changed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn sigterm_sets_it_and_does_not_end_the_process() {
        let int = Interrupt::default();
        int.on_signals("going on").unwrap();
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !int.is_set() {
            assert!(
                std::time::Instant::now() < deadline,
                "SIGTERM did not set the flag"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
