//! Reading notifications from the region: one subscription per partition of the topic, from
//! the offsets the window was written up to; groups of notifications are numbered and
//! retained together with the offsets read (one sled batch; sled writes it to disk in the
//! background), then handed to the hub and the sessions it names are woken.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ferry_client::Client;
use ferry_proto::wire::StartFrom;
use ferry_proto::Event;
use tokio::sync::{mpsc, watch};

use crate::throttle::Throttle;
use crate::window::{FrameParts, Incoming};
use crate::Shared;

/// Notifications retained and fanned out per group (one sled batch each).
const GROUP_MAX: usize = 2048;
/// How often expired notifications leave the window.
const TRIM_EVERY: Duration = Duration::from_secs(30);

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

/// Runs until `shutdown` turns true.
pub(crate) async fn run(
    shared: Arc<Shared>,
    client: Client,
    partitions: u32,
    mut shutdown: watch::Receiver<bool>,
) {
    // The region may be electing leaders: retry until it answers or the edge stops.
    let starts = loop {
        match starting_offsets(&shared, &client, partitions).await {
            Ok(starts) => break starts,
            Err(e) => {
                tracing::warn!(error = %e, "cannot find where to start reading notifications; retrying");
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    shared.metrics.reading.store(true, Ordering::Release);
    let (tx, mut rx) = mpsc::channel::<Read>(GROUP_MAX * 4);
    let mut readers = Vec::new();
    for (partition, next) in starts {
        readers.push(tokio::spawn(read_partition(
            client.clone(),
            shared.config.topic.clone(),
            partition,
            StartFrom::Offset(next),
            tx.clone(),
        )));
    }
    drop(tx);
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
    for reader in readers {
        reader.abort();
    }
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

/// Each partition's next offset: from the window, or (first start) the region's end or
/// beginning as configured, written to the window at once so that a restart resumes there
/// and notifications published while the edge was down are not skipped.
async fn starting_offsets(
    shared: &Shared,
    client: &Client,
    partitions: u32,
) -> Result<Vec<(u32, u64)>, crate::EdgeError> {
    let mut starts = Vec::new();
    let mut fresh = Vec::new();
    for partition in 0..partitions {
        match shared.store.cursor(partition)? {
            Some(next) => starts.push((partition, next)),
            None => {
                let next = if shared.config.start == "earliest" {
                    0
                } else {
                    let topic = &shared.config.topic;
                    client.fetch(topic, partition, 0, 1).await?.1
                };
                starts.push((partition, next));
                fresh.push((partition, next));
            }
        }
    }
    if !fresh.is_empty() {
        shared.store.append(Vec::new(), &fresh, now_ms()).await?;
    }
    Ok(starts)
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

/// Streams one partition into `tx`, resuming after errors from the next offset.
async fn read_partition(
    client: Client,
    topic: String,
    partition: u32,
    mut start: StartFrom,
    tx: mpsc::Sender<Read>,
) {
    loop {
        match client.subscribe(&topic, partition, start).await {
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
