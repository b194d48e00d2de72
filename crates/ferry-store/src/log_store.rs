//! openraft log storage for one group, on the node's shared [`Wal`]: appends are records in
//! the write-ahead log, completed by the shared fsync thread once they are on disk.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::{OptionalSend, RaftLogReader};

use crate::wal::{Record, Wal};
use crate::{DurableSled, GroupCommit, GroupId, TypeConfig};

/// Bytes of log entries read for one replication request (peer frames allow 64 MiB). 16 MiB
/// made a learner catching up on the log after a 2 GB snapshot peak 114 MiB above idle and its
/// leader 73; 2 MiB: 64-67 and 20-38, the move no slower, produce at 8 partitions unchanged.
const REPLICATION_BUDGET: usize = 2 * 1024 * 1024;

/// One group's Raft log. Cloning shares it.
#[derive(Clone)]
pub struct WalLogStore {
    group: GroupId,
    wal: Arc<Wal>,
    flusher: GroupCommit,
    /// The state machines' database: synced before entries that could rebuild it go.
    db: DurableSled,
}

fn range_of(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(i) => *i,
        Bound::Excluded(i) => i.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(i) => i.saturating_add(1),
        Bound::Excluded(i) => *i,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl WalLogStore {
    pub(crate) fn new(
        group: GroupId,
        wal: Arc<Wal>,
        flusher: GroupCommit,
        db: DurableSled,
    ) -> Self {
        Self {
            group,
            wal,
            flusher,
            db,
        }
    }

    /// Forgets the group's whole log on this node (entries, vote, committed id, purge
    /// point), durably: for a replica that left its group, once its Raft has stopped. A
    /// group of this name opened later starts empty.
    pub async fn drop_group(&self) -> Result<(), io::Error> {
        self.write_durably(Record::Dropped {
            group: self.group.clone(),
        })
        .await
    }

    /// Writes `record` and waits until it is on disk.
    async fn write_durably(&self, record: Record) -> Result<(), io::Error> {
        self.wal.append(vec![record])?;
        self.flusher.flush().await.map_err(io::Error::from)
    }
}

impl RaftLogReader<TypeConfig> for WalLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<TypeConfig>>, io::Error> {
        let (start, end) = range_of(&range);
        Ok(self.wal.read(&self.group, start, end, usize::MAX)?)
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<TypeConfig>>, io::Error> {
        Ok(self.wal.vote(&self.group))
    }

    /// Entries for one AppendEntries: stops once about [`REPLICATION_BUDGET`] bytes are read
    /// (at least one entry), so a catching-up follower never gets a frame over the peer limit.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<EntryOf<TypeConfig>>, io::Error> {
        Ok(self.wal.read(&self.group, start, end, REPLICATION_BUDGET)?)
    }
}

impl RaftLogStorage<TypeConfig> for WalLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let bounds = self.wal.bounds(&self.group);
        Ok(LogState {
            last_purged_log_id: bounds.purged,
            last_log_id: bounds.last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> Result<(), io::Error> {
        self.write_durably(Record::Vote {
            group: self.group.clone(),
            vote: *vote,
        })
        .await
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogIdOf<TypeConfig>>,
    ) -> Result<(), io::Error> {
        // Durability is not required for the committed id; the next fsync persists it.
        Ok(self.wal.append(vec![Record::Committed {
            group: self.group.clone(),
            committed,
        }])?)
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<TypeConfig>>, io::Error> {
        Ok(self.wal.committed(&self.group))
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
        let records: Vec<Record> = entries
            .into_iter()
            .map(|entry| Record::Entry {
                group: self.group.clone(),
                entry,
            })
            .collect();
        let needs = if records.is_empty() {
            // Nothing new (a heartbeat): done once earlier writes are on disk.
            self.flusher.last_write()
        } else {
            self.wal.append(records)?;
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
        self.write_durably(Record::TruncatedAfter {
            group: self.group.clone(),
            last: last_log_id,
        })
        .await
    }

    async fn purge(&mut self, log_id: LogIdOf<TypeConfig>) -> Result<(), io::Error> {
        // State machine writes up to `log_id` must be on disk before the entries that could
        // rebuild them go.
        self.db.sync_async().await.map_err(io::Error::from)?;
        self.wal.append(vec![Record::Purged {
            group: self.group.clone(),
            log_id,
        }])?;
        // The log's oldest segments may be freed now; they are deleted only once a sync
        // covers what freed them (this purge, copies forward).
        self.wal.compact(|| self.flusher.note_write())?;
        self.flusher.flush().await.map_err(io::Error::from)?;
        // Deleting them is left to a background thread: the group's Raft waits for its purge,
        // and a large file takes the file system a while to delete. A failure there stops
        // nothing: a segment that could not be retired stays in the log for a later purge,
        // and a retired file left behind is deleted when the log next opens.
        let wal = self.wal.clone();
        let synced = self.flusher.synced();
        let group = self.group.clone();
        tokio::task::spawn_blocking(move || match wal.remove_freed(synced) {
            Ok(0) => {}
            Ok(removed) => {
                tracing::debug!(%group, removed, "removed write-ahead log segments")
            }
            Err(e) => tracing::warn!(%group, error = %e, "removing write-ahead log segments"),
        });
        Ok(())
    }
}
