//! Retention against forwarding, two regions of one node over real QUIC, b interested in
//! `pay.>`, b's node stopped while a publishes, a's retention dropping events older than 1 s
//! every 100 ms.
//!
//! - Without `keep_until_forwarded`: what retention drops before a's forwarder read it is
//!   counted per (partition, region) in `ferry ctl regions`' report and in `/metrics`.
//! - With it: a's retention keeps every event b has not received, a's partition refuses
//!   publishes with `PartitionFull` naming b once it holds `hard_max_bytes`, and when b is
//!   back every acknowledged event reaches it once, retention drops events again and
//!   publishing works again.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_client::{Client, ClientError, ProducerOptions};
use ferry_proto::wire::ErrorCode;
use ferry_proto::{
    Event, EventClass, RegionPolicy, Retention, Subject, SubjectFilter, TopicConfig,
};
use ferry_tests::{wait_until, TestMesh};
use tokio::time::Instant;

fn topic(retention: Retention) -> TopicConfig {
    let mut t = TopicConfig::new("pay", 1);
    t.replication = 1;
    t.subjects = SubjectFilter::new("pay.>").expect("filter");
    t.class = EventClass::Integration;
    t.regions = RegionPolicy::ByInterest;
    t.retention = retention;
    t
}

fn event(i: usize) -> Event {
    Event::new(
        format!("e{i}"),
        "/test",
        "payment.captured",
        Subject::new("pay.eu.captured").expect("subject"),
        vec![b'x'; 1000],
    )
    .with_key(format!("k{}", i % 4))
}

/// How many times each event id is in b's `pay` (a failed read is `None`).
async fn copies(client: &Client) -> Option<BTreeMap<String, usize>> {
    let mut out = BTreeMap::new();
    let mut offset = 0;
    loop {
        let (events, high) = client.fetch("pay", 0, offset, 1 << 20).await.ok()?;
        for (o, e) in events {
            *out.entry(e.id).or_default() += 1;
            offset = o + 1;
        }
        if offset >= high {
            return Some(out);
        }
    }
}

/// Two one-node regions with `pay` in both, b interested, a forwarding to b, b stopped.
async fn b_down(retention: Retention) -> TestMesh {
    let mut mesh = TestMesh::start_with(&[("a", 1), ("b", 1)], |config| {
        config.retention_interval_ms = 100;
        config.mesh.forward_batch_events = 4;
        config.http = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    // b's first: a's forwarding would otherwise define it in b with a's retention.
    let b = mesh
        .region("b")
        .create_topic(topic(Retention::default()))
        .await;
    mesh.region("a").create_topic(topic(retention)).await;
    wait_until("b knows region a", Duration::from_secs(30), || async {
        let b = mesh.region("b");
        b.node(b.first_id)
            .is_some_and(|n| n.node().mesh_nodes().iter().any(|r| r.region == "a"))
    })
    .await;
    let version = b.add_interest("billing", "pay.>").await.expect("interest");
    let reach = b
        .await_interest(version, Duration::from_secs(30))
        .await
        .expect("await");
    assert_eq!(reach.seen_by, vec!["a".to_string()]);
    wait_until("a forwards pay to b", Duration::from_secs(30), || async {
        a_forwarding(&mesh).is_some()
    })
    .await;
    let b_id = mesh.region("b").first_id;
    mesh.region_mut("b").stop(b_id).await;
    mesh
}

fn a_forwarding(mesh: &TestMesh) -> Option<ferry_proto::wire::ForwardingInfo> {
    let a = mesh.region("a");
    a.node(a.first_id)?
        .node()
        .forwarding()
        .into_iter()
        .find(|f| f.topic == "pay" && f.destination == "b")
}

fn a_low_watermark(mesh: &TestMesh) -> u64 {
    let a = mesh.region("a");
    let node = a.node(a.first_id).expect("a runs");
    node.node()
        .partition("pay", 0)
        .expect("a hosts pay/0")
        .view
        .watermarks()
        .low
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_retention_drops_before_they_are_forwarded_are_counted() {
    let mesh = b_down(Retention {
        max_age_ms: Some(1_000),
        ..Retention::default()
    })
    .await;
    let a = mesh.region("a").client();
    let producer = a
        .producer("pay", ProducerOptions::default())
        .await
        .expect("producer");
    // More than the forwarder holds in memory (2 batches of 4 in flight, 8 read ahead).
    for i in 0..40 {
        let ack = producer.send(event(i)).await.expect("queued");
        ack.await.expect("published");
    }
    let a_node = mesh
        .region("a")
        .node(mesh.region("a").first_id)
        .expect("a runs");
    let http = a_node.http_addr().expect("a serves HTTP");
    // Retention trims batch by batch and the forwarder counts on its next pass, so the count
    // may still grow: wait until the forwarder, the regions report and /metrics agree.
    let counted = std::sync::Mutex::new(0u64);
    wait_until(
        "the drop is counted for pay/0 -> b, the same in the report and /metrics",
        Duration::from_secs(30),
        || async {
            let Some(n) = a_forwarding(&mesh).map(|f| f.trimmed_unforwarded) else {
                return false;
            };
            *counted.lock().unwrap() = n;
            if n == 0 {
                return false;
            }
            let Ok(report) = a.regions().await else {
                return false;
            };
            let in_report = report.forwarding.iter().any(|f| {
                f.topic == "pay" && f.destination == "b" && f.trimmed_unforwarded == n
            });
            let line = format!(
                "ferry_forwarding_trimmed_unforwarded_total{{node=\"{}\",partition=\"pay/0\",destination=\"b\"}} {n}",
                mesh.region("a").first_id
            );
            let metrics = match reqwest::get(format!("http://{http}/metrics")).await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            in_report && metrics.lines().any(|l| l == line)
        },
    )
    .await;
    let counted = *counted.lock().unwrap();
    assert!(counted <= 40, "{counted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_until_forwarded_holds_events_for_a_region_and_refuses_publishes_at_its_hard_limit() {
    let mut mesh = b_down(Retention {
        max_age_ms: Some(1_000),
        max_bytes: None,
        keep_until_forwarded: true,
        hard_max_bytes: Some(30_000),
        ..Retention::default()
    })
    .await;
    let a = mesh.region("a").client();
    let mut acked = Vec::new();
    let mut refusal = None;
    for i in 0..200 {
        let producer = a
            .producer("pay", ProducerOptions::default())
            .await
            .expect("producer");
        let ack = producer.send(event(i)).await.expect("queued");
        match ack.await {
            Ok(_) => acked.push(format!("e{i}")),
            Err(ClientError::Api(e)) if e.code == ErrorCode::PartitionFull => {
                refusal = Some(e.message);
                break;
            }
            Err(e) => panic!("publish e{i}: {e}"),
        }
    }
    let refusal = refusal.expect("a refuses publishes within 200 events of 1 kB");
    assert!(refusal.contains("b is behind (at offset"), "{refusal}");
    assert!(
        acked.len() >= 25,
        "only {} accepted before the limit",
        acked.len()
    );
    // The events are older than max_age and retention runs every 100 ms: for 1.5 s (15
    // rounds) it drops none, because b has not received them.
    let holding = Instant::now();
    while holding.elapsed() < Duration::from_millis(1_500) {
        assert_eq!(
            a_low_watermark(&mesh),
            0,
            "retention dropped events b lacks"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let b_id = mesh.region("b").first_id;
    mesh.region_mut("b").restart(b_id).await;
    let b = mesh.region("b").client();
    wait_until(
        "every acknowledged event reaches b",
        Duration::from_secs(60),
        || async { copies(&b).await.is_some_and(|c| c.len() >= acked.len()) },
    )
    .await;
    let held = copies(&b).await.expect("read b");
    for id in &acked {
        assert_eq!(held.get(id), Some(&1), "{id} in b: {held:?}");
    }
    wait_until(
        "retention drops forwarded events again",
        Duration::from_secs(30),
        || async { a_low_watermark(&mesh) > 0 },
    )
    .await;
    let producer = a
        .producer("pay", ProducerOptions::default())
        .await
        .expect("producer");
    let ack = producer.send(event(1_000)).await.expect("queued");
    ack.await.expect("publishing works again");
}
