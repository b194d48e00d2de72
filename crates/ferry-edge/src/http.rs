//! The edge's HTTP endpoint (axum): `/ws` (WebSocket, JSON frames), `/sse` (server-sent
//! events), `/webhooks`, `/demo` (a page showing notifications live over SSE), `/metrics`
//! and `/healthz`. Tokens come as `?token=` or `Authorization: Bearer`;
//! a missing or bad token is answered 401 before anything is subscribed.
//!
//! WebSocket: each text message carries one JSON frame, or several separated by `\n` when
//! several were ready at once. Frames, client to edge: `{"type":"subscribe","channel":C,"since":ID?}`,
//! `{"type":"unsubscribe","channel":C}`, `{"type":"ack","channel":C,"id":ID}`. Edge to
//! client: `message` (channel, id, event_id, event_type, data), `subscribed` (position),
//! `gap` (requested, first_available), `lag` (missed, resume_from), `unsubscribed`, `error`
//! (channel, code, message).
//!
//! SSE: `/sse?channels=A,B&token=…`; each `message` event carries an `id:` that resumes every
//! channel of the stream (`<epoch>-<seq of A>.<seq of B>`, the same as a WebSocket id for one
//! channel), so the browser's automatic `Last-Event-ID` on reconnect (or `?lastEventId=`)
//! continues where the stream stopped. Control frames are events named by their type.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::{BufMut, BytesMut};
use futures::{SinkExt, Stream, StreamExt};
use tokio::sync::watch;

use crate::auth::User;
use crate::session::{ConnectionSlot, SessionDriver, Transport};
use crate::window::Position;
use crate::Shared;

/// Serves until `shutdown` turns true.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route("/ws", get(ws))
        .route("/sse", get(sse))
        .route("/webhooks", get(list_webhooks).post(register_webhook))
        .route("/webhooks/{id}", axum::routing::delete(remove_webhook))
        .route("/demo", get(demo))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(shared);
    // Notifications are small frames written one by one: without TCP_NODELAY, Nagle's
    // algorithm holds each behind the client's delayed ACK of the previous one.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY failed");
        }
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            stopped(&mut shutdown).await;
        })
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "edge HTTP endpoint failed");
    }
}

type Params = Query<HashMap<String, String>>;

/// Frames that are ready together share one WebSocket message up to about this size.
const BATCH_BYTES: usize = 32 * 1024;

/// Resolves once the edge is shutting down.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

fn refuse(status: StatusCode, message: String) -> Response {
    (status, format!("{message}\n")).into_response()
}

/// Verifies the request's token and takes a connection slot.
fn admit(
    shared: &Arc<Shared>,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
    transport: Transport,
) -> Result<(User, ConnectionSlot), (StatusCode, String)> {
    let user = api_user(shared, params, headers)?;
    let slot = take_slot(shared, transport).ok_or_else(|| connection_limit(shared))?;
    Ok((user, slot))
}

/// A connection slot, or None at `limits.max_connections` (counted as refused).
fn take_slot(shared: &Arc<Shared>, transport: Transport) -> Option<ConnectionSlot> {
    let slot = ConnectionSlot::take(shared, transport);
    if slot.is_none() {
        shared.metrics.refused_limit.fetch_add(1, Ordering::Relaxed);
    }
    slot
}

fn connection_limit(shared: &Arc<Shared>) -> (StatusCode, String) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "connection limit reached ({} open; limits.max_connections)\n",
            shared.config.limits.max_connections
        ),
    )
}

async fn ws(
    State(shared): State<Arc<Shared>>,
    Query(params): Params,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let (user, slot) = match admit(&shared, &params, &headers, Transport::WebSocket) {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.into_response(),
    };
    let limit = shared.config.limits.max_client_frame;
    // tungstenite reserves 128 KiB of read buffer per connection by default; notifications are
    // small and clients send little (subscribe, ack), so 1 KiB keeps an idle connection cheap.
    upgrade
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| run_ws(shared, user, slot, socket))
}

async fn run_ws(shared: Arc<Shared>, user: User, slot: ConnectionSlot, socket: WebSocket) {
    let mut shutdown = shared.shutdown.clone();
    let mut driver = SessionDriver::open(shared.clone(), user, Some(slot));
    let (mut sink, mut stream) = socket.split();
    loop {
        tokio::select! {
            out = driver.next() => {
                // Whatever else is ready goes in the same WebSocket message, one JSON frame per
                // line: one write for a burst instead of one per notification.
                // A frame alone is sent as it is (its bytes are shared, not copied).
                let mut messages = u64::from(out.position.is_some());
                let mut batch: Option<BytesMut> = None;
                while batch.as_ref().map_or(out.frame.len(), BytesMut::len) < BATCH_BYTES {
                    let Some(more) = driver.try_next() else { break };
                    let text = batch.get_or_insert_with(|| BytesMut::from(&out.frame[..]));
                    text.put_u8(b'\n');
                    text.extend_from_slice(&more.frame);
                    messages += u64::from(more.position.is_some());
                }
                let bytes = batch.map_or(out.frame, BytesMut::freeze);
                let text = match Utf8Bytes::try_from(bytes) {
                    Ok(text) => text,
                    Err(e) => {
                        // Frames are JSON made by the edge; this would be a bug.
                        tracing::error!(error = %e, "a WebSocket batch was not UTF-8; connection closed");
                        break;
                    }
                };
                // A client that does not read blocks this send; shutdown must not wait for it.
                tokio::select! {
                    sent = sink.send(Message::Text(text)) => if sent.is_err() { break },
                    _ = stopped(&mut shutdown) => break,
                }
                shared.metrics.delivered(Transport::WebSocket).fetch_add(messages, Ordering::Relaxed);
            }
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Text(text))) => driver.handle_client_frame(text.as_str()),
                Some(Ok(Message::Binary(_))) => {
                    driver.handle_client_frame("binary frame");
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            _ = stopped(&mut shutdown) => {
                let close = sink.send(Message::Close(None));
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), close).await;
                break;
            }
        }
    }
}

async fn sse(
    State(shared): State<Arc<Shared>>,
    Query(params): Params,
    headers: HeaderMap,
) -> Response {
    // The token first: without a valid one the answer is 401 whatever else is wrong.
    let user = match api_user(&shared, &params, &headers) {
        Ok(user) => user,
        Err(refusal) => return refusal.into_response(),
    };
    let channels: Vec<String> = params
        .get("channels")
        .map(|c| {
            c.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if channels.is_empty() {
        return refuse(
            StatusCode::BAD_REQUEST,
            "channels: give ?channels=A,B (at least one)".into(),
        );
    }
    if let Some(twice) = channels
        .iter()
        .enumerate()
        .find_map(|(i, c)| channels[..i].contains(c).then_some(c))
    {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("channels: {twice} is listed twice"),
        );
    }
    if channels.len() > shared.config.limits.max_subscriptions {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "channels: at most {} per connection (limits.max_subscriptions)",
                shared.config.limits.max_subscriptions
            ),
        );
    }
    // Refuse forbidden channels with 403 before the stream starts.
    for channel in &channels {
        if let Err(e) = user.may_read(channel) {
            shared
                .metrics
                .refused_forbidden
                .fetch_add(1, Ordering::Relaxed);
            return refuse(StatusCode::FORBIDDEN, e.to_string());
        }
    }
    let Some(slot) = take_slot(&shared, Transport::Sse) else {
        return connection_limit(&shared).into_response();
    };
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| params.get("lastEventId").cloned());
    let mut driver = SessionDriver::open(shared.clone(), user, Some(slot));
    let resume = last_event_id.map(|id| sse_positions(&driver, &id, channels.len()));
    for (i, channel) in channels.iter().enumerate() {
        let since = match &resume {
            None => None,
            Some(Some(seqs)) => Some(driver.id_of(seqs[i])),
            // An id this edge cannot read: each channel gets a gap frame.
            Some(None) => Some("unknown".to_string()),
        };
        driver.subscribe(channel, since.as_deref());
    }
    let stream = sse_stream(shared, driver, channels);
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Parses an SSE id (`<epoch>-<seq>.<seq>…`, one per channel) into sequences.
fn sse_positions(driver: &SessionDriver, id: &str, channels: usize) -> Option<Vec<u64>> {
    let (epoch, seqs) = id.rsplit_once('-')?;
    if epoch != driver.epoch() {
        return None;
    }
    let seqs: Vec<u64> = seqs
        .split('.')
        .map(|s| s.parse().ok())
        .collect::<Option<_>>()?;
    (seqs.len() == channels).then_some(seqs)
}

fn sse_stream(
    shared: Arc<Shared>,
    driver: SessionDriver,
    channels: Vec<String>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let shutdown = shared.shutdown.clone();
    let positions = vec![0u64; channels.len()];
    futures::stream::unfold(
        (shared, driver, channels, positions, shutdown),
        |(shared, mut driver, channels, mut positions, mut shutdown)| async move {
            let out = tokio::select! {
                out = driver.next() => out,
                _ = stopped(&mut shutdown) => return None,
            };
            let data = String::from_utf8_lossy(&out.frame).into_owned();
            let mut event = SseEvent::default().event(out.kind).data(data);
            if out.kind == "subscribed" {
                // The subscription's starting position is part of the stream's id.
                if let Some((channel, position)) = subscribed_position(&out.frame) {
                    if let Some(i) = channels.iter().position(|c| *c == channel) {
                        if let Position::Seq(seq) = driver.parse_id(&position) {
                            positions[i] = seq;
                        }
                    }
                }
            }
            if let Some((channel, seq)) = &out.position {
                if let Some(i) = channels.iter().position(|c| **c == **channel) {
                    positions[i] = *seq;
                }
                let mut id = format!("{}-", driver.epoch());
                for (i, seq) in positions.iter().enumerate() {
                    if i > 0 {
                        id.push('.');
                    }
                    let _ = write!(id, "{seq}");
                }
                event = event.id(id);
                shared
                    .metrics
                    .delivered(Transport::Sse)
                    .fetch_add(1, Ordering::Relaxed);
            }
            Some((Ok(event), (shared, driver, channels, positions, shutdown)))
        },
    )
}

fn subscribed_position(frame: &[u8]) -> Option<(String, String)> {
    let value: serde_json::Value = serde_json::from_slice(frame).ok()?;
    Some((
        value.get("channel")?.as_str()?.to_string(),
        value.get("position")?.as_str()?.to_string(),
    ))
}

/// Verifies the token of an API request (no connection slot).
fn api_user(
    shared: &Arc<Shared>,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<User, (StatusCode, String)> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let token = params.get("token").map(String::as_str).or(bearer);
    shared.auth.verify(token).map_err(|e| {
        shared.metrics.refused_auth.fetch_add(1, Ordering::Relaxed);
        (StatusCode::UNAUTHORIZED, format!("{e}\n"))
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookRequest {
    url: String,
    channels: Vec<String>,
}

fn public(registration: &crate::webhook::Registration) -> serde_json::Value {
    serde_json::json!({
        "id": registration.id,
        "url": registration.url,
        "channels": registration.channels,
    })
}

async fn register_webhook(
    State(shared): State<Arc<Shared>>,
    Query(params): Params,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let user = match api_user(&shared, &params, &headers) {
        Ok(user) => user,
        Err(refusal) => return refusal.into_response(),
    };
    let request: WebhookRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!(
                    "body: {e} (want {{\"url\": \"https://…\", \"channels\": [\"user.<you>\"]}})"
                ),
            )
        }
    };
    let url = match reqwest::Url::parse(&request.url) {
        Ok(url) if url.scheme() == "http" || url.scheme() == "https" => url,
        _ => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("url: {:?} is not an http:// or https:// URL", request.url),
            )
        }
    };
    if !shared.config.webhooks.allow_private_targets && crate::webhook::is_private_target(&url) {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "url: {} points at this machine or a private network \
                 (webhooks.allow_private_targets is off)",
                request.url
            ),
        );
    }
    if request.channels.is_empty() {
        return refuse(StatusCode::BAD_REQUEST, "channels: at least one".into());
    }
    if request.channels.len() > shared.config.limits.max_subscriptions {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "channels: at most {} (limits.max_subscriptions)",
                shared.config.limits.max_subscriptions
            ),
        );
    }
    for channel in &request.channels {
        if let Err(e) = user.may_read(channel) {
            shared
                .metrics
                .refused_forbidden
                .fetch_add(1, Ordering::Relaxed);
            return refuse(StatusCode::FORBIDDEN, e.to_string());
        }
        if !shared.serves(channel) {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("channels: {channel} is not served by this edge"),
            );
        }
    }
    let max = shared.config.webhooks.max_per_user;
    if shared.webhooks.of_user(user.id()).len() >= max {
        return refuse(
            StatusCode::CONFLICT,
            format!(
                "user {} has {max} webhooks already (webhooks.max_per_user)",
                user.id()
            ),
        );
    }
    match crate::webhook::Webhooks::register(&shared, &user, request.url, request.channels).await {
        Ok(registration) => {
            let mut answer = public(&registration);
            answer["secret"] = serde_json::json!(registration.secret);
            (StatusCode::CREATED, axum::Json(answer)).into_response()
        }
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn list_webhooks(
    State(shared): State<Arc<Shared>>,
    Query(params): Params,
    headers: HeaderMap,
) -> Response {
    match api_user(&shared, &params, &headers) {
        Ok(user) => {
            let list: Vec<_> = shared
                .webhooks
                .of_user(user.id())
                .iter()
                .map(public)
                .collect();
            axum::Json(list).into_response()
        }
        Err(refusal) => refusal.into_response(),
    }
}

async fn remove_webhook(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    Query(params): Params,
    headers: HeaderMap,
) -> Response {
    let user = match api_user(&shared, &params, &headers) {
        Ok(user) => user,
        Err(refusal) => return refusal.into_response(),
    };
    match crate::webhook::Webhooks::remove(&shared, user.id(), &id).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => refuse(StatusCode::NOT_FOUND, format!("no webhook {id} of yours")),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// A page that shows the notifications of `?channels=…` live, over SSE with `?token=…`.
async fn demo() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("assets/demo.html"),
    )
}

async fn healthz(State(shared): State<Arc<Shared>>) -> (StatusCode, &'static str) {
    if *shared.shutdown.borrow() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else if !shared.metrics.reading.load(Ordering::Acquire) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not reading the region (starting, or the window could not be written: see the log)\n",
        )
    } else {
        (StatusCode::OK, "ok\n")
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> String {
    let m = &shared.metrics;
    let mut out = String::new();
    let name = &shared.config.name;
    let mut line = |metric: &str, labels: &str, value: u64| {
        let sep = if labels.is_empty() { "" } else { "," };
        let _ = writeln!(out, "{metric}{{edge=\"{name}\"{sep}{labels}}} {value}");
    };
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    line(
        "ferry_edge_connections",
        "transport=\"ws\"",
        m.ws_connections.load(Ordering::Relaxed) as u64,
    );
    line(
        "ferry_edge_connections",
        "transport=\"sse\"",
        m.sse_connections.load(Ordering::Relaxed) as u64,
    );
    let (users, subscribers, queued, depth, stats) = {
        let hub = shared.hub();
        let mut shared_channels: Vec<(String, usize)> = Vec::new();
        let mut user_channels = 0;
        for (channel, count) in hub.subscribers() {
            if channel.starts_with("user.") {
                user_channels += count;
            } else {
                shared_channels.push((channel.to_string(), count));
            }
        }
        shared_channels.sort();
        let (sum, max) = hub.queue_depths();
        (
            hub.user_count(),
            (shared_channels, user_channels),
            sum,
            max,
            hub.stats(),
        )
    };
    line("ferry_edge_users", "", users as u64);
    // Per-user channels are summed (one series per user would be unbounded).
    line(
        "ferry_edge_subscriptions",
        "channel=\"user.*\"",
        subscribers.1 as u64,
    );
    for (channel, count) in &subscribers.0 {
        let escaped = channel.replace('\\', "\\\\").replace('"', "\\\"");
        line(
            "ferry_edge_subscriptions",
            &format!("channel=\"{escaped}\""),
            *count as u64,
        );
    }
    line("ferry_edge_queue_depth", "kind=\"total\"", queued as u64);
    line("ferry_edge_queue_depth", "kind=\"max\"", depth as u64);
    let throttled = *shared.throttled.lock().expect("throttle counts");
    let render = shared.renderer.stats();
    let samples: [(&str, &str, u64); 25] = [
        ("ferry_edge_notifications_total", "", load(&m.notifications)),
        ("ferry_edge_fanned_out_total", "", stats.queued),
        (
            "ferry_edge_deliveries_total",
            "transport=\"ws\"",
            load(&m.delivered_ws),
        ),
        (
            "ferry_edge_deliveries_total",
            "transport=\"sse\"",
            load(&m.delivered_sse),
        ),
        ("ferry_edge_replayed_total", "", load(&m.replayed)),
        ("ferry_edge_acks_total", "", load(&m.acks)),
        ("ferry_edge_lag_frames_total", "", load(&m.lags)),
        ("ferry_edge_gap_frames_total", "", load(&m.gaps)),
        // Turned away by a full send queue, then replayed from the window (not lost).
        ("ferry_edge_overflowed_total", "", stats.overflowed),
        (
            "ferry_edge_dropped_total",
            "cause=\"not_served\"",
            load(&m.not_served),
        ),
        (
            "ferry_edge_dropped_total",
            "cause=\"window_expired\"",
            load(&m.expired),
        ),
        (
            "ferry_edge_throttle_total",
            "outcome=\"published\"",
            throttled.published,
        ),
        (
            "ferry_edge_throttle_total",
            "outcome=\"delivered\"",
            throttled.delivered,
        ),
        (
            "ferry_edge_throttle_total",
            "outcome=\"coalesced\"",
            throttled.coalesced,
        ),
        (
            "ferry_edge_throttle_total",
            "outcome=\"dropped\"",
            throttled.dropped,
        ),
        (
            "ferry_edge_throttle_total",
            "outcome=\"digests\"",
            throttled.digests,
        ),
        ("ferry_edge_throttle_held", "", throttled.held),
        ("ferry_edge_template_renders_total", "", render.renders),
        (
            "ferry_edge_template_cache_hits_total",
            "",
            render.cache_hits,
        ),
        ("ferry_edge_template_errors_total", "", render.errors),
        (
            "ferry_edge_webhook_total",
            "outcome=\"delivered\"",
            load(&m.webhook_delivered),
        ),
        (
            "ferry_edge_webhook_total",
            "outcome=\"failed\"",
            load(&m.webhook_failed),
        ),
        (
            "ferry_edge_refused_total",
            "cause=\"auth\"",
            load(&m.refused_auth),
        ),
        (
            "ferry_edge_refused_total",
            "cause=\"forbidden\"",
            load(&m.refused_forbidden),
        ),
        (
            "ferry_edge_refused_total",
            "cause=\"connection_limit\"",
            load(&m.refused_limit),
        ),
    ];
    for (metric, labels, value) in samples {
        line(metric, labels, value);
    }
    out
}
