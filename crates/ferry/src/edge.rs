//! `ferry edge`: run an edge node, or sign a user token for one.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct EdgeArgs {
    /// Configuration file (default: $FERRY_CONFIG).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<EdgeCommand>,
}

#[derive(Subcommand)]
enum EdgeCommand {
    /// Print a signed user token (HS256 JWT) for `/ws` and `/sse`.
    Token {
        /// The edge's `auth.secret` (default: $FERRY_AUTH_SECRET).
        #[arg(long, env = "FERRY_AUTH_SECRET", hide_env_values = true)]
        secret: String,
        /// The user id; the user may read `user.<id>`.
        #[arg(long)]
        user: String,
        /// The tenant.
        #[arg(long, default_value = "")]
        tenant: String,
        /// Shared channels (subject filters) the user may read, comma-separated.
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
        /// Validity, seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// The user's locale for templates.
        #[arg(long)]
        locale: Option<String>,
        /// User attributes templates may read, as a JSON object.
        #[arg(long)]
        attrs: Option<String>,
    },
}

pub(crate) async fn run(args: EdgeArgs) -> anyhow::Result<()> {
    match args.command {
        Some(EdgeCommand::Token {
            secret,
            user,
            tenant,
            channels,
            ttl,
            locale,
            attrs,
        }) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            let claims = ferry_edge::Claims {
                sub: user,
                tenant,
                channels,
                exp: now + ttl,
                locale,
                attrs: match attrs {
                    Some(text) => serde_json::from_str(&text).context("--attrs is not JSON")?,
                    None => serde_json::Value::Null,
                },
            };
            println!("{}", ferry_edge::sign(secret.as_bytes(), &claims)?);
            Ok(())
        }
        None => {
            let config = crate::config::load_edge_config(args.config.as_deref())?;
            let files = crate::raise_open_file_limit();
            if (files as usize) < config.limits.max_connections {
                tracing::warn!(
                    open_files = files,
                    max_connections = config.limits.max_connections,
                    "the open-file limit is below limits.max_connections; raise it (ulimit -Hn)"
                );
            }
            let name = config.name.clone();
            let edge = ferry_edge::Edge::start(config)
                .await
                .with_context(|| format!("starting edge {name}"))?;
            tracing::info!(name, http = %edge.http_addr(), "edge running");
            crate::wait_for_shutdown_signal().await;
            edge.shutdown().await;
            Ok(())
        }
    }
}
