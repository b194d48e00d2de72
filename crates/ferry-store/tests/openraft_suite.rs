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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_flushes_complete_without_an_fsync_each() {
    let dir = tempfile::tempdir().unwrap();
    let store = NodeStore::open(&dir.path().join("n"), 1, StoreOptions::default()).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let flusher = store.flusher().clone();
        tasks.push(tokio::spawn(async move { flusher.flush().await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let stats = store.flusher().stats();
    let flushes = stats.flushes.load(std::sync::atomic::Ordering::Relaxed);
    let waiters = stats.waiters.load(std::sync::atomic::Ordering::Relaxed);
    // Every call returned after a covering fsync; some were covered by an fsync another call
    // started (completing at once or in its batch), so there are never more fsyncs than calls.
    assert!((1..=64).contains(&flushes), "{flushes} fsyncs for 64 calls");
    assert!(
        waiters <= 64 && waiters >= flushes,
        "{waiters} queued completions, {flushes} fsyncs"
    );
}
