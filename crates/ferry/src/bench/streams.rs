//! `ferry bench streams`: the event store under load. Appends with expected versions, one
//! event each, round robin over many streams of one partition (each stream written by one
//! task, so no append conflicts), then reads of streams from version 1; reports appends/s,
//! latencies, the reads' events/s and, given the servers' PIDs, their resident memory at the
//! end and at peak (the stream index keeps only the appends since the last checkpoint in
//! memory, whatever the partition holds). Bounded by `--count`, `--reads` and `--max-secs`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use ferry_proto::{Event, EventBatch, Limits, Subject, TopicConfig};
use serde::Serialize;

use super::{ensure_topic, latency_histogram, resources, Latency};
use crate::ctl::Connect;

#[derive(Args)]
pub(crate) struct StreamsBenchArgs {
    #[command(flatten)]
    connect: Connect,
    /// Topic (created with one partition if missing).
    #[arg(long, default_value = "streams.bench")]
    topic: String,
    /// Streams appended to.
    #[arg(long, default_value_t = 10_000)]
    streams: u64,
    /// Appends, one event each.
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Payload bytes per event.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Appends in flight (tasks, each with streams of its own).
    #[arg(long, default_value_t = 64)]
    inflight: u64,
    /// Streams read whole from version 1 after the appends.
    #[arg(long, default_value_t = 1_000)]
    reads: u64,
    /// Server PIDs: their resident memory is reported.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// Stop appending after this long, seconds.
    #[arg(long, default_value_t = 600)]
    max_secs: u64,
    /// Write the report as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Serialize)]
struct StreamsReport {
    topic: String,
    streams: u64,
    appends: u64,
    append_errors: u64,
    size: usize,
    inflight: u64,
    seconds: f64,
    appends_per_sec: f64,
    append_latency_ms: Latency,
    streams_read: u64,
    events_read: u64,
    read_events_per_sec: f64,
    read_latency_ms: Latency,
    /// Resident memory of each server at the end, MiB.
    rss_mib: Vec<f64>,
    /// Peak resident memory of each server since it started, MiB.
    peak_rss_mib: Vec<f64>,
}

pub(crate) async fn run(mut args: StreamsBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.streams > 0, "--streams must be at least 1");
    anyhow::ensure!(
        args.inflight > 0 && args.inflight <= args.streams,
        "--inflight must be 1 to --streams ({})",
        args.streams
    );
    if args.connect.client == "ctl" {
        args.connect.client = "bench".into();
    }
    let client = Arc::new(args.connect.client()?);
    ensure_topic(&client, &TopicConfig::new(args.topic.clone(), 1)).await?;
    // Streams of this run only: a second run appends to new ones.
    let run = format!("{:08x}", rand::random::<u32>());
    let name = move |s: u64| format!("bench-{run}-{s:08}");
    let payload: Vec<u8> = (0..args.size).map(|i| (i % 251) as u8).collect();
    let subject = Subject::new("bench.streams")?;
    let deadline = Instant::now() + Duration::from_secs(args.max_secs);

    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..args.inflight {
        let (client, next, payload, subject, name) = (
            client.clone(),
            next.clone(),
            payload.clone(),
            subject.clone(),
            name.clone(),
        );
        let (topic, streams, inflight, count) =
            (args.topic.clone(), args.streams, args.inflight, args.count);
        tasks.push(tokio::spawn(async move {
            // This task's streams: task, task + inflight, ...; their versions as appended.
            let mine: Vec<u64> = (task..streams).step_by(inflight as usize).collect();
            let mut versions = vec![0u64; mine.len()];
            let mut histogram = latency_histogram();
            let (mut appended, mut errors) = (0u64, 0u64);
            let mut turn = 0usize;
            while next.fetch_add(1, Ordering::Relaxed) < count && Instant::now() < deadline {
                let i = turn % mine.len();
                turn += 1;
                let stream = name(mine[i]);
                let event = Event::new(
                    format!("{stream}-{}", versions[i] + 1),
                    "/ferry/bench",
                    "bench.streams",
                    subject.clone(),
                    payload.clone(),
                )
                .with_key(stream.clone());
                let batch = EventBatch::new(&[event], None, 0, &Limits::default())?;
                let sent = Instant::now();
                match client
                    .append_to_stream(&topic, 0, &stream, Some(versions[i]), batch)
                    .await
                {
                    Ok(done) => {
                        versions[i] = done.version;
                        appended += 1;
                        let _ = histogram.record((sent.elapsed().as_micros() as u64).max(1));
                    }
                    Err(e) => {
                        errors += 1;
                        if errors == 1 {
                            tracing::warn!(%stream, error = %e, "an append failed");
                        }
                    }
                }
            }
            anyhow::Ok((appended, errors, histogram))
        }));
    }
    let (mut appended, mut errors) = (0u64, 0u64);
    let mut histogram = latency_histogram();
    for task in tasks {
        let (a, e, h) = task.await.context("an append task")??;
        appended += a;
        errors += e;
        histogram.add(&h).context("latency histograms")?;
    }
    let seconds = started.elapsed().as_secs_f64();

    // Read streams back whole, spread over all of them.
    let reads = args.reads.min(args.streams);
    let mut read_histogram = latency_histogram();
    let mut events_read = 0u64;
    let read_started = Instant::now();
    for r in 0..reads {
        let stream = name(r * args.streams / reads.max(1));
        let mut from = 1;
        let sent = Instant::now();
        loop {
            let (version, events) = client
                .read_stream(&args.topic, 0, &stream, from, 1000)
                .await
                .with_context(|| format!("reading stream {stream}"))?;
            events_read += events.len() as u64;
            match events.last() {
                Some(last) if last.version < version => from = last.version + 1,
                _ => break,
            }
        }
        let _ = read_histogram.record((sent.elapsed().as_micros() as u64).max(1));
    }
    let read_seconds = read_started.elapsed().as_secs_f64();

    let mib = |kib: u64| kib as f64 / 1024.0;
    let rss_mib = args
        .pids
        .iter()
        .map(|p| resources::status_kib(*p, "VmRSS:").map(mib))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let peak_rss_mib = args
        .pids
        .iter()
        .map(|p| resources::status_kib(*p, "VmHWM:").map(mib))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let report = StreamsReport {
        topic: args.topic,
        streams: args.streams,
        appends: appended,
        append_errors: errors,
        size: args.size,
        inflight: args.inflight,
        seconds,
        appends_per_sec: appended as f64 / seconds,
        append_latency_ms: Latency::of(&histogram),
        streams_read: reads,
        events_read,
        read_events_per_sec: events_read as f64 / read_seconds.max(1e-9),
        read_latency_ms: Latency::of(&read_histogram),
        rss_mib,
        peak_rss_mib,
    };
    println!(
        "streams: {} appends to {} streams in {:.1} s: {:.0} appends/s, p50 {:.2} ms p99 {:.2} ms, {} errors; read {} streams ({} events) at {:.0} events/s, p50 {:.2} ms; server RSS {:?} MiB (peak {:?})",
        report.appends,
        report.streams,
        report.seconds,
        report.appends_per_sec,
        report.append_latency_ms.p50,
        report.append_latency_ms.p99,
        report.append_errors,
        report.streams_read,
        report.events_read,
        report.read_events_per_sec,
        report.read_latency_ms.p50,
        report.rss_mib,
        report.peak_rss_mib,
    );
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    anyhow::ensure!(errors == 0, "{errors} appends failed");
    Ok(())
}
