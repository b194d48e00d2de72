//! The one place bincode is used. Every frame on the wire and every record on disk goes
//! through [`encode`]/[`decode`] (bare values) or [`encode_frame`]/[`decode_frame`]
//! (versioned frames), so the format can change in one module.
//!
//! Decoding never panics on arbitrary input: lengths claimed inside the bytes are bounded by
//! a decode limit, and trailing bytes are an error.

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

use crate::ProtoError;

/// The wire version this build speaks; the first byte of every frame.
pub const WIRE_VERSION: u8 = 1;

/// Upper bound on what a single decode may allocate, whatever the input claims.
const DECODE_LIMIT: usize = 64 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Encodes a value (no version byte).
pub fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, ProtoError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| ProtoError::Encode {
        what,
        reason: e.to_string(),
    })
}

/// Decodes a value encoded by [`encode`]; the whole slice must be consumed.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, ProtoError> {
    let (value, used) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| ProtoError::Malformed {
            what,
            reason: e.to_string(),
        })?;
    if used != bytes.len() {
        return Err(ProtoError::Malformed {
            what,
            reason: format!("{} trailing bytes", bytes.len() - used),
        });
    }
    Ok(value)
}

/// Encodes a sequence from elements already encoded one by one with [`encode`]: the result
/// decodes as a `Vec` of them. Lets a batch be assembled from a subset of individually
/// encoded events without decoding them.
pub fn encode_seq_of_encoded<B: AsRef<[u8]>>(
    what: &'static str,
    parts: &[B],
) -> Result<Vec<u8>, ProtoError> {
    let mut out = encode(what, &(parts.len() as u64))?;
    out.reserve(parts.iter().map(|p| p.as_ref().len()).sum());
    for part in parts {
        out.extend_from_slice(part.as_ref());
    }
    Ok(out)
}

/// Joins encoded sequences (each an [`encode`] of a `Vec`) into one that decodes as all their
/// elements in order, without decoding the elements: only each length prefix is read.
pub fn concat_seqs<B: AsRef<[u8]>>(what: &'static str, seqs: &[B]) -> Result<Vec<u8>, ProtoError> {
    let mut total = 0u64;
    let mut bodies = Vec::with_capacity(seqs.len());
    for seq in seqs {
        let seq = seq.as_ref();
        let (count, used): (u64, usize) = bincode::serde::decode_from_slice(seq, config())
            .map_err(|e| ProtoError::Malformed {
                what,
                reason: format!("sequence length: {e}"),
            })?;
        total += count;
        bodies.push(&seq[used..]);
    }
    let mut out = encode(what, &total)?;
    out.reserve(bodies.iter().map(|b| b.len()).sum());
    for body in bodies {
        out.extend_from_slice(body);
    }
    Ok(out)
}

/// Encodes a versioned frame, refusing one larger than `max_frame`.
pub fn encode_frame<T: Serialize>(
    what: &'static str,
    value: &T,
    max_frame: usize,
) -> Result<Bytes, ProtoError> {
    let mut out = Vec::with_capacity(256);
    out.push(WIRE_VERSION);
    bincode::serde::encode_into_std_write(value, &mut out, config()).map_err(|e| {
        ProtoError::Encode {
            what,
            reason: e.to_string(),
        }
    })?;
    if out.len() > max_frame {
        return Err(ProtoError::FrameTooLarge {
            size: out.len(),
            max: max_frame,
        });
    }
    Ok(Bytes::from(out))
}

/// Decodes a versioned frame, checking its size and version first.
pub fn decode_frame<T: DeserializeOwned>(
    what: &'static str,
    frame: &[u8],
    max_frame: usize,
) -> Result<T, ProtoError> {
    if frame.len() > max_frame {
        return Err(ProtoError::FrameTooLarge {
            size: frame.len(),
            max: max_frame,
        });
    }
    let Some((&version, body)) = frame.split_first() else {
        return Err(ProtoError::Malformed {
            what,
            reason: "empty frame".into(),
        });
    };
    if version != WIRE_VERSION {
        return Err(ProtoError::UnsupportedVersion {
            found: version,
            expected: WIRE_VERSION,
        });
    }
    decode(what, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joined_sequences_decode_as_all_their_elements() {
        let a = encode("a", &vec!["x".to_string(), "y".to_string()]).unwrap();
        let b = encode("b", &vec!["z".to_string(); 200]).unwrap();
        let joined = concat_seqs("ab", &[&a, &b]).unwrap();
        let all: Vec<String> = decode("ab", &joined).unwrap();
        assert_eq!(all.len(), 202);
        assert_eq!(&all[..3], ["x", "y", "z"]);
        assert!(concat_seqs("bad", &[&[0xffu8][..]]).is_err());
    }

    #[test]
    fn frame_round_trip_and_version_check() {
        let frame = encode_frame("test", &(7u32, "x".to_string()), 1024).unwrap();
        let back: (u32, String) = decode_frame("test", &frame, 1024).unwrap();
        assert_eq!(back, (7, "x".to_string()));
        let mut wrong = frame.to_vec();
        wrong[0] = 9;
        assert_eq!(
            decode_frame::<(u32, String)>("test", &wrong, 1024),
            Err(ProtoError::UnsupportedVersion {
                found: 9,
                expected: WIRE_VERSION
            })
        );
    }

    #[test]
    fn oversized_frames_are_refused_both_ways() {
        let big = vec![0u8; 100];
        assert!(matches!(
            encode_frame("test", &big, 50),
            Err(ProtoError::FrameTooLarge { max: 50, .. })
        ));
        let frame = encode_frame("test", &big, 1000).unwrap();
        assert!(matches!(
            decode_frame::<Vec<u8>>("test", &frame, 50),
            Err(ProtoError::FrameTooLarge { max: 50, .. })
        ));
    }

    #[test]
    fn a_sequence_assembled_from_encoded_elements_decodes_as_a_vec() {
        let items: Vec<(String, u32)> = (0..300).map(|i| (format!("item-{i}"), i)).collect();
        let parts: Vec<Vec<u8>> = items.iter().map(|i| encode("item", i).unwrap()).collect();
        let assembled = encode_seq_of_encoded("items", &parts).unwrap();
        assert_eq!(assembled, encode("items", &items).unwrap());
        let back: Vec<(String, u32)> = decode("items", &assembled).unwrap();
        assert_eq!(back, items);
        let none: Vec<Vec<u8>> = Vec::new();
        let empty: Vec<(String, u32)> =
            decode("items", &encode_seq_of_encoded("items", &none).unwrap()).unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut bytes = encode("n", &5u64).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<u64>("n", &bytes),
            Err(ProtoError::Malformed { .. })
        ));
    }
}
