//! The source side: one [`Forwarder`] per (partition this node leads, other region,
//! destination partition), fed from the partition's log, judging each event by the
//! destination's interest and routing it by key, sending batches straight or through a
//! relay, committing its cursor through Raft. A new forwarder starts where the destination
//! partition is (which a partition split off there inherits from its parent), a split's
//! child once its parent passed the seal.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_net::{NetError, Transport};
use ferry_proto::{codec, RegionPolicy};
use ferry_router::{Ack, Batch, Forwarder, ForwarderConfig, SourceEvent};
use openraft::async_runtime::WatchReceiver;
use tokio::sync::{mpsc, watch};

use crate::command::{decode, PartitionCommand, PartitionReply};
use crate::node::{now_ms, HostedPartition, Node};
use crate::peer::{ForwardRequest, PeerRequest, PeerResponse, Router};

use super::{lock, Judgement, MeshSnapshot};

/// Cursor moves are committed through Raft at most this often per forwarder.
const COMMIT_EVERY: Duration = Duration::from_millis(100);
/// A batch tries no new route after this long (each call is bounded by the peer request
/// timeout, 5 s); the forwarder resends it later.
const SEND_DEADLINE: Duration = Duration::from_secs(8);
/// After a direct call to a region fails, relays are tried first for this long.
const DIRECT_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Longest a forwarder sleeps without looking at its source again.
const IDLE_WAKE: Duration = Duration::from_millis(250);

fn is_unreachable(e: &NetError) -> bool {
    !matches!(e, NetError::Remote(_))
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct ForwardKey {
    pub(super) topic: String,
    pub(super) partition: u32,
    pub(super) destination: String,
    /// The destination partition it feeds.
    pub(super) dest_partition: u32,
    /// The destination topic's layout (created with, has now) that events are routed by:
    /// their keys' partition there, as its producers place them; a keyless event goes
    /// where a key hashing to the source partition's number would.
    pub(super) routed_by: (u32, u32),
    /// The destination partition is the source partition and takes all of it: both regions
    /// have the topic with one layout and the source partition never split (so every key
    /// it ever held is still its own).
    pub(super) whole: bool,
}

impl ForwardKey {
    /// The name its cursor is committed under in the source partition: the region for a
    /// whole forwarder, else `region#partition`.
    pub(super) fn cursor_name(&self) -> String {
        if self.whole {
            self.destination.clone()
        } else {
            routed_cursor_name(&self.destination, self.dest_partition)
        }
    }

    /// Whether an event of the source partition with `key` goes to this forwarder's
    /// destination partition.
    fn routes_here(&self, key: Option<&[u8]>) -> bool {
        if self.whole {
            return true;
        }
        let hash = key.map_or(u64::from(self.partition), ferry_proto::key_hash);
        let (initial, partitions) = self.routed_by;
        ferry_proto::linear_partition(hash, initial, partitions) == self.dest_partition
    }
}

/// The cursor name of a forwarder that routes events by key to `dest_partition` of
/// `destination`.
pub(super) fn routed_cursor_name(destination: &str, dest_partition: u32) -> String {
    format!("{destination}#{dest_partition}")
}

/// Why a batch was not acknowledged.
#[derive(Debug)]
pub(super) enum SendError {
    /// The destination added partitions since the layout the batch was routed by.
    WrongPartition(String),
    /// Anything else: the batch is sent again later.
    Failed(String),
}

/// What a running forwarder shows `ferry ctl regions`.
#[derive(Debug, Clone, Default)]
pub(super) struct ForwardStatus {
    pub(super) cursor: u64,
    pub(super) high: u64,
    pub(super) lag_ms: u64,
    pub(super) sent_events: u64,
    pub(super) route: String,
    pub(super) last_error: Option<String>,
}

pub(super) struct RunningForwarder {
    pub(super) stop: watch::Sender<bool>,
    pub(super) status: Arc<Mutex<ForwardStatus>>,
}

impl<T: Transport> Node<T> {
    fn forwarder_config(&self) -> ForwarderConfig {
        let m = &self.inner.config.mesh;
        ForwarderConfig {
            window: m.forward_window,
            max_batch_events: m.forward_batch_events,
            max_batch_bytes: m.forward_batch_bytes,
            retry_after: Duration::from_millis(m.forward_retry_ms),
            max_backoff: Duration::from_millis(m.forward_max_backoff_ms),
        }
    }

    async fn propose(
        &self,
        group: &HostedPartition,
        command: PartitionCommand,
    ) -> Result<PartitionReply, String> {
        let command = group.command(command).map_err(|e| e.to_string())?;
        let response = group
            .proposer()
            .client_write(command)
            .await
            .map_err(|e| e.to_string())?;
        decode::<PartitionReply>("partition reply", &response.data.0).map_err(|e| e.to_string())
    }

    /// Forwards one partition this node leads to one region until told to stop or the
    /// node stops leading it.
    pub(super) async fn run_forwarder(
        &self,
        key: &ForwardKey,
        status: Arc<Mutex<ForwardStatus>>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), String> {
        let mesh = self.mesh().cloned().ok_or("mesh not started")?;
        let group = self
            .partition(&key.topic, key.partition)
            .ok_or("partition not hosted here")?;
        let view = group.view.clone();
        let config = self.forwarder_config();
        let marks = view.watermarks();
        let routed = format!("{}#", key.destination);
        let cursor = view
            .forward_cursor(&key.cursor_name())
            .map_err(|e| e.to_string())?;
        // A whole forwarder's cursor left behind while routed forwarders fed the region
        // (the layouts differed for a while) is where the destination was then, not now.
        let stale = key.whole
            && view
                .forward_cursors()
                .iter()
                .any(|(name, _)| name.starts_with(&routed));
        let start = match cursor.filter(|_| !stale) {
            Some(cursor) if cursor < marks.low => {
                // Counted from the committed cursor, which may lag what was acknowledged.
                mesh.note_trimmed(key, cursor, marks.low);
                marks.low
            }
            Some(cursor) => cursor,
            None => {
                self.await_parent_forwarded(key, &group, &mut stop).await?;
                // The first forwarder of this partition to this region: it starts at the
                // first event appended since the region's oldest interest was added (clock
                // skew allowed), wherever this node was then; a region the topic lists wants
                // every retained event. Every event after it is judged.
                let listed = matches!(
                    self.inner.meta_view.topic(&key.topic).map(|t| t.config.regions.clone()),
                    Some(RegionPolicy::Listed(regions)) if regions.contains(&key.destination)
                );
                let since = lock(&mesh.known_interest)
                    .get(&key.destination)
                    .map_or(0, |v| v.since_ms);
                let skew = self.inner.config.mesh.interest_clock_skew_ms;
                let first = if listed {
                    marks.low
                } else {
                    view.first_appended_since(since.saturating_sub(skew))
                };
                // The destination may hold more already when either side's layout changed:
                // a partition it split off from one this partition fed starts where its
                // parent was, and a routed forwarder replacing another (a whole one, or
                // one of another layout) where that one got to.
                let fed_before = view
                    .forward_cursors()
                    .iter()
                    .any(|(name, _)| *name == key.destination || name.starts_with(&routed));
                let grown_there = key.routed_by.0 != key.routed_by.1;
                let next = if fed_before || grown_there {
                    let held = self.forwarded_held(key, first).await?;
                    if held > 0 && held < marks.low {
                        // The destination was fed from this partition up to `held`, and
                        // retention dropped what followed before this forwarder read it.
                        mesh.note_trimmed(key, held.max(cursor.unwrap_or(0)), marks.low);
                    }
                    first.max(held)
                } else {
                    first
                }
                .max(cursor.unwrap_or(0));
                let command = PartitionCommand::ForwardCursor {
                    region: key.cursor_name(),
                    next,
                };
                self.propose(&group, command).await?;
                next
            }
        };
        let mut forwarder = Forwarder::new(config, start);
        let mut changes = view.subscribe();
        let mut views = mesh.snapshot.subscribe();
        let (acks_tx, mut acks) = mpsc::unbounded_channel::<(Result<Ack, SendError>, String)>();
        let direct_failed: Arc<Mutex<Option<Instant>>> = Arc::default();
        let mut uncommitted: Option<u64> = None;
        let mut committing: Option<tokio::task::JoinHandle<Option<u64>>> = None;
        let mut last_commit = Instant::now();
        let mut sent_before = 0;
        // Offsets below this retention dropped and are counted already.
        let mut trimmed_counted = start;
        loop {
            if *stop.borrow() || self.is_shut_down() {
                return Ok(());
            }
            if group.raft().metrics().borrow_watched().current_leader != Some(self.inner.id) {
                return Ok(());
            }
            // What retention dropped before this forwarder read it: counted once, as soon as
            // it is seen (even while the forwarder waits with a full window).
            let low = view.watermarks().low;
            let unread = forwarder.read_from().max(trimmed_counted);
            if low > unread {
                mesh.note_trimmed(key, unread, low);
                trimmed_counted = low;
            }
            let snapshot = views.borrow_and_update().clone();
            let waiting_for_view = self
                .read_for_forwarding(key, &group, &snapshot, &mut forwarder)
                .await?;

            let now = Instant::now();
            while let Some(batch) = forwarder.poll_transmit(now) {
                let node = self.clone();
                let key = key.clone();
                let acks = acks_tx.clone();
                let direct_failed = direct_failed.clone();
                tokio::spawn(async move {
                    let answer = node.send_batch(&key, batch, &direct_failed).await;
                    let _ = acks.send(answer);
                });
            }
            let stats = forwarder.stats();
            mesh.count_crossing(
                &key.topic,
                &key.destination,
                stats.events_sent - sent_before,
            );
            sent_before = stats.events_sent;

            if let Some(cursor) = forwarder.poll_commit() {
                uncommitted = Some(cursor);
            }
            // Commit the cursor in the background (a Raft round), at most every COMMIT_EVERY.
            if let Some(next) = uncommitted {
                if committing.is_none() && last_commit.elapsed() >= COMMIT_EVERY {
                    let command = PartitionCommand::ForwardCursor {
                        region: key.cursor_name(),
                        next,
                    };
                    let node = self.clone();
                    let group = group.clone();
                    committing = Some(tokio::spawn(async move {
                        // A failure means this node no longer leads: the loop ends above.
                        node.propose(&group, command).await.is_ok().then_some(next)
                    }));
                    last_commit = Instant::now();
                }
            }
            {
                let marks = view.watermarks();
                let high = marks.high;
                let mut s = lock(&status);
                s.cursor = forwarder.cursor();
                s.high = high;
                s.sent_events = stats.events_sent;
                s.lag_ms = if forwarder.cursor() < high {
                    view.appended_at(forwarder.cursor())
                        .map_or(0, |at| now_ms().saturating_sub(at))
                } else {
                    0
                };
            }

            let now = Instant::now();
            let mut wake = forwarder
                .poll_timeout()
                .unwrap_or(now + IDLE_WAKE)
                .min(now + IDLE_WAKE);
            if uncommitted.is_some() && committing.is_none() {
                wake = wake.min(last_commit + COMMIT_EVERY);
            }
            let committed = async {
                match committing.as_mut() {
                    Some(task) => task.await.ok().flatten(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = stop.changed() => return Ok(()),
                done = committed => {
                    committing = None;
                    if done.is_some() && done == uncommitted {
                        uncommitted = None;
                    }
                }
                Some((answer, route)) = acks.recv() => {
                    let mut s = lock(&status);
                    match answer {
                        Ok(ack) => {
                            forwarder.handle_ack(ack);
                            s.route = route;
                            s.last_error = None;
                        }
                        Err(SendError::WrongPartition(e)) => {
                            // Every forwarder of the topic to that region stops until its
                            // layout there is known again, then they start routing by it.
                            mesh.forget_topic_layout(&key.topic, &key.destination, key.routed_by);
                            return Err(format!("routing anew: {e}"));
                        }
                        Err(SendError::Failed(e)) => {
                            if s.last_error.as_deref() != Some(e.as_str()) {
                                tracing::warn!(topic = %key.topic, partition = key.partition, destination = %key.destination, error = %e, "forwarding failed; retrying with backoff");
                            }
                            s.last_error = Some(e);
                        }
                    }
                }
                _ = changes.changed() => {}
                _ = views.changed(), if waiting_for_view => {}
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    /// Feeds the forwarder what it asks for from the partition's log. Answers whether it
    /// stopped at an event it cannot judge yet (it waits for a newer view of the destination's
    /// interest).
    async fn read_for_forwarding(
        &self,
        key: &ForwardKey,
        group: &HostedPartition,
        snapshot: &MeshSnapshot,
        forwarder: &mut Forwarder,
    ) -> Result<bool, String> {
        let Some(topic) = self.inner.meta_view.topic(&key.topic) else {
            return Err(format!("topic {} is gone", key.topic));
        };
        let listed = match &topic.config.regions {
            RegionPolicy::Listed(regions) => regions.contains(&key.destination),
            _ => false,
        };
        let region = &self.inner.config.region;
        let max_bytes = self.inner.config.mesh.forward_batch_bytes;
        let skew_ms = self.inner.config.mesh.interest_clock_skew_ms;
        while forwarder.wants_source() {
            let from = forwarder.read_from();
            let marks = group.view.watermarks();
            if from >= marks.high {
                return Ok(false);
            }
            if from < marks.low {
                // Trimmed by retention before it was read (counted by the caller). With the
                // window full the forwarder cannot take the gap yet: wait for an ack.
                forwarder.handle_source(std::iter::empty(), marks.low);
                if forwarder.read_from() <= from {
                    return Ok(false);
                }
                continue;
            }
            let batches = group
                .view
                .read(from, max_bytes)
                .await
                .map_err(|e| e.to_string())?;
            let mut upto = from;
            let mut events = Vec::new();
            let mut undecided = None;
            'batches: for batch in &batches {
                upto = batch.base_offset + u64::from(batch.count);
                if upto <= from {
                    continue;
                }
                let decoded = batch.decode().map_err(|e| e.to_string())?;
                for (offset, mut event) in decoded {
                    if offset < from {
                        continue;
                    }
                    let local = event.origin_region.as_deref().is_none_or(|o| o == region);
                    let judgement = if !local || !key.routes_here(event.key.as_deref()) {
                        Judgement::Unwanted
                    } else if listed {
                        Judgement::Wanted
                    } else {
                        snapshot.judge(
                            &key.destination,
                            event.subject.as_str(),
                            batch.appended_at_ms,
                            skew_ms,
                        )
                    };
                    let wanted = match judgement {
                        Judgement::Wanted => true,
                        Judgement::Unwanted => false,
                        Judgement::Undecided => {
                            // The destination may have added an interest in it that has not
                            // reached this node yet: stop here until its view is recent.
                            undecided = Some(offset);
                            break 'batches;
                        }
                    };
                    let bytes = if wanted {
                        event.origin_region.get_or_insert_with(|| region.clone());
                        Bytes::from(
                            codec::encode("forwarded event", &event).map_err(|e| e.to_string())?,
                        )
                    } else {
                        Bytes::new()
                    };
                    events.push(SourceEvent {
                        offset,
                        wanted,
                        bytes,
                    });
                }
            }
            if let Some(offset) = undecided {
                forwarder.handle_source(events, offset);
                return Ok(true);
            }
            if upto <= from {
                return Ok(false);
            }
            forwarder.handle_source(events, upto.min(marks.high));
        }
        Ok(false)
    }

    /// Sends one batch: straight to the destination, or through a relay when the region
    /// cannot be reached. Answers the acknowledgement (or why not) and the route taken.
    async fn send_batch(
        &self,
        key: &ForwardKey,
        batch: Batch,
        direct_failed: &Mutex<Option<Instant>>,
    ) -> (Result<Ack, SendError>, String) {
        let Some(mesh) = self.mesh().cloned() else {
            return (Err(SendError::Failed("mesh stopped".into())), String::new());
        };
        let snapshot = mesh.snapshot();
        let request = PeerRequest::Forward(ForwardRequest {
            origin_region: mesh.region.clone(),
            target_region: key.destination.clone(),
            topic: key.topic.clone(),
            partition: key.partition,
            dest_partition: key.dest_partition,
            routed_by: key.routed_by,
            batch,
            via: vec![mesh.region.clone()],
            passed_in_region: false,
        });
        let request = match Router::<T>::encode_request(&request) {
            Ok(r) => r,
            Err(e) => return (Err(SendError::Failed(e.to_string())), String::new()),
        };
        let direct: Vec<(String, SocketAddr)> = snapshot
            .targets(
                &key.destination,
                &key.topic,
                key.dest_partition,
                key.routed_by.0,
            )
            .into_iter()
            .map(|a| ("direct".to_string(), a))
            .collect();
        let relays: Vec<(String, SocketAddr)> = snapshot
            .relays(&mesh.region, &key.destination)
            .into_iter()
            .map(|(region, a)| (format!("via {region}"), a))
            .collect();
        if direct.is_empty() && relays.is_empty() {
            return (
                Err(SendError::Failed(format!(
                    "no live node of region {}",
                    key.destination
                ))),
                String::new(),
            );
        }
        let relays_first = lock(direct_failed).is_some_and(|at| at.elapsed() < DIRECT_RETRY_AFTER);
        let routes: Vec<_> = if relays_first {
            relays.into_iter().chain(direct).collect()
        } else {
            direct.into_iter().chain(relays).collect()
        };
        let mut errors = Vec::new();
        let started = Instant::now();
        for (route, addr) in routes {
            if started.elapsed() >= SEND_DEADLINE {
                errors.push(format!("gave up after {SEND_DEADLINE:?}"));
                break;
            }
            let is_direct = route == "direct";
            match self
                .inner
                .router
                .call_addr_encoded(addr, request.clone())
                .await
            {
                Ok(PeerResponse::Forwarded(ack)) => {
                    if is_direct {
                        mesh.note_reach(&key.destination);
                        *lock(direct_failed) = None;
                    }
                    return (Ok(ack), route);
                }
                // A relay found no way on: try the next route.
                Ok(PeerResponse::Unreachable(e)) => errors.push(format!("{route}: {e}")),
                // The destination (or relay) answered but refused: say why; resent later.
                Ok(PeerResponse::Error(e)) => return (Err(SendError::Failed(e)), route),
                Ok(PeerResponse::WrongPartition(e)) => {
                    return (Err(SendError::WrongPartition(e)), route)
                }
                Ok(_) => errors.push(format!("{route}: unexpected answer")),
                Err(e) => {
                    if is_direct && is_unreachable(&e) {
                        *lock(direct_failed) = Some(Instant::now());
                    }
                    errors.push(format!("{route} ({addr}): {e}"));
                }
            }
        }
        (Err(SendError::Failed(errors.join("; "))), String::new())
    }

    /// Where the destination partition is in this source partition's events: it holds every
    /// event routed to it below the answer. Asked with an empty batch at `from`, which the
    /// destination answers from its applied state without proposing anything.
    async fn forwarded_held(&self, key: &ForwardKey, from: u64) -> Result<u64, String> {
        let probe = Batch {
            from,
            to: from,
            events: Vec::new(),
        };
        match self.send_batch(key, probe, &Mutex::new(None)).await.0 {
            Ok(Ack::Committed { next } | Ack::Gap { next }) => Ok(next),
            Err(SendError::WrongPartition(e) | SendError::Failed(e)) => {
                Err(format!("asking what the destination holds: {e}"))
            }
        }
    }

    /// A partition split off from another here forwards nothing until its parent's
    /// forwarder to the same destination partition passed the seal: the destination gets a
    /// key's events from the parent before those from the child.
    async fn await_parent_forwarded(
        &self,
        key: &ForwardKey,
        group: &HostedPartition,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        let Some(&(parent, seal)) = group.group.views.split().seals.get(&key.partition) else {
            return Ok(());
        };
        let parent = self
            .partition(&key.topic, parent)
            .ok_or_else(|| format!("parent partition {parent} is not hosted here"))?;
        let name = routed_cursor_name(&key.destination, key.dest_partition);
        let mut changes = parent.view.subscribe();
        loop {
            let at = parent
                .view
                .forward_cursor(&name)
                .map_err(|e| e.to_string())?
                .unwrap_or(0);
            if at >= seal {
                return Ok(());
            }
            if *stop.borrow() || self.is_shut_down() {
                return Err("stopped while waiting for the parent partition's forwarder".into());
            }
            tokio::select! {
                _ = stop.changed() => {}
                _ = changes.changed() => {}
                _ = tokio::time::sleep(IDLE_WAKE) => {}
            }
        }
    }
}
