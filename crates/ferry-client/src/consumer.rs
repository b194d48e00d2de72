//! A member of a consumer group: heartbeats its membership, reads the partitions assigned to
//! it (each from the group's committed cursor), and commits what the application says it has
//! handled. Delivery is at-least-once: after a rebalance or a restart a partition resumes from
//! its last commit, so events handled but not yet committed come again.
//!
//! Per-key order across a split: a partition added to the topic (a split's child) is read
//! only once the group committed its parent up to the seal (or the parent holds nothing
//! before it any more), so a key's events that stayed in the parent are handed out, and
//! committed, before those that went to the child. Commit as you go: a group that never
//! commits a parent never reads its children.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_proto::wire::StartFrom;
use ferry_proto::Event;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

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

/// The generation and partitions the group last gave this member.
type Assignment = (u64, Vec<u32>);

/// A member of a consumer group on one topic.
pub struct GroupConsumer {
    client: Client,
    group: String,
    topic: String,
    member: String,
    options: ConsumerOptions,
    generation: u64,
    /// Renews membership in its own task, so it beats whatever the application is doing
    /// (committing, processing) and however long one `join_group` call takes.
    heartbeat: JoinHandle<()>,
    assignment: watch::Receiver<Assignment>,
    /// Per assigned partition: the reader's number and its task.
    readers: BTreeMap<u32, (u64, JoinHandle<()>)>,
    readers_started: u64,
    /// Deliveries tagged with the number of the reader that read them, so what a revoked
    /// reader left in the channel is dropped rather than handed out.
    tx: mpsc::Sender<(u64, Delivery)>,
    rx: mpsc::Receiver<(u64, Delivery)>,
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
        let first = client.join_group(group, topic, member).await?;
        let (beat_tx, assignment) = watch::channel(first);
        let heartbeat = tokio::spawn({
            let (client, group, topic, member) = (
                client.clone(),
                group.to_string(),
                topic.to_string(),
                member.to_string(),
            );
            let every = options.heartbeat;
            async move {
                loop {
                    tokio::time::sleep(every).await;
                    match client.join_group(&group, &topic, &member).await {
                        Ok(a) => {
                            if beat_tx.send(a).is_err() {
                                return;
                            }
                        }
                        // Retried on the next beat; the partitions keep being read meanwhile.
                        Err(e) => tracing::debug!(%group, error = %e, "heartbeat failed"),
                    }
                }
            }
        });
        let (tx, rx) = mpsc::channel(options.buffer.max(1));
        let mut consumer = Self {
            client,
            group: group.to_string(),
            topic: topic.to_string(),
            member: member.to_string(),
            options,
            generation: 0,
            heartbeat,
            assignment,
            readers: BTreeMap::new(),
            readers_started: 0,
            tx,
            rx,
        };
        consumer.follow_assignment();
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

    /// The next event of any assigned partition. Cancel-safe: nothing is awaited between
    /// taking a delivery and returning it.
    pub async fn next(&mut self) -> Delivery {
        loop {
            self.follow_assignment();
            tokio::select! {
                delivery = self.rx.recv() => {
                    // The consumer holds a sender, so the channel never closes.
                    if let Some(d) = delivery.and_then(|d| self.current(d)) {
                        return d;
                    }
                }
                _ = self.assignment.changed() => {}
            }
        }
    }

    /// An event already read ahead, if there is one, without waiting.
    pub fn try_next(&mut self) -> Option<Delivery> {
        self.follow_assignment();
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
        self.heartbeat.abort();
        self.stop_readers(|_| true);
        self.client
            .leave_group(&self.group, &self.topic, &self.member)
            .await
    }

    /// Stops readers of partitions no longer assigned and starts readers for new ones (and
    /// for any whose task has ended).
    fn follow_assignment(&mut self) {
        let (generation, partitions) = self.assignment.borrow_and_update().clone();
        if generation != self.generation {
            tracing::debug!(group = %self.group, member = %self.member, generation, ?partitions, "assignment");
        }
        self.generation = generation;
        self.stop_readers(|p| !partitions.contains(&p));
        for partition in partitions {
            let running = self
                .readers
                .get(&partition)
                .is_some_and(|(_, task)| !task.is_finished());
            if !running {
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
        self.heartbeat.abort();
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
    parent_committed(&client, &group, &topic, partition, start).await;
    loop {
        let start_at = match from {
            Some(offset) => Ok(StartFrom::Offset(offset)),
            None => client
                .committed(&group, &topic, partition)
                .await
                .map(|c| c.map_or(start, StartFrom::Offset)),
        };
        let subscription = match start_at {
            Ok(at) => {
                tracing::debug!(%group, %topic, partition, reader = number, from = ?at, "group reader subscribes");
                client.subscribe(&topic, partition, at).await
            }
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

/// Returns once `group` may read `partition` of `topic`: at once for a partition the topic
/// was created with; for a split's child, once the parent is sealed and the group committed
/// it up to the seal (or the parent retains nothing below it, or the group starts from the
/// latest offsets and has no cursor on the parent).
async fn parent_committed(
    client: &Client,
    group: &str,
    topic: &str,
    partition: u32,
    start: StartFrom,
) {
    let retry = Duration::from_millis(200);
    loop {
        let waited_for = async {
            let d = client.describe_topic(topic).await?;
            let Some(split) = d.layout.split_of(partition).copied() else {
                return Ok::<_, ClientError>(None);
            };
            let Some(seal) = split.seal else {
                return Ok(Some(format!(
                    "partition {} is not sealed yet",
                    split.parent
                )));
            };
            let committed = client.committed(group, topic, split.parent).await?;
            let low = d
                .partitions
                .get(split.parent as usize)
                .map_or(0, |p| p.low_watermark);
            let done = match committed {
                Some(at) => at >= seal || low >= seal,
                None => matches!(start, StartFrom::Latest) || low >= seal,
            };
            Ok((!done).then(|| {
                format!(
                    "the group committed partition {} to {committed:?}, its seal is {seal}",
                    split.parent
                )
            }))
        };
        match waited_for.await {
            Ok(None) => return,
            Ok(Some(why)) => {
                tracing::trace!(%topic, partition, %why, "a split's child waits for its parent")
            }
            Err(e) => tracing::debug!(%topic, partition, error = %e, "checking a split's parent"),
        }
        tokio::time::sleep(retry).await;
    }
}
