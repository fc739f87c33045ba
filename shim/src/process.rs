//! Child processes the shim owns (QEMU, the vsock backend): spawned with their
//! output captured to files, and stopped by PID — never by name — when dropped.

use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};
use veil_common::{Classify, Kind};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::jail::{Credentials, WriteOnlyBelow};

/// Errors spawning a child.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// Program path.
        program: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Its log file could not be created.
    #[error("cannot create log file {path}")]
    Log {
        /// Log path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Classify for ProcessError {
    fn kind(&self) -> Kind {
        match self {
            ProcessError::Spawn { .. } | ProcessError::Log { .. } => Kind::Internal,
        }
    }
}

/// A running child that is killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ManagedChild {
    name: &'static str,
    child: Option<Child>,
}

/// How to spawn a [`ManagedChild`].
#[derive(Debug, Default, Clone)]
pub struct SpawnOptions {
    /// Deliver SIGKILL to the child when the spawning thread dies. Only for
    /// long-lived spawning threads (tests); a worker pool thread may retire early.
    pub die_with_parent_thread: bool,
    /// Run the child with these credentials (the pod's jail), with no
    /// capabilities and `no_new_privs`; `None`: as the shim.
    pub jail: Option<Credentials>,
    /// Let the child write only below these directories (Landlock), after
    /// the credentials are dropped.
    pub write_only_below: Option<WriteOnlyBelow>,
}

impl ManagedChild {
    /// Spawns `cmd` with stdin closed and stdout+stderr appended to `log`
    /// (created by the shim: a jailed child writes it through the inherited
    /// descriptor, not by name).
    pub fn spawn(
        name: &'static str,
        mut cmd: Command,
        log: &Path,
        opts: SpawnOptions,
    ) -> Result<Self, ProcessError> {
        let out = File::create(log).map_err(|source| ProcessError::Log {
            path: log.into(),
            source,
        })?;
        let err = out.try_clone().map_err(|source| ProcessError::Log {
            path: log.into(),
            source,
        })?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let SpawnOptions {
            die_with_parent_thread,
            jail,
            write_only_below,
        } = opts;
        if die_with_parent_thread || jail.is_some() || write_only_below.is_some() {
            // SAFETY: the closure runs between fork and exec; the jail's
            // credential drop and Landlock rules and prctl(2) are
            // async-signal-safe and read only data prepared before the fork.
            // The parent-death signal comes last: a change of credentials
            // clears it.
            unsafe {
                cmd.pre_exec(move || {
                    if let Some(c) = &jail {
                        c.apply_in_child()?;
                    }
                    if let Some(rules) = &write_only_below {
                        rules.apply_in_child()?;
                    }
                    if die_with_parent_thread
                        && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd
            .spawn()
            .map_err(|source| ProcessError::Spawn { program, source })?;
        tracing::debug!(name, pid = child.id(), "spawned");
        Ok(ManagedChild {
            name,
            child: Some(child),
        })
    }

    /// The child's PID, while it is ours.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the child has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits up to `timeout` for the child to exit by itself; true if it did.
    pub fn wait_timeout(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !self.is_running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        !self.is_running()
    }

    /// Sends SIGKILL and reaps the child. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                if let Ok(pid) = i32::try_from(child.id()) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            let _ = child.wait();
            tracing::debug!(name = self.name, "stopped");
        }
    }
}

impl Drop for ManagedChild {
    fn drop(&mut self) {
        self.kill();
    }
}
