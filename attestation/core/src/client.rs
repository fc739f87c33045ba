//! The guest side of the KBS protocol: an RCAR client with an ephemeral P-256 TEE key, and the
//! JWE decryption of released resources. Used by `veil-agent`; the evidence itself comes from an
//! [`Attester`] the agent supplies (SNP configfs-tsm / `/dev/sev-guest`, TDX configfs-tsm,
//! or the shim's simulated firmware over vsock).
//!
//! The transport is HTTP/1.1 over a stream the caller connects ([`Connector`]): TCP to the
//! broker, or a vsock relay through the shim (which only relays bytes). TLS runs end to end from
//! the guest and accepts exactly one certificate: the broker's, pinned ([`Transport::Tls`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::Request as HttpRequest;
use p256::SecretKey;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use zeroize::Zeroizing;

use veil_common::{Classify, Kind};

use crate::evidence::composite;
use crate::jwe::{self, Jwe, JweError};
use crate::protocol::{
    self, Attestation, AttestationToken, AuthRequest, Challenge, ErrorInformation, HashAlgorithm,
    InitData, ProtocolError, RuntimeData, TeePubKey, PROTOCOL_VERSION, SESSION_COOKIE,
    SUPPORTED_HASH_ALGORITHMS,
};
use crate::resource::{ResourcePath, ResourcePathError};
use crate::tee::Tee;

/// Largest response body read.
const MAX_RESPONSE_LEN: usize = 1024 * 1024;

/// What an [`Attester`] fails with: its own error type, boxed, cause chain intact.
pub type AttesterError = Box<dyn std::error::Error + Send + Sync>;

/// Why a client operation failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Connecting the transport failed.
    #[error("cannot connect to the key broker")]
    Connect(#[source] std::io::Error),
    /// The TLS client configuration could not be built.
    #[error("TLS client configuration")]
    TlsConfig(#[source] rustls::Error),
    /// The name to send as SNI is not a DNS name or address.
    #[error("key broker TLS name is invalid")]
    ServerName(#[source] rustls_pki_types::InvalidDnsNameError),
    /// The TLS handshake failed (including a certificate that is not the pinned one).
    #[error("TLS handshake with the key broker failed")]
    Tls(#[source] std::io::Error),
    /// The HTTP request could not be built.
    #[error("HTTP request to the key broker could not be built")]
    Request(#[source] hyper::http::Error),
    /// HTTP framing failed.
    #[error("HTTP exchange with the key broker failed")]
    Http(#[source] hyper::Error),
    /// The response body could not be read.
    #[error("reading the key broker's response failed")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The broker answered with an error.
    #[error("key broker refused ({status}): {detail}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The broker's `detail`.
        detail: String,
    },
    /// The broker's answer is not the expected JSON.
    #[error("unexpected key broker response to {what}")]
    Response {
        /// Which step's answer.
        what: &'static str,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A request payload could not be encoded.
    #[error("encoding the {what} request")]
    Encode {
        /// Which request.
        what: &'static str,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A protocol payload cannot be built (e.g. the broker selected an unknown hash algorithm).
    #[error("the key broker's challenge cannot be answered")]
    Protocol(#[source] ProtocolError),
    /// The attester could not produce evidence.
    #[error("attester failed")]
    Attester(#[source] AttesterError),
    /// The resource path is invalid.
    #[error("invalid resource path")]
    ResourcePath(#[source] ResourcePathError),
    /// The resource did not decrypt.
    #[error("resource JWE")]
    Jwe(#[source] JweError),
}

impl Classify for ClientError {
    fn kind(&self) -> Kind {
        match self {
            ClientError::Connect(_)
            | ClientError::Tls(_)
            | ClientError::Http(_)
            | ClientError::Body(_) => Kind::Unavailable,
            ClientError::TlsConfig(_) | ClientError::Request(_) | ClientError::Encode { .. } => {
                Kind::Internal
            }
            ClientError::ServerName(_) | ClientError::ResourcePath(_) => Kind::InvalidArgument,
            ClientError::Refused { status, .. } => match status {
                400 => Kind::InvalidArgument,
                401 | 403 => Kind::PermissionDenied,
                404 => Kind::NotFound,
                _ => Kind::Internal,
            },
            ClientError::Response { .. } | ClientError::Attester(_) => Kind::Internal,
            ClientError::Protocol(e) => e.kind(),
            ClientError::Jwe(e) => e.kind(),
        }
    }
}

/// The ephemeral TEE key pair (P-256). The private key never leaves the guest.
pub struct TeeKey {
    secret: SecretKey,
}

impl std::fmt::Debug for TeeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TeeKey(..)")
    }
}

impl TeeKey {
    /// A fresh key from the OS RNG.
    pub fn generate() -> Self {
        TeeKey {
            secret: SecretKey::random(&mut rand_core::OsRng),
        }
    }

    /// The public key as the `tee-pubkey` JWK.
    pub fn public_jwk(&self) -> TeePubKey {
        jwe::jwk_from_public_key(&self.secret.public_key())
    }

    /// Decrypts a resource JWE.
    pub fn decrypt(&self, jwe: &Jwe) -> Result<Zeroizing<Vec<u8>>, JweError> {
        jwe::decrypt(&self.secret, jwe)
    }
}

/// Produces evidence binding 64 bytes of `report_data`.
pub trait Attester: Send + Sync {
    /// The TEE kind this attester speaks for.
    fn tee(&self) -> Tee;
    /// The primary evidence JSON (see [`crate::evidence`]); the client wraps it into the
    /// composite `tee-evidence`.
    fn evidence<'a>(
        &'a self,
        report_data: [u8; 64],
    ) -> Pin<Box<dyn Future<Output = Result<serde_json::Value, AttesterError>> + Send + 'a>>;
}

/// Any byte stream the client can speak HTTP over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The future a [`Connector`] returns.
pub type ConnectFuture<'a> =
    Pin<Box<dyn Future<Output = std::io::Result<Box<dyn Io>>> + Send + 'a>>;

/// Opens a fresh stream to the broker (TCP, or a vsock relay in the guest).
pub trait Connector: Send + Sync {
    /// Connects.
    fn connect(&self) -> ConnectFuture<'_>;
}

/// Connects over TCP.
#[derive(Debug, Clone)]
pub struct TcpConnector {
    /// `host:port`.
    pub addr: String,
}

impl Connector for TcpConnector {
    fn connect(&self) -> ConnectFuture<'_> {
        Box::pin(async move {
            let s = tokio::net::TcpStream::connect(&self.addr).await?;
            Ok(Box::new(s) as Box<dyn Io>)
        })
    }
}

/// How the HTTP bytes are protected.
#[derive(Debug, Clone)]
pub enum Transport {
    /// TLS accepting only the broker certificate `pinned_der`.
    Tls {
        /// The broker's certificate, DER.
        pinned_der: Vec<u8>,
        /// The name sent in SNI (any name; the pin is what authenticates).
        server_name: String,
    },
    /// TLS accepting only the broker certificate whose DER has this SHA-256
    /// digest (what a guest carries in its measured configuration, where a
    /// whole certificate would not fit).
    TlsSha256 {
        /// SHA-256 of the broker's certificate, DER.
        cert_sha256: [u8; 32],
        /// The name sent in SNI (any name; the pin is what authenticates).
        server_name: String,
    },
    /// Plain HTTP (tests, or a relay that is itself protected).
    Plain,
}

/// Accepts exactly one end-entity certificate (by the SHA-256 of its DER);
/// TLS signatures are still verified.
#[derive(Debug)]
struct PinnedCert {
    sha256: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use sha2::Digest;
        use subtle::ConstantTimeEq;
        let digest: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
        if bool::from(digest.ct_eq(&self.sha256)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A KBS client holding one ephemeral TEE key and the broker session.
pub struct KbsClient {
    connector: Box<dyn Connector>,
    transport: Transport,
    tls: Option<tokio_rustls::TlsConnector>,
    host: String,
    key: TeeKey,
    cookie: Option<String>,
    token: Option<String>,
    init_data: Option<String>,
}

impl std::fmt::Debug for KbsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KbsClient")
            .field("host", &self.host)
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

/// The report data a guest binds for `nonce` and its key (what the broker recomputes).
pub fn report_data_for(
    nonce: &str,
    key: &TeePubKey,
    alg: HashAlgorithm,
) -> Result<[u8; 64], ProtocolError> {
    let runtime = RuntimeData {
        nonce: nonce.to_string(),
        tee_pubkey: key.clone(),
    };
    protocol::report_data(&runtime, "", alg)
}

impl KbsClient {
    /// A client; `host` is the HTTP `Host` header value.
    pub fn new(
        connector: Box<dyn Connector>,
        transport: Transport,
        host: impl Into<String>,
    ) -> Result<Self, ClientError> {
        let pin = match &transport {
            Transport::Plain => None,
            Transport::Tls { pinned_der, .. } => {
                use sha2::Digest;
                Some(<[u8; 32]>::from(sha2::Sha256::digest(pinned_der)))
            }
            Transport::TlsSha256 { cert_sha256, .. } => Some(*cert_sha256),
        };
        let tls = match pin {
            None => None,
            Some(sha256) => {
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
                    .with_safe_default_protocol_versions()
                    .map_err(ClientError::TlsConfig)?
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(PinnedCert { sha256, provider }))
                    .with_no_client_auth();
                Some(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
            }
        };
        Ok(KbsClient {
            connector,
            transport,
            tls,
            host: host.into(),
            key: TeeKey::generate(),
            cookie: None,
            token: None,
            init_data: None,
        })
    }

    /// Sends init-data (its digest must be the evidence's host data) with the attestation.
    pub fn with_init_data(mut self, toml_body: impl Into<String>) -> Self {
        self.init_data = Some(toml_body.into());
        self
    }

    /// The attestation token, once attested.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), ClientError> {
        let stream = self
            .connector
            .connect()
            .await
            .map_err(ClientError::Connect)?;
        let io: Box<dyn Io> = match (&self.tls, &self.transport) {
            (
                Some(tls),
                Transport::Tls { server_name, .. } | Transport::TlsSha256 { server_name, .. },
            ) => {
                let name =
                    ServerName::try_from(server_name.clone()).map_err(ClientError::ServerName)?;
                Box::new(tls.connect(name, stream).await.map_err(ClientError::Tls)?)
            }
            _ => stream,
        };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
                .await
                .map_err(ClientError::Http)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = HttpRequest::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.host);
        if let Some(c) = &self.cookie {
            req = req.header(hyper::header::COOKIE, format!("{SESSION_COOKIE}={c}"));
        }
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(ClientError::Request)?;
        let resp = sender.send_request(req).await.map_err(ClientError::Http)?;
        let status = resp.status().as_u16();
        for v in resp.headers().get_all(hyper::header::SET_COOKIE) {
            if let Some(id) = v
                .to_str()
                .ok()
                .and_then(|s| s.split(';').next())
                .and_then(|kv| kv.trim().strip_prefix(&format!("{SESSION_COOKIE}=")))
            {
                self.cookie = Some(id.to_string());
            }
        }
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_LEN)
            .collect()
            .await
            .map_err(ClientError::Body)?
            .to_bytes();
        Ok((status, bytes))
    }

    fn refused(status: u16, body: &[u8]) -> ClientError {
        let detail = serde_json::from_slice::<ErrorInformation>(body)
            .map(|e| e.detail)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).chars().take(200).collect());
        ClientError::Refused { status, detail }
    }

    /// Runs `/auth` then `/attest` with evidence from `attester`; returns the token.
    pub async fn attest(&mut self, attester: &dyn Attester) -> Result<String, ClientError> {
        let req = AuthRequest {
            version: PROTOCOL_VERSION.into(),
            tee: attester.tee(),
            extra_params: serde_json::json!({
                SUPPORTED_HASH_ALGORITHMS: protocol::supported_hash_names()
            }),
        };
        let body = req.to_json().map_err(ClientError::Protocol)?;
        let (status, resp) = self.exchange("POST", "/kbs/v0/auth", Some(body)).await?;
        if status != 200 {
            return Err(Self::refused(status, &resp));
        }
        let challenge: Challenge =
            serde_json::from_slice(&resp).map_err(|source| ClientError::Response {
                what: "auth",
                source,
            })?;
        let alg: HashAlgorithm =
            protocol::selected_hash(&challenge.extra_params).map_err(ClientError::Protocol)?;
        let runtime_data = RuntimeData {
            nonce: challenge.nonce,
            tee_pubkey: self.key.public_jwk(),
        };
        // No device attesters: the additional evidence is empty, and bound as such.
        let report_data =
            protocol::report_data(&runtime_data, "", alg).map_err(ClientError::Protocol)?;
        let evidence = attester
            .evidence(report_data)
            .await
            .map_err(ClientError::Attester)?;
        let att = Attestation {
            init_data: self.init_data.clone().map(|body| InitData {
                format: "toml".into(),
                body,
            }),
            runtime_data,
            tee_evidence: composite(evidence),
        };
        let body = serde_json::to_vec(&att).map_err(|source| ClientError::Encode {
            what: "attest",
            source,
        })?;
        let (status, resp) = self.exchange("POST", "/kbs/v0/attest", Some(body)).await?;
        if status != 200 {
            return Err(Self::refused(status, &resp));
        }
        let tok: AttestationToken =
            serde_json::from_slice(&resp).map_err(|source| ClientError::Response {
                what: "attest",
                source,
            })?;
        self.token = Some(tok.token.clone());
        Ok(tok.token)
    }

    /// Fetches and decrypts `<repo>/<type>/<tag>` (after [`Self::attest`]).
    pub async fn get_resource(
        &mut self,
        repo: &str,
        kind: &str,
        tag: &str,
    ) -> Result<Zeroizing<Vec<u8>>, ClientError> {
        let path = ResourcePath::new(repo, kind, tag).map_err(ClientError::ResourcePath)?;
        let (status, resp) = self
            .exchange("GET", &format!("/kbs/v0/resource/{path}"), None)
            .await?;
        if status != 200 {
            return Err(Self::refused(status, &resp));
        }
        let jwe: Jwe = serde_json::from_slice(&resp).map_err(|source| ClientError::Response {
            what: "resource",
            source,
        })?;
        self.key.decrypt(&jwe).map_err(ClientError::Jwe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds() {
        let io = || std::io::Error::other("x");
        let json = || serde_json::from_slice::<serde_json::Value>(b"{").unwrap_err();
        let http = hyper::http::Request::builder()
            .uri("\0")
            .body(())
            .unwrap_err();
        let name = ServerName::try_from("not a name!").unwrap_err();
        let refused = |status| ClientError::Refused {
            status,
            detail: String::new(),
        };
        let cases: Vec<(ClientError, Kind)> = vec![
            (ClientError::Connect(io()), Kind::Unavailable),
            (
                ClientError::TlsConfig(rustls::Error::General("x".into())),
                Kind::Internal,
            ),
            (ClientError::ServerName(name), Kind::InvalidArgument),
            (ClientError::Tls(io()), Kind::Unavailable),
            (ClientError::Request(http), Kind::Internal),
            (ClientError::Body(Box::new(io())), Kind::Unavailable),
            (refused(400), Kind::InvalidArgument),
            (refused(401), Kind::PermissionDenied),
            (refused(404), Kind::NotFound),
            (refused(500), Kind::Internal),
            (
                ClientError::Response {
                    what: "auth",
                    source: json(),
                },
                Kind::Internal,
            ),
            (
                ClientError::Encode {
                    what: "auth",
                    source: json(),
                },
                Kind::Internal,
            ),
            (
                ClientError::Protocol(ProtocolError::HashAlgorithm("md5".into())),
                Kind::Unimplemented,
            ),
            (ClientError::Attester(Box::new(io())), Kind::Internal),
            (
                ClientError::ResourcePath(ResourcePathError::Shape(String::new())),
                Kind::InvalidArgument,
            ),
            (ClientError::Jwe(JweError::Decrypt), Kind::DataLoss),
        ];
        for (e, k) in cases {
            assert_eq!(e.kind(), k, "{e}");
        }
    }

    #[tokio::test]
    async fn a_closed_connection_is_unavailable() {
        let (a, b) = tokio::io::duplex(64);
        drop(b);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(a))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = HttpRequest::builder()
            .uri("/")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let e = ClientError::Http(sender.send_request(req).await.unwrap_err());
        assert_eq!(e.kind(), Kind::Unavailable);
    }
}
