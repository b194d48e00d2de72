//! Test harness: a region of N nodes in one process, each on its own QUIC endpoint on
//! loopback with certificates from a development CA written to a temporary folder.
#![warn(missing_docs, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_client::{Client, ClientOptions};
use ferry_net::tls::{generate_dev_certs, TlsIdentity};
use ferry_proto::NodeId;
use ferry_region::server::{BoundEndpoint, QuicNode};
use ferry_region::{NodeConfig, PeerConfig, RaftTuning, TlsPaths};
use tokio::time::Instant;

/// A region under test.
pub struct TestRegion {
    /// Holds certificates and data folders.
    pub dir: tempfile::TempDir,
    /// Node configurations, by index (node id = index + 1).
    pub configs: Vec<NodeConfig>,
    /// Running nodes (None while stopped).
    pub nodes: Vec<Option<QuicNode>>,
}

/// Loads an identity from the test certificate folder.
pub fn identity(certs: &Path, name: &str) -> TlsIdentity {
    TlsIdentity::load(
        &certs.join("ca.pem"),
        &certs.join(format!("{name}.pem")),
        &certs.join(format!("{name}.key")),
    )
    .expect("test certificates")
}

/// Logs to the test output when RUST_LOG is set.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

impl TestRegion {
    /// Starts `n` nodes on loopback.
    pub async fn start(n: u64) -> Self {
        Self::start_with(n, |_| {}).await
    }

    /// Starts `n` nodes on loopback, adjusting each node's configuration first.
    pub async fn start_with(n: u64, adjust: impl Fn(&mut NodeConfig)) -> Self {
        init_logging();
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        let ids: Vec<NodeId> = (1..=n).collect();
        generate_dev_certs(&certs, &ids, &["test-client"]).expect("dev certs");
        let mut bound = Vec::new();
        for id in &ids {
            let endpoint = BoundEndpoint::bind(
                "127.0.0.1:0".parse().expect("addr"),
                identity(&certs, &format!("node-{id}")),
            )
            .expect("bind");
            bound.push(endpoint);
        }
        let peers: Vec<PeerConfig> = ids
            .iter()
            .zip(&bound)
            .map(|(id, b)| PeerConfig {
                id: *id,
                addr: b.local_addr().expect("addr"),
            })
            .collect();
        let configs: Vec<NodeConfig> = ids
            .iter()
            .map(|id| NodeConfig {
                id: *id,
                data_dir: dir.path().join(format!("node-{id}")),
                peers: peers.clone(),
                tls: TlsPaths {
                    ca: certs.join("ca.pem"),
                    cert: certs.join(format!("node-{id}.pem")),
                    key: certs.join(format!("node-{id}.key")),
                },
                limits: Default::default(),
                raft: RaftTuning {
                    snapshot_after_entries: 500,
                    keep_after_snapshot: 100,
                    ..RaftTuning::default()
                },
                cache_bytes: 16 * 1024 * 1024,
                wal_segment_bytes: 1024 * 1024,
                max_client_connections: 100,
                retention_interval_ms: 500,
                group_session_timeout_ms: 3_000,
                http: None,
            })
            .map(|mut config| {
                adjust(&mut config);
                config
            })
            .collect();
        let mut nodes = Vec::new();
        for (b, config) in bound.into_iter().zip(&configs) {
            nodes.push(Some(b.start(config.clone()).await.expect("start node")));
        }
        Self {
            dir,
            configs,
            nodes,
        }
    }

    /// The certificate folder.
    pub fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// Client addresses of the running nodes.
    pub fn live_addrs(&self) -> Vec<SocketAddr> {
        self.configs
            .iter()
            .zip(&self.nodes)
            .filter(|(_, n)| n.is_some())
            .filter_map(|(c, _)| c.listen_addr())
            .collect()
    }

    /// A client of the running nodes.
    pub fn client(&self) -> Client {
        let mut options = ClientOptions::new(
            self.live_addrs(),
            identity(&self.certs(), "client-test-client"),
        );
        options.request_timeout = Duration::from_secs(5);
        Client::new(options).expect("client")
    }

    /// Stops node `id` (its groups, its endpoint); its data stays.
    pub async fn stop(&mut self, id: NodeId) {
        if let Some(node) = self.nodes[(id - 1) as usize].take() {
            node.shutdown().await;
        }
    }

    /// Restarts node `id` from its data folder on its old address, retrying until the
    /// previous instance has released the folder and port, up to a deadline.
    pub async fn restart(&mut self, id: NodeId) {
        let config = self.configs[(id - 1) as usize].clone();
        let certs = self.certs();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let attempt = async {
                let bound = BoundEndpoint::bind(
                    config.listen_addr().expect("addr"),
                    identity(&certs, &format!("node-{id}")),
                )?;
                bound.start(config.clone()).await
            };
            match attempt.await {
                Ok(node) => {
                    self.nodes[(id - 1) as usize] = Some(node);
                    return;
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::info!(id, error = %e, "restart not possible yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("node {id} did not restart: {e}"),
            }
        }
    }

    /// Waits until every partition of `topic` has a leader that every running node agrees on.
    pub async fn wait_for_leaders(&self, topic: &str, timeout: Duration) {
        let client = self.client();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(d) = client.describe_topic(topic).await {
                let live: Vec<NodeId> = self
                    .configs
                    .iter()
                    .zip(&self.nodes)
                    .filter(|(_, n)| n.is_some())
                    .map(|(c, _)| c.id)
                    .collect();
                if d.partitions
                    .iter()
                    .all(|p| p.leader.is_some_and(|l| live.contains(&l)))
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "partitions of {topic} did not all get a live leader in {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates a topic and waits until every partition has a leader.
    pub async fn create_topic(&self, config: ferry_proto::TopicConfig) -> Client {
        let client = self.client();
        let name = config.name.clone();
        create_topic(&client, config, Duration::from_secs(30)).await;
        self.wait_for_leaders(&name, Duration::from_secs(30)).await;
        client
    }

    /// The node leading `topic/partition` according to the region.
    pub async fn leader_of(&self, topic: &str, partition: u32) -> Option<NodeId> {
        let d = self.client().describe_topic(topic).await.ok()?;
        d.partitions.get(partition as usize)?.leader
    }
}

/// Creates a topic, retrying while the metadata group elects its leader.
pub async fn create_topic(client: &Client, config: ferry_proto::TopicConfig, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        match client.create_topic(config.clone()).await {
            Ok(()) => return,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "creating {} failed: {e}",
                    config.name
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
