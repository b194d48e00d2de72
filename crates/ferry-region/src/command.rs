//! Commands replicated through Raft and the replies their application produces. Encoded with
//! ferry-proto's codec into [`ferry_store::Command`] bytes.

use ferry_proto::wire::ApiError;
use ferry_proto::{codec, EventBatch, NodeId, ProtoError, SubjectFilter, TopicConfig};
use serde::{Deserialize, Serialize};

/// An entry of a partition group's log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum GroupEntry {
    /// One command; its reply is a [`PartitionReply`].
    One(GroupCommand),
    /// Several, applied in order; the reply is a `Vec<PartitionReply>`, one per command.
    Many(Vec<GroupCommand>),
}

/// A command to one of the group's partitions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct GroupCommand {
    pub(crate) partition: u32,
    pub(crate) command: PartitionCommand,
}

/// A command to a partition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum PartitionCommand {
    /// Append a batch; offsets are assigned at apply.
    Append {
        batch: EventBatch,
        /// Stamped by the leader so every replica stores the same time.
        appended_at_ms: u64,
    },
    /// Move a consumer group's cursor forward to `offset` (never back).
    Commit { group: String, offset: u64 },
    /// Drop batches that end at or before `before_offset` (retention).
    Trim { before_offset: u64 },
    /// Events forwarded from another region: the batch covers source offsets `[from, to)`
    /// of `origin_region`'s partition; the state machine admits what it does not hold yet
    /// (dedupe by origin offset) and answers with the acknowledgement.
    Forwarded {
        origin_region: String,
        origin_partition: u32,
        batch: ferry_router::Batch,
        appended_at_ms: u64,
    },
    /// The forwarding cursor of this (source) partition towards `region` moved to `next`.
    ForwardCursor { region: String, next: u64 },
    /// Append a batch to domain stream `stream` iff the stream is at `expected_version`
    /// (None: any). The check is made as the command applies, so it is atomic with the
    /// append on every replica.
    AppendToStream {
        stream: String,
        expected_version: Option<u64>,
        batch: EventBatch,
        /// Stamped by the leader so every replica stores the same time.
        appended_at_ms: u64,
    },
    /// Forget the producers whose last append was stamped before `idle_before_ms` (the
    /// leader's clock minus the node's `producer_expiry_ms`, fixed in the command so every
    /// replica forgets the same ones).
    ExpireProducers { idle_before_ms: u64 },
    /// The leader wrote the batches of `segment` to the tier's object store: add it to the
    /// manifest (if it continues it) and drop those batches from the batch files.
    Offloaded { segment: ferry_store::RemoteSegment },
    /// Seal this (parent) partition for `children`: create them (empty) in the group, and
    /// from here on refuse publishes of keys the topic of `partitions` partitions (created
    /// with `initial`) maps elsewhere. Answered with the seal offset (this partition's next
    /// offset; the first seal's again if sent twice).
    Split {
        initial: u32,
        partitions: u32,
        children: Vec<u32>,
    },
    /// A publish the leader checked against the group's key layout as of its split to
    /// `layout` partitions (0: never split). Applied like `Append` if the group is still at
    /// that layout and the leader found every key at home (`misrouted` None); a batch the
    /// producer appended before is answered as the duplicate it is either way.
    Publish {
        batch: EventBatch,
        appended_at_ms: u64,
        layout: u32,
        misrouted: Option<String>,
    },
    /// `Forwarded`, routed by the origin by key over the destination topic's layout
    /// `routed_by` (created with, now has): applied only if that layout gives this
    /// partition the key space the group gives it now, so no key is sent to a parent after
    /// its seal, nor to a partition before the split that made its key space.
    ForwardedRouted {
        origin_region: String,
        origin_partition: u32,
        batch: ferry_router::Batch,
        appended_at_ms: u64,
        routed_by: (u32, u32),
    },
}

impl PartitionCommand {
    /// Bytes of event data it carries.
    pub(crate) fn payload_bytes(&self) -> usize {
        match self {
            Self::Append { batch, .. }
            | Self::AppendToStream { batch, .. }
            | Self::Publish { batch, .. } => batch.events.len(),
            Self::Forwarded { batch, .. } | Self::ForwardedRouted { batch, .. } => {
                batch.events.iter().map(|(_, e)| e.len()).sum()
            }
            _ => 0,
        }
    }
}

/// What applying a partition command answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum PartitionReply {
    Appended {
        base_offset: u64,
        count: u32,
        duplicate: bool,
    },
    Done,
    /// A forwarded batch was applied (or was already there); answer the source with this.
    Forwarded(ferry_router::Ack),
    Error(ApiError),
    /// A domain stream append (or, for a producer's resend, the original one).
    StreamAppended {
        base_offset: u64,
        first_version: u64,
        /// The stream's version after the append.
        version: u64,
    },
    /// A split's seal: the parent's offset from which its children's keys go to them.
    Sealed {
        offset: u64,
    },
}

/// A command of the metadata group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum MetaCommand {
    /// Create a topic with its replica placement (one list of nodes per partition).
    CreateTopic {
        config: TopicConfig,
        replicas: Vec<Vec<NodeId>>,
    },
    /// Register (or replace) a named interest of the region in a subject filter.
    SetInterest {
        name: String,
        subjects: SubjectFilter,
    },
    /// Remove a named interest.
    RemoveInterest { name: String },
    /// Register (or replace) a named interest, stamped with when it was asked for
    /// (milliseconds since the epoch, the proposer's clock). `SetInterest` is this without a
    /// time (entries written before it existed: their interest counts as old).
    SetInterestAt {
        name: String,
        subjects: SubjectFilter,
        at_ms: u64,
    },
    /// Start moving the replica of a topic's Raft group `group` from node `from` to node
    /// `to` ([`crate::moves`]).
    MoveReplica {
        topic: String,
        group: u32,
        from: NodeId,
        to: NodeId,
        at_ms: u64,
    },
    /// The group's Raft replaced `from` by `to`: the move is done and the placement says so.
    FinishMove {
        topic: String,
        group: u32,
        from: NodeId,
        to: NodeId,
    },
    /// Give a move up (its target left the region before it took the replica).
    CancelMove {
        topic: String,
        group: u32,
        from: NodeId,
        to: NodeId,
    },
    /// Mark a node draining (its replicas and leaderships move away) or active again.
    SetNodeDraining { node: NodeId, draining: bool },
    /// Reorder a group's replicas (the same set): the first is its preferred leader.
    SetReplicaOrder {
        topic: String,
        group: u32,
        replicas: Vec<NodeId>,
    },
    /// Keep moving replicas until every node holds about as many (`ferry ctl rebalance`),
    /// or stop.
    SetBalancing { on: bool },
    /// Grow a topic to `partitions` partitions: record the splits (without seals) and the
    /// new partitions' replicas (those of their parent's group).
    AddPartitions { topic: String, partitions: u32 },
    /// Partition `parent`'s group sealed it for `children` at `offset` (sent by the group's
    /// leader once the seal applied).
    SealSplit {
        topic: String,
        parent: u32,
        children: Vec<u32>,
        offset: u64,
    },
}

/// What applying a metadata command answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum MetaReply {
    Created,
    Done,
    Error(ApiError),
    /// The interests changed; their version is now `version`.
    InterestSet {
        version: u64,
    },
}

pub(crate) fn encode<T: Serialize>(
    what: &'static str,
    value: &T,
) -> Result<bytes::Bytes, ProtoError> {
    codec::encode(what, value).map(bytes::Bytes::from)
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, ProtoError> {
    codec::decode(what, bytes)
}

/// Like [`decode`], with payload fields sharing `bytes` (see `codec::decode_shared`).
pub(crate) fn decode_shared<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &bytes::Bytes,
) -> Result<T, ProtoError> {
    codec::decode_shared(what, bytes)
}
