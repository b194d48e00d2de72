//! Node ↔ node messages and the Raft network over any [`Transport`]: every group's RPCs to a
//! peer share that peer's one connection, each message tagged with its group id
//! (openraft-multi's [`GroupRouter`]).

use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use ferry_net::{NetError, Transport};
use ferry_proto::wire::{ClientRequest, ClientResponse};
use ferry_proto::NodeId;
use ferry_store::{GroupId, SnapshotData, TypeConfig};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::BasicNode;
use openraft_multi::{GroupNetworkAdapter, GroupRouter};
use serde::{Deserialize, Serialize};

use crate::command::{decode, encode};

/// A request from one node to another.
#[derive(Serialize, Deserialize)]
pub(crate) enum PeerRequest {
    AppendEntries {
        group: GroupId,
        rpc: AppendEntriesRequest<TypeConfig>,
    },
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
}

/// A batch of one source partition for one destination region.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ForwardRequest {
    pub(crate) origin_region: String,
    pub(crate) target_region: String,
    pub(crate) topic: String,
    pub(crate) partition: u32,
    pub(crate) batch: ferry_router::Batch,
    /// How many more regions may relay it (loop prevention: one relay at most).
    pub(crate) relays_left: u8,
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
    /// The peer could not serve the request (unknown group, shutting down, bad frame).
    Error(String),
}

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
            Err(_) => Err(RPCError::Unreachable(Unreachable::from_string(format!(
                "peer {to}: no answer in {ttl:?}"
            )))),
            Ok(Err(
                e
                @ (NetError::Connect { .. } | NetError::LinkCut { .. } | NetError::UnknownPeer(_)),
            )) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Ok(Err(e)) => Err(RPCError::Network(NetworkError::new(&e))),
            Ok(Ok(PeerResponse::Error(e))) => {
                Err(RPCError::Network(NetworkError::new(&PeerFailure(e))))
            }
            Ok(Ok(response)) => Ok(response),
        }
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

/// Builds one group's Raft network: an adapter binding (target, group) to the shared router.
#[derive(Clone)]
pub(crate) struct GroupNetwork<T> {
    pub(crate) router: Router<T>,
    pub(crate) group: GroupId,
}

impl<T: Transport> RaftNetworkFactory<TypeConfig> for GroupNetwork<T> {
    type Network = GroupNetworkAdapter<TypeConfig, GroupId, Router<T>>;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Self::Network {
        GroupNetworkAdapter::new(self.router.clone(), target, self.group.clone())
    }
}

pub(crate) fn error_response(message: impl Into<String>) -> Bytes {
    encode("peer response", &PeerResponse::Error(message.into())).unwrap_or_default()
}
