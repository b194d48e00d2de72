//! Per-user throttling of notifications on a user's own channels (`user.<id>` and below): a
//! token bucket per user, and a policy for what happens over the rate. No I/O and no clock:
//! the driver passes `now` in milliseconds, hands each notification to [`Throttle::admit`]
//! and collects what is due with [`Throttle::poll_release`] at [`Throttle::next_release_at`].
//!
//! Policies, over the rate:
//! - `digest`: held notifications are folded into one digest notification, released when the
//!   next token is there (each folded one counts as coalesced);
//! - `delay`: held and released one per token, oldest first; when `max_pending` are held a
//!   newcomer is dropped;
//! - `drop_oldest`: held and released one per token; when `max_pending` are held the oldest
//!   held one is dropped to make room, so the user gets the freshest.
//!
//! Every notification is counted exactly once as delivered, coalesced or dropped, or is
//! still held: `delivered + coalesced + dropped + held = published`, per user and in total.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::window::{FrameParts, Incoming};

/// What to do over the rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Coalesce into one digest.
    Digest,
    /// Delay, dropping newcomers when `max_pending` are held.
    Delay,
    /// Delay, dropping the oldest held when `max_pending` are held.
    DropOldest,
}

/// Throttle settings (the `[throttle]` table).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleConfig {
    /// Notifications per second per user; 0 turns throttling off.
    #[serde(default = "default_rate")]
    pub rate_per_sec: f64,
    /// Notifications a user may get at once before the rate applies.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// What happens over the rate.
    #[serde(default = "default_policy")]
    pub policy: Policy,
    /// Notifications held per user at most.
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// Items listed in one digest (the count covers all of them).
    #[serde(default = "default_digest_items")]
    pub digest_items: usize,
}

fn default_rate() -> f64 {
    10.0
}
fn default_burst() -> u32 {
    100
}
fn default_policy() -> Policy {
    Policy::Digest
}
fn default_max_pending() -> usize {
    1000
}
fn default_digest_items() -> usize {
    20
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            rate_per_sec: default_rate(),
            burst: default_burst(),
            policy: default_policy(),
            max_pending: default_max_pending(),
            digest_items: default_digest_items(),
        }
    }
}

impl ThrottleConfig {
    /// Whether throttling is on.
    pub fn enabled(&self) -> bool {
        self.rate_per_sec > 0.0
    }
}

/// Outcome counters (totals or one user's).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleCounts {
    /// Notifications that reached the throttle.
    pub published: u64,
    /// Passed on as themselves.
    pub delivered: u64,
    /// Folded into a digest.
    pub coalesced: u64,
    /// Dropped by the policy.
    pub dropped: u64,
    /// Held now.
    pub held: u64,
    /// Digest notifications made.
    pub digests: u64,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated_ms: u64,
    held: VecDeque<Incoming>,
    /// Under `digest` with `max_pending` held: further notifications only add to their
    /// channel's count.
    extra: Vec<(Arc<str>, u64)>,
    counts: ThrottleCounts,
}

/// The throttle of every user of an edge.
#[derive(Debug)]
pub struct Throttle {
    config: ThrottleConfig,
    buckets: HashMap<Arc<str>, Bucket>,
    totals: ThrottleCounts,
}

/// The user whose own channel this is (`user.<id>` or below), if any.
pub fn user_of(channel: &str) -> Option<&str> {
    let rest = channel.strip_prefix("user.")?;
    Some(rest.split('.').next().unwrap_or(rest))
}

impl Throttle {
    /// A throttle with these settings.
    pub fn new(config: ThrottleConfig) -> Self {
        Self {
            config,
            buckets: HashMap::new(),
            totals: ThrottleCounts::default(),
        }
    }

    fn refill(config: &ThrottleConfig, bucket: &mut Bucket, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(bucket.updated_ms) as f64 / 1000.0;
        bucket.tokens = (bucket.tokens + elapsed * config.rate_per_sec).min(config.burst as f64);
        bucket.updated_ms = now_ms.max(bucket.updated_ms);
    }

    /// Takes a notification; returns it when it may go now. Notifications that are not on a
    /// user's own channel, or with throttling off, always go.
    pub fn admit(&mut self, now_ms: u64, item: Incoming) -> Option<Incoming> {
        let user = match user_of(&item.channel) {
            Some(user) if self.config.enabled() => user,
            _ => return Some(item),
        };
        let config = self.config;
        let bucket = self.buckets.entry(user.into()).or_insert_with(|| Bucket {
            tokens: config.burst as f64,
            updated_ms: now_ms,
            held: VecDeque::new(),
            extra: Vec::new(),
            counts: ThrottleCounts::default(),
        });
        Self::refill(&config, bucket, now_ms);
        bucket.counts.published += 1;
        self.totals.published += 1;
        if bucket.held.is_empty() && bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            bucket.counts.delivered += 1;
            self.totals.delivered += 1;
            return Some(item);
        }
        let full = bucket.held.len() >= config.max_pending.max(1);
        match (config.policy, full) {
            (Policy::Delay, true) => {
                bucket.counts.dropped += 1;
                self.totals.dropped += 1;
            }
            (Policy::DropOldest, true) => {
                bucket.held.pop_front();
                bucket.held.push_back(item);
                bucket.counts.dropped += 1;
                self.totals.dropped += 1;
            }
            // A full digest keeps counting what it will stand for, without keeping it.
            (Policy::Digest, true) => {
                match bucket.extra.iter_mut().find(|(c, _)| *c == item.channel) {
                    Some((_, n)) => *n += 1,
                    None => bucket.extra.push((item.channel.clone(), 1)),
                }
                bucket.counts.held += 1;
                self.totals.held += 1;
            }
            _ => {
                bucket.held.push_back(item);
                bucket.counts.held += 1;
                self.totals.held += 1;
            }
        }
        None
    }

    /// When the next held notification (or digest) is due, if any is held.
    pub fn next_release_at(&self) -> Option<u64> {
        let rate = self.config.rate_per_sec;
        self.buckets
            .values()
            .filter(|b| !b.held.is_empty())
            .map(|b| {
                let missing = (1.0 - b.tokens).max(0.0);
                b.updated_ms + (missing / rate * 1000.0).ceil() as u64
            })
            .min()
    }

    /// Releases what is due at `now_ms`: held notifications one per token, or one digest
    /// per user per token.
    pub fn poll_release(&mut self, now_ms: u64) -> Vec<Incoming> {
        let config = self.config;
        let mut out = Vec::new();
        for (user, bucket) in &mut self.buckets {
            if bucket.held.is_empty() {
                continue;
            }
            Self::refill(&config, bucket, now_ms);
            while bucket.tokens >= 1.0 && !bucket.held.is_empty() {
                bucket.tokens -= 1.0;
                Self::release_one(&config, user, bucket, &mut self.totals, &mut out);
            }
        }
        out
    }

    /// Releases everything held, whatever the tokens (at shutdown: held notifications live
    /// in memory only).
    pub fn release_all(&mut self) -> Vec<Incoming> {
        let config = self.config;
        let mut out = Vec::new();
        for (user, bucket) in &mut self.buckets {
            while !bucket.held.is_empty() {
                Self::release_one(&config, user, bucket, &mut self.totals, &mut out);
            }
        }
        out
    }

    /// Releases one token's worth: the whole digest, or the oldest held notification.
    fn release_one(
        config: &ThrottleConfig,
        user: &str,
        bucket: &mut Bucket,
        totals: &mut ThrottleCounts,
        out: &mut Vec<Incoming>,
    ) {
        match config.policy {
            Policy::Digest => {
                // One digest per channel (a user's channels may have different readers).
                let mut by_channel: Vec<(Arc<str>, Vec<Incoming>)> = Vec::new();
                for item in bucket.held.drain(..) {
                    match by_channel.iter_mut().find(|(c, _)| *c == item.channel) {
                        Some((_, items)) => items.push(item),
                        None => by_channel.push((item.channel.clone(), vec![item])),
                    }
                }
                let mut extra = std::mem::take(&mut bucket.extra);
                for (channel, held) in by_channel {
                    let more = extra
                        .iter()
                        .position(|(c, _)| *c == channel)
                        .map_or(0, |i| extra.swap_remove(i).1);
                    let n = held.len() as u64 + more;
                    bucket.counts.held -= n;
                    totals.held -= n;
                    if n == 1 {
                        bucket.counts.delivered += 1;
                        totals.delivered += 1;
                        out.extend(held);
                    } else {
                        bucket.counts.coalesced += n;
                        totals.coalesced += n;
                        bucket.counts.digests += 1;
                        totals.digests += 1;
                        out.push(digest(user, held, n, config.digest_items));
                    }
                }
            }
            Policy::Delay | Policy::DropOldest => {
                if let Some(item) = bucket.held.pop_front() {
                    bucket.counts.held -= 1;
                    totals.held -= 1;
                    bucket.counts.delivered += 1;
                    totals.delivered += 1;
                    out.push(item);
                }
            }
        }
    }

    /// Forgets users with a full bucket and nothing held (bounded memory).
    pub fn forget_idle(&mut self, now_ms: u64) {
        let config = self.config;
        self.buckets.retain(|_, b| {
            Self::refill(&config, b, now_ms);
            !b.held.is_empty() || b.tokens < config.burst as f64
        });
    }

    /// Totals since the edge started.
    pub fn totals(&self) -> ThrottleCounts {
        self.totals
    }

    /// One user's counts while the user has a bucket.
    pub fn counts_of(&self, user: &str) -> Option<ThrottleCounts> {
        self.buckets.get(user).map(|b| b.counts)
    }
}

/// One notification standing for several: their count and the first `limit` of them.
fn digest(user: &str, held: Vec<Incoming>, count: u64, limit: usize) -> Incoming {
    let channel = held[0].channel.clone();
    let items: Vec<serde_json::Value> = held
        .iter()
        .take(limit)
        .map(|i| {
            serde_json::json!({
                "event_id": i.frame.event_id,
                "event_type": i.frame.event_type,
                "data": i.frame.data,
            })
        })
        .collect();
    Incoming {
        channel,
        frame: FrameParts {
            event_id: format!("digest-{user}-{}", held[0].frame.event_id),
            event_type: "ferry.digest".into(),
            data: serde_json::json!({ "digest": true, "count": count, "items": items }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(channel: &str, n: u64) -> Incoming {
        Incoming {
            channel: channel.into(),
            frame: FrameParts {
                event_id: format!("e{n}"),
                event_type: "t".into(),
                data: serde_json::json!(n),
            },
        }
    }

    fn config(policy: Policy, max_pending: usize) -> ThrottleConfig {
        ThrottleConfig {
            rate_per_sec: 2.0,
            burst: 3,
            policy,
            max_pending,
            digest_items: 2,
        }
    }

    /// Publishes `n` at once to user 1, then runs the clock for `secs`.
    fn run(policy: Policy, max_pending: usize, n: u64, secs: u64) -> (Vec<Incoming>, Throttle) {
        let mut throttle = Throttle::new(config(policy, max_pending));
        let mut out: Vec<Incoming> = (0..n)
            .filter_map(|i| throttle.admit(0, item("user.1", i)))
            .collect();
        let mut now = 0;
        while let Some(at) = throttle.next_release_at() {
            if at > secs * 1000 {
                break;
            }
            assert!(at >= now, "release times move forward");
            now = at;
            let released = throttle.poll_release(now);
            assert!(!released.is_empty(), "something is due at {at}");
            out.extend(released);
        }
        (out, throttle)
    }

    fn add_up(c: ThrottleCounts) -> u64 {
        c.delivered + c.coalesced + c.dropped + c.held
    }

    #[test]
    fn digest_passes_the_burst_then_folds_the_rest_into_one() {
        let (out, throttle) = run(Policy::Digest, 100, 10, 60);
        assert_eq!(out.len(), 4, "3 in the burst, then one digest");
        assert_eq!(out[3].frame.data["count"], 7);
        assert_eq!(out[3].frame.data["items"].as_array().unwrap().len(), 2);
        let c = throttle.counts_of("1").unwrap();
        assert_eq!((c.delivered, c.coalesced, c.dropped, c.held), (3, 7, 0, 0));
        assert_eq!(add_up(c), c.published);
        assert_eq!(throttle.totals(), c);
    }

    #[test]
    fn delay_releases_at_the_rate_and_drops_newcomers_beyond_max_pending() {
        let (out, throttle) = run(Policy::Delay, 4, 10, 60);
        let got: Vec<u64> = out.iter().map(|i| i.frame.data.as_u64().unwrap()).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4, 5, 6]);
        let c = throttle.counts_of("1").unwrap();
        assert_eq!((c.delivered, c.dropped, c.held), (7, 3, 0));
        assert_eq!(add_up(c), 10);
    }

    #[test]
    fn drop_oldest_keeps_the_freshest() {
        let (out, throttle) = run(Policy::DropOldest, 4, 10, 60);
        let got: Vec<u64> = out.iter().map(|i| i.frame.data.as_u64().unwrap()).collect();
        assert_eq!(got, vec![0, 1, 2, 6, 7, 8, 9]);
        assert_eq!(add_up(throttle.counts_of("1").unwrap()), 10);
    }

    #[test]
    fn held_notifications_are_counted_until_released_and_shared_channels_pass() {
        let mut throttle = Throttle::new(config(Policy::Delay, 100));
        for i in 0..5 {
            throttle.admit(0, item("user.1.orders", i));
        }
        assert!(throttle.admit(0, item("news", 0)).is_some());
        let c = throttle.totals();
        assert_eq!((c.published, c.delivered, c.held), (5, 3, 2));
        // At 2 per second the next is due 500 ms later.
        assert_eq!(throttle.next_release_at(), Some(500));
        assert!(throttle.poll_release(499).is_empty());
        assert_eq!(throttle.poll_release(500).len(), 1);
        assert_eq!(throttle.poll_release(1000).len(), 1);
        assert_eq!(throttle.totals().held, 0);
        throttle.forget_idle(60_000);
        assert!(throttle.counts_of("1").is_none());
    }

    #[test]
    fn a_full_digest_keeps_counting_and_shutdown_releases_what_is_held() {
        let mut throttle = Throttle::new(config(Policy::Digest, 2));
        let passed = (0..10)
            .filter(|i| throttle.admit(0, item("user.1", *i)).is_some())
            .count();
        assert_eq!(passed, 3);
        assert_eq!(throttle.totals().held, 7);
        let out = throttle.release_all();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].frame.data["count"], 7);
        let c = throttle.totals();
        assert_eq!((c.delivered, c.coalesced, c.held), (3, 7, 0));
    }

    #[test]
    fn a_digest_never_mixes_a_users_channels() {
        let mut throttle = Throttle::new(config(Policy::Digest, 100));
        let mut out = Vec::new();
        for i in 0..6 {
            let channel = if i % 2 == 0 {
                "user.1"
            } else {
                "user.1.orders"
            };
            out.extend(throttle.admit(0, item(channel, i)));
        }
        out.extend(throttle.poll_release(10_000));
        // The burst passes 0, 1, 2; then user.1.orders holds 3 and 5 (one digest of its own)
        // and user.1 holds 4 (passed as itself).
        assert_eq!(out.len(), 5, "{out:?}");
        let digest = &out[3];
        assert_eq!(digest.frame.event_type, "ferry.digest");
        assert_eq!(&*digest.channel, "user.1.orders");
        assert_eq!(digest.frame.data["count"], 2);
        assert_eq!(&*out[4].channel, "user.1");
        assert_eq!(out[4].frame.data, serde_json::json!(4));
        let c = throttle.totals();
        assert_eq!((c.delivered, c.coalesced, c.held), (4, 2, 0));
    }

    #[test]
    fn off_means_everything_passes() {
        let mut throttle = Throttle::new(ThrottleConfig {
            rate_per_sec: 0.0,
            ..config(Policy::Digest, 1)
        });
        assert!((0..100).all(|i| throttle.admit(0, item("user.1", i)).is_some()));
        assert_eq!(throttle.next_release_at(), None);
    }
}
