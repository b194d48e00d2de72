//! Cross-region routing. What is here so far: at-least-once forwarding of a partition to a
//! region as I/O-free state machines — the source side ([`Forwarder`]: batches, resends,
//! the cursor committed only behind acknowledgements) and the destination side
//! ([`Receiver`]: dedupe by origin offset, refusal after a gap). Tested with virtual time
//! against drops, duplicates, reordering and restarts. And two-level gossip membership
//! ([`Gossip`]): SWIM (foca) inside a region and summaries pushed by router nodes between
//! regions, over an abstract authenticated link ([`GossipLink`], [`GossipInbox`]), each node
//! publishing a [`NodeRecord`] (region, address, partitions it leads, subject interest,
//! regions it reaches, load), dead nodes leaving within a configured bound.
//!
//! Not here: the link over ferry-net's QUIC and the node's use of all this (ferry-region's
//! mesh driver).
#![warn(missing_docs, unreachable_pub)]

mod forward;
mod gossip;
mod receive;

pub use forward::{Ack, Batch, Forwarder, ForwarderConfig, ForwarderStats, SourceEvent};
pub use gossip::{
    leads_partition, Gossip, GossipConfig, GossipError, GossipInbox, GossipLink, GossipStats,
    Leads, LedGroup, NodeRecord,
};
pub use receive::{Admission, Receiver};

#[cfg(test)]
mod tests;
