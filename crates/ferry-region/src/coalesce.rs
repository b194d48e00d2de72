//! Publishes to the partitions of one Raft group, proposed as few entries as possible: what
//! arrives while the group's last proposal is being handed to Raft goes into the next entry
//! together ([`GroupEntry::Many`]), in arrival order, so a group whose partitions each have a
//! small batch ready pays one entry, one log record and one replication message per replica
//! for all of them. A publish that finds nothing queued is proposed at once, alone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use ferry_store::{Command, Reply, TypeConfig};
use openraft::error::ClientWriteError;
use openraft::impls::ProgressResponder;
use openraft::raft::ClientWriteResponse;
use tokio::sync::oneshot;

use crate::command::{decode, encode, GroupCommand, GroupEntry, PartitionReply};
use crate::mesh::lock;
use crate::node::PartitionGroup;

/// What a queued publish learns: Raft's answer to it (the reply its own command got, for an
/// entry of several), or why it was not proposed.
pub(crate) type Outcome =
    Result<Result<ClientWriteResponse<TypeConfig>, ClientWriteError<TypeConfig>>, String>;

type Waiter = oneshot::Sender<Outcome>;

/// A group's queue of publishes not yet handed to Raft.
#[derive(Default)]
pub(crate) struct Proposals {
    queue: Mutex<Vec<(GroupCommand, Waiter)>>,
    /// A task is handing the queue to Raft.
    flushing: AtomicBool,
}

impl Proposals {
    /// Queues `command` for `group`'s next entry; answers when it is committed and applied.
    pub(crate) fn submit(
        &self,
        group: &PartitionGroup,
        command: GroupCommand,
    ) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        lock(&self.queue).push((command, tx));
        if !self.flushing.swap(true, Ordering::AcqRel) {
            let group = group.clone();
            tokio::spawn(async move { group.proposals.flush(&group).await });
        }
        rx
    }

    /// Hands the queue to Raft, one entry per turn, until it is empty.
    async fn flush(&self, group: &PartitionGroup) {
        loop {
            let queued = std::mem::take(&mut *lock(&self.queue));
            if queued.is_empty() {
                self.flushing.store(false, Ordering::Release);
                // A submit between the take and the store saw the flag still set.
                if lock(&self.queue).is_empty() || self.flushing.swap(true, Ordering::AcqRel) {
                    return;
                }
                continue;
            }
            let (mut commands, waiters): (Vec<GroupCommand>, Vec<Waiter>) =
                queued.into_iter().unzip();
            let entry = if commands.len() == 1 {
                GroupEntry::One(commands.pop().expect("one command"))
            } else {
                GroupEntry::Many(commands)
            };
            let bytes = match encode("partition entry", &entry) {
                Ok(b) => b,
                Err(e) => {
                    for w in waiters {
                        let _ = w.send(Err(e.to_string()));
                    }
                    continue;
                }
            };
            let (responder, committed) = ProgressResponder::complete_only();
            if let Err(e) = group
                .proposer()
                .client_write_ff(Command(bytes), Some(responder))
                .await
            {
                for w in waiters {
                    let _ = w.send(Err(e.to_string()));
                }
                continue;
            }
            tokio::spawn(async move {
                match committed.await {
                    Ok(result) => answer(result, waiters),
                    Err(_) => {
                        for w in waiters {
                            let _ = w.send(Err("the partition group stopped".into()));
                        }
                    }
                }
            });
        }
    }
}

/// Gives each waiter of an entry its part of Raft's answer.
fn answer(
    result: Result<ClientWriteResponse<TypeConfig>, ClientWriteError<TypeConfig>>,
    mut waiters: Vec<Waiter>,
) {
    if waiters.len() == 1 {
        let _ = waiters.pop().expect("one waiter").send(Ok(result));
        return;
    }
    let response = match result {
        Ok(response) => response,
        Err(e) => {
            for w in waiters {
                let _ = w.send(Ok(Err(e.clone())));
            }
            return;
        }
    };
    let replies = match decode::<Vec<PartitionReply>>("partition replies", &response.data.0) {
        Ok(replies) if replies.len() == waiters.len() => replies,
        Ok(replies) => {
            let why = format!(
                "an entry of {} publishes got {} replies",
                waiters.len(),
                replies.len()
            );
            for w in waiters {
                let _ = w.send(Err(why.clone()));
            }
            return;
        }
        Err(e) => {
            for w in waiters {
                let _ = w.send(Err(e.to_string()));
            }
            return;
        }
    };
    for (w, reply) in waiters.into_iter().zip(replies) {
        let data = encode("partition reply", &reply).unwrap_or_else(|_| Bytes::new());
        let _ = w.send(Ok(Ok(ClientWriteResponse {
            log_id: response.log_id,
            data: Reply(data),
            membership: None,
        })));
    }
}
