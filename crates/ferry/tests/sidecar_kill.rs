//! A real `ferry sidecar` process killed with SIGKILL after answering 2xx loses nothing and
//! duplicates nothing: once restarted it sends what its outbox held (again, when it cannot
//! know the region has it), and the region holds each accepted event exactly once, one key's
//! events in the order they were accepted.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{events_in, free_port, request, wait_for, Region, FERRY};

/// A `ferry sidecar` process, killed when dropped.
struct SidecarProcess(Child);

impl SidecarProcess {
    fn start(region: &Region, config: &std::path::Path) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(region.dir.join("sidecar.log"))
            .unwrap();
        Self(
            Command::new(FERRY)
                .args(["sidecar", "--config"])
                .arg(config)
                .env("FERRY_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    fn kill(&mut self) {
        self.0.kill().unwrap(); // SIGKILL
        self.0.wait().unwrap();
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every publish goes to one partition key, so the region must keep them in accepted order.
fn publish(addr: &str, body: &str) -> u16 {
    request(
        addr,
        "POST",
        "/v1.0/publish/pubsub/orders?metadata.partitionKey=order-1",
        Some(body),
    )
    .expect("the sidecar answers")
    .0
}

/// Publishes `body`, which must be answered 204; records it (as the region will print it).
fn accept(addr: &str, accepted: &mut Vec<String>, body: String) {
    assert_eq!(publish(addr, &body), 204, "{body}");
    accepted.push(body.replace(' ', ""));
}

/// A counter of the sidecar's `/metrics`.
fn metric(addr: &str, name: &str) -> u64 {
    let (_, text) = request(addr, "GET", "/metrics", None).expect("the sidecar answers");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// The first `count` events of `topic` as `ferry ctl tail` prints them: (partition, offset,
/// the CloudEvent's data), each partition in offset order.
fn tail(region: &Region, topic: &str, count: u64) -> Vec<(u32, u64, String)> {
    let mut child = region
        .ferry()
        .args(["ctl", "tail", topic, "--count", &count.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ferry ctl tail did not print {count} events in 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "ferry ctl tail failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            // `{topic}/{p}@{offset} key=.. subject=.. id=.. {CloudEvent JSON}`
            let (place, rest) = line.split_once(' ').expect("a tail line");
            let (p, offset) = place
                .rsplit_once('/')
                .and_then(|(_, po)| po.split_once('@'))
                .expect("partition@offset");
            let json = &rest[rest.find('{').expect("event data")..];
            let ce: serde_json::Value = serde_json::from_str(json).expect("a CloudEvent");
            (
                p.parse().unwrap(),
                offset.parse().unwrap(),
                ce["data"].to_string(),
            )
        })
        .collect()
}

#[test]
fn a_sidecar_killed_after_2xx_delivers_every_accepted_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut region = Region::start(dir.path());
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let config = format!(
        "app_id = \"checkout\"\n{servers}http = \"{addr}\"\ndata_dir = \"{}\"\n\
         {tls}\
         [[topics]]\nname = \"orders\"\npartitions = 2\n",
        region.dir.join("sidecar").display(),
        servers = region.servers_toml(),
        tls = region.tls_toml("edge"),
    );
    let path = region.dir.join("sidecar.toml");
    std::fs::write(&path, config).unwrap();
    let mut sidecar = SidecarProcess::start(&region, &path);
    // Every publish answered 2xx, in the order answered.
    let mut accepted: Vec<String> = Vec::new();
    // The sidecar learns the topic (it creates it) before the region goes away.
    wait_for("the orders topic", Duration::from_secs(60), || {
        events_in(&region, "orders").is_some()
    });
    wait_for(
        "the sidecar to accept a publish",
        Duration::from_secs(60),
        || std::net::TcpStream::connect(&addr).is_ok(),
    );
    accept(&addr, &mut accepted, r#"{"n": -1}"#.to_string());

    // False while the sidecar is not (yet) listening.
    let depth_zero = || {
        request(&addr, "GET", "/v1.0/metadata", None)
            .is_ok_and(|(_, metadata)| metadata.contains("\"depthEvents\":0"))
    };
    wait_for(
        "the first event to leave the outbox",
        Duration::from_secs(30),
        depth_zero,
    );

    // Region down: accepted publishes can only be in the outbox when the sidecar is killed.
    for id in 1..=3 {
        region.kill(id);
    }
    for i in 0..20 {
        accept(&addr, &mut accepted, format!(r#"{{"n": {i}}}"#));
    }
    let (_, metadata) = request(&addr, "GET", "/v1.0/metadata", None).expect("the sidecar answers");
    assert!(metadata.contains("\"depthEvents\":20"), "{metadata}");
    sidecar.kill();
    for id in 1..=3 {
        region.spawn(id);
    }
    let mut sidecar = SidecarProcess::start(&region, &path);
    wait_for(
        "the 21 events in the region",
        Duration::from_secs(90),
        || events_in(&region, "orders") >= Some(21),
    );
    assert_eq!(
        events_in(&region, "orders"),
        Some(21),
        "each accepted event once"
    );

    // Region up: rounds of 50 publishes; once the region holds a round, the sidecar is killed
    // at once. The outbox forgets acknowledged records lazily (written to disk about once a
    // second), so the restarted sidecar may send some again; the region must recognise them.
    // Rounds go on until a restart has resent something (the path under test), at most 8.
    let mut resent = 0;
    for round in 0..8 {
        wait_for(
            "the sidecar to serve again",
            Duration::from_secs(30),
            || std::net::TcpStream::connect(&addr).is_ok(),
        );
        for i in 0..50 {
            accept(
                &addr,
                &mut accepted,
                format!(r#"{{"m": {}}}"#, round * 50 + i),
            );
        }
        let total = accepted.len() as u64;
        wait_for(
            "the round's events in the region",
            Duration::from_secs(60),
            || events_in(&region, "orders") >= Some(total),
        );
        // More than were accepted is a duplicate: say so rather than time out.
        assert_eq!(
            events_in(&region, "orders"),
            Some(total),
            "round {round}: each accepted event once"
        );
        sidecar.kill();
        sidecar = SidecarProcess::start(&region, &path);
        wait_for(
            "the restarted sidecar's outbox to empty",
            Duration::from_secs(60),
            depth_zero,
        );
        // A fresh process: everything it sent was a record the killed one had left.
        resent = metric(&addr, "ferry_sidecar_outbox_sent_total");
        eprintln!("round {round}: the restarted sidecar resent {resent} events");
        if resent > 0 {
            break;
        }
    }
    assert!(
        resent > 0,
        "no restart resent a record: the duplicate path was never exercised"
    );
    drop(sidecar);

    // Every accepted event exactly once (counted), in the order accepted (one key: one
    // partition, offsets in order).
    let held = events_in(&region, "orders").expect("describe");
    let log = tail(&region, "orders", held);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, _, data) in &log {
        *counts.entry(data.as_str()).or_default() += 1;
    }
    let wrong: Vec<_> = counts
        .iter()
        .filter(|(_, n)| **n != 1)
        .map(|(d, n)| format!("{d} x{n}"))
        .collect();
    assert!(wrong.is_empty(), "stored more than once: {wrong:?}");
    let mut in_order: Vec<(u32, u64, &str)> =
        log.iter().map(|(p, o, d)| (*p, *o, d.as_str())).collect();
    in_order.sort_by_key(|(p, o, _)| (*p, *o));
    let partitions: std::collections::BTreeSet<u32> = in_order.iter().map(|e| e.0).collect();
    assert_eq!(
        partitions.len(),
        1,
        "one key, one partition: {partitions:?}"
    );
    let stored: Vec<&str> = in_order.iter().map(|e| e.2).collect();
    assert_eq!(
        stored,
        accepted.iter().map(String::as_str).collect::<Vec<_>>(),
        "the region's events (offset order) against the accepted publishes (answer order); {resent} resent"
    );
}
