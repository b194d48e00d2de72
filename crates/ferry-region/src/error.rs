//! The error type of this crate.

/// Why a node could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// The configuration is invalid.
    #[error("config key {key}: {reason}")]
    Config {
        /// The offending key.
        key: &'static str,
        /// Why.
        reason: String,
    },
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] ferry_store::StoreError),
    /// Networking failed.
    #[error(transparent)]
    Net(#[from] ferry_net::NetError),
    /// Raft failed fatally.
    #[error("raft group {group}: {reason}")]
    Raft {
        /// The group.
        group: String,
        /// What happened.
        reason: String,
    },
    /// The node could not join the region.
    #[error("joining the region: {0}")]
    Join(String),
}
