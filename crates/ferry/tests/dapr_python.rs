//! A service written with Dapr's own Python SDK (`dapr-ext-fastapi`, the example in
//! deploy/examples/order-processor) runs unchanged behind a real `ferry sidecar` process in
//! front of a three-node region: the sidecar discovers its subscription through
//! `GET /dapr/subscribe`, and every order published to the sidecar reaches the app as a
//! CloudEvent, which the app also records in the sidecar's event store.
//!
//! The Python venv comes from `DAPR_PYTHON_VENV` (tests/run creates it in target/dapr-venv).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, request, Region, FERRY};
use serde_json::Value;

const ORDERS: u64 = 20;

/// The sidecar and the app, killed when dropped, with their logs for failure messages.
struct Children {
    running: Vec<(&'static str, Child, PathBuf)>,
}

impl Children {
    /// Fails the test, with both logs, when a child has ended.
    fn check(&mut self) {
        let mut ended = None;
        for (name, child, _) in &mut self.running {
            if let Ok(Some(status)) = child.try_wait() {
                ended = Some(format!("{name} ended ({status})"));
            }
        }
        if let Some(ended) = ended {
            panic!("{ended}{}", self.logs());
        }
    }

    fn logs(&self) -> String {
        self.running
            .iter()
            .map(|(name, _, log)| format!("\n--- {name} log ---\n{}", tail(log)))
            .collect()
    }

    /// Polls `done` until it holds, failing after `deadline` or when a child ends.
    fn wait_for(&mut self, what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
        let until = Instant::now() + deadline;
        while !done() {
            self.check();
            assert!(
                Instant::now() < until,
                "timed out waiting for {what}{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.running {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The JSON body of a 200 answer, if the server answered one.
fn get_json(addr: &str, path: &str) -> Option<Value> {
    match request(addr, "GET", path, None) {
        Ok((200, body)) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The venv with the example's requirements, or a failure saying how to make one.
fn venv_python() -> PathBuf {
    let Some(venv) = std::env::var_os("DAPR_PYTHON_VENV") else {
        panic!(
            "DAPR_PYTHON_VENV is not set: it names the Python venv with Dapr's SDK that this test \
             runs the example app with. Run tests/run (which creates target/dapr-venv and sets \
             it), or create one: python3 -m venv <dir> && <dir>/bin/pip install -r \
             deploy/examples/order-processor/requirements.txt, then DAPR_PYTHON_VENV=<dir>"
        );
    };
    let python = PathBuf::from(venv).join("bin/python");
    let ok = Command::new(&python)
        .args(["-c", "import dapr.ext.fastapi, uvicorn"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} cannot import dapr.ext.fastapi and uvicorn: install \
         deploy/examples/order-processor/requirements.txt into DAPR_PYTHON_VENV (tests/run does)",
        python.display()
    );
    python
}

#[test]
fn dapr_python_sdk_app_receives_every_order_through_a_sidecar() {
    let python = venv_python();
    let example =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/examples/order-processor");
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(dir.path());
    let (http_port, app_port) = (free_port(), free_port());
    let sidecar = format!("127.0.0.1:{http_port}");
    let app = format!("127.0.0.1:{app_port}");
    let config = format!(
        "app_id = \"order-processor\"\n{servers}http = \"{sidecar}\"\n\
         app_port = {app_port}\ndata_dir = \"{}\"\n\
         {tls}\
         [[topics]]\nname = \"orders\"\npartitions = 2\n\
         [event_store]\npartitions = 2\n\
         [delivery]\ndiscovery_max_ms = 500\n",
        region.dir.join("sidecar").display(),
        servers = region.servers_toml(),
        tls = region.tls_toml("sidecar"),
    );
    let config_path = region.dir.join("sidecar.toml");
    std::fs::write(&config_path, config).unwrap();
    let sidecar_log = region.dir.join("sidecar.log");
    let app_log = region.dir.join("app.log");
    let sidecar_child = Command::new(FERRY)
        .args(["sidecar", "--config"])
        .arg(&config_path)
        .env("FERRY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&sidecar_log).unwrap())
        .spawn()
        .unwrap();
    let mut children = Children {
        running: vec![("sidecar", sidecar_child, sidecar_log)],
    };
    let log = std::fs::File::create(&app_log).unwrap();
    let app_child = Command::new(&python)
        .args(["-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port"])
        .arg(app_port.to_string())
        .current_dir(&example)
        .env("APP_PORT", app_port.to_string())
        .env("DAPR_HTTP_PORT", http_port.to_string())
        .env("PYTHONUNBUFFERED", "1")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    children.running.push(("app", app_child, app_log));

    // What Dapr's SDK answers on GET /dapr/subscribe, and the sidecar taking it up.
    let mut subscribe = Value::Null;
    children.wait_for(
        "the app's GET /dapr/subscribe",
        Duration::from_secs(60),
        || {
            subscribe = get_json(&app, "/dapr/subscribe").unwrap_or(Value::Null);
            !subscribe.is_null()
        },
    );
    assert_eq!(subscribe[0]["pubsubname"], "pubsub", "{subscribe}");
    assert_eq!(subscribe[0]["topic"], "orders", "{subscribe}");
    assert_eq!(
        subscribe[0]["route"], "/events/pubsub/orders",
        "{subscribe}"
    );
    children.wait_for(
        "the sidecar to deliver the app's subscription",
        Duration::from_secs(60),
        || {
            let metadata = get_json(&sidecar, "/v1.0/metadata").unwrap_or(Value::Null);
            metadata["subscriptions"].as_array().is_some_and(|subs| {
                subs.iter().any(|s| {
                    s["topic"] == "orders"
                        && s["type"] == "PROGRAMMATIC"
                        && s["status"]
                            .as_str()
                            .is_some_and(|t| t.starts_with("active"))
                })
            })
        },
    );

    // Orders published as checkout does: JSON, keyed by customer. Until the sidecar has the
    // topic a publish is refused (404 or 503) and nothing is accepted, so it is tried again.
    for id in 1..=ORDERS {
        let body = format!(
            r#"{{"orderId": {id}, "customer": "customer-{}", "items": ["book"], "total": {}}}"#,
            id % 3,
            id * 10
        );
        let path = format!(
            "/v1.0/publish/pubsub/orders?metadata.partitionKey=customer-{}",
            id % 3
        );
        children.wait_for(
            &format!("order {id} accepted"),
            Duration::from_secs(60),
            || {
                let answer = request(&sidecar, "POST", &path, Some(&body));
                let done = matches!(answer, Ok((204, _)));
                if let Ok((status, text)) = &answer {
                    assert!(
                        matches!(status, 204 | 404 | 503),
                        "publishing order {id}: {status} {text}"
                    );
                }
                done
            },
        );
    }

    // Every order arrives once, as the CloudEvent Dapr would have delivered.
    let wanted: BTreeSet<u64> = (1..=ORDERS).collect();
    let mut received = Vec::new();
    children.wait_for(
        &format!("the app to list all {ORDERS} orders"),
        Duration::from_secs(60),
        || {
            if let Some(Value::Array(list)) = get_json(&app, "/received") {
                received = list;
            }
            let ids: BTreeSet<u64> = received
                .iter()
                .filter_map(|e| e["data"]["orderId"].as_u64())
                .collect();
            ids == wanted
        },
    );
    assert_eq!(
        received.len() as u64,
        ORDERS,
        "one CloudEvent id per order: {received:?}"
    );
    for event in &received {
        assert!(
            event["id"].as_str().is_some_and(|id| !id.is_empty()),
            "{event}"
        );
        assert_eq!(event["type"], "com.dapr.event.sent", "{event}");
        assert_eq!(event["source"], "order-processor", "{event}");
        assert_eq!(event["topic"], "orders", "{event}");
        assert_eq!(event["pubsubname"], "pubsub", "{event}");
    }

    // The app recorded each order in the event store through the sidecar.
    let stream = get_json(&sidecar, "/v1.0-ferry/streams/order-7")
        .unwrap_or_else(|| panic!("GET the stream order-7{}", children.logs()));
    assert_eq!(stream["version"], 1, "{stream}");
    assert_eq!(stream["events"][0]["type"], "OrderReceived", "{stream}");
    assert_eq!(
        stream["events"][0]["data"]["order"]["orderId"], 7,
        "{stream}"
    );
}
