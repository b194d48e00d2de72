//! The node's part in the mesh. It gossips about itself (chitchat over the peer transport,
//! so over mutually authenticated QUIC: a node from another CA cannot take part); runs one
//! [`Forwarder`] per (partition it leads, other region); answers forwarded batches (relays
//! them when they are for another region, passes them to the partition's leader, appends
//! them through Raft, acknowledges after commit); and builds the report behind
//! `ferry ctl regions`.
//!
//! Routing rules:
//! - Only events that originated in this region are forwarded (an event forwarded in is
//!   never forwarded on), so an event takes at most one hop between logs: no loops.
//! - An event goes to region R if its topic's policy lists R, or the policy is by interest
//!   and one of R's interests (published by R's nodes in gossip) matches its subject.
//!   Topics with the `Local` policy never leave the region.
//! - A batch goes straight to the destination partition's leader; if that region cannot be
//!   reached, through a node of a third region, which relays it once (`relays_left`) and
//!   never stores it. The acknowledgement comes back the same way, so it still means
//!   "committed in the destination's log". This delivers during any single-link cut
//!   between three or more regions.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ferry_net::{NetError, Transport};
use ferry_proto::wire::{ErrorCode, ForwardingInfo, InterestReach, MeshNodeInfo, MeshReport};
use ferry_proto::{codec, RegionPolicy, SubjectFilter};
use ferry_router::{
    Ack, Batch, Forwarder, ForwarderConfig, Gossip, GossipConfig, GossipInbox, GossipLink,
    NodeRecord, SourceEvent,
};
use futures::future::BoxFuture;
use openraft::async_runtime::WatchReceiver;
use tokio::sync::{mpsc, watch};

use crate::command::{decode, encode, PartitionCommand, PartitionReply};
use crate::metadata::InterestSet;
use crate::node::{now_ms, Node, PartitionGroup};
use crate::peer::{ForwardRequest, PeerRequest, PeerResponse, Router};
use crate::RegionError;

/// How often the node republishes its record and reconciles its forwarders.
const SUPERVISE_EVERY: Duration = Duration::from_millis(200);
/// Cursor moves are committed through Raft at most this often per forwarder.
const COMMIT_EVERY: Duration = Duration::from_millis(100);
/// A region counts as reached directly if a call to it succeeded this recently.
const REACH_FRESH: Duration = Duration::from_secs(10);
/// After a direct call to a region fails, relays are tried first for this long.
const DIRECT_RETRY_AFTER: Duration = Duration::from_secs(5);
/// How long a relay waits for the destination (below the peer request timeout, 5 s).
const RELAY_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the metadata leader waits for a quorum to confirm it before vouching for the
/// region's interest.
const VOUCH_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest a forwarder sleeps without looking at its source again.
const IDLE_WAKE: Duration = Duration::from_millis(250);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Forwarded events a destination node did not store again, by where the dedupe caught them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForwardedDuplicates {
    /// Events of resent batches this node (leading the destination partition) answered
    /// from its applied state without proposing them: the whole batch was held already,
    /// or an earlier copy was still in Raft.
    pub resent_events_held: u64,
    /// Events the state machines of partitions this node hosts skipped on apply as held
    /// already (every replica counts its own apply).
    pub skipped_on_apply: u64,
}

impl ForwardedDuplicates {
    /// Both stages together.
    pub fn total(&self) -> u64 {
        self.resent_events_held + self.skipped_on_apply
    }
}

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
    /// Who leads a partition in a region: (region, topic, partition) → address.
    leaders: HashMap<(String, String, u32), SocketAddr>,
}

impl MeshSnapshot {
    /// Builds the snapshot from the live records and the views known before (`known`, which
    /// it updates): a region's view only moves to newer versions, so a region whose live
    /// nodes are silent, unreachable or behind keeps the newest set seen, and its backlog
    /// waits for it instead of being skipped.
    fn build(nodes: Vec<NodeRecord>, known: &mut BTreeMap<String, InterestView>) -> Self {
        let mut leaders = HashMap::new();
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
            for (topic, partition) in &node.leads {
                leaders.insert((node.region.clone(), topic.clone(), *partition), node.addr);
            }
        }
        Self {
            nodes,
            interest: known.iter().map(|(r, v)| (r.clone(), v.clone())).collect(),
            leaders,
        }
    }

    /// Every region known: those with live nodes and those seen before.
    fn regions(&self) -> BTreeSet<String> {
        self.nodes
            .iter()
            .map(|n| n.region.clone())
            .chain(self.interest.keys().cloned())
            .collect()
    }

    /// Where to send a batch for `region`'s partition: its leader first, then the region's
    /// other nodes (which pass it to their leader).
    fn targets(&self, region: &str, topic: &str, partition: u32) -> Vec<SocketAddr> {
        let leader = self
            .leaders
            .get(&(region.to_string(), topic.to_string(), partition))
            .copied();
        let mut out: Vec<SocketAddr> = leader.into_iter().collect();
        for n in self.nodes.iter().filter(|n| n.region == region) {
            if !out.contains(&n.addr) {
                out.push(n.addr);
            }
        }
        out
    }

    /// Nodes of third regions that can relay to `destination`, those that reach it
    /// directly first.
    fn relays(&self, source: &str, destination: &str) -> Vec<(String, SocketAddr)> {
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

    fn wants(&self, region: &str, subject: &str) -> bool {
        self.interest
            .get(region)
            .is_some_and(|view| view.filters.iter().any(|f| f.matches(subject)))
    }

    /// Whether `region` wants an event with `subject` appended at `appended_at_ms` (this
    /// region's clock), allowing the clocks to differ by `skew_ms`.
    fn judge(&self, region: &str, subject: &str, appended_at_ms: u64, skew_ms: u64) -> Judgement {
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

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ForwardKey {
    topic: String,
    partition: u32,
    destination: String,
}

/// What a running forwarder shows `ferry ctl regions`.
#[derive(Debug, Clone, Default)]
struct ForwardStatus {
    cursor: u64,
    high: u64,
    lag_ms: u64,
    sent_events: u64,
    route: String,
    last_error: Option<String>,
    /// Offsets retention already dropped ahead of what the forwarder has read (counted as
    /// trimmed once it reads there).
    trimmed_ahead: u64,
}

struct RunningForwarder {
    stop: watch::Sender<bool>,
    status: Arc<Mutex<ForwardStatus>>,
}

/// (origin region, topic, partition) of forwarded batches.
type OriginPartition = (String, String, u32);

/// The destination leader's intake of one origin partition.
#[derive(Debug, Default)]
struct Intake {
    /// The Raft term `proposed_to` belongs to.
    term: u64,
    /// Origin offsets below this are applied or proposed in `term`.
    proposed_to: u64,
}

/// Forgets what the intake of `origin` proposed in `term` beyond `held` (applied): the next
/// resend of it is proposed again. A no-op once the term moved on (that reset it already).
async fn forget_proposals(mesh: &Mesh, origin: &OriginPartition, term: u64, held: u64) {
    let intake = lock(&mesh.receiving).get(origin).cloned();
    if let Some(intake) = intake {
        let mut intake = intake.lock().await;
        if intake.term == term && intake.proposed_to > held {
            intake.proposed_to = held;
        }
    }
}

/// The node's mesh state.
pub(crate) struct Mesh {
    pub(crate) region: String,
    pub(crate) addr: SocketAddr,
    gossip: Gossip,
    pub(crate) inbox: GossipInbox,
    snapshot: watch::Sender<Arc<MeshSnapshot>>,
    /// The newest interest seen per region (kept while the region is silent or behind).
    known_interest: Mutex<BTreeMap<String, InterestView>>,
    forwarders: Mutex<BTreeMap<ForwardKey, RunningForwarder>>,
    /// Source offsets retention dropped before a forwarder of this node dealt with them.
    trimmed_unforwarded: Mutex<HashMap<ForwardKey, u64>>,
    /// Events sent to another region, per (topic, destination), since this node started.
    crossings: Mutex<HashMap<(String, String), u64>>,
    /// Events of forwarded batches this node, as the destination's leader, answered from
    /// the applied state instead of proposing them again: resends of batches already held
    /// or still in Raft (the dedupe's first stage).
    resent_events_held: AtomicU64,
    /// Last successful direct call per region.
    reach: Mutex<HashMap<String, Instant>>,
    /// What the destination leader has proposed per (origin region, topic, partition): a
    /// batch continuing it is proposed at once (pipelined behind the ones in Raft); a resend
    /// of one still in Raft waits for it and is answered from the applied state instead of
    /// being proposed again; one beyond it is a gap.
    receiving: Mutex<HashMap<OriginPartition, Arc<tokio::sync::Mutex<Intake>>>>,
    /// Previous load sample: (events appended in led partitions, when).
    load_sample: Mutex<(u64, Instant, u64)>,
}

impl Mesh {
    pub(crate) fn snapshot(&self) -> Arc<MeshSnapshot> {
        self.snapshot.borrow().clone()
    }

    fn note_reach(&self, region: &str) {
        lock(&self.reach).insert(region.to_string(), Instant::now());
    }

    fn reached(&self) -> Vec<String> {
        let mut out: Vec<String> = lock(&self.reach)
            .iter()
            .filter(|(_, at)| at.elapsed() < REACH_FRESH)
            .map(|(r, _)| r.clone())
            .collect();
        out.sort();
        out
    }

    fn count_crossing(&self, topic: &str, destination: &str, events: u64) {
        if events > 0 {
            *lock(&self.crossings)
                .entry((topic.to_string(), destination.to_string()))
                .or_default() += events;
        }
    }

    /// Events this node sent to other regions: ((topic, destination), count).
    pub(crate) fn crossings(&self) -> Vec<((String, String), u64)> {
        let mut out: Vec<_> = lock(&self.crossings)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        out.sort();
        out
    }

    fn statuses(&self, source: &str) -> Vec<ForwardingInfo> {
        lock(&self.forwarders)
            .iter()
            .map(|(key, running)| {
                let s = lock(&running.status).clone();
                ForwardingInfo {
                    topic: key.topic.clone(),
                    partition: key.partition,
                    source: source.to_string(),
                    destination: key.destination.clone(),
                    lag_events: s.high.saturating_sub(s.cursor),
                    lag_ms: s.lag_ms,
                    sent_events: s.sent_events,
                    route: s.route,
                    last_error: s.last_error,
                    trimmed_unforwarded: lock(&self.trimmed_unforwarded)
                        .get(key)
                        .copied()
                        .unwrap_or(0)
                        + s.trimmed_ahead,
                }
            })
            .collect()
    }

    /// Retention dropped `[from, to)` of a partition before its forwarder to a region dealt
    /// with it: events that region may have wanted are gone.
    fn note_trimmed(&self, key: &ForwardKey, from: u64, to: u64) {
        let count = to.saturating_sub(from);
        if count == 0 {
            return;
        }
        *lock(&self.trimmed_unforwarded)
            .entry(key.clone())
            .or_default() += count;
        tracing::error!(topic = %key.topic, partition = key.partition, destination = %key.destination, from, to, "retention dropped events before they were forwarded (set retention.keep_until_forwarded to prevent it)");
    }

    fn stop_all(&self) {
        for (_, running) in std::mem::take(&mut *lock(&self.forwarders)) {
            running.stop.send_replace(true);
        }
    }
}

/// Gossip messages travel as peer requests.
struct PeerGossipLink<T> {
    router: Router<T>,
    from: SocketAddr,
}

impl<T: Transport> GossipLink for PeerGossipLink<T> {
    fn send(&self, to: SocketAddr, message: Bytes) -> BoxFuture<'static, Result<(), String>> {
        let router = self.router.clone();
        let from = self.from;
        Box::pin(async move {
            match router
                .call_addr(to, &PeerRequest::Gossip { from, message })
                .await
            {
                Ok(PeerResponse::Done) => Ok(()),
                Ok(PeerResponse::Error(e)) => Err(e),
                Ok(_) => Err("unexpected answer to gossip".into()),
                Err(e) => Err(e.to_string()),
            }
        })
    }
}

fn is_unreachable(e: &NetError) -> bool {
    !matches!(e, NetError::Remote(_))
}

impl<T: Transport> Node<T> {
    /// Starts gossip and the supervision of forwarders.
    pub(crate) async fn start_mesh(&self) -> Result<(), RegionError> {
        let config = &self.inner.config;
        let Some(addr) = config.listen_addr() else {
            return Ok(());
        };
        let mut seeds: Vec<SocketAddr> = config
            .peers
            .iter()
            .filter(|p| p.id != config.id)
            .map(|p| p.addr)
            .collect();
        seeds.extend(config.mesh.remote_seeds.iter().copied());
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let gossip_config = GossipConfig {
            node_id: config.id,
            region: config.region.clone(),
            advertise: addr,
            seeds,
            cluster: "ferry".into(),
            interval: Duration::from_millis(config.mesh.gossip_interval_ms),
            dead_after: Duration::from_millis(config.mesh.dead_after_ms),
            generation,
        };
        let link = Arc::new(PeerGossipLink {
            router: self.inner.router.clone(),
            from: addr,
        });
        let (gossip, inbox) =
            Gossip::start(gossip_config, link)
                .await
                .map_err(|e| RegionError::Config {
                    key: "mesh",
                    reason: format!("starting gossip: {e}"),
                })?;
        let mesh = Arc::new(Mesh {
            region: config.region.clone(),
            addr,
            gossip,
            inbox,
            snapshot: watch::channel(Arc::new(MeshSnapshot::default())).0,
            known_interest: Mutex::new(BTreeMap::new()),
            forwarders: Mutex::new(BTreeMap::new()),
            trimmed_unforwarded: Mutex::new(HashMap::new()),
            crossings: Mutex::new(HashMap::new()),
            resent_events_held: AtomicU64::new(0),
            reach: Mutex::new(HashMap::new()),
            receiving: Mutex::new(HashMap::new()),
            load_sample: Mutex::new((0, Instant::now(), 0)),
        });
        if self.inner.mesh.set(mesh).is_err() {
            return Ok(());
        }
        let weak = Arc::downgrade(&self.inner);
        let mut shutdown = self.shutdown_signal();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SUPERVISE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => return,
                }
                let Some(inner) = weak.upgrade() else { return };
                (Node { inner }).supervise_mesh().await;
            }
        });
        Ok(())
    }

    pub(crate) fn mesh(&self) -> Option<&Arc<Mesh>> {
        self.inner.mesh.get()
    }

    /// Stops forwarders and gossip.
    pub(crate) async fn stop_mesh(&self) {
        if let Some(mesh) = self.mesh() {
            mesh.stop_all();
            mesh.gossip.stop();
        }
    }

    /// Partitions this node leads.
    fn led_partitions(&self) -> Vec<(String, u32, PartitionGroup)> {
        let mut led = Vec::new();
        for topic in self.inner.meta_view.topics() {
            for partition in 0..topic.config.partitions {
                if let Some(group) = self.partition(&topic.config.name, partition) {
                    if group.raft.metrics().borrow_watched().current_leader == Some(self.inner.id) {
                        led.push((topic.config.name.clone(), partition, group));
                    }
                }
            }
        }
        led
    }

    /// This region's interest set and its version, and the time this node vouches for it as
    /// the committed set at (0 unless it leads the metadata group and confirmed that with a
    /// quorum: a read index taken after that time covers every interest committed before).
    async fn vouch_for_interest(&self) -> (InterestSet, u64) {
        let meta = &self.inner.meta;
        if meta.metrics().borrow_watched().current_leader == Some(self.inner.id) {
            let asked_at = now_ms();
            let confirmed = tokio::time::timeout(
                VOUCH_TIMEOUT,
                meta.ensure_linearizable(openraft::ReadPolicy::ReadIndex),
            )
            .await;
            if matches!(confirmed, Ok(Ok(_))) {
                return (self.inner.meta_view.interest_set(), asked_at);
            }
        }
        (self.inner.meta_view.interest_set(), 0)
    }

    /// One supervision round: publish this node's record, refresh the snapshot, start and
    /// stop forwarders to match what this node leads and which regions are alive.
    async fn supervise_mesh(&self) {
        let Some(mesh) = self.mesh().cloned() else {
            return;
        };
        let led = self.led_partitions();
        let appended: u64 = led.iter().map(|(_, _, g)| g.view.watermarks().high).sum();
        let load = {
            let mut sample = lock(&mesh.load_sample);
            let elapsed = sample.1.elapsed().as_secs_f64();
            if elapsed >= 1.0 {
                let rate = appended.saturating_sub(sample.0) as f64 / elapsed;
                *sample = (appended, Instant::now(), rate as u64);
            }
            sample.2
        };
        let (interests, interest_as_of_ms) = self.vouch_for_interest().await;
        let seen = lock(&mesh.known_interest)
            .iter()
            .filter(|(region, _)| **region != mesh.region)
            .map(|(region, view)| (region.clone(), view.version))
            .collect();
        let record = NodeRecord {
            id: self.inner.id,
            region: mesh.region.clone(),
            addr: mesh.addr,
            role: "node".into(),
            leads: led.iter().map(|(t, p, _)| (t.clone(), *p)).collect(),
            interest: interests
                .interests
                .values()
                .map(|f| f.to_string())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            reach: mesh.reached(),
            load,
            interest_version: interests.version,
            interest_as_of_ms,
            interest_since_ms: interests.since_ms,
            seen,
        };
        if let Err(e) = mesh.gossip.publish(&record).await {
            tracing::warn!(error = %e, "gossip record not published");
        }
        let live = mesh.gossip.live().await;
        let snapshot = Arc::new(MeshSnapshot::build(live, &mut lock(&mesh.known_interest)));
        let remote: BTreeSet<String> = snapshot
            .regions()
            .into_iter()
            .filter(|r| *r != mesh.region)
            .collect();
        mesh.snapshot.send_replace(snapshot);

        let mut desired = BTreeSet::new();
        for (topic, partition, _) in &led {
            let Some(state) = self.inner.meta_view.topic(topic) else {
                continue;
            };
            let destinations: BTreeSet<String> = match &state.config.regions {
                RegionPolicy::Local => BTreeSet::new(),
                RegionPolicy::ByInterest => remote.clone(),
                RegionPolicy::Listed(listed) => remote
                    .iter()
                    .cloned()
                    .chain(listed.iter().filter(|r| **r != mesh.region).cloned())
                    .collect(),
            };
            for destination in destinations {
                desired.insert(ForwardKey {
                    topic: topic.clone(),
                    partition: *partition,
                    destination,
                });
            }
        }
        let mut forwarders = lock(&mesh.forwarders);
        forwarders.retain(|key, running| {
            let keep = desired.contains(key) && !*running.stop.borrow();
            if !keep {
                running.stop.send_replace(true);
                tracing::info!(topic = %key.topic, partition = key.partition, destination = %key.destination, "forwarder stopped");
            }
            keep
        });
        for key in desired {
            if forwarders.contains_key(&key) {
                continue;
            }
            let (stop, stopped) = watch::channel(false);
            let status = Arc::new(Mutex::new(ForwardStatus::default()));
            forwarders.insert(
                key.clone(),
                RunningForwarder {
                    stop: stop.clone(),
                    status: status.clone(),
                },
            );
            tracing::info!(topic = %key.topic, partition = key.partition, destination = %key.destination, "forwarder started");
            let node = self.clone();
            tokio::spawn(async move {
                if let Err(e) = node.run_forwarder(&key, status, stopped).await {
                    tracing::warn!(topic = %key.topic, partition = key.partition, destination = %key.destination, error = %e, "forwarder ended");
                }
                // Let the next round start it again if it is still wanted.
                stop.send_replace(true);
            });
        }
    }

    fn forwarder_config(&self) -> ForwarderConfig {
        let m = &self.inner.config.mesh;
        ForwarderConfig {
            window: m.forward_window,
            max_batch_events: m.forward_batch_events,
            max_batch_bytes: m.forward_batch_bytes,
            retry_after: Duration::from_millis(m.forward_retry_ms),
            max_backoff: Duration::from_millis(m.forward_max_backoff_ms),
        }
    }

    async fn propose(
        &self,
        group: &PartitionGroup,
        command: &PartitionCommand,
    ) -> Result<PartitionReply, String> {
        let command = encode("partition command", command).map_err(|e| e.to_string())?;
        let response = group
            .raft
            .client_write(ferry_store::Command(command))
            .await
            .map_err(|e| e.to_string())?;
        decode::<PartitionReply>("partition reply", &response.data.0).map_err(|e| e.to_string())
    }

    /// Forwards one partition this node leads to one region until told to stop or the
    /// node stops leading it.
    async fn run_forwarder(
        &self,
        key: &ForwardKey,
        status: Arc<Mutex<ForwardStatus>>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), String> {
        let mesh = self.mesh().cloned().ok_or("mesh not started")?;
        let group = self
            .partition(&key.topic, key.partition)
            .ok_or("partition not hosted here")?;
        let view = group.view.clone();
        let config = self.forwarder_config();
        let marks = view.watermarks();
        let start = match view
            .forward_cursor(&key.destination)
            .map_err(|e| e.to_string())?
        {
            Some(cursor) if cursor < marks.low => {
                mesh.note_trimmed(key, cursor, marks.low);
                marks.low
            }
            Some(cursor) => cursor,
            None => {
                // The first forwarder of this partition to this region: it starts at the
                // first event appended since the region's oldest interest was added (clock
                // skew allowed), wherever this node was then. Every event after it is judged.
                let since = lock(&mesh.known_interest)
                    .get(&key.destination)
                    .map_or(0, |v| v.since_ms);
                let skew = self.inner.config.mesh.interest_clock_skew_ms;
                let next = view.first_appended_since(since.saturating_sub(skew));
                let command = PartitionCommand::ForwardCursor {
                    region: key.destination.clone(),
                    next,
                };
                self.propose(&group, &command).await?;
                next
            }
        };
        let mut forwarder = Forwarder::new(config, start);
        let mut changes = view.subscribe();
        let mut views = mesh.snapshot.subscribe();
        let (acks_tx, mut acks) = mpsc::unbounded_channel::<(Result<Ack, String>, String)>();
        let direct_failed: Arc<Mutex<Option<Instant>>> = Arc::default();
        let mut uncommitted: Option<u64> = None;
        let mut committing: Option<tokio::task::JoinHandle<Option<u64>>> = None;
        let mut last_commit = Instant::now();
        let mut sent_before = 0;
        loop {
            if *stop.borrow() || self.is_shut_down() {
                return Ok(());
            }
            if group.raft.metrics().borrow_watched().current_leader != Some(self.inner.id) {
                return Ok(());
            }
            let snapshot = views.borrow_and_update().clone();
            let waiting_for_view =
                self.read_for_forwarding(key, &group, &snapshot, &mut forwarder)?;

            let now = Instant::now();
            while let Some(batch) = forwarder.poll_transmit(now) {
                let node = self.clone();
                let key = key.clone();
                let acks = acks_tx.clone();
                let direct_failed = direct_failed.clone();
                tokio::spawn(async move {
                    let answer = node.send_batch(&key, batch, &direct_failed).await;
                    let _ = acks.send(answer);
                });
            }
            let stats = forwarder.stats();
            mesh.count_crossing(
                &key.topic,
                &key.destination,
                stats.events_sent - sent_before,
            );
            sent_before = stats.events_sent;

            if let Some(cursor) = forwarder.poll_commit() {
                uncommitted = Some(cursor);
            }
            // Commit the cursor in the background (a Raft round), at most every COMMIT_EVERY.
            if let Some(next) = uncommitted {
                if committing.is_none() && last_commit.elapsed() >= COMMIT_EVERY {
                    let command = PartitionCommand::ForwardCursor {
                        region: key.destination.clone(),
                        next,
                    };
                    let node = self.clone();
                    let group = group.clone();
                    committing = Some(tokio::spawn(async move {
                        // A failure means this node no longer leads: the loop ends above.
                        node.propose(&group, &command).await.is_ok().then_some(next)
                    }));
                    last_commit = Instant::now();
                }
            }
            {
                let marks = view.watermarks();
                let high = marks.high;
                let mut s = lock(&status);
                s.trimmed_ahead = marks.low.saturating_sub(forwarder.read_from());
                s.cursor = forwarder.cursor();
                s.high = high;
                s.sent_events = stats.events_sent;
                s.lag_ms = if forwarder.cursor() < high {
                    view.appended_at(forwarder.cursor())
                        .map_or(0, |at| now_ms().saturating_sub(at))
                } else {
                    0
                };
            }

            let now = Instant::now();
            let mut wake = forwarder
                .poll_timeout()
                .unwrap_or(now + IDLE_WAKE)
                .min(now + IDLE_WAKE);
            if uncommitted.is_some() && committing.is_none() {
                wake = wake.min(last_commit + COMMIT_EVERY);
            }
            let committed = async {
                match committing.as_mut() {
                    Some(task) => task.await.ok().flatten(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = stop.changed() => return Ok(()),
                done = committed => {
                    committing = None;
                    if done.is_some() && done == uncommitted {
                        uncommitted = None;
                    }
                }
                Some((answer, route)) = acks.recv() => {
                    let mut s = lock(&status);
                    match answer {
                        Ok(ack) => {
                            forwarder.handle_ack(ack);
                            s.route = route;
                            s.last_error = None;
                        }
                        Err(e) => {
                            if s.last_error.as_deref() != Some(e.as_str()) {
                                tracing::warn!(topic = %key.topic, partition = key.partition, destination = %key.destination, error = %e, "forwarding failed; retrying with backoff");
                            }
                            s.last_error = Some(e);
                        }
                    }
                }
                _ = changes.changed() => {}
                _ = views.changed(), if waiting_for_view => {}
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    /// Feeds the forwarder what it asks for from the partition's log. Answers whether it
    /// stopped at an event it cannot judge yet (it waits for a newer view of the destination's
    /// interest).
    fn read_for_forwarding(
        &self,
        key: &ForwardKey,
        group: &PartitionGroup,
        snapshot: &MeshSnapshot,
        forwarder: &mut Forwarder,
    ) -> Result<bool, String> {
        let Some(topic) = self.inner.meta_view.topic(&key.topic) else {
            return Err(format!("topic {} is gone", key.topic));
        };
        let listed = match &topic.config.regions {
            RegionPolicy::Listed(regions) => regions.contains(&key.destination),
            _ => false,
        };
        let region = &self.inner.config.region;
        let max_bytes = self.inner.config.mesh.forward_batch_bytes;
        let skew_ms = self.inner.config.mesh.interest_clock_skew_ms;
        while forwarder.wants_source() {
            let from = forwarder.read_from();
            let marks = group.view.watermarks();
            if from >= marks.high {
                return Ok(false);
            }
            if from < marks.low {
                // Trimmed by retention before it was forwarded.
                if let Some(mesh) = self.mesh() {
                    mesh.note_trimmed(key, from, marks.low);
                }
                forwarder.handle_source(std::iter::empty(), marks.low);
                continue;
            }
            let batches = group
                .view
                .read(from, max_bytes)
                .map_err(|e| e.to_string())?;
            let mut upto = from;
            let mut events = Vec::new();
            let mut undecided = None;
            'batches: for batch in &batches {
                upto = batch.base_offset + u64::from(batch.count);
                if upto <= from {
                    continue;
                }
                let decoded = batch.decode().map_err(|e| e.to_string())?;
                for (offset, mut event) in decoded {
                    if offset < from {
                        continue;
                    }
                    let local = event.origin_region.as_deref().is_none_or(|o| o == region);
                    let judgement = if !local {
                        Judgement::Unwanted
                    } else if listed {
                        Judgement::Wanted
                    } else {
                        snapshot.judge(
                            &key.destination,
                            event.subject.as_str(),
                            batch.appended_at_ms,
                            skew_ms,
                        )
                    };
                    let wanted = match judgement {
                        Judgement::Wanted => true,
                        Judgement::Unwanted => false,
                        Judgement::Undecided => {
                            // The destination may have added an interest in it that has not
                            // reached this node yet: stop here until its view is recent.
                            undecided = Some(offset);
                            break 'batches;
                        }
                    };
                    let bytes = if wanted {
                        event.origin_region.get_or_insert_with(|| region.clone());
                        Bytes::from(
                            codec::encode("forwarded event", &event).map_err(|e| e.to_string())?,
                        )
                    } else {
                        Bytes::new()
                    };
                    events.push(SourceEvent {
                        offset,
                        wanted,
                        bytes,
                    });
                }
            }
            if let Some(offset) = undecided {
                forwarder.handle_source(events, offset);
                return Ok(true);
            }
            if upto <= from {
                return Ok(false);
            }
            forwarder.handle_source(events, upto.min(marks.high));
        }
        Ok(false)
    }

    /// Sends one batch: straight to the destination, or through a relay when the region
    /// cannot be reached. Answers the acknowledgement (or why not) and the route taken.
    async fn send_batch(
        &self,
        key: &ForwardKey,
        batch: Batch,
        direct_failed: &Mutex<Option<Instant>>,
    ) -> (Result<Ack, String>, String) {
        let Some(mesh) = self.mesh().cloned() else {
            return (Err("mesh stopped".into()), String::new());
        };
        let snapshot = mesh.snapshot();
        let request = PeerRequest::Forward(ForwardRequest {
            origin_region: mesh.region.clone(),
            target_region: key.destination.clone(),
            topic: key.topic.clone(),
            partition: key.partition,
            batch,
            relays_left: 1,
            passed_in_region: false,
        });
        let request = match Router::<T>::encode_request(&request) {
            Ok(r) => r,
            Err(e) => return (Err(e.to_string()), String::new()),
        };
        let direct: Vec<(String, SocketAddr)> = snapshot
            .targets(&key.destination, &key.topic, key.partition)
            .into_iter()
            .map(|a| ("direct".to_string(), a))
            .collect();
        let relays: Vec<(String, SocketAddr)> = snapshot
            .relays(&mesh.region, &key.destination)
            .into_iter()
            .map(|(region, a)| (format!("via {region}"), a))
            .collect();
        if direct.is_empty() && relays.is_empty() {
            return (
                Err(format!("no live node of region {}", key.destination)),
                String::new(),
            );
        }
        let relays_first = lock(direct_failed).is_some_and(|at| at.elapsed() < DIRECT_RETRY_AFTER);
        let routes: Vec<_> = if relays_first {
            relays.into_iter().chain(direct).collect()
        } else {
            direct.into_iter().chain(relays).collect()
        };
        let mut errors = Vec::new();
        for (route, addr) in routes {
            let is_direct = route == "direct";
            match self
                .inner
                .router
                .call_addr_encoded(addr, request.clone())
                .await
            {
                Ok(PeerResponse::Forwarded(ack)) => {
                    if is_direct {
                        mesh.note_reach(&key.destination);
                        *lock(direct_failed) = None;
                    }
                    return (Ok(ack), route);
                }
                // The destination (or relay) answered but refused: say why; resent later.
                Ok(PeerResponse::Error(e)) => return (Err(e), route),
                Ok(_) => errors.push(format!("{route}: unexpected answer")),
                Err(e) => {
                    if is_direct && is_unreachable(&e) {
                        *lock(direct_failed) = Some(Instant::now());
                    }
                    errors.push(format!("{route} ({addr}): {e}"));
                }
            }
        }
        (Err(errors.join("; ")), String::new())
    }

    /// Answers a forwarded batch: relay it, pass it to the leader, or append it.
    pub(crate) async fn handle_forward(&self, mut request: ForwardRequest) -> PeerResponse {
        let Some(mesh) = self.mesh().cloned() else {
            return PeerResponse::Error("mesh not started".into());
        };
        if request.target_region != mesh.region {
            if request.relays_left == 0 {
                return PeerResponse::Error(format!(
                    "refusing to relay a batch for region {} a second time",
                    request.target_region
                ));
            }
            request.relays_left -= 1;
            let snapshot = mesh.snapshot();
            let targets =
                snapshot.targets(&request.target_region, &request.topic, request.partition);
            let mut last_error = format!(
                "region {} has no live node known to {}",
                request.target_region, mesh.region
            );
            let relayed = PeerRequest::Forward(request.clone());
            for addr in targets {
                // Shorter than the sender's own deadline, so the sender hears why.
                let answer = tokio::time::timeout(
                    RELAY_TIMEOUT,
                    self.inner.router.call_addr(addr, &relayed),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(NetError::Timeout {
                        what: format!("relaying to {addr}"),
                        after: RELAY_TIMEOUT,
                    })
                });
                match answer {
                    Ok(answer @ PeerResponse::Forwarded(_)) => {
                        mesh.note_reach(&request.target_region);
                        return answer;
                    }
                    Ok(PeerResponse::Error(e)) => return PeerResponse::Error(e),
                    Ok(_) => last_error = "unexpected answer".into(),
                    Err(e) => last_error = format!("{addr}: {e}"),
                }
            }
            return PeerResponse::Error(format!("relay through {}: {last_error}", mesh.region));
        }
        let region = &mesh.region;
        let group = match self.lookup(&request.topic, request.partition) {
            Ok(g) => Some(g),
            Err(e) if e.code == ErrorCode::NotLeader => None,
            Err(e) => return PeerResponse::Error(format!("region {region}: {}", e.message)),
        };
        let leader = match &group {
            Some(g) => g.raft.metrics().borrow_watched().current_leader,
            None => self
                .inner
                .meta_view
                .topic(&request.topic)
                .and_then(|t| t.replicas.get(request.partition as usize)?.first().copied()),
        };
        let group = match group {
            Some(g) if leader == Some(self.inner.id) => g,
            _ => {
                let Some(leader) = leader.filter(|l| *l != self.inner.id) else {
                    return PeerResponse::Error(format!(
                        "region {region}: {}/{} has no leader right now",
                        request.topic, request.partition
                    ));
                };
                if request.passed_in_region {
                    return PeerResponse::Error(format!(
                        "region {region}: {}/{} is not led by node {} either",
                        request.topic, request.partition, self.inner.id
                    ));
                }
                request.passed_in_region = true;
                return match self
                    .inner
                    .router
                    .call(leader, &PeerRequest::Forward(request))
                    .await
                {
                    Ok(answer) => answer,
                    Err(e) => PeerResponse::Error(format!(
                        "region {region}: passing to leader {leader}: {e}"
                    )),
                };
            }
        };
        let intake = lock(&mesh.receiving)
            .entry((
                request.origin_region.clone(),
                request.topic.clone(),
                request.partition,
            ))
            .or_default()
            .clone();
        let origin_region = request.origin_region.clone();
        let mut intake = intake.lock().await;
        // Answer from the applied state when that settles it: a batch after a gap, or one
        // already held entirely (a resend). Costs no Raft round; the state machine still
        // decides whatever is proposed.
        let held = match group.view.received(&origin_region, request.partition) {
            Ok(held) => held,
            Err(e) => return PeerResponse::Error(format!("region {region}: {e}")),
        };
        let term = group.raft.metrics().borrow_watched().current_term;
        if intake.term != term {
            // What was proposed under another term may have been discarded.
            intake.term = term;
            intake.proposed_to = held;
        }
        intake.proposed_to = intake.proposed_to.max(held);
        let resent_events = request.batch.events.len() as u64;
        if request.batch.to <= held {
            mesh.resent_events_held
                .fetch_add(resent_events, Ordering::Relaxed);
            return PeerResponse::Forwarded(Ack::Committed { next: held });
        }
        if request.batch.from > intake.proposed_to {
            return PeerResponse::Forwarded(Ack::Gap { next: held });
        }
        if request.batch.to <= intake.proposed_to {
            // A resend of a batch still in Raft: wait for it instead of proposing it again.
            drop(intake);
            let intake_of = (
                origin_region.clone(),
                request.topic.clone(),
                request.partition,
            );
            let deadline = Instant::now() + RELAY_TIMEOUT;
            loop {
                let held = match group.view.received(&origin_region, request.partition) {
                    Ok(held) => held,
                    Err(e) => return PeerResponse::Error(format!("region {region}: {e}")),
                };
                if held >= request.batch.to {
                    mesh.resent_events_held
                        .fetch_add(resent_events, Ordering::Relaxed);
                    return PeerResponse::Forwarded(Ack::Committed { next: held });
                }
                if Instant::now() >= deadline {
                    // The earlier copy may never commit (its proposal failed or was dropped
                    // in this term): the next resend is proposed again. A copy that does
                    // commit after all is turned away on apply.
                    forget_proposals(&mesh, &intake_of, term, held).await;
                    return PeerResponse::Error(format!(
                        "region {region}: an earlier copy of this batch is not committed yet"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let limits = &self.inner.config.limits;
        for (offset, bytes) in &request.batch.events {
            let event: ferry_proto::Event = match codec::decode("forwarded event", bytes) {
                Ok(e) => e,
                Err(e) => {
                    return PeerResponse::Error(format!(
                        "region {region}: event at origin offset {offset}: {e}"
                    ))
                }
            };
            if let Err(e) = event.validate(limits) {
                return PeerResponse::Error(format!(
                    "region {region}: event at origin offset {offset} refused: {e}"
                ));
            }
        }
        // Continues what is proposed: submit now, behind the proposals still in Raft (in
        // order, as the intake is held until the entry is queued), and wait for the commit
        // without holding the intake, so batches of one origin partition pipeline.
        let batch_to = request.batch.to;
        let origin_region_key = (
            origin_region.clone(),
            request.topic.clone(),
            request.partition,
        );
        let command = PartitionCommand::Forwarded {
            origin_region,
            origin_partition: request.partition,
            batch: request.batch,
            appended_at_ms: now_ms(),
        };
        let command = match encode("partition command", &command) {
            Ok(c) => c,
            Err(e) => return PeerResponse::Error(e.to_string()),
        };
        let (responder, committed) = openraft::impls::ProgressResponder::complete_only();
        if let Err(e) = group
            .raft
            .client_write_ff(ferry_store::Command(command), Some(responder))
            .await
        {
            return PeerResponse::Error(format!("region {region}: {e}"));
        }
        intake.proposed_to = batch_to;
        drop(intake);
        let intake_of = origin_region_key;
        let reply = match committed.await {
            Ok(Ok(response)) => decode::<PartitionReply>("partition reply", &response.data.0)
                .map_err(|e| e.to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the partition group stopped".to_string()),
        };
        if !matches!(reply, Ok(PartitionReply::Forwarded(_))) {
            // Not applied: what was proposed after it cannot apply either (a gap). Forget the
            // proposals so the origin's resends are proposed again.
            let held = group.view.received(&intake_of.0, intake_of.2).unwrap_or(0);
            forget_proposals(&mesh, &intake_of, term, held).await;
        }
        match reply {
            Ok(PartitionReply::Forwarded(ack)) => PeerResponse::Forwarded(ack),
            Ok(PartitionReply::Error(e)) => {
                PeerResponse::Error(format!("region {region}: {}", e.message))
            }
            Ok(_) => PeerResponse::Error("unexpected partition reply".into()),
            Err(e) => PeerResponse::Error(format!("region {region}: {e}")),
        }
    }

    /// The forwarders this node runs, with their lag.
    pub fn forwarding(&self) -> Vec<ForwardingInfo> {
        self.mesh()
            .map(|m| m.statuses(&m.region))
            .unwrap_or_default()
    }

    /// Forwarded events this node did not store again because they were held already: the
    /// destination's dedupe by (origin region, origin partition, origin offset), in its two
    /// stages. Counted since the node started.
    pub fn forwarded_duplicates(&self) -> ForwardedDuplicates {
        ForwardedDuplicates {
            resent_events_held: self
                .mesh()
                .map_or(0, |m| m.resent_events_held.load(Ordering::Relaxed)),
            skipped_on_apply: self
                .partitions()
                .iter()
                .map(|(_, g)| g.view.forwarded_duplicates_skipped())
                .sum(),
        }
    }

    /// Events this node has sent to other regions, per (topic, destination region).
    pub fn forwarded_events(&self) -> Vec<((String, String), u64)> {
        self.mesh().map(|m| m.crossings()).unwrap_or_default()
    }

    /// Sends a gossip round to `addr` now (tests and seeding by hand).
    pub async fn gossip_with(&self, addr: SocketAddr) {
        if let Some(mesh) = self.mesh() {
            if let Err(e) = mesh.gossip.gossip_with(addr) {
                tracing::debug!(%addr, error = %e, "gossip round not started");
            }
        }
    }

    /// Live nodes of the mesh as gossip shows them.
    pub fn mesh_nodes(&self) -> Vec<NodeRecord> {
        self.mesh()
            .map(|m| m.snapshot().nodes.clone())
            .unwrap_or_default()
    }

    /// Which other regions hold this region's interests at `version` or newer: a region
    /// counts once every live node of it says so in gossip.
    pub fn interest_reach(&self, version: u64) -> InterestReach {
        let mut reach = InterestReach {
            version,
            seen_by: Vec::new(),
            waiting_for: Vec::new(),
        };
        let Some(mesh) = self.mesh() else {
            return reach;
        };
        let snapshot = mesh.snapshot();
        for region in snapshot.regions() {
            if region == mesh.region {
                continue;
            }
            let mut nodes = snapshot
                .nodes
                .iter()
                .filter(|n| n.region == region)
                .peekable();
            let has_live = nodes.peek().is_some();
            let all_seen = nodes.all(|n| {
                n.seen
                    .iter()
                    .any(|(r, v)| *r == mesh.region && *v >= version)
            });
            if has_live && all_seen {
                reach.seen_by.push(region);
            } else {
                reach.waiting_for.push(region);
            }
        }
        reach
    }

    /// Waits until every other region holds this region's interests at `version` or newer,
    /// or `wait` passed; answers how far they reached.
    pub(crate) async fn await_interest(&self, version: u64, wait: Duration) -> InterestReach {
        let deadline = tokio::time::Instant::now() + wait;
        let mut views = match self.mesh() {
            Some(mesh) => mesh.snapshot.subscribe(),
            None => return self.interest_reach(version),
        };
        loop {
            let reach = self.interest_reach(version);
            if reach.waiting_for.is_empty() {
                return reach;
            }
            if !matches!(
                tokio::time::timeout_at(deadline, views.changed()).await,
                Ok(Ok(()))
            ) {
                return reach;
            }
        }
    }

    /// Regions whose interest, as this node has learned it, matches `subject`.
    pub fn regions_interested_in(&self, subject: &str) -> Vec<String> {
        let Some(mesh) = self.mesh() else {
            return Vec::new();
        };
        let snapshot = mesh.snapshot();
        let mut out: Vec<String> = snapshot
            .regions()
            .into_iter()
            .filter(|r| snapshot.wants(r, subject))
            .collect();
        out.sort();
        out
    }

    /// The report behind `ferry ctl regions`: gossip's view plus the forwarders of every
    /// node of this region.
    pub(crate) async fn mesh_report(&self) -> MeshReport {
        let region = self.inner.config.region.clone();
        let mut report = MeshReport {
            region: region.clone(),
            node: self.inner.id,
            nodes: Vec::new(),
            interests: Vec::new(),
            forwarding: self.forwarding(),
        };
        let Some(mesh) = self.mesh() else {
            return report;
        };
        let snapshot = mesh.snapshot();
        report.nodes = snapshot
            .nodes
            .iter()
            .map(|n| MeshNodeInfo {
                id: n.id,
                region: n.region.clone(),
                addr: n.addr.to_string(),
                role: n.role.clone(),
                leads: n.leads.len() as u32,
                reach: n.reach.clone(),
                load: n.load,
            })
            .collect();
        report
            .nodes
            .sort_by(|a, b| (&a.region, a.id).cmp(&(&b.region, b.id)));
        let mut interests: Vec<_> = snapshot
            .interest
            .iter()
            .map(|(r, view)| {
                (
                    r.clone(),
                    view.filters.iter().map(|f| f.to_string()).collect(),
                )
            })
            .collect();
        interests.sort();
        report.interests = interests;
        let peers: Vec<_> = self
            .inner
            .config
            .peers
            .iter()
            .map(|p| p.id)
            .filter(|id| *id != self.inner.id)
            .collect();
        let asks = peers.into_iter().map(|peer| async move {
            let answer = tokio::time::timeout(
                Duration::from_secs(2),
                self.inner.router.call(peer, &PeerRequest::ForwardingStatus),
            )
            .await;
            match answer {
                Ok(Ok(PeerResponse::ForwardingStatus(list))) => list,
                _ => Vec::new(),
            }
        });
        for list in futures::future::join_all(asks).await {
            report.forwarding.extend(list);
        }
        report.forwarding.sort_by(|a, b| {
            (&a.topic, a.partition, &a.destination).cmp(&(&b.topic, b.partition, &b.destination))
        });
        report
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
            leads: vec![("orders".into(), 0)],
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
        assert_eq!(s.targets("b", "orders", 0), vec![all_addr(2)]);

        // b goes silent (dead in gossip, or cut off): still a destination, same interest.
        let s = MeshSnapshot::build(
            vec![record(1, "a", &[]), vouched(3, "c", &[], 11, 0)],
            &mut known,
        );
        assert!(s.wants("b", "orders.created"));
        assert!(s.regions().contains("b"));
        assert!(s.targets("b", "orders", 0).is_empty());
        // c removed its interest (a newer version): that counts.
        assert!(!s.wants("c", "orders.eu.created"));
        // Relays for b from a: c's node.
        assert_eq!(s.relays("a", "b"), vec![("c".to_string(), all_addr(3))]);
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
