//! Sealed batches in an object store (tiered storage): the object format, the manifest entry
//! naming an object ([`RemoteSegment`]), and [`RemoteStore`], which writes objects and reads
//! batches back from them with range requests through a bounded cache.
//!
//! An object holds a run of whole batches in the batch files' record format, then an index
//! of them, then a trailer: `[records][index][u64 index position][u32 batches][u32 CRC-32 of
//! the index][magic]`, each index entry `[u64 base offset][u64 position][u32 count][u32 event
//! bytes]`. Its manifest entry knows where the index starts, so a reader fetches the index
//! and trailer with one range request and then only the records it wants. Every record's own
//! checksum is checked as it is read, the index's against the trailer, and the object's size
//! against the manifest: a damaged or missing object is an error, never served.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ferry_proto::StoredBatch;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use serde::{Deserialize, Serialize};

use crate::batch_files::{decode_record, record_header, HEADER};
use crate::StoreError;

const MAGIC: &[u8; 8] = b"FERRYSG1";
const TRAILER: usize = 24;
const INDEX_ENTRY: usize = 24;
/// Objects are read (and cached) in pieces of this many bytes.
const CHUNK: u64 = 1024 * 1024;
/// Reads asking for at least this many bytes fetch ahead ([`RemoteStore::read_ahead`]).
const READ_AHEAD_FROM: usize = 256 * 1024;

/// A manifest entry: one object holding offsets `base..end` of a partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteSegment {
    /// The object's key under the store's root.
    pub key: String,
    /// Its first offset.
    pub base: u64,
    /// Past its last offset.
    pub end: u64,
    /// Batches in it.
    pub batches: u32,
    /// Bytes of event data in it.
    pub event_bytes: u64,
    /// The object's size.
    pub size: u64,
    /// Where its index starts.
    pub index_at: u64,
    /// CRC-32 of the whole object.
    pub crc32: u32,
    /// When its first and last batches were appended (ms since the epoch).
    pub first_appended_ms: u64,
    /// See `first_appended_ms`.
    pub last_appended_ms: u64,
}

/// One batch of an object's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IndexEntry {
    base: u64,
    position: u64,
    count: u32,
    bytes: u32,
}

/// Encodes `batches` (contiguous, in order, at least one) as an object stored at `key`, and
/// the manifest entry naming it.
pub fn encode_object(
    key: String,
    batches: &[StoredBatch],
) -> Result<(Bytes, RemoteSegment), StoreError> {
    let (Some(first), Some(last)) = (batches.first(), batches.last()) else {
        return Err(StoreError::io(&key, "an object needs at least one batch"));
    };
    let records: usize = batches.iter().map(|b| HEADER + b.events.len()).sum();
    let mut out = BytesMut::with_capacity(records + batches.len() * INDEX_ENTRY + TRAILER);
    let mut index = Vec::with_capacity(batches.len() * INDEX_ENTRY);
    let mut event_bytes = 0u64;
    for batch in batches {
        let bytes = u32::try_from(batch.events.len())
            .map_err(|_| StoreError::io(&key, "batch too large"))?;
        index.extend_from_slice(&batch.base_offset.to_le_bytes());
        index.extend_from_slice(&(out.len() as u64).to_le_bytes());
        index.extend_from_slice(&batch.count.to_le_bytes());
        index.extend_from_slice(&bytes.to_le_bytes());
        out.extend_from_slice(&record_header(batch, bytes));
        out.extend_from_slice(&batch.events);
        event_bytes += u64::from(bytes);
    }
    let index_at = out.len() as u64;
    out.extend_from_slice(&index);
    out.extend_from_slice(&index_at.to_le_bytes());
    out.extend_from_slice(&(batches.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&index).to_le_bytes());
    out.extend_from_slice(MAGIC);
    let bytes = out.freeze();
    let segment = RemoteSegment {
        key,
        base: first.base_offset,
        end: last.end_offset(),
        batches: batches.len() as u32,
        event_bytes,
        size: bytes.len() as u64,
        index_at,
        crc32: crc32fast::hash(&bytes),
        first_appended_ms: first.appended_at_ms,
        last_appended_ms: last.appended_at_ms,
    };
    Ok((bytes, segment))
}

/// Decodes an object's index and trailer (`tail`, from `segment.index_at` to its end).
fn decode_index(segment: &RemoteSegment, tail: &[u8]) -> Result<Vec<IndexEntry>, String> {
    let expected = segment.size.saturating_sub(segment.index_at) as usize;
    if tail.len() != expected || tail.len() < TRAILER {
        return Err(format!(
            "index and trailer are {} bytes, expected {expected}",
            tail.len()
        ));
    }
    let (index, trailer) = tail.split_at(tail.len() - TRAILER);
    let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8"));
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4"));
    if &trailer[16..24] != MAGIC {
        return Err("no segment trailer".into());
    }
    if u64_at(trailer, 0) != segment.index_at || u32_at(trailer, 8) != segment.batches {
        return Err("the trailer does not match the manifest".into());
    }
    if crc32fast::hash(index) != u32_at(trailer, 12)
        || index.len() != segment.batches as usize * INDEX_ENTRY
    {
        return Err("the index fails its checksum".into());
    }
    let entries: Vec<IndexEntry> = index
        .chunks_exact(INDEX_ENTRY)
        .map(|e| IndexEntry {
            base: u64_at(e, 0),
            position: u64_at(e, 8),
            count: u32_at(e, 16),
            bytes: u32_at(e, 20),
        })
        .collect();
    if entries.is_empty() {
        return Err("an empty index".into());
    }
    // Batches follow each other, in offsets and in bytes, from the manifest's first offset
    // to its end and from the object's start to its index.
    let (mut base, mut position) = (segment.base, 0u64);
    for entry in &entries {
        if entry.base != base || entry.position != position || entry.count == 0 {
            return Err(format!(
                "the index's entry for offset {} does not follow the one before",
                entry.base
            ));
        }
        base = base
            .checked_add(u64::from(entry.count))
            .ok_or("the index's offsets overflow")?;
        position = position
            .checked_add((HEADER + entry.bytes as usize) as u64)
            .ok_or("the index's positions overflow")?;
    }
    if base != segment.end || position != segment.index_at {
        return Err("the index does not cover the manifest's offsets and records".into());
    }
    Ok(entries)
}

/// Where a node keeps sealed segments: an S3 bucket (or an S3-compatible server) or a local
/// folder, and how much it caches of what it reads back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteOptions {
    /// `s3://bucket/prefix` or `file:///absolute/folder`. Credentials for S3 come from the
    /// usual environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN`, `AWS_REGION`, ...).
    pub url: String,
    /// An S3-compatible server's address instead of AWS's (path-style requests).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Allows `endpoint` to be plain HTTP.
    #[serde(default)]
    pub allow_http: bool,
    /// Bytes of objects (and their indexes) read back that are kept in memory.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    /// One request to the store gives up after this long, milliseconds.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// How often a leader looks for complete segment files to upload, milliseconds.
    #[serde(default = "default_upload_interval_ms")]
    pub upload_interval_ms: u64,
    /// Failed uploads of a partition are retried after a backoff that doubles up to this,
    /// milliseconds.
    #[serde(default = "default_max_upload_backoff_ms")]
    pub max_upload_backoff_ms: u64,
    /// How often a partition's leader lists the partition's objects to delete those its
    /// manifest does not name (left over by failures), milliseconds.
    #[serde(default = "default_sweep_interval_ms")]
    pub sweep_interval_ms: u64,
    /// Pieces (1 MiB each) of an object fetched ahead of a reader that reads on through it
    /// (a read of at least 256 KiB stopped short of the object's end), beside the pieces it
    /// waits for: so a reader catching up from a store whose requests are slow waits for one
    /// request per this many pieces plus one. 0 fetches only what is read.
    #[serde(default = "default_read_ahead_pieces")]
    pub read_ahead_pieces: u32,
}

impl RemoteOptions {
    /// Options for `url` with every default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            endpoint: None,
            allow_http: false,
            cache_bytes: default_cache_bytes(),
            request_timeout_ms: default_request_timeout_ms(),
            upload_interval_ms: default_upload_interval_ms(),
            max_upload_backoff_ms: default_max_upload_backoff_ms(),
            sweep_interval_ms: default_sweep_interval_ms(),
            read_ahead_pieces: default_read_ahead_pieces(),
        }
    }
}

fn default_cache_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_upload_interval_ms() -> u64 {
    1_000
}
fn default_max_upload_backoff_ms() -> u64 {
    30_000
}
fn default_read_ahead_pieces() -> u32 {
    4
}
fn default_sweep_interval_ms() -> u64 {
    600_000
}
fn default_request_timeout_ms() -> u64 {
    10_000
}

/// Counters of a [`RemoteStore`], since the process started.
#[derive(Debug, Default)]
pub struct RemoteStats {
    /// Objects written, and their bytes.
    pub uploads: AtomicU64,
    /// See `uploads`.
    pub upload_bytes: AtomicU64,
    /// Writes and deletes that failed.
    pub upload_errors: AtomicU64,
    /// Pieces of objects found in the cache.
    pub cache_hits: AtomicU64,
    /// Pieces of objects fetched from the store.
    pub cache_misses: AtomicU64,
    /// Range requests made and their total time, microseconds.
    pub fetches: AtomicU64,
    /// See `fetches`.
    pub fetch_micros: AtomicU64,
    /// Reads that failed: the store answered an error, or an object was missing or damaged.
    pub read_errors: AtomicU64,
    /// Objects found damaged or missing.
    pub corrupt: AtomicU64,
}

#[derive(Clone)]
enum Cached {
    Chunk(Bytes),
    Index(Arc<Vec<IndexEntry>>),
}

impl Cached {
    fn weight(&self) -> u32 {
        let bytes = match self {
            Cached::Chunk(b) => b.len(),
            Cached::Index(i) => i.len() * std::mem::size_of::<IndexEntry>(),
        };
        u32::try_from(bytes + 64).unwrap_or(u32::MAX)
    }
}

/// An object store holding sealed segments, with a bounded cache of what was read back.
pub struct RemoteStore {
    store: Arc<dyn ObjectStore>,
    root: ObjectPath,
    /// For a local folder: the folder (writes are synced there, which object_store does
    /// not do).
    local: Option<PathBuf>,
    cache: moka::future::Cache<(String, u64), Cached>,
    timeout: Duration,
    /// See [`RemoteOptions::read_ahead_pieces`].
    read_ahead: u64,
    /// Pieces being fetched ahead now (so readers meanwhile do not start them again).
    fetching_ahead: std::sync::Mutex<std::collections::HashSet<(String, u64)>>,
    stats: RemoteStats,
    description: String,
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

fn remote_err(key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Remote {
        key: key.to_string(),
        reason: e.to_string(),
    }
}

impl RemoteStore {
    /// Opens the store `options` name. Nothing is requested yet.
    pub fn open(options: &RemoteOptions) -> Result<Self, StoreError> {
        let bad = |reason: String| StoreError::io(format!("tier.url {:?}", options.url), reason);
        let url = url_parts(&options.url).map_err(bad)?;
        let retry = object_store::RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_millis(options.request_timeout_ms),
            backoff: object_store::BackoffConfig::default(),
        };
        let (store, root, local): (Arc<dyn ObjectStore>, ObjectPath, Option<PathBuf>) = match url {
            UrlParts::S3 { bucket, prefix } => {
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry)
                    .with_client_options(
                        object_store::ClientOptions::new()
                            .with_timeout(Duration::from_millis(options.request_timeout_ms))
                            .with_allow_http(options.allow_http),
                    );
                // Without static credentials the client asks the instance metadata service
                // (169.254.169.254), which a server beside AWS does not have.
                if options.endpoint.is_some() && std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
                    return Err(bad("an endpoint needs credentials from the environment \
                                    (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
                        .into()));
                }
                if let Some(endpoint) = &options.endpoint {
                    builder = builder
                        .with_endpoint(endpoint)
                        .with_virtual_hosted_style_request(false);
                }
                let store = builder.build().map_err(|e| bad(e.to_string()))?;
                (Arc::new(store), ObjectPath::from(prefix), None)
            }
            UrlParts::File { folder } => {
                crate::create_dir_durably(&folder)?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(&folder)
                    .map_err(|e| bad(e.to_string()))?;
                (Arc::new(store), ObjectPath::default(), Some(folder))
            }
        };
        // Least recently used goes first: moka's default (TinyLFU) admits a new entry only if
        // it was asked for more often than what it would evict, so a piece fetched ahead
        // (asked for once) could be dropped from a full cache before its reader came.
        let cache = moka::future::Cache::builder()
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .max_capacity(options.cache_bytes)
            .weigher(|_, v: &Cached| v.weight())
            .build();
        Ok(Self {
            store,
            root,
            local,
            cache,
            timeout: Duration::from_millis(options.request_timeout_ms),
            read_ahead: u64::from(options.read_ahead_pieces),
            fetching_ahead: Default::default(),
            stats: RemoteStats::default(),
            description: options.url.clone(),
        })
    }

    /// Its counters.
    pub fn stats(&self) -> &RemoteStats {
        &self.stats
    }

    fn path(&self, key: &str) -> ObjectPath {
        key.split('/')
            .fold(self.root.clone(), |p, part| p.child(part))
    }

    /// Writes `bytes` at `key` and returns once the store holds them durably (a local
    /// folder's file is synced).
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        let len = bytes.len() as u64;
        let put = async {
            self.store
                .put(&self.path(key), PutPayload::from_bytes(bytes))
                .await
                .map_err(|e| remote_err(key, e))?;
            if let Some(folder) = &self.local {
                let file = folder.join(key);
                let dir = file
                    .parent()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| folder.clone());
                tokio::task::spawn_blocking(move || {
                    std::fs::File::open(&file)
                        .and_then(|f| f.sync_all())
                        .and_then(|()| std::fs::File::open(&dir))
                        .and_then(|d| d.sync_all())
                })
                .await
                .map_err(|e| remote_err(key, e))?
                .map_err(|e| remote_err(key, e))?;
            }
            Ok(())
        };
        let result = self.within(key, put).await;
        match &result {
            Ok(()) => {
                self.stats.uploads.fetch_add(1, Ordering::Relaxed);
                self.stats.upload_bytes.fetch_add(len, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.upload_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    /// The keys of the objects directly under `prefix` (a key's leading parts: `a/b` lists
    /// `a/b/c`, not `a/b/c/d` nor `a/bc`), in no particular order. The whole listing (all its
    /// pages) is bounded by four request timeouts.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let path = self.path(prefix);
        let listing = self
            .within(prefix, async {
                self.store
                    .list_with_delimiter(Some(&path))
                    .await
                    .map_err(|e| remote_err(prefix, e))
            })
            .await?;
        let root = self.root.as_ref();
        listing
            .objects
            .into_iter()
            .map(|meta| {
                let full = meta.location.as_ref();
                let key = if root.is_empty() {
                    Some(full)
                } else {
                    full.strip_prefix(root).and_then(|k| k.strip_prefix('/'))
                };
                key.map(str::to_string).ok_or_else(|| {
                    remote_err(prefix, format!("the store listed {full}, outside its root"))
                })
            })
            .collect()
    }

    /// Deletes the object at `key` (done if it is not there).
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let delete = async {
            match self.store.delete(&self.path(key)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(remote_err(key, e)),
            }
        };
        let result = self.within(key, delete).await;
        if result.is_err() {
            self.stats.upload_errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn within<T>(
        &self,
        key: &str,
        work: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        // object_store retries within its own timeout; this bounds the whole of it.
        tokio::time::timeout(self.timeout * 4, work)
            .await
            .map_err(|_| remote_err(key, format!("no answer within {:?}", self.timeout * 4)))?
    }

    /// Bytes `range` of the object at `key`, counted as a remote read (a missing object is
    /// [`StoreError::RemoteMissing`]; the length is not checked).
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let started = Instant::now();
        let got = self
            .within(key, async {
                self.store
                    .get_range(&self.path(key), range.clone())
                    .await
                    .map_err(|e| match e {
                        // Missing or dropped by retention meanwhile: the reader knows which.
                        object_store::Error::NotFound { .. } => StoreError::RemoteMissing {
                            key: key.to_string(),
                        },
                        e => remote_err(key, e),
                    })
            })
            .await;
        if got.is_ok() {
            self.stats.fetches.fetch_add(1, Ordering::Relaxed);
            self.stats
                .fetch_micros
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        got
    }

    /// [`RemoteStore::get_range`] from a thread that may block (one of the runtime's
    /// blocking threads, never one of its workers): for synchronous readers such as the
    /// stream index's.
    pub fn get_range_blocking(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| remote_err(key, format!("read outside the runtime: {e}")))?;
        runtime.block_on(self.get_range(key, range))
    }

    async fn fetch(&self, segment: &RemoteSegment, range: Range<u64>) -> Result<Bytes, StoreError> {
        let want = range.end - range.start;
        let got = self.get_range(&segment.key, range.clone()).await?;
        if got.len() as u64 != want {
            return Err(self.corrupt(
                segment,
                format!(
                    "bytes {range:?} came back as {} bytes: the object is shorter than recorded",
                    got.len()
                ),
            ));
        }
        Ok(got)
    }

    /// Counts and logs an object the manifest still names that is not in the store.
    pub fn report_missing(&self, segment: &RemoteSegment) {
        let _ = self.corrupt(segment, "the object is missing");
    }

    /// Counts and logs a damaged or missing object, and the error for its reader.
    fn corrupt(&self, segment: &RemoteSegment, reason: impl Into<String>) -> StoreError {
        let reason = reason.into();
        self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
        tracing::error!(key = %segment.key, base = segment.base, end = segment.end, %reason, "a remote segment is damaged or missing; not served");
        StoreError::RemoteCorrupt {
            key: segment.key.clone(),
            reason,
        }
    }

    async fn index(&self, segment: &RemoteSegment) -> Result<Arc<Vec<IndexEntry>>, StoreError> {
        let key = (segment.key.clone(), u64::MAX);
        let hits = &self.stats.cache_hits;
        let mut loaded = false;
        let cached = self
            .cache
            .try_get_with(key, async {
                loaded = true;
                let tail = self.fetch(segment, segment.index_at..segment.size).await?;
                let index =
                    decode_index(segment, &tail).map_err(|why| self.corrupt(segment, why))?;
                Ok::<_, StoreError>(Cached::Index(Arc::new(index)))
            })
            .await
            .map_err(|e: Arc<StoreError>| clone_err(&e))?;
        count_hit(hits, &self.stats.cache_misses, loaded);
        match cached {
            Cached::Index(index) => Ok(index),
            Cached::Chunk(_) => Err(StoreError::io(
                &segment.key,
                "cache holds a chunk for an index",
            )),
        }
    }

    async fn chunk(&self, segment: &RemoteSegment, number: u64) -> Result<Bytes, StoreError> {
        let start = number * CHUNK;
        let end = (start + CHUNK).min(segment.index_at);
        let mut loaded = false;
        let cached = self
            .cache
            .try_get_with((segment.key.clone(), number), async {
                loaded = true;
                Ok::<_, StoreError>(Cached::Chunk(self.fetch(segment, start..end).await?))
            })
            .await
            .map_err(|e: Arc<StoreError>| clone_err(&e))?;
        count_hit(&self.stats.cache_hits, &self.stats.cache_misses, loaded);
        match cached {
            Cached::Chunk(bytes) => Ok(bytes),
            Cached::Index(_) => Err(StoreError::io(
                &segment.key,
                "cache holds an index for a chunk",
            )),
        }
    }

    /// Bytes `range` of the object's records, through the cache.
    async fn records(
        &self,
        segment: &RemoteSegment,
        range: Range<u64>,
    ) -> Result<Bytes, StoreError> {
        let first = range.start / CHUNK;
        let last = (range.end - 1) / CHUNK;
        let chunks =
            futures::future::try_join_all((first..=last).map(|n| self.chunk(segment, n))).await?;
        if let [only] = &chunks[..] {
            let at = (range.start - first * CHUNK) as usize;
            return Ok(only.slice(at..at + (range.end - range.start) as usize));
        }
        let mut out = BytesMut::with_capacity((range.end - range.start) as usize);
        for (n, chunk) in (first..=last).zip(chunks) {
            let from = range.start.max(n * CHUNK) - n * CHUNK;
            let to = range.end.min(n * CHUNK + chunk.len() as u64) - n * CHUNK;
            out.extend_from_slice(&chunk[from as usize..to as usize]);
        }
        Ok(out.freeze())
    }

    /// Starts fetching the pieces of `segment` after the one holding byte `end - 1` of its
    /// records (at most `read_ahead` of them) that the cache does not hold, each in a task
    /// of its own; a failure is left for the read that needs the piece.
    fn read_ahead(self: &Arc<Self>, segment: &RemoteSegment, end: u64) {
        let last_needed = (end - 1) / CHUNK;
        let last_piece = (segment.index_at.max(1) - 1) / CHUNK;
        for number in last_needed + 1..=(last_needed + self.read_ahead).min(last_piece) {
            let piece = (segment.key.clone(), number);
            if self.cache.contains_key(&piece) {
                continue;
            }
            let started = self
                .fetching_ahead
                .lock()
                .is_ok_and(|mut fetching| fetching.insert(piece.clone()));
            if !started {
                continue;
            }
            let (store, segment) = (self.clone(), segment.clone());
            tokio::spawn(async move {
                let _ = store.chunk(&segment, number).await;
                if let Ok(mut fetching) = store.fetching_ahead.lock() {
                    fetching.remove(&piece);
                }
            });
        }
    }

    /// The batches of `segment` from the one holding `offset` on (the first if `offset` is
    /// below it), at most `max_bytes` of events but at least one batch. A read that stops
    /// short of the object's end starts fetching the object's next pieces into the cache
    /// ([`RemoteOptions::read_ahead_pieces`]) without waiting for them.
    pub async fn read(
        self: &Arc<Self>,
        segment: &RemoteSegment,
        offset: u64,
        max_bytes: usize,
    ) -> Result<Vec<StoredBatch>, StoreError> {
        let result = self.read_checked(segment, offset, max_bytes).await;
        if result.is_err() {
            self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn read_checked(
        self: &Arc<Self>,
        segment: &RemoteSegment,
        offset: u64,
        max_bytes: usize,
    ) -> Result<Vec<StoredBatch>, StoreError> {
        let index = self.index(segment).await?;
        let from = index
            .partition_point(|e| e.base + u64::from(e.count) <= offset)
            .min(index.len() - 1);
        let mut wanted = Vec::new();
        let mut size = 0usize;
        for entry in &index[from..] {
            if !wanted.is_empty() && size + entry.bytes as usize > max_bytes {
                break;
            }
            size += entry.bytes as usize;
            wanted.push(*entry);
        }
        let (Some(first), Some(last)) = (wanted.first(), wanted.last()) else {
            return Ok(Vec::new());
        };
        let end = last.position + (HEADER + last.bytes as usize) as u64;
        if end > segment.index_at {
            return Err(self.corrupt(segment, "the index points past the records"));
        }
        // A reader going on through the partition (one asking for a quarter piece or more,
        // and stopped short of the object's end), not a lookup of one batch.
        if from + wanted.len() < index.len() && max_bytes >= READ_AHEAD_FROM {
            self.read_ahead(segment, end);
        }
        let records = self.records(segment, first.position..end).await?;
        let mut batches = Vec::with_capacity(wanted.len());
        for entry in &wanted {
            let at = (entry.position - first.position) as usize;
            let record = records.slice(at..at + HEADER + entry.bytes as usize);
            match decode_record(record, entry.base) {
                Some(batch) if batch.count == entry.count => batches.push(batch),
                _ => {
                    // What the cache holds of it is damaged (or the object is): fetch again
                    // on the next read.
                    for n in first.position / CHUNK..=(end - 1) / CHUNK {
                        self.cache.invalidate(&(segment.key.clone(), n)).await;
                    }
                    return Err(self.corrupt(
                        segment,
                        format!("the batch at offset {} fails its checksum", entry.base),
                    ));
                }
            }
        }
        Ok(batches)
    }
}

fn count_hit(hits: &AtomicU64, misses: &AtomicU64, loaded: bool) {
    if loaded {
        misses.fetch_add(1, Ordering::Relaxed);
    } else {
        hits.fetch_add(1, Ordering::Relaxed);
    }
}

/// An error shared by the cache's waiters, for one of them.
fn clone_err(e: &StoreError) -> StoreError {
    match e {
        StoreError::Remote { key, reason } => StoreError::Remote {
            key: key.clone(),
            reason: reason.clone(),
        },
        StoreError::RemoteCorrupt { key, reason } => StoreError::RemoteCorrupt {
            key: key.clone(),
            reason: reason.clone(),
        },
        StoreError::RemoteMissing { key } => StoreError::RemoteMissing { key: key.clone() },
        other => StoreError::io("remote read", other),
    }
}

enum UrlParts {
    S3 { bucket: String, prefix: String },
    File { folder: PathBuf },
}

fn url_parts(url: &str) -> Result<UrlParts, String> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err("names no bucket (s3://bucket/prefix)".into());
        }
        return Ok(UrlParts::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        });
    }
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err("a file:// URL needs an absolute folder (file:///path)".into());
        }
        return Ok(UrlParts::File {
            folder: PathBuf::from(path),
        });
    }
    Err("must start with s3:// or file://".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(base: u64, count: u32, fill: u8, len: usize) -> StoredBatch {
        StoredBatch {
            base_offset: base,
            count,
            appended_at_ms: 1000 + base,
            events: Bytes::from(vec![fill; len]),
        }
    }

    fn store(dir: &std::path::Path, cache_bytes: u64) -> Arc<RemoteStore> {
        Arc::new(
            RemoteStore::open(&RemoteOptions {
                cache_bytes,
                ..RemoteOptions::new(format!("file://{}", dir.display()))
            })
            .unwrap(),
        )
    }

    #[tokio::test]
    async fn batches_come_back_from_an_object_by_offset_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let remote = store(dir.path(), 1 << 20);
        // Batches larger than a chunk, so reads span chunks.
        let batches: Vec<StoredBatch> = (0..6)
            .map(|i| batch(10 + i * 5, 5, i as u8, 700 * 1024))
            .collect();
        let (bytes, segment) = encode_object("t/0/a".into(), &batches).unwrap();
        assert_eq!((segment.base, segment.end, segment.batches), (10, 40, 6));
        remote.put(&segment.key, bytes).await.unwrap();
        let got = remote.read(&segment, 17, 1).await.unwrap();
        assert_eq!(got, vec![batches[1].clone()]);
        let got = remote.read(&segment, 0, 2 * 700 * 1024).await.unwrap();
        assert_eq!(got, batches[..2].to_vec());
        let got = remote.read(&segment, 39, usize::MAX).await.unwrap();
        assert_eq!(got, vec![batches[5].clone()]);
        assert!(remote.stats().cache_misses.load(Ordering::Relaxed) > 0);
    }

    #[tokio::test]
    async fn a_reader_that_reads_on_finds_the_next_pieces_fetched_ahead() {
        let dir = tempfile::tempdir().unwrap();
        // Six batches of 700 KiB: the object's records are five 1 MiB pieces.
        let batches: Vec<StoredBatch> = (0..6)
            .map(|i| batch(10 + i * 5, 5, i as u8, 700 * 1024))
            .collect();
        let (bytes, segment) = encode_object("t/0/ahead".into(), &batches).unwrap();
        let misses = |r: &RemoteStore| r.stats().cache_misses.load(Ordering::Relaxed);

        // Without read-ahead every piece is fetched when it is read.
        let plain = Arc::new(
            RemoteStore::open(&RemoteOptions {
                read_ahead_pieces: 0,
                ..RemoteOptions::new(format!("file://{}", dir.path().display()))
            })
            .unwrap(),
        );
        plain.put(&segment.key, bytes).await.unwrap();
        let one_batch = 700 * 1024;
        plain.read(&segment, 10, one_batch).await.unwrap();
        assert_eq!(misses(&plain), 2, "the index and the first piece");
        plain.read(&segment, 15, one_batch).await.unwrap();
        assert_eq!(misses(&plain), 3, "the second piece, when read");

        // A lookup of one batch (a small read) fetches nothing ahead.
        let lookup = store(dir.path(), 16 << 20);
        lookup.read(&segment, 10, 1).await.unwrap();
        assert_eq!(misses(&lookup), 2, "the index and the first piece");

        // With it (4 pieces, the default), reading the first batch fetches the rest ahead.
        let ahead = store(dir.path(), 16 << 20);
        assert_eq!(
            ahead.read(&segment, 10, one_batch).await.unwrap(),
            vec![batches[0].clone()]
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while misses(&ahead) < 6 {
            assert!(
                Instant::now() < deadline,
                "pieces fetched ahead: {}",
                misses(&ahead) - 2
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let fetched = ahead.stats().fetches.load(Ordering::Relaxed);
        assert_eq!(
            ahead.read(&segment, 15, usize::MAX).await.unwrap(),
            batches[1..].to_vec()
        );
        assert_eq!(misses(&ahead), 6, "the rest came from the cache");
        assert_eq!(ahead.stats().fetches.load(Ordering::Relaxed), fetched);
        // A read to the object's end fetches nothing ahead.
        let fresh = store(dir.path(), 16 << 20);
        fresh.read(&segment, 35, usize::MAX).await.unwrap();
        assert_eq!(
            misses(&fresh),
            3,
            "the index and the two pieces the last batch spans"
        );
    }

    #[tokio::test]
    async fn a_listing_names_the_objects_directly_under_a_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let remote = store(dir.path(), 1 << 20);
        for key in [
            "r/t/1/a.seg",
            "r/t/1/b.seg",
            "r/t/10/c.seg",
            "r/t/1/stream-index/d.run",
        ] {
            remote.put(key, Bytes::from_static(b"x")).await.unwrap();
        }
        let mut listed = remote.list("r/t/1").await.unwrap();
        listed.sort();
        assert_eq!(listed, vec!["r/t/1/a.seg", "r/t/1/b.seg"]);
        assert!(remote.list("r/t/2").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_damaged_or_missing_object_is_an_error_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let remote = store(dir.path(), 1 << 20);
        let batches: Vec<StoredBatch> = (0..3).map(|i| batch(i * 2, 2, 7, 1000)).collect();
        let (bytes, segment) = encode_object("t/0/b".into(), &batches).unwrap();
        let mut damaged = bytes.to_vec();
        damaged[HEADER + 1500] ^= 1; // an event byte of the second batch
        remote
            .put(&segment.key, Bytes::from(damaged))
            .await
            .unwrap();
        assert_eq!(
            remote.read(&segment, 0, 1).await.unwrap(),
            vec![batches[0].clone()]
        );
        let err = remote.read(&segment, 2, 1).await.unwrap_err();
        assert!(matches!(err, StoreError::RemoteCorrupt { .. }), "{err}");
        assert!(err.to_string().contains("offset 2"), "{err}");
        // Shorter than the manifest says.
        remote
            .put(&segment.key, bytes.slice(..bytes.len() - 10))
            .await
            .unwrap();
        let fresh = store(dir.path(), 1 << 20);
        let err = fresh.read(&segment, 0, 1).await.unwrap_err();
        assert!(matches!(err, StoreError::RemoteCorrupt { .. }), "{err}");
        // Gone.
        fresh.delete(&segment.key).await.unwrap();
        let fresh = store(dir.path(), 1 << 20);
        let err = fresh.read(&segment, 0, 1).await.unwrap_err();
        assert!(matches!(err, StoreError::RemoteMissing { .. }), "{err}");
        // Counted once its reader knows the manifest still names it.
        fresh.report_missing(&segment);
        assert_eq!(fresh.stats().corrupt.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn urls_name_a_bucket_or_an_absolute_folder() {
        assert!(
            matches!(url_parts("s3://b/p/q"), Ok(UrlParts::S3 { bucket, prefix }) if bucket == "b" && prefix == "p/q")
        );
        assert!(url_parts("s3:///p").is_err());
        assert!(url_parts("file://rel").is_err());
        assert!(url_parts("gs://b").is_err());
    }
}
