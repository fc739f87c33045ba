//! A process's stdio in the agent: the pipes or pty made for it, the stream
//! connections the shim attaches to them, and the copies between the two.
//!
//! Backpressure is end to end: the agent reads from a process only as fast as
//! it can write to the stream connection, and nothing is read before the
//! stream is attached. [`ProcessIo::drained`] resolves once every wanted
//! output has reached EOF and its connection was shut down for writing — the
//! condition for reporting the process's exit.

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
    sync::{Arc, Mutex},
};

use nix::{
    fcntl::{fcntl, FcntlArg, OFlag},
    pty::{openpty, Winsize},
    unistd::pipe2,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::{watch, Notify},
};
use veil_protocol::{
    agent::{Stdio, StreamKind},
    fdio::FdStream,
    vsock::Connection,
};

use crate::{
    engine::{dev_null, ProcessFds},
    status::{Classify, Kind},
};

/// Copy buffer size: large enough that a 100 MiB stream costs few syscalls.
const COPY_BUF: usize = 256 * 1024;
/// Most bytes moved by one splice(2).
const SPLICE_CHUNK: usize = 4 * 1024 * 1024;
/// Pipe capacity asked for output pipes (the kernel may give less).
const PIPE_SIZE: i32 = 4 * 1024 * 1024;

/// Errors of stdio handling.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// Creating pipes or a pty failed.
    #[error("cannot create process stdio")]
    Create(#[source] io::Error),
    /// The stream kind is not one this process has.
    #[error("the process has no {0:?} stream")]
    NoSuchStream(StreamKind),
    /// The stream was attached already.
    #[error("the {0:?} stream is already attached")]
    AlreadyAttached(StreamKind),
    /// The terminal ioctl failed.
    #[error("cannot resize the terminal")]
    Resize(#[source] nix::Error),
    /// Resize on a process without a terminal.
    #[error("the process has no terminal")]
    NoTerminal,
}

impl Classify for StdioError {
    fn kind(&self) -> Kind {
        match self {
            StdioError::Create(_) | StdioError::Resize(_) => Kind::Internal,
            StdioError::NoSuchStream(_) | StdioError::NoTerminal => Kind::FailedPrecondition,
            StdioError::AlreadyAttached(_) => Kind::AlreadyExists,
        }
    }
}

#[derive(Default)]
struct Slots {
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    terminal: Option<OwnedFd>,
    attached: Vec<StreamKind>,
}

/// The agent's side of a process's stdio.
pub struct ProcessIo {
    slots: Mutex<Slots>,
    /// Outputs not yet copied to EOF.
    pending: watch::Sender<usize>,
    close_stdin: Arc<Notify>,
    /// For window resizes.
    pty_master: Option<OwnedFd>,
}

/// Makes the stdio for a new process: the fds it gets and the agent's side.
pub fn prepare(want: &Stdio, terminal: bool) -> Result<(ProcessFds, Arc<ProcessIo>), StdioError> {
    prepare_in(want, terminal, None)
}

/// [`prepare`], with a terminal made on the devpts `ptmx` given (a
/// container's own, [`crate::engine::pty`]) when there is one, else in the
/// agent's devpts.
pub fn prepare_in(
    want: &Stdio,
    terminal: bool,
    ptmx: Option<&std::path::Path>,
) -> Result<(ProcessFds, Arc<ProcessIo>), StdioError> {
    let mut slots = Slots::default();
    let mut pending = 0;
    let fds;
    let mut pty_master = None;
    if terminal {
        let in_container = ptmx.and_then(|p| match crate::engine::pty::open_in(p) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::info!(ptmx = %p.display(), error = %e, "no terminal in the container's devpts; using the agent's");
                None
            }
        });
        let pty = match in_container {
            Some((master, slave)) => nix::pty::OpenptyResult { master, slave },
            None => openpty(None, None).map_err(|e| StdioError::Create(e.into()))?,
        };
        let slave = pty.slave;
        fds = ProcessFds {
            stdin: slave.try_clone().map_err(StdioError::Create)?,
            stdout: slave.try_clone().map_err(StdioError::Create)?,
            stderr: slave,
        };
        set_cloexec(&pty.master)?;
        pty_master = Some(pty.master.try_clone().map_err(StdioError::Create)?);
        slots.terminal = Some(pty.master);
        pending = 1;
    } else {
        let stdin = if want.stdin {
            let (r, w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| StdioError::Create(e.into()))?;
            slots.stdin = Some(w);
            r
        } else {
            dev_null().map_err(StdioError::Create)?
        };
        let mut output =
            |wanted: bool, slot: &mut Option<OwnedFd>| -> Result<OwnedFd, StdioError> {
                if !wanted {
                    return dev_null().map_err(StdioError::Create);
                }
                let (r, w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| StdioError::Create(e.into()))?;
                // As large as allowed (root may exceed pipe-max-size), else the default.
                if fcntl(r.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)).is_err() {
                    let _ = fcntl(r.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(1024 * 1024));
                }
                *slot = Some(r);
                pending += 1;
                Ok(w)
            };
        let stdout = output(want.stdout, &mut slots.stdout)?;
        let stderr = output(want.stderr, &mut slots.stderr)?;
        fds = ProcessFds {
            stdin,
            stdout,
            stderr,
        };
    }
    let (pending, _) = watch::channel(pending);
    Ok((
        fds,
        Arc::new(ProcessIo {
            slots: Mutex::new(slots),
            pending,
            close_stdin: Arc::new(Notify::new()),
            pty_master,
        }),
    ))
}

fn set_cloexec(fd: &OwnedFd) -> Result<(), StdioError> {
    fcntl(
        fd.as_raw_fd(),
        FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map(|_| ())
    .map_err(|e| StdioError::Create(e.into()))
}

impl ProcessIo {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this process has a terminal.
    pub fn has_terminal(&self) -> bool {
        self.pty_master.is_some()
    }

    /// Reserves stream `kind` for a connection; [`Attachment::run`] starts
    /// the copy. Each stream can be taken once.
    pub fn take(self: &Arc<Self>, kind: StreamKind) -> Result<Attachment, StdioError> {
        let mut s = self.lock();
        if s.attached.contains(&kind) {
            return Err(StdioError::AlreadyAttached(kind));
        }
        let slot = match kind {
            StreamKind::STDIN => s.stdin.take(),
            StreamKind::STDOUT => s.stdout.take(),
            StreamKind::STDERR => s.stderr.take(),
            StreamKind::TERMINAL => s.terminal.take(),
            StreamKind::STREAM_KIND_UNSPECIFIED | StreamKind::PORT_FORWARD => None,
        };
        let fd = slot.ok_or(StdioError::NoSuchStream(kind))?;
        s.attached.push(kind);
        Ok(Attachment {
            io: Arc::clone(self),
            kind,
            fd: Some(fd),
        })
    }

    /// Gives up on streams never attached (the process is being removed):
    /// their pipes close and the exit no longer waits for them.
    pub fn abandon(&self) {
        let mut s = self.lock();
        let outputs = [s.stdout.take(), s.stderr.take(), s.terminal.take()];
        drop(s.stdin.take());
        drop(s);
        for fd in outputs.into_iter().flatten() {
            drop(fd);
            self.output_done();
        }
    }

    fn output_done(&self) {
        self.pending.send_modify(|n| *n = n.saturating_sub(1));
    }

    /// Resolves once every wanted output was copied to EOF.
    pub async fn drained(&self) {
        let mut rx = self.pending.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Closes the process's stdin: at once if no stream is attached, else
    /// after the bytes already readable from the stream.
    pub fn close_stdin(&self) {
        drop(self.lock().stdin.take());
        self.close_stdin.notify_one();
    }

    /// Sets the terminal's window size.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), StdioError> {
        let master = self.pty_master.as_ref().ok_or(StdioError::NoTerminal)?;
        let ws = Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a `winsize` struct from the pointer, which
        // points at a live local; the fd is our pty master.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc < 0 {
            return Err(StdioError::Resize(nix::Error::last()));
        }
        Ok(())
    }
}

async fn copy_output<R, W>(mut from: R, mut to: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            // The shim went away: keep draining so the process is not blocked.
            while matches!(from.read(&mut buf).await, Ok(n) if n > 0) {}
            return;
        }
    }
    let _ = to.flush().await;
    let _ = to.shutdown().await;
}

/// Moves a pipe's data into the connection with splice(2) until EOF, then
/// shuts the connection down for writing. Blocking; runs on its own thread.
/// Falls back to read/write where the socket cannot splice. If the shim goes
/// away, the pipe is drained so the process is not blocked.
fn splice_output(pipe: OwnedFd, conn: OwnedFd) {
    use std::io::{Read, Write};
    // Room for a whole pipe's worth per splice: fewer wake-ups per MiB.
    // (Best effort: the default still works, only slower.)
    let _ = nix::sys::socket::setsockopt(
        &conn,
        nix::sys::socket::sockopt::SndBufForce,
        &(2 * SPLICE_CHUNK),
    );
    let (pfd, sfd) = (pipe.as_raw_fd(), conn.as_raw_fd());
    let mut pipe = std::fs::File::from(pipe);
    let mut conn = std::fs::File::from(conn);
    loop {
        // SAFETY: splice(2) between two fds we own (the pipe's read end and
        // the connected socket), without offsets (both are streams).
        let n = unsafe {
            libc::splice(
                pfd,
                std::ptr::null_mut(),
                sfd,
                std::ptr::null_mut(),
                SPLICE_CHUNK,
                libc::SPLICE_F_MOVE,
            )
        };
        if n > 0 {
            continue;
        }
        if n == 0 {
            break;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EINVAL) => {
                // This socket cannot splice: copy.
                let mut buf = vec![0u8; COPY_BUF];
                loop {
                    match pipe.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                drain(&mut pipe);
                                return;
                            }
                        }
                    }
                }
                break;
            }
            _ => {
                drain(&mut pipe);
                return;
            }
        }
    }
    let _ = nix::sys::socket::shutdown(sfd, nix::sys::socket::Shutdown::Write);
}

/// Reads a pipe to EOF, discarding: its writer must never block on a reader
/// that went away.
fn drain(pipe: &mut std::fs::File) {
    use std::io::Read;
    let mut buf = vec![0u8; COPY_BUF];
    while matches!(pipe.read(&mut buf), Ok(n) if n > 0) {}
}

async fn copy_stdin<R, W>(mut from: R, mut to: W, close: Arc<Notify>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = close.notified() => break,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

/// Clears `O_NONBLOCK` on `fd` (the splice thread blocks).
fn set_blocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?;
    let flags = OFlag::from_bits_truncate(flags) - OFlag::O_NONBLOCK;
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// A reserved stream, waiting for its connection.
pub struct Attachment {
    io: Arc<ProcessIo>,
    kind: StreamKind,
    fd: Option<OwnedFd>,
}

impl Attachment {
    /// Starts copying between the process and `conn`.
    pub fn run(mut self, conn: Connection) -> Result<(), StdioError> {
        let Some(fd) = self.fd.take() else {
            return Ok(());
        };
        let io = Arc::clone(&self.io);
        match self.kind {
            StreamKind::STDIN => {
                let close = Arc::clone(&io.close_stdin);
                tokio::spawn(async move {
                    if let Ok(pipe) = FdStream::new(fd) {
                        copy_stdin(conn, pipe, close).await;
                    }
                });
            }
            StreamKind::TERMINAL => {
                let write_fd = match fd.try_clone() {
                    Ok(w) => w,
                    Err(e) => {
                        io.output_done();
                        return Err(StdioError::Create(e));
                    }
                };
                let (conn_r, conn_w) = tokio::io::split(conn);
                // Once the terminal's output ended (no process holds it any
                // more), its input is over too: the connection is closed
                // entirely. A half-closed connection is not enough: the
                // hybrid vsock backend does not pass a one-way shutdown on, so
                // the shim would never see the output end.
                let output_ended = Arc::new(Notify::new());
                let input_stop = Arc::clone(&output_ended);
                let input = tokio::spawn(async move {
                    if let Ok(master) = FdStream::new(write_fd) {
                        copy_stdin(conn_r, master, input_stop).await;
                    }
                });
                tokio::spawn(async move {
                    if let Ok(master) = FdStream::new(fd) {
                        copy_output(master, conn_w).await;
                    }
                    output_ended.notify_one();
                    // Both halves gone: the connection closes.
                    let _ = input.await;
                    io.output_done();
                });
            }
            _ => {
                // A thread of its own, blocking in splice(2): the kernel moves
                // the pipe's pages into the socket and wakes it only when there
                // is data or room, as if the process wrote to the socket itself.
                let conn = conn.into_fd().map_err(StdioError::Create)?;
                set_blocking(&conn).map_err(StdioError::Create)?;
                let spawned = std::thread::Builder::new()
                    .name("veil-stdout".into())
                    .spawn(move || {
                        splice_output(fd, conn);
                        io.output_done();
                    });
                if let Err(e) = spawned {
                    self.io.output_done();
                    return Err(StdioError::Create(e));
                }
            }
        }
        Ok(())
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        // Never connected: the output is lost with its pipe; do not let the
        // exit wait for it.
        if self.fd.take().is_some() && self.kind != StreamKind::STDIN {
            self.io.output_done();
        }
    }
}
