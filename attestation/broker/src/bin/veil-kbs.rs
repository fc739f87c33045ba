//! `veil-kbs`: the key broker. Parses flags, sets up logging, runs [`veil_kbs`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use veil_common::error_chain;
use veil_kbs::audit::AuditLog;
use veil_kbs::server::{load_tls_config, serve, Kbs, KbsConfig};
use veil_kbs::session::SystemClock;
use veil_verifier::verify::amd::{AmdRoots, SnpCrls};
use veil_verifier::verify::snp::SnpTrust;
use veil_verifier::verify::tdx::TdxTrust;
use veil_verifier::TrustAnchors;

/// Exit codes.
const EXIT_CONFIG: u8 = 3;
const EXIT_RUNTIME: u8 = 4;

#[derive(Parser)]
#[command(
    name = "veil-kbs",
    about = "veil key broker (Trustee KBS protocol v0.4.0)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the KBS protocol and the admin API.
    Serve(Box<ServeArgs>),
    /// Generate a self-signed TLS certificate and key for the broker (the guest pins it).
    InitTls {
        /// Output directory (cert.pem, cert.der, key.pem 0600).
        #[arg(long)]
        out_dir: PathBuf,
        /// Subject alternative names (DNS names or IP addresses).
        #[arg(long = "san", default_values_t = vec!["localhost".to_string(), "127.0.0.1".to_string()])]
        sans: Vec<String>,
    },
}

#[derive(Parser)]
struct ServeArgs {
    /// Address to listen on (port 0 picks one; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// State directory: policy.toml, reference-values.json, resources/.
    #[arg(long)]
    state_dir: PathBuf,
    /// TLS certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve plain HTTP (tests only; the guest expects TLS).
    #[arg(long, conflicts_with = "tls_cert")]
    insecure_http: bool,
    /// File holding the admin API token; without it the admin API is disabled.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Audit log (JSON lines, appended, 0600).
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Simulated root public key (root.pub.pem from `veil sim-ca init`); without it simulated
    /// evidence never verifies. Policy must still set allow_simulated per resource.
    #[arg(long)]
    sim_root: Option<PathBuf>,
    /// Offline SNP endorsement-key store for reports without a certificate chain: VCEKs as
    /// `<hex chip_id>.der` (or `vcek.der`), a VLEK as `vlek.der`.
    #[arg(long)]
    vcek_dir: Option<PathBuf>,
    /// AMD SNP CRLs (PEM `X509 CRL` blocks or one DER CRL, as AMD's key distribution service
    /// publishes them per generation); with it, every SNP chain must be covered by a current
    /// CRL of its ARK.
    #[arg(long)]
    snp_crl: Option<PathBuf>,
    /// TDX collateral (dcap-qvl QuoteCollateralV3 JSON) for offline quote verification.
    #[arg(long)]
    tdx_collateral: Option<PathBuf>,
    /// Accepted TDX TCB statuses (default: UpToDate).
    #[arg(long = "tdx-accept-status")]
    tdx_accept_status: Vec<String>,
    /// Session lifetime in seconds.
    #[arg(long, default_value_t = 300)]
    session_ttl_secs: u64,
    /// Attestation token lifetime in seconds.
    #[arg(long, default_value_t = 300)]
    token_ttl_secs: u64,
}

fn fail(code: u8, msg: String) -> ExitCode {
    eprintln!("veil-kbs: {msg}");
    ExitCode::from(code)
}

fn config(a: &ServeArgs) -> Result<KbsConfig, String> {
    let mut cfg = KbsConfig::new(&a.state_dir);
    cfg.session_ttl_secs = a.session_ttl_secs;
    cfg.token_ttl_secs = a.token_ttl_secs;
    cfg.clock = Arc::new(SystemClock);
    if let Some(p) = &a.admin_token_file {
        let t = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let t = t.trim().to_string();
        if t.len() < 16 {
            return Err(format!(
                "{}: admin token must be at least 16 characters",
                p.display()
            ));
        }
        cfg.admin_token = Some(t);
    }
    cfg.audit = match &a.audit_log {
        Some(p) => AuditLog::to_file(p).map_err(|e| format!("{}: {e}", p.display()))?,
        None => AuditLog::default(),
    };
    let sim_root = match &a.sim_root {
        Some(p) => Some(veil_verifier::sim_ca::load_verifying_key(p).map_err(|e| error_chain(&e))?),
        None => None,
    };
    let collateral = match &a.tdx_collateral {
        Some(p) => Some(TdxTrust::load_collateral(p).map_err(|e| error_chain(&e))?),
        None => None,
    };
    cfg.anchors = TrustAnchors {
        snp: SnpTrust {
            vek_dir: a.vcek_dir.clone(),
            // Parsed once here rather than per verification.
            roots: Some(AmdRoots::all_pinned().map_err(|e| error_chain(&e))?),
            crls: match &a.snp_crl {
                Some(p) => Some(SnpCrls::load(p).map_err(|e| error_chain(&e))?),
                None => None,
            },
        },
        tdx: TdxTrust {
            collateral,
            accepted_statuses: a.tdx_accept_status.clone(),
        },
        sim_root,
    };
    Ok(cfg)
}

fn init_tls(out_dir: &std::path::Path, sans: Vec<String>) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let params = rcgen::CertificateParams::new(sans).map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let write = |name: &str, data: &[u8], mode: u32| -> Result<(), String> {
        let p = out_dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&p)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        f.write_all(data)
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    write("key.pem", key.serialize_pem().as_bytes(), 0o600)?;
    write("cert.pem", cert.pem().as_bytes(), 0o644)?;
    write("cert.der", cert.der(), 0o644)?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match cli.cmd {
        Cmd::InitTls { out_dir, sans } => {
            return match init_tls(&out_dir, sans) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(EXIT_CONFIG, e),
            }
        }
        Cmd::Serve(a) => *a,
    };
    if args.tls_cert.is_none() && !args.insecure_http {
        return fail(
            EXIT_CONFIG,
            "give --tls-cert and --tls-key (or --insecure-http for tests)".into(),
        );
    }
    let cfg = match config(&args) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => match load_tls_config(c, k) {
            Ok(t) => Some(t),
            Err(e) => return fail(EXIT_CONFIG, error_chain(&e)),
        },
        _ => None,
    };
    let kbs = match Kbs::new(cfg) {
        Ok(k) => k,
        Err(e) => return fail(EXIT_CONFIG, error_chain(&e)),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(EXIT_RUNTIME, e.to_string()),
    };
    let result = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("bind {}: {e}", args.listen))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        eprintln!(
            "veil-kbs: listening on {}://{addr}",
            if tls.is_some() { "https" } else { "http" }
        );
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        serve(listener, tls, kbs.router(), shutdown)
            .await
            .map_err(|e| error_chain(&e))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(EXIT_RUNTIME, e),
    }
}
