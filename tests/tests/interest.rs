//! An interest holds from the moment `interest add` returns, and a partial view of a region
//! never makes its interest look smaller. Two regions of three nodes in one process over
//! real QUIC, gossiping and forwarding as in production (gossip every 200 ms).
//!
//! - 200 times: an interest in a subject of its own is added in b, and as soon as the add
//!   returns one matching event is published in a. Every one reaches b exactly once. (Before
//!   interests were vouched for with a time, a judged each event before gossip carried the new
//!   interest and skipped it.)
//! - b's interest is added while one of its nodes is down; then only that node runs, behind
//!   its metadata group. Events published in a meanwhile are held, not skipped, and reach b
//!   once b's other nodes are back.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_client::Client;
use ferry_proto::{Event, EventClass, RegionPolicy, Subject, SubjectFilter, TopicConfig};
use ferry_tests::{wait_until, TestMesh, TestRegion};
use tokio::time::Instant;

const PARTITIONS: u32 = 2;

fn topic(name: &str, subjects: &str) -> TopicConfig {
    let mut t = TopicConfig::new(name, PARTITIONS);
    t.subjects = SubjectFilter::new(subjects).expect("filter");
    t.class = EventClass::Integration;
    t.regions = RegionPolicy::ByInterest;
    t
}

/// How many times each event id is in `topic` of a region (a failed read is `None`).
async fn copies(client: &Client, topic: &str) -> Option<BTreeMap<String, usize>> {
    let mut out = BTreeMap::new();
    for partition in 0..PARTITIONS {
        let mut offset = 0;
        loop {
            let (events, high) = client.fetch(topic, partition, offset, 1 << 20).await.ok()?;
            for (o, e) in events {
                *out.entry(e.id).or_default() += 1;
                offset = o + 1;
            }
            if offset >= high {
                break;
            }
        }
    }
    Some(out)
}

fn event(id: &str, subject: &str) -> Event {
    Event::new(
        id,
        "/test",
        "payment.captured",
        Subject::new(subject).expect("subject"),
        b"paid".to_vec(),
    )
    .with_key(id.to_string())
}

/// Adds an interest through `client`, retrying while the region elects a metadata leader;
/// answers the interest version.
async fn add_interest(client: &Client, name: &str, subjects: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.add_interest(name, subjects).await {
            Ok(version) => return version,
            Err(e) => assert!(Instant::now() < deadline, "adding interest {name}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn publish(client: &Client, event: Event) {
    let producer = client
        .producer("pay", ferry_client::ProducerOptions::default())
        .await
        .expect("producer");
    let ack = producer.send(event).await.expect("queued");
    ack.await.expect("published");
}

/// Every node of `region` is running and the mesh has settled: `pay` has leaders in both.
async fn two_regions() -> TestMesh {
    let mesh = TestMesh::start(&[("a", 3), ("b", 3)]).await;
    mesh.region("a").create_topic(topic("pay", "pay.>")).await;
    mesh.region("b").create_topic(topic("pay", "pay.>")).await;
    mesh
}

fn a_sees_b_with_version(a: &TestRegion, at_least: u64) -> bool {
    a.nodes.iter().flatten().all(|n| {
        n.node()
            .mesh_nodes()
            .iter()
            .any(|r| r.region == "b" && r.interest_version >= at_least)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_published_as_soon_as_an_interest_is_added_arrives_once_200_times() {
    const ROUNDS: usize = 200;
    let mesh = two_regions().await;
    let a = mesh.region("a").client();
    let b = mesh.region("b").client();
    let producer = a
        .producer("pay", ferry_client::ProducerOptions::default())
        .await
        .expect("producer");
    let mut acks = Vec::new();
    let mut version = 0;
    for round in 0..ROUNDS {
        version = add_interest(&b, &format!("round-{round}"), &format!("pay.r{round}.>")).await;
        let id = format!("r{round}");
        let ack = producer
            .send(event(&id, &format!("pay.r{round}.captured")))
            .await
            .expect("queued");
        acks.push(ack);
    }
    for ack in acks {
        ack.await.expect("published");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let held = loop {
        let held = copies(&b, "pay").await;
        if held.as_ref().is_some_and(|c| c.len() == ROUNDS) || Instant::now() > deadline {
            break held.expect("read b");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let twice: Vec<_> = held.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "held more than once in b: {twice:?}");
    let missing: Vec<_> = (0..ROUNDS)
        .filter(|round| !held.contains_key(&format!("r{round}")))
        .collect();
    assert!(
        missing.is_empty(),
        "rounds whose event never reached b: {missing:?}"
    );
    // And b can tell that a holds its last interest.
    let reach = b
        .await_interest(version, Duration::from_secs(30))
        .await
        .expect("await interest");
    assert_eq!(reach.seen_by, vec!["a".to_string()], "{reach:?}");
    assert!(reach.waiting_for.is_empty(), "{reach:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_follower_behind_its_metadata_group_makes_nothing_skipped() {
    let mut mesh = two_regions().await;
    let a = mesh.region("a").client();
    let first_b = mesh.region("b").first_id;
    let behind = first_b + 2;
    // The interest is added while `behind` is down: it never applies it before the others go.
    mesh.region_mut("b").stop(behind).await;
    let version = add_interest(&mesh.region("b").client(), "billing", "pay.>").await;
    assert!(version > 0);
    wait_until("a learns b's interest", Duration::from_secs(30), || async {
        a_sees_b_with_version(mesh.region("a"), version)
    })
    .await;
    for id in [first_b, first_b + 1] {
        mesh.region_mut("b").stop(id).await;
    }
    mesh.region_mut("b").restart(behind).await;
    // a's nodes see only `behind` in b, advertising an older interest set.
    wait_until(
        "a sees only b's restarted follower",
        Duration::from_secs(30),
        || async {
            mesh.region("a").nodes.iter().flatten().all(|n| {
                let b_nodes: Vec<_> = n
                    .node()
                    .mesh_nodes()
                    .into_iter()
                    .filter(|r| r.region == "b")
                    .collect();
                b_nodes.len() == 1
                    && b_nodes[0].id == behind
                    && b_nodes[0].interest_version < version
            })
        },
    )
    .await;
    const EVENTS: usize = 20;
    for i in 0..EVENTS {
        publish(&a, event(&format!("e{i}"), "pay.eu.captured")).await;
    }
    // While only the follower runs, a's forwarders hold every event (nothing is judged
    // unwanted on its view): their cursors stay below a's high watermarks. Held for 3 s, 15
    // gossip rounds: a view taken as current would let them pass within a round or two.
    let held_by_a = || {
        mesh.region("a")
            .nodes
            .iter()
            .flatten()
            .flat_map(|n| n.node().forwarding())
            .filter(|f| f.topic == "pay" && f.destination == "b")
            .map(|f| f.lag_events)
            .collect::<Vec<_>>()
    };
    wait_until(
        "a's forwarders to b read the events and wait",
        Duration::from_secs(10),
        || async { held_by_a().iter().sum::<u64>() == EVENTS as u64 },
    )
    .await;
    let holding = Instant::now();
    while holding.elapsed() < Duration::from_secs(3) {
        // a still holds b's interest (the follower's older set did not replace it), so the
        // only way past these events would be judging them unwanted.
        for node in mesh.region("a").nodes.iter().flatten() {
            assert_eq!(
                node.node().regions_interested_in("pay.eu.captured"),
                vec!["b".to_string()]
            );
        }
        let lags = held_by_a();
        assert_eq!(
            lags.iter().sum::<u64>(),
            EVENTS as u64,
            "a's forwarders to b passed held events after {:?}: lag {lags:?}",
            holding.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in [first_b, first_b + 1] {
        mesh.region_mut("b").restart(id).await;
    }
    let b = mesh.region("b").client();
    wait_until(
        "every event reaches b once its metadata group is back",
        Duration::from_secs(60),
        || async { copies(&b, "pay").await.is_some_and(|c| c.len() == EVENTS) },
    )
    .await;
    let held = copies(&b, "pay").await.expect("read b");
    assert!(held.values().all(|n| *n == 1), "duplicates in b: {held:?}");
}
