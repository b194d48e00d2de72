//! Gossip over an in-memory link: 3 regions × 2 nodes, one seed each. Convergence, a record
//! change reaching everyone, failure detection within `dead_after`, a cut link routed around,
//! a restart as a new generation. Times are measured and printed (`--nocapture`); waits poll
//! `live()` every 20 ms up to generous deadlines, so a loaded machine slows them, never fails
//! them.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Mutex;
use std::time::Instant;

use super::*;

const INTERVAL: Duration = Duration::from_millis(100);
const DEAD_AFTER: Duration = Duration::from_secs(2);
/// Deadline of every wait.
const DEADLINE: Duration = Duration::from_secs(15);
/// Slack allowed beyond `dead_after` for detection on a loaded machine.
const DETECTION_MARGIN: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(20);
const REGIONS: [&str; 3] = ["eu", "us", "ap"];

/// An in-memory network: address → inbox, with nodes that can be killed and links cut.
#[derive(Clone, Default)]
struct MemNet(Arc<Mutex<NetState>>);

#[derive(Default)]
struct NetState {
    inboxes: HashMap<SocketAddr, GossipInbox>,
    down: HashSet<SocketAddr>,
    cut: HashSet<(SocketAddr, SocketAddr)>,
}

impl MemNet {
    fn state(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.0.lock().expect("net lock")
    }

    fn link(&self, from: SocketAddr) -> Arc<dyn GossipLink> {
        Arc::new(MemLink {
            net: self.clone(),
            from,
        })
    }

    fn attach(&self, addr: SocketAddr, inbox: GossipInbox) {
        let mut state = self.state();
        state.down.remove(&addr);
        state.inboxes.insert(addr, inbox);
    }

    /// Nothing reaches `addr` or leaves it any more.
    fn kill(&self, addr: SocketAddr) {
        let mut state = self.state();
        state.down.insert(addr);
        state.inboxes.remove(&addr);
    }

    /// Nothing passes between `a` and `b`, either way.
    fn cut(&self, a: SocketAddr, b: SocketAddr) {
        let mut state = self.state();
        state.cut.insert((a, b));
        state.cut.insert((b, a));
    }
}

struct MemLink {
    net: MemNet,
    from: SocketAddr,
}

impl GossipLink for MemLink {
    fn send(&self, to: SocketAddr, message: Bytes) -> BoxFuture<'static, Result<(), String>> {
        let from = self.from;
        let inbox = {
            let state = self.net.state();
            if state.down.contains(&from) {
                Err(format!("{from} is down"))
            } else if state.cut.contains(&(from, to)) {
                Err(format!("link {from} - {to} is cut"))
            } else {
                state
                    .inboxes
                    .get(&to)
                    .cloned()
                    .ok_or_else(|| format!("{to} unreachable"))
            }
        };
        Box::pin(async move {
            inbox?.deliver(from, message);
            Ok(())
        })
    }
}

struct TestNode {
    gossip: Gossip,
    record: NodeRecord,
    config: GossipConfig,
}

fn gossip_addr(region: usize, n: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, region as u8, n as u8 + 1], 7100))
}

/// Node `index` (0-5): region `index / 2`, `n = index % 2`, id `index + 1`. Node 0 of a
/// region seeds from node 0 of the next region, node 1 from node 0 of its own.
fn config_for(index: usize) -> GossipConfig {
    let (region, n) = (index / 2, index % 2);
    let (seeds, remote_seeds) = if n == 0 {
        (vec![], vec![gossip_addr((region + 1) % REGIONS.len(), 0)])
    } else {
        (vec![gossip_addr(region, 0)], vec![])
    };
    GossipConfig {
        node_id: index as u64 + 1,
        region: REGIONS[region].to_string(),
        advertise: gossip_addr(region, n),
        seeds,
        remote_seeds,
        cluster: "ferry-test".into(),
        interval: INTERVAL,
        dead_after: DEAD_AFTER,
        generation: 1,
    }
}

fn record_for(index: usize) -> NodeRecord {
    let (region, n) = (index / 2, index % 2);
    let id = index as u64 + 1;
    NodeRecord {
        id,
        region: REGIONS[region].to_string(),
        addr: SocketAddr::from(([10, 0, region as u8, n as u8 + 1], 7000)),
        role: "node".into(),
        leads: vec![
            crate::LedGroup {
                topic: "audit".into(),
                groups: 1,
                group: 0,
            },
            crate::LedGroup {
                topic: "orders".into(),
                groups: 64,
                group: id as u32,
            },
        ]
        .into(),
        interest: vec![format!("orders.{}.>", REGIONS[region])],
        reach: REGIONS
            .iter()
            .filter(|r| **r != REGIONS[region])
            .map(|r| r.to_string())
            .collect(),
        load: id * 10,
        interest_version: id,
        interest_as_of_ms: 1_000 + id,
        interest_since_ms: 500 + id,
        seen: vec![("elsewhere".into(), id)],
    }
}

async fn start_node(net: &MemNet, config: GossipConfig, record: NodeRecord) -> TestNode {
    let (gossip, inbox) = Gossip::start(config.clone(), net.link(config.advertise))
        .await
        .expect("gossip starts");
    net.attach(config.advertise, inbox);
    gossip.publish(&record).await.expect("record publishes");
    TestNode {
        gossip,
        record,
        config,
    }
}

async fn start_mesh(net: &MemNet) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for index in 0..REGIONS.len() * 2 {
        nodes.push(start_node(net, config_for(index), record_for(index)).await);
    }
    nodes
}

fn records_of<'a>(nodes: impl IntoIterator<Item = &'a TestNode>) -> Vec<NodeRecord> {
    let mut records: Vec<NodeRecord> = nodes.into_iter().map(|n| n.record.clone()).collect();
    records.sort_by_key(|r| r.id);
    records
}

async fn all_see(nodes: &[&TestNode], expected: &[NodeRecord]) -> bool {
    for node in nodes {
        if node.gossip.live().await != expected {
            return false;
        }
    }
    true
}

/// Polls `done` every 20 ms; how long it took, or a panic naming `what` after `DEADLINE`.
/// Waits until every node's `live()` is `expected`.
async fn wait_all_see(what: &str, nodes: &[TestNode], expected: &[NodeRecord]) -> Duration {
    let all: Vec<&TestNode> = nodes.iter().collect();
    wait_for(what, || all_see(&all, expected)).await
}

async fn wait_for<F, Fut>(what: &str, mut done: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if done().await {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

async fn shutdown(nodes: Vec<TestNode>) {
    for node in nodes {
        node.gossip.shutdown().await;
    }
}

#[test]
fn config_is_validated() {
    let good = config_for(0);
    assert!(good.validate().is_ok());
    let bad = [
        GossipConfig {
            interval: Duration::ZERO,
            ..good.clone()
        },
        GossipConfig {
            dead_after: INTERVAL * 3,
            ..good.clone()
        },
        GossipConfig {
            cluster: String::new(),
            ..good.clone()
        },
    ];
    for config in bad {
        assert!(
            matches!(config.validate(), Err(GossipError::Config(_))),
            "{config:?}"
        );
    }
}

#[test]
fn swim_is_set_from_dead_after() {
    let config = membership::foca_config(INTERVAL, DEAD_AFTER);
    assert_eq!(config.probe_period, DEAD_AFTER / 6);
    assert!(config.probe_rtt < config.probe_period);
    assert_eq!(config.suspect_to_down_after, DEAD_AFTER / 4);
    // Probed within 2 periods, failed after one more, down after the suspicion, spread
    // within a round: inside `dead_after`.
    let worst = config.probe_period * 3 + config.suspect_to_down_after + INTERVAL;
    assert!(worst < DEAD_AFTER, "{worst:?}");
    assert_eq!(config.periodic_gossip.map(|p| p.frequency), Some(INTERVAL));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_refuses_records_peers_would_reject() {
    let net = MemNet::default();
    let node = start_node(&net, config_for(0), record_for(0)).await;
    let wrong = [
        NodeRecord {
            id: 99,
            ..node.record.clone()
        },
        NodeRecord {
            region: "us".into(),
            ..node.record.clone()
        },
        NodeRecord {
            interest: vec!["orders >".into()],
            ..node.record.clone()
        },
        NodeRecord {
            leads: vec![crate::LedGroup {
                topic: "a,b".into(),
                groups: 3,
                group: 1,
            }]
            .into(),
            ..node.record.clone()
        },
    ];
    for record in wrong {
        assert!(
            matches!(
                node.gossip.publish(&record).await,
                Err(GossipError::InvalidRecord(_))
            ),
            "{record:?}"
        );
    }
    // Alone, it sees itself.
    assert_eq!(node.gossip.live().await, vec![node.record.clone()]);
    shutdown(vec![node]).await;
}

/// (a) Every node's `live()` shows all six with their records; `subscribe()` follows; nothing
/// was dropped on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_converges() {
    let net = MemNet::default();
    let started = Instant::now();
    let nodes = start_mesh(&net).await;
    let expected = records_of(&nodes);
    let all: Vec<&TestNode> = nodes.iter().collect();
    let (all, expected_ref) = (&all[..], &expected[..]);
    wait_for("all six in every live()", || all_see(all, expected_ref)).await;
    eprintln!(
        "gossip: 3 regions x 2 nodes converged in {:?}",
        started.elapsed()
    );

    for node in all {
        let mut members = node.gossip.subscribe();
        tokio::time::timeout(DEADLINE, members.wait_for(|view| view == expected_ref))
            .await
            .expect("subscribe() shows all six")
            .expect("watch open");
    }
    eprintln!(
        "gossip: every subscribe() agreed after {:?}",
        started.elapsed()
    );

    for node in all {
        let stats = node.gossip.stats();
        assert_eq!(stats.malformed, 0, "{stats:?}");
        assert_eq!(stats.inbox_full, 0, "{stats:?}");
    }
    shutdown(nodes).await;
}

/// (b) A record change (new interest) reaches every node; republishing an unchanged record
/// spreads nothing; a message that does not decode is dropped, counted, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_change_reaches_every_node() {
    let net = MemNet::default();
    let mut nodes = start_mesh(&net).await;
    let expected = records_of(&nodes);
    wait_all_see("convergence", &nodes, &expected).await;

    let changer = 3;
    let record_seq = |node: &TestNode| lock(&node.gossip.core).record_seq();
    let before = record_seq(&nodes[changer]);
    nodes[changer]
        .gossip
        .publish(&nodes[changer].record)
        .await
        .expect("republish");
    assert_eq!(
        record_seq(&nodes[changer]),
        before,
        "an unchanged record is not spread again"
    );

    let mut subscriptions: Vec<_> = nodes.iter().map(|n| n.gossip.subscribe()).collect();
    for subscription in &mut subscriptions {
        subscription.borrow_and_update();
    }
    let mut changed = nodes[changer].record.clone();
    changed.interest.push("payments.>".into());
    let started = Instant::now();
    nodes[changer]
        .gossip
        .publish(&changed)
        .await
        .expect("publish");
    assert_eq!(record_seq(&nodes[changer]), before + 1, "one new version");
    nodes[changer].record = changed.clone();
    let expected = records_of(&nodes);
    {
        let all: Vec<&TestNode> = nodes.iter().collect();
        let (all, expected) = (&all[..], &expected[..]);
        let took = wait_for("new interest in every live()", || all_see(all, expected)).await;
        eprintln!("gossip: new interest reached every node's live() in {took:?}");
    }
    for subscription in &mut subscriptions {
        tokio::time::timeout(
            DEADLINE,
            subscription.wait_for(|view| view == &expected[..]),
        )
        .await
        .expect("subscribe() shows the new interest")
        .expect("watch open");
    }
    eprintln!(
        "gossip: new interest reached every node's subscribe() in {:?}",
        started.elapsed()
    );

    // Garbage, a truncated message and another mesh's message: dropped, nothing changes.
    let target = &nodes[0];
    let inbox = net.state().inboxes[&target.config.advertise].clone();
    let from = gossip_addr(1, 1);
    let good = ferry_proto::codec::encode(
        "gossip message",
        &wire::Envelope::Summaries {
            cluster: "another-mesh".into(),
            summaries: vec![],
        },
    )
    .expect("encode");
    let malformed_before = target.gossip.stats().malformed;
    inbox.deliver(from, Bytes::from_static(b"\xff\xff\xff garbage"));
    inbox.deliver(from, Bytes::copy_from_slice(&good[..good.len() / 2]));
    inbox.deliver(from, Bytes::from(good));
    wait_for("two malformed messages counted", || async {
        target.gossip.stats().malformed >= malformed_before + 2
    })
    .await;
    let all: Vec<&TestNode> = nodes.iter().collect();
    assert!(all_see(&all, &expected).await);
    shutdown(nodes).await;
}

/// (c) A killed node leaves every other node's `live()` within `dead_after` (plus a margin
/// for a loaded machine), not much sooner, and the others stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_leaves_within_dead_after() {
    let net = MemNet::default();
    let mut nodes = start_mesh(&net).await;
    let expected = records_of(&nodes);
    wait_all_see("convergence", &nodes, &expected).await;

    // Node 2 (us, first node) is the seed of two others.
    let victim = nodes.remove(2);
    let killed_at = Instant::now();
    net.kill(victim.config.advertise);
    victim.gossip.shutdown().await;

    let mut detected: Vec<Option<Duration>> = vec![None; nodes.len()];
    while detected.iter().any(Option::is_none) {
        assert!(
            killed_at.elapsed() < DEADLINE,
            "not detected everywhere: {detected:?}"
        );
        for (node, seen) in nodes.iter().zip(detected.iter_mut()) {
            if seen.is_none()
                && node
                    .gossip
                    .live()
                    .await
                    .iter()
                    .all(|r| r.id != victim.record.id)
            {
                *seen = Some(killed_at.elapsed());
            }
        }
        tokio::time::sleep(POLL).await;
    }
    let detected: Vec<Duration> = detected.into_iter().flatten().collect();
    let (first, last) = (
        detected.iter().min().copied().unwrap_or_default(),
        detected.iter().max().copied().unwrap_or_default(),
    );
    eprintln!(
        "gossip: killed node left every live() after {first:?} .. {last:?} (dead_after {DEAD_AFTER:?})"
    );
    assert!(
        last <= DEAD_AFTER + DETECTION_MARGIN,
        "detection took {last:?}, dead_after is {DEAD_AFTER:?}"
    );
    // Declared down only after a failed probe and the suspicion (dead_after / 4).
    assert!(first >= DEAD_AFTER / 4, "detected after only {first:?}");

    let expected = records_of(&nodes);
    let all: Vec<&TestNode> = nodes.iter().collect();
    let (all, expected) = (&all[..], &expected[..]);
    wait_for("the five others stay", || all_see(all, expected)).await;
    shutdown(nodes).await;
}

/// (d) With every link between eu and us cut (us's first node is eu's only remote seed),
/// membership still converges through ap, and eu and us keep seeing each other alive on
/// summaries ap relays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_link_is_routed_around() {
    let net = MemNet::default();
    for eu in 0..2 {
        for us in 0..2 {
            net.cut(gossip_addr(0, eu), gossip_addr(1, us));
        }
    }
    let started = Instant::now();
    let nodes = start_mesh(&net).await;
    let expected = records_of(&nodes);
    let all: Vec<&TestNode> = nodes.iter().collect();
    let (all, expected_ref) = (&all[..], &expected[..]);
    let took = wait_for("convergence around the cut", || all_see(all, expected_ref)).await;
    eprintln!(
        "gossip: converged around a cut link in {took:?} ({:?} after start)",
        started.elapsed()
    );

    // Liveness across the cut rests on summaries relayed by the third region: it holds.
    let hold = DEAD_AFTER * 2;
    let watching = Instant::now();
    while watching.elapsed() < hold {
        for (a, b) in [(0, 2), (2, 0), (1, 3), (3, 1), (0, 3), (3, 0)] {
            let live = nodes[a].gossip.live().await;
            assert!(
                live.iter().any(|r| r.id == nodes[b].record.id),
                "node {} lost node {} across the cut after {:?}",
                nodes[a].record.id,
                nodes[b].record.id,
                watching.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        nodes[0].gossip.stats().send_failures > 0,
        "the cut link was never tried"
    );
    assert!(all_see(all, expected_ref).await);
    shutdown(nodes).await;
}

/// A restarted node (same id and address, next generation, new record) replaces its old
/// self everywhere without being declared dead first, and stays when the old generation
/// would have been.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_is_a_new_generation() {
    let net = MemNet::default();
    let mut nodes = start_mesh(&net).await;
    let expected = records_of(&nodes);
    wait_all_see("convergence", &nodes, &expected).await;

    let old = nodes.remove(5);
    net.kill(old.config.advertise);
    old.gossip.shutdown().await;
    let config = GossipConfig {
        generation: old.config.generation + 1,
        ..old.config.clone()
    };
    let record = NodeRecord {
        load: 777,
        ..old.record.clone()
    };
    let restarted_at = Instant::now();
    nodes.push(start_node(&net, config, record).await);
    let expected = records_of(&nodes);
    {
        let all: Vec<&TestNode> = nodes.iter().collect();
        let (all, expected) = (&all[..], &expected[..]);
        let took = wait_for("the new generation everywhere", || all_see(all, expected)).await;
        eprintln!("gossip: restarted node's new record everywhere in {took:?}");
    }
    // Until well past the old generation's death, nothing changes.
    let all: Vec<&TestNode> = nodes.iter().collect();
    while restarted_at.elapsed() < DEAD_AFTER + DETECTION_MARGIN {
        assert!(
            all_see(&all, &expected).await,
            "view changed {:?} after the restart",
            restarted_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown(nodes).await;
}

/// Two levels: with 3 regions of 3 nodes, every node sees all nine, and only the two
/// router nodes of each region (its lowest ids) send anything to other regions: per round,
/// at most routers x other regions messages leave a region, however many nodes it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_routers_gossip_between_regions() {
    let net = MemNet::default();
    let mut nodes = Vec::new();
    for (region, name) in REGIONS.iter().enumerate() {
        for n in 0..3 {
            let id = (region * 3 + n) as u64 + 1;
            let config = GossipConfig {
                node_id: id,
                advertise: gossip_addr(region, n),
                seeds: (0..3)
                    .filter(|m| *m != n)
                    .map(|m| gossip_addr(region, m))
                    .collect(),
                remote_seeds: vec![gossip_addr((region + 1) % REGIONS.len(), 0)],
                ..config_for(region * 2)
            };
            let record = NodeRecord {
                id,
                region: name.to_string(),
                addr: SocketAddr::from(([10, 0, region as u8, n as u8 + 1], 7000)),
                ..record_for(region * 2)
            };
            nodes.push(start_node(&net, config, record).await);
        }
    }
    let expected = records_of(&nodes);
    let took = wait_all_see("all nine everywhere", &nodes, &expected).await;
    eprintln!("gossip: 3 regions x 3 nodes converged in {took:?}");

    let before: Vec<GossipStats> = nodes.iter().map(|n| n.gossip.stats()).collect();
    let rounds = 20;
    tokio::time::sleep(INTERVAL * rounds).await;
    let sent: Vec<u64> = nodes
        .iter()
        .zip(&before)
        .map(|(n, b)| n.gossip.stats().sent_between_regions - b.sent_between_regions)
        .collect();
    eprintln!("gossip: messages between regions per node over {rounds} rounds: {sent:?}");
    for (region, per_node) in sent.chunks(3).enumerate() {
        assert_eq!(
            per_node[2], 0,
            "{}: the third node is no router but sent {} between regions",
            REGIONS[region], per_node[2]
        );
        let per_round = (per_node[0] + per_node[1]) as f64 / rounds as f64;
        let bound = (membership::ROUTERS * (REGIONS.len() - 1)) as f64;
        assert!(
            per_node[0] > 0 && per_node[1] > 0 && per_round <= bound * 1.25,
            "{}: {per_round} messages between regions per round (bound {bound})",
            REGIONS[region]
        );
    }
    let all: Vec<&TestNode> = nodes.iter().collect();
    assert!(all_see(&all, &expected).await);
    shutdown(nodes).await;
}

/// The node's driver spawns these.
#[allow(dead_code)]
fn futures_are_send(gossip: &Gossip, record: &NodeRecord, link: Arc<dyn GossipLink>) {
    fn send<T: Send>(_: T) {}
    send(Gossip::start(config_for(0), link));
    send(gossip.publish(record));
    send(gossip.live());
    send(gossip.subscribe());
}

#[test]
fn handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Gossip>();
    send_sync::<GossipInbox>();
    send_sync::<GossipConfig>();
    send_sync::<NodeRecord>();
    send_sync::<GossipError>();
}
