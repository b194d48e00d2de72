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

use crate::{DurableSled, GroupId, Reply, SnapshotData, StoreError, TypeConfig};

/// Reserved key in the state machine tree; application keys must not start with 0xFF.
const APPLIED: &[u8] = b"\xFFapplied";
const SNAPSHOT_META: &[u8] = b"snapshot-meta";
const SNAPSHOT_DATA: &[u8] = b"snapshot-data";
/// Most bytes of a received snapshot this state machine takes (it decodes it whole).
const MAX_WHOLE_SNAPSHOT: u64 = 1 << 30;

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

/// What a state machine reports as applied: the last log id and the last membership.
pub type AppliedState = (Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>);

struct Inner<A> {
    app: A,
    applied: AppliedState,
}

/// A group's state machine. Cloning shares it.
pub struct SledStateMachine<A> {
    tree: sled::Tree,
    meta: sled::Tree,
    inner: Arc<Mutex<Inner<A>>>,
    db: DurableSled,
}

impl<A> Clone for SledStateMachine<A> {
    fn clone(&self) -> Self {
        Self {
            tree: self.tree.clone(),
            meta: self.meta.clone(),
            inner: self.inner.clone(),
            db: self.db.clone(),
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
    pub(crate) fn open(db: DurableSled, group: &GroupId, mut app: A) -> Result<Self, StoreError> {
        let tree = db
            .db()
            .open_tree(format!("sm:{group}"))
            .map_err(|e| StoreError::io(format!("state machine of {group}"), e))?;
        let meta = db
            .db()
            .open_tree(format!("snap:{group}"))
            .map_err(|e| StoreError::io(format!("snapshot of {group}"), e))?;
        app.load(&tree)?;
        let applied = read_applied(&tree)?;
        Ok(Self {
            tree,
            meta,
            inner: Arc::new(Mutex::new(Inner { app, applied })),
            db,
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

/// Snapshot data: `[u64 pair count]` then the tree's pairs as
/// `[u32 key length][key][u32 value length][value]`. Self-delimiting, checked against the
/// count (so a truncated copy is refused), and decoded without the codec's allocation limit.
fn encode_pairs(tree: &sled::Tree) -> Result<Bytes, io::Error> {
    let mut out = vec![0u8; 8];
    let mut count = 0u64;
    for item in tree.iter() {
        let (k, v) = item.map_err(io_err)?;
        for part in [&k[..], &v[..]] {
            let len = u32::try_from(part.len()).map_err(io_err)?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(part);
        }
        count += 1;
    }
    out[..8].copy_from_slice(&count.to_be_bytes());
    Ok(Bytes::from(out))
}

/// A key and its value, borrowed from snapshot data.
type Pair<'a> = (&'a [u8], &'a [u8]);

fn decode_pairs(data: &[u8]) -> Result<Vec<Pair<'_>>, io::Error> {
    let malformed = || io::Error::other("malformed snapshot data");
    let (count, mut rest) = data.split_first_chunk::<8>().ok_or_else(malformed)?;
    let count = u64::from_be_bytes(*count);
    let mut take = || -> Result<&[u8], io::Error> {
        let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(malformed)?;
        let len = u32::from_be_bytes(*len) as usize;
        if tail.len() < len {
            return Err(malformed());
        }
        let (part, tail) = tail.split_at(len);
        rest = tail;
        Ok(part)
    };
    let mut pairs = Vec::new();
    for _ in 0..count {
        let key = take()?;
        pairs.push((key, take()?));
    }
    if !rest.is_empty() {
        return Err(malformed());
    }
    Ok(pairs)
}

impl<A> SledStateMachine<A> {
    /// Stores `snapshot` as the current one unless a newer one is stored already (a build
    /// that raced an install must not replace it). Call with the state machine locked.
    fn store_snapshot(
        &self,
        meta: &SnapshotMetaOf<TypeConfig>,
        data: &Bytes,
    ) -> Result<(), io::Error> {
        if let Some(stored) = self.meta.get(SNAPSHOT_META).map_err(io_err)? {
            let stored: SnapshotMetaOf<TypeConfig> =
                codec::decode("snapshot meta", &stored).map_err(io_err)?;
            if stored.last_log_id > meta.last_log_id {
                return Ok(());
            }
        }
        let mut batch = sled::Batch::default();
        batch.insert(
            SNAPSHOT_META,
            codec::encode("snapshot meta", meta).map_err(io_err)?,
        );
        batch.insert(SNAPSHOT_DATA, data.to_vec());
        self.meta.apply_batch(batch).map_err(io_err)
    }
}

impl<A: Application> RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder<A> {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, SnapshotData>, io::Error> {
        // Hold the lock so no entry is applied (or snapshot installed) meanwhile.
        let inner = self.sm.inner.lock().await;
        let data = encode_pairs(&self.sm.tree)?;
        let (last_log_id, last_membership) = inner.applied.clone();
        let meta = SnapshotMetaOf::<TypeConfig> {
            last_log_id,
            last_membership,
        };
        self.sm.store_snapshot(&meta, &data)?;
        drop(inner);
        self.sm.db.sync_async().await.map_err(io::Error::from)?;
        Ok(SnapshotOf::<TypeConfig, SnapshotData> {
            meta,
            snapshot: SnapshotData::from_bytes(data),
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
        let snapshot = snapshot.into_bytes(MAX_WHOLE_SNAPSHOT)?;
        let pairs = decode_pairs(&snapshot)?;
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
        self.store_snapshot(meta, &snapshot)?;
        self.db.sync_async().await.map_err(io::Error::from)?;
        inner.applied = applied;
        inner.app.load(&self.tree).map_err(io::Error::from)?;
        inner.app.after_apply(&self.tree);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TypeConfig, SnapshotData>>, io::Error> {
        let Some(meta) = self.meta.get(SNAPSHOT_META).map_err(io_err)? else {
            return Ok(None);
        };
        let meta: SnapshotMetaOf<TypeConfig> =
            codec::decode("snapshot meta", &meta).map_err(io_err)?;
        let data = self
            .meta
            .get(SNAPSHOT_DATA)
            .map_err(io_err)?
            .unwrap_or_default();
        Ok(Some(SnapshotOf::<TypeConfig, SnapshotData> {
            meta,
            snapshot: SnapshotData::from_bytes(Bytes::copy_from_slice(&data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_pairs_round_trip_and_refuse_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        tree.insert(b"a", vec![1u8; 3]).unwrap();
        tree.insert(b"bb", Vec::<u8>::new()).unwrap();
        let data = encode_pairs(&tree).unwrap();
        let pairs = decode_pairs(&data).unwrap();
        assert_eq!(
            pairs,
            vec![(&b"a"[..], &[1u8, 1, 1][..]), (&b"bb"[..], &[][..])]
        );
        for cut in 0..data.len() {
            assert!(decode_pairs(&data[..cut]).is_err(), "truncated at {cut}");
        }
        let mut longer = data.to_vec();
        longer.push(0);
        assert!(decode_pairs(&longer).is_err());
    }
}
