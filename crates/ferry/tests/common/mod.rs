//! A three-node region of real `ferry node` processes on loopback, for the binary's tests.
#![allow(dead_code)] // each test file uses its own part

use std::io::{Read, Write};
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
            .args(["--nodes", "1,2,3", "--clients", "ctl,bench,edge,sidecar"])
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

    /// The `servers = [...]` line of a client role's TOML configuration.
    pub fn servers_toml(&self) -> String {
        let quoted: Vec<String> = self
            .servers()
            .split(',')
            .map(|s| format!("\"{s}\""))
            .collect();
        format!("servers = [{}]\n", quoted.join(", "))
    }

    /// The `[tls]` table presenting client certificate `client` (of the test certificates).
    pub fn tls_toml(&self, client: &str) -> String {
        let c = self.dir.join("certs");
        format!(
            "[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/client-{client}.pem\"\nkey = \"{c}/client-{client}.key\"\n",
            c = c.display()
        )
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

/// A TCP port free on loopback now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 request (`Connection: close`): the status and the body, or why there was
/// none (nothing listening yet, say). Handles `Content-Length` and chunked bodies.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not HTTP: {text:?}"),
        )
    };
    let (head, rest) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"));
    if !chunked {
        return Ok((status, rest.to_string()));
    }
    let (mut body, mut rest) = (String::new(), rest);
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).map_err(|_| bad())?;
        let (Some(chunk), Some(next)) = (after.get(..size), after.get(size..)) else {
            break;
        };
        if size == 0 {
            break;
        }
        body.push_str(chunk);
        rest = next.trim_start_matches("\r\n");
    }
    Ok((status, body))
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
