//! The client API against a three-node region over QUIC: bad input is refused with a typed
//! error and changes nothing; foreign certificates are refused; consumer groups (the
//! primitives and [`GroupConsumer`]) and
//! retention work.

use std::time::Duration;

use ferry_client::{Client, ClientError, ClientOptions, ConsumerOptions, GroupConsumer};
use ferry_net::framing::{read_frame, write_frame};
use ferry_net::tls::dev_ca;
use ferry_proto::codec::{decode_frame, encode_frame};
use ferry_proto::wire::{ClientRequest, ClientResponse, ErrorCode};
use ferry_proto::{Event, EventBatch, Limits, Retention, Subject, TopicConfig};
use ferry_tests::TestRegion;

fn event(i: usize, size: usize) -> Event {
    Event::new(
        format!("e{i}"),
        "/test",
        "t",
        Subject::new("a.b").unwrap(),
        vec![1u8; size],
    )
}

/// Sends raw bytes as one request frame on a fresh connection and returns the answer.
async fn raw_request(
    certs: &std::path::Path,
    addr: std::net::SocketAddr,
    frame: &[u8],
) -> ClientResponse {
    let connection = raw_connection(certs, addr).await;
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    write_frame(&mut send, bytes::Bytes::copy_from_slice(frame))
        .await
        .unwrap();
    let _ = send.finish();
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        read_frame(&mut recv, Limits::DEFAULT_MAX_FRAME),
    )
    .await
    .expect("answer in time")
    .unwrap()
    .expect("a frame");
    decode_frame("response", &reply, Limits::DEFAULT_MAX_FRAME).unwrap()
}

/// A plain mTLS client connection with the region's client certificate.
async fn raw_connection(certs: &std::path::Path, addr: std::net::SocketAddr) -> quinn::Connection {
    let identity = ferry_tests::identity(certs, "client-test-client");
    let config = ferry_net::tls::client_config(&identity, ferry_net::ALPN_CLIENT).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint
        .connect_with(config, addr, ferry_net::NODE_SERVER_NAME)
        .unwrap()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let region = TestRegion::start(3).await;
    let certs = region.certs();
    let client = region.create_topic(TopicConfig::new("orders", 2)).await;
    let leader = region.leader_of("orders", 0).await.unwrap();
    let leader_addr = region.configs[(leader - 1) as usize].listen_addr().unwrap();

    // A malformed frame gets a typed error naming the problem.
    let answer = raw_request(&certs, leader_addr, &[1, 0xff, 0xff, 0xff, 0x07]).await;
    assert!(
        matches!(&answer, ClientResponse::Error(e) if e.code == ErrorCode::InvalidRequest),
        "{answer:?}"
    );
    let answer = raw_request(&certs, leader_addr, &[9, 0]).await;
    assert!(
        matches!(&answer, ClientResponse::Error(e) if e.code == ErrorCode::InvalidRequest && e.message.contains("version")),
        "{answer:?}"
    );

    // An oversized event (built with a laxer limit than the node's) is refused by the node.
    let lax = Limits {
        max_event: 3 * 1024 * 1024,
        max_frame: 4 * 1024 * 1024,
    };
    let batch = EventBatch::new(&[event(1, 2 * 1024 * 1024)], None, 0, &lax).unwrap();
    let request = ClientRequest::Publish {
        topic: "orders".into(),
        partition: 0,
        batch,
    };
    let frame = encode_frame("request", &request, lax.max_frame).unwrap();
    let answer = raw_request(&certs, leader_addr, &frame).await;
    assert!(
        matches!(&answer, ClientResponse::Error(e) if e.code == ErrorCode::EventTooLarge && e.message.contains("e1")),
        "{answer:?}"
    );

    // Unknown topic and partition.
    let batch = EventBatch::new(&[event(2, 10)], None, 0, &Limits::default()).unwrap();
    for (topic, partition, code) in [
        ("nope", 0, ErrorCode::UnknownTopic),
        ("orders", 9, ErrorCode::UnknownPartition),
    ] {
        let request = ClientRequest::Publish {
            topic: topic.into(),
            partition,
            batch: batch.clone(),
        };
        let frame = encode_frame("request", &request, Limits::DEFAULT_MAX_FRAME).unwrap();
        let answer = raw_request(&certs, leader_addr, &frame).await;
        assert!(
            matches!(&answer, ClientResponse::Error(e) if e.code == code),
            "{answer:?}"
        );
    }

    // Invalid topic configurations name the field; the client refuses before sending and the
    // node refuses when sent raw.
    let mut bad = TopicConfig::new("bad name", 1);
    assert!(matches!(
        client.create_topic(bad.clone()).await,
        Err(ClientError::Proto(_))
    ));
    let frame = encode_frame(
        "request",
        &ClientRequest::CreateTopic(bad.clone()),
        Limits::DEFAULT_MAX_FRAME,
    )
    .unwrap();
    let answer = raw_request(&certs, leader_addr, &frame).await;
    assert!(
        matches!(&answer, ClientResponse::Error(e) if e.code == ErrorCode::InvalidRequest && e.message.contains("name")),
        "{answer:?}"
    );
    bad.name = "toobig".into();
    bad.replication = 5;
    let err = client.create_topic(bad).await.unwrap_err().to_string();
    assert!(err.contains("replication"), "{err}");

    // Nothing of the above was written.
    let d = client.describe_topic("orders").await.unwrap();
    assert!(
        d.partitions.iter().all(|p| p.high_watermark == 0),
        "{:?}",
        d.partitions
    );
    let topics: Vec<_> = client
        .list_topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(topics, vec!["orders".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_certificates_are_refused() {
    let region = TestRegion::start(3).await;
    let foreign = dev_ca().unwrap().issue_client("intruder").unwrap();
    let mut options = ClientOptions::new(region.live_addrs(), foreign);
    options.request_timeout = Duration::from_secs(3);
    let client = Client::new(options).unwrap();
    let err = client.list_topics().await.unwrap_err();
    assert!(matches!(err, ClientError::NoServer(_)), "{err}");

    // A node certificate from another CA cannot join as a peer either: the region's own
    // client keeps working while the intruder is refused at the handshake.
    let intruder_node = dev_ca().unwrap().issue_node(1).unwrap();
    let config = ferry_net::tls::client_config(&intruder_node, ferry_net::ALPN_PEER).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = region.live_addrs()[0];
    let attempt = async {
        let connection = endpoint
            .connect_with(config, addr, ferry_net::NODE_SERVER_NAME)
            .ok()?
            .await
            .ok()?;
        let (mut send, mut recv) = connection.open_bi().await.ok()?;
        write_frame(&mut send, bytes::Bytes::from_static(b"hello"))
            .await
            .ok()?;
        read_frame(&mut recv, 1024).await.ok()?
    };
    let answered = tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten();
    assert!(
        answered.is_none(),
        "a foreign node certificate got an answer"
    );
    assert!(region.client().list_topics().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_groups_and_retention() {
    let region = TestRegion::start(3).await;
    let mut config = TopicConfig::new("metrics", 4);
    config.retention = Retention {
        max_age_ms: None,
        max_bytes: Some(4_000),
        ..Retention::default()
    };
    let client = region.create_topic(config).await;

    // Two members split four partitions; the second's leaving gives the first all of them.
    let (g1, a) = client.join_group("billing", "metrics", "a").await.unwrap();
    assert_eq!(a, vec![0, 1, 2, 3]);
    let (g2, b) = client.join_group("billing", "metrics", "b").await.unwrap();
    assert!(g2 > g1);
    let (_, a) = client.join_group("billing", "metrics", "a").await.unwrap();
    let mut all: Vec<u32> = a.iter().chain(&b).copied().collect();
    all.sort_unstable();
    assert_eq!(all, vec![0, 1, 2, 3], "every partition assigned once");
    client.leave_group("billing", "metrics", "b").await.unwrap();
    let (_, a) = client.join_group("billing", "metrics", "a").await.unwrap();
    assert_eq!(a, vec![0, 1, 2, 3]);

    // Committed cursors go through Raft and are read back.
    assert_eq!(
        client.committed("billing", "metrics", 2).await.unwrap(),
        None
    );
    client.commit("billing", "metrics", 2, 17).await.unwrap();
    assert_eq!(
        client.committed("billing", "metrics", 2).await.unwrap(),
        Some(17)
    );
    // A late commit from a member that has since lost the partition never moves it back.
    client.commit("billing", "metrics", 2, 5).await.unwrap();
    assert_eq!(
        client.committed("billing", "metrics", 2).await.unwrap(),
        Some(17)
    );

    // Retention by bytes: 40 events of 500 bytes into partition 0 in separate batches; the
    // partition is trimmed to about 4,000 bytes in the background.
    let producer = client
        .producer("metrics", Default::default())
        .await
        .unwrap();
    let mut last = None;
    for i in 0..40 {
        let e = Event::new(
            format!("m{i}"),
            "/t",
            "t",
            Subject::new("m.x").unwrap(),
            vec![0u8; 500],
        )
        .with_key("same-key");
        last = Some(producer.publish(e).await.unwrap());
    }
    let partition = last.unwrap().partition;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        // Fetch is linearizable: it sees every acknowledged event that retention kept.
        let (events, high) = client
            .fetch("metrics", partition, 0, 1 << 20)
            .await
            .unwrap();
        assert_eq!(high, 40);
        let kept: usize = events.iter().map(|(_, e)| e.size()).sum();
        let first = events.first().map(|(o, _)| *o).unwrap_or(high);
        if first > 0 && kept <= 4_000 {
            assert_eq!(
                events.last().map(|(o, _)| *o),
                Some(39),
                "the newest events are kept"
            );
            assert!(kept >= 2_000, "retention kept only {kept} bytes");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention never trimmed partition {partition}: {kept} bytes from offset {first}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A plain HTTP/1.1 GET over TCP: (status code, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("HTTP answer in time")
    .unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_over_http() {
    let region = TestRegion::start_with(3, |config| {
        config.http = Some("127.0.0.1:0".parse().unwrap())
    })
    .await;
    let client = region.create_topic(TopicConfig::new("orders", 2)).await;
    let producer = client.producer("orders", Default::default()).await.unwrap();
    for i in 0..5 {
        producer.publish(event(i, 10).with_key("k")).await.unwrap();
    }
    let http = region.nodes[0].as_ref().unwrap().http_addr().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http_get(http, "/healthz").await;
        if status == 200 {
            assert_eq!(body.trim(), "ok");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "healthz stayed {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http_get(http, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("# TYPE ferry_fsyncs_total counter"), "{body}");
        let total: u64 = body
            .lines()
            .filter(|l| l.starts_with("ferry_partition_high_watermark{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        if total == 5 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never showed the 5 events: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = http_get(http, "/nope").await;
    assert_eq!(status, 404);
}

/// Reads from `consumer` until `want` holds every id in `ids` or the deadline passes,
/// committing what it handled; answers the ids seen (with repeats).
async fn consume_until(
    consumer: &mut GroupConsumer,
    want: &std::collections::BTreeSet<String>,
    seen: &mut Vec<String>,
    have: &mut std::collections::BTreeSet<String>,
    deadline: tokio::time::Instant,
) {
    while !want.is_subset(have) {
        let Ok(d) = tokio::time::timeout_at(deadline, consumer.next()).await else {
            let missing = want.difference(have).count();
            panic!("{missing} events never delivered");
        };
        consumer.commit(d.partition, d.offset + 1).await.unwrap();
        seen.push(d.event.id.clone());
        have.insert(d.event.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_consumers_share_partitions_and_resume_from_commits() {
    let region = TestRegion::start(3).await;
    let client = region.create_topic(TopicConfig::new("orders", 4)).await;
    let producer = client.producer("orders", Default::default()).await.unwrap();
    let publish = |range: std::ops::Range<usize>| {
        let producer = &producer;
        async move {
            for i in range {
                let e = event(i, 64).with_key(format!("k{}", i % 16));
                producer.publish(e).await.unwrap();
            }
        }
    };
    publish(0..400).await;
    let options = ConsumerOptions {
        heartbeat: Duration::from_millis(200),
        ..ConsumerOptions::default()
    };
    let mut a = GroupConsumer::join(client.clone(), "billing", "orders", "a", options.clone())
        .await
        .unwrap();
    let mut b = GroupConsumer::join(client.clone(), "billing", "orders", "b", options)
        .await
        .unwrap();

    // Together they deliver every event; once both have heartbeated, they split the partitions.
    let first: std::collections::BTreeSet<String> = (0..400).map(|i| format!("e{i}")).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut seen_b = Vec::<String>::new();
    let mut have = std::collections::BTreeSet::new();
    loop {
        tokio::select! {
            d = a.next() => {
                a.commit(d.partition, d.offset + 1).await.unwrap();
                have.insert(d.event.id);
            }
            d = b.next() => {
                b.commit(d.partition, d.offset + 1).await.unwrap();
                seen_b.push(d.event.id.clone());
                have.insert(d.event.id);
            }
            // Heartbeats run inside next(): re-check the assignment even when nothing arrives.
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of 400 delivered; assigned {:?} and {:?}",
            have.len(),
            a.assigned(),
            b.assigned()
        );
        let (pa, pb) = (a.assigned(), b.assigned());
        if first.is_subset(&have) && pa.len() == 2 && pb.len() == 2 {
            let mut all: Vec<u32> = pa.iter().chain(&pb).copied().collect();
            all.sort_unstable();
            assert_eq!(all, vec![0, 1, 2, 3], "each partition read by one member");
            break;
        }
    }
    assert!(!seen_b.is_empty(), "the second member got work");

    // b leaves after committing everything it handled: a takes its partitions from b's
    // cursors, so it gets every new event and none of the old ones b had handled.
    let b_partitions = b.assigned();
    b.leave().await.unwrap();
    publish(400..600).await;
    let second: std::collections::BTreeSet<String> = (400..600).map(|i| format!("e{i}")).collect();
    let mut seen = Vec::new();
    let mut have_second = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    consume_until(&mut a, &second, &mut seen, &mut have_second, deadline).await;
    assert_eq!(a.assigned(), vec![0, 1, 2, 3]);
    let repeated: Vec<&String> = seen.iter().filter(|id| seen_b.contains(id)).collect();
    assert!(
        repeated.is_empty(),
        "a re-read events b had committed (b read partitions {b_partitions:?}): {repeated:?}"
    );
}

/// A server listed in the client's options that does not answer (a node that left the
/// region) is dialled once, then tried only after the others, until it answers: it does not
/// cost later requests a dial timeout each time its down mark runs out. The "server" is a
/// UDP socket on loopback that counts the QUIC packets sent to it and answers none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_did_not_answer_is_tried_after_the_others() {
    let region = TestRegion::start(1).await;
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = tokio::spawn({
        let received = received.clone();
        async move {
            let mut buf = vec![0u8; 2048];
            while silent.recv_from(&mut buf).await.is_ok() {
                received.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    let mut servers = vec![silent_addr];
    servers.extend(region.live_addrs());
    let mut options = ClientOptions::new(
        servers,
        ferry_tests::identity(&region.certs(), "client-test-client"),
    );
    options.connect_timeout = Duration::from_millis(500);
    let client = Client::new(options).unwrap();

    // The first request dials the silent server first, gives up on it, and is answered by
    // the node.
    client
        .list_topics()
        .await
        .expect("answered by the live node");
    assert!(
        received.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the silent server was never dialled"
    );

    // Past the time a leader on it is passed over (5 s), requests still go to the live node
    // first: the silent server hears nothing more (counted from after the wait, so the
    // first dial's last packets are not taken for a new one).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let dialled = received.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..5 {
        client
            .list_topics()
            .await
            .expect("answered by the live node");
    }
    assert_eq!(
        received.load(std::sync::atomic::Ordering::SeqCst),
        dialled,
        "a request dialled the silent server again"
    );
    counter.abort();
}
