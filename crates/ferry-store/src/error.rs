//! The error type of this crate.

use std::path::PathBuf;

/// Why storage failed. Errors about the data folder name the path.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled could not open the folder (corrupt, or not a sled database).
    #[error("cannot open data folder {path}: {reason}")]
    Open {
        /// The folder.
        path: PathBuf,
        /// sled's message.
        reason: String,
    },
    /// The folder belongs to another node or another program.
    #[error("data folder {path} is not this node's: {reason}")]
    Foreign {
        /// The folder.
        path: PathBuf,
        /// What did not match.
        reason: String,
    },
    /// A file of the write-ahead log is damaged before its end.
    #[error("write-ahead log file {path} is corrupt: {reason}")]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// What was wrong, and where.
        reason: String,
    },
    /// A stream index run is damaged (a checksum, a length or its order is wrong).
    #[error("stream index run {path} is damaged: {reason}")]
    RunCorrupt {
        /// The run's file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A read or write failed.
    #[error("storage I/O on {what}: {reason}")]
    Io {
        /// What was being read or written.
        what: String,
        /// The underlying message.
        reason: String,
    },
    /// A replica's batch files lack committed offsets it should hold (between its low and
    /// high watermarks): it must not serve a read there, which would skip them silently.
    #[error("this replica's batch files lack offsets {from}..{to} (it holds {low}..{high}); not served here, retry")]
    Missing {
        /// The first offset missing.
        from: u64,
        /// Past the last offset missing.
        to: u64,
        /// The replica's low watermark.
        low: u64,
        /// The replica's high watermark.
        high: u64,
    },
    /// The object store did not answer a request (down, slow or refusing): retry later.
    #[error("object store, {key}: {reason}")]
    Remote {
        /// The object's key.
        key: String,
        /// What the store answered, or that it did not.
        reason: String,
    },
    /// An object the manifest names is missing or damaged: it is not served.
    #[error("remote segment {key} is damaged or missing: {reason}")]
    RemoteCorrupt {
        /// The object's key.
        key: String,
        /// What was wrong.
        reason: String,
    },
    /// The object store does not hold an object the manifest named when the read began
    /// (retention may have dropped it meanwhile; otherwise it is lost).
    #[error("remote segment {key} is missing from the object store")]
    RemoteMissing {
        /// The object's key.
        key: String,
    },
    /// Stored bytes did not decode.
    #[error(transparent)]
    Decode(#[from] ferry_proto::ProtoError),
}

impl StoreError {
    /// An I/O error on `what`.
    pub fn io(what: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Self::Io {
            what: what.into(),
            reason: e.to_string(),
        }
    }
}

impl From<StoreError> for std::io::Error {
    fn from(e: StoreError) -> Self {
        std::io::Error::other(e.to_string())
    }
}
