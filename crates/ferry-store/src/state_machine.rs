//! openraft state machine for one group. The tree `sm:<group>` holds the application's data
//! and, under a reserved key, the last applied log id and membership, written in the same
//! sled batch as the entry's effects so they never disagree. The [`Application`] gives
//! commands their meaning.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use ferry_proto::codec;
use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use tokio::sync::Mutex;

use crate::{GroupCommit, GroupId, Reply, SnapshotData, StoreError, TypeConfig};

/// Reserved key in the state machine tree; application keys must not start with 0xFF.
const APPLIED: &[u8] = b"\xFFapplied";
const SNAPSHOT: &[u8] = b"snapshot";

/// The meaning of a group's commands. Implemented by the partition and metadata logic.
pub trait Application: Send + Sync + 'static {
    /// Rebuilds in-memory state from the tree (at start and after installing a snapshot).
    fn load(&mut self, tree: &sled::Tree) -> Result<(), StoreError>;

    /// Applies one committed command at Raft index `index`, staging writes into `batch`
    /// (keys must not start with 0xFF). Returns the reply for the proposer.
    fn apply(
        &mut self,
        index: u64,
        command: &[u8],
        tree: &sled::Tree,
        batch: &mut sled::Batch,
    ) -> Bytes;

    /// Called after a run of applied entries reached the tree (wake subscribers here).
    fn after_apply(&mut self, _tree: &sled::Tree) {}
}

type AppliedState = (Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>);

struct Inner<A> {
    app: A,
    applied: AppliedState,
}

/// A group's state machine. Cloning shares it.
pub struct SledStateMachine<A> {
    tree: sled::Tree,
    meta: sled::Tree,
    inner: Arc<Mutex<Inner<A>>>,
    flusher: GroupCommit,
}

impl<A> Clone for SledStateMachine<A> {
    fn clone(&self) -> Self {
        Self {
            tree: self.tree.clone(),
            meta: self.meta.clone(),
            inner: self.inner.clone(),
            flusher: self.flusher.clone(),
        }
    }
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn read_applied(tree: &sled::Tree) -> Result<AppliedState, StoreError> {
    match tree
        .get(APPLIED)
        .map_err(|e| StoreError::io("applied state", e))?
    {
        Some(bytes) => Ok(codec::decode("applied state", &bytes)?),
        None => Ok((None, StoredMembershipOf::<TypeConfig>::default())),
    }
}

impl<A: Application> SledStateMachine<A> {
    pub(crate) fn open(
        db: &sled::Db,
        group: &GroupId,
        mut app: A,
        flusher: GroupCommit,
    ) -> Result<Self, StoreError> {
        let tree = db
            .open_tree(format!("sm:{group}"))
            .map_err(|e| StoreError::io(format!("state machine of {group}"), e))?;
        let meta = db
            .open_tree(format!("snap:{group}"))
            .map_err(|e| StoreError::io(format!("snapshot of {group}"), e))?;
        app.load(&tree)?;
        let applied = read_applied(&tree)?;
        Ok(Self {
            tree,
            meta,
            inner: Arc::new(Mutex::new(Inner { app, applied })),
            flusher,
        })
    }

    /// The application's tree (for reads that do not go through Raft, such as fetch).
    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// Runs `f` with the application locked.
    pub async fn with_app<R>(&self, f: impl FnOnce(&mut A) -> R) -> R {
        f(&mut self.inner.lock().await.app)
    }
}

/// Builds a snapshot of a group: its whole tree at one applied log id.
pub struct SnapshotBuilder<A> {
    sm: SledStateMachine<A>,
}

type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

impl<A: Application> RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder<A> {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, SnapshotData>, io::Error> {
        // Hold the lock so no entry is applied while the tree is read.
        let inner = self.sm.inner.lock().await;
        let mut pairs: Pairs = Vec::new();
        for item in self.sm.tree.iter() {
            let (k, v) = item.map_err(io_err)?;
            pairs.push((k.to_vec(), v.to_vec()));
        }
        let (last_log_id, last_membership) = inner.applied.clone();
        drop(inner);
        let data = Bytes::from(codec::encode("snapshot", &pairs).map_err(io_err)?);
        let meta = SnapshotMetaOf::<TypeConfig> {
            last_log_id,
            last_membership,
        };
        let stored = codec::encode("snapshot", &(&meta, &data)).map_err(io_err)?;
        self.sm.meta.insert(SNAPSHOT, stored).map_err(io_err)?;
        self.sm.flusher.flush().await.map_err(io::Error::from)?;
        Ok(SnapshotOf::<TypeConfig, SnapshotData> {
            meta,
            snapshot: data,
        })
    }
}

impl<A: Application> RaftStateMachine<TypeConfig> for SledStateMachine<A> {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder<A>;

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
        let mut batch = sled::Batch::default();
        let mut staged = false;
        while let Some((entry, responder)) = entries.try_next().await? {
            let reply = match entry.payload {
                EntryPayload::Blank => Bytes::new(),
                EntryPayload::Normal(ref command) => {
                    inner
                        .app
                        .apply(entry.log_id.index, &command.0, &self.tree, &mut batch)
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
            staged = true;
            if let Some(responder) = responder {
                replies.push((responder, reply));
            }
            // Applications read their own staged writes only through their memory, so one
            // batch per entry keeps the tree consistent with what `apply` saw.
            let state = codec::encode("applied state", &inner.applied).map_err(io_err)?;
            batch.insert(APPLIED, state);
            self.tree
                .apply_batch(std::mem::take(&mut batch))
                .map_err(io_err)?;
        }
        if staged {
            inner.app.after_apply(&self.tree);
        }
        for (responder, reply) in replies {
            responder.send(Reply(reply));
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { sm: self.clone() }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let pairs: Pairs = codec::decode("snapshot", &snapshot).map_err(io_err)?;
        let mut inner = self.inner.lock().await;
        let mut batch = sled::Batch::default();
        for item in self.tree.iter().keys() {
            batch.remove(item.map_err(io_err)?);
        }
        for (k, v) in pairs {
            batch.insert(k, v);
        }
        let applied: AppliedState = (meta.last_log_id, meta.last_membership.clone());
        batch.insert(
            APPLIED,
            codec::encode("applied state", &applied).map_err(io_err)?,
        );
        self.tree.apply_batch(batch).map_err(io_err)?;
        let stored = codec::encode("snapshot", &(meta, &snapshot)).map_err(io_err)?;
        self.meta.insert(SNAPSHOT, stored).map_err(io_err)?;
        self.flusher.flush().await.map_err(io::Error::from)?;
        inner.applied = applied;
        inner.app.load(&self.tree).map_err(io::Error::from)?;
        inner.app.after_apply(&self.tree);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TypeConfig, SnapshotData>>, io::Error> {
        match self.meta.get(SNAPSHOT).map_err(io_err)? {
            Some(bytes) => {
                let (meta, snapshot): (SnapshotMetaOf<TypeConfig>, SnapshotData) =
                    codec::decode("snapshot", &bytes).map_err(io_err)?;
                Ok(Some(SnapshotOf::<TypeConfig, SnapshotData> {
                    meta,
                    snapshot,
                }))
            }
            None => Ok(None),
        }
    }
}
