//! Client ↔ node messages (ALPN `ferry-client/3`). Each request opens a QUIC stream and
//! carries one [`ClientRequest`] frame; the node answers with one [`ClientResponse`] frame,
//! or, for [`ClientRequest::Subscribe`], a stream of them until either side closes.

use serde::{Deserialize, Serialize};

use crate::{EventBatch, NodeId, StoredBatch, TopicConfig};

pub use crate::stream::StreamEvent;

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartFrom {
    /// The oldest retained event.
    Earliest,
    /// Only events appended after the subscription starts.
    Latest,
    /// This offset (clamped up to the oldest retained one).
    Offset(u64),
}

/// A request from a client to any node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    /// Create a topic (through the metadata group).
    CreateTopic(TopicConfig),
    /// List every topic.
    ListTopics,
    /// A topic's configuration, partition leaders, replicas and offsets.
    DescribeTopic {
        /// Topic name.
        topic: String,
    },
    /// Append a batch to a partition; must reach the partition's leader.
    Publish {
        /// Topic name.
        topic: String,
        /// Partition index.
        partition: u32,
        /// The events.
        batch: EventBatch,
    },
    /// Read committed batches from an offset.
    Fetch {
        /// Topic name.
        topic: String,
        /// Partition index.
        partition: u32,
        /// First offset wanted.
        offset: u64,
        /// Stop after about this many bytes (at least one batch is returned).
        max_bytes: u32,
    },
    /// Stream committed batches as they are appended.
    Subscribe {
        /// Topic name.
        topic: String,
        /// Partition index.
        partition: u32,
        /// Where to start.
        from: StartFrom,
    },
    /// Join (or heartbeat in) a consumer group; answers the member's partitions.
    JoinGroup {
        /// Group name.
        group: String,
        /// Topic consumed.
        topic: String,
        /// This member's id (unique per process).
        member: String,
    },
    /// Leave a consumer group.
    LeaveGroup {
        /// Group name.
        group: String,
        /// Topic consumed.
        topic: String,
        /// This member's id.
        member: String,
    },
    /// Commit a group's cursor for a partition (through the partition's Raft group).
    CommitOffset {
        /// Group name.
        group: String,
        /// Topic name.
        topic: String,
        /// Partition index.
        partition: u32,
        /// Next offset to consume.
        offset: u64,
    },
    /// A group's committed cursor for a partition.
    CommittedOffset {
        /// Group name.
        group: String,
        /// Topic name.
        topic: String,
        /// Partition index.
        partition: u32,
    },
    /// Registers (or replaces) a named, durable interest of this region in `subjects`: events
    /// of other regions whose subject matches are forwarded here (topics permitting).
    AddInterest {
        /// Who holds it (a consumer group, an edge, a sidecar's app id).
        name: String,
        /// A subject filter (`*` one token, `>` the rest).
        subjects: String,
    },
    /// Removes a named interest (nothing happens if it does not exist).
    RemoveInterest {
        /// The name it was added under.
        name: String,
    },
    /// This region's interests.
    ListInterests,
    /// The mesh as this node sees it: regions, nodes, links and forwarding.
    Regions,
    /// Append a batch to a domain stream (in one partition) atomically, iff the stream's
    /// version is `expected_version`; must reach the partition's leader. Answered with
    /// [`ClientResponse::StreamAppended`], or [`ErrorCode::VersionConflict`] and nothing
    /// appended.
    AppendToStream {
        /// Topic name.
        topic: String,
        /// Partition index (every event of one stream lives in one partition).
        partition: u32,
        /// Stream name: 1–128 of `[A-Za-z0-9_.:-]`.
        stream: String,
        /// The version the stream must be at (the number of events ever appended to it;
        /// `Some(0)`: the stream must not exist yet), or None for any version.
        expected_version: Option<u64>,
        /// The events. With a producer id set, a resend of the same batch is answered with
        /// the original append and does not append again.
        batch: EventBatch,
    },
    /// Read a domain stream's events from a version on; served by the partition's leader.
    /// Answered with [`ClientResponse::StreamEvents`].
    ReadStream {
        /// Topic name.
        topic: String,
        /// Partition index.
        partition: u32,
        /// Stream name.
        stream: String,
        /// First version wanted (versions start at 1; 0 reads from the start too).
        from_version: u64,
        /// Most events to return.
        max_events: u32,
    },
    /// Waits until every other region of the mesh holds this region's interests at version
    /// `version` or newer (as [`ClientResponse::InterestAdded`] after an
    /// [`ClientRequest::AddInterest`] names it), at most `wait_ms`. Answered with
    /// [`ClientResponse::InterestAdded`]: which regions have it, which not yet.
    AwaitInterest {
        /// The interest version to wait for.
        version: u64,
        /// Longest wait, milliseconds (at most 60,000).
        wait_ms: u64,
    },
    /// The region's nodes. Answered with [`ClientResponse::Nodes`].
    ListNodes,
    /// Adds the node `id` listening at `addr` to the region (as a joining node started with
    /// `seeds` does by itself): the region dials it, checks its certificate, and adds it to
    /// the metadata group (a voter when the region needs one). Answered with
    /// [`ClientResponse::Nodes`].
    AddNode {
        /// Its node id (unique in the mesh; its certificate must name it).
        id: NodeId,
        /// Its QUIC address (`host:port`).
        addr: String,
    },
    /// Starts (or, with `undo`, stops) draining a node: every replica and leadership it holds
    /// moves to other nodes. Answered with [`ClientResponse::Nodes`].
    DrainNode {
        /// The node.
        id: NodeId,
        /// Make it active again instead (moves already done stay done).
        undo: bool,
    },
    /// Removes a node from the region. Refused while it holds replicas, unless `dead`: then
    /// its replicas are made again on the other nodes from the surviving ones. Answered with
    /// [`ClientResponse::Nodes`].
    RemoveNode {
        /// The node.
        id: NodeId,
        /// The node is gone for good (its disk is lost): re-replicate what it held.
        dead: bool,
    },
    /// Moves the replica of a partition's Raft group (and so of every partition the group
    /// replicates) from node `from` to node `to`. Answered with [`ClientResponse::Ok`] once
    /// the move is recorded; `DescribeTopic` shows its progress.
    MoveReplica {
        /// Topic name.
        topic: String,
        /// A partition of the group to move.
        partition: u32,
        /// The node giving its replica up.
        from: NodeId,
        /// The node taking it.
        to: NodeId,
    },
    /// Spreads replicas over the region's nodes by count (and preferred leaders with them):
    /// answers the plan with [`ClientResponse::RebalancePlan`] and, unless `dry_run`, carries
    /// it out, a few moves per node at a time.
    Rebalance {
        /// Only print the plan.
        dry_run: bool,
    },
    /// Grows a topic to `partitions` partitions (at most doubling it): each new partition
    /// takes keys from one existing partition, its parent ([`crate::KeyLayout`]). Answered with
    /// [`ClientResponse::Ok`] once recorded; the parents seal shortly after, and
    /// `DescribeTopic` shows each split's seal.
    AddPartitions {
        /// Topic name.
        topic: String,
        /// The partition count asked for.
        partitions: u32,
    },
}

/// One step of a rebalance plan: a replica move, or a new preferred leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedChange {
    /// Topic.
    pub topic: String,
    /// Its Raft group.
    pub group: u32,
    /// The node giving its replica up (None: a change of preferred leader only).
    pub from: Option<NodeId>,
    /// The node taking the replica, or the new preferred leader.
    pub to: NodeId,
}

/// One partition as seen by a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionInfo {
    /// Partition index.
    pub partition: u32,
    /// Current leader, if known.
    pub leader: Option<NodeId>,
    /// Replica nodes.
    pub replicas: Vec<NodeId>,
    /// Oldest retained offset.
    pub low_watermark: u64,
    /// Offset the next event will get (committed and applied on the answering node).
    pub high_watermark: u64,
    /// Tiered storage: offsets from the low watermark up to here are in the object store
    /// (equal to the low watermark when none are); the replicas' batch files hold the rest.
    pub local_from: u64,
    /// Bytes of events the answering replica holds in its batch files.
    pub local_bytes: u64,
    /// Objects in the object store holding the partition's offloaded offsets, and their bytes
    /// of events.
    pub remote_objects: u64,
    /// See `remote_objects`.
    pub remote_bytes: u64,
}

/// A node's client address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddress {
    /// Node id.
    pub id: NodeId,
    /// `host:port` for clients.
    pub client_addr: String,
}

/// A topic with its partitions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicDescription {
    /// The configuration.
    pub config: TopicConfig,
    /// Partitions in index order.
    pub partitions: Vec<PartitionInfo>,
    /// Every node of the region, so clients can reach leaders.
    pub nodes: Vec<NodeAddress>,
    /// Replica moves under way.
    pub moves: Vec<MoveInfo>,
    /// How keys map to partitions ([`crate::KeyLayout`]): producers route keys by it, and
    /// readers that keep per-key order read a split parent up to its seal before its child.
    pub layout: crate::KeyLayout,
}

/// A replica move under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveInfo {
    /// The Raft group (numbered like its first partition; it replicates every partition p
    /// with p % groups == group).
    pub group: u32,
    /// The node giving its replica up.
    pub from: NodeId,
    /// The node taking it.
    pub to: NodeId,
    /// When it was asked for (ms since the epoch).
    pub since_ms: u64,
    /// Where it stands, as the answering node sees it (the group's leader knows most).
    pub progress: String,
}

/// One node of the region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id.
    pub id: NodeId,
    /// Its QUIC address.
    pub addr: String,
    /// Whether it votes in the metadata group (otherwise a learner there).
    pub voter: bool,
    /// Whether it is draining.
    pub draining: bool,
    /// Raft groups it holds a replica of, by the placement.
    pub replicas: u32,
    /// Replica moves under way to it.
    pub moving_in: u32,
    /// Replica moves under way off it.
    pub moving_out: u32,
}

/// Error codes a client can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// This node does not lead the partition; see `leader_hint`.
    NotLeader,
    /// No such topic.
    UnknownTopic,
    /// No such partition in the topic.
    UnknownPartition,
    /// A topic with this name exists with another configuration.
    TopicExists,
    /// The request itself is invalid (bad subject, topic config, event, frame).
    InvalidRequest,
    /// An event exceeds the size limit.
    EventTooLarge,
    /// A producer sequence skipped ahead; resend from the first unacknowledged batch.
    OutOfOrderSequence,
    /// The group is rebalancing or the member is not in it; join again.
    RebalanceInProgress,
    /// The partition or region cannot serve now (no quorum, shutting down); retry.
    Unavailable,
    /// A bug or storage failure on the node.
    Internal,
    /// A domain stream is not at the version the append expected; nothing was appended. The
    /// message names the stream, the expected and the actual version.
    VersionConflict,
    /// A producer batch whose sequences were all appended before, longer ago than the
    /// partition's dedupe window: every event of it is already in the log (at offsets no
    /// longer remembered), so a resending outbox can count it as acknowledged.
    AlreadyAppended,
    /// The partition does not know the batch's producer (never seen, or expired after being
    /// idle) and the batch does not start at sequence 0: number every unacknowledged batch
    /// again from 0 and resend them in order.
    UnknownProducer,
    /// The partition keeps events until every region's forwarder passed them
    /// (`retention.keep_until_forwarded`) and has reached its `retention.hard_max_bytes`:
    /// nothing was appended. The message names the regions that are behind. Publishing works
    /// again once they catch up and retention drops events.
    PartitionFull,
    /// The batch holds a key that does not map to this partition any more (the topic grew
    /// and the partition split, or is splitting): nothing was appended. Describe the topic
    /// again and route by its [`crate::KeyLayout`].
    WrongPartition,
    /// The partition is tiered and holds its `retention.local_limit_bytes` locally because
    /// its uploads to the object store are behind (the store is down or slow): nothing was
    /// appended. Retry after a backoff; publishing works again as uploads catch up.
    OffloadBehind,
}

/// A typed error for the client: what went wrong and, for `NotLeader`, who leads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    /// What kind of error.
    pub code: ErrorCode,
    /// Human-readable detail naming what was wrong.
    pub message: String,
    /// The leader, when known and `code` is `NotLeader`.
    pub leader_hint: Option<NodeId>,
}

impl ApiError {
    /// An error without leader hint.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            leader_hint: None,
        }
    }

    /// Whether retrying the same request (possibly elsewhere) may succeed.
    pub fn is_retriable(&self) -> bool {
        matches!(
            self.code,
            ErrorCode::NotLeader | ErrorCode::Unavailable | ErrorCode::RebalanceInProgress
        )
    }
}

/// A node's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientResponse {
    /// Done, nothing to return.
    Ok,
    /// Topic list.
    Topics(Vec<TopicConfig>),
    /// Topic description.
    Topic(TopicDescription),
    /// The batch is durable on a majority: its offsets.
    Published {
        /// Offset of the batch's first event.
        base_offset: u64,
        /// Number of events.
        count: u32,
        /// The batch had been appended before (a producer retry); offsets are the original ones.
        duplicate: bool,
    },
    /// Batches from a fetch or a subscription.
    Batches {
        /// Batches in offset order (the first may start before the requested offset).
        batches: Vec<StoredBatch>,
        /// Offset the next event will get.
        high_watermark: u64,
    },
    /// A group assignment.
    Assignment {
        /// Group generation; changes on every rebalance.
        generation: u64,
        /// Partitions of this member.
        partitions: Vec<u32>,
    },
    /// A committed offset (None if the group never committed).
    Committed(Option<u64>),
    /// Named interests: (name, subject filter).
    Interests(Vec<(String, String)>),
    /// Answer to [`ClientRequest::Regions`].
    Regions(MeshReport),
    /// The request failed.
    Error(ApiError),
    /// A domain stream append is durable on a majority.
    StreamAppended {
        /// Offset of the batch's first event in the partition.
        base_offset: u64,
        /// Stream version of the batch's first event.
        first_version: u64,
        /// The stream's version after the append (of the batch's last event).
        version: u64,
    },
    /// Events of a domain stream, in version order.
    StreamEvents {
        /// The stream's current version (0 if it does not exist).
        version: u64,
        /// The events read (fewer than asked when the stream ends, or when retention dropped
        /// the oldest).
        events: Vec<StreamEvent>,
    },
    /// An interest was added or removed ([`ClientRequest::AddInterest`],
    /// [`ClientRequest::RemoveInterest`]), or waited for ([`ClientRequest::AwaitInterest`]).
    InterestAdded(InterestReach),
    /// The region's nodes, by id.
    Nodes(Vec<NodeInfo>),
    /// A rebalance plan ([`ClientRequest::Rebalance`]): replica moves first, then preferred
    /// leaders.
    RebalancePlan(Vec<PlannedChange>),
}

/// How far a region's interests have reached the other regions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterestReach {
    /// The region's interest version after the change (its metadata log index).
    pub version: u64,
    /// Other regions whose every live node holds `version` or newer.
    pub seen_by: Vec<String>,
    /// Other regions that do not yet (or have no live node this node knows of).
    pub waiting_for: Vec<String>,
}

/// The mesh as one node sees it (gossip plus its own forwarders).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshReport {
    /// The answering node's region.
    pub region: String,
    /// The answering node.
    pub node: NodeId,
    /// Live nodes, every region.
    pub nodes: Vec<MeshNodeInfo>,
    /// Interest per region: (region, subject filters).
    pub interests: Vec<(String, Vec<String>)>,
    /// Forwarding of every source partition to every destination region, as the source
    /// leaders publish it.
    pub forwarding: Vec<ForwardingInfo>,
}

/// One live node of the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshNodeInfo {
    /// Node id.
    pub id: NodeId,
    /// Its region.
    pub region: String,
    /// Its address.
    pub addr: String,
    /// Its role ("node").
    pub role: String,
    /// Raft groups it leads (each replicates one or more partitions of a topic).
    pub leads: u32,
    /// Regions it reached directly lately (its links).
    pub reach: Vec<String>,
    /// Its load (events appended per second, lately).
    pub load: u64,
}

/// Forwarding of one source partition to one destination region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardingInfo {
    /// Topic.
    pub topic: String,
    /// Source partition.
    pub partition: u32,
    /// Source region.
    pub source: String,
    /// Destination region.
    pub destination: String,
    /// The destination partition, when the destination's topic has another partition count
    /// and each of its partitions gets the events whose keys route there from this source
    /// partition (one forwarder each); None: the source partition's number.
    pub dest_partition: Option<u32>,
    /// Source offsets not yet forwarded (or skipped).
    pub lag_events: u64,
    /// Age of the oldest event not yet forwarded, milliseconds.
    pub lag_ms: u64,
    /// Events sent to the destination so far (by this leader).
    pub sent_events: u64,
    /// How the last batch went: "direct" or "via REGION".
    pub route: String,
    /// Why the destination refused or could not be reached lately, if so.
    pub last_error: Option<String>,
    /// Source offsets retention dropped before this node's forwarders dealt with them (since
    /// the node started): events the destination may have wanted and will never get.
    pub trimmed_unforwarded: u64,
}
