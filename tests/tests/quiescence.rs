//! Quiescence in a three-node region over real QUIC: idle partition groups fall asleep
//! (heartbeats and election timers off), reads on them neither wake them nor cause
//! elections, a write wakes them and is acknowledged; with 2,000 sleeping partitions, a node
//! killed abruptly (the metadata leader) costs no acknowledged event, every partition elects
//! a live leader and takes writes again, and a client that still lists the dead node follows
//! the new metadata leader.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ferry_client::{Client, ProducerOptions};
use ferry_net::QuicTransport;
use ferry_proto::{Event, NodeId, Subject, TopicConfig};
use ferry_region::Node;
use ferry_tests::{wait_until, TestRegion};
use futures::stream::{FuturesUnordered, StreamExt};
use openraft::async_runtime::WatchReceiver;

/// A topic with a Raft group per partition, so that these tests drive as many groups as
/// partitions (the default shares a few groups among a topic's partitions).
fn group_per_partition(name: &str, partitions: u32) -> TopicConfig {
    let mut config = TopicConfig::new(name, partitions);
    config.groups = partitions;
    config
}

/// `count` of every running node, summed.
fn over_nodes(region: &TestRegion, count: impl Fn(&Node<QuicTransport>) -> u64) -> u64 {
    region
        .live_ids()
        .iter()
        .map(|id| count(region.node(*id).expect("running").node()))
        .sum()
}

/// Partition groups asleep on every running node, in all.
fn asleep(region: &TestRegion) -> usize {
    over_nodes(region, |n| n.partitions_asleep() as u64) as usize
}

/// (leader, term) of every partition of `topic` as each running node sees it.
fn terms(
    region: &TestRegion,
    topic: &str,
    partitions: u32,
) -> BTreeMap<(NodeId, u32), (Option<NodeId>, u64)> {
    let mut out = BTreeMap::new();
    for id in region.live_ids() {
        let node = region.node(id).expect("running").node();
        for p in 0..partitions {
            let group = node.partition(topic, p).expect("hosted");
            let metrics = group.raft().metrics();
            let m = metrics.borrow_watched();
            out.insert((id, p), (m.current_leader, m.current_term));
        }
    }
    out
}

/// Publishes one keyless event per partition (keyless events go round the partitions):
/// (partition → event id).
async fn one_per_partition(
    client: &Client,
    topic: &str,
    partitions: u32,
    tag: &str,
) -> BTreeMap<u32, String> {
    let producer = client
        .producer(
            topic,
            ProducerOptions {
                max_in_flight: 512,
                // Waking all 1,000 groups of a topic at once costs this 2-core machine, in a
                // debug build, a storm of late heartbeats and elections: each partition's
                // write was refused as not led for up to ~20 s here (16,000 NotLeader answers
                // in all), and for over 90 s once in CI. The test is about surviving the kill;
                // the storm is a known limit of per-group heartbeats (see the README).
                retry_for: Duration::from_secs(180),
                ..ProducerOptions::default()
            },
        )
        .await
        .expect("producer");
    let subject = Subject::new("quiet.event").unwrap();
    let mut acks = FuturesUnordered::new();
    for i in 0..partitions {
        let id = format!("{tag}-{i}");
        let event = Event::new(
            id.clone(),
            "/test",
            "quiet",
            subject.clone(),
            vec![b'q'; 64],
        );
        let ack = producer.send(event).await.expect("queued");
        acks.push(async move { (id, ack.await) });
    }
    let mut acked = BTreeMap::new();
    while let Some((id, ack)) = acks.next().await {
        let ack = ack.unwrap_or_else(|e| panic!("{id} not acknowledged: {e}"));
        acked.insert(ack.partition, id);
    }
    assert_eq!(
        acked.len(),
        partitions as usize,
        "one event landed on each partition"
    );
    acked
}

/// Every event id held by each partition of `topic`.
async fn held(client: &Client, topic: &str, partitions: u32) -> BTreeMap<u32, BTreeSet<String>> {
    let mut reads = FuturesUnordered::new();
    let mut out = BTreeMap::new();
    for p in 0..partitions {
        reads.push(async move {
            let (events, _) = client.fetch(topic, p, 0, 1 << 20).await.expect("fetch");
            (
                p,
                events
                    .into_iter()
                    .map(|(_, e)| e.id)
                    .collect::<BTreeSet<_>>(),
            )
        });
        // Bounded concurrency.
        if reads.len() >= 64 {
            let (p, ids) = reads.next().await.expect("a read");
            out.insert(p, ids);
        }
    }
    while let Some((p, ids)) = reads.next().await {
        out.insert(p, ids);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_sleep_reads_keep_them_asleep_and_a_write_wakes_them() {
    const PARTITIONS: u32 = 4;
    // This test runs beside the 2,000-partition one on two cores: timers with room, so that a
    // starved heartbeat does not pass for the election this test proves a write never causes.
    let region = TestRegion::start_with(3, |config| {
        config.raft.heartbeat_ms = 300;
        config.raft.election_min_ms = 1_500;
        config.raft.election_max_ms = 3_000;
    })
    .await;
    let client = region
        .create_topic(group_per_partition("quiet", PARTITIONS))
        .await;
    let first = one_per_partition(&client, "quiet", PARTITIONS, "first").await;
    let all = PARTITIONS as usize * 3;
    let took = wait_until("every replica asleep", Duration::from_secs(60), || async {
        asleep(&region) == all
    })
    .await;
    println!("{all} replicas asleep {took:?} after the last write");
    let before = terms(&region, "quiet", PARTITIONS);

    // Reads confirm leadership with a round of heartbeats: they must neither wake the
    // followers (whose election timers would then fire with the leader asleep) nor elect.
    let window = Instant::now();
    // Twice the election timeout: a follower a read woke would have elected within it.
    while window.elapsed() < Duration::from_millis(6_000) {
        for (p, ids) in held(&client, "quiet", PARTITIONS).await {
            assert!(
                ids.contains(&first[&p]),
                "partition {p} holds {}",
                first[&p]
            );
        }
    }
    assert_eq!(asleep(&region), all, "reads woke a replica");
    assert_eq!(
        terms(&region, "quiet", PARTITIONS),
        before,
        "a read caused an election"
    );

    // A write wakes the group and is acknowledged; it falls asleep again, with the same
    // leaders in the same terms (the leader woke with its followers: no election).
    let second = one_per_partition(&client, "quiet", PARTITIONS, "second").await;
    for (p, ids) in held(&client, "quiet", PARTITIONS).await {
        assert!(
            ids.contains(&first[&p]) && ids.contains(&second[&p]),
            "partition {p}: {ids:?}"
        );
    }
    wait_until(
        "every replica asleep again",
        Duration::from_secs(60),
        || async { asleep(&region) == all },
    )
    .await;
    assert_eq!(
        terms(&region, "quiet", PARTITIONS),
        before,
        "waking for a write caused an election"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_sleeping_partitions_survive_a_node_kill() {
    const TOPICS: [&str; 2] = ["many-a", "many-b"];
    const PARTITIONS: u32 = 1_000;
    let mut region = TestRegion::start(3).await;
    let client = region.client();
    let mut first = BTreeMap::new();
    for topic in TOPICS {
        let started = Instant::now();
        region
            .create_topic(group_per_partition(topic, PARTITIONS))
            .await;
        println!(
            "{topic}: {PARTITIONS} partitions led after {:?}",
            started.elapsed()
        );
        first.insert(
            topic,
            one_per_partition(&client, topic, PARTITIONS, topic).await,
        );
    }
    let all = TOPICS.len() * PARTITIONS as usize * 3;
    let took = wait_until("every replica asleep", Duration::from_secs(120), || async {
        asleep(&region) == all
    })
    .await;
    println!("{all} replicas asleep after {took:?}");

    // Kill the metadata leader abruptly.
    let victim = region
        .live_ids()
        .into_iter()
        .find_map(|id| {
            let node = region.node(id)?.node();
            node.meta_raft().metrics().borrow_watched().current_leader
        })
        .expect("a metadata leader");
    let killed_at = Instant::now();
    region.kill(victim).await;

    // Every partition elects a live leader.
    for topic in TOPICS {
        region
            .wait_for_leaders(topic, Duration::from_secs(120))
            .await;
    }
    println!(
        "every partition led again {:?} after the kill",
        killed_at.elapsed()
    );
    let elections = over_nodes(&region, |n| n.quiescence_elections());
    println!("elections called for sleeping groups of the dead leader: {elections}");

    // The client made before the kill still lists the dead node: a metadata write through
    // it reaches the new metadata leader.
    ferry_tests::create_topic(
        &client,
        TopicConfig::new("after-kill", 1),
        Duration::from_secs(60),
    )
    .await;

    // Every partition takes a write again, and holds what was acknowledged before the kill.
    for topic in TOPICS {
        let second = one_per_partition(&client, topic, PARTITIONS, &format!("{topic}-again")).await;
        let held = held(&client, topic, PARTITIONS).await;
        for p in 0..PARTITIONS {
            let ids = &held[&p];
            assert!(
                ids.contains(&first[topic][&p]),
                "{topic}/{p} lost {}",
                first[topic][&p]
            );
            assert!(ids.contains(&second[&p]), "{topic}/{p} lost {}", second[&p]);
        }
    }
    println!(
        "every partition written and read back {:?} after the kill",
        killed_at.elapsed()
    );
}
