//! Tiered storage's driver. The leader of a tiered partition (`retention.local_max_bytes`)
//! uploads the complete batch files beyond its hot tail to the region's object store, one
//! object per file ([`ferry_store::encode_object`]), and records each object in the
//! partition's manifest through the partition's Raft (`PartitionCommand::Offloaded`). Every
//! replica drops those batches as the entry applies and deletes their files once a checkpoint
//! no longer names them, so nothing is deleted locally before it is durable remotely and
//! committed. A failed upload is retried after a backoff; while uploads cannot keep up, the
//! partition refuses publishes at its `retention.local_limit_bytes` (`OffloadBehind`).

mod sweep;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_net::Transport;
use ferry_store::{encode_object, RemoteStore};
use futures::StreamExt;

use crate::command::{decode, PartitionCommand, PartitionReply};
use crate::leadership::LedPartition;
use crate::node::{HostedPartition, Node, PartitionGroup};
use openraft::async_runtime::WatchReceiver;
use sweep::{is_segment_key, never_recorded_again, segment_key, segment_offsets, OrphanSweep};

/// Objects one partition uploads in one round at most (partitions that become led meanwhile
/// wait for the next round).
const OBJECTS_PER_ROUND: usize = 256;
/// How long objects retention dropped stay in the store before they are deleted.
const DELETE_GRACE: Duration = Duration::from_secs(30);
/// Partitions uploading at once.
const PARTITIONS_AT_ONCE: usize = 8;
/// Left-over objects one sweep of a partition deletes at most (the next takes more).
const SWEEP_DELETES: usize = 256;
/// How long one sweep of a partition may take (it holds up the node's next upload round).
const SWEEP_PATIENCE: Duration = Duration::from_secs(60);
/// How long a group's checkpoint after an offload is waited for before the next is asked.
const CHECKPOINT_PATIENCE: Duration = Duration::from_secs(30);

/// The uploads of the partitions this node leads that failed lately, and their sweeps of
/// left-over objects.
#[derive(Default)]
pub(crate) struct Offloads {
    failing: Mutex<HashMap<(Arc<str>, u32), Failing>>,
    sweeps: Mutex<HashMap<(Arc<str>, u32), OrphanSweep>>,
    /// Left-over objects the sweeps deleted.
    swept: AtomicU64,
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

    /// Forgets the failures and sweeps of partitions this node no longer leads.
    fn keep_only(&self, led: &[LedPartition]) {
        let still_led = |(topic, partition): &(Arc<str>, u32)| {
            led.iter()
                .any(|l| l.topic == *topic && l.hosted.partition == *partition)
        };
        if let Ok(mut failing) = self.failing.lock() {
            failing.retain(|k, _| still_led(k));
        }
        if let Ok(mut sweeps) = self.sweeps.lock() {
            sweeps.retain(|k, _| still_led(k));
        }
    }

    /// Runs `f` on the sweep of `topic`/`partition`.
    fn with_sweep<R>(
        &self,
        topic: &Arc<str>,
        partition: u32,
        f: impl FnOnce(&mut OrphanSweep) -> R,
    ) -> R {
        let mut sweeps = self.sweeps.lock().unwrap_or_else(|e| e.into_inner());
        f(sweeps.entry((topic.clone(), partition)).or_default())
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
        let sweep_every = Duration::from_millis(options.sweep_interval_ms);
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
                                return;
                            }
                        }
                    }
                    // After this partition's uploads, never beside one of them (an object
                    // put and not yet proposed would look left over).
                    let now = Instant::now();
                    let sweep_due = self
                        .inner
                        .offloads
                        .with_sweep(topic, partition, |s| s.begin(now, sweep_every));
                    let sweep = self.sweep_one(&tier, topic, hosted);
                    if sweep_due && tokio::time::timeout(SWEEP_PATIENCE, sweep).await.is_err() {
                        tracing::warn!(%topic, partition, "a sweep of left-over objects outlasted {SWEEP_PATIENCE:?}; the next one goes on");
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
        let key = segment_key(&self.object_prefix(topic, hosted.partition), first, last);
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

    /// Where this node's object store is (`[tier]`'s url, and its endpoint if any): every
    /// node of a region must name the same.
    pub(crate) fn tier_place(&self) -> Option<String> {
        self.inner.config.tier.as_ref().map(|t| {
            // `s3://b/p/` names what `s3://b/p` does.
            let url = t.url.trim_end_matches('/');
            match &t.endpoint {
                Some(endpoint) => format!("{url} at {}", endpoint.trim_end_matches('/')),
                None => url.to_string(),
            }
        })
    }

    /// Why `theirs` (the [`Node::tier_place`] of `who`) is not this node's, if it is not.
    pub(crate) fn tier_differs(&self, who: &str, theirs: &Option<String>) -> Option<String> {
        let mine = self.tier_place();
        let describe = |place: &Option<String>| match place {
            Some(place) => format!("[tier] {place}"),
            None => "no [tier]".to_string(),
        };
        (mine != *theirs).then(|| {
            format!(
                "{who} has {} but node {} has {}: give every node of the region the same [tier]",
                describe(theirs),
                self.inner.id,
                describe(&mine)
            )
        })
    }

    /// For a tiered topic's creation: asks every node of `nodes` but this one which object
    /// store it has, and says why not if one has another (or none). A node that does not
    /// answer within a second is not waited for (it may be down; without any `[tier]` it
    /// logs an error when it starts a tiered replica).
    pub(crate) async fn tier_mismatch(&self, nodes: &[ferry_proto::NodeId]) -> Option<String> {
        let asks = nodes
            .iter()
            .filter(|id| **id != self.inner.id)
            .map(|id| async move {
                let answer = tokio::time::timeout(
                    Duration::from_secs(1),
                    self.inner
                        .router
                        .call(*id, &crate::peer::PeerRequest::Identify),
                )
                .await;
                match answer {
                    Ok(Ok(crate::peer::PeerResponse::Identity { tier, .. })) => {
                        self.tier_differs(&format!("node {id}"), &tier)
                    }
                    _ => {
                        tracing::debug!(node = id, "not asked for its [tier]: no answer");
                        None
                    }
                }
            });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .next()
    }

    /// Where the objects of `topic`/`partition` are in the store.
    fn object_prefix(&self, topic: &str, partition: u32) -> String {
        format!("{}/{topic}/{partition}", self.inner.config.region)
    }

    /// Lists the objects of a partition this node leads and deletes the segment objects
    /// its manifest has not named for a while ([`sweep`]). Failures are logged; the next
    /// sweep tries again.
    async fn sweep_one(&self, tier: &Arc<RemoteStore>, topic: &Arc<str>, hosted: &HostedPartition) {
        let partition = hosted.partition;
        let prefix = self.object_prefix(topic, partition);
        let listed = match tier.list(&prefix).await {
            Ok(listed) => listed,
            Err(e) => {
                tracing::warn!(%topic, partition, error = %e, "listing the partition's objects failed (the store's credentials need to list the bucket); the sweep tries again later");
                return;
            }
        };
        let due = {
            let manifest = hosted.view.remote_segments();
            let named: HashSet<&str> = manifest.iter().map(|s| s.key.as_str()).collect();
            // After the manifest's read: a trim applied during a slow listing still waits
            // the whole grace.
            let now = Instant::now();
            self.inner.offloads.with_sweep(topic, partition, |s| {
                s.review(now, &listed, &named, |k| is_segment_key(&prefix, k))
            })
        };
        if due.is_empty() {
            return;
        }
        // Still the leader, with everything committed applied: an earlier leader's entry
        // that is yet to commit is in this log, and is in the manifest read below.
        if let Err(e) = hosted
            .raft()
            .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
            .await
        {
            tracing::debug!(%topic, partition, error = %e, "not sweeping: leadership not confirmed");
            return;
        }
        let manifest = hosted.view.remote_segments();
        let manifest_end = manifest.last().map(|s| s.end);
        let low = hosted.view.watermarks().low;
        let named: HashSet<String> = manifest.into_iter().map(|s| s.key).collect();
        for key in due.into_iter().take(SWEEP_DELETES) {
            // A key the next upload may take stays suspected until the manifest passes it.
            let Some((first, last)) = segment_offsets(&prefix, &key) else {
                continue;
            };
            if !named.contains(&key) && !never_recorded_again(first, last, manifest_end, low) {
                continue;
            }
            if !named.contains(&key) {
                if let Err(e) = tier.delete(&key).await {
                    tracing::warn!(%key, error = %e, "deleting a left-over object failed; the next sweep tries again");
                    continue;
                }
                self.inner.offloads.swept.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%key, "deleted an object the partition's manifest does not name (left over by a failure)");
            }
            self.inner
                .offloads
                .with_sweep(topic, partition, |s| s.forget(&key));
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

    /// Left-over objects (named by no manifest) this node's sweeps deleted.
    pub fn tier_objects_swept(&self) -> u64 {
        self.inner.offloads.swept.load(Ordering::Relaxed)
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
            ("ferry_tier_swept_objects_total", "Left-over objects (named by no manifest) that this node's sweeps deleted.", self.tier_objects_swept() as f64),
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
