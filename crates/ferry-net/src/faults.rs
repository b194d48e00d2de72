//! Link fault injection for tests and chaos runs: a shared set of peer addresses whose link
//! to this node is down, and shaped links (this kernel has no `tc netem`, so the transport
//! shapes its own calls): delay, jitter, retransmission delay, and real faults on calls —
//! requests lost, replies lost, requests delivered twice.
//!
//! What applies where:
//! - Calls ([`crate::Transport::call`], [`crate::Transport::call_addr`]: gossip, Raft votes,
//!   cross-region forwarding) get every fault of a [`LinkShape`], drawn per call. Both
//!   transports run a shaped call through the same code ([`faulted_call`]), so they behave
//!   identically.
//! - Peer streams ([`crate::Transport::open_stream`]: Raft replication streams) are cut and
//!   delayed only. A QUIC stream is reliable and ordered: a lost packet is retransmitted,
//!   never lost to the application, so no frame inside a stream is dropped or duplicated.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::NetError;

/// How a shaped link behaves, applied by the calling side to each call.
///
/// Delays: the request waits one one-way delay before it is sent and the reply one after it
/// arrives. `loss` is not loss: QUIC retransmits a lost packet, so `loss` is the chance that
/// a direction of a call (or a stream frame) pays a retransmission's extra time (twice the
/// delay, at least 20 ms) and still arrives.
///
/// Faults (calls only; probabilities in `0..=1`, drawn independently per call):
/// - `drop_request`: the request never reaches the peer (its handler does not run); the
///   caller gets [`NetError::Timeout`] when the call's deadline expires, as for a request
///   lost on the wire.
/// - `drop_response`: the peer handles the request fully, but its reply is lost; the caller
///   gets [`NetError::Timeout`] when the call's deadline expires and cannot tell whether the
///   request took effect.
/// - `duplicate`: the request is delivered twice. The copy leaves after its own, independently
///   drawn one-way delay, so it may arrive before the original or after later calls
///   (reordering); its reply is discarded. The caller gets the first copy's reply.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkShape {
    /// One-way delay.
    pub delay: Duration,
    /// Extra one-way delay, uniform in `0..=jitter`.
    pub jitter: Duration,
    /// Chance (0..=1) that a direction pays a retransmission's extra delay (not a loss).
    pub loss: f64,
    /// Chance (0..=1) that a call's request is lost before it reaches the peer.
    pub drop_request: f64,
    /// Chance (0..=1) that a call's reply is lost after the peer handled the request.
    pub drop_response: f64,
    /// Chance (0..=1) that a call's request is delivered a second time.
    pub duplicate: f64,
}

impl LinkShape {
    /// One direction's delay, drawn from `rng`.
    fn one_way(&self, rng: &mut impl Rng) -> Duration {
        let mut d = self.delay;
        if !self.jitter.is_zero() {
            d += Duration::from_micros(rng.gen_range(0..=self.jitter.as_micros() as u64));
        }
        if chance(rng, self.loss) {
            d += (self.delay * 2).max(Duration::from_millis(20));
        }
        d
    }
}

/// Draws `true` with probability `p` (clamped to `0..=1`; never for 0, always for 1).
fn chance(rng: &mut impl Rng, p: f64) -> bool {
    p > 0.0 && rng.gen_bool(p.min(1.0))
}

/// What fault injection did to one call, drawn when the call starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct CallPlan {
    /// Waited before the request is sent.
    request_delay: Duration,
    /// Waited after the reply arrives.
    reply_delay: Duration,
    drop_request: bool,
    drop_response: bool,
    /// The copy's own one-way delay, if the request is delivered twice.
    duplicate_after: Option<Duration>,
}

/// How many faults a [`LinkFaults`] has injected so far (every link together).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InjectedFaults {
    /// Requests never sent (the peer's handler did not run).
    pub requests_dropped: u64,
    /// Replies discarded after the peer handled the request.
    pub responses_dropped: u64,
    /// Requests delivered a second time (counted once the peer answered the copy).
    pub requests_duplicated: u64,
}

#[derive(Debug, Default)]
struct FaultCounters {
    requests_dropped: AtomicU64,
    responses_dropped: AtomicU64,
    requests_duplicated: AtomicU64,
}

/// Where shaped links draw their chances: seeded (replayable) or from the OS.
#[derive(Debug)]
struct FaultRng(Mutex<StdRng>);

impl Default for FaultRng {
    fn default() -> Self {
        Self(Mutex::new(StdRng::from_entropy()))
    }
}

impl FaultRng {
    fn with<R>(&self, f: impl FnOnce(&mut StdRng) -> R) -> R {
        // A poisoned lock only means another caller panicked; the generator is plain.
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The reason carried by errors caused by a cut link (both the dialing side's
/// [`crate::NetError::Connect`] / [`crate::NetError::ConnectAddr`] and the
/// answering side's refusal, seen by the caller as [`crate::NetError::Remote`]).
pub(crate) const LINK_CUT_REASON: &str = "link cut (fault injection)";

/// Links of this node that are cut or shaped, by the peer's address. Cutting `addr`
/// means the link between this node and the node listening at `addr` is down
/// in both directions: [`crate::QuicTransport`] fails calls to `addr` at once
/// (without dialing, closing any cached connection to it), and [`crate::serve`]
/// refuses peer requests arriving from `addr` (client connections are not
/// affected). Both are checked per call / per request, so a cut or heal takes
/// effect immediately, also on existing connections. Shaping `addr`
/// ([`LinkFaults::shape`]) delays, drops and duplicates this node's calls to it (see
/// [`LinkShape`]); [`LinkFaults::injected`] counts what was injected.
///
/// Chances are drawn from one generator per set: seeded with [`LinkFaults::with_seed`], the
/// sequence of draws replays (which call gets which draw still depends on the order calls
/// start in); otherwise seeded from the OS.
///
/// Cheap to clone; clones share state. The default cuts nothing.
/// IPv4-mapped IPv6 addresses are treated as their IPv4 form.
#[derive(Clone, Debug, Default)]
pub struct LinkFaults {
    cut: Arc<RwLock<HashSet<SocketAddr>>>,
    slow: Arc<RwLock<HashMap<SocketAddr, LinkShape>>>,
    rng: Arc<FaultRng>,
    counters: Arc<FaultCounters>,
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

    /// Creates a set with nothing cut whose shaped links draw their chances from a
    /// generator seeded with `seed`, so a run's sequence of draws can be replayed.
    pub fn with_seed(seed: u64) -> Self {
        Self {
            rng: Arc::new(FaultRng(Mutex::new(StdRng::seed_from_u64(seed)))),
            ..Self::default()
        }
    }

    /// Reseeds the generator shared by this set and its clones (see
    /// [`LinkFaults::with_seed`]).
    pub fn reseed(&self, seed: u64) {
        tracing::info!(seed, "link faults reseeded (fault injection)");
        self.rng.with(|rng| *rng = StdRng::seed_from_u64(seed));
    }

    /// The faults injected so far on every shaped link of this set.
    pub fn injected(&self) -> InjectedFaults {
        let c = &self.counters;
        InjectedFaults {
            requests_dropped: c.requests_dropped.load(Ordering::Relaxed),
            responses_dropped: c.responses_dropped.load(Ordering::Relaxed),
            requests_duplicated: c.requests_duplicated.load(Ordering::Relaxed),
        }
    }

    /// One direction's delay on the link to `addr` (streams), if it is shaped.
    pub(crate) fn one_way(&self, addr: SocketAddr) -> Option<Duration> {
        let shape = self.shape_of(addr)?;
        Some(self.rng.with(|rng| shape.one_way(rng)))
    }

    /// Draws what happens to a call to `addr`, if its link is shaped.
    pub(crate) fn plan_call(&self, addr: SocketAddr) -> Option<CallPlan> {
        let shape = self.shape_of(addr)?;
        Some(self.rng.with(|rng| {
            let request_delay = shape.one_way(rng);
            let reply_delay = shape.one_way(rng);
            let drop_request = chance(rng, shape.drop_request);
            let drop_response = chance(rng, shape.drop_response);
            let duplicate = chance(rng, shape.duplicate);
            let copy_delay = shape.one_way(rng);
            CallPlan {
                request_delay,
                reply_delay,
                drop_request,
                drop_response: !drop_request && drop_response,
                duplicate_after: (!drop_request && duplicate).then_some(copy_delay),
            }
        }))
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

    /// Makes calls to the node at `addr` slow and faulty as `shape` says (streams: delays
    /// only); a zero shape restores the link.
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

/// Runs one call over a shaped link as `plan` says; both transports send shaped calls
/// through here. `send` delivers one copy of the request to the peer and returns its reply
/// (called twice for a duplicate; the copy runs in a spawned task). The call, and a duplicate
/// copy, end by `after` from now; a dropped request or reply fails with
/// [`NetError::Timeout`] when that deadline expires, as a loss on the wire would.
pub(crate) async fn faulted_call<S, F>(
    faults: &LinkFaults,
    plan: CallPlan,
    callee: impl fmt::Display,
    after: Duration,
    send: S,
) -> Result<Bytes, NetError>
where
    S: Fn() -> F,
    F: Future<Output = Result<Bytes, NetError>> + Send + 'static,
{
    let deadline = tokio::time::Instant::now() + after;
    let timed_out = |what: String| NetError::Timeout { what, after };
    if plan.drop_request {
        faults
            .counters
            .requests_dropped
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%callee, "request dropped (fault injection)");
        tokio::time::sleep_until(deadline).await;
        return Err(timed_out(format!(
            "calling {callee}: request dropped (fault injection)"
        )));
    }
    if let Some(copy_after) = plan.duplicate_after {
        // Futures are lazy: the copy leaves only after its own delay.
        let copy_sent = send();
        let counters = faults.counters.clone();
        let copy = format!("{callee}");
        tokio::spawn(async move {
            tokio::time::sleep(copy_after).await;
            let answered = tokio::time::timeout_at(deadline, copy_sent).await;
            if matches!(answered, Ok(Ok(_) | Err(NetError::Remote(_)))) {
                counters.requests_duplicated.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(callee = %copy, "request delivered twice (fault injection)");
            }
        });
    }
    let exchange = async {
        if !plan.request_delay.is_zero() {
            tokio::time::sleep(plan.request_delay).await;
        }
        send().await
    };
    let reply = tokio::time::timeout_at(deadline, exchange)
        .await
        .map_err(|_| timed_out(format!("calling {callee}")))?;
    if plan.drop_response && matches!(reply, Ok(_) | Err(NetError::Remote(_))) {
        faults
            .counters
            .responses_dropped
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%callee, "reply dropped (fault injection)");
        tokio::time::sleep_until(deadline).await;
        return Err(timed_out(format!(
            "calling {callee}: reply dropped (fault injection)"
        )));
    }
    if !plan.reply_delay.is_zero() {
        tokio::time::timeout_at(deadline, tokio::time::sleep(plan.reply_delay))
            .await
            .map_err(|_| timed_out(format!("calling {callee}")))?;
    }
    reply
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
            ..LinkShape::default()
        };
        faults.shape(a, shape);
        assert_eq!(faults.clone().shape_of(a), Some(shape));
        let (mut plain, mut retransmitted) = (0, 0);
        for _ in 0..1000 {
            let d = faults.one_way(a).unwrap();
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

    #[test]
    fn call_plans_follow_the_shape_and_replay_from_a_seed() {
        let a: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let delays_only = LinkFaults::new();
        delays_only.shape(
            a,
            LinkShape {
                delay: Duration::from_millis(5),
                loss: 0.5,
                ..LinkShape::default()
            },
        );
        for _ in 0..1000 {
            let plan = delays_only.plan_call(a).unwrap();
            assert!(!plan.drop_request && !plan.drop_response, "{plan:?}");
            assert_eq!(plan.duplicate_after, None);
        }
        let shape = LinkShape {
            drop_request: 0.2,
            drop_response: 0.3,
            duplicate: 0.4,
            ..LinkShape::default()
        };
        let plans = |seed| {
            let faults = LinkFaults::with_seed(seed);
            faults.shape(a, shape);
            (0..2000)
                .map(|_| faults.plan_call(a).unwrap())
                .collect::<Vec<_>>()
        };
        let first = plans(7);
        assert_eq!(first, plans(7), "one seed, one sequence");
        assert_ne!(first, plans(8));
        let count = |f: fn(&CallPlan) -> bool| first.iter().filter(|p| f(p)).count();
        let dropped = count(|p| p.drop_request);
        assert!((300..500).contains(&dropped), "{dropped} requests dropped");
        // Replies and copies are drawn only for requests that were sent.
        let lost_replies = count(|p| p.drop_response);
        assert!((400..560).contains(&lost_replies), "{lost_replies}");
        let copies = count(|p| p.duplicate_after.is_some());
        assert!((540..740).contains(&copies), "{copies}");
        assert!(first
            .iter()
            .all(|p| !p.drop_request || (!p.drop_response && p.duplicate_after.is_none())));
    }
}
