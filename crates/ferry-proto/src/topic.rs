//! Topic configuration and its validation.

use serde::{Deserialize, Serialize};

use crate::{EventClass, ProtoError, SubjectFilter};

/// How long a topic keeps events. `None` means unbounded on that axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Retention {
    /// Drop batches older than this many milliseconds.
    pub max_age_ms: Option<u64>,
    /// Drop the oldest batches while a partition holds more than this many bytes.
    pub max_bytes: Option<u64>,
    /// Never drop events a forwarder to another region has not passed yet (its committed
    /// cursor), whatever the age and byte bounds say. Needs `hard_max_bytes`.
    pub keep_until_forwarded: bool,
    /// With `keep_until_forwarded`: a partition holding this many bytes or more refuses
    /// publishes ([`crate::wire::ErrorCode::PartitionFull`]) until forwarding catches up and
    /// retention can drop events again.
    pub hard_max_bytes: Option<u64>,
    /// Tiered storage: keep about this many bytes per partition in the replicas' batch files
    /// (the hot tail); the leader moves older, complete segment files to the region's object
    /// store, and reads of them are served from there. `max_age_ms` and `max_bytes` then
    /// bound the total (None: kept for ever). Needs an object store (`[tier]` in the node
    /// config).
    #[serde(default)]
    pub local_max_bytes: Option<u64>,
    /// With `local_max_bytes` (at least twice it): while uploads cannot keep up (the object
    /// store is down or slow), a partition whose batch files hold this many bytes on disk
    /// refuses publishes
    /// ([`crate::wire::ErrorCode::OffloadBehind`], retryable) until they catch up. Eight times
    /// `local_max_bytes` when unset.
    #[serde(default)]
    pub local_limit_bytes: Option<u64>,
}

impl Retention {
    /// Smallest hot tail a tiered topic may keep.
    pub const MIN_LOCAL_BYTES: u64 = 256 * 1024;

    /// Whether the topic is tiered (`local_max_bytes` set).
    pub fn tiered(&self) -> bool {
        self.local_max_bytes.is_some()
    }

    /// Local bytes at which a tiered partition refuses publishes (None: not tiered).
    pub fn local_limit(&self) -> Option<u64> {
        let hot = self.local_max_bytes?;
        Some(self.local_limit_bytes.unwrap_or(hot.saturating_mul(8)))
    }

    /// The size at which a partition's batch files roll over, given the node's: a tiered
    /// topic's are a quarter of its hot tail (moved to the object store whole, they bound
    /// what stays on disk), within 64 KiB and the node's size.
    pub fn segment_bytes(&self, node_segment_bytes: u64) -> u64 {
        match self.local_max_bytes {
            Some(hot) => (hot / 4).clamp(64 * 1024, node_segment_bytes.max(64 * 1024)),
            None => node_segment_bytes,
        }
    }
}

/// Which regions receive a topic's events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum RegionPolicy {
    /// Only the region that owns it.
    #[default]
    Local,
    /// Every region with a subscriber whose filter matches.
    ByInterest,
    /// These regions.
    Listed(Vec<String>),
}

/// A named log of N partitions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    /// Topic name: 1–128 of `[A-Za-z0-9_-]` and `.`.
    pub name: String,
    /// Number of partitions (1–4096).
    pub partitions: u32,
    /// Replicas per partition (1–7, odd recommended).
    pub replication: u32,
    /// Subjects this topic accepts.
    pub subjects: SubjectFilter,
    /// The class of its events.
    pub class: EventClass,
    /// Retention.
    pub retention: Retention,
    /// Region policy.
    pub regions: RegionPolicy,
    /// Raft groups the partitions are spread over (1..=partitions; 0 asks for the region's
    /// default, one per node). Partition `p` is replicated by group `p % groups`: the
    /// partitions of a group share its replicas, its leader and its Raft rounds, so a topic's
    /// partitions add ordering and parallelism for consumers without adding Raft work.
    #[serde(default)]
    pub groups: u32,
}

impl TopicConfig {
    /// Most partitions one topic may have.
    pub const MAX_PARTITIONS: u32 = 4096;

    /// A topic with defaults: replication 3, all subjects, domain class, no retention bound.
    pub fn new(name: impl Into<String>, partitions: u32) -> Self {
        Self {
            name: name.into(),
            partitions,
            replication: 3,
            subjects: SubjectFilter::all(),
            class: EventClass::Domain,
            retention: Retention::default(),
            regions: RegionPolicy::Local,
            groups: 0,
        }
    }

    /// The Raft group of `partition` (`groups` must be resolved, not 0).
    pub fn group_of(&self, partition: u32) -> u32 {
        partition % self.groups.max(1)
    }

    /// The partitions of Raft group `group`, in order.
    pub fn partitions_of(&self, group: u32) -> impl Iterator<Item = u32> {
        (group..self.partitions).step_by(self.groups.max(1) as usize)
    }

    /// Checks every field; the error names the field.
    pub fn validate(&self) -> Result<(), ProtoError> {
        validate_topic_name(&self.name)?;
        if self.partitions == 0 || self.partitions > Self::MAX_PARTITIONS {
            return Err(ProtoError::InvalidTopic {
                field: "partitions",
                reason: format!(
                    "{} is not within 1..={}",
                    self.partitions,
                    Self::MAX_PARTITIONS
                ),
            });
        }
        if self.groups > self.partitions {
            return Err(ProtoError::InvalidTopic {
                field: "groups",
                reason: format!(
                    "{} Raft groups for {} partitions: a group needs at least one partition",
                    self.groups, self.partitions
                ),
            });
        }
        if self.replication == 0 || self.replication > 7 {
            return Err(ProtoError::InvalidTopic {
                field: "replication",
                reason: format!("{} is not within 1..=7", self.replication),
            });
        }
        let r = &self.retention;
        if r.max_age_ms == Some(0) || r.max_bytes == Some(0) {
            return Err(ProtoError::InvalidTopic {
                field: "retention",
                reason: "a bound of zero would drop every event".into(),
            });
        }
        match (r.keep_until_forwarded, r.hard_max_bytes) {
            (true, None) => {
                return Err(ProtoError::InvalidTopic {
                    field: "retention.hard_max_bytes",
                    reason: "keep_until_forwarded needs a hard byte limit (a region that never \
                             comes back would otherwise fill the disk)"
                        .into(),
                })
            }
            (false, Some(_)) => {
                return Err(ProtoError::InvalidTopic {
                    field: "retention.hard_max_bytes",
                    reason: "only applies with keep_until_forwarded (use max_bytes to bound a \
                             partition)"
                        .into(),
                })
            }
            (true, Some(hard)) if r.max_bytes.is_some_and(|max| max >= hard) || hard == 0 => {
                return Err(ProtoError::InvalidTopic {
                    field: "retention.hard_max_bytes",
                    reason: format!(
                        "{hard} must be above 0 and above max_bytes ({:?})",
                        r.max_bytes
                    ),
                })
            }
            _ => {}
        }
        match (r.local_max_bytes, r.local_limit_bytes) {
            (None, Some(_)) => {
                return Err(ProtoError::InvalidTopic {
                    field: "retention.local_limit_bytes",
                    reason: "only applies with local_max_bytes (a tiered topic)".into(),
                })
            }
            (Some(hot), _) if hot < Retention::MIN_LOCAL_BYTES => {
                return Err(ProtoError::InvalidTopic {
                    field: "retention.local_max_bytes",
                    reason: format!(
                        "{hot} is below {} (the smallest hot tail)",
                        Retention::MIN_LOCAL_BYTES
                    ),
                })
            }
            (Some(hot), Some(limit)) if limit < hot.saturating_mul(2) => {
                return Err(ProtoError::InvalidTopic {
                    field: "retention.local_limit_bytes",
                    reason: format!(
                        "{limit} must be at least twice local_max_bytes ({hot}): the files on \
                         disk hold record headers and, until a checkpoint, offloaded batches too"
                    ),
                })
            }
            (Some(hot), _) if r.max_bytes.is_some_and(|max| max <= hot) => {
                return Err(ProtoError::InvalidTopic {
                    field: "retention.local_max_bytes",
                    reason: format!(
                        "{hot} is not below max_bytes ({:?}): nothing would be offloaded",
                        r.max_bytes
                    ),
                })
            }
            _ => {}
        }
        Ok(())
    }
}

/// Checks a topic name.
pub(crate) fn validate_topic_name(name: &str) -> Result<(), ProtoError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if name.is_empty() || name.len() > 128 || !name.chars().all(ok_char) {
        return Err(ProtoError::InvalidTopic {
            field: "name",
            reason: format!("{name:?} must be 1-128 characters of [A-Za-z0-9_.-]"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        assert!(TopicConfig::new("orders", 8).validate().is_ok());
        let err = TopicConfig::new("bad name", 8).validate().unwrap_err();
        assert!(err.to_string().contains("name"));
        let err = TopicConfig::new("orders", 0).validate().unwrap_err();
        assert!(err.to_string().contains("partitions"));
        let mut t = TopicConfig::new("orders", 1);
        t.replication = 0;
        assert!(t
            .validate()
            .unwrap_err()
            .to_string()
            .contains("replication"));
        let mut t = TopicConfig::new("orders", 4);
        t.groups = 5;
        assert!(t.validate().unwrap_err().to_string().contains("groups"));
    }

    #[test]
    fn partitions_map_to_groups_round_robin() {
        let mut t = TopicConfig::new("orders", 8);
        t.groups = 3;
        assert_eq!(t.group_of(7), 1);
        assert_eq!(t.partitions_of(1).collect::<Vec<_>>(), vec![1, 4, 7]);
        assert_eq!(t.partitions_of(2).collect::<Vec<_>>(), vec![2, 5]);
        let every: usize = (0..3).map(|g| t.partitions_of(g).count()).sum();
        assert_eq!(every, 8);
    }
}
