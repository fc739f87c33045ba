//! The node as the installer sees it.
//!
//! In the DaemonSet the host's `/` is mounted at `/host`: files are written
//! below [`Host::root`], but what goes into config files must be the path the
//! host itself uses ([`Host::view`], `/` on a real node). Tests use a temp
//! dir for both. Commands meant for the host (`containerd --version`,
//! `systemctl restart containerd`) run in the mount namespace of PID 1 when
//! [`Host::host_mount_ns`] is set (the pod shares the host's PID namespace).

use std::{
    os::{fd::AsFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// Errors running a host command.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The host's mount namespace cannot be opened.
    #[error("cannot open /proc/1/ns/mnt (does the pod share the host's PID namespace?)")]
    Namespace(#[source] std::io::Error),
    /// The command could not be started.
    #[error("cannot run {cmd}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The command ran and failed.
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its stderr, trimmed.
        stderr: String,
    },
}

/// Where the node's root is and how to run commands on it.
#[derive(Debug, Clone)]
pub struct Host {
    /// Where this process sees the host's `/`.
    pub root: PathBuf,
    /// What the host calls that directory (`/` on a node).
    pub view: PathBuf,
    /// Run host commands in PID 1's mount namespace.
    pub host_mount_ns: bool,
}

impl Host {
    /// `path` (absolute, as the host names it) as this process reaches it.
    pub fn at(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// `path` (absolute, host-relative) as the host itself names it, for
    /// config files.
    pub fn seen(&self, path: &str) -> PathBuf {
        self.view.join(path.trim_start_matches('/'))
    }

    /// A command to run on the host.
    pub fn command(&self, argv: &[&str]) -> Result<Command, HostError> {
        let mut c = Command::new(argv[0]);
        c.args(&argv[1..]);
        if self.host_mount_ns {
            let ns = std::fs::File::open("/proc/1/ns/mnt").map_err(HostError::Namespace)?;
            // SAFETY: the closure runs in the child between fork and exec and
            // only calls setns(2), which is async-signal-safe; `ns` is an open
            // fd the closure owns, so it is valid there.
            unsafe {
                c.pre_exec(move || {
                    nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNS)
                        .map_err(std::io::Error::from)
                });
            }
        }
        Ok(c)
    }

    /// Runs a host command, failing unless it exits 0.
    pub fn run(&self, argv: &[&str]) -> Result<Output, HostError> {
        run_checked(self.command(argv)?, &argv.join(" "))
    }
}

/// Runs `cmd`, failing with its stderr unless it exits 0.
pub fn run_checked(mut cmd: Command, name: &str) -> Result<Output, HostError> {
    let out = cmd.output().map_err(|source| HostError::Spawn {
        cmd: name.to_string(),
        source,
    })?;
    if !out.status.success() {
        return Err(HostError::Failed {
            cmd: name.to_string(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// The first of `dirs` (host paths) holding an executable `name`, as the
/// host names it.
pub fn find_on_host(host: &Host, name: &str, dirs: &[&str]) -> Option<PathBuf> {
    dirs.iter()
        .map(|d| format!("{d}/{name}"))
        .find(|p| is_file(&host.at(p)))
        .map(|p| host.seen(&p))
}

fn is_file(p: &Path) -> bool {
    std::fs::metadata(p).map(|m| m.is_file()).unwrap_or(false)
}
