//! How a topic's keys map to its partitions once partitions were added: linear hashing over
//! the key's FNV-1a hash, so adding partitions moves each moved key from one parent to one
//! child and leaves every other key where it was.
//!
//! A topic created with `N0` partitions and grown to `N` (`N0·2^k ≤ N < N0·2^(k+1)`, with
//! `n = N0·2^k`): a key with hash `h` goes to `h % n`, unless that is below `N - n`, in which
//! case it goes to `h % 2n` (which is either the same partition or `h % n + n`). While
//! `N = N0` this is `h % N0`, the mapping of a topic never split. Partition `c ≥ N0` is the
//! child of `c - n(c)` (`n(c)` the largest `N0·2^k ≤ c`): it took the half of its parent's
//! keys whose `h % 2n(c)` is `c`.
//!
//! A parent is sealed for its child's keys at an offset: events of those keys below the
//! seal are in the parent, from it on in the child. A reader that keeps per-key order reads
//! (delivers) the parent up to the seal before it reads the child.

use serde::{Deserialize, Serialize};

use crate::ProtoError;

/// FNV-1a 64 of `key`: stable across builds and platforms, so every client agrees.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The partition of a key with hash `hash` in a topic created with `initial` partitions
/// that now has `partitions` (linear hashing; `initial` 0 or ≥ `partitions`: `hash %
/// partitions`).
pub fn linear_partition(hash: u64, initial: u32, partitions: u32) -> u32 {
    let partitions = u64::from(partitions.max(1));
    let initial = u64::from(initial);
    if initial == 0 || initial >= partitions {
        return (hash % partitions) as u32;
    }
    let mut n = initial;
    while n * 2 <= partitions {
        n *= 2;
    }
    let p = hash % n;
    if p < partitions - n {
        (hash % (2 * n)) as u32
    } else {
        p as u32
    }
}

/// The key space of `partition` in a topic created with `initial` partitions that now has
/// `partitions`: the keys it takes are exactly those whose hash modulo the answer is
/// `partition` (`initial` 0 or ≥ `partitions`: the count itself).
pub fn key_modulus(partition: u32, initial: u32, partitions: u32) -> u64 {
    let partitions = u64::from(partitions.max(1));
    let initial = u64::from(initial);
    if initial == 0 || initial >= partitions {
        return partitions;
    }
    let mut n = initial;
    while n * 2 <= partitions {
        n *= 2;
    }
    let p = u64::from(partition);
    if p < partitions - n || p >= n {
        2 * n
    } else {
        n
    }
}

/// The key space `partition` had when it was made: a partition the topic was created with
/// took every key whose hash modulo `initial` is its number; a child took those modulo the
/// answer. Every key it ever held, before a seal gave some away, is in this space.
pub fn created_modulus(partition: u32, initial: u32) -> u64 {
    let initial = u64::from(initial.max(1));
    let mut m = initial;
    while m <= u64::from(partition) {
        m *= 2;
    }
    m
}

/// Whether some key hash is in both key spaces `a mod a_modulus` and `b mod b_modulus`
/// (they agree modulo the moduli's greatest common divisor).
pub fn key_spaces_meet(a: u32, a_modulus: u64, b: u32, b_modulus: u64) -> bool {
    let (mut x, mut y) = (a_modulus.max(1), b_modulus.max(1));
    while y != 0 {
        (x, y) = (y, x % y);
    }
    u64::from(a) % x == u64::from(b) % x
}

/// The parent of partition `child` of a topic created with `initial` partitions (None for
/// a partition it was created with).
pub fn parent_of(child: u32, initial: u32) -> Option<u32> {
    if initial == 0 || child < initial {
        return None;
    }
    let mut n = initial;
    while n * 2 <= child {
        n *= 2;
    }
    Some(child - n)
}

/// The partition a topic created with `initial` partitions was created with that
/// `partition` descends from (itself when `initial` is 0: never split).
pub fn root_of(partition: u32, initial: u32) -> u32 {
    if initial == 0 {
        partition
    } else {
        partition % initial
    }
}

/// One parent's split: its keys that now map to `child` went there from `seal` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// The partition that gave keys up.
    pub parent: u32,
    /// The partition that took them.
    pub child: u32,
    /// The parent's offset from which it refuses the child's keys: every event of them
    /// below it is in the parent, every later one in the child. None while the parent's
    /// group has not sealed it yet (the child takes no events meanwhile).
    pub seal: Option<u64>,
}

/// A topic's key layout: the partitions it was created with and the splits since.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyLayout {
    /// Partitions the topic was created with; 0 while it was never split.
    pub initial: u32,
    /// Every split, in the order they were made.
    pub splits: Vec<Split>,
}

impl KeyLayout {
    /// The partition of `key` in the topic of `partitions` partitions.
    pub fn partition_for_key(&self, key: &[u8], partitions: u32) -> u32 {
        linear_partition(key_hash(key), self.initial, partitions)
    }

    /// The partition of domain stream `stream`: a stream stays in the partition it was
    /// created in (its versions live there), so streams map by the partitions the topic was
    /// created with.
    pub fn stream_partition(&self, stream: &str, partitions: u32) -> u32 {
        let created = if self.initial == 0 {
            partitions
        } else {
            self.initial
        };
        (key_hash(stream.as_bytes()) % u64::from(created.max(1))) as u32
    }

    /// The partition the topic was created with that `partition` descends from (its Raft
    /// group is that one's).
    pub fn root(&self, partition: u32) -> u32 {
        root_of(partition, self.initial)
    }

    /// The split that made `child`, if it was made by one.
    pub fn split_of(&self, child: u32) -> Option<&Split> {
        self.splits.iter().find(|s| s.child == child)
    }

    /// Splits whose parent has not sealed yet.
    pub fn unsealed(&self) -> impl Iterator<Item = &Split> {
        self.splits.iter().filter(|s| s.seal.is_none())
    }

    /// The splits that growing the topic from `from` to `to` partitions makes, each with no
    /// seal yet; refused (naming why) unless `from < to ≤ 2·from` and no split is unsealed.
    pub fn plan_growth(&self, topic: &str, from: u32, to: u32) -> Result<Vec<Split>, ProtoError> {
        let invalid = |reason: String| ProtoError::InvalidTopic {
            field: "partitions",
            reason,
        };
        if let Some(open) = self.unsealed().next() {
            return Err(invalid(format!(
                "topic {topic:?} is in the middle of a split (partition {} of {} is not sealed \
                 yet); add partitions once it is",
                open.parent, open.child
            )));
        }
        if to <= from {
            return Err(invalid(format!(
                "topic {topic:?} has {from} partitions; partitions can only be added (asked for {to})"
            )));
        }
        if to > from.saturating_mul(2) {
            return Err(invalid(format!(
                "topic {topic:?} has {from} partitions: at most doubling at once ({}), asked for {to}",
                from.saturating_mul(2)
            )));
        }
        if to > crate::TopicConfig::MAX_PARTITIONS {
            return Err(invalid(format!(
                "{to} is over the most partitions a topic may have ({})",
                crate::TopicConfig::MAX_PARTITIONS
            )));
        }
        let initial = if self.initial == 0 {
            from
        } else {
            self.initial
        };
        Ok((from..to)
            .map(|child| Split {
                // Below 2·from, a child's parent is below from: an existing partition.
                parent: parent_of(child, initial).unwrap_or(0),
                child,
                seal: None,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_spaces_are_what_the_mapping_does() {
        for (initial, partitions) in [(4, 4), (4, 5), (4, 6), (4, 8), (3, 7), (4, 9), (1, 3)] {
            for p in 0..partitions {
                let m = key_modulus(p, initial, partitions);
                let created = created_modulus(p, initial);
                for h in 0..5_000u64 {
                    let home = linear_partition(h, initial, partitions);
                    assert_eq!(
                        home == p,
                        h % m == u64::from(p),
                        "{initial}/{partitions} p{p} h{h}"
                    );
                    if home == p {
                        assert_eq!(
                            h % created,
                            u64::from(p),
                            "a key of p{p} outside its creation space"
                        );
                    }
                }
            }
        }
        // Two layouts of one topic (4 → 6 here, 4 → 8 there): partition 2 here (not split
        // yet) holds keys of 2 and 6 there, partition 1 (split) only of 1.
        let meets = |p, q| key_spaces_meet(p, key_modulus(p, 4, 6), q, key_modulus(q, 4, 8));
        assert!(meets(2, 2) && meets(2, 6));
        assert!(!meets(2, 3) && !meets(2, 7) && !meets(2, 0));
        assert!(meets(1, 1) && !meets(1, 5));
        // Different creation counts: found by brute force.
        for (a, am, b, bm) in [(1u32, 6u64, 3u32, 4u64), (1, 6, 2, 4), (5, 12, 1, 8)] {
            let brute = (0..1000u64).any(|h| h % am == u64::from(a) && h % bm == u64::from(b));
            assert_eq!(key_spaces_meet(a, am, b, bm), brute, "{a}%{am} vs {b}%{bm}");
        }
    }

    #[test]
    fn before_any_split_a_key_maps_by_hash_mod_partitions() {
        for h in 0..10_000u64 {
            assert_eq!(linear_partition(h, 0, 6), (h % 6) as u32);
            assert_eq!(linear_partition(h, 6, 6), (h % 6) as u32);
        }
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c.
        assert_eq!(key_hash(b"a"), 0xaf63dc4c8601ec8c);
    }

    #[test]
    fn growing_moves_keys_only_from_a_parent_to_its_child() {
        for initial in [1u32, 3, 4, 5] {
            for partitions in initial..initial * 8 {
                for h in 0..20_000u64 {
                    let before = linear_partition(h, initial, partitions);
                    let after = linear_partition(h, initial, partitions + 1);
                    assert!(before < partitions && after <= partitions);
                    if before != after {
                        // Only the new partition takes keys, and only from its parent.
                        assert_eq!(after, partitions, "h {h} initial {initial} n {partitions}");
                        assert_eq!(parent_of(after, initial), Some(before));
                    }
                }
            }
        }
    }

    #[test]
    fn a_child_takes_about_half_of_its_parents_keys() {
        let mut counts = [0u32; 6];
        for h in 0..60_000u64 {
            counts[linear_partition(key_hash(&h.to_be_bytes()), 4, 6) as usize] += 1;
        }
        // 0 and 1 split into 4 and 5; 2 and 3 keep their quarter.
        for p in [0, 1, 4, 5] {
            assert!((6_500..8_500).contains(&counts[p]), "{counts:?}");
        }
        for p in [2, 3] {
            assert!((14_000..16_000).contains(&counts[p]), "{counts:?}");
        }
    }

    #[test]
    fn growth_is_planned_up_to_doubling_and_never_during_a_split() {
        let layout = KeyLayout::default();
        let splits = layout.plan_growth("t", 4, 8).unwrap();
        let pairs: Vec<_> = splits.iter().map(|s| (s.parent, s.child)).collect();
        assert_eq!(pairs, [(0, 4), (1, 5), (2, 6), (3, 7)]);
        let grown = KeyLayout {
            initial: 4,
            splits: vec![Split {
                parent: 0,
                child: 4,
                seal: Some(10),
            }],
        };
        let pairs: Vec<_> = grown
            .plan_growth("t", 6, 12)
            .unwrap()
            .iter()
            .map(|s| (s.parent, s.child))
            .collect();
        assert_eq!(pairs, [(2, 6), (3, 7), (0, 8), (1, 9), (2, 10), (3, 11)]);
        for (from, to) in [(4, 4), (4, 3), (4, 9), (3000, 5000)] {
            let e = layout.plan_growth("t", from, to).unwrap_err().to_string();
            assert!(e.contains("partitions"), "{e}");
        }
        let open = KeyLayout {
            initial: 4,
            splits: vec![Split {
                parent: 0,
                child: 4,
                seal: None,
            }],
        };
        let e = open.plan_growth("t", 5, 6).unwrap_err().to_string();
        assert!(e.contains("middle of a split"), "{e}");
        assert_eq!(open.root(13), 1);
        assert_eq!(parent_of(13, 4), Some(5));
        assert_eq!(parent_of(3, 4), None);
    }

    #[test]
    fn streams_stay_where_they_were_created() {
        let layout = KeyLayout {
            initial: 4,
            splits: Vec::new(),
        };
        for i in 0..100 {
            let name = format!("order-{i}");
            assert_eq!(
                layout.stream_partition(&name, 8),
                KeyLayout::default().stream_partition(&name, 4)
            );
        }
    }
}
