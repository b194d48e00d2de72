//! Length-prefixed frames on QUIC streams: a `u32` big-endian payload length
//! followed by the payload.

use bytes::Bytes;
use quinn::{ReadError, ReadExactError, RecvStream, SendStream, WriteError};

use crate::NetError;

/// Writes one frame: `u32` big-endian length prefix + payload. The payload is handed to
/// quinn as it is, not copied into the stream's buffer.
pub async fn write_frame(send: &mut SendStream, payload: Bytes) -> Result<(), NetError> {
    let len = payload.len();
    let len32 = u32::try_from(len).map_err(|_| NetError::FrameTooLarge {
        len,
        max: u32::MAX as usize,
    })?;
    let mut chunks = [Bytes::copy_from_slice(&len32.to_be_bytes()), payload];
    send.write_all_chunks(&mut chunks)
        .await
        .map_err(|e| write_err("bytes", e))
}

/// Writes one frame whose payload is the concatenation of `parts`.
pub(crate) async fn write_frame_parts(
    send: &mut SendStream,
    parts: &[&[u8]],
) -> Result<(), NetError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let len32 = u32::try_from(len).map_err(|_| NetError::FrameTooLarge {
        len,
        max: u32::MAX as usize,
    })?;
    send.write_all(&len32.to_be_bytes())
        .await
        .map_err(|e| write_err("header", e))?;
    for part in parts {
        send.write_all(part)
            .await
            .map_err(|e| write_err("payload", e))?;
    }
    Ok(())
}

/// Reads one frame. Returns `Ok(None)` on a clean end of stream before a
/// header, [`NetError::FrameTooLarge`] if the declared length exceeds `max`
/// (checked before allocating), and [`NetError::Protocol`] if the stream ends
/// inside a frame.
pub async fn read_frame(recv: &mut RecvStream, max: usize) -> Result<Option<Bytes>, NetError> {
    let mut header = [0u8; 4];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(ReadExactError::FinishedEarly(n)) => {
            return Err(NetError::Protocol(format!(
                "stream ended after {n} of 4 frame header bytes"
            )))
        }
        Err(ReadExactError::ReadError(e)) => return Err(read_err("header", e)),
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(NetError::FrameTooLarge { len, max });
    }
    // Take quinn's received chunks as they are: a frame that arrived in one chunk is not
    // copied, a longer one is copied once (never zero-filled first).
    let mut buf: Vec<u8> = Vec::new();
    while buf.len() < len {
        let got = buf.len();
        match recv.read_chunk(len - got, true).await {
            Ok(Some(chunk)) if got == 0 && chunk.bytes.len() == len => {
                return Ok(Some(chunk.bytes))
            }
            Ok(Some(chunk)) => {
                if got == 0 {
                    buf.reserve_exact(len);
                }
                buf.extend_from_slice(&chunk.bytes);
            }
            Ok(None) => {
                return Err(NetError::Protocol(format!(
                    "stream ended after {got} of {len} frame payload bytes"
                )))
            }
            Err(e) => return Err(read_err("payload", e)),
        }
    }
    Ok(Some(Bytes::from(buf)))
}

/// Maps a stream write error, keeping the connection's close reason.
fn write_err(part: &str, e: WriteError) -> NetError {
    match e {
        WriteError::ConnectionLost(c) => {
            NetError::Closed(format!("writing frame {part}: connection lost: {c}"))
        }
        other => NetError::Closed(format!("writing frame {part}: {other}")),
    }
}

/// Maps a stream read error, keeping the connection's close reason.
fn read_err(part: &str, e: ReadError) -> NetError {
    match e {
        ReadError::ConnectionLost(c) => {
            NetError::Closed(format!("reading frame {part}: connection lost: {c}"))
        }
        other => NetError::Closed(format!("reading frame {part}: {other}")),
    }
}
