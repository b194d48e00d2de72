//! `ferry bench sidecar`: HTTP publishes through one running `ferry sidecar` (keep-alive,
//! concurrent connections) and, with `--app`, end to end to a subscribing app that this bench
//! plays itself (a second sidecar's `app_port`): publishes/s with the 2xx latency, then
//! publish-to-app latency at a fixed rate.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use ferry_proto::{EventClass, TopicConfig};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Value};

use super::{ensure_topic, latency_histogram, Latency};
use crate::ctl::Connect;

#[derive(Args)]
pub(crate) struct SidecarBenchArgs {
    #[command(flatten)]
    connect: Connect,
    /// The publishing sidecar's HTTP address.
    #[arg(long, default_value = "127.0.0.1:3500")]
    sidecar: SocketAddr,
    /// The pubsub name to publish to.
    #[arg(long, default_value = "pubsub")]
    pubsub: String,
    /// Topic of the throughput phase (the end-to-end phase uses TOPIC-e2e); created if
    /// missing.
    #[arg(long, default_value = "bench-sidecar")]
    topic: String,
    /// Partitions of the topics the bench creates.
    #[arg(long, default_value_t = 8)]
    partitions: u32,
    /// Bytes per event body (JSON, padded).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Publishes in the throughput phase.
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Concurrent keep-alive HTTP connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Serve as the subscribing app here (a second sidecar's app_port) and measure
    /// publish-to-app latency.
    #[arg(long)]
    app: Option<SocketAddr>,
    /// Publishes per second in the end-to-end phase.
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    /// Length of the end-to-end phase, seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Give up on deliveries this long after the last publish, seconds.
    #[arg(long, default_value_t = 60)]
    drain_secs: u64,
    /// Write the report as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Serialize)]
struct SidecarReport {
    sidecar: String,
    size: usize,
    connections: usize,
    count: u64,
    accepted: u64,
    refused: u64,
    seconds: f64,
    publishes_per_sec: f64,
    publish_latency_ms: Latency,
    e2e: Option<EndToEnd>,
}

#[derive(Serialize)]
struct EndToEnd {
    rate: u64,
    published: u64,
    delivered: u64,
    publish_to_app_ms: Latency,
}

fn micros_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A JSON body of about `size` bytes carrying its sequence and send time.
fn body(seq: u64, size: usize) -> String {
    let head = json!({"seq": seq, "sent_us": micros_now(), "pad": ""}).to_string();
    let pad = size.saturating_sub(head.len());
    json!({"seq": seq, "sent_us": micros_now(), "pad": "x".repeat(pad)}).to_string()
}

/// The subscribing app: what it received and when.
struct App {
    topic: String,
    pubsub: String,
    /// Warm-up events received (sequence `WARM_UP`).
    warm: AtomicU64,
    delivered: AtomicU64,
    latency: Mutex<Histogram<u64>>,
}

/// The sequence of warm-up events (not counted or timed).
const WARM_UP: u64 = u64::MAX;

async fn subscriptions(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!([{"pubsubname": app.pubsub, "topic": app.topic, "route": "/bench"}]))
}

async fn receive(State(app): State<Arc<App>>, Json(event): Json<Value>) -> Json<Value> {
    if event["data"]["seq"].as_u64() == Some(WARM_UP) {
        app.warm.fetch_add(1, Ordering::Relaxed);
    } else if let Some(sent) = event["data"]["sent_us"].as_u64() {
        let took = micros_now().saturating_sub(sent).max(1);
        if let Ok(mut h) = app.latency.lock() {
            h.saturating_record(took);
        }
        app.delivered.fetch_add(1, Ordering::Relaxed);
    }
    Json(json!({"status": "SUCCESS"}))
}

pub(crate) async fn run(args: SidecarBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.size >= 64, "--size must be at least 64 bytes");
    anyhow::ensure!(args.connections > 0, "--connections must be above 0");
    anyhow::ensure!(args.count > 0, "--count must be above 0");
    let region = args.connect.client()?;
    let e2e_topic = format!("{}-e2e", args.topic);
    for name in [&args.topic, &e2e_topic] {
        let mut config = TopicConfig::new(name.clone(), args.partitions);
        config.class = EventClass::Integration;
        ensure_topic(&region, &config).await?;
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = Arc::new(format!(
        "http://{}/v1.0/publish/{}/{}",
        args.sidecar, args.pubsub, args.topic
    ));

    // Throughput: every connection publishes in turn until COUNT are sent.
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.connections {
        let (http, url, next) = (http.clone(), url.clone(), next.clone());
        let (count, size) = (args.count, args.size);
        tasks.spawn(async move {
            let mut histogram = latency_histogram();
            let (mut accepted, mut refused) = (0u64, 0u64);
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= count {
                    break;
                }
                let sent = Instant::now();
                let answer = http
                    .post(url.as_str())
                    .header("content-type", "application/json")
                    .body(body(seq, size))
                    .send()
                    .await;
                match answer {
                    Ok(r) if r.status().as_u16() == 204 => {
                        histogram.saturating_record(sent.elapsed().as_micros() as u64);
                        accepted += 1;
                    }
                    _ => refused += 1,
                }
            }
            (histogram, accepted, refused)
        });
    }
    let mut histogram = latency_histogram();
    let (mut accepted, mut refused) = (0u64, 0u64);
    while let Some(done) = tasks.join_next().await {
        let (h, a, r) = done?;
        histogram.add(&h)?;
        accepted += a;
        refused += r;
    }
    let seconds = started.elapsed().as_secs_f64();

    let e2e = match args.app {
        Some(addr) => Some(end_to_end(&args, addr, &http, &e2e_topic).await?),
        None => None,
    };
    let report = SidecarReport {
        sidecar: args.sidecar.to_string(),
        size: args.size,
        connections: args.connections,
        count: args.count,
        accepted,
        refused,
        seconds,
        publishes_per_sec: accepted as f64 / seconds,
        publish_latency_ms: Latency::of(&histogram),
        e2e,
    };
    print!(
        "sidecar: {:.0} publishes/s ({} B, {} connections), 2xx p50 {:.2} ms p99 {:.2} ms p999 {:.2} ms",
        report.publishes_per_sec,
        args.size,
        args.connections,
        report.publish_latency_ms.p50,
        report.publish_latency_ms.p99,
        report.publish_latency_ms.p999,
    );
    if let Some(e) = &report.e2e {
        print!(
            "; to the app at {}/s: {} of {} delivered, p50 {:.2} ms p99 {:.2} ms p999 {:.2} ms",
            e.rate,
            e.delivered,
            e.published,
            e.publish_to_app_ms.p50,
            e.publish_to_app_ms.p99,
            e.publish_to_app_ms.p999
        );
    }
    println!();
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    if refused > 0 {
        bail!("{refused} publishes were refused (see the sidecar's log)");
    }
    if let Some(e) = &report.e2e {
        if e.delivered < e.published {
            bail!("not every event reached the app within --drain-secs");
        }
    }
    Ok(())
}

/// Serves as the app, waits until a warm-up event arrives (the subscriber sidecar found the
/// app), then publishes at `--rate` for `--seconds` and waits for every delivery.
async fn end_to_end(
    args: &SidecarBenchArgs,
    addr: SocketAddr,
    http: &reqwest::Client,
    topic: &str,
) -> anyhow::Result<EndToEnd> {
    let app = Arc::new(App {
        topic: topic.to_string(),
        pubsub: args.pubsub.clone(),
        warm: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        latency: Mutex::new(latency_histogram()),
    });
    let router = Router::new()
        .route("/dapr/subscribe", get(subscriptions))
        .route("/bench", post(receive))
        .with_state(app.clone());
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--app {addr}"))?;
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let url = Arc::new(format!(
        "http://{}/v1.0/publish/{}/{topic}",
        args.sidecar, args.pubsub
    ));
    let publish = |seq: u64| {
        let (http, url, size) = (http.clone(), url.clone(), args.size);
        async move {
            http.post(url.as_str())
                .header("content-type", "application/json")
                .body(body(seq, size))
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == 204)
        }
    };
    let warm_deadline = Instant::now() + Duration::from_secs(args.drain_secs);
    while app.warm.load(Ordering::Relaxed) == 0 {
        if Instant::now() > warm_deadline {
            bail!("no event reached the app at {addr}: is a sidecar with app_port {} running and subscribed?", addr.port());
        }
        publish(WARM_UP).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let total = args.rate * args.seconds;
    let gap = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let permits = Arc::new(tokio::sync::Semaphore::new(args.connections));
    let published = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for seq in 0..total {
        tokio::time::sleep_until(start + gap * seq as u32).await;
        let permit = permits.clone().acquire_owned().await?;
        let (published, send) = (published.clone(), publish(seq));
        tasks.spawn(async move {
            if send.await {
                published.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
    let published = published.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(args.drain_secs);
    while app.delivered.load(Ordering::Relaxed) < published && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.abort();
    let latency = Latency::of(&app.latency.lock().expect("latency"));
    Ok(EndToEnd {
        rate: args.rate,
        published,
        delivered: app.delivered.load(Ordering::Relaxed),
        publish_to_app_ms: latency,
    })
}
