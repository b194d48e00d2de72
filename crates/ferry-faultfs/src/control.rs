//! The control socket: one-line text commands in, one line (`ok ...` or `error <message>`)
//! out, several commands per connection allowed. Also the client side.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::fs::{Shared, Status};
use crate::FaultFsError;

/// Longest command line accepted.
const MAX_LINE: u64 = 4096;
/// A connection idle this long is closed.
const IDLE: Duration = Duration::from_secs(300);
/// How long the client waits for an answer.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// The listening side, one thread accepting and one thread per connection.
#[derive(Debug)]
pub(crate) struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `path`, replacing a socket file left by a killed run (but not one that a live
    /// faultfs answers on).
    pub(crate) fn bind(path: &Path) -> Result<UnixListener, FaultFsError> {
        let err = |source| FaultFsError::Control {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another faultfs answers on this socket",
                    )));
                }
                std::fs::remove_file(path).map_err(err)?
            }
            Ok(_) => {
                return Err(err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "exists and is not a socket",
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        UnixListener::bind(path).map_err(err)
    }

    /// Starts answering on a bound socket.
    pub(crate) fn start(
        path: &Path,
        listener: UnixListener,
        shared: Arc<Shared>,
    ) -> Result<Self, FaultFsError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("faultfs-control".into())
            .spawn(move || accept_loop(listener, shared, stop2))
            .map_err(|source| FaultFsError::Control {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// Stops accepting and removes the socket file (open connections finish on their own).
    pub(crate) fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept call.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        match conn {
            Ok(stream) => {
                let shared = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name("faultfs-control-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve(stream, &shared) {
                            tracing::debug!(error = %e, "faultfs: control connection ended");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "faultfs: cannot serve a control connection");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "faultfs: control accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn serve(stream: UnixStream, shared: &Shared) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE))?;
    let mut out = stream.try_clone()?;
    let mut input = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        let n = input.by_ref().take(MAX_LINE).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') && n as u64 >= MAX_LINE {
            writeln!(out, "error command longer than {MAX_LINE} bytes")?;
            return Ok(());
        }
        let answer = match std::str::from_utf8(&line) {
            Ok(text) => shared.control(text.trim()),
            Err(_) => "error command is not UTF-8".to_owned(),
        };
        tracing::info!(command = %String::from_utf8_lossy(&line).trim(), %answer, "faultfs: control");
        writeln!(out, "{answer}")?;
    }
}

/// Sends one command to a faultfs control socket and returns what follows `ok` in the
/// answer (empty for a bare `ok`; the JSON line for `status`). An `error` answer is
/// [`FaultFsError::Refused`].
pub fn control(socket: &Path, cmd: &str) -> Result<String, FaultFsError> {
    let err = |source| FaultFsError::Control {
        path: socket.to_path_buf(),
        source,
    };
    if cmd.contains('\n') {
        return Err(FaultFsError::Refused(
            "a command is one line (it contains a newline)".into(),
        ));
    }
    let mut stream = UnixStream::connect(socket).map_err(err)?;
    stream.set_read_timeout(Some(ANSWER_WAIT)).map_err(err)?;
    stream
        .write_all(format!("{cmd}\n").as_bytes())
        .map_err(err)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(err)?;
    let line = line.trim_end();
    if line == "ok" {
        Ok(String::new())
    } else if let Some(rest) = line.strip_prefix("ok ") {
        Ok(rest.to_owned())
    } else if let Some(msg) = line.strip_prefix("error ") {
        Err(FaultFsError::Refused(msg.to_owned()))
    } else {
        Err(FaultFsError::Protocol(line.to_owned()))
    }
}

/// `status` through the control socket, parsed.
pub fn status(socket: &Path) -> Result<Status, FaultFsError> {
    let json = control(socket, "status")?;
    serde_json::from_str(&json).map_err(|_| FaultFsError::Protocol(json))
}
