//! Which replica moves and preferred leaders a region wants, as plain functions over the
//! placements: [`plan_moves`] takes replicas off draining nodes and off nodes no longer in the
//! region (removed as dead), a bounded number per node at a time; [`plan_balance`] spreads
//! replicas evenly by count and [`plan_leaders`] spreads preferred leaders. The moves are
//! carried out by [`crate::moves`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ferry_proto::NodeId;

use crate::metadata::{ReplicaMove, TopicState};

/// One Raft group's placement, for planning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupPlacement {
    pub(crate) topic: String,
    pub(crate) group: u32,
    pub(crate) replicas: Vec<NodeId>,
}

/// The placements of every topic's groups.
pub(crate) fn placements(topics: &[Arc<TopicState>]) -> Vec<GroupPlacement> {
    topics
        .iter()
        .flat_map(|t| {
            (0..t.config.groups).map(move |g| GroupPlacement {
                topic: t.config.name.clone(),
                group: g,
                replicas: t.replicas[g as usize].clone(),
            })
        })
        .collect()
}

/// The moves to start now so that no replica stays on a node of `leaving` (draining, or no
/// longer in the region): for each such replica of a group not moving yet, the node of
/// `active` that holds none of the group's replicas and the fewest replicas. A node takes
/// part in at most `max_per_node` moves at once (those `under_way` count).
pub(crate) fn plan_moves(
    groups: &[GroupPlacement],
    under_way: &[ReplicaMove],
    active: &[NodeId],
    leaving: &BTreeSet<NodeId>,
    max_per_node: usize,
    now_ms: u64,
) -> Vec<ReplicaMove> {
    let mut load: BTreeMap<NodeId, usize> = active.iter().map(|n| (*n, 0)).collect();
    for g in groups {
        for r in &g.replicas {
            if let Some(l) = load.get_mut(r) {
                *l += 1;
            }
        }
    }
    let mut busy: BTreeMap<NodeId, usize> = BTreeMap::new();
    for m in under_way {
        *busy.entry(m.from).or_default() += 1;
        *busy.entry(m.to).or_default() += 1;
        if let Some(l) = load.get_mut(&m.to) {
            *l += 1;
        }
    }
    let moving: BTreeSet<(&str, u32)> = under_way
        .iter()
        .map(|m| (m.topic.as_str(), m.group))
        .collect();
    let mut planned = Vec::new();
    for g in groups {
        if moving.contains(&(g.topic.as_str(), g.group)) {
            continue;
        }
        let Some(&from) = g.replicas.iter().find(|r| leaving.contains(r)) else {
            continue;
        };
        if busy.get(&from).copied().unwrap_or(0) >= max_per_node {
            continue;
        }
        let target = load
            .iter()
            .filter(|(n, _)| !g.replicas.contains(n) && !leaving.contains(n))
            .filter(|(n, _)| busy.get(n).copied().unwrap_or(0) < max_per_node)
            .min_by_key(|(n, l)| (**l, **n))
            .map(|(n, _)| *n);
        let Some(to) = target else {
            continue;
        };
        *busy.entry(from).or_default() += 1;
        *busy.entry(to).or_default() += 1;
        *load.entry(to).or_default() += 1;
        planned.push(ReplicaMove {
            topic: g.topic.clone(),
            group: g.group,
            from,
            to,
            since_ms: now_ms,
        });
    }
    planned
}

/// `groups` as they will be once the moves `under_way` are done.
pub(crate) fn after_moves(
    groups: &[GroupPlacement],
    under_way: &[ReplicaMove],
) -> Vec<GroupPlacement> {
    let mut groups = groups.to_vec();
    for m in under_way {
        if let Some(g) = groups
            .iter_mut()
            .find(|g| g.topic == m.topic && g.group == m.group)
        {
            g.replicas.retain(|r| *r != m.from);
            g.replicas.push(m.to);
        }
    }
    groups
}

/// Moves that spread replicas evenly by count over `active` (until the most loaded node
/// holds at most one more than the least), after the moves `under_way`; at most `limit`.
/// A replica goes from the most loaded node to the least loaded one (ties: the lower id),
/// taking a group that is not moving.
pub(crate) fn plan_balance(
    groups: &[GroupPlacement],
    under_way: &[ReplicaMove],
    active: &[NodeId],
    limit: usize,
    now_ms: u64,
) -> Vec<ReplicaMove> {
    let mut groups = after_moves(groups, under_way);
    let mut moving: BTreeSet<(String, u32)> = under_way
        .iter()
        .map(|m| (m.topic.clone(), m.group))
        .collect();
    let mut planned = Vec::new();
    while planned.len() < limit {
        let mut load: BTreeMap<NodeId, usize> = active.iter().map(|n| (*n, 0)).collect();
        for g in &groups {
            for r in &g.replicas {
                if let Some(l) = load.get_mut(r) {
                    *l += 1;
                }
            }
        }
        let Some((&most, &high)) = load
            .iter()
            .max_by_key(|(n, l)| (**l, std::cmp::Reverse(**n)))
        else {
            break;
        };
        let Some((&least, &low)) = load.iter().min_by_key(|(n, l)| (**l, **n)) else {
            break;
        };
        if high <= low + 1 {
            break;
        }
        let Some(g) = groups.iter_mut().find(|g| {
            g.replicas.contains(&most)
                && !g.replicas.contains(&least)
                && !moving.contains(&(g.topic.clone(), g.group))
        }) else {
            break;
        };
        moving.insert((g.topic.clone(), g.group));
        g.replicas.retain(|r| *r != most);
        g.replicas.push(least);
        planned.push(ReplicaMove {
            topic: g.topic.clone(),
            group: g.group,
            from: most,
            to: least,
            since_ms: now_ms,
        });
    }
    planned
}

/// New replica orders that spread preferred leaders (first replicas) evenly over the nodes
/// of `active`: (topic, group, replicas), each the same set reordered.
pub(crate) fn plan_leaders(
    groups: &[GroupPlacement],
    active: &[NodeId],
) -> Vec<(String, u32, Vec<NodeId>)> {
    let mut groups = groups.to_vec();
    let mut changed = BTreeSet::new();
    loop {
        let mut first: BTreeMap<NodeId, usize> = active.iter().map(|n| (*n, 0)).collect();
        for g in &groups {
            if let Some(l) = g.replicas.first().and_then(|f| first.get_mut(f)) {
                *l += 1;
            }
        }
        let Some((&most, &high)) = first
            .iter()
            .max_by_key(|(n, l)| (**l, std::cmp::Reverse(**n)))
        else {
            break;
        };
        // The least preferred node that is a replica of one of `most`'s groups.
        let candidate = first
            .iter()
            .filter(|(_, l)| **l + 1 < high)
            .filter_map(|(n, l)| {
                let at = groups
                    .iter()
                    .position(|g| g.replicas.first() == Some(&most) && g.replicas.contains(n))?;
                Some((*l, *n, at))
            })
            .min();
        let Some((_, least, at)) = candidate else {
            break;
        };
        let g = &mut groups[at];
        g.replicas.retain(|r| *r != least);
        g.replicas.insert(0, least);
        changed.insert(at);
    }
    changed
        .into_iter()
        .map(|at| {
            let g = &groups[at];
            (g.topic.clone(), g.group, g.replicas.clone())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn balancing_evens_out_replicas_and_preferred_leaders() {
        let groups: Vec<GroupPlacement> = (0..6)
            .map(|g| GroupPlacement {
                topic: "t".into(),
                group: g,
                replicas: vec![
                    1 + g as NodeId % 3,
                    1 + (g as NodeId + 1) % 3,
                    1 + (g as NodeId + 2) % 3,
                ],
            })
            .collect();
        // Nodes 4 and 5 joined empty: 18 replicas over 5 nodes → 3 or 4 each.
        let planned = plan_balance(&groups, &[], &[1, 2, 3, 4, 5], 100, 0);
        let after = after_moves(&groups, &planned);
        let mut load: BTreeMap<NodeId, usize> = BTreeMap::new();
        for g in &after {
            assert_eq!(g.replicas.len(), 3);
            let distinct: BTreeSet<_> = g.replicas.iter().collect();
            assert_eq!(distinct.len(), 3, "{:?}", g.replicas);
            for r in &g.replicas {
                *load.entry(*r).or_default() += 1;
            }
        }
        assert!(load.values().all(|l| (3..=4).contains(l)), "{load:?}");
        assert_eq!(planned.len(), 6, "{planned:?}");
        // Balanced already: nothing.
        assert!(plan_balance(&after, &[], &[1, 2, 3, 4, 5], 100, 0).is_empty());
        // A limit bounds the plan.
        assert_eq!(plan_balance(&groups, &[], &[1, 2, 3, 4, 5], 2, 0).len(), 2);

        // Preferred leaders: node 1 first in all four groups, spread over 1, 2, 3.
        let skewed: Vec<GroupPlacement> = (0..4)
            .map(|g| GroupPlacement {
                topic: "t".into(),
                group: g,
                replicas: vec![1, 2, 3],
            })
            .collect();
        let orders = plan_leaders(&skewed, &[1, 2, 3]);
        let mut firsts: BTreeMap<NodeId, usize> = BTreeMap::new();
        let mut reordered = skewed.clone();
        for (_, g, replicas) in &orders {
            reordered[*g as usize].replicas = replicas.clone();
        }
        for g in &reordered {
            *firsts.entry(g.replicas[0]).or_default() += 1;
        }
        assert!(firsts.values().all(|n| (1..=2).contains(n)), "{firsts:?}");
        assert!(plan_leaders(&reordered, &[1, 2, 3]).is_empty());
    }

    #[test]
    fn plans_move_replicas_off_leaving_nodes_to_the_least_loaded_a_few_at_a_time() {
        let groups: Vec<GroupPlacement> = (0..4)
            .map(|g| GroupPlacement {
                topic: "t".into(),
                group: g,
                replicas: vec![1, 2, 3],
            })
            .collect();
        // Node 1 drains; 4 and 5 joined. At most two moves per node at once.
        let planned = plan_moves(&groups, &[], &[2, 3, 4, 5], &set(&[1]), 2, 7);
        let pairs: Vec<(u32, NodeId, NodeId)> =
            planned.iter().map(|m| (m.group, m.from, m.to)).collect();
        assert_eq!(pairs, vec![(0, 1, 4), (1, 1, 5)]);
        // With those under way, nothing more starts for node 1 ...
        assert!(plan_moves(&groups, &planned, &[2, 3, 4, 5], &set(&[1]), 2, 7).is_empty());
        // ... and a group already moving is left alone.
        let one = &planned[..1];
        let next = plan_moves(&groups, one, &[2, 3, 4, 5], &set(&[1]), 2, 7);
        assert_eq!(
            next.iter().map(|m| (m.group, m.to)).collect::<Vec<_>>(),
            vec![(1, 5)]
        );
        // No node can take it: nothing planned.
        assert!(plan_moves(&groups, &[], &[2, 3], &set(&[1]), 2, 7).is_empty());
    }
}
