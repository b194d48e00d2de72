//! `ferry dev`: a region of three nodes on loopback in one process, from the embedded default
//! configuration, with development certificates generated on first run.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use ferry_net::tls::{generate_dev_certs, TlsIdentity};
use ferry_region::server::BoundEndpoint;

use crate::config::{node_config_from_table, DEV_DEFAULT};

#[derive(Args)]
pub(crate) struct DevArgs {
    /// Folder for certificates and node data (created on first run, reused after).
    #[arg(long, default_value = "ferry-dev")]
    data: PathBuf,
    /// UDP port of node 1; node N listens on base + N - 1.
    #[arg(long, default_value_t = 7401)]
    base_port: u16,
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
}

pub(crate) async fn run(args: DevArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating {}", args.data.display()))?;
    let data = args
        .data
        .canonicalize()
        .with_context(|| format!("resolving {}", args.data.display()))?;
    let certs = data.join("certs");
    let ids: Vec<u64> = (1..=args.nodes).collect();
    if !certs.join("ca.pem").exists() {
        generate_dev_certs(&certs, &ids, &["ctl", "bench"])
            .with_context(|| format!("writing certificates into {}", certs.display()))?;
    }
    let template: toml::Table = DEV_DEFAULT.parse().context("the embedded dev config")?;
    let peers: Vec<toml::Value> = ids
        .iter()
        .map(|id| {
            let mut t = toml::Table::new();
            t.insert("id".into(), toml::Value::Integer(*id as i64));
            let port = u64::from(args.base_port) + id - 1;
            t.insert(
                "addr".into(),
                toml::Value::String(format!("127.0.0.1:{port}")),
            );
            toml::Value::Table(t)
        })
        .collect();
    let mut nodes = Vec::new();
    for id in &ids {
        let mut table = template.clone();
        table.insert("id".into(), toml::Value::Integer(*id as i64));
        table.insert(
            "data_dir".into(),
            toml::Value::String(data.join(format!("node-{id}")).display().to_string()),
        );
        table.insert("peers".into(), toml::Value::Array(peers.clone()));
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
        nodes.push((listen, node));
    }
    let servers: Vec<String> = nodes.iter().map(|(a, _)| a.to_string()).collect();
    println!(
        "ferry dev: a region of {} nodes on loopback (replication 3, fsync before every ack, mTLS)",
        ids.len()
    );
    for (id, (addr, node)) in ids.iter().zip(&nodes) {
        let http = node
            .http_addr()
            .map(|a| format!("http://{a}/metrics"))
            .unwrap_or_default();
        println!(
            "  node {id}  quic://{addr}  {http}  data {}",
            data.join(format!("node-{id}")).display()
        );
    }
    println!(
        "  certificates (CA, nodes, clients ctl and bench): {}",
        certs.display()
    );
    println!();
    println!("From another shell:");
    println!(
        "  export FERRY_CERTS={} FERRY_SERVERS={}",
        certs.display(),
        servers.join(",")
    );
    println!("  ferry ctl topic create orders --partitions 4");
    println!("  ferry ctl publish orders --key customer-1 'hello' 'world'");
    println!("  ferry ctl tail orders");
    println!();
    println!(
        "Ctrl-C stops the region; its data stays in {} for the next run.",
        data.display()
    );
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
    for (_, node) in nodes {
        node.shutdown().await;
    }
    Ok(())
}
