//! The destination side of forwarding, per (origin region, origin partition): which source
//! offsets it already holds, so a resent or duplicated batch is never appended twice and a
//! batch after a gap is refused until the gap is filled. Its one number, `next`, must be
//! stored in the same Raft command as the events it lets through.

use bytes::Bytes;

use crate::{Ack, Batch};

/// What to do with an arriving batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// Events to append (those not held yet), in order.
    pub append: Vec<(u64, Bytes)>,
    /// The position after appending them (store it with them).
    pub next: u64,
    /// The answer for the forwarder, once the append is committed.
    pub ack: Ack,
}

/// Receiving state for one origin partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Receiver {
    /// Every source offset below this is held.
    pub next: u64,
}

impl Receiver {
    /// Decides on `batch` without changing anything; apply the result with
    /// [`Receiver::commit`] once the append it asks for is committed.
    pub fn admit(&self, batch: &Batch) -> Admission {
        if batch.from > self.next {
            return Admission {
                append: Vec::new(),
                next: self.next,
                ack: Ack::Gap { next: self.next },
            };
        }
        let next = self.next.max(batch.to);
        Admission {
            append: batch
                .events
                .iter()
                .filter(|(offset, _)| *offset >= self.next)
                .cloned()
                .collect(),
            next,
            ack: Ack::Committed { next },
        }
    }

    /// Records an admitted batch as committed.
    pub fn commit(&mut self, admission: &Admission) {
        self.next = self.next.max(admission.next);
    }
}
