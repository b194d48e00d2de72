//! `ferry ctl`: topics, publish and tail against a region.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use ferry_client::{Client, ClientOptions, ProducerOptions, StartFrom};
use ferry_net::tls::TlsIdentity;
use ferry_proto::wire::{ErrorCode, MeshReport};
use ferry_proto::{
    Event, EventClass, RegionPolicy, Retention, Subject, SubjectFilter, TopicConfig,
};
use tokio::io::AsyncBufReadExt;

/// How to reach the region; shared by `ctl` and `bench`.
#[derive(Args, Clone)]
pub(crate) struct Connect {
    /// Node addresses (any of the region's nodes).
    #[arg(
        long,
        env = "FERRY_SERVERS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7401,127.0.0.1:7402,127.0.0.1:7403"
    )]
    pub(crate) servers: Vec<SocketAddr>,
    /// Folder with ca.pem and the client's certificate (what `ferry dev` prints).
    #[arg(long, env = "FERRY_CERTS", default_value = "ferry-dev/certs")]
    pub(crate) certs: PathBuf,
    /// Client certificate name: loads client-NAME.pem and client-NAME.key.
    #[arg(long, default_value = "ctl")]
    pub(crate) client: String,
}

impl Connect {
    pub(crate) fn identity(&self) -> anyhow::Result<TlsIdentity> {
        TlsIdentity::load(
            &self.certs.join("ca.pem"),
            &self.certs.join(format!("client-{}.pem", self.client)),
            &self.certs.join(format!("client-{}.key", self.client)),
        )
        .context("loading the client certificate (set --certs or FERRY_CERTS)")
    }

    pub(crate) fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::new(ClientOptions::new(
            self.servers.clone(),
            self.identity()?,
        ))?)
    }
}

#[derive(Args)]
pub(crate) struct CtlArgs {
    #[command(flatten)]
    connect: Connect,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Topics.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// Publish events: one per DATA argument, or one per line of standard input.
    Publish {
        /// Topic.
        topic: String,
        /// Event payloads.
        data: Vec<String>,
        /// Partition key (events with one key stay ordered).
        #[arg(long)]
        key: Option<String>,
        /// Subject.
        #[arg(long, default_value = "ctl.published")]
        subject: String,
        /// CloudEvents type.
        #[arg(long = "type", default_value = "ferry.ctl.publish")]
        ty: String,
        /// CloudEvents source.
        #[arg(long, default_value = "/ferry/ctl")]
        source: String,
    },
    /// Interests of this region: what it wants forwarded from other regions.
    Interest {
        #[command(subcommand)]
        command: InterestCommand,
    },
    /// The mesh: regions, nodes, links, interests and forwarding lag.
    Regions,
    /// Spread replicas (by count) and preferred leaders evenly over the region's nodes:
    /// prints the plan and carries it out, a few moves per node at a time.
    Rebalance {
        /// Only print the plan.
        #[arg(long)]
        dry_run: bool,
    },
    /// The region's nodes: list, add, drain, remove.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Print events as they are committed.
    Tail {
        /// Topic.
        topic: String,
        /// Only this partition (default: all).
        #[arg(long)]
        partition: Option<u32>,
        /// earliest, latest, or an offset.
        #[arg(long, default_value = "earliest")]
        from: String,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// List the region's nodes: address, metadata vote, replicas held and moves under way.
    List,
    /// Add a node that runs but is not in the region yet (a node started with `seeds` joins
    /// by itself): the region dials it, checks its certificate, and adds it.
    Add {
        /// Its node id (its certificate must name it).
        id: u64,
        /// Its QUIC address, host:port.
        addr: String,
    },
    /// Move every replica and leadership off a node (it takes no new ones), a few at a time.
    Drain {
        /// The node.
        id: u64,
        /// Make it take replicas again instead.
        #[arg(long)]
        undo: bool,
        /// Return once the drain is recorded, without waiting for the moves.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the moves, seconds.
        #[arg(long, default_value_t = 600)]
        wait_secs: u64,
    },
    /// Remove a node from the region. Refused while it holds replicas (drain it first),
    /// unless --dead.
    Remove {
        /// The node.
        id: u64,
        /// The node is gone for good (its disk lost): its replicas are made again on the
        /// other nodes from the surviving replicas.
        #[arg(long)]
        dead: bool,
    },
}

#[derive(Subcommand)]
enum InterestCommand {
    /// Add (or replace) a named interest in a subject filter, e.g. `orders.>`.
    Add {
        /// Who holds it (a consumer group, a service).
        name: String,
        /// Subject filter (`*` one token, `>` the rest).
        subjects: String,
        /// Return once the region committed it, without waiting for the other regions to
        /// learn it (delivery does not depend on the wait).
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for every other region to learn it, seconds.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=600))]
        wait_secs: u64,
    },
    /// Remove a named interest.
    Remove {
        /// Its name.
        name: String,
    },
    /// List the region's interests.
    List,
}

#[derive(Subcommand)]
enum TopicCommand {
    /// Create a topic.
    Create {
        /// Name.
        name: String,
        /// Partitions.
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Replicas per partition.
        #[arg(long, default_value_t = 3)]
        replication: u32,
        /// Raft groups the partitions share (partition p is replicated by group p % groups);
        /// 0: one per node of the region, at most one per partition.
        #[arg(long, default_value_t = 0)]
        groups: u32,
        /// Subject filter the topic accepts.
        #[arg(long, default_value = ">")]
        subjects: String,
        /// domain, integration or notification.
        #[arg(long, default_value = "domain")]
        class: String,
        /// Which regions receive it: `local`, `interest`, or a comma-separated list of
        /// regions. Default: `local` for domain topics, `interest` for the others.
        #[arg(long)]
        regions: Option<String>,
        /// Drop events older than this many seconds.
        #[arg(long)]
        retention_seconds: Option<u64>,
        /// Keep at most this many bytes per partition.
        #[arg(long)]
        retention_bytes: Option<u64>,
        /// Keep events until every other region's forwarder passed them, whatever the two
        /// bounds above say; a partition holding this many bytes refuses publishes until
        /// forwarding catches up.
        #[arg(long)]
        keep_until_forwarded_max_bytes: Option<u64>,
        /// Tiered storage: keep about this many bytes per partition on the replicas' disks and
        /// move older events to the region's object store (the two retention bounds above
        /// then bound the total; without them events are kept for ever).
        #[arg(long)]
        local_bytes: Option<u64>,
        /// With --local-bytes: a partition holding this many bytes locally (its uploads being
        /// behind) refuses publishes until they catch up. Default: 8 × --local-bytes.
        #[arg(long)]
        local_limit_bytes: Option<u64>,
    },
    /// List topics.
    List,
    /// Describe a topic: partitions, leaders, replicas, offsets, moves under way.
    Describe {
        /// Name.
        name: String,
    },
    /// Move the replica of a partition's Raft group (every partition the group replicates)
    /// from one node to another, online.
    Move {
        /// Topic.
        name: String,
        /// A partition of the group.
        partition: u32,
        /// The node that gives its replica up.
        #[arg(long)]
        from: u64,
        /// The node that takes it.
        #[arg(long)]
        to: u64,
    },
    /// Grow a topic to N partitions (at most doubling it), online: each new partition takes
    /// keys from one existing partition (its parent), which is sealed for them at an offset. Waits
    /// until every seal is recorded.
    AddPartitions {
        /// Topic.
        name: String,
        /// The partition count to grow to.
        partitions: u32,
        /// How long to wait for the seals.
        #[arg(long, default_value_t = 60)]
        wait_secs: u64,
    },
}

fn parse_from(text: &str) -> anyhow::Result<StartFrom> {
    Ok(match text {
        "earliest" => StartFrom::Earliest,
        "latest" => StartFrom::Latest,
        n => StartFrom::Offset(
            n.parse()
                .with_context(|| format!("--from {n:?}: expected earliest, latest or an offset"))?,
        ),
    })
}

pub(crate) async fn run(args: CtlArgs) -> anyhow::Result<()> {
    let client = args.connect.client()?;
    match args.command {
        CtlCommand::Topic { command } => topic(&client, command).await,
        CtlCommand::Interest { command } => match command {
            InterestCommand::Add {
                name,
                subjects,
                no_wait,
                wait_secs,
            } => {
                SubjectFilter::new(subjects.clone())?;
                let version = client.add_interest(&name, &subjects).await?;
                println!(
                    "interest {name} in {subjects} added (interest version {version}): events \
                     appended in other regions from now on are forwarded here"
                );
                if no_wait {
                    return Ok(());
                }
                let reach = client
                    .await_interest(version, Duration::from_secs(wait_secs))
                    .await?;
                if !reach.seen_by.is_empty() {
                    println!("seen by {}", reach.seen_by.join(", "));
                }
                if !reach.waiting_for.is_empty() {
                    println!(
                        "not yet seen by {} after {wait_secs} s (unreachable or slow): their \
                         forwarders hold matching events until they learn it",
                        reach.waiting_for.join(", ")
                    );
                }
                Ok(())
            }
            InterestCommand::Remove { name } => {
                client.remove_interest(&name).await?;
                println!("interest {name} removed");
                Ok(())
            }
            InterestCommand::List => {
                for (name, subjects) in client.interests().await? {
                    println!("{name}\t{subjects}");
                }
                Ok(())
            }
        },
        CtlCommand::Regions => print_regions(&client.regions().await?),
        CtlCommand::Node { command } => node(&client, command).await,
        CtlCommand::Rebalance { dry_run } => {
            let plan = client.rebalance(dry_run).await?;
            if plan.is_empty() {
                println!("the region is balanced: nothing to do");
                return Ok(());
            }
            for c in &plan {
                match c.from {
                    Some(from) => println!(
                        "move the replica of {} group {} from node {from} to node {}",
                        c.topic, c.group, c.to
                    ),
                    None => println!(
                        "make node {} the preferred leader of {} group {}",
                        c.to, c.topic, c.group
                    ),
                }
            }
            if dry_run {
                println!("(dry run: nothing changed)");
            } else {
                println!(
                    "rebalancing: `ferry ctl node list` shows the moves under way; leaders follow \
                     once they are done"
                );
            }
            Ok(())
        }
        CtlCommand::Publish {
            topic,
            data,
            key,
            subject,
            ty,
            source,
        } => {
            let subject = Subject::new(subject)?;
            let producer = client.producer(&topic, ProducerOptions::default()).await?;
            let make = |i: usize, payload: String| {
                let mut e = Event::new(
                    format!("ctl-{}-{i}", producer.id()),
                    source.clone(),
                    ty.clone(),
                    subject.clone(),
                    payload.into_bytes(),
                );
                e.datacontenttype = Some("text/plain".into());
                if let Some(k) = &key {
                    e = e.with_key(k.clone().into_bytes());
                }
                e
            };
            let mut payloads = data;
            if payloads.is_empty() {
                let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
                while let Some(line) = lines.next_line().await? {
                    payloads.push(line);
                }
            }
            let mut acks = Vec::new();
            for (i, payload) in payloads.into_iter().enumerate() {
                acks.push(producer.send(make(i, payload)).await?);
            }
            for ack in acks {
                let ack = ack.await?;
                match ack.offset {
                    Some(offset) => {
                        println!("published to {topic}/{} at offset {offset}", ack.partition)
                    }
                    None => println!(
                        "published to {topic}/{} by an earlier send, at an offset the partition no longer remembers",
                        ack.partition
                    ),
                }
            }
            Ok(())
        }
        CtlCommand::Tail {
            topic,
            partition,
            from,
            count,
        } => {
            let from = parse_from(&from)?;
            let description = describe_when_defined(&client, &topic).await?;
            let partitions: Vec<u32> = match partition {
                Some(p) if p < description.config.partitions => vec![p],
                Some(p) => bail!(
                    "topic {topic} has {} partitions; {p} is out of range",
                    description.config.partitions
                ),
                None => (0..description.config.partitions).collect(),
            };
            let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
            for p in partitions {
                let client = client.clone();
                let topic = topic.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut sub = match client.subscribe(&topic, p, from).await {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    };
                    loop {
                        let item = sub.next().await.map(|(o, e)| (p, o, e));
                        let stop = item.is_err();
                        if tx.send(item).await.is_err() || stop {
                            return;
                        }
                    }
                });
            }
            drop(tx);
            let mut printed = 0u64;
            while let Some(item) = rx.recv().await {
                let (p, offset, event) = item?;
                let key = event
                    .key
                    .as_ref()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default();
                println!(
                    "{topic}/{p}@{offset} key={key} subject={} id={} {}",
                    event.subject,
                    event.id,
                    String::from_utf8_lossy(&event.data)
                );
                printed += 1;
                if count.is_some_and(|c| printed >= c) {
                    break;
                }
            }
            Ok(())
        }
    }
}

/// How long `tail` waits for a topic this region does not have yet.
const TOPIC_WAIT: Duration = Duration::from_secs(30);

/// The topic's description; a topic this region lacks is waited for (up to [`TOPIC_WAIT`]),
/// since another region's forwarding defines integration and notification topics here.
async fn describe_when_defined(
    client: &Client,
    topic: &str,
) -> anyhow::Result<ferry_proto::wire::TopicDescription> {
    let deadline = tokio::time::Instant::now() + TOPIC_WAIT;
    let mut said = false;
    loop {
        match client.describe_topic(topic).await {
            Err(e)
                if e.code() == Some(ErrorCode::UnknownTopic)
                    && tokio::time::Instant::now() < deadline =>
            {
                if !said {
                    eprintln!(
                        "no topic {topic} in this region yet; waiting up to {} s for it (created \
                         here, or defined by another region that forwards it)",
                        TOPIC_WAIT.as_secs()
                    );
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return Ok(other?),
        }
    }
}

async fn topic(client: &Client, command: TopicCommand) -> anyhow::Result<()> {
    match command {
        TopicCommand::Create {
            name,
            partitions,
            replication,
            groups,
            subjects,
            class,
            regions,
            retention_seconds,
            retention_bytes,
            keep_until_forwarded_max_bytes: hard_max_bytes,
            local_bytes,
            local_limit_bytes,
        } => {
            let mut config = TopicConfig::new(name.clone(), partitions);
            config.replication = replication;
            config.groups = groups;
            config.subjects = SubjectFilter::new(subjects)?;
            config.class = class.parse::<EventClass>()?;
            config.regions = match regions.as_deref() {
                None if config.class == EventClass::Domain => RegionPolicy::Local,
                None | Some("interest") => RegionPolicy::ByInterest,
                Some("local") => RegionPolicy::Local,
                Some(list) => RegionPolicy::Listed(
                    list.split(',')
                        .map(|r| r.trim().to_string())
                        .filter(|r| !r.is_empty())
                        .collect(),
                ),
            };
            config.retention = Retention {
                max_age_ms: retention_seconds.map(|s| s * 1000),
                max_bytes: retention_bytes,
                keep_until_forwarded: hard_max_bytes.is_some(),
                hard_max_bytes,
                local_max_bytes: local_bytes,
                local_limit_bytes,
            };
            client.create_topic(config).await?;
            // Wait (bounded) until every partition has a leader, so the next command works.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            loop {
                let d = client.describe_topic(&name).await?;
                if d.partitions.iter().all(|p| p.leader.is_some()) {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    println!("created topic {name}; some partitions are still electing a leader");
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            println!(
                "created topic {name} with {partitions} partitions, replication {replication}"
            );
            Ok(())
        }
        TopicCommand::List => {
            for t in client.list_topics().await? {
                println!(
                    "{}\tpartitions={}\treplication={}\tclass={:?}\tsubjects={}",
                    t.name, t.partitions, t.replication, t.class, t.subjects
                );
            }
            Ok(())
        }
        TopicCommand::Describe { name } => {
            let d = client.describe_topic(&name).await?;
            let c = &d.config;
            println!(
                "topic {}: {} partitions in {} Raft groups, replication {}, class {:?}, subjects {}, retention age {:?} ms bytes {:?}",
                c.name, c.partitions, c.groups, c.replication, c.class, c.subjects, c.retention.max_age_ms, c.retention.max_bytes
            );
            for p in &d.partitions {
                let leader = p.leader.map_or("none".to_string(), |l| l.to_string());
                let split = match d.layout.split_of(p.partition) {
                    Some(s) => match s.seal {
                        Some(seal) => {
                            format!("  split from {} at its offset {seal}", s.parent)
                        }
                        None => format!("  splitting from {} (not sealed yet)", s.parent),
                    },
                    None => String::new(),
                };
                // Tiered: which offsets are in the object store, which on the replicas.
                let tiered = if c.retention.tiered() {
                    format!(
                        "  remote {}..{} ({} objects, {} bytes)  local {}..{} ({} bytes)",
                        p.low_watermark,
                        p.local_from,
                        p.remote_objects,
                        p.remote_bytes,
                        p.local_from,
                        p.high_watermark,
                        p.local_bytes
                    )
                } else {
                    String::new()
                };
                println!(
                    "  partition {:>3}  group {:>3}  leader {leader:>4}  replicas {:?}  offsets {}..{}{tiered}{split}",
                    p.partition,
                    c.group_of(d.layout.root(p.partition)),
                    p.replicas,
                    p.low_watermark,
                    p.high_watermark
                );
            }
            for n in &d.nodes {
                println!("  node {} at {}", n.id, n.client_addr);
            }
            for m in &d.moves {
                println!(
                    "  moving group {} from node {} to node {} for {:.1} s: {}",
                    m.group,
                    m.from,
                    m.to,
                    now_ms().saturating_sub(m.since_ms) as f64 / 1000.0,
                    m.progress
                );
            }
            Ok(())
        }
        TopicCommand::AddPartitions {
            name,
            partitions,
            wait_secs,
        } => {
            client.add_partitions(&name, partitions).await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_secs);
            loop {
                let d = client.describe_topic(&name).await?;
                let open: Vec<u32> = d.layout.unsealed().map(|s| s.parent).collect();
                if open.is_empty() && d.config.partitions >= partitions {
                    println!(
                        "topic {name} has {} partitions; every split parent is sealed",
                        d.config.partitions
                    );
                    return Ok(());
                }
                if tokio::time::Instant::now() > deadline {
                    anyhow::bail!(
                        "topic {name} grew to {partitions} partitions, but partitions {open:?} \
                         are not sealed after {wait_secs} s (their groups need a leader); \
                         `ferry ctl topic describe {name}` shows the splits"
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        TopicCommand::Move {
            name,
            partition,
            from,
            to,
        } => {
            client.move_replica(&name, partition, from, to).await?;
            println!(
                "moving the replica of {name}/{partition}'s group from node {from} to node {to}; \
                 `ferry ctl topic describe {name}` shows its progress"
            );
            Ok(())
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn print_nodes(nodes: &[ferry_proto::wire::NodeInfo]) {
    for n in nodes {
        println!(
            "node {:<4} {:<22} {:<7} {:<8} replicas {:>4}  moving in {:>3} out {:>3}",
            n.id,
            n.addr,
            if n.voter { "voter" } else { "learner" },
            if n.draining { "draining" } else { "active" },
            n.replicas,
            n.moving_in,
            n.moving_out
        );
    }
}

async fn node(client: &Client, command: NodeCommand) -> anyhow::Result<()> {
    match command {
        NodeCommand::List => print_nodes(&client.list_nodes().await?),
        NodeCommand::Add { id, addr } => {
            let nodes = client.add_node(id, &addr).await?;
            println!("node {id} at {addr} added to the region");
            print_nodes(&nodes);
        }
        NodeCommand::Drain {
            id,
            undo,
            no_wait,
            wait_secs,
        } => {
            client.drain_node(id, undo).await?;
            if undo {
                println!("node {id} takes replicas again");
                return Ok(());
            }
            println!("draining node {id}: its replicas and leaderships move to other nodes");
            if no_wait {
                return Ok(());
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_secs);
            loop {
                let nodes = client.list_nodes().await?;
                let Some(n) = nodes.iter().find(|n| n.id == id) else {
                    bail!("node {id} is no longer in the region");
                };
                if n.replicas == 0 && n.moving_out == 0 {
                    println!(
                        "node {id} holds no replicas: remove it with `ferry ctl node remove {id}`"
                    );
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    bail!(
                        "node {id} still holds {} replicas after {wait_secs} s ({} moving); the \
                         drain goes on",
                        n.replicas,
                        n.moving_out
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        NodeCommand::Remove { id, dead } => {
            let nodes = client.remove_node(id, dead).await?;
            if dead {
                println!("node {id} removed; its replicas are made again on the other nodes");
            } else {
                println!("node {id} removed from the region");
            }
            print_nodes(&nodes);
        }
    }
    Ok(())
}

fn print_regions(report: &MeshReport) -> anyhow::Result<()> {
    println!(
        "as seen by node {} in region {}",
        report.node, report.region
    );
    let mut regions: Vec<&str> = report.nodes.iter().map(|n| n.region.as_str()).collect();
    regions.dedup();
    println!("regions: {}", regions.join(", "));
    println!("nodes:");
    for n in &report.nodes {
        let reach = if n.reach.is_empty() {
            "-".to_string()
        } else {
            n.reach.join(",")
        };
        println!(
            "  {:<10} node {:<4} {:<22} {:<5} leads {:<4} groups  load {:>7} ev/s  links to {reach}",
            n.region, n.id, n.addr, n.role, n.leads, n.load
        );
    }
    println!("interests:");
    for (region, filters) in &report.interests {
        println!("  {region:<10} {}", filters.join(" "));
    }
    println!("forwarding (source region {}):", report.region);
    for f in &report.forwarding {
        println!(
            "  {}/{} -> {:<10} lag {:>7} events {:>8.3} s  sent {:>9}  route {:<10} {}",
            f.topic,
            f.partition,
            match f.dest_partition {
                None => f.destination.clone(),
                Some(q) => format!("{}#{q}", f.destination),
            },
            f.lag_events,
            f.lag_ms as f64 / 1000.0,
            f.sent_events,
            if f.route.is_empty() { "-" } else { &f.route },
            [
                (f.trimmed_unforwarded > 0).then(|| format!(
                    "TRIMMED BEFORE FORWARDING: {} offsets",
                    f.trimmed_unforwarded
                )),
                f.last_error.as_deref().map(|e| format!("error: {e}")),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("  ")
        );
    }
    Ok(())
}
