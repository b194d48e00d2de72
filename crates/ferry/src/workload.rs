//! `ferry workload`: the client side of a chaos run. `produce` publishes keyed events from
//! several producers and records every invoke and outcome as a history (`ferry check` reads
//! it); `collect` appends, after the faults have healed, a final read of every partition
//! (linearizable, oldest retained offset to high watermark, recorded with that range) and a
//! dump of each node's own replica; `sidecar` and `edge` publish through those and record
//! what their clients see. Bounded in count and in time.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use ferry_check::{Func, Observed, Op, OpType};
use ferry_client::{ClientOptions, ConsumerOptions, GroupConsumer, ProducerOptions, StartFrom};
use ferry_proto::{Event, Subject, TopicConfig};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::ctl::Connect;

mod edge;

#[derive(Args)]
pub(crate) struct WorkloadArgs {
    #[command(flatten)]
    connect: Connect,
    /// Record times as milliseconds since this Unix time (ms). Every part of one history
    /// (producers in several regions, the collect) must share it. Default: 0, Unix time.
    #[arg(long, global = true)]
    epoch_ms: Option<u64>,
    #[command(subcommand)]
    command: WorkloadCommand,
}

#[derive(Subcommand)]
enum WorkloadCommand {
    /// Publish and record the history (appends to --out).
    Produce(ProduceArgs),
    /// Publish through a sidecar's Dapr HTTP API and record the history (appends to --out):
    /// a 2xx is an acknowledgement (the event is in the sidecar's durable outbox).
    Sidecar(SidecarPublishArgs),
    /// Publish notifications and read them through an edge's WebSocket as its users do,
    /// recording both (appends to --out).
    Edge(edge::EdgeArgs),
    /// Append final reads and per-node replica dumps to the history.
    Collect(CollectArgs),
}

#[derive(Args)]
struct SidecarPublishArgs {
    /// History file (JSON lines), appended to.
    #[arg(long)]
    out: PathBuf,
    /// The sidecar's HTTP address (host:port).
    #[arg(long)]
    sidecar: String,
    /// Topic (it must exist).
    #[arg(long, default_value = "chaos")]
    topic: String,
    /// Partitions of the topic (to record where each key's events go).
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Keys.
    #[arg(long, default_value_t = 8)]
    keys: u64,
    /// Events.
    #[arg(long, default_value_t = 2000)]
    count: u64,
    /// Stop publishing after this many seconds even if --count is not reached.
    #[arg(long, default_value_t = 120)]
    duration_secs: u64,
    /// Publishes per second (0: one after another as fast as the sidecar answers).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// The region the sidecar publishes to (recorded with each acknowledgement).
    #[arg(long, default_value = "")]
    region: String,
    /// Regions every event must reach (comma-separated).
    #[arg(long, value_delimiter = ',')]
    reach: Vec<String>,
    /// The process number recorded.
    #[arg(long, default_value_t = 0)]
    process: u64,
}

#[derive(Args)]
struct ProduceArgs {
    /// History file (JSON lines), appended to.
    #[arg(long)]
    out: PathBuf,
    /// Topic (created if missing).
    #[arg(long, default_value = "chaos")]
    topic: String,
    /// Partitions of the topic if it is created.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Concurrent producers, each with its own producer id and keys.
    #[arg(long, default_value_t = 4)]
    producers: u64,
    /// Keys per producer.
    #[arg(long, default_value_t = 8)]
    keys: u64,
    /// Events per producer.
    #[arg(long, default_value_t = 2000)]
    count: u64,
    /// Events in flight per producer.
    #[arg(long, default_value_t = 32)]
    inflight: usize,
    /// Stop publishing after this many seconds even if --count is not reached.
    #[arg(long, default_value_t = 120)]
    duration_secs: u64,
    /// Publishes per second per producer (0: as fast as acknowledgements allow).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// The region this workload publishes in (recorded with each acknowledgement).
    #[arg(long, default_value = "")]
    region: String,
    /// Regions every event must reach (comma-separated; the checker flags any it misses).
    #[arg(long, value_delimiter = ',')]
    reach: Vec<String>,
    /// First process number, so several workloads can share one history.
    #[arg(long, default_value_t = 0)]
    process_base: u64,
    /// Members of a consumer group reading the topic in this region while it runs.
    #[arg(long, default_value_t = 0)]
    consumers: u64,
    /// Their consumer group.
    #[arg(long, default_value = "chaos")]
    group: String,
    /// How long consumers keep reading after the producers finish, seconds.
    #[arg(long, default_value_t = 15)]
    consume_drain_secs: u64,
}

#[derive(Args)]
struct CollectArgs {
    /// History file (JSON lines), appended to.
    #[arg(long)]
    out: PathBuf,
    /// Topic.
    #[arg(long, default_value = "chaos")]
    topic: String,
    /// The region read (recorded with each read and dump).
    #[arg(long, default_value = "")]
    region: String,
    /// The nodes to dump, as ID=ADDR (comma-separated).
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
    /// How long each phase may take, seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
}

pub(crate) async fn run(args: WorkloadArgs) -> anyhow::Result<()> {
    match args.command {
        WorkloadCommand::Produce(p) => produce(&args.connect, args.epoch_ms, p).await,
        WorkloadCommand::Sidecar(s) => publish_through_sidecar(args.epoch_ms, s).await,
        WorkloadCommand::Edge(e) => edge::run(&args.connect, args.epoch_ms, e).await,
        WorkloadCommand::Collect(c) => collect(&args.connect, args.epoch_ms, c).await,
    }
}

/// Appends operations to the history file from one writer task, in the order sent.
struct Recorder {
    tx: mpsc::UnboundedSender<Op>,
    /// Unix time (ms) that `time_ms` counts from.
    epoch_ms: u64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Recorder {
    fn start(
        path: &PathBuf,
        epoch_ms: Option<u64>,
    ) -> anyhow::Result<(Self, tokio::task::JoinHandle<anyhow::Result<()>>)> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening history {}", path.display()))?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Op>();
        let writer = tokio::task::spawn_blocking(move || {
            let mut out = std::io::BufWriter::new(file);
            while let Some(op) = rx.blocking_recv() {
                serde_json::to_writer(&mut out, &op)?;
                out.write_all(b"\n")?;
                if rx.is_empty() {
                    out.flush()?;
                }
            }
            out.flush()?;
            Ok(())
        });
        Ok((
            Self {
                tx,
                epoch_ms: epoch_ms.unwrap_or(0),
            },
            writer,
        ))
    }

    fn record(&self, mut op: Op) {
        op.time_ms = unix_ms().saturating_sub(self.epoch_ms);
        let _ = self.tx.send(op);
    }
}

async fn ensure_topic(
    client: &ferry_client::Client,
    topic: &str,
    partitions: u32,
) -> anyhow::Result<u32> {
    // A fault may hold the region down meanwhile: every step is retried until the deadline.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client.describe_topic(topic).await {
            Ok(d) if d.partitions.iter().all(|p| p.leader.is_some()) => {
                return Ok(d.config.partitions)
            }
            Ok(_) => {}
            Err(ferry_client::ClientError::Api(e))
                if e.code == ferry_proto::wire::ErrorCode::UnknownTopic =>
            {
                if let Err(e) = client
                    .create_topic(TopicConfig::new(topic.to_string(), partitions))
                    .await
                {
                    tracing::warn!(error = %e, "creating topic {topic}; retrying");
                }
            }
            Err(e) => tracing::warn!(error = %e, "describing topic {topic}; retrying"),
        }
        if Instant::now() > deadline {
            bail!("topic {topic} was not ready (every partition with a leader) within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One publish after another through a sidecar: invoke, then ok on a 2xx (partition from
/// the key, as the sidecar computes it; no offset: the sidecar does not know it yet), info on
/// anything else (a refusal, or no answer: it may or may not have been written).
async fn publish_through_sidecar(
    epoch_ms: Option<u64>,
    args: SidecarPublishArgs,
) -> anyhow::Result<()> {
    let (recorder, writer) = Recorder::start(&args.out, epoch_ms)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .context("HTTP client")?;
    let url = format!("http://{}/v1.0/publish/pubsub/{}", args.sidecar, args.topic);
    let stop_at = Instant::now() + Duration::from_secs(args.duration_secs);
    let pace = (args.rate > 0).then(|| Duration::from_micros(1_000_000 / args.rate));
    let process = args.process;
    for n in 0..args.count {
        if Instant::now() > stop_at {
            break;
        }
        let id = format!("s{process}-{n}");
        let key = format!("s{process}-k{}", n % args.keys.max(1));
        recorder.record(Op {
            op_type: Some(OpType::Invoke),
            key: Some(key.clone()),
            region: args.region.clone(),
            regions: args.reach.clone(),
            ..publish_op(process, &id, &args.topic)
        });
        let body = serde_json::json!({
            "specversion": "1.0",
            "id": id,
            "source": "/ferry/workload/sidecar",
            "type": "chaos.event",
            "subject": "chaos.sidecar",
            "data": id,
        });
        let answer = http
            .post(&url)
            .query(&[("metadata.partitionKey", key.as_str())])
            .header("content-type", "application/cloudevents+json")
            .body(body.to_string())
            .send()
            .await;
        let op = match answer {
            Ok(r) if r.status().is_success() => Op {
                op_type: Some(OpType::Ok),
                region: args.region.clone(),
                partition: Some(ferry_proto::partition_for_key(
                    key.as_bytes(),
                    args.partitions,
                )),
                ..publish_op(process, &id, &args.topic)
            },
            // A refusal may still have been written (a sync that failed after the records were
            // stored, or sent by the drainer meanwhile): unknown, not failed.
            Ok(_) | Err(_) => Op {
                op_type: Some(OpType::Info),
                ..publish_op(process, &id, &args.topic)
            },
        };
        let failed = op.op_type != Some(OpType::Ok);
        recorder.record(op);
        match pace {
            Some(pace) => tokio::time::sleep(pace).await,
            // The sidecar is down or refusing: do not spin.
            None if failed => tokio::time::sleep(Duration::from_millis(50)).await,
            None => {}
        }
    }
    drop(recorder);
    writer.await.context("history writer")??;
    Ok(())
}

async fn produce(
    connect: &Connect,
    epoch_ms: Option<u64>,
    args: ProduceArgs,
) -> anyhow::Result<()> {
    let client = connect.client()?;
    ensure_topic(&client, &args.topic, args.partitions).await?;
    let (recorder, writer) = Recorder::start(&args.out, epoch_ms)?;
    let recorder = std::sync::Arc::new(recorder);
    let stop_at = Instant::now() + Duration::from_secs(args.duration_secs);
    let subject = Subject::new("chaos.workload")?;
    let (producers_done, done) = tokio::sync::watch::channel(false);
    let mut consumers = Vec::new();
    for n in 0..args.consumers {
        consumers.push(tokio::spawn(consume(
            client.clone(),
            recorder.clone(),
            Consuming {
                process: args.process_base + args.producers + n,
                region: args.region.clone(),
                group: args.group.clone(),
                topic: args.topic.clone(),
                drain: Duration::from_secs(args.consume_drain_secs),
            },
            done.clone(),
        )));
    }
    let mut tasks = Vec::new();
    for n in 0..args.producers {
        let process = args.process_base + n;
        let client = client.clone();
        let recorder = recorder.clone();
        let subject = subject.clone();
        let topic = args.topic.clone();
        let (region, reach) = (args.region.clone(), args.reach.clone());
        let (count, keys, inflight, rate) = (args.count, args.keys, args.inflight, args.rate);
        tasks.push(tokio::spawn(async move {
            let options = ProducerOptions {
                max_in_flight: inflight,
                ..ProducerOptions::default()
            };
            // A fault may hold the whole region down as the workload starts: retry (bounded).
            let producer = loop {
                match client.producer(&topic, options.clone()).await {
                    Ok(producer) => break producer,
                    Err(e) if Instant::now() < stop_at => {
                        tracing::warn!(error = %e, "creating a producer; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => return Err(e).context("creating a producer"),
                }
            };
            let mut pending = FuturesUnordered::new();
            let outcome = |id: String, result: Result<ferry_client::PublishAck, String>| {
                recorder.record(outcome_op(process, &id, &topic, &region, result.ok()));
            };
            let pace = (rate > 0).then(|| Duration::from_micros(1_000_000 / rate));
            for n in 0..count {
                if Instant::now() > stop_at {
                    break;
                }
                let id = format!("p{process}-{n}");
                let key = format!("p{process}-k{}", n % keys.max(1));
                recorder.record(Op {
                    op_type: Some(OpType::Invoke),
                    key: Some(key.clone()),
                    region: region.clone(),
                    regions: reach.clone(),
                    ..publish_op(process, &id, &topic)
                });
                let event = Event::new(
                    id.clone(),
                    "/ferry/workload",
                    "chaos.event",
                    subject.clone(),
                    id.clone().into_bytes(),
                )
                .with_key(key);
                match producer.send(event).await {
                    Ok(ack) => pending.push(async move { (id, ack.await) }),
                    Err(e) => outcome(id, Err(e.to_string())),
                }
                while let Some(Some((id, result))) =
                    futures::FutureExt::now_or_never(pending.next())
                {
                    outcome(id, result.map_err(|e| e.to_string()));
                }
                if let Some(pace) = pace {
                    tokio::time::sleep(pace).await;
                }
            }
            while let Some((id, result)) = pending.next().await {
                outcome(id, result.map_err(|e| e.to_string()));
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await.context("producer task")??;
    }
    let _ = producers_done.send(true);
    for consumer in consumers {
        consumer.await.context("consumer task")??;
    }
    drop(recorder);
    writer.await.context("history writer")??;
    Ok(())
}

/// One member of the workload's consumer group.
struct Consuming {
    process: u64,
    region: String,
    group: String,
    topic: String,
    /// How long it keeps reading once the producers are done.
    drain: Duration,
}

/// Reads as a group member, recording what is delivered and committing it every second,
/// until `drain` after the producers finish.
async fn consume(
    client: ferry_client::Client,
    recorder: std::sync::Arc<Recorder>,
    c: Consuming,
    mut producers_done: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let member = format!("{}-member-{}", c.region, c.process);
    let mut consumer = loop {
        match GroupConsumer::join(
            client.clone(),
            &c.group,
            &c.topic,
            &member,
            ConsumerOptions::default(),
        )
        .await
        {
            Ok(consumer) => break consumer,
            Err(e) if !*producers_done.borrow() => {
                tracing::warn!(error = %e, "joining the group; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).context("joining the consumer group"),
        }
    };
    let mut stop_at: Option<Instant> = None;
    let mut handled: BTreeMap<u32, u64> = BTreeMap::new();
    let mut next_commit = Instant::now() + Duration::from_secs(1);
    loop {
        if stop_at.is_none() && *producers_done.borrow() {
            stop_at = Some(Instant::now() + c.drain);
        }
        let until = stop_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            first = consumer.next() => {
                // What is already read ahead goes into the same record, per partition.
                let mut by_partition: BTreeMap<u32, Vec<Observed>> = BTreeMap::new();
                let mut next = Some(first);
                let mut taken = 0;
                while let Some(d) = next {
                    taken += 1;
                    by_partition.entry(d.partition).or_default().push(Observed {
                        offset: d.offset,
                        id: d.event.id.clone(),
                    });
                    let h = handled.entry(d.partition).or_default();
                    *h = (*h).max(d.offset + 1);
                    // Bounded, so a long backlog still lets the loop commit and stop on time.
                    next = if taken < 1024 { consumer.try_next() } else { None };
                }
                for (partition, events) in by_partition {
                    recorder.record(Op {
                        op_type: Some(OpType::Ok),
                        process: c.process,
                        f: Some(Func::Deliver),
                        region: c.region.clone(),
                        group: Some(c.group.clone()),
                        topic: c.topic.clone(),
                        partition: Some(partition),
                        events,
                        ..Op::default()
                    });
                }
            }
            _ = producers_done.changed(), if stop_at.is_none() => {}
            _ = tokio::time::sleep_until(next_commit) => {}
            _ = tokio::time::sleep_until(until) => break,
        }
        if Instant::now() >= next_commit {
            next_commit = Instant::now() + Duration::from_secs(1);
            commit_all(&consumer, &handled).await;
        }
    }
    commit_all(&consumer, &handled).await;
    let _ = consumer.leave().await;
    Ok(())
}

/// Commits what was handled in the partitions still assigned; a failed commit only means more redeliveries later.
async fn commit_all(consumer: &GroupConsumer, handled: &BTreeMap<u32, u64>) {
    let assigned = consumer.assigned();
    for (partition, next) in handled.iter().filter(|(p, _)| assigned.contains(p)) {
        if let Err(e) = consumer.commit(*partition, *next).await {
            tracing::debug!(partition, error = %e, "commit failed");
        }
    }
}

/// How a client producer's publish ended: acknowledged (where), or given up on, which
/// leaves unknown whether it was written.
fn outcome_op(
    process: u64,
    id: &str,
    topic: &str,
    region: &str,
    ack: Option<ferry_client::PublishAck>,
) -> Op {
    match ack {
        Some(ack) => Op {
            op_type: Some(OpType::Ok),
            region: region.to_string(),
            partition: Some(ack.partition),
            offset: ack.offset,
            ..publish_op(process, id, topic)
        },
        None => Op {
            op_type: Some(OpType::Info),
            ..publish_op(process, id, topic)
        },
    }
}

fn publish_op(process: u64, id: &str, topic: &str) -> Op {
    Op {
        process,
        f: Some(Func::Publish),
        id: Some(id.to_string()),
        topic: topic.to_string(),
        ..Op::default()
    }
}

/// Event bytes per fetch of a final read: small enough that a smoke run's logs take
/// several pages, so the paging is exercised on every run.
const FINAL_READ_PAGE_BYTES: u32 = 256 << 10;

async fn collect(
    connect: &Connect,
    epoch_ms: Option<u64>,
    args: CollectArgs,
) -> anyhow::Result<()> {
    let client = connect.client()?;
    let description = client
        .describe_topic(&args.topic)
        .await
        .with_context(|| format!("describing {}", args.topic))?;
    let (recorder, writer) = Recorder::start(&args.out, epoch_ms)?;
    let timeout = Duration::from_secs(args.timeout_secs);
    let partitions = description.config.partitions;
    // A final read of every partition: linearizable fetches from the oldest retained offset
    // to the high watermark, recorded as one line with that range.
    for info in &description.partitions {
        let partition = info.partition;
        let deadline = Instant::now() + timeout;
        let low = info.low_watermark;
        let (mut offset, mut high, mut events) = (low, 0, Vec::new());
        loop {
            let (page, page_high) = tokio::time::timeout_at(
                deadline,
                client.fetch(&args.topic, partition, offset, FINAL_READ_PAGE_BYTES),
            )
            .await
            .with_context(|| format!("reading partition {partition}: timed out"))??;
            high = high.max(page_high);
            let Some((last, _)) = page.last() else { break };
            offset = last + 1;
            events.extend(page);
            if offset >= high {
                break;
            }
        }
        recorder.record(Op {
            op_type: Some(OpType::Ok),
            f: Some(Func::Read),
            is_final: true,
            region: args.region.clone(),
            topic: args.topic.clone(),
            partition: Some(partition),
            partitions: Some(partitions),
            low: Some(low),
            high: Some(high),
            events: observed(&events),
            ..Op::default()
        });
    }
    // Each node's own replica: a subscription served by that node alone from its oldest
    // retained offset, read up to what that node says it has committed and applied (its own
    // high watermark, which may be above or below the final read's).
    for node in &args.nodes {
        let (id, addr) = node
            .split_once('=')
            .with_context(|| format!("--nodes entry {node:?} is not ID=ADDR"))?;
        let id: u64 = id.parse().with_context(|| format!("node id in {node:?}"))?;
        let addr: SocketAddr = addr
            .parse()
            .with_context(|| format!("address in {node:?}"))?;
        let one = ferry_client::Client::new(ClientOptions::new(vec![addr], connect.identity()?))?;
        // The node answers describe from its own state: its high watermark per partition.
        let own_highs: BTreeMap<u32, u64> =
            match tokio::time::timeout(timeout, one.describe_topic(&args.topic)).await {
                Ok(Ok(d)) => d
                    .partitions
                    .iter()
                    .map(|p| (p.partition, p.high_watermark))
                    .collect(),
                Ok(Err(e)) => {
                    tracing::warn!(node = id, error = %e, "describing the topic on this node");
                    BTreeMap::new()
                }
                Err(_) => {
                    tracing::warn!(node = id, "describing the topic on this node timed out");
                    BTreeMap::new()
                }
            };
        // Only the partitions it holds a replica of (with more nodes than the replication
        // factor, or after moves, not every node holds every partition).
        let held = description
            .partitions
            .iter()
            .filter(|p| p.replicas.contains(&id))
            .map(|p| p.partition);
        for partition in held {
            let high = own_highs.get(&partition).copied().unwrap_or(0);
            let mut events = Vec::new();
            let mut committed = high;
            if high > 0 {
                // A replica that cannot be read to its own high watermark is recorded as
                // holding what was read of it (the checker fails it as behind), so the rest
                // of the history still counts.
                let deadline = Instant::now() + timeout;
                if let Err(e) =
                    dump_replica(&one, &args.topic, partition, high, deadline, &mut events).await
                {
                    tracing::warn!(node = id, partition, held = events.len(), high, error = %e,
                        "replica dump stopped short of the node's high watermark");
                    committed = events.last().map_or(0, |(o, _)| o + 1);
                }
            }
            recorder.record(Op {
                op_type: Some(OpType::Dump),
                node: Some(id),
                region: args.region.clone(),
                topic: args.topic.clone(),
                partition: Some(partition),
                committed: Some(committed),
                events: observed(&events),
                ..Op::default()
            });
        }
    }
    drop(recorder);
    writer.await.context("history writer")??;
    Ok(())
}

/// Reads one node's replica of a partition into `events` from its oldest retained offset
/// until it reaches `high`; an error once it fails, stops progressing for 10 s, or the
/// deadline passes.
async fn dump_replica(
    node: &ferry_client::Client,
    topic: &str,
    partition: u32,
    high: u64,
    deadline: Instant,
    events: &mut Vec<(u64, Event)>,
) -> anyhow::Result<()> {
    let idle = Duration::from_secs(10);
    let mut sub = tokio::time::timeout_at(
        deadline,
        node.subscribe(topic, partition, StartFrom::Earliest),
    )
    .await
    .context("subscribing: timed out")??;
    while sub.position().unwrap_or(0) < high {
        let until = deadline.min(Instant::now() + idle);
        match tokio::time::timeout_at(until, sub.next()).await {
            Ok(item) => events.push(item?),
            Err(_) => bail!("no progress at offset {:?}", sub.position()),
        }
    }
    Ok(())
}

fn observed(events: &[(u64, Event)]) -> Vec<Observed> {
    events
        .iter()
        .map(|(offset, e)| Observed {
            offset: *offset,
            id: e.id.clone(),
        })
        .collect()
}
