//! The analysis: from a [`History`] to a [`Report`], trusting nothing the system under test
//! says about itself beyond what the history records.
//!
//! Survival is judged from final reads alone: an acknowledged event is lost when its origin
//! log's final read does not hold it at its acknowledged offset, whatever a mid-run read, a
//! consumer, a replica or another region saw; it is unreached when a region it had to reach
//! holds it in no final read of its topic. An observation timed before the publish was
//! invoked proves nothing and is itself a violation. Logs are dense (one event per offset),
//! so a final read must hold every offset from `low` to `high`; without retention `low` is 0.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::history::{Func, History, Op, OpType};
use crate::report::{
    AckMismatch, Divergence, Duplicate, GroupGap, LogId, Lost, LostAt, OrderViolation, Premature,
    ReplicaBehind, Report, Unreached, Verdict,
};

/// What makes the verdict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// An event stored at two offsets of one log fails the run (the idempotent producer
    /// promises that); otherwise duplicates are only counted.
    pub duplicates_fail: bool,
    /// Logs may have a retention limit: a final read may start above offset 0, and
    /// acknowledged events below it are counted as expired instead of lost.
    pub retention: bool,
    /// Fewer acknowledged publishes than this in any origin region fails the run.
    pub min_acknowledged_per_region: u64,
    /// A fault during which fewer publishes than this were in flight (invoked before it
    /// healed, and not completed before it began) fails the run.
    pub min_publishes_per_fault: u64,
}

struct Publish<'h> {
    process: u64,
    key: Option<&'h str>,
    /// The edge channel a notification goes to (its key when not given).
    channel: Option<&'h str>,
    /// Position among this process's publishes.
    seq: usize,
    origin: &'h str,
    topic: &'h str,
    regions: &'h [String],
    invoked_ms: u64,
    outcome: Option<OpType>,
    /// When it completed (ok, fail or info).
    done_ms: Option<u64>,
    ack: Option<(LogId, u64)>,
    /// The log of an acknowledgement that came without an offset.
    ack_log: Option<LogId>,
    ack_ms: u64,
}

/// A log's final read: offset -> id, dense from `low` to `high`.
struct FinalRead<'h> {
    line: usize,
    time_ms: u64,
    low: u64,
    high: u64,
    partitions: u32,
    at: BTreeMap<u64, &'h str>,
}

/// Everything observed outside final reads: (log, offset, id, time, line, group).
struct Sighting<'h> {
    log: LogId,
    offset: u64,
    id: &'h str,
    time_ms: u64,
    line: usize,
}

/// Where one event is stored in a region's topic: (partition, offset) pairs.
type Copies = Vec<(u32, u64)>;

/// A consumer group: (region, topic, group).
type GroupOf<'h> = (&'h str, &'h str, &'h str);

/// One event handed to a consumer group: when, on which history line, by which (region,
/// topic, group), from where.
struct TimedDelivery<'h> {
    time_ms: u64,
    line: usize,
    group: GroupOf<'h>,
    log: LogId,
    offset: u64,
    id: &'h str,
}

fn log_of(op: &Op) -> Option<LogId> {
    Some((op.region.clone(), op.topic.clone(), op.partition?))
}

/// Checks `history`.
pub fn check(history: &History, options: &Options) -> Report {
    let mut report = Report::empty();
    let mut publishes: HashMap<&str, Publish> = HashMap::new();
    let mut per_process: HashMap<u64, usize> = HashMap::new();
    let mut finals: BTreeMap<LogId, FinalRead> = BTreeMap::new();
    let mut sightings: Vec<Sighting> = Vec::new();
    // (region, group, topic, partition) -> offsets delivered, with how often.
    let mut deliveries: BTreeMap<(LogId, &str), BTreeMap<u64, u64>> = BTreeMap::new();
    let mut delivered_ids: HashMap<(&str, &str, &str), u64> = HashMap::new();
    let mut dumps: BTreeMap<LogId, Vec<&Op>> = BTreeMap::new();
    let mut faults: Vec<&Op> = Vec::new();
    // (parent's log, child's log, seal).
    let mut splits: Vec<(LogId, LogId, u64)> = Vec::new();
    // First deliveries per (region, group), in the order recorded: (log, offset, id).
    let mut timed_deliveries: Vec<TimedDelivery> = Vec::new();

    for (op, &line) in history.ops.iter().zip(&history.lines) {
        match (op.op_type, op.f) {
            (Some(OpType::Dump), _) => {
                if let Some(log) = log_of(op) {
                    dumps.entry(log).or_default().push(op);
                }
            }
            (Some(OpType::Fault), _) => faults.push(op),
            (Some(OpType::Ok), Some(Func::Split)) => {
                if let (Some(child), Some(parent), Some(seal)) = (log_of(op), op.parent, op.offset)
                {
                    let parent = (op.region.clone(), op.topic.clone(), parent);
                    splits.push((parent, child, seal));
                }
            }
            (Some(t), Some(Func::Publish)) => {
                let Some(id) = op.id.as_deref() else { continue };
                if t == OpType::Invoke {
                    let seq = per_process.entry(op.process).or_default();
                    publishes.insert(
                        id,
                        Publish {
                            process: op.process,
                            key: op.key.as_deref(),
                            channel: op.channel.as_deref(),
                            seq: *seq,
                            origin: &op.region,
                            topic: &op.topic,
                            regions: &op.regions,
                            invoked_ms: op.time_ms,
                            outcome: None,
                            done_ms: None,
                            ack: None,
                            ack_log: None,
                            ack_ms: 0,
                        },
                    );
                    *seq += 1;
                } else if let Some(p) = publishes.get_mut(id) {
                    p.outcome = Some(t);
                    p.done_ms = Some(op.time_ms);
                    if t == OpType::Ok {
                        p.ack_ms = op.time_ms;
                        if p.origin.is_empty() {
                            p.origin = &op.region;
                        }
                        match (log_of(op), op.offset) {
                            (Some(log), Some(offset)) => p.ack = Some((log, offset)),
                            (log, None) => p.ack_log = log,
                            (None, Some(_)) => {}
                        }
                    }
                }
            }
            (Some(OpType::Ok), Some(Func::Read)) if op.is_final => {
                let Some(log) = log_of(op) else { continue };
                finals.insert(
                    log,
                    FinalRead {
                        line,
                        time_ms: op.time_ms,
                        low: op.low.unwrap_or(0),
                        high: op.high.unwrap_or(0),
                        partitions: op.partitions.unwrap_or(0),
                        at: op
                            .events
                            .iter()
                            .map(|e| (e.offset, e.id.as_str()))
                            .collect(),
                    },
                );
                report.counts.final_read_events += op.events.len() as u64;
            }
            (Some(OpType::Ok), Some(f @ (Func::Read | Func::Deliver))) => {
                let Some(log) = log_of(op) else { continue };
                for e in &op.events {
                    sightings.push(Sighting {
                        log: log.clone(),
                        offset: e.offset,
                        id: &e.id,
                        time_ms: op.time_ms,
                        line,
                    });
                    if f == Func::Deliver {
                        let group = op.group.as_deref().unwrap_or("");
                        *deliveries
                            .entry((log.clone(), group))
                            .or_default()
                            .entry(e.offset)
                            .or_default() += 1;
                        *delivered_ids.entry((&op.region, group, &e.id)).or_default() += 1;
                        timed_deliveries.push(TimedDelivery {
                            time_ms: op.time_ms,
                            line,
                            group: (&op.region, &op.topic, group),
                            log: log.clone(),
                            offset: e.offset,
                            id: &e.id,
                        });
                    }
                }
            }
            _ => {}
        }
    }
    report.counts.final_reads = finals.len() as u64;
    report.counts.dumps = dumps.values().map(|d| d.len() as u64).sum();
    report.counts.faults = faults.len() as u64;

    check_final_reads(&finals, options, &mut report);
    let ids_in_final = ids_by_region_topic(&finals);

    // Sightings: before their invoke they prove nothing and are violations; they must agree
    // with the final read of their log.
    let mut observed: HashSet<&str> = HashSet::new();
    let mut first_seen_in: HashMap<(&str, &str), u64> = HashMap::new();
    let mut seen_at: BTreeMap<(&LogId, u64), BTreeSet<&str>> = BTreeMap::new();
    for s in &sightings {
        if let Some(p) = publishes.get(s.id) {
            if s.time_ms < p.invoked_ms {
                report.premature.push(Premature {
                    id: s.id.to_string(),
                    line: s.line,
                    observed_ms: s.time_ms,
                    invoked_ms: p.invoked_ms,
                });
                continue;
            }
        }
        observed.insert(s.id);
        let first = first_seen_in.entry((s.id, &s.log.0)).or_insert(s.time_ms);
        *first = (*first).min(s.time_ms);
        seen_at.entry((&s.log, s.offset)).or_default().insert(s.id);
    }
    for ((log, offset), ids) in &seen_at {
        let in_final = finals.get(*log).map(|f| f.at.get(offset).copied());
        let mut all: BTreeSet<&str> = ids.clone();
        let absent = match in_final {
            Some(Some(id)) => {
                all.insert(id);
                false
            }
            // The final read holds nothing there: fine below a retained start, else the
            // log lost what was seen.
            Some(None) => finals[*log].low <= *offset,
            None => false,
        };
        if all.len() > 1 || absent {
            let mut seen: Vec<(Option<u64>, String)> =
                all.iter().map(|id| (None, id.to_string())).collect();
            if absent {
                seen.push((None, "<absent>".to_string()));
            }
            report.offset_divergences.push(Divergence {
                log: (*log).clone(),
                offset: *offset,
                seen,
            });
        }
    }
    for (log, f) in &finals {
        for id in f.at.values() {
            observed.insert(id);
            let first = first_seen_in.entry((id, &log.0)).or_insert(f.time_ms);
            *first = (*first).min(f.time_ms);
        }
    }

    check_dumps(&dumps, &finals, &mut observed, &mut report);
    check_groups(&deliveries, &finals, &publishes, &mut report);
    report.counts.redelivered = delivered_ids.values().map(|n| n - 1).sum();

    // Where each event is stored, per log (final reads only: they are the logs).
    let mut offsets_of: BTreeMap<(&LogId, &str), Vec<u64>> = BTreeMap::new();
    for (log, f) in &finals {
        for (offset, id) in &f.at {
            offsets_of.entry((log, id)).or_default().push(*offset);
        }
    }
    // An event once per region: at one offset of one partition of its topic.
    let mut copies_of: BTreeMap<(&str, &str, &str), Copies> = BTreeMap::new();
    for ((log, id), offsets) in &offsets_of {
        let copies = copies_of.entry((&log.0, &log.1, id)).or_default();
        copies.extend(offsets.iter().map(|o| (log.2, *o)));
    }
    for ((region, topic, id), copies) in copies_of {
        if copies.len() > 1 {
            report.duplicated.push(Duplicate {
                region: region.to_string(),
                topic: topic.to_string(),
                id: id.to_string(),
                copies,
            });
        }
    }

    // Every origin region is floored, also one with nothing acknowledged.
    for p in publishes.values() {
        report
            .acknowledged_by_region
            .entry(p.origin.to_string())
            .or_default();
    }

    // Publishes against final reads.
    let mut lags = Vec::new();
    let mut ids: Vec<&&str> = publishes.keys().collect();
    ids.sort();
    for id in ids {
        let p = &publishes[*id];
        report.counts.attempted += 1;
        let at_origin = ids_in_final
            .get(&(p.origin, p.topic))
            .is_some_and(|ids| ids.contains(*id));
        match p.outcome {
            Some(OpType::Ok) => {
                report.counts.acknowledged += 1;
                *report
                    .acknowledged_by_region
                    .entry(p.origin.to_string())
                    .or_default() += 1;
                if let Some((log, offset)) = &p.ack {
                    judge_ack(
                        id,
                        p,
                        log,
                        *offset,
                        &finals,
                        &offsets_of,
                        options,
                        &mut report,
                    );
                } else if let Some(log) = &p.ack_log {
                    judge_unplaced_ack(id, p, log, &finals, &offsets_of, options, &mut report);
                }
            }
            Some(OpType::Fail) => {
                report.counts.failed += 1;
                if observed.contains(*id) {
                    report.failed_but_observed.push(id.to_string());
                }
            }
            _ => {
                report.counts.unknown += 1;
                if at_origin {
                    report.counts.recovered += 1;
                }
            }
        }
        // Held by the origin (acknowledged, or found there): every required region must hold it.
        if p.outcome == Some(OpType::Ok) || at_origin {
            for region in p.regions {
                match region_holds(&finals, &ids_in_final, region, p.topic, id) {
                    Ok(true) => {
                        if let (Some(OpType::Ok), Some(t)) =
                            (p.outcome, first_seen_in.get(&(*id, region.as_str())))
                        {
                            lags.push(t.saturating_sub(p.ack_ms));
                        }
                    }
                    Ok(false) => report.unreached.push(Unreached {
                        id: id.to_string(),
                        region: region.clone(),
                    }),
                    Err(why) => report.unjudged.push(why),
                }
            }
        }
        // Of unknown outcome, elsewhere but not at its origin: the origin lost an event it had
        // forwarded (acknowledged ones are judged as lost above).
        if !at_origin && p.outcome.is_none_or(|o| o == OpType::Info) {
            let origin_judgeable =
                region_holds(&finals, &ids_in_final, p.origin, p.topic, id).is_ok();
            let elsewhere = ids_in_final.iter().any(|((region, topic), ids)| {
                *region != p.origin && *topic == p.topic && ids.contains(*id)
            });
            let retained_from_start = finals
                .iter()
                .filter(|(log, _)| log.0 == p.origin && log.1 == p.topic)
                .all(|(_, f)| f.low == 0);
            if elsewhere && origin_judgeable && retained_from_start {
                report.vanished_at_origin.push(id.to_string());
            }
        }
    }
    report.unjudged.sort();
    report.unjudged.dedup();
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

    // Notifications: acknowledged publishes keyed by their channel, for its subscribers.
    let acked: crate::notify::Wanted = publishes
        .iter()
        .filter(|(_, p)| p.outcome == Some(OpType::Ok))
        .filter_map(|(id, p)| Some((*id, (p.origin, p.topic, p.channel.or(p.key)?))))
        .collect();
    let notified = crate::notify::check(history, &acked);
    report.counts.notified = notified.delivered;
    report.counts.notify_breaks = notified.breaks;
    for id in &notified.ids {
        if !publishes.contains_key(id.as_str()) {
            report.unexpected.push(id.clone());
        }
    }
    report.unexpected.sort();
    report.unexpected.dedup();
    report.notify_skips = notified.skips;
    report.notify_reused = notified.reused;
    report.notify_undelivered = notified.undelivered;

    check_order(&finals, &offsets_of, &publishes, &mut report);
    check_split_order(&finals, &splits, &publishes, &mut report);
    check_group_order(timed_deliveries, &publishes, &mut report);
    check_floors(&faults, &publishes, options, &mut report);
    finish(&mut report, options, observed.len() as u64);
    report
}

/// Each final read must hold every offset of its range, start at 0 without retention, and
/// every partition of a (region, topic) must have one.
fn check_final_reads(finals: &BTreeMap<LogId, FinalRead>, options: &Options, report: &mut Report) {
    let mut partitions: BTreeMap<(&str, &str), (u32, BTreeSet<u32>)> = BTreeMap::new();
    for (log, f) in finals {
        let holes: Vec<u64> = (f.low..f.high).filter(|o| !f.at.contains_key(o)).collect();
        if let Some(first) = holes.first() {
            report.unjudged.push(format!(
                "final read of {} (line {}) misses {} offsets of {}..{}, first {first}",
                name(log),
                f.line,
                holes.len(),
                f.low,
                f.high
            ));
        }
        if f.low > 0 && !options.retention {
            report.unjudged.push(format!(
                "final read of {} (line {}) starts at {} but the run has no retention",
                name(log),
                f.line,
                f.low
            ));
        }
        let entry = partitions
            .entry((&log.0, &log.1))
            .or_insert((f.partitions, BTreeSet::new()));
        if entry.0 != f.partitions {
            report.unjudged.push(format!(
                "final reads of topic {} in region {:?} disagree on its partition count",
                log.1, log.0
            ));
        }
        entry.1.insert(log.2);
    }
    for ((region, topic), (n, have)) in partitions {
        let missing: Vec<u32> = (0..n).filter(|p| !have.contains(p)).collect();
        if !missing.is_empty() {
            report.unjudged.push(format!(
                "topic {topic} in region {region:?} has no final read of partitions {missing:?}"
            ));
        }
    }
}

/// (region, topic) -> ids in its final reads.
fn ids_by_region_topic<'h>(
    finals: &'h BTreeMap<LogId, FinalRead<'h>>,
) -> HashMap<(&'h str, &'h str), HashSet<&'h str>> {
    let mut out: HashMap<(&str, &str), HashSet<&str>> = HashMap::new();
    for (log, f) in finals {
        out.entry((&log.0, &log.1))
            .or_default()
            .extend(f.at.values().copied());
    }
    out
}

/// Whether `region`'s final reads of `topic` hold `id`; an error says why they cannot tell.
fn region_holds(
    finals: &BTreeMap<LogId, FinalRead>,
    ids: &HashMap<(&str, &str), HashSet<&str>>,
    region: &str,
    topic: &str,
    id: &str,
) -> Result<bool, String> {
    let reads: Vec<&FinalRead> = finals
        .iter()
        .filter(|(log, _)| log.0 == region && log.1 == topic)
        .map(|(_, f)| f)
        .collect();
    let Some(first) = reads.first() else {
        return Err(format!(
            "no final read of topic {topic} in region {region:?}"
        ));
    };
    if reads.len() < first.partitions as usize {
        return Err(format!(
            "final reads of topic {topic} in region {region:?} cover {} of {} partitions",
            reads.len(),
            first.partitions
        ));
    }
    Ok(ids
        .get(&(region, topic))
        .is_some_and(|ids| ids.contains(id)))
}

fn name(log: &LogId) -> String {
    if log.0.is_empty() {
        format!("{}/{}", log.1, log.2)
    } else {
        format!("{}/{}/{}", log.0, log.1, log.2)
    }
}

/// The final read that judges `p`'s acknowledgement in `log`, or why there is none (unjudged).
fn final_read_for<'f, 'h>(
    p: &Publish,
    log: &LogId,
    finals: &'f BTreeMap<LogId, FinalRead<'h>>,
    report: &mut Report,
) -> Option<&'f FinalRead<'h>> {
    let Some(f) = finals.get(log) else {
        report.unjudged.push(format!(
            "acknowledged writes in {} but no final read of it",
            name(log)
        ));
        return None;
    };
    if f.time_ms < p.ack_ms {
        report.unjudged.push(format!(
            "the final read of {} (line {}) was made before acknowledgements it should judge",
            name(log),
            f.line
        ));
        return None;
    }
    Some(f)
}

/// An event acknowledged without an offset must be somewhere in its origin log's final read.
fn judge_unplaced_ack(
    id: &str,
    p: &Publish,
    log: &LogId,
    finals: &BTreeMap<LogId, FinalRead>,
    offsets_of: &BTreeMap<(&LogId, &str), Vec<u64>>,
    options: &Options,
    report: &mut Report,
) {
    let Some(f) = final_read_for(p, log, finals, report) else {
        return;
    };
    if offsets_of.get(&(log, id)).is_some_and(|o| !o.is_empty()) {
        return;
    }
    if options.retention && f.low > 0 {
        // It may have been trimmed: without its offset that cannot be told from a loss.
        report.unjudged.push(format!(
            "{id}: acknowledged without an offset, not in the final read of {}, which retention trimmed",
            name(log)
        ));
        return;
    }
    report.lost.push(Lost {
        id: id.to_string(),
        log: log.clone(),
        offset: f.high,
        at: LostAt::Unplaced,
        found_instead: None,
    });
}

/// An acknowledged event must be in its origin log's final read at its acknowledged offset.
#[allow(clippy::too_many_arguments)]
fn judge_ack(
    id: &str,
    p: &Publish,
    log: &LogId,
    offset: u64,
    finals: &BTreeMap<LogId, FinalRead>,
    offsets_of: &BTreeMap<(&LogId, &str), Vec<u64>>,
    options: &Options,
    report: &mut Report,
) {
    let Some(f) = final_read_for(p, log, finals, report) else {
        return;
    };
    if offset < f.low && options.retention {
        report.counts.expired += 1;
        return;
    }
    match f.at.get(&offset) {
        Some(held) if *held == id => {}
        held => {
            let elsewhere = offsets_of.get(&(log, id)).cloned().unwrap_or_default();
            if elsewhere.is_empty() {
                report.lost.push(Lost {
                    id: id.to_string(),
                    log: log.clone(),
                    offset,
                    at: if offset >= f.high {
                        LostAt::Postfix
                    } else {
                        LostAt::Middle
                    },
                    found_instead: held.map(|h| h.to_string()),
                });
            } else {
                report.ack_mismatches.push(AckMismatch {
                    id: id.to_string(),
                    log: log.clone(),
                    acknowledged: offset,
                    observed: elsewhere,
                });
            }
        }
    }
}

/// Each replica must hold its log's final read, up to its high watermark, and replicas must
/// agree with it and with each other wherever they have committed.
fn check_dumps<'h>(
    dumps: &BTreeMap<LogId, Vec<&'h Op>>,
    finals: &BTreeMap<LogId, FinalRead<'h>>,
    observed: &mut HashSet<&'h str>,
    report: &mut Report,
) {
    for (log, replicas) in dumps {
        let f = finals.get(log);
        if f.is_none() {
            report.unjudged.push(format!(
                "replica dumps of {} but no final read of it",
                name(log)
            ));
        }
        let mut at: BTreeMap<u64, Vec<(Option<u64>, &str)>> = BTreeMap::new();
        for dump in replicas {
            let committed = dump.committed.unwrap_or(0);
            let held: BTreeMap<u64, &str> = dump
                .events
                .iter()
                .filter(|e| e.offset < committed)
                .map(|e| (e.offset, e.id.as_str()))
                .collect();
            report.counts.dumped_events += held.len() as u64;
            for (offset, id) in &held {
                at.entry(*offset).or_default().push((dump.node, id));
                observed.insert(id);
            }
            if let Some(f) = f {
                let from = held.keys().next().copied().unwrap_or(committed);
                let dense = (from..committed).all(|o| held.contains_key(&o));
                if (f.low < f.high && (from > f.low || committed < f.high)) || !dense {
                    report.replicas_behind.push(ReplicaBehind {
                        log: log.clone(),
                        node: dump.node.unwrap_or(0),
                        holds: (from, committed),
                        wanted: (f.low, f.high),
                    });
                }
            }
        }
        for (offset, mut seen) in at {
            // A replica committed an offset the final read does not hold: the log lost it.
            let mut absent = false;
            if let Some(f) = f {
                match f.at.get(&offset) {
                    Some(id) => seen.push((None, id)),
                    None => absent = offset >= f.low,
                }
            }
            if absent {
                seen.push((None, "<absent>"));
            }
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
}

/// A consumer group reads each partition from the log's start: every offset from the
/// final read's `low` (or the first delivered one, without a final read) up to the highest
/// delivered must have been delivered at least once. And a group reading a region's topic
/// must get past every publish acknowledged in that region (its readers outlast its
/// producers), in every partition: a reader that never started or stalled is a gap up to
/// there.
fn check_groups(
    deliveries: &BTreeMap<(LogId, &str), BTreeMap<u64, u64>>,
    finals: &BTreeMap<LogId, FinalRead>,
    publishes: &HashMap<&str, Publish>,
    report: &mut Report,
) {
    // Past the last acknowledged offset of each log.
    let mut acked_end: BTreeMap<&LogId, u64> = BTreeMap::new();
    for p in publishes.values() {
        if let (Some(OpType::Ok), Some((log, offset))) = (p.outcome, &p.ack) {
            let end = acked_end.entry(log).or_default();
            *end = (*end).max(offset + 1);
        }
    }
    // Every group seen reading a (region, topic) is held to each of its partitions.
    let mut wanted: BTreeSet<(LogId, &str)> = deliveries.keys().cloned().collect();
    for (log, group) in deliveries.keys() {
        for (other, _) in finals.iter().filter(|(l, _)| l.0 == log.0 && l.1 == log.1) {
            wanted.insert((other.clone(), *group));
        }
    }
    let none = BTreeMap::new();
    for key in &wanted {
        let (log, group) = key;
        let offsets = deliveries.get(key).unwrap_or(&none);
        let low = finals.get(log).map(|f| f.low);
        let start = match (offsets.keys().next(), low) {
            (Some(first), Some(low)) => low.min(*first),
            (Some(first), None) => *first,
            (None, Some(low)) => low,
            (None, None) => continue,
        };
        let delivered_end = offsets.keys().next_back().map_or(start, |o| o + 1);
        let end = delivered_end.max(acked_end.get(log).copied().unwrap_or(0));
        let mut skipped = Vec::new();
        let mut gap_from = None;
        for o in start..delivered_end {
            match (offsets.contains_key(&o), gap_from) {
                (false, None) => gap_from = Some(o),
                (true, Some(from)) => {
                    skipped.push((from, o));
                    gap_from = None;
                }
                _ => {}
            }
        }
        let unreached = (delivered_end < end).then_some((delivered_end, end));
        if !skipped.is_empty() || unreached.is_some() {
            report.group_gaps.push(GroupGap {
                log: log.clone(),
                group: group.to_string(),
                skipped,
                unreached,
            });
        }
    }
}

/// Per key and producer, storage order must follow publishing order, in every final read.
fn check_order(
    finals: &BTreeMap<LogId, FinalRead>,
    offsets_of: &BTreeMap<(&LogId, &str), Vec<u64>>,
    publishes: &HashMap<&str, Publish>,
    report: &mut Report,
) {
    for (log, f) in finals {
        // (process, key) -> last (seq, id, offset) seen walking up the log.
        let mut last: HashMap<(u64, &str), (usize, &str, u64)> = HashMap::new();
        for (offset, id) in &f.at {
            let Some(p) = publishes.get(id) else { continue };
            let Some(key) = p.key else { continue };
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

/// Per key and producer across a split: the parent holds the key's events only below the
/// seal, and they were all published before the child's (read in that order, the parent up to
/// the seal then the child, a key's events come in publishing order). A violation names the
/// child's log, the key's first event there, and the parent's event out of place. Keys are
/// judged per split: a key that skipped a generation (grandparent to grandchild with no event
/// in between) is judged only where it has events on both sides of a split.
fn check_split_order(
    finals: &BTreeMap<LogId, FinalRead>,
    splits: &[(LogId, LogId, u64)],
    publishes: &HashMap<&str, Publish>,
    report: &mut Report,
) {
    for (parent, child, seal) in splits {
        let (Some(in_parent), Some(in_child)) = (finals.get(parent), finals.get(child)) else {
            continue;
        };
        // (process, key) -> the first of its events in the child: (seq, id, offset). An event
        // also in the parent is a duplicate, counted as such, not judged here.
        let in_parent_ids: HashSet<&str> = in_parent.at.values().copied().collect();
        let mut first_in_child: HashMap<(u64, &str), (usize, &str, u64)> = HashMap::new();
        for (offset, id) in &in_child.at {
            if in_parent_ids.contains(id) {
                continue;
            }
            let Some(p) = publishes.get(id) else { continue };
            let Some(key) = p.key else { continue };
            let slot = first_in_child
                .entry((p.process, key))
                .or_insert((p.seq, id, *offset));
            if p.seq < slot.0 {
                *slot = (p.seq, id, *offset);
            }
        }
        for (offset, id) in &in_parent.at {
            let Some(p) = publishes.get(id) else { continue };
            let Some(key) = p.key else { continue };
            let Some((seq, child_id, child_offset)) = first_in_child.get(&(p.process, key)) else {
                continue;
            };
            // A key that went to the child: in the parent only below the seal, and only
            // what was published before the child's first.
            if *offset >= *seal || p.seq > *seq {
                report.order_violations.push(OrderViolation {
                    log: child.clone(),
                    key: key.to_string(),
                    process: p.process,
                    published_first: (child_id.to_string(), *child_offset),
                    stored_first: (id.to_string(), *offset),
                });
            }
        }
    }
}

/// Per key and producer, a consumer group hands events out for the first time in publishing
/// order, across its partitions too (a split's child only after the parent up to the seal);
/// handing one out again later is no reordering. Judged by time (members write their own
/// lines): an event published earlier whose first delivery is strictly later than a later
/// one's first delivery is a violation.
fn check_group_order(
    mut deliveries: Vec<TimedDelivery>,
    publishes: &HashMap<&str, Publish>,
    report: &mut Report,
) {
    deliveries.sort_by_key(|d| (d.time_ms, d.line));
    let mut first: HashSet<(&GroupOf, &str)> = HashSet::new();
    // (group, process, key) -> the latest-published event handed out so far.
    let mut last: HashMap<(&GroupOf, u64, &str), &TimedDelivery> = HashMap::new();
    for d in &deliveries {
        if !first.insert((&d.group, d.id)) {
            continue;
        }
        let Some(p) = publishes.get(d.id) else {
            continue;
        };
        let Some(key) = p.key else { continue };
        let slot = (&d.group, p.process, key);
        let later = last
            .get(&slot)
            .filter(|prev| publishes.get(prev.id).is_some_and(|q| q.seq > p.seq));
        match later {
            Some(prev) if prev.time_ms < d.time_ms => {
                report.order_violations.push(OrderViolation {
                    log: d.log.clone(),
                    key: key.to_string(),
                    process: p.process,
                    published_first: (d.id.to_string(), d.offset),
                    stored_first: (
                        format!("{} (delivered first, from {})", prev.id, name(&prev.log)),
                        prev.offset,
                    ),
                });
            }
            // Handed out in the same millisecond: no order to judge.
            Some(_) => {}
            None => {
                last.insert(slot, d);
            }
        }
    }
}

/// A run proves little with few acknowledged writes, or with faults nobody was publishing
/// through (a publish overlaps a fault when it was in flight while the fault held).
fn check_floors(
    faults: &[&Op],
    publishes: &HashMap<&str, Publish>,
    options: &Options,
    report: &mut Report,
) {
    for (region, n) in &report.acknowledged_by_region {
        if *n < options.min_acknowledged_per_region {
            report.below_floor.push(format!(
                "region {region:?}: {n} publishes acknowledged, the floor is {}",
                options.min_acknowledged_per_region
            ));
        }
    }
    if options.min_acknowledged_per_region > 0 && report.acknowledged_by_region.is_empty() {
        report
            .below_floor
            .push("no publish was invoked anywhere".to_string());
    }
    for fault in faults {
        let (start, end) = (fault.time_ms, fault.end_ms.unwrap_or(fault.time_ms));
        let during = publishes
            .values()
            .filter(|p| p.invoked_ms <= end && p.done_ms.is_none_or(|done| done >= start))
            .count() as u64;
        let kind = fault.kind.clone().unwrap_or_default();
        if during < options.min_publishes_per_fault {
            report.below_floor.push(format!(
                "fault {kind} at {start}..{end} ms: {during} publishes in flight while it held, the floor is {}",
                options.min_publishes_per_fault
            ));
        }
        report.faults.push((kind, start, end, during));
    }
}

fn finish(report: &mut Report, options: &Options, observed: u64) {
    let c = &mut report.counts;
    c.observed = observed;
    c.lost = report.lost.len() as u64;
    for l in &report.lost {
        match l.at {
            LostAt::Middle => c.lost_middle += 1,
            LostAt::Postfix => c.lost_postfix += 1,
            LostAt::Unplaced => c.lost_unplaced += 1,
        }
    }
    c.unexpected = report.unexpected.len() as u64;
    c.premature = report.premature.len() as u64;
    c.failed_but_observed = report.failed_but_observed.len() as u64;
    c.duplicated = report.duplicated.len() as u64;
    c.group_gaps = report
        .group_gaps
        .iter()
        .filter(|g| !g.skipped.is_empty())
        .count() as u64;
    c.group_unfinished = report
        .group_gaps
        .iter()
        .filter(|g| g.unreached.is_some())
        .count() as u64;
    c.order_violations = report.order_violations.len() as u64;
    c.offset_divergences = report.offset_divergences.len() as u64;
    c.ack_mismatches = report.ack_mismatches.len() as u64;
    c.replica_divergences = report.replica_divergences.len() as u64;
    c.replicas_behind = report.replicas_behind.len() as u64;
    c.unreached = report.unreached.len() as u64;
    c.vanished_at_origin = report.vanished_at_origin.len() as u64;
    c.unjudged = report.unjudged.len() as u64;
    c.below_floor = report.below_floor.len() as u64;
    c.notify_skips = report.notify_skips.len() as u64;
    c.notify_reused = report.notify_reused.len() as u64;
    c.notify_undelivered = report.notify_undelivered.len() as u64;

    let failing = [
        (c.lost, "acknowledged events lost"),
        (c.unexpected, "events observed that were never published"),
        (c.premature, "observations before their publish was invoked"),
        (
            c.failed_but_observed,
            "events observed after a definite failure",
        ),
        (
            c.group_gaps,
            "consumer group partitions with skipped offsets",
        ),
        (
            c.group_unfinished,
            "consumer group partitions not read up to the last acknowledged offset",
        ),
        (c.order_violations, "per-key order violations"),
        (
            c.offset_divergences,
            "offsets observed with events the final read does not hold there",
        ),
        (
            c.ack_mismatches,
            "acknowledged offsets contradicted by final reads",
        ),
        (
            c.replica_divergences,
            "committed offsets where replicas differ",
        ),
        (c.replicas_behind, "replicas short of the final read"),
        (
            c.unreached,
            "events that never reached a region they had to",
        ),
        (
            c.vanished_at_origin,
            "events held elsewhere but gone from their origin",
        ),
        (c.unjudged, "things the history cannot judge"),
        (c.below_floor, "floors not met"),
        (
            c.notify_skips,
            "notification streams that skipped or renumbered without a gap",
        ),
        (c.notify_reused, "notification positions naming two events"),
        (
            c.notify_undelivered,
            "acknowledged notifications a subscriber never received",
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
    for why in report
        .unjudged
        .iter()
        .chain(&report.below_floor)
        .chain(&report.notify_skips)
        .chain(&report.notify_reused)
        .chain(&report.notify_undelivered)
        .take(8)
    {
        report.reasons.push(format!("    {why}"));
    }
    if !report.reasons.is_empty() {
        report.verdict = Verdict::Fail;
    }
}
