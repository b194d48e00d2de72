//! A partition group's snapshot on the wire, streamed: the leader reads it from its last
//! checkpoint's batch files batch by batch as the follower takes it, and the follower writes
//! each batch into fresh batch files as it reads it. Neither side holds more than a batch
//! and the partitions' small states in memory (plus, on the follower, the new files' index,
//! as any replica holds), however much the group retains.
//!
//! The bytes: `[u32 partitions]`, then per partition `[u32 partition][u64 state
//! length][state][u64 batches length]` and per batch `[u64 base offset][u32 count][u64
//! appended at][u32 length][events]`, then `[u32 runs]` and per stream index run `[u64
//! id][u64 length][u64 entries][u8 in the object store]`, for a run in the store `[u128
//! object name][u64 object length][u64 object entries]`, then `[the run file]`, then `[u64
//! length][group state]`, all big-endian (a run in the store is sent as its file, which
//! holds each stream's last append; its object is shared). The
//! states are the partition state machine's own encoding; this module only carries them.
//! Partitions come in ascending order; a snapshot may hold partitions the receiving group
//! does not have yet (a split's children), never fewer.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use bytes::Bytes;
use ferry_proto::StoredBatch;
use ferry_store::{
    receive_run, BatchFiles, Extent, ExtentFiles, IndexCache, RemoteRunRef, RunRef, SnapshotSource,
    StoreError,
};

/// Most bytes of one partition's encoded state (the codec's own decode bound).
const MAX_STATE_BYTES: u64 = 64 * 1024 * 1024;
/// Most event bytes of one batch.
const MAX_BATCH_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes of a batch's header in the snapshot.
const BATCH_HEADER: u64 = 24;
/// Bytes of a stream index run's header in the snapshot.
const RUN_HEADER: u64 = 25;
/// What a run in the object store adds to its header.
const REMOTE_RUN_HEADER: u64 = 32;
/// Most stream index runs of one partition (a partition holds a few dozen).
const MAX_RUNS: u32 = 4096;
/// Bytes of a run file sent in one piece.
const RUN_PIECE: u64 = 1 << 20;

/// One partition of a checkpoint, as the snapshot sends it.
pub(crate) struct SnapshotPart {
    pub(crate) partition: u32,
    /// The encoded small state.
    pub(crate) state: Bytes,
    /// Only batches holding offsets in `low..high` are sent (the checkpoint's retained ones).
    pub(crate) low: u64,
    pub(crate) high: u64,
    /// The checkpoint's segments, held open from the moment the snapshot was taken.
    pub(crate) files: ExtentFiles,
    /// The checkpoint's stream index runs, held open likewise.
    pub(crate) runs: VecDeque<(RunRef, File)>,
}

impl SnapshotPart {
    fn wanted(&self) -> impl Fn(u64, u32) -> bool {
        let (low, high) = (self.low, self.high);
        move |base, count| base + u64::from(count) > low && base < high
    }
}

/// A group's snapshot, produced as it is read. Taking it reads nothing (openraft takes the
/// current snapshot at every start, only for its meta); the first use reads the record
/// headers once to learn the length, then each batch is read (and its checksum checked)
/// when its turn comes. Nothing per batch is kept.
pub(crate) struct GroupSnapshotSource {
    partitions: u32,
    /// Parts not yet sent, with their batches' bytes once counted.
    parts: VecDeque<(SnapshotPart, Option<u64>)>,
    total: Option<u64>,
    started: bool,
    /// The part being sent.
    sending: Option<SnapshotPart>,
    /// The events of the batch whose header was the last piece.
    events: Option<Bytes>,
    /// The part's runs are being sent: the run file being sent and the bytes left of it.
    sending_run: Option<(File, u64, u64)>,
    runs_started: bool,
    /// The group's own state, sent after the last partition (taken once sent).
    group_state: Option<Bytes>,
}

impl GroupSnapshotSource {
    pub(crate) fn new(parts: Vec<SnapshotPart>, group_state: Bytes) -> Self {
        Self {
            partitions: parts.len() as u32,
            parts: parts.into_iter().map(|p| (p, None)).collect(),
            total: None,
            started: false,
            sending: None,
            events: None,
            sending_run: None,
            runs_started: false,
            group_state: Some(group_state),
        }
    }
}

impl SnapshotSource for GroupSnapshotSource {
    fn total(&mut self) -> io::Result<u64> {
        if let Some(total) = self.total {
            return Ok(total);
        }
        let mut total = 12 + self.group_state.as_ref().map_or(0, |s| s.len() as u64);
        for (part, size) in &mut self.parts {
            if size.is_none() {
                let wanted = part.wanted();
                let mut bytes = 0u64;
                part.files.for_each_header(|base, count, events| {
                    if wanted(base, count) {
                        bytes += BATCH_HEADER + u64::from(events);
                    }
                })?;
                *size = Some(bytes);
            }
            let runs: u64 = part
                .runs
                .iter()
                .map(|(r, _)| RUN_HEADER + r.remote.map_or(0, |_| REMOTE_RUN_HEADER) + r.bytes)
                .sum();
            total += 24 + part.state.len() as u64 + size.unwrap_or_default() + runs;
        }
        self.total = Some(total);
        Ok(total)
    }

    fn next_piece(&mut self) -> io::Result<Option<Bytes>> {
        self.total()?;
        if !self.started {
            self.started = true;
            return Ok(Some(Bytes::copy_from_slice(&self.partitions.to_be_bytes())));
        }
        if let Some(events) = self.events.take() {
            return Ok(Some(events));
        }
        if let Some(part) = self.sending.as_mut() {
            let wanted = part.wanted();
            if !self.runs_started {
                if let Some(batch) = part.files.next_batch(wanted)? {
                    let mut header = Vec::with_capacity(BATCH_HEADER as usize);
                    header.extend_from_slice(&batch.base_offset.to_be_bytes());
                    header.extend_from_slice(&batch.count.to_be_bytes());
                    header.extend_from_slice(&batch.appended_at_ms.to_be_bytes());
                    header.extend_from_slice(&(batch.events.len() as u32).to_be_bytes());
                    self.events = Some(batch.events);
                    return Ok(Some(Bytes::from(header)));
                }
                self.runs_started = true;
                return Ok(Some(Bytes::copy_from_slice(
                    &(part.runs.len() as u32).to_be_bytes(),
                )));
            }
            if let Some((file, at, left)) = self.sending_run.as_mut() {
                let n = (*left).min(RUN_PIECE);
                let piece = ferry_store::read_exact_at(file, n as usize, *at)?;
                *at += n;
                *left -= n;
                if *left == 0 {
                    self.sending_run = None;
                }
                return Ok(Some(Bytes::from(piece)));
            }
            if let Some((run, file)) = part.runs.pop_front() {
                let mut header = Vec::with_capacity(RUN_HEADER as usize);
                header.extend_from_slice(&run.id.to_be_bytes());
                header.extend_from_slice(&run.bytes.to_be_bytes());
                header.extend_from_slice(&run.entries.to_be_bytes());
                header.push(u8::from(run.remote.is_some()));
                if let Some(remote) = run.remote {
                    header.extend_from_slice(&remote.name.to_be_bytes());
                    header.extend_from_slice(&remote.bytes.to_be_bytes());
                    header.extend_from_slice(&remote.entries.to_be_bytes());
                }
                if run.bytes > 0 {
                    self.sending_run = Some((file, 0, run.bytes));
                }
                return Ok(Some(Bytes::from(header)));
            }
            self.sending = None;
            self.runs_started = false;
        }
        let Some((part, size)) = self.parts.pop_front() else {
            return Ok(self.group_state.take().map(|state| {
                let mut tail = Vec::with_capacity(8 + state.len());
                tail.extend_from_slice(&(state.len() as u64).to_be_bytes());
                tail.extend_from_slice(&state);
                Bytes::from(tail)
            }));
        };
        let mut head = Vec::with_capacity(20 + part.state.len());
        head.extend_from_slice(&part.partition.to_be_bytes());
        head.extend_from_slice(&(part.state.len() as u64).to_be_bytes());
        head.extend_from_slice(&part.state);
        head.extend_from_slice(&size.unwrap_or_default().to_be_bytes());
        self.sending = Some(part);
        Ok(Some(Bytes::from(head)))
    }
}

/// A snapshot as received: its partitions and the group's encoded state.
pub(crate) struct ReceivedSnapshot {
    pub(crate) parts: Vec<ReceivedPart>,
    pub(crate) group_state: Bytes,
}

/// One partition as received: its encoded state and its batches, written to fresh files
/// (with its stream index runs beside them).
pub(crate) struct ReceivedPart {
    pub(crate) partition: u32,
    pub(crate) state: Bytes,
    pub(crate) files: BatchFiles,
    /// The stream index runs it carried, in order.
    pub(crate) runs: Vec<RunRef>,
}

fn malformed(why: impl std::fmt::Display) -> StoreError {
    StoreError::io("partition snapshot", format!("malformed snapshot: {why}"))
}

/// Reads exactly `buf.len()` bytes.
fn take_into(data: &mut impl Read, buf: &mut [u8]) -> Result<(), StoreError> {
    data.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => malformed("it ends early"),
        _ => StoreError::io("partition snapshot", e),
    })
}

fn take(data: &mut impl Read, n: usize) -> Result<Vec<u8>, StoreError> {
    let mut buf = vec![0u8; n];
    take_into(data, &mut buf)?;
    Ok(buf)
}

fn take_u32(data: &mut impl Read) -> Result<u32, StoreError> {
    let mut buf = [0u8; 4];
    take_into(data, &mut buf)?;
    Ok(u32::from_be_bytes(buf))
}

fn take_u64(data: &mut impl Read) -> Result<u64, StoreError> {
    let mut buf = [0u8; 8];
    take_into(data, &mut buf)?;
    Ok(u64::from_be_bytes(buf))
}

/// Most partitions one snapshot may hold (a topic's most).
const MAX_PARTITIONS: u32 = ferry_proto::TopicConfig::MAX_PARTITIONS;

/// Reads a snapshot of the group hosting `partitions` (ascending), writing each partition's
/// batches into fresh batch files in `folder/<partition>`. Refuses (and the caller discards
/// `folder`) a snapshot that lacks one of them, is out of order or is malformed; partitions
/// beyond them are the caller's to check (a split's children).
pub(crate) fn receive_snapshot(
    data: &mut impl Read,
    partitions: &[u32],
    folder: &Path,
    segment_bytes: u64,
    cache: &IndexCache,
) -> Result<ReceivedSnapshot, StoreError> {
    let count = take_u32(data)?;
    if count > MAX_PARTITIONS || (count as usize) < partitions.len() {
        return Err(malformed(format!(
            "it holds {count} partitions, this group {} (at most {MAX_PARTITIONS})",
            partitions.len()
        )));
    }
    let mut received: Vec<ReceivedPart> = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let partition = take_u32(data)?;
        if received.last().is_some_and(|p| p.partition >= partition) {
            return Err(malformed(format!(
                "partition {partition} comes out of order"
            )));
        }
        let state_len = take_u64(data)?;
        if state_len > MAX_STATE_BYTES {
            return Err(malformed(format!(
                "partition {partition}'s state of {state_len} bytes is over {MAX_STATE_BYTES}"
            )));
        }
        let state = Bytes::from(take(data, state_len as usize)?);
        let mut left = take_u64(data)?;
        let mut files = BatchFiles::open(
            &folder.join(partition.to_string()),
            segment_bytes,
            &Extent::default(),
        )?;
        let mut next_offset = None;
        while left > 0 {
            if left < BATCH_HEADER {
                return Err(malformed("a batch header crosses its partition's end"));
            }
            let base_offset = take_u64(data)?;
            let count = take_u32(data)?;
            let appended_at_ms = take_u64(data)?;
            let len = u64::from(take_u32(data)?);
            left -= BATCH_HEADER;
            if len > left || len > MAX_BATCH_BYTES {
                return Err(malformed(format!(
                    "a batch of {len} bytes at offset {base_offset} is over what is left ({left}) or {MAX_BATCH_BYTES}"
                )));
            }
            if next_offset.is_some_and(|next| base_offset < next) {
                return Err(malformed(format!(
                    "batches out of order at offset {base_offset}"
                )));
            }
            next_offset = Some(base_offset + u64::from(count));
            let events = Bytes::from(take(data, len as usize)?);
            left -= len;
            files.append(&StoredBatch {
                base_offset,
                count,
                appended_at_ms,
                events,
            })?;
        }
        let runs = take_u32(data)?;
        if runs > MAX_RUNS {
            return Err(malformed(format!(
                "partition {partition} has {runs} stream index runs (at most {MAX_RUNS})"
            )));
        }
        let mut carried = Vec::with_capacity(runs as usize);
        for _ in 0..runs {
            let (id, bytes, entries) = (take_u64(data)?, take_u64(data)?, take_u64(data)?);
            let remote = match take(data, 1)?[0] {
                0 => None,
                1 => Some(RemoteRunRef {
                    name: u128::from_be_bytes(
                        take(data, 16)?
                            .try_into()
                            .map_err(|_| malformed("a short object name"))?,
                    ),
                    bytes: take_u64(data)?,
                    entries: take_u64(data)?,
                }),
                other => {
                    return Err(malformed(format!(
                        "stream index run {id} of partition {partition}: its place byte is {other}, neither 0 (on disk) nor 1 (in the object store)"
                    )))
                }
            };
            let reference = RunRef {
                id,
                bytes,
                entries,
                remote,
            };
            if carried.iter().any(|r: &RunRef| r.id == reference.id) {
                return Err(malformed(format!(
                    "partition {partition} carries stream index run {} twice",
                    reference.id
                )));
            }
            receive_run(files.dir(), reference, data, cache)?;
            carried.push(reference);
        }
        received.push(ReceivedPart {
            partition,
            state,
            files,
            runs: carried,
        });
    }
    if let Some(missing) = partitions
        .iter()
        .find(|p| !received.iter().any(|r| r.partition == **p))
    {
        return Err(malformed(format!(
            "it lacks partition {missing} of this group (partitions {partitions:?})"
        )));
    }
    let state_len = take_u64(data)?;
    if state_len > MAX_STATE_BYTES {
        return Err(malformed(format!(
            "the group's state of {state_len} bytes is over {MAX_STATE_BYTES}"
        )));
    }
    let group_state = Bytes::from(take(data, state_len as usize)?);
    let mut rest = [0u8; 1];
    if data
        .read(&mut rest)
        .map_err(|e| StoreError::io("partition snapshot", e))?
        != 0
    {
        return Err(malformed("bytes follow the group's state"));
    }
    Ok(ReceivedSnapshot {
        parts: received,
        group_state,
    })
}
