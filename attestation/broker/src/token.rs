//! Attestation tokens: the `/attest` response's JWT (ES256), signed by a key the broker generates
//! at start. It carries the verified claims and the TEE key, so a client may present it as
//! `Authorization: Bearer <token>` instead of the session cookie.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use veil_attestation::protocol::TeePubKey;
use veil_common::{Classify, Kind};
use veil_verifier::Claims;

/// Why a bearer token was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not three base64url parts with JSON header and claims.
    #[error("token is malformed")]
    Malformed,
    /// The header is not ES256.
    #[error("token algorithm is not ES256")]
    Algorithm,
    /// The signature does not verify under this broker's key.
    #[error("token signature is invalid")]
    Signature,
    /// The token has expired.
    #[error("token expired")]
    Expired,
}

impl Classify for TokenError {
    fn kind(&self) -> Kind {
        match self {
            TokenError::Malformed | TokenError::Algorithm => Kind::InvalidArgument,
            TokenError::Signature | TokenError::Expired => Kind::PermissionDenied,
        }
    }
}

/// What a token says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenClaims {
    /// Issuer (`veil-kbs`).
    pub iss: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
    /// The verified evidence claims.
    pub claims: Claims,
    /// The TEE key resources are encrypted to.
    #[serde(rename = "tee-pubkey")]
    pub tee_pubkey: TeePubKey,
}

/// Signs and checks tokens.
pub struct TokenSigner {
    key: SigningKey,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner(..)")
    }
}

impl Default for TokenSigner {
    fn default() -> Self {
        Self::generate()
    }
}

impl TokenSigner {
    /// A fresh signing key.
    pub fn generate() -> Self {
        TokenSigner {
            key: SigningKey::random(&mut rand_core::OsRng),
        }
    }

    /// The verification key.
    pub fn verifying_key(&self) -> &VerifyingKey {
        self.key.verifying_key()
    }

    /// Issues a token.
    pub fn sign(&self, c: &TokenClaims) -> String {
        let header = B64URL.encode(br#"{"alg":"ES256","typ":"JWT"}"#);
        let body = B64URL.encode(serde_json::to_vec(c).unwrap_or_default());
        let input = format!("{header}.{body}");
        let sig: Signature = self.key.sign(input.as_bytes());
        format!("{input}.{}", B64URL.encode(sig.to_bytes()))
    }

    /// Checks a token's signature and expiry at `now`.
    pub fn verify(&self, token: &str, now: u64) -> Result<TokenClaims, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(b), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header: serde_json::Value =
            serde_json::from_slice(&B64URL.decode(h).map_err(|_| TokenError::Malformed)?)
                .map_err(|_| TokenError::Malformed)?;
        if header.get("alg").and_then(|a| a.as_str()) != Some("ES256") {
            return Err(TokenError::Algorithm);
        }
        let sig_bytes = B64URL.decode(s).map_err(|_| TokenError::Malformed)?;
        let sig = Signature::from_slice(&sig_bytes).map_err(|_| TokenError::Signature)?;
        self.key
            .verifying_key()
            .verify(format!("{h}.{b}").as_bytes(), &sig)
            .map_err(|_| TokenError::Signature)?;
        let c: TokenClaims =
            serde_json::from_slice(&B64URL.decode(b).map_err(|_| TokenError::Malformed)?)
                .map_err(|_| TokenError::Malformed)?;
        if c.exp <= now {
            return Err(TokenError::Expired);
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil_attestation::Tee;

    #[test]
    fn tokens_verify_until_they_expire_and_errors_classify() {
        let signer = TokenSigner::generate();
        let claims = TokenClaims {
            iss: "veil-kbs".into(),
            iat: 10,
            exp: 20,
            claims: Claims {
                tee: Tee::Snp,
                measurement: "00".into(),
                tcb: None,
                host_data: "00".into(),
                rtmrs: vec![],
                platform: None,
                vmpl: None,
                signing_key: None,
            },
            tee_pubkey: TeePubKey::EC {
                crv: "P-256".into(),
                alg: "ECDH-ES+A256KW".into(),
                x: "x".into(),
                y: "y".into(),
            },
        };
        let t = signer.sign(&claims);
        assert_eq!(signer.verify(&t, 19).unwrap().claims, claims.claims);
        let expired = signer.verify(&t, 20).unwrap_err();
        let other = TokenSigner::generate().verify(&t, 19).unwrap_err();
        let malformed = signer.verify("a.b", 0).unwrap_err();
        let alg = signer
            .verify(
                &format!("{}.e30.AA", B64URL.encode(br#"{"alg":"none"}"#)),
                0,
            )
            .unwrap_err();
        for (e, want, k) in [
            (expired, TokenError::Expired, Kind::PermissionDenied),
            (other, TokenError::Signature, Kind::PermissionDenied),
            (malformed, TokenError::Malformed, Kind::InvalidArgument),
            (alg, TokenError::Algorithm, Kind::InvalidArgument),
        ] {
            assert_eq!(e, want);
            assert_eq!(e.kind(), k, "{e}");
        }
    }
}
