//! The error type of this crate.

use ferry_proto::wire::{ApiError, ErrorCode};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node answered with an error.
    #[error("node refused: {0}")]
    Api(#[from] ApiError),
    /// The connection failed.
    #[error(transparent)]
    Net(#[from] ferry_net::NetError),
    /// A value or frame was invalid.
    #[error(transparent)]
    Proto(#[from] ferry_proto::ProtoError),
    /// No configured server could be reached.
    #[error("no server answered: {0}")]
    NoServer(String),
    /// The node answered something this call did not expect.
    #[error("unexpected answer: {0}")]
    Unexpected(String),
    /// The call did not finish in time.
    #[error("{0} timed out")]
    Timeout(String),
    /// The producer or subscription was closed.
    #[error("closed: {0}")]
    Closed(String),
}

impl ClientError {
    /// The node's error code, when the node refused the call ([`ClientError::Api`]).
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Api(e) => Some(e.code),
            _ => None,
        }
    }
}
