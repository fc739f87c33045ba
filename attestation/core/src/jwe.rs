//! JWE (RFC 7516, flattened JSON) with `ECDH-ES+A256KW` key agreement on P-256 and `A256GCM`
//! content encryption: how the broker hands a resource to the TEE key and how the guest opens it.
//!
//! Encryption: a fresh ephemeral P-256 key agrees with the TEE key (ECDH), Concat KDF (RFC 7518
//! §4.6, SHA-256, AlgorithmID = "ECDH-ES+A256KW", empty PartyU/PartyV, 256-bit output) gives the
//! key-wrapping key, AES-KW (RFC 3394) wraps a random 256-bit CEK, AES-256-GCM encrypts the
//! payload with the ASCII of the `protected` member as AAD. The ephemeral public key is the
//! protected header's `epk`.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use p256::elliptic_curve::sec1::{EncodedPoint, FromEncodedPoint, ToEncodedPoint};
use p256::{PublicKey, SecretKey};
use rand_core::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use zeroize::Zeroizing;

use veil_common::{Classify, Kind};

use crate::protocol::{TeePubKey, TEE_KEY_ALG};

/// Content-encryption algorithm.
pub const ENC: &str = "A256GCM";

/// Why a JWE could not be produced or opened.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum JweError {
    /// The TEE key is not an EC P-256 `ECDH-ES+A256KW` JWK.
    #[error("TEE public key is not an EC P-256 key for ECDH-ES+A256KW")]
    UnsupportedKey,
    /// The TEE key's coordinates are not a point on P-256.
    #[error("TEE public key is not a valid P-256 point")]
    InvalidPoint,
    /// The JWE header names algorithms other than ECDH-ES+A256KW / A256GCM.
    #[error("JWE header algorithms are not ECDH-ES+A256KW / A256GCM")]
    UnsupportedAlgorithm,
    /// A member is not base64url, or the header is not JSON.
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
            JweError::UnsupportedKey | JweError::InvalidPoint => Kind::InvalidArgument,
            JweError::UnsupportedAlgorithm => Kind::Unimplemented,
            JweError::Malformed(_) | JweError::Decrypt => Kind::DataLoss,
            JweError::Encrypt => Kind::Internal,
        }
    }
}

/// A flattened-JSON JWE, as the KBS `Response`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwe {
    /// base64url of the protected header JSON.
    pub protected: String,
    /// base64url of the wrapped CEK.
    pub encrypted_key: String,
    /// base64url of the 96-bit IV.
    pub iv: String,
    /// base64url of the ciphertext.
    pub ciphertext: String,
    /// base64url of the GCM tag.
    pub tag: String,
}

#[derive(Serialize, Deserialize)]
struct EpkJwk {
    crv: String,
    kty: String,
    x: String,
    y: String,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    enc: String,
    epk: EpkJwk,
}

/// The TEE public key as a P-256 point.
pub fn public_key_from_jwk(jwk: &TeePubKey) -> Result<PublicKey, JweError> {
    if jwk.kty != "EC" || jwk.crv != "P-256" || jwk.alg != TEE_KEY_ALG {
        return Err(JweError::UnsupportedKey);
    }
    point_from_xy(&jwk.x, &jwk.y)
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

/// A P-256 public key as a `TeePubKey` JWK.
pub fn jwk_from_public_key(pk: &PublicKey) -> TeePubKey {
    let ep = pk.to_encoded_point(false);
    TeePubKey {
        kty: "EC".into(),
        crv: "P-256".into(),
        alg: TEE_KEY_ALG.into(),
        x: B64URL.encode(ep.x().map(|x| x[..].to_vec()).unwrap_or_default()),
        y: B64URL.encode(ep.y().map(|y| y[..].to_vec()).unwrap_or_default()),
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
    let epk = jwk_from_public_key(&eph.public_key());
    let header = Header {
        alg: TEE_KEY_ALG.into(),
        enc: ENC.into(),
        epk: EpkJwk {
            crv: epk.crv,
            kty: epk.kty,
            x: epk.x,
            y: epk.y,
        },
    };
    let header_json = serde_json::to_vec(&header).map_err(|_| JweError::Encrypt)?;
    let protected = B64URL.encode(header_json);
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
                aad: protected.as_bytes(),
            },
        )
        .map_err(|_| JweError::Encrypt)?;
    let tag = ct.split_off(ct.len() - 16);
    Ok(Jwe {
        protected,
        encrypted_key: B64URL.encode(wrapped),
        iv: B64URL.encode(iv),
        ciphertext: B64URL.encode(ct),
        tag: B64URL.encode(tag),
    })
}

/// Decrypts a JWE with the TEE's private key.
pub fn decrypt(secret: &SecretKey, jwe: &Jwe) -> Result<Zeroizing<Vec<u8>>, JweError> {
    let header_json = B64URL
        .decode(&jwe.protected)
        .map_err(|_| JweError::Malformed("protected"))?;
    let header: Header =
        serde_json::from_slice(&header_json).map_err(|_| JweError::Malformed("protected"))?;
    if header.alg != TEE_KEY_ALG || header.enc != ENC {
        return Err(JweError::UnsupportedAlgorithm);
    }
    if header.epk.kty != "EC" || header.epk.crv != "P-256" {
        return Err(JweError::UnsupportedAlgorithm);
    }
    let epk = point_from_xy(&header.epk.x, &header.epk.y)?;
    let shared = p256::ecdh::diffie_hellman(secret.to_nonzero_scalar(), epk.as_affine());
    let kek = concat_kdf(shared.raw_secret_bytes());
    let wrapped = B64URL
        .decode(&jwe.encrypted_key)
        .map_err(|_| JweError::Malformed("encrypted_key"))?;
    let cek = Zeroizing::new(
        aes_kw::KekAes256::from(*kek)
            .unwrap_vec(&wrapped)
            .map_err(|_| JweError::Decrypt)?,
    );
    let iv = B64URL
        .decode(&jwe.iv)
        .map_err(|_| JweError::Malformed("iv"))?;
    let iv: [u8; 12] = iv.try_into().map_err(|_| JweError::Malformed("iv"))?;
    let mut ct = B64URL
        .decode(&jwe.ciphertext)
        .map_err(|_| JweError::Malformed("ciphertext"))?;
    let tag = B64URL
        .decode(&jwe.tag)
        .map_err(|_| JweError::Malformed("tag"))?;
    if tag.len() != 16 {
        return Err(JweError::Malformed("tag"));
    }
    ct.extend_from_slice(&tag);
    let cipher = Aes256Gcm::new_from_slice(cek.as_ref()).map_err(|_| JweError::Decrypt)?;
    cipher
        .decrypt(
            &Nonce::from(iv),
            Payload {
                msg: &ct,
                aad: jwe.protected.as_bytes(),
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
            (JweError::UnsupportedKey, Kind::InvalidArgument),
            (JweError::InvalidPoint, Kind::InvalidArgument),
            (JweError::UnsupportedAlgorithm, Kind::Unimplemented),
            (JweError::Malformed("iv"), Kind::DataLoss),
            (JweError::Decrypt, Kind::DataLoss),
            (JweError::Encrypt, Kind::Internal),
        ] {
            assert_eq!(e.kind(), k, "{e}");
        }
    }

    #[test]
    fn round_trip_and_tamper() {
        let sk = SecretKey::random(&mut rand_core::OsRng);
        let jwk = jwk_from_public_key(&sk.public_key());
        let jwe = encrypt(&jwk, b"disk key 0123456789").unwrap();
        assert_eq!(
            decrypt(&sk, &jwe).unwrap().as_slice(),
            b"disk key 0123456789"
        );
        let other = SecretKey::random(&mut rand_core::OsRng);
        assert_eq!(decrypt(&other, &jwe), Err(JweError::Decrypt));
        let mut t = jwe.clone();
        t.ciphertext = B64URL.encode(b"xxxxxxxxxxxxxxxxxxx");
        assert_eq!(decrypt(&sk, &t), Err(JweError::Decrypt));
        let mut bad = jwk.clone();
        bad.crv = "P-384".into();
        assert_eq!(encrypt(&bad, b"x"), Err(JweError::UnsupportedKey));
        let mut off_curve = jwk;
        off_curve.y = off_curve.x.clone();
        assert_eq!(encrypt(&off_curve, b"x"), Err(JweError::InvalidPoint));
    }
}
