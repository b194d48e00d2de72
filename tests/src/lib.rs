//! Test harness: regions of N nodes in one process, each node on its own QUIC endpoint on
//! loopback with certificates from one development CA written to a temporary folder
//! ([`TestRegion`] alone, or several regions gossiping and forwarding as a [`TestMesh`]).
#![warn(missing_docs, unreachable_pub)]

mod s3;
pub use s3::S3Server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_client::{Client, ClientOptions};
use ferry_net::tls::{generate_dev_certs, TlsIdentity};
use ferry_proto::NodeId;
use ferry_region::server::{BoundEndpoint, QuicNode};
use ferry_region::{MeshConfig, NodeConfig, PeerConfig, RaftTuning, TlsPaths};
use tokio::time::Instant;

/// A region under test.
pub struct TestRegion {
    /// Holds certificates and data folders (shared by the regions of a mesh).
    pub dir: Arc<tempfile::TempDir>,
    /// The region's name.
    pub name: String,
    /// Id of the first node; node ids are consecutive.
    pub first_id: NodeId,
    /// Node configurations, by index (node id = first_id + index).
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
        let mut mesh = TestMesh::start_with(&[("local", n)], adjust).await;
        mesh.regions.remove(0)
    }

    fn index(&self, id: NodeId) -> usize {
        (id - self.first_id) as usize
    }

    /// The running node `id`.
    pub fn node(&self, id: NodeId) -> Option<&QuicNode> {
        self.nodes.get(self.index(id))?.as_ref()
    }

    /// Ids of the running nodes.
    pub fn live_ids(&self) -> Vec<NodeId> {
        self.configs
            .iter()
            .zip(&self.nodes)
            .filter(|(_, n)| n.is_some())
            .map(|(c, _)| c.id)
            .collect()
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
        let index = self.index(id);
        if let Some(node) = self.nodes[index].take() {
            node.shutdown().await;
        }
    }

    /// Kills node `id` abruptly ([`QuicNode::kill`]): its network goes at once, mid-request,
    /// with no graceful shutdown first; its data stays.
    pub async fn kill(&mut self, id: NodeId) {
        let index = self.index(id);
        if let Some(node) = self.nodes[index].take() {
            node.kill().await;
        }
    }

    /// Restarts node `id` from its data folder on its old address, retrying until the
    /// previous instance has released the folder and port, up to a deadline.
    pub async fn restart(&mut self, id: NodeId) {
        let index = self.index(id);
        let config = self.configs[index].clone();
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
                    self.nodes[index] = Some(node);
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

    /// Starts a new node `id` (the next after the region's last, or a stopped node's id with
    /// an empty folder) that joins the running region through its live nodes, with a certificate from the region's CA; answers
    /// once it is a member. Its configuration is the first node's with its own id, folder
    /// and address.
    pub async fn join(&mut self, id: NodeId) -> Result<(), ferry_region::RegionError> {
        self.join_at(id, "127.0.0.1:0".parse().expect("addr")).await
    }

    /// As [`TestRegion::join`], at `addr` (a dead node's, say), binding it again until the
    /// port is free or a deadline passes.
    pub async fn join_at(
        &mut self,
        id: NodeId,
        addr: SocketAddr,
    ) -> Result<(), ferry_region::RegionError> {
        let index = self.index(id);
        assert!(
            index == self.configs.len()
                || (index < self.nodes.len() && self.nodes[index].is_none()),
            "a joining node takes the next id, or the id of a node that is stopped"
        );
        let certs = self.certs();
        ferry_net::tls::add_missing_dev_certs(&certs, &[id], &[]).expect("node certificate");
        let deadline = Instant::now() + Duration::from_secs(20);
        let endpoint = loop {
            match BoundEndpoint::bind(addr, identity(&certs, &format!("node-{id}"))) {
                Ok(e) => break e,
                Err(e) if Instant::now() < deadline => {
                    tracing::info!(%addr, error = %e, "address not free yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("binding {addr}: {e}"),
            }
        };
        let mut config = self.configs[0].clone();
        config.id = id;
        config.data_dir = self.dir.path().join(format!("node-{id}"));
        config.addr = Some(endpoint.local_addr().expect("addr"));
        config.seeds = self.live_addrs();
        config.peers = Vec::new();
        config.tls = TlsPaths {
            ca: certs.join("ca.pem"),
            cert: certs.join(format!("node-{id}.pem")),
            key: certs.join(format!("node-{id}.key")),
        };
        if index < self.configs.len() {
            // A node under a stopped node's id starts with an empty folder of its own.
            config.data_dir = self.dir.path().join(format!("node-{id}-again"));
        }
        let node = endpoint.start(config.clone()).await?;
        if index < self.configs.len() {
            self.configs[index] = config;
            self.nodes[index] = Some(node);
        } else {
            self.configs.push(config);
            self.nodes.push(Some(node));
        }
        Ok(())
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

/// Several regions in one process, sharing one CA, gossiping and forwarding to each other.
pub struct TestMesh {
    /// The regions, in the order given.
    pub regions: Vec<TestRegion>,
}

impl TestMesh {
    /// Starts regions of `(name, nodes)`; node ids run from 1 across regions.
    pub async fn start(regions: &[(&str, u64)]) -> Self {
        Self::start_with(regions, |_| {}).await
    }

    /// Starts regions, adjusting each node's configuration first.
    pub async fn start_with(regions: &[(&str, u64)], adjust: impl Fn(&mut NodeConfig)) -> Self {
        init_logging();
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let certs = dir.path().join("certs");
        let total: u64 = regions.iter().map(|(_, n)| n).sum();
        let ids: Vec<NodeId> = (1..=total).collect();
        generate_dev_certs(&certs, &ids, &["test-client"]).expect("dev certs");
        let mut bound = Vec::new();
        for id in &ids {
            let endpoint = BoundEndpoint::bind(
                "127.0.0.1:0".parse().expect("addr"),
                identity(&certs, &format!("node-{id}")),
            )
            .expect("bind");
            bound.push((*id, endpoint.local_addr().expect("addr"), endpoint));
        }
        // Per region: its peers.
        let mut layout = Vec::new();
        let mut next = 1;
        for (name, n) in regions {
            let peers: Vec<PeerConfig> = (next..next + n)
                .map(|id| PeerConfig {
                    id,
                    addr: bound[(id - 1) as usize].1,
                })
                .collect();
            layout.push((name.to_string(), next, peers));
            next += n;
        }
        let multi_region = regions.len() > 1;
        let mut out = Vec::new();
        let mut bound = bound.into_iter();
        for (name, first_id, peers) in &layout {
            // Seeds in other regions: their first node.
            let remote_seeds: Vec<SocketAddr> = layout
                .iter()
                .filter(|(other, _, _)| other != name)
                .map(|(_, _, p)| p[0].addr)
                .collect();
            let configs: Vec<NodeConfig> = peers
                .iter()
                .map(|p| {
                    let id = p.id;
                    let mut config = NodeConfig {
                        id,
                        region: name.clone(),
                        faults: Default::default(),
                        mesh: MeshConfig {
                            remote_seeds: remote_seeds.clone(),
                            gossip_interval_ms: 100,
                            dead_after_ms: 2_000,
                            forward_retry_ms: 200,
                            forward_max_backoff_ms: 2_000,
                            ..MeshConfig::default()
                        },
                        data_dir: dir.path().join(format!("node-{id}")),
                        peers: peers.clone(),
                        addr: None,
                        seeds: Vec::new(),
                        join_timeout_ms: 60_000,
                        max_moves_per_node: 2,
                        load_sample_ms: 500,
                        balance_load_spread_percent: 25,
                        leader_rebalance_after_ms: 10_000,
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
                        stream_index_cache_bytes: 16 * 1024 * 1024,
                        // Small, so a tiered topic's stream index runs go to the store in tests.
                        stream_index_upload_bytes: 64 * 1024,
                        wal_segment_bytes: 1024 * 1024,
                        max_client_connections: 100,
                        retention_interval_ms: 500,
                        // Well above the consumers' 2 s heartbeat: a late heartbeat on a
                        // loaded machine must not pass for a member gone.
                        group_session_timeout_ms: 10_000,
                        producer_expiry_ms: 86_400_000,
                        http: None,
                        tier: None,
                    };
                    if multi_region {
                        // Several regions share two cores: give heartbeats room, so that
                        // load does not pass for failure.
                        config.raft.heartbeat_ms = 300;
                        config.raft.election_min_ms = 1_500;
                        config.raft.election_max_ms = 3_000;
                    }
                    adjust(&mut config);
                    config
                })
                .collect();
            let mut nodes = Vec::new();
            for config in &configs {
                let (_, _, endpoint) = bound.next().expect("bound endpoint");
                nodes.push(Some(
                    endpoint.start(config.clone()).await.expect("start node"),
                ));
            }
            out.push(TestRegion {
                dir: dir.clone(),
                name: name.clone(),
                first_id: *first_id,
                configs,
                nodes,
            });
        }
        Self { regions: out }
    }

    /// A region by name.
    pub fn region(&self, name: &str) -> &TestRegion {
        self.regions
            .iter()
            .find(|r| r.name == name)
            .expect("no such region")
    }

    /// A region by name, to stop or restart its nodes.
    pub fn region_mut(&mut self, name: &str) -> &mut TestRegion {
        self.regions
            .iter_mut()
            .find(|r| r.name == name)
            .expect("no such region")
    }

    /// Cuts every link of node `id` (in `region`), both directions: to the others it is gone
    /// at once, mid-request, as if it had crashed.
    pub fn isolate(&self, region: &str, id: NodeId) {
        let victim = self.region(region);
        let victim_addr = victim.configs[victim.index(id)]
            .listen_addr()
            .expect("addr");
        for r in &self.regions {
            for (config, node) in r.configs.iter().zip(&r.nodes) {
                let Some(node) = node else { continue };
                if config.id == id {
                    for other in self.regions.iter().flat_map(|o| &o.configs) {
                        if other.id != id {
                            node.faults().cut(other.listen_addr().expect("addr"));
                        }
                    }
                } else {
                    node.faults().cut(victim_addr);
                }
            }
        }
    }

    /// Makes every link between regions `a` and `b` slow as `shape` says, both directions
    /// (a zero shape restores them).
    pub fn shape_link(&self, a: &str, b: &str, shape: ferry_net::LinkShape) {
        let (a, b) = (self.region(a), self.region(b));
        for (x, y) in [(a, b), (b, a)] {
            for node in x.nodes.iter().flatten() {
                for config in &y.configs {
                    node.faults()
                        .shape(config.listen_addr().expect("addr"), shape);
                }
            }
        }
    }

    /// Cuts (or heals) every link between regions `a` and `b`, both directions.
    pub fn set_link(&self, a: &str, b: &str, up: bool) {
        let (a, b) = (self.region(a), self.region(b));
        for (x, y) in [(a, b), (b, a)] {
            for node in x.nodes.iter().flatten() {
                for config in &y.configs {
                    let addr = config.listen_addr().expect("addr");
                    if up {
                        node.faults().heal(addr);
                    } else {
                        node.faults().cut(addr);
                    }
                }
            }
        }
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

/// Waits until `check` holds, polling every 25 ms, or fails naming `what` after `timeout`;
/// answers how long it took.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until an edge reads its region (`/healthz` answers 200). A fresh edge starts at the
/// region's end as it finds it when it first reads: an event published before then is not
/// the edge's to deliver.
pub async fn wait_edge_reading(edge: &ferry_edge::Edge, within: Duration) {
    let http = reqwest::Client::new();
    let url = format!("http://{}/healthz", edge.http_addr());
    wait_until("the edge reads its region", within, || async {
        http.get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status() == reqwest::StatusCode::OK)
    })
    .await;
}

/// Grows `topic` to `partitions` partitions and waits until every split parent is sealed;
/// answers the topic's key layout then.
pub async fn grow_topic(client: &Client, topic: &str, partitions: u32) -> ferry_proto::KeyLayout {
    client.add_partitions(topic, partitions).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(d) = client.describe_topic(topic).await {
            if d.config.partitions == partitions && d.layout.unsealed().count() == 0 {
                return d.layout;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the split parents of {topic} did not seal in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
