//! Link fault injection for tests and chaos runs: a shared set of peer
//! addresses whose link to this node is down, and slow or lossy links (this
//! kernel has no `tc netem`, so the transport shapes its own calls).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rand::Rng;

/// How a slow link behaves, applied by the calling side to each call: the request waits
/// one one-way delay before it is sent and the reply one after it arrives. A lost packet on
/// QUIC is retransmitted, not lost to the application, so `loss` is the chance that a
/// direction takes a retransmission's extra time (twice the delay, at least 20 ms).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkShape {
    /// One-way delay.
    pub delay: Duration,
    /// Extra one-way delay, uniform in `0..=jitter`.
    pub jitter: Duration,
    /// Chance (0..=1) that a direction of a call pays a retransmission.
    pub loss: f64,
}

impl LinkShape {
    /// One direction's delay, drawn now.
    pub fn one_way(&self) -> Duration {
        let mut rng = rand::thread_rng();
        let mut d = self.delay;
        if !self.jitter.is_zero() {
            d += Duration::from_micros(rng.gen_range(0..=self.jitter.as_micros() as u64));
        }
        if self.loss > 0.0 && rng.gen_bool(self.loss.clamp(0.0, 1.0)) {
            d += (self.delay * 2).max(Duration::from_millis(20));
        }
        d
    }
}

/// The reason carried by errors caused by a cut link (both the dialing side's
/// [`crate::NetError::Connect`] / [`crate::NetError::ConnectAddr`] and the
/// answering side's refusal, seen by the caller as [`crate::NetError::Remote`]).
pub(crate) const LINK_CUT_REASON: &str = "link cut (fault injection)";

/// Links of this node that are cut, by the peer's address. Cutting `addr`
/// means the link between this node and the node listening at `addr` is down
/// in both directions: [`crate::QuicTransport`] fails calls to `addr` at once
/// (without dialing, closing any cached connection to it), and [`crate::serve`]
/// refuses peer requests arriving from `addr` (client connections are not
/// affected). Both are checked per call / per request, so a cut or heal takes
/// effect immediately, also on existing connections.
///
/// Cheap to clone; clones share state. The default cuts nothing.
/// IPv4-mapped IPv6 addresses are treated as their IPv4 form.
#[derive(Clone, Debug, Default)]
pub struct LinkFaults {
    cut: Arc<RwLock<HashSet<SocketAddr>>>,
    slow: Arc<RwLock<HashMap<SocketAddr, LinkShape>>>,
}

/// `[::ffff:a.b.c.d]:p` → `a.b.c.d:p` (a dual-stack endpoint reports IPv4
/// peers in mapped form).
fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

impl LinkFaults {
    /// Creates a set with nothing cut.
    pub fn new() -> Self {
        Self::default()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashSet<SocketAddr>> {
        // A poisoned lock only means another caller panicked; the set is plain.
        self.cut.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Cuts the link to the node at `addr` (both directions).
    pub fn cut(&self, addr: SocketAddr) {
        tracing::info!(%addr, "link cut (fault injection)");
        self.write().insert(normalize(addr));
    }

    /// Restores the link to the node at `addr`.
    pub fn heal(&self, addr: SocketAddr) {
        tracing::info!(%addr, "link healed (fault injection)");
        self.write().remove(&normalize(addr));
    }

    /// Restores every cut link.
    pub fn heal_all(&self) {
        tracing::info!("all links healed (fault injection)");
        self.write().clear();
    }

    /// Makes calls to the node at `addr` slow (and lossy) as `shape` says; a zero shape
    /// restores the link.
    pub fn shape(&self, addr: SocketAddr, shape: LinkShape) {
        tracing::info!(%addr, ?shape, "link shaped (fault injection)");
        let mut slow = self.slow.write().unwrap_or_else(|p| p.into_inner());
        if shape == LinkShape::default() {
            slow.remove(&normalize(addr));
        } else {
            slow.insert(normalize(addr), shape);
        }
    }

    /// How calls to the node at `addr` are shaped, if they are.
    pub fn shape_of(&self, addr: SocketAddr) -> Option<LinkShape> {
        let slow = self.slow.read().unwrap_or_else(|p| p.into_inner());
        if slow.is_empty() {
            return None;
        }
        slow.get(&normalize(addr)).copied()
    }

    /// Whether the link to the node at `addr` is cut.
    pub fn is_cut(&self, addr: SocketAddr) -> bool {
        let set = self.cut.read().unwrap_or_else(|p| p.into_inner());
        !set.is_empty() && set.contains(&normalize(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_heal_and_shared_clones() {
        let a: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:7000".parse().unwrap();
        let faults = LinkFaults::new();
        let clone = faults.clone();
        assert!(!faults.is_cut(a));
        faults.cut(a);
        assert!(clone.is_cut(a), "clones share state");
        assert!(!clone.is_cut(b));
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:7000".parse().unwrap();
        assert!(
            faults.is_cut(mapped),
            "IPv4-mapped form is the same address"
        );
        clone.cut(b);
        faults.heal(a);
        assert!(!clone.is_cut(a));
        assert!(clone.is_cut(b));
        faults.heal_all();
        assert!(!clone.is_cut(b));
    }

    #[test]
    fn shapes_draw_delays_within_bounds_and_clear() {
        let a: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let faults = LinkFaults::new();
        assert_eq!(faults.shape_of(a), None);
        let shape = LinkShape {
            delay: Duration::from_millis(30),
            jitter: Duration::from_millis(10),
            loss: 0.5,
        };
        faults.shape(a, shape);
        let shaped = faults.clone().shape_of(a).unwrap();
        let (mut plain, mut retransmitted) = (0, 0);
        for _ in 0..1000 {
            let d = shaped.one_way();
            assert!(d >= Duration::from_millis(30), "{d:?}");
            if d <= Duration::from_millis(40) {
                plain += 1;
            } else {
                assert!(
                    d >= Duration::from_millis(90) && d <= Duration::from_millis(100),
                    "{d:?}"
                );
                retransmitted += 1;
            }
        }
        assert!(
            plain > 350 && retransmitted > 350,
            "{plain} / {retransmitted}"
        );
        faults.shape(a, LinkShape::default());
        assert_eq!(faults.shape_of(a), None);
    }
}
