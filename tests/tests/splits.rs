//! Adding partitions online keeps every key's order: a topic grows 2 → 4 → 8 while a
//! pipelined producer publishes keyed events and a consumer group reads them; each key's
//! events, read from its parent up to the seal and then from its child, are in the order
//! they were published with none missing or doubled, and the group hands them out in that
//! order too.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_client::{Client, ConsumerOptions, GroupConsumer, ProducerOptions};
use ferry_proto::wire::ErrorCode;
use ferry_proto::{key_hash, linear_partition, Event, Subject, TopicConfig};
use ferry_tests::{grow_topic, wait_until, TestRegion};
use tokio::time::Instant;

const KEYS: u64 = 16;
const MOST_EVENTS: u64 = 20_000;

fn event(key: u64, n: u64) -> Event {
    let mut e = Event::new(
        format!("k{key}-{n}"),
        "/t",
        "t",
        Subject::new("orders.placed").unwrap(),
        n.to_string().into_bytes(),
    );
    e.key = Some(format!("k{key}").into_bytes().into());
    e
}

/// (key, n) of an event made by [`event`].
fn parse(e: &Event) -> (String, u64) {
    let id = e.id.to_string();
    let (key, n) = id.split_once('-').expect("k<key>-<n>");
    (key.to_string(), n.parse().unwrap())
}

/// Publishes keys round-robin, each key numbering its events from 0, in small bursts,
/// until `stop` (or `MOST_EVENTS`); answers how many events each key got, once every
/// acknowledgement is in.
async fn produce(client: Client, sent: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> Vec<u64> {
    let producer = client
        .producer("orders", ProducerOptions::default())
        .await
        .unwrap();
    let mut acks = Vec::new();
    let mut per_key = vec![0u64; KEYS as usize];
    let mut i = 0u64;
    while !stop.load(Ordering::Acquire) && i < MOST_EVENTS {
        for _ in 0..20 {
            let key = i % KEYS;
            let n = per_key[key as usize];
            per_key[key as usize] += 1;
            acks.push(producer.send(event(key, n)).await.unwrap());
            i += 1;
        }
        sent.store(i, Ordering::Release);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for ack in acks {
        ack.await.expect("every event is acknowledged");
    }
    per_key
}

async fn wait_sent(sent: &AtomicU64, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while sent.load(Ordering::Acquire) < at_least {
        assert!(
            Instant::now() < deadline,
            "the producer stalled below {at_least} events"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adding_partitions_under_load_keeps_each_keys_order_in_the_log_and_in_a_group() {
    ferry_tests::init_logging();
    let region = TestRegion::start(3).await;
    let client = region.create_topic(TopicConfig::new("orders", 2)).await;

    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let producer = tokio::spawn(produce(client.clone(), sent.clone(), stop.clone()));
    wait_sent(&sent, 1_000).await;
    grow_topic(&client, "orders", 4).await;
    let at = sent.load(Ordering::Acquire);
    wait_sent(&sent, at + 1_000).await;
    let layout = grow_topic(&client, "orders", 8).await;
    let at = sent.load(Ordering::Acquire);
    wait_sent(&sent, at + 1_000).await;
    stop.store(true, Ordering::Release);
    let per_key = producer.await.unwrap();
    let total: u64 = per_key.iter().sum();

    // A member joining once everything is published reads parents and children from the
    // start: it commits every delivery and records what it was handed, in order.
    let delivered: Arc<std::sync::Mutex<Vec<(String, u64)>>> = Arc::default();
    let consumer = tokio::spawn({
        let (client, delivered) = (client.clone(), delivered.clone());
        async move {
            let mut member = GroupConsumer::join(
                client,
                "g",
                "orders",
                "m1",
                ConsumerOptions {
                    heartbeat: Duration::from_millis(300),
                    ..ConsumerOptions::default()
                },
            )
            .await
            .unwrap();
            loop {
                let d = member.next().await;
                delivered.lock().unwrap().push(parse(&d.event));
                member.commit(d.partition, d.offset + 1).await.unwrap();
            }
        }
    });

    // Bad input changes nothing: more than doubling, fewer, an unknown topic.
    for (topic, partitions) in [("orders", 17), ("orders", 7), ("nope", 9)] {
        let e = client.add_partitions(topic, partitions).await.unwrap_err();
        let message = e.to_string();
        assert!(
            message.contains(topic) || message.contains("partitions"),
            "{message}"
        );
    }
    assert_eq!(
        client
            .describe_topic("orders")
            .await
            .unwrap()
            .config
            .partitions,
        8
    );

    // The log: every key's events, parent up to the seal then child, in order, each once.
    let seal = |child: u32| layout.split_of(child).and_then(|s| s.seal).unwrap();
    let mut found: HashMap<String, Vec<(u32, u64, u64)>> = HashMap::new();
    for partition in 0..8 {
        let mut offset = 0;
        loop {
            let (events, _) = client
                .fetch("orders", partition, offset, 1 << 20)
                .await
                .unwrap();
            let Some((last, _)) = events.last() else {
                break;
            };
            offset = last + 1;
            for (at, e) in events {
                let (key, n) = parse(&e);
                found.entry(key).or_default().push((partition, at, n));
            }
        }
    }
    for key in 0..KEYS {
        let name = format!("k{key}");
        let hash = key_hash(name.as_bytes());
        // The partitions the key went through: 2, 4 and 8 partitions.
        let mut chain: Vec<u32> = [2, 4, 8]
            .iter()
            .map(|n| linear_partition(hash, 2, *n))
            .collect();
        chain.dedup();
        let mut events = found.remove(&name).unwrap_or_default();
        for (partition, at, _) in &events {
            let step = chain
                .iter()
                .position(|p| p == partition)
                .unwrap_or_else(|| {
                    panic!("{name} has an event in partition {partition}, off its path {chain:?}")
                });
            if let Some(next) = chain.get(step + 1) {
                assert!(
                    *at < seal(*next),
                    "{name} at {partition}/{at}, at or past the seal {} for {next}",
                    seal(*next)
                );
            }
        }
        events.sort_by_key(|(partition, at, _)| (chain.iter().position(|p| p == partition), *at));
        let numbers: Vec<u64> = events.iter().map(|(_, _, n)| *n).collect();
        let expected: Vec<u64> = (0..per_key[key as usize]).collect();
        assert_eq!(numbers, expected, "{name} along {chain:?}");
    }
    assert!(found.is_empty(), "unknown keys {:?}", found.keys());

    // The group: each key's events handed out in order (a re-delivery repeats a run of
    // them, never reorders what came first).
    wait_until(
        "the group read every event",
        Duration::from_secs(60),
        || {
            let delivered = delivered.clone();
            async move {
                let got = delivered.lock().unwrap();
                let mut seen: BTreeMap<&str, std::collections::BTreeSet<u64>> = BTreeMap::new();
                for (key, n) in got.iter() {
                    seen.entry(key).or_default().insert(*n);
                }
                seen.values().map(|s| s.len() as u64).sum::<u64>() == total
            }
        },
    )
    .await;
    consumer.abort();
    let mut next: BTreeMap<String, u64> = BTreeMap::new();
    for (key, n) in delivered.lock().unwrap().iter() {
        let expected = next.entry(key.clone()).or_default();
        assert!(
            *n <= *expected,
            "{key}: {n} was handed out before {expected}"
        );
        if *n == *expected {
            *expected += 1;
        }
    }

    // A publish routed by the layout before the split is refused, naming the partition.
    let stale = ferry_proto::EventBatch::new(
        &[event(3, 9_999_999)],
        None,
        0,
        &ferry_proto::Limits::default(),
    )
    .unwrap();
    let home = layout.partition_for_key(b"k3", 8);
    let old = linear_partition(key_hash(b"k3"), 2, 2);
    assert_ne!(home, old, "k3 moved when the topic grew");
    let e = client
        .publish_batch("orders", old, stale)
        .await
        .unwrap_err();
    match e {
        ferry_client::ClientError::Api(e) => {
            assert_eq!(e.code, ErrorCode::WrongPartition, "{e}");
            assert!(e.message.contains(&format!("partition {home}")), "{e}");
        }
        other => panic!("{other}"),
    }
}
