//! In-memory peer network for tests: same [`Transport`] trait as QUIC, with
//! nodes that can be killed and links that can be cut and healed, and the same
//! [`crate::LinkFaults`] (cuts, shaped links) honoured the same way.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::faults::{faulted_call, LINK_CUT_REASON};
use crate::stream::{frame_queue, receive_queue, Arrivals};
use crate::{
    NetError, NodeId, PeerStream, RpcHandler, Transport, TransportOptions, DEFAULT_MAX_FRAME,
};

/// A simulated network of nodes identified by [`NodeId`]. Cheap to clone;
/// clones share state.
#[derive(Clone, Default)]
pub struct MemNetwork {
    state: Arc<Mutex<MemState>>,
}

#[derive(Default)]
struct MemState {
    handlers: HashMap<NodeId, Arc<dyn RpcHandler>>,
    /// Cut links, stored as (min, max).
    cuts: HashSet<(NodeId, NodeId)>,
    isolated: HashSet<NodeId>,
    /// Simulated listen addresses, for [`Transport::call_addr`].
    addresses: HashMap<SocketAddr, NodeId>,
}

impl MemState {
    fn linked(&self, a: NodeId, b: NodeId) -> bool {
        !self.cuts.contains(&pair(a, b))
            && !self.isolated.contains(&a)
            && !self.isolated.contains(&b)
    }
}

fn pair(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    (a.min(b), a.max(b))
}

impl MemNetwork {
    /// Creates an empty network.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers (or replaces) the handler answering calls to node `id`.
    pub fn register(&self, id: NodeId, handler: Arc<dyn RpcHandler>) {
        self.lock().handlers.insert(id, handler);
    }

    /// Removes node `id` ("killed"): calls to it fail with [`NetError::Connect`].
    pub fn unregister(&self, id: NodeId) {
        self.lock().handlers.remove(&id);
    }

    /// Sets (or replaces) the address node `id` listens at, so
    /// [`Transport::call_addr`] can reach it. A node has one address and an
    /// address names one node: `id`'s previous address, and any other node's
    /// claim to `addr`, are forgotten.
    pub fn set_address(&self, id: NodeId, addr: SocketAddr) {
        let mut s = self.lock();
        s.addresses.retain(|_, owner| *owner != id);
        s.addresses.insert(addr, id);
    }

    /// A transport sending calls as node `from`.
    pub fn transport(&self, from: NodeId) -> MemTransport {
        self.transport_with(from, TransportOptions::default())
    }

    /// A transport sending calls as node `from` with `opts.faults` (fault injection, as
    /// [`crate::QuicTransport`] applies them) and `opts.request_timeout` (the deadline of a
    /// call over a shaped link). The other options concern QUIC only.
    pub fn transport_with(&self, from: NodeId, opts: TransportOptions) -> MemTransport {
        MemTransport {
            net: self.clone(),
            from,
            opts,
        }
    }

    /// Cuts the link between `a` and `b` in both directions.
    pub fn cut(&self, a: NodeId, b: NodeId) {
        self.lock().cuts.insert(pair(a, b));
    }

    /// Restores a link cut with [`MemNetwork::cut`] (does not end isolation).
    pub fn heal(&self, a: NodeId, b: NodeId) {
        self.lock().cuts.remove(&pair(a, b));
    }

    /// Cuts every link of `a`, including to nodes registered later.
    pub fn isolate(&self, a: NodeId) {
        self.lock().isolated.insert(a);
    }

    /// Restores all cut links and ends all isolation.
    pub fn heal_all(&self) {
        let mut s = self.lock();
        s.cuts.clear();
        s.isolated.clear();
    }

    /// Whether calls between `a` and `b` currently pass.
    pub fn is_linked(&self, a: NodeId, b: NodeId) -> bool {
        self.lock().linked(a, b)
    }
}

/// Sends calls over a [`MemNetwork`] as one node. Calls to a cut or
/// isolated peer fail promptly with [`NetError::LinkCut`]; calls to an
/// unregistered peer with [`NetError::Connect`]. A link cut while a call is
/// in flight loses the reply (the call fails with `LinkCut`).
/// [`Transport::call_addr`] resolves the address set with
/// [`MemNetwork::set_address`] and then behaves exactly like
/// [`Transport::call`]; an unknown address fails with [`NetError::ConnectAddr`].
///
/// Its [`crate::LinkFaults`] ([`MemNetwork::transport_with`]) name peers by the address set
/// with [`MemNetwork::set_address`] (a peer without one is never faulted): a call or stream
/// to a cut address fails at once with [`NetError::LinkCut`], and a call over a shaped link
/// is delayed, dropped or duplicated by the same code as on QUIC; streams are cut and
/// delayed only there, and not shaped here.
#[derive(Clone)]
pub struct MemTransport {
    net: MemNetwork,
    from: NodeId,
    opts: TransportOptions,
}

impl MemTransport {
    /// The address `to` listens at, if one was set.
    fn address_of(&self, to: NodeId) -> Option<SocketAddr> {
        let s = self.net.lock();
        s.addresses
            .iter()
            .find(|(_, owner)| **owner == to)
            .map(|(addr, _)| *addr)
    }

    /// Fails if this node's faults cut the link to `addr`.
    fn check_link(&self, to: NodeId, addr: Option<SocketAddr>) -> Result<(), NetError> {
        match addr {
            Some(addr) if self.opts.faults.is_cut(addr) => {
                tracing::debug!(peer = to, %addr, "{LINK_CUT_REASON}");
                Err(NetError::LinkCut {
                    from: self.from,
                    to,
                })
            }
            _ => Ok(()),
        }
    }

    /// Hands one copy of `request` to `to`'s handler and returns its reply.
    async fn deliver(&self, to: NodeId, request: Bytes) -> Result<Bytes, NetError> {
        let from = self.from;
        let handler = self.reach(to)?;
        let reply = handler.handle(from, request).await;
        if !self.net.is_linked(from, to) {
            return Err(NetError::LinkCut { from, to });
        }
        Ok(reply)
    }

    /// The handler of `to`, if the link to it is up and it is registered.
    fn reach(&self, to: NodeId) -> Result<Arc<dyn RpcHandler>, NetError> {
        let from = self.from;
        let s = self.net.lock();
        if !s.linked(from, to) {
            return Err(NetError::LinkCut { from, to });
        }
        s.handlers
            .get(&to)
            .cloned()
            .ok_or_else(|| NetError::Connect {
                peer: to,
                addr: "mem".into(),
                reason: "node is not registered (down)".into(),
            })
    }

    /// Carries one direction of a stream between `a` and `b`, ending it with
    /// [`NetError::LinkCut`] once their link is cut.
    fn relay(
        &self,
        (a, b): (NodeId, NodeId),
        mut frames: mpsc::Receiver<(Instant, Bytes)>,
        to: Arrivals,
    ) {
        let net = self.net.clone();
        tokio::spawn(async move {
            while let Some((_, frame)) = frames.recv().await {
                if !net.is_linked(a, b) {
                    let _ = to
                        .send((Instant::now(), Err(NetError::LinkCut { from: a, to: b })))
                        .await;
                    return;
                }
                if to.send((Instant::now(), Ok(frame))).await.is_err() {
                    return;
                }
            }
        });
    }
}

impl Transport for MemTransport {
    async fn call(&self, to: NodeId, request: Bytes) -> Result<Bytes, NetError> {
        let within = self.opts.request_timeout;
        let addr = self.address_of(to);
        self.check_link(to, addr)?;
        let faults = &self.opts.faults;
        let Some(plan) = addr.and_then(|addr| faults.plan_call(addr)) else {
            return self.deliver(to, request).await;
        };
        let transport = self.clone();
        let send = move || {
            let (transport, request) = (transport.clone(), request.clone());
            async move { transport.deliver(to, request).await }
        };
        let callee = format!("node {to}");
        faulted_call(faults, plan, callee, within, send).await
    }

    async fn open_stream(&self, to: NodeId, request: Bytes) -> Result<PeerStream, NetError> {
        self.check_link(to, self.address_of(to))?;
        let handler = self.reach(to)?;
        let (dialer_sender, dialer_frames) = frame_queue(DEFAULT_MAX_FRAME);
        let (server_sender, server_frames) = frame_queue(DEFAULT_MAX_FRAME);
        let (to_server, server_receiver) = receive_queue(None);
        let (to_dialer, dialer_receiver) = receive_queue(None);
        self.relay((self.from, to), dialer_frames, to_server);
        self.relay((to, self.from), server_frames, to_dialer);
        tokio::spawn(handler.handle_stream(
            self.from,
            request,
            PeerStream {
                sender: server_sender,
                receiver: server_receiver,
            },
        ));
        Ok(PeerStream {
            sender: dialer_sender,
            receiver: dialer_receiver,
        })
    }

    fn link_faults(&self) -> Option<&crate::LinkFaults> {
        Some(&self.opts.faults)
    }

    async fn call_addr(&self, addr: SocketAddr, request: Bytes) -> Result<Bytes, NetError> {
        let to = self.net.lock().addresses.get(&addr).copied();
        match to {
            Some(to) => self.call(to, request).await,
            None => Err(NetError::ConnectAddr {
                addr,
                reason: "no node has this address".into(),
            }),
        }
    }
}
