//! When a partition group may build a snapshot, as a plain decision over its leader's view.
//!
//! Building a snapshot lets a group purge its log up to `keep_after_snapshot` entries behind
//! it. A replica still catching up (a learner a move added, a follower back from a restart)
//! receives the newest snapshot and then needs the entries after it; if the leader built and
//! purged past them meanwhile, it needs another whole snapshot, and under a steady write rate
//! that repeats for as long as the rate holds. So a leader defers building while a live replica
//! lags further behind than the log it would keep, until the log since the last snapshot
//! reaches a bound. A replica that stopped answering does not hold the log: it is caught up by
//! a snapshot when it returns, as before.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferry_proto::NodeId;
use ferry_store::{GroupId, TypeConfig};
use openraft::async_runtime::WatchReceiver;
use openraft::type_config::alias::WatchReceiverOf;
use openraft::{Instant, RaftMetrics, ServerState};

/// One other replica of a group, as its leader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Replica {
    pub(crate) id: NodeId,
    /// The last log index it is known to hold.
    pub(crate) matched: Option<u64>,
    /// How long since it last acknowledged the leader (None: never in this term).
    pub(crate) acked_ago: Option<Duration>,
}

/// What a group's state machine knows when openraft asks it for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Facts {
    /// The last index applied here.
    pub(crate) applied: u64,
    /// The last index the group's current snapshot covers.
    pub(crate) snapshot: Option<u64>,
    /// The other replicas, if this node leads the group (followers never hold the log for
    /// anyone: only a leader sends it).
    pub(crate) replicas: Option<Vec<Replica>>,
}

/// The limits a decision applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounds {
    /// Entries a purge keeps behind a new snapshot (`raft.keep_after_snapshot`).
    pub(crate) keep: u64,
    /// The log since the last snapshot may grow to this many entries while a replica catches
    /// up; then the snapshot is built anyway (`raft.max_log_while_catching_up`; 0: never
    /// defer).
    pub(crate) max_log: u64,
    /// A replica that acknowledged within this long counts as live.
    pub(crate) live_within: Duration,
}

/// Build a snapshot now, or defer it for a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compaction {
    Build,
    Defer { replica: NodeId, matched: u64 },
}

/// Whether a snapshot asked for now is built.
pub(crate) fn decide(facts: &Facts, bounds: Bounds) -> Compaction {
    let since = facts.applied.saturating_sub(facts.snapshot.unwrap_or(0));
    if bounds.max_log == 0 || since >= bounds.max_log {
        return Compaction::Build;
    }
    let Some(replicas) = &facts.replicas else {
        return Compaction::Build;
    };
    // The purge after this build would keep entries from `applied - keep + 1` on; a replica
    // holding less than the entry before them would find its next entries gone.
    let kept_from = facts.applied.saturating_sub(bounds.keep);
    replicas
        .iter()
        .filter(|r| r.acked_ago.is_some_and(|ago| ago <= bounds.live_within))
        .map(|r| (r.id, r.matched.unwrap_or(0)))
        .find(|(_, matched)| *matched < kept_from)
        .map_or(Compaction::Build, |(replica, matched)| Compaction::Defer {
            replica,
            matched,
        })
}

/// A group's state machine asks this before building a snapshot openraft's policy called
/// for: it reads the group's Raft metrics (set once the group's Raft is made) and counts the
/// builds it deferred in a counter the node's groups share.
pub(crate) struct CompactionGate {
    group: GroupId,
    bounds: Bounds,
    metrics: OnceLock<WatchReceiverOf<TypeConfig, RaftMetrics<TypeConfig>>>,
    deferred: Arc<AtomicU64>,
}

impl CompactionGate {
    pub(crate) fn new(group: GroupId, bounds: Bounds, deferred: Arc<AtomicU64>) -> Self {
        Self {
            group,
            bounds,
            metrics: OnceLock::new(),
            deferred,
        }
    }

    /// Gives the gate its group's metrics; until then every build goes ahead.
    pub(crate) fn watch(&self, metrics: WatchReceiverOf<TypeConfig, RaftMetrics<TypeConfig>>) {
        let _ = self.metrics.set(metrics);
    }

    /// Whether a snapshot of the state applied up to `applied` (the state machine's own
    /// index: the metrics may not show the last apply yet) may be built now; logs and counts
    /// a deferral.
    pub(crate) fn allows_build(&self, applied: u64) -> bool {
        let Some(metrics) = self.metrics.get() else {
            return true;
        };
        let facts = {
            let m = metrics.borrow_watched();
            facts_of(&m, applied)
        };
        match decide(&facts, self.bounds) {
            Compaction::Build => true,
            Compaction::Defer { replica, matched } => {
                self.deferred.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    group = %self.group,
                    replica,
                    matched,
                    applied = facts.applied,
                    "snapshot deferred while a replica catches up"
                );
                false
            }
        }
    }
}

fn facts_of(m: &RaftMetrics<TypeConfig>, applied: u64) -> Facts {
    let leading = m.state == ServerState::Leader && m.current_leader == Some(m.id);
    let replicas = leading.then(|| {
        let matched = m.replication.as_ref();
        let acked = m.heartbeat.as_ref();
        m.membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| *id != m.id)
            .map(|id| Replica {
                id,
                matched: matched
                    .and_then(|r| r.get(&id))
                    .and_then(|l| l.as_ref())
                    .map(|l| l.index),
                acked_ago: acked
                    .and_then(|h| h.get(&id))
                    .and_then(|t| t.as_ref())
                    .map(|t| t.elapsed()),
            })
            .collect()
    });
    Facts {
        applied,
        snapshot: m.snapshot.as_ref().map(|l| l.index),
        replicas,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Bounds = Bounds {
        keep: 100,
        max_log: 8_000,
        live_within: Duration::from_secs(10),
    };

    fn live(id: NodeId, matched: Option<u64>) -> Replica {
        Replica {
            id,
            matched,
            acked_ago: Some(Duration::from_secs(1)),
        }
    }

    fn leading(applied: u64, snapshot: Option<u64>, replicas: Vec<Replica>) -> Facts {
        Facts {
            applied,
            snapshot,
            replicas: Some(replicas),
        }
    }

    #[test]
    fn builds_when_every_live_replica_holds_what_the_purge_keeps() {
        let facts = leading(
            5_000,
            Some(1_000),
            vec![live(2, Some(4_990)), live(3, Some(4_900))],
        );
        assert_eq!(decide(&facts, BOUNDS), Compaction::Build);
    }

    #[test]
    fn defers_for_a_live_replica_behind_the_kept_log() {
        let facts = leading(
            5_000,
            Some(1_000),
            vec![live(2, Some(5_000)), live(3, Some(4_899))],
        );
        assert_eq!(
            decide(&facts, BOUNDS),
            Compaction::Defer {
                replica: 3,
                matched: 4_899
            }
        );
        // A learner that has received nothing yet (installing the first snapshot).
        let facts = leading(5_000, Some(1_000), vec![live(4, None)]);
        assert_eq!(
            decide(&facts, BOUNDS),
            Compaction::Defer {
                replica: 4,
                matched: 0
            }
        );
    }

    #[test]
    fn a_silent_replica_holds_nothing() {
        let mut gone = live(3, Some(10));
        gone.acked_ago = Some(Duration::from_secs(11));
        let never = Replica {
            id: 4,
            matched: None,
            acked_ago: None,
        };
        let facts = leading(5_000, Some(1_000), vec![live(2, Some(5_000)), gone, never]);
        assert_eq!(decide(&facts, BOUNDS), Compaction::Build);
    }

    #[test]
    fn the_log_bound_ends_the_wait() {
        let facts = leading(9_000, Some(1_000), vec![live(3, Some(10))]);
        assert_eq!(decide(&facts, BOUNDS), Compaction::Build);
        let facts = leading(8_999, Some(1_000), vec![live(3, Some(10))]);
        assert!(matches!(decide(&facts, BOUNDS), Compaction::Defer { .. }));
        let never_defer = Bounds {
            max_log: 0,
            ..BOUNDS
        };
        assert_eq!(decide(&facts, never_defer), Compaction::Build);
    }

    #[test]
    fn a_follower_builds_when_asked() {
        let facts = Facts {
            applied: 5_000,
            snapshot: None,
            replicas: None,
        };
        assert_eq!(decide(&facts, BOUNDS), Compaction::Build);
    }
}
