//! The analysis: from a [`History`] to a [`Report`], trusting nothing the system under test
//! says about itself beyond what the history records.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::history::{Func, History, Op, OpType};

/// A log: (region, topic, partition).
pub type LogId = (String, String, u32);

/// What makes the verdict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// An event stored at two offsets of one log fails the run (the idempotent producer
    /// promises that); otherwise duplicates are only counted.
    pub duplicates_fail: bool,
}

/// PASS or FAIL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// No guarantee was violated.
    Pass,
    /// At least one was.
    Fail,
}

/// Where in its log a lost event would have been, relative to what was observed there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LostAt {
    /// Below every observed offset (the start of the log went missing).
    Prefix,
    /// Among observed offsets (a hole).
    Middle,
    /// Above every observed offset (the end went missing).
    Postfix,
}

/// An acknowledged event that no read, delivery or committed dump contains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lost {
    /// The event.
    pub id: String,
    /// The log it was acknowledged in, if the acknowledgement said.
    pub log: Option<LogId>,
    /// The offset it was acknowledged at.
    pub offset: Option<u64>,
    /// Where that is relative to what was observed.
    pub at: LostAt,
}

/// One event at two or more offsets of one log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Duplicate {
    /// The log.
    pub log: LogId,
    /// The event.
    pub id: String,
    /// Its offsets.
    pub offsets: Vec<u64>,
}

/// Two events of one producer and key in the opposite order of their publishing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderViolation {
    /// The log.
    pub log: LogId,
    /// The key.
    pub key: String,
    /// The producer process.
    pub process: u64,
    /// Published first, stored later: (id, offset).
    pub published_first: (String, u64),
    /// Published later, stored earlier: (id, offset).
    pub stored_first: (String, u64),
}

/// One offset of one log holding different events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Divergence {
    /// The log.
    pub log: LogId,
    /// The offset.
    pub offset: u64,
    /// The events seen there (with the node, for replica dumps).
    pub seen: Vec<(Option<u64>, String)>,
}

/// An acknowledged event observed at an offset other than the one acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckMismatch {
    /// The event.
    pub id: String,
    /// The log.
    pub log: LogId,
    /// Offset in the acknowledgement.
    pub acknowledged: u64,
    /// Offsets observed.
    pub observed: Vec<u64>,
}

/// An event that never reached a region it had to reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unreached {
    /// The event.
    pub id: String,
    /// The region.
    pub region: String,
}

/// Counts of everything found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Publishes invoked.
    pub attempted: u64,
    /// Publishes acknowledged.
    pub acknowledged: u64,
    /// Publishes that definitely failed.
    pub failed: u64,
    /// Publishes whose outcome is unknown.
    pub unknown: u64,
    /// Distinct events observed anywhere.
    pub observed: u64,
    /// Acknowledged but never observed.
    pub lost: u64,
    /// ... of which below every observed offset of their log.
    pub lost_prefix: u64,
    /// ... of which among observed offsets.
    pub lost_middle: u64,
    /// ... of which above every observed offset.
    pub lost_postfix: u64,
    /// Observed but never published.
    pub unexpected: u64,
    /// Definitely failed, yet observed.
    pub failed_but_observed: u64,
    /// Outcome unknown, and observed.
    pub recovered: u64,
    /// Events at two or more offsets of one log.
    pub duplicated: u64,
    /// Deliveries of one event to one consumer group (in one region) beyond the first.
    pub redelivered: u64,
    /// Per-key order violations.
    pub order_violations: u64,
    /// Offsets holding different events in different reads.
    pub offset_divergences: u64,
    /// Acknowledged offsets that reads contradict.
    pub ack_mismatches: u64,
    /// Committed offsets where replicas hold different events.
    pub replica_divergences: u64,
    /// (event, region) pairs never reached.
    pub unreached: u64,
}

/// What the checker found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// PASS or FAIL.
    pub verdict: Verdict,
    /// Why it failed, one line per kind of violation.
    pub reasons: Vec<String>,
    /// Everything counted.
    pub counts: Counts,
    /// Lost events.
    pub lost: Vec<Lost>,
    /// Events observed but never published.
    pub unexpected: Vec<String>,
    /// Events that failed definitely but were observed.
    pub failed_but_observed: Vec<String>,
    /// Events stored twice.
    pub duplicated: Vec<Duplicate>,
    /// Order violations.
    pub order_violations: Vec<OrderViolation>,
    /// Offset divergences between reads.
    pub offset_divergences: Vec<Divergence>,
    /// Acknowledged offsets contradicted by reads.
    pub ack_mismatches: Vec<AckMismatch>,
    /// Replica divergences.
    pub replica_divergences: Vec<Divergence>,
    /// Events that never reached a region they had to reach.
    pub unreached: Vec<Unreached>,
    /// Milliseconds from acknowledgement to first observation in each required region:
    /// (p50, max), if any was measured.
    pub forwarding_lag_ms: Option<(u64, u64)>,
}

#[derive(Default)]
struct Publish {
    process: u64,
    key: Option<String>,
    /// Position among this process's publishes.
    seq: usize,
    regions: Vec<String>,
    outcome: Option<OpType>,
    ack: Option<(LogId, u64)>,
    ack_time: u64,
}

fn log_of(op: &Op) -> Option<LogId> {
    Some((op.region.clone(), op.topic.clone(), op.partition?))
}

/// Checks `history`.
pub fn check(history: &History, options: &Options) -> Report {
    // Publishes, by id.
    let mut publishes: HashMap<&str, Publish> = HashMap::new();
    let mut per_process: HashMap<u64, usize> = HashMap::new();
    // Observations from reads and deliveries: log -> offset -> ids; id -> logs/offsets.
    let mut read_at: BTreeMap<LogId, BTreeMap<u64, BTreeSet<&str>>> = BTreeMap::new();
    let mut observed: HashSet<&str> = HashSet::new();
    let mut first_seen_in: HashMap<(&str, &str), u64> = HashMap::new();
    let mut deliveries: HashMap<(&str, &str, &str), u64> = HashMap::new();
    let mut dumps: BTreeMap<LogId, Vec<&Op>> = BTreeMap::new();

    for op in &history.ops {
        match (op.op_type, op.f) {
            (Some(OpType::Dump), _) => {
                if let Some(log) = log_of(op) {
                    dumps.entry(log).or_default().push(op);
                }
            }
            (Some(t), Some(Func::Publish)) => {
                let Some(id) = op.id.as_deref() else { continue };
                let p = publishes.entry(id).or_default();
                match t {
                    OpType::Invoke => {
                        let seq = per_process.entry(op.process).or_default();
                        *p = Publish {
                            process: op.process,
                            key: op.key.clone(),
                            seq: *seq,
                            regions: op.regions.clone(),
                            ..Publish::default()
                        };
                        *seq += 1;
                    }
                    OpType::Ok => {
                        p.outcome = Some(OpType::Ok);
                        p.ack_time = op.time_ms;
                        if let (Some(log), Some(offset)) = (log_of(op), op.offset) {
                            p.ack = Some((log, offset));
                        }
                    }
                    OpType::Fail | OpType::Info => {
                        // A definite failure never overrides an acknowledgement.
                        if p.outcome != Some(OpType::Ok) {
                            p.outcome = Some(t);
                        }
                    }
                    OpType::Dump => {}
                }
            }
            (Some(OpType::Ok), Some(f @ (Func::Read | Func::Deliver))) => {
                let Some(log) = log_of(op) else { continue };
                for e in &op.events {
                    read_at
                        .entry(log.clone())
                        .or_default()
                        .entry(e.offset)
                        .or_default()
                        .insert(&e.id);
                    observed.insert(&e.id);
                    first_seen_in
                        .entry((&e.id, &op.region))
                        .or_insert(op.time_ms);
                    if f == Func::Deliver {
                        let group = op.group.as_deref().unwrap_or("");
                        *deliveries.entry((&op.region, group, &e.id)).or_default() += 1;
                    }
                }
            }
            _ => {}
        }
    }

    let mut report = Report {
        verdict: Verdict::Pass,
        reasons: Vec::new(),
        counts: Counts::default(),
        lost: Vec::new(),
        unexpected: Vec::new(),
        failed_but_observed: Vec::new(),
        duplicated: Vec::new(),
        order_violations: Vec::new(),
        offset_divergences: Vec::new(),
        ack_mismatches: Vec::new(),
        replica_divergences: Vec::new(),
        unreached: Vec::new(),
        forwarding_lag_ms: None,
    };

    // Replicas: committed prefixes must agree; what they hold there counts as observed.
    let mut stored_at: BTreeMap<LogId, BTreeMap<u64, BTreeSet<&str>>> = read_at.clone();
    for (log, replicas) in &dumps {
        let mut at: BTreeMap<u64, Vec<(Option<u64>, &str)>> = BTreeMap::new();
        for dump in replicas {
            let committed = dump.committed.unwrap_or(u64::MAX);
            for e in dump.events.iter().filter(|e| e.offset < committed) {
                at.entry(e.offset).or_default().push((dump.node, &e.id));
                observed.insert(&e.id);
                first_seen_in.entry((&e.id, &log.0)).or_insert(dump.time_ms);
                stored_at
                    .entry(log.clone())
                    .or_default()
                    .entry(e.offset)
                    .or_default()
                    .insert(&e.id);
            }
        }
        for (offset, seen) in at {
            let ids: BTreeSet<&str> = seen.iter().map(|(_, id)| *id).collect();
            if ids.len() > 1 {
                report.replica_divergences.push(Divergence {
                    log: log.clone(),
                    offset,
                    seen: seen.iter().map(|(n, id)| (*n, id.to_string())).collect(),
                });
            }
        }
    }

    // Reads that disagree about an offset.
    for (log, offsets) in &read_at {
        for (offset, ids) in offsets {
            if ids.len() > 1 {
                report.offset_divergences.push(Divergence {
                    log: log.clone(),
                    offset: *offset,
                    seen: ids.iter().map(|id| (None, id.to_string())).collect(),
                });
            }
        }
    }

    // Where each event was stored, per log.
    let mut offsets_of: BTreeMap<(&LogId, &str), Vec<u64>> = BTreeMap::new();
    for (log, offsets) in &stored_at {
        for (offset, ids) in offsets {
            for id in ids {
                offsets_of.entry((log, id)).or_default().push(*offset);
            }
        }
    }
    for ((log, id), offsets) in &offsets_of {
        if offsets.len() > 1 {
            report.duplicated.push(Duplicate {
                log: (*log).clone(),
                id: id.to_string(),
                offsets: offsets.clone(),
            });
        }
    }
    report.counts.redelivered = deliveries.values().map(|n| n - 1).sum();

    // Publishes against observations.
    let mut lags = Vec::new();
    let mut ids: Vec<&&str> = publishes.keys().collect();
    ids.sort();
    for id in ids {
        let p = &publishes[*id];
        report.counts.attempted += 1;
        let seen = observed.contains(*id);
        match p.outcome {
            Some(OpType::Ok) => {
                report.counts.acknowledged += 1;
                if !seen {
                    report.lost.push(lost(id, p, &stored_at));
                }
                if let Some((log, offset)) = &p.ack {
                    if let Some(at) = offsets_of.get(&(log, *id)) {
                        if !at.contains(offset) {
                            report.ack_mismatches.push(AckMismatch {
                                id: id.to_string(),
                                log: log.clone(),
                                acknowledged: *offset,
                                observed: at.clone(),
                            });
                        }
                    }
                }
            }
            Some(OpType::Fail) => {
                report.counts.failed += 1;
                if seen {
                    report.failed_but_observed.push(id.to_string());
                }
            }
            _ => {
                report.counts.unknown += 1;
                if seen {
                    report.counts.recovered += 1;
                }
            }
        }
        if p.outcome == Some(OpType::Ok) {
            for region in &p.regions {
                match first_seen_in.get(&(*id, region.as_str())) {
                    Some(t) => lags.push(t.saturating_sub(p.ack_time)),
                    None => report.unreached.push(Unreached {
                        id: id.to_string(),
                        region: region.clone(),
                    }),
                }
            }
        }
    }
    let mut unexpected: Vec<&str> = observed
        .iter()
        .filter(|id| !publishes.contains_key(*id))
        .copied()
        .collect();
    unexpected.sort_unstable();
    report.unexpected = unexpected.into_iter().map(String::from).collect();
    if !lags.is_empty() {
        lags.sort_unstable();
        report.forwarding_lag_ms = Some((lags[lags.len() / 2], lags[lags.len() - 1]));
    }

    // Per key and producer, storage order must follow publishing order.
    for (log, offsets) in &stored_at {
        // (process, key) -> last (seq, id, offset) seen walking up the log.
        let mut last: HashMap<(u64, &str), (usize, &str, u64)> = HashMap::new();
        for (offset, ids) in offsets {
            for id in ids {
                let Some(p) = publishes.get(id) else { continue };
                let Some(key) = p.key.as_deref() else {
                    continue;
                };
                if offsets_of[&(log, *id)].first() != Some(offset) {
                    continue; // judge a duplicated event by its first copy
                }
                let slot = (p.process, key);
                if let Some((seq, prev_id, prev_offset)) = last.get(&slot) {
                    if *seq > p.seq {
                        report.order_violations.push(OrderViolation {
                            log: log.clone(),
                            key: key.to_string(),
                            process: p.process,
                            published_first: (id.to_string(), *offset),
                            stored_first: (prev_id.to_string(), *prev_offset),
                        });
                    }
                }
                last.insert(slot, (p.seq, id, *offset));
            }
        }
    }

    let c = &mut report.counts;
    c.observed = observed.len() as u64;
    c.lost = report.lost.len() as u64;
    for l in &report.lost {
        match l.at {
            LostAt::Prefix => c.lost_prefix += 1,
            LostAt::Middle => c.lost_middle += 1,
            LostAt::Postfix => c.lost_postfix += 1,
        }
    }
    c.unexpected = report.unexpected.len() as u64;
    c.failed_but_observed = report.failed_but_observed.len() as u64;
    c.duplicated = report.duplicated.len() as u64;
    c.order_violations = report.order_violations.len() as u64;
    c.offset_divergences = report.offset_divergences.len() as u64;
    c.ack_mismatches = report.ack_mismatches.len() as u64;
    c.replica_divergences = report.replica_divergences.len() as u64;
    c.unreached = report.unreached.len() as u64;

    let failing = [
        (c.lost, "acknowledged events lost"),
        (c.unexpected, "events observed that were never published"),
        (
            c.failed_but_observed,
            "events observed after a definite failure",
        ),
        (c.order_violations, "per-key order violations"),
        (c.offset_divergences, "offsets read with different events"),
        (
            c.ack_mismatches,
            "acknowledged offsets contradicted by reads",
        ),
        (
            c.replica_divergences,
            "committed offsets where replicas differ",
        ),
        (
            c.unreached,
            "events that never reached a region they had to",
        ),
        (
            if options.duplicates_fail {
                c.duplicated
            } else {
                0
            },
            "events stored at two offsets of one log",
        ),
    ];
    for (n, what) in failing {
        if n > 0 {
            report.reasons.push(format!("{n} {what}"));
        }
    }
    if !report.reasons.is_empty() {
        report.verdict = Verdict::Fail;
    }
    report
}

fn lost(id: &str, p: &Publish, stored_at: &BTreeMap<LogId, BTreeMap<u64, BTreeSet<&str>>>) -> Lost {
    let (log, offset) = match &p.ack {
        Some((log, offset)) => (Some(log.clone()), Some(*offset)),
        None => (None, None),
    };
    let range = log
        .as_ref()
        .and_then(|l| stored_at.get(l))
        .and_then(|o| Some((*o.keys().next()?, *o.keys().next_back()?)));
    let at = match (offset, range) {
        (Some(o), Some((low, _))) if o < low => LostAt::Prefix,
        (Some(o), Some((_, high))) if o > high => LostAt::Postfix,
        (Some(_), None) => LostAt::Postfix,
        _ => LostAt::Middle,
    };
    Lost {
        id: id.to_string(),
        log,
        offset,
        at,
    }
}
