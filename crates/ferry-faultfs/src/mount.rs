//! Mounting and unmounting: the FUSE session on its own thread, the control socket, stale
//! mounts of killed runs, and the blocking foreground runner for the CLI.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuser::{MountOption, SessionACL, SessionUnmounter};

use crate::control;
use crate::fs::{FaultFs, Shared, Status};
use crate::{sys, FaultFsError};

/// How long `start` waits for the kernel's FUSE handshake and the mount to show.
const MOUNT_WAIT: Duration = Duration::from_secs(10);
/// How long `shutdown` waits for the FUSE session to end after unmounting.
const SESSION_END_WAIT: Duration = Duration::from_secs(3);

/// A live faultfs mount: the FUSE session and the control socket, both on background
/// threads of this process. Dropping it unmounts (as [`Mount::shutdown`], ignoring errors).
///
/// If the process dies without unmounting (SIGKILL), the kernel keeps a dead mount that
/// answers ENOTCONN; the next [`Mount::start`] on that mountpoint detaches it first.
#[derive(Debug)]
pub struct Mount {
    shared: Arc<Shared>,
    mountpoint: PathBuf,
    control_path: PathBuf,
    unmounter: Option<SessionUnmounter>,
    session: Option<JoinHandle<io::Result<()>>>,
    control: Option<control::Server>,
}

impl Mount {
    /// Mounts a faultfs of `backing` at `mountpoint` (an existing empty directory, outside
    /// `backing`) with its control socket at `control`, and returns once the mount is live.
    ///
    /// Whatever `backing` holds now is the durable state: nothing is pending, and graveyard
    /// leftovers of an earlier, killed run are deleted. Needs root (the mount(2) call) and
    /// `/dev/fuse`.
    pub fn start(backing: &Path, mountpoint: &Path, control: &Path) -> Result<Self, FaultFsError> {
        let backing_err = |source| FaultFsError::Backing {
            path: backing.to_path_buf(),
            source,
        };
        let backing = backing.canonicalize().map_err(backing_err)?;
        if !backing.is_dir() {
            return Err(backing_err(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            )));
        }
        let mountpoint = resolve_mountpoint(mountpoint)?;
        if mountpoint.starts_with(&backing) || backing.starts_with(&mountpoint) {
            return Err(FaultFsError::Mountpoint {
                path: mountpoint,
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the mountpoint and the backing folder must not contain each other",
                ),
            });
        }
        clear_stale_mount(&mountpoint)?;
        let parent_dev = std::fs::metadata(mountpoint.parent().unwrap_or(Path::new("/")))
            .map(|m| m.dev())
            .map_err(|source| FaultFsError::Mountpoint {
                path: mountpoint.clone(),
                source,
            })?;

        let listener = control::Server::bind(control)?;
        // Past this point a failure must not leave the socket file behind.
        let unbind = |e: FaultFsError| {
            let _ = std::fs::remove_file(control);
            e
        };
        let shared = Shared::prepare(&backing).map_err(|source| {
            unbind(FaultFsError::Backing {
                path: backing.clone(),
                source,
            })
        })?;
        let shared = Arc::new(shared);

        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName("faultfs".into()),
            MountOption::Subtype("faultfs".into()),
            MountOption::DefaultPermissions,
        ];
        config.acl = SessionACL::All;
        let fs = FaultFs {
            shared: shared.clone(),
        };
        let (tx, rx) = mpsc::channel();
        let mp = mountpoint.clone();
        let session = std::thread::Builder::new()
            .name("faultfs-fuse".into())
            .spawn(move || match fuser::Session::new(fs, &mp, &config) {
                Ok(mut session) => {
                    let _ = tx.send(Ok(session.unmount_callable()));
                    session.run()
                }
                Err(e) => {
                    let copy = io::Error::new(e.kind(), e.to_string());
                    let _ = tx.send(Err(e));
                    Err(copy)
                }
            })
            .map_err(|source| {
                unbind(FaultFsError::Mount {
                    path: mountpoint.clone(),
                    source,
                })
            })?;
        let unmounter = match rx.recv_timeout(MOUNT_WAIT) {
            Ok(Ok(u)) => u,
            Ok(Err(source)) => {
                return Err(unbind(FaultFsError::Mount {
                    path: mountpoint,
                    source,
                }))
            }
            Err(_) => {
                let _ = sys::detach(&mountpoint);
                return Err(unbind(FaultFsError::MountTimeout {
                    path: mountpoint,
                    waited: MOUNT_WAIT,
                }));
            }
        };
        let mut mount = Self {
            shared: shared.clone(),
            mountpoint,
            control_path: control.to_path_buf(),
            unmounter: Some(unmounter),
            session: Some(session),
            control: None,
        };
        // From here on `mount.stop()` (also on drop) removes the socket file.
        // The handshake is done; make sure the mount answers before handing it out.
        let deadline = Instant::now() + MOUNT_WAIT;
        loop {
            match std::fs::metadata(&mount.mountpoint) {
                Ok(m) if m.dev() != parent_dev => break,
                _ if Instant::now() > deadline => {
                    let path = mount.mountpoint.clone();
                    let _ = mount.stop();
                    return Err(unbind(FaultFsError::MountTimeout {
                        path,
                        waited: MOUNT_WAIT,
                    }));
                }
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        match control::Server::start(control, listener, shared) {
            Ok(server) => mount.control = Some(server),
            Err(e) => return Err(unbind(e)),
        }
        tracing::info!(
            backing = %backing.display(),
            mountpoint = %mount.mountpoint.display(),
            control = %control.display(),
            "faultfs: mounted"
        );
        Ok(mount)
    }

    /// Where the filesystem is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The backing folder (canonical path).
    pub fn backing(&self) -> &Path {
        self.shared.backing()
    }

    /// The control socket's path.
    pub fn control_path(&self) -> &Path {
        &self.control_path
    }

    /// Runs a control command directly (the same as through the socket): the whole answer
    /// line, `ok ...` or `error ...`.
    pub fn command(&self, line: &str) -> String {
        self.shared.control(line)
    }

    /// Counters and state, as the `status` command reports them.
    pub fn status(&self) -> Status {
        self.shared.status()
    }

    /// Whether the FUSE session still runs (false once unmounted, also from outside).
    pub fn is_running(&self) -> bool {
        self.session.as_ref().is_some_and(|s| !s.is_finished())
    }

    /// Unmounts and waits (bounded) for the FUSE session to end. When the unmount fails
    /// (files still open: EBUSY) the mount is detached lazily (`MNT_DETACH`) and an error
    /// returned; the session then ends when the last user lets go.
    pub fn shutdown(mut self) -> Result<(), FaultFsError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), FaultFsError> {
        if let Some(server) = self.control.take() {
            server.stop();
        }
        let Some(mut unmounter) = self.unmounter.take() else {
            return Ok(());
        };
        let mut result = Ok(());
        if let Err(source) = unmounter.unmount() {
            tracing::warn!(error = %source, mountpoint = %self.mountpoint.display(),
                "faultfs: unmount failed, detaching lazily");
            result = match sys::detach(&self.mountpoint) {
                Ok(()) => Err(FaultFsError::Busy {
                    path: self.mountpoint.clone(),
                    source,
                }),
                Err(detach) => Err(FaultFsError::Unmount {
                    path: self.mountpoint.clone(),
                    source,
                    detach,
                }),
            };
        }
        if let Some(session) = self.session.take() {
            let deadline = Instant::now() + SESSION_END_WAIT;
            while !session.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if session.is_finished() {
                match session.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "faultfs: FUSE session ended with an error")
                    }
                    Err(_) => tracing::error!("faultfs: FUSE session thread panicked"),
                }
            } else if result.is_ok() {
                result = Err(FaultFsError::SessionStuck {
                    path: self.mountpoint.clone(),
                    waited: SESSION_END_WAIT,
                });
            }
        }
        if result.is_ok() {
            tracing::info!(mountpoint = %self.mountpoint.display(), "faultfs: unmounted");
        }
        result
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "faultfs: unmount on drop failed");
        }
    }
}

/// The mountpoint as an absolute path, without touching the mountpoint itself (a dead
/// mount there fails every access with ENOTCONN).
fn resolve_mountpoint(path: &Path) -> Result<PathBuf, FaultFsError> {
    let err = |source| FaultFsError::Mountpoint {
        path: path.to_path_buf(),
        source,
    };
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(err)?.join(path)
    };
    let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "needs a parent directory and a name",
        )));
    };
    Ok(parent.canonicalize().map_err(err)?.join(name))
}

/// Detaches dead FUSE mounts (their server was killed) stacked on `path`; refuses a path
/// where something live is mounted.
fn clear_stale_mount(path: &Path) -> Result<(), FaultFsError> {
    let err = |source| FaultFsError::Mountpoint {
        path: path.to_path_buf(),
        source,
    };
    for _ in 0..16 {
        match std::fs::metadata(path) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)) => {
                tracing::warn!(mountpoint = %path.display(),
                    "faultfs: detaching a dead mount left by a killed run");
                sys::detach(path).map_err(err)?;
            }
            Err(e) => return Err(err(e)),
            Ok(m) if !m.is_dir() => {
                return Err(err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    "not a directory",
                )))
            }
            Ok(_) if is_mount_point(path) => {
                return Err(FaultFsError::AlreadyMounted {
                    path: path.to_path_buf(),
                })
            }
            Ok(_) => return Ok(()),
        }
    }
    Err(err(io::Error::other("dead mounts keep reappearing")))
}

/// Whether `path` is a mount point in this mount namespace.
fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = std::fs::read("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.as_os_str().as_bytes();
    info.split(|b| *b == b'\n').any(|line| {
        line.split(|b| *b == b' ')
            .nth(4)
            .is_some_and(|field| unescape_mountinfo(field).as_bytes() == want)
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &[u8]) -> OsString {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 4 <= field.len() {
            let digits = &field[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    OsString::from_vec(out)
}

static STOP: AtomicBool = AtomicBool::new(false);
static POWER_CUT: AtomicBool = AtomicBool::new(false);
/// Write end of the pipe the signal handler wakes [`run_foreground`] through (-1: none).
static WAKE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_stop_signal(signal: libc::c_int) {
    if signal == libc::SIGUSR1 {
        POWER_CUT.store(true, Ordering::SeqCst);
    } else {
        STOP.store(true, Ordering::SeqCst);
    }
    let fd = WAKE.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; a full pipe (already woken) is fine.
        unsafe {
            libc::write(fd, [1u8].as_ptr().cast(), 1);
        }
    }
}

/// SIGINT and SIGTERM set [`STOP`], SIGUSR1 sets [`POWER_CUT`], while this lives; the old
/// handlers come back on drop.
struct StopSignals {
    old: Vec<(libc::c_int, libc::sigaction)>,
}

impl StopSignals {
    fn install() -> io::Result<Self> {
        STOP.store(false, Ordering::SeqCst);
        POWER_CUT.store(false, Ordering::SeqCst);
        let mut guard = Self { old: Vec::new() };
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
            // SAFETY: a zeroed sigaction is valid; the handler only stores an atomic.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction =
                    on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(signal, &action, &mut old) != 0 {
                    return Err(io::Error::last_os_error());
                }
                guard.old.push((signal, old));
            }
        }
        Ok(guard)
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        for (signal, old) in &self.old {
            // SAFETY: restores the action saved by `install`.
            unsafe {
                libc::sigaction(*signal, old, std::ptr::null_mut());
            }
        }
    }
}

/// Mounts and blocks until SIGTERM or SIGINT (then unmounts) or until the filesystem is
/// unmounted from outside (`umount MOUNTPOINT`). For `ferry faultfs mount`.
///
/// SIGUSR1 is `power-loss`, taken at once: a script can cut the power in the same instant
/// as it freezes the processes using the disk (`kill -STOP`), where a control call would
/// take long enough for an fsync already under way to finish first.
pub fn run_foreground(
    backing: &Path,
    mountpoint: &Path,
    control: &Path,
) -> Result<(), FaultFsError> {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(FaultFsError::Signal(io::Error::last_os_error()));
    }
    WAKE.store(fds[1], Ordering::SeqCst);
    let signals = StopSignals::install().map_err(FaultFsError::Signal)?;
    let mount = Mount::start(backing, mountpoint, control)?;
    while !STOP.load(Ordering::SeqCst) {
        if POWER_CUT.swap(false, Ordering::SeqCst) {
            tracing::info!(answer = %mount.command("power-loss"), "faultfs: SIGUSR1");
        }
        if !mount.is_running() {
            tracing::info!("faultfs: unmounted from outside");
            break;
        }
        let mut poll = libc::pollfd {
            fd: fds[0],
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; then reads drain the non-blocking pipe.
        unsafe {
            if libc::poll(&mut poll, 1, 50) > 0 {
                let mut buf = [0u8; 64];
                while libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) > 0 {}
            }
        }
    }
    let result = mount.shutdown();
    drop(signals);
    WAKE.store(-1, Ordering::SeqCst);
    // SAFETY: both descriptors came from pipe2 above and are closed once.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_fields_are_unescaped() {
        assert_eq!(
            unescape_mountinfo(b"/tmp/a\\040b"),
            OsString::from("/tmp/a b")
        );
        assert_eq!(unescape_mountinfo(b"/x\\134y"), OsString::from("/x\\y"));
        assert_eq!(unescape_mountinfo(b"/plain"), OsString::from("/plain"));
        assert_eq!(unescape_mountinfo(b"/end\\04"), OsString::from("/end\\04"));
    }

    #[test]
    fn root_is_a_mount_point_and_a_fresh_dir_is_not() {
        assert!(is_mount_point(Path::new("/")));
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(dir.path()));
    }
}
