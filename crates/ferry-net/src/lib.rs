//! # ferry-net — authenticated QUIC transport for Ferry
//!
//! This crate moves opaque bytes between Ferry nodes (and hands client
//! connections to the node). It provides:
//!
//! * [`tls`] — the cluster PKI: a dev CA generator ([`tls::generate_dev_certs`],
//!   [`tls::dev_ca`]), PEM loading ([`tls::TlsIdentity`]) and mutual-TLS
//!   `quinn` configurations ([`tls::server_config`], [`tls::client_config`]).
//!   Every connection is mTLS: servers require a client certificate chaining to
//!   the cluster CA, clients verify the server as [`NODE_SERVER_NAME`].
//! * [`framing`] — `u32` big-endian length-prefixed frames on QUIC streams.
//! * Peer RPC — the [`Transport`] trait (one request, one reply) implemented
//!   over QUIC by [`QuicTransport`] (one lazily dialed, shared connection per
//!   peer, one bidirectional stream per request, reconnect with exponential
//!   backoff) and in memory by [`MemTransport`] / [`MemNetwork`] (for tests,
//!   with link cutting). Peers are called by id ([`Transport::call`], address
//!   from the configured peer list) or, where only an address is known
//!   (gossip seeds, nodes of other regions), by address
//!   ([`Transport::call_addr`]; same authentication, same wire format). Where
//!   requests must not wait for each other's replies (Raft's replication
//!   pipeline, a snapshot's pieces), a peer stream ([`Transport::open_stream`], [`PeerStream`])
//!   carries ordered frames both ways on one QUIC stream. The
//!   answering side implements [`RpcHandler`] and runs [`serve`], which
//!   dispatches each accepted connection by ALPN: [`ALPN_PEER`] connections
//!   are served as peer RPC, [`ALPN_CLIENT`] connections are handed to a
//!   callback.
//! * Fault injection — [`LinkFaults`], a shared set of cut peer addresses and
//!   shaped links (for tests and chaos runs). Given to the transport
//!   ([`TransportOptions::faults`]) and to [`serve`], a cut takes the link to a
//!   node down in both directions: calls to it fail at once and its requests
//!   are refused, with the reason "link cut (fault injection)". A
//!   [`LinkShape`] delays calls (delay, jitter, retransmission delay) and
//!   injects real faults into them: requests lost, replies lost, requests
//!   delivered twice (reordered), counted in [`InjectedFaults`] and drawn from
//!   a seedable generator; peer streams are cut and delayed only (QUIC streams
//!   are reliable). Both transports apply them through the same code.
//!
//! ## Peer wire protocol
//!
//! For each request the dialing node opens a bidirectional stream and writes
//! one frame `caller NodeId (u64 BE) ‖ kind (u8) ‖ request`. For a call (kind
//! `0`) it then finishes its send side, and the server answers with one frame
//! `status (u8) ‖ body` — status `0` means `body` is the handler's response,
//! `1` means `body` is a UTF-8 error message (surfaced as [`NetError::Remote`])
//! — and finishes the stream. A stream (kind `1`, [`Transport::open_stream`])
//! stays open: the server answers with a status frame (`0` alone: the node took
//! the stream and handed it to its handler, which may still refuse it in its own
//! protocol), then both sides write frames until they finish their send side. A request is
//! served only if the caller's certificate names the NodeId it claims
//! ([`node_identity_name`]); a client certificate, or another node's, is refused.
//!
//! ## What this crate does not do
//!
//! * It does not interpret payloads: encoding requests/responses (Raft
//!   messages, client protocol) is the caller's job.
//! * It does not retry requests: a failed or timed-out [`Transport::call`] is
//!   reported once; retry policy belongs to the caller (e.g. Raft).
//! * It does not manage production PKI (rotation, revocation); the generated
//!   dev certificates are for development and tests.
//! * It does not speak the client protocol; client connections are only
//!   accepted and passed on.
#![warn(missing_docs, unreachable_pub)]

mod error;
mod faults;
pub mod framing;
mod mem;
mod quic;
mod rpc;
mod stream;
pub mod tls;

pub use error::NetError;
pub use faults::{InjectedFaults, LinkFaults, LinkShape};
pub use mem::{MemNetwork, MemTransport};
pub use quic::{bind_endpoint, serve, QuicTransport};
pub use rpc::{Received, RpcHandler, Transport, TransportOptions};
pub use stream::{PeerStream, StreamReceiver, StreamSender};

/// Identifier of a node in the cluster.
pub type NodeId = u64;

/// ALPN protocol id for node-to-node (peer RPC) connections.
pub const ALPN_PEER: &[u8] = b"ferry-peer/15";

/// ALPN protocol id for client-to-node connections.
pub const ALPN_CLIENT: &[u8] = b"ferry-client/5";

/// DNS name every node certificate carries and every client verifies
/// (addresses vary; the cluster name does not).
pub const NODE_SERVER_NAME: &str = "ferry-node";

/// The DNS name a node certificate carries for its own id (`node-<id>.ferry-node`). A peer
/// connection may only speak for the node id its certificate names.
pub fn node_identity_name(id: NodeId) -> String {
    format!("node-{id}.{NODE_SERVER_NAME}")
}

/// Default maximum frame payload size (4 MiB).
pub const DEFAULT_MAX_FRAME: usize = 4 * 1024 * 1024;
