//! Thin wrappers over the `*at` system calls the passthrough needs (libc, no policy).
//!
//! Every backing object is reached through an `O_PATH` descriptor, never through a path
//! string, so renames of an ancestor never make a held reference point elsewhere.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A C string for a name or path; a NUL byte inside is `EINVAL`.
pub(crate) fn cstr(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `/proc/self/fd/N`: reopening through it reaches the very inode the descriptor holds.
pub(crate) fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a number")
}

/// An `O_PATH` descriptor for a path (not following a final symlink).
pub(crate) fn open_path(path: &Path) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str())?;
    let fd = check(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `O_PATH` descriptor for `name` inside the directory `dir`.
pub(crate) fn open_path_at(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    let fd = check(unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the inode behind an `O_PATH` descriptor for real I/O.
pub(crate) fn reopen(fd: RawFd, flags: libc::c_int) -> io::Result<File> {
    let p = proc_path(fd);
    let fd = check(unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) })?;
    Ok(unsafe { File::from_raw_fd(fd) })
}

pub(crate) fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

/// `lstat` of `name` in `dir`; `Ok(None)` when it does not exist.
pub(crate) fn stat_at(dir: RawFd, name: &CStr) -> io::Result<Option<libc::stat>> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let ret = unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    if ret == 0 {
        return Ok(Some(st));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOENT) {
        Ok(None)
    } else {
        Err(err)
    }
}

pub(crate) fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// `renameat2(2)`.
pub(crate) fn rename_at(
    old_dir: RawFd,
    old: &CStr,
    new_dir: RawFd,
    new: &CStr,
    flags: libc::c_uint,
) -> io::Result<()> {
    check(unsafe { libc::renameat2(old_dir, old.as_ptr(), new_dir, new.as_ptr(), flags) })?;
    Ok(())
}

pub(crate) fn mkdir_at(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    check(unsafe { libc::mkdirat(dir, name.as_ptr(), mode as libc::mode_t) })?;
    Ok(())
}

pub(crate) fn mknod_at(dir: RawFd, name: &CStr, mode: u32, rdev: u32) -> io::Result<()> {
    check(unsafe {
        libc::mknodat(
            dir,
            name.as_ptr(),
            mode as libc::mode_t,
            libc::dev_t::from(rdev),
        )
    })?;
    Ok(())
}

pub(crate) fn symlink_at(target: &Path, dir: RawFd, name: &CStr) -> io::Result<()> {
    let t = cstr(target.as_os_str())?;
    check(unsafe { libc::symlinkat(t.as_ptr(), dir, name.as_ptr()) })?;
    Ok(())
}

/// A new name for the inode behind an `O_PATH` descriptor (needs `CAP_DAC_READ_SEARCH`).
pub(crate) fn link_at(fd: RawFd, dir: RawFd, name: &CStr) -> io::Result<()> {
    check(unsafe { libc::linkat(fd, c"".as_ptr(), dir, name.as_ptr(), libc::AT_EMPTY_PATH) })?;
    Ok(())
}

/// Creates a regular file exclusively and opens it.
pub(crate) fn create_at(
    dir: RawFd,
    name: &CStr,
    flags: libc::c_int,
    mode: u32,
) -> io::Result<File> {
    let fd = check(unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            flags | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    Ok(unsafe { File::from_raw_fd(fd) })
}

pub(crate) fn chmod_at(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    check(unsafe { libc::fchmodat(dir, name.as_ptr(), mode as libc::mode_t, 0) })?;
    Ok(())
}

/// `chown` without following a final symlink; `u32::MAX` leaves an id as it is.
pub(crate) fn chown_at(dir: RawFd, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    check(unsafe { libc::fchownat(dir, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(())
}

/// `chown` of the inode behind an `O_PATH` descriptor.
pub(crate) fn chown_fd(fd: RawFd, uid: u32, gid: u32) -> io::Result<()> {
    check(unsafe {
        libc::fchownat(
            fd,
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(())
}

pub(crate) fn chmod_fd(fd: RawFd, mode: u32) -> io::Result<()> {
    let p = proc_path(fd);
    check(unsafe { libc::chmod(p.as_ptr(), mode as libc::mode_t) })?;
    Ok(())
}

/// Sets access and modification times (`None` leaves one as it is).
pub(crate) fn utimens_fd(
    fd: RawFd,
    atime: Option<libc::timespec>,
    mtime: Option<libc::timespec>,
) -> io::Result<()> {
    let omit = libc::timespec {
        tv_sec: 0,
        tv_nsec: libc::UTIME_OMIT,
    };
    let times = [atime.unwrap_or(omit), mtime.unwrap_or(omit)];
    let p = proc_path(fd);
    check(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) })?;
    Ok(())
}

pub(crate) fn readlink_fd(fd: RawFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    let n = unsafe {
        libc::readlinkat(
            fd,
            c"".as_ptr(),
            buf.as_mut_ptr().cast::<libc::c_char>(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Where the inode behind a descriptor currently is (absolute, as the kernel tracks it).
pub(crate) fn fd_location(fd: RawFd) -> io::Result<PathBuf> {
    let p = proc_path(fd);
    let target = std::fs::read_link(OsStr::from_bytes(p.as_bytes()))?;
    Ok(target)
}

pub(crate) fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    check(unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    })?;
    Ok(())
}

pub(crate) fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    let c = cstr(path.as_os_str())?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    check(unsafe { libc::statvfs(c.as_ptr(), &mut st) })?;
    Ok(st)
}

/// Entries of a directory (without `.` and `..`): name, inode number, `d_type`-derived mode.
pub(crate) fn list_dir(fd: RawFd) -> io::Result<Vec<(OsString, u64, u32)>> {
    use std::os::unix::fs::{DirEntryExt, FileTypeExt};
    let p = proc_path(fd);
    let mut out = Vec::new();
    for entry in std::fs::read_dir(OsStr::from_bytes(p.as_bytes()))? {
        let entry = entry?;
        let ft = entry.file_type()?;
        let mode = if ft.is_dir() {
            libc::S_IFDIR
        } else if ft.is_symlink() {
            libc::S_IFLNK
        } else if ft.is_fifo() {
            libc::S_IFIFO
        } else if ft.is_socket() {
            libc::S_IFSOCK
        } else if ft.is_char_device() {
            libc::S_IFCHR
        } else if ft.is_block_device() {
            libc::S_IFBLK
        } else {
            libc::S_IFREG
        };
        out.push((entry.file_name(), entry.ino(), mode));
    }
    Ok(out)
}

/// Whether the directory `name` inside `dir` has no entries.
pub(crate) fn dir_is_empty_at(dir: RawFd, name: &CStr) -> io::Result<bool> {
    let fd = open_path_at(dir, name)?;
    Ok(list_dir(fd.as_raw_fd())?.is_empty())
}

/// Removes `name` in `dir`, a whole tree when it is a directory.
pub(crate) fn remove_tree_at(dir: RawFd, name: &CStr) -> io::Result<()> {
    match stat_at(dir, name)? {
        None => Ok(()),
        Some(st) if is_dir(&st) => {
            let fd = open_path_at(dir, name)?;
            for (child, _, _) in list_dir(fd.as_raw_fd())? {
                remove_tree_at(fd.as_raw_fd(), &cstr(&child)?)?;
            }
            check(unsafe { libc::unlinkat(dir, name.as_ptr(), libc::AT_REMOVEDIR) })?;
            Ok(())
        }
        Some(_) => {
            check(unsafe { libc::unlinkat(dir, name.as_ptr(), 0) })?;
            Ok(())
        }
    }
}

/// `umount2(path, MNT_DETACH)`.
pub(crate) fn detach(path: &Path) -> io::Result<()> {
    let c = cstr(path.as_os_str())?;
    check(unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) })?;
    Ok(())
}
