//! The regional node (`ferry node`): partitioned, Raft-replicated topic logs.
//!
//! What is here: one openraft group per partition plus a metadata group for topics and
//! replica placement ([`Node`]); the partition state machine with offsets, idempotent
//! producer dedupe, consumer group cursors and retention ([`partition`]); consumer group
//! membership ([`groups`]); the region's own membership, nodes joining and leaving
//! ([`membership`]) and replica moves between them (`moves`); the Raft network over ferry-net with one connection per peer for
//! all groups ([`peer`]); the client API served over QUIC ([`api`]); and the node's part in
//! the mesh (`mesh`): gossip over the peer transport, forwarders for the partitions it
//! leads, and the destination side of forwarded batches — driving ferry-router's state
//! machines.
//!
//! What is not here: the forwarding and gossip protocols themselves (ferry-router), the
//! HTTP sidecar and the edge.
#![warn(missing_docs, unreachable_pub)]

pub mod api;
mod balance;
mod coalesce;
mod command;
mod compaction;
mod config;
mod error;
mod group_snapshot;
pub mod groups;
pub mod http;
mod leadership;
mod load;
pub mod membership;
mod mesh;
pub mod metadata;
mod moves;
mod node;
pub mod partition;
pub mod peer;
mod quiesce;
pub mod server;
mod splits;
mod tier;

pub use config::{FaultConfig, MeshConfig, NodeConfig, PeerConfig, RaftTuning, SlowLink, TlsPaths};
pub use error::RegionError;
pub use ferry_router::NodeRecord;
pub use mesh::ForwardedDuplicates;
pub use node::{
    partition_group, HostedPartition, MetaRaft, Node, PartitionGroup, PartitionRaft, META_GROUP,
};
