//! Tiered storage against a real S3-compatible server (moto's server mode, started by the
//! test; see [`S3Server`]): a topic keeping a 1 MiB hot tail takes 200 MiB while its
//! replicas' disks stay within their bound, and readers (a consumer group from offset 0, the
//! event store, a moved replica) get everything from the object store; and a store that
//! stops mid-run makes publishes fail with the retryable error at the bound, nothing lost or
//! doubled once it is back; events forwarded from another region are held back at that
//! bound too, and all land once when the store is back; objects no manifest names (left
//! over by failures) are swept, those it names kept.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_client::{
    Client, ClientError, ClientOptions, ConsumerOptions, GroupConsumer, ProducerOptions, StartFrom,
};
use ferry_proto::wire::{ErrorCode, PartitionInfo};
use ferry_proto::{
    Event, EventBatch, EventClass, Limits, NodeId, RegionPolicy, Retention, Subject, SubjectFilter,
    TopicConfig,
};
use ferry_tests::{identity, wait_until, S3Server, TestMesh, TestRegion};
use openraft::async_runtime::WatchReceiver;
use tokio::time::Instant;

const BUCKET: &str = "ferry-tiered";
const HOT: u64 = 1024 * 1024;
const PAYLOAD: usize = 32 * 1024;

fn event(i: u64) -> Event {
    event_on("history.x", i)
}

/// Event `e<i>` of `PAYLOAD` bytes on `subject`.
fn event_on(subject: &str, i: u64) -> Event {
    let mut data = vec![0u8; PAYLOAD];
    data[..8].copy_from_slice(&i.to_le_bytes());
    Event::new(
        format!("e{i}"),
        "/t",
        "t",
        Subject::new(subject).unwrap(),
        data,
    )
}

/// Runs `write` until it is not refused with `OffloadBehind` (nothing was appended), pausing
/// between tries; counts the refusals into `refusals`.
async fn accepted<T, F, Fut>(refusals: &mut u64, mut write: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        match write().await {
            Ok(done) => return done,
            Err(ClientError::Api(e)) if e.code == ErrorCode::OffloadBehind => {
                *refusals += 1;
                assert!(Instant::now() < deadline, "uploads never caught up: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("writing: {e}"),
        }
    }
}

/// The `i`th event of the domain stream the first test appends to.
fn stream_event(i: u8) -> Event {
    Event::new(
        format!("s{i}"),
        "/t",
        "t",
        Subject::new("history.order").unwrap(),
        vec![i],
    )
}

/// Publishes events `from..to` in batches of 16 (512 KiB), resending a batch refused with
/// `OffloadBehind`. Answers the refusals.
async fn publish(client: &Client, topic: &str, from: u64, to: u64) -> u64 {
    let mut refusals = 0;
    let mut next = from;
    while next < to {
        let upto = (next + 16).min(to);
        let events: Vec<Event> = (next..upto).map(event).collect();
        let batch = EventBatch::new(&events, None, 0, &Limits::default()).unwrap();
        accepted(&mut refusals, || {
            client.publish_batch(topic, 0, batch.clone())
        })
        .await;
        next = upto;
    }
    refusals
}

/// Bytes under `dir` (0 if it is not there).
fn folder_bytes(dir: &Path) -> u64 {
    let Ok(items) = std::fs::read_dir(dir) else {
        return 0;
    };
    items
        .flatten()
        .map(|item| match item.metadata() {
            Ok(m) if m.is_dir() => folder_bytes(&item.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Samples the largest size each of `folders` reaches, every 50 ms, until stopped.
struct DiskWatch {
    max: Arc<Vec<AtomicU64>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl DiskWatch {
    fn start(folders: Vec<PathBuf>) -> Self {
        let max: Arc<Vec<AtomicU64>> =
            Arc::new(folders.iter().map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (max, stop) = (max.clone(), stop.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    for (dir, max) in folders.iter().zip(max.iter()) {
                        max.fetch_max(folder_bytes(dir), Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        Self { max, stop, task }
    }

    async fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.max.iter().map(|m| m.load(Ordering::Relaxed)).collect()
    }
}

/// A node's folder of the partition group `topic/0`.
fn group_folder(region: &TestRegion, index: usize, topic: &str) -> PathBuf {
    region.configs[index]
        .data_dir
        .join("partitions")
        .join(format!("{topic}@0"))
}

async fn partition(client: &Client, topic: &str) -> PartitionInfo {
    client.describe_topic(topic).await.unwrap().partitions[0].clone()
}

/// Subscribes to partition 0 of `topic` from the earliest offset and checks that it serves
/// `e0` .. `e{total-1}` at offsets 0 .. total, in order, and that the partition holds no more.
async fn read_all_in_order(client: &Client, topic: &str, total: u64) {
    let mut sub = client
        .subscribe(topic, 0, StartFrom::Earliest)
        .await
        .unwrap();
    for offset in 0..total {
        let (at, event) = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .expect("every event is served")
            .unwrap();
        assert_eq!((at, event.id.to_string()), (offset, format!("e{offset}")));
    }
    assert_eq!(
        partition(client, topic).await.high_watermark,
        total,
        "no event twice"
    );
}

/// A client of node `id` alone (its subscriptions are served from its own replica).
fn client_of(region: &TestRegion, id: NodeId) -> Client {
    let index = (id - region.first_id) as usize;
    let addr = region.configs[index].listen_addr().unwrap();
    let mut options =
        ClientOptions::new(vec![addr], identity(&region.certs(), "client-test-client"));
    options.request_timeout = Duration::from_secs(10);
    Client::new(options).unwrap()
}

fn tiered(name: &str, local_limit_bytes: Option<u64>) -> TopicConfig {
    let mut topic = TopicConfig::new(name, 1);
    topic.retention = Retention {
        local_max_bytes: Some(HOT),
        local_limit_bytes,
        ..Retention::default()
    };
    topic
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiered_topic_keeps_a_hot_tail_on_disk_and_serves_everything_from_the_object_store() {
    let s3 = S3Server::start().await;
    s3.create_bucket(BUCKET).await;
    let mut region = TestRegion::start_with(3, |config| {
        config.tier = Some(s3.options(BUCKET, "hot-tail"));
    })
    .await;
    let client = region.create_topic(tiered("history", None)).await;
    let limit = Retention {
        local_max_bytes: Some(HOT),
        ..Retention::default()
    }
    .local_limit()
    .unwrap();
    let disks = DiskWatch::start(
        (0..3)
            .map(|i| group_folder(&region, i, "history"))
            .collect(),
    );

    // A domain stream's first events, then 200 MiB, then the stream's last events.
    let stream_events: Vec<Event> = (0..3).map(stream_event).collect();
    let batch = EventBatch::new(&stream_events, None, 0, &Limits::default()).unwrap();
    let first = client
        .append_to_stream("history", 0, "order-1", Some(0), batch)
        .await
        .unwrap();
    assert_eq!((first.base_offset, first.version), (0, 3));
    let count = 200 * 1024 * 1024 / PAYLOAD as u64;
    let mut refusals = publish(&client, "history", 0, count).await;
    let tail: Vec<Event> = (3..5).map(stream_event).collect();
    let batch = EventBatch::new(&tail, None, 0, &Limits::default()).unwrap();
    accepted(&mut refusals, || {
        client.append_to_stream("history", 0, "order-1", Some(3), batch.clone())
    })
    .await;
    let total = count + 5;

    // Uploads catch up: every replica keeps the hot tail only.
    wait_until(
        "the replicas keep only their hot tail",
        Duration::from_secs(120),
        || async {
            (0..3).all(|i| {
                let node = region.nodes[i].as_ref().unwrap().node();
                node.partition("history", 0).is_some_and(|p| {
                    p.view.stored_bytes() <= HOT && p.view.remote_bytes() > 190 << 20
                })
            })
        },
    )
    .await;
    let disk = disks.finish().await;
    let bound = limit + 2 * 1024 * 1024;
    println!("largest partition folder per replica: {disk:?} bytes (bound {bound}); {refusals} publishes refused while uploads caught up");
    for (i, max) in disk.iter().enumerate() {
        assert!(*max <= bound, "replica {i} held {max} bytes, over {bound}");
        assert!(*max > 0, "replica {i}'s folder was watched");
    }
    let info = partition(&client, "history").await;
    assert_eq!(info.high_watermark, total);
    assert_eq!(info.low_watermark, 0);
    assert!(
        info.local_from > total - 2 * HOT / PAYLOAD as u64,
        "{info:?}"
    );
    assert!(
        info.remote_bytes > 190 << 20 && info.remote_objects >= 100,
        "{info:?}"
    );

    // A consumer group reads everything from offset 0, in order.
    let mut consumer = GroupConsumer::join(
        client.clone(),
        "audit",
        "history",
        "m1",
        ConsumerOptions {
            start: StartFrom::Earliest,
            ..ConsumerOptions::default()
        },
    )
    .await
    .unwrap();
    let mut published = 0;
    for offset in 0..total {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("offset {offset} not delivered in time"));
        assert_eq!(delivery.offset, offset);
        let id = delivery.event.id.to_string();
        if offset < 3 {
            assert_eq!(id, format!("s{offset}"));
        } else if offset < total - 2 {
            assert_eq!(id, format!("e{published}"));
            published += 1;
        }
    }
    consumer.leave().await.unwrap();

    // The event store reads a stream whose first events are in the object store.
    let (version, events) = client
        .read_stream("history", 0, "order-1", 1, 100)
        .await
        .unwrap();
    assert_eq!(version, 5);
    let ids: Vec<String> = events.iter().map(|e| e.event.id.to_string()).collect();
    assert_eq!(ids, ["s0", "s1", "s2", "s3", "s4"]);
    assert!(
        events[0].offset < info.local_from,
        "the first events are remote"
    );

    // A new replica copies the manifest and the hot tail only.
    region.join(4).await.unwrap();
    let from = info.replicas[0];
    client.move_replica("history", 0, from, 4).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let d = client.describe_topic("history").await.unwrap();
        if d.moves.is_empty() && d.partitions[0].replicas.contains(&4) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the move did not finish: {:?}",
            d.moves
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let received = region.node(4).unwrap().node().snapshot_bytes_received();
    println!(
        "the new replica received {received} bytes of snapshot for a partition of {} MiB",
        (total * PAYLOAD as u64) >> 20
    );
    assert!(
        received > 0 && received < 16 << 20,
        "{received} bytes copied"
    );
    // It serves the oldest events, from the object store.
    let mut sub = client_of(&region, 4)
        .subscribe("history", 0, StartFrom::Earliest)
        .await
        .unwrap();
    for offset in 0..20 {
        let (at, event) = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .expect("the new replica serves the oldest events")
            .unwrap();
        assert_eq!(at, offset);
        if offset >= 3 {
            assert_eq!(event.id.to_string(), format!("e{}", offset - 3));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_object_store_stopped_publishes_are_refused_at_the_bound_and_nothing_is_lost() {
    let s3 = S3Server::start().await;
    s3.create_bucket(BUCKET).await;
    let region = TestRegion::start_with(3, |config| {
        config.tier = Some(s3.options(BUCKET, "outage"));
    })
    .await;
    let limit = 3 * HOT;
    let client = region.create_topic(tiered("orders", Some(limit))).await;
    // Some events offloaded while the store answers.
    publish(&client, "orders", 0, 200).await;
    wait_until("the uploads catch up", Duration::from_secs(60), || async {
        let info = partition(&client, "orders").await;
        info.remote_objects > 0 && info.local_bytes <= HOT
    })
    .await;

    // The store stops: publishes go on until the partition holds its limit locally, then are
    // refused with the retryable error, naming the failing uploads.
    s3.pause();
    let mut next = 200;
    let refusal = loop {
        let events: Vec<Event> = (next..next + 16).map(event).collect();
        let batch = EventBatch::new(&events, None, 0, &Limits::default()).unwrap();
        match client.publish_batch("orders", 0, batch).await {
            Ok(_) => next += 16,
            Err(ClientError::Api(e)) if e.code == ErrorCode::OffloadBehind => break e,
            Err(e) => panic!("publishing {next}: {e}"),
        }
        assert!(next < 2_000, "never refused");
    };
    println!("refused after {next} events: {refusal}");
    assert!(
        next >= 200 + (limit - HOT) / PAYLOAD as u64,
        "refused after {next} events only"
    );
    assert!(refusal.message.contains("local_limit_bytes"), "{refusal}");
    // The refusal counts the files on disk (headers and not yet deleted files too); the
    // events they hold are within a hot tail of it.
    let held = partition(&client, "orders").await.local_bytes;
    assert!(
        held + HOT >= limit && held < limit + 16 * PAYLOAD as u64 * 2,
        "{held} bytes held locally"
    );
    // Refused again while it stays down; nothing was appended meanwhile.
    let high = partition(&client, "orders").await.high_watermark;
    let events: Vec<Event> = (next..next + 16).map(event).collect();
    let batch = EventBatch::new(&events, None, 0, &Limits::default()).unwrap();
    // Once an upload has failed, the refusal says so.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let again = client
            .publish_batch("orders", 0, batch.clone())
            .await
            .unwrap_err();
        assert_eq!(again.code(), Some(ErrorCode::OffloadBehind), "{again}");
        if again.to_string().contains("failed uploads in a row") {
            println!("{again}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the refusal never named the failing uploads: {again}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(partition(&client, "orders").await.high_watermark, high);
    // The client's producer slows down (resends after a backoff) and fails the event with
    // the refusal once it has lasted its retry_for.
    let producer = client
        .producer(
            "orders",
            ProducerOptions {
                retry_for: Duration::from_secs(2),
                ..ProducerOptions::default()
            },
        )
        .await
        .unwrap();
    let started = Instant::now();
    let failed = producer.publish(event(next)).await.unwrap_err();
    assert_eq!(failed.code(), Some(ErrorCode::OffloadBehind), "{failed}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "failed after {:?}",
        started.elapsed()
    );
    assert_eq!(partition(&client, "orders").await.high_watermark, high);

    // Back: uploads catch up, publishing works again, and every event is there once.
    s3.resume();
    let total = next + 400;
    publish(&client, "orders", next, total).await;
    wait_until("uploads catch up", Duration::from_secs(120), || async {
        partition(&client, "orders").await.local_bytes <= HOT
    })
    .await;
    read_all_in_order(&client, "orders", total).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_no_manifest_names_are_swept_and_every_named_one_is_kept() {
    let s3 = S3Server::start().await;
    s3.create_bucket(BUCKET).await;
    let options = s3.options(BUCKET, "sweep");
    let region = TestRegion::start_with(3, |config| {
        config.tier = Some(options.clone());
    })
    .await;
    let client = region.create_topic(tiered("swept", None)).await;
    let count = 4 * HOT / PAYLOAD as u64;
    publish(&client, "swept", 0, count).await;
    let leader = |region: &TestRegion| {
        region.nodes.iter().flatten().find_map(|n| {
            let p = n.node().partition("swept", 0)?;
            p.raft()
                .metrics()
                .borrow_watched()
                .state
                .is_leader()
                .then_some(p)
        })
    };
    // Uploads done: the manifest ends where it will stay.
    wait_until("objects uploaded", Duration::from_secs(60), || async {
        leader(&region)
            .is_some_and(|p| p.view.remote_bytes() >= 2 * HOT && p.view.stored_bytes() <= HOT)
    })
    .await;
    let manifest = leader(&region).unwrap().view.remote_segments();
    let (prefix, _) = manifest[0].key.rsplit_once('/').unwrap();
    let (region_prefix, _) = prefix.split_once('/').unwrap();
    let high = manifest.last().unwrap().end;

    // Left over as failures leave them: uploads whose manifest entries never landed, of
    // offsets the manifest holds under other boundaries. Beside them, objects the sweep of
    // this partition must not touch: a stream index run, another topic's segment, and one
    // starting where the manifest ends (the next upload takes that key and records it).
    let store = ferry_store::RemoteStore::open(&options).unwrap();
    let left_over = [
        format!("{prefix}/{:020}-{:020}.seg", high - 1, high + 100),
        format!("{prefix}/{:020}-{:020}.seg", 0, 7),
    ];
    let untouched = [
        format!("{prefix}/stream-index/{:032x}.run", 7u128),
        format!("{region_prefix}/other/0/{:020}-{:020}.seg", 0, 7),
        format!("{prefix}/{:020}-{:020}.seg", high, high + 100),
    ];
    for key in left_over.iter().chain(&untouched) {
        store.put(key, "left over".into()).await.unwrap();
    }
    let planted = Instant::now();
    let other_prefix = format!("{region_prefix}/other/0");
    let index_prefix = format!("{prefix}/stream-index");
    let listed = || async {
        let mut keys = Vec::new();
        for under in [prefix, index_prefix.as_str(), other_prefix.as_str()] {
            keys.extend(store.list(under).await.unwrap());
        }
        keys
    };
    wait_until(
        "the left-over objects swept",
        Duration::from_secs(120),
        || async {
            let listed = listed().await;
            left_over.iter().all(|k| !listed.contains(k))
        },
    )
    .await;
    println!(
        "left-over objects swept {:?} after they were put",
        planted.elapsed()
    );
    assert!(
        planted.elapsed() >= Duration::from_secs(30),
        "swept before they were left out of the manifest for 30 s"
    );
    let listed = listed().await;
    for segment in leader(&region).unwrap().view.remote_segments() {
        assert!(listed.contains(&segment.key), "{} was deleted", segment.key);
    }
    for key in &untouched {
        assert!(listed.contains(key), "{key} was deleted");
    }
    let swept: u64 = region
        .nodes
        .iter()
        .flatten()
        .map(|n| n.node().tier_objects_swept())
        .sum();
    assert_eq!(swept, 2, "objects the sweeps deleted");
    read_all_in_order(&client, "swept", count).await;
}

/// Creates `config`, retrying while the region is not ready: the error it is refused with.
async fn refused_creation(client: &Client, config: TopicConfig) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.create_topic(config.clone()).await {
            Err(ClientError::Api(e)) if e.code == ErrorCode::InvalidRequest => break e.message,
            Ok(()) => panic!("{} was created", config.name),
            Err(e) => {
                assert!(Instant::now() < deadline, "creating {}: {e}", config.name);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_object_store_is_refused_a_tiered_topic_and_a_join() {
    let store = tempfile::tempdir().unwrap();
    let url = format!("file://{}", store.path().display());
    let mut region = TestRegion::start_with(3, |config| {
        if config.id != 3 {
            config.tier = Some(ferry_store::RemoteOptions::new(url.clone()));
        }
    })
    .await;
    // Refused by the metadata leader: node 3 has none (whether it leads or is asked).
    let client = client_of(&region, 1);
    let err = refused_creation(&client, tiered("split-store", None)).await;
    assert!(
        err.contains("node 3 has no") && err.contains("the same [tier]"),
        "{err}"
    );
    let topics = client.list_topics().await.unwrap();
    assert!(
        topics.iter().all(|t| t.name.as_str() != "split-store"),
        "a refused topic was created"
    );
    // An untiered topic is not its business.
    region.create_topic(TopicConfig::new("plain", 1)).await;

    // A node joining with another store than its region's is refused.
    region.configs[0].tier = Some(ferry_store::RemoteOptions::new(format!("{url}/elsewhere")));
    let err = region.join(4).await.unwrap_err().to_string();
    assert!(err.contains("the same [tier]"), "{err}");
}

/// `pay`, tiered in region b (a 1 MiB hot tail, at most `limit` on disk), forwarded from a.
fn forwarded_topic(retention: Retention) -> TopicConfig {
    let mut topic = TopicConfig::new("pay", 1);
    topic.replication = 1;
    topic.subjects = SubjectFilter::new("pay.>").unwrap();
    topic.class = EventClass::Integration;
    topic.regions = RegionPolicy::ByInterest;
    topic.retention = retention;
    topic
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_forwarded_into_a_tiered_topic_are_held_at_its_bound_while_the_store_is_down() {
    let s3 = S3Server::start().await;
    s3.create_bucket(BUCKET).await;
    let mesh = TestMesh::start_with(&[("a", 1), ("b", 1)], |config| {
        config.tier = Some(s3.options(BUCKET, "forwarded"));
        config.mesh.forward_batch_events = 8;
        config.mesh.forward_window = 2;
    })
    .await;
    let limit = 3 * HOT;
    // What may land past the bound: the batches in flight when it is reached (a window of
    // two, of 8 events), and a batch's headers.
    let slack = 3 * 8 * PAYLOAD as u64;
    // b's first: a's forwarding would otherwise define it in b with a's retention.
    let b = mesh
        .region("b")
        .create_topic(forwarded_topic(Retention {
            local_max_bytes: Some(HOT),
            local_limit_bytes: Some(limit),
            ..Retention::default()
        }))
        .await;
    let a = mesh
        .region("a")
        .create_topic(forwarded_topic(Retention::default()))
        .await;
    wait_until("b knows region a", Duration::from_secs(30), || async {
        let b = mesh.region("b");
        b.node(b.first_id)
            .is_some_and(|n| n.node().mesh_nodes().iter().any(|r| r.region == "a"))
    })
    .await;
    let version = b.add_interest("billing", "pay.>").await.unwrap();
    b.await_interest(version, Duration::from_secs(30))
        .await
        .unwrap();
    let pay = |i: u64| event_on("pay.eu", i);
    // The store stops, and a publishes three times b's bound: b takes what fits, then holds
    // the rest back (a's lane says why), its disk within the bound.
    s3.pause();
    let total = 3 * limit / PAYLOAD as u64;
    for from in (0..total).step_by(16) {
        let events: Vec<Event> = (from..(from + 16).min(total)).map(pay).collect();
        let batch = EventBatch::new(&events, None, 0, &Limits::default()).unwrap();
        a.publish_batch("pay", 0, batch).await.unwrap();
    }
    let b_folder = mesh.region("b").configs[0]
        .data_dir
        .join("partitions")
        .join("pay@0");
    let watch = DiskWatch::start(vec![b_folder]);
    let held = wait_until(
        "b holds forwarded events back",
        Duration::from_secs(60),
        || async {
            a.regions().await.is_ok_and(|report| {
                report.forwarding.iter().any(|lane| {
                    lane.destination == "b"
                        && lane
                            .last_error
                            .as_deref()
                            .is_some_and(|e| e.contains("local_limit_bytes"))
                })
            })
        },
    )
    .await;
    println!("held back after {held:?}");
    let landed = partition(&b, "pay").await.high_watermark;
    assert!(landed < total, "all {total} landed with the store down");
    let on_disk = partition(&b, "pay").await.local_bytes;
    assert!(
        on_disk < limit + slack,
        "{on_disk} bytes on disk, bound {limit}"
    );

    // Back: uploads catch up, the rest lands, every event once and in order.
    s3.resume();
    wait_until(
        "everything lands in b",
        Duration::from_secs(120),
        || async { partition(&b, "pay").await.high_watermark.eq(&total) },
    )
    .await;
    // The whole folder (checkpoints and the stream index too, and files offloaded but not
    // deleted until the next checkpoint) stays near it.
    let most = watch.finish().await[0];
    assert!(
        most < limit + slack + 2 * HOT,
        "b's folder reached {most} bytes, bound {limit}"
    );
    read_all_in_order(&b, "pay", total).await;
}
