//! Collects the exit status of every child (PID 1 and subreaper duty) and hands
//! it to whoever waits for that PID.
//!
//! A waiter registers a PID with [`Reaper::watch`]; if the child already exited,
//! its status was kept and is delivered at once. Statuses nobody asks for (orphans)
//! are kept for a bounded number of PIDs and then dropped.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use nix::{
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::Pid,
};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::oneshot,
};

/// How many unclaimed exit statuses are kept.
const MAX_UNCLAIMED: usize = 1024;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl Exit {
    /// The shell convention: the code, or 128 + signal number.
    pub fn status(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

#[derive(Default)]
struct State {
    waiters: HashMap<i32, Vec<oneshot::Sender<Exit>>>,
    unclaimed: HashMap<i32, Exit>,
    unclaimed_order: VecDeque<i32>,
}

/// Handle to the reaper task.
#[derive(Clone)]
pub struct Reaper {
    state: Arc<Mutex<State>>,
}

impl Reaper {
    /// Starts reaping on SIGCHLD. Must be called inside a tokio runtime.
    pub fn start() -> std::io::Result<Self> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Reaper {
            state: Arc::new(Mutex::new(State::default())),
        };
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap_all();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Returns a receiver that yields the exit of `pid`.
    pub fn watch(&self, pid: i32) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.lock();
        if let Some(exit) = st.unclaimed.remove(&pid) {
            st.unclaimed_order.retain(|p| *p != pid);
            let _ = tx.send(exit);
        } else {
            st.waiters.entry(pid).or_default().push(tx);
        }
        rx
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave State inconsistent in a way
        // that matters (maps of senders), so recover from poisoning.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reaps every exited child without blocking.
    fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.deliver(pid.as_raw(), Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.deliver(pid.as_raw(), Exit::Signal(sig as i32))
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }

    fn deliver(&self, pid: i32, exit: Exit) {
        tracing::debug!(pid, ?exit, "child exited");
        let mut st = self.lock();
        if let Some(waiters) = st.waiters.remove(&pid) {
            for w in waiters {
                let _ = w.send(exit);
            }
            return;
        }
        if st.unclaimed_order.len() >= MAX_UNCLAIMED {
            if let Some(old) = st.unclaimed_order.pop_front() {
                st.unclaimed.remove(&old);
            }
        }
        st.unclaimed.insert(pid, exit);
        st.unclaimed_order.push_back(pid);
    }
}

#[cfg(test)]
#[allow(
    clippy::zombie_processes,
    reason = "the reaper under test collects them"
)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delivers_exit_codes_and_signals() {
        let reaper = Reaper::start().unwrap();
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 42"])
            .spawn()
            .unwrap();
        let exit = reaper.watch(child.id() as i32).await.unwrap();
        assert_eq!(exit, Exit::Code(42));

        let child = std::process::Command::new("sh")
            .args(["-c", "kill -9 $$"])
            .spawn()
            .unwrap();
        let exit = reaper.watch(child.id() as i32).await.unwrap();
        assert_eq!(exit, Exit::Signal(9));
        assert_eq!(exit.status(), 137);
    }

    #[tokio::test]
    async fn keeps_status_of_a_child_that_exited_before_watch() {
        let reaper = Reaper::start().unwrap();
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(reaper.watch(pid).await.unwrap(), Exit::Code(0));
    }
}
