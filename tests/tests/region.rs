//! A three-node region over real QUIC on loopback: concurrent idempotent producers, a
//! partition leader killed abruptly (network gone at once, no graceful shutdown) while they
//! are still sending, every acknowledged event read back exactly once at its offset in
//! per-key order, then the whole region restarted from disk and read back again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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

    // 4 producers publish concurrently from their own task; each key's events carry their
    // order in the id. The task reports every acknowledgement as it arrives.
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
    let sent = Arc::new(AtomicUsize::new(0));
    let (acks_tx, mut acks_rx) = tokio::sync::watch::channel(0usize);
    let sent_by_task = sent.clone();
    let publishing = tokio::spawn(async move {
        let mut acks = FuturesUnordered::new();
        // In the order acknowledgements were recorded: (id, partition, offset, n), n the
        // event's place in the sending order.
        let mut acked: Vec<(String, u32, u64, usize)> = Vec::new();
        let mut failed = Vec::new();
        let mut record = |(id, n, result): (
            String,
            usize,
            Result<ferry_client::PublishAck, ferry_client::ClientError>,
        )| {
            match result {
                Ok(ack) => acked.push((id, ack.partition, ack.offset.expect("an offset"), n)),
                Err(e) => failed.push(format!("{id}: {e}")),
            }
            acks_tx.send_replace(acked.len());
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
                let n = sent_by_task.fetch_add(1, Ordering::SeqCst);
                acks.push(async move { (id, n, ack.await) });
            }
            // At most 2,000 unacknowledged: sending waits for acknowledgements, so the kill
            // (after a third of them) lands with thousands of events still to send.
            while acks.len() > 2_000 {
                if let Some(done) = acks.next().await {
                    record(done);
                }
            }
        }
        while let Some(done) = acks.next().await {
            record(done);
        }
        (acked, failed)
    });

    // Kill the leader of partition 0 abruptly once a third of the events are acknowledged,
    // while the producers are still sending.
    tokio::time::timeout(
        Duration::from_secs(120),
        acks_rx.wait_for(|n| *n >= EVENTS / 3),
    )
    .await
    .expect("a third of the events acknowledged within 120 s")
    .expect("the publishing task reports its acknowledgements");
    region.kill(victim).await;
    let acked_at_kill = *acks_rx.borrow();
    let sent_at_kill = sent.load(Ordering::SeqCst);
    assert!(
        sent_at_kill < EVENTS && acked_at_kill < EVENTS,
        "the kill did not land mid-stream: {sent_at_kill} sent, {acked_at_kill} acknowledged"
    );

    let (acked_in_order, failed) = publishing.await.expect("publishing task");
    assert!(
        failed.is_empty(),
        "publishes failed: {:?}",
        &failed[..failed.len().min(5)]
    );
    // Partition 0 (led by the victim) kept acknowledging after the kill: events sent after
    // the kill went there and were acknowledged (none failed), so through the failover.
    assert!(
        acked_in_order
            .iter()
            .any(|(_, partition, _, n)| *partition == 0 && *n >= sent_at_kill),
        "no publish sent to partition 0 after its leader was killed was acknowledged"
    );
    // Each event acknowledged exactly once.
    let mut acked: HashMap<String, (u32, u64)> = HashMap::new();
    for (id, partition, offset, _) in &acked_in_order {
        if let Some(earlier) = acked.insert(id.clone(), (*partition, *offset)) {
            panic!("event {id} acknowledged twice: at {earlier:?} and ({partition}, {offset})");
        }
    }

    let check = |log: &BTreeMap<(u32, u64), String>| {
        // Where each id is stored, every occurrence counted.
        let mut seen: HashMap<&str, Vec<(u32, u64)>> = HashMap::new();
        for (pos, id) in log {
            seen.entry(id.as_str()).or_default().push(*pos);
        }
        for (id, positions) in &seen {
            assert_eq!(positions.len(), 1, "event {id} stored at {positions:?}");
        }
        // Every acknowledged event is there once, at its acknowledged position.
        for (id, pos) in &acked {
            assert_eq!(
                seen.get(id.as_str()).map(Vec::as_slice),
                Some(std::slice::from_ref(pos)),
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
        // The position is the next offset next() returns, also while a received frame
        // still holds buffered events (the replica dumps of chaos runs stop on it).
        assert_eq!(sub.position(), Some(o + 1), "position after offset {o}");
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

/// Every group a node leads replicates to a follower on a lane of the one stream the two
/// nodes share: 64 partitions (and the metadata group) written at once open at most one
/// replication stream per follower, and the requests of several groups travel together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_groups_replicate_on_one_stream_per_follower() {
    const GROUPS: u32 = 64;
    let region = TestRegion::start(3).await;
    let mut wide = TopicConfig::new("wide", GROUPS);
    wide.groups = GROUPS;
    let client = region.create_topic(wide).await;
    let producer = client
        .producer("wide", ProducerOptions::default())
        .await
        .expect("producer");
    let subject = Subject::new("wide.event").unwrap();
    let mut acks = FuturesUnordered::new();
    for i in 0..GROUPS * 20 {
        let event = Event::new(
            format!("e{i}"),
            "/test",
            "wide",
            subject.clone(),
            vec![b'x'; 100],
        );
        acks.push(producer.send(event).await.expect("queued"));
    }
    let mut partitions = std::collections::BTreeSet::new();
    while let Some(ack) = acks.next().await {
        partitions.insert(ack.expect("acknowledged").partition);
    }
    assert_eq!(
        partitions.len(),
        GROUPS as usize,
        "every partition was written"
    );

    let mut lanes_in_all = 0;
    for id in region.live_ids() {
        let [streams, lanes, frames, requests] = region
            .node(id)
            .expect("running")
            .node()
            .replication_counts();
        println!(
            "node {id}: {streams} streams, {lanes} lanes, {frames} frames, {requests} requests"
        );
        assert!(
            (1..=2).contains(&streams),
            "node {id} opened {streams} replication streams for {lanes} lanes; one per follower (2) is the most"
        );
        assert!(
            requests >= frames,
            "node {id}: {frames} frames carried {requests} requests"
        );
        lanes_in_all += lanes;
    }
    // Each of the 65 groups has a leader replicating to two followers.
    assert!(
        lanes_in_all >= u64::from(GROUPS + 1) * 2,
        "{lanes_in_all} lanes for {} groups",
        GROUPS + 1
    );
}
