//! The region's nodes: who they are (the metadata group's Raft membership, voters and
//! learners, each with its address), how a node joins a running region, how many of them
//! vote, and how one leaves. The static `peers` list only forms the region on its first
//! start; from then on the metadata group's membership is the list.
//!
//! Joining: a node not in `peers` asks its seeds ([`PeerRequest::Join`]); the metadata
//! leader checks the request (its certificate names the id it joins as; the id and the
//! address are not another member's), adds it as a learner, and waits until it holds the
//! metadata log. [`plan_voters`] then keeps 3 voters (5 from five nodes on; fewer only in a
//! region that has fewer nodes), promoting caught-up learners.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferry_net::Transport;
use ferry_proto::wire::{ApiError, ClientRequest, ClientResponse, ErrorCode, NodeInfo};
use ferry_proto::NodeId;
use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, ChangeMembers};

use crate::command::MetaCommand;
use crate::peer::{PeerRequest, PeerResponse};
use crate::{Node, RegionError};

/// One node of the region, as the metadata group's membership names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its id.
    pub id: NodeId,
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// Whether it votes in the metadata group.
    pub voter: bool,
}

/// The metadata voters a region of `nodes` nodes keeps: five from five nodes on, three from
/// three, otherwise all of them.
pub fn voter_target(nodes: usize) -> usize {
    match nodes {
        5.. => 5,
        3..=4 => 3,
        n => n,
    }
}

/// The metadata voters to change to, if they should change: `voters` now, `learners` that
/// hold the log (fit to vote), `leaving` nodes (draining or being removed: they give up their
/// vote once a learner can take it), the region's node count `nodes` and the current
/// `leader` (never dropped). Adds learners (lowest ids first) up to the target, then drops
/// leaving voters that a learner replaced, then, above the target, the highest ids.
pub fn plan_voters(
    voters: &BTreeSet<NodeId>,
    learners: &BTreeSet<NodeId>,
    leaving: &BTreeSet<NodeId>,
    nodes: usize,
    leader: NodeId,
) -> Option<BTreeSet<NodeId>> {
    let target = voter_target(nodes);
    let mut next = voters.clone();
    let staying = |set: &BTreeSet<NodeId>| set.iter().filter(|v| !leaving.contains(v)).count();
    let eligible: Vec<NodeId> = learners
        .iter()
        .copied()
        .filter(|l| !leaving.contains(l))
        .collect();
    // As many voters as the target asks and the members allow, an odd count from three on
    // (an even one tolerates no more failures than one fewer).
    let mut wanted = target.min(voters.len() + eligible.len());
    if wanted >= 3 && wanted.is_multiple_of(2) {
        wanted -= 1;
    }
    for learner in eligible {
        if staying(&next) >= wanted {
            break;
        }
        next.insert(learner);
    }
    // A leaving voter gives its vote up once others took enough votes.
    if staying(&next) >= wanted {
        next.retain(|v| !leaving.contains(v) || *v == leader);
    }
    while next.len() > wanted.max(1) {
        // Leaving ones first, then the highest ids.
        // (`max_by_key` answers the last of equals: the highest id.)
        let drop = next
            .iter()
            .copied()
            .filter(|v| *v != leader)
            .max_by_key(|v| leaving.contains(v));
        let Some(drop) = drop else {
            break;
        };
        next.remove(&drop);
    }
    (next != *voters && !next.is_empty()).then_some(next)
}

fn api_error(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError::new(code, message)
}

fn invalid(message: impl Into<String>) -> ApiError {
    api_error(ErrorCode::InvalidRequest, message)
}

/// How far behind the leader's log a learner may be and still count as holding it.
const LEARNER_CAUGHT_UP_SLACK: u64 = 16;

impl<T: Transport> Node<T> {
    /// The region's nodes: the metadata group's membership once this node knows it, the
    /// static `peers` before.
    pub fn region_members(&self) -> Vec<Member> {
        let metrics = self.inner.meta.metrics();
        let metrics = metrics.borrow_watched();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let mut members: Vec<Member> = membership
            .nodes()
            .filter_map(|(id, node)| {
                Some(Member {
                    id: *id,
                    addr: node.addr.parse().ok()?,
                    voter: voters.contains(id),
                })
            })
            .collect();
        if members.is_empty() {
            members = self
                .inner
                .config
                .peers
                .iter()
                .map(|p| Member {
                    id: p.id,
                    addr: p.addr,
                    voter: true,
                })
                .collect();
        }
        members.sort_by_key(|m| m.id);
        members
    }

    /// Asks every other member of the region `request` at once, each for up to `patience`;
    /// answers the replies that came (a member that failed or was too slow adds none).
    pub(crate) async fn ask_other_members(
        &self,
        request: &PeerRequest,
        patience: Duration,
    ) -> Vec<PeerResponse> {
        let peers = self
            .region_members()
            .into_iter()
            .map(|m| m.id)
            .filter(|id| *id != self.inner.id);
        let asks = peers.map(|peer| async move {
            tokio::time::timeout(patience, self.inner.router.call(peer, request))
                .await
                .ok()?
                .ok()
        });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// The ids of the region's nodes that take new replicas (members not draining).
    pub(crate) fn placement_nodes(&self) -> Vec<NodeId> {
        let draining = self.inner.meta_view.draining();
        self.region_members()
            .into_iter()
            .map(|m| m.id)
            .filter(|id| !draining.contains(id))
            .collect()
    }

    /// A member's address.
    pub(crate) fn member_addr(&self, id: NodeId) -> Option<SocketAddr> {
        self.region_members()
            .into_iter()
            .find(|m| m.id == id)
            .map(|m| m.addr)
    }

    /// Keeps the transport's and quiescence's lists of peers in step with the metadata
    /// group's membership.
    pub(crate) fn spawn_membership_watch(&self) {
        let weak = std::sync::Arc::downgrade(&self.inner);
        let mut metrics = self.inner.meta.metrics();
        let mut shutdown = self.shutdown_signal();
        tokio::spawn(async move {
            let mut known: Vec<Member> = Vec::new();
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let node = Node { inner };
                let members = node.region_members();
                if members != known {
                    for m in members.iter().filter(|m| m.id != node.id()) {
                        node.inner.router.transport().set_peer(m.id, m.addr);
                    }
                    let ids: Vec<NodeId> = members
                        .iter()
                        .map(|m| m.id)
                        .filter(|id| *id != node.id())
                        .collect();
                    if let Ok(mut q) = node.inner.quiescence.lock() {
                        q.set_peers(&ids, Instant::now());
                    }
                    tracing::info!(members = ?members.iter().map(|m| (m.id, m.addr, m.voter)).collect::<Vec<_>>(), "region membership");
                    known = members;
                }
                drop(node);
                tokio::select! {
                    changed = metrics.changed() => if changed.is_err() { return },
                    _ = shutdown.wait_for(|down| *down) => return,
                }
            }
        });
    }

    /// For a node not in `peers` that is not a member yet: asks the seeds to let it join,
    /// until one says it is in or the join timeout passes. A refusal (its id or address in
    /// use, ...) ends it at once with the reason.
    pub(crate) async fn join_region(&self) -> Result<(), RegionError> {
        let config = &self.inner.config;
        if !config.joins() || self.is_member() {
            return Ok(());
        }
        let Some(addr) = config.listen_addr() else {
            return Ok(());
        };
        let seeds = config
            .seeds
            .iter()
            .chain(config.peers.iter().map(|p| &p.addr))
            .copied()
            .filter(|s| *s != addr)
            .collect::<Vec<_>>();
        if seeds.is_empty() {
            tracing::info!(
                id = config.id,
                "not a member of a region and no seeds: waiting to be added (`ferry ctl node add`)"
            );
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_millis(config.join_timeout_ms);
        let mut last = Vec::new();
        loop {
            last.clear();
            for seed in &seeds {
                let request = PeerRequest::Join { addr };
                match self.inner.router.call_addr(*seed, &request).await {
                    Ok(PeerResponse::Joined) => {
                        tracing::info!(id = config.id, %seed, "joined the region");
                        return Ok(());
                    }
                    Ok(PeerResponse::JoinRefused(reason)) => {
                        return Err(RegionError::Join(format!("{seed} refused: {reason}")))
                    }
                    Ok(other) => last.push(format!("{seed}: {}", other.unexpected())),
                    Err(e) => last.push(format!("{seed}: {e}")),
                }
            }
            if self.is_member() {
                return Ok(());
            }
            if Instant::now() >= deadline || self.is_shut_down() {
                return Err(RegionError::Join(format!(
                    "no seed let node {} join within {} ms: {}",
                    config.id,
                    config.join_timeout_ms,
                    last.join("; ")
                )));
            }
            tracing::info!(tried = ?last, "joining the region: trying again");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Whether the metadata group's membership (as this node holds it) names this node.
    pub(crate) fn is_member(&self) -> bool {
        let metrics = self.inner.meta.metrics();
        let member = metrics
            .borrow_watched()
            .membership_config
            .membership()
            .nodes()
            .any(|(id, _)| *id == self.inner.id);
        member
    }

    /// Answers a peer's [`PeerRequest::Join`]: on the metadata leader, admits it; elsewhere
    /// passes it to the leader.
    pub(crate) async fn handle_join(&self, from: NodeId, addr: SocketAddr) -> PeerResponse {
        let leader = self.inner.meta.metrics().borrow_watched().current_leader;
        match leader {
            Some(l) if l == self.inner.id => match self.admit(from, addr).await {
                Ok(()) => PeerResponse::Joined,
                Err(e) if e.code == ErrorCode::InvalidRequest => {
                    PeerResponse::JoinRefused(e.message)
                }
                Err(e) => PeerResponse::Error(e.message),
            },
            Some(l) => match self
                .inner
                .router
                .call(l, &PeerRequest::JoinFor { id: from, addr })
                .await
            {
                Ok(r) => r,
                Err(e) => PeerResponse::Error(format!("passing the join to leader {l}: {e}")),
            },
            None => PeerResponse::Error("the metadata group has no leader now".into()),
        }
    }

    /// Admits node `id` at `addr` to the region (on the metadata leader): refuses an id or
    /// an address another member has, checks the node answers there as `id`, adds it as a
    /// learner and waits until it holds the metadata log (its promotion to voter, if the
    /// region needs one, follows in [`Node::maintain_voters`]).
    pub(crate) async fn admit(&self, id: NodeId, addr: SocketAddr) -> Result<(), ApiError> {
        let members = self.region_members();
        if let Some(m) = members.iter().find(|m| m.id == id) {
            if m.addr != addr {
                return Err(invalid(format!(
                    "node id {id} is in use by the node at {}; a new node needs an id of its own",
                    m.addr
                )));
            }
        } else if let Some(m) = members.iter().find(|m| m.addr == addr) {
            return Err(invalid(format!(
                "address {addr} is node {}'s; remove node {} first (`ferry ctl node remove {} \
                 --dead` if it is gone)",
                m.id, m.id, m.id
            )));
        } else if let Some(held) = self.replicas_named(id) {
            // A node removed as dead that Raft groups still count as a voter: an empty node
            // under its id would pass for a replica that holds the log.
            return Err(invalid(format!(
                "node id {id} was removed but {held}; a new node needs an id of its own"
            )));
        }
        // Reach it: the handshake checks its certificate against the region's CA, and it
        // must say it is `id`.
        let transport = self.inner.router.transport();
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            self.inner.router.call_addr(addr, &PeerRequest::Identify),
        )
        .await;
        match answer {
            Ok(Ok(PeerResponse::Identity {
                id: said,
                region,
                tier,
                ..
            })) => {
                if said != id {
                    return Err(invalid(format!(
                        "the node at {addr} is node {said}, not node {id}"
                    )));
                }
                if region != self.inner.config.region {
                    return Err(invalid(format!(
                        "the node at {addr} belongs to region {region:?}, not {:?}",
                        self.inner.config.region
                    )));
                }
                if let Some(differs) = self.tier_differs(&format!("the node at {addr}"), &tier) {
                    return Err(invalid(differs));
                }
            }
            Ok(Ok(other)) => {
                return Err(invalid(format!(
                    "the node at {addr} answered {} when asked who it is",
                    other.unexpected()
                )))
            }
            // Perhaps not up yet: a joining node asks again; `ferry ctl node add` reports it.
            Ok(Err(e)) => {
                return Err(api_error(
                    ErrorCode::Unavailable,
                    format!("node {id} at {addr} cannot be reached: {e}"),
                ))
            }
            Err(_) => {
                return Err(api_error(
                    ErrorCode::Unavailable,
                    format!("node {id} at {addr} did not answer within 5 s"),
                ))
            }
        }
        transport.set_peer(id, addr);
        let meta = &self.inner.meta;
        if !members.iter().any(|m| m.id == id) {
            meta.add_learner(
                id,
                BasicNode {
                    addr: addr.to_string(),
                },
                false,
            )
            .await
            .map_err(|e| {
                api_error(
                    ErrorCode::Unavailable,
                    format!("adding node {id} to the metadata group: {e}"),
                )
            })?;
            tracing::info!(id, %addr, "node added to the region as a learner");
        }
        // Wait until it holds the metadata log, so that it knows the region when told so.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut metrics = meta.metrics();
        loop {
            {
                let m = metrics.borrow_watched();
                let last = m.last_log_index.unwrap_or(0);
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).cloned().flatten())
                    .map_or(0, |l| l.index);
                if matched + LEARNER_CAUGHT_UP_SLACK >= last && matched > 0 {
                    break;
                }
                if m.current_leader != Some(self.inner.id) {
                    return Err(api_error(
                        ErrorCode::Unavailable,
                        "this node stopped leading the metadata group; ask again",
                    ));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, metrics.changed()).await.is_err() {
                return Err(api_error(
                    ErrorCode::Unavailable,
                    format!("node {id} did not catch up with the metadata log within 30 s"),
                ));
            }
        }
        self.maintain_voters().await;
        Ok(())
    }

    /// On the metadata leader, outside a membership change: the voters, the learners that
    /// hold the log, and the member count.
    fn voter_view(&self) -> Option<(BTreeSet<NodeId>, BTreeSet<NodeId>, usize)> {
        let m = self.inner.meta.metrics();
        let m = m.borrow_watched();
        if m.current_leader != Some(self.inner.id) {
            return None;
        }
        let membership = m.membership_config.membership();
        if membership.get_joint_config().len() > 1 {
            return None; // a change is under way
        }
        let last = m.last_log_index.unwrap_or(0);
        let caught_up = |id: &NodeId| {
            m.replication
                .as_ref()
                .and_then(|r| r.get(id).cloned().flatten())
                .is_some_and(|l| l.index + LEARNER_CAUGHT_UP_SLACK >= last)
        };
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: BTreeSet<NodeId> = membership.learner_ids().filter(caught_up).collect();
        Some((voters, learners, membership.nodes().count()))
    }

    /// On the metadata leader: changes the voters as [`plan_voters`] says, promoting only
    /// learners that hold the log.
    pub(crate) async fn maintain_voters(&self) {
        let meta = &self.inner.meta;
        // A change a metadata leader that went down left half done: finished first.
        let left_over = {
            let m = meta.metrics();
            let m = m.borrow_watched();
            (m.current_leader == Some(self.inner.id))
                .then(|| crate::moves::left_over_joint(&m))
                .flatten()
        };
        if let Some(voters) = left_over {
            tracing::info!(
                ?voters,
                "finishing the metadata group's voter change a leader left half done"
            );
            if let Err(e) = meta
                .change_membership(ChangeMembers::ReplaceAllVoters(voters), true)
                .await
            {
                tracing::warn!(error = %e, "finishing a left-over voter change");
            }
            return;
        }
        let Some((voters, learners, nodes)) = self.voter_view() else {
            return;
        };
        let leaving = self.inner.meta_view.draining();
        let Some(next) = plan_voters(&voters, &learners, &leaving, nodes, self.inner.id) else {
            return;
        };
        tracing::info!(?voters, ?next, "changing the metadata group's voters");
        if let Err(e) = meta
            .change_membership(ChangeMembers::ReplaceAllVoters(next), true)
            .await
        {
            tracing::warn!(error = %e, "changing the metadata group's voters");
        }
    }

    /// The region's nodes for `ferry ctl node list`.
    pub(crate) fn node_list(&self) -> Vec<NodeInfo> {
        let draining = self.inner.meta_view.draining();
        let counts = self.replica_counts();
        self.region_members()
            .into_iter()
            .map(|m| {
                let (replicas, moving_in, moving_out) =
                    counts.get(&m.id).copied().unwrap_or_default();
                NodeInfo {
                    id: m.id,
                    addr: m.addr.to_string(),
                    voter: m.voter,
                    draining: draining.contains(&m.id),
                    replicas,
                    moving_in,
                    moving_out,
                }
            })
            .collect()
    }

    /// Per node the placement names (members or not): Raft groups it holds a replica of,
    /// moves to it and moves off it.
    fn replica_counts(&self) -> std::collections::BTreeMap<NodeId, (u32, u32, u32)> {
        let mut counts = std::collections::BTreeMap::<NodeId, (u32, u32, u32)>::new();
        // As of one applied index (see `Placement`): a move finishing meanwhile is counted
        // under way or done, never neither.
        let crate::metadata::Placement { topics, moves } = self.inner.meta_view.placement();
        for g in crate::balance::placements(&topics) {
            for r in g.replicas {
                counts.entry(r).or_default().0 += 1;
            }
        }
        for m in moves {
            counts.entry(m.to).or_default().1 += 1;
            counts.entry(m.from).or_default().2 += 1;
        }
        counts
    }

    /// Node administration (`ferry ctl node ...`), on the metadata leader.
    pub(crate) async fn node_admin(
        &self,
        request: ClientRequest,
        forwarded: bool,
    ) -> ClientResponse {
        if let Some(answer) = self.answer_from_meta_leader(&request, forwarded).await {
            return answer;
        }
        let done = match request {
            ClientRequest::ListNodes => Ok(()),
            ClientRequest::AddNode { id, addr } => match addr.parse::<SocketAddr>() {
                Ok(addr) => self.admit(id, addr).await,
                Err(e) => Err(invalid(format!("node address {addr:?}: {e}"))),
            },
            ClientRequest::DrainNode { id, undo } => self.drain_node(id, undo).await,
            ClientRequest::RemoveNode { id, dead } => self.remove_node(id, dead).await,
            _ => Err(invalid("not a node request")),
        };
        match done {
            Ok(()) => ClientResponse::Nodes(self.node_list()),
            Err(e) => ClientResponse::Error(e),
        }
    }

    async fn drain_node(&self, id: NodeId, undo: bool) -> Result<(), ApiError> {
        let members = self.region_members();
        if !members.iter().any(|m| m.id == id) {
            return Err(invalid(format!("node {id} is not a member of the region")));
        }
        if !undo {
            let draining = self.inner.meta_view.draining();
            let staying = members
                .iter()
                .filter(|m| m.id != id && !draining.contains(&m.id))
                .count();
            let needed = self.largest_replication();
            if staying < needed as usize {
                return Err(invalid(format!(
                    "draining node {id} would leave {staying} nodes to hold replicas, fewer \
                     than the replication factor {needed} of a topic"
                )));
            }
        }
        self.propose_meta(MetaCommand::SetNodeDraining {
            node: id,
            draining: !undo,
        })
        .await
    }

    /// What of the placement still names node `id`, if anything (a replica, a move).
    fn replicas_named(&self, id: NodeId) -> Option<String> {
        let (held, moving_in, moving_out) = self.replica_counts().get(&id).copied()?;
        Some(format!(
            "the placement still names it in {held} Raft groups and {} replica moves",
            moving_in + moving_out
        ))
    }

    /// The largest replication factor of the region's topics.
    pub(crate) fn largest_replication(&self) -> u32 {
        self.inner
            .meta_view
            .topics()
            .iter()
            .map(|t| t.config.replication)
            .max()
            .unwrap_or(0)
    }

    async fn remove_node(&self, id: NodeId, dead: bool) -> Result<(), ApiError> {
        let members = self.region_members();
        let Some(member) = members.iter().find(|m| m.id == id) else {
            return Err(invalid(format!("node {id} is not a member of the region")));
        };
        if id == self.inner.id {
            // The leader does not remove itself: it hands leadership over, and the client
            // asks again (an Unavailable error is retried) and reaches the next leader.
            if let Some(to) = members.iter().find(|m| m.voter && m.id != id) {
                let _ = self.inner.meta.trigger().transfer_leader(to.id).await;
            }
            return Err(api_error(
                ErrorCode::Unavailable,
                format!("node {id} leads the metadata group; it hands leadership over: ask again"),
            ));
        }
        if members.len() == 1 {
            return Err(invalid(format!(
                "node {id} is the region's last node; it cannot be removed"
            )));
        }
        let needed = self.largest_replication() as usize;
        if members.len() - 1 < needed && !dead {
            return Err(invalid(format!(
                "removing node {id} would leave {} nodes, fewer than the replication factor \
                 {needed} of a topic",
                members.len() - 1
            )));
        }
        let (held, moving_in, _) = self.replica_counts().get(&id).copied().unwrap_or_default();
        if !dead {
            if held + moving_in > 0 {
                return Err(invalid(format!(
                    "node {id} holds replicas of {} Raft groups; drain it first (`ferry ctl \
                     node drain {id}`), or remove it with --dead if it is gone for good (its \
                     replicas are then made again from the others)",
                    held + moving_in
                )));
            }
        } else {
            // Its groups must keep a majority of their replicas on members, or they could
            // neither elect nor take a new replica.
            let others: BTreeSet<NodeId> =
                members.iter().map(|m| m.id).filter(|m| *m != id).collect();
            for g in crate::balance::placements(&self.inner.meta_view.topics()) {
                if !g.replicas.contains(&id) {
                    continue;
                }
                let left = g.replicas.iter().filter(|r| others.contains(r)).count();
                if left * 2 <= g.replicas.len() {
                    return Err(invalid(format!(
                        "group {} of topic {:?} would keep {left} of its {} replicas, not a \
                         majority: it could not elect a leader or take a new replica, and what \
                         only node {id} held is lost",
                        g.group,
                        g.topic,
                        g.replicas.len()
                    )));
                }
            }
        }
        let meta = &self.inner.meta;
        let change = if member.voter {
            let Some((mut voters, mut learners, _)) = self.voter_view() else {
                return Err(api_error(
                    ErrorCode::Unavailable,
                    "the metadata group is changing its members now; ask again",
                ));
            };
            voters.remove(&id);
            learners.remove(&id);
            // Keep the voter count: a learner that holds the log takes the vote.
            let leaving = self.inner.meta_view.draining();
            let next = plan_voters(
                &voters,
                &learners,
                &leaving,
                members.len() - 1,
                self.inner.id,
            )
            .unwrap_or(voters);
            ChangeMembers::ReplaceAllVoters(next)
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        // Voters dropped to keep the count odd stay as learners; the node itself goes next.
        meta.change_membership(change, true).await.map_err(|e| {
            api_error(
                ErrorCode::Unavailable,
                format!("removing node {id} from the metadata group: {e}"),
            )
        })?;
        tracing::info!(id, dead, "node removed from the region");
        // A learner that kept its id as a member (a voter removed with retain) goes too.
        if self.region_members().iter().any(|m| m.id == id) {
            meta.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await
                .map_err(|e| {
                    api_error(
                        ErrorCode::Unavailable,
                        format!(
                            "removing node {id}, no longer a voter, from the metadata group: {e}"
                        ),
                    )
                })?;
        }
        if self.inner.meta_view.draining().contains(&id) {
            self.propose_meta(MetaCommand::SetNodeDraining {
                node: id,
                draining: false,
            })
            .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn voters_grow_to_three_then_five_and_leaving_ones_hand_over() {
        assert_eq!(voter_target(1), 1);
        assert_eq!(voter_target(2), 2);
        assert_eq!(voter_target(4), 3);
        assert_eq!(voter_target(7), 5);
        let none = set(&[]);
        // A fourth node stays a learner; a fifth makes two more voters.
        assert_eq!(plan_voters(&set(&[1, 2, 3]), &set(&[4]), &none, 4, 1), None);
        assert_eq!(
            plan_voters(&set(&[1, 2, 3]), &set(&[4, 5]), &none, 5, 1),
            Some(set(&[1, 2, 3, 4, 5]))
        );
        // A learner still catching up is not promoted.
        assert_eq!(plan_voters(&set(&[1, 2, 3]), &set(&[4]), &none, 5, 1), None);
        // A draining voter hands its vote to a learner, never the leader's own.
        assert_eq!(
            plan_voters(&set(&[1, 2, 3]), &set(&[4]), &set(&[2]), 4, 1),
            Some(set(&[1, 3, 4]))
        );
        assert_eq!(
            plan_voters(&set(&[1, 2, 3]), &set(&[]), &set(&[1]), 3, 1),
            None
        );
        // Leaving voters go first when there are too many.
        assert_eq!(
            plan_voters(&set(&[1, 2, 3, 4, 5]), &set(&[]), &set(&[1]), 4, 5),
            Some(set(&[2, 3, 5]))
        );
        // Down to four nodes from five voters: three stay, the leader among them.
        assert_eq!(
            plan_voters(&set(&[1, 2, 3, 4, 5]), &set(&[]), &none, 4, 5),
            Some(set(&[1, 2, 5]))
        );
    }
}
