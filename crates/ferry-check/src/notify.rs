//! Notifications as an edge's clients saw them (`notify` lines): the edge promises a client
//! that resumes from its last position either exactly what came after it or an explicit
//! break (`gap`, `lag` frames), never a silent skip or renumbering.
//!
//! Judged per (process, channel) stream, in line order:
//! - within one epoch, a message's sequence is the previous one's plus one unless a break
//!   came between (a larger step is a **silent skip**);
//! - a message of another epoch than the previous one comes only after a break (a change
//!   without one is a **silent renumbering**);
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

/// Where a (process, channel) stream is: its last position, and whether a break came since.
#[derive(Default, Clone, Copy)]
struct Stream<'h> {
    last: Option<(&'h str, u64)>,
    broken: bool,
}

fn split(position: &str) -> Option<(&str, u64)> {
    let (epoch, seq) = position.rsplit_once('-')?;
    Some((epoch, seq.parse().ok()?))
}

/// Judges every `notify` line of `history` against the acknowledged publishes in `acked`
/// (event id -> its region, topic and key, the key being the channel).
pub(crate) fn check(history: &History, acked: &Wanted) -> Findings {
    let mut found = Findings::default();
    let mut streams: HashMap<(u64, &str), Stream> = HashMap::new();
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
        let stream = streams.entry((op.process, channel)).or_default();
        subscribers
            .entry((&op.region, &op.topic, channel))
            .or_default()
            .insert(op.process);
        match op.op_type {
            Some(OpType::Info) => {
                found.breaks += 1;
                stream.broken = true;
            }
            Some(OpType::Ok) => {
                let (Some(id), Some(position)) = (op.id.as_deref(), op.position.as_deref()) else {
                    continue;
                };
                found.delivered += 1;
                found.ids.insert(id.to_string());
                delivered.insert((op.process, id));
                if let Some(earlier) = positions.insert((&op.region, channel, position), id) {
                    if earlier != id {
                        found.reused.push(format!(
                            "{channel} {position} in region {:?}: {earlier} and {id} (line {line})",
                            op.region
                        ));
                    }
                }
                let now = split(position);
                if let (Some((epoch, seq)), Some((last_epoch, last_seq)), false) =
                    (now, stream.last, stream.broken)
                {
                    if epoch == last_epoch && seq > last_seq + 1 {
                        found.skips.push(format!(
                            "process {} {channel}: {last_epoch}-{last_seq} then {position} with no gap or lag between (line {line})",
                            op.process
                        ));
                    } else if epoch != last_epoch {
                        found.skips.push(format!(
                            "process {} {channel}: epoch {last_epoch} then {position} with no gap between (line {line})",
                            op.process
                        ));
                    }
                }
                *stream = Stream {
                    last: now.or(stream.last),
                    broken: false,
                };
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
