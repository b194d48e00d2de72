//! The partition state machine: assigns offsets to appended batches, deduplicates producer
//! retries by (producer id, sequence), keeps consumer group cursors and domain streams (their
//! versions, checked as an append applies, and where their events are) and trims by retention.
//! One state machine serves a Raft group: each entry of the group's log is a command to one
//! of the group's partitions (`GroupCommand`), and each partition keeps its own state.
//!
//! Event data lives once, in each partition's own batch files ([`BatchFiles`]); the rest of
//! the state (watermarks, producers, cursors) is small and kept in memory. Neither is synced
//! as entries apply: the Raft log (the node's write-ahead log) is what makes an append
//! durable. A snapshot is a *checkpoint*: the batch files written since the last one are
//! synced, then every partition's small state and files' extent, with the applied log id, are
//! written to `checkpoint` (atomically, by rename). On start the files are cut back to that
//! extent and Raft re-applies the log after it. openraft keeps only the meta of a built
//! snapshot; its data (every partition's state plus every retained batch) is streamed from
//! the checkpoint's files when a follower needs it (`group_snapshot`).
//!
//! Readers use [`PartitionView`]; the watermark is published only after the batch is in the
//! files, so a reader never sees an offset it cannot read.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use ferry_proto::wire::{ApiError, ErrorCode};
use ferry_proto::{codec, EventBatch, ProducerId, StoredBatch, StreamEvent};
use ferry_store::{
    read_batch, AppliedState, BatchFiles, Extent, IndexCache, IndexTier, RemoteSegment,
    RemoteStore, RunRef, SnapshotData, StoreError, StreamAppend, StreamIndex, StreamReader,
    SyncPlan, TypeConfig,
};
use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};

use crate::command::{
    decode_shared, encode, GroupCommand, GroupEntry, PartitionCommand, PartitionReply,
};
use crate::compaction::CompactionGate;
use crate::group_snapshot::{receive_snapshot, GroupSnapshotSource, SnapshotPart};

/// Most events one read of a domain stream answers.
const MAX_STREAM_READ_EVENTS: usize = 65_536;
/// How many recent batches per producer are remembered to answer retries with their offsets.
const DEDUPE_WINDOW: usize = 64;
const CHECKPOINT: &str = "checkpoint";

/// The oldest retained offset and the offset the next event will get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Watermarks {
    /// Oldest retained offset.
    pub low: u64,
    /// Next offset to assign.
    pub high: u64,
}

/// What a partition remembers of one producer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProducerState {
    /// Sequence of the last event appended.
    last_seq: Option<u64>,
    /// Recent batches: (first sequence, count, base offset).
    recent: VecDeque<(u64, u32, u64)>,
    /// When its last batch was appended (the leader's stamp, ms since the epoch): a producer
    /// idle for longer than the node's `producer_expiry_ms` is forgotten.
    last_append_ms: u64,
}

/// What the producer dedupe makes of a batch.
enum Sequencing {
    /// No producer, or the batch continues its producer's sequence: append it, then record
    /// this producer state.
    Fresh(Option<(ProducerId, ProducerState)>),
    /// The producer appended this very batch before, at this base offset.
    Duplicate(u64),
}

/// The small part of a partition's state: everything but the event data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct SmallState {
    marks: Watermarks,
    producers: Vec<(ProducerId, ProducerState)>,
    cursors: Vec<(String, u64)>,
    /// Per origin (region, partition): every origin offset below this is held here.
    received: Vec<((String, u32), u64)>,
    /// Per destination region: the forwarding cursor of this partition.
    forward_cursors: Vec<(String, u64)>,
    /// The domain-stream index's runs ([`StreamIndex`]); the appends since come back from
    /// the log.
    stream_runs: Vec<RunRef>,
    /// The manifest: objects in the tier's store holding the partition's oldest retained
    /// offsets, contiguous from the one holding the low watermark, oldest first. The batch
    /// files hold what follows.
    remote: Vec<RemoteSegment>,
}

impl SmallState {
    /// The first offset the batch files hold (of those retained): past the manifest's last.
    fn local_from(&self) -> u64 {
        self.remote
            .last()
            .map_or(self.marks.low, |r| r.end.max(self.marks.low))
    }
}

/// What `checkpoint` holds. The file is `[u64 length][CheckpointHead]` then, per partition,
/// `[u64 length][PartitionCheckpoint]`, then, once the topic split, `[u64 length][SplitState]`:
/// each part is decoded on its own, so the decoder's bound applies per partition, however
/// many partitions a group has.
#[derive(Debug, Clone)]
struct Checkpoint {
    meta: SnapshotMetaOf<TypeConfig>,
    /// The folder (under the group's) holding the batch files, one folder per partition.
    batches: String,
    partitions: Vec<PartitionCheckpoint>,
    /// Written after the partitions when not the default.
    split: SplitState,
}

/// The first part of a checkpoint file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointHead {
    meta: SnapshotMetaOf<TypeConfig>,
    batches: String,
    partitions: u32,
}

/// One partition's part of a [`Checkpoint`].
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PartitionCheckpoint {
    partition: u32,
    state: SmallState,
    /// How far its batch files count.
    extent: Extent,
}

/// What a group knows of its topic's splits ([`ferry_proto::KeyLayout`]): the layout its
/// publishes are checked against and the seals of the children it holds. Kept after the
/// partitions in a checkpoint and a snapshot (absent: never split).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitState {
    /// Partitions the topic was created with (0: never split).
    pub initial: u32,
    /// Partitions of the topic as of the group's last split (0: never split): publishes
    /// are checked against this layout.
    pub layout: u32,
    /// Per child partition held here: its parent and the parent's seal offset.
    pub seals: BTreeMap<u32, (u32, u64)>,
}

impl SplitState {
    /// Why a batch forwarded to `partition`, routed by the destination layout `routed_by`
    /// (created with, now has), does not belong there now: that layout gives the partition
    /// another key space than this group's last split did (or, never split, than the
    /// partitions it was created with). None when it belongs.
    pub fn forwarded_refusal(&self, partition: u32, routed_by: (u32, u32)) -> Option<String> {
        let (initial, partitions) = routed_by;
        let routed = ferry_proto::key_modulus(partition, initial, partitions);
        let here = if self.layout == 0 {
            u64::from(initial)
        } else {
            ferry_proto::key_modulus(partition, self.initial, self.layout)
        };
        let here_partitions = if self.layout == 0 {
            initial
        } else {
            self.layout
        };
        (routed != here).then(|| {
            format!(
                "partition {partition} takes the keys of a topic of {here_partitions} partitions \
                 here; the batch was routed for {partitions}: describe the topic again"
            )
        })
    }
}

/// The read views of a group's partitions by number, and its [`SplitState`]; a split adds
/// its children. Shared by the state machine (which changes it as it applies) and the node.
pub struct GroupViews {
    views: RwLock<Arc<BTreeMap<u32, Arc<PartitionView>>>>,
    split: RwLock<Arc<SplitState>>,
    /// Counts changes of the partition set (leadership follows them).
    changed: watch::Sender<u64>,
    /// Counts applied entries that offloaded batches (a checkpoint then deletes their files).
    offloaded: watch::Sender<u64>,
}

impl GroupViews {
    fn new(views: BTreeMap<u32, Arc<PartitionView>>, split: SplitState) -> Self {
        Self {
            views: RwLock::new(Arc::new(views)),
            split: RwLock::new(Arc::new(split)),
            changed: watch::channel(0).0,
            offloaded: watch::channel(0).0,
        }
    }

    /// Changes whenever the group applied an offload ([`PartitionCommand::Offloaded`]): a
    /// checkpoint taken then deletes the offloaded batch files.
    pub fn subscribe_offloads(&self) -> watch::Receiver<u64> {
        self.offloaded.subscribe()
    }

    /// Partition `partition`'s view, if the group holds it.
    pub fn get(&self, partition: u32) -> Option<Arc<PartitionView>> {
        self.views.read().ok()?.get(&partition).cloned()
    }

    /// Every partition's view.
    pub fn all(&self) -> Arc<BTreeMap<u32, Arc<PartitionView>>> {
        self.views.read().map(|v| v.clone()).unwrap_or_default()
    }

    /// The partitions the group holds, ascending.
    pub fn numbers(&self) -> Vec<u32> {
        self.all().keys().copied().collect()
    }

    /// What the group knows of its topic's splits.
    pub fn split(&self) -> Arc<SplitState> {
        self.split.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Changes whenever the group's partitions change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Publishes the partitions and split state the state machine holds now: the split
    /// state first, so a reader that sees a child sees the layout that made it.
    fn set(&self, views: BTreeMap<u32, Arc<PartitionView>>, split: SplitState) {
        if let Ok(mut now) = self.split.write() {
            *now = Arc::new(split);
        }
        let grew = match self.views.write() {
            Ok(mut now) => {
                let grew = now.len() != views.len();
                *now = Arc::new(views);
                grew
            }
            Err(_) => false,
        };
        if grew {
            self.changed.send_modify(|c| *c += 1);
        }
    }
}

/// Read access to a partition's applied state, shared with the API.
pub struct PartitionView {
    files: RwLock<BatchFiles>,
    cursors: RwLock<HashMap<String, u64>>,
    forward_cursors: RwLock<HashMap<String, u64>>,
    /// Per origin (region, partition): every origin offset below this is held (applied).
    received: RwLock<HashMap<(String, u32), u64>>,
    /// Where domain streams' appends are (written only by the state machine as it applies).
    streams: RwLock<StreamIndex>,
    watermarks: watch::Sender<Watermarks>,
    bytes: AtomicU64,
    /// Events of forwarded batches this replica's state machine did not append because it
    /// held them already (by origin region, partition and offset): resent or duplicated
    /// batches that reached Raft. Counted as applied since the process started (replays
    /// included); not part of the replicated state.
    forwarded_duplicates: AtomicU64,
    /// No producer's last append is older than this (ms since the epoch; `u64::MAX` when
    /// there is none): a lower bound, exact after a restore or an expiry, so the leader
    /// proposes an expiry only when one may be due.
    oldest_producer_ms: AtomicU64,
    /// Producers remembered.
    producers: AtomicU64,
    /// The manifest (see [`SmallState`]'s `remote`).
    remote: RwLock<VecDeque<RemoteSegment>>,
    /// Bytes of events the manifest's objects hold.
    remote_bytes: AtomicU64,
    /// Bytes of events offloaded since the last checkpoint: their segment files are deleted
    /// once a checkpoint no longer names them.
    offloaded_since_checkpoint: AtomicBool,
    /// Where the manifest's objects are read from (None: no store configured on this node).
    tier: Option<Arc<RemoteStore>>,
}

fn storage_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::io("partition", e)
}

impl PartitionView {
    /// The current watermarks.
    pub fn watermarks(&self) -> Watermarks {
        *self.watermarks.borrow()
    }

    /// Publishes a raised low watermark ahead of the rest of the applied state (before the
    /// batches below it leave the files), never above the published high: readers keep
    /// `low <= high`, and a read between the old and the new low skips rather than finds a
    /// hole.
    fn raise_low(&self, low: u64) {
        self.watermarks.send_if_modified(|w| {
            let low = low.min(w.high);
            let raised = low > w.low;
            w.low = w.low.max(low);
            raised
        });
    }

    /// A receiver that changes whenever batches are applied or trimmed.
    pub fn subscribe(&self) -> watch::Receiver<Watermarks> {
        self.watermarks.subscribe()
    }

    /// Bytes of event data held.
    pub fn stored_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Forwarded events this replica skipped on apply as already held (see the field).
    pub fn forwarded_duplicates_skipped(&self) -> u64 {
        self.forwarded_duplicates.load(Ordering::Relaxed)
    }

    /// Whether some producer may have appended nothing since before `idle_before_ms` (then
    /// [`PartitionCommand::ExpireProducers`] has something to do, or finds the exact time).
    pub fn producer_expiry_due(&self, idle_before_ms: u64) -> bool {
        self.oldest_producer_ms.load(Ordering::Relaxed) < idle_before_ms
    }

    /// Producers this partition remembers (for dedupe).
    pub fn producer_count(&self) -> u64 {
        self.producers.load(Ordering::Relaxed)
    }

    /// Batches holding offsets from `offset` on, at most `max_bytes` of event data (but at
    /// least one batch if any is there). The first batch may start before `offset`. Below
    /// the low watermark nothing is promised (retention dropped it; the first batch may start
    /// later); from it on the batches are contiguous, and a hole in this replica's files is
    /// [`StoreError::Missing`], never a silent skip. Offsets the manifest names are read from
    /// the tier's object store (one object's batches at most per read).
    pub async fn read(
        &self,
        offset: u64,
        max_bytes: usize,
    ) -> Result<Vec<StoredBatch>, StoreError> {
        loop {
            let Some(segment) = self.remote_segment_for(offset)? else {
                match self.read_files(offset, max_bytes)? {
                    Some(batches) => return Ok(batches),
                    // Offloaded since: read it from the store.
                    None => continue,
                }
            };
            let Some(tier) = &self.tier else {
                return Err(StoreError::Remote {
                    key: segment.key,
                    reason: "this node has no object store configured ([tier] in its config)"
                        .into(),
                });
            };
            match tier.read(&segment, offset, max_bytes).await {
                Ok(batches) => return Ok(batches),
                // Retention dropped the object while it was read: read what is retained now.
                Err(_) if !self.holds_remote(&segment)? => continue,
                Err(e) => {
                    if matches!(e, StoreError::RemoteMissing { .. }) {
                        tier.report_missing(&segment);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// The manifest's object holding `offset` (or the first, for an offset below it), if the
    /// offset lies before what the batch files hold.
    fn remote_segment_for(&self, offset: u64) -> Result<Option<RemoteSegment>, StoreError> {
        let remote = self.remote.read().map_err(storage_err)?;
        let at = remote.partition_point(|r| r.end <= offset);
        Ok(remote.get(at).cloned())
    }

    fn holds_remote(&self, segment: &RemoteSegment) -> Result<bool, StoreError> {
        let remote = self.remote.read().map_err(storage_err)?;
        Ok(remote.iter().any(|r| r.key == segment.key))
    }

    /// The manifest: the objects holding the oldest retained offsets, oldest first.
    pub fn remote_segments(&self) -> Vec<RemoteSegment> {
        self.remote
            .read()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The first offset the batch files hold (past the manifest's last object; the low
    /// watermark when it names none).
    pub fn local_from(&self) -> u64 {
        let low = self.watermarks().low;
        self.remote
            .read()
            .ok()
            .and_then(|r| r.back().map(|r| r.end.max(low)))
            .unwrap_or(low)
    }

    /// Objects the manifest names.
    pub fn remote_objects(&self) -> u64 {
        self.remote.read().map_or(0, |r| r.len() as u64)
    }

    /// Bytes of events the manifest's objects hold.
    pub fn remote_bytes(&self) -> u64 {
        self.remote_bytes.load(Ordering::Relaxed)
    }

    /// Bytes of the batch files on disk, those of dropped batches not deleted yet included.
    pub fn disk_bytes(&self) -> u64 {
        self.files.read().map_or(0, |f| f.disk_bytes())
    }

    /// Whether batches were offloaded since the last checkpoint (their local files are
    /// deleted once one is taken).
    pub fn offloaded_since_checkpoint(&self) -> bool {
        self.offloaded_since_checkpoint.load(Ordering::Relaxed)
    }

    /// The next batches to offload: from where the manifest ends (the low watermark's batch
    /// for the first object) to the end of the batch file holding it, if that file is
    /// complete (not the one being written), read and checked. None when there is none.
    pub fn offload_candidate(&self) -> Result<Option<Vec<StoredBatch>>, StoreError> {
        let from = self.local_from();
        let located = {
            let files = self.files.read().map_err(storage_err)?;
            files.sealed_run(from)
        };
        located
            .map(|run| run.iter().map(read_batch).collect())
            .transpose()
    }

    /// Like [`PartitionView::read`], from the batch files only.
    pub fn read_local(
        &self,
        offset: u64,
        max_bytes: usize,
    ) -> Result<Vec<StoredBatch>, StoreError> {
        Ok(self.read_files(offset, max_bytes)?.unwrap_or_default())
    }

    /// Reads from the batch files, or answers None if `offset` lies in the manifest (it may
    /// have moved there since the caller looked).
    fn read_files(
        &self,
        offset: u64,
        max_bytes: usize,
    ) -> Result<Option<Vec<StoredBatch>>, StoreError> {
        // Watermarks taken under the files' lock agree with them: a trim or an install
        // publishes its new low before the batches below it leave the files.
        let (high, located, hole) = {
            let files = self.files.read().map_err(storage_err)?;
            // An offload drops batches from the files under this lock after adding them to
            // the manifest: what it names is not a hole.
            let offloaded_to = self
                .remote
                .read()
                .map_err(storage_err)?
                .back()
                .map_or(0, |r| r.end);
            if offset < offloaded_to {
                return Ok(None);
            }
            let Watermarks { low, high } = self.watermarks();
            let located = files.locate(offset, max_bytes);
            let upto = located.last().map_or(high, |l| {
                (l.base_offset + u64::from(l.info.count)).min(high)
            });
            let hole = (low..high)
                .contains(&offset)
                .then(|| files.first_gap(offset, upto))
                .flatten();
            (high, located, hole)
        };
        if let Some((from, to)) = hole {
            let Watermarks { low, high } = self.watermarks();
            tracing::error!(
                from,
                to,
                low,
                high,
                "a replica's batch files lack committed offsets"
            );
            return Err(StoreError::Missing {
                from,
                to,
                low,
                high,
            });
        }
        located
            .iter()
            .filter(|l| l.base_offset < high)
            .map(read_batch)
            .collect::<Result<_, _>>()
            .map(Some)
    }

    /// A consumer group's committed cursor.
    pub fn committed(&self, group: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .cursors
            .read()
            .map_err(storage_err)?
            .get(group)
            .copied())
    }

    /// The committed forwarding cursor towards `region` (every wanted event below it is
    /// there), or None for a region never forwarded to. An unreadable cursor is an error,
    /// never None: that would make the forwarder take the region for new and skip to the end.
    pub fn forward_cursor(&self, region: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .forward_cursors
            .read()
            .map_err(storage_err)?
            .get(region)
            .copied())
    }

    /// The committed forwarding cursors, by region, lowest first.
    pub fn forward_cursors(&self) -> Vec<(String, u64)> {
        let mut cursors: Vec<(String, u64)> = self
            .forward_cursors
            .read()
            .map(|c| c.iter().map(|(r, n)| (r.clone(), *n)).collect())
            .unwrap_or_default();
        cursors.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        cursors
    }

    /// Every offset of the origin (region, partition) below this is held here (as applied).
    pub fn received(&self, region: &str, partition: u32) -> Result<u64, StoreError> {
        Ok(self
            .received
            .read()
            .map_err(storage_err)?
            .get(&(region.to_string(), partition))
            .copied()
            .unwrap_or(0))
    }

    /// The first retained offset appended at or after `at_ms` (milliseconds since the epoch),
    /// or the high watermark if none was. Append times follow the leaders' clocks, so they are
    /// ordered only as well as those clocks agree.
    pub fn first_appended_since(&self, at_ms: u64) -> u64 {
        let marks = self.watermarks();
        // Both locks (in the order apply takes them), so an offload cannot move batches from
        // the files to the manifest between the two looks.
        let (Ok(files), Ok(remote)) = (self.files.read(), self.remote.read()) else {
            return marks.low;
        };
        // In the manifest, by object: from the first object holding a later append.
        if let Some(segment) = remote.iter().find(|r| r.last_appended_ms >= at_ms) {
            return segment.base.max(marks.low).min(marks.high);
        }
        files
            .index()
            .iter()
            .find(|(base, info)| {
                info.appended_at_ms >= at_ms && **base + u64::from(info.count) > marks.low
            })
            .map_or(marks.high, |(base, _)| {
                (*base).max(marks.low).min(marks.high)
            })
    }

    /// When the batch holding `offset` was appended (milliseconds since the epoch), if held.
    pub fn appended_at(&self, offset: u64) -> Option<u64> {
        // Offloaded: when the object's first batch was (to the object, not the batch).
        if let Some(segment) = self.remote_segment_for(offset).ok().flatten() {
            return Some(segment.first_appended_ms);
        }
        let files = self.files.read().ok()?;
        let (_, info) = files.index().range(..=offset).next_back()?;
        Some(info.appended_at_ms)
    }

    /// The stream index: appends held in memory (since the last checkpoint), runs in use and
    /// their bytes on disk.
    pub fn stream_index_held(&self) -> (u64, u64, u64) {
        self.streams.read().map_or((0, 0, 0), |index| {
            let (runs, bytes) = index.runs_held();
            (index.recent_len() as u64, runs as u64, bytes)
        })
    }

    /// The version of domain stream `stream` (the number of events ever appended to it; 0 if
    /// it does not exist), as applied.
    pub fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        self.streams
            .read()
            .map_err(storage_err)?
            .reader(stream)
            .version()
    }

    /// Events of domain stream `stream` from version `from_version` on, in version order: at
    /// most `max_events` (and 65,536), and none more once `max_bytes` of events are collected
    /// (but at least one). Answers the stream's version (0 if it does not exist) with them. Events
    /// retention dropped are skipped. Only what readers may see (below the published high
    /// watermark) is read, and the version answered is that of the last such event.
    pub async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<(u64, Vec<StreamEvent>), StoreError> {
        // Taken under the lock, read without it; the watermarks after it, so that its runs
        // hold only published appends.
        let reader = self.streams.read().map_err(storage_err)?.reader(stream);
        let marks = self.watermarks();
        let remote = reader.reads_remote();
        // However many events are asked for, the appends gathered stay bounded.
        let max_events = max_events.min(MAX_STREAM_READ_EVENTS);
        let lookup = move || stream_appends(&reader, marks, from_version, max_events);
        // Runs in the object store are read from a thread that may block.
        let (version, wanted) = if remote {
            tokio::task::spawn_blocking(lookup)
                .await
                .map_err(|e| StoreError::io("a stream index read", e))??
        } else {
            lookup()?
        };
        let mut events = Vec::new();
        let mut bytes = 0usize;
        'appends: for StreamAppend {
            first_version,
            base,
            ..
        } in wanted
        {
            // The batch holding `base` comes first; retention may have dropped it meanwhile.
            let batch = self.read(base, 1).await?.into_iter().next();
            let Some(batch) = batch.filter(|b| b.base_offset == base) else {
                continue;
            };
            let decoded = batch.decode().map_err(storage_err)?;
            for (i, (offset, event)) in decoded.into_iter().enumerate() {
                let version = first_version + i as u64;
                if version < from_version || offset < marks.low {
                    continue;
                }
                if events.len() >= max_events || (!events.is_empty() && bytes >= max_bytes) {
                    break 'appends;
                }
                bytes += event.size();
                events.push(StreamEvent {
                    version,
                    offset,
                    appended_at_ms: batch.appended_at_ms,
                    event,
                });
            }
        }
        Ok((version, events))
    }

    /// The first offset at or after which retention must drop data, given the policy, or None.
    pub fn retention_point(
        &self,
        now_ms: u64,
        max_age_ms: Option<u64>,
        max_bytes: Option<u64>,
    ) -> Option<u64> {
        let held = self.stored_bytes() + self.remote_bytes();
        let mut excess = max_bytes.map(|max| held.saturating_sub(max));
        let mut trim_to = None;
        let high = self.watermarks().high;
        let too_old = |at_ms: u64| max_age_ms.is_some_and(|age| at_ms.saturating_add(age) < now_ms);
        // The manifest's objects first (they hold the oldest offsets), whole.
        {
            let remote = self.remote.read().ok()?;
            for segment in remote.iter() {
                let too_big = excess.is_some_and(|e| e > 0);
                if !(too_old(segment.last_appended_ms) || too_big) || segment.end >= high {
                    return trim_to;
                }
                if let Some(e) = excess.as_mut() {
                    *e = e.saturating_sub(segment.event_bytes);
                }
                trim_to = Some(segment.end);
            }
        }
        let files = self.files.read().ok()?;
        for (base, info) in files.index() {
            let end = base + u64::from(info.count);
            let too_big = excess.is_some_and(|e| e > 0);
            // Never trim the batch that ends at the high watermark: it shows where offsets are.
            if !(too_old(info.appended_at_ms) || too_big) || end >= high {
                break;
            }
            if let Some(e) = excess.as_mut() {
                *e = e.saturating_sub(u64::from(info.bytes));
            }
            trim_to = Some(end);
        }
        trim_to
    }
}

/// The partition logic: what applying a command does to the state.
struct Partition {
    view: Arc<PartitionView>,
    marks: Watermarks,
    producers: HashMap<ProducerId, ProducerState>,
    received: HashMap<(String, u32), u64>,
    /// Applied something since the last checkpoint was taken (only such partitions have
    /// batch files to sync for the next one).
    dirty: bool,
    /// Applied an offload since the state machine last told the group's views.
    offloaded_now: bool,
}

/// What a group's partitions store beyond their folder: the node's object store for
/// offloaded batches (if configured) and the node's cache of stream index blocks.
#[derive(Clone, Default)]
pub struct GroupStorage {
    /// Where offloaded batches are read from.
    pub tier: Option<Arc<RemoteStore>>,
    /// Blocks of stream index runs read lately, shared by the node's partitions.
    pub index_cache: Arc<IndexCache>,
    /// For a tiered topic on a node with a tier: where its partitions' large stream index
    /// runs go in the object store.
    pub index_runs: Option<IndexRunsTier>,
}

/// Where a tiered topic's stream index runs go in the object store.
#[derive(Clone, Debug)]
pub struct IndexRunsTier {
    /// The keys' prefix: a partition's go under `<prefix>/<partition>/stream-index/`.
    pub prefix: String,
    /// Runs of at least this many bytes are uploaded (their files then keep each stream's
    /// last append only).
    pub min_bytes: u64,
}

impl Partition {
    /// An empty partition over `files` (its stream index not opened yet), reading offloaded
    /// batches from `storage`'s tier.
    fn new(files: BatchFiles, number: u32, storage: &GroupStorage) -> Self {
        let index_tier = match (&storage.tier, &storage.index_runs) {
            (Some(store), Some(runs)) => Some(IndexTier {
                store: store.clone(),
                prefix: format!("{}/{number}", runs.prefix),
            }),
            _ => None,
        };
        let streams = StreamIndex::empty(files.dir(), storage.index_cache.clone(), index_tier);
        let view = Arc::new(PartitionView {
            files: RwLock::new(files),
            cursors: RwLock::new(HashMap::new()),
            forward_cursors: RwLock::new(HashMap::new()),
            received: RwLock::new(HashMap::new()),
            streams: RwLock::new(streams),
            watermarks: watch::channel(Watermarks::default()).0,
            bytes: AtomicU64::new(0),
            forwarded_duplicates: AtomicU64::new(0),
            oldest_producer_ms: AtomicU64::new(u64::MAX),
            producers: AtomicU64::new(0),
            remote: RwLock::new(VecDeque::new()),
            remote_bytes: AtomicU64::new(0),
            offloaded_since_checkpoint: AtomicBool::new(false),
            tier: storage.tier.clone(),
        });
        Self {
            view,
            marks: Watermarks::default(),
            producers: HashMap::new(),
            received: HashMap::new(),
            dirty: false,
            offloaded_now: false,
        }
    }

    /// The small state but the stream index's runs (which a checkpoint names as it writes
    /// them).
    fn small_state(&self) -> Result<SmallState, StoreError> {
        let mut producers: Vec<_> = self
            .producers
            .iter()
            .map(|(id, s)| (*id, s.clone()))
            .collect();
        producers.sort_unstable_by_key(|(id, _)| *id);
        let mut cursors: Vec<_> = self
            .view
            .cursors
            .read()
            .map_err(storage_err)?
            .iter()
            .map(|(g, o)| (g.clone(), *o))
            .collect();
        cursors.sort_unstable();
        let mut received: Vec<_> = self.received.iter().map(|(k, v)| (k.clone(), *v)).collect();
        received.sort_unstable();
        let mut forward_cursors: Vec<_> = self
            .view
            .forward_cursors
            .read()
            .map_err(storage_err)?
            .iter()
            .map(|(r, o)| (r.clone(), *o))
            .collect();
        forward_cursors.sort_unstable();
        let remote = self
            .view
            .remote
            .read()
            .map_err(storage_err)?
            .iter()
            .cloned()
            .collect();
        Ok(SmallState {
            marks: self.marks,
            producers,
            cursors,
            received,
            forward_cursors,
            stream_runs: Vec::new(),
            remote,
        })
    }

    /// Replaces the state (at start and when installing a snapshot).
    fn restore(&mut self, state: SmallState) -> Result<(), StoreError> {
        let local_from = state.local_from();
        self.marks = state.marks;
        self.view.remote_bytes.store(
            state.remote.iter().map(|r| r.event_bytes).sum(),
            Ordering::Relaxed,
        );
        *self.view.remote.write().map_err(storage_err)? = state.remote.into_iter().collect();
        self.producers = state.producers.into_iter().collect();
        self.producers_changed();
        self.received = state.received.into_iter().collect();
        *self.view.received.write().map_err(storage_err)? = self.received.clone();
        *self.view.cursors.write().map_err(storage_err)? = state.cursors.into_iter().collect();
        *self.view.forward_cursors.write().map_err(storage_err)? =
            state.forward_cursors.into_iter().collect();
        self.open_index(&state.stream_runs)?;
        let bytes = {
            let mut files = self.view.files.write().map_err(storage_err)?;
            // A checkpoint's first segment may still hold batches retention dropped or the
            // manifest names.
            files.drop_before(local_from);
            files.index().values().map(|i| u64::from(i.bytes)).sum()
        };
        self.view.bytes.store(bytes, Ordering::Relaxed);
        self.publish();
        Ok(())
    }

    /// Opens the stream index of the runs `named` in the batch files' folder (removing other
    /// runs there).
    fn open_index(&mut self, named: &[RunRef]) -> Result<(), StoreError> {
        let dir = self
            .view
            .files
            .read()
            .map_err(storage_err)?
            .dir()
            .to_path_buf();
        let mut streams = self.view.streams.write().map_err(storage_err)?;
        *streams = StreamIndex::open(&dir, named, streams.cache(), streams.tier())?;
        Ok(())
    }

    /// Applies one command; an `Err` is a storage failure that must stop the state machine.
    fn apply(&mut self, command: PartitionCommand) -> Result<PartitionReply, StoreError> {
        self.dirty = true;
        Ok(match command {
            PartitionCommand::Append {
                batch,
                appended_at_ms,
            } => self.append(batch, appended_at_ms, None)?,
            PartitionCommand::Split { .. }
            | PartitionCommand::Publish { .. }
            | PartitionCommand::ForwardedRouted { .. } => PartitionReply::Error(ApiError::new(
                ErrorCode::Internal,
                "a group command reached a partition",
            )),
            PartitionCommand::Commit { group, offset } => {
                // Cursors only move forward: a member that lost the partition in a rebalance
                // may still commit what it handled, and must not undo its successor's commits.
                let mut cursors = self.view.cursors.write().map_err(storage_err)?;
                let cursor = cursors.entry(group).or_default();
                *cursor = (*cursor).max(offset);
                PartitionReply::Done
            }
            PartitionCommand::Trim { before_offset } => self.trim(before_offset)?,
            PartitionCommand::Forwarded {
                origin_region,
                origin_partition,
                batch,
                appended_at_ms,
            } => self.forwarded(origin_region, origin_partition, &batch, appended_at_ms)?,
            PartitionCommand::ForwardCursor { region, next } => {
                let mut cursors = self.view.forward_cursors.write().map_err(storage_err)?;
                let cursor = cursors.entry(region).or_default();
                *cursor = (*cursor).max(next);
                PartitionReply::Done
            }
            PartitionCommand::AppendToStream {
                stream,
                expected_version,
                batch,
                appended_at_ms,
            } => self.append_to_stream(stream, expected_version, batch, appended_at_ms)?,
            PartitionCommand::ExpireProducers { idle_before_ms } => {
                self.expire_producers(idle_before_ms)
            }
            PartitionCommand::Offloaded { segment } => self.offloaded(segment)?,
        })
    }

    /// Appends `batch` unless it is a producer's resend (answered with the original offsets)
    /// or `refused` (answered with that, changing nothing).
    fn append(
        &mut self,
        batch: EventBatch,
        appended_at_ms: u64,
        refused: Option<ApiError>,
    ) -> Result<PartitionReply, StoreError> {
        let count = batch.count;
        match self.sequence(&batch) {
            Err(e) => Ok(PartitionReply::Error(e)),
            Ok(Sequencing::Duplicate(base_offset)) => Ok(PartitionReply::Appended {
                base_offset,
                count,
                duplicate: true,
            }),
            Ok(Sequencing::Fresh(_)) if refused.is_some() => {
                Ok(PartitionReply::Error(refused.unwrap_or_else(|| {
                    ApiError::new(ErrorCode::Internal, "refused without a reason")
                })))
            }
            Ok(Sequencing::Fresh(producer)) => {
                let base_offset = self.store(batch, appended_at_ms, producer)?;
                Ok(PartitionReply::Appended {
                    base_offset,
                    count,
                    duplicate: false,
                })
            }
        }
    }

    /// Appends `batch` to domain stream `stream` iff the stream is at `expected_version`
    /// (None: any). A producer's resend of a batch it appended before is answered with the
    /// original append, whatever it expects, and changes nothing.
    fn append_to_stream(
        &mut self,
        stream: String,
        expected_version: Option<u64>,
        batch: EventBatch,
        appended_at_ms: u64,
    ) -> Result<PartitionReply, StoreError> {
        let count = batch.count;
        // Dedupe first: the original append moved the version the resend still expects.
        let producer = match self.sequence(&batch) {
            Err(e) => return Ok(PartitionReply::Error(e)),
            Ok(Sequencing::Duplicate(base_offset)) => {
                return self.original_stream_append(&stream, &batch, base_offset)
            }
            Ok(Sequencing::Fresh(producer)) => producer,
        };
        // Read without the lock (the state machine is the index's only writer).
        let reader = self
            .view
            .streams
            .read()
            .map_err(storage_err)?
            .writer_reader(&stream);
        let current = reader.version()?;
        if let Some(expected) = expected_version {
            if expected != current {
                return Ok(PartitionReply::Error(ApiError::new(
                    ErrorCode::VersionConflict,
                    format!(
                        "stream {stream}: expected version {expected}, actual version {current}"
                    ),
                )));
            }
        }
        // (A run's entries end below u64::MAX.)
        let Some(version) = current
            .checked_add(u64::from(count))
            .filter(|v| *v < u64::MAX)
        else {
            return Ok(PartitionReply::Error(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("stream {stream}: version {current} cannot grow by {count}"),
            )));
        };
        let first_version = current + 1;
        let base_offset = self.store(batch, appended_at_ms, producer)?;
        self.view.streams.write().map_err(storage_err)?.append(
            stream,
            StreamAppend {
                first_version,
                base: base_offset,
                count,
            },
        );
        Ok(PartitionReply::StreamAppended {
            base_offset,
            first_version,
            version,
        })
    }

    /// The answer to a producer's resend of a stream append it made at `base_offset`.
    fn original_stream_append(
        &self,
        stream: &str,
        batch: &EventBatch,
        base_offset: u64,
    ) -> Result<PartitionReply, StoreError> {
        // The state machine's reader: it never waits on the object store.
        let reader = self
            .view
            .streams
            .read()
            .map_err(storage_err)?
            .writer_reader(stream);
        let original = reader
            .find_base(base_offset)?
            // Retention dropped it (a merge of the index may not have forgotten it yet).
            .filter(|a| a.end() > self.marks.low);
        let producer = batch.producer.unwrap_or_default();
        Ok(match original {
            Some(a) => PartitionReply::StreamAppended {
                base_offset,
                first_version: a.first_version,
                version: a.last_version(),
            },
            // Its place in the stream is in a run in the object store: the events are there
            // (once), which is what a resending producer needs to know.
            None if reader.may_hold_remotely(base_offset)? => {
                PartitionReply::Error(ApiError::new(
                    ErrorCode::AlreadyAppended,
                    format!(
                        "stream {stream}: producer {producer} sequence {} was appended at offset {base_offset} (its versions are in the object store)",
                        batch.first_seq
                    ),
                ))
            }
            // Retention dropped the batch, and its place in the stream with it.
            None if base_offset + u64::from(batch.count) <= self.marks.low => {
                PartitionReply::Error(ApiError::new(
                    ErrorCode::AlreadyAppended,
                    format!(
                        "stream {stream}: producer {producer} sequence {} was appended at offset {base_offset}, since dropped by retention",
                        batch.first_seq
                    ),
                ))
            }
            None => PartitionReply::Error(ApiError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "producer {producer}: sequence {} was appended at offset {base_offset}, not to stream {stream}",
                    batch.first_seq
                ),
            )),
        })
    }

    /// Checks a batch against its producer's sequence (if it has a producer).
    fn sequence(&self, batch: &EventBatch) -> Result<Sequencing, ApiError> {
        // The leader decoded and validated the events before proposing them
        // (`submit_publish`); replicas store the bytes as they are.
        if batch.count == 0 {
            return Err(ApiError::new(ErrorCode::InvalidRequest, "empty batch"));
        }
        let count = batch.count;
        let Some(producer) = batch.producer else {
            return Ok(Sequencing::Fresh(None));
        };
        let mut state = self.producers.get(&producer).cloned().unwrap_or_default();
        let Some(last_event_seq) = batch.first_seq.checked_add(u64::from(count) - 1) else {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "producer {producer}: sequence {} overflows",
                    batch.first_seq
                ),
            ));
        };
        if let Some(last) = state.last_seq {
            if last_event_seq <= last {
                // A producer's sequences are dense from 0, so every one up to `last` is in
                // the log.
                return match state
                    .recent
                    .iter()
                    .find(|(s, c, _)| *s == batch.first_seq && *c == count)
                {
                    Some((_, _, base)) => Ok(Sequencing::Duplicate(*base)),
                    None => Err(ApiError::new(
                        ErrorCode::AlreadyAppended,
                        format!(
                            "producer {producer}: sequences {}..={last_event_seq} were all appended before, and the batch is not one of the last {DEDUPE_WINDOW} remembered",
                            batch.first_seq
                        ),
                    )),
                };
            }
            if batch.first_seq != last + 1 {
                return Err(ApiError::new(
                    ErrorCode::OutOfOrderSequence,
                    format!(
                        "producer {producer}: expected sequence {}, got {}",
                        last + 1,
                        batch.first_seq
                    ),
                ));
            }
        } else if batch.first_seq != 0 {
            // A producer's first batch on a partition starts at 0. Either it was never seen
            // here (an earlier batch is missing) or it expired after being idle: either way
            // its unacknowledged batches must be numbered again from 0.
            return Err(ApiError::new(
                ErrorCode::UnknownProducer,
                format!(
                    "producer {producer} is not known to this partition (never seen, or expired after being idle): expected sequence 0, got {}",
                    batch.first_seq
                ),
            ));
        }
        state.last_seq = Some(last_event_seq);
        state
            .recent
            .push_back((batch.first_seq, count, self.marks.high));
        while state.recent.len() > DEDUPE_WINDOW {
            state.recent.pop_front();
        }
        Ok(Sequencing::Fresh(Some((producer, state))))
    }

    /// Stores a batch [`Partition::sequence`] accepted at the high watermark, records its
    /// producer state and answers its base offset.
    fn store(
        &mut self,
        batch: EventBatch,
        appended_at_ms: u64,
        producer: Option<(ProducerId, ProducerState)>,
    ) -> Result<u64, StoreError> {
        let base_offset = self.marks.high;
        let count = batch.count;
        let stored = StoredBatch {
            base_offset,
            count,
            appended_at_ms,
            events: batch.events,
        };
        let size = stored.events.len() as u64;
        // On failure nothing changed: the state machine stops on the error it reports.
        self.view
            .files
            .write()
            .map_err(storage_err)?
            .append(&stored)?;
        if let Some((producer, mut state)) = producer {
            state.last_append_ms = appended_at_ms;
            self.producers.insert(producer, state);
            self.view
                .oldest_producer_ms
                .fetch_min(appended_at_ms, Ordering::Relaxed);
            self.view
                .producers
                .store(self.producers.len() as u64, Ordering::Relaxed);
        }
        self.marks.high += u64::from(count);
        self.view.bytes.fetch_add(size, Ordering::Relaxed);
        Ok(base_offset)
    }

    /// Admits a batch forwarded from another region: appends the events this partition does
    /// not hold yet (by origin offset) and answers with the acknowledgement for the source.
    fn forwarded(
        &mut self,
        origin_region: String,
        origin_partition: u32,
        batch: &ferry_router::Batch,
        appended_at_ms: u64,
    ) -> Result<PartitionReply, StoreError> {
        let origin = (origin_region, origin_partition);
        let receiver = ferry_router::Receiver {
            next: self.received.get(&origin).copied().unwrap_or(0),
        };
        let admission = receiver.admit(batch);
        if matches!(admission.ack, ferry_router::Ack::Committed { .. }) {
            let held = batch.events.len() - admission.append.len();
            self.view
                .forwarded_duplicates
                .fetch_add(held as u64, Ordering::Relaxed);
        }
        if !admission.append.is_empty() {
            let parts: Vec<&Bytes> = admission.append.iter().map(|(_, e)| e).collect();
            let events = match codec::encode_seq_of_encoded("forwarded events", &parts) {
                Ok(e) => Bytes::from(e),
                Err(e) => {
                    return Ok(PartitionReply::Error(ApiError::new(
                        ErrorCode::InvalidRequest,
                        e.to_string(),
                    )))
                }
            };
            let stored = StoredBatch {
                base_offset: self.marks.high,
                count: admission.append.len() as u32,
                appended_at_ms,
                events,
            };
            let size = stored.events.len() as u64;
            self.view
                .files
                .write()
                .map_err(storage_err)?
                .append(&stored)?;
            self.marks.high += u64::from(stored.count);
            self.view.bytes.fetch_add(size, Ordering::Relaxed);
        }
        let mut next = receiver;
        next.commit(&admission);
        self.view
            .received
            .write()
            .map_err(storage_err)?
            .insert(origin.clone(), next.next);
        self.received.insert(origin, next.next);
        Ok(PartitionReply::Forwarded(admission.ack))
    }

    fn trim(&mut self, before: u64) -> Result<PartitionReply, StoreError> {
        let freed = {
            let mut files = self.view.files.write().map_err(storage_err)?;
            let freed = files.drop_before(before);
            // Objects wholly before `before` leave the manifest; the leader that proposed the
            // trim deletes them from the store once it applied.
            let mut remote = self.view.remote.write().map_err(storage_err)?;
            let mut remote_freed = 0;
            while remote.front().is_some_and(|r| r.end <= before) {
                remote_freed += remote.pop_front().map_or(0, |r| r.event_bytes);
            }
            self.view
                .remote_bytes
                .fetch_sub(remote_freed, Ordering::Relaxed);
            if freed > 0 || before > self.marks.low {
                let first = remote
                    .front()
                    .map(|r| r.base)
                    .or_else(|| files.index().keys().next().copied());
                self.marks.low = self
                    .marks
                    .low
                    .max(first.unwrap_or(self.marks.high).min(before));
                // Readers see the new low before the files without those batches (a read
                // below it may skip; above it, a hole is an error).
                self.view.raise_low(self.marks.low);
            }
            freed
        };
        self.view
            .bytes
            .fetch_sub(freed.min(self.view.stored_bytes()), Ordering::Relaxed);
        // Streams' dropped appends are skipped by readers and forgotten by the index's merges.
        Ok(PartitionReply::Done)
    }

    /// Adds `segment` to the manifest if it continues it (from the low watermark, for the
    /// first), and drops the batches it holds from the batch files: their segment files go
    /// once a checkpoint no longer names them. Anything else is refused, changing nothing
    /// (the proposer deletes the object it wrote).
    fn offloaded(&mut self, segment: RemoteSegment) -> Result<PartitionReply, StoreError> {
        let mut files = self.view.files.write().map_err(storage_err)?;
        let mut remote = self.view.remote.write().map_err(storage_err)?;
        let follows = match remote.back() {
            Some(last) => segment.base == last.end,
            None => segment.base <= self.marks.low && self.marks.low < segment.end,
        };
        let whole =
            segment.base < segment.end && segment.batches > 0 && segment.index_at < segment.size;
        if !follows || !whole || segment.end > self.marks.high {
            return Ok(PartitionReply::Error(ApiError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "remote segment {} holds offsets {}..{}, which do not follow the manifest \
                     (it ends at {}; the partition holds {}..{})",
                    segment.key,
                    segment.base,
                    segment.end,
                    remote.back().map_or(self.marks.low, |r| r.end),
                    self.marks.low,
                    self.marks.high
                ),
            )));
        }
        let freed = files.drop_before(segment.end);
        self.view
            .bytes
            .fetch_sub(freed.min(self.view.stored_bytes()), Ordering::Relaxed);
        self.view
            .remote_bytes
            .fetch_add(segment.event_bytes, Ordering::Relaxed);
        self.view
            .offloaded_since_checkpoint
            .store(true, Ordering::Relaxed);
        remote.push_back(segment);
        self.offloaded_now = true;
        Ok(PartitionReply::Done)
    }

    /// Forgets every producer whose last append is older than `idle_before_ms`: its next
    /// batch must start again at sequence 0 ([`ErrorCode::UnknownProducer`] tells it so).
    fn expire_producers(&mut self, idle_before_ms: u64) -> PartitionReply {
        let before = self.producers.len();
        self.producers
            .retain(|_, state| state.last_append_ms >= idle_before_ms);
        let expired = before - self.producers.len();
        if expired > 0 {
            tracing::debug!(
                expired,
                left = self.producers.len(),
                "idle producers expired"
            );
        }
        self.producers_changed();
        PartitionReply::Done
    }

    /// Sets the view's producer count and oldest append exactly (after a restore or expiry).
    fn producers_changed(&self) {
        let oldest = self
            .producers
            .values()
            .map(|s| s.last_append_ms)
            .min()
            .unwrap_or(u64::MAX);
        self.view
            .oldest_producer_ms
            .store(oldest, Ordering::Relaxed);
        self.view
            .producers
            .store(self.producers.len() as u64, Ordering::Relaxed);
    }

    /// Wakes readers waiting for new offsets.
    fn publish(&self) {
        self.view.watermarks.send_if_modified(|w| {
            let changed = *w != self.marks;
            *w = self.marks;
            changed
        });
    }
}

struct Inner {
    /// The group's partitions, by number.
    partitions: BTreeMap<u32, Partition>,
    split: SplitState,
    /// The group's folder and its segment size (a split creates partitions in it).
    dir: PathBuf,
    segment_bytes: u64,
    views: Arc<GroupViews>,
    applied: AppliedState,
    /// The folder of the batch files in use (one folder per partition inside it): a
    /// snapshot is installed into a new one, and the checkpoint naming it switches over
    /// atomically.
    batches: String,
    /// The node's object store and stream index cache.
    storage: GroupStorage,
}

/// A Raft group's openraft state machine: the partitions the group replicates, each with
/// its own offsets, batch files and state, applied in the order of the group's one log.
/// Cloning shares it.
#[derive(Clone)]
pub struct PartitionStateMachine {
    dir: PathBuf,
    segment_bytes: u64,
    inner: Arc<Mutex<Inner>>,
    views: Arc<GroupViews>,
    /// One checkpoint at a time: a snapshot build writes its checkpoint outside `inner`'s
    /// lock, and must not interleave with an install's.
    checkpointing: Arc<Mutex<()>>,
    /// Whether a snapshot openraft's policy asks for is built now (none: always).
    compaction: Option<Arc<CompactionGate>>,
    /// For a tiered topic on a node with a tier: the store its partitions' large stream
    /// index runs go to, and from how many bytes.
    index_uploads: Option<(Arc<RemoteStore>, u64)>,
}

/// The version of the stream `reader` reads as of `marks` (its appends below the high
/// watermark), and its appends to read from `from_version` on that retention kept: at most
/// `max_events` (and 65,536).
fn stream_appends(
    reader: &StreamReader,
    marks: Watermarks,
    from_version: u64,
    max_events: usize,
) -> Result<(u64, Vec<StreamAppend>), StoreError> {
    // Appends applied but not yet published lie at or above the high watermark.
    let version = reader.version_below(marks.high)?;
    // Appends below the low watermark (retention dropped them; a merge of the index
    // forgets them later) come first: start past them.
    let kept_from = if marks.low == 0 {
        1
    } else {
        reader
            .first_ending_after(marks.low)?
            .map_or(u64::MAX, |a| a.first_version)
    };
    let max_events = max_events.min(MAX_STREAM_READ_EVENTS);
    let mut wanted: Vec<StreamAppend> = Vec::new();
    let mut from = from_version.max(kept_from);
    while wanted.len() < max_events && from <= version {
        let appends = reader.appends_from(from, max_events)?;
        let Some(last) = appends.last() else {
            break;
        };
        from = last.last_version() + 1;
        wanted.extend(
            appends
                .into_iter()
                .filter(|a| a.end() > marks.low && a.base < marks.high),
        );
    }
    wanted.truncate(max_events);
    Ok((version, wanted))
}

/// How long objects of stream index runs merged away stay in the store before they are
/// deleted: a replica behind, and reads that began before, may still read them meanwhile.
const INDEX_OBJECT_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Deletes objects of stream index runs no checkpoint names any more, after
/// [`INDEX_OBJECT_GRACE`], in the background (a failure leaves the object over, logged).
fn delete_index_objects(store: Arc<RemoteStore>, keys: Vec<String>) {
    tokio::spawn(async move {
        tokio::time::sleep(INDEX_OBJECT_GRACE).await;
        for key in keys {
            if let Err(e) = store.delete(&key).await {
                tracing::warn!(%key, error = %e, "deleting a stream index run's object failed; it is left over");
            }
        }
    });
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn read_checkpoint(dir: &Path) -> Result<Option<Checkpoint>, StoreError> {
    let path = dir.join(CHECKPOINT);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io(path.display().to_string(), e)),
    };
    let malformed = || StoreError::io(path.display().to_string(), "malformed checkpoint");
    let mut rest = &bytes[..];
    let mut part = || -> Result<Option<&[u8]>, StoreError> {
        if rest.is_empty() {
            return Ok(None);
        }
        let (len, tail) = rest.split_first_chunk::<8>().ok_or_else(malformed)?;
        let len = usize::try_from(u64::from_be_bytes(*len)).map_err(|_| malformed())?;
        if tail.len() < len {
            return Err(malformed());
        }
        let (part, tail) = tail.split_at(len);
        rest = tail;
        Ok(Some(part))
    };
    let mut next = || part()?.ok_or_else(malformed);
    let head: CheckpointHead = codec::decode("partition checkpoint", next()?)?;
    let partitions = (0..head.partitions)
        .map(|_| Ok(codec::decode("partition checkpoint", next()?)?))
        .collect::<Result<Vec<PartitionCheckpoint>, StoreError>>()?;
    let split = match part()? {
        None => SplitState::default(),
        Some(bytes) => codec::decode("partition checkpoint's split state", bytes)?,
    };
    if part()?.is_some() {
        return Err(malformed());
    }
    Ok(Some(Checkpoint {
        meta: head.meta,
        batches: head.batches,
        partitions,
        split,
    }))
}

/// Removes `batches-*` folders other than `keep`.
fn remove_other_batch_folders(dir: &Path, keep: &str) -> Result<(), StoreError> {
    let io = |e: io::Error| StoreError::io(dir.display().to_string(), e);
    for item in std::fs::read_dir(dir).map_err(io)? {
        let item = item.map_err(io)?;
        let name = item.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("batches-") && name != keep {
            std::fs::remove_dir_all(item.path()).map_err(io)?;
        }
    }
    Ok(())
}

fn write_checkpoint(dir: &Path, checkpoint: &Checkpoint) -> Result<(), StoreError> {
    let mut bytes = Vec::new();
    let mut put = |part: Vec<u8>| {
        bytes.extend_from_slice(&(part.len() as u64).to_be_bytes());
        bytes.extend_from_slice(&part);
    };
    put(codec::encode(
        "partition checkpoint",
        &CheckpointHead {
            meta: checkpoint.meta.clone(),
            batches: checkpoint.batches.clone(),
            partitions: checkpoint.partitions.len() as u32,
        },
    )?);
    for partition in &checkpoint.partitions {
        put(codec::encode("partition checkpoint", partition)?);
    }
    if checkpoint.split != SplitState::default() {
        put(codec::encode(
            "partition checkpoint's split state",
            &checkpoint.split,
        )?);
    }
    let tmp = dir.join("checkpoint.tmp");
    let io = |e: io::Error| StoreError::io(tmp.display().to_string(), e);
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    std::io::Write::write_all(&mut file, &bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, dir.join(CHECKPOINT)).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

/// What a checkpoint syncs before it is written: batch files of partitions that applied
/// something since the last one, and stream index runs written since.
#[derive(Default)]
struct Syncs {
    files: Vec<(u32, SyncPlan)>,
    runs: Vec<PathBuf>,
}

/// The folder of `partition`'s batch files inside a group's batches folder.
fn partition_folder(batches: &Path, partition: u32) -> PathBuf {
    batches.join(partition.to_string())
}

impl PartitionStateMachine {
    /// Opens the group kept in `dir` (creating it empty) for `partitions` (those its topic
    /// was created with; the checkpoint adds the children of splits it applied): their batch
    /// files are cut back to the last checkpoint, whose state and applied log id are
    /// restored.
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
        partitions: &[u32],
        storage: GroupStorage,
    ) -> Result<Self, StoreError> {
        ferry_store::create_dir_durably(dir)?;
        let checkpoint = read_checkpoint(dir)?;
        let batches = checkpoint
            .as_ref()
            .map_or_else(|| "batches-0".to_string(), |c| c.batches.clone());
        // Left by an install that did not reach its checkpoint.
        remove_other_batch_folders(dir, &batches)?;
        let mut saved: HashMap<u32, PartitionCheckpoint> = checkpoint
            .as_ref()
            .map(|c| {
                c.partitions
                    .iter()
                    .map(|p| (p.partition, p.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let split = checkpoint
            .as_ref()
            .map(|c| c.split.clone())
            .unwrap_or_default();
        let numbers: std::collections::BTreeSet<u32> = partitions
            .iter()
            .copied()
            .chain(split.seals.keys().copied())
            .collect();
        let mut hosted = BTreeMap::new();
        for number in numbers {
            let saved = saved.remove(&number);
            let extent = saved.as_ref().map(|s| s.extent.clone()).unwrap_or_default();
            let files = BatchFiles::open(
                &partition_folder(&dir.join(&batches), number),
                segment_bytes,
                &extent,
            )?;
            let mut partition = Partition::new(files, number, &storage);
            match saved {
                Some(saved) => partition.restore(saved.state)?,
                None => partition.open_index(&[])?,
            }
            hosted.insert(number, partition);
        }
        if let Some(stray) = saved.keys().min() {
            return Err(StoreError::io(
                dir.display().to_string(),
                format!("the checkpoint holds partition {stray}, which this group does not"),
            ));
        }
        let applied = match checkpoint {
            Some(c) => (c.meta.last_log_id, c.meta.last_membership),
            None => (None, StoredMembershipOf::<TypeConfig>::default()),
        };
        let views = hosted.iter().map(|(n, p)| (*n, p.view.clone())).collect();
        let views = Arc::new(GroupViews::new(views, split.clone()));
        let index_uploads = storage
            .tier
            .clone()
            .zip(storage.index_runs.as_ref().map(|runs| runs.min_bytes));
        Ok(Self {
            dir: dir.to_path_buf(),
            segment_bytes,
            inner: Arc::new(Mutex::new(Inner {
                partitions: hosted,
                split,
                dir: dir.to_path_buf(),
                segment_bytes,
                views: views.clone(),
                applied,
                batches,
                storage,
            })),
            views,
            checkpointing: Arc::new(Mutex::new(())),
            compaction: None,
            index_uploads,
        })
    }

    /// Defers the snapshots openraft's policy asks for while `gate` says a replica catches
    /// up ([`crate::compaction`]).
    pub(crate) fn with_compaction(mut self, gate: Arc<CompactionGate>) -> Self {
        self.compaction = Some(gate);
        self
    }

    /// The group's views, shared: they follow the splits it applies.
    pub fn group_views(&self) -> Arc<GroupViews> {
        self.views.clone()
    }

    /// What a checkpoint of everything applied so far holds, and the batch-file bytes it
    /// needs on disk (of the partitions that applied something since the last one). Take
    /// with the state machine locked (so they agree); write with
    /// [`PartitionStateMachine::write_checkpoint_after`], which needs no lock.
    fn checkpoint_of(&self, inner: &mut Inner) -> Result<(Checkpoint, Syncs), StoreError> {
        let mut partitions = Vec::with_capacity(inner.partitions.len());
        let mut plans = Syncs::default();
        // The stream index's appends since the last checkpoint go to a run of their own,
        // every partition's first: nothing below fails once a dirty mark is taken.
        let mut indexes = Vec::with_capacity(inner.partitions.len());
        for partition in inner.partitions.values() {
            let index = partition
                .view
                .streams
                .write()
                .map_err(storage_err)?
                .checkpoint()?;
            plans.runs.extend(index.to_sync);
            indexes.push((index.runs, partition.small_state()?));
        }
        for ((number, partition), (runs, mut state)) in inner.partitions.iter_mut().zip(indexes) {
            state.stream_runs = runs;
            let files = partition.view.files.read().map_err(storage_err)?;
            partitions.push(PartitionCheckpoint {
                partition: *number,
                state,
                extent: files.extent(),
            });
            if std::mem::take(&mut partition.dirty) {
                plans.files.push((*number, files.sync_plan()));
            }
        }
        let checkpoint = Checkpoint {
            meta: SnapshotMetaOf::<TypeConfig> {
                last_log_id: inner.applied.0,
                last_membership: inner.applied.1.clone(),
            },
            batches: inner.batches.clone(),
            partitions,
            split: inner.split.clone(),
        };
        Ok((checkpoint, plans))
    }

    /// Syncs the batch files `plans` name, records `checkpoint`, then deletes the segments
    /// it no longer needs. Hold `checkpointing`.
    fn write_checkpoint_after(
        &self,
        checkpoint: &Checkpoint,
        plans: &Syncs,
    ) -> Result<(), StoreError> {
        for (_, plan) in &plans.files {
            plan.sync()?;
        }
        for run in &plans.runs {
            ferry_store::fsync_path(run)?;
        }
        write_checkpoint(&self.dir, checkpoint)?;
        for saved in &checkpoint.partitions {
            let Some(view) = self.views.get(saved.partition) else {
                continue;
            };
            let garbage = {
                let mut streams = view.streams.write().map_err(storage_err)?;
                streams.checkpointed(&saved.state.stream_runs);
                streams.take_remote_garbage()
            };
            if let (false, Some((store, _))) = (garbage.is_empty(), &self.index_uploads) {
                delete_index_objects(store.clone(), garbage);
            }
            let mut files = view.files.write().map_err(storage_err)?;
            if let Some((_, plan)) = plans.files.iter().find(|(n, _)| *n == saved.partition) {
                files.mark_synced(plan);
            }
            files.remove_dropped_outside(&saved.extent)?;
            // Offloaded batches still on disk (applied after this checkpoint was taken) wait
            // for the next one.
            let waiting = view.remote_bytes() > 0 && files.holds_dropped();
            view.offloaded_since_checkpoint
                .store(waiting, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Starts the merges of stream index runs now due, in the background: a merge reads and
    /// writes only immutable runs, and its output takes its inputs' place when it is done
    /// (named from the next checkpoint on).
    fn merge_stream_indexes(&self) {
        for view in self.views.all().values() {
            // Uploads go beside merges (a run both take is installed by the first to finish;
            // the other's output is discarded).
            self.upload_stream_index_run(view);
            // Below the published low: at or below the state machine's.
            let low = view.watermarks().low;
            let plan = match view.streams.write() {
                Ok(mut index) => index.merge_due(low),
                Err(_) => None,
            };
            let Some(plan) = plan else { continue };
            let view = view.clone();
            tokio::task::spawn_blocking(move || {
                let inputs = plan.inputs();
                match plan.run(low) {
                    Ok(merged) => {
                        if let Ok(mut index) = view.streams.write() {
                            index.install_merge(merged);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, runs = ?inputs.1, "merging stream index runs failed: a damaged run is not merged again until the partition reopens; other failures are retried later");
                        if let Ok(mut index) = view.streams.write() {
                            index.merge_failed(inputs, &e);
                        }
                    }
                }
            });
        }
    }

    /// Starts the upload of a large stream index run of `view`'s partition to the object
    /// store, in the background, if one is due (a tiered topic's, on a node with a tier).
    fn upload_stream_index_run(&self, view: &Arc<PartitionView>) {
        let Some((_, min_bytes)) = self.index_uploads else {
            return;
        };
        let low = view.watermarks().low;
        let plan = match view.streams.write() {
            Ok(mut index) => index.upload_due(min_bytes, low),
            Err(_) => None,
        };
        let Some(plan) = plan else { return };
        let view = view.clone();
        tokio::spawn(async move {
            let inputs = plan.inputs();
            match plan.run().await {
                Ok(uploaded) => {
                    // Links and opens files: off the runtime's workers.
                    let _ = tokio::task::spawn_blocking(move || {
                        if let Ok(mut index) = view.streams.write() {
                            index.install_merge(uploaded);
                        }
                    })
                    .await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, run = ?inputs.1, "uploading a stream index run failed; retried later");
                    if let Ok(mut index) = view.streams.write() {
                        index.upload_failed(inputs, &e);
                    }
                }
            }
        });
    }

    /// Applies one entry's command: `(partition, command)`. A command that cannot be decoded
    /// or names a partition the group does not hold is answered with an error; an `Err` is
    /// a storage failure that must stop the state machine.
    fn apply_command(
        inner: &mut Inner,
        command: &Bytes,
        touched: &mut Vec<u32>,
    ) -> Result<Bytes, StoreError> {
        // A committed command whose reply cannot be encoded is a bug: stop the group rather
        // than answer a committed write with empty bytes.
        let encoded = |r: Result<Bytes, _>| r.map_err(|e| StoreError::io("partition reply", e));
        match decode_shared::<GroupEntry>("partition entry", command) {
            Ok(GroupEntry::One(command)) => {
                let reply = Self::apply_one(inner, command, touched)?;
                encoded(encode("partition reply", &reply))
            }
            Ok(GroupEntry::Many(commands)) => {
                let replies = commands
                    .into_iter()
                    .map(|c| Self::apply_one(inner, c, touched))
                    .collect::<Result<Vec<_>, _>>()?;
                encoded(encode("partition replies", &replies))
            }
            Err(e) => encoded(encode(
                "partition reply",
                &PartitionReply::Error(ApiError::new(ErrorCode::InvalidRequest, e.to_string())),
            )),
        }
    }

    /// Applies one command to its partition.
    fn apply_one(
        inner: &mut Inner,
        GroupCommand { partition, command }: GroupCommand,
        touched: &mut Vec<u32>,
    ) -> Result<PartitionReply, StoreError> {
        if let PartitionCommand::Split {
            initial,
            partitions,
            children,
        } = command
        {
            return Self::split(inner, partition, initial, partitions, children, touched);
        }
        let layout = inner.split.layout;
        let split_state = &inner.split;
        match inner.partitions.get_mut(&partition) {
            Some(p) => {
                if !touched.contains(&partition) {
                    touched.push(partition);
                }
                // Whatever the command, the next checkpoint syncs this partition's files
                // before it names their lengths (publishes and forwarded batches do not go
                // through `Partition::apply`).
                p.dirty = true;
                match command {
                    PartitionCommand::Publish {
                        batch,
                        appended_at_ms,
                        layout: checked,
                        misrouted,
                    } => {
                        let refusal = if checked != layout {
                            let before = match checked {
                                0 => "before it grew".to_string(),
                                n => format!("at {n} partitions"),
                            };
                            Some(format!(
                                "the topic grew to {layout} partitions while this batch to \
                                 partition {partition} was on its way (its keys were checked \
                                 {before})"
                            ))
                        } else {
                            misrouted
                        };
                        p.append(
                            batch,
                            appended_at_ms,
                            refusal.map(|why| ApiError::new(ErrorCode::WrongPartition, why)),
                        )
                    }
                    PartitionCommand::ForwardedRouted {
                        origin_region,
                        origin_partition,
                        batch,
                        appended_at_ms,
                        routed_by,
                    } => match split_state.forwarded_refusal(partition, routed_by) {
                        Some(why) => Ok(PartitionReply::Error(ApiError::new(
                            ErrorCode::WrongPartition,
                            why,
                        ))),
                        None => {
                            p.forwarded(origin_region, origin_partition, &batch, appended_at_ms)
                        }
                    },
                    command => p.apply(command),
                }
            }
            None => Ok(PartitionReply::Error(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("partition {partition} is not in this Raft group"),
            ))),
        }
    }
}

impl PartitionStateMachine {
    /// Seals `parent` for `children` at its next offset and creates them empty; from here
    /// on the group checks publishes against the topic of `partitions` partitions. The same
    /// split again is answered with the first seal.
    fn split(
        inner: &mut Inner,
        parent: u32,
        initial: u32,
        partitions: u32,
        children: Vec<u32>,
        touched: &mut Vec<u32>,
    ) -> Result<PartitionReply, StoreError> {
        let refuse = |why: String| {
            Ok(PartitionReply::Error(ApiError::new(
                ErrorCode::InvalidRequest,
                why,
            )))
        };
        let Some(offset) = inner.partitions.get(&parent).map(|p| p.marks.high) else {
            return refuse(format!("partition {parent} is not in this Raft group"));
        };
        if let Some(&(_, sealed)) = children.iter().find_map(|c| inner.split.seals.get(c)) {
            return Ok(PartitionReply::Sealed { offset: sealed });
        }
        let wrong = children.iter().find(|c| {
            inner.partitions.contains_key(c)
                || ferry_proto::parent_of(**c, initial) != Some(parent)
                || **c >= partitions
        });
        if children.is_empty() || partitions < inner.split.layout || wrong.is_some() {
            return refuse(format!(
                "partition {parent} cannot split into {children:?} of {partitions} partitions \
                 (created with {initial}; the group is at {})",
                inner.split.layout
            ));
        }
        let folder = inner.dir.join(&inner.batches);
        // What the parent received from other regions' partitions, it received for its
        // children's keys too (forwarders routed them to it until now): a child starts where
        // its parent is, so no forwarder sends them again nor skips any.
        let received = inner.partitions[&parent].received.clone();
        for &child in &children {
            let files = BatchFiles::open(
                &partition_folder(&folder, child),
                inner.segment_bytes,
                &Extent::default(),
            )?;
            let mut partition = Partition::new(files, child, &inner.storage);
            partition.open_index(&[])?;
            partition.dirty = true;
            *partition.view.received.write().map_err(storage_err)? = received.clone();
            partition.received = received.clone();
            inner.partitions.insert(child, partition);
            inner.split.seals.insert(child, (parent, offset));
            touched.push(child);
        }
        inner.split.initial = initial;
        inner.split.layout = partitions;
        inner.publish_partitions();
        Ok(PartitionReply::Sealed { offset })
    }
}

impl Inner {
    /// Shows the partitions and split state held now to readers.
    fn publish_partitions(&self) {
        let views = self
            .partitions
            .iter()
            .map(|(n, p)| (*n, p.view.clone()))
            .collect();
        self.views.set(views, self.split.clone());
    }
}

impl RaftSnapshotBuilder<TypeConfig> for PartitionStateMachine {
    type SnapshotData = SnapshotData;

    /// Records a checkpoint. openraft keeps only the meta of a built snapshot, so the data is
    /// left empty here and streamed from `get_current_snapshot` when a follower needs it.
    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, SnapshotData>, io::Error> {
        let _one = self.checkpointing.lock().await;
        let (checkpoint, plans) = {
            let mut inner = self.inner.lock().await;
            self.checkpoint_of(&mut inner)?
        };
        // Outside the state machine's lock: applies (and so acknowledgements) go on while the
        // fsyncs run. The checkpoint names the extents taken above; later appends lie beyond
        // them and come back from the Raft log after a restart.
        let started = std::time::Instant::now();
        if let Err(e) = self.write_checkpoint_after(&checkpoint, &plans) {
            // Those files still need syncing before a checkpoint may name them.
            let mut inner = self.inner.lock().await;
            for (number, _) in &plans.files {
                if let Some(p) = inner.partitions.get_mut(number) {
                    p.dirty = true;
                }
            }
            return Err(e.into());
        }
        tracing::debug!(took = ?started.elapsed(), synced = plans.files.len(), "wrote a partition group checkpoint");
        drop(_one);
        self.merge_stream_indexes();
        Ok(SnapshotOf::<TypeConfig, SnapshotData> {
            meta: checkpoint.meta,
            snapshot: SnapshotData::from_bytes(Bytes::new()),
        })
    }
}

impl RaftStateMachine<TypeConfig> for PartitionStateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<AppliedState, io::Error> {
        Ok(self.inner.lock().await.applied.clone())
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut inner = self.inner.lock().await;
        let inner = &mut *inner;
        let mut replies = Vec::new();
        let mut touched = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            let reply = match entry.payload {
                EntryPayload::Blank => Bytes::new(),
                EntryPayload::Normal(ref command) => {
                    Self::apply_command(inner, &command.0, &mut touched)?
                }
                EntryPayload::Membership(ref membership) => {
                    inner.applied.1 = StoredMembershipOf::<TypeConfig>::new(
                        Some(entry.log_id),
                        membership.clone(),
                    );
                    Bytes::new()
                }
            };
            inner.applied.0 = Some(entry.log_id);
            if let Some(responder) = responder {
                replies.push((responder, reply));
            }
        }
        let mut offloaded = false;
        for number in touched {
            if let Some(p) = inner.partitions.get_mut(&number) {
                p.publish();
                offloaded |= std::mem::take(&mut p.offloaded_now);
            }
        }
        if offloaded {
            inner.views.offloaded.send_modify(|n| *n += 1);
        }
        for (responder, reply) in replies {
            responder.send(ferry_store::Reply(reply));
        }
        Ok(())
    }

    async fn try_create_snapshot_builder(&mut self, force: bool) -> Option<Self::SnapshotBuilder> {
        if let (false, Some(gate)) = (force, &self.compaction) {
            let applied = self.inner.lock().await.applied.0.map_or(0, |l| l.index);
            if !gate.allows_build(applied) {
                return None;
            }
        }
        Some(self.clone())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        mut snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let _one = self.checkpointing.lock().await;
        // Into a new folder: until the checkpoint naming it is written, a restart still finds
        // the old checkpoint and its files intact, and readers read the old files meanwhile.
        let generation: u64 = self
            .inner
            .lock()
            .await
            .batches
            .strip_prefix("batches-")
            .and_then(|g| g.parse().ok())
            .unwrap_or(0);
        let next = format!("batches-{}", generation + 1);
        let folder = self.dir.join(&next);
        let partitions = self.views.numbers();
        let segment_bytes = self.segment_bytes;
        let receiving = folder.clone();
        let cache = self.inner.lock().await.storage.index_cache.clone();
        let received = tokio::task::spawn_blocking(move || {
            // The decoder reads field by field: buffered, not a chunk per field.
            let mut data = io::BufReader::with_capacity(1 << 16, &mut snapshot);
            let received =
                receive_snapshot(&mut data, &partitions, &receiving, segment_bytes, &cache)?;
            let mut states = Vec::with_capacity(received.parts.len());
            for part in &received.parts {
                let state: SmallState = codec::decode("partition snapshot", &part.state)?;
                if part.runs != state.stream_runs {
                    return Err(StoreError::io(
                        "partition snapshot",
                        format!(
                            "partition {}'s state names stream index runs {:?}, the snapshot carried {:?}",
                            part.partition, state.stream_runs, part.runs
                        ),
                    ));
                }
                let (low, high) = (state.local_from(), state.marks.high);
                if let Some((from, to)) = part.files.first_gap(low, high) {
                    return Err(StoreError::io(
                        "partition snapshot",
                        format!(
                            "partition {} holds {low}..{high} but its batches lack {from}..{to}",
                            part.partition
                        ),
                    ));
                }
                states.push(state);
            }
            let split: SplitState = if received.group_state.is_empty() {
                SplitState::default()
            } else {
                codec::decode("partition snapshot's split state", &received.group_state)?
            };
            // Beyond the group's partitions, a snapshot holds only children of its splits.
            if let Some(stray) = received.parts.iter().find(|p| {
                !partitions.contains(&p.partition) && !split.seals.contains_key(&p.partition)
            }) {
                return Err(StoreError::io(
                    "partition snapshot",
                    format!(
                        "it holds partition {}, which is neither in this group nor a child of its splits",
                        stray.partition
                    ),
                ));
            }
            Ok::<_, StoreError>((received.parts, states, split))
        })
        .await
        .map_err(io_err)?;
        let (received, states, split) = match received {
            Ok(received) => received,
            Err(e) => {
                if let Err(removing) = std::fs::remove_dir_all(&folder) {
                    tracing::warn!(folder = %folder.display(), error = %removing, "removing a refused snapshot's files failed");
                }
                return Err(e.into());
            }
        };
        let mut inner = self.inner.lock().await;
        for (part, state) in received.into_iter().zip(states) {
            match inner.partitions.get_mut(&part.partition) {
                Some(partition) => {
                    // The new low first (as a trim does): a read between the old and the new
                    // low meanwhile skips rather than finds a hole.
                    partition.view.raise_low(state.marks.low);
                    drop(std::mem::replace(
                        &mut *partition.view.files.write().map_err(io_err)?,
                        part.files,
                    ));
                    partition.restore(state)?;
                    partition.dirty = true;
                }
                None => {
                    // A split's child this replica had not applied yet.
                    let mut partition = Partition::new(part.files, part.partition, &inner.storage);
                    partition.restore(state)?;
                    partition.dirty = true;
                    inner.partitions.insert(part.partition, partition);
                }
            }
        }
        inner.split = split;
        inner.publish_partitions();
        let old = std::mem::replace(&mut inner.batches, next);
        inner.applied = (meta.last_log_id, meta.last_membership.clone());
        let (checkpoint, plans) = self.checkpoint_of(&mut inner)?;
        self.write_checkpoint_after(&checkpoint, &plans)?;
        let old = self.dir.join(old);
        if let Err(e) = std::fs::remove_dir_all(&old) {
            // The checkpoint stands; the next start removes the folder it does not name.
            tracing::warn!(folder = %old.display(), error = %e, "removing the batch files a snapshot replaced failed");
        }
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TypeConfig, SnapshotData>>, io::Error> {
        // A checkpoint being written deletes the segments it no longer names once written:
        // open the current one's before the next can replace it. What they hold is read only
        // as the snapshot is (see `group_snapshot`).
        let _one = self.checkpointing.lock().await;
        let _inner = self.inner.lock().await;
        let Some(checkpoint) = read_checkpoint(&self.dir)? else {
            return Ok(None);
        };
        let folder = self.dir.join(&checkpoint.batches);
        let split = Bytes::from(
            codec::encode("partition snapshot's split state", &checkpoint.split).map_err(io_err)?,
        );
        let mut parts = Vec::with_capacity(checkpoint.partitions.len());
        for saved in checkpoint.partitions {
            parts.push(SnapshotPart {
                partition: saved.partition,
                low: saved.state.local_from(),
                high: saved.state.marks.high,
                state: Bytes::from(
                    codec::encode("partition snapshot", &saved.state).map_err(io_err)?,
                ),
                files: BatchFiles::open_extent(
                    &partition_folder(&folder, saved.partition),
                    &saved.extent,
                )?,
                runs: saved
                    .state
                    .stream_runs
                    .iter()
                    .map(|run| {
                        let path = ferry_store::run_path(
                            &partition_folder(&folder, saved.partition),
                            run.id,
                        );
                        std::fs::File::open(&path)
                            .map(|file| (*run, file))
                            .map_err(|e| io_err(format!("{}: {e}", path.display())))
                    })
                    .collect::<Result<_, _>>()?,
            });
        }
        Ok(Some(SnapshotOf::<TypeConfig, SnapshotData> {
            meta: checkpoint.meta,
            snapshot: SnapshotData::from_source(GroupSnapshotSource::new(parts, split)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use ferry_proto::{Event, Limits, Subject};

    use super::*;
    use crate::command::decode;

    fn batch(producer: Option<u64>, first_seq: u64, count: u32) -> EventBatch {
        let events: Vec<Event> = (0..count)
            .map(|i| {
                Event::new(
                    format!("e{first_seq}-{i}"),
                    "/t",
                    "t",
                    Subject::new("a").unwrap(),
                    vec![0u8; 8],
                )
            })
            .collect();
        let mut b = EventBatch::new(&events, producer, 0, &Limits::default()).unwrap();
        b.first_seq = first_seq;
        b
    }

    /// A group of the one partition 0, as a topic with a group per partition has.
    fn open_one(dir: &Path, segment_bytes: u64) -> Result<PartitionStateMachine, StoreError> {
        PartitionStateMachine::open(dir, segment_bytes, &[0], GroupStorage::default())
    }

    impl PartitionStateMachine {
        /// The read views of the group's partitions as they are now.
        fn views(&self) -> Arc<BTreeMap<u32, Arc<PartitionView>>> {
            self.views.all()
        }

        fn view(&self) -> Arc<PartitionView> {
            self.views.get(0).expect("partition 0")
        }
    }

    /// A one-partition group in `dir` holding offsets 0..12 in three batches of four.
    fn twelve_events(dir: &Path) -> PartitionStateMachine {
        let sm = open_one(dir, 1 << 20).unwrap();
        for seq in 0..3 {
            append(&sm, batch(Some(1), seq * 4, 4));
        }
        sm
    }

    fn run(sm: &PartitionStateMachine, command: PartitionCommand) -> PartitionReply {
        run_on(sm, 0, command)
    }

    fn run_on(
        sm: &PartitionStateMachine,
        partition: u32,
        command: PartitionCommand,
    ) -> PartitionReply {
        let command = encode("c", &GroupEntry::One(GroupCommand { partition, command })).unwrap();
        let mut inner = sm.inner.try_lock().unwrap();
        let mut touched = Vec::new();
        let reply =
            PartitionStateMachine::apply_command(&mut inner, &command, &mut touched).unwrap();
        for p in touched {
            inner.partitions[&p].publish();
        }
        decode("r", &reply).unwrap()
    }

    fn append(sm: &PartitionStateMachine, b: EventBatch) -> PartitionReply {
        run(
            sm,
            PartitionCommand::Append {
                batch: b,
                appended_at_ms: 1,
            },
        )
    }

    fn appended(base_offset: u64, count: u32, duplicate: bool) -> PartitionReply {
        PartitionReply::Appended {
            base_offset,
            count,
            duplicate,
        }
    }

    fn offsets(sm: &PartitionStateMachine, from: u64) -> Vec<(u64, u32)> {
        sm.view()
            .read_local(from, 1 << 20)
            .unwrap()
            .iter()
            .map(|b| (b.base_offset, b.count))
            .collect()
    }

    #[test]
    fn unreadable_forwarding_state_is_an_error_not_a_new_region() {
        let dir = tempfile::tempdir().unwrap();
        let sm = open_one(dir.path(), 1 << 20).unwrap();
        let view = sm.view();
        assert_eq!(
            view.forward_cursor("b").unwrap(),
            None,
            "never forwarded to b"
        );
        assert_eq!(view.received("b", 0).unwrap(), 0);
        // A thread that panics while holding the locks poisons them.
        let poisoner = view.clone();
        let _ = std::thread::spawn(move || {
            let _cursors = poisoner.forward_cursors.write().unwrap();
            let _received = poisoner.received.write().unwrap();
            panic!("poisoning the forwarding state (expected in this test)");
        })
        .join();
        assert!(
            view.forward_cursor("b").is_err(),
            "a poisoned cursor must not read as a region never forwarded to (the forwarder \
             would skip to the high watermark)"
        );
        assert!(view.received("b", 0).is_err(), "nor as nothing received");
    }

    #[test]
    fn offsets_dedupe_and_sequence_checks() {
        let dir = tempfile::tempdir().unwrap();
        let sm = open_one(dir.path(), 1 << 20).unwrap();

        assert_eq!(append(&sm, batch(Some(7), 0, 3)), appended(0, 3, false));
        assert_eq!(append(&sm, batch(None, 0, 2)), appended(3, 2, false));
        assert_eq!(append(&sm, batch(Some(7), 3, 2)), appended(5, 2, false));
        // A resent batch gets its original offsets and is not stored again.
        assert_eq!(append(&sm, batch(Some(7), 0, 3)), appended(0, 3, true));
        assert_eq!(sm.view().watermarks().high, 7);
        // A gap, a partial overlap, a first batch not at 0 and an overflowing sequence are refused.
        let refused = |r: PartitionReply, code: ErrorCode| matches!(r, PartitionReply::Error(e) if e.code == code);
        assert!(refused(
            append(&sm, batch(Some(7), 9, 1)),
            ErrorCode::OutOfOrderSequence
        ));
        assert!(refused(
            append(&sm, batch(Some(7), 4, 2)),
            ErrorCode::OutOfOrderSequence
        ));
        assert!(refused(
            append(&sm, batch(Some(8), 5, 1)),
            ErrorCode::UnknownProducer
        ));
        assert!(refused(
            append(&sm, batch(Some(9), u64::MAX, 2)),
            ErrorCode::InvalidRequest
        ));
        // Sequences all appended before, in another batching: they are in the log.
        assert!(refused(
            append(&sm, batch(Some(7), 1, 2)),
            ErrorCode::AlreadyAppended
        ));
        assert_eq!(
            sm.view().watermarks().high,
            7,
            "refused batches change nothing"
        );

        // Reading back from an offset inside a batch returns that batch first.
        assert_eq!(offsets(&sm, 1), vec![(0, 3), (3, 2), (5, 2)]);
        assert_eq!(offsets(&sm, 5), vec![(5, 2)]);
        assert!(offsets(&sm, 7).is_empty());

        // A batch older than the dedupe window is known to be in the log, not where.
        for seq in 5..5 + DEDUPE_WINDOW as u64 {
            append(&sm, batch(Some(7), seq, 1));
        }
        let high = sm.view().watermarks().high;
        assert!(refused(
            append(&sm, batch(Some(7), 0, 3)),
            ErrorCode::AlreadyAppended
        ));
        assert_eq!(sm.view().watermarks().high, high);
    }

    fn to_stream(
        sm: &PartitionStateMachine,
        stream: &str,
        expected_version: Option<u64>,
        b: EventBatch,
    ) -> PartitionReply {
        run(
            sm,
            PartitionCommand::AppendToStream {
                stream: stream.into(),
                expected_version,
                batch: b,
                appended_at_ms: 1,
            },
        )
    }

    fn stream_appended(base_offset: u64, first_version: u64, version: u64) -> PartitionReply {
        PartitionReply::StreamAppended {
            base_offset,
            first_version,
            version,
        }
    }

    fn conflict(reply: &PartitionReply) -> Option<String> {
        match reply {
            PartitionReply::Error(e) if e.code == ErrorCode::VersionConflict => {
                Some(e.message.clone())
            }
            _ => None,
        }
    }

    /// A stream read back whole: (its version, (version, offset, event id) of each event).
    fn stream(sm: &PartitionStateMachine, name: &str, from: u64) -> (u64, Vec<(u64, u64, String)>) {
        let (version, events) =
            futures::executor::block_on(sm.view().read_stream(name, from, 1000, 1 << 20)).unwrap();
        let events = events
            .into_iter()
            .map(|e| (e.version, e.offset, e.event.id))
            .collect();
        (version, events)
    }

    fn index_len(sm: &PartitionStateMachine, name: &str) -> usize {
        sm.view()
            .streams
            .read()
            .unwrap()
            .reader(name)
            .appends_from(1, usize::MAX)
            .unwrap()
            .len()
    }

    #[test]
    fn stream_versions_are_checked_as_the_append_applies() {
        let dir = tempfile::tempdir().unwrap();
        let sm = open_one(dir.path(), 1 << 20).unwrap();

        // Some(0): the stream must not exist yet.
        assert_eq!(
            to_stream(&sm, "order-1", Some(0), batch(None, 0, 2)),
            stream_appended(0, 1, 2)
        );
        let marks = sm.view().watermarks();
        let bytes = sm.view().stored_bytes();
        let before = stream(&sm, "order-1", 0);
        for expected in [Some(0), Some(1), Some(3)] {
            let reply = to_stream(&sm, "order-1", expected, batch(None, 100, 1));
            let message = conflict(&reply).unwrap_or_else(|| panic!("{reply:?}"));
            assert_eq!(
                message,
                format!(
                    "stream order-1: expected version {}, actual version 2",
                    expected.unwrap()
                )
            );
        }
        // A conflict appends nothing: offsets, bytes, the stream, its index are unchanged.
        assert_eq!(sm.view().watermarks(), marks);
        assert_eq!(sm.view().stored_bytes(), bytes);
        assert_eq!(stream(&sm, "order-1", 0), before);
        assert_eq!(index_len(&sm, "order-1"), 1);

        // None appends whatever the version; versions continue across batches, and other
        // streams and plain appends interleave in the partition.
        assert_eq!(
            to_stream(&sm, "order-1", None, batch(None, 10, 3)),
            stream_appended(2, 3, 5)
        );
        assert_eq!(
            to_stream(&sm, "order-2", None, batch(None, 20, 1)),
            stream_appended(5, 1, 1)
        );
        assert_eq!(append(&sm, batch(None, 30, 2)), appended(6, 2, false));
        assert_eq!(
            to_stream(&sm, "order-1", Some(5), batch(None, 40, 1)),
            stream_appended(8, 6, 6)
        );
        assert_eq!(
            to_stream(&sm, "order-2", Some(1), batch(None, 50, 2)),
            stream_appended(9, 2, 3)
        );
        assert!(conflict(&to_stream(&sm, "order-2", Some(0), batch(None, 60, 1))).is_some());

        let ids = |seq: u64, n: u64| (0..n).map(move |i| format!("e{seq}-{i}"));
        let mut whole: Vec<(u64, u64, String)> = ids(0, 2)
            .chain(ids(10, 3))
            .chain(ids(40, 1))
            .zip([0, 1, 2, 3, 4, 8])
            .enumerate()
            .map(|(i, (id, offset))| (i as u64 + 1, offset, id))
            .collect();
        assert_eq!(stream(&sm, "order-1", 0), (6, whole.clone()));
        assert_eq!(stream(&sm, "order-1", 1), (6, whole.clone()));
        // From a version inside a batch; past the end; at most so many events.
        assert_eq!(stream(&sm, "order-1", 4), (6, whole.split_off(3)));
        assert_eq!(stream(&sm, "order-1", 7), (6, vec![]));
        let (_, two) =
            futures::executor::block_on(sm.view().read_stream("order-1", 2, 2, 1 << 20)).unwrap();
        assert_eq!(two.iter().map(|e| e.version).collect::<Vec<_>>(), [2, 3]);
        // A byte budget still returns one event.
        let (_, one) =
            futures::executor::block_on(sm.view().read_stream("order-1", 1, 100, 1)).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(
            stream(&sm, "order-2", 0).1,
            vec![
                (1, 5, "e20-0".into()),
                (2, 9, "e50-0".into()),
                (3, 10, "e50-1".into())
            ]
        );
        assert_eq!(stream(&sm, "nobody", 0), (0, vec![]));
        assert_eq!(sm.view().stream_version("order-2").unwrap(), 3);
        // An empty batch is refused and changes nothing.
        let mut empty = batch(None, 0, 1);
        empty.count = 0;
        assert!(matches!(
            to_stream(&sm, "order-3", Some(0), empty),
            PartitionReply::Error(e) if e.code == ErrorCode::InvalidRequest
        ));
        assert_eq!(sm.view().stream_version("order-3").unwrap(), 0);
    }

    #[test]
    fn a_producer_resend_to_a_stream_is_answered_with_the_original_append() {
        let dir = tempfile::tempdir().unwrap();
        let sm = open_one(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            to_stream(&sm, "s", Some(0), batch(Some(7), 0, 2)),
            stream_appended(0, 1, 2)
        );
        assert_eq!(
            to_stream(&sm, "s", Some(2), batch(Some(7), 2, 1)),
            stream_appended(2, 3, 3)
        );
        // The resends expect the versions the originals moved: still the original answers,
        // and nothing is appended or counted again.
        for expected in [Some(0), None, Some(3)] {
            assert_eq!(
                to_stream(&sm, "s", expected, batch(Some(7), 0, 2)),
                stream_appended(0, 1, 2)
            );
        }
        assert_eq!(
            to_stream(&sm, "s", Some(2), batch(Some(7), 2, 1)),
            stream_appended(2, 3, 3)
        );
        assert_eq!(sm.view().stream_version("s").unwrap(), 3);
        assert_eq!(sm.view().watermarks().high, 3);
        assert_eq!(index_len(&sm, "s"), 2);

        // A conflicting batch does not use up its sequence.
        assert!(conflict(&to_stream(&sm, "s", Some(1), batch(Some(7), 3, 1))).is_some());
        assert_eq!(
            to_stream(&sm, "s", Some(3), batch(Some(7), 3, 1)),
            stream_appended(3, 4, 4)
        );
        // A producer batch appended elsewhere (plain, or to another stream) is not this
        // stream's: refused, and nothing changes.
        assert_eq!(append(&sm, batch(Some(7), 4, 1)), appended(4, 1, false));
        for name in ["s", "other"] {
            assert!(matches!(
                to_stream(&sm, name, None, batch(Some(7), 4, 1)),
                PartitionReply::Error(e) if e.code == ErrorCode::InvalidRequest && e.message.contains("not to stream")
            ));
        }
        // Already appended in another batching.
        assert!(matches!(
            to_stream(&sm, "s", None, batch(Some(7), 1, 1)),
            PartitionReply::Error(e) if e.code == ErrorCode::AlreadyAppended
        ));
        assert_eq!(sm.view().stream_version("s").unwrap(), 4);
        assert_eq!(sm.view().stream_version("other").unwrap(), 0);
        assert_eq!(sm.view().watermarks().high, 5);
    }

    #[tokio::test]
    async fn streams_survive_trim_restart_and_snapshot_install() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open_one(&dir.path().join("a"), 4096).unwrap();
        // "s" gets every other batch of 4 events, by producer 1; plain batches between.
        for seq in 0..50 {
            let b = batch(Some(1), seq * 4, 4);
            if seq % 2 == 0 {
                let version = seq / 2 * 4;
                assert_eq!(
                    to_stream(&sm, "s", Some(version), b),
                    stream_appended(seq * 4, version + 1, version + 4)
                );
            } else {
                append(&sm, b);
            }
        }
        assert_eq!(stream(&sm, "s", 0).1.len(), 100);
        run(&sm, PartitionCommand::Trim { before_offset: 100 });
        let low = sm.view().watermarks().low;
        assert!(low >= 96, "{low}");
        // The index forgets what retention dropped; the version stays, reads skip the gap.
        let (version, kept) = stream(&sm, "s", 0);
        assert_eq!(version, 100);
        assert_eq!(kept.first().map(|e| (e.0, e.1)), Some((53, 104)));
        // Until the index's next merge forgets them, its dropped appends are skipped.
        assert_eq!(index_len(&sm, "s"), 25);
        assert!(conflict(&to_stream(&sm, "s", Some(0), batch(None, 900, 1))).is_some());
        // A resend of a batch retention dropped is known to be in the log.
        assert!(matches!(
            to_stream(&sm, "s", None, batch(Some(1), 0, 4)),
            PartitionReply::Error(e) if e.code == ErrorCode::AlreadyAppended
        ));

        sm.build_snapshot().await.unwrap();
        let at_checkpoint = stream(&sm, "s", 0);
        // Applied after the checkpoint: the Raft log would apply it again after a crash.
        assert_eq!(
            to_stream(&sm, "s", Some(100), batch(Some(1), 200, 2)),
            stream_appended(200, 101, 102)
        );
        drop(sm);

        let sm = open_one(&dir.path().join("a"), 4096).unwrap();
        assert_eq!(stream(&sm, "s", 0), at_checkpoint);
        assert_eq!(
            to_stream(&sm, "s", Some(100), batch(Some(1), 200, 2)),
            stream_appended(200, 101, 102)
        );
        // ... and the resend of a batch before the checkpoint still finds its original.
        assert_eq!(
            to_stream(&sm, "s", Some(0), batch(Some(1), 192, 4)),
            stream_appended(192, 97, 100)
        );

        // A follower installs the snapshot and holds the same streams.
        let mut sm = sm;
        sm.build_snapshot().await.unwrap();
        let snapshot = sm.get_current_snapshot().await.unwrap().unwrap();
        let mut follower = open_one(&dir.path().join("b"), 4096).unwrap();
        follower
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        assert_eq!(stream(&follower, "s", 0), stream(&sm, "s", 0));
        assert_eq!(stream(&follower, "s", 99), stream(&sm, "s", 99));
        assert!(conflict(&to_stream(&follower, "s", Some(100), batch(None, 900, 1))).is_some());
        assert_eq!(
            to_stream(&follower, "s", None, batch(Some(1), 200, 2)),
            stream_appended(200, 101, 102)
        );
        drop(follower);
        let follower = open_one(&dir.path().join("b"), 4096).unwrap();
        assert_eq!(stream(&follower, "s", 0), stream(&sm, "s", 0));
        assert_eq!(
            to_stream(&follower, "s", Some(102), batch(None, 900, 1)),
            to_stream(&sm, "s", Some(102), batch(None, 900, 1)),
        );
    }

    /// `rounds` rounds of appends to streams "a", "b", "a", two events each, a checkpoint
    /// after each round.
    async fn append_rounds(sm: &mut PartitionStateMachine, rounds: u32) {
        for _ in 0..rounds {
            for stream in ["a", "b", "a"] {
                let reply = to_stream(sm, stream, None, batch(None, 0, 2));
                assert!(
                    matches!(reply, PartitionReply::StreamAppended { .. }),
                    "{reply:?}"
                );
            }
            sm.build_snapshot().await.unwrap();
        }
    }

    /// Runs of the stream index in the partition's folder, and those the index holds.
    fn runs_of(sm: &PartitionStateMachine) -> (usize, usize) {
        let view = sm.view();
        let index = view.streams.read().unwrap();
        let dir = view.files.read().unwrap().dir().to_path_buf();
        let files = std::fs::read_dir(dir)
            .unwrap()
            .filter(|f| f.as_ref().unwrap().path().extension() == Some("run".as_ref()))
            .count();
        (files, index.runs().len())
    }

    #[tokio::test]
    async fn checkpoints_write_stream_index_runs_and_merges_keep_them_few_and_forget_dropped_appends(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open_one(dir.path(), 4096).unwrap();
        // Offsets 6r, 6r + 2 and 6r + 4 in round r.
        append_rounds(&mut sm, 16).await;
        // Merges start after checkpoints (one at a time per partition): take checkpoints
        // until `done`.
        async fn wait_for(
            sm: &mut PartitionStateMachine,
            what: &str,
            done: impl Fn(&PartitionStateMachine) -> bool,
        ) {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !done(sm) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{what}: not within 10 s"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                sm.build_snapshot().await.unwrap();
            }
        }
        // Sixteen checkpoints wrote sixteen runs; merges in the background leave a few.
        wait_for(&mut sm, "merges", |sm| runs_of(sm).1 < 4).await;
        assert_eq!(sm.view().stream_version("a").unwrap(), 64);
        assert_eq!(sm.view().stream_version("b").unwrap(), 32);
        assert_eq!(index_len(&sm, "a"), 32);
        assert_eq!(stream(&sm, "b", 0).1.len(), 32);
        // Offsets below 64 go: merges forget their appends, each stream's version stays.
        run(&sm, PartitionCommand::Trim { before_offset: 64 });
        let low = sm.view().watermarks().low;
        assert_eq!(low, 64);
        for _ in 0..8 {
            to_stream(&sm, "c", None, batch(None, 0, 1));
            sm.build_snapshot().await.unwrap();
        }
        let kept = (0..16u64)
            .flat_map(|r| [6 * r, 6 * r + 4])
            .filter(|base| base + 2 > low)
            .count();
        wait_for(&mut sm, "forgetting", |sm| index_len(sm, "a") == kept).await;
        assert_eq!(sm.view().stream_version("a").unwrap(), 64);
        assert_eq!(sm.view().stream_version("b").unwrap(), 32);
        wait_for(&mut sm, "merges", |sm| runs_of(sm).1 < 4).await;
        // A checkpoint names only the runs in use: the merged ones' files go.
        sm.build_snapshot().await.unwrap();
        wait_for(&mut sm, "merges", |sm| runs_of(sm).1 < 4).await;
        sm.build_snapshot().await.unwrap();
        let (files, runs) = runs_of(&sm);
        assert_eq!(files, runs);
        drop(sm);
        let sm = open_one(dir.path(), 4096).unwrap();
        assert_eq!(sm.view().stream_version("a").unwrap(), 64);
        assert_eq!(sm.view().stream_version("c").unwrap(), 8);
        assert_eq!(index_len(&sm, "a"), kept);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tiered_partitions_stream_index_runs_go_to_the_object_store_and_streams_read_through_them(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let bucket = tempfile::tempdir().unwrap();
        let store = Arc::new(
            RemoteStore::open(&ferry_store::RemoteOptions::new(format!(
                "file://{}",
                bucket.path().display()
            )))
            .unwrap(),
        );
        let storage = GroupStorage {
            tier: Some(store.clone()),
            index_cache: Arc::default(),
            index_runs: Some(IndexRunsTier {
                prefix: "r/t".into(),
                min_bytes: 1,
            }),
        };
        let open =
            |path: &Path| PartitionStateMachine::open(path, 4096, &[0], storage.clone()).unwrap();
        let mut sm = open(&dir.path().join("a"));
        append_rounds(&mut sm, 8).await;
        // Uploads (and merges) run in the background after checkpoints: take checkpoints
        // until every run is in the store and a checkpoint names them so.
        let in_store = |sm: &PartitionStateMachine| {
            let view = sm.view();
            let index = view.streams.read().unwrap();
            let runs = index.runs();
            !runs.is_empty() && runs.iter().all(|r| r.is_remote())
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !in_store(&sm) {
            assert!(
                std::time::Instant::now() < deadline,
                "runs not uploaded within 20 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            sm.build_snapshot().await.unwrap();
        }
        sm.build_snapshot().await.unwrap();
        let objects = walk(bucket.path());
        assert!(
            !objects.is_empty() && objects.iter().all(|o| o.contains("r/t/0/stream-index/")),
            "{objects:?}"
        );
        let read = |sm: &PartitionStateMachine, name: &str| {
            let view = sm.view();
            let name = name.to_string();
            async move {
                let (version, events) = view.read_stream(&name, 1, 1000, 1 << 20).await.unwrap();
                let versions: Vec<u64> = events.iter().map(|e| e.version).collect();
                (version, versions)
            }
        };
        let check = |version: u64, versions: Vec<u64>, expected: u64| {
            assert_eq!(version, expected);
            assert_eq!(versions, (1..=expected).collect::<Vec<_>>());
        };
        let fetched = store.stats().fetches.load(Ordering::Relaxed);
        let (version, versions) = read(&sm, "a").await;
        check(version, versions, 32);
        let (version, versions) = read(&sm, "b").await;
        check(version, versions, 16);
        assert!(
            store.stats().fetches.load(Ordering::Relaxed) > fetched,
            "the reads read the objects"
        );
        // Appends check versions from the runs' files, never the store.
        let fetched = store.stats().fetches.load(Ordering::Relaxed);
        assert!(matches!(
            to_stream(&sm, "b", Some(15), batch(None, 0, 1)),
            PartitionReply::Error(_)
        ));
        assert!(matches!(
            to_stream(&sm, "b", Some(16), batch(None, 0, 1)),
            PartitionReply::StreamAppended { version: 17, .. }
        ));
        assert_eq!(store.stats().fetches.load(Ordering::Relaxed), fetched);
        sm.build_snapshot().await.unwrap();
        // A follower installs the snapshot: the runs' files come, the objects are shared.
        let snapshot = sm.get_current_snapshot().await.unwrap().unwrap();
        let mut follower = open(&dir.path().join("b"));
        follower
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        let (version, versions) = read(&follower, "a").await;
        check(version, versions, 32);
        let (version, versions) = read(&follower, "b").await;
        check(version, versions, 17);
        // And a restart returns to them.
        drop(sm);
        let sm = open(&dir.path().join("a"));
        let (version, versions) = read(&sm, "a").await;
        check(version, versions, 32);
    }

    /// The files under `dir`, as paths relative to it.
    fn walk(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    todo.push(path);
                } else {
                    out.push(path.strip_prefix(dir).unwrap().display().to_string());
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn a_restart_returns_to_the_checkpoint_and_reapplies_the_same_way() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open_one(dir.path(), 4096).unwrap();
        for seq in 0..10 {
            append(&sm, batch(Some(7), seq * 4, 4));
        }
        run(
            &sm,
            PartitionCommand::Commit {
                group: "g".into(),
                offset: 12,
            },
        );
        sm.build_snapshot().await.unwrap();
        // Applied after the checkpoint: the Raft log would apply these again after a crash.
        for seq in 10..15 {
            append(&sm, batch(Some(7), seq * 4, 4));
        }
        assert_eq!(sm.view().watermarks().high, 60);
        drop(sm);

        let sm = open_one(dir.path(), 4096).unwrap();
        assert_eq!(sm.view().watermarks().high, 40);
        assert_eq!(sm.view().committed("g").unwrap(), Some(12));
        assert_eq!(offsets(&sm, 36), vec![(36, 4)]);
        // Re-applying gives the same offsets, and the dedupe state came back too.
        assert_eq!(append(&sm, batch(Some(7), 36, 4)), appended(36, 4, true));
        assert_eq!(append(&sm, batch(Some(7), 40, 4)), appended(40, 4, false));
        assert_eq!(offsets(&sm, 40), vec![(40, 4)]);
    }

    fn append_at(sm: &PartitionStateMachine, b: EventBatch, appended_at_ms: u64) -> PartitionReply {
        run(
            sm,
            PartitionCommand::Append {
                batch: b,
                appended_at_ms,
            },
        )
    }

    #[tokio::test]
    async fn idle_producers_expire_by_the_commands_cut_off_and_must_start_again_at_0() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open_one(dir.path(), 4096).unwrap();
        assert!(
            !sm.view().producer_expiry_due(u64::MAX),
            "no producer, nothing due"
        );
        append_at(&sm, batch(Some(1), 0, 2), 1_000);
        append_at(&sm, batch(Some(2), 0, 2), 2_000);
        append_at(&sm, batch(Some(1), 2, 2), 3_000);
        append_at(&sm, batch(None, 0, 1), 9_000);
        assert_eq!(sm.view().producer_count(), 2);
        // The leader asks only when some producer may be idle since before its cut.
        assert!(!sm.view().producer_expiry_due(1_000));
        assert!(sm.view().producer_expiry_due(2_001));
        // The checkpoint keeps each producer's last append.
        sm.build_snapshot().await.unwrap();
        drop(sm);
        let sm = open_one(dir.path(), 4096).unwrap();
        assert!(!sm.view().producer_expiry_due(2_000));
        assert!(sm.view().producer_expiry_due(2_001));

        // Producer 2 last appended at 2 000, producer 1 at 3 000: a cut at 2 500 forgets 2.
        assert_eq!(
            run(
                &sm,
                PartitionCommand::ExpireProducers {
                    idle_before_ms: 2_500
                }
            ),
            PartitionReply::Done
        );
        assert_eq!(sm.view().producer_count(), 1);
        assert!(
            !sm.view().producer_expiry_due(3_000),
            "exact again after the expiry"
        );
        // Producer 1 goes on; producer 2's next batch is refused until numbered from 0 again.
        assert_eq!(
            append_at(&sm, batch(Some(1), 4, 1), 10_000),
            appended(7, 1, false)
        );
        let high = sm.view().watermarks().high;
        match append_at(&sm, batch(Some(2), 2, 2), 10_000) {
            PartitionReply::Error(e) => {
                assert_eq!(e.code, ErrorCode::UnknownProducer);
                assert!(e.message.contains("producer 2"), "{}", e.message);
            }
            other => panic!("expected UnknownProducer, got {other:?}"),
        }
        assert_eq!(
            sm.view().watermarks().high,
            high,
            "the refusal changed nothing"
        );
        assert_eq!(
            append_at(&sm, batch(Some(2), 0, 2), 10_000),
            appended(8, 2, false)
        );
        assert_eq!(
            append_at(&sm, batch(Some(2), 2, 1), 10_000),
            appended(10, 1, false)
        );
        // A cut before every last append forgets nothing.
        run(
            &sm,
            PartitionCommand::ExpireProducers {
                idle_before_ms: 10_000,
            },
        );
        assert_eq!(sm.view().producer_count(), 2);
        assert_eq!(
            append_at(&sm, batch(Some(1), 4, 1), 10_000),
            appended(7, 1, true)
        );
    }

    #[tokio::test]
    async fn trimmed_segments_go_after_a_checkpoint_and_snapshots_carry_what_is_retained() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open_one(&dir.path().join("a"), 4096).unwrap();
        for seq in 0..100 {
            append(&sm, batch(Some(1), seq * 4, 4));
        }
        let segments = || {
            std::fs::read_dir(dir.path().join("a/batches-0/0"))
                .unwrap()
                .count()
        };
        let before = segments();
        assert!(before > 3, "{before} segments");
        run(&sm, PartitionCommand::Trim { before_offset: 300 });
        assert_eq!(sm.view().watermarks().low, 300);
        assert_eq!(offsets(&sm, 0).first(), Some(&(300, 4)));
        assert_eq!(
            segments(),
            before,
            "kept until a checkpoint no longer names them"
        );
        sm.build_snapshot().await.unwrap();
        assert!(segments() < before);

        // A follower installs the snapshot and holds exactly the retained batches.
        let snapshot = sm.get_current_snapshot().await.unwrap().unwrap();
        let mut follower = open_one(&dir.path().join("b"), 4096).unwrap();
        follower
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        assert_eq!(follower.view().watermarks(), sm.view().watermarks());
        assert_eq!(offsets(&follower, 0), offsets(&sm, 0));
        assert_eq!(
            append(&follower, batch(Some(1), 396, 4)),
            appended(396, 4, true)
        );
        drop(follower);
        let follower = open_one(&dir.path().join("b"), 4096).unwrap();
        assert_eq!(offsets(&follower, 0), offsets(&sm, 0));
        // A restart does not bring back what retention dropped, even from a kept segment.
        drop(sm);
        let sm = open_one(&dir.path().join("a"), 4096).unwrap();
        assert_eq!(offsets(&sm, 0).first(), Some(&(300, 4)));
        assert_eq!(sm.view().stored_bytes(), follower.view().stored_bytes());
    }

    #[test]
    fn an_entry_of_several_commands_applies_them_in_order_with_a_reply_each() {
        let dir = tempfile::tempdir().unwrap();
        let sm = PartitionStateMachine::open(dir.path(), 4096, &[0, 3], GroupStorage::default())
            .unwrap();
        let append = |partition: u32, seq| GroupCommand {
            partition,
            command: PartitionCommand::Append {
                batch: batch(Some(7), seq, 2),
                appended_at_ms: 1,
            },
        };
        let entry = GroupEntry::Many(vec![
            append(0, 0),
            append(3, 0),
            append(0, 2),
            append(0, 2),
            append(5, 0),
            append(0, 9),
        ]);
        let mut inner = sm.inner.try_lock().unwrap();
        let mut touched = Vec::new();
        let reply = PartitionStateMachine::apply_command(
            &mut inner,
            &encode("e", &entry).unwrap(),
            &mut touched,
        )
        .unwrap();
        for p in &touched {
            inner.partitions[p].publish();
        }
        let replies: Vec<PartitionReply> = decode("r", &reply).unwrap();
        assert_eq!(replies.len(), 6);
        assert_eq!(replies[0], appended(0, 2, false));
        assert_eq!(
            replies[1],
            appended(0, 2, false),
            "partition 3 counts on its own"
        );
        assert_eq!(replies[2], appended(2, 2, false));
        assert_eq!(
            replies[3],
            appended(2, 2, true),
            "a resend in the same entry"
        );
        assert!(
            matches!(&replies[4], PartitionReply::Error(e) if e.message.contains("partition 5"))
        );
        assert!(
            matches!(&replies[5], PartitionReply::Error(e) if e.code == ErrorCode::OutOfOrderSequence)
        );
        assert_eq!(touched, vec![0, 3]);
        drop(inner);
        assert_eq!(sm.views()[&0].watermarks().high, 4);
        assert_eq!(sm.views()[&3].watermarks().high, 2);
    }

    #[tokio::test]
    async fn a_group_keeps_its_partitions_apart_through_restart_and_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| {
            PartitionStateMachine::open(
                &dir.path().join(name),
                4096,
                &[1, 4],
                GroupStorage::default(),
            )
            .unwrap()
        };
        let append_to = |sm: &PartitionStateMachine, partition, seq| {
            run_on(
                sm,
                partition,
                PartitionCommand::Append {
                    batch: batch(Some(partition.into()), seq, 2),
                    appended_at_ms: 1,
                },
            )
        };
        let mut sm = open("a");
        // Each partition numbers its own offsets, and dedupes its own producers.
        assert_eq!(append_to(&sm, 1, 0), appended(0, 2, false));
        assert_eq!(append_to(&sm, 4, 0), appended(0, 2, false));
        assert_eq!(append_to(&sm, 4, 2), appended(2, 2, false));
        assert_eq!(append_to(&sm, 4, 2), appended(2, 2, true));
        run_on(
            &sm,
            1,
            PartitionCommand::Commit {
                group: "g".into(),
                offset: 1,
            },
        );
        // A partition of another group is refused and changes nothing.
        assert!(matches!(
            append_to(&sm, 2, 0),
            PartitionReply::Error(e) if e.message.contains("partition 2")
        ));
        let marks = |sm: &PartitionStateMachine| {
            sm.views()
                .iter()
                .map(|(p, v)| (*p, v.watermarks().high))
                .collect::<Vec<_>>()
        };
        assert_eq!(marks(&sm), vec![(1, 2), (4, 4)]);
        sm.build_snapshot().await.unwrap();
        // Applied after the checkpoint: a restart goes back to the checkpoint.
        append_to(&sm, 1, 2);
        drop(sm);
        let mut sm = open("a");
        assert_eq!(marks(&sm), vec![(1, 2), (4, 4)]);
        assert_eq!(sm.views()[&1].committed("g").unwrap(), Some(1));
        // A checkpoint after only partition 4 changed syncs only its files, and still names
        // both partitions' state.
        assert_eq!(append_to(&sm, 4, 4), appended(4, 2, false));
        sm.build_snapshot().await.unwrap();
        drop(sm);
        let mut sm = open("a");
        assert_eq!(marks(&sm), vec![(1, 2), (4, 6)]);
        assert_eq!(
            sm.views()[&4].read_local(4, 1 << 20).unwrap()[0].base_offset,
            4
        );
        assert_eq!(sm.views()[&1].committed("g").unwrap(), Some(1));

        // A follower installs the group's snapshot and holds both partitions.
        let snapshot = sm.get_current_snapshot().await.unwrap().unwrap();
        let mut follower = open("b");
        follower
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        assert_eq!(marks(&follower), vec![(1, 2), (4, 6)]);
        assert_eq!(
            follower.views()[&4].read_local(0, 1 << 20).unwrap().len(),
            3
        );
        assert_eq!(append_to(&follower, 4, 2), appended(2, 2, true));
        drop(follower);
        let follower = open("b");
        assert_eq!(marks(&follower), vec![(1, 2), (4, 6)]);
        // A snapshot of another set of partitions is refused and changes nothing.
        let mut other =
            PartitionStateMachine::open(&dir.path().join("c"), 4096, &[1], GroupStorage::default())
                .unwrap();
        let snapshot = sm.get_current_snapshot().await.unwrap().unwrap();
        assert!(other
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .is_err());
        assert_eq!(other.views()[&1].watermarks().high, 0);
        drop(other);
        // A checkpoint holding a partition the group does not is refused at open.
        assert!(PartitionStateMachine::open(
            &dir.path().join("a"),
            4096,
            &[1],
            GroupStorage::default()
        )
        .is_err());
    }

    #[test]
    fn forwarded_batches_follow_the_split_of_their_destination() {
        let dir = tempfile::tempdir().unwrap();
        // Partition 1 of a topic created with four partitions, fed by partition 0 of region a.
        let sm =
            PartitionStateMachine::open(&dir.path().join("g"), 4096, &[1], GroupStorage::default())
                .unwrap();
        let forwarded = |partition, from: u64, to: u64, routed_by| {
            let events = (from..to)
                .map(|o| {
                    (
                        o,
                        Bytes::from(codec::encode("e", &format!("e{o}")).unwrap()),
                    )
                })
                .collect();
            run_on(
                &sm,
                partition,
                PartitionCommand::ForwardedRouted {
                    origin_region: "a".into(),
                    origin_partition: 0,
                    batch: ferry_router::Batch { from, to, events },
                    appended_at_ms: 1,
                    routed_by,
                },
            )
        };
        let committed = |next| PartitionReply::Forwarded(ferry_router::Ack::Committed { next });
        let wrong_partition = |r: &PartitionReply| matches!(r, PartitionReply::Error(e) if e.code == ErrorCode::WrongPartition);
        // Routed for 6 partitions while the group never split: refused, nothing appended.
        assert!(wrong_partition(&forwarded(1, 0, 3, (4, 6))));
        assert_eq!(sm.views()[&1].watermarks().high, 0);
        assert_eq!(forwarded(1, 0, 3, (4, 4)), committed(3));
        // Routed for 5 partitions (partition 1 not split by then): the same key space.
        assert_eq!(forwarded(1, 3, 5, (4, 5)), committed(5));
        let split = PartitionCommand::Split {
            initial: 4,
            partitions: 6,
            children: vec![5],
        };
        assert_eq!(run_on(&sm, 1, split), PartitionReply::Sealed { offset: 5 });
        // The child holds what its parent received: a forwarder starting for it skips none
        // of its keys and sends none again.
        assert_eq!(sm.views()[&5].received("a", 0).unwrap(), 5);
        assert_eq!(forwarded(5, 5, 6, (4, 6)), committed(6));
        // The parent refuses batches routed by the layout before its split.
        assert!(wrong_partition(&forwarded(1, 5, 7, (4, 4))));
        assert!(wrong_partition(&forwarded(1, 5, 7, (4, 5))));
        assert_eq!(sm.views()[&1].watermarks().high, 5);
        assert_eq!(forwarded(1, 5, 7, (4, 6)), committed(7));
        assert_eq!(forwarded(1, 7, 8, (4, 8)), committed(8));
    }

    #[tokio::test]
    async fn a_split_seals_its_parent_at_one_offset_and_its_child_survives_restart_and_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        // Partition 1 of a topic created with four partitions, one group each.
        let open = |name: &str| {
            PartitionStateMachine::open(&dir.path().join(name), 4096, &[1], GroupStorage::default())
                .unwrap()
        };
        let publish = |sm: &PartitionStateMachine, partition, seq, layout, misrouted: bool| {
            run_on(
                sm,
                partition,
                PartitionCommand::Publish {
                    batch: batch(Some(7), seq, 2),
                    appended_at_ms: 1,
                    layout,
                    misrouted: misrouted.then(|| "key k maps to partition 5".to_string()),
                },
            )
        };
        let split = |sm: &PartitionStateMachine, children: Vec<u32>| {
            run_on(
                sm,
                1,
                PartitionCommand::Split {
                    initial: 4,
                    partitions: 6,
                    children,
                },
            )
        };
        let wrong_partition = |r: &PartitionReply| matches!(r, PartitionReply::Error(e) if e.code == ErrorCode::WrongPartition);
        let marks = |sm: &PartitionStateMachine| {
            sm.views()
                .iter()
                .map(|(p, v)| (*p, v.watermarks().high))
                .collect::<Vec<_>>()
        };

        let mut sm = open("a");
        assert_eq!(publish(&sm, 1, 0, 0, false), appended(0, 2, false));
        sm.build_snapshot().await.unwrap();
        assert_eq!(publish(&sm, 1, 2, 0, false), appended(2, 2, false));
        // Partition 6 descends from 2, not 1; nothing changes.
        assert!(matches!(split(&sm, vec![6]), PartitionReply::Error(_)));
        assert_eq!(sm.group_views().numbers(), vec![1]);
        assert_eq!(split(&sm, vec![5]), PartitionReply::Sealed { offset: 4 });
        assert_eq!(split(&sm, vec![5]), PartitionReply::Sealed { offset: 4 });
        assert_eq!(sm.group_views().numbers(), vec![1, 5]);
        let state = sm.group_views().split();
        assert_eq!((state.initial, state.layout), (4, 6));
        assert_eq!(state.seals, BTreeMap::from([(5, (1, 4))]));
        // Checked against the layout before the split, or found misrouted: refused, and
        // nothing appended; a resend of a batch appended before is its duplicate either way.
        assert!(wrong_partition(&publish(&sm, 1, 4, 0, false)));
        assert!(wrong_partition(&publish(&sm, 1, 4, 6, true)));
        assert_eq!(publish(&sm, 1, 2, 0, true), appended(2, 2, true));
        assert_eq!(marks(&sm), vec![(1, 4), (5, 0)]);
        assert_eq!(publish(&sm, 1, 4, 6, false), appended(4, 2, false));
        assert_eq!(publish(&sm, 5, 0, 6, false), appended(0, 2, false));

        // A restart before the next checkpoint goes back to one without the split, and the
        // log applies it again at the same offset.
        drop(sm);
        let mut sm = open("a");
        assert_eq!(marks(&sm), vec![(1, 2)]);
        assert_eq!(publish(&sm, 1, 2, 0, false), appended(2, 2, false));
        assert_eq!(split(&sm, vec![5]), PartitionReply::Sealed { offset: 4 });
        assert_eq!(publish(&sm, 5, 0, 6, false), appended(0, 2, false));
        sm.build_snapshot().await.unwrap();
        drop(sm);
        // After a checkpoint, the child comes back from it.
        let mut sm = open("a");
        assert_eq!(marks(&sm), vec![(1, 4), (5, 2)]);
        assert_eq!(
            sm.group_views().split().seals,
            BTreeMap::from([(5, (1, 4))])
        );
        assert!(wrong_partition(&publish(&sm, 1, 4, 0, false)));

        // A replica that never applied the split takes it from a snapshot.
        let snapshot = sm.get_current_snapshot().await.unwrap().unwrap();
        let mut follower = open("b");
        follower
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        assert_eq!(marks(&follower), vec![(1, 4), (5, 2)]);
        assert_eq!(*follower.group_views().split(), *sm.group_views().split());
        assert_eq!(
            follower.views()[&5].read_local(0, 1 << 20).unwrap().len(),
            1
        );
        drop(follower);
        let follower = open("b");
        assert_eq!(marks(&follower), vec![(1, 4), (5, 2)]);
    }

    /// The whole of `data`, read in pieces of `chunk` bytes through a spool file, as a
    /// follower receives it.
    fn through_spool(mut data: SnapshotData, chunk: usize, spool: &Path) -> SnapshotData {
        let total = data.total().unwrap();
        let mut spool = ferry_store::Spool::create(spool).unwrap();
        loop {
            let piece = data.read_chunk(chunk).unwrap();
            if piece.is_empty() {
                break;
            }
            assert!(piece.len() <= chunk);
            spool.append(&piece).unwrap();
        }
        assert_eq!(
            spool.len(),
            total,
            "the snapshot is as long as it announced"
        );
        spool.finish()
    }

    #[tokio::test]
    async fn a_snapshot_streams_from_the_files_it_was_taken_from_after_a_checkpoint_deleted_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open_one(&dir.path().join("a"), 4096).unwrap();
        for seq in 0..100 {
            append(&sm, batch(Some(1), seq * 4, 4));
        }
        sm.build_snapshot().await.unwrap();
        let taken = sm.get_current_snapshot().await.unwrap().unwrap();
        let expected = offsets(&sm, 0);
        // Retention then drops most of it and the next checkpoint deletes those segments.
        let segments = || {
            std::fs::read_dir(dir.path().join("a/batches-0/0"))
                .unwrap()
                .count()
        };
        let before = segments();
        run(&sm, PartitionCommand::Trim { before_offset: 300 });
        sm.build_snapshot().await.unwrap();
        assert!(segments() < before, "the trimmed segments were deleted");

        // The snapshot taken before still carries every batch it named, in small pieces.
        let data = through_spool(taken.snapshot, 1000, &dir.path().join("spool"));
        let mut follower = open_one(&dir.path().join("b"), 4096).unwrap();
        follower.install_snapshot(&taken.meta, data).await.unwrap();
        assert_eq!(offsets(&follower, 0), expected);
        assert!(
            !dir.path().join("spool").exists(),
            "the spool file went with the installed snapshot"
        );
        drop(follower);
        let follower = open_one(&dir.path().join("b"), 4096).unwrap();
        assert_eq!(offsets(&follower, 0), expected);
    }

    #[tokio::test]
    async fn taking_the_snapshot_reads_no_events_and_sending_it_checks_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open_one(dir.path(), 1 << 20).unwrap();
        for seq in 0..10 {
            append(&sm, batch(Some(1), seq * 4, 4));
        }
        sm.build_snapshot().await.unwrap();
        // Flip a byte of the last batch's events on disk (records end with their events).
        let segment = std::fs::read_dir(dir.path().join("batches-0/0"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut bytes = std::fs::read(&segment).unwrap();
        *bytes.last_mut().unwrap() ^= 0xff;
        std::fs::write(&segment, &bytes).unwrap();
        // What openraft does at every start succeeds without reading the events...
        let mut taken = sm.get_current_snapshot().await.unwrap().unwrap();
        assert!(taken.snapshot.total().unwrap() > 10 * 4 * 8);
        // ... and the damage is found when the snapshot is read to be sent.
        let mut sent = Vec::new();
        let error = std::io::Read::read_to_end(&mut taken.snapshot, &mut sent).unwrap_err();
        assert!(error.to_string().contains("checksum"), "{error}");
    }

    /// Every retained batch of partition 0, through [`PartitionView::read`] (so from the
    /// object store where the manifest says), as (base offset, count).
    async fn read_all(sm: &PartitionStateMachine) -> Vec<(u64, u32)> {
        let view = sm.view();
        let Watermarks { low, high } = view.watermarks();
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut next = low;
        while next < high {
            let batches = view.read(next, 700).await.unwrap();
            assert!(!batches.is_empty(), "nothing read at {next}");
            for b in batches {
                out.push((b.base_offset, b.count));
                next = b.end_offset();
            }
        }
        out
    }

    /// Offloads partition 0's complete batch files as a leader would; answers the objects.
    async fn offload_all(sm: &PartitionStateMachine, tier: &RemoteStore) -> usize {
        let mut objects = 0;
        while let Some(batches) = sm.view().offload_candidate().unwrap() {
            let key = format!("r/t/0/{}", batches[0].base_offset);
            let (bytes, segment) = ferry_store::encode_object(key.clone(), &batches).unwrap();
            tier.put(&key, bytes).await.unwrap();
            assert_eq!(
                run(sm, PartitionCommand::Offloaded { segment }),
                PartitionReply::Done
            );
            objects += 1;
        }
        objects
    }

    #[tokio::test]
    async fn offloaded_batches_leave_the_files_are_read_from_the_store_and_snapshots_carry_only_the_tail(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let tier = Arc::new(
            RemoteStore::open(&ferry_store::RemoteOptions::new(format!(
                "file://{}",
                dir.path().join("store").display()
            )))
            .unwrap(),
        );
        let open = |name: &str| {
            PartitionStateMachine::open(
                &dir.path().join(name),
                4096,
                &[0],
                GroupStorage {
                    tier: Some(tier.clone()),
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let segments = |name: &str| {
            std::fs::read_dir(dir.path().join(name).join("batches-0/0"))
                .map(|d| d.count())
                .unwrap_or(0)
        };
        let mut sm = open("a");
        for seq in 0..100 {
            run(
                &sm,
                PartitionCommand::Append {
                    batch: batch(Some(1), seq * 4, 4),
                    appended_at_ms: seq,
                },
            );
        }
        let everything = read_all(&sm).await;
        assert_eq!(everything.len(), 100);
        let local = sm.view().stored_bytes();
        let files_before = segments("a");
        let objects = offload_all(&sm, &tier).await;
        assert!(objects >= 3, "{objects} objects");
        let view = sm.view();
        let remote = view.remote_segments();
        assert_eq!(remote[0].base, 0);
        assert!(
            remote.windows(2).all(|w| w[0].end == w[1].base),
            "contiguous"
        );
        assert_eq!(view.local_from(), remote.last().unwrap().end);
        assert_eq!(view.stored_bytes() + view.remote_bytes(), local);
        assert_eq!(
            view.watermarks(),
            Watermarks { low: 0, high: 400 },
            "offloading moves no watermark"
        );
        // Readers see no difference.
        assert_eq!(read_all(&sm).await, everything);
        assert!(
            tier.stats().cache_misses.load(Ordering::Relaxed) > 0,
            "read from the store"
        );

        // An object that does not continue the manifest is refused, changing nothing.
        let (_, stray) = ferry_store::encode_object(
            "r/t/0/stray".into(),
            &sm.view().read_local(view.local_from(), 1).unwrap(),
        )
        .unwrap();
        let mut gap = stray.clone();
        gap.base += 1;
        assert!(
            matches!(run(&sm, PartitionCommand::Offloaded { segment: gap }), PartitionReply::Error(e) if e.message.contains("do not follow"))
        );
        assert_eq!(view.remote_segments(), remote);

        // The files go with the next checkpoint; a restart keeps the manifest.
        assert!(view.offloaded_since_checkpoint());
        sm.build_snapshot().await.unwrap();
        assert!(
            segments("a") < files_before,
            "{} of {files_before} files left",
            segments("a")
        );
        assert!(!view.offloaded_since_checkpoint());
        drop((view, sm));
        let mut sm = open("a");
        assert_eq!(sm.view().remote_segments(), remote);
        assert_eq!(read_all(&sm).await, everything);

        // A snapshot carries the manifest and the batch files' tail only.
        let taken = sm.get_current_snapshot().await.unwrap().unwrap();
        let mut data = taken.snapshot;
        let sent = data.total().unwrap();
        assert!(sent < local / 2, "{sent} bytes sent for {local} held");
        let mut follower = open("b");
        follower.install_snapshot(&taken.meta, data).await.unwrap();
        assert_eq!(follower.view().remote_segments(), remote);
        assert_eq!(read_all(&follower).await, everything);

        // Retention drops whole objects from the manifest.
        let first = remote[0].clone();
        run(
            &sm,
            PartitionCommand::Trim {
                before_offset: first.end + 1,
            },
        );
        assert_eq!(sm.view().remote_segments(), remote[1..].to_vec());
        assert_eq!(sm.view().watermarks().low, first.end);
        assert_eq!(
            read_all(&sm).await,
            everything[everything.iter().position(|b| b.0 == first.end).unwrap()..].to_vec()
        );
    }

    #[tokio::test]
    async fn a_checkpoint_syncs_the_files_of_partitions_that_only_took_publishes() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open_one(dir.path(), 1 << 20).unwrap();
        append(&sm, batch(Some(1), 0, 4));
        sm.build_snapshot().await.unwrap();
        // Publishes only (the path a producer's batches take), then a checkpoint: every byte
        // it names must be synced, or a power loss leaves it naming bytes the disk lost.
        for seq in 1..5 {
            let reply = run(
                &sm,
                PartitionCommand::Publish {
                    batch: batch(Some(1), seq * 4, 4),
                    appended_at_ms: 1,
                    layout: 0,
                    misrouted: None,
                },
            );
            assert!(
                matches!(reply, PartitionReply::Appended { .. }),
                "{reply:?}"
            );
        }
        sm.build_snapshot().await.unwrap();
        let unsynced = sm.view().files.read().unwrap().sync_plan().len();
        assert_eq!(unsynced, 0, "the checkpoint named files it had not synced");
    }

    #[test]
    fn a_replica_missing_offsets_it_should_hold_answers_so_rather_than_skip_them() {
        let dir = tempfile::tempdir().unwrap();
        let sm = twelve_events(dir.path());
        // The first two batches gone from the files while the watermarks still say 0..12.
        sm.view().files.write().unwrap().drop_before(8);
        for from in [0, 5] {
            match sm.view().read_local(from, 1 << 20) {
                Err(StoreError::Missing {
                    from: f,
                    to,
                    low,
                    high,
                }) => {
                    assert_eq!((f, to, low, high), (from, 8, 0, 12));
                }
                other => panic!("reading from {from}: {other:?}"),
            }
        }
        assert_eq!(offsets(&sm, 8), vec![(8, 4)]);
        // Dropped by retention, the same offsets are skipped.
        run(&sm, PartitionCommand::Trim { before_offset: 8 });
        assert_eq!(offsets(&sm, 0), vec![(8, 4)]);
    }

    #[test]
    fn a_low_raised_ahead_of_the_applied_state_stays_at_or_below_the_published_high() {
        let dir = tempfile::tempdir().unwrap();
        let sm = twelve_events(dir.path());
        // A trim applied with appends not published yet asks for a low above the high.
        sm.view().raise_low(20);
        let marks = sm.view().watermarks();
        assert_eq!((marks.low, marks.high), (12, 12));
        assert_eq!(sm.view().first_appended_since(0), 12);
    }

    #[tokio::test]
    async fn a_snapshot_whose_batches_leave_a_hole_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = twelve_events(&dir.path().join("a"));
        sm.build_snapshot().await.unwrap();
        let mut taken = sm.get_current_snapshot().await.unwrap().unwrap();
        let mut whole = Vec::new();
        std::io::Read::read_to_end(&mut taken.snapshot, &mut whole).unwrap();
        // Cut the second batch out (and shorten the partition's batch bytes to match).
        let u64_at = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
        let state_len = u64_at(&whole, 8) as usize;
        let batches_len_at = 16 + state_len;
        let first = batches_len_at + 8;
        let record_len = |at: usize| {
            24 + u32::from_be_bytes(whole[at + 20..at + 24].try_into().unwrap()) as usize
        };
        let second = first + record_len(first);
        let cut = record_len(second);
        assert_eq!(
            u64_at(&whole, second),
            4,
            "the second batch starts at offset 4"
        );
        let batches_len = u64_at(&whole, batches_len_at) - cut as u64;
        whole[batches_len_at..batches_len_at + 8].copy_from_slice(&batches_len.to_be_bytes());
        whole.drain(second..second + cut);

        let follower_dir = dir.path().join("b");
        let mut follower = open_one(&follower_dir, 1 << 20).unwrap();
        let data = SnapshotData::from_bytes(Bytes::from(whole));
        let error = follower
            .install_snapshot(&taken.meta, data)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("lack 4..8"), "{error}");
        assert_eq!(follower.view().watermarks().high, 0);
    }

    #[tokio::test]
    async fn a_cut_or_foreign_snapshot_is_refused_and_leaves_no_files_and_no_change() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = PartitionStateMachine::open(
            &dir.path().join("a"),
            4096,
            &[0, 1],
            GroupStorage::default(),
        )
        .unwrap();
        for seq in 0..20 {
            run_on(
                &sm,
                seq % 2,
                PartitionCommand::Append {
                    batch: batch(Some(1), u64::from(seq / 2) * 4, 4),
                    appended_at_ms: 1,
                },
            );
        }
        // A stream, so partition 0 carries a stream index run.
        run_on(
            &sm,
            0,
            PartitionCommand::AppendToStream {
                stream: "s".into(),
                expected_version: Some(0),
                batch: batch(None, 0, 2),
                appended_at_ms: 1,
            },
        );
        sm.build_snapshot().await.unwrap();
        let mut taken = sm.get_current_snapshot().await.unwrap().unwrap();
        let whole = {
            let mut all = Vec::new();
            std::io::Read::read_to_end(&mut taken.snapshot, &mut all).unwrap();
            all
        };
        let follower_dir = dir.path().join("b");
        let mut follower =
            PartitionStateMachine::open(&follower_dir, 4096, &[0, 1], GroupStorage::default())
                .unwrap();
        let unchanged = |follower: &PartitionStateMachine| {
            assert_eq!(follower.views()[&0].watermarks().high, 0);
            assert_eq!(follower.views()[&1].watermarks().high, 0);
            let folders: Vec<String> = std::fs::read_dir(&follower_dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("batches-"))
                .collect();
            assert_eq!(folders, vec!["batches-0".to_string()]);
        };
        // Cut anywhere: inside the count, the first state's length, then at a third, half
        // and one byte short (inside whatever lies there: a header or a batch's events).
        for cut in [2, 10, whole.len() / 3, whole.len() / 2, whole.len() - 1] {
            let data = SnapshotData::from_bytes(Bytes::copy_from_slice(&whole[..cut]));
            assert!(
                follower.install_snapshot(&taken.meta, data).await.is_err(),
                "cut at {cut}"
            );
            unchanged(&follower);
        }
        // Longer than it should be.
        let mut longer = whole.clone();
        longer.push(0);
        let data = SnapshotData::from_bytes(Bytes::from(longer));
        assert!(follower.install_snapshot(&taken.meta, data).await.is_err());
        unchanged(&follower);
        // A first partition's state that does not decode (its length still right).
        let mut garbled = whole.clone();
        let state_len = u64::from_be_bytes(garbled[8..16].try_into().unwrap()) as usize;
        garbled[16..16 + state_len].fill(0xff);
        let data = SnapshotData::from_bytes(Bytes::from(garbled));
        assert!(follower.install_snapshot(&taken.meta, data).await.is_err());
        unchanged(&follower);
        // A stream index run other than the one its state names (the run itself intact).
        let run = {
            let view = sm.views()[&0].clone();
            let index = view.streams.read().unwrap();
            let runs = index.runs();
            assert_eq!(runs.len(), 1);
            std::fs::read(runs[0].path()).unwrap()
        };
        let at = whole
            .windows(run.len())
            .position(|w| w == &run[..])
            .expect("the run in the snapshot");
        let mut renamed = whole.clone();
        // Its header: [u64 id][u64 length][u64 entries][u8 on disk].
        renamed[at - 25..at - 17].copy_from_slice(&999u64.to_be_bytes());
        let data = SnapshotData::from_bytes(Bytes::from(renamed));
        let err = follower
            .install_snapshot(&taken.meta, data)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("stream index runs"), "{err}");
        unchanged(&follower);
        // Another group's partitions.
        let mut other = PartitionStateMachine::open(
            &dir.path().join("c"),
            4096,
            &[0, 2],
            GroupStorage::default(),
        )
        .unwrap();
        let data = SnapshotData::from_bytes(Bytes::from(whole.clone()));
        assert!(other.install_snapshot(&taken.meta, data).await.is_err());
        // The whole one installs.
        let data = SnapshotData::from_bytes(Bytes::from(whole));
        follower.install_snapshot(&taken.meta, data).await.unwrap();
        assert_eq!(follower.views()[&0].watermarks().high, 42);
        assert_eq!(follower.views()[&1].watermarks().high, 40);
        assert_eq!(follower.views()[&0].stream_version("s").unwrap(), 2);
    }
}
