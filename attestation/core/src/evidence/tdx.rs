//! The Intel TDX quote (versions 4 and 5) as produced by the TD quoting enclave.
//!
//! Owns the structural parse: header, TD report body (TDX 1.0 or 1.5) and the bounds of the
//! signature data. The signature and its PCK chain are checked by `veil_verifier::verify::tdx`
//! through `dcap-qvl`.

use thiserror::Error;
use veil_common::{Classify, Kind};

/// Header length.
pub const HEADER_LEN: usize = 48;
/// TD report body of TDX 1.0.
pub const TD10_BODY_LEN: usize = 584;
/// TD report body of TDX 1.5.
pub const TD15_BODY_LEN: usize = 648;
/// `tee_type` of a TDX quote.
pub const TEE_TYPE_TDX: u32 = 0x81;
/// Attestation key type ECDSA-256 with P-256.
pub const ATT_KEY_ECDSA_P256: u16 = 2;
/// TD attribute bit 0: the TD is debuggable.
pub const TD_ATTR_DEBUG: u64 = 1;
/// Upper bound on a quote we accept (real quotes are ~5 KiB with the PCK chain).
pub const MAX_QUOTE_LEN: usize = 64 * 1024;
/// Smallest signature data: ECDSA signature, attestation key, QE report, QE report signature,
/// auth-data length and certification-data header.
const MIN_SIG_DATA_LEN: usize = 64 + 64 + 384 + 64 + 2 + 6;

/// Why bytes are not a well-formed TDX quote.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TdxParseError {
    /// Shorter than a header, or a field runs past the end.
    #[error("TDX quote is truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// Larger than we accept.
    #[error("TDX quote is {0} bytes, more than the limit")]
    TooLong(usize),
    /// Quote version other than 4 or 5.
    #[error("TDX quote version {0} is not supported (4 or 5 expected)")]
    UnsupportedVersion(u16),
    /// Not a TDX quote (e.g. an SGX one).
    #[error("quote TEE type {0:#x} is not TDX (0x81)")]
    NotTdx(u32),
    /// Attestation key type other than ECDSA P-256.
    #[error("TDX quote attestation key type {0} is not ECDSA-256 (2)")]
    UnsupportedKeyType(u16),
    /// v5 body type other than 2 (TD 1.0) or 3 (TD 1.5).
    #[error("TDX quote v5 body type {0} is not a TD report (2 or 3)")]
    UnsupportedBodyType(u16),
    /// v5 body size disagrees with its type.
    #[error("TDX quote v5 body size {size} does not match body type {body_type}")]
    BodySizeMismatch {
        /// Declared type.
        body_type: u16,
        /// Declared size.
        size: u32,
    },
    /// The signature data length is implausible or disagrees with the quote length.
    #[error(
        "TDX quote signature data length {declared} does not fit the {available} bytes that follow"
    )]
    SignatureDataLength {
        /// Declared length.
        declared: u32,
        /// Bytes available.
        available: usize,
    },
}

impl Classify for TdxParseError {
    fn kind(&self) -> Kind {
        match self {
            TdxParseError::Truncated { .. }
            | TdxParseError::TooLong(_)
            | TdxParseError::UnsupportedVersion(_)
            | TdxParseError::NotTdx(_)
            | TdxParseError::UnsupportedKeyType(_)
            | TdxParseError::UnsupportedBodyType(_)
            | TdxParseError::BodySizeMismatch { .. }
            | TdxParseError::SignatureDataLength { .. } => Kind::InvalidArgument,
        }
    }
}

/// The TD report fields veil checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdReport {
    /// TEE TCB SVN.
    pub tee_tcb_svn: [u8; 16],
    /// Measurement of the TDX module.
    pub mr_seam: [u8; 48],
    /// Signer of the TDX module.
    pub mr_signer_seam: [u8; 48],
    /// TD attributes (bit 0 = debug).
    pub td_attributes: u64,
    /// Extended features mask.
    pub xfam: u64,
    /// Build-time measurement of the TD (firmware).
    pub mr_td: [u8; 48],
    /// Host-chosen configuration ID (veil: the init-data digest).
    pub mr_config_id: [u8; 48],
    /// Owner ID.
    pub mr_owner: [u8; 48],
    /// Owner configuration.
    pub mr_owner_config: [u8; 48],
    /// Run-time measurement registers 0..3.
    pub rtmr: [[u8; 48]; 4],
    /// The 64 bytes bound by the guest.
    pub report_data: [u8; 64],
    /// TDX 1.5 only: second TEE TCB SVN.
    pub tee_tcb_svn2: Option<[u8; 16]>,
    /// TDX 1.5 only: service TD measurement.
    pub mr_servicetd: Option<[u8; 48]>,
}

impl TdReport {
    /// True when the TD was launched debuggable.
    pub fn debug(&self) -> bool {
        self.td_attributes & TD_ATTR_DEBUG != 0
    }
}

/// A structurally valid TDX quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdxQuote {
    /// Quote version (4 or 5).
    pub version: u16,
    /// QE vendor ID.
    pub qe_vendor_id: [u8; 16],
    /// The TD report.
    pub report: TdReport,
    /// Length of the signature data.
    pub signature_len: usize,
}

fn take(b: &[u8], off: usize, len: usize) -> Result<&[u8], TdxParseError> {
    let end = off.checked_add(len).ok_or(TdxParseError::Truncated {
        need: usize::MAX,
        have: b.len(),
    })?;
    b.get(off..end).ok_or(TdxParseError::Truncated {
        need: end,
        have: b.len(),
    })
}

fn fixed<const N: usize>(b: &[u8], off: usize) -> Result<[u8; N], TdxParseError> {
    let s = take(b, off, N)?;
    let mut v = [0u8; N];
    v.copy_from_slice(s);
    Ok(v)
}

fn le_u16(b: &[u8], off: usize) -> Result<u16, TdxParseError> {
    Ok(u16::from_le_bytes(fixed::<2>(b, off)?))
}

fn le_u32(b: &[u8], off: usize) -> Result<u32, TdxParseError> {
    Ok(u32::from_le_bytes(fixed::<4>(b, off)?))
}

fn le_u64(b: &[u8], off: usize) -> Result<u64, TdxParseError> {
    Ok(u64::from_le_bytes(fixed::<8>(b, off)?))
}

fn parse_td_report(body: &[u8], td15: bool) -> Result<TdReport, TdxParseError> {
    let mut rtmr = [[0u8; 48]; 4];
    for (i, r) in rtmr.iter_mut().enumerate() {
        *r = fixed(body, 328 + 48 * i)?;
    }
    Ok(TdReport {
        tee_tcb_svn: fixed(body, 0)?,
        mr_seam: fixed(body, 16)?,
        mr_signer_seam: fixed(body, 64)?,
        td_attributes: le_u64(body, 120)?,
        xfam: le_u64(body, 128)?,
        mr_td: fixed(body, 136)?,
        mr_config_id: fixed(body, 184)?,
        mr_owner: fixed(body, 232)?,
        mr_owner_config: fixed(body, 280)?,
        rtmr,
        report_data: fixed(body, 520)?,
        tee_tcb_svn2: if td15 { Some(fixed(body, 584)?) } else { None },
        mr_servicetd: if td15 { Some(fixed(body, 600)?) } else { None },
    })
}

impl TdxQuote {
    /// Parses a v4 or v5 TDX quote, checking every length against the buffer.
    pub fn parse(bytes: &[u8]) -> Result<Self, TdxParseError> {
        if bytes.len() > MAX_QUOTE_LEN {
            return Err(TdxParseError::TooLong(bytes.len()));
        }
        take(bytes, 0, HEADER_LEN)?;
        let version = le_u16(bytes, 0)?;
        let key_type = le_u16(bytes, 2)?;
        let tee_type = le_u32(bytes, 4)?;
        let qe_vendor_id = fixed(bytes, 12)?;
        if version != 4 && version != 5 {
            return Err(TdxParseError::UnsupportedVersion(version));
        }
        if tee_type != TEE_TYPE_TDX {
            return Err(TdxParseError::NotTdx(tee_type));
        }
        if key_type != ATT_KEY_ECDSA_P256 {
            return Err(TdxParseError::UnsupportedKeyType(key_type));
        }
        let (report, sig_off) = if version == 4 {
            let body = take(bytes, HEADER_LEN, TD10_BODY_LEN)?;
            (parse_td_report(body, false)?, HEADER_LEN + TD10_BODY_LEN)
        } else {
            let body_type = le_u16(bytes, HEADER_LEN)?;
            let size = le_u32(bytes, HEADER_LEN + 2)?;
            let (len, td15) = match body_type {
                2 => (TD10_BODY_LEN, false),
                3 => (TD15_BODY_LEN, true),
                other => return Err(TdxParseError::UnsupportedBodyType(other)),
            };
            if size as usize != len {
                return Err(TdxParseError::BodySizeMismatch { body_type, size });
            }
            let body = take(bytes, HEADER_LEN + 6, len)?;
            (parse_td_report(body, td15)?, HEADER_LEN + 6 + len)
        };
        let declared = le_u32(bytes, sig_off)?;
        let available = bytes.len() - (sig_off + 4);
        let sig_len = declared as usize;
        if sig_len < MIN_SIG_DATA_LEN || sig_len > available {
            return Err(TdxParseError::SignatureDataLength {
                declared,
                available,
            });
        }
        // Anything after the signature data must be zero padding from a fixed-size buffer.
        if bytes[sig_off + 4 + sig_len..].iter().any(|&b| b != 0) {
            return Err(TdxParseError::SignatureDataLength {
                declared,
                available,
            });
        }
        Ok(TdxQuote {
            version,
            qe_vendor_id,
            report,
            signature_len: sig_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A syntactically valid v4 quote with a zero signature (fails verification, parses).
    pub(crate) fn synthetic_v4(report_data: [u8; 64], attributes: u64) -> Vec<u8> {
        let mut q = vec![0u8; HEADER_LEN + TD10_BODY_LEN];
        q[0..2].copy_from_slice(&4u16.to_le_bytes());
        q[2..4].copy_from_slice(&2u16.to_le_bytes());
        q[4..8].copy_from_slice(&TEE_TYPE_TDX.to_le_bytes());
        q[HEADER_LEN + 120..HEADER_LEN + 128].copy_from_slice(&attributes.to_le_bytes());
        q[HEADER_LEN + 520..HEADER_LEN + 584].copy_from_slice(&report_data);
        let sig = vec![0u8; MIN_SIG_DATA_LEN];
        q.extend_from_slice(&(sig.len() as u32).to_le_bytes());
        q.extend_from_slice(&sig);
        q
    }

    #[test]
    fn parses_synthetic_and_rejects_truncation() {
        let q = synthetic_v4([7u8; 64], 1);
        let p = TdxQuote::parse(&q).unwrap();
        assert_eq!(p.report.report_data, [7u8; 64]);
        assert!(p.report.debug());
        for cut in [0, 10, 47, 48, 600, q.len() - 1] {
            assert!(TdxQuote::parse(&q[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn every_parse_error_is_invalid_argument() {
        for e in [
            TdxParseError::Truncated { need: 1, have: 0 },
            TdxParseError::TooLong(0),
            TdxParseError::UnsupportedVersion(0),
            TdxParseError::NotTdx(0),
            TdxParseError::UnsupportedKeyType(0),
            TdxParseError::UnsupportedBodyType(0),
            TdxParseError::BodySizeMismatch {
                body_type: 0,
                size: 0,
            },
            TdxParseError::SignatureDataLength {
                declared: 0,
                available: 0,
            },
        ] {
            assert_eq!(e.kind(), Kind::InvalidArgument, "{e}");
        }
    }

    #[test]
    fn rejects_sgx_and_unknown_versions() {
        let mut q = synthetic_v4([0; 64], 0);
        q[4] = 0;
        assert_eq!(TdxQuote::parse(&q), Err(TdxParseError::NotTdx(0)));
        let mut q = synthetic_v4([0; 64], 0);
        q[0] = 3;
        assert_eq!(
            TdxQuote::parse(&q),
            Err(TdxParseError::UnsupportedVersion(3))
        );
    }
}
