//! A real `ferry sidecar` process killed with SIGKILL after answering 2xx loses nothing and
//! duplicates nothing: once restarted it sends what its outbox held, and the region holds
//! exactly the events that were accepted.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

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

fn publish(addr: &str, body: &str) -> u16 {
    request(addr, "POST", "/v1.0/publish/pubsub/orders", Some(body))
        .expect("the sidecar answers")
        .0
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
    // The sidecar learns the topic (it creates it) before the region goes away.
    wait_for("the orders topic", Duration::from_secs(60), || {
        events_in(&region, "orders").is_some()
    });
    wait_for(
        "the sidecar to accept a publish",
        Duration::from_secs(60),
        || std::net::TcpStream::connect(&addr).is_ok() && publish(&addr, r#"{"n": -1}"#) == 204,
    );

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
        assert_eq!(publish(&addr, &format!(r#"{{"n": {i}}}"#)), 204);
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
        || events_in(&region, "orders") == Some(21),
    );

    // Region up: the sidecar is killed right after its last 2xx, whatever it had sent.
    wait_for(
        "the sidecar to serve again",
        Duration::from_secs(30),
        || std::net::TcpStream::connect(&addr).is_ok(),
    );
    for i in 0..50 {
        assert_eq!(publish(&addr, &format!(r#"{{"m": {i}}}"#)), 204);
    }
    sidecar.kill();
    let _sidecar = SidecarProcess::start(&region, &path);
    wait_for("all 71 events", Duration::from_secs(60), || {
        events_in(&region, "orders") == Some(71)
    });
    // Resent records are recognised by the partitions: nothing appears twice, even once the
    // outbox is empty.
    wait_for("the outbox to empty", Duration::from_secs(30), depth_zero);
    assert_eq!(events_in(&region, "orders"), Some(71));
}
