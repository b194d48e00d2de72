//! The sweep of left-over objects: what a tiered partition's leader deletes from the object
//! store that the partition's manifest does not name. Objects are left over when an upload's
//! manifest entry never got an answer (a leader change at that moment) or when deleting an
//! object retention dropped failed. The state machine here is fed listings, the manifest and
//! the time; the driver (`Node::sweep_one`) lists, confirms leadership and deletes.
//!
//! An object is deleted only once it was left out of the manifest in two listings at least
//! [`SUSPECT_GRACE`] apart: an object retention just dropped stays readable for replicas
//! that apply the trim later (as the trim's own delete waits), and an upload whose entry is
//! still on its way gets time to land. Before deleting, the driver confirms that it still
//! leads the partition and has applied everything committed, and reads the manifest again:
//! an entry from an earlier leader that is still to commit is in its log, so it commits and
//! applies first; one that is not can never commit. And it deletes only objects whose key
//! no upload can take again ([`never_recorded_again`]): keys are made of offsets, so a
//! left-over starting where the manifest ends is the very key the next leader uploads and
//! records, and a delete of it that arrives late would remove a recorded object.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// How long an object must have been seen left out of the manifest before it is deleted
/// (as long as a trim waits before deleting what retention dropped).
pub(crate) const SUSPECT_GRACE: Duration = super::DELETE_GRACE;

/// One partition's sweep, as its leader keeps it.
#[derive(Debug, Default)]
pub(crate) struct OrphanSweep {
    last: Option<Instant>,
    /// Segment objects the manifest did not name, with when a listing first showed them.
    suspects: HashMap<String, Instant>,
}

impl OrphanSweep {
    /// Whether a listing is due (`every` after the last one began); if so, it begins now.
    pub(crate) fn begin(&mut self, now: Instant, every: Duration) -> bool {
        let due = self
            .last
            .is_none_or(|last| now.duration_since(last) >= every);
        if due {
            self.last = Some(now);
        }
        due
    }

    /// Takes a listing of the partition's objects (`listed`, keys under its prefix) made at
    /// `now` and the manifest's keys (`named`): the segment objects to delete, those left out
    /// of the manifest since at least [`SUSPECT_GRACE`]. Objects that are not segment objects
    /// of this partition (`is_segment`) are never suspected.
    pub(crate) fn review(
        &mut self,
        now: Instant,
        listed: &[String],
        named: &HashSet<&str>,
        is_segment: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let left_over: HashSet<&str> = listed
            .iter()
            .map(String::as_str)
            .filter(|k| is_segment(k) && !named.contains(k))
            .collect();
        // Named since, or gone: no longer suspected.
        self.suspects.retain(|k, _| left_over.contains(k.as_str()));
        let mut due = Vec::new();
        for key in left_over {
            let since = *self.suspects.entry(key.to_string()).or_insert(now);
            if now.duration_since(since) >= SUSPECT_GRACE {
                due.push(key.to_string());
            }
        }
        due.sort();
        due
    }

    /// `key` was deleted (or found named after all): no longer suspected.
    pub(crate) fn forget(&mut self, key: &str) {
        self.suspects.remove(key);
    }

    /// Objects suspected now.
    #[cfg(test)]
    fn suspected(&self) -> usize {
        self.suspects.len()
    }
}

/// The key of the segment object holding offsets `first` to `last` of the partition whose
/// objects are under `prefix`.
pub(crate) fn segment_key(prefix: &str, first: u64, last: u64) -> String {
    format!("{prefix}/{first:020}-{last:020}.seg")
}

/// The offsets a segment object's key names (`{prefix}/{first}-{last}.seg`, both of 20
/// digits), or None for a key of another kind under the prefix (a stream index run, say).
pub(crate) fn segment_offsets(prefix: &str, key: &str) -> Option<(u64, u64)> {
    let name = key
        .strip_prefix(prefix)?
        .strip_prefix('/')?
        .strip_suffix(".seg")?;
    let (first, last) = name.split_once('-')?;
    let offset = |n: &str| {
        (n.len() == 20 && n.bytes().all(|b| b.is_ascii_digit()))
            .then(|| n.parse::<u64>().ok())
            .flatten()
    };
    Some((offset(first)?, offset(last)?))
}

/// Whether `key` is one of the partition's segment objects ([`segment_offsets`]).
pub(crate) fn is_segment_key(prefix: &str, key: &str) -> bool {
    segment_offsets(prefix, key).is_some()
}

/// Whether no upload can record an object under the key of offsets `first` to `last` again,
/// given the manifest's end (past its last object; None while it names none) and the low
/// watermark: the next object recorded starts exactly at the manifest's end, or, with none,
/// at the batch holding the low watermark.
pub(crate) fn never_recorded_again(
    first: u64,
    last: u64,
    manifest_end: Option<u64>,
    low: u64,
) -> bool {
    last <= low || manifest_end.is_some_and(|end| first < end)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &str = "r/t/0";

    fn seg(first: u64, last: u64) -> String {
        segment_key(PREFIX, first, last)
    }

    fn review(
        sweep: &mut OrphanSweep,
        now: Instant,
        listed: &[String],
        named: &[&String],
    ) -> Vec<String> {
        let named: HashSet<&str> = named.iter().map(|k| k.as_str()).collect();
        sweep.review(now, listed, &named, |k| is_segment_key(PREFIX, k))
    }

    #[test]
    fn an_object_is_deleted_only_once_left_out_for_the_grace() {
        let start = Instant::now();
        let (kept, orphan) = (seg(0, 10), seg(10, 20));
        let listed = vec![kept.clone(), orphan.clone()];
        let mut sweep = OrphanSweep::default();
        let every = Duration::from_secs(60);
        assert!(sweep.begin(start, every));
        assert!(review(&mut sweep, start, &listed, &[&kept]).is_empty());
        assert!(!sweep.begin(start + every - Duration::from_millis(1), every));
        assert!(sweep.begin(start + every, every));
        let early = start + SUSPECT_GRACE - Duration::from_millis(1);
        assert!(review(&mut sweep, early, &listed, &[&kept]).is_empty());
        let late = start + SUSPECT_GRACE;
        assert_eq!(review(&mut sweep, late, &listed, &[&kept]), vec![orphan]);
    }

    #[test]
    fn an_object_named_or_gone_meanwhile_is_no_longer_suspected() {
        let start = Instant::now();
        let (landed, gone) = (seg(0, 10), seg(10, 20));
        let mut sweep = OrphanSweep::default();
        review(&mut sweep, start, &[landed.clone(), gone.clone()], &[]);
        assert_eq!(sweep.suspected(), 2);
        // Its manifest entry landed; the other was deleted by its trim.
        let later = start + SUSPECT_GRACE;
        let only_landed = std::slice::from_ref(&landed);
        assert!(review(&mut sweep, later, only_landed, &[&landed]).is_empty());
        assert_eq!(sweep.suspected(), 0);
        // Left out again later: the grace starts over.
        assert!(review(&mut sweep, later, only_landed, &[]).is_empty());
        assert_eq!(
            review(&mut sweep, later + SUSPECT_GRACE, only_landed, &[]),
            vec![landed]
        );
    }

    #[test]
    fn only_this_partitions_segment_objects_are_suspected() {
        let start = Instant::now();
        let others = vec![
            format!("{PREFIX}/stream-index/{:032x}.run", 7u128),
            format!("{PREFIX}/notes.txt"),
            format!("{PREFIX}/1-2.seg"),
            format!("r/t/01/{:020}-{:020}.seg", 0, 1),
            format!("{PREFIX}/x/{:020}-{:020}.seg", 0, 1),
        ];
        let mut sweep = OrphanSweep::default();
        review(&mut sweep, start, &others, &[]);
        assert!(review(&mut sweep, start + SUSPECT_GRACE, &others, &[]).is_empty());
        assert_eq!(sweep.suspected(), 0);
        assert!(is_segment_key(PREFIX, &seg(3, 9)));
        assert_eq!(segment_offsets(PREFIX, &seg(3, 9)), Some((3, 9)));
    }

    #[test]
    fn only_keys_no_upload_can_take_again_are_deletable() {
        // The manifest ends at 100: the next object recorded starts there.
        assert!(!never_recorded_again(100, 150, Some(100), 0));
        assert!(!never_recorded_again(120, 150, Some(100), 0));
        // Below its end (another leader's boundaries), or wholly below the low watermark.
        assert!(never_recorded_again(99, 150, Some(100), 0));
        assert!(never_recorded_again(0, 40, Some(100), 50));
        // A manifest that names nothing: only what lies wholly below the low watermark.
        assert!(never_recorded_again(10, 50, None, 50));
        assert!(!never_recorded_again(40, 60, None, 50));
    }
}
