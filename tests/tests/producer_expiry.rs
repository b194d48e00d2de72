//! Producer expiry on a three-node region over real QUIC: a producer that stays idle for
//! `producer_expiry_ms` is forgotten by every replica of the partition (the leader proposes
//! the expiry through Raft), a producer that keeps appending is not, and a forgotten
//! producer's next batches are refused as `UnknownProducer` until numbered again from 0,
//! which the client's producer does by itself: nothing is lost or doubled.

use std::time::Duration;

use ferry_client::{Client, ClientError, ProducerOptions};
use ferry_proto::wire::ErrorCode;
use ferry_proto::{Event, EventBatch, Limits, Subject, TopicConfig};
use ferry_tests::TestRegion;
use tokio::time::Instant;

const TOPIC: &str = "expiry";
/// Long enough that the busy producer's appends, 200 ms apart, never leave it idle this
/// long on a loaded machine.
const EXPIRY_MS: u64 = 3_000;

fn event(id: &str) -> Event {
    Event::new(
        id,
        "/test",
        "t",
        Subject::new("expiry.a").unwrap(),
        id.as_bytes().to_vec(),
    )
    .with_key("k")
}

/// Producers remembered by each live replica of partition 0.
fn producer_counts(region: &TestRegion) -> Vec<u64> {
    region
        .live_ids()
        .into_iter()
        .filter_map(|id| region.node(id)?.node().partition(TOPIC, 0))
        .map(|group| group.view.producer_count())
        .collect()
}

/// Waits (bounded) until every replica of partition 0 remembers `count` producers.
async fn until_replicas_remember(region: &TestRegion, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = producer_counts(region);
        if counts.len() == 3 && counts.iter().all(|c| *c == count) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replicas remember {counts:?} producers, not {count} each"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Partition 0's event ids in offset order.
async fn log(client: &Client) -> Vec<String> {
    let (events, _) = client.fetch(TOPIC, 0, 0, 1 << 20).await.unwrap();
    events.into_iter().map(|(_, e)| e.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_producer_is_forgotten_everywhere_and_numbers_its_next_batches_again() {
    ferry_tests::init_logging();
    let region = TestRegion::start_with(3, |c| c.producer_expiry_ms = EXPIRY_MS).await;
    let client = region.create_topic(TopicConfig::new(TOPIC, 1)).await;

    // An idle producer (the client's): 5 events, then nothing.
    let producer = client
        .producer(TOPIC, ProducerOptions::default())
        .await
        .unwrap();
    for i in 0..5 {
        let ack = producer.publish(event(&format!("p{i}"))).await.unwrap();
        assert_eq!(ack.offset, Some(i));
    }

    // A busy producer (numbered by hand, as the sidecar's outbox does) appends every 200 ms
    // for two expiry periods: it is never forgotten, or a batch would be refused.
    let busy: u64 = 0xB05E;
    let limits = Limits::default();
    let started = Instant::now();
    let mut seq = 0;
    while started.elapsed() < Duration::from_millis(2 * EXPIRY_MS) {
        let batch =
            EventBatch::new(&[event(&format!("b{seq}"))], Some(busy), seq, &limits).unwrap();
        let (_, count, duplicate) = client.publish_batch(TOPIC, 0, batch).await.unwrap();
        assert_eq!((count, duplicate), (1, false));
        seq += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Meanwhile the idle one went, on every replica alike; the busy one stayed.
    until_replicas_remember(&region, 1).await;

    // The busy producer stops too and goes.
    until_replicas_remember(&region, 0).await;
    let batch = EventBatch::new(&[event("late")], Some(busy), seq, &limits).unwrap();
    match client.publish_batch(TOPIC, 0, batch).await {
        Err(ClientError::Api(e)) => {
            assert_eq!(e.code, ErrorCode::UnknownProducer);
            assert!(e.message.contains(&busy.to_string()), "{}", e.message);
        }
        other => panic!("expected UnknownProducer, got {other:?}"),
    }
    let high = client.describe_topic(TOPIC).await.unwrap().partitions[0].high_watermark;
    assert_eq!(high, 5 + seq, "the refused batch appended nothing");

    // The idle client producer publishes again: its lane numbers the batches from 0 again
    // and every event is acknowledged once, at the next offsets.
    let acks = futures::future::join_all((5..10).map(|i| {
        let producer = &producer;
        async move { producer.publish(event(&format!("p{i}"))).await }
    }))
    .await;
    let offsets: Vec<Option<u64>> = acks.into_iter().map(|a| a.unwrap().offset).collect();
    let expected: Vec<Option<u64>> = (high..high + 5).map(Some).collect();
    assert_eq!(offsets, expected);

    let ids = log(&client).await;
    let idle: Vec<&String> = ids.iter().filter(|id| id.starts_with('p')).collect();
    let want: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
    assert_eq!(idle, want.iter().collect::<Vec<_>>(), "each once, in order");
    let busy_ids = ids.iter().filter(|id| id.starts_with('b')).count() as u64;
    assert_eq!(busy_ids, seq, "each busy batch once");
}
