//! A region grows and shrinks online: nodes join by a seed, replicas move with openraft
//! membership changes (the new replica catches up from a streamed snapshot), a node drains
//! and leaves, and nothing acknowledged is lost on the way.

use std::time::Duration;

use ferry_client::{Client, ClientOptions, ProducerOptions, StartFrom};
use ferry_proto::wire::NodeInfo;
use ferry_proto::{Event, NodeId, Subject, TopicConfig};
use ferry_region::RaftTuning;
use ferry_tests::{identity, wait_until, TestRegion};
use tokio::time::Instant;

async fn publish(client: &Client, topic: &str, from: u64, count: u64) {
    let producer = client
        .producer(topic, ProducerOptions::default())
        .await
        .unwrap();
    let subject = Subject::new("orders.placed").unwrap();
    for i in from..from + count {
        let mut e = Event::new(
            format!("e{i}"),
            "/t",
            "t",
            subject.clone(),
            format!("order {i}").into_bytes(),
        );
        e.key = Some(format!("k{}", i % 7).into_bytes().into());
        producer.publish(e).await.unwrap();
    }
}

/// Every event id in `topic`, read from the replicas of node `id` alone (a subscription is
/// served from the local replica).
async fn ids_on(
    region: &TestRegion,
    id: NodeId,
    topic: &str,
    partition: u32,
    count: u64,
) -> Vec<String> {
    let addr = region.configs[region_index(region, id)]
        .listen_addr()
        .unwrap();
    let mut options =
        ClientOptions::new(vec![addr], identity(&region.certs(), "client-test-client"));
    options.request_timeout = Duration::from_secs(5);
    let client = Client::new(options).unwrap();
    let mut sub = client
        .subscribe(topic, partition, StartFrom::Earliest)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..count {
        let (_, event) = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .expect("the replica serves every event in time")
            .unwrap();
        ids.push(event.id.to_string());
    }
    ids
}

fn region_index(region: &TestRegion, id: NodeId) -> usize {
    (id - region.first_id) as usize
}

/// Waits until `done` holds for the region's node list.
async fn wait_nodes(
    client: &Client,
    what: &str,
    done: impl Fn(&[NodeInfo]) -> bool,
) -> Vec<NodeInfo> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(nodes) = client.list_nodes().await {
            if done(&nodes) {
                return nodes;
            }
            assert!(Instant::now() < deadline, "{what}: nodes are {nodes:?}");
        }
        assert!(Instant::now() < deadline, "{what}: no node list");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until no move of `topic` is under way and every partition's replicas satisfy
/// `placed(partition, replicas)` (a move just recorded may not have reached the node that
/// answers: name the placement it leads to).
async fn wait_placed(client: &Client, topic: &str, placed: impl Fn(u32, &[NodeId]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(d) = client.describe_topic(topic).await {
            if d.moves.is_empty()
                && d.partitions
                    .iter()
                    .all(|p| placed(p.partition, &p.replicas) && p.leader.is_some())
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{topic} not placed in time: {:?} moves {:?}",
                d.partitions
                    .iter()
                    .map(|p| (&p.replicas, p.leader))
                    .collect::<Vec<_>>(),
                d.moves
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Three nodes whose logs are purged early (a new replica can only catch up from a
/// snapshot) and a topic of two partitions in two groups holding 300 events.
async fn region_with_topic(name: &str) -> (TestRegion, Client) {
    let region = TestRegion::start_with(3, |config| {
        config.raft = RaftTuning {
            snapshot_after_entries: 50,
            keep_after_snapshot: 10,
            snapshot_chunk_bytes: 4096,
            ..RaftTuning::default()
        };
    })
    .await;
    let mut topic = TopicConfig::new(name, 2);
    topic.groups = 2;
    let client = region.create_topic(topic).await;
    publish(&client, name, 0, 300).await;
    (region, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_replicas_move_and_a_drained_node_leaves_with_nothing_lost() {
    let (mut region, client) = region_with_topic("orders").await;

    // Node 4 joins by a seed: a learner of the metadata group (three voters stay).
    region.join(4).await.expect("node 4 joins");
    let nodes = wait_nodes(&client, "node 4 listed", |n| n.iter().any(|n| n.id == 4)).await;
    assert_eq!(nodes.iter().filter(|n| n.voter).count(), 3, "{nodes:?}");
    // The nodes there before ask node 4 whether it is up, as they ask each other: one never
    // heard from would be counted down, its groups woken and never handed leadership.
    for id in [1, 2, 3] {
        let node = region.node(id).expect("running").node().clone();
        wait_until(
            &format!("node {id} hearing node 4 answer"),
            Duration::from_secs(30),
            || {
                let node = node.clone();
                async move { node.peer_up_for(4).is_some() }
            },
        )
        .await;
    }

    // Bad input changes nothing.
    let placed = |d: &ferry_proto::wire::TopicDescription| {
        d.partitions
            .iter()
            .map(|p| p.replicas.clone())
            .collect::<Vec<_>>()
    };
    let before = (
        placed(&client.describe_topic("orders").await.unwrap()),
        client.list_nodes().await.unwrap(),
    );
    let err = client
        .move_replica("orders", 0, 4, 1)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("node 4 holds no replica"), "{err}");
    let err = client
        .move_replica("orders", 0, 1, 9)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("node 9 is not a member"), "{err}");
    let err = client.remove_node(1, false).await.unwrap_err().to_string();
    assert!(err.contains("drain it first"), "{err}");
    let err = client
        .move_replica("orders", 0, 1, 2)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("node 2 already holds a replica"), "{err}");
    let err = client.drain_node(9, false).await.unwrap_err().to_string();
    assert!(err.contains("node 9 is not a member"), "{err}");
    let after = (
        placed(&client.describe_topic("orders").await.unwrap()),
        client.list_nodes().await.unwrap(),
    );
    assert_eq!(before, after, "refused requests changed the region");

    // A topic of one replica moves too: the new replica votes before the old one leaves.
    let mut solo = TopicConfig::new("solo", 1);
    solo.replication = 1;
    region.create_topic(solo).await;
    publish(&client, "solo", 0, 50).await;
    let from = client.describe_topic("solo").await.unwrap().partitions[0].replicas[0];
    client.move_replica("solo", 0, from, 4).await.unwrap();
    wait_placed(&client, "solo", |_, r| r == [4]).await;
    assert_eq!(ids_on(&region, 4, "solo", 0, 50).await.len(), 50);
    publish(&client, "solo", 50, 10).await;

    // Partition 0's replica moves from node 1 to node 4 while events keep coming.
    client.move_replica("orders", 0, 1, 4).await.unwrap();
    publish(&client, "orders", 300, 100).await;
    wait_placed(&client, "orders", |p, r| {
        r.len() == 3 && (p != 0 || (r.contains(&4) && !r.contains(&1)))
    })
    .await;
    let d = client.describe_topic("orders").await.unwrap();
    assert!(d.partitions[0].replicas.contains(&4) && !d.partitions[0].replicas.contains(&1));
    let high = d.partitions[0].high_watermark;
    // Node 4 holds every event of partition 0; node 1 deleted its copy.
    let on_4 = ids_on(&region, 4, "orders", 0, high).await;
    let on_2 = ids_on(&region, 2, "orders", 0, high).await;
    assert_eq!(on_4, on_2);
    let gone = region.configs[0]
        .data_dir
        .join("partitions")
        .join("orders@0");
    let deadline = Instant::now() + Duration::from_secs(20);
    while gone.exists() {
        assert!(Instant::now() < deadline, "node 1 kept {}", gone.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A client that knows only node 1, which holds no replica of partition 0 now, still
    // commits, reads a group's cursor and fetches there: node 1 sends them on (to the
    // preferred leader, and from there to the leader if that is another node).
    let only_1 = {
        let addr = region.configs[0].listen_addr().unwrap();
        let mut options =
            ClientOptions::new(vec![addr], identity(&region.certs(), "client-test-client"));
        options.request_timeout = Duration::from_secs(5);
        Client::new(options).unwrap()
    };
    only_1.commit("g", "orders", 0, 7).await.unwrap();
    assert_eq!(only_1.committed("g", "orders", 0).await.unwrap(), Some(7));
    let fetch = ferry_proto::wire::ClientRequest::Fetch {
        topic: "orders".into(),
        partition: 0,
        offset: 0,
        max_bytes: 1 << 20,
    };
    match only_1.request(&fetch).await.unwrap() {
        ferry_proto::wire::ClientResponse::Batches {
            batches,
            high_watermark,
        } => assert!(!batches.is_empty() && high_watermark > 0),
        other => panic!("fetch through node 1: {other:?}"),
    }

    // And back to node 1, which deleted its copy: it starts empty and catches up again.
    client.move_replica("orders", 0, 4, 1).await.unwrap();
    wait_placed(&client, "orders", |p, r| {
        r.len() == 3 && (p != 0 || (r.contains(&1) && !r.contains(&4)))
    })
    .await;
    let d = client.describe_topic("orders").await.unwrap();
    assert!(
        d.partitions[0].replicas.contains(&1),
        "{:?}",
        d.partitions[0]
    );
    let high = d.partitions[0].high_watermark;
    assert_eq!(
        ids_on(&region, 1, "orders", 0, high).await,
        ids_on(&region, 2, "orders", 0, high).await
    );

    // Node 5 joins: five voters.
    region.join(5).await.expect("node 5 joins");
    wait_nodes(&client, "five voters", |n| {
        n.len() == 5 && n.iter().all(|n| n.voter)
    })
    .await;

    // A rebalance spreads the seven replicas (six of orders, one of solo) over five nodes,
    // and the preferred leaders (first replicas) follow.
    let plan = client.rebalance(true).await.unwrap();
    assert!(plan.iter().any(|c| c.from.is_some()), "{plan:?}");
    let nodes = client.list_nodes().await.unwrap();
    assert!(
        nodes.iter().all(|n| n.moving_in == 0),
        "a dry run moved: {nodes:?}"
    );
    client.rebalance(false).await.unwrap();
    publish(&client, "orders", 400, 50).await;
    // (Before it, nodes 4 and 5 held nothing: each node holds one or two afterwards.)
    let balanced = wait_nodes(&client, "balanced", |n| {
        n.iter()
            .all(|n| (1..=2).contains(&n.replicas) && n.moving_in == 0 && n.moving_out == 0)
    })
    .await;
    assert_eq!(balanced.len(), 5, "{balanced:?}");
    wait_placed(&client, "orders", |_, r| r.len() == 3).await;

    // Node 2 drains: its replicas move off, then it leaves the region.
    client.drain_node(2, false).await.unwrap();
    publish(&client, "orders", 450, 50).await;
    wait_placed(&client, "orders", |_, r| r.len() == 3 && !r.contains(&2)).await;
    wait_placed(&client, "solo", |_, r| r.len() == 1 && !r.contains(&2)).await;
    client.remove_node(2, false).await.unwrap();
    // Four nodes left: three of them vote.
    wait_nodes(&client, "node 2 gone, three voters", |n| {
        !n.iter().any(|n| n.id == 2) && n.iter().filter(|n| n.voter).count() == 3
    })
    .await;
    region.stop(2).await;

    // Every acknowledged event is there, once, on every replica.
    let d = client.describe_topic("orders").await.unwrap();
    let total: u64 = d.partitions.iter().map(|p| p.high_watermark).sum();
    assert_eq!(total, 500, "{:?}", d.partitions);
    for p in &d.partitions {
        let mut seen = None;
        for r in &p.replicas {
            let ids = ids_on(&region, *r, "orders", p.partition, p.high_watermark).await;
            let mut unique = ids.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), ids.len(), "duplicates on node {r}");
            if let Some(seen) = &seen {
                assert_eq!(seen, &ids, "replicas of partition {} differ", p.partition);
            }
            seen = Some(ids);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_replaced_by_a_new_one_at_its_address_with_nothing_lost() {
    let (mut region, _) = region_with_topic("ledger").await;

    // Node 3's disk dies: the process goes, and so does its data folder.
    let dead_addr = region.configs[2].listen_addr().unwrap();
    region.kill(3).await;
    std::fs::remove_dir_all(&region.configs[2].data_dir).unwrap();
    let client = Client::new({
        let mut o = ClientOptions::new(
            region.live_addrs(),
            identity(&region.certs(), "client-test-client"),
        );
        o.request_timeout = Duration::from_secs(5);
        o
    })
    .unwrap();
    publish(&client, "ledger", 300, 100).await;

    // A new node cannot take the dead one's address while the region counts it a member.
    let err = region.join_at(4, dead_addr).await.unwrap_err().to_string();
    assert!(err.contains("remove node 3 first"), "{err}");
    client.remove_node(3, true).await.unwrap();
    // Nor may an empty node take node 3's id while the placement still counts node 3.
    let err = region
        .join_at(3, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("a new node needs an id of its own"), "{err}");
    region
        .join_at(4, dead_addr)
        .await
        .expect("node 4 joins at node 3's address");

    publish(&client, "ledger", 400, 100).await;
    wait_placed(&client, "ledger", |_, r| r.len() == 3 && !r.contains(&3)).await;
    let nodes = wait_nodes(&client, "three voters", |n| {
        n.len() == 3 && n.iter().all(|n| n.voter)
    })
    .await;
    assert_eq!(
        nodes.iter().map(|n| n.id).collect::<Vec<_>>(),
        vec![1, 2, 4]
    );
    let d = client.describe_topic("ledger").await.unwrap();
    assert_eq!(
        d.partitions.iter().map(|p| p.high_watermark).sum::<u64>(),
        500
    );
    for p in &d.partitions {
        let on_1 = ids_on(&region, 1, "ledger", p.partition, p.high_watermark).await;
        let on_4 = ids_on(&region, 4, "ledger", p.partition, p.high_watermark).await;
        assert_eq!(on_1, on_4, "partition {}", p.partition);
    }
}

/// A rebalance spreads measured load, not only counts: a region even by count whose two
/// busy partitions share a preferred leader gets a plan that gives them different ones. The
/// rates come from every node's meter, gathered by the metadata leader over the peer
/// transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_spreads_the_leadership_of_busy_partitions() {
    let region = TestRegion::start(3).await;
    // A group per partition, so a partition's group is numbered like it.
    let mut topic = TopicConfig::new("busy", 6);
    topic.groups = 6;
    let client = region.create_topic(topic).await;
    let described = client.describe_topic("busy").await.unwrap();
    let preferred = |p: &ferry_proto::wire::PartitionInfo| p.replicas[0];
    // Two partitions with the same preferred leader (six over three nodes: there are).
    let (hot, also_hot) = described
        .partitions
        .iter()
        .flat_map(|a| described.partitions.iter().map(move |b| (a, b)))
        .find(|(a, b)| a.partition < b.partition && preferred(a) == preferred(b))
        .map(|(a, b)| (a.partition, b.partition))
        .expect("two partitions share a preferred leader");
    assert!(
        client.rebalance(true).await.unwrap().is_empty(),
        "balanced by count from the start"
    );

    // Keys routed to those two partitions only.
    let keys: Vec<String> = [hot, also_hot]
        .iter()
        .map(|p| {
            (0..)
                .map(|i| format!("key{i}"))
                .find(|k| described.layout.partition_for_key(k.as_bytes(), 6) == *p)
                .unwrap()
        })
        .collect();
    let producer = client
        .producer("busy", ProducerOptions::default())
        .await
        .unwrap();
    let subject = Subject::new("orders.placed").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0u64;
    let plan = loop {
        for _ in 0..100 {
            let mut e = Event::new(format!("e{i}"), "/t", "t", subject.clone(), vec![b'x'; 64]);
            e.key = Some(keys[(i % 2) as usize].clone().into_bytes().into());
            producer.publish(e).await.unwrap();
            i += 1;
        }
        let plan = client.rebalance(true).await.unwrap();
        if !plan.is_empty() {
            break plan;
        }
        assert!(
            Instant::now() < deadline,
            "no plan after {i} events to partitions {hot} and {also_hot}"
        );
    };
    // Leadership changes only (counts are even), and afterwards the two busy partitions
    // prefer different nodes.
    let mut after: Vec<NodeId> = described.partitions.iter().map(preferred).collect();
    for change in &plan {
        assert_eq!(change.from, None, "a replica move in {plan:?}");
        after[change.group as usize] = change.to;
    }
    assert_ne!(
        after[hot as usize], after[also_hot as usize],
        "the busy partitions {hot} and {also_hot} still share a preferred leader after {plan:?}"
    );
}
