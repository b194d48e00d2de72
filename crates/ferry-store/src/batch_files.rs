//! A partition's event data: stored batches appended to segment files of their own, outside
//! any key-value store, read back by offset with `pread`.
//!
//! A record is `[u32 events length][u32 CRC-32 of events][u64 base offset][u32 count]
//! [u64 appended at, ms][events]`. Segments are `<base offset of first batch:020>.seg`, rolled
//! past `segment_bytes`. Writes are not synced one by one: the partition's state machine
//! calls [`BatchFiles::sync`] before it records a checkpoint, and on open the files are cut
//! back to the [`Extent`] that checkpoint names (the Raft log re-applies the rest). Batches
//! dropped by retention leave the index at once; their segments are deleted by
//! [`BatchFiles::remove_dropped`] once no checkpoint names them.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use ferry_proto::StoredBatch;
use serde::{Deserialize, Serialize};

use crate::StoreError;

pub(crate) const HEADER: usize = 28;

/// The segments and their lengths at a checkpoint: `(first base offset, bytes)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent(pub Vec<(u64, u64)>);

/// Segment files to make durable up to given lengths, and their folder (see
/// [`BatchFiles::sync_plan`]).
pub struct SyncPlan {
    files: Vec<(u64, Arc<File>, PathBuf, u64)>,
    dir: PathBuf,
}

impl SyncPlan {
    /// Files it would sync.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether it would sync no file (the folder still is).
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Syncs each file's data (at least up to its planned length) and the folder.
    pub fn sync(&self) -> Result<(), StoreError> {
        for (_, file, path, _) in &self.files {
            file.sync_data().map_err(io(path))?;
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))
    }
}

/// Where a batch lies, and what the index needs to know of it without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchInfo {
    /// Events in the batch.
    pub count: u32,
    /// When the leader appended it.
    pub appended_at_ms: u64,
    /// Bytes of event data.
    pub bytes: u32,
    segment: u64,
    position: u64,
}

struct Segment {
    file: Arc<File>,
    path: PathBuf,
    len: u64,
    synced: u64,
    /// Writeback to disk has been started up to here (see [`WRITEBACK_STEP`]).
    written_back: u64,
}

/// Writeback of a segment's new bytes is started (not waited for) each time this many have
/// been appended. Otherwise the kernel holds them until a checkpoint's fsync, which then
/// writes hundreds of megabytes at once and starves the write-ahead log's fsyncs (they
/// share the disk and the file system's journal) for as long.
const WRITEBACK_STEP: u64 = 2 * 1024 * 1024;

/// Starts writing `len` bytes of `file` at `offset` back to disk, without waiting.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open for
    // as long as `file` is borrowed.
    let result = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if result != 0 {
        // Only a hint: the checkpoint's fsync still makes the bytes durable.
        tracing::debug!(error = %std::io::Error::last_os_error(), "starting writeback failed");
    }
}

/// Elsewhere there is no `sync_file_range`: the checkpoint's fsync writes everything.
#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

/// One partition's batch files and their index.
pub struct BatchFiles {
    dir: PathBuf,
    segment_bytes: u64,
    segments: BTreeMap<u64, Segment>,
    index: BTreeMap<u64, BatchInfo>,
}

fn io(what: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::io(what.display().to_string(), e)
}

impl BatchFiles {
    /// The folder holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens the files in `dir` cut back to `extent`; segments it does not name are removed.
    pub fn open(dir: &Path, segment_bytes: u64, extent: &Extent) -> Result<Self, StoreError> {
        crate::create_dir_durably(dir)?;
        let named: BTreeMap<u64, u64> = extent.0.iter().copied().collect();
        for item in std::fs::read_dir(dir).map_err(io(dir))? {
            let path = item.map_err(io(dir))?.path();
            let first = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(first) = first {
                if !named.contains_key(&first) {
                    std::fs::remove_file(&path).map_err(io(&path))?;
                }
            }
        }
        let mut files = Self {
            dir: dir.to_path_buf(),
            segment_bytes: segment_bytes.max(4096),
            segments: BTreeMap::new(),
            index: BTreeMap::new(),
        };
        for (first, len) in named {
            let path = files.segment_path(first);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io(&path))?;
            let actual = file.metadata().map_err(io(&path))?.len();
            if actual < len {
                return Err(StoreError::Corrupt {
                    path,
                    reason: format!("{actual} bytes, but the checkpoint recorded {len}"),
                });
            }
            if actual > len {
                file.set_len(len).map_err(io(&path))?;
            }
            files.scan(first, &file, &path, len)?;
            files.segments.insert(
                first,
                Segment {
                    file: Arc::new(file),
                    path,
                    len,
                    synced: len,
                    written_back: len,
                },
            );
        }
        Ok(files)
    }

    fn segment_path(&self, first: u64) -> PathBuf {
        segment_path(&self.dir, first)
    }

    /// Rebuilds the index of one segment from its record headers.
    fn scan(&mut self, segment: u64, file: &File, path: &Path, len: u64) -> Result<(), StoreError> {
        let mut position = 0u64;
        while position < len {
            let (bytes, base, count, at) = header_at(file, path, position, len)?;
            self.index.insert(
                base,
                BatchInfo {
                    count,
                    appended_at_ms: at,
                    bytes,
                    segment,
                    position,
                },
            );
            position += (HEADER + bytes as usize) as u64;
        }
        Ok(())
    }

    /// Appends `batch` (its base offset above every stored one).
    pub fn append(&mut self, batch: &StoredBatch) -> Result<(), StoreError> {
        let bytes = u32::try_from(batch.events.len())
            .map_err(|_| StoreError::io("batch files", "batch too large"))?;
        let roll = match self.segments.values().next_back() {
            None => true,
            Some(seg) => seg.len >= self.segment_bytes,
        };
        if roll {
            let path = self.segment_path(batch.base_offset);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(io(&path))?;
            self.segments.insert(
                batch.base_offset,
                Segment {
                    file: Arc::new(file),
                    path,
                    len: 0,
                    synced: 0,
                    written_back: 0,
                },
            );
        }
        let (&first, seg) = self.segments.iter_mut().next_back().expect("a segment");
        // The header and the events go in one vectored write, so the events are not copied
        // into a record first. A torn write leaves bytes past the last checkpoint's extent,
        // which open cuts off like any unsynced write.
        let header = record_header(batch, bytes);
        crate::positional::write_pair_at(&seg.file, &header, &batch.events, seg.len)
            .map_err(io(&seg.path))?;
        self.index.insert(
            batch.base_offset,
            BatchInfo {
                count: batch.count,
                appended_at_ms: batch.appended_at_ms,
                bytes,
                segment: first,
                position: seg.len,
            },
        );
        seg.len += (HEADER + batch.events.len()) as u64;
        if seg.len - seg.written_back >= WRITEBACK_STEP {
            start_writeback(&seg.file, seg.written_back, seg.len - seg.written_back);
            seg.written_back = seg.len;
        }
        Ok(())
    }

    /// The index: base offset → batch.
    pub fn index(&self) -> &BTreeMap<u64, BatchInfo> {
        &self.index
    }

    /// The first offsets of `low..high` no batch holds, if any (`from..to`): a replica's
    /// files must hold every offset between its watermarks.
    pub fn first_gap(&self, low: u64, high: u64) -> Option<(u64, u64)> {
        if low >= high {
            return None;
        }
        let start = self
            .index
            .range(..=low)
            .next_back()
            .map_or(low, |(base, _)| *base);
        let mut next = low;
        for (base, info) in self.index.range(start..high) {
            if *base > next {
                return Some((next, *base));
            }
            next = next.max(base + u64::from(info.count));
        }
        (next < high).then_some((next, high))
    }

    /// Where to read the batches from the one holding `offset` on, at most `max_bytes` of
    /// events (at least one batch). Read them with [`read_batch`] without holding `self`.
    pub fn locate(&self, offset: u64, max_bytes: usize) -> Vec<BatchLocation> {
        let start = self
            .index
            .range(..=offset)
            .next_back()
            .filter(|(base, info)| *base + u64::from(info.count) > offset)
            .map_or(offset, |(base, _)| *base);
        let mut out = Vec::new();
        let mut size = 0usize;
        for (base, info) in self.index.range(start..) {
            if !out.is_empty() && size + info.bytes as usize > max_bytes {
                break;
            }
            size += info.bytes as usize;
            let seg = &self.segments[&info.segment];
            out.push(BatchLocation {
                base_offset: *base,
                info: *info,
                file: seg.file.clone(),
                path: seg.path.clone(),
            });
            if size >= max_bytes {
                break;
            }
        }
        out
    }

    /// The batches from the one holding `from` (or the first after it) to the end of the
    /// segment file holding that one, if that file is complete (a later one is being
    /// written): a run to move to the object store. None if there is no such run.
    pub fn sealed_run(&self, from: u64) -> Option<Vec<BatchLocation>> {
        let (&start, first) = self
            .index
            .range(..=from)
            .next_back()
            .filter(|(base, info)| *base + u64::from(info.count) > from)
            .or_else(|| self.index.range(from..).next())?;
        let active = *self.segments.keys().next_back()?;
        if first.segment == active {
            return None;
        }
        let seg = &self.segments[&first.segment];
        let run = self
            .index
            .range(start..)
            .take_while(|(_, info)| info.segment == first.segment)
            .map(|(base, info)| BatchLocation {
                base_offset: *base,
                info: *info,
                file: seg.file.clone(),
                path: seg.path.clone(),
            })
            .collect();
        Some(run)
    }

    /// Makes every append so far durable.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        for seg in self.segments.values_mut() {
            if seg.synced < seg.len {
                seg.file.sync_data().map_err(io(&seg.path))?;
                seg.synced = seg.len;
            }
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))
    }

    /// The segment bytes a checkpoint taken now needs on disk that may not be there yet. Take
    /// it under the lock, [`SyncPlan::sync`] it without, so appends go on meanwhile; then
    /// [`BatchFiles::mark_synced`].
    pub fn sync_plan(&self) -> SyncPlan {
        SyncPlan {
            files: self
                .segments
                .iter()
                .filter(|(_, seg)| seg.synced < seg.len)
                .map(|(first, seg)| (*first, seg.file.clone(), seg.path.clone(), seg.len))
                .collect(),
            dir: self.dir.clone(),
        }
    }

    /// Records what a [`SyncPlan`] made durable.
    pub fn mark_synced(&mut self, plan: &SyncPlan) {
        for (first, _, _, len) in &plan.files {
            if let Some(seg) = self.segments.get_mut(first) {
                seg.synced = seg.synced.max(*len);
            }
        }
    }

    /// Deletes the segments that hold only dropped batches, except those `kept` names (a
    /// checkpoint written from an earlier [`BatchFiles::extent`] still needs them).
    pub fn remove_dropped_outside(&mut self, kept: &Extent) -> Result<(), StoreError> {
        for first in self.dropped_segments() {
            if kept.0.iter().any(|(f, _)| *f == first) {
                continue;
            }
            if let Some(seg) = self.segments.remove(&first) {
                std::fs::remove_file(&seg.path).map_err(io(&seg.path))?;
            }
        }
        Ok(())
    }

    /// Drops batches that end at or before `before` from the index. Returns the event bytes
    /// dropped. Their segments stay on disk until [`BatchFiles::remove_dropped`].
    pub fn drop_before(&mut self, before: u64) -> u64 {
        let mut freed = 0;
        while let Some(entry) = self.index.first_entry() {
            if *entry.key() + u64::from(entry.get().count) > before {
                break;
            }
            freed += u64::from(entry.remove().bytes);
        }
        freed
    }

    /// Segments that hold no indexed batch and are not the one being written.
    fn dropped_segments(&self) -> Vec<u64> {
        let live_from = self.index.values().next().map(|i| i.segment);
        let active = self.segments.keys().next_back().copied();
        self.segments
            .keys()
            .copied()
            .filter(|first| Some(*first) != active && live_from.is_none_or(|l| *first < l))
            .collect()
    }

    /// Bytes of the segment files (as written; dropped batches not deleted yet included).
    pub fn disk_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.len).sum()
    }

    /// Whether some segment holds only dropped batches (and waits to be deleted).
    pub fn holds_dropped(&self) -> bool {
        !self.dropped_segments().is_empty()
    }

    /// Deletes the segments that hold only dropped batches. Call after recording a
    /// checkpoint whose [`BatchFiles::extent`] no longer names them.
    pub fn remove_dropped(&mut self) -> Result<(), StoreError> {
        for first in self.dropped_segments() {
            if let Some(seg) = self.segments.remove(&first) {
                std::fs::remove_file(&seg.path).map_err(io(&seg.path))?;
            }
        }
        Ok(())
    }

    /// The segments (and lengths) a checkpoint taken now names: all but the dropped ones.
    pub fn extent(&self) -> Extent {
        let dropped = self.dropped_segments();
        Extent(
            self.segments
                .iter()
                .filter(|(first, _)| !dropped.contains(first))
                .map(|(first, seg)| (*first, seg.len))
                .collect(),
        )
    }

    /// Opens the segments of `dir` that `extent` names (what a checkpoint holds), for reading
    /// only, without reading them yet.
    pub fn open_extent(dir: &Path, extent: &Extent) -> Result<ExtentFiles, StoreError> {
        let mut segments = VecDeque::new();
        for (first, len) in &extent.0 {
            let path = segment_path(dir, *first);
            let file = File::open(&path).map_err(io(&path))?;
            segments.push_back(ExtentSegment {
                file,
                path,
                len: *len,
                next: 0,
            });
        }
        Ok(ExtentFiles { segments })
    }
}

/// The segments a checkpoint names, held open: the bytes they had then stay readable
/// through these handles after a later checkpoint deletes the files. Read in order, one
/// record at a time, so nothing per batch is kept.
pub struct ExtentFiles {
    segments: VecDeque<ExtentSegment>,
}

struct ExtentSegment {
    file: File,
    path: PathBuf,
    len: u64,
    /// Where the next record to read starts.
    next: u64,
}

impl ExtentFiles {
    /// Calls `each(base offset, count, event bytes)` for every batch not read yet, in order,
    /// from the record headers only.
    pub fn for_each_header(&self, mut each: impl FnMut(u64, u32, u32)) -> Result<(), StoreError> {
        for seg in &self.segments {
            let mut position = seg.next;
            while position < seg.len {
                let (bytes, base, count, _) = header_at(&seg.file, &seg.path, position, seg.len)?;
                each(base, count, bytes);
                position += (HEADER + bytes as usize) as u64;
            }
        }
        Ok(())
    }

    /// The next batch `wanted(base offset, count)` accepts, its checksum checked (the events
    /// of the others are not read); None past the last.
    pub fn next_batch(
        &mut self,
        wanted: impl Fn(u64, u32) -> bool,
    ) -> Result<Option<StoredBatch>, StoreError> {
        while let Some(seg) = self.segments.front_mut() {
            if seg.next >= seg.len {
                self.segments.pop_front();
                continue;
            }
            let at = seg.next;
            let (bytes, base, count, _) = header_at(&seg.file, &seg.path, at, seg.len)?;
            seg.next = at + (HEADER + bytes as usize) as u64;
            if wanted(base, count) {
                return read_record(&seg.file, &seg.path, at, bytes, base).map(Some);
            }
        }
        Ok(None)
    }
}

/// The segment of `dir` whose first batch starts at `first`.
fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.seg"))
}

/// The header of `batch`'s record, its events `bytes` long.
pub(crate) fn record_header(batch: &StoredBatch, bytes: u32) -> [u8; HEADER] {
    let mut header = [0u8; HEADER];
    header[0..4].copy_from_slice(&bytes.to_le_bytes());
    header[4..8].copy_from_slice(&crc32fast::hash(&batch.events).to_le_bytes());
    header[8..16].copy_from_slice(&batch.base_offset.to_le_bytes());
    header[16..20].copy_from_slice(&batch.count.to_le_bytes());
    header[20..28].copy_from_slice(&batch.appended_at_ms.to_le_bytes());
    header
}

pub(crate) fn parse_header(h: &[u8; HEADER]) -> (u32, u64, u32, u64) {
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    (u32_at(0), u64_at(8), u32_at(16), u64_at(20))
}

/// A batch to read, detached from the [`BatchFiles`] it came from.
#[derive(Clone)]
pub struct BatchLocation {
    /// The batch's first offset.
    pub base_offset: u64,
    /// What the index knows of it.
    pub info: BatchInfo,
    file: Arc<File>,
    path: PathBuf,
}

/// Reads one located batch, checking its checksum.
pub fn read_batch(location: &BatchLocation) -> Result<StoredBatch, StoreError> {
    read_record(
        &location.file,
        &location.path,
        location.info.position,
        location.info.bytes,
        location.base_offset,
    )
}

/// The header of the record at `position` of a segment `len` bytes long: (event bytes, base
/// offset, count, appended at). A record that does not fit is torn.
fn header_at(
    file: &File,
    path: &Path,
    position: u64,
    len: u64,
) -> Result<(u32, u64, u32, u64), StoreError> {
    if position + HEADER as u64 > len {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("torn record header at offset {position}"),
        });
    }
    let mut header = [0u8; HEADER];
    file.read_exact_at(&mut header, position)
        .map_err(io(path))?;
    let parsed = parse_header(&header);
    if position + (HEADER + parsed.0 as usize) as u64 > len {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("torn record at offset {position}"),
        });
    }
    Ok(parsed)
}

/// Reads the record at `position` holding `bytes` of events, checking its checksum and that
/// it is the batch at `base_offset`.
fn read_record(
    file: &File,
    path: &Path,
    position: u64,
    bytes: u32,
    base_offset: u64,
) -> Result<StoredBatch, StoreError> {
    let record = crate::positional::read_exact_at(file, HEADER + bytes as usize, position)
        .map_err(io(path))?;
    decode_record(Bytes::from(record), base_offset).ok_or_else(|| StoreError::Corrupt {
        path: path.to_path_buf(),
        reason: format!(
            "batch at offset {base_offset} (file position {position}) fails its checksum"
        ),
    })
}

/// The batch in `record` (a whole record: header and events), if its checksum holds and it
/// is the batch at `base_offset`.
pub(crate) fn decode_record(record: Bytes, base_offset: u64) -> Option<StoredBatch> {
    let header: &[u8; HEADER] = record.get(..HEADER)?.try_into().ok()?;
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    let (bytes, base, count, at) = parse_header(header);
    let events = record.slice(HEADER..);
    if events.len() != bytes as usize || crc32fast::hash(&events) != crc || base != base_offset {
        return None;
    }
    Some(StoredBatch {
        base_offset: base,
        count,
        appended_at_ms: at,
        events,
    })
}
