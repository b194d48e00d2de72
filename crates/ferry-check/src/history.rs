//! The history format: one JSON object per line.
//!
//! ```text
//! {"type":"invoke","process":3,"f":"publish","id":"e-17","key":"k3","topic":"t","time_ms":120}
//! {"type":"ok","process":3,"f":"publish","id":"e-17","topic":"t","partition":2,"offset":55,"time_ms":131}
//! {"type":"info","process":3,"f":"publish","id":"e-18"}            (outcome unknown)
//! {"type":"fail","process":3,"f":"publish","id":"e-19"}            (definitely not written)
//! {"type":"ok","process":9,"f":"read","region":"a","topic":"t","partition":2,"events":[{"offset":55,"id":"e-17"}],"time_ms":140}
//! {"type":"ok","process":9,"f":"deliver","group":"g","topic":"t","partition":2,"events":[...]}
//! {"type":"dump","node":1,"topic":"t","partition":2,"committed":56,"events":[...]}
//! ```
//!
//! A publish invoke may name `regions` it must reach (cross-region checks). Reads and
//! deliveries observe events in one log, named by (region, topic, partition); a dump is one
//! replica's copy of that log, with the offset below which it is committed.

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
}

/// An event as seen in a log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// Its offset in the log.
    pub offset: u64,
    /// The event id.
    pub id: String,
}

/// One line of the history.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Op {
    /// What the line records.
    #[serde(rename = "type")]
    pub op_type: Option<OpType>,
    /// The client process (one producer or consumer) that did it.
    #[serde(default)]
    pub process: u64,
    /// The operation, for everything but dumps.
    #[serde(default)]
    pub f: Option<Func>,
    /// Milliseconds since the run started.
    #[serde(default)]
    pub time_ms: u64,
    /// The event published.
    #[serde(default)]
    pub id: Option<String>,
    /// Its key (order is checked per key).
    #[serde(default)]
    pub key: Option<String>,
    /// Regions the event must reach.
    #[serde(default)]
    pub regions: Vec<String>,
    /// Region of the log read, delivered from, dumped, or published to.
    #[serde(default)]
    pub region: String,
    /// Topic.
    #[serde(default)]
    pub topic: String,
    /// Partition.
    #[serde(default)]
    pub partition: Option<u32>,
    /// Offset an acknowledged publish got.
    #[serde(default)]
    pub offset: Option<u64>,
    /// Consumer group of a delivery.
    #[serde(default)]
    pub group: Option<String>,
    /// Node a dump came from.
    #[serde(default)]
    pub node: Option<u64>,
    /// Offsets below this are committed in a dump.
    #[serde(default)]
    pub committed: Option<u64>,
    /// Events read, delivered or dumped.
    #[serde(default)]
    pub events: Vec<Observed>,
}

/// A whole history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// Its lines, in order.
    pub ops: Vec<Op>,
}

impl History {
    /// Parses JSON lines; blank lines are skipped. The error names the line.
    pub fn parse(text: &str) -> Result<Self, CheckError> {
        let mut ops = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let op: Op = serde_json::from_str(line).map_err(|e| CheckError::Parse {
                line: n + 1,
                reason: e.to_string(),
            })?;
            let invalid = |reason: &str| CheckError::Parse {
                line: n + 1,
                reason: reason.to_string(),
            };
            match op.op_type {
                None => return Err(invalid("missing \"type\"")),
                Some(OpType::Dump) => {
                    if op.partition.is_none() || op.node.is_none() {
                        return Err(invalid("a dump needs \"node\" and \"partition\""));
                    }
                }
                Some(_) => match op.f {
                    None => return Err(invalid("missing \"f\"")),
                    Some(Func::Publish) if op.id.is_none() => {
                        return Err(invalid("a publish needs \"id\""))
                    }
                    Some(Func::Read | Func::Deliver)
                        if op.op_type == Some(OpType::Ok) && op.partition.is_none() =>
                    {
                        return Err(invalid("a completed read or delivery needs \"partition\""))
                    }
                    _ => {}
                },
            }
            ops.push(op);
        }
        Ok(Self { ops })
    }
}
