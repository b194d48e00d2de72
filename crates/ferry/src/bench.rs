//! `ferry bench`: load against a running region, with throughput and acknowledgement
//! latency percentiles, printed and written as JSON. Every run is bounded by `--count`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_client::ProducerOptions;
use ferry_proto::{Event, Subject, TopicConfig};
use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::ctl::Connect;

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Publish COUNT events of SIZE bytes with W in flight; report events/s, MiB/s and
    /// acknowledgement latency.
    Produce(ProduceArgs),
}

#[derive(Args)]
struct ProduceArgs {
    #[command(flatten)]
    connect: Connect,
    /// Payload bytes per event.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Events to publish (the run stops after them).
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Events in flight (sent, not yet acknowledged).
    #[arg(long, default_value_t = 256)]
    inflight: usize,
    /// Topic (created if missing, with --partitions and replication 3).
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Partitions of a topic the bench creates.
    #[arg(long, default_value_t = 8)]
    partitions: u32,
    /// Most events per batch.
    #[arg(long, default_value_t = 256)]
    batch_events: usize,
    /// Write the report as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Serialize)]
struct Report {
    target: &'static str,
    topic: String,
    partitions: u32,
    replication: u32,
    size: usize,
    count: u64,
    inflight: usize,
    acknowledged: u64,
    errors: u64,
    seconds: f64,
    events_per_sec: f64,
    mib_per_sec: f64,
    ack_latency_ms: Latency,
}

#[derive(Serialize)]
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Produce(args) => produce(args).await,
    }
}

async fn produce(mut args: ProduceArgs) -> anyhow::Result<()> {
    if args.connect.client == "ctl" {
        args.connect.client = "bench".into();
    }
    let client = args.connect.client()?;
    let description = match client.describe_topic(&args.topic).await {
        Ok(d) => d,
        Err(_) => {
            client
                .create_topic(TopicConfig::new(args.topic.clone(), args.partitions))
                .await?;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let d = client.describe_topic(&args.topic).await?;
                if d.partitions.iter().all(|p| p.leader.is_some()) {
                    break d;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "partitions of {} got no leader in 30 s",
                    args.topic
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let options = ProducerOptions {
        max_in_flight: args.inflight,
        max_batch_events: args.batch_events,
        ..ProducerOptions::default()
    };
    let producer = client.producer(&args.topic, options).await?;
    let subject = Subject::new("bench.produce")?;
    let payload = bytes::Bytes::from((0..args.size).map(|i| (i % 251) as u8).collect::<Vec<u8>>());

    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let collector = tokio::spawn(async move {
        let mut histogram =
            Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds");
        let mut pending = FuturesUnordered::new();
        let (mut ok, mut errors) = (0u64, 0u64);
        let mut open = true;
        loop {
            tokio::select! {
                item = done_rx.recv(), if open => match item {
                    Some(fut) => pending.push(fut),
                    None => open = false,
                },
                Some((sent, result)) = pending.next(), if !pending.is_empty() => {
                    let sent: Instant = sent;
                    match result {
                        Ok(_) => {
                            ok += 1;
                            let _ = histogram.record(sent.elapsed().as_micros().max(1) as u64);
                        }
                        Err(_) => errors += 1,
                    }
                }
                else => break,
            }
            if !open && pending.is_empty() {
                break;
            }
        }
        (histogram, ok, errors)
    });

    let started = Instant::now();
    for i in 0..args.count {
        let event = Event::new(
            format!("bench-{i}"),
            "/ferry/bench",
            "bench.event",
            subject.clone(),
            payload.clone(),
        );
        let ack = producer.send(event).await?;
        let sent = Instant::now();
        done_tx
            .send(Box::pin(async move { (sent, ack.await) }))
            .map_err(|_| anyhow::anyhow!("collector stopped"))?;
    }
    drop(done_tx);
    let (histogram, ok, errors) = collector.await.context("collector")?;
    let seconds = started.elapsed().as_secs_f64();
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let report = Report {
        target: "ferry",
        topic: args.topic.clone(),
        partitions: description.config.partitions,
        replication: description.config.replication,
        size: args.size,
        count: args.count,
        inflight: args.inflight,
        acknowledged: ok,
        errors,
        seconds,
        events_per_sec: ok as f64 / seconds,
        mib_per_sec: ok as f64 * args.size as f64 / seconds / (1024.0 * 1024.0),
        ack_latency_ms: Latency {
            p50: ms(0.50),
            p99: ms(0.99),
            p999: ms(0.999),
            max: histogram.max() as f64 / 1000.0,
        },
    };
    println!(
        "ferry bench produce: {} events of {} B, {} in flight, {} partitions x{} replicas: {:.0} events/s, {:.1} MiB/s, ack p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms ({} errors, {:.1} s)",
        ok, args.size, args.inflight, report.partitions, report.replication, report.events_per_sec, report.mib_per_sec,
        report.ack_latency_ms.p50, report.ack_latency_ms.p99, report.ack_latency_ms.p999, errors, seconds
    );
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    anyhow::ensure!(errors == 0, "{errors} publishes failed");
    Ok(())
}
