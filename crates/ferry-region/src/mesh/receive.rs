//! The destination side: relays a batch meant for another region, passes it to the
//! destination partition's leader, which proposes it through Raft (pipelined per origin
//! partition, resends answered from the applied state, batches routed by a layout the
//! partition's group left refused) and acknowledges after commit. And
//! defines a topic another region forwards here when this region lacks it.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry_net::{NetError, Transport};
use ferry_proto::wire::{ClientResponse, ErrorCode};
use ferry_proto::{codec, EventClass, RegionPolicy, TopicConfig};
use ferry_router::Ack;
use openraft::async_runtime::WatchReceiver;

use crate::command::{decode, PartitionCommand, PartitionReply};
use crate::node::{now_ms, Node};
use crate::peer::{ForwardRequest, PeerRequest, PeerResponse};

use super::{lock, Mesh};

/// How long the first relay on a path waits for the rest of it (below the peer request
/// timeout, 5 s); the `n`th waits `RELAY_TIMEOUT / n`, so every sender hears why in time.
const RELAY_TIMEOUT: Duration = Duration::from_secs(3);
/// Regions that may relay one request, at most.
pub(super) const MAX_RELAYS: usize = 3;

/// (origin region, topic, origin partition, destination partition) of forwarded batches.
pub(super) type OriginPartition = (String, String, u32, u32);

/// The destination leader's intake of one origin partition.
#[derive(Debug, Default)]
pub(super) struct Intake {
    /// The Raft term `proposed_to` belongs to.
    term: u64,
    /// Origin offsets below this are applied or proposed in `term`.
    proposed_to: u64,
}

/// The intake a forwarded batch belongs to.
fn intake_of(request: &ForwardRequest) -> OriginPartition {
    (
        request.origin_region.clone(),
        request.topic.clone(),
        request.partition,
        request.dest_partition,
    )
}

/// Forgets what the intake of `origin` proposed in `term` beyond `held` (applied): the next
/// resend of it is proposed again. A no-op once the term moved on (that reset it already).
async fn forget_proposals(mesh: &Mesh, origin: &OriginPartition, term: u64, held: u64) {
    let intake = lock(&mesh.receiving).get(origin).cloned();
    if let Some(intake) = intake {
        let mut intake = intake.lock().await;
        if intake.term == term && intake.proposed_to > held {
            intake.proposed_to = held;
        }
    }
}

impl<T: Transport> Node<T> {
    /// Passes a request for region `target` on, as a relay: to `direct` (nodes of `target`),
    /// then through nodes of regions not on its path yet (`via`, its origin first), those
    /// that reach `target` directly first. `request` builds the request with the path that
    /// includes this region. Refuses a request this region already relayed (a loop) or that
    /// passed `MAX_RELAYS` relays. Answers the first answer that is not `Unreachable` (a
    /// further relay's failure to reach), within a budget that shrinks with each hop, or
    /// `Unreachable`.
    pub(super) async fn relay(
        &self,
        mesh: &Mesh,
        target: &str,
        mut via: Vec<String>,
        direct: Vec<SocketAddr>,
        request: impl Fn(Vec<String>) -> PeerRequest,
    ) -> PeerResponse {
        let here = &mesh.region;
        // Refusals of the route, not of the request: the sender tries its next route.
        if via.is_empty() {
            return PeerResponse::Unreachable(format!(
                "refusing to relay for region {target}: the request names no origin"
            ));
        }
        if via.iter().any(|r| r == here) {
            return PeerResponse::Unreachable(format!(
                "refusing to relay for region {target} through {here} again (path {})",
                via.join(" > ")
            ));
        }
        if via.len() > MAX_RELAYS {
            return PeerResponse::Unreachable(format!(
                "refusing to relay for region {target}: path {} is already {MAX_RELAYS} relays long",
                via.join(" > ")
            ));
        }
        via.push(here.clone());
        let budget = RELAY_TIMEOUT / (via.len() as u32 - 1);
        let deadline = tokio::time::Instant::now() + budget;
        let onward: Vec<SocketAddr> = if via.len() <= MAX_RELAYS {
            mesh.snapshot()
                .relays(here, target)
                .into_iter()
                .filter(|(region, _)| !via.contains(region))
                .map(|(_, addr)| addr)
                .collect()
        } else {
            Vec::new()
        };
        let relayed = request(via.clone());
        let mut last_error = format!("region {target} has no live node known to {here}");
        for (addr, is_direct) in direct
            .into_iter()
            .map(|a| (a, true))
            .chain(onward.into_iter().map(|a| (a, false)))
        {
            // Half the budget at most per attempt, so a silent node (a dial that times out)
            // leaves time for the next route.
            let attempt = deadline.min(tokio::time::Instant::now() + budget / 2);
            let answer =
                tokio::time::timeout_at(attempt, self.inner.router.call_addr(addr, &relayed))
                    .await
                    .unwrap_or_else(|_| {
                        Err(NetError::Timeout {
                            what: format!("relaying to {addr}"),
                            after: budget / 2,
                        })
                    });
            match answer {
                Ok(PeerResponse::Unreachable(e)) => last_error = e,
                Ok(PeerResponse::Error(e)) => return PeerResponse::Error(e),
                Ok(answer) => {
                    if is_direct {
                        mesh.note_reach(target);
                    }
                    return answer;
                }
                Err(e) => last_error = format!("{addr}: {e}"),
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        PeerResponse::Unreachable(format!("relay through {here}: {last_error}"))
    }

    /// Answers a forwarded batch: relay it, pass it to the leader, or append it.
    pub(crate) async fn handle_forward(&self, mut request: ForwardRequest) -> PeerResponse {
        let Some(mesh) = self.mesh().cloned() else {
            return PeerResponse::Error("mesh not started".into());
        };
        if request.target_region != mesh.region {
            let target = request.target_region.clone();
            let direct = mesh.snapshot().targets(
                &target,
                &request.topic,
                request.dest_partition,
                request.routed_by.0,
            );
            let via = std::mem::take(&mut request.via);
            return self
                .relay(&mesh, &target, via, direct, |via| {
                    PeerRequest::Forward(ForwardRequest {
                        via,
                        ..request.clone()
                    })
                })
                .await;
        }
        let region = &mesh.region;
        let group = match self.lookup(&request.topic, request.dest_partition) {
            Ok(g) => Some(g),
            Err(e) if e.code == ErrorCode::NotLeader => None,
            Err(e) => return PeerResponse::Error(format!("region {region}: {}", e.message)),
        };
        let leader = match &group {
            Some(g) => g.raft().metrics().borrow_watched().current_leader,
            None => self.inner.meta_view.topic(&request.topic).and_then(|t| {
                t.replicas
                    .get(request.dest_partition as usize)?
                    .first()
                    .copied()
            }),
        };
        let group = match group {
            Some(g) if leader == Some(self.inner.id) => g,
            _ => {
                let Some(leader) = leader.filter(|l| *l != self.inner.id) else {
                    return PeerResponse::Error(format!(
                        "region {region}: {}/{} has no leader right now",
                        request.topic, request.dest_partition
                    ));
                };
                if request.passed_in_region {
                    return PeerResponse::Error(format!(
                        "region {region}: {}/{} is not led by node {} either",
                        request.topic, request.dest_partition, self.inner.id
                    ));
                }
                request.passed_in_region = true;
                return match self
                    .inner
                    .router
                    .call(leader, &PeerRequest::Forward(request))
                    .await
                {
                    Ok(answer) => answer,
                    Err(e) => PeerResponse::Error(format!(
                        "region {region}: passing to leader {leader}: {e}"
                    )),
                };
            }
        };
        let intake = lock(&mesh.receiving)
            .entry(intake_of(&request))
            .or_default()
            .clone();
        let origin_region = request.origin_region.clone();
        let mut intake = intake.lock().await;
        // Answer from the applied state when that settles it: a batch after a gap, or one
        // already held entirely (a resend). Costs no Raft round; the state machine still
        // decides whatever is proposed.
        let held = match group.view.received(&origin_region, request.partition) {
            Ok(held) => held,
            Err(e) => return PeerResponse::Error(format!("region {region}: {e}")),
        };
        let term = group.raft().metrics().borrow_watched().current_term;
        if intake.term != term {
            // What was proposed under another term may have been discarded.
            intake.term = term;
            intake.proposed_to = held;
        }
        intake.proposed_to = intake.proposed_to.max(held);
        let resent_events = request.batch.events.len() as u64;
        if request.batch.to <= held {
            mesh.resent_events_held
                .fetch_add(resent_events, Ordering::Relaxed);
            return PeerResponse::Forwarded(Ack::Committed { next: held });
        }
        // A tiered partition whose uploads cannot keep up holds forwarded events back as it
        // refuses publishes, so its disk stays within retention.local_limit_bytes; the
        // origin resends with backoff (its lane shows this as its last error). Before the gap
        // check: a later batch of the window answered with a gap would make the origin
        // resend at once.
        if let Some(full) = self.local_limit_reached(&request.topic, request.dest_partition, &group)
        {
            return PeerResponse::Error(format!("region {region}: {full}; resend later"));
        }
        if request.batch.from > intake.proposed_to {
            return PeerResponse::Forwarded(Ack::Gap { next: held });
        }
        if request.batch.to <= intake.proposed_to {
            // A resend of a batch still in Raft: wait for it instead of proposing it again.
            drop(intake);
            let intake_of = intake_of(&request);
            let deadline = Instant::now() + RELAY_TIMEOUT;
            loop {
                let held = match group.view.received(&origin_region, request.partition) {
                    Ok(held) => held,
                    Err(e) => return PeerResponse::Error(format!("region {region}: {e}")),
                };
                if held >= request.batch.to {
                    mesh.resent_events_held
                        .fetch_add(resent_events, Ordering::Relaxed);
                    return PeerResponse::Forwarded(Ack::Committed { next: held });
                }
                if Instant::now() >= deadline {
                    // The earlier copy may never commit (its proposal failed or was dropped
                    // in this term): the next resend is proposed again. A copy that does
                    // commit after all is turned away on apply.
                    forget_proposals(&mesh, &intake_of, term, held).await;
                    return PeerResponse::Error(format!(
                        "region {region}: an earlier copy of this batch is not committed yet"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        if let Some(why) = group
            .group
            .views
            .split()
            .forwarded_refusal(request.dest_partition, request.routed_by)
        {
            return PeerResponse::WrongPartition(format!(
                "region {region}: {}/{why}",
                request.topic
            ));
        }
        let (initial, partitions) = request.routed_by;
        let limits = &self.inner.config.limits;
        for (offset, bytes) in &request.batch.events {
            let event: ferry_proto::Event = match codec::decode("forwarded event", bytes) {
                Ok(e) => e,
                Err(e) => {
                    return PeerResponse::Error(format!(
                        "region {region}: event at origin offset {offset}: {e}"
                    ))
                }
            };
            if let Err(e) = event.validate(limits) {
                return PeerResponse::Error(format!(
                    "region {region}: event at origin offset {offset} refused: {e}"
                ));
            }
            if let Some(key) = &event.key {
                let home =
                    ferry_proto::linear_partition(ferry_proto::key_hash(key), initial, partitions);
                if home != request.dest_partition {
                    return PeerResponse::Error(format!(
                        "region {region}: the event at origin offset {offset} has a key of \
                         partition {home} of {partitions}, not of {}",
                        request.dest_partition
                    ));
                }
            }
        }
        // Continues what is proposed: submit now, behind the proposals still in Raft (in
        // order, as the intake is held until the entry is queued), and wait for the commit
        // without holding the intake, so batches of one origin partition pipeline.
        let batch_to = request.batch.to;
        let origin_region_key = intake_of(&request);
        let command = PartitionCommand::ForwardedRouted {
            origin_region,
            origin_partition: request.partition,
            batch: request.batch,
            appended_at_ms: now_ms(),
            routed_by: request.routed_by,
        };
        let command = match group.command(command) {
            Ok(c) => c,
            Err(e) => return PeerResponse::Error(e.to_string()),
        };
        let (responder, committed) = openraft::impls::ProgressResponder::complete_only();
        if let Err(e) = group
            .proposer()
            .client_write_ff(command, Some(responder))
            .await
        {
            return PeerResponse::Error(format!("region {region}: {e}"));
        }
        intake.proposed_to = batch_to;
        drop(intake);
        let intake_of = origin_region_key;
        let reply = match committed.await {
            Ok(Ok(response)) => decode::<PartitionReply>("partition reply", &response.data.0)
                .map_err(|e| e.to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the partition group stopped".to_string()),
        };
        if !matches!(reply, Ok(PartitionReply::Forwarded(_))) {
            // Not applied: what was proposed after it cannot apply either (a gap). Forget the
            // proposals so the origin's resends are proposed again.
            let held = group.view.received(&intake_of.0, intake_of.2).unwrap_or(0);
            forget_proposals(&mesh, &intake_of, term, held).await;
        }
        match reply {
            Ok(PartitionReply::Forwarded(ack)) => PeerResponse::Forwarded(ack),
            Ok(PartitionReply::Error(e)) if e.code == ErrorCode::WrongPartition => {
                PeerResponse::WrongPartition(format!("region {region}: {}", e.message))
            }
            Ok(PartitionReply::Error(e)) => {
                PeerResponse::Error(format!("region {region}: {}", e.message))
            }
            Ok(_) => PeerResponse::Error("unexpected partition reply".into()),
            Err(e) => PeerResponse::Error(format!("region {region}: {e}")),
        }
    }
}

impl<T: Transport> Node<T> {
    /// Another region forwards `config`'s topic here: answers its partition count in this
    /// region, creating it first if it does not exist (same configuration, replication at
    /// most this region's node count, Raft groups as this region's default). Domain and
    /// local topics are never defined from elsewhere.
    pub(crate) async fn ensure_forwarded_topic(
        &self,
        mut config: TopicConfig,
        target: String,
        via: Vec<String>,
    ) -> PeerResponse {
        let region = &self.inner.config.region;
        if target != *region {
            let Some(mesh) = self.mesh().cloned() else {
                return PeerResponse::Error("mesh not started".into());
            };
            let direct = mesh
                .snapshot()
                .nodes
                .iter()
                .filter(|n| n.region == target)
                .map(|n| n.addr)
                .collect();
            return self
                .relay(&mesh, &target, via, direct, |via| {
                    PeerRequest::EnsureTopic {
                        config: config.clone(),
                        region: target.clone(),
                        via,
                    }
                })
                .await;
        }
        if let Some(topic) = self.inner.meta_view.topic(&config.name) {
            return topic_layout(&topic);
        }
        if config.class == EventClass::Domain || config.regions == RegionPolicy::Local {
            return PeerResponse::Error(format!(
                "region {region}: topic {:?} is {:?} with policy {:?}: only integration and \
                 notification topics that leave their region are defined across regions",
                config.name, config.class, config.regions
            ));
        }
        let nodes = self.placement_nodes().len().max(1) as u32;
        config.replication = config.replication.min(nodes);
        // How partitions share Raft groups is a choice of each region, as placement is.
        config.groups = 0;
        let name = config.name.clone();
        match self.create_topic(config, false).await {
            ClientResponse::Ok => {}
            ClientResponse::Error(e) if e.code == ErrorCode::TopicExists => {}
            ClientResponse::Error(e) => {
                return PeerResponse::Error(format!(
                    "region {region}: creating topic {name:?}: {}",
                    e.message
                ))
            }
            _ => return PeerResponse::Error("unexpected answer to a topic creation".into()),
        }
        // Committed by the metadata leader; this node applies it shortly.
        let deadline = Instant::now() + RELAY_TIMEOUT;
        loop {
            if let Some(topic) = self.inner.meta_view.topic(&name) {
                tracing::info!(topic = %name, partitions = topic.config.partitions, "topic defined here by another region's forwarding");
                return topic_layout(&topic);
            }
            if Instant::now() >= deadline {
                return PeerResponse::Error(format!(
                    "region {region}: topic {name:?} created but not applied here yet"
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The answer naming `topic`'s key layout here.
fn topic_layout(topic: &crate::metadata::TopicState) -> PeerResponse {
    let (initial, partitions) = topic.routing_layout();
    PeerResponse::TopicLayout {
        initial,
        partitions,
    }
}
