//! Size limits shared by every role.

use serde::{Deserialize, Serialize};

/// Size limits. Defaults: frame 4 MiB, event 1 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest frame accepted on any connection, in bytes.
    pub max_frame: usize,
    /// Largest single event (encoded), in bytes.
    pub max_event: usize,
}

impl Limits {
    /// Default frame limit: 4 MiB.
    pub const DEFAULT_MAX_FRAME: usize = 4 * 1024 * 1024;
    /// Default event limit: 1 MiB.
    pub const DEFAULT_MAX_EVENT: usize = 1024 * 1024;
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: Self::DEFAULT_MAX_FRAME,
            max_event: Self::DEFAULT_MAX_EVENT,
        }
    }
}
