//! The same region code over the in-memory transport: a partition leader cut off from its
//! peers cannot acknowledge anything, the majority elects a new leader and goes on, and after
//! the link heals every replica holds the same log.

use std::time::Duration;

use ferry_net::{MemNetwork, MemTransport};
use ferry_proto::wire::{ClientRequest, ClientResponse, ErrorCode};
use ferry_proto::{Event, EventBatch, Limits, NodeId, Subject, TopicConfig};
use ferry_region::{Node, NodeConfig, PeerConfig, RaftTuning, TlsPaths};
use openraft::async_runtime::WatchReceiver;
use tokio::time::Instant;

async fn start_region(net: &MemNetwork, dir: &std::path::Path) -> Vec<Node<MemTransport>> {
    let peers: Vec<PeerConfig> = (1..=3)
        .map(|id| PeerConfig {
            id,
            addr: format!("127.0.0.1:{}", 7000 + id).parse().unwrap(),
        })
        .collect();
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        let config = NodeConfig {
            id,
            region: "local".into(),
            mesh: Default::default(),
            faults: Default::default(),
            data_dir: dir.join(format!("node-{id}")),
            peers: peers.clone(),
            addr: None,
            seeds: Vec::new(),
            join_timeout_ms: 60_000,
            max_moves_per_node: 2,
            load_sample_ms: 10_000,
            balance_load_spread_percent: 25,
            leader_rebalance_after_ms: 10_000,
            // Not read: the in-memory transport needs no certificates.
            tls: TlsPaths {
                ca: "unused".into(),
                cert: "unused".into(),
                key: "unused".into(),
            },
            limits: Limits::default(),
            raft: RaftTuning::default(),
            cache_bytes: 8 << 20,
            stream_index_cache_bytes: 8 << 20,
            stream_index_upload_bytes: 16 << 20,
            wal_segment_bytes: 1 << 20,
            max_client_connections: 10,
            retention_interval_ms: 1_000,
            group_session_timeout_ms: 3_000,
            producer_expiry_ms: 86_400_000,
            http: None,
            tier: None,
        };
        let node = Node::start(config, net.transport(id)).await.unwrap();
        net.register(id, node.peer_handler());
        nodes.push(node);
    }
    nodes
}

fn batch(producer: u64, first_seq: u64, ids: &[&str]) -> EventBatch {
    let events: Vec<Event> = ids
        .iter()
        .map(|id| {
            Event::new(
                *id,
                "/t",
                "t",
                Subject::new("a.b").unwrap(),
                id.as_bytes().to_vec(),
            )
        })
        .collect();
    EventBatch::new(&events, Some(producer), first_seq, &Limits::default()).unwrap()
}

async fn leader_of(
    nodes: &[Node<MemTransport>],
    except: Option<NodeId>,
    deadline: Instant,
) -> NodeId {
    loop {
        for node in nodes {
            if Some(node.id()) == except {
                continue;
            }
            let Some(g) = node.partition("t", 0) else {
                continue;
            };
            let metrics = g.raft().metrics().borrow_watched().clone();
            if metrics.current_leader == Some(node.id()) {
                return node.id();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no leader for t/0 among the connected nodes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn publish(partition_batch: EventBatch) -> ClientRequest {
    ClientRequest::Publish {
        topic: "t".into(),
        partition: 0,
        batch: partition_batch,
    }
}

fn stored_ids(node: &Node<MemTransport>) -> Vec<(u64, String)> {
    let view = node.partition("t", 0).unwrap().view;
    let mut out = Vec::new();
    for b in view.read_local(0, usize::MAX).unwrap() {
        out.extend(b.decode().unwrap().into_iter().map(|(o, e)| (o, e.id)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_acknowledges_nothing_and_the_majority_goes_on() {
    ferry_tests::init_logging();
    let dir = tempfile::tempdir().unwrap();
    let net = MemNetwork::new();
    let nodes = start_region(&net, dir.path()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match nodes[0]
            .handle_request(ClientRequest::CreateTopic(TopicConfig::new("t", 1)), false)
            .await
        {
            ClientResponse::Ok => break,
            other => assert!(Instant::now() < deadline, "create failed: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let old = leader_of(&nodes, None, Instant::now() + Duration::from_secs(30)).await;
    let old_node = &nodes[(old - 1) as usize];
    let answer = old_node
        .handle_request(publish(batch(1, 0, &["a", "b"])), false)
        .await;
    assert!(
        matches!(
            answer,
            ClientResponse::Published {
                base_offset: 0,
                count: 2,
                ..
            }
        ),
        "{answer:?}"
    );

    // Cut the leader off. A write it accepts now cannot reach a majority: it must not be
    // acknowledged (the request fails or times out, never Published).
    net.isolate(old);
    let stranded = tokio::time::timeout(
        Duration::from_secs(3),
        old_node.handle_request(publish(batch(1, 2, &["stranded"])), false),
    )
    .await;
    assert!(
        !matches!(stranded, Ok(ClientResponse::Published { .. })),
        "an isolated leader acknowledged a write: {stranded:?}"
    );

    // The majority elects a new leader and accepts writes.
    let new = leader_of(&nodes, Some(old), Instant::now() + Duration::from_secs(30)).await;
    assert_ne!(new, old);
    let new_node = &nodes[(new - 1) as usize];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match new_node
            .handle_request(publish(batch(2, 0, &["c"])), false)
            .await
        {
            ClientResponse::Published {
                base_offset: 2,
                count: 1,
                ..
            } => break,
            ClientResponse::Error(e)
                if e.code == ErrorCode::NotLeader || e.code == ErrorCode::Unavailable =>
            {
                assert!(
                    Instant::now() < deadline,
                    "the new leader never accepted: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("unexpected answer from the new leader: {other:?}"),
        }
    }

    // Heal: the old leader steps down, drops its stranded entry and catches up.
    net.heal_all();
    let expected = vec![
        (0, "a".to_string()),
        (1, "b".to_string()),
        (2, "c".to_string()),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs: Vec<_> = nodes.iter().map(stored_ids).collect();
        if logs.iter().all(|l| *l == expected) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replicas disagree after healing: {logs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for node in &nodes {
        node.shutdown().await;
    }
}
