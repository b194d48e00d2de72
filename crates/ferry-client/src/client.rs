//! Connections, request/response calls and the admin, fetch, group and domain stream APIs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_net::framing::{read_frame, write_frame};
use ferry_net::tls::{client_config, TlsIdentity};
use ferry_net::{NetError, ALPN_CLIENT, NODE_SERVER_NAME};
use ferry_proto::codec::{decode_frame, encode_frame};
use ferry_proto::wire::{
    ApiError, ClientRequest, ClientResponse, ErrorCode, InterestReach, StartFrom, TopicDescription,
};
use ferry_proto::{
    validate_stream_name, Event, EventBatch, Limits, NodeId, StoredBatch, StreamEvent, TopicConfig,
};

use crate::{ClientError, Producer, ProducerOptions, Subscription};

/// How to reach a region.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Any nodes of the region; the client learns the rest.
    pub servers: Vec<SocketAddr>,
    /// The client's certificate, signed by the cluster CA.
    pub identity: TlsIdentity,
    /// Size limits (must not exceed the nodes').
    pub limits: Limits,
    /// Deadline of one request/response call.
    pub request_timeout: Duration,
    /// Deadline of a QUIC handshake.
    pub connect_timeout: Duration,
}

impl ClientOptions {
    /// Options with default limits and a 10 s request deadline.
    pub fn new(servers: Vec<SocketAddr>, identity: TlsIdentity) -> Self {
        Self {
            servers,
            identity,
            limits: Limits::default(),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

pub(crate) struct Inner {
    endpoint: quinn::Endpoint,
    tls: quinn::ClientConfig,
    pub(crate) options: ClientOptions,
    connections: tokio::sync::Mutex<HashMap<SocketAddr, quinn::Connection>>,
    /// Servers that failed to answer and have not answered since, with when that stops
    /// counting as down ([`DOWN_FOR`] after the failure).
    down: std::sync::Mutex<HashMap<SocketAddr, tokio::time::Instant>>,
    /// Partition leaders that answered lately, by (topic, partition).
    leaders: std::sync::Mutex<HashMap<(String, u32), SocketAddr>>,
    /// One turn per topic to ask the region for its leaders: callers that lost the leaders
    /// of many partitions at once (a node died) wait for one description and share it,
    /// instead of asking once per partition.
    describing: std::sync::Mutex<HashMap<String, Arc<Describing>>>,
}

/// The turn to describe one topic, and what the last turn got.
#[derive(Default)]
struct Describing {
    /// Descriptions got so far.
    made: std::sync::atomic::AtomicU64,
    /// The turn, holding the last description got.
    last: tokio::sync::Mutex<Option<Arc<TopicDescription>>>,
}

/// How long a leader on an unreachable server is passed over (asked about again instead);
/// as a server to send requests to, it stays last until it answers.
const DOWN_FOR: Duration = Duration::from_secs(5);

/// Where a domain stream append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamAppend {
    /// Offset of the batch's first event in the partition.
    pub base_offset: u64,
    /// Stream version of the batch's first event.
    pub first_version: u64,
    /// The stream's version after the append (that of the batch's last event).
    pub version: u64,
}

/// A connection to a region. Cloning shares it.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

fn unexpected(response: ClientResponse) -> ClientError {
    match response {
        ClientResponse::Error(e) => ClientError::Api(e),
        other => ClientError::Unexpected(format!("{other:?}").chars().take(200).collect()),
    }
}

impl Client {
    /// Prepares a client; connections are made on first use.
    pub fn new(options: ClientOptions) -> Result<Self, ClientError> {
        if options.servers.is_empty() {
            return Err(ClientError::NoServer("no server address given".into()));
        }
        let tls = client_config(&options.identity, ALPN_CLIENT)?;
        let bind: SocketAddr = if options.servers[0].is_ipv6() {
            "[::]:0".parse().expect("literal")
        } else {
            "0.0.0.0:0".parse().expect("literal")
        };
        let endpoint = quinn::Endpoint::client(bind).map_err(|e| NetError::Bind {
            addr: bind,
            source: e,
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                endpoint,
                tls,
                options,
                connections: tokio::sync::Mutex::new(HashMap::new()),
                down: std::sync::Mutex::new(HashMap::new()),
                leaders: std::sync::Mutex::new(HashMap::new()),
                describing: std::sync::Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The configured servers.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.inner.options.servers
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.inner.options.limits
    }

    pub(crate) async fn connection(
        &self,
        addr: SocketAddr,
    ) -> Result<quinn::Connection, ClientError> {
        {
            let mut connections = self.inner.connections.lock().await;
            if let Some(c) = connections.get(&addr) {
                if c.close_reason().is_none() {
                    return Ok(c.clone());
                }
                connections.remove(&addr);
            }
        }
        // Dial without holding the map: a dead node must not hold up calls to live ones.
        let failed = |reason: String| NetError::Connect {
            peer: 0,
            addr: addr.to_string(),
            reason,
        };
        let connecting = self
            .inner
            .endpoint
            .connect_with(self.inner.tls.clone(), addr, NODE_SERVER_NAME)
            .map_err(|e| failed(e.to_string()))?;
        let timeout = self.inner.options.connect_timeout;
        let connection = match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                self.mark_down(addr);
                return Err(failed(e.to_string()).into());
            }
            Err(_) => {
                self.mark_down(addr);
                return Err(ClientError::Timeout(format!("connecting to {addr}")));
            }
        };
        self.mark_up(addr);
        self.inner
            .connections
            .lock()
            .await
            .insert(addr, connection.clone());
        Ok(connection)
    }

    /// Remembers that `addr` did not answer, so requests try other servers first for a while.
    fn mark_down(&self, addr: SocketAddr) {
        if let Ok(mut down) = self.inner.down.lock() {
            down.insert(addr, tokio::time::Instant::now() + DOWN_FOR);
        }
    }

    /// Forgets that `addr` did not answer: it just did.
    fn mark_up(&self, addr: SocketAddr) {
        if let Ok(mut down) = self.inner.down.lock() {
            if !down.is_empty() {
                down.remove(&addr);
            }
        }
    }

    /// Whether `addr` did not answer lately.
    pub(crate) fn is_down(&self, addr: SocketAddr) -> bool {
        let now = tokio::time::Instant::now();
        self.inner
            .down
            .lock()
            .is_ok_and(|d| d.get(&addr).is_some_and(|until| *until > now))
    }

    /// Remembers the leaders `d` names for the partitions of `topic` with none remembered
    /// (one that answered since is fresher than the description), but those on servers that
    /// did not answer lately.
    fn learn_leaders(&self, topic: &str, d: &TopicDescription) {
        let named: Vec<(u32, SocketAddr)> = (0..d.partitions.len() as u32)
            .filter_map(|p| Some((p, leader_in(d, p)?)))
            .filter(|(_, addr)| !self.is_down(*addr))
            .collect();
        if let Ok(mut leaders) = self.inner.leaders.lock() {
            for (p, addr) in named {
                leaders.entry((topic.to_string(), p)).or_insert(addr);
            }
        }
    }

    /// A description of `topic`: the one another caller got while this one waited for its
    /// turn (`made_before` is the count of descriptions when this one started waiting), or
    /// a new one. Gives up at `deadline`.
    async fn describe_in_turn(
        &self,
        topic: &str,
        turn: &Describing,
        made_before: u64,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<TopicDescription>, ClientError> {
        use std::sync::atomic::Ordering;
        let mut last = tokio::time::timeout_at(deadline, turn.last.lock())
            .await
            .map_err(|_| ClientError::Timeout(format!("waiting to describe {topic}")))?;
        if let Some(d) = last.as_ref() {
            if turn.made.load(Ordering::Acquire) != made_before {
                return Ok(d.clone());
            }
        }
        let d = Arc::new(self.describe_topic(topic).await?);
        self.learn_leaders(topic, &d);
        *last = Some(d.clone());
        turn.made.fetch_add(1, Ordering::Release);
        Ok(d)
    }

    /// Servers in the order to try them: those that failed to answer last, until they answer
    /// again (a node that left the region, listed when the client was made, would otherwise
    /// cost every request a dial timeout whenever its down mark ran out).
    fn servers_to_try(&self) -> Vec<SocketAddr> {
        let failed = self
            .inner
            .down
            .lock()
            .map(|d| d.keys().copied().collect::<Vec<_>>())
            .unwrap_or_default();
        let (mut up, unreachable): (Vec<_>, Vec<_>) = self
            .inner
            .options
            .servers
            .iter()
            .partition(|a| !failed.contains(a));
        up.extend(unreachable);
        up
    }

    /// Drops the connection to `addr` (the next request dials again); answers it.
    pub(crate) async fn forget(&self, addr: SocketAddr) -> Option<quinn::Connection> {
        self.inner.connections.lock().await.remove(&addr)
    }

    pub(crate) fn encode(&self, request: &ClientRequest) -> Result<bytes::Bytes, ClientError> {
        Ok(encode_frame(
            "client request",
            request,
            self.limits().max_frame,
        )?)
    }

    pub(crate) fn decode(&self, frame: &[u8]) -> Result<ClientResponse, ClientError> {
        Ok(decode_frame(
            "client response",
            frame,
            self.limits().max_frame,
        )?)
    }

    /// One request to one node.
    pub async fn request_at(
        &self,
        addr: SocketAddr,
        request: &ClientRequest,
    ) -> Result<ClientResponse, ClientError> {
        let frame = self.encode(request)?;
        let call = async {
            let connection = self.connection(addr).await?;
            let (mut send, mut recv) = connection
                .open_bi()
                .await
                .map_err(|e| NetError::Closed(e.to_string()))?;
            write_frame(&mut send, frame.clone()).await?;
            let _ = send.finish();
            match read_frame(&mut recv, self.limits().max_frame).await? {
                Some(reply) => self.decode(&reply),
                None => Err(ClientError::Closed(format!(
                    "{addr} closed the stream without answering"
                ))),
            }
        };
        match tokio::time::timeout(self.inner.options.request_timeout, call).await {
            Ok(Ok(r)) => {
                self.mark_up(addr);
                Ok(r)
            }
            Ok(Err(e)) => {
                // A connection that timed out heard nothing from the server for the QUIC
                // idle timeout: try the others first for a while, as after a failed dial.
                if self.forget(addr).await.is_some_and(|c| {
                    matches!(c.close_reason(), Some(quinn::ConnectionError::TimedOut))
                }) {
                    self.mark_down(addr);
                }
                Err(e)
            }
            Err(_) => {
                self.forget(addr).await;
                Err(ClientError::Timeout(format!("request to {addr}")))
            }
        }
    }

    /// One request to the first server that answers it (nodes forward what they cannot
    /// serve). A transient refusal (no leader yet, no quorum, a node that holds no replica of
    /// the partition and could not forward) moves on to the next server; when every server
    /// refused so, the round is retried with backoff until the request deadline.
    pub async fn request(&self, request: &ClientRequest) -> Result<ClientResponse, ClientError> {
        let deadline = tokio::time::Instant::now() + self.inner.options.request_timeout;
        let mut backoff = Duration::from_millis(20);
        loop {
            let mut failures = Vec::new();
            let mut refused = None;
            for addr in self.servers_to_try() {
                let answer = if refused.is_some() {
                    // With a refusal in hand, the others get what is left of the deadline.
                    match tokio::time::timeout_at(deadline, self.request_at(addr, request)).await {
                        Ok(answer) => answer,
                        // Cut off mid-call: the outcome is unknown (it may have been applied).
                        Err(_) => {
                            self.forget(addr).await;
                            return Err(ClientError::Timeout(format!("request to {addr}")));
                        }
                    }
                } else {
                    self.request_at(addr, request).await
                };
                match answer {
                    Ok(ClientResponse::Error(e)) if e.is_retriable() => {
                        refused = Some(ClientResponse::Error(e));
                    }
                    Ok(r) => return Ok(r),
                    Err(e @ ClientError::Proto(_)) => return Err(e),
                    Err(e) => failures.push(format!("{addr}: {e}")),
                }
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
            let Some(refused) = refused else {
                return Err(ClientError::NoServer(failures.join("; ")));
            };
            if tokio::time::Instant::now() + backoff >= deadline {
                return Ok(refused);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Creates a topic (idempotent for an identical configuration).
    pub async fn create_topic(&self, config: TopicConfig) -> Result<(), ClientError> {
        config.validate()?;
        match self.request(&ClientRequest::CreateTopic(config)).await? {
            ClientResponse::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Registers (or replaces) a named interest of the region in `subjects`: events of other
    /// regions appended from now on whose subject matches are forwarded to it. Answers the
    /// region's interest version after the change (for [`Client::await_interest`]).
    pub async fn add_interest(&self, name: &str, subjects: &str) -> Result<u64, ClientError> {
        let request = ClientRequest::AddInterest {
            name: name.into(),
            subjects: subjects.into(),
        };
        match self.request(&request).await? {
            ClientResponse::InterestAdded(reach) => Ok(reach.version),
            other => Err(unexpected(other)),
        }
    }

    /// Waits until every other region of the mesh holds this region's interests at `version`
    /// or newer, at most `wait`; answers which regions do and which not yet. Not needed for
    /// delivery (an event appended after the interest was added waits at its source until
    /// the source knows), only to report how far the interest has spread.
    pub async fn await_interest(
        &self,
        version: u64,
        wait: Duration,
    ) -> Result<InterestReach, ClientError> {
        let deadline = tokio::time::Instant::now() + wait;
        // Each call waits at most half the request timeout, so none times out.
        let step = self.inner.options.request_timeout / 2;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let request = ClientRequest::AwaitInterest {
                version,
                wait_ms: left.min(step).as_millis() as u64,
            };
            let reach = match self.request(&request).await? {
                ClientResponse::InterestAdded(reach) => reach,
                other => return Err(unexpected(other)),
            };
            if reach.waiting_for.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(reach);
            }
        }
    }

    /// Removes a named interest.
    pub async fn remove_interest(&self, name: &str) -> Result<(), ClientError> {
        match self
            .request(&ClientRequest::RemoveInterest { name: name.into() })
            .await?
        {
            ClientResponse::Ok | ClientResponse::InterestAdded(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The region's named interests: (name, subject filter).
    pub async fn interests(&self) -> Result<Vec<(String, String)>, ClientError> {
        match self.request(&ClientRequest::ListInterests).await? {
            ClientResponse::Interests(i) => Ok(i),
            other => Err(unexpected(other)),
        }
    }

    /// The mesh as the answering node sees it.
    pub async fn regions(&self) -> Result<ferry_proto::wire::MeshReport, ClientError> {
        match self.request(&ClientRequest::Regions).await? {
            ClientResponse::Regions(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// The region's nodes.
    pub async fn list_nodes(&self) -> Result<Vec<ferry_proto::wire::NodeInfo>, ClientError> {
        self.node_request(ClientRequest::ListNodes).await
    }

    /// Adds node `id` listening at `addr` to the region; answers the region's nodes.
    pub async fn add_node(
        &self,
        id: NodeId,
        addr: &str,
    ) -> Result<Vec<ferry_proto::wire::NodeInfo>, ClientError> {
        self.node_request(ClientRequest::AddNode {
            id,
            addr: addr.into(),
        })
        .await
    }

    /// Starts draining node `id` (or, with `undo`, stops); answers the region's nodes.
    pub async fn drain_node(
        &self,
        id: NodeId,
        undo: bool,
    ) -> Result<Vec<ferry_proto::wire::NodeInfo>, ClientError> {
        self.node_request(ClientRequest::DrainNode { id, undo })
            .await
    }

    /// Removes node `id` from the region (`dead`: it is gone; its replicas are made again
    /// elsewhere); answers the region's nodes.
    pub async fn remove_node(
        &self,
        id: NodeId,
        dead: bool,
    ) -> Result<Vec<ferry_proto::wire::NodeInfo>, ClientError> {
        self.node_request(ClientRequest::RemoveNode { id, dead })
            .await
    }

    async fn node_request(
        &self,
        request: ClientRequest,
    ) -> Result<Vec<ferry_proto::wire::NodeInfo>, ClientError> {
        match self.request(&request).await? {
            ClientResponse::Nodes(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    /// Moves the replica of `topic/partition`'s Raft group from node `from` to node `to`;
    /// answers once the move is recorded ([`Client::describe_topic`] shows its progress).
    pub async fn move_replica(
        &self,
        topic: &str,
        partition: u32,
        from: NodeId,
        to: NodeId,
    ) -> Result<(), ClientError> {
        let request = ClientRequest::MoveReplica {
            topic: topic.into(),
            partition,
            from,
            to,
        };
        match self.request(&request).await? {
            ClientResponse::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Grows `topic` to `partitions` partitions (at most doubling it): each new partition
    /// takes keys from one existing partition, its parent ([`ferry_proto::KeyLayout`]). Answers
    /// once recorded; the parents seal shortly after ([`Client::describe_topic`] shows the
    /// seals in its `layout`).
    pub async fn add_partitions(&self, topic: &str, partitions: u32) -> Result<(), ClientError> {
        let request = ClientRequest::AddPartitions {
            topic: topic.into(),
            partitions,
        };
        match self.request(&request).await? {
            ClientResponse::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Spreads replicas and preferred leaders over the region's nodes: the plan, carried
    /// out unless `dry_run`.
    pub async fn rebalance(
        &self,
        dry_run: bool,
    ) -> Result<Vec<ferry_proto::wire::PlannedChange>, ClientError> {
        match self.request(&ClientRequest::Rebalance { dry_run }).await? {
            ClientResponse::RebalancePlan(plan) => Ok(plan),
            other => Err(unexpected(other)),
        }
    }

    /// Every topic.
    pub async fn list_topics(&self) -> Result<Vec<TopicConfig>, ClientError> {
        match self.request(&ClientRequest::ListTopics).await? {
            ClientResponse::Topics(t) => Ok(t),
            other => Err(unexpected(other)),
        }
    }

    /// A topic with partition leaders and offsets.
    pub async fn describe_topic(&self, topic: &str) -> Result<TopicDescription, ClientError> {
        let request = ClientRequest::DescribeTopic {
            topic: topic.into(),
        };
        match self.request(&request).await? {
            ClientResponse::Topic(d) => Ok(d),
            other => Err(unexpected(other)),
        }
    }

    /// The address of the leader of `topic/partition`: from a description of the topic, or
    /// if it names none, from the partition's replicas; retried with backoff until
    /// `deadline`.
    pub(crate) async fn leader_addr(
        &self,
        topic: &str,
        partition: u32,
        deadline: tokio::time::Instant,
    ) -> Result<SocketAddr, ClientError> {
        let mut backoff = Duration::from_millis(20);
        let turn = {
            let mut describing = self
                .inner
                .describing
                .lock()
                .map_err(|_| ClientError::Closed("client state poisoned".into()))?;
            describing.entry(topic.to_string()).or_default().clone()
        };
        loop {
            let made_before = turn.made.load(std::sync::atomic::Ordering::Acquire);
            let result = self
                .describe_in_turn(topic, &turn, made_before, deadline)
                .await;
            if let Ok(d) = &result {
                let addr_of = |id: NodeId| node_addr(d, id);
                let info = d.partitions.get(partition as usize);
                if info.is_none() {
                    return Err(ClientError::Api(ApiError::new(
                        ErrorCode::UnknownPartition,
                        format!(
                            "topic {topic:?} has {} partitions; {partition} is out of range",
                            d.config.partitions
                        ),
                    )));
                }
                // A leader on a server that did not answer lately is likely gone: ask again
                // after the backoff rather than wait on it (the region elects meanwhile).
                if let Some(addr) = leader_in(d, partition).filter(|a| !self.is_down(*a)) {
                    return Ok(addr);
                }
                // The answering node does not host the partition: ask its replicas.
                for replica in info.map(|p| p.replicas.clone()).unwrap_or_default() {
                    let Some(at) = addr_of(replica).filter(|a| !self.is_down(*a)) else {
                        continue;
                    };
                    let request = ClientRequest::DescribeTopic {
                        topic: topic.into(),
                    };
                    if let Ok(ClientResponse::Topic(d)) = self.request_at(at, &request).await {
                        let leader = d.partitions.get(partition as usize).and_then(|p| p.leader);
                        if let Some(addr) = leader.and_then(addr_of).filter(|a| !self.is_down(*a)) {
                            return Ok(addr);
                        }
                    }
                }
            }
            if let Err(e @ ClientError::Api(_)) = result {
                return Err(e);
            }
            if tokio::time::Instant::now() + backoff > deadline {
                return Err(ClientError::Timeout(format!(
                    "finding the leader of {topic}/{partition}"
                )));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// One request to the leader of `topic/partition` (the one that answered last, else the
    /// one the region names; a node that no longer leads forwards to its successor). Leader
    /// changes, refusals that may pass ([`ApiError::is_retriable`]) and unreachable leaders
    /// are retried with backoff, asking the region again, until the request deadline.
    ///
    async fn leader_request(
        &self,
        topic: &str,
        partition: u32,
        request: &ClientRequest,
    ) -> Result<ClientResponse, ClientError> {
        let deadline = tokio::time::Instant::now() + self.inner.options.request_timeout;
        let key = (topic.to_string(), partition);
        let mut backoff = Duration::from_millis(20);
        loop {
            let cached = self
                .inner
                .leaders
                .lock()
                .ok()
                .and_then(|l| l.get(&key).copied());
            let addr = match cached {
                Some(addr) => addr,
                None => self.leader_addr(topic, partition, deadline).await?,
            };
            let result = self.request_at(addr, request).await;
            let retry = match &result {
                Ok(ClientResponse::Error(e)) => e.is_retriable(),
                Ok(_) | Err(ClientError::Proto(_)) => false,
                Err(_) => true,
            };
            if let Ok(mut leaders) = self.inner.leaders.lock() {
                if retry {
                    leaders.remove(&key);
                } else {
                    leaders.insert(key.clone(), addr);
                }
            }
            if !retry || tokio::time::Instant::now() + backoff >= deadline {
                return result;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Appends one batch, numbered by the caller, to `topic/partition` through its leader and
    /// answers `(base offset, count, duplicate)`. For callers that keep their batches
    /// themselves (the sidecar's outbox) and resend each unchanged until it is acknowledged:
    /// a resend the partition recognises by (producer, sequence) is answered with the
    /// original offsets (`duplicate`), or, once older than the dedupe window, with
    /// [`ErrorCode::AlreadyAppended`].
    pub async fn publish_batch(
        &self,
        topic: &str,
        partition: u32,
        batch: EventBatch,
    ) -> Result<(u64, u32, bool), ClientError> {
        let request = ClientRequest::Publish {
            topic: topic.into(),
            partition,
            batch,
        };
        match self.leader_request(topic, partition, &request).await? {
            ClientResponse::Published {
                base_offset,
                count,
                duplicate,
            } => Ok((base_offset, count, duplicate)),
            other => Err(unexpected(other)),
        }
    }

    /// Appends `batch` to domain stream `stream` (in `topic/partition`) atomically, iff the
    /// stream's version — the number of events ever appended to it — is `expected_version`
    /// (`Some(0)`: the stream must not exist yet; None: any version). The partition checks
    /// the version as it applies the append, so of several writers expecting one version
    /// exactly one succeeds; the others get [`ClientError::Api`] with
    /// [`ErrorCode::VersionConflict`] (see
    /// [`ClientError::code`]) and append nothing.
    ///
    /// Every event of one stream must go to one partition (e.g.
    /// [`KeyLayout::stream_partition`](ferry_proto::KeyLayout::stream_partition) of the
    /// stream name: a stream stays where it was created when the topic grows). A call
    /// retried after a lost answer may find its own earlier append: with an expected version
    /// it then fails with a conflict, without one it appends again, unless the batch carries
    /// a producer id and sequence, in which case the resend is answered with the original
    /// append.
    pub async fn append_to_stream(
        &self,
        topic: &str,
        partition: u32,
        stream: &str,
        expected_version: Option<u64>,
        batch: EventBatch,
    ) -> Result<StreamAppend, ClientError> {
        validate_stream_name(stream)?;
        let request = ClientRequest::AppendToStream {
            topic: topic.into(),
            partition,
            stream: stream.into(),
            expected_version,
            batch,
        };
        match self.leader_request(topic, partition, &request).await? {
            ClientResponse::StreamAppended {
                base_offset,
                first_version,
                version,
            } => Ok(StreamAppend {
                base_offset,
                first_version,
                version,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Reads domain stream `stream` (in `topic/partition`) from version `from_version` on, at
    /// most `max_events` events in version order (fewer when the stream ends, the answer
    /// would be too large, or retention dropped older events), from the partition's leader:
    /// every append acknowledged before the call is seen. Answers the stream's current
    /// version (0 if it does not exist) with the events.
    pub async fn read_stream(
        &self,
        topic: &str,
        partition: u32,
        stream: &str,
        from_version: u64,
        max_events: u32,
    ) -> Result<(u64, Vec<StreamEvent>), ClientError> {
        validate_stream_name(stream)?;
        let request = ClientRequest::ReadStream {
            topic: topic.into(),
            partition,
            stream: stream.into(),
            from_version,
            max_events,
        };
        match self.leader_request(topic, partition, &request).await? {
            ClientResponse::StreamEvents { version, events } => Ok((version, events)),
            other => Err(unexpected(other)),
        }
    }

    /// Committed events of a partition from `offset`, up to about `max_bytes`.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
    ) -> Result<(Vec<(u64, Event)>, u64), ClientError> {
        let request = ClientRequest::Fetch {
            topic: topic.into(),
            partition,
            offset,
            max_bytes,
        };
        // To the partition's leader: in a region with more nodes than replicas (or after a
        // replica moved) the first server may not hold the partition at all.
        match self.leader_request(topic, partition, &request).await? {
            ClientResponse::Batches {
                batches,
                high_watermark,
            } => Ok((events_from(&batches, offset)?, high_watermark)),
            other => Err(unexpected(other)),
        }
    }

    /// Creates `config`'s topic unless it exists, then waits until every partition has a
    /// leader (bounded by `timeout`). Returns the topic as it is (an existing topic keeps its
    /// own configuration).
    pub async fn ensure_topic(
        &self,
        config: &TopicConfig,
        timeout: Duration,
    ) -> Result<TopicDescription, ClientError> {
        if self.describe_topic(&config.name).await.is_err() {
            if let Err(e) = self.create_topic(config.clone()).await {
                // Another client may have created it meanwhile.
                if self.describe_topic(&config.name).await.is_err() {
                    return Err(e);
                }
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let description = self.describe_topic(&config.name).await?;
            if description.partitions.iter().all(|p| p.leader.is_some()) {
                return Ok(description);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Timeout(format!(
                    "waiting for leaders of every partition of {}",
                    config.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Streams a partition's events as they are committed.
    pub async fn subscribe(
        &self,
        topic: &str,
        partition: u32,
        from: StartFrom,
    ) -> Result<Subscription, ClientError> {
        Subscription::open(self.clone(), topic.to_string(), partition, from).await
    }

    /// A producer for `topic`.
    pub async fn producer(
        &self,
        topic: &str,
        options: ProducerOptions,
    ) -> Result<Producer, ClientError> {
        let description = self.describe_topic(topic).await?;
        Ok(Producer::new(self.clone(), description, options))
    }

    /// Joins (or heartbeats in) a consumer group: (generation, partitions of this member).
    pub async fn join_group(
        &self,
        group: &str,
        topic: &str,
        member: &str,
    ) -> Result<(u64, Vec<u32>), ClientError> {
        let request = ClientRequest::JoinGroup {
            group: group.into(),
            topic: topic.into(),
            member: member.into(),
        };
        match self.request(&request).await? {
            ClientResponse::Assignment {
                generation,
                partitions,
            } => Ok((generation, partitions)),
            other => Err(unexpected(other)),
        }
    }

    /// Leaves a consumer group.
    pub async fn leave_group(
        &self,
        group: &str,
        topic: &str,
        member: &str,
    ) -> Result<(), ClientError> {
        let request = ClientRequest::LeaveGroup {
            group: group.into(),
            topic: topic.into(),
            member: member.into(),
        };
        match self.request(&request).await? {
            ClientResponse::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Commits a group's cursor (the next offset to consume) through Raft.
    pub async fn commit(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), ClientError> {
        let request = ClientRequest::CommitOffset {
            group: group.into(),
            topic: topic.into(),
            partition,
            offset,
        };
        match self.request(&request).await? {
            ClientResponse::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// A group's committed cursor.
    pub async fn committed(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
    ) -> Result<Option<u64>, ClientError> {
        let request = ClientRequest::CommittedOffset {
            group: group.into(),
            topic: topic.into(),
            partition,
        };
        match self.request(&request).await? {
            ClientResponse::Committed(o) => Ok(o),
            other => Err(unexpected(other)),
        }
    }
}

/// Events of `batches` at or after `from`.
pub(crate) fn events_from(
    batches: &[StoredBatch],
    from: u64,
) -> Result<Vec<(u64, Event)>, ClientError> {
    let mut out = Vec::new();
    for batch in batches {
        out.extend(
            batch
                .decode()?
                .into_iter()
                .filter(|(offset, _)| *offset >= from),
        );
    }
    Ok(out)
}

/// The client address of node `id` in a topic description.
pub(crate) fn node_addr(d: &TopicDescription, id: NodeId) -> Option<SocketAddr> {
    d.nodes
        .iter()
        .find(|n| n.id == id)
        .and_then(|n| n.client_addr.parse::<SocketAddr>().ok())
}

/// The client address of the leader a topic description names for `partition`.
pub(crate) fn leader_in(d: &TopicDescription, partition: u32) -> Option<SocketAddr> {
    let leader = d.partitions.get(partition as usize)?.leader?;
    node_addr(d, leader)
}
