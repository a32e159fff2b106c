//! Parallel ranged download: the store's plan of GETs in flight, reassembled
//! in order into a blocking `Read`. Memory is bounded by about
//! `range × (in flight + 1)`, within `store.memory_limit`.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, StreamExt};
use tokio::sync::mpsc;

use super::Store;
use crate::reader::{ChunkReader, ChunkSource};

/// A blocking reader over an object, fed by parallel ranged GETs.
pub type Download = ChunkReader<Ranges>;

/// The ranges of a download as they arrive, in order.
pub struct Ranges {
    rx: mpsc::Receiver<anyhow::Result<Bytes>>,
    failed: Arc<AtomicBool>,
}

impl ChunkReader<Ranges> {
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
        ChunkReader::new(Ranges { rx, failed })
    }
}

impl ChunkSource for Ranges {
    fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        match self.rx.blocking_recv() {
            Some(Ok(b)) => Ok(Some(b)),
            Some(Err(e)) => {
                self.failed.store(true, Ordering::SeqCst);
                Err(io::Error::other(format!("{e:#}")))
            }
            None => Ok(None),
        }
    }
}
