//! `ferry workload edge`: notifications through an edge, as its users see them. One
//! WebSocket client per user channel (`user.<process>u<n>`) subscribes, and after any drop
//! (the edge stopped, lost power) subscribes again from the last position it received; a
//! producer publishes to the edge's topic, three keys (sources) per channel. Every publish, every
//! notification received and every `gap` or `lag` frame is recorded (`notify` lines), for
//! `ferry check` to judge: nothing acknowledged missing, no silent skip or renumbering.
//! Once publishing ends, the clients keep reading (bounded) until they hold everything that
//! was acknowledged.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use ferry_check::{Func, Op, OpType};
use ferry_client::ProducerOptions;
use ferry_proto::{Event, Subject};
use futures::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::{outcome_op, publish_op, Recorder};
use crate::ctl::Connect;

#[derive(Args)]
pub(super) struct EdgeArgs {
    /// History file (JSON lines), appended to.
    #[arg(long)]
    out: PathBuf,
    /// The edge's HTTP address (host:port).
    #[arg(long)]
    edge: String,
    /// The edge's token secret (`[auth] secret`), to sign the users' tokens.
    #[arg(long, env = "FERRY_AUTH_SECRET")]
    secret: String,
    /// The edge's notification topic (the edge creates it).
    #[arg(long, default_value = "notifications")]
    topic: String,
    /// Users, one channel and one WebSocket client each.
    #[arg(long, default_value_t = 4)]
    users: u64,
    /// Notifications, spread over the users in turn.
    #[arg(long, default_value_t = 2000)]
    count: u64,
    /// Notifications per second (0: as fast as acknowledgements allow).
    #[arg(long, default_value_t = 10)]
    rate: u64,
    /// Stop publishing after this many seconds even if --count is not reached.
    #[arg(long, default_value_t = 120)]
    duration_secs: u64,
    /// How long the clients may take, once publishing ended, to receive every acknowledged
    /// notification, seconds.
    #[arg(long, default_value_t = 90)]
    drain_secs: u64,
    /// The region the edge serves and the producer publishes to (recorded).
    #[arg(long, default_value = "")]
    region: String,
    /// The producer's process number; the clients take the next ones.
    #[arg(long, default_value_t = 0)]
    process: u64,
}

/// What one user's client records and shares with the run.
struct User {
    process: u64,
    channel: String,
    token: String,
    /// Event ids received, for the drain.
    received: Arc<Mutex<HashSet<String>>>,
}

pub(super) async fn run(
    connect: &Connect,
    epoch_ms: Option<u64>,
    args: EdgeArgs,
) -> anyhow::Result<()> {
    let client = connect.client()?;
    let (recorder, writer) = Recorder::start(&args.out, epoch_ms)?;
    let recorder = Arc::new(recorder);
    let stop_at = Instant::now() + Duration::from_secs(args.duration_secs);
    // The edge created the topic; wait (bounded) until it is there with leaders.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client.describe_topic(&args.topic).await {
            Ok(d) if d.partitions.iter().all(|p| p.leader.is_some()) => break,
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "waiting for the edge's topic"),
        }
        if Instant::now() > deadline {
            bail!("topic {} was not ready within 60 s", args.topic);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let exp = super::unix_ms() / 1000 + 24 * 3600;
    let (stop, stopped) = watch::channel(false);
    let mut users = Vec::new();
    let mut clients = Vec::new();
    let mut subscribed = Vec::new();
    for n in 0..args.users {
        let sub = format!("{}u{n}", args.process);
        let claims = ferry_edge::Claims {
            sub: sub.clone(),
            tenant: String::new(),
            channels: Vec::new(),
            exp,
            locale: None,
            attrs: Default::default(),
        };
        let user = Arc::new(User {
            process: args.process + 1 + n,
            channel: format!("user.{sub}"),
            token: ferry_edge::sign(args.secret.as_bytes(), &claims)?,
            received: Arc::default(),
        });
        let (ready, is_ready) = watch::channel(false);
        subscribed.push(is_ready);
        clients.push(tokio::spawn(read_channel(
            user.clone(),
            args.edge.clone(),
            args.topic.clone(),
            args.region.clone(),
            recorder.clone(),
            ready,
            stopped.clone(),
        )));
        users.push(user);
    }
    // Publish only once every client is subscribed, so every notification is published
    // while its client is there to read it (a first subscription gets a gap and whatever
    // the edge already holds).
    for mut ready in subscribed {
        tokio::time::timeout(Duration::from_secs(60), ready.wait_for(|r| *r))
            .await
            .context("a client did not subscribe within 60 s")??;
    }

    let producer = loop {
        match client
            .producer(&args.topic, ProducerOptions::default())
            .await
        {
            Ok(p) => break p,
            Err(e) if Instant::now() < stop_at => {
                tracing::warn!(error = %e, "creating a producer; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).context("creating a producer"),
        }
    };
    let pace = (args.rate > 0).then(|| Duration::from_micros(1_000_000 / args.rate));
    let mut acknowledged: Vec<(String, usize)> = Vec::new();
    let mut pending = futures::stream::FuturesUnordered::new();
    for n in 0..args.count {
        if Instant::now() > stop_at {
            break;
        }
        let user = (n % args.users.max(1)) as usize;
        let channel = &users[user].channel;
        let id = format!("n{}-{n}", args.process);
        // Three sources per channel, each its own key, as when several services notify one
        // user: a channel's notifications come from several partitions, so the edge's
        // numbering depends on how it interleaves its reads, and a window that rolled back
        // numbers them differently the second time (which only a new epoch makes safe).
        let key = format!("{channel}/source-{}", (n / args.users.max(1)) % 3);
        recorder.record(Op {
            op_type: Some(OpType::Invoke),
            key: Some(key.clone()),
            channel: Some(channel.clone()),
            region: args.region.clone(),
            ..publish_op(args.process, &id, &args.topic)
        });
        let event = Event::new(
            id.clone(),
            "/ferry/workload/edge",
            "chaos.notification",
            Subject::new(channel)?,
            id.clone().into_bytes(),
        )
        .with_key(key);
        match producer.send(event).await {
            Ok(ack) => pending.push(async move { (id, user, ack.await) }),
            Err(_) => recorder.record(Op {
                op_type: Some(OpType::Info),
                ..publish_op(args.process, &id, &args.topic)
            }),
        }
        while let Some(Some((id, user, result))) = futures::FutureExt::now_or_never(pending.next())
        {
            outcome(&recorder, &args, &mut acknowledged, id, user, result);
        }
        if let Some(pace) = pace {
            tokio::time::sleep(pace).await;
        }
    }
    while let Some((id, user, result)) = pending.next().await {
        outcome(&recorder, &args, &mut acknowledged, id, user, result);
    }
    drop(producer);

    // Every acknowledged notification at its client, or the drain ends (the checker then
    // names what is missing).
    let deadline = Instant::now() + Duration::from_secs(args.drain_secs);
    loop {
        let missing = acknowledged
            .iter()
            .filter(|(id, user)| {
                !users[*user]
                    .received
                    .lock()
                    .expect("received lock")
                    .contains(id)
            })
            .count();
        if missing == 0 {
            break;
        }
        if Instant::now() > deadline {
            tracing::warn!(
                missing,
                "acknowledged notifications not received by the deadline"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(true);
    for client in clients {
        client.await.context("edge client")??;
    }
    drop(recorder);
    writer.await.context("history writer")??;
    Ok(())
}

fn outcome(
    recorder: &Recorder,
    args: &EdgeArgs,
    acknowledged: &mut Vec<(String, usize)>,
    id: String,
    user: usize,
    result: Result<ferry_client::PublishAck, ferry_client::ClientError>,
) {
    let ack = result.ok();
    if ack.is_some() {
        acknowledged.push((id.clone(), user));
    }
    recorder.record(outcome_op(
        args.process,
        &id,
        &args.topic,
        &args.region,
        ack,
    ));
}

/// One user's client: subscribes, records what arrives, and after any drop connects and
/// subscribes again from the last position received, until `stopped`.
async fn read_channel(
    user: Arc<User>,
    edge: String,
    topic: String,
    region: String,
    recorder: Arc<Recorder>,
    ready: watch::Sender<bool>,
    mut stopped: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut last: Option<String> = None;
    let notify = |op_type, id: Option<String>, position: Option<String>, kind: Option<&str>| Op {
        op_type: Some(op_type),
        process: user.process,
        f: Some(Func::Notify),
        id,
        region: region.clone(),
        topic: topic.clone(),
        channel: Some(user.channel.clone()),
        position,
        kind: kind.map(String::from),
        ..Op::default()
    };
    let url = format!("ws://{edge}/ws?token={}", user.token);
    while !*stopped.borrow() {
        let connected = tokio::select! {
            c = tokio::time::timeout(Duration::from_secs(5), tokio_tungstenite::connect_async(&url)) => c,
            _ = stopped.wait_for(|s| *s) => break,
        };
        let mut ws = match connected {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "edge unreachable; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(_) => continue,
        };
        // From the last position received; before any, from a position no edge has, which
        // the edge answers with a gap and everything it retains (a first subscription is
        // made before anything is published).
        let since = last.clone().unwrap_or_else(|| "none-0".into());
        let subscribe =
            serde_json::json!({"type": "subscribe", "channel": user.channel, "since": since});
        if ws
            .send(Message::Text(subscribe.to_string().into()))
            .await
            .is_err()
        {
            continue;
        }
        loop {
            let message = tokio::select! {
                m = ws.next() => m,
                _ = stopped.wait_for(|s| *s) => return Ok(()),
            };
            let Some(Ok(message)) = message else { break };
            let Message::Text(text) = message else {
                continue;
            };
            for line in text.split('\n').filter(|l| !l.is_empty()) {
                let frame: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("a frame from the edge: {line}"))?;
                let field = |name: &str| frame[name].as_str().map(String::from);
                match frame["type"].as_str() {
                    Some("message") => {
                        let (Some(id), Some(position)) = (field("event_id"), field("id")) else {
                            bail!("a message frame without event_id or id: {line}");
                        };
                        user.received
                            .lock()
                            .expect("received lock")
                            .insert(id.clone());
                        recorder.record(notify(OpType::Ok, Some(id), Some(position.clone()), None));
                        last = Some(position);
                    }
                    Some("gap") => {
                        recorder.record(notify(
                            OpType::Info,
                            None,
                            field("first_available"),
                            Some("gap"),
                        ));
                    }
                    Some("lag") => {
                        recorder.record(notify(
                            OpType::Info,
                            None,
                            field("resume_from"),
                            Some("lag"),
                        ));
                    }
                    Some("subscribed") => {
                        let _ = ready.send(true);
                    }
                    Some("error") => tracing::warn!(frame = %line, "the edge refused"),
                    _ => {}
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
