//! Publishes to the partitions of one Raft group, proposed as few entries as possible: what
//! arrives while the group's last proposal is being handed to Raft goes into the next entry
//! together ([`GroupEntry::Many`]), in arrival order, so a group whose partitions each have a
//! small batch ready pays one entry, one log record and one replication message per replica
//! for all of them. A publish that finds nothing queued is proposed at once, alone. An entry
//! holds at most [`MAX_ENTRY_BYTES`] of event data (but at least one publish) and
//! [`MAX_ENTRY_COMMANDS`] publishes; the rest waits for the next, in order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use ferry_store::{Command, TypeConfig};
use openraft::error::ClientWriteError;
use openraft::impls::ProgressResponder;
use openraft::raft::ClientWriteResponse;
use tokio::sync::oneshot;

use crate::command::{decode, encode, GroupCommand, GroupEntry, PartitionReply};
use crate::mesh::lock;
use crate::node::PartitionGroup;

/// What a queued publish learns: the reply its own command got once committed, Raft's refusal
/// of the entry, or why the entry was not proposed or its replies not read.
pub(crate) type Outcome = Result<Result<PartitionReply, ClientWriteError<TypeConfig>>, String>;

type Waiter = oneshot::Sender<Outcome>;

/// Event bytes one entry carries at most (a single larger publish goes alone): entries travel
/// in replication frames and are decoded whole on every replica.
pub(crate) const MAX_ENTRY_BYTES: usize = 1 << 20;
/// Publishes one entry carries at most.
pub(crate) const MAX_ENTRY_COMMANDS: usize = 512;

/// Takes the publishes of the next entry off the front of `queue`: at least one, then as many
/// as fit [`MAX_ENTRY_BYTES`] and [`MAX_ENTRY_COMMANDS`].
fn next_entry<W>(queue: &mut Vec<(GroupCommand, W)>) -> Vec<(GroupCommand, W)> {
    let mut bytes = 0;
    let mut take = 0;
    for (command, _) in queue.iter() {
        let size = command.command.payload_bytes();
        if take > 0 && (take == MAX_ENTRY_COMMANDS || bytes + size > MAX_ENTRY_BYTES) {
            break;
        }
        bytes += size;
        take += 1;
    }
    if take == queue.len() {
        // Usually the whole queue fits: no copy.
        return std::mem::take(queue);
    }
    queue.drain(..take).collect()
}

/// A group's queue of publishes not yet handed to Raft.
#[derive(Default)]
pub(crate) struct Proposals {
    queue: Mutex<Vec<(GroupCommand, Waiter)>>,
    /// A task is handing the queue to Raft.
    flushing: AtomicBool,
}

impl PartitionGroup {
    /// Queues `command` for the group's next entry; answers when it is committed and applied.
    pub(crate) fn submit(&self, command: GroupCommand) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        lock(&self.proposals.queue).push((command, tx));
        if !self.proposals.flushing.swap(true, Ordering::AcqRel) {
            let group = self.clone();
            tokio::spawn(async move { group.flush().await });
        }
        rx
    }

    /// Hands the queue to Raft, one entry per turn, until it is empty.
    async fn flush(&self) {
        let proposals = &self.proposals;
        loop {
            let queued = next_entry(&mut lock(&proposals.queue));
            if queued.is_empty() {
                proposals.flushing.store(false, Ordering::Release);
                // A submit between the take and the store saw the flag still set.
                if lock(&proposals.queue).is_empty()
                    || proposals.flushing.swap(true, Ordering::AcqRel)
                {
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
            if let Err(e) = self
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

/// Gives each waiter of an entry its part of Raft's answer: an entry of one publish was
/// answered with that publish's reply, an entry of several with their replies in order.
fn answer(
    result: Result<ClientWriteResponse<TypeConfig>, ClientWriteError<TypeConfig>>,
    mut waiters: Vec<Waiter>,
) {
    let response = match result {
        Ok(response) => response,
        Err(e) => {
            for w in waiters {
                let _ = w.send(Ok(Err(e.clone())));
            }
            return;
        }
    };
    if waiters.len() == 1 {
        let reply = decode::<PartitionReply>("partition reply", &response.data.0)
            .map(Ok)
            .map_err(|e| e.to_string());
        let _ = waiters.pop().expect("one waiter").send(reply);
        return;
    }
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
        let _ = w.send(Ok(Ok(reply)));
    }
}

#[cfg(test)]
mod tests {
    use ferry_proto::{Event, EventBatch, Limits, Subject};

    use super::*;
    use crate::command::PartitionCommand;

    /// A publish of `events` events of `bytes` each.
    fn publish_of(partition: u32, events: usize, bytes: usize) -> (GroupCommand, ()) {
        let event = Event::new("e", "/t", "t", Subject::new("a").unwrap(), vec![0u8; bytes]);
        let events = vec![event; events];
        let batch = EventBatch::new(&events, None, 0, &Limits::default()).unwrap();
        let command = PartitionCommand::Append {
            batch,
            appended_at_ms: 0,
        };
        (GroupCommand { partition, command }, ())
    }

    fn publish(partition: u32, bytes: usize) -> (GroupCommand, ()) {
        publish_of(partition, 1, bytes)
    }

    #[test]
    fn an_entry_is_bounded_in_bytes_and_publishes_and_keeps_the_order() {
        // Bytes: two of 400 KiB fit an entry (1 MiB); the third starts the next.
        let mut queue: Vec<_> = (0..5).map(|p| publish(p, 400 << 10)).collect();
        let first: Vec<u32> = next_entry(&mut queue)
            .iter()
            .map(|(c, _)| c.partition)
            .collect();
        assert_eq!(first, vec![0, 1]);
        let second: Vec<u32> = next_entry(&mut queue)
            .iter()
            .map(|(c, _)| c.partition)
            .collect();
        assert_eq!(second, vec![2, 3]);
        assert_eq!(queue.len(), 1);
        // One publish over the bound still goes, alone.
        let mut queue = vec![publish_of(0, 2, 700 << 10), publish(1, 10)];
        assert_eq!(next_entry(&mut queue).len(), 1);
        assert_eq!(next_entry(&mut queue).len(), 1);
        assert!(next_entry(&mut queue).is_empty());
        // Count.
        let mut queue: Vec<_> = (0..1000).map(|p| publish(p, 10)).collect();
        let entry = next_entry(&mut queue);
        assert_eq!(entry.len(), MAX_ENTRY_COMMANDS);
        assert_eq!(entry[0].0.partition, 0);
        assert_eq!(queue[0].0.partition, MAX_ENTRY_COMMANDS as u32);
    }
}
