//! The pod: the sandbox, its storages and its containers, and every use case
//! of the agent API on them. The ttrpc services ([`crate::service`]) and the
//! stream listener ([`crate::streams`]) are thin adapters over this type, which
//! can be driven directly in tests.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use oci_spec::runtime::LinuxResources;
use tokio::sync::Mutex;
use veil_protocol::agent::{
    AddStorageRequest, ContainerStats, CreateContainerRequest, CreateSandboxRequest,
    ExecProcessRequest, ProcessState, PutVolumeRequest, Stdio, StreamKind,
};

use crate::{
    cgroup::{CgroupError, CgroupParent},
    container::{Container, Exec},
    disk::{EphemeralKeys, KeySource},
    engine::{self, plan, EngineError},
    events::Events,
    process::{Process, State},
    reaper::Reaper,
    sandbox::{self, Sandbox},
    status::{Classify, Kind},
    stdio::{self, StdioError},
    storage::{OverlayRoot, StorageError, Storages},
    validate::{self, ValidationError},
    volumes::{VolumeError, Volumes},
};

/// Largest OCI spec or process JSON accepted.
pub const MAX_SPEC: usize = 1024 * 1024;

/// Errors of pod operations.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// A malformed request field.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// No such object.
    #[error("{what} '{id}' not found")]
    NotFound {
        /// What kind of object.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The id is taken.
    #[error("{what} '{id}' already exists")]
    Exists {
        /// What kind of object.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The object is in the wrong state for the request.
    #[error("{0}")]
    State(String),
    /// A bad request body (resources JSON, signal number...).
    #[error("{0}")]
    BadRequest(String),
    /// The spec was refused.
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    /// A storage operation failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A file volume operation failed.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// A cgroup operation failed.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// Creating or starting a process failed.
    #[error("cannot run the process")]
    Engine(#[from] EngineError),
    /// A stdio operation failed.
    #[error(transparent)]
    Stdio(#[from] StdioError),
    /// The pod's network could not be configured.
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    /// Another OS operation failed.
    #[error("{what}")]
    Io {
        /// What was attempted.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Classify for PodError {
    fn kind(&self) -> Kind {
        match self {
            PodError::Invalid(_) | PodError::BadRequest(_) => Kind::InvalidArgument,
            PodError::NotFound { .. } => Kind::NotFound,
            PodError::Exists { .. } => Kind::AlreadyExists,
            PodError::State(_) => Kind::FailedPrecondition,
            PodError::Plan(e) => e.kind(),
            PodError::Storage(e) => e.kind(),
            PodError::Volume(e) => e.kind(),
            PodError::Cgroup(e) => e.kind(),
            PodError::Stdio(e) => e.kind(),
            PodError::Engine(e) => e.kind(),
            PodError::Network(e) => e.kind(),
            PodError::Io { .. } => Kind::Internal,
        }
    }
}

fn not_found(what: &'static str, id: &str) -> PodError {
    PodError::NotFound {
        what,
        id: id.to_string(),
    }
}

/// How long a hot-added block volume may take to appear.
const BLOCK_APPEAR: std::time::Duration = std::time::Duration::from_secs(10);

/// The block volumes of `spec` ([`plan::BLOCK_DEVICES_ANNOTATION`]), each
/// found by its disk serial: container path → the guest's (major, minor).
async fn block_volumes(
    spec: &oci_spec::runtime::Spec,
) -> Result<HashMap<PathBuf, (u64, u64)>, PodError> {
    let Some(text) = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(plan::BLOCK_DEVICES_ANNOTATION))
    else {
        return Ok(HashMap::new());
    };
    let wanted: HashMap<String, String> = serde_json::from_str(text).map_err(|e| {
        PodError::BadRequest(format!(
            "annotation {}: not a JSON object of path to serial: {e}",
            plan::BLOCK_DEVICES_ANNOTATION
        ))
    })?;
    let mut out = HashMap::new();
    for (path, serial) in wanted {
        let path = validate::absolute_path("block device", &path)?;
        let dev = crate::storage::find_by_serial(&serial, BLOCK_APPEAR).await?;
        let meta = std::fs::metadata(&dev).map_err(|source| PodError::Io {
            what: format!("stat {}", dev.display()),
            source,
        })?;
        let rdev = std::os::unix::fs::MetadataExt::rdev(&meta);
        out.insert(
            path,
            (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev)),
        );
    }
    Ok(out)
}

/// Where the pod keeps its state.
#[derive(Debug, Clone)]
pub struct PodConfig {
    /// Directory for sandbox files, storage mounts and container roots.
    pub state_dir: PathBuf,
    /// Parent cgroup of the containers' cgroups.
    pub cgroup_parent: PathBuf,
    /// Host mode: image files, directories and host paths are allowed.
    pub host_mode: bool,
}

struct Inner {
    sandbox: Option<Sandbox>,
    cgroups: Option<CgroupParent>,
    storages: Storages,
    volumes: Volumes,
    containers: HashMap<String, Arc<Container>>,
}

/// The pod.
pub struct Pod {
    cfg: PodConfig,
    reaper: Reaper,
    /// Where the scratch disk's key and the image policy come from.
    keys: Arc<dyn KeySource>,
    /// Its event queue.
    pub events: Arc<Events>,
    inner: Mutex<Inner>,
}

/// What the planner needs from the pod, captured while the pod is locked.
struct PlanCtx<'a> {
    inner: &'a Inner,
    host_mode: bool,
    /// Block volumes found by serial: container path → guest numbers.
    block: HashMap<PathBuf, (u64, u64)>,
}

impl plan::Context for PlanCtx<'_> {
    fn bind_source(
        &self,
        source: &str,
    ) -> Result<PathBuf, Box<dyn std::error::Error + Send + Sync>> {
        if let Some(name) = source.strip_prefix("sandbox:") {
            let sb = self.inner.sandbox.as_ref().ok_or("no sandbox")?;
            return sb.file(name).ok_or_else(|| {
                format!("no sandbox file '{name}' (have {:?})", sandbox::FILES).into()
            });
        }
        if let Some(rest) = source.strip_prefix("storage:") {
            let (id, sub) = rest.split_once('/').unwrap_or((rest, ""));
            validate::id("storage_id", id)?;
            let sub = validate::relative_path("storage subpath", sub)?;
            let root = self
                .inner
                .storages
                .root(id)
                .ok_or_else(|| format!("storage '{id}' not found"))?;
            // Symlinks in the (host-provided) storage resolve inside it.
            let p = crate::engine::rootfs::resolve_in_root(root, &Path::new("/").join(&sub))?;
            if !p.exists() {
                // On the scratch disk a volume is made on first use (emptyDir).
                if !self.inner.storages.is_scratch(id) || sub.as_os_str().is_empty() {
                    return Err(format!("{} does not exist", p.display()).into());
                }
                std::fs::create_dir_all(&p)
                    .map_err(|e| format!("cannot create volume {}: {e}", p.display()))?;
            }
            return Ok(p);
        }
        if let Some(rest) = source.strip_prefix("volume:") {
            return Ok(self.inner.volumes.bind_source(rest)?);
        }
        if self.host_mode && source.starts_with('/') {
            let p = validate::absolute_path("bind source", source)?;
            if !p.exists() {
                return Err(format!("{} does not exist", p.display()).into());
            }
            return Ok(p);
        }
        Err("expected sandbox:NAME, storage:ID[/SUBPATH] or volume:ID[/SUBPATH] (host paths only in host mode)".into())
    }

    fn host_mode(&self) -> bool {
        self.host_mode
    }

    fn sandbox_hostname(&self) -> Option<String> {
        self.inner
            .sandbox
            .as_ref()
            .map(|s| s.hostname.clone())
            .filter(|h| !h.is_empty())
    }

    fn shared_pid_namespace(&self) -> Option<PathBuf> {
        self.inner.sandbox.as_ref().and_then(Sandbox::pid_namespace)
    }

    fn pod_namespace(&self, kind: engine::wire::Namespace) -> Option<PathBuf> {
        let sb = self.inner.sandbox.as_ref()?;
        let pause = self.inner.containers.get(&sb.id)?;
        if pause.init.has_exited() {
            return None;
        }
        let pid = pause.init.state().pid()?;
        Some(engine::ns_path(pid, kind))
    }

    fn guest_devices(&self) -> Vec<engine::wire::DevicePlan> {
        engine::devices::guest_devices(Path::new("/dev"))
    }

    fn block_device(&self, path: &Path) -> Option<(u64, u64)> {
        self.block.get(path).copied()
    }

    fn share_bind_source(
        &self,
        source: &Path,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        engine::propagation::ensure_shared(source)
            .map_err(|e| format!("making {} a shared mount: {e}", source.display()).into())
    }
}

/// A container process that vanished while setting up, after its cgroup
/// killed it for memory, ran into its memory limit: say so, naming the limit
/// (as runc names the limit it cannot set), rather than that the helper ended.
fn too_little_memory(c: &Container, e: EngineError) -> PodError {
    if !matches!(e, EngineError::Vanished(_)) || c.cgroup.oom_kills() == 0 {
        return e.into();
    }
    let limit = c
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit());
    PodError::BadRequest(match limit {
        Some(l) => format!(
            "the container's memory limit of {l} bytes is too low: its process was killed for \
             memory (OOM) before it could start"
        ),
        None => "the container's process was killed for memory (OOM) before it could start".into(),
    })
}

impl Pod {
    /// An empty pod (no sandbox yet).
    pub fn new(cfg: PodConfig, reaper: Reaper) -> Self {
        let storages = Storages::new(cfg.state_dir.join("storage"), cfg.host_mode);
        let volumes = Volumes::new(cfg.state_dir.join("volumes"));
        Pod {
            cfg,
            reaper,
            keys: Arc::new(EphemeralKeys::default()),
            events: Arc::new(Events::default()),
            inner: Mutex::new(Inner {
                sandbox: None,
                cgroups: None,
                storages,
                volumes,
                containers: HashMap::new(),
            }),
        }
    }

    /// Takes the scratch disk's key and the image policy from `keys` (the
    /// broker-backed source of a confidential pod; tests) instead of an
    /// ephemeral key and no policy.
    pub fn with_key_source(mut self, keys: Arc<dyn KeySource>) -> Self {
        self.keys = keys;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &PodConfig {
        &self.cfg
    }

    // ---- sandbox ----

    /// Creates the sandbox.
    pub async fn create_sandbox(&self, req: &CreateSandboxRequest) -> Result<(), PodError> {
        sandbox::validate(req)?;
        let net = crate::network::plan(req)?;
        let mut inner = self.inner.lock().await;
        if let Some(sb) = &inner.sandbox {
            return Err(PodError::Exists {
                what: "sandbox",
                id: sb.id.clone(),
            });
        }
        if self.cfg.host_mode {
            // The agent runs on a host (tests): its links are not the pod's.
            if !net.interfaces.is_empty() {
                return Err(PodError::State(
                    "network interfaces need the agent in a VM, not in host mode".into(),
                ));
            }
        } else {
            crate::network::apply(&net).await?;
        }
        let dir = self.cfg.state_dir.join("sandbox");
        sandbox::write_files(&dir, req).map_err(|source| PodError::Io {
            what: format!("writing sandbox files in {}", dir.display()),
            source,
        })?;
        let cgroups = CgroupParent::create(self.cfg.cgroup_parent.clone())?;
        let pid_holder = if req.shared_pid_namespace {
            let holder_cg = cgroups.child("_pidns")?;
            let fds = engine::ProcessFds {
                stdin: engine::dev_null().map_err(|source| PodError::Io {
                    what: "open /dev/null".into(),
                    source,
                })?,
                stdout: engine::dev_null().map_err(|source| PodError::Io {
                    what: "open /dev/null".into(),
                    source,
                })?,
                stderr: engine::dev_null().map_err(|source| PodError::Io {
                    what: "open /dev/null".into(),
                    source,
                })?,
            };
            let (_, io) = stdio::prepare(&Stdio::new(), false)?;
            let p = Process::new("", fds, io);
            let req = plan::plan_pid_holder(Some(holder_cg.path().to_path_buf()));
            p.spawn(req, &self.reaper, Box::new(|_, _, _| {})).await?;
            Some(p)
        } else {
            None
        };
        inner.cgroups = Some(cgroups);
        inner.sandbox = Some(Sandbox {
            id: req.sandbox_id.clone(),
            hostname: req.hostname.clone(),
            dir,
            pid_holder,
        });
        tracing::info!(sandbox = %req.sandbox_id, "sandbox created");
        Ok(())
    }

    /// Destroys everything: containers, storages, sandbox. Idempotent.
    pub async fn destroy_sandbox(&self) -> Result<(), PodError> {
        let mut inner = self.inner.lock().await;
        let containers: Vec<_> = inner.containers.drain().map(|(_, c)| c).collect();
        for c in containers {
            c.kill_all_and_wait().await;
            self.dispose(&mut inner, &c).await;
        }
        inner.storages.remove_all();
        inner.volumes.remove_all();
        if let Some(sb) = inner.sandbox.take() {
            if let Some(h) = &sb.pid_holder {
                let _ = h.signal(libc::SIGKILL);
                h.wait_exited().await;
            }
            let _ = std::fs::remove_dir_all(&sb.dir);
        }
        if let Some(cg) = inner.cgroups.take() {
            let _ = crate::cgroup::Cgroup::at(cg.path().join("_pidns"))
                .remove()
                .await;
            cg.remove();
        }
        Ok(())
    }

    /// Attaches a storage. Its secrets (scratch key, image policy) are
    /// fetched before the pod is locked.
    pub async fn add_storage(&self, req: &AddStorageRequest) -> Result<PathBuf, PodError> {
        validate::id("storage_id", &req.storage_id)?;
        let layer = crate::disk::prepare(req, self.keys.as_ref())
            .await
            .map_err(StorageError::from)?;
        let mut inner = self.inner.lock().await;
        Ok(inner.storages.add(req, layer).await?)
    }

    /// Detaches a storage.
    pub async fn remove_storage(&self, id: &str) -> Result<(), PodError> {
        Ok(self.inner.lock().await.storages.remove(id)?)
    }

    // ---- file volumes ----

    /// Puts a version of a file volume.
    pub async fn put_volume(&self, req: &PutVolumeRequest) -> Result<(), PodError> {
        Ok(self.inner.lock().await.volumes.put(req)?)
    }

    /// Unmounts and forgets a file volume.
    pub async fn remove_volume(&self, id: &str) -> Result<(), PodError> {
        Ok(self.inner.lock().await.volumes.remove(id)?)
    }

    /// Reads back a file of a file volume.
    pub async fn read_volume_file(
        &self,
        id: &str,
        path: &str,
        max: u32,
    ) -> Result<Vec<u8>, PodError> {
        Ok(self.inner.lock().await.volumes.read_file(id, path, max)?)
    }

    // ---- containers ----

    /// Creates a container; returns its init PID.
    pub async fn create_container(&self, req: &CreateContainerRequest) -> Result<u32, PodError> {
        validate::id("container_id", &req.container_id)?;
        validate::max_len("oci_spec", req.oci_spec.len(), MAX_SPEC)?;
        validate::max_len("resolv_conf", req.resolv_conf.len(), sandbox::MAX_FILE)?;
        let id = req.container_id.clone();
        let mut inner = self.inner.lock().await;
        let Some(sb) = inner.sandbox.as_ref() else {
            return Err(PodError::State(
                "CreateSandbox must come before CreateContainer".into(),
            ));
        };
        if !req.resolv_conf.is_empty() {
            sandbox::rewrite_resolv_conf(&sb.dir, &req.resolv_conf).map_err(|source| {
                PodError::Io {
                    what: "rewriting the pod's resolv.conf".into(),
                    source,
                }
            })?;
        }
        if inner.containers.contains_key(&id) {
            return Err(PodError::Exists {
                what: "container",
                id,
            });
        }
        let spec = plan::parse_spec(&req.oci_spec)?;
        let block = block_volumes(&spec).await?;
        let rootfs_req = req.rootfs.as_ref().cloned().unwrap_or_default();
        let dir = self.cfg.state_dir.join("containers").join(&id);
        let cgroup_path = self.cfg.cgroup_parent.join(&id);
        let spawn_req = plan::plan_init(
            &spec,
            &dir.join("rootfs"),
            Some(cgroup_path),
            &PlanCtx {
                inner: &inner,
                host_mode: self.cfg.host_mode,
                block,
            },
        )?;
        let lower = inner
            .storages
            .acquire(&rootfs_req.storage_id, &rootfs_req.subpath)
            .map_err(|e| match e {
                StorageError::NotFound(s) => PodError::NotFound {
                    what: "rootfs storage",
                    id: s,
                },
                other => other.into(),
            })?;

        tracing::debug!(container = %id, lower = %lower.display(), "rootfs lower layer");
        // From here on, undo what was done if a later step fails.
        let storage_id = rootfs_req.storage_id.clone();
        let upper_id = rootfs_req.upper_storage_id.clone();
        let upper = if upper_id.is_empty() {
            None
        } else {
            match inner.storages.acquire_upper(&upper_id, &id) {
                Ok(dir) => Some((upper_id.clone(), dir)),
                Err(e) => {
                    inner.storages.release_use(&storage_id);
                    return Err(match e {
                        StorageError::NotFound(s) => PodError::NotFound {
                            what: "upper storage",
                            id: s,
                        },
                        other => other.into(),
                    });
                }
            }
        };
        let release_uses = |inner: &mut Inner| {
            inner.storages.release_use(&storage_id);
            if !upper_id.is_empty() {
                inner.storages.release_use(&upper_id);
            }
        };
        let overlay = match OverlayRoot::mount_with_upper(dir, &lower, upper.clone()) {
            Ok(o) => o,
            Err(e) => {
                if let Some((_, u)) = &upper {
                    let _ = std::fs::remove_dir_all(u);
                }
                release_uses(&mut inner);
                return Err(e.into());
            }
        };
        let result = self
            .spawn_init(
                &inner,
                &id,
                spec,
                spawn_req,
                req,
                overlay,
                storage_id.clone(),
            )
            .await;
        match result {
            Ok((container, pid)) => {
                inner.containers.insert(id.clone(), container);
                tracing::info!(container = %id, pid, "container created");
                Ok(pid as u32)
            }
            Err((e, leftovers)) => {
                if let Some((cg, overlay)) = leftovers {
                    let _ = cg.remove().await;
                    overlay.remove();
                }
                release_uses(&mut inner);
                Err(e)
            }
        }
    }

    #[allow(
        clippy::type_complexity,
        clippy::too_many_arguments,
        reason = "the error carries what to undo"
    )]
    async fn spawn_init(
        &self,
        inner: &Inner,
        id: &str,
        spec: oci_spec::runtime::Spec,
        spawn_req: engine::wire::SpawnRequest,
        req: &CreateContainerRequest,
        overlay: OverlayRoot,
        storage_id: String,
    ) -> Result<(Arc<Container>, i32), (PodError, Option<(crate::cgroup::Cgroup, OverlayRoot)>)>
    {
        let parent = match inner.cgroups.as_ref() {
            Some(p) => p,
            None => {
                overlay.remove();
                return Err((PodError::State("sandbox has no cgroup".into()), None));
            }
        };
        let cgroup = match parent.child(id) {
            Ok(c) => c,
            Err(e) => {
                overlay.remove();
                return Err((e.into(), None));
            }
        };
        if let Some(r) = spec.linux().as_ref().and_then(|l| l.resources().as_ref()) {
            if let Err(e) = cgroup.apply(r) {
                return Err((e.into(), Some((cgroup, overlay))));
            }
        }
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        let want = req.stdio.as_ref().cloned().unwrap_or_default();
        let (fds, io) = match stdio::prepare(&want, terminal) {
            Ok(x) => x,
            Err(e) => return Err((e.into(), Some((cgroup, overlay)))),
        };
        let init = Process::new("", fds, io);
        let container = Container::new(
            id.to_string(),
            spec,
            cgroup,
            overlay,
            storage_id,
            Arc::clone(&init),
        );
        let on_exit = container.on_exit("", Arc::clone(&self.events));
        match init.spawn(spawn_req, &self.reaper, on_exit).await {
            Ok(pid) => {
                container.watch_oom(Arc::clone(&self.events));
                Ok((container, pid))
            }
            Err(e) => {
                let e = too_little_memory(&container, e);
                let c = match Arc::try_unwrap(container) {
                    Ok(c) => c,
                    Err(_) => return Err((e, None)),
                };
                Err((e, Some((c.cgroup, c.overlay))))
            }
        }
    }

    async fn container(&self, id: &str) -> Result<Arc<Container>, PodError> {
        validate::id("container_id", id)?;
        self.inner
            .lock()
            .await
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| not_found("container", id))
    }

    async fn process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<(Arc<Container>, Arc<Process>), PodError> {
        validate::exec_id(exec_id)?;
        let c = self.container(container_id).await?;
        let p = c
            .process(exec_id)
            .ok_or_else(|| not_found("exec process", exec_id))?;
        Ok((c, p))
    }

    /// Starts a created container's program.
    pub async fn start_container(&self, id: &str) -> Result<u32, PodError> {
        let c = self.container(id).await?;
        if !matches!(c.init.state(), State::Created { .. }) || c.init.has_exited() {
            return Err(PodError::State(format!(
                "container '{id}' is not in the created state"
            )));
        }
        Ok(c.init.start().await? as u32)
    }

    /// Removes a container that is stopped or was never started.
    pub async fn remove_container(&self, id: &str) -> Result<(), PodError> {
        let c = self.container(id).await?;
        match c.init.state() {
            State::Running { .. } if !c.init.has_exited() => {
                return Err(PodError::State(format!(
                    "container '{id}' is running; kill it first"
                )));
            }
            _ => {}
        }
        c.kill_all_and_wait().await;
        let mut inner = self.inner.lock().await;
        if inner.containers.remove(id).is_some() {
            self.dispose(&mut inner, &c).await;
        }
        tracing::info!(container = %id, "container removed");
        Ok(())
    }

    async fn dispose(&self, inner: &mut Inner, c: &Container) {
        c.abandon_streams();
        if let Err(e) = c.cgroup.remove().await {
            tracing::warn!(container = %c.id, error = %crate::error_chain(&e), "cannot remove cgroup");
        }
        c.overlay.remove();
        inner.storages.release_use(&c.storage_id);
        if let Some(upper) = c.overlay.upper_storage() {
            inner.storages.release_use(upper);
        }
    }

    /// Freezes a running container.
    pub async fn pause(&self, id: &str) -> Result<(), PodError> {
        let c = self.container(id).await?;
        if !c.is_running() {
            return Err(PodError::State(format!("container '{id}' is not running")));
        }
        Ok(c.freeze(true).await?)
    }

    /// Thaws a paused container.
    pub async fn resume(&self, id: &str) -> Result<(), PodError> {
        let c = self.container(id).await?;
        Ok(c.freeze(false).await?)
    }

    /// Applies new cgroup resources (OCI `LinuxResources` JSON).
    pub async fn update(&self, id: &str, resources: &[u8]) -> Result<(), PodError> {
        validate::max_len("resources", resources.len(), MAX_SPEC)?;
        let c = self.container(id).await?;
        let r: LinuxResources = serde_json::from_slice(resources)
            .map_err(|e| PodError::BadRequest(format!("malformed LinuxResources: {e}")))?;
        Ok(c.update(&r)?)
    }

    /// cgroup statistics.
    pub async fn stats(&self, id: &str) -> Result<ContainerStats, PodError> {
        Ok(self.container(id).await?.stats())
    }

    /// PIDs in the container.
    pub async fn pids(&self, id: &str) -> Result<Vec<u32>, PodError> {
        Ok(self.container(id).await?.cgroup.pids())
    }

    // ---- processes ----

    /// Prepares an exec'd process.
    pub async fn exec(&self, req: &ExecProcessRequest) -> Result<(), PodError> {
        validate::id("exec_id", &req.exec_id)?;
        validate::max_len("process", req.process.len(), MAX_SPEC)?;
        let c = self.container(&req.container_id).await?;
        if !c.is_running() {
            return Err(PodError::State(format!(
                "container '{}' is not running",
                req.container_id
            )));
        }
        let spec = plan::parse_process(&req.process)?;
        let terminal = spec.terminal().unwrap_or(false);
        let want = req.stdio.as_ref().cloned().unwrap_or_default();
        // The terminal of an exec'd process is a /dev/pts/N of the
        // container's own devpts, as runc makes it.
        let ptmx = c.init.state().pid().map(engine::pty::container_ptmx);
        let (fds, io) = stdio::prepare_in(&want, terminal, ptmx.as_deref())?;
        let exec = Exec {
            process: Process::new(&req.exec_id, fds, io),
            spec: std::sync::Mutex::new(Some(spec)),
        };
        if !c.add_exec(&req.exec_id, exec) {
            return Err(PodError::Exists {
                what: "exec process",
                id: req.exec_id.clone(),
            });
        }
        Ok(())
    }

    /// Starts a prepared exec'd process.
    pub async fn start_exec(&self, container_id: &str, exec_id: &str) -> Result<u32, PodError> {
        validate::id("exec_id", exec_id)?;
        let c = self.container(container_id).await?;
        let e = c
            .exec(exec_id)
            .ok_or_else(|| not_found("exec process", exec_id))?;
        if !c.is_running() {
            return Err(PodError::State(format!(
                "container '{container_id}' is not running"
            )));
        }
        if c.cgroup.is_frozen() {
            return Err(PodError::State(format!(
                "container '{container_id}' is paused"
            )));
        }
        let init_pid = c
            .init
            .state()
            .pid()
            .ok_or_else(|| PodError::State("container has no init".into()))?;
        let spec = e
            .spec
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| {
                PodError::State(format!("exec process '{exec_id}' was already started"))
            })?;
        let req = plan::plan_exec(&c.spec, init_pid, spec, Some(c.cgroup.path().to_path_buf()));
        let on_exit = c.on_exit(exec_id, Arc::clone(&self.events));
        e.process.spawn(req, &self.reaper, on_exit).await?;
        Ok(e.process.start().await? as u32)
    }

    /// State of a process.
    pub async fn state(&self, container_id: &str, exec_id: &str) -> Result<ProcessState, PodError> {
        let (c, p) = self.process(container_id, exec_id).await?;
        Ok(c.state_of(&p))
    }

    /// Sends a signal to a process or, with `all`, to the whole container.
    pub async fn signal(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), PodError> {
        if !(1..=64).contains(&signal) {
            return Err(PodError::BadRequest(format!(
                "signal {signal} is not in 1..=64"
            )));
        }
        let (c, p) = self.process(container_id, exec_id).await?;
        if all {
            if !exec_id.is_empty() {
                return Err(PodError::BadRequest(
                    "`all` signals the whole container: exec_id must be empty".into(),
                ));
            }
            return Ok(c.cgroup.signal_all(signal as i32)?);
        }
        p.signal(signal as i32).map_err(|e| match e {
            nix::Error::ESRCH => PodError::NotFound {
                what: "running process",
                id: format!("{container_id}/{exec_id}"),
            },
            other => PodError::Io {
                what: "kill".into(),
                source: other.into(),
            },
        })
    }

    /// Waits for a process's complete exit: (status, at_ns, bytes each
    /// output stream carried by then).
    pub async fn wait(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<(i32, i64, crate::stdio::Written), PodError> {
        let (_, p) = self.process(container_id, exec_id).await?;
        if p.state() == State::Prepared {
            return Err(PodError::State("the process was never started".into()));
        }
        let (status, at) = p.wait().await;
        Ok((status, at, p.io.written()))
    }

    /// Resizes a process's terminal.
    pub async fn resize(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), PodError> {
        let (rows, cols) = match (u16::try_from(rows), u16::try_from(cols)) {
            (Ok(r), Ok(c)) => (r, c),
            _ => return Err(PodError::BadRequest("terminal size out of range".into())),
        };
        let (_, p) = self.process(container_id, exec_id).await?;
        Ok(p.io.resize(rows, cols)?)
    }

    /// Closes a process's stdin: at once, or once `after` bytes came
    /// through its stream.
    pub async fn close_stdin(
        &self,
        container_id: &str,
        exec_id: &str,
        after: Option<u64>,
    ) -> Result<(), PodError> {
        let (_, p) = self.process(container_id, exec_id).await?;
        p.io.close_stdin(after);
        Ok(())
    }

    /// Forgets an exited exec'd process.
    pub async fn delete_exec(&self, container_id: &str, exec_id: &str) -> Result<(), PodError> {
        validate::id("exec_id", exec_id)?;
        let (c, p) = self.process(container_id, exec_id).await?;
        if !matches!(p.state(), State::Exited { .. } | State::Prepared) {
            return Err(PodError::State(format!(
                "exec process '{exec_id}' is still running"
            )));
        }
        c.remove_exec(exec_id);
        Ok(())
    }

    /// Reserves a stdio stream of a process for a connection.
    pub async fn take_stream(
        &self,
        container_id: &str,
        exec_id: &str,
        kind: StreamKind,
    ) -> Result<stdio::Attachment, PodError> {
        let (_, p) = self.process(container_id, exec_id).await?;
        Ok(p.io.take(kind)?)
    }

    /// The state directory (for tests and diagnostics).
    pub fn state_dir(&self) -> &Path {
        &self.cfg.state_dir
    }
}
