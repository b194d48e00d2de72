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
    },
    /// List topics.
    List,
    /// Describe a topic: partitions, leaders, replicas, offsets.
    Describe {
        /// Name.
        name: String,
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
                println!(
                    "  partition {:>3}  group {:>3}  leader {leader:>4}  replicas {:?}  offsets {}..{}",
                    p.partition,
                    c.group_of(p.partition),
                    p.replicas,
                    p.low_watermark,
                    p.high_watermark
                );
            }
            for n in &d.nodes {
                println!("  node {} at {}", n.id, n.client_addr);
            }
            Ok(())
        }
    }
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
