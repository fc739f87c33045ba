//! The simulated TEE's keys, "generated at install time": a simulated root (ECDSA P-384) and a
//! simulated chip key certified by it. `veil sim-ca init --dir DIR` writes:
//!
//! | file | mode | who needs it |
//! |---|---|---|
//! | `root.key.pem` | 0600 | nobody at run time (re-issuing chip certificates) |
//! | `root.pub.pem` | 0644 | the key broker (`veil-kbs --sim-root`) |
//! | `chip.key.pem` | 0600 | the shim's simulated firmware |
//! | `chip.cert.json` | 0644 | the shim (sent with every simulated report) |
//!
//! Keys are PKCS#8 / SPKI PEM. Files holding private keys are created with mode 0600.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use p384::ecdsa::{SigningKey, VerifyingKey};
use p384::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use thiserror::Error;
use veil_attestation::evidence::sim::{SimChipCert, SimEvidence};
use veil_common::{Classify, Kind};

use crate::sim_report::{issue_chip_cert, sign_sim_report};

/// Root private key file name.
pub const ROOT_KEY: &str = "root.key.pem";
/// Root public key file name.
pub const ROOT_PUB: &str = "root.pub.pem";
/// Chip private key file name.
pub const CHIP_KEY: &str = "chip.key.pem";
/// Chip certificate file name.
pub const CHIP_CERT: &str = "chip.cert.json";

/// Why the simulated CA could not be created or loaded.
#[derive(Debug, Error)]
pub enum SimCaError {
    /// A file could not be read or written.
    #[error("{path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The files already exist and `force` was not given.
    #[error("{0} already exists (refusing to overwrite keys)")]
    Exists(PathBuf),
    /// A key file is not a P-384 key in PEM.
    #[error("{0} is not a P-384 key in PEM")]
    Key(PathBuf),
    /// The chip certificate file is malformed.
    #[error("{0} is not a simulated chip certificate")]
    Cert(PathBuf),
}

impl Classify for SimCaError {
    fn kind(&self) -> Kind {
        match self {
            SimCaError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Kind::NotFound
            }
            SimCaError::Io { .. } => Kind::Internal,
            SimCaError::Exists(_) => Kind::AlreadyExists,
            SimCaError::Key(_) | SimCaError::Cert(_) => Kind::InvalidArgument,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SimCaError + '_ {
    move |source| SimCaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `data` to `path` with `mode`, creating it new (never following an existing file).
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), SimCaError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    f.write_all(data).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// The simulated CA's paths in one directory.
#[derive(Debug, Clone)]
pub struct SimCaFiles {
    /// Directory.
    pub dir: PathBuf,
}

impl SimCaFiles {
    /// Files under `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SimCaFiles { dir: dir.into() }
    }
    /// Root public key path.
    pub fn root_pub(&self) -> PathBuf {
        self.dir.join(ROOT_PUB)
    }
    /// Chip key path.
    pub fn chip_key(&self) -> PathBuf {
        self.dir.join(CHIP_KEY)
    }
    /// Chip certificate path.
    pub fn chip_cert(&self) -> PathBuf {
        self.dir.join(CHIP_CERT)
    }
}

/// Generates a root and a chip key, certifies the chip, writes the four files.
pub fn init_sim_ca(dir: &Path, force: bool) -> Result<SimCaFiles, SimCaError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let files = SimCaFiles::new(dir);
    for name in [ROOT_KEY, ROOT_PUB, CHIP_KEY, CHIP_CERT] {
        let p = dir.join(name);
        if p.exists() {
            if !force {
                return Err(SimCaError::Exists(p));
            }
            std::fs::remove_file(&p).map_err(io(&p))?;
        }
    }
    let root = SigningKey::random(&mut rand_core::OsRng);
    let chip = SigningKey::random(&mut rand_core::OsRng);
    let cert = issue_chip_cert(&root, chip.verifying_key());
    let pem = |k: &SigningKey, p: &Path| {
        k.to_pkcs8_pem(LineEnding::LF)
            .map(|z| z.as_bytes().to_vec())
            .map_err(|_| SimCaError::Key(p.to_path_buf()))
    };
    let root_key_path = dir.join(ROOT_KEY);
    write_new(&root_key_path, &pem(&root, &root_key_path)?, 0o600)?;
    let chip_key_path = files.chip_key();
    write_new(&chip_key_path, &pem(&chip, &chip_key_path)?, 0o600)?;
    let root_pub = root
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|_| SimCaError::Key(files.root_pub()))?;
    write_new(&files.root_pub(), root_pub.as_bytes(), 0o644)?;
    let cert_json =
        serde_json::to_vec_pretty(&cert).map_err(|_| SimCaError::Cert(files.chip_cert()))?;
    write_new(&files.chip_cert(), &cert_json, 0o644)?;
    Ok(files)
}

/// Loads a P-384 private key from PKCS#8 PEM.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, SimCaError> {
    let pem = std::fs::read_to_string(path).map_err(io(path))?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|_| SimCaError::Key(path.to_path_buf()))
}

/// Loads a P-384 public key from SPKI PEM.
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, SimCaError> {
    let pem = std::fs::read_to_string(path).map_err(io(path))?;
    VerifyingKey::from_public_key_pem(&pem).map_err(|_| SimCaError::Key(path.to_path_buf()))
}

/// Loads the chip certificate JSON.
pub fn load_chip_cert(path: &Path) -> Result<SimChipCert, SimCaError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&bytes).map_err(|_| SimCaError::Cert(path.to_path_buf()))
}

/// What the shim's simulated firmware loads once: the chip key and its certificate.
#[derive(Clone)]
pub struct SimChip {
    /// The chip signing key.
    pub key: SigningKey,
    /// Its certificate from the simulated root.
    pub cert: SimChipCert,
}

impl std::fmt::Debug for SimChip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimChip")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

impl SimChip {
    /// Loads `chip.key.pem` and `chip.cert.json` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, SimCaError> {
        let files = SimCaFiles::new(dir);
        Ok(SimChip {
            key: load_signing_key(&files.chip_key())?,
            cert: load_chip_cert(&files.chip_cert())?,
        })
    }

    /// A signed simulated report plus evidence JSON for the KBS `tee-evidence` field.
    pub fn evidence(
        &self,
        report_data: &[u8; 64],
        measurement: &[u8; 48],
        host_data: Option<&[u8; 32]>,
    ) -> serde_json::Value {
        let report = sign_sim_report(&self.key, report_data, measurement, host_data);
        serde_json::json!(SimEvidence::new(&report, self.cert.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_refuses_to_overwrite_and_errors_classify() {
        let d = tempfile::tempdir().unwrap();
        init_sim_ca(d.path(), false).unwrap();
        let exists = init_sim_ca(d.path(), false).unwrap_err();
        assert_eq!(exists.kind(), Kind::AlreadyExists);
        init_sim_ca(d.path(), true).unwrap();
        assert!(SimChip::load(d.path()).is_ok());
        let missing = SimChip::load(&d.path().join("none")).unwrap_err();
        assert_eq!(missing.kind(), Kind::NotFound);
        let other = SimCaError::Io {
            path: d.path().into(),
            source: std::io::Error::other("x"),
        };
        assert_eq!(other.kind(), Kind::Internal);
        std::fs::write(d.path().join(CHIP_CERT), b"{}").unwrap();
        let cert = SimChip::load(d.path()).unwrap_err();
        assert!(matches!(cert, SimCaError::Cert(_)));
        std::fs::write(d.path().join(CHIP_KEY), b"junk").unwrap();
        let key = SimChip::load(d.path()).unwrap_err();
        assert!(matches!(key, SimCaError::Key(_)));
        for e in [cert, key] {
            assert_eq!(e.kind(), Kind::InvalidArgument);
        }
    }
}
