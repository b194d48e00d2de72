//! `ferry bench`: load against a running region — or, for the comparison, a NATS JetStream
//! cluster (`--target nats://…`) — with throughput, latency percentiles and, given the
//! servers' PIDs, the CPU, memory and disk writes they spent; printed as one line and
//! written as JSON. Every run is bounded by `--count` and deadlines.

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
use suites::{LoadArgs, Suite};

mod fanout;
mod idle;
mod resources;
mod sidecar;
mod streams;
mod suites;
mod system;
mod table;

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Publish COUNT events of SIZE bytes with W in flight per producer; report events/s,
    /// MiB/s and acknowledgement latency.
    Produce(LoadArgs),
    /// Publish COUNT events at --rate and receive them: publish-to-delivery latency.
    E2e(LoadArgs),
    /// Read COUNT events from the start of a full topic (filled first if short): catch-up
    /// read throughput.
    Consume(LoadArgs),
    /// Print the Ferry/NATS comparison table from the reports in DIR (what
    /// deploy/bench/compare leaves there).
    Table {
        /// Folder with <suite>-<system>-<pair>.json reports.
        dir: PathBuf,
    },
    /// Hold N WebSocket clients on one edge: RSS per idle connection, broadcast and per-user
    /// deliveries/s, publish-to-delivery latency at a fixed rate.
    Fanout(fanout::FanoutArgs),
    /// HTTP publishes through one running sidecar (keep-alive, concurrent connections) and,
    /// with --app, publish-to-app latency through a second sidecar at a fixed rate.
    Sidecar(sidecar::SidecarBenchArgs),
    /// Publish COUNT events in one region (--servers) and receive them in another (--to):
    /// forwarded events/s and publish-to-delivery latency.
    Mesh(MeshArgs),
    /// Create PARTITIONS partitions (topics of --per-topic, one after the other, each until
    /// every partition has a leader), then measure the servers' (--pids) idle CPU and RSS.
    Idle(idle::IdleArgs),
    /// Append COUNT events with expected versions round robin to STREAMS streams of one
    /// partition, then read streams back from version 1: appends/s, latencies, and the
    /// servers' (--pids) resident memory.
    Streams(streams::StreamsBenchArgs),
}

/// How a bench's Ferry producer batches (`ProducerOptions`), shared by the suites and mesh.
#[derive(Args, Clone, Debug)]
struct ProducerBatching {
    /// Ferry: batches in flight per partition.
    #[arg(long, default_value_t = ProducerOptions::default().max_batches_in_flight)]
    batches_in_flight: usize,
    /// Ferry: batches in flight over all partitions sent as soon as there are events (past
    /// these, only sizeable ones; a partition with none in flight always sends).
    #[arg(long, default_value_t = ProducerOptions::default().eager_batches)]
    eager_batches: usize,
    /// Ferry: how long a partition's lane waits for more events before sending a batch
    /// that is not full, microseconds.
    #[arg(long, default_value_t = 0)]
    linger_us: u64,
}

impl ProducerBatching {
    /// Producer options with these and `max_in_flight` events in flight.
    fn options(&self, max_in_flight: usize) -> ProducerOptions {
        ProducerOptions {
            max_in_flight,
            max_batches_in_flight: self.batches_in_flight,
            eager_batches: self.eager_batches,
            linger: Duration::from_micros(self.linger_us),
            ..ProducerOptions::default()
        }
    }
}

#[derive(Args)]
struct MeshArgs {
    #[command(flatten)]
    connect: Connect,
    /// Servers of the destination region (comma-separated).
    #[arg(long, value_delimiter = ',', required = true)]
    to: Vec<std::net::SocketAddr>,
    /// Payload bytes per event (at least 8: the send time travels in it).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Events to publish.
    #[arg(long, default_value_t = 50_000)]
    count: u64,
    /// Events in flight at the producer.
    #[arg(long, default_value_t = 256)]
    inflight: usize,
    /// The producer's batching.
    #[command(flatten)]
    batching: ProducerBatching,
    /// Events per second to publish at (0: as fast as acknowledgements allow).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Topic (created in both regions if missing: integration class, forwarded by interest).
    #[arg(long, default_value = "bench-mesh")]
    topic: String,
    /// Partitions of a topic the bench creates.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Give up waiting for deliveries this long after the last publish, seconds.
    #[arg(long, default_value_t = 60)]
    drain_secs: u64,
    /// Write the report as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Serialize)]
struct MeshReport {
    target: &'static str,
    topic: String,
    source_region: String,
    destination_region: String,
    partitions: u32,
    size: usize,
    count: u64,
    inflight: usize,
    rate: u64,
    delivered: u64,
    lost: u64,
    publish_errors: u64,
    seconds: f64,
    forwarded_events_per_sec: f64,
    /// Delivered events over the time from the first delivery to the last: the rate the
    /// destination kept up with (with `--rate`, at most the offered rate).
    received_events_per_sec: f64,
    e2e_latency_ms: Latency,
    /// Publish to acknowledgement in the source region (its commit).
    ack_latency_ms: Latency,
}

/// A histogram of latencies in microseconds, 1 µs to 10 minutes. (Bounded: an auto-resizing
/// histogram's `saturating_record` clamps to its initial tiny range.)
fn latency_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// Latency percentiles, milliseconds.
#[derive(Serialize)]
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

impl Latency {
    /// From a histogram of microseconds.
    fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        Self {
            p50: ms(0.50),
            p99: ms(0.99),
            p999: ms(0.999),
            max: histogram.max() as f64 / 1000.0,
        }
    }
}

pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Produce(args) => suites::run(Suite::Produce, args).await,
        BenchCommand::E2e(args) => suites::run(Suite::E2e, args).await,
        BenchCommand::Consume(args) => suites::run(Suite::Consume, args).await,
        BenchCommand::Table { dir } => {
            print!("{}", table::render(&dir)?);
            Ok(())
        }
        BenchCommand::Mesh(args) => mesh(args).await,
        BenchCommand::Fanout(args) => fanout::run(args).await,
        BenchCommand::Sidecar(args) => sidecar::run(args).await,
        BenchCommand::Idle(args) => idle::run(args).await,
        BenchCommand::Streams(args) => streams::run(args).await,
    }
}

/// Creates `config` if missing and waits until every partition has a leader.
async fn ensure_topic(
    client: &ferry_client::Client,
    config: &TopicConfig,
) -> anyhow::Result<ferry_proto::wire::TopicDescription> {
    client
        .ensure_topic(config, Duration::from_secs(30))
        .await
        .with_context(|| format!("topic {}", config.name))
}

async fn mesh(mut args: MeshArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.size >= 8, "--size must be at least 8 bytes");
    if args.connect.client == "ctl" {
        args.connect.client = "bench".into();
    }
    let source = args.connect.client()?;
    let destination = ferry_client::Client::new(ferry_client::ClientOptions::new(
        args.to.clone(),
        args.connect.identity()?,
    ))?;
    let mut config = TopicConfig::new(args.topic.clone(), args.partitions);
    config.subjects = ferry_proto::SubjectFilter::new("bench.>")?;
    config.class = ferry_proto::EventClass::Integration;
    config.regions = ferry_proto::RegionPolicy::ByInterest;
    ensure_topic(&source, &config).await?;
    let described = ensure_topic(&destination, &config).await?;
    let source_region = source.regions().await?.region;
    let destination_region = destination.regions().await?.region;
    anyhow::ensure!(
        source_region != destination_region,
        "--servers and --to are both in region {source_region}"
    );
    let version = destination
        .add_interest(&format!("bench-{}", args.topic), "bench.>")
        .await?;
    // Wait (bounded) until every node of the source region holds the interest, so no event
    // of the run waits at its source for the interest to arrive (that would count as latency).
    let reach = destination
        .await_interest(version, Duration::from_secs(30))
        .await?;
    anyhow::ensure!(
        !reach.waiting_for.contains(&source_region),
        "{source_region} did not learn {destination_region}'s interest in 30 s"
    );

    // Receive in the destination from its current end.
    let base = Instant::now();
    let run = format!("{:016x}", rand::random::<u64>());
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let mut readers = Vec::new();
    for p in &described.partitions {
        let mut subscription = destination
            .subscribe(
                &args.topic,
                p.partition,
                ferry_client::StartFrom::Offset(p.high_watermark),
            )
            .await?;
        let seen = seen_tx.clone();
        let run = run.clone();
        readers.push(tokio::spawn(async move {
            while let Ok((_, event)) = subscription.next().await {
                if !event.id.starts_with(&run) || event.data.len() < 8 {
                    continue;
                }
                let sent = u64::from_le_bytes(event.data[..8].try_into().expect("8 bytes"));
                if seen.send((sent, Instant::now())).is_err() {
                    return;
                }
            }
        }));
    }
    drop(seen_tx);

    let options = args.batching.options(args.inflight);
    let producer = source.producer(&args.topic, options).await?;
    let subject = Subject::new("bench.mesh")?;
    let filler: Vec<u8> = (0..args.size).map(|i| (i % 251) as u8).collect();
    let (acks_tx, mut acks_rx) = tokio::sync::mpsc::unbounded_channel();
    let acks = tokio::spawn(async move {
        let mut pending = FuturesUnordered::new();
        let mut errors = 0u64;
        let mut histogram = latency_histogram();
        let mut open = true;
        loop {
            tokio::select! {
                item = acks_rx.recv(), if open => match item {
                    Some(fut) => pending.push(fut),
                    None => open = false,
                },
                Some((result, took)) = pending.next(), if !pending.is_empty() => {
                    let result: Result<_, ferry_client::ClientError> = result;
                    let took: Duration = took;
                    if result.is_err() {
                        errors += 1;
                    } else {
                        let _ = histogram.record((took.as_micros() as u64).max(1));
                    }
                }
                else => break,
            }
            if !open && pending.is_empty() {
                break;
            }
        }
        (errors, histogram)
    });
    let started = Instant::now();
    for i in 0..args.count {
        if args.rate > 0 {
            let due = started + Duration::from_secs_f64(i as f64 / args.rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let mut payload = filler.clone();
        let sent = base.elapsed().as_nanos() as u64;
        payload[..8].copy_from_slice(&sent.to_le_bytes());
        let event = Event::new(
            format!("{run}-{i}"),
            "/ferry/bench",
            "bench.mesh",
            subject.clone(),
            payload,
        )
        .with_key(format!("k{}", i % 64));
        let published = Instant::now();
        let ack = producer.send(event).await?;
        let ack = async move { (ack.await, published.elapsed()) };
        acks_tx
            .send(Box::pin(ack))
            .map_err(|_| anyhow::anyhow!("acknowledgement collector stopped"))?;
    }
    drop(acks_tx);
    let (publish_errors, ack_histogram) = acks.await.context("acknowledgements")?;

    let mut histogram = latency_histogram();
    let mut delivered = 0u64;
    let mut first: Option<Instant> = None;
    let mut last = started;
    let drain = tokio::time::Instant::now() + Duration::from_secs(args.drain_secs);
    while delivered < args.count {
        match tokio::time::timeout_at(drain, seen_rx.recv()).await {
            Ok(Some((sent, at))) => {
                delivered += 1;
                first = Some(first.map_or(at, |f| f.min(at)));
                last = last.max(at);
                let latency = (at - base).as_nanos() as u64 - sent;
                let _ = histogram.record((latency / 1000).max(1));
            }
            Ok(None) | Err(_) => break,
        }
    }
    for reader in readers {
        reader.abort();
    }
    let seconds = (last - started).as_secs_f64().max(1e-9);
    let report = MeshReport {
        target: "ferry",
        topic: args.topic.clone(),
        source_region: source_region.clone(),
        destination_region: destination_region.clone(),
        partitions: described.config.partitions,
        size: args.size,
        count: args.count,
        inflight: args.inflight,
        rate: args.rate,
        delivered,
        lost: args.count - delivered,
        publish_errors,
        seconds,
        forwarded_events_per_sec: delivered as f64 / seconds,
        received_events_per_sec: first.map_or(0.0, |first| {
            delivered.saturating_sub(1) as f64 / (last - first).as_secs_f64().max(1e-9)
        }),
        e2e_latency_ms: Latency::of(&histogram),
        ack_latency_ms: Latency::of(&ack_histogram),
    };
    println!(
        "ferry bench mesh: {} -> {}: {} of {} events of {} B delivered ({} in flight{}): {:.0} events/s forwarded ({:.0}/s received), publish-to-delivery p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms (publish-to-ack in {} p50 {:.2} ms, p99 {:.2} ms; {} lost, {} publish errors, {:.1} s)",
        source_region, destination_region, delivered, args.count, args.size, args.inflight,
        if args.rate > 0 { format!(", {} ev/s offered", args.rate) } else { String::new() },
        report.forwarded_events_per_sec, report.received_events_per_sec, report.e2e_latency_ms.p50, report.e2e_latency_ms.p99,
        report.e2e_latency_ms.p999, source_region, report.ack_latency_ms.p50,
        report.ack_latency_ms.p99, report.lost, publish_errors, seconds
    );
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    anyhow::ensure!(
        report.lost == 0 && publish_errors == 0,
        "{} events not delivered, {publish_errors} publishes failed",
        report.lost
    );
    Ok(())
}
