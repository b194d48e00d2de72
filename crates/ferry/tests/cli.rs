//! The `ferry` binary refuses bad configuration and data with messages naming what is wrong.

use std::process::Command;

fn ferry(args: &[&str], envs: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.args(args).env_remove("FERRY_CONFIG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run ferry");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn node_config(dir: &std::path::Path, data: &std::path::Path) -> std::path::PathBuf {
    let certs = dir.join("certs");
    let path = dir.join("node.toml");
    let text = format!(
        "id = 1\ndata_dir = \"{}\"\n[[peers]]\nid = 1\naddr = \"127.0.0.1:0\"\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/node-1.pem\"\nkey = \"{c}/node-1.key\"\n",
        data.display(),
        c = certs.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn certs_init_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let out = out.to_str().unwrap();
    let (ok, text) = ferry(&["certs", "init", "--out", out], &[]);
    assert!(ok, "{text}");
    let (ok, text) = ferry(&["certs", "init", "--out", out], &[]);
    assert!(!ok && text.contains("ca.pem"), "{text}");
}

#[test]
fn node_refuses_bad_config_and_foreign_data_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    assert!(
        ferry(
            &[
                "certs",
                "init",
                "--out",
                certs.to_str().unwrap(),
                "--nodes",
                "1"
            ],
            &[]
        )
        .0
    );
    let missing = dir.path().join("missing.toml");
    let (ok, text) = ferry(&["node", "--config", missing.to_str().unwrap()], &[]);
    assert!(!ok && text.contains("missing.toml"), "{text}");

    let data = dir.path().join("data");
    let config = node_config(dir.path(), &data);
    let config = config.to_str().unwrap();
    let (ok, text) = ferry(
        &["node", "--config", config],
        &[("FERRY_RAFT_HEARTBEAT_MS", "99999")],
    );
    assert!(!ok && text.contains("heartbeat_ms"), "{text}");
    let (ok, text) = ferry(
        &["node", "--config", config],
        &[("FERRY_RAFT_MAX_LOG_WHILE_CATCHING_UP", "10")],
    );
    assert!(
        !ok && text.contains("raft.max_log_while_catching_up"),
        "{text}"
    );
    let (ok, text) = ferry(
        &["node", "--config", config],
        &[("FERRY_BALANCE_LOAD_SPREAD_PERCENT", "5000")],
    );
    assert!(
        !ok && text.contains("balance_load_spread_percent"),
        "{text}"
    );
    let (ok, text) = ferry(
        &["node", "--config", config],
        &[("FERRY_LIMITS_MAX_EVNT", "1")],
    );
    assert!(!ok && text.contains("max_evnt"), "{text}");

    // A data folder holding something else is refused, naming it, and left untouched.
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("precious.txt"), "keep me").unwrap();
    let (ok, text) = ferry(&["node", "--config", config], &[]);
    assert!(!ok && text.contains(data.to_str().unwrap()), "{text}");
    assert_eq!(std::fs::read_dir(&data).unwrap().count(), 1);
}

#[test]
fn check_exits_by_verdict_and_writes_the_json_report() {
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean.jsonl");
    std::fs::write(
        &clean,
        r#"{"type":"invoke","process":1,"f":"publish","id":"a","key":"k","topic":"t","time_ms":1}
{"type":"ok","process":1,"f":"publish","id":"a","topic":"t","partition":0,"offset":0,"time_ms":2}
{"type":"ok","f":"read","final":true,"topic":"t","partition":0,"partitions":1,"low":0,"high":1,"events":[{"offset":0,"id":"a"}],"time_ms":3}
"#,
    )
    .unwrap();
    let json = dir.path().join("report.json");
    let (ok, out) = ferry(
        &[
            "check",
            clean.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ],
        &[],
    );
    assert!(ok && out.contains("verdict: PASS"), "{out}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["verdict"], "Pass");
    assert_eq!(report["counts"]["acknowledged"], 1);

    // The final read ends before it: the acknowledged event is lost, and the exit code says so.
    let lost = dir.path().join("lost.jsonl");
    let text = std::fs::read_to_string(&clean).unwrap();
    std::fs::write(
        &lost,
        text.replace(
            r#""high":1,"events":[{"offset":0,"id":"a"}]"#,
            r#""high":0"#,
        ),
    )
    .unwrap();
    let (ok, out) = ferry(&["check", lost.to_str().unwrap()], &[]);
    assert!(
        !ok && out.contains("verdict: FAIL") && out.contains("1 acknowledged events lost"),
        "{out}"
    );

    // A broken line is named.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"type\":\"ok\"}\n").unwrap();
    let (ok, out) = ferry(&["check", bad.to_str().unwrap()], &[]);
    assert!(!ok && out.contains("line 1"), "{out}");
}
