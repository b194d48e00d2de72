//! The sidecar's HTTP API (axum): Dapr's publish, bulk publish, health and metadata
//! endpoints, Ferry's event store, and `/metrics`. Errors answer Dapr's JSON shape
//! `{"errorCode": "...", "message": "..."}` with the message naming what was wrong; a refused
//! request writes nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use ferry_client::ClientError;
use ferry_proto::wire::ErrorCode;
use ferry_proto::{Event, EventBatch, EventClass, Subject, TopicConfig};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::cloudevent::{prepare, Prepared, PublishRequest, STRUCTURED, WRAPPED_TYPE};
use crate::outbox::{OutboxError, Pending, TopicShape};
use crate::streams::{self, StreamError};
use crate::{Shared, TopicLookup};

type Shared_ = State<Arc<Shared>>;

/// A refused request: answered in Dapr's JSON shape, with `Retry-After` when it is worth
/// retrying later.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after_secs: Option<u64>,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(json!({"errorCode": self.code, "message": self.message})),
        )
            .into_response();
        if let Some(v) = self
            .retry_after_secs
            .and_then(|secs| secs.to_string().parse().ok())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}

fn error(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        message: message.into(),
        retry_after_secs: None,
    }
}

/// 503 with `Retry-After`.
fn unavailable(shared: &Shared, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        retry_after_secs: Some(shared.config.outbox.retry_after_secs),
        ..error(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }
}

pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let max_body = shared.config.limits.max_body_bytes;
    let app = Router::new()
        .route("/v1.0/publish/{pubsub}/{topic}", post(publish))
        .route(
            "/v1.0-alpha1/publish/bulk/{pubsub}/{topic}",
            post(bulk_publish),
        )
        .route("/v1.0-ferry/streams/{stream}/events", post(append))
        .route("/v1.0-ferry/streams/{stream}", get(read_stream))
        .route(
            "/v1.0-ferry/categories/{category}/events",
            get(read_category),
        )
        .route("/v1.0/metadata", get(metadata))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            limit_requests,
        ))
        // Health and metrics answer whatever the load.
        .route("/v1.0/healthz", get(healthz))
        .route("/v1.0/healthz/outbound", get(healthz_outbound))
        .route("/metrics", get(metrics))
        .with_state(shared);
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(error = %e, "sidecar HTTP server failed");
    }
}

/// At most `limits.max_concurrent_requests` requests (and so request bodies) at once; beyond
/// that, 503 with `Retry-After` at once rather than a queue.
async fn limit_requests(
    State(shared): Shared_,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Ok(_permit) = shared.requests.clone().try_acquire_owned() else {
        shared.metrics.too_busy.fetch_add(1, Ordering::Relaxed);
        return unavailable(
            &shared,
            "ERR_TOO_MANY_REQUESTS",
            format!(
                "more than {} requests at once (limits.max_concurrent_requests)",
                shared.config.limits.max_concurrent_requests
            ),
        )
        .into_response();
    };
    next.run(request).await
}

/// Checks the pubsub name and finds the topic's shape, or the answer refusing it.
async fn topic_of(shared: &Shared, pubsub: &str, topic: &str) -> Result<TopicShape, Refusal> {
    if !shared.config.pubsubs.iter().any(|p| p == pubsub) {
        return Err(error(
            StatusCode::NOT_FOUND,
            "ERR_PUBSUB_NOT_FOUND",
            format!(
                "pubsub {pubsub} is not configured (this sidecar answers for {})",
                shared.config.pubsubs.join(", ")
            ),
        ));
    }
    match shared.shape(topic).await {
        Ok(n) => Ok(n),
        Err(e @ TopicLookup::Unknown(_)) => Err(error(
            StatusCode::NOT_FOUND,
            "ERR_TOPIC_NOT_FOUND",
            e.to_string(),
        )),
        Err(e @ TopicLookup::Unreachable { .. }) => Err(unavailable(
            shared,
            "ERR_PUBSUB_PUBLISH_MESSAGE",
            e.to_string(),
        )),
    }
}

/// The stored event of a prepared publish.
fn event_of(
    shared: &Shared,
    topic: &str,
    prepared: Prepared,
    content_type: Option<&str>,
) -> Result<Event, Refusal> {
    let subject = Subject::new(topic).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "ERR_MALFORMED_REQUEST",
            format!("topic {topic} is not usable as a subject: {e}"),
        )
    })?;
    let text = |map: &serde_json::Map<String, Value>, key: &str| {
        map.get(key).and_then(Value::as_str).map(str::to_string)
    };
    let mut event = match &prepared.event {
        Some(ce) => {
            let mut event = Event::new(
                text(ce, "id").unwrap_or_default(),
                text(ce, "source").unwrap_or_default(),
                text(ce, "type").unwrap_or_default(),
                subject,
                prepared.payload.clone(),
            );
            event.time = text(ce, "time");
            event.datacontenttype = Some(STRUCTURED.into());
            event
        }
        None => {
            let mut event = Event::new(
                crate::new_event_id(),
                shared.config.app_id.clone(),
                WRAPPED_TYPE,
                subject,
                prepared.payload.clone(),
            );
            event.time = Some(crate::cloudevent::rfc3339(crate::now_ms()));
            event.datacontenttype = Some(content_type.unwrap_or("application/octet-stream").into());
            event
        }
    };
    event.class = EventClass::Integration;
    event.tenant = shared.config.tenant.clone();
    event.key = prepared
        .partition_key
        .map(|k| Bytes::copy_from_slice(k.as_bytes()));
    let size = event.size();
    if size > shared.limits.max_event {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "ERR_PUBSUB_EVENT_TOO_LARGE",
            format!(
                "event {} is {size} bytes; the limit is {}",
                event.id, shared.limits.max_event
            ),
        ));
    }
    event.validate(&shared.limits).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "ERR_MALFORMED_REQUEST",
            e.to_string(),
        )
    })?;
    Ok(event)
}

fn outbox_refusal(shared: &Shared, e: OutboxError) -> Refusal {
    match e {
        OutboxError::Full { .. } => {
            shared.metrics.outbox_full.fetch_add(1, Ordering::Relaxed);
            unavailable(shared, "ERR_PUBSUB_OUTBOX_FULL", e.to_string())
        }
        OutboxError::Invalid(reason) => {
            error(StatusCode::BAD_REQUEST, "ERR_MALFORMED_REQUEST", reason)
        }
        other => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ERR_PUBSUB_PUBLISH_MESSAGE",
            other.to_string(),
        ),
    }
}

fn metadata_of(query: &[(String, String)]) -> BTreeMap<String, String> {
    query
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("metadata.")?.to_string(), v.clone())))
        .collect()
}

async fn publish(
    State(shared): Shared_,
    Path((pubsub, topic)): Path<(String, String)>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, Refusal> {
    let accepted = publish_one(&shared, &pubsub, &topic, &query, &headers, &body).await;
    match &accepted {
        Ok(_) => shared.metrics.published.fetch_add(1, Ordering::Relaxed),
        Err(_) => shared
            .metrics
            .publish_refused
            .fetch_add(1, Ordering::Relaxed),
    };
    accepted
}

async fn publish_one(
    shared: &Shared,
    pubsub: &str,
    topic: &str,
    query: &[(String, String)],
    headers: &HeaderMap,
    body: &[u8],
) -> Result<StatusCode, Refusal> {
    let shape = topic_of(shared, pubsub, topic).await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let ce_headers = headers
        .iter()
        .filter_map(|(name, value)| {
            let attribute = name.as_str().strip_prefix("ce-")?;
            Some((attribute.to_string(), value.to_str().ok()?.to_string()))
        })
        .collect();
    let request = PublishRequest {
        pubsub,
        topic,
        content_type,
        ce_headers,
        metadata: metadata_of(query),
        body,
    };
    let prepared = prepare(
        &request,
        &shared.config.app_id,
        crate::now_ms(),
        crate::new_event_id,
    )
    .map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "ERR_MALFORMED_REQUEST",
            e.to_string(),
        )
    })?;
    let event = event_of(shared, topic, prepared, content_type)?;
    shared
        .outbox
        .accept(vec![Pending {
            topic: topic.to_string(),
            shape,
            event,
        }])
        .await
        .map_err(|e| outbox_refusal(shared, e))?;
    Ok(StatusCode::NO_CONTENT)
}

/// One entry of a bulk publish.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct BulkEntry {
    entry_id: String,
    event: Value,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

async fn bulk_publish(
    State(shared): Shared_,
    Path((pubsub, topic)): Path<(String, String)>,
    Query(query): Query<Vec<(String, String)>>,
    body: Bytes,
) -> Response {
    let shape = match topic_of(&shared, &pubsub, &topic).await {
        Ok(n) => n,
        Err(r) => return r.into_response(),
    };
    let entries: Vec<BulkEntry> = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "ERR_MALFORMED_REQUEST",
                format!(
                "the body must be a JSON array of {{entryId, event, contentType, metadata}}: {e}"
            ),
            )
            .into_response()
        }
    };
    if entries.len() > shared.config.limits.max_entries {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "ERR_MALFORMED_REQUEST",
            format!(
                "{} entries; at most {} per bulk publish",
                entries.len(),
                shared.config.limits.max_entries
            ),
        )
        .into_response();
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = entries.iter().find(|e| !seen.insert(e.entry_id.as_str())) {
        return error(
            StatusCode::BAD_REQUEST,
            "ERR_MALFORMED_REQUEST",
            format!("entryId {:?} appears twice", dup.entry_id),
        )
        .into_response();
    }
    let request_metadata = metadata_of(&query);
    let mut failed = Vec::new();
    let mut accepted = Vec::new();
    for entry in entries {
        let content_type = entry
            .content_type
            .clone()
            .unwrap_or_else(|| match &entry.event {
                Value::String(_) => "text/plain".into(),
                _ => "application/json".into(),
            });
        let bytes = match &entry.event {
            Value::String(s) if !crate::cloudevent::is_json(&content_type) => {
                s.clone().into_bytes()
            }
            other => other.to_string().into_bytes(),
        };
        let mut metadata = request_metadata.clone();
        metadata.extend(entry.metadata.clone());
        let request = PublishRequest {
            pubsub: &pubsub,
            topic: &topic,
            content_type: Some(&content_type),
            ce_headers: BTreeMap::new(),
            metadata,
            body: &bytes,
        };
        let prepared = prepare(
            &request,
            &shared.config.app_id,
            crate::now_ms(),
            crate::new_event_id,
        );
        let event = match prepared {
            Ok(p) => event_of(&shared, &topic, p, Some(&content_type))
                .map_err(|_| "the event is too large or invalid".to_string()),
            Err(e) => Err(e.to_string()),
        };
        match event {
            Ok(event) => accepted.push((
                entry.entry_id,
                Pending {
                    topic: topic.clone(),
                    shape,
                    event,
                },
            )),
            Err(reason) => failed.push(json!({"entryId": entry.entry_id, "error": reason})),
        }
    }
    let (ids, group): (Vec<String>, Vec<Pending>) = accepted.into_iter().unzip();
    let count = group.len() as u64;
    if let Err(e) = shared.outbox.accept(group).await {
        if matches!(e, OutboxError::Full { .. }) && failed.is_empty() {
            return outbox_refusal(&shared, e).into_response();
        }
        failed.extend(
            ids.iter()
                .map(|id| json!({"entryId": id, "error": e.to_string()})),
        );
    } else {
        shared.metrics.published.fetch_add(count, Ordering::Relaxed);
    }
    if failed.is_empty() {
        StatusCode::NO_CONTENT.into_response()
    } else {
        shared
            .metrics
            .publish_refused
            .fetch_add(failed.len() as u64, Ordering::Relaxed);
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"failedEntries": failed, "errorCode": "ERR_PUBSUB_PUBLISH_MESSAGE"})),
        )
            .into_response()
    }
}

fn stream_refusal(e: StreamError) -> Refusal {
    error(
        StatusCode::BAD_REQUEST,
        "ERR_MALFORMED_REQUEST",
        e.to_string(),
    )
}

fn region_refusal(shared: &Shared, e: ClientError) -> Refusal {
    match e {
        ClientError::Api(api) if api.code == ErrorCode::VersionConflict => {
            shared
                .metrics
                .stream_conflicts
                .fetch_add(1, Ordering::Relaxed);
            error(StatusCode::CONFLICT, "ERR_VERSION_CONFLICT", api.message)
        }
        ClientError::Api(api) if api.code == ErrorCode::UnknownTopic => {
            error(StatusCode::NOT_FOUND, "ERR_STREAM_NOT_FOUND", api.message)
        }
        ClientError::Api(api)
            if matches!(
                api.code,
                ErrorCode::InvalidRequest | ErrorCode::EventTooLarge
            ) =>
        {
            error(
                StatusCode::BAD_REQUEST,
                "ERR_MALFORMED_REQUEST",
                api.message,
            )
        }
        other => unavailable(shared, "ERR_REGION_UNAVAILABLE", other.to_string()),
    }
}

/// A category's topic shape, creating the topic when `create`.
async fn category_shape(
    shared: &Shared,
    topic: &str,
    create: bool,
) -> Result<TopicShape, ClientError> {
    if let Ok(shape) = shared.shape(topic).await {
        return Ok(shape);
    }
    if !create {
        return Err(ClientError::Api(ferry_proto::wire::ApiError::new(
            ErrorCode::UnknownTopic,
            format!("topic {topic} does not exist"),
        )));
    }
    let store = &shared.config.event_store;
    let mut config = TopicConfig::new(topic.to_string(), store.partitions);
    config.replication = store.replication;
    config.class = EventClass::Domain;
    let description = shared
        .client
        .ensure_topic(&config, std::time::Duration::from_secs(30))
        .await?;
    let shape = TopicShape::of(&description);
    shared.learn(topic, shape);
    Ok(shape)
}

async fn append(State(shared): Shared_, Path(stream): Path<String>, body: Bytes) -> Response {
    let (topic, _) = match streams::locate(&shared.config.event_store, &stream) {
        Ok(t) => t,
        Err(e) => return stream_refusal(e).into_response(),
    };
    let (expected, events) = match streams::events_of(
        &body,
        &stream,
        &shared.config.app_id,
        shared.config.tenant.as_deref(),
        crate::now_ms(),
        shared.config.limits.max_entries,
    ) {
        Ok(x) => x,
        Err(e) => return stream_refusal(e).into_response(),
    };
    let partition = match category_shape(&shared, &topic, true).await {
        Ok(shape) => shape.stream_partition(&stream),
        Err(e) => return region_refusal(&shared, e).into_response(),
    };
    // One append in flight per partition from this sidecar, numbered with the partition's
    // producer sequence: a resend after a lost answer is then recognised by the partition
    // (answered with the original append) instead of appended twice or refused as a conflict.
    let lane = shared.stream_lane(&topic, partition);
    let mut lane = lane.lock().await;
    let count = events.len() as u64;
    let batch = match EventBatch::new(&events, Some(lane.producer), lane.next_seq, &shared.limits) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "ERR_MALFORMED_REQUEST",
                e.to_string(),
            )
            .into_response()
        }
    };
    let mut answer = shared
        .client
        .append_to_stream(&topic, partition, &stream, expected, batch.clone())
        .await;
    // A partition that forgot this producer (idle past the nodes' `producer_expiry_ms`)
    // refused the append without changing anything: it is made again from sequence 0.
    if lane.next_seq != 0
        && matches!(&answer, Err(e) if e.code() == Some(ErrorCode::UnknownProducer))
    {
        lane.next_seq = 0;
        let batch = EventBatch {
            first_seq: 0,
            ..batch
        };
        answer = shared
            .client
            .append_to_stream(&topic, partition, &stream, expected, batch)
            .await;
    }
    match answer {
        Ok(done) => {
            lane.next_seq += count;
            shared
                .metrics
                .stream_appends
                .fetch_add(1, Ordering::Relaxed);
            (
                StatusCode::CREATED,
                Json(json!({
                    "stream": stream,
                    "firstVersion": done.first_version,
                    "version": done.version,
                    "topic": topic,
                    "partition": partition,
                    "offset": done.base_offset,
                })),
            )
                .into_response()
        }
        Err(e) => {
            // Refusals the partition decided leave the sequence unused; after anything else
            // the outcome is unknown, and the partition continues under a new producer.
            let decided = matches!(
                e.code(),
                Some(
                    ErrorCode::VersionConflict
                        | ErrorCode::InvalidRequest
                        | ErrorCode::EventTooLarge
                        | ErrorCode::UnknownTopic
                        | ErrorCode::UnknownPartition
                )
            );
            if !decided {
                *lane = crate::StreamLane::fresh();
            }
            region_refusal(&shared, e).into_response()
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct StreamQuery {
    #[serde(default)]
    from_version: Option<u64>,
    #[serde(default)]
    limit: Option<u32>,
}

async fn read_stream(
    State(shared): Shared_,
    Path(stream): Path<String>,
    Query(query): Query<StreamQuery>,
) -> Response {
    let (topic, _) = match streams::locate(&shared.config.event_store, &stream) {
        Ok(t) => t,
        Err(e) => return stream_refusal(e).into_response(),
    };
    let partition = match category_shape(&shared, &topic, false).await {
        Ok(shape) => shape.stream_partition(&stream),
        Err(e) => return region_refusal(&shared, e).into_response(),
    };
    let from = query.from_version.unwrap_or(1).max(1);
    let limit = query.limit.unwrap_or(1000).clamp(1, 10_000);
    match shared
        .client
        .read_stream(&topic, partition, &stream, from, limit)
        .await
    {
        Ok((0, _)) => error(
            StatusCode::NOT_FOUND,
            "ERR_STREAM_NOT_FOUND",
            format!("stream {stream} has no events"),
        )
        .into_response(),
        Ok((version, events)) => {
            let events: Vec<Value> = events
                .iter()
                .map(|e| {
                    let mut v = streams::event_json(&e.event);
                    v["version"] = json!(e.version);
                    v["offset"] = json!(e.offset);
                    v
                })
                .collect();
            Json(json!({"stream": stream, "version": version, "events": events})).into_response()
        }
        Err(e) => region_refusal(&shared, e).into_response(),
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct CategoryQuery {
    #[serde(default)]
    partition: u32,
    #[serde(default)]
    from_offset: u64,
    #[serde(default)]
    max_bytes: Option<u32>,
}

async fn read_category(
    State(shared): Shared_,
    Path(category): Path<String>,
    Query(query): Query<CategoryQuery>,
) -> Response {
    let Some(topic) = streams::category_topic(&shared.config.event_store, &category) else {
        return stream_refusal(StreamError::BadName(category)).into_response();
    };
    let partitions = match category_shape(&shared, &topic, false).await {
        Ok(shape) => shape.partitions,
        Err(e) => return region_refusal(&shared, e).into_response(),
    };
    if query.partition >= partitions {
        return error(
            StatusCode::BAD_REQUEST,
            "ERR_MALFORMED_REQUEST",
            format!(
                "partition {} does not exist; {topic} has {partitions}",
                query.partition
            ),
        )
        .into_response();
    }
    let max_bytes = query.max_bytes.unwrap_or(1 << 20).clamp(1024, 4 << 20);
    match shared
        .client
        .fetch(&topic, query.partition, query.from_offset, max_bytes)
        .await
    {
        Ok((events, high_watermark)) => {
            let next = events
                .last()
                .map_or(query.from_offset, |(offset, _)| offset + 1);
            let events: Vec<Value> = events
                .iter()
                .map(|(offset, e)| {
                    let mut v = streams::event_json(e);
                    v["offset"] = json!(offset);
                    v
                })
                .collect();
            Json(json!({
                "category": category,
                "topic": topic,
                "partition": query.partition,
                "partitions": partitions,
                "events": events,
                "nextOffset": next,
                "highWatermark": high_watermark,
            }))
            .into_response()
        }
        Err(e) => region_refusal(&shared, e).into_response(),
    }
}

async fn healthz(State(shared): Shared_) -> Response {
    // Serving HTTP means the outbox opened; it stays healthy while its writes succeed.
    if shared.outbox.counts().failed.load(Ordering::Relaxed) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ERR_HEALTH_NOT_READY",
            "an outbox write failed; the sidecar accepts no publishes until it is restarted",
        )
        .into_response();
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn healthz_outbound(State(shared): Shared_) -> Response {
    let failing = shared.link.failing();
    if failing.is_empty() {
        StatusCode::NO_CONTENT.into_response()
    } else {
        let reasons: Vec<String> = failing.iter().map(|(l, e)| format!("{l}: {e}")).collect();
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ERR_REGION_UNAVAILABLE",
            reasons.join("; "),
        )
        .into_response()
    }
}

async fn metadata(State(shared): Shared_) -> Json<Value> {
    let subscriptions: Vec<Value> = shared
        .subscriptions
        .lock()
        .expect("subscriptions")
        .iter()
        .map(|s| {
            let sub = &s.subscription;
            let mut rules: Vec<Value> = sub
                .rules
                .iter()
                .map(|(rule, path)| json!({"match": rule.text(), "path": path}))
                .collect();
            if let Some(default) = &sub.default_path {
                rules.push(json!({"match": "", "path": default}));
            }
            json!({
                "pubsubname": sub.pubsub,
                "topic": sub.topic,
                "rules": {"rules": rules},
                "deadLetterTopic": sub.dead_letter_topic.clone().unwrap_or_default(),
                "type": sub.origin,
                "bulkSubscribe": sub.bulk.map(|b| json!({
                    "enabled": true,
                    "maxMessagesCount": b.max_messages,
                    "maxAwaitDurationMs": b.max_await_ms,
                })),
                "status": s.status,
            })
        })
        .collect();
    let counts = shared.outbox.counts();
    let failing: BTreeMap<String, String> = shared
        .link
        .failing()
        .into_iter()
        .map(|(l, e)| (l.to_string(), e))
        .collect();
    let components: Vec<Value> = shared
        .config
        .pubsubs
        .iter()
        .map(|name| json!({"name": name, "type": "pubsub.ferry", "version": "v1"}))
        .collect();
    Json(json!({
        "id": shared.config.app_id,
        "runtimeVersion": concat!("ferry-", env!("CARGO_PKG_VERSION")),
        "components": components,
        "subscriptions": subscriptions,
        "appConnectionProperties": {"port": shared.config.app_port, "channelAddress": shared.config.app_host},
        "extended": {"instance": shared.instance, "discovery": *shared.discovery.lock().expect("discovery")},
        "outbox": {
            "depthEvents": counts.events.load(Ordering::Relaxed),
            "depthBytes": counts.bytes.load(Ordering::Relaxed),
            "maxEvents": shared.config.outbox.max_events,
            "maxBytes": shared.config.outbox.max_bytes,
        },
        "region": {
            "servers": shared.config.servers,
            "link": if failing.is_empty() { "up" } else { "failing" },
            "lastAcknowledgedMs": shared.link.last_ok_ms(),
            "failingLanes": failing,
        },
    }))
}

async fn metrics(State(shared): Shared_) -> Response {
    let m = &shared.metrics;
    let c = shared.outbox.counts();
    let samples: [(&str, &str, u64); 20] = [
        (
            "ferry_sidecar_refused_busy_total",
            "counter",
            m.too_busy.load(Ordering::Relaxed),
        ),
        (
            "ferry_sidecar_published_total",
            "counter",
            m.published.load(Ordering::Relaxed),
        ),
        (
            "ferry_sidecar_publish_refused_total",
            "counter",
            m.publish_refused.load(Ordering::Relaxed),
        ),
        (
            "ferry_sidecar_outbox_full_total",
            "counter",
            m.outbox_full.load(Ordering::Relaxed),
        ),
        (
            "ferry_sidecar_outbox_events",
            "gauge",
            c.events.load(Ordering::Relaxed),
        ),
        (
            "ferry_sidecar_outbox_bytes",
            "gauge",
            c.bytes.load(Ordering::Relaxed),
        ),
        (
            "ferry_sidecar_outbox_accepted_total",
            "counter",
            c.accepted.load(Ordering::Relaxed),
        ),
        (
            "ferry_sidecar_outbox_sent_total",
            "counter",
            c.sent.load(Ordering::Relaxed),
        ),
        (
            "ferry_sidecar_outbox_syncs_total",
            "counter",
            c.syncs.load(Ordering::Relaxed),
        ),
        (
            "ferry_sidecar_region_failing_lanes",
            "gauge",
            shared.link.failing().len() as u64,
        ),
        (
            "ferry_sidecar_delivered_total",
            "counter",
            m.delivered.load(Ordering::Relaxed),
        ),
        (
            "ferry_sidecar_retried_total",
            "counter",
            m.retried.load(Ordering::Relaxed),
        ),
        (
            "ferry_sidecar_dropped_total",
            "counter",
            m.dropped.load(Ordering::Relaxed),
        ),
        (
            "ferry_sidecar_dead_lettered_total",
            "counter",
            m.dead_lettered.load(Ordering::Relaxed),
        ),
        (
            "ferry_sidecar_expired_total",
            "counter",
            m.expired.load(Ordering::Relaxed),
        ),
        (
            "ferry_sidecar_unrouted_total",
            "counter",
            m.unrouted.load(Ordering::Relaxed),
        ),
        (
            "ferry_sidecar_commit_failures_total",
            "counter",
            m.commit_failures.load(Ordering::Relaxed),
        ),
        (
            "ferry_sidecar_stream_appends_total",
            "counter",
            m.stream_appends.load(Ordering::Relaxed),
        ),
        (
            "ferry_sidecar_stream_conflicts_total",
            "counter",
            m.stream_conflicts.load(Ordering::Relaxed),
        ),
        (
            "ferry_sidecar_discovery_attempts_total",
            "counter",
            m.discovery_attempts.load(Ordering::Relaxed),
        ),
    ];
    let mut text = String::new();
    for (name, kind, value) in samples {
        let _ = writeln!(text, "# TYPE {name} {kind}\n{name} {value}");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
