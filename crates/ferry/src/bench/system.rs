//! The system under test: a Ferry region (through ferry-client) or a NATS JetStream cluster
//! (through async-nats), behind one small surface — prepare a topic (a JetStream stream with
//! three replicas and file storage), publish with an acknowledgement future, and read
//! payloads either from now on or from the start — so every suite runs the same workload on
//! both.

use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use bytes::Bytes;
use ferry_client::{Client, Producer, ProducerOptions, StartFrom};
use ferry_proto::{Event, Subject, TopicConfig};
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::sync::mpsc;

/// An acknowledgement to wait for.
pub(crate) type Ack = BoxFuture<'static, Result<(), String>>;

/// Where the load goes.
pub(crate) enum System {
    Ferry(Client),
    Nats(Box<jetstream::Context>),
}

/// One producer's handle.
pub(crate) enum Publisher {
    Ferry(Producer, Subject),
    Nats(jetstream::Context, String),
}

/// The topic or stream as prepared: its partitions (1 for a JetStream stream) and replicas.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prepared {
    pub(crate) partitions: u32,
    pub(crate) replication: u32,
}

/// JetStream stream names cannot hold dots; the subjects are `<topic>.<partition>`.
fn stream_name(topic: &str) -> String {
    topic.replace('.', "_")
}

impl System {
    /// Connects to NATS at `urls` (`nats://host:port`, comma-separated).
    pub(crate) async fn nats(urls: &str) -> anyhow::Result<Self> {
        let servers: Vec<String> = urls.split(',').map(|s| s.trim().to_string()).collect();
        let client = async_nats::ConnectOptions::new()
            .name("ferry-bench")
            .connect(servers)
            .await
            .with_context(|| format!("connecting to NATS at {urls}"))?;
        let js = jetstream::ContextBuilder::new()
            .max_ack_inflight(1 << 16)
            .timeout(Duration::from_secs(30))
            .build(client);
        Ok(Self::Nats(Box::new(js)))
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Ferry(_) => "ferry",
            Self::Nats(_) => "nats",
        }
    }

    /// Creates the topic (Ferry: `partitions` in `groups` Raft groups, 0 for the region's
    /// default, replication 3) or stream (NATS: replicas 3, file storage) if missing, and
    /// waits until it takes writes.
    pub(crate) async fn prepare(
        &self,
        topic: &str,
        partitions: u32,
        groups: u32,
        local_bytes: Option<u64>,
    ) -> anyhow::Result<Prepared> {
        match self {
            Self::Ferry(client) => {
                let mut config = TopicConfig::new(topic.to_string(), partitions);
                config.groups = groups;
                config.retention.local_max_bytes = local_bytes;
                let d = super::ensure_topic(client, &config).await?;
                Ok(Prepared {
                    partitions: d.config.partitions,
                    replication: d.config.replication,
                })
            }
            Self::Nats(_) if local_bytes.is_some() => {
                anyhow::bail!("--local-bytes makes a tiered Ferry topic; JetStream has none")
            }
            Self::Nats(js) => {
                let stream = js
                    .get_or_create_stream(jetstream::stream::Config {
                        name: stream_name(topic),
                        subjects: vec![format!("{topic}.>")],
                        num_replicas: 3,
                        storage: jetstream::stream::StorageType::File,
                        ..Default::default()
                    })
                    .await
                    .with_context(|| format!("creating JetStream stream {}", stream_name(topic)))?;
                let mut stream = stream;
                let info = stream.info().await?;
                anyhow::ensure!(
                    info.config.num_replicas == 3
                        && info.config.storage == jetstream::stream::StorageType::File,
                    "stream {} exists with {} replicas and {:?} storage; the bench needs 3 and file",
                    info.config.name,
                    info.config.num_replicas,
                    info.config.storage
                );
                Ok(Prepared {
                    partitions: 1,
                    replication: 3,
                })
            }
        }
    }

    /// Bytes of events a Ferry topic's partitions hold on their replicas and in the object
    /// store (as the nodes answering say), and whether every partition is within `hot`
    /// locally (its uploads caught up).
    pub(crate) async fn tiers(&self, topic: &str, hot: u64) -> anyhow::Result<(u64, u64, bool)> {
        match self {
            Self::Ferry(client) => {
                let d = client.describe_topic(topic).await?;
                let local = d.partitions.iter().map(|p| p.local_bytes).sum();
                let remote = d.partitions.iter().map(|p| p.remote_bytes).sum();
                // Files roll at a quarter of the hot tail: the one being written stays.
                let caught_up = d.partitions.iter().all(|p| p.local_bytes <= hot + hot / 4);
                Ok((local, remote, caught_up))
            }
            Self::Nats(_) => anyhow::bail!("JetStream has no tiered storage"),
        }
    }

    /// Waits (at most 300 s) until every partition of a tiered Ferry topic is within `hot`
    /// locally; answers how long it took and the bytes then in the object store.
    pub(crate) async fn uploads_caught_up(
        &self,
        topic: &str,
        hot: u64,
    ) -> anyhow::Result<(f64, u64)> {
        let started = Instant::now();
        loop {
            let (local, remote, caught_up) = self.tiers(topic, hot).await?;
            if caught_up {
                return Ok((started.elapsed().as_secs_f64(), remote));
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(300),
                "{topic}: uploads did not catch up in 300 s ({local} bytes local, {remote} remote)"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many events the topic or stream holds.
    pub(crate) async fn stored(&self, topic: &str) -> anyhow::Result<u64> {
        match self {
            Self::Ferry(client) => {
                let d = client.describe_topic(topic).await?;
                Ok(d.partitions.iter().map(|p| p.high_watermark).sum())
            }
            Self::Nats(js) => {
                let mut stream = js.get_stream(stream_name(topic)).await?;
                Ok(stream.info().await?.state.messages)
            }
        }
    }

    /// A producer with `options.max_in_flight` events in flight at most (NATS takes only
    /// the window; its client keeps that many publishes unacknowledged).
    pub(crate) async fn publisher(
        &self,
        topic: &str,
        options: ProducerOptions,
    ) -> anyhow::Result<Publisher> {
        match self {
            Self::Ferry(client) => {
                let producer = client.producer(topic, options).await?;
                Ok(Publisher::Ferry(
                    producer,
                    Subject::new(format!("{topic}.bench"))?,
                ))
            }
            Self::Nats(js) => Ok(Publisher::Nats(js.as_ref().clone(), topic.to_string())),
        }
    }

    /// Payloads of every event stored from now on, in any order across partitions.
    pub(crate) async fn tail(&self, topic: &str) -> anyhow::Result<mpsc::Receiver<Bytes>> {
        self.read(topic, false).await
    }

    /// Payloads of every stored event, from the start.
    pub(crate) async fn everything(&self, topic: &str) -> anyhow::Result<mpsc::Receiver<Bytes>> {
        self.read(topic, true).await
    }

    async fn read(&self, topic: &str, from_start: bool) -> anyhow::Result<mpsc::Receiver<Bytes>> {
        let (tx, rx) = mpsc::channel(1 << 14);
        match self {
            Self::Ferry(client) => {
                let d = client.describe_topic(topic).await?;
                for p in &d.partitions {
                    let from = if from_start {
                        StartFrom::Earliest
                    } else {
                        StartFrom::Offset(p.high_watermark)
                    };
                    let mut subscription = client.subscribe(topic, p.partition, from).await?;
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        while let Ok((_, event)) = subscription.next().await {
                            if tx.send(event.data).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
            Self::Nats(js) => {
                let stream = js.get_stream(stream_name(topic)).await?;
                let deliver_policy = if from_start {
                    jetstream::consumer::DeliverPolicy::All
                } else {
                    jetstream::consumer::DeliverPolicy::New
                };
                let consumer = stream
                    .create_consumer(jetstream::consumer::pull::Config {
                        deliver_policy,
                        ack_policy: jetstream::consumer::AckPolicy::None,
                        inactive_threshold: Duration::from_secs(30),
                        ..Default::default()
                    })
                    .await?;
                let mut messages = consumer
                    .stream()
                    .max_messages_per_batch(1000)
                    .messages()
                    .await?;
                tokio::spawn(async move {
                    while let Some(Ok(message)) = messages.next().await {
                        if tx.send(message.payload.clone()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
        Ok(rx)
    }
}

impl Publisher {
    /// Sends one event (id and key for Ferry; the subject picks one of `partitions` for
    /// NATS) and answers its acknowledgement once the event is on its way.
    pub(crate) async fn send(&self, id: String, key: u64, payload: Bytes) -> Result<Ack, String> {
        match self {
            Self::Ferry(producer, subject) => {
                let event = Event::new(id, "/ferry/bench", "bench.event", subject.clone(), payload)
                    .with_key(format!("k{key}"));
                let ack = producer.send(event).await.map_err(|e| e.to_string())?;
                Ok(Box::pin(async move {
                    ack.await.map(|_| ()).map_err(|e| e.to_string())
                }))
            }
            Self::Nats(js, topic) => {
                let ack = js
                    .publish(format!("{topic}.k{}", key % 64), payload)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(Box::pin(async move {
                    ack.await.map(|_| ()).map_err(|e| e.to_string())
                }))
            }
        }
    }
}
