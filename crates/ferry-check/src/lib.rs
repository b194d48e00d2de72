//! The history checker for chaos runs: reads what clients did and saw (a JSON-lines
//! [`History`] of invoke / ok / fail / info operations, plus replica log dumps) and reports
//! what the guarantees forbid — acknowledged events lost, events that were never published,
//! per-key order broken, one offset holding different events, replicas that disagree where
//! both have committed, events missing from a region they had to reach — and what they
//! allow but an operator wants counted (duplicates, redeliveries, unknown outcomes).
//!
//! The verdict depends only on the history: nothing the system under test reports about
//! itself is trusted beyond what a client recorded. No I/O here; `ferry check` reads the
//! file and prints.
#![warn(missing_docs, unreachable_pub)]

mod check;
mod history;

pub use check::{
    check, AckMismatch, Counts, Divergence, Duplicate, LogId, Lost, LostAt, Options,
    OrderViolation, Report, Unreached, Verdict,
};
pub use history::{Func, History, Observed, Op, OpType};

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
        let rows: [(&str, u64); 19] = [
            ("publishes attempted", c.attempted),
            ("acknowledged", c.acknowledged),
            ("failed (definite)", c.failed),
            ("unknown outcome", c.unknown),
            ("events observed", c.observed),
            ("lost", c.lost),
            ("  lost: prefix", c.lost_prefix),
            ("  lost: middle", c.lost_middle),
            ("  lost: postfix", c.lost_postfix),
            ("unexpected", c.unexpected),
            ("failed but observed", c.failed_but_observed),
            ("recovered (unknown, observed)", c.recovered),
            ("duplicated in a log", c.duplicated),
            ("redelivered to a group", c.redelivered),
            ("order violations", c.order_violations),
            ("offset divergences", c.offset_divergences),
            ("ack offset mismatches", c.ack_mismatches),
            ("replica divergences", c.replica_divergences),
            ("unreached (event, region)", c.unreached),
        ];
        for (name, n) in rows {
            out.push_str(&format!("  {name:<32}{n:>10}\n"));
        }
        if let Some((p50, max)) = self.forwarding_lag_ms {
            out.push_str(&format!("  {:<32}{:>10}\n", "forwarding lag p50 ms", p50));
            out.push_str(&format!("  {:<32}{:>10}\n", "forwarding lag max ms", max));
        }
        out
    }
}

#[cfg(test)]
mod tests;
