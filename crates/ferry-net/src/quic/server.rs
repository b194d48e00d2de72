//! Server side: endpoint binding, the accept loop and peer-stream handling.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::FutureExt;

use super::{KIND_CALL, KIND_STREAM, REQUEST_HEADER, STATUS_ERR, STATUS_OK};
use crate::faults::LINK_CUT_REASON;
use crate::framing::{read_frame, write_frame_parts};
use crate::stream::{frame_queue, pump_quic, receive_queue, StreamLink};
use crate::{LinkFaults, NetError, PeerStream, RpcHandler, ALPN_CLIENT, ALPN_PEER};

/// Binds a QUIC endpoint on `addr` that accepts with `server` and can also
/// dial (pass a client config explicitly, as [`crate::QuicTransport`] does).
/// Must be called inside a tokio runtime.
pub fn bind_endpoint(
    addr: SocketAddr,
    server: quinn::ServerConfig,
) -> Result<quinn::Endpoint, NetError> {
    quinn::Endpoint::server(server, addr).map_err(|source| NetError::Bind { addr, source })
}

/// Accept loop: for each incoming connection, after the handshake, dispatch
/// on the negotiated ALPN: [`ALPN_PEER`] → serve peer RPC streams with
/// `handler`; [`ALPN_CLIENT`] → call `on_client(conn)` (in a spawned task).
/// Runs until the endpoint is closed. Handshake failures are logged and do
/// not stop the loop. `max_frame` bounds request payloads.
///
/// `faults` are this node's cut links (pass the transport's
/// [`crate::TransportOptions::faults`]): a peer request arriving over a
/// connection whose remote address is cut is answered at once with the error
/// "link cut (fault injection)" (checked per request, so a cut applies to
/// existing connections immediately). Since a node dials from the endpoint it
/// serves on, the remote address of a peer connection is that peer's listen
/// address. Client connections are not affected.
pub async fn serve(
    endpoint: quinn::Endpoint,
    handler: Arc<dyn RpcHandler>,
    on_client: Arc<dyn Fn(quinn::Connection) + Send + Sync>,
    max_frame: usize,
    faults: LinkFaults,
) {
    while let Some(incoming) = endpoint.accept().await {
        let handler = handler.clone();
        let on_client = on_client.clone();
        let faults = faults.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "incoming handshake failed");
                    return;
                }
            };
            let alpn = conn
                .handshake_data()
                .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|h| h.protocol);
            match alpn.as_deref() {
                Some(p) if p == ALPN_PEER => serve_peer(conn, handler, max_frame, faults).await,
                Some(p) if p == ALPN_CLIENT => on_client(conn),
                other => {
                    tracing::warn!(%remote, alpn = ?other.map(String::from_utf8_lossy), "unsupported ALPN, closing");
                    conn.close(quinn::VarInt::from_u32(1), b"unsupported ALPN");
                }
            }
        });
    }
    tracing::debug!("endpoint closed, accept loop finished");
}

/// What a peer connection may claim to be: the node ids its certificate names.
struct PeerIdentity {
    certificate: rustls_pki_types::CertificateDer<'static>,
    /// The last id verified against the certificate (`u64::MAX`: none yet).
    verified: AtomicU64,
}

impl PeerIdentity {
    fn of(conn: &quinn::Connection) -> Option<Self> {
        let chain = conn
            .peer_identity()?
            .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
            .ok()?;
        let certificate = chain.first()?.clone();
        Some(Self {
            certificate,
            verified: AtomicU64::new(u64::MAX),
        })
    }

    /// Whether the certificate names node `id` (`node-<id>.ferry-node`).
    fn allows(&self, id: u64) -> bool {
        if self.verified.load(Ordering::Relaxed) == id {
            return true;
        }
        let Ok(cert) = webpki::EndEntityCert::try_from(&self.certificate) else {
            return false;
        };
        let Ok(name) = rustls_pki_types::ServerName::try_from(crate::node_identity_name(id)) else {
            return false;
        };
        let ok = cert.verify_is_valid_for_subject_name(&name).is_ok();
        if ok {
            self.verified.store(id, Ordering::Relaxed);
        }
        ok
    }
}

async fn serve_peer(
    conn: quinn::Connection,
    handler: Arc<dyn RpcHandler>,
    max_frame: usize,
    faults: LinkFaults,
) {
    let remote = conn.remote_address();
    let Some(identity) = PeerIdentity::of(&conn).map(Arc::new) else {
        tracing::warn!(%remote, "peer connection without a certificate, closing");
        conn.close(quinn::VarInt::from_u32(2), b"peer certificate required");
        return;
    };
    tracing::debug!(%remote, "peer connection accepted");
    loop {
        match conn.accept_bi().await {
            Ok((mut send, mut recv)) => {
                // The remote address can change (migration): look it up per request.
                let from_addr = conn.remote_address();
                if faults.is_cut(from_addr) {
                    tracing::debug!(remote = %from_addr, "refusing peer request over a cut link");
                    tokio::spawn(async move {
                        // Do not read the request; answer right away.
                        let _ = recv.stop(quinn::VarInt::from_u32(0));
                        let msg = LINK_CUT_REASON.as_bytes();
                        let _ = write_frame_parts(&mut send, &[&[STATUS_ERR], msg]).await;
                        let _ = send.finish();
                    });
                    continue;
                }
                tokio::spawn(serve_request(
                    send,
                    recv,
                    handler.clone(),
                    identity.clone(),
                    max_frame,
                    StreamLink {
                        faults: faults.clone(),
                        peer: from_addr,
                        shaped: false,
                    },
                ));
            }
            Err(e) => {
                tracing::debug!(%remote, reason = %e, "peer connection ended");
                return;
            }
        }
    }
}

async fn serve_request(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    handler: Arc<dyn RpcHandler>,
    identity: Arc<PeerIdentity>,
    max_frame: usize,
    link: StreamLink,
) {
    let reply = match read_frame(&mut recv, max_frame + REQUEST_HEADER).await {
        Ok(None) => return,
        Ok(Some(frame)) if frame.len() < REQUEST_HEADER => Err(format!(
            "request frame of {} bytes lacks the node id header",
            frame.len()
        )),
        Ok(Some(frame)) => {
            let mut id = [0u8; 8];
            id.copy_from_slice(&frame[..8]);
            let from = u64::from_be_bytes(id);
            let kind = frame[8];
            let request = frame.slice(REQUEST_HEADER..);
            if !identity.allows(from) {
                tracing::warn!(from, "peer claims a node id its certificate does not name");
                let msg = format!("node id {from} does not match the peer certificate");
                let _ = write_frame_parts(&mut send, &[&[STATUS_ERR], msg.as_bytes()]).await;
                let _ = send.finish();
                return;
            }
            if kind == KIND_STREAM {
                return serve_stream(send, recv, handler, from, request, max_frame, link).await;
            }
            if kind != KIND_CALL {
                let msg = format!("unknown request kind {kind}");
                let _ = write_frame_parts(&mut send, &[&[STATUS_ERR], msg.as_bytes()]).await;
                let _ = send.finish();
                return;
            }
            AssertUnwindSafe(handler.handle(from, request))
                .catch_unwind()
                .await
                .map_err(|_| {
                    tracing::error!(from, "rpc handler panicked");
                    "handler panicked".to_string()
                })
        }
        Err(e @ (NetError::FrameTooLarge { .. } | NetError::Protocol(_))) => {
            tracing::warn!(error = %e, "bad peer request");
            Err(e.to_string())
        }
        Err(e) => {
            tracing::debug!(error = %e, "reading peer request failed");
            return;
        }
    };
    let result = match &reply {
        Ok(body) => write_frame_parts(&mut send, &[&[STATUS_OK], body]).await,
        Err(msg) => write_frame_parts(&mut send, &[&[STATUS_ERR], msg.as_bytes()]).await,
    };
    if let Err(e) = result.and_then(|()| {
        send.finish()
            .map_err(|e| NetError::Closed(format!("finishing reply stream: {e}")))
    }) {
        tracing::debug!(error = %e, "writing peer reply failed");
    }
}

/// Accepts a stream node `from` opened with `request`, pumps its frames and lets the handler
/// serve it until the handler returns.
async fn serve_stream(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    handler: Arc<dyn RpcHandler>,
    from: u64,
    request: bytes::Bytes,
    max_frame: usize,
    link: StreamLink,
) {
    if write_frame_parts(&mut send, &[&[STATUS_OK]]).await.is_err() {
        return;
    }
    let (sender, outgoing) = frame_queue(max_frame);
    let (incoming, receiver) = receive_queue(None);
    pump_quic(send, recv, outgoing, incoming, max_frame, link, false);
    let served = handler.handle_stream(from, request, PeerStream { sender, receiver });
    if AssertUnwindSafe(served).catch_unwind().await.is_err() {
        tracing::error!(from, "stream handler panicked");
    }
}
