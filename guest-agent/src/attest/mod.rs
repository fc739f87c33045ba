//! Remote attestation from inside the guest: prove to the key broker what
//! this VM is, and receive the pod's secrets (the scratch disk key, the image
//! policy) — which then never leave the guest.
//!
//! What the guest attests as, to which broker certificate and for which
//! resources comes only from its *measured* configuration: kernel
//! command-line words the launch measurement covers ([`GuestAttestConfig`]):
//!
//! | word | meaning |
//! |---|---|
//! | `veil.tee=sim\|snp\|tdx` | the attester: the shim's simulated firmware, SEV-SNP, TDX |
//! | `veil.kbs.pin=<64 hex>` | SHA-256 of the broker's TLS certificate (DER); nothing else is accepted |
//! | `veil.kbs.res.<name>=<repo>/<type>/<tag>` | a resource to fetch, e.g. `disk-key`, `image-policy` |
//!
//! The host chooses where the connection goes (the shim's relay, vsock host
//! port 1028, to an address in its config) and when to attest (the
//! `Attestation.Attest` RPC); it cannot choose the pin or the resources
//! without changing the measurement, and then the broker releases nothing.
//!
//! Module map: [`keys`] (the storage secrets: disk key, image policy),
//! [`tsm`] (configfs-tsm), [`snp`], [`tdx`], [`sim`] (the
//! attesters), [`relay`] (vsock to the host, the broker connector),
//! [`service`] (the ttrpc service). The protocol with the broker is
//! `veil_attestation::client`'s.

pub mod keys;
pub mod relay;
pub mod service;
pub mod sim;
pub mod snp;
pub mod tdx;
pub mod tsm;

use std::{
    collections::BTreeMap,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use veil_attestation::{
    client::{Attester, AttesterError, ClientError, Connector, KbsClient, Transport},
    evidence::Evidence,
    Tee,
};
use zeroize::Zeroizing;

use crate::status::{Classify, Kind};

/// Kernel command-line key of the TEE kind.
pub const CMDLINE_TEE: &str = "veil.tee";
/// Kernel command-line key of the broker certificate pin.
pub const CMDLINE_PIN: &str = "veil.kbs.pin";
/// Kernel command-line key prefix of a resource.
pub const CMDLINE_RESOURCE: &str = "veil.kbs.res.";
/// Kernel command-line word requiring an integrity-protected scratch disk
/// (`veil.scratch=integrity`): measured, so the host cannot drop it.
pub const CMDLINE_SCRATCH: &str = "veil.scratch";
/// The name the guest sends as TLS SNI and HTTP `Host` (the pin is what
/// authenticates the broker, not a name).
pub const BROKER_NAME: &str = "kbs";

/// A malformed attestation configuration on the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestConfigError {
    /// A key appears twice.
    #[error("kernel parameter {0} given twice")]
    Duplicate(String),
    /// An unknown `veil.kbs.` key.
    #[error("unknown kernel parameter {0}")]
    Unknown(String),
    /// A value that does not parse.
    #[error("bad value for kernel parameter {key}: {value:?}")]
    BadValue {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Broker words without `veil.tee`.
    #[error("veil.kbs.* kernel parameters without veil.tee")]
    NoTee,
    /// Resources without a pin.
    #[error("veil.kbs.res.* kernel parameters without veil.kbs.pin")]
    NoPin,
}

/// A broker resource path `repo/type/tag` (the one rule, shared with the broker).
pub use veil_attestation::ResourcePath;

/// The guest's measured attestation configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAttestConfig {
    /// The TEE to attest as.
    pub tee: Tee,
    /// SHA-256 of the broker certificate; `None`: no broker configured.
    pub pin: Option<[u8; 32]>,
    /// Resources to fetch, by name.
    pub resources: BTreeMap<String, ResourcePath>,
    /// The scratch disk must have integrity (`veil.scratch=integrity`).
    pub scratch_integrity: bool,
}

impl GuestAttestConfig {
    /// Parses the attestation words of a kernel command line. `Ok(None)`: the
    /// guest is not a TEE pod. Every problem is an error (never ignored).
    pub fn from_cmdline(cmdline: &str) -> Result<Option<Self>, AttestConfigError> {
        let mut tee = None;
        let mut pin = None;
        let mut resources = BTreeMap::new();
        let mut scratch_integrity = None;
        let mut any_kbs = false;
        let bad = |key: &str, value: &str| AttestConfigError::BadValue {
            key: key.into(),
            value: value.into(),
        };
        for word in cmdline.split_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                if word == CMDLINE_TEE || word == CMDLINE_SCRATCH || word.starts_with("veil.kbs.") {
                    return Err(bad(word, ""));
                }
                continue;
            };
            if key == CMDLINE_TEE {
                if tee.is_some() {
                    return Err(AttestConfigError::Duplicate(key.into()));
                }
                tee = Some(match value {
                    "sim" => Tee::VeilSim,
                    "snp" => Tee::Snp,
                    "tdx" => Tee::Tdx,
                    _ => return Err(bad(key, value)),
                });
            } else if key == CMDLINE_PIN {
                any_kbs = true;
                if pin.is_some() {
                    return Err(AttestConfigError::Duplicate(key.into()));
                }
                let mut p = [0u8; 32];
                hex::decode_to_slice(value, &mut p).map_err(|_| bad(key, value))?;
                pin = Some(p);
            } else if let Some(name) = key.strip_prefix(CMDLINE_RESOURCE) {
                any_kbs = true;
                let name_ok = !name.is_empty()
                    && name.len() <= 32
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                if !name_ok {
                    return Err(bad(key, value));
                }
                let path: ResourcePath = value.parse().map_err(|_| bad(key, value))?;
                if resources.insert(name.to_string(), path).is_some() {
                    return Err(AttestConfigError::Duplicate(key.into()));
                }
            } else if key == CMDLINE_SCRATCH {
                any_kbs = true;
                if value != "integrity" {
                    return Err(bad(key, value));
                }
                if scratch_integrity.replace(true).is_some() {
                    return Err(AttestConfigError::Duplicate(key.into()));
                }
            } else if key.starts_with("veil.kbs.") {
                return Err(AttestConfigError::Unknown(key.into()));
            }
        }
        let Some(tee) = tee else {
            return if any_kbs {
                Err(AttestConfigError::NoTee)
            } else {
                Ok(None)
            };
        };
        if pin.is_none() && !resources.is_empty() {
            return Err(AttestConfigError::NoPin);
        }
        Ok(Some(GuestAttestConfig {
            tee,
            pin,
            resources,
            scratch_integrity: scratch_integrity.unwrap_or(false),
        }))
    }
}

/// Why attestation or a resource failed.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The guest is not a TEE pod.
    #[error(
        "this guest is not configured for attestation (no veil.tee on its kernel command line)"
    )]
    NotConfigured,
    /// The measured configuration is malformed.
    #[error("the guest's attestation configuration is invalid")]
    Config(#[source] AttestConfigError),
    /// No broker is configured.
    #[error(
        "no key broker is configured for this guest (no veil.kbs.pin on its kernel command line)"
    )]
    NoBroker,
    /// The TEE's interface is missing or failed to open.
    #[error("the {tee} attester is not available: {reason}")]
    Attester {
        /// The TEE.
        tee: Tee,
        /// Why.
        reason: String,
    },
    /// The broker refused attestation or a resource.
    #[error("the key broker refused {what} (HTTP {status}): {reason}")]
    Refused {
        /// What was refused: `attestation` or the resource name.
        what: String,
        /// HTTP status.
        status: u16,
        /// The broker's reason.
        reason: String,
    },
    /// The resource is not one the guest's configuration names.
    #[error("resource '{0}' is not configured for this guest")]
    UnknownResource(String),
    /// Evidence, transport, TLS or the resource's JWE failed.
    #[error("attestation to the key broker failed")]
    Broker(#[source] ClientError),
    /// The evidence does not bind the policy in force.
    #[error("the launch does not bind the pod's policy: {0}; no secrets are fetched")]
    PolicyBinding(String),
}

impl Classify for AttestError {
    fn kind(&self) -> Kind {
        match self {
            AttestError::NotConfigured | AttestError::Config(_) | AttestError::NoBroker => {
                Kind::FailedPrecondition
            }
            AttestError::Refused { .. } => Kind::FailedPrecondition,
            AttestError::UnknownResource(_) => Kind::NotFound,
            AttestError::PolicyBinding(_) => Kind::PermissionDenied,
            AttestError::Attester { .. } | AttestError::Broker(_) => Kind::Internal,
        }
    }
}

/// What an attestation produced, without the secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// TEE attested as.
    pub tee: Tee,
    /// Launch measurement in the evidence presented (hex), if parsed.
    pub measurement: String,
    /// Names of the resources held.
    pub resources: Vec<String>,
    /// Attestation plus fetches.
    pub duration: Duration,
}

/// The secrets of one successful attestation. Zeroized on drop.
struct Attested {
    summary: Summary,
    secrets: BTreeMap<String, Zeroizing<Vec<u8>>>,
}

/// Makes a fresh connection to the broker.
pub type ConnectorFactory = Arc<dyn Fn() -> Box<dyn Connector> + Send + Sync>;

/// An attester that remembers the measurement in the evidence it produced.
struct Recording<'a> {
    inner: &'a dyn Attester,
    measurement: std::sync::Mutex<String>,
    host_data: std::sync::Mutex<Option<Vec<u8>>>,
}

impl Attester for Recording<'_> {
    fn tee(&self) -> Tee {
        self.inner.tee()
    }

    fn evidence<'b>(
        &'b self,
        report_data: [u8; 64],
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<serde_json::Value, AttesterError>> + Send + 'b>,
    > {
        Box::pin(async move {
            let ev = self.inner.evidence(report_data).await?;
            let parsed = Evidence::from_primary(self.inner.tee(), &ev).ok();
            let m = parsed
                .as_ref()
                .map(|e| e.measurement_hex())
                .unwrap_or_default();
            *self.measurement.lock().unwrap_or_else(|p| p.into_inner()) = m;
            *self.host_data.lock().unwrap_or_else(|p| p.into_inner()) =
                parsed.map(|e| e.host_data());
            Ok(ev)
        })
    }
}

/// The guest's attestation: its configuration, attester and broker
/// connection, and — once attested — the released secrets, held in memory
/// only (never on disk, never in a reply, never logged).
pub struct Attestation {
    config: Result<Option<GuestAttestConfig>, AttestConfigError>,
    attester: Result<Arc<dyn Attester>, String>,
    connect: ConnectorFactory,
    state: tokio::sync::Mutex<Option<Attested>>,
    /// The verified policy document, sent to the broker as init-data.
    init_data: std::sync::Mutex<Option<String>>,
    /// The policy in force (empty: the built-in default), whose digest the
    /// evidence's host data must match before any secret is fetched.
    policy_doc: std::sync::Mutex<Option<Vec<u8>>>,
}

impl std::fmt::Debug for Attestation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attestation")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Attestation {
    /// The guest's attestation from its kernel command line: the attester
    /// its `veil.tee` names (configfs-tsm under `/sys/kernel/config`, mounted
    /// here if needed; `/dev/sev-guest`; the shim's simulated firmware), the
    /// broker through the shim's vsock relay.
    pub fn from_cmdline(cmdline: &str) -> Self {
        let config = GuestAttestConfig::from_cmdline(cmdline);
        let attester = match &config {
            Ok(Some(c)) => system_attester(c.tee),
            _ => Err("not configured".to_string()),
        };
        let connect: ConnectorFactory =
            Arc::new(|| Box::new(relay::VsockRelay::default()) as Box<dyn Connector>);
        Self::new(config, attester, connect)
    }

    /// An attestation with explicit parts (tests, host mode).
    pub fn new(
        config: Result<Option<GuestAttestConfig>, AttestConfigError>,
        attester: Result<Arc<dyn Attester>, String>,
        connect: ConnectorFactory,
    ) -> Self {
        if let Ok(Some(c)) = &config {
            tracing::info!(
                tee = %c.tee,
                broker = c.pin.is_some(),
                resources = ?c.resources.keys().collect::<Vec<_>>(),
                "attestation configured"
            );
        }
        Attestation {
            config,
            attester,
            connect,
            state: tokio::sync::Mutex::new(None),
            init_data: std::sync::Mutex::new(None),
            policy_doc: std::sync::Mutex::new(None),
        }
    }

    /// Not a TEE guest: every call says so.
    pub fn disabled() -> Self {
        Self::new(
            Ok(None),
            Err("not configured".into()),
            Arc::new(|| Box::new(relay::VsockRelay::default()) as Box<dyn Connector>),
        )
    }

    /// The configuration, if the guest is a TEE pod with a valid one.
    pub fn config(&self) -> Option<&GuestAttestConfig> {
        self.config.as_ref().ok().and_then(|c| c.as_ref())
    }

    /// True when the guest is configured to fetch resources from a broker
    /// (a confidential pod).
    pub fn has_broker(&self) -> bool {
        self.config().is_some_and(|c| c.pin.is_some())
    }

    /// The host data the TEE bound at launch (SNP / simulated HOST_DATA,
    /// TDX MRCONFIGID), read from a fresh report over zero report data.
    pub async fn launch_host_data(&self) -> Result<Vec<u8>, AttestError> {
        let cfg = self.checked_config()?;
        let attester = self.attester(cfg)?;
        let failed = |reason: String| AttestError::Attester {
            tee: cfg.tee,
            reason,
        };
        let ev = attester
            .evidence([0u8; 64])
            .await
            .map_err(|e| failed(e.to_string()))?;
        let parsed = Evidence::from_primary(cfg.tee, &ev)
            .map_err(|e| failed(veil_common::error_chain(&e)))?;
        Ok(parsed.host_data())
    }

    /// Records the policy document in force: every attestation checks that
    /// the evidence's host data binds it before fetching anything.
    pub fn bind_policy(&self, doc: &[u8]) {
        *self.policy_doc.lock().unwrap_or_else(|p| p.into_inner()) = Some(doc.to_vec());
    }

    /// Sets the init-data sent with the attestation (the verified policy
    /// document), whose digest the broker checks against the host data.
    pub fn set_init_data(&self, doc: String) {
        *self.init_data.lock().unwrap_or_else(|p| p.into_inner()) = Some(doc);
    }

    /// Attests and fetches every configured resource, once; with `refresh`,
    /// again (the old secrets stay if that fails).
    pub async fn attest(&self, refresh: bool) -> Result<Summary, AttestError> {
        let mut state = self.state.lock().await;
        if let (Some(a), false) = (state.as_ref(), refresh) {
            return Ok(a.summary.clone());
        }
        let fresh = self.run().await?;
        let summary = fresh.summary.clone();
        *state = Some(fresh);
        Ok(summary)
    }

    /// Whether the guest's measured configuration names resource `name`
    /// (a malformed configuration is an error, never "no").
    pub fn names_resource(&self, name: &str) -> Result<bool, AttestError> {
        match &self.config {
            Err(e) => Err(AttestError::Config(e.clone())),
            Ok(None) => Ok(false),
            Ok(Some(c)) => Ok(c.resources.contains_key(name)),
        }
    }

    /// Whether the measured configuration requires an integrity-protected
    /// scratch disk. A malformed configuration requires it (and fails
    /// elsewhere first).
    pub fn requires_scratch_integrity(&self) -> bool {
        match &self.config {
            Err(_) => true,
            Ok(None) => false,
            Ok(Some(c)) => c.scratch_integrity,
        }
    }

    /// A released resource by name, attesting first if that has not happened.
    pub async fn resource(&self, name: &str) -> Result<Zeroizing<Vec<u8>>, AttestError> {
        let cfg = self.checked_config()?;
        if !cfg.resources.contains_key(name) {
            return Err(AttestError::UnknownResource(name.to_string()));
        }
        self.attest(false).await?;
        let state = self.state.lock().await;
        state
            .as_ref()
            .and_then(|a| a.secrets.get(name).cloned())
            .ok_or_else(|| AttestError::UnknownResource(name.to_string()))
    }

    /// The TEE's attester, or why there is none.
    fn attester(&self, cfg: &GuestAttestConfig) -> Result<&Arc<dyn Attester>, AttestError> {
        self.attester
            .as_ref()
            .map_err(|reason| AttestError::Attester {
                tee: cfg.tee,
                reason: reason.clone(),
            })
    }

    fn checked_config(&self) -> Result<&GuestAttestConfig, AttestError> {
        match &self.config {
            Err(e) => Err(AttestError::Config(e.clone())),
            Ok(None) => Err(AttestError::NotConfigured),
            Ok(Some(c)) => Ok(c),
        }
    }

    async fn run(&self) -> Result<Attested, AttestError> {
        let cfg = self.checked_config()?;
        let pin = cfg.pin.ok_or(AttestError::NoBroker)?;
        let attester = self.attester(cfg)?;
        let started = Instant::now();
        let recording = Recording {
            inner: attester.as_ref(),
            measurement: std::sync::Mutex::new(String::new()),
            host_data: std::sync::Mutex::new(None),
        };
        let mut client = KbsClient::new(
            (self.connect)(),
            Transport::TlsSha256 {
                cert_sha256: pin,
                server_name: BROKER_NAME.into(),
            },
            BROKER_NAME,
        )
        .map_err(AttestError::Broker)?;
        let init_data = self
            .init_data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(doc) = init_data {
            client = client.with_init_data(doc);
        }
        let refused = |what: &str| {
            let what = what.to_string();
            move |e| match e {
                ClientError::Refused { status, detail } => AttestError::Refused {
                    what,
                    status,
                    reason: detail,
                },
                other => AttestError::Broker(other),
            }
        };
        client
            .attest(&recording)
            .await
            .map_err(refused("attestation"))?;
        self.check_policy_binding(cfg.tee, &recording)?;
        let mut secrets = BTreeMap::new();
        for (name, path) in &cfg.resources {
            let v = client
                .get_resource(&path.repo, &path.kind, &path.tag)
                .await
                .map_err(refused(name))?;
            secrets.insert(name.clone(), v);
        }
        let measurement = recording
            .measurement
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let summary = Summary {
            tee: cfg.tee,
            measurement,
            resources: secrets.keys().cloned().collect(),
            duration: started.elapsed(),
        };
        tracing::info!(
            tee = %summary.tee,
            measurement = %summary.measurement,
            resources = ?summary.resources,
            ms = summary.duration.as_millis() as u64,
            "attested to the key broker"
        );
        Ok(Attested { summary, secrets })
    }
}

impl Attestation {
    /// The evidence just presented must bind the policy in force (its
    /// digest, or zeros for the built-in default): a host that launched the
    /// pod for one policy and delivered another gets no secrets.
    fn check_policy_binding(&self, tee: Tee, rec: &Recording<'_>) -> Result<(), AttestError> {
        // Before SetPolicy nothing can run (the gate refuses), so secrets
        // fetched then are held for the built-in default, whose host data
        // is zeros; a policy delivered later must match the launch anyway.
        let doc = self
            .policy_doc
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        let found = rec
            .host_data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| AttestError::PolicyBinding("the evidence did not parse".into()))?;
        let want = crate::policy::gate::expected_host_data(tee, &doc, found.len());
        if want != found {
            return Err(AttestError::PolicyBinding(format!(
                "the evidence's host data {} is not {} ({} policy in force)",
                hex::encode(&found),
                hex::encode(&want),
                if doc.is_empty() {
                    "the built-in default"
                } else {
                    "the delivered"
                }
            )));
        }
        Ok(())
    }
}

/// Where configfs is mounted in the guest.
const CONFIGFS: &str = "/sys/kernel/config";

/// Mounts configfs if the kernel has it and it is not mounted (TEE kernels).
fn ensure_configfs() {
    let tsm = Path::new(CONFIGFS).join("tsm");
    if tsm.exists() || !Path::new(CONFIGFS).is_dir() {
        return;
    }
    if let Err(e) = nix::mount::mount(
        Some("configfs"),
        CONFIGFS,
        Some("configfs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        None::<&str>,
    ) {
        tracing::debug!(error = %e, "cannot mount configfs");
    }
}

/// The attester of a real guest for `tee`.
fn system_attester(tee: Tee) -> Result<Arc<dyn Attester>, String> {
    let tsm_root = Path::new(tsm::DEFAULT_ROOT);
    match tee {
        Tee::VeilSim => Ok(Arc::new(sim::SimAttester::vsock())),
        Tee::Snp => {
            ensure_configfs();
            snp::SnpAttester::system(tsm_root, Path::new(snp::SEV_GUEST_DEVICE))
                .map(|a| Arc::new(a) as Arc<dyn Attester>)
                .map_err(|e| crate::error_chain(&e))
        }
        Tee::Tdx => {
            ensure_configfs();
            tdx::TdxAttester::system(tsm_root)
                .map(|a| Arc::new(a) as Arc<dyn Attester>)
                .map_err(|e| crate::error_chain(&e))
        }
    }
}

#[cfg(test)]
mod tests;
