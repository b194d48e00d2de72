//! fsync of paths, and folders created so that they survive a power loss: a new folder's
//! entry lives in its parent, which must be synced too (a folder created and filled, then
//! lost with its parent's unsynced entry, takes every file in it along).

use std::fs::File;
use std::path::Path;

use crate::StoreError;

/// fsync of the file or folder at `path`.
pub fn fsync(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::io(format!("syncing {}", path.display()), e))
}

/// Creates `dir` and any missing parents, and syncs the parent of each folder it created and
/// of `dir` itself (which may have been created before, by a run that crashed before the
/// sync).
pub fn create_dir_durably(dir: &Path) -> Result<(), StoreError> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(path) = at {
        if path.as_os_str().is_empty() || path.exists() {
            break;
        }
        missing.push(path);
        at = path.parent();
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
    if missing.is_empty() {
        missing.push(dir);
    }
    for created in missing.iter().rev() {
        let parent = created
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fsync(parent)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_every_missing_level() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        create_dir_durably(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_durably(&deep).unwrap();
    }
}
