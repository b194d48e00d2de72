//! Notifications as an edge's clients saw them (`notify` lines): the edge promises a client
//! that resumes from its last position either exactly what came after it or an explicit
//! break (`gap`, `lag` frames), never a silent skip or renumbering.
//!
//! Judged per (process, channel) stream, in line order, each message at exactly the position
//! due (a **silent skip or renumbering** otherwise):
//! - after a message, the next position of its epoch;
//! - after a `gap`, the position it names (`first_available`): only a gap changes the epoch;
//! - after a `lag`, the position after the one it names (`resume_from`), the same epoch;
//! - a position (region, channel, `<epoch>-<seq>`) names one event, whoever saw it
//!   (**reused positions** otherwise);
//! - every acknowledged publish to a channel reached each process that subscribed to it
//!   (**undelivered** otherwise; the workload waits for them, bounded, before it stops).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::history::{Func, History, OpType};

/// An acknowledged publish a subscriber of its channel must see: (region, topic, channel).
pub(crate) type Wanted<'h> = HashMap<&'h str, (&'h str, &'h str, &'h str)>;

/// What the notification streams came to.
#[derive(Debug, Default)]
pub(crate) struct Findings {
    /// Messages delivered.
    pub(crate) delivered: u64,
    /// Breaks (gap and lag frames).
    pub(crate) breaks: u64,
    /// Silent skips and renumberings, described.
    pub(crate) skips: Vec<String>,
    /// Positions naming two events.
    pub(crate) reused: Vec<String>,
    /// (event, process) pairs never delivered.
    pub(crate) undelivered: Vec<String>,
    /// Event ids delivered (for the unexpected check).
    pub(crate) ids: BTreeSet<String>,
}

/// The position a (process, channel) stream must show next, and why.
struct Expected<'h> {
    epoch: &'h str,
    seq: u64,
    after: &'static str,
}

fn split(position: &str) -> Option<(&str, u64)> {
    let (epoch, seq) = position.rsplit_once('-')?;
    Some((epoch, seq.parse().ok()?))
}

/// Judges every `notify` line of `history` against the acknowledged publishes in `acked`
/// (event id -> its region, topic and channel).
pub(crate) fn check(history: &History, acked: &Wanted) -> Findings {
    let mut found = Findings::default();
    let mut streams: HashMap<(u64, &str), Option<Expected>> = HashMap::new();
    let mut positions: BTreeMap<(&str, &str, &str), &str> = BTreeMap::new();
    // (region, topic, channel) -> subscribed processes; (process, id) delivered.
    let mut subscribers: BTreeMap<(&str, &str, &str), BTreeSet<u64>> = BTreeMap::new();
    let mut delivered: BTreeSet<(u64, &str)> = BTreeSet::new();
    for (op, line) in history.ops.iter().zip(&history.lines) {
        if op.f != Some(Func::Notify) {
            continue;
        }
        let Some(channel) = op.channel.as_deref() else {
            continue;
        };
        let expected = streams.entry((op.process, channel)).or_default();
        subscribers
            .entry((&op.region, &op.topic, channel))
            .or_default()
            .insert(op.process);
        let position = op.position.as_deref().and_then(split);
        match (op.op_type, op.kind.as_deref()) {
            // A gap names where the stream continues; a lag, the last position before the
            // replay that follows it.
            (Some(OpType::Info), Some(kind)) => {
                found.breaks += 1;
                *expected = position.map(|(epoch, seq)| match kind {
                    "lag" => Expected {
                        epoch,
                        seq: seq + 1,
                        after: "a lag",
                    },
                    _ => Expected {
                        epoch,
                        seq,
                        after: "a gap",
                    },
                });
            }
            (Some(OpType::Ok), _) => {
                let (Some(id), Some((epoch, seq))) = (op.id.as_deref(), position) else {
                    continue;
                };
                let shown = op.position.as_deref().unwrap_or_default();
                found.delivered += 1;
                found.ids.insert(id.to_string());
                delivered.insert((op.process, id));
                if let Some(earlier) = positions.insert((&op.region, channel, shown), id) {
                    if earlier != id {
                        found.reused.push(format!(
                            "{channel} {shown} in region {:?}: {earlier} and {id} (line {line})",
                            op.region
                        ));
                    }
                }
                if let Some(want) = expected.as_ref() {
                    if (want.epoch, want.seq) != (epoch, seq) {
                        found.skips.push(format!(
                            "process {} {channel}: after {} {}-{} was due, {shown} came (line {line})",
                            op.process, want.after, want.epoch, want.seq
                        ));
                    }
                }
                *expected = Some(Expected {
                    epoch,
                    seq: seq + 1,
                    after: "the previous message",
                });
            }
            _ => {}
        }
    }
    let mut wanted: Vec<(&&str, &(&str, &str, &str))> = acked.iter().collect();
    wanted.sort();
    for (id, (region, topic, channel)) in wanted {
        for process in subscribers
            .get(&(*region, *topic, *channel))
            .into_iter()
            .flatten()
        {
            if !delivered.contains(&(*process, *id)) {
                found
                    .undelivered
                    .push(format!("{id} on {channel} to process {process}"));
            }
        }
    }
    found
}
