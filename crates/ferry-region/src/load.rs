//! The measured write load of partition groups: events appended per second, smoothed over
//! about six samples (a minute by default), as a plain meter fed the groups' totals and the
//! time. A group's leader measures it, from samples taken while it led: a replica catching
//! up (a new one installing a snapshot, a follower replaying its log) applies a backlog that
//! is not the group's write rate. The metadata leader asks the region's nodes for their
//! groups' loads when it plans a rebalance ([`crate::balance::plan_balance`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_net::Transport;
use openraft::async_runtime::WatchReceiver;
use serde::{Deserialize, Serialize};

use crate::balance::Loads;
use crate::peer::{PeerRequest, PeerResponse};
use crate::Node;

/// Samples a rate is smoothed over: the weight of a sample `dt` after the last is
/// `1 - exp(-dt / (SMOOTHING * interval))`.
const SMOOTHING: f64 = 6.0;

/// One group's measured load, as nodes report it to each other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct GroupLoad {
    pub(crate) topic: String,
    pub(crate) group: u32,
    /// Events appended per second, smoothed.
    pub(crate) events_per_sec: f64,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    total: u64,
    /// None until a second sample gave a first rate.
    rate: Option<f64>,
}

/// The load of the groups a node hosts.
#[derive(Debug)]
pub(crate) struct LoadMeter {
    interval: Duration,
    groups: BTreeMap<(String, u32), Sample>,
}

impl LoadMeter {
    /// A meter sampled about every `interval`.
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval: interval.max(Duration::from_millis(1)),
            groups: BTreeMap::new(),
        }
    }

    /// Records that `group` of `topic` has appended `total` events so far (the sum of its
    /// partitions' high watermarks), at `now`, and whether this node leads it. A group it does
    /// not lead is forgotten: a rate starts from two samples taken while leading.
    pub(crate) fn observe(
        &mut self,
        topic: &str,
        group: u32,
        total: u64,
        leading: bool,
        now: Instant,
    ) {
        let key = (topic.to_string(), group);
        if !leading {
            self.groups.remove(&key);
            return;
        }
        let Some(last) = self.groups.get_mut(&key) else {
            self.groups.insert(
                key,
                Sample {
                    at: now,
                    total,
                    rate: None,
                },
            );
            return;
        };
        let dt = now.saturating_duration_since(last.at).as_secs_f64();
        if dt <= 0.0 {
            return;
        }
        // A total that went down belongs to a new replica of the group here: start again.
        let appended = total.checked_sub(last.total);
        let rate = match (appended, last.rate) {
            (None, _) => None,
            (Some(n), None) => Some(n as f64 / dt),
            (Some(n), Some(rate)) => {
                let weight = 1.0 - (-dt / (SMOOTHING * self.interval.as_secs_f64())).exp();
                Some(rate + weight * (n as f64 / dt - rate))
            }
        };
        *last = Sample {
            at: now,
            total,
            rate,
        };
    }

    /// Forgets the groups `hosted` says are no longer here.
    pub(crate) fn retain(&mut self, hosted: impl Fn(&str, u32) -> bool) {
        self.groups
            .retain(|(topic, group), _| hosted(topic, *group));
    }

    /// The groups with a measured rate.
    pub(crate) fn loads(&self) -> Vec<GroupLoad> {
        self.groups
            .iter()
            .filter_map(|((topic, group), s)| {
                Some(GroupLoad {
                    topic: topic.clone(),
                    group: *group,
                    events_per_sec: s.rate?,
                })
            })
            .collect()
    }
}

/// Merges reports from several nodes: a group's load is the highest reported (its leader
/// reports it; two reports come only from a leadership change between samples).
pub(crate) fn merge(reports: impl IntoIterator<Item = GroupLoad>) -> BTreeMap<(String, u32), f64> {
    let mut merged: BTreeMap<(String, u32), f64> = BTreeMap::new();
    for r in reports {
        let at = merged.entry((r.topic, r.group)).or_insert(0.0);
        *at = at.max(r.events_per_sec);
    }
    merged
}

impl<T: Transport> Node<T> {
    /// Samples the hosted groups' totals every `load_sample_ms`.
    pub(crate) fn spawn_load_meter(&self) {
        let every = Duration::from_millis(self.inner.config.load_sample_ms);
        self.spawn_every(every, |node| async move { node.sample_loads() });
    }

    fn sample_loads(&self) {
        let now = Instant::now();
        let me = self.inner.id;
        let totals: Vec<(String, u32, u64, bool)> = self
            .partition_groups()
            .into_iter()
            .filter_map(|(name, g)| {
                let (topic, group) = name.rsplit_once('/')?;
                let total = g.views.all().values().map(|v| v.watermarks().high).sum();
                let leading = g.raft.metrics().borrow_watched().current_leader == Some(me);
                Some((topic.to_string(), group.parse().ok()?, total, leading))
            })
            .collect();
        let Ok(mut meter) = self.inner.load_meter.lock() else {
            return;
        };
        for (topic, group, total, leading) in &totals {
            meter.observe(topic, *group, *total, *leading, now);
        }
        meter.retain(|topic, group| totals.iter().any(|(t, g, _, _)| t == topic && *g == group));
    }

    /// The measured load of the groups this node leads.
    pub(crate) fn hosted_loads(&self) -> Vec<GroupLoad> {
        self.inner
            .load_meter
            .lock()
            .map(|m| m.loads())
            .unwrap_or_default()
    }

    /// The load of the region's groups as its nodes measure it (each asked for up to 2 s; one
    /// that does not answer adds nothing), gathered at most once per `load_sample_ms`.
    pub(crate) async fn region_loads(&self) -> Loads {
        let fresh = Duration::from_millis(self.inner.config.load_sample_ms);
        let mut cached = self.inner.region_loads.lock().await;
        if let Some((at, loads)) = cached.as_ref() {
            if at.elapsed() < fresh {
                return loads.clone();
            }
        }
        let mut reports = self.hosted_loads();
        let patience = Duration::from_secs(2);
        for answer in self
            .ask_other_members(&PeerRequest::GroupLoads, patience)
            .await
        {
            if let PeerResponse::GroupLoads(list) = answer {
                reports.extend(list);
            }
        }
        let loads = Loads {
            per_group: merge(reports),
            spread: f64::from(self.inner.config.balance_load_spread_percent) / 100.0,
        };
        *cached = Some((Instant::now(), loads.clone()));
        loads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_appears_after_two_samples_and_follows_the_load() {
        let start = Instant::now();
        let second = Duration::from_secs(1);
        let mut meter = LoadMeter::new(second);
        meter.observe("t", 0, 100, true, start);
        assert!(meter.loads().is_empty());
        meter.observe("t", 0, 1_100, true, start + second);
        assert_eq!(meter.loads()[0].events_per_sec, 1_000.0);
        // Idle from now on: the rate decays, by about a sixth a sample.
        meter.observe("t", 0, 1_100, true, start + 2 * second);
        let decayed = meter.loads()[0].events_per_sec;
        assert!((840.0..850.0).contains(&decayed), "{decayed}");
        for s in 3..40 {
            meter.observe("t", 0, 1_100, true, start + s * second);
        }
        assert!(meter.loads()[0].events_per_sec < 2.0);
    }

    #[test]
    fn a_new_replica_starts_over_and_gone_groups_are_forgotten() {
        let start = Instant::now();
        let second = Duration::from_secs(1);
        let mut meter = LoadMeter::new(second);
        meter.observe("t", 0, 500, true, start);
        meter.observe("t", 0, 600, true, start + second);
        meter.observe("t", 1, 10, true, start + second);
        // Group 0's replica here was recreated: its total is below the last one.
        meter.observe("t", 0, 5, true, start + 2 * second);
        assert!(meter.loads().is_empty());
        meter.observe("t", 0, 15, true, start + 3 * second);
        assert_eq!(meter.loads()[0].events_per_sec, 10.0);
        meter.retain(|_, group| group == 1);
        assert!(meter.loads().is_empty());
    }

    #[test]
    fn only_samples_taken_while_leading_make_a_rate() {
        let start = Instant::now();
        let second = Duration::from_secs(1);
        let mut meter = LoadMeter::new(second);
        // A follower replaying a backlog: nothing reported.
        meter.observe("t", 0, 0, false, start);
        meter.observe("t", 0, 50_000, false, start + second);
        assert!(meter.loads().is_empty());
        // It leads from here: the backlog is not counted, only what came after.
        meter.observe("t", 0, 90_000, true, start + 2 * second);
        assert!(meter.loads().is_empty());
        meter.observe("t", 0, 90_020, true, start + 3 * second);
        assert_eq!(meter.loads()[0].events_per_sec, 20.0);
        // Leadership lost: forgotten.
        meter.observe("t", 0, 90_040, false, start + 4 * second);
        assert!(meter.loads().is_empty());
    }

    #[test]
    fn merging_keeps_the_highest_report() {
        let load = |group, events_per_sec| GroupLoad {
            topic: "t".into(),
            group,
            events_per_sec,
        };
        let merged = merge([load(0, 5.0), load(0, 9.0), load(1, 2.0)]);
        assert_eq!(merged[&("t".to_string(), 0)], 9.0);
        assert_eq!(merged[&("t".to_string(), 1)], 2.0);
    }
}
