//! The pod's containers and their processes as the task service tracks them:
//! each process's state machine (created → running → exited, the same for a
//! container's init and an exec'd process), its exit for `Wait`, and what a
//! container holds (its image, its execs, its pending start phases).
//!
//! Transitions are checked in one place ([`Process::start`],
//! [`Process::exit`]); the task service never edits a state by hand.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use tokio::sync::watch;
use veil_common::{Classify, Kind};

use crate::{
    phases::Phases,
    pod::{AttachedImage, ExitInfo},
    stdio::StdioPaths,
    sync::Lock,
};

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcState {
    /// Created in the guest, waiting to be started.
    Created {
        /// Its PID (0 for an exec not started yet).
        pid: u32,
    },
    /// Started.
    Running {
        /// Its guest PID.
        pid: u32,
    },
    /// Ended, and what it wrote was delivered.
    Exited {
        /// Its guest PID.
        pid: u32,
        /// How it ended.
        exit: ExitInfo,
    },
}

impl ProcState {
    /// The process's PID.
    pub fn pid(&self) -> u32 {
        match *self {
            ProcState::Created { pid }
            | ProcState::Running { pid }
            | ProcState::Exited { pid, .. } => pid,
        }
    }

    /// How it ended, once it did.
    pub fn exit(&self) -> Option<ExitInfo> {
        match *self {
            ProcState::Exited { exit, .. } => Some(exit),
            _ => None,
        }
    }
}

/// A transition the state machine refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// Start of a process that is running.
    #[error("already started")]
    AlreadyStarted,
    /// Start of a process that has exited.
    #[error("already exited")]
    Exited,
}

impl Classify for TransitionError {
    fn kind(&self) -> Kind {
        match self {
            TransitionError::AlreadyStarted | TransitionError::Exited => Kind::FailedPrecondition,
        }
    }
}

/// One process (a container's init or an exec).
pub struct Process {
    /// Exec id ("" for the init).
    pub exec_id: String,
    /// Its stdio on the host, as containerd gave it.
    pub stdio: StdioPaths,
    state: Lock<ProcState>,
    exit_tx: watch::Sender<Option<ExitInfo>>,
}

impl Process {
    /// A created process.
    pub fn new(exec_id: &str, stdio: StdioPaths, pid: u32) -> Arc<Self> {
        Arc::new(Process {
            exec_id: exec_id.to_string(),
            stdio,
            state: Lock::new(ProcState::Created { pid }),
            exit_tx: watch::channel(None).0,
        })
    }

    /// Its state now.
    pub fn state(&self) -> ProcState {
        *self.state.lock()
    }

    /// Created → running.
    pub fn start(&self, pid: u32) -> Result<(), TransitionError> {
        let mut s = self.state.lock();
        match *s {
            ProcState::Created { .. } => {
                *s = ProcState::Running { pid };
                Ok(())
            }
            ProcState::Running { .. } => Err(TransitionError::AlreadyStarted),
            ProcState::Exited { .. } => Err(TransitionError::Exited),
        }
    }

    /// Created or running → exited, and wakes every waiter. Returns false
    /// (changing nothing) when it had already exited: the first exit wins.
    pub fn exit(&self, exit: ExitInfo) -> bool {
        {
            let mut s = self.state.lock();
            if matches!(*s, ProcState::Exited { .. }) {
                return false;
            }
            *s = ProcState::Exited { pid: s.pid(), exit };
        }
        self.exit_tx.send_replace(Some(exit));
        true
    }

    /// Waits until it exited.
    pub async fn exited(&self) -> ExitInfo {
        let mut rx = self.exit_tx.subscribe();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as `self`: unreachable while
                // borrowed, but never hang.
                return ExitInfo {
                    status: 255,
                    at: std::time::SystemTime::now(),
                };
            }
        }
    }
}

/// One container of the pod.
pub struct Container {
    /// Container id.
    pub id: String,
    /// Its bundle directory.
    pub bundle: String,
    /// Its root image in the pod.
    pub image: AttachedImage,
    /// Its init process.
    pub init: Arc<Process>,
    execs: Lock<HashMap<String, Arc<Process>>>,
    paused: AtomicBool,
    start_phases: Lock<Option<Phases>>,
}

impl Container {
    /// A created container whose start phases so far are `phases`.
    pub fn new(
        id: &str,
        bundle: &str,
        image: AttachedImage,
        init: Arc<Process>,
        phases: Phases,
    ) -> Arc<Self> {
        Arc::new(Container {
            id: id.to_string(),
            bundle: bundle.to_string(),
            image,
            init,
            execs: Lock::new(HashMap::new()),
            paused: AtomicBool::new(false),
            start_phases: Lock::new(Some(phases)),
        })
    }

    /// The process `exec_id` ("" is the init).
    pub fn process(&self, exec_id: &str) -> Option<Arc<Process>> {
        if exec_id.is_empty() {
            return Some(Arc::clone(&self.init));
        }
        self.execs.lock().get(exec_id).cloned()
    }

    /// Adds an exec'd process; false if the id is taken.
    pub fn add_exec(&self, p: Arc<Process>) -> bool {
        let mut m = self.execs.lock();
        if m.contains_key(&p.exec_id) {
            return false;
        }
        m.insert(p.exec_id.clone(), p);
        true
    }

    /// Forgets an exec'd process.
    pub fn remove_exec(&self, exec_id: &str) {
        self.execs.lock().remove(exec_id);
    }

    /// Whether it is frozen.
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// Records a freeze or thaw.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    /// The start phases, once (at start).
    pub fn take_start_phases(&self) -> Option<Phases> {
        self.start_phases.lock().take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn exit(status: u32) -> ExitInfo {
        ExitInfo {
            status,
            at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn created_running_exited_and_nothing_else() {
        let p = Process::new("", StdioPaths::default(), 7);
        assert_eq!(p.state(), ProcState::Created { pid: 7 });
        p.start(7).unwrap();
        assert_eq!(p.start(7), Err(TransitionError::AlreadyStarted));
        assert!(p.exit(exit(3)));
        assert!(!p.exit(exit(4)), "the first exit wins");
        assert_eq!(p.state().exit(), Some(exit(3)));
        assert_eq!(p.start(7), Err(TransitionError::Exited));
        assert_eq!(p.state().pid(), 7);
    }

    #[test]
    fn a_created_process_can_exit_without_starting() {
        let p = Process::new("e1", StdioPaths::default(), 0);
        assert!(p.exit(exit(137)));
        assert_eq!(p.state().exit(), Some(exit(137)));
    }

    #[tokio::test]
    async fn waiters_before_and_after_the_exit_see_it() {
        let p = Process::new("", StdioPaths::default(), 1);
        p.start(1).unwrap();
        let early = {
            let p = Arc::clone(&p);
            tokio::spawn(async move { p.exited().await })
        };
        tokio::task::yield_now().await;
        p.exit(exit(5));
        assert_eq!(early.await.unwrap(), exit(5));
        assert_eq!(p.exited().await, exit(5));
    }

    #[test]
    fn transition_errors_are_failed_preconditions() {
        for e in [TransitionError::AlreadyStarted, TransitionError::Exited] {
            assert_eq!(e.kind(), Kind::FailedPrecondition);
        }
    }
}
