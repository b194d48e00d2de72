//! The crate's error type.

use std::path::PathBuf;
use std::time::Duration;

use crate::NodeId;

/// Everything that can go wrong in `ferry-net`. Each message names what failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Reading or writing a file (certificates, keys) failed.
    #[error("cannot access {}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// Binding a UDP socket for a QUIC endpoint failed.
    #[error("cannot bind QUIC endpoint on {addr}: {source}")]
    Bind {
        /// The address that could not be bound.
        addr: std::net::SocketAddr,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// Building a TLS / QUIC configuration failed.
    #[error("TLS configuration error: {0}")]
    Tls(String),
    /// A certificate or key could not be generated, parsed or used.
    #[error("certificate error: {0}")]
    Cert(String),
    /// A connection to a peer could not be established (or the peer is in
    /// reconnect backoff).
    #[error("cannot connect to node {peer} at {addr}: {reason}")]
    Connect {
        /// The peer being dialed.
        peer: NodeId,
        /// The address dialed (`"mem"` for the in-memory network).
        addr: String,
        /// Why it failed.
        reason: String,
    },
    /// A connection to a node known only by its address
    /// ([`crate::Transport::call_addr`]) could not be established (or that
    /// address is in reconnect backoff, or its link is cut).
    #[error("cannot connect to node at {addr}: {reason}")]
    ConnectAddr {
        /// The address dialed.
        addr: std::net::SocketAddr,
        /// Why it failed.
        reason: String,
    },
    /// An operation did not finish in time.
    #[error("timed out after {after:?} while {what}")]
    Timeout {
        /// What was being waited for.
        what: String,
        /// The deadline that expired.
        after: Duration,
    },
    /// A frame is larger than the allowed maximum (checked before allocating).
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// Declared or actual payload length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The connection or stream was closed or reset.
    #[error("connection closed: {0}")]
    Closed(String),
    /// The peer sent something that violates the framing / RPC protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// No address is known for this peer.
    #[error("unknown peer node {0}: no address configured")]
    UnknownPeer(NodeId),
    /// The in-memory link between two nodes is cut.
    #[error("link from node {from} to node {to} is cut")]
    LinkCut {
        /// Calling node.
        from: NodeId,
        /// Called node.
        to: NodeId,
    },
    /// The remote side failed to handle the request; the message is theirs.
    #[error("remote node failed to handle request: {0}")]
    Remote(String),
}
