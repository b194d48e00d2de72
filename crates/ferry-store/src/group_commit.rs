//! Group commit: one fsync covers every write any group made before it started.
//!
//! Writers insert into sled (in memory) and then wait here. A dedicated thread takes every
//! waiter queued so far, calls `Db::flush` once, and completes them all. A waiter that arrives
//! while a flush runs waits for the next one, because the running flush may not cover its
//! write. No flush is ever skipped and no waiter is completed before its flush returns.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use openraft::storage::IOFlushed;

use crate::{StoreError, TypeConfig};

enum Waiter {
    Raft(IOFlushed<TypeConfig>),
    Task(tokio::sync::oneshot::Sender<Result<(), String>>),
}

impl Waiter {
    fn complete(self, result: &Result<(), String>) {
        match self {
            Waiter::Raft(cb) => cb.io_completed(result.clone().map_err(std::io::Error::other)),
            Waiter::Task(tx) => {
                let _ = tx.send(result.clone());
            }
        }
    }
}

/// Counters for seeing how well flushes are shared.
#[derive(Debug, Default)]
pub struct FlushStats {
    /// fsyncs performed.
    pub flushes: AtomicU64,
    /// Writes that waited for one.
    pub waiters: AtomicU64,
    /// Time spent in fsync, microseconds.
    pub flush_micros: AtomicU64,
}

/// The node's shared flusher. Cloning shares it; when the last clone drops, the fsync thread
/// finishes its queue, releases the database and is joined, so the data folder can be
/// reopened at once.
#[derive(Clone)]
pub struct GroupCommit {
    handle: Arc<Handle>,
    stats: Arc<FlushStats>,
}

struct Handle {
    tx: Option<mpsc::Sender<Waiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Handle {
    fn send(&self, waiter: Waiter) -> Result<(), Waiter> {
        match &self.tx {
            Some(tx) => tx.send(waiter).map_err(|mpsc::SendError(w)| w),
            None => Err(waiter),
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl GroupCommit {
    pub(crate) fn start(db: sled::Db) -> Self {
        let (tx, rx) = mpsc::channel::<Waiter>();
        let stats = Arc::new(FlushStats::default());
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-fsync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiters = vec![first];
                    waiters.extend(rx.try_iter());
                    let started = std::time::Instant::now();
                    let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
                    thread_stats
                        .flush_micros
                        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                    if let Err(e) = &result {
                        tracing::error!(error = %e, "fsync failed");
                    }
                    thread_stats.flushes.fetch_add(1, Ordering::Relaxed);
                    thread_stats
                        .waiters
                        .fetch_add(waiters.len() as u64, Ordering::Relaxed);
                    for waiter in waiters {
                        waiter.complete(&result);
                    }
                }
            })
            .expect("spawning the fsync thread");
        Self {
            handle: Arc::new(Handle {
                tx: Some(tx),
                thread: Some(thread),
            }),
            stats,
        }
    }

    /// Completes `callback` after the next flush.
    pub(crate) fn after_flush(&self, callback: IOFlushed<TypeConfig>) {
        if let Err(waiter) = self.handle.send(Waiter::Raft(callback)) {
            waiter.complete(&Err("fsync thread has stopped".into()));
        }
    }

    /// Waits until everything written before this call is on disk.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.handle
            .send(Waiter::Task(tx))
            .map_err(|_| StoreError::io("fsync", "fsync thread has stopped"))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::io("fsync", e)),
            Err(_) => Err(StoreError::io("fsync", "fsync thread has stopped")),
        }
    }

    /// Flush counters.
    pub fn stats(&self) -> &FlushStats {
        &self.stats
    }
}
