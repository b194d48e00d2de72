//! openraft's own storage test suite, run on the sled store.

use bytes::Bytes;
use ferry_store::{
    Application, NodeStore, SledStateMachine, StoreError, StoreOptions, TypeConfig, WalLogStore,
};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;

/// A key-value application: a command `key=value` sets the key and answers the old value.
struct KvApp;

impl Application for KvApp {
    fn load(&mut self, _tree: &sled::Tree) -> Result<(), StoreError> {
        Ok(())
    }

    fn apply(
        &mut self,
        _index: u64,
        command: &[u8],
        tree: &sled::Tree,
        batch: &mut sled::Batch,
    ) -> Bytes {
        let text = String::from_utf8_lossy(command);
        let (key, value) = text.split_once('=').unwrap_or((&text, ""));
        let old = tree
            .get(key)
            .ok()
            .flatten()
            .map(|v| Bytes::copy_from_slice(&v))
            .unwrap_or_default();
        batch.insert(key.as_bytes(), value.as_bytes());
        old
    }
}

struct SledBuilder;

impl StoreBuilder<TypeConfig, WalLogStore, SledStateMachine<KvApp>, tempfile::TempDir>
    for SledBuilder
{
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, WalLogStore, SledStateMachine<KvApp>), StorageError<TypeConfig>>
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = NodeStore::open(
            &dir.path().join("node"),
            1,
            StoreOptions {
                cache_bytes: 4 << 20,
                segment_bytes: 64 << 10,
            },
        )
        .expect("open store");
        let group = "suite".to_string();
        let log = store.log_store(&group).expect("log store");
        let sm = store.state_machine(&group, KvApp).expect("state machine");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_passes_on_sled() {
    Suite::test_all(SledBuilder)
        .await
        .expect("openraft storage suite");
}

/// 64 flush calls: the first one's fsync is held (by the store's test hook) until the other
/// 63 are queued behind it; they must then share one fsync, so 64 calls cost exactly two.
/// No call may return before an fsync that started after it was made has finished: the first
/// needs the first fsync, the 63 the second. With one fsync per call this fails (64 fsyncs);
/// completing a waiter early fails the "nothing returned while held" and "covered" checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_arriving_during_an_fsync_share_the_next_one() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::Duration;

    const CALLS: usize = 64;
    let dir = tempfile::tempdir().unwrap();
    let store = NodeStore::open(&dir.path().join("n"), 1, StoreOptions::default()).unwrap();
    let flusher = store.flusher().clone();
    let stats = || {
        let s = flusher.stats();
        (s.flushes.load(SeqCst), s.queued.load(SeqCst))
    };

    // The first fsync after the hook is set tells the test it has started, then waits for
    // the release (bounded, so a broken test cannot hang forever).
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
    let entered_tx = Mutex::new(Some(entered_tx));
    let first = AtomicBool::new(true);
    let hook_gate = gate.clone();
    flusher.set_before_sync(Some(Arc::new(move || {
        if !first.swap(false, SeqCst) {
            return;
        }
        if let Some(tx) = entered_tx.lock().unwrap().take() {
            let _ = tx.send(());
        }
        let (released, cv) = &*hook_gate;
        let guard = released.lock().unwrap();
        let _ = cv
            .wait_timeout_while(guard, Duration::from_secs(30), |r| !*r)
            .unwrap();
    })));
    let (flushes_before, queued_before) = stats();

    // Each call reports the number of finished fsyncs when it returned.
    let completed = Arc::new(AtomicUsize::new(0));
    let call = |completed: Arc<AtomicUsize>| {
        let flusher = flusher.clone();
        tokio::spawn(async move {
            flusher.flush().await.expect("flush");
            completed.fetch_add(1, SeqCst);
            flusher.stats().flushes.load(SeqCst)
        })
    };
    let first_call = call(completed.clone());
    tokio::task::spawn_blocking(move || entered_rx.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the first call's fsync started");
    let rest: Vec<_> = (1..CALLS).map(|_| call(completed.clone())).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stats().1 - queued_before < CALLS as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {CALLS} calls queued for an fsync",
            stats().1 - queued_before
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The first fsync has not run: nothing may have returned yet.
    assert_eq!(stats().0, flushes_before, "an fsync ran while held");
    assert_eq!(
        completed.load(SeqCst),
        0,
        "a flush call returned before any fsync covering it"
    );
    {
        let (released, cv) = &*gate;
        *released.lock().unwrap() = true;
        cv.notify_all();
    }

    let seen_by_first = first_call.await.unwrap();
    assert!(
        seen_by_first > flushes_before,
        "the first call returned before its fsync finished"
    );
    for task in rest {
        let seen = task.await.unwrap();
        assert!(
            seen >= flushes_before + 2,
            "a call made during the first fsync returned after {} fsyncs; it needs the second",
            seen - flushes_before
        );
    }
    let flushes = stats().0 - flushes_before;
    assert_eq!(
        flushes, 2,
        "{flushes} fsyncs for {CALLS} calls: the 63 calls queued during the first fsync did not share the next"
    );
    flusher.set_before_sync(None);
}
