//! Quiescence: a partition group with nothing to replicate turns its Raft timers off, so
//! thousands of idle partitions cost no heartbeats, no election timers and no wake-ups
//! (CockroachDB's quiescence, with a liveness exchange per node pair standing in for the
//! groups' heartbeats). The state machine here is fed the time, peers' answers and what the
//! leaders' metrics say; the driver (`driver`) owns the clock, the calls and the Rafts.
//!
//! - A leader whose group proposed nothing for `idle_after`, and whose followers hold its
//!   whole log, asks them to sleep (one request per follower node for all such groups). A
//!   follower sleeps if it follows that leader in that term and has applied that whole log.
//!   The leader sleeps once every follower did. Followers on nodes that are down are neither
//!   waited for nor asked.
//! - Asleep is Raft's tick turned off: no heartbeats, no election timeout. A proposal wakes a
//!   leader ([`Quiet::note_proposal`]); an append that carries entries wakes a follower. A
//!   sleeping follower still answers appends and votes.
//! - Every heartbeat interval each node asks every peer node whether it is up and since when
//!   (its boot id). A peer silent for `down_after` (no answer, and no packet on the
//!   connection to it) or unanswering for `down_unanswered` is down: of the groups asleep
//!   under its leadership one live follower, the same for all (chosen by the group's name), calls an
//!   election at once; the others wake only if no new leader woke them within `leader_grace`
//!   and then elect on their own timers.
//! - Every `leader_grace` the sleeping groups are swept: one whose Raft names no leader, or
//!   a leader on a node that is down, wakes and elects on its own timers.
//! - A peer that restarted (new boot id) wakes the sleeping groups this node leads with it,
//!   so its replicas hear from their leader before their own election timeouts, and the ones
//!   it led (if it does not lead them again, they elect). A peer that was down and answers
//!   again with the same boot wakes the groups this node leads with it, which catch it up,
//!   and ends the waits for a winner in groups it led.
//! - A follower refuses to sleep under a leader it counts as down.
//! - A sleeping group whose leader is down elects (or wakes) only while a quorum of its
//!   voters is up: otherwise no election could win, and one called would only unseat a leader
//!   that may merely be too loaded to answer.

mod driver;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_proto::NodeId;
use ferry_store::GroupId;
use serde::{Deserialize, Serialize};

pub(crate) use driver::spawn;

/// A partition group's sleep flag and proposal count, shared by its proposers, its lanes
/// and the driver.
#[derive(Debug, Default)]
pub(crate) struct Quiet {
    asleep: AtomicBool,
    proposals: AtomicU64,
}

impl Quiet {
    /// Counts a proposal; true if the group was asleep, `leads` says this node leads it, and
    /// the caller must wake its Raft.
    ///
    /// The count is taken before the flag is read, and the driver sets the flag before it
    /// reads the count again ([`Quiet::fall_asleep`]), so one of the two always sees the
    /// other: a proposal never leaves its leader asleep.
    pub(crate) fn note_proposal(&self, leads: impl FnOnce() -> bool) -> bool {
        self.proposals.fetch_add(1, Ordering::SeqCst);
        self.is_asleep() && leads() && self.wake()
    }

    /// Proposals so far.
    pub(crate) fn proposals(&self) -> u64 {
        self.proposals.load(Ordering::SeqCst)
    }

    /// Clears the flag; true if it was set (the caller wakes the Raft).
    pub(crate) fn wake(&self) -> bool {
        self.asleep.load(Ordering::SeqCst) && self.asleep.swap(false, Ordering::SeqCst)
    }

    /// Whether the group sleeps.
    pub(crate) fn is_asleep(&self) -> bool {
        self.asleep.load(Ordering::SeqCst)
    }

    /// Sets the flag (the caller has turned the tick off before); false if a proposal came
    /// after `proposals_seen` was read, in which case the flag is left clear and the caller
    /// turns the tick back on.
    pub(crate) fn fall_asleep(&self, proposals_seen: u64) -> bool {
        self.asleep.store(true, Ordering::SeqCst);
        if self.proposals() == proposals_seen {
            return true;
        }
        // A proposal raced the flag: if it saw the flag it already woke the group.
        self.wake();
        false
    }
}

/// A leader's request that a follower's group sleep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SleepAsk {
    pub(crate) group: GroupId,
    /// The leader's term.
    pub(crate) term: u64,
    /// The leader's last log index, committed and held by every follower.
    pub(crate) index: u64,
}

/// What a leader's metrics say about its group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaderView {
    pub(crate) term: u64,
    /// Last log index (None: empty log).
    pub(crate) last_index: Option<u64>,
    /// The leader applied its whole log.
    pub(crate) applied: bool,
    /// The other voters.
    pub(crate) followers: Vec<NodeId>,
    /// Followers that do not hold the whole log.
    pub(crate) lagging: Vec<NodeId>,
    /// The group's proposal count ([`Quiet::proposals`]).
    pub(crate) proposals: u64,
}

/// What the driver must do to a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Turn its tick back on.
    Wake(GroupId),
    /// Turn its tick back on and call an election at once.
    Elect(GroupId),
}

#[derive(Debug)]
struct Peer {
    boot: Option<u64>,
    /// Its last answer to a liveness ask.
    last_heard: Instant,
    /// Its last sign of life: an answer, or packets its transport delivered.
    last_active: Instant,
    /// The transport's last sample of what came from it.
    received: Option<ferry_net::Received>,
    down: bool,
    /// Since when it answers without a break (its first answer, or its first after it was
    /// down or restarted); None until it answered.
    up_since: Option<Instant>,
}

#[derive(Debug)]
struct Idle {
    proposals: u64,
    last_index: Option<u64>,
    since: Instant,
}

/// A group this node put to sleep. The record stays when the group wakes (a proposal or an
/// append clears only its [`Quiet`] flag): the driver acts only on groups still asleep, and
/// the next sleep replaces the record.
#[derive(Debug)]
struct Sleeper {
    leader: NodeId,
    voters: Vec<NodeId>,
    /// When its leader's node went down (a follower that waits for another to win).
    leader_lost: Option<Instant>,
}

/// Timing of quiescence.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// A leader that proposed nothing for this long asks its followers to sleep.
    pub(crate) idle_after: Duration,
    /// A peer that has neither answered nor sent a packet for this long is down.
    pub(crate) down_after: Duration,
    /// A peer that sends packets but has not answered for this long is down too (a process
    /// too loaded to answer a small ask this long, or stuck). Longer than `down_after`: a
    /// survivor saturated by the elections after a death must not count the other survivors
    /// down, which would call their groups' elections too.
    pub(crate) down_unanswered: Duration,
    /// A sleeping follower of a down leader that was not chosen to call the election wakes
    /// after this long without a new leader.
    pub(crate) leader_grace: Duration,
}

/// Quiescence of the partition groups of one node.
#[derive(Debug)]
pub(crate) struct Quiescence {
    me: NodeId,
    timing: Timing,
    peers: BTreeMap<NodeId, Peer>,
    idle: HashMap<GroupId, Idle>,
    asleep: HashMap<GroupId, Sleeper>,
    last_sweep: Instant,
    last_scan: Instant,
}

impl Quiescence {
    /// Node `me` among `peers` (itself left out), started at `now`.
    pub(crate) fn new(me: NodeId, peers: &[NodeId], timing: Timing, now: Instant) -> Self {
        let mut quiescence = Self {
            me,
            timing,
            peers: BTreeMap::new(),
            idle: HashMap::new(),
            asleep: HashMap::new(),
            last_sweep: now,
            last_scan: now,
        };
        quiescence.set_peers(peers, now);
        quiescence
    }

    /// The region's nodes changed: asks the new ones from now on (counted up until they
    /// fail to answer), forgets those gone.
    pub(crate) fn set_peers(&mut self, peers: &[NodeId], now: Instant) {
        let me = self.me;
        self.peers.retain(|id, _| peers.contains(id));
        for p in peers.iter().filter(|p| **p != me) {
            self.peers.entry(*p).or_insert(Peer {
                boot: None,
                last_heard: now,
                last_active: now,
                received: None,
                down: false,
                up_since: None,
            });
        }
    }

    /// Whether the sleeping groups are due for a sweep (every `leader_grace`): the driver
    /// then wakes any whose Raft names no leader, or a leader on a node that is down. It
    /// catches what the records cannot: a leader that stepped down in its sleep to a
    /// candidate that won and died before its first append.
    pub(crate) fn sweep_due(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.last_sweep) < self.timing.leader_grace {
            return false;
        }
        self.last_sweep = now;
        true
    }

    /// Whether the hosted groups are due for a scan for idle leaders (at the first round at
    /// least a quarter of `idle_after` after the last scan, so a group falls asleep up to
    /// about two scan periods later than `idle_after`): with thousands of groups, looking at
    /// each one every heartbeat interval was a large share of a node's idle CPU.
    pub(crate) fn scan_due(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.last_scan) < self.timing.idle_after / 4 {
            return false;
        }
        self.last_scan = now;
        true
    }

    /// The peer nodes asked every round.
    pub(crate) fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.peers.keys().copied()
    }

    /// Whether a sleeping group whose Raft names `leader` has been left without one: no
    /// leader at all, or one on a node that is down which [`Quiescence::tick`] did not handle
    /// for it (it elects, or waits for the chosen follower, when the leader goes down) and a
    /// quorum of its voters is up.
    pub(crate) fn stranded(&self, group: &GroupId, leader: Option<NodeId>) -> bool {
        match leader {
            None => true,
            Some(l) if l == self.me || !self.is_down(l) => false,
            // A record naming it is handled by `tick` once it went down (it elected, or it
            // waits for the chosen follower); one that slept after that was never handled.
            Some(l) => match self.asleep.get(group) {
                None => true,
                Some(s) if s.leader != l => true,
                Some(s) => {
                    s.leader_lost.is_none()
                        && live_quorum(&s.voters, l, |v| self.is_down(v)).is_some()
                }
            },
        }
    }

    /// How long `peer` has answered without a break (None: down, or not heard yet).
    pub(crate) fn up_for(&self, peer: NodeId, now: Instant) -> Option<std::time::Duration> {
        let since = self.peers.get(&peer)?.up_since?;
        Some(now.saturating_duration_since(since))
    }

    /// Whether `peer` is down now.
    pub(crate) fn is_down(&self, peer: NodeId) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.down)
    }

    /// Peers down now.
    pub(crate) fn down_peers(&self) -> Vec<NodeId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.down)
            .map(|(id, _)| *id)
            .collect()
    }

    /// `peer` answered that it runs since boot `boot`: the groups to wake if it restarted or
    /// came back.
    pub(crate) fn heard(&mut self, peer: NodeId, boot: u64, now: Instant) -> Vec<Action> {
        let Some(state) = self.peers.get_mut(&peer) else {
            return Vec::new();
        };
        // A restart wakes the groups this node leads with the peer (their leader's
        // heartbeats reach its replicas before their election timeouts) and the groups the
        // peer led (which elect if it does not lead again). A peer that was down and answers
        // again with the same boot wakes only the groups this node leads with it, to catch it
        // up on what was written without it, and stops the waits for a winner in groups it
        // led: it leads them still.
        let restarted = state.boot.is_some_and(|b| b != boot);
        let back = state.down;
        if restarted || back || state.up_since.is_none() {
            state.up_since = Some(now);
        }
        state.boot = Some(boot);
        state.down = false;
        state.last_heard = now;
        state.last_active = now;
        if !restarted && !back {
            return Vec::new();
        }
        let me = self.me;
        if back && !restarted {
            for sleeper in self.asleep.values_mut() {
                if sleeper.leader == peer {
                    sleeper.leader_lost = None;
                }
            }
        }
        let woken: Vec<GroupId> = self
            .asleep
            .iter()
            .filter(|(_, s)| {
                s.voters.contains(&peer) && (s.leader == me || (restarted && s.leader == peer))
            })
            .map(|(g, _)| g.clone())
            .collect();
        woken
            .into_iter()
            .map(|g| {
                self.asleep.remove(&g);
                Action::Wake(g)
            })
            .collect()
    }

    /// What the transport has received from `peer` so far: a sample that changed since the
    /// last one shows the peer's process runs (it answers nothing: only an answer brings a
    /// peer that is down back, with its boot id).
    pub(crate) fn received(
        &mut self,
        peer: NodeId,
        sample: Option<ferry_net::Received>,
        now: Instant,
    ) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if sample.is_some() && sample != state.received && !state.down {
            state.last_active = now;
        }
        state.received = sample;
    }

    /// Marks down the peers silent for `down_after` (no answer, no packet) or unanswering for
    /// `down_unanswered`; the groups they led elect. Also wakes the followers that waited
    /// `leader_grace` for another to win.
    ///
    /// A sleeping group elects or wakes only while a quorum of its voters is up: otherwise no
    /// election could win, and calling one would only unseat a leader that may be merely too
    /// loaded to answer (after one of three nodes died, a survivor that counts the other down
    /// leaves the other's groups alone). The sweep ([`Quiescence::stranded`]) wakes it once a
    /// quorum is back.
    pub(crate) fn tick(&mut self, now: Instant) -> Vec<Action> {
        let timing = self.timing;
        let mut newly_down = Vec::new();
        for (id, peer) in &mut self.peers {
            let silent = now.saturating_duration_since(peer.last_active) >= timing.down_after;
            let unanswering =
                now.saturating_duration_since(peer.last_heard) >= timing.down_unanswered;
            if !peer.down && (silent || unanswering) {
                peer.down = true;
                peer.up_since = None;
                newly_down.push(*id);
            }
        }
        let down = self.down_peers();
        let mut actions = Vec::new();
        let mut remove = Vec::new();
        for (group, sleeper) in &mut self.asleep {
            let lost_now = newly_down.contains(&sleeper.leader);
            let waited = sleeper
                .leader_lost
                .is_some_and(|at| now.saturating_duration_since(at) >= self.timing.leader_grace);
            if !lost_now && !waited {
                continue;
            }
            let Some(live) = live_quorum(&sleeper.voters, sleeper.leader, |v| down.contains(&v))
            else {
                // No quorum up: leave it asleep; the sweep wakes it when one is back.
                sleeper.leader_lost = None;
                continue;
            };
            if lost_now {
                let chosen = live
                    [ferry_proto::partition_for_key(group.as_bytes(), live.len() as u32) as usize];
                if chosen == self.me {
                    actions.push(Action::Elect(group.clone()));
                    remove.push(group.clone());
                } else {
                    sleeper.leader_lost = Some(now);
                }
            } else {
                actions.push(Action::Wake(group.clone()));
                remove.push(group.clone());
            }
        }
        for group in remove {
            self.asleep.remove(&group);
        }
        actions
    }

    /// A leader's state this round: true if it should ask its followers to sleep now.
    pub(crate) fn observe_leader(
        &mut self,
        group: &GroupId,
        view: &LeaderView,
        now: Instant,
    ) -> bool {
        // A follower that is down is not waited for (a quorum holds the log, or nothing
        // would be committed): it is caught up when it comes back ([`Quiescence::heard`]).
        // Only while a quorum is up, though: a follower counted down may be alive and merely
        // too loaded to answer, and its replica would elect if the leader slept without it.
        let lagging_up = view
            .lagging
            .iter()
            .any(|f| !self.peers.get(f).is_some_and(|p| p.down));
        let voters = view.followers.len() + 1;
        let up = 1 + view.followers.iter().filter(|f| !self.is_down(**f)).count();
        let quorum_up = up > voters / 2;
        let idle = self.idle.entry(group.clone()).or_insert(Idle {
            proposals: view.proposals,
            last_index: view.last_index,
            since: now,
        });
        if idle.proposals != view.proposals || idle.last_index != view.last_index {
            *idle = Idle {
                proposals: view.proposals,
                last_index: view.last_index,
                since: now,
            };
            return false;
        }
        view.applied
            && !lagging_up
            && quorum_up
            && view.last_index.is_some()
            && now.saturating_duration_since(idle.since) >= self.timing.idle_after
    }

    /// This node does not lead `group` (any more).
    pub(crate) fn not_leading(&mut self, group: &GroupId) {
        self.idle.remove(group);
    }

    /// `group` went to sleep under `leader`'s leadership, with these voters.
    pub(crate) fn slept(&mut self, group: GroupId, leader: NodeId, voters: Vec<NodeId>) {
        self.idle.remove(&group);
        self.asleep.insert(
            group,
            Sleeper {
                leader,
                voters,
                leader_lost: None,
            },
        );
    }

    /// Groups asleep now, by this node's record.
    #[cfg(test)]
    pub(crate) fn asleep_count(&self) -> usize {
        self.asleep.len()
    }
}

/// The voters of a group other than its lost `leader` that are up, sorted, if they are a
/// quorum of its voters (None: no election could win).
fn live_quorum(
    voters: &[NodeId],
    leader: NodeId,
    is_down: impl Fn(NodeId) -> bool,
) -> Option<Vec<NodeId>> {
    let mut live: Vec<NodeId> = voters
        .iter()
        .copied()
        .filter(|v| *v != leader && !is_down(*v))
        .collect();
    live.sort_unstable();
    (live.len() > voters.len() / 2).then_some(live)
}

#[cfg(test)]
mod tests;
