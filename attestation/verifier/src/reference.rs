//! Reference values: the measurements a security officer expects, as JSON that `veil measure`
//! writes and the broker loads (file or admin API).
//!
//! ```json
//! {
//!   "version": 1,
//!   "reference_values": [
//!     { "name": "veil-sim-default", "tee": "veil-sim",
//!       "measurement": "<96 hex digits>",
//!       "inputs": { "cmdline": "console=hvc0", "vcpus": 1, ... } }
//!   ]
//! }
//! ```
//!
//! `inputs` is informational (what was measured); only `tee` and `measurement` are matched.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use veil_attestation::Tee;
use veil_common::{Classify, Kind};

/// Current file format version.
pub const REFERENCE_VALUES_VERSION: u32 = 1;

/// Why reference values could not be loaded.
#[derive(Debug, Error)]
pub enum ReferenceError {
    /// The file could not be read or written.
    #[error("reference values file {path}")]
    Io {
        /// The path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Not valid reference-values JSON.
    #[error("reference values are not valid JSON of the expected shape")]
    Json(#[source] serde_json::Error),
    /// Unknown format version.
    #[error("reference values version {0} is not supported")]
    Version(u32),
    /// A measurement is not hex of the right length for its TEE.
    #[error("reference value {name:?}: measurement is not {expected} hex bytes")]
    Measurement {
        /// The entry name.
        name: String,
        /// Expected length in bytes.
        expected: usize,
    },
}

impl Classify for ReferenceError {
    fn kind(&self) -> Kind {
        match self {
            ReferenceError::Io { .. } => Kind::Internal,
            ReferenceError::Json(_)
            | ReferenceError::Version(_)
            | ReferenceError::Measurement { .. } => Kind::InvalidArgument,
        }
    }
}

/// One expected measurement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceValue {
    /// A name policies can refer to.
    pub name: String,
    /// The TEE kind this measurement is for.
    pub tee: Tee,
    /// Lower-case hex (SNP / simulated: 48 bytes; TDX: MRTD, 48 bytes).
    pub measurement: String,
    /// What was measured (informational).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, serde_json::Value>,
}

/// A set of reference values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceValues {
    /// Format version ([`REFERENCE_VALUES_VERSION`]).
    pub version: u32,
    /// The values.
    pub reference_values: Vec<ReferenceValue>,
}

impl Default for ReferenceValues {
    fn default() -> Self {
        ReferenceValues {
            version: REFERENCE_VALUES_VERSION,
            reference_values: Vec::new(),
        }
    }
}

impl ReferenceValues {
    /// Parses and validates JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ReferenceError> {
        let v: ReferenceValues = serde_json::from_slice(bytes).map_err(ReferenceError::Json)?;
        if v.version != REFERENCE_VALUES_VERSION {
            return Err(ReferenceError::Version(v.version));
        }
        for r in &v.reference_values {
            let ok = hex::decode(&r.measurement)
                .map(|b| b.len() == 48)
                .unwrap_or(false)
                && r.measurement.chars().all(|c| !c.is_ascii_uppercase());
            if !ok {
                return Err(ReferenceError::Measurement {
                    name: r.name.clone(),
                    expected: 48,
                });
            }
        }
        Ok(v)
    }

    /// Loads a file; a missing file is an empty set.
    pub fn load(path: &Path) -> Result<Self, ReferenceError> {
        match std::fs::read(path) {
            Ok(b) => Self::from_json(&b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ReferenceError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Adds values, replacing entries with the same name.
    pub fn merge(&mut self, other: ReferenceValues) {
        for v in other.reference_values {
            self.reference_values.retain(|x| x.name != v.name);
            self.reference_values.push(v);
        }
    }

    /// The entry whose TEE and measurement match, if any.
    pub fn find(&self, tee: Tee, measurement_hex: &str) -> Option<&ReferenceValue> {
        self.reference_values
            .iter()
            .find(|r| r.tee == tee && r.measurement == measurement_hex)
    }

    /// The entry with this name.
    pub fn by_name(&self, name: &str) -> Option<&ReferenceValue> {
        self.reference_values.iter().find(|r| r.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_measurements() {
        let good = format!(
            r#"{{"version":1,"reference_values":[{{"name":"a","tee":"snp","measurement":"{}"}}]}}"#,
            "ab".repeat(48)
        );
        let v = ReferenceValues::from_json(good.as_bytes()).unwrap();
        assert!(v.find(Tee::Snp, &"ab".repeat(48)).is_some());
        assert!(v.find(Tee::VeilSim, &"ab".repeat(48)).is_none());
        let short = good.replace(&"ab".repeat(48), "abcd");
        assert!(matches!(
            ReferenceValues::from_json(short.as_bytes()),
            Err(ReferenceError::Measurement { .. })
        ));
        let upper = good.replace(&"ab".repeat(48), &"AB".repeat(48));
        assert!(ReferenceValues::from_json(upper.as_bytes()).is_err());
    }

    #[test]
    fn error_kinds() {
        let json = ReferenceValues::from_json(b"{").unwrap_err();
        let version =
            ReferenceValues::from_json(br#"{"version":9,"reference_values":[]}"#).unwrap_err();
        let io = ReferenceError::Io {
            path: "x".into(),
            source: std::io::Error::other("x"),
        };
        let m = ReferenceError::Measurement {
            name: "a".into(),
            expected: 48,
        };
        for (e, k) in [
            (io, Kind::Internal),
            (json, Kind::InvalidArgument),
            (version, Kind::InvalidArgument),
            (m, Kind::InvalidArgument),
        ] {
            assert_eq!(e.kind(), k, "{e}");
        }
    }
}
