//! One container: its spec, cgroup, overlay root, init process and exec'd
//! processes. The pod ([`crate::pod`]) creates and removes containers; this
//! module owns what happens to one while it lives.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::Duration,
};

use oci_spec::runtime::{LinuxResources, Process as OciProcess, Spec};
use veil_protocol::agent::{ContainerStats, ProcessState, ProcessStatus};

use crate::{
    cgroup::{Cgroup, CgroupError},
    events::Events,
    process::{Process, State},
    storage::OverlayRoot,
};

/// How often the OOM counter is polled.
const OOM_POLL: Duration = Duration::from_millis(100);

/// An exec'd process and, until it starts, its OCI process spec.
pub struct Exec {
    /// The process.
    pub process: Arc<Process>,
    /// Its spec, taken when it starts.
    pub spec: Mutex<Option<OciProcess>>,
}

/// A container.
pub struct Container {
    /// Its id.
    pub id: String,
    /// Its OCI spec.
    pub spec: Spec,
    /// Its cgroup.
    pub cgroup: Cgroup,
    /// Its root filesystem.
    pub overlay: OverlayRoot,
    /// The storage its lower layer is in.
    pub storage_id: String,
    /// Its init process.
    pub init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Exec>>>,
    oom_seen: Arc<AtomicU64>,
}

impl Container {
    /// A container around an init process that is not spawned yet.
    pub fn new(
        id: String,
        spec: Spec,
        cgroup: Cgroup,
        overlay: OverlayRoot,
        storage_id: String,
        init: Arc<Process>,
    ) -> Arc<Self> {
        Arc::new(Container {
            id,
            spec,
            cgroup,
            overlay,
            storage_id,
            init,
            execs: Mutex::new(HashMap::new()),
            oom_seen: Arc::new(AtomicU64::new(0)),
        })
    }

    fn execs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Exec>>> {
        self.execs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reports OOM kills not reported yet. Returns true if there were any.
    pub fn check_oom(&self, events: &Events) -> bool {
        report_oom(&self.cgroup, &self.oom_seen, &self.id, events)
    }

    /// Polls the OOM counter until the container is gone.
    pub fn watch_oom(self: &Arc<Self>, events: Arc<Events>) {
        let weak: Weak<Container> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(OOM_POLL).await;
                let Some(c) = weak.upgrade() else { return };
                c.check_oom(&events);
            }
        });
    }

    /// The exit callback for a process of this container: report OOM kills
    /// first (so the shim sees OOM before the exit it caused), then the exit.
    pub fn on_exit(&self, exec_id: &str, events: Arc<Events>) -> crate::process::OnExit {
        let cgroup = self.cgroup.clone();
        let seen = Arc::clone(&self.oom_seen);
        let id = self.id.clone();
        let exec_id = exec_id.to_string();
        Box::new(move |pid, status, at_ns| {
            report_oom(&cgroup, &seen, &id, &events);
            events.exit(&id, &exec_id, pid, status, at_ns);
        })
    }

    /// True while the init process runs its program.
    pub fn is_running(&self) -> bool {
        matches!(self.init.state(), State::Running { .. }) && !self.init.has_exited()
    }

    /// The process `exec_id` ("" = init).
    pub fn process(&self, exec_id: &str) -> Option<Arc<Process>> {
        if exec_id.is_empty() {
            Some(Arc::clone(&self.init))
        } else {
            self.execs().get(exec_id).map(|e| Arc::clone(&e.process))
        }
    }

    /// The exec entry `exec_id`.
    pub fn exec(&self, exec_id: &str) -> Option<Arc<Exec>> {
        self.execs().get(exec_id).cloned()
    }

    /// Adds an exec'd process; false if the id is taken.
    pub fn add_exec(&self, exec_id: &str, exec: Exec) -> bool {
        let mut m = self.execs();
        if m.contains_key(exec_id) {
            return false;
        }
        m.insert(exec_id.to_string(), Arc::new(exec));
        true
    }

    /// Removes an exec'd process entry.
    pub fn remove_exec(&self, exec_id: &str) {
        self.execs().remove(exec_id);
    }

    /// The API state of a process.
    pub fn state_of(&self, p: &Process) -> ProcessState {
        let st = p.state();
        let mut out = ProcessState::new();
        let mut status = st.status();
        if status == ProcessStatus::RUNNING && self.cgroup.is_frozen() {
            status = ProcessStatus::PAUSED;
        }
        out.status = status.into();
        out.pid = st.pid().unwrap_or(0) as u32;
        if let State::Exited { status, at_ns, .. } = st {
            out.exit_status = status;
            out.exited_at_ns = at_ns;
        }
        out.terminal = p.io.has_terminal();
        out
    }

    /// Freezes or thaws the container.
    pub async fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        self.cgroup.freeze(frozen).await
    }

    /// Applies new resources.
    pub fn update(&self, r: &LinuxResources) -> Result<(), CgroupError> {
        self.cgroup.apply(r)
    }

    /// cgroup statistics.
    pub fn stats(&self) -> ContainerStats {
        self.cgroup.stats()
    }

    /// Drops the streams of every process that were never attached.
    pub fn abandon_streams(&self) {
        self.init.io.abandon();
        for e in self.execs().values() {
            e.process.io.abandon();
        }
    }

    /// Kills every process and waits for the init's exit to complete.
    pub async fn kill_all_and_wait(&self) {
        if self.init.state().pid().is_some() && !self.init.has_exited() {
            let _ = self.cgroup.signal_all(libc::SIGKILL);
            let _ = self.init.signal(libc::SIGKILL);
            let _ = tokio::time::timeout(Duration::from_secs(10), self.init.wait_exited()).await;
        }
    }
}

fn report_oom(cgroup: &Cgroup, seen: &AtomicU64, id: &str, events: &Events) -> bool {
    let now = cgroup.oom_kills();
    let before = seen.swap(now, Ordering::SeqCst);
    if now > before {
        tracing::info!(container = id, kills = now - before, "OOM kill");
        events.oom(id);
        true
    } else {
        false
    }
}
