//! Replica moves: a topic's Raft group gives its replica on one node to another, online.
//! A move is recorded in the metadata group ([`ReplicaMove`]); the target node then runs the
//! group (empty, uninitialised, or the replica it still held) and the group's leader carries
//! the move out, one idempotent step per round ([`next_step`]): once the target says it runs
//! the group as the move's target ([`Node::ready_for_replica`]), add it as a learner, wait
//! until it holds the log
//! (a snapshot streamed from the batch files, then the tail), hand leadership over if the
//! leader is the node leaving, replace the leaving voter by the target in one joint change
//! (the group never has fewer voters than before), and record the move as done, which
//! updates the placement; the node that left then stops the group and deletes its data.
//! Which moves to make is planned in [`crate::balance`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ferry_net::Transport;
use ferry_proto::wire::{
    ApiError, ClientRequest, ClientResponse, ErrorCode, MoveInfo, PlannedChange,
};
use ferry_proto::NodeId;
use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, ChangeMembers};

use crate::balance::{after_moves, placements, plan_balance, plan_leaders, plan_moves};
use crate::command::MetaCommand;
use crate::metadata::{Placement, ReplicaMove, TopicState};
use crate::node::{now_ms, partition_group, PartitionGroup};
use crate::peer::{PeerRequest, PeerResponse};
use crate::Node;

/// How far behind the leader's log a learner may be when it is made a voter.
const MOVE_CATCH_UP_SLACK: u64 = 64;

/// A group's Raft membership and replication as its leader's metrics show it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct GroupView {
    pub(crate) voters: BTreeSet<NodeId>,
    pub(crate) learners: BTreeSet<NodeId>,
    /// A joint configuration is in effect (a change is under way).
    pub(crate) joint: bool,
    /// A joint configuration that an earlier term's leader appended and did not finish (it
    /// went down between the change's two steps): the voters it was going to. openraft does
    /// not finish it by itself, and no later change can start until it is.
    pub(crate) left_over: Option<BTreeSet<NodeId>>,
    pub(crate) last_index: u64,
    /// The last log index each follower and learner holds (on the leader).
    pub(crate) matched: BTreeMap<NodeId, u64>,
}

impl GroupView {
    pub(crate) fn of(group: &PartitionGroup) -> Self {
        Self::from_metrics(&group.raft.metrics().borrow_watched())
    }

    /// From any group's Raft metrics (the metadata group's too).
    pub(crate) fn from_metrics(m: &openraft::RaftMetrics<ferry_store::TypeConfig>) -> Self {
        let membership = m.membership_config.membership();
        Self {
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            joint: membership.get_joint_config().len() > 1,
            left_over: left_over_joint(m),
            last_index: m.last_log_index.unwrap_or(0),
            matched: m
                .replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .map(|(id, log)| (*id, log.map_or(0, |l| l.index)))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// The voters a joint configuration was going to, if one is in effect that a leader of an
/// earlier term appended (so no change of this leader's is on its way to finish it).
pub(crate) fn left_over_joint(
    m: &openraft::RaftMetrics<ferry_store::TypeConfig>,
) -> Option<BTreeSet<NodeId>> {
    let configs = m.membership_config.membership().get_joint_config();
    let appended_in = m.membership_config.log_id().as_ref()?.leader_id.term;
    (configs.len() > 1 && appended_in < m.current_term)
        .then(|| configs.last().cloned())
        .flatten()
}

/// What the group's leader `me` does next for a move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MoveStep {
    /// Add the target as a learner.
    AddLearner,
    /// The target is a learner catching up: it holds the log up to `matched` of `last`.
    CatchUp { matched: u64, last: u64 },
    /// This node is the one leaving: leadership goes to `to` first.
    HandOver { to: NodeId },
    /// Change the voters to these (the leaving one out, the target in).
    Replace(BTreeSet<NodeId>),
    /// The leaving node is out and the target votes: record the move as done.
    Finish,
    /// A membership change is under way.
    Wait,
}

/// The next step of `m` on its group's leader `me`.
pub(crate) fn next_step(m: &ReplicaMove, me: NodeId, group: &GroupView) -> MoveStep {
    if group.joint {
        // A change a leader that went down left half done is finished first (its goal was
        // this move's, or the move's next steps start over from where it leaves them).
        return match &group.left_over {
            Some(voters) => MoveStep::Replace(voters.clone()),
            None => MoveStep::Wait,
        };
    }
    let (from, to) = (m.from, m.to);
    let from_in = group.voters.contains(&from) || group.learners.contains(&from);
    if group.voters.contains(&to) && !from_in {
        return MoveStep::Finish;
    }
    if !group.voters.contains(&to) && !group.learners.contains(&to) {
        return MoveStep::AddLearner;
    }
    if group.learners.contains(&to) {
        let matched = group.matched.get(&to).copied().unwrap_or(0);
        if matched + MOVE_CATCH_UP_SLACK < group.last_index || matched == 0 {
            return MoveStep::CatchUp {
                matched,
                last: group.last_index,
            };
        }
    }
    if me == from {
        // Leadership goes first to another voter that holds the log; with none (a group of
        // one replica), the target votes first.
        if group.voters.iter().all(|v| *v == from) {
            return MoveStep::Replace(group.voters.iter().copied().chain([to]).collect());
        }
        return match group.hand_over_target(from, &BTreeSet::new()) {
            Some(to) => MoveStep::HandOver { to },
            None => MoveStep::Wait, // until a voter holds the whole log
        };
    }
    let mut voters = group.voters.clone();
    voters.remove(&from);
    voters.insert(to);
    MoveStep::Replace(voters)
}

impl GroupView {
    /// The voter, other than `leaving` and not in `avoid`, that holds the leader's whole log
    /// (the one leadership can go to without a failed election: openraft's target refuses
    /// a transfer while its log is behind); None if no voter does.
    pub(crate) fn hand_over_target(
        &self,
        leaving: NodeId,
        avoid: &BTreeSet<NodeId>,
    ) -> Option<NodeId> {
        self.voters
            .iter()
            .copied()
            .filter(|v| *v != leaving && !avoid.contains(v))
            .find(|v| self.holds_whole_log(*v))
    }

    /// Whether `node` votes and holds the leader's whole log.
    pub(crate) fn holds_whole_log(&self, node: NodeId) -> bool {
        self.voters.contains(&node)
            && self
                .matched
                .get(&node)
                .is_some_and(|m| *m >= self.last_index)
    }

    /// On a group's leader `me` (per its metrics `m`): the voter to hand leadership to, not
    /// one of `avoid` ([`GroupView::hand_over_target`]); None if `me` does not lead.
    pub(crate) fn leader_hand_over(
        m: &openraft::RaftMetrics<ferry_store::TypeConfig>,
        me: NodeId,
        avoid: &BTreeSet<NodeId>,
    ) -> Option<NodeId> {
        if m.current_leader != Some(me) {
            return None;
        }
        Self::from_metrics(m).hand_over_target(me, avoid)
    }
}

impl<T: Transport> Node<T> {
    /// Records a move asked for by a client (`ferry ctl topic move`), checking its nodes.
    pub(crate) async fn request_move(
        &self,
        topic: &str,
        partition: u32,
        from: NodeId,
        to: NodeId,
        original: ClientRequest,
        forwarded: bool,
    ) -> ClientResponse {
        let refuse = |message: String| {
            ClientResponse::Error(ApiError::new(ErrorCode::InvalidRequest, message))
        };
        let Some(state) = self.inner.meta_view.topic(topic) else {
            return ClientResponse::Error(ApiError::new(
                ErrorCode::UnknownTopic,
                format!("no topic named {topic:?}"),
            ));
        };
        if partition >= state.config.partitions {
            return ClientResponse::Error(ApiError::new(
                ErrorCode::UnknownPartition,
                format!(
                    "topic {topic:?} has {} partitions; there is no partition {partition}",
                    state.config.partitions
                ),
            ));
        }
        if !self.region_members().iter().any(|m| m.id == to) {
            return refuse(format!("node {to} is not a member of the region"));
        }
        if self.inner.meta_view.draining().contains(&to) {
            return refuse(format!("node {to} is draining; it takes no replicas"));
        }
        let group = state.group_of(partition);
        if self
            .inner
            .meta_view
            .move_of(topic, group)
            .is_some_and(|m| (m.from, m.to) == (from, to))
        {
            return ClientResponse::Ok; // asked again: it is under way
        }
        let max = self.inner.config.max_moves_per_node;
        let under_way = self.inner.meta_view.moves();
        for node in [from, to] {
            let busy = under_way
                .iter()
                .filter(|m| m.from == node || m.to == node)
                .count();
            if busy >= max {
                return ClientResponse::Error(ApiError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "node {node} takes part in {busy} replica moves already \
                         (max_moves_per_node {max}); ask again when one is done"
                    ),
                ));
            }
        }
        let command = MetaCommand::MoveReplica {
            topic: topic.to_string(),
            group,
            from,
            to,
            at_ms: now_ms(),
        };
        self.meta_write(command, original, forwarded).await
    }

    /// Proposes a metadata command wherever the metadata leader is.
    pub(crate) async fn propose_meta_anywhere(&self, command: MetaCommand) -> Result<(), ApiError> {
        let leader = self.inner.meta.metrics().borrow_watched().current_leader;
        match leader {
            Some(l) if l == self.inner.id => self.propose_meta(command).await,
            Some(l) => match self
                .inner
                .router
                .call(l, &PeerRequest::ProposeMeta(command))
                .await
            {
                Ok(PeerResponse::Done) => Ok(()),
                Ok(PeerResponse::MetaRefused(e)) => Err(e),
                Ok(other) => Err(ApiError::new(
                    ErrorCode::Unavailable,
                    format!("metadata leader {l} answered {}", other.unexpected()),
                )),
                Err(e) => Err(ApiError::new(
                    ErrorCode::Unavailable,
                    format!("metadata leader {l}: {e}"),
                )),
            },
            None => Err(ApiError::new(
                ErrorCode::Unavailable,
                "the metadata group has no leader now",
            )),
        }
    }

    /// Starts the rounds that keep the region's membership and placement moving: on the
    /// metadata leader, the voters and the planned moves; on every node, the steps of the
    /// moves of groups it leads and the hand-over of leaderships off a draining node.
    pub(crate) fn spawn_moves(&self) {
        let every = Duration::from_millis(self.inner.config.raft.heartbeat_ms.max(100) * 2);
        self.spawn_every(every, |node| async move {
            node.maintain_voters().await;
            node.plan_and_record_moves().await;
            node.carry_out_moves().await;
            node.hand_over_if_draining().await;
            node.seal_splits().await;
        });
        let settle = self.inner.config.leader_rebalance_after_ms;
        if settle > 0 {
            let every = Duration::from_millis((settle / 4).clamp(500, 5_000));
            self.spawn_every(every, |node| async move {
                node.hand_over_to_preferred().await;
            });
        }
    }

    /// The plan `ferry ctl rebalance` prints (on the metadata leader), and unless `dry_run`
    /// starts: [`plan_balance`] then [`plan_leaders`].
    pub(crate) async fn rebalance(
        &self,
        dry_run: bool,
        original: ClientRequest,
        forwarded: bool,
    ) -> ClientResponse {
        if let Some(answer) = self.answer_from_meta_leader(&original, forwarded).await {
            return answer;
        }
        let Placement {
            topics,
            moves: under_way,
        } = self.inner.meta_view.placement();
        let groups = placements(&topics);
        let active = self.placement_nodes();
        let loads = self.region_loads().await;
        let moves = plan_balance(&groups, &under_way, &active, &loads, usize::MAX, now_ms());
        let mut all = under_way.clone();
        all.extend(moves.iter().cloned());
        let leaders = plan_leaders(&after_moves(&groups, &all), &active, &loads);
        let plan: Vec<PlannedChange> = moves
            .iter()
            .map(|m| PlannedChange {
                topic: m.topic.clone(),
                group: m.group,
                from: Some(m.from),
                to: m.to,
            })
            .chain(
                leaders
                    .iter()
                    .map(|(topic, group, replicas)| PlannedChange {
                        topic: topic.clone(),
                        group: *group,
                        from: None,
                        to: replicas[0],
                    }),
            )
            .collect();
        if !dry_run && !plan.is_empty() {
            if let Err(e) = self
                .propose_meta(MetaCommand::SetBalancing { on: true })
                .await
            {
                return ClientResponse::Error(e);
            }
        }
        ClientResponse::RebalancePlan(plan)
    }

    /// On the metadata leader, while the region balances: starts the balancing moves the
    /// per-node bound allows; once none is left or under way, spreads preferred leaders and
    /// ends the balancing.
    async fn continue_balancing(&self) {
        if !self.inner.meta_view.balancing() {
            return;
        }
        let Placement {
            topics,
            moves: under_way,
        } = self.inner.meta_view.placement();
        let groups = placements(&topics);
        let active = self.placement_nodes();
        let max = self.inner.config.max_moves_per_node;
        let mut busy: BTreeMap<NodeId, usize> = BTreeMap::new();
        for m in &under_way {
            *busy.entry(m.from).or_default() += 1;
            *busy.entry(m.to).or_default() += 1;
        }
        let loads = self.region_loads().await;
        let plan = plan_balance(&groups, &under_way, &active, &loads, usize::MAX, now_ms());
        if plan.is_empty() {
            if !under_way.is_empty() {
                return;
            }
            for (topic, group, replicas) in plan_leaders(&groups, &active, &loads) {
                let command = MetaCommand::SetReplicaOrder {
                    topic,
                    group,
                    replicas,
                };
                if let Err(e) = self.propose_meta(command).await {
                    tracing::warn!(error = %e, "setting a preferred leader");
                    return;
                }
            }
            if let Err(e) = self
                .propose_meta(MetaCommand::SetBalancing { on: false })
                .await
            {
                tracing::warn!(error = %e, "ending the balancing");
            } else {
                tracing::info!("the region's replicas and preferred leaders are balanced");
            }
            return;
        }
        // A swap of load (two moves, each the other's reverse, one after the other) is
        // recorded whole or not at all, so counts stay even.
        let mut plan = plan.into_iter().peekable();
        while let Some(m) = plan.next() {
            let pair = plan
                .next_if(|n| (n.from, n.to) == (m.to, m.from))
                .map_or_else(|| vec![m.clone()], |n| vec![m.clone(), n]);
            let free = |n: &NodeId| busy.get(n).copied().unwrap_or(0) + pair.len() <= max;
            if !free(&m.from) || !free(&m.to) {
                continue;
            }
            for m in pair {
                *busy.entry(m.from).or_default() += 1;
                *busy.entry(m.to).or_default() += 1;
                if !self.record_move(m, "balancing").await {
                    return;
                }
            }
        }
    }

    /// Hands the leadership of groups this node leads to their preferred leader (the first
    /// replica of the placement) when that node has answered for a while, is a voter that
    /// holds the log and is not draining: so leaderships come back to a node that restarted,
    /// and follow a rebalance.
    async fn hand_over_to_preferred(&self) {
        let settle = Duration::from_millis(self.inner.config.leader_rebalance_after_ms);
        if settle.is_zero() {
            return;
        }
        let draining = self.inner.meta_view.draining();
        let (led, _) = self.led_partitions();
        let mut topic: Option<Arc<TopicState>> = None;
        let mut seen = BTreeSet::new();
        for l in led.iter() {
            // Led partitions come sorted by topic: one metadata lookup per topic.
            if topic.as_ref().is_none_or(|t| *t.config.name != *l.topic) {
                topic = self.inner.meta_view.topic(&l.topic);
            }
            let Some(topic) = topic.as_ref() else {
                continue;
            };
            let g = topic.group_of(l.hosted.partition);
            if !seen.insert((l.topic.clone(), g))
                || self.inner.meta_view.move_of(&l.topic, g).is_some()
            {
                continue;
            }
            let Some(&preferred) = topic.replicas[g as usize].first() else {
                continue;
            };
            if preferred == self.inner.id || draining.contains(&preferred) {
                continue;
            }
            let up_long_enough = self
                .inner
                .quiescence
                .lock()
                .ok()
                .and_then(|q| q.up_for(preferred, std::time::Instant::now()))
                .is_some_and(|up| up >= settle);
            // Only to a voter that holds the whole log (openraft's target refuses otherwise).
            let group = &l.hosted.group;
            if !up_long_enough || !GroupView::of(group).holds_whole_log(preferred) {
                continue;
            }
            tracing::info!(topic = %l.topic, group = g, to = preferred, "handing leadership to the preferred leader");
            group.wake();
            if let Err(e) = group.raft.trigger().transfer_leader(preferred).await {
                tracing::warn!(error = %e, "leadership transfer");
            }
        }
    }

    /// On the metadata leader: records the moves [`plan_moves`] picks.
    async fn plan_and_record_moves(&self) {
        if self.inner.meta.metrics().borrow_watched().current_leader != Some(self.inner.id) {
            return;
        }
        self.continue_balancing().await;
        let members: BTreeSet<NodeId> = self.region_members().iter().map(|m| m.id).collect();
        let draining = self.inner.meta_view.draining();
        let Placement {
            topics,
            moves: under_way,
        } = self.inner.meta_view.placement();
        let groups = placements(&topics);
        let mut leaving: BTreeSet<NodeId> = draining.clone();
        leaving.extend(
            groups
                .iter()
                .flat_map(|g| g.replicas.iter())
                .filter(|r| !members.contains(r)),
        );
        if leaving.is_empty() {
            return;
        }
        let active: Vec<NodeId> = members
            .iter()
            .copied()
            .filter(|m| !draining.contains(m))
            .collect();
        let planned = plan_moves(
            &groups,
            &under_way,
            &active,
            &leaving,
            self.inner.config.max_moves_per_node,
            now_ms(),
        );
        for m in planned {
            if !self.record_move(m, "draining or re-replicating").await {
                return;
            }
        }
    }

    /// Records a planned move (on the metadata leader); false if it was not recorded.
    async fn record_move(&self, m: ReplicaMove, why: &str) -> bool {
        tracing::info!(topic = %m.topic, group = m.group, from = m.from, to = m.to, why, "moving a replica");
        let command = MetaCommand::MoveReplica {
            topic: m.topic,
            group: m.group,
            from: m.from,
            to: m.to,
            at_ms: m.since_ms,
        };
        match self.propose_meta(command).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, why, "recording a replica move");
                false
            }
        }
    }

    /// The hosted group a move is about, if this node leads it.
    fn led_group(&self, m: &ReplicaMove) -> Option<PartitionGroup> {
        let group = self.partition_group(&partition_group(&m.topic, m.group))?;
        let leads = group.raft.metrics().borrow_watched().current_leader == Some(self.inner.id);
        leads.then_some(group)
    }

    /// Takes the next step of every move whose group this node leads.
    async fn carry_out_moves(&self) {
        let moves = self.inner.meta_view.moves();
        if moves.is_empty() {
            return;
        }
        let members: BTreeSet<NodeId> = self.region_members().iter().map(|m| m.id).collect();
        for m in self.inner.meta_view.moves() {
            let Some(group) = self.led_group(&m) else {
                continue;
            };
            // A sleeping group replicates nothing to its new learner: keep it awake.
            group.wake();
            let view = GroupView::of(&group);
            let step = next_step(&m, self.inner.id, &view);
            let name = partition_group(&m.topic, m.group);
            if !members.contains(&m.to)
                && matches!(step, MoveStep::AddLearner | MoveStep::CatchUp { .. })
            {
                // The target left the region before it took the replica: give the move up.
                if let Err(e) = self.cancel_move(&group, &m, &view).await {
                    tracing::warn!(group = %name, to = m.to, error = %e, "giving up a replica move");
                }
                continue;
            }
            if step == MoveStep::AddLearner && !self.target_ready(&m).await {
                tracing::debug!(group = %name, to = m.to, "the move's target does not run the group yet");
                continue;
            }
            let done = match &step {
                MoveStep::AddLearner => match self.member_addr(m.to) {
                    Some(addr) => group
                        .raft
                        .add_learner(
                            m.to,
                            BasicNode {
                                addr: addr.to_string(),
                            },
                            false,
                        )
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    None => Err(format!("node {} is not a member of the region", m.to)),
                },
                MoveStep::HandOver { to } => group
                    .raft
                    .trigger()
                    .transfer_leader(*to)
                    .await
                    .map_err(|e| e.to_string()),
                MoveStep::Replace(voters) => group
                    .raft
                    .change_membership(ChangeMembers::ReplaceAllVoters(voters.clone()), false)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                MoveStep::Finish => self
                    .propose_meta_anywhere(MetaCommand::FinishMove {
                        topic: m.topic.clone(),
                        group: m.group,
                        from: m.from,
                        to: m.to,
                    })
                    .await
                    .map_err(|e| e.to_string()),
                MoveStep::CatchUp { .. } | MoveStep::Wait => Ok(()),
            };
            if done.is_ok() && step == MoveStep::Finish {
                self.inner
                    .moves_finished
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            match done {
                Ok(()) if !matches!(step, MoveStep::CatchUp { .. } | MoveStep::Wait) => {
                    tracing::info!(group = %name, from = m.from, to = m.to, ?step, "replica move step")
                }
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(group = %name, from = m.from, to = m.to, ?step, error = %e, "replica move step failed")
                }
            }
        }
    }

    /// Whether a move's target runs the group as the target ([`Node::ready_for_replica`]),
    /// asked for up to 5 s.
    async fn target_ready(&self, m: &ReplicaMove) -> bool {
        if m.to == self.inner.id {
            return self.ready_for_replica(&m.topic, m.group).await;
        }
        let ask = PeerRequest::ReadyForReplica {
            topic: m.topic.clone(),
            group: m.group,
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.inner.router.call(m.to, &ask)).await,
            Ok(Ok(PeerResponse::ReadyForReplica(true)))
        )
    }

    /// Takes a move's target out of the group (it is a learner at most) and drops the move.
    async fn cancel_move(
        &self,
        group: &PartitionGroup,
        m: &ReplicaMove,
        view: &GroupView,
    ) -> Result<(), String> {
        if view.learners.contains(&m.to) {
            group
                .raft
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([m.to])), false)
                .await
                .map_err(|e| e.to_string())?;
        }
        self.propose_meta_anywhere(MetaCommand::CancelMove {
            topic: m.topic.clone(),
            group: m.group,
            from: m.from,
            to: m.to,
        })
        .await
        .map_err(|e| e.to_string())?;
        tracing::info!(topic = %m.topic, group = m.group, to = m.to, "replica move given up: its target left the region");
        Ok(())
    }

    /// A draining node hands the leadership of every group it leads (and is not moving off
    /// yet) to another voter.
    async fn hand_over_if_draining(&self) {
        let draining = self.inner.meta_view.draining();
        if !draining.contains(&self.inner.id) {
            return;
        }
        let me = self.inner.id;
        let meta_to =
            GroupView::leader_hand_over(&self.inner.meta.metrics().borrow_watched(), me, &draining);
        if let Some(to) = meta_to {
            let _ = self.inner.meta.trigger().transfer_leader(to).await;
        }
        let groups: Vec<PartitionGroup> = self
            .inner
            .partitions
            .read()
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default();
        for group in groups {
            let to =
                GroupView::leader_hand_over(&group.raft.metrics().borrow_watched(), me, &draining);
            if let Some(to) = to {
                group.wake();
                let _ = group.raft.trigger().transfer_leader(to).await;
            }
        }
    }

    /// Replica moves under way in the region.
    pub fn replica_moves_under_way(&self) -> usize {
        self.inner.meta_view.moves().len()
    }

    /// Replica moves this node carried out to the end.
    pub fn replica_moves_finished(&self) -> u64 {
        self.inner
            .moves_finished
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The moves whose group this node leads: (group, from, to, log entries the target
    /// still lacks).
    pub fn replica_moves_led(&self) -> Vec<(String, NodeId, NodeId, u64)> {
        self.inner
            .meta_view
            .moves()
            .into_iter()
            .filter_map(|m| {
                let group = self.led_group(&m)?;
                let view = GroupView::of(&group);
                let matched = view.matched.get(&m.to).copied().unwrap_or(0);
                Some((
                    partition_group(&m.topic, m.group),
                    m.from,
                    m.to,
                    view.last_index.saturating_sub(matched),
                ))
            })
            .collect()
    }

    /// The moves of a topic, with their progress as this node sees them.
    pub(crate) fn move_infos(&self, topic: &str) -> Vec<MoveInfo> {
        self.inner
            .meta_view
            .moves()
            .into_iter()
            .filter(|m| m.topic == topic)
            .map(|m| {
                let progress = match self.partition_group(&partition_group(&m.topic, m.group)) {
                    Some(group) => {
                        let view = GroupView::of(&group);
                        let leads = group.raft.metrics().borrow_watched().current_leader
                            == Some(self.inner.id);
                        match next_step(&m, self.inner.id, &view) {
                            MoveStep::CatchUp { matched, last } if leads => {
                                format!("catching up: holds the log to {matched} of {last}")
                            }
                            MoveStep::CatchUp { .. } => "catching up".into(),
                            MoveStep::AddLearner => "adding the target as a learner".into(),
                            MoveStep::HandOver { .. } => "handing leadership over".into(),
                            MoveStep::Replace(_) => "replacing the voter".into(),
                            MoveStep::Finish => "finishing".into(),
                            MoveStep::Wait => "membership change under way".into(),
                        }
                    }
                    None => "under way".into(),
                };
                MoveInfo {
                    group: m.group,
                    from: m.from,
                    to: m.to,
                    since_ms: m.since_ms,
                    progress,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    fn mv(from: NodeId, to: NodeId) -> ReplicaMove {
        ReplicaMove {
            topic: "t".into(),
            group: 0,
            from,
            to,
            since_ms: 0,
        }
    }

    #[test]
    fn a_move_adds_a_learner_waits_hands_over_replaces_and_finishes() {
        let m = mv(1, 4);
        let mut g = GroupView {
            voters: set(&[1, 2, 3]),
            last_index: 1000,
            ..Default::default()
        };
        assert_eq!(next_step(&m, 2, &g), MoveStep::AddLearner);
        g.learners = set(&[4]);
        g.matched.insert(4, 10);
        assert_eq!(
            next_step(&m, 2, &g),
            MoveStep::CatchUp {
                matched: 10,
                last: 1000
            }
        );
        g.matched.insert(4, 990);
        // The leader that leaves hands over first, to a voter that holds the whole log (not
        // to one behind: openraft's target would refuse, and the leader would stall).
        g.matched.insert(2, 900);
        g.matched.insert(3, 1000);
        assert_eq!(next_step(&m, 1, &g), MoveStep::HandOver { to: 3 });
        assert_eq!(next_step(&m, 2, &g), MoveStep::Replace(set(&[2, 3, 4])));
        g.joint = true;
        assert_eq!(next_step(&m, 2, &g), MoveStep::Wait);
        // The same joint change left by a leader that went down: finished.
        g.left_over = Some(set(&[2, 3, 4]));
        assert_eq!(next_step(&m, 2, &g), MoveStep::Replace(set(&[2, 3, 4])));
        g = GroupView {
            voters: set(&[2, 3, 4]),
            ..Default::default()
        };
        assert_eq!(next_step(&m, 2, &g), MoveStep::Finish);

        // A group of one replica: the target votes first, then takes the leadership, then
        // the old replica goes.
        let mut g = GroupView {
            voters: set(&[1]),
            learners: set(&[4]),
            last_index: 500,
            matched: BTreeMap::from([(4, 500)]),
            ..Default::default()
        };
        assert_eq!(next_step(&m, 1, &g), MoveStep::Replace(set(&[1, 4])));
        g.voters = set(&[1, 4]);
        g.learners.clear();
        assert_eq!(next_step(&m, 1, &g), MoveStep::HandOver { to: 4 });
        assert_eq!(next_step(&m, 4, &g), MoveStep::Replace(set(&[4])));
    }
}
