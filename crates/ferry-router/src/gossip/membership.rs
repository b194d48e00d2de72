//! Two-level gossip as a state machine without I/O: fed messages, foca's timers and rounds
//! with the time, drained of messages to send and timers to set. The async driver in
//! `gossip.rs` owns the link and the clock.
//!
//! - **Inside a region**: SWIM membership (foca): probes, indirect probes, suspicion,
//!   refutation. Each node's [`NodeRecord`] spreads as a foca broadcast, re-sent when it
//!   changes, when a member joins and every [`RECORD_REFRESH_ROUNDS`] rounds.
//! - **Between regions**: only router nodes (the [`ROUTERS`] lowest ids alive in a region)
//!   talk. Every round each router pushes its region's summary, with the fresh summaries it
//!   holds of third regions, to one random node of every other region (and to remote seeds
//!   not heard of yet). The receiver spreads summaries that are news through its region as
//!   foca broadcasts. Messages between regions grow with regions, not nodes; a summary
//!   crosses any path of live links, not only direct ones.
//! - A remote region's nodes are live while its summaries keep coming: the newest one was
//!   received less than `dead_after` ago.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use foca::{
    AccumulatingRuntime, Foca, Member, OwnedNotification, PeriodicParams, PostcardCodec, Timer,
};
use rand_foca::rngs::StdRng;
use rand_foca::RngExt;
use tracing::{debug, error, warn};

use super::wire::{Envelope, Item, Known, Peer, RegionSummary, SharedKnown, SummaryNode};
use super::{record, GossipConfig, GossipError, NodeRecord};

/// Router nodes per region: the ones that gossip with other regions.
pub(super) const ROUTERS: usize = 2;
/// A node re-broadcasts its unchanged record this often (rounds), for members that missed it.
pub(super) const RECORD_REFRESH_ROUNDS: u64 = 25;
/// While no other member of its region answers, a node announces itself to its seeds this
/// often (rounds): foca retries only once connected.
pub(super) const SEED_RETRY_ROUNDS: u64 = 5;
/// The largest SWIM packet (foca's limit on what it sends and accepts).
const MAX_PACKET: usize = 256 * 1024;
/// The largest broadcast item (foca frames each with a 16-bit length).
pub(super) const MAX_ITEM: usize = 60 * 1024;
/// Summaries not refreshed for this long are forgotten (the newest of each region is kept,
/// to know where to send).
const FORGET_SUMMARY_AFTER: Duration = Duration::from_secs(600);

/// foca's settings for `interval` and `dead_after`. Probe period `P = dead_after / 6`,
/// suspicion `S = dead_after / 4`: a dead member is probed within about 2P (each member
/// probes one other per period), its probe fails after P, it is declared down S later and
/// the news spreads within a round: about `4.5P + interval`, under `dead_after`.
pub(super) fn foca_config(interval: Duration, dead_after: Duration) -> foca::Config {
    let probe_period = dead_after / 6;
    foca::Config {
        probe_period,
        probe_rtt: probe_period / 2,
        num_indirect_probes: NonZeroUsize::new(3).expect("3"),
        max_transmissions: NonZeroU8::new(8).expect("8"),
        suspect_to_down_after: dead_after / 4,
        // Never forget a down member (seeds included): a region split for hours still
        // heals, as foca keeps announcing to down members. Memory stays bounded by
        // addresses, as a restarted node replaces its old generation.
        remove_down_after: None,
        max_packet_size: NonZeroUsize::new(MAX_PACKET).expect("packet"),
        notify_down_members: true,
        periodic_announce: Some(PeriodicParams {
            frequency: Duration::from_secs(10),
            num_members: NonZeroUsize::new(1).expect("1"),
        }),
        periodic_announce_to_down_members: Some(PeriodicParams {
            frequency: dead_after.max(Duration::from_secs(1)),
            num_members: NonZeroUsize::new(2).expect("2"),
        }),
        periodic_gossip: Some(PeriodicParams {
            frequency: interval,
            num_members: NonZeroUsize::new(3).expect("3"),
        }),
    }
}

/// A member known only by its address, not heard from yet.
fn seed(addr: SocketAddr) -> Peer {
    Peer {
        id: 0,
        addr,
        generation: 0,
    }
}

/// Why a received message was dropped.
#[derive(Debug, thiserror::Error)]
pub(super) enum Dropped {
    /// It does not decode, or foca refused its packet.
    #[error("malformed: {0}")]
    Malformed(String),
    /// It belongs to another mesh, or is a SWIM packet of another region.
    #[error("not ours: {0}")]
    Foreign(String),
}

/// One node's two-level gossip.
pub(super) struct Membership {
    cluster: String,
    region: String,
    node_id: u64,
    dead_after: Duration,
    foca: Foca<Peer, PostcardCodec, StdRng, SharedKnown>,
    runtime: AccumulatingRuntime<Peer>,
    known: SharedKnown,
    /// This node's record, and the sequence of its last broadcast.
    own: Option<NodeRecord>,
    record_seq: u64,
    rounds: u64,
    last_record_round: u64,
    summary_seq: u64,
    seeds: Vec<SocketAddr>,
    remote_seeds: Vec<SocketAddr>,
    rng: StdRng,
    outbox: VecDeque<Outgoing>,
}

/// A message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Outgoing {
    pub(super) to: SocketAddr,
    pub(super) message: Bytes,
    /// Whether it goes to another region.
    pub(super) between_regions: bool,
}

impl Membership {
    pub(super) fn new(config: &GossipConfig, now: Instant) -> Result<Self, GossipError> {
        config.validate()?;
        let identity = Peer {
            id: config.node_id,
            addr: config.advertise,
            generation: config.generation.max(1),
        };
        let known = SharedKnown::new(Known::new(config.region.clone(), now));
        let foca = Foca::with_custom_broadcast(
            identity,
            foca_config(config.interval, config.dead_after),
            rand_foca::make_rng(),
            PostcardCodec,
            known.clone(),
        );
        let mut membership = Self {
            cluster: config.cluster.clone(),
            region: config.region.clone(),
            node_id: config.node_id,
            dead_after: config.dead_after,
            foca,
            runtime: AccumulatingRuntime::new(),
            known,
            own: None,
            record_seq: 0,
            rounds: 0,
            last_record_round: 0,
            summary_seq: 0,
            seeds: config
                .seeds
                .iter()
                .copied()
                .filter(|a| *a != config.advertise)
                .collect(),
            remote_seeds: config
                .remote_seeds
                .iter()
                .copied()
                .filter(|a| *a != config.advertise)
                .collect(),
            rng: rand_foca::make_rng(),
            outbox: VecDeque::new(),
        };
        // Seeds are members not heard from yet: once connected, foca announces to them
        // (as to any down member) until they answer.
        let seeds: Vec<Peer> = membership.seeds.iter().map(|addr| seed(*addr)).collect();
        if let Err(e) = membership.foca.apply_many(
            seeds.into_iter().map(Member::down),
            false,
            &mut membership.runtime,
        ) {
            return Err(GossipError::Start(format!("seeding membership: {e}")));
        }
        membership.announce_to_seeds(now);
        Ok(membership)
    }

    /// Announces this node to every seed of its region.
    fn announce_to_seeds(&mut self, now: Instant) {
        for addr in self.seeds.clone() {
            if let Err(e) = self.foca.announce(seed(addr), &mut self.runtime) {
                debug!(%addr, error = %e, "announce to a seed not sent");
            }
        }
        self.drain_runtime(now);
    }

    /// A message from the peer whose gossip address is `from`.
    pub(super) fn handle_message(
        &mut self,
        now: Instant,
        from: SocketAddr,
        message: &[u8],
    ) -> Result<(), Dropped> {
        let envelope: Envelope = ferry_proto::codec::decode("gossip message", message)
            .map_err(|e| Dropped::Malformed(e.to_string()))?;
        self.known.lock().now = now;
        let result = match envelope {
            Envelope::Swim { cluster, .. } | Envelope::Summaries { cluster, .. }
                if cluster != self.cluster =>
            {
                Err(Dropped::Foreign(format!(
                    "{from} gossips for mesh {cluster:?}"
                )))
            }
            Envelope::Swim { region, .. } if region != self.region => Err(Dropped::Foreign(
                format!("{from} sent a SWIM packet of region {region:?}"),
            )),
            Envelope::Swim { packet, .. } => self
                .foca
                .handle_data(&packet, &mut self.runtime)
                .map_err(|e| Dropped::Malformed(e.to_string())),
            Envelope::Summaries { summaries, .. } => {
                let mut news = false;
                for summary in summaries {
                    news |= self.take_summary(summary);
                }
                // Spread news through the region now rather than at the next round.
                if news {
                    if let Err(e) = self.foca.gossip(&mut self.runtime) {
                        debug!(error = %e, "gossip not sent");
                    }
                }
                Ok(())
            }
        };
        self.drain_runtime(now);
        result
    }

    /// A timer foca asked for is due.
    pub(super) fn handle_timer(&mut self, now: Instant, timer: Timer<Peer>) {
        self.known.lock().now = now;
        if let Err(e) = self.foca.handle_timer(timer, &mut self.runtime) {
            debug!(error = %e, "gossip timer");
        }
        self.drain_runtime(now);
    }

    /// One gossip round: refresh this node's record now and then; as a router, push
    /// summaries to the other regions.
    pub(super) fn tick(&mut self, now: Instant) {
        self.rounds += 1;
        self.known.lock().now = now;
        if self.foca.num_members() == 0 && self.rounds.is_multiple_of(SEED_RETRY_ROUNDS) {
            self.announce_to_seeds(now);
        }
        if self.own.is_some() && self.rounds - self.last_record_round >= RECORD_REFRESH_ROUNDS {
            self.broadcast_own_record(now);
        }
        let newest = self.newest_summaries();
        let as_router = self.is_router();
        if as_router || newest.is_empty() {
            self.push_summaries(now, as_router, &newest);
        }
        self.forget_old_summaries(now, &newest);
    }

    /// Sets this node's record; spreads it at once if it changed.
    pub(super) fn publish(&mut self, now: Instant, record: NodeRecord) -> Result<(), GossipError> {
        if record.id != self.node_id || record.region != self.region {
            return Err(GossipError::InvalidRecord(format!(
                "record of node {} in {:?} published by node {} in {:?}",
                record.id, record.region, self.node_id, self.region
            )));
        }
        if self.own.as_ref() == Some(&record) {
            return Ok(());
        }
        record::validate(&record).map_err(|e| GossipError::InvalidRecord(e.to_string()))?;
        let size = ferry_proto::codec::encode("node record", &record)
            .map_err(|e| GossipError::InvalidRecord(e.to_string()))?
            .len();
        if size > MAX_ITEM {
            return Err(GossipError::InvalidRecord(format!(
                "the record encodes to {size} bytes, over the {MAX_ITEM} a gossip item holds \
                 ({} led groups)",
                record.leads.len()
            )));
        }
        self.own = Some(record);
        self.known.lock().now = now;
        self.broadcast_own_record(now);
        Ok(())
    }

    /// Pushes summaries to `addr` and announces this node to it now (tests, seeding by hand).
    pub(super) fn gossip_with(&mut self, now: Instant, addr: SocketAddr) {
        let newest = self.newest_summaries();
        let summaries = self.summaries_to_push(now, &newest);
        self.send_summaries(addr, summaries);
        if let Err(e) = self.foca.announce(seed(addr), &mut self.runtime) {
            debug!(%addr, error = %e, "announce not sent");
        }
        self.drain_runtime(now);
    }

    /// The live nodes this node knows, sorted by id, one per id: its region's members whose
    /// records it holds (itself included once published), and the nodes of other regions
    /// whose summaries are fresh.
    pub(super) fn live(&self, now: Instant) -> Vec<NodeRecord> {
        let mut out: BTreeMap<u64, NodeRecord> = BTreeMap::new();
        for record in self.live_in_region() {
            out.insert(record.id, record);
        }
        // Other regions: the nodes of each region's newest fresh summary, each with the
        // newest record any fresh summary of the region holds, so two routers whose records
        // differ (one still spreading) never make a node's record alternate.
        let mut remote: BTreeMap<u64, SummaryNode> = BTreeMap::new();
        {
            let known = self.known.lock();
            let fresh: Vec<_> = known
                .summaries
                .values()
                .filter(|held| now.saturating_duration_since(held.received_at) < self.dead_after)
                .collect();
            let mut newest: BTreeMap<&str, &super::wire::HeldSummary> = BTreeMap::new();
            for held in &fresh {
                let entry = newest.entry(held.summary.region.as_str()).or_insert(held);
                if held.received_at > entry.received_at {
                    *entry = held;
                }
            }
            // The newest record of each node over every fresh summary (node ids are unique
            // in the mesh).
            let mut best: BTreeMap<u64, &SummaryNode> = BTreeMap::new();
            for node in fresh.iter().flat_map(|h| h.summary.nodes.iter()) {
                let entry = best.entry(node.record.id).or_insert(node);
                if (node.generation, node.seq) > (entry.generation, entry.seq) {
                    *entry = node;
                }
            }
            for held in newest.values() {
                for node in &held.summary.nodes {
                    let newest_record = best.get(&node.record.id).copied().unwrap_or(node);
                    remote.insert(node.record.id, newest_record.clone());
                }
            }
        }
        for (id, node) in remote {
            out.entry(id).or_insert(node.record);
        }
        out.into_values().collect()
    }

    /// The next message to send.
    pub(super) fn poll_transmit(&mut self) -> Option<Outgoing> {
        self.outbox.pop_front()
    }

    /// The next timer to set: fire `handle_timer` with it after the duration.
    pub(super) fn poll_timer(&mut self) -> Option<(Duration, Timer<Peer>)> {
        self.runtime.to_schedule()
    }

    /// Broadcast items refused so far (malformed, another region's, invalid records).
    pub(super) fn refused_items(&self) -> u64 {
        self.known.lock().refused
    }

    /// The sequence of this node's last record broadcast.
    #[cfg(test)]
    pub(super) fn record_seq(&self) -> u64 {
        self.record_seq
    }

    fn live_in_region(&self) -> Vec<NodeRecord> {
        self.live_in_region_versioned()
            .into_iter()
            .map(|n| n.record)
            .collect()
    }

    /// This region's live members whose records this node holds, and itself once published,
    /// with the records' versions.
    fn live_in_region_versioned(&self) -> Vec<SummaryNode> {
        let known = self.known.lock();
        let mut out: Vec<SummaryNode> = self
            .foca
            .iter_members()
            .filter_map(|member| {
                let peer = member.id();
                known
                    .records
                    .get(&peer.id)
                    .filter(|held| held.generation == peer.generation)
                    .map(|held| SummaryNode {
                        generation: held.generation,
                        seq: held.seq,
                        record: held.record.clone(),
                    })
            })
            .collect();
        out.extend(self.own.clone().map(|record| SummaryNode {
            generation: self.foca.identity().generation,
            seq: self.record_seq,
            record,
        }));
        out
    }

    /// Of `newest` (see [`Self::newest_summaries`]), those that arrived within `dead_after`.
    fn fresh_summaries(
        &self,
        now: Instant,
        newest: &[(RegionSummary, Instant)],
    ) -> Vec<RegionSummary> {
        newest
            .iter()
            .filter(|(_, received_at)| {
                now.saturating_duration_since(*received_at) < self.dead_after
            })
            .map(|(summary, _)| summary.clone())
            .collect()
    }

    /// The most recently received summary of each other region, fresh or not.
    fn newest_summaries(&self) -> Vec<(RegionSummary, Instant)> {
        let known = self.known.lock();
        let mut newest: BTreeMap<&str, (&RegionSummary, Instant)> = BTreeMap::new();
        for held in known.summaries.values() {
            let entry = newest
                .entry(held.summary.region.as_str())
                .or_insert((&held.summary, held.received_at));
            if held.received_at > entry.1 {
                *entry = (&held.summary, held.received_at);
            }
        }
        newest
            .into_values()
            .map(|(s, at)| (s.clone(), at))
            .collect()
    }

    fn is_router(&self) -> bool {
        let mut ids: Vec<u64> = self.live_in_region().iter().map(|r| r.id).collect();
        if !ids.contains(&self.node_id) {
            ids.push(self.node_id);
        }
        ids.sort_unstable();
        ids.iter().take(ROUTERS).any(|id| *id == self.node_id)
    }

    /// This region's summary, built now (a new sequence each time).
    fn own_summary(&mut self) -> RegionSummary {
        self.summary_seq += 1;
        let mut summary = RegionSummary {
            region: self.region.clone(),
            builder: self.node_id,
            generation: self.foca.identity().generation,
            seq: self.summary_seq,
            nodes: self.live_in_region_versioned(),
            gossip_addrs: std::iter::once(self.foca.identity().addr)
                .chain(self.foca.iter_members().map(|m| m.id().addr))
                .collect(),
        };
        let size = |summary: &RegionSummary| {
            ferry_proto::codec::encode("gossip item", &Item::Summary(summary.clone()))
                .map_or(usize::MAX, |b| b.len())
        };
        let with_leads = size(&summary);
        if with_leads > MAX_ITEM {
            // Without leaders, other regions send batches to any node of the region, which
            // passes them on: slower, not wrong.
            warn!(
                size = with_leads,
                "the region summary is over {MAX_ITEM} bytes; sending it without leaders"
            );
            for node in &mut summary.nodes {
                node.record.leads = Arc::default();
            }
            let without = size(&summary);
            if without > MAX_ITEM {
                error!(
                    size = without,
                    "the region summary is over {MAX_ITEM} bytes even without leaders: other \
                     regions' nodes that are not routers will not learn this region"
                );
            }
        }
        summary
    }

    fn summaries_to_push(
        &mut self,
        now: Instant,
        newest: &[(RegionSummary, Instant)],
    ) -> Vec<RegionSummary> {
        let mut summaries = vec![self.own_summary()];
        summaries.extend(self.fresh_summaries(now, newest));
        summaries
    }

    /// Pushes this region's summary and the fresh ones of third regions to one node of every
    /// other region, and to remote seeds not heard of yet.
    /// (Routers, and any node that knows no other region yet, which reaches out to its
    /// remote seeds.) A region is never sent its own summary.
    fn push_summaries(
        &mut self,
        now: Instant,
        as_router: bool,
        newest: &[(RegionSummary, Instant)],
    ) {
        let mut targets: Vec<(SocketAddr, Option<String>)> = Vec::new();
        if as_router {
            for (summary, _) in newest {
                if summary.gossip_addrs.is_empty() {
                    continue;
                }
                let pick = self.rng.random_range(0..summary.gossip_addrs.len());
                targets.push((summary.gossip_addrs[pick], Some(summary.region.clone())));
            }
        }
        for seed in &self.remote_seeds {
            let heard_of = newest.iter().any(|(s, _)| s.gossip_addrs.contains(seed));
            if !heard_of && !targets.iter().any(|(a, _)| a == seed) {
                targets.push((*seed, None));
            }
        }
        if targets.is_empty() {
            // A region alone: nothing to build (a summary of thousands of leads is costly).
            return;
        }
        let summaries = self.summaries_to_push(now, newest);
        for (to, region) in targets {
            let for_it: Vec<RegionSummary> = summaries
                .iter()
                .filter(|s| Some(&s.region) != region.as_ref())
                .cloned()
                .collect();
            self.send_summaries(to, for_it);
        }
    }

    fn send_summaries(&mut self, to: SocketAddr, summaries: Vec<RegionSummary>) {
        let envelope = Envelope::Summaries {
            cluster: self.cluster.clone(),
            summaries,
        };
        match ferry_proto::codec::encode("gossip message", &envelope) {
            Ok(bytes) => self.outbox.push_back(Outgoing {
                to,
                message: Bytes::from(bytes),
                between_regions: true,
            }),
            Err(e) => warn!(error = %e, "summaries not encoded"),
        }
    }

    /// A summary pushed from another region: spread in this region if it is news (true).
    fn take_summary(&mut self, summary: RegionSummary) -> bool {
        if summary.region == self.region {
            return false;
        }
        let item = Item::Summary(summary);
        match ferry_proto::codec::encode("gossip item", &item) {
            // The broadcast handler takes it in (and keeps it spreading) only if newer.
            Ok(bytes) if bytes.len() <= MAX_ITEM => match self.foca.add_broadcast(&bytes) {
                Ok(news) => news,
                Err(e) => {
                    debug!(error = %e, "summary not taken");
                    false
                }
            },
            Ok(bytes) => {
                warn!(
                    len = bytes.len(),
                    "a summary too large to spread in this region, dropped"
                );
                false
            }
            Err(e) => {
                debug!(error = %e, "summary not encoded");
                false
            }
        }
    }

    fn broadcast_own_record(&mut self, now: Instant) {
        let Some(record) = self.own.clone() else {
            return;
        };
        self.record_seq += 1;
        self.last_record_round = self.rounds;
        let item = Item::Record {
            generation: self.foca.identity().generation,
            seq: self.record_seq,
            record,
        };
        match ferry_proto::codec::encode("gossip item", &item) {
            Ok(bytes) => {
                if let Err(e) = self.foca.add_broadcast(&bytes) {
                    warn!(error = %e, "own record not broadcast");
                }
                // Spread it now rather than at the next periodic gossip.
                if let Err(e) = self.foca.gossip(&mut self.runtime) {
                    debug!(error = %e, "gossip not sent");
                }
            }
            Err(e) => warn!(error = %e, "own record not encoded"),
        }
        self.drain_runtime(now);
    }

    fn forget_old_summaries(&mut self, now: Instant, newest: &[(RegionSummary, Instant)]) {
        let newest: Vec<(String, u64)> = newest
            .iter()
            .map(|(s, _)| (s.region.clone(), s.builder))
            .collect();
        self.known.lock().summaries.retain(|key, held| {
            newest.contains(key)
                || now.saturating_duration_since(held.received_at) < FORGET_SUMMARY_AFTER
        });
    }

    /// Moves what foca produced into the outbox and reacts to its notifications.
    fn drain_runtime(&mut self, now: Instant) {
        let mut rebroadcast = false;
        loop {
            while let Some((to, packet)) = self.runtime.to_send() {
                let envelope = Envelope::Swim {
                    cluster: self.cluster.clone(),
                    region: self.region.clone(),
                    packet: packet.to_vec(),
                };
                match ferry_proto::codec::encode("gossip message", &envelope) {
                    Ok(bytes) => self.outbox.push_back(Outgoing {
                        to: to.addr,
                        message: Bytes::from(bytes),
                        between_regions: false,
                    }),
                    Err(e) => warn!(error = %e, "SWIM packet not encoded"),
                }
            }
            let Some(notification) = self.runtime.to_notify() else {
                break;
            };
            match notification {
                // A member joined or this node came back: make sure it has our record.
                OwnedNotification::MemberUp(peer) => {
                    debug!(region = %self.region, id = peer.id, addr = %peer.addr, "member up");
                    rebroadcast = true;
                }
                OwnedNotification::Rejoin(_) | OwnedNotification::Active => rebroadcast = true,
                OwnedNotification::MemberDown(peer) => {
                    debug!(region = %self.region, id = peer.id, addr = %peer.addr, "member down");
                    let mut known = self.known.lock();
                    if known
                        .records
                        .get(&peer.id)
                        .is_some_and(|held| held.generation <= peer.generation)
                    {
                        known.records.remove(&peer.id);
                    }
                }
                // A member restarted before it was declared down: it has no records yet.
                OwnedNotification::Rename(old, new) => {
                    debug!(region = %self.region, id = new.id, old = old.generation, new = new.generation, "member restarted");
                    rebroadcast = true;
                }
                OwnedNotification::Idle | OwnedNotification::Defunct => {
                    debug!(region = %self.region, "no active member");
                }
            }
        }
        if rebroadcast && self.own.is_some() {
            self.broadcast_own_record(now);
        }
    }
}
