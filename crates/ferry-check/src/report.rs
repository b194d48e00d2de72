//! What the checker reports: the verdict, its reasons, counts, and every violation found.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A log: (region, topic, partition).
pub type LogId = (String, String, u32);

/// PASS or FAIL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// No guarantee was violated.
    Pass,
    /// At least one was.
    Fail,
}

/// Where in its origin log an acknowledged event went missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LostAt {
    /// Inside the final read's range: the offset holds another event (or the read has a
    /// hole there).
    Middle,
    /// At or above the final read's high watermark: the end of the log went missing.
    Postfix,
    /// Acknowledged without an offset (through a sidecar's outbox, or as a resend older than
    /// the dedupe window), and nowhere in the final read.
    Unplaced,
}

/// An acknowledged event that its origin log's final read does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lost {
    /// The event.
    pub id: String,
    /// The log it was acknowledged in.
    pub log: LogId,
    /// Its acknowledged offset (for [`LostAt::Unplaced`], none was given: the final read's
    /// high watermark).
    pub offset: u64,
    /// Where that is relative to the final read.
    pub at: LostAt,
    /// What the final read holds at that offset instead, if anything.
    pub found_instead: Option<String>,
}

/// One event at two or more offsets of one region's topic (in one partition or several).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Duplicate {
    /// The region.
    pub region: String,
    /// The topic.
    pub topic: String,
    /// The event.
    pub id: String,
    /// Its copies: (partition, offset).
    pub copies: Vec<(u32, u64)>,
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
    /// The events seen there (with the node, for replica dumps); `<absent>` where a final
    /// read holds nothing at an offset another observation saw.
    pub seen: Vec<(Option<u64>, String)>,
}

/// An acknowledged event found in its origin log at an offset other than the one acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckMismatch {
    /// The event.
    pub id: String,
    /// The log.
    pub log: LogId,
    /// Offset in the acknowledgement.
    pub acknowledged: u64,
    /// Offsets where the final read holds it.
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

/// A replica that does not hold its log up to the final read's high watermark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaBehind {
    /// The log.
    pub log: LogId,
    /// The node.
    pub node: u64,
    /// Offsets it holds, `from..to`.
    pub holds: (u64, u64),
    /// Offsets the final read holds, `low..high`.
    pub wanted: (u64, u64),
}

/// Offsets of a log a consumer group never received: skipped (between ones it did, or at
/// the log's start), or never reached (after the last it received, up to the last offset
/// acknowledged in the log: the group stopped or fell behind before the end).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupGap {
    /// The log.
    pub log: LogId,
    /// The group.
    pub group: String,
    /// Offset ranges `from..to` skipped.
    pub skipped: Vec<(u64, u64)>,
    /// Offsets `from..to` past the last delivered one that the group never reached.
    pub unreached: Option<(u64, u64)>,
}

/// An observation timed before its event's publish was invoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Premature {
    /// The event.
    pub id: String,
    /// History line of the observation.
    pub line: usize,
    /// When it was observed, ms.
    pub observed_ms: u64,
    /// When its publish was invoked, ms.
    pub invoked_ms: u64,
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
    /// Final reads (one per log).
    pub final_reads: u64,
    /// Events in final reads.
    pub final_read_events: u64,
    /// Replica dumps.
    pub dumps: u64,
    /// Events in replica dumps (committed part).
    pub dumped_events: u64,
    /// Faults recorded.
    pub faults: u64,
    /// Acknowledged but not in the origin's final read at their offset.
    pub lost: u64,
    /// ... of which inside the final read's range.
    pub lost_middle: u64,
    /// ... of which at or above its high watermark.
    pub lost_postfix: u64,
    /// Of those, acknowledged without an offset and nowhere in the final read.
    pub lost_unplaced: u64,
    /// Acknowledged below the log's retained start (only with retention).
    pub expired: u64,
    /// Observed but never published.
    pub unexpected: u64,
    /// Observed before their publish was invoked.
    pub premature: u64,
    /// Definitely failed, yet observed.
    pub failed_but_observed: u64,
    /// Outcome unknown, and in a final read.
    pub recovered: u64,
    /// Events at two or more offsets of one log.
    pub duplicated: u64,
    /// Deliveries of one event to one consumer group (in one region) beyond the first.
    pub redelivered: u64,
    /// Consumer group partitions with offsets skipped (between delivered ones, or at the
    /// start).
    pub group_gaps: u64,
    /// Consumer group partitions whose deliveries ended before the last acknowledged offset.
    pub group_unfinished: u64,
    /// Per-key order violations.
    pub order_violations: u64,
    /// Offsets holding different events in different reads and deliveries.
    pub offset_divergences: u64,
    /// Acknowledged offsets that the final read contradicts.
    pub ack_mismatches: u64,
    /// Committed offsets where replicas hold different events than the final read or each other.
    pub replica_divergences: u64,
    /// Replicas holding less than the final read.
    pub replicas_behind: u64,
    /// (event, region) pairs never reached.
    pub unreached: u64,
    /// Events in another region's final read but not in their origin's.
    pub vanished_at_origin: u64,
    /// What the history lacks to judge it (final reads missing, incomplete or too early).
    pub unjudged: u64,
    /// Floors not met (acknowledged per region, publishes per fault).
    pub below_floor: u64,
    /// Notifications an edge's clients received.
    pub notified: u64,
    /// Breaks (gap, lag) in the notification streams.
    pub notify_breaks: u64,
    /// Notification streams that skipped or renumbered without a break.
    pub notify_skips: u64,
    /// Notification positions naming two events.
    pub notify_reused: u64,
    /// Acknowledged notifications a subscriber of their channel never received.
    pub notify_undelivered: u64,
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
    /// Acknowledged publishes per origin region.
    pub acknowledged_by_region: BTreeMap<String, u64>,
    /// Publishes in flight during each fault: (kind, start ms, end ms, publishes).
    pub faults: Vec<(String, u64, u64, u64)>,
    /// Lost events.
    pub lost: Vec<Lost>,
    /// Events observed but never published.
    pub unexpected: Vec<String>,
    /// Observations before their publish.
    pub premature: Vec<Premature>,
    /// Events that failed definitely but were observed.
    pub failed_but_observed: Vec<String>,
    /// Events stored twice.
    pub duplicated: Vec<Duplicate>,
    /// Consumer group gaps.
    pub group_gaps: Vec<GroupGap>,
    /// Order violations.
    pub order_violations: Vec<OrderViolation>,
    /// Offset divergences between reads, deliveries and final reads.
    pub offset_divergences: Vec<Divergence>,
    /// Acknowledged offsets contradicted by final reads.
    pub ack_mismatches: Vec<AckMismatch>,
    /// Replica divergences.
    pub replica_divergences: Vec<Divergence>,
    /// Replicas behind the final read.
    pub replicas_behind: Vec<ReplicaBehind>,
    /// Events that never reached a region they had to reach.
    pub unreached: Vec<Unreached>,
    /// Events another region holds that their origin's final read does not.
    pub vanished_at_origin: Vec<String>,
    /// What could not be judged, and why.
    pub unjudged: Vec<String>,
    /// Floors not met.
    pub below_floor: Vec<String>,
    /// Notification streams that skipped or renumbered without a break.
    pub notify_skips: Vec<String>,
    /// Notification positions naming two events.
    pub notify_reused: Vec<String>,
    /// Acknowledged notifications never received by a subscriber of their channel.
    pub notify_undelivered: Vec<String>,
    /// Milliseconds from acknowledgement to first observation in each required region:
    /// (p50, max), if any was measured.
    pub forwarding_lag_ms: Option<(u64, u64)>,
}

impl Report {
    /// A passing report with nothing found yet.
    pub(crate) fn empty() -> Self {
        Self {
            verdict: Verdict::Pass,
            reasons: Vec::new(),
            counts: Counts::default(),
            acknowledged_by_region: BTreeMap::new(),
            faults: Vec::new(),
            lost: Vec::new(),
            unexpected: Vec::new(),
            premature: Vec::new(),
            failed_but_observed: Vec::new(),
            duplicated: Vec::new(),
            group_gaps: Vec::new(),
            order_violations: Vec::new(),
            offset_divergences: Vec::new(),
            ack_mismatches: Vec::new(),
            replica_divergences: Vec::new(),
            replicas_behind: Vec::new(),
            unreached: Vec::new(),
            vanished_at_origin: Vec::new(),
            unjudged: Vec::new(),
            below_floor: Vec::new(),
            notify_skips: Vec::new(),
            notify_reused: Vec::new(),
            notify_undelivered: Vec::new(),
            forwarding_lag_ms: None,
        }
    }
}

impl Report {
    /// A short human-readable table: verdict, reasons, counts.
    pub fn table(&self) -> String {
        let c = &self.counts;
        let verdict = match self.verdict {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
        };
        let mut out = format!("verdict: {verdict}\n");
        for reason in &self.reasons {
            out.push_str(&format!("  - {reason}\n"));
        }
        let rows: [(&str, u64); 38] = [
            ("publishes attempted", c.attempted),
            ("acknowledged", c.acknowledged),
            ("failed (definite)", c.failed),
            ("unknown outcome", c.unknown),
            ("events observed", c.observed),
            ("final reads (logs)", c.final_reads),
            ("  events in final reads", c.final_read_events),
            ("replica dumps", c.dumps),
            ("  events in replica dumps", c.dumped_events),
            ("faults recorded", c.faults),
            ("lost", c.lost),
            ("  lost: middle", c.lost_middle),
            ("  lost: postfix", c.lost_postfix),
            ("  lost: acknowledged without an offset", c.lost_unplaced),
            ("expired (retention)", c.expired),
            ("unexpected", c.unexpected),
            ("observed before invoked", c.premature),
            ("failed but observed", c.failed_but_observed),
            ("recovered (unknown, at origin)", c.recovered),
            ("duplicated in a log", c.duplicated),
            ("redelivered to a group", c.redelivered),
            ("group partitions with gaps", c.group_gaps),
            ("group partitions not read to the end", c.group_unfinished),
            ("order violations", c.order_violations),
            ("offset divergences", c.offset_divergences),
            ("ack offset mismatches", c.ack_mismatches),
            ("replica divergences", c.replica_divergences),
            ("replicas behind", c.replicas_behind),
            ("unreached (event, region)", c.unreached),
            ("vanished at origin", c.vanished_at_origin),
            ("unjudged", c.unjudged),
            ("floors not met", c.below_floor),
            ("notifications received", c.notified),
            ("  notification gaps and lags", c.notify_breaks),
            ("  silent skips", c.notify_skips),
            ("  positions naming two events", c.notify_reused),
            ("  acknowledged, never received", c.notify_undelivered),
            (
                "faults that overlapped publishing",
                self.faults.iter().filter(|f| f.3 > 0).count() as u64,
            ),
        ];
        for (name, n) in rows {
            out.push_str(&format!("  {name:<34}{n:>10}\n"));
        }
        for (region, n) in &self.acknowledged_by_region {
            let name = format!("acknowledged in {region:?}");
            out.push_str(&format!("  {name:<34}{n:>10}\n"));
        }
        if let Some((p50, max)) = self.forwarding_lag_ms {
            out.push_str(&format!("  {:<34}{:>10}\n", "forwarding lag p50 ms", p50));
            out.push_str(&format!("  {:<34}{:>10}\n", "forwarding lag max ms", max));
        }
        out
    }
}
