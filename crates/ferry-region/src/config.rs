//! A node's configuration, its defaults and its validation (loading TOML and environment
//! overrides is the binary's job). Validation errors name the key.

use std::net::SocketAddr;
use std::path::PathBuf;

use ferry_proto::{Limits, NodeId};
use serde::{Deserialize, Serialize};

use crate::RegionError;

/// One member of the region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its node id.
    pub id: NodeId,
    /// Its QUIC address (peers and clients share the port; ALPN tells them apart).
    pub addr: SocketAddr,
}

pub use ferry_net::tls::TlsPaths;

/// Raft timing and log compaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftTuning {
    /// Leader heartbeat, milliseconds.
    pub heartbeat_ms: u64,
    /// Election timeout lower bound, milliseconds.
    pub election_min_ms: u64,
    /// Election timeout upper bound, milliseconds.
    pub election_max_ms: u64,
    /// Build a snapshot (and purge the log) after this many entries.
    pub snapshot_after_entries: u64,
    /// Entries kept in the log behind a snapshot, for slow followers.
    pub keep_after_snapshot: u64,
    /// While a live replica catches up (a learner a move added, a follower back from a
    /// restart) and lags further than `keep_after_snapshot` entries, the leader defers its
    /// snapshots, and so keeps the log the replica needs, until the log since the last
    /// snapshot holds this many entries (0: never defer). openraft asks again every
    /// `snapshot_after_entries` entries, so the log may pass this by up to that many.
    pub max_log_while_catching_up: u64,
    /// Bytes of snapshot data per peer message when a snapshot is sent to a follower.
    pub snapshot_chunk_bytes: usize,
    /// A partition group that proposed nothing for this long, milliseconds, and whose
    /// followers hold its whole log, turns its heartbeats and election timers off until the
    /// next write (0: never).
    pub quiesce_after_ms: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        Self {
            heartbeat_ms: 150,
            election_min_ms: 800,
            election_max_ms: 1600,
            snapshot_after_entries: 4_096,
            keep_after_snapshot: 1_000,
            max_log_while_catching_up: 32_768,
            // 8 MiB sent a 2 GB snapshot no faster than 1 MiB here and held about 45 MiB
            // more on the sender while it ran.
            snapshot_chunk_bytes: 1024 * 1024,
            quiesce_after_ms: 2_000,
        }
    }
}

/// Gossip with the other regions and forwarding to them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    /// Addresses of nodes in other regions to start gossip from (the region's own `peers`
    /// are seeds too).
    pub remote_seeds: Vec<SocketAddr>,
    /// How often a node gossips, milliseconds.
    pub gossip_interval_ms: u64,
    /// A node that stops answering leaves routing within about this long, milliseconds.
    pub dead_after_ms: u64,
    /// Batches in flight per (partition, destination region).
    pub forward_window: usize,
    /// Events per forwarded batch, at most.
    pub forward_batch_events: usize,
    /// Bytes of events per forwarded batch, at most.
    pub forward_batch_bytes: usize,
    /// First resend of an unacknowledged batch, milliseconds (doubling).
    pub forward_retry_ms: u64,
    /// Longest wait between resends, milliseconds.
    pub forward_max_backoff_ms: u64,
    /// How far apart two regions' clocks may be, milliseconds. An event is judged unwanted
    /// by a region only once this node holds that region's interest as vouched for at least
    /// this long after the event's append time; until then the forwarder waits.
    pub interest_clock_skew_ms: u64,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            remote_seeds: Vec::new(),
            gossip_interval_ms: 200,
            dead_after_ms: 3_000,
            forward_window: 2,
            forward_batch_events: 512,
            forward_batch_bytes: 256 * 1024,
            forward_retry_ms: 500,
            forward_max_backoff_ms: 10_000,
            interest_clock_skew_ms: 250,
        }
    }
}

/// One slow or faulty link, for chaos runs (this kernel has no `tc netem`): this node's
/// calls to `addr` (gossip, Raft votes, forwarding) are shaped as [`ferry_net::LinkShape`]
/// says; its Raft streams to `addr` are delayed only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowLink {
    /// The node at the other end.
    pub addr: SocketAddr,
    /// One-way delay, milliseconds.
    pub delay_ms: u64,
    /// Extra one-way delay, uniform up to this, milliseconds.
    #[serde(default)]
    pub jitter_ms: u64,
    /// Chance in percent that a direction of a call pays a retransmission's extra delay (a
    /// QUIC loss is retransmitted, so this delays; it never loses anything).
    #[serde(default)]
    pub loss_percent: u32,
    /// Chance in percent that a call's request is lost (the peer never sees it; the call
    /// times out).
    #[serde(default)]
    pub drop_request_percent: u32,
    /// Chance in percent that a call's reply is lost after the peer handled the request
    /// (the call times out).
    #[serde(default)]
    pub drop_response_percent: u32,
    /// Chance in percent that a call's request is delivered twice (the copy after its own
    /// delay, so possibly after later calls).
    #[serde(default)]
    pub duplicate_percent: u32,
    /// Seed of the generator the node's faults draw from, so a run can be replayed. One
    /// generator serves every link of the node: links that give a seed must give the same.
    #[serde(default)]
    pub seed: Option<u64>,
}

impl SlowLink {
    /// The shape this link gives calls.
    pub fn shape(&self) -> ferry_net::LinkShape {
        let chance = |percent: u32| f64::from(percent) / 100.0;
        ferry_net::LinkShape {
            delay: std::time::Duration::from_millis(self.delay_ms),
            jitter: std::time::Duration::from_millis(self.jitter_ms),
            loss: chance(self.loss_percent),
            drop_request: chance(self.drop_request_percent),
            drop_response: chance(self.drop_response_percent),
            duplicate: chance(self.duplicate_percent),
        }
    }
}

/// Fault injection, for tests and chaos runs only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// Links this node's calls make slow and lossy.
    pub slow_links: Vec<SlowLink>,
}

/// Everything a `ferry node` needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id; unique in the whole mesh, and named by its certificate.
    pub id: NodeId,
    /// The region this node belongs to (1-64 of `[A-Za-z0-9_-]`).
    #[serde(default = "default_region")]
    pub region: String,
    /// Gossip and cross-region forwarding.
    #[serde(default)]
    pub mesh: MeshConfig,
    /// Fault injection (chaos runs only).
    #[serde(default)]
    pub faults: FaultConfig,
    /// Where this node keeps its data.
    pub data_dir: PathBuf,
    /// The nodes that form the region on its first start, this one included if it is one
    /// of them (a static list; the region's membership lives in its metadata group after
    /// that, and grows by nodes that join).
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// This node's QUIC address, for a node not listed in `peers` (one that joins a running
    /// region).
    #[serde(default)]
    pub addr: Option<SocketAddr>,
    /// Addresses of nodes of the running region a node not in `peers` asks to let it join
    /// (any of them; the region's metadata leader adds it).
    #[serde(default)]
    pub seeds: Vec<SocketAddr>,
    /// How long a joining node keeps asking its seeds before it gives up, milliseconds.
    #[serde(default = "default_join_timeout_ms")]
    pub join_timeout_ms: u64,
    /// Replica moves (to or from it) a node takes part in at once.
    #[serde(default = "default_max_moves_per_node")]
    pub max_moves_per_node: usize,
    /// A group's leader hands leadership to the group's preferred leader (the first replica
    /// of its placement) once that node has answered for this long, milliseconds: so
    /// leaderships come back to a node that restarted (0: never).
    #[serde(default = "default_leader_rebalance_after_ms")]
    pub leader_rebalance_after_ms: u64,
    /// How often a node samples the write load (events appended) of the groups it hosts,
    /// milliseconds; rates are smoothed over about six samples.
    #[serde(default = "default_load_sample_ms")]
    pub load_sample_ms: u64,
    /// A rebalance evens out measured load, beyond evening out counts, only while the most
    /// loaded node carries more than the least by this percentage of the mean (0: by count
    /// only).
    #[serde(default = "default_balance_load_spread_percent")]
    pub balance_load_spread_percent: u32,
    /// Certificates.
    pub tls: TlsPaths,
    /// Size limits.
    #[serde(default)]
    pub limits: Limits,
    /// Raft tuning.
    #[serde(default)]
    pub raft: RaftTuning,
    /// sled page cache, bytes.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    /// Memory for blocks of the partitions' domain-stream indexes read lately, bytes.
    #[serde(default = "default_cache_bytes")]
    pub stream_index_cache_bytes: u64,
    /// A tiered topic's stream index runs of at least this many bytes go to the object
    /// store (its `[tier]`); each run's file then keeps only each stream's last append.
    #[serde(default = "default_stream_index_upload_bytes")]
    pub stream_index_upload_bytes: u64,
    /// Size at which the write-ahead log starts a new segment file, bytes.
    #[serde(default = "default_wal_segment_bytes")]
    pub wal_segment_bytes: u64,
    /// Most client connections served at once.
    #[serde(default = "default_max_client_connections")]
    pub max_client_connections: usize,
    /// How often retention runs, milliseconds.
    #[serde(default = "default_retention_interval_ms")]
    pub retention_interval_ms: u64,
    /// Consumer group session timeout, milliseconds.
    #[serde(default = "default_session_timeout_ms")]
    pub group_session_timeout_ms: u64,
    /// A producer that appended nothing to a partition for this long is forgotten there
    /// (its dedupe state goes; its next batch starts again at sequence 0), milliseconds.
    /// At least 1000; 24 hours by default.
    #[serde(default = "default_producer_expiry_ms")]
    pub producer_expiry_ms: u64,
    /// Address of the HTTP endpoint for `/metrics` and `/healthz` (none if unset).
    #[serde(default)]
    pub http: Option<SocketAddr>,
    /// The region's object store for tiered topics (`retention.local_max_bytes`): none, and
    /// such topics cannot be created.
    #[serde(default)]
    pub tier: Option<ferry_store::RemoteOptions>,
}

fn default_join_timeout_ms() -> u64 {
    120_000
}
fn default_max_moves_per_node() -> usize {
    2
}
fn default_leader_rebalance_after_ms() -> u64 {
    10_000
}
fn default_load_sample_ms() -> u64 {
    10_000
}
fn default_balance_load_spread_percent() -> u32 {
    25
}
fn default_region() -> String {
    "local".into()
}
fn default_stream_index_upload_bytes() -> u64 {
    16 * 1024 * 1024
}
fn default_cache_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_wal_segment_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_max_client_connections() -> usize {
    10_000
}
fn default_retention_interval_ms() -> u64 {
    5_000
}
fn default_session_timeout_ms() -> u64 {
    10_000
}
fn default_producer_expiry_ms() -> u64 {
    24 * 60 * 60 * 1000
}

impl NodeConfig {
    /// This node's own address.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.peers
            .iter()
            .find(|p| p.id == self.id)
            .map(|p| p.addr)
            .or(self.addr)
    }

    /// Whether this node joins a running region rather than forming it (it is not in
    /// `peers`).
    pub fn joins(&self) -> bool {
        !self.peers.iter().any(|p| p.id == self.id)
    }

    /// Checks the configuration; the error names the key.
    pub fn validate(&self) -> Result<(), RegionError> {
        let bad = |key: &'static str, reason: String| Err(RegionError::Config { key, reason });
        if self.listen_addr().is_none() {
            return bad(
                "addr",
                format!(
                    "node id {} is not listed in peers and no addr is set: a node that joins a \
                     running region names its own address in addr (and the region's nodes in \
                     seeds, or is added with `ferry ctl node add`)",
                    self.id
                ),
            );
        }
        if let (Some(own), Some(listed)) = (
            self.addr,
            self.peers.iter().find(|p| p.id == self.id).map(|p| p.addr),
        ) {
            if own != listed {
                return bad(
                    "addr",
                    format!("addr {own} differs from this node's address in peers ({listed})"),
                );
            }
        }
        if self.load_sample_ms < 100 {
            return bad(
                "load_sample_ms",
                format!("{} is below 100", self.load_sample_ms),
            );
        }
        if self.balance_load_spread_percent > 1_000 {
            return bad(
                "balance_load_spread_percent",
                format!(
                    "{} is above 1000; use 0 to balance by count only",
                    self.balance_load_spread_percent
                ),
            );
        }
        if self.max_moves_per_node == 0 {
            return bad("max_moves_per_node", "must be at least 1".into());
        }
        let mut ids: Vec<_> = self.peers.iter().map(|p| p.id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return bad("peers", "a node id is listed twice".into());
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0
            || r.election_min_ms <= r.heartbeat_ms
            || r.election_max_ms <= r.election_min_ms
        {
            return bad(
                "raft",
                format!(
                    "need 0 < heartbeat_ms ({}) < election_min_ms ({}) < election_max_ms ({})",
                    r.heartbeat_ms, r.election_min_ms, r.election_max_ms
                ),
            );
        }
        if r.quiesce_after_ms != 0 && r.quiesce_after_ms < r.heartbeat_ms {
            return bad(
                "raft.quiesce_after_ms",
                format!(
                    "{} is below heartbeat_ms ({}); use 0 to never quiesce",
                    r.quiesce_after_ms, r.heartbeat_ms
                ),
            );
        }
        if r.max_log_while_catching_up != 0
            && r.max_log_while_catching_up <= r.snapshot_after_entries
        {
            return bad(
                "raft.max_log_while_catching_up",
                format!(
                    "{} is not above snapshot_after_entries ({}), so no snapshot would ever be \
                     deferred; use 0 to never defer",
                    r.max_log_while_catching_up, r.snapshot_after_entries
                ),
            );
        }
        if r.snapshot_chunk_bytes == 0 || r.snapshot_chunk_bytes > 32 * 1024 * 1024 {
            return bad(
                "raft.snapshot_chunk_bytes",
                format!("{} is not within 1..=33554432", r.snapshot_chunk_bytes),
            );
        }
        if self.limits.max_event == 0 || self.limits.max_event >= self.limits.max_frame {
            return bad(
                "limits.max_event",
                format!(
                    "must be above 0 and below limits.max_frame ({})",
                    self.limits.max_frame
                ),
            );
        }
        if self.wal_segment_bytes < 1024 * 1024 {
            return bad(
                "wal_segment_bytes",
                format!("{} is below 1048576", self.wal_segment_bytes),
            );
        }
        if self.max_client_connections == 0 {
            return bad("max_client_connections", "must be above 0".into());
        }
        if self.retention_interval_ms == 0 {
            return bad("retention_interval_ms", "must be above 0".into());
        }
        if let Some(tier) = &self.tier {
            if tier.upload_interval_ms == 0 {
                return bad("tier.upload_interval_ms", "must be above 0".into());
            }
            if tier.request_timeout_ms < 100 {
                return bad(
                    "tier.request_timeout_ms",
                    format!("{} is below 100", tier.request_timeout_ms),
                );
            }
            if tier.max_upload_backoff_ms < tier.upload_interval_ms {
                return bad(
                    "tier.max_upload_backoff_ms",
                    format!(
                        "{} is below upload_interval_ms ({})",
                        tier.max_upload_backoff_ms, tier.upload_interval_ms
                    ),
                );
            }
            // Pieces fetched ahead wait in the cache for their reader: a few readers' worth.
            if tier.read_ahead_pieces > 64
                || u64::from(tier.read_ahead_pieces) << 20 > tier.cache_bytes / 2
            {
                return bad(
                    "tier.read_ahead_pieces",
                    format!(
                        "{} is above 64, or its MiB above half of cache_bytes ({})",
                        tier.read_ahead_pieces, tier.cache_bytes
                    ),
                );
            }
            if tier.sweep_interval_ms < tier.upload_interval_ms.max(1000) {
                return bad(
                    "tier.sweep_interval_ms",
                    format!(
                        "{} is below 1000 or upload_interval_ms ({})",
                        tier.sweep_interval_ms, tier.upload_interval_ms
                    ),
                );
            }
            if !(tier.url.starts_with("s3://") || tier.url.starts_with("file:///")) {
                return bad(
                    "tier.url",
                    format!(
                        "{:?} must be s3://bucket/prefix or file:///folder",
                        tier.url
                    ),
                );
            }
        }
        if self.producer_expiry_ms < 1000 {
            return bad(
                "producer_expiry_ms",
                format!("{} is below 1000", self.producer_expiry_ms),
            );
        }
        let region_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-');
        if self.region.is_empty() || self.region.len() > 64 || !self.region.chars().all(region_char)
        {
            return bad(
                "region",
                format!("{:?} must be 1-64 characters of [A-Za-z0-9_-]", self.region),
            );
        }
        let m = &self.mesh;
        if m.gossip_interval_ms == 0 || m.dead_after_ms < 4 * m.gossip_interval_ms {
            return bad(
                "mesh.dead_after_ms",
                format!(
                    "{} must be at least 4 x mesh.gossip_interval_ms ({}, above 0)",
                    m.dead_after_ms, m.gossip_interval_ms
                ),
            );
        }
        if m.interest_clock_skew_ms > 60_000 {
            return bad(
                "mesh.interest_clock_skew_ms",
                format!(
                    "{} is more than a minute: an unwanted event would hold its forwarder that long",
                    m.interest_clock_skew_ms
                ),
            );
        }
        if m.forward_window == 0 || m.forward_batch_events == 0 {
            return bad(
                "mesh.forward_window",
                "forward_window and forward_batch_events must be above 0".into(),
            );
        }
        if m.forward_batch_bytes == 0 || m.forward_batch_bytes >= self.limits.max_frame {
            return bad(
                "mesh.forward_batch_bytes",
                format!(
                    "must be above 0 and below limits.max_frame ({})",
                    self.limits.max_frame
                ),
            );
        }
        for link in &self.faults.slow_links {
            if link.delay_ms > 10_000 || link.jitter_ms > 10_000 || link.loss_percent > 100 {
                return bad(
                    "faults.slow_links",
                    format!(
                        "link to {}: need delay_ms and jitter_ms <= 10000, loss_percent <= 100",
                        link.addr
                    ),
                );
            }
            for (key, percent) in [
                (
                    "faults.slow_links.drop_request_percent",
                    link.drop_request_percent,
                ),
                (
                    "faults.slow_links.drop_response_percent",
                    link.drop_response_percent,
                ),
                (
                    "faults.slow_links.duplicate_percent",
                    link.duplicate_percent,
                ),
            ] {
                if percent > 100 {
                    return bad(
                        key,
                        format!("link to {}: {percent} is not in 0..=100", link.addr),
                    );
                }
            }
        }
        let mut seeds: Vec<u64> = self
            .faults
            .slow_links
            .iter()
            .filter_map(|l| l.seed)
            .collect();
        seeds.dedup();
        if seeds.len() > 1 {
            return bad(
                "faults.slow_links.seed",
                format!("links give different seeds {seeds:?}; one generator serves every link of a node, give one seed"),
            );
        }
        if m.forward_retry_ms == 0 || m.forward_max_backoff_ms < m.forward_retry_ms {
            return bad(
                "mesh.forward_retry_ms",
                "need 0 < forward_retry_ms <= forward_max_backoff_ms".into(),
            );
        }
        Ok(())
    }
}
