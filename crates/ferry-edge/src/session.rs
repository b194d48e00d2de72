//! One client connection's driver, shared by the WebSocket and SSE transports: it applies the
//! client's subscribe / unsubscribe / ack requests to the hub and produces, in order, the
//! frames to send — queued notifications, replays from the window, and the control frames
//! (`subscribed`, `gap`, `lag`, `error`). The transport only moves bytes.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::json;
use tokio::sync::Notify;

use crate::auth::User;
use crate::hub::{CatchUp, Outbound, SessionId, Start};
use crate::window::Position;
use crate::Shared;

/// Notifications read from the window per replay step.
const REPLAY_PAGE: usize = 256;
/// Notifications taken from the hub queue per drain.
const DRAIN_MAX: usize = 256;

/// A frame to send.
#[derive(Debug, Clone)]
pub(crate) struct Out {
    /// The JSON text.
    pub(crate) frame: Bytes,
    /// For a notification: its channel and sequence.
    pub(crate) position: Option<(Arc<str>, u64)>,
    /// The frame's `type`.
    pub(crate) kind: &'static str,
}

impl Out {
    fn control(kind: &'static str, value: serde_json::Value) -> Self {
        Self {
            frame: Bytes::from(value.to_string()),
            position: None,
            kind,
        }
    }
}

/// Which transport a session uses (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    WebSocket,
    Sse,
}

/// Counts an open connection; releases it on drop.
pub(crate) struct ConnectionSlot {
    shared: Arc<Shared>,
    transport: Transport,
}

impl ConnectionSlot {
    /// Takes a slot, or None at the configured limit.
    pub(crate) fn take(shared: &Arc<Shared>, transport: Transport) -> Option<Self> {
        let max = shared.config.limits.max_connections;
        let taken =
            shared
                .metrics
                .connections
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                });
        if taken.is_err() {
            return None;
        }
        shared
            .metrics
            .transport(transport)
            .fetch_add(1, Ordering::Relaxed);
        Some(Self {
            shared: shared.clone(),
            transport,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.shared
            .metrics
            .connections
            .fetch_sub(1, Ordering::AcqRel);
        self.shared
            .metrics
            .transport(self.transport)
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The driver of one connection.
pub(crate) struct SessionDriver {
    shared: Arc<Shared>,
    id: SessionId,
    user: User,
    notify: Arc<Notify>,
    pending: VecDeque<Out>,
    replays: VecDeque<CatchUp>,
    subscriptions: usize,
    /// The connection slot of a client (webhooks hold none).
    _slot: Option<ConnectionSlot>,
}

impl SessionDriver {
    /// Opens a session for a verified user.
    pub(crate) fn open(shared: Arc<Shared>, user: User, slot: Option<ConnectionSlot>) -> Self {
        let notify = Arc::new(Notify::new());
        let id =
            shared
                .hub()
                .open_session(user.id(), shared.config.limits.send_queue, notify.clone());
        Self {
            shared,
            id,
            user,
            notify,
            pending: VecDeque::new(),
            replays: VecDeque::new(),
            subscriptions: 0,
            _slot: slot,
        }
    }

    fn error(&mut self, channel: Option<&str>, code: &str, message: String) {
        self.pending.push_back(Out::control(
            "error",
            json!({"type": "error", "channel": channel, "code": code, "message": message}),
        ));
    }

    /// Subscribes to `channel`, live from now or resuming after the client's last id.
    /// Refusals become `error` frames; nothing changes for them.
    pub(crate) fn subscribe(&mut self, channel: &str, since: Option<&str>) {
        if let Err(e) = self.user.may_read(channel) {
            self.shared
                .metrics
                .refused_forbidden
                .fetch_add(1, Ordering::Relaxed);
            self.error(Some(channel), "forbidden", e.to_string());
            return;
        }
        if !self.shared.serves(channel) {
            self.error(
                Some(channel),
                "not_served",
                format!("channel {channel} is not served by this edge"),
            );
            return;
        }
        let store = &self.shared.store;
        let mut hub = self.shared.hub();
        let known = hub.position(self.id, channel).is_some();
        if !known && self.subscriptions >= self.shared.config.limits.max_subscriptions {
            drop(hub);
            self.error(
                Some(channel),
                "limit",
                format!(
                    "at most {} subscriptions per connection (limits.max_subscriptions)",
                    self.shared.config.limits.max_subscriptions
                ),
            );
            return;
        }
        // Read the range under the hub lock: a notification is in the range before it
        // reaches the hub, so none can fall between "last" and the subscription.
        let range = match store.range(channel) {
            Ok(r) => r,
            Err(e) => {
                drop(hub);
                self.error(Some(channel), "internal", e.to_string());
                return;
            }
        };
        let mut gap = None;
        let start = match since.map(|id| (id, store.parse_id(id))) {
            None => Start::Live { last: range.last() },
            // A position this edge has handed out: resume after it.
            Some((_, Position::Seq(seq))) if seq <= range.last() => Start::After(seq),
            // Another edge's, a wiped store's, or one never handed out: the retained window.
            Some((id, _)) => {
                gap = Some(id.to_string());
                Start::After(range.first - 1)
            }
        };
        hub.subscribe(self.id, channel, start);
        drop(hub);
        if !known {
            self.subscriptions += 1;
        }
        self.replays.retain(|r| &*r.channel != channel);
        let position = match start {
            Start::Live { last } => last,
            Start::After(after) => after,
        };
        self.pending.push_back(Out::control(
            "subscribed",
            json!({"type": "subscribed", "channel": channel, "position": store.id_of(position)}),
        ));
        if let Some(requested) = gap {
            self.push_gap(channel, &requested, range.first);
        }
    }

    /// Ends a subscription.
    pub(crate) fn unsubscribe(&mut self, channel: &str) {
        let removed = self.shared.hub().unsubscribe(self.id, channel);
        self.replays.retain(|r| &*r.channel != channel);
        if removed {
            self.subscriptions -= 1;
            self.pending.push_back(Out::control(
                "unsubscribed",
                json!({"type": "unsubscribed", "channel": channel}),
            ));
        } else {
            self.error(
                Some(channel),
                "not_subscribed",
                format!("not subscribed to {channel}"),
            );
        }
    }

    /// Records a client's acknowledgement of a notification.
    pub(crate) fn ack(&mut self, channel: &str, id: &str) {
        match self.shared.store.parse_id(id) {
            Position::Seq(_) => {
                self.shared.metrics.acks.fetch_add(1, Ordering::Relaxed);
            }
            Position::Foreign => self.error(
                Some(channel),
                "bad_id",
                format!("{id} is not an id of this edge"),
            ),
        }
    }

    /// Handles one client frame (WebSocket JSON).
    pub(crate) fn handle_client_frame(&mut self, text: &str) {
        let value: serde_json::Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return self.error(None, "bad_frame", format!("not JSON: {e}")),
        };
        let kind = value.get("type").and_then(|t| t.as_str()).unwrap_or("");
        let channel = value.get("channel").and_then(|c| c.as_str());
        let id = value.get("id").and_then(|c| c.as_str());
        match (kind, channel) {
            ("subscribe", Some(channel)) => {
                let since = value.get("since").and_then(|s| s.as_str());
                self.subscribe(channel, since)
            }
            ("unsubscribe", Some(channel)) => self.unsubscribe(channel),
            ("ack", Some(channel)) => match id {
                Some(id) => self.ack(channel, id),
                None => self.error(Some(channel), "bad_frame", "ack without \"id\"".into()),
            },
            ("subscribe" | "unsubscribe" | "ack", None) => {
                self.error(None, "bad_frame", format!("{kind} without \"channel\""))
            }
            _ => self.error(
                None,
                "bad_frame",
                format!("unknown frame type {kind:?} (subscribe, unsubscribe or ack)"),
            ),
        }
    }

    /// The next frame to send, waiting for one. Cancel-safe.
    pub(crate) async fn next(&mut self) -> Out {
        loop {
            if let Some(out) = self.try_next() {
                return out;
            }
            self.notify.notified().await;
        }
    }

    /// The next frame if one is ready now (queued, replayable or waiting in the hub).
    pub(crate) fn try_next(&mut self) -> Option<Out> {
        loop {
            if let Some(out) = self.pending.pop_front() {
                return Some(out);
            }
            if let Some(replay) = self.replays.front().cloned() {
                self.replay_step(replay);
                continue;
            }
            let drained = self.shared.hub().drain(self.id, DRAIN_MAX);
            for note in drained.frames {
                self.push_message(&note);
            }
            for catch_up in drained.catch_up {
                if catch_up.behind > 0 {
                    self.shared.metrics.lags.fetch_add(1, Ordering::Relaxed);
                    self.pending.push_back(Out::control(
                        "lag",
                        json!({"type": "lag", "channel": &*catch_up.channel,
                               "missed": catch_up.behind,
                               "resume_from": self.shared.store.id_of(catch_up.after)}),
                    ));
                }
                self.replays.push_back(catch_up);
            }
            if self.pending.is_empty() && self.replays.is_empty() {
                return None;
            }
        }
    }

    /// Replays one page of a catching-up channel from the window, or ends its catch-up. A
    /// page that does not start right after what the client has is preceded by a `gap`
    /// frame (the window was trimmed past it, maybe while this replay ran).
    fn replay_step(&mut self, replay: CatchUp) {
        let channel = replay.channel.clone();
        let after = replay.after;
        let page = match self.shared.store.read(&channel, after, REPLAY_PAGE) {
            Ok(p) => p,
            Err(e) => return self.replay_failed(&channel, e),
        };
        let mut hub = self.shared.hub();
        if hub.position(self.id, &channel).is_none() {
            // Unsubscribed meanwhile.
            drop(hub);
            self.replays.pop_front();
            return;
        }
        let page = if page.is_empty() {
            // Read again under the hub lock: anything not in this read reaches the hub after
            // the subscription is live.
            match self.shared.store.read(&channel, after, REPLAY_PAGE) {
                Ok(p) if p.is_empty() => {
                    // Nothing retained after `after`; if the window starts later (all of it
                    // trimmed), the client has missed what lay between.
                    let first = match self.shared.store.range(&channel) {
                        Ok(range) => range.first,
                        Err(e) => {
                            drop(hub);
                            return self.replay_failed(&channel, e);
                        }
                    };
                    let through = if first > after.saturating_add(1) {
                        first - 1
                    } else {
                        after
                    };
                    hub.caught_up(self.id, &channel, through);
                    drop(hub);
                    if through != after {
                        self.push_gap(&channel, &self.shared.store.id_of(after), first);
                    }
                    self.replays.pop_front();
                    return;
                }
                Ok(p) => p,
                Err(e) => {
                    drop(hub);
                    return self.replay_failed(&channel, e);
                }
            }
        } else {
            page
        };
        let last = page.last().map_or(after, |n| n.seq);
        hub.replayed(self.id, &channel, last);
        drop(hub);
        if let Some(first) = page.first() {
            if first.seq > after.saturating_add(1) {
                self.push_gap(&channel, &self.shared.store.id_of(after), first.seq);
            }
        }
        self.shared
            .metrics
            .replayed
            .fetch_add(page.len() as u64, Ordering::Relaxed);
        for note in page {
            self.push_message(&note);
        }
        if let Some(front) = self.replays.front_mut() {
            front.after = last;
        }
    }

    /// Queues a `gap` frame: the client asked for what follows `requested`, the window
    /// continues at `first_available`.
    fn push_gap(&mut self, channel: &str, requested: &str, first_available: u64) {
        self.shared.metrics.gaps.fetch_add(1, Ordering::Relaxed);
        let first_available = self.shared.store.id_of(first_available);
        self.pending.push_back(Out::control(
            "gap",
            json!({"type": "gap", "channel": channel, "requested": requested,
                   "first_available": first_available}),
        ));
    }

    /// The window could not be read: the subscription ends with an error frame (rather than
    /// being retried on every drain).
    fn replay_failed(&mut self, channel: &str, error: crate::EdgeError) {
        self.replays.retain(|r| &*r.channel != channel);
        let removed = self.shared.hub().unsubscribe(self.id, channel);
        if removed {
            self.subscriptions -= 1;
        }
        tracing::warn!(channel, error = %error, "replay from the window failed; subscription ended");
        self.error(
            Some(channel),
            "internal",
            format!("reading the window failed, subscription ended: {error}"),
        );
    }

    fn push_message(&mut self, note: &Outbound) {
        self.pending.push_back(Out {
            position: Some((note.channel.clone(), note.seq)),
            frame: self.shared.renderer.frame_for(note, &self.user),
            kind: "message",
        });
    }

    /// The window's id for a sequence.
    pub(crate) fn id_of(&self, seq: u64) -> String {
        self.shared.store.id_of(seq)
    }

    /// Parses a client id against the window's epoch.
    pub(crate) fn parse_id(&self, id: &str) -> Position {
        self.shared.store.parse_id(id)
    }

    /// The window's epoch.
    pub(crate) fn epoch(&self) -> &str {
        self.shared.store.epoch()
    }
}

impl Drop for SessionDriver {
    fn drop(&mut self) {
        if let Ok(mut hub) = self.shared.hub.lock() {
            hub.close_session(self.id);
        }
    }
}
