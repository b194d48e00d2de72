//! Consumer group membership and partition assignment, as a plain state machine fed the
//! current time. Held in memory by the metadata leader (a new leader starts empty and
//! members re-join on their next heartbeat); cursors are committed through the partition
//! groups, so they survive any leader change.
//!
//! Assignment: members sorted by id get partitions round-robin. Any join, leave or expiry
//! starts a new generation; members learn theirs on their next heartbeat. During that window
//! two members may both read a partition; delivery stays at-least-once.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct Group {
    generation: u64,
    members: BTreeMap<String, Instant>,
}

/// All consumer groups known to this node.
#[derive(Debug)]
pub struct GroupCoordinator {
    session_timeout: Duration,
    groups: HashMap<(String, String), Group>,
}

impl GroupCoordinator {
    /// Members silent longer than `session_timeout` are dropped.
    pub fn new(session_timeout: Duration) -> Self {
        Self {
            session_timeout,
            groups: HashMap::new(),
        }
    }

    /// Joins or heartbeats; answers the generation and the member's partitions.
    pub fn join(
        &mut self,
        now: Instant,
        group: &str,
        topic: &str,
        member: &str,
        partitions: u32,
    ) -> (u64, Vec<u32>) {
        self.expire(now);
        let g = self
            .groups
            .entry((group.to_string(), topic.to_string()))
            .or_default();
        if g.members.insert(member.to_string(), now).is_none() {
            g.generation += 1;
        }
        let index = g.members.keys().position(|m| m == member).unwrap_or(0);
        let count = g.members.len();
        let mine = (0..partitions)
            .filter(|p| *p as usize % count == index)
            .collect();
        (g.generation, mine)
    }

    /// Leaves a group.
    pub fn leave(&mut self, group: &str, topic: &str, member: &str) {
        if let Some(g) = self.groups.get_mut(&(group.to_string(), topic.to_string())) {
            if g.members.remove(member).is_some() {
                g.generation += 1;
            }
        }
    }

    /// Drops members whose session expired.
    pub fn expire(&mut self, now: Instant) {
        let timeout = self.session_timeout;
        for g in self.groups.values_mut() {
            let before = g.members.len();
            g.members
                .retain(|_, seen| now.duration_since(*seen) <= timeout);
            if g.members.len() != before {
                g.generation += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebalances_on_join_leave_and_expiry() {
        let t0 = Instant::now();
        let mut c = GroupCoordinator::new(Duration::from_secs(10));
        let (g1, a) = c.join(t0, "g", "orders", "a", 4);
        assert_eq!(a, vec![0, 1, 2, 3]);
        let (g2, b) = c.join(t0, "g", "orders", "b", 4);
        assert!(g2 > g1);
        assert_eq!(b, vec![1, 3]);
        let (g3, a) = c.join(t0, "g", "orders", "a", 4);
        assert_eq!((g3, a), (g2, vec![0, 2]));
        // b stops heartbeating: after the session timeout a gets everything again.
        let later = t0 + Duration::from_secs(11);
        let (_, a) = c.join(later, "g", "orders", "a", 4);
        assert_eq!(a, vec![0, 1, 2, 3]);
        c.leave("g", "orders", "a");
        let (_, b) = c.join(later, "g", "orders", "b", 4);
        assert_eq!(b, vec![0, 1, 2, 3]);
    }
}
