//! A crash-consistency FUSE filesystem for tests, in the spirit of Jepsen's LazyFS: a
//! passthrough over a real backing folder that remembers what has not been made durable,
//! and on command forgets it as a power loss would.
//!
//! What counts as durable (the strict POSIX model):
//! - a file's data (writes, truncates, fallocate growth) once that file is fsynced
//!   (`fdatasync`, `O_SYNC`/`O_DSYNC` writes count the same). `sync_file_range(2)` never
//!   reaches a FUSE daemon, so it makes nothing durable;
//! - a directory entry change (create, mknod, mkdir, symlink, link, unlink, rmdir, rename)
//!   once every directory it touched (both, for a rename across directories) is fsynced
//!   after it. A file whose data was fsynced but whose entry never was vanishes; a rename
//!   reverts (the old name back, an overwritten target restored); an unlinked file comes
//!   back with its durable content. Removed entries wait in a hidden graveyard
//!   ([`GRAVEYARD`], invisible through the mount) until the removal is durable.
//!
//! Changes go through to the backing folder at once, each leaving an undo record; power
//! loss replays them backwards, so afterwards the backing folder *is* the durable state and
//! the next [`Mount::start`] on it begins with nothing pending.
//!
//! Control is a Unix socket taking one-line commands (see [`control`]), each answered with
//! one line, `ok ...` or `error <message>`:
//!
//! | command | effect |
//! |---|---|
//! | `power-loss` | revert to the durable state, then fail every operation with EIO until unmounted |
//! | `tear SEED` | as `power-loss`, but each file keeps a seeded random prefix of its unsynced writes (the last one possibly cut short) |
//! | `fail-fsync GLOB N\|always` | the next N fsyncs of matching paths fail with EIO and make nothing durable |
//! | `enospc GLOB N\|always` | the next N writes, creates, mkdirs or growing truncates on matching paths fail with ENOSPC and change nothing |
//! | `slow-fsync GLOB MILLIS` | fsyncs of matching paths take MILLIS longer (other operations go on), until `clear` |
//! | `clear` | remove every fault rule |
//! | `status` | one line of JSON: [`Status`] |
//!
//! `ferry faultfs mount` (see [`run_foreground`]) also takes SIGUSR1 as `power-loss`, at once.
//!
//! GLOB matches paths relative to the mount root (the root itself is `.`); `*` and `?` do
//! not cross `/`, `**` does.
//!
//! Limits of the model:
//! - metadata (mode, owner, times, xattrs) is written through and never reverted;
//! - a failed fsync leaves the data pending, so a later successful fsync persists it (a real
//!   kernel may drop the dirty pages after a writeback error instead); a stalled fsync makes
//!   durable what is written when it completes, not when it was called;
//! - a change whose undo later durable changes made impossible (say a rename out of an
//!   unsynced directory into a synced one, then an unlink there) is counted in
//!   `undo_errors` rather than reconstructed;
//! - fault rules see a hard-linked file under the name it was first looked up by;
//! - files are opened with direct I/O (no page cache; shared mmap needs Linux 6.6+);
//! - the backing folder must be one filesystem supporting `renameat2` flags, and a
//!   `.faultfs` entry at its top is the graveyard (deleted at every start).
//!
//! It exists to break things: never point it at data you want to keep.
#![warn(missing_docs, unreachable_pub)]

mod control;
mod fs;
mod mount;
mod rules;
mod sys;
mod undo;

use std::path::PathBuf;
use std::time::Duration;

pub use control::{control, status};
pub use fs::{Status, GRAVEYARD};
pub use mount::{run_foreground, Mount};

/// What went wrong mounting, unmounting or talking to a faultfs.
#[derive(Debug, thiserror::Error)]
pub enum FaultFsError {
    /// The backing folder is missing, not a directory, or its graveyard cannot be prepared.
    #[error("backing folder {path}: {source}")]
    Backing {
        /// The folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The mountpoint is unusable.
    #[error("mountpoint {path}: {source}")]
    Mountpoint {
        /// The mountpoint.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Something live is already mounted there.
    #[error("{path} already has a live mount on it; unmount it first")]
    AlreadyMounted {
        /// The mountpoint.
        path: PathBuf,
    },
    /// The FUSE mount failed (it needs root for mount(2) and /dev/fuse).
    #[error("mounting FUSE at {path} failed (needs root and /dev/fuse): {source}")]
    Mount {
        /// The mountpoint.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The kernel's handshake or the mount did not show in time.
    #[error("the FUSE mount at {path} did not come up within {waited:?}")]
    MountTimeout {
        /// The mountpoint.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
    /// Unmounting failed (files still open); the mount was detached lazily instead.
    #[error("unmounting {path} failed ({source}); detached it lazily instead")]
    Busy {
        /// The mountpoint.
        path: PathBuf,
        /// Why the unmount failed.
        source: std::io::Error,
    },
    /// Neither unmounting nor lazily detaching worked.
    #[error("unmounting {path} failed ({source}) and so did detaching it ({detach})")]
    Unmount {
        /// The mountpoint.
        path: PathBuf,
        /// Why the unmount failed.
        source: std::io::Error,
        /// Why the lazy detach failed.
        detach: std::io::Error,
    },
    /// The FUSE session did not end after the unmount (its thread is left behind).
    #[error("the FUSE session of {path} still runs {waited:?} after the unmount")]
    SessionStuck {
        /// The mountpoint.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
    /// The control socket could not be bound, reached, written or read.
    #[error("control socket {path}: {source}")]
    Control {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The filesystem refused a command (`error <message>`); nothing was changed.
    #[error("command refused: {0}")]
    Refused(String),
    /// The answer was neither `ok ...` nor `error ...`.
    #[error("unexpected answer on the control socket: {0:?}")]
    Protocol(String),
    /// SIGTERM/SIGINT handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signal(std::io::Error),
}
