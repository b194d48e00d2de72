//! Replication lanes: every group's AppendEntries pipeline from this node to one follower
//! node is a *lane* of the one peer stream the two nodes share for replication, so the
//! number of groups never multiplies streams, tasks or frames.
//!
//! The leader side keeps one [`LaneStream`] per follower node. Its writer takes whatever
//! requests the lanes have ready and sends them as one frame ([`RequestFrame`]); its reader
//! hands each answer of an answer frame ([`ReplyFrame`]) to its lane. A lane opens with the
//! group it replicates and closes when openraft drops it. The follower side
//! ([`serve_lanes`]) feeds each lane's requests, in order, to its group's Raft and sends the
//! answers back, again as many per frame as are ready. Per lane, requests and answers keep
//! their order (one stream carries them); lanes never wait for each other's answers. Any
//! failure of the shared stream fails every lane on it, and openraft starts them again on a
//! new one, as it does after any replication error.

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

/// A frame stops taking requests past this many bytes of entries (a single larger request
/// still goes, alone: the log store caps one request well below the peer frame limit).
const FRAME_BUDGET: usize = 4 * 1024 * 1024;

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

/// A lane as the leader side sees it.
pub(crate) struct Lane {
    /// One `Ok` per request that went out, in order; an `Err` if one could not be sent.
    pub(crate) sent: mpsc::UnboundedReceiver<Result<(), String>>,
    /// The answers, in order.
    pub(crate) answers: mpsc::UnboundedReceiver<LaneAnswer>,
    /// Closes the lane when dropped.
    pub(crate) _guard: LaneGuard,
}

/// Closes its lane when dropped: the lane's input ends (the follower gets `Close`) and its
/// answers are no longer routed.
pub(crate) struct LaneGuard {
    id: LaneId,
    answers: Arc<AnswerRoutes>,
    _stop_input: futures::channel::oneshot::Sender<()>,
}

impl Drop for LaneGuard {
    fn drop(&mut self) {
        self.answers.remove(self.id);
    }
}

/// Where each lane's answers go.
#[derive(Default)]
struct AnswerRoutes(Mutex<HashMap<LaneId, mpsc::UnboundedSender<LaneAnswer>>>);

impl AnswerRoutes {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<LaneId, mpsc::UnboundedSender<LaneAnswer>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remove(&self, id: LaneId) {
        self.lock().remove(&id);
    }

    /// Fails every lane (the stream ended): each gets `failure` after the answers it had.
    fn fail_all(&self, failure: &StreamFailure) {
        for (_, tx) in self.lock().drain() {
            let _ = tx.send(Err(failure.clone()));
        }
    }
}

struct NewLane {
    id: LaneId,
    group: GroupId,
    input: BoxStream<'static, AppendEntriesRequest<TypeConfig>>,
    sent: mpsc::UnboundedSender<Result<(), String>>,
}

/// The leader side's stream to one follower node, carrying every group's lane.
pub(crate) struct LaneStream {
    new_lanes: mpsc::UnboundedSender<NewLane>,
    answers: Arc<AnswerRoutes>,
    next_lane: AtomicU64,
    stats: Arc<LaneStats>,
}

impl LaneStream {
    /// Starts serving `stream` (opened to `follower`): a writer and a reader task, both
    /// ending when either fails or when this handle and every lane are gone.
    pub(crate) fn start(follower: NodeId, stream: PeerStream, stats: Arc<LaneStats>) -> Self {
        let (new_lanes, lanes_rx) = mpsc::unbounded_channel();
        let answers = Arc::new(AnswerRoutes::default());
        let PeerStream { sender, receiver } = stream;
        let writer = tokio::spawn(write_requests(lanes_rx, sender, stats.clone()));
        let reader = tokio::spawn(read_answers(receiver, answers.clone()));
        let routes = answers.clone();
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
            routes.fail_all(&StreamFailure {
                message: format!(
                    "replication stream to node {follower} ended: {}",
                    failure.message
                ),
                ..failure
            });
        });
        stats.streams_opened.fetch_add(1, Ordering::Relaxed);
        Self {
            new_lanes,
            answers,
            next_lane: AtomicU64::new(1),
            stats,
        }
    }

    /// Whether the stream still runs (else a new one must be opened).
    pub(crate) fn is_open(&self) -> bool {
        !self.new_lanes.is_closed()
    }

    /// Opens a lane replicating `group` with the requests of `input`. None if the stream
    /// has ended.
    pub(crate) fn open_lane<S>(&self, group: GroupId, input: S) -> Option<Lane>
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        let id = self.next_lane.fetch_add(1, Ordering::Relaxed);
        let (answers_tx, answers) = mpsc::unbounded_channel();
        let (sent_tx, sent) = mpsc::unbounded_channel();
        let (stop_input, stopped) = futures::channel::oneshot::channel::<()>();
        self.answers.lock().insert(id, answers_tx);
        let guard = LaneGuard {
            id,
            answers: self.answers.clone(),
            _stop_input: stop_input,
        };
        let lane = NewLane {
            id,
            group,
            input: Box::pin(input.take_until(stopped)),
            sent: sent_tx,
        };
        self.new_lanes.send(lane).ok()?;
        self.stats.lanes_opened.fetch_add(1, Ordering::Relaxed);
        Some(Lane {
            sent,
            answers,
            _guard: guard,
        })
    }
}

/// Entry bytes of a request, for the frame budget.
fn request_bytes(rpc: &AppendEntriesRequest<TypeConfig>) -> usize {
    rpc.entries
        .iter()
        .map(|e| match &e.payload {
            EntryPayload::Normal(command) => command.0.len(),
            _ => 256,
        })
        .sum()
}

/// A lane's requests, each tagged with the lane, then `None` when its input ends.
fn tagged<T: Send + 'static>(
    id: LaneId,
    input: BoxStream<'static, T>,
) -> BoxStream<'static, (LaneId, Option<T>)> {
    Box::pin(
        input
            .map(move |r| (id, Some(r)))
            .chain(futures::stream::once(async move { (id, None) })),
    )
}

type LaneInputs = SelectAll<BoxStream<'static, (LaneId, Option<AppendEntriesRequest<TypeConfig>>)>>;

/// The leader side's writer state: the lanes' inputs and where to report what went out.
struct RequestWriter {
    inputs: LaneInputs,
    sent: HashMap<LaneId, mpsc::UnboundedSender<Result<(), String>>>,
    /// The frame being gathered, the lanes owed a "sent" for it, the lanes it closes (told
    /// after the requests they had in it) and its entry bytes.
    frame: RequestFrame,
    owed: Vec<LaneId>,
    closed: Vec<LaneId>,
    bytes: usize,
}

impl RequestWriter {
    fn add(&mut self, lane: NewLane) {
        self.frame.push((lane.id, LaneOp::Open(lane.group)));
        self.sent.insert(lane.id, lane.sent);
        self.inputs.push(tagged(lane.id, lane.input));
    }

    fn take(&mut self, item: (LaneId, Option<AppendEntriesRequest<TypeConfig>>)) {
        match item {
            (id, Some(rpc)) => {
                self.bytes += request_bytes(&rpc);
                self.frame.push((id, LaneOp::Append(rpc)));
                self.owed.push(id);
            }
            (id, None) => {
                self.frame.push((id, LaneOp::Close));
                self.closed.push(id);
            }
        }
    }

    /// Tells each lane of the frame just written (or not) how it went.
    fn report(&mut self, result: Result<(), &str>) {
        for id in self.owed.drain(..) {
            if let Some(tx) = self.sent.get(&id) {
                let _ = tx.send(result.map_err(str::to_string));
            }
        }
        for id in self.closed.drain(..) {
            self.sent.remove(&id);
        }
        self.frame.clear();
        self.bytes = 0;
    }
}

/// The leader side's writer: sends whatever the lanes have ready as one frame, then tells
/// each lane its requests went out. Ends when the stream fails, or when no lane is left and
/// no new one can come.
async fn write_requests(
    mut new_lanes: mpsc::UnboundedReceiver<NewLane>,
    sender: StreamSender,
    stats: Arc<LaneStats>,
) -> StreamFailure {
    let mut w = RequestWriter {
        inputs: SelectAll::new(),
        sent: HashMap::new(),
        frame: Vec::new(),
        owed: Vec::new(),
        closed: Vec::new(),
        bytes: 0,
    };
    let mut accepting = true;
    loop {
        tokio::select! {
            lane = new_lanes.recv(), if accepting => match lane {
                Some(lane) => w.add(lane),
                None => accepting = false,
            },
            Some(item) = w.inputs.next(), if !w.inputs.is_empty() => w.take(item),
            else => return StreamFailure::ended("no lanes left"),
        }
        // Whatever else is ready goes in the same frame.
        while w.bytes < FRAME_BUDGET {
            if let Ok(lane) = new_lanes.try_recv() {
                w.add(lane);
                continue;
            }
            match w.inputs.next().now_or_never() {
                Some(Some(item)) => w.take(item),
                _ => break,
            }
        }
        if w.frame.is_empty() {
            continue;
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
                w.report(Ok(()));
            }
            Err(failure) => {
                w.report(Err(&failure.message));
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
            if let Some(tx) = routes.get(&id) {
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
