//! The fan-out state machine: which session is subscribed to which channel, each session's
//! bounded send queue, and where each subscription stands. No I/O and no clock: the driver
//! feeds it notifications ([`Hub::handle_notification`]) and client requests, drains a
//! session's queue ([`Hub::drain`]) and wakes the sessions it names ([`Hub::take_woken`]).
//!
//! A subscription is either *live* (the hub queues each new notification of the channel for
//! it) or *catching up* (the session's driver is replaying the channel from the retained
//! window and the hub queues nothing for it). A subscription that starts from a position, and
//! one whose session's queue overflowed, catch up; the driver ends catching up with
//! [`Hub::caught_up`] once the window holds nothing past what it replayed. Every
//! notification queued or replayed for a subscription has a sequence above the last one it
//! got, so a session sees each channel in order and without repeats; what the window no
//! longer holds is announced by the driver with a `gap` frame. A new start or an
//! unsubscribe discards what was queued for the channel.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

/// Identifies one connection (a WebSocket or an SSE stream).
pub type SessionId = u64;

/// One notification of a channel, ready to send: the JSON frame is built once and shared by
/// every session that receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// The channel (the event's subject).
    pub channel: Arc<str>,
    /// Position in the channel, from 1, assigned by the window store.
    pub seq: u64,
    /// The `message` frame (JSON) the clients receive.
    pub frame: Bytes,
    /// Its data names a template: each session renders it for its user's locale.
    pub templated: bool,
}

#[derive(Debug)]
struct Subscription {
    /// The highest sequence queued or replayed for this subscription.
    through: u64,
    /// Replaying from the window; nothing is queued meanwhile.
    catching_up: bool,
    /// Notifications not queued because the session's queue was full (since the last drain).
    behind: u64,
}

#[derive(Debug)]
struct Session<W> {
    user: Arc<str>,
    waker: W,
    queue: VecDeque<Arc<Outbound>>,
    capacity: usize,
    subscriptions: HashMap<Arc<str>, Subscription>,
    /// Already named in `woken` and not drained since.
    woken: bool,
}

/// A channel a session must replay from the window, and what it missed (see [`Hub::drain`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatchUp {
    /// The channel.
    pub channel: Arc<str>,
    /// Replay sequences after this one.
    pub after: u64,
    /// Notifications the session's full queue turned away; 0 for a requested resume.
    pub behind: u64,
}

/// What a session's driver should send next.
#[derive(Debug, Default)]
pub struct Drained {
    /// Queued notifications, oldest first; send these before any replay.
    pub frames: Vec<Arc<Outbound>>,
    /// Channels to replay from the window, and how far each is behind.
    pub catch_up: Vec<CatchUp>,
}

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Live from now: sequences after `last`, the channel's newest at subscription time.
    Live {
        /// The channel's newest sequence when subscribing.
        last: u64,
    },
    /// Replay the window after this sequence, then go live.
    After(u64),
}

/// Counters since the hub was made.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HubStats {
    /// Notifications queued for sessions.
    pub queued: u64,
    /// Notifications turned away by a full session queue (the session catches up from the
    /// window after a `lag` frame).
    pub overflowed: u64,
    /// Notifications that reached the hub.
    pub notifications: u64,
}

/// Sessions, channels and queues. `W` is the driver's handle to wake a session.
#[derive(Debug)]
pub struct Hub<W> {
    sessions: HashMap<SessionId, Session<W>>,
    channels: HashMap<Arc<str>, HashSet<SessionId>>,
    users: HashMap<Arc<str>, usize>,
    woken: Vec<W>,
    next_id: SessionId,
    stats: HubStats,
}

impl<W: Clone> Default for Hub<W> {
    fn default() -> Self {
        Self::new()
    }
}

impl<W: Clone> Hub<W> {
    /// An empty hub.
    pub fn new() -> Self {
        Self {
            sessions: HashMap::new(),
            channels: HashMap::new(),
            users: HashMap::new(),
            woken: Vec::new(),
            next_id: 1,
            stats: HubStats::default(),
        }
    }

    /// Opens a session for `user` with a send queue of `capacity` notifications.
    pub fn open_session(&mut self, user: &str, capacity: usize, waker: W) -> SessionId {
        let id = self.next_id;
        self.next_id += 1;
        let user: Arc<str> = user.into();
        *self.users.entry(user.clone()).or_default() += 1;
        self.sessions.insert(
            id,
            Session {
                user,
                waker,
                queue: VecDeque::new(),
                capacity: capacity.max(1),
                subscriptions: HashMap::new(),
                woken: false,
            },
        );
        id
    }

    /// Closes a session and its subscriptions.
    pub fn close_session(&mut self, id: SessionId) {
        let Some(session) = self.sessions.remove(&id) else {
            return;
        };
        for channel in session.subscriptions.keys() {
            self.remove_subscriber(channel, id);
        }
        if let Some(count) = self.users.get_mut(&session.user) {
            *count -= 1;
            if *count == 0 {
                self.users.remove(&session.user);
            }
        }
    }

    fn remove_subscriber(&mut self, channel: &str, id: SessionId) {
        if let Some(set) = self.channels.get_mut(channel) {
            set.remove(&id);
            if set.is_empty() {
                self.channels.remove(channel);
            }
        }
    }

    /// Subscribes a session to a channel (again: a new start replaces the old one). Returns
    /// false for an unknown session.
    pub fn subscribe(&mut self, id: SessionId, channel: &str, start: Start) -> bool {
        let Some(session) = self.sessions.get_mut(&id) else {
            return false;
        };
        let channel: Arc<str> = channel.into();
        let subscription = match start {
            Start::Live { last } => Subscription {
                through: last,
                catching_up: false,
                behind: 0,
            },
            Start::After(after) => Subscription {
                through: after,
                catching_up: true,
                behind: 0,
            },
        };
        // Notifications of this channel still queued belong to the old start: the new one
        // decides what comes. (No wake-up: the session's own driver subscribed and drains
        // next.)
        session.queue.retain(|n| n.channel != channel);
        session.subscriptions.insert(channel.clone(), subscription);
        self.channels.entry(channel).or_default().insert(id);
        true
    }

    /// Ends a subscription; returns whether there was one.
    pub fn unsubscribe(&mut self, id: SessionId, channel: &str) -> bool {
        let removed = self.sessions.get_mut(&id).is_some_and(|s| {
            s.queue.retain(|n| &*n.channel != channel);
            s.subscriptions.remove(channel).is_some()
        });
        if removed {
            self.remove_subscriber(channel, id);
        }
        removed
    }

    /// Queues a new notification for every live subscriber of its channel. A subscriber whose
    /// queue is full is switched to catching up and counted behind.
    pub fn handle_notification(&mut self, notification: Arc<Outbound>) {
        self.stats.notifications += 1;
        let Some(subscribers) = self.channels.get(&notification.channel) else {
            return;
        };
        for id in subscribers {
            let Some(session) = self.sessions.get_mut(id) else {
                continue;
            };
            let Some(subscription) = session.subscriptions.get_mut(&notification.channel) else {
                continue;
            };
            if notification.seq <= subscription.through {
                continue;
            }
            if subscription.catching_up {
                if subscription.behind > 0 {
                    subscription.behind += 1;
                    self.stats.overflowed += 1;
                }
                continue;
            }
            if session.queue.len() >= session.capacity {
                subscription.catching_up = true;
                subscription.behind = 1;
                self.stats.overflowed += 1;
            } else {
                subscription.through = notification.seq;
                session.queue.push_back(notification.clone());
                self.stats.queued += 1;
            }
            if !session.woken {
                session.woken = true;
                self.woken.push(session.waker.clone());
            }
        }
    }

    /// Wakers of the sessions that have something to send since they last drained.
    pub fn take_woken(&mut self) -> Vec<W> {
        std::mem::take(&mut self.woken)
    }

    /// Takes up to `max` queued notifications of a session and the channels it must replay.
    /// The `behind` counts are reset: each overflow is reported once.
    pub fn drain(&mut self, id: SessionId, max: usize) -> Drained {
        let Some(session) = self.sessions.get_mut(&id) else {
            return Drained::default();
        };
        let take = session.queue.len().min(max);
        let frames: Vec<_> = session.queue.drain(..take).collect();
        let mut catch_up = Vec::new();
        if session.queue.is_empty() {
            session.woken = false;
            for (channel, subscription) in &mut session.subscriptions {
                if subscription.catching_up {
                    catch_up.push(CatchUp {
                        channel: channel.clone(),
                        after: subscription.through,
                        behind: std::mem::take(&mut subscription.behind),
                    });
                }
            }
        }
        Drained { frames, catch_up }
    }

    /// Records that a catching-up subscription has replayed through `through` and the window
    /// holds nothing newer: it goes live. Call it with the window read under the same lock
    /// that [`Hub::handle_notification`] is called under, so nothing falls between.
    pub fn caught_up(&mut self, id: SessionId, channel: &str, through: u64) {
        if let Some(subscription) = self
            .sessions
            .get_mut(&id)
            .and_then(|s| s.subscriptions.get_mut(channel))
        {
            subscription.through = subscription.through.max(through);
            subscription.catching_up = false;
            subscription.behind = 0;
        }
    }

    /// Records replay progress of a catching-up subscription (so a later overflow or resume
    /// starts after it).
    pub fn replayed(&mut self, id: SessionId, channel: &str, through: u64) {
        if let Some(subscription) = self
            .sessions
            .get_mut(&id)
            .and_then(|s| s.subscriptions.get_mut(channel))
        {
            subscription.through = subscription.through.max(through);
        }
    }

    /// The newest sequence a session's subscription has been given, if subscribed.
    pub fn position(&self, id: SessionId, channel: &str) -> Option<u64> {
        self.sessions
            .get(&id)?
            .subscriptions
            .get(channel)
            .map(|s| s.through)
    }

    /// Counters since the hub was made.
    pub fn stats(&self) -> HubStats {
        self.stats
    }

    /// Open sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Distinct users with at least one open session.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Subscribed sessions per channel.
    pub fn subscribers(&self) -> impl Iterator<Item = (&str, usize)> {
        self.channels.iter().map(|(c, s)| (&**c, s.len()))
    }

    /// Queued notifications: the total and the deepest session queue.
    pub fn queue_depths(&self) -> (usize, usize) {
        self.sessions.values().fold((0, 0), |(sum, max), s| {
            (sum + s.queue.len(), max.max(s.queue.len()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(channel: &str, seq: u64) -> Arc<Outbound> {
        Arc::new(Outbound {
            channel: channel.into(),
            seq,
            frame: Bytes::from(format!("{channel}:{seq}")),
            templated: false,
        })
    }

    fn seqs(d: &Drained) -> Vec<u64> {
        d.frames.iter().map(|f| f.seq).collect()
    }

    #[test]
    fn live_subscribers_get_each_new_notification_once_in_order() {
        let mut hub = Hub::new();
        let a = hub.open_session("1", 16, 'a');
        let b = hub.open_session("2", 16, 'b');
        hub.subscribe(a, "news", Start::Live { last: 4 });
        hub.subscribe(b, "news", Start::Live { last: 5 });
        for seq in [4, 5, 6, 7] {
            hub.handle_notification(note("news", seq));
        }
        hub.handle_notification(note("other", 1));
        let mut woken = hub.take_woken();
        woken.sort();
        assert_eq!(woken, vec!['a', 'b']);
        assert_eq!(seqs(&hub.drain(a, 10)), vec![5, 6, 7]);
        assert_eq!(seqs(&hub.drain(b, 10)), vec![6, 7]);
        assert!(hub.take_woken().is_empty());
        assert_eq!(hub.stats().queued, 5);
    }

    #[test]
    fn a_full_queue_switches_the_subscription_to_catch_up_and_counts_what_it_missed() {
        let mut hub = Hub::new();
        let slow = hub.open_session("1", 2, 's');
        let fast = hub.open_session("2", 100, 'f');
        hub.subscribe(slow, "b", Start::Live { last: 0 });
        hub.subscribe(fast, "b", Start::Live { last: 0 });
        for seq in 1..=10 {
            hub.handle_notification(note("b", seq));
        }
        assert_eq!(seqs(&hub.drain(fast, 100)), (1..=10).collect::<Vec<_>>());
        let drained = hub.drain(slow, 100);
        assert_eq!(seqs(&drained), vec![1, 2]);
        assert_eq!(
            drained.catch_up,
            vec![CatchUp {
                channel: "b".into(),
                after: 2,
                behind: 8
            }]
        );
        assert_eq!(hub.stats().overflowed, 8);
        // While catching up nothing is queued; behind is reported once.
        hub.handle_notification(note("b", 11));
        let again = hub.drain(slow, 100);
        assert!(again.frames.is_empty());
        assert_eq!(again.catch_up[0].behind, 0);
        assert_eq!(again.catch_up[0].after, 2);
        // The driver replays 3..=11 from the window, then goes live.
        hub.caught_up(slow, "b", 11);
        hub.handle_notification(note("b", 11));
        hub.handle_notification(note("b", 12));
        let live = hub.drain(slow, 100);
        assert_eq!(seqs(&live), vec![12]);
        assert!(live.catch_up.is_empty());
    }

    #[test]
    fn a_resume_catches_up_first_and_skips_what_the_replay_covered() {
        let mut hub = Hub::new();
        let s = hub.open_session("1", 8, 'x');
        hub.subscribe(s, "user.1", Start::After(3));
        hub.handle_notification(note("user.1", 9));
        let d = hub.drain(s, 8);
        assert!(d.frames.is_empty());
        assert_eq!(d.catch_up[0].after, 3);
        // Replay read 4..=9 from the window (9 was written before it reached the hub).
        hub.replayed(s, "user.1", 6);
        hub.caught_up(s, "user.1", 9);
        hub.handle_notification(note("user.1", 9));
        hub.handle_notification(note("user.1", 10));
        assert_eq!(seqs(&hub.drain(s, 8)), vec![10]);
        assert_eq!(hub.position(s, "user.1"), Some(10));
    }

    #[test]
    fn a_new_start_or_an_unsubscribe_discards_what_was_queued_for_the_channel() {
        let mut hub = Hub::new();
        let s = hub.open_session("1", 8, 'x');
        hub.subscribe(s, "a", Start::Live { last: 0 });
        hub.subscribe(s, "b", Start::Live { last: 0 });
        for seq in 1..=3 {
            hub.handle_notification(note("a", seq));
            hub.handle_notification(note("b", seq));
        }
        // Resume "a" after 1: the queued 1..=3 of "a" go, the replay brings 2 and 3 once.
        hub.subscribe(s, "a", Start::After(1));
        let d = hub.drain(s, 10);
        assert!(d.frames.iter().all(|f| &*f.channel == "b"));
        assert_eq!(d.catch_up[0].after, 1);
        hub.handle_notification(note("b", 4));
        hub.unsubscribe(s, "b");
        assert!(hub.drain(s, 10).frames.is_empty());
    }

    #[test]
    fn closing_and_unsubscribing_forget_the_session() {
        let mut hub = Hub::new();
        let a = hub.open_session("u", 4, 0u8);
        let b = hub.open_session("u", 4, 1u8);
        assert_eq!(hub.user_count(), 1);
        hub.subscribe(a, "c", Start::Live { last: 0 });
        hub.subscribe(b, "c", Start::Live { last: 0 });
        assert!(hub.unsubscribe(a, "c"));
        assert!(!hub.unsubscribe(a, "c"));
        hub.handle_notification(note("c", 1));
        assert!(hub.drain(a, 4).frames.is_empty());
        hub.close_session(b);
        assert_eq!(hub.subscribers().count(), 0);
        hub.close_session(a);
        assert_eq!((hub.session_count(), hub.user_count()), (0, 0));
        assert!(!hub.subscribe(a, "c", Start::Live { last: 0 }));
    }
}
