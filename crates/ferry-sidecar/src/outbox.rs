//! The durable outbox: a publish is answered 2xx only once its event is in sled and synced,
//! and stays there until the region has acknowledged it.
//!
//! Accepted events are grouped (one group per sync: a group commit) and each group is cut
//! into *records*, one per (topic, partition) lane: an [`EventBatch`] already numbered with
//! the sidecar's producer id and the lane's next sequences. A record is sent to the region
//! exactly as stored, again after any failure or restart, so the partition recognises a
//! resend by (producer, sequence) and appends it once. The producer id and each lane's next
//! sequence are persisted in the same sled batch as the records.
//!
//! [`Sequencer`] is the part without I/O: which lane an event goes to and which sequences a
//! record gets.
//!
//! Keys go to lanes by the topic's [`TopicShape`] as the outbox first planned it (kept in
//! sled, so records held across a restart and new ones agree). When the topic grew and a
//! split parent refuses a lane's first record, [`Outbox::reroute`] waits until no lane of the
//! topic has a send in flight ([`Outbox::sending`]), then plans every record the topic's
//! lanes hold again, in their order, by the new shape, in one write. None of them is in the
//! region: the refused lane's first was refused and the rest follow it; another lane's records
//! were never sent, or sent and answered as not held, by this process. Records of an earlier
//! process (made before a stop that was not clean) may have been appended unbeknown to the
//! outbox: while another lane holds such records the reroute waits for their lanes to send
//! them first, unless that lane's first record was refused too (then none of its records is
//! in the region). A key's events keep their order.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ferry_proto::{codec, key_hash, linear_partition, Event, EventBatch, Limits, ProducerId};
use ferry_store::DurableSled;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Notify};

/// Most events in one record (one region batch).
pub const MAX_RECORD_EVENTS: usize = 512;
/// Most payload bytes in one record (a larger single event still goes alone).
pub const MAX_RECORD_BYTES: usize = 512 * 1024;

/// Why the outbox refused or failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OutboxError {
    /// Holding the events would exceed a bound: answer 503 with `Retry-After`.
    #[error("the outbox is full ({events} events, {bytes} bytes held; bounds {max_events} events, {max_bytes} bytes)")]
    Full {
        /// Events held.
        events: u64,
        /// Bytes held.
        bytes: u64,
        /// The event bound.
        max_events: u64,
        /// The byte bound.
        max_bytes: u64,
    },
    /// An event is invalid (size, attributes).
    #[error("invalid event: {0}")]
    Invalid(String),
    /// sled failed.
    #[error("outbox store: {0}")]
    Store(String),
    /// The outbox is shutting down.
    #[error("the outbox is closed")]
    Closed,
}

fn store_err(e: impl std::fmt::Display) -> OutboxError {
    OutboxError::Store(e.to_string())
}

/// A topic partition the outbox sends to, in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lane {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
}

impl std::fmt::Display for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// How a topic's keys map to its partitions ([`ferry_proto::KeyLayout`]): its partition
/// count and the count it was created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicShape {
    /// Partitions now.
    pub partitions: u32,
    /// Partitions it was created with (0: never grown).
    pub initial: u32,
}

impl TopicShape {
    /// A topic that never grew.
    pub fn new(partitions: u32) -> Self {
        Self {
            partitions,
            initial: 0,
        }
    }

    /// The shape a topic's description shows.
    pub fn of(description: &ferry_proto::wire::TopicDescription) -> Self {
        Self {
            partitions: description.config.partitions,
            initial: description.layout.initial,
        }
    }

    /// The partition of `key`.
    pub fn partition_for_key(&self, key: &[u8]) -> u32 {
        linear_partition(key_hash(key), self.initial, self.partitions)
    }

    /// The partition of a domain stream (where it was created; see
    /// [`ferry_proto::KeyLayout::stream_partition`]).
    pub fn stream_partition(&self, stream: &str) -> u32 {
        let layout = ferry_proto::KeyLayout {
            initial: self.initial,
            splits: Vec::new(),
        };
        layout.stream_partition(stream, self.partitions)
    }

    fn encode(&self) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&self.partitions.to_be_bytes());
        out[4..].copy_from_slice(&self.initial.to_be_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        match bytes.len() {
            // Written before topics could grow: the count alone.
            4 => Some(Self::new(u32::from_be_bytes(bytes.try_into().ok()?))),
            8 => Some(Self {
                partitions: u32::from_be_bytes(bytes[..4].try_into().ok()?),
                initial: u32::from_be_bytes(bytes[4..].try_into().ok()?),
            }),
            _ => None,
        }
    }
}

/// An event to accept.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Its topic.
    pub topic: String,
    /// The topic's shape as the caller knows it (used for a topic the outbox has not
    /// planned records for yet).
    pub shape: TopicShape,
    /// The event (its `key`, if any, picks the partition).
    pub event: Event,
}

/// One group of events cut into per-lane records, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Where it goes.
    pub lane: Lane,
    /// Its place in the lane (the outbox's key order; equal to the batch's sequence unless
    /// the producer identity changed after an unclean stop).
    pub position: u64,
    /// The batch exactly as it will be sent (and resent).
    pub batch: EventBatch,
    /// Payload bytes it holds.
    pub bytes: u64,
}

/// The next position of each lane a planned group touches.
pub type Advance = HashMap<Lane, u64>;

/// Keyless events of a topic stay on one partition for this many events before the next
/// partition takes over (Kafka's "sticky" partitioning): each send to the region then carries
/// many events, which costs the region far less per event than many small batches.
pub const STICKY_EVENTS: u64 = 1024;

/// Numbers records: lanes by key hash (keyless events: a sticky partition per topic, moving on
/// round-robin every [`STICKY_EVENTS`]; one group's keyless events always form one batch),
/// positions and sequences per lane. A record's position orders it in its lane; its sequence
/// is the position counted from where the current producer identity started in that lane
/// (its `base`), so a new identity's first batch in a lane has sequence 0.
#[derive(Debug, Clone)]
pub struct Sequencer {
    producer: ProducerId,
    next_seq: HashMap<Lane, u64>,
    /// Per lane: the position of this producer's sequence 0 (0 when absent).
    base: HashMap<Lane, u64>,
    /// Per topic: the sticky partition of keyless events and how many more it takes.
    sticky: HashMap<String, (u32, u64)>,
    /// Per topic: the shape its keys are planned by (see the module's doc).
    shapes: HashMap<String, TopicShape>,
}

impl Sequencer {
    /// A sequencer for `producer` continuing from the positions `next_seq`, its sequences
    /// counted from `base` (per lane; 0 when absent).
    pub fn new(
        producer: ProducerId,
        next_seq: HashMap<Lane, u64>,
        base: HashMap<Lane, u64>,
    ) -> Self {
        Self {
            producer,
            next_seq,
            base,
            sticky: HashMap::new(),
            shapes: HashMap::new(),
        }
    }

    /// The shape `topic`'s keys are planned by, once one was planned.
    pub fn shape(&self, topic: &str) -> Option<TopicShape> {
        self.shapes.get(topic).copied()
    }

    /// Plans `topic`'s keys by `shape` from now on.
    pub fn set_shape(&mut self, topic: &str, shape: TopicShape) {
        self.shapes.insert(topic.to_string(), shape);
        self.sticky.remove(topic);
    }

    /// The position of the current producer's sequence 0 in a lane.
    pub fn base(&self, lane: &Lane) -> u64 {
        self.base.get(lane).copied().unwrap_or(0)
    }

    /// Moves a lane's next position back to `position` (its records from there on were
    /// taken out to be planned again).
    pub fn rewind(&mut self, lane: Lane, position: u64) {
        self.next_seq.insert(lane, position);
    }

    /// The producer id records are numbered with.
    pub fn producer(&self) -> ProducerId {
        self.producer
    }

    /// Counts the lane's sequences from `position` on (its sequence 0 is there now).
    pub fn rebase(&mut self, lane: Lane, position: u64) {
        self.base.insert(lane, position);
    }

    /// The next position of a lane.
    pub fn next_seq(&self, lane: &Lane) -> u64 {
        self.next_seq.get(lane).copied().unwrap_or(0)
    }

    /// Moves the lanes' positions past records of [`Sequencer::plan`] that were stored.
    pub fn commit(&mut self, advance: Advance) {
        self.next_seq.extend(advance);
    }

    /// Cuts one group into records (events of a lane keep their order), numbered from the
    /// lanes' next sequences, which advance only when the records are [`Sequencer::commit`]ted
    /// (once they are stored). Validates every event first.
    pub fn plan(
        &mut self,
        group: Vec<Pending>,
        limits: &Limits,
    ) -> Result<(Vec<Record>, Advance), String> {
        for p in &group {
            p.event
                .validate(limits)
                .map_err(|e| format!("event {}: {e}", p.event.id))?;
        }
        let mut lanes: BTreeMap<Lane, Vec<Event>> = BTreeMap::new();
        let mut keyless_partition: HashMap<String, u32> = HashMap::new();
        for p in group {
            let shape = *self.shapes.entry(p.topic.clone()).or_insert(p.shape);
            let partitions = shape.partitions.max(1);
            let partition = match &p.event.key {
                Some(key) => shape.partition_for_key(key),
                None => {
                    let partition =
                        *keyless_partition.entry(p.topic.clone()).or_insert_with(|| {
                            let (partition, left) = self
                                .sticky
                                .entry(p.topic.clone())
                                .or_insert((partitions - 1, 0));
                            if *left == 0 {
                                *partition = (*partition + 1) % partitions;
                                *left = STICKY_EVENTS;
                            }
                            *partition
                        });
                    if let Some((_, left)) = self.sticky.get_mut(&p.topic) {
                        *left = left.saturating_sub(1);
                    }
                    partition
                }
            };
            lanes
                .entry(Lane {
                    topic: p.topic,
                    partition,
                })
                .or_default()
                .push(p.event);
        }
        let mut records = Vec::new();
        // Only the lanes this group touches.
        let mut next_seq: Advance = HashMap::new();
        for (lane, events) in lanes {
            let mut chunk: Vec<Event> = Vec::new();
            let mut chunk_bytes = 0usize;
            let mut cut = |chunk: &mut Vec<Event>, chunk_bytes: &mut usize| {
                if chunk.is_empty() {
                    return Ok(());
                }
                let stored = self.next_seq(&lane);
                let base = self.base.get(&lane).copied().unwrap_or(0);
                let seq = next_seq.entry(lane.clone()).or_insert(stored);
                let batch = EventBatch::new(chunk, Some(self.producer), *seq - base, limits)
                    .map_err(|e| e.to_string())?;
                let position = *seq;
                *seq += chunk.len() as u64;
                records.push(Record {
                    lane: lane.clone(),
                    position,
                    bytes: *chunk_bytes as u64,
                    batch,
                });
                chunk.clear();
                *chunk_bytes = 0;
                Ok::<(), String>(())
            };
            for event in events {
                let size = event.size();
                if !chunk.is_empty()
                    && (chunk.len() >= MAX_RECORD_EVENTS || chunk_bytes + size > MAX_RECORD_BYTES)
                {
                    cut(&mut chunk, &mut chunk_bytes)?;
                }
                chunk_bytes += size;
                chunk.push(event);
            }
            cut(&mut chunk, &mut chunk_bytes)?;
        }
        Ok((records, next_seq))
    }
}

/// What a record holds in sled.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredRecord {
    batch: EventBatch,
    bytes: u64,
    accepted_at_ms: u64,
}

/// A record read back for sending.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Its lane.
    pub lane: Lane,
    /// The batch to send.
    pub batch: EventBatch,
    /// Payload bytes.
    pub bytes: u64,
    /// When it was accepted (ms since the epoch).
    pub accepted_at_ms: u64,
    key: Vec<u8>,
}

impl Outgoing {
    /// Its position in the lane.
    pub fn position(&self) -> u64 {
        position_of(&self.key).unwrap_or(0)
    }
}

const PRODUCER_KEY: &[u8] = b"p";
/// Present while the outbox is closed cleanly (written at shutdown, removed at open).
const CLEAN_KEY: &[u8] = b"c";

/// Where the shape a topic's records are planned by is kept.
fn planned_key(topic: &str) -> Vec<u8> {
    let mut key = vec![b't'];
    key.extend_from_slice(topic.as_bytes());
    key
}

/// Where the shape last learned from the region is kept.
fn learned_key(topic: &str) -> Vec<u8> {
    let mut key = vec![b'T'];
    key.extend_from_slice(topic.as_bytes());
    key
}

fn sending_lock(sending: &Sending, topic: &str) -> Arc<tokio::sync::RwLock<()>> {
    sending
        .lock()
        .expect("outbox sending locks")
        .entry(topic.to_string())
        .or_default()
        .clone()
}

fn lane_prefix(tag: u8, lane: &Lane) -> Vec<u8> {
    let mut key = Vec::with_capacity(lane.topic.len() + 6);
    key.push(tag);
    key.extend_from_slice(lane.topic.as_bytes());
    key.push(0);
    key.extend_from_slice(&lane.partition.to_be_bytes());
    key
}

fn record_key(lane: &Lane, position: u64) -> Vec<u8> {
    let mut key = lane_prefix(b'r', lane);
    key.extend_from_slice(&position.to_be_bytes());
    key
}

/// The lane a `r`/`s`/`b` key names.
fn lane_of(key: &[u8]) -> Option<Lane> {
    let rest = key.get(1..)?;
    let zero = rest.iter().position(|b| *b == 0)?;
    let topic = std::str::from_utf8(&rest[..zero]).ok()?.to_string();
    let partition = u32::from_be_bytes(rest.get(zero + 1..zero + 5)?.try_into().ok()?);
    Some(Lane { topic, partition })
}

/// The position a record key ends with.
fn position_of(key: &[u8]) -> Option<u64> {
    u64_of(key.get(key.len().checked_sub(8)?..)?)
}

fn u64_of(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Events and bytes held, and what was accepted and sent in total.
#[derive(Debug, Default)]
pub struct OutboxCounts {
    /// Events held now.
    pub events: AtomicU64,
    /// Payload bytes held now.
    pub bytes: AtomicU64,
    /// Events accepted since start.
    pub accepted: AtomicU64,
    /// Events the region acknowledged since start.
    pub sent: AtomicU64,
    /// Group commits (syncs) since start.
    pub syncs: AtomicU64,
    /// A write failed: the outbox accepts nothing more (health checks fail; restart).
    pub failed: std::sync::atomic::AtomicBool,
}

enum Job {
    /// Store a group of events (a group commit).
    Accept {
        group: Vec<Pending>,
        reply: oneshot::Sender<Result<(), OutboxError>>,
    },
    /// Number a lane's records again from sequence 0 at position `from` (its first record).
    Renumber {
        lane: Lane,
        from: u64,
        reply: oneshot::Sender<Result<(), OutboxError>>,
    },
    /// Plan every record of `refused`'s topic again by `shape` ([`Outbox::reroute`]).
    Reroute {
        refused: Lane,
        shape: TopicShape,
        reply: oneshot::Sender<Result<bool, OutboxError>>,
    },
}

/// The outbox. Cloning shares it.
#[derive(Clone)]
pub struct Outbox {
    tree: sled::Tree,
    db: DurableSled,
    jobs: mpsc::Sender<Job>,
    /// Per lane: woken when records are added.
    wakers: Arc<Mutex<HashMap<Lane, Arc<Notify>>>>,
    /// Lanes that got records, for the drainer to start.
    new_lanes: Arc<Mutex<mpsc::UnboundedSender<Lane>>>,
    counts: Arc<OutboxCounts>,
    bounds: (u64, u64),
    writer: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
    sending: Sending,
    /// Lanes whose first record a split parent refused, until their topic is planned again.
    refused: Refused,
}

/// Lanes whose first record a split parent refused (so none of their records is in the
/// region), until their topic is planned again.
type Refused = Arc<Mutex<std::collections::HashSet<Lane>>>;

/// Per topic: held (shared) by a lane's drainer from sending a record until the region's
/// answer says whether it holds it, and (exclusively) by a reroute.
type Sending = Arc<Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>>;

/// How long a reroute waits for the topic's sends in flight to be answered.
const REROUTE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The group-commit task's view of the outbox (no job sender, so it ends when the last
/// [`Outbox`] is dropped).
struct Writer {
    tree: sled::Tree,
    db: DurableSled,
    counts: Arc<OutboxCounts>,
    bounds: (u64, u64),
    outbox: std::sync::Weak<Mutex<HashMap<Lane, Arc<Notify>>>>,
    new_lanes: Arc<Mutex<mpsc::UnboundedSender<Lane>>>,
    refused: Refused,
}

/// Lanes that have records, from the start and as they appear.
pub type LaneFeed = mpsc::UnboundedReceiver<Lane>;

impl Outbox {
    /// Opens (or creates) the outbox in `dir`, bounded by `max_events` and `max_bytes`.
    /// Returns it and the lanes that need draining (those with records now, then new ones).
    pub fn open(
        dir: &std::path::Path,
        max_events: u64,
        max_bytes: u64,
        limits: Limits,
    ) -> Result<(Self, LaneFeed), OutboxError> {
        ferry_store::create_dir_durably(dir).map_err(store_err)?;
        let db = ferry_store::open_sled(&sled::Config::new().path(dir).flush_every_ms(Some(1000)))
            .map_err(store_err)?;
        let tree = db.open_tree("outbox").map_err(store_err)?;
        let db = DurableSled::new(db, dir);
        // A stop that was not clean (a crash, a power loss) may have left the region holding
        // sequences this outbox no longer knows of; a new identity can never be answered as
        // a duplicate of them. Records already stored keep the identity they were made with,
        // and the lanes' sequences go on from where they are, so their order holds.
        let clean = tree.remove(CLEAN_KEY).map_err(store_err)?.is_some();
        let read_lanes = |tag: &[u8]| -> Result<HashMap<Lane, u64>, OutboxError> {
            let mut lanes = HashMap::new();
            for item in tree.scan_prefix(tag) {
                let (k, v) = item.map_err(store_err)?;
                let lane = lane_of(&k).ok_or_else(|| store_err("malformed lane key"))?;
                lanes.insert(
                    lane,
                    u64_of(&v).ok_or_else(|| store_err("malformed position"))?,
                );
            }
            Ok(lanes)
        };
        let next_seq = read_lanes(b"s")?;
        let (producer, base) = match tree.get(PRODUCER_KEY).map_err(store_err)? {
            Some(v) if clean => (
                u64_of(&v).ok_or_else(|| store_err("malformed producer id"))?,
                read_lanes(b"b")?,
            ),
            earlier => {
                let id: ProducerId = rand::random();
                if earlier.is_some() {
                    tracing::info!(
                        producer = id,
                        "the outbox was not closed cleanly: publishing as a new producer"
                    );
                }
                let mut batch = sled::Batch::default();
                batch.insert(PRODUCER_KEY, &id.to_be_bytes());
                for item in tree.scan_prefix(b"b") {
                    batch.remove(item.map_err(store_err)?.0);
                }
                // The new identity starts each lane at sequence 0 where the lane is now.
                for (lane, position) in &next_seq {
                    batch.insert(lane_prefix(b'b', lane), &position.to_be_bytes());
                }
                tree.apply_batch(batch).map_err(store_err)?;
                (id, next_seq.clone())
            }
        };
        db.sync().map_err(store_err)?;
        let counts = Arc::new(OutboxCounts::default());
        let (lane_tx, lane_rx) = mpsc::unbounded_channel();
        let mut lanes_with_records = std::collections::BTreeSet::new();
        for item in tree.scan_prefix(b"r") {
            let (k, v) = item.map_err(store_err)?;
            let record: StoredRecord = codec::decode("outbox record", &v).map_err(store_err)?;
            counts
                .events
                .fetch_add(u64::from(record.batch.count), Ordering::Relaxed);
            counts.bytes.fetch_add(record.bytes, Ordering::Relaxed);
            if let Some(lane) = lane_of(&k) {
                lanes_with_records.insert(lane);
            }
        }
        let mut wakers = HashMap::new();
        for lane in lanes_with_records {
            wakers.insert(lane.clone(), Arc::new(Notify::new()));
            let _ = lane_tx.send(lane);
        }
        let mut sequencer = Sequencer::new(producer, next_seq, base);
        for item in tree.scan_prefix(b"t") {
            let (k, v) = item.map_err(store_err)?;
            let topic = String::from_utf8_lossy(&k[1..]).into_owned();
            let shape = TopicShape::decode(&v).ok_or_else(|| store_err("malformed topic shape"))?;
            sequencer.set_shape(&topic, shape);
        }
        let (jobs, job_rx) = mpsc::channel(1024);
        let outbox = Self {
            tree,
            db,
            jobs,
            wakers: Arc::new(Mutex::new(wakers)),
            new_lanes: Arc::new(Mutex::new(lane_tx)),
            counts,
            bounds: (max_events, max_bytes),
            writer: Arc::default(),
            sending: Arc::default(),
            refused: Arc::default(),
        };
        let writer = Writer {
            tree: outbox.tree.clone(),
            db: outbox.db.clone(),
            counts: outbox.counts.clone(),
            bounds: outbox.bounds,
            outbox: Arc::downgrade(&outbox.wakers),
            new_lanes: outbox.new_lanes.clone(),
            refused: outbox.refused.clone(),
        };
        let task = tokio::spawn(writer.write_groups(sequencer, limits, job_rx));
        *outbox.writer.lock().expect("outbox writer") = Some(task);
        Ok((outbox, lane_rx))
    }

    /// The counters.
    pub fn counts(&self) -> &OutboxCounts {
        &self.counts
    }

    /// Events held now.
    pub fn depth(&self) -> u64 {
        self.counts.events.load(Ordering::Relaxed)
    }

    /// Accepts events atomically: when this returns Ok they are synced to disk and will reach
    /// the region. On an error they were not made durable; if the failure came after they
    /// were written they may still reach the region (the outbox then stops accepting).
    pub async fn accept(&self, group: Vec<Pending>) -> Result<(), OutboxError> {
        if group.is_empty() {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Accept { group, reply })
            .await
            .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Numbers every record of `lane` again, under the current producer identity, with
    /// sequence 0 at position `from` (the lane's first record), durably: for a region
    /// partition that no longer knows the producer the records were numbered for (it expired
    /// after being idle) and so holds none of them.
    pub async fn renumber(&self, lane: &Lane, from: u64) -> Result<(), OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Renumber {
                lane: lane.clone(),
                from,
                reply,
            })
            .await
            .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Plans every record the lanes of `refused`'s topic hold again by `shape` (the topic
    /// grew; a split parent refused `refused`'s first record), in their order, once no lane
    /// of the topic has a send in flight. Refused, changing nothing, if one is still in
    /// flight after a while, or while another lane holds records of an earlier process (see
    /// the module's doc). Answers false, changing nothing, if the records are planned by
    /// `shape` already (another lane's reroute did it, or the node described has not seen the
    /// growth yet: send again a little later).
    pub async fn reroute(&self, refused: &Lane, shape: TopicShape) -> Result<bool, OutboxError> {
        let topic = &refused.topic;
        self.refused
            .lock()
            .expect("outbox refused lanes")
            .insert(refused.clone());
        // Taken here, not by the writer, so accepts go on while sends are answered.
        let lock = self.sending(topic);
        let Ok(_quiet) = tokio::time::timeout(REROUTE_WAIT, lock.write()).await else {
            return Err(OutboxError::Invalid(format!(
                "topic {topic}: a send is still in flight after {REROUTE_WAIT:?}"
            )));
        };
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Reroute {
                refused: refused.clone(),
                shape,
                reply,
            })
            .await
            .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// The lock a lane's drainer holds shared from sending a record of `topic` until the
    /// region's answer says whether it holds it (see [`Outbox::reroute`]).
    pub fn sending(&self, topic: &str) -> Arc<tokio::sync::RwLock<()>> {
        sending_lock(&self.sending, topic)
    }

    /// The notifier of a lane (woken when records are added to it).
    pub fn waker(&self, lane: &Lane) -> Arc<Notify> {
        self.wakers
            .lock()
            .expect("outbox wakers")
            .entry(lane.clone())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    /// The first `limit` records of a lane, in order.
    pub fn peek(&self, lane: &Lane, limit: usize) -> Result<Vec<Outgoing>, OutboxError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(lane_prefix(b'r', lane)).take(limit) {
            let (k, v) = item.map_err(store_err)?;
            let record: StoredRecord = codec::decode("outbox record", &v).map_err(store_err)?;
            out.push(Outgoing {
                lane: lane.clone(),
                batch: record.batch,
                bytes: record.bytes,
                accepted_at_ms: record.accepted_at_ms,
                key: k.to_vec(),
            });
        }
        Ok(out)
    }

    /// Forgets a record the region acknowledged. Not synced: after a crash it is sent again
    /// and the region answers it as a duplicate.
    pub fn acknowledged(&self, record: &Outgoing) -> Result<(), OutboxError> {
        if self.tree.remove(&record.key).map_err(store_err)?.is_some() {
            let count = u64::from(record.batch.count);
            self.counts.events.fetch_sub(count, Ordering::Relaxed);
            self.counts.bytes.fetch_sub(record.bytes, Ordering::Relaxed);
            self.counts.sent.fetch_add(count, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A topic's shape as last learned from the region (kept across restarts, so publishes
    /// are accepted while the region is unreachable).
    pub fn known_shape(&self, topic: &str) -> Option<TopicShape> {
        // Before topics could grow, the count learned was kept where the planned shape is.
        let value = match self.tree.get(learned_key(topic)).ok()? {
            Some(v) => v,
            None => self.tree.get(planned_key(topic)).ok()??,
        };
        TopicShape::decode(&value)
    }

    /// Remembers a topic's shape.
    pub fn learn_shape(&self, topic: &str, shape: TopicShape) -> Result<(), OutboxError> {
        self.tree
            .insert(learned_key(topic), &shape.encode())
            .map_err(store_err)?;
        Ok(())
    }

    /// Writes what is pending to disk and marks the outbox closed cleanly, so the next open
    /// keeps the producer identity (at shutdown, once nothing else writes).
    pub async fn close_cleanly(&self) -> Result<(), OutboxError> {
        // After a failed write the outbox may have lost records the region holds: the next
        // start must take a new identity, so no clean mark.
        if self.counts.failed.load(Ordering::Relaxed) || self.db.failure().is_some() {
            return Err(OutboxError::Store(
                "not marked closed cleanly: an earlier write failed".into(),
            ));
        }
        self.tree.insert(CLEAN_KEY, &[1]).map_err(store_err)?;
        self.db.sync_async().await.map_err(store_err)
    }
}

impl Writer {
    fn full(&self, events: u64, bytes: u64) -> Option<OutboxError> {
        let held_events = self.counts.events.load(Ordering::Relaxed);
        let held_bytes = self.counts.bytes.load(Ordering::Relaxed);
        let (max_events, max_bytes) = self.bounds;
        (held_events + events > max_events || held_bytes + bytes > max_bytes).then_some(
            OutboxError::Full {
                events: held_events,
                bytes: held_bytes,
                max_events,
                max_bytes,
            },
        )
    }

    /// Takes every job queued, stores their records in one sled batch, syncs once and
    /// answers them all. Ends when every [`Outbox`] is gone.
    async fn write_groups(
        self,
        mut sequencer: Sequencer,
        limits: Limits,
        mut rx: mpsc::Receiver<Job>,
    ) {
        while let Some(first) = rx.recv().await {
            let mut jobs = Vec::new();
            let mut renumbers = Vec::new();
            let mut reroutes = Vec::new();
            let mut queued_events = 0;
            let mut next = Some(first);
            while let Some(job) = next.take() {
                match job {
                    Job::Accept { group, reply } => {
                        queued_events += group.len();
                        jobs.push((group, reply));
                    }
                    Job::Renumber { lane, from, reply } => renumbers.push((lane, from, reply)),
                    Job::Reroute {
                        refused,
                        shape,
                        reply,
                    } => reroutes.push((refused, shape, reply)),
                }
                if queued_events < 4 * MAX_RECORD_EVENTS {
                    next = rx.try_recv().ok();
                }
            }
            // Renumbering rewrites every record the lane holds and moves its base, so records
            // accepted before or after it are numbered alike.
            for (lane, from, reply) in renumbers {
                let result = self.renumber(&mut sequencer, &lane, from).await;
                // A refused start changed nothing; a failed write or sync is final.
                let failed = matches!(result, Err(OutboxError::Store(_)));
                if let (true, Err(e)) = (failed, &result) {
                    tracing::error!(%lane, error = %e, "renumbering an outbox lane failed; the outbox stops accepting");
                    self.counts.failed.store(true, Ordering::Relaxed);
                }
                let _ = reply.send(result);
                if failed {
                    return;
                }
            }
            for (refused, shape, reply) in reroutes {
                let result = self.reroute(&mut sequencer, &refused, shape, &limits).await;
                let failed = matches!(result, Err(OutboxError::Store(_)));
                if let (true, Err(e)) = (failed, &result) {
                    tracing::error!(lane = %refused, error = %e, "planning an outbox topic again failed; the outbox stops accepting");
                    self.counts.failed.store(true, Ordering::Relaxed);
                }
                let _ = reply.send(result);
                if failed {
                    return;
                }
            }
            let mut batch = sled::Batch::default();
            let mut accepted = Vec::new();
            let (mut group_events, mut group_bytes) = (0u64, 0u64);
            let mut touched = std::collections::BTreeSet::new();
            let now = crate::now_ms();
            for (group, reply) in jobs {
                let events = group.len() as u64;
                let bytes: u64 = group.iter().map(|p| p.event.size() as u64).sum();
                if let Some(full) = self.full(group_events + events, group_bytes + bytes) {
                    let _ = reply.send(Err(full));
                    continue;
                }
                let new_topics: Vec<String> = group
                    .iter()
                    .filter(|p| sequencer.shape(&p.topic).is_none())
                    .map(|p| p.topic.clone())
                    .collect();
                // Planned per job, so one job's invalid event refuses that job alone.
                let (records, advance) = match sequencer.plan(group, &limits) {
                    Ok(planned) => planned,
                    Err(reason) => {
                        let _ = reply.send(Err(OutboxError::Invalid(reason)));
                        continue;
                    }
                };
                let encoded: Result<Vec<_>, _> = records
                    .into_iter()
                    .map(|record| {
                        let key = record_key(&record.lane, record.position);
                        let stored = StoredRecord {
                            bytes: record.bytes,
                            accepted_at_ms: now,
                            batch: record.batch,
                        };
                        codec::encode("outbox record", &stored).map(|v| (key, v, record.lane))
                    })
                    .collect();
                let encoded = match encoded {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = reply.send(Err(OutboxError::Invalid(e.to_string())));
                        continue;
                    }
                };
                sequencer.commit(advance);
                for topic in new_topics {
                    if let Some(shape) = sequencer.shape(&topic) {
                        batch.insert(planned_key(&topic), &shape.encode());
                    }
                }
                for (key, value, lane) in encoded {
                    batch.insert(key, value);
                    touched.insert(lane);
                }
                group_events += events;
                group_bytes += bytes;
                accepted.push(reply);
            }
            if accepted.is_empty() {
                continue;
            }
            for lane in &touched {
                batch.insert(
                    lane_prefix(b's', lane),
                    &sequencer.next_seq(lane).to_be_bytes(),
                );
            }
            let result = match self.tree.apply_batch(batch) {
                Ok(()) => self.db.sync_async().await.map_err(store_err),
                Err(e) => Err(store_err(e)),
            };
            if let Err(e) = &result {
                // The sequencer moved past sequences that may not be stored: a later record
                // would then be refused as out of order. Stop accepting; a restart recovers.
                tracing::error!(error = %e, "outbox write failed; the outbox stops accepting");
                self.counts.failed.store(true, Ordering::Relaxed);
                for reply in accepted {
                    let _ = reply.send(Err(e.clone()));
                }
                return;
            }
            self.counts
                .events
                .fetch_add(group_events, Ordering::Relaxed);
            self.counts.bytes.fetch_add(group_bytes, Ordering::Relaxed);
            self.counts
                .accepted
                .fetch_add(group_events, Ordering::Relaxed);
            self.counts.syncs.fetch_add(1, Ordering::Relaxed);
            for reply in accepted {
                let _ = reply.send(Ok(()));
            }
            for lane in touched {
                self.wake(lane);
            }
        }
    }

    /// See [`Outbox::renumber`].
    async fn renumber(
        &self,
        sequencer: &mut Sequencer,
        lane: &Lane,
        from: u64,
    ) -> Result<(), OutboxError> {
        let mut batch = sled::Batch::default();
        for item in self.tree.scan_prefix(lane_prefix(b'r', lane)) {
            let (key, value) = item.map_err(store_err)?;
            let position = position_of(&key).ok_or_else(|| store_err("malformed record key"))?;
            let Some(seq) = position.checked_sub(from) else {
                return Err(OutboxError::Invalid(format!(
                    "lane {lane}: its record at position {position} is before the renumbering start {from}"
                )));
            };
            let mut record: StoredRecord =
                codec::decode("outbox record", &value).map_err(store_err)?;
            record.batch.producer = Some(sequencer.producer());
            record.batch.first_seq = seq;
            batch.insert(
                key,
                codec::encode("outbox record", &record).map_err(store_err)?,
            );
        }
        batch.insert(lane_prefix(b'b', lane), &from.to_be_bytes());
        self.tree.apply_batch(batch).map_err(store_err)?;
        self.db.sync_async().await.map_err(store_err)?;
        sequencer.rebase(lane.clone(), from);
        tracing::info!(%lane, from, "outbox lane numbered again from sequence 0 (the region no longer knew its producer)");
        Ok(())
    }

    /// See [`Outbox::reroute`] (which holds the topic's sending lock meanwhile).
    async fn reroute(
        &self,
        sequencer: &mut Sequencer,
        refused: &Lane,
        shape: TopicShape,
        limits: &Limits,
    ) -> Result<bool, OutboxError> {
        let topic = refused.topic.as_str();
        if sequencer.shape(topic) == Some(shape) {
            return Ok(false);
        }
        let refused_lanes = self.refused.lock().expect("outbox refused lanes").clone();
        let mut prefix = vec![b'r'];
        prefix.extend_from_slice(topic.as_bytes());
        prefix.push(0);
        let mut batch = sled::Batch::default();
        let mut group = Vec::new();
        let mut firsts: BTreeMap<Lane, u64> = BTreeMap::new();
        let (mut old_events, mut old_bytes) = (0u64, 0u64);
        // Lane by lane (the key order: partition, then position), each in its order: a key's
        // records all lie in the one lane it was planned to.
        for item in self.tree.scan_prefix(&prefix) {
            let (key, value) = item.map_err(store_err)?;
            let lane = lane_of(&key).ok_or_else(|| store_err("malformed lane key"))?;
            let position = position_of(&key).ok_or_else(|| store_err("malformed record key"))?;
            let record: StoredRecord = codec::decode("outbox record", &value).map_err(store_err)?;
            if !refused_lanes.contains(&lane) && record.batch.producer != Some(sequencer.producer())
            {
                return Err(OutboxError::Invalid(format!(
                    "lane {lane} holds records from before a stop that was not clean (the \
                     region may hold them); they are sent first"
                )));
            }
            let events = record
                .batch
                .decode_events(limits)
                .map_err(|e| store_err(format!("lane {lane}: {e}")))?;
            firsts.entry(lane).or_insert(position);
            old_events += u64::from(record.batch.count);
            old_bytes += record.bytes;
            batch.remove(key);
            group.extend(events.into_iter().map(|event| Pending {
                topic: topic.to_string(),
                shape,
                event,
            }));
        }
        sequencer.set_shape(topic, shape);
        batch.insert(planned_key(topic), &shape.encode());
        // None of them is in the region: each lane goes on from its first one's place (or,
        // for records of an earlier process, from where this producer's sequence 0 is).
        for (lane, first) in &firsts {
            let base = sequencer.base(lane);
            sequencer.rewind(lane.clone(), (*first).max(base));
        }
        let (records, advance) = sequencer
            .plan(group, limits)
            .map_err(|e| store_err(format!("planning topic {topic} again: {e}")))?;
        let now = crate::now_ms();
        let mut touched: std::collections::BTreeSet<Lane> = firsts.keys().cloned().collect();
        let (mut new_events, mut new_bytes) = (0u64, 0u64);
        for record in records {
            new_events += u64::from(record.batch.count);
            new_bytes += record.bytes;
            let stored = StoredRecord {
                bytes: record.bytes,
                accepted_at_ms: now,
                batch: record.batch,
            };
            batch.insert(
                record_key(&record.lane, record.position),
                codec::encode("outbox record", &stored).map_err(store_err)?,
            );
            touched.insert(record.lane);
        }
        sequencer.commit(advance);
        for lane in &touched {
            batch.insert(
                lane_prefix(b's', lane),
                &sequencer.next_seq(lane).to_be_bytes(),
            );
        }
        self.tree.apply_batch(batch).map_err(store_err)?;
        self.db.sync_async().await.map_err(store_err)?;
        self.counts.events.fetch_sub(old_events, Ordering::Relaxed);
        self.counts.bytes.fetch_sub(old_bytes, Ordering::Relaxed);
        self.counts.events.fetch_add(new_events, Ordering::Relaxed);
        self.counts.bytes.fetch_add(new_bytes, Ordering::Relaxed);
        tracing::info!(%topic, partitions = shape.partitions, events = new_events, "outbox records planned again: the topic grew");
        self.refused
            .lock()
            .expect("outbox refused lanes")
            .retain(|l| l.topic != topic);
        for lane in touched {
            self.wake(lane);
        }
        Ok(true)
    }

    fn wake(&self, lane: Lane) {
        let Some(wakers) = self.outbox.upgrade() else {
            return;
        };
        let mut wakers = wakers.lock().expect("outbox wakers");
        match wakers.get(&lane) {
            Some(n) => n.notify_one(),
            None => {
                wakers.insert(lane.clone(), Arc::new(Notify::new()));
                let _ = self.new_lanes.lock().expect("outbox lanes").send(lane);
            }
        }
    }
}

/// Waits until the outbox's writer has ended, which it does once this and every other
/// clone of the outbox are dropped (the store is then closed).
pub async fn close(outbox: Outbox) {
    let writer = outbox.writer.lock().expect("outbox writer").take();
    drop(outbox);
    if let Some(writer) = writer {
        let _ = writer.await;
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use ferry_proto::Subject;

    use super::*;

    fn pending(topic: &str, id: u32, key: Option<&str>) -> Pending {
        let mut event = Event::new(
            format!("e{id}"),
            "/app",
            "t",
            Subject::new(topic).unwrap(),
            vec![1u8; 10],
        );
        event.key = key.map(|k| Bytes::copy_from_slice(k.as_bytes()));
        Pending {
            topic: topic.into(),
            shape: TopicShape::new(4),
            event,
        }
    }

    /// Plans a group and commits it, as the writer does once the records are stored.
    /// The tests' outbox in `dir` (100 events, 1 MiB).
    fn open(dir: &std::path::Path) -> (Outbox, LaneFeed) {
        Outbox::open(dir, 100, 1 << 20, Limits::default()).unwrap()
    }

    /// Accepts event `id` of topic `t` under key `a` (one lane).
    async fn accept_keyed(outbox: &Outbox, id: u32) {
        outbox
            .accept(vec![pending("t", id, Some("a"))])
            .await
            .unwrap();
    }

    fn planned(s: &mut Sequencer, group: Vec<Pending>) -> Vec<Record> {
        let (records, advance) = s.plan(group, &Limits::default()).unwrap();
        s.commit(advance);
        records
    }

    #[test]
    fn keyed_events_follow_the_hash_and_keyless_ones_share_a_lane_per_group() {
        let mut s = Sequencer::new(7, HashMap::new(), HashMap::new());
        let limits = Limits::default();
        let group = vec![
            pending("orders", 1, None),
            pending("orders", 2, Some("customer-1")),
            pending("orders", 3, None),
            pending("orders", 4, Some("customer-1")),
        ];
        let records = planned(&mut s, group);
        let keyed = TopicShape::new(4).partition_for_key(b"customer-1");
        let keyed_record = records.iter().find(|r| r.lane.partition == keyed).unwrap();
        let ids: Vec<String> = keyed_record
            .batch
            .decode_events(&limits)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert!(
            ids.ends_with(&["e2".to_string(), "e4".to_string()]),
            "{ids:?}"
        );
        assert!(records.iter().all(|r| r.batch.producer == Some(7)));
        assert_eq!(records.iter().map(|r| r.batch.count).sum::<u32>(), 4);
        // Sequences continue per lane; keyless events stay on their partition for
        // STICKY_EVENTS events, then the next partition takes over.
        let first_keyless = records
            .iter()
            .find(|r| r.lane.partition != keyed)
            .map(|r| r.lane.partition);
        let next = planned(&mut s, vec![pending("orders", 5, None)]);
        assert_eq!(Some(next[0].lane.partition), first_keyless);
        let many: Vec<_> = (0..STICKY_EVENTS)
            .map(|i| pending("orders", 10 + i as u32, None))
            .collect();
        planned(&mut s, many);
        let moved = planned(&mut s, vec![pending("orders", 9, None)]);
        assert_ne!(Some(moved[0].lane.partition), first_keyless);
        let again = planned(&mut s, vec![pending("orders", 6, Some("customer-1"))]);
        assert_eq!(
            again[0].batch.first_seq,
            keyed_record.batch.first_seq + u64::from(keyed_record.batch.count)
        );
    }

    #[test]
    fn large_groups_are_cut_into_bounded_records_and_invalid_events_change_nothing() {
        let mut s = Sequencer::new(1, HashMap::new(), HashMap::new());
        let limits = Limits::default();
        let group: Vec<_> = (0..1200).map(|i| pending("t", i, Some("k"))).collect();
        let records = planned(&mut s, group);
        assert_eq!(records.len(), 3);
        assert_eq!(records[1].batch.first_seq, MAX_RECORD_EVENTS as u64);
        let lane = records[0].lane.clone();
        let mut bad = pending("t", 9, Some("k"));
        bad.event.ty.clear();
        assert!(s.plan(vec![bad], &limits).unwrap_err().contains("type"));
        assert_eq!(s.next_seq(&lane), 1200);
        // Planned but not stored (not committed): the sequences do not move.
        let (uncommitted, _) = s.plan(vec![pending("t", 10, Some("k"))], &limits).unwrap();
        assert_eq!(uncommitted[0].batch.first_seq, 1200);
        assert_eq!(s.next_seq(&lane), 1200);
    }

    #[tokio::test]
    async fn accepted_records_survive_a_reopen_with_the_same_producer_and_sequences() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, mut lanes) = open(dir.path());
        outbox
            .accept(vec![pending("t", 1, Some("a")), pending("t", 2, Some("a"))])
            .await
            .unwrap();
        let lane = lanes.recv().await.unwrap();
        let records = outbox.peek(&lane, 10).unwrap();
        assert_eq!(records.len(), 1);
        let producer = records[0].batch.producer;
        // Over the bound: refused, nothing stored.
        let too_many: Vec<_> = (0..99).map(|i| pending("t", i, Some("a"))).collect();
        assert!(matches!(
            outbox.accept(too_many).await,
            Err(OutboxError::Full { events: 2, .. })
        ));
        drop(lanes);
        outbox.close_cleanly().await.unwrap();
        close(outbox).await;

        let (outbox, mut lanes) = open(dir.path());
        assert_eq!(lanes.recv().await.unwrap(), lane);
        assert_eq!(outbox.depth(), 2);
        let again = outbox.peek(&lane, 10).unwrap();
        assert_eq!(again[0].batch, records[0].batch, "resent exactly as stored");
        outbox.acknowledged(&again[0]).unwrap();
        assert_eq!(outbox.depth(), 0);
        accept_keyed(&outbox, 3).await;
        let next = outbox.peek(&lane, 10).unwrap();
        assert_eq!(next[0].batch.producer, producer);
        assert_eq!(next[0].batch.first_seq, 2);
    }

    #[tokio::test]
    async fn a_grown_topics_records_are_planned_again_by_its_new_shape_keeping_each_keys_order() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, _lanes) = open(dir.path());
        let two = TopicShape::new(2);
        let grown = TopicShape {
            partitions: 4,
            initial: 2,
        };
        let keyed = |id: u32, shape: TopicShape| {
            let mut p = pending("t", id, Some(&format!("k{}", id % 8)));
            p.shape = shape;
            p
        };
        for round in 0..5 {
            let group = (0..8).map(|i| keyed(round * 8 + i, two)).collect();
            outbox.accept(group).await.unwrap();
        }
        let lane = |partition| Lane {
            topic: "t".into(),
            partition,
        };
        // The region holds lane 0's first record.
        let first = outbox.peek(&lane(0), 1).unwrap().remove(0);
        outbox.acknowledged(&first).unwrap();
        let held = outbox.depth();
        let next_of_0 = outbox.peek(&lane(0), 1).unwrap()[0].position();

        assert!(outbox.reroute(&lane(0), grown).await.unwrap());
        // Asked again with the shape the records are planned by: nothing to do.
        assert!(!outbox.reroute(&lane(0), grown).await.unwrap());
        assert_eq!(outbox.depth(), held, "every held event stays, once");
        let mut order: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for partition in 0..4 {
            let records = outbox.peek(&lane(partition), 100).unwrap();
            if partition == 0 {
                // Lane 0 goes on where its held records began, from the same sequence.
                assert_eq!(records[0].position(), next_of_0);
                assert_eq!(records[0].batch.first_seq, next_of_0);
            }
            for r in records {
                for e in r.batch.decode_events(&Limits::default()).unwrap() {
                    let key = String::from_utf8(e.key.clone().unwrap().to_vec()).unwrap();
                    assert_eq!(grown.partition_for_key(key.as_bytes()), partition, "{key}");
                    order
                        .entry(key)
                        .or_default()
                        .push(e.id[1..].parse().unwrap());
                }
            }
        }
        for (key, ids) in &order {
            let mut sorted = ids.clone();
            sorted.sort_unstable();
            assert_eq!(ids, &sorted, "{key} keeps its order");
        }
        assert!(
            (2..4).any(|p| !outbox.peek(&lane(p), 1).unwrap().is_empty()),
            "some keys moved to the new partitions"
        );
        // The new shape is what later events are planned by, also after a reopen, whatever
        // the caller thinks.
        outbox.close_cleanly().await.unwrap();
        close(outbox).await;
        let (outbox, _lanes) = open(dir.path());
        let moved = (0..8)
            .find(|k| grown.partition_for_key(format!("k{k}").as_bytes()) >= 2)
            .unwrap();
        outbox.accept(vec![keyed(moved + 40, two)]).await.unwrap();
        let home = grown.partition_for_key(format!("k{moved}").as_bytes());
        let last = outbox.peek(&lane(home), 100).unwrap().pop().unwrap();
        assert_eq!(
            last.batch.decode_events(&Limits::default()).unwrap()[0].id,
            format!("e{}", moved + 40)
        );
    }

    #[tokio::test]
    async fn renumbering_a_lane_moves_every_held_record_to_the_current_producer_from_0() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, mut lanes) = open(dir.path());
        for id in 1..=3 {
            outbox
                .accept(vec![pending("t", id, Some("a"))])
                .await
                .unwrap();
        }
        let lane = lanes.recv().await.unwrap();
        // The first record was acknowledged, then the sidecar stopped without closing
        // cleanly: it publishes as a new producer, while the records it holds keep the old
        // one. The region then forgot the old producer.
        let held = outbox.peek(&lane, 10).unwrap();
        outbox.acknowledged(&held[0]).unwrap();
        let old = held[0].batch.producer;
        drop(lanes);
        close(outbox).await;
        let (outbox, _lanes) = open(dir.path());
        accept_keyed(&outbox, 9).await;
        let held = outbox.peek(&lane, 10).unwrap();
        let producer = held[2].batch.producer;
        assert_ne!(producer, old, "a new identity after the unclean stop");
        assert_eq!(
            (held[0].batch.producer, held[1].batch.producer),
            (old, old),
            "held records keep theirs"
        );
        outbox.renumber(&lane, held[0].position()).await.unwrap();
        let renumbered = outbox.peek(&lane, 10).unwrap();
        let numbers: Vec<_> = renumbered
            .iter()
            .map(|r| (r.position(), r.batch.producer, r.batch.first_seq))
            .collect();
        assert_eq!(
            numbers,
            vec![(1, producer, 0), (2, producer, 1), (3, producer, 2)]
        );
        assert_eq!(
            renumbered[0].batch.events, held[0].batch.events,
            "events unchanged"
        );
        // Later records follow on, also after a clean reopen.
        outbox.close_cleanly().await.unwrap();
        close(outbox).await;
        let (outbox, _lanes) = open(dir.path());
        accept_keyed(&outbox, 4).await;
        let last = outbox.peek(&lane, 10).unwrap().pop().unwrap();
        assert_eq!((last.position(), last.batch.first_seq), (4, 3));
        assert_eq!(last.batch.producer, producer);
        // A start after the lane's first record is refused and changes nothing.
        assert!(matches!(
            outbox.renumber(&lane, 2).await,
            Err(OutboxError::Invalid(_))
        ));
        accept_keyed(&outbox, 5).await;
        let numbers: Vec<_> = outbox
            .peek(&lane, 10)
            .unwrap()
            .iter()
            .map(|r| r.batch.first_seq)
            .collect();
        assert_eq!(numbers, vec![0, 1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn after_a_stop_that_was_not_clean_new_records_take_a_new_producer_in_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, mut lanes) = open(dir.path());
        outbox
            .accept(vec![pending("t", 1, Some("a")), pending("t", 2, Some("a"))])
            .await
            .unwrap();
        let lane = lanes.recv().await.unwrap();
        let before = outbox.peek(&lane, 10).unwrap();
        drop(lanes);
        // No `close_cleanly`: what a crash or a power loss leaves.
        close(outbox).await;

        let (outbox, _lanes) = open(dir.path());
        accept_keyed(&outbox, 3).await;
        let after = outbox.peek(&lane, 10).unwrap();
        assert_eq!(after.len(), 2);
        assert_eq!(
            after[0].batch, before[0].batch,
            "stored records keep their identity"
        );
        assert_ne!(after[1].batch.producer, before[0].batch.producer);
        assert_eq!(after[1].batch.first_seq, 0, "a new producer starts at 0");
        assert!(after[1].key > after[0].key, "the lane's order is kept");
        // And it keeps its identity and sequences across a clean reopen.
        outbox.close_cleanly().await.unwrap();
        close(outbox).await;
        let (outbox, _lanes) = open(dir.path());
        accept_keyed(&outbox, 4).await;
        let last = outbox.peek(&lane, 10).unwrap().pop().unwrap();
        assert_eq!(last.batch.producer, after[1].batch.producer);
        assert_eq!(last.batch.first_seq, 1);
    }
}
