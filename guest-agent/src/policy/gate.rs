//! The pod's policy state: which policy is in force, how it arrived, and
//! what the checks need to remember (each container's rule, each image
//! storage's root hash).
//!
//! A plain pod starts under [`Policy::allow_all`]. A confidential pod starts
//! with no policy and refuses every request the policy governs until the
//! host delivers one (SetPolicy); the agent then compares the document's
//! digest with the host-data field the TEE bound at launch (SHA-256 for SNP
//! HOST_DATA and the simulated TEE, SHA-384 for TDX MRCONFIGID; all zeros
//! for "no policy", which selects [`Policy::confidential_default`]). On a
//! mismatch the pod refuses everything from then on: a host that swaps the
//! policy after launch gets nothing run.

use std::{collections::HashMap, sync::Arc};

use sha2::{Digest, Sha256, Sha384};
use veil_attestation::Tee;

use super::{eval::Denied, Policy, PolicyDocError};
use crate::status::{Classify, Kind};

/// Why a policy was not put in force.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// A policy is already in force.
    #[error("a policy is already in force ({0}); it cannot be replaced")]
    AlreadySet(&'static str),
    /// The document is malformed.
    #[error("the delivered policy is malformed")]
    Doc(#[source] PolicyDocError),
    /// The TEE's host-data field could not be read.
    #[error("cannot read the launch's host data to verify the policy: {0}")]
    HostData(String),
    /// The document's digest is not what the launch bound.
    #[error(
        "the delivered policy's digest {digest} differs from the host data {host_data} bound at launch; this pod refuses every request"
    )]
    Mismatch {
        /// Digest of what was delivered (hex).
        digest: String,
        /// The launch's host data (hex).
        host_data: String,
    },
}

impl Classify for GateError {
    fn kind(&self) -> Kind {
        match self {
            GateError::AlreadySet(_) => Kind::FailedPrecondition,
            GateError::Doc(e) => e.kind(),
            GateError::HostData(_) => Kind::Internal,
            GateError::Mismatch { .. } => Kind::PermissionDenied,
        }
    }
}

enum Phase {
    /// A confidential pod before SetPolicy.
    Awaiting,
    /// Checks run against this policy.
    Enforcing(Arc<Policy>),
    /// The delivered policy did not verify: everything is refused.
    Refusing(String),
}

struct State {
    phase: Phase,
    /// Container id → the rule it was created under.
    containers: HashMap<String, Option<usize>>,
    /// Storage id → its dm-verity root hash (lowercase hex).
    root_hashes: HashMap<String, String>,
}

/// The pod's policy gate.
pub struct Gate {
    tee: Option<Tee>,
    state: std::sync::Mutex<State>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("tee", &self.tee)
            .finish_non_exhaustive()
    }
}

/// The digest init-data must have to match `tee`'s host-data field.
pub fn init_data_digest(tee: Tee, doc: &[u8]) -> Vec<u8> {
    match tee {
        Tee::Tdx => Sha384::digest(doc).to_vec(),
        Tee::Snp | Tee::VeilSim => Sha256::digest(doc).to_vec(),
    }
}

/// What the host-data field must hold for `doc`: its digest, or all zeros
/// of `len` bytes when no policy was given.
pub fn expected_host_data(tee: Tee, doc: &[u8], len: usize) -> Vec<u8> {
    if doc.is_empty() {
        vec![0u8; len]
    } else {
        init_data_digest(tee, doc)
    }
}

impl Gate {
    /// A plain pod's gate: allow-all until a policy is delivered.
    pub fn plain() -> Self {
        Gate::with_phase(None, Phase::Enforcing(Arc::new(Policy::allow_all())))
    }

    /// A confidential pod's gate (TEE `tee`): refuses until SetPolicy.
    pub fn confidential(tee: Tee) -> Self {
        Gate::with_phase(Some(tee), Phase::Awaiting)
    }

    fn with_phase(tee: Option<Tee>, phase: Phase) -> Self {
        Gate {
            tee,
            state: std::sync::Mutex::new(State {
                phase,
                containers: HashMap::new(),
                root_hashes: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The TEE whose host data binds the policy (`None`: a plain pod).
    pub fn tee(&self) -> Option<Tee> {
        self.tee
    }

    /// Puts `doc` in force. In a confidential pod `host_data` is the
    /// launch's host-data field, read from the TEE; a plain pod has none and
    /// takes the document as given (there is nothing to protect it from).
    pub fn deliver(&self, doc: &[u8], host_data: Option<&[u8]>) -> Result<&'static str, GateError> {
        let mut st = self.lock();
        match &st.phase {
            Phase::Awaiting => {}
            Phase::Enforcing(p) if self.tee.is_some() => {
                return Err(GateError::AlreadySet(p.source))
            }
            Phase::Enforcing(p) if !st.containers.is_empty() => {
                return Err(GateError::AlreadySet(p.source))
            }
            Phase::Enforcing(_) => {}
            Phase::Refusing(_) => return Err(GateError::AlreadySet("a refused policy")),
        }
        if let Some(tee) = self.tee {
            // The built-in default may go in force before the TEE can
            // report (the attestation checks the binding before any secret
            // is fetched); a delivered document is verified first.
            match host_data {
                Some(hd) => {
                    let want = expected_host_data(tee, doc, hd.len());
                    if want != hd {
                        let e = GateError::Mismatch {
                            digest: hex::encode(&want),
                            host_data: hex::encode(hd),
                        };
                        st.phase = Phase::Refusing(e.to_string());
                        return Err(e);
                    }
                }
                None if doc.is_empty() => {}
                None => return Err(GateError::HostData("no host data".into())),
            }
        }
        let policy = match (doc.is_empty(), self.tee) {
            (true, Some(_)) => Policy::confidential_default(),
            (true, None) => Policy::allow_all(),
            (false, _) => match Policy::parse(doc) {
                Ok(p) => p,
                Err(e) => {
                    if self.tee.is_some() {
                        st.phase = Phase::Refusing(format!("the policy is malformed: {e}"));
                    }
                    return Err(GateError::Doc(e));
                }
            },
        };
        let source = policy.source;
        st.phase = Phase::Enforcing(Arc::new(policy));
        Ok(source)
    }

    /// The policy in force, or why `request` is refused outright.
    pub fn policy(&self, request: &'static str) -> Result<Arc<Policy>, Denied> {
        let refuse = |why: String| Denied {
            request,
            policy: "pod's policy gate",
            field: "request".into(),
            detail: why,
            rule: None,
        };
        match &self.lock().phase {
            Phase::Enforcing(p) => Ok(Arc::clone(p)),
            Phase::Awaiting => Err(refuse(
                "is refused: no policy has been delivered yet (SetPolicy comes first in a confidential pod)".into(),
            )),
            Phase::Refusing(why) => Err(refuse(format!("is refused: {why}"))),
        }
    }

    /// Remembers an image storage's root hash.
    pub fn record_storage(&self, id: &str, root_hash: Option<&str>) {
        let mut st = self.lock();
        match root_hash {
            Some(h) => st
                .root_hashes
                .insert(id.to_string(), h.to_ascii_lowercase()),
            None => st.root_hashes.remove(id),
        };
    }

    /// Forgets a storage.
    pub fn forget_storage(&self, id: &str) {
        self.lock().root_hashes.remove(id);
    }

    /// The root hash of storage `id`, if it is a verity image.
    pub fn root_hash(&self, id: &str) -> Option<String> {
        self.lock().root_hashes.get(id).cloned()
    }

    /// Remembers the rule container `id` was created under.
    pub fn record_container(&self, id: &str, rule: Option<usize>) {
        self.lock().containers.insert(id.to_string(), rule);
    }

    /// Forgets a container.
    pub fn forget_container(&self, id: &str) {
        self.lock().containers.remove(id);
    }

    /// The rule container `id` was created under.
    pub fn container_rule(&self, id: &str) -> Option<usize> {
        self.lock().containers.get(id).copied().flatten()
    }
}

/// Per-request checks: the agent API requests as the policy sees them.
impl Gate {
    /// A request the policy governs as a whole: allowed once a policy is in
    /// force and `allowed` says so (`what` names it in the denial).
    pub fn check_call(
        &self,
        request: &'static str,
        allowed: impl FnOnce(&super::Api) -> bool,
    ) -> Result<(), Denied> {
        let p = self.policy(request)?;
        let ok = allowed(&p.api);
        p.check_call(request, ok, "the policy's api table does not allow it")
    }

    /// Checks a CreateContainer; returns the rule it matched, to record once
    /// the container exists. A spec that does not parse is left to the
    /// pod, which refuses it with the same parser.
    pub fn check_create(
        &self,
        req: &veil_protocol::agent::CreateContainerRequest,
    ) -> Result<Option<usize>, Denied> {
        let p = self.policy("CreateContainer")?;
        if matches!(p.containers, super::Containers::Any { .. }) {
            return Ok(None);
        }
        let Ok(spec) = crate::engine::plan::parse_spec(&req.oci_spec) else {
            return Ok(None);
        };
        let root = req.rootfs.as_ref();
        let root_hash = root.and_then(|r| self.root_hash(&r.storage_id));
        let stdin = req.stdio.as_ref().is_some_and(|s| s.stdin);
        p.check_container(&super::eval::ContainerView::of(&spec, stdin, root_hash))
    }

    /// Checks an ExecProcess.
    pub fn check_exec(&self, req: &veil_protocol::agent::ExecProcessRequest) -> Result<(), Denied> {
        let p = self.policy("ExecProcess")?;
        if matches!(p.containers, super::Containers::Any { exec: true }) {
            return Ok(());
        }
        let process = crate::engine::plan::parse_process(&req.process).map_err(|e| Denied {
            request: "ExecProcess",
            policy: p.source,
            field: "process".into(),
            detail: format!("does not parse: {e}"),
            rule: None,
        })?;
        let stdin = req.stdio.as_ref().is_some_and(|s| s.stdin);
        p.check_exec(
            self.container_rule(&req.container_id),
            &super::eval::ExecView::of(&process, stdin),
        )
    }

    /// Checks a signal; allowed whenever no policy is in force (nothing
    /// runs then, and teardown must always work).
    pub fn check_signal(&self, signal: u32) -> Result<(), Denied> {
        match self.policy("SignalProcess") {
            Ok(p) => p.check_signal(signal),
            Err(_) => Ok(()),
        }
    }

    /// Checks the opening of a stdio stream.
    pub fn check_stream(&self, kind: veil_protocol::agent::StreamKind) -> Result<(), Denied> {
        use veil_protocol::agent::StreamKind;
        match kind {
            StreamKind::STDIN => self.policy("StreamOpen").map(|_| ()),
            StreamKind::PORT_FORWARD => self.check_call("PortForward", |a| a.port_forward),
            _ => self.check_call("StreamOpen", |a| a.read_output),
        }
    }
}
