//! Three regions of three nodes in one process over real QUIC (mTLS, one CA), gossiping and
//! forwarding. Regions b and c are interested in `orders.>`; 10,000 events published in a
//! reach b's and c's logs exactly once and in per-key order, while the a–b link is cut in
//! both directions (c relays) and the leader of a source partition is cut off from every
//! node and stopped mid-stream.
//! A topic nobody outside a is interested in never crosses, and removing b's interest stops
//! forwarding to b while c still gets everything.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use ferry_client::{Client, ProducerOptions};
use ferry_proto::{Event, EventClass, RegionPolicy, Subject, SubjectFilter, TopicConfig};
use ferry_tests::{TestMesh, TestRegion};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

const PARTITIONS: u32 = 2;
const EVENTS: usize = 10_000;
const PRODUCERS: usize = 4;
const KEYS: usize = 16;

fn topic(name: &str, subjects: &str) -> TopicConfig {
    let mut t = TopicConfig::new(name, PARTITIONS);
    t.subjects = SubjectFilter::new(subjects).unwrap();
    t.class = EventClass::Integration;
    t.regions = RegionPolicy::ByInterest;
    t
}

/// Waits until `check` holds, polling, or fails naming `what` after `timeout`.
async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Every event id in a topic of a region, with where it is.
async fn read_topic(client: &Client, topic: &str) -> Vec<(u32, u64, String)> {
    let mut out = Vec::new();
    for partition in 0..PARTITIONS {
        let mut offset = 0;
        loop {
            let Ok((events, high)) = client.fetch(topic, partition, offset, 1 << 20).await else {
                break;
            };
            for (o, e) in events {
                out.push((partition, o, e.id));
                offset = o + 1;
            }
            if offset >= high {
                break;
            }
        }
    }
    out
}

/// Checks a destination's copy: each id once, all of `expected` there, per-key order kept.
fn check_copy(region: &str, log: &[(u32, u64, String)], expected: &[String]) {
    let mut seen: HashMap<&str, (u32, u64)> = HashMap::new();
    for (p, o, id) in log {
        if let Some(first) = seen.insert(id.as_str(), (*p, *o)) {
            panic!(
                "region {region}: {id} stored twice, at {first:?} and {:?}",
                (p, o)
            );
        }
    }
    let missing: Vec<_> = expected
        .iter()
        .filter(|id| !seen.contains_key(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "region {region}: {} events missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let mut last: BTreeMap<&str, (u32, u64, u64)> = BTreeMap::new();
    for (p, o, id) in log {
        let (key, seq) = id.split_once('#').expect("key#seq");
        let seq: u64 = seq.parse().expect("seq");
        if let Some((pp, po, ps)) = last.insert(key, (*p, *o, seq)) {
            assert_eq!(pp, *p, "region {region}: key {key} changed partition");
            assert!(
                po < *o && ps < seq,
                "region {region}: key {key} out of order at {p}/{o}"
            );
        }
    }
}

fn crossings(region: &TestRegion, topic: &str, destination: &str) -> u64 {
    region
        .nodes
        .iter()
        .flatten()
        .flat_map(|n| n.node().forwarded_events())
        .filter(|((t, d), _)| t == topic && d == destination)
        .map(|(_, n)| n)
        .sum()
}

async fn add_interest(region: &TestRegion, name: &str, subjects: &str) {
    let client = region.client();
    wait_until(
        &format!("adding interest {name} in {}", region.name),
        Duration::from_secs(30),
        || async { client.add_interest(name, subjects).await.is_ok() },
    )
    .await;
}

/// Every node of `region` sees `regions` (and only those) interested in `subject`.
fn sees_interest(region: &TestRegion, subject: &str, regions: &[&str]) -> bool {
    region
        .nodes
        .iter()
        .flatten()
        .all(|n| n.node().regions_interested_in(subject) == regions)
}

/// Publishes events `from..to` in region a (keys spread over producers), returning their ids;
/// runs `midway` once when half are queued.
async fn publish(
    client: &Client,
    from: usize,
    to: usize,
    subject: &str,
    midway: impl std::future::Future<Output = ()>,
) -> Vec<String> {
    let mut producers = Vec::new();
    for _ in 0..PRODUCERS {
        let options = ProducerOptions {
            max_in_flight: 256,
            retry_for: Duration::from_secs(60),
            ..ProducerOptions::default()
        };
        producers.push(
            client
                .producer(subject_topic(subject), options)
                .await
                .expect("producer"),
        );
    }
    let subject = Subject::new(subject).unwrap();
    let mut acks = FuturesUnordered::new();
    let mut ids = Vec::new();
    let mut failed = Vec::new();
    let mut midway = Some(Box::pin(midway));
    for i in from..to {
        let producer = &producers[i % PRODUCERS];
        let key = format!("{}-k{}", subject.as_str(), i % KEYS);
        let id = format!("{key}#{i:06}");
        let event = Event::new(
            id.clone(),
            "/test",
            "order.created",
            subject.clone(),
            vec![b'x'; 256],
        )
        .with_key(key);
        let ack = producer.send(event).await.expect("queued");
        ids.push(id.clone());
        acks.push(async move { (id, ack.await) });
        if i == from + (to - from) / 2 {
            if let Some(m) = midway.take() {
                m.await;
            }
        }
        while acks.len() > 1_000 {
            if let Some((id, Err(e))) = acks.next().await {
                failed.push(format!("{id}: {e}"));
            }
        }
    }
    while let Some((id, result)) = acks.next().await {
        if let Err(e) = result {
            failed.push(format!("{id}: {e}"));
        }
    }
    assert!(
        failed.is_empty(),
        "publishes failed: {:?}",
        &failed[..failed.len().min(5)]
    );
    ids
}

fn subject_topic(subject: &str) -> &'static str {
    match subject.split('.').next() {
        Some("orders") => "orders",
        Some("audit") => "audit",
        _ => "billing",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn integration_events_reach_interested_regions_once_through_a_link_cut_and_a_leader_stop() {
    let mut mesh = TestMesh::start(&[("a", 3), ("b", 3), ("c", 3)]).await;
    for region in &mesh.regions {
        region.create_topic(topic("orders", "orders.>")).await;
        region.create_topic(topic("billing", "billing.>")).await;
    }
    wait_until(
        "every node sees all nine",
        Duration::from_secs(30),
        || async {
            mesh.regions
                .iter()
                .flat_map(|r| r.nodes.iter().flatten())
                .all(|n| n.node().mesh_nodes().len() == 9)
        },
    )
    .await;

    add_interest(mesh.region("b"), "orders-b", "orders.>").await;
    add_interest(mesh.region("c"), "orders-c", "orders.>").await;
    let took = wait_until(
        "a learns b's and c's interest",
        Duration::from_secs(30),
        || async { sees_interest(mesh.region("a"), "orders.created", &["b", "c"]) },
    )
    .await;
    eprintln!("interest reached every node of a in {took:?} after it was committed");

    let client_a = mesh.region("a").client();
    // 1. Everything up: the first 3,000.
    let mut ids = publish(&client_a, 0, 3_000, "orders.created", async {}).await;
    // 2. The a–b link is cut both ways while publishing the next 3,000.
    mesh.set_link("a", "b", false);
    ids.extend(publish(&client_a, 3_000, 6_000, "orders.created", async {}).await);
    // 3. Still cut, the leader of a's orders/0 stops midway through the last 4,000.
    let victim = mesh
        .region("a")
        .leader_of("orders", 0)
        .await
        .expect("leader");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let publishing = publish(&client_a, 6_000, EVENTS, "orders.created", async move {
        let _ = stop_tx.send(());
    });
    let stopping = async {
        stop_rx.await.expect("midway");
        // Gone at once for everyone (in-flight batches unanswered), then stopped.
        mesh.isolate("a", victim);
        mesh.region_mut("a").stop(victim).await;
    };
    let (more, ()) = tokio::join!(publishing, stopping);
    ids.extend(more);
    // A topic with no interest outside a.
    publish(&client_a, 0, 500, "billing.charged", async {}).await;

    // Everything reaches c directly and b through c while the link is still down.
    let client_b = mesh.region("b").client();
    let client_c = mesh.region("c").client();
    for (name, client) in [("b", &client_b), ("c", &client_c)] {
        let started = Instant::now();
        let mut held = 0;
        while held < EVENTS {
            held = read_topic(client, "orders").await.len();
            if started.elapsed() > Duration::from_secs(90) {
                let report = client_a.regions().await;
                panic!("{name} holds {held} of {EVENTS} events after 90 s; a reports {report:#?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let took = started.elapsed();
        eprintln!(
            "region {name} held all {EVENTS} events {took:?} after the last was acknowledged in a"
        );
    }
    let report = client_a.regions().await.expect("regions report");
    for f in &report.forwarding {
        eprintln!(
            "{}/{} {} -> {}: lag {} events, sent {}, route {:?}, error {:?}",
            f.topic,
            f.partition,
            f.source,
            f.destination,
            f.lag_events,
            f.sent_events,
            f.route,
            f.last_error
        );
    }
    assert!(
        report
            .forwarding
            .iter()
            .any(|f| f.topic == "orders" && f.destination == "b" && f.route == "via c"),
        "with the a-b link down, orders reached b via c"
    );
    mesh.set_link("a", "b", true);
    check_copy("b", &read_topic(&client_b, "orders").await, &ids);
    check_copy("c", &read_topic(&client_c, "orders").await, &ids);

    // Nobody outside a wants billing: it never crossed.
    assert_eq!(crossings(mesh.region("a"), "billing", "b"), 0);
    assert_eq!(crossings(mesh.region("a"), "billing", "c"), 0);
    assert!(read_topic(&client_b, "billing").await.is_empty());
    assert!(read_topic(&client_c, "billing").await.is_empty());
    // (The stopped leader's counts left with it; the live nodes forwarded the rest.)
    assert!(crossings(mesh.region("a"), "orders", "b") > 0);

    // b's last interest goes: forwarding to b stops, c still gets everything.
    client_b
        .remove_interest("orders-b")
        .await
        .expect("remove interest");
    let took = wait_until(
        "a forgets b's interest",
        Duration::from_secs(30),
        || async { sees_interest(mesh.region("a"), "orders.created", &["c"]) },
    )
    .await;
    eprintln!("interest removal reached every node of a in {took:?}");
    let to_b_before = crossings(mesh.region("a"), "orders", "b");
    let late = publish(&client_a, EVENTS, EVENTS + 300, "orders.created", async {}).await;
    wait_until("the late events in c", Duration::from_secs(60), || async {
        read_topic(&client_c, "orders").await.len() >= EVENTS + 300
    })
    .await;
    let all: Vec<String> = ids.iter().chain(&late).cloned().collect();
    check_copy("c", &read_topic(&client_c, "orders").await, &all);
    assert_eq!(
        read_topic(&client_b, "orders").await.len(),
        EVENTS,
        "b got nothing new"
    );
    assert_eq!(crossings(mesh.region("a"), "orders", "b"), to_b_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_ca_never_joins_the_gossip() {
    let mesh = TestMesh::start(&[("a", 1), ("b", 1)]).await;
    let foreign = TestMesh::start_with(&[("x", 1)], |config| {
        config.mesh.remote_seeds = vec![];
    })
    .await;
    // Point the foreign node at a's node and a's node at the foreign one: neither may see
    // the other, while a and b see each other.
    let a = mesh.region("a").node(1).unwrap().node().clone();
    let x = foreign.region("x").node(1).unwrap().node().clone();
    wait_until(
        "a and b see each other",
        Duration::from_secs(30),
        || async { a.mesh_nodes().len() == 2 },
    )
    .await;
    let x_addr = foreign.region("x").configs[0].listen_addr().unwrap();
    let a_addr = mesh.region("a").configs[0].listen_addr().unwrap();
    // The foreign node dials a with its own certificate: refused at the handshake.
    x.gossip_with(a_addr).await;
    a.gossip_with(x_addr).await;
    // Give gossip many rounds (100 ms each) to go wrong.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        assert_eq!(a.mesh_nodes().len(), 2, "a's view: {:?}", a.mesh_nodes());
        assert_eq!(x.mesh_nodes().len(), 1, "x's view: {:?}", x.mesh_nodes());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_is_retried_and_its_cause_shown_until_the_destination_accepts_it() {
    let mesh = TestMesh::start(&[("a", 1), ("b", 1)]).await;
    let mut audit = topic("audit", "audit.>");
    audit.replication = 1;
    mesh.region("a").create_topic(audit.clone()).await;
    // b wants audit events but has no topic to put them in.
    add_interest(mesh.region("b"), "auditors", "audit.>").await;
    wait_until("a learns b's interest", Duration::from_secs(30), || async {
        sees_interest(mesh.region("a"), "audit.logged", &["b"])
    })
    .await;
    let client_a = mesh.region("a").client();
    let ids = publish(&client_a, 0, 50, "audit.logged", async {}).await;
    let started = Instant::now();
    let shown = loop {
        let report = client_a.regions().await.expect("report");
        let shown = report
            .forwarding
            .iter()
            .filter(|f| f.topic == "audit" && f.destination == "b")
            .filter_map(|f| f.last_error.clone())
            .collect::<Vec<_>>()
            .join("; ");
        if shown.contains("no topic named \"audit\"") {
            break shown;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the refusal never showed in the report: {report:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("shown while b has no topic: {shown}");
    assert!(read_topic(&mesh.region("b").client(), "audit")
        .await
        .is_empty());
    // The topic appears in b: the retries get through, once each.
    let client_b = mesh.region("b").create_topic(audit).await;
    wait_until("the events in b", Duration::from_secs(60), || async {
        read_topic(&client_b, "audit").await.len() >= ids.len()
    })
    .await;
    check_copy("b", &read_topic(&client_b, "audit").await, &ids);
    wait_until("the error clears", Duration::from_secs(30), || async {
        let report = client_a.regions().await.expect("report");
        report
            .forwarding
            .iter()
            .filter(|f| f.topic == "audit")
            .all(|f| f.last_error.is_none())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_over_a_slow_lossy_link_delivers_everything_once() {
    let mesh = TestMesh::start(&[("a", 1), ("b", 1)]).await;
    // 40 ms each way (+0-10 ms jitter), and one direction in ten pays a retransmission.
    let shape = ferry_net::LinkShape {
        delay: Duration::from_millis(40),
        jitter: Duration::from_millis(10),
        loss: 0.1,
        ..ferry_net::LinkShape::default()
    };
    mesh.shape_link("a", "b", shape);
    let mut orders = topic("orders", "orders.>");
    orders.replication = 1;
    mesh.region("a").create_topic(orders.clone()).await;
    let client_b = mesh.region("b").create_topic(orders).await;
    add_interest(mesh.region("b"), "orders-b", "orders.>").await;
    wait_until("a learns b's interest", Duration::from_secs(30), || async {
        sees_interest(mesh.region("a"), "orders.created", &["b"])
    })
    .await;
    let client_a = mesh.region("a").client();
    let ids = publish(&client_a, 0, 3_000, "orders.created", async {}).await;
    let took = wait_until("3,000 events in b", Duration::from_secs(60), || async {
        read_topic(&client_b, "orders").await.len() >= ids.len()
    })
    .await;
    eprintln!("over a 80-100 ms round trip, b held all {} events {took:?} after the last was acknowledged", ids.len());
    check_copy("b", &read_topic(&client_b, "orders").await, &ids);
}
