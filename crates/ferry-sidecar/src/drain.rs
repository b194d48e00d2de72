//! Sends the outbox to the region: one task per lane, records in order, each resent unchanged
//! until the region acknowledges it (or answers that it already holds it), then forgotten.
//! While the region is unreachable the lanes back off and the outbox keeps accepting.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use ferry_client::Client;
use ferry_proto::wire::ErrorCode;
use tokio::sync::watch;

use crate::outbox::{Lane, LaneFeed, Outbox, Outgoing};

/// Records sent per look into sled.
const PEEK: usize = 16;
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How sending to the region goes: the lanes failing now and why, and when it last worked.
#[derive(Debug, Default)]
pub struct RegionLink {
    failing: Mutex<BTreeMap<Lane, String>>,
    last_ok_ms: std::sync::atomic::AtomicU64,
}

impl RegionLink {
    /// Lanes that failed their last send, with the error.
    pub fn failing(&self) -> BTreeMap<Lane, String> {
        self.failing.lock().expect("region link").clone()
    }

    /// When a send last succeeded (ms since the epoch; 0 for never).
    pub fn last_ok_ms(&self) -> u64 {
        self.last_ok_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn ok(&self, lane: &Lane) {
        self.last_ok_ms
            .store(crate::now_ms(), std::sync::atomic::Ordering::Relaxed);
        let mut failing = self.failing.lock().expect("region link");
        if !failing.is_empty() {
            failing.remove(lane);
        }
    }

    fn failed(&self, lane: &Lane, error: String) {
        self.failing
            .lock()
            .expect("region link")
            .insert(lane.clone(), error);
    }
}

/// Starts a drainer for every lane the feed names, until shutdown.
pub(crate) async fn run(
    outbox: Outbox,
    client: Client,
    mut lanes: LaneFeed,
    link: std::sync::Arc<RegionLink>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            lane = lanes.recv() => match lane {
                Some(lane) => {
                    tasks.spawn(drain_lane(
                        outbox.clone(),
                        client.clone(),
                        lane,
                        link.clone(),
                        shutdown.clone(),
                    ));
                }
                None => break,
            },
            _ = shutdown.changed() => break,
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// What sending one record came to.
enum Sent {
    /// The region holds it.
    Acknowledged,
    /// Try again later (the error says why).
    Retry(String),
}

async fn send(client: &Client, record: &Outgoing) -> Sent {
    let sent = client
        .publish_batch(
            &record.lane.topic,
            record.lane.partition,
            record.batch.clone(),
        )
        .await;
    match sent {
        Ok(_) => Sent::Acknowledged,
        // Every event of the record is older than the producer's last appended sequence:
        // it was appended before (acknowledged, then forgotten only in memory).
        Err(e) if e.code() == Some(ErrorCode::AlreadyAppended) => Sent::Acknowledged,
        Err(e) => Sent::Retry(e.to_string()),
    }
}

async fn drain_lane(
    outbox: Outbox,
    client: Client,
    lane: Lane,
    link: std::sync::Arc<RegionLink>,
    mut shutdown: watch::Receiver<bool>,
) {
    let waker = outbox.waker(&lane);
    loop {
        let records = match outbox.peek(&lane, PEEK) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(%lane, error = %e, "reading the outbox failed; lane stops");
                link.failed(&lane, e.to_string());
                return;
            }
        };
        if records.is_empty() {
            tokio::select! {
                _ = waker.notified() => continue,
                _ = shutdown.changed() => return,
            }
        }
        for record in records {
            let mut backoff = FIRST_BACKOFF;
            loop {
                if *shutdown.borrow() {
                    return;
                }
                match send(&client, &record).await {
                    Sent::Acknowledged => break,
                    Sent::Retry(error) => {
                        tracing::debug!(%lane, %error, "outbox send failed; retrying");
                        link.failed(&lane, error);
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shutdown.changed() => return,
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            link.ok(&lane);
            if let Err(e) = outbox.acknowledged(&record) {
                tracing::error!(%lane, error = %e, "forgetting a sent record failed; lane stops");
                link.failed(&lane, e.to_string());
                return;
            }
        }
    }
}
