//! Domain streams: an aggregate's events inside one partition, appended with an expected
//! version (optimistic concurrency) and read back from any version.
//!
//! A stream's version is the number of events ever appended to it: a stream that does not
//! exist has version 0, and its first event gets version 1. The partition checks the
//! expected version when it applies the append, so two writers expecting the same version
//! cannot both succeed.

use serde::{Deserialize, Serialize};

use crate::{Event, ProtoError};

/// Longest stream name, in bytes.
pub const MAX_STREAM_NAME: usize = 128;

/// Checks a stream name: 1–128 characters of `[A-Za-z0-9_.:-]`.
pub fn validate_stream_name(name: &str) -> Result<(), ProtoError> {
    let refuse = |reason| {
        Err(ProtoError::InvalidStreamName {
            stream: name.chars().take(MAX_STREAM_NAME + 8).collect(),
            reason,
        })
    };
    if name.is_empty() {
        return refuse("it is empty");
    }
    if name.len() > MAX_STREAM_NAME {
        return refuse("it is longer than 128 characters");
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':');
    if !name.chars().all(ok_char) {
        return refuse("only characters of [A-Za-z0-9_.:-] are allowed");
    }
    Ok(())
}

/// One event of a domain stream as read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamEvent {
    /// Its version in the stream (the first event is version 1).
    pub version: u64,
    /// Its offset in the partition.
    pub offset: u64,
    /// When the partition's leader appended it (milliseconds since the Unix epoch).
    pub appended_at_ms: u64,
    /// The event.
    pub event: Event,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names() {
        for ok in ["order-1", "a", "Order_1.v2:x", &"x".repeat(128)] {
            assert!(validate_stream_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a/b", "é", &"x".repeat(129)] {
            let err = validate_stream_name(bad).unwrap_err();
            assert!(matches!(err, ProtoError::InvalidStreamName { .. }), "{bad}");
            assert!(err.to_string().contains("stream name"));
        }
    }
}
