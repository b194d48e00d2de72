//! The node's part in the mesh. It gossips about itself (ferry-router's two-level gossip over
//! the peer transport, so over mutually authenticated QUIC: a node from another CA cannot
//! take part); runs one
//! [`ferry_router::Forwarder`] per (partition it leads, other region, destination
//! partition) (`forward.rs`); answers forwarded batches (`receive.rs`: relays them when they
//! are for another region, passes them to the partition's leader, appends them through Raft,
//! acknowledges after commit, defines a forwarded topic the region lacks); and builds the
//! report behind `ferry ctl regions`.
//!
//! Routing rules:
//! - Only events that originated in this region are forwarded (an event forwarded in is
//!   never forwarded on), so an event takes at most one hop between logs: no loops.
//! - An event goes to region R if its topic's policy lists R, or the policy is by interest
//!   and R's interest matches its subject. It is judged unwanted only on R's interest as
//!   R's metadata leader vouched for it after the event's append (`snapshot.rs`); until then
//!   the forwarder waits. Topics with the `Local` policy never leave the region.
//! - A topic with another key layout in R (another partition count, or grown differently)
//!   is fed by one forwarder per destination partition whose key space meets the source
//!   partition's, each carrying the events whose key routes there by R's layout; a batch
//!   names that layout, and R refuses it once it gives the partition another key space
//!   (R added partitions): the node asks R for the layout again and routes anew. A split's
//!   child forwards to a destination partition once its parent's forwarder there passed
//!   the seal.
//! - A batch goes straight to the destination partition's leader; if that region cannot be
//!   reached, through a node of a third region, which passes it on (to the destination, or
//!   through a further region not on its path, `via`, at most `MAX_RELAYS` relays) and never
//!   stores it. The acknowledgement comes back the same way, so it still means "committed
//!   in the destination's log". This delivers as long as any path of live links joins the
//!   two regions.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ferry_net::Transport;
use ferry_proto::wire::{ForwardingInfo, InterestReach, MeshNodeInfo, MeshReport};
use ferry_proto::{RegionPolicy, TopicConfig};
use ferry_router::{Gossip, GossipConfig, GossipInbox, GossipLink, Leads, LedGroup, NodeRecord};
use futures::future::BoxFuture;
use openraft::async_runtime::WatchReceiver;
use tokio::sync::watch;

use crate::leadership::LedPartition;
use crate::metadata::InterestSet;
use crate::node::{now_ms, HostedPartition, Node};
use crate::peer::{PeerRequest, PeerResponse, Router};
use crate::RegionError;

mod forward;
mod receive;
mod snapshot;

use forward::{ForwardKey, ForwardStatus, RunningForwarder};
use receive::{Intake, OriginPartition};
pub(crate) use snapshot::{InterestView, Judgement, MeshSnapshot};

/// How often the node republishes its record and reconciles its forwarders.
const SUPERVISE_EVERY: Duration = Duration::from_millis(200);
/// A region counts as reached directly if a call to it succeeded this recently.
const REACH_FRESH: Duration = Duration::from_secs(10);
/// How long the metadata leader waits for a quorum to confirm it before vouching for the
/// region's interest.
const VOUCH_TIMEOUT: Duration = Duration::from_secs(1);

/// Locks `m`, taking the data of a poisoned lock as it is.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
/// A forwarded topic's key layout in another region (created with, has now), as far as
/// this node knows.
enum TopicLayout {
    Known((u32, u32)),
    /// A node of the region is being asked.
    Asking,
    /// The last attempt failed then.
    Failed(Instant),
}

/// After a failed attempt to define a topic in another region, the next waits this long.
const ENSURE_TOPIC_RETRY: Duration = Duration::from_secs(1);

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
    /// What this node knows of forwarded topics' layouts in other regions.
    topic_layouts: Mutex<HashMap<(String, String), TopicLayout>>,
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
    /// The partitions this node leads as gossip carries them, and the version of the led
    /// set they were made from ([`crate::leadership::Leadership::led`]).
    leads: Mutex<(u64, Leads)>,
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

    /// Forgets the layout of `topic` in `region` if it is still `stale` (a forwarder found
    /// the region grew the topic since): the region is asked again after
    /// `ENSURE_TOPIC_RETRY` (while its groups seal one by one, it may answer the same).
    pub(super) fn forget_topic_layout(&self, topic: &str, region: &str, stale: (u32, u32)) {
        let key = (topic.to_string(), region.to_string());
        let mut known = lock(&self.topic_layouts);
        if matches!(known.get(&key), Some(TopicLayout::Known(l)) if *l == stale) {
            known.insert(key, TopicLayout::Failed(Instant::now()));
        }
    }

    /// The cursor names of the forwarders this node runs for `partition` of `topic` to
    /// `region` (none when it runs none).
    fn running_cursors(&self, topic: &str, partition: u32, region: &str) -> Vec<String> {
        lock(&self.forwarders)
            .keys()
            .filter(|k| k.topic == topic && k.partition == partition && k.destination == region)
            .map(ForwardKey::cursor_name)
            .collect()
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
                    dest_partition: (!key.whole).then_some(key.dest_partition),
                    lag_events: s.high.saturating_sub(s.cursor),
                    lag_ms: s.lag_ms,
                    sent_events: s.sent_events,
                    route: s.route,
                    last_error: s.last_error,
                    trimmed_unforwarded: lock(&self.trimmed_unforwarded)
                        .get(key)
                        .copied()
                        .unwrap_or(0),
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

impl<T: Transport> Node<T> {
    /// Starts gossip and the supervision of forwarders.
    pub(crate) async fn start_mesh(&self) -> Result<(), RegionError> {
        let config = &self.inner.config;
        let Some(addr) = config.listen_addr() else {
            return Ok(());
        };
        // The region's nodes (as far as this node knows them) and the seeds it joins by.
        let mut seeds: Vec<SocketAddr> = self
            .region_members()
            .iter()
            .filter(|m| m.id != config.id)
            .map(|m| m.addr)
            .chain(config.seeds.iter().copied())
            .filter(|s| *s != addr)
            .collect();
        seeds.sort_unstable();
        seeds.dedup();
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let gossip_config = GossipConfig {
            node_id: config.id,
            region: config.region.clone(),
            advertise: addr,
            seeds,
            remote_seeds: config.mesh.remote_seeds.clone(),
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
            topic_layouts: Mutex::new(HashMap::new()),
            crossings: Mutex::new(HashMap::new()),
            resent_events_held: AtomicU64::new(0),
            reach: Mutex::new(HashMap::new()),
            receiving: Mutex::new(HashMap::new()),
            load_sample: Mutex::new((0, Instant::now(), 0)),
            leads: Mutex::new((u64::MAX, Leads::default())),
        });
        if self.inner.mesh.set(mesh).is_err() {
            return Ok(());
        }
        self.spawn_every(SUPERVISE_EVERY, |node| async move {
            node.supervise_mesh().await
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

    /// The Raft groups of the partitions `led`, as gossip carries them (sorted, each once).
    fn led_groups(&self, led: &[LedPartition]) -> Vec<LedGroup> {
        let mut groups = BTreeSet::new();
        let mut topic: Option<Arc<crate::metadata::TopicState>> = None;
        for l in led {
            // Led partitions come sorted by topic: one metadata lookup per topic.
            if topic.as_ref().is_none_or(|t| *t.config.name != *l.topic) {
                topic = self.inner.meta_view.topic(&l.topic);
            }
            if let Some(t) = &topic {
                groups.insert(LedGroup {
                    topic: l.topic.to_string(),
                    groups: t.config.groups,
                    group: t.group_of(l.hosted.partition),
                });
            }
        }
        groups.into_iter().collect()
    }

    /// One supervision round: publish this node's record, refresh the snapshot, start and
    /// stop forwarders to match what this node leads and which regions are alive.
    async fn supervise_mesh(&self) {
        let Some(mesh) = self.mesh().cloned() else {
            return;
        };
        let (led, led_version) = self.led_partitions();
        let load = {
            let mut sample = lock(&mesh.load_sample);
            let elapsed = sample.1.elapsed().as_secs_f64();
            if elapsed >= 1.0 {
                let appended: u64 = led.iter().map(|l| l.hosted.view.watermarks().high).sum();
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
            leads: {
                let mut leads = lock(&mesh.leads);
                if leads.0 != led_version {
                    *leads = (led_version, Arc::new(self.led_groups(&led)));
                }
                leads.1.clone()
            },
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
        // Led groups come sorted by topic: one metadata lookup and one set of destinations
        // per topic.
        for run in led.chunk_by(|a, b| a.topic == b.topic) {
            let Some(state) = self.inner.meta_view.topic(&run[0].topic) else {
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
            let layout = state.routing_layout();
            for destination in destinations {
                let Some(routed_by) = self.topic_layout_in(&mesh, &state.config, &destination)
                else {
                    continue;
                };
                for led in run {
                    let partition = led.hosted.partition;
                    let split = state.layout.splits.iter().any(|s| s.parent == partition);
                    if routed_by == layout && !split {
                        desired.insert(ForwardKey {
                            topic: state.config.name.clone(),
                            partition,
                            destination: destination.clone(),
                            dest_partition: partition,
                            routed_by,
                            whole: true,
                        });
                        continue;
                    }
                    // Every destination partition whose keys this one ever held.
                    let held = ferry_proto::created_modulus(partition, layout.0);
                    for dest_partition in 0..routed_by.1 {
                        let there =
                            ferry_proto::key_modulus(dest_partition, routed_by.0, routed_by.1);
                        if ferry_proto::key_spaces_meet(partition, held, dest_partition, there) {
                            desired.insert(ForwardKey {
                                topic: state.config.name.clone(),
                                partition,
                                destination: destination.clone(),
                                dest_partition,
                                routed_by,
                                whole: false,
                            });
                        }
                    }
                }
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
}

/// How far a partition's events have reached the regions it is forwarded to.
pub(crate) struct ForwardedFloor {
    /// Every region known has every event below this it wants (the lowest committed
    /// forwarding cursor; 0 while a known region has no cursor yet).
    pub(crate) offset: u64,
    /// The regions at that floor (a region without a cursor shows as `region (no cursor
    /// yet)`).
    pub(crate) behind: Vec<String>,
}

impl<T: Transport> Node<T> {
    /// How far `partition` of `config`'s topic has reached the other regions this node knows
    /// (and those the topic lists); None for a topic that is not forwarded or a node that
    /// knows no other region.
    pub(crate) fn forwarded_floor(
        &self,
        config: &TopicConfig,
        group: &HostedPartition,
    ) -> Option<ForwardedFloor> {
        let mesh = self.mesh()?;
        let mut regions: BTreeSet<String> = match &config.regions {
            RegionPolicy::Local => return None,
            RegionPolicy::ByInterest => BTreeSet::new(),
            RegionPolicy::Listed(listed) => listed.iter().cloned().collect(),
        };
        regions.extend(mesh.snapshot().regions());
        regions.remove(&mesh.region);
        if regions.is_empty() {
            return None;
        }
        let cursors = group.view.forward_cursors();
        let mut floor: Option<(u64, Vec<String>)> = None;
        for region in regions {
            // The cursors of the forwarders running now (a cursor of a layout left behind
            // stays below for ever; one running without a cursor yet holds everything);
            // all of the region's while none runs.
            let running = mesh.running_cursors(&config.name, group.partition, &region);
            let split = format!("{region}#");
            let at = if running.is_empty() {
                cursors
                    .iter()
                    .filter(|(name, _)| *name == region || name.starts_with(&split))
                    .map(|(name, at)| (*at, name.clone()))
                    .min()
            } else {
                running
                    .iter()
                    .map(|name| {
                        let at = cursors.iter().find(|(n, _)| n == name).map(|(_, at)| *at);
                        match at {
                            Some(at) => (at, name.clone()),
                            None => (0, format!("{name} (no cursor yet)")),
                        }
                    })
                    .min()
            };
            let (at, name) = at.unwrap_or((0, format!("{region} (no cursor yet)")));
            match &mut floor {
                Some((lowest, names)) if at == *lowest => names.push(name),
                Some((lowest, _)) if at > *lowest => {}
                _ => floor = Some((at, vec![name])),
            }
        }
        floor.map(|(offset, behind)| ForwardedFloor { offset, behind })
    }

    /// The key layout (created with, has now) of `config`'s topic in `region`, once known.
    /// The first time, it asks a node of the region in the background (which creates the
    /// topic there if it is missing: integration and notification topics are defined in
    /// every region they are forwarded to) and answers None; a failed attempt is retried
    /// after a second. Known until a forwarder finds the region left it.
    fn topic_layout_in(
        &self,
        mesh: &Arc<Mesh>,
        config: &TopicConfig,
        region: &str,
    ) -> Option<(u32, u32)> {
        let key = (config.name.clone(), region.to_string());
        {
            let mut known = lock(&mesh.topic_layouts);
            match known.get(&key) {
                Some(TopicLayout::Known(layout)) => return Some(*layout),
                Some(TopicLayout::Asking) => return None,
                Some(TopicLayout::Failed(at)) if at.elapsed() < ENSURE_TOPIC_RETRY => return None,
                _ => {}
            }
            known.insert(key.clone(), TopicLayout::Asking);
        }
        let node = self.clone();
        let mesh = mesh.clone();
        let config = config.clone();
        tokio::spawn(async move {
            let answer = node.ask_topic_layout(&mesh, config, &key.1).await;
            let state = match answer {
                Ok(layout) => TopicLayout::Known(layout),
                Err(e) => {
                    tracing::warn!(topic = %key.0, region = %key.1, error = %e, "cannot define the topic in a region it is forwarded to; retrying");
                    TopicLayout::Failed(Instant::now())
                }
            };
            lock(&mesh.topic_layouts).insert(key, state);
        });
        None
    }

    async fn ask_topic_layout(
        &self,
        mesh: &Mesh,
        config: TopicConfig,
        region: &str,
    ) -> Result<(u32, u32), String> {
        let snapshot = mesh.snapshot();
        let request = PeerRequest::EnsureTopic {
            config,
            region: region.to_string(),
            via: vec![mesh.region.clone()],
        };
        let mut errors = Vec::new();
        // The region's nodes, then nodes of third regions that relay it (as for batches).
        let direct = snapshot
            .nodes
            .iter()
            .filter(|n| n.region == region)
            .map(|n| n.addr);
        let relays = snapshot
            .relays(&mesh.region, region)
            .into_iter()
            .map(|(_, addr)| addr);
        for addr in direct.chain(relays) {
            match self.inner.router.call_addr(addr, &request).await {
                Ok(PeerResponse::TopicLayout {
                    initial,
                    partitions,
                }) => return Ok((initial, partitions)),
                Ok(PeerResponse::Error(e) | PeerResponse::Unreachable(e)) => errors.push(e),
                Ok(_) => errors.push(format!("{addr}: unexpected answer")),
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        if errors.is_empty() {
            errors.push(format!("no live node of region {region}"));
        }
        Err(errors.join("; "))
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
        for answer in self
            .ask_other_members(&PeerRequest::ForwardingStatus, Duration::from_secs(2))
            .await
        {
            if let PeerResponse::ForwardingStatus(list) = answer {
                report.forwarding.extend(list);
            }
        }
        report.forwarding.sort_by(|a, b| {
            (&a.topic, a.partition, &a.destination).cmp(&(&b.topic, b.partition, &b.destination))
        });
        report
    }
}
