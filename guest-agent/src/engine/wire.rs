//! Messages between the agent and its engine helper / container process, as
//! JSON on a SOCK_SEQPACKET socket (one message per packet).

use std::path::PathBuf;

use oci_spec::runtime::{LinuxSeccomp, Process};
use serde::{Deserialize, Serialize};

/// Largest request the agent sends (the plan, with a seccomp profile).
pub const MAX_MESSAGE: usize = 2 * 1024 * 1024;

/// Namespaces the engine handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Namespace {
    /// Mount.
    Mount,
    /// PID.
    Pid,
    /// Network.
    Net,
    /// IPC.
    Ipc,
    /// UTS (hostname).
    Uts,
    /// cgroup.
    Cgroup,
}

impl Namespace {
    /// The `clone` flag creating it.
    pub fn clone_flag(self) -> libc::c_int {
        match self {
            Namespace::Mount => libc::CLONE_NEWNS,
            Namespace::Pid => libc::CLONE_NEWPID,
            Namespace::Net => libc::CLONE_NEWNET,
            Namespace::Ipc => libc::CLONE_NEWIPC,
            Namespace::Uts => libc::CLONE_NEWUTS,
            Namespace::Cgroup => libc::CLONE_NEWCGROUP,
        }
    }

    /// Its name under `/proc/PID/ns/`.
    pub fn proc_name(self) -> &'static str {
        match self {
            Namespace::Mount => "mnt",
            Namespace::Pid => "pid",
            Namespace::Net => "net",
            Namespace::Ipc => "ipc",
            Namespace::Uts => "uts",
            Namespace::Cgroup => "cgroup",
        }
    }

    /// Every kind, in the order existing namespaces are joined (mount last,
    /// so the others' paths still resolve in the agent's mount namespace).
    pub const JOIN_ORDER: [Namespace; 6] = [
        Namespace::Cgroup,
        Namespace::Ipc,
        Namespace::Uts,
        Namespace::Net,
        Namespace::Pid,
        Namespace::Mount,
    ];
}

/// One mount the container process performs, relative to its rootfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountPlan {
    /// Absolute path inside the container.
    pub destination: PathBuf,
    /// Filesystem type (`bind` for bind mounts).
    pub fstype: String,
    /// Source: a path in the agent's mount namespace for binds.
    pub source: PathBuf,
    /// `MS_*` flags (without propagation).
    pub flags: u64,
    /// Propagation flags applied afterwards (`MS_PRIVATE`, ...), or 0.
    pub propagation: u64,
    /// Filesystem-specific options.
    pub data: String,
}

impl MountPlan {
    /// True for a bind mount.
    pub fn is_bind(&self) -> bool {
        self.fstype == "bind"
    }
}

/// A device node to create in the container's `/dev`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePlan {
    /// Absolute path inside the container.
    pub path: PathBuf,
    /// `S_IFCHR` or `S_IFBLK` | permission bits.
    pub mode: u32,
    /// Major number.
    pub major: u64,
    /// Minor number.
    pub minor: u64,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// The filesystem side of a new container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitSetup {
    /// The prepared root filesystem (a path in the agent's mount namespace).
    pub rootfs: PathBuf,
    /// Mounts, in spec order.
    pub mounts: Vec<MountPlan>,
    /// Hostname to set (needs a new UTS namespace).
    pub hostname: Option<String>,
    /// Paths hidden from the container.
    pub masked_paths: Vec<PathBuf>,
    /// Paths made read-only.
    pub readonly_paths: Vec<PathBuf>,
    /// Make `/` read-only.
    pub readonly_root: bool,
    /// `(key, value)` sysctls, key dotted.
    pub sysctls: Vec<(String, String)>,
    /// Extra device nodes.
    pub devices: Vec<DevicePlan>,
    /// `MS_*` propagation for `/` of the new mount namespace.
    pub root_propagation: u64,
}

/// What the helper sets up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Setup {
    /// A new container: namespaces, filesystem, then the program.
    Init(Box<InitSetup>),
    /// An extra process in existing namespaces.
    Exec,
    /// The holder of the pod's shared PID namespace: reaps, never execs.
    PidHolder,
}

/// The full plan the helper receives.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpawnRequest {
    /// cgroup directory to join (agent mount namespace path).
    pub cgroup: Option<PathBuf>,
    /// Existing namespaces to join first.
    pub join_namespaces: Vec<(Namespace, PathBuf)>,
    /// Namespaces to create.
    pub new_namespaces: Vec<Namespace>,
    /// What to set up.
    pub setup: Setup,
    /// The program and its credentials (absent for [`Setup::PidHolder`]).
    pub process: Option<Process>,
    /// The container's seccomp profile.
    pub seccomp: Option<LinuxSeccomp>,
}

/// What the helper and container process report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChildMessage {
    /// The container process's PID (from the helper).
    Pid(i32),
    /// Setup done, waiting for the start byte (from the container process).
    Ready,
    /// The container process's terminal, made in its own devpts: the pty
    /// master and a handle on the slave ride along as `SCM_RIGHTS`, in that
    /// order. Sent before `Ready`, only by a first process with a terminal.
    Terminal,
    /// Something failed; the whole error chain.
    Error(String),
    /// The process cannot be created because a task limit is reached (the
    /// container's or the pod's `pids.max`, or the guest's): which one.
    Exhausted(String),
    /// The program (or its working directory) cannot be found or run, found
    /// before the process reports ready: the create fails, as with runc.
    Program(String),
}
