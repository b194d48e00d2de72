//! sled with a real fsync. sled 0.34's `flush` writes its buffers and then, on Linux, calls
//! `sync_file_range(2)`: that flushes neither the device's cache nor the file's metadata, so
//! what it wrote can vanish in a power loss; sled's own fsync runs on a background thread
//! that only logs its errors, and its blob files (large values) are never synced at all.
//! [`DurableSled::sync`] follows sled's flush with an fsync of its log file, its blob files
//! and both folders. Every store whose durability Ferry promises (the node's state machines
//! before a log purge, the sidecar's outbox, the edge's window) syncs through it.
//!
//! An fsync error is final: the kernel may have dropped the pages it could not write, so a
//! later fsync's success would prove nothing. Every sync after a failed one fails too, until
//! the process restarts and sled recovers from what is really on disk.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::durable::fsync;
use crate::StoreError;

/// Opens a sled database, waiting up to 5 s while its file lock is held: a handle of this
/// process just dropped releases the lock only once sled's flusher thread has ended.
pub fn open_sled(config: &sled::Config) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// A sled database and the folder it lives in. Cloning shares both.
#[derive(Clone)]
pub struct DurableSled {
    db: sled::Db,
    dir: Arc<PathBuf>,
    /// sled's log file, open from the start: Linux reports a writeback error to a descriptor
    /// opened after it only if nobody saw it yet, and sled's own background flush (on its
    /// descriptor) may see it first. One held open since before any write always sees it.
    log: Option<Arc<std::fs::File>>,
    failed: Arc<OnceLock<String>>,
}

impl DurableSled {
    /// Wraps `db`, opened at `dir`.
    pub fn new(db: sled::Db, dir: &Path) -> Self {
        Self {
            log: std::fs::File::open(dir.join("db")).ok().map(Arc::new),
            db,
            dir: Arc::new(dir.to_path_buf()),
            failed: Arc::default(),
        }
    }

    /// Why syncing stopped (a failed fsync), if it did.
    pub fn failure(&self) -> Option<String> {
        self.failed.get().cloned()
    }

    /// The database.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Makes every write to the database so far durable (blocking).
    pub fn sync(&self) -> Result<(), StoreError> {
        if let Some(reason) = self.failed.get() {
            return Err(StoreError::io(
                format!("syncing {}", self.dir.display()),
                format!("stopped after an earlier failure: {reason}"),
            ));
        }
        let result = self.sync_files();
        if let Err(e) = &result {
            let _ = self.failed.set(e.to_string());
            tracing::error!(dir = %self.dir.display(), error = %e, "sled sync failed; no later sync will succeed");
        }
        result
    }

    /// [`DurableSled::sync`] off the async runtime's threads.
    pub async fn sync_async(&self) -> Result<(), StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.sync())
            .await
            .map_err(|e| StoreError::io(format!("syncing {}", self.dir.display()), e))?
    }

    fn sync_files(&self) -> Result<(), StoreError> {
        let dir = self.dir.as_path();
        self.db
            .flush()
            .map_err(|e| StoreError::io(format!("flushing {}", dir.display()), e))?;
        if let Some(log) = &self.log {
            log.sync_all()
                .map_err(|e| StoreError::io(format!("syncing {}", dir.join("db").display()), e))?;
        }
        // The log again (in case it was not there to hold open), and sled's configuration and
        // snapshot files (written once, never synced by sled: after a power loss an empty
        // `conf` or a torn snapshot stops it opening).
        let items = std::fs::read_dir(dir)
            .map_err(|e| StoreError::io(format!("listing {}", dir.display()), e))?;
        for item in items {
            let item = item.map_err(|e| StoreError::io(format!("listing {}", dir.display()), e))?;
            if item.file_type().is_ok_and(|t| t.is_file()) {
                match fsync(&item.path()) {
                    // A snapshot file sled replaced since the listing.
                    Err(StoreError::Io { .. }) if !item.path().exists() => {}
                    other => other?,
                }
            }
        }
        let blobs = dir.join("blobs");
        match std::fs::read_dir(&blobs) {
            Ok(items) => {
                for item in items {
                    let item = item
                        .map_err(|e| StoreError::io(format!("listing {}", blobs.display()), e))?;
                    match fsync(&item.path()) {
                        // Removed by sled's blob collection since the listing.
                        Err(StoreError::Io { .. }) if !item.path().exists() => {}
                        other => other?,
                    }
                }
                fsync(&blobs)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(format!("listing {}", blobs.display()), e)),
        }
        fsync(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_writes_the_log_and_blob_files_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let store = DurableSled::new(db.clone(), dir.path());
        db.insert("small", "1").unwrap();
        // Large enough for sled to keep it in a blob file.
        db.insert("large", vec![7u8; 4 << 20]).unwrap();
        store.sync().unwrap();
        drop((store, db));
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        assert_eq!(db.get("small").unwrap().unwrap().as_ref(), b"1");
        assert_eq!(db.get("large").unwrap().unwrap().len(), 4 << 20);
    }
}
