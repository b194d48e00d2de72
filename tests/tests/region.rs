//! A three-node region over real QUIC on loopback: concurrent idempotent producers, a
//! partition leader killed mid-stream, every acknowledged event read back exactly once at its
//! offset in per-key order, then the whole region restarted from disk and read back again.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use ferry_client::{Client, ProducerOptions, StartFrom};
use ferry_proto::{Event, Subject, TopicConfig};
use ferry_tests::TestRegion;
use futures::stream::{FuturesUnordered, StreamExt};

const PARTITIONS: u32 = 8;
const PRODUCERS: usize = 4;
const EVENTS: usize = 10_000;
const KEYS_PER_PRODUCER: usize = 40;

/// Reads a whole partition: (offset, event id).
async fn read_partition(client: &Client, topic: &str, partition: u32) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let (events, high) = client
            .fetch(topic, partition, offset, 1 << 20)
            .await
            .expect("fetch");
        for (o, e) in events {
            assert_eq!(o, offset, "offsets are dense and in order");
            out.push((o, e.id));
            offset = o + 1;
        }
        if offset >= high {
            return out;
        }
    }
}

async fn read_all(client: &Client, topic: &str) -> BTreeMap<(u32, u64), String> {
    let mut all = BTreeMap::new();
    for p in 0..PARTITIONS {
        for (o, id) in read_partition(client, topic, p).await {
            all.insert((p, o), id);
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_survive_a_leader_kill_and_a_full_restart() {
    let mut region = TestRegion::start(3).await;
    let client = region
        .create_topic(TopicConfig::new("orders", PARTITIONS))
        .await;
    let victim = region
        .leader_of("orders", 0)
        .await
        .expect("partition 0 has a leader");

    // 4 producers publish concurrently; each key's events carry their order in the id.
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let options = ProducerOptions {
            max_in_flight: 256,
            retry_for: Duration::from_secs(60),
            ..ProducerOptions::default()
        };
        producers.push((
            p,
            client.producer("orders", options).await.expect("producer"),
        ));
    }
    let per_producer = EVENTS / PRODUCERS;
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
    let mut kill_tx = Some(kill_tx);
    let mut acks = FuturesUnordered::new();
    let mut acked: HashMap<String, (u32, u64)> = HashMap::new();
    let mut failed = Vec::new();
    let mut record = |(id, result): (
        String,
        Result<ferry_client::PublishAck, ferry_client::ClientError>,
    )| match result {
        Ok(ack) => {
            acked.insert(id, (ack.partition, ack.offset));
        }
        Err(e) => failed.push(format!("{id}: {e}")),
    };
    let subject = Subject::new("orders.created").unwrap();
    for i in 0..per_producer {
        for (p, producer) in &producers {
            let key = format!("p{p}-k{}", i % KEYS_PER_PRODUCER);
            let id = format!("{key}#{:06}", i / KEYS_PER_PRODUCER);
            let event = Event::new(
                id.clone(),
                "/test",
                "order.created",
                subject.clone(),
                vec![b'x'; 200],
            )
            .with_key(key);
            let ack = producer.send(event).await.expect("queued");
            acks.push(async move { (id, ack.await) });
        }
        if i == per_producer / 3 {
            if let Some(tx) = kill_tx.take() {
                let _ = tx.send(());
            }
        }
        // Keep acknowledgements flowing while sending.
        while acks.len() > 2_000 {
            if let Some(done) = acks.next().await {
                record(done);
            }
        }
    }
    // The kill happens while events are still in flight.
    kill_rx.await.unwrap();
    region.stop(victim).await;

    while let Some(done) = acks.next().await {
        record(done);
    }
    assert!(
        failed.is_empty(),
        "publishes failed: {:?}",
        &failed[..failed.len().min(5)]
    );

    let check = |log: &BTreeMap<(u32, u64), String>| {
        // Each id at most once in the log.
        let mut seen: HashMap<&str, (u32, u64)> = HashMap::new();
        for (pos, id) in log {
            assert!(
                seen.insert(id.as_str(), *pos).is_none(),
                "event {id} stored twice"
            );
        }
        // Every acknowledged event is there, at its acknowledged position.
        for (id, pos) in &acked {
            assert_eq!(
                seen.get(id.as_str()),
                Some(pos),
                "acknowledged event {id} missing or moved"
            );
        }
        // Per key, order of production is order of offsets.
        let mut last: HashMap<&str, (u64, &str)> = HashMap::new();
        for ((_, offset), id) in log {
            let (key, seq) = id.split_once('#').unwrap();
            if let Some((prev_offset, prev_seq)) = last.insert(key, (*offset, seq)) {
                assert!(
                    prev_seq < seq && prev_offset < *offset,
                    "key {key}: {prev_seq} at {prev_offset} before {seq} at {offset}"
                );
            }
        }
        seen.len()
    };

    region
        .wait_for_leaders("orders", Duration::from_secs(30))
        .await;
    let client = region.client();
    let before = read_all(&client, "orders").await;
    let stored = check(&before);
    assert_eq!(acked.len(), EVENTS, "every publish was acknowledged");
    assert_eq!(stored, EVENTS, "every published event is stored once");

    // Subscriptions see the same log from the earliest offset.
    let mut sub = client
        .subscribe("orders", 3, StartFrom::Earliest)
        .await
        .unwrap();
    let expected: Vec<_> = before
        .iter()
        .filter(|((p, _), _)| *p == 3)
        .map(|((_, o), id)| (*o, id.clone()))
        .collect();
    for (offset, id) in &expected {
        let (o, e) = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("subscription stalled")
            .unwrap();
        assert_eq!((o, &e.id), (*offset, id));
    }
    drop(sub);

    // Bring the victim back, then restart the whole region from disk.
    region.restart(victim).await;
    for id in 1..=3 {
        region.stop(id).await;
    }
    drop(client);
    for id in 1..=3 {
        region.restart(id).await;
    }
    region
        .wait_for_leaders("orders", Duration::from_secs(60))
        .await;
    let client = region.client();
    let after = read_all(&client, "orders").await;
    if after != before {
        let first_diff = before.iter().zip(after.iter()).find(|(a, b)| a != b);
        panic!(
            "the log after a full restart differs: {} events before, {} after; first difference {first_diff:?}; per partition before {:?} after {:?}",
            before.len(),
            after.len(),
            (0..PARTITIONS).map(|p| before.keys().filter(|(q, _)| *q == p).count()).collect::<Vec<_>>(),
            (0..PARTITIONS).map(|p| after.keys().filter(|(q, _)| *q == p).count()).collect::<Vec<_>>(),
        );
    }
    check(&after);
}
