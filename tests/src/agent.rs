//! veil-agent in host mode for tests: the agent binary serving on a unix
//! socket in a temp dir, with its own state dir and cgroup parent.
//!
//! [`HostAgent`] owns all of it: dropping it (also while a failing test
//! unwinds) stops the agent by PID (SIGTERM, then SIGKILL), kills whatever is
//! left in its cgroups and removes them, and deletes the temp dir. The agent's
//! mounts live in its private mount namespace and vanish with it.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use tokio::net::UnixStream;
use veil_protocol::agent::StreamKind;

/// A host-mode agent.
pub struct HostAgent {
    child: Child,
    /// The API socket.
    pub socket: PathBuf,
    /// The agent's state dir.
    pub state_dir: PathBuf,
    /// The agent's parent cgroup.
    pub cgroup_parent: PathBuf,
    dir: tempfile::TempDir,
}

/// The cgroup2 mount point (`/sys/fs/cgroup` on v2 hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    for line in info.lines() {
        if let Some((pre, post)) = line.split_once(" - ") {
            if post.starts_with("cgroup2 ") {
                if let Some(mp) = pre.split_whitespace().nth(4) {
                    return Ok(PathBuf::from(mp));
                }
            }
        }
    }
    bail!("no cgroup2 hierarchy is mounted: the agent needs cgroup v2")
}

/// True if the cgroup2 hierarchy offers `controller` (e.g. `memory`).
pub fn cgroup2_has(controller: &str) -> bool {
    cgroup2_mount()
        .ok()
        .and_then(|m| std::fs::read_to_string(m.join("cgroup.controllers")).ok())
        .is_some_and(|c| c.split_whitespace().any(|x| x == controller))
}

impl HostAgent {
    /// Starts `bin` (the veil-agent binary) as root in host mode and waits for
    /// its socket.
    pub fn start(bin: &Path) -> Result<Self> {
        if !nix::unistd::Uid::effective().is_root() {
            bail!("host-mode agent tests need root (namespaces, mounts, cgroups)");
        }
        let dir = tempfile::Builder::new()
            .prefix("veil-agent-test.")
            .tempdir()?;
        let socket = dir.path().join("agent.sock");
        let state_dir = dir.path().join("state");
        let cgroup_parent = cgroup2_mount()?.join(format!(
            "veil-test-{}-{}",
            std::process::id(),
            dir.path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        let log = std::fs::File::create(dir.path().join("agent.log"))?;
        let child = Command::new(bin)
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--cgroup-parent")
            .arg(&cgroup_parent)
            .args(["--log", "veil_agent=debug"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut agent = HostAgent {
            child,
            socket,
            state_dir,
            cgroup_parent,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !agent.socket.exists()
            || !veil_protocol::stream::host_stream_socket(&agent.socket).exists()
        {
            if let Some(st) = agent.child.try_wait()? {
                bail!("agent exited with {st}; log:\n{}", agent.log());
            }
            if Instant::now() > deadline {
                bail!("agent socket did not appear; log:\n{}", agent.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(agent)
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// The agent's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A ttrpc client to the agent API.
    pub fn client(&self) -> Result<ttrpc::r#async::Client> {
        ttrpc::r#async::Client::connect(&format!("unix://{}", self.socket.display()))
            .with_context(|| format!("connecting to {}", self.socket.display()))
    }

    /// Opens a stdio stream of a process (handshake done).
    pub async fn open_stream(
        &self,
        container_id: &str,
        exec_id: &str,
        kind: StreamKind,
    ) -> Result<UnixStream> {
        let mut conn =
            UnixStream::connect(veil_protocol::stream::host_stream_socket(&self.socket)).await?;
        veil_protocol::stream::open(&mut conn, container_id, exec_id, kind).await?;
        Ok(conn)
    }

    /// A scratch directory that lives as long as the agent.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        crate::stop_child(&mut self.child, Duration::from_secs(10));
        // Whatever the agent left: kill it and remove the cgroups.
        if let Ok(entries) = std::fs::read_dir(&self.cgroup_parent) {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    let _ = std::fs::write(p.join("cgroup.kill"), "1");
                    for _ in 0..100 {
                        if std::fs::remove_dir(&p).is_ok() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        }
        let _ = std::fs::remove_dir(&self.cgroup_parent);
    }
}
