//! veil-node: puts veil on a Kubernetes node and takes it off again.
//!
//! The DaemonSet's container runs `veil-node run` (install, wait for SIGTERM,
//! uninstall); `veil-node check` reports what the node can run. Modules:
//! - [`host`]: the node as the installer sees it (its root mounted somewhere,
//!   the path the host itself uses, commands run in the host's mount
//!   namespace);
//! - [`check`]: the node report and which handlers can run;
//! - [`containerd`]: containerd's version and the marked block registering
//!   the veil runtimes in its config (added, replaced, removed byte for byte);
//! - [`install`]: artefacts to `/opt/veil`, `/etc/veil/config.toml`, the
//!   install record, install and uninstall;
//! - [`kube`]: labelling the node through the API server (in-cluster).

pub mod check;
pub mod containerd;
pub mod host;
pub mod install;
pub mod kube;
pub mod metrics;
