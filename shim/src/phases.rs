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

/// Nanoseconds since the epoch, now.
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Marks recorded for one container's start.
#[derive(Debug, Default)]
pub struct Phases {
    marks: Lock<Vec<(&'static str, u128)>>,
}

impl Phases {
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

    /// The marks recorded so far, in [`MARKS`] order.
    pub fn marks(&self) -> Vec<(&'static str, u128)> {
        let marks = self.marks.lock().clone();
        MARKS
            .iter()
            .filter_map(|name| marks.iter().find(|(n, _)| n == name).copied())
            .collect()
    }

    /// The `veil-phases` line.
    pub fn line(&self, sandbox: &str, container: &str) -> String {
        let mut s = format!("veil-phases sandbox={sandbox} container={container}");
        for (name, t) in self.marks() {
            s.push_str(&format!(" {name}={t}"));
        }
        s
    }
}

/// Parses a `veil-phases` line back into `(name, ns)` pairs (benchmarks).
pub fn parse_line(line: &str) -> Option<Vec<(String, u128)>> {
    let rest = &line[line.find("veil-phases ")? + "veil-phases ".len()..];
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
}
