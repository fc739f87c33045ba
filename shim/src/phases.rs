//! Pod start timestamps, logged in one line per started container so the
//! benchmark (and an operator) can split pod start latency into phases.
//!
//! The line is `veil-phases` followed by `name=unix-nanoseconds` pairs:
//! `start_cmd` (containerd ran `containerd-shim-veil-v2 start`), `serving`
//! (the shim's ttrpc server is up), `create` (task Create received),
//! `vmm_spawned` (vsock backend and QEMU started), `kernel_booted` (the agent
//! announced itself on the console: kernel boot plus agent start),
//! `agent_ready` (first health answer over vsock), `network_ready` (pods
//! with a network namespace: taps wired and the guest's interfaces, addresses
//! and routes configured by the agent), `attested` (TEE pods with
//! a key broker: the agent attested and fetched its keys), `scratch_ready`
//! (pods with a scratch disk: unlocked or formatted, and mounted, by the
//! agent), `rootfs_attached` (image
//! built or reused, hot-added, mounted by the agent), `container_created`,
//! `container_started`. Marks that did not happen for this container (a
//! second container of a pod has no VM boot) are absent.
//!
//! A pod's teardown is logged the same way, once, as the shim stops the pod:
//! `veil-teardown` with [`TEARDOWN_MARKS`]: `exited` (the sandbox
//! container's process exit became known), `exit_published` (its TaskExit
//! went to containerd), `delete` (containerd's Delete of it), `removed`
//! (the agent removed the container), `network_released`,
//! `image_detached`, `deleted` (Delete answered), `shutdown` (containerd's
//! Shutdown let the shim exit), `agent_stopped` (the guest destroyed the
//! sandbox and was told to power off), `vm_stopped` (QEMU gone),
//! `backend_stopped` (vsock backend and virtiofsd gone), `state_removed`
//! (network, images and `/run/veil/<id>` released). containerd stops
//! reading a shim's log once it asked the shim to shut down, so the line
//! often never reaches containerd's log; the same marks also go to the
//! node's metrics as a `teardown` report (`crate::report::torn_down`).

use std::time::{SystemTime, UNIX_EPOCH};

use crate::sync::Lock;

/// Environment variable through which `start` hands its start time to the
/// serving shim.
pub const START_ENV: &str = "VEIL_SHIM_START_NS";

/// The phase marks, in order.
pub const MARKS: &[&str] = &[
    "start_cmd",
    "serving",
    "create",
    "vmm_spawned",
    "kernel_booted",
    "agent_ready",
    "network_ready",
    "attested",
    "scratch_ready",
    "rootfs_attached",
    "container_created",
    "container_started",
];

/// The teardown marks, in order.
pub const TEARDOWN_MARKS: &[&str] = &[
    "exited",
    "exit_published",
    "delete",
    "removed",
    "network_released",
    "image_detached",
    "deleted",
    "shutdown",
    "agent_stopped",
    "vm_stopped",
    "backend_stopped",
    "state_removed",
];

/// The tag of a start line.
pub const START_TAG: &str = "veil-phases";
/// The tag of a teardown line.
pub const TEARDOWN_TAG: &str = "veil-teardown";

/// Nanoseconds since the epoch, now.
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Marks recorded for one container's start (the default) or one pod's
/// teardown ([`Phases::teardown`]).
#[derive(Debug)]
pub struct Phases {
    tag: &'static str,
    order: &'static [&'static str],
    marks: Lock<Vec<(&'static str, u128)>>,
}

impl Default for Phases {
    fn default() -> Self {
        Phases {
            tag: START_TAG,
            order: MARKS,
            marks: Lock::default(),
        }
    }
}

impl Phases {
    /// Marks for a pod's teardown.
    pub fn teardown() -> Self {
        Phases {
            tag: TEARDOWN_TAG,
            order: TEARDOWN_MARKS,
            marks: Lock::default(),
        }
    }

    /// Records `name` now unless it was recorded already (the first time
    /// something happened counts).
    pub fn mark_once(&self, name: &'static str) {
        let mut m = self.marks.lock();
        if !m.iter().any(|(n, _)| *n == name) {
            m.push((name, now_ns()));
        }
    }

    /// Records `name` now.
    pub fn mark(&self, name: &'static str) {
        self.mark_at(name, now_ns());
    }

    /// Records `name` at `ns`.
    pub fn mark_at(&self, name: &'static str, ns: u128) {
        let mut m = self.marks.lock();
        m.retain(|(n, _)| *n != name);
        m.push((name, ns));
    }

    /// The marks recorded so far, in their list's order.
    pub fn marks(&self) -> Vec<(&'static str, u128)> {
        let marks = self.marks.lock().clone();
        self.order
            .iter()
            .filter_map(|name| marks.iter().find(|(n, _)| n == name).copied())
            .collect()
    }

    /// The `veil-phases` (or `veil-teardown`) line.
    pub fn line(&self, sandbox: &str, container: &str) -> String {
        let mut s = format!("{} sandbox={sandbox} container={container}", self.tag);
        for (name, t) in self.marks() {
            s.push_str(&format!(" {name}={t}"));
        }
        s
    }
}

/// Parses a `veil-phases` line back into `(name, ns)` pairs (benchmarks).
pub fn parse_line(line: &str) -> Option<Vec<(String, u128)>> {
    parse_tagged(START_TAG, line)
}

/// Parses a line tagged `tag` (`veil-phases`, `veil-teardown`) back into
/// `(name, ns)` pairs.
pub fn parse_tagged(tag: &str, line: &str) -> Option<Vec<(String, u128)>> {
    let start = line.find(tag)? + tag.len();
    let rest = line.get(start..)?.strip_prefix(' ')?;
    Some(
        rest.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| v.trim_matches('"').parse().ok().map(|n| (k.to_string(), n)))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_round_trips_in_phase_order() {
        let p = Phases::default();
        p.mark_at("agent_ready", 30);
        p.mark_at("create", 10);
        p.mark_at("vmm_spawned", 20);
        let line = p.line("pod", "c1");
        assert_eq!(
            line,
            "veil-phases sandbox=pod container=c1 create=10 vmm_spawned=20 agent_ready=30"
        );
        let parsed = parse_line(&format!("time=x level=info msg={line}")).unwrap();
        assert_eq!(parsed[0], ("create".to_string(), 10));
        assert_eq!(parsed.len(), 3, "sandbox and container are not numbers");
    }

    #[test]
    fn teardown_marks_keep_the_first_time_and_their_own_tag() {
        let t = Phases::teardown();
        t.mark_at("vm_stopped", 50);
        t.mark_at("exited", 10);
        t.mark_once("exited");
        let line = t.line("pod", "pod");
        assert_eq!(
            line,
            "veil-teardown sandbox=pod container=pod exited=10 vm_stopped=50"
        );
        let parsed = parse_tagged(TEARDOWN_TAG, &line).unwrap();
        assert_eq!(parsed.len(), 2);
        assert!(
            parse_line(&line).is_none(),
            "a teardown line is not a start line"
        );
    }
}
