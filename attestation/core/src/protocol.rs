//! The Trustee KBS protocol (RCAR, version 0.4.0): JSON payloads, the JCS canonical form of the
//! runtime data and the `report_data` binding. Shared by the broker and the guest client.
//!
//! ```text
//! POST /kbs/v0/auth    Request     {"version":"0.4.0","tee":"snp","extra-params":{...}}
//!                   -> Challenge   {"nonce":"<b64>","extra-params":{"selected-hash-algorithm":"sha384"}}
//!                      + Set-Cookie: kbs-session-id=<id>
//! POST /kbs/v0/attest  Attestation {"init-data":{format,body}?,"runtime-data":{"nonce","tee-pubkey"},
//!                                   "tee-evidence":{...}}
//!                   -> {"token":"<JWT>"}
//! GET  /kbs/v0/resource/<repo>/<type>/<tag>  (cookie or `Authorization: Bearer <token>`)
//!                   -> JWE flattened JSON {"protected","encrypted_key","iv","ciphertext","tag"}
//! errors            -> {"type":"...","detail":"..."}
//! ```
//!
//! `report_data` = H(JCS(runtime-data)) zero-padded to 64 bytes, H = SHA-384 unless the challenge
//! selects another (`selected-hash-algorithm`), as Trustee's attesters do.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256, Sha384, Sha512};
use thiserror::Error;
use veil_common::{Classify, Kind};

/// The protocol version spoken.
pub const PROTOCOL_VERSION: &str = "0.4.0";
/// Session cookie name.
pub const SESSION_COOKIE: &str = "kbs-session-id";
/// Extra-params key a client uses to list the hash algorithms it supports.
pub const SUPPORTED_HASH_ALGORITHMS: &str = "supported-hash-algorithms";
/// Extra-params key the broker uses to select the runtime-data hash.
pub const SELECTED_HASH_ALGORITHM: &str = "selected-hash-algorithm";
/// JWE key-management algorithm veil uses for the TEE key.
pub const TEE_KEY_ALG: &str = "ECDH-ES+A256KW";
/// Largest request body the broker reads.
pub const MAX_BODY_LEN: usize = 256 * 1024;

/// Why a protocol payload is malformed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// JCS cannot represent a non-integer or out-of-range number in this subset.
    #[error("canonical JSON: numbers other than integers are not supported")]
    JcsNumber,
    /// Unknown hash algorithm name.
    #[error("hash algorithm {0:?} is not supported")]
    HashAlgorithm(String),
}

impl Classify for ProtocolError {
    fn kind(&self) -> Kind {
        match self {
            ProtocolError::JcsNumber => Kind::InvalidArgument,
            ProtocolError::HashAlgorithm(_) => Kind::Unimplemented,
        }
    }
}

/// The `Request` payload of `POST /kbs/v0/auth`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Protocol version of the client.
    pub version: String,
    /// TEE kind (`snp`, `tdx`, `veil-sim`).
    pub tee: String,
    /// Extra parameters (supported hash algorithms).
    #[serde(rename = "extra-params", default)]
    pub extra_params: Value,
}

/// The `Challenge` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Challenge {
    /// Freshness nonce (base64).
    pub nonce: String,
    /// Extra parameters (the selected hash algorithm).
    #[serde(rename = "extra-params", default)]
    pub extra_params: Value,
}

/// A TEE public key as a JWK (only EC P-256 is supported by veil).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeePubKey {
    /// Key type; `EC`.
    pub kty: String,
    /// Curve; `P-256`.
    pub crv: String,
    /// Algorithm; `ECDH-ES+A256KW`.
    pub alg: String,
    /// X coordinate, base64url without padding.
    pub x: String,
    /// Y coordinate, base64url without padding.
    pub y: String,
}

/// The runtime data the evidence binds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeData {
    /// The challenge nonce.
    pub nonce: String,
    /// The TEE's ephemeral public key.
    #[serde(rename = "tee-pubkey")]
    pub tee_pubkey: TeePubKey,
}

/// Init-data the host injected (its digest is in SNP HOST_DATA / TDX MRCONFIGID).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitData {
    /// Format, e.g. `toml`.
    pub format: String,
    /// The body.
    pub body: String,
}

/// The `Attestation` payload of `POST /kbs/v0/attest`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attestation {
    /// Optional init-data.
    #[serde(rename = "init-data", default, skip_serializing_if = "Option::is_none")]
    pub init_data: Option<InitData>,
    /// Nonce and TEE key.
    #[serde(rename = "runtime-data")]
    pub runtime_data: RuntimeData,
    /// TEE evidence (see [`crate::evidence`]).
    #[serde(rename = "tee-evidence")]
    pub tee_evidence: Value,
}

/// The successful `/attest` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationToken {
    /// A JWT (ES256) carrying the claims and the TEE key.
    pub token: String,
}

/// The error body the KBS returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInformation {
    /// Error kind URI.
    #[serde(rename = "type")]
    pub error_type: String,
    /// Human-readable detail (never secrets).
    pub detail: String,
}

/// Hash algorithm for the runtime-data binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HashAlgorithm {
    /// SHA-256.
    Sha256,
    /// SHA-384 (the default).
    #[default]
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashAlgorithm {
    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            HashAlgorithm::Sha256 => "sha256",
            HashAlgorithm::Sha384 => "sha384",
            HashAlgorithm::Sha512 => "sha512",
        }
    }

    /// Parses a wire name (case-insensitive).
    pub fn from_name(s: &str) -> Result<Self, ProtocolError> {
        match s.to_ascii_lowercase().as_str() {
            "sha256" => Ok(HashAlgorithm::Sha256),
            "sha384" => Ok(HashAlgorithm::Sha384),
            "sha512" => Ok(HashAlgorithm::Sha512),
            _ => Err(ProtocolError::HashAlgorithm(s.to_string())),
        }
    }

    /// Digest of `data`, zero-padded to 64 bytes.
    pub fn digest_padded(self, data: &[u8]) -> [u8; 64] {
        let d: Vec<u8> = match self {
            HashAlgorithm::Sha256 => Sha256::digest(data).to_vec(),
            HashAlgorithm::Sha384 => Sha384::digest(data).to_vec(),
            HashAlgorithm::Sha512 => Sha512::digest(data).to_vec(),
        };
        let mut out = [0u8; 64];
        out[..d.len()].copy_from_slice(&d);
        out
    }

    /// The algorithm a challenge selects (SHA-384 when it says nothing).
    pub fn from_challenge(extra_params: &Value) -> Result<Self, ProtocolError> {
        match extra_params.get(SELECTED_HASH_ALGORITHM) {
            None => Ok(HashAlgorithm::Sha384),
            Some(Value::String(s)) => Self::from_name(s),
            Some(other) => Err(ProtocolError::HashAlgorithm(other.to_string())),
        }
    }
}

fn jcs_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if (c as u32) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes())
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}

fn jcs_into(v: &Value, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.extend_from_slice(i.to_string().as_bytes());
            } else if let Some(u) = n.as_u64() {
                out.extend_from_slice(u.to_string().as_bytes());
            } else {
                return Err(ProtocolError::JcsNumber);
            }
        }
        Value::String(s) => jcs_string(s, out),
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                jcs_into(x, out)?;
            }
            out.push(b']');
        }
        Value::Object(m) => {
            // RFC 8785: members sorted by the UTF-16 code units of their names.
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                jcs_string(k, out);
                out.push(b':');
                if let Some(x) = m.get(k) {
                    jcs_into(x, out)?;
                }
            }
            out.push(b'}');
        }
    }
    Ok(())
}

/// RFC 8785 (JCS) canonical JSON of `v`, for the subset without non-integer numbers.
pub fn jcs(v: &Value) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::new();
    jcs_into(v, &mut out)?;
    Ok(out)
}

/// The 64-byte `report_data` that binds `runtime_data`: H(JCS(runtime_data)), zero-padded.
pub fn runtime_data_report_data(rd: &RuntimeData, alg: HashAlgorithm) -> [u8; 64] {
    // RuntimeData only holds strings, so JCS cannot fail; fall back to an impossible value.
    let v = serde_json::to_value(rd).unwrap_or(Value::Null);
    match jcs(&v) {
        Ok(bytes) => alg.digest_padded(&bytes),
        Err(_) => [0xFFu8; 64],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jcs_sorts_and_escapes() {
        let v: Value =
            serde_json::from_str(r#"{"b":1,"a":{"y":"\u0001\"","x":[true,null]}}"#).unwrap();
        assert_eq!(
            String::from_utf8(jcs(&v).unwrap()).unwrap(),
            r#"{"a":{"x":[true,null],"y":"\u0001\""},"b":1}"#
        );
        assert!(jcs(&serde_json::json!(1.5)).is_err());
    }

    #[test]
    fn error_kinds() {
        assert_eq!(ProtocolError::JcsNumber.kind(), Kind::InvalidArgument);
        assert_eq!(
            ProtocolError::HashAlgorithm("md5".into()).kind(),
            Kind::Unimplemented
        );
    }

    #[test]
    fn runtime_data_canonical_form() {
        let rd = RuntimeData {
            nonce: "bm9uY2U=".into(),
            tee_pubkey: TeePubKey {
                kty: "EC".into(),
                crv: "P-256".into(),
                alg: TEE_KEY_ALG.into(),
                x: "xx".into(),
                y: "yy".into(),
            },
        };
        let v = serde_json::to_value(&rd).unwrap();
        assert_eq!(
            String::from_utf8(jcs(&v).unwrap()).unwrap(),
            r#"{"nonce":"bm9uY2U=","tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"xx","y":"yy"}}"#
        );
        let rd384 = runtime_data_report_data(&rd, HashAlgorithm::Sha384);
        assert!(rd384[48..].iter().all(|&b| b == 0));
        assert_eq!(&rd384[..48], &Sha384::digest(jcs(&v).unwrap())[..]);
    }
}
