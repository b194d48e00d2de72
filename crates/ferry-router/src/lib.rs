//! Cross-region routing. What is here so far: at-least-once forwarding of a partition to a
//! region as I/O-free state machines — the source side ([`Forwarder`]: batches, resends,
//! the cursor committed only behind acknowledgements) and the destination side
//! ([`Receiver`]: dedupe by origin offset, refusal after a gap). Tested with virtual time
//! against drops, duplicates, reordering and restarts.
//!
//! Not here yet: gossip membership and interest (chitchat over ferry-net), the async driver,
//! mesh paths and loop prevention (issue 3).
#![warn(missing_docs, unreachable_pub)]

mod forward;
mod receive;

pub use forward::{Ack, Batch, Forwarder, ForwarderConfig, SourceEvent};
pub use receive::{Admission, Receiver};

#[cfg(test)]
mod tests;
