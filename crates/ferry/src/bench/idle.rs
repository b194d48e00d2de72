//! `ferry bench idle`: what partitions cost when nothing is written. Creates PARTITIONS
//! partitions as topics of at most `--per-topic` each, one after the other, each waited for
//! until every partition has a leader; then, after `--settle-secs`, reads the CPU and
//! resident memory of the server processes (`--pids`) over `--window-secs`. With `--kill
//! PID` (a node's own process), it then kills that node and measures how long until every
//! partition accepts a publish.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use ferry_proto::TopicConfig;
use serde::Serialize;

use super::resources::{cpu_seconds, status_kib};
use crate::ctl::Connect;

#[derive(Args)]
pub(crate) struct IdleArgs {
    #[command(flatten)]
    connect: Connect,
    /// Partitions in all.
    #[arg(long, default_value_t = 1_000)]
    partitions: u32,
    /// Partitions per topic (topics NAME-1, NAME-2, …, created one after the other).
    #[arg(long, default_value_t = 1_000)]
    per_topic: u32,
    /// Raft groups each topic's partitions share (at most its partition count; 0: the
    /// region's default, one per node).
    #[arg(long, default_value_t = 0)]
    groups: u32,
    /// Topic name prefix.
    #[arg(long, default_value = "bench-idle")]
    topic: String,
    /// Server processes to measure, comma-separated PIDs (all the region's nodes).
    #[arg(long, value_delimiter = ',', required = true)]
    pids: Vec<u32>,
    /// Wait this long after the last topic has every leader before measuring, seconds
    /// (idle groups fall asleep after `raft.quiesce_after_ms`).
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    /// Measure CPU over this long, seconds.
    #[arg(long, default_value_t = 10)]
    window_secs: u64,
    /// Give up on a topic whose partitions do not all have a leader within this long,
    /// seconds.
    #[arg(long, default_value_t = 300)]
    leaders_within_secs: u64,
    /// After the idle window, kill this server process (SIGKILL; one of --pids, a single
    /// node's process) and measure the time until every partition accepts a publish.
    #[arg(long)]
    kill: Option<u32>,
    /// Give up on partitions that do not accept a publish this long after the kill, seconds.
    #[arg(long, default_value_t = 120)]
    publish_within_secs: u64,
    /// Write the report as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Serialize)]
struct IdleReport {
    suite: &'static str,
    partitions: u32,
    topics: Vec<TopicCreated>,
    settle_seconds: u64,
    window_seconds: u64,
    /// CPU of all the processes over the window, in cores.
    idle_cores: f64,
    /// Resident memory of each process at the end, MiB.
    rss_mib: Vec<f64>,
    /// With `--kill`: from the kill until every partition had accepted a publish.
    seconds_to_publish_after_kill: Option<f64>,
}

#[derive(Serialize)]
struct TopicCreated {
    topic: String,
    partitions: u32,
    /// Raft groups its partitions share.
    groups: u32,
    /// From the create request until every partition had a leader.
    seconds_to_leaders: f64,
}

pub(crate) async fn run(args: IdleArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.partitions > 0, "--partitions must be above 0");
    anyhow::ensure!(
        (1..=TopicConfig::MAX_PARTITIONS).contains(&args.per_topic),
        "--per-topic must be within 1..={}",
        TopicConfig::MAX_PARTITIONS
    );
    for pid in &args.pids {
        cpu_seconds(*pid)?;
    }
    anyhow::ensure!(
        args.kill.is_none_or(|k| args.pids.contains(&k)),
        "--kill must name one of --pids (a node's own process)"
    );
    let client = args.connect.client()?;
    let mut topics = Vec::new();
    let mut left = args.partitions;
    while left > 0 {
        let partitions = left.min(args.per_topic);
        let name = format!("{}-{}", args.topic, topics.len() + 1);
        let started = Instant::now();
        let mut config = TopicConfig::new(name.clone(), partitions);
        config.groups = args.groups.min(partitions);
        let described = client
            .ensure_topic(&config, Duration::from_secs(args.leaders_within_secs))
            .await
            .with_context(|| format!("{name}: every partition led"))?;
        let seconds_to_leaders = started.elapsed().as_secs_f64();
        let groups = described.config.groups;
        eprintln!(
            "{name}: {partitions} partitions in {groups} Raft groups, every one led after {seconds_to_leaders:.1} s"
        );
        topics.push(TopicCreated {
            topic: name,
            partitions,
            groups,
            seconds_to_leaders,
        });
        left -= partitions;
    }
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let before: Vec<f64> = args
        .pids
        .iter()
        .map(|p| cpu_seconds(*p))
        .collect::<anyhow::Result<_>>()?;
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.window_secs)).await;
    let elapsed = window.elapsed().as_secs_f64();
    let mut spent = 0.0;
    for (pid, before) in args.pids.iter().zip(&before) {
        spent += cpu_seconds(*pid)? - before;
    }
    let rss_mib = args
        .pids
        .iter()
        .map(|p| status_kib(*p, "VmRSS:").map(|k| k as f64 / 1024.0))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let seconds_to_publish_after_kill = match args.kill {
        Some(pid) => Some(publish_everywhere_after_kill(&client, &args, &topics, pid).await?),
        None => None,
    };
    let report = IdleReport {
        suite: "idle",
        partitions: args.partitions,
        topics,
        settle_seconds: args.settle_secs,
        window_seconds: args.window_secs,
        idle_cores: spent / elapsed,
        rss_mib,
        seconds_to_publish_after_kill,
    };
    println!(
        "ferry bench idle: {} partitions in {} topic(s): idle {:.3} cores over {} s, RSS {} MiB",
        report.partitions,
        report.topics.len(),
        report.idle_cores,
        report.window_seconds,
        report
            .rss_mib
            .iter()
            .map(|m| format!("{m:.0}"))
            .collect::<Vec<_>>()
            .join(" + ")
    );
    if let Some(seconds) = report.seconds_to_publish_after_kill {
        println!(
            "ferry bench idle: after killing process {}, every partition accepted a publish within {seconds:.1} s",
            args.kill.unwrap_or_default()
        );
    }
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

/// Kills `pid`, then publishes one event to every partition of `topics` (retrying each until
/// it is accepted, a bounded number at a time) and answers the seconds from the kill until
/// the last partition accepted.
async fn publish_everywhere_after_kill(
    client: &ferry_client::Client,
    args: &IdleArgs,
    topics: &[TopicCreated],
    pid: u32,
) -> anyhow::Result<f64> {
    use futures::stream::{self, StreamExt};

    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .context("running kill")?;
    anyhow::ensure!(status.success(), "kill -KILL {pid} failed: {status}");
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(args.publish_within_secs);
    eprintln!("killed process {pid}; publishing one event to each partition");
    let subject = ferry_proto::Subject::new("bench.idle").context("subject")?;
    let limits = ferry_proto::Limits::default();
    let targets = topics
        .iter()
        .flat_map(|t| (0..t.partitions).map(move |p| (t.topic.as_str(), p)));
    let total: u32 = topics.iter().map(|t| t.partitions).sum();
    // Where the time goes: how many partitions accepted, every 5 s.
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let progress = {
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            every.tick().await;
            loop {
                every.tick().await;
                let n = accepted.load(std::sync::atomic::Ordering::Relaxed);
                eprintln!(
                    "  {:.0} s after the kill: {n} of {total} partitions accepted",
                    killed.elapsed().as_secs_f64()
                );
            }
        })
    };
    let failed: Vec<String> = stream::iter(targets)
        .map(|(topic, partition)| {
            let subject = subject.clone();
            let limits = &limits;
            let accepted = &accepted;
            async move {
                let event = ferry_proto::Event::new(
                    format!("after-kill-{topic}-{partition}"),
                    "/bench/idle",
                    "bench.idle",
                    subject,
                    vec![b'k'; 64],
                );
                let batch = ferry_proto::EventBatch::new(&[event], None, 0, limits)
                    .map_err(|e| format!("{topic}/{partition}: {e}"))?;
                loop {
                    match client.publish_batch(topic, partition, batch.clone()).await {
                        Ok(_) => {
                            accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            return Ok(());
                        }
                        Err(e) if Instant::now() >= deadline => {
                            return Err(format!("{topic}/{partition}: {e}"))
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            }
        })
        .buffer_unordered(512)
        .filter_map(|r: Result<(), String>| async move { r.err() })
        .collect()
        .await;
    progress.abort();
    let seconds = killed.elapsed().as_secs_f64();
    anyhow::ensure!(
        failed.is_empty(),
        "{} partitions did not accept a publish within {} s of the kill, e.g. {}",
        failed.len(),
        args.publish_within_secs,
        failed[0]
    );
    Ok(seconds)
}
