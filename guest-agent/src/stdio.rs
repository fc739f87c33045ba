//! A process's stdio in the agent: the pipes or pty made for it, the stream
//! connections the shim attaches to them, and the copies between the two.
//!
//! Backpressure is end to end: the agent reads from a process only as fast as
//! it can write to the stream connection, and nothing is read before the
//! stream is attached. [`ProcessIo::settle`] resolves once the process's
//! output is complete — every wanted output reached EOF, or (a background
//! child still holds a stream open) everything readable was written to the
//! stream — the condition for reporting the process's exit. The bytes written
//! per stream are reported with the exit, so the shim knows how much to relay
//! before it tells containerd.

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use nix::{
    fcntl::{fcntl, FcntlArg, OFlag},
    pty::{openpty, Winsize},
    unistd::pipe2,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::watch,
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

/// Buffer for draining a pipe nobody reads any more.
const COPY_BUF: usize = 256 * 1024;
/// Socket send buffer asked for output connections.
const SOCKET_BUF: usize = 4 * 1024 * 1024;
/// Pipe capacity asked for output pipes (the kernel may give less).
const PIPE_SIZE: i32 = 4 * 1024 * 1024;
/// How often [`ProcessIo::settle`] looks at streams another process holds.
const SETTLE_POLL: Duration = Duration::from_millis(100);
/// After the exit, how long output that keeps coming from a process still
/// holding the stream (a background child) may hold the exit back.
const SETTLE_CAP: Duration = Duration::from_secs(2);
/// After the exit, how long a stream may wait for room in a connection
/// nobody drains (containerd detached from the FIFO) without a byte moving
/// before the exit is reported anyway. The copy goes on: a reader that
/// comes back still gets the rest.
const STUCK: Duration = Duration::from_millis(300);

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
    /// The copies running, for [`ProcessIo::settle`] and the byte counts.
    copies: Vec<Arc<OutputCopy>>,
}

/// The identity (st_dev, st_ino) of the file behind the process's end of an
/// output: the pipe, or the terminal's slave.
type FileId = (u64, u64);

fn file_id(fd: &OwnedFd) -> Option<FileId> {
    nix::sys::stat::fstat(fd.as_raw_fd())
        .ok()
        .map(|st| (st.st_dev, st.st_ino))
}

/// One output being copied to its stream connection.
struct OutputCopy {
    kind: StreamKind,
    /// A second handle on the agent's end (pipe read end, pty master), for
    /// asking how many bytes wait in it.
    probe: Option<OwnedFd>,
    /// What the process's end is, for finding who else holds it.
    theirs: Option<FileId>,
    /// Bytes written to the connection.
    written: AtomicU64,
    /// Bytes read but not yet written.
    in_flight: AtomicBool,
    /// Waiting for room in the connection (the shim is not reading).
    waiting_room: AtomicBool,
    /// EOF reached (or the copy stopped).
    done: AtomicBool,
}

impl OutputCopy {
    /// Nothing waits in the pipe and nothing read is unwritten.
    fn idle(&self) -> bool {
        if self.in_flight.load(Ordering::Acquire) {
            return false;
        }
        let Some(fd) = &self.probe else {
            return false;
        };
        pending_bytes(fd.as_raw_fd()) == 0
    }

    /// Has output and is waiting for the shim to take it.
    fn blocked(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) || self.waiting_room.load(Ordering::Acquire)
    }
}

/// Bytes each output stream carried to the shim.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// stdout, or the terminal.
    pub stdout: u64,
    /// stderr.
    pub stderr: u64,
    /// The exit was settled with output still waiting for the shim
    /// ([`STUCK`]).
    pub pending: bool,
}

/// The agent's side of a process's stdio.
pub struct ProcessIo {
    slots: Mutex<Slots>,
    /// The process's ends of its outputs, until [`ProcessIo::take`] moves
    /// them into a [`Copy`].
    theirs: Mutex<Vec<(StreamKind, FileId)>>,
    /// Outputs not yet copied to EOF.
    pending: watch::Sender<usize>,
    /// [`ProcessIo::settle`] gave up on a shim that took nothing.
    settled_stuck: AtomicBool,
    /// Where stdin ends: `None` while open; `Some(None)` at once;
    /// `Some(Some(n))` once `n` bytes came through the stream.
    stdin_end: Arc<watch::Sender<Option<Option<u64>>>>,
    /// For window resizes.
    pty_master: Mutex<Option<OwnedFd>>,
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
    let mut theirs = Vec::new();
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
        theirs.extend(file_id(&slave).map(|id| (StreamKind::TERMINAL, id)));
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
        let mut output = |wanted: bool,
                          kind: StreamKind,
                          slot: &mut Option<OwnedFd>|
         -> Result<OwnedFd, StdioError> {
            if !wanted {
                return dev_null().map_err(StdioError::Create);
            }
            let (r, w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| StdioError::Create(e.into()))?;
            // As large as allowed (root may exceed pipe-max-size), else the default.
            if fcntl(r.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)).is_err() {
                let _ = fcntl(r.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(1024 * 1024));
            }
            theirs.extend(file_id(&w).map(|id| (kind, id)));
            *slot = Some(r);
            pending += 1;
            Ok(w)
        };
        let stdout = output(want.stdout, StreamKind::STDOUT, &mut slots.stdout)?;
        let stderr = output(want.stderr, StreamKind::STDERR, &mut slots.stderr)?;
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
            theirs: Mutex::new(theirs),
            pending,
            settled_stuck: AtomicBool::new(false),
            stdin_end: Arc::new(watch::channel(None).0),
            pty_master: Mutex::new(pty_master),
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
        self.master().is_some()
    }

    fn master(&self) -> std::sync::MutexGuard<'_, Option<OwnedFd>> {
        self.pty_master.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the terminal with the pty the process moved to (one made in
    /// its container's devpts): `master` is the agent's end from now on,
    /// `slave` a handle on the process's. Before any stream is attached.
    pub fn adopt_terminal(&self, master: OwnedFd, slave: &OwnedFd) -> Result<(), StdioError> {
        let mut s = self.lock();
        if s.attached.contains(&StreamKind::TERMINAL) || s.terminal.is_none() {
            return Err(StdioError::NoTerminal);
        }
        set_cloexec(&master)?;
        *self.master() = Some(master.try_clone().map_err(StdioError::Create)?);
        s.terminal = Some(master);
        let mut theirs = self.theirs.lock().unwrap_or_else(|p| p.into_inner());
        theirs.retain(|(k, _)| *k != StreamKind::TERMINAL);
        theirs.extend(file_id(slave).map(|id| (StreamKind::TERMINAL, id)));
        Ok(())
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
        let copy = (kind != StreamKind::STDIN).then(|| {
            let theirs = self
                .theirs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, id)| *id);
            let copy = Arc::new(OutputCopy {
                kind,
                probe: fd.try_clone().ok(),
                theirs,
                written: AtomicU64::new(0),
                in_flight: AtomicBool::new(false),
                waiting_room: AtomicBool::new(false),
                done: AtomicBool::new(false),
            });
            s.copies.push(Arc::clone(&copy));
            copy
        });
        Ok(Attachment {
            io: Arc::clone(self),
            kind,
            fd: Some(fd),
            copy,
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

    /// Resolves once the output of a process that has exited is complete:
    /// every wanted output reached EOF; or every stream still open is
    /// attached and idle (nothing waiting in it, nothing read unwritten) at
    /// two looks in a row — then another process, a background child, holds
    /// it, since the exited process's ends are closed; or [`SETTLE_CAP`]
    /// after the call, output still comes and another process is found
    /// holding a stream; or every stream still open is idle or blocked on a
    /// shim that takes nothing for [`STUCK`] (nobody reads: the exit must not
    /// wait for a reader). Otherwise a stream nobody else holds is waited for
    /// to EOF: what the process wrote before it exited is never cut.
    pub async fn settle(&self) {
        let started = Instant::now();
        let mut rx = self.pending.subscribe();
        let mut quiet = 0;
        // The total written and since when it has not changed.
        let mut last = (u64::MAX, Instant::now());
        loop {
            let open = *rx.borrow_and_update();
            if open == 0 {
                return;
            }
            let copies: Vec<Arc<OutputCopy>> = self
                .lock()
                .copies
                .iter()
                .filter(|c| !c.done.load(Ordering::Acquire))
                .cloned()
                .collect();
            // A stream not attached yet is waited for as before: its output
            // has not begun to flow.
            let all_attached = copies.len() >= open;
            let total: u64 = copies
                .iter()
                .map(|c| c.written.load(Ordering::Acquire))
                .sum();
            if total != last.0 {
                last = (total, Instant::now());
            }
            if all_attached
                && copies.iter().any(|c| c.blocked())
                && copies.iter().all(|c| c.blocked() || c.idle())
                && last.1.elapsed() >= STUCK
            {
                tracing::info!(
                    written = total,
                    "output not taken by the shim for {STUCK:?} after the exit: reporting the exit"
                );
                self.settled_stuck.store(true, Ordering::Release);
                return;
            }
            if all_attached && copies.iter().all(|c| c.idle()) {
                quiet += 1;
                if quiet >= 2 {
                    tracing::debug!("output settled with a stream held open by another process");
                    return;
                }
            } else {
                quiet = 0;
            }
            if all_attached
                && started.elapsed() >= SETTLE_CAP
                && copies
                    .iter()
                    .any(|c| c.theirs.is_some_and(held_by_another_process))
            {
                tracing::debug!(
                    "output still flowing from another process {SETTLE_CAP:?} after the exit"
                );
                return;
            }
            let _ = tokio::time::timeout(SETTLE_POLL, rx.changed()).await;
        }
    }

    /// Bytes written so far to each output stream.
    pub fn written(&self) -> Written {
        let mut w = Written {
            pending: self.settled_stuck.load(Ordering::Acquire),
            ..Written::default()
        };
        for c in &self.lock().copies {
            let n = c.written.load(Ordering::Acquire);
            match c.kind {
                StreamKind::STDERR => w.stderr += n,
                _ => w.stdout += n,
            }
        }
        w
    }

    /// Closes the process's stdin: at once if no stream is attached or no
    /// count is given, else once `after` bytes came through the stream.
    pub fn close_stdin(&self, after: Option<u64>) {
        drop(self.lock().stdin.take());
        self.stdin_end.send_replace(Some(after));
    }

    /// Sets the terminal's window size.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), StdioError> {
        let master = self.master();
        let master = master.as_ref().ok_or(StdioError::NoTerminal)?;
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

async fn copy_output<R, W>(mut from: R, mut to: W, copy: Option<&OutputCopy>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; WRITE_CHUNK];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(c) = copy {
            c.in_flight.store(true, Ordering::Release);
        }
        let wrote = to.write_all(&buf[..n]).await;
        if let Some(c) = copy {
            if wrote.is_ok() {
                c.written.fetch_add(n as u64, Ordering::AcqRel);
            }
            c.in_flight.store(false, Ordering::Release);
        }
        if wrote.is_err() {
            // The shim went away: keep draining so the process is not blocked.
            while matches!(from.read(&mut buf).await, Ok(n) if n > 0) {}
            return;
        }
    }
    let _ = to.flush().await;
    let _ = to.shutdown().await;
}

/// Whether a process other than the agent has `id` open.
fn held_by_another_process(id: FileId) -> bool {
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    for p in procs.flatten() {
        let name = p.file_name();
        let Some(pid) = name.to_str() else { continue };
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            // stat follows the link to the open file itself (pipes included).
            if let Ok(st) = nix::sys::stat::stat(&fd.path()) {
                if (st.st_dev, st.st_ino) == id {
                    return true;
                }
            }
        }
    }
    false
}

/// Most bytes moved by one splice(2) or write(2) to a stream connection.
const WRITE_CHUNK: usize = veil_protocol::vsock::MAX_WRITE;

/// Moves a pipe's data into the connection with splice(2) until EOF,
/// counting what was moved, then shuts the connection down for writing.
/// Blocking; runs on its own thread. The socket is non-blocking and the
/// thread waits in poll(2), never inside splice: a splice blocked on a full
/// socket holds the pipe's lock, and then even the process's exit (which
/// closes its end) would wait for the shim. Each splice moves at most
/// [`WRITE_CHUNK`], which the hybrid vsock backend takes as one packet
/// (see [`veil_protocol::vsock::MAX_WRITE`]). Falls back to read/write
/// where the socket cannot splice. If the shim goes away, the pipe is
/// drained so the process is not blocked.
fn copy_pipe(pipe: OwnedFd, conn: OwnedFd, copy: Option<&OutputCopy>) {
    use std::io::{Read, Write};
    // Room for a whole pipe's worth: fewer wake-ups per MiB (best effort).
    let _ =
        nix::sys::socket::setsockopt(&conn, nix::sys::socket::sockopt::SndBufForce, &SOCKET_BUF);
    let (pfd, sfd) = (pipe.as_raw_fd(), conn.as_raw_fd());
    let mut pipe = std::fs::File::from(pipe);
    let count = |n: usize| {
        if let Some(c) = copy {
            c.written.fetch_add(n as u64, Ordering::AcqRel);
        }
    };
    loop {
        // SAFETY: splice(2) between two fds we own (the pipe's read end and
        // the connected socket), without offsets (both are streams).
        let n = unsafe {
            libc::splice(
                pfd,
                std::ptr::null_mut(),
                sfd,
                std::ptr::null_mut(),
                WRITE_CHUNK,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n > 0 {
            count(n as usize);
            continue;
        }
        if n == 0 {
            break;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => {
                // Either the pipe is empty or the socket is full: wait for
                // the one that blocks.
                let waiting_for_room = pending_bytes(pfd) > 0;
                if let Some(c) = copy {
                    c.waiting_room.store(waiting_for_room, Ordering::Release);
                }
                let (fd, events) = if waiting_for_room {
                    (sfd, libc::POLLOUT)
                } else {
                    (pfd, libc::POLLIN)
                };
                let mut p = libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                };
                // SAFETY: poll(2) on one pollfd that lives on the stack.
                let _ = unsafe { libc::poll(&mut p, 1, -1) };
                if let Some(c) = copy {
                    c.waiting_room.store(false, Ordering::Release);
                }
                if waiting_for_room && p.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                    drain(&mut pipe);
                    return;
                }
            }
            Some(libc::EINVAL) => {
                // This socket cannot splice: copy.
                let mut sock = std::fs::File::from(conn);
                let _ = set_blocking_raw(sfd);
                let mut buf = vec![0u8; WRITE_CHUNK];
                loop {
                    match pipe.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if let Some(c) = copy {
                                c.in_flight.store(true, Ordering::Release);
                            }
                            let wrote = sock.write_all(&buf[..n]);
                            if let Some(c) = copy {
                                c.in_flight.store(false, Ordering::Release);
                            }
                            if wrote.is_err() {
                                drain(&mut pipe);
                                return;
                            }
                            count(n);
                        }
                    }
                }
                let _ = nix::sys::socket::shutdown(sfd, nix::sys::socket::Shutdown::Write);
                return;
            }
            _ => {
                drain(&mut pipe);
                return;
            }
        }
    }
    let _ = nix::sys::socket::shutdown(sfd, nix::sys::socket::Shutdown::Write);
}

/// Bytes waiting to be read from `fd` (FIONREAD), 0 on error.
fn pending_bytes(fd: std::os::fd::RawFd) -> libc::c_int {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which points at a
    // live local.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if rc == 0 {
        n
    } else {
        0
    }
}

/// Reads a pipe to EOF, discarding: its writer must never block on a reader
/// that went away.
fn drain(pipe: &mut std::fs::File) {
    use std::io::Read;
    let mut buf = vec![0u8; COPY_BUF];
    while matches!(pipe.read(&mut buf), Ok(n) if n > 0) {}
}

/// After a counted close of stdin, how long the rest may take to arrive
/// without a byte coming before stdin is closed anyway.
const STDIN_GRACE: Duration = Duration::from_secs(10);

/// Where an input copy ends (see [`ProcessIo::close_stdin`]).
type InputEnd = Arc<watch::Sender<Option<Option<u64>>>>;

/// Copies input from the stream into the process until the stream ends or
/// `end` says so: at once, or once its count of bytes was copied.
async fn copy_stdin<R, W>(mut from: R, mut to: W, end: InputEnd)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut end = end.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    let mut copied: u64 = 0;
    loop {
        let until = *end.borrow_and_update();
        match until {
            Some(None) => break,
            Some(Some(n)) if copied >= n => break,
            _ => {}
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = end.changed() => continue,
            _ = tokio::time::sleep(STDIN_GRACE), if until.is_some() => {
                tracing::warn!(copied, expected = ?until, "stdin closed without the rest of its input");
                break;
            }
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        copied += n as u64;
    }
}

/// Clears `O_NONBLOCK` on `fd` (the read/write fallback blocks).
fn set_blocking_raw(fd: std::os::fd::RawFd) -> io::Result<()> {
    let flags = fcntl(fd, FcntlArg::F_GETFL)?;
    let flags = OFlag::from_bits_truncate(flags) - OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// A reserved stream, waiting for its connection.
pub struct Attachment {
    io: Arc<ProcessIo>,
    kind: StreamKind,
    fd: Option<OwnedFd>,
    copy: Option<Arc<OutputCopy>>,
}

impl Attachment {
    /// Starts copying between the process and `conn`.
    pub fn run(mut self, conn: Connection) -> Result<(), StdioError> {
        let Some(fd) = self.fd.take() else {
            return Ok(());
        };
        let io = Arc::clone(&self.io);
        let copy = self.copy.take();
        match self.kind {
            StreamKind::STDIN => {
                let end = Arc::clone(&io.stdin_end);
                tokio::spawn(async move {
                    if let Ok(pipe) = FdStream::new(fd) {
                        copy_stdin(conn, pipe, end).await;
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
                let output_ended: InputEnd = Arc::new(watch::channel(None).0);
                let input_stop = Arc::clone(&output_ended);
                let input = tokio::spawn(async move {
                    if let Ok(master) = FdStream::new(write_fd) {
                        copy_stdin(conn_r, master, input_stop).await;
                    }
                });
                tokio::spawn(async move {
                    if let Ok(master) = FdStream::new(fd) {
                        copy_output(master, conn_w, copy.as_deref()).await;
                    }
                    if let Some(c) = &copy {
                        c.done.store(true, Ordering::Release);
                    }
                    output_ended.send_replace(Some(None));
                    // Both halves gone: the connection closes.
                    let _ = input.await;
                    io.output_done();
                });
            }
            _ => {
                // A thread of its own, waiting in poll(2): woken only when
                // there is data or room, as if the process wrote to the
                // socket itself. The socket stays non-blocking.
                let conn = conn.into_fd().map_err(StdioError::Create)?;
                let spawned = std::thread::Builder::new()
                    .name("veil-stdout".into())
                    .spawn(move || {
                        copy_pipe(fd, conn, copy.as_deref());
                        if let Some(c) = &copy {
                            c.done.store(true, Ordering::Release);
                        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio as Std};
    use tokio::net::UnixStream;

    fn stdout_only() -> Stdio {
        let mut s = Stdio::new();
        s.stdout = true;
        s
    }

    /// A process with stdout on a pipe copied to a socket pair; returns the
    /// child, the io and the shim's end of the stream.
    fn spawn_with_stdout(script: &str) -> (std::process::Child, Arc<ProcessIo>, UnixStream) {
        let (fds, io) = prepare(&stdout_only(), false).unwrap();
        let (agent_end, shim_end) = UnixStream::pair().unwrap();
        io.take(StreamKind::STDOUT)
            .unwrap()
            .run(Connection::Unix(agent_end))
            .unwrap();
        let child = Command::new("sh")
            .args(["-c", script])
            .stdin(Std::null())
            .stdout(Std::from(fds.stdout))
            .stderr(Std::inherit())
            .spawn()
            .unwrap();
        (child, io, shim_end)
    }

    /// Waits for the child's exit. Another test's reaper may collect it
    /// first (ECHILD): that is an exit too.
    async fn exited(mut child: std::process::Child) {
        while let Ok(None) = child.try_wait() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_background_child_holding_stdout_does_not_hold_the_exit() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("bg.pid");
        let script = format!("echo first; sleep 60 & echo $! > {}", pidfile.display());
        let (child, io, mut shim) = spawn_with_stdout(&script);
        exited(child).await;
        let t = Instant::now();
        let settled = tokio::time::timeout(Duration::from_secs(10), io.settle()).await;
        eprintln!("settled in {:?}", t.elapsed());
        let bg: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: kill(2) on the background sleep this test started.
        unsafe { libc::kill(bg, libc::SIGKILL) };
        assert!(settled.is_ok(), "the exit waited for the background child");
        assert_eq!(io.written().stdout, 6);
        let mut got = vec![0u8; 6];
        shim.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"first\n");
    }

    #[tokio::test]
    async fn what_the_process_wrote_before_its_exit_is_never_cut() {
        const SIZE: u64 = 8 * 1024 * 1024;
        let (child, io, mut shim) = spawn_with_stdout(&format!("head -c {SIZE} /dev/zero"));
        // The shim is slow to read (but less than STUCK): the pipe and
        // socket hold the tail. It starts before the exit is awaited: where
        // the socket buffers hold less than SIZE, the writer exits only once
        // the shim reads.
        let reader = tokio::spawn(async move {
            tokio::time::sleep(STUCK / 2).await;
            let mut n = 0u64;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match shim.read(&mut buf).await {
                    Ok(0) | Err(_) => return n,
                    Ok(k) => n += k as u64,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), exited(child))
            .await
            .expect("the writer exits once its output is read");
        tokio::time::timeout(Duration::from_secs(30), io.settle())
            .await
            .expect("settles once the output reached EOF");
        let w = io.written();
        assert_eq!(w.stdout, SIZE, "settled before everything was written");
        assert!(!w.pending);
        assert_eq!(reader.await.unwrap(), SIZE);
    }

    #[tokio::test]
    async fn the_exit_of_a_writer_nobody_reads_is_not_held_back() {
        let (child, io, _shim) = spawn_with_stdout("exec yes");
        tokio::time::sleep(Duration::from_millis(300)).await;
        // SAFETY: kill(2) on the child this test started.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        exited(child).await;
        let t = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), io.settle())
            .await
            .expect("the exit waited for a shim that reads nothing");
        assert!(
            t.elapsed() >= STUCK,
            "settled before the stream was found stuck"
        );
        let w = io.written();
        assert!(w.stdout > 0, "nothing reached the connection");
        assert!(w.pending, "the exit must say output was left waiting");
    }

    #[tokio::test]
    async fn a_writer_nobody_reads_can_still_be_killed() {
        let (child, _io, _shim) = spawn_with_stdout("exec yes");
        // Let the pipe and the socket fill up.
        tokio::time::sleep(Duration::from_millis(300)).await;
        // SAFETY: kill(2) on the child this test started.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        tokio::time::timeout(Duration::from_secs(10), exited(child))
            .await
            .expect("the killed writer's exit hung on its output pipe");
    }
}
