//! Domain streams against a three-node region over QUIC, through the client: appends with
//! expected versions, a conflict that appends nothing, reads from a middle version, a
//! producer's resend answered with the original append, and concurrent writers expecting the
//! same version, of which exactly one wins.

use std::future::Future;
use std::time::Duration;

use ferry_client::{Client, ClientError, StreamAppend};
use ferry_proto::wire::{ClientRequest, ClientResponse, ErrorCode};
use ferry_proto::{partition_for_key, Event, EventBatch, Limits, Subject, TopicConfig};
use ferry_tests::TestRegion;
use futures::future::join_all;
use tokio::time::Instant;

const TOPIC: &str = "orders";
const PARTITIONS: u32 = 2;

fn batch(ids: &[&str], producer: Option<u64>) -> EventBatch {
    let events: Vec<Event> = ids
        .iter()
        .map(|id| {
            Event::new(
                *id,
                "/orders",
                "order.changed",
                Subject::new("orders.changed").unwrap(),
                id.as_bytes().to_vec(),
            )
        })
        .collect();
    EventBatch::new(&events, producer, 0, &Limits::default()).unwrap()
}

/// The stream read whole: (version, [(version, offset, event id)]).
async fn read(client: &Client, stream: &str, from: u64) -> (u64, Vec<(u64, u64, String)>) {
    let partition = partition_for_key(stream.as_bytes(), PARTITIONS);
    let (version, events) = client
        .read_stream(TOPIC, partition, stream, from, 1000)
        .await
        .expect("read_stream");
    let events = events
        .into_iter()
        .map(|e| (e.version, e.offset, e.event.id))
        .collect();
    (version, events)
}

async fn append(
    client: &Client,
    stream: &str,
    expected: Option<u64>,
    ids: &[&str],
) -> Result<StreamAppend, ClientError> {
    let partition = partition_for_key(stream.as_bytes(), PARTITIONS);
    client
        .append_to_stream(TOPIC, partition, stream, expected, batch(ids, None))
        .await
}

/// Waits until `check` holds, failing after `timeout`.
async fn wait_for<F: Future<Output = bool>>(what: &str, timeout: Duration, check: impl Fn() -> F) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn described_high(client: &Client, partition: u32) -> Option<u64> {
    let d = client.describe_topic(TOPIC).await.ok()?;
    Some(d.partitions.get(partition as usize)?.high_watermark)
}

fn assert_conflict(result: Result<StreamAppend, ClientError>, message: &str) {
    match result {
        Err(ClientError::Api(e)) => {
            assert_eq!(e.code, ErrorCode::VersionConflict, "{e}");
            assert_eq!(e.message, message);
        }
        other => panic!("expected a version conflict, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_append_with_expected_versions_and_conflicts_append_nothing() {
    let region = TestRegion::start(3).await;
    let client = region
        .create_topic(TopicConfig::new(TOPIC, PARTITIONS))
        .await;
    let stream = "order-1";
    let partition = partition_for_key(stream.as_bytes(), PARTITIONS);

    // Some(0): the stream must not exist yet; then versions continue across batches.
    assert_eq!(
        append(&client, stream, Some(0), &["a1", "a2"])
            .await
            .unwrap(),
        StreamAppend {
            base_offset: 0,
            first_version: 1,
            version: 2
        }
    );
    assert_eq!(
        append(&client, stream, Some(2), &["a3", "a4", "a5"])
            .await
            .unwrap(),
        StreamAppend {
            base_offset: 2,
            first_version: 3,
            version: 5
        }
    );
    let whole: Vec<(u64, u64, String)> = ["a1", "a2", "a3", "a4", "a5"]
        .iter()
        .enumerate()
        .map(|(i, id)| (i as u64 + 1, i as u64, id.to_string()))
        .collect();
    assert_eq!(read(&client, stream, 0).await, (5, whole.clone()));
    wait_for(
        "the answering node applies the appends",
        Duration::from_secs(10),
        || async { described_high(&client, partition).await == Some(5) },
    )
    .await;

    // Conflicts (a stale version, a stream that exists, a version ahead) append nothing.
    assert_conflict(
        append(&client, stream, Some(3), &["x"]).await,
        "stream order-1: expected version 3, actual version 5",
    );
    assert_conflict(
        append(&client, stream, Some(0), &["x"]).await,
        "stream order-1: expected version 0, actual version 5",
    );
    let err = append(&client, stream, Some(9), &["x"]).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::VersionConflict));
    assert_eq!(read(&client, stream, 0).await, (5, whole.clone()));
    let (_, leader_high) = client.fetch(TOPIC, partition, 0, 1 << 20).await.unwrap();
    assert_eq!(leader_high, 5, "the leader appended nothing");
    assert_eq!(described_high(&client, partition).await, Some(5));

    // Reads from a middle version, bounded, past the end, of a stream that does not exist.
    assert_eq!(read(&client, stream, 3).await, (5, whole[2..].to_vec()));
    let (version, two) = client
        .read_stream(TOPIC, partition, stream, 2, 2)
        .await
        .unwrap();
    assert_eq!(version, 5);
    let two: Vec<_> = two
        .iter()
        .map(|e| (e.version, e.event.id.as_str()))
        .collect();
    assert_eq!(two, [(2, "a2"), (3, "a3")]);
    assert_eq!(read(&client, stream, 6).await, (5, vec![]));
    assert_eq!(read(&client, "order-none", 0).await, (0, vec![]));

    // None appends at whatever version; the conflicts left no trace in the offsets.
    assert_eq!(
        append(&client, stream, None, &["a6"]).await.unwrap(),
        StreamAppend {
            base_offset: 5,
            first_version: 6,
            version: 6
        }
    );
    wait_for(
        "the answering node applies the append",
        Duration::from_secs(10),
        || async { described_high(&client, partition).await >= Some(6) },
    )
    .await;
    assert_eq!(described_high(&client, partition).await, Some(6));

    // A producer's resend (same id and sequence) is answered with the original append and
    // appends nothing, even though it expects the version the original moved.
    let resent = "order-2";
    let p2 = partition_for_key(resent.as_bytes(), PARTITIONS);
    let first = client
        .append_to_stream(TOPIC, p2, resent, Some(0), batch(&["b1", "b2"], Some(77)))
        .await
        .unwrap();
    assert_eq!((first.first_version, first.version), (1, 2));
    let again = client
        .append_to_stream(TOPIC, p2, resent, Some(0), batch(&["b1", "b2"], Some(77)))
        .await
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(read(&client, resent, 0).await.0, 2);

    // Bad stream names are refused by the client, and by the node if a client does not check.
    assert!(matches!(
        append(&client, "bad name", None, &["x"]).await,
        Err(ClientError::Proto(_))
    ));
    let answer = client
        .request(&ClientRequest::AppendToStream {
            topic: TOPIC.into(),
            partition,
            stream: "bad/name".into(),
            expected_version: None,
            batch: batch(&["x"], None),
        })
        .await
        .unwrap();
    assert!(
        matches!(&answer, ClientResponse::Error(e) if e.code == ErrorCode::InvalidRequest && e.message.contains("stream name")),
        "{answer:?}"
    );
    // An unknown topic and partition are named.
    let unknown = client
        .append_to_stream("nope", 0, stream, None, batch(&["x"], None))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Some(ErrorCode::UnknownTopic));
    let unknown = client
        .append_to_stream(TOPIC, 9, stream, None, batch(&["x"], None))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Some(ErrorCode::UnknownPartition));
    assert_eq!(read(&client, stream, 0).await.0, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_concurrent_writers_expecting_one_version_exactly_one_wins() {
    const WRITERS: usize = 4;
    const ROUNDS: usize = 5;
    let region = TestRegion::start(3).await;
    region
        .create_topic(TopicConfig::new(TOPIC, PARTITIONS))
        .await;
    // Separate clients: separate connections, racing to the leader.
    let clients: Vec<Client> = (0..WRITERS).map(|_| region.client()).collect();
    let stream = "cart-7";
    let mut expected = 0;
    let mut winners = Vec::new();
    for round in 0..ROUNDS {
        let ids: Vec<[String; 2]> = (0..WRITERS)
            .map(|w| [format!("r{round}-w{w}-0"), format!("r{round}-w{w}-1")])
            .collect();
        let results = join_all(clients.iter().zip(&ids).map(|(client, ids)| async move {
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            append(client, stream, Some(expected), &ids).await
        }))
        .await;
        let mut won = None;
        for (w, result) in results.into_iter().enumerate() {
            match result {
                Ok(a) => {
                    assert!(won.is_none(), "round {round}: two writers won");
                    assert_eq!((a.first_version, a.version), (expected + 1, expected + 2));
                    won = Some(w);
                }
                Err(e) => assert_eq!(e.code(), Some(ErrorCode::VersionConflict), "{e}"),
            }
        }
        let w = won.unwrap_or_else(|| panic!("round {round}: no writer won"));
        winners.extend(ids[w].clone());
        expected += 2;
    }

    // The stream holds exactly the winners' events, at dense versions.
    let (version, events) = read(&clients[0], stream, 0).await;
    assert_eq!(version, expected);
    let got: Vec<(u64, String)> = events.into_iter().map(|(v, _, id)| (v, id)).collect();
    let want: Vec<(u64, String)> = winners
        .into_iter()
        .enumerate()
        .map(|(i, id)| (i as u64 + 1, id))
        .collect();
    assert_eq!(got, want);
}
