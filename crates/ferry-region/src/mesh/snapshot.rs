//! What a node knows of the mesh: the live nodes, who leads what, and each region's
//! interest as vouched for by its metadata leader, with the rule that judges an event.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;

use ferry_proto::SubjectFilter;
use ferry_router::NodeRecord;

/// A region's interest as this node knows it: the newest version any of its nodes
/// advertised, and the latest time a leader of its metadata group vouched for that version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct InterestView {
    /// The subject filters of the version.
    pub(crate) filters: Vec<SubjectFilter>,
    /// The region's metadata log index of the last interest change.
    pub(crate) version: u64,
    /// Milliseconds since the epoch (the region's clock): the version was the region's
    /// committed set at that moment. 0: nobody vouched for it yet.
    pub(crate) as_of_ms: u64,
    /// When the oldest interest of the version was added (the region's clock; 0: unknown).
    pub(crate) since_ms: u64,
}

impl InterestView {
    /// Folds in what one node advertised: a newer version replaces the view, an older one is
    /// ignored (a node that has not caught up with its metadata group, e.g. a restarted
    /// follower, never shrinks what is known), and the same version can only move `as_of_ms`
    /// forward.
    fn merge(&mut self, node: &NodeRecord, filters: &[SubjectFilter]) {
        let version = node.interest_version;
        let as_of_ms = node.interest_as_of_ms;
        if version > self.version {
            *self = InterestView {
                filters: filters.to_vec(),
                version,
                as_of_ms,
                since_ms: node.interest_since_ms,
            };
        } else if version == self.version {
            // One version is one set (the entry at a log index is the same on every node).
            self.as_of_ms = self.as_of_ms.max(as_of_ms);
        }
    }
}

/// Whether a region wants an event, as far as this node can tell now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Judgement {
    /// One of the region's filters matches (or the topic lists the region).
    Wanted,
    /// No filter matches, and the region vouched for its interest after the event's append
    /// (clock skew allowed): no later interest can have been meant for it.
    Unwanted,
    /// No filter matches, but the view is not recent enough to be sure: wait.
    Undecided,
}

/// What gossip says about the mesh, refreshed every supervision round.
#[derive(Debug, Default)]
pub(crate) struct MeshSnapshot {
    /// Live nodes (this one included).
    pub(crate) nodes: Vec<NodeRecord>,
    /// Interest per region (this one's too).
    pub(crate) interest: HashMap<String, InterestView>,
}

impl MeshSnapshot {
    /// Builds the snapshot from the live records and the views known before (`known`, which
    /// it updates): a region's view only moves to newer versions, so a region whose live
    /// nodes are silent, unreachable or behind keeps the newest set seen, and its backlog
    /// waits for it instead of being skipped.
    pub(super) fn build(
        nodes: Vec<NodeRecord>,
        known: &mut BTreeMap<String, InterestView>,
    ) -> Self {
        for node in &nodes {
            let filters: Vec<SubjectFilter> = node
                .interest
                .iter()
                .filter_map(|p| SubjectFilter::new(p.clone()).ok())
                .collect();
            known
                .entry(node.region.clone())
                .or_default()
                .merge(node, &filters);
        }
        Self {
            nodes,
            interest: known.iter().map(|(r, v)| (r.clone(), v.clone())).collect(),
        }
    }

    /// Every region known: those with live nodes and those seen before.
    pub(super) fn regions(&self) -> BTreeSet<String> {
        self.nodes
            .iter()
            .map(|n| n.region.clone())
            .chain(self.interest.keys().cloned())
            .collect()
    }

    /// Where to send a batch for `region`'s partition of a topic created there with
    /// `initial` partitions: its leader first, then the region's other nodes (which pass it
    /// to their leader). A split's child is led with the partition it descends from (its
    /// Raft group is that one's).
    pub(super) fn targets(
        &self,
        region: &str,
        topic: &str,
        partition: u32,
        initial: u32,
    ) -> Vec<SocketAddr> {
        let in_region = || self.nodes.iter().filter(|n| n.region == region);
        let root = ferry_proto::root_of(partition, initial);
        // Records list their leads sorted (gossip refuses others).
        let leader = in_region().find(|n| ferry_router::leads_partition(&n.leads, topic, root));
        let mut out: Vec<SocketAddr> = leader.map(|n| n.addr).into_iter().collect();
        for n in in_region() {
            if !out.contains(&n.addr) {
                out.push(n.addr);
            }
        }
        out
    }

    /// Nodes of third regions that can relay to `destination`, those that reach it
    /// directly first.
    pub(super) fn relays(&self, source: &str, destination: &str) -> Vec<(String, SocketAddr)> {
        let mut relays: Vec<&NodeRecord> = self
            .nodes
            .iter()
            .filter(|n| n.region != source && n.region != destination)
            .collect();
        relays.sort_by_key(|n| (!n.reach.iter().any(|r| r == destination), n.id));
        relays
            .into_iter()
            .map(|n| (n.region.clone(), n.addr))
            .collect()
    }

    pub(super) fn wants(&self, region: &str, subject: &str) -> bool {
        self.interest
            .get(region)
            .is_some_and(|view| view.filters.iter().any(|f| f.matches(subject)))
    }

    /// Whether `region` wants an event with `subject` appended at `appended_at_ms` (this
    /// region's clock), allowing the clocks to differ by `skew_ms`.
    pub(super) fn judge(
        &self,
        region: &str,
        subject: &str,
        appended_at_ms: u64,
        skew_ms: u64,
    ) -> Judgement {
        let Some(view) = self.interest.get(region) else {
            return Judgement::Undecided;
        };
        if view.filters.iter().any(|f| f.matches(subject)) {
            Judgement::Wanted
        } else if view.as_of_ms >= appended_at_ms.saturating_add(skew_ms) {
            Judgement::Unwanted
        } else {
            Judgement::Undecided
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, region: &str, interest: &[&str]) -> NodeRecord {
        NodeRecord {
            id,
            region: region.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 7000 + id as u16)),
            role: "node".into(),
            leads: vec![ferry_router::LedGroup {
                topic: "orders".into(),
                groups: 1,
                group: 0,
            }]
            .into(),
            interest: interest.iter().map(|s| s.to_string()).collect(),
            interest_version: if interest.is_empty() { 0 } else { 10 },
            ..NodeRecord::default()
        }
    }

    /// `record` at interest version `version`, vouched for as of `as_of_ms`.
    fn vouched(
        id: u64,
        region: &str,
        interest: &[&str],
        version: u64,
        as_of_ms: u64,
    ) -> NodeRecord {
        NodeRecord {
            interest_version: version,
            interest_as_of_ms: as_of_ms,
            ..record(id, region, interest)
        }
    }

    #[test]
    fn a_silent_region_keeps_its_interest_and_a_newer_version_replaces_it() {
        let mut known = BTreeMap::new();
        let all = vec![
            record(1, "a", &[]),
            record(2, "b", &["orders.>"]),
            record(3, "c", &["orders.eu.*"]),
        ];
        let s = MeshSnapshot::build(all, &mut known);
        assert!(s.wants("b", "orders.created"));
        assert!(s.wants("c", "orders.eu.created"));
        assert!(!s.wants("c", "orders.us.created"));
        assert!(!s.wants("a", "orders.created"));
        assert_eq!(s.targets("b", "orders", 0, 1), vec![all_addr(2)]);

        // b goes silent (dead in gossip, or cut off): still a destination, same interest.
        let s = MeshSnapshot::build(
            vec![record(1, "a", &[]), vouched(3, "c", &[], 11, 0)],
            &mut known,
        );
        assert!(s.wants("b", "orders.created"));
        assert!(s.regions().contains("b"));
        assert!(s.targets("b", "orders", 0, 1).is_empty());
        // c removed its interest (a newer version): that counts.
        assert!(!s.wants("c", "orders.eu.created"));
        // Relays for b from a: c's node.
        assert_eq!(s.relays("a", "b"), vec![("c".to_string(), all_addr(3))]);
    }

    #[test]
    fn a_splits_child_is_sent_to_the_leader_of_the_group_it_descends_from() {
        // Four partitions in three groups, grown to six: partition 5 descends from 1, so it
        // is in group 1 (not 5 % 3 = 2).
        let leading = |id: u64, group: u32| NodeRecord {
            leads: vec![ferry_router::LedGroup {
                topic: "orders".into(),
                groups: 3,
                group,
            }]
            .into(),
            ..record(id, "b", &["orders.>"])
        };
        let s = MeshSnapshot::build(vec![leading(2, 2), leading(3, 1)], &mut BTreeMap::new());
        assert_eq!(s.targets("b", "orders", 5, 4)[0], all_addr(3));
        assert_eq!(s.targets("b", "orders", 2, 4)[0], all_addr(2));
    }

    #[test]
    fn a_node_behind_its_metadata_group_never_shrinks_a_regions_interest() {
        let mut known = BTreeMap::new();
        MeshSnapshot::build(vec![vouched(2, "b", &["orders.>"], 10, 5_000)], &mut known);
        // Only a restarted follower of b is up; it has not applied the interest yet.
        let s = MeshSnapshot::build(vec![vouched(4, "b", &[], 3, 0)], &mut known);
        assert!(s.wants("b", "orders.created"));
        assert_eq!(s.interest["b"].version, 10);
        assert_eq!(s.interest["b"].as_of_ms, 5_000);
        // Nor does a leader that vouches for an older version (a clock running behind
        // cannot make an old set look new).
        let s = MeshSnapshot::build(vec![vouched(4, "b", &[], 3, 9_000)], &mut known);
        assert!(s.wants("b", "orders.created"));
        assert_eq!(s.interest["b"].as_of_ms, 5_000);
        // The same version vouched for later moves the time forward, never back.
        MeshSnapshot::build(vec![vouched(5, "b", &["orders.>"], 10, 7_000)], &mut known);
        let s = MeshSnapshot::build(vec![vouched(6, "b", &["orders.>"], 10, 6_000)], &mut known);
        assert_eq!(s.interest["b"].as_of_ms, 7_000);
    }

    #[test]
    fn an_event_is_unwanted_only_once_the_region_vouched_for_its_interest_after_it() {
        let mut known = BTreeMap::new();
        let s = MeshSnapshot::build(vec![vouched(2, "b", &["orders.>"], 10, 10_000)], &mut known);
        // Matches: wanted whatever the view's age.
        assert_eq!(s.judge("b", "orders.x", 50_000, 250), Judgement::Wanted);
        // Appended well before the vouched moment: no later interest can be meant for it.
        assert_eq!(s.judge("b", "audit.x", 9_000, 250), Judgement::Unwanted);
        assert_eq!(s.judge("b", "audit.x", 9_750, 250), Judgement::Unwanted);
        // Within the skew margin, or after: wait.
        assert_eq!(s.judge("b", "audit.x", 9_751, 250), Judgement::Undecided);
        assert_eq!(s.judge("b", "audit.x", 12_000, 250), Judgement::Undecided);
        // A region never heard of: wait.
        assert_eq!(s.judge("z", "audit.x", 0, 250), Judgement::Undecided);
        // A view nobody vouched for (only followers advertise it): wait.
        let s = MeshSnapshot::build(vec![vouched(7, "c", &[], 0, 0)], &mut known);
        assert_eq!(s.judge("c", "audit.x", 1, 0), Judgement::Undecided);
    }

    fn all_addr(id: u64) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 7000 + id as u16))
    }
}
