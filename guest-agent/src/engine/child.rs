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

/// Set (by an agent logging at TRACE level) to make the helper and container
/// process trace their steps to the kernel log.
pub(super) const TRACE_ENV: &str = "VEIL_ENGINE_TRACE";

/// Writes a step to the kernel log when tracing is on.
pub(super) fn trace(step: &str) {
    if std::env::var_os(TRACE_ENV).is_some() {
        let _ = std::fs::write(
            "/dev/kmsg",
            format!("<3>veil-engine[{}]: {step}\n", std::process::id()),
        );
    }
}

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
    trace("plan received");

    // The container process is created directly in its cgroup
    // (CLONE_INTO_CGROUP): no migration of a running task, which needs a
    // write lock on the cgroup core that can stall for long under emulation.
    let cgroup_dir = match &req.cgroup {
        Some(cg) => Some(
            std::fs::File::open(cg).map_err(|e| format!("opening cgroup {}: {e}", cg.display()))?,
        ),
        None => None,
    };
    // Open every namespace first: after joining the mount namespace the agent's
    // /proc paths may no longer resolve.
    let mut ns_fds = Vec::new();
    for (kind, path) in &req.join_namespaces {
        let f = std::fs::File::open(path)
            .map_err(|e| format!("opening {:?} namespace {}: {e}", kind, path.display()))?;
        ns_fds.push((*kind, OwnedFd::from(f)));
    }
    // The cgroup namespace is joined by the child, after CLONE_INTO_CGROUP:
    // from inside it, the helper's own cgroup would be out of view and the
    // kernel refuses the clone (ENOENT).
    let mut cgroup_ns = None;
    for (kind, fd) in ns_fds {
        if kind == super::wire::Namespace::Cgroup {
            cgroup_ns = Some(fd);
            continue;
        }
        setns(&fd, CloneFlags::from_bits_truncate(kind.clone_flag()))
            .map_err(|e| format!("joining {kind:?} namespace: {e}"))?;
    }
    trace("cgroup and namespaces joined");

    let mut flags = libc::CLONE_PARENT as u64;
    for ns in &req.new_namespaces {
        flags |= ns.clone_flag() as u64;
    }
    // With CLONE_PARENT the exit signal must be 0: the child inherits ours
    // (SIGCHLD), which goes to our parent, the agent.
    let mut args = CloneArgs {
        flags,
        ..CloneArgs::default()
    };
    if let Some(dir) = &cgroup_dir {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = dir.as_raw_fd() as u64;
    }
    // SAFETY: a fork-like clone3 (no new stack, no CLONE_VM) of this
    // single-threaded process: the child gets a copy of our memory and
    // continues here, exactly as after fork(2). `args` is a live, correctly
    // laid out `struct clone_args` whose size we pass.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            let why = task_limit(req.cgroup.as_deref(), cgroup_dir.as_ref());
            report(control, &ChildMessage::Exhausted(why));
            std::process::exit(1);
        }
        return Err(format!("clone: {e}"));
    }
    drop(cgroup_dir);
    if pid == 0 {
        if let Some(fd) = &cgroup_ns {
            if let Err(e) = setns(fd, CloneFlags::CLONE_NEWCGROUP) {
                report(
                    control,
                    &ChildMessage::Error(format!("joining the cgroup namespace: {e}")),
                );
                std::process::exit(127);
            }
        }
        let code = match container_main(control, &req) {
            Ok(never) => match never {},
            Err(e) => {
                report(control, &ChildMessage::Error(e));
                127
            }
        };
        std::process::exit(code);
    }
    trace("cloned");
    report(control, &ChildMessage::Pid(pid as i32));
    Ok(())
}

/// Says what a refused clone (EAGAIN) ran into: the tasks and `pids.max`
/// of each cgroup from the container's (`path`, open as `dir`) up that has a
/// limit, and the guest's tasks against `kernel.threads-max`. The cgroup
/// files are read through `dir` (the paths are the agent's, and the helper
/// may be in the container's mount namespace by now). The counts are read
/// after the fact (others may have exited since), so all of them are given.
fn task_limit(path: Option<&Path>, dir: Option<&std::fs::File>) -> String {
    let read_at = |rel: &str| -> Option<String> {
        let d = dir?;
        let fd = nix::fcntl::openat(
            Some(d.as_raw_fd()),
            rel,
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .ok()?;
        // SAFETY: `openat` just returned this descriptor; nothing else owns it.
        let mut f = std::fs::File::from(unsafe { super::owned(fd) });
        let mut text = String::new();
        std::io::Read::read_to_string(&mut f, &mut text).ok()?;
        Some(text.trim().to_string())
    };
    let mut parts = Vec::new();
    let mut up = String::new();
    let mut cg = path;
    while let Some(p) = cg.filter(|p| p.components().count() > 1) {
        let (max, current) = (
            read_at(&format!("{up}pids.max")),
            read_at(&format!("{up}pids.current")),
        );
        if let (Some(max), Some(current)) = (max, current) {
            if max != "max" {
                parts.push(format!(
                    "cgroup {} has {current} of pids.max {max}",
                    p.display()
                ));
            }
        }
        up.push_str("../");
        cg = p.parent();
    }
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string());
    let tasks = read("/proc/loadavg")
        .ok()
        .and_then(|l| Some(l.split_whitespace().nth(3)?.split('/').nth(1)?.to_string()));
    if let (Some(tasks), Ok(max)) = (tasks, read("/proc/sys/kernel/threads-max")) {
        parts.push(format!("the guest has {tasks} of kernel.threads-max {max}"));
    }
    format!(
        "cannot start another process: a task limit is reached ({})",
        parts.join("; ")
    )
}

/// `CLONE_INTO_CGROUP` (linux/sched.h, since 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` (linux/sched.h), version 2 (with `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
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
            trace("container process: filesystem");
            let terminal = req
                .process
                .as_ref()
                .and_then(|p| p.terminal())
                .unwrap_or(false);
            if let Some(master) = rootfs::setup(init, terminal)? {
                send_terminal(control, master)?;
            }
            trace("container process: filesystem done");
            finish(control, req)
        }
        Setup::Exec => finish(control, req),
    }
}

/// Hands the container's own pty to the agent: the master, and a handle on
/// the slave (now fd 0) so that it knows the process's end.
fn send_terminal(control: &OwnedFd, master: OwnedFd) -> Result<(), String> {
    use nix::sys::socket::{sendmsg, ControlMessage};
    let body = serde_json::to_vec(&ChildMessage::Terminal)
        .map_err(|e| format!("encoding the terminal message: {e}"))?;
    let fds = [master.as_raw_fd(), 0];
    sendmsg::<()>(
        control.as_raw_fd(),
        &[std::io::IoSlice::new(&body)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| format!("handing the terminal to the agent: {e}"))?;
    Ok(())
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
    // The program is looked up now, so that a missing one fails the create
    // (as runc does) rather than the start.
    let exec = match security::prepare_exec(process) {
        Ok(e) => e,
        Err(e) => {
            report(control, &ChildMessage::Program(e));
            std::process::exit(127);
        }
    };
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
    default_signals();
    security::apply(process, req.seccomp.as_ref())?;
    exec.exec()
}

/// Gives the program the signal state a fresh process has, as runc does:
/// every disposition back to default and nothing blocked. The helper is a
/// Rust program whose runtime ignores SIGPIPE, and an ignored signal
/// survives `execve`: without this a container's `yes | head` or a writer
/// whose reader went away would loop on EPIPE instead of dying.
fn default_signals() {
    for sig in 1..=libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: resetting a disposition to SIG_DFL installs no handler; a
        // signal number the kernel refuses just returns an error, ignored.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    // SAFETY: sigemptyset initialises the local set; sigprocmask reads it.
    unsafe {
        let mut none = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
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
