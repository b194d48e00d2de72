//! An edge and a three-node region in one process, over real QUIC (edge to region) and real
//! TCP (WebSocket and SSE clients to the edge): fan-out to 1,000 WebSocket clients, broadcast,
//! resume by last id over WebSocket and SSE (received in publish order, none skipped or
//! repeated), the window surviving a clean edge restart and an abrupt one (told by a gap frame
//! after the crash), the gap frame, tokens, and a client that stops reading.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ferry_client::{Client, ClientOptions, Producer, ProducerOptions};
use ferry_edge::throttle::{Policy, ThrottleConfig};
use ferry_edge::{Claims, Edge, EdgeConfig};
use ferry_net::tls::TlsPaths;
use ferry_proto::{Event, Subject};
use ferry_tests::TestRegion;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const SECRET: &str = "edge-test-secret-0123456789";
const TOPIC: &str = "notifications";

fn edge_config(region: &TestRegion, data: &Path, http: SocketAddr, window: u64) -> EdgeConfig {
    let certs = region.certs();
    let mut config = EdgeConfig::new(
        "edge-test",
        region.live_addrs(),
        TlsPaths {
            ca: certs.join("ca.pem"),
            cert: certs.join("client-test-client.pem"),
            key: certs.join("client-test-client.key"),
        },
        http,
        data.to_path_buf(),
        SECRET,
    );
    config.topic = TOPIC.into();
    config.channels = vec!["user.*".into(), "broadcast".into(), "news.>".into()];
    config.window.events = window;
    config.throttle.rate_per_sec = 0.0;
    config
}

fn token(user: &str, channels: &[&str]) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    ferry_edge::sign(
        SECRET.as_bytes(),
        &Claims {
            sub: user.into(),
            tenant: "acme".into(),
            channels: channels.iter().map(|c| c.to_string()).collect(),
            exp,
            locale: None,
            attrs: Value::Null,
        },
    )
    .unwrap()
}

/// Lets this process hold a few thousand sockets (CI's default soft limit may be 1024).
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < 16_384 {
            limit.rlim_cur = limit.rlim_max.min(16_384);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client speaking the edge's JSON frames (one or more per message, one per line).
struct Ws {
    socket: Socket,
    buffered: std::collections::VecDeque<Value>,
}

impl Ws {
    async fn connect(edge: SocketAddr, token: &str) -> Self {
        let url = format!("ws://{edge}/ws?token={token}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match tokio_tungstenite::connect_async(&url).await {
                Ok((socket, _)) => {
                    return Self {
                        socket,
                        buffered: Default::default(),
                    }
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot connect to {edge}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn send(&mut self, frame: Value) {
        self.socket
            .send(Message::Text(frame.to_string().into()))
            .await
            .expect("send a frame");
    }

    /// The next JSON frame, within `within`.
    async fn next(&mut self, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            if let Some(frame) = self.buffered.pop_front() {
                return frame;
            }
            let message = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no frame within {within:?}"))
                .expect("connection open")
                .expect("a frame");
            if let Message::Text(text) = message {
                for line in text.split('\n') {
                    self.buffered
                        .push_back(serde_json::from_str(line).expect("JSON frame"));
                }
            }
        }
    }

    /// Subscribes and waits for the `subscribed` frame; returns its position.
    async fn subscribe(&mut self, channel: &str, since: Option<&str>) -> String {
        let mut frame = json!({"type": "subscribe", "channel": channel});
        if let Some(since) = since {
            frame["since"] = json!(since);
        }
        self.send(frame).await;
        let answer = self.next(Duration::from_secs(10)).await;
        assert_eq!(answer["type"], "subscribed", "{answer}");
        assert_eq!(answer["channel"], channel);
        answer["position"].as_str().unwrap().to_string()
    }

    /// `n` message frames of `channel`, in order (any other frame fails).
    async fn messages(&mut self, channel: &str, n: usize, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = self.next(left).await;
            assert_eq!(frame["type"], "message", "{frame}");
            assert_eq!(frame["channel"], channel, "{frame}");
            out.push(frame);
        }
        out
    }

    /// Message frames of `channel` as received, up to and including the one whose `data.n`
    /// is `last` (any other frame fails): a skipped or repeated one shows in the result
    /// instead of as a timeout.
    async fn messages_until(&mut self, channel: &str, last: u64, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = self.next(left).await;
            assert_eq!(frame["type"], "message", "{frame}");
            assert_eq!(frame["channel"], channel, "{frame}");
            let n = frame["data"]["n"].as_u64();
            out.push(frame);
            if n == Some(last) {
                return out;
            }
        }
    }
}

async fn publish(producer: &Producer, channel: &str, data: Value) {
    let event = Event::new(
        format!("{channel}-{}", rand_id()),
        "test",
        "notice",
        Subject::new(channel).unwrap(),
        data.to_string(),
    )
    .with_key(channel.to_string());
    producer.publish(event).await.expect("publish acknowledged");
}

fn token_with_secret(user: &str, secret: &[u8]) -> String {
    let claims = Claims {
        sub: user.into(),
        tenant: String::new(),
        channels: Vec::new(),
        exp: u64::MAX / 2,
        locale: None,
        attrs: Value::Null,
    };
    ferry_edge::sign(secret, &claims).unwrap()
}

/// The epoch part of an edge id (`<epoch>-<seq>`).
fn epoch_of(id: &str) -> &str {
    id.rsplit_once('-').expect("an edge id").0
}

/// Starts an edge and waits until it reads its region.
async fn start_edge(config: EdgeConfig) -> Edge {
    let edge = Edge::start(config).await.expect("edge starts");
    ferry_tests::wait_edge_reading(&edge, Duration::from_secs(20)).await;
    edge
}

/// Starts an edge again on its old port, retrying while the port or window is still held.
async fn restart_edge(config: EdgeConfig) -> Edge {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Edge::start(config.clone()).await {
            Ok(edge) => return edge,
            Err(e) => {
                assert!(Instant::now() < deadline, "edge did not restart: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A server-sent events client (reqwest, streaming body).
struct Sse {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
}

impl Sse {
    async fn open(
        http: &reqwest::Client,
        edge: SocketAddr,
        channels: &str,
        token: &str,
        last_event_id: Option<&str>,
    ) -> Self {
        let mut request = http.get(format!(
            "http://{edge}/sse?channels={channels}&token={token}"
        ));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.expect("SSE request");
        assert_eq!(response.status(), 200);
        let mut sse = Self {
            body: Box::pin(response.bytes_stream()),
            buffer: String::new(),
        };
        let (kind, _, _) = sse.next_event(Duration::from_secs(10)).await;
        assert_eq!(kind, "subscribed");
        sse
    }

    /// The next event: (event name, id, data as JSON).
    async fn next_event(&mut self, within: Duration) -> (String, String, Value) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut kind, mut id, mut data) =
                    (String::from("message"), String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        kind = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return (kind, id, serde_json::from_str(&data).expect("JSON data"));
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.next())
                .await
                .unwrap_or_else(|_| panic!("no SSE event within {within:?}"))
                .expect("stream open")
                .expect("a chunk");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// `n` message events: (id, frame).
    async fn messages(&mut self, n: usize, within: Duration) -> Vec<(String, Value)> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n {
            let (kind, id, data) = self
                .next_event(deadline.saturating_duration_since(Instant::now()))
                .await;
            assert_eq!(kind, "message", "{data}");
            out.push((id, data));
        }
        out
    }

    /// Message events up to and including the one whose `data.n` is `last`: (id, frame).
    async fn messages_until(&mut self, last: u64, within: Duration) -> Vec<(String, Value)> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        loop {
            let (kind, id, data) = self
                .next_event(deadline.saturating_duration_since(Instant::now()))
                .await;
            assert_eq!(kind, "message", "{data}");
            let n = data["data"]["n"].as_u64();
            out.push((id, data));
            if n == Some(last) {
                return out;
            }
        }
    }
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Publishes `{"n": n}` to `channel` for each `n` of `range`, queued in that order under one
/// key (so the region holds them in that order), and waits until all are acknowledged.
async fn publish_many(producer: &Producer, channel: &str, range: std::ops::Range<u64>) {
    let mut acks = Vec::new();
    for n in range {
        let event = Event::new(
            format!("{channel}-{}", rand_id()),
            "test",
            "notice",
            Subject::new(channel).unwrap(),
            json!({"n": n}).to_string(),
        )
        .with_key(channel.to_string());
        acks.push(producer.send(event).await.expect("queued"));
    }
    for ack in acks {
        ack.await.expect("publish acknowledged");
    }
}

/// The sequence numbers of edge ids (`<epoch>-<seq>`), in the order given.
fn seqs<'a>(ids: impl IntoIterator<Item = &'a str>) -> Vec<u64> {
    ids.into_iter()
        .map(|id| {
            id.rsplit_once('-')
                .expect("an edge id")
                .1
                .parse()
                .expect("a sequence")
        })
        .collect()
}

fn ns(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .map(|f| f["data"]["n"].as_u64().expect("data.n"))
        .collect()
}

async fn start_region() -> (TestRegion, Client, Producer) {
    ferry_tests::init_logging();
    let region = TestRegion::start(3).await;
    let client = region.client();
    let mut topic = ferry_proto::TopicConfig::new(TOPIC, 4);
    topic.class = ferry_proto::EventClass::Notification;
    client
        .ensure_topic(&topic, Duration::from_secs(30))
        .await
        .expect("topic");
    let producer = client
        .producer(TOPIC, ProducerOptions::default())
        .await
        .expect("producer");
    (region, client, producer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn edge_fans_out_resumes_and_keeps_its_window_across_a_restart() {
    raise_open_file_limit();
    let (region, _client, producer) = start_region().await;
    let data = region.dir.path().join("edge");
    let config = edge_config(&region, &data, "127.0.0.1:0".parse().unwrap(), 200);
    let edge = start_edge(config.clone()).await;
    let addr = edge.http_addr();

    // Tokens: none or a bad one is 401; another user's channel is refused.
    let http = reqwest::Client::new();
    for url in [
        format!("http://{addr}/sse?channels=user.1"),
        format!("http://{addr}/sse?channels=user.1&token=not-a-token"),
        format!(
            "http://{addr}/sse?channels=user.1&token={}",
            token_with_secret("1", b"another-secret-0123456789")
        ),
    ] {
        let status = http.get(&url).send().await.unwrap().status();
        assert_eq!(status, 401, "{url}");
    }
    let ws_without = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await;
    match ws_without {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("a WebSocket without a token was not refused with 401: {other:?}"),
    }
    let status = http
        .get(format!(
            "http://{addr}/sse?channels=user.2&token={}",
            token("1", &["user.2"])
        ))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 403, "user 1 reading user.2 over SSE");
    let mut intruder = Ws::connect(addr, &token("1", &["user.2", "broadcast"])).await;
    intruder
        .send(json!({"type": "subscribe", "channel": "user.2"}))
        .await;
    let refused = intruder.next(Duration::from_secs(5)).await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "forbidden", "{refused}");
    drop(intruder);

    // 1,000 clients, each on its own user channel and the broadcast channel.
    const CLIENTS: usize = 1000;
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<usize>(CLIENTS);
    let (got_tx, mut got_rx) = tokio::sync::mpsc::channel::<(usize, &'static str, Value)>(4096);
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let (ready_tx, got_tx) = (ready_tx.clone(), got_tx.clone());
        clients.push(tokio::spawn(async move {
            let user = format!("u{i}");
            let mut ws = Ws::connect(addr, &token(&user, &["broadcast"])).await;
            ws.subscribe(&format!("user.{user}"), None).await;
            ws.subscribe("broadcast", None).await;
            ready_tx.send(i).await.unwrap();
            loop {
                let frame = ws.next(Duration::from_secs(120)).await;
                let kind = if frame["channel"] == "broadcast" {
                    "broadcast"
                } else {
                    "own"
                };
                if got_tx.send((i, kind, frame)).await.is_err() {
                    return;
                }
            }
        }));
    }
    drop(got_tx);
    for _ in 0..CLIENTS {
        tokio::time::timeout(Duration::from_secs(60), ready_rx.recv())
            .await
            .expect("every client subscribed within 60 s");
    }
    let each: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let producer = &producer;
            async move { publish(producer, &format!("user.u{i}"), json!({"for": i})).await }
        })
        .collect();
    futures::future::join_all(each).await;
    publish(&producer, "broadcast", json!({"all": true})).await;
    let mut own: HashMap<usize, Vec<Value>> = HashMap::new();
    let mut broadcast: HashMap<usize, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while own.len() < CLIENTS || broadcast.len() < CLIENTS {
        let (i, kind, frame) = tokio::time::timeout_at(deadline, got_rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "in 60 s {} clients got their notification and {} the broadcast",
                    own.len(),
                    broadcast.len()
                )
            })
            .expect("clients running");
        assert_eq!(frame["type"], "message", "client {i}: {frame}");
        match kind {
            "own" => {
                assert_eq!(frame["channel"], format!("user.u{i}"));
                assert_eq!(frame["data"]["for"], i, "client {i} got another's: {frame}");
                own.entry(i).or_default().push(frame);
            }
            _ => *broadcast.entry(i).or_default() += 1,
        }
    }
    // Nothing more arrives: each got its notification and the broadcast once.
    let settle = Instant::now() + Duration::from_millis(500);
    if let Ok(Some((i, kind, frame))) = tokio::time::timeout_at(settle, got_rx.recv()).await {
        panic!("client {i} got a second {kind} frame: {frame}");
    }
    assert!(own.values().all(|v| v.len() == 1));
    assert!(broadcast.values().all(|n| *n == 1));
    for client in clients {
        client.abort();
    }

    // WebSocket resume: a client leaves, misses 100, comes back with its last id.
    let mut alice = Ws::connect(addr, &token("alice", &[])).await;
    alice.subscribe("user.alice", None).await;
    publish(&producer, "user.alice", json!({"n": 0})).await;
    let seen = alice
        .messages("user.alice", 1, Duration::from_secs(10))
        .await;
    let last_id = seen[0]["id"].as_str().unwrap().to_string();
    drop(alice);
    publish_many(&producer, "user.alice", 1..101).await;
    let mut witness = Ws::connect(addr, &token("alice", &[])).await;
    witness.subscribe("user.alice", Some(&last_id)).await;
    let missed = witness
        .messages_until("user.alice", 100, Duration::from_secs(20))
        .await;
    // Exactly what was missed, as received: in publish order, none skipped or repeated.
    assert_eq!(
        ns(&missed),
        (1..101).collect::<Vec<_>>(),
        "the resumed WebSocket stream, as received"
    );
    let ids: Vec<String> = missed
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_string())
        .collect();
    let last_seq = seqs([last_id.as_str()])[0];
    assert_eq!(
        seqs(ids.iter().map(String::as_str)),
        (last_seq + 1..=last_seq + 100).collect::<Vec<_>>(),
        "the resumed ids follow the last one seen"
    );
    publish(&producer, "user.alice", json!({"n": 101})).await;
    let next = witness
        .messages("user.alice", 1, Duration::from_secs(10))
        .await;
    assert_eq!(ns(&next), vec![101], "exactly the 100 missed, then live");
    drop(witness);

    // SSE resume with Last-Event-ID.
    let mut sse = Sse::open(&http, addr, "user.bob", &token("bob", &[]), None).await;
    publish(&producer, "user.bob", json!({"n": 0})).await;
    let first = sse.messages(1, Duration::from_secs(10)).await;
    let sse_last = first[0].0.clone();
    drop(sse);
    publish_many(&producer, "user.bob", 1..101).await;
    let mut sse = Sse::open(&http, addr, "user.bob", &token("bob", &[]), Some(&sse_last)).await;
    let missed = sse.messages_until(100, Duration::from_secs(20)).await;
    let got: Vec<u64> = missed
        .iter()
        .map(|(_, v)| v["data"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(
        got,
        (1..101).collect::<Vec<_>>(),
        "the resumed SSE stream, as received"
    );
    let sse_last_seq = seqs([sse_last.as_str()])[0];
    assert_eq!(
        seqs(missed.iter().map(|(id, _)| id.as_str())),
        (sse_last_seq + 1..=sse_last_seq + 100).collect::<Vec<_>>(),
        "the resumed SSE ids follow Last-Event-ID"
    );
    publish(&producer, "user.bob", json!({"n": 101})).await;
    let next = sse.messages(1, Duration::from_secs(10)).await;
    assert_eq!(next[0].1["data"]["n"], 101);
    drop(sse);

    // The window survives an edge restart, and what was published while the edge was down
    // is read from the region afterwards.
    edge.shutdown().await;
    publish_many(&producer, "user.alice", 102..112).await;
    let mut config = config;
    config.http = addr;
    let edge = restart_edge(config.clone()).await;
    let mut again = Ws::connect(addr, &token("alice", &[])).await;
    again.subscribe("user.alice", Some(&ids[49])).await;
    let replayed = again
        .messages_until("user.alice", 111, Duration::from_secs(30))
        .await;
    assert_eq!(
        ns(&replayed),
        (51..112).collect::<Vec<_>>(),
        "after a clean restart: the rest of the window, then what came while down, in order"
    );
    let replayed_ids: Vec<&str> = replayed[..50]
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        replayed_ids,
        ids[50..].iter().map(String::as_str).collect::<Vec<_>>()
    );
    let before_kill = replayed.last().unwrap()["id"].as_str().unwrap().to_string();
    drop(again);

    // An abrupt stop (tasks aborted, window not closed cleanly) right after notifications were
    // acknowledged by the region, whether or not the edge had read them yet; more arrive while
    // it is down. A client resuming with an id of the old epoch is told (a gap frame), then
    // gets the whole retained window of its channel: every notification once, in publish
    // order, and then live ones.
    publish_many(&producer, "user.alice", 112..122).await;
    edge.kill().await;
    publish_many(&producer, "user.alice", 122..132).await;
    let edge = restart_edge(config.clone()).await;
    let mut resumed = Ws::connect(addr, &token("alice", &[])).await;
    resumed.subscribe("user.alice", Some(&before_kill)).await;
    let gap = resumed.next(Duration::from_secs(10)).await;
    assert_eq!(gap["type"], "gap", "after a crash, a resume is told: {gap}");
    assert_eq!(gap["requested"], before_kill.as_str(), "{gap}");
    let epoch = epoch_of(gap["first_available"].as_str().unwrap()).to_string();
    assert_ne!(epoch, epoch_of(&ids[0]), "a crash starts a new epoch");
    let window = resumed
        .messages_until("user.alice", 131, Duration::from_secs(30))
        .await;
    assert_eq!(
        ns(&window),
        (0..132).collect::<Vec<_>>(),
        "the window after a crash, as received"
    );
    publish(&producer, "user.alice", json!({"n": 132})).await;
    let live = resumed
        .messages("user.alice", 1, Duration::from_secs(10))
        .await;
    assert_eq!(ns(&live), vec![132], "exactly the window, then live");
    drop(resumed);

    // A position older than the window (200 per channel) gets the gap frame.
    let mut watcher = Ws::connect(addr, &token("dave", &["news.>"])).await;
    watcher.subscribe("news.flood", None).await;
    publish_many(&producer, "news.flood", 0..250).await;
    // Once the watcher has all 250, the edge has retained them.
    watcher
        .messages("news.flood", 250, Duration::from_secs(30))
        .await;
    let mut late = Ws::connect(addr, &token("carol", &["news.>"])).await;
    late.send(json!({"type": "subscribe", "channel": "news.flood", "since": format!("{epoch}-1")}))
        .await;
    let subscribed = late.next(Duration::from_secs(10)).await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    let gap = late.next(Duration::from_secs(10)).await;
    assert_eq!(gap["type"], "gap", "{gap}");
    assert_eq!(gap["first_available"], format!("{epoch}-51"));
    let rest = late
        .messages("news.flood", 200, Duration::from_secs(20))
        .await;
    let rest_ids: Vec<String> = rest
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        rest_ids,
        (51..=250)
            .map(|seq| format!("{epoch}-{seq}"))
            .collect::<Vec<_>>()
    );
    // An id from another edge is foreign: a gap from the first available.
    let mut foreign = Ws::connect(addr, &token("carol", &["news.>"])).await;
    foreign
        .send(json!({"type": "subscribe", "channel": "news.flood", "since": "00000000-3"}))
        .await;
    assert_eq!(
        foreign.next(Duration::from_secs(10)).await["type"],
        "subscribed"
    );
    assert_eq!(foreign.next(Duration::from_secs(10)).await["type"], "gap");
    // A position beyond anything handed out is not trusted either: gap, then the window.
    let mut ahead = Ws::connect(addr, &token("carol", &["news.>"])).await;
    ahead
        .send(json!({"type": "subscribe", "channel": "news.flood", "since": format!("{epoch}-999999")}))
        .await;
    assert_eq!(
        ahead.next(Duration::from_secs(10)).await["type"],
        "subscribed"
    );
    assert_eq!(ahead.next(Duration::from_secs(10)).await["type"], "gap");
    let first = ahead
        .messages("news.flood", 1, Duration::from_secs(10))
        .await;
    assert_eq!(first[0]["id"], format!("{epoch}-51"));
    drop(ahead);
    // SSE: the token is checked first; a channel listed twice is refused.
    let status = http
        .get(format!("http://{addr}/sse"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 401);
    let status = http
        .get(format!(
            "http://{addr}/sse?channels=user.carol,user.carol&token={}",
            token("carol", &[])
        ))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 400);

    let series = |name: &str, labels: &str| format!("{name}{{edge=\"edge-test\"{labels}}}");
    let ws = series("ferry_edge_connections", ",transport=\"ws\"");
    // The dropped connection's slot is freed once the edge reads its end.
    ferry_tests::wait_until(
        "the edge counts the three WebSocket connections left",
        Duration::from_secs(20),
        || async { metric(&http, addr, &ws).await == 3 },
    )
    .await;
    let gaps = series("ferry_edge_gap_frames_total", "");
    assert!(
        metric(&http, addr, &gaps).await >= 2,
        "the gap frames above are counted"
    );
    edge.shutdown().await;
}

/// Connects a WebSocket whose socket has a tiny receive buffer, so that a client that stops
/// reading blocks the edge's writes to it after a few kilobytes.
async fn connect_small_buffer(edge: SocketAddr, token: &str) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(edge).await.expect("connect");
    let url = format!("ws://{edge}/ws?token={token}");
    let (socket, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
        .await
        .expect("WebSocket handshake");
    Ws {
        socket,
        buffered: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_stops_reading_lags_alone_and_catches_up_in_order() {
    let (region, _client, producer) = start_region().await;
    let data = region.dir.path().join("edge");
    let config = edge_config(&region, &data, "127.0.0.1:0".parse().unwrap(), 100_000);
    let edge = start_edge(config).await;
    let addr = edge.http_addr();

    const FAST: usize = 10;
    const EVENTS: u64 = 3000;
    let mut slow = connect_small_buffer(addr, &token("slow", &["broadcast"])).await;
    slow.subscribe("broadcast", None).await;
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let mut fast = Vec::new();
    for i in 0..FAST {
        let mut ws = Ws::connect(addr, &token(&format!("f{i}"), &["broadcast"])).await;
        ws.subscribe("broadcast", None).await;
        let got_tx = got_tx.clone();
        fast.push(tokio::spawn(async move {
            // A burst larger than the queue can make even a reading client lag; it then
            // catches up from the window, so it still sees every notification once, in order.
            let mut seqs = Vec::new();
            while seqs.len() < EVENTS as usize {
                let frame = ws.next(Duration::from_secs(60)).await;
                if frame["type"] == "lag" {
                    continue;
                }
                assert_eq!(frame["type"], "message", "{frame}");
                let id = frame["id"].as_str().unwrap();
                seqs.push(id.rsplit_once('-').unwrap().1.parse::<u64>().unwrap());
                let n = frame["data"]["n"].as_u64().unwrap();
                got_tx.send((n, Instant::now())).unwrap();
            }
            assert_eq!(seqs, (1..=EVENTS).collect::<Vec<_>>());
        }));
    }
    drop(got_tx);

    // Publish 1 KiB notifications, 50 at a time, noting when each was acknowledged.
    let pad = "x".repeat(1000);
    let mut acked = HashMap::new();
    for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(50) {
        let sends = chunk.iter().map(|n| {
            let (producer, pad) = (&producer, &pad);
            async move {
                publish(producer, "broadcast", json!({"n": n, "pad": pad})).await;
                (*n, Instant::now())
            }
        });
        acked.extend(futures::future::join_all(sends).await);
    }
    // Every fast client gets every notification while the slow one has read nothing yet:
    // none of them is held up by it (the worst delay is printed, not judged: speed is the
    // bench's to measure).
    let mut received = 0;
    let mut worst = Duration::ZERO;
    while let Some((n, at)) = tokio::time::timeout(Duration::from_secs(60), got_rx.recv())
        .await
        .expect("fast clients keep receiving")
    {
        received += 1;
        worst = worst.max(at.saturating_duration_since(acked[&n]));
    }
    eprintln!("worst publish-to-delivery for a fast client: {worst:?}");
    assert_eq!(received, FAST as u64 * EVENTS);
    for task in fast {
        task.await.unwrap();
    }

    // The slow client now reads: notifications in order, a lag frame where its queue
    // overflowed, then the rest replayed from the window, each exactly once.
    let mut seqs = Vec::new();
    let mut lags = Vec::new();
    while seqs.len() < EVENTS as usize {
        let frame = slow.next(Duration::from_secs(30)).await;
        match frame["type"].as_str() {
            Some("message") => {
                let id = frame["id"].as_str().unwrap();
                seqs.push(id.rsplit_once('-').unwrap().1.parse::<u64>().unwrap());
            }
            Some("lag") => {
                assert!(frame["missed"].as_u64().unwrap() > 0, "{frame}");
                lags.push(frame);
            }
            _ => panic!("unexpected frame for the slow client: {frame}"),
        }
    }
    assert!(!lags.is_empty(), "the slow client never got a lag frame");
    assert_eq!(seqs, (1..=EVENTS).collect::<Vec<_>>());
    edge.shutdown().await;
}

/// Reads one sample of the edge's `/metrics`.
async fn metric(http: &reqwest::Client, edge: SocketAddr, series: &str) -> u64 {
    let text = http
        .get(format!("http://{edge}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_throttled_users_counts_add_up() {
    let (region, _client, producer) = start_region().await;
    let data = region.dir.path().join("edge");
    let mut config = edge_config(&region, &data, "127.0.0.1:0".parse().unwrap(), 1000);
    config.throttle = ThrottleConfig {
        rate_per_sec: 5.0,
        burst: 5,
        policy: Policy::Digest,
        max_pending: 1000,
        digest_items: 10,
    };
    let edge = start_edge(config).await;
    let addr = edge.http_addr();
    let http = reqwest::Client::new();
    let mut ws = Ws::connect(addr, &token("t", &[])).await;
    ws.subscribe("user.t", None).await;
    const PUBLISHED: u64 = 100;
    publish_many(&producer, "user.t", 0..PUBLISHED).await;
    // Individual notifications and digests until every published one is accounted for.
    let (mut single, mut folded, mut digests) = (0, 0, 0);
    while single + folded < PUBLISHED {
        let frame = ws
            .messages("user.t", 1, Duration::from_secs(20))
            .await
            .remove(0);
        if frame["event_type"] == "ferry.digest" {
            digests += 1;
            folded += frame["data"]["count"].as_u64().unwrap();
            assert!(frame["data"]["items"].as_array().unwrap().len() <= 10);
        } else {
            single += 1;
        }
    }
    assert!(single >= 5, "the burst passes: {single}");
    assert!(digests >= 1, "the rest was coalesced");
    let prefix = "ferry_edge_throttle_total{edge=\"edge-test\",outcome=";
    let published = metric(&http, addr, &format!("{prefix}\"published\"}}")).await;
    let delivered = metric(&http, addr, &format!("{prefix}\"delivered\"}}")).await;
    let coalesced = metric(&http, addr, &format!("{prefix}\"coalesced\"}}")).await;
    let dropped = metric(&http, addr, &format!("{prefix}\"dropped\"}}")).await;
    let held = metric(&http, addr, "ferry_edge_throttle_held{edge=\"edge-test\"}").await;
    assert_eq!(published, PUBLISHED);
    assert_eq!((delivered, coalesced, held), (single, folded, 0));
    assert_eq!(delivered + coalesced + dropped, published);
    edge.shutdown().await;
}

/// What the test's webhook receiver saw: (attempt header, signature header, body).
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, String, bytes::Bytes)>>>;

/// A local HTTP server that fails the first two attempts of every notification.
async fn webhook_receiver() -> (SocketAddr, Seen) {
    use axum::http::{HeaderMap, StatusCode};
    let seen: Seen = Default::default();
    let state = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: bytes::Bytes| {
            let seen = state.clone();
            async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string()
                };
                let attempt = header("x-ferry-attempt");
                seen.lock()
                    .unwrap()
                    .push((attempt.clone(), header("x-ferry-signature"), body));
                if attempt == "1" || attempt == "2" {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

/// The webhooks `token`'s user has registered.
async fn list_webhooks(http: &reqwest::Client, hooks: &str, token: &str) -> Vec<Value> {
    http.get(hooks)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Checks `t=<secs>,v1=<hex>` against HMAC-SHA256 of "<secs>.<body>" (independently of the
/// edge's code).
fn signature_valid(secret: &str, header: &str, body: &[u8]) -> bool {
    let Some((t, v1)) = header
        .strip_prefix("t=")
        .and_then(|rest| rest.split_once(",v1="))
    else {
        return false;
    };
    let Some(tag) = (0..v1.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(v1.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let signed = [t.as_bytes(), b".", body].concat();
    ring::hmac::verify(&key, &signed, &tag).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_webhook_that_fails_twice_gets_the_notification_on_the_third_attempt_signed() {
    let (region, _client, producer) = start_region().await;
    let data = region.dir.path().join("edge");
    let mut config = edge_config(&region, &data, "127.0.0.1:0".parse().unwrap(), 1000);
    config.webhooks.backoff_ms = 50;
    // The receiver is on loopback.
    config.webhooks.allow_private_targets = true;
    config.webhooks.max_backoff_ms = 200;
    let edge = start_edge(config).await;
    let addr = edge.http_addr();
    let (receiver, seen) = webhook_receiver().await;
    let http = reqwest::Client::new();
    let hooks = format!("http://{addr}/webhooks");
    let wendy = token("wendy", &[]);

    // Bad registrations change nothing.
    let status = |r: reqwest::Response| r.status().as_u16();
    let body = json!({"url": format!("http://{receiver}/hook"), "channels": ["user.wendy"]});
    assert_eq!(
        status(http.post(&hooks).json(&body).send().await.unwrap()),
        401
    );
    let bad = [
        (json!({"url": "ftp://x", "channels": ["user.wendy"]}), 400),
        (json!({"url": format!("http://{receiver}/hook")}), 400),
        (
            json!({"url": format!("http://{receiver}/hook"), "channels": ["user.other"]}),
            403,
        ),
    ];
    for (request, want) in bad {
        let answer = http
            .post(&hooks)
            .bearer_auth(&wendy)
            .json(&request)
            .send()
            .await
            .unwrap();
        assert_eq!(status(answer), want, "{request}");
    }
    let malformed = http
        .post(&hooks)
        .bearer_auth(&wendy)
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(status(malformed), 400);
    let listed = list_webhooks(&http, &hooks, &wendy).await;
    assert!(listed.is_empty(), "{listed:?}");

    let created = http
        .post(&hooks)
        .bearer_auth(&wendy)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.unwrap();
    let secret = created["secret"].as_str().unwrap().to_string();
    publish(&producer, "user.wendy", json!({"hello": "wendy"})).await;

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempts = seen.lock().unwrap().clone();
        if attempts.len() >= 3 {
            let attempt: Vec<&str> = attempts.iter().map(|(a, _, _)| a.as_str()).collect();
            assert_eq!(attempt, vec!["1", "2", "3"]);
            let (_, signature, body) = &attempts[2];
            assert!(
                signature_valid(&secret, signature, body),
                "signature {signature} does not verify"
            );
            assert!(!signature_valid("wrong-secret", signature, body));
            let frame: Value = serde_json::from_slice(body).unwrap();
            assert_eq!(frame["channel"], "user.wendy");
            assert_eq!(frame["data"]["hello"], "wendy");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the webhook got {} attempts in 20 s",
            attempts.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The receiver records the third attempt before it answers, and the edge counts the
    // delivery once the answer is in: wait for the count (never more than one).
    let delivered_series = "ferry_edge_webhook_total{edge=\"edge-test\",outcome=\"delivered\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let delivered = metric(&http, addr, delivered_series).await;
        assert!(delivered <= 1, "delivered counted {delivered} times");
        if delivered == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the delivery was not counted within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let id = created["id"].as_str().unwrap();
    let listed = list_webhooks(&http, &hooks, &wendy).await;
    assert_eq!(listed.len(), 1);
    assert!(
        listed[0].get("secret").is_none(),
        "the secret is shown only once"
    );
    let other = http
        .delete(format!("{hooks}/{id}"))
        .bearer_auth(token("mallory", &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404, "another user cannot remove it");
    let removed = http
        .delete(format!("{hooks}/{id}"))
        .bearer_auth(&wendy)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 204);
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edge_started_while_its_region_is_down_waits_for_it_instead_of_exiting() {
    raise_open_file_limit();
    let (mut region, _client, _producer) = start_region().await;
    let data = region.dir.path().join("edge");
    let config = edge_config(&region, &data, "127.0.0.1:0".parse().unwrap(), 200);
    let ids = region.live_ids();
    for id in &ids {
        region.stop(*id).await;
    }
    // Its first attempts find no node: it must keep trying, not fail. A probe started after
    // it makes the edge's first call (making sure of its topic) twice and sees it fail twice,
    // so the edge has met the down region at least once before it comes back.
    let starting = tokio::spawn(Edge::start(config.clone()));
    let probe = Client::new(ClientOptions::new(
        config.servers.clone(),
        config.tls.load().unwrap(),
    ))
    .unwrap();
    let mut topic = ferry_proto::TopicConfig::new(TOPIC, 4);
    topic.class = ferry_proto::EventClass::Notification;
    for _ in 0..2 {
        assert!(
            probe
                .ensure_topic(&topic, Duration::from_secs(1))
                .await
                .is_err(),
            "the region answered while stopped"
        );
    }
    assert!(
        !starting.is_finished(),
        "the edge gave up on its region: {:?}",
        starting.await.map(|r| r.err())
    );
    for id in &ids {
        region.restart(*id).await;
    }
    let edge = tokio::time::timeout(Duration::from_secs(90), starting)
        .await
        .expect("the edge started within 90 s of its region coming back")
        .unwrap()
        .expect("an unreachable region is waited for, not an error");
    ferry_tests::wait_edge_reading(&edge, Duration::from_secs(30)).await;
    edge.shutdown().await;
}

/// A channel keyed by its name that moves from its partition to that partition's child when
/// `TOPIC` (created with 4 partitions) grows from `from` to `to` partitions.
fn channel_moving(from: u32, to: u32) -> String {
    (0..)
        .map(|i| format!("news.moving{i}"))
        .find(|c| {
            let h = ferry_proto::key_hash(c.as_bytes());
            ferry_proto::linear_partition(h, 4, to) != ferry_proto::linear_partition(h, 4, from)
        })
        .expect("a channel")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_channel_keeps_its_order_across_a_split_made_while_the_edge_was_down_and_while_it_runs() {
    let (region, client, producer) = start_region().await;
    let data = region.dir.path().join("edge");
    let mut config = edge_config(&region, &data, "127.0.0.1:0".parse().unwrap(), 5_000);
    // Bursts of 500 stay queued for a slow reader (a loaded machine) rather than lag.
    config.limits.send_queue = 10_000;
    let edge = start_edge(config.clone()).await;
    let addr = edge.http_addr();
    let channel = channel_moving(4, 6);
    let mut ws = Ws::connect(addr, &token("dave", &["news.>"])).await;
    ws.subscribe(&channel, None).await;
    publish_many(&producer, &channel, 0..20).await;
    let first = ws
        .messages_until(&channel, 19, Duration::from_secs(20))
        .await;
    assert_eq!(ns(&first), (0..20).collect::<Vec<_>>());
    let last_id = first.last().unwrap()["id"].as_str().unwrap().to_string();
    drop(ws);

    // Down: a backlog in the parent, the split, then the channel's next notifications in
    // the child. The restarted edge reads the child only after the parent up to the seal.
    edge.shutdown().await;
    publish_many(&producer, &channel, 20..520).await;
    let layout = ferry_tests::grow_topic(&client, TOPIC, 6).await;
    let child = layout.splits.iter().map(|s| s.child).collect::<Vec<_>>();
    assert_eq!(child, vec![4, 5]);
    let producer = client
        .producer(TOPIC, ProducerOptions::default())
        .await
        .expect("producer");
    publish_many(&producer, &channel, 520..570).await;
    config.http = addr;
    let edge = restart_edge(config.clone()).await;
    let mut ws = Ws::connect(addr, &token("dave", &["news.>"])).await;
    ws.subscribe(&channel, Some(&last_id)).await;
    let resumed = ws
        .messages_until(&channel, 569, Duration::from_secs(30))
        .await;
    assert_eq!(
        ns(&resumed),
        (20..570).collect::<Vec<_>>(),
        "across the split made while the edge was down, as received"
    );

    // Up: the topic grows again while the edge reads (a parent's backlog is written first,
    // then the split, then the child's), and the edge finds the new partitions itself.
    let channel = channel_moving(6, 8);
    ws.subscribe(&channel, None).await;
    publish_many(&producer, &channel, 570..1070).await;
    let layout = ferry_tests::grow_topic(&client, TOPIC, 8).await;
    assert_eq!(layout.splits.len(), 4);
    let producer = client
        .producer(TOPIC, ProducerOptions::default())
        .await
        .expect("producer");
    publish_many(&producer, &channel, 1070..1120).await;
    let live = ws
        .messages_until(&channel, 1119, Duration::from_secs(30))
        .await;
    assert_eq!(
        ns(&live),
        (570..1120).collect::<Vec<_>>(),
        "across the split made while the edge ran, as received"
    );
    edge.shutdown().await;
}
