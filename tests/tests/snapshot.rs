//! A follower that missed more than the leader keeps in its log catches up by installing a
//! snapshot of the partition over QUIC, and then serves the same events as the leader.

use std::time::Duration;

use ferry_client::{Client, ClientOptions, ProducerOptions, StartFrom};
use ferry_proto::{Event, Subject, TopicConfig};
use ferry_region::RaftTuning;
use ferry_tests::{identity, TestRegion};
use openraft::async_runtime::WatchReceiver;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_follower_catches_up_from_a_snapshot() {
    let mut region = TestRegion::start_with(3, |config| {
        config.raft = RaftTuning {
            snapshot_after_entries: 20,
            keep_after_snapshot: 5,
            // Small pieces, so the snapshot travels in many messages.
            snapshot_chunk_bytes: 1024,
            ..RaftTuning::default()
        };
    })
    .await;
    region.create_topic(TopicConfig::new("ledger", 1)).await;
    let leader = region.leader_of("ledger", 0).await.unwrap();
    let lagging = (1..=3).find(|id| *id != leader).unwrap();
    region.stop(lagging).await;

    // One event per batch, so each is its own Raft entry: far more entries than the log keeps.
    let client = region.client();
    let options = ProducerOptions {
        max_batch_events: 1,
        ..ProducerOptions::default()
    };
    let producer = client.producer("ledger", options).await.unwrap();
    let subject = Subject::new("ledger.entry").unwrap();
    for i in 0..200 {
        let e = Event::new(
            format!("l{i}"),
            "/t",
            "t",
            subject.clone(),
            format!("entry {i}").into_bytes(),
        );
        let ack = producer.publish(e).await.unwrap();
        assert_eq!(ack.offset, Some(i));
    }

    // The leader has purged entries the stopped follower never received, so only a snapshot
    // can bring it up to date.
    let leader_node = region.nodes[(leader - 1) as usize]
        .as_ref()
        .unwrap()
        .node()
        .clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let purged = leader_node
            .partition("ledger", 0)
            .unwrap()
            .raft()
            .metrics()
            .borrow_watched()
            .purged;
        if purged.is_some_and(|p| p.index > 50) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leader never purged its log: {purged:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(leader_node);

    region.restart(lagging).await;
    // Read from the restarted follower alone: a subscription is served from the local
    // replica, so it shows what the follower itself holds.
    let addr = region.configs[(lagging - 1) as usize]
        .listen_addr()
        .unwrap();
    let mut options =
        ClientOptions::new(vec![addr], identity(&region.certs(), "client-test-client"));
    options.request_timeout = Duration::from_secs(5);
    let follower = Client::new(options).unwrap();
    let mut sub = follower
        .subscribe("ledger", 0, StartFrom::Earliest)
        .await
        .unwrap();
    for i in 0..200u64 {
        let (offset, event) = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .expect("the follower caught up in time")
            .unwrap();
        assert_eq!((offset, event.id.as_str()), (i, format!("l{i}").as_str()));
    }
    // What was spooled while the snapshot arrived went once it was installed.
    let incoming = region.configs[(lagging - 1) as usize]
        .data_dir
        .join("snapshots-incoming");
    let left: Vec<_> = std::fs::read_dir(&incoming)
        .expect("the node keeps a folder for incoming snapshots")
        .collect();
    assert!(left.is_empty(), "spooled snapshots left behind: {left:?}");
}
