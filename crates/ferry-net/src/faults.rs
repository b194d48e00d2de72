//! Link fault injection for tests and chaos runs: a shared set of peer
//! addresses whose link to this node is down.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

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
}
