//! Webhooks: a user registers a URL for some of the channels they may read, and the edge
//! POSTs each notification there, in order, retrying with exponential backoff, signed so the
//! receiver can check it came from the edge.
//!
//! A webhook is a session like a WebSocket's (same hub, same window): it starts after the
//! last notification retained when it was registered, and after an edge restart resumes each
//! channel after the last notification the receiver accepted (kept in sled). A receiver that
//! is down longer than the window covers gets a `gap` frame, as a WebSocket client would;
//! so does a webhook whose position is of an earlier window (after an unclean edge restart
//! started a new one), which then gets everything the new window retains.
//!
//! Signature: header `X-Ferry-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>` over
//! `"<t>.<body>"` with the webhook's secret (returned once, at registration).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::auth::{Claims, User};
use crate::session::SessionDriver;
use crate::{EdgeError, Shared};

/// Webhook delivery settings (the `[webhooks]` table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Attempts per notification before it is counted failed and skipped.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Wait before the second attempt, ms; doubles per attempt.
    #[serde(default = "default_backoff")]
    pub backoff_ms: u64,
    /// Longest wait between attempts, ms.
    #[serde(default = "default_max_backoff")]
    pub max_backoff_ms: u64,
    /// Time allowed for one POST, ms.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Webhooks one user may register.
    #[serde(default = "default_per_user")]
    pub max_per_user: usize,
    /// Allow URLs whose host is `localhost` or a loopback, private, link-local or unspecified
    /// address (off: users could otherwise make the edge call into its own network).
    #[serde(default)]
    pub allow_private_targets: bool,
}

fn default_attempts() -> u32 {
    8
}
fn default_backoff() -> u64 {
    500
}
fn default_max_backoff() -> u64 {
    60_000
}
fn default_timeout() -> u64 {
    5_000
}
fn default_per_user() -> usize {
    10
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            max_attempts: default_attempts(),
            backoff_ms: default_backoff(),
            max_backoff_ms: default_max_backoff(),
            timeout_ms: default_timeout(),
            max_per_user: default_per_user(),
            allow_private_targets: false,
        }
    }
}

impl WebhookConfig {
    /// The wait after failed attempt `attempt` (from 1).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u64 << attempt.saturating_sub(1).min(20);
        Duration::from_millis(
            self.backoff_ms
                .saturating_mul(factor)
                .min(self.max_backoff_ms),
        )
    }
}

/// A registered webhook.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registration {
    /// Its id.
    pub id: String,
    /// The claims of the user who registered it (what it may read).
    pub claims: Claims,
    /// Where notifications are POSTed.
    pub url: String,
    /// The channels it receives.
    pub channels: Vec<String>,
    /// The HMAC key of its signatures.
    pub secret: String,
}

/// Whether a URL's host names this machine or a private network: `localhost`, or an address
/// that is loopback, private, link-local, unique-local or unspecified. Host names other than
/// `localhost` are not resolved here.
pub fn is_private_target(url: &reqwest::Url) -> bool {
    use std::net::IpAddr;
    let ip = match url.host() {
        Some(url::Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            return name == "localhost" || name.ends_with(".localhost");
        }
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        None => return true,
    };
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64 // 100.64/10
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link local
                || v6.to_ipv4_mapped().is_some_and(|v4| {
                    v4.is_loopback() || v4.is_private() || v4.is_link_local()
                })
        }
    }
}

/// Signs a body: the value of the `X-Ferry-Signature` header.
pub fn signature(secret: &[u8], unix_secs: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(unix_secs.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    let tag = context.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={unix_secs},v1={hex}")
}

/// The registered webhooks and their delivery tasks.
#[derive(Default)]
pub(crate) struct Webhooks {
    running: std::sync::Mutex<HashMap<String, (Registration, JoinHandle<()>)>>,
}

fn store_err(what: &str, e: impl std::fmt::Display) -> EdgeError {
    EdgeError::Store(format!("{what}: {e}"))
}

fn position_key(id: &str, channel: &str) -> Vec<u8> {
    let mut key = id.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(channel.as_bytes());
    key
}

impl Webhooks {
    /// Starts the delivery of every registered webhook (at edge start).
    pub(crate) fn start_all(shared: &Arc<Shared>) -> Result<(), EdgeError> {
        let tree = shared.store.tree("webhooks")?;
        for item in tree.iter() {
            let (_, value) = item.map_err(|e| store_err("reading webhooks", e))?;
            let registration: Registration =
                serde_json::from_slice(&value).map_err(|e| store_err("a webhook", e))?;
            Self::spawn(shared, registration);
        }
        Ok(())
    }

    fn spawn(shared: &Arc<Shared>, registration: Registration) {
        let task = tokio::spawn(deliver(shared.clone(), registration.clone()));
        let mut running = shared.webhooks.running.lock().expect("webhooks lock");
        if let Some((_, old)) = running.insert(registration.id.clone(), (registration, task)) {
            old.abort();
        }
    }

    /// Registers a webhook for `user` and starts delivering to it.
    pub(crate) async fn register(
        shared: &Arc<Shared>,
        user: &User,
        url: String,
        channels: Vec<String>,
    ) -> Result<Registration, EdgeError> {
        let registration = Registration {
            id: format!("wh-{:016x}", rand::random::<u64>()),
            claims: user.claims.clone(),
            url,
            channels,
            secret: format!(
                "{:016x}{:016x}",
                rand::random::<u64>(),
                rand::random::<u64>()
            ),
        };
        let value = serde_json::to_vec(&registration).map_err(|e| store_err("a webhook", e))?;
        // Each channel starts after the last notification retained now, not wherever the
        // window is when the delivery task first runs: a notification published after the
        // registration is answered is delivered.
        let positions = shared.store.tree("webhook_positions")?;
        for channel in &registration.channels {
            let last = shared.store.id_of(shared.store.range(channel)?.last());
            positions
                .insert(position_key(&registration.id, channel), last.as_bytes())
                .map_err(|e| store_err("writing a webhook", e))?;
        }
        let tree = shared.store.tree("webhooks")?;
        tree.insert(registration.id.as_bytes(), value)
            .map_err(|e| store_err("writing a webhook", e))?;
        // The registration is answered as made: durable first.
        shared.store.sync().await?;
        Self::spawn(shared, registration.clone());
        Ok(registration)
    }

    /// Stops every delivery task (at shutdown, after the signal).
    pub(crate) fn stop_all(&self) {
        for (_, task) in self.running.lock().expect("webhooks lock").values() {
            task.abort();
        }
    }

    /// The webhooks of a user.
    pub(crate) fn of_user(&self, user: &str) -> Vec<Registration> {
        let running = self.running.lock().expect("webhooks lock");
        let mut list: Vec<Registration> = running
            .values()
            .filter(|(r, _)| r.claims.sub == user)
            .map(|(r, _)| r.clone())
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    /// Removes a user's webhook; false if the user has none with this id.
    pub(crate) async fn remove(
        shared: &Arc<Shared>,
        user: &str,
        id: &str,
    ) -> Result<bool, EdgeError> {
        let removed = {
            let mut running = shared.webhooks.running.lock().expect("webhooks lock");
            match running.get(id) {
                Some((r, _)) if r.claims.sub == user => running.remove(id),
                _ => None,
            }
        };
        let Some((registration, task)) = removed else {
            return Ok(false);
        };
        task.abort();
        let tree = shared.store.tree("webhooks")?;
        tree.remove(id.as_bytes())
            .map_err(|e| store_err("removing a webhook", e))?;
        let positions = shared.store.tree("webhook_positions")?;
        for channel in &registration.channels {
            positions
                .remove(position_key(id, channel))
                .map_err(|e| store_err("removing a webhook", e))?;
        }
        // The removal is answered as done: durable first.
        shared.store.sync().await?;
        Ok(true)
    }
}

/// Delivers one webhook's notifications until the edge stops or the webhook is removed.
async fn deliver(shared: Arc<Shared>, registration: Registration) {
    let user = match User::from_claims(registration.claims.clone()) {
        Ok(user) => user,
        Err(e) => {
            tracing::error!(id = %registration.id, error = %e, "webhook with unusable claims");
            return;
        }
    };
    let positions = match shared.store.tree("webhook_positions") {
        Ok(tree) => tree,
        Err(e) => {
            tracing::error!(id = %registration.id, error = %e, "webhook positions unreadable");
            return;
        }
    };
    let config = shared.config.webhooks;
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_millis(config.timeout_ms))
        .build()
    {
        Ok(http) => http,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook HTTP client");
            return;
        }
    };
    let mut shutdown = shared.shutdown.clone();
    let mut driver = SessionDriver::open(shared.clone(), user, None);
    for channel in &registration.channels {
        let since = positions
            .get(position_key(&registration.id, channel))
            .ok()
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        driver.subscribe(channel, since.as_deref());
    }
    loop {
        let out = tokio::select! {
            out = driver.next() => out,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match out.kind {
            "message" | "gap" => {}
            "error" => {
                tracing::warn!(id = %registration.id, frame = %String::from_utf8_lossy(&out.frame), "webhook subscription refused");
                continue;
            }
            _ => continue,
        }
        let delivered = tokio::select! {
            delivered = post_with_retries(&http, &config, &registration, &out.frame) => delivered,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let metrics = &shared.metrics;
        if delivered {
            metrics.webhook_delivered.fetch_add(1, Ordering::Relaxed);
        } else {
            metrics.webhook_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(id = %registration.id, url = %registration.url, "webhook notification failed every attempt; skipped");
        }
        if let Some((channel, seq)) = &out.position {
            let id = shared.store.id_of(*seq);
            if let Err(e) = positions.insert(position_key(&registration.id, channel), id.as_bytes())
            {
                tracing::warn!(error = %e, "recording a webhook position failed");
            }
        }
    }
}

/// POSTs one frame, retrying with backoff; true once the receiver answers 2xx.
async fn post_with_retries(
    http: &reqwest::Client,
    config: &crate::webhook::WebhookConfig,
    registration: &Registration,
    body: &bytes::Bytes,
) -> bool {
    for attempt in 1..=config.max_attempts {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let answer = http
            .post(&registration.url)
            .header("content-type", "application/json")
            .header(
                "x-ferry-signature",
                signature(registration.secret.as_bytes(), now, body),
            )
            .header("x-ferry-webhook", &registration.id)
            .header("x-ferry-attempt", attempt.to_string())
            .body(body.clone())
            .send()
            .await;
        match answer {
            Ok(response) if response.status().is_success() => return true,
            Ok(response) => {
                tracing::debug!(id = %registration.id, status = %response.status(), attempt, "webhook refused")
            }
            Err(e) => tracing::debug!(id = %registration.id, error = %e, attempt, "webhook failed"),
        }
        if attempt < config.max_attempts {
            tokio::time::sleep(config.backoff(attempt)).await;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_targets_are_recognised() {
        let private = |u: &str| is_private_target(&reqwest::Url::parse(u).unwrap());
        for url in [
            "http://127.0.0.1:9/hook",
            "http://localhost/x",
            "http://api.localhost/x",
            "http://10.1.2.3/",
            "http://192.168.0.1/",
            "http://172.16.0.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://0.0.0.0/",
            "http://100.64.0.1/",
            "http://[::1]/",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://[::ffff:127.0.0.1]/",
        ] {
            assert!(private(url), "{url}");
        }
        for url in [
            "https://hooks.example.com/x",
            "http://8.8.8.8/",
            "http://[2001:db8::1]/",
        ] {
            assert!(!private(url), "{url}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let config = WebhookConfig {
            backoff_ms: 100,
            max_backoff_ms: 350,
            ..WebhookConfig::default()
        };
        let waits: Vec<u64> = (1..=4)
            .map(|a| config.backoff(a).as_millis() as u64)
            .collect();
        assert_eq!(waits, vec![100, 200, 350, 350]);
    }

    #[test]
    fn signatures_depend_on_secret_time_and_body() {
        let a = signature(b"k", 1, b"body");
        assert!(a.starts_with("t=1,v1="));
        assert_eq!(a.len(), "t=1,v1=".len() + 64);
        assert_ne!(a, signature(b"k2", 1, b"body"));
        assert_ne!(a, signature(b"k", 2, b"body"));
        assert_ne!(a, signature(b"k", 1, b"bodx"));
        // Checked against Python's hmac module:
        // hmac.new(b"Jefe", b"0.what do ya want for nothing?", sha256).hexdigest()
        let rfc = signature(b"Jefe", 0, b"what do ya want for nothing?");
        let expected = "37f471929915ccd2cbbe79feb84ffcff4f2bb25e15fc41c2506687331ae179cc";
        assert_eq!(rfc, format!("t=0,v1={expected}"));
    }
}
