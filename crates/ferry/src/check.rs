//! `ferry check HISTORY`: runs the history checker on a file and prints its verdict, a short
//! table, and (with `--json`) the whole report as JSON.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use ferry_check::{check, History, Options, Verdict};

#[derive(Args)]
pub(crate) struct CheckArgs {
    /// History file: JSON lines of invoke / ok / fail / info operations, final reads, replica
    /// dumps and faults (the format is described in ferry-check's `history` module).
    history: PathBuf,
    /// Also write the full report (every violation found) as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Fail when an event is stored at two offsets of one log (the idempotent producer
    /// promises it never is); otherwise duplicates are only counted.
    #[arg(long)]
    duplicates_fail: bool,
    /// Logs may have a retention limit: final reads may start above offset 0 (acknowledged
    /// events below it count as expired); without it such a read fails the run.
    #[arg(long)]
    retention: bool,
    /// Fail when any origin region has fewer acknowledged publishes than this.
    #[arg(long, default_value_t = 0)]
    min_acknowledged_per_region: u64,
    /// Fail when fewer publishes than this were in flight while a recorded fault held
    /// (invoked before it healed, not completed before it began).
    #[arg(long, default_value_t = 0)]
    min_publishes_per_fault: u64,
}

pub(crate) fn run(args: CheckArgs) -> anyhow::Result<Verdict> {
    let text = std::fs::read_to_string(&args.history)
        .with_context(|| format!("cannot read history {}", args.history.display()))?;
    let history = History::parse(&text)
        .with_context(|| format!("{} is not a valid history", args.history.display()))?;
    let report = check(
        &history,
        &Options {
            duplicates_fail: args.duplicates_fail,
            retention: args.retention,
            min_acknowledged_per_region: args.min_acknowledged_per_region,
            min_publishes_per_fault: args.min_publishes_per_fault,
        },
    );
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).context("encoding the report")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    print!("{}", report.table());
    Ok(report.verdict)
}
