//! TEE kinds as they appear on the wire (the `tee` field of the KBS `Request`).
//!
//! Owns the names only; what evidence each kind carries lives in [`crate::evidence`].

use serde::{Deserialize, Serialize};

/// A kind of trusted execution environment that can present evidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Tee {
    /// AMD SEV-SNP.
    #[serde(rename = "snp")]
    Snp,
    /// Intel TDX.
    #[serde(rename = "tdx")]
    Tdx,
    /// veil's simulated TEE: SEV-SNP report layout, signed by a simulated chip key.
    /// Never accepted unless a policy says `allow_simulated = true`.
    #[serde(rename = "veil-sim")]
    VeilSim,
}

impl Tee {
    /// The wire name (`snp`, `tdx`, `veil-sim`).
    pub fn as_str(self) -> &'static str {
        match self {
            Tee::Snp => "snp",
            Tee::Tdx => "tdx",
            Tee::VeilSim => "veil-sim",
        }
    }

    /// Parses a wire name.
    pub fn from_name(name: &str) -> Option<Tee> {
        match name {
            "snp" => Some(Tee::Snp),
            "tdx" => Some(Tee::Tdx),
            "veil-sim" => Some(Tee::VeilSim),
            _ => None,
        }
    }

    /// The `kbs_types` name of a real TEE (`kbs_types` has no simulated TEE of veil's).
    pub fn to_kbs(self) -> Option<kbs_types::Tee> {
        match self {
            Tee::Snp => Some(kbs_types::Tee::Snp),
            Tee::Tdx => Some(kbs_types::Tee::Tdx),
            Tee::VeilSim => None,
        }
    }

    /// The veil TEE a `kbs_types` TEE is, if veil attests it.
    pub fn from_kbs(tee: kbs_types::Tee) -> Option<Tee> {
        match tee {
            kbs_types::Tee::Snp => Some(Tee::Snp),
            kbs_types::Tee::Tdx => Some(Tee::Tdx),
            _ => None,
        }
    }

    /// True for the simulated TEE.
    pub fn is_simulated(self) -> bool {
        matches!(self, Tee::VeilSim)
    }
}

impl std::fmt::Display for Tee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_tees_have_trustees_names() {
        for tee in [Tee::Snp, Tee::Tdx] {
            let k = tee.to_kbs().unwrap();
            assert_eq!(k.to_string(), tee.as_str());
            assert_eq!(Tee::from_kbs(k), Some(tee));
        }
        assert_eq!(Tee::VeilSim.to_kbs(), None);
        assert_eq!(Tee::from_kbs(kbs_types::Tee::Sgx), None);
    }
}
