//! The suites that run on either system: `produce` (publish throughput, acknowledgement
//! latency), `e2e` (publish-to-delivery latency at a fixed rate) and `consume` (catch-up read
//! throughput from the start of a full topic). Each is bounded by `--count` and a deadline,
//! prints one line and writes JSON with `--out`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Semaphore;

use super::resources::{Resources, Watch};
use super::system::{Ack, System};
use super::Latency;
use crate::ctl::Connect;

/// Options every suite shares.
#[derive(Args)]
pub(crate) struct LoadArgs {
    #[command(flatten)]
    connect: Connect,
    /// System under test: `ferry` (the region at --servers) or `nats://HOST:PORT[,...]`
    /// (NATS JetStream: a stream with 3 replicas and file storage).
    #[arg(long, default_value = "ferry")]
    target: String,
    /// Payload bytes per event (at least 16: the send time and run id travel in it).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Events (the run stops after them).
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Events in flight per producer (sent, not yet acknowledged).
    #[arg(long, default_value_t = 256)]
    inflight: usize,
    /// Concurrent producers, each with its own connection state and window.
    #[arg(long, default_value_t = 1)]
    producers: u64,
    /// Partitions of a Ferry topic the bench creates (a JetStream stream has one log). A
    /// list (`1,8,64`) runs the suite once per entry, on topics named `<topic>-p<N>`
    /// (NATS: one stream per run), and `--out` then holds a JSON array of the reports.
    #[arg(long, value_delimiter = ',', default_value = "8")]
    partitions: Vec<u32>,
    /// Raft groups the Ferry topic's partitions share (at most the partition count;
    /// 0: the region's default, one per node).
    #[arg(long, default_value_t = 0)]
    groups: u32,
    /// Ferry's producer batching.
    #[command(flatten)]
    batching: super::ProducerBatching,
    /// Events per second in all (0: as fast as acknowledgements allow; e2e needs a rate).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Topic or stream (default: bench, bench-e2e, bench-consume by suite).
    #[arg(long)]
    topic: Option<String>,
    /// Server processes to measure (CPU, peak RSS, bytes written), comma-separated PIDs.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// Ferry's tiered storage: create the topic keeping this many bytes per partition on the
    /// replicas, the rest in the region's object store (its nodes need `[tier]`). `produce`
    /// then also reports how fast uploads kept up; `consume` waits for the uploads before it
    /// reads, so it reads back from the store.
    #[arg(long)]
    local_bytes: Option<u64>,
    /// Give up waiting for deliveries this long after the last publish, seconds.
    #[arg(long, default_value_t = 60)]
    drain_secs: u64,
    /// Write the report as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Which suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Suite {
    Produce,
    E2e,
    Consume,
}

impl Suite {
    fn name(self) -> &'static str {
        match self {
            Self::Produce => "produce",
            Self::E2e => "e2e",
            Self::Consume => "consume",
        }
    }

    fn default_topic(self) -> &'static str {
        match self {
            Self::Produce => "bench",
            Self::E2e => "bench-e2e",
            Self::Consume => "bench-consume",
        }
    }
}

#[derive(Serialize)]
struct SuiteReport {
    suite: &'static str,
    target: &'static str,
    topic: String,
    partitions: u32,
    replication: u32,
    size: usize,
    count: u64,
    inflight: usize,
    producers: u64,
    rate: u64,
    acknowledged: u64,
    errors: u64,
    delivered: Option<u64>,
    seconds: f64,
    events_per_sec: f64,
    mib_per_sec: f64,
    ack_latency_ms: Option<Latency>,
    e2e_latency_ms: Option<Latency>,
    resources: Option<Resources>,
    /// Tiered topics: the hot tail asked for, bytes in the object store when reading
    /// started (consume) or once uploads caught up (produce), and for produce the upload
    /// rate over publishing and catching up.
    local_bytes: Option<u64>,
    remote_bytes: Option<u64>,
    upload_mib_per_sec: Option<f64>,
    upload_catch_up_seconds: Option<f64>,
}

/// What a publishing phase did.
struct Published {
    acknowledged: u64,
    errors: u64,
    seconds: f64,
    ack_latency: Histogram<u64>,
}

/// Runs `suite` with `args`, once per entry of `--partitions`.
pub(crate) async fn run(suite: Suite, mut args: LoadArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.size >= 16, "--size must be at least 16 bytes");
    anyhow::ensure!(args.producers >= 1, "--producers must be at least 1");
    anyhow::ensure!(args.inflight >= 1, "--inflight must be at least 1");
    anyhow::ensure!(
        suite != Suite::E2e || args.rate > 0,
        "e2e measures latency at a fixed rate: give --rate (events/s), e.g. 5000"
    );
    if args.connect.client == "ctl" {
        args.connect.client = "bench".into();
    }
    let system = if args.target == "ferry" {
        System::Ferry(args.connect.client()?)
    } else if args.target.starts_with("nats://") {
        System::nats(&args.target).await?
    } else {
        anyhow::bail!(
            "--target must be `ferry` or nats://HOST:PORT, not {:?}",
            args.target
        );
    };
    anyhow::ensure!(
        !args.partitions.is_empty() && args.partitions.iter().all(|p| *p >= 1),
        "--partitions must list counts of at least 1, e.g. 8 or 1,8,64"
    );
    let base_topic = args
        .topic
        .clone()
        .unwrap_or_else(|| suite.default_topic().to_string());
    let mut reports = Vec::new();
    for &partitions in &args.partitions {
        let topic = if args.partitions.len() == 1 {
            base_topic.clone()
        } else {
            format!("{base_topic}-p{partitions}")
        };
        match run_one(suite, &args, &system, &topic, partitions).await {
            Ok(report) => {
                println!("{}", summary(&report));
                reports.push(report);
            }
            Err(e) => {
                // Keep the runs that finished.
                write_reports(&args, &reports)?;
                return Err(e.context(format!("{topic} ({partitions} partitions)")));
            }
        }
    }
    write_reports(&args, &reports)?;
    for report in &reports {
        anyhow::ensure!(
            report.errors == 0,
            "{}: {} publishes failed",
            report.topic,
            report.errors
        );
        if let Some(delivered) = report.delivered {
            anyhow::ensure!(
                delivered == args.count,
                "{}: {} of {} events delivered",
                report.topic,
                delivered,
                args.count
            );
        }
    }
    Ok(())
}

/// Writes `reports` to `--out`, if given: one report as an object, several as an array.
fn write_reports(args: &LoadArgs, reports: &[SuiteReport]) -> anyhow::Result<()> {
    let (Some(out), false) = (&args.out, reports.is_empty()) else {
        return Ok(());
    };
    let json = match reports {
        [one] => serde_json::to_string_pretty(one)?,
        many => serde_json::to_string_pretty(many)?,
    };
    std::fs::write(out, json).with_context(|| format!("writing {}", out.display()))
}

/// One run of `suite` on `topic` with `partitions` (Ferry) or one stream (NATS).
async fn run_one(
    suite: Suite,
    args: &LoadArgs,
    system: &System,
    topic: &str,
    partitions: u32,
) -> anyhow::Result<SuiteReport> {
    let topic = topic.to_string();
    let prepared = system
        .prepare(
            &topic,
            partitions,
            args.groups.min(partitions),
            args.local_bytes,
        )
        .await?;
    let run_id: u64 = rand::random();
    let base = Instant::now();

    let mut report = SuiteReport {
        suite: suite.name(),
        target: system.name(),
        topic: topic.clone(),
        partitions: prepared.partitions,
        replication: prepared.replication,
        size: args.size,
        count: args.count,
        inflight: args.inflight,
        producers: args.producers,
        rate: args.rate,
        acknowledged: 0,
        errors: 0,
        delivered: None,
        seconds: 0.0,
        events_per_sec: 0.0,
        mib_per_sec: 0.0,
        ack_latency_ms: None,
        e2e_latency_ms: None,
        resources: None,
        local_bytes: args.local_bytes,
        remote_bytes: None,
        upload_mib_per_sec: None,
        upload_catch_up_seconds: None,
    };
    // Consume is measured after its fill, so it starts its own watch below.
    let watch = if args.pids.is_empty() || suite == Suite::Consume {
        None
    } else {
        Some(Watch::start(&args.pids)?)
    };
    match suite {
        Suite::Produce => {
            let before = match args.local_bytes {
                Some(hot) => Some(system.tiers(&topic, hot).await?.1),
                None => None,
            };
            let p = publish(system, &topic, args, base, run_id, args.count).await?;
            if let (Some(hot), Some(before)) = (args.local_bytes, before) {
                let (catch_up, remote) = system.uploads_caught_up(&topic, hot).await?;
                let uploaded = remote.saturating_sub(before) as f64;
                report.remote_bytes = Some(remote);
                report.upload_catch_up_seconds = Some(catch_up);
                report.upload_mib_per_sec =
                    Some(uploaded / (p.seconds + catch_up) / (1024.0 * 1024.0));
            }
            report.acknowledged = p.acknowledged;
            report.errors = p.errors;
            report.seconds = p.seconds;
            report.events_per_sec = p.acknowledged as f64 / p.seconds;
            report.ack_latency_ms = Some(Latency::of(&p.ack_latency));
        }
        Suite::E2e => {
            let mut deliveries = system.tail(&topic).await?;
            let count = args.count;
            let receiver = tokio::spawn(async move {
                let mut latency = super::latency_histogram();
                let mut delivered = 0u64;
                while delivered < count {
                    let Some(payload) = deliveries.recv().await else {
                        break;
                    };
                    let Some((sent, run)) = stamp_of(&payload) else {
                        continue;
                    };
                    if run != run_id {
                        continue;
                    }
                    delivered += 1;
                    let at = base.elapsed().as_nanos() as u64;
                    let _ = latency.record((at.saturating_sub(sent) / 1000).max(1));
                }
                (delivered, latency)
            });
            let p = publish(system, &topic, args, base, run_id, args.count).await?;
            let drain = Duration::from_secs(args.drain_secs);
            let (delivered, latency) = match tokio::time::timeout(drain, receiver).await {
                Ok(joined) => joined.context("receiver")?,
                Err(_) => anyhow::bail!(
                    "deliveries did not finish {drain:?} after the last publish ({} acknowledged)",
                    p.acknowledged
                ),
            };
            report.acknowledged = p.acknowledged;
            report.errors = p.errors;
            report.delivered = Some(delivered);
            report.seconds = p.seconds;
            report.events_per_sec = delivered as f64 / p.seconds;
            report.ack_latency_ms = Some(Latency::of(&p.ack_latency));
            report.e2e_latency_ms = Some(Latency::of(&latency));
        }
        Suite::Consume => {
            // Fill (not measured) until the topic holds --count events, then read them all
            // from the start.
            let stored = system.stored(&topic).await?;
            if stored < args.count {
                let fill = publish(system, &topic, args, base, run_id, args.count - stored).await?;
                anyhow::ensure!(
                    fill.errors == 0,
                    "{} publishes failed filling {topic}",
                    fill.errors
                );
            }
            if let Some(hot) = args.local_bytes {
                report.remote_bytes = Some(system.uploads_caught_up(&topic, hot).await?.1);
            }
            let watch = if args.pids.is_empty() {
                None
            } else {
                Some(Watch::start(&args.pids)?)
            };
            let started = Instant::now();
            let mut deliveries = system.everything(&topic).await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
            let mut delivered = 0u64;
            while delivered < args.count {
                match tokio::time::timeout_at(deadline, deliveries.recv()).await {
                    Ok(Some(_)) => delivered += 1,
                    Ok(None) => break,
                    Err(_) => break,
                }
            }
            report.seconds = started.elapsed().as_secs_f64();
            report.delivered = Some(delivered);
            report.events_per_sec = delivered as f64 / report.seconds;
            if let Some(w) = watch {
                report.resources =
                    Some(w.finish(delivered, args.size as u64, prepared.replication)?);
            }
        }
    }
    if let Some(w) = watch {
        let events = report.delivered.unwrap_or(report.acknowledged);
        report.resources = Some(w.finish(events, args.size as u64, prepared.replication)?);
    }
    report.mib_per_sec = report.events_per_sec * args.size as f64 / (1024.0 * 1024.0);
    Ok(report)
}

/// The one-line human summary.
fn summary(r: &SuiteReport) -> String {
    let mut line = format!(
        "ferry bench {} on {}: {} events of {} B, {} producer(s) x {} in flight, {} partition(s) x{}{}: {:.0} events/s, {:.1} MiB/s",
        r.suite,
        r.target,
        r.count,
        r.size,
        r.producers,
        r.inflight,
        r.partitions,
        r.replication,
        if r.rate > 0 { format!(", {} ev/s offered", r.rate) } else { String::new() },
        r.events_per_sec,
        r.mib_per_sec
    );
    if let Some(l) = &r.ack_latency_ms {
        line += &format!(
            ", ack p50 {:.2} ms p99 {:.2} ms p999 {:.2} ms",
            l.p50, l.p99, l.p999
        );
    }
    if let Some(l) = &r.e2e_latency_ms {
        line += &format!(
            ", e2e p50 {:.2} ms p99 {:.2} ms p999 {:.2} ms",
            l.p50, l.p99, l.p999
        );
    }
    if let Some(res) = &r.resources {
        let peak = res.peak_rss_mib.iter().copied().fold(0.0, f64::max);
        line += &format!(
            ", {:.1} CPU s per M events, peak RSS {:.0} MiB, write amplification {:.2} per replica",
            res.cpu_seconds_per_million_events, peak, res.write_amplification_per_replica
        );
    }
    if let (Some(hot), Some(remote)) = (r.local_bytes, r.remote_bytes) {
        line += &format!(
            ", tiered: {hot} B hot per partition, {:.1} MiB in the object store",
            remote as f64 / (1024.0 * 1024.0)
        );
    }
    if let (Some(rate), Some(catch_up)) = (r.upload_mib_per_sec, r.upload_catch_up_seconds) {
        line +=
            &format!(", uploads {rate:.1} MiB/s (caught up {catch_up:.1} s after the last ack)");
    }
    line += &format!(" ({} errors, {:.1} s)", r.errors, r.seconds);
    line
}

/// Send time (ns since the bench's base instant) and run id from a payload.
fn stamp_of(payload: &[u8]) -> Option<(u64, u64)> {
    let sent = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    let run = u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((sent, run))
}

/// Publishes `count` events from `args.producers` producers at `args.rate` in all, each
/// with `args.inflight` in flight; every payload carries its send time and the run id.
async fn publish(
    system: &System,
    topic: &str,
    args: &LoadArgs,
    base: Instant,
    run_id: u64,
    count: u64,
) -> anyhow::Result<Published> {
    let filler: Arc<Vec<u8>> = Arc::new((0..args.size).map(|i| (i % 251) as u8).collect());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..args.producers {
        let mine = count / args.producers + u64::from(p < count % args.producers);
        let options = args.batching.options(args.inflight);
        let publisher = system.publisher(topic, options).await?;
        let window = Arc::new(Semaphore::new(args.inflight));
        let rate = args.rate as f64 / args.producers as f64;
        let filler = filler.clone();
        tasks.push(tokio::spawn(async move {
            let (acks_tx, mut acks_rx) =
                tokio::sync::mpsc::unbounded_channel::<(Instant, Ack, tokio::sync::OwnedSemaphorePermit)>();
            let collector = tokio::spawn(async move {
                let mut latency = super::latency_histogram();
                let (mut ok, mut errors) = (0u64, 0u64);
                let mut pending = FuturesUnordered::new();
                let mut open = true;
                loop {
                    tokio::select! {
                        item = acks_rx.recv(), if open => match item {
                            Some((sent, ack, permit)) => pending.push(async move {
                                let result = ack.await;
                                drop(permit);
                                (sent, result)
                            }),
                            None => open = false,
                        },
                        Some((sent, result)) = pending.next(), if !pending.is_empty() => {
                            let sent: Instant = sent;
                            match result {
                                Ok(()) => {
                                    ok += 1;
                                    let _ = latency.record(sent.elapsed().as_micros().max(1) as u64);
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
                (ok, errors, latency)
            });
            let begun = Instant::now();
            for i in 0..mine {
                // At a fixed rate, latency counts from when the event was due, not from when
                // the window let it go: a system that falls behind the schedule shows it.
                let due = (rate > 0.0).then(|| begun + Duration::from_secs_f64(i as f64 / rate));
                if let Some(due) = due {
                    tokio::time::sleep_until(due.into()).await;
                }
                let permit = window.clone().acquire_owned().await.expect("window open");
                let sent = due.unwrap_or_else(Instant::now);
                let mut payload = filler.to_vec();
                let sent_ns = sent.saturating_duration_since(base).as_nanos() as u64;
                payload[..8].copy_from_slice(&sent_ns.to_le_bytes());
                payload[8..16].copy_from_slice(&run_id.to_le_bytes());
                let ack = match publisher
                    .send(format!("{run_id:016x}-{p}-{i}"), i, Bytes::from(payload))
                    .await
                {
                    Ok(ack) => ack,
                    Err(e) => Box::pin(async move { Err(e) }) as Ack,
                };
                if acks_tx.send((sent, ack, permit)).is_err() {
                    break;
                }
            }
            drop(acks_tx);
            collector.await.expect("ack collector")
        }));
    }
    let (mut acknowledged, mut errors, mut ack_latency) = (0, 0, super::latency_histogram());
    for task in tasks {
        let (ok, failed, latency) = task.await.context("producer task")?;
        acknowledged += ok;
        errors += failed;
        ack_latency.add(&latency).context("merging latencies")?;
    }
    Ok(Published {
        acknowledged,
        errors,
        seconds: started.elapsed().as_secs_f64().max(1e-9),
        ack_latency,
    })
}
