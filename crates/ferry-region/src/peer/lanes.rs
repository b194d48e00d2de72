//! Replication lanes: every group's AppendEntries pipeline from this node to one follower
//! node is a *lane* of the one peer stream the two nodes share for replication, so the
//! number of groups never multiplies streams, tasks or frames.
//!
//! The leader side keeps one [`LaneStream`] per follower node. A feeder task per lane passes
//! the lane's requests on while the lane has credits (about 8 MiB or 128 requests whose
//! answers are owed); the writer sends what the lanes passed on as one frame
//! ([`RequestFrame`], at most about 1 MiB of entries); the reader hands each answer of an
//! answer frame ([`ReplyFrame`]) to its lane, which returns the request's credits. A lane
//! opens with the group it replicates and closes when openraft drops it. The follower side
//! ([`serve_lanes`]) feeds each lane's requests, in order, to its group's Raft and sends the
//! answers back, again as many per frame as are ready. Per lane, requests and answers keep
//! their order (one stream carries them); a lane never waits for another's answers, and
//! credits keep one group that catches up (or a follower that falls behind) from filling
//! the shared stream and the follower's memory. Any failure of the shared stream fails every
//! lane on it, and openraft starts them again on a new one, as after any replication error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ferry_net::{NetError, PeerStream, StreamReceiver, StreamSender};
use ferry_proto::NodeId;
use ferry_store::{GroupId, TypeConfig};
use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use openraft::raft::{AppendEntriesRequest, StreamAppendResult};
use openraft::EntryPayload;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::sync::Semaphore;

use crate::command::{decode_shared, encode};

/// Identifies a lane on one stream (chosen by the leader side).
pub(crate) type LaneId = u64;

/// One answer on a lane: openraft's result, or why the follower's Raft could not answer (it
/// stopped, or does not host the group); either error ends the lane.
pub(crate) type AppendReply = Result<StreamAppendResult<TypeConfig>, String>;

/// What the leader side says about one lane.
#[derive(Serialize, Deserialize)]
enum LaneOp {
    /// The lane replicates `group`.
    Open(GroupId),
    /// The next request of the lane.
    Append(AppendEntriesRequest<TypeConfig>),
    /// The lane carries no more requests (answers owed still come).
    Close,
}

/// Leader → follower: operations of any number of lanes, each lane's in order.
type RequestFrame = Vec<(LaneId, LaneOp)>;
/// Follower → leader: answers of any number of lanes, each lane's in order.
type ReplyFrame = Vec<(LaneId, AppendReply)>;

/// A frame takes no request that would bring its entries past this many bytes (a single
/// larger request still goes, alone: the log store caps one request well below the peer
/// frame limit). Small, so one group catching up delays the others by little.
const FRAME_BUDGET: usize = 1024 * 1024;

/// Why a whole lane stream failed, as each of its lanes reports it.
#[derive(Debug, Clone)]
pub(crate) struct StreamFailure {
    /// The follower cannot be reached (openraft backs off before it tries again).
    pub(crate) unreachable: bool,
    pub(crate) message: String,
}

impl StreamFailure {
    fn from_net(e: &NetError) -> Self {
        Self {
            unreachable: matches!(
                e,
                NetError::Connect { .. } | NetError::LinkCut { .. } | NetError::UnknownPeer(_)
            ),
            message: e.to_string(),
        }
    }

    fn ended(message: impl Into<String>) -> Self {
        Self {
            unreachable: false,
            message: message.into(),
        }
    }
}

/// What a lane receives: each answer owed, or the failure of the stream.
pub(crate) type LaneAnswer = Result<AppendReply, StreamFailure>;

/// Counters of one node's lane streams (all followers together).
#[derive(Debug, Default)]
pub(crate) struct LaneStats {
    /// Lane streams opened to followers.
    pub(crate) streams_opened: AtomicU64,
    /// Lanes opened on them (one per group replication stream openraft started).
    pub(crate) lanes_opened: AtomicU64,
    /// Request frames sent.
    pub(crate) frames: AtomicU64,
    /// AppendEntries requests sent in them.
    pub(crate) requests: AtomicU64,
}

/// What a lane hears from the writer about its requests, in order.
pub(crate) enum LaneEvent {
    /// The next request went out; its answer returns `cost` credits to the lane.
    Sent(u32),
    /// The next request could not be sent (the stream failed).
    Failed(String),
    /// The lane's input ended and everything before went out: no more answers are owed
    /// after the ones already announced.
    Ended,
}

/// Credits a lane has for requests whose answers are owed (1 KiB of entries each, at least
/// [`MIN_COST`] per request): so a lane that catches up (or a follower that falls behind)
/// has at most about 8 MiB or 128 requests on the shared stream, and the follower never
/// queues more than that for one group.
const LANE_CREDITS: u32 = 8 * 1024;
/// Credits one request takes at the least (so at most 128 small ones are owed).
const MIN_COST: u32 = 64;

/// A lane as the leader side sees it.
pub(crate) struct Lane {
    /// One event per request, in order, then `Ended`; the channel closing before `Ended`
    /// means the stream failed.
    pub(crate) sent: mpsc::UnboundedReceiver<LaneEvent>,
    /// The answers, in order.
    pub(crate) answers: mpsc::UnboundedReceiver<LaneAnswer>,
    /// Credits returned as answers arrive.
    pub(crate) credits: Arc<Semaphore>,
    /// Closes the lane when dropped.
    pub(crate) _guard: LaneGuard,
}

/// Closes its lane when dropped: the lane's input ends (the follower gets `Close`), a
/// feeder waiting for credits gives up, and its answers are no longer routed.
pub(crate) struct LaneGuard {
    id: LaneId,
    routes: Arc<AnswerRoutes>,
    credits: Arc<Semaphore>,
    _stop_input: futures::channel::oneshot::Sender<()>,
}

impl Drop for LaneGuard {
    fn drop(&mut self) {
        self.credits.close();
        self.routes.remove(self.id);
    }
}

/// Where each lane's answers go, and whether the stream has failed (then no lane opens).
#[derive(Default)]
struct AnswerRoutes(Mutex<Routes>);

#[derive(Default)]
struct Routes {
    lanes: HashMap<LaneId, mpsc::UnboundedSender<LaneAnswer>>,
    failed: bool,
}

impl AnswerRoutes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remove(&self, id: LaneId) {
        self.lock().lanes.remove(&id);
    }

    /// Fails every lane (the stream ended): each gets `failure` after the answers it had,
    /// and no lane opens on the stream any more.
    fn fail_all(&self, failure: &StreamFailure) {
        let mut routes = self.lock();
        routes.failed = true;
        for (_, tx) in routes.lanes.drain() {
            let _ = tx.send(Err(failure.clone()));
        }
    }
}

/// What the lanes tell the writer, in the order each lane said it.
enum WriterOp {
    Open {
        id: LaneId,
        group: GroupId,
        sent: mpsc::UnboundedSender<LaneEvent>,
    },
    Append {
        id: LaneId,
        rpc: AppendEntriesRequest<TypeConfig>,
        /// Its entry bytes, and the credits it took.
        bytes: usize,
        cost: u32,
    },
    Close {
        id: LaneId,
    },
}

/// The leader side's stream to one follower node, carrying every group's lane.
pub(crate) struct LaneStream {
    ops: mpsc::UnboundedSender<WriterOp>,
    routes: Arc<AnswerRoutes>,
    next_lane: AtomicU64,
    stats: Arc<LaneStats>,
}

impl LaneStream {
    /// Starts serving `stream` (opened to `follower`): a writer and a reader task, both
    /// ending when either fails or when this handle and every lane are gone.
    pub(crate) fn start(follower: NodeId, stream: PeerStream, stats: Arc<LaneStats>) -> Self {
        let (ops, ops_rx) = mpsc::unbounded_channel();
        let routes = Arc::new(AnswerRoutes::default());
        let PeerStream { sender, receiver } = stream;
        let writer = tokio::spawn(write_requests(ops_rx, sender, stats.clone()));
        let reader = tokio::spawn(read_answers(receiver, routes.clone()));
        let failing = routes.clone();
        tokio::spawn(async move {
            let (mut writer, mut reader) = (writer, reader);
            let failure = tokio::select! {
                ended = &mut writer => {
                    reader.abort();
                    ended.unwrap_or_else(|e| StreamFailure::ended(e.to_string()))
                }
                ended = &mut reader => {
                    writer.abort();
                    ended.unwrap_or_else(|e| StreamFailure::ended(e.to_string()))
                }
            };
            tracing::debug!(follower, reason = %failure.message, "replication stream ended");
            failing.fail_all(&StreamFailure {
                message: format!(
                    "replication stream to node {follower} ended: {}",
                    failure.message
                ),
                ..failure
            });
        });
        stats.streams_opened.fetch_add(1, Ordering::Relaxed);
        Self {
            ops,
            routes,
            next_lane: AtomicU64::new(1),
            stats,
        }
    }

    /// Whether the stream still runs (else a new one must be opened).
    pub(crate) fn is_open(&self) -> bool {
        !self.routes.lock().failed && !self.ops.is_closed()
    }

    /// Opens a lane replicating `group` with the requests of `input`: a feeder task takes
    /// them as the lane has credits. None if the stream has ended.
    pub(crate) fn open_lane<S>(&self, group: GroupId, input: S) -> Option<Lane>
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        let id = self.next_lane.fetch_add(1, Ordering::Relaxed);
        let (answers_tx, answers) = mpsc::unbounded_channel();
        let (sent_tx, sent) = mpsc::unbounded_channel();
        let (stop_input, stopped) = futures::channel::oneshot::channel::<()>();
        let credits = Arc::new(Semaphore::new(LANE_CREDITS as usize));
        {
            let mut routes = self.routes.lock();
            if routes.failed {
                return None;
            }
            routes.lanes.insert(id, answers_tx);
        }
        let guard = LaneGuard {
            id,
            routes: self.routes.clone(),
            credits: credits.clone(),
            _stop_input: stop_input,
        };
        let opened = WriterOp::Open {
            id,
            group,
            sent: sent_tx,
        };
        self.ops.send(opened).ok()?;
        tokio::spawn(feed_lane(
            id,
            input.take_until(stopped),
            credits.clone(),
            self.ops.clone(),
        ));
        self.stats.lanes_opened.fetch_add(1, Ordering::Relaxed);
        Some(Lane {
            sent,
            answers,
            credits,
            _guard: guard,
        })
    }
}

/// Entry bytes of a request, for the frame budget and the lane's credits.
fn request_bytes(rpc: &AppendEntriesRequest<TypeConfig>) -> usize {
    rpc.entries
        .iter()
        .map(|e| match &e.payload {
            EntryPayload::Normal(command) => command.0.len(),
            _ => 256,
        })
        .sum()
}

/// Passes a lane's requests to the writer while the lane has credits for them, then closes
/// the lane. Stops when the lane is dropped (its credits close) or the writer is gone.
async fn feed_lane<S>(
    id: LaneId,
    mut input: S,
    credits: Arc<Semaphore>,
    ops: mpsc::UnboundedSender<WriterOp>,
) where
    S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Unpin,
{
    while let Some(rpc) = input.next().await {
        let bytes = request_bytes(&rpc);
        let kib = bytes.div_ceil(1024);
        let cost = u32::try_from(kib)
            .unwrap_or(u32::MAX)
            .clamp(MIN_COST, LANE_CREDITS);
        match credits.acquire_many(cost).await {
            Ok(permit) => permit.forget(),
            Err(_) => break,
        }
        if ops
            .send(WriterOp::Append {
                id,
                rpc,
                bytes,
                cost,
            })
            .is_err()
        {
            return;
        }
    }
    let _ = ops.send(WriterOp::Close { id });
}

/// The leader side's writer state: where to report what went out, and the frame being
/// gathered with the lanes owed a report for it.
struct RequestWriter {
    sent: HashMap<LaneId, mpsc::UnboundedSender<LaneEvent>>,
    frame: RequestFrame,
    /// Lanes whose request went in this frame, with its cost, in order.
    owed: Vec<(LaneId, u32)>,
    /// Lanes this frame closes (told after the requests they had in it).
    closed: Vec<LaneId>,
    bytes: usize,
}

impl RequestWriter {
    fn take(&mut self, op: WriterOp) {
        match op {
            WriterOp::Open { id, group, sent } => {
                self.frame.push((id, LaneOp::Open(group)));
                self.sent.insert(id, sent);
            }
            WriterOp::Append {
                id,
                rpc,
                bytes,
                cost,
            } => {
                self.bytes += bytes;
                self.frame.push((id, LaneOp::Append(rpc)));
                self.owed.push((id, cost));
            }
            WriterOp::Close { id } => {
                self.frame.push((id, LaneOp::Close));
                self.closed.push(id);
            }
        }
    }

    /// Tells each lane of the frame just written (or not) how it went.
    fn report(&mut self, failure: Option<&str>) {
        for (id, cost) in self.owed.drain(..) {
            if let Some(tx) = self.sent.get(&id) {
                let _ = tx.send(match failure {
                    None => LaneEvent::Sent(cost),
                    Some(f) => LaneEvent::Failed(f.to_string()),
                });
            }
        }
        for id in self.closed.drain(..) {
            if let Some(tx) = self.sent.remove(&id) {
                if failure.is_none() {
                    let _ = tx.send(LaneEvent::Ended);
                }
            }
        }
        self.frame.clear();
        self.bytes = 0;
    }
}

/// The leader side's writer: sends what the lanes have passed on as one frame (up to
/// [`FRAME_BUDGET`] of entries), then tells each lane its requests went out. Ends when the
/// stream fails, or when the stream's handle and every lane are gone.
async fn write_requests(
    mut ops: mpsc::UnboundedReceiver<WriterOp>,
    sender: StreamSender,
    stats: Arc<LaneStats>,
) -> StreamFailure {
    let mut w = RequestWriter {
        sent: HashMap::new(),
        frame: Vec::new(),
        owed: Vec::new(),
        closed: Vec::new(),
        bytes: 0,
    };
    // A request that did not fit the last frame starts the next one.
    let mut held: Option<WriterOp> = None;
    loop {
        let first = match held.take() {
            Some(op) => op,
            None => match ops.recv().await {
                Some(op) => op,
                None => return StreamFailure::ended("no lanes left"),
            },
        };
        w.take(first);
        while let Ok(op) = ops.try_recv() {
            if let WriterOp::Append { bytes, .. } = &op {
                if w.bytes + bytes > FRAME_BUDGET {
                    held = Some(op);
                    break;
                }
            }
            w.take(op);
        }
        let requests = w.owed.len() as u64;
        let written = match encode("replication frame", &w.frame) {
            Ok(bytes) => sender
                .send(bytes)
                .await
                .map_err(|e| StreamFailure::from_net(&e)),
            Err(e) => Err(StreamFailure::ended(e.to_string())),
        };
        match written {
            Ok(()) => {
                stats.frames.fetch_add(1, Ordering::Relaxed);
                stats.requests.fetch_add(requests, Ordering::Relaxed);
                w.report(None);
            }
            Err(failure) => {
                w.report(Some(&failure.message));
                return failure;
            }
        }
    }
}

/// The leader side's reader: routes each answer to its lane.
async fn read_answers(mut receiver: StreamReceiver, routes: Arc<AnswerRoutes>) -> StreamFailure {
    loop {
        let frame = match receiver.recv().await {
            None => return StreamFailure::ended("the follower ended it"),
            Some(Err(e)) => return StreamFailure::from_net(&e),
            Some(Ok(frame)) => frame,
        };
        let answers: ReplyFrame = match decode_shared("replication answers", &frame) {
            Ok(a) => a,
            Err(e) => return StreamFailure::ended(e.to_string()),
        };
        let routes = routes.lock();
        for (id, answer) in answers {
            if let Some(tx) = routes.lanes.get(&id) {
                let _ = tx.send(Ok(answer));
            }
        }
    }
}

/// The requests of one lane, as the follower's Raft reads them.
pub(crate) type LaneRequests =
    futures::channel::mpsc::UnboundedReceiver<AppendEntriesRequest<TypeConfig>>;

/// A lane's answers on the follower side: openraft's `stream_append` over its requests.
pub(crate) type LaneAnswers = BoxStream<'static, AppendReply>;

/// Serves the lane stream a leader node opened: opens each lane on its group's Raft
/// (`open`, which refuses a group this node does not host), feeds it the lane's requests in
/// order and sends the answers back, as many per frame as are ready. Returns when the leader
/// ends the stream or it fails.
pub(crate) async fn serve_lanes<F>(stream: PeerStream, open: F)
where
    F: Fn(&GroupId, LaneRequests) -> Result<LaneAnswers, String>,
{
    let PeerStream { sender, receiver } = stream;
    let (answers_tx, answers_rx) = mpsc::unbounded_channel();
    let read = read_requests(receiver, open, answers_tx);
    let write = write_answers(answers_rx, sender);
    futures::join!(read, write);
}

/// Ends a lane's answers after the first that ends it (any error).
fn until_last(answers: LaneAnswers) -> LaneAnswers {
    Box::pin(futures::stream::unfold(
        Some(answers),
        |answers| async move {
            let mut answers = answers?;
            let answer = answers.next().await?;
            let last = !matches!(answer, Ok(Ok(_)));
            Some((answer, (!last).then_some(answers)))
        },
    ))
}

async fn read_requests<F>(
    mut receiver: StreamReceiver,
    open: F,
    answers: mpsc::UnboundedSender<(LaneId, LaneAnswers)>,
) where
    F: Fn(&GroupId, LaneRequests) -> Result<LaneAnswers, String>,
{
    let mut lanes: HashMap<LaneId, futures::channel::mpsc::UnboundedSender<_>> = HashMap::new();
    loop {
        let frame = match receiver.recv().await {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "replication stream ended");
                return;
            }
            None => return,
        };
        let ops: RequestFrame = match decode_shared("replication frame", &frame) {
            Ok(ops) => ops,
            Err(e) => {
                tracing::warn!(error = %e, "bad frame on a replication stream");
                return;
            }
        };
        for (id, op) in ops {
            match op {
                LaneOp::Open(group) => {
                    let (tx, rx) = futures::channel::mpsc::unbounded();
                    let lane_answers = match open(&group, rx) {
                        Ok(a) => until_last(a),
                        Err(reason) => Box::pin(futures::stream::once(async move {
                            Err::<StreamAppendResult<TypeConfig>, _>(reason)
                        })),
                    };
                    lanes.insert(id, tx);
                    if answers.send((id, lane_answers)).is_err() {
                        return;
                    }
                }
                LaneOp::Append(rpc) => {
                    // A lane that already ended (refused, or its Raft answered with an
                    // error) drops its requests; the leader closes it on that answer.
                    if let Some(tx) = lanes.get(&id) {
                        let _ = tx.unbounded_send(rpc);
                    }
                }
                LaneOp::Close => {
                    lanes.remove(&id);
                }
            }
        }
    }
}

async fn write_answers(
    mut new_lanes: mpsc::UnboundedReceiver<(LaneId, LaneAnswers)>,
    sender: StreamSender,
) {
    let mut answers: SelectAll<BoxStream<'static, (LaneId, AppendReply)>> = SelectAll::new();
    let mut accepting = true;
    loop {
        let mut frame: ReplyFrame = Vec::new();
        let add = |(id, lane): (LaneId, LaneAnswers), answers: &mut SelectAll<_>| {
            answers.push(Box::pin(lane.map(move |a| (id, a))) as BoxStream<'static, _>);
        };
        tokio::select! {
            lane = new_lanes.recv(), if accepting => match lane {
                Some(lane) => add(lane, &mut answers),
                None => accepting = false,
            },
            Some(answer) = answers.next(), if !answers.is_empty() => frame.push(answer),
            else => return,
        }
        loop {
            if let Ok(lane) = new_lanes.try_recv() {
                add(lane, &mut answers);
                continue;
            }
            match answers.next().now_or_never() {
                Some(Some(answer)) => frame.push(answer),
                _ => break,
            }
        }
        if frame.is_empty() {
            continue;
        }
        let Ok(bytes) = encode("replication answers", &frame) else {
            return;
        };
        if sender.send(bytes).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ferry_net::{MemNetwork, RpcHandler, Transport};
    use futures::future::BoxFuture;
    use openraft::type_config::alias::VoteOf;

    use super::*;

    /// A follower that hands every replication stream opened to it to the test.
    struct Follower(mpsc::UnboundedSender<PeerStream>);

    impl RpcHandler for Follower {
        fn handle(
            &self,
            _from: NodeId,
            _request: bytes::Bytes,
        ) -> BoxFuture<'static, bytes::Bytes> {
            Box::pin(async { bytes::Bytes::new() })
        }

        fn handle_stream(
            &self,
            _from: NodeId,
            _request: bytes::Bytes,
            stream: PeerStream,
        ) -> BoxFuture<'static, ()> {
            let _ = self.0.send(stream);
            Box::pin(async {})
        }
    }

    fn heartbeat() -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: VoteOf::<TypeConfig>::new(1, 1),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        }
    }

    /// The follower side as the test plays it: reads frames, counts each lane's requests.
    async fn read_appends(receiver: &mut StreamReceiver, counts: &mut HashMap<LaneId, usize>) {
        let frame = receiver.recv().await.expect("a frame").expect("no error");
        let ops: RequestFrame = decode_shared("replication frame", &frame).expect("decodes");
        for (id, op) in ops {
            if let LaneOp::Append(_) = op {
                *counts.entry(id).or_default() += 1;
            }
        }
    }

    /// A lane whose follower does not answer stops at its credits (128 small requests), and
    /// every answer lets exactly one more go; another lane on the same stream is not held
    /// back by it.
    #[tokio::test]
    async fn a_lane_waits_for_answers_once_its_credits_are_spent() {
        let net = MemNetwork::new();
        let (streams_tx, mut streams) = mpsc::unbounded_channel();
        net.register(2, Arc::new(Follower(streams_tx)));
        let opened = net
            .transport(1)
            .open_stream(2, bytes::Bytes::from_static(b"replicate"))
            .await
            .expect("opens");
        let lanes = LaneStream::start(2, opened, Arc::default());
        let mut follower = streams.recv().await.expect("the follower has the stream");

        let (input_tx, input) = futures::channel::mpsc::unbounded();
        for _ in 0..1_000 {
            input_tx.unbounded_send(heartbeat()).unwrap();
        }
        let mut busy = lanes.open_lane("busy".into(), input).expect("lane opens");
        let most = (LANE_CREDITS / MIN_COST) as usize;

        let mut counts = HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while counts.values().sum::<usize>() < most {
            tokio::time::timeout_at(deadline, read_appends(&mut follower.receiver, &mut counts))
                .await
                .expect("the lane sends its credits' worth");
        }
        assert_eq!(counts.values().sum::<usize>(), most);

        // Another lane still goes through at once.
        let (other_tx, other) = futures::channel::mpsc::unbounded();
        other_tx.unbounded_send(heartbeat()).unwrap();
        let _other = lanes.open_lane("other".into(), other).expect("lane opens");
        while counts.len() < 2 {
            tokio::time::timeout_at(deadline, read_appends(&mut follower.receiver, &mut counts))
                .await
                .expect("the other lane is not held back");
        }
        let busy_id = 1;
        assert_eq!(
            counts[&busy_id], most,
            "the busy lane sent nothing more meanwhile"
        );

        // Answer the busy lane's first request: exactly one more of its requests follows.
        let answer: ReplyFrame = vec![(busy_id, Ok(Ok(None)))];
        follower
            .sender
            .send(encode("replication answers", &answer).unwrap())
            .await
            .unwrap();
        // The lane's reader hands over the answer as the lane reads it.
        match busy.sent.recv().await {
            Some(LaneEvent::Sent(cost)) => {
                let got = busy.answers.recv().await.expect("answer routed");
                assert!(matches!(got, Ok(Ok(Ok(None)))));
                busy.credits.add_permits(cost as usize);
            }
            _ => panic!("the busy lane's first request went out"),
        }
        tokio::time::timeout_at(deadline, read_appends(&mut follower.receiver, &mut counts))
            .await
            .expect("one more request after an answer");
        assert_eq!(counts[&busy_id], most + 1);
    }
}
