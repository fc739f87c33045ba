//! What the shim tells the node's metrics (`veil-node run`), without the
//! node being in the pod's start path: small JSON files the node reads when
//! it is scraped.
//!
//! - `<state_dir>/<pod>/pod.json`: the running pod (handler, guest size, the
//!   PIDs of shim, VMM and vsock backend); goes with the pod directory.
//! - `<state_dir>/metrics/<pod>.<event>.json`: one event (`start`: the
//!   start phases; `attest`: the attestation's outcome and reason), which
//!   the node reads once and removes. Written only when the node created
//!   `<state_dir>/metrics`, so a node without the metrics service collects
//!   nothing.
//!
//! Every write is best effort (a failure is logged at debug level, never
//! fails the pod) and atomic (a temp file renamed into place). One shim
//! serves one pod, so the pod's identity is process-wide.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use serde::Serialize;

/// The directory under the state dir where events go.
pub const METRICS_DIR: &str = "metrics";
/// The running pod's file in its directory.
pub const POD_FILE: &str = "pod.json";

struct Identity {
    state_dir: PathBuf,
    pod: String,
    handler: String,
}

static IDENTITY: OnceLock<Identity> = OnceLock::new();

/// Names this shim's pod (once; later calls are ignored).
pub fn init(state_dir: &Path, pod: &str, handler: &str) {
    let _ = IDENTITY.set(Identity {
        state_dir: state_dir.to_path_buf(),
        pod: pod.to_string(),
        handler: handler.to_string(),
    });
}

fn write_atomic(path: &Path, value: &serde_json::Value) {
    let tmp = path.with_extension("json.tmp");
    let res = std::fs::write(&tmp, value.to_string()).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        tracing::debug!(path = %path.display(), error = %e, "metrics report not written");
    }
}

fn event(kind: &str, body: serde_json::Value) {
    let Some(id) = IDENTITY.get() else { return };
    let dir = id.state_dir.join(METRICS_DIR);
    if !dir.is_dir() {
        return;
    }
    let mut v = serde_json::json!({ "pod": id.pod, "handler": id.handler });
    if let (Some(o), serde_json::Value::Object(b)) = (v.as_object_mut(), body) {
        o.extend(b);
    }
    write_atomic(&dir.join(format!("{}.{kind}.json", id.pod)), &v);
}

/// The running pod, as the node reports it.
#[derive(Debug, Serialize)]
pub struct PodReport {
    /// Guest RAM, MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// The shim's PID.
    pub shim_pid: u32,
    /// The VMM's PID.
    pub vmm_pid: Option<u32>,
    /// The vsock backend's PID.
    pub backend_pid: Option<u32>,
}

/// Writes the running pod's `pod.json` into its directory `dir`.
pub fn pod(dir: &Path, r: &PodReport) {
    let Some(id) = IDENTITY.get() else { return };
    let mut v = serde_json::to_value(r).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("pod".into(), id.pod.clone().into());
        o.insert("handler".into(), id.handler.clone().into());
    }
    write_atomic(&dir.join(POD_FILE), &v);
}

/// The attestation's outcome: `released`, or `refused`/`failed` with the
/// reason (the broker's or the agent's words; they hold no secret).
pub fn attestation(outcome: &str, reason: &str) {
    let reason: String = reason.chars().take(512).collect();
    event(
        "attest",
        serde_json::json!({ "outcome": outcome, "reason": reason }),
    );
}

fn marks_json(marks: &[(&str, u128)]) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = marks
        .iter()
        .map(|(n, t)| (n.to_string(), serde_json::Value::from(*t as u64)))
        .collect();
    serde_json::json!({ "phases": map })
}

/// The first container's start phases: `(name, unix ns)` pairs.
pub fn started(phases: &[(&str, u128)]) {
    event("start", marks_json(phases));
}

/// The pod's teardown marks (`phases::TEARDOWN_MARKS`), once it stopped.
pub fn torn_down(marks: &[(&str, u128)]) {
    event("teardown", marks_json(marks));
}
