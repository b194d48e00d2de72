//! The partition state machine: assigns offsets to appended batches, deduplicates producer
//! retries by (producer id, sequence), keeps consumer group cursors and trims by retention.
//!
//! Tree layout (`sm:<topic>/<partition>`): `e`+offset → [`StoredBatch`] (keyed by the
//! batch's first offset), `p`+producer → [`ProducerState`], `c`+group → cursor, `w` →
//! [`Watermarks`]. Readers use [`PartitionView`]; the watermark is published only after the
//! batch is in the tree, so a reader never sees an offset it cannot read.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use ferry_proto::wire::{ApiError, ErrorCode};
use ferry_proto::{codec, EventBatch, ProducerId, StoredBatch};
use ferry_store::{Application, StoreError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::command::{decode, encode, PartitionCommand, PartitionReply};

const EVENT_PREFIX: u8 = b'e';
const PRODUCER_PREFIX: u8 = b'p';
const CURSOR_PREFIX: u8 = b'c';
const WATERMARKS: &[u8] = b"w";

/// How many recent batches per producer are remembered to answer retries with their offsets.
const DEDUPE_WINDOW: usize = 64;

/// The oldest retained offset and the offset the next event will get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Watermarks {
    /// Oldest retained offset.
    pub low: u64,
    /// Next offset to assign.
    pub high: u64,
}

/// What a partition remembers of one producer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ProducerState {
    /// Sequence of the last event appended.
    last_seq: Option<u64>,
    /// Recent batches: (first sequence, count, base offset).
    recent: VecDeque<(u64, u32, u64)>,
}

fn event_key(offset: u64) -> [u8; 9] {
    let mut key = [EVENT_PREFIX; 9];
    key[1..].copy_from_slice(&offset.to_be_bytes());
    key
}

fn producer_key(producer: ProducerId) -> [u8; 9] {
    let mut key = [PRODUCER_PREFIX; 9];
    key[1..].copy_from_slice(&producer.to_be_bytes());
    key
}

fn cursor_key(group: &str) -> Vec<u8> {
    let mut key = vec![CURSOR_PREFIX];
    key.extend_from_slice(group.as_bytes());
    key
}

/// Read access to a partition's applied state, shared with the API.
pub struct PartitionView {
    tree: sled::Tree,
    watermarks: watch::Sender<Watermarks>,
    bytes: AtomicU64,
}

impl PartitionView {
    /// The current watermarks.
    pub fn watermarks(&self) -> Watermarks {
        *self.watermarks.borrow()
    }

    /// A receiver that changes whenever batches are applied or trimmed.
    pub fn subscribe(&self) -> watch::Receiver<Watermarks> {
        self.watermarks.subscribe()
    }

    /// Bytes of event data held.
    pub fn stored_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Batches holding offsets from `offset` on, at most `max_bytes` of event data (but at
    /// least one batch if any is there). The first batch may start before `offset`.
    pub fn read(&self, offset: u64, max_bytes: usize) -> Result<Vec<StoredBatch>, StoreError> {
        let io = |e: sled::Error| StoreError::io("partition read", e);
        let mut out = Vec::new();
        let mut size = 0usize;
        // Returns true when the next batch would not fit.
        let mut push = |value: &[u8], out: &mut Vec<StoredBatch>| -> Result<bool, StoreError> {
            let batch: StoredBatch = codec::decode("stored batch", value)?;
            if !out.is_empty() && size + batch.events.len() > max_bytes {
                return Ok(true);
            }
            size += batch.events.len();
            out.push(batch);
            Ok(size >= max_bytes)
        };
        let start = event_key(offset);
        if let Some((key, value)) = self
            .tree
            .range(..=start)
            .next_back()
            .transpose()
            .map_err(io)?
        {
            if key.first() == Some(&EVENT_PREFIX) {
                let batch: StoredBatch = codec::decode("stored batch", &value)?;
                if batch.end_offset() > offset && push(&value, &mut out)? {
                    return Ok(out);
                }
            }
        }
        let end = event_key(u64::MAX);
        for item in self.tree.range((
            std::ops::Bound::Excluded(start),
            std::ops::Bound::Included(end),
        )) {
            let (_, value) = item.map_err(io)?;
            if push(&value, &mut out)? {
                break;
            }
        }
        Ok(out)
    }

    /// A consumer group's committed cursor.
    pub fn committed(&self, group: &str) -> Result<Option<u64>, StoreError> {
        let value = self
            .tree
            .get(cursor_key(group))
            .map_err(|e| StoreError::io("cursor read", e))?;
        Ok(value
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes))
    }

    /// The first offset at or after which retention must drop data, given the policy, or None.
    pub fn retention_point(
        &self,
        now_ms: u64,
        max_age_ms: Option<u64>,
        max_bytes: Option<u64>,
    ) -> Option<u64> {
        let mut excess = max_bytes.map(|max| self.stored_bytes().saturating_sub(max));
        let mut trim_to = None;
        let high = self.watermarks().high;
        for item in self.tree.range(event_key(0)..=event_key(u64::MAX)) {
            let Ok((_, value)) = item else { break };
            let Ok(batch) = codec::decode::<StoredBatch>("stored batch", &value) else {
                break;
            };
            let too_old =
                max_age_ms.is_some_and(|age| batch.appended_at_ms.saturating_add(age) < now_ms);
            let too_big = excess.is_some_and(|e| e > 0);
            // Never trim the batch that ends at the high watermark: it shows where offsets are.
            if !(too_old || too_big) || batch.end_offset() >= high {
                break;
            }
            if let Some(e) = excess.as_mut() {
                *e = e.saturating_sub(batch.events.len() as u64);
            }
            trim_to = Some(batch.end_offset());
        }
        trim_to
    }
}

/// The partition [`Application`].
pub struct PartitionApp {
    view: Arc<PartitionView>,
    marks: Watermarks,
    producers: HashMap<ProducerId, ProducerState>,
}

impl PartitionApp {
    /// A partition application over `tree` (the same tree the state machine writes).
    pub fn new(tree: sled::Tree) -> Self {
        let view = Arc::new(PartitionView {
            tree,
            watermarks: watch::channel(Watermarks::default()).0,
            bytes: AtomicU64::new(0),
        });
        Self {
            view,
            marks: Watermarks::default(),
            producers: HashMap::new(),
        }
    }

    /// The shared read view.
    pub fn view(&self) -> Arc<PartitionView> {
        self.view.clone()
    }

    fn append(
        &mut self,
        batch: EventBatch,
        appended_at_ms: u64,
        tree: &sled::Tree,
        writes: &mut sled::Batch,
    ) -> PartitionReply {
        // The leader decoded and validated the events before proposing them
        // (`submit_publish`); replicas store the bytes as they are.
        if batch.count == 0 {
            return PartitionReply::Error(ApiError::new(ErrorCode::InvalidRequest, "empty batch"));
        }
        let count = batch.count;
        if let Some(producer) = batch.producer {
            let state = match self.producers.get(&producer) {
                Some(s) => s.clone(),
                None => match tree.get(producer_key(producer)) {
                    Ok(Some(v)) => codec::decode("producer state", &v).unwrap_or_default(),
                    _ => ProducerState::default(),
                },
            };
            let Some(last_event_seq) = batch.first_seq.checked_add(u64::from(count) - 1) else {
                return PartitionReply::Error(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "producer {producer}: sequence {} overflows",
                        batch.first_seq
                    ),
                ));
            };
            if let Some(last) = state.last_seq {
                if last_event_seq <= last {
                    return match state.recent.iter().find(|(s, c, _)| *s == batch.first_seq && *c == count) {
                        Some((_, _, base)) => PartitionReply::Appended {
                            base_offset: *base,
                            count,
                            duplicate: true,
                        },
                        None => PartitionReply::Error(ApiError::new(
                            ErrorCode::OutOfOrderSequence,
                            format!(
                                "producer {producer}: sequence {} was already appended and is older than the dedupe window",
                                batch.first_seq
                            ),
                        )),
                    };
                }
                if batch.first_seq != last + 1 {
                    return PartitionReply::Error(ApiError::new(
                        ErrorCode::OutOfOrderSequence,
                        format!(
                            "producer {producer}: expected sequence {}, got {}",
                            last + 1,
                            batch.first_seq
                        ),
                    ));
                }
            } else if batch.first_seq != 0 {
                // A producer's first batch on a partition starts at 0; anything else means an
                // earlier batch is missing.
                return PartitionReply::Error(ApiError::new(
                    ErrorCode::OutOfOrderSequence,
                    format!(
                        "producer {producer}: expected sequence 0, got {}",
                        batch.first_seq
                    ),
                ));
            }
            let mut state = state;
            state.last_seq = Some(last_event_seq);
            state
                .recent
                .push_back((batch.first_seq, count, self.marks.high));
            while state.recent.len() > DEDUPE_WINDOW {
                state.recent.pop_front();
            }
            if let Ok(v) = codec::encode("producer state", &state) {
                writes.insert(&producer_key(producer), v);
            }
            self.producers.insert(producer, state);
        }
        let base_offset = self.marks.high;
        let stored = StoredBatch {
            base_offset,
            count,
            appended_at_ms,
            events: batch.events,
        };
        let size = stored.events.len() as u64;
        match codec::encode("stored batch", &stored) {
            Ok(v) => writes.insert(&event_key(base_offset), v),
            Err(e) => {
                return PartitionReply::Error(ApiError::new(ErrorCode::Internal, e.to_string()))
            }
        }
        self.marks.high += u64::from(count);
        self.view.bytes.fetch_add(size, Ordering::Relaxed);
        self.write_marks(writes);
        PartitionReply::Appended {
            base_offset,
            count,
            duplicate: false,
        }
    }

    fn trim(&mut self, before: u64, tree: &sled::Tree, writes: &mut sled::Batch) -> PartitionReply {
        let mut freed = 0u64;
        for item in tree.range(event_key(0)..event_key(before)) {
            let Ok((key, value)) = item else { break };
            let Ok(batch) = codec::decode::<StoredBatch>("stored batch", &value) else {
                break;
            };
            if batch.end_offset() > before {
                break;
            }
            freed += batch.events.len() as u64;
            writes.remove(key);
            self.marks.low = self.marks.low.max(batch.end_offset());
        }
        self.view
            .bytes
            .fetch_sub(freed.min(self.view.stored_bytes()), Ordering::Relaxed);
        self.write_marks(writes);
        PartitionReply::Done
    }

    fn write_marks(&self, writes: &mut sled::Batch) {
        if let Ok(v) = codec::encode("watermarks", &self.marks) {
            writes.insert(WATERMARKS, v);
        }
    }
}

impl Application for PartitionApp {
    fn load(&mut self, tree: &sled::Tree) -> Result<(), StoreError> {
        self.marks = match tree
            .get(WATERMARKS)
            .map_err(|e| StoreError::io("watermarks", e))?
        {
            Some(v) => codec::decode("watermarks", &v)?,
            None => Watermarks::default(),
        };
        self.producers.clear();
        let mut bytes = 0u64;
        for item in tree.range(event_key(0)..=event_key(u64::MAX)) {
            let (_, value) = item.map_err(|e| StoreError::io("partition scan", e))?;
            let batch: StoredBatch = codec::decode("stored batch", &value)?;
            bytes += batch.events.len() as u64;
        }
        self.view.bytes.store(bytes, Ordering::Relaxed);
        self.view.watermarks.send_replace(self.marks);
        Ok(())
    }

    fn apply(
        &mut self,
        _index: u64,
        command: &[u8],
        tree: &sled::Tree,
        writes: &mut sled::Batch,
    ) -> Bytes {
        let reply = match decode::<PartitionCommand>("partition command", command) {
            Ok(PartitionCommand::Append {
                batch,
                appended_at_ms,
            }) => self.append(batch, appended_at_ms, tree, writes),
            Ok(PartitionCommand::Commit { group, offset }) => {
                writes.insert(cursor_key(&group), &offset.to_be_bytes());
                PartitionReply::Done
            }
            Ok(PartitionCommand::Trim { before_offset }) => self.trim(before_offset, tree, writes),
            Err(e) => {
                PartitionReply::Error(ApiError::new(ErrorCode::InvalidRequest, e.to_string()))
            }
        };
        encode("partition reply", &reply).unwrap_or_default()
    }

    fn after_apply(&mut self, _tree: &sled::Tree) {
        self.view.watermarks.send_if_modified(|w| {
            let changed = *w != self.marks;
            *w = self.marks;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use ferry_proto::{Event, Limits, Subject};

    use super::*;

    fn batch(producer: Option<u64>, first_seq: u64, count: u32) -> EventBatch {
        let events: Vec<Event> = (0..count)
            .map(|i| {
                Event::new(
                    format!("e{first_seq}-{i}"),
                    "/t",
                    "t",
                    Subject::new("a").unwrap(),
                    vec![0u8; 8],
                )
            })
            .collect();
        let mut b = EventBatch::new(&events, producer, 0, &Limits::default()).unwrap();
        b.first_seq = first_seq;
        b
    }

    fn append(app: &mut PartitionApp, tree: &sled::Tree, b: EventBatch) -> PartitionReply {
        let command = encode(
            "c",
            &PartitionCommand::Append {
                batch: b,
                appended_at_ms: 1,
            },
        )
        .unwrap();
        let mut writes = sled::Batch::default();
        let reply = app.apply(0, &command, tree, &mut writes);
        tree.apply_batch(writes).unwrap();
        app.after_apply(tree);
        decode("r", &reply).unwrap()
    }

    fn appended(base_offset: u64, count: u32, duplicate: bool) -> PartitionReply {
        PartitionReply::Appended {
            base_offset,
            count,
            duplicate,
        }
    }

    #[test]
    fn offsets_dedupe_and_sequence_checks() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("p").unwrap();
        let mut app = PartitionApp::new(tree.clone());

        assert_eq!(
            append(&mut app, &tree, batch(Some(7), 0, 3)),
            appended(0, 3, false)
        );
        assert_eq!(
            append(&mut app, &tree, batch(None, 0, 2)),
            appended(3, 2, false)
        );
        assert_eq!(
            append(&mut app, &tree, batch(Some(7), 3, 2)),
            appended(5, 2, false)
        );
        // A resent batch gets its original offsets and is not stored again.
        assert_eq!(
            append(&mut app, &tree, batch(Some(7), 0, 3)),
            appended(0, 3, true)
        );
        assert_eq!(app.view().watermarks().high, 7);
        // A gap, a partial overlap, a first batch not at 0 and an overflowing sequence are refused.
        let refused = |r: PartitionReply, code: ErrorCode| matches!(r, PartitionReply::Error(e) if e.code == code);
        assert!(refused(
            append(&mut app, &tree, batch(Some(7), 9, 1)),
            ErrorCode::OutOfOrderSequence
        ));
        assert!(refused(
            append(&mut app, &tree, batch(Some(7), 4, 2)),
            ErrorCode::OutOfOrderSequence
        ));
        assert!(refused(
            append(&mut app, &tree, batch(Some(8), 5, 1)),
            ErrorCode::OutOfOrderSequence
        ));
        assert!(refused(
            append(&mut app, &tree, batch(Some(9), u64::MAX, 2)),
            ErrorCode::InvalidRequest
        ));
        assert_eq!(
            app.view().watermarks().high,
            7,
            "refused batches change nothing"
        );

        // Reading back from an offset inside a batch returns that batch first.
        let read = app.view().read(1, 1 << 20).unwrap();
        assert_eq!(
            read.iter()
                .map(|b| (b.base_offset, b.count))
                .collect::<Vec<_>>(),
            vec![(0, 3), (3, 2), (5, 2)]
        );
        // A restart (load from the tree) keeps offsets and dedupe state.
        let mut reloaded = PartitionApp::new(tree.clone());
        reloaded.load(&tree).unwrap();
        assert_eq!(reloaded.view().watermarks().high, 7);
        assert_eq!(
            append(&mut reloaded, &tree, batch(Some(7), 3, 2)),
            appended(5, 2, true)
        );
        assert_eq!(
            append(&mut reloaded, &tree, batch(Some(7), 5, 1)),
            appended(7, 1, false)
        );
    }
}
