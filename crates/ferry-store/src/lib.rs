//! Durable storage for a node's Raft groups: one write-ahead log and one sled database per
//! node.
//!
//! What is here: [`NodeStore`] opens (or refuses) a node's data folder; [`WalLogStore`] is
//! openraft's log storage for one group, on the node's write-ahead log (checksummed records
//! in segment files, replayed on start); [`SledStateMachine`] is openraft's state machine for
//! one group in sled, delegating the meaning of commands to an [`Application`] (the partition
//! and metadata logic live in ferry-region). Appends report completion only after an fsync,
//! and the fsyncs requested by all groups of the node meanwhile are shared ([`GroupCommit`]).
//! A [`SledStateMachine`]'s snapshot carries its whole tree; [`SnapshotData`] is read piece
//! by piece, so larger state machines can stream theirs.
//!
//! What is not here: what commands mean, networking, Raft itself.
#![warn(missing_docs, unreachable_pub)]

mod batch_files;
mod durable;
mod durable_sled;
mod error;
mod group_commit;
mod log_store;
mod node_store;
mod positional;
mod remote;
mod snapshot;
mod state_machine;
mod stream_index;
mod wal;

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use batch_files::{
    read_batch, BatchFiles, BatchInfo, BatchLocation, Extent, ExtentFiles, SyncPlan,
};
pub use durable::{create_dir_durably, fsync as fsync_path};
pub use durable_sled::{open_sled, DurableSled};
pub use error::StoreError;
pub use group_commit::{BeforeSync, FlushStats, GroupCommit};
pub use log_store::WalLogStore;
pub use node_store::{NodeStore, StoreOptions};
pub use positional::read_exact_at;
pub use remote::{encode_object, RemoteOptions, RemoteSegment, RemoteStats, RemoteStore};
pub use snapshot::{SnapshotData, SnapshotSource, Spool};
pub use state_machine::{Application, AppliedState, SledStateMachine, SnapshotBuilder};
pub use stream_index::{
    receive_run, run_path, IndexCache, IndexCheckpoint, IndexTier, MergePlan, Merged, RemoteRunRef,
    Run, RunRef, StreamAppend, StreamIndex, StreamReader, UploadPlan,
};

/// Names a Raft group on a node: `meta` for the metadata group, `<topic>/<partition>` for
/// partitions.
pub type GroupId = String;

/// An application command as replicated by Raft: bytes the [`Application`] decodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command(#[serde(with = "ferry_proto::codec::shared_bytes")] pub Bytes);

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "command({} bytes)", self.0.len())
    }
}

/// What applying a command answers its proposer: bytes the [`Application`] encoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Reply(pub Bytes);

openraft::declare_raft_types!(
    /// Ferry's Raft types: node ids are u64, nodes carry their peer address.
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = u64,
        Node = openraft::BasicNode,
);
