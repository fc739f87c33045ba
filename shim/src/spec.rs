//! The container's OCI runtime spec, from the host's bundle to what the agent
//! runs in the guest.
//!
//! containerd writes a spec for a host runtime: namespace paths of the pause
//! process, bind mounts of host files, a host cgroup path. Inside the pod VM
//! those mean nothing, so this module rewrites them — once, here:
//! - namespace paths: the pod's containers share the VM's network namespace
//!   (the VM *is* the pod's network), so joining it is dropped; a joined PID,
//!   IPC or UTS namespace (the pause container's, as CRI's `NamespaceOption`
//!   POD asks) becomes `sandbox:pid|ipc|uts`, which the agent resolves to the
//!   namespace of the pod's sandbox container in the guest, as runc joins the
//!   pause process's;
//! - the node's namespaces (hostNetwork, hostPID, hostIPC: CRI leaves the
//!   namespace out of the spec) cannot reach into a VM: [`HostSpec::check_namespaces`]
//!   refuses them before anything is started;
//! - device nodes: a container allowed every device (privileged: the device
//!   cgroup rule `a *:* rwm`) gets the guest's devices, not the host's list
//!   (whose numbers mean nothing in the guest): its `linux.devices` is
//!   replaced by the annotation [`GUEST_DEVICES_ANNOTATION`]` = all`;
//! - bind mounts of the pod's `hosts`, `resolv.conf` and `hostname` become
//!   `sandbox:` sources the agent provides; a bind of the pod's `/dev/shm`
//!   becomes a tmpfs; an emptyDir (a bind of kubelet's
//!   `…/volumes/kubernetes.io~empty-dir/NAME`) becomes the directory
//!   `volumes/NAME` on the pod's encrypted scratch disk
//!   (`storage:scratch/volumes/NAME`, made by the agent on first use);
//!   a file volume (configMap, secret, projected, downwardAPI), a subPath of
//!   one and the termination message file become `volume:` sources, copies
//!   the shim puts in the guest ([`crate::volumes`], listed in
//!   [`GuestSpec::volumes`]); every other host bind — and an emptyDir in a
//!   pod without a scratch disk — is refused ([`SpecError::Mount`], naming
//!   the destination and why): nothing is dropped;
//! - host block devices in `linux.devices` (block volumes: their numbers
//!   mean nothing in the guest) are listed in [`GuestSpec::blocks`] for the
//!   shim to hot-add, and named by serial in the annotation
//!   `io.veil.block-devices` for the agent;
//! - the root path and hooks are left for the agent to ignore.
//!
//! It also reads the annotations the shim needs (the pod grouping, the
//! image name).

use std::path::Path;

use serde_json::{json, Value};
use veil_common::{Classify, Kind};

use crate::volumes::{
    block::{BlockUse, BLOCK_DEVICES_ANNOTATION},
    kubelet::{self, Source},
    UseKind, VolumeUse,
};

/// The pod's request policy (docs/policy.md): a TOML document the shim
/// delivers to the agent as init-data, its digest bound at launch into the
/// TEE's host data. Read from the sandbox container's spec.
pub const POLICY_ANNOTATION: &str = "io.veil.policy";
/// containerd's CRI annotation naming a container's pod.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// containerd's CRI annotation saying `sandbox` or `container`.
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
/// containerd's CRI annotation naming a container's image (as the pod spec
/// names it).
pub const CRI_IMAGE_NAME_ANNOTATION: &str = "io.kubernetes.cri.image-name";
/// containerd's CRI annotation (1.7 and later) naming the pause image of a
/// pod's sandbox container.
pub const CRI_SANDBOX_IMAGE_NAME_ANNOTATION: &str = "io.kubernetes.cri.podsandbox.image-name";
/// The image name of a CRI sandbox (pause) container whose spec names no
/// image (containerd 1.6 sets no annotation for it): the key under which an
/// image policy lists the pause image's root hash.
pub const POD_SANDBOX_IMAGE: &str = "pod-sandbox";
/// veil's own image-name annotation, for clients without CRI
/// (`ctr run --annotation io.veil.image-name=NAME`).
pub const VEIL_IMAGE_NAME_ANNOTATION: &str = "io.veil.image-name";
/// Annotation of the guest spec asking the agent for every device node of
/// the guest (`all`): how a privileged container's device list reaches the
/// guest.
pub const GUEST_DEVICES_ANNOTATION: &str = "io.veil.guest-devices";
/// The namespace path prefix the agent resolves to the pod sandbox
/// container's namespace (`sandbox:pid`, `sandbox:ipc`, `sandbox:uts`).
pub const SANDBOX_NAMESPACE_PREFIX: &str = "sandbox:";
/// Why a mount of the spec cannot be served in the pod VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountRefusal {
    /// An emptyDir in a pod without its scratch disk.
    #[error("an emptyDir lives on the pod's encrypted scratch disk, and this handler gives the pod none (scratch_disk_mib = 0)")]
    EmptyDirWithoutScratch,
    /// A subPath of an emptyDir.
    #[error("a subPath of an emptyDir is not supported by veil yet; mount the whole emptyDir")]
    EmptyDirSubPath,
    /// A host directory or file, and the handler shares none.
    #[error("volume {volume} is a host directory or file (hostPath, a PersistentVolumeClaim, an image volume, or a volume kubelet does not write with its atomic writer), which the host can read and change once shared, so handler {handler} does not share it; set shared_dirs = true in [handlers.{handler}] of the veil config to allow host-shared directories")]
    NotShared {
        /// The handler.
        handler: String,
        /// The volume's name (or host path).
        volume: String,
    },
    /// A bind without a source.
    #[error("the bind mount has no source")]
    NoSource,
}

impl Classify for MountRefusal {
    fn kind(&self) -> Kind {
        match self {
            MountRefusal::NoSource => Kind::InvalidArgument,
            MountRefusal::EmptyDirWithoutScratch
            | MountRefusal::EmptyDirSubPath
            | MountRefusal::NotShared { .. } => Kind::FailedPrecondition,
        }
    }
}

/// Errors reading a spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The bundle's `config.json` could not be read.
    #[error("cannot read the bundle spec {path}")]
    Read {
        /// Path.
        path: std::path::PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// It is not a JSON object.
    #[error("the bundle spec is not valid JSON")]
    Json(#[from] serde_json::Error),
    /// It is JSON but not a spec.
    #[error("the bundle spec is not an object")]
    NotObject,
    /// The spec shares a namespace of the node, which cannot reach into the
    /// pod VM.
    #[error(
        "{option} is not supported by veil: the pod runs in its own VM, which cannot share the node's {namespace} namespace (the spec has no '{namespace}' namespace entry); run this pod with a runc runtime class or without {option}"
    )]
    HostNamespace {
        /// The Kubernetes pod option (hostNetwork, hostPID, hostIPC).
        option: &'static str,
        /// The OCI namespace type.
        namespace: &'static str,
    },
    /// A mount the pod VM cannot serve.
    #[error(
        "the mount at {destination} (from {source_path}) cannot be served in the pod VM: {reason}"
    )]
    Mount {
        /// The mount's destination in the container.
        destination: String,
        /// Its host source.
        source_path: String,
        /// Why.
        reason: MountRefusal,
    },
    /// The pod's resolv.conf the spec binds cannot be sent to the guest.
    #[error("the pod's resolv.conf {path} (bound at /etc/resolv.conf): {reason}")]
    ResolvConf {
        /// Its host path.
        path: String,
        /// Why.
        reason: String,
    },
    /// A block device entry without a path or numbers.
    #[error(
        "the block device entry {path:?} of linux.devices has no path or no major/minor numbers"
    )]
    Device {
        /// The device's path in the container, as given.
        path: String,
    },
}

impl Classify for SpecError {
    fn kind(&self) -> Kind {
        match self {
            SpecError::Read { .. } => Kind::NotFound,
            SpecError::Json(_) | SpecError::NotObject | SpecError::HostNamespace { .. } => {
                Kind::InvalidArgument
            }
            SpecError::Mount { reason, .. } => reason.kind(),
            SpecError::Device { .. } => Kind::InvalidArgument,
            SpecError::ResolvConf { .. } => Kind::FailedPrecondition,
        }
    }
}

/// Largest resolv.conf sent to the guest (the agent's limit).
pub const MAX_RESOLV_CONF: usize = 64 * 1024;

/// A container's spec as the host gave it.
#[derive(Debug, Clone)]
pub struct HostSpec(Value);

/// What the guest-side spec translation decided.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuestSpec {
    /// The spec to send to the agent (JSON).
    pub json: Vec<u8>,
    /// Whether the process wants a terminal.
    pub terminal: bool,
    /// The file volumes the spec's `volume:` sources name, for the shim to
    /// put in the guest before the container is created.
    pub volumes: Vec<VolumeUse>,
    /// The block volumes (host block devices) to hot-add before the
    /// container is created.
    pub blocks: Vec<BlockUse>,
}

/// What the pod offers the container's mounts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MountContext {
    /// The pod has its encrypted scratch disk (emptyDir volumes go there).
    pub scratch: bool,
    /// The pod shares host directories through virtio-fs (its handler's
    /// `shared_dirs`).
    pub shared_dirs: bool,
    /// The pod's handler (named in refusals).
    pub handler: String,
}

impl HostSpec {
    /// Parses `config.json` text.
    pub fn parse(bytes: &[u8]) -> Result<Self, SpecError> {
        let v: Value = serde_json::from_slice(bytes)?;
        if !v.is_object() {
            return Err(SpecError::NotObject);
        }
        Ok(HostSpec(v))
    }

    /// Reads `<bundle>/config.json`.
    pub fn read(bundle: &std::path::Path) -> Result<Self, SpecError> {
        let path = bundle.join("config.json");
        let bytes = std::fs::read(&path).map_err(|source| SpecError::Read { path, source })?;
        Self::parse(&bytes)
    }

    /// An annotation's value.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.0.get("annotations")?.get(key)?.as_str()
    }

    /// The pod this container belongs to: the CRI sandbox id, or `own_id`
    /// (a container run without CRI is its own pod).
    pub fn sandbox_id<'a>(&'a self, own_id: &'a str) -> &'a str {
        self.annotation(SANDBOX_ID_ANNOTATION)
            .filter(|s| !s.is_empty())
            .unwrap_or(own_id)
    }

    /// The container's image name, the key into a confidential pod's image
    /// policy: the CRI annotations (container image, pod sandbox image), else
    /// veil's own; a CRI sandbox container without any is
    /// [`POD_SANDBOX_IMAGE`]; "" otherwise.
    pub fn image_name(&self) -> &str {
        let named = [
            CRI_IMAGE_NAME_ANNOTATION,
            CRI_SANDBOX_IMAGE_NAME_ANNOTATION,
            VEIL_IMAGE_NAME_ANNOTATION,
        ]
        .iter()
        .find_map(|k| self.annotation(k).filter(|s| !s.is_empty()));
        match named {
            Some(n) => n,
            None if self.annotation(CONTAINER_TYPE_ANNOTATION) == Some("sandbox") => {
                POD_SANDBOX_IMAGE
            }
            None => "",
        }
    }

    /// Whether the process asks for a terminal.
    pub fn terminal(&self) -> bool {
        self.0
            .pointer("/process/terminal")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// The hostname the spec asks for.
    pub fn hostname(&self) -> Option<&str> {
        self.0.get("hostname")?.as_str().filter(|h| !h.is_empty())
    }

    /// The content of the host file the spec binds at `/etc/resolv.conf`
    /// (the one containerd's CRI plugin wrote from the pod's DNS config),
    /// at most [`MAX_RESOLV_CONF`] bytes; empty when the spec binds none.
    pub fn resolv_conf(&self) -> Result<Vec<u8>, SpecError> {
        let Some(mounts) = self.0.get("mounts").and_then(Value::as_array) else {
            return Ok(Vec::new());
        };
        let source = mounts.iter().find_map(|m| {
            (m.get("destination").and_then(Value::as_str) == Some("/etc/resolv.conf"))
                .then(|| m.get("source").and_then(Value::as_str))
                .flatten()
        });
        let Some(path) = source.filter(|s| s.starts_with('/')) else {
            return Ok(Vec::new());
        };
        let fail = |reason: String| SpecError::ResolvConf {
            path: path.to_string(),
            reason,
        };
        let f = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
        let mut buf = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(f, MAX_RESOLV_CONF as u64 + 1),
            &mut buf,
        )
        .map_err(|e| fail(e.to_string()))?;
        if buf.len() > MAX_RESOLV_CONF {
            return Err(fail(format!("larger than {MAX_RESOLV_CONF} bytes")));
        }
        Ok(buf)
    }

    /// The pod's network namespace: the path of the `network` namespace the
    /// spec joins (the CRI plugin's, which CNI filled). `None` when the spec
    /// makes a new one (`ctr run` without a namespace: loopback only).
    pub fn network_namespace(&self) -> Option<std::path::PathBuf> {
        self.0
            .pointer("/linux/namespaces")?
            .as_array()?
            .iter()
            .find(|n| n.get("type").and_then(Value::as_str) == Some("network"))?
            .get("path")?
            .as_str()
            .filter(|p| !p.is_empty())
            .map(std::path::PathBuf::from)
    }

    /// Refuses a spec that shares the node's network, PID or IPC namespace
    /// (CRI's hostNetwork, hostPID, hostIPC: the namespace is left out of
    /// `linux.namespaces`). A spec without a namespace list (not written by
    /// containerd) is not judged.
    pub fn check_namespaces(&self) -> Result<(), SpecError> {
        let Some(nss) = self
            .0
            .pointer("/linux/namespaces")
            .and_then(Value::as_array)
        else {
            return Ok(());
        };
        let has = |t: &str| {
            nss.iter()
                .any(|n| n.get("type").and_then(Value::as_str) == Some(t))
        };
        for (namespace, option) in [
            ("network", "hostNetwork"),
            ("pid", "hostPID"),
            ("ipc", "hostIPC"),
        ] {
            if !has(namespace) {
                return Err(SpecError::HostNamespace { option, namespace });
            }
        }
        Ok(())
    }

    /// Whether the spec allows every device (privileged containers: a device
    /// cgroup rule allowing all types, majors and minors).
    pub fn all_devices_allowed(&self) -> bool {
        self.0
            .pointer("/linux/resources/devices")
            .and_then(Value::as_array)
            .is_some_and(|rules| {
                rules.iter().any(|r| {
                    let field = |k: &str| r.get(k).filter(|v| !v.is_null());
                    r.get("allow").and_then(Value::as_bool) == Some(true)
                        && field("type").is_none_or(|t| t.as_str() == Some("a"))
                        && field("major").is_none_or(|m| m.as_i64() == Some(-1))
                        && field("minor").is_none_or(|m| m.as_i64() == Some(-1))
                        && field("access")
                            .and_then(Value::as_str)
                            .is_some_and(|a| ["r", "w", "m"].iter().all(|c| a.contains(c)))
                })
            })
    }

    /// The spec as the guest should see it, or the first mount or device
    /// the pod VM cannot serve.
    pub fn for_guest(&self, ctx: &MountContext) -> Result<GuestSpec, SpecError> {
        let mut v = self.0.clone();
        let terminal = self.terminal();
        let mut volumes = Vec::new();
        if let Some(mounts) = v.get_mut("mounts").and_then(Value::as_array_mut) {
            for m in mounts.iter_mut() {
                if let Some(u) = guest_mount(m, ctx)? {
                    if !volumes.iter().any(|v: &VolumeUse| v.id == u.id) {
                        volumes.push(u);
                    }
                }
            }
        }
        if let Some(nss) = v
            .pointer_mut("/linux/namespaces")
            .and_then(Value::as_array_mut)
        {
            nss.retain_mut(|ns| {
                let joined = ns
                    .get("path")
                    .is_some_and(|p| p.as_str().is_some_and(|s| !s.is_empty()));
                if !joined {
                    return true;
                }
                match ns.get("type").and_then(Value::as_str) {
                    // The pause container's namespaces: the pod sandbox
                    // container's in the guest.
                    Some(t @ ("pid" | "ipc" | "uts")) => {
                        ns["path"] = json!(format!("{SANDBOX_NAMESPACE_PREFIX}{t}"));
                        true
                    }
                    // The pod's network namespace: the VM's own.
                    Some("network") => false,
                    // Anything else joined: the agent refuses a host path.
                    _ => true,
                }
            });
        }
        let all_devices = self.all_devices_allowed();
        let blocks = if all_devices {
            Vec::new()
        } else {
            block_devices(&v)?
        };
        if let Some(o) = v.get_mut("linux").and_then(Value::as_object_mut) {
            o.remove("cgroupsPath");
            if all_devices {
                // The host's device list means nothing in the guest.
                o.remove("devices");
            }
        }
        if (all_devices || !blocks.is_empty())
            && !v.get("annotations").is_some_and(Value::is_object)
        {
            v["annotations"] = json!({});
        }
        if all_devices {
            v["annotations"][GUEST_DEVICES_ANNOTATION] = json!("all");
        }
        if !blocks.is_empty() {
            let serials: serde_json::Map<String, Value> = blocks
                .iter()
                .map(|b| (b.path.clone(), json!(b.serial())))
                .collect();
            v["annotations"][BLOCK_DEVICES_ANNOTATION] = json!(serde_json::to_string(&serials)?);
        }
        Ok(GuestSpec {
            json: serde_json::to_vec(&v)?,
            terminal,
            volumes,
            blocks,
        })
    }
}

/// The host block devices of `linux.devices` (block volumes); character
/// devices keep their numbers (/dev/fuse, /dev/net/tun are the same in the
/// guest).
fn block_devices(v: &Value) -> Result<Vec<BlockUse>, SpecError> {
    let Some(devs) = v.pointer("/linux/devices").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for d in devs {
        if d.get("type").and_then(Value::as_str) != Some("b") {
            continue;
        }
        let path = d.get("path").and_then(Value::as_str).unwrap_or("");
        let number = |k: &str| d.get(k).and_then(Value::as_i64).filter(|n| *n >= 0);
        match (path, number("major"), number("minor")) {
            (p, Some(major), Some(minor)) if p.starts_with('/') => out.push(BlockUse {
                path: p.to_string(),
                major,
                minor,
            }),
            _ => {
                return Err(SpecError::Device {
                    path: path.to_string(),
                })
            }
        }
    }
    Ok(out)
}

/// Rewrites one mount for the guest (in place); the file volume it uses, if
/// any; or why the pod VM cannot serve it.
fn guest_mount(m: &mut Value, ctx: &MountContext) -> Result<Option<VolumeUse>, SpecError> {
    let typ = m.get("type").and_then(Value::as_str).unwrap_or("");
    let opts: Vec<&str> = m
        .get("options")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let is_bind = typ == "bind" || opts.iter().any(|o| *o == "bind" || *o == "rbind");
    if !is_bind {
        // proc, tmpfs, sysfs, ...: the agent mounts its own (and refuses a
        // type it does not know).
        return Ok(None);
    }
    let dest = m
        .get("destination")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let source = m
        .get("source")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if ["sandbox:", "storage:", "volume:"]
        .iter()
        .any(|p| source.starts_with(p))
    {
        return Ok(None);
    }
    let refuse = |reason| {
        Err(SpecError::Mount {
            destination: dest.clone(),
            source_path: source.clone(),
            reason,
        })
    };
    let named = match dest.as_str() {
        "/etc/hosts" => Some("sandbox:hosts"),
        "/etc/resolv.conf" => Some("sandbox:resolv.conf"),
        "/etc/hostname" => Some("sandbox:hostname"),
        _ => None,
    };
    if let Some(src) = named {
        m["source"] = json!(src);
        return Ok(None);
    }
    if dest == "/dev/shm" {
        *m = json!({
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        });
        return Ok(None);
    }
    if source.is_empty() {
        return refuse(MountRefusal::NoSource);
    }
    let host = Path::new(&source);
    let kind = match kubelet::classify(host) {
        // Without a scratch disk a plain pod's emptyDir is the host's, as
        // with runc.
        Source::EmptyDir { .. } | Source::EmptyDirSubPath { .. }
            if !ctx.scratch && ctx.shared_dirs =>
        {
            UseKind::Shared
        }
        Source::EmptyDir { .. } if !ctx.scratch => {
            return refuse(MountRefusal::EmptyDirWithoutScratch)
        }
        Source::EmptyDir { name } => {
            m["source"] = json!(crate::storage::scratch::volume_source(&name));
            return Ok(None);
        }
        Source::EmptyDirSubPath { .. } => return refuse(MountRefusal::EmptyDirSubPath),
        Source::Host if ctx.shared_dirs => UseKind::Shared,
        Source::Host => {
            return refuse(MountRefusal::NotShared {
                handler: ctx.handler.clone(),
                volume: kubelet::volume_name(host),
            })
        }
        Source::FileVolume { .. } => UseKind::Live,
        Source::FileSubPath { .. } => UseKind::Snapshot,
        Source::TerminationLog => UseKind::TerminationLog,
    };
    let u = VolumeUse::new(host, kind, &dest);
    m["source"] = json!(u.bind_source());
    Ok(Some(u))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cri_container() -> HostSpec {
        HostSpec::parse(
            br#"{
            "ociVersion": "1.0.2",
            "process": {"terminal": true, "args": ["sh"], "cwd": "/"},
            "annotations": {
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.sandbox-id": "pod1"
            },
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/pod1/hosts", "options": ["rbind", "rw"]},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/x/pod1/shm", "options": ["rbind", "ro"]},
                {"destination": "/dev/termination-log", "type": "bind", "source": "/var/lib/kubelet/pods/u1/containers/app/0a1b2c3d", "options": ["rbind"]}
            ],
            "linux": {
                "cgroupsPath": "/k8s.io/c1",
                "namespaces": [
                    {"type": "pid"},
                    {"type": "ipc", "path": "/proc/42/ns/ipc"},
                    {"type": "uts", "path": "/proc/42/ns/uts"},
                    {"type": "mount"},
                    {"type": "network", "path": "/proc/42/ns/net"}
                ]
            }
        }"#,
        )
        .unwrap()
    }

    #[test]
    fn pod_grouping_from_cri_annotations() {
        assert_eq!(cri_container().sandbox_id("c1"), "pod1");
        let pause = HostSpec::parse(
            br#"{"annotations": {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "pod1"}}"#,
        )
        .unwrap();
        assert_eq!(pause.sandbox_id("pod1"), "pod1");
        let plain = HostSpec::parse(br#"{"annotations": {}}"#).unwrap();
        assert_eq!(plain.sandbox_id("ctr-1"), "ctr-1");
    }

    #[test]
    fn host_paths_are_rewritten_for_the_guest() {
        let g = cri_container().for_guest(&MountContext::default()).unwrap();
        assert!(g.terminal);
        let v: Value = serde_json::from_slice(&g.json).unwrap();
        let mounts = v["mounts"].as_array().unwrap();
        assert_eq!(mounts.len(), 4);
        assert_eq!(mounts[1]["source"], "sandbox:hosts");
        assert_eq!(mounts[2]["type"], "tmpfs");
        // The termination message file: a copy in the guest, read back at exit.
        assert_eq!(g.volumes.len(), 1);
        assert_eq!(g.volumes[0].kind, UseKind::TerminationLog);
        assert_eq!(g.volumes[0].destination, "/dev/termination-log");
        assert_eq!(mounts[3]["source"], g.volumes[0].bind_source());
        let types: Vec<&str> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["pid", "ipc", "uts", "mount"]);
        let paths: Vec<Option<&str>> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.get("path").and_then(Value::as_str))
            .collect();
        // The pause container's IPC and UTS namespaces become the pod
        // sandbox container's in the guest; the PID namespace is the
        // container's own (no path).
        assert_eq!(
            paths,
            [None, Some("sandbox:ipc"), Some("sandbox:uts"), None]
        );
        assert!(v["linux"].get("cgroupsPath").is_none());
        assert!(v["annotations"].get(GUEST_DEVICES_ANNOTATION).is_none());
    }

    #[test]
    fn resolv_conf_is_the_bound_file_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("resolv.conf");
        std::fs::write(&f, "nameserver 10.96.0.10\nsearch ns.svc.cluster.local\n").unwrap();
        let spec = |src: &std::path::Path| {
            HostSpec(json!({"mounts": [
                {"destination": "/etc/hosts", "type": "bind", "source": "/nonexistent"},
                {"destination": "/etc/resolv.conf", "type": "bind", "source": src},
            ]}))
        };
        assert_eq!(
            spec(&f).resolv_conf().unwrap(),
            b"nameserver 10.96.0.10\nsearch ns.svc.cluster.local\n"
        );
        assert!(HostSpec(json!({})).resolv_conf().unwrap().is_empty());
        assert!(spec(&dir.path().join("missing")).resolv_conf().is_err());
        std::fs::write(&f, vec![b'#'; MAX_RESOLV_CONF + 1]).unwrap();
        assert!(spec(&f).resolv_conf().is_err());
    }

    fn with_namespaces(types: &[&str]) -> HostSpec {
        let nss: Vec<Value> = types.iter().map(|t| json!({"type": t})).collect();
        HostSpec(json!({"linux": {"namespaces": nss}}))
    }

    #[test]
    fn network_namespace_is_the_joined_path() {
        let spec = HostSpec(json!({"linux": {"namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1234"},
        ]}}));
        assert_eq!(
            spec.network_namespace(),
            Some("/var/run/netns/cni-1234".into())
        );
        assert_eq!(with_namespaces(&["network"]).network_namespace(), None);
        assert_eq!(HostSpec(json!({})).network_namespace(), None);
    }

    #[test]
    fn node_namespaces_are_refused_naming_the_pod_option() {
        with_namespaces(&["pid", "ipc", "uts", "mount", "network"])
            .check_namespaces()
            .unwrap();
        for (types, option) in [
            (&["pid", "ipc", "uts", "mount"][..], "hostNetwork"),
            (&["ipc", "uts", "mount", "network"][..], "hostPID"),
            (&["pid", "uts", "mount", "network"][..], "hostIPC"),
        ] {
            let e = with_namespaces(types).check_namespaces().unwrap_err();
            assert_eq!(e.kind(), Kind::InvalidArgument);
            assert!(e.to_string().starts_with(option), "{e}");
        }
        // Not a containerd spec: nothing to judge.
        HostSpec::parse(b"{}").unwrap().check_namespaces().unwrap();
    }

    #[test]
    fn a_pod_shared_pid_namespace_is_the_sandbox_containers() {
        let spec = HostSpec(json!({"linux": {"namespaces": [
            {"type": "pid", "path": "/proc/42/ns/pid"},
            {"type": "mount"},
            {"type": "cgroup", "path": "/proc/42/ns/cgroup"},
        ]}}));
        let v: Value =
            serde_json::from_slice(&spec.for_guest(&MountContext::default()).unwrap().json)
                .unwrap();
        assert_eq!(v["linux"]["namespaces"][0]["path"], "sandbox:pid");
        // Other joined namespaces go to the agent as they are (and it
        // refuses a host path).
        assert_eq!(v["linux"]["namespaces"][2]["path"], "/proc/42/ns/cgroup");
    }

    #[test]
    fn a_privileged_container_gets_the_guests_devices_not_the_hosts() {
        let privileged = HostSpec(json!({"linux": {
            "devices": [{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}],
            "resources": {"devices": [{"allow": true, "access": "rwm"}]},
        }}));
        assert!(privileged.all_devices_allowed());
        let v: Value =
            serde_json::from_slice(&privileged.for_guest(&MountContext::default()).unwrap().json)
                .unwrap();
        assert!(v["linux"].get("devices").is_none(), "{v}");
        assert_eq!(v["annotations"][GUEST_DEVICES_ANNOTATION], "all");

        let plain = HostSpec(json!({"linux": {
            "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}],
            "resources": {"devices": [
                {"allow": false, "access": "rwm"},
                {"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rwm"},
            ]},
        }}));
        assert!(!plain.all_devices_allowed());
        let v: Value =
            serde_json::from_slice(&plain.for_guest(&MountContext::default()).unwrap().json)
                .unwrap();
        assert_eq!(v["linux"]["devices"][0]["path"], "/dev/fuse");
        assert!(v.get("annotations").is_none());
    }

    fn with_mount(source: &str, dest: &str) -> HostSpec {
        HostSpec(json!({
            "annotations": {"io.kubernetes.cri.image-name": "docker.io/library/busybox:1.36"},
            "mounts": [{"destination": dest, "type": "bind", "options": ["rbind", "ro"], "source": source}],
        }))
    }

    fn scratch() -> MountContext {
        MountContext {
            scratch: true,
            shared_dirs: false,
            handler: "veil-sim".into(),
        }
    }

    #[test]
    fn empty_dirs_go_to_the_scratch_disk_when_the_pod_has_one() {
        let spec = with_mount(
            "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/cache",
            "/cache",
        );
        assert_eq!(spec.image_name(), "docker.io/library/busybox:1.36");
        let g = spec.for_guest(&scratch()).unwrap();
        let v: Value = serde_json::from_slice(&g.json).unwrap();
        assert_eq!(v["mounts"][0]["source"], "storage:scratch/volumes/cache");
        assert_eq!(v["mounts"][0]["destination"], "/cache");
        assert!(g.volumes.is_empty());
        // Without a scratch disk the emptyDir is refused, naming it.
        let e = spec.for_guest(&MountContext::default()).unwrap_err();
        assert_eq!(e.kind(), Kind::FailedPrecondition);
        assert!(e.to_string().starts_with("the mount at /cache (from /var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/cache) cannot be served"), "{e}");
        assert!(e.to_string().contains("scratch_disk_mib = 0"), "{e}");
    }

    #[test]
    fn file_volumes_become_guest_copies() {
        let cfg = "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~configmap/cfg";
        let g = with_mount(cfg, "/etc/config")
            .for_guest(&scratch())
            .unwrap();
        let v: Value = serde_json::from_slice(&g.json).unwrap();
        assert_eq!(g.volumes.len(), 1);
        let u = &g.volumes[0];
        assert_eq!((u.kind, u.host.as_path()), (UseKind::Live, Path::new(cfg)));
        assert_eq!(v["mounts"][0]["source"], u.bind_source());
        // The read-only flag is the spec's, as it was.
        assert_eq!(v["mounts"][0]["options"], json!(["rbind", "ro"]));
        // Two mounts of one volume are one copy.
        let twice = HostSpec(json!({"mounts": [
            {"destination": "/a", "type": "bind", "source": cfg, "options": ["rbind"]},
            {"destination": "/b", "type": "bind", "source": cfg, "options": ["rbind"]},
        ]}));
        assert_eq!(twice.for_guest(&scratch()).unwrap().volumes.len(), 1);
    }

    #[test]
    fn every_host_mount_the_guest_cannot_serve_is_refused_naming_it() {
        for (source, dest, volume) in [
            ("/srv/www", "/usr/share/nginx/html", "/srv/www"),
            (
                "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/pvc-1/mount",
                "/data",
                "pvc-1",
            ),
            (
                "/var/lib/containerd/io.containerd.grpc.v1.cri/containers/c1/volumes/0ab1",
                "/var/lib/mysql",
                "/var/lib/containerd/io.containerd.grpc.v1.cri/containers/c1/volumes/0ab1",
            ),
        ] {
            let e = with_mount(source, dest).for_guest(&scratch()).unwrap_err();
            assert_eq!(e.kind(), Kind::FailedPrecondition, "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("the mount at {dest} (from {source})"))
                    && msg.contains(&format!("volume {volume} is a host directory"))
                    && msg.contains("set shared_dirs = true in [handlers.veil-sim]"),
                "{msg}"
            );
            // A handler that shares host directories shares it.
            let shared = MountContext {
                shared_dirs: true,
                ..scratch()
            };
            let g = with_mount(source, dest).for_guest(&shared).unwrap();
            assert_eq!(g.volumes[0].kind, UseKind::Shared);
            let v: Value = serde_json::from_slice(&g.json).unwrap();
            assert_eq!(
                v["mounts"][0]["source"],
                format!("storage:shared/{}", g.volumes[0].id)
            );
        }
        let e = with_mount("", "/x").for_guest(&scratch()).unwrap_err();
        assert_eq!(e.kind(), Kind::InvalidArgument, "{e}");
        // Our own sources pass as they are.
        let g = with_mount("storage:scratch/volumes/x", "/x")
            .for_guest(&scratch())
            .unwrap();
        assert!(g.volumes.is_empty());
    }

    #[test]
    fn host_block_devices_become_block_volumes_named_by_serial() {
        let spec = HostSpec(json!({"linux": {
            "devices": [
                {"path": "/dev/xvda", "type": "b", "major": 7, "minor": 3},
                {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
            ],
        }}));
        let g = spec.for_guest(&scratch()).unwrap();
        assert_eq!(
            g.blocks,
            [BlockUse {
                path: "/dev/xvda".into(),
                major: 7,
                minor: 3
            }]
        );
        let v: Value = serde_json::from_slice(&g.json).unwrap();
        assert_eq!(
            v["annotations"][BLOCK_DEVICES_ANNOTATION],
            r#"{"/dev/xvda":"vb-7-3"}"#
        );
        // The entries stay for the agent, which gives them the guest's numbers.
        assert_eq!(v["linux"]["devices"].as_array().unwrap().len(), 2);
        let bad = HostSpec(json!({"linux": {"devices": [{"path": "/dev/x", "type": "b"}]}}));
        assert_eq!(
            bad.for_guest(&scratch()).unwrap_err().kind(),
            Kind::InvalidArgument
        );
    }

    #[test]
    fn image_names_from_cri_or_veil_annotations() {
        assert_eq!(
            HostSpec::parse(br#"{"annotations": {"io.veil.image-name": "app"}}"#)
                .unwrap()
                .image_name(),
            "app"
        );
        assert_eq!(HostSpec::parse(b"{}").unwrap().image_name(), "");
        let pause = |extra: &str| {
            HostSpec::parse(
                format!(
                    r#"{{"annotations": {{"io.kubernetes.cri.container-type": "sandbox"{extra}}}}}"#
                )
                .as_bytes(),
            )
            .unwrap()
        };
        assert_eq!(pause("").image_name(), POD_SANDBOX_IMAGE);
        assert_eq!(
            pause(r#", "io.kubernetes.cri.podsandbox.image-name": "registry.k8s.io/pause:3.9""#)
                .image_name(),
            "registry.k8s.io/pause:3.9"
        );
    }

    #[test]
    fn not_a_spec_is_an_error() {
        assert!(matches!(HostSpec::parse(b"[1]"), Err(SpecError::NotObject)));
        assert!(matches!(HostSpec::parse(b"{"), Err(SpecError::Json(_))));
    }
}
