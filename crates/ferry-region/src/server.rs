//! Running a node on QUIC: bind the endpoint (one UDP port for peers and clients, told apart
//! by ALPN), start the [`Node`] with a QUIC transport to its peers, and serve.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use ferry_net::tls::{client_config, server_config, TlsIdentity};
use ferry_net::{
    bind_endpoint, serve, LinkFaults, QuicTransport, TransportOptions, ALPN_CLIENT, ALPN_PEER,
};

use crate::{Node, NodeConfig, RegionError};

/// How long a stopping node lets its QUIC connections drain after closing them.
const DRAIN_ON_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(1);

/// A bound endpoint not yet serving; bind first to learn the address (port 0 picks one).
pub struct BoundEndpoint {
    endpoint: quinn::Endpoint,
    identity: TlsIdentity,
}

impl BoundEndpoint {
    /// Binds `addr` with the node's certificate; peers and clients must present certificates
    /// from the same CA.
    pub fn bind(addr: SocketAddr, identity: TlsIdentity) -> Result<Self, RegionError> {
        let server = server_config(&identity, &[ALPN_PEER, ALPN_CLIENT])?;
        let endpoint = bind_endpoint(addr, server)?;
        Ok(Self { endpoint, identity })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, RegionError> {
        self.endpoint
            .local_addr()
            .map_err(|e| RegionError::Net(ferry_net::NetError::Protocol(e.to_string())))
    }

    /// Starts the node and serves peers and clients.
    pub async fn start(self, config: NodeConfig) -> Result<QuicNode, RegionError> {
        // Bind everything before starting, so a bad address changes nothing.
        let http = match config.http {
            Some(addr) => Some(crate::http::bind_http(addr).await?),
            None => None,
        };
        let peers: HashMap<_, _> = config.peers.iter().map(|p| (p.id, p.addr)).collect();
        let faults = match config.faults.slow_links.iter().find_map(|l| l.seed) {
            Some(seed) => LinkFaults::with_seed(seed),
            None => LinkFaults::new(),
        };
        let options = TransportOptions {
            max_frame: config.limits.max_frame.max(64 * 1024 * 1024),
            faults,
            ..TransportOptions::default()
        };
        for link in &config.faults.slow_links {
            options.faults.shape(link.addr, link.shape());
        }
        let transport = QuicTransport::new(
            config.id,
            self.endpoint.clone(),
            client_config(&self.identity, ALPN_PEER)?,
            peers,
            options.clone(),
        );
        let node = Node::start(config, transport).await?;
        let handler = node.peer_handler();
        let client_node = node.clone();
        let on_client = Arc::new(move |connection: quinn::Connection| {
            tokio::spawn(client_node.clone().serve_client(connection));
        });
        let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(listener) = http {
            tokio::spawn(crate::http::serve_http(node.clone(), listener));
        }
        let serving = tokio::spawn(serve(
            self.endpoint.clone(),
            handler,
            on_client,
            options.max_frame,
            options.faults.clone(),
        ));
        let running = QuicNode {
            node,
            http_addr,
            endpoint: self.endpoint,
            serving,
            faults: options.faults,
        };
        // A node that joins a running region asks to once it serves (the region reaches it
        // to check it and to replicate to it); a refusal stops it.
        if let Err(e) = running.node.join_region().await {
            running.shutdown().await;
            return Err(e);
        }
        Ok(running)
    }
}

/// A node serving on QUIC.
pub struct QuicNode {
    node: Node<QuicTransport>,
    http_addr: Option<SocketAddr>,
    endpoint: quinn::Endpoint,
    serving: tokio::task::JoinHandle<()>,
    faults: LinkFaults,
}

impl QuicNode {
    /// The node.
    pub fn node(&self) -> &Node<QuicTransport> {
        &self.node
    }

    /// This node's cut and shaped links (fault injection), shared by its transport and its
    /// accept loop: cutting a peer's address takes the link to that node down in
    /// both directions; shaping it delays, drops and duplicates this node's calls to it.
    /// [`LinkFaults::injected`] counts the faults injected so far.
    pub fn faults(&self) -> &LinkFaults {
        &self.faults
    }

    /// Where `/healthz` and `/metrics` are served, if configured.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Stops the node as abruptly as one process can stop a part of itself, for crash tests:
    /// the endpoint is closed first, so from that instant no reply, vote, append or
    /// acknowledgement leaves the node (peers and clients see it vanish mid-request, with
    /// requests unanswered), and only then are the groups stopped, without stepping down,
    /// draining connections or flushing anything beyond what was already written. What a
    /// real SIGKILL would also drop, page-cache writes not yet fsynced, is kept: that needs
    /// a filesystem that loses unsynced writes (the chaos scripts).
    pub async fn kill(self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(1), b"node killed");
        self.serving.abort();
        let _ = self.serving.await;
        // Stopping the groups is only what lets the data folder be opened again in this
        // process: nothing they do from here on can reach another node or a client.
        self.node.shutdown().await;
    }

    /// Stops serving and stops every group; storage is released when this returns and the
    /// last client connection task has ended.
    pub async fn shutdown(self) {
        self.node.shutdown().await;
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"node shutting down");
        self.serving.abort();
        let _ = self.serving.await;
        // The close frames are sent at once; waiting for every connection to finish draining
        // (three probe timeouts each, longer towards a peer that is dead or paused) took 3-9 s
        // in chaos runs and protects nothing, so it is bounded.
        let drained = tokio::time::timeout(DRAIN_ON_SHUTDOWN, self.endpoint.wait_idle()).await;
        if drained.is_err() {
            tracing::debug!(
                "connections still draining after {DRAIN_ON_SHUTDOWN:?}; stopping anyway"
            );
        }
    }
}
