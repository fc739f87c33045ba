//! The container engine: creates container processes from a plan.
//!
//! Forking a multi-threaded async process is unsafe (only the forking thread
//! survives; locks held by others stay held), so the agent never forks to build
//! a container. It runs a fresh copy of itself, `veil-agent __spawn` (the
//! *helper*, single-threaded), with the plan on a SOCK_SEQPACKET socket as fd 3
//! and the process's stdio as fds 0-2. The helper joins the cgroup and any
//! existing namespaces, then `clone`s the container process with
//! `CLONE_PARENT` — so the container process is the agent's own child, reaped
//! by the agent's [`Reaper`](crate::reaper::Reaper) — reports its PID and exits.
//! The container process sets up mounts, `pivot_root`, sysctls and masks,
//! reports ready and waits for the start byte; then it drops privileges
//! (rlimits, user, capabilities, `no_new_privs`, seccomp) and `execve`s the
//! program. The socket is close-on-exec: EOF after the start byte means the
//! program runs; an error message means it did not.
//!
//! Module map: [`plan`] (OCI spec → what the child does; validated in the
//! agent, so a bad spec fails before anything forks), [`wire`] (the messages),
//! `child` (the helper and the container process side), `rootfs` (mounts and
//! `pivot_root`), `security` (user, capabilities, rlimits, seccomp),
//! [`devices`] (the guest's device nodes, for privileged containers), [`pty`]
//! (terminals in a container's own devpts), [`propagation`] (shared volume
//! sources for `rshared`/`rslave` binds).

mod child;
pub mod devices;
pub mod plan;
pub mod propagation;
pub mod pty;
pub mod rootfs;
mod security;
pub mod wire;

use std::{
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::process::CommandExt,
    },
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use nix::sys::socket::{
    send, setsockopt, socketpair, sockopt, AddressFamily, MsgFlags, SockFlag, SockType,
};

pub use child::helper_main;
use wire::{ChildMessage, SpawnRequest, MAX_MESSAGE};

use crate::status::{Classify, Kind};

/// The argument that makes `veil-agent` run as the engine helper.
pub const HELPER_ARG: &str = "__spawn";

/// How long the agent waits for a helper or container process to report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the engine, seen from the agent.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The helper could not be started or talked to.
    #[error("container helper I/O")]
    Io(#[source] io::Error),
    /// The plan could not be encoded.
    #[error("cannot encode the spawn plan")]
    Encode(#[source] serde_json::Error),
    /// The container process reported a failure.
    #[error("container setup failed: {0}")]
    Child(String),
    /// The program to run cannot be found or run.
    #[error("{0}")]
    Program(String),
    /// A task limit stops the process from being created.
    #[error("{0}")]
    Exhausted(String),
    /// The helper or container process ended without saying why.
    #[error("container helper ended before reporting {0}")]
    Vanished(&'static str),
    /// The agent's own executable cannot be found.
    #[error("cannot find the agent executable")]
    SelfExe(#[source] io::Error),
}

impl Classify for EngineError {
    fn kind(&self) -> Kind {
        match self {
            EngineError::Program(_) => Kind::NotFound,
            EngineError::Exhausted(_) => Kind::ResourceExhausted,
            EngineError::Io(_)
            | EngineError::Encode(_)
            | EngineError::Child(_)
            | EngineError::Vanished(_)
            | EngineError::SelfExe(_) => Kind::Internal,
        }
    }
}

/// The stdio a new process gets.
pub struct ProcessFds {
    /// fd 0.
    pub stdin: OwnedFd,
    /// fd 1.
    pub stdout: OwnedFd,
    /// fd 2.
    pub stderr: OwnedFd,
}

/// A container process that exists and waits for its start byte.
#[derive(Debug)]
pub struct Created {
    /// Its PID in the agent's PID namespace.
    pub pid: i32,
    /// PID of the helper (already exited or exiting; the caller reaps it).
    pub helper_pid: i32,
    control: OwnedFd,
    /// The pty (master, slave) the process made in its own devpts and now
    /// runs on, replacing the one the agent gave it.
    terminal: Option<(OwnedFd, OwnedFd)>,
}

impl Created {
    /// The pty the process moved to, once: (master, a handle on the slave).
    pub fn take_terminal(&mut self) -> Option<(OwnedFd, OwnedFd)> {
        self.terminal.take()
    }

    /// Lets the process `execve` its program; returns once it did (or failed).
    /// Blocking: call from a blocking context.
    pub fn start(self) -> Result<(), EngineError> {
        send(self.control.as_raw_fd(), b"S", MsgFlags::empty())
            .map_err(|e| EngineError::Io(e.into()))?;
        match read_message(&self.control)? {
            None => Ok(()),
            Some(ChildMessage::Error(e)) => Err(EngineError::Child(e)),
            Some(ChildMessage::Program(e)) => Err(EngineError::Program(e)),
            Some(ChildMessage::Exhausted(e)) => Err(EngineError::Exhausted(e)),
            Some(_) => Err(EngineError::Vanished("exec")),
        }
    }
}

/// Spawns the helper and waits for the container process to be ready.
/// Blocking: call from a blocking context. On error, a process that was
/// already created has been sent SIGKILL (the caller's reaper collects it).
pub fn create(req: &SpawnRequest, fds: ProcessFds) -> Result<Created, EngineError> {
    let exe = std::env::current_exe().map_err(EngineError::SelfExe)?;
    create_with(&exe, req, fds)
}

/// [`create`] with an explicit helper executable (tests).
pub fn create_with(
    exe: &std::path::Path,
    req: &SpawnRequest,
    fds: ProcessFds,
) -> Result<Created, EngineError> {
    let body = serde_json::to_vec(req).map_err(EngineError::Encode)?;
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| EngineError::Io(e.into()))?;
    let timeout = nix::sys::time::TimeVal::new(REPORT_TIMEOUT.as_secs() as i64, 0);
    setsockopt(&ours, sockopt::ReceiveTimeout, &timeout).map_err(|e| EngineError::Io(e.into()))?;
    setsockopt(&ours, sockopt::SndBufForce, &(MAX_MESSAGE * 2))
        .map_err(|e| EngineError::Io(e.into()))?;

    let theirs_fd: RawFd = theirs.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.arg(HELPER_ARG).env_clear();
    if tracing::enabled!(tracing::Level::TRACE) {
        cmd.env(child::TRACE_ENV, "1");
    }
    cmd.stdin(Stdio::from(fds.stdin))
        .stdout(Stdio::from(fds.stdout))
        .stderr(Stdio::from(fds.stderr));
    // SAFETY: the closure runs in the forked child before exec and only calls
    // dup2/fcntl, which are async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if theirs_fd == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(theirs_fd, 3) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(EngineError::Io)?;
    let helper_pid = child.id() as i32;
    tracing::debug!(helper_pid, exe = %exe.display(), "engine helper started");
    // The helper is reaped by the agent's reaper, not by `Child::wait`.
    drop(child);
    drop(theirs);

    send(ours.as_raw_fd(), &body, MsgFlags::empty()).map_err(|e| EngineError::Io(e.into()))?;
    // The helper sends the PID and the container process sends Ready; they
    // race, so take them in either order.
    let mut pid = None;
    let mut ready = false;
    let mut terminal = None;
    loop {
        let (msg, mut fds) = match read_message_with_fds(&ours) {
            Ok((m, fds)) => (Ok(m), fds),
            Err(e) => (Err(e), Vec::new()),
        };
        tracing::debug!(?msg, fds = fds.len(), "engine helper message");
        match msg {
            Ok(Some(ChildMessage::Pid(p))) => pid = Some(p),
            Ok(Some(ChildMessage::Ready)) => ready = true,
            Ok(Some(ChildMessage::Terminal)) if fds.len() == 2 => {
                let slave = fds.pop();
                terminal = fds.pop().zip(slave);
            }
            Ok(Some(ChildMessage::Terminal)) => {
                kill_quietly(pid);
                return Err(EngineError::Vanished("its terminal"));
            }
            Ok(Some(ChildMessage::Error(e))) => {
                kill_quietly(pid);
                return Err(EngineError::Child(e));
            }
            Ok(Some(ChildMessage::Program(e))) => {
                kill_quietly(pid);
                return Err(EngineError::Program(e));
            }
            Ok(Some(ChildMessage::Exhausted(e))) => {
                kill_quietly(pid);
                return Err(EngineError::Exhausted(e));
            }
            Ok(None) => {
                kill_quietly(pid);
                return Err(EngineError::Vanished(if pid.is_none() {
                    "its pid"
                } else {
                    "readiness"
                }));
            }
            Err(e) => {
                kill_quietly(pid);
                return Err(e);
            }
        }
        if let (Some(pid), true) = (pid, ready) {
            return Ok(Created {
                pid,
                helper_pid,
                control: ours,
                terminal,
            });
        }
    }
}

fn kill_quietly(pid: Option<i32>) {
    if let Some(p) = pid {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::SIGKILL);
    }
}

fn read_message(fd: &OwnedFd) -> Result<Option<ChildMessage>, EngineError> {
    Ok(read_message_with_fds(fd)?.0)
}

/// The next message and the descriptors that came with it (`SCM_RIGHTS`).
fn read_message_with_fds(
    fd: &OwnedFd,
) -> Result<(Option<ChildMessage>, Vec<OwnedFd>), EngineError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned};
    let mut buf = vec![0u8; 64 * 1024];
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let (n, fds) = loop {
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(EngineError::Io(e.into())),
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(|e| EngineError::Io(e.into()))? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: the kernel just installed these descriptors
                        // in this process for us; nothing else owns them.
                        fds.extend(raw.into_iter().map(|r| unsafe { owned(r) }));
                    }
                }
                break (msg.bytes, fds);
            }
        }
    };
    if n == 0 {
        return Ok((None, fds));
    }
    serde_json::from_slice(&buf[..n])
        .map(|m| (Some(m), fds))
        .map_err(|_| EngineError::Vanished("a well-formed message"))
}

/// Opens `/dev/null` for a stream nobody attaches.
pub fn dev_null() -> io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    Ok(OwnedFd::from(f))
}

/// `OwnedFd` from a raw fd the caller owns.
///
/// # Safety
/// `fd` must be open and owned by nobody else.
pub(crate) unsafe fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller guarantees `fd` is open and exclusively owned.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Path of the namespace file `kind` of process `pid`.
pub fn ns_path(pid: i32, kind: wire::Namespace) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/{}", kind.proc_name()))
}
