//! An in-memory pod for the task service's tests: processes are entries in a
//! map that the test (or a signal) makes exit; every call is recorded; any
//! method can be made to fail with a chosen kind.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
        Arc,
    },
    time::SystemTime,
};

use tokio::sync::{mpsc, watch};
use veil_common::{Classify, Kind};
use veil_protocol::agent::ContainerStats;

use crate::{
    phases::Phases,
    pod::{
        AttachedImage, ExitInfo, LaunchRequest, Launcher, NewContainer, NewExec, Pod, PodError,
        PodEvent,
    },
    rootfs::Layers,
    sync::Lock,
};

/// An error the fake answers with.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct FakeError {
    pub kind: Kind,
    pub message: String,
}

impl Classify for FakeError {
    fn kind(&self) -> Kind {
        self.kind
    }
}

fn fail(kind: Kind, message: impl Into<String>) -> PodError {
    PodError::from(FakeError {
        kind,
        message: message.into(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FakeState {
    Created,
    Running,
    Exited,
}

struct FakeProc {
    state: FakeState,
    pid: u32,
    exit: watch::Sender<Option<ExitInfo>>,
}

type Key = (String, String);

/// The fake pod.
pub struct FakePod {
    id: std::sync::OnceLock<String>,
    procs: Lock<HashMap<Key, FakeProc>>,
    next_pid: AtomicU32,
    /// Image key → users.
    pub images: Lock<HashMap<String, usize>>,
    /// Every call, as `method container/exec`.
    pub calls: Lock<Vec<String>>,
    /// Method name → the kind its next call fails with.
    fail_next: Lock<HashMap<&'static str, Kind>>,
    events_tx: mpsc::UnboundedSender<PodEvent>,
    events_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<PodEvent>>,
    /// Whether `shutdown` ran.
    pub shut: AtomicBool,
}

impl FakePod {
    pub fn new() -> Arc<Self> {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Arc::new(FakePod {
            id: std::sync::OnceLock::new(),
            procs: Lock::new(HashMap::new()),
            next_pid: AtomicU32::new(100),
            images: Lock::new(HashMap::new()),
            calls: Lock::new(Vec::new()),
            fail_next: Lock::new(HashMap::new()),
            events_tx,
            events_rx: tokio::sync::Mutex::new(events_rx),
            shut: AtomicBool::new(false),
        })
    }

    /// Makes the next call of `method` fail with `kind`.
    pub fn fail_next(&self, method: &'static str, kind: Kind) {
        self.fail_next.lock().insert(method, kind);
    }

    fn call(&self, method: &'static str, c: &str, e: &str) -> Result<(), PodError> {
        self.calls.lock().push(format!("{method} {c}/{e}"));
        if self.shut.load(Ordering::SeqCst) && method != "shutdown" {
            return Err(fail(Kind::Unavailable, "the fake pod is shut down"));
        }
        match self.fail_next.lock().remove(method) {
            Some(kind) => Err(fail(kind, format!("{method} failed as asked"))),
            None => Ok(()),
        }
    }

    /// The process exits by itself with `status`.
    pub fn finish(&self, c: &str, e: &str, status: u32) {
        let mut procs = self.procs.lock();
        if let Some(p) = procs.get_mut(&(c.to_string(), e.to_string())) {
            Self::end(p, status);
        }
    }

    fn end(p: &mut FakeProc, status: u32) {
        if p.state != FakeState::Exited {
            p.state = FakeState::Exited;
            p.exit.send_replace(Some(ExitInfo {
                status,
                at: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(u64::from(status)),
            }));
        }
    }

    /// The guest reports an OOM kill in `c`.
    pub fn oom(&self, c: &str) {
        let _ = self.events_tx.send(PodEvent::Oom {
            container: c.to_string(),
        });
    }

    /// How many processes the fake tracks.
    /// One use of `image` given back, recorded as `call`.
    fn give_back(&self, call: &str, image: &AttachedImage) -> Result<(), PodError> {
        self.calls.lock().push(format!("{call} {}", image.key));
        let mut images = self.images.lock();
        if let Some(n) = images.get_mut(&image.key) {
            *n -= 1;
            if *n == 0 {
                images.remove(&image.key);
            }
        }
        Ok(())
    }

    pub fn process_count(&self) -> usize {
        self.procs.lock().len()
    }

    fn add(&self, c: &str, e: &str) -> Result<u32, PodError> {
        let mut procs = self.procs.lock();
        let key = (c.to_string(), e.to_string());
        if procs.contains_key(&key) {
            return Err(fail(Kind::AlreadyExists, format!("{c}/{e} exists")));
        }
        let pid = self.next_pid.fetch_add(1, Ordering::SeqCst);
        procs.insert(
            key,
            FakeProc {
                state: FakeState::Created,
                pid,
                exit: watch::channel(None).0,
            },
        );
        Ok(pid)
    }

    fn state_of(&self, c: &str, e: &str) -> Option<FakeState> {
        self.procs
            .lock()
            .get(&(c.to_string(), e.to_string()))
            .map(|p| p.state)
    }
}

#[async_trait::async_trait]
impl Pod for FakePod {
    fn id(&self) -> &str {
        self.id.get().map_or("", String::as_str)
    }

    fn host_pids(&self) -> Vec<u32> {
        Vec::new()
    }

    async fn attach_image(
        &self,
        layers: &Layers,
        _name: &str,
        _work_dir: PathBuf,
        phases: &Phases,
    ) -> Result<AttachedImage, PodError> {
        self.call("attach_image", "", "")?;
        let key = layers
            .lowers
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        *self.images.lock().entry(key.clone()).or_insert(0) += 1;
        phases.mark("rootfs_attached");
        Ok(AttachedImage {
            storage_id: format!("img-{key}"),
            key,
        })
    }

    async fn detach_image(&self, image: &AttachedImage) -> Result<(), PodError> {
        self.give_back("detach_image", image)
    }

    async fn release_image(&self, image: &AttachedImage) -> Result<(), PodError> {
        self.give_back("release_image", image)
    }

    async fn create_container(
        &self,
        c: NewContainer<'_>,
        phases: &Phases,
    ) -> Result<u32, PodError> {
        self.call("create_container", c.id, "")?;
        let pid = self.add(c.id, "")?;
        phases.mark("container_created");
        Ok(pid)
    }

    async fn exec(&self, e: NewExec<'_>) -> Result<(), PodError> {
        self.call("exec", e.container, e.exec)?;
        match self.state_of(e.container, "") {
            None => Err(fail(Kind::NotFound, "no such container")),
            Some(FakeState::Exited) => Err(fail(Kind::FailedPrecondition, "container exited")),
            Some(_) => self.add(e.container, e.exec).map(|_| ()),
        }
    }

    async fn start(&self, c: &str, e: &str) -> Result<u32, PodError> {
        self.call("start", c, e)?;
        let mut procs = self.procs.lock();
        let p = procs
            .get_mut(&(c.to_string(), e.to_string()))
            .ok_or_else(|| fail(Kind::NotFound, "no such process"))?;
        if p.state != FakeState::Created {
            return Err(fail(Kind::FailedPrecondition, "not created"));
        }
        p.state = FakeState::Running;
        Ok(p.pid)
    }

    async fn wait(&self, c: &str, e: &str) -> ExitInfo {
        self.calls.lock().push(format!("wait {c}/{e}"));
        let rx = self
            .procs
            .lock()
            .get(&(c.to_string(), e.to_string()))
            .map(|p| p.exit.subscribe());
        let Some(mut rx) = rx else {
            return ExitInfo {
                status: 255,
                at: SystemTime::now(),
            };
        };
        loop {
            if let Some(exit) = *rx.borrow_and_update() {
                return exit;
            }
            if rx.changed().await.is_err() {
                return ExitInfo {
                    status: 255,
                    at: SystemTime::now(),
                };
            }
        }
    }

    async fn signal(&self, c: &str, e: &str, signal: u32, all: bool) -> Result<(), PodError> {
        self.call("signal", c, e)?;
        let mut procs = self.procs.lock();
        let fatal = matches!(signal, 9 | 15);
        let mut found = false;
        for ((pc, pe), p) in procs.iter_mut() {
            if pc == c && (all || pe == e) {
                found = true;
                if fatal {
                    Self::end(p, 128 + signal);
                }
            }
        }
        if found {
            Ok(())
        } else {
            Err(fail(Kind::NotFound, "no such process"))
        }
    }

    async fn delete_process(&self, c: &str, e: &str) -> Result<(), PodError> {
        self.call("delete_process", c, e)?;
        self.procs.lock().remove(&(c.to_string(), e.to_string()));
        Ok(())
    }

    async fn remove_container(&self, c: &str) -> Result<(), PodError> {
        self.call("remove_container", c, "")?;
        let mut procs = self.procs.lock();
        for ((pc, _), p) in procs.iter_mut() {
            if pc == c {
                Self::end(p, 137);
            }
        }
        procs.retain(|(pc, _), _| pc != c);
        Ok(())
    }

    async fn pids(&self, c: &str) -> Result<Vec<u32>, PodError> {
        self.call("pids", c, "")?;
        let mut v: Vec<u32> = self
            .procs
            .lock()
            .iter()
            .filter(|((pc, _), p)| pc == c && p.state == FakeState::Running)
            .map(|(_, p)| p.pid)
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    async fn stats(&self, c: &str) -> Result<ContainerStats, PodError> {
        self.call("stats", c, "")?;
        Ok(ContainerStats::new())
    }

    async fn freeze(&self, c: &str, _frozen: bool) -> Result<(), PodError> {
        self.call("freeze", c, "")
    }

    async fn update(&self, c: &str, _resources: &[u8]) -> Result<(), PodError> {
        self.call("update", c, "")
    }

    async fn close_stdin(&self, c: &str, e: &str) -> Result<(), PodError> {
        self.call("close_stdin", c, e)
    }

    async fn resize(&self, c: &str, e: &str, _rows: u32, _cols: u32) -> Result<(), PodError> {
        self.call("resize", c, e)
    }

    async fn next_event(&self) -> Option<PodEvent> {
        self.events_rx.lock().await.recv().await
    }

    async fn shutdown(&self, marks: &Phases) {
        self.calls.lock().push("shutdown".into());
        marks.mark("vm_stopped");
        self.shut.store(true, Ordering::SeqCst);
        let mut procs = self.procs.lock();
        for p in procs.values_mut() {
            Self::end(p, 255);
        }
        self.images.lock().clear();
    }
}

/// What a launch was asked for: pod id, whether it had a first image, its
/// network namespace, its hostname.
pub type LaunchSeen = (String, bool, Option<PathBuf>, String);

/// Launches the one fake pod.
pub struct FakeLauncher {
    pub pod: Arc<FakePod>,
    pub launches: AtomicUsize,
    /// The kind the next launch fails with.
    pub fail: Lock<Option<Kind>>,
    /// What the last launch was asked for.
    pub last: Lock<Option<LaunchSeen>>,
}

impl FakeLauncher {
    pub fn new() -> Arc<Self> {
        Arc::new(FakeLauncher {
            pod: FakePod::new(),
            launches: AtomicUsize::new(0),
            fail: Lock::new(None),
            last: Lock::new(None),
        })
    }
}

#[async_trait::async_trait]
impl Launcher for FakeLauncher {
    async fn launch(
        &self,
        req: LaunchRequest<'_>,
        phases: &Phases,
    ) -> Result<Arc<dyn Pod>, PodError> {
        self.launches.fetch_add(1, Ordering::SeqCst);
        *self.last.lock() = Some((
            req.sandbox_id.to_string(),
            req.first_image.is_some(),
            req.netns.clone(),
            req.hostname.clone(),
        ));
        if let Some(kind) = self.fail.lock().take() {
            return Err(fail(kind, "launch failed as asked"));
        }
        let _ = self.pod.id.set(req.sandbox_id.to_string());
        phases.mark("vmm_spawned");
        phases.mark("agent_ready");
        Ok(Arc::clone(&self.pod) as Arc<dyn Pod>)
    }
}
