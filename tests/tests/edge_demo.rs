//! The edge's demo page in a real browser: headless Chromium (Debian's `chromium`, which the
//! test command installs) loads `/demo`, and a notification published afterwards shows up on
//! the page. The test drives the browser over the DevTools protocol (a WebSocket) to read the
//! page's text.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_client::ProducerOptions;
use ferry_edge::{Claims, Edge, EdgeConfig};
use ferry_net::tls::TlsPaths;
use ferry_proto::{Event, Subject};
use ferry_tests::TestRegion;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "demo-page-test-secret-0123";

fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("FERRY_CHROMIUM") {
        return path.into();
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let path = dir.join(name);
            if path.is_file() {
                return path;
            }
        }
    }
    panic!(
        "no chromium found: the README test command (tests/run) installs Debian's chromium; \
         or set FERRY_CHROMIUM"
    );
}

/// Waits for Chromium to write the DevTools port into its profile folder.
async fn devtools_port(profile: &Path) -> u16 {
    let file = profile.join("DevToolsActivePort");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            if let Some(port) = text.lines().next().and_then(|l| l.trim().parse().ok()) {
                return port;
            }
        }
        assert!(
            Instant::now() < deadline,
            "chromium did not open DevTools in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A DevTools session on one page.
struct Page {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Page {
    async fn evaluate(&mut self, expression: &str) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let call = json!({"id": id, "method": "Runtime.evaluate",
                          "params": {"expression": expression, "returnByValue": true}});
        self.socket
            .send(Message::Text(call.to_string().into()))
            .await
            .unwrap();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), self.socket.next())
                .await
                .expect("DevTools answers")
                .expect("DevTools open")
                .expect("a DevTools frame");
            if let Message::Text(text) = message {
                let answer: Value = serde_json::from_str(&text).unwrap();
                if answer["id"] == id {
                    return answer["result"]["result"]["value"].clone();
                }
            }
        }
    }

    /// Evaluates until the expression's string value contains `needle`.
    async fn wait_for_text(&mut self, expression: &str, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let value = self.evaluate(expression).await;
            if value.as_str().is_some_and(|v| v.contains(needle)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{expression} did not show {needle:?} within {within:?}; it shows {value}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_shows_a_notification_published_after_it_loaded() {
    ferry_tests::init_logging();
    let browser = chromium();
    let region = TestRegion::start(3).await;
    let certs = region.certs();
    let config = EdgeConfig::new(
        "edge-demo",
        region.live_addrs(),
        TlsPaths {
            ca: certs.join("ca.pem"),
            cert: certs.join("client-test-client.pem"),
            key: certs.join("client-test-client.key"),
        },
        "127.0.0.1:0".parse().unwrap(),
        region.dir.path().join("edge"),
        SECRET,
    );
    let edge = Edge::start(config).await.expect("edge starts");
    ferry_tests::wait_edge_reading(&edge, Duration::from_secs(20)).await;
    let token = ferry_edge::sign(
        SECRET.as_bytes(),
        &Claims {
            sub: "viewer".into(),
            tenant: String::new(),
            channels: vec![],
            exp: u64::MAX / 2,
            locale: None,
            attrs: Value::Null,
        },
    )
    .unwrap();
    let url = format!(
        "http://{}/demo?channels=user.viewer&token={token}",
        edge.http_addr()
    );
    let profile = tempfile::tempdir().unwrap();
    let _chromium = tokio::process::Command::new(&browser)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(&url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", browser.display()));
    let port = devtools_port(profile.path()).await;

    // Find the page's DevTools WebSocket.
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let debugger = loop {
        let pages: Vec<Value> = match http
            .get(format!("http://127.0.0.1:{port}/json/list"))
            .send()
            .await
        {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let found = pages.iter().find_map(|p| {
            (p["type"] == "page" && p["url"].as_str()?.contains("/demo"))
                .then(|| p["webSocketDebuggerUrl"].as_str().map(str::to_string))
                .flatten()
        });
        if let Some(found) = found {
            break found;
        }
        assert!(Instant::now() < deadline, "no demo page in chromium");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (socket, _) = tokio_tungstenite::connect_async(&debugger)
        .await
        .expect("DevTools WebSocket");
    let mut page = Page { socket, next_id: 0 };

    // The page is loaded and its event stream is live before anything is published.
    page.wait_for_text(
        "document.getElementById('status').textContent",
        "live",
        Duration::from_secs(20),
    )
    .await;
    let before = page
        .evaluate("document.getElementById('notifications').children.length")
        .await;
    assert_eq!(before, json!(0));

    let client = region.client();
    let producer = client
        .producer("notifications", ProducerOptions::default())
        .await
        .unwrap();
    let marker = format!("hello from the region {}", rand::random::<u32>());
    let event = Event::new(
        "demo-1",
        "test",
        "greeting",
        Subject::new("user.viewer").unwrap(),
        json!({ "note": marker }).to_string(),
    )
    .with_key("user.viewer");
    producer.publish(event).await.expect("published");
    page.wait_for_text(
        "document.getElementById('notifications').textContent",
        &marker,
        Duration::from_secs(20),
    )
    .await;
    edge.shutdown().await;
}
