//! Release policy (TOML): per resource, which verified guests may receive it.
//!
//! ```toml
//! [[resource]]
//! path = "default/key/disk"          # <repo>/<type>/<tag>; "<repo>/<type>/*" matches any tag
//! tee = ["snp", "tdx"]               # allowed TEE types (default: snp and tdx)
//! measurements = ["<96 hex>"]        # accepted launch measurements (SNP/sim MEASUREMENT, TDX MRTD)
//! reference_values = ["veil-prod"]   # names of registered reference values, also accepted
//! min_tcb = { bootloader = 3, tee = 0, snp = 8, microcode = 115 }   # SNP / simulated only
//! host_data = "<hex>"                # required init-data digest (SNP HOST_DATA / TDX MRCONFIGID)
//! rtmr = ["", "", "<96 hex>", ""]    # TDX only: expected RTMR0..3 ("" = any)
//! vmpl = [0]                         # SNP / simulated: accepted report VMPLs (default [0];
//!                                    # a guest under an SVSM asks at VMPL 1 or higher)
//! allow_simulated = false            # default false: simulated evidence never unlocks this
//! ```
//!
//! A resource with no matching `[[resource]]` entry is never released (default deny). Each check
//! that fails has its own [`PolicyError`] variant, which becomes the audit line's reason.

use serde::{Deserialize, Serialize};
use thiserror::Error;
use veil_attestation::evidence::snp::TcbVersion;
use veil_attestation::{ResourcePath, Tee};
use veil_common::{Classify, Kind};
use veil_verifier::reference::ReferenceValues;
use veil_verifier::Claims;

/// Why a policy file is invalid, or why a guest may not have a resource.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PolicyError {
    /// The TOML does not parse.
    #[error("policy is not valid TOML of the expected shape")]
    Parse(#[source] toml::de::Error),
    /// A `path` is not `<repo>/<type>/<tag>`.
    #[error("policy resource path {0:?} is not <repo>/<type>/<tag>")]
    BadPath(String),
    /// No policy entry covers the resource.
    #[error("no policy allows releasing this resource")]
    NoPolicy,
    /// Simulated evidence, and the policy does not set `allow_simulated = true`.
    #[error("simulated evidence is not allowed by this resource's policy")]
    SimulatedNotAllowed,
    /// The TEE type is not in the resource's list.
    #[error("TEE type {0} is not allowed for this resource")]
    TeeNotAllowed(Tee),
    /// The measurement is not among the reference values.
    #[error("measurement {0} is not among the reference values")]
    MeasurementNotInReferenceValues(String),
    /// A TCB component is below the minimum.
    #[error("TCB component {0} is below the policy minimum")]
    TcbBelowMinimum(&'static str),
    /// The evidence has no TCB but the policy sets a minimum.
    #[error("evidence carries no TCB but the policy sets a minimum")]
    TcbMissing,
    /// A TDX RTMR differs from the expected value.
    #[error("TDX RTMR{0} differs from the policy's reference value")]
    RtmrMismatch(usize),
    /// The report was requested from a VMPL the policy does not accept.
    #[error("report VMPL {0} is not among the policy's accepted VMPLs")]
    VmplNotAllowed(u32),
    /// Host data (init-data digest) differs from the required one.
    #[error("host data {0} differs from the required init-data digest")]
    HostDataMismatch(String),
}

impl Classify for PolicyError {
    fn kind(&self) -> Kind {
        match self {
            PolicyError::Parse(_) | PolicyError::BadPath(_) => Kind::InvalidArgument,
            PolicyError::NoPolicy
            | PolicyError::SimulatedNotAllowed
            | PolicyError::TeeNotAllowed(_)
            | PolicyError::MeasurementNotInReferenceValues(_)
            | PolicyError::TcbBelowMinimum(_)
            | PolicyError::TcbMissing
            | PolicyError::RtmrMismatch(_)
            | PolicyError::VmplNotAllowed(_)
            | PolicyError::HostDataMismatch(_) => Kind::PermissionDenied,
        }
    }
}

fn default_tees() -> Vec<Tee> {
    vec![Tee::Snp, Tee::Tdx]
}

fn default_vmpls() -> Vec<u32> {
    vec![0]
}

/// Policy for one resource (or one `repo/type/*` family).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcePolicy {
    /// `<repo>/<type>/<tag>` or `<repo>/<type>/*`.
    pub path: String,
    /// Allowed TEE types.
    #[serde(default = "default_tees")]
    pub tee: Vec<Tee>,
    /// Accepted measurements (lower-case hex).
    #[serde(default)]
    pub measurements: Vec<String>,
    /// Names of registered reference values whose measurements are accepted.
    #[serde(default)]
    pub reference_values: Vec<String>,
    /// Minimum TCB (SNP / simulated).
    #[serde(default)]
    pub min_tcb: Option<TcbVersion>,
    /// Required host data / MRCONFIGID (lower-case hex; shorter values are zero-padded).
    #[serde(default)]
    pub host_data: Option<String>,
    /// TDX: expected RTMR0..3, lower-case hex; an empty string accepts any value.
    #[serde(default)]
    pub rtmr: Vec<String>,
    /// SNP / simulated: the VMPLs a report may have been requested from. Default `[0]`.
    #[serde(default = "default_vmpls")]
    pub vmpl: Vec<u32>,
    /// Whether simulated evidence may unlock this resource. Default false.
    #[serde(default)]
    pub allow_simulated: bool,
}

/// The whole policy file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Resource entries; the first match wins, exact paths before wildcards.
    #[serde(default)]
    pub resource: Vec<ResourcePolicy>,
}

impl Policy {
    /// Parses and validates TOML.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let p: Policy = toml::from_str(text).map_err(PolicyError::Parse)?;
        for r in &p.resource {
            let parts: Vec<&str> = r.path.split('/').collect();
            let ok = parts.len() == 3
                && ResourcePath::valid_component(parts[0])
                && ResourcePath::valid_component(parts[1])
                && (parts[2] == "*" || ResourcePath::valid_component(parts[2]));
            if !ok {
                return Err(PolicyError::BadPath(r.path.clone()));
            }
        }
        Ok(p)
    }

    /// The entry for `path`: an exact match, else a `repo/type/*` match.
    pub fn for_resource(&self, path: &ResourcePath) -> Option<&ResourcePolicy> {
        let exact = path.to_string();
        let wildcard = format!("{}/{}/*", path.repo, path.kind);
        self.resource
            .iter()
            .find(|r| r.path == exact)
            .or_else(|| self.resource.iter().find(|r| r.path == wildcard))
    }
}

impl ResourcePolicy {
    /// Decides whether a guest with `claims` may receive the resource.
    pub fn evaluate(&self, claims: &Claims, refs: &ReferenceValues) -> Result<(), PolicyError> {
        if claims.tee.is_simulated() && !self.allow_simulated {
            return Err(PolicyError::SimulatedNotAllowed);
        }
        if !self.tee.contains(&claims.tee) {
            return Err(PolicyError::TeeNotAllowed(claims.tee));
        }
        let by_value = self.measurements.contains(&claims.measurement);
        let by_name = self.reference_values.iter().any(|name| {
            refs.by_name(name)
                .is_some_and(|r| r.tee == claims.tee && r.measurement == claims.measurement)
        });
        if !by_value && !by_name {
            return Err(PolicyError::MeasurementNotInReferenceValues(
                claims.measurement.clone(),
            ));
        }
        if let Some(v) = claims.vmpl {
            if !self.vmpl.contains(&v) {
                return Err(PolicyError::VmplNotAllowed(v));
            }
        }
        if let Some(min) = &self.min_tcb {
            let tcb = claims.tcb.as_ref().ok_or(PolicyError::TcbMissing)?;
            tcb.meets(min).map_err(PolicyError::TcbBelowMinimum)?;
        }
        for (i, want) in self.rtmr.iter().enumerate() {
            if want.is_empty() || claims.tee != Tee::Tdx {
                continue;
            }
            if claims.rtmrs.get(i) != Some(want) {
                return Err(PolicyError::RtmrMismatch(i));
            }
        }
        if let Some(want) = &self.host_data {
            let mut padded = want.to_ascii_lowercase();
            while padded.len() < claims.host_data.len() {
                padded.push('0');
            }
            if padded != claims.host_data {
                return Err(PolicyError::HostDataMismatch(claims.host_data.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(tee: Tee, m: &str) -> Claims {
        Claims {
            tee,
            measurement: m.into(),
            tcb: Some(TcbVersion {
                bootloader: 3,
                snp: 8,
                microcode: 115,
                ..Default::default()
            }),
            host_data: "00".repeat(32),
            rtmrs: vec![],
            platform: None,
            vmpl: Some(0),
            signing_key: None,
        }
    }

    #[test]
    fn default_denies_simulated_and_checks_each_rule() {
        let m = "11".repeat(48);
        let p = Policy::from_toml(&format!(
            "[[resource]]\npath = \"default/key/disk\"\ntee = [\"snp\", \"veil-sim\"]\nmeasurements = [\"{m}\"]\nmin_tcb = {{ bootloader = 3, tee = 0, snp = 9, microcode = 0 }}\n"
        ))
        .unwrap();
        let path = ResourcePath::new("default", "key", "disk").unwrap();
        let r = p.for_resource(&path).unwrap();
        let refs = ReferenceValues::default();
        assert_eq!(
            r.evaluate(&claims(Tee::VeilSim, &m), &refs),
            Err(PolicyError::SimulatedNotAllowed)
        );
        assert_eq!(
            r.evaluate(&claims(Tee::Tdx, &m), &refs),
            Err(PolicyError::TeeNotAllowed(Tee::Tdx))
        );
        assert!(matches!(
            r.evaluate(&claims(Tee::Snp, &"22".repeat(48)), &refs),
            Err(PolicyError::MeasurementNotInReferenceValues(_))
        ));
        assert_eq!(
            r.evaluate(&claims(Tee::Snp, &m), &refs),
            Err(PolicyError::TcbBelowMinimum("snp"))
        );
        let tdx = Policy::from_toml(&format!(
            "[[resource]]\npath = \"a/b/c\"\ntee = [\"tdx\"]\nmeasurements = [\"{m}\"]\nrtmr = [\"\", \"\", \"{}\"]\n",
            "33".repeat(48)
        ))
        .unwrap();
        let mut c = claims(Tee::Tdx, &m);
        c.rtmrs = vec!["00".repeat(48); 4];
        assert_eq!(
            tdx.resource[0].evaluate(&c, &refs),
            Err(PolicyError::RtmrMismatch(2))
        );
        c.rtmrs[2] = "33".repeat(48);
        assert_eq!(tdx.resource[0].evaluate(&c, &refs), Ok(()));
        // VMPL: 0 by default; an SVSM guest's VMPL 1 only where the policy says so.
        let mut svsm = claims(Tee::Snp, &m);
        svsm.vmpl = Some(1);
        let ok_tcb = "min_tcb = { bootloader = 3, tee = 0, snp = 8, microcode = 115 }";
        let default = Policy::from_toml(&format!(
            "[[resource]]\npath = \"a/b/c\"\nmeasurements = [\"{m}\"]\n{ok_tcb}\n"
        ))
        .unwrap();
        assert_eq!(
            default.resource[0].evaluate(&svsm, &refs),
            Err(PolicyError::VmplNotAllowed(1))
        );
        let svsm_policy = Policy::from_toml(&format!(
            "[[resource]]\npath = \"a/b/c\"\nmeasurements = [\"{m}\"]\nvmpl = [1]\n"
        ))
        .unwrap();
        assert_eq!(svsm_policy.resource[0].evaluate(&svsm, &refs), Ok(()));
        assert_eq!(
            svsm_policy.resource[0].evaluate(&claims(Tee::Snp, &m), &refs),
            Err(PolicyError::VmplNotAllowed(0))
        );
        assert!(Policy::from_toml("[[resource]]\npath = \"../x/y\"\n").is_err());
        assert!(Policy::from_toml("[[resource]]\npath = \"a/b/c\"\nbogus = 1\n").is_err());
    }

    #[test]
    fn error_kinds() {
        let parse = Policy::from_toml("[[resource]]\nbogus = 1\n").unwrap_err();
        assert!(matches!(parse, PolicyError::Parse(_)));
        for (e, k) in [
            (parse, Kind::InvalidArgument),
            (PolicyError::BadPath("x".into()), Kind::InvalidArgument),
            (PolicyError::NoPolicy, Kind::PermissionDenied),
            (PolicyError::SimulatedNotAllowed, Kind::PermissionDenied),
            (PolicyError::TeeNotAllowed(Tee::Tdx), Kind::PermissionDenied),
            (
                PolicyError::MeasurementNotInReferenceValues("00".into()),
                Kind::PermissionDenied,
            ),
            (PolicyError::TcbBelowMinimum("snp"), Kind::PermissionDenied),
            (PolicyError::TcbMissing, Kind::PermissionDenied),
            (PolicyError::RtmrMismatch(0), Kind::PermissionDenied),
            (PolicyError::VmplNotAllowed(1), Kind::PermissionDenied),
            (
                PolicyError::HostDataMismatch("00".into()),
                Kind::PermissionDenied,
            ),
        ] {
            assert_eq!(e.kind(), k, "{e}");
        }
    }
}
