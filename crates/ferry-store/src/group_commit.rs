//! Group commit: one fsync covers every write any group made before it started.
//!
//! Every write that must become durable is numbered after it reaches the write-ahead log
//! ([`GroupCommit::note_write`]); its waiter needs a flush that started after that number. A
//! dedicated thread takes every waiter queued so far, reads the highest number written, syncs
//! the log once and completes the waiters that flush covers; the others (written meanwhile) wait for the
//! next one. A waiter whose writes are already covered by a finished flush completes at once:
//! that is what keeps Raft heartbeats, which append nothing, from costing an fsync each. No
//! waiter is ever completed before a flush that covers its writes has returned.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use openraft::storage::IOFlushed;

use crate::{StoreError, TypeConfig};

enum Completion {
    Raft(IOFlushed<TypeConfig>),
    Task(tokio::sync::oneshot::Sender<Result<(), String>>),
}

struct Waiter {
    /// The write number a covering flush must have started after.
    needs: u64,
    completion: Completion,
}

impl Completion {
    fn complete(self, result: &Result<(), String>) {
        match self {
            Completion::Raft(cb) => cb.io_completed(result.clone().map_err(std::io::Error::other)),
            Completion::Task(tx) => {
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
    /// Waits handed to the fsync thread (not counting those already covered on arrival).
    pub queued: AtomicU64,
}

/// A test hook the fsync thread runs just before each fsync; see
/// [`GroupCommit::set_before_sync`].
pub type BeforeSync = Arc<dyn Fn() + Send + Sync>;
type HookSlot = Arc<Mutex<Option<BeforeSync>>>;

#[derive(Default)]
struct Progress {
    /// Number of the last write noted.
    written: AtomicU64,
    /// Every write up to this number is on disk.
    flushed: AtomicU64,
}

/// The node's shared flusher. Cloning shares it; when the last clone drops, the fsync thread
/// finishes its queue, releases the database and is joined, so the data folder can be
/// reopened at once.
#[derive(Clone)]
pub struct GroupCommit {
    handle: Arc<Handle>,
    stats: Arc<FlushStats>,
    progress: Arc<Progress>,
    before_sync: HookSlot,
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

/// What the fsync thread calls to make every write so far durable.
pub(crate) type SyncFn = Box<dyn FnMut() -> std::io::Result<()> + Send>;

/// A sync slower than this is logged (at debug level: on a busy disk it is common).
const SLOW_SYNC: std::time::Duration = std::time::Duration::from_millis(10);

fn run_flusher(
    mut sync: SyncFn,
    rx: mpsc::Receiver<Waiter>,
    stats: Arc<FlushStats>,
    progress: Arc<Progress>,
    before_sync: HookSlot,
) {
    let mut pending: Vec<Waiter> = Vec::new();
    loop {
        if pending.is_empty() {
            match rx.recv() {
                Ok(first) => pending.push(first),
                Err(_) => return,
            }
        }
        pending.extend(rx.try_iter());
        // Every write numbered up to `target` was written before this sync starts.
        let target = progress.written.load(Ordering::SeqCst);
        let hook = before_sync.lock().map(|h| h.clone()).unwrap_or(None);
        if let Some(hook) = hook {
            hook();
        }
        let started = std::time::Instant::now();
        let result = sync().map_err(|e| e.to_string());
        let took = started.elapsed();
        if took > SLOW_SYNC {
            tracing::debug!(?took, waiters = pending.len(), "slow write-ahead log sync");
        }
        stats
            .flush_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        stats.flushes.fetch_add(1, Ordering::Relaxed);
        match &result {
            Ok(()) => {
                progress.flushed.fetch_max(target, Ordering::SeqCst);
            }
            Err(e) => tracing::error!(error = %e, "fsync failed"),
        }
        let (covered, later): (Vec<_>, Vec<_>) = pending
            .drain(..)
            .partition(|w| w.needs <= target || result.is_err());
        stats
            .waiters
            .fetch_add(covered.len() as u64, Ordering::Relaxed);
        for waiter in covered {
            waiter.completion.complete(&result);
        }
        pending = later;
    }
}

impl GroupCommit {
    pub(crate) fn start(sync: SyncFn) -> Self {
        let (tx, rx) = mpsc::channel::<Waiter>();
        let stats = Arc::new(FlushStats::default());
        let progress = Arc::new(Progress::default());
        let before_sync = HookSlot::default();
        let (thread_stats, thread_progress, thread_hook) =
            (stats.clone(), progress.clone(), before_sync.clone());
        let thread = std::thread::Builder::new()
            .name("ferry-fsync".into())
            .spawn(move || run_flusher(sync, rx, thread_stats, thread_progress, thread_hook))
            .expect("spawning the fsync thread");
        Self {
            handle: Arc::new(Handle {
                tx: Some(tx),
                thread: Some(thread),
            }),
            stats,
            progress,
            before_sync,
        }
    }

    /// Test hook: `hook` runs on the fsync thread before each fsync, after that fsync has
    /// taken the waiters queued so far and read the write number it will cover. A hook that
    /// blocks holds that fsync, so a test can queue calls behind it deterministically and
    /// check that they share the next one. Production code never sets it; unset, it costs
    /// one uncontended lock per fsync. `None` removes it.
    #[doc(hidden)]
    pub fn set_before_sync(&self, hook: Option<BeforeSync>) {
        if let Ok(mut slot) = self.before_sync.lock() {
            *slot = hook;
        }
    }

    /// Numbers a write that has reached the log and must become durable.
    pub(crate) fn note_write(&self) -> u64 {
        self.progress.written.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Every write numbered up to this is on disk.
    pub(crate) fn synced(&self) -> u64 {
        self.progress.flushed.load(Ordering::SeqCst)
    }

    /// The number of the last write noted: what an operation that wrote nothing itself must
    /// still wait for, so it never overtakes earlier writes.
    pub(crate) fn last_write(&self) -> u64 {
        self.progress.written.load(Ordering::SeqCst)
    }

    fn enqueue(&self, needs: u64, completion: Completion) {
        if self.progress.flushed.load(Ordering::SeqCst) >= needs {
            completion.complete(&Ok(()));
            return;
        }
        match self.handle.send(Waiter { needs, completion }) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(waiter) => waiter
                .completion
                .complete(&Err("fsync thread has stopped".into())),
        }
    }

    /// Completes `callback` once every write numbered up to `needs` is on disk.
    pub(crate) fn after_flush(&self, needs: u64, callback: IOFlushed<TypeConfig>) {
        self.enqueue(needs, Completion::Raft(callback));
    }

    /// Waits until everything written to the log before this call is on disk; always
    /// performs (or joins) an fsync started after the call.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let needs = self.note_write();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.enqueue(needs, Completion::Task(tx));
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn wait(gc: &GroupCommit, needs: u64) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        gc.enqueue(needs, Completion::Task(tx));
        rx.await.expect("completed")
    }

    #[tokio::test]
    async fn nothing_new_needs_no_fsync_but_never_overtakes_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let synced = db.clone();
        let gc = GroupCommit::start(Box::new(move || {
            synced.flush().map(|_| ()).map_err(Into::into)
        }));
        let flushes = || gc.stats().flushes.load(Ordering::Relaxed);

        // A write waits for a flush that covers it.
        db.insert("a", "1").unwrap();
        let n = gc.note_write();
        wait(&gc, n).await.unwrap();
        assert_eq!(flushes(), 1);

        // Waiting with nothing new written completes without another fsync.
        wait(&gc, gc.last_write()).await.unwrap();
        assert_eq!(flushes(), 1);

        // After a new write, even a waiter that wrote nothing itself waits for a flush.
        db.insert("b", "2").unwrap();
        gc.note_write();
        wait(&gc, gc.last_write()).await.unwrap();
        assert_eq!(flushes(), 2);
        assert!(gc.progress.flushed.load(Ordering::SeqCst) >= 2);
    }
}
