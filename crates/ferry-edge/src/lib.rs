//! Ferry's edge node: it reads a region's notification topic, keeps a retained window per
//! channel on disk, and fans notifications out to the users connected to it over WebSocket
//! (`/ws`) and server-sent events (`/sse`), with signed user tokens, resume by last id, and
//! explicit `gap` and `lag` frames instead of silent loss.
//!
//! Pieces: [`hub`] (the fan-out state machine, no I/O), [`window`] (the sled window),
//! [`auth`] (user tokens), the connection driver shared by both transports, the region
//! reader, and the HTTP layer (axum).
//!
//! Per-user throttling ([`throttle`]) applies to users' own channels before the window, so a
//! resumed client sees the same throttled stream.
//!
//! Webhooks ([`webhook`]) are sessions too: registered per user over HTTP, delivered in order
//! with retries and a signature, resumed from the window after a restart.
//!
//! Templates ([`template`], minijinja) render per receiving user's locale at delivery, with a
//! cache so a broadcast renders once per locale.
//!
//! `/demo` is a page that shows a user's notifications live; `ferry bench fanout` (in the
//! binary) measures the edge.
#![warn(missing_docs, unreachable_pub)]

pub mod auth;
pub mod config;
mod http;
pub mod hub;
mod ingest;
mod session;
pub mod template;
pub mod throttle;
pub mod webhook;
pub mod window;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};

use ferry_client::{Client, ClientOptions};
use ferry_proto::{EventClass, SubjectFilter, TopicConfig};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

pub use auth::{sign, AuthError, Authenticator, Claims};
pub use config::EdgeConfig;

use crate::hub::Hub;
use crate::session::Transport;
use crate::window::WindowStore;

/// Errors of the edge.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// A configuration value is invalid.
    #[error("config {key}: {reason}")]
    Config {
        /// The key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The window store failed.
    #[error("window store: {0}")]
    Store(String),
    /// The region refused or could not be reached.
    #[error("region: {0}")]
    Region(#[from] ferry_client::ClientError),
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

/// Counters and gauges for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) connections: AtomicUsize,
    pub(crate) ws_connections: AtomicUsize,
    pub(crate) sse_connections: AtomicUsize,
    pub(crate) notifications: AtomicU64,
    pub(crate) not_served: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) delivered_ws: AtomicU64,
    pub(crate) delivered_sse: AtomicU64,
    pub(crate) replayed: AtomicU64,
    pub(crate) gaps: AtomicU64,
    pub(crate) lags: AtomicU64,
    pub(crate) acks: AtomicU64,
    pub(crate) refused_auth: AtomicU64,
    pub(crate) refused_forbidden: AtomicU64,
    pub(crate) refused_limit: AtomicU64,
    pub(crate) webhook_delivered: AtomicU64,
    pub(crate) webhook_failed: AtomicU64,
    /// The region reader is running (false before it starts and after it stopped).
    pub(crate) reading: std::sync::atomic::AtomicBool,
}

impl Metrics {
    pub(crate) fn transport(&self, transport: Transport) -> &AtomicUsize {
        match transport {
            Transport::WebSocket => &self.ws_connections,
            Transport::Sse => &self.sse_connections,
        }
    }

    pub(crate) fn delivered(&self, transport: Transport) -> &AtomicU64 {
        match transport {
            Transport::WebSocket => &self.delivered_ws,
            Transport::Sse => &self.delivered_sse,
        }
    }
}

/// State shared by the region reader and every connection.
pub(crate) struct Shared {
    pub(crate) config: EdgeConfig,
    pub(crate) auth: Authenticator,
    pub(crate) store: WindowStore,
    pub(crate) hub: Mutex<Hub<Arc<Notify>>>,
    pub(crate) metrics: Metrics,
    pub(crate) served: Vec<SubjectFilter>,
    /// The throttle's counts, as of the last notification it handled.
    pub(crate) throttled: Mutex<throttle::ThrottleCounts>,
    pub(crate) webhooks: webhook::Webhooks,
    pub(crate) renderer: template::Renderer,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl Shared {
    /// The hub, locked (never held across an await).
    pub(crate) fn hub(&self) -> std::sync::MutexGuard<'_, Hub<Arc<Notify>>> {
        self.hub.lock().expect("hub lock")
    }

    /// Whether this edge serves a channel.
    pub(crate) fn serves(&self, channel: &str) -> bool {
        self.served.iter().any(|f| f.matches(channel))
    }
}

/// A running edge.
pub struct Edge {
    shared: Arc<Shared>,
    http_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Whether a region call may succeed later: the region is unreachable or between leaders.
fn region_unavailable(e: &ferry_client::ClientError) -> bool {
    use ferry_client::ClientError;
    match e {
        ClientError::NoServer(_) | ClientError::Net(_) | ClientError::Timeout(_) => true,
        ClientError::Api(api) => api.is_retriable(),
        _ => false,
    }
}

/// Makes sure the topic exists and registers the edge's interests; answers the topic's
/// partition count. While the region is unreachable or between leaders (a region restarting,
/// a power loss) it tries again, backing off up to 5 s, for as long as it takes: an edge that
/// starts before its region waits for it instead of exiting. A refusal is returned at once.
async fn join_region(
    client: &Client,
    topic: &TopicConfig,
    config: &EdgeConfig,
) -> Result<u32, EdgeError> {
    let mut backoff = std::time::Duration::from_millis(200);
    let mut attempts = 0u32;
    loop {
        let joined = async {
            let description = client
                .ensure_topic(topic, std::time::Duration::from_secs(30))
                .await?;
            for (i, channels) in config.channels.iter().enumerate() {
                client
                    .add_interest(&format!("edge-{}-{i}", config.name), channels)
                    .await?;
            }
            Ok::<u32, ferry_client::ClientError>(description.partitions.len() as u32)
        }
        .await;
        match joined {
            Ok(partitions) => return Ok(partitions),
            Err(e) if region_unavailable(&e) => {
                attempts += 1;
                if attempts % 10 == 1 {
                    tracing::warn!(error = %e, attempts, "the region is not reachable yet; the edge waits for it");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

impl Edge {
    /// Connects to the region (waiting while it is unreachable), makes sure the topic exists,
    /// registers the edge's interest, opens the window and starts serving HTTP.
    pub async fn start(config: EdgeConfig) -> Result<Self, EdgeError> {
        config.validate()?;
        let identity = config.tls.load()?;
        let client = Client::new(ClientOptions::new(config.servers.clone(), identity))?;
        let mut topic = TopicConfig::new(config.topic.clone(), config.partitions);
        topic.class = EventClass::Notification;
        // Notifications published in one region reach the edges of every region that
        // registered interest in their channel.
        topic.regions = ferry_proto::RegionPolicy::ByInterest;
        let partitions = join_region(&client, &topic, &config).await?;
        let renderer = template::Renderer::load(&config.templates)?;
        let store = WindowStore::open(
            &config.data_dir,
            config.window_limits(),
            config.window.flush_every_ms,
        )?;
        let listener = tokio::net::TcpListener::bind(config.http)
            .await
            .map_err(|e| EdgeError::Http {
                addr: config.http,
                reason: e.to_string(),
            })?;
        let http_addr = listener.local_addr().map_err(|e| EdgeError::Http {
            addr: config.http,
            reason: e.to_string(),
        })?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            auth: Authenticator::new(config.auth.secret.as_bytes()),
            served: config.channel_filters(),
            throttled: Mutex::new(throttle::ThrottleCounts::default()),
            webhooks: webhook::Webhooks::default(),
            renderer,
            config,
            store,
            hub: Mutex::new(Hub::new()),
            metrics: Metrics::default(),
            shutdown: shutdown_rx.clone(),
        });
        webhook::Webhooks::start_all(&shared)?;
        let tasks = vec![
            tokio::spawn(ingest::run(
                shared.clone(),
                client,
                partitions,
                shutdown_rx.clone(),
            )),
            tokio::spawn(http::serve(shared.clone(), listener, shutdown_rx)),
        ];
        tracing::info!(name = %shared.config.name, %http_addr, partitions, "edge running");
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

    /// Open client connections.
    pub fn connections(&self) -> usize {
        self.shared
            .metrics
            .connections
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Stops the edge abruptly, for crash tests: the region reader and the HTTP server are
    /// aborted mid-work, connections are cut, and the window is released without being
    /// flushed or marked closed cleanly, so the next start treats it as a crash (a new epoch:
    /// resuming clients get a `gap` frame). In one process the window's store still writes
    /// what it buffered when it is dropped; losing that tail takes a real SIGKILL.
    pub async fn kill(self) {
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks {
            let _ = task.await;
        }
        self.shared.webhooks.stop_all();
        // Connection tasks end on the signal; the window is released once they have.
        let _ = self.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while Arc::strong_count(&self.shared) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Stops serving, closes every connection, flushes the window and releases it.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let bound = std::time::Duration::from_secs(5);
        for mut task in self.tasks {
            if tokio::time::timeout(bound, &mut task).await.is_err() {
                tracing::warn!("an edge task did not stop within 5 s; aborted");
                task.abort();
            }
        }
        // The region reader (the window's only writer) and the webhooks have stopped: the
        // window is complete, so it is closed cleanly whatever connections still linger.
        self.shared.webhooks.stop_all();
        if let Err(e) = self.shared.store.close_cleanly().await {
            tracing::warn!(error = %e, "closing the window at shutdown failed");
        }
        // Connections end on the shutdown signal; wait (bounded) for them to let go of the
        // window, so that it can be opened again in this process.
        let deadline = tokio::time::Instant::now() + bound;
        while Arc::strong_count(&self.shared) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
