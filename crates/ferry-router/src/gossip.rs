//! Gossip membership for the mesh: [chitchat] (Scuttlebutt anti-entropy with a phi-accrual
//! failure detector) over an abstract authenticated link instead of UDP.
//!
//! Each node runs one [`Gossip`]. It tells the mesh about itself with [`Gossip::publish`] (a
//! [`NodeRecord`]: region, address, role, partitions it leads, its region's subject interest,
//! the regions it reaches, its load) and learns the other live nodes and their records with
//! [`Gossip::live`], or by watching [`Gossip::subscribe`]. A node that stops answering leaves
//! `live()` within about [`GossipConfig::dead_after`].
//!
//! Messages go out through a [`GossipLink`] the node implements over ferry-net's mutually
//! authenticated QUIC (a fire-and-forget peer RPC addressed by the peer's gossip address), and
//! come in through the [`GossipInbox`] the node hands received messages to. Sends are spawned,
//! so a dead peer never holds up the gossip loop, and bounded (8 in flight per peer, 256 in
//! all; more are dropped, as UDP would). The inbox is a bounded queue that drops when full.
//!
//! How chitchat is used, and what to know about it (0.13):
//! - Chitchat ids: node id = the decimal [`GossipConfig::node_id`], generation =
//!   [`GossipConfig::generation`] (a restarted node is a new generation; until the old one is
//!   declared dead both exist, and [`Gossip::live`] keeps the newest generation of each id),
//!   gossip address = [`GossipConfig::advertise`].
//! - Chitchat 0.13 keeps its wire encoding private (`ChitchatEnvelope` has no public
//!   serializer and its digest is opaque), so envelopes are turned into bytes and back by
//!   chitchat's own UDP socket on the loopback interface (see the `codec` submodule): the
//!   bytes on the link are exactly chitchat's UDP datagrams, protocol V0.
//! - The failure detector is configured as a near-fixed timeout derived from `dead_after`
//!   (see [`GossipConfig::dead_after`]), not chitchat's adaptive default (which, with a
//!   1000-sample window, detects after ~8 mean heartbeat intervals, a delay that depends on
//!   cluster size and gossip fan-out).
//! - [`Gossip::subscribe`] follows chitchat's live-nodes watcher, which chitchat re-evaluates
//!   once per gossip round: it changes when a node joins or leaves or a live node's record
//!   changes (not on heartbeats), up to one gossip interval after [`Gossip::live`] shows it.
//! - Records are plain key/values (`record` submodule); a record that does not parse makes
//!   that node invisible in `live()` (logged at debug), never an error.
//!
//! Not here: deciding what to publish (the node's driver), the QUIC link itself (ferry-net),
//! region-level summaries for two-level gossip (the design's "between regions only the router
//! nodes' summaries"): today every node gossips with every node of the mesh.
//!
//! [chitchat]: https://github.com/quickwit-oss/chitchat

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chitchat::{
    spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState,
    ProtocolVersion,
};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info};

mod codec;
mod record;
#[cfg(test)]
mod tests;
mod transport;

use transport::{Counters, LinkSocket, LinkTransport};

/// Messages received but not yet decoded, at most; more are dropped.
const INBOX_CAPACITY: usize = 256;
/// Decoded messages waiting for chitchat's loop, at most.
const DECODED_CAPACITY: usize = 64;
/// How long a dead node stays in the cluster state (out of `live()`) before chitchat forgets
/// it, at least. Forgetting is harmless (a node that comes back is re-learnt); keeping costs a
/// digest entry per dead generation.
const FORGET_DEAD_AFTER: Duration = Duration::from_secs(60 * 60);

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
    /// Gossip addresses to start from (this node's own address may be among them).
    pub seeds: Vec<SocketAddr>,
    /// Mesh name (chitchat's cluster id): nodes of different meshes refuse each other.
    pub cluster: String,
    /// How often this node gossips (with up to 3 live peers, plus sometimes a dead one and a
    /// seed).
    pub interval: Duration,
    /// How fast a dead node must leave [`Gossip::live`]; at least 4 × `interval`.
    ///
    /// Mapping to chitchat's failure detector: let `T = dead_after - 2 × interval` (a budget
    /// of two rounds: liveness is re-evaluated once per round, and the dead node's last
    /// heartbeat may reach a node second-hand up to a round late). Chitchat's phi is
    /// `silence / mean heartbeat interval`, the mean smoothed with a prior of 5 samples of
    /// `initial_interval`. With `sampling_window_size = 1`,
    /// `initial_interval = max_interval = T` and `phi_threshold = 1`, the mean is
    /// `(last sample + 5T) / 6` with the sample in `(0, T]`, so a node is declared dead after
    /// a silence between `5T/6` and `T`, whatever the cluster size or gossip fan-out: it leaves
    /// `live()` within `dead_after` of its death, and a live node is never declared dead
    /// unless nothing from it arrived for `5T/6`. (With `dead_after` 2 s and `interval`
    /// 100 ms: dead after 1.5-1.8 s of silence; the tests measure 1.5-1.85 s from the kill
    /// to the last node dropping it.)
    pub dead_after: Duration,
    /// This run's generation, e.g. the start time in milliseconds: a restarted node must use a
    /// larger one, so the mesh sees a new node rather than an old one going back in time.
    pub generation: u64,
}

impl GossipConfig {
    fn validate(&self) -> Result<(), GossipError> {
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

/// The failure detector settings for `interval` and `dead_after` (see
/// [`GossipConfig::dead_after`]).
fn failure_detector_config(interval: Duration, dead_after: Duration) -> FailureDetectorConfig {
    let silence = dead_after.saturating_sub(interval * 2);
    FailureDetectorConfig {
        phi_threshold: 1.0,
        sampling_window_size: 1,
        max_interval: silence,
        initial_interval: silence,
        dead_node_grace_period: FORGET_DEAD_AFTER.max(dead_after * 10),
    }
}

/// What a node tells the mesh about itself. Gossiped as strings under a fixed set of keys
/// (see the `record` submodule); list items must not contain the list's separator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Node id (the chitchat node id, decimal).
    pub id: u64,
    /// Region name, 1-64 of `[A-Za-z0-9_-]`.
    pub region: String,
    /// The node's RPC address.
    pub addr: SocketAddr,
    /// Role, e.g. `"node"`; 1-32 of `[A-Za-z0-9_-]`.
    pub role: String,
    /// Partitions it leads, as (topic, partition).
    pub leads: Vec<(String, u32)>,
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
            leads: Vec::new(),
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
}

/// Why gossip could not start or a record could not be published.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    /// The configuration is unusable.
    #[error("invalid gossip config: {0}")]
    Config(String),
    /// Chitchat or its loopback codec did not start.
    #[error("gossip did not start: {0}")]
    Start(String),
    /// The record cannot be published (peers would not read it back as it is).
    #[error("invalid node record: {0}")]
    InvalidRecord(String),
}

/// One node's gossip: chitchat running over a [`GossipLink`].
pub struct Gossip {
    handle: ChitchatHandle,
    node_id: u64,
    region: String,
    members: watch::Receiver<Vec<NodeRecord>>,
    tasks: Vec<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl Gossip {
    /// Starts gossiping. Hand received messages to the returned inbox. The node is not in
    /// anyone's [`live`](Self::live) (its own included) until it has [published](Self::publish)
    /// a record.
    pub async fn start(
        config: GossipConfig,
        link: Arc<dyn GossipLink>,
    ) -> Result<(Gossip, GossipInbox), GossipError> {
        config.validate()?;
        let counters = Arc::new(Counters::default());
        let (inbox_tx, inbox_rx) = mpsc::channel(INBOX_CAPACITY);
        let inbox = GossipInbox {
            queue: inbox_tx,
            counters: counters.clone(),
        };
        let (decoded_tx, decoded_rx) = mpsc::channel(DECODED_CAPACITY);
        let start_error = |e: codec::CodecError| GossipError::Start(e.to_string());
        let encoder = codec::Encoder::bind().await.map_err(start_error)?;
        let decoder = codec::Decoder::bind().await.map_err(start_error)?;
        let socket = LinkSocket::new(
            config.advertise,
            link,
            encoder,
            decoded_rx,
            counters.clone(),
        );
        let transport = LinkTransport::new(socket);

        let chitchat_id = ChitchatId::new(
            config.node_id.to_string(),
            config.generation,
            config.advertise,
        );
        let chitchat_config = ChitchatConfig {
            chitchat_id,
            cluster_id: config.cluster.clone(),
            gossip_interval: config.interval,
            listen_addr: config.advertise,
            seed_nodes: config.seeds.iter().map(ToString::to_string).collect(),
            failure_detector_config: failure_detector_config(config.interval, config.dead_after),
            // Records are overwritten, never deleted: tombstones do not occur.
            marked_for_deletion_grace_period: FORGET_DEAD_AFTER,
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V0,
        };
        let decoder_task = tokio::spawn(transport::run_decoder(
            inbox_rx,
            decoded_tx,
            decoder,
            counters.clone(),
        ));
        let handle = match spawn_chitchat(chitchat_config, Vec::new(), &transport).await {
            Ok(handle) => handle,
            Err(error) => {
                decoder_task.abort();
                return Err(GossipError::Start(format!("{error:#}")));
            }
        };
        let watcher = handle.chitchat().lock().await.live_nodes_watcher();
        let (members_tx, members) = watch::channel(Vec::new());
        let members_task = tokio::spawn(follow_members(watcher, members_tx));
        info!(
            node_id = config.node_id,
            region = %config.region,
            advertise = %config.advertise,
            generation = config.generation,
            seeds = config.seeds.len(),
            "gossip started"
        );
        let gossip = Gossip {
            handle,
            node_id: config.node_id,
            region: config.region,
            members,
            tasks: vec![decoder_task, members_task],
            counters,
        };
        Ok((gossip, inbox))
    }

    /// Publishes this node's record. Only keys whose value changed are set (chitchat versions
    /// every set, and each version is gossiped). Refused if the record is not this node's (id,
    /// region) or would not read back as it is.
    pub async fn publish(&self, record: &NodeRecord) -> Result<(), GossipError> {
        if record.id != self.node_id || record.region != self.region {
            return Err(GossipError::InvalidRecord(format!(
                "record of node {} in {:?} published by node {} in {:?}",
                record.id, record.region, self.node_id, self.region
            )));
        }
        record::validate(record).map_err(|e| GossipError::InvalidRecord(e.to_string()))?;
        let chitchat = self.handle.chitchat();
        let mut chitchat = chitchat.lock().await;
        let state = chitchat.self_node_state();
        for (key, value) in record::encode(record) {
            if state.get(key) != Some(value.as_str()) {
                state.set(key, value);
            }
        }
        Ok(())
    }

    /// The live nodes (this one included once it has published) whose records parse, sorted
    /// by id, one per id (the newest generation).
    pub async fn live(&self) -> Vec<NodeRecord> {
        let chitchat = self.handle.chitchat();
        let chitchat = chitchat.lock().await;
        records(
            chitchat
                .live_nodes()
                .filter_map(|id| chitchat.node_state(id).map(|state| (id, state))),
        )
    }

    /// The live records as of the last gossip round, changing when a node joins or leaves or a
    /// live node's record changes (never on heartbeats alone). A driver can
    /// `changed().await` on it instead of polling [`live`](Self::live).
    pub fn subscribe(&self) -> watch::Receiver<Vec<NodeRecord>> {
        self.members.clone()
    }

    /// What gossip dropped so far.
    pub fn stats(&self) -> GossipStats {
        self.counters.snapshot()
    }

    /// Sends one gossip round to `addr` now (besides the regular rounds).
    pub fn gossip_with(&self, addr: SocketAddr) -> Result<(), GossipError> {
        self.handle
            .gossip(addr)
            .map_err(|e| GossipError::Start(format!("{e:#}")))
    }

    /// Stops gossiping without waiting (for owners that share the handle). Peers see this
    /// node leave after their `dead_after`.
    pub fn stop(&self) {
        if let Err(error) = self.handle.initiate_shutdown() {
            debug!(node_id = self.node_id, error = %format!("{error:#}"), "chitchat already stopped");
        }
        for task in &self.tasks {
            task.abort();
        }
        info!(node_id = self.node_id, "gossip stopped");
    }

    /// Stops gossiping and waits for chitchat's loop to end. Peers see this node leave after
    /// their `dead_after`.
    pub async fn shutdown(self) {
        if let Err(error) = self.handle.shutdown().await {
            debug!(node_id = self.node_id, error = %format!("{error:#}"), "chitchat stopped with an error");
        }
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
        info!(node_id = self.node_id, "gossip stopped");
    }
}

/// Mirrors chitchat's live-nodes watcher as parsed records, until chitchat is dropped.
async fn follow_members(
    mut watcher: watch::Receiver<BTreeMap<ChitchatId, NodeState>>,
    members: watch::Sender<Vec<NodeRecord>>,
) {
    loop {
        let view = records(watcher.borrow_and_update().iter());
        members.send_if_modified(|current| {
            let changed = *current != view;
            if changed {
                *current = view;
            }
            changed
        });
        if watcher.changed().await.is_err() {
            return;
        }
    }
}

/// The records of `nodes` that parse, the newest generation of each id, sorted by id.
fn records<'a>(
    nodes: impl IntoIterator<Item = (&'a ChitchatId, &'a NodeState)>,
) -> Vec<NodeRecord> {
    let mut newest: BTreeMap<u64, (u64, NodeRecord)> = BTreeMap::new();
    for (id, state) in nodes {
        let record = match record::decode(&id.node_id, |key| state.get(key)) {
            Ok(record) => record,
            Err(error) => {
                debug!(node = ?id, %error, "ignoring a node whose record does not parse");
                continue;
            }
        };
        match newest.get(&record.id) {
            Some((generation, _)) if *generation >= id.generation_id => {}
            _ => {
                newest.insert(record.id, (id.generation_id, record));
            }
        }
    }
    newest.into_values().map(|(_, record)| record).collect()
}
