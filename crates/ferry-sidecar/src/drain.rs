//! Sends the outbox to the region: one task per lane, records in order, each batch resent
//! unchanged until the region acknowledges it (or answers that it already holds it), then its
//! records are forgotten. Consecutive records are merged into one batch once it is safe (see
//! `drain_lane`), so a backlog built while the region was away drains in large batches.
//! While the region is unreachable the lanes back off and the outbox keeps accepting.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use ferry_client::Client;
use ferry_proto::wire::ErrorCode;
use ferry_proto::{codec, EventBatch};
use tokio::sync::watch;

use crate::outbox::{Lane, LaneFeed, Outbox, OutboxError, Outgoing, TopicShape};

/// Records read per look into sled.
const PEEK: usize = 64;
/// Most events in one batch sent to the region.
const MAX_SEND_EVENTS: usize = 4096;
/// Most payload bytes in one batch sent to the region.
const MAX_SEND_BYTES: u64 = 1 << 20;
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How sending to the region goes: the lanes failing now and why, and when it last worked.
#[derive(Debug, Default)]
pub struct RegionLink {
    failing: Mutex<BTreeMap<Lane, String>>,
    last_ok_ms: std::sync::atomic::AtomicU64,
}

impl RegionLink {
    /// Lanes that failed their last send, with the error.
    pub fn failing(&self) -> BTreeMap<Lane, String> {
        self.failing.lock().expect("region link").clone()
    }

    /// When a send last succeeded (ms since the epoch; 0 for never).
    pub fn last_ok_ms(&self) -> u64 {
        self.last_ok_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn ok(&self, lane: &Lane) {
        self.last_ok_ms
            .store(crate::now_ms(), std::sync::atomic::Ordering::Relaxed);
        let mut failing = self.failing.lock().expect("region link");
        if !failing.is_empty() {
            failing.remove(lane);
        }
    }

    fn failed(&self, lane: &Lane, error: String) {
        self.failing
            .lock()
            .expect("region link")
            .insert(lane.clone(), error);
    }
}

/// Starts a drainer for every lane the feed names, until shutdown.
pub(crate) async fn run(
    outbox: Outbox,
    client: Client,
    mut lanes: LaneFeed,
    link: std::sync::Arc<RegionLink>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            lane = lanes.recv() => match lane {
                Some(lane) => {
                    tasks.spawn(drain_lane(
                        outbox.clone(),
                        client.clone(),
                        lane,
                        link.clone(),
                        shutdown.clone(),
                    ));
                }
                None => break,
            },
            _ = shutdown.changed() => break,
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// What sending one batch came to.
enum Sent {
    /// The region holds it; `fresh` unless it had it before.
    Acknowledged { fresh: bool },
    /// The partition does not know the records' producer (it expired after being idle):
    /// none of them is there; number them again from 0.
    UnknownProducer,
    /// The topic grew and the partition gave a key of the batch to another: it is not
    /// there; plan the topic's records again by the new layout.
    WrongPartition(String),
    /// Try again later (the error says why).
    Retry(String),
}

async fn send(client: &Client, lane: &Lane, batch: EventBatch) -> Sent {
    match client
        .publish_batch(&lane.topic, lane.partition, batch)
        .await
    {
        Ok((_, _, duplicate)) => Sent::Acknowledged { fresh: !duplicate },
        // Every event of the batch is older than the producer's last appended sequence: it
        // was appended before (acknowledged, then forgotten only in memory, or sent merged).
        Err(e) if e.code() == Some(ErrorCode::AlreadyAppended) => {
            Sent::Acknowledged { fresh: false }
        }
        Err(e) if e.code() == Some(ErrorCode::UnknownProducer) => Sent::UnknownProducer,
        Err(e) if e.code() == Some(ErrorCode::WrongPartition) => {
            Sent::WrongPartition(e.to_string())
        }
        Err(e) => Sent::Retry(e.to_string()),
    }
}

/// One batch of consecutive records (their sequences follow on), at most `MAX_SEND_EVENTS`
/// events and `MAX_SEND_BYTES` bytes but at least one record.
fn merge(records: &[Outgoing]) -> (usize, EventBatch) {
    let first = &records[0];
    let (mut taken, mut count, mut bytes) = (1, first.batch.count, first.bytes);
    while let Some(next) = records.get(taken) {
        let follows = next.batch.producer == first.batch.producer
            && next.batch.first_seq == first.batch.first_seq + u64::from(count);
        if !follows
            || count as usize + next.batch.count as usize > MAX_SEND_EVENTS
            || bytes + next.bytes > MAX_SEND_BYTES
        {
            break;
        }
        count += next.batch.count;
        bytes += next.bytes;
        taken += 1;
    }
    if taken == 1 {
        return (1, first.batch.clone());
    }
    // The records' events, already encoded and validated when accepted, joined as they are.
    let parts: Vec<&[u8]> = records[..taken]
        .iter()
        .map(|r| r.batch.events.as_ref())
        .collect();
    match codec::concat_seqs("merged outbox records", &parts) {
        Ok(events) => (
            taken,
            EventBatch {
                producer: first.batch.producer,
                first_seq: first.batch.first_seq,
                count,
                events: events.into(),
            },
        ),
        // Unreadable here: send the first record alone, as stored.
        Err(_) => (1, first.batch.clone()),
    }
}

async fn drain_lane(
    outbox: Outbox,
    client: Client,
    lane: Lane,
    link: std::sync::Arc<RegionLink>,
    mut shutdown: watch::Receiver<bool>,
) {
    let waker = outbox.waker(&lane);
    // Consecutive records go out as one batch, but only once a batch of this process was
    // appended as new: until then (after a restart) the region may hold a merged batch sent
    // before, which only whole records are recognised against (as already appended).
    let mut may_merge = false;
    let sending = outbox.sending(&lane.topic);
    'records: loop {
        // Held from reading the records until the region's answer says whether it holds
        // them: meanwhile the topic's records are not planned again (see `Outbox::reroute`).
        let mut in_flight = Some(sending.read().await);
        let records = match outbox.peek(&lane, PEEK) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(%lane, error = %e, "reading the outbox failed; retrying");
                link.failed(&lane, e.to_string());
                tokio::select! {
                    _ = tokio::time::sleep(MAX_BACKOFF) => continue,
                    _ = shutdown.changed() => return,
                }
            }
        };
        if records.is_empty() {
            drop(in_flight.take());
            tokio::select! {
                _ = waker.notified() => continue,
                _ = shutdown.changed() => return,
            }
        }
        let (taken, batch) = if may_merge {
            merge(&records)
        } else {
            (1, records[0].batch.clone())
        };
        // The same batch, unchanged, until the region has it.
        let mut backoff = FIRST_BACKOFF;
        let mut failures = 0u32;
        loop {
            if *shutdown.borrow() {
                return;
            }
            match send(&client, &lane, batch.clone()).await {
                Sent::Acknowledged { fresh } => {
                    may_merge |= fresh;
                    break;
                }
                Sent::WrongPartition(error) => {
                    // Not appended: the topic may be planned again now.
                    drop(in_flight.take());
                    tracing::info!(%lane, %error, "the topic grew; planning its outbox records again");
                    match reroute(&outbox, &client, &lane).await {
                        Ok(true) => continue 'records,
                        // Planned by that shape already (another lane's reroute, or a node
                        // that has not seen the growth yet): read the records and send again
                        // a little later.
                        Ok(false) => {
                            tokio::select! {
                                _ = tokio::time::sleep(FIRST_BACKOFF) => {}
                                _ = shutdown.changed() => return,
                            }
                            continue 'records;
                        }
                        Err(e) => {
                            tracing::warn!(%lane, error = %e, "planning the outbox records again failed; retrying");
                            link.failed(&lane, e);
                            tokio::select! {
                                _ = tokio::time::sleep(MAX_BACKOFF) => {}
                                _ = shutdown.changed() => return,
                            }
                            continue 'records;
                        }
                    }
                }
                Sent::UnknownProducer => {
                    // Not appended: the writer may take the topic's records meanwhile.
                    drop(in_flight.take());
                    match outbox.renumber(&lane, records[0].position()).await {
                        // The stored records changed: read them again.
                        Ok(()) => continue 'records,
                        // Refused without a change (the lane's first record moved
                        // meanwhile): read them again.
                        Err(OutboxError::Invalid(e)) => {
                            tracing::warn!(%lane, error = %e, "numbering the outbox lane again was refused; reading it again");
                            continue 'records;
                        }
                        Err(e) => {
                            // The outbox stopped accepting (a failed write); only a restart helps.
                            tracing::error!(%lane, error = %e, "numbering the outbox lane again failed");
                            link.failed(&lane, e.to_string());
                            return;
                        }
                    }
                }
                Sent::Retry(error) => {
                    failures += 1;
                    // Brief outages are routine; a lane stuck for long needs an operator.
                    if failures % 30 == 10 {
                        tracing::warn!(%lane, failures, %error, "outbox lane still failing; retrying");
                    } else {
                        tracing::debug!(%lane, %error, "outbox send failed; retrying");
                    }
                    link.failed(&lane, error);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        link.ok(&lane);
        for record in &records[..taken] {
            // A failure here only means the record is sent again and answered as a duplicate.
            if let Err(e) = outbox.acknowledged(record) {
                tracing::warn!(%lane, error = %e, "forgetting a sent record failed");
            }
        }
        drop(in_flight);
    }
}

/// Describes the topic of `refused` (whose first record a split parent refused) and has the
/// outbox plan its records again by its new shape: whether it did.
async fn reroute(outbox: &Outbox, client: &Client, refused: &Lane) -> Result<bool, String> {
    let topic = &refused.topic;
    let described = tokio::time::timeout(MAX_BACKOFF, client.describe_topic(topic))
        .await
        .map_err(|_| format!("describing {topic} took over {MAX_BACKOFF:?}"))?
        .map_err(|e| e.to_string())?;
    let shape = TopicShape::of(&described);
    let planned = outbox
        .reroute(refused, shape)
        .await
        .map_err(|e| e.to_string())?;
    outbox
        .learn_shape(topic, shape)
        .map_err(|e| e.to_string())?;
    Ok(planned)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use ferry_proto::{Event, Subject};

    use ferry_proto::Limits;

    use super::*;
    use crate::outbox::Pending;

    fn pending(id: u32) -> Pending {
        let event = Event::new(
            format!("e{id}"),
            "/app",
            "t",
            Subject::new("orders").unwrap(),
            vec![1u8; 10],
        )
        .with_key(Bytes::from_static(b"customer-1"));
        Pending {
            topic: "orders".into(),
            shape: crate::outbox::TopicShape::new(4),
            event,
        }
    }

    #[tokio::test]
    async fn consecutive_records_merge_into_one_batch_with_their_events_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, mut lanes) =
            Outbox::open(dir.path(), 1000, 1 << 20, Limits::default()).unwrap();
        outbox.accept(vec![pending(0), pending(1)]).await.unwrap();
        outbox
            .accept(vec![pending(2), pending(3), pending(4)])
            .await
            .unwrap();
        let lane = lanes.recv().await.unwrap();
        let records = outbox.peek(&lane, 10).unwrap();
        assert_eq!(records.len(), 2, "one record per group commit");
        let (taken, batch) = merge(&records);
        assert_eq!(taken, 2);
        assert_eq!((batch.first_seq, batch.count), (0, 5));
        assert_eq!(batch.producer, records[0].batch.producer);
        let ids: Vec<String> = batch
            .decode_events(&Limits::default())
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, ["e0", "e1", "e2", "e3", "e4"]);
        // A record alone is sent exactly as stored.
        let (taken, batch) = merge(&records[1..]);
        assert_eq!(taken, 1);
        assert_eq!(batch, records[1].batch);
    }
}
