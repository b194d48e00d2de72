//! Sending over a [`GossipLink`]: each send is spawned (a dead peer never holds up gossip)
//! and bounded per peer and in all; more are dropped, as UDP would drop them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tracing::debug;

use super::{GossipLink, GossipStats};

/// Sends in flight to one peer, at most; more are dropped (a dead peer cannot hold up gossip
/// with the others).
pub(super) const MAX_SENDS_PER_PEER: usize = 8;
/// Sends in flight in all, at most.
pub(super) const MAX_SENDS: usize = 256;

/// Counters shared by the inbox, the driver and the sends.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) inbox_full: AtomicU64,
    pub(super) malformed: AtomicU64,
    pub(super) sends_dropped: AtomicU64,
    pub(super) send_failures: AtomicU64,
    pub(super) sent: AtomicU64,
    pub(super) sent_between_regions: AtomicU64,
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
            sent: self.sent.load(Ordering::Relaxed),
            sent_between_regions: self.sent_between_regions.load(Ordering::Relaxed),
        }
    }
}

/// Sends messages over the link, spawned and bounded.
pub(super) struct Sender {
    link: Arc<dyn GossipLink>,
    in_flight: Arc<InFlight>,
    counters: Arc<Counters>,
}

impl Sender {
    pub(super) fn new(link: Arc<dyn GossipLink>, counters: Arc<Counters>) -> Self {
        Self {
            link,
            in_flight: Arc::new(InFlight::new(MAX_SENDS_PER_PEER, MAX_SENDS)),
            counters,
        }
    }

    /// Starts sending `message` to `to`, unless too many sends are in flight (then it is
    /// dropped and counted).
    pub(super) fn send(&self, to: SocketAddr, message: Bytes) {
        let Some(permit) = InFlight::try_acquire(&self.in_flight, to) else {
            let dropped = Counters::bump(&self.counters.sends_dropped);
            debug!(%to, dropped, "too many gossip sends in flight, dropping one");
            return;
        };
        Counters::bump(&self.counters.sent);
        let send = self.link.send(to, message);
        let counters = self.counters.clone();
        tokio::spawn(async move {
            if let Err(error) = send.await {
                Counters::bump(&counters.send_failures);
                debug!(%to, %error, "gossip send failed");
            }
            drop(permit);
        });
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
