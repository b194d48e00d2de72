//! The one place bincode is used. Every frame on the wire and every record on disk goes
//! through [`encode`]/[`decode`] (bare values) or [`encode_frame`]/[`decode_frame`]
//! (versioned frames), so the format can change in one module.
//!
//! Decoding never panics on arbitrary input: lengths claimed inside the bytes are bounded by
//! a decode limit, and trailing bytes are an error.
//!
//! Payload fields (`Bytes` marked `#[serde(with = "codec::shared_bytes")]`) decode as slices
//! of the input when it is decoded with [`decode_shared`] or [`decode_frame_shared`], so an
//! event's bytes are not copied on their way from the network through Raft to disk.

use std::cell::RefCell;

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

fn encode_err(what: &'static str, e: impl std::fmt::Display) -> ProtoError {
    ProtoError::Encode {
        what,
        reason: e.to_string(),
    }
}

/// Bytes [`encode`] makes of `value`, counted without writing them, so buffers are sized
/// once rather than grown (and copied) as the encoding goes.
fn encoded_len<T: Serialize>(what: &'static str, value: &T) -> Result<usize, ProtoError> {
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(value, &mut size, config())
        .map_err(|e| encode_err(what, e))?;
    Ok(size.bytes_written)
}

/// Encodes a value (no version byte).
pub fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, ProtoError> {
    let mut out = Vec::new();
    encode_into(what, value, &mut out)?;
    Ok(out)
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

/// Encodes a value (no version byte) at the end of `out`.
pub fn encode_into<T: Serialize>(
    what: &'static str,
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), ProtoError> {
    out.reserve(encoded_len(what, value)?);
    bincode::serde::encode_into_std_write(value, out, config())
        .map(|_| ())
        .map_err(|e| encode_err(what, e))
}

thread_local! {
    /// The buffer the [`decode_shared`] running on this thread decodes from.
    static SHARED_SOURCE: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Restores the previous shared source when a [`decode_shared`] ends, however it ends.
struct SharedSourceGuard(Option<Bytes>);

impl Drop for SharedSourceGuard {
    fn drop(&mut self) {
        let previous = self.0.take();
        SHARED_SOURCE.with(|s| *s.borrow_mut() = previous);
    }
}

/// Decodes like [`decode`], except that [`shared_bytes`] fields become slices of `bytes`
/// (sharing its buffer) instead of copies.
pub fn decode_shared<T: DeserializeOwned>(
    what: &'static str,
    bytes: &Bytes,
) -> Result<T, ProtoError> {
    let _restore = SharedSourceGuard(SHARED_SOURCE.with(|s| s.replace(Some(bytes.clone()))));
    decode(what, bytes)
}

/// `Bytes` (de)serialization for payload fields: the same encoding as `Bytes` itself, but
/// decoded without zero-filling a buffer first, and as a slice of the input under
/// [`decode_shared`].
pub mod shared_bytes {
    use bytes::Bytes;
    use serde::{de, Deserializer, Serializer};

    use super::SHARED_SOURCE;

    /// Serializes as bytes (what `Bytes` does).
    pub fn serialize<S: Serializer>(bytes: &Bytes, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    /// Deserializes bytes, sharing the [`super::decode_shared`] input where they lie in it.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
        deserializer.deserialize_bytes(SharedBytesVisitor)
    }

    /// `v` as a slice of the shared input if it lies inside it, else a copy.
    fn share_or_copy(v: &[u8]) -> Bytes {
        SHARED_SOURCE.with(|source| match &*source.borrow() {
            Some(src) if lies_within(src, v) => src.slice_ref(v),
            _ => Bytes::copy_from_slice(v),
        })
    }

    fn lies_within(outer: &[u8], inner: &[u8]) -> bool {
        let (start, end) = (
            outer.as_ptr() as usize,
            outer.as_ptr() as usize + outer.len(),
        );
        let at = inner.as_ptr() as usize;
        !inner.is_empty() && at >= start && at + inner.len() <= end
    }

    struct SharedBytesVisitor;

    impl<'de> de::Visitor<'de> for SharedBytesVisitor {
        type Value = Bytes;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
            Ok(share_or_copy(v))
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
            Ok(Bytes::from(v))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Bytes, E> {
            Ok(Bytes::copy_from_slice(v.as_bytes()))
        }

        fn visit_string<E: de::Error>(self, v: String) -> Result<Bytes, E> {
            Ok(Bytes::from(v.into_bytes()))
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
            let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(value) = seq.next_element::<u8>()? {
                values.push(value);
            }
            Ok(Bytes::from(values))
        }
    }
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
    let mut out = vec![WIRE_VERSION];
    encode_into(what, value, &mut out)?;
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
    decode(what, frame_body(what, frame, max_frame)?)
}

/// Decodes a versioned frame like [`decode_frame`], with [`shared_bytes`] fields sharing
/// the frame's buffer (see [`decode_shared`]).
pub fn decode_frame_shared<T: DeserializeOwned>(
    what: &'static str,
    frame: &Bytes,
    max_frame: usize,
) -> Result<T, ProtoError> {
    let body = frame_body(what, frame, max_frame)?;
    decode_shared(what, &frame.slice_ref(body))
}

/// The body of a versioned frame after checking its size and version.
fn frame_body<'a>(
    what: &'static str,
    frame: &'a [u8],
    max_frame: usize,
) -> Result<&'a [u8], ProtoError> {
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
    Ok(body)
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

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Payload {
        name: String,
        #[serde(with = "shared_bytes")]
        data: Bytes,
        #[serde(with = "shared_bytes")]
        more: Bytes,
    }

    fn lies_in(outer: &Bytes, inner: &Bytes) -> bool {
        let start = outer.as_ptr() as usize;
        let at = inner.as_ptr() as usize;
        at >= start && at + inner.len() <= start + outer.len()
    }

    #[test]
    fn shared_decoding_slices_the_input_and_plain_decoding_copies() {
        let value = Payload {
            name: "p".into(),
            data: Bytes::from(vec![1u8; 300]),
            more: Bytes::from_static(b"xyz"),
        };
        let encoded = Bytes::from(encode("payload", &value).unwrap());
        let shared: Payload = decode_shared("payload", &encoded).unwrap();
        assert_eq!(shared, value);
        assert!(lies_in(&encoded, &shared.data) && lies_in(&encoded, &shared.more));
        let copied: Payload = decode("payload", &encoded).unwrap();
        assert_eq!(copied, value);
        assert!(!lies_in(&encoded, &copied.data));
        // The shared source ends with the decode, even a failed one.
        assert!(decode_shared::<Payload>("payload", &encoded.slice(..10)).is_err());
        let later: Payload = decode("payload", &encoded).unwrap();
        assert!(!lies_in(&encoded, &later.data));
    }

    #[test]
    fn a_shared_frame_decodes_its_body_in_place() {
        let value = Payload {
            name: "f".into(),
            data: Bytes::from(vec![9u8; 64]),
            more: Bytes::new(),
        };
        let frame = encode_frame("payload", &value, 1024).unwrap();
        let back: Payload = decode_frame_shared("payload", &frame, 1024).unwrap();
        assert_eq!(back, value);
        assert!(lies_in(&frame, &back.data));
        assert!(matches!(
            decode_frame_shared::<Payload>("payload", &frame, 10),
            Err(ProtoError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn shared_bytes_keep_the_bytes_encoding() {
        // Fields marked `shared_bytes` encode exactly as plain `Bytes`, so stored data and
        // peers of either kind read them alike.
        let plain = (String::from("p"), Bytes::from_static(b"abc"), Bytes::new());
        let marked = Payload {
            name: "p".into(),
            data: Bytes::from_static(b"abc"),
            more: Bytes::new(),
        };
        assert_eq!(encode("a", &plain).unwrap(), encode("b", &marked).unwrap());
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
