//! One process of a container (its init or an exec'd one): its lifecycle,
//! stdio and exit.
//!
//! The exit is *complete* only when the process has exited and every byte of
//! its output has been copied to the shim ([`crate::stdio::ProcessIo::settle`]);
//! waiters and the exit event see it only then.

use std::{
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::sync::watch;
use veil_protocol::agent::ProcessStatus;

use crate::{
    engine::{self, Created, EngineError, ProcessFds},
    reaper::Reaper,
    stdio::ProcessIo,
};

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Prepared (exec) but not spawned.
    Prepared,
    /// Spawned, program not started.
    Created {
        /// Its PID.
        pid: i32,
    },
    /// Running its program.
    Running {
        /// Its PID.
        pid: i32,
    },
    /// Exited, output fully delivered.
    Exited {
        /// Its PID.
        pid: i32,
        /// Exit code or 128 + signal.
        status: i32,
        /// When it exited, ns since the epoch.
        at_ns: i64,
    },
}

impl State {
    /// The PID, once spawned.
    pub fn pid(self) -> Option<i32> {
        match self {
            State::Prepared => None,
            State::Created { pid } | State::Running { pid } | State::Exited { pid, .. } => {
                Some(pid)
            }
        }
    }

    /// The API status (PAUSED is decided by the container).
    pub fn status(self) -> ProcessStatus {
        match self {
            State::Prepared | State::Created { .. } => ProcessStatus::CREATED,
            State::Running { .. } => ProcessStatus::RUNNING,
            State::Exited { .. } => ProcessStatus::STOPPED,
        }
    }
}

/// A process.
pub struct Process {
    /// "" for the init process.
    pub exec_id: String,
    /// Its stdio.
    pub io: Arc<ProcessIo>,
    state: watch::Sender<State>,
    /// The fds for the helper, until spawned.
    fds: Mutex<Option<ProcessFds>>,
    /// The start handle, between create and start.
    created: Mutex<Option<Created>>,
    /// Set when the process has exited (before its output is drained).
    exited: watch::Sender<bool>,
}

/// Called with (pid, status, at_ns) once a process's exit is complete.
pub type OnExit = Box<dyn FnOnce(i32, i32, i64) + Send>;

impl Process {
    /// A process whose stdio is ready and which is not spawned yet.
    pub fn new(exec_id: &str, fds: ProcessFds, io: Arc<ProcessIo>) -> Arc<Self> {
        Arc::new(Process {
            exec_id: exec_id.to_string(),
            io,
            state: watch::channel(State::Prepared).0,
            fds: Mutex::new(Some(fds)),
            created: Mutex::new(None),
            exited: watch::channel(false).0,
        })
    }

    /// The current state.
    pub fn state(&self) -> State {
        *self.state.borrow()
    }

    /// Spawns the process through the engine (it then waits for [`Process::start`])
    /// and begins watching for its exit.
    pub async fn spawn(
        self: &Arc<Self>,
        req: engine::wire::SpawnRequest,
        reaper: &Reaper,
        on_exit: OnExit,
    ) -> Result<i32, EngineError> {
        let fds = self
            .fds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or(EngineError::Vanished("stdio (spawned twice)"))?;
        let created = tokio::task::spawn_blocking(move || engine::create(&req, fds))
            .await
            .map_err(|e| EngineError::Io(std::io::Error::other(e)))?;
        let mut created = created?;
        if let Some((master, slave)) = created.take_terminal() {
            self.io
                .adopt_terminal(master, &slave)
                .map_err(|e| EngineError::Io(std::io::Error::other(e)))?;
        }
        // Collect the helper's own exit so it does not linger as unclaimed.
        let helper = reaper.watch(created.helper_pid);
        tokio::spawn(async move {
            let _ = helper.await;
        });
        let pid = created.pid;
        let exit = reaper.watch(pid);
        *self.created.lock().unwrap_or_else(|p| p.into_inner()) = Some(created);
        self.state.send_replace(State::Created { pid });
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let status = match exit.await {
                Ok(e) => e.status(),
                Err(_) => 255,
            };
            let at_ns = now_ns();
            me.exited.send_replace(true);
            drop(me.created.lock().unwrap_or_else(|p| p.into_inner()).take());
            me.io.settle().await;
            me.state.send_replace(State::Exited { pid, status, at_ns });
            on_exit(pid, status, at_ns);
        });
        Ok(pid)
    }

    /// Lets a created process run its program.
    pub async fn start(self: &Arc<Self>) -> Result<i32, EngineError> {
        let created = self
            .created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or(EngineError::Vanished("the start handle"))?;
        let pid = created.pid;
        tokio::task::spawn_blocking(move || created.start())
            .await
            .map_err(|e| EngineError::Io(std::io::Error::other(e)))??;
        self.state.send_if_modified(|s| {
            if matches!(s, State::Created { .. }) {
                *s = State::Running { pid };
                true
            } else {
                false
            }
        });
        Ok(pid)
    }

    /// True once the process has exited (its output may still be flowing).
    pub fn has_exited(&self) -> bool {
        *self.exited.borrow()
    }

    /// Waits until the process has exited (its output may still be flowing).
    pub async fn wait_exited(&self) {
        let mut rx = self.exited.subscribe();
        let _ = rx.wait_for(|e| *e).await;
    }

    /// Waits until the exit is complete; returns (status, at_ns).
    pub async fn wait(&self) -> (i32, i64) {
        let mut rx = self.state.subscribe();
        loop {
            if let State::Exited { status, at_ns, .. } = *rx.borrow_and_update() {
                return (status, at_ns);
            }
            if rx.changed().await.is_err() {
                return (255, now_ns());
            }
        }
    }

    /// Sends `signal` to the process if it is alive.
    pub fn signal(&self, signal: i32) -> Result<(), nix::Error> {
        if self.has_exited() {
            return Err(nix::Error::ESRCH);
        }
        match self.state().pid() {
            Some(pid) => {
                // SAFETY: kill(2) with integer arguments; real-time signals
                // included, which nix's `Signal` cannot name.
                let rc = unsafe { libc::kill(pid, signal) };
                if rc == 0 {
                    Ok(())
                } else {
                    Err(nix::Error::last())
                }
            }
            None => Err(nix::Error::ESRCH),
        }
    }
}

/// Now, in ns since the epoch.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}
