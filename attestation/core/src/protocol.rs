//! The Trustee KBS protocol (RCAR) as Trustee's own `kbs-types` crate defines it: the payloads
//! are `kbs_types`' (re-exported here), this module adds what the protocol says around them —
//! the JCS canonical form, the runtime-data binding, the hash-algorithm negotiation and veil's
//! simulated TEE name, which `kbs_types::Tee` does not have.
//!
//! ```text
//! POST /kbs/v0/auth    Request     {"version":"0.4.0","tee":"snp","extra-params":{"supported-hash-algorithms":[..]}}
//!                   -> Challenge   {"nonce":"<b64>","extra-params":{"selected-hash-algorithm":"sha384"}}
//!                      + Set-Cookie: kbs-session-id=<id>
//! POST /kbs/v0/attest  Attestation {"init-data":{format,body}?,"runtime-data":{"nonce","tee-pubkey"},
//!                                   "tee-evidence":{"primary_evidence":{..},"additional_evidence":""}}
//!                   -> {"token":"<JWT>"}
//! GET  /kbs/v0/resource/<repo>/<type>/<tag>  (cookie or `Authorization: Bearer <token>`)
//!                   -> Response (flattened JWE) {"protected","encrypted_key","iv","ciphertext","tag"}
//! errors            -> ErrorInformation {"type":"...","detail":"..."}
//! ```
//!
//! `report_data` = H(JCS({"tee-pubkey", "nonce", "additional-evidence"})) zero-padded to 64
//! bytes, H the challenge's `selected-hash-algorithm` (SHA-384 when it says none), exactly as
//! Trustee's guest components compute it for the primary attester.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;
use veil_common::{Classify, Kind};

pub use kbs_types::{
    Attestation, Challenge, CompositeEvidence, ErrorInformation, HashAlgorithm, InitData, Request,
    Response, RuntimeData, TeePubKey,
};

use crate::tee::Tee;

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
/// The `kbs_types::Tee` that stands in for `veil-sim` while a request's shape is checked.
const SIM_STAND_IN: &str = "sample";

/// Why a protocol payload is malformed.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// JCS cannot represent a non-integer or out-of-range number in this subset.
    #[error("canonical JSON: numbers other than integers are not supported")]
    JcsNumber,
    /// A hash algorithm name is unknown or not a string.
    #[error("hash algorithm {0:?} is not supported (sha256, sha384, sha512, sm3)")]
    HashAlgorithm(String),
    /// The body is not JSON of the step's payload type.
    #[error("{what} is not a KBS {what} payload")]
    Json {
        /// Which payload (`Request`, `Attestation`, ...).
        what: &'static str,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The `tee` of a request names no TEE veil attests.
    #[error("TEE type {0:?} is not supported (snp, tdx, veil-sim)")]
    UnsupportedTee(String),
    /// A payload could not be encoded (should not happen).
    #[error("encoding a KBS {what} payload")]
    Encode {
        /// Which payload.
        what: &'static str,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

impl Classify for ProtocolError {
    fn kind(&self) -> Kind {
        match self {
            ProtocolError::JcsNumber | ProtocolError::Json { .. } => Kind::InvalidArgument,
            ProtocolError::HashAlgorithm(_) | ProtocolError::UnsupportedTee(_) => {
                Kind::Unimplemented
            }
            ProtocolError::Encode { .. } => Kind::Internal,
        }
    }
}

/// The successful `/attest` response: `{"token": "<JWT>"}`, as Trustee's broker answers
/// (`kbs_types` has no type for it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationToken {
    /// The attestation token.
    pub token: String,
}

/// A parsed `POST /kbs/v0/auth` request: `kbs_types::Request`'s shape, with veil's TEE names.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthRequest {
    /// Protocol version of the client.
    pub version: String,
    /// The TEE it attests as.
    pub tee: Tee,
    /// Extra parameters (supported hash algorithms).
    pub extra_params: Value,
}

impl AuthRequest {
    /// Parses a request body. Real TEEs are read as `kbs_types::Request`; `veil-sim`, which
    /// `kbs_types` cannot name, is read through the same type with only the name swapped.
    pub fn parse(body: &[u8]) -> Result<Self, ProtocolError> {
        let json = |source| ProtocolError::Json {
            what: "Request",
            source,
        };
        let mut value: Value = serde_json::from_slice(body).map_err(json)?;
        let simulated = value.get("tee").and_then(Value::as_str) == Some(Tee::VeilSim.as_str());
        if simulated {
            value["tee"] = Value::String(SIM_STAND_IN.into());
        }
        let req: Request = serde_json::from_value(value).map_err(json)?;
        let tee = if simulated {
            Tee::VeilSim
        } else {
            Tee::from_kbs(req.tee)
                .ok_or_else(|| ProtocolError::UnsupportedTee(req.tee.to_string()))?
        };
        Ok(AuthRequest {
            version: req.version,
            tee,
            extra_params: req.extra_params,
        })
    }

    /// The request body a client sends: `kbs_types::Request` serialised, with `veil-sim` as
    /// its TEE name for the simulated TEE.
    pub fn to_json(&self) -> Result<Vec<u8>, ProtocolError> {
        let encode = |source| ProtocolError::Encode {
            what: "Request",
            source,
        };
        let req = Request {
            version: self.version.clone(),
            tee: self.tee.to_kbs().unwrap_or(kbs_types::Tee::Sample),
            extra_params: self.extra_params.clone(),
        };
        let mut value = serde_json::to_value(&req).map_err(encode)?;
        if self.tee == Tee::VeilSim {
            value["tee"] = Value::String(Tee::VeilSim.as_str().into());
        }
        serde_json::to_vec(&value).map_err(encode)
    }
}

/// Parses an `/attest` body as `kbs_types::Attestation`.
pub fn parse_attestation(body: &[u8]) -> Result<Attestation, ProtocolError> {
    serde_json::from_slice(body).map_err(|source| ProtocolError::Json {
        what: "Attestation",
        source,
    })
}

/// The hash algorithm a challenge selects (SHA-384 when it says nothing).
pub fn selected_hash(extra_params: &Value) -> Result<HashAlgorithm, ProtocolError> {
    match extra_params.get(SELECTED_HASH_ALGORITHM) {
        None => Ok(HashAlgorithm::Sha384),
        Some(Value::String(s)) => s
            .parse()
            .map_err(|_| ProtocolError::HashAlgorithm(s.clone())),
        Some(other) => Err(ProtocolError::HashAlgorithm(other.to_string())),
    }
}

/// The names of every hash algorithm this side can compute, for `supported-hash-algorithms`.
pub fn supported_hash_names() -> Vec<String> {
    HashAlgorithm::list_all()
        .iter()
        .map(|a| a.as_ref().to_string())
        .collect()
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

/// The runtime data the primary evidence binds: `{"tee-pubkey", "nonce", "additional-evidence"}`.
pub fn primary_runtime_data(
    runtime: &RuntimeData,
    additional_evidence: &str,
) -> Result<Value, ProtocolError> {
    let key =
        serde_json::to_value(&runtime.tee_pubkey).map_err(|source| ProtocolError::Encode {
            what: "tee-pubkey",
            source,
        })?;
    Ok(serde_json::json!({
        "tee-pubkey": key,
        "nonce": runtime.nonce,
        "additional-evidence": additional_evidence,
    }))
}

/// The 64-byte `report_data` of the primary evidence: H(JCS(primary runtime data)), zero-padded.
pub fn report_data(
    runtime: &RuntimeData,
    additional_evidence: &str,
    alg: HashAlgorithm,
) -> Result<[u8; 64], ProtocolError> {
    let canonical = jcs(&primary_runtime_data(runtime, additional_evidence)?)?;
    let digest = alg.digest(&canonical);
    let mut out = [0u8; 64];
    out[..digest.len()].copy_from_slice(&digest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TeePubKey {
        TeePubKey::EC {
            crv: "P-256".into(),
            alg: TEE_KEY_ALG.into(),
            x: "xx".into(),
            y: "yy".into(),
        }
    }

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
    fn the_binding_covers_key_nonce_and_additional_evidence() {
        let rd = RuntimeData {
            nonce: "bm9uY2U=".into(),
            tee_pubkey: key(),
        };
        let v = primary_runtime_data(&rd, "").unwrap();
        assert_eq!(
            String::from_utf8(jcs(&v).unwrap()).unwrap(),
            r#"{"additional-evidence":"","nonce":"bm9uY2U=","tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"xx","y":"yy"}}"#
        );
        let r = report_data(&rd, "", HashAlgorithm::Sha384).unwrap();
        assert!(r[48..].iter().all(|&b| b == 0));
        assert_eq!(&r[..48], HashAlgorithm::Sha384.digest(&jcs(&v).unwrap()));
        assert_ne!(r, report_data(&rd, "{}", HashAlgorithm::Sha384).unwrap());
        assert_eq!(
            &report_data(&rd, "", HashAlgorithm::Sha512).unwrap()[..],
            &HashAlgorithm::Sha512.digest(&jcs(&v).unwrap())[..]
        );
    }

    /// The value the independent Python client (`attestation/testdata/kbs_client.py
    /// report-data`) computes for this nonce and key with Trustee's formula; `veil-kbs`'s
    /// `external_tools` test re-runs that computation.
    #[test]
    fn report_data_of_a_known_nonce_and_key() {
        let key = TeePubKey::EC {
            crv: "P-256".into(),
            alg: TEE_KEY_ALG.into(),
            x: "WbbLv0Ns8rTsxBRcnQNrNJmKNgVbM5D4ko6tDg2fBwc".into(),
            y: "rjJ3m1FQG2iNpVHlEnDH7jW8p5L6Ax2PuUnRzNvQcbM".into(),
        };
        let rd = RuntimeData {
            nonce: "cGVyLXNlc3Npb24gbm9uY2UsIDMyIGJ5dGVzIGxvbmcuLg==".into(),
            tee_pubkey: key,
        };
        assert_eq!(
            hex::encode(report_data(&rd, "", HashAlgorithm::Sha384).unwrap()),
            "aeda4fbf9057e87330a6d790f2edb6bd33259ae08078debb4692f1bb7854f402\
             990894be7faa9441056431e48d81c3d5"
                .to_string()
                + &"00".repeat(16)
        );
    }

    #[test]
    fn requests_keep_trustees_shape_and_veils_tee_names() {
        for tee in [Tee::Snp, Tee::Tdx, Tee::VeilSim] {
            let r = AuthRequest {
                version: PROTOCOL_VERSION.into(),
                tee,
                extra_params: serde_json::json!({ SUPPORTED_HASH_ALGORITHMS: ["sha384"] }),
            };
            let body = r.to_json().unwrap();
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["tee"], tee.as_str());
            assert_eq!(AuthRequest::parse(&body).unwrap(), r);
        }
        let sgx = br#"{"version":"0.4.0","tee":"sgx","extra-params":{}}"#;
        assert!(matches!(
            AuthRequest::parse(sgx),
            Err(ProtocolError::UnsupportedTee(t)) if t == "sgx"
        ));
        let bogus = br#"{"version":"0.4.0","tee":"bogus","extra-params":{}}"#;
        assert!(matches!(
            AuthRequest::parse(bogus),
            Err(ProtocolError::Json { .. })
        ));
    }

    #[test]
    fn hash_selection() {
        assert_eq!(
            selected_hash(&serde_json::json!({})).unwrap(),
            HashAlgorithm::Sha384
        );
        assert_eq!(
            selected_hash(&serde_json::json!({ SELECTED_HASH_ALGORITHM: "SHA256" })).unwrap(),
            HashAlgorithm::Sha256
        );
        assert!(selected_hash(&serde_json::json!({ SELECTED_HASH_ALGORITHM: 1 })).is_err());
        assert_eq!(
            supported_hash_names(),
            ["sha256", "sha384", "sha512", "sm3"]
        );
    }

    #[test]
    fn error_kinds() {
        let json = || serde_json::from_slice::<Value>(b"{").unwrap_err();
        for (e, k) in [
            (ProtocolError::JcsNumber, Kind::InvalidArgument),
            (
                ProtocolError::HashAlgorithm("md5".into()),
                Kind::Unimplemented,
            ),
            (
                ProtocolError::Json {
                    what: "Request",
                    source: json(),
                },
                Kind::InvalidArgument,
            ),
            (
                ProtocolError::UnsupportedTee("sgx".into()),
                Kind::Unimplemented,
            ),
            (
                ProtocolError::Encode {
                    what: "Request",
                    source: json(),
                },
                Kind::Internal,
            ),
        ] {
            assert_eq!(e.kind(), k, "{e}");
        }
    }
}
