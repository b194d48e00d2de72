//! Reading notifications from the region: one subscription per partition of the topic, from
//! the offsets the window was written up to; groups of notifications are numbered and
//! retained together with the offsets read (one sled batch; sled writes it to disk in the
//! background), then handed to the hub and the sessions it names are woken.
//!
//! Partitions the topic gains are found by describing it every `DESCRIBE_EVERY`; a split's
//! child is read from its first offset, once its parent's seal is known and the window holds
//! the parent up to the seal, so a key's notifications keep their order across the split.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ferry_client::Client;
use ferry_proto::wire::StartFrom;
use ferry_proto::{Event, KeyLayout};
use tokio::sync::{mpsc, watch};

use crate::throttle::Throttle;
use crate::window::{FrameParts, Incoming};
use crate::Shared;

/// Notifications retained and fanned out per group (one sled batch each).
const GROUP_MAX: usize = 2048;
/// How often expired notifications leave the window.
const TRIM_EVERY: Duration = Duration::from_secs(30);
/// How often the topic is described again for partitions it gained.
const DESCRIBE_EVERY: Duration = Duration::from_secs(2);
/// How often a split's child reader looks whether its parent was read up to the seal.
const PARENT_POLL: Duration = Duration::from_millis(50);

/// What a partition reader hands on.
struct Read {
    partition: u32,
    offset: u64,
    event: Event,
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The frame parts of an event: JSON data stays JSON, anything else becomes a string.
fn frame_parts(event: &Event) -> FrameParts {
    let data = serde_json::from_slice(&event.data).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&event.data).into_owned())
    });
    FrameParts {
        event_id: event.id.clone(),
        event_type: event.ty.clone(),
        data,
    }
}

/// The partition readers running, by partition, and the task that describes the topic.
struct Readers {
    shared: Arc<Shared>,
    client: Client,
    tx: mpsc::Sender<Read>,
    running: BTreeMap<u32, tokio::task::JoinHandle<()>>,
    watcher: Option<tokio::task::JoinHandle<()>>,
}

/// Describes `topic` every `DESCRIBE_EVERY` and hands its layout and partition count on.
async fn watch_layout(client: Client, topic: String, tx: mpsc::Sender<(KeyLayout, u32)>) {
    let mut every = tokio::time::interval(DESCRIBE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match client.describe_topic(&topic).await {
            Ok(d) => {
                if tx
                    .send((d.layout, d.partitions.len() as u32))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => tracing::debug!(error = %e, "describing the topic for partitions it gained"),
        }
    }
}

impl Drop for Readers {
    /// The readers end with the ingest (also when its task is aborted): they hold the
    /// window's store.
    fn drop(&mut self) {
        for reader in self.running.values().chain(&self.watcher) {
            reader.abort();
        }
    }
}

impl Readers {
    /// Starts readers for the partitions of `layout` (the topic has `partitions`) not read
    /// yet: from the window's cursor, else from `fresh` (the start of a partition new since
    /// the edge first read). A split's child waits for its parent's seal to be known.
    async fn follow(
        &mut self,
        layout: &KeyLayout,
        partitions: u32,
        fresh: impl Fn(u32) -> Option<u64>,
    ) -> Result<(), crate::EdgeError> {
        let mut started = Vec::new();
        for partition in 0..partitions {
            if self.running.contains_key(&partition) {
                continue;
            }
            let after = match layout.split_of(partition) {
                Some(split) => match split.seal {
                    Some(seal) => Some((split.parent, seal)),
                    None => continue,
                },
                None => None,
            };
            let next = match self.shared.store.cursor(partition)? {
                Some(next) => next,
                None => {
                    let Some(next) = fresh(partition) else {
                        continue;
                    };
                    started.push((partition, next));
                    next
                }
            };
            if after.is_some() {
                tracing::info!(partition, ?after, "reading a partition the topic gained");
            }
            self.running.insert(
                partition,
                tokio::spawn(read_partition(
                    self.shared.clone(),
                    self.client.clone(),
                    partition,
                    StartFrom::Offset(next),
                    after,
                    self.tx.clone(),
                )),
            );
        }
        // Where a new partition starts is written at once, so a restart resumes there.
        if !started.is_empty() {
            self.shared
                .store
                .append(Vec::new(), &started, now_ms())
                .await?;
        }
        Ok(())
    }
}

/// Runs until `shutdown` turns true.
pub(crate) async fn run(
    shared: Arc<Shared>,
    client: Client,
    partitions: u32,
    mut shutdown: watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::channel::<Read>(GROUP_MAX * 4);
    let mut readers = Readers {
        shared: shared.clone(),
        client: client.clone(),
        tx,
        running: BTreeMap::new(),
        watcher: None,
    };
    // The region may be electing leaders: retry until it answers or the edge stops.
    loop {
        match start_reading(&mut readers, partitions).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "cannot find where to start reading notifications; retrying");
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
    shared.metrics.reading.store(true, Ordering::Release);
    // Described in a task of its own: a slow answer does not hold the notifications up.
    let (layouts_tx, mut layouts) = mpsc::channel::<(KeyLayout, u32)>(1);
    readers.watcher = Some(tokio::spawn(watch_layout(
        client.clone(),
        shared.config.topic.clone(),
        layouts_tx,
    )));
    let mut trim = tokio::time::interval(TRIM_EVERY);
    trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut throttle = Throttle::new(shared.config.throttle);
    loop {
        let release_at = throttle.next_release_at().map(|at| {
            let wait = Duration::from_millis(at.saturating_sub(now_ms()));
            tokio::time::Instant::now() + wait
        });
        let first = tokio::select! {
            _ = shutdown.changed() => break,
            Some((layout, partitions)) = layouts.recv() => {
                // Partitions gained since the edge started reading begin at their first offset.
                if let Err(e) = readers.follow(&layout, partitions, |_| Some(0)).await {
                    tracing::warn!(error = %e, "starting readers of partitions the topic gained");
                }
                continue;
            }
            _ = trim.tick() => {
                match shared.store.trim_expired(now_ms()).await {
                    Ok(n) => { shared.metrics.expired.fetch_add(n, Ordering::Relaxed); }
                    Err(e) => tracing::warn!(error = %e, "trimming the window failed"),
                }
                throttle.forget_idle(now_ms());
                continue;
            }
            _ = sleep_until(release_at) => {
                let released = throttle.poll_release(now_ms());
                if let Err(e) = retain_and_fan_out(&shared, released, &[], &throttle).await {
                    tracing::error!(error = %e, "writing the window failed; the edge stops reading");
                    break;
                }
                continue;
            }
            read = rx.recv() => match read {
                Some(read) => read,
                None => break,
            },
        };
        let mut group = vec![first];
        while group.len() < GROUP_MAX {
            match rx.try_recv() {
                Ok(read) => group.push(read),
                Err(_) => break,
            }
        }
        if let Err(e) = ingest(&shared, group, &mut throttle).await {
            // The window could not be written: stop rather than hand out positions that are
            // not in it (/healthz turns 503). A restart resumes from the last written cursor.
            tracing::error!(error = %e, "writing the window failed; the edge stops reading");
            break;
        }
    }
    shared.metrics.reading.store(false, Ordering::Release);
    drop(readers);
    // Held notifications live in memory: release them rather than lose them.
    let held = throttle.release_all();
    if !held.is_empty() {
        if let Err(e) = retain_and_fan_out(&shared, held, &[], &throttle).await {
            tracing::warn!(error = %e, "releasing throttled notifications at shutdown failed");
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Starts the readers of the topic's partitions: each from the window's cursor or, on the
/// edge's first start, the region's end or beginning as configured (written to the window
/// at once so that a restart resumes there and notifications published while the edge was
/// down are not skipped). A partition without a cursor in a window that has some was gained
/// while the edge was down: it is read from its first offset.
async fn start_reading(readers: &mut Readers, partitions: u32) -> Result<(), crate::EdgeError> {
    let shared = readers.shared.clone();
    let client = readers.client.clone();
    let topic = &shared.config.topic;
    let description = client.describe_topic(topic).await?;
    let partitions = partitions.max(description.partitions.len() as u32);
    let mut first_start = true;
    let mut fresh = BTreeMap::new();
    for partition in 0..partitions {
        if shared.store.cursor(partition)?.is_some() {
            first_start = false;
        }
    }
    for partition in 0..partitions {
        let next = if !first_start || shared.config.start == "earliest" {
            0
        } else {
            client.fetch(topic, partition, 0, 1).await?.1
        };
        fresh.insert(partition, next);
    }
    readers
        .follow(&description.layout, partitions, |p| fresh.get(&p).copied())
        .await
}

async fn ingest(
    shared: &Arc<Shared>,
    group: Vec<Read>,
    throttle: &mut Throttle,
) -> Result<(), crate::EdgeError> {
    let mut cursors = BTreeMap::new();
    let mut incoming = Vec::with_capacity(group.len());
    let now = now_ms();
    for read in group {
        cursors.insert(read.partition, read.offset + 1);
        if shared.serves(read.event.subject.as_str()) {
            let item = Incoming {
                channel: read.event.subject.as_str().into(),
                frame: frame_parts(&read.event),
            };
            incoming.extend(throttle.admit(now, item));
        } else {
            shared.metrics.not_served.fetch_add(1, Ordering::Relaxed);
        }
    }
    let cursors: Vec<(u32, u64)> = cursors.into_iter().collect();
    retain_and_fan_out(shared, incoming, &cursors, throttle).await
}

/// Numbers and retains notifications (with the region cursors), then hands them to the hub
/// and wakes the sessions it names.
async fn retain_and_fan_out(
    shared: &Arc<Shared>,
    incoming: Vec<Incoming>,
    cursors: &[(u32, u64)],
    throttle: &Throttle,
) -> Result<(), crate::EdgeError> {
    let retained = shared.store.append(incoming, cursors, now_ms()).await?;
    *shared.throttled.lock().expect("throttle counts") = throttle.totals();
    shared
        .metrics
        .notifications
        .fetch_add(retained.len() as u64, Ordering::Relaxed);
    let woken = {
        let mut hub = shared.hub();
        for note in retained {
            hub.handle_notification(note);
        }
        hub.take_woken()
    };
    for notify in woken {
        notify.notify_one();
    }
    Ok(())
}

/// Streams one partition into `tx`, resuming after errors from the next offset; a split's
/// child (`after`: its parent and the parent's seal) once the window holds the parent up to
/// the seal.
async fn read_partition(
    shared: Arc<Shared>,
    client: Client,
    partition: u32,
    mut start: StartFrom,
    after: Option<(u32, u64)>,
    tx: mpsc::Sender<Read>,
) {
    if let Some((parent, seal)) = after {
        loop {
            match shared.store.cursor(parent) {
                Ok(read) if read.unwrap_or(0) >= seal => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, partition, parent, "reading the parent's cursor")
                }
            }
            tokio::time::sleep(PARENT_POLL).await;
        }
    }
    let topic = &shared.config.topic;
    loop {
        match client.subscribe(topic, partition, start).await {
            Ok(mut subscription) => loop {
                match subscription.next().await {
                    Ok((offset, event)) => {
                        start = StartFrom::Offset(offset + 1);
                        let read = Read {
                            partition,
                            offset,
                            event,
                        };
                        if tx.send(read).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, partition, "notification stream broke; reopening");
                        break;
                    }
                }
            },
            Err(e) => tracing::warn!(error = %e, partition, "cannot subscribe; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
