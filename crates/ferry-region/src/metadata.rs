//! The metadata state machine: topics and their replica placement, one Raft group per region.
//! Tree layout (`sm:meta`): `t`+name → [`TopicState`]; `i`+name → an interest's subject
//! filter (what this region wants forwarded from other regions); `V` → the interest version
//! (the log index of the last entry that changed the interests, big-endian u64; absent = 0);
//! `a`+name → when the interest was added (ms since the epoch, big-endian u64; absent = 0);
//! `m`+topic+`\0`+group (big-endian u32) → a [`ReplicaMove`] under way; `d`+node (big-endian
//! u64) → the node is draining; `B` → present while the region balances its replicas;
//! `s`+topic → the topic's [`KeyLayout`] once partitions were added to it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use ferry_proto::wire::{ApiError, ErrorCode};
use ferry_proto::{codec, KeyLayout, NodeId, SubjectFilter, TopicConfig};
use ferry_store::{Application, StoreError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::command::{decode, encode, MetaCommand, MetaReply};

const TOPIC_PREFIX: u8 = b't';
const INTEREST_PREFIX: u8 = b'i';
const INTEREST_VERSION_KEY: &[u8] = b"V";
const INTEREST_ADDED_PREFIX: u8 = b'a';
const MOVE_PREFIX: u8 = b'm';
const DRAINING_PREFIX: u8 = b'd';
const BALANCING_KEY: &[u8] = b"B";
const LAYOUT_PREFIX: u8 = b's';

/// A replica of a topic's Raft group on its way from one node to another ([`crate::moves`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaMove {
    /// The topic.
    pub topic: String,
    /// The topic's Raft group (numbered like its first partition).
    pub group: u32,
    /// The node giving the replica up.
    pub from: NodeId,
    /// The node taking it.
    pub to: NodeId,
    /// When the move was asked for (ms since the epoch, the proposer's clock).
    pub since_ms: u64,
}

fn move_key(topic: &str, group: u32) -> Vec<u8> {
    let mut key = vec![MOVE_PREFIX];
    key.extend_from_slice(topic.as_bytes());
    key.push(0);
    key.extend_from_slice(&group.to_be_bytes());
    key
}

fn draining_key(node: NodeId) -> Vec<u8> {
    let mut key = vec![DRAINING_PREFIX];
    key.extend_from_slice(&node.to_be_bytes());
    key
}

/// A topic as the region knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicState {
    /// Its configuration.
    pub config: TopicConfig,
    /// Replica nodes per partition (those of its Raft group); the first one initialises
    /// the group.
    pub replicas: Vec<Vec<NodeId>>,
    /// How its keys map to partitions (kept under its own key: a topic's record is the
    /// same as before topics could grow).
    #[serde(skip)]
    pub layout: KeyLayout,
}

impl TopicState {
    /// The Raft group of `partition`: that of the partition it descends from (a split's
    /// child joins its parent's group, so one log orders the seal and the child's events).
    pub fn group_of(&self, partition: u32) -> u32 {
        self.config.group_of(self.layout.root(partition))
    }

    /// The topic's key layout as routing into it needs it: the partitions it was created
    /// with, and those up to its first child not sealed yet (a group refuses keys routed by
    /// a layout it has not sealed; one that sealed ahead of a lower child's parent waits
    /// for that one).
    pub fn routing_layout(&self) -> (u32, u32) {
        let initial = match self.layout.initial {
            0 => self.config.partitions,
            n => n,
        };
        // Children are added and sealed in number order: the first unsealed one is where
        // the layout every sealed group agrees with ends.
        let sealed_to = self
            .layout
            .unsealed()
            .map(|s| s.child)
            .min()
            .unwrap_or(self.config.partitions);
        (initial, sealed_to)
    }

    /// The partitions of Raft group `group`, in order.
    pub fn partitions_of(&self, group: u32) -> impl Iterator<Item = u32> + '_ {
        (0..self.config.partitions).filter(move |p| self.group_of(*p) == group)
    }
}

fn layout_key(topic: &str) -> Vec<u8> {
    let mut key = vec![LAYOUT_PREFIX];
    key.extend_from_slice(topic.as_bytes());
    key
}

/// Read access to the applied metadata, shared with the node.
pub struct MetaView {
    /// The topics and the replica moves under way, under one lock so that they are read as
    /// of one applied index.
    placement: RwLock<Shared>,
    interests: RwLock<BTreeMap<String, SubjectFilter>>,
    interest_version: std::sync::atomic::AtomicU64,
    interests_since: std::sync::atomic::AtomicU64,
    /// Nodes draining.
    draining: RwLock<BTreeSet<NodeId>>,
    balancing: std::sync::atomic::AtomicBool,
    version: watch::Sender<u64>,
}

/// What [`MetaView::placement`] guards.
#[derive(Default)]
struct Shared {
    /// Shared, so a lookup on the publish path copies a pointer, not the placement.
    topics: BTreeMap<String, Arc<TopicState>>,
    /// Replica moves under way, by (topic, group).
    moves: BTreeMap<(String, u32), ReplicaMove>,
}

/// The topics and the replica moves under way as one node applied them, read together: a
/// finished move shows in its topic's replicas in the same snapshot that no longer lists it
/// under way, so a reader sees it either under way or done, never neither (a node that saw
/// neither would retire the replica the move had just made on it).
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// Every topic, by name.
    pub topics: Vec<Arc<TopicState>>,
    /// The moves under way.
    pub moves: Vec<ReplicaMove>,
}

impl Placement {
    /// The Raft groups `node` hosts: each topic's groups with a replica on it or a move to
    /// it under way, with whether it is moving in.
    pub fn groups_on(&self, node: NodeId) -> Vec<(&Arc<TopicState>, u32, bool)> {
        let mut hosted = Vec::new();
        for topic in &self.topics {
            for group in 0..topic.config.groups {
                let moving_in = self
                    .moves
                    .iter()
                    .any(|m| m.topic == topic.config.name && m.group == group && m.to == node);
                if moving_in || topic.replicas[group as usize].contains(&node) {
                    hosted.push((topic, group, moving_in));
                }
            }
        }
        hosted
    }
}

/// A region's interests as one node applied them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterestSet {
    /// The metadata log index of the last change (0 before any): two nodes with one version
    /// hold the same set (the entry at an index is the same on every node), and a larger
    /// version is newer.
    pub version: u64,
    /// The interests by name.
    pub interests: BTreeMap<String, SubjectFilter>,
    /// When the oldest of them was added (ms since the epoch; 0 if unknown or none).
    pub since_ms: u64,
}

impl MetaView {
    /// A topic by name.
    pub fn topic(&self, name: &str) -> Option<Arc<TopicState>> {
        self.placement.read().ok()?.topics.get(name).cloned()
    }

    /// A topic's retention (without copying its placement).
    pub fn retention(&self, name: &str) -> Option<ferry_proto::Retention> {
        Some(
            self.placement
                .read()
                .ok()?
                .topics
                .get(name)?
                .config
                .retention,
        )
    }

    /// Every topic.
    pub fn topics(&self) -> Vec<Arc<TopicState>> {
        self.placement
            .read()
            .map(|p| p.topics.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The topics and the moves under way, as of one applied index: what a reader that needs
    /// both takes (see [`Placement`]).
    pub fn placement(&self) -> Placement {
        self.placement
            .read()
            .map(|p| Placement {
                topics: p.topics.values().cloned().collect(),
                moves: p.moves.values().cloned().collect(),
            })
            .unwrap_or_default()
    }

    /// The region's named interests.
    pub fn interests(&self) -> BTreeMap<String, SubjectFilter> {
        self.interests.read().map(|i| i.clone()).unwrap_or_default()
    }

    /// The region's interests with their version and age.
    pub fn interest_set(&self) -> InterestSet {
        let Ok(interests) = self.interests.read() else {
            return InterestSet::default();
        };
        // Read under the lock the writer stores them under, so they belong together.
        InterestSet {
            version: self
                .interest_version
                .load(std::sync::atomic::Ordering::Acquire),
            since_ms: self
                .interests_since
                .load(std::sync::atomic::Ordering::Acquire),
            interests: interests.clone(),
        }
    }

    /// Replica moves under way.
    pub fn moves(&self) -> Vec<ReplicaMove> {
        self.placement
            .read()
            .map(|p| p.moves.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The move under way of a topic's group, if any.
    pub fn move_of(&self, topic: &str, group: u32) -> Option<ReplicaMove> {
        self.placement
            .read()
            .ok()?
            .moves
            .get(&(topic.to_string(), group))
            .cloned()
    }

    /// Whether the region is balancing its replicas.
    pub fn balancing(&self) -> bool {
        self.balancing.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Nodes draining.
    pub fn draining(&self) -> BTreeSet<NodeId> {
        self.draining.read().map(|d| d.clone()).unwrap_or_default()
    }

    /// Changes whenever a metadata command is applied.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

/// Places the Raft groups of `config` (its `groups` resolved) with `replication` replicas
/// each over `nodes`, spreading first replicas (and so initial leaders) round-robin, and
/// answers the replicas of every partition (those of its group).
pub fn place_replicas(nodes: &[NodeId], config: &TopicConfig) -> Vec<Vec<NodeId>> {
    let mut nodes = nodes.to_vec();
    nodes.sort_unstable();
    let n = nodes.len();
    (0..config.partitions)
        .map(|p| {
            let g = config.group_of(p) as usize;
            (0..config.replication as usize)
                .map(|r| nodes[(g + r) % n])
                .collect()
        })
        .collect()
}

/// The metadata [`Application`].
pub struct MetaApp {
    view: Arc<MetaView>,
    topics: BTreeMap<String, TopicState>,
    interests: BTreeMap<String, SubjectFilter>,
    /// When each interest was added (0: before times were kept).
    interest_added: BTreeMap<String, u64>,
    interest_version: u64,
    moves: BTreeMap<(String, u32), ReplicaMove>,
    draining: BTreeSet<NodeId>,
    balancing: bool,
}

impl Default for MetaApp {
    fn default() -> Self {
        Self {
            view: Arc::new(MetaView {
                placement: RwLock::new(Shared::default()),
                interests: RwLock::new(BTreeMap::new()),
                interest_version: std::sync::atomic::AtomicU64::new(0),
                interests_since: std::sync::atomic::AtomicU64::new(0),
                draining: RwLock::new(BTreeSet::new()),
                balancing: std::sync::atomic::AtomicBool::new(false),
                version: watch::channel(0).0,
            }),
            topics: BTreeMap::new(),
            interests: BTreeMap::new(),
            interest_added: BTreeMap::new(),
            interest_version: 0,
            moves: BTreeMap::new(),
            draining: BTreeSet::new(),
            balancing: false,
        }
    }
}

impl MetaApp {
    /// The shared read view.
    pub fn view(&self) -> Arc<MetaView> {
        self.view.clone()
    }

    fn create_topic(
        &mut self,
        config: TopicConfig,
        replicas: Vec<Vec<NodeId>>,
        writes: &mut sled::Batch,
    ) -> MetaReply {
        if let Err(e) = config.validate() {
            return MetaReply::Error(ApiError::new(ErrorCode::InvalidRequest, e.to_string()));
        }
        if replicas.len() != config.partitions as usize {
            return MetaReply::Error(ApiError::new(
                ErrorCode::InvalidRequest,
                "replica placement does not cover every partition",
            ));
        }
        if config.groups == 0
            || (0..config.partitions)
                .any(|p| replicas[p as usize] != replicas[config.group_of(p) as usize])
        {
            return MetaReply::Error(ApiError::new(
                ErrorCode::InvalidRequest,
                "replica placement does not give the partitions of a Raft group its replicas",
            ));
        }
        if let Some(existing) = self.topics.get(&config.name) {
            return if existing.config == config {
                MetaReply::Created
            } else {
                MetaReply::Error(ApiError::new(
                    ErrorCode::TopicExists,
                    format!("topic {:?} exists with another configuration", config.name),
                ))
            };
        }
        let state = TopicState {
            config,
            replicas,
            layout: KeyLayout::default(),
        };
        if let Err(reply) = stage_topic(&state, writes) {
            return reply;
        }
        self.topics.insert(state.config.name.clone(), state);
        MetaReply::Created
    }
}

/// Stages `state` to be written under its topic's key (and its layout under its own, once
/// it has one); an encoding failure is the reply.
fn stage_topic(state: &TopicState, writes: &mut sled::Batch) -> Result<(), MetaReply> {
    let failed = |e: ferry_proto::ProtoError| {
        MetaReply::Error(ApiError::new(ErrorCode::Internal, e.to_string()))
    };
    let mut key = vec![TOPIC_PREFIX];
    key.extend_from_slice(state.config.name.as_bytes());
    let value = codec::encode("topic", state).map_err(failed)?;
    if state.layout != KeyLayout::default() {
        let layout = codec::encode("key layout", &state.layout).map_err(failed)?;
        writes.insert(layout_key(&state.config.name), layout);
    }
    writes.insert(key, value);
    Ok(())
}

fn invalid(message: impl Into<String>) -> MetaReply {
    MetaReply::Error(ApiError::new(ErrorCode::InvalidRequest, message))
}

impl MetaApp {
    /// Records a replica move; refused (changing nothing) unless `from` holds the group's
    /// replica, `to` does not, and no other move of the group is under way.
    fn move_replica(&mut self, replica_move: ReplicaMove, writes: &mut sled::Batch) -> MetaReply {
        let ReplicaMove {
            topic,
            group,
            from,
            to,
            ..
        } = &replica_move;
        let Some(state) = self.topics.get(topic) else {
            return MetaReply::Error(ApiError::new(
                ErrorCode::UnknownTopic,
                format!("no topic named {topic:?}"),
            ));
        };
        let Some(replicas) =
            (*group < state.config.groups).then(|| &state.replicas[*group as usize])
        else {
            return invalid(format!(
                "topic {topic:?} has {} Raft groups; there is no group {group}",
                state.config.groups
            ));
        };
        if let Some(other) = self.moves.get(&(topic.clone(), *group)) {
            if *other == replica_move || (other.from, other.to) == (*from, *to) {
                return MetaReply::Done;
            }
            return invalid(format!(
                "group {group} of {topic:?} is already moving a replica from node {} to node {}",
                other.from, other.to
            ));
        }
        if !replicas.contains(from) {
            return invalid(format!(
                "node {from} holds no replica of group {group} of {topic:?} (its replicas: {replicas:?})"
            ));
        }
        if replicas.contains(to) {
            return invalid(format!(
                "node {to} already holds a replica of group {group} of {topic:?}"
            ));
        }
        match codec::encode("replica move", &replica_move) {
            Ok(v) => writes.insert(move_key(topic, *group), v),
            Err(e) => return MetaReply::Error(ApiError::new(ErrorCode::Internal, e.to_string())),
        }
        self.moves.insert((topic.clone(), *group), replica_move);
        MetaReply::Done
    }

    /// Ends a move: `to` replaces `from` in the placement of every partition of the group.
    fn finish_move(
        &mut self,
        topic: &str,
        group: u32,
        from: NodeId,
        to: NodeId,
        writes: &mut sled::Batch,
    ) -> MetaReply {
        let key = (topic.to_string(), group);
        match self.moves.get(&key) {
            Some(m) if (m.from, m.to) == (from, to) => {}
            _ => {
                return invalid(format!(
                "no move of group {group} of {topic:?} from node {from} to node {to} is under way"
            ))
            }
        }
        let Some(state) = self.topics.get_mut(topic) else {
            return invalid(format!("no topic named {topic:?}"));
        };
        // The node that joins goes last: the first replica is the one that formed the
        // group, and a node that starts the group empty must never be taken for it.
        let mut next = state.clone();
        for p in next.partitions_of(group).collect::<Vec<_>>() {
            let replicas = &mut next.replicas[p as usize];
            replicas.retain(|r| *r != from);
            replicas.push(to);
        }
        if let Err(reply) = stage_topic(&next, writes) {
            return reply;
        }
        *state = next;
        writes.remove(move_key(topic, group));
        self.moves.remove(&key);
        MetaReply::Done
    }

    fn set_replica_order(
        &mut self,
        topic: &str,
        group: u32,
        replicas: Vec<NodeId>,
        writes: &mut sled::Batch,
    ) -> MetaReply {
        let Some(state) = self.topics.get_mut(topic) else {
            return invalid(format!("no topic named {topic:?}"));
        };
        if group >= state.config.groups {
            return invalid(format!("topic {topic:?} has no group {group}"));
        }
        let mut now = state.replicas[group as usize].clone();
        let mut asked = replicas.clone();
        now.sort_unstable();
        asked.sort_unstable();
        if now != asked {
            return invalid(format!(
                "group {group} of {topic:?} has replicas {now:?}, not {asked:?}"
            ));
        }
        let mut next = state.clone();
        for p in next.partitions_of(group).collect::<Vec<_>>() {
            next.replicas[p as usize] = replicas.clone();
        }
        if let Err(reply) = stage_topic(&next, writes) {
            return reply;
        }
        *state = next;
        MetaReply::Done
    }

    /// Grows `topic` to `partitions` partitions (see [`KeyLayout::plan_growth`] for what
    /// is refused): each child gets its parent's group's replicas.
    fn add_partitions(
        &mut self,
        topic: &str,
        partitions: u32,
        writes: &mut sled::Batch,
    ) -> MetaReply {
        let Some(state) = self.topics.get_mut(topic) else {
            return MetaReply::Error(ApiError::new(
                ErrorCode::UnknownTopic,
                format!("no topic named {topic:?}"),
            ));
        };
        let from = state.config.partitions;
        if from == partitions {
            // The same request again (its seals may be on their way).
            return MetaReply::Done;
        }
        let splits = match state.layout.plan_growth(topic, from, partitions) {
            Ok(splits) => splits,
            Err(e) => return invalid(e.to_string()),
        };
        let mut next = state.clone();
        if next.layout.initial == 0 {
            next.layout.initial = from;
        }
        next.config.partitions = partitions;
        for split in &splits {
            let group = next.group_of(split.child) as usize;
            next.replicas.push(next.replicas[group].clone());
        }
        next.layout.splits.extend(splits);
        if let Err(reply) = stage_topic(&next, writes) {
            return reply;
        }
        *state = next;
        MetaReply::Done
    }

    /// Records the seal of `parent`'s splits into `children` (those without one yet; one
    /// with this very seal is a repeat).
    fn seal_split(
        &mut self,
        topic: &str,
        parent: u32,
        children: &[u32],
        offset: u64,
        writes: &mut sled::Batch,
    ) -> MetaReply {
        let Some(state) = self.topics.get_mut(topic) else {
            return invalid(format!("no topic named {topic:?}"));
        };
        let mut next = state.clone();
        let mut sealed = false;
        for split in next
            .layout
            .splits
            .iter_mut()
            .filter(|s| s.parent == parent && children.contains(&s.child))
        {
            match split.seal {
                None => {
                    split.seal = Some(offset);
                    sealed = true;
                }
                // Sent again (a new leader, a retry): the group's log holds one seal.
                Some(at) if at == offset => sealed = true,
                Some(_) => {}
            }
        }
        if !sealed {
            return invalid(format!(
                "partition {parent} of {topic:?} has no split into {children:?} waiting for a seal"
            ));
        }
        if let Err(reply) = stage_topic(&next, writes) {
            return reply;
        }
        *state = next;
        MetaReply::Done
    }

    fn set_draining(
        &mut self,
        node: NodeId,
        draining: bool,
        writes: &mut sled::Batch,
    ) -> MetaReply {
        if draining {
            writes.insert(draining_key(node), &[]);
            self.draining.insert(node);
        } else {
            writes.remove(draining_key(node));
            self.draining.remove(&node);
        }
        MetaReply::Done
    }
}

fn interest_key(name: &str) -> Vec<u8> {
    let mut key = vec![INTEREST_PREFIX];
    key.extend_from_slice(name.as_bytes());
    key
}

fn interest_added_key(name: &str) -> Vec<u8> {
    let mut key = vec![INTEREST_ADDED_PREFIX];
    key.extend_from_slice(name.as_bytes());
    key
}

fn be_u64(what: &str, bytes: &[u8]) -> Result<u64, StoreError> {
    Ok(u64::from_be_bytes(bytes.try_into().map_err(|_| {
        StoreError::io("metadata", format!("{what} is damaged"))
    })?))
}

impl MetaApp {
    /// Records that the entry at `index` changed the interests.
    fn interests_changed(&mut self, index: u64, writes: &mut sled::Batch) {
        self.interest_version = index;
        writes.insert(INTEREST_VERSION_KEY, &index.to_be_bytes());
    }

    fn set_interest(
        &mut self,
        index: u64,
        name: String,
        subjects: SubjectFilter,
        at_ms: u64,
        writes: &mut sled::Batch,
    ) -> MetaReply {
        if name.is_empty() || name.len() > 128 {
            return MetaReply::Error(ApiError::new(
                ErrorCode::InvalidRequest,
                "interest name must be 1-128 bytes",
            ));
        }
        writes.insert(interest_key(&name), subjects.as_str().as_bytes());
        // The same filter again keeps its age (the interest continues); a new one starts now.
        if self.interests.get(&name) != Some(&subjects) {
            writes.insert(interest_added_key(&name), &at_ms.to_be_bytes());
            self.interest_added.insert(name.clone(), at_ms);
        }
        self.interests.insert(name, subjects);
        self.interests_changed(index, writes);
        MetaReply::InterestSet { version: index }
    }

    fn remove_interest(&mut self, index: u64, name: String, writes: &mut sled::Batch) -> MetaReply {
        writes.remove(interest_key(&name));
        writes.remove(interest_added_key(&name));
        self.interests.remove(&name);
        self.interest_added.remove(&name);
        self.interests_changed(index, writes);
        MetaReply::InterestSet { version: index }
    }
}

impl Application for MetaApp {
    fn load(&mut self, tree: &sled::Tree) -> Result<(), StoreError> {
        self.topics.clear();
        for item in tree.scan_prefix([TOPIC_PREFIX]) {
            let (_, value) = item.map_err(|e| StoreError::io("metadata scan", e))?;
            let state: TopicState = codec::decode("topic", &value)?;
            self.topics.insert(state.config.name.clone(), state);
        }
        for item in tree.scan_prefix([LAYOUT_PREFIX]) {
            let (key, value) = item.map_err(|e| StoreError::io("metadata scan", e))?;
            let name = String::from_utf8_lossy(&key[1..]).into_owned();
            let layout: KeyLayout = codec::decode("key layout", &value)?;
            if let Some(state) = self.topics.get_mut(&name) {
                state.layout = layout;
            }
        }
        self.interests.clear();
        for item in tree.scan_prefix([INTEREST_PREFIX]) {
            let (key, value) = item.map_err(|e| StoreError::io("metadata scan", e))?;
            let name = String::from_utf8_lossy(&key[1..]).into_owned();
            let filter = String::from_utf8(value.to_vec())
                .ok()
                .and_then(|f| SubjectFilter::new(f).ok())
                .ok_or_else(|| {
                    StoreError::io("metadata", format!("interest {name:?} is damaged"))
                })?;
            self.interests.insert(name, filter);
        }
        self.interest_added.clear();
        for item in tree.scan_prefix([INTEREST_ADDED_PREFIX]) {
            let (key, value) = item.map_err(|e| StoreError::io("metadata scan", e))?;
            let name = String::from_utf8_lossy(&key[1..]).into_owned();
            let at = be_u64(&format!("when interest {name:?} was added"), &value)?;
            self.interest_added.insert(name, at);
        }
        self.moves.clear();
        for item in tree.scan_prefix([MOVE_PREFIX]) {
            let (_, value) = item.map_err(|e| StoreError::io("metadata scan", e))?;
            let m: ReplicaMove = codec::decode("replica move", &value)?;
            self.moves.insert((m.topic.clone(), m.group), m);
        }
        self.draining.clear();
        for item in tree.scan_prefix([DRAINING_PREFIX]) {
            let (key, _) = item.map_err(|e| StoreError::io("metadata scan", e))?;
            self.draining
                .insert(be_u64("a draining node's id", &key[1..])?);
        }
        self.balancing = tree
            .contains_key(BALANCING_KEY)
            .map_err(|e| StoreError::io("metadata read", e))?;
        self.interest_version = match tree
            .get(INTEREST_VERSION_KEY)
            .map_err(|e| StoreError::io("metadata read", e))?
        {
            None => 0,
            Some(v) => be_u64("the interest version", &v)?,
        };
        self.after_apply(tree);
        Ok(())
    }

    fn apply(
        &mut self,
        index: u64,
        command: &[u8],
        _tree: &sled::Tree,
        writes: &mut sled::Batch,
    ) -> Bytes {
        let reply = match decode::<MetaCommand>("metadata command", command) {
            Ok(MetaCommand::CreateTopic { config, replicas }) => {
                self.create_topic(config, replicas, writes)
            }
            Ok(MetaCommand::SetInterest { name, subjects }) => {
                self.set_interest(index, name, subjects, 0, writes)
            }
            Ok(MetaCommand::SetInterestAt {
                name,
                subjects,
                at_ms,
            }) => self.set_interest(index, name, subjects, at_ms, writes),
            Ok(MetaCommand::RemoveInterest { name }) => self.remove_interest(index, name, writes),
            Ok(MetaCommand::MoveReplica {
                topic,
                group,
                from,
                to,
                at_ms,
            }) => self.move_replica(
                ReplicaMove {
                    topic,
                    group,
                    from,
                    to,
                    since_ms: at_ms,
                },
                writes,
            ),
            Ok(MetaCommand::FinishMove {
                topic,
                group,
                from,
                to,
            }) => self.finish_move(&topic, group, from, to, writes),
            Ok(MetaCommand::CancelMove {
                topic,
                group,
                from,
                to,
            }) => {
                let key = (topic.clone(), group);
                if self
                    .moves
                    .get(&key)
                    .is_some_and(|m| (m.from, m.to) == (from, to))
                {
                    self.moves.remove(&key);
                    writes.remove(move_key(&topic, group));
                    MetaReply::Done
                } else {
                    invalid(format!(
                        "no move of group {group} of {topic:?} from node {from} to node {to} is under way"
                    ))
                }
            }
            Ok(MetaCommand::SetNodeDraining { node, draining }) => {
                self.set_draining(node, draining, writes)
            }
            Ok(MetaCommand::SetReplicaOrder {
                topic,
                group,
                replicas,
            }) => self.set_replica_order(&topic, group, replicas, writes),
            Ok(MetaCommand::SetBalancing { on }) => {
                if on {
                    writes.insert(BALANCING_KEY, &[]);
                } else {
                    writes.remove(BALANCING_KEY);
                }
                self.balancing = on;
                MetaReply::Done
            }
            Ok(MetaCommand::AddPartitions { topic, partitions }) => {
                self.add_partitions(&topic, partitions, writes)
            }
            Ok(MetaCommand::SealSplit {
                topic,
                parent,
                children,
                offset,
            }) => self.seal_split(&topic, parent, &children, offset, writes),
            Err(e) => MetaReply::Error(ApiError::new(ErrorCode::InvalidRequest, e.to_string())),
        };
        encode("metadata reply", &reply).unwrap_or_default()
    }

    fn after_apply(&mut self, _tree: &sled::Tree) {
        let mut changed = false;
        // The topics and the moves under one lock (see `Placement`).
        if let Ok(mut placement) = self.view.placement.write() {
            let same = placement.topics.len() == self.topics.len()
                && placement
                    .topics
                    .iter()
                    .zip(&self.topics)
                    .all(|((name, shared), (n, state))| name == n && **shared == *state);
            if !same {
                placement.topics = self
                    .topics
                    .iter()
                    .map(|(name, state)| (name.clone(), Arc::new(state.clone())))
                    .collect();
                changed = true;
            }
            if placement.moves != self.moves {
                placement.moves = self.moves.clone();
                changed = true;
            }
        }
        if let Ok(mut interests) = self.view.interests.write() {
            let version = &self.view.interest_version;
            if *interests != self.interests
                || version.load(std::sync::atomic::Ordering::Acquire) != self.interest_version
            {
                *interests = self.interests.clone();
                // Stored under the interests' lock, so a reader sees them together.
                version.store(self.interest_version, std::sync::atomic::Ordering::Release);
                let since = self
                    .interests
                    .keys()
                    .map(|name| self.interest_added.get(name).copied().unwrap_or(0))
                    .min()
                    .unwrap_or(0);
                self.view
                    .interests_since
                    .store(since, std::sync::atomic::Ordering::Release);
                changed = true;
            }
        }
        if let Ok(mut draining) = self.view.draining.write() {
            if *draining != self.draining {
                *draining = self.draining.clone();
                changed = true;
            }
        }
        let balancing = &self.view.balancing;
        if balancing.swap(self.balancing, std::sync::atomic::Ordering::AcqRel) != self.balancing {
            changed = true;
        }
        if changed {
            self.view.version.send_modify(|v| *v += 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(app: &mut MetaApp, tree: &sled::Tree, index: u64, command: MetaCommand) -> MetaReply {
        let mut writes = sled::Batch::default();
        let bytes = encode("command", &command).unwrap();
        let reply = app.apply(index, &bytes, tree, &mut writes);
        tree.apply_batch(writes).unwrap();
        app.after_apply(tree);
        decode("reply", &reply).unwrap()
    }

    #[test]
    fn moves_are_checked_recorded_finished_and_survive_a_reload() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("meta").unwrap();
        let mut app = MetaApp::default();
        let mut config = TopicConfig::new("t", 2);
        config.groups = 2;
        let replicas = vec![vec![1, 2, 3], vec![2, 3, 1]];
        let create = MetaCommand::CreateTopic { config, replicas };
        assert!(matches!(
            apply(&mut app, &tree, 1, create),
            MetaReply::Created
        ));
        let mv = |group, from, to| MetaCommand::MoveReplica {
            topic: "t".into(),
            group,
            from,
            to,
            at_ms: 5,
        };
        // Refused, changing nothing: a source without the replica, a target with one, a
        // group that does not exist, a topic that does not exist.
        for (command, says) in [
            (mv(0, 4, 5), "node 4 holds no replica"),
            (mv(0, 1, 2), "node 2 already holds a replica"),
            (mv(7, 1, 4), "there is no group 7"),
        ] {
            match apply(&mut app, &tree, 2, command) {
                MetaReply::Error(e) => assert!(e.message.contains(says), "{e:?}"),
                other => panic!("{other:?}"),
            }
        }
        assert!(app.view().moves().is_empty());
        assert!(matches!(
            apply(&mut app, &tree, 3, mv(0, 1, 4)),
            MetaReply::Done
        ));
        // Asked again: the same move; another one for the group is refused.
        assert!(matches!(
            apply(&mut app, &tree, 4, mv(0, 1, 4)),
            MetaReply::Done
        ));
        assert!(matches!(
            apply(&mut app, &tree, 5, mv(0, 2, 5)),
            MetaReply::Error(_)
        ));
        assert_eq!(
            app.view().move_of("t", 0).map(|m| (m.from, m.to)),
            Some((1, 4))
        );
        // The record survives a reload from the tree.
        let mut reloaded = MetaApp::default();
        reloaded.load(&tree).unwrap();
        assert_eq!(reloaded.view().moves().len(), 1);
        let finish = |from, to| MetaCommand::FinishMove {
            topic: "t".into(),
            group: 0,
            from,
            to,
        };
        assert!(matches!(
            apply(&mut app, &tree, 6, finish(1, 5)),
            MetaReply::Error(_)
        ));
        assert!(matches!(
            apply(&mut app, &tree, 7, finish(1, 4)),
            MetaReply::Done
        ));
        // The joining node goes last; the other group is untouched.
        let t = app.view().topic("t").unwrap();
        assert_eq!(t.replicas, vec![vec![2, 3, 4], vec![2, 3, 1]]);
        assert!(app.view().moves().is_empty());
        let mut reloaded = MetaApp::default();
        reloaded.load(&tree).unwrap();
        assert_eq!(
            reloaded.view().topic("t").unwrap().replicas[0],
            vec![2, 3, 4]
        );
        // A reorder must keep the set.
        let order = |replicas| MetaCommand::SetReplicaOrder {
            topic: "t".into(),
            group: 1,
            replicas,
        };
        assert!(matches!(
            apply(&mut app, &tree, 8, order(vec![1, 2, 4])),
            MetaReply::Error(_)
        ));
        assert!(matches!(
            apply(&mut app, &tree, 9, order(vec![1, 2, 3])),
            MetaReply::Done
        ));
        assert_eq!(app.view().topic("t").unwrap().replicas[1], vec![1, 2, 3]);
    }

    #[test]
    fn a_moves_target_hosts_the_group_in_every_placement_read_during_and_after_it() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("meta").unwrap();
        let mut app = MetaApp::default();
        let mut config = TopicConfig::new("t", 1);
        config.groups = 1;
        let create = MetaCommand::CreateTopic {
            config,
            replicas: vec![vec![1, 2, 3]],
        };
        assert!(matches!(
            apply(&mut app, &tree, 1, create),
            MetaReply::Created
        ));
        let hosts = |p: &Placement, node| {
            p.groups_on(node)
                .iter()
                .map(|(t, g, moving_in)| (t.config.name.clone(), *g, *moving_in))
                .collect::<Vec<_>>()
        };
        let before = app.view().placement();
        assert!(hosts(&before, 4).is_empty());
        let start = MetaCommand::MoveReplica {
            topic: "t".into(),
            group: 0,
            from: 1,
            to: 4,
            at_ms: 5,
        };
        assert!(matches!(apply(&mut app, &tree, 2, start), MetaReply::Done));
        let during = app.view().placement();
        let finish = MetaCommand::FinishMove {
            topic: "t".into(),
            group: 0,
            from: 1,
            to: 4,
        };
        assert!(matches!(apply(&mut app, &tree, 3, finish), MetaReply::Done));
        let after = app.view().placement();
        // Under way the target hosts it moving in, and the source still hosts it; done, the
        // target hosts it as a replica and the source no longer does. A placement read before
        // the finish keeps what it read: a reconcile pass works on one of these, never on
        // the topics of one and the moves of another.
        assert_eq!(hosts(&during, 4), vec![("t".to_string(), 0, true)]);
        assert_eq!(hosts(&during, 1), vec![("t".to_string(), 0, false)]);
        assert_eq!(hosts(&after, 4), vec![("t".to_string(), 0, false)]);
        assert!(hosts(&after, 1).is_empty());
        assert_eq!(during.moves.len(), 1);
        assert!(after.moves.is_empty());
    }

    #[test]
    fn partitions_are_added_by_splits_sealed_once_and_kept_through_a_reload() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("meta").unwrap();
        let mut app = MetaApp::default();
        let mut config = TopicConfig::new("t", 4);
        config.groups = 3;
        let replicas = place_replicas(&[1, 2, 3], &config);
        assert!(matches!(
            apply(
                &mut app,
                &tree,
                1,
                MetaCommand::CreateTopic { config, replicas }
            ),
            MetaReply::Created
        ));
        let grow = |partitions| MetaCommand::AddPartitions {
            topic: "t".into(),
            partitions,
        };
        let seal = |parent: u32, offset| MetaCommand::SealSplit {
            topic: "t".into(),
            parent,
            children: vec![parent + 4],
            offset,
        };
        let refused = |r: MetaReply| matches!(r, MetaReply::Error(_));
        // More than doubling, fewer, or a topic that does not exist: refused.
        assert!(refused(apply(&mut app, &tree, 2, grow(9))));
        assert!(refused(apply(&mut app, &tree, 3, grow(3))));
        assert!(refused(apply(
            &mut app,
            &tree,
            4,
            MetaCommand::AddPartitions {
                topic: "u".into(),
                partitions: 5
            }
        )));
        assert_eq!(app.view().topic("t").unwrap().config.partitions, 4);
        let mut forwarded = TopicConfig::new("f", 2);
        forwarded.groups = 2;
        forwarded.regions = ferry_proto::RegionPolicy::ByInterest;
        let replicas = place_replicas(&[1, 2, 3], &forwarded);
        apply(
            &mut app,
            &tree,
            4,
            MetaCommand::CreateTopic {
                config: forwarded,
                replicas,
            },
        );
        // A topic forwarded between regions grows too (each region routes what it forwards
        // by the layout the destination has).
        let grown = apply(
            &mut app,
            &tree,
            4,
            MetaCommand::AddPartitions {
                topic: "f".into(),
                partitions: 3,
            },
        );
        assert!(matches!(grown, MetaReply::Done), "{grown:?}");
        // Other regions route into it by the new layout once its split is sealed.
        assert_eq!(app.view().topic("f").unwrap().routing_layout(), (2, 2));
        let sealed = apply(
            &mut app,
            &tree,
            4,
            MetaCommand::SealSplit {
                topic: "f".into(),
                parent: 0,
                children: vec![2],
                offset: 0,
            },
        );
        assert!(matches!(sealed, MetaReply::Done), "{sealed:?}");
        assert_eq!(app.view().topic("f").unwrap().routing_layout(), (2, 3));
        assert!(matches!(
            apply(&mut app, &tree, 5, grow(6)),
            MetaReply::Done
        ));
        let t = app.view().topic("t").unwrap();
        assert_eq!(t.config.partitions, 6);
        assert_eq!(t.layout.initial, 4);
        // Children join their parents' groups: 4 that of 0, 5 that of 1.
        assert_eq!((t.group_of(4), t.group_of(5)), (0, 1));
        assert_eq!(t.replicas[4], t.replicas[0]);
        assert_eq!(t.replicas[5], t.replicas[1]);
        assert_eq!(t.partitions_of(0).collect::<Vec<_>>(), vec![0, 3, 4]);
        // The same request again is accepted; another growth waits for the seals.
        assert!(matches!(
            apply(&mut app, &tree, 6, grow(6)),
            MetaReply::Done
        ));
        assert!(refused(apply(&mut app, &tree, 7, grow(8))));
        assert!(refused(apply(&mut app, &tree, 8, seal(2, 5))));
        assert!(matches!(
            apply(&mut app, &tree, 9, seal(0, 10)),
            MetaReply::Done
        ));
        assert!(matches!(
            apply(&mut app, &tree, 10, seal(0, 10)),
            MetaReply::Done
        ));
        assert!(refused(apply(&mut app, &tree, 11, seal(0, 11))));
        assert!(refused(apply(&mut app, &tree, 12, grow(8))));
        assert!(matches!(
            apply(&mut app, &tree, 13, seal(1, 0)),
            MetaReply::Done
        ));
        let mut reloaded = MetaApp::default();
        reloaded.load(&tree).unwrap();
        let t = reloaded.view().topic("t").unwrap();
        assert_eq!(t.config.partitions, 6);
        let seals: Vec<_> = t
            .layout
            .splits
            .iter()
            .map(|s| (s.parent, s.child, s.seal))
            .collect();
        assert_eq!(seals, vec![(0, 4, Some(10)), (1, 5, Some(0))]);
        assert!(matches!(
            apply(&mut reloaded, &tree, 14, grow(8)),
            MetaReply::Done
        ));
        for (index, parent) in [(15, 2), (16, 3)] {
            assert!(matches!(
                apply(&mut reloaded, &tree, index, seal(parent, 20)),
                MetaReply::Done
            ));
        }
        assert!(matches!(
            apply(&mut reloaded, &tree, 17, grow(16)),
            MetaReply::Done
        ));
        // A seal of 0's first split sent again late (a leader's stale view) leaves its split
        // into 8 waiting for its own.
        assert!(matches!(
            apply(&mut reloaded, &tree, 18, seal(0, 10)),
            MetaReply::Done
        ));
        let t = reloaded.view().topic("t").unwrap();
        assert_eq!(t.layout.split_of(8).unwrap().seal, None);
        // The same count again once sealed: nothing to do.
        assert!(matches!(
            apply(&mut reloaded, &tree, 19, grow(16)),
            MetaReply::Done
        ));
    }

    #[test]
    fn placement_spreads_first_replicas() {
        let topic = |partitions, groups, replication| {
            let mut t = TopicConfig::new("t", partitions);
            t.groups = groups;
            t.replication = replication;
            t
        };
        let placed = place_replicas(&[3, 1, 2], &topic(4, 4, 3));
        assert_eq!(
            placed,
            vec![vec![1, 2, 3], vec![2, 3, 1], vec![3, 1, 2], vec![1, 2, 3]]
        );
        let placed = place_replicas(&[1, 2, 3, 4], &topic(2, 2, 1));
        assert_eq!(placed, vec![vec![1], vec![2]]);
        // The partitions of a group share its replicas.
        let placed = place_replicas(&[1, 2, 3], &topic(5, 2, 3));
        assert_eq!(
            placed,
            vec![
                vec![1, 2, 3],
                vec![2, 3, 1],
                vec![1, 2, 3],
                vec![2, 3, 1],
                vec![1, 2, 3]
            ]
        );
    }
}
