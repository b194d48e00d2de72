//! Three regions of three nodes in one process over real QUIC (mTLS, one CA), gossiping and
//! forwarding. Regions b and c are interested in `orders.>`; 10,000 events published in a
//! reach b's and c's logs exactly once and in per-key order, while the a–b link is cut in
//! both directions (c relays) and the leader of a source partition is cut off from every
//! node and stopped mid-stream.
//! A topic nobody outside a is interested in never crosses, and removing b's interest stops
//! forwarding to b while c still gets everything.
//! Over a link that loses requests, loses replies and delivers requests twice (ferry-net's
//! fault injection, counted), everything still arrives exactly once in per-key order, and
//! batches resent after lost acknowledgements are deduplicated by the destination.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use ferry_client::{Client, ClientError, ProducerOptions};
use ferry_net::{InjectedFaults, LinkShape, NetError, Transport};
use ferry_proto::{Event, EventClass, RegionPolicy, Subject, SubjectFilter, TopicConfig};
use ferry_tests::{wait_until, TestMesh, TestRegion};
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

/// Every event id in a topic of a region, with where it is; the first failed fetch is the
/// answer.
async fn read_topic(client: &Client, topic: &str) -> Result<Vec<(u32, u64, String)>, ClientError> {
    let mut out = Vec::new();
    for partition in 0..PARTITIONS {
        let mut offset = 0;
        loop {
            let (events, high) = client.fetch(topic, partition, offset, 1 << 20).await?;
            for (o, e) in events {
                out.push((partition, o, e.id));
                offset = o + 1;
            }
            if offset >= high {
                break;
            }
        }
    }
    Ok(out)
}

/// A topic's events in a region, for final checks: the read must succeed.
async fn read_all(client: &Client, topic: &str) -> Vec<(u32, u64, String)> {
    match read_topic(client, topic).await {
        Ok(log) => log,
        Err(e) => panic!("reading {topic}: {e}"),
    }
}

/// Whether a topic's read succeeds with at least `n` events (a failed read is "not yet").
async fn holds_at_least(client: &Client, topic: &str, n: usize) -> bool {
    read_topic(client, topic)
        .await
        .is_ok_and(|log| log.len() >= n)
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

/// Waits until every node's gossip shows `count` live nodes.
async fn every_node_sees(mesh: &TestMesh, count: usize) {
    wait_until(
        &format!("every node sees all {count}"),
        Duration::from_secs(30),
        || async {
            mesh.regions
                .iter()
                .flat_map(|r| r.nodes.iter().flatten())
                .all(|n| n.node().mesh_nodes().len() == count)
        },
    )
    .await;
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
    every_node_sees(&mesh, 9).await;

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
            held = read_topic(client, "orders")
                .await
                .map_or(0, |log| log.len());
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
    check_copy("b", &read_all(&client_b, "orders").await, &ids);
    check_copy("c", &read_all(&client_c, "orders").await, &ids);

    // Nobody outside a wants billing: it never crossed. The topic exists in b and c (created
    // above) and reads back empty; a failed read is a failure, not "empty".
    assert_eq!(crossings(mesh.region("a"), "billing", "b"), 0);
    assert_eq!(crossings(mesh.region("a"), "billing", "c"), 0);
    for (name, client) in [("b", &client_b), ("c", &client_c)] {
        match read_topic(client, "billing").await {
            Ok(log) => assert!(log.is_empty(), "billing crossed into {name}: {log:?}"),
            Err(e) => panic!("reading billing in {name}, where the topic exists: {e}"),
        }
    }
    assert_eq!(
        read_all(&client_a, "billing").await.len(),
        500,
        "billing stayed in a"
    );
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
    wait_until("the late events in c", Duration::from_secs(60), || {
        holds_at_least(&client_c, "orders", EVENTS + 300)
    })
    .await;
    let all: Vec<String> = ids.iter().chain(&late).cloned().collect();
    check_copy("c", &read_all(&client_c, "orders").await, &all);
    assert_eq!(
        read_all(&client_b, "orders").await.len(),
        EVENTS,
        "b got nothing new"
    );
    assert_eq!(crossings(mesh.region("a"), "orders", "b"), to_b_before);
}

/// Four regions joined only by the chain a - b - c - d (links a-c, a-d and b-d cut from
/// the start): gossip summaries cross the chain, the topic created once in a is defined in
/// d through two relays, and every event published in a reaches d exactly once, relayed by
/// b and then c.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_cross_a_chain_of_two_relays() {
    let mesh = TestMesh::start(&[("a", 1), ("b", 1), ("c", 1), ("d", 1)]).await;
    for (x, y) in [("a", "c"), ("a", "d"), ("b", "d")] {
        mesh.set_link(x, y, false);
    }
    every_node_sees(&mesh, 4).await;
    eprintln!("gossip crossed the chain");
    let mut orders = topic("orders", "orders.>");
    orders.replication = 1;
    mesh.region("a").create_topic(orders).await;
    add_interest(mesh.region("d"), "orders-d", "orders.>").await;
    wait_until("a learns d's interest", Duration::from_secs(30), || async {
        sees_interest(mesh.region("a"), "orders.created", &["d"])
    })
    .await;

    let client_a = mesh.region("a").client();
    let ids = publish(&client_a, 0, 300, "orders.created", async {}).await;
    let client_d = mesh.region("d").client();
    let took = wait_until("d holds all 300", Duration::from_secs(60), || async {
        read_topic(&client_d, "orders")
            .await
            .is_ok_and(|log| log.len() >= ids.len())
    })
    .await;
    eprintln!(
        "d held all {} events {took:?} after the last was acknowledged in a",
        ids.len()
    );
    check_copy("d", &read_all(&client_d, "orders").await, &ids);
    // a's cursors move once d's acknowledgements come back through c and b.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let report = client_a.regions().await.expect("regions report");
        let to_d: Vec<_> = report
            .forwarding
            .iter()
            .filter(|f| f.topic == "orders" && f.destination == "d")
            .collect();
        if !to_d.is_empty() && to_d.iter().all(|f| f.route == "via b" && f.lag_events == 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a reaches d only through b, with nothing left to forward: {:#?}",
            report.forwarding
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    // Each dials the other with its node certificate, as its gossip does: refused at the
    // TLS handshake, because the other's certificate does not verify against its CA (the
    // dev CAs share a name, so rustls reports a bad signature rather than an unknown issuer).
    for (who, certs, to) in [
        ("x dialing a", foreign.region("x").certs(), a_addr),
        ("a dialing x", mesh.region("a").certs(), x_addr),
    ] {
        let err = dial_as_node_1(&certs, to)
            .await
            .expect_err("a node of another CA is refused");
        match &err {
            NetError::ConnectAddr { addr, reason } if *addr == to => assert!(
                reason.contains("cryptographic handshake failed")
                    && reason.contains("invalid peer certificate"),
                "{who}: refused for another reason than the certificate: {err}"
            ),
            _ => panic!("{who}: expected a refused handshake, got: {err}"),
        }
    }
    x.gossip_with(a_addr).await;
    a.gossip_with(x_addr).await;
    // Give gossip many rounds (100 ms each) to go wrong.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let (seen_by_a, seen_by_x) = (a.mesh_nodes(), x.mesh_nodes());
        assert!(
            seen_by_a.len() == 2 && seen_by_a.iter().all(|n| n.region != "x"),
            "a's view: {seen_by_a:?}"
        );
        assert!(
            seen_by_x.len() == 1 && seen_by_x.iter().all(|n| n.region == "x"),
            "x's view: {seen_by_x:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Calls `addr` as node 1 of the CA in `certs` (with that node's certificate, over the peer
/// ALPN, as a node's gossip does).
async fn dial_as_node_1(
    certs: &std::path::Path,
    addr: std::net::SocketAddr,
) -> Result<(), NetError> {
    let identity = ferry_tests::identity(certs, "node-1");
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let transport = ferry_net::QuicTransport::new(
        1,
        endpoint,
        ferry_net::tls::client_config(&identity, ferry_net::ALPN_PEER).unwrap(),
        HashMap::new(),
        ferry_net::TransportOptions::default(),
    );
    transport
        .call_addr(addr, bytes::Bytes::from_static(b"not gossip"))
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_is_retried_and_its_cause_shown_until_the_destination_accepts_it() {
    // b takes no event above 200 bytes; a's are about 300.
    let mut mesh = TestMesh::start_with(&[("a", 1), ("b", 1)], |config| {
        if config.region == "b" {
            config.limits.max_event = 200;
        }
    })
    .await;
    let mut audit = topic("audit", "audit.>");
    audit.replication = 1;
    mesh.region("a").create_topic(audit.clone()).await;
    let client_b = mesh.region("b").create_topic(audit).await;
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
        if shown.contains("refused") {
            break shown;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the refusal never showed in the report: {report:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("shown while b refuses: {shown}");
    assert!(
        shown.contains("too large") || shown.contains("200"),
        "{shown}"
    );
    // Nothing was stored in b.
    assert_eq!(read_all(&client_b, "audit").await.len(), 0);
    // b is restarted with a larger limit: the retries get through, once each.
    let b_id = mesh.region("b").first_id;
    mesh.region_mut("b").stop(b_id).await;
    mesh.region_mut("b").configs[0].limits.max_event = ferry_proto::Limits::DEFAULT_MAX_EVENT;
    mesh.region_mut("b").restart(b_id).await;
    let client_b = mesh.region("b").client();
    wait_until("the events in b", Duration::from_secs(60), || {
        holds_at_least(&client_b, "audit", ids.len())
    })
    .await;
    check_copy("b", &read_all(&client_b, "audit").await, &ids);
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

/// The single node of a region in these two-region tests.
fn only_node<'m>(mesh: &'m TestMesh, region: &str) -> &'m ferry_region::server::QuicNode {
    let region = mesh.region(region);
    region.node(region.first_id).expect("node running")
}

/// Shapes the calls of region `from`'s node to region `to`'s node (one direction).
fn shape_calls(mesh: &TestMesh, from: &str, to: &str, shape: LinkShape) {
    let to = mesh.region(to).configs[0].listen_addr().expect("addr");
    only_node(mesh, from).faults().shape(to, shape);
}

/// Two regions of one node each, `orders` (replication 1) in both, b interested.
async fn two_regions(adjust: impl Fn(&mut ferry_region::NodeConfig)) -> (TestMesh, Client, Client) {
    let mesh = TestMesh::start_with(&[("a", 1), ("b", 1)], adjust).await;
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
    (mesh, client_a, client_b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_over_a_link_that_loses_and_duplicates_calls_delivers_everything_once() {
    // Small batches, so the forwarding path makes hundreds of calls; gossip only every
    // second, so most calls on the link (and most faults counted) are forwarded batches.
    let (mesh, client_a, client_b) = two_regions(|config| {
        config.mesh.forward_batch_events = 16;
        config.mesh.gossip_interval_ms = 1_000;
        config.mesh.dead_after_ms = 20_000;
    })
    .await;
    let (a, b) = (only_node(&mesh, "a"), only_node(&mesh, "b"));
    // Both directions: 5-10 ms each way, one direction in ten pays a retransmission, and
    // per call: 15 % of requests lost, 15 % of replies lost, 25 % of requests delivered twice.
    const SEED: u64 = 17;
    eprintln!("link faults seeded with {SEED}");
    a.faults().reseed(SEED);
    b.faults().reseed(SEED + 1);
    let before = (a.faults().injected(), b.faults().injected());
    let deduplicated_before = b.node().forwarded_duplicates().total();
    mesh.shape_link(
        "a",
        "b",
        LinkShape {
            delay: Duration::from_millis(5),
            jitter: Duration::from_millis(5),
            loss: 0.1,
            drop_request: 0.15,
            drop_response: 0.15,
            duplicate: 0.25,
        },
    );
    let ids = publish(&client_a, 0, 3_000, "orders.created", async {}).await;
    let took = wait_until("3,000 events in b", Duration::from_secs(120), || {
        holds_at_least(&client_b, "orders", ids.len())
    })
    .await;
    eprintln!(
        "over a faulty link, b held all {} events {took:?} after the last was acknowledged",
        ids.len()
    );
    let since = |now: InjectedFaults, then: InjectedFaults| InjectedFaults {
        requests_dropped: now.requests_dropped - then.requests_dropped,
        responses_dropped: now.responses_dropped - then.responses_dropped,
        requests_duplicated: now.requests_duplicated - then.requests_duplicated,
    };
    // a's calls to b are forwarded batches and gossip; b's calls to a are gossip only.
    let on_a = since(a.faults().injected(), before.0);
    let on_b = since(b.faults().injected(), before.1);
    let duplicates = b.node().forwarded_duplicates();
    eprintln!(
        "injected by a: {on_a:?}; by b (gossip only): {on_b:?}; b deduplicated {duplicates:?}"
    );
    for (fault, by_a, by_b) in [
        (
            "requests dropped",
            on_a.requests_dropped,
            on_b.requests_dropped,
        ),
        (
            "responses dropped",
            on_a.responses_dropped,
            on_b.responses_dropped,
        ),
        (
            "requests duplicated",
            on_a.requests_duplicated,
            on_b.requests_duplicated,
        ),
    ] {
        // Gossip alone (b's count) cannot account for what a's calls suffered.
        assert!(
            by_a >= 10 && by_a >= by_b + 10,
            "{fault}: {by_a} on a's calls, {by_b} on gossip alone"
        );
    }
    // Lost replies and second copies made forwarded batches arrive again: b caught them.
    assert!(
        duplicates.total() - deduplicated_before >= 10,
        "b saw no forwarded batch twice: {duplicates:?}"
    );
    mesh.shape_link("a", "b", LinkShape::default());
    check_copy("b", &read_all(&client_b, "orders").await, &ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_resent_after_lost_acknowledgements_are_stored_once() {
    // Small batches, and a window wide enough for all of them, so every event is sent
    // (and stored) while no acknowledgement comes back.
    // Resends back off at most 1 s, so the catch-up after healing does not wait out the
    // default 10 s backoff of batches that failed many times.
    let (mesh, client_a, client_b) = two_regions(|config| {
        config.mesh.forward_batch_events = 16;
        config.mesh.forward_window = 64;
        config.mesh.forward_max_backoff_ms = 1_000;
    })
    .await;
    let (a, b) = (only_node(&mesh, "a"), only_node(&mesh, "b"));
    let before = b.node().forwarded_duplicates();
    // Every reply to a's calls to b is lost: b stores each batch, a never hears so and
    // resends it.
    shape_calls(
        &mesh,
        "a",
        "b",
        LinkShape {
            drop_response: 1.0,
            ..LinkShape::default()
        },
    );
    let ids = publish(&client_a, 0, 300, "orders.created", async {}).await;
    wait_until(
        "b holds every event and has turned each away once more",
        Duration::from_secs(60),
        || async {
            b.node().forwarded_duplicates().total() - before.total() >= ids.len() as u64
                && holds_at_least(&client_b, "orders", ids.len()).await
        },
    )
    .await;
    let lost_acks = a.faults().injected().responses_dropped;
    assert!(lost_acks >= 10, "only {lost_acks} replies lost");
    // Heal: the next resend's acknowledgement gets through and forwarding catches up.
    shape_calls(&mesh, "a", "b", LinkShape::default());
    wait_until(
        "a's forwarders caught up",
        Duration::from_secs(90),
        || async {
            let Ok(report) = client_a.regions().await else {
                return false;
            };
            let orders: Vec<_> = report
                .forwarding
                .iter()
                .filter(|f| f.topic == "orders")
                .collect();
            orders.len() == PARTITIONS as usize
                && orders
                    .iter()
                    .all(|f| f.lag_events == 0 && f.last_error.is_none())
        },
    )
    .await;
    let duplicates = b.node().forwarded_duplicates();
    eprintln!("{lost_acks} acknowledgements lost; b deduplicated {duplicates:?}");
    let log = read_all(&client_b, "orders").await;
    assert_eq!(log.len(), ids.len(), "b holds each event once");
    check_copy("b", &log, &ids);
}
