//! At-least-once forwarding of one source partition to one destination region, as a state
//! machine without I/O: the driver feeds it the source log ([`Forwarder::handle_source`]),
//! and acknowledgements ([`Forwarder::handle_ack`]), and drains what to send at a given time
//! ([`Forwarder::poll_transmit`]), the cursor to commit through the source region's Raft
//! ([`Forwarder::poll_commit`]) and when to call again ([`Forwarder::poll_timeout`]).
//!
//! Batches cover contiguous ranges of source offsets, `[from, to)`, and carry the events of
//! that range that the destination is interested in. A batch is resent with the same range
//! and the same events until acknowledged. The cursor — the first source offset not yet
//! dealt with — moves over a contiguous run of acknowledged batches, or over a range with
//! nothing wanted in it while nothing is in flight (that range is never sent: a region with
//! no interest gets no traffic). So the cursor never passes a wanted event the destination
//! has not committed. The next batch that does carry events starts where the destination
//! last said it was, so the skipped range needs no round trip; after a restart the forwarder
//! starts from the committed cursor, and if the destination is behind it (the range between
//! was skipped) an empty *bridge* batch closes the gap. The destination's
//! [`Receiver`](crate::Receiver) drops what it already has.

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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Batch {
    /// First source offset covered.
    pub from: u64,
    /// One past the last source offset covered.
    pub to: u64,
    /// The wanted events of `[from, to)`, in offset order.
    pub events: Vec<(u64, Bytes)>,
}

/// The destination's answer to a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// Bytes of events per batch, at most (a single larger event still goes alone).
    pub max_batch_bytes: usize,
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
            max_batch_bytes: 1024 * 1024,
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

impl InFlight {
    fn new(batch: Batch) -> Self {
        Self {
            batch,
            sent_at: None,
            attempts: 0,
            acked: false,
        }
    }
}

/// Counters of one forwarder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwarderStats {
    /// Events sent for the first time (each event crosses once unless resent).
    pub events_sent: u64,
    /// Batches sent again after no answer or a gap.
    pub resends: u64,
    /// Source offsets passed without sending because nothing in them was wanted.
    pub skipped: u64,
}

/// Forwards one source partition to one destination region.
#[derive(Debug)]
pub struct Forwarder {
    config: ForwarderConfig,
    /// First source offset not yet dealt with (acknowledged, or skipped as unwanted).
    cursor: u64,
    /// Where the destination said it was (it holds every wanted offset below); starts at the
    /// cursor and is corrected by a gap answer.
    dest_next: u64,
    stats: ForwarderStats,
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
            dest_next: cursor,
            stats: ForwarderStats::default(),
            committed: cursor,
            read_to: cursor,
            pending: VecDeque::new(),
            in_flight: VecDeque::new(),
        }
    }

    /// The first source offset not yet dealt with: everything wanted below it is at the
    /// destination.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Counters.
    pub fn stats(&self) -> ForwarderStats {
        self.stats
    }

    /// Batches sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.iter().filter(|f| !f.acked).count()
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

    /// Turns pending events into batches covering up to `upto`, window permitting. A batch
    /// with nothing wanted is skipped instead of sent while nothing is in flight.
    fn cut_batches(&mut self, upto: u64) {
        while self.in_flight.len() < self.config.window {
            let from = self.read_to;
            if from >= upto && self.pending.is_empty() {
                return;
            }
            let mut events = Vec::new();
            let mut bytes = 0;
            let mut to = from;
            while events.len() < self.config.max_batch_events {
                let Some(e) = self.pending.front() else {
                    break;
                };
                if e.wanted
                    && !events.is_empty()
                    && bytes + e.bytes.len() > self.config.max_batch_bytes
                {
                    break;
                }
                let e = self.pending.pop_front().expect("front exists");
                to = e.offset + 1;
                if e.wanted {
                    bytes += e.bytes.len();
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
            if self.in_flight.is_empty() {
                if events.is_empty() {
                    self.stats.skipped += to - from;
                    self.cursor = to;
                    continue;
                }
                // Whatever lies between the destination's position and here was skipped:
                // cover it, so the destination sees no gap.
                let from = self.dest_next.min(from);
                self.in_flight
                    .push_back(InFlight::new(Batch { from, to, events }));
            } else {
                self.in_flight
                    .push_back(InFlight::new(Batch { from, to, events }));
            }
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
        if f.attempts == 1 {
            self.stats.events_sent += f.batch.events.len() as u64;
        } else {
            self.stats.resends += 1;
        }
        Some(f.batch.clone())
    }

    /// The destination answered a batch (acknowledgements may come late, twice, or out of
    /// order; only what they say about the destination's position counts).
    pub fn handle_ack(&mut self, ack: Ack) {
        let next = match ack {
            Ack::Committed { next } => next,
            Ack::Gap { next } => next,
        };
        // Everything below `next` is at the destination, whichever batch said so.
        self.dest_next = self.dest_next.max(next);
        for f in &mut self.in_flight {
            if f.batch.to <= next {
                f.acked = true;
            } else if matches!(ack, Ack::Gap { .. }) {
                // The destination refused a batch after a gap: resend from there at once.
                f.sent_at = None;
            }
        }
        while self.in_flight.front().is_some_and(|f| f.acked) {
            let f = self.in_flight.pop_front().expect("front exists");
            self.cursor = self.cursor.max(f.batch.to);
        }
        if let Ack::Gap { next } = ack {
            // The destination is behind the oldest batch (after a restart of this side, the
            // range between was skipped as unwanted): an empty batch bridges it.
            let start = self.in_flight.front().map_or(self.cursor, |f| f.batch.from);
            if next < start {
                self.dest_next = next;
                self.in_flight.push_front(InFlight::new(Batch {
                    from: next,
                    to: start,
                    events: Vec::new(),
                }));
            }
        }
        self.cut_batches(self.read_to);
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
