//! Shared fixtures for the broker tests: a simulated CA, a broker on 127.0.0.1 (plain HTTP or TLS)
//! with a manual clock and in-memory audit, a simulated attester, and a raw HTTP/1.1 helper that
//! speaks the protocol with hand-built JSON (not our client code).
#![allow(dead_code)] // reason: each test binary uses a different subset of these helpers

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use veil_attestation::client::{Attester, AttesterError};
use veil_attestation::evidence::sim::SimEvidence;
use veil_attestation::Tee;
use veil_kbs::audit::{AuditEvent, AuditLog, Outcome};
use veil_kbs::server::{load_tls_config, serve, Kbs, KbsConfig};
use veil_kbs::session::ManualClock;
use veil_verifier::sim_ca::{init_sim_ca, load_verifying_key, SimChip};
use veil_verifier::sim_report::{build_sim_report, SimReportParams};
use veil_verifier::verify::TrustAnchors;

pub const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";
pub const SECRET: &[u8] = b"luks2 passphrase: correct horse battery staple";

pub struct Broker {
    pub kbs: Arc<Kbs>,
    pub addr: SocketAddr,
    pub clock: ManualClock,
    pub dir: tempfile::TempDir,
    pub chip: SimChip,
    pub sim_dir: PathBuf,
    pub cert_der: Option<Vec<u8>>,
    pub cert_pem_path: Option<PathBuf>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

pub struct BrokerOptions {
    pub tls: bool,
    pub sim_root: bool,
    pub session_ttl_secs: u64,
    /// TDX collateral and the clock to start at (the collateral's validity).
    pub tdx: Option<(veil_verifier::verify::tdx::TdxTrust, u64)>,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            tls: false,
            sim_root: true,
            session_ttl_secs: 300,
            tdx: None,
        }
    }
}

/// Starts a broker on the current tokio runtime.
pub async fn start_broker(opts: BrokerOptions) -> Broker {
    let dir = tempfile::tempdir().unwrap();
    let sim_dir = dir.path().join("sim-ca");
    let files = init_sim_ca(&sim_dir, false).unwrap();
    let chip = SimChip::load(&sim_dir).unwrap();
    let clock = ManualClock::new(opts.tdx.as_ref().map_or(1_800_000_000, |t| t.1));
    let mut cfg = KbsConfig::new(dir.path().join("state"));
    cfg.admin_token = Some(ADMIN_TOKEN.into());
    cfg.session_ttl_secs = opts.session_ttl_secs;
    cfg.audit = AuditLog::in_memory();
    cfg.clock = Arc::new(clock.clone());
    cfg.anchors = TrustAnchors {
        sim_root: opts
            .sim_root
            .then(|| load_verifying_key(&files.root_pub()).unwrap()),
        tdx: opts.tdx.map(|t| t.0).unwrap_or_default(),
        ..Default::default()
    };
    let kbs = Kbs::new(cfg).unwrap();
    let (tls, cert_der, cert_pem_path) = if opts.tls {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cp = dir.path().join("cert.pem");
        let kp = dir.path().join("key.pem");
        std::fs::write(&cp, cert.pem()).unwrap();
        std::fs::write(&kp, key.serialize_pem()).unwrap();
        (
            Some(load_tls_config(&cp, &kp).unwrap()),
            Some(cert.der().to_vec()),
            Some(cp),
        )
    } else {
        (None, None, None)
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let router = kbs.clone().router();
    tokio::spawn(async move {
        let _ = serve(listener, tls, router, async {
            let _ = rx.await;
        })
        .await;
    });
    Broker {
        kbs,
        addr,
        clock,
        dir,
        chip,
        sim_dir,
        cert_der,
        cert_pem_path,
        _shutdown: tx,
    }
}

pub fn measurement_for(cmdline: &str) -> [u8; 48] {
    veil_verifier::sim_measurement(b"vmlinux bytes", b"initrd bytes", cmdline, 1, None)
}

pub const CMDLINE: &str = "console=hvc0 quiet veil.sandbox=1";

impl Broker {
    pub fn audit(&self) -> Vec<AuditEvent> {
        self.kbs.audit().events()
    }

    pub fn releases(&self) -> usize {
        self.audit()
            .iter()
            .filter(|e| e.outcome == Outcome::Release)
            .count()
    }

    /// The last refusal's reason.
    pub fn last_refusal(&self) -> String {
        self.audit()
            .iter()
            .rev()
            .find(|e| e.outcome == Outcome::Refusal)
            .and_then(|e| e.reason.clone())
            .unwrap_or_default()
    }

    /// Registers `SECRET` at default/key/disk and a policy (allow_simulated as given).
    pub fn provision(&self, allow_simulated: bool, measurement: &[u8; 48]) {
        let (s, b) = raw(
            self.addr,
            "POST",
            "/kbs/v0/resource/default/key/disk",
            &[("Authorization", &format!("Bearer {ADMIN_TOKEN}"))],
            SECRET,
        );
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
        let policy = format!(
            "[[resource]]\npath = \"default/key/disk\"\ntee = [\"snp\", \"veil-sim\"]\nmeasurements = [\"{}\"]\n{}\n",
            hex::encode(measurement),
            if allow_simulated { "allow_simulated = true" } else { "" }
        );
        let (s, b) = raw(
            self.addr,
            "POST",
            "/kbs/v0/resource-policy",
            &[("Authorization", &format!("Bearer {ADMIN_TOKEN}"))],
            policy.as_bytes(),
        );
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    }

    /// Simulated evidence JSON for `report_data`, letting the caller tweak the report.
    pub fn sim_evidence(
        &self,
        report_data: [u8; 64],
        measurement: [u8; 48],
        tweak: impl FnOnce(&mut SimReportParams),
    ) -> serde_json::Value {
        let mut p = SimReportParams::new(report_data, measurement);
        tweak(&mut p);
        let r = build_sim_report(&self.chip.key, &p);
        serde_json::to_value(SimEvidence::new(r.as_bytes(), self.chip.cert.clone())).unwrap()
    }

    /// An admin request with the admin token.
    pub fn admin(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        raw(
            self.addr,
            method,
            path,
            &[("Authorization", &format!("Bearer {ADMIN_TOKEN}"))],
            body,
        )
    }
}

/// A simulated attester signing with the test chip key.
pub struct SimAttester {
    pub chip: SimChip,
    pub measurement: [u8; 48],
}

impl Attester for SimAttester {
    fn tee(&self) -> Tee {
        Tee::VeilSim
    }
    fn evidence<'a>(
        &'a self,
        report_data: [u8; 64],
    ) -> Pin<
        Box<dyn std::future::Future<Output = Result<serde_json::Value, AttesterError>> + Send + 'a>,
    > {
        Box::pin(async move { Ok(self.chip.evidence(&report_data, &self.measurement, None)) })
    }
}

/// One HTTP/1.1 request over a fresh plain TCP connection; returns (status, body).
/// Blocking on purpose: it is run from `spawn_blocking` or plain threads.
pub fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let (s, _h, b) = raw_full(addr, method, path, headers, body);
    (s, b)
}

/// Like [`raw`] but also returns the response headers (lower-cased names).
pub fn raw_full(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP response has a header block");
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let hdrs: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = resp[split + 4..].to_vec();
    if hdrs
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    (status, hdrs, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
}

/// The session cookie value from response headers.
pub fn cookie_of(headers: &[(String, String)]) -> String {
    headers
        .iter()
        .find(|(k, _)| k == "set-cookie")
        .and_then(|(_, v)| v.split(';').next())
        .and_then(|kv| kv.strip_prefix("kbs-session-id="))
        .expect("kbs-session-id cookie")
        .to_string()
}
