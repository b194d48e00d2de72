//! `ferry bench` cannot rot: each suite runs with a tiny count against three real `ferry node`
//! processes and must deliver everything it counts, with the servers' resources measured;
//! bad options are refused with a message naming them. (Speed is never asserted here.)

use std::process::Output;

mod common;
use common::Region;

fn run(region: &Region, args: &[&str]) -> Output {
    region.ferry().arg("bench").args(args).output().unwrap()
}

fn report(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn every_suite_runs_against_a_real_region() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(dir.path());
    let pids: Vec<String> = region.pids().iter().map(u32::to_string).collect();
    let pids = pids.join(",");

    // The region takes a moment to elect leaders; produce waits for them (bounded).
    let out_path = dir.path().join("produce.json");
    let out = run(
        &region,
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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        &region,
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
            "--out",
            out_path.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        line.starts_with("ferry bench produce on ferry: 300 events"),
        "{line}"
    );
    let r = report(&out_path);
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

    let out_path = dir.path().join("e2e.json");
    let out = run(
        &region,
        &[
            "e2e",
            "--count",
            "300",
            "--rate",
            "1000",
            "--out",
            out_path.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = report(&out_path);
    assert_eq!(r["delivered"], 300);
    assert!(r["e2e_latency_ms"]["p50"].as_f64().unwrap() > 0.0);

    let out_path = dir.path().join("consume.json");
    let out = run(
        &region,
        &[
            "consume",
            "--count",
            "400",
            "--out",
            out_path.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = report(&out_path);
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
