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
