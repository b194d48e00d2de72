//! The history format: one JSON object per line.
//!
//! ```text
//! {"type":"invoke","process":3,"f":"publish","id":"e-17","key":"k3","region":"a","regions":["b"],"topic":"t","time_ms":120}
//! {"type":"ok","process":3,"f":"publish","id":"e-17","region":"a","topic":"t","partition":2,"offset":55,"time_ms":131}
//! {"type":"info","process":3,"f":"publish","id":"e-18"}            (outcome unknown)
//! {"type":"fail","process":3,"f":"publish","id":"e-19"}            (definitely not written)
//! {"type":"ok","process":9,"f":"read","region":"a","topic":"t","partition":2,"events":[{"offset":55,"id":"e-17"}],"time_ms":140}
//! {"type":"ok","process":7,"f":"deliver","region":"a","group":"g","topic":"t","partition":2,"events":[...]}
//! {"type":"ok","f":"read","final":true,"region":"a","topic":"t","partition":2,"partitions":4,"low":0,"high":56,"events":[...]}
//! {"type":"dump","node":1,"region":"a","topic":"t","partition":2,"committed":56,"events":[...]}
//! {"type":"fault","kind":"kill","node":2,"region":"a","time_ms":5000,"end_ms":11000}
//! {"type":"ok","f":"split","region":"a","topic":"t","partition":6,"parent":2,"offset":812,"time_ms":9000}
//! ```
//!
//! A publish invoke names the region it is published in (`region`, its origin) and may name
//! `regions` it must reach. Reads and deliveries observe events in one log, named by
//! (region, topic, partition). A **final read** (`"final":true`) is the whole log after the
//! run: every event from its oldest retained offset `low` to its high watermark `high`, with
//! `partitions` the topic's partition count there; survival is judged from final reads only.
//! A dump is one replica's copy of a log, committed below `committed`. A fault records when
//! the chaos run held a fault (`time_ms` to `end_ms`). A split records that partitions were
//! added to a topic: partition `partition` took some of `parent`'s keys from the parent's
//! offset `offset` (its seal) on, so each key's events are in the parent below the seal, then
//! in the child.
//!
//! Every line has `time_ms`: milliseconds since one epoch shared by the whole history
//! (`ferry workload` writes Unix time). Parsing refuses, naming the line: unknown fields,
//! missing fields, and lines out of order
//! (a publish completed before its invoke, invoked or completed twice; two final reads of one
//! log; events of a final read outside its range).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::CheckError;

/// What a line records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpType {
    /// An operation started.
    Invoke,
    /// It completed.
    Ok,
    /// It definitely did not take effect.
    Fail,
    /// Its outcome is unknown (a timeout, a lost connection).
    Info,
    /// A replica's log, dumped after the run.
    Dump,
    /// A fault the run injected, from `time_ms` to `end_ms`.
    Fault,
}

/// The operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Func {
    /// Publish one event.
    Publish,
    /// Read (fetch) a range of a log.
    Read,
    /// Events delivered to a consumer (subscription or group).
    Deliver,
    /// A notification an edge sent a client (`ok`, with `channel`, `position` and the event
    /// `id`), or a break in a channel's stream (`info`, `kind` `gap` or `lag`).
    Notify,
    /// Partition `partition` of a topic was split from `parent` at the parent's `offset`.
    Split,
}

/// An event as seen in a log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Observed {
    /// Its offset in the log.
    pub offset: u64,
    /// The event id.
    pub id: String,
}

/// One line of the history.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Op {
    /// What the line records.
    #[serde(rename = "type")]
    pub op_type: Option<OpType>,
    /// The client process (one producer or consumer) that did it.
    #[serde(default)]
    pub process: u64,
    /// The operation, for everything but dumps and faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub f: Option<Func>,
    /// When it happened, in milliseconds since the history's epoch (`ferry workload`: Unix
    /// time unless `--epoch-ms` says otherwise); for a fault, when it was applied. Required:
    /// every rule about time needs it.
    pub time_ms: u64,
    /// The event published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Its key (order is checked per key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Regions the event must reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    /// Region of the log read, delivered from, dumped, published to, or faulted.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub region: String,
    /// Topic.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub topic: String,
    /// Partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    /// Offset an acknowledged publish got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Consumer group of a delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The partition a split's `partition` took keys from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<u32>,
    /// Node a dump came from, or a fault hit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    /// Offsets below this are committed in a dump.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed: Option<u64>,
    /// A final read: the whole retained log, `low` to `high`.
    #[serde(default, rename = "final", skip_serializing_if = "std::ops::Not::not")]
    pub is_final: bool,
    /// A final read's oldest retained offset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low: Option<u64>,
    /// A final read's high watermark (the next offset to be written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high: Option<u64>,
    /// The topic's partition count in the region of a final read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
    /// A fault's kind (`kill`, `pause`, `link-cut`, ...), or a notification break's
    /// (`gap`, `lag`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The edge channel of a notification (on a publish: the channel it is for, when its
    /// key is not the channel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// A notification's position in its channel (`<epoch>-<seq>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
    /// When a fault was healed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_ms: Option<u64>,
    /// Events read, delivered or dumped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Observed>,
}

/// A whole history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// Its lines, in order.
    pub ops: Vec<Op>,
    /// The 1-based line number of each op in the text it was parsed from.
    pub lines: Vec<usize>,
}

/// Where each publish and final read was seen so far, for the order checks.
#[derive(Default)]
struct Seen {
    invoked: HashMap<String, usize>,
    completed: HashMap<String, usize>,
    final_reads: HashMap<(String, String, u32), usize>,
}

impl History {
    /// Parses JSON lines; blank lines are skipped. The error names the line.
    pub fn parse(text: &str) -> Result<Self, CheckError> {
        let mut history = Self::default();
        let mut seen = Seen::default();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let op: Op = serde_json::from_str(line).map_err(|e| CheckError::Parse {
                line: n + 1,
                reason: e.to_string(),
            })?;
            validate(&op, n + 1, &mut seen).map_err(|reason| CheckError::Parse {
                line: n + 1,
                reason,
            })?;
            history.ops.push(op);
            history.lines.push(n + 1);
        }
        Ok(history)
    }
}

fn need<T>(field: &Option<T>, name: &str, what: &str) -> Result<(), String> {
    match field {
        Some(_) => Ok(()),
        None => Err(format!("{what} needs \"{name}\"")),
    }
}

/// A notification's position must read `<epoch>-<seq>`.
fn need_position(op: &Op, what: &str) -> Result<(), String> {
    let position = op.position.as_deref().unwrap_or_default();
    let parsed = position
        .rsplit_once('-')
        .is_some_and(|(epoch, seq)| !epoch.is_empty() && seq.parse::<u64>().is_ok());
    if parsed {
        Ok(())
    } else {
        Err(format!(
            "{what} needs \"position\" as <epoch>-<seq>, got {position:?}"
        ))
    }
}

/// Checks one line's fields and its place after the lines before it.
fn validate(op: &Op, line: usize, seen: &mut Seen) -> Result<(), String> {
    let Some(op_type) = op.op_type else {
        return Err("missing \"type\"".into());
    };
    match op_type {
        OpType::Dump => {
            need(&op.node, "node", "a dump")?;
            need(&op.partition, "partition", "a dump")?;
            need(&op.committed, "committed", "a dump")?;
            if op.topic.is_empty() {
                return Err("a dump needs \"topic\"".into());
            }
            if op.f.is_some() {
                return Err("a dump has no \"f\"".into());
            }
            return Ok(());
        }
        OpType::Fault => {
            need(&op.kind, "kind", "a fault")?;
            need(&op.end_ms, "end_ms", "a fault")?;
            if op.end_ms < Some(op.time_ms) {
                return Err("a fault ends (end_ms) before it starts (time_ms)".into());
            }
            if op.f.is_some() {
                return Err("a fault has no \"f\"".into());
            }
            return Ok(());
        }
        _ => {}
    }
    let Some(f) = op.f else {
        return Err("missing \"f\"".into());
    };
    match f {
        Func::Publish => {
            let Some(id) = op.id.as_deref() else {
                return Err("a publish needs \"id\"".into());
            };
            match op_type {
                OpType::Invoke => {
                    if op.topic.is_empty() {
                        return Err("a publish invoke needs \"topic\"".into());
                    }
                    if let Some(first) = seen.invoked.get(id) {
                        return Err(format!(
                            "publish {id:?} invoked again (first on line {first})"
                        ));
                    }
                    seen.invoked.insert(id.to_string(), line);
                }
                _ => {
                    if !seen.invoked.contains_key(id) {
                        return Err(format!("publish {id:?} completes before it is invoked"));
                    }
                    if let Some(first) = seen.completed.get(id) {
                        return Err(format!(
                            "publish {id:?} completes again (first on line {first})"
                        ));
                    }
                    seen.completed.insert(id.to_string(), line);
                    if op_type == OpType::Ok {
                        need(&op.partition, "partition", "an acknowledged publish")?;
                        // The offset may be absent: a resend older than the dedupe window
                        // is acknowledged as in the log at an offset no longer known.
                    }
                }
            }
        }
        Func::Split => {
            if op_type != OpType::Ok {
                return Err("a split is recorded once done (\"ok\")".into());
            }
            need(&op.partition, "partition", "a split")?;
            need(&op.parent, "parent", "a split")?;
            need(&op.offset, "offset", "a split (the parent's seal)")?;
            if op.topic.is_empty() {
                return Err("a split needs \"topic\"".into());
            }
            if op.parent >= op.partition {
                return Err("a split's parent is below its partition".into());
            }
        }
        Func::Notify => {
            need(&op.channel, "channel", "a notification")?;
            if op.topic.is_empty() {
                return Err("a notification needs \"topic\"".into());
            }
            match op_type {
                OpType::Ok => {
                    need(&op.id, "id", "a delivered notification")?;
                    need_position(op, "a delivered notification")?;
                }
                OpType::Info => match op.kind.as_deref() {
                    Some("gap" | "lag") => {
                        need_position(op, "a notification break (where it resumes)")?
                    }
                    other => {
                        return Err(format!(
                            "a notification break needs \"kind\" gap or lag, got {other:?}"
                        ))
                    }
                },
                _ => {
                    return Err("notifications are \"ok\" (delivered) or \"info\" (a break)".into())
                }
            }
        }
        Func::Read | Func::Deliver => {
            if op_type != OpType::Ok {
                return Err(format!(
                    "only completed (\"ok\") {} lines are recorded",
                    if f == Func::Read { "read" } else { "deliver" }
                ));
            }
            need(&op.partition, "partition", "a read or delivery")?;
            if op.topic.is_empty() {
                return Err("a read or delivery needs \"topic\"".into());
            }
            if f == Func::Deliver {
                need(&op.group, "group", "a delivery")?;
                if op.is_final {
                    return Err("a delivery cannot be final".into());
                }
            }
            if op.is_final {
                need(&op.low, "low", "a final read")?;
                need(&op.high, "high", "a final read")?;
                need(&op.partitions, "partitions", "a final read")?;
                let (low, high) = (op.low.unwrap_or(0), op.high.unwrap_or(0));
                if low > high {
                    return Err(format!("a final read's low {low} is above its high {high}"));
                }
                if let Some(e) = op
                    .events
                    .iter()
                    .find(|e| e.offset < low || e.offset >= high)
                {
                    return Err(format!(
                        "event {:?} at offset {} is outside the final read's range {low}..{high}",
                        e.id, e.offset
                    ));
                }
                if op.partition >= op.partitions {
                    return Err("a final read's partition is not below its \"partitions\"".into());
                }
                let log = (
                    op.region.clone(),
                    op.topic.clone(),
                    op.partition.unwrap_or(0),
                );
                if let Some(first) = seen.final_reads.insert(log, line) {
                    return Err(format!(
                        "a second final read of this log (first on line {first})"
                    ));
                }
            } else if op.low.is_some() || op.high.is_some() || op.partitions.is_some() {
                return Err("\"low\", \"high\" and \"partitions\" belong to final reads".into());
            }
        }
    }
    Ok(())
}
