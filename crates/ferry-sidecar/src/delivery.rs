//! Delivery to the app: per subscription, a member of the app's consumer group (so replicas
//! with one app id share the partitions), a worker per partition that posts its events in
//! windows (up to `delivery.concurrency` at once, events with one partition key one after
//! another in order), and a committer that moves the group's cursors past finished windows.
//!
//! The app's answer decides (as in Dapr): 2xx with `SUCCESS`, an empty or non-JSON body
//! commits; `RETRY`, a non-2xx other than 404, or no answer retries with backoff; `DROP` or
//! 404 sends the event to the dead-letter topic when the subscription names one, else drops
//! and counts it. Bulk subscriptions post up to `maxMessagesCount` events per call and read
//! a status per entry.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ferry_client::{ConsumerOptions, Delivery, GroupConsumer};
use ferry_proto::wire::StartFrom;
use ferry_proto::{Event, EventClass, TopicConfig};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch};

use crate::cloudevent::STRUCTURED;
use crate::outbox::Pending;
use crate::subscription::Subscription;
use crate::Shared;

/// Events handed to the partition workers and not yet finished, at most (per subscription).
const MAX_QUEUED: usize = 10_000;

/// The CloudEvent the app receives for an event: the stored envelope when the sidecar wrapped
/// it, otherwise one built from the event's attributes (as Dapr wraps raw messages).
pub fn delivered_event(event: &Event, topic: &str, pubsub: &str) -> Map<String, Value> {
    let stored = (event.datacontenttype.as_deref() == Some(STRUCTURED))
        .then(|| serde_json::from_slice::<Value>(&event.data).ok())
        .flatten();
    let mut ce = match stored {
        Some(Value::Object(map)) => map,
        _ => {
            let mut map = Map::new();
            map.insert("specversion".into(), json!("1.0"));
            map.insert("id".into(), json!(event.id));
            map.insert("source".into(), json!(event.source));
            map.insert("type".into(), json!(event.ty));
            map.insert("subject".into(), json!(event.subject.as_str()));
            if let Some(t) = &event.time {
                map.insert("time".into(), json!(t));
            }
            let content_type = event
                .datacontenttype
                .clone()
                .unwrap_or_else(|| "application/octet-stream".into());
            let json_data = crate::cloudevent::is_json(&content_type)
                .then(|| serde_json::from_slice::<Value>(&event.data).ok())
                .flatten();
            match (json_data, std::str::from_utf8(&event.data)) {
                (Some(v), _) => {
                    map.insert("data".into(), v);
                }
                (None, Ok(text)) if !crate::cloudevent::is_json(&content_type) => {
                    map.insert("data".into(), json!(text));
                }
                _ => {
                    use base64::Engine;
                    map.insert(
                        "data_base64".into(),
                        json!(base64::engine::general_purpose::STANDARD.encode(&event.data)),
                    );
                }
            }
            map.insert("datacontenttype".into(), json!(content_type));
            map
        }
    };
    ce.insert("topic".into(), json!(topic));
    ce.insert("pubsubname".into(), json!(pubsub));
    // Dapr's envelope always has the trace attributes; apps' models (Dapr's own quickstarts)
    // require them.
    for attribute in ["traceid", "traceparent", "tracestate"] {
        ce.entry(attribute).or_insert_with(|| json!(""));
    }
    ce
}

/// Whether a CloudEvent's `expiration` (set from `ttlInSeconds`) has passed.
fn expired(ce: &Map<String, Value>, now_ms: u64) -> bool {
    ce.get("expiration")
        .and_then(Value::as_str)
        .and_then(crate::cloudevent::parse_rfc3339_ms)
        .is_some_and(|at| at < now_ms)
}

/// What the app said about one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Handled: commit.
    Success,
    /// Try again later.
    Retry(String),
    /// Do not try again (dead letter or drop).
    Drop(String),
}

/// The outcome of a single-event answer: `status` and `body`.
pub fn outcome_of(status: u16, body: &[u8]) -> Outcome {
    if status == 404 {
        return Outcome::Drop("the app answered 404".into());
    }
    if !(200..300).contains(&status) {
        return Outcome::Retry(format!("the app answered {status}"));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => match map.get("status").and_then(Value::as_str) {
            None | Some("") => Outcome::Success,
            Some(s) => status_word(s),
        },
        // Empty, `null` or non-JSON bodies with a 2xx are successes, as in Dapr.
        _ => Outcome::Success,
    }
}

fn status_word(word: &str) -> Outcome {
    match word.to_ascii_uppercase().as_str() {
        "SUCCESS" => Outcome::Success,
        "RETRY" => Outcome::Retry("the app answered RETRY".into()),
        "DROP" => Outcome::Drop("the app answered DROP".into()),
        other => Outcome::Retry(format!("the app answered an unknown status {other:?}")),
    }
}

/// Per-entry outcomes of a bulk answer (entries without a status are retried).
pub fn bulk_outcomes(status: u16, body: &[u8], entry_ids: &[String]) -> Vec<Outcome> {
    let all = |o: Outcome| vec![o; entry_ids.len()];
    if status == 404 {
        return all(Outcome::Drop("the app answered 404".into()));
    }
    if !(200..300).contains(&status) {
        return all(Outcome::Retry(format!("the app answered {status}")));
    }
    let statuses: HashMap<String, Outcome> = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("statuses").and_then(Value::as_array).cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|s| {
            Some((
                s.get("entryId")?.as_str()?.to_string(),
                status_word(s.get("status")?.as_str()?),
            ))
        })
        .collect();
    entry_ids
        .iter()
        .map(|id| {
            statuses
                .get(id)
                .cloned()
                .unwrap_or_else(|| Outcome::Retry(format!("no status for entry {id}")))
        })
        .collect()
}

/// Runs one subscription until shutdown.
pub(crate) async fn run(
    shared: Arc<Shared>,
    sub: Arc<Subscription>,
    mut shutdown: watch::Receiver<bool>,
) {
    let key = format!("{}/{}", sub.pubsub, sub.topic);
    let mut attempt = 0u32;
    let mut consumer = loop {
        match join(&shared, &sub).await {
            Ok(c) => break c,
            Err(e) => {
                attempt += 1;
                shared.set_status(&key, format!("waiting: {e}"));
                tracing::warn!(topic = %sub.topic, error = %e, "subscription cannot start yet");
                tokio::select! {
                    _ = tokio::time::sleep(shared.config.delivery.backoff(attempt)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    };
    shared.set_status(&key, "active".into());
    let progress: Arc<Mutex<BTreeMap<u32, u64>>> = Arc::default();
    let mut workers: HashMap<u32, Worker> = HashMap::new();
    let mut committed: BTreeMap<u32, u64> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(
        shared.config.delivery.commit_every_ms,
    ));
    loop {
        // A partition the app keeps refusing holds up only itself until this many events
        // wait in all; the commit tick runs whatever happens.
        let room = workers.values().map(Worker::queued).sum::<usize>() < MAX_QUEUED;
        tokio::select! {
            delivery = consumer.next(), if room => {
                let partition = delivery.partition;
                let worker = workers.entry(partition).or_insert_with(|| {
                    Worker::start(&shared, &sub, partition, &progress, &shutdown)
                });
                worker.queued.fetch_add(1, Ordering::Relaxed);
                if worker.tx.send(delivery).is_err() {
                    break;
                }
            }
            _ = tick.tick() => {
                // Workers of partitions this member lost stop now: their successor delivers
                // from the committed cursor, in order, and two members never post one
                // partition's events at once for longer than a tick.
                let assigned = consumer.assigned();
                workers.retain(|partition, worker| {
                    let keep = assigned.contains(partition);
                    if !keep {
                        worker.task.abort();
                    }
                    keep
                });
                commit(&shared, &consumer, &progress, &mut committed).await;
                shared.set_status(&key, format!("active, partitions {assigned:?}"));
            }
            _ = shutdown.changed() => break,
        }
    }
    // Workers stop at the next event (or retry pause); what they finished is committed.
    for (_, worker) in workers {
        drop(worker.tx);
        let mut task = worker.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
    commit(&shared, &consumer, &progress, &mut committed).await;
    if let Err(e) = consumer.leave().await {
        tracing::debug!(topic = %sub.topic, error = %e, "leaving the group");
    }
}

/// A partition's delivery task and its queue.
struct Worker {
    tx: mpsc::UnboundedSender<Delivery>,
    /// Deliveries queued or in hand, not yet finished.
    queued: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Worker {
    fn start(
        shared: &Arc<Shared>,
        sub: &Arc<Subscription>,
        partition: u32,
        progress: &Arc<Mutex<BTreeMap<u32, u64>>>,
        shutdown: &watch::Receiver<bool>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(work(
            shared.clone(),
            sub.clone(),
            partition,
            rx,
            queued.clone(),
            progress.clone(),
            shutdown.clone(),
        ));
        Self { tx, queued, task }
    }

    fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

async fn join(
    shared: &Shared,
    sub: &Subscription,
) -> Result<GroupConsumer, ferry_client::ClientError> {
    let description = shared.client.describe_topic(&sub.topic).await?;
    if let Some(dead) = &sub.dead_letter_topic {
        let mut config = TopicConfig::new(dead.clone(), description.config.partitions);
        config.replication = description.config.replication;
        config.class = EventClass::Integration;
        shared
            .client
            .ensure_topic(&config, Duration::from_secs(30))
            .await?;
    }
    // Events of this topic published in other regions come here when they forward by interest.
    shared
        .client
        .add_interest(
            &format!("sidecar-{}-{}", shared.config.app_id, sub.topic),
            &sub.topic,
        )
        .await?;
    let options = ConsumerOptions {
        start: if sub.from_newest {
            StartFrom::Latest
        } else {
            StartFrom::Earliest
        },
        ..ConsumerOptions::default()
    };
    GroupConsumer::join(
        shared.client.clone(),
        &shared.config.app_id,
        &sub.topic,
        &shared.instance,
        options,
    )
    .await
}

async fn commit(
    shared: &Shared,
    consumer: &GroupConsumer,
    progress: &Mutex<BTreeMap<u32, u64>>,
    committed: &mut BTreeMap<u32, u64>,
) {
    let now: Vec<(u32, u64)> = progress
        .lock()
        .expect("delivery progress")
        .iter()
        .map(|(p, o)| (*p, *o))
        .collect();
    for (partition, offset) in now {
        if committed.get(&partition) == Some(&offset) {
            continue;
        }
        match consumer.commit(partition, offset).await {
            Ok(()) => {
                committed.insert(partition, offset);
            }
            Err(e) => {
                shared
                    .metrics
                    .commit_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(partition, error = %e, "commit failed; retried on the next tick");
            }
        }
    }
}

/// Delivers one partition's events in order.
async fn work(
    shared: Arc<Shared>,
    sub: Arc<Subscription>,
    partition: u32,
    mut rx: mpsc::UnboundedReceiver<Delivery>,
    queued: Arc<AtomicUsize>,
    progress: Arc<Mutex<BTreeMap<u32, u64>>>,
    shutdown: watch::Receiver<bool>,
) {
    while let Some(first) = rx.recv().await {
        if *shutdown.borrow() {
            return;
        }
        let mut group = vec![first];
        if let Some(bulk) = sub.bulk {
            let deadline = tokio::time::Instant::now() + Duration::from_millis(bulk.max_await_ms);
            while group.len() < bulk.max_messages {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(d)) => group.push(d),
                    _ => break,
                }
            }
        } else {
            // What is ready now, up to the concurrency: posted as one window.
            while group.len() < shared.config.delivery.concurrency {
                match rx.try_recv() {
                    Ok(d) => group.push(d),
                    Err(_) => break,
                }
            }
        }
        let last = group.last().map(|d| d.offset);
        let taken = group.len();
        let finished = if sub.bulk.is_some() {
            deliver_bulk(&shared, &sub, group, &shutdown).await
        } else {
            deliver_window(&shared, &sub, &group, &shutdown).await
        };
        if !finished {
            // Shutting down: what was not handled is not committed and comes again.
            return;
        }
        if let Some(offset) = last {
            progress
                .lock()
                .expect("delivery progress")
                .insert(partition, offset + 1);
        }
        queued.fetch_sub(taken, Ordering::Relaxed);
    }
}

/// Sleeps before retry `attempt`, or returns false when shutting down.
async fn pause(shared: &Shared, attempt: u32, shutdown: &watch::Receiver<bool>) -> bool {
    let mut shutdown = shutdown.clone();
    if *shutdown.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(shared.config.delivery.backoff(attempt)) => true,
        _ = shutdown.changed() => false,
    }
}

/// The body and content type posted for an event, and the CloudEvent routing sees.
fn payload_of(sub: &Subscription, event: &Event) -> (Map<String, Value>, Bytes, String) {
    let ce = delivered_event(event, &sub.topic, &sub.pubsub);
    if sub.raw_payload {
        let content_type = event
            .datacontenttype
            .clone()
            .unwrap_or_else(|| "application/octet-stream".into());
        (ce, event.data.clone(), content_type)
    } else {
        let body = Bytes::from(serde_json::to_vec(&ce).unwrap_or_default());
        (ce, body, STRUCTURED.to_string())
    }
}

/// Delivers a window of one partition's events: those with one partition key one after
/// another in order, the others at once. True when every one was handled, dead-lettered or
/// dropped (the window's offsets can then be committed); false on shutdown.
async fn deliver_window(
    shared: &Shared,
    sub: &Subscription,
    window: &[Delivery],
    shutdown: &watch::Receiver<bool>,
) -> bool {
    let mut chains: Vec<Vec<&Delivery>> = Vec::new();
    let mut by_key: HashMap<&[u8], usize> = HashMap::new();
    for delivery in window {
        match delivery.event.key.as_deref() {
            Some(key) => match by_key.get(key) {
                Some(&chain) => chains[chain].push(delivery),
                None => {
                    by_key.insert(key, chains.len());
                    chains.push(vec![delivery]);
                }
            },
            None => chains.push(vec![delivery]),
        }
    }
    let done = futures::future::join_all(chains.into_iter().map(|chain| async move {
        for delivery in chain {
            if !deliver_one(shared, sub, delivery, shutdown).await {
                return false;
            }
        }
        true
    }))
    .await;
    done.into_iter().all(|finished| finished)
}

/// Delivers one event until it is handled, dead-lettered or dropped; false on shutdown.
async fn deliver_one(
    shared: &Shared,
    sub: &Subscription,
    delivery: &Delivery,
    shutdown: &watch::Receiver<bool>,
) -> bool {
    let (ce, body, content_type) = payload_of(sub, &delivery.event);
    if expired(&ce, crate::now_ms()) {
        shared.metrics.expired.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    let Some(path) = sub.path_for(&Value::Object(ce)) else {
        shared.metrics.unrouted.fetch_add(1, Ordering::Relaxed);
        return true;
    };
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let outcome = match shared.post(path, &content_type, body.clone()).await {
            Ok((status, answer)) => outcome_of(status, &answer),
            Err(e) => Outcome::Retry(e),
        };
        match outcome {
            Outcome::Success => {
                shared.metrics.delivered.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Outcome::Drop(reason) => {
                return dead_letter(shared, sub, &delivery.event, &reason, shutdown).await;
            }
            Outcome::Retry(reason) => {
                shared.metrics.retried.fetch_add(1, Ordering::Relaxed);
                let limit = shared.config.delivery.max_attempts;
                if limit > 0 && attempt >= limit {
                    let reason = format!("{reason}; gave up after {attempt} attempts");
                    return dead_letter(shared, sub, &delivery.event, &reason, shutdown).await;
                }
                tracing::debug!(topic = %sub.topic, offset = delivery.offset, %reason, "retrying");
                if !pause(shared, attempt, shutdown).await {
                    return false;
                }
            }
        }
    }
}

/// Delivers events in bulk calls (grouped by path) until each is handled, dead-lettered or
/// dropped; false on shutdown.
async fn deliver_bulk(
    shared: &Shared,
    sub: &Subscription,
    group: Vec<Delivery>,
    shutdown: &watch::Receiver<bool>,
) -> bool {
    let now = crate::now_ms();
    let mut by_path: BTreeMap<String, Vec<(String, &Delivery, Value, String)>> = BTreeMap::new();
    for delivery in &group {
        let (ce, body, content_type) = payload_of(sub, &delivery.event);
        if expired(&ce, now) {
            shared.metrics.expired.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let ce = Value::Object(ce);
        let Some(path) = sub.path_for(&ce) else {
            shared.metrics.unrouted.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let event_value = if sub.raw_payload {
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()))
        } else {
            ce
        };
        let entry_id = format!("{}-{}", delivery.partition, delivery.offset);
        by_path.entry(path.to_string()).or_default().push((
            entry_id,
            delivery,
            event_value,
            content_type,
        ));
    }
    for (path, mut entries) in by_path {
        let mut attempt = 0u32;
        while !entries.is_empty() {
            attempt += 1;
            let body = json!({
                "id": crate::new_event_id(),
                "pubsubname": sub.pubsub,
                "topic": sub.topic,
                "type": crate::cloudevent::WRAPPED_TYPE,
                "metadata": {},
                "entries": entries.iter().map(|(id, _, event, content_type)| json!({
                    "entryId": id,
                    "event": event,
                    "contentType": content_type,
                    "metadata": {},
                })).collect::<Vec<_>>(),
            });
            let ids: Vec<String> = entries.iter().map(|(id, ..)| id.clone()).collect();
            let outcomes = match shared
                .post(&path, "application/json", Bytes::from(body.to_string()))
                .await
            {
                Ok((status, answer)) => bulk_outcomes(status, &answer, &ids),
                Err(e) => vec![Outcome::Retry(e); ids.len()],
            };
            let mut again = Vec::new();
            for (entry, outcome) in entries.into_iter().zip(outcomes) {
                match outcome {
                    Outcome::Success => {
                        shared.metrics.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Outcome::Drop(reason) => {
                        if !dead_letter(shared, sub, &entry.1.event, &reason, shutdown).await {
                            return false;
                        }
                    }
                    Outcome::Retry(reason) => {
                        shared.metrics.retried.fetch_add(1, Ordering::Relaxed);
                        let limit = shared.config.delivery.max_attempts;
                        if limit > 0 && attempt >= limit {
                            if !dead_letter(shared, sub, &entry.1.event, &reason, shutdown).await {
                                return false;
                            }
                        } else {
                            again.push(entry);
                        }
                    }
                }
            }
            entries = again;
            if !entries.is_empty() && !pause(shared, attempt, shutdown).await {
                return false;
            }
        }
    }
    true
}

/// Sends a dropped event to the subscription's dead-letter topic through the outbox (durably,
/// before its offset is committed), or drops and counts it; false on shutdown.
async fn dead_letter(
    shared: &Shared,
    sub: &Subscription,
    event: &Event,
    reason: &str,
    shutdown: &watch::Receiver<bool>,
) -> bool {
    let Some(topic) = &sub.dead_letter_topic else {
        shared.metrics.dropped.fetch_add(1, Ordering::Relaxed);
        tracing::info!(topic = %sub.topic, id = %event.id, %reason, "event dropped");
        return true;
    };
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let result = match shared.shape(topic).await {
            Ok(shape) => shared
                .outbox
                .accept(vec![Pending {
                    topic: topic.clone(),
                    shape,
                    event: event.clone(),
                }])
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => {
                shared.metrics.dead_lettered.fetch_add(1, Ordering::Relaxed);
                tracing::info!(topic = %sub.topic, id = %event.id, dead_letter = %topic, %reason, "event dead-lettered");
                return true;
            }
            Err(e) => {
                tracing::warn!(dead_letter = %topic, error = %e, "dead-lettering failed; retrying");
                if !pause(shared, attempt, shutdown).await {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ferry_proto::Subject;

    use super::*;

    #[test]
    fn answers_map_to_outcomes_as_in_dapr() {
        assert_eq!(outcome_of(200, b""), Outcome::Success);
        assert_eq!(outcome_of(200, b"null"), Outcome::Success);
        assert_eq!(outcome_of(204, b"not json"), Outcome::Success);
        assert_eq!(
            outcome_of(200, br#"{"status":"SUCCESS"}"#),
            Outcome::Success
        );
        assert!(matches!(
            outcome_of(200, br#"{"status":"RETRY"}"#),
            Outcome::Retry(_)
        ));
        assert!(matches!(
            outcome_of(200, br#"{"status":"DROP"}"#),
            Outcome::Drop(_)
        ));
        assert!(matches!(
            outcome_of(200, br#"{"status":"MAYBE"}"#),
            Outcome::Retry(_)
        ));
        assert!(matches!(outcome_of(404, b""), Outcome::Drop(_)));
        assert!(matches!(
            outcome_of(500, br#"{"status":"SUCCESS"}"#),
            Outcome::Retry(_)
        ));
        let ids = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let answer =
            br#"{"statuses":[{"entryId":"a","status":"SUCCESS"},{"entryId":"b","status":"DROP"}]}"#;
        let outcomes = bulk_outcomes(200, answer, &ids);
        assert_eq!(outcomes[0], Outcome::Success);
        assert!(matches!(outcomes[1], Outcome::Drop(_)));
        assert!(matches!(outcomes[2], Outcome::Retry(_)));
    }

    #[test]
    fn stored_envelopes_are_delivered_and_other_events_are_wrapped() {
        let envelope =
            json!({"specversion": "1.0", "id": "1", "source": "a", "type": "t", "data": {"x": 1}});
        let mut event = Event::new(
            "1",
            "a",
            "t",
            Subject::new("orders").unwrap(),
            envelope.to_string(),
        );
        event.datacontenttype = Some(STRUCTURED.into());
        let ce = delivered_event(&event, "orders", "pubsub");
        assert_eq!(ce["data"], json!({"x": 1}));
        assert_eq!(ce["topic"], json!("orders"));
        let mut plain = Event::new("2", "ctl", "t", Subject::new("orders").unwrap(), "hello");
        plain.datacontenttype = Some("text/plain".into());
        let ce = delivered_event(&plain, "orders", "pubsub");
        assert_eq!(ce["data"], json!("hello"));
        assert_eq!(ce["id"], json!("2"));
        let binary = Event::new(
            "3",
            "ctl",
            "t",
            Subject::new("orders").unwrap(),
            vec![0xffu8, 0],
        );
        assert_eq!(
            delivered_event(&binary, "o", "p")["data_base64"],
            json!("/wA=")
        );
    }

    #[test]
    fn expiration_is_honoured() {
        let mut ce = Map::new();
        ce.insert("expiration".into(), json!("2026-01-01T00:00:00Z"));
        assert!(expired(&ce, 1_800_000_000_000));
        assert!(!expired(&ce, 1_700_000_000_000));
        assert!(!expired(&Map::new(), 1_800_000_000_000));
    }
}
