//! `ferry dev`: a mesh of regions (three of three nodes by default) on loopback in one
//! process, from the embedded default configuration, with development certificates (one CA
//! for the whole mesh) generated on first run. The regions gossip and forward to each other.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use ferry_net::tls::{add_missing_dev_certs, TlsIdentity};
use ferry_region::server::BoundEndpoint;

use crate::config::{node_config_from_table, DEV_DEFAULT};

#[derive(Args)]
pub(crate) struct DevArgs {
    /// Folder for certificates and node data (created on first run, reused after).
    #[arg(long, default_value = "ferry-dev")]
    data: PathBuf,
    /// UDP port of node 1; node N listens on base + N - 1 (HTTP on base + 1000 + N - 1).
    #[arg(long, default_value_t = 7401)]
    base_port: u16,
    /// Regions, comma-separated; node ids run from 1 across them in this order.
    #[arg(long, default_value = "eu,us,ap", value_delimiter = ',')]
    regions: Vec<String>,
    /// Nodes per region.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Run an edge per region (`--edges false`: regions only, e.g. under a separate edge).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    edges: bool,
}

pub(crate) async fn run(args: DevArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating {}", args.data.display()))?;
    let data = args
        .data
        .canonicalize()
        .with_context(|| format!("resolving {}", args.data.display()))?;
    let certs = data.join("certs");
    if args.regions.is_empty() || args.nodes == 0 {
        anyhow::bail!("--regions and --nodes: need at least one region of one node");
    }
    let total = args.regions.len() as u64 * args.nodes;
    let ids: Vec<u64> = (1..=total).collect();
    // A folder from an earlier run keeps its CA; certificates a newer version needs (more
    // nodes, the sidecar's) are added beside it.
    let written = add_missing_dev_certs(&certs, &ids, &["ctl", "bench", "edge", "sidecar"])
        .with_context(|| format!("writing certificates into {}", certs.display()))?;
    if !written.is_empty() {
        tracing::info!(dir = %certs.display(), files = ?written, "wrote development certificates");
    }
    let addr_of = |id: u64| format!("127.0.0.1:{}", u64::from(args.base_port) + id - 1);
    let template: toml::Table = DEV_DEFAULT.parse().context("the embedded dev config")?;
    let mut regions = Vec::new();
    for (index, region) in args.regions.iter().enumerate() {
        let first = index as u64 * args.nodes + 1;
        let region_ids: Vec<u64> = (first..first + args.nodes).collect();
        let peers: Vec<toml::Value> = region_ids
            .iter()
            .map(|id| {
                let mut t = toml::Table::new();
                t.insert("id".into(), toml::Value::Integer(*id as i64));
                t.insert("addr".into(), toml::Value::String(addr_of(*id)));
                toml::Value::Table(t)
            })
            .collect();
        // Gossip seeds in the other regions: their first node.
        let remote_seeds: Vec<toml::Value> = (0..args.regions.len() as u64)
            .filter(|other| *other != index as u64)
            .map(|other| toml::Value::String(addr_of(other * args.nodes + 1)))
            .collect();
        let mut nodes = Vec::new();
        for id in &region_ids {
            let mut table = template.clone();
            table.insert("id".into(), toml::Value::Integer(*id as i64));
            table.insert("region".into(), toml::Value::String(region.clone()));
            let mesh = table
                .entry("mesh")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(mesh) = mesh {
                mesh.insert(
                    "remote_seeds".into(),
                    toml::Value::Array(remote_seeds.clone()),
                );
            }
            table.insert(
                "data_dir".into(),
                toml::Value::String(data.join(format!("node-{id}")).display().to_string()),
            );
            table.insert("peers".into(), toml::Value::Array(peers.clone()));
            // Tiered topics offload to a folder of the dev data (one per region), unless the
            // config names a store.
            if !table.contains_key("tier") {
                let mut tier = toml::Table::new();
                let folder = data.join("tier").join(region);
                tier.insert(
                    "url".into(),
                    toml::Value::String(format!("file://{}", folder.display())),
                );
                table.insert("tier".into(), toml::Value::Table(tier));
            }
            let http_port = u64::from(args.base_port) + 1000 + id - 1;
            table.insert(
                "http".into(),
                toml::Value::String(format!("127.0.0.1:{http_port}")),
            );
            let mut tls = toml::Table::new();
            tls.insert(
                "ca".into(),
                toml::Value::String(certs.join("ca.pem").display().to_string()),
            );
            tls.insert(
                "cert".into(),
                toml::Value::String(certs.join(format!("node-{id}.pem")).display().to_string()),
            );
            tls.insert(
                "key".into(),
                toml::Value::String(certs.join(format!("node-{id}.key")).display().to_string()),
            );
            table.insert("tls".into(), toml::Value::Table(tls));
            let config = node_config_from_table(table, "embedded dev config", std::env::vars())?;
            let identity = TlsIdentity::load(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
            let listen = config.listen_addr().context("dev node address")?;
            let node = BoundEndpoint::bind(listen, identity)?.start(config).await?;
            nodes.push((*id, listen, node));
        }
        regions.push((region.clone(), nodes));
    }
    let secret = dev_edge_secret(&data)?;
    // The edges hold a socket per user connection.
    crate::raise_open_file_limit();
    let templates = dev_templates(&data)?;
    let mut edges = Vec::new();
    for (index, (region, nodes)) in regions.iter().enumerate() {
        if !args.edges {
            break;
        }
        let mut config = ferry_edge::EdgeConfig::new(
            format!("edge-{region}"),
            nodes.iter().map(|(_, addr, _)| *addr).collect(),
            ferry_net::tls::TlsPaths {
                ca: certs.join("ca.pem"),
                cert: certs.join("client-edge.pem"),
                key: certs.join("client-edge.key"),
            },
            std::net::SocketAddr::from(([127, 0, 0, 1], args.base_port + 2000 + index as u16)),
            data.join(format!("edge-{region}")),
            secret.clone(),
        );
        config.channels = vec!["user.*".into(), "news.*".into()];
        config.templates.dir = Some(templates.clone());
        let edge = ferry_edge::Edge::start(config)
            .await
            .with_context(|| format!("starting the edge of region {region}"))?;
        edges.push((region.clone(), edge));
    }
    println!(
        "ferry dev: {} region(s) of {} nodes on loopback (replication 3, fsync before every ack, mTLS, gossip and forwarding between regions)",
        regions.len(),
        args.nodes
    );
    for (region, nodes) in &regions {
        let servers: Vec<String> = nodes.iter().map(|(_, a, _)| a.to_string()).collect();
        println!("region {region}:  FERRY_SERVERS={}", servers.join(","));
        for (id, addr, node) in nodes {
            let http = node
                .http_addr()
                .map(|a| format!("http://{a}/metrics"))
                .unwrap_or_default();
            println!(
                "  node {id}  quic://{addr}  {http}  data {}",
                data.join(format!("node-{id}")).display()
            );
        }
    }
    println!(
        "  certificates (CA, nodes, clients ctl, bench, edge and sidecar): {}",
        certs.display()
    );
    let demo_token = dev_token(&secret)?;
    println!();
    for (region, edge) in &edges {
        let addr = edge.http_addr();
        println!("edge {region}: http://{addr}  (/ws, /sse, /webhooks, /metrics)");
        println!(
            "  demo page: http://{addr}/demo?channels=user.demo,news.global&token={demo_token}"
        );
    }
    println!();
    let servers_of = |i: usize| {
        regions
            .get(i)
            .map(|(_, nodes)| {
                nodes
                    .iter()
                    .map(|(_, a, _)| a.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    println!("From another shell:");
    println!("  export FERRY_CERTS={}", certs.display());
    println!("  export FERRY_SERVERS={}", servers_of(0));
    println!("  ferry ctl topic create orders --partitions 4");
    println!("  ferry ctl publish orders --key customer-1 'hello' 'world'");
    println!("  ferry ctl tail orders");
    println!();
    println!("Notifications (watch them arrive on a demo page above, in any region):");
    println!("  ferry ctl publish notifications --subject user.demo --key user.demo '{{\"hello\":\"demo\"}}'");
    println!("  ferry ctl publish notifications --subject news.global --key news.global '{{\"template\":\"welcome\",\"vars\":{{}}}}'");
    println!(
        "  ferry edge token --secret $(cat {}) --user 42 --channels 'news.*'",
        data.join("edge-secret").display()
    );
    if let (Some((first, _)), Some((second, _))) = (regions.first(), regions.get(1)) {
        println!();
        println!("Across regions ({first} to {second}):");
        println!(
            "  FERRY_SERVERS={} ferry ctl topic create payments --class integration --subjects 'payments.>'",
            servers_of(0)
        );
        println!(
            "  FERRY_SERVERS={} ferry ctl interest add billing 'payments.>'",
            servers_of(1)
        );
        println!("  ferry ctl publish payments --subject payments.captured --key c-1 'paid'");
        println!("  FERRY_SERVERS={} ferry ctl tail payments", servers_of(1));
        println!("  ferry ctl regions");
    }
    println!();
    println!("Services through sidecars (Dapr's pub/sub API, the event store): deploy/examples/README.md");
    println!("  deploy/examples/run     (two example services, one on Dapr's Python SDK)");
    println!();
    println!(
        "Ctrl-C stops the mesh; its data stays in {} for the next run.",
        data.display()
    );
    let nodes: Vec<_> = regions
        .into_iter()
        .flat_map(|(_, nodes)| nodes.into_iter().map(|(_, a, n)| (a, n)))
        .collect();
    let stats_nodes: Vec<_> = nodes.iter().map(|(_, n)| n.node().clone()).collect();
    let stats = tokio::spawn(async move {
        let mut last = vec![(0, 0, 0); stats_nodes.len()];
        let mut last_commit = vec![(0, 0); stats_nodes.len()];
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            for (i, node) in stats_nodes.iter().enumerate() {
                let now = node.flush_stats();
                let (f, w, us) = (now.0 - last[i].0, now.1 - last[i].1, now.2 - last[i].2);
                if f > 0 {
                    tracing::debug!(
                        node = node.id(),
                        fsyncs = f,
                        writes = w,
                        mean_fsync_us = us / f,
                        "storage in the last 5 s"
                    );
                }
                last[i] = now;
                let c = node.commit_latency();
                let (n, us) = (c.0 - last_commit[i].0, c.1 - last_commit[i].1);
                if n > 0 {
                    tracing::debug!(
                        node = node.id(),
                        batches = n,
                        mean_commit_us = us / n,
                        "publishes led in the last 5 s"
                    );
                }
                last_commit[i] = c;
            }
        }
    });
    crate::wait_for_shutdown_signal().await;
    stats.abort();
    futures::future::join_all(edges.into_iter().map(|(_, edge)| edge.shutdown())).await;
    // Stop every node at once (each waits for its connections to close).
    futures::future::join_all(nodes.into_iter().map(|(_, node)| node.shutdown())).await;
    Ok(())
}

/// The edges' token secret: drawn on first run, kept in the data folder.
fn dev_edge_secret(data: &std::path::Path) -> anyhow::Result<String> {
    let path = data.join("edge-secret");
    if let Ok(secret) = std::fs::read_to_string(&path) {
        if secret.trim().len() >= 16 {
            return Ok(secret.trim().to_string());
        }
    }
    let secret = format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    );
    std::fs::write(&path, &secret).with_context(|| format!("writing {}", path.display()))?;
    Ok(secret)
}

/// Example notification templates for the demo, written on first run.
fn dev_templates(data: &std::path::Path) -> anyhow::Result<PathBuf> {
    let dir = data.join("templates");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (file, text) in [
        ("welcome.en.j2", "Welcome to Ferry, {{ user.name }}!"),
        ("welcome.fr.j2", "Bienvenue sur Ferry, {{ user.name }} !"),
    ] {
        let path = dir.join(file);
        if !path.exists() {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(dir)
}

/// A day's token for the demo user (`user.demo` and the `news.*` channels).
fn dev_token(secret: &str) -> anyhow::Result<String> {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 24 * 3600;
    let claims = ferry_edge::Claims {
        sub: "demo".into(),
        tenant: "dev".into(),
        channels: vec!["news.*".into()],
        exp,
        locale: Some("en".into()),
        attrs: serde_json::json!({ "name": "Demo" }),
    };
    Ok(ferry_edge::sign(secret.as_bytes(), &claims)?)
}
