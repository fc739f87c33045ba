//! The broker: its state, the protocol routes (`/auth`, `/attest`, `/resource`) and TLS serving.
//!
//! The admin routes are in the `admin` module; payloads in [`veil_attestation::protocol`]. Handlers are plain
//! methods on [`Kbs`] so tests can call them without HTTP; [`Kbs::router`] wires them to axum.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use sha2::{Digest, Sha256, Sha384};
use thiserror::Error;
use tokio::net::TcpListener;

use veil_attestation::evidence::Evidence;
use veil_attestation::jwe;
use veil_attestation::protocol::{
    self, AttestationToken, AuthRequest, Challenge, HashAlgorithm, SELECTED_HASH_ALGORITHM,
    SESSION_COOKIE,
};
use veil_attestation::{ResourcePath, Tee};
use veil_common::{error_chain, Classify, Kind};
use veil_verifier::reference::{ReferenceError, ReferenceValues};
use veil_verifier::{verify_evidence, Claims, TrustAnchors};

use crate::audit::{session_label, AuditEvent, AuditLog, Outcome};
use crate::policy::{Policy, PolicyError};
use crate::session::{Attested, Clock, SessionStore, SystemClock};
use crate::store::{ResourceStore, StoreError};
use crate::token::{TokenClaims, TokenSigner};
use crate::KbsError;

/// Policy file name in the state directory.
pub const POLICY_FILE: &str = "policy.toml";
/// Reference-values file name in the state directory.
pub const REFERENCE_FILE: &str = "reference-values.json";
/// Resource directory name in the state directory.
pub const RESOURCES_DIR: &str = "resources";

/// Why the broker could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// The resource store could not be opened.
    #[error("resource store")]
    Store(#[source] StoreError),
    /// The policy file could not be read.
    #[error("cannot read policy file {path}")]
    PolicyRead {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The policy file is invalid.
    #[error("policy file {path}")]
    Policy {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: PolicyError,
    },
    /// The reference-values file is invalid.
    #[error("reference values")]
    Reference(#[source] ReferenceError),
    /// A TLS certificate or key file could not be read.
    #[error("TLS material {path}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// The PEM error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The TLS configuration was refused (e.g. key and certificate do not match).
    #[error("TLS configuration")]
    TlsConfig(#[source] rustls::Error),
    /// The listener failed.
    #[error("listener")]
    Io(#[source] std::io::Error),
}

impl Classify for StartError {
    fn kind(&self) -> Kind {
        match self {
            StartError::Store(e) => e.kind(),
            StartError::PolicyRead { .. } | StartError::Io(_) => Kind::Internal,
            StartError::Policy { source, .. } => source.kind(),
            StartError::Reference(e) => e.kind(),
            StartError::TlsFile { .. } | StartError::TlsConfig(_) => Kind::InvalidArgument,
        }
    }
}

/// How the broker is configured.
pub struct KbsConfig {
    /// Holds `policy.toml`, `reference-values.json` and `resources/`.
    pub state_dir: PathBuf,
    /// Admin API bearer token; `None` disables the admin API.
    pub admin_token: Option<String>,
    /// How long a session lives (challenge and attestation result), seconds.
    pub session_ttl_secs: u64,
    /// How long an attestation token is valid, seconds.
    pub token_ttl_secs: u64,
    /// Trust anchors for verification.
    pub anchors: TrustAnchors,
    /// The audit sink.
    pub audit: AuditLog,
    /// The clock.
    pub clock: Arc<dyn Clock>,
}

impl KbsConfig {
    /// Defaults: 5-minute sessions and tokens, system clock, in-memory audit, no admin API.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        KbsConfig {
            state_dir: state_dir.into(),
            admin_token: None,
            session_ttl_secs: 300,
            token_ttl_secs: 300,
            anchors: TrustAnchors::default(),
            audit: AuditLog::in_memory(),
            clock: Arc::new(SystemClock),
        }
    }
}

/// The broker's state.
pub struct Kbs {
    pub(crate) sessions: SessionStore,
    pub(crate) policy: RwLock<Policy>,
    pub(crate) refs: RwLock<ReferenceValues>,
    pub(crate) store: ResourceStore,
    pub(crate) anchors: TrustAnchors,
    pub(crate) audit: AuditLog,
    pub(crate) admin_digest: Option<[u8; 32]>,
    pub(crate) tokens: TokenSigner,
    pub(crate) token_ttl_secs: u64,
    pub(crate) state_dir: PathBuf,
}

impl std::fmt::Debug for Kbs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kbs")
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

/// What authenticated a resource request.
enum Caller {
    Session(String, Attested),
    Token(TokenClaims),
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.to_string())
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

impl Kbs {
    /// Opens the state directory and builds the broker.
    pub fn new(cfg: KbsConfig) -> Result<Arc<Self>, StartError> {
        let store =
            ResourceStore::open(&cfg.state_dir.join(RESOURCES_DIR)).map_err(StartError::Store)?;
        let policy_path = cfg.state_dir.join(POLICY_FILE);
        let policy = match std::fs::read_to_string(&policy_path) {
            Ok(text) => Policy::from_toml(&text).map_err(|source| StartError::Policy {
                path: policy_path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Policy::default(),
            Err(source) => {
                return Err(StartError::PolicyRead {
                    path: policy_path,
                    source,
                })
            }
        };
        let refs = ReferenceValues::load(&cfg.state_dir.join(REFERENCE_FILE))
            .map_err(StartError::Reference)?;
        Ok(Arc::new(Kbs {
            sessions: SessionStore::new(cfg.session_ttl_secs, 4096, cfg.clock),
            policy: RwLock::new(policy),
            refs: RwLock::new(refs),
            store,
            anchors: cfg.anchors,
            audit: cfg.audit,
            admin_digest: cfg.admin_token.map(|t| Sha256::digest(t.as_bytes()).into()),
            tokens: TokenSigner::generate(),
            token_ttl_secs: cfg.token_ttl_secs,
            state_dir: cfg.state_dir,
        }))
    }

    /// The audit sink (tests read in-memory events from it).
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub(crate) fn now(&self) -> u64 {
        self.sessions.now_secs()
    }

    pub(crate) fn event(&self, outcome: Outcome, step: &'static str) -> AuditEvent {
        AuditEvent {
            ts: self.now(),
            outcome,
            step,
            resource: None,
            tee: None,
            measurement: None,
            reason: None,
            session: None,
        }
    }

    /// `POST /kbs/v0/auth`: returns the session id and the challenge.
    pub fn auth(&self, body: &[u8]) -> Result<(String, Challenge), KbsError> {
        let req = AuthRequest::parse(body).map_err(KbsError::Payload)?;
        if !req.version.starts_with("0.4.") && req.version != "0.1.0" {
            return Err(KbsError::ProtocolVersion(req.version));
        }
        let tee = req.tee;
        let hash = HashAlgorithm::Sha384;
        let (id, nonce) = self
            .sessions
            .challenge(tee, hash)
            .map_err(KbsError::Session)?;
        Ok((
            id,
            Challenge {
                nonce,
                extra_params: serde_json::json!({ SELECTED_HASH_ALGORITHM: hash.as_ref() }),
            },
        ))
    }

    /// `POST /kbs/v0/attest`: verifies evidence for the session's challenge; returns a token.
    pub fn attest(&self, session_id: &str, body: &[u8]) -> Result<AttestationToken, KbsError> {
        let mut ev = self.event(Outcome::Refusal, "attest");
        self.attest_inner(session_id, body, &mut ev)
    }

    /// [`Self::attest`], noting in `ev` the TEE and the (claimed, then verified) measurement.
    fn attest_inner(
        &self,
        session_id: &str,
        body: &[u8],
        ev: &mut AuditEvent,
    ) -> Result<AttestationToken, KbsError> {
        let challenge = self
            .sessions
            .take_challenge(session_id)
            .map_err(KbsError::Session)?;
        ev.tee = Some(challenge.tee.to_string());
        let att = protocol::parse_attestation(body).map_err(KbsError::Payload)?;
        if att.runtime_data.nonce != challenge.nonce {
            return Err(KbsError::NonceMismatch);
        }
        jwe::public_key_from_jwk(&att.runtime_data.tee_pubkey).map_err(KbsError::TeeKey)?;
        let evidence = Evidence::from_composite(challenge.tee, &att.tee_evidence)
            .map_err(KbsError::Evidence)?;
        // Recorded before verification: on a refusal this is what the evidence claimed.
        ev.measurement = Some(evidence.measurement_hex());
        let expected = protocol::report_data(
            &att.runtime_data,
            &att.tee_evidence.additional_evidence,
            challenge.hash,
        )
        .map_err(KbsError::Payload)?;
        let claims = verify_evidence(&evidence, &expected, &self.anchors, self.now())
            .map_err(KbsError::Verify)?;
        if let Some(init) = &att.init_data {
            check_init_data(&claims, init.body.as_bytes())?;
        }
        let now = self.now();
        let token = self.tokens.sign(&TokenClaims {
            iss: "veil-kbs".into(),
            iat: now,
            exp: now.saturating_add(self.token_ttl_secs),
            claims: claims.clone(),
            tee_pubkey: att.runtime_data.tee_pubkey.clone(),
        });
        self.sessions
            .set_attested(
                session_id,
                Attested {
                    claims,
                    tee_pubkey: att.runtime_data.tee_pubkey,
                },
            )
            .map_err(KbsError::Session)?;
        Ok(AttestationToken { token })
    }

    fn caller(&self, headers: &HeaderMap) -> Result<Caller, KbsError> {
        if let Some(t) = bearer(headers) {
            let c = self.tokens.verify(t, self.now()).map_err(KbsError::Token)?;
            return Ok(Caller::Token(c));
        }
        let id = session_cookie(headers).ok_or(KbsError::NoCredentials)?;
        let a = self.sessions.attested(&id).map_err(KbsError::Session)?;
        Ok(Caller::Session(id, a))
    }

    /// `GET /kbs/v0/resource/<repo>/<type>/<tag>`: the resource as JWE, if policy allows.
    pub fn resource(
        &self,
        headers: &HeaderMap,
        path: (String, String, String),
    ) -> Result<jwe::Jwe, KbsError> {
        let mut ev = self.event(Outcome::Refusal, "resource");
        ev.resource = Some(format!("{}/{}/{}", path.0, path.1, path.2));
        let result = self.resource_inner(headers, &path, &mut ev);
        match &result {
            Ok(_) => ev.outcome = Outcome::Release,
            Err(e) => ev.reason = Some(error_chain(e)),
        }
        self.audit.record(ev);
        result
    }

    fn resource_inner(
        &self,
        headers: &HeaderMap,
        path: &(String, String, String),
        ev: &mut AuditEvent,
    ) -> Result<jwe::Jwe, KbsError> {
        let caller = self.caller(headers)?;
        let (claims, tee_key): (Claims, _) = match caller {
            Caller::Session(id, a) => {
                ev.session = Some(session_label(&id));
                (a.claims, a.tee_pubkey)
            }
            Caller::Token(t) => (t.claims, t.tee_pubkey),
        };
        ev.tee = Some(claims.tee.to_string());
        ev.measurement = Some(claims.measurement.clone());
        let rp = ResourcePath::new(&path.0, &path.1, &path.2).map_err(KbsError::ResourcePath)?;
        let data = self
            .store
            .get(&rp)
            .map_err(KbsError::Store)?
            .ok_or(KbsError::ResourceNotFound)?;
        {
            let policy = self.policy.read().unwrap_or_else(|e| e.into_inner());
            let refs = self.refs.read().unwrap_or_else(|e| e.into_inner());
            let rule = policy
                .for_resource(&rp)
                .ok_or(KbsError::PolicyDenied(PolicyError::NoPolicy))?;
            rule.evaluate(&claims, &refs)
                .map_err(KbsError::PolicyDenied)?;
        }
        jwe::encrypt(&tee_key, &data).map_err(KbsError::Encrypt)
    }
}

/// Checks that the init-data digest equals SNP HOST_DATA (SHA-256) or TDX MRCONFIGID (SHA-384).
fn check_init_data(claims: &Claims, body: &[u8]) -> Result<(), KbsError> {
    let digest = match claims.tee {
        Tee::Tdx => hex::encode(Sha384::digest(body)),
        Tee::Snp | Tee::VeilSim => hex::encode(Sha256::digest(body)),
    };
    if digest != claims.host_data {
        return Err(KbsError::InitDataMismatch {
            digest,
            host_data: claims.host_data.clone(),
        });
    }
    Ok(())
}

/// Whether the connection a request came on is TLS: set per connection by [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct ConnectionTls(pub bool);

/// The session cookie. `Secure` only over TLS: a client that honours `Secure` (a browser,
/// Python's cookie jar) would otherwise never send it back over plain HTTP.
fn cookie_header(id: &str, ttl: u64, tls: bool) -> HeaderValue {
    let secure = if tls { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={id}; Max-Age={ttl}; Path=/kbs; HttpOnly{secure}; SameSite=Strict"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("kbs-session-id=invalid"))
}

pub(crate) async fn h_method_not_allowed(method: axum::http::Method) -> Response {
    KbsError::MethodNotAllowed(method.to_string()).into_response()
}

pub(crate) async fn h_not_found() -> Response {
    KbsError::NoSuchEndpoint.into_response()
}

pub(crate) async fn h_auth(
    State(kbs): State<Arc<Kbs>>,
    tls: Option<axum::Extension<ConnectionTls>>,
    body: Bytes,
) -> Response {
    let tls = tls.is_some_and(|axum::Extension(ConnectionTls(t))| t);
    match kbs.auth(&body) {
        Ok((id, challenge)) => {
            let ttl = kbs
                .sessions
                .expires_at(&id)
                .unwrap_or(0)
                .saturating_sub(kbs.now());
            let mut r = Json(challenge).into_response();
            r.headers_mut()
                .insert(header::SET_COOKIE, cookie_header(&id, ttl, tls));
            r
        }
        Err(e) => {
            let mut ev = kbs.event(Outcome::Refusal, "auth");
            ev.reason = Some(error_chain(&e));
            kbs.audit.record(ev);
            e.into_response()
        }
    }
}

pub(crate) async fn h_attest(
    State(kbs): State<Arc<Kbs>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut ev = kbs.event(Outcome::Refusal, "attest");
    let Some(id) = session_cookie(&headers) else {
        let e = KbsError::NoCredentials;
        ev.reason = Some(error_chain(&e));
        kbs.audit.record(ev);
        return e.into_response();
    };
    ev.session = Some(session_label(&id));
    match kbs.attest_inner(&id, &body, &mut ev) {
        Ok(tok) => {
            ev.outcome = Outcome::Attested;
            kbs.audit.record(ev);
            Json(tok).into_response()
        }
        Err(e) => {
            ev.reason = Some(error_chain(&e));
            kbs.audit.record(ev);
            e.into_response()
        }
    }
}

pub(crate) async fn h_resource(
    State(kbs): State<Arc<Kbs>>,
    headers: HeaderMap,
    UrlPath(path): UrlPath<(String, String, String)>,
) -> Response {
    match kbs.resource(&headers, path) {
        Ok(j) => Json(j).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Loads a rustls server configuration from PEM certificate chain and private key files.
pub fn load_tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, StartError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let tls_file = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StartError::TlsFile { path, source }
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(tls_file(cert))?
        .collect::<Result<_, _>>()
        .map_err(tls_file(cert))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(tls_file(key))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(StartError::TlsConfig)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(StartError::TlsConfig)?;
    Ok(Arc::new(cfg))
}

/// Serves `router` on `listener` (TLS when `tls` is given) until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::pin!(shutdown);
    loop {
        let (tcp, _peer) = tokio::select! {
            r = listener.accept() => r.map_err(StartError::Io)?,
            _ = &mut shutdown => return Ok(()),
        };
        let router = router
            .clone()
            .layer(axum::Extension(ConnectionTls(acceptor.is_some())));
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let svc = hyper_util::service::TowerToHyperService::new(router);
            let http = hyper::server::conn::http1::Builder::new();
            match acceptor {
                Some(a) => {
                    let Ok(Ok(tls)) =
                        tokio::time::timeout(Duration::from_secs(10), a.accept(tcp)).await
                    else {
                        return;
                    };
                    let _ = http
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                }
                None => {
                    let _ = http
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                }
            }
        });
    }
}
