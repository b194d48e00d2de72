//! The FUSE filesystem: a passthrough over the backing folder that records, per file and per
//! directory, what has not been fsynced, and forgets it on power loss.
//!
//! Durability model (strict POSIX, as LazyFS):
//! - a file's data (write, truncate, fallocate) is durable once that file is fsynced
//!   (`fdatasync` counts the same); `sync_file_range` never reaches a FUSE daemon;
//! - a directory entry change (create, mknod, mkdir, symlink, link, unlink, rmdir, rename) is
//!   durable once every directory it touched is fsynced after it (both for a rename across
//!   directories);
//! - everything else (modes, owners, times) is written through and not modelled.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::rules::{self, Command, Rules};
use crate::sys;
use crate::undo::{DataUndo, DirOp, DirUndo, Entry, FileLog};

/// The hidden folder inside the backing folder where removed and replaced entries wait
/// until their removal is durable. Not visible through the mount.
pub const GRAVEYARD: &str = ".faultfs";

/// Attributes and entries are never cached by the kernel: after a power loss every lookup
/// reaches the daemon (and gets EIO), and a remount sees the backing folder as it is.
const TTL: Duration = Duration::ZERO;

const ROOT: u64 = 1;

/// Counters and state reported by the `status` command (one line of JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Write operations applied (each FUSE write request).
    pub writes: u64,
    /// fsync, fdatasync and directory fsync requests received while powered (an `O_SYNC` or
    /// `O_DSYNC` write counts as one too).
    pub fsyncs: u64,
    /// fsyncs answered EIO by a `fail-fsync` rule, or by a power loss during a stall.
    pub fsyncs_failed: u64,
    /// fsyncs delayed by a `slow-fsync` rule.
    pub fsyncs_stalled: u64,
    /// Operations answered ENOSPC by an `enospc` rule.
    pub enospc: u64,
    /// Files with data changes not yet fsynced.
    pub unsynced_files: u64,
    /// Directory changes not yet made durable by directory fsyncs.
    pub unsynced_dir_ops: u64,
    /// Whether power was lost (every operation now fails with EIO).
    pub power_lost: bool,
    /// Undo steps that failed while reverting to the durable state (see the crate docs).
    pub undo_errors: u64,
}

#[derive(Debug)]
struct Inode {
    fd: Arc<OwnedFd>,
    nlookup: u64,
}

#[derive(Debug)]
enum Handle {
    File {
        file: File,
        sync: bool,
    },
    Dir {
        entries: Vec<(u64, FileType, OsString)>,
    },
}

/// Everything that changes, behind one lock.
#[derive(Debug, Default)]
pub(crate) struct State {
    power_lost: bool,
    inodes: HashMap<u64, Inode>,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    next_seq: u64,
    files: HashMap<u64, FileLog>,
    dir_ops: Vec<DirOp>,
    rules: Rules,
    counters: Status,
}

impl State {
    fn inode_fd(&self, ino: INodeNo) -> Result<Arc<OwnedFd>, Errno> {
        self.inodes
            .get(&ino.0)
            .map(|i| i.fd.clone())
            .ok_or(Errno::ENOENT)
    }

    fn remember(&mut self, ino: u64, fd: OwnedFd) {
        self.inodes
            .entry(ino)
            .or_insert_with(|| Inode {
                fd: Arc::new(fd),
                nlookup: 0,
            })
            .nlookup += 1;
    }

    fn add_handle(&mut self, handle: Handle) -> u64 {
        self.next_fh += 1;
        self.handles.insert(self.next_fh, handle);
        self.next_fh
    }

    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn log_dir(&mut self, mut dirs: Vec<u64>, undo: DirUndo) {
        dirs.dedup();
        self.seq();
        self.dir_ops.push(DirOp {
            pending: dirs,
            undo,
        });
    }

    /// The undo log of a file, opened on first use.
    fn file_log(&mut self, ino: u64, fd: RawFd) -> io::Result<&mut FileLog> {
        if !self.files.contains_key(&ino) {
            let file = sys::reopen(fd, libc::O_RDWR)?;
            let first_seq = self.next_seq + 1;
            self.files.insert(
                ino,
                FileLog {
                    file,
                    first_seq,
                    ops: Vec::new(),
                },
            );
        }
        Ok(self.files.get_mut(&ino).expect("inserted above"))
    }

    fn drop_empty_log(&mut self, ino: u64) {
        if self.files.get(&ino).is_some_and(|l| l.ops.is_empty()) {
            self.files.remove(&ino);
        }
    }

    fn status(&self) -> Status {
        Status {
            unsynced_files: self.files.values().filter(|l| !l.ops.is_empty()).count() as u64,
            unsynced_dir_ops: self.dir_ops.len() as u64,
            power_lost: self.power_lost,
            ..self.counters.clone()
        }
    }
}

/// What the FUSE session and the control socket share.
#[derive(Debug)]
pub(crate) struct Shared {
    backing: PathBuf,
    /// `flock` on the backing folder: one faultfs per backing folder at a time.
    _lock: File,
    grave_fd: OwnedFd,
    root_backing_ino: u64,
    state: Mutex<State>,
}

impl Shared {
    /// Takes the backing folder as durable: empties the graveyard a killed run left behind
    /// (removals that were pending then count as done).
    pub(crate) fn prepare(backing: &Path) -> io::Result<Self> {
        let lock = lock_backing(backing)?;
        let graveyard = backing.join(GRAVEYARD);
        match std::fs::symlink_metadata(&graveyard) {
            Ok(m) if m.is_dir() => {
                let leftovers = std::fs::read_dir(&graveyard)?.count();
                if leftovers > 0 {
                    tracing::info!(
                        leftovers,
                        "faultfs: deleting graveyard entries of an earlier run"
                    );
                }
                std::fs::remove_dir_all(&graveyard)?;
            }
            Ok(_) => std::fs::remove_file(&graveyard)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir(&graveyard)?;
        let root_fd = sys::open_path(backing)?;
        let grave_fd = sys::open_path(&graveyard)?;
        let root_backing_ino = sys::fstat(root_fd.as_raw_fd())?.st_ino;
        let mut state = State::default();
        state.inodes.insert(
            ROOT,
            Inode {
                fd: Arc::new(root_fd),
                nlookup: 1,
            },
        );
        Ok(Self {
            backing: backing.to_path_buf(),
            _lock: lock,
            grave_fd,
            root_backing_ino,
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state, or EIO once power was lost.
    fn live(&self) -> Result<MutexGuard<'_, State>, Errno> {
        let st = self.lock();
        if st.power_lost {
            Err(Errno::EIO)
        } else {
            Ok(st)
        }
    }

    pub(crate) fn status(&self) -> Status {
        self.lock().status()
    }

    pub(crate) fn backing(&self) -> &Path {
        &self.backing
    }

    /// FUSE inode number of a backing inode: the backing root is 1 (and a backing inode 1,
    /// if any, takes the root's number), every other keeps its own.
    fn map_ino(&self, backing_ino: u64) -> u64 {
        if backing_ino == self.root_backing_ino {
            ROOT
        } else if backing_ino == ROOT {
            self.root_backing_ino
        } else {
            backing_ino
        }
    }

    fn attr(&self, st: &libc::stat) -> FileAttr {
        FileAttr {
            ino: INodeNo(self.map_ino(st.st_ino)),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: system_time(st.st_atime, st.st_atime_nsec),
            mtime: system_time(st.st_mtime, st.st_mtime_nsec),
            ctime: system_time(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind: kind(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    /// Path of an inode relative to the mount root (`.` for the root), as fault rules see it.
    /// An unlinked file still open shows as its graveyard entry (`.faultfs/...`).
    fn rel_path(&self, fd: RawFd) -> String {
        match sys::fd_location(fd) {
            Ok(p) => match p.strip_prefix(&self.backing) {
                Ok(r) if r.as_os_str().is_empty() => ".".to_owned(),
                Ok(r) => r.to_string_lossy().into_owned(),
                Err(_) => p.to_string_lossy().into_owned(),
            },
            Err(_) => String::new(),
        }
    }

    fn child_path(&self, parent: RawFd, name: &OsStr) -> String {
        let p = self.rel_path(parent);
        if p == "." {
            name.to_string_lossy().into_owned()
        } else {
            format!("{p}/{}", name.to_string_lossy())
        }
    }

    fn grave_name(st: &mut State, kind: &str) -> CString {
        let n = st.seq();
        CString::new(format!("{kind}{n}")).expect("no NUL")
    }

    /// Makes a file's data durable.
    fn commit_file(&self, st: &mut State, ino: u64) {
        st.files.remove(&ino);
    }

    /// Makes the changes in a directory durable; changes whose every directory is now
    /// synced are done, and their graveyard entries deleted.
    fn commit_dir(&self, st: &mut State, ino: u64) {
        for op in &mut st.dir_ops {
            op.pending.retain(|d| *d != ino);
        }
        let (done, rest): (Vec<DirOp>, Vec<DirOp>) = std::mem::take(&mut st.dir_ops)
            .into_iter()
            .partition(|op| op.pending.is_empty());
        st.dir_ops = rest;
        for op in done {
            let Some(grave) = op.undo.grave() else {
                continue;
            };
            let grave_fd = self.grave_fd.as_raw_fd();
            if let Ok(Some(gst)) = sys::stat_at(grave_fd, grave) {
                if !sys::is_dir(&gst) && gst.st_nlink <= 1 {
                    // The inode dies: its unsynced data no longer matters.
                    st.files.remove(&self.map_ino(gst.st_ino));
                }
            }
            if let Err(e) = sys::remove_tree_at(grave_fd, grave) {
                tracing::warn!(error = %e, "faultfs: deleting a graveyard entry failed");
            }
        }
    }

    /// Reverts to the durable state (tearing files when `seed` is given) and refuses all
    /// further I/O. Returns the `ok` answer.
    fn lose_power(&self, st: &mut State, seed: Option<u64>) -> String {
        if st.power_lost {
            return "ok power already lost".to_owned();
        }
        let mut files: Vec<FileLog> = st.files.drain().map(|(_, log)| log).collect();
        files.sort_by_key(|log| log.first_seq);
        let total_ops: usize = files.iter().map(|l| l.ops.len()).sum();
        let mut kept = 0;
        let mut errors = 0;
        match seed {
            None => {
                for log in &files {
                    errors += log.revert_all();
                }
            }
            Some(seed) => {
                let mut rng = StdRng::seed_from_u64(seed);
                for log in &files {
                    let (k, e) = log.tear(&mut rng);
                    kept += k;
                    errors += e;
                }
            }
        }
        let dir_ops = std::mem::take(&mut st.dir_ops);
        let n_dir = dir_ops.len();
        for op in dir_ops.iter().rev() {
            if let Err(e) = op.undo.revert(self.grave_fd.as_raw_fd()) {
                tracing::warn!(error = %e, undo = ?op.undo, "faultfs: undoing a directory change failed");
                errors += 1;
            }
        }
        st.counters.undo_errors += errors;
        st.power_lost = true;
        st.handles.clear();
        tracing::warn!(
            files = files.len(),
            dir_ops = n_dir,
            torn = seed.is_some(),
            "faultfs: power lost"
        );
        let n_files = files.len();
        match seed {
            None => format!(
                "ok power lost: reverted {total_ops} write(s) in {n_files} file(s) and \
                 {n_dir} directory change(s)"
            ),
            Some(seed) => format!(
                "ok torn with seed {seed}: kept {kept} of {total_ops} unsynced write(s) in \
                 {n_files} file(s); reverted {n_dir} directory change(s)"
            ),
        }
    }

    /// Runs one control command line; the answer is one line, `ok ...` or `error ...`.
    pub(crate) fn control(&self, line: &str) -> String {
        let cmd = match rules::parse(line) {
            Ok(cmd) => cmd,
            Err(msg) => return format!("error {msg}"),
        };
        let mut st = self.lock();
        match cmd {
            Command::PowerLoss => self.lose_power(&mut st, None),
            Command::Tear(seed) => self.lose_power(&mut st, Some(seed)),
            Command::FailFsync(p, n) => {
                let text = format!("ok fail-fsync {} {n}", p.text());
                st.rules.add_fail_fsync(p, n);
                text
            }
            Command::Enospc(p, n) => {
                let text = format!("ok enospc {} {n}", p.text());
                st.rules.add_enospc(p, n);
                text
            }
            Command::SlowFsync(p, ms) => {
                let text = format!("ok slow-fsync {} {ms}ms", p.text());
                st.rules.add_slow_fsync(p, ms);
                text
            }
            Command::Clear => {
                let n = st.rules.len();
                st.rules.clear();
                format!("ok cleared {n} rule(s)")
            }
            Command::Status => match serde_json::to_string(&st.status()) {
                Ok(json) => format!("ok {json}"),
                Err(e) => format!("error status: {e}"),
            },
        }
    }

    // ---- operations (each returns what the reply needs) ----

    fn lookup(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr, Errno> {
        let mut st = self.live()?;
        if hidden(parent, name) {
            return Err(Errno::ENOENT);
        }
        let pfd = st.inode_fd(parent)?;
        let fd = sys::open_path_at(pfd.as_raw_fd(), &sys::cstr(name)?)?;
        let attr = self.attr(&sys::fstat(fd.as_raw_fd())?);
        st.remember(attr.ino.0, fd);
        Ok(attr)
    }

    fn getattr(&self, ino: INodeNo) -> Result<FileAttr, Errno> {
        let st = self.live()?;
        let fd = st.inode_fd(ino)?;
        Ok(self.attr(&sys::fstat(fd.as_raw_fd())?))
    }

    /// Refuses a space-consuming change on `path` when an `enospc` rule says so.
    fn check_space(&self, st: &mut State, path: impl FnOnce() -> String) -> Result<(), Errno> {
        if st.rules.has_enospc_rules() && st.rules.take_enospc(&path()) {
            st.counters.enospc += 1;
            return Err(Errno::ENOSPC);
        }
        Ok(())
    }

    /// The common part of creating a name: checks, the creation itself, owner and mode,
    /// the undo record, and the new inode's attributes.
    fn make_entry(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: Option<u32>,
        create: impl FnOnce(RawFd, &CString) -> io::Result<()>,
    ) -> Result<FileAttr, Errno> {
        let mut st = self.live()?;
        if hidden(parent, name) {
            return Err(Errno::EPERM);
        }
        let pfd = st.inode_fd(parent)?;
        self.check_space(&mut st, || self.child_path(pfd.as_raw_fd(), name))?;
        let cname = sys::cstr(name)?;
        create(pfd.as_raw_fd(), &cname)?;
        st.log_dir(
            vec![parent.0],
            DirUndo::Created(Entry {
                dir: pfd.clone(),
                name: cname.clone(),
            }),
        );
        if let Some(mode) = mode {
            sys::chmod_at(pfd.as_raw_fd(), &cname, mode & 0o7777)?;
        }
        sys::chown_at(pfd.as_raw_fd(), &cname, req.uid(), req.gid())?;
        let fd = sys::open_path_at(pfd.as_raw_fd(), &cname)?;
        let attr = self.attr(&sys::fstat(fd.as_raw_fd())?);
        st.remember(attr.ino.0, fd);
        Ok(attr)
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<(FileAttr, u64), Errno> {
        let mut file = None;
        let attr = self.make_entry(req, parent, name, None, |dir, cname| {
            let f = sys::create_at(dir, cname, flags & libc::O_ACCMODE, mode & 0o7777)?;
            f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
            file = Some(f);
            Ok(())
        })?;
        let file = file.expect("created");
        let fh = self.lock().add_handle(Handle::File {
            file,
            sync: flags & libc::O_DSYNC != 0,
        });
        Ok((attr, fh))
    }

    fn unlink(&self, parent: INodeNo, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let mut st = self.live()?;
        if hidden(parent, name) {
            return Err(Errno::ENOENT);
        }
        let pfd = st.inode_fd(parent)?;
        let cname = sys::cstr(name)?;
        let stat = sys::stat_at(pfd.as_raw_fd(), &cname)?.ok_or(Errno::ENOENT)?;
        match (dir, sys::is_dir(&stat)) {
            (false, true) => return Err(Errno::EISDIR),
            (true, false) => return Err(Errno::ENOTDIR),
            (true, true) if !sys::dir_is_empty_at(pfd.as_raw_fd(), &cname)? => {
                return Err(Errno::ENOTEMPTY)
            }
            _ => {}
        }
        let grave = Self::grave_name(&mut st, "removed-");
        sys::rename_at(
            pfd.as_raw_fd(),
            &cname,
            self.grave_fd.as_raw_fd(),
            &grave,
            libc::RENAME_NOREPLACE,
        )?;
        st.log_dir(
            vec![parent.0],
            DirUndo::Removed {
                entry: Entry {
                    dir: pfd,
                    name: cname,
                },
                grave,
            },
        );
        Ok(())
    }

    fn rename(
        &self,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        let mut st = self.live()?;
        if hidden(parent, name) {
            return Err(Errno::ENOENT);
        }
        if hidden(newparent, newname) {
            return Err(Errno::EPERM);
        }
        let supported = RenameFlags::RENAME_NOREPLACE | RenameFlags::RENAME_EXCHANGE;
        if !supported.contains(flags) || flags == supported {
            return Err(Errno::EINVAL);
        }
        let from = Entry {
            dir: st.inode_fd(parent)?,
            name: sys::cstr(name)?,
        };
        let to = Entry {
            dir: st.inode_fd(newparent)?,
            name: sys::cstr(newname)?,
        };
        let (fd, td) = (from.dir.as_raw_fd(), to.dir.as_raw_fd());
        let src = sys::stat_at(fd, &from.name)?.ok_or(Errno::ENOENT)?;
        let dirs = vec![parent.0, newparent.0];
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            sys::rename_at(fd, &from.name, td, &to.name, libc::RENAME_EXCHANGE)?;
            st.log_dir(dirs, DirUndo::Exchanged { a: from, b: to });
            return Ok(());
        }
        let displaced = match sys::stat_at(td, &to.name)? {
            None => None,
            Some(_) if flags.contains(RenameFlags::RENAME_NOREPLACE) => return Err(Errno::EEXIST),
            // Two names of one inode: POSIX says do nothing.
            Some(dst) if dst.st_ino == src.st_ino && dst.st_dev == src.st_dev => return Ok(()),
            Some(dst) => {
                match (sys::is_dir(&src), sys::is_dir(&dst)) {
                    (true, false) => return Err(Errno::ENOTDIR),
                    (false, true) => return Err(Errno::EISDIR),
                    (true, true) if !sys::dir_is_empty_at(td, &to.name)? => {
                        return Err(Errno::ENOTEMPTY)
                    }
                    _ => {}
                }
                let grave = Self::grave_name(&mut st, "replaced-");
                let gd = self.grave_fd.as_raw_fd();
                sys::rename_at(td, &to.name, gd, &grave, libc::RENAME_NOREPLACE)?;
                Some(grave)
            }
        };
        if let Err(e) = sys::rename_at(fd, &from.name, td, &to.name, libc::RENAME_NOREPLACE) {
            if let Some(grave) = &displaced {
                let gd = self.grave_fd.as_raw_fd();
                if let Err(e) = sys::rename_at(gd, grave, td, &to.name, libc::RENAME_NOREPLACE) {
                    tracing::error!(error = %e, "faultfs: restoring a rename target failed");
                    st.counters.undo_errors += 1;
                }
            }
            return Err(e.into());
        }
        st.log_dir(
            dirs,
            DirUndo::Renamed {
                from,
                to,
                displaced,
            },
        );
        Ok(())
    }

    fn link(&self, ino: INodeNo, newparent: INodeNo, newname: &OsStr) -> Result<FileAttr, Errno> {
        let mut st = self.live()?;
        if hidden(newparent, newname) {
            return Err(Errno::EPERM);
        }
        let ifd = st.inode_fd(ino)?;
        let pfd = st.inode_fd(newparent)?;
        self.check_space(&mut st, || self.child_path(pfd.as_raw_fd(), newname))?;
        let cname = sys::cstr(newname)?;
        sys::link_at(ifd.as_raw_fd(), pfd.as_raw_fd(), &cname)?;
        st.log_dir(
            vec![newparent.0],
            DirUndo::Created(Entry {
                dir: pfd.clone(),
                name: cname.clone(),
            }),
        );
        let fd = sys::open_path_at(pfd.as_raw_fd(), &cname)?;
        let attr = self.attr(&sys::fstat(fd.as_raw_fd())?);
        st.remember(attr.ino.0, fd);
        Ok(attr)
    }

    fn open(&self, ino: INodeNo, flags: OpenFlags) -> Result<u64, Errno> {
        let mut st = self.live()?;
        let fd = st.inode_fd(ino)?;
        let file = sys::reopen(fd.as_raw_fd(), flags.0 & libc::O_ACCMODE)?;
        if flags.0 & libc::O_TRUNC != 0 {
            self.set_len(&mut st, ino, fd.as_raw_fd(), 0)?;
        }
        Ok(st.add_handle(Handle::File {
            file,
            sync: flags.0 & libc::O_DSYNC != 0,
        }))
    }

    fn read(&self, fh: FileHandle, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let st = self.live()?;
        let Some(Handle::File { file, .. }) = st.handles.get(&fh.0) else {
            return Err(Errno::EBADF);
        };
        let mut buf = vec![0u8; size as usize];
        let mut n = 0;
        while n < buf.len() {
            match file.read_at(&mut buf[n..], offset + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        buf.truncate(n);
        Ok(buf)
    }

    fn write(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        flags: OpenFlags,
    ) -> Result<u32, Errno> {
        let mut st = self.live()?;
        let fd = st.inode_fd(ino)?;
        let sync = flags.0 & libc::O_DSYNC != 0
            || matches!(st.handles.get(&fh.0), Some(Handle::File { sync: true, .. }));
        self.check_space(&mut st, || self.rel_path(fd.as_raw_fd()))?;
        if !data.is_empty() {
            st.seq();
            let log = st.file_log(ino.0, fd.as_raw_fd())?;
            let undo = DataUndo::before_write(&log.file, offset, data.len() as u64)?;
            if let Err(e) = log.file.write_all_at(data, offset) {
                if let Err(e) = undo.revert(&log.file) {
                    tracing::error!(error = %e, "faultfs: undoing a failed write failed");
                    st.counters.undo_errors += 1;
                }
                st.drop_empty_log(ino.0);
                return Err(e.into());
            }
            log.ops.push(undo);
            st.counters.writes += 1;
        }
        if sync {
            // O_SYNC / O_DSYNC / RWF_DSYNC: the write is an fsync too (never stalled).
            st.counters.fsyncs += 1;
            if st.rules.has_fsync_rules()
                && st.rules.take_fail_fsync(&self.rel_path(fd.as_raw_fd()))
            {
                st.counters.fsyncs_failed += 1;
                return Err(Errno::EIO);
            }
            self.commit_file(&mut st, ino.0);
        }
        Ok(data.len() as u32)
    }

    /// Sets a file's length, recording the undo; growth obeys `enospc` rules.
    fn set_len(&self, st: &mut State, ino: INodeNo, fd: RawFd, size: u64) -> Result<(), Errno> {
        let cur = sys::fstat(fd)?.st_size as u64;
        if size == cur {
            return Ok(());
        }
        if size > cur {
            self.check_space(st, || self.rel_path(fd))?;
        }
        st.seq();
        let log = st.file_log(ino.0, fd)?;
        let undo = DataUndo::before_set_len(&log.file, size)?;
        let res = log.file.set_len(size);
        match res {
            Ok(()) => log.ops.push(undo),
            Err(e) => {
                st.drop_empty_log(ino.0);
                return Err(e.into());
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
    ) -> Result<FileAttr, Errno> {
        let mut st = self.live()?;
        let fd = st.inode_fd(ino)?;
        let raw = fd.as_raw_fd();
        if let Some(size) = size {
            self.set_len(&mut st, ino, raw, size)?;
        }
        if let Some(mode) = mode {
            sys::chmod_fd(raw, mode & 0o7777)?;
        }
        if uid.is_some() || gid.is_some() {
            sys::chown_fd(raw, uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))?;
        }
        if atime.is_some() || mtime.is_some() {
            sys::utimens_fd(raw, atime.map(timespec), mtime.map(timespec))?;
        }
        Ok(self.attr(&sys::fstat(raw)?))
    }

    fn fallocate(&self, ino: INodeNo, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let mut st = self.live()?;
        let fd = st.inode_fd(ino)?;
        let raw = fd.as_raw_fd();
        let cur = sys::fstat(raw)?.st_size as u64;
        let end = offset.saturating_add(length);
        let grows = mode == 0 && end > cur;
        if grows {
            self.check_space(&mut st, || self.rel_path(raw))?;
            st.seq();
        }
        let log = st.file_log(ino.0, raw)?;
        let undo = if grows {
            Some(DataUndo::before_set_len(&log.file, end)?)
        } else {
            None
        };
        let res = sys::fallocate(&log.file, mode, offset, length);
        if let (Ok(()), Some(undo)) = (&res, undo) {
            log.ops.push(undo);
        }
        st.drop_empty_log(ino.0);
        Ok(res?)
    }

    fn opendir(&self, ino: INodeNo) -> Result<u64, Errno> {
        let mut st = self.live()?;
        let fd = st.inode_fd(ino)?;
        let mut entries = vec![
            (ino.0, FileType::Directory, OsString::from(".")),
            (ino.0, FileType::Directory, OsString::from("..")),
        ];
        for (name, backing_ino, mode) in sys::list_dir(fd.as_raw_fd())? {
            if hidden(ino, &name) {
                continue;
            }
            entries.push((self.map_ino(backing_ino), kind(mode), name));
        }
        Ok(st.add_handle(Handle::Dir { entries }))
    }

    /// fsync and fsyncdir: fault rules first, then the commit, maybe after a stall that
    /// runs on its own thread so that other operations go on meanwhile.
    fn fsync(self: &Arc<Self>, ino: INodeNo, dir: bool, reply: ReplyEmpty) {
        let mut st = match self.live() {
            Ok(st) => st,
            Err(e) => return reply.error(e),
        };
        st.counters.fsyncs += 1;
        let mut stall = None;
        if st.rules.has_fsync_rules() {
            let path = match st.inode_fd(ino) {
                Ok(fd) => self.rel_path(fd.as_raw_fd()),
                Err(e) => return reply.error(e),
            };
            if st.rules.take_fail_fsync(&path) {
                st.counters.fsyncs_failed += 1;
                tracing::debug!(%path, "faultfs: failing fsync");
                return reply.error(Errno::EIO);
            }
            stall = st.rules.stall_millis(&path);
        }
        let Some(millis) = stall else {
            self.commit(&mut st, ino.0, dir);
            return reply.ok();
        };
        st.counters.fsyncs_stalled += 1;
        drop(st);
        let shared = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("faultfs-slow-fsync".into())
            .spawn(move || {
                std::thread::sleep(Duration::from_millis(millis));
                let mut st = shared.lock();
                if st.power_lost {
                    st.counters.fsyncs_failed += 1;
                    reply.error(Errno::EIO);
                } else {
                    shared.commit(&mut st, ino.0, dir);
                    reply.ok();
                }
            });
        if let Err(e) = spawned {
            // The reply moved into the closure that failed to start; the kernel request
            // stays unanswered until unmount. Only possible when out of threads.
            tracing::error!(error = %e, "faultfs: cannot start a slow-fsync thread");
        }
    }

    fn commit(&self, st: &mut State, ino: u64, dir: bool) {
        if dir {
            self.commit_dir(st, ino);
        } else {
            self.commit_file(st, ino);
        }
    }
}

/// Locks the backing folder against a second faultfs. A mount that was just detached lazily
/// lets go when its last user does, so wait a little for that.
fn lock_backing(backing: &Path) -> io::Result<File> {
    let dir = File::open(backing)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(dir);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(err);
        }
        if std::time::Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "another faultfs serves this backing folder",
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn hidden(parent: INodeNo, name: &OsStr) -> bool {
    parent.0 == ROOT && name.as_bytes() == GRAVEYARD.as_bytes()
}

fn system_time(secs: i64, nsecs: i64) -> SystemTime {
    let nsecs = nsecs.clamp(0, 999_999_999) as u32;
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::new(0, nsecs)
    }
}

fn timespec(t: TimeOrNow) -> libc::timespec {
    match t {
        TimeOrNow::Now => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        TimeOrNow::SpecificTime(t) => {
            let (sec, nsec) = match t.duration_since(UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                Err(e) => {
                    let d = e.duration();
                    let mut sec = -(d.as_secs() as i64);
                    let mut nsec = -(d.subsec_nanos() as i64);
                    if nsec < 0 {
                        sec -= 1;
                        nsec += 1_000_000_000;
                    }
                    (sec, nsec)
                }
            };
            libc::timespec {
                tv_sec: sec,
                tv_nsec: nsec,
            }
        }
    }
}

fn kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// The [`Filesystem`] handed to fuser: every call locks the shared state.
#[derive(Debug)]
pub(crate) struct FaultFs {
    pub(crate) shared: Arc<Shared>,
}

/// Every open file bypasses the page cache, so each read and write reaches the daemon (and
/// fails after a power loss) and a remount never sees stale pages.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_DIRECT_IO;

impl Filesystem for FaultFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> io::Result<()> {
        // Let shared mmap work despite direct I/O (kernels from 6.6); dirty pages still reach
        // `write` and `msync` reaches `fsync`. Older kernels refuse shared maps (ENODEV).
        if let Err(missing) = config.add_capabilities(fuser::InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP) {
            tracing::debug!(?missing, "faultfs: kernel cannot mmap direct-I/O files");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.shared.lookup(parent, name) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if ino.0 == ROOT {
            return;
        }
        let mut st = self.shared.lock();
        if let Some(inode) = st.inodes.get_mut(&ino.0) {
            inode.nlookup = inode.nlookup.saturating_sub(nlookup);
            if inode.nlookup == 0 {
                st.inodes.remove(&ino.0);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.shared.getattr(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.shared.setattr(ino, mode, uid, gid, size, atime, mtime) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let res = self.shared.live().and_then(|st| {
            let fd = st.inode_fd(ino)?;
            Ok(sys::readlink_fd(fd.as_raw_fd())?)
        });
        match res {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let res = self
            .shared
            .make_entry(req, parent, name, Some(mode), |dir, n| {
                sys::mknod_at(dir, n, mode, rdev)
            });
        match res {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let res = self
            .shared
            .make_entry(req, parent, name, Some(mode), |dir, n| {
                sys::mkdir_at(dir, n, mode & 0o7777)
            });
        match res {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.shared.unlink(parent, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.shared.unlink(parent, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let res = self
            .shared
            .make_entry(req, parent, link_name, None, |dir, n| {
                sys::symlink_at(target, dir, n)
            });
        match res {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.shared.rename(parent, name, newparent, newname, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match self.shared.link(ino, newparent, newname) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.shared.open(ino, flags) {
            Ok(fh) => reply.opened(FileHandle(fh), OPEN_FLAGS),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        match self.shared.read(fh, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.shared.write(ino, fh, offset, data, flags) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.shared.live() {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.shared.lock().handles.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.shared.fsync(ino, false, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.shared.opendir(ino) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let st = match self.shared.live() {
            Ok(st) => st,
            Err(e) => return reply.error(e),
        };
        let Some(Handle::Dir { entries }) = st.handles.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.shared.lock().handles.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.shared.fsync(ino, true, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let res = self
            .shared
            .live()
            .and_then(|_| Ok(sys::statvfs(&self.shared.backing)?));
        match res {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        match self.shared.live() {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.shared.create(req, parent, name, mode, flags) {
            Ok((attr, fh)) => reply.created(&TTL, &attr, Generation(0), FileHandle(fh), OPEN_FLAGS),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.shared.fallocate(ino, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}
