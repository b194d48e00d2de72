//! Drives [`super::Quiescence`] for a node: every heartbeat interval it asks each peer node
//! (members that joined later too) whether it is up, looks at what the transport received
//! from each, acts on what changed, and asks the followers of idle groups this node leads to
//! sleep. Also answers those asks ([`Node::sleep_asked`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_net::Transport;
use ferry_proto::NodeId;
use ferry_store::GroupId;
use openraft::async_runtime::WatchReceiver;
use openraft::ServerState;

use super::{Action, LeaderView, SleepAsk};
use crate::mesh::lock;
use crate::node::{Node, PartitionGroup};
use crate::peer::{PeerRequest, PeerResponse};

/// Starts the node's quiescence: a round every heartbeat interval asking each peer node (the
/// members of the moment) whether it is up, and the rounds that put idle groups to sleep and
/// wake the groups of peers that went down or came back (none when `raft.quiesce_after_ms`
/// is 0). They end with the node.
pub(crate) fn spawn<T: Transport>(node: &Node<T>) {
    let raft = node.inner.config.raft;
    if raft.quiesce_after_ms == 0 {
        return;
    }
    let every = Duration::from_millis(raft.heartbeat_ms);
    // A peer that sends packets is counted down only after it answered nothing for four
    // election timeouts (`down_unanswered`): a loaded peer's late answer still counts.
    let patience = Duration::from_millis(raft.election_max_ms * 4);
    // The peers asked now: one ask per peer at a time, however long a silent one keeps it.
    let asking: Arc<Mutex<BTreeSet<NodeId>>> = Arc::default();
    node.spawn_every(every, move |node| {
        let asking = asking.clone();
        async move { node.ask_peers_alive(&asking, patience) }
    });
    // Thousands of asks in one request may take a loaded follower a while.
    let asks_patience = Duration::from_millis(raft.election_min_ms);
    node.spawn_every(every, move |node| async move {
        node.quiescence_round(asks_patience).await;
    });
}

/// Reads a leader's metrics for [`super::Quiescence::observe_leader`]; None if this node does not
/// lead the group.
fn leader_view(me: NodeId, group: &PartitionGroup) -> Option<(LeaderView, Vec<NodeId>)> {
    let metrics = group.raft.metrics();
    let m = metrics.borrow_watched();
    if m.current_leader != Some(me) || m.state != ServerState::Leader {
        return None;
    }
    let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
    let last = m.last_log_index;
    let replication = m.replication.as_ref();
    let followers: Vec<NodeId> = voters.iter().copied().filter(|v| *v != me).collect();
    let lagging = followers
        .iter()
        .copied()
        .filter(|f| {
            replication
                .and_then(|r| r.get(f))
                .is_none_or(|l| l.as_ref().map(|l| l.index) != last)
        })
        .collect();
    Some((
        LeaderView {
            term: m.current_term,
            last_index: last,
            applied: m.last_applied.as_ref().map(|l| l.index) == last,
            followers,
            lagging,
            proposals: group.quiet.proposals(),
        },
        voters,
    ))
}

/// A peer being asked whether it is up; no longer once this is dropped, however its ask
/// ended.
struct Asking {
    peers: Arc<Mutex<BTreeSet<NodeId>>>,
    peer: NodeId,
}

impl Drop for Asking {
    fn drop(&mut self) {
        lock(&self.peers).remove(&self.peer);
    }
}

impl<T: Transport> Node<T> {
    /// Asks every peer the quiescence knows now (members that joined since the start
    /// included) whether it is up, each on its own task, except those whose last ask still
    /// waits for its answer.
    fn ask_peers_alive(&self, asking: &Arc<Mutex<BTreeSet<NodeId>>>, patience: Duration) {
        let peers: Vec<NodeId> = lock(&self.inner.quiescence).peers().collect();
        for peer in peers {
            if !lock(asking).insert(peer) {
                continue;
            }
            let node = self.clone();
            let asked = Asking {
                peers: asking.clone(),
                peer,
            };
            let mut shutdown = self.shutdown_signal();
            tokio::spawn(async move {
                let _asked = asked;
                let request = PeerRequest::Alive {
                    boot: node.inner.boot,
                };
                let call = tokio::time::timeout(patience, node.inner.router.call(peer, &request));
                tokio::select! {
                    answer = call => {
                        if let Ok(Ok(PeerResponse::Alive { boot })) = answer {
                            let actions =
                                lock(&node.inner.quiescence).heard(peer, boot, Instant::now());
                            node.act(actions);
                        }
                    }
                    _ = shutdown.wait_for(|down| *down) => {}
                }
            });
        }
    }

    fn act(&self, actions: Vec<Action>) {
        let mut elections = 0;
        for action in actions {
            let (group, elect) = match action {
                Action::Wake(g) => (g, false),
                Action::Elect(g) => (g, true),
            };
            let Some(g) = self.partition_group(&group) else {
                continue;
            };
            // The record of a group that woke since it slept is stale: an awake group elects
            // by its own timers.
            if !g.quiet.is_asleep() {
                continue;
            }
            g.wake();
            if elect {
                elections += 1;
                tokio::spawn(async move {
                    // A real election, as the group's own timer would call (pre-vote is
                    // off); at once rather than at its next tick.
                    if let Err(e) = g.raft.trigger().elect(false).await {
                        tracing::debug!(%group, error = %e, "election not called");
                    }
                });
            }
        }
        if elections > 0 {
            tracing::info!(
                elections,
                "calling elections in sleeping groups whose leader's node is down"
            );
            self.inner
                .quiescence_elections
                .fetch_add(elections, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Marks silent peers down (their groups elect), then, when a scan is due, asks the
    /// followers of idle groups this node leads to sleep, waiting `patience` for their
    /// answers.
    async fn quiescence_round(&self, patience: Duration) {
        let me = self.inner.id;
        let now = Instant::now();
        let actions = {
            let mut q = lock(&self.inner.quiescence);
            let peers: Vec<NodeId> = q.peers().collect();
            for peer in peers {
                q.received(peer, self.inner.router.received_from(peer), now);
            }
            q.tick(now)
        };
        self.act(actions);

        // Idle groups this node leads: ask their followers to sleep.
        let mut asks: BTreeMap<NodeId, Vec<SleepAsk>> = BTreeMap::new();
        // (group, its id, its proposals when asked, its voters, followers asked)
        let mut asked: Vec<(PartitionGroup, GroupId, u64, Vec<NodeId>, usize)> = Vec::new();
        // Sleeping groups with no live leader that no record woke.
        let mut stranded = Vec::new();
        {
            let Ok(partitions) = self.inner.partitions.read() else {
                return;
            };
            let mut q = lock(&self.inner.quiescence);
            let sweep = q.sweep_due(now);
            if !q.scan_due(now) && !sweep {
                return;
            }
            for (id, group) in partitions.iter() {
                if group.quiet.is_asleep() {
                    if sweep {
                        let leader = group.raft.metrics().borrow_watched().current_leader;
                        if q.stranded(id, leader) {
                            stranded.push(group.clone());
                        }
                    }
                    continue;
                }
                let Some((view, voters)) = leader_view(me, group) else {
                    q.not_leading(id);
                    continue;
                };
                if !q.observe_leader(id, &view, now) {
                    continue;
                }
                let Some(index) = view.last_index else {
                    continue;
                };
                let live: Vec<NodeId> = view
                    .followers
                    .iter()
                    .copied()
                    .filter(|f| !q.is_down(*f))
                    .collect();
                for follower in &live {
                    asks.entry(*follower).or_default().push(SleepAsk {
                        group: id.clone(),
                        term: view.term,
                        index,
                    });
                }
                asked.push((
                    group.clone(),
                    id.clone(),
                    view.proposals,
                    voters,
                    live.len(),
                ));
            }
        }
        if !stranded.is_empty() {
            tracing::info!(
                groups = stranded.len(),
                "waking sleeping groups with no live leader"
            );
            for group in stranded {
                group.wake();
            }
        }
        if asked.is_empty() {
            return;
        }
        let answers =
            futures::future::join_all(asks.into_iter().map(|(follower, asks)| async move {
                let request = PeerRequest::Sleep { leader: me, asks };
                let answer =
                    tokio::time::timeout(patience, self.inner.router.call(follower, &request))
                        .await;
                let slept = match (answer, request) {
                    (Ok(Ok(PeerResponse::Slept(slept))), PeerRequest::Sleep { asks, .. }) => asks
                        .into_iter()
                        .zip(slept)
                        .filter(|(_, yes)| *yes)
                        .map(|(ask, _)| ask.group)
                        .collect(),
                    _ => Vec::new(),
                };
                (follower, slept)
            }))
            .await;
        let mut slept_by: BTreeMap<GroupId, usize> = BTreeMap::new();
        for (_, groups) in answers {
            for g in groups {
                *slept_by.entry(g).or_default() += 1;
            }
        }
        let mut q = lock(&self.inner.quiescence);
        for (group, id, proposals, voters, followers) in asked {
            if slept_by.get(&id).copied().unwrap_or(0) < followers {
                continue;
            }
            if group.fall_asleep(proposals) {
                q.slept(id, me, voters);
            }
        }
    }

    /// A leader asks this node to put its replicas of some groups to sleep: each sleeps if
    /// this node follows `leader` in the asked term and has applied the asked log. Answers,
    /// per ask, whether it sleeps.
    pub(crate) fn sleep_asked(&self, leader: NodeId, asks: Vec<SleepAsk>) -> Vec<bool> {
        let Ok(partitions) = self.inner.partitions.read() else {
            return vec![false; asks.len()];
        };
        let mut q = lock(&self.inner.quiescence);
        // Under a leader counted as down, a sleeping replica would never be woken for it.
        let leader_down = q.is_down(leader);
        asks.into_iter()
            .map(|ask| {
                if leader_down {
                    return false;
                }
                let Some(group) = partitions.get(&ask.group) else {
                    return false;
                };
                let voters = {
                    let metrics = group.raft.metrics();
                    let m = metrics.borrow_watched();
                    let follows = m.current_leader == Some(leader)
                        && m.state == ServerState::Follower
                        && m.current_term == ask.term
                        && m.last_log_index == Some(ask.index)
                        && m.last_applied.as_ref().map(|l| l.index) == Some(ask.index);
                    if !follows {
                        return false;
                    }
                    m.membership_config.membership().voter_ids().collect()
                };
                if group.quiet.is_asleep() || group.fall_asleep(group.quiet.proposals()) {
                    q.slept(ask.group, leader, voters);
                    true
                } else {
                    false
                }
            })
            .collect()
    }

    /// Elections this node called because a sleeping group's leader went down.
    pub fn quiescence_elections(&self) -> u64 {
        self.inner
            .quiescence_elections
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How long `peer` has answered this node's asks whether it is up without a break (None:
    /// counted down, not heard yet, not a member, or quiescence off: `raft.quiesce_after_ms`
    /// 0).
    pub fn peer_up_for(&self, peer: NodeId) -> Option<Duration> {
        lock(&self.inner.quiescence).up_for(peer, Instant::now())
    }

    /// The other members of the region this node counts down now (none while quiescence is
    /// off).
    pub fn peers_down(&self) -> Vec<NodeId> {
        lock(&self.inner.quiescence).down_peers()
    }

    /// Partition groups of this node asleep now.
    pub fn partitions_asleep(&self) -> usize {
        self.inner
            .partitions
            .read()
            .map(|p| p.values().filter(|g| g.quiet.is_asleep()).count())
            .unwrap_or(0)
    }
}
