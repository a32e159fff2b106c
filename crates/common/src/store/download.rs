//! Parallel ranged download: the store's plan of GETs in flight, reassembled
//! in order into a blocking `Read`. Memory is bounded by about
//! `range × (in flight + 1)`, within `store.memory_limit`.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use futures::stream::{self, StreamExt};
use tokio::sync::mpsc;

use super::Store;

/// A blocking reader over an object, fed by parallel ranged GETs.
pub struct Download {
    rx: mpsc::Receiver<anyhow::Result<Bytes>>,
    current: Bytes,
    failed: Arc<AtomicBool>,
}

impl Download {
    /// Starts downloading `key` (`size` bytes) on the current tokio runtime,
    /// in ranges and with as many GETs in flight as the store's
    /// [`super::Transfer::download`] plan says; `failed` is set when the
    /// store fails (as opposed to the data).
    pub fn start(
        store: Arc<dyn Store>,
        key: String,
        size: u64,
        failed: Arc<AtomicBool>,
    ) -> Download {
        let (tx, rx) = mpsc::channel(1);
        let (part_size, concurrency) = store.transfer().download();
        let part_size = part_size.max(1);
        tokio::spawn(async move {
            let ranges = (0..size.div_ceil(part_size))
                .map(move |i| i * part_size..((i + 1) * part_size).min(size));
            let mut parts = stream::iter(ranges)
                .map(|r| {
                    let (store, key) = (store.clone(), key.clone());
                    async move {
                        let want = r.end - r.start;
                        let b = store.get_range(&key, r.clone()).await?;
                        anyhow::ensure!(
                            b.len() as u64 == want,
                            "{}: bytes {}-{} came back as {} bytes (the object is shorter than its manifest says)",
                            store.url(&key),
                            r.start,
                            r.end - 1,
                            b.len()
                        );
                        Ok(b)
                    }
                })
                .buffered(concurrency.max(1));
            while let Some(part) = parts.next().await {
                let stop = part.is_err();
                if tx.send(part).await.is_err() || stop {
                    break;
                }
            }
        });
        Download {
            rx,
            current: Bytes::new(),
            failed,
        }
    }
}

impl Read for Download {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => {
                    self.failed.store(true, Ordering::SeqCst);
                    return Err(io::Error::other(format!("{e:#}")));
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}
