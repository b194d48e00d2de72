//! What gossip puts on the link, and what it keeps of what it hears.
//!
//! - [`Envelope`]: one message. `Swim` carries a packet of the sender's region's SWIM
//!   membership (foca's own postcard codec); `Summaries` carries region summaries from a
//!   router node of another region. Both name the mesh (`cluster`), so meshes never mix.
//! - [`Item`]: a custom broadcast foca spreads inside a region, piggybacked on its SWIM
//!   packets: a node's [`NodeRecord`] (versioned by the node's generation and a sequence),
//!   or another region's [`RegionSummary`] (versioned by its builder's generation and a
//!   sequence). [`Known`] decides, for each item heard, whether it is news worth spreading.
//!
//! All of it encodes with ferry-proto's codec.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use foca::{BroadcastHandler, Identity, Invalidates};
use serde::{Deserialize, Serialize};

use super::record;
use super::NodeRecord;

/// A member of a region's SWIM membership. A restarted node comes back with a larger
/// `generation`, which wins over the old one at the same address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(super) struct Peer {
    /// Node id (0 for a seed not yet heard from).
    pub(super) id: u64,
    /// Gossip address.
    pub(super) addr: SocketAddr,
    /// The run of the node (0 for a seed not yet heard from).
    pub(super) generation: u64,
}

impl Identity for Peer {
    type Addr = SocketAddr;

    /// Declared down while alive (a long pause, a cut): come back as the next generation.
    fn renew(&self) -> Option<Self> {
        Some(Peer {
            generation: self.generation + 1,
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// One gossip message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Envelope {
    /// A SWIM packet of `region`'s membership.
    Swim {
        /// Mesh name.
        cluster: String,
        /// The sender's region (only its members take part).
        region: String,
        /// foca's packet.
        packet: Vec<u8>,
    },
    /// Summaries a router node pushes to another region: its own region's, and the fresh
    /// ones it holds of third regions (so summaries cross any path, not only direct links).
    Summaries {
        /// Mesh name.
        cluster: String,
        /// The summaries.
        summaries: Vec<RegionSummary>,
    },
}

/// What a region tells the others: its live nodes' records (each with its region's interest
/// and its version, the regions it reaches, the partitions it leads, its load), as one of
/// its router nodes sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct RegionSummary {
    /// The region.
    pub(super) region: String,
    /// The router node that built it.
    pub(super) builder: u64,
    /// The builder's generation.
    pub(super) generation: u64,
    /// The builder's sequence: every round a new one, so a region that goes silent expires.
    pub(super) seq: u64,
    /// The region's live nodes, as the builder holds them.
    pub(super) nodes: Vec<SummaryNode>,
    /// The gossip addresses of the region's live members (where to push summaries).
    pub(super) gossip_addrs: Vec<SocketAddr>,
}

/// A node's record in a summary, with its version: a receiver merges the summaries of a
/// region's routers node by node, the newest record of each winning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SummaryNode {
    /// The node's generation.
    pub(super) generation: u64,
    /// Its sequence of records within the generation.
    pub(super) seq: u64,
    /// The record.
    pub(super) record: NodeRecord,
}

/// A custom broadcast inside a region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Item {
    /// A node's record.
    Record {
        /// The node's generation.
        generation: u64,
        /// Its sequence of records within the generation.
        seq: u64,
        /// The record.
        record: NodeRecord,
    },
    /// Another region's summary.
    Summary(RegionSummary),
}

impl Item {
    fn key(&self) -> ItemKey {
        match self {
            Item::Record {
                generation,
                seq,
                record,
            } => ItemKey::Record {
                id: record.id,
                version: (*generation, *seq),
            },
            Item::Summary(s) => ItemKey::Summary {
                region: s.region.clone(),
                builder: s.builder,
                version: (s.generation, s.seq),
            },
        }
    }
}

/// Which broadcast an item is, and how new: a newer item of the same node (or the same
/// region's builder) replaces an older one still being spread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ItemKey {
    /// A node's record.
    Record {
        /// Node id.
        id: u64,
        /// (generation, sequence).
        version: (u64, u64),
    },
    /// A region's summary by one builder.
    Summary {
        /// Region.
        region: String,
        /// Builder node id.
        builder: u64,
        /// (generation, sequence).
        version: (u64, u64),
    },
}

impl Invalidates for ItemKey {
    fn invalidates(&self, other: &Self) -> bool {
        match (self, other) {
            (ItemKey::Record { id, version }, ItemKey::Record { id: o, version: v }) => {
                id == o && version >= v
            }
            (
                ItemKey::Summary {
                    region,
                    builder,
                    version,
                },
                ItemKey::Summary {
                    region: r,
                    builder: b,
                    version: v,
                },
            ) => region == r && builder == b && version >= v,
            _ => false,
        }
    }
}

/// A record as held: its version and the record.
#[derive(Debug, Clone)]
pub(super) struct HeldRecord {
    pub(super) generation: u64,
    pub(super) seq: u64,
    pub(super) record: NodeRecord,
}

/// A summary as held: the newest from one builder, and when it arrived (this node's clock).
#[derive(Debug, Clone)]
pub(super) struct HeldSummary {
    pub(super) summary: RegionSummary,
    pub(super) received_at: Instant,
}

/// What this node has heard: records of its region's nodes, summaries of other regions.
#[derive(Debug)]
pub(super) struct Known {
    /// This node's region.
    pub(super) region: String,
    /// The time items heard now are stamped with (set by the driver before each input).
    pub(super) now: Instant,
    /// Records of this region's nodes, by node id.
    pub(super) records: HashMap<u64, HeldRecord>,
    /// Other regions' summaries, by (region, builder).
    pub(super) summaries: HashMap<(String, u64), HeldSummary>,
    /// Items refused (do not decode, another region's record, an invalid record).
    pub(super) refused: u64,
}

impl Known {
    pub(super) fn new(region: String, now: Instant) -> Self {
        Self {
            region,
            now,
            records: HashMap::new(),
            summaries: HashMap::new(),
            refused: 0,
        }
    }

    /// Takes `item` in if it is news: true if it was (then it is worth spreading).
    pub(super) fn learn(&mut self, item: Item) -> bool {
        match item {
            Item::Record {
                generation,
                seq,
                record,
            } => {
                if record.region != self.region || record::validate(&record).is_err() {
                    self.refused += 1;
                    return false;
                }
                let newer = self
                    .records
                    .get(&record.id)
                    .is_none_or(|held| (generation, seq) > (held.generation, held.seq));
                if newer {
                    self.records.insert(
                        record.id,
                        HeldRecord {
                            generation,
                            seq,
                            record,
                        },
                    );
                }
                newer
            }
            Item::Summary(summary) => {
                if summary.region == self.region {
                    return false;
                }
                let valid = record::check_region("region", &summary.region).is_ok()
                    && summary.nodes.iter().all(|n| {
                        n.record.region == summary.region && record::validate(&n.record).is_ok()
                    });
                if !valid {
                    self.refused += 1;
                    return false;
                }
                let key = (summary.region.clone(), summary.builder);
                let version = (summary.generation, summary.seq);
                let newer = self
                    .summaries
                    .get(&key)
                    .is_none_or(|held| version > (held.summary.generation, held.summary.seq));
                if newer {
                    self.summaries.insert(
                        key,
                        HeldSummary {
                            summary,
                            received_at: self.now,
                        },
                    );
                }
                newer
            }
        }
    }
}

/// The handle foca's broadcast handler and the membership share.
#[derive(Debug, Clone)]
pub(super) struct SharedKnown(Arc<Mutex<Known>>);

impl SharedKnown {
    pub(super) fn new(known: Known) -> Self {
        Self(Arc::new(Mutex::new(known)))
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Known> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why a broadcast item was refused.
#[derive(Debug, thiserror::Error)]
#[error("gossip item does not decode: {0}")]
pub(super) struct ItemError(#[from] ferry_proto::ProtoError);

impl BroadcastHandler<Peer> for SharedKnown {
    type Key = ItemKey;
    type Error = ItemError;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&Peer>,
    ) -> Result<Option<ItemKey>, ItemError> {
        let item: Item = match ferry_proto::codec::decode("gossip item", data) {
            Ok(item) => item,
            Err(e) => {
                self.lock().refused += 1;
                return Err(e.into());
            }
        };
        let key = item.key();
        Ok(self.lock().learn(item).then_some(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, region: &str) -> NodeRecord {
        NodeRecord {
            id,
            region: region.into(),
            role: "node".into(),
            ..NodeRecord::default()
        }
    }

    #[test]
    fn only_newer_items_are_news() {
        let mut known = Known::new("eu".into(), Instant::now());
        let item = |generation, seq| Item::Record {
            generation,
            seq,
            record: record(1, "eu"),
        };
        assert!(known.learn(item(5, 1)));
        assert!(!known.learn(item(5, 1)), "the same again");
        assert!(!known.learn(item(4, 9)), "an older generation");
        assert!(known.learn(item(5, 2)));
        assert!(known.learn(item(6, 0)), "a restart");
        assert!(
            !known.learn(Item::Record {
                generation: 9,
                seq: 9,
                record: record(2, "us"),
            }),
            "another region's record"
        );
        let summary = |seq, region: &str| {
            Item::Summary(RegionSummary {
                region: region.into(),
                builder: 4,
                generation: 1,
                seq,
                nodes: vec![SummaryNode {
                    generation: 1,
                    seq: 1,
                    record: record(4, region),
                }],
                gossip_addrs: vec![],
            })
        };
        assert!(known.learn(summary(1, "us")));
        assert!(!known.learn(summary(1, "us")));
        assert!(known.learn(summary(2, "us")));
        assert!(!known.learn(summary(3, "eu")), "its own region");
        assert_eq!(known.refused, 1);
    }

    #[test]
    fn newer_keys_invalidate_older_of_the_same_thing_only() {
        let r = |id, seq| ItemKey::Record {
            id,
            version: (1, seq),
        };
        assert!(r(1, 2).invalidates(&r(1, 1)));
        assert!(!r(1, 1).invalidates(&r(1, 2)));
        assert!(!r(2, 5).invalidates(&r(1, 1)));
        let s = |region: &str, builder, seq| ItemKey::Summary {
            region: region.into(),
            builder,
            version: (1, seq),
        };
        assert!(s("us", 4, 2).invalidates(&s("us", 4, 1)));
        assert!(!s("us", 5, 2).invalidates(&s("us", 4, 1)));
        assert!(!s("ap", 4, 2).invalidates(&s("us", 4, 1)));
        assert!(!s("us", 4, 2).invalidates(&r(4, 1)));
    }
}
