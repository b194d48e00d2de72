//! Chitchat's `Transport` over a [`GossipLink`]: sends are spawned and bounded, receives come
//! from the [`GossipInbox`] through a decoding task.
//!
//! Chitchat's server loop awaits `Socket::send` and treats an error from `Socket::recv` as
//! fatal (it stops gossiping). So `send` only encodes (loopback, microseconds) and hands the
//! bytes to a spawned task, never waiting on a peer; and `recv` only fails if the decoding task
//! is gone. Malformed messages are dropped by the decoding task with a debug log.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context;
use async_trait::async_trait;
use bytes::Bytes;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use chitchat::ChitchatEnvelope;
use tokio::sync::mpsc;
use tracing::debug;

use super::codec::{Decoder, Encoder};
use super::{GossipLink, GossipStats};

/// Sends in flight to one peer, at most; more are dropped (a dead peer cannot hold up gossip
/// with the others).
pub(super) const MAX_SENDS_PER_PEER: usize = 8;
/// Sends in flight in all, at most.
pub(super) const MAX_SENDS: usize = 256;

/// Counters shared by the inbox, the socket and the decoder.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) inbox_full: AtomicU64,
    pub(super) malformed: AtomicU64,
    pub(super) sends_dropped: AtomicU64,
    pub(super) send_failures: AtomicU64,
}

impl Counters {
    pub(super) fn bump(counter: &AtomicU64) -> u64 {
        counter.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(super) fn snapshot(&self) -> GossipStats {
        GossipStats {
            inbox_full: self.inbox_full.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            sends_dropped: self.sends_dropped.load(Ordering::Relaxed),
            send_failures: self.send_failures.load(Ordering::Relaxed),
        }
    }
}

/// A transport that opens its one socket once.
pub(super) struct LinkTransport {
    socket: Mutex<Option<LinkSocket>>,
}

impl LinkTransport {
    pub(super) fn new(socket: LinkSocket) -> Self {
        Self {
            socket: Mutex::new(Some(socket)),
        }
    }
}

#[async_trait]
impl Transport for LinkTransport {
    async fn open(&self, _listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = self
            .socket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .context("the gossip link transport opens only once")?;
        Ok(Box::new(socket))
    }
}

/// The socket chitchat's server loop owns.
pub(super) struct LinkSocket {
    advertise: SocketAddr,
    link: Arc<dyn GossipLink>,
    encoder: Encoder,
    received: mpsc::Receiver<RecvOutcome>,
    in_flight: Arc<InFlight>,
    counters: Arc<Counters>,
}

impl LinkSocket {
    pub(super) fn new(
        advertise: SocketAddr,
        link: Arc<dyn GossipLink>,
        encoder: Encoder,
        received: mpsc::Receiver<RecvOutcome>,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            advertise,
            link,
            encoder,
            received,
            in_flight: Arc::new(InFlight::new(MAX_SENDS_PER_PEER, MAX_SENDS)),
            counters,
        }
    }
}

#[async_trait]
impl Socket for LinkSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.advertise)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let bytes = match self.encoder.encode(envelope).await {
            Ok(bytes) => bytes,
            Err(error) => {
                debug!(%to, %error, "gossip message not encoded");
                // Chitchat logs a failed SYN and ignores a failed reply; neither stops it.
                return Err(anyhow::Error::new(error).context("encoding a gossip message"));
            }
        };
        let num_bytes_sent = bytes.len();
        let Some(permit) = InFlight::try_acquire(&self.in_flight, to) else {
            let dropped = Counters::bump(&self.counters.sends_dropped);
            debug!(%to, dropped, "too many gossip sends in flight, dropping one");
            return Ok(SendOutcome { num_bytes_sent });
        };
        let link = self.link.clone();
        let counters = self.counters.clone();
        tokio::spawn(async move {
            if let Err(error) = link.send(to, bytes).await {
                Counters::bump(&counters.send_failures);
                debug!(%to, %error, "gossip send failed");
            }
            drop(permit);
        });
        Ok(SendOutcome { num_bytes_sent })
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        // Cancellation-safe (chitchat selects on it): a message is either taken or left queued.
        self.received
            .recv()
            .await
            .context("the gossip decoding task stopped")
    }
}

/// Takes messages from the inbox, decodes them and queues them for `LinkSocket::recv`, until
/// the socket is dropped (chitchat stopped).
pub(super) async fn run_decoder(
    mut inbox: mpsc::Receiver<(SocketAddr, Bytes)>,
    received: mpsc::Sender<RecvOutcome>,
    decoder: Decoder,
    counters: Arc<Counters>,
) {
    loop {
        let (from, message) = tokio::select! {
            () = received.closed() => return,
            next = inbox.recv() => match next {
                Some(next) => next,
                None => return,
            },
        };
        match decoder.decode(&message).await {
            Ok(envelope) => {
                let outcome = RecvOutcome {
                    from_addr: from,
                    envelope,
                    num_bytes_received: message.len(),
                };
                if received.send(outcome).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                let malformed = Counters::bump(&counters.malformed);
                debug!(%from, len = message.len(), %error, malformed, "dropping a gossip message");
            }
        }
    }
}

/// Counts sends in flight, per peer and in all.
pub(super) struct InFlight {
    per_peer_limit: usize,
    total_limit: usize,
    state: Mutex<InFlightState>,
}

#[derive(Default)]
struct InFlightState {
    total: usize,
    per_peer: HashMap<SocketAddr, usize>,
}

/// One send in flight; released on drop.
pub(super) struct SendPermit {
    in_flight: Arc<InFlight>,
    to: SocketAddr,
}

impl InFlight {
    pub(super) fn new(per_peer_limit: usize, total_limit: usize) -> Self {
        Self {
            per_peer_limit,
            total_limit,
            state: Mutex::new(InFlightState::default()),
        }
    }

    /// A permit to send to `to`, unless a limit is reached.
    pub(super) fn try_acquire(this: &Arc<Self>, to: SocketAddr) -> Option<SendPermit> {
        let mut state = this.state.lock().unwrap_or_else(PoisonError::into_inner);
        let peer = state.per_peer.get(&to).copied().unwrap_or(0);
        if peer >= this.per_peer_limit || state.total >= this.total_limit {
            return None;
        }
        state.per_peer.insert(to, peer + 1);
        state.total += 1;
        Some(SendPermit {
            in_flight: this.clone(),
            to,
        })
    }

    #[cfg(test)]
    fn total(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

impl Drop for SendPermit {
    fn drop(&mut self) {
        let mut state = self
            .in_flight
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.total = state.total.saturating_sub(1);
        if let Some(count) = state.per_peer.get_mut(&self.to) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                state.per_peer.remove(&self.to);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_limits_per_peer_and_in_all() {
        let in_flight = Arc::new(InFlight::new(2, 3));
        let a: SocketAddr = "10.0.0.1:1".parse().expect("addr");
        let b: SocketAddr = "10.0.0.2:1".parse().expect("addr");
        let a1 = InFlight::try_acquire(&in_flight, a).expect("a1");
        let _a2 = InFlight::try_acquire(&in_flight, a).expect("a2");
        assert!(
            InFlight::try_acquire(&in_flight, a).is_none(),
            "per-peer limit"
        );
        let b1 = InFlight::try_acquire(&in_flight, b).expect("b1");
        assert!(
            InFlight::try_acquire(&in_flight, b).is_none(),
            "total limit"
        );
        drop(b1);
        let _b2 = InFlight::try_acquire(&in_flight, b).expect("b2 after release");
        drop(a1);
        let _a3 = InFlight::try_acquire(&in_flight, a).expect("a3 after release");
        assert_eq!(in_flight.total(), 3);
    }
}
