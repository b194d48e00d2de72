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
mod notify;
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

#[cfg(test)]
mod tests;
