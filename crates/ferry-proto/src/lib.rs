//! Ferry's data model and wire format, with no I/O.
//!
//! What is here: the [`Event`] (CloudEvents 1.0 attributes plus Ferry's class, tenant,
//! partition key, origin region and producer stamp), [`Subject`]s and [`SubjectFilter`]s with
//! NATS-style `*` and `>` wildcards, [`TopicConfig`] with its validation, domain stream names
//! ([`validate_stream_name`]) and [`StreamEvent`]s, the client wire messages in [`wire`], and
//! the one [`codec`] through which every byte on the wire or on disk is encoded. Size
//! [`Limits`] are enforced by the codec and by validation.
//!
//! What is not here: sockets, storage, Raft. Those crates depend on this one.
#![warn(missing_docs, unreachable_pub)]

pub mod codec;
mod error;
mod event;
mod limits;
mod split;
mod stream;
mod subject;
mod topic;
pub mod wire;

pub use error::ProtoError;
pub use event::{partition_for_key, Event, EventBatch, EventClass, ProducerId, StoredBatch};
pub use limits::Limits;
pub use split::{
    created_modulus, key_hash, key_modulus, key_spaces_meet, linear_partition, parent_of, root_of,
    KeyLayout, Split,
};
pub use stream::{validate_stream_name, StreamEvent, MAX_STREAM_NAME};
pub use subject::{Subject, SubjectFilter};
pub use topic::{RegionPolicy, Retention, TopicConfig};

/// Identifies a node in a region.
pub type NodeId = u64;
