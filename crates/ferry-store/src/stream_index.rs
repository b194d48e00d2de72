//! A partition's domain-stream index: where each append to a stream lies, by (stream,
//! version). The appends since the last checkpoint are in memory; the rest are in immutable
//! sorted files, *runs*, that the checkpoint names and that are merged as they pile up.
//!
//! This is a log-structured merge tree (LevelDB's sorted tables, EventStoreDB's PTables) cut
//! to what a partition needs. An append is never changed, so it lives in exactly one place:
//! the table of recent appends or one run. A stream's version is its last append's. A merge
//! drops appends that retention dropped, but keeps each stream's last one, so versions never
//! repeat. Memory holds the recent appends, each run's top index (one key per 128 blocks of
//! about 4 KiB) and a node-wide cache of blocks ([`IndexCache`]), whatever the index's size.
//!
//! A tiered topic's large runs go to the object store whole ([`StreamIndex::upload_due`]);
//! in their place stays a run file of each stream's last append in them, which is what
//! appends check versions against (the state machine never waits on the store) and tells a
//! read whether the object holds its stream at all. Such runs are merged only once wholly
//! below the low watermark, where that file is all a merge keeps of them.
//!
//! A run file is written in one pass: data blocks (entries `[u16 stream length][stream][u64
//! first version][u64 base offset][u32 count]` sorted by (stream, first version)) and index
//! blocks (per data block its last key, position and length; 128 per index block),
//! interleaved as they fill, then the top index (per index block the same), then a trailer
//! `[u64 top position][u32 top length][u64 entries][u64 data blocks][u64 end][u64 purged
//! below]FERRYSI1` (`end`: past its appends' last offset; `purged below`: the low watermark
//! below which the merge that wrote it forgot appends, 0 for a checkpoint's). A block is
//! `[u32 count][items][u32 CRC-32 of what precedes]`; every length and order is checked when
//! read.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, BinaryHeap};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::durable::fsync;
use crate::positional::read_exact_at;
use crate::{RemoteStore, StoreError};

/// A data block is closed once it holds this many bytes.
const BLOCK_BYTES: usize = 4 * 1024;
/// Data blocks per index block (and so index blocks per top entry).
const FANOUT: u64 = 128;
const MAGIC: &[u8; 8] = b"FERRYSI1";
const TRAILER: u64 = 8 + 4 + 8 + 8 + 8 + 8 + 8;
/// Longest top index read (one pointer per 128 blocks: 64 MiB covers petabytes).
const MAX_TOP: u32 = 64 * 1024 * 1024;
/// Longest block read (a block holds one entry past `BLOCK_BYTES` at most).
const MAX_BLOCK: u32 = 4 * 1024 * 1024;
/// A merge takes runs of one size class once this many are there.
const MERGE_AT: usize = 4;
/// Runs below this many bytes are one size class.
const SMALLEST_CLASS: u64 = 64 * 1024;
/// The wait after a merge failed for a reason other than a damaged run, doubling with each
/// failure in a row up to [`MERGE_RETRY_MAX`].
const MERGE_RETRY_FIRST: Duration = Duration::from_secs(1);
const MERGE_RETRY_MAX: Duration = Duration::from_secs(300);

/// Numbers each opened run within the process: the cache's keys.
static NEXT_UID: AtomicU64 = AtomicU64::new(1);

/// One append to a stream: its events have versions `first_version..` and offsets `base..`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamAppend {
    /// Version of its first event.
    pub first_version: u64,
    /// Offset of its first event.
    pub base: u64,
    /// Events in it (at least one).
    pub count: u32,
}

impl StreamAppend {
    /// Version of its last event.
    pub fn last_version(&self) -> u64 {
        self.first_version + u64::from(self.count) - 1
    }

    /// Offset past its last event.
    pub fn end(&self) -> u64 {
        self.base + u64::from(self.count)
    }
}

/// A run as a checkpoint names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRef {
    /// Its number in the partition: the file is `streams-<id>.run`.
    pub id: u64,
    /// Its length, bytes.
    pub bytes: u64,
    /// Appends it holds.
    pub entries: u64,
    /// For a run in the object store, its object (the file then holds each stream's last
    /// append in it, and `bytes` and `entries` are the file's).
    pub remote: Option<RemoteRunRef>,
}

/// A run's object in the store: the run's file as it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteRunRef {
    /// Its name, random: the key is [`IndexTier::key`] of it.
    pub name: u128,
    /// Its length, bytes.
    pub bytes: u64,
    /// Appends it holds.
    pub entries: u64,
}

/// Where an index keeps runs in the object store.
#[derive(Clone, Debug)]
pub struct IndexTier {
    /// The store.
    pub store: Arc<RemoteStore>,
    /// The keys' prefix (the partition's, say).
    pub prefix: String,
}

impl IndexTier {
    /// The key of the object named `name`.
    pub fn key(&self, name: u128) -> String {
        format!("{}/stream-index/{name:032x}.run", self.prefix)
    }
}

/// Whether two paths name one file.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// The file of run `id` in `dir`.
pub fn run_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("streams-{id:016}.run"))
}

fn run_id(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix("streams-")?
        .strip_suffix(".run")?
        .parse()
        .ok()
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    stream: String,
    append: StreamAppend,
}

impl Entry {
    fn key(&self) -> (&str, u64) {
        (&self.stream, self.append.first_version)
    }
}

/// Where a block lies, with the last key it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pointer {
    stream: String,
    version: u64,
    pos: u64,
    len: u32,
}

impl Pointer {
    fn key(&self) -> (&str, u64) {
        (&self.stream, self.version)
    }
}

enum Block {
    Data(Vec<Entry>),
    Index(Vec<Pointer>),
}

/// Blocks of runs recently read, shared by every partition of a node and bounded in bytes.
pub struct IndexCache {
    blocks: moka::sync::Cache<(u64, u64), Arc<Block>>,
    /// Streams' last appends, by index (its generation) and stream: written only by the
    /// state machine as it appends (or looks a stream up to append), so an entry is always
    /// the stream's last; a new index (a snapshot installed) has a new generation.
    lasts: moka::sync::Cache<(u64, String), StreamAppend>,
}

impl IndexCache {
    /// A cache holding at most about `bytes`: three quarters for blocks, a quarter for
    /// streams' last appends.
    pub fn new(bytes: u64) -> Self {
        Self {
            lasts: moka::sync::Cache::builder()
                .max_capacity(bytes / 4)
                .weigher(|key: &(u64, String), _| 64 + key.1.len() as u32)
                .build(),
            blocks: moka::sync::Cache::builder()
                .max_capacity(bytes - bytes / 4)
                .weigher(|_, block: &Arc<Block>| {
                    let n = match &**block {
                        Block::Data(e) => e.iter().map(|e| 40 + e.stream.len()).sum::<usize>(),
                        Block::Index(p) => p.iter().map(|p| 48 + p.stream.len()).sum::<usize>(),
                    };
                    u32::try_from(n).unwrap_or(u32::MAX)
                })
                .build(),
        }
    }
}

impl Default for IndexCache {
    fn default() -> Self {
        Self::new(64 * 1024 * 1024)
    }
}

fn corrupt(path: &Path, why: impl std::fmt::Display) -> StoreError {
    StoreError::RunCorrupt {
        path: path.to_path_buf(),
        reason: why.to_string(),
    }
}

/// Reads block items from `bytes` (a block without its CRC).
struct Items<'a> {
    rest: &'a [u8],
}

impl<'a> Items<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<String> {
        let n = usize::from(self.u16()?);
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_entry(out: &mut Vec<u8>, e: &Entry) {
    put_string(out, &e.stream);
    out.extend_from_slice(&e.append.first_version.to_be_bytes());
    out.extend_from_slice(&e.append.base.to_be_bytes());
    out.extend_from_slice(&e.append.count.to_be_bytes());
}

fn put_pointer(out: &mut Vec<u8>, p: &Pointer) {
    put_string(out, &p.stream);
    out.extend_from_slice(&p.version.to_be_bytes());
    out.extend_from_slice(&p.pos.to_be_bytes());
    out.extend_from_slice(&p.len.to_be_bytes());
}

/// `[u32 count][items][crc]` from a count and the items' bytes.
fn seal_block(count: u32, items: &[u8]) -> Vec<u8> {
    let mut block = Vec::with_capacity(items.len() + 8);
    block.extend_from_slice(&count.to_be_bytes());
    block.extend_from_slice(items);
    let crc = crc32fast::hash(&block);
    block.extend_from_slice(&crc.to_be_bytes());
    block
}

/// The items of a block read whole, its CRC checked.
fn open_block<'a>(path: &Path, bytes: &'a [u8]) -> Result<(u32, Items<'a>), StoreError> {
    let Some((body, crc)) = bytes.split_last_chunk::<4>() else {
        return Err(corrupt(path, "a block shorter than its checksum"));
    };
    if crc32fast::hash(body) != u32::from_be_bytes(*crc) {
        return Err(corrupt(path, "a block's checksum does not match"));
    }
    let mut items = Items { rest: body };
    let count = items
        .u32()
        .ok_or_else(|| corrupt(path, "a block without its count"))?;
    Ok((count, items))
}

fn decode_data(path: &Path, bytes: &[u8]) -> Result<Vec<Entry>, StoreError> {
    let (count, mut items) = open_block(path, bytes)?;
    let mut entries: Vec<Entry> = Vec::with_capacity(count.min(4096) as usize);
    for _ in 0..count {
        let entry = (|| {
            Some(Entry {
                stream: items.string()?,
                append: StreamAppend {
                    first_version: items.u64()?,
                    base: items.u64()?,
                    count: items.u32()?,
                },
            })
        })()
        .ok_or_else(|| corrupt(path, "a data block ends inside an entry"))?;
        let a = entry.append;
        if a.count == 0
            || a.first_version == 0
            || a.first_version.checked_add(u64::from(a.count)).is_none()
            || a.base.checked_add(u64::from(a.count)).is_none()
        {
            return Err(corrupt(
                path,
                "an entry's versions or offsets are out of range",
            ));
        }
        if entries.last().is_some_and(|last| last.key() >= entry.key()) {
            return Err(corrupt(path, "a data block's entries are out of order"));
        }
        entries.push(entry);
    }
    if !items.rest.is_empty() {
        return Err(corrupt(path, "bytes follow a data block's entries"));
    }
    Ok(entries)
}

fn decode_pointers(path: &Path, bytes: &[u8]) -> Result<Vec<Pointer>, StoreError> {
    let (count, mut items) = open_block(path, bytes)?;
    let mut pointers: Vec<Pointer> = Vec::with_capacity(count.min(4096) as usize);
    for _ in 0..count {
        let pointer = (|| {
            Some(Pointer {
                stream: items.string()?,
                version: items.u64()?,
                pos: items.u64()?,
                len: items.u32()?,
            })
        })()
        .ok_or_else(|| corrupt(path, "an index block ends inside a pointer"))?;
        if pointer.len > MAX_BLOCK || pointer.len < 8 {
            return Err(corrupt(path, "a block's length is out of range"));
        }
        if pointers
            .last()
            .is_some_and(|last| last.key() >= pointer.key())
        {
            return Err(corrupt(path, "an index block's keys are out of order"));
        }
        pointers.push(pointer);
    }
    if !items.rest.is_empty() {
        return Err(corrupt(path, "bytes follow an index block's pointers"));
    }
    Ok(pointers)
}

/// Writes a run in one pass from entries in key order.
struct RunWriter {
    path: PathBuf,
    file: BufWriter<File>,
    pos: u64,
    data: Vec<u8>,
    data_count: u32,
    last: Option<(String, u64)>,
    index: Vec<u8>,
    index_count: u32,
    top: Vec<Pointer>,
    entries: u64,
    data_blocks: u64,
    end: u64,
}

impl RunWriter {
    fn create(path: &Path) -> Result<Self, StoreError> {
        let file = File::create(path).map_err(|e| StoreError::io(path.display().to_string(), e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file: BufWriter::with_capacity(1 << 16, file),
            pos: 0,
            data: Vec::with_capacity(BLOCK_BYTES + 256),
            data_count: 0,
            last: None,
            index: Vec::new(),
            index_count: 0,
            top: Vec::new(),
            entries: 0,
            data_blocks: 0,
            end: 0,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(u64, u32), StoreError> {
        self.file
            .write_all(bytes)
            .map_err(|e| StoreError::io(self.path.display().to_string(), e))?;
        let at = self.pos;
        self.pos += bytes.len() as u64;
        Ok((at, bytes.len() as u32))
    }

    fn push(&mut self, entry: &Entry) -> Result<(), StoreError> {
        if self
            .last
            .as_ref()
            .is_some_and(|(s, v)| (s.as_str(), *v) >= entry.key())
        {
            return Err(corrupt(&self.path, "entries written out of order"));
        }
        if entry.stream.len() > usize::from(u16::MAX) {
            return Err(corrupt(&self.path, "a stream name longer than 65535 bytes"));
        }
        put_entry(&mut self.data, entry);
        self.end = self.end.max(entry.append.end());
        self.data_count += 1;
        self.entries += 1;
        self.last = Some((entry.stream.clone(), entry.append.first_version));
        if self.data.len() >= BLOCK_BYTES {
            self.close_data()?;
        }
        Ok(())
    }

    fn close_data(&mut self) -> Result<(), StoreError> {
        if self.data_count == 0 {
            return Ok(());
        }
        let (data, count) = (
            std::mem::take(&mut self.data),
            std::mem::take(&mut self.data_count),
        );
        let pointer = self.write_block(count, &data)?;
        self.data = data;
        self.data.clear();
        put_pointer(&mut self.index, &pointer);
        self.index_count += 1;
        self.data_blocks += 1;
        if u64::from(self.index_count) == FANOUT {
            self.close_index()?;
        }
        Ok(())
    }

    fn close_index(&mut self) -> Result<(), StoreError> {
        if self.index_count == 0 {
            return Ok(());
        }
        let (index, count) = (
            std::mem::take(&mut self.index),
            std::mem::take(&mut self.index_count),
        );
        let pointer = self.write_block(count, &index)?;
        self.index = index;
        self.index.clear();
        self.top.push(pointer);
        Ok(())
    }

    /// Writes `count` encoded items as one sealed block: a pointer to it under the last key
    /// written so far (the largest it covers).
    fn write_block(&mut self, count: u32, items: &[u8]) -> Result<Pointer, StoreError> {
        let (pos, len) = self.write(&seal_block(count, items))?;
        let (stream, version) = self.last.clone().unwrap_or_default();
        Ok(Pointer {
            stream,
            version,
            pos,
            len,
        })
    }

    /// Writes the rest and the trailer (not synced): the run's reference.
    fn finish(mut self, id: u64, purged_below: u64) -> Result<RunRef, StoreError> {
        self.close_data()?;
        self.close_index()?;
        let mut top = Vec::new();
        for p in &self.top {
            put_pointer(&mut top, p);
        }
        let top = seal_block(self.top.len() as u32, &top);
        let (top_pos, top_len) = self.write(&top)?;
        let mut trailer = Vec::with_capacity(TRAILER as usize);
        trailer.extend_from_slice(&top_pos.to_be_bytes());
        trailer.extend_from_slice(&top_len.to_be_bytes());
        trailer.extend_from_slice(&self.entries.to_be_bytes());
        trailer.extend_from_slice(&self.data_blocks.to_be_bytes());
        trailer.extend_from_slice(&self.end.to_be_bytes());
        trailer.extend_from_slice(&purged_below.to_be_bytes());
        trailer.extend_from_slice(MAGIC);
        self.write(&trailer)?;
        self.file
            .flush()
            .map_err(|e| StoreError::io(self.path.display().to_string(), e))?;
        Ok(RunRef {
            id,
            bytes: self.pos,
            entries: self.entries,
            remote: None,
        })
    }
}

/// Where a table's bytes are.
enum Source {
    File(File),
    Remote {
        store: Arc<RemoteStore>,
        key: String,
    },
}

impl Source {
    /// `len` bytes at `pos` (`name` is the file or object, for errors). An object is read
    /// from a blocking thread: see [`RemoteStore::get_range_blocking`].
    fn read(&self, name: &Path, pos: u64, len: u32) -> Result<Vec<u8>, StoreError> {
        match self {
            Source::File(file) => read_exact_at(file, len as usize, pos)
                .map_err(|e| StoreError::io(name.display().to_string(), e)),
            Source::Remote { store, key } => {
                let bytes = store.get_range_blocking(key, pos..pos + u64::from(len))?;
                if bytes.len() != len as usize {
                    return Err(corrupt(name, "the object is shorter than recorded"));
                }
                Ok(bytes.to_vec())
            }
        }
    }
}

/// A place in a table: data block `block`, entry `at` of it.
#[derive(Debug, Clone, Copy)]
struct Place {
    block: u64,
    at: usize,
}

/// Entries in the run format, open for reading: a run's file or its object in the store.
struct Table {
    /// The cache's key for its blocks.
    uid: u64,
    source: Source,
    /// The file or the object, for errors.
    name: PathBuf,
    size: u64,
    entries: u64,
    data_blocks: u64,
    /// Past the last offset of its appends.
    end: u64,
    /// The low watermark below which the merge that wrote it forgot appends (0: none).
    purged_below: u64,
    top: Vec<Pointer>,
}

impl Table {
    /// Opens the table of `size` bytes and `entries` entries (as recorded) at `source`,
    /// checking its trailer and top index.
    fn open(source: Source, name: PathBuf, size: u64, entries: u64) -> Result<Self, StoreError> {
        if size < TRAILER {
            return Err(corrupt(&name, "shorter than its trailer"));
        }
        let trailer = source.read(&name, size - TRAILER, TRAILER as u32)?;
        let mut items = Items { rest: &trailer };
        let (top_pos, top_len, recorded, data_blocks, end, purged_below) = (|| {
            Some((
                items.u64()?,
                items.u32()?,
                items.u64()?,
                items.u64()?,
                items.u64()?,
                items.u64()?,
            ))
        })()
        .ok_or_else(|| corrupt(&name, "a short trailer"))?;
        if items.rest != MAGIC {
            return Err(corrupt(&name, "not a stream index run"));
        }
        if top_pos.checked_add(u64::from(top_len)) != Some(size - TRAILER)
            || recorded != entries
            || top_len > MAX_TOP
        {
            return Err(corrupt(
                &name,
                "its trailer does not match its length or entries",
            ));
        }
        let top_bytes = source.read(&name, top_pos, top_len)?;
        let top = decode_pointers(&name, &top_bytes)?;
        if (top.len() as u64) != data_blocks.div_ceil(FANOUT) {
            return Err(corrupt(&name, "its top index does not match its blocks"));
        }
        Ok(Self {
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            source,
            name,
            size,
            entries,
            data_blocks,
            end,
            purged_below,
            top,
        })
    }

    fn read(&self, pointer: &Pointer) -> Result<Vec<u8>, StoreError> {
        if pointer.pos.saturating_add(u64::from(pointer.len)) > self.size {
            return Err(corrupt(&self.name, "a block lies past the end"));
        }
        self.source.read(&self.name, pointer.pos, pointer.len)
    }

    fn index_block(&self, i: usize, cache: &IndexCache) -> Result<Arc<Block>, StoreError> {
        let pointer = self
            .top
            .get(i)
            .ok_or_else(|| corrupt(&self.name, "a block past its top index"))?;
        if let Some(block) = cache.blocks.get(&(self.uid, pointer.pos)) {
            return Ok(block);
        }
        let pointers = decode_pointers(&self.name, &self.read(pointer)?)?;
        // Every index block but the last holds FANOUT pointers; the last, the rest.
        let expected = (self.data_blocks - i as u64 * FANOUT).min(FANOUT);
        if pointers.len() as u64 != expected
            || pointers.last().map(Pointer::key) != Some(pointer.key())
        {
            return Err(corrupt(
                &self.name,
                "an index block does not match the top index",
            ));
        }
        let block = Arc::new(Block::Index(pointers));
        cache.blocks.insert((self.uid, pointer.pos), block.clone());
        Ok(block)
    }

    fn pointer(&self, block: u64, cache: &IndexCache) -> Result<Pointer, StoreError> {
        let i = (block / FANOUT) as usize;
        let index = self.index_block(i, cache)?;
        let Block::Index(pointers) = &*index else {
            return Err(corrupt(&self.name, "an index block cached as data"));
        };
        pointers
            .get((block % FANOUT) as usize)
            .cloned()
            .ok_or_else(|| corrupt(&self.name, "an index block lacks a data block"))
    }

    fn data_block(&self, block: u64, cache: &IndexCache) -> Result<Arc<Block>, StoreError> {
        let pointer = self.pointer(block, cache)?;
        if let Some(block) = cache.blocks.get(&(self.uid, pointer.pos)) {
            return Ok(block);
        }
        let entries = self.decode_data_at(&pointer)?;
        let block = Arc::new(Block::Data(entries));
        cache.blocks.insert((self.uid, pointer.pos), block.clone());
        Ok(block)
    }

    fn decode_data_at(&self, pointer: &Pointer) -> Result<Vec<Entry>, StoreError> {
        let entries = decode_data(&self.name, &self.read(pointer)?)?;
        if entries.is_empty() || entries.last().map(Entry::key) != Some(pointer.key()) {
            return Err(corrupt(&self.name, "a data block does not match its index"));
        }
        Ok(entries)
    }

    /// The first place whose key is at or after `key` (`block == data_blocks`: none).
    fn seek(&self, key: (&str, u64), cache: &IndexCache) -> Result<Place, StoreError> {
        let i = self.top.partition_point(|p| p.key() < key);
        if i == self.top.len() {
            return Ok(Place {
                block: self.data_blocks,
                at: 0,
            });
        }
        let index = self.index_block(i, cache)?;
        let Block::Index(pointers) = &*index else {
            return Err(corrupt(&self.name, "an index block cached as data"));
        };
        let j = pointers.partition_point(|p| p.key() < key);
        let block = i as u64 * FANOUT + j as u64;
        let data = self.data_block(block, cache)?;
        let Block::Data(entries) = &*data else {
            return Err(corrupt(&self.name, "a data block cached as index"));
        };
        Ok(Place {
            block,
            at: entries.partition_point(|e| e.key() < key),
        })
    }

    /// The entry just before `place`, if any.
    fn before(&self, place: Place, cache: &IndexCache) -> Result<Option<Entry>, StoreError> {
        let (block, at) = match place.at {
            0 if place.block == 0 => return Ok(None),
            0 => (place.block - 1, None),
            at => (place.block, Some(at - 1)),
        };
        let data = self.data_block(block, cache)?;
        let Block::Data(entries) = &*data else {
            return Err(corrupt(&self.name, "a data block cached as index"));
        };
        Ok(match at {
            Some(at) => entries.get(at).cloned(),
            None => entries.last().cloned(),
        })
    }

    /// The last append to `stream` held here.
    fn last_of(
        &self,
        stream: &str,
        cache: &IndexCache,
    ) -> Result<Option<StreamAppend>, StoreError> {
        let place = self.seek((stream, u64::MAX), cache)?;
        Ok(self
            .before(place, cache)?
            .filter(|e| e.stream == stream)
            .map(|e| e.append))
    }

    /// Up to `limit` appends to `stream` holding versions at or after `from_version`, in
    /// order.
    fn appends_from(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
        cache: &IndexCache,
    ) -> Result<Vec<StreamAppend>, StoreError> {
        let mut place = self.seek((stream, from_version), cache)?;
        let mut out = Vec::new();
        if let Some(e) = self.before(place, cache)? {
            if e.stream == stream && e.append.last_version() >= from_version {
                out.push(e.append);
            }
        }
        while out.len() < limit && place.block < self.data_blocks {
            let data = self.data_block(place.block, cache)?;
            let Block::Data(entries) = &*data else {
                return Err(corrupt(&self.name, "a data block cached as index"));
            };
            for e in &entries[place.at.min(entries.len())..] {
                if e.stream != stream || out.len() >= limit {
                    return Ok(out);
                }
                out.push(e.append);
            }
            place = Place {
                block: place.block + 1,
                at: 0,
            };
        }
        Ok(out)
    }

    /// The first append to `stream` held here that ends past `offset`: a binary search over
    /// the blocks holding the stream (its offsets grow with its versions).
    fn first_ending_after(
        &self,
        stream: &str,
        offset: u64,
        cache: &IndexCache,
    ) -> Result<Option<StreamAppend>, StoreError> {
        let first = self.seek((stream, 0), cache)?.block;
        if first >= self.data_blocks {
            return Ok(None);
        }
        let last = self
            .seek((stream, u64::MAX), cache)?
            .block
            .min(self.data_blocks.saturating_sub(1));
        let (mut lo, mut hi) = (first, last + 1);
        let of_stream = |block: u64| -> Result<Vec<StreamAppend>, StoreError> {
            let data = self.data_block(block, cache)?;
            let Block::Data(entries) = &*data else {
                return Err(corrupt(&self.name, "a data block cached as index"));
            };
            Ok(entries
                .iter()
                .filter(|e| e.stream == stream)
                .map(|e| e.append)
                .collect())
        };
        // The first block whose appends to the stream end past `offset` (or hold none).
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if of_stream(mid)?.last().is_none_or(|a| a.end() > offset) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        if lo > last {
            return Ok(None);
        }
        Ok(of_stream(lo)?.into_iter().find(|a| a.end() > offset))
    }

    /// Every entry, in order, its data blocks read past the cache (for merges and checks).
    fn scan<'a>(&'a self, cache: &'a IndexCache) -> RunScan<'a> {
        RunScan {
            run: self,
            cache,
            block: 0,
            entries: Vec::new().into_iter(),
        }
    }

    /// Reads every block, checking checksums, order and counts.
    fn verify(&self, cache: &IndexCache) -> Result<(), StoreError> {
        let mut count = 0u64;
        let mut last: Option<(String, u64)> = None;
        for entry in self.scan(cache) {
            let entry = entry?;
            if last
                .as_ref()
                .is_some_and(|(s, v)| (s.as_str(), *v) >= entry.key())
            {
                return Err(corrupt(&self.name, "entries out of order across blocks"));
            }
            last = Some((entry.stream.clone(), entry.append.first_version));
            count += 1;
        }
        if count != self.entries {
            return Err(corrupt(
                &self.name,
                format!("{count} entries, its trailer says {}", self.entries),
            ));
        }
        Ok(())
    }
}

/// An immutable run, open for reading: a file, or an object in the store with a file that
/// holds each stream's last append in it.
pub struct Run {
    reference: RunRef,
    path: PathBuf,
    /// Its file: the whole run, or for a run in the store each stream's last append in it
    /// (what appends and their version checks need, and which streams it holds at all).
    local: Table,
    /// For a run in the store: its object, opened by the first read that needs it.
    remote: Option<RemoteRun>,
}

struct RemoteRun {
    /// The store and the object's key (none on a node without a tier for the index: its
    /// file still serves appends, reads of the object fail).
    object: Option<(Arc<RemoteStore>, String)>,
    reference: RemoteRunRef,
    table: OnceLock<Table>,
}

impl Run {
    /// Opens run `reference` in `dir`, checking its file's length, trailer and top index
    /// (a run in the store is read through `tier`, not yet; without one only its file
    /// serves).
    fn open(dir: &Path, reference: RunRef, tier: Option<&IndexTier>) -> Result<Self, StoreError> {
        let path = run_path(dir, reference.id);
        let file = File::open(&path).map_err(|e| StoreError::io(path.display().to_string(), e))?;
        let len = file
            .metadata()
            .map_err(|e| StoreError::io(path.display().to_string(), e))?
            .len();
        if len != reference.bytes {
            return Err(corrupt(
                &path,
                format!(
                    "{len} bytes, but the checkpoint recorded {}",
                    reference.bytes
                ),
            ));
        }
        let local = Table::open(
            Source::File(file),
            path.clone(),
            reference.bytes,
            reference.entries,
        )?;
        let remote = reference.remote.map(|remote| RemoteRun {
            object: tier.map(|tier| (tier.store.clone(), tier.key(remote.name))),
            reference: remote,
            table: OnceLock::new(),
        });
        Ok(Self {
            reference,
            path,
            local,
            remote,
        })
    }

    /// What a checkpoint records of it.
    pub fn reference(&self) -> RunRef {
        self.reference
    }

    /// Past the last offset of its appends.
    fn end(&self) -> u64 {
        self.local.end
    }

    /// The low watermark below which the merge that wrote it forgot appends (0: none).
    fn purged_below(&self) -> u64 {
        self.local.purged_below
    }

    /// The whole run: its file, or its object (opened now if it was not).
    fn whole(&self) -> Result<&Table, StoreError> {
        let Some(remote) = &self.remote else {
            return Ok(&self.local);
        };
        if let Some(table) = remote.table.get() {
            return Ok(table);
        }
        let Some((store, key)) = &remote.object else {
            return Err(StoreError::io(
                self.path.display().to_string(),
                "the run is in the object store, and this node has no [tier] for it",
            ));
        };
        let name = PathBuf::from(key);
        let table = Table::open(
            Source::Remote {
                store: store.clone(),
                key: key.clone(),
            },
            name.clone(),
            remote.reference.bytes,
            remote.reference.entries,
        )?;
        if (table.end, table.purged_below) != (self.local.end, self.local.purged_below) {
            return Err(corrupt(&name, "the object does not match its run's file"));
        }
        Ok(remote.table.get_or_init(|| table))
    }

    /// The last append to `stream` held here (from its file, whether or not the run is in
    /// the store).
    fn last_of(
        &self,
        stream: &str,
        cache: &IndexCache,
    ) -> Result<Option<StreamAppend>, StoreError> {
        self.local.last_of(stream, cache)
    }

    /// Up to `limit` appends to `stream` holding versions at or after `from_version`, in
    /// order; of a run in the store, only its last one unless `whole` (which reads the
    /// object).
    fn appends_from(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
        whole: bool,
        cache: &IndexCache,
    ) -> Result<Vec<StreamAppend>, StoreError> {
        if self.remote.is_some() {
            // Its file holds each stream's last append here: with none at or past
            // `from_version`, the object holds none either.
            let held = self
                .local
                .last_of(stream, cache)?
                .is_some_and(|last| last.last_version() >= from_version);
            if !held || !whole {
                return self.local.appends_from(stream, from_version, limit, cache);
            }
        }
        self.whole()?
            .appends_from(stream, from_version, limit, cache)
    }

    /// The first append to `stream` held here that ends past `offset`; of a run in the
    /// store, only its last one unless `whole` (which reads the object).
    fn first_ending_after(
        &self,
        stream: &str,
        offset: u64,
        whole: bool,
        cache: &IndexCache,
    ) -> Result<Option<StreamAppend>, StoreError> {
        if self.end() <= offset {
            return Ok(None);
        }
        if self.remote.is_some() {
            let last = self.local.last_of(stream, cache)?;
            if !whole || last.is_none_or(|last| last.end() <= offset) {
                return Ok(last.filter(|last| last.end() > offset));
            }
        }
        self.whole()?.first_ending_after(stream, offset, cache)
    }

    /// Every entry of its file, in order, its data blocks read past the cache (for merges:
    /// a run in the store is merged only once wholly below the low watermark, where its
    /// streams' last appends are all a merge keeps of it).
    fn scan<'a>(&'a self, cache: &'a IndexCache) -> RunScan<'a> {
        self.local.scan(cache)
    }

    /// Reads every block of its file, checking checksums, order and counts.
    pub fn verify(&self, cache: &IndexCache) -> Result<(), StoreError> {
        self.local.verify(cache)
    }

    /// Whether it is in the object store.
    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// The run's file, for sending it whole (of a run in the store, its streams' last
    /// appends: the object is not sent).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A run's entries in order.
struct RunScan<'a> {
    run: &'a Table,
    cache: &'a IndexCache,
    block: u64,
    entries: std::vec::IntoIter<Entry>,
}

impl Iterator for RunScan<'_> {
    type Item = Result<Entry, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(e) = self.entries.next() {
                return Some(Ok(e));
            }
            if self.block >= self.run.data_blocks {
                return None;
            }
            let entries = self
                .run
                .pointer(self.block, self.cache)
                .and_then(|p| self.run.decode_data_at(&p));
            self.block += 1;
            match entries {
                Ok(entries) => self.entries = entries.into_iter(),
                Err(e) => {
                    self.block = self.run.data_blocks;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// What a reader of one stream needs, taken under the index's lock and used without it.
pub struct StreamReader {
    stream: String,
    /// The stream's appends since the last checkpoint.
    recent: Vec<StreamAppend>,
    /// Its last append, if the cache knew it when the reader was taken.
    last_known: Option<StreamAppend>,
    runs: Vec<Arc<Run>>,
    cache: Arc<IndexCache>,
    generation: u64,
    /// Whether a last append found in the runs goes into the cache (the state machine's
    /// readers only: see [`IndexCache`]).
    remember: bool,
    /// Whether it reads runs in the object store whole (a reader's), or only their files,
    /// which hold each stream's last append in them (the state machine's: it must not wait
    /// on the store).
    whole: bool,
}

impl StreamReader {
    /// The stream's version: its last append's last version (0: no append).
    pub fn version(&self) -> Result<u64, StoreError> {
        if let Some(last) = self.recent.last().or(self.last_known.as_ref()) {
            return Ok(last.last_version());
        }
        let mut found: Option<StreamAppend> = None;
        for run in &self.runs {
            if let Some(last) = run.last_of(&self.stream, &self.cache)? {
                if found.is_none_or(|f| last.first_version > f.first_version) {
                    found = Some(last);
                }
            }
        }
        if let (Some(last), true) = (found, self.remember) {
            self.cache
                .lasts
                .insert((self.generation, self.stream.clone()), last);
        }
        Ok(found.map_or(0, |a| a.last_version()))
    }

    /// The stream's version as of the appends below offset `high`, for a `high` read after
    /// this reader was taken (the runs then hold only appends below it).
    pub fn version_below(&self, high: u64) -> Result<u64, StoreError> {
        match self.recent.iter().position(|a| a.base >= high) {
            // Runs hold what was applied before the recent appends.
            Some(0) => Ok(self.recent[0].first_version - 1),
            Some(i) => Ok(self.recent[i - 1].last_version()),
            None => self.version(),
        }
    }

    /// Up to `limit` appends holding versions at or after `from_version`, in order.
    pub fn appends_from(
        &self,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<StreamAppend>, StoreError> {
        let mut all = Vec::new();
        for run in &self.runs {
            all.extend(run.appends_from(
                &self.stream,
                from_version,
                limit,
                self.whole,
                &self.cache,
            )?);
        }
        all.extend(
            self.recent
                .iter()
                .filter(|a| a.last_version() >= from_version)
                .take(limit),
        );
        all.sort_unstable_by_key(|a| a.first_version);
        all.truncate(limit);
        Ok(all)
    }

    /// The stream's first append that ends past `offset`, if it is held.
    pub fn first_ending_after(&self, offset: u64) -> Result<Option<StreamAppend>, StoreError> {
        let mut first = self.recent.iter().find(|a| a.end() > offset).copied();
        for run in &self.runs {
            if let Some(a) =
                run.first_ending_after(&self.stream, offset, self.whole, &self.cache)?
            {
                if first.is_none_or(|f| a.first_version < f.first_version) {
                    first = Some(a);
                }
            }
        }
        Ok(first)
    }

    /// The append to the stream at offset `base`, if it is held (by the state machine's
    /// reader: if it is held on this node's disk, or is the last of its run in the store).
    pub fn find_base(&self, base: u64) -> Result<Option<StreamAppend>, StoreError> {
        Ok(self.first_ending_after(base)?.filter(|a| a.base == base))
    }

    /// Whether it reads runs in the object store (then only from a thread that may block).
    pub fn reads_remote(&self) -> bool {
        self.whole && self.runs.iter().any(|run| run.is_remote())
    }

    /// Whether a run in the object store may hold an append of the stream at `offset` that
    /// the state machine's reader cannot see.
    pub fn may_hold_remotely(&self, offset: u64) -> Result<bool, StoreError> {
        for run in self.runs.iter().filter(|run| run.is_remote()) {
            // The stream's last append there ends past `offset`: an earlier one may be at it
            // (none can in a run that ends at or before it).
            if run.end() <= offset {
                continue;
            }
            let last = run.last_of(&self.stream, &self.cache)?;
            if last.is_some_and(|last| last.end() > offset) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// The runs a checkpoint names and the files it must sync first.
pub struct IndexCheckpoint {
    /// Every run, for the checkpoint.
    pub runs: Vec<RunRef>,
    /// Runs written since they were last synced (with their folder).
    pub to_sync: Vec<PathBuf>,
}

/// Whether an index has a merge under way; cleared when its plan or result is dropped,
/// however the merge ends (a panic included).
struct MergeGuard(Arc<AtomicBool>);

impl Drop for MergeGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A merge to run without the index's lock: its inputs, and the output's number.
pub struct MergePlan {
    inputs: Vec<Arc<Run>>,
    id: u64,
    dir: PathBuf,
    cache: Arc<IndexCache>,
    /// The index it was planned by: only that one installs it.
    generation: u64,
    guard: MergeGuard,
}

/// Sets `backoff` to a delay from now: 1 s after a first failure, doubling with each in a
/// row up to 5 min.
fn back_off(backoff: &mut Option<(Instant, Duration)>) {
    let delay = backoff.map_or(MERGE_RETRY_FIRST, |(_, last)| {
        (last * 2).min(MERGE_RETRY_MAX)
    });
    *backoff = Some((Instant::now() + delay, delay));
}

/// An upload of a run to the object store, to run without the index's lock.
pub struct UploadPlan {
    input: Arc<Run>,
    /// The number of the run it becomes.
    id: u64,
    /// The object's name.
    name: u128,
    dir: PathBuf,
    cache: Arc<IndexCache>,
    tier: IndexTier,
    generation: u64,
    guard: MergeGuard,
}

impl UploadPlan {
    /// The index that planned it and the run it uploads (as [`MergePlan::inputs`]).
    pub fn inputs(&self) -> (u64, Vec<u64>) {
        (self.generation, vec![self.input.reference.id])
    }

    /// Uploads the run's file whole, then writes the file of the run it becomes (each
    /// stream's last append in it, synced): to install with [`StreamIndex::install_merge`].
    pub async fn run(self) -> Result<Merged, StoreError> {
        let input = self.input.clone();
        let bytes = tokio::fs::read(&input.path)
            .await
            .map_err(|e| StoreError::io(input.path.display().to_string(), e))?;
        if bytes.len() as u64 != input.reference.bytes {
            return Err(corrupt(&input.path, "its length changed"));
        }
        let key = self.tier.key(self.name);
        self.tier.store.put(&key, bytes::Bytes::from(bytes)).await?;
        let file = Unfinished(self.dir.join(format!(
            "streams-{:016}.merging-{}",
            self.id, self.generation
        )));
        let (id, cache) = (self.id, self.cache.clone());
        let remote = RemoteRunRef {
            name: self.name,
            bytes: input.reference.bytes,
            entries: input.reference.entries,
        };
        let written = tokio::task::spawn_blocking(move || {
            // Each stream's last append: what a merge purging everything keeps.
            let purged_below = input.purged_below();
            let lasts = write_merged(&[input], &cache, &file.0, id, u64::MAX, purged_below);
            (lasts, file)
        })
        .await;
        let written = written
            .map_err(|e| StoreError::io(key.clone(), e))
            .and_then(|(lasts, file)| {
                let local =
                    lasts?.ok_or_else(|| corrupt(&self.input.path, "it holds no appends"))?;
                Ok((local, file))
            });
        let (local, file) = match written {
            Ok(written) => written,
            Err(e) => {
                // No run will name the object.
                if let Err(e) = self.tier.store.delete(&key).await {
                    tracing::warn!(%key, error = %e, "deleting a stream index run's object failed; it is left over");
                }
                return Err(e);
            }
        };
        Ok(Merged {
            inputs: vec![self.input],
            output: Some((
                RunRef {
                    remote: Some(remote),
                    ..local
                },
                file,
            )),
            generation: self.generation,
            _guard: self.guard,
        })
    }
}

/// A merge's output, to install with [`StreamIndex::install_merge`].
pub struct Merged {
    inputs: Vec<Arc<Run>>,
    /// Its reference and the file it was written to (linked into place on install).
    output: Option<(RunRef, Unfinished)>,
    generation: u64,
    _guard: MergeGuard,
}

/// A merge's file under its own name: removed when dropped, however the merge ends (an
/// installed merge linked it under the run's name first).
struct Unfinished(PathBuf);

impl Drop for Unfinished {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl MergePlan {
    /// The file the merge writes, linked to the run's name when installed: unique to the
    /// index that planned it, so a merge outliving its index (a snapshot installed, a group
    /// reopened) cannot touch another's runs.
    fn writing(&self) -> PathBuf {
        self.dir.join(format!(
            "streams-{:016}.merging-{}",
            self.id, self.generation
        ))
    }

    /// Merges the inputs into one synced file, leaving out appends wholly below `low` except
    /// each stream's last (which holds its version).
    pub fn run(self, low: u64) -> Result<Merged, StoreError> {
        let file = Unfinished(self.writing());
        let output = write_merged(&self.inputs, &self.cache, &file.0, self.id, low, low)?;
        Ok(Merged {
            inputs: self.inputs,
            output: output.map(|r| (r, file)),
            generation: self.generation,
            _guard: self.guard,
        })
    }

    /// The index that planned it and the runs it merges.
    pub fn inputs(&self) -> (u64, Vec<u64>) {
        (
            self.generation,
            self.inputs.iter().map(|r| r.reference.id).collect(),
        )
    }
}

/// Writes the entries of `inputs` merged into one synced file at `path` as run `id`,
/// leaving out appends wholly below `low` except each stream's last (which holds its
/// version); its trailer says it was purged below `purged_below`. None if nothing is left.
fn write_merged(
    inputs: &[Arc<Run>],
    cache: &IndexCache,
    path: &Path,
    id: u64,
    low: u64,
    purged_below: u64,
) -> Result<Option<RunRef>, StoreError> {
    struct Head {
        entry: Entry,
        input: usize,
    }
    impl PartialEq for Head {
        fn eq(&self, other: &Self) -> bool {
            self.entry.key() == other.entry.key()
        }
    }
    impl Eq for Head {}
    impl PartialOrd for Head {
        fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
            Some(self.cmp(other))
        }
    }
    impl Ord for Head {
        // Smallest key first out of the max-heap.
        fn cmp(&self, other: &Self) -> CmpOrdering {
            other.entry.key().cmp(&self.entry.key())
        }
    }
    let mut writer = RunWriter::create(path)?;
    let mut scans: Vec<RunScan<'_>> = inputs.iter().map(|r| r.scan(cache)).collect();
    let mut heap = BinaryHeap::new();
    for (input, scan) in scans.iter_mut().enumerate() {
        if let Some(entry) = scan.next() {
            heap.push(Head {
                entry: entry?,
                input,
            });
        }
    }
    let mut held: Option<Entry> = None;
    while let Some(Head { entry, input }) = heap.pop() {
        if let Some(next) = scans[input].next() {
            heap.push(Head {
                entry: next?,
                input,
            });
        }
        if let Some(prev) = held.take() {
            if prev.append.end() > low || prev.stream != entry.stream {
                writer.push(&prev)?;
            }
        }
        held = Some(entry);
    }
    if let Some(last) = held {
        writer.push(&last)?;
    }
    let reference = writer.finish(id, purged_below)?;
    if reference.entries == 0 {
        return Ok(None);
    }
    fsync(path)?;
    Ok(Some(reference))
}

/// A partition's stream index (see the module's documentation).
pub struct StreamIndex {
    dir: PathBuf,
    cache: Arc<IndexCache>,
    /// Where runs go into the object store, if they do.
    tier: Option<IndexTier>,
    /// Keys of objects of runs merged away that no checkpoint names any more: for the
    /// owner to delete ([`StreamIndex::take_remote_garbage`]).
    remote_garbage: Vec<String>,
    /// Appends since the last checkpoint, by (stream, first version).
    recent: BTreeMap<(String, u64), (u64, u32)>,
    /// Runs by number.
    runs: BTreeMap<u64, Arc<Run>>,
    /// Runs written but not yet synced.
    unsynced: Vec<u64>,
    /// Runs merged away: their files go once a checkpoint no longer names them.
    retired: Vec<Arc<Run>>,
    next_id: u64,
    /// Damaged runs a merge failed on (not merged again by this index).
    unmergeable: Vec<u64>,
    /// After a merge failed for another reason (say, a full disk), no merge is planned
    /// before this time; the delay doubles with each failure in a row.
    merge_backoff: Option<(Instant, Duration)>,
    /// The same for uploads (the store down does not hold merges off).
    upload_backoff: Option<(Instant, Duration)>,
    /// Numbers this index among those of the process (merges belong to one).
    generation: u64,
    merging: Arc<AtomicBool>,
    /// Whether an upload is under way (one at a time, beside merges).
    uploading: Arc<AtomicBool>,
}

impl StreamIndex {
    /// An empty index keeping its runs in `dir` (and large ones in `tier`, if given),
    /// touching nothing there yet.
    pub fn empty(dir: &Path, cache: Arc<IndexCache>, tier: Option<IndexTier>) -> Self {
        Self {
            dir: dir.to_path_buf(),
            cache,
            tier,
            remote_garbage: Vec::new(),
            recent: BTreeMap::new(),
            runs: BTreeMap::new(),
            unsynced: Vec::new(),
            retired: Vec::new(),
            next_id: 1,
            unmergeable: Vec::new(),
            merge_backoff: None,
            upload_backoff: None,
            generation: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            merging: Arc::new(AtomicBool::new(false)),
            uploading: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The index of the runs `named` in `dir` (a checkpoint's); other run files there are
    /// removed (written after that checkpoint, or merged away before it).
    pub fn open(
        dir: &Path,
        named: &[RunRef],
        cache: Arc<IndexCache>,
        tier: Option<IndexTier>,
    ) -> Result<Self, StoreError> {
        let io = |e: std::io::Error| StoreError::io(dir.display().to_string(), e);
        let mut index = Self::empty(dir, cache, tier);
        if dir.exists() {
            for item in std::fs::read_dir(dir).map_err(io)? {
                let path = item.map_err(io)?.path();
                let unfinished = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("streams-") && n.contains(".merging-"));
                if unfinished || run_id(&path).is_some_and(|id| !named.iter().any(|r| r.id == id)) {
                    std::fs::remove_file(&path).map_err(io)?;
                }
            }
        }
        for reference in named {
            let run = Run::open(dir, *reference, index.tier.as_ref())?;
            index.runs.insert(reference.id, Arc::new(run));
            let next = reference.id.checked_add(1).ok_or_else(|| {
                corrupt(&run_path(dir, reference.id), "its number is out of range")
            })?;
            index.next_id = index.next_id.max(next);
        }
        Ok(index)
    }

    /// Records an append (the state machine's, in version order per stream).
    pub fn append(&mut self, stream: String, append: StreamAppend) {
        self.cache
            .lasts
            .insert((self.generation, stream.clone()), append);
        self.recent
            .insert((stream, append.first_version), (append.base, append.count));
    }

    /// The cache it reads through.
    pub fn cache(&self) -> Arc<IndexCache> {
        self.cache.clone()
    }

    /// Where it puts runs in the object store, if it does.
    pub fn tier(&self) -> Option<IndexTier> {
        self.tier.clone()
    }

    /// A reader of `stream` for the state machine (its only writer), which caches the
    /// stream's last append when it looks it up, and never reads the object store.
    pub fn writer_reader(&self, stream: &str) -> StreamReader {
        StreamReader {
            remember: true,
            whole: false,
            ..self.reader(stream)
        }
    }

    /// A reader of `stream` as of now. Where the index has runs in the object store, its
    /// reads may read them: call it from a thread that may block.
    pub fn reader(&self, stream: &str) -> StreamReader {
        let recent = self
            .recent
            .range((stream.to_string(), 0)..=(stream.to_string(), u64::MAX))
            .map(|((_, first_version), (base, count))| StreamAppend {
                first_version: *first_version,
                base: *base,
                count: *count,
            })
            .collect();
        StreamReader {
            stream: stream.to_string(),
            recent,
            last_known: self.cache.lasts.get(&(self.generation, stream.to_string())),
            runs: self.runs.values().cloned().collect(),
            cache: self.cache.clone(),
            generation: self.generation,
            remember: false,
            whole: true,
        }
    }

    /// Writes the recent appends into a new run (not synced) and names every run: what a
    /// checkpoint taken now records, and the files it must sync first.
    pub fn checkpoint(&mut self) -> Result<IndexCheckpoint, StoreError> {
        if !self.recent.is_empty() {
            // Created durably with the batch files (here only for an index on its own).
            std::fs::create_dir_all(&self.dir)
                .map_err(|e| StoreError::io(self.dir.display().to_string(), e))?;
            let id = self.next_id;
            self.next_id += 1;
            let mut writer = RunWriter::create(&run_path(&self.dir, id))?;
            for ((stream, first_version), (base, count)) in &self.recent {
                writer.push(&Entry {
                    stream: stream.clone(),
                    append: StreamAppend {
                        first_version: *first_version,
                        base: *base,
                        count: *count,
                    },
                })?;
            }
            let reference = writer.finish(id, 0)?;
            let run = Run::open(&self.dir, reference, None)?;
            self.runs.insert(id, Arc::new(run));
            self.unsynced.push(id);
            self.recent.clear();
        }
        let mut to_sync: Vec<PathBuf> = self
            .unsynced
            .iter()
            .map(|id| run_path(&self.dir, *id))
            .collect();
        if !to_sync.is_empty() {
            to_sync.push(self.dir.clone());
        }
        Ok(IndexCheckpoint {
            runs: self.runs.values().map(|r| r.reference).collect(),
            to_sync,
        })
    }

    /// After a checkpoint naming `named` was written: its runs are synced, and retired runs
    /// it does not name are deleted (one that cannot be is logged and tried again after the
    /// next checkpoint: the checkpoint stands).
    pub fn checkpointed(&mut self, named: &[RunRef]) {
        self.unsynced
            .retain(|id| !named.iter().any(|r| r.id == *id));
        let mut garbage = Vec::new();
        self.retired.retain(|run| {
            if named.iter().any(|r| r.id == run.reference.id) {
                return true;
            }
            match std::fs::remove_file(&run.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(run = %run.path.display(), error = %e, "deleting a merged stream index run failed");
                    true
                }
                _ => {
                    if let Some((_, key)) = run.remote.as_ref().and_then(|r| r.object.as_ref()) {
                        garbage.push(key.clone());
                    }
                    false
                }
            }
        });
        self.remote_garbage.extend(garbage);
    }

    /// Keys of objects of runs merged away that no checkpoint names any more, for the owner
    /// to delete (a run in the store is merged away only once wholly below the low
    /// watermark; objects are shared with the replicas that received them in a snapshot,
    /// and one of those still behind that low gets an error for a read of the object, not a
    /// wrong answer, until its own low passes it).
    pub fn take_remote_garbage(&mut self) -> Vec<String> {
        std::mem::take(&mut self.remote_garbage)
    }

    /// An upload due now, unless an upload is under way or backing off: the oldest synced
    /// run on disk of at least `min_bytes` (for an index with a tier) that does not lie
    /// wholly below the low watermark `low` (a merge at that low keeps only each stream's
    /// last append of it, so uploading it first would be undone). Uploaded, it
    /// takes the run's place as a run in the store whose file holds only each stream's last
    /// append in it.
    pub fn upload_due(&mut self, min_bytes: u64, low: u64) -> Option<UploadPlan> {
        let tier = self.tier.clone()?;
        if self.uploading.load(Ordering::Acquire)
            || self
                .upload_backoff
                .is_some_and(|(until, _)| Instant::now() < until)
        {
            return None;
        }
        let input = self
            .runs
            .values()
            .find(|run| {
                // A run of streams' last appends only (purged whole) would leave a file as
                // large as itself: it stays.
                !run.is_remote()
                    && run.purged_below() < run.end()
                    && run.end() > low
                    && run.reference.bytes >= min_bytes
                    && !self.unsynced.contains(&run.reference.id)
                    && !self.unmergeable.contains(&run.reference.id)
            })?
            .clone();
        self.uploading.store(true, Ordering::Release);
        let id = self.next_id;
        self.next_id += 1;
        Some(UploadPlan {
            input,
            id,
            name: rand::random(),
            dir: self.dir.clone(),
            cache: self.cache.clone(),
            tier,
            generation: self.generation,
            guard: MergeGuard(self.uploading.clone()),
        })
    }

    /// A merge due now, unless one is under way or a failed one is backing off: once some
    /// run wholly below the low watermark `low` was not purged at it yet, all runs wholly
    /// below it (to forget their dropped appends; runs purged before collapse with them);
    /// and the runs of a size class where four piled up (with the former if both are due,
    /// so purges never starve them). Only synced runs are merged, and no damaged one.
    pub fn merge_due(&mut self, low: u64) -> Option<MergePlan> {
        if self.merging.load(Ordering::Acquire)
            || self
                .merge_backoff
                .is_some_and(|(until, _)| Instant::now() < until)
        {
            return None;
        }
        let synced = || {
            self.runs.values().filter(|run| {
                !self.unsynced.contains(&run.reference.id)
                    && !self.unmergeable.contains(&run.reference.id)
            })
        };
        let due = synced().any(|run| run.end() <= low && run.purged_below() < run.end());
        let dropped: Vec<Arc<Run>> = synced()
            .filter(|run| due && run.end() <= low)
            .cloned()
            .collect();
        let class = |bytes: u64| (bytes.max(SMALLEST_CLASS) / SMALLEST_CLASS).ilog(4);
        let mut classes: BTreeMap<u32, Vec<Arc<Run>>> = BTreeMap::new();
        // Runs in the store are merged only once wholly below the low (their files hold
        // what such a merge keeps of them).
        for run in
            synced().filter(|run| !run.is_remote() && !dropped.iter().any(|d| Arc::ptr_eq(d, run)))
        {
            classes
                .entry(class(run.reference.bytes))
                .or_default()
                .push(run.clone());
        }
        let mut inputs = dropped;
        inputs.extend(
            classes
                .into_values()
                .find(|runs| runs.len() >= MERGE_AT)
                .unwrap_or_default(),
        );
        if inputs.is_empty() {
            return None;
        }
        self.merging.store(true, Ordering::Release);
        let id = self.next_id;
        self.next_id += 1;
        Some(MergePlan {
            inputs,
            id,
            dir: self.dir.clone(),
            cache: self.cache.clone(),
            generation: self.generation,
            guard: MergeGuard(self.merging.clone()),
        })
    }

    /// A merge planned by this index failed with `error` (its inputs as
    /// [`MergePlan::inputs`] gave them): an input it found damaged is not merged again (it
    /// stays as it is, and the others still merge); any other failure backs merges off.
    pub fn merge_failed(&mut self, (generation, inputs): (u64, Vec<u64>), error: &StoreError) {
        if generation != self.generation {
            return;
        }
        let damaged = match error {
            StoreError::RunCorrupt { path, .. } => inputs
                .iter()
                .copied()
                .find(|id| self.runs.get(id).is_some_and(|run| run.path == *path)),
            _ => None,
        };
        match damaged {
            Some(id) => self.unmergeable.push(id),
            None => self.back_off_merges(),
        }
    }

    /// An uploaded object no run will name: garbage.
    fn discard_object(&mut self, reference: &RunRef) {
        if let (Some(remote), Some(tier)) = (reference.remote, &self.tier) {
            self.remote_garbage.push(tier.key(remote.name));
        }
    }

    fn back_off_merges(&mut self) {
        back_off(&mut self.merge_backoff);
    }

    /// After installing `reference` failed: merges or uploads (as it was one) back off.
    fn install_failed(&mut self, reference: &RunRef) {
        self.discard_object(reference);
        if reference.remote.is_some() {
            back_off(&mut self.upload_backoff);
        } else {
            self.back_off_merges();
        }
    }

    /// An upload planned by this index failed (the store down, say): uploads back off
    /// (from 1 s, doubling to 5 min); a damaged run is not uploaded again.
    pub fn upload_failed(&mut self, (generation, inputs): (u64, Vec<u64>), error: &StoreError) {
        if generation != self.generation {
            return;
        }
        match error {
            StoreError::RunCorrupt { path, .. }
                if inputs
                    .iter()
                    .any(|id| self.runs.get(id).is_some_and(|run| run.path == *path)) =>
            {
                self.unmergeable.extend(inputs);
            }
            _ => back_off(&mut self.upload_backoff),
        }
    }

    /// Puts a merge's output in place of its inputs (the inputs' files stay until a
    /// checkpoint no longer names them). A merge planned by another index (this one replaced
    /// it meanwhile) or of runs no longer held is discarded, its file deleted; a run's name
    /// already taken is never replaced.
    pub fn install_merge(&mut self, merged: Merged) {
        let held = merged.generation == self.generation
            && merged.inputs.iter().all(|input| {
                self.runs
                    .get(&input.reference.id)
                    .is_some_and(|run| Arc::ptr_eq(run, input))
            });
        let Some((reference, written)) = merged.output.as_ref() else {
            if held {
                self.retire(&merged.inputs);
            }
            return;
        };
        if !held {
            // Its file goes as `merged` is dropped; an object uploaded for it, now.
            self.discard_object(reference);
            return;
        }
        // Linked, never renamed over: a name already taken (by a later index of the same
        // folder) is left alone.
        let path = run_path(&self.dir, reference.id);
        if let Err(e) = std::fs::hard_link(&written.0, &path) {
            tracing::warn!(run = %path.display(), error = %e, "installing a merged stream index run failed");
            self.install_failed(reference);
            return;
        }
        match Run::open(&self.dir, *reference, self.tier.as_ref()) {
            Ok(run) => {
                self.retire(&merged.inputs);
                self.runs.insert(reference.id, Arc::new(run));
                // Its folder entry is synced with the next checkpoint's runs.
                self.unsynced.push(reference.id);
                if reference.remote.is_some() {
                    self.upload_backoff = None;
                } else {
                    self.merge_backoff = None;
                }
            }
            Err(e) => {
                tracing::warn!(run = %path.display(), error = %e, "installing a merged stream index run failed");
                self.install_failed(reference);
                // Only the name linked here (a later index may have taken it meanwhile).
                if same_file(&path, &written.0) {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }

    fn retire(&mut self, inputs: &[Arc<Run>]) {
        for input in inputs {
            if let Some(run) = self.runs.remove(&input.reference.id) {
                self.retired.push(run);
            }
        }
    }

    /// The runs, for a snapshot: files to send whole.
    pub fn runs(&self) -> Vec<Arc<Run>> {
        self.runs.values().cloned().collect()
    }

    /// Appends held in memory (since the last checkpoint).
    pub fn recent_len(&self) -> usize {
        self.recent.len()
    }

    /// Runs in use, and their bytes on disk.
    pub fn runs_held(&self) -> (usize, u64) {
        (
            self.runs.len(),
            self.runs.values().map(|r| r.reference.bytes).sum(),
        )
    }
}

/// Writes run `reference` received whole from `data` into `dir`, synced, and checks every
/// block of it.
pub fn receive_run(
    dir: &Path,
    reference: RunRef,
    data: &mut impl Read,
    cache: &IndexCache,
) -> Result<(), StoreError> {
    crate::create_dir_durably(dir)?;
    let path = run_path(dir, reference.id);
    let io = |e: std::io::Error| StoreError::io(path.display().to_string(), e);
    let mut file = File::create(&path).map_err(io)?;
    let copied = std::io::copy(&mut data.take(reference.bytes), &mut file).map_err(io)?;
    if copied != reference.bytes {
        return Err(corrupt(&path, "the snapshot ends inside it"));
    }
    file.sync_all().map_err(io)?;
    fsync(dir)?;
    // Its file only: of a run in the store, the object is shared, not sent.
    let file = RunRef {
        remote: None,
        ..reference
    };
    Run::open(dir, file, None)?.verify(cache)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(first_version: u64, base: u64, count: u32) -> StreamAppend {
        StreamAppend {
            first_version,
            base,
            count,
        }
    }

    /// Appends round `round` to streams `s0`..`s19`, one event each at offsets `100 round +
    /// 5 s`, and takes a checkpoint.
    fn append_round(index: &mut StreamIndex, round: u64) {
        for s in 0..20u64 {
            index.append(format!("s{s}"), a(round + 1, round * 100 + s * 5, 1));
        }
        let c = index.checkpoint().unwrap();
        index.checkpointed(&c.runs);
    }

    /// Appends `streams` streams `per_stream` appends each, interleaved, two events each,
    /// checkpointing every `every` appends; returns the expected appends per stream.
    fn fill(
        index: &mut StreamIndex,
        streams: u64,
        per_stream: u64,
        every: u64,
    ) -> BTreeMap<String, Vec<StreamAppend>> {
        let mut expected: BTreeMap<String, Vec<StreamAppend>> = BTreeMap::new();
        let mut offset = 0;
        let mut n = 0;
        for round in 0..per_stream {
            for s in 0..streams {
                let name = format!("order-{s:05}");
                let append = a(round * 2 + 1, offset, 2);
                offset += 2;
                index.append(name.clone(), append);
                expected.entry(name).or_default().push(append);
                n += 1;
                if n % every == 0 {
                    let c = index.checkpoint().unwrap();
                    index.checkpointed(&c.runs);
                }
            }
        }
        expected
    }

    #[test]
    fn lookups_agree_with_what_was_appended_across_runs_merges_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(IndexCache::new(256 * 1024));
        let mut index = StreamIndex::empty(dir.path(), cache.clone(), None);
        let expected = fill(&mut index, 300, 40, 700);
        assert!(index.runs.len() > 4, "{} runs", index.runs.len());
        let check = |index: &StreamIndex| {
            for (name, appends) in &expected {
                let reader = index.reader(name);
                assert_eq!(reader.version().unwrap(), 80, "{name}");
                assert_eq!(reader.appends_from(1, 1000).unwrap(), *appends, "{name}");
                // From inside an append, and a bounded count.
                assert_eq!(reader.appends_from(10, 3).unwrap(), appends[4..7], "{name}");
                for append in [appends[0], appends[17], appends[39]] {
                    assert_eq!(reader.find_base(append.base).unwrap(), Some(append));
                }
                assert_eq!(reader.find_base(appends[5].base + 1).unwrap(), None);
            }
            let none = index.reader("order-99999");
            assert_eq!(none.version().unwrap(), 0);
            assert!(none.appends_from(1, 10).unwrap().is_empty());
            assert_eq!(index.reader("a").version().unwrap(), 0);
            assert_eq!(index.reader("zzz").version().unwrap(), 0);
        };
        check(&index);
        // Merge until nothing is due; lookups agree all along.
        while let Some(plan) = index.merge_due(0) {
            let merged = plan.run(0).unwrap();
            index.install_merge(merged);
            check(&index);
        }
        assert!(
            index.runs.len() < 8,
            "{} runs after merging",
            index.runs.len()
        );
        let c = index.checkpoint().unwrap();
        index.checkpointed(&c.runs);
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, c.runs.len(), "retired runs are deleted");
        let reopened = StreamIndex::open(dir.path(), &c.runs, cache.clone(), None).unwrap();
        check(&reopened);
        for run in reopened.runs() {
            run.verify(&cache).unwrap();
        }
    }

    #[test]
    fn a_merge_drops_what_retention_dropped_but_keeps_each_streams_version() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(IndexCache::default());
        let mut index = StreamIndex::empty(dir.path(), cache, None);
        // A stream whose only append retention drops.
        index.append("early".into(), a(1, 0, 1));
        let expected = fill(&mut index, 10, 20, 50);
        // Offsets below 300 are gone: 150 appends of 2 events.
        assert_eq!(index.runs.len(), 4);
        // (Planned at low 0: at 300, the three runs wholly below it would be purged alone.)
        let plan = index
            .merge_due(0)
            .expect("four runs of one size are due a merge");
        assert!(index.merge_due(0).is_none(), "one merge at a time");
        let merged = plan.run(300).unwrap();
        index.install_merge(merged);
        assert!(index.merge_due(300).is_none(), "nothing more is due");
        let c = index.checkpoint().unwrap();
        index.checkpointed(&c.runs);
        assert_eq!(c.runs.len(), 1);
        assert_eq!(c.runs[0].entries, 51, "{:?}", c.runs);
        let early = index.reader("early");
        assert_eq!(early.version().unwrap(), 1);
        assert_eq!(early.appends_from(1, 10).unwrap(), [a(1, 0, 1)]);
        for name in expected.keys() {
            let reader = index.reader(name);
            assert_eq!(reader.version().unwrap(), 40);
            let kept = reader.appends_from(1, 100).unwrap();
            assert!(kept.iter().all(|a| a.end() > 300), "{kept:?}");
            assert_eq!(kept.len(), 5);
        }
    }

    #[test]
    fn a_run_wholly_below_the_low_watermark_is_purged_once_down_to_each_streams_last() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = StreamIndex::empty(dir.path(), Arc::new(IndexCache::default()), None);
        fill(&mut index, 10, 20, 1000);
        let c = index.checkpoint().unwrap();
        index.checkpointed(&c.runs);
        assert_eq!(c.runs[0].entries, 200);
        // Not yet wholly below: nothing is due (one run is no size class's four).
        assert!(index.merge_due(300).is_none());
        let plan = index.merge_due(10_000).expect("a run below the low is due");
        index.install_merge(plan.run(10_000).unwrap());
        let c = index.checkpoint().unwrap();
        index.checkpointed(&c.runs);
        assert_eq!(c.runs.len(), 1);
        assert_eq!(c.runs[0].entries, 10, "each stream's last append");
        assert_eq!(index.reader("order-00003").version().unwrap(), 40);
        assert!(
            index.merge_due(10_000).is_none(),
            "purged at this low already"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_merge_planned_by_a_replaced_index_is_discarded_and_touches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(IndexCache::default());
        let mut index = StreamIndex::empty(dir.path(), cache.clone(), None);
        fill(&mut index, 10, 20, 50);
        let plan = index.merge_due(0).expect("due");
        // The index is replaced (a snapshot installed, say) while the merge runs.
        let named: Vec<RunRef> = index.runs().iter().map(|r| r.reference()).collect();
        let mut replaced = StreamIndex::open(dir.path(), &named, cache, None).unwrap();
        let merged = plan.run(0).unwrap();
        replaced.install_merge(merged);
        assert_eq!(
            replaced.runs().len(),
            4,
            "the replaced index's merge is not installed"
        );
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|f| f.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(files.len(), 4, "its output is deleted: {files:?}");
        // The new index merges on its own.
        let plan = replaced
            .merge_due(0)
            .expect("the new index's own merge is due");
        replaced.install_merge(plan.run(0).unwrap());
        assert_eq!(replaced.runs().len(), 1);
        // A merge that ends in a panic leaves the index free to merge again.
        let mut index = replaced;
        fill(&mut index, 10, 20, 50);
        let plan = index.merge_due(0).expect("due");
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _plan = plan;
            panic!("a merge dies");
        }));
        assert!(panicked.is_err());
        assert!(index.merge_due(0).is_some());
    }

    #[test]
    fn a_merge_failing_on_a_damaged_run_sets_only_that_run_aside_and_other_failures_back_off() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(IndexCache::default());
        let mut index = StreamIndex::empty(dir.path(), cache, None);
        // Five small runs; the second gets a flipped byte in a data block.
        fill(&mut index, 10, 25, 50);
        assert_eq!(index.runs.len(), 5);
        let damaged = *index.runs.keys().nth(1).unwrap();
        let path = run_path(dir.path(), damaged);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let plan = index.merge_due(0).expect("due");
        let inputs = plan.inputs();
        assert_eq!(inputs.1.len(), 5);
        let e = plan.run(0).err().expect("the damaged run fails the merge");
        index.merge_failed(inputs, &e);
        // The other four merge right away, without it.
        let plan = index.merge_due(0).expect("due without the damaged run");
        assert_eq!(plan.inputs().1.len(), 4);
        assert!(!plan.inputs().1.contains(&damaged));
        index.install_merge(plan.run(0).unwrap());
        assert_eq!(index.runs.len(), 2);
        // A failure that is not a damaged run (the folder is gone, say) sets nothing aside
        // and holds merges off for a while; then they are retried.
        for round in 0..4u64 {
            for s in 0..100u64 {
                index.append(
                    format!("other-{s}"),
                    a(round + 1, 10_000 + round * 100 + s, 1),
                );
            }
            let c = index.checkpoint().unwrap();
            index.checkpointed(&c.runs);
        }
        let plan = index.merge_due(0).expect("due");
        let inputs = plan.inputs();
        let away = dir.path().with_extension("away");
        std::fs::rename(dir.path(), &away).unwrap();
        let e = plan.run(0).err().expect("the output cannot be created");
        std::fs::rename(&away, dir.path()).unwrap();
        assert!(!matches!(e, StoreError::RunCorrupt { .. }), "{e}");
        index.merge_failed(inputs.clone(), &e);
        assert!(index.merge_due(0).is_none(), "backing off");
        assert_eq!(index.unmergeable, vec![damaged]);
        let deadline = Instant::now() + Duration::from_secs(10);
        let plan = loop {
            if let Some(plan) = index.merge_due(0) {
                break plan;
            }
            assert!(Instant::now() < deadline, "the merge is never retried");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(plan.inputs(), inputs);
        index.install_merge(plan.run(0).unwrap());
        assert!(index.merge_backoff.is_none());
    }

    #[test]
    fn class_merges_go_on_while_purges_are_due_at_every_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = StreamIndex::empty(dir.path(), Arc::new(IndexCache::default()), None);
        // Retention keeps the last 24 rounds. No merge runs for the first 25 (as when one
        // took long), so 25 runs pile up; from then on one falls wholly below the low at every
        // checkpoint, and they would stay piled up if only purges merged.
        for round in 0..72u64 {
            append_round(&mut index, round);
            let low = round.saturating_sub(24) * 100;
            if round >= 25 {
                if let Some(plan) = index.merge_due(low) {
                    index.install_merge(plan.run(low).unwrap());
                }
            }
        }
        assert!(index.runs.len() <= 8, "{} runs", index.runs.len());
        assert_eq!(index.reader("s7").version().unwrap(), 72);
    }

    #[test]
    fn a_run_in_the_object_store_serves_reads_from_it_and_appends_from_each_streams_last_on_disk() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let bucket = tempfile::tempdir().unwrap();
        let store = Arc::new(
            RemoteStore::open(&crate::RemoteOptions::new(format!(
                "file://{}",
                bucket.path().display()
            )))
            .unwrap(),
        );
        let tier = IndexTier {
            store: store.clone(),
            prefix: "t/0".into(),
        };
        let cache = Arc::new(IndexCache::default());
        let mut index = StreamIndex::empty(dir.path(), cache.clone(), Some(tier.clone()));
        // 50 streams of 20 appends in one run; a run smaller than asked for stays.
        let expected = fill(&mut index, 50, 20, 1000);
        let whole_bytes = index.runs_held().1;
        assert!(index.upload_due(whole_bytes + 1, 0).is_none());
        let plan = index.upload_due(whole_bytes, 0).expect("due");
        let merged = runtime.block_on(plan.run()).unwrap();
        index.install_merge(merged);
        let c = index.checkpoint().unwrap();
        for path in &c.to_sync {
            fsync(path).unwrap();
        }
        index.checkpointed(&c.runs);
        let [reference] = c.runs[..] else {
            panic!("{:?}", c.runs)
        };
        let remote = reference.remote.expect("the run is in the store");
        assert_eq!(remote.bytes, whole_bytes);
        assert_eq!(reference.entries, 50, "its file holds each stream's last");
        assert!(reference.bytes * 5 < whole_bytes, "{reference:?}");
        let key = tier.key(remote.name);
        assert_eq!(
            std::fs::metadata(bucket.path().join(&key)).unwrap().len(),
            whole_bytes
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "the uploaded file is gone"
        );
        let check = |index: &StreamIndex| {
            // The state machine's versions and duplicate checks come from the file alone.
            let fetched = store.stats().fetches.load(Ordering::Relaxed);
            for (stream, appends) in &expected {
                let reader = index.writer_reader(stream);
                let last = appends.last().unwrap();
                assert_eq!(reader.version().unwrap(), last.last_version());
                assert_eq!(reader.find_base(last.base).unwrap(), Some(*last));
                assert_eq!(reader.find_base(appends[0].base).unwrap(), None);
                assert!(reader.may_hold_remotely(appends[0].base).unwrap());
            }
            assert_eq!(store.stats().fetches.load(Ordering::Relaxed), fetched);
            // Readers read the object, from a thread that may block.
            let readers: Vec<_> = expected
                .keys()
                .map(|stream| (stream.clone(), index.reader(stream)))
                .collect();
            let read = runtime
                .block_on(runtime.spawn_blocking(move || {
                    readers
                        .into_iter()
                        .map(|(stream, reader)| {
                            let all = reader.appends_from(1, usize::MAX).unwrap();
                            let from_third = reader.first_ending_after(all[2].base).unwrap();
                            (stream, all, from_third)
                        })
                        .collect::<Vec<_>>()
                }))
                .unwrap();
            for (stream, all, from_third) in read {
                assert_eq!(&all, &expected[&stream], "{stream}");
                assert_eq!(from_third, Some(all[2]), "{stream}");
            }
            assert!(store.stats().fetches.load(Ordering::Relaxed) > fetched);
        };
        check(&index);
        // Reopened from the checkpoint, and received whole by another replica's folder.
        let reopened =
            StreamIndex::open(dir.path(), &c.runs, cache.clone(), Some(tier.clone())).unwrap();
        check(&reopened);
        // Without a tier, its file still serves appends; reads that need the object fail,
        // saying why.
        let untiered = StreamIndex::open(dir.path(), &c.runs, cache.clone(), None).unwrap();
        let (stream, appends) = expected.iter().next().unwrap();
        let reader = untiered.reader(stream);
        assert_eq!(
            reader.version().unwrap(),
            appends.last().unwrap().last_version()
        );
        let err = reader.appends_from(1, usize::MAX).unwrap_err().to_string();
        assert!(err.contains("no [tier]"), "{err}");
        let other = tempfile::tempdir().unwrap();
        let file = std::fs::read(run_path(dir.path(), reference.id)).unwrap();
        receive_run(other.path(), reference, &mut &file[..], &cache).unwrap();
        let received =
            StreamIndex::open(other.path(), &c.runs, cache.clone(), Some(tier.clone())).unwrap();
        check(&received);
        // Wholly below the low watermark, its file is what a purge keeps: the object is
        // not read, and goes once a checkpoint no longer names the run.
        let mut index = reopened;
        let fetched = store.stats().fetches.load(Ordering::Relaxed);
        let low = expected.values().flatten().map(|a| a.end()).max().unwrap();
        let plan = index.merge_due(low).expect("a purge is due");
        index.install_merge(plan.run(low).unwrap());
        assert_eq!(store.stats().fetches.load(Ordering::Relaxed), fetched);
        assert!(index.take_remote_garbage().is_empty());
        let c = index.checkpoint().unwrap();
        index.checkpointed(&c.runs);
        assert!(c.runs.iter().all(|r| r.remote.is_none()));
        assert_eq!(index.take_remote_garbage(), vec![key]);
        // Its streams' last appends alone are not uploaded again (the file would be as large).
        assert!(index.upload_due(0, 0).is_none());
        for (stream, appends) in &expected {
            let last = appends.last().unwrap().last_version();
            assert_eq!(index.reader(stream).version().unwrap(), last);
        }
    }

    #[test]
    fn a_failed_upload_backs_uploads_off_but_not_merges() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let bucket = tempfile::tempdir().unwrap();
        let root = bucket.path().join("store");
        let store = Arc::new(
            RemoteStore::open(&crate::RemoteOptions::new(format!(
                "file://{}",
                root.display()
            )))
            .unwrap(),
        );
        let tier = IndexTier {
            store,
            prefix: "t/0".into(),
        };
        let mut index = StreamIndex::empty(dir.path(), Arc::new(IndexCache::default()), Some(tier));
        fill(&mut index, 10, 20, 50);
        // The store cannot be written (its folder is a file now).
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::write(&root, b"").unwrap();
        let plan = index.upload_due(0, 0).expect("due");
        let inputs = plan.inputs();
        let e = runtime
            .block_on(plan.run())
            .err()
            .expect("the upload fails");
        index.upload_failed(inputs, &e);
        assert!(index.upload_due(0, 0).is_none(), "uploads back off");
        assert!(index.unmergeable.is_empty());
        let plan = index.merge_due(0).expect("merges go on");
        index.install_merge(plan.run(0).unwrap());
        assert_eq!(index.runs.len(), 1);
        assert!(index.runs.values().all(|r| !r.is_remote()));
    }

    #[test]
    fn purges_at_rising_lows_collapse_into_one_run_rather_than_pile_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = StreamIndex::empty(dir.path(), Arc::new(IndexCache::default()), None);
        for round in 0..6u64 {
            append_round(&mut index, round);
            // Retention keeps only this round: every earlier run is wholly below it.
            let low = round * 100;
            if let Some(plan) = index.merge_due(low) {
                index.install_merge(plan.run(low).unwrap());
            }
            assert!(
                index.runs.len() <= 2,
                "round {round}: {} runs",
                index.runs.len()
            );
        }
        assert_eq!(index.reader("s7").version().unwrap(), 6);
    }

    #[test]
    fn a_merge_of_an_index_a_later_one_took_over_never_replaces_that_ones_run() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(IndexCache::default());
        let mut old = StreamIndex::empty(dir.path(), cache.clone(), None);
        fill(&mut old, 10, 20, 50);
        let named: Vec<RunRef> = old.runs().iter().map(|r| r.reference()).collect();
        let plan = old.merge_due(0).expect("due");
        // The group is reopened on the same folder while the merge runs; the new index's
        // next run takes the number the merge reserved.
        let mut new = StreamIndex::open(dir.path(), &named, cache, None).unwrap();
        new.append("late".into(), a(1, 10_000, 1));
        let c = new.checkpoint().unwrap();
        new.checkpointed(&c.runs);
        let taken = c.runs.iter().map(|r| r.id).max().unwrap();
        assert_eq!(plan.inputs().1.len(), 4);
        let before = std::fs::read(run_path(dir.path(), taken)).unwrap();
        old.install_merge(plan.run(0).unwrap());
        assert_eq!(std::fs::read(run_path(dir.path(), taken)).unwrap(), before);
        assert_eq!(new.reader("late").version().unwrap(), 1);
        let leftovers = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|f| {
                let name = f.as_ref().unwrap().file_name();
                name.to_string_lossy().contains(".merging-")
            })
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn recent_appends_at_or_past_high_are_not_visible_in_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = StreamIndex::empty(dir.path(), Arc::new(IndexCache::default()), None);
        index.append("s".into(), a(1, 0, 3));
        let c = index.checkpoint().unwrap();
        index.checkpointed(&c.runs);
        index.append("s".into(), a(4, 10, 2));
        index.append("s".into(), a(6, 20, 1));
        let reader = index.reader("s");
        assert_eq!(reader.version().unwrap(), 6);
        assert_eq!(reader.version_below(21).unwrap(), 6);
        assert_eq!(reader.version_below(20).unwrap(), 5);
        assert_eq!(reader.version_below(10).unwrap(), 3);
    }

    #[test]
    fn damaged_or_foreign_runs_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(IndexCache::default());
        let mut index = StreamIndex::empty(dir.path(), cache.clone(), None);
        fill(&mut index, 50, 20, 1000);
        let c = index.checkpoint().unwrap();
        let reference = c.runs[0];
        let path = run_path(dir.path(), reference.id);
        let good = std::fs::read(&path).unwrap();
        // A flipped byte in a data block: opening works (the trailer and top are intact),
        // reading the block does not.
        let mut bad = good.clone();
        bad[100] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let err = StreamIndex::open(dir.path(), &[reference], cache.clone(), None)
            .and_then(|i| i.reader("order-00001").version())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("checksum") && err.contains("streams-"),
            "{err}"
        );
        // Cut short.
        std::fs::write(&path, &good[..good.len() - 3]).unwrap();
        let err = StreamIndex::open(dir.path(), &[reference], cache.clone(), None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("checkpoint recorded"), "{err}");
        // Not a run at all, or a trailer that promises fewer blocks than an index block holds.
        let mut foreign = good.clone();
        let n = foreign.len();
        foreign[n - 8..].copy_from_slice(b"NOTARUN!");
        std::fs::write(&path, &foreign).unwrap();
        let err = StreamIndex::open(dir.path(), &[reference], cache.clone(), None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not a stream index run"), "{err}");
        let blocks_at = n - TRAILER as usize + 8 + 4 + 8;
        let blocks = u64::from_be_bytes(good[blocks_at..blocks_at + 8].try_into().unwrap());
        assert!(blocks > 1, "{blocks} blocks");
        let mut fewer = good.clone();
        fewer[blocks_at..blocks_at + 8].copy_from_slice(&1u64.to_be_bytes());
        std::fs::write(&path, &fewer).unwrap();
        let err = StreamIndex::open(dir.path(), &[reference], cache.clone(), None)
            .and_then(|i| i.reader("order-00049").version())
            .unwrap_err()
            .to_string();
        assert!(err.contains("index block"), "{err}");
        // A received copy that is damaged is refused whole.
        let err = receive_run(&dir.path().join("in"), reference, &mut &bad[..], &cache)
            .unwrap_err()
            .to_string();
        assert!(err.contains("checksum"), "{err}");
        receive_run(&dir.path().join("ok"), reference, &mut &good[..], &cache).unwrap();
    }
}
