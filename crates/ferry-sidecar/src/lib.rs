//! Ferry's service sidecar. A service talks to it on localhost with Dapr's pub/sub HTTP API
//! and CloudEvents 1.0; it keeps accepted publishes in a durable outbox until the region has
//! them, delivers subscribed events to the app, and serves a domain event store.
//!
//! Pieces:
//! - [`cloudevent`]: the CloudEvent a publish request becomes (structured, binary and wrapped
//!   modes, `rawPayload`, `cloudevent.*`, `partitionKey` and `ttlInSeconds` metadata);
//! - [`outbox`]: the sled outbox, its group commit and the [`outbox::Sequencer`] that numbers
//!   records so resends are recognised; `drain` sends it to the region;
//! - [`subscription`] and [`route`]: Dapr's programmatic and declarative subscriptions and
//!   their `match` rules (a documented CEL subset);
//! - [`delivery`]: consumer-group members that post events to the app and act on its answer;
//! - [`streams`]: the event store (expected-version appends, stream and category reads);
//! - the HTTP layer (axum): `/v1.0/publish`, bulk publish, `/v1.0-ferry/streams`,
//!   `/v1.0/healthz`, `/v1.0/metadata`, `/metrics`.
#![warn(missing_docs, unreachable_pub)]

pub mod cloudevent;
pub mod config;
pub mod delivery;
mod drain;
mod http;
pub mod outbox;
pub mod route;
pub mod streams;
pub mod subscription;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ferry_client::{Client, ClientError, ClientOptions};
use ferry_proto::wire::ErrorCode;
use ferry_proto::{EventClass, Limits, RegionPolicy, TopicConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::SidecarConfig;
pub use drain::RegionLink;

use crate::outbox::{Outbox, TopicShape};
use crate::subscription::Subscription;

/// Errors of the sidecar.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// A configuration value is invalid.
    #[error("config {key}: {reason}")]
    Config {
        /// The key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A declarative subscription file is invalid.
    #[error(transparent)]
    Subscription(#[from] subscription::SubscriptionError),
    /// The outbox could not be opened.
    #[error(transparent)]
    Outbox(#[from] outbox::OutboxError),
    /// The region client could not be set up.
    #[error("region: {0}")]
    Region(#[from] ClientError),
    /// Certificates could not be loaded.
    #[error(transparent)]
    Tls(#[from] ferry_net::NetError),
    /// The HTTP listener failed.
    #[error("http {addr}: {reason}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A new event id: a random UUID (version 4) in its usual text form.
pub fn new_event_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) published: AtomicU64,
    pub(crate) publish_refused: AtomicU64,
    pub(crate) outbox_full: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) unrouted: AtomicU64,
    pub(crate) commit_failures: AtomicU64,
    pub(crate) stream_appends: AtomicU64,
    pub(crate) stream_conflicts: AtomicU64,
    pub(crate) discovery_attempts: AtomicU64,
    /// Requests refused over `limits.max_concurrent_requests`.
    pub(crate) too_busy: AtomicU64,
}

/// Why a topic's partition count is not known.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum TopicLookup {
    /// The region has no such topic.
    #[error("topic {0} does not exist")]
    Unknown(String),
    /// The region could not be asked and the topic was never seen.
    #[error("topic {topic} was never seen and the region cannot be reached: {reason}")]
    Unreachable { topic: String, reason: String },
}

/// A subscription and how it is doing.
pub(crate) struct SubscriptionState {
    pub(crate) subscription: Arc<Subscription>,
    pub(crate) status: String,
}

/// State shared by the HTTP handlers, the drainer and the deliveries.
pub(crate) struct Shared {
    pub(crate) config: SidecarConfig,
    pub(crate) client: Client,
    pub(crate) outbox: Outbox,
    pub(crate) link: Arc<RegionLink>,
    pub(crate) metrics: Metrics,
    pub(crate) limits: Limits,
    /// This process in its app's consumer groups.
    pub(crate) instance: String,
    pub(crate) subscriptions: Mutex<Vec<SubscriptionState>>,
    /// Permits for requests in progress (`limits.max_concurrent_requests`).
    pub(crate) requests: Arc<tokio::sync::Semaphore>,
    /// How discovery through `GET /dapr/subscribe` went.
    pub(crate) discovery: Mutex<String>,
    /// Per event-store partition: the producer identity its appends are numbered with.
    stream_lanes: Mutex<HashMap<(String, u32), SharedStreamLane>>,
    app: reqwest::Client,
}

/// A stream lane, locked for the length of one append.
pub(crate) type SharedStreamLane = Arc<tokio::sync::Mutex<StreamLane>>;

/// The producer identity of one event-store partition's appends from this sidecar.
pub(crate) struct StreamLane {
    pub(crate) producer: ferry_proto::ProducerId,
    pub(crate) next_seq: u64,
}

impl StreamLane {
    /// A new producer (random id), starting at sequence 0.
    pub(crate) fn fresh() -> Self {
        Self {
            producer: rand::random(),
            next_seq: 0,
        }
    }
}

impl Shared {
    /// A topic's shape (partitions, and those it was created with): remembered, else asked
    /// of the region (and remembered).
    pub(crate) async fn shape(&self, topic: &str) -> Result<TopicShape, TopicLookup> {
        // Kept by the outbox (which also learns it when the topic grows).
        if let Some(shape) = self.outbox.known_shape(topic) {
            return Ok(shape);
        }
        let asked =
            tokio::time::timeout(Duration::from_secs(3), self.client.describe_topic(topic)).await;
        match asked {
            Ok(Ok(description)) => {
                let shape = TopicShape::of(&description);
                self.learn(topic, shape);
                Ok(shape)
            }
            Ok(Err(ClientError::Api(e))) if e.code == ErrorCode::UnknownTopic => {
                Err(TopicLookup::Unknown(topic.into()))
            }
            Ok(Err(e)) => Err(TopicLookup::Unreachable {
                topic: topic.into(),
                reason: e.to_string(),
            }),
            Err(_) => Err(TopicLookup::Unreachable {
                topic: topic.into(),
                reason: "no answer within 3 s".into(),
            }),
        }
    }

    /// The producer lane of an event-store partition.
    pub(crate) fn stream_lane(&self, topic: &str, partition: u32) -> SharedStreamLane {
        self.stream_lanes
            .lock()
            .expect("stream lanes")
            .entry((topic.to_string(), partition))
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(StreamLane::fresh())))
            .clone()
    }

    pub(crate) fn learn(&self, topic: &str, shape: TopicShape) {
        if let Err(e) = self.outbox.learn_shape(topic, shape) {
            tracing::warn!(%topic, error = %e, "remembering a topic failed");
        }
    }

    /// Posts to the app: (status, body), or why there was no answer.
    pub(crate) async fn post(
        &self,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<(u16, Bytes), String> {
        let base = self
            .config
            .app_url()
            .ok_or_else(|| "no app port configured".to_string())?;
        let response = self
            .app
            .post(format!("{base}{path}"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .map_err(|e| format!("calling the app: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .bytes()
            .await
            .map_err(|e| format!("reading the app's answer: {e}"))?;
        Ok((status, body))
    }

    pub(crate) fn set_status(&self, key: &str, status: String) {
        let mut subs = self.subscriptions.lock().expect("subscriptions");
        if let Some(s) = subs
            .iter_mut()
            .find(|s| format!("{}/{}", s.subscription.pubsub, s.subscription.topic) == key)
        {
            s.status = status;
        }
    }
}

/// A running sidecar.
pub struct Sidecar {
    shared: Arc<Shared>,
    http_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Sidecar {
    /// Opens the outbox, starts sending it, serves HTTP, and starts the subscriptions
    /// (declarative ones now, the app's once `GET /dapr/subscribe` answers). The region need
    /// not be reachable: publishes to topics seen before are accepted meanwhile.
    pub async fn start(config: SidecarConfig) -> Result<Self, SidecarError> {
        config.validate()?;
        let declarative = load_declarative(&config)?;
        let identity = config.tls.load()?;
        let client = Client::new(ClientOptions::new(config.servers.clone(), identity))?;
        let limits = Limits::default();
        let (outbox, lanes) = Outbox::open(
            &config.data_dir.join("outbox"),
            config.outbox.max_events,
            config.outbox.max_bytes,
            limits,
        )?;
        let listener = tokio::net::TcpListener::bind(config.http)
            .await
            .map_err(|e| SidecarError::Http {
                addr: config.http,
                reason: e.to_string(),
            })?;
        let http_addr = listener.local_addr().map_err(|e| SidecarError::Http {
            addr: config.http,
            reason: e.to_string(),
        })?;
        let app = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.delivery.timeout_ms))
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| SidecarError::Config {
                key: "app",
                reason: e.to_string(),
            })?;
        let instance = format!("{}-{:08x}", config.app_id, rand::random::<u32>());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            link: Arc::new(RegionLink::default()),
            metrics: Metrics::default(),
            limits,
            instance,
            subscriptions: Mutex::new(Vec::new()),
            discovery: Mutex::new(String::from(if config.app_port == 0 {
                "no app (app_port is 0): publish only"
            } else {
                "not started"
            })),
            stream_lanes: Mutex::new(HashMap::new()),
            requests: Arc::new(tokio::sync::Semaphore::new(
                config.limits.max_concurrent_requests,
            )),
            app,
            client: client.clone(),
            outbox: outbox.clone(),
            config,
        });
        let tasks = vec![
            tokio::spawn(drain::run(
                outbox,
                client,
                lanes,
                shared.link.clone(),
                shutdown_rx.clone(),
            )),
            tokio::spawn(http::serve(shared.clone(), listener, shutdown_rx.clone())),
            tokio::spawn(ensure_topics(shared.clone(), shutdown_rx.clone())),
            tokio::spawn(subscribe(shared.clone(), declarative, shutdown_rx)),
        ];
        tracing::info!(app_id = %shared.config.app_id, %http_addr, "sidecar running");
        Ok(Self {
            shared,
            http_addr,
            shutdown,
            tasks,
        })
    }

    /// The HTTP address (useful with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Events accepted and not yet acknowledged by the region.
    pub fn outbox_depth(&self) -> u64 {
        self.shared.outbox.depth()
    }

    /// Stops serving and delivering (events handled but not committed come again), and
    /// writes the outbox to disk.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for mut task in self.tasks {
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                tracing::warn!("a sidecar task did not stop within 5 s; aborted");
                task.abort();
            }
        }
        if let Err(e) = self.shared.outbox.close_cleanly().await {
            tracing::warn!(error = %e, "closing the outbox at shutdown failed");
        }
    }
}

/// The declarative subscriptions of `subscriptions_dir` (`*.yaml`, `*.yml`).
fn load_declarative(config: &SidecarConfig) -> Result<Vec<Subscription>, SidecarError> {
    let Some(dir) = &config.subscriptions_dir else {
        return Ok(Vec::new());
    };
    let bad = |reason: String| SidecarError::Config {
        key: "subscriptions_dir",
        reason,
    };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| bad(format!("{}: {e}", dir.display())))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut subscriptions = Vec::new();
    for file in files {
        let text =
            std::fs::read_to_string(&file).map_err(|e| bad(format!("{}: {e}", file.display())))?;
        if let Some(s) =
            subscription::parse_declarative(&text, &file.display().to_string(), &config.app_id)?
        {
            subscriptions.push(s);
        }
    }
    Ok(subscriptions)
}

/// Creates the configured topics (retrying while the region is unreachable).
async fn ensure_topics(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    for spec in &shared.config.topics {
        let mut config = TopicConfig::new(spec.name.clone(), spec.partitions);
        config.replication = spec.replication;
        config.class = EventClass::Integration;
        if spec.mesh {
            config.regions = RegionPolicy::ByInterest;
        }
        let mut attempt = 0;
        loop {
            match shared
                .client
                .ensure_topic(&config, Duration::from_secs(30))
                .await
            {
                Ok(description) => {
                    shared.learn(&spec.name, TopicShape::of(&description));
                    break;
                }
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(topic = %spec.name, error = %e, "creating a topic failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(shared.config.delivery.backoff(attempt)) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
    }
}

/// Starts the declarative subscriptions, then discovers the app's through
/// `GET /dapr/subscribe`, retrying with backoff while the app is not ready.
async fn subscribe(
    shared: Arc<Shared>,
    declarative: Vec<Subscription>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    start_subscriptions(&shared, declarative, &mut tasks, &shutdown);
    if let Some(base) = shared.config.app_url() {
        let url = format!("{base}/dapr/subscribe");
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            shared
                .metrics
                .discovery_attempts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let answer = match shared.app.get(&url).send().await {
                Ok(r) => match (r.status().as_u16(), r.bytes().await) {
                    (status, Ok(body)) => Ok((status, body)),
                    (_, Err(e)) => Err(e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
            let waiting = match answer {
                Ok((200..=299, body)) => match subscription::parse_programmatic(&body) {
                    Ok((list, refused)) => {
                        for e in refused {
                            tracing::error!(error = %e, "an app subscription is refused");
                        }
                        *shared.discovery.lock().expect("discovery") =
                            format!("discovered {} subscriptions", list.len());
                        start_subscriptions(&shared, list, &mut tasks, &shutdown);
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the app's subscriptions are invalid");
                        *shared.discovery.lock().expect("discovery") = e.to_string();
                        break;
                    }
                },
                Ok((404, _)) => {
                    *shared.discovery.lock().expect("discovery") =
                        "the app has no programmatic subscriptions (404)".into();
                    break;
                }
                Ok((status, _)) => format!("the app answered {status}"),
                Err(e) => e,
            };
            *shared.discovery.lock().expect("discovery") =
                format!("waiting for the app (attempt {attempt}): {waiting}");
            let delay = shared
                .config
                .delivery
                .backoff(attempt)
                .min(Duration::from_millis(
                    shared.config.delivery.discovery_max_ms,
                ));
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => break,
            }
        }
    }
    let _ = shutdown.wait_for(|stop| *stop).await;
    while tasks.join_next().await.is_some() {}
}

/// Starts the subscriptions of `list` that do not repeat a running one.
fn start_subscriptions(
    shared: &Arc<Shared>,
    list: Vec<Subscription>,
    tasks: &mut tokio::task::JoinSet<()>,
    shutdown: &watch::Receiver<bool>,
) {
    let existing: Vec<Subscription> = shared
        .subscriptions
        .lock()
        .expect("subscriptions")
        .iter()
        .map(|s| (*s.subscription).clone())
        .collect();
    let running = existing.len();
    let (kept, refused) = subscription::merge(existing.into_iter().chain(list));
    for e in refused {
        tracing::warn!(error = %e, "subscription ignored");
    }
    for s in kept.into_iter().skip(running) {
        let s = Arc::new(s);
        shared
            .subscriptions
            .lock()
            .expect("subscriptions")
            .push(SubscriptionState {
                subscription: s.clone(),
                status: "starting".into(),
            });
        tasks.spawn(delivery::run(shared.clone(), s, shutdown.clone()));
    }
}
