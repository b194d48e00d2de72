//! A sidecar's configuration, its defaults and its validation (the binary loads the TOML and
//! environment overrides). Validation errors name the key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ferry_net::tls::TlsPaths;
use serde::{Deserialize, Serialize};

use crate::SidecarError;

/// Everything a `ferry sidecar` needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    /// The app's id: the `source` of its events and its consumer group (replicas with one id
    /// share the work).
    pub app_id: String,
    /// The tenant its events belong to.
    #[serde(default)]
    pub tenant: Option<String>,
    /// QUIC addresses of the region's nodes.
    pub servers: Vec<SocketAddr>,
    /// The client certificate the sidecar presents to the region.
    pub tls: TlsPaths,
    /// Where the app calls the sidecar (Dapr's HTTP port, 3500 by default there).
    pub http: SocketAddr,
    /// The app's HTTP port on `app_host` (Dapr's `--app-port`); 0 means no app (publish
    /// only).
    #[serde(default)]
    pub app_port: u16,
    /// The app's host (loopback by default: the app runs beside the sidecar).
    #[serde(default = "default_app_host")]
    pub app_host: String,
    /// Where the outbox and delivery state are kept.
    pub data_dir: PathBuf,
    /// Names of the pubsub components the sidecar answers for (others are 404, as in Dapr).
    #[serde(default = "default_pubsubs")]
    pub pubsubs: Vec<String>,
    /// Topics the sidecar creates at start when they do not exist.
    #[serde(default)]
    pub topics: Vec<TopicSpec>,
    /// A folder of declarative subscription files (Dapr's `Subscription` YAML).
    #[serde(default)]
    pub subscriptions_dir: Option<PathBuf>,
    /// The durable outbox.
    #[serde(default)]
    pub outbox: OutboxConfig,
    /// Delivery to the app.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// The domain event store.
    #[serde(default)]
    pub event_store: EventStoreConfig,
    /// Request limits.
    #[serde(default)]
    pub limits: SidecarLimits,
}

/// A topic to create at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    /// Its name.
    pub name: String,
    /// Partitions.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// Replicas per partition.
    #[serde(default = "default_replication")]
    pub replication: u32,
    /// Whether other regions with a matching subscription receive its events.
    #[serde(default)]
    pub mesh: bool,
}

/// The outbox bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// Events held at most (accepted, not yet acknowledged by the region); beyond it
    /// publishes get 503 with `Retry-After`.
    #[serde(default = "default_outbox_events")]
    pub max_events: u64,
    /// Payload bytes held at most.
    #[serde(default = "default_outbox_bytes")]
    pub max_bytes: u64,
    /// The `Retry-After` a full outbox answers, seconds.
    #[serde(default = "default_retry_after")]
    pub retry_after_secs: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            max_events: default_outbox_events(),
            max_bytes: default_outbox_bytes(),
            retry_after_secs: default_retry_after(),
        }
    }
}

/// Delivery to the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// First retry delay of an event the app asked to retry, ms (doubling).
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Longest retry delay, ms.
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// Attempts before an event goes to the dead-letter topic (or is dropped and counted
    /// when there is none); 0 retries for ever.
    #[serde(default)]
    pub max_attempts: u32,
    /// How long one call to the app may take, ms.
    #[serde(default = "default_app_timeout_ms")]
    pub timeout_ms: u64,
    /// Longest wait between tries of `GET /dapr/subscribe` while the app is not ready, ms.
    #[serde(default = "default_discovery_max_ms")]
    pub discovery_max_ms: u64,
    /// How often handled offsets are committed to the region, ms (what a crash redelivers).
    #[serde(default = "default_commit_every_ms")]
    pub commit_every_ms: u64,
    /// Calls to the app at once per partition (Dapr's `app-max-concurrency`): events with one
    /// partition key are always posted one after another, in order; the others in parallel.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            retry_initial_ms: default_retry_initial_ms(),
            retry_max_ms: default_retry_max_ms(),
            max_attempts: 0,
            timeout_ms: default_app_timeout_ms(),
            discovery_max_ms: default_discovery_max_ms(),
            commit_every_ms: default_commit_every_ms(),
            concurrency: default_concurrency(),
        }
    }
}

impl DeliveryConfig {
    /// The delay before retry number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u64 << attempt.saturating_sub(1).min(20);
        Duration::from_millis(
            self.retry_initial_ms
                .saturating_mul(factor)
                .min(self.retry_max_ms),
        )
    }
}

/// The domain event store: stream `<category>-<id>` lives in topic `<topic_prefix><category>`,
/// created on first use with these settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventStoreConfig {
    /// Prefix of the topics holding streams.
    #[serde(default = "default_stream_prefix")]
    pub topic_prefix: String,
    /// Partitions of a category's topic.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// Replicas per partition.
    #[serde(default = "default_replication")]
    pub replication: u32,
}

impl Default for EventStoreConfig {
    fn default() -> Self {
        Self {
            topic_prefix: default_stream_prefix(),
            partitions: default_partitions(),
            replication: default_replication(),
        }
    }
}

/// Request limits, all enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarLimits {
    /// Largest request body, bytes (413 beyond).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Most entries in one bulk publish or one event-store append.
    #[serde(default = "default_max_entries")]
    pub max_entries: usize,
    /// Requests served at once (each may hold a body of up to `max_body_bytes`); beyond it,
    /// 503 with `Retry-After`. Health checks and `/metrics` are not counted.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
}

impl Default for SidecarLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: default_max_body(),
            max_entries: default_max_entries(),
            max_concurrent_requests: default_max_concurrent_requests(),
        }
    }
}

fn default_pubsubs() -> Vec<String> {
    vec!["ferry".into(), "pubsub".into()]
}
fn default_app_host() -> String {
    "127.0.0.1".into()
}
fn default_partitions() -> u32 {
    8
}
fn default_replication() -> u32 {
    3
}
fn default_outbox_events() -> u64 {
    1_000_000
}
fn default_outbox_bytes() -> u64 {
    1 << 30
}
fn default_retry_after() -> u64 {
    1
}
fn default_retry_initial_ms() -> u64 {
    100
}
fn default_retry_max_ms() -> u64 {
    10_000
}
fn default_app_timeout_ms() -> u64 {
    30_000
}
fn default_discovery_max_ms() -> u64 {
    5_000
}
fn default_commit_every_ms() -> u64 {
    100
}
fn default_concurrency() -> usize {
    32
}
fn default_stream_prefix() -> String {
    "streams.".into()
}
fn default_max_body() -> usize {
    4 << 20
}
fn default_max_entries() -> usize {
    1000
}
fn default_max_concurrent_requests() -> usize {
    1024
}

fn invalid(key: &'static str, reason: impl Into<String>) -> SidecarError {
    SidecarError::Config {
        key,
        reason: reason.into(),
    }
}

impl SidecarConfig {
    /// A configuration with every default: region `servers`, `tls`, listening on `http`.
    pub fn new(
        app_id: impl Into<String>,
        servers: Vec<SocketAddr>,
        tls: TlsPaths,
        http: SocketAddr,
        data_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            app_id: app_id.into(),
            tenant: None,
            servers,
            tls,
            http,
            app_port: 0,
            app_host: default_app_host(),
            data_dir: data_dir.into(),
            pubsubs: default_pubsubs(),
            topics: Vec::new(),
            subscriptions_dir: None,
            outbox: OutboxConfig::default(),
            delivery: DeliveryConfig::default(),
            event_store: EventStoreConfig::default(),
            limits: SidecarLimits::default(),
        }
    }

    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<(), SidecarError> {
        let id_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !id_ok(&self.app_id) {
            return Err(invalid(
                "app_id",
                format!(
                    "{:?} must be 1-64 characters of [A-Za-z0-9_.-]",
                    self.app_id
                ),
            ));
        }
        if self.servers.is_empty() {
            return Err(invalid("servers", "at least one region node is needed"));
        }
        if self.pubsubs.is_empty() || self.pubsubs.iter().any(|p| p.is_empty()) {
            return Err(invalid("pubsubs", "list at least one non-empty name"));
        }
        for topic in &self.topics {
            let mut config = ferry_proto::TopicConfig::new(topic.name.clone(), topic.partitions);
            config.replication = topic.replication;
            config
                .validate()
                .map_err(|e| invalid("topics", e.to_string()))?;
        }
        if self.outbox.max_events == 0 || self.outbox.max_bytes == 0 {
            return Err(invalid(
                "outbox",
                "max_events and max_bytes must be above 0",
            ));
        }
        let d = &self.delivery;
        if d.retry_initial_ms == 0 || d.retry_max_ms < d.retry_initial_ms {
            return Err(invalid(
                "delivery",
                "retry_initial_ms must be above 0 and at most retry_max_ms",
            ));
        }
        if d.concurrency == 0 || d.concurrency > 1024 {
            return Err(invalid("delivery", "concurrency must be within 1..=1024"));
        }
        if d.timeout_ms == 0 || d.commit_every_ms == 0 || d.discovery_max_ms == 0 {
            return Err(invalid(
                "delivery",
                "timeout_ms, commit_every_ms and discovery_max_ms must be above 0",
            ));
        }
        let prefix = &self.event_store.topic_prefix;
        if prefix.len() > 64
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid(
                "event_store.topic_prefix",
                format!("{prefix:?} must be at most 64 characters of [A-Za-z0-9_.-]"),
            ));
        }
        let mut store_topic =
            ferry_proto::TopicConfig::new(format!("{prefix}x"), self.event_store.partitions);
        store_topic.replication = self.event_store.replication;
        store_topic
            .validate()
            .map_err(|e| invalid("event_store", e.to_string()))?;
        if self.limits.max_body_bytes < 1024
            || self.limits.max_entries == 0
            || self.limits.max_concurrent_requests == 0
        {
            return Err(invalid(
                "limits",
                "max_body_bytes must be at least 1024, max_entries and max_concurrent_requests above 0",
            ));
        }
        Ok(())
    }

    /// The app's base URL, if there is an app.
    pub fn app_url(&self) -> Option<String> {
        (self.app_port != 0).then(|| format!("http://{}:{}", self.app_host, self.app_port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SidecarConfig {
        SidecarConfig::new(
            "orders",
            vec!["127.0.0.1:7000".parse().unwrap()],
            TlsPaths {
                ca: "ca.pem".into(),
                cert: "c.pem".into(),
                key: "k.pem".into(),
            },
            "127.0.0.1:3500".parse().unwrap(),
            "/tmp/x",
        )
    }

    #[test]
    fn defaults_are_valid_and_errors_name_the_key() {
        config().validate().unwrap();
        let mut c = config();
        c.app_id = "has space".into();
        assert!(c.validate().unwrap_err().to_string().contains("app_id"));
        let mut c = config();
        c.servers.clear();
        assert!(c.validate().unwrap_err().to_string().contains("servers"));
        let mut c = config();
        c.outbox.max_events = 0;
        assert!(c.validate().unwrap_err().to_string().contains("outbox"));
        let mut c = config();
        c.event_store.partitions = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("event_store"));
        let mut c = config();
        c.delivery.retry_max_ms = 1;
        assert!(c.validate().unwrap_err().to_string().contains("delivery"));
    }

    #[test]
    fn backoff_doubles_up_to_the_bound() {
        let d = DeliveryConfig::default();
        assert_eq!(d.backoff(1), Duration::from_millis(100));
        assert_eq!(d.backoff(2), Duration::from_millis(200));
        assert_eq!(d.backoff(40), Duration::from_millis(10_000));
    }
}
