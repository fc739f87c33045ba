//! JWE (RFC 7516, flattened JSON, as `kbs_types::Response`) with `ECDH-ES+A256KW` key agreement
//! on P-256 and `A256GCM` content encryption: how the broker hands a resource to the TEE key and
//! how the guest opens it.
//!
//! Encryption: a fresh ephemeral P-256 key agrees with the TEE key (ECDH), Concat KDF (RFC 7518
//! §4.6, SHA-256, AlgorithmID = "ECDH-ES+A256KW", empty PartyU/PartyV, 256-bit output) gives the
//! key-wrapping key, AES-KW (RFC 3394) wraps a random 256-bit CEK, AES-256-GCM encrypts the
//! payload. The ephemeral public key is the protected header's `epk`; the AAD is the encoded
//! protected header as `kbs_types::ProtectedHeader::generate_aad` computes it, which is what
//! Trustee's broker and guest components use.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use kbs_types::ProtectedHeader;
use p256::elliptic_curve::sec1::{EncodedPoint, FromEncodedPoint, ToEncodedPoint};
use p256::{PublicKey, SecretKey};
use rand_core::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use veil_common::{Classify, Kind};
use zeroize::Zeroizing;

use crate::protocol::{Response, TeePubKey, TEE_KEY_ALG};

/// A resource as the broker returns it: `kbs_types::Response`.
pub type Jwe = Response;

/// Content-encryption algorithm.
pub const ENC: &str = "A256GCM";

/// Why a JWE could not be produced or opened.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum JweError {
    /// The TEE key is not an EC key (`kty` RSA or AKP).
    #[error(
        "TEE public key type {0} is not supported: veil encrypts to EC P-256 keys (ECDH-ES+A256KW)"
    )]
    UnsupportedKeyType(&'static str),
    /// The TEE key is EC, but not P-256 for `ECDH-ES+A256KW`.
    #[error("TEE public key curve {crv:?} / algorithm {alg:?} is not supported (P-256 / ECDH-ES+A256KW)")]
    UnsupportedKey {
        /// The key's `crv`.
        crv: String,
        /// The key's `alg`.
        alg: String,
    },
    /// The TEE key's coordinates are not a point on P-256.
    #[error("TEE public key is not a valid P-256 point")]
    InvalidPoint,
    /// The JWE header names algorithms other than ECDH-ES+A256KW / A256GCM.
    #[error("JWE header algorithms are not ECDH-ES+A256KW / A256GCM")]
    UnsupportedAlgorithm,
    /// The JWE carries an `aad` member (not used by the KBS protocol).
    #[error("JWE with an aad member is not supported")]
    AadUnsupported,
    /// A member or the header's `epk` is malformed.
    #[error("JWE member {0} is malformed")]
    Malformed(&'static str),
    /// Key unwrap or authenticated decryption failed (wrong key or tampered JWE).
    #[error("JWE does not decrypt under this key (wrong key or tampered)")]
    Decrypt,
    /// Encryption failed (should not happen).
    #[error("JWE encryption failed")]
    Encrypt,
}

impl Classify for JweError {
    fn kind(&self) -> Kind {
        match self {
            JweError::UnsupportedKeyType(_) | JweError::UnsupportedKey { .. } => {
                Kind::Unimplemented
            }
            JweError::InvalidPoint => Kind::InvalidArgument,
            JweError::UnsupportedAlgorithm | JweError::AadUnsupported => Kind::Unimplemented,
            JweError::Malformed(_) | JweError::Decrypt => Kind::DataLoss,
            JweError::Encrypt => Kind::Internal,
        }
    }
}

/// The ephemeral key in the protected header.
#[derive(Serialize, Deserialize)]
struct EpkJwk {
    crv: String,
    kty: String,
    x: String,
    y: String,
}

/// The TEE public key as a P-256 point.
pub fn public_key_from_jwk(jwk: &TeePubKey) -> Result<PublicKey, JweError> {
    match jwk {
        TeePubKey::EC { crv, alg, x, y } => {
            if crv != "P-256" || alg != TEE_KEY_ALG {
                return Err(JweError::UnsupportedKey {
                    crv: crv.chars().take(32).collect(),
                    alg: alg.chars().take(32).collect(),
                });
            }
            point_from_xy(x, y)
        }
        TeePubKey::RSA { .. } => Err(JweError::UnsupportedKeyType("RSA")),
        TeePubKey::AKP { .. } => Err(JweError::UnsupportedKeyType("AKP")),
    }
}

fn point_from_xy(x: &str, y: &str) -> Result<PublicKey, JweError> {
    let x = B64URL.decode(x).map_err(|_| JweError::InvalidPoint)?;
    let y = B64URL.decode(y).map_err(|_| JweError::InvalidPoint)?;
    if x.len() != 32 || y.len() != 32 {
        return Err(JweError::InvalidPoint);
    }
    let ep = EncodedPoint::<p256::NistP256>::from_affine_coordinates(
        x.as_slice().into(),
        y.as_slice().into(),
        false,
    );
    Option::from(PublicKey::from_encoded_point(&ep)).ok_or(JweError::InvalidPoint)
}

fn xy(pk: &PublicKey) -> (String, String) {
    let ep = pk.to_encoded_point(false);
    (
        B64URL.encode(ep.x().map(|x| x[..].to_vec()).unwrap_or_default()),
        B64URL.encode(ep.y().map(|y| y[..].to_vec()).unwrap_or_default()),
    )
}

/// A P-256 public key as a `tee-pubkey` JWK.
pub fn jwk_from_public_key(pk: &PublicKey) -> TeePubKey {
    let (x, y) = xy(pk);
    TeePubKey::EC {
        crv: "P-256".into(),
        alg: TEE_KEY_ALG.into(),
        x,
        y,
    }
}

/// Concat KDF (RFC 7518 §4.6.2) for a 256-bit `ECDH-ES+A256KW` key-wrapping key.
fn concat_kdf(z: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut h = Sha256::new();
    h.update(1u32.to_be_bytes());
    h.update(z);
    h.update((TEE_KEY_ALG.len() as u32).to_be_bytes());
    h.update(TEE_KEY_ALG.as_bytes());
    h.update(0u32.to_be_bytes()); // PartyUInfo: empty
    h.update(0u32.to_be_bytes()); // PartyVInfo: empty
    h.update(256u32.to_be_bytes()); // SuppPubInfo: key length in bits
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&h.finalize());
    out
}

/// Encrypts `plaintext` to the TEE key.
pub fn encrypt(tee_key: &TeePubKey, plaintext: &[u8]) -> Result<Jwe, JweError> {
    let recipient = public_key_from_jwk(tee_key)?;
    let eph = p256::ecdh::EphemeralSecret::random(&mut rand_core::OsRng);
    let shared = eph.diffie_hellman(&recipient);
    let kek = concat_kdf(shared.raw_secret_bytes());
    let (x, y) = xy(&eph.public_key());
    let epk = serde_json::to_value(EpkJwk {
        crv: "P-256".into(),
        kty: "EC".into(),
        x,
        y,
    })
    .map_err(|_| JweError::Encrypt)?;
    let protected = ProtectedHeader {
        alg: TEE_KEY_ALG.into(),
        enc: ENC.into(),
        other_fields: [("epk".to_string(), epk)].into_iter().collect(),
    };
    let aad = protected.generate_aad().map_err(|_| JweError::Encrypt)?;
    let mut cek = Zeroizing::new([0u8; 32]);
    rand_core::OsRng.fill_bytes(cek.as_mut());
    let wrapped = aes_kw::KekAes256::from(*kek)
        .wrap_vec(cek.as_ref())
        .map_err(|_| JweError::Encrypt)?;
    let mut iv = [0u8; 12];
    rand_core::OsRng.fill_bytes(&mut iv);
    let cipher = Aes256Gcm::new_from_slice(cek.as_ref()).map_err(|_| JweError::Encrypt)?;
    let mut ct = cipher
        .encrypt(
            &Nonce::from(iv),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| JweError::Encrypt)?;
    let tag = ct.split_off(ct.len() - 16);
    Ok(Response {
        protected,
        encrypted_key: wrapped,
        aad: None,
        iv: iv.to_vec(),
        ciphertext: ct,
        tag,
    })
}

/// Decrypts a JWE with the TEE's private key.
pub fn decrypt(secret: &SecretKey, jwe: &Jwe) -> Result<Zeroizing<Vec<u8>>, JweError> {
    let header = &jwe.protected;
    if header.alg != TEE_KEY_ALG || header.enc != ENC {
        return Err(JweError::UnsupportedAlgorithm);
    }
    if jwe.aad.is_some() {
        return Err(JweError::AadUnsupported);
    }
    let epk: EpkJwk = header
        .other_fields
        .get("epk")
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
        .ok_or(JweError::Malformed("epk"))?;
    if epk.kty != "EC" || epk.crv != "P-256" {
        return Err(JweError::UnsupportedAlgorithm);
    }
    let epk = point_from_xy(&epk.x, &epk.y)?;
    let shared = p256::ecdh::diffie_hellman(secret.to_nonzero_scalar(), epk.as_affine());
    let kek = concat_kdf(shared.raw_secret_bytes());
    let cek = Zeroizing::new(
        aes_kw::KekAes256::from(*kek)
            .unwrap_vec(&jwe.encrypted_key)
            .map_err(|_| JweError::Decrypt)?,
    );
    let iv: [u8; 12] = jwe
        .iv
        .as_slice()
        .try_into()
        .map_err(|_| JweError::Malformed("iv"))?;
    if jwe.tag.len() != 16 {
        return Err(JweError::Malformed("tag"));
    }
    let mut ct = jwe.ciphertext.clone();
    ct.extend_from_slice(&jwe.tag);
    let aad = header
        .generate_aad()
        .map_err(|_| JweError::Malformed("protected"))?;
    let cipher = Aes256Gcm::new_from_slice(cek.as_ref()).map_err(|_| JweError::Decrypt)?;
    cipher
        .decrypt(
            &Nonce::from(iv),
            Payload {
                msg: &ct,
                aad: &aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| JweError::Decrypt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds() {
        for (e, k) in [
            (JweError::UnsupportedKeyType("RSA"), Kind::Unimplemented),
            (
                JweError::UnsupportedKey {
                    crv: "P-384".into(),
                    alg: TEE_KEY_ALG.into(),
                },
                Kind::Unimplemented,
            ),
            (JweError::InvalidPoint, Kind::InvalidArgument),
            (JweError::UnsupportedAlgorithm, Kind::Unimplemented),
            (JweError::AadUnsupported, Kind::Unimplemented),
            (JweError::Malformed("iv"), Kind::DataLoss),
            (JweError::Decrypt, Kind::DataLoss),
            (JweError::Encrypt, Kind::Internal),
        ] {
            assert_eq!(e.kind(), k, "{e}");
        }
    }

    #[test]
    fn round_trip_through_the_wire_form_and_tamper() {
        let sk = SecretKey::random(&mut rand_core::OsRng);
        let jwk = jwk_from_public_key(&sk.public_key());
        let jwe = encrypt(&jwk, b"disk key 0123456789").unwrap();
        // Through JSON, as it travels: the protected member is the header Trustee encodes.
        let wire = serde_json::to_string(&jwe).unwrap();
        let v: serde_json::Value = serde_json::from_str(&wire).unwrap();
        for member in ["protected", "encrypted_key", "iv", "ciphertext", "tag"] {
            assert!(v[member].is_string(), "{member}: {wire}");
        }
        let back: Jwe = serde_json::from_str(&wire).unwrap();
        assert_eq!(
            decrypt(&sk, &back).unwrap().as_slice(),
            b"disk key 0123456789"
        );
        let other = SecretKey::random(&mut rand_core::OsRng);
        assert_eq!(decrypt(&other, &back), Err(JweError::Decrypt));
        let mut t = back.clone();
        t.ciphertext[0] ^= 1;
        assert_eq!(decrypt(&sk, &t), Err(JweError::Decrypt));
        let mut t = back.clone();
        t.protected.enc = "A128GCM".into();
        assert_eq!(decrypt(&sk, &t), Err(JweError::UnsupportedAlgorithm));
        let mut t = back;
        t.aad = Some(b"x".to_vec());
        assert_eq!(decrypt(&sk, &t), Err(JweError::AadUnsupported));
    }

    #[test]
    fn only_p256_ec_keys_are_encrypted_to() {
        let sk = SecretKey::random(&mut rand_core::OsRng);
        let TeePubKey::EC { x, y, .. } = jwk_from_public_key(&sk.public_key()) else {
            unreachable!()
        };
        let p384 = TeePubKey::EC {
            crv: "P-384".into(),
            alg: TEE_KEY_ALG.into(),
            x: x.clone(),
            y,
        };
        assert!(matches!(
            encrypt(&p384, b"x"),
            Err(JweError::UnsupportedKey { .. })
        ));
        let rsa = TeePubKey::RSA {
            alg: "RSA-OAEP".into(),
            k_mod: "AQAB".into(),
            k_exp: "AQAB".into(),
        };
        assert!(matches!(
            encrypt(&rsa, b"x"),
            Err(JweError::UnsupportedKeyType("RSA"))
        ));
        let off_curve = TeePubKey::EC {
            crv: "P-256".into(),
            alg: TEE_KEY_ALG.into(),
            x: x.clone(),
            y: x,
        };
        assert!(matches!(
            encrypt(&off_curve, b"x"),
            Err(JweError::InvalidPoint)
        ));
    }
}
