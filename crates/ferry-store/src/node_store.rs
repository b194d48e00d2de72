//! Opening a node's data folder: the write-ahead log (`wal/`) holding every group's Raft log,
//! and one sled database holding every group's state machine.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::wal::Wal;
use crate::{
    Application, DurableSled, GroupCommit, GroupId, SledStateMachine, StoreError, WalLogStore,
};

/// Version 2 moved Raft logs out of sled into the write-ahead log.
/// 3: partition checkpoints carry forwarding state (received origin offsets, forwarding
/// cursors); 2 had none.
/// 4: partition checkpoints carry the domain streams' index (versions, appends).
/// 5: partition checkpoints carry each producer's last append time (producer expiry).
/// 6: topics carry the keep-until-forwarded retention fields.
/// 7: a topic's partitions share Raft groups: topics carry `groups`, a group's checkpoint and
/// its log entries name their partitions.
/// 8: tiered storage: partition checkpoints carry the manifest of offloaded objects, topics
/// the hot-tail retention fields.
/// 9: the domain streams' index is in run files a partition checkpoint names.
/// 10: a stream index run may be in the object store (its reference names the object).
const FORMAT: &[u8] = b"ferry-store/10";
const MARKER_TREE: &[u8] = b"ferry";

/// Storage tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// sled's page cache, in bytes.
    pub cache_bytes: u64,
    /// Size at which the write-ahead log starts a new segment file.
    pub segment_bytes: u64,
}

impl Default for StoreOptions {
    /// A small cache (64 MiB): the OS page cache does most of the work. 64 MiB segments.
    fn default() -> Self {
        Self {
            cache_bytes: 64 * 1024 * 1024,
            segment_bytes: 64 * 1024 * 1024,
        }
    }
}

/// A node's open data folder.
#[derive(Clone)]
pub struct NodeStore {
    db: DurableSled,
    wal: Arc<Wal>,
    path: PathBuf,
    flusher: GroupCommit,
}

impl NodeStore {
    /// Opens `path` for node `node_id`, creating it on first start. Refuses a folder that
    /// holds something else, a corrupt database, or another node's data, naming the path.
    pub fn open(path: &Path, node_id: u64, options: StoreOptions) -> Result<Self, StoreError> {
        let foreign = |reason: String| StoreError::Foreign {
            path: path.to_path_buf(),
            reason,
        };
        if path.exists() {
            if !path.is_dir() {
                return Err(foreign("it is not a directory".into()));
            }
            let non_empty = std::fs::read_dir(path)
                .map_err(|e| StoreError::Open {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?
                .next()
                .is_some();
            if non_empty && !path.join("db").exists() {
                return Err(foreign(
                    "it is not empty and holds no ferry database".into(),
                ));
            }
        }
        let had_db = std::fs::metadata(path.join("db")).is_ok_and(|m| m.len() > 0);
        crate::create_dir_durably(path)?;
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(options.cache_bytes)
            .open()
            .map_err(|e| StoreError::Open {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let marker = db
            .open_tree(MARKER_TREE)
            .map_err(|e| StoreError::io("marker", e))?;
        let id_bytes = node_id.to_be_bytes();
        match marker
            .get("format")
            .map_err(|e| StoreError::io("marker", e))?
        {
            Some(format) if format.as_ref() == FORMAT => {
                let stored = marker
                    .get("node_id")
                    .map_err(|e| StoreError::io("marker", e))?;
                if stored.as_deref() != Some(&id_bytes[..]) {
                    let stored = stored
                        .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
                        .map(u64::from_be_bytes);
                    return Err(foreign(format!(
                        "it belongs to node {stored:?}, not node {node_id}"
                    )));
                }
            }
            Some(other) if other.as_ref() == b"ferry-store/1" => {
                return Err(foreign(
                    "it was written by an older ferry (format ferry-store/1, Raft logs in \
                     sled) that this version cannot read; move it away to start this node empty"
                        .into(),
                ))
            }
            Some(other) if other.as_ref() == b"ferry-store/2" => {
                return Err(foreign(
                    "it was written by an older ferry (format ferry-store/2, partition \
                     checkpoints without forwarding state) that this version cannot read; move \
                     it away to start this node empty"
                        .into(),
                ))
            }
            Some(other) if other.as_ref() == b"ferry-store/3" => {
                return Err(foreign(
                    "it was written by an older ferry (format ferry-store/3, partition \
                     checkpoints without the domain streams' index) that this version cannot \
                     read; move it away to start this node empty"
                        .into(),
                ))
            }
            Some(other) if other.as_ref() == b"ferry-store/4" => {
                return Err(foreign(
                    "it was written by an older ferry (format ferry-store/4, partition \
                     checkpoints without the producers' last append times) that this version \
                     cannot read; move it away to start this node empty"
                        .into(),
                ))
            }
            Some(other) if other.as_ref() == b"ferry-store/5" => {
                return Err(foreign(
                    "it was written by an older ferry (format ferry-store/5, topics without \
                     the keep-until-forwarded retention fields) that this version cannot read; \
                     move it away to start this node empty"
                        .into(),
                ))
            }
            Some(other) if other.as_ref() == b"ferry-store/6" => {
                return Err(foreign(
                    "it was written by an older ferry (format ferry-store/6, one Raft group per \
                     partition) that this version cannot read; move it away to start this node \
                     empty"
                        .into(),
                ))
            }
            Some(other) if other.as_ref() == b"ferry-store/9" => {
                return Err(foreign(
                    "it was written by an older ferry (format ferry-store/9, stream index runs \
                     only on disk) that this version cannot read; move it away to start this \
                     node empty"
                        .into(),
                ))
            }
            Some(other) if other.as_ref() == b"ferry-store/8" => {
                return Err(foreign(
                    "it was written by an older ferry (format ferry-store/8, domain streams \
                     indexed in checkpoints) that this version cannot read; move it away to \
                     start this node empty"
                        .into(),
                ))
            }
            Some(other) if other.as_ref() == b"ferry-store/7" => {
                return Err(foreign(
                    "it was written by an older ferry (format ferry-store/7, before tiered \
                     storage) that this version cannot read; move it away to start this node \
                     empty"
                        .into(),
                ))
            }
            Some(other) => {
                return Err(foreign(format!(
                    "unknown format {:?}",
                    String::from_utf8_lossy(&other)
                )))
            }
            None => {
                if had_db || db.tree_names().len() > 2 {
                    return Err(foreign(
                        "its database is corrupt or not ferry's (no ferry marker); \
                         move it away to start this node empty"
                            .into(),
                    ));
                }
                marker
                    .insert("node_id", &id_bytes)
                    .map_err(|e| StoreError::io("marker", e))?;
                marker
                    .insert("format", FORMAT)
                    .map_err(|e| StoreError::io("marker", e))?;
                DurableSled::new(db.clone(), path).sync()?;
            }
        }
        let wal = Arc::new(Wal::open(&path.join("wal"), options.segment_bytes)?);
        let synced = wal.clone();
        let flusher = GroupCommit::start(Box::new(move || synced.sync()));
        Ok(Self {
            db: DurableSled::new(db, path),
            wal,
            path: path.to_path_buf(),
            flusher,
        })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why this node's storage stopped, if it did: a failed write or fsync of the log, or a
    /// failed sync of the state machines' database. Nothing is acknowledged after that (the
    /// kernel may have dropped what it could not write); the node should stop and be
    /// restarted, recovering from what is on disk.
    pub fn failure(&self) -> Option<String> {
        self.wal
            .failure()
            .map(|r| format!("write-ahead log: {r}"))
            .or_else(|| self.db.failure().map(|r| format!("state database: {r}")))
    }

    /// The shared flusher.
    pub fn flusher(&self) -> &GroupCommit {
        &self.flusher
    }

    /// The log storage of `group`.
    pub fn log_store(&self, group: &GroupId) -> Result<WalLogStore, StoreError> {
        Ok(WalLogStore::new(
            group.clone(),
            self.wal.clone(),
            self.flusher.clone(),
            self.db.clone(),
        ))
    }

    /// The state machine of `group`, driving `app`.
    pub fn state_machine<A: Application>(
        &self,
        group: &GroupId,
        app: A,
    ) -> Result<SledStateMachine<A>, StoreError> {
        SledStateMachine::open(self.db.clone(), group, app)
    }

    /// The tree a group's state machine writes (`sm:<group>`), for the application to read.
    pub fn state_tree(&self, group: &GroupId) -> Result<sled::Tree, StoreError> {
        self.db
            .db()
            .open_tree(format!("sm:{group}"))
            .map_err(|e| StoreError::io(format!("state machine of {group}"), e))
    }

    /// Names of groups that have a log on this node (`meta`, `<topic>/<partition>`).
    pub fn groups(&self) -> Vec<GroupId> {
        self.wal.groups()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_foreign_and_other_nodes_folders() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n1");
        drop(NodeStore::open(&path, 1, StoreOptions::default()).unwrap());
        // Reopening as the same node works; as another node it is refused, naming the path.
        drop(NodeStore::open(&path, 1, StoreOptions::default()).unwrap());
        let err = NodeStore::open(&path, 2, StoreOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("n1") && err.contains("node 2"), "{err}");

        let other = dir.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("notes.txt"), "hello").unwrap();
        let err = NodeStore::open(&other, 1, StoreOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("other") && err.contains("no ferry database"),
            "{err}"
        );

        let corrupt = dir.path().join("corrupt");
        std::fs::create_dir_all(&corrupt).unwrap();
        std::fs::write(corrupt.join("db"), vec![0xAB; 4096]).unwrap();
        std::fs::write(corrupt.join("conf"), "garbage").unwrap();
        let err = NodeStore::open(&corrupt, 1, StoreOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("corrupt"), "{err}");
    }

    /// Fail-stop on a real failed fsync (ferry-faultfs): the store reports why, and nothing
    /// is acknowledged after it, not even once the disk's fsyncs work again.
    #[tokio::test]
    async fn a_failed_fsync_stops_the_store_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let (backing, mnt) = (dir.path().join("disk"), dir.path().join("mnt"));
        std::fs::create_dir_all(&backing).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let mount = ferry_faultfs::Mount::start(&backing, &mnt, &dir.path().join("fs.sock"))
            .expect("mounting a faultfs (needs root and /dev/fuse)");
        let store = NodeStore::open(&mnt.join("n1"), 1, StoreOptions::default()).unwrap();
        store.flusher().flush().await.unwrap();
        assert_eq!(store.failure(), None);

        assert!(mount.command("fail-fsync ** 1").starts_with("ok"));
        let err = store.flusher().flush().await.unwrap_err().to_string();
        assert!(
            err.contains("Input/output error") || err.contains("EIO"),
            "{err}"
        );
        let failure = store.failure().expect("the store reports its failure");
        assert!(failure.contains("write-ahead log"), "{failure}");

        assert!(mount.command("clear").starts_with("ok"));
        assert!(store.flusher().flush().await.is_err(), "still stopped");
        drop(store);
        mount.shutdown().unwrap();
    }
}
