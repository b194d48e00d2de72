//! openraft log storage for one group: entries in tree `log:<group>` keyed by big-endian
//! index; vote, committed id and purge point in tree `raft:<group>`.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};

use ferry_proto::codec;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::{OptionalSend, RaftLogReader};

use crate::{GroupCommit, GroupId, StoreError, TypeConfig};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";

/// Bytes of log entries read for one replication request (peer frames allow 64 MiB).
const REPLICATION_BUDGET: usize = 16 * 1024 * 1024;

/// One group's Raft log. Cloning shares the trees.
#[derive(Clone)]
pub struct SledLogStore {
    log: sled::Tree,
    meta: sled::Tree,
    flusher: GroupCommit,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn bound_key(bound: Bound<&u64>) -> Bound<[u8; 8]> {
    match bound {
        Bound::Included(i) => Bound::Included(i.to_be_bytes()),
        Bound::Excluded(i) => Bound::Excluded(i.to_be_bytes()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl SledLogStore {
    pub(crate) fn open(
        db: &sled::Db,
        group: &GroupId,
        flusher: GroupCommit,
    ) -> Result<Self, StoreError> {
        let open = |prefix: &str| {
            db.open_tree(format!("{prefix}:{group}"))
                .map_err(|e| StoreError::io(format!("{prefix} tree of {group}"), e))
        };
        Ok(Self {
            log: open("log")?,
            meta: open("raft")?,
            flusher,
        })
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> io::Result<Option<T>> {
        match self.meta.get(key).map_err(io_err)? {
            Some(bytes) => Ok(Some(
                codec::decode("raft metadata", &bytes).map_err(io_err)?,
            )),
            None => Ok(None),
        }
    }

    fn write_meta<T: serde::Serialize>(&self, key: &[u8], value: &T) -> io::Result<()> {
        let bytes = codec::encode("raft metadata", value).map_err(io_err)?;
        self.meta.insert(key, bytes).map_err(io_err)?;
        Ok(())
    }

    /// Number of entries currently held (for write-amplification accounting).
    pub fn len(&self) -> usize {
        self.log.len()
    }

    /// Whether the log holds no entries.
    pub fn is_empty(&self) -> bool {
        self.log.is_empty()
    }
}

impl RaftLogReader<TypeConfig> for SledLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<TypeConfig>>, io::Error> {
        let range = (bound_key(range.start_bound()), bound_key(range.end_bound()));
        let mut entries = Vec::new();
        for item in self.log.range::<[u8; 8], _>(range) {
            let (_, value) = item.map_err(io_err)?;
            entries.push(codec::decode("log entry", &value).map_err(io_err)?);
        }
        Ok(entries)
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<TypeConfig>>, io::Error> {
        self.read_meta(VOTE)
    }

    /// Entries for one AppendEntries: stops once about [`REPLICATION_BUDGET`] bytes are read
    /// (at least one entry), so a catching-up follower never gets a frame over the peer limit.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<EntryOf<TypeConfig>>, io::Error> {
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        for item in self.log.range(start.to_be_bytes()..end.to_be_bytes()) {
            let (_, value) = item.map_err(io_err)?;
            if !entries.is_empty() && bytes + value.len() > REPLICATION_BUDGET {
                break;
            }
            bytes += value.len();
            entries.push(codec::decode("log entry", &value).map_err(io_err)?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for SledLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogIdOf<TypeConfig>> = self.read_meta(PURGED)?;
        let last_entry = match self.log.last().map_err(io_err)? {
            Some((_, value)) => {
                let entry: EntryOf<TypeConfig> =
                    codec::decode("log entry", &value).map_err(io_err)?;
                Some(entry.log_id)
            }
            None => None,
        };
        // A crash between recording a purge point and removing the entries can leave entries
        // below it; the purge point is then the last log id.
        let last_log_id = last_entry.max(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> Result<(), io::Error> {
        self.write_meta(VOTE, vote)?;
        self.flusher.flush().await.map_err(io::Error::from)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogIdOf<TypeConfig>>,
    ) -> Result<(), io::Error> {
        // Durability is not required for the committed id; the next flush persists it.
        self.write_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<TypeConfig>>, io::Error> {
        Ok(self
            .read_meta::<Option<LogIdOf<TypeConfig>>>(COMMITTED)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        let mut count = 0;
        for entry in entries {
            let value = codec::encode("log entry", &entry).map_err(io_err)?;
            batch.insert(&entry.log_id.index.to_be_bytes(), value);
            count += 1;
        }
        let needs = if count == 0 {
            // Nothing new (a heartbeat): done once earlier writes are on disk.
            self.flusher.last_write()
        } else {
            self.log.apply_batch(batch).map_err(io_err)?;
            self.flusher.note_write()
        };
        // Completed by the shared fsync thread once this write is on disk.
        self.flusher.after_flush(needs, callback);
        Ok(())
    }

    async fn truncate_after(
        &mut self,
        last_log_id: Option<LogIdOf<TypeConfig>>,
    ) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |id| id.index + 1);
        let mut batch = sled::Batch::default();
        for item in self.log.range(from.to_be_bytes()..) {
            let (key, _) = item.map_err(io_err)?;
            batch.remove(key);
        }
        self.log.apply_batch(batch).map_err(io_err)?;
        self.flusher.flush().await.map_err(io::Error::from)
    }

    async fn purge(&mut self, log_id: LogIdOf<TypeConfig>) -> Result<(), io::Error> {
        // State machine writes up to `log_id` must be on disk before the entries that could
        // rebuild them go.
        self.flusher.flush().await.map_err(io::Error::from)?;
        // Record the purge point first: a crash in between leaves extra entries, never a gap.
        self.write_meta(PURGED, &log_id)?;
        let mut batch = sled::Batch::default();
        for item in self.log.range(..=log_id.index.to_be_bytes()) {
            let (key, _) = item.map_err(io_err)?;
            batch.remove(key);
        }
        self.log.apply_batch(batch).map_err(io_err)?;
        Ok(())
    }
}
