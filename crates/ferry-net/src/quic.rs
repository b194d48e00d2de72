//! Peer RPC over QUIC: the dialing side ([`QuicTransport`]) and the accept
//! loop ([`serve`]) that dispatches connections by ALPN.

mod server;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{timeout, Instant};

pub use server::{bind_endpoint, serve};

use crate::faults::{faulted_call, LINK_CUT_REASON};
use crate::framing::{read_frame, write_frame_parts};
use crate::stream::{frame_queue, pump_quic, receive_queue, StreamLink};
use crate::{NetError, NodeId, PeerStream, Transport, TransportOptions, NODE_SERVER_NAME};

/// Response status byte: the body is the handler's reply.
pub(crate) const STATUS_OK: u8 = 0;
/// Response status byte: the body is a UTF-8 error message.
pub(crate) const STATUS_ERR: u8 = 1;
/// Bytes of the request header: the caller's `NodeId` (u64 BE) and the request kind.
pub(crate) const REQUEST_HEADER: usize = 9;
/// Request kind: one request, one reply.
pub(crate) const KIND_CALL: u8 = 0;
/// Request kind: the request opens a stream of frames each way.
pub(crate) const KIND_STREAM: u8 = 1;

/// One QUIC connection per peer (lazily dialed, shared by all callers and
/// all Raft groups; redialed with exponential backoff after failure: while in
/// backoff, calls fail fast with [`NetError::Connect`] rather than
/// hammering). Each call uses its own bidirectional stream.
///
/// Calls by address ([`Transport::call_addr`]) work the same way, with their
/// own connection slot per address (created on first use, kept afterwards).
/// Before every call the transport consults [`TransportOptions::faults`]: a
/// call to a cut address fails at once without dialing.
#[derive(Clone)]
pub struct QuicTransport {
    inner: Arc<Inner>,
}

struct Inner {
    self_id: NodeId,
    endpoint: quinn::Endpoint,
    client_cfg: quinn::ClientConfig,
    opts: TransportOptions,
    peers: Mutex<HashMap<NodeId, Arc<PeerSlot>>>,
    /// Slots for [`Transport::call_addr`], keyed by address.
    by_addr: Mutex<HashMap<SocketAddr, Arc<PeerSlot>>>,
}

/// Who a call goes to: a configured peer, or whichever node listens at an
/// address. Names the callee in errors and logs.
#[derive(Clone, Copy, Debug)]
enum Target {
    Node(NodeId),
    Addr(SocketAddr),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Node(id) => write!(f, "node {id}"),
            Target::Addr(addr) => write!(f, "node at {addr}"),
        }
    }
}

impl Target {
    /// The connect error for this target, dialed at `addr`.
    fn connect_error(self, addr: SocketAddr, reason: String) -> NetError {
        match self {
            Target::Node(peer) => NetError::Connect {
                peer,
                addr: addr.to_string(),
                reason,
            },
            Target::Addr(addr) => NetError::ConnectAddr { addr, reason },
        }
    }
}

/// Connection state for one peer address.
struct PeerSlot {
    addr: SocketAddr,
    conn: Mutex<Option<quinn::Connection>>,
    dial: tokio::sync::Mutex<DialState>,
}

struct DialState {
    backoff: Duration,
    retry_at: Option<Instant>,
    last_error: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another caller panicked; the data is plain.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Application close code for connections closed because their link was cut.
const CLOSE_LINK_CUT: u32 = 3;

impl PeerSlot {
    fn new(addr: SocketAddr, opts: &TransportOptions) -> Self {
        Self {
            addr,
            conn: Mutex::new(None),
            dial: tokio::sync::Mutex::new(DialState {
                backoff: opts.backoff_initial,
                retry_at: None,
                last_error: String::new(),
            }),
        }
    }

    /// The cached connection if it is still open.
    fn live(&self) -> Option<quinn::Connection> {
        let mut guard = lock(&self.conn);
        match guard.as_ref() {
            Some(c) if c.close_reason().is_none() => Some(c.clone()),
            Some(_) => {
                *guard = None;
                None
            }
            None => None,
        }
    }

    /// Drops the cached connection if it is `conn`.
    fn forget(&self, conn: &quinn::Connection) {
        let mut guard = lock(&self.conn);
        if guard.as_ref().map(|c| c.stable_id()) == Some(conn.stable_id()) {
            *guard = None;
        }
    }

    /// Closes and drops the cached connection, if any (its link was cut).
    fn close_cut(&self) {
        if let Some(conn) = lock(&self.conn).take() {
            tracing::debug!(addr = %self.addr, "closing connection over a cut link");
            conn.close(
                quinn::VarInt::from_u32(CLOSE_LINK_CUT),
                LINK_CUT_REASON.as_bytes(),
            );
        }
    }
}

impl QuicTransport {
    /// Creates a transport for node `self_id` dialing from `endpoint` with
    /// `client_cfg` (built with [`crate::ALPN_PEER`]). Nothing is dialed
    /// until the first call to a peer.
    pub fn new(
        self_id: NodeId,
        endpoint: quinn::Endpoint,
        client_cfg: quinn::ClientConfig,
        peers: HashMap<NodeId, SocketAddr>,
        opts: TransportOptions,
    ) -> Self {
        let peers = peers
            .into_iter()
            .map(|(id, addr)| (id, Arc::new(PeerSlot::new(addr, &opts))))
            .collect();
        Self {
            inner: Arc::new(Inner {
                self_id,
                endpoint,
                client_cfg,
                opts,
                peers: Mutex::new(peers),
                by_addr: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Adds or updates a peer's address. A changed address drops the cached
    /// connection and backoff state for that peer.
    pub fn set_peer(&self, id: NodeId, addr: SocketAddr) {
        let mut peers = lock(&self.inner.peers);
        if peers.get(&id).is_some_and(|s| s.addr == addr) {
            return;
        }
        tracing::debug!(peer = id, %addr, "peer address set");
        peers.insert(id, Arc::new(PeerSlot::new(addr, &self.inner.opts)));
    }

    /// The connection slot for `target` (an address slot is created on first use).
    fn slot(&self, target: Target) -> Result<Arc<PeerSlot>, NetError> {
        match target {
            Target::Node(id) => lock(&self.inner.peers)
                .get(&id)
                .cloned()
                .ok_or(NetError::UnknownPeer(id)),
            Target::Addr(addr) => Ok(lock(&self.inner.by_addr)
                .entry(addr)
                .or_insert_with(|| Arc::new(PeerSlot::new(addr, &self.inner.opts)))
                .clone()),
        }
    }

    /// Fails if the link to `slot`'s address is cut, closing every cached
    /// connection to that address (by id or by address). Leaves the dial
    /// backoff alone, so a healed link is dialed again right away.
    fn check_link(&self, target: Target, slot: &PeerSlot) -> Result<(), NetError> {
        let addr = slot.addr;
        if !self.inner.opts.faults.is_cut(addr) {
            return Ok(());
        }
        let mut cut: Vec<Arc<PeerSlot>> = lock(&self.inner.peers)
            .values()
            .filter(|s| s.addr == addr)
            .cloned()
            .collect();
        cut.extend(lock(&self.inner.by_addr).get(&addr).cloned());
        for s in cut {
            s.close_cut();
        }
        Err(target.connect_error(addr, LINK_CUT_REASON.to_string()))
    }

    /// Returns an open connection to `target` (at `slot`), dialing if needed.
    /// The flag tells whether it was freshly dialed.
    async fn connection(
        &self,
        target: Target,
        slot: &PeerSlot,
    ) -> Result<(quinn::Connection, bool), NetError> {
        if let Some(c) = slot.live() {
            return Ok((c, false));
        }
        let mut dial = slot.dial.lock().await;
        if let Some(c) = slot.live() {
            return Ok((c, false)); // another caller dialed while we waited
        }
        let connect_err = |reason: String| target.connect_error(slot.addr, reason);
        let now = Instant::now();
        if let Some(at) = dial.retry_at.filter(|at| now < *at) {
            return Err(connect_err(format!(
                "in reconnect backoff for another {:?} after: {}",
                at - now,
                dial.last_error
            )));
        }
        let opts = &self.inner.opts;
        // A node dialed by id must present a certificate naming that id: after a node is
        // replaced at the same address, calls meant for the old one must not reach the new
        // one (it would answer for a Raft log it never held).
        let server_name = match target {
            Target::Node(id) => crate::node_identity_name(id),
            Target::Addr(_) => NODE_SERVER_NAME.to_string(),
        };
        let attempt = async {
            let connecting = self
                .inner
                .endpoint
                .connect_with(self.inner.client_cfg.clone(), slot.addr, &server_name)
                .map_err(|e| e.to_string())?;
            connecting.await.map_err(|e| e.to_string())
        };
        let result = match timeout(opts.connect_timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "handshake timed out after {:?}",
                opts.connect_timeout
            )),
        };
        match result {
            Ok(conn) => {
                tracing::debug!(peer = %target, addr = %slot.addr, "connected to peer");
                dial.backoff = opts.backoff_initial;
                dial.retry_at = None;
                *lock(&slot.conn) = Some(conn.clone());
                Ok((conn, true))
            }
            Err(reason) => {
                tracing::debug!(peer = %target, addr = %slot.addr, %reason, backoff = ?dial.backoff, "dial failed");
                dial.retry_at = Some(Instant::now() + dial.backoff);
                dial.backoff = (dial.backoff * 2).min(opts.backoff_max);
                dial.last_error = reason.clone();
                Err(connect_err(reason))
            }
        }
    }

    /// The connection slot for a request to `target`, once the request's size and the link
    /// are found fine.
    fn checked_slot(&self, target: Target, request: &[u8]) -> Result<Arc<PeerSlot>, NetError> {
        let max = self.inner.opts.max_frame;
        if request.len() > max {
            return Err(NetError::FrameTooLarge {
                len: request.len(),
                max,
            });
        }
        let slot = self.slot(target)?;
        self.check_link(target, &slot)?;
        Ok(slot)
    }

    /// One call to `target`: size check, link check, then connect + exchange
    /// under the request timeout. Shared by [`Transport::call`] and
    /// [`Transport::call_addr`].
    /// On a shaped link the call goes through [`faulted_call`] (delays, lost requests and
    /// replies, duplicates), as on the in-memory transport.
    async fn call_target(
        &self,
        target: Target,
        request: Bytes,
        after: Duration,
    ) -> Result<Bytes, NetError> {
        let slot = self.checked_slot(target, &request)?;
        let faults = &self.inner.opts.faults;
        if let Some(plan) = faults.plan_call(slot.addr) {
            let transport = self.clone();
            let send = move || {
                let (transport, slot, request) = (transport.clone(), slot.clone(), request.clone());
                async move { transport.call_inner(target, &slot, request).await }
            };
            return faulted_call(faults, plan, target, after, send).await;
        }
        match timeout(after, self.call_inner(target, &slot, request)).await {
            Ok(r) => r,
            Err(_) => Err(NetError::Timeout {
                what: format!("calling {target}"),
                after,
            }),
        }
    }

    async fn call_inner(
        &self,
        target: Target,
        slot: &PeerSlot,
        request: Bytes,
    ) -> Result<Bytes, NetError> {
        let (conn, send, recv) = self.open_bi(target, slot).await?;
        let result = self.exchange(send, recv, &request).await;
        if conn.close_reason().is_some() {
            slot.forget(&conn);
        }
        result
    }

    /// Opens a bidirectional stream to `target`. Retries once if a cached connection turns
    /// out to be dead (opening the stream failed, so nothing was delivered).
    async fn open_bi(
        &self,
        target: Target,
        slot: &PeerSlot,
    ) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), NetError> {
        for attempt in 0..2 {
            let (conn, fresh) = self.connection(target, slot).await?;
            match conn.open_bi().await {
                Ok((send, recv)) => return Ok((conn, send, recv)),
                Err(e) => {
                    slot.forget(&conn);
                    if fresh || attempt == 1 {
                        return Err(NetError::Closed(format!("opening stream to {target}: {e}")));
                    }
                    tracing::debug!(peer = %target, error = %e, "cached connection dead, redialing");
                }
            }
        }
        Err(NetError::Closed(format!(
            "no usable connection to {target}"
        )))
    }

    /// Opens a peer stream to `target` announced by `request`: writes the request, then
    /// pumps frames both ways. The peer's first frame is its status (accepted, or why not).
    async fn open_target_stream(
        &self,
        target: Target,
        request: Bytes,
    ) -> Result<PeerStream, NetError> {
        let max = self.inner.opts.max_frame;
        let slot = self.checked_slot(target, &request)?;
        let after = self.inner.opts.request_timeout;
        let open = async {
            let (_, mut send, recv) = self.open_bi(target, &slot).await?;
            let from = self.inner.self_id.to_be_bytes();
            write_frame_parts(&mut send, &[&from, &[KIND_STREAM], &request]).await?;
            Ok::<_, NetError>((send, recv))
        };
        let (send, recv) = match timeout(after, open).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(NetError::Timeout {
                    what: format!("opening a stream to {target}"),
                    after,
                })
            }
        };
        let link = StreamLink {
            faults: self.inner.opts.faults.clone(),
            peer: slot.addr,
            shaped: true,
        };
        let (sender, outgoing) = frame_queue(max);
        let (incoming, receiver) = receive_queue(Some(link.clone()));
        pump_quic(send, recv, outgoing, incoming, max + 1, link, true);
        Ok(PeerStream { sender, receiver })
    }

    async fn exchange(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        request: &[u8],
    ) -> Result<Bytes, NetError> {
        let from = self.inner.self_id.to_be_bytes();
        let max = self.inner.opts.max_frame + 1;
        let written = match write_frame_parts(&mut send, &[&from, &[KIND_CALL], request]).await {
            Ok(()) => send
                .finish()
                .map_err(|e| NetError::Closed(format!("finishing request stream: {e}"))),
            Err(e) => Err(e),
        };
        if let Err(write_err) = written {
            // The server may have rejected the request (e.g. too large) and
            // stopped our stream after replying; prefer its explanation.
            return match read_frame(&mut recv, max).await {
                Ok(Some(frame)) => parse_reply(frame),
                _ => Err(write_err),
            };
        }
        let frame = read_frame(&mut recv, max)
            .await?
            .ok_or_else(|| NetError::Protocol("peer closed the stream without a reply".into()))?;
        parse_reply(frame)
    }
}

pub(crate) fn parse_reply(frame: Bytes) -> Result<Bytes, NetError> {
    match frame.first() {
        Some(&STATUS_OK) => Ok(frame.slice(1..)),
        Some(&STATUS_ERR) => Err(NetError::Remote(
            String::from_utf8_lossy(&frame[1..]).into_owned(),
        )),
        Some(other) => Err(NetError::Protocol(format!(
            "unknown reply status byte {other}"
        ))),
        None => Err(NetError::Protocol("empty reply frame".into())),
    }
}

impl Transport for QuicTransport {
    async fn call(&self, to: NodeId, request: Bytes) -> Result<Bytes, NetError> {
        let after = self.inner.opts.request_timeout;
        self.call_target(Target::Node(to), request, after).await
    }

    async fn call_addr(&self, addr: SocketAddr, request: Bytes) -> Result<Bytes, NetError> {
        let after = self.inner.opts.request_timeout;
        self.call_target(Target::Addr(addr), request, after).await
    }

    fn link_faults(&self) -> Option<&crate::LinkFaults> {
        Some(&self.inner.opts.faults)
    }

    fn set_peer(&self, id: NodeId, addr: SocketAddr) {
        QuicTransport::set_peer(self, id, addr);
    }

    fn received_from(&self, to: NodeId) -> Option<crate::Received> {
        let slot = lock(&self.inner.peers).get(&to).cloned()?;
        let conn = slot.live()?;
        Some(crate::Received {
            connection: conn.stable_id(),
            datagrams: conn.stats().udp_rx.datagrams,
        })
    }

    async fn open_stream(&self, to: NodeId, request: Bytes) -> Result<PeerStream, NetError> {
        self.open_target_stream(Target::Node(to), request).await
    }
}
