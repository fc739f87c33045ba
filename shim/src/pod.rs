//! The seam between the task service and a pod: what the task service needs
//! from the pod VM, in our terms.
//!
//! [`Launcher`] starts a pod (the real one boots a VM: [`crate::sandbox`]);
//! [`Pod`] runs its containers and processes. The task service
//! ([`crate::task`]) only tracks state and speaks containerd; it is tested
//! against a fake pod that implements these traits in memory, without root,
//! QEMU or containerd.
//!
//! The pod owns what lives on its side: the images attached to the VM and
//! their references in the image store (taken by [`Pod::attach_image`],
//! given back by [`Pod::detach_image`], [`Pod::release_image`] or the pod's shutdown, nowhere else),
//! the stdio relays of its processes, and the phase marks of its boot.

use std::{fmt, path::PathBuf, sync::Arc, time::SystemTime};

use veil_common::{Classify, Kind};
use veil_protocol::agent::ContainerStats;

use crate::{
    config::ConfigSource, phases::Phases, rootfs::Layers, spec::HostSpec, stdio::StdioPaths,
};

/// An error from a pod, whatever part of it failed; it keeps the failing
/// part's own error (and so its kind and cause chain).
pub struct PodError(Box<dyn PodFailure>);

/// What a pod's error can be built from: any classified error.
pub trait PodFailure: Classify + Send + Sync + 'static {}
impl<E: Classify + Send + Sync + 'static> PodFailure for E {}

impl PodError {
    /// Wraps the part's error.
    pub fn new(e: impl PodFailure) -> Self {
        PodError(Box::new(e))
    }

    /// The kind of the underlying error.
    pub fn kind(&self) -> Kind {
        self.0.kind()
    }
}

impl fmt::Debug for PodError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for PodError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl std::error::Error for PodError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl<E: PodFailure> From<E> for PodError {
    fn from(e: E) -> Self {
        PodError::new(e)
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit status (128 + signal when killed).
    pub status: u32,
    /// When.
    pub at: SystemTime,
}

/// What launching a pod needs.
pub struct LaunchRequest<'a> {
    /// The pod (CRI sandbox) id.
    pub sandbox_id: &'a str,
    /// The sandbox container's bundle directory.
    pub bundle: PathBuf,
    /// Where the configuration comes from (containerd's runtime options).
    pub config: ConfigSource,
    /// The pod's hostname.
    pub hostname: String,
    /// The sandbox container's spec.
    pub spec: &'a HostSpec,
    /// The sandbox container's layers, to build its image while the VM
    /// boots (`None` under the sandbox API: no sandbox container).
    pub first_image: Option<Layers>,
    /// The pod's network namespace (the spec's, or the sandbox API's
    /// `netns_path`); `None`: the pod has no network.
    pub netns: Option<PathBuf>,
}

/// An image attached to a pod: the handle to give back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedImage {
    /// The image's cache key.
    pub key: String,
    /// Its storage id in the guest.
    pub storage_id: String,
}

/// A container to create in the pod.
pub struct NewContainer<'a> {
    /// Container id.
    pub id: &'a str,
    /// Its bundle directory.
    pub bundle: PathBuf,
    /// Its spec.
    pub spec: &'a HostSpec,
    /// Its root image, attached.
    pub image: &'a AttachedImage,
    /// Its init process's stdio.
    pub stdio: &'a StdioPaths,
}

/// A process to add to a running container.
pub struct NewExec<'a> {
    /// Container id.
    pub container: &'a str,
    /// Exec id.
    pub exec: &'a str,
    /// The OCI process spec (JSON).
    pub process: &'a [u8],
    /// Its stdio.
    pub stdio: &'a StdioPaths,
}

/// Something the pod reports on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodEvent {
    /// A process of the container was killed for lack of memory.
    Oom {
        /// Container id.
        container: String,
    },
}

/// Starts pods.
#[async_trait::async_trait]
pub trait Launcher: Send + Sync {
    /// Starts the pod and returns it once it can take containers; records
    /// its boot phases in `phases`.
    async fn launch(
        &self,
        req: LaunchRequest<'_>,
        phases: &Phases,
    ) -> Result<Arc<dyn Pod>, PodError>;
}

/// A running pod. Methods that need the guest fail with an
/// `Unavailable` error once it is gone; [`Pod::remove_container`],
/// [`Pod::delete_process`], [`Pod::detach_image`] and [`Pod::shutdown`]
/// succeed from the host side alone.
#[async_trait::async_trait]
pub trait Pod: Send + Sync {
    /// The pod id.
    fn id(&self) -> &str;

    /// PIDs of the host processes the pod runs (VMM, vsock backend).
    fn host_pids(&self) -> Vec<u32>;

    /// Removes the pod's network from its network namespace (the taps and
    /// redirects), so CNI's DEL, which containerd runs once the sandbox
    /// container is deleted, finds the namespace as CNI left it. The VM
    /// itself may run on (without network) until [`Pod::shutdown`].
    fn release_network(&self) {}

    /// Makes the image of `layers` available in the guest and holds a
    /// reference to it; `name` is the image as the pod names it (the key of
    /// a confidential pod's image policy). An image already attached is
    /// shared.
    async fn attach_image(
        &self,
        layers: &Layers,
        name: &str,
        work_dir: PathBuf,
        phases: &Phases,
    ) -> Result<AttachedImage, PodError>;

    /// Gives back one use of an attached image; the last use detaches it
    /// and releases the reference.
    async fn detach_image(&self, image: &AttachedImage) -> Result<(), PodError>;

    /// Gives back one use of an attached image as the pod ends (its sandbox
    /// container is deleted): the host's reference only. The guest's copy
    /// goes with the VM, so the hot-unplug (about a second under TCG) is
    /// not waited for.
    async fn release_image(&self, image: &AttachedImage) -> Result<(), PodError> {
        self.detach_image(image).await
    }

    /// Creates a container (its init process waits to be started) with its
    /// stdio wired; returns the init's PID.
    async fn create_container(&self, c: NewContainer<'_>, phases: &Phases)
        -> Result<u32, PodError>;

    /// Adds a process to a container, stdio wired, not started.
    async fn exec(&self, e: NewExec<'_>) -> Result<(), PodError>;

    /// Starts a created process (`exec` "" is the container's init); returns
    /// its PID.
    async fn start(&self, container: &str, exec: &str) -> Result<u32, PodError>;

    /// Waits until a started process exited and what it wrote was
    /// delivered. A process the pod lost (its VM died) ends with 255.
    async fn wait(&self, container: &str, exec: &str) -> ExitInfo;

    /// Signals a process, or with `all` every process of the container.
    async fn signal(
        &self,
        container: &str,
        exec: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), PodError>;

    /// Forgets an exec'd process.
    async fn delete_process(&self, container: &str, exec: &str) -> Result<(), PodError>;

    /// Removes a container (killing an init that never started).
    async fn remove_container(&self, container: &str) -> Result<(), PodError>;

    /// The container's processes (guest PIDs).
    async fn pids(&self, container: &str) -> Result<Vec<u32>, PodError>;

    /// The container's cgroup statistics.
    async fn stats(&self, container: &str) -> Result<ContainerStats, PodError>;

    /// Freezes (`true`) or thaws the container.
    async fn freeze(&self, container: &str, frozen: bool) -> Result<(), PodError>;

    /// New cgroup resources (OCI `LinuxResources` JSON).
    async fn update(&self, container: &str, resources: &[u8]) -> Result<(), PodError>;

    /// Closes a process's stdin.
    async fn close_stdin(&self, container: &str, exec: &str) -> Result<(), PodError>;

    /// Resizes a process's terminal.
    async fn resize(
        &self,
        container: &str,
        exec: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), PodError>;

    /// The next event the pod reports; `None` once the pod is gone.
    async fn next_event(&self) -> Option<PodEvent>;

    /// Stops the pod: the VM, its host processes, its files and its image
    /// references. Idempotent; works when the VM is already gone. Records
    /// its steps in `marks` (a teardown [`Phases`]).
    async fn shutdown(&self, marks: &Phases);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    impl Classify for Outer {
        fn kind(&self) -> Kind {
            Kind::DataLoss
        }
    }

    #[test]
    fn a_pod_error_keeps_the_kind_and_the_chain() {
        let e = PodError::from(Outer(std::io::Error::other("inner")));
        assert_eq!(e.kind(), Kind::DataLoss);
        assert_eq!(veil_common::error_chain(&e), "outer: inner");
    }
}
