//! `ferry bench` cannot rot: each suite runs with a tiny count against three real `ferry node`
//! processes and must deliver everything it counts, with the servers' resources measured;
//! bad options are refused with a message naming them. (Speed is never asserted here.)

use std::process::Output;

mod common;
use common::Region;

fn run(region: &Region, args: &[&str]) -> Output {
    region.ferry().arg("bench").args(args).output().unwrap()
}

/// Runs a suite that must succeed, with its JSON report written to DIR/NAME.json; answers the
/// printed line and the report.
fn run_ok(region: &Region, name: &str, args: &[&str]) -> (String, serde_json::Value) {
    let path = region.dir.join(format!("{name}.json"));
    let mut all = args.to_vec();
    all.extend(["--out", path.to_str().unwrap()]);
    let out = run(region, &all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    (String::from_utf8_lossy(&out.stdout).into_owned(), report)
}

#[test]
fn every_suite_runs_against_a_real_region() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(dir.path());
    let pids: Vec<String> = region.pids().iter().map(u32::to_string).collect();
    let pids = pids.join(",");

    // The region takes a moment to elect leaders; produce waits for them (bounded).
    run_ok(
        &region,
        "warmup",
        &[
            "produce",
            "--count",
            "300",
            "--inflight",
            "32",
            "--partitions",
            "2",
        ],
    );
    let (line, r) = run_ok(
        &region,
        "produce",
        &[
            "produce",
            "--count",
            "300",
            "--inflight",
            "32",
            "--producers",
            "2",
            "--size",
            "512",
            "--pids",
            &pids,
        ],
    );
    assert!(
        line.starts_with("ferry bench produce on ferry: 300 events"),
        "{line}"
    );
    assert_eq!(r["acknowledged"], 300);
    assert_eq!(r["errors"], 0);
    assert_eq!(r["replication"], 3);
    assert!(r["ack_latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    let peak = r["resources"]["peak_rss_mib"].as_array().unwrap();
    assert_eq!(peak.len(), 3, "one figure per node");
    assert!(peak.iter().all(|m| m.as_f64().unwrap() > 1.0));
    assert!(
        r["resources"]["write_amplification_per_replica"]
            .as_f64()
            .unwrap()
            > 0.0
    );

    let (_, r) = run_ok(&region, "e2e", &["e2e", "--count", "300", "--rate", "1000"]);
    assert_eq!(r["delivered"], 300);
    assert!(r["e2e_latency_ms"]["p50"].as_f64().unwrap() > 0.0);

    let (_, r) = run_ok(&region, "consume", &["consume", "--count", "400"]);
    assert_eq!(
        r["delivered"], 400,
        "filled to 400, then read from the start"
    );

    // Bad options: refused, naming the option.
    let out = run(&region, &["e2e", "--count", "10"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rate"));
    let out = run(
        &region,
        &["produce", "--count", "10", "--target", "kafka://x"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--target"));
    let out = run(&region, &["produce", "--count", "10", "--size", "8"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--size"));
}

/// A `ferry edge` process, killed when dropped.
struct EdgeProcess(std::process::Child);

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn fanout_runs_against_a_real_edge_process() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(dir.path());
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let secret = "bench-smoke-secret-0123456789";
    let config = format!(
        "name = \"edge-smoke\"\n{servers}http = \"{http}\"\ndata_dir = \"{}\"\n\
         channels = [\"user.*\", \"news.*\"]\n\
         {tls}\
         [auth]\nsecret = \"{secret}\"\n[throttle]\nrate_per_sec = 0\n",
        region.dir.join("edge").display(),
        servers = region.servers_toml(),
        tls = region.tls_toml("edge"),
    );
    let path = region.dir.join("edge.toml");
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(region.dir.join("edge.log")).unwrap();
    let edge = EdgeProcess(
        std::process::Command::new(common::FERRY)
            .args(["edge", "--config"])
            .arg(&path)
            .env("FERRY_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // The edge serves HTTP once it has found the topic's leaders.
    common::wait_for(
        "the edge's HTTP port",
        std::time::Duration::from_secs(60),
        || std::net::TcpStream::connect(http).is_ok(),
    );
    let (line, r) = run_ok(
        &region,
        "fanout",
        &[
            "fanout",
            "--edge",
            &http.to_string(),
            "--secret",
            secret,
            "--edge-pid",
            &edge.0.id().to_string(),
            "--connections",
            "40",
            "--sources",
            "2",
            "--broadcasts",
            "3",
            "--rate",
            "200",
            "--seconds",
            "1",
        ],
    );
    assert!(line.starts_with("fanout: 40 connections held"), "{line}");
    assert_eq!(r["broadcast_deliveries"], 120);
    assert_eq!(r["per_user_deliveries"], 40);
    assert_eq!(r["rate_delivered"], 200);
    assert!(r["edge_rss_connected_kib"].as_u64().unwrap() > 0);
    assert!(r["publish_to_delivery_ms"]["p99"].as_f64().unwrap() > 0.0);
    let refused = run(
        &region,
        &["fanout", "--secret", secret, "--connections", "0"],
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--connections"));
}
