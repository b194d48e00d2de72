//! Three `ferry node` processes on loopback; `ferry workload` publishes and records its
//! history while one node is killed with SIGKILL mid-stream and later restarted from its
//! data folder; after collecting final reads and every replica's log, `ferry check` passes:
//! nothing acknowledged is lost, nothing is stored twice, per-key order holds and the
//! replicas agree.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;
use common::{wait_for, Region};

fn acknowledged(history: &Path) -> usize {
    std::fs::read_to_string(history)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"type\":\"ok\""))
        .count()
}

#[test]
fn a_node_killed_mid_stream_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut region = Region::start(dir.path());
    let history = dir.path().join("history.jsonl");

    // Paced so that the kill lands mid-stream with batches in flight: 3 producers x 4,000
    // events at up to 1,000/s each.
    let mut workload = region
        .ferry()
        .args(["workload", "produce", "--out", history.to_str().unwrap()])
        .args(["--partitions", "4", "--producers", "3", "--count", "4000"])
        .args(["--rate", "1000", "--duration-secs", "90"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();

    wait_for("2,000 acknowledgements", Duration::from_secs(60), || {
        acknowledged(&history) >= 2000
    });
    region.kill(1);
    let at_kill = acknowledged(&history);
    wait_for("progress without node 1", Duration::from_secs(60), || {
        acknowledged(&history) >= at_kill + 2000
    });
    region.spawn(1);

    let until = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = workload.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > until {
            workload.kill().unwrap();
            panic!("the workload did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "workload failed");

    let nodes: Vec<String> = region
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect();
    let out = region
        .ferry()
        .args(["workload", "collect", "--out", history.to_str().unwrap()])
        .args(["--nodes", &nodes.join(",")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let report = dir.path().join("report.json");
    let out = region
        .ferry()
        .args(["check", history.to_str().unwrap(), "--duplicates-fail"])
        .args(["--json", report.to_str().unwrap()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["counts"]["acknowledged"], 12000, "{table}");
    assert_eq!(report["counts"]["lost"], 0);
    // Every node's replica was dumped and agrees: each event seen in four places (a final
    // read and three replicas) is one event, once.
    assert_eq!(report["counts"]["observed"], 12000, "{table}");
}
