//! At-least-once forwarding of one source partition to one destination region, as a state
//! machine without I/O: the driver feeds it the source log ([`Forwarder::handle_source`]),
//! and acknowledgements ([`Forwarder::handle_ack`]), and drains what to send at a given time
//! ([`Forwarder::poll_transmit`]), the cursor to commit through the source region's Raft
//! ([`Forwarder::poll_commit`]) and when to call again ([`Forwarder::poll_timeout`]).
//!
//! Batches cover contiguous ranges of source offsets, `[from, to)`, and carry the events of
//! that range that the destination is interested in (possibly none). A batch is resent with
//! the same range and the same events until acknowledged. The cursor — the first source
//! offset not yet acknowledged — only moves over a contiguous run of acknowledged batches, so
//! it never passes an event the destination has not committed. After a restart the forwarder
//! starts again from the committed cursor; the destination's [`Receiver`](crate::Receiver)
//! drops what it already has.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// An event of the source log, as the forwarder sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceEvent {
    /// Offset in the source partition.
    pub offset: u64,
    /// Whether the destination region wants it (interest or topic policy).
    pub wanted: bool,
    /// The encoded event, forwarded as it is.
    pub bytes: Bytes,
}

/// What crosses to the destination: a range of source offsets and the wanted events in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// First source offset covered.
    pub from: u64,
    /// One past the last source offset covered.
    pub to: u64,
    /// The wanted events of `[from, to)`, in offset order.
    pub events: Vec<(u64, Bytes)>,
}

/// The destination's answer to a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Committed (or already had it): the destination's next expected offset is `next`.
    Committed {
        /// The destination has everything below this.
        next: u64,
    },
    /// The batch starts after a gap: resend from `next`.
    Gap {
        /// The first offset the destination is missing.
        next: u64,
    },
}

/// Limits and timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwarderConfig {
    /// Batches sent and not yet acknowledged, at most.
    pub window: usize,
    /// Events per batch, at most.
    pub max_batch_events: usize,
    /// Resend a batch not acknowledged within this long (doubling per attempt up to
    /// `max_backoff`).
    pub retry_after: Duration,
    /// Longest wait between resends.
    pub max_backoff: Duration,
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        Self {
            window: 4,
            max_batch_events: 256,
            retry_after: Duration::from_millis(500),
            max_backoff: Duration::from_secs(10),
        }
    }
}

#[derive(Debug)]
struct InFlight {
    batch: Batch,
    /// When it was last sent; `None` until first sent.
    sent_at: Option<Instant>,
    attempts: u32,
    acked: bool,
}

/// Forwards one source partition to one destination region.
#[derive(Debug)]
pub struct Forwarder {
    config: ForwarderConfig,
    /// First source offset not yet acknowledged by the destination.
    cursor: u64,
    /// The cursor last reported by `poll_commit`.
    committed: u64,
    /// Source offsets below this have been read into batches.
    read_to: u64,
    /// Read but not yet batched.
    pending: VecDeque<SourceEvent>,
    /// Batches in order of their ranges, starting at `cursor`.
    in_flight: VecDeque<InFlight>,
}

impl Forwarder {
    /// A forwarder that starts from the committed cursor `cursor` (after a restart too).
    pub fn new(config: ForwarderConfig, cursor: u64) -> Self {
        Self {
            config,
            cursor,
            committed: cursor,
            read_to: cursor,
            pending: VecDeque::new(),
            in_flight: VecDeque::new(),
        }
    }

    /// The first source offset the destination has not acknowledged.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// The next source offset the driver should read from.
    pub fn read_from(&self) -> u64 {
        self.read_to
            .max(self.pending.back().map_or(0, |e| e.offset + 1))
    }

    /// Whether the driver may read more now (bounded memory).
    pub fn wants_source(&self) -> bool {
        self.pending.len() < self.config.max_batch_events * self.config.window
    }

    /// Source events from `read_from()` on, in offset order, complete below `read_upto`:
    /// every offset below it that is not among them holds nothing (trimmed by retention).
    /// Events below `read_from()` (a re-read) are ignored.
    pub fn handle_source(&mut self, events: impl IntoIterator<Item = SourceEvent>, read_upto: u64) {
        for e in events {
            if e.offset >= self.read_from() && e.offset < read_upto {
                self.pending.push_back(e);
            }
        }
        let covered = read_upto.max(self.read_from());
        self.cut_batches(covered);
    }

    /// Turns pending events into batches covering up to `upto`, window permitting.
    fn cut_batches(&mut self, upto: u64) {
        while self.in_flight.len() < self.config.window {
            let from = self.read_to;
            if from >= upto && self.pending.is_empty() {
                return;
            }
            let mut events = Vec::new();
            let mut to = from;
            while events.len() < self.config.max_batch_events {
                let Some(e) = self.pending.pop_front() else {
                    break;
                };
                to = e.offset + 1;
                if e.wanted {
                    events.push((e.offset, e.bytes));
                }
            }
            if self.pending.is_empty() {
                to = to.max(upto);
            }
            if to <= from {
                return;
            }
            self.read_to = to;
            self.in_flight.push_back(InFlight {
                batch: Batch { from, to, events },
                sent_at: None,
                attempts: 0,
                acked: false,
            });
        }
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u32 << attempts.saturating_sub(1).min(16);
        (self.config.retry_after * factor).min(self.config.max_backoff)
    }

    /// The next batch to send now: a new one, or one whose retry is due. Resends carry the
    /// identical batch.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Batch> {
        let due = |f: &InFlight, backoff: Duration| match f.sent_at {
            None => true,
            Some(at) => !f.acked && now >= at + backoff,
        };
        let index = (0..self.in_flight.len()).find(|i| {
            let f = &self.in_flight[*i];
            due(f, self.backoff(f.attempts))
        })?;
        let f = &mut self.in_flight[index];
        f.sent_at = Some(now);
        f.attempts += 1;
        Some(f.batch.clone())
    }

    /// The destination answered a batch (acknowledgements may come late, twice, or out of
    /// order; only what they say about the destination's position counts).
    pub fn handle_ack(&mut self, ack: Ack) {
        match ack {
            Ack::Committed { next } => {
                // Everything below `next` is at the destination, whichever batch said so.
                for f in &mut self.in_flight {
                    if f.batch.to <= next {
                        f.acked = true;
                    }
                }
                while self.in_flight.front().is_some_and(|f| f.acked) {
                    let f = self.in_flight.pop_front().expect("front exists");
                    self.cursor = f.batch.to;
                }
                self.cut_batches(self.read_to);
            }
            Ack::Gap { next } => {
                // The destination lost an earlier batch: resend from there at once.
                for f in &mut self.in_flight {
                    if f.batch.to > next {
                        f.sent_at = None;
                    } else {
                        f.acked = true;
                    }
                }
                while self.in_flight.front().is_some_and(|f| f.acked) {
                    let f = self.in_flight.pop_front().expect("front exists");
                    self.cursor = f.batch.to;
                }
            }
        }
    }

    /// When the next retry is due, if any batch is waiting for an acknowledgement.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.in_flight
            .iter()
            .filter(|f| !f.acked)
            .filter_map(|f| f.sent_at.map(|at| at + self.backoff(f.attempts)))
            .min()
    }

    /// A new cursor to commit through the source region's Raft group, when it moved.
    pub fn poll_commit(&mut self) -> Option<u64> {
        (self.cursor > self.committed).then(|| {
            self.committed = self.cursor;
            self.cursor
        })
    }
}
