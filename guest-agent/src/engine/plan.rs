//! From an OCI runtime spec to a [`SpawnRequest`]: everything the container
//! process will do, decided and validated here in the agent so that a bad spec
//! is refused before anything forks.

use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use oci_spec::runtime::{LinuxNamespaceType, Mount, Process, Spec};

use super::wire::{DevicePlan, InitSetup, MountPlan, Namespace, Setup, SpawnRequest};
use crate::status::{Classify, Kind};

/// A spec the engine refuses.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The spec is malformed or asks for something invalid.
    #[error("invalid spec: {0}")]
    Invalid(String),
    /// The spec asks for something the engine does not do.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The spec joins a namespace of the pod sandbox container, which does
    /// not run (yet or any more).
    #[error("cannot join the pod's {0} namespace: the pod sandbox container is not running")]
    NoPodNamespace(&'static str),
    /// A bind mount source that cannot be resolved.
    #[error("bind mount source '{source_name}' for {destination}")]
    BindSource {
        /// The source as written in the spec.
        source_name: String,
        /// Its destination.
        destination: String,
        /// Why.
        #[source]
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Classify for PlanError {
    fn kind(&self) -> Kind {
        match self {
            PlanError::Invalid(_) | PlanError::BindSource { .. } => Kind::InvalidArgument,
            PlanError::Unsupported(_) => Kind::Unimplemented,
            PlanError::NoPodNamespace(_) => Kind::FailedPrecondition,
        }
    }
}

fn invalid(s: impl Into<String>) -> PlanError {
    PlanError::Invalid(s.into())
}

/// What the container manager knows that the spec does not.
pub trait Context {
    /// Turns a bind mount source from the spec into a path in the agent's
    /// mount namespace (`sandbox:NAME`, `storage:ID/SUB`, host paths in host mode).
    fn bind_source(
        &self,
        source: &str,
    ) -> Result<PathBuf, Box<dyn std::error::Error + Send + Sync>>;
    /// Whether namespace paths and other host-side paths are honoured.
    fn host_mode(&self) -> bool;
    /// The pod's hostname, used when the spec sets none.
    fn sandbox_hostname(&self) -> Option<String>;
    /// The pod-wide PID namespace to join instead of creating one.
    fn shared_pid_namespace(&self) -> Option<PathBuf>;
    /// The namespace `kind` of the pod's sandbox container (the CRI pause
    /// container: the container whose id is the sandbox id), while it runs.
    fn pod_namespace(&self, kind: Namespace) -> Option<PathBuf>;
    /// Every device node of the guest, for a container that may use them all.
    fn guest_devices(&self) -> Vec<DevicePlan>;
    /// The guest's numbers (major, minor) of the block volume the spec has
    /// at `path` ([`BLOCK_DEVICES_ANNOTATION`]), once it was found.
    fn block_device(&self, path: &Path) -> Option<(u64, u64)> {
        let _ = path;
        None
    }
    /// Makes a bind source a shared mount, for a bind whose propagation
    /// (`rshared`, `rslave`) needs one.
    fn share_bind_source(
        &self,
        source: &Path,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

/// The namespace path prefix naming the pod sandbox container's namespaces
/// (`sandbox:pid`, `sandbox:ipc`, `sandbox:uts`), as the shim writes a
/// CRI container's joining of the pause container's namespaces.
pub const SANDBOX_NAMESPACE_PREFIX: &str = "sandbox:";

/// The spec annotation asking for every device node of the guest (`all`):
/// how the shim passes on a privileged container's device access.
pub const GUEST_DEVICES_ANNOTATION: &str = "io.veil.guest-devices";
/// Annotation of the guest spec naming the block volumes the shim hot-added:
/// a JSON object, container device path → disk serial. The agent finds each
/// disk by its serial and gives the container's device node the guest's
/// numbers instead of the host's.
pub const BLOCK_DEVICES_ANNOTATION: &str = "io.veil.block-devices";

/// Parses and validates a spec from JSON.
pub fn parse_spec(json: &[u8]) -> Result<Spec, PlanError> {
    let spec: Spec =
        serde_json::from_slice(json).map_err(|e| invalid(format!("malformed OCI spec: {e}")))?;
    let p = spec
        .process()
        .as_ref()
        .ok_or_else(|| invalid("spec has no process"))?;
    check_process(p)?;
    Ok(spec)
}

/// Parses and validates an OCI `Process` (exec) from JSON.
pub fn parse_process(json: &[u8]) -> Result<Process, PlanError> {
    let p: Process =
        serde_json::from_slice(json).map_err(|e| invalid(format!("malformed OCI process: {e}")))?;
    check_process(&p)?;
    Ok(p)
}

fn check_process(p: &Process) -> Result<(), PlanError> {
    let args = p
        .args()
        .as_ref()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| invalid("process.args is empty"))?;
    let strings = args.iter().chain(p.env().iter().flatten());
    if strings.clone().any(|s| s.contains('\0')) {
        return Err(invalid("NUL byte in process args or env"));
    }
    if !p.cwd().is_absolute() {
        return Err(invalid(format!(
            "process.cwd {} is not absolute",
            p.cwd().display()
        )));
    }
    crate::engine::security::to_caps(
        p.capabilities()
            .as_ref()
            .and_then(|c| c.bounding().as_ref()),
    )
    .map_err(invalid)?;
    Ok(())
}

/// Plans a new container's init process.
pub fn plan_init(
    spec: &Spec,
    rootfs: &Path,
    cgroup: Option<PathBuf>,
    ctx: &dyn Context,
) -> Result<SpawnRequest, PlanError> {
    let linux = spec.linux().as_ref();
    if spec.hooks().is_some() {
        tracing::warn!("OCI hooks are not supported and are ignored");
    }
    let mut new_namespaces = Vec::new();
    let mut join_namespaces = Vec::new();
    for ns in linux
        .and_then(|l| l.namespaces().as_ref())
        .into_iter()
        .flatten()
    {
        let kind = match ns.typ() {
            LinuxNamespaceType::Mount => Namespace::Mount,
            LinuxNamespaceType::Pid => Namespace::Pid,
            LinuxNamespaceType::Network => Namespace::Net,
            LinuxNamespaceType::Ipc => Namespace::Ipc,
            LinuxNamespaceType::Uts => Namespace::Uts,
            LinuxNamespaceType::Cgroup => Namespace::Cgroup,
            other => return Err(PlanError::Unsupported(format!("{other} namespace"))),
        };
        let pod_ns = ns
            .path()
            .as_ref()
            .and_then(|p| p.to_str())
            .and_then(|p| p.strip_prefix(SANDBOX_NAMESPACE_PREFIX));
        if let Some(name) = pod_ns {
            if name != kind.proc_name()
                || !matches!(kind, Namespace::Pid | Namespace::Ipc | Namespace::Uts)
            {
                return Err(invalid(format!(
                    "namespace path {SANDBOX_NAMESPACE_PREFIX}{name} for a {} namespace (the pod's pid, ipc and uts namespaces can be joined)",
                    kind.proc_name()
                )));
            }
            let path = ctx
                .pod_namespace(kind)
                .ok_or(PlanError::NoPodNamespace(kind.proc_name()))?;
            join_namespaces.push((kind, path));
            continue;
        }
        match ns.path() {
            Some(path) if ctx.host_mode() => join_namespaces.push((kind, path.clone())),
            // In a VM, the host's namespace paths mean nothing: the pod's
            // network is the VM's, which a container shares by not asking for
            // a new network namespace.
            Some(_) if kind == Namespace::Net => {
                tracing::debug!("network namespace path ignored: sharing the VM's network");
            }
            Some(p) => {
                return Err(invalid(format!(
                    "namespace path {} (only honoured in host mode)",
                    p.display()
                )))
            }
            None if kind == Namespace::Pid => match ctx.shared_pid_namespace() {
                Some(p) => join_namespaces.push((Namespace::Pid, p)),
                None => new_namespaces.push(kind),
            },
            None => new_namespaces.push(kind),
        }
    }
    if !new_namespaces.contains(&Namespace::Mount) {
        return Err(PlanError::Unsupported(
            "a container without its own mount namespace".into(),
        ));
    }
    let hostname = if new_namespaces.contains(&Namespace::Uts) {
        let h = spec
            .hostname()
            .clone()
            .filter(|h| !h.is_empty())
            .or_else(|| ctx.sandbox_hostname());
        if let Some(h) = &h {
            crate::validate::max_len("hostname", h.len(), 64)
                .map_err(|e| invalid(e.to_string()))?;
        }
        h
    } else {
        None
    };

    let mut mounts = Vec::new();
    for m in spec.mounts().iter().flatten() {
        mounts.push(plan_mount(m, ctx)?);
    }
    let paths = |v: Option<&Vec<String>>, what: &str| -> Result<Vec<PathBuf>, PlanError> {
        v.into_iter()
            .flatten()
            .map(|p| {
                crate::validate::absolute_path("path", p)
                    .map_err(|_| invalid(format!("{what} {p}")))
            })
            .collect()
    };
    let masked_paths = paths(linux.and_then(|l| l.masked_paths().as_ref()), "masked path")?;
    let readonly_paths = paths(
        linux.and_then(|l| l.readonly_paths().as_ref()),
        "read-only path",
    )?;
    let mut sysctls = Vec::new();
    for (k, v) in linux
        .and_then(|l| l.sysctl().as_ref())
        .into_iter()
        .flatten()
    {
        let ok = !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            && !k.split('.').any(|c| c.is_empty() || c == "..");
        if !ok || v.contains('\0') {
            return Err(invalid(format!("sysctl {k}")));
        }
        sysctls.push((k.clone(), v.clone()));
    }
    sysctls.sort();
    let all_devices = match spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(GUEST_DEVICES_ANNOTATION))
        .map(String::as_str)
    {
        None => false,
        Some("all") => true,
        Some(other) => {
            return Err(invalid(format!(
                "annotation {GUEST_DEVICES_ANNOTATION}={other} (only 'all')"
            )))
        }
    };
    let mut devices = if all_devices {
        ctx.guest_devices()
    } else {
        Vec::new()
    };
    for d in linux
        .and_then(|l| l.devices().as_ref())
        .into_iter()
        .flatten()
    {
        let kind = match d.typ() {
            oci_spec::runtime::LinuxDeviceType::C | oci_spec::runtime::LinuxDeviceType::U => {
                libc::S_IFCHR
            }
            oci_spec::runtime::LinuxDeviceType::B => libc::S_IFBLK,
            other => return Err(PlanError::Unsupported(format!("device type {other:?}"))),
        };
        let path = crate::validate::absolute_path("device", &d.path().to_string_lossy())
            .map_err(|e| invalid(e.to_string()))?;
        let (major, minor) = match ctx.block_device(&path) {
            Some(numbers) if kind == libc::S_IFBLK => numbers,
            _ => (d.major() as u64, d.minor() as u64),
        };
        devices.push(DevicePlan {
            path,
            mode: kind | (d.file_mode().unwrap_or(0o666) & 0o7777),
            major,
            minor,
            uid: d.uid().unwrap_or(0),
            gid: d.gid().unwrap_or(0),
        });
    }
    let root_propagation = match linux.and_then(|l| l.rootfs_propagation().as_deref()) {
        None | Some("") => MsFlags::MS_SLAVE,
        Some(p) => propagation(p).ok_or_else(|| invalid(format!("rootfsPropagation {p}")))?,
    };
    let seccomp = linux.and_then(|l| l.seccomp().clone());
    if let Some(s) = &seccomp {
        crate::engine::security::build_seccomp(s).map_err(invalid)?;
    }
    Ok(SpawnRequest {
        cgroup,
        join_namespaces,
        new_namespaces,
        setup: Setup::Init(Box::new(InitSetup {
            rootfs: rootfs.to_path_buf(),
            mounts,
            hostname,
            masked_paths,
            readonly_paths,
            readonly_root: spec
                .root()
                .as_ref()
                .and_then(|r| r.readonly())
                .unwrap_or(false),
            sysctls,
            devices,
            root_propagation: root_propagation.bits(),
        })),
        process: spec.process().clone(),
        seccomp,
    })
}

/// Plans an exec'd process: join every namespace of the container's init.
pub fn plan_exec(
    spec: &Spec,
    init_pid: i32,
    process: Process,
    cgroup: Option<PathBuf>,
) -> SpawnRequest {
    let join_namespaces = Namespace::JOIN_ORDER
        .iter()
        .map(|k| (*k, super::ns_path(init_pid, *k)))
        .collect();
    SpawnRequest {
        cgroup,
        join_namespaces,
        new_namespaces: Vec::new(),
        setup: Setup::Exec,
        process: Some(process),
        seccomp: spec.linux().as_ref().and_then(|l| l.seccomp().clone()),
    }
}

/// Plans the holder of a pod-wide PID namespace.
pub fn plan_pid_holder(cgroup: Option<PathBuf>) -> SpawnRequest {
    SpawnRequest {
        cgroup,
        join_namespaces: Vec::new(),
        new_namespaces: vec![Namespace::Pid],
        setup: Setup::PidHolder,
        process: None,
        seccomp: None,
    }
}

fn propagation(s: &str) -> Option<MsFlags> {
    Some(match s {
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
        _ => return None,
    })
}

/// Splits mount options into flags, propagation flags and data.
pub fn parse_options(options: &[String]) -> (MsFlags, MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut prop = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        let (set, clear) = match o.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "mand" | "nomand" | "defaults" => (MsFlags::empty(), MsFlags::empty()),
            other => {
                if let Some(p) = propagation(other) {
                    prop |= p;
                } else {
                    data.push(other.to_string());
                }
                continue;
            }
        };
        flags |= set;
        flags -= clear;
    }
    (flags, prop, data.join(","))
}

fn plan_mount(m: &Mount, ctx: &dyn Context) -> Result<MountPlan, PlanError> {
    let dest = m.destination().to_string_lossy().into_owned();
    let destination = crate::validate::absolute_path("mount destination", &dest)
        .map_err(|e| invalid(e.to_string()))?;
    let (flags, propagation, data) = parse_options(m.options().as_deref().unwrap_or_default());
    let typ = m.typ().clone().unwrap_or_default();
    let is_bind = typ == "bind" || flags.contains(MsFlags::MS_BIND);
    let source_str = m
        .source()
        .as_ref()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if is_bind {
        let source = ctx
            .bind_source(&source_str)
            .map_err(|cause| PlanError::BindSource {
                source_name: source_str.clone(),
                destination: dest.clone(),
                cause,
            })?;
        if propagation.intersects(MsFlags::MS_SHARED | MsFlags::MS_SLAVE) {
            ctx.share_bind_source(&source)
                .map_err(|cause| PlanError::BindSource {
                    source_name: source_str.clone(),
                    destination: dest.clone(),
                    cause,
                })?;
        }
        return Ok(MountPlan {
            destination,
            fstype: "bind".into(),
            source,
            flags: flags.bits(),
            propagation: propagation.bits(),
            data: String::new(),
        });
    }
    let fstype = match typ.as_str() {
        "proc" | "sysfs" | "tmpfs" | "devpts" | "mqueue" | "cgroup2" => typ.clone(),
        "cgroup" => "cgroup2".into(),
        "" => return Err(invalid(format!("mount on {dest} has no type"))),
        other => {
            return Err(PlanError::Unsupported(format!(
                "mount type {other} on {dest}"
            )))
        }
    };
    if data.contains('\0') {
        return Err(invalid(format!("mount options for {dest}")));
    }
    Ok(MountPlan {
        destination,
        source: PathBuf::from(if source_str.is_empty() {
            fstype.clone()
        } else {
            source_str
        }),
        fstype,
        flags: flags.bits(),
        propagation: propagation.bits(),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ctx;
    impl Context for Ctx {
        fn bind_source(
            &self,
            s: &str,
        ) -> Result<PathBuf, Box<dyn std::error::Error + Send + Sync>> {
            match s.strip_prefix("sandbox:") {
                Some(n) => Ok(PathBuf::from("/run/sb").join(n)),
                None => Err("not allowed".into()),
            }
        }
        fn host_mode(&self) -> bool {
            false
        }
        fn sandbox_hostname(&self) -> Option<String> {
            Some("pod".into())
        }
        fn shared_pid_namespace(&self) -> Option<PathBuf> {
            None
        }
        fn pod_namespace(&self, kind: Namespace) -> Option<PathBuf> {
            (kind != Namespace::Uts)
                .then(|| PathBuf::from(format!("/proc/7/ns/{}", kind.proc_name())))
        }
        fn share_bind_source(
            &self,
            _: &Path,
        ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            Ok(())
        }
        fn guest_devices(&self) -> Vec<DevicePlan> {
            vec![DevicePlan {
                path: "/dev/vda".into(),
                mode: libc::S_IFBLK | 0o660,
                major: 254,
                minor: 0,
                uid: 0,
                gid: 6,
            }]
        }
    }

    fn spec(extra: &str) -> Vec<u8> {
        format!(
            r#"{{"ociVersion":"1.0.2","process":{{"user":{{"uid":0,"gid":0}},"args":["sh"],"cwd":"/"}},
            "linux":{{"namespaces":[{{"type":"mount"}},{{"type":"pid"}},{{"type":"uts"}}]}}{extra}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn options_split_into_flags_propagation_and_data() {
        let o: Vec<String> = ["nosuid", "ro", "rprivate", "mode=755", "size=65536k"]
            .map(String::from)
            .into();
        let (f, p, d) = parse_options(&o);
        assert_eq!(f, MsFlags::MS_NOSUID | MsFlags::MS_RDONLY);
        assert_eq!(p, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
        assert_eq!(d, "mode=755,size=65536k");
    }

    #[test]
    fn plans_a_minimal_spec_with_the_sandbox_hostname() {
        let s = parse_spec(&spec(r#","mounts":[{"destination":"/etc/hosts","type":"bind","source":"sandbox:hosts","options":["rbind","ro"]}]"#)).unwrap();
        let r = plan_init(&s, Path::new("/r"), None, &Ctx).unwrap();
        let Setup::Init(init) = r.setup else {
            panic!("not init")
        };
        assert_eq!(init.hostname.as_deref(), Some("pod"));
        assert_eq!(init.mounts[0].source, PathBuf::from("/run/sb/hosts"));
        assert_eq!(
            r.new_namespaces,
            vec![Namespace::Mount, Namespace::Pid, Namespace::Uts]
        );
    }

    #[test]
    fn pod_namespaces_are_the_sandbox_containers() {
        let s = parse_spec(
            br#"{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"},
            "linux":{"namespaces":[{"type":"mount"},{"type":"pid","path":"sandbox:pid"},{"type":"ipc","path":"sandbox:ipc"}]}}"#,
        )
        .unwrap();
        let r = plan_init(&s, Path::new("/r"), None, &Ctx).unwrap();
        assert_eq!(r.new_namespaces, vec![Namespace::Mount]);
        assert_eq!(
            r.join_namespaces,
            vec![
                (Namespace::Pid, PathBuf::from("/proc/7/ns/pid")),
                (Namespace::Ipc, PathBuf::from("/proc/7/ns/ipc"))
            ]
        );
        // No running sandbox container to join: a precondition, named.
        let swap = |from: &str, to: &str| {
            let text = String::from_utf8(spec("")).unwrap().replace(from, to);
            parse_spec(text.as_bytes()).unwrap()
        };
        let s = swap(
            r#"{"type":"uts"}"#,
            r#"{"type":"uts","path":"sandbox:uts"}"#,
        );
        let e = plan_init(&s, Path::new("/r"), None, &Ctx).unwrap_err();
        assert_eq!(e.kind(), Kind::FailedPrecondition);
        assert!(e.to_string().contains("uts"), "{e}");
        // The prefix names the kind it is used for.
        let s = swap(
            r#"{"type":"pid"}"#,
            r#"{"type":"pid","path":"sandbox:ipc"}"#,
        );
        assert_eq!(
            plan_init(&s, Path::new("/r"), None, &Ctx)
                .unwrap_err()
                .kind(),
            Kind::InvalidArgument
        );
    }

    #[test]
    fn all_guest_devices_on_request() {
        let s = parse_spec(&spec(r#","annotations":{"io.veil.guest-devices":"all"}"#)).unwrap();
        let r = plan_init(&s, Path::new("/r"), None, &Ctx).unwrap();
        let Setup::Init(init) = r.setup else {
            panic!("not init")
        };
        assert_eq!(init.devices[0].path, PathBuf::from("/dev/vda"));
        let s = parse_spec(&spec(r#","annotations":{"io.veil.guest-devices":"some"}"#)).unwrap();
        assert_eq!(
            plan_init(&s, Path::new("/r"), None, &Ctx)
                .unwrap_err()
                .kind(),
            Kind::InvalidArgument
        );
    }

    #[test]
    fn refuses_bad_specs_with_the_right_kind() {
        assert_eq!(
            parse_spec(b"{not json").unwrap_err().kind(),
            Kind::InvalidArgument
        );
        let no_args =
            br#"{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":0},"args":[],"cwd":"/"}}"#;
        assert_eq!(
            parse_spec(no_args).unwrap_err().kind(),
            Kind::InvalidArgument
        );
        let s = parse_spec(&spec(
            r#","mounts":[{"destination":"/x","type":"bind","source":"/etc"}]"#,
        ))
        .unwrap();
        assert_eq!(
            plan_init(&s, Path::new("/r"), None, &Ctx)
                .unwrap_err()
                .kind(),
            Kind::InvalidArgument
        );
        let s = parse_spec(&spec(
            r#","mounts":[{"destination":"/x","type":"nfs","source":"h:/"}]"#,
        ))
        .unwrap();
        assert_eq!(
            plan_init(&s, Path::new("/r"), None, &Ctx)
                .unwrap_err()
                .kind(),
            Kind::Unimplemented
        );
        let s = parse_spec(&spec(
            r#","mounts":[{"destination":"/../x","type":"tmpfs"}]"#,
        ))
        .unwrap();
        assert_eq!(
            plan_init(&s, Path::new("/r"), None, &Ctx)
                .unwrap_err()
                .kind(),
            Kind::InvalidArgument
        );
    }
}
