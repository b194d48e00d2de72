//! The regional node: opens storage, runs the metadata group and the Raft groups of its
//! hosted partitions (a topic's partitions share `groups` of them), answers peers, and
//! keeps partition groups in step with the metadata.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ferry_net::{PeerStream, RpcHandler, Transport};
use ferry_proto::NodeId;
use ferry_store::{
    GroupId, NodeStore, SledStateMachine, SnapshotData, Spool, StoreError, StoreOptions, TypeConfig,
};
use futures::future::BoxFuture;
use futures::StreamExt;
use openraft::async_runtime::WatchReceiver;
use openraft::storage::RaftStateMachine;
use openraft::{BasicNode, Raft, SnapshotPolicy};
use tokio::sync::watch;

use crate::coalesce::Proposals;
use crate::command::{decode, encode, GroupCommand, GroupEntry, PartitionCommand};
use crate::compaction::{self, CompactionGate};
use crate::groups::GroupCoordinator;
use crate::leadership::{Leadership, LedPartition};
use crate::metadata::{MetaApp, MetaView, TopicState};
use crate::partition::{GroupViews, PartitionStateMachine, PartitionView};
use crate::peer::{
    error_response, serve_lanes, GroupNetwork, LaneAnswers, LaneRequests, PeerRequest,
    PeerResponse, Router, SNAPSHOT_STALL_PATIENCE,
};
use crate::quiesce::{Quiescence, Quiet};
use crate::{NodeConfig, RegionError};

/// The metadata group's Raft.
pub type MetaRaft = Raft<TypeConfig, SledStateMachine<MetaApp>>;
/// A partition group's Raft.
pub type PartitionRaft = Raft<TypeConfig, PartitionStateMachine>;

/// Name of the metadata group.
pub const META_GROUP: &str = "meta";

/// The id of a topic's Raft group `group` (for a topic with a group per partition, the
/// group of partition `group`).
pub fn partition_group(topic: &str, group: u32) -> GroupId {
    format!("{topic}/{group}")
}

/// A hosted Raft group: the partitions it replicates share its log and leader.
#[derive(Clone)]
pub struct PartitionGroup {
    /// Its Raft. Proposals go through [`PartitionGroup::proposer`].
    pub raft: PartitionRaft,
    /// The applied state of each of its partitions (a split adds its children).
    pub views: Arc<GroupViews>,
    /// Whether it sleeps ([`crate::quiesce`]).
    pub(crate) quiet: Arc<Quiet>,
    /// Publishes waiting to be proposed together ([`crate::coalesce`]).
    pub(crate) proposals: Arc<Proposals>,
}

impl PartitionGroup {
    /// The Raft to propose to: counts the proposal and, if the group sleeps and this node
    /// leads it, wakes it first (a follower's proposal is refused by Raft, and must not start
    /// the follower's election timer while its leader sleeps).
    pub fn proposer(&self) -> &PartitionRaft {
        if self.quiet.note_proposal(|| {
            self.raft.metrics().borrow_watched().state == openraft::ServerState::Leader
        }) {
            self.raft.runtime_config().tick(true);
        }
        &self.raft
    }

    /// Turns the group's tick back on if it sleeps.
    pub(crate) fn wake(&self) {
        if self.quiet.wake() {
            self.raft.runtime_config().tick(true);
        }
    }

    /// Turns the group's tick off; false (and the tick on again) if a proposal came after
    /// the count `proposals_seen` was read.
    pub(crate) fn fall_asleep(&self, proposals_seen: u64) -> bool {
        self.raft.runtime_config().tick(false);
        if self.quiet.fall_asleep(proposals_seen) {
            return true;
        }
        self.raft.runtime_config().tick(true);
        false
    }

    /// Partition `partition` of this group.
    pub(crate) fn hosted(&self, partition: u32) -> Option<HostedPartition> {
        Some(HostedPartition {
            view: self.views.get(partition)?,
            partition,
            group: self.clone(),
        })
    }
}

/// A hosted partition: its state and the Raft group that replicates it.
#[derive(Clone)]
pub struct HostedPartition {
    /// Its number in the topic.
    pub partition: u32,
    /// Its applied state.
    pub view: Arc<PartitionView>,
    /// The group it is replicated by.
    pub group: PartitionGroup,
}

impl HostedPartition {
    /// The Raft to propose this partition's commands to ([`PartitionGroup::proposer`]).
    pub fn proposer(&self) -> &PartitionRaft {
        self.group.proposer()
    }

    /// The group's Raft, to read its state.
    pub fn raft(&self) -> &PartitionRaft {
        &self.group.raft
    }

    /// `command` as an entry of the group's log.
    pub(crate) fn command(
        &self,
        command: PartitionCommand,
    ) -> Result<ferry_store::Command, ferry_proto::ProtoError> {
        encode(
            "partition command",
            &GroupEntry::One(GroupCommand {
                partition: self.partition,
                command,
            }),
        )
        .map(ferry_store::Command)
    }
}

pub(crate) struct Inner<T> {
    pub(crate) id: NodeId,
    pub(crate) config: NodeConfig,
    pub(crate) store: NodeStore,
    pub(crate) router: Router<T>,
    raft_config: Arc<openraft::Config>,
    pub(crate) meta: MetaRaft,
    pub(crate) meta_view: Arc<MetaView>,
    pub(crate) partitions: RwLock<HashMap<GroupId, PartitionGroup>>,
    pub(crate) coordinator: Mutex<GroupCoordinator>,
    shutdown: watch::Sender<bool>,
    pub(crate) client_connections: tokio::sync::Semaphore,
    pub(crate) commit_latency: LatencyCounter,
    /// Gossip and forwarding (set once the node has started).
    pub(crate) mesh: std::sync::OnceLock<Arc<crate::mesh::Mesh>>,
    /// Identifies this run of the node to its peers (a restart changes it).
    pub(crate) boot: u64,
    /// Which groups sleep, which peers are up.
    pub(crate) quiescence: Mutex<Quiescence>,
    /// Elections this node called because a sleeping group's leader went down.
    pub(crate) quiescence_elections: std::sync::atomic::AtomicU64,
    /// The partition groups this node leads.
    pub(crate) leadership: Arc<Leadership>,
    /// Replica moves this node carried out to the end ([`crate::moves`]).
    pub(crate) moves_finished: std::sync::atomic::AtomicU64,
    /// Snapshot builds the partition groups deferred while a replica caught up
    /// ([`crate::compaction`]).
    snapshots_deferred: Arc<std::sync::atomic::AtomicU64>,
    /// The write load of the groups this node hosts ([`crate::load`]).
    pub(crate) load_meter: Mutex<crate::load::LoadMeter>,
    /// One [`Node::reconcile`] pass at a time.
    reconciling: tokio::sync::Mutex<()>,
    /// The region's group loads as last gathered, and when.
    pub(crate) region_loads: tokio::sync::Mutex<Option<(Instant, crate::balance::Loads)>>,
    /// The region's object store for tiered topics, if configured.
    pub(crate) tier: Option<Arc<ferry_store::RemoteStore>>,
    /// Blocks of the partitions' stream index runs read lately.
    pub(crate) index_cache: Arc<ferry_store::IndexCache>,
    /// Uploads to it that failed lately ([`crate::tier`]).
    pub(crate) offloads: crate::tier::Offloads,
    /// Bytes of partition-group snapshots this node received (spooled).
    snapshot_bytes_received: std::sync::atomic::AtomicU64,
}

/// Count and total of a latency, for means over an interval.
#[derive(Default)]
pub(crate) struct LatencyCounter {
    count: std::sync::atomic::AtomicU64,
    total_micros: std::sync::atomic::AtomicU64,
}

impl LatencyCounter {
    pub(crate) fn record(&self, elapsed: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        self.count.fetch_add(1, Relaxed);
        self.total_micros
            .fetch_add(elapsed.as_micros() as u64, Relaxed);
    }
}

/// A running regional node. Cloning shares it.
pub struct Node<T> {
    pub(crate) inner: Arc<Inner<T>>,
}

impl<T> Clone for Node<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

fn raft_err(group: &str, e: impl std::fmt::Display) -> RegionError {
    RegionError::Raft {
        group: group.to_string(),
        reason: e.to_string(),
    }
}

/// The folder of a node's data folder where snapshots being received are spooled.
const INCOMING_SNAPSHOTS: &str = "snapshots-incoming";

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl<T: Transport> Node<T> {
    /// Opens the data folder and starts the node's groups. The node with the lowest id in
    /// `peers` forms the metadata group on first start; a restart recovers from disk.
    pub async fn start(config: NodeConfig, transport: T) -> Result<Self, RegionError> {
        config.validate()?;
        let store = NodeStore::open(
            &config.data_dir,
            config.id,
            StoreOptions {
                cache_bytes: config.cache_bytes,
                segment_bytes: config.wal_segment_bytes,
            },
        )?;
        // Snapshots half received before a restart are of no use: their senders start over.
        let incoming = config.data_dir.join(INCOMING_SNAPSHOTS);
        match std::fs::remove_dir_all(&incoming) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(StoreError::io(incoming.display().to_string(), e).into())
            }
            _ => {}
        }
        std::fs::create_dir_all(&incoming)
            .map_err(|e| StoreError::io(incoming.display().to_string(), e))?;
        let r = config.raft;
        let raft_config = openraft::Config {
            cluster_name: "ferry".into(),
            heartbeat_interval: r.heartbeat_ms,
            election_timeout_min: r.election_min_ms,
            election_timeout_max: r.election_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(r.snapshot_after_entries),
            max_in_snapshot_log_to_keep: r.keep_after_snapshot,
            // Replicate an entry as soon as it is written locally, so the leader's fsync and
            // the followers' run in parallel instead of one after the other.
            broadcast_submitted_on_append: Some(true),
            // openraft keeps a ring of this many entries per lifecycle stage per group for its
            // latency statistics, which Ferry does not read: 1,024 (its default) cost about
            // 150 KB per group.
            log_stage_capacity: Some(16),
            // A follower merges queued appends into one write of at most this many entries
            // (openraft's default, 4,096, made a learner catching up on a log of large
            // batches hold hundreds of MiB in one write).
            max_append_entries: Some(64),
            ..Default::default()
        };
        let raft_config = Arc::new(raft_config.validate().map_err(|e| RegionError::Config {
            key: "raft",
            reason: e.to_string(),
        })?);
        let router = Router::new(transport, config.raft.snapshot_chunk_bytes);
        let meta_group = META_GROUP.to_string();
        let app = MetaApp::default();
        let meta_view = app.view();
        let sm = store.state_machine(&meta_group, app)?;
        let log = store.log_store(&meta_group)?;
        let network = GroupNetwork {
            router: router.clone(),
            group: meta_group.clone(),
        };
        let meta = Raft::new(config.id, raft_config.clone(), network, log, sm)
            .await
            .map_err(|e| raft_err(META_GROUP, e))?;
        let session = Duration::from_millis(config.group_session_timeout_ms);
        let boot = rand::random::<u64>();
        let peer_ids: Vec<NodeId> = config.peers.iter().map(|p| p.id).collect();
        let quiescence = Quiescence::new(
            config.id,
            &peer_ids,
            crate::quiesce::Timing {
                idle_after: Duration::from_millis(r.quiesce_after_ms),
                down_after: Duration::from_millis(r.election_max_ms),
                down_unanswered: Duration::from_millis(r.election_max_ms * 4),
                leader_grace: Duration::from_millis(r.election_max_ms),
            },
            Instant::now(),
        );
        let tier = config
            .tier
            .as_ref()
            .map(ferry_store::RemoteStore::open)
            .transpose()?
            .map(Arc::new);
        let max_conns = config.max_client_connections;
        let config_index_cache_bytes = config.stream_index_cache_bytes;
        let load_sample = Duration::from_millis(config.load_sample_ms);
        let node = Self {
            inner: Arc::new(Inner {
                id: config.id,
                config,
                store,
                router,
                raft_config,
                meta,
                meta_view,
                partitions: RwLock::new(HashMap::new()),
                coordinator: Mutex::new(GroupCoordinator::new(session)),
                shutdown: watch::channel(false).0,
                client_connections: tokio::sync::Semaphore::new(max_conns),
                commit_latency: LatencyCounter::default(),
                mesh: std::sync::OnceLock::new(),
                boot,
                quiescence: Mutex::new(quiescence),
                quiescence_elections: Default::default(),
                leadership: Arc::default(),
                moves_finished: Default::default(),
                snapshots_deferred: Arc::default(),
                load_meter: Mutex::new(crate::load::LoadMeter::new(load_sample)),
                region_loads: tokio::sync::Mutex::new(None),
                reconciling: tokio::sync::Mutex::new(()),
                tier,
                index_cache: Arc::new(ferry_store::IndexCache::new(config_index_cache_bytes)),
                offloads: Default::default(),
                snapshot_bytes_received: Default::default(),
            }),
        };
        node.bootstrap_meta().await?;
        node.spawn_membership_watch();
        node.reconcile().await?;
        node.spawn_reconciler();
        node.spawn_retention();
        node.spawn_tiering();
        node.spawn_moves();
        node.spawn_load_meter();
        crate::quiesce::spawn(&node);
        node.start_mesh().await?;
        Ok(node)
    }

    /// Raft members for `ids`, with the addresses the region knows them by.
    fn members(&self, ids: &[NodeId]) -> BTreeMap<NodeId, BasicNode> {
        ids.iter()
            .map(|id| {
                let addr = self
                    .member_addr(*id)
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                (*id, BasicNode { addr })
            })
            .collect()
    }

    async fn bootstrap_meta(&self) -> Result<(), RegionError> {
        let inner = &self.inner;
        let lowest = inner.config.peers.iter().map(|p| p.id).min();
        if lowest == Some(inner.id)
            && !inner
                .meta
                .is_initialized()
                .await
                .map_err(|e| raft_err(META_GROUP, e))?
        {
            let ids: Vec<_> = inner.config.peers.iter().map(|p| p.id).collect();
            // A region those peers already formed (this node's folder was emptied, or it was
            // removed): forming another would split it.
            let asks = ids
                .iter()
                .filter(|id| **id != inner.id)
                .map(|id| async move {
                    let answer = tokio::time::timeout(
                        Duration::from_secs(1),
                        inner.router.call(*id, &PeerRequest::Identify),
                    )
                    .await;
                    matches!(answer, Ok(Ok(PeerResponse::Identity { member: true, .. })))
                        .then_some(*id)
                });
            let formed: Vec<NodeId> = futures::future::join_all(asks)
                .await
                .into_iter()
                .flatten()
                .collect();
            if !formed.is_empty() {
                return Err(RegionError::Join(format!(
                    "nodes {formed:?} already belong to a region, and this node's data folder \
                     holds none: it would form a second one. Start it as a joining node \
                     instead (no peers; addr and seeds), with an id the region does not have"
                )));
            }
            if let Err(e) = inner.meta.initialize(self.members(&ids)).await {
                tracing::info!(error = %e, "metadata group already formed");
            } else {
                tracing::info!(voters = ?ids, "formed the metadata group");
            }
        }
        Ok(())
    }

    /// Starts the groups this node hosts that are not running yet (those the placement
    /// gives it, and those moving to it), and stops and deletes those it no longer hosts.
    async fn reconcile(&self) -> Result<(), RegionError> {
        let inner = &self.inner;
        // Passes run from the reconciler and from a move's readiness check: one at a time,
        // or one could delete a group's folder while another starts it.
        let _one = inner.reconciling.lock().await;
        let mut wanted = std::collections::HashSet::new();
        // The topics and the moves as of one applied index (see `Placement`).
        let placement = inner.meta_view.placement();
        for (topic, number, moving_in) in placement.groups_on(inner.id) {
            // A group's first partition is numbered like the group.
            let replicas = &topic.replicas[number as usize];
            let group = partition_group(&topic.config.name, number);
            wanted.insert(group.clone());
            if inner
                .partitions
                .read()
                .map(|p| p.contains_key(&group))
                .unwrap_or(true)
            {
                continue;
            }
            // Those the topic was created with: the state machine knows the children of
            // the splits it applied.
            let members: Vec<u32> = topic
                .partitions_of(number)
                .filter(|p| topic.layout.split_of(*p).is_none())
                .collect();
            if moving_in && !inner.store.groups().contains(&group) {
                // A replica arriving with no log here starts empty: files left by an
                // earlier replica of the group on this node (a retire cut short) go.
                self.remove_partition_dir(&group).await?;
            }
            let r = inner.config.raft;
            let compaction = Arc::new(CompactionGate::new(
                group.clone(),
                compaction::Bounds {
                    keep: r.keep_after_snapshot,
                    max_log: r.max_log_while_catching_up,
                    live_within: Duration::from_millis(r.election_max_ms * 4),
                },
                inner.snapshots_deferred.clone(),
            ));
            let sm = PartitionStateMachine::open(
                &self.partition_dir(&group),
                topic
                    .config
                    .retention
                    .segment_bytes(inner.config.wal_segment_bytes),
                &members,
                crate::partition::GroupStorage {
                    tier: inner.tier.clone(),
                    index_cache: inner.index_cache.clone(),
                    index_runs: topic.config.retention.tiered().then(|| {
                        crate::partition::IndexRunsTier {
                            prefix: format!("{}/{}", inner.config.region, topic.config.name),
                            min_bytes: inner.config.stream_index_upload_bytes,
                        }
                    }),
                },
            )?
            .with_compaction(compaction.clone());
            let views = sm.group_views();
            let log = inner.store.log_store(&group)?;
            let network = GroupNetwork {
                router: inner.router.clone(),
                group: group.clone(),
            };
            let raft = Raft::new(inner.id, inner.raft_config.clone(), network, log, sm)
                .await
                .map_err(|e| raft_err(&group, e))?;
            compaction.watch(raft.metrics());
            // A node the group moves to starts empty and is added by the group's leader.
            if replicas.first() == Some(&inner.id)
                && !moving_in
                && !raft
                    .is_initialized()
                    .await
                    .map_err(|e| raft_err(&group, e))?
            {
                if let Err(e) = raft.initialize(self.members(replicas)).await {
                    tracing::debug!(%group, error = %e, "partition group already formed");
                }
            }
            // A shutdown that ran meanwhile has already drained the map: stop this group
            // too, or it would keep the data folder open.
            let hosted = PartitionGroup {
                raft: raft.clone(),
                views,
                quiet: Arc::default(),
                proposals: Arc::default(),
            };
            let stale = match inner.partitions.write() {
                Ok(mut partitions) if !self.is_shut_down() => {
                    partitions.insert(group.clone(), hosted.clone());
                    false
                }
                _ => true,
            };
            if stale {
                let _ = raft.shutdown().await;
                return Ok(());
            }
            if topic.config.retention.tiered() {
                if inner.tier.is_none() {
                    tracing::error!(%group, "a tiered topic's replica on a node without [tier]: it cannot read offloaded offsets or stream index runs in the store nor, as leader, upload; give every node of the region the same [tier]");
                }
                Self::spawn_checkpoints_after_offloads(hosted.clone());
            }
            Leadership::follow(
                Arc::downgrade(&inner.leadership),
                inner.id,
                topic.config.name.as_str().into(),
                hosted,
            );
            tracing::info!(%group, ?replicas, partitions = members.len(), "started partition group");
        }
        // Groups of topics this node knows that are no longer placed here: their replica
        // moved away. Running ones stop; what a retire cut short by a crash or an error left
        // (a log in the write-ahead log, a folder) goes too.
        let known: std::collections::HashSet<&str> = placement
            .topics
            .iter()
            .map(|t| t.config.name.as_str())
            .collect();
        let unwanted = |g: &GroupId| {
            !wanted.contains(g)
                && g.rsplit_once('/')
                    .is_some_and(|(topic, _)| known.contains(topic))
        };
        let running: Vec<GroupId> = inner
            .partitions
            .read()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        let mut left_over: std::collections::BTreeSet<GroupId> =
            inner.store.groups().into_iter().collect();
        if let Ok(dirs) = std::fs::read_dir(inner.store.path().join("partitions")) {
            left_over.extend(
                dirs.flatten()
                    .filter_map(|d| d.file_name().into_string().ok())
                    .filter_map(|name| {
                        let (topic, group) = name.rsplit_once('@')?;
                        Some(format!("{topic}/{group}"))
                    }),
            );
        }
        left_over.remove(META_GROUP);
        for group in running.iter().chain(left_over.iter()) {
            if unwanted(group) {
                self.retire_group(group).await?;
            }
        }
        Ok(())
    }

    /// Where a partition group keeps its state and batch files.
    fn partition_dir(&self, group: &GroupId) -> std::path::PathBuf {
        self.inner
            .store
            .path()
            .join("partitions")
            .join(group.replace('/', "@"))
    }

    /// Stops a group whose replica left this node (if it runs) and deletes what it held
    /// here: its log (durably), then its folder. Safe to run again on what is left.
    async fn retire_group(&self, group: &GroupId) -> Result<(), RegionError> {
        let hosted = self
            .inner
            .partitions
            .write()
            .ok()
            .and_then(|mut p| p.remove(group));
        if let Some(hosted) = hosted {
            if let Err(e) = hosted.raft.shutdown().await {
                tracing::warn!(%group, error = %e, "stopping a retired group");
            }
        }
        if self.inner.store.groups().contains(group) {
            self.inner
                .store
                .log_store(group)?
                .drop_group()
                .await
                .map_err(|e| StoreError::io(format!("dropping the log of {group}"), e))?;
        }
        self.remove_partition_dir(group).await?;
        tracing::info!(%group, "replica moved away: group stopped and its data deleted");
        Ok(())
    }

    /// Whether this node runs `group` of `topic` as the target of the group's recorded move:
    /// it has applied the move, and a reconcile pass since has started the group (empty, or
    /// its earlier replica here if that was never deleted), so no pass will delete it while
    /// the move stands. Until then the group's leader does not add it as a learner: an earlier
    /// replica still being retired here would answer the leader, then lose its log.
    pub(crate) async fn ready_for_replica(&self, topic: &str, group: u32) -> bool {
        let targeted = self
            .inner
            .meta_view
            .move_of(topic, group)
            .is_some_and(|m| m.to == self.inner.id);
        if !targeted {
            return false;
        }
        // In a task of its own: the asker's deadline must not cut a pass short between
        // starting a group and recording it.
        let node = self.clone();
        match tokio::spawn(async move { node.reconcile().await }).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(topic, group, error = %e, "starting partition groups"),
            Err(e) => tracing::warn!(topic, group, error = %e, "starting partition groups"),
        }
        let name = partition_group(topic, group);
        self.inner
            .partitions
            .read()
            .is_ok_and(|p| p.contains_key(&name))
    }

    /// Deletes a group's folder (if any).
    async fn remove_partition_dir(&self, group: &GroupId) -> Result<(), RegionError> {
        let dir = self.partition_dir(group);
        tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StoreError::io(dir.display().to_string(), e))
            }
            _ => Ok(()),
        })
        .await
        .map_err(|e| StoreError::io("deleting a group's folder", e))??;
        Ok(())
    }

    fn spawn_reconciler(&self) {
        let weak = Arc::downgrade(&self.inner);
        let mut changes = self.inner.meta_view.subscribe();
        let mut shutdown = self.inner.shutdown.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => return,
                    changed = changes.changed() => if changed.is_err() { return },
                }
                let Some(inner) = weak.upgrade() else { return };
                if let Err(e) = (Node { inner }).reconcile().await {
                    tracing::error!(error = %e, "starting partition groups failed");
                }
            }
        });
    }

    fn spawn_retention(&self) {
        let every = Duration::from_millis(self.inner.config.retention_interval_ms);
        self.spawn_every(every, |node| async move { node.enforce_retention().await });
    }

    /// Runs `round` every `every` (or as soon as the previous one ends, if that is later)
    /// until the node shuts down; a round in progress is dropped at shutdown.
    pub(crate) fn spawn_every<F, Fut>(&self, every: Duration, round: F)
    where
        F: Fn(Node<T>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let weak = Arc::downgrade(&self.inner);
        let mut shutdown = self.inner.shutdown.subscribe();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => return,
                }
                let Some(inner) = weak.upgrade() else { return };
                tokio::select! {
                    () = round(Node { inner }) => {}
                    _ = shutdown.changed() => return,
                }
            }
        });
    }

    /// Proposes, for the partitions this node leads, trims where retention is exceeded and
    /// producer expiries where some producer has been idle for `producer_expiry_ms`.
    async fn enforce_retention(&self) {
        let inner = &self.inner;
        let mut topic = None;
        let (led, _) = self.led_partitions();
        for LedPartition {
            topic: name,
            hosted,
        } in led.iter()
        {
            let partition = hosted.partition;
            // Led groups come sorted by topic: one metadata lookup per topic.
            if topic
                .as_ref()
                .is_none_or(|t: &Arc<crate::metadata::TopicState>| *t.config.name != **name)
            {
                topic = inner.meta_view.topic(name);
            }
            let Some(topic) = topic.as_ref() else {
                continue;
            };
            let retention = topic.config.retention;
            let now = now_ms();
            let mut trim_to =
                hosted
                    .view
                    .retention_point(now, retention.max_age_ms, retention.max_bytes);
            if retention.keep_until_forwarded {
                // Not past what any region's forwarder has passed (committed), nor at all
                // while a region has no forwarder yet.
                if let Some(floor) = self.forwarded_floor(&topic.config, hosted) {
                    let low = hosted.view.watermarks().low;
                    trim_to = trim_to.map(|t| t.min(floor.offset)).filter(|t| *t > low);
                }
            }
            // Objects the trim drops from the manifest, deleted from the store once it applied.
            let mut dropped: Vec<String> = trim_to
                .map(|before| {
                    hosted
                        .view
                        .remote_segments()
                        .into_iter()
                        .take_while(|r| r.end <= before)
                        .map(|r| r.key)
                        .collect()
                })
                .unwrap_or_default();
            let trim = trim_to.map(|before_offset| PartitionCommand::Trim { before_offset });
            let idle_before_ms = now.saturating_sub(inner.config.producer_expiry_ms);
            let expire = hosted
                .view
                .producer_expiry_due(idle_before_ms)
                .then_some(PartitionCommand::ExpireProducers { idle_before_ms });
            for command in trim.into_iter().chain(expire) {
                let trimming = matches!(command, PartitionCommand::Trim { .. });
                let Ok(command) = hosted.command(command) else {
                    continue;
                };
                match hosted.proposer().client_write(command).await {
                    Err(e) => {
                        tracing::debug!(topic = %name, partition, error = %e, "retention or producer expiry not applied");
                    }
                    Ok(_) if trimming && !dropped.is_empty() => {
                        self.delete_remote(std::mem::take(&mut dropped));
                    }
                    Ok(_) => {}
                }
            }
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The metadata group's Raft.
    pub fn meta_raft(&self) -> &MetaRaft {
        &self.inner.meta
    }

    /// A hosted partition.
    pub fn partition(&self, topic: &str, partition: u32) -> Option<HostedPartition> {
        self.hosted_partition(&*self.inner.meta_view.topic(topic)?, partition)
    }

    /// Partition `partition` of `topic`, if hosted here (a split's child only once its
    /// group applied the split).
    pub(crate) fn hosted_partition(
        &self,
        topic: &TopicState,
        partition: u32,
    ) -> Option<HostedPartition> {
        let group = partition_group(&topic.config.name, topic.group_of(partition));
        self.inner
            .partitions
            .read()
            .ok()?
            .get(&group)?
            .hosted(partition)
    }

    /// The partitions this node leads now, sorted by (topic, partition), and the version of
    /// that set ([`Leadership::led`]).
    pub(crate) fn led_partitions(&self) -> (Arc<[LedPartition]>, u64) {
        self.inner.leadership.led()
    }

    /// Every hosted partition, named `topic/partition`, sorted by name.
    pub fn partitions(&self) -> Vec<(String, HostedPartition)> {
        let mut partitions: Vec<(String, HostedPartition)> = self
            .partition_groups()
            .into_iter()
            .flat_map(|(id, group)| {
                let topic = id
                    .rsplit_once('/')
                    .map_or(id.as_str(), |(t, _)| t)
                    .to_string();
                group
                    .views
                    .numbers()
                    .into_iter()
                    .filter_map(|p| Some((format!("{topic}/{p}"), group.hosted(p)?)))
                    .collect::<Vec<_>>()
            })
            .collect();
        partitions.sort_by(|a, b| a.0.cmp(&b.0));
        partitions
    }

    /// Every hosted partition group.
    pub fn partition_groups(&self) -> Vec<(GroupId, PartitionGroup)> {
        self.inner
            .partitions
            .read()
            .map(|p| p.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// The handler that answers this node's peers.
    pub fn peer_handler(&self) -> Arc<dyn RpcHandler> {
        Arc::new(PeerHandler {
            inner: Arc::downgrade(&self.inner),
        })
    }

    /// Faults this node's transport has injected into its calls so far (all zero without
    /// fault injection).
    pub fn injected_faults(&self) -> ferry_net::InjectedFaults {
        self.inner
            .router
            .link_faults()
            .map(|f| f.injected())
            .unwrap_or_default()
    }

    /// Why this node's storage stopped (fail-stop), if it did: see [`NodeStore::failure`].
    pub fn storage_failure(&self) -> Option<String> {
        self.inner.store.failure()
    }

    /// Storage flush counters: (fsyncs, writes that waited for one, microseconds in fsync).
    pub fn flush_stats(&self) -> (u64, u64, u64) {
        let s = self.inner.store.flusher().stats();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        (load(&s.flushes), load(&s.waiters), load(&s.flush_micros))
    }

    /// Publishes led by this node: (count, total microseconds from submission to Raft until
    /// the batch was committed and applied).
    pub fn commit_latency(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.inner.commit_latency;
        (c.count.load(Relaxed), c.total_micros.load(Relaxed))
    }

    /// Stops every group and background task. Storage is released when the last clone of
    /// this node (and of its views) is dropped.
    pub async fn shutdown(&self) {
        let started = Instant::now();
        self.inner.shutdown.send_replace(true);
        self.stop_mesh().await;
        let groups: Vec<_> = self
            .inner
            .partitions
            .write()
            .map(|mut p| p.drain().collect())
            .unwrap_or_default();
        // Every group at once, timed: one slow group must not hold up the others.
        let partitions = groups.into_iter().map(|(group, g)| async move {
            let at = Instant::now();
            if let Err(e) = g.raft.shutdown().await {
                tracing::warn!(%group, error = %e, "shutdown");
            }
            (group.to_string(), at.elapsed())
        });
        let meta = async {
            let at = Instant::now();
            if let Err(e) = self.inner.meta.shutdown().await {
                tracing::warn!(error = %e, "metadata group shutdown");
            }
            ("metadata".to_string(), at.elapsed())
        };
        let (mut took, meta_took) = futures::join!(futures::future::join_all(partitions), meta);
        took.push(meta_took);
        let elapsed = started.elapsed();
        if elapsed > Duration::from_secs(2) {
            let slowest = took.iter().max_by_key(|(_, d)| *d);
            tracing::warn!(?elapsed, ?slowest, groups = took.len(), "slow shutdown");
        }
    }

    pub(crate) fn is_shut_down(&self) -> bool {
        *self.inner.shutdown.borrow()
    }

    /// Changes to true when the node shuts down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.subscribe()
    }

    /// Replication streams opened to followers, lanes opened on them, request frames sent
    /// and AppendEntries requests in them (all since the node started).
    pub fn replication_counts(&self) -> [u64; 4] {
        let stats = self.inner.router.lane_stats();
        [
            &stats.streams_opened,
            &stats.lanes_opened,
            &stats.frames,
            &stats.requests,
        ]
        .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Snapshots sent to followers and installed, snapshot sends given up part way, and
    /// snapshot builds deferred while a replica caught up (all since the node started).
    pub fn snapshot_counts(&self) -> [u64; 3] {
        let sent = self.inner.router.snapshot_stats();
        [&sent.sent, &sent.failed, &*self.inner.snapshots_deferred]
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Bytes of partition-group snapshots this node received, since it started.
    pub fn snapshot_bytes_received(&self) -> u64 {
        self.inner
            .snapshot_bytes_received
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until the metadata group has a leader, or the deadline passes.
    pub async fn wait_for_meta_leader(&self, deadline: Instant) -> Option<NodeId> {
        let mut metrics = self.inner.meta.metrics();
        loop {
            if let Some(l) = metrics.borrow_watched().current_leader {
                return Some(l);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            if tokio::time::timeout(left, metrics.changed()).await.is_err() {
                return None;
            }
        }
    }
}

struct PeerHandler<T> {
    inner: std::sync::Weak<Inner<T>>,
}

impl<T: Transport> RpcHandler for PeerHandler<T> {
    fn handle(&self, from: NodeId, request: Bytes) -> BoxFuture<'static, Bytes> {
        let inner = self.inner.upgrade();
        Box::pin(async move {
            let Some(inner) = inner else {
                return error_response("node is shutting down");
            };
            let node = Node { inner };
            if node.is_shut_down() {
                return error_response("node is shutting down");
            }
            let request: PeerRequest = match decode("peer request", &request) {
                Ok(r) => r,
                Err(e) => return error_response(e.to_string()),
            };
            let response = node.handle_peer(from, request).await;
            encode("peer response", &response).unwrap_or_else(|e| error_response(e.to_string()))
        })
    }

    fn handle_stream(
        &self,
        _from: NodeId,
        request: Bytes,
        stream: PeerStream,
    ) -> BoxFuture<'static, ()> {
        let inner = self.inner.upgrade();
        Box::pin(async move {
            // A stream refused is dropped: the leader's lanes on it fail and start again.
            let Some(inner) = inner else { return };
            let node = Node { inner };
            if node.is_shut_down() {
                return;
            }
            match decode("peer request", &request) {
                Ok(PeerRequest::SnapshotStream {
                    group,
                    transfer,
                    total,
                    vote,
                    meta,
                }) => {
                    let mut shutdown = node.shutdown_signal();
                    tokio::select! {
                        () = node.receive_snapshot(group, transfer, total, vote, meta, stream) => {}
                        _ = shutdown.wait_for(|down| *down) => {}
                    }
                }
                Ok(PeerRequest::Replicate) => {
                    // Ends with the node: an idle stream must not keep it alive.
                    let mut shutdown = node.shutdown_signal();
                    tokio::select! {
                        () = serve_lanes(stream, |group, requests| node.open_lane(group, requests)) => {}
                        _ = shutdown.wait_for(|down| *down) => {}
                    }
                }
                Ok(_) => tracing::warn!("a peer opened a stream with a request that is not one"),
                Err(e) => tracing::warn!(error = %e, "a peer opened a stream with a bad request"),
            }
        })
    }
}

macro_rules! dispatch_group {
    ($node:expr, $group:expr, |$raft:ident| $body:expr) => {{
        if $group == META_GROUP {
            let $raft = &$node.inner.meta;
            $body
        } else {
            match $node.partition_raft(&$group) {
                Some(raft) => {
                    let $raft = &raft;
                    $body
                }
                None => PeerResponse::Error(format!(
                    "node {} does not host group {}",
                    $node.inner.id, $group
                )),
            }
        }
    }};
}

impl<T: Transport> Node<T> {
    /// Receives a snapshot a group's leader streams ([`PeerRequest::SnapshotStream`]): each
    /// piece is appended to a spool file in [`INCOMING_SNAPSHOTS`] and acknowledged; once all
    /// `total` bytes are in, the snapshot is installed from the file and the answer sent. A
    /// stream that ends early, stalls or sends more than it announced is given up, its file
    /// deleted; the leader starts over.
    async fn receive_snapshot(
        &self,
        group: GroupId,
        transfer: u64,
        total: u64,
        vote: openraft::type_config::alias::VoteOf<TypeConfig>,
        meta: openraft::type_config::alias::SnapshotMetaOf<TypeConfig>,
        stream: PeerStream,
    ) {
        let PeerStream {
            sender,
            mut receiver,
        } = stream;
        let hosted = group == META_GROUP || self.partition_raft(&group).is_some();
        let spooled = if hosted {
            self.spool_snapshot(&group, transfer, total, &sender, &mut receiver)
                .await
        } else {
            // Refused before a byte is spooled, not after gigabytes.
            Err(format!("this node does not host {group}"))
        };
        let answer = match spooled {
            Err(e) => {
                tracing::warn!(%group, error = %e, "a snapshot transfer was given up");
                PeerResponse::Error(e)
            }
            Ok(spool) => {
                tracing::info!(%group, bytes = total, "received a snapshot");
                dispatch_group!(self, group, |raft| {
                    let snapshot =
                        openraft::type_config::alias::SnapshotOf::<TypeConfig, SnapshotData> {
                            meta,
                            snapshot: spool.finish(),
                        };
                    match raft.install_full_snapshot(vote, snapshot).await {
                        Ok(r) => PeerResponse::Snapshot(r),
                        Err(e) => PeerResponse::Error(e.to_string()),
                    }
                })
            }
        };
        if let Ok(frame) = encode("peer response", &answer) {
            // The leader may have given up meanwhile: nobody to tell then.
            let _ = sender.send(frame).await;
        }
    }

    /// The pieces of a streamed snapshot, spooled to a file until `total` bytes are in.
    async fn spool_snapshot(
        &self,
        group: &GroupId,
        transfer: u64,
        total: u64,
        sender: &ferry_net::StreamSender,
        receiver: &mut ferry_net::StreamReceiver,
    ) -> Result<Spool, String> {
        let path = self
            .inner
            .config
            .data_dir
            .join(INCOMING_SNAPSHOTS)
            .join(format!("{transfer:016x}"));
        let mut spool = Spool::create(&path)
            .map_err(|e| format!("spooling a snapshot of {group} to {}: {e}", path.display()))?;
        while spool.len() < total {
            let piece = match tokio::time::timeout(SNAPSHOT_STALL_PATIENCE, receiver.recv()).await
            {
                Err(_) => {
                    return Err(format!(
                        "no snapshot data for {group} in {SNAPSHOT_STALL_PATIENCE:?} after {} of {total} bytes",
                        spool.len()
                    ))
                }
                Ok(None) => {
                    return Err(format!(
                        "the snapshot stream of {group} ended after {} of {total} bytes",
                        spool.len()
                    ))
                }
                Ok(Some(Err(e))) => return Err(format!("the snapshot stream of {group}: {e}")),
                Ok(Some(Ok(piece))) => piece,
            };
            if spool.len() + piece.len() as u64 > total {
                return Err(format!(
                    "the snapshot of {group} holds more than the {total} bytes it announced"
                ));
            }
            spool
                .append(&piece)
                .map_err(|e| format!("spooling a snapshot of {group}: {e}"))?;
            self.inner
                .snapshot_bytes_received
                .fetch_add(piece.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let spooled = encode("peer response", &PeerResponse::Spooled(spool.len()))
                .map_err(|e| e.to_string())?;
            sender
                .send(spooled)
                .await
                .map_err(|e| format!("the snapshot stream of {group}: {e}"))?;
        }
        Ok(spool)
    }

    /// A partition group this node hosts.
    pub(crate) fn partition_group(&self, group: &str) -> Option<PartitionGroup> {
        self.inner
            .partitions
            .read()
            .ok()
            .and_then(|p| p.get(group).cloned())
    }

    /// The Raft of a partition group this node hosts.
    fn partition_raft(&self, group: &str) -> Option<PartitionRaft> {
        self.partition_group(group).map(|g| g.raft)
    }

    /// Opens a replication lane of `group` on this node's Raft: its answers to `requests`.
    /// An append that carries entries wakes a sleeping partition group (once answered).
    fn open_lane(&self, group: &GroupId, requests: LaneRequests) -> Result<LaneAnswers, String> {
        fn answers<SM: RaftStateMachine<TypeConfig>>(
            raft: &Raft<TypeConfig, SM>,
            requests: impl futures::Stream<Item = openraft::raft::AppendEntriesRequest<TypeConfig>>
                + Send
                + 'static,
        ) -> LaneAnswers {
            Box::pin(
                raft.stream_append(requests)
                    .map(|answer| answer.map_err(|fatal| fatal.to_string())),
            )
        }
        if group == META_GROUP {
            return Ok(answers(&self.inner.meta, requests));
        }
        match self.partition_group(group) {
            Some(g) => {
                // Woken once Raft has taken the entries (on the answer), so the first tick
                // finds the election timer already reset by them.
                let carried = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let seen = carried.clone();
                let requests = requests.inspect(move |request| {
                    if !request.entries.is_empty() {
                        seen.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                });
                let answers = answers(&g.raft, requests).inspect(move |_| {
                    if carried.swap(false, std::sync::atomic::Ordering::Relaxed) {
                        g.wake();
                    }
                });
                Ok(Box::pin(answers))
            }
            None => Err(format!(
                "node {} does not host group {}",
                self.inner.id, group
            )),
        }
    }

    async fn handle_peer(&self, from: NodeId, request: PeerRequest) -> PeerResponse {
        match request {
            PeerRequest::Replicate | PeerRequest::SnapshotStream { .. } => PeerResponse::Error(
                "replication and snapshot streams are opened as streams, not called".into(),
            ),
            PeerRequest::AppendEntries { group, rpc } => {
                dispatch_group!(self, group, |raft| match raft.append_entries(rpc).await {
                    Ok(r) => PeerResponse::AppendEntries(r),
                    Err(e) => PeerResponse::Error(e.to_string()),
                })
            }
            PeerRequest::Vote { group, rpc } => {
                dispatch_group!(self, group, |raft| match raft.vote(rpc).await {
                    Ok(r) => PeerResponse::Vote(r),
                    Err(e) => PeerResponse::Error(e.to_string()),
                })
            }
            PeerRequest::TransferLeader { group, rpc } => {
                dispatch_group!(
                    self,
                    group,
                    |raft| match raft.handle_transfer_leader(rpc).await {
                        Ok(r) => PeerResponse::TransferredLeader(r),
                        Err(e) => PeerResponse::Error(e.to_string()),
                    }
                )
            }
            PeerRequest::PreVote { group, rpc } => {
                dispatch_group!(self, group, |raft| match raft.pre_vote(rpc).await {
                    Ok(r) => PeerResponse::Vote(r),
                    Err(e) => PeerResponse::Error(e.to_string()),
                })
            }
            PeerRequest::Client(request) => {
                PeerResponse::Client(Box::new(self.handle_request(request, true).await))
            }
            PeerRequest::Gossip { from, message } => match self.mesh() {
                Some(mesh) => {
                    mesh.inbox.deliver(from, message);
                    PeerResponse::Done
                }
                None => PeerResponse::Error("gossip not started".into()),
            },
            PeerRequest::Forward(request) => self.handle_forward(request).await,
            PeerRequest::ForwardingStatus => PeerResponse::ForwardingStatus(self.forwarding()),
            PeerRequest::GroupLoads => PeerResponse::GroupLoads(self.hosted_loads()),
            PeerRequest::ReadyForReplica { topic, group } => {
                PeerResponse::ReadyForReplica(self.ready_for_replica(&topic, group).await)
            }
            PeerRequest::Alive { .. } => PeerResponse::Alive {
                boot: self.inner.boot,
            },
            PeerRequest::Sleep { leader, asks } => {
                PeerResponse::Slept(self.sleep_asked(leader, asks))
            }
            PeerRequest::EnsureTopic {
                config,
                region,
                via,
            } => self.ensure_forwarded_topic(config, region, via).await,
            PeerRequest::Join { addr } => self.handle_join(from, addr).await,
            PeerRequest::JoinFor { id, addr } => {
                let leader = self.inner.meta.metrics().borrow_watched().current_leader;
                if leader == Some(self.inner.id) {
                    self.handle_join(id, addr).await
                } else {
                    PeerResponse::Error("this node does not lead the metadata group".into())
                }
            }
            PeerRequest::Identify => PeerResponse::Identity {
                id: self.inner.id,
                region: self.inner.config.region.clone(),
                member: self.is_member(),
                tier: self.tier_place(),
            },
            PeerRequest::ProposeMeta(command) => {
                // Only the steps a group's leader reports, and only from a member.
                let allowed = matches!(
                    command,
                    crate::command::MetaCommand::FinishMove { .. }
                        | crate::command::MetaCommand::CancelMove { .. }
                        | crate::command::MetaCommand::SealSplit { .. }
                ) && self.region_members().iter().any(|m| m.id == from);
                if !allowed {
                    return PeerResponse::Error(format!(
                        "node {from} may not propose this metadata command"
                    ));
                }
                match self.propose_meta(command).await {
                    Ok(()) => PeerResponse::Done,
                    Err(e) => PeerResponse::MetaRefused(e),
                }
            }
        }
    }
}
