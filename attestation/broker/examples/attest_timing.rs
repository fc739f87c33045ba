//! Times the attestation hot paths on this machine (not a test):
//! - SEV-SNP verification of the genuine Milan report (pinned chain + signature + extensions),
//! - a full RCAR round trip over loopback HTTP (auth, attest with simulated evidence, resource
//!   JWE, decrypt) with the guest client.
//!
//! `cargo run --release -p veil-attestation --example attest_timing [N]`

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use veil_attestation::client::{Attester, AttesterError, KbsClient, TcpConnector, Transport};
use veil_attestation::evidence::snp::SnpReport;
use veil_attestation::Tee;
use veil_kbs::server::{serve, Kbs, KbsConfig};
use veil_verifier::sim_ca::{init_sim_ca, load_verifying_key, SimChip};
use veil_verifier::verify::amd::AmdRoots;
use veil_verifier::verify::snp::{verify_snp_with_key, SnpTrust};

struct Sim(SimChip, [u8; 48]);

impl Attester for Sim {
    fn tee(&self) -> Tee {
        Tee::VeilSim
    }
    fn evidence<'a>(
        &'a self,
        rd: [u8; 64],
    ) -> Pin<
        Box<dyn std::future::Future<Output = Result<serde_json::Value, AttesterError>> + Send + 'a>,
    > {
        Box::pin(async move { Ok(self.0.evidence(&rd, &self.1, None)) })
    }
}

fn main() -> anyhow::Result<()> {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);

    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/snp");
    let text = std::fs::read_to_string(fixtures.join("report_milan.hex"))?;
    let raw = hex::decode(
        text.chars()
            .filter(char::is_ascii_hexdigit)
            .collect::<String>(),
    )?;
    let report = SnpReport::parse(&raw)?;
    let vcek = std::fs::read(fixtures.join("vcek_milan.der"))?;
    // The pinned roots parsed once, as the broker holds them.
    let trust = SnpTrust {
        roots: Some(AmdRoots::all_pinned()?),
        ..SnpTrust::default()
    };
    let t = Instant::now();
    for _ in 0..n {
        verify_snp_with_key(&report, &vcek, &report.report_data(), &trust, 0)?;
    }
    println!(
        "snp verify (Milan, pinned chain): {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3 / f64::from(n)
    );

    let dir = tempfile::tempdir()?;
    let files = init_sim_ca(&dir.path().join("sim"), false)?;
    let chip = SimChip::load(&dir.path().join("sim"))?;
    let m = veil_verifier::sim_measurement(b"k", b"i", "console=hvc0", 1, None);
    let mut cfg = KbsConfig::new(dir.path().join("state"));
    cfg.admin_token = Some("timing-admin-token-0123".into());
    cfg.anchors.sim_root = Some(load_verifying_key(&files.root_pub())?);
    let kbs = Kbs::new(cfg)?;
    let mut h = axum::http::HeaderMap::new();
    h.insert(
        axum::http::header::AUTHORIZATION,
        "Bearer timing-admin-token-0123".parse()?,
    );
    kbs.admin_put_resource(&h, ("default".into(), "key".into(), "disk".into()), b"k")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let policy = format!(
        "[[resource]]\npath = \"default/key/disk\"\ntee = [\"veil-sim\"]\nmeasurements = [\"{}\"]\nallow_simulated = true\n",
        hex::encode(m)
    );
    kbs.admin_set_policy(&h, policy.as_bytes())
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let router = kbs.clone().router();
        tokio::spawn(serve(listener, None, router, std::future::pending()));
        let attester = Arc::new(Sim(chip, m));
        let t = Instant::now();
        for _ in 0..n {
            let mut c = KbsClient::new(
                Box::new(TcpConnector {
                    addr: addr.to_string(),
                }),
                Transport::Plain,
                addr.to_string(),
            )?;
            c.attest(attester.as_ref()).await?;
            let key = c.get_resource("default", "key", "disk").await?;
            anyhow::ensure!(key.as_slice() == b"k");
        }
        println!(
            "RCAR round trip (auth + attest + resource + decrypt, loopback, no TLS): {:.2} ms",
            t.elapsed().as_secs_f64() * 1e3 / f64::from(n)
        );
        anyhow::Ok(())
    })
}
