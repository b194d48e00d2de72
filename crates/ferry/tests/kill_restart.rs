//! Three `ferry node` processes on loopback; `ferry workload` publishes and records its
//! history while one node is killed with SIGKILL mid-stream and later restarted from its
//! data folder; after collecting final reads and every replica's log, `ferry check` passes:
//! nothing acknowledged is lost, nothing is stored twice, per-key order holds and the
//! replicas agree.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// The node processes; killed when dropped, whatever happened.
struct Region {
    dir: PathBuf,
    ports: Vec<u16>,
    nodes: Vec<Option<Child>>,
}

impl Region {
    fn start(dir: &Path) -> Self {
        let ports: Vec<u16> = (0..3)
            .map(|_| {
                std::net::UdpSocket::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let certs = dir.join("certs");
        let status = Command::new(FERRY)
            .args(["certs", "init", "--out", certs.to_str().unwrap()])
            .args(["--nodes", "1,2,3", "--clients", "ctl"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let peers: String = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("[[peers]]\nid = {}\naddr = \"127.0.0.1:{p}\"\n", i + 1))
            .collect();
        for id in 1..=3 {
            let text = format!(
                "id = {id}\ndata_dir = \"{d}/node-{id}\"\nwal_segment_bytes = 1048576\n\
                 [raft]\nsnapshot_after_entries = 300\nkeep_after_snapshot = 50\n\
                 {peers}[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/node-{id}.pem\"\nkey = \"{c}/node-{id}.key\"\n",
                d = dir.display(),
                c = certs.display(),
            );
            std::fs::write(dir.join(format!("node-{id}.toml")), text).unwrap();
        }
        let mut region = Self {
            dir: dir.to_path_buf(),
            ports,
            nodes: vec![None, None, None],
        };
        for id in 1..=3 {
            region.spawn(id);
        }
        region
    }

    fn spawn(&mut self, id: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node-{id}.log")))
            .unwrap();
        let child = Command::new(FERRY)
            .args(["node", "--config"])
            .arg(self.dir.join(format!("node-{id}.toml")))
            .env("FERRY_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.nodes[id - 1] = Some(child);
    }

    fn kill(&mut self, id: usize) {
        if let Some(mut child) = self.nodes[id - 1].take() {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
        }
    }

    fn servers(&self) -> String {
        let list: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        list.join(",")
    }

    fn ferry(&self) -> Command {
        let mut cmd = Command::new(FERRY);
        cmd.env("FERRY_CERTS", self.dir.join("certs"))
            .env("FERRY_SERVERS", self.servers())
            .env("FERRY_LOG", "warn");
        cmd
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        for id in 1..=3 {
            self.kill(id);
        }
    }
}

fn acknowledged(history: &Path) -> usize {
    std::fs::read_to_string(history)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"type\":\"ok\""))
        .count()
}

fn wait_for(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
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
