//! Peer streams: a long-lived, ordered exchange of frames with one peer, for traffic that
//! must not wait for one answer before it sends the next request (Raft's replication
//! pipeline, a snapshot's pieces). The dialing side opens one with [`crate::Transport::open_stream`]; the peer
//! answers it in [`crate::RpcHandler::handle_stream`]. Frames arrive in the order they were
//! sent, each way; either side ends the stream by dropping its [`StreamSender`].

use std::net::SocketAddr;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::faults::LINK_CUT_REASON;
use crate::framing::{read_frame, write_frame};
use crate::{LinkFaults, NetError};

/// Frames queued each way before a sender waits (QUIC's flow control adds its own window).
pub(crate) const STREAM_QUEUE: usize = 64;

/// Both halves of a peer stream.
pub struct PeerStream {
    /// Frames to the peer.
    pub sender: StreamSender,
    /// Frames from the peer, in order; an error ends the stream.
    pub receiver: StreamReceiver,
}

/// Sends frames on a peer stream. Dropping every clone ends this side of the stream.
#[derive(Clone)]
pub struct StreamSender {
    tx: mpsc::Sender<(Instant, Bytes)>,
    max_frame: usize,
}

impl StreamSender {
    /// Queues `frame`, waiting while the stream is full. Fails once the stream has ended.
    pub async fn send(&self, frame: Bytes) -> Result<(), NetError> {
        if frame.len() > self.max_frame {
            return Err(NetError::FrameTooLarge {
                len: frame.len(),
                max: self.max_frame,
            });
        }
        self.tx
            .send((Instant::now(), frame))
            .await
            .map_err(|_| NetError::Closed("peer stream ended".into()))
    }
}

/// What feeds a [`StreamReceiver`]: each frame (or the error that ended the stream) with
/// the time it arrived.
pub(crate) type Arrivals = mpsc::Sender<(Instant, Result<Bytes, NetError>)>;

/// Receives the frames of a peer stream.
pub struct StreamReceiver {
    rx: mpsc::Receiver<(Instant, Result<Bytes, NetError>)>,
    /// Set on the dialing side: its slow-link delay applies to arriving frames too.
    link: Option<StreamLink>,
}

impl StreamReceiver {
    /// The next frame; `None` once the peer ended the stream cleanly. Cancel-safe except on
    /// a slow link (fault injection), where a frame already taken may be dropped with the
    /// future.
    pub async fn recv(&mut self) -> Option<Result<Bytes, NetError>> {
        let (at, item) = self.rx.recv().await?;
        if let (Some(link), Ok(_)) = (&self.link, &item) {
            link.delay(at).await;
        }
        Some(item)
    }
}

/// A sender and the queue its frames arrive on.
pub(crate) fn frame_queue(max_frame: usize) -> (StreamSender, mpsc::Receiver<(Instant, Bytes)>) {
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    (StreamSender { tx, max_frame }, rx)
}

/// A receiver and the queue that feeds it; `link` delays its frames on a slow link.
pub(crate) fn receive_queue(link: Option<StreamLink>) -> (Arrivals, StreamReceiver) {
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    (tx, StreamReceiver { rx, link })
}

/// The link a stream runs over, as fault injection sees it: the peer's address and this
/// node's faults. A cut ends the stream at the next frame; a slow link delays each frame
/// (the dialing side applies both directions' delays, as it does for calls). Frames are
/// never dropped or duplicated: a QUIC stream is reliable, so a shaped link's
/// `drop_*` and `duplicate` chances apply to calls only.
#[derive(Clone)]
pub(crate) struct StreamLink {
    pub(crate) faults: LinkFaults,
    pub(crate) peer: SocketAddr,
    pub(crate) shaped: bool,
}

impl StreamLink {
    fn check(&self) -> Result<(), NetError> {
        if self.faults.is_cut(self.peer) {
            Err(NetError::Closed(format!(
                "stream to {}: {LINK_CUT_REASON}",
                self.peer
            )))
        } else {
            Ok(())
        }
    }

    /// Waits until a frame that was ready at `at` may go on (a slow link's one-way delay).
    pub(crate) async fn delay(&self, at: Instant) {
        if !self.shaped {
            return;
        }
        if let Some(delay) = self.faults.one_way(self.peer) {
            tokio::time::sleep_until(at + delay).await;
        }
    }
}

/// Runs a QUIC stream's two pumps: queued frames are written to `send` (finished when every
/// sender is dropped), frames read from `recv` go to `incoming`. Each pump stops on the first
/// error, which the reading side reports to its receiver. With `status_first` (the dialing
/// side), the first frame read is the peer's status, not passed on unless it is a refusal.
pub(crate) fn pump_quic(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut outgoing: mpsc::Receiver<(Instant, Bytes)>,
    incoming: Arrivals,
    max_frame: usize,
    link: StreamLink,
    status_first: bool,
) {
    let write_link = link.clone();
    tokio::spawn(async move {
        while let Some((at, frame)) = outgoing.recv().await {
            write_link.delay(at).await;
            if write_link.check().is_err() || write_frame(&mut send, frame).await.is_err() {
                let _ = send.reset(quinn::VarInt::from_u32(0));
                return;
            }
        }
        let _ = send.finish();
    });
    tokio::spawn(async move {
        if status_first {
            let status = match read_frame(&mut recv, max_frame).await {
                Ok(Some(frame)) => crate::quic::parse_reply(frame).map(|_| ()),
                Ok(None) => Err(NetError::Protocol(
                    "peer ended the stream without a status".into(),
                )),
                Err(e) => Err(e),
            };
            if let Err(e) = status {
                let _ = incoming.send((Instant::now(), Err(e))).await;
                return;
            }
        }
        loop {
            let item = match read_frame(&mut recv, max_frame).await {
                Ok(Some(frame)) => link.check().map(|()| frame),
                Ok(None) => return,
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            if incoming.send((Instant::now(), item)).await.is_err() || failed {
                let _ = recv.stop(quinn::VarInt::from_u32(0));
                return;
            }
        }
    });
}
