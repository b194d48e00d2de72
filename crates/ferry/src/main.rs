//! `ferry`: one binary for every role of the mesh. Roles so far: `node`, `edge`, `sidecar`,
//! `certs`, `ctl`, `dev`, `bench`, and for chaos runs `workload`, `check` and `faultfs`.

mod bench;
mod check;
mod config;
mod ctl;
mod dev;
mod edge;
mod faultfs;
mod sidecar;
mod workload;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_net::tls::{generate_dev_certs, TlsIdentity};
use ferry_region::server::BoundEndpoint;

/// glibc's malloc spent about a quarter of the node's CPU in `_int_malloc` under perf; mimalloc's
/// per-thread free lists cost far less for the many short-lived buffers of RPCs and batches.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry: a multi-region replicated event mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a regional node.
    Node {
        /// Configuration file (default: $FERRY_CONFIG).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Development certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Run an edge node (notification fan-out over WebSocket and SSE), or sign a user token.
    Edge(edge::EdgeArgs),
    /// Run a service's sidecar: Dapr-compatible pub/sub, domain event store, durable outbox.
    Sidecar(sidecar::SidecarArgs),
    /// Administer a region: topics, publish, tail.
    Ctl(ctl::CtlArgs),
    /// Run a whole local region (three nodes on loopback) from the embedded default config.
    Dev(dev::DevArgs),
    /// Load generator.
    Bench(bench::BenchArgs),
    /// The client side of a chaos run: publish while recording a history, then collect.
    Workload(workload::WorkloadArgs),
    /// Check a chaos run's history: exit 0 on PASS, 1 on FAIL.
    Check(check::CheckArgs),
    /// The crash-consistency filesystem of the power-loss tests: mount one, or control it.
    Faultfs(faultfs::FaultFsArgs),
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a development CA and node and client certificates signed by it.
    Init {
        /// Folder to write into (must not hold certificates already).
        #[arg(long)]
        out: PathBuf,
        /// Node ids to issue certificates for.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
        nodes: Vec<u64>,
        /// Client names to issue certificates for.
        #[arg(long, value_delimiter = ',', default_value = "ctl")]
        clients: Vec<String>,
    },
    /// Issue more certificates with the development CA in a folder (for a node that joins,
    /// say); certificates the folder holds already are left alone.
    Issue {
        /// The folder with the CA (ca.pem, ca.key).
        #[arg(long)]
        dir: PathBuf,
        /// Node ids to issue certificates for.
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<u64>,
        /// Client names to issue certificates for.
        #[arg(long, value_delimiter = ',')]
        clients: Vec<String>,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,openraft=error,ferry=info,ferry_region=info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// mimalloc asks for transparent huge pages on its arenas, so every 2 MiB region it touches
/// counts whole: an idle node measured 119 MiB resident, 94 MiB of it huge pages, against
/// 48 MiB with them off. Memory that reflects what the process uses is worth more to an
/// operator than the TLB misses saved, so the process opts out (Linux `PR_SET_THP_DISABLE`;
/// applies to every later page fault of the process).
fn disable_transparent_huge_pages() {
    // SAFETY: prctl with PR_SET_THP_DISABLE only sets a flag on this process's memory map.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "PR_SET_THP_DISABLE failed");
    }
}

/// Raises this process's open-file limit to its hard limit (servers and load generators
/// hold a socket per connection); answers the limit now in force.
pub(crate) fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                return wanted.rlim_cur;
            }
        }
    }
    limit.rlim_cur
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    disable_transparent_huge_pages();
    match Cli::parse().command {
        Command::Node { config } => run_node(config).await,
        Command::Certs {
            command:
                CertsCommand::Init {
                    out,
                    nodes,
                    clients,
                },
        } => {
            let names: Vec<&str> = clients.iter().map(String::as_str).collect();
            generate_dev_certs(&out, &nodes, &names)
                .with_context(|| format!("writing certificates into {}", out.display()))?;
            println!("wrote a development CA and certificates for nodes {nodes:?} and clients {clients:?} into {}", out.display());
            Ok(())
        }
        Command::Certs {
            command:
                CertsCommand::Issue {
                    dir,
                    nodes,
                    clients,
                },
        } => {
            if !dir.join("ca.key").exists() {
                anyhow::bail!(
                    "{} holds no development CA (ca.pem, ca.key): make one with `ferry certs init`",
                    dir.display()
                );
            }
            let names: Vec<&str> = clients.iter().map(String::as_str).collect();
            let written = ferry_net::tls::add_missing_dev_certs(&dir, &nodes, &names)
                .with_context(|| format!("issuing certificates in {}", dir.display()))?;
            if written.is_empty() {
                println!("{} already holds those certificates", dir.display());
            } else {
                println!("wrote {} into {}", written.join(", "), dir.display());
            }
            Ok(())
        }
        Command::Ctl(args) => {
            // `ferry ctl ... | head` should end quietly when the reader goes away, like other
            // command-line tools. Only here: ctl talks QUIC (UDP), so no socket write can
            // raise SIGPIPE, whereas a node's HTTP endpoint must get EPIPE instead.
            // SAFETY: called before any thread of ours writes to stdout; it only changes the
            // disposition of one signal.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            }
            ctl::run(args).await
        }
        Command::Edge(args) => edge::run(args).await,
        Command::Sidecar(args) => sidecar::run(args).await,
        Command::Dev(args) => dev::run(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Workload(args) => workload::run(args).await,
        Command::Faultfs(args) => tokio::task::spawn_blocking(move || faultfs::run(args))
            .await
            .context("faultfs thread")?,
        Command::Check(args) => {
            if check::run(args)? == ferry_check::Verdict::Fail {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

async fn run_node(path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = config::load_node_config(path.as_deref())?;
    let identity = TlsIdentity::load(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
    let listen = config.listen_addr().context(
        "this node has no address: list it in peers, or set addr to join a running region",
    )?;
    let id = config.id;
    let node = BoundEndpoint::bind(listen, identity)?.start(config).await?;
    tracing::info!(id, %listen, "node running");
    // Fail-stop: once a write or fsync of its storage failed, the node acknowledges nothing
    // more, and it exits so that it is restarted and recovers from what is on disk.
    let mut check = tokio::time::interval(std::time::Duration::from_millis(200));
    let failure = tokio::select! {
        _ = wait_for_shutdown_signal() => None,
        failure = async {
            loop {
                check.tick().await;
                if let Some(failure) = node.node().storage_failure() {
                    break failure;
                }
            }
        } => Some(failure),
    };
    if let Some(failure) = failure {
        // At once: nothing the node would do on its way out (stepping down, draining) may
        // depend on storage that failed.
        tracing::error!(id, %failure, "storage failed: stopping now (fail-stop)");
        eprintln!("node {id} stopped: its storage failed ({failure})");
        std::process::exit(1);
    }
    tracing::info!(id, "shutting down");
    node.shutdown().await;
    Ok(())
}

/// Waits for Ctrl-C or SIGTERM.
pub(crate) async fn wait_for_shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}
