//! An edge's configuration, its defaults and its validation (the binary loads the TOML and
//! environment overrides). Validation errors name the key.

use std::net::SocketAddr;
use std::path::PathBuf;

use ferry_net::tls::TlsPaths;
use ferry_proto::SubjectFilter;
use serde::{Deserialize, Serialize};

use crate::template::TemplateConfig;
use crate::throttle::ThrottleConfig;
use crate::webhook::WebhookConfig;
use crate::window::WindowLimits;
use crate::EdgeError;

/// Everything a `ferry edge` needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// This edge's name: names its interest in the region and labels its metrics.
    pub name: String,
    /// QUIC addresses of the region's nodes.
    pub servers: Vec<SocketAddr>,
    /// The client certificate the edge presents to the region.
    pub tls: TlsPaths,
    /// HTTP address for `/ws`, `/sse`, `/metrics` and `/healthz`.
    pub http: SocketAddr,
    /// Where the retained window is kept.
    pub data_dir: PathBuf,
    /// The region topic notifications are read from (created with `partitions` if missing).
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Partitions of the topic when the edge creates it.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// Channels this edge serves (subject filters); it registers them as interest in the
    /// region so notifications published in other regions reach it.
    #[serde(default = "default_channels")]
    pub channels: Vec<String>,
    /// Where a new edge (no window yet) starts reading: "latest" or "earliest".
    #[serde(default = "default_start")]
    pub start: String,
    /// User tokens.
    pub auth: AuthConfig,
    /// The retained window.
    #[serde(default)]
    pub window: WindowConfig,
    /// Connection limits.
    #[serde(default)]
    pub limits: EdgeLimits,
    /// Per-user throttling of notifications on users' own channels.
    #[serde(default)]
    pub throttle: ThrottleConfig,
    /// Webhook delivery.
    #[serde(default)]
    pub webhooks: WebhookConfig,
    /// Notification templates.
    #[serde(default)]
    pub templates: TemplateConfig,
}

/// How user tokens are verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The HS256 secret tokens are signed with (at least 16 bytes).
    pub secret: String,
}

/// The retained window per channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// Notifications kept per channel.
    #[serde(default = "default_window_events")]
    pub events: u64,
    /// How long a notification is kept, seconds.
    #[serde(default = "default_window_secs")]
    pub max_age_secs: u64,
    /// How often the window is written to disk, ms (a crash loses at most this much of it,
    /// which is read from the region again under a new epoch).
    #[serde(default = "default_flush_every_ms")]
    pub flush_every_ms: u64,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            events: default_window_events(),
            max_age_secs: default_window_secs(),
            flush_every_ms: default_flush_every_ms(),
        }
    }
}

/// Connection limits, all enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeLimits {
    /// Open WebSocket and SSE connections at once; beyond it, 503.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Channels one connection may subscribe to.
    #[serde(default = "default_max_subscriptions")]
    pub max_subscriptions: usize,
    /// Notifications queued per connection; beyond it the connection lags and catches up
    /// from the window.
    #[serde(default = "default_send_queue")]
    pub send_queue: usize,
    /// Largest frame a client may send, bytes.
    #[serde(default = "default_max_client_frame")]
    pub max_client_frame: usize,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            max_subscriptions: default_max_subscriptions(),
            send_queue: default_send_queue(),
            max_client_frame: default_max_client_frame(),
        }
    }
}

fn default_topic() -> String {
    "notifications".into()
}
fn default_partitions() -> u32 {
    4
}
fn default_channels() -> Vec<String> {
    vec!["user.*".into(), "broadcast.>".into()]
}
fn default_start() -> String {
    "latest".into()
}
fn default_window_events() -> u64 {
    1000
}
fn default_window_secs() -> u64 {
    24 * 3600
}
fn default_flush_every_ms() -> u64 {
    200
}
fn default_max_connections() -> usize {
    100_000
}
fn default_max_subscriptions() -> usize {
    64
}
fn default_send_queue() -> usize {
    256
}
fn default_max_client_frame() -> usize {
    16 * 1024
}

fn invalid(key: &'static str, reason: impl Into<String>) -> EdgeError {
    EdgeError::Config {
        key,
        reason: reason.into(),
    }
}

impl EdgeConfig {
    /// A configuration with the required values and defaults for the rest.
    pub fn new(
        name: impl Into<String>,
        servers: Vec<SocketAddr>,
        tls: TlsPaths,
        http: SocketAddr,
        data_dir: PathBuf,
        secret: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            servers,
            tls,
            http,
            data_dir,
            topic: default_topic(),
            partitions: default_partitions(),
            channels: default_channels(),
            start: default_start(),
            auth: AuthConfig {
                secret: secret.into(),
            },
            window: WindowConfig::default(),
            limits: EdgeLimits::default(),
            throttle: ThrottleConfig::default(),
            webhooks: WebhookConfig::default(),
            templates: TemplateConfig::default(),
        }
    }

    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<(), EdgeError> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid("name", "1 or more of [A-Za-z0-9_-]"));
        }
        if self.servers.is_empty() {
            return Err(invalid("servers", "at least one node address"));
        }
        if self.topic.is_empty() {
            return Err(invalid("topic", "empty"));
        }
        if self.partitions == 0 {
            return Err(invalid("partitions", "at least 1"));
        }
        if self.channels.is_empty() {
            return Err(invalid("channels", "at least one subject filter"));
        }
        for channel in &self.channels {
            SubjectFilter::new(channel.clone()).map_err(|e| invalid("channels", e.to_string()))?;
        }
        if self.start != "latest" && self.start != "earliest" {
            return Err(invalid("start", "\"latest\" or \"earliest\""));
        }
        if self.auth.secret.len() < 16 {
            return Err(invalid("auth.secret", "at least 16 bytes"));
        }
        if self.window.events == 0 {
            return Err(invalid("window.events", "at least 1"));
        }
        if self.window.flush_every_ms == 0 {
            return Err(invalid("window.flush_every_ms", "at least 1"));
        }
        if self.window.max_age_secs == 0 {
            return Err(invalid("window.max_age_secs", "at least 1"));
        }
        let throttle = &self.throttle;
        if !throttle.rate_per_sec.is_finite() || throttle.rate_per_sec < 0.0 {
            return Err(invalid(
                "throttle.rate_per_sec",
                "a number >= 0 (0 turns it off)",
            ));
        }
        if throttle.burst == 0 {
            return Err(invalid("throttle.burst", "at least 1"));
        }
        if throttle.max_pending == 0 {
            return Err(invalid("throttle.max_pending", "at least 1"));
        }
        if throttle.digest_items == 0 {
            return Err(invalid("throttle.digest_items", "at least 1"));
        }
        let webhooks = &self.webhooks;
        if webhooks.max_attempts == 0 {
            return Err(invalid("webhooks.max_attempts", "at least 1"));
        }
        if webhooks.timeout_ms == 0 {
            return Err(invalid("webhooks.timeout_ms", "at least 1"));
        }
        if webhooks.max_backoff_ms < webhooks.backoff_ms {
            return Err(invalid(
                "webhooks.max_backoff_ms",
                "at least webhooks.backoff_ms",
            ));
        }
        if self.templates.default_locale.is_empty() {
            return Err(invalid("templates.default_locale", "empty"));
        }
        if self.templates.cache_entries == 0 {
            return Err(invalid("templates.cache_entries", "at least 1"));
        }
        let limits = &self.limits;
        if limits.max_connections == 0 {
            return Err(invalid("limits.max_connections", "at least 1"));
        }
        if limits.max_subscriptions == 0 {
            return Err(invalid("limits.max_subscriptions", "at least 1"));
        }
        if limits.send_queue == 0 {
            return Err(invalid("limits.send_queue", "at least 1"));
        }
        if limits.max_client_frame < 256 {
            return Err(invalid("limits.max_client_frame", "at least 256 bytes"));
        }
        Ok(())
    }

    /// The window limits.
    pub fn window_limits(&self) -> WindowLimits {
        WindowLimits {
            events: self.window.events,
            max_age_ms: self.window.max_age_secs * 1000,
        }
    }

    /// The served channels as filters (valid after [`EdgeConfig::validate`]).
    pub fn channel_filters(&self) -> Vec<SubjectFilter> {
        self.channels
            .iter()
            .filter_map(|c| SubjectFilter::new(c.clone()).ok())
            .collect()
    }
}
