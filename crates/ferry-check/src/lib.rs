//! The history checker for chaos runs: reads what clients did and saw (a JSON-lines
//! [`History`] of invoke / ok / fail / info operations, plus replica log dumps) and reports
//! what the guarantees forbid — acknowledged events lost, events that were never published,
//! per-key order broken, one offset holding different events, replicas that disagree where
//! both have committed, events missing from a region they had to reach — and what they
//! allow but an operator wants counted (duplicates, redeliveries, unknown outcomes).
//!
//! Survival is judged from final reads (each a whole log, oldest retained offset to high
//! watermark), never from "seen somewhere": see [`check`] for the rules. A history that
//! lacks what a verdict needs (final reads, enough acknowledged writes, faults that
//! overlapped publishing) fails rather than passes.
//!
//! The verdict depends only on the history: nothing the system under test reports about
//! itself is trusted beyond what a client recorded. No I/O here; `ferry check` reads the
//! file and prints.
#![warn(missing_docs, unreachable_pub)]

mod check;
mod history;
mod report;

pub use check::{check, Options};
pub use history::{Func, History, Observed, Op, OpType};
pub use report::{
    AckMismatch, Counts, Divergence, Duplicate, GroupGap, LogId, Lost, LostAt, OrderViolation,
    Premature, ReplicaBehind, Report, Unreached, Verdict,
};

/// Why a history could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A line is not a valid operation.
    #[error("history line {line}: {reason}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        reason: String,
    },
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
        let rows: [(&str, u64); 31] = [
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
            ("expired (retention)", c.expired),
            ("unexpected", c.unexpected),
            ("observed before invoked", c.premature),
            ("failed but observed", c.failed_but_observed),
            ("recovered (unknown, at origin)", c.recovered),
            ("duplicated in a log", c.duplicated),
            ("redelivered to a group", c.redelivered),
            ("group partitions with gaps", c.group_gaps),
            ("order violations", c.order_violations),
            ("offset divergences", c.offset_divergences),
            ("ack offset mismatches", c.ack_mismatches),
            ("replica divergences", c.replica_divergences),
            ("replicas behind", c.replicas_behind),
            ("unreached (event, region)", c.unreached),
            ("vanished at origin", c.vanished_at_origin),
            ("unjudged", c.unjudged),
            ("floors not met", c.below_floor),
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

#[cfg(test)]
mod tests;
