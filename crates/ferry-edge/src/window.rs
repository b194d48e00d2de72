//! The retained window: the last notifications of every channel the edge serves, in sled, so
//! a client that reconnects (to this edge, even after it restarted) gets exactly what it
//! missed, and one whose position has left the window is told so.
//!
//! Each channel numbers its notifications from 1. A client position is `<epoch>-<seq>`; the
//! epoch is drawn once when the store is created, so a position from another edge's store (or
//! from a store that was wiped) is recognised as foreign rather than misread.
//!
//! One sled batch holds a group of notifications *and* the region offsets they were read up
//! to, so the window and the edge's place in the region always agree: after a restart the
//! edge resumes reading exactly where its window ends. sled writes the batches to disk in the
//! background (every `flush_every_ms`), not once per group: a flush per group stalled
//! deliveries for hundreds of milliseconds once the store held a few hundred MB. The price is
//! paid after a crash: the last moments of the window are lost and re-read from the region,
//! where they could be numbered differently, so an edge that did not stop cleanly starts a
//! new epoch. Clients resuming with an older id get an explicit `gap` and the retained window,
//! never a silent renumbering. A clean shutdown ([`WindowStore::close_cleanly`]) keeps the
//! epoch.
//!
//! Keys (one tree): `e` the epoch; `clean` present only while the edge is stopped after a
//! clean shutdown; `p/<partition>` the next region offset to read;
//! `c/<channel>` the channel's retained range; `w/<channel>\0<seq>` one notification
//! (8 bytes of append time in ms, 1 byte of flags — bit 0: templated — then the JSON frame).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ferry_store::DurableSled;
use serde::{Deserialize, Serialize};

use crate::hub::Outbound;
use crate::EdgeError;

/// What the window keeps per channel.
#[derive(Debug, Clone, Copy)]
pub struct WindowLimits {
    /// Notifications kept per channel (the oldest go first).
    pub events: u64,
    /// Notifications older than this (ms) are dropped by [`WindowStore::trim_expired`].
    pub max_age_ms: u64,
}

/// The retained sequences of a channel: `first..next` (empty when equal).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelRange {
    /// Oldest sequence still retained.
    pub first: u64,
    /// Sequence the next notification gets.
    pub next: u64,
}

impl ChannelRange {
    /// The newest sequence handed out (0 when none).
    pub fn last(&self) -> u64 {
        self.next.saturating_sub(1)
    }
}

/// A notification read from the region, to be numbered and retained.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The channel.
    pub channel: Arc<str>,
    /// Builds the client frame once the id is known.
    pub frame: FrameParts,
}

/// The parts of a `message` frame other than its id.
#[derive(Debug, Clone, Serialize)]
pub struct FrameParts {
    /// The CloudEvent id of the source event.
    pub event_id: String,
    /// The CloudEvent type.
    pub event_type: String,
    /// The payload: JSON when it parses as JSON, else a string.
    pub data: serde_json::Value,
}

impl FrameParts {
    /// Whether the data asks for a template: `{"template": NAME, "vars": {…}}`.
    pub fn is_templated(&self) -> bool {
        self.data.get("template").is_some_and(|t| t.is_string())
    }
}

/// Length of an entry's header: append time (8 bytes) and flags (1 byte).
const ENTRY_HEADER: usize = 9;
/// Entry flag: the frame's data names a template.
const FLAG_TEMPLATED: u8 = 1;

#[derive(Serialize)]
struct MessageFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    channel: &'a str,
    id: String,
    #[serde(flatten)]
    parts: &'a FrameParts,
}

/// The sled-backed window.
pub struct WindowStore {
    db: sled::Db,
    /// The same database, for syncs that are promises (sled's flush is not an fsync).
    durable: DurableSled,
    epoch: String,
    limits: WindowLimits,
    /// Retained ranges, cached (the appender is the only writer).
    ranges: Mutex<HashMap<Arc<str>, ChannelRange>>,
}

/// A parsed client position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// A sequence of this store.
    Seq(u64),
    /// Not one of this store's positions (another epoch or unreadable).
    Foreign,
}

fn channel_key(channel: &str) -> Vec<u8> {
    let mut key = b"c/".to_vec();
    key.extend_from_slice(channel.as_bytes());
    key
}

fn entry_key(channel: &str, seq: u64) -> Vec<u8> {
    let mut key = b"w/".to_vec();
    key.extend_from_slice(channel.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn cursor_key(partition: u32) -> Vec<u8> {
    let mut key = b"p/".to_vec();
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

fn store_err(what: &str, reason: impl std::fmt::Display) -> EdgeError {
    EdgeError::Store(format!("{what}: {reason}"))
}

impl WindowStore {
    /// Opens (or creates) the window in `dir`; sled writes to disk every `flush_every_ms`.
    /// A window that was not closed cleanly gets a new epoch.
    pub fn open(dir: &Path, limits: WindowLimits, flush_every_ms: u64) -> Result<Self, EdgeError> {
        ferry_store::create_dir_durably(dir)
            .map_err(|e| store_err(&format!("creating {}", dir.display()), e))?;
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(Some(flush_every_ms.max(1)))
            .open()
            .map_err(|e| store_err(&format!("opening {}", dir.display()), e))?;
        let old = db.get(b"e").map_err(|e| store_err("reading epoch", e))?;
        let clean = db
            .remove(b"clean")
            .map_err(|e| store_err("reading the clean mark", e))?
            .is_some();
        let epoch = match old {
            Some(e) if clean => String::from_utf8_lossy(&e).into_owned(),
            previous => {
                if previous.is_some() {
                    tracing::warn!(
                        "the edge window was not closed cleanly: starting a new epoch (resuming clients get a gap frame)"
                    );
                }
                let epoch = format!("{:08x}", rand::random::<u32>());
                db.insert(b"e", epoch.as_bytes())
                    .map_err(|e| store_err("writing epoch", e))?;
                epoch
            }
        };
        // Durable before any position of this epoch is handed out: a clean mark that came
        // back after a power loss would keep the epoch with a window that rolled back.
        let durable = DurableSled::new(db.clone(), dir);
        durable
            .sync()
            .map_err(|e| store_err("syncing the epoch", e))?;
        Ok(Self {
            db,
            durable,
            epoch,
            limits,
            ranges: Mutex::new(HashMap::new()),
        })
    }

    /// This store's epoch (the prefix of its positions).
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// A client-facing id for a sequence.
    pub fn id_of(&self, seq: u64) -> String {
        format!("{}-{seq}", self.epoch)
    }

    /// Parses a client's id.
    pub fn parse_id(&self, id: &str) -> Position {
        match id.rsplit_once('-') {
            Some((epoch, seq)) if epoch == self.epoch => {
                seq.parse().map_or(Position::Foreign, Position::Seq)
            }
            _ => Position::Foreign,
        }
    }

    /// The next region offset to read for a partition, if the edge has read it before.
    pub fn cursor(&self, partition: u32) -> Result<Option<u64>, EdgeError> {
        let value = self
            .db
            .get(cursor_key(partition))
            .map_err(|e| store_err("reading a cursor", e))?;
        Ok(value.and_then(|v| Some(u64::from_be_bytes(v.as_ref().try_into().ok()?))))
    }

    /// A channel's retained range.
    pub fn range(&self, channel: &str) -> Result<ChannelRange, EdgeError> {
        if let Some(range) = self.ranges.lock().expect("ranges lock").get(channel) {
            return Ok(*range);
        }
        self.load_range(channel)
    }

    fn load_range(&self, channel: &str) -> Result<ChannelRange, EdgeError> {
        let value = self
            .db
            .get(channel_key(channel))
            .map_err(|e| store_err("reading a channel", e))?;
        Ok(match value {
            Some(v) => serde_json::from_slice(&v).map_err(|e| store_err("a channel range", e))?,
            None => ChannelRange { first: 1, next: 1 },
        })
    }

    /// Numbers and retains a group of notifications with the region offsets read so far, and
    /// trims each channel to the window (written to disk in the background).
    pub async fn append(
        &self,
        incoming: Vec<Incoming>,
        cursors: &[(u32, u64)],
        now_ms: u64,
    ) -> Result<Vec<Arc<Outbound>>, EdgeError> {
        let mut batch = sled::Batch::default();
        let mut out = Vec::with_capacity(incoming.len());
        let mut touched: HashMap<Arc<str>, ChannelRange> = HashMap::new();
        for item in incoming {
            let mut range = match touched.get(&item.channel) {
                Some(r) => *r,
                None => self.range(&item.channel)?,
            };
            let seq = range.next;
            range.next += 1;
            let frame = MessageFrame {
                kind: "message",
                channel: &item.channel,
                id: self.id_of(seq),
                parts: &item.frame,
            };
            let json = serde_json::to_vec(&frame).map_err(|e| store_err("a frame", e))?;
            let templated = item.frame.is_templated();
            let mut value = now_ms.to_be_bytes().to_vec();
            value.push(if templated { FLAG_TEMPLATED } else { 0 });
            value.extend_from_slice(&json);
            batch.insert(entry_key(&item.channel, seq), value);
            while range.next - range.first > self.limits.events {
                batch.remove(entry_key(&item.channel, range.first));
                range.first += 1;
            }
            touched.insert(item.channel.clone(), range);
            out.push(Arc::new(Outbound {
                channel: item.channel,
                seq,
                frame: Bytes::from(json),
                templated,
            }));
        }
        for (channel, range) in &touched {
            let value = serde_json::to_vec(range).map_err(|e| store_err("a channel range", e))?;
            batch.insert(channel_key(channel), value);
        }
        for (partition, next) in cursors {
            batch.insert(cursor_key(*partition), &next.to_be_bytes());
        }
        self.db
            .apply_batch(batch)
            .map_err(|e| store_err("writing the window", e))?;
        self.ranges.lock().expect("ranges lock").extend(touched);
        Ok(out)
    }

    /// Up to `limit` retained notifications of a channel with sequence above `after`.
    pub fn read(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Arc<Outbound>>, EdgeError> {
        let start = entry_key(channel, after.saturating_add(1));
        let end = entry_key(channel, u64::MAX);
        let name: Arc<str> = channel.into();
        let mut out = Vec::new();
        for item in self.db.range(start..=end).take(limit) {
            let (key, value) = item.map_err(|e| store_err("reading the window", e))?;
            let seq = u64::from_be_bytes(key[key.len() - 8..].try_into().expect("8 bytes"));
            if value.len() < ENTRY_HEADER {
                return Err(store_err(
                    "reading the window",
                    "entry shorter than its header",
                ));
            }
            out.push(Arc::new(Outbound {
                channel: name.clone(),
                seq,
                frame: self.in_this_epoch(channel, &value[ENTRY_HEADER..], seq)?,
                templated: value[8] & FLAG_TEMPLATED != 0,
            }));
        }
        Ok(out)
    }

    /// A stored frame with the id its sequence has in this epoch. An entry kept from an earlier
    /// epoch (the edge did not stop cleanly) still names that epoch: sent as it is, a client
    /// would resume with a position this store calls foreign and be sent the window again.
    fn in_this_epoch(&self, channel: &str, frame: &[u8], seq: u64) -> Result<Bytes, EdgeError> {
        let id = self.id_of(seq);
        // Frames are written by `append` with their fields in this order.
        let channel = serde_json::to_string(channel).map_err(|e| store_err("a channel", e))?;
        let current = format!("{{\"type\":\"message\",\"channel\":{channel},\"id\":\"{id}\"");
        if frame.starts_with(current.as_bytes()) {
            return Ok(Bytes::copy_from_slice(frame));
        }
        let mut value: serde_json::Value =
            serde_json::from_slice(frame).map_err(|e| store_err("a stored frame", e))?;
        value["id"] = serde_json::Value::String(id);
        serde_json::to_vec(&value)
            .map(Bytes::from)
            .map_err(|e| store_err("a frame", e))
    }

    /// Drops notifications older than the window's age from every channel; returns how many.
    pub async fn trim_expired(&self, now_ms: u64) -> Result<u64, EdgeError> {
        let cutoff = now_ms.saturating_sub(self.limits.max_age_ms);
        let mut batch = sled::Batch::default();
        let mut trimmed = 0;
        let mut touched = Vec::new();
        let mut empty = Vec::new();
        for item in self.db.scan_prefix(b"c/") {
            let (key, _) = item.map_err(|e| store_err("scanning channels", e))?;
            let channel = String::from_utf8_lossy(&key[2..]).into_owned();
            let mut range = self.range(&channel)?;
            let before = range.first;
            // Oldest first, stopping at the first one still young enough.
            let entries = self
                .db
                .range(entry_key(&channel, range.first)..entry_key(&channel, range.next));
            for entry in entries {
                let (key, value) = entry.map_err(|e| store_err("reading the window", e))?;
                let seq = u64::from_be_bytes(key[key.len() - 8..].try_into().expect("8 bytes"));
                let appended_ms = value
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, u64::from_be_bytes);
                if appended_ms >= cutoff {
                    break;
                }
                batch.remove(key);
                range.first = seq + 1;
            }
            if range.first != before {
                trimmed += range.first - before;
                let value =
                    serde_json::to_vec(&range).map_err(|e| store_err("a channel range", e))?;
                batch.insert(channel_key(&channel), value);
                touched.push((Arc::<str>::from(channel.as_str()), range));
            }
            if range.first == range.next {
                empty.push(channel);
            }
        }
        if trimmed > 0 {
            self.db
                .apply_batch(batch)
                .map_err(|e| store_err("trimming the window", e))?;
        }
        let mut ranges = self.ranges.lock().expect("ranges lock");
        ranges.extend(touched);
        // Channels with nothing retained leave the memory cache (their range stays on disk,
        // so their numbering continues if they come back).
        for channel in empty {
            ranges.remove(channel.as_str());
        }
        Ok(trimmed)
    }

    /// Another tree of the same database (webhook registrations and positions).
    pub fn tree(&self, name: &str) -> Result<sled::Tree, EdgeError> {
        self.db
            .open_tree(name)
            .map_err(|e| store_err(&format!("opening tree {name}"), e))
    }

    /// Flushes everything and marks the window closed cleanly, so the next open keeps the
    /// epoch (call it last, when nothing writes any more).
    pub async fn close_cleanly(&self) -> Result<(), EdgeError> {
        self.db
            .insert(b"clean", b"")
            .map_err(|e| store_err("marking the window clean", e))?;
        self.sync().await
    }

    /// Flushes everything to disk (written, not fsynced: the window is rebuilt from the
    /// region after a crash, under a new epoch).
    pub async fn flush(&self) -> Result<(), EdgeError> {
        self.db
            .flush_async()
            .await
            .map(|_| ())
            .map_err(|e| store_err("flushing the window", e))
    }

    /// Makes everything written so far durable (fsync), for what is promised to a client.
    pub async fn sync(&self) -> Result<(), EdgeError> {
        self.durable
            .sync_async()
            .await
            .map_err(|e| store_err("syncing the window", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(channel: &str, n: u64) -> Incoming {
        Incoming {
            channel: channel.into(),
            frame: FrameParts {
                event_id: format!("e{n}"),
                event_type: "t".into(),
                data: serde_json::json!({ "n": n }),
            },
        }
    }

    fn limits(events: u64) -> WindowLimits {
        WindowLimits {
            events,
            max_age_ms: 60_000,
        }
    }

    #[tokio::test]
    async fn numbers_per_channel_trims_to_the_window_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let epoch = {
            let store = WindowStore::open(dir.path(), limits(3), 100).unwrap();
            let batch = (1..=5)
                .map(|n| incoming("user.1", n))
                .chain([incoming("news", 1)])
                .collect();
            let out = store.append(batch, &[(0, 42)], 1_000).await.unwrap();
            let seqs: Vec<u64> = out.iter().map(|o| o.seq).collect();
            assert_eq!(seqs, vec![1, 2, 3, 4, 5, 1]);
            let frame: serde_json::Value = serde_json::from_slice(&out[4].frame).unwrap();
            assert_eq!(frame["id"], store.id_of(5));
            assert_eq!(frame["data"]["n"], 5);
            assert_eq!(frame["channel"], "user.1");
            store.close_cleanly().await.unwrap();
            store.epoch().to_string()
        };
        let store = WindowStore::open(dir.path(), limits(3), 100).unwrap();
        assert_eq!(store.epoch(), epoch);
        assert_eq!(store.cursor(0).unwrap(), Some(42));
        assert_eq!(store.cursor(1).unwrap(), None);
        assert_eq!(
            store.range("user.1").unwrap(),
            ChannelRange { first: 3, next: 6 }
        );
        let read: Vec<u64> = store
            .read("user.1", 0, 10)
            .unwrap()
            .iter()
            .map(|o| o.seq)
            .collect();
        assert_eq!(read, vec![3, 4, 5]);
        assert_eq!(store.read("user.1", 4, 10).unwrap().len(), 1);
        // A channel whose name extends another's is kept apart.
        assert!(store.read("user.10", 0, 10).unwrap().is_empty());
        let next = store
            .append(vec![incoming("user.1", 6)], &[], 2_000)
            .await
            .unwrap();
        assert_eq!(next[0].seq, 6);
    }

    #[tokio::test]
    async fn a_window_not_closed_cleanly_starts_a_new_epoch_and_keeps_its_entries() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let store = WindowStore::open(dir.path(), limits(10), 100).unwrap();
            store
                .append(vec![incoming("c", 1)], &[(0, 5)], 1)
                .await
                .unwrap();
            store.flush().await.unwrap();
            store.epoch().to_string()
        }; // dropped without close_cleanly: a crash as far as the window knows
        let store = WindowStore::open(dir.path(), limits(10), 100).unwrap();
        assert_ne!(store.epoch(), first);
        assert_eq!(store.parse_id(&format!("{first}-1")), Position::Foreign);
        let kept = store.read("c", 0, 10).unwrap();
        assert_eq!(kept.len(), 1);
        let frame: serde_json::Value = serde_json::from_slice(&kept[0].frame).unwrap();
        assert_eq!(
            frame["id"],
            store.id_of(1),
            "a kept entry is sent with its position in the new epoch"
        );
        assert_eq!(frame["channel"], "c");
        assert_eq!(store.cursor(0).unwrap(), Some(5));
        store.close_cleanly().await.unwrap();
        let second = store.epoch().to_string();
        drop(store);
        let store = WindowStore::open(dir.path(), limits(10), 100).unwrap();
        assert_eq!(store.epoch(), second, "a clean close keeps the epoch");
    }

    #[tokio::test]
    async fn positions_of_another_epoch_are_foreign_and_old_entries_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = WindowStore::open(dir.path(), limits(100), 100).unwrap();
        assert_eq!(store.parse_id(&store.id_of(7)), Position::Seq(7));
        assert_eq!(store.parse_id("ffffffff-7"), Position::Foreign);
        assert_eq!(store.parse_id("junk"), Position::Foreign);
        store
            .append(vec![incoming("c", 1), incoming("c", 2)], &[], 1_000)
            .await
            .unwrap();
        store
            .append(vec![incoming("c", 3)], &[], 70_000)
            .await
            .unwrap();
        assert_eq!(store.trim_expired(65_000).await.unwrap(), 2);
        assert_eq!(
            store.range("c").unwrap(),
            ChannelRange { first: 3, next: 4 }
        );
        assert_eq!(store.read("c", 0, 10).unwrap()[0].seq, 3);
    }
}
