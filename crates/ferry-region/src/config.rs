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

/// Certificate paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

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
    /// Bytes of snapshot data per peer message when a snapshot is sent to a follower.
    pub snapshot_chunk_bytes: usize,
}

impl Default for RaftTuning {
    fn default() -> Self {
        Self {
            heartbeat_ms: 150,
            election_min_ms: 800,
            election_max_ms: 1600,
            snapshot_after_entries: 4_096,
            keep_after_snapshot: 1_000,
            snapshot_chunk_bytes: 8 * 1024 * 1024,
        }
    }
}

/// Everything a `ferry node` needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id; must appear in `peers`.
    pub id: NodeId,
    /// Where this node keeps its data.
    pub data_dir: PathBuf,
    /// Every node of the region, this one included (static seed list).
    pub peers: Vec<PeerConfig>,
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
    /// Address of the HTTP endpoint for `/metrics` and `/healthz` (none if unset).
    #[serde(default)]
    pub http: Option<SocketAddr>,
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

impl NodeConfig {
    /// This node's own address.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.peers.iter().find(|p| p.id == self.id).map(|p| p.addr)
    }

    /// Checks the configuration; the error names the key.
    pub fn validate(&self) -> Result<(), RegionError> {
        let bad = |key: &'static str, reason: String| Err(RegionError::Config { key, reason });
        if self.listen_addr().is_none() {
            return bad(
                "peers",
                format!("node id {} is not listed in peers", self.id),
            );
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
        Ok(())
    }
}
