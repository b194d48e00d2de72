//! A region grown, split and shrunk under a running workload, judged by `ferry check`: three
//! nodes serve two keyed producers and a consumer group while nodes 4 and 5 join, a
//! rebalance spreads the replicas, the topic grows from 4 to 8 partitions (a second group
//! joins then, with the parents' and the children's backlogs before it), the leader of
//! partition 0 is killed (and comes back), and node 1 drains and leaves. The history of
//! every publish, delivery, split and final read then passes the checker: nothing
//! acknowledged is lost, nothing is stored twice, and each key's events keep their order
//! across the split in the logs and in both groups' deliveries.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_check::{Func, History, Observed, Op, OpType, Options, Verdict};
use ferry_client::{Client, ConsumerOptions, GroupConsumer, ProducerOptions};
use ferry_proto::wire::NodeInfo;
use ferry_proto::{Event, Subject, TopicConfig};
use ferry_tests::TestRegion;
use tokio::time::Instant;

const TOPIC: &str = "orders";
const REGION: &str = "r";
/// Keys per producer.
const KEYS: u64 = 8;
/// Most events per producer, however long the run.
const MOST_EVENTS: u64 = 30_000;

/// The history as it is recorded, with times from one start.
#[derive(Clone)]
struct Recorder {
    start: Instant,
    ops: Arc<Mutex<Vec<Op>>>,
}

impl Recorder {
    fn record(&self, mut op: Op) {
        op.time_ms = self.start.elapsed().as_millis() as u64;
        if op.region.is_empty() {
            op.region = REGION.into();
        }
        if op.topic.is_empty() {
            op.topic = TOPIC.into();
        }
        self.ops.lock().unwrap().push(op);
    }

    /// Prints a step of the run with its time, for reading a failure against the deliveries.
    fn step(&self, what: &str) {
        println!("{} ms: {what}", self.start.elapsed().as_millis());
    }

    /// The time of `group`'s last delivery, in ms from the start.
    fn last_delivery(&self, group: &str) -> Option<u64> {
        let ops = self.ops.lock().unwrap();
        ops.iter()
            .rev()
            .find(|o| o.f == Some(Func::Deliver) && o.group.as_deref() == Some(group))
            .map(|o| o.time_ms)
    }

    fn history(&self) -> History {
        let ops = self.ops.lock().unwrap().clone();
        let lines = (1..=ops.len()).collect();
        History { ops, lines }
    }
}

/// Publishes keyed events (`p<process>-<n>`, key `p<process>k<n mod KEYS>`) through one
/// pipelined producer until `stop`, recording each invoke and its outcome.
async fn produce(client: Client, process: u64, history: Recorder, stop: Arc<AtomicBool>) {
    let producer = client
        .producer(TOPIC, ProducerOptions::default())
        .await
        .unwrap();
    let (acks_tx, mut acks_rx) = tokio::sync::mpsc::unbounded_channel();
    let outcomes = tokio::spawn({
        let history = history.clone();
        async move {
            while let Some((id, ack)) = acks_rx.recv().await {
                let ack: ferry_client::AckFuture = ack;
                let op = match ack.await {
                    Ok(a) => Op {
                        op_type: Some(OpType::Ok),
                        partition: Some(a.partition),
                        offset: a.offset,
                        ..Op::default()
                    },
                    Err(_) => Op {
                        op_type: Some(OpType::Info),
                        ..Op::default()
                    },
                };
                history.record(Op {
                    process,
                    f: Some(Func::Publish),
                    id: Some(id),
                    ..op
                });
            }
        }
    });
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) && n < MOST_EVENTS {
        for _ in 0..10 {
            let id = format!("p{process}-{n}");
            let key = format!("p{process}k{}", n % KEYS);
            history.record(Op {
                op_type: Some(OpType::Invoke),
                process,
                f: Some(Func::Publish),
                id: Some(id.clone()),
                key: Some(key.clone()),
                ..Op::default()
            });
            let mut event = Event::new(
                id.clone(),
                "/workload",
                "t",
                Subject::new("orders.placed").unwrap(),
                n.to_string().into_bytes(),
            );
            event.key = Some(key.into_bytes().into());
            let ack = producer.send(event).await.unwrap();
            acks_tx.send((id, ack)).unwrap();
            n += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(acks_tx);
    outcomes.await.unwrap();
}

/// The only member of `group`, as `process`, that records every delivery and commits what
/// it handled every 100 ms (a commit per event would make the group as slow as a Raft write
/// per event).
async fn consume(client: Client, history: Recorder, group: &'static str, process: u64) {
    let mut member = GroupConsumer::join(
        client,
        group,
        TOPIC,
        "m",
        ConsumerOptions {
            heartbeat: Duration::from_millis(500),
            ..ConsumerOptions::default()
        },
    )
    .await
    .unwrap();
    let mut handled: std::collections::BTreeMap<u32, u64> = Default::default();
    let mut commit = tokio::time::interval(Duration::from_millis(100));
    // After a slow round of commits (a leader change), the next is 100 ms later, not at once:
    // with missed ticks fired in a burst, every other turn of the loop would commit again
    // and deliveries would starve.
    commit.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // Cancel-safe: a delivery taken is returned at once.
            d = member.next() => {
                history.record(Op {
                    op_type: Some(OpType::Ok),
                    process,
                    f: Some(Func::Deliver),
                    group: Some(group.into()),
                    partition: Some(d.partition),
                    events: vec![Observed {
                        offset: d.offset,
                        id: d.event.id.to_string(),
                    }],
                    ..Op::default()
                });
                let next = handled.entry(d.partition).or_default();
                *next = (*next).max(d.offset + 1);
            }
            _ = commit.tick() => {
                let began = Instant::now();
                let mut failed = Vec::new();
                for (partition, next) in &handled {
                    // A failed commit (a leader change) only means redeliveries, which the
                    // checker allows.
                    if let Err(e) = member.commit(*partition, *next).await {
                        failed.push(format!("{partition}: {e}"));
                    }
                }
                if began.elapsed() > Duration::from_secs(1) {
                    println!("{group}: commits took {:?}; failed {failed:?}", began.elapsed());
                }
            }
        }
    }
}

async fn wait_for<F, Fut>(what: &str, within: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn nodes(client: &Client) -> Vec<NodeInfo> {
    client.list_nodes().await.unwrap_or_default()
}

/// Waits until the topic has no move under way and every partition has a leader and three
/// replicas, none on `not_on`.
async fn settled(client: &Client, not_on: Option<u64>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let d = client.describe_topic(TOPIC).await;
        let settled = d.as_ref().is_ok_and(|d| {
            d.moves.is_empty()
                && d.partitions.iter().all(|p| {
                    p.leader.is_some()
                        && p.replicas.len() == 3
                        && not_on.is_none_or(|n| !p.replicas.contains(&n))
                })
        });
        if settled {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the topic did not settle within 120 s: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_region_grown_split_and_shrunk_under_load_passes_the_checker() {
    ferry_tests::init_logging();
    let mut region = TestRegion::start(3).await;
    let client = region.create_topic(TopicConfig::new(TOPIC, 4)).await;
    let history = Recorder {
        start: Instant::now(),
        ops: Arc::default(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (1..=2)
        .map(|process| {
            tokio::spawn(produce(
                region.client(),
                process,
                history.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let live = tokio::spawn(consume(region.client(), history.clone(), "live", 7));
    let published = || {
        history
            .ops
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.op_type == Some(OpType::Ok) && o.f == Some(Func::Publish))
            .count()
    };
    wait_for("publishes flow", Duration::from_secs(30), || async {
        published() > 500
    })
    .await;

    // Nodes 4 and 5 join; a rebalance spreads the replicas over all five.
    history.step("publishes flow");
    region.join(4).await.expect("node 4 joins");
    region.join(5).await.expect("node 5 joins");
    wait_for("five voters", Duration::from_secs(60), || async {
        let n = nodes(&client).await;
        n.len() == 5 && n.iter().all(|n| n.voter)
    })
    .await;
    history.step("five voters");
    client.rebalance(false).await.unwrap();
    wait_for(
        "replicas on every node",
        Duration::from_secs(120),
        || async {
            let n = nodes(&client).await;
            n.len() == 5
                && n.iter()
                    .all(|n| n.replicas > 0 && n.moving_in == 0 && n.moving_out == 0)
        },
    )
    .await;
    settled(&client, None).await;

    // The topic grows from 4 to 8 partitions.
    history.step("rebalanced");
    let layout = ferry_tests::grow_topic(&client, TOPIC, 8).await;
    history.step("grown to 8 partitions");
    assert_eq!(layout.splits.len(), 4, "{layout:?}");
    // A second group joins now, with every partition's backlog before it: its readers of the
    // children must wait for its commits of the parents up to the seals.
    let late = tokio::spawn(consume(region.client(), history.clone(), "late", 8));
    for split in layout.splits {
        history.record(Op {
            op_type: Some(OpType::Ok),
            f: Some(Func::Split),
            partition: Some(split.child),
            parent: Some(split.parent),
            offset: split.seal,
            ..Op::default()
        });
    }

    // Partition 0's leader is killed in the middle of it all, and comes back.
    let at = published();
    wait_for(
        "publishes after the split",
        Duration::from_secs(30),
        || async { published() > at + 500 },
    )
    .await;
    let leader = region.leader_of(TOPIC, 0).await.expect("a leader");
    region.kill(leader).await;
    history.step(&format!("node {leader} killed"));
    let at = published();
    wait_for("publishes without it", Duration::from_secs(60), || async {
        published() > at + 300
    })
    .await;
    region.restart(leader).await;
    history.step(&format!("node {leader} restarted"));
    settled(&client, None).await;
    history.step("settled");

    // Node 1 drains and leaves.
    client.drain_node(1, false).await.unwrap();
    settled(&client, Some(1)).await;
    history.step("node 1 drained");
    client.remove_node(1, false).await.unwrap();
    wait_for("node 1 gone", Duration::from_secs(60), || async {
        let n = nodes(&client).await;
        n.len() == 4 && !n.iter().any(|n| n.id == 1)
    })
    .await;
    history.step("node 1 removed");
    region.stop(1).await;
    history.step("node 1 stopped");
    let at = published();
    wait_for(
        "publishes after the drain",
        Duration::from_secs(30),
        || async { published() > at + 300 },
    )
    .await;

    stop.store(true, Ordering::Release);
    for p in producers {
        p.await.unwrap();
    }
    // Final reads of every partition, each up to the high watermark its fetches answer (the
    // partition leader's, not a description's that may come from a follower behind).
    let client = region.client();
    let d = client.describe_topic(TOPIC).await.unwrap();
    let mut highs = std::collections::BTreeMap::new();
    for p in &d.partitions {
        let mut events = Vec::new();
        let mut offset = p.low_watermark;
        let mut high = p.low_watermark;
        loop {
            let (batch, answered_high) = client
                .fetch(TOPIC, p.partition, offset, 1 << 20)
                .await
                .unwrap();
            high = high.max(answered_high);
            match batch.last() {
                Some((last, _)) => offset = last + 1,
                None if offset >= high => break,
                None => panic!("{TOPIC}/{}: nothing at {offset} below {high}", p.partition),
            }
            events.extend(batch.into_iter().map(|(o, e)| Observed {
                offset: o,
                id: e.id.to_string(),
            }));
            if offset >= high {
                break;
            }
        }
        highs.insert(p.partition, (p.low_watermark, high));
        history.record(Op {
            op_type: Some(OpType::Ok),
            f: Some(Func::Read),
            is_final: true,
            partition: Some(p.partition),
            partitions: Some(d.config.partitions),
            low: Some(p.low_watermark),
            high: Some(high),
            events,
            ..Op::default()
        });
    }
    // Each group reads everything published (each at least once).
    let deadline = Instant::now() + Duration::from_secs(180);
    for group in ["live", "late"] {
        loop {
            // Per partition: distinct offsets delivered.
            let mut got: std::collections::BTreeMap<u32, std::collections::BTreeSet<u64>> =
                Default::default();
            for o in history.ops.lock().unwrap().iter() {
                if o.f == Some(Func::Deliver) && o.group.as_deref() == Some(group) {
                    let offsets = got.entry(o.partition.unwrap_or(0)).or_default();
                    offsets.extend(o.events.iter().map(|e| e.offset));
                }
            }
            let behind: Vec<String> = highs
                .iter()
                .filter_map(|(partition, (low, high))| {
                    let n = got.get(partition).map_or(0, |s| s.len() as u64);
                    (n < high - low).then(|| format!("{partition}: {n} of {high}"))
                })
                .collect();
            if behind.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                let mut committed = Vec::new();
                for p in 0..d.config.partitions {
                    committed.push((p, client.committed(group, TOPIC, p).await.ok().flatten()));
                }
                panic!(
                    "group {group} did not read everything in 180 s: {behind:?}; committed {committed:?}; layout {:?}; its last delivery at {:?} ms, now {} ms",
                    d.layout,
                    history.last_delivery(group),
                    history.start.elapsed().as_millis()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    live.abort();
    late.abort();

    let report = ferry_check::check(
        &history.history(),
        &Options {
            duplicates_fail: true,
            ..Options::default()
        },
    );
    println!("{}", report.table());
    assert_eq!(report.verdict, Verdict::Pass, "{}", report.table());
    assert!(
        report.counts.final_read_events >= 2_000,
        "a run with too few events proves little: {}",
        report.table()
    );
}
