//! The helper process (`veil-agent __spawn`) and the container process it
//! clones. Both are single-threaded, so plain blocking code and allocation
//! are fine here; nothing in this file runs inside the agent.

use std::{
    ffi::CString,
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
};

use nix::{
    sched::{setns, CloneFlags},
    sys::socket::{recv, send, MsgFlags},
    unistd::{setsid, Pid},
};

use super::{
    rootfs, security,
    wire::{ChildMessage, Setup, SpawnRequest, MAX_MESSAGE},
};

/// The control socket's fd number in the helper.
const CONTROL_FD: i32 = 3;

/// Entry point of `veil-agent __spawn`. Never returns.
pub fn helper_main() -> ! {
    // SAFETY: fd 3 was set up by the agent (engine::create) as our end of the
    // control socket; nothing else in this fresh process owns it.
    let control = unsafe { super::owned(CONTROL_FD) };
    // Close anything else the agent may have leaked to us.
    // SAFETY: close_range only closes descriptors; none above 3 is in use yet.
    unsafe {
        libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
    }
    let code = match run_helper(&control) {
        Ok(()) => 0,
        Err(e) => {
            report(&control, &ChildMessage::Error(e));
            1
        }
    };
    std::process::exit(code)
}

fn report(control: &OwnedFd, msg: &ChildMessage) {
    if let Ok(body) = serde_json::to_vec(msg) {
        let _ = send(control.as_raw_fd(), &body, MsgFlags::empty());
    }
}

fn run_helper(control: &OwnedFd) -> Result<(), String> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let n = recv(control.as_raw_fd(), &mut buf, MsgFlags::empty())
        .map_err(|e| format!("reading the plan: {e}"))?;
    let req: SpawnRequest =
        serde_json::from_slice(&buf[..n]).map_err(|e| format!("decoding the plan: {e}"))?;
    drop(buf);

    if let Some(cg) = &req.cgroup {
        std::fs::write(cg.join("cgroup.procs"), "0")
            .map_err(|e| format!("joining cgroup {}: {e}", cg.display()))?;
    }
    // Open every namespace first: after joining the mount namespace the agent's
    // /proc paths may no longer resolve.
    let mut ns_fds = Vec::new();
    for (kind, path) in &req.join_namespaces {
        let f = std::fs::File::open(path)
            .map_err(|e| format!("opening {:?} namespace {}: {e}", kind, path.display()))?;
        ns_fds.push((*kind, OwnedFd::from(f)));
    }
    for (kind, fd) in &ns_fds {
        setns(fd, CloneFlags::from_bits_truncate(kind.clone_flag()))
            .map_err(|e| format!("joining {kind:?} namespace: {e}"))?;
    }
    drop(ns_fds);

    let mut flags = libc::CLONE_PARENT;
    for ns in &req.new_namespaces {
        flags |= ns.clone_flag();
    }
    // SAFETY: a fork-like clone (no new stack, no CLONE_VM) of this
    // single-threaded process: the child gets a copy of our memory and continues
    // here, exactly as after fork(2).
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_int>(),
            std::ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    if pid < 0 {
        return Err(format!("clone: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        let code = match container_main(control, &req) {
            Ok(never) => match never {},
            Err(e) => {
                report(control, &ChildMessage::Error(e));
                127
            }
        };
        std::process::exit(code);
    }
    report(control, &ChildMessage::Pid(pid as i32));
    Ok(())
}

/// Uninhabited: `container_main` only returns on error.
enum Never {}

fn container_main(control: &OwnedFd, req: &SpawnRequest) -> Result<Never, String> {
    setsid().map_err(|e| format!("setsid: {e}"))?;
    match &req.setup {
        Setup::PidHolder => {
            report(control, &ChildMessage::Ready);
            pid_holder_loop()
        }
        Setup::Init(init) => {
            rootfs::setup(init)?;
            finish(control, req)
        }
        Setup::Exec => finish(control, req),
    }
}

/// The rest of every container process: report ready, wait for the start
/// byte, drop privileges, exec.
fn finish(control: &OwnedFd, req: &SpawnRequest) -> Result<Never, String> {
    let process = req
        .process
        .as_ref()
        .ok_or_else(|| "plan without a process".to_string())?;
    if process.terminal().unwrap_or(false) {
        // SAFETY: TIOCSCTTY takes an int argument; fd 0 is the pty slave the
        // agent gave us, and we just became a session leader.
        let rc = unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
        if rc < 0 {
            return Err(format!(
                "making the terminal controlling: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    report(control, &ChildMessage::Ready);
    let mut byte = [0u8; 1];
    loop {
        match recv(control.as_raw_fd(), &mut byte, MsgFlags::empty()) {
            Err(nix::errno::Errno::EINTR) => continue,
            Ok(1) => break,
            // The agent went away or removed the container before starting it.
            _ => std::process::exit(1),
        }
    }
    // From here on, a successful exec closes the socket (close-on-exec).
    // SAFETY: F_SETFD on our own open descriptor.
    unsafe {
        libc::fcntl(control.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
    }
    let exec = security::prepare_exec(process)?;
    security::apply(process, req.seccomp.as_ref())?;
    exec.exec()
}

/// Reaps orphans in the pod's shared PID namespace, forever.
fn pid_holder_loop() -> ! {
    loop {
        match nix::sys::wait::waitpid(Pid::from_raw(-1), None) {
            Err(nix::errno::Errno::ECHILD) => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
            _ => continue,
        }
    }
}

/// The program to run, resolved, with its environment.
pub(super) struct Exec {
    pub path: CString,
    pub args: Vec<CString>,
    pub env: Vec<CString>,
}

impl Exec {
    fn exec(self) -> Result<Never, String> {
        let err = nix::unistd::execve(&self.path, &self.args, &self.env)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        Err(format!("exec {}: {err}", self.path.to_string_lossy()))
    }
}

/// True if `p` is a regular file someone may execute.
pub(super) fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
