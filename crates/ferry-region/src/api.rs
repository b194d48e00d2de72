//! The client API (ALPN `ferry-client/3`): each QUIC stream carries one request and its
//! answer, except two long-lived kinds. A stream that starts with `Publish` is a produce
//! stream: further `Publish` frames follow, each is submitted to Raft in arrival order and
//! answered in that order, so a producer can pipeline without reordering. A stream that
//! starts with `Subscribe` receives `Batches` frames as events are committed, until either
//! side closes it; QUIC flow control makes a slow subscriber wait without stalling others.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use ferry_net::framing::{read_frame, write_frame};
use ferry_net::Transport;
use ferry_proto::codec::{decode_frame_shared, encode_frame};
use ferry_proto::wire::{
    ApiError, ClientRequest, ClientResponse, ErrorCode, InterestReach, NodeAddress, PartitionInfo,
    StartFrom, TopicDescription,
};
use ferry_proto::{validate_stream_name, EventBatch, NodeId, SubjectFilter, TopicConfig};
use ferry_store::{Command, StoreError, TypeConfig};
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::ClientWriteResponse;

use crate::command::{
    decode, encode, GroupCommand, MetaCommand, MetaReply, PartitionCommand, PartitionReply,
};
use crate::metadata::place_replicas;
use crate::node::{now_ms, HostedPartition, Node};
use crate::partition::{GroupViews, SplitState};

/// The longest [`ClientRequest::AwaitInterest`] may wait.
const MAX_INTEREST_WAIT_MS: u64 = 60_000;

type Pending = Pin<Box<dyn Future<Output = ClientResponse> + Send>>;

fn error(code: ErrorCode, message: impl Into<String>) -> ClientResponse {
    ClientResponse::Error(ApiError::new(code, message))
}

fn not_leader(leader: Option<NodeId>, what: &str) -> ClientResponse {
    ClientResponse::Error(ApiError {
        code: ErrorCode::NotLeader,
        message: format!("this node does not lead {what}"),
        leader_hint: leader,
    })
}

/// Maps a Raft write failure to what the client should do.
/// Confirms that this node leads the partition and has applied up to the commit point, so a
/// read here sees every acknowledged write; otherwise the refusal (to forward to the leader).
async fn linearizable(
    group: &HostedPartition,
    topic: &str,
    partition: u32,
) -> Result<(), ClientResponse> {
    match group
        .raft()
        .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => Err(match e.forward_to_leader() {
            Some(f) => not_leader(f.leader_id, &format!("{topic}/{partition}")),
            None => error(ErrorCode::Unavailable, format!("{topic}/{partition}: {e}")),
        }),
    }
}

fn write_failure(e: &ClientWriteError<TypeConfig>, what: &str) -> ClientResponse {
    match e {
        ClientWriteError::ForwardToLeader(f) => not_leader(f.leader_id, what),
        ClientWriteError::LogEntryDiscarded(f) => ClientResponse::Error(ApiError {
            code: ErrorCode::NotLeader,
            message: format!(
                "{what}: leader changed before the write committed; retry (duplicates are removed)"
            ),
            leader_hint: f.leader_id,
        }),
        other => error(ErrorCode::Unavailable, format!("{what}: {other}")),
    }
}

/// The client's answer for a partition command's reply.
fn reply_response(reply: PartitionReply) -> ClientResponse {
    match reply {
        PartitionReply::Appended {
            base_offset,
            count,
            duplicate,
        } => ClientResponse::Published {
            base_offset,
            count,
            duplicate,
        },
        PartitionReply::StreamAppended {
            base_offset,
            first_version,
            version,
        } => ClientResponse::StreamAppended {
            base_offset,
            first_version,
            version,
        },
        PartitionReply::Done | PartitionReply::Forwarded(_) | PartitionReply::Sealed { .. } => {
            ClientResponse::Ok
        }
        PartitionReply::Error(e) => ClientResponse::Error(e),
    }
}

/// Why `events` do not belong in `partition` under the group's key layout `split` (the
/// first key that maps elsewhere), if one does not.
fn misrouted_key(
    events: &[ferry_proto::Event],
    split: &SplitState,
    partition: u32,
) -> Option<String> {
    events.iter().find_map(|e| {
        let key = e.key.as_ref()?;
        let home =
            ferry_proto::linear_partition(ferry_proto::key_hash(key), split.initial, split.layout);
        (home != partition).then(|| {
            format!(
                "key {:?} maps to partition {home} since the topic grew to {} partitions, not to \
                 {partition}: describe the topic again and route by its key layout",
                String::from_utf8_lossy(key),
                split.layout
            )
        })
    })
}

/// The client's answer for a committed write that holds one partition command.
fn partition_reply(response: ClientWriteResponse<TypeConfig>) -> ClientResponse {
    match decode::<PartitionReply>("partition reply", &response.data.0) {
        Ok(reply) => reply_response(reply),
        Err(e) => error(ErrorCode::Internal, e.to_string()),
    }
}

impl<T: Transport> Node<T> {
    pub(crate) fn lookup(&self, topic: &str, partition: u32) -> Result<HostedPartition, ApiError> {
        let Some(state) = self.inner.meta_view.topic(topic) else {
            return Err(ApiError::new(
                ErrorCode::UnknownTopic,
                format!("no topic named {topic:?}"),
            ));
        };
        if partition >= state.config.partitions {
            return Err(ApiError::new(
                ErrorCode::UnknownPartition,
                format!(
                    "topic {topic:?} has {} partitions; {partition} is out of range",
                    state.config.partitions
                ),
            ));
        }
        let hosted = self.hosted_partition(&state, partition);
        if let Some(split) = state
            .layout
            .split_of(partition)
            .filter(|_| hosted.is_none())
        {
            // Here with its parent's group, but not applied yet: it opens shortly.
            if self.hosted_partition(&state, split.parent).is_some() {
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "{topic}/{partition} opens once partition {} seals (partitions are being \
                         added); retry",
                        split.parent
                    ),
                ));
            }
        }
        hosted.ok_or_else(|| ApiError {
            code: ErrorCode::NotLeader,
            message: format!("{topic}/{partition} has no replica on this node"),
            leader_hint: state.replicas[partition as usize].first().copied(),
        })
    }

    /// Validates a publish and submits it to the partition's Raft in call order; the returned
    /// future resolves when a majority has it on disk (or it failed).
    pub(crate) async fn submit_publish(
        &self,
        topic: String,
        partition: u32,
        batch: EventBatch,
    ) -> Pending {
        self.submit_batch(
            topic,
            partition,
            batch,
            |batch, appended_at_ms, events, views| {
                // Checked here, where the events are decoded anyway; the state machine checks
                // that the group's layout is still the one checked against.
                let split = views.split();
                let misrouted = (split.layout != 0)
                    .then(|| misrouted_key(events, &split, partition))
                    .flatten();
                PartitionCommand::Publish {
                    batch,
                    appended_at_ms,
                    layout: split.layout,
                    misrouted,
                }
            },
        )
        .await
    }

    /// Validates a batch for `topic/partition` (the topic and partition exist, this node
    /// leads it, the events decode and are valid) and submits the command `command` makes of
    /// it, the append time, its events and the group's views; the returned future resolves
    /// when a majority has it on disk (or it failed).
    async fn submit_batch(
        &self,
        topic: String,
        partition: u32,
        batch: EventBatch,
        command: impl FnOnce(EventBatch, u64, &[ferry_proto::Event], &GroupViews) -> PartitionCommand,
    ) -> Pending {
        let group = match self.lookup(&topic, partition) {
            Ok(g) => g,
            Err(e) => return Box::pin(async move { ClientResponse::Error(e) }),
        };
        let events = match batch.decode_events(&self.inner.config.limits) {
            Ok(events) => events,
            Err(e) => {
                let code = match e {
                    ferry_proto::ProtoError::EventTooLarge { .. } => ErrorCode::EventTooLarge,
                    _ => ErrorCode::InvalidRequest,
                };
                return Box::pin(async move { error(code, e.to_string()) });
            }
        };
        let metrics = group.raft().metrics();
        let leader = metrics.borrow_watched().current_leader;
        if leader != Some(self.inner.id) {
            let what = format!("{topic}/{partition}");
            return Box::pin(async move { not_leader(leader, &what) });
        }
        if let Some(refused) = self.refusal_for_space(&topic, partition, &group) {
            return Box::pin(async move { refused });
        }
        let command = GroupCommand {
            partition,
            command: command(batch, now_ms(), &events, &group.group.views),
        };
        let what = format!("{topic}/{partition}");
        let started = std::time::Instant::now();
        let node = self.clone();
        let rx = group.group.submit(command);
        Box::pin(async move {
            let response = match rx.await {
                Ok(Ok(Ok(reply))) => reply_response(reply),
                Ok(Ok(Err(e))) => write_failure(&e, &what),
                Ok(Err(why)) => error(ErrorCode::Unavailable, format!("{what}: {why}")),
                Err(_) => error(
                    ErrorCode::Unavailable,
                    format!("{what}: the partition group stopped"),
                ),
            };
            node.inner.commit_latency.record(started.elapsed());
            response
        })
    }

    /// Why a tiered partition takes nothing more now, if its files on disk hold its
    /// `retention.local_limit_bytes` (its uploads to the object store are behind): publishes
    /// and forwarded batches are both refused then.
    pub(crate) fn local_limit_reached(
        &self,
        topic: &str,
        partition: u32,
        group: &HostedPartition,
    ) -> Option<String> {
        let limit = self.inner.meta_view.retention(topic)?.local_limit()?;
        // On disk: batches offloaded but not deleted yet (until the next checkpoint) count too.
        let held = group.view.disk_bytes();
        if held < limit {
            return None;
        }
        let why = self
            .inner
            .offloads
            .failure(topic, partition)
            .unwrap_or_else(|| "they are behind".into());
        Some(format!(
            "{topic}/{partition} holds {held} bytes locally, its retention.local_limit_bytes \
             is {limit}: its uploads to the object store cannot keep up ({why})"
        ))
    }

    /// The refusal of a publish to a partition without room for it: a tiered partition whose
    /// files hold its `local_limit_bytes` (uploads behind), or one that keeps events until
    /// forwarded, holds its hard byte limit and has a region behind (so retention cannot free
    /// space), naming the regions it waits for. None if it may take more.
    fn refusal_for_space(
        &self,
        topic: &str,
        partition: u32,
        group: &HostedPartition,
    ) -> Option<ClientResponse> {
        if let Some(full) = self.local_limit_reached(topic, partition, group) {
            return Some(error(
                ErrorCode::OffloadBehind,
                format!("{full}; nothing was appended, retry later"),
            ));
        }
        let retention = self.inner.meta_view.retention(topic)?;
        let hard = retention
            .hard_max_bytes
            .filter(|_| retention.keep_until_forwarded)?;
        let held = group.view.stored_bytes();
        if held < hard {
            return None;
        }
        let state = self.inner.meta_view.topic(topic)?;
        let floor = self.forwarded_floor(&state.config, group)?;
        if floor.offset >= group.view.watermarks().high {
            // Nobody is behind: retention's own bounds decide.
            return None;
        }
        Some(error(
            ErrorCode::PartitionFull,
            format!(
                "{topic}/{partition} holds {held} bytes, its retention.hard_max_bytes is {hard}: it \
                 keeps events until every region's forwarder passed them, and {} {} behind (at \
                 offset {}); publishing works again once forwarding catches up",
                floor.behind.join(", "),
                if floor.behind.len() == 1 { "is" } else { "are" },
                floor.offset
            ),
        ))
    }

    /// Answers one request. `forwarded` requests came from a peer and are never forwarded again.
    pub async fn handle_request(&self, request: ClientRequest, forwarded: bool) -> ClientResponse {
        // Kept whole for forwarding to a leader (event batches are shared bytes: cheap).
        let original = request.clone();
        match request {
            ClientRequest::CreateTopic(config) => self.create_topic(config, forwarded).await,
            ClientRequest::AddInterest { name, subjects } => {
                let subjects = match SubjectFilter::new(subjects) {
                    Ok(s) => s,
                    Err(e) => return error(ErrorCode::InvalidRequest, e.to_string()),
                };
                if name.is_empty() || name.len() > 128 {
                    return error(
                        ErrorCode::InvalidRequest,
                        "interest name must be 1-128 bytes",
                    );
                }
                self.meta_write(
                    MetaCommand::SetInterestAt {
                        name,
                        subjects,
                        at_ms: now_ms(),
                    },
                    original,
                    forwarded,
                )
                .await
            }
            ClientRequest::RemoveInterest { name } => {
                self.meta_write(MetaCommand::RemoveInterest { name }, original, forwarded)
                    .await
            }
            ClientRequest::AwaitInterest { version, wait_ms } => {
                if wait_ms > MAX_INTEREST_WAIT_MS {
                    return error(
                        ErrorCode::InvalidRequest,
                        format!("wait_ms {wait_ms} is more than {MAX_INTEREST_WAIT_MS}"),
                    );
                }
                ClientResponse::InterestAdded(
                    self.await_interest(version, Duration::from_millis(wait_ms))
                        .await,
                )
            }
            ClientRequest::ListInterests => ClientResponse::Interests(
                self.inner
                    .meta_view
                    .interests()
                    .into_iter()
                    .map(|(name, filter)| (name, filter.to_string()))
                    .collect(),
            ),
            ClientRequest::Regions => ClientResponse::Regions(self.mesh_report().await),
            ClientRequest::ListNodes
            | ClientRequest::AddNode { .. }
            | ClientRequest::DrainNode { .. }
            | ClientRequest::RemoveNode { .. } => self.node_admin(original, forwarded).await,
            ClientRequest::MoveReplica {
                topic,
                partition,
                from,
                to,
            } => {
                self.request_move(&topic, partition, from, to, original, forwarded)
                    .await
            }
            ClientRequest::Rebalance { dry_run } => {
                self.rebalance(dry_run, original, forwarded).await
            }
            ClientRequest::AddPartitions { topic, partitions } => {
                self.meta_write(
                    MetaCommand::AddPartitions { topic, partitions },
                    original,
                    forwarded,
                )
                .await
            }
            ClientRequest::ListTopics => ClientResponse::Topics(
                self.inner
                    .meta_view
                    .topics()
                    .into_iter()
                    .map(|t| t.config.clone())
                    .collect(),
            ),
            ClientRequest::DescribeTopic { topic } => {
                let mut response = self.describe(&topic);
                if !forwarded {
                    if let ClientResponse::Topic(d) = &mut response {
                        self.describe_from_replicas(d).await;
                    }
                }
                // A topic just created may not have reached this node yet: ask the leader.
                if matches!(&response, ClientResponse::Error(e) if e.code == ErrorCode::UnknownTopic)
                {
                    return self.on_meta_leader(original, forwarded, |_| response).await;
                }
                response
            }
            ClientRequest::Publish {
                topic,
                partition,
                batch,
            } => self.submit_publish(topic, partition, batch).await.await,
            ClientRequest::Fetch {
                topic,
                partition,
                offset,
                max_bytes,
            } => {
                // A node without a replica sends it to one that has.
                let group = match self.lookup(&topic, partition) {
                    Ok(g) => g,
                    Err(e) => {
                        return self
                            .forward_if_not_leader(ClientResponse::Error(e), original, forwarded)
                            .await
                    }
                };
                // Fetch reads everything committed.
                if let Err(response) = linearizable(&group, &topic, partition).await {
                    return self
                        .forward_if_not_leader(response, original, forwarded)
                        .await;
                }
                let max = (max_bytes as usize).min(self.inner.config.limits.max_frame / 2);
                match group.view.read(offset, max).await {
                    Ok(batches) => ClientResponse::Batches {
                        batches,
                        high_watermark: group.view.watermarks().high,
                    },
                    Err(e) => read_failed(&topic, partition, &e),
                }
            }
            ClientRequest::Subscribe { .. } => {
                error(ErrorCode::InvalidRequest, "subscribe needs its own stream")
            }
            ClientRequest::AppendToStream {
                topic,
                partition,
                stream,
                expected_version,
                batch,
            } => {
                if let Err(e) = validate_stream_name(&stream) {
                    return error(ErrorCode::InvalidRequest, e.to_string());
                }
                let response = self
                    .submit_batch(topic, partition, batch, |batch, appended_at_ms, _, _| {
                        PartitionCommand::AppendToStream {
                            stream,
                            expected_version,
                            batch,
                            appended_at_ms,
                        }
                    })
                    .await
                    .await;
                // Not proposed here (or discarded by a leader change): the leader may take it.
                self.forward_if_not_leader(response, original, forwarded)
                    .await
            }
            ClientRequest::ReadStream {
                topic,
                partition,
                stream,
                from_version,
                max_events,
            } => {
                if let Err(e) = validate_stream_name(&stream) {
                    return error(ErrorCode::InvalidRequest, e.to_string());
                }
                let group = match self.lookup(&topic, partition) {
                    Ok(g) => g,
                    Err(e) => {
                        return self
                            .forward_if_not_leader(ClientResponse::Error(e), original, forwarded)
                            .await
                    }
                };
                // As Fetch: a reader sees every append acknowledged to it.
                if let Err(response) = linearizable(&group, &topic, partition).await {
                    return self
                        .forward_if_not_leader(response, original, forwarded)
                        .await;
                }
                let max_bytes = self.inner.config.limits.max_frame / 2;
                match group
                    .view
                    .read_stream(&stream, from_version, max_events as usize, max_bytes)
                    .await
                {
                    Ok((version, events)) => ClientResponse::StreamEvents { version, events },
                    Err(e) => read_failed(&topic, partition, &e),
                }
            }
            ClientRequest::JoinGroup {
                group,
                topic,
                member,
            } => {
                self.on_meta_leader(original, forwarded, |node| {
                    let Some(state) = node.inner.meta_view.topic(&topic) else {
                        return error(ErrorCode::UnknownTopic, format!("no topic named {topic:?}"));
                    };
                    let Ok(mut c) = node.inner.coordinator.lock() else {
                        return error(ErrorCode::Internal, "group coordinator poisoned");
                    };
                    let (generation, partitions) = c.join(
                        Instant::now(),
                        &group,
                        &topic,
                        &member,
                        state.config.partitions,
                    );
                    ClientResponse::Assignment {
                        generation,
                        partitions,
                    }
                })
                .await
            }
            ClientRequest::LeaveGroup {
                group,
                topic,
                member,
            } => {
                self.on_meta_leader(original, forwarded, |node| {
                    if let Ok(mut c) = node.inner.coordinator.lock() {
                        c.leave(&group, &topic, &member);
                    }
                    ClientResponse::Ok
                })
                .await
            }
            ClientRequest::CommitOffset {
                group,
                topic,
                partition,
                offset,
            } => {
                let g = match self.lookup(&topic, partition) {
                    Ok(g) => g,
                    Err(e) => {
                        return self
                            .forward_if_not_leader(ClientResponse::Error(e), original, forwarded)
                            .await
                    }
                };
                let Ok(command) = g.command(PartitionCommand::Commit { group, offset }) else {
                    return error(ErrorCode::Internal, "encoding a commit");
                };
                let what = format!("{topic}/{partition}");
                let response = match g.proposer().client_write(command).await {
                    Ok(r) => partition_reply(r),
                    Err(RaftError::APIError(e)) => write_failure(&e, &what),
                    Err(RaftError::Fatal(f)) => {
                        error(ErrorCode::Unavailable, format!("{what}: {f}"))
                    }
                };
                self.forward_if_not_leader(response, original, forwarded)
                    .await
            }
            ClientRequest::CommittedOffset {
                group,
                topic,
                partition,
            } => {
                let g = match self.lookup(&topic, partition) {
                    Ok(g) => g,
                    Err(e) => {
                        return self
                            .forward_if_not_leader(ClientResponse::Error(e), original, forwarded)
                            .await
                    }
                };
                let leader = g.raft().metrics().borrow_watched().current_leader;
                if leader != Some(self.inner.id) {
                    return self
                        .forward_if_not_leader(
                            not_leader(leader, "the partition"),
                            original,
                            forwarded,
                        )
                        .await;
                }
                match g.view.committed(&group) {
                    Ok(offset) => ClientResponse::Committed(offset),
                    Err(e) => error(ErrorCode::Internal, e.to_string()),
                }
            }
        }
    }

    pub(crate) async fn forward_if_not_leader(
        &self,
        response: ClientResponse,
        request: ClientRequest,
        forwarded: bool,
    ) -> ClientResponse {
        let ClientResponse::Error(ApiError {
            code: ErrorCode::NotLeader,
            leader_hint: Some(mut to),
            ..
        }) = response
        else {
            return response;
        };
        if forwarded || to == self.inner.id {
            return response;
        }
        // At most two hops: the node hinted at may not lead (a node without a replica hints
        // at the preferred leader); it answers which one does, and that one gets it.
        let first = self.inner.router.forward(to, request.clone()).await;
        let next = match &first {
            Ok(ClientResponse::Error(ApiError {
                code: ErrorCode::NotLeader,
                leader_hint: Some(next),
                ..
            })) if *next != to && *next != self.inner.id => Some(*next),
            _ => None,
        };
        let answer = match next {
            Some(next) => {
                to = next;
                self.inner.router.forward(next, request).await
            }
            None => first,
        };
        answer.unwrap_or_else(|e| {
            error(
                ErrorCode::Unavailable,
                format!("forwarding to leader {to}: {e}"),
            )
        })
    }

    /// None on the metadata leader; elsewhere the leader's answer to `request` (forwarded
    /// there), for requests only the leader serves.
    pub(crate) async fn answer_from_meta_leader(
        &self,
        request: &ClientRequest,
        forwarded: bool,
    ) -> Option<ClientResponse> {
        let leader = self.inner.meta.metrics().borrow_watched().current_leader;
        if leader == Some(self.inner.id) {
            return None;
        }
        let refused = not_leader(leader, "the metadata group");
        Some(
            self.forward_if_not_leader(refused, request.clone(), forwarded)
                .await,
        )
    }

    async fn on_meta_leader(
        &self,
        request: ClientRequest,
        forwarded: bool,
        local: impl FnOnce(&Self) -> ClientResponse,
    ) -> ClientResponse {
        let leader = self.inner.meta.metrics().borrow_watched().current_leader;
        if leader == Some(self.inner.id) {
            return local(self);
        }
        self.forward_if_not_leader(not_leader(leader, "the metadata group"), request, forwarded)
            .await
    }

    pub(crate) async fn create_topic(
        &self,
        mut config: TopicConfig,
        forwarded: bool,
    ) -> ClientResponse {
        let original = config.clone();
        if let Err(e) = config.validate() {
            return error(ErrorCode::InvalidRequest, e.to_string());
        }
        if config.retention.tiered() && self.inner.tier.is_none() {
            return error(
                ErrorCode::InvalidRequest,
                format!(
                    "topic {}: retention.local_max_bytes needs an object store, and node {} has \
                     none ([tier] url in the node config; give every node of the region the \
                     same [tier])",
                    config.name, self.inner.id
                ),
            );
        }
        let nodes: Vec<NodeId> = self.placement_nodes();
        if config.replication as usize > nodes.len() {
            return error(
                ErrorCode::InvalidRequest,
                format!(
                    "replication {} exceeds the region's {} nodes that take replicas",
                    config.replication,
                    nodes.len()
                ),
            );
        }
        // Asked by the metadata leader only (a creation reaches it, forwarded if need be):
        // once per creation, not once per node it passed.
        let leads_meta =
            self.inner.meta.metrics().borrow_watched().current_leader == Some(self.inner.id);
        if config.retention.tiered() && leads_meta {
            if let Some(differs) = self.tier_mismatch(&nodes).await {
                return error(
                    ErrorCode::InvalidRequest,
                    format!("topic {}: {differs}", config.name),
                );
            }
        }
        if config.groups == 0 {
            config.groups = config.partitions.min(nodes.len() as u32);
        }
        let replicas = place_replicas(&nodes, &config);
        let command = MetaCommand::CreateTopic { config, replicas };
        self.meta_write(command, ClientRequest::CreateTopic(original), forwarded)
            .await
    }

    /// Proposes a metadata command (on the metadata leader, forwarding there if need be).
    pub(crate) async fn meta_write(
        &self,
        command: MetaCommand,
        original: ClientRequest,
        forwarded: bool,
    ) -> ClientResponse {
        let response = match self.propose_meta_reply(command).await {
            Ok(MetaReply::Created | MetaReply::Done) => ClientResponse::Ok,
            Ok(MetaReply::InterestSet { version }) => {
                ClientResponse::InterestAdded(InterestReach {
                    version,
                    seen_by: Vec::new(),
                    waiting_for: Vec::new(),
                })
            }
            Ok(MetaReply::Error(e)) | Err(e) => ClientResponse::Error(e),
        };
        self.forward_if_not_leader(response, original, forwarded)
            .await
    }

    /// Proposes a metadata command on this node (the leader): its reply, or why it was not
    /// applied (`NotLeader` with a hint elsewhere).
    async fn propose_meta_reply(&self, command: MetaCommand) -> Result<MetaReply, ApiError> {
        let failed = |response: ClientResponse| match response {
            ClientResponse::Error(e) => e,
            other => ApiError::new(ErrorCode::Internal, format!("{other:?}")),
        };
        let command = encode("metadata command", &command)
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
        match self.inner.meta.client_write(Command(command)).await {
            Ok(r) => decode::<MetaReply>("metadata reply", &r.data.0)
                .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string())),
            Err(RaftError::APIError(e)) => Err(failed(write_failure(&e, "the metadata group"))),
            Err(RaftError::Fatal(f)) => Err(ApiError::new(ErrorCode::Unavailable, f.to_string())),
        }
    }

    /// Proposes a metadata command on this node (the leader); an error reply is an error.
    pub(crate) async fn propose_meta(&self, command: MetaCommand) -> Result<(), ApiError> {
        match self.propose_meta_reply(command).await? {
            MetaReply::Error(e) => Err(e),
            _ => Ok(()),
        }
    }

    /// Fills in the partitions of `d` this node does not host (no leader, no offsets here)
    /// from nodes that do, their leaders first (a follower's offsets may trail): one request
    /// per node asked.
    async fn describe_from_replicas(&self, d: &mut TopicDescription) {
        let me = self.inner.id;
        let mut open: std::collections::BTreeSet<u32> = d
            .partitions
            .iter()
            .filter(|p| !p.replicas.contains(&me))
            .map(|p| p.partition)
            .collect();
        let mut asked = std::collections::BTreeSet::new();
        // What followers said, used where no leader answers.
        let mut from_followers: BTreeMap<u32, PartitionInfo> = BTreeMap::new();
        let mut hints: Vec<NodeId> = Vec::new();
        while let Some(&partition) = open.first() {
            let replicas = &d.partitions[partition as usize].replicas;
            let next = hints
                .iter()
                .chain(replicas)
                .find(|r| !asked.contains(*r))
                .copied();
            let Some(node) = next else {
                open.remove(&partition); // every replica was asked
                continue;
            };
            asked.insert(node);
            let request = ClientRequest::DescribeTopic {
                topic: d.config.name.clone(),
            };
            let answer = tokio::time::timeout(
                Duration::from_secs(2),
                self.inner.router.forward(node, request),
            )
            .await;
            let Ok(Ok(ClientResponse::Topic(theirs))) = answer else {
                continue;
            };
            for their in theirs.partitions {
                if !open.contains(&their.partition) || !their.replicas.contains(&node) {
                    continue;
                }
                match their.leader {
                    Some(l) if l == node => {
                        let partition = their.partition;
                        d.partitions[partition as usize] = their;
                        open.remove(&partition);
                        from_followers.remove(&partition);
                    }
                    Some(l) => {
                        hints.push(l);
                        from_followers.insert(their.partition, their);
                    }
                    None => {}
                }
            }
        }
        for (partition, info) in from_followers {
            d.partitions[partition as usize] = info;
        }
    }

    fn describe(&self, topic: &str) -> ClientResponse {
        let Some(state) = self.inner.meta_view.topic(topic) else {
            return error(ErrorCode::UnknownTopic, format!("no topic named {topic:?}"));
        };
        let partitions = (0..state.config.partitions)
            .map(|p| {
                let replicas = state.replicas[p as usize].clone();
                match self.hosted_partition(&state, p) {
                    Some(g) => {
                        let marks = g.view.watermarks();
                        PartitionInfo {
                            partition: p,
                            leader: g.raft().metrics().borrow_watched().current_leader,
                            replicas,
                            low_watermark: marks.low,
                            high_watermark: marks.high,
                            local_from: g.view.local_from(),
                            local_bytes: g.view.stored_bytes(),
                            remote_objects: g.view.remote_objects(),
                            remote_bytes: g.view.remote_bytes(),
                        }
                    }
                    None => PartitionInfo {
                        partition: p,
                        leader: None,
                        replicas,
                        low_watermark: 0,
                        high_watermark: 0,
                        local_from: 0,
                        local_bytes: 0,
                        remote_objects: 0,
                        remote_bytes: 0,
                    },
                }
            })
            .collect();
        let nodes = self
            .region_members()
            .iter()
            .map(|m| NodeAddress {
                id: m.id,
                client_addr: m.addr.to_string(),
            })
            .collect();
        ClientResponse::Topic(TopicDescription {
            config: state.config.clone(),
            partitions,
            nodes,
            moves: self.move_infos(topic),
            layout: state.layout.clone(),
        })
    }

    /// Serves one client connection until it closes.
    pub async fn serve_client(self, connection: quinn::Connection) {
        let Ok(_permit) = self.inner.client_connections.try_acquire() else {
            connection.close(quinn::VarInt::from_u32(1), b"too many client connections");
            return;
        };
        let mut shutdown = self.shutdown_signal();
        loop {
            let stream = tokio::select! {
                s = connection.accept_bi() => s,
                _ = shutdown.changed() => return,
            };
            let Ok((send, recv)) = stream else { return };
            let node = self.clone();
            tokio::spawn(async move {
                if let Err(e) = node.serve_stream(send, recv).await {
                    tracing::debug!(error = %e, "client stream ended");
                }
            });
        }
    }

    async fn serve_stream(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(), ferry_net::NetError> {
        let max = self.inner.config.limits.max_frame;
        let Some(frame) = read_frame(&mut recv, max).await? else {
            return Ok(());
        };
        let request = match decode_frame_shared::<ClientRequest>("client request", &frame, max) {
            Ok(r) => r,
            Err(e) => {
                let response = error(ErrorCode::InvalidRequest, e.to_string());
                return self.respond(&mut send, &response).await;
            }
        };
        match request {
            ClientRequest::Publish {
                topic,
                partition,
                batch,
            } => {
                self.produce_stream(send, recv, topic, partition, batch)
                    .await
            }
            ClientRequest::Subscribe {
                topic,
                partition,
                from,
            } => {
                self.subscribe_stream(send, recv, topic, partition, from)
                    .await
            }
            other => {
                let response = self.handle_request(other, false).await;
                self.respond(&mut send, &response).await?;
                let _ = send.finish();
                Ok(())
            }
        }
    }

    async fn respond(
        &self,
        send: &mut quinn::SendStream,
        response: &ClientResponse,
    ) -> Result<(), ferry_net::NetError> {
        let frame = encode_frame(
            "client response",
            response,
            self.inner.config.limits.max_frame,
        )
        .or_else(|e| {
            encode_frame(
                "client response",
                &error(ErrorCode::Internal, e.to_string()),
                usize::MAX,
            )
        })
        .map_err(|e| ferry_net::NetError::Protocol(e.to_string()))?;
        write_frame(send, frame).await
    }

    async fn produce_stream(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        topic: String,
        partition: u32,
        batch: EventBatch,
    ) -> Result<(), ferry_net::NetError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Pending>(4096);
        let node = self.clone();
        let writer = async move {
            while let Some(pending) = rx.recv().await {
                let response = pending.await;
                node.respond(&mut send, &response).await?;
            }
            let _ = send.finish();
            Ok::<_, ferry_net::NetError>(())
        };
        let max = self.inner.config.limits.max_frame;
        let node = self.clone();
        let reader = async move {
            let mut next = Some((topic, partition, batch));
            while let Some((topic, partition, batch)) = next.take() {
                let pending = node.submit_publish(topic, partition, batch).await;
                if tx.send(pending).await.is_err() {
                    break;
                }
                let Some(frame) = read_frame(&mut recv, max).await? else {
                    break;
                };
                match decode_frame_shared::<ClientRequest>("client request", &frame, max) {
                    Ok(ClientRequest::Publish {
                        topic,
                        partition,
                        batch,
                    }) => next = Some((topic, partition, batch)),
                    Ok(_) => {
                        let _ = tx
                            .send(Box::pin(async {
                                error(
                                    ErrorCode::InvalidRequest,
                                    "a produce stream carries only Publish",
                                )
                            }))
                            .await;
                        break;
                    }
                    Err(e) => {
                        let message = e.to_string();
                        let _ = tx
                            .send(Box::pin(async move {
                                error(ErrorCode::InvalidRequest, message)
                            }))
                            .await;
                        break;
                    }
                }
            }
            Ok::<_, ferry_net::NetError>(())
        };
        let (r, w) = tokio::join!(reader, writer);
        r.and(w)
    }

    async fn subscribe_stream(
        &self,
        mut send: quinn::SendStream,
        _recv: quinn::RecvStream,
        topic: String,
        partition: u32,
        from: StartFrom,
    ) -> Result<(), ferry_net::NetError> {
        let group = match self.lookup(&topic, partition) {
            Ok(g) => g,
            Err(e) => return self.respond(&mut send, &ClientResponse::Error(e)).await,
        };
        let mut marks = group.view.subscribe();
        let mut shutdown = self.shutdown_signal();
        // Ends when the group stops here (its replica moved away, say): the view then never
        // changes again, and the reader must go to a node that holds the partition.
        let mut running = group.raft().server_metrics();
        let current = *marks.borrow_and_update();
        let mut cursor = match from {
            StartFrom::Earliest => current.low,
            StartFrom::Latest => current.high,
            StartFrom::Offset(o) => o.max(current.low),
        };
        let max = self.inner.config.limits.max_frame / 2;
        tracing::debug!(node = self.inner.id, %topic, partition, cursor, high = current.high, leader = ?group.raft().metrics().borrow_watched().current_leader, "serving a subscription");
        loop {
            let high = marks.borrow_and_update().high;
            if cursor < high {
                let batches = match group.view.read(cursor, max).await {
                    Ok(batches) => batches,
                    // Whatever failed here (a hole, a damaged record), another replica may
                    // serve it: the subscriber resumes there.
                    Err(e) => {
                        let failed =
                            error(ErrorCode::Unavailable, format!("{topic}/{partition}: {e}"));
                        return self.respond(&mut send, &failed).await;
                    }
                };
                if let Some(last) = batches.last() {
                    cursor = last.end_offset();
                    let response = ClientResponse::Batches {
                        batches,
                        high_watermark: high,
                    };
                    self.respond(&mut send, &response).await?;
                    continue;
                }
                // Trimmed under us: skip to what is retained.
                cursor = cursor.max(group.view.watermarks().low);
                continue;
            }
            tokio::select! {
                changed = marks.changed() => if changed.is_err() { return Ok(()) },
                stopped = running.changed() => if stopped.is_err() {
                    let gone = error(
                        ErrorCode::Unavailable,
                        format!("{topic}/{partition}: this node no longer serves it; subscribe again"),
                    );
                    return self.respond(&mut send, &gone).await;
                },
                _ = send.stopped() => return Ok(()),
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }
}

/// The answer to a read this replica could not serve: a hole in its files sends the reader
/// to another replica (`Unavailable`); anything else is the node's own failure.
fn read_failed(topic: &str, partition: u32, e: &StoreError) -> ClientResponse {
    let code = match e {
        StoreError::Missing { .. } => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    };
    error(code, format!("{topic}/{partition}: {e}"))
}
