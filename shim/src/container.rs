//! The pod's containers and their processes as the shim tracks them: status,
//! guest PID, exit, and the stdio relay of each process.
//!
//! What containerd asks about them is answered from here; what the guest does
//! with them is the agent's (see [`crate::task`]).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use tokio::sync::watch;

use crate::{
    phases::Phases,
    stdio::{Relay, StdioPaths},
    task::TaskError,
};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit status (128 + signal when killed).
    pub status: u32,
    /// When.
    pub at: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProcStatus {
    Created,
    Running,
    Stopped,
}

/// One process (a container's init or an exec).
pub(crate) struct Process {
    pub(crate) exec_id: String,
    pub(crate) stdio: StdioPaths,
    pub(crate) state: Mutex<(ProcStatus, u32)>,
    pub(crate) exit_tx: watch::Sender<Option<ExitInfo>>,
    pub(crate) relay: tokio::sync::Mutex<Relay>,
}

impl Process {
    pub(crate) fn new(exec_id: &str, stdio: StdioPaths, relay: Relay, pid: u32) -> Arc<Self> {
        Arc::new(Process {
            exec_id: exec_id.to_string(),
            stdio,
            state: Mutex::new((ProcStatus::Created, pid)),
            exit_tx: watch::channel(None).0,
            relay: tokio::sync::Mutex::new(relay),
        })
    }

    pub(crate) fn status(&self) -> (ProcStatus, u32) {
        self.state
            .lock()
            .map(|s| *s)
            .unwrap_or((ProcStatus::Stopped, 0))
    }

    pub(crate) fn set(&self, status: ProcStatus, pid: u32) {
        if let Ok(mut s) = self.state.lock() {
            *s = (status, pid);
        }
    }

    pub(crate) fn exit(&self) -> Option<ExitInfo> {
        *self.exit_tx.borrow()
    }
}

/// One container of the pod.
pub(crate) struct Container {
    pub(crate) id: String,
    pub(crate) bundle: String,
    pub(crate) image_key: String,
    pub(crate) init: Arc<Process>,
    pub(crate) execs: Mutex<HashMap<String, Arc<Process>>>,
    pub(crate) paused: Mutex<bool>,
    /// Phase marks of the start in progress, logged once it started.
    pub(crate) start_phases: Mutex<Option<Phases>>,
}

impl Container {
    pub(crate) fn process(&self, exec_id: &str) -> Result<Arc<Process>, TaskError> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .ok()
            .and_then(|m| m.get(exec_id).cloned())
            .ok_or_else(|| TaskError::NotFound(format!("process {exec_id} of {}", self.id)))
    }
}
