//! Chitchat envelopes to bytes and back, through chitchat's own UDP socket on loopback.
//!
//! Chitchat 0.13 keeps its wire encoding private: `ChitchatEnvelope::serialize` and
//! `deserialize` are `pub(crate)` and the digest inside a SYN is opaque, so a transport outside
//! the crate cannot turn an envelope into bytes. The one public component that does is
//! [`chitchat::transport::UdpSocket`]. So:
//!
//! - **encode**: a chitchat socket sends the envelope to a fresh loopback socket of ours, and
//!   the datagram it receives is the envelope's wire form;
//! - **decode**: we send the bytes to a fresh chitchat socket on loopback, followed by a
//!   4-byte sentinel (a `BadCluster` message), and take what it decodes. Chitchat's socket
//!   silently skips a datagram it cannot decode, so when the sentinel arrives alone the
//!   message was malformed, and we know it at once instead of after a timeout.
//!
//! A fresh socket per message means a datagram can never be paired with the wrong message
//! (nothing else is ever sent to that port by us; a datagram from any other source address is
//! ignored). The cost is a bind and two loopback datagrams per gossip message, a few tens of
//! microseconds; gossip sends a handful of messages per node per interval. Both need the
//! loopback interface up (in a fresh network namespace: `ip link set lo up`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use chitchat::transport::{Socket, UdpSocket as ChitchatUdpSocket};
use chitchat::{ChitchatEnvelope, ChitchatMessage, ProtocolVersion};
use tokio::net::UdpSocket;
use tokio::time::{timeout_at, Instant};

/// Largest payload a UDP datagram (and so a chitchat message) can have.
pub(super) const MAX_MESSAGE_LEN: usize = 65_507;
/// Chitchat's magic number, the first two bytes of every message (little-endian).
const MAGIC: u16 = 45_139;
/// Chitchat's message type codes (`message_serialize.rs`).
const TYPE_BAD_CLUSTER: u8 = 3;
const MAX_TYPE: u8 = 3;
/// A complete `BadCluster` message, protocol V0: magic, version, type.
const SENTINEL: [u8; 4] = {
    let magic = MAGIC.to_le_bytes();
    [magic[0], magic[1], 0, TYPE_BAD_CLUSTER]
};
/// A loopback datagram that has not arrived by then never will.
const LOOPBACK_TIMEOUT: Duration = Duration::from_secs(1);
/// After the sentinel, how long a (rarely reordered) message may still arrive.
const SENTINEL_GRACE: Duration = Duration::from_millis(50);

/// Why a message could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub(super) enum CodecError {
    /// The bytes are not a chitchat message.
    #[error("malformed gossip message: {0}")]
    Malformed(String),
    /// Larger than a chitchat message can be.
    #[error("gossip message of {0} bytes exceeds {MAX_MESSAGE_LEN}")]
    TooLarge(usize),
    /// A loopback socket failed.
    #[error("loopback socket: {0}")]
    Io(#[from] std::io::Error),
    /// Chitchat's socket failed.
    #[error("chitchat socket: {0}")]
    Chitchat(String),
    /// A loopback datagram did not arrive.
    #[error("loopback datagram did not arrive within {LOOPBACK_TIMEOUT:?}")]
    Timeout,
}

fn chitchat_error(error: anyhow::Error) -> CodecError {
    CodecError::Chitchat(format!("{error:#}"))
}

/// Binds a UDP socket on IPv4 loopback, or IPv6 loopback if there is no IPv4 one.
async fn bind_loopback() -> std::io::Result<UdpSocket> {
    match UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await {
        Ok(socket) => Ok(socket),
        Err(_) => UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).await,
    }
}

/// Encodes envelopes (one at a time: it needs `&mut`).
pub(super) struct Encoder {
    socket: ChitchatUdpSocket,
    addr: SocketAddr,
    buf: Vec<u8>,
}

impl Encoder {
    /// Binds the chitchat socket that serializes.
    pub(super) async fn bind() -> Result<Self, CodecError> {
        let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0);
        let socket = match ChitchatUdpSocket::open(v4).await {
            Ok(socket) => socket,
            Err(_) => ChitchatUdpSocket::open(v6).await.map_err(chitchat_error)?,
        };
        let addr = socket.local_addr().map_err(chitchat_error)?;
        Ok(Self {
            socket,
            addr,
            buf: vec![0; MAX_MESSAGE_LEN + 1],
        })
    }

    /// The envelope's chitchat wire form.
    pub(super) async fn encode(&mut self, envelope: ChitchatEnvelope) -> Result<Bytes, CodecError> {
        let capture = UdpSocket::bind(SocketAddr::new(loopback_of(self.addr.ip()), 0)).await?;
        let capture_addr = capture.local_addr()?;
        let sent = self
            .socket
            .send(capture_addr, envelope)
            .await
            .map_err(chitchat_error)?
            .num_bytes_sent;
        let deadline = Instant::now() + LOOPBACK_TIMEOUT;
        loop {
            let (len, from) = timeout_at(deadline, capture.recv_from(&mut self.buf))
                .await
                .map_err(|_| CodecError::Timeout)??;
            if from == self.addr && len == sent {
                return Ok(Bytes::copy_from_slice(&self.buf[..len]));
            }
        }
    }
}

fn loopback_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

/// What the first bytes of a message say, before chitchat reads the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Header {
    /// A complete `BadCluster` message (it has no body).
    BadCluster(ProtocolVersion),
    /// A message with a body for chitchat to decode.
    WithBody,
}

/// Checks the header (magic, version, type) and the length, without decoding the body.
fn check_header(bytes: &[u8]) -> Result<Header, CodecError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(CodecError::TooLarge(bytes.len()));
    }
    let [m0, m1, version, kind, ..] = *bytes else {
        return Err(CodecError::Malformed(format!(
            "{} bytes, shorter than a header",
            bytes.len()
        )));
    };
    if u16::from_le_bytes([m0, m1]) != MAGIC {
        return Err(CodecError::Malformed("not chitchat (magic number)".into()));
    }
    let version = ProtocolVersion::from_code(version)
        .ok_or_else(|| CodecError::Malformed(format!("unknown protocol version {version}")))?;
    match kind {
        TYPE_BAD_CLUSTER if bytes.len() == 4 => Ok(Header::BadCluster(version)),
        TYPE_BAD_CLUSTER => Err(CodecError::Malformed("BadCluster with a body".into())),
        kind if kind > MAX_TYPE => Err(CodecError::Malformed(format!("unknown type {kind}"))),
        _ if bytes.len() == 4 => Err(CodecError::Malformed("message without a body".into())),
        _ => Ok(Header::WithBody),
    }
}

/// Decodes messages (one at a time per call; calls may run concurrently).
pub(super) struct Decoder {
    injector: UdpSocket,
    addr: SocketAddr,
}

impl Decoder {
    /// Binds the socket that hands bytes to chitchat.
    pub(super) async fn bind() -> Result<Self, CodecError> {
        let injector = bind_loopback().await?;
        let addr = injector.local_addr()?;
        Ok(Self { injector, addr })
    }

    /// Reads a chitchat message; `Malformed` if chitchat cannot.
    pub(super) async fn decode(&self, bytes: &[u8]) -> Result<ChitchatEnvelope, CodecError> {
        if let Header::BadCluster(version) = check_header(bytes)? {
            return Ok(ChitchatEnvelope {
                version,
                message: ChitchatMessage::BadCluster,
            });
        }
        // `bytes` is longer than the sentinel: lengths tell them apart.
        let mut sink = ChitchatUdpSocket::open(SocketAddr::new(loopback_of(self.addr.ip()), 0))
            .await
            .map_err(chitchat_error)?;
        let sink_addr = sink.local_addr().map_err(chitchat_error)?;
        self.injector.send_to(bytes, sink_addr).await?;
        self.injector.send_to(&SENTINEL, sink_addr).await?;
        let mut deadline = Instant::now() + LOOPBACK_TIMEOUT;
        let mut sentinel_seen = false;
        loop {
            let outcome = match timeout_at(deadline, sink.recv()).await {
                Ok(outcome) => outcome.map_err(chitchat_error)?,
                Err(_) if sentinel_seen => {
                    return Err(CodecError::Malformed(
                        "rejected by chitchat's decoder".into(),
                    ))
                }
                Err(_) => return Err(CodecError::Timeout),
            };
            if outcome.from_addr != self.addr {
                continue;
            }
            if outcome.num_bytes_received == bytes.len() {
                return Ok(outcome.envelope);
            }
            if !sentinel_seen {
                sentinel_seen = true;
                deadline = deadline.min(Instant::now() + SENTINEL_GRACE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad_cluster() -> ChitchatEnvelope {
        ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::BadCluster,
        }
    }

    #[test]
    fn sentinel_is_a_bad_cluster_message() {
        assert_eq!(
            check_header(&SENTINEL).expect("header"),
            Header::BadCluster(ProtocolVersion::V0)
        );
        assert!(check_header(&[]).is_err());
        assert!(check_header(&SENTINEL[..3]).is_err());
        assert!(check_header(&[SENTINEL[0], SENTINEL[1], 7, 0, 0]).is_err());
        assert!(check_header(&[SENTINEL[0], SENTINEL[1], 0, 9, 0]).is_err());
        assert!(check_header(&[SENTINEL[0], SENTINEL[1], 0, 0]).is_err());
        assert!(check_header(&[0, 0, 0, 0, 0]).is_err());
        assert!(matches!(
            check_header(&vec![0; MAX_MESSAGE_LEN + 1]),
            Err(CodecError::TooLarge(_))
        ));
    }

    #[tokio::test]
    async fn round_trips_through_chitchat() {
        let mut encoder = Encoder::bind().await.expect("encoder");
        let decoder = Decoder::bind().await.expect("decoder");

        let envelopes = [
            ChitchatEnvelope {
                version: ProtocolVersion::V0,
                message: ChitchatMessage::Syn {
                    cluster_id: "ferry-test".into(),
                    digest: Default::default(),
                },
            },
            ChitchatEnvelope {
                version: ProtocolVersion::V1,
                message: ChitchatMessage::Ack {
                    delta: Default::default(),
                },
            },
            bad_cluster(),
        ];
        for _ in 0..3 {
            for envelope in envelopes.iter() {
                let expected = format!("{envelope:?}");
                let copy = decoder
                    .decode(&encoder.encode(rebuild(envelope)).await.expect("encode"))
                    .await
                    .expect("decode");
                assert_eq!(format!("{copy:?}"), expected);
            }
        }
        let bytes = encoder.encode(bad_cluster()).await.expect("encode");
        assert_eq!(&bytes[..], &SENTINEL);
    }

    /// `ChitchatEnvelope` is not `Clone`; these test values are simple to rebuild.
    fn rebuild(envelope: &ChitchatEnvelope) -> ChitchatEnvelope {
        let message = match &envelope.message {
            ChitchatMessage::Syn { cluster_id, .. } => ChitchatMessage::Syn {
                cluster_id: cluster_id.clone(),
                digest: Default::default(),
            },
            ChitchatMessage::Ack { .. } => ChitchatMessage::Ack {
                delta: Default::default(),
            },
            _ => ChitchatMessage::BadCluster,
        };
        ChitchatEnvelope {
            version: envelope.version,
            message,
        }
    }

    #[tokio::test]
    async fn malformed_bodies_are_refused_quickly() {
        let mut encoder = Encoder::bind().await.expect("encoder");
        let decoder = Decoder::bind().await.expect("decoder");
        let good = encoder
            .encode(ChitchatEnvelope {
                version: ProtocolVersion::V0,
                message: ChitchatMessage::Syn {
                    cluster_id: "ferry-test".into(),
                    digest: Default::default(),
                },
            })
            .await
            .expect("encode");
        // A valid header followed by a body chitchat cannot read: truncated, and garbage.
        let truncated = good.slice(..good.len() - 1);
        let mut garbage = good[..4].to_vec();
        garbage.extend_from_slice(&[0xff; 40]);
        for bad in [&truncated[..], &garbage[..]] {
            let started = std::time::Instant::now();
            let result = decoder.decode(bad).await;
            assert!(
                matches!(result, Err(CodecError::Malformed(_))),
                "{result:?}"
            );
            // The sentinel says so at once; the loopback timeout (1 s) is not waited for.
            assert!(
                started.elapsed() < Duration::from_millis(900),
                "{:?}",
                started.elapsed()
            );
        }
        // The decoder is still in step afterwards.
        assert!(decoder.decode(&good).await.is_ok());
    }
}
