//! Commands replicated through Raft and the replies their application produces. Encoded with
//! ferry-proto's codec into [`ferry_store::Command`] bytes.

use ferry_proto::wire::ApiError;
use ferry_proto::{codec, EventBatch, NodeId, ProtoError, TopicConfig};
use serde::{Deserialize, Serialize};

/// A command of a partition group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum PartitionCommand {
    /// Append a batch; offsets are assigned at apply.
    Append {
        batch: EventBatch,
        /// Stamped by the leader so every replica stores the same time.
        appended_at_ms: u64,
    },
    /// Set a consumer group's cursor.
    Commit { group: String, offset: u64 },
    /// Drop batches that end at or before `before_offset` (retention).
    Trim { before_offset: u64 },
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
    Error(ApiError),
}

/// A command of the metadata group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum MetaCommand {
    /// Create a topic with its replica placement (one list of nodes per partition).
    CreateTopic {
        config: TopicConfig,
        replicas: Vec<Vec<NodeId>>,
    },
}

/// What applying a metadata command answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum MetaReply {
    Created,
    Error(ApiError),
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
