//! The node's HTTP endpoint: `/healthz` and `/metrics` (Prometheus text format).
//!
//! `/healthz` answers 200 when the node sees a metadata leader and every partition it hosts
//! has a leader, 503 otherwise, with the reason in the body.

use std::fmt::Write;
use std::net::SocketAddr;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use ferry_net::Transport;
use openraft::async_runtime::WatchReceiver;

use ferry_proto::NodeId;

use crate::{HostedPartition, Node, RegionError};

/// Binds the HTTP endpoint; a bad address fails the node's start, naming the key.
pub async fn bind_http(addr: SocketAddr) -> Result<tokio::net::TcpListener, RegionError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| RegionError::Config {
            key: "http",
            reason: format!("cannot listen on {addr}: {e}"),
        })
}

/// Serves `/healthz` and `/metrics` on `listener` until the node shuts down.
pub async fn serve_http<T: Transport>(node: Node<T>, listener: tokio::net::TcpListener) {
    let mut shutdown = node.shutdown_signal();
    let app = Router::new()
        .route("/healthz", get(healthz::<T>))
        .route("/metrics", get(metrics::<T>))
        .with_state(node);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        })
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "HTTP endpoint failed");
    }
}

async fn healthz<T: Transport>(State(node): State<Node<T>>) -> (StatusCode, String) {
    if node
        .meta_raft()
        .metrics()
        .borrow_watched()
        .current_leader
        .is_none()
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "no metadata leader\n".into(),
        );
    }
    let leaderless: Vec<String> = node
        .partition_groups()
        .into_iter()
        .filter(|(_, g)| g.raft.metrics().borrow_watched().current_leader.is_none())
        .map(|(name, _)| name)
        .collect();
    if leaderless.is_empty() {
        (StatusCode::OK, "ok\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no leader for {}\n", leaderless.join(", ")),
        )
    }
}

/// Reads one per-partition gauge.
type GaugeOf = fn(&HostedPartition, NodeId) -> u64;

async fn metrics<T: Transport>(State(node): State<Node<T>>) -> String {
    let mut out = String::new();
    let id = node.id();
    let (fsyncs, waiters, fsync_micros) = node.flush_stats();
    let (batches, commit_micros) = node.commit_latency();
    let [streams, lanes, frames, requests] = node.replication_counts();
    let [snapshots_sent, snapshots_failed, snapshots_deferred] = node.snapshot_counts();
    let counters = [
        (
            "ferry_fsyncs_total",
            "Shared fsyncs performed.",
            fsyncs as f64,
        ),
        (
            "ferry_fsync_waiters_total",
            "Writes completed by a shared fsync.",
            waiters as f64,
        ),
        (
            "ferry_fsync_seconds_total",
            "Time spent in fsync.",
            fsync_micros as f64 / 1e6,
        ),
        (
            "ferry_publish_batches_total",
            "Batches this node led to commit.",
            batches as f64,
        ),
        (
            "ferry_publish_commit_seconds_total",
            "Time from submitting a batch to Raft until it was applied.",
            commit_micros as f64 / 1e6,
        ),
        (
            "ferry_replication_streams_opened_total",
            "Replication streams this node opened to followers (one per follower node, again after one fails).",
            streams as f64,
        ),
        (
            "ferry_replication_lanes_opened_total",
            "Replication lanes opened on them (one per group replication stream).",
            lanes as f64,
        ),
        (
            "ferry_replication_frames_total",
            "Replication frames sent to followers (each carries the requests of any number of groups).",
            frames as f64,
        ),
        (
            "ferry_replication_requests_total",
            "AppendEntries requests sent in them.",
            requests as f64,
        ),
        (
            "ferry_snapshots_sent_total",
            "Partition-group snapshots this node sent to followers and they installed.",
            snapshots_sent as f64,
        ),
        (
            "ferry_snapshot_sends_failed_total",
            "Partition-group snapshot sends given up part way (openraft starts them again).",
            snapshots_failed as f64,
        ),
        (
            "ferry_snapshot_builds_deferred_total",
            "Snapshot builds a partition group's leader deferred, keeping its log, while a replica caught up.",
            snapshots_deferred as f64,
        ),
        (
            "ferry_snapshot_bytes_received_total",
            "Bytes of partition-group snapshots this node received from leaders.",
            node.snapshot_bytes_received() as f64,
        ),
        (
            "ferry_replica_moves_finished_total",
            "Replica moves this node carried out to the end (as the group's leader).",
            node.replica_moves_finished() as f64,
        ),
        (
            "ferry_quiescence_elections_total",
            "Elections this node called at once because the leader of a sleeping partition group went down.",
            node.quiescence_elections() as f64,
        ),
    ];
    let counters = counters.into_iter().chain(node.tier_counters());
    for (name, help, value) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{node=\"{id}\"}} {value}"
        );
    }
    let gauges = [
        (
            "ferry_partitions_asleep",
            "Hosted partition groups asleep: idle, heartbeats and election timers off until the next write.",
            node.partitions_asleep() as u64,
        ),
        (
            "ferry_tier_upload_lag_bytes",
            "Bytes beyond their hot tail (retention.local_max_bytes) that the tiered partitions this node leads hold locally, not yet uploaded.",
            node.tier_upload_lag(),
        ),
        (
            "ferry_tier_partitions_failing",
            "Tiered partitions this node leads whose last upload failed (retried after a backoff).",
            node.tier_partitions_failing(),
        ),
        (
            "ferry_peers_down",
            "Other members of the region this node counts down: no answer and no packet for an election timeout, or no answer for four (0 with quiescence off).",
            node.peers_down().len() as u64,
        ),
        (
            "ferry_region_nodes",
            "Nodes of the region (members of its metadata group).",
            node.region_members().len() as u64,
        ),
        (
            "ferry_replica_moves",
            "Replica moves under way in the region.",
            node.replica_moves_under_way() as u64,
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{node=\"{id}\"}} {value}"
        );
    }
    let metric = "ferry_replica_move_behind_entries";
    let _ = writeln!(
        out,
        "# HELP {metric} Log entries the target of a move this node leads still lacks.\n# TYPE {metric} gauge"
    );
    for (group, from, to, behind) in node.replica_moves_led() {
        let _ = writeln!(
            out,
            "{metric}{{node=\"{id}\",group=\"{group}\",from=\"{from}\",to=\"{to}\"}} {behind}"
        );
    }
    let partitions = node.partitions();
    let gauges: [(&str, &str, GaugeOf); 8] = [
        (
            "ferry_partition_high_watermark",
            "Next offset of a hosted partition.",
            |g, _| g.view.watermarks().high,
        ),
        (
            "ferry_partition_low_watermark",
            "Oldest retained offset of a hosted partition.",
            |g, _| g.view.watermarks().low,
        ),
        (
            "ferry_partition_leader",
            "1 if this node leads the partition.",
            |g, id| u64::from(g.raft().metrics().borrow_watched().current_leader == Some(id)),
        ),
        (
            "ferry_partition_local_bytes",
            "Bytes of events a hosted partition holds in its batch files.",
            |g, _| g.view.stored_bytes(),
        ),
        (
            "ferry_partition_remote_bytes",
            "Bytes of events of a hosted partition in the object store (its manifest's objects).",
            |g, _| g.view.remote_bytes(),
        ),
        (
            "ferry_partition_stream_index_recent_appends",
            "Domain stream appends a hosted partition's index holds in memory (those since its last checkpoint).",
            |g, _| g.view.stream_index_held().0,
        ),
        (
            "ferry_partition_stream_index_runs",
            "Run files of a hosted partition's domain stream index.",
            |g, _| g.view.stream_index_held().1,
        ),
        (
            "ferry_partition_stream_index_bytes",
            "Bytes of a hosted partition's domain stream index runs on disk.",
            |g, _| g.view.stream_index_held().2,
        ),
    ];
    for (metric, help, value) in gauges {
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} gauge");
        for (name, g) in &partitions {
            let _ = writeln!(
                out,
                "{metric}{{node=\"{id}\",partition=\"{name}\"}} {}",
                value(g, id)
            );
        }
    }
    let metric = "ferry_forwarded_duplicate_events_total";
    let duplicates = node.forwarded_duplicates();
    let _ = writeln!(
        out,
        "# HELP {metric} Forwarded events not stored again because they were held already (destination dedupe by origin region, partition and offset): stage=intake, resends this node answered as the destination leader; stage=apply, skipped by the state machines of partitions it hosts.\n# TYPE {metric} counter\n{metric}{{node=\"{id}\",stage=\"intake\"}} {}\n{metric}{{node=\"{id}\",stage=\"apply\"}} {}",
        duplicates.resent_events_held, duplicates.skipped_on_apply
    );
    let metric = "ferry_link_faults_injected_total";
    let injected = node.injected_faults();
    let _ = writeln!(out, "# HELP {metric} Faults this node's fault injection put into its calls to shaped links ([[faults.slow_links]]).\n# TYPE {metric} counter");
    for (fault, count) in [
        ("request_dropped", injected.requests_dropped),
        ("response_dropped", injected.responses_dropped),
        ("request_duplicated", injected.requests_duplicated),
    ] {
        let _ = writeln!(out, "{metric}{{node=\"{id}\",fault=\"{fault}\"}} {count}");
    }
    let metric = "ferry_forwarded_events_total";
    let _ = writeln!(
        out,
        "# HELP {metric} Events this node sent to another region (first sends, not resends).\n# TYPE {metric} counter"
    );
    for ((topic, destination), count) in node.forwarded_events() {
        let _ = writeln!(
            out,
            "{metric}{{node=\"{id}\",topic=\"{topic}\",destination=\"{destination}\"}} {count}"
        );
    }
    let forwarding = node.forwarding();
    forwarder_series(
        &mut out,
        id,
        &forwarding,
        "ferry_forwarding_trimmed_unforwarded_total",
        "Source offsets retention dropped before this node's forwarder to a region dealt with them (events that region may have wanted).",
        "counter",
        |f| f.trimmed_unforwarded,
    );
    forwarder_series(
        &mut out,
        id,
        &forwarding,
        "ferry_forwarding_lag_events",
        "Source offsets of a partition this node leads not yet forwarded to a region.",
        "gauge",
        |f| f.lag_events,
    );
    out
}

/// One metric with a sample per forwarder of this node (labels: node, source partition,
/// destination).
fn forwarder_series(
    out: &mut String,
    node: u64,
    forwarding: &[ferry_proto::wire::ForwardingInfo],
    metric: &str,
    help: &str,
    kind: &str,
    value: impl Fn(&ferry_proto::wire::ForwardingInfo) -> u64,
) {
    let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
    for f in forwarding {
        let _ = writeln!(
            out,
            "{metric}{{node=\"{node}\",partition=\"{}/{}\",destination=\"{}\"}} {}",
            f.topic,
            f.partition,
            destination_label(f),
            value(f)
        );
    }
}

/// A forwarder's destination as a metric label: the region, or `region#partition` when the
/// destination's partition count differs and each of its partitions has a forwarder.
fn destination_label(f: &ferry_proto::wire::ForwardingInfo) -> String {
    match f.dest_partition {
        None => f.destination.clone(),
        Some(q) => format!("{}#{q}", f.destination),
    }
}
