//! A member of a consumer group: heartbeats its membership, reads the partitions assigned to
//! it (each from the group's committed cursor), and commits what the application says it has
//! handled. Delivery is at-least-once: after a rebalance or a restart a partition resumes from
//! its last commit, so events handled but not yet committed come again.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_proto::wire::StartFrom;
use ferry_proto::Event;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::{Client, ClientError};

/// How a [`GroupConsumer`] behaves.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// How often membership is renewed (keep it well under the node's
    /// `group_session_timeout_ms`, 10 s by default).
    pub heartbeat: Duration,
    /// Where a partition with no committed cursor starts.
    pub start: StartFrom,
    /// Events read ahead of the application, across all partitions.
    pub buffer: usize,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(2),
            start: StartFrom::Earliest,
            buffer: 4096,
        }
    }
}

/// One event handed to the application.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Partition it came from.
    pub partition: u32,
    /// Its offset there.
    pub offset: u64,
    /// The event.
    pub event: Event,
}

/// A member of a consumer group on one topic.
pub struct GroupConsumer {
    client: Client,
    group: String,
    topic: String,
    member: String,
    options: ConsumerOptions,
    generation: u64,
    /// Per assigned partition: the reader's number and its task.
    readers: BTreeMap<u32, (u64, JoinHandle<()>)>,
    readers_started: u64,
    /// Deliveries tagged with the number of the reader that read them, so what a revoked
    /// reader left in the channel is dropped rather than handed out.
    tx: mpsc::Sender<(u64, Delivery)>,
    rx: mpsc::Receiver<(u64, Delivery)>,
    next_heartbeat: Instant,
}

impl GroupConsumer {
    /// Joins `group` on `topic` as `member` (unique within the group) and starts reading the
    /// partitions it is given.
    pub async fn join(
        client: Client,
        group: &str,
        topic: &str,
        member: &str,
        options: ConsumerOptions,
    ) -> Result<Self, ClientError> {
        let (tx, rx) = mpsc::channel(options.buffer.max(1));
        let mut consumer = Self {
            client,
            group: group.to_string(),
            topic: topic.to_string(),
            member: member.to_string(),
            next_heartbeat: Instant::now(),
            options,
            generation: 0,
            readers: BTreeMap::new(),
            readers_started: 0,
            tx,
            rx,
        };
        consumer.heartbeat().await?;
        Ok(consumer)
    }

    /// Partitions this member reads now.
    pub fn assigned(&self) -> Vec<u32> {
        self.readers.keys().copied().collect()
    }

    /// The group generation this member last saw.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The next event of any assigned partition, renewing membership as it waits. A failed
    /// heartbeat (no node reachable) is retried on the next beat; the partitions keep being
    /// read meanwhile.
    pub async fn next(&mut self) -> Delivery {
        loop {
            let beat = self.next_heartbeat;
            tokio::select! {
                delivery = self.rx.recv() => {
                    // The consumer holds a sender, so the channel never closes.
                    if let Some(d) = delivery.and_then(|d| self.current(d)) {
                        return d;
                    }
                }
                _ = tokio::time::sleep_until(beat) => {
                    if let Err(e) = self.heartbeat().await {
                        tracing::debug!(group = %self.group, error = %e, "heartbeat failed");
                    }
                }
            }
        }
    }

    /// An event already read ahead, if there is one, without waiting.
    pub fn try_next(&mut self) -> Option<Delivery> {
        while let Ok(d) = self.rx.try_recv() {
            if let Some(d) = self.current(d) {
                return Some(d);
            }
        }
        None
    }

    /// The delivery, if the reader that read it still holds its partition.
    fn current(&self, (reader, d): (u64, Delivery)) -> Option<Delivery> {
        let holder = self.readers.get(&d.partition).map(|(n, _)| *n);
        (holder == Some(reader)).then_some(d)
    }

    /// Records that every event of `partition` below `next_offset` is handled.
    pub async fn commit(&self, partition: u32, next_offset: u64) -> Result<(), ClientError> {
        self.client
            .commit(&self.group, &self.topic, partition, next_offset)
            .await
    }

    /// Leaves the group, so the others take over its partitions at once.
    pub async fn leave(mut self) -> Result<(), ClientError> {
        self.stop_readers(|_| true);
        self.client
            .leave_group(&self.group, &self.topic, &self.member)
            .await
    }

    async fn heartbeat(&mut self) -> Result<(), ClientError> {
        self.next_heartbeat = Instant::now() + self.options.heartbeat;
        let (generation, partitions) = self
            .client
            .join_group(&self.group, &self.topic, &self.member)
            .await?;
        self.generation = generation;
        self.stop_readers(|p| !partitions.contains(&p));
        for partition in partitions {
            if !self.readers.contains_key(&partition) {
                self.readers_started += 1;
                let number = self.readers_started;
                let reader = tokio::spawn(read_partition(
                    self.client.clone(),
                    Reading {
                        number,
                        group: self.group.clone(),
                        topic: self.topic.clone(),
                        partition,
                        start: self.options.start,
                    },
                    self.tx.clone(),
                ));
                self.readers.insert(partition, (number, reader));
            }
        }
        Ok(())
    }

    fn stop_readers(&mut self, revoked: impl Fn(u32) -> bool) {
        self.readers.retain(|p, (_, reader)| {
            let keep = !revoked(*p);
            if !keep {
                reader.abort();
            }
            keep
        });
    }
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        self.stop_readers(|_| true);
    }
}

/// What one partition reader reads.
struct Reading {
    number: u64,
    group: String,
    topic: String,
    partition: u32,
    start: StartFrom,
}

/// Reads one partition into `tx` from the group's committed cursor, resuming after errors
/// from the last offset passed on, until aborted.
async fn read_partition(client: Client, reading: Reading, tx: mpsc::Sender<(u64, Delivery)>) {
    let Reading {
        number,
        group,
        topic,
        partition,
        start,
    } = reading;
    let mut from: Option<u64> = None;
    loop {
        let start_at = match from {
            Some(offset) => Ok(StartFrom::Offset(offset)),
            None => client
                .committed(&group, &topic, partition)
                .await
                .map(|c| c.map_or(start, StartFrom::Offset)),
        };
        let subscription = match start_at {
            Ok(at) => client.subscribe(&topic, partition, at).await,
            Err(e) => Err(e),
        };
        let mut subscription = match subscription {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%topic, partition, error = %e, "group reader retries");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        loop {
            match subscription.next().await {
                Ok((offset, event)) => {
                    from = Some(offset + 1);
                    let delivery = Delivery {
                        partition,
                        offset,
                        event,
                    };
                    if tx.send((number, delivery)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(%topic, partition, error = %e, "group reader resubscribes");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            }
        }
    }
}
