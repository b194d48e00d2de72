//! Gossip membership for the mesh, in two levels: SWIM inside a region ([foca], driven
//! without I/O of its own) and summaries pushed between regions by each region's router
//! nodes (see the `membership` submodule for the protocol).
//!
//! Each node runs one [`Gossip`]. It tells the mesh about itself with [`Gossip::publish`] (a
//! [`NodeRecord`]: region, address, role, partitions it leads, its region's subject interest,
//! the regions it reaches, its load) and learns the other live nodes and their records with
//! [`Gossip::live`], or by watching [`Gossip::subscribe`]. A node that stops answering leaves
//! `live()` within about [`GossipConfig::dead_after`] in its region, and about one round
//! later in the others.
//!
//! Messages go out through a [`GossipLink`] the node implements over ferry-net's mutually
//! authenticated QUIC (a fire-and-forget peer RPC addressed by the peer's gossip address), and
//! come in through the [`GossipInbox`] the node hands received messages to. Every message is
//! encoded by ferry-proto's codec (foca's SWIM packets inside by foca's postcard codec): no
//! socket of gossip's own. Sends are spawned, so a dead peer never holds up the gossip loop,
//! and bounded (8 in flight per peer, 256 in all; more are dropped, as UDP would). The inbox
//! is a bounded queue that drops when full.
//!
//! - Identities: (node id, gossip address, generation). A restarted node uses a larger
//!   [`GossipConfig::generation`] and replaces its old self at once; a node declared down
//!   while alive (a long pause) comes back as the next generation.
//! - Records and summaries are versioned: an older one never replaces a newer one. A record
//!   or summary must encode within 60 KiB (a gossip item); a record over it is refused at
//!   [`Gossip::publish`], a summary over it travels without the leaders.
//!
//! Not here: deciding what to publish (the node's driver), the QUIC link itself (ferry-net).
//!
//! [foca]: https://docs.rs/foca

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info};

mod link;
mod membership;
mod record;
#[cfg(test)]
mod tests;
mod wire;

use link::{Counters, Sender};
use membership::{Dropped, Membership};

/// Messages received but not yet handled, at most; more are dropped.
const INBOX_CAPACITY: usize = 256;

/// How gossip messages leave this node. The node implements it over ferry-net's mutually
/// authenticated QUIC: a peer RPC addressed by the peer's gossip socket address, carrying this
/// node's advertised gossip address so the receiver can hand it to [`GossipInbox::deliver`].
///
/// Sends are fire-and-forget: the future may take as long as the link needs (it runs in its
/// own task), and an error only counts as a lost message.
pub trait GossipLink: Send + Sync + 'static {
    /// Sends one gossip message to the node whose gossip address is `to`.
    fn send(&self, to: SocketAddr, message: Bytes) -> BoxFuture<'static, Result<(), String>>;
}

/// Where the node hands the gossip messages it receives. Cheap to clone.
#[derive(Clone)]
pub struct GossipInbox {
    queue: mpsc::Sender<(SocketAddr, Bytes)>,
    counters: Arc<Counters>,
}

impl GossipInbox {
    /// Queues `message`, received from the peer whose advertised gossip address is `from`.
    /// Never blocks: when the queue is full the message is dropped (counted, logged at debug),
    /// as a UDP datagram would be; gossip repairs the loss in a later round.
    pub fn deliver(&self, from: SocketAddr, message: Bytes) {
        match self.queue.try_send((from, message)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                let dropped = Counters::bump(&self.counters.inbox_full);
                debug!(%from, dropped, "gossip inbox full, dropping a message");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                debug!(%from, "gossip stopped, dropping a message");
            }
        }
    }
}

/// How a node gossips.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipConfig {
    /// This node's id (unique in the mesh).
    pub node_id: u64,
    /// This node's region; [`Gossip::publish`] refuses a record of another region.
    pub region: String,
    /// The address peers send gossip to (what [`GossipLink::send`] is given as `to`).
    pub advertise: SocketAddr,
    /// Gossip addresses of other nodes of this region to start from (this node's own
    /// address may be among them).
    pub seeds: Vec<SocketAddr>,
    /// Gossip addresses of nodes in other regions to start from.
    pub remote_seeds: Vec<SocketAddr>,
    /// Mesh name: nodes of different meshes ignore each other.
    pub cluster: String,
    /// How often this node gossips: a round of records inside the region and, on router
    /// nodes, summaries to the other regions.
    pub interval: Duration,
    /// How fast a dead node must leave [`Gossip::live`] of its region's nodes (other regions
    /// see it go about a round later); at least 4 × `interval`. SWIM is set from it: a
    /// probe every `dead_after / 6`, suspicion for `dead_after / 4`. Another region's nodes
    /// leave `live()` when no newer summary of their region arrived for `dead_after`.
    pub dead_after: Duration,
    /// This run's generation, e.g. the start time in milliseconds: a restarted node must use a
    /// larger one, so the mesh sees a new node rather than an old one going back in time.
    pub generation: u64,
}

impl GossipConfig {
    pub(super) fn validate(&self) -> Result<(), GossipError> {
        let fail = |reason: String| Err(GossipError::Config(reason));
        if self.interval.is_zero() {
            return fail("interval must be more than zero".into());
        }
        if self.dead_after < self.interval * 4 {
            return fail(format!(
                "dead_after ({:?}) must be at least 4 x interval ({:?})",
                self.dead_after, self.interval
            ));
        }
        if self.cluster.is_empty() {
            return fail("cluster must not be empty".into());
        }
        Ok(())
    }
}

/// The partitions of one Raft group a node leads: those of `topic` numbered `p` with
/// `p % groups == group` (a topic's partitions share `groups` Raft groups).
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct LedGroup {
    /// The topic.
    pub topic: String,
    /// How many Raft groups the topic's partitions share.
    pub groups: u32,
    /// Which of them.
    pub group: u32,
}

/// The Raft groups a node leads, sorted, each once: a few entries per topic however many
/// partitions it has. An `Arc` of a `Vec` rather than of a slice: equal pointers then
/// compare equal without looking at the contents (std shortcuts only sized `Eq` values),
/// and records are compared often.
pub type Leads = Arc<Vec<LedGroup>>;

/// Whether `leads` (sorted, as records carry them) include `topic`'s partition `partition`,
/// for a topic that never grew (a partition added to a topic is in its parent's group; only
/// topics that stay in their region can grow, and this is asked about forwarded ones).
pub fn leads_partition(leads: &[LedGroup], topic: &str, partition: u32) -> bool {
    let start = leads.partition_point(|l| l.topic.as_str() < topic);
    let end = start + leads[start..].partition_point(|l| l.topic == topic);
    let mut at = start;
    // One run per distinct group count (one, unless the topic was made again differently).
    while at < end {
        let groups = leads[at].groups;
        let run = at + leads[at..end].partition_point(|l| l.groups == groups);
        if groups > 0
            && leads[at..run]
                .binary_search_by_key(&(partition % groups), |l| l.group)
                .is_ok()
        {
            return true;
        }
        at = run;
    }
    false
}

/// What a node tells the mesh about itself (checked as the `record` submodule says).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeRecord {
    /// Node id (unique in the mesh).
    pub id: u64,
    /// Region name, 1-64 of `[A-Za-z0-9_-]`.
    pub region: String,
    /// The node's RPC address.
    pub addr: SocketAddr,
    /// Role, e.g. `"node"`; 1-32 of `[A-Za-z0-9_-]`.
    pub role: String,
    /// The Raft groups it leads, sorted, each once. Shared: records are copied often.
    pub leads: Leads,
    /// Its region's subject interest patterns, e.g. `"orders.>"`.
    pub interest: Vec<String>,
    /// Regions it currently reaches directly.
    pub reach: Vec<String>,
    /// Its load (the unit is the publisher's; compared between nodes).
    pub load: u64,
    /// The version of `interest` (its region's metadata log index of the last change).
    pub interest_version: u64,
    /// A time (ms since the epoch) at which the node vouches that `interest` was its region's
    /// current committed set (it confirmed its leadership of the region's metadata group
    /// after that moment); 0 when it does not vouch.
    pub interest_as_of_ms: u64,
    /// When the oldest of `interest` was added (ms since the epoch; 0 if unknown or none).
    pub interest_since_ms: u64,
    /// The interest version this node holds for each other region it knows.
    pub seen: Vec<(String, u64)>,
}

impl Default for NodeRecord {
    /// Empty, with the unspecified address `0.0.0.0:0`.
    fn default() -> Self {
        Self {
            id: 0,
            region: String::new(),
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            role: String::new(),
            leads: Leads::default(),
            interest: Vec::new(),
            reach: Vec::new(),
            load: 0,
            interest_version: 0,
            interest_as_of_ms: 0,
            interest_since_ms: 0,
            seen: Vec::new(),
        }
    }
}

/// Counters of what gossip dropped, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GossipStats {
    /// Received messages dropped because the inbox was full.
    pub inbox_full: u64,
    /// Received messages dropped because they did not decode.
    pub malformed: u64,
    /// Sends dropped because too many were in flight.
    pub sends_dropped: u64,
    /// Sends the link reported as failed.
    pub send_failures: u64,
    /// Messages sent (handed to the link).
    pub sent: u64,
    /// Of them, messages to other regions (router nodes only).
    pub sent_between_regions: u64,
}

/// Why gossip could not start or a record could not be published.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    /// The configuration is unusable.
    #[error("invalid gossip config: {0}")]
    Config(String),
    /// Gossip did not start.
    #[error("gossip did not start: {0}")]
    Start(String),
    /// The record cannot be published (peers would not read it back as it is).
    #[error("invalid node record: {0}")]
    InvalidRecord(String),
}

/// One node's gossip: the membership state machine, driven by a task that owns its timers
/// and rounds and sends over a [`GossipLink`].
pub struct Gossip {
    core: Arc<Mutex<Membership>>,
    wake: Arc<Notify>,
    node_id: u64,
    members: watch::Receiver<Vec<NodeRecord>>,
    task: JoinHandle<()>,
    counters: Arc<Counters>,
}

fn lock(core: &Mutex<Membership>) -> MutexGuard<'_, Membership> {
    core.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Gossip {
    /// Starts gossiping. Hand received messages to the returned inbox. The node is not in
    /// anyone's [`live`](Self::live) (its own included) until it has [published](Self::publish)
    /// a record.
    pub async fn start(
        config: GossipConfig,
        link: Arc<dyn GossipLink>,
    ) -> Result<(Gossip, GossipInbox), GossipError> {
        let counters = Arc::new(Counters::default());
        let core = Membership::new(&config, Instant::now().into_std())?;
        let core = Arc::new(Mutex::new(core));
        let (inbox_tx, inbox_rx) = mpsc::channel(INBOX_CAPACITY);
        let inbox = GossipInbox {
            queue: inbox_tx,
            counters: counters.clone(),
        };
        let (members_tx, members) = watch::channel(Vec::new());
        let wake = Arc::new(Notify::new());
        let driver = Driver {
            core: core.clone(),
            sender: Sender::new(link, counters.clone()),
            counters: counters.clone(),
            timers: BinaryHeap::new(),
            timer_seq: 0,
            members: members_tx,
            interval: config.interval,
        };
        let task = tokio::spawn(driver.run(inbox_rx, wake.clone()));
        info!(
            node_id = config.node_id,
            region = %config.region,
            advertise = %config.advertise,
            generation = config.generation,
            seeds = config.seeds.len(),
            remote_seeds = config.remote_seeds.len(),
            "gossip started"
        );
        let gossip = Gossip {
            core,
            wake,
            node_id: config.node_id,
            members,
            task,
            counters,
        };
        Ok((gossip, inbox))
    }

    /// Publishes this node's record; spread at once if it changed. Refused if the record is
    /// not this node's (id, region), would not pass peers' checks, or is too large.
    pub async fn publish(&self, record: &NodeRecord) -> Result<(), GossipError> {
        lock(&self.core).publish(Instant::now().into_std(), record.clone())?;
        self.wake.notify_one();
        Ok(())
    }

    /// The live nodes (this one included once it has published), sorted by id, one per id.
    pub async fn live(&self) -> Vec<NodeRecord> {
        lock(&self.core).live(Instant::now().into_std())
    }

    /// The live records, changing when a node joins or leaves or a live node's record
    /// changes (never on heartbeats alone). A driver can `changed().await` on it instead of
    /// polling [`live`](Self::live).
    pub fn subscribe(&self) -> watch::Receiver<Vec<NodeRecord>> {
        self.members.clone()
    }

    /// What gossip sent and dropped so far.
    pub fn stats(&self) -> GossipStats {
        let mut stats = self.counters.snapshot();
        stats.malformed += lock(&self.core).refused_items();
        stats
    }

    /// Pushes this node's summaries to `addr` and announces itself to it now (besides the
    /// regular rounds).
    pub fn gossip_with(&self, addr: SocketAddr) -> Result<(), GossipError> {
        lock(&self.core).gossip_with(Instant::now().into_std(), addr);
        self.wake.notify_one();
        Ok(())
    }

    /// Stops gossiping without waiting. Peers see this node leave after their `dead_after`.
    pub fn stop(&self) {
        self.task.abort();
        info!(node_id = self.node_id, "gossip stopped");
    }

    /// Stops gossiping and waits for the driver to end. Peers see this node leave after
    /// their `dead_after`.
    pub async fn shutdown(self) {
        self.task.abort();
        let _ = self.task.await;
        info!(node_id = self.node_id, "gossip stopped");
    }
}

/// The task around [`Membership`]: hands it messages, due timers and rounds, sends what it
/// produces, and mirrors its live view into the members watch.
struct Driver {
    core: Arc<Mutex<Membership>>,
    sender: Sender,
    counters: Arc<Counters>,
    /// foca's timers: (due, insertion order) → timer.
    timers: BinaryHeap<Reverse<(Instant, u64, TimerSlot)>>,
    timer_seq: u64,
    members: watch::Sender<Vec<NodeRecord>>,
    interval: Duration,
}

/// A foca timer in the heap (ordered by its due time and insertion order only).
struct TimerSlot(foca::Timer<wire::Peer>);

impl PartialEq for TimerSlot {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for TimerSlot {}
impl PartialOrd for TimerSlot {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for TimerSlot {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

impl Driver {
    async fn run(mut self, mut inbox: mpsc::Receiver<(SocketAddr, Bytes)>, wake: Arc<Notify>) {
        let mut round = tokio::time::interval(self.interval);
        round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.flush();
        loop {
            let next_timer = self.timers.peek().map(|Reverse((due, _, _))| *due);
            tokio::select! {
                received = inbox.recv() => {
                    let Some((from, message)) = received else { return };
                    let result = lock(&self.core).handle_message(Instant::now().into_std(), from, &message);
                    match result {
                        Ok(()) => {}
                        Err(Dropped::Malformed(reason)) => {
                            let malformed = Counters::bump(&self.counters.malformed);
                            debug!(%from, len = message.len(), %reason, malformed, "dropping a gossip message");
                        }
                        Err(Dropped::Foreign(reason)) => debug!(%from, %reason, "ignoring a gossip message"),
                    }
                }
                () = sleep_until_some(next_timer) => {
                    let now = Instant::now();
                    while let Some(Reverse((due, _, _))) = self.timers.peek() {
                        if *due > now {
                            break;
                        }
                        let Some(Reverse((_, _, TimerSlot(timer)))) = self.timers.pop() else { break };
                        lock(&self.core).handle_timer(now.into_std(), timer);
                    }
                }
                _ = round.tick() => lock(&self.core).tick(Instant::now().into_std()),
                () = wake.notified() => {}
            }
            self.flush();
        }
    }

    /// Sends what the membership produced, sets its timers, updates the members watch.
    fn flush(&mut self) {
        let now = Instant::now();
        let (outgoing, timers, live) = {
            let mut core = lock(&self.core);
            let outgoing: Vec<_> = std::iter::from_fn(|| core.poll_transmit()).collect();
            let timers: Vec<_> = std::iter::from_fn(|| core.poll_timer()).collect();
            (outgoing, timers, core.live(now.into_std()))
        };
        for message in outgoing {
            if message.between_regions {
                Counters::bump(&self.counters.sent_between_regions);
            }
            self.sender.send(message.to, message.message);
        }
        for (after, timer) in timers {
            self.timer_seq += 1;
            self.timers
                .push(Reverse((now + after, self.timer_seq, TimerSlot(timer))));
        }
        self.members.send_if_modified(|current| {
            let changed = *current != live;
            if changed {
                *current = live;
            }
            changed
        });
    }
}

async fn sleep_until_some(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}
