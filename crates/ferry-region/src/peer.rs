//! Node ↔ node messages and the Raft network over any [`Transport`]: every group's RPCs to a
//! peer share that peer's one connection, each message tagged with its group id
//! (openraft-multi's [`GroupRouter`]). Replication is pipelined: a group's AppendEntries to
//! one follower travel on one peer stream ([`PeerRequest::AppendStream`]), each request sent
//! without waiting for the answer to the one before, the answers coming back in order.

use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use ferry_net::{NetError, PeerStream, Transport};
use ferry_proto::wire::{ClientRequest, ClientResponse};
use ferry_proto::NodeId;
use ferry_store::{GroupId, SnapshotData, TypeConfig};
use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, VoteRequest,
    VoteResponse,
};
use openraft::storage::RaftStateMachine;
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::{BasicNode, Raft};
use openraft_multi::GroupRouter;
use serde::{Deserialize, Serialize};

use crate::command::{decode, decode_shared, encode};

/// A request from one node to another.
#[derive(Serialize, Deserialize)]
pub(crate) enum PeerRequest {
    AppendEntries {
        group: GroupId,
        rpc: AppendEntriesRequest<TypeConfig>,
    },
    /// Opens a peer stream of AppendEntries requests for one group (each frame one
    /// `AppendEntriesRequest`), answered in order by [`AppendReply`] frames.
    AppendStream { group: GroupId },
    Vote {
        group: GroupId,
        rpc: VoteRequest<TypeConfig>,
    },
    PreVote {
        group: GroupId,
        rpc: VoteRequest<TypeConfig>,
    },
    /// One piece of a snapshot, sent in order; the last one installs it.
    SnapshotChunk {
        group: GroupId,
        /// Identifies one transfer; a new one replaces an unfinished one.
        transfer: u64,
        /// Where this piece starts in the snapshot data.
        offset: u64,
        /// Length of the whole snapshot data.
        total: u64,
        vote: VoteOf<TypeConfig>,
        meta: SnapshotMetaOf<TypeConfig>,
        data: Bytes,
    },
    /// A client request forwarded to the leader that can serve it (never forwarded again).
    Client(ClientRequest),
    /// A gossip message from the node whose gossip address is `from`.
    Gossip { from: SocketAddr, message: Bytes },
    /// A batch forwarded from another region.
    Forward(ForwardRequest),
    /// The forwarders this node runs, for `ferry ctl regions`.
    ForwardingStatus,
    /// Another region forwards this integration or notification topic to `region`: create
    /// it there if it does not exist, and answer its partition count there. Nodes of other
    /// regions relay it as they relay forwarded batches (`via`).
    EnsureTopic {
        config: ferry_proto::TopicConfig,
        region: String,
        /// The regions it passed through so far, its origin first.
        via: Vec<String>,
    },
}

/// A batch of one source partition for one destination region.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ForwardRequest {
    pub(crate) origin_region: String,
    pub(crate) target_region: String,
    pub(crate) topic: String,
    /// The source partition.
    pub(crate) partition: u32,
    /// The destination partition (the source partition when both regions have the topic
    /// with one partition count; else the events' keys were routed to it).
    pub(crate) dest_partition: u32,
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
    /// A snapshot piece was stored; send the next.
    ChunkAccepted,
    Client(ClientResponse),
    /// A gossip message was taken.
    Done,
    /// A forwarded batch is committed in the target region (or refused after a gap).
    Forwarded(ferry_router::Ack),
    /// The forwarders a node runs.
    ForwardingStatus(Vec<ferry_proto::wire::ForwardingInfo>),
    /// The topic's partition count in the answering region.
    TopicPartitions(u32),
    /// The peer could not serve the request (unknown group, shutting down, bad frame).
    Error(String),
    /// A relay found no way on to the target region: the sender may try another route.
    Unreachable(String),
}

/// One answer on an AppendEntries stream: openraft's result, or why the follower's Raft
/// could not answer (it stopped, or does not host the group); either error ends the stream.
pub(crate) type AppendReply = Result<StreamAppendResult<TypeConfig>, String>;

/// Sends peer requests over a transport.
#[derive(Clone)]
pub struct Router<T> {
    transport: T,
    snapshot_chunk: usize,
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
        }
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
            PeerResponse::Client(response) => Ok(response),
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

    /// Sends `group`'s AppendEntries requests from `input` to `target` on one peer stream
    /// without waiting between them; yields the answers in order. Waiting longer than four
    /// `ttl`s for an answer that is owed, or any failure, ends the stream with an error.
    async fn append_stream<S>(
        &self,
        target: NodeId,
        group: GroupId,
        mut input: S,
        ttl: std::time::Duration,
    ) -> Result<
        BoxStream<'static, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
        RPCError<TypeConfig>,
    >
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        let opening = Self::encode_request(&PeerRequest::AppendStream { group })
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let PeerStream { sender, receiver } = self
            .transport
            .open_stream(target, opening)
            .await
            .map_err(rpc_error)?;
        // The writer tells the reader about each request that went out, so the reader waits
        // with a deadline only for answers that are owed and ends after the last one; a
        // request the writer could not send ends the answers with its error, after those
        // owed before it.
        let (sent_tx, sent_rx) = tokio::sync::mpsc::unbounded_channel::<Result<(), String>>();
        let writer = tokio::spawn(async move {
            while let Some(rpc) = input.next().await {
                let sent = match encode("append entries", &rpc) {
                    Ok(frame) => sender.send(frame).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                let failed = sent.is_err();
                if sent_tx.send(sent).is_err() || failed {
                    return;
                }
            }
        });
        let state = AnswerState {
            receiver,
            sent: sent_rx,
            _writer: AbortOnDrop(writer.abort_handle()),
        };
        // An answer may queue behind every request sent before it, so a stream allows more
        // than one call's deadline for it (still well inside an election timeout).
        let patience = ttl * 4;
        let answers = futures::stream::unfold(Some(state), move |state| async move {
            let mut state = state?;
            let answer = match state.sent.recv().await? {
                Err(failure) => Err(peer_failure(format!(
                    "sending on the append stream: {failure}"
                ))),
                Ok(()) => match tokio::time::timeout(patience, state.receiver.recv()).await {
                    Err(_) => Err(no_answer(target, patience)),
                    Ok(None) => Err(peer_failure("the append stream ended early".into())),
                    Ok(Some(Err(e))) => Err(rpc_error(e)),
                    Ok(Some(Ok(frame))) => match decode::<AppendReply>("append reply", &frame) {
                        Ok(Ok(result)) => Ok(result),
                        Ok(Err(failure)) => Err(peer_failure(failure)),
                        Err(e) => Err(peer_failure(e.to_string())),
                    },
                },
            };
            let go_on = matches!(answer, Ok(Ok(_)));
            Some((answer, go_on.then_some(state)))
        });
        Ok(Box::pin(answers))
    }
}

/// The reading side of an AppendEntries stream.
struct AnswerState {
    receiver: ferry_net::StreamReceiver,
    sent: tokio::sync::mpsc::UnboundedReceiver<Result<(), String>>,
    _writer: AbortOnDrop,
}

/// Stops the stream's writer when its answers are no longer read.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

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

/// Answers an AppendEntries stream a leader opened: feeds its requests to `raft` in order
/// and writes openraft's answers back in the same order, until either side ends.
pub(crate) async fn serve_append_stream<SM>(raft: Raft<TypeConfig, SM>, stream: PeerStream)
where
    SM: RaftStateMachine<TypeConfig>,
{
    let PeerStream { sender, receiver } = stream;
    let requests = futures::stream::unfold(receiver, |mut receiver| async move {
        match receiver.recv().await? {
            Ok(frame) => {
                match decode_shared::<AppendEntriesRequest<TypeConfig>>("append entries", &frame) {
                    Ok(rpc) => Some((rpc, receiver)),
                    Err(e) => {
                        tracing::warn!(error = %e, "bad frame on an append stream");
                        None
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "append stream ended");
                None
            }
        }
    });
    let mut answers = std::pin::pin!(raft.stream_append(requests));
    while let Some(answer) = answers.next().await {
        let reply: AppendReply = answer.map_err(|fatal| fatal.to_string());
        let last = !matches!(reply, Ok(Ok(_)));
        let Ok(frame) = encode("append reply", &reply) else {
            return;
        };
        if sender.send(frame).await.is_err() || last {
            return;
        }
    }
}

/// Refuses an AppendEntries stream with `reason` (the leader sees it as a network error).
pub(crate) async fn refuse_append_stream(stream: PeerStream, reason: String) {
    let reply: AppendReply = Err(reason);
    if let Ok(frame) = encode("append reply", &reply) {
        let _ = stream.sender.send(frame).await;
    }
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
        // Send the data in pieces, so a snapshot of any size fits the peer frame limit.
        let transfer: u64 = rand::random();
        let data = snapshot.snapshot;
        let total = data.len() as u64;
        let ttl = option.hard_ttl() * 10;
        let send_all = async {
            let mut offset = 0usize;
            loop {
                let end = (offset + self.snapshot_chunk).min(data.len());
                let request = PeerRequest::SnapshotChunk {
                    group: group.clone(),
                    transfer,
                    offset: offset as u64,
                    total,
                    vote,
                    meta: snapshot.meta.clone(),
                    data: data.slice(offset..end),
                };
                match self.raft_call(target, request, ttl).await? {
                    PeerResponse::ChunkAccepted if end < data.len() => offset = end,
                    PeerResponse::Snapshot(r) if end == data.len() => return Ok(r),
                    _ => return Err(unexpected()),
                }
            }
        };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            result = send_all => result.map_err(|e| match e {
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
