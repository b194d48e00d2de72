//! Node ↔ node messages and the Raft network over any [`Transport`]: every group's RPCs to a
//! peer share that peer's one connection, each message tagged with its group id
//! (openraft-multi's [`GroupRouter`]). Replication is pipelined: a group's AppendEntries to
//! one follower are a lane of the one peer stream this node keeps to that follower for every
//! group ([`lanes`], opened by [`PeerRequest::Replicate`]), each request sent without waiting
//! for the answer to the one before, the answers coming back in order.

mod lanes;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ferry_net::{NetError, Transport};
use ferry_proto::wire::{ClientRequest, ClientResponse};
use ferry_proto::NodeId;
use ferry_store::{GroupId, SnapshotData, TypeConfig};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::BasicNode;
use openraft_multi::GroupRouter;
use serde::{Deserialize, Serialize};

use crate::command::{decode, encode};

/// A request from one node to another.
#[derive(Serialize, Deserialize)]
pub(crate) enum PeerRequest {
    AppendEntries {
        group: GroupId,
        rpc: AppendEntriesRequest<TypeConfig>,
    },
    /// Opens the peer stream that carries every group's AppendEntries from the sender to
    /// this node, each group's on a lane of its own ([`lanes`]).
    Replicate,
    Vote {
        group: GroupId,
        rpc: VoteRequest<TypeConfig>,
    },
    PreVote {
        group: GroupId,
        rpc: VoteRequest<TypeConfig>,
    },
    /// Opens a stream carrying one snapshot of `total` bytes: the data follows as frames, in
    /// order; the receiver answers each with [`PeerResponse::Spooled`] and, once it installed
    /// the whole, with [`PeerResponse::Snapshot`] (or an error).
    SnapshotStream {
        group: GroupId,
        /// Names this transfer (its spool file, its log lines).
        transfer: u64,
        /// Length of the whole snapshot data.
        total: u64,
        vote: VoteOf<TypeConfig>,
        meta: SnapshotMetaOf<TypeConfig>,
    },
    /// A client request forwarded to the leader that can serve it (never forwarded again).
    Client(ClientRequest),
    /// A gossip message from the node whose gossip address is `from`.
    Gossip { from: SocketAddr, message: Bytes },
    /// A batch forwarded from another region.
    Forward(ForwardRequest),
    /// The forwarders this node runs, for `ferry ctl regions`.
    ForwardingStatus,
    /// The measured write load of the groups this node hosts ([`crate::load`]).
    GroupLoads,
    /// A move's group leader asks the move's target whether it runs the group as the move
    /// target, so that it may be added as a learner ([`crate::moves`]).
    ReadyForReplica { topic: String, group: u32 },
    /// Another region forwards this integration or notification topic to `region`: create
    /// it there if it does not exist, and answer its partition count there. Nodes of other
    /// regions relay it as they relay forwarded batches (`via`).
    EnsureTopic {
        config: ferry_proto::TopicConfig,
        region: String,
        /// The regions it passed through so far, its origin first.
        via: Vec<String>,
    },
    /// Is the node up, and since when? (`boot` is the asker's own boot id.)
    Alive { boot: u64 },
    /// The leader `leader` asks this node to put its replicas of these groups to sleep
    /// ([`crate::quiesce`]).
    Sleep {
        leader: NodeId,
        asks: Vec<crate::quiesce::SleepAsk>,
    },
    /// The group's leader hands its leadership to this node: it elects itself at once.
    TransferLeader {
        group: GroupId,
        rpc: TransferLeaderRequest<TypeConfig>,
    },
    /// The calling node (its certificate names it) asks to join the region, listening at
    /// `addr` ([`crate::membership`]).
    Join { addr: SocketAddr },
    /// A [`PeerRequest::Join`] passed on to the metadata leader, for node `id`.
    JoinFor { id: NodeId, addr: SocketAddr },
    /// Which node is this, of which region?
    Identify,
    /// Propose a metadata command (to the metadata leader).
    ProposeMeta(crate::command::MetaCommand),
}

/// A batch of one source partition for one destination region.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ForwardRequest {
    pub(crate) origin_region: String,
    pub(crate) target_region: String,
    pub(crate) topic: String,
    /// The source partition.
    pub(crate) partition: u32,
    /// The destination partition: the events' keys were routed to it by `routed_by`.
    pub(crate) dest_partition: u32,
    /// The destination topic's layout (created with, now has) the origin routed keys by;
    /// the destination refuses the batch if it gives `dest_partition` another key space.
    pub(crate) routed_by: (u32, u32),
    pub(crate) batch: ferry_router::Batch,
    /// The regions it passed through so far, its origin first: a relay never passes it to
    /// a region on it, and at most `MAX_RELAYS` regions relay it (loop prevention).
    pub(crate) via: Vec<String>,
    /// Already passed to the leader inside the target region (never passed twice).
    pub(crate) passed_in_region: bool,
}

/// The answer to a [`PeerRequest`].
#[derive(Serialize, Deserialize)]
pub(crate) enum PeerResponse {
    AppendEntries(AppendEntriesResponse<TypeConfig>),
    Vote(VoteResponse<TypeConfig>),
    Snapshot(SnapshotResponse<TypeConfig>),
    /// Bytes of a streamed snapshot received and spooled so far.
    Spooled(u64),
    Client(Box<ClientResponse>),
    /// A gossip message was taken.
    Done,
    /// A forwarded batch is committed in the target region (or refused after a gap).
    Forwarded(ferry_router::Ack),
    /// The forwarders a node runs.
    ForwardingStatus(Vec<ferry_proto::wire::ForwardingInfo>),
    /// The measured write load of the groups a node hosts.
    GroupLoads(Vec<crate::load::GroupLoad>),
    /// Whether the node runs the group as a move's target.
    ReadyForReplica(bool),
    /// The topic's key layout in the answering region: partitions it was created with, and
    /// has now.
    TopicLayout {
        initial: u32,
        partitions: u32,
    },
    /// A forwarded batch was routed by a layout the destination has left (it added
    /// partitions): the origin describes the topic there again and routes anew.
    WrongPartition(String),
    /// The peer could not serve the request (unknown group, shutting down, bad frame).
    Error(String),
    /// A relay found no way on to the target region: the sender may try another route.
    Unreachable(String),
    /// The node is up since boot `boot` (a restart changes it).
    Alive {
        boot: u64,
    },
    /// Per [`PeerRequest::Sleep`] ask: whether that group sleeps now.
    Slept(Vec<bool>),
    /// Answer to [`PeerRequest::TransferLeader`].
    TransferredLeader(TransferLeaderResponse<TypeConfig>),
    /// The node is a member of the region now.
    Joined,
    /// The region will not take the node, and why (asking again will not help).
    JoinRefused(String),
    /// Answer to [`PeerRequest::Identify`]: who it is, and whether it belongs to a region
    /// (a member of a metadata group).
    Identity {
        id: NodeId,
        region: String,
        member: bool,
        /// Its object store for tiered topics ([`Node::tier_place`](crate::Node)).
        tier: Option<String>,
    },
    /// A metadata command was refused.
    MetaRefused(ferry_proto::wire::ApiError),
}

impl PeerResponse {
    /// What an answer that the caller did not expect said, for its error message.
    pub(crate) fn unexpected(&self) -> String {
        match self {
            PeerResponse::Error(e)
            | PeerResponse::Unreachable(e)
            | PeerResponse::WrongPartition(e) => e.clone(),
            PeerResponse::JoinRefused(e) => format!("refused: {e}"),
            PeerResponse::MetaRefused(e) => e.to_string(),
            _ => "an answer of another kind".into(),
        }
    }
}

pub(crate) use lanes::{serve_lanes, LaneAnswers, LaneRequests, LaneStats};

/// The replication stream to one follower node, once opened.
type LaneStreamSlot = Arc<tokio::sync::Mutex<Option<lanes::LaneStream>>>;

/// Sends peer requests over a transport.
#[derive(Clone)]
pub struct Router<T> {
    transport: T,
    snapshot_chunk: usize,
    /// The replication stream to each follower node (opened on first use, again after it
    /// fails).
    lane_streams: Arc<Mutex<HashMap<NodeId, LaneStreamSlot>>>,
    lane_stats: Arc<LaneStats>,
    snapshot_stats: Arc<SnapshotStats>,
}

/// Partition-group snapshots this node sent to followers, since it started.
#[derive(Debug, Default)]
pub(crate) struct SnapshotStats {
    /// Sent whole and installed by the follower.
    pub(crate) sent: AtomicU64,
    /// Given up part way (openraft starts them again).
    pub(crate) failed: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PeerFailure(String);

impl<T: Transport> Router<T> {
    /// A router over `transport`, sending snapshots in pieces of `snapshot_chunk` bytes.
    pub fn new(transport: T, snapshot_chunk: usize) -> Self {
        Self {
            transport,
            snapshot_chunk: snapshot_chunk.max(1),
            lane_streams: Arc::default(),
            lane_stats: Arc::default(),
            snapshot_stats: Arc::default(),
        }
    }

    /// Snapshots sent to followers.
    pub(crate) fn snapshot_stats(&self) -> &SnapshotStats {
        &self.snapshot_stats
    }

    /// The transport.
    pub(crate) fn transport(&self) -> &T {
        &self.transport
    }

    /// Counters of this node's replication streams.
    pub(crate) fn lane_stats(&self) -> &LaneStats {
        &self.lane_stats
    }

    /// What the transport has received from `to` so far ([`Transport::received_from`]).
    pub(crate) fn received_from(&self, to: NodeId) -> Option<ferry_net::Received> {
        self.transport.received_from(to)
    }

    /// The transport's fault injection, if it has any.
    pub(crate) fn link_faults(&self) -> Option<&ferry_net::LinkFaults> {
        self.transport.link_faults()
    }

    /// Encodes a request once (a forwarded batch may be sent along several routes).
    pub(crate) fn encode_request(request: &PeerRequest) -> Result<Bytes, NetError> {
        encode("peer request", request).map_err(|e| NetError::Protocol(e.to_string()))
    }

    fn decode_response(reply: &[u8]) -> Result<PeerResponse, NetError> {
        decode("peer response", reply).map_err(|e| NetError::Protocol(e.to_string()))
    }

    pub(crate) async fn call(
        &self,
        to: NodeId,
        request: &PeerRequest,
    ) -> Result<PeerResponse, NetError> {
        let reply = self
            .transport
            .call(to, Self::encode_request(request)?)
            .await?;
        Self::decode_response(&reply)
    }

    /// Sends a request to whichever node listens at `addr` (nodes of other regions, gossip).
    pub(crate) async fn call_addr(
        &self,
        addr: SocketAddr,
        request: &PeerRequest,
    ) -> Result<PeerResponse, NetError> {
        self.call_addr_encoded(addr, Self::encode_request(request)?)
            .await
    }

    /// Like [`Router::call_addr`] with the request already encoded.
    pub(crate) async fn call_addr_encoded(
        &self,
        addr: SocketAddr,
        request: Bytes,
    ) -> Result<PeerResponse, NetError> {
        let reply = self.transport.call_addr(addr, request).await?;
        Self::decode_response(&reply)
    }

    /// Forwards a client request to `leader`.
    pub(crate) async fn forward(
        &self,
        leader: NodeId,
        request: ClientRequest,
    ) -> Result<ClientResponse, NetError> {
        match self.call(leader, &PeerRequest::Client(request)).await? {
            PeerResponse::Client(response) => Ok(*response),
            PeerResponse::Error(e) => Err(NetError::Remote(e)),
            _ => Err(NetError::Protocol(
                "unexpected answer to a forwarded request".into(),
            )),
        }
    }

    async fn raft_call(
        &self,
        to: NodeId,
        request: PeerRequest,
        ttl: std::time::Duration,
    ) -> Result<PeerResponse, RPCError<TypeConfig>> {
        match tokio::time::timeout(ttl, self.call(to, &request)).await {
            Err(_) => Err(no_answer(to, ttl)),
            Ok(Err(e)) => Err(rpc_error(e)),
            Ok(Ok(PeerResponse::Error(e))) => Err(peer_failure(e)),
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// Sends `group`'s AppendEntries requests from `input` to `target` on a lane of the
    /// replication stream to it, without waiting between them; yields the answers in order.
    /// Waiting longer than four `ttl`s for an answer that is owed, or any failure, ends the
    /// lane with an error.
    async fn append_stream<S>(
        &self,
        target: NodeId,
        group: GroupId,
        input: S,
        ttl: std::time::Duration,
    ) -> Result<
        BoxStream<'static, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
        RPCError<TypeConfig>,
    >
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        // openraft waits out its backoff after an unreachable target inside the request
        // stream, before it yields a request: take the first one before dialing, or a target
        // that cannot be reached is redialed at once, hundreds of times a second per group.
        let mut input = input;
        let Some(first) = futures::StreamExt::next(&mut input).await else {
            return Ok(Box::pin(futures::stream::empty()));
        };
        let input = futures::StreamExt::chain(futures::stream::iter([first]), input);
        let slot = {
            let mut streams = self.lane_streams.lock().unwrap_or_else(|e| e.into_inner());
            streams.entry(target).or_default().clone()
        };
        let lane = {
            let mut slot = slot.lock().await;
            if !slot.as_ref().is_some_and(|s| s.is_open()) {
                let opening = Self::encode_request(&PeerRequest::Replicate)
                    .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
                let stream = self
                    .transport
                    .open_stream(target, opening)
                    .await
                    .map_err(rpc_error)?;
                *slot = Some(lanes::LaneStream::start(
                    target,
                    stream,
                    self.lane_stats.clone(),
                ));
            }
            slot.as_ref().and_then(|s| s.open_lane(group, input))
        };
        let Some(lane) = lane else {
            return Err(peer_failure(format!(
                "replication stream to node {target} ended"
            )));
        };
        // An answer may queue behind every request sent before it, and behind a loaded
        // follower's fsync: a lane allows more than one call's deadline for it, and never less
        // than LANE_PATIENCE. Ending a lane on a late answer resends the same entries, which
        // are answered as late again: a learner catching up on a busy machine never did.
        let patience = (ttl * 4).max(LANE_PATIENCE);
        let answers = futures::stream::unfold(Some(lane), move |lane| async move {
            let mut lane = lane?;
            let answer = match lane.sent.recv().await {
                // The input ended and every answer owed came: the lane is done.
                Some(lanes::LaneEvent::Ended) => return None,
                None => Err(peer_failure(format!(
                    "the replication stream to node {target} ended"
                ))),
                Some(lanes::LaneEvent::Failed(failure)) => Err(peer_failure(format!(
                    "sending on the replication stream: {failure}"
                ))),
                Some(lanes::LaneEvent::Sent(cost)) => {
                    match tokio::time::timeout(patience, lane.answers.recv()).await {
                        Err(_) => Err(no_answer(target, patience)),
                        Ok(None) => Err(peer_failure("the replication lane ended early".into())),
                        Ok(Some(Err(failure))) if failure.unreachable => Err(
                            RPCError::Unreachable(Unreachable::from_string(failure.message)),
                        ),
                        Ok(Some(Err(failure))) => Err(peer_failure(failure.message)),
                        Ok(Some(Ok(answer))) => {
                            lane.credits.add_permits(cost as usize);
                            answer.map_err(peer_failure)
                        }
                    }
                }
            };
            let go_on = matches!(answer, Ok(Ok(_)));
            Some((answer, go_on.then_some(lane)))
        });
        Ok(Box::pin(answers))
    }
}

/// The least time a snapshot's stream may go without progress (a piece taken or spooled;
/// the leader waits longer when openraft's `install_snapshot_timeout` says so), and the
/// wait for its last answer (given once the follower installed the whole snapshot into its
/// files). A stalled stream starts the whole snapshot again, so these are generous: a loaded
/// follower writing a large snapshot otherwise never finishes one.
pub(crate) const SNAPSHOT_STALL_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);
const SNAPSHOT_INSTALL_PATIENCE: std::time::Duration = std::time::Duration::from_secs(300);

/// Snapshot pieces a leader sends ahead of what the follower has spooled.
const SNAPSHOT_WINDOW: u64 = 4;

/// The least time a replication lane waits for an answer it is owed (heartbeats go apart,
/// so a slow lane delays only that follower's progress).
const LANE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

fn no_answer(to: NodeId, ttl: std::time::Duration) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::from_string(format!(
        "peer {to}: no answer in {ttl:?}"
    )))
}

fn rpc_error(e: NetError) -> RPCError<TypeConfig> {
    match e {
        NetError::Connect { .. } | NetError::LinkCut { .. } | NetError::UnknownPeer(_) => {
            RPCError::Unreachable(Unreachable::new(&e))
        }
        e => RPCError::Network(NetworkError::new(&e)),
    }
}

fn peer_failure(message: String) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&PeerFailure(message)))
}

impl<T: Transport> Router<T> {
    /// Sends a vote or pre-vote request.
    async fn vote_call(
        &self,
        target: NodeId,
        request: PeerRequest,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.raft_call(target, request, option.hard_ttl()).await? {
            PeerResponse::Vote(r) => Ok(r),
            _ => Err(unexpected()),
        }
    }
}

impl<T: Transport> Router<T> {
    /// The error a follower answered on a snapshot stream among the answers not read yet,
    /// if it sent one before the stream ended (waiting at most a second for them).
    async fn refusal_in(receiver: &mut ferry_net::StreamReceiver) -> Option<RPCError<TypeConfig>> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, receiver.recv()).await {
            if let Ok(PeerResponse::Error(e)) = Self::decode_response(&frame) {
                return Some(peer_failure(e));
            }
        }
        None
    }
}

/// A snapshot that could not be read for sending.
fn snapshot_failure(e: &dyn std::fmt::Display) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&PeerFailure(format!(
        "reading the snapshot to send: {e}"
    ))))
}

fn unexpected() -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&PeerFailure(
        "unexpected peer response".into(),
    )))
}

impl<T: Transport> GroupRouter<TypeConfig, GroupId> for Router<T> {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &self,
        target: NodeId,
        group: GroupId,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self
            .raft_call(
                target,
                PeerRequest::AppendEntries { group, rpc },
                option.hard_ttl(),
            )
            .await?
        {
            PeerResponse::AppendEntries(r) => Ok(r),
            _ => Err(unexpected()),
        }
    }

    async fn transfer_leader(
        &self,
        target: NodeId,
        group: GroupId,
        rpc: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self
            .raft_call(
                target,
                PeerRequest::TransferLeader { group, rpc },
                option.hard_ttl(),
            )
            .await?
        {
            PeerResponse::TransferredLeader(r) => Ok(r),
            _ => Err(unexpected()),
        }
    }

    async fn vote(
        &self,
        target: NodeId,
        group: GroupId,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.vote_call(target, PeerRequest::Vote { group, rpc }, option)
            .await
    }

    async fn pre_vote(
        &self,
        target: NodeId,
        group: GroupId,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.vote_call(target, PeerRequest::PreVote { group, rpc }, option)
            .await
    }

    async fn full_snapshot(
        &self,
        target: NodeId,
        group: GroupId,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        // The data goes on one stream, in pieces as it is read, at most SNAPSHOT_WINDOW pieces
        // ahead of what the follower spooled: a snapshot of any size is never whole in memory
        // on either side. One stream rather than a call per piece: quinn keeps a finished
        // stream's receive state for reuse, its reassembly bookkeeping grown with the piece it
        // carried, in each of a connection's 4,096 stream slots (29 MiB at the peak of a
        // learner of a 2 GiB partition).
        let transfer: u64 = rand::random();
        let group_for_log = group.clone();
        let chunk = self.snapshot_chunk;
        let meta = snapshot.meta;
        let patience = (option.hard_ttl() * 10).max(SNAPSHOT_STALL_PATIENCE);
        let started = std::time::Instant::now();
        let sent = Arc::new(AtomicU64::new(0));
        let progress = sent.clone();
        // Partition groups' snapshots only: the metadata group's are small and whole.
        let counted = group != crate::META_GROUP;
        let stats = self.snapshot_stats.clone();
        let failures = self.snapshot_stats.clone();
        let send_all = async move {
            // File reads: off the async workers. The data holds itself to its total.
            let (total, mut data) = tokio::task::spawn_blocking(move || {
                let mut data = snapshot.snapshot;
                (data.total(), data)
            })
            .await
            .map_err(|e| snapshot_failure(&e))?;
            let total = total.map_err(|e| snapshot_failure(&e))?;
            let request = PeerRequest::SnapshotStream {
                group: group.clone(),
                transfer,
                total,
                vote,
                meta,
            };
            let request = Self::encode_request(&request)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
            let ferry_net::PeerStream {
                sender,
                mut receiver,
            } = self
                .transport
                .open_stream(target, request)
                .await
                .map_err(rpc_error)?;
            let window = (chunk as u64).saturating_mul(SNAPSHOT_WINDOW);
            let (mut offset, mut spooled) = (0u64, 0u64);
            loop {
                if offset < total && offset - spooled < window {
                    let (read, back) = tokio::task::spawn_blocking(move || {
                        let read = data.read_chunk(chunk);
                        (read, data)
                    })
                    .await
                    .map_err(|e| snapshot_failure(&e))?;
                    data = back;
                    let piece = read.map_err(|e| snapshot_failure(&e))?;
                    let len = piece.len() as u64;
                    match tokio::time::timeout(patience, sender.send(piece)).await {
                        Err(_) => return Err(no_answer(target, patience)),
                        Ok(Err(e)) => {
                            // A follower that gave up said why before it ended the stream.
                            return Err(Self::refusal_in(&mut receiver)
                                .await
                                .unwrap_or_else(|| rpc_error(e)));
                        }
                        Ok(Ok(())) => {}
                    }
                    offset += len;
                    progress.store(offset, Ordering::Relaxed);
                    continue;
                }
                // The window is full, or everything is sent: the follower's next answer. The
                // last is given once the follower installed the whole snapshot.
                let wait = if offset == total {
                    patience.max(SNAPSHOT_INSTALL_PATIENCE)
                } else {
                    patience
                };
                let frame = match tokio::time::timeout(wait, receiver.recv()).await {
                    Err(_) => return Err(no_answer(target, wait)),
                    Ok(None) => {
                        return Err(peer_failure(format!(
                        "peer {target} ended the snapshot stream after {spooled} of {total} bytes"
                    )))
                    }
                    Ok(Some(Err(e))) => return Err(rpc_error(e)),
                    Ok(Some(Ok(frame))) => frame,
                };
                let answer = Self::decode_response(&frame)
                    .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
                match answer {
                    PeerResponse::Spooled(n) if n <= offset => spooled = n,
                    PeerResponse::Snapshot(r) if offset == total => {
                        tracing::info!(group = %group, target, bytes = total, took = ?started.elapsed(), "snapshot sent and installed");
                        if counted {
                            stats.sent.fetch_add(1, Ordering::Relaxed);
                        }
                        return Ok(r);
                    }
                    PeerResponse::Error(e) => return Err(peer_failure(e)),
                    _ => return Err(unexpected()),
                }
            }
        };
        let group_name = group_for_log;
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            result = send_all => result.inspect_err(|e| {
                if counted {
                    failures.failed.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!(
                    group = %group_name,
                    target,
                    sent = sent.load(Ordering::Relaxed),
                    took = ?started.elapsed(),
                    error = %e,
                    "sending a snapshot failed; openraft starts it again"
                );
            }).map_err(|e| match e {
                RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                RPCError::Timeout(t) => StreamingError::Timeout(t),
                RPCError::Network(n) => StreamingError::Network(n),
                RPCError::RemoteError(r) => StreamingError::Network(NetworkError::new(&r)),
            }),
        }
    }
}

/// Builds one group's Raft network to each target.
#[derive(Clone)]
pub(crate) struct GroupNetwork<T> {
    pub(crate) router: Router<T>,
    pub(crate) group: GroupId,
}

impl<T: Transport> RaftNetworkFactory<TypeConfig> for GroupNetwork<T> {
    type Network = GroupPeer<T>;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Self::Network {
        GroupPeer {
            router: self.router.clone(),
            target,
            group: self.group.clone(),
        }
    }
}

/// One group's Raft network to one target: the shared router's RPCs, with AppendEntries
/// pipelined on a peer stream.
pub(crate) struct GroupPeer<T> {
    router: Router<T>,
    target: NodeId,
    group: GroupId,
}

impl<T: Transport> RaftNetworkV2<TypeConfig> for GroupPeer<T> {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        GroupRouter::append_entries(&self.router, self.target, self.group.clone(), rpc, option)
            .await
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        let opened =
            self.router
                .append_stream(self.target, self.group.clone(), input, option.hard_ttl());
        Box::pin(async move {
            let answers: BoxStream<'s, _> = opened.await?;
            Ok(answers)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        GroupRouter::vote(&self.router, self.target, self.group.clone(), rpc, option).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        GroupRouter::pre_vote(&self.router, self.target, self.group.clone(), rpc, option).await
    }

    async fn transfer_leader(
        &mut self,
        rpc: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        GroupRouter::transfer_leader(&self.router, self.target, self.group.clone(), rpc, option)
            .await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        GroupRouter::full_snapshot(
            &self.router,
            self.target,
            self.group.clone(),
            vote,
            snapshot,
            cancel,
            option,
        )
        .await
    }
}

pub(crate) fn error_response(message: impl Into<String>) -> Bytes {
    encode("peer response", &PeerResponse::Error(message.into())).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ferry_net::MemNetwork;
    use futures::FutureExt;

    use super::*;

    #[tokio::test]
    async fn replication_dials_only_once_openraft_yields_a_request() {
        // Node 2 is not there: dialing it fails at once.
        let network = MemNetwork::new();
        let router = Router::new(network.transport(1), 1024);
        let (requests, input) = futures::channel::mpsc::unbounded();
        let mut call =
            Box::pin(router.append_stream(2, "t/0".to_string(), input, Duration::from_secs(1)));
        // openraft sleeps out its backoff before yielding a request: until then nothing is
        // dialed (so nothing fails and is retried at once, in a loop).
        assert!(
            (&mut call).now_or_never().is_none(),
            "append_stream answered before any request was sent"
        );
        // Once one comes, the dial fails: node 2 is unreachable.
        requests
            .unbounded_send(AppendEntriesRequest {
                vote: openraft::alias::VoteOf::<TypeConfig>::new(1, 1),
                prev_log_id: None,
                entries: Vec::new(),
                leader_commit: None,
            })
            .unwrap();
        match call.await {
            Err(RPCError::Unreachable(_)) => {}
            Err(e) => panic!("expected unreachable, got {e}"),
            Ok(_) => panic!("expected unreachable, got a stream"),
        }
    }
}
