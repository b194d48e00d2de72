//! Mesh-wide topics, over real QUIC in one process.
//!
//! - An integration topic created in one region only is defined in every other region by the
//!   forwarding (same configuration but for the Raft groups, which each region chooses),
//!   without any traffic.
//! - A 4-partition topic in a forwards into the same topic with 2 partitions in b: each
//!   event goes to the partition its key routes to there, and the history of the run
//!   (publishes with their acknowledged offsets, final reads of both regions) passes
//!   ferry-check's checker: nothing lost, nothing stored twice, per-key order kept in every
//!   log.
//! - The same topic forwarded from a to b grows in both regions while events flow (2 → 4
//!   partitions in a, 2 → 3 in b): nothing lost, nothing stored twice, and per-key order
//!   kept in every log and across each split, in both regions.

use std::time::Duration;

use ferry_check::{History, Op, OpType, Options, Verdict};
use ferry_client::{Client, ProducerOptions};
use ferry_proto::{Event, EventClass, RegionPolicy, Subject, SubjectFilter, TopicConfig};
use ferry_tests::{wait_until, TestMesh};
use futures::stream::{FuturesUnordered, StreamExt};

fn topic(name: &str, partitions: u32) -> TopicConfig {
    let mut t = TopicConfig::new(name, partitions);
    t.replication = 1;
    t.subjects = SubjectFilter::new(format!("{name}.>")).expect("filter");
    t.class = EventClass::Integration;
    t.regions = RegionPolicy::ByInterest;
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_integration_topic_created_in_one_region_is_defined_in_every_region() {
    let mesh = TestMesh::start(&[("a", 1), ("b", 1), ("c", 1)]).await;
    // A domain topic first: by the time audit (created after it) is everywhere, the
    // forwarding has considered both.
    let mut ledger = TopicConfig::new("ledger", 1);
    ledger.replication = 1;
    mesh.region("a").create_topic(ledger).await;
    let audit = topic("audit", 3);
    mesh.region("a").create_topic(audit.clone()).await;
    for region in ["b", "c"] {
        let client = mesh.region(region).client();
        wait_until(
            &format!("audit defined in {region}"),
            Duration::from_secs(30),
            || async {
                client
                    .describe_topic("audit")
                    .await
                    // The same configuration, but for the Raft groups each region chooses.
                    .is_ok_and(|d| {
                        TopicConfig {
                            groups: 0,
                            ..d.config
                        } == audit
                    })
            },
        )
        .await;
        let topics = client.list_topics().await.expect("topics");
        assert!(
            !topics.iter().any(|t| t.name == "ledger"),
            "a domain topic spread to {region}: {topics:?}"
        );
    }
}

/// One acknowledged publish: (producer, key, id, partition, offset, invoked, done).
type Published = (u64, String, String, u32, u64, u64, u64);

async fn publish_keyed(client: &Client, events: std::ops::Range<usize>) -> Vec<Published> {
    const PRODUCERS: usize = 4;
    const KEYS: usize = 16;
    let mut producers = Vec::new();
    for _ in 0..PRODUCERS {
        let options = ProducerOptions {
            max_in_flight: 64,
            ..ProducerOptions::default()
        };
        producers.push(client.producer("orders", options).await.expect("producer"));
    }
    let mut acks = FuturesUnordered::new();
    let mut out = Vec::new();
    for i in events {
        let process = i % PRODUCERS;
        let key = format!("k{}", i % KEYS);
        let id = format!("e{i:05}");
        let event = Event::new(
            id.clone(),
            "/test",
            "order.created",
            Subject::new("orders.created").expect("subject"),
            vec![b'x'; 100],
        )
        .with_key(key.clone());
        let invoked = now_ms();
        let ack = producers[process].send(event).await.expect("queued");
        acks.push(async move { (process as u64, key, id, invoked, ack.await) });
        while acks.len() > 256 {
            let (process, key, id, invoked, result) = acks.next().await.expect("an ack");
            let ack = result.expect("published");
            let offset = ack.offset.expect("a first publish gets its offset");
            out.push((process, key, id, ack.partition, offset, invoked, now_ms()));
        }
    }
    while let Some((process, key, id, invoked, result)) = acks.next().await {
        let ack = result.expect("published");
        let offset = ack.offset.expect("a first publish gets its offset");
        out.push((process, key, id, ack.partition, offset, invoked, now_ms()));
    }
    out
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// The final read of every partition of `orders` in a region, as history lines.
async fn final_reads(client: &Client, region: &str, partitions: u32) -> Vec<Op> {
    let mut ops = Vec::new();
    for partition in 0..partitions {
        let mut events = Vec::new();
        let mut offset = 0;
        let high = loop {
            let (batch, high) = client
                .fetch("orders", partition, offset, 1 << 20)
                .await
                .expect("fetch");
            for (o, e) in batch {
                events.push(ferry_check::Observed {
                    offset: o,
                    id: e.id,
                });
                offset = o + 1;
            }
            if offset >= high {
                break high;
            }
        };
        ops.push(Op {
            op_type: Some(OpType::Ok),
            f: Some(ferry_check::Func::Read),
            time_ms: now_ms(),
            region: region.into(),
            topic: "orders".into(),
            partition: Some(partition),
            is_final: true,
            low: Some(0),
            high: Some(high),
            partitions: Some(partitions),
            events,
            ..Op::default()
        });
    }
    ops
}

/// Regions a and b of one node each with `orders` of `in_a` and `in_b` partitions (b's
/// first: a's forwarding would otherwise define it in b with a's count), b interested in
/// all of it and a aware of that.
async fn orders_forwarded_a_to_b(in_a: u32, in_b: u32) -> (TestMesh, Client, Client) {
    let mesh = TestMesh::start(&[("a", 1), ("b", 1)]).await;
    let b = mesh.region("b").create_topic(topic("orders", in_b)).await;
    let a = mesh.region("a").create_topic(topic("orders", in_a)).await;
    let version = b
        .add_interest("orders-b", "orders.>")
        .await
        .expect("interest");
    wait_until("b knows a", Duration::from_secs(30), || async {
        b.await_interest(version, Duration::from_millis(500))
            .await
            .is_ok_and(|r| r.seen_by == vec!["a".to_string()])
    })
    .await;
    (mesh, a, b)
}

/// The (source partition, destination partition) pairs a's node forwards `orders` to b by.
fn forwarders_a_to_b(mesh: &TestMesh) -> std::collections::BTreeSet<(u32, Option<u32>)> {
    mesh.region("a")
        .node(mesh.region("a").first_id)
        .expect("a runs")
        .node()
        .forwarding()
        .into_iter()
        .filter(|f| f.topic == "orders" && f.destination == "b")
        .map(|f| (f.partition, f.dest_partition))
        .collect()
}

/// Judges the history `lines` with ferry-check's strict checker (duplicates fail, at least
/// `acknowledged` acknowledged publishes) and asserts that it passes with no order
/// violation.
fn check_passes(lines: &[Op], acknowledged: u64) -> ferry_check::Report {
    let text: String = lines
        .iter()
        .map(|op| serde_json::to_string(op).expect("json") + "\n")
        .collect();
    let history = History::parse(&text).expect("a valid history");
    let report = ferry_check::check(
        &history,
        &Options {
            duplicates_fail: true,
            retention: false,
            min_acknowledged_per_region: acknowledged,
            min_publishes_per_fault: 0,
        },
    );
    assert_eq!(report.verdict, Verdict::Pass, "{}", report.table());
    assert_eq!(report.counts.order_violations, 0);
    report
}

/// Each publish's invoke and completion in region `origin`, wanted in `destination`, as
/// history lines in time order (an invoke before a completion at the same millisecond; a
/// process's invokes in the order it sent them).
fn publish_lines(published: &[Published], origin: &str, destination: &str) -> Vec<Op> {
    let mut timed: Vec<(u64, u8, &str, Op)> = Vec::new();
    for (process, key, id, partition, offset, invoked, done) in published {
        timed.push((
            *invoked,
            0,
            id,
            Op {
                op_type: Some(OpType::Invoke),
                process: *process,
                f: Some(ferry_check::Func::Publish),
                time_ms: *invoked,
                id: Some(id.clone()),
                key: Some(key.clone()),
                regions: vec![destination.into()],
                region: origin.into(),
                topic: "orders".into(),
                ..Op::default()
            },
        ));
        timed.push((
            *done,
            1,
            id,
            Op {
                op_type: Some(OpType::Ok),
                process: *process,
                f: Some(ferry_check::Func::Publish),
                time_ms: *done,
                id: Some(id.clone()),
                region: origin.into(),
                topic: "orders".into(),
                partition: Some(*partition),
                offset: Some(*offset),
                ..Op::default()
            },
        ));
    }
    timed.sort_by(|x, y| (x.0, x.1, x.2).cmp(&(y.0, y.1, y.2)));
    timed.into_iter().map(|(_, _, _, op)| op).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_four_partition_topic_forwards_into_two_partitions_by_key_in_order() {
    const EVENTS: usize = 2_000;
    let (mesh, a, b) = orders_forwarded_a_to_b(4, 2).await;
    let published = publish_keyed(&a, 0..EVENTS).await;
    wait_until("every event in b", Duration::from_secs(60), || async {
        let mut held = 0;
        for partition in 0..2 {
            match b.describe_topic("orders").await {
                Ok(d) => held += d.partitions[partition].high_watermark,
                Err(_) => return false,
            }
        }
        held >= EVENTS as u64
    })
    .await;
    let forwarders = forwarders_a_to_b(&mesh);
    // Four forwarders: a key of source partition p (hash mod 4) goes to p mod 2 there.
    assert_eq!(
        forwarders,
        (0..4).map(|p| (p, Some(p % 2))).collect(),
        "{forwarders:?}"
    );

    let mut lines = publish_lines(&published, "a", "b");
    lines.extend(final_reads(&a, "a", 4).await);
    lines.extend(final_reads(&b, "b", 2).await);
    let report = check_passes(&lines, EVENTS as u64);
    assert_eq!(
        report.acknowledged_by_region.get("a"),
        Some(&(EVENTS as u64))
    );
    // And in b every key lives in the one partition its key routes to with 2 partitions.
    let key_of: std::collections::HashMap<&str, &str> = published
        .iter()
        .map(|p| (p.2.as_str(), p.1.as_str()))
        .collect();
    for read in lines.iter().filter(|op| op.is_final && op.region == "b") {
        let partition = read.partition.expect("partition");
        for e in &read.events {
            let key = key_of[e.id.as_str()];
            assert_eq!(
                ferry_proto::partition_for_key(key.as_bytes(), 2),
                partition,
                "{} (key {key}) is in b's partition {partition}",
                e.id
            );
        }
    }
}

/// The history lines of `layout`'s splits in `region`.
fn split_lines(region: &str, layout: &ferry_proto::KeyLayout) -> Vec<Op> {
    layout
        .splits
        .iter()
        .map(|split| Op {
            op_type: Some(OpType::Ok),
            f: Some(ferry_check::Func::Split),
            time_ms: now_ms(),
            region: region.into(),
            topic: "orders".into(),
            partition: Some(split.child),
            parent: Some(split.parent),
            offset: split.seal,
            ..Op::default()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_topic_grows_in_both_regions_under_load_with_per_key_order_kept() {
    const DURING: usize = 4_000;
    const AFTER: usize = 1_000;
    let (mesh, a, b) = orders_forwarded_a_to_b(2, 2).await;
    // Both regions grow while a publishes and forwards: a splits its source partitions
    // (their children forward once the parents passed their seals), b its destination
    // partitions (a's forwarders find the new layout when b refuses their batches). The
    // link is cut meanwhile, so the parents' forwarders are behind their seals when the
    // children have events to send.
    let during = tokio::spawn({
        let a = a.clone();
        async move { publish_keyed(&a, 0..DURING).await }
    });
    wait_until("forwarding under way", Duration::from_secs(30), || async {
        b.describe_topic("orders")
            .await
            .is_ok_and(|d| d.partitions.iter().any(|p| p.high_watermark > 0))
    })
    .await;
    mesh.set_link("a", "b", false);
    let grown_a = ferry_tests::grow_topic(&a, "orders", 4).await;
    let mut published = during.await.expect("publisher");
    // a's children take events while their parents' are not all forwarded.
    published.extend(publish_keyed(&a, DURING..DURING + AFTER).await);
    let grown_b = ferry_tests::grow_topic(&b, "orders", 3).await;
    mesh.set_link("a", "b", true);
    // And after: every event now goes by the new layouts.
    published.extend(publish_keyed(&a, DURING + AFTER..DURING + 2 * AFTER).await);
    let total = (DURING + 2 * AFTER) as u64;
    wait_until("every event in b", Duration::from_secs(60), || async {
        b.describe_topic("orders")
            .await
            .is_ok_and(|d| d.partitions.iter().map(|p| p.high_watermark).sum::<u64>() >= total)
    })
    .await;
    // a's children forward too, and b's child took events.
    let forwarders = forwarders_a_to_b(&mesh)
        .into_iter()
        .map(|(partition, _)| partition)
        .collect::<std::collections::BTreeSet<_>>();
    assert_eq!(
        forwarders,
        (0..4).collect(),
        "a's partitions forwarding to b"
    );
    let in_b = b.describe_topic("orders").await.expect("b describes");
    assert!(
        in_b.partitions[2].high_watermark > 0,
        "{:?}",
        in_b.partitions
    );

    let mut lines = publish_lines(&published, "a", "b");
    lines.extend(split_lines("a", &grown_a));
    lines.extend(split_lines("b", &grown_b));
    lines.extend(final_reads(&a, "a", 4).await);
    lines.extend(final_reads(&b, "b", 3).await);
    check_passes(&lines, total);
    // Every event is in b once, in the partition its key routes to there.
    let key_of: std::collections::HashMap<&str, &str> = published
        .iter()
        .map(|p| (p.2.as_str(), p.1.as_str()))
        .collect();
    let mut held = 0;
    for read in lines.iter().filter(|op| op.is_final && op.region == "b") {
        let partition = read.partition.expect("partition");
        for e in &read.events {
            let key = key_of[e.id.as_str()];
            let home = grown_b.partition_for_key(key.as_bytes(), 3);
            let parent = grown_b.split_of(partition).map(|s| s.parent);
            let sealed_at = grown_b.split_of(home).and_then(|s| s.seal);
            // Below its seal, a key of the child is in the parent.
            let before_seal = Some(partition) == grown_b.split_of(home).map(|s| s.parent)
                && sealed_at.is_some_and(|seal| e.offset < seal);
            assert!(
                home == partition || before_seal,
                "{} (key {key}) is in b's partition {partition} (parent {parent:?}), its key's is {home}",
                e.id
            );
            held += 1;
        }
    }
    assert_eq!(held, total);
}
