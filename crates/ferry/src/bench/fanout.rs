//! `ferry bench fanout`: N WebSocket clients on one edge, from this process. Each client
//! subscribes to its own `user.<id>` channel and one shared channel. Phases, each bounded in
//! time: connect everyone (RSS per idle connection from the edge's `/proc` when `--edge-pid`
//! is given), a broadcast of `--broadcasts` notifications to everyone (deliveries/s), one
//! notification per user (deliveries/s), and notifications to random users at `--rate` for
//! `--seconds` (publish-to-delivery latency). Clients bind to several 127.0.0.x source
//! addresses to pass the ephemeral port range, and the open-file limit is raised.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use ferry_client::ProducerOptions;
use ferry_proto::{Event, Subject};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use super::Latency;
use crate::ctl::Connect;

#[derive(Args)]
pub(crate) struct FanoutArgs {
    #[command(flatten)]
    connect: Connect,
    /// The edge's HTTP address.
    #[arg(long, default_value = "127.0.0.1:9401")]
    edge: SocketAddr,
    /// The edge's `auth.secret` (to sign the clients' tokens).
    #[arg(long, env = "FERRY_AUTH_SECRET", hide_env_values = true)]
    secret: String,
    /// The edge process, for its RSS per idle connection.
    #[arg(long)]
    edge_pid: Option<u32>,
    /// WebSocket clients to open.
    #[arg(long, default_value_t = 10_000)]
    connections: u64,
    /// Source addresses 127.0.0.1 .. 127.0.0.N the clients spread over.
    #[arg(long, default_value_t = 4)]
    sources: u8,
    /// Connections opened at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// The shared channel every client subscribes to (must be served by the edge).
    #[arg(long, default_value = "news.bench")]
    broadcast_channel: String,
    /// Notifications in the broadcast phase.
    #[arg(long, default_value_t = 10)]
    broadcasts: u64,
    /// Notifications per second in the latency phase.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Length of the latency phase, seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The edge's notification topic.
    #[arg(long, default_value = "notifications")]
    topic: String,
    /// Give up on a phase this long after its last publish, seconds.
    #[arg(long, default_value_t = 60)]
    drain_secs: u64,
    /// Write the report as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Serialize)]
struct FanoutReport {
    edge: String,
    connections: u64,
    connections_held: u64,
    connect_seconds: f64,
    edge_rss_before_kib: Option<u64>,
    edge_rss_connected_kib: Option<u64>,
    edge_rss_per_idle_connection_kib: Option<f64>,
    broadcast_deliveries: u64,
    broadcast_deliveries_per_sec: f64,
    per_user_deliveries: u64,
    per_user_deliveries_per_sec: f64,
    rate: u64,
    rate_published: u64,
    rate_delivered: u64,
    publish_to_delivery_ms: Latency,
}

/// What the clients have received, in total, and the latency of what carried a send time
/// (one histogram for all: a histogram per client would cost 160 KiB each).
struct Received {
    messages: AtomicU64,
    latency: std::sync::Mutex<Histogram<u64>>,
}

fn token(secret: &str, user: &str, shared: &str) -> anyhow::Result<String> {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 3600;
    Ok(ferry_edge::sign(
        secret.as_bytes(),
        &ferry_edge::Claims {
            sub: user.into(),
            tenant: "bench".into(),
            channels: vec![shared.into()],
            exp,
            locale: None,
            attrs: serde_json::Value::Null,
        },
    )?)
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The send time a latency-phase notification carries (`{"t":MICROS}`), found without parsing
/// the whole frame.
fn sent_micros(frame: &str) -> Option<u64> {
    let start = frame.find("\"t\":")? + 4;
    let digits: String = frame[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// One client: where it connects from and to, as whom, and what it subscribes to.
struct Plan {
    edge: SocketAddr,
    source: IpAddr,
    token: String,
    channels: [String; 2],
}

/// Opens one client, subscribes it, and counts what it receives until `stop`.
async fn client(
    plan: Plan,
    received: Arc<Received>,
    mut stop: watch::Receiver<bool>,
    mut connecting: Option<(tokio::sync::OwnedSemaphorePermit, mpsc::UnboundedSender<()>)>,
) -> anyhow::Result<()> {
    let Plan {
        edge,
        source,
        token,
        channels,
    } = plan;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(edge).await?;
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = 4096;
    config.write_buffer_size = 0;
    let url = format!("ws://{edge}/ws?token={token}");
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .context("WebSocket handshake")?;
    for channel in &channels {
        let frame = serde_json::json!({"type": "subscribe", "channel": channel});
        ws.send(Message::Text(frame.to_string().into())).await?;
    }
    let mut subscribed = 0;
    loop {
        let message = tokio::select! {
            message = ws.next() => message,
            _ = stop.wait_for(|s| *s) => break,
        };
        let Some(message) = message else { break };
        let Message::Text(text) = message? else {
            continue;
        };
        // One JSON frame per line; several when the edge had several ready.
        for line in text.split('\n') {
            if line.starts_with("{\"type\":\"message\"") {
                received.messages.fetch_add(1, Ordering::Relaxed);
                if let Some(sent) = sent_micros(line) {
                    let micros = unix_micros().saturating_sub(sent);
                    received
                        .latency
                        .lock()
                        .expect("latency lock")
                        .saturating_record(micros);
                }
            } else if line.contains("\"subscribed\"") {
                subscribed += 1;
                if subscribed == channels.len() {
                    // Subscribed: free the connect slot and count this client as held.
                    if let Some((_permit, ready)) = connecting.take() {
                        let _ = ready.send(());
                    }
                }
            } else if line.contains("\"error\"") {
                bail!("the edge refused a subscription: {line}");
            }
        }
    }
    Ok(())
}

/// Waits until the clients have received `total` messages, at most `within`.
async fn wait_received(received: &Received, total: u64, within: Duration) -> (u64, Instant) {
    let deadline = Instant::now() + within;
    loop {
        let now = received.messages.load(Ordering::Relaxed);
        if now >= total || Instant::now() >= deadline {
            return (now, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub(crate) async fn run(args: FanoutArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(args.sources > 0, "--sources must be at least 1");
    anyhow::ensure!(args.rate > 0, "--rate must be at least 1");
    Subject::new(args.broadcast_channel.clone())
        .map_err(|e| anyhow::anyhow!("--broadcast-channel: {e}"))?;
    let files = crate::raise_open_file_limit();
    anyhow::ensure!(
        files > args.connections + 64,
        "{} connections need more open files than this process may have ({files}; raise the hard limit, e.g. ulimit -Hn)",
        args.connections
    );
    let region = args.connect.client()?;
    let producer = region
        .producer(&args.topic, ProducerOptions::default())
        .await
        .with_context(|| format!("topic {} (start the edge first: it creates it)", args.topic))?;
    let rss = |pid: Option<u32>| -> anyhow::Result<Option<u64>> {
        pid.map(|p| super::resources::status_kib(p, "VmRSS:"))
            .transpose()
            .context("--edge-pid")
    };
    let rss_before = rss(args.edge_pid)?;

    // Phase 1: connect.
    let received = Arc::new(Received {
        messages: AtomicU64::new(0),
        latency: std::sync::Mutex::new(super::latency_histogram()),
    });
    let (stop_tx, stop) = watch::channel(false);
    let started = Instant::now();
    let mut clients = Vec::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(args.connect_concurrency.max(1)));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
    let (failed_tx, mut failed_rx) = mpsc::unbounded_channel::<String>();
    for i in 0..args.connections {
        let source = IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            1 + (i % args.sources as u64) as u8,
        ));
        let token = token(&args.secret, &format!("b{i}"), &args.broadcast_channel)?;
        let channels = [format!("user.b{i}"), args.broadcast_channel.clone()];
        let (received, stop) = (received.clone(), stop.clone());
        let (gate, ready_tx, failed_tx, edge) =
            (gate.clone(), ready_tx.clone(), failed_tx.clone(), args.edge);
        clients.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.expect("semaphore open");
            let connecting = Some((permit, ready_tx));
            let plan = Plan {
                edge,
                source,
                token,
                channels,
            };
            let run = client(plan, received, stop, connecting);
            if let Err(e) = run.await {
                let _ = failed_tx.send(format!("{e:#}"));
            }
        }));
    }
    drop((ready_tx, failed_tx));
    let mut held = 0;
    let connect_deadline =
        Instant::now() + Duration::from_secs(args.drain_secs + args.connections / 500);
    while held < args.connections {
        tokio::select! {
            ready = ready_rx.recv() => match ready {
                Some(()) => held += 1,
                None => bail!("only {held} of {} clients subscribed", args.connections),
            },
            Some(e) = failed_rx.recv() => bail!("a client failed after {held} subscribed: {e}"),
            _ = tokio::time::sleep_until(connect_deadline.into()) => {
                bail!("only {held} of {} clients subscribed in time", args.connections)
            }
        }
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_connected = rss(args.edge_pid)?;
    let per_connection = match (rss_before, rss_connected) {
        (Some(before), Some(after)) => {
            Some(after.saturating_sub(before) as f64 / args.connections as f64)
        }
        _ => None,
    };
    let drain = Duration::from_secs(args.drain_secs);

    // Phase 2: broadcast.
    let publish = |channel: String, data: String| {
        let event = Event::new(
            format!("bench-{}", rand::random::<u64>()),
            "bench",
            "bench.fanout",
            Subject::new(channel.clone()).expect("valid channel"),
            data,
        )
        .with_key(channel);
        producer.publish(event)
    };
    let before = received.messages.load(Ordering::Relaxed);
    let start = Instant::now();
    for n in 0..args.broadcasts {
        publish(args.broadcast_channel.clone(), format!("{{\"n\":{n}}}")).await?;
    }
    let want = before + args.broadcasts * args.connections;
    let (got, done) = wait_received(&received, want, drain).await;
    let broadcast_deliveries = got - before;
    let broadcast_rate = broadcast_deliveries as f64 / (done - start).as_secs_f64();

    // Phase 3: one notification per user, as fast as the producer takes them.
    let before = received.messages.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..args.connections {
        pending.push(publish(format!("user.b{i}"), format!("{{\"u\":{i}}}")));
        if pending.len() >= 512 {
            pending.next().await.transpose()?;
        }
    }
    while pending.next().await.transpose()?.is_some() {}
    let (got, done) = wait_received(&received, before + args.connections, drain).await;
    let per_user_deliveries = got - before;
    let per_user_rate = per_user_deliveries as f64 / (done - start).as_secs_f64();

    // Phase 4: random users at a fixed rate; latency from the scheduled send.
    let before = received.messages.load(Ordering::Relaxed);
    let total = args.rate * args.seconds;
    let start = Instant::now();
    let mut pending = futures::stream::FuturesUnordered::new();
    for k in 0..total {
        let due = start + Duration::from_secs_f64(k as f64 / args.rate as f64);
        while Instant::now() < due {
            tokio::select! {
                _ = tokio::time::sleep_until(due.into()) => {}
                Some(result) = pending.next(), if !pending.is_empty() => { result?; }
            }
        }
        let scheduled = unix_micros().saturating_sub(due.elapsed().as_micros() as u64);
        let user = rand::random::<u64>() % args.connections;
        let send = publish(format!("user.b{user}"), format!("{{\"t\":{scheduled}}}"));
        pending.push(send);
    }
    while pending.next().await.transpose()?.is_some() {}
    let (got, _) = wait_received(&received, before + total, drain).await;
    let rate_delivered = got - before;
    let _ = stop_tx.send(true);
    for client in clients {
        let _ = client.await;
    }

    let report = FanoutReport {
        edge: args.edge.to_string(),
        connections: args.connections,
        connections_held: held,
        connect_seconds,
        edge_rss_before_kib: rss_before,
        edge_rss_connected_kib: rss_connected,
        edge_rss_per_idle_connection_kib: per_connection,
        broadcast_deliveries,
        broadcast_deliveries_per_sec: broadcast_rate,
        per_user_deliveries,
        per_user_deliveries_per_sec: per_user_rate,
        rate: args.rate,
        rate_published: total,
        rate_delivered,
        publish_to_delivery_ms: Latency::of(&received.latency.lock().expect("latency lock")),
    };
    println!(
        "fanout: {} connections held (connected in {:.1} s){}; broadcast {:.0} deliveries/s; per-user {:.0} deliveries/s; at {}/s: {} of {} delivered, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        report.connections_held,
        report.connect_seconds,
        per_connection.map_or(String::new(), |k| format!(", edge RSS {k:.1} KiB per idle connection")),
        report.broadcast_deliveries_per_sec,
        report.per_user_deliveries_per_sec,
        report.rate,
        report.rate_delivered,
        report.rate_published,
        report.publish_to_delivery_ms.p50,
        report.publish_to_delivery_ms.p99,
        report.publish_to_delivery_ms.max,
    );
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    if broadcast_deliveries < args.broadcasts * args.connections
        || per_user_deliveries < args.connections
        || rate_delivered < total
    {
        bail!("not every notification was delivered within --drain-secs (see the figures above)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_send_time_is_read_from_a_message_frame() {
        let frame = r#"{"type":"message","channel":"user.b0","id":"99bd02c8-9","event_id":"bench-1","event_type":"bench.fanout","data":{"t":1795909702213713}}"#;
        assert_eq!(sent_micros(frame), Some(1_795_909_702_213_713));
        assert_eq!(sent_micros(r#"{"type":"message","data":{"n":1}}"#), None);
    }
}
