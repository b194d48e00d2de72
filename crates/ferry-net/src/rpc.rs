//! Peer RPC traits and options shared by the QUIC and in-memory transports.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::{LinkFaults, NetError, NodeId, PeerStream, DEFAULT_MAX_FRAME};

/// Answers peer requests. Implemented by the node.
pub trait RpcHandler: Send + Sync + 'static {
    /// Handles one request from node `from` and produces the reply bytes.
    fn handle(&self, from: NodeId, request: Bytes) -> BoxFuture<'static, Bytes>;

    /// Serves a stream node `from` opened with `request` ([`Transport::open_stream`]):
    /// reads its frames from `stream.receiver`, answers on `stream.sender`, and ends it by
    /// returning. The default ends every stream at once.
    fn handle_stream(
        &self,
        from: NodeId,
        request: Bytes,
        stream: PeerStream,
    ) -> BoxFuture<'static, ()> {
        let _ = (from, request, stream);
        Box::pin(async {})
    }
}

/// Sends one request to a peer and waits for its reply. Two implementations:
/// QUIC ([`crate::QuicTransport`]) and in-memory ([`crate::MemTransport`]).
pub trait Transport: Clone + Send + Sync + 'static {
    /// Sends `request` to node `to` and returns its reply. Never retries.
    fn call(
        &self,
        to: NodeId,
        request: Bytes,
    ) -> impl Future<Output = Result<Bytes, NetError>> + Send;

    /// Sends `request` to whichever node listens at `addr` (its certificate
    /// must chain to the cluster CA, as for [`Transport::call`]) and returns
    /// its reply. Used where only an address is known (gossip seeds, nodes of
    /// other regions). The callee still learns the caller's `NodeId`. Never
    /// retries; connection failures are [`NetError::ConnectAddr`].
    fn call_addr(
        &self,
        addr: SocketAddr,
        request: Bytes,
    ) -> impl Future<Output = Result<Bytes, NetError>> + Send;

    /// Opens a stream to node `to`, announced by `request` (the peer's
    /// [`RpcHandler::handle_stream`] sees it first). Returns once the stream is open, without
    /// waiting for the peer: a refusal arrives as the receiver's first item. Never retries.
    fn open_stream(
        &self,
        to: NodeId,
        request: Bytes,
    ) -> impl Future<Output = Result<PeerStream, NetError>> + Send;

    /// Learns (or updates) the address of node `id`, for a region whose membership changed.
    /// Transports that find nodes by other means ignore it.
    fn set_peer(&self, id: NodeId, addr: SocketAddr) {
        let _ = (id, addr);
    }

    /// The fault injection this transport applies (cut and shaped links, and the count of
    /// faults injected), if any.
    fn link_faults(&self) -> Option<&LinkFaults> {
        None
    }

    /// What this node's connection to node `to` has received so far; None when no connection
    /// is open or the transport cannot tell. A sample that changes between two looks means
    /// packets came from the peer (answers, acknowledgements): its process runs and its
    /// network stack is served, however slow its application is to answer.
    fn received_from(&self, to: NodeId) -> Option<Received> {
        let _ = to;
        None
    }
}

/// A sample of what one connection has received ([`Transport::received_from`]): compare two
/// samples to learn whether anything arrived between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Identifies the connection (a redial makes a new one).
    pub connection: usize,
    /// UDP datagrams received on it.
    pub datagrams: u64,
}

/// Tuning (and fault injection) for [`crate::QuicTransport`].
#[derive(Clone, Debug)]
pub struct TransportOptions {
    /// Deadline for establishing a connection (handshake included).
    pub connect_timeout: Duration,
    /// Deadline for one whole call (connect if needed, send, receive reply).
    pub request_timeout: Duration,
    /// Maximum request / response payload size.
    pub max_frame: usize,
    /// First reconnect backoff after a failed dial.
    pub backoff_initial: Duration,
    /// Upper bound for the (doubling) reconnect backoff.
    pub backoff_max: Duration,
    /// Cut and shaped links (fault injection): calls to a cut address fail at once, calls
    /// over a shaped link are delayed, dropped or duplicated ([`crate::LinkShape`]). Pass
    /// the same object to [`crate::serve`] so requests from cut peers are refused too.
    /// Default: nothing cut or shaped.
    pub faults: LinkFaults,
}

impl Default for TransportOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            max_frame: DEFAULT_MAX_FRAME,
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            faults: LinkFaults::default(),
        }
    }
}
