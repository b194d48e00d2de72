//! A snapshot's bytes, read once and in order, piece by piece: whole in memory (the metadata
//! group's, which is small), produced by the state machine as they are read (a partition
//! group's batch files), or spooled to a file as they arrived from the leader. So neither
//! the sender nor the receiver of a partition snapshot holds it in memory, and a node that
//! starts (openraft asks for the current snapshot twice, for its meta) reads no events.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};

/// Produces a snapshot's bytes in order.
pub trait SnapshotSource: Send {
    /// The snapshot's length in bytes; may do work the first time (e.g. list what to read).
    fn total(&mut self) -> io::Result<u64>;
    /// The next piece of the snapshot, or `None` at its end.
    fn next_piece(&mut self) -> io::Result<Option<Bytes>>;
}

/// A snapshot's data, as openraft hands it between the state machine and the network. Its
/// reads hold it to the length its source announced: more bytes, or fewer before the end,
/// are an error.
pub struct SnapshotData {
    source: Box<dyn SnapshotSource>,
    /// What is left of the piece being read.
    pending: Bytes,
    /// The announced length, once asked.
    total: Option<u64>,
    /// Bytes handed out so far.
    read: u64,
}

impl std::fmt::Debug for SnapshotData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotData")
            .field("total", &self.total)
            .field("read", &self.read)
            .finish_non_exhaustive()
    }
}

/// A snapshot held whole in memory.
struct Whole(Option<Bytes>, u64);

impl SnapshotSource for Whole {
    fn total(&mut self) -> io::Result<u64> {
        Ok(self.1)
    }

    fn next_piece(&mut self) -> io::Result<Option<Bytes>> {
        Ok(self.0.take())
    }
}

impl SnapshotData {
    /// Data held whole in memory.
    pub fn from_bytes(bytes: Bytes) -> Self {
        let len = bytes.len() as u64;
        Self::from_source(Whole(Some(bytes), len))
    }

    /// Data `source` produces as it is read.
    pub fn from_source(source: impl SnapshotSource + 'static) -> Self {
        Self {
            source: Box::new(source),
            pending: Bytes::new(),
            total: None,
            read: 0,
        }
    }

    /// The data's whole length in bytes.
    pub fn total(&mut self) -> io::Result<u64> {
        match self.total {
            Some(total) => Ok(total),
            None => {
                let total = self.source.total()?;
                self.total = Some(total);
                Ok(total)
            }
        }
    }

    /// The next up to `max` bytes (at least one unless the data is at its end, then none).
    /// After an error the data is spent: what this call had gathered is lost.
    pub fn read_chunk(&mut self, max: usize) -> io::Result<Bytes> {
        let total = self.total()?;
        let chunk = self.gather(max.max(1))?;
        self.read += chunk.len() as u64;
        if self.read > total {
            return Err(longer_than(total));
        }
        if chunk.is_empty() && self.read < total {
            return Err(shorter_than(total, self.read));
        }
        Ok(chunk)
    }

    /// Up to `max` (at least 1) bytes of the source's next pieces.
    fn gather(&mut self, max: usize) -> io::Result<Bytes> {
        // Sized once, on the first copy, for what this chunk can hold (not grown by doubling,
        // each step another allocation of another size), yet never for more than is left.
        let left = self
            .total
            .map_or(max as u64, |t| t.saturating_sub(self.read));
        let size = max.min(usize::try_from(left).unwrap_or(max));
        let mut out = BytesMut::new();
        while out.len() < max {
            if self.pending.is_empty() {
                match self.source.next_piece()? {
                    Some(piece) => self.pending = piece,
                    None => break,
                }
                continue;
            }
            let part = self
                .pending
                .split_to(self.pending.len().min(max - out.len()));
            if out.is_empty() && part.len() == size {
                // A piece that fills the chunk (or holds all that is left) by itself goes
                // without a copy.
                return Ok(part);
            }
            if out.capacity() == 0 {
                out.reserve(size.max(part.len()));
            }
            out.extend_from_slice(&part);
        }
        Ok(out.freeze())
    }

    /// The whole data in memory, refusing more than `limit` bytes.
    pub fn into_bytes(mut self, limit: u64) -> io::Result<Bytes> {
        let total = self.total()?;
        if total > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a snapshot of {total} bytes is over the {limit} bytes taken whole"),
            ));
        }
        let mut out = BytesMut::with_capacity(total as usize);
        loop {
            let chunk = self.read_chunk(1 << 20)?;
            if chunk.is_empty() {
                return Ok(out.freeze());
            }
            out.extend_from_slice(&chunk);
        }
    }
}

fn longer_than(total: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the snapshot holds more than the {total} bytes it announced"),
    )
}

fn shorter_than(total: u64, read: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the snapshot ended after {read} of the {total} bytes it announced"),
    )
}

impl Read for SnapshotData {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let chunk = self.read_chunk(buf.len())?;
        buf[..chunk.len()].copy_from_slice(&chunk);
        Ok(chunk.len())
    }
}

/// A snapshot being received: its pieces appended, in order, to a file that is deleted when
/// the spool (or the data made of it) is dropped.
pub struct Spool {
    file: File,
    path: PathBuf,
    len: u64,
}

impl Spool {
    /// Creates the spool file at `path` (replacing one left there).
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            len: 0,
        })
    }

    /// Bytes received so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was received yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends the next piece.
    pub fn append(&mut self, piece: &[u8]) -> io::Result<()> {
        self.file.write_all(piece)?;
        self.len += piece.len() as u64;
        Ok(())
    }

    /// The received snapshot, read back from the start of the file.
    pub fn finish(self) -> SnapshotData {
        SnapshotData::from_source(Spooled { spool: self, at: 0 })
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "removing a snapshot spool file failed");
        }
    }
}

/// How much of a spool file one piece reads.
const SPOOL_PIECE: u64 = 1 << 20;

struct Spooled {
    spool: Spool,
    at: u64,
}

impl SnapshotSource for Spooled {
    fn total(&mut self) -> io::Result<u64> {
        Ok(self.spool.len)
    }

    fn next_piece(&mut self) -> io::Result<Option<Bytes>> {
        let left = self.spool.len - self.at;
        if left == 0 {
            return Ok(None);
        }
        let want = left.min(SPOOL_PIECE) as usize;
        let piece = crate::positional::read_exact_at(&self.spool.file, want, self.at)?;
        self.at += want as u64;
        Ok(Some(Bytes::from(piece)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source of the given pieces.
    struct Pieces(std::collections::VecDeque<Bytes>);

    impl SnapshotSource for Pieces {
        fn total(&mut self) -> io::Result<u64> {
            Ok(self.0.iter().map(|p| p.len() as u64).sum())
        }

        fn next_piece(&mut self) -> io::Result<Option<Bytes>> {
            Ok(self.0.pop_front())
        }
    }

    fn pieces(sizes: &[usize]) -> (SnapshotData, Vec<u8>) {
        let mut all = Vec::new();
        let mut out = std::collections::VecDeque::new();
        for (i, size) in sizes.iter().enumerate() {
            let piece: Vec<u8> = (0..*size).map(|j| (i * 31 + j) as u8).collect();
            all.extend_from_slice(&piece);
            out.push_back(Bytes::from(piece));
        }
        (SnapshotData::from_source(Pieces(out)), all)
    }

    #[test]
    fn chunks_cross_piece_boundaries_and_keep_every_byte_in_order() {
        for max in [1, 3, 7, 100, 1 << 20] {
            let (mut data, all) = pieces(&[5, 0, 17, 1, 64, 0, 3]);
            assert_eq!(data.total().unwrap(), all.len() as u64);
            let mut got = Vec::new();
            loop {
                let chunk = data.read_chunk(max).unwrap();
                if chunk.is_empty() {
                    break;
                }
                assert!(chunk.len() <= max, "a chunk of {} over {max}", chunk.len());
                got.extend_from_slice(&chunk);
            }
            assert_eq!(got, all, "chunks of {max}");
        }
    }

    #[test]
    fn a_spooled_snapshot_reads_back_and_its_file_goes_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("incoming");
        let mut spool = Spool::create(&path).unwrap();
        let body: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i % 251) as u8).collect();
        for part in body.chunks(100_000) {
            spool.append(part).unwrap();
        }
        assert_eq!(spool.len(), body.len() as u64);
        let mut data = spool.finish();
        let mut read = Vec::new();
        data.read_to_end(&mut read).unwrap();
        assert_eq!(read, body);
        assert!(path.exists());
        drop(data);
        assert!(!path.exists(), "the spool file is removed with its data");
    }

    #[test]
    fn taken_whole_it_must_match_its_announced_length_and_the_limit() {
        let (data, all) = pieces(&[10, 20]);
        assert_eq!(data.into_bytes(30).unwrap(), all);
        let (data, _) = pieces(&[10, 20]);
        assert!(data.into_bytes(29).is_err());
        /// Announces more than it has.
        struct Short;
        impl SnapshotSource for Short {
            fn total(&mut self) -> io::Result<u64> {
                Ok(10)
            }
            fn next_piece(&mut self) -> io::Result<Option<Bytes>> {
                Ok(None)
            }
        }
        let short = SnapshotData::from_source(Short)
            .into_bytes(100)
            .unwrap_err();
        assert_eq!(short.kind(), io::ErrorKind::UnexpectedEof);
        /// Announces less than it has.
        struct Long(bool);
        impl SnapshotSource for Long {
            fn total(&mut self) -> io::Result<u64> {
                Ok(10)
            }
            fn next_piece(&mut self) -> io::Result<Option<Bytes>> {
                Ok(std::mem::take(&mut self.0).then(|| Bytes::from(vec![1u8; 20])))
            }
        }
        let long = SnapshotData::from_source(Long(true))
            .into_bytes(100)
            .unwrap_err();
        assert_eq!(long.kind(), io::ErrorKind::InvalidData);
        // An empty read reads nothing.
        let (mut data, all) = pieces(&[3]);
        assert_eq!(data.read(&mut []).unwrap(), 0);
        let mut rest = Vec::new();
        data.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, all);
    }
}
