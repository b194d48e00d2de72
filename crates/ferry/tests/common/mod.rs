//! A three-node region of real `ferry node` processes on loopback, for the binary's tests.
#![allow(dead_code)] // each test file uses its own part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// The node processes; killed when dropped, whatever happened.
pub struct Region {
    pub dir: PathBuf,
    pub ports: Vec<u16>,
    nodes: Vec<Option<Child>>,
}

impl Region {
    pub fn start(dir: &Path) -> Self {
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
            .args(["--nodes", "1,2,3", "--clients", "ctl,bench,edge"])
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

    pub fn spawn(&mut self, id: usize) {
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

    pub fn kill(&mut self, id: usize) {
        if let Some(mut child) = self.nodes[id - 1].take() {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
        }
    }

    /// Process ids of the running nodes.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().flatten().map(Child::id).collect()
    }

    pub fn servers(&self) -> String {
        let list: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        list.join(",")
    }

    pub fn ferry(&self) -> Command {
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

pub fn wait_for(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP/1.1 request to a local server (`Connection: close`): the status and the body.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the HTTP server");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Events held in `topic` (the sum of its partitions' high watermarks), per `ferry ctl`.
pub fn events_in(region: &Region, topic: &str) -> Option<u64> {
    let out = region
        .ferry()
        .args(["ctl", "topic", "describe", topic])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(
        text.lines()
            .filter_map(|l| l.split("offsets ").nth(1))
            .filter_map(|o| o.split("..").nth(1)?.trim().parse::<u64>().ok())
            .sum(),
    )
}
