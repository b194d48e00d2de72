//! Which replica moves and preferred leaders a region wants, as plain functions over the
//! placements: [`plan_moves`] takes replicas off draining nodes and off nodes no longer in the
//! region (removed as dead), a bounded number per node at a time; [`plan_balance`] spreads
//! replicas and [`plan_leaders`] preferred leaders, evenly by count and then by measured load
//! ([`crate::load`]). The moves are carried out by [`crate::moves`].

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

/// The measured load of groups (events appended per second, [`crate::load`]), and how uneven
/// it may be before balancing acts on it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Loads {
    pub(crate) per_group: BTreeMap<(String, u32), f64>,
    /// Balancing evens out load only while the most loaded node carries more than the least
    /// by this fraction of the mean (0: by count only).
    pub(crate) spread: f64,
}

/// Below this mean load per node, events per second, load is noise: balancing is by count.
const MIN_MEAN_LOAD: f64 = 1.0;

impl Loads {
    fn of(&self, g: &GroupPlacement) -> f64 {
        self.per_group
            .get(&(g.topic.clone(), g.group))
            .copied()
            .unwrap_or(0.0)
    }

    /// Whether node loads from `low` to `high` (of mean `mean`) are worth evening out.
    fn uneven(&self, high: f64, low: f64, mean: f64) -> bool {
        self.spread > 0.0 && mean >= MIN_MEAN_LOAD && high - low > self.spread * mean
    }
}

/// Per node of `active`: how many of `groups` it holds a replica of (or, with `leaders`, is
/// the preferred leader of) and their summed load.
fn node_loads(
    groups: &[GroupPlacement],
    active: &[NodeId],
    loads: &Loads,
    leaders: bool,
) -> BTreeMap<NodeId, (usize, f64)> {
    let mut by_node: BTreeMap<NodeId, (usize, f64)> =
        active.iter().map(|n| (*n, (0, 0.0))).collect();
    for g in groups {
        let load = loads.of(g);
        let nodes = if leaders {
            &g.replicas[..g.replicas.len().min(1)]
        } else {
            &g.replicas[..]
        };
        for n in nodes {
            if let Some((count, sum)) = by_node.get_mut(n) {
                *count += 1;
                *sum += load;
            }
        }
    }
    by_node
}

/// The nodes carrying the most and the least load, and the mean.
fn load_extremes(by_node: &BTreeMap<NodeId, (usize, f64)>) -> Option<(NodeId, NodeId, f64)> {
    let most = by_node
        .iter()
        .max_by(|a, b| a.1 .1.total_cmp(&b.1 .1).then(b.0.cmp(a.0)))?;
    let least = by_node
        .iter()
        .min_by(|a, b| a.1 .1.total_cmp(&b.1 .1).then(a.0.cmp(b.0)))?;
    let mean = by_node.values().map(|(_, l)| l).sum::<f64>() / by_node.len() as f64;
    Some((*most.0, *least.0, mean))
}

/// The next swap of load, while [`Loads::uneven`] says the node carrying the most (replicas,
/// or with `leaders` preferred leaderships) and the one carrying the least are worth evening
/// out: of the groups `eligible(group, on, off)` admits, `a` leaves the loaded node for the
/// light one and `b` goes the other way, the pair that leaves the two closest, if it brings
/// them closer at all. Answers (a, b, loaded node, light node).
fn next_load_swap(
    groups: &[GroupPlacement],
    active: &[NodeId],
    loads: &Loads,
    leaders: bool,
    eligible: impl Fn(&GroupPlacement, NodeId, NodeId) -> bool,
) -> Option<(usize, usize, NodeId, NodeId)> {
    let by_node = node_loads(groups, active, loads, leaders);
    let (most, least, mean) = load_extremes(&by_node)?;
    let (high, low) = (by_node[&most].1, by_node[&least].1);
    if !loads.uneven(high, low, mean) {
        return None;
    }
    let gap = high - low;
    let on = |node: NodeId, off: NodeId| -> Vec<usize> {
        (0..groups.len())
            .filter(|i| eligible(&groups[*i], node, off))
            .collect()
    };
    let (heavy, light) = (on(most, least), on(least, most));
    heavy
        .iter()
        .flat_map(|a| light.iter().map(move |b| (*a, *b)))
        .map(|(a, b)| (a, b, loads.of(&groups[a]) - loads.of(&groups[b])))
        .filter(|(_, _, shift)| *shift > 0.0 && *shift < gap)
        .min_by(|x, y| (gap - 2.0 * x.2).abs().total_cmp(&(gap - 2.0 * y.2).abs()))
        .map(|(a, b, _)| (a, b, most, least))
}

/// Moves that spread replicas evenly over `active`, after the moves `under_way`; at most
/// `limit`. First by count, until the most loaded node holds at most one more than the
/// least: a replica goes from the node with most to the one with fewest (ties: the lower
/// id), of the group not moving that leaves the two nodes' measured loads closest. Then by
/// measured load, while [`Loads::spread`] says it is uneven: two groups swap replicas
/// between the most and the least loaded node (counts stay even), the pair that leaves the
/// two closest.
pub(crate) fn plan_balance(
    groups: &[GroupPlacement],
    under_way: &[ReplicaMove],
    active: &[NodeId],
    loads: &Loads,
    limit: usize,
    now_ms: u64,
) -> Vec<ReplicaMove> {
    let mut groups = after_moves(groups, under_way);
    let mut moving: BTreeSet<(String, u32)> = under_way
        .iter()
        .map(|m| (m.topic.clone(), m.group))
        .collect();
    let mut planned = Vec::new();
    let replace = |g: &mut GroupPlacement, from: NodeId, to: NodeId| {
        g.replicas.retain(|r| *r != from);
        g.replicas.push(to);
        ReplicaMove {
            topic: g.topic.clone(),
            group: g.group,
            from,
            to,
            since_ms: now_ms,
        }
    };
    while planned.len() < limit {
        let by_node = node_loads(&groups, active, loads, false);
        let Some((&most, &(high, most_load))) = by_node
            .iter()
            .max_by_key(|(n, (count, _))| (*count, std::cmp::Reverse(**n)))
        else {
            break;
        };
        let Some((&least, &(low, least_load))) =
            by_node.iter().min_by_key(|(n, (count, _))| (*count, **n))
        else {
            break;
        };
        if high <= low + 1 {
            break;
        }
        let after = |g: &GroupPlacement| {
            let w = loads.of(g);
            ((most_load - w) - (least_load + w)).abs()
        };
        let Some(at) = groups
            .iter()
            .enumerate()
            .filter(|(_, g)| {
                g.replicas.contains(&most)
                    && !g.replicas.contains(&least)
                    && !moving.contains(&(g.topic.clone(), g.group))
            })
            .min_by(|(_, a), (_, b)| after(a).total_cmp(&after(b)))
            .map(|(at, _)| at)
        else {
            break;
        };
        let g = &mut groups[at];
        moving.insert((g.topic.clone(), g.group));
        planned.push(replace(g, most, least));
    }
    // By load: each swap leaves the two extremes strictly closer than they were (they may
    // trade places), so the loop ends; the bound is for safety.
    for _ in 0..groups.len() {
        if planned.len() + 2 > limit {
            break;
        }
        let free = |g: &GroupPlacement, on: NodeId, off: NodeId| {
            g.replicas.contains(&on)
                && !g.replicas.contains(&off)
                && !moving.contains(&(g.topic.clone(), g.group))
        };
        let Some((a, b, most, least)) = next_load_swap(&groups, active, loads, false, free) else {
            break;
        };
        for (at, from, to) in [(a, most, least), (b, least, most)] {
            let g = &mut groups[at];
            moving.insert((g.topic.clone(), g.group));
            planned.push(replace(g, from, to));
        }
    }
    planned
}

/// New replica orders that spread preferred leaders (first replicas) over the nodes of
/// `active`: (topic, group, replicas), each the same set reordered. First by count, until
/// no node prefers more than one group above another; then by measured load, while
/// [`Loads::spread`] says it is uneven: two groups swap preferred leaders between the node
/// leading the most load and the one leading the least, each a replica of the other's
/// group (counts stay even).
pub(crate) fn plan_leaders(
    groups: &[GroupPlacement],
    active: &[NodeId],
    loads: &Loads,
) -> Vec<(String, u32, Vec<NodeId>)> {
    let original = groups;
    let mut groups = groups.to_vec();
    let mut changed = BTreeSet::new();
    let prefer = |g: &mut GroupPlacement, node: NodeId| {
        g.replicas.retain(|r| *r != node);
        g.replicas.insert(0, node);
    };
    loop {
        let first = node_loads(&groups, active, loads, true);
        let Some((&most, &(high, _))) = first
            .iter()
            .max_by_key(|(n, (count, _))| (*count, std::cmp::Reverse(**n)))
        else {
            break;
        };
        // The least preferred node that is a replica of one of `most`'s groups.
        let candidate = first
            .iter()
            .filter(|(_, (count, _))| *count + 1 < high)
            .filter_map(|(n, (count, _))| {
                let at = groups
                    .iter()
                    .position(|g| g.replicas.first() == Some(&most) && g.replicas.contains(n))?;
                Some((*count, *n, at))
            })
            .min();
        let Some((_, least, at)) = candidate else {
            break;
        };
        prefer(&mut groups[at], least);
        changed.insert(at);
    }
    for _ in 0..groups.len() {
        let leads = |g: &GroupPlacement, on: NodeId, off: NodeId| {
            g.replicas.first() == Some(&on) && g.replicas.contains(&off)
        };
        let Some((a, b, most, least)) = next_load_swap(&groups, active, loads, true, leads) else {
            break;
        };
        prefer(&mut groups[a], least);
        prefer(&mut groups[b], most);
        changed.extend([a, b]);
    }
    changed
        .into_iter()
        .filter(|at| groups[*at].replicas != original[*at].replicas)
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
        let planned = plan_balance(&groups, &[], &[1, 2, 3, 4, 5], &Loads::default(), 100, 0);
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
        assert!(plan_balance(&after, &[], &[1, 2, 3, 4, 5], &Loads::default(), 100, 0).is_empty());
        // A limit bounds the plan.
        assert_eq!(
            plan_balance(&groups, &[], &[1, 2, 3, 4, 5], &Loads::default(), 2, 0).len(),
            2
        );

        // Preferred leaders: node 1 first in all four groups, spread over 1, 2, 3.
        let skewed: Vec<GroupPlacement> = (0..4)
            .map(|g| GroupPlacement {
                topic: "t".into(),
                group: g,
                replicas: vec![1, 2, 3],
            })
            .collect();
        let orders = plan_leaders(&skewed, &[1, 2, 3], &Loads::default());
        let mut firsts: BTreeMap<NodeId, usize> = BTreeMap::new();
        let mut reordered = skewed.clone();
        for (_, g, replicas) in &orders {
            reordered[*g as usize].replicas = replicas.clone();
        }
        for g in &reordered {
            *firsts.entry(g.replicas[0]).or_default() += 1;
        }
        assert!(firsts.values().all(|n| (1..=2).contains(n)), "{firsts:?}");
        assert!(plan_leaders(&reordered, &[1, 2, 3], &Loads::default()).is_empty());
    }

    fn loads(per_group: &[(u32, f64)]) -> Loads {
        Loads {
            per_group: per_group
                .iter()
                .map(|(g, l)| (("t".to_string(), *g), *l))
                .collect(),
            spread: 0.25,
        }
    }

    fn placed(replicas: &[&[NodeId]]) -> Vec<GroupPlacement> {
        replicas
            .iter()
            .enumerate()
            .map(|(g, r)| GroupPlacement {
                topic: "t".into(),
                group: g as u32,
                replicas: r.to_vec(),
            })
            .collect()
    }

    fn load_per_node(groups: &[GroupPlacement], loads: &Loads, leaders: bool) -> Vec<f64> {
        node_loads(groups, &[1, 2, 3, 4], loads, leaders)
            .values()
            .map(|(_, l)| *l)
            .collect()
    }

    #[test]
    fn balancing_by_count_moves_the_group_that_evens_out_load() {
        // Node 4 joined empty; nodes 1, 2 and 3 hold every group, group 3 the busy one. Node
        // 4 takes three replicas, the busy group's among them (by count alone it would take
        // the first groups found).
        let groups = placed(&[&[1, 2, 3], &[1, 2, 3], &[1, 2, 3], &[1, 2, 3]]);
        let l = loads(&[(0, 10.0), (1, 10.0), (2, 10.0), (3, 900.0)]);
        let planned = plan_balance(&groups, &[], &[1, 2, 3, 4], &l, 100, 0);
        let after = after_moves(&groups, &planned);
        let counts: Vec<usize> = node_loads(&after, &[1, 2, 3, 4], &l, false)
            .values()
            .map(|(c, _)| *c)
            .collect();
        assert!(counts.iter().all(|c| (3..=4).contains(c)), "{counts:?}");
        assert!(planned.iter().any(|m| m.group == 3), "{planned:?}");
    }

    #[test]
    fn balancing_by_load_swaps_replicas_and_stops_within_the_spread() {
        // Even by count (two replicas each over four nodes), but both hot groups on 1 and 2.
        let groups = placed(&[&[1, 2], &[1, 2], &[3, 4], &[3, 4]]);
        let l = loads(&[(0, 500.0), (1, 500.0), (2, 10.0), (3, 10.0)]);
        let planned = plan_balance(&groups, &[], &[1, 2, 3, 4], &l, 100, 0);
        let after = after_moves(&groups, &planned);
        let per_node = load_per_node(&after, &l, false);
        let (high, low) = per_node
            .iter()
            .fold((f64::MIN, f64::MAX), |(h, lo), x| (h.max(*x), lo.min(*x)));
        assert!(high - low <= 0.25 * 510.0, "{per_node:?} after {planned:?}");
        assert!(
            planned.len().is_multiple_of(2) && !planned.is_empty(),
            "{planned:?}"
        );
        // Balanced now, and by count too: nothing more.
        assert!(plan_balance(&after, &[], &[1, 2, 3, 4], &l, 100, 0).is_empty());
        // Load within the spread, or spread 0: nothing.
        let even = loads(&[(0, 100.0), (1, 90.0), (2, 100.0), (3, 110.0)]);
        assert!(plan_balance(&groups, &[], &[1, 2, 3, 4], &even, 100, 0).is_empty());
        let by_count = Loads {
            spread: 0.0,
            ..l.clone()
        };
        assert!(plan_balance(&groups, &[], &[1, 2, 3, 4], &by_count, 100, 0).is_empty());
        // Idle: noise is not acted on.
        let idle = loads(&[(0, 0.5), (1, 0.5), (2, 0.0), (3, 0.0)]);
        assert!(plan_balance(&groups, &[], &[1, 2, 3, 4], &idle, 100, 0).is_empty());
    }

    #[test]
    fn preferred_leaders_spread_by_load_once_even_by_count() {
        // Each node leads one group of four... node 1 leads both hot ones.
        let groups = placed(&[&[1, 2, 3], &[2, 3, 1], &[3, 1, 2], &[1, 2, 3]]);
        let groups = {
            let mut g = groups;
            g.push(GroupPlacement {
                topic: "t".into(),
                group: 4,
                replicas: vec![4, 1, 2],
            });
            g
        };
        let l = loads(&[(0, 400.0), (1, 5.0), (2, 5.0), (3, 400.0), (4, 5.0)]);
        let orders = plan_leaders(&groups, &[1, 2, 3, 4], &l);
        let mut after = groups.clone();
        for (_, g, replicas) in &orders {
            let mut a = after[*g as usize].replicas.clone();
            a.sort_unstable();
            let mut b = replicas.clone();
            b.sort_unstable();
            assert_eq!(a, b, "a reorder keeps the replica set");
            after[*g as usize].replicas = replicas.clone();
        }
        let per_node = load_per_node(&after, &l, true);
        assert!(
            per_node.iter().filter(|x| **x >= 400.0).count() == 2,
            "the hot groups have two leaders: {per_node:?} after {orders:?}"
        );
        assert!(plan_leaders(&after, &[1, 2, 3, 4], &l).is_empty());
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
