//! Undo records: how to forget a write or a directory change that was never made durable.
//!
//! Changes go through to the backing folder at once; each one leaves a record here until an
//! fsync makes it durable. Power loss replays the records backwards.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use rand::Rng;

use crate::sys;

/// How to take back one change to a file's data.
#[derive(Debug)]
pub(crate) enum DataUndo {
    /// `len` bytes written at `offset` to a file that was `old_len` long; `pre` holds the
    /// bytes the write overwrote (those of `offset..offset + len` below `old_len`).
    Write {
        offset: u64,
        len: u64,
        old_len: u64,
        pre: Vec<u8>,
    },
    /// The length set from `old_len` to `new_len` (truncate or fallocate); `pre` holds the
    /// bytes a shrink cut off.
    SetLen {
        old_len: u64,
        new_len: u64,
        pre: Vec<u8>,
    },
}

fn read_range(file: &File, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

impl DataUndo {
    /// The record for writing `len` bytes at `offset`, taken before the write.
    pub(crate) fn before_write(file: &File, offset: u64, len: u64) -> io::Result<Self> {
        let old_len = file.metadata()?.len();
        let end = offset.saturating_add(len).min(old_len);
        let pre = if offset < end {
            read_range(file, offset, end - offset)?
        } else {
            Vec::new()
        };
        Ok(Self::Write {
            offset,
            len,
            old_len,
            pre,
        })
    }

    /// The record for setting the length to `new_len`, taken before the change.
    pub(crate) fn before_set_len(file: &File, new_len: u64) -> io::Result<Self> {
        let old_len = file.metadata()?.len();
        let pre = if new_len < old_len {
            read_range(file, new_len, old_len - new_len)?
        } else {
            Vec::new()
        };
        Ok(Self::SetLen {
            old_len,
            new_len,
            pre,
        })
    }

    /// How many bytes a write carried (`None` for a length change, which tears whole).
    pub(crate) fn write_len(&self) -> Option<u64> {
        match self {
            Self::Write { len, .. } => Some(*len),
            Self::SetLen { .. } => None,
        }
    }

    /// Puts the file back as it was before this change (every later change already undone).
    pub(crate) fn revert(&self, file: &File) -> io::Result<()> {
        match self {
            Self::Write {
                offset,
                old_len,
                pre,
                ..
            } => {
                file.write_all_at(pre, *offset)?;
                if file.metadata()?.len() > *old_len {
                    file.set_len(*old_len)?;
                }
            }
            Self::SetLen {
                old_len,
                new_len,
                pre,
            } => {
                file.set_len(*old_len)?;
                if !pre.is_empty() {
                    file.write_all_at(pre, *new_len)?;
                }
            }
        }
        Ok(())
    }

    /// Keeps only the first `keep` bytes of this write (every later change already undone).
    pub(crate) fn cut(&self, file: &File, keep: u64) -> io::Result<()> {
        let Self::Write {
            offset,
            len,
            old_len,
            pre,
        } = self
        else {
            return Ok(());
        };
        if keep >= *len {
            return Ok(());
        }
        let keep_usize = usize::try_from(keep).map_err(|_| io::ErrorKind::InvalidInput)?;
        if keep_usize < pre.len() {
            file.write_all_at(&pre[keep_usize..], offset + keep)?;
        }
        let len_after = (*old_len).max(offset + keep);
        if file.metadata()?.len() > len_after {
            file.set_len(len_after)?;
        }
        Ok(())
    }
}

/// The unsynced changes to one file's data, oldest first.
#[derive(Debug)]
pub(crate) struct FileLog {
    /// Read-write handle on the inode (valid whatever its names become).
    pub(crate) file: File,
    /// Global sequence number of the oldest change: orders files for `tear`.
    pub(crate) first_seq: u64,
    pub(crate) ops: Vec<DataUndo>,
}

impl FileLog {
    /// Undoes every change; returns how many undo steps failed.
    pub(crate) fn revert_all(&self) -> u64 {
        self.revert_from(0)
    }

    fn revert_from(&self, keep: usize) -> u64 {
        let mut errors = 0;
        for op in self.ops[keep..].iter().rev() {
            if let Err(e) = op.revert(&self.file) {
                tracing::warn!(error = %e, "faultfs: undoing a write failed");
                errors += 1;
            }
        }
        errors
    }

    /// Keeps a seeded random prefix of the changes (see [`plan_tear`]); returns how many
    /// changes were kept and how many undo steps failed.
    pub(crate) fn tear(&self, rng: &mut impl Rng) -> (usize, u64) {
        let lens: Vec<Option<u64>> = self.ops.iter().map(DataUndo::write_len).collect();
        let plan = plan_tear(&lens, rng);
        let mut errors = self.revert_from(plan.keep);
        if let (Some(bytes), Some(last)) = (plan.cut, plan.keep.checked_sub(1)) {
            if let Err(e) = self.ops[last].cut(&self.file, bytes) {
                tracing::warn!(error = %e, "faultfs: cutting a torn write failed");
                errors += 1;
            }
        }
        (plan.keep, errors)
    }
}

/// What a tear keeps of one file's unsynced changes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TearPlan {
    /// The first `keep` changes survive (0 = none, all = every one).
    pub(crate) keep: usize,
    /// The last kept change, when a write, survives with only this many of its bytes.
    pub(crate) cut: Option<u64>,
}

/// Draws a tear for changes described by their write lengths (`None`: not a write).
pub(crate) fn plan_tear(write_lens: &[Option<u64>], rng: &mut impl Rng) -> TearPlan {
    let keep = rng.gen_range(0..=write_lens.len());
    let cut = keep
        .checked_sub(1)
        .and_then(|last| write_lens[last])
        .filter(|len| *len > 0)
        .map(|len| rng.gen_range(1..=len));
    TearPlan { keep, cut }
}

/// A name in a directory held open by an `O_PATH` descriptor.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) dir: Arc<OwnedFd>,
    pub(crate) name: CString,
}

impl Entry {
    fn dir(&self) -> RawFd {
        self.dir.as_raw_fd()
    }
}

/// How to take back one directory change. Removed and replaced entries wait in the
/// graveyard (`grave`) until the change is durable or undone.
#[derive(Debug)]
pub(crate) enum DirUndo {
    /// A new name (create, mknod, mkdir, symlink, link).
    Created(Entry),
    /// A name removed (unlink, rmdir); the object waits in the graveyard.
    Removed { entry: Entry, grave: CString },
    /// `from` renamed to `to`; what `to` named before waits in the graveyard.
    Renamed {
        from: Entry,
        to: Entry,
        displaced: Option<CString>,
    },
    /// Two names swapped (`RENAME_EXCHANGE`).
    Exchanged { a: Entry, b: Entry },
}

impl DirUndo {
    /// Puts the names back as they were before this change (every later change undone).
    pub(crate) fn revert(&self, graveyard: RawFd) -> io::Result<()> {
        match self {
            Self::Created(e) => sys::remove_tree_at(e.dir(), &e.name),
            Self::Removed { entry, grave } => sys::rename_at(
                graveyard,
                grave,
                entry.dir(),
                &entry.name,
                libc::RENAME_NOREPLACE,
            ),
            Self::Renamed {
                from,
                to,
                displaced,
            } => {
                sys::rename_at(
                    to.dir(),
                    &to.name,
                    from.dir(),
                    &from.name,
                    libc::RENAME_NOREPLACE,
                )?;
                if let Some(grave) = displaced {
                    sys::rename_at(graveyard, grave, to.dir(), &to.name, libc::RENAME_NOREPLACE)?;
                }
                Ok(())
            }
            Self::Exchanged { a, b } => {
                sys::rename_at(a.dir(), &a.name, b.dir(), &b.name, libc::RENAME_EXCHANGE)
            }
        }
    }

    /// The graveyard entry this change keeps, deleted once the change is durable.
    pub(crate) fn grave(&self) -> Option<&CStr> {
        match self {
            Self::Removed { grave, .. } => Some(grave),
            Self::Renamed {
                displaced: Some(grave),
                ..
            } => Some(grave),
            _ => None,
        }
    }
}

/// One directory change and the directories (FUSE inode numbers) that must still be
/// fsynced before it is durable.
#[derive(Debug)]
pub(crate) struct DirOp {
    pub(crate) pending: Vec<u64>,
    pub(crate) undo: DirUndo,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (dir, f)
    }

    fn contents(f: &File) -> Vec<u8> {
        let len = f.metadata().unwrap().len();
        read_range(f, 0, len).unwrap()
    }

    fn apply(log: &mut FileLog, op: impl FnOnce(&File) -> DataUndo, change: impl FnOnce(&File)) {
        let undo = op(&log.file);
        change(&log.file);
        log.ops.push(undo);
    }

    #[test]
    fn revert_restores_overwrites_extensions_and_truncations() {
        let (_d, file) = file_with(b"hello world");
        let mut log = FileLog {
            file,
            first_seq: 0,
            ops: Vec::new(),
        };
        apply(
            &mut log,
            |f| DataUndo::before_write(f, 6, 10).unwrap(),
            |f| f.write_all_at(b"WORLD!!!!!", 6).unwrap(),
        );
        apply(
            &mut log,
            |f| DataUndo::before_set_len(f, 3).unwrap(),
            |f| f.set_len(3).unwrap(),
        );
        apply(
            &mut log,
            |f| DataUndo::before_write(f, 20, 2).unwrap(),
            |f| f.write_all_at(b"zz", 20).unwrap(),
        );
        assert_eq!(contents(&log.file).len(), 22);
        assert_eq!(log.revert_all(), 0);
        assert_eq!(contents(&log.file), b"hello world");
    }

    #[test]
    fn cut_keeps_a_prefix_of_the_last_write() {
        let (_d, file) = file_with(b"abcdef");
        let undo = DataUndo::before_write(&file, 4, 6).unwrap();
        file.write_all_at(b"XYZUVW", 4).unwrap();
        undo.cut(&file, 3).unwrap();
        assert_eq!(contents(&file), b"abcdXYZ");
        let (_d, file) = file_with(b"abcdefghij");
        let undo = DataUndo::before_write(&file, 2, 3).unwrap();
        file.write_all_at(b"XYZ", 2).unwrap();
        undo.cut(&file, 1).unwrap();
        assert_eq!(contents(&file), b"abXdefghij");
    }

    #[test]
    fn tear_plans_are_seeded_and_span_nothing_to_everything() {
        let lens = [Some(4), None, Some(8)];
        let draw = |seed| plan_tear(&lens, &mut StdRng::seed_from_u64(seed));
        let mut keeps = std::collections::BTreeSet::new();
        for seed in 0..200 {
            let plan = draw(seed);
            assert_eq!(plan, draw(seed));
            assert!(plan.keep <= lens.len());
            if plan.keep == 2 {
                assert_eq!(plan.cut, None, "a length change tears whole");
            }
            if let Some(c) = plan.cut {
                assert!(c >= 1 && c <= lens[plan.keep - 1].unwrap());
            }
            keeps.insert(plan.keep);
        }
        assert_eq!(keeps.len(), lens.len() + 1, "every prefix length occurs");
    }
}
