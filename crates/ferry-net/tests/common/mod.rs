//! Shared helpers for ferry-net integration tests.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use ferry_net::tls::{self, TlsIdentity};
use ferry_net::{
    bind_endpoint, serve, LinkFaults, NodeId, RpcHandler, ALPN_CLIENT, ALPN_PEER, DEFAULT_MAX_FRAME,
};
use futures::future::BoxFuture;

/// Deadline used for every wait in tests.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Replies `from (u64 BE) ‖ tag ‖ request` and counts calls.
pub struct Echo {
    pub tag: &'static [u8],
    pub calls: AtomicUsize,
}

impl Echo {
    pub fn new(tag: &'static [u8]) -> Arc<Self> {
        Arc::new(Self {
            tag,
            calls: AtomicUsize::new(0),
        })
    }

    pub fn count(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

pub fn echo_reply(from: NodeId, tag: &[u8], req: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u64(from);
    b.put_slice(tag);
    b.put_slice(req);
    b.freeze()
}

impl RpcHandler for Echo {
    fn handle(&self, from: NodeId, request: Bytes) -> BoxFuture<'static, Bytes> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let reply = echo_reply(from, self.tag, &request);
        Box::pin(async move { reply })
    }

    /// Answers each frame of a stream with `echo_reply(from, tag ‖ request, frame)`, until
    /// the dialer ends the stream.
    fn handle_stream(
        &self,
        from: NodeId,
        request: Bytes,
        stream: ferry_net::PeerStream,
    ) -> BoxFuture<'static, ()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let tag = [self.tag, &request[..]].concat();
        let ferry_net::PeerStream {
            sender,
            mut receiver,
        } = stream;
        Box::pin(async move {
            while let Some(Ok(frame)) = receiver.recv().await {
                if sender.send(echo_reply(from, &tag, &frame)).await.is_err() {
                    return;
                }
            }
        })
    }
}

/// A serving node: endpoint + accept loop task.
pub struct Node {
    pub endpoint: quinn::Endpoint,
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
    pub clients: tokio::sync::mpsc::UnboundedReceiver<quinn::Connection>,
    /// The cut links `serve` consults (nothing cut at start); give a clone to
    /// the node's transport (`TransportOptions::faults`).
    pub faults: LinkFaults,
}

pub fn start_node(
    id: &TlsIdentity,
    addr: SocketAddr,
    handler: Arc<dyn RpcHandler>,
    max_frame: usize,
) -> Result<Node, ferry_net::NetError> {
    let server = tls::server_config(id, &[ALPN_PEER, ALPN_CLIENT])?;
    let endpoint = bind_endpoint(addr, server)?;
    let addr = endpoint.local_addr().expect("local addr");
    let (tx, clients) = tokio::sync::mpsc::unbounded_channel();
    let on_client = Arc::new(move |c: quinn::Connection| {
        let _ = tx.send(c);
    });
    let faults = LinkFaults::default();
    let task = tokio::spawn(serve(
        endpoint.clone(),
        handler,
        on_client,
        max_frame,
        faults.clone(),
    ));
    Ok(Node {
        endpoint,
        addr,
        task,
        clients,
        faults,
    })
}

pub fn start_echo_node(id: &TlsIdentity, handler: Arc<Echo>) -> Node {
    start_node(id, loopback0(), handler, DEFAULT_MAX_FRAME).expect("start node")
}

pub fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// A dial-only endpoint on loopback.
pub fn client_endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client(loopback0()).expect("client endpoint")
}

/// Unique temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "ferry-net-{tag}-{}-{nanos}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        Self(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
