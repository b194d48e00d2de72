//! `ferry faultfs`: the crash-consistency filesystem of the power-loss tests
//! ([`ferry_faultfs`]), as a process the chaos runs mount each node's data folder with, and
//! its control commands.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

/// `ferry faultfs`.
#[derive(Args)]
pub(crate) struct FaultFsArgs {
    #[command(subcommand)]
    command: FaultFsCommand,
}

#[derive(Subcommand)]
enum FaultFsCommand {
    /// Mount a faultfs over a backing folder and serve it until SIGTERM or an unmount.
    Mount {
        /// The real folder the data lives in (its state after a power loss is what stays).
        #[arg(long)]
        backing: PathBuf,
        /// Where to mount it.
        #[arg(long)]
        mountpoint: PathBuf,
        /// The control socket to create.
        #[arg(long)]
        control: PathBuf,
    },
    /// Send one control command (power-loss, tear SEED, fail-fsync GLOB N, enospc GLOB N,
    /// slow-fsync GLOB MS, clear, status) and print the answer.
    Ctl {
        /// The mount's control socket.
        #[arg(long)]
        control: PathBuf,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true)]
        command: Vec<String>,
    },
}

pub(crate) fn run(args: FaultFsArgs) -> anyhow::Result<()> {
    match args.command {
        FaultFsCommand::Mount {
            backing,
            mountpoint,
            control,
        } => ferry_faultfs::run_foreground(&backing, &mountpoint, &control)
            .with_context(|| format!("faultfs on {}", mountpoint.display())),
        FaultFsCommand::Ctl { control, command } => {
            let answer = ferry_faultfs::control(&control, &command.join(" "))
                .with_context(|| format!("faultfs control {}", control.display()))?;
            println!("{answer}");
            Ok(())
        }
    }
}
