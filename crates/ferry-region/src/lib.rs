//! The regional node (`ferry node`): partitioned, Raft-replicated topic logs.
//!
//! What is here: one openraft group per partition plus a metadata group for topics and
//! replica placement ([`Node`]); the partition state machine with offsets, idempotent
//! producer dedupe, consumer group cursors and retention ([`partition`]); consumer group
//! membership ([`groups`]); the Raft network over ferry-net with one connection per peer for
//! all groups ([`peer`]); and the client API served over QUIC ([`api`]).
//!
//! What is not here: inter-region routing (ferry-router), the HTTP sidecar and edge.
#![warn(missing_docs, unreachable_pub)]

pub mod api;
mod command;
mod config;
mod error;
pub mod groups;
pub mod http;
pub mod metadata;
mod node;
pub mod partition;
pub mod peer;
pub mod server;

pub use config::{NodeConfig, PeerConfig, RaftTuning, TlsPaths};
pub use error::RegionError;
pub use node::{partition_group, MetaRaft, Node, PartitionGroup, PartitionRaft, META_GROUP};
