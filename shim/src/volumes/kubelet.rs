//! What a host bind source is, read from kubelet's directory layout:
//! `<root>/pods/<uid>/volumes/<plugin>/<name>` for a pod volume (plugins
//! `kubernetes.io~configmap`, `~secret`, `~projected`, `~downward-api`,
//! `~empty-dir`, and others for directory volumes), `<root>/pods/<uid>/
//! volume-subpaths/<name>/<container>/<index>` for a subPath mount (a bind
//! of the path inside the volume), and `<root>/pods/<uid>/containers/
//! <container>/<id>` for a container's termination message file.
//!
//! The last components decide (kubelet's root directory is configurable;
//! emptyDirs are recognised wherever their `volumes/kubernetes.io~empty-dir/
//! NAME` tail is). Only the path is judged here (and, for a subPath, which plugin directory
//! holds the volume of that name): no file is read.

use std::path::{Path, PathBuf};

/// kubelet's plugin directories of the volumes its atomic writer fills.
pub const FILE_PLUGINS: &[&str] = &[
    "kubernetes.io~configmap",
    "kubernetes.io~secret",
    "kubernetes.io~projected",
    "kubernetes.io~downward-api",
];
/// kubelet's plugin directory of emptyDir volumes.
pub const EMPTY_DIR_PLUGIN: &str = "kubernetes.io~empty-dir";

/// What a host bind source is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A volume kubelet's atomic writer fills (configMap, secret,
    /// projected, downwardAPI): the volume's directory.
    FileVolume {
        /// The plugin (`kubernetes.io~configmap`, ...).
        plugin: String,
        /// The volume's name.
        name: String,
    },
    /// A subPath of a file volume: a fixed copy of the bound path.
    FileSubPath {
        /// The plugin of the volume.
        plugin: String,
        /// The volume's name.
        name: String,
    },
    /// An emptyDir volume.
    EmptyDir {
        /// The volume's name.
        name: String,
    },
    /// A subPath of an emptyDir.
    EmptyDirSubPath {
        /// The volume's name.
        name: String,
    },
    /// A container's termination message file.
    TerminationLog,
    /// Anything else: a host directory or file (hostPath, a PVC's or other
    /// plugin's mount, a subPath of one, an image volume).
    Host,
}

/// A plain path component (not empty, `.`, `..`, no `/` or NUL, ≤ 253 bytes:
/// Kubernetes names are DNS labels or subdomains).
pub fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0'])
}

/// Classifies host bind source `source` by its last components.
pub fn classify(source: &Path) -> Source {
    let comps: Vec<String> = source
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let tail: Vec<&str> = comps.iter().rev().take(5).map(String::as_str).collect();
    match tail.as_slice() {
        [name, plugin, "volumes", ..] if plain_name(name) => {
            if FILE_PLUGINS.contains(plugin) {
                Source::FileVolume {
                    plugin: plugin.to_string(),
                    name: name.to_string(),
                }
            } else if *plugin == EMPTY_DIR_PLUGIN {
                Source::EmptyDir {
                    name: name.to_string(),
                }
            } else {
                Source::Host
            }
        }
        [index, container, name, "volume-subpaths", ..]
            if plain_name(name) && plain_name(container) && plain_name(index) =>
        {
            let pod_dir: PathBuf = comps[..comps.len() - 4].iter().collect();
            match plugin_of(&pod_dir, name) {
                Some(p) if FILE_PLUGINS.contains(&p.as_str()) => Source::FileSubPath {
                    plugin: p,
                    name: name.to_string(),
                },
                Some(p) if p == EMPTY_DIR_PLUGIN => Source::EmptyDirSubPath {
                    name: name.to_string(),
                },
                _ => Source::Host,
            }
        }
        [file, container, "containers", uid, "pods"]
            if plain_name(file) && plain_name(container) && plain_name(uid) =>
        {
            Source::TerminationLog
        }
        _ => Source::Host,
    }
}

/// The volume's name when `source` is kubelet's directory of a volume (or a
/// PVC's `mount` below it, or a subPath of one), else the path itself.
pub fn volume_name(source: &Path) -> String {
    let comps: Vec<String> = source
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let tail: Vec<&str> = comps.iter().rev().take(5).map(String::as_str).collect();
    let name = match tail.as_slice() {
        ["mount", name, _, "volumes", ..] | [name, _, "volumes", ..] => Some(*name),
        [_, _, name, "volume-subpaths", ..] => Some(*name),
        _ => None,
    };
    name.filter(|n| plain_name(n))
        .map_or_else(|| source.display().to_string(), str::to_string)
}

/// The plugin directory under `<pod>/volumes/` that holds volume `name`.
fn plugin_of(pod_dir: &Path, name: &str) -> Option<String> {
    std::fs::read_dir(pod_dir.join("volumes"))
        .ok()?
        .flatten()
        .find(|e| e.path().join(name).exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_paths_say_what_they_are() {
        let k = "/var/lib/kubelet/pods/0b1c-uid";
        let file = |plugin: &str, name: &str| Source::FileVolume {
            plugin: plugin.into(),
            name: name.into(),
        };
        assert_eq!(
            classify(Path::new(&format!(
                "{k}/volumes/kubernetes.io~configmap/cfg"
            ))),
            file("kubernetes.io~configmap", "cfg")
        );
        assert_eq!(
            classify(Path::new(&format!(
                "{k}/volumes/kubernetes.io~projected/kube-api-access-x7q2/"
            ))),
            file("kubernetes.io~projected", "kube-api-access-x7q2")
        );
        assert_eq!(
            classify(Path::new(&format!(
                "{k}/volumes/kubernetes.io~empty-dir/cache"
            ))),
            Source::EmptyDir {
                name: "cache".into()
            }
        );
        assert_eq!(
            classify(Path::new(&format!("{k}/containers/app/5f3e2a1b"))),
            Source::TerminationLog
        );
        for host in [
            "/srv/data".to_string(),
            format!("{k}/volumes/kubernetes.io~csi/pvc-1/mount"),
            format!("{k}/volumes/kubernetes.io~local-volume/pv1"),
            format!("{k}/volumes/kubernetes.io~configmap/cfg/key"),
            format!("{k}/volumes/kubernetes.io~configmap/.."),
            "/var/lib/containerd/io.containerd.grpc.v1.cri/containers/c1/volumes/ab12".into(),
            // Its plugin cannot be found: not a file volume.
            format!("{k}/volume-subpaths/cfg/app/0"),
        ] {
            assert_eq!(classify(Path::new(&host)), Source::Host, "{host}");
        }
    }

    #[test]
    fn volumes_are_named_by_kubelets_directory() {
        let k = "/var/lib/kubelet/pods/u";
        for (p, name) in [
            (
                format!("{k}/volumes/kubernetes.io~csi/pvc-1/mount"),
                "pvc-1",
            ),
            (format!("{k}/volumes/kubernetes.io~local-volume/pv1"), "pv1"),
            (format!("{k}/volume-subpaths/data/app/0"), "data"),
            ("/srv/www".to_string(), "/srv/www"),
        ] {
            assert_eq!(volume_name(Path::new(&p)), name, "{p}");
        }
    }

    #[test]
    fn a_subpath_is_judged_by_the_volume_it_comes_from() {
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().join("pods/uid-1");
        std::fs::create_dir_all(pod.join("volumes/kubernetes.io~secret/creds")).unwrap();
        std::fs::create_dir_all(pod.join("volumes/kubernetes.io~empty-dir/scratch")).unwrap();
        std::fs::create_dir_all(pod.join("volumes/kubernetes.io~csi/pvc")).unwrap();
        let sub = |name: &str| classify(&pod.join(format!("volume-subpaths/{name}/app/1")));
        assert_eq!(
            sub("creds"),
            Source::FileSubPath {
                plugin: "kubernetes.io~secret".into(),
                name: "creds".into()
            }
        );
        assert_eq!(
            sub("scratch"),
            Source::EmptyDirSubPath {
                name: "scratch".into()
            }
        );
        assert_eq!(sub("pvc"), Source::Host);
    }
}
