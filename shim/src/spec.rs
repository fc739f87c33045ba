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
//!   (`storage:scratch/volumes/NAME`, made by the agent on first use) when
//!   the pod has one; other host binds cannot reach the guest and are dropped
//!   with a warning;
//! - the root path and hooks are left for the agent to ignore.
//!
//! It also reads the annotations the shim needs (the pod grouping, the
//! image name).

use serde_json::{json, Value};
use veil_common::{Classify, Kind};

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
/// The path component under which kubelet makes a pod's emptyDir volumes.
const EMPTY_DIR_COMPONENT: &str = "/volumes/kubernetes.io~empty-dir/";

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
}

impl Classify for SpecError {
    fn kind(&self) -> Kind {
        match self {
            SpecError::Read { .. } => Kind::NotFound,
            SpecError::Json(_) | SpecError::NotObject | SpecError::HostNamespace { .. } => {
                Kind::InvalidArgument
            }
        }
    }
}

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
    /// Host bind mounts that were dropped (destinations).
    pub dropped_mounts: Vec<String>,
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

    /// The spec as the guest should see it; `scratch`: the pod has its
    /// scratch disk (emptyDir volumes go there).
    pub fn for_guest(&self, scratch: bool) -> Result<GuestSpec, SpecError> {
        let mut v = self.0.clone();
        let terminal = self.terminal();
        let mut dropped = Vec::new();
        if let Some(mounts) = v.get_mut("mounts").and_then(Value::as_array_mut) {
            let mut kept = Vec::with_capacity(mounts.len());
            for m in mounts.drain(..) {
                match guest_mount(m, scratch) {
                    MountFate::Keep(m) => kept.push(m),
                    MountFate::Drop(dest) => dropped.push(dest),
                }
            }
            *mounts = kept;
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
        if let Some(o) = v.get_mut("linux").and_then(Value::as_object_mut) {
            o.remove("cgroupsPath");
            if all_devices {
                // The host's device list means nothing in the guest.
                o.remove("devices");
            }
        }
        if all_devices {
            if !v.get("annotations").is_some_and(Value::is_object) {
                v["annotations"] = json!({});
            }
            v["annotations"][GUEST_DEVICES_ANNOTATION] = json!("all");
        }
        for d in &dropped {
            tracing::warn!(destination = %d, "host bind mount cannot reach the pod VM; dropped");
        }
        Ok(GuestSpec {
            json: serde_json::to_vec(&v)?,
            terminal,
            dropped_mounts: dropped,
        })
    }
}

enum MountFate {
    Keep(Value),
    Drop(String),
}

/// The volume name of an emptyDir host path (kubelet's
/// `…/volumes/kubernetes.io~empty-dir/NAME`), if it is one and the name is a
/// plain path component.
pub fn empty_dir_name(source: &str) -> Option<&str> {
    let (_, rest) = source.rsplit_once(EMPTY_DIR_COMPONENT)?;
    let name = rest.trim_end_matches('/');
    let plain = !name.is_empty()
        && name.len() <= 253
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0']);
    plain.then_some(name)
}

fn guest_mount(mut m: Value, scratch: bool) -> MountFate {
    let typ = m.get("type").and_then(Value::as_str).unwrap_or("");
    let opts: Vec<&str> = m
        .get("options")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let is_bind = typ == "bind" || opts.iter().any(|o| *o == "bind" || *o == "rbind");
    if !is_bind {
        return MountFate::Keep(m);
    }
    let dest = m
        .get("destination")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let source = m.get("source").and_then(Value::as_str).unwrap_or("");
    if source.starts_with("sandbox:") || source.starts_with("storage:") {
        return MountFate::Keep(m);
    }
    let named = match dest.as_str() {
        "/etc/hosts" => Some("sandbox:hosts"),
        "/etc/resolv.conf" => Some("sandbox:resolv.conf"),
        "/etc/hostname" => Some("sandbox:hostname"),
        _ => None,
    };
    if let Some(src) = named {
        m["source"] = json!(src);
        return MountFate::Keep(m);
    }
    if let Some(name) = empty_dir_name(source).filter(|_| scratch) {
        m["source"] = json!(crate::storage::scratch::volume_source(name));
        return MountFate::Keep(m);
    }
    if dest == "/dev/shm" {
        return MountFate::Keep(json!({
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        }));
    }
    MountFate::Drop(dest)
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
                {"destination": "/dev/termination-log", "type": "bind", "source": "/var/lib/k/term", "options": ["rbind"]}
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
        let g = cri_container().for_guest(false).unwrap();
        assert!(g.terminal);
        assert_eq!(g.dropped_mounts, ["/dev/termination-log"]);
        let v: Value = serde_json::from_slice(&g.json).unwrap();
        let mounts = v["mounts"].as_array().unwrap();
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[1]["source"], "sandbox:hosts");
        assert_eq!(mounts[2]["type"], "tmpfs");
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

    fn with_namespaces(types: &[&str]) -> HostSpec {
        let nss: Vec<Value> = types.iter().map(|t| json!({"type": t})).collect();
        HostSpec(json!({"linux": {"namespaces": nss}}))
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
        let v: Value = serde_json::from_slice(&spec.for_guest(false).unwrap().json).unwrap();
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
        let v: Value = serde_json::from_slice(&privileged.for_guest(false).unwrap().json).unwrap();
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
        let v: Value = serde_json::from_slice(&plain.for_guest(false).unwrap().json).unwrap();
        assert_eq!(v["linux"]["devices"][0]["path"], "/dev/fuse");
        assert!(v.get("annotations").is_none());
    }

    #[test]
    fn empty_dirs_go_to_the_scratch_disk_when_the_pod_has_one() {
        let spec = HostSpec::parse(
            br#"{
            "annotations": {"io.kubernetes.cri.image-name": "docker.io/library/busybox:1.36"},
            "mounts": [
                {"destination": "/cache", "type": "bind", "options": ["rbind", "rw"],
                 "source": "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/cache"},
                {"destination": "/cfg", "type": "bind", "options": ["rbind", "ro"],
                 "source": "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~configmap/cfg"}
            ]
        }"#,
        )
        .unwrap();
        assert_eq!(spec.image_name(), "docker.io/library/busybox:1.36");
        let g = spec.for_guest(true).unwrap();
        let v: Value = serde_json::from_slice(&g.json).unwrap();
        assert_eq!(v["mounts"][0]["source"], "storage:scratch/volumes/cache");
        assert_eq!(v["mounts"][0]["destination"], "/cache");
        assert_eq!(g.dropped_mounts, ["/cfg"]);
        // Without a scratch disk the emptyDir cannot reach the guest.
        let g = spec.for_guest(false).unwrap();
        assert_eq!(g.dropped_mounts, ["/cache", "/cfg"]);
    }

    #[test]
    fn empty_dir_names_are_plain_components() {
        let p = "/x/volumes/kubernetes.io~empty-dir/";
        assert_eq!(empty_dir_name(&format!("{p}data")), Some("data"));
        assert_eq!(empty_dir_name(&format!("{p}data/")), Some("data"));
        for bad in ["", "..", ".", "a/b"] {
            assert_eq!(empty_dir_name(&format!("{p}{bad}")), None, "{bad}");
        }
        assert_eq!(empty_dir_name("/tmp/data"), None);
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
