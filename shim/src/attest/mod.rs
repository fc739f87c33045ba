//! The host's part in a pod's remote attestation — and nothing it could use to
//! subvert it.
//!
//! This module owns:
//! - the guest's attestation configuration, written as kernel command-line
//!   words ([`guest_cmdline`]): which TEE the guest attests as, the SHA-256
//!   pin of the key broker's certificate, and the resources to fetch. The
//!   command line is part of the launch measurement, so the broker releases
//!   nothing to a guest whose pin or resource list the host changed;
//! - the services the guest calls over vsock ([`host_services`]): the
//!   simulated TEE's firmware ([`firmware`], `veil-sim` pods only, never a
//!   fallback) and the relay to the broker ([`relay`], bytes only; TLS runs
//!   end to end from the guest);
//! - asking the agent to attest once it serves ([`attest_pod`]).
//!
//! It does not own the protocol with the broker (the guest speaks it) nor the
//! keys the broker releases (they never leave the guest).

use veil_common::{Classify, Kind};
pub mod firmware;
pub mod relay;

use std::{path::PathBuf, sync::Arc, time::Duration};

use sha2::{Digest, Sha256};
use veil_protocol::agent::{AttestRequest, AttestResponse};

use crate::{
    agent::{self, Agent, AgentError},
    config::{HandlerConfig, TeeKind},
    phases::Phases,
    sandbox::launch::HostService,
};

/// Kernel command-line key: the TEE the guest attests as (`sim`, `snp`, `tdx`).
pub const CMDLINE_TEE: &str = "veil.tee";
/// Kernel command-line key: hex SHA-256 of the broker's certificate (DER).
pub const CMDLINE_PIN: &str = "veil.kbs.pin";
/// Kernel command-line key prefix: `veil.kbs.res.<name>=<repo>/<type>/<tag>`.
pub const CMDLINE_RESOURCE: &str = "veil.kbs.res.";
/// Kernel command-line word: the guest refuses a scratch disk without
/// integrity.
pub const CMDLINE_SCRATCH_INTEGRITY: &str = "veil.scratch=integrity";

/// How long the agent may take to attest and fetch (TCG guests are slow).
const ATTEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a pod's attestation set-up is wrong.
#[derive(Debug, thiserror::Error)]
pub enum AttestSetupError {
    /// The broker certificate named in the config cannot be read.
    #[error("cannot read the key broker certificate {path}")]
    Cert {
        /// `kbs_cert`.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The broker certificate is not DER.
    #[error("key broker certificate {0} is not a DER certificate (use the cert.der of `veil-kbs init-tls`)")]
    CertFormat(PathBuf),
    /// A handler without a TEE names a broker.
    #[error("handler has kbs_cert set but tee = \"none\": only TEE pods attest")]
    NoTee,
    /// A broker is named without its address or without its certificate.
    #[error("kbs_address and kbs_cert must be set together")]
    Incomplete,
    /// A resource name or path that the guest would not accept.
    #[error("invalid kbs_resources entry {name:?} = {path:?} (names [a-z0-9-], paths repo/type/tag of [A-Za-z0-9_.-] without a leading dot)")]
    Resource {
        /// Resource name.
        name: String,
        /// Resource path.
        path: String,
    },
    /// The simulated TEE's keys cannot be loaded.
    #[error("simulated TEE keys (run `veil sim-ca init --dir {dir}`)")]
    SimKeys {
        /// `sim_ca_dir`.
        dir: PathBuf,
        /// Why.
        #[source]
        source: veil_verifier::sim_ca::SimCaError,
    },
}

impl Classify for AttestSetupError {
    fn kind(&self) -> Kind {
        match self {
            AttestSetupError::Cert { .. }
            | AttestSetupError::CertFormat(_)
            | AttestSetupError::NoTee
            | AttestSetupError::Incomplete
            | AttestSetupError::Resource { .. }
            | AttestSetupError::SimKeys { .. } => Kind::FailedPrecondition,
        }
    }
}

/// The TEE name the guest's `veil.tee=` takes, if the handler has a TEE.
pub fn tee_word(tee: TeeKind) -> Option<&'static str> {
    match tee {
        TeeKind::None => None,
        TeeKind::Sim => Some("sim"),
        TeeKind::Snp => Some("snp"),
        TeeKind::Tdx => Some("tdx"),
    }
}

/// True when the handler names a key broker (the pod then attests at start).
pub fn has_broker(h: &HandlerConfig) -> bool {
    !h.kbs_cert.as_os_str().is_empty()
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 32
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The one resource-path rule, shared with the guest client and the broker.
fn valid_path(p: &str) -> bool {
    p.parse::<veil_attestation::ResourcePath>().is_ok()
}

/// SHA-256 of the broker certificate named by `kbs_cert` (DER).
pub fn broker_pin(h: &HandlerConfig) -> Result<[u8; 32], AttestSetupError> {
    let der = std::fs::read(&h.kbs_cert).map_err(|source| AttestSetupError::Cert {
        path: h.kbs_cert.clone(),
        source,
    })?;
    // A DER certificate is a SEQUENCE; PEM text starts with '-'.
    if der.first() != Some(&0x30) {
        return Err(AttestSetupError::CertFormat(h.kbs_cert.clone()));
    }
    Ok(Sha256::digest(&der).into())
}

/// The kernel command-line words of the guest's attestation configuration,
/// in a fixed order (the measurement covers them): `veil.tee=…` for a TEE
/// handler, then, when it names a broker, `veil.kbs.pin=…` and one
/// `veil.kbs.res.<name>=<path>` per resource (sorted by name), and
/// `veil.scratch=integrity` when the scratch disk must have integrity. Empty
/// for a plain handler.
pub fn guest_cmdline(h: &HandlerConfig) -> Result<String, AttestSetupError> {
    let Some(tee) = tee_word(h.tee) else {
        if has_broker(h) {
            return Err(AttestSetupError::NoTee);
        }
        return Ok(String::new());
    };
    let mut words = vec![format!("{CMDLINE_TEE}={tee}")];
    let has_address = !h.kbs_address.is_empty();
    if has_broker(h) != has_address {
        return Err(AttestSetupError::Incomplete);
    }
    if has_broker(h) {
        words.push(format!("{CMDLINE_PIN}={}", hex::encode(broker_pin(h)?)));
        for (name, path) in &h.kbs_resources {
            if !valid_name(name) || !valid_path(path) {
                return Err(AttestSetupError::Resource {
                    name: name.clone(),
                    path: path.clone(),
                });
            }
            words.push(format!("{CMDLINE_RESOURCE}{name}={path}"));
        }
    }
    if h.scratch_integrity && h.scratch_disk_mib > 0 {
        words.push(CMDLINE_SCRATCH_INTEGRITY.to_string());
    }
    Ok(words.join(" "))
}

/// The services a pod of handler `h` offers its guest for attestation: the
/// simulated firmware for a `sim` handler (its keys are loaded now: a sim pod
/// with a broker and no keys does not boot), the broker relay when the
/// handler names a broker.
pub fn host_services(h: &HandlerConfig) -> Result<Vec<Arc<dyn HostService>>, AttestSetupError> {
    let mut out: Vec<Arc<dyn HostService>> = Vec::new();
    if h.tee == TeeKind::Sim {
        let fw = match firmware::SimFirmware::load(&h.sim_ca_dir) {
            Ok(fw) => fw,
            Err(source) if has_broker(h) => {
                return Err(AttestSetupError::SimKeys {
                    dir: h.sim_ca_dir.clone(),
                    source,
                })
            }
            // No broker configured: nothing will ask for a report, but if
            // something does, the firmware answers why it cannot.
            Err(source) => firmware::SimFirmware::unavailable(&h.sim_ca_dir, &source),
        };
        out.push(Arc::new(fw));
    }
    if has_broker(h) && h.tee != TeeKind::None {
        out.push(Arc::new(relay::KbsRelay::new(h.kbs_address.clone())));
    }
    Ok(out)
}

/// The host data a pod of `h` launches with for init-data `policy`: its
/// SHA-256 (SNP HOST_DATA, the simulated TEE) or SHA-384 (TDX MRCONFIGID);
/// `None` (zeros) without a policy or a TEE.
pub fn init_data_host_data(h: &HandlerConfig, policy: &[u8]) -> Option<Vec<u8>> {
    if policy.is_empty() {
        return None;
    }
    match h.tee {
        TeeKind::None => None,
        TeeKind::Tdx => Some(sha2::Sha384::digest(policy).to_vec()),
        TeeKind::Snp | TeeKind::Sim => Some(sha2::Sha256::digest(policy).to_vec()),
    }
}

/// Delivers the pod's policy to the agent, before anything it governs. A
/// confidential pod always gets one (empty: the agent's built-in
/// confidential default); a plain pod only when it has one.
pub async fn deliver_policy(
    agent: &Agent,
    h: &HandlerConfig,
    policy: &[u8],
) -> Result<(), AgentError> {
    if h.tee == TeeKind::None && policy.is_empty() {
        return Ok(());
    }
    let mut req = veil_protocol::agent::SetPolicyRequest::new();
    req.policy = policy.to_vec();
    agent::rpc(
        "SetPolicy",
        agent.sandbox.set_policy(agent::ctx(), &req).await,
    )?;
    tracing::info!(bytes = policy.len(), "pod policy delivered");
    Ok(())
}

/// Asks the agent to attest and fetch its resources, when the handler names
/// a broker; marks the `attested` phase. The broker's refusal comes back as
/// the agent's FAILED_PRECONDITION with the broker's reason.
pub async fn attest_pod(
    agent: &Agent,
    h: &HandlerConfig,
    phases: &Phases,
) -> Result<Option<AttestResponse>, AgentError> {
    if !has_broker(h) || h.tee == TeeKind::None {
        return Ok(None);
    }
    let r = agent::rpc(
        "Attest",
        agent
            .attestation
            .attest(
                ttrpc::context::with_timeout(ATTEST_TIMEOUT.as_nanos() as i64),
                &AttestRequest::new(),
            )
            .await,
    );
    let r = match r {
        Ok(r) => {
            crate::report::attestation("released", "");
            r
        }
        Err(e) => {
            let outcome = match e.kind() {
                Kind::FailedPrecondition | Kind::PermissionDenied => "refused",
                _ => "failed",
            };
            crate::report::attestation(outcome, &veil_common::error_chain(&e));
            return Err(e);
        }
    };
    phases.mark("attested");
    tracing::info!(
        tee = %r.tee,
        measurement = %r.measurement,
        resources = ?r.resources,
        guest_us = r.duration_us,
        "pod attested"
    );
    Ok(Some(r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn handler(name: &str) -> HandlerConfig {
        Config::default().handler(name).unwrap().clone()
    }

    #[test]
    fn plain_and_unconfigured_handlers_add_nothing_or_only_the_tee() {
        assert_eq!(guest_cmdline(&handler("veil")).unwrap(), "");
        for tee in ["sim", "snp", "tdx"] {
            let mut h = handler(&format!("veil-{tee}"));
            assert_eq!(
                guest_cmdline(&h).unwrap(),
                format!("veil.tee={tee} veil.scratch=integrity")
            );
            h.scratch_integrity = false;
            assert_eq!(guest_cmdline(&h).unwrap(), format!("veil.tee={tee}"));
            h.scratch_integrity = true;
            h.scratch_disk_mib = 0;
            assert_eq!(guest_cmdline(&h).unwrap(), format!("veil.tee={tee}"));
        }
        let mut plain = handler("veil");
        plain.scratch_integrity = true;
        assert_eq!(guest_cmdline(&plain).unwrap(), "");
        assert!(host_services(&handler("veil")).unwrap().is_empty());
    }

    #[test]
    fn a_broker_adds_the_pin_and_sorted_resources() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.der");
        std::fs::write(&cert, [0x30, 0x03, 0x02, 0x01, 0x01]).unwrap();
        let mut h = handler("veil-snp");
        h.kbs_cert = cert.clone();
        h.kbs_address = "10.0.0.1:8443".into();
        h.kbs_resources
            .insert("image-policy".into(), "default/policy/images".into());
        let line = guest_cmdline(&h).unwrap();
        assert_eq!(
            line,
            format!(
                "veil.tee=snp veil.kbs.pin={} veil.kbs.res.disk-key=default/key/disk veil.kbs.res.image-policy=default/policy/images veil.scratch=integrity",
                hex::encode(Sha256::digest([0x30, 0x03, 0x02, 0x01, 0x01]))
            )
        );
        let services = host_services(&h).unwrap();
        assert_eq!(services.len(), 1, "SNP: the relay only, no firmware");
        assert_eq!(services[0].port(), veil_protocol::KBS_RELAY_VSOCK_PORT);

        h.kbs_resources.insert("x".into(), "../key/disk".into());
        assert!(matches!(
            guest_cmdline(&h),
            Err(AttestSetupError::Resource { .. })
        ));
        h.kbs_resources.remove("x");
        h.kbs_address.clear();
        assert!(matches!(
            guest_cmdline(&h),
            Err(AttestSetupError::Incomplete)
        ));
        std::fs::write(&cert, b"-----BEGIN CERTIFICATE-----").unwrap();
        h.kbs_address = "10.0.0.1:8443".into();
        assert!(matches!(
            guest_cmdline(&h),
            Err(AttestSetupError::CertFormat(_))
        ));
        let mut plain = handler("veil");
        plain.kbs_cert = cert;
        assert!(matches!(
            guest_cmdline(&plain),
            Err(AttestSetupError::NoTee)
        ));
    }

    #[test]
    fn a_sim_pod_with_a_broker_needs_its_keys() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.der");
        std::fs::write(&cert, [0x30, 0x00]).unwrap();
        let mut h = handler("veil-sim");
        h.sim_ca_dir = dir.path().join("no-such-dir");
        // No broker: the pod boots; its firmware explains why it cannot sign.
        let s = host_services(&h).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].port(), veil_protocol::SIM_FIRMWARE_VSOCK_PORT);
        h.kbs_cert = cert;
        h.kbs_address = "127.0.0.1:1".into();
        assert!(matches!(
            host_services(&h),
            Err(AttestSetupError::SimKeys { .. })
        ));
        veil_verifier::sim_ca::init_sim_ca(&h.sim_ca_dir, false).unwrap();
        let ports: Vec<u32> = host_services(&h)
            .unwrap()
            .iter()
            .map(|s| s.port())
            .collect();
        assert_eq!(
            ports,
            [
                veil_protocol::SIM_FIRMWARE_VSOCK_PORT,
                veil_protocol::KBS_RELAY_VSOCK_PORT
            ]
        );
    }
}
