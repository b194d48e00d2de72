//! `ferry sidecar`: run a service's sidecar (Dapr-compatible pub/sub, event store, outbox).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

#[derive(Args)]
pub(crate) struct SidecarArgs {
    /// Configuration file (default: $FERRY_CONFIG).
    #[arg(long)]
    config: Option<PathBuf>,
}

pub(crate) async fn run(args: SidecarArgs) -> anyhow::Result<()> {
    let config = crate::config::load_sidecar_config(args.config.as_deref())?;
    let app_id = config.app_id.clone();
    let sidecar = ferry_sidecar::Sidecar::start(config)
        .await
        .with_context(|| format!("starting the sidecar of {app_id}"))?;
    tracing::info!(%app_id, http = %sidecar.http_addr(), "sidecar running");
    crate::wait_for_shutdown_signal().await;
    sidecar.shutdown().await;
    Ok(())
}
