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

async fn publish_keyed(client: &Client, events: usize) -> Vec<Published> {
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
    for i in 0..events {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_four_partition_topic_forwards_into_two_partitions_by_key_in_order() {
    const EVENTS: usize = 2_000;
    let mesh = TestMesh::start(&[("a", 1), ("b", 1)]).await;
    // b's first: a's forwarding would otherwise define it in b with 4 partitions.
    let b = mesh.region("b").create_topic(topic("orders", 2)).await;
    let a = mesh.region("a").create_topic(topic("orders", 4)).await;
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
    let published = publish_keyed(&a, EVENTS).await;
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
    // Eight forwarders: each source partition feeds both destination partitions.
    let forwarders = mesh
        .region("a")
        .node(mesh.region("a").first_id)
        .expect("a runs")
        .node()
        .forwarding()
        .into_iter()
        .filter(|f| f.topic == "orders" && f.destination == "b")
        .map(|f| (f.partition, f.dest_partition))
        .collect::<std::collections::BTreeSet<_>>();
    assert_eq!(forwarders.len(), 8, "{forwarders:?}");

    // Each publish's invoke and completion, in time order (an invoke before a completion
    // at the same millisecond; a process's invokes in the order it sent them).
    let mut timed: Vec<(u64, u8, &str, Op)> = Vec::new();
    for (process, key, id, partition, offset, invoked, done) in &published {
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
                regions: vec!["b".into()],
                region: "a".into(),
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
                region: "a".into(),
                topic: "orders".into(),
                partition: Some(*partition),
                offset: Some(*offset),
                ..Op::default()
            },
        ));
    }
    timed.sort_by(|x, y| (x.0, x.1, x.2).cmp(&(y.0, y.1, y.2)));
    let mut lines: Vec<Op> = timed.into_iter().map(|(_, _, _, op)| op).collect();
    lines.extend(final_reads(&a, "a", 4).await);
    lines.extend(final_reads(&b, "b", 2).await);
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
            min_acknowledged_per_region: EVENTS as u64,
            min_publishes_per_fault: 0,
        },
    );
    assert_eq!(report.verdict, Verdict::Pass, "{}", report.table());
    assert_eq!(report.counts.order_violations, 0);
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
