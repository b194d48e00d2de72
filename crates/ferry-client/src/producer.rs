//! The idempotent, pipelined producer.
//!
//! Each partition has a lane: a task that gathers queued events into batches, numbers them
//! with the producer's sequence for that partition, and writes them one after another on one
//! produce stream to the partition's leader. The node submits them to Raft in that order and
//! answers in that order. On any failure (leader change, lost connection) the lane finds the
//! new leader and resends every unacknowledged batch, unchanged and in order: the partition
//! recognises batches it already has by (producer id, sequence), so nothing is duplicated and
//! per-key order holds. A partition that no longer knows the producer (it expired after
//! being idle: `producer_expiry_ms` on the nodes) answers `UnknownProducer`; the lane then
//! numbers its unacknowledged batches again from 0, as a new producer id, and resends them.
//!
//! Keys go to partitions by the topic's [`KeyLayout`]. When the topic grows, a split parent
//! refuses keys it gave to a child (`WrongPartition`); the lane that hears it takes back its
//! unacknowledged events, and the producer stops taking new ones, describes the topic again,
//! has every lane hand back what it has not sent (after its batches in flight are answered),
//! and routes those events again by the new layout, in their order, before any new one: a
//! key's events reach its new partition only after all of its earlier ones were answered.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use ferry_net::framing::{read_frame, write_frame};
use ferry_net::NetError;
use ferry_proto::wire::{ApiError, ClientRequest, ClientResponse, ErrorCode, TopicDescription};
use ferry_proto::{Event, EventBatch, KeyLayout, NodeId, ProducerId};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::client::{leader_in, node_addr};
use crate::{Client, ClientError};

/// Upper bound of [`ProducerOptions::max_batches_in_flight`]: half the partition's dedupe window.
pub const MAX_BATCHES_IN_FLIGHT: usize = 32;

/// Producer tuning.
#[derive(Debug, Clone)]
pub struct ProducerOptions {
    /// Most events sent and not yet acknowledged, over all partitions.
    pub max_in_flight: usize,
    /// Most batches sent and not yet acknowledged per partition. While a partition has this
    /// many outstanding, its new events wait and form the next, larger batch; each batch is
    /// one Raft entry, so fewer, larger batches cost the nodes less per event.
    pub max_batches_in_flight: usize,
    /// Batches in flight that go as soon as there are events (1 to
    /// `max_batches_in_flight`), counted over all partitions of the producer: a partition
    /// with nothing in flight always sends at once, and past this many batches in flight in
    /// all a batch goes only once an eighth of `max_batch_events` wait. So a busy producer
    /// keeps batching instead of sending a trickle of tiny ones (each one Raft entry),
    /// however many partitions it writes to.
    pub eager_batches: usize,
    /// Most events in one batch.
    pub max_batch_events: usize,
    /// Most payload bytes in one batch (a larger single event still goes alone).
    pub max_batch_bytes: usize,
    /// How long a lane waits for more events before sending a batch that is not full.
    pub linger: Duration,
    /// How long a batch is retried through failures before its events fail.
    pub retry_for: Duration,
    /// How long a produce stream may stay silent while batches await acknowledgement before
    /// it is presumed dead and the batches are resent elsewhere.
    pub ack_timeout: Duration,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        Self {
            max_in_flight: 1024,
            // Replication is pipelined, so more batches in flight keep every stage busy: at
            // 256 events in flight on one partition, 8 sent eagerly did ~10% more than 2
            // eager and 6 held back for size (A/B in one region, three runs each). With
            // eight partitions the difference was within the noise (±5%), so all go eagerly.
            max_batches_in_flight: 8,
            eager_batches: 8,
            max_batch_events: 256,
            max_batch_bytes: 512 * 1024,
            linger: Duration::ZERO,
            retry_for: Duration::from_secs(30),
            ack_timeout: Duration::from_secs(5),
        }
    }
}

/// Where an event landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishAck {
    /// Partition.
    pub partition: u32,
    /// Offset; `None` when an earlier send appended the event at an offset the partition no
    /// longer remembers (a resend older than its dedupe window of 64 batches).
    pub offset: Option<u64>,
    /// The batch had been appended before (a retry); the offset is the original one.
    pub duplicate: bool,
}

/// Resolves when an event is durable on a majority of its partition's replicas.
pub type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, ClientError>> + Send>>;

type AckSender = oneshot::Sender<Result<PublishAck, ClientError>>;

/// The partition leaders of a producer's topic, described once for all its lanes. A lane
/// that needs a leader takes the newest description unless that is the one that just led it
/// astray; then it describes the topic again while lanes in the same position wait and take
/// its answer. With many partitions, a leader change (or the producer's start) costs one
/// description of the topic, not one per partition.
struct Leaders {
    /// (generation, description): the generation counts descriptions taken.
    newest: tokio::sync::Mutex<(u64, Arc<TopicDescription>)>,
}

impl Leaders {
    /// The leader of `partition`; `used` is the generation this lane last used, and becomes
    /// the one it uses now.
    async fn leader_of(
        &self,
        client: &Client,
        topic: &str,
        partition: u32,
        used: &mut u64,
        deadline: Instant,
    ) -> Result<SocketAddr, ClientError> {
        {
            let mut newest = self.newest.lock().await;
            if newest.0 <= *used {
                if let Ok(fresh) = client.describe_topic(topic).await {
                    *newest = (newest.0 + 1, Arc::new(fresh));
                }
            }
            *used = newest.0;
            if let Some(addr) = leader_in(&newest.1, partition) {
                return Ok(addr);
            }
        }
        // The description names no leader for it (an election under way, or the answering
        // node does not host it): ask until one does.
        client.leader_addr(topic, partition, deadline).await
    }

    /// The client address of node `id` by the newest description.
    async fn addr_of(&self, id: NodeId) -> Option<SocketAddr> {
        node_addr(&self.newest.lock().await.1, id)
    }
}

struct Item {
    event: Event,
    ack: AckSender,
    permit: OwnedSemaphorePermit,
}

/// Asks a lane to hand back, once its batches in flight are answered, every event it has
/// not had appended.
type Flush = oneshot::Sender<Vec<Item>>;

/// A lane as the producer reaches it.
struct LaneHandle {
    items: mpsc::UnboundedSender<Item>,
    flush: mpsc::UnboundedSender<Flush>,
}

/// Where the producer's events go: the topic's key layout and a lane per partition.
struct Routing {
    layout: KeyLayout,
    lanes: Vec<LaneHandle>,
}

impl Routing {
    /// The lane of an event with `key` (round-robin over `next` without one).
    fn lane_of(&self, key: Option<&[u8]>, next: &AtomicUsize) -> usize {
        match key {
            Some(key) => self.layout.partition_for_key(key, self.lanes.len() as u32) as usize,
            None => next.fetch_add(1, Ordering::Relaxed) % self.lanes.len(),
        }
    }
}

/// What the producer and its lanes share.
struct Shared {
    routing: tokio::sync::RwLock<Routing>,
    next_lane: AtomicUsize,
    /// A regrow (see the module's doc) is under way.
    regrowing: AtomicBool,
    /// A lane asked for a regrow since the running one took its description.
    regrow_asked: AtomicBool,
    client: Client,
    leaders: Arc<Leaders>,
    topic: String,
    id: ProducerId,
    options: ProducerOptions,
    producer_in_flight: Arc<AtomicUsize>,
}

impl Shared {
    fn spawn_lane(self: &Arc<Self>, partition: u32) -> LaneHandle {
        let (items, rx) = mpsc::unbounded_channel();
        let (flush, flushes) = mpsc::unbounded_channel();
        let lane = Lane {
            client: self.client.clone(),
            leaders: self.leaders.clone(),
            leaders_used: 0,
            topic: self.topic.clone(),
            partition,
            producer: self.id,
            next_seq: 0,
            options: self.options.clone(),
            rx,
            unacked: VecDeque::new(),
            producer_in_flight: self.producer_in_flight.clone(),
            counted: 0,
            stream: None,
            failing_since: None,
            failures: 0,
            refused: None,
            shared: Arc::downgrade(self),
            flushes,
            flushing: None,
            taken_back: Vec::new(),
            parked: false,
            leader_hint: None,
            hint_followed: false,
        };
        tokio::spawn(lane.run());
        LaneHandle { items, flush }
    }

    /// Starts a regrow unless one is under way; one under way runs again once done, so a
    /// lane parked meanwhile is collected too.
    fn regrow(self: Arc<Self>) {
        self.regrow_asked.store(true, Ordering::Release);
        if self.regrowing.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(async move {
            loop {
                self.regrow_asked.store(false, Ordering::Release);
                self.regrow_now().await;
                self.regrowing.store(false, Ordering::Release);
                // Asked again after the description was taken: go once more, unless another
                // task took over meanwhile.
                if !self.regrow_asked.load(Ordering::Acquire)
                    || self.regrowing.swap(true, Ordering::AcqRel)
                {
                    return;
                }
            }
        });
    }

    /// Takes the topic's layout again: holds new events back, collects what every lane has
    /// not had appended, and routes it again by the new layout, in order.
    async fn regrow_now(self: &Arc<Self>) {
        let mut routing = self.routing.write().await;
        let deadline = Instant::now() + self.options.retry_for;
        let described = loop {
            match self.client.describe_topic(&self.topic).await {
                // A node that has not seen the growth yet describes fewer partitions: ask
                // again, a little later. The same layout is taken (a batch checked before the
                // split reached the group after it), after a pause in case the node answering
                // lags.
                Ok(d)
                    if d.config.partitions as usize >= routing.lanes.len()
                        && d.layout.splits.len() >= routing.layout.splits.len() =>
                {
                    if d.layout == routing.layout {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    break Some(d);
                }
                Ok(_) | Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(_) => {
                    tracing::warn!(topic = %self.topic, "the topic's description stayed older than the producer's layout; keeping the layout");
                    break None;
                }
                Err(e) => {
                    tracing::warn!(topic = %self.topic, error = %e, "describing the topic to route again failed; keeping the layout");
                    break None;
                }
            }
        };
        let mut handed = Vec::with_capacity(routing.lanes.len());
        for lane in &routing.lanes {
            let (tx, rx) = oneshot::channel();
            if lane.flush.send(tx).is_ok() {
                handed.push(rx);
            }
        }
        let mut back = Vec::new();
        for rx in handed {
            back.extend(rx.await.unwrap_or_default());
        }
        if let Some(d) = described {
            let partitions = d.config.partitions;
            for partition in routing.lanes.len() as u32..partitions {
                let lane = self.spawn_lane(partition);
                routing.lanes.push(lane);
            }
            tracing::info!(topic = %self.topic, partitions, events = back.len(), "routing by the topic's new key layout");
            routing.layout = d.layout.clone();
            let mut newest = self.leaders.newest.lock().await;
            *newest = (newest.0 + 1, Arc::new(d));
        }
        for item in back {
            let lane = routing.lane_of(item.event.key.as_deref(), &self.next_lane);
            if let Err(mpsc::error::SendError(item)) = routing.lanes[lane].items.send(item) {
                let _ = item
                    .ack
                    .send(Err(ClientError::Closed("producer lane".into())));
            }
        }
    }
}

/// Publishes events to one topic. Dropping it lets queued events finish (but events a split
/// parent refuses after the drop fail rather than go to their new partition).
pub struct Producer {
    shared: Arc<Shared>,
    window: Arc<Semaphore>,
    client: Client,
    id: ProducerId,
}

impl Producer {
    pub(crate) fn new(
        client: Client,
        description: TopicDescription,
        options: ProducerOptions,
    ) -> Self {
        let id: ProducerId = rand::random();
        let mut options = options;
        // Resent batches must stay within the partition's dedupe window (64 batches).
        options.max_batches_in_flight = options
            .max_batches_in_flight
            .clamp(1, MAX_BATCHES_IN_FLIGHT);
        options.eager_batches = options
            .eager_batches
            .clamp(1, options.max_batches_in_flight);
        let partitions = description.config.partitions;
        let layout = description.layout.clone();
        let topic = description.config.name.clone();
        let leaders = Arc::new(Leaders {
            newest: tokio::sync::Mutex::new((1, Arc::new(description))),
        });
        let shared = Arc::new(Shared {
            routing: tokio::sync::RwLock::new(Routing {
                layout,
                lanes: Vec::new(),
            }),
            next_lane: AtomicUsize::new(0),
            regrowing: AtomicBool::new(false),
            regrow_asked: AtomicBool::new(false),
            client: client.clone(),
            leaders,
            topic,
            id,
            options: options.clone(),
            producer_in_flight: Arc::new(AtomicUsize::new(0)),
        });
        let lanes = (0..partitions).map(|p| shared.spawn_lane(p)).collect();
        if let Ok(mut routing) = shared.routing.try_write() {
            routing.lanes = lanes;
        }
        Self {
            shared,
            window: Arc::new(Semaphore::new(options.max_in_flight.max(1))),
            client,
            id,
        }
    }

    /// This producer's id (a partition that gave up on batches continues under a new one).
    pub fn id(&self) -> ProducerId {
        self.id
    }

    /// Queues an event once the in-flight window has room; the returned future resolves with
    /// its acknowledgement. Events with a key go to the partition the topic's [`KeyLayout`]
    /// maps it to, others round-robin.
    pub async fn send(&self, event: Event) -> Result<AckFuture, ClientError> {
        event.validate(self.client.limits())?;
        let permit = self
            .window
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ClientError::Closed("producer".into()))?;
        let (ack, rx) = oneshot::channel();
        {
            let routing = self.shared.routing.read().await;
            let lane = routing.lane_of(event.key.as_deref(), &self.shared.next_lane);
            routing.lanes[lane]
                .items
                .send(Item { event, ack, permit })
                .map_err(|_| ClientError::Closed("producer lane".into()))?;
        }
        Ok(Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(ClientError::Closed("producer lane".into())))
        }))
    }

    /// Publishes one event and waits for its acknowledgement.
    pub async fn publish(&self, event: Event) -> Result<PublishAck, ClientError> {
        self.send(event).await?.await
    }
}

struct InFlight {
    batch: EventBatch,
    frame: Bytes,
    acks: Vec<(AckSender, OwnedSemaphorePermit)>,
}

struct LaneStream {
    /// The node it goes to.
    addr: SocketAddr,
    send: quinn::SendStream,
    responses: mpsc::UnboundedReceiver<Result<ClientResponse, ClientError>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for LaneStream {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

struct Lane {
    client: Client,
    leaders: Arc<Leaders>,
    /// The generation of the leaders' description this lane last used.
    leaders_used: u64,
    topic: String,
    partition: u32,
    producer: ProducerId,
    next_seq: u64,
    options: ProducerOptions,
    rx: mpsc::UnboundedReceiver<Item>,
    unacked: VecDeque<InFlight>,
    /// Batches in flight over every lane of the producer, and this lane's share of it.
    producer_in_flight: Arc<AtomicUsize>,
    counted: usize,
    stream: Option<LaneStream>,
    failing_since: Option<Instant>,
    failures: u32,
    /// The partition's last refusal while its uploads to the object store are behind
    /// (`OffloadBehind`): what the events fail with if it lasts past `retry_for`.
    refused: Option<ApiError>,
    shared: Weak<Shared>,
    flushes: mpsc::UnboundedReceiver<Flush>,
    /// A regrow waits for this lane's unappended events.
    flushing: Option<Flush>,
    /// Events taken back from batches a split parent refused, in order.
    taken_back: Vec<Item>,
    /// Sends nothing until the regrow it asked for collects `taken_back`.
    parked: bool,
    /// The leader named by the node that last refused a batch for not leading: the next
    /// recovery goes there without describing the topic again (leaders change in bulk when
    /// a node dies or the region rebalances, and a description of a topic with many
    /// partitions asks every node).
    leader_hint: Option<NodeId>,
    /// The stream was opened on a hint: if that node refuses too, the topic is described
    /// (two nodes whose views are both stale must not send the lane back and forth).
    hint_followed: bool,
}

async fn next_response(
    stream: &mut Option<LaneStream>,
) -> Option<Result<ClientResponse, ClientError>> {
    match stream {
        Some(s) => s.responses.recv().await,
        None => std::future::pending().await,
    }
}

fn retriable(e: &ApiError) -> bool {
    e.is_retriable() || e.code == ErrorCode::OutOfOrderSequence
}

impl Lane {
    async fn run(mut self) {
        let mut closed = false;
        let mut flushes_closed = false;
        loop {
            self.count_in_flight();
            if self.unacked.is_empty() {
                if let Some(flush) = self.flushing.take() {
                    while let Ok(item) = self.rx.try_recv() {
                        self.taken_back.push(item);
                    }
                    self.parked = false;
                    let _ = flush.send(std::mem::take(&mut self.taken_back));
                    continue;
                }
            }
            if closed && self.unacked.is_empty() && !self.parked {
                return;
            }
            tokio::select! {
                flush = self.flushes.recv(), if !flushes_closed && self.flushing.is_none() => match flush {
                    Some(flush) => self.flushing = Some(flush),
                    None => flushes_closed = true,
                },
                item = self.rx.recv(), if !closed && !self.parked && self.flushing.is_none() && self.may_send() => match item {
                    None => closed = true,
                    Some(first) => {
                        let items = self.gather(first).await;
                        self.dispatch(items).await;
                    }
                },
                response = tokio::time::timeout(self.options.ack_timeout, next_response(&mut self.stream)), if !self.unacked.is_empty() => {
                    let response = response.unwrap_or_else(|_| Some(Err(ClientError::Timeout("acknowledgement".into()))));
                    self.on_response(response).await;
                }
            }
        }
    }

    /// Brings the producer-wide count of batches in flight up to date with this lane's.
    fn count_in_flight(&mut self) {
        let now = self.unacked.len();
        if now > self.counted {
            self.producer_in_flight
                .fetch_add(now - self.counted, Ordering::Relaxed);
        } else {
            self.producer_in_flight
                .fetch_sub(self.counted - now, Ordering::Relaxed);
        }
        self.counted = now;
    }

    /// Whether the lane may send another batch now: always with nothing in flight; while
    /// fewer than `eager_batches` are in flight here and over the whole producer; beyond
    /// that (up to `max_batches_in_flight`) only once enough events wait to fill a sizeable
    /// batch, so a lane that is merely busy keeps batching instead of sending a trickle of
    /// tiny ones (each costs the nodes a Raft entry).
    fn may_send(&self) -> bool {
        let in_flight = self.unacked.len();
        let eager = self.options.eager_batches;
        in_flight < self.options.max_batches_in_flight
            && (in_flight == 0
                || (in_flight < eager && self.producer_in_flight.load(Ordering::Relaxed) < eager)
                || self.rx.len() >= (self.options.max_batch_events / 8).max(1))
    }

    async fn gather(&mut self, first: Item) -> Vec<Item> {
        let mut bytes = first.event.size();
        let mut items = vec![first];
        let deadline = Instant::now() + self.options.linger;
        while items.len() < self.options.max_batch_events && bytes < self.options.max_batch_bytes {
            let next = match self.rx.try_recv() {
                Ok(item) => Some(item),
                Err(_) if self.options.linger.is_zero() => None,
                Err(_) => tokio::time::timeout_at(deadline, self.rx.recv())
                    .await
                    .ok()
                    .flatten(),
            };
            let Some(item) = next else { break };
            bytes += item.event.size();
            items.push(item);
        }
        items
    }

    fn build(&self, events: &[Event], first_seq: u64) -> Result<(EventBatch, Bytes), ClientError> {
        let batch = EventBatch::new(events, Some(self.producer), first_seq, self.client.limits())?;
        let frame = self.client.encode(&ClientRequest::Publish {
            topic: self.topic.clone(),
            partition: self.partition,
            batch: batch.clone(),
        })?;
        Ok((batch, frame))
    }

    async fn dispatch(&mut self, items: Vec<Item>) {
        let (events, acks): (Vec<Event>, Vec<_>) = items
            .into_iter()
            .map(|i| (i.event, (i.ack, i.permit)))
            .unzip();
        let (batch, frame) = match self.build(&events, self.next_seq) {
            Ok(b) => b,
            Err(e) => {
                let message = e.to_string();
                for (ack, _) in acks {
                    let _ = ack.send(Err(ClientError::Closed(message.clone())));
                }
                return;
            }
        };
        self.next_seq += u64::from(batch.count);
        self.unacked.push_back(InFlight {
            batch,
            frame: frame.clone(),
            acks,
        });
        let written = match self.stream.as_mut() {
            Some(s) => write_frame(&mut s.send, frame).await.is_ok(),
            None => false,
        };
        if !written {
            self.recover().await;
        }
    }

    async fn on_response(&mut self, response: Option<Result<ClientResponse, ClientError>>) {
        match response {
            Some(Ok(ClientResponse::Published {
                base_offset,
                count,
                duplicate,
            })) => {
                let Some(front) = self.unacked.pop_front() else {
                    return;
                };
                if front.batch.count != count {
                    tracing::warn!(topic = %self.topic, partition = self.partition, "acknowledgement does not match the batch; resending");
                    self.unacked.push_front(front);
                    self.recover().await;
                    return;
                }
                self.failing_since = None;
                self.failures = 0;
                self.refused = None;
                self.hint_followed = false;
                for (i, (ack, _permit)) in front.acks.into_iter().enumerate() {
                    let _ = ack.send(Ok(PublishAck {
                        partition: self.partition,
                        offset: Some(base_offset + i as u64),
                        duplicate,
                    }));
                }
            }
            Some(Ok(ClientResponse::Error(e))) if e.code == ErrorCode::AlreadyAppended => {
                // Every event of the front batch is in the log from an earlier send, at offsets
                // the partition no longer remembers (a resend older than the dedupe window).
                // They are acknowledged, as duplicates without an offset: reporting an event
                // that is in the log as failed would make its publisher send it again. The
                // later batches keep their sequences; their answers follow on this stream.
                if let Some(front) = self.unacked.pop_front() {
                    tracing::debug!(topic = %self.topic, partition = self.partition, reason = %e.message, "acknowledged without an offset");
                    for (ack, _) in front.acks {
                        let _ = ack.send(Ok(PublishAck {
                            partition: self.partition,
                            offset: None,
                            duplicate: true,
                        }));
                    }
                }
                self.failing_since = None;
                self.failures = 0;
            }
            Some(Ok(ClientResponse::Error(e))) if e.code == ErrorCode::UnknownProducer => {
                // The partition does not know this producer (it expired after being idle, or
                // never saw its first batch), so none of the unacknowledged batches is in the
                // log: number them all again from 0 and resend them in order. Answers still
                // due on this stream were for the old numbers: the stream goes.
                // A new identity, too: frames of the old numbering the node may still apply
                // can then never be taken for the new ones.
                tracing::debug!(topic = %self.topic, partition = self.partition, reason = %e.message, "numbering the unacknowledged batches again from 0, as a new producer");
                self.producer = rand::random();
                self.renumber(0);
                self.recover().await;
            }
            Some(Ok(ClientResponse::Error(e))) if e.code == ErrorCode::WrongPartition => {
                // A split parent refused a key it gave to a child: none of the unacknowledged
                // batches is appended (the later ones follow the refused one's sequence). They
                // go back to the producer, to be routed again by the topic's new layout.
                tracing::debug!(topic = %self.topic, partition = self.partition, reason = %e.message, "the topic grew; routing unacknowledged events again");
                self.take_back();
                match self.shared.upgrade() {
                    Some(shared) => {
                        self.parked = true;
                        shared.regrow();
                    }
                    None => {
                        for item in self.taken_back.drain(..) {
                            let _ = item.ack.send(Err(ClientError::Api(e.clone())));
                        }
                    }
                }
            }
            Some(Ok(ClientResponse::Error(e))) if e.code == ErrorCode::OffloadBehind => {
                // A tiered partition whose uploads are behind appended nothing: slow down,
                // resending after the recovery's backoff, and fail the events with this
                // refusal if it lasts `retry_for`.
                tracing::debug!(topic = %self.topic, partition = self.partition, reason = %e.message, "the partition's uploads are behind; resending after a backoff");
                self.refused = Some(e);
                self.recover().await;
            }
            Some(Ok(ClientResponse::Error(e))) if !retriable(&e) => {
                // The node refused the batch for good: fail its events, renumber the later
                // batches (none of which can have been appended past the gap) and resend them.
                // The later ones go as a new producer from 0: frames of the old numbering the
                // node may still apply can then never be taken for them.
                if let Some(front) = self.unacked.pop_front() {
                    for (ack, _) in front.acks {
                        let _ = ack.send(Err(ClientError::Api(e.clone())));
                    }
                    self.producer = rand::random();
                    self.renumber(0);
                }
                self.stream = None;
                if !self.unacked.is_empty() {
                    self.recover().await;
                }
            }
            other => {
                // Another failure: a refusal before it no longer says why the events fail.
                self.refused = None;
                self.leader_hint = match &other {
                    Some(Ok(ClientResponse::Error(e))) if e.code == ErrorCode::NotLeader => {
                        e.leader_hint
                    }
                    _ => None,
                };
                let reason = match &other {
                    Some(Ok(ClientResponse::Error(e))) => e.to_string(),
                    Some(Ok(_)) => "an unexpected answer".to_string(),
                    Some(Err(e)) => e.to_string(),
                    None => "the stream ended".to_string(),
                };
                let addr = self.stream.as_ref().map(|s| s.addr);
                tracing::debug!(topic = %self.topic, partition = self.partition, ?addr, %reason, hint = ?self.leader_hint, "produce stream failed; resending");
                self.recover().await;
            }
        }
    }

    /// Moves the events of every unacknowledged batch to `taken_back`, in order, and starts a
    /// new producer identity (frames of the old numbering the node may still apply can then
    /// never be taken for later ones).
    fn take_back(&mut self) {
        self.stream = None;
        for inflight in self.unacked.drain(..) {
            let events = match inflight.batch.decode_events(self.client.limits()) {
                Ok(events) => events,
                Err(e) => {
                    let message = e.to_string();
                    for (ack, _) in inflight.acks {
                        let _ = ack.send(Err(ClientError::Closed(message.clone())));
                    }
                    continue;
                }
            };
            for (event, (ack, permit)) in events.into_iter().zip(inflight.acks) {
                self.taken_back.push(Item { event, ack, permit });
            }
        }
        self.producer = rand::random();
        self.next_seq = 0;
        self.failing_since = None;
        self.failures = 0;
    }

    /// Numbers the unacknowledged batches again, in order, from `first_seq` under the
    /// current producer id (a batch that can no longer be encoded fails its events with the
    /// reason, as it could not be sent either).
    fn renumber(&mut self, first_seq: u64) {
        self.next_seq = first_seq;
        let rest: Vec<_> = self.unacked.drain(..).collect();
        for mut inflight in rest {
            let rebuilt = inflight
                .batch
                .decode_events(self.client.limits())
                .map_err(ClientError::from)
                .and_then(|events| self.build(&events, self.next_seq));
            match rebuilt {
                Ok((batch, frame)) => {
                    self.next_seq += u64::from(batch.count);
                    inflight.batch = batch;
                    inflight.frame = frame;
                    self.unacked.push_back(inflight);
                }
                Err(e) => {
                    let message = e.to_string();
                    for (ack, _) in inflight.acks {
                        let _ = ack.send(Err(ClientError::Closed(message.clone())));
                    }
                }
            }
        }
    }

    /// Finds the leader, opens a new produce stream and resends every unacknowledged batch in
    /// order. Gives up (failing those events) after `retry_for` of consecutive failure.
    async fn recover(&mut self) {
        self.stream = None;
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        let deadline = since + self.options.retry_for;
        loop {
            if self.failures > 0 {
                let backoff = Duration::from_millis(20u64 << self.failures.min(5));
                tokio::time::sleep(backoff).await;
            }
            self.failures += 1;
            if Instant::now() > deadline {
                if let Some(refused) = self.refused.take() {
                    self.give_up(|| ClientError::Api(refused.clone()));
                    return;
                }
                let reason = format!(
                    "{}/{}: no leader accepted the batch within {:?}",
                    self.topic, self.partition, self.options.retry_for
                );
                self.give_up(|| ClientError::Timeout(reason.clone()));
                return;
            }
            let hinted = match self.leader_hint.take() {
                Some(id) if !self.hint_followed => self
                    .leaders
                    .addr_of(id)
                    .await
                    .filter(|a| !self.client.is_down(*a)),
                _ => None,
            };
            self.hint_followed = hinted.is_some();
            let found = match hinted {
                Some(addr) => Ok(addr),
                None => {
                    self.leaders
                        .leader_of(
                            &self.client,
                            &self.topic,
                            self.partition,
                            &mut self.leaders_used,
                            deadline,
                        )
                        .await
                }
            };
            let addr = match found {
                Ok(a) => a,
                Err(ClientError::Api(e)) => {
                    self.give_up(|| ClientError::Api(e.clone()));
                    return;
                }
                Err(e) => {
                    tracing::debug!(topic = %self.topic, partition = self.partition, error = %e, "no leader found yet");
                    continue;
                }
            };
            match self.open_stream(addr).await {
                Ok(mut stream) => {
                    let mut ok = true;
                    for inflight in &self.unacked {
                        if write_frame(&mut stream.send, inflight.frame.clone())
                            .await
                            .is_err()
                        {
                            ok = false;
                            break;
                        }
                    }
                    if ok {
                        self.stream = Some(stream);
                        return;
                    }
                    self.client.forget(addr).await;
                }
                Err(e) => {
                    tracing::debug!(topic = %self.topic, partition = self.partition, %addr, error = %e, "could not open a produce stream");
                    self.client.forget(addr).await;
                }
            }
        }
    }

    /// Fails every unacknowledged event with `error` and starts a new producer identity for
    /// this partition: whether the failed batches were appended is unknown, so the next batch
    /// cannot continue their sequence.
    fn give_up(&mut self, error: impl Fn() -> ClientError) {
        for inflight in self.unacked.drain(..) {
            for (ack, _) in inflight.acks {
                let _ = ack.send(Err(error()));
            }
        }
        self.producer = rand::random();
        self.next_seq = 0;
        self.failing_since = None;
        self.failures = 0;
        self.leader_hint = None;
        self.hint_followed = false;
    }

    async fn open_stream(&self, addr: SocketAddr) -> Result<LaneStream, ClientError> {
        let connection = self.client.connection(addr).await?;
        let (send, mut recv) = connection
            .open_bi()
            .await
            .map_err(|e| NetError::Closed(e.to_string()))?;
        let (tx, responses) = mpsc::unbounded_channel();
        let client = self.client.clone();
        let reader = tokio::spawn(async move {
            let max = client.limits().max_frame;
            loop {
                let item = match read_frame(&mut recv, max).await {
                    Ok(Some(frame)) => client.decode(&frame),
                    Ok(None) => Err(ClientError::Closed("produce stream ended".into())),
                    Err(e) => Err(ClientError::Net(e)),
                };
                let stop = item.is_err();
                if tx.send(item).is_err() || stop {
                    return;
                }
            }
        });
        Ok(LaneStream {
            addr,
            send,
            responses,
            reader,
        })
    }
}
