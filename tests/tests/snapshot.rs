//! A follower that missed more than the leader keeps in its log catches up by installing a
//! snapshot of the partition over QUIC, and then serves the same events as the leader.

use std::time::Duration;

use ferry_client::{Client, ClientOptions, Producer, ProducerOptions, StartFrom};
use ferry_proto::{Event, NodeId, Subject, TopicConfig};
use ferry_region::{PartitionRaft, RaftTuning};
use ferry_tests::{identity, TestRegion};
use openraft::async_runtime::WatchReceiver;

/// Three nodes whose logs keep little (a snapshot every 20 entries, 5 entries kept behind it)
/// and whose snapshots travel in 1 KiB pieces (many messages); topic `ledger` of one
/// partition with one follower stopped; and a producer that makes each event its own Raft
/// entry. Answers the region, the Raft of the partition's leader, the stopped follower and
/// the producer.
async fn region_with_a_stopped_follower() -> (TestRegion, PartitionRaft, NodeId, Producer) {
    let mut region = TestRegion::start_with(3, |config| {
        config.raft = RaftTuning {
            snapshot_after_entries: 20,
            keep_after_snapshot: 5,
            snapshot_chunk_bytes: 1024,
            ..RaftTuning::default()
        };
    })
    .await;
    region.create_topic(TopicConfig::new("ledger", 1)).await;
    let leader = region.leader_of("ledger", 0).await.unwrap();
    let lagging = (1..=3).find(|id| *id != leader).unwrap();
    region.stop(lagging).await;
    let options = ProducerOptions {
        max_batch_events: 1,
        ..ProducerOptions::default()
    };
    let producer = region.client().producer("ledger", options).await.unwrap();
    let raft = region
        .node(leader)
        .unwrap()
        .node()
        .partition("ledger", 0)
        .unwrap()
        .raft()
        .clone();
    (region, raft, lagging, producer)
}

/// Reads `ledger` from node `id` alone (a subscription is served from the local replica, so
/// it shows what that node holds) and checks it holds events `l0` to `l{count - 1}` in order.
async fn read_all_from(region: &TestRegion, id: NodeId, count: u64) {
    let addr = region.configs[(id - 1) as usize].listen_addr().unwrap();
    let mut options =
        ClientOptions::new(vec![addr], identity(&region.certs(), "client-test-client"));
    options.request_timeout = Duration::from_secs(5);
    let reader = Client::new(options).unwrap();
    let mut sub = reader
        .subscribe("ledger", 0, StartFrom::Earliest)
        .await
        .unwrap();
    for i in 0..count {
        let (offset, event) = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .unwrap_or_else(|_| panic!("node {id} did not serve offset {i} in time"))
            .unwrap();
        assert_eq!((offset, event.id.as_str()), (i, format!("l{i}").as_str()));
    }
}

/// Publishes `event(i)` from `from` on, one Raft entry each, until `leader` has purged its
/// log past entry 50 (at most 10,000 events, 60 s). A follower stopped before keeps the
/// leader from building snapshots (and so purging) for a few seconds: it counts as live until
/// its last acknowledgement is `4 x election_max_ms` old. Answers the next number to write.
async fn write_until_purged(
    producer: &Producer,
    leader: &PartitionRaft,
    from: u64,
    event: impl Fn(u64) -> Event,
) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut i = from;
    loop {
        let ack = producer.publish(event(i)).await.unwrap();
        assert_eq!(ack.offset, Some(i));
        i += 1;
        let purged = leader.metrics().borrow_watched().purged;
        if purged.is_some_and(|p| p.index > 50) {
            return i;
        }
        assert!(
            i < from + 10_000 && tokio::time::Instant::now() < deadline,
            "the leader never purged its log ({} events): {purged:?}",
            i - from
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_follower_catches_up_from_a_snapshot() {
    let (mut region, raft, lagging, producer) = region_with_a_stopped_follower().await;
    let subject = Subject::new("ledger.entry").unwrap();
    let event = |i: u64| {
        Event::new(
            format!("l{i}"),
            "/t",
            "t",
            subject.clone(),
            format!("entry {i}").into_bytes(),
        )
    };
    // Until the leader has purged entries the stopped follower never received, so only a
    // snapshot can bring it up to date.
    let written = write_until_purged(&producer, &raft, 0, event).await;

    region.restart(lagging).await;
    read_all_from(&region, lagging, written).await;
    // What was spooled while the snapshot arrived went once it was installed.
    let incoming = region.configs[(lagging - 1) as usize]
        .data_dir
        .join("snapshots-incoming");
    let left: Vec<_> = std::fs::read_dir(&incoming)
        .expect("the node keeps a folder for incoming snapshots")
        .collect();
    assert!(left.is_empty(), "spooled snapshots left behind: {left:?}");
}

/// The sum over the live nodes of one of [`ferry_region::Node::snapshot_counts`].
fn snapshot_count(region: &TestRegion, which: usize) -> u64 {
    region
        .nodes
        .iter()
        .flatten()
        .map(|n| n.node().snapshot_counts()[which])
        .sum()
}

/// A follower back from a restart receives the group's snapshot, then needs the entries
/// after it. While writes go on, the leader keeps them (defers its own snapshots) until the
/// follower has caught up: one snapshot is enough. Without the deferral each snapshot the
/// leader builds during the transfer purges what the follower needs next, and under these
/// writes it gets snapshot after snapshot and never catches up while they last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_catching_up_under_writes_needs_one_snapshot() {
    let (mut region, raft, lagging, producer) = region_with_a_stopped_follower().await;
    let subject = Subject::new("ledger.entry").unwrap();
    let event = |i: u64, size: usize| {
        Event::new(
            format!("l{i}"),
            "/t",
            "t",
            subject.clone(),
            vec![b'x'; size],
        )
    };
    // About 1.6 MB the follower misses, so only a snapshot can bring it up to date.
    for i in 0..100 {
        producer.publish(event(i, 16 * 1024)).await.unwrap();
    }
    let mut written = write_until_purged(&producer, &raft, 100, |i| event(i, 100)).await;
    let sent_before = snapshot_count(&region, 0);
    let deferred_before = snapshot_count(&region, 2);

    // The link from the leader to the follower is slow (5 ms each way), so the snapshot, in
    // pieces of 1 KiB a few at a time, takes seconds while the writes go on.
    let shape = ferry_net::LinkShape {
        delay: Duration::from_millis(5),
        ..Default::default()
    };
    let follower_addr = region.configs[(lagging - 1) as usize]
        .listen_addr()
        .unwrap();
    let leader = region.leader_of("ledger", 0).await.unwrap();
    region
        .node(leader)
        .unwrap()
        .faults()
        .shape(follower_addr, shape);
    region.restart(lagging).await;
    let follower = region.node(lagging).unwrap().node().clone();
    // Writes go on until the follower holds all but the last few entries of the leader's log,
    // at most 10,000 of them.
    let start = written;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        producer.publish(event(written, 100)).await.unwrap();
        written += 1;
        let leader_applied = raft
            .metrics()
            .borrow_watched()
            .last_applied
            .map(|l| l.index);
        let follower_applied = follower.partition("ledger", 0).and_then(|p| {
            p.raft()
                .metrics()
                .borrow_watched()
                .last_applied
                .map(|l| l.index)
        });
        if let (Some(l), Some(f)) = (leader_applied, follower_applied) {
            if f + 5 >= l {
                break;
            }
        }
        assert!(
            written < start + 10_000 && tokio::time::Instant::now() < deadline,
            "the follower did not catch up while {} events were written \
             ({} snapshots sent to it meanwhile; applied: leader {leader_applied:?}, \
             follower {follower_applied:?})",
            written - start,
            snapshot_count(&region, 0) - sent_before
        );
    }
    let sent = snapshot_count(&region, 0) - sent_before;
    let deferred = snapshot_count(&region, 2) - deferred_before;
    assert_eq!(sent, 1, "snapshots sent while the follower caught up");
    assert!(
        deferred > 0,
        "the leader never deferred a snapshot while the follower caught up"
    );

    // It serves everything, in order.
    read_all_from(&region, lagging, written).await;
}
