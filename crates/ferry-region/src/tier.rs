//! Tiered storage's driver. The leader of a tiered partition (`retention.local_max_bytes`)
//! uploads the complete batch files beyond its hot tail to the region's object store, one
//! object per file ([`ferry_store::encode_object`]), and records each object in the
//! partition's manifest through the partition's Raft (`PartitionCommand::Offloaded`). Every
//! replica drops those batches as the entry applies and deletes their files once a checkpoint
//! no longer names them, so nothing is deleted locally before it is durable remotely and
//! committed. A failed upload is retried after a backoff; while uploads cannot keep up, the
//! partition refuses publishes at its `retention.local_limit_bytes` (`OffloadBehind`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_net::Transport;
use ferry_store::{encode_object, RemoteStore};
use futures::StreamExt;

use crate::command::{decode, PartitionCommand, PartitionReply};
use crate::leadership::LedPartition;
use crate::node::{HostedPartition, Node, PartitionGroup};
use openraft::async_runtime::WatchReceiver;

/// Objects one partition uploads in one round at most (partitions that become led meanwhile
/// wait for the next round).
const OBJECTS_PER_ROUND: usize = 256;
/// How long objects retention dropped stay in the store before they are deleted.
const DELETE_GRACE: Duration = Duration::from_secs(30);
/// Partitions uploading at once.
const PARTITIONS_AT_ONCE: usize = 8;
/// How long a group's checkpoint after an offload is waited for before the next is asked.
const CHECKPOINT_PATIENCE: Duration = Duration::from_secs(30);

/// The uploads of the partitions this node leads that failed lately.
#[derive(Default)]
pub(crate) struct Offloads {
    failing: Mutex<HashMap<(Arc<str>, u32), Failing>>,
}

struct Failing {
    failures: u32,
    next_try: Instant,
    error: String,
}

/// How long to wait after `failures` failures in a row: doubling from `base`, at most `max`.
fn backoff(base: Duration, max: Duration, failures: u32) -> Duration {
    base.saturating_mul(1 << failures.min(16)).min(max)
}

impl Offloads {
    fn due(&self, topic: &Arc<str>, partition: u32, now: Instant) -> bool {
        self.failing
            .lock()
            .map(|f| {
                f.get(&(topic.clone(), partition))
                    .is_none_or(|f| f.next_try <= now)
            })
            .unwrap_or(true)
    }

    fn failed(
        &self,
        topic: &Arc<str>,
        partition: u32,
        error: String,
        base: Duration,
        max: Duration,
    ) {
        if let Ok(mut failing) = self.failing.lock() {
            let entry = failing
                .entry((topic.clone(), partition))
                .or_insert(Failing {
                    failures: 0,
                    next_try: Instant::now(),
                    error: String::new(),
                });
            entry.next_try = Instant::now() + backoff(base, max, entry.failures);
            entry.failures = entry.failures.saturating_add(1);
            entry.error = error;
        }
    }

    fn succeeded(&self, topic: &Arc<str>, partition: u32) {
        if let Ok(mut failing) = self.failing.lock() {
            failing.remove(&(topic.clone(), partition));
        }
    }

    /// Why the uploads of `topic`/`partition` fail, if they do.
    pub(crate) fn failure(&self, topic: &str, partition: u32) -> Option<String> {
        let failing = self.failing.lock().ok()?;
        failing.get(&(Arc::from(topic), partition)).map(|f| {
            format!(
                "{} failed uploads in a row, the last: {}",
                f.failures, f.error
            )
        })
    }

    /// Forgets the failures of partitions this node no longer leads.
    fn keep_only(&self, led: &[LedPartition]) {
        if let Ok(mut failing) = self.failing.lock() {
            failing.retain(|(topic, partition), _| {
                led.iter()
                    .any(|l| l.topic == *topic && l.hosted.partition == *partition)
            });
        }
    }

    /// Partitions whose uploads fail now.
    pub(crate) fn failing(&self) -> usize {
        self.failing.lock().map(|f| f.len()).unwrap_or(0)
    }
}

impl<T: Transport> Node<T> {
    /// Starts the upload rounds, if the node has an object store.
    pub(crate) fn spawn_tiering(&self) {
        let Some(tier) = &self.inner.config.tier else {
            return;
        };
        let every = Duration::from_millis(tier.upload_interval_ms);
        self.spawn_every(every, |node| async move { node.offload_round().await });
    }

    /// One round: the tiered partitions this node leads upload what lies beyond their hot
    /// tail; the groups whose replicas offloaded since their last checkpoint take one (which
    /// deletes the offloaded files).
    async fn offload_round(&self) {
        let (Some(tier), Some(options)) =
            (self.inner.tier.clone(), self.inner.config.tier.as_ref())
        else {
            return;
        };
        let base = Duration::from_millis(options.upload_interval_ms);
        let max = Duration::from_millis(options.max_upload_backoff_ms);
        let (led, _) = self.led_partitions();
        self.inner.offloads.keep_only(&led);
        // Partitions upload side by side (a few at a time), each until it is within its hot
        // tail or has sent its share of the round.
        let tiered = led.iter().filter_map(|LedPartition { topic, hosted }| {
            let hot = self.inner.meta_view.retention(topic)?.local_max_bytes?;
            self.inner
                .offloads
                .due(topic, hosted.partition, Instant::now())
                .then_some((topic, hosted, hot))
        });
        futures::stream::iter(tiered)
            .for_each_concurrent(PARTITIONS_AT_ONCE, |(topic, hosted, hot)| {
                let tier = tier.clone();
                async move {
                    let partition = hosted.partition;
                    for _ in 0..OBJECTS_PER_ROUND {
                        if hosted.view.stored_bytes() <= hot {
                            break;
                        }
                        match self.offload_one(&tier, topic, hosted).await {
                            Ok(true) => self.inner.offloads.succeeded(topic, partition),
                            Ok(false) => break,
                            Err(e) => {
                                tracing::warn!(%topic, partition, error = %e, "uploading to the object store failed; retrying after a backoff");
                                self.inner.offloads.failed(topic, partition, e, base, max);
                                break;
                            }
                        }
                    }
                }
            })
            .await;
        for (group, hosted) in self.partition_groups() {
            if hosted
                .views
                .all()
                .values()
                .any(|v| v.offloaded_since_checkpoint())
            {
                if let Err(e) = hosted.raft.trigger().snapshot().await {
                    tracing::debug!(%group, error = %e, "checkpoint after an offload not taken");
                }
            }
        }
    }

    /// Takes a checkpoint of `group` whenever it applied an offload, so its replica deletes
    /// offloaded batch files promptly (the upload rounds take one too while some wait), until
    /// the group stops here.
    pub(crate) fn spawn_checkpoints_after_offloads(group: PartitionGroup) {
        let mut offloads = group.views.subscribe_offloads();
        let mut running = group.raft.server_metrics();
        let mut metrics = group.raft.metrics();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = offloads.changed() => if changed.is_err() { return },
                    stopped = running.changed() => if stopped.is_err() { return } else { continue },
                }
                let applied = metrics.borrow_watched().last_applied.map_or(0, |l| l.index);
                if group.raft.trigger().snapshot().await.is_err() {
                    return;
                }
                // One checkpoint at a time: offloads meanwhile wait for this one (bounded).
                let _ = tokio::time::timeout(CHECKPOINT_PATIENCE, async {
                    while metrics
                        .borrow_watched()
                        .snapshot
                        .is_none_or(|s| s.index < applied)
                    {
                        if metrics.changed().await.is_err() {
                            return;
                        }
                    }
                })
                .await;
            }
        });
    }

    /// Uploads the next complete batch file of `hosted` beyond the manifest and records it
    /// there. Ok(false) when there is none yet.
    async fn offload_one(
        &self,
        tier: &Arc<RemoteStore>,
        topic: &str,
        hosted: &HostedPartition,
    ) -> Result<bool, String> {
        let view = hosted.view.clone();
        let run = tokio::task::spawn_blocking(move || view.offload_candidate())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let Some(batches) = run.filter(|b| !b.is_empty()) else {
            return Ok(false);
        };
        let (first, last) = (
            batches[0].base_offset,
            batches[batches.len() - 1].end_offset(),
        );
        let key = format!(
            "{}/{topic}/{}/{first:020}-{last:020}.seg",
            self.inner.config.region, hosted.partition
        );
        let (bytes, segment) = encode_object(key.clone(), &batches).map_err(|e| e.to_string())?;
        drop(batches);
        tier.put(&key, bytes).await.map_err(|e| e.to_string())?;
        let command = hosted
            .command(PartitionCommand::Offloaded { segment })
            .map_err(|e| e.to_string())?;
        let response = hosted
            .proposer()
            .client_write(command)
            .await
            .map_err(|e| format!("recording {key} in the manifest: {e}"))?;
        match decode::<PartitionReply>("partition reply", &response.data.0) {
            Ok(PartitionReply::Done) => {
                tracing::debug!(%topic, partition = hosted.partition, first, last, "offloaded");
                Ok(true)
            }
            Ok(PartitionReply::Error(refused)) => {
                // Another upload got there first. The same offsets uploaded twice (a leader
                // that had not applied the first entry yet when it chose them) are in the
                // manifest under this key: done. Otherwise the object is ours to delete.
                if hosted.view.remote_segments().iter().any(|r| r.key == key) {
                    tracing::debug!(%key, "uploaded twice; the manifest holds it");
                    return Ok(true);
                }
                if let Err(e) = tier.delete(&key).await {
                    tracing::warn!(%key, error = %e, "deleting a refused upload failed; the object is left over");
                }
                Err(format!("the manifest refused {key}: {}", refused.message))
            }
            Ok(other) => Err(format!("recording {key} answered {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Bytes beyond their hot tail that the tiered partitions this node leads hold.
    pub fn tier_upload_lag(&self) -> u64 {
        let (led, _) = self.led_partitions();
        led.iter()
            .filter_map(|l| {
                let hot = self.inner.meta_view.retention(&l.topic)?.local_max_bytes?;
                Some(l.hosted.view.stored_bytes().saturating_sub(hot))
            })
            .sum()
    }

    /// Tiered partitions this node leads whose last upload failed.
    pub fn tier_partitions_failing(&self) -> u64 {
        self.inner.offloads.failing() as u64
    }

    /// The object store's counters, for `/metrics` (none without a store).
    pub(crate) fn tier_counters(&self) -> Vec<(&'static str, &'static str, f64)> {
        let Some(tier) = &self.inner.tier else {
            return Vec::new();
        };
        let s = tier.stats();
        let n =
            |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed) as f64;
        vec![
            ("ferry_tier_uploads_total", "Objects this node wrote to the object store.", n(&s.uploads)),
            ("ferry_tier_upload_bytes_total", "Bytes of the objects it wrote.", n(&s.upload_bytes)),
            ("ferry_tier_upload_errors_total", "Writes and deletes of objects that failed.", n(&s.upload_errors)),
            ("ferry_tier_cache_hits_total", "Pieces of objects read back that the cache held.", n(&s.cache_hits)),
            ("ferry_tier_cache_misses_total", "Pieces of objects read back from the store.", n(&s.cache_misses)),
            ("ferry_tier_remote_reads_total", "Range requests made to the object store.", n(&s.fetches)),
            ("ferry_tier_remote_read_seconds_total", "Time the range requests took (divide by ferry_tier_remote_reads_total for the mean latency).", n(&s.fetch_micros) / 1e6),
            ("ferry_tier_read_errors_total", "Reads of offloaded batches that failed (the store answered an error, or an object was damaged or missing).", n(&s.read_errors)),
            ("ferry_tier_corrupt_objects_total", "Objects found damaged or missing (never served).", n(&s.corrupt)),
        ]
    }

    /// Deletes the objects of `keys` from the tier once a trim dropped them from the
    /// manifest, after [`DELETE_GRACE`]: replicas applying the trim later, and reads that
    /// began before it, may still read them meanwhile. A failure leaves the object over,
    /// logged.
    pub(crate) fn delete_remote(&self, keys: Vec<String>) {
        let Some(tier) = self.inner.tier.clone() else {
            return;
        };
        tokio::spawn(async move {
            tokio::time::sleep(DELETE_GRACE).await;
            for key in keys {
                if let Err(e) = tier.delete(&key).await {
                    tracing::warn!(%key, error = %e, "deleting an object retention dropped failed; it is left over");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        let (base, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let waits: Vec<u128> = (0..7).map(|f| backoff(base, max, f).as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(backoff(base, max, u32::MAX), max);
    }
}
