//! The partitions this node leads (those of the partition groups it leads), kept up to date from
//! each group's leadership changes (openraft's server metrics, which change on votes, leaders and
//! membership only) rather than found by scanning every hosted group: with thousands of sleeping
//! groups a scan on every mesh round and retention round was most of a node's idle CPU.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

use ferry_proto::NodeId;
use openraft::async_runtime::WatchReceiver;

use crate::mesh::lock;
use crate::node::{HostedPartition, PartitionGroup};

/// A partition this node leads.
#[derive(Clone)]
pub(crate) struct LedPartition {
    pub(crate) topic: Arc<str>,
    pub(crate) hosted: HostedPartition,
}

/// Which partitions this node leads now.
#[derive(Default)]
pub(crate) struct Leadership {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    led: BTreeMap<(Arc<str>, u32), HostedPartition>,
    /// Bumped on every change of `led`.
    version: u64,
    /// `led` as a list, built at most once per version.
    list: Option<(u64, Arc<[LedPartition]>)>,
}

impl Leadership {
    /// The partitions led now, sorted by (topic, partition), and the version of that set
    /// (it changes whenever the set does). Built once per change; sharing it costs nothing.
    pub(crate) fn led(&self) -> (Arc<[LedPartition]>, u64) {
        let mut state = lock(&self.state);
        let version = state.version;
        if let Some((at, list)) = &state.list {
            if *at == version {
                return (list.clone(), version);
            }
        }
        let list: Arc<[LedPartition]> = state
            .led
            .iter()
            .map(|((topic, _), hosted)| LedPartition {
                topic: topic.clone(),
                hosted: hosted.clone(),
            })
            .collect();
        state.list = Some((version, list.clone()));
        (list, version)
    }

    /// Records whether this node leads `group`, and so each of its partitions.
    fn set(&self, topic: &Arc<str>, group: &PartitionGroup, leads: bool) {
        let mut state = lock(&self.state);
        let mut changed = false;
        for partition in group.views.numbers() {
            let key = (topic.clone(), partition);
            changed |= if leads {
                match group.hosted(partition) {
                    Some(hosted) => state.led.insert(key, hosted).is_none(),
                    None => false,
                }
            } else {
                state.led.remove(&key).is_some()
            };
        }
        if changed {
            state.version += 1;
            // Built again on the next read; meanwhile it must not keep stopped groups open.
            state.list = None;
        }
    }

    /// Follows `group`'s leadership, and its partitions (a split adds some), for as long as
    /// the group runs (until its Raft stops) or the registry is dropped.
    pub(crate) fn follow(registry: Weak<Self>, me: NodeId, topic: Arc<str>, group: PartitionGroup) {
        let mut server = group.raft.server_metrics();
        let mut partitions = group.views.subscribe();
        tokio::spawn(async move {
            loop {
                let leads = server.borrow_and_update().current_leader == Some(me);
                partitions.borrow_and_update();
                let Some(registry) = registry.upgrade() else {
                    return;
                };
                registry.set(&topic, &group, leads);
                drop(registry);
                tokio::select! {
                    changed = server.changed() => if changed.is_err() { break },
                    _ = partitions.changed() => {}
                }
            }
            // The group stopped: it leads nothing any more.
            if let Some(registry) = registry.upgrade() {
                registry.set(&topic, &group, false);
            }
        });
    }
}
