//! Adding partitions to a topic (`ferry ctl topic add-partitions`), driven by the leaders
//! of the split parents' groups. The metadata group records the new partition count and
//! the splits without seals ([`ferry_proto::KeyLayout`]); each parent's group leader then
//! proposes the split in the group's own log, where it applies at one point on every
//! replica: the children appear (empty, in the parent's group) and from there on the group
//! refuses publishes whose keys map elsewhere. The parent's offset at that point is the
//! seal, which the leader records in the metadata group. A leader change between the two
//! steps repeats them: the group answers a repeated split with its first seal.

use ferry_net::Transport;
use ferry_proto::wire::{ApiError, ErrorCode};
use openraft::async_runtime::WatchReceiver;

use crate::command::{decode, MetaCommand, PartitionCommand, PartitionReply};
use crate::node::{HostedPartition, Node};

impl<T: Transport> Node<T> {
    /// One round: every unsealed split whose parent this node leads is sealed in its group
    /// and the seal recorded in the metadata group.
    pub(crate) async fn seal_splits(&self) {
        for topic in self.inner.meta_view.topics() {
            let mut parents: std::collections::BTreeMap<u32, Vec<u32>> = Default::default();
            for split in topic.layout.unsealed() {
                parents.entry(split.parent).or_default().push(split.child);
            }
            for (parent, children) in parents {
                let Some(hosted) = self.hosted_partition(&topic, parent) else {
                    continue;
                };
                if hosted.raft().metrics().borrow_watched().current_leader != Some(self.inner.id) {
                    continue;
                }
                let name = &topic.config.name;
                let sealed = hosted
                    .group
                    .views
                    .split()
                    .seals
                    .get(&children[0])
                    .map(|(_, offset)| *offset);
                let offset = match sealed {
                    Some(offset) => offset,
                    None => {
                        let command = PartitionCommand::Split {
                            initial: topic.layout.initial,
                            partitions: topic.config.partitions,
                            children: children.clone(),
                        };
                        match propose_split(&hosted, command).await {
                            Ok(offset) => offset,
                            Err(e) => {
                                tracing::warn!(topic = %name, parent, ?children, error = %e, "sealing a split parent failed; retrying");
                                continue;
                            }
                        }
                    }
                };
                let seal = MetaCommand::SealSplit {
                    topic: name.clone(),
                    parent,
                    children: children.clone(),
                    offset,
                };
                match self.propose_meta_anywhere(seal).await {
                    Ok(()) => {
                        tracing::info!(topic = %name, parent, ?children, offset, "split parent sealed")
                    }
                    Err(e) => {
                        tracing::debug!(topic = %name, parent, error = %e, "recording a seal failed; retrying")
                    }
                }
            }
        }
    }
}

/// Proposes `split` in the parent's group: the seal offset the group applied it at.
async fn propose_split(hosted: &HostedPartition, split: PartitionCommand) -> Result<u64, ApiError> {
    let internal = |e: String| ApiError::new(ErrorCode::Internal, e);
    let command = hosted.command(split).map_err(|e| internal(e.to_string()))?;
    let response = hosted
        .proposer()
        .client_write(command)
        .await
        .map_err(|e| ApiError::new(ErrorCode::Unavailable, e.to_string()))?;
    match decode::<PartitionReply>("partition reply", &response.data.0) {
        Ok(PartitionReply::Sealed { offset }) => Ok(offset),
        Ok(PartitionReply::Error(e)) => Err(e),
        Ok(other) => Err(internal(format!("a split answered {other:?}"))),
        Err(e) => Err(internal(e.to_string())),
    }
}
