//! Our guest-side client against the broker over TLS with a pinned certificate, and the TDX
//! quote path (parse + offline `dcap-qvl` verification) on a sample quote with its collateral.

#![allow(
    clippy::unwrap_used,
    reason = "integration-test helpers panic on setup failures"
)]

mod support;

use support::*;
use veil_attestation::client::{ClientError, KbsClient, TcpConnector, Transport};
use veil_attestation::evidence::{tdx_evidence_json, Evidence};
use veil_attestation::Tee;
use veil_verifier::verify::tdx::{verify_tdx, TdxTrust, TdxVerifyError};

fn client(b: &Broker, pinned: Vec<u8>) -> KbsClient {
    KbsClient::new(
        Box::new(TcpConnector {
            addr: b.addr.to_string(),
        }),
        Transport::Tls {
            pinned_der: pinned,
            server_name: "localhost".into(),
        },
        b.addr.to_string(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rcar_client_attests_and_decrypts_over_pinned_tls() {
    let b = start_broker(BrokerOptions {
        tls: true,
        ..Default::default()
    })
    .await;
    let m = measurement_for(CMDLINE);
    // Provision through the library (the admin API is covered over HTTP elsewhere).
    let headers = {
        let mut h = axum::http::HeaderMap::new();
        h.insert(
            axum::http::header::AUTHORIZATION,
            format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
        );
        h
    };
    b.kbs
        .admin_put_resource(
            &headers,
            ("default".into(), "key".into(), "disk".into()),
            SECRET,
        )
        .unwrap();
    let policy = format!(
        "[[resource]]\npath = \"default/key/disk\"\ntee = [\"veil-sim\"]\nmeasurements = [\"{}\"]\nallow_simulated = true\n",
        hex::encode(m)
    );
    b.kbs.admin_set_policy(&headers, policy.as_bytes()).unwrap();

    let attester = SimAttester {
        chip: b.chip.clone(),
        measurement: m,
    };
    let mut c = client(&b, b.cert_der.clone().unwrap());
    let token = c.attest(&attester).await.unwrap();
    assert_eq!(token.split('.').count(), 3);
    let key = c.get_resource("default", "key", "disk").await.unwrap();
    assert_eq!(key.as_slice(), SECRET);
    let err = c.get_resource("default", "key", "other").await.unwrap_err();
    assert!(
        matches!(err, ClientError::Refused { status: 404, .. }),
        "{err}"
    );

    // Wrong measurement: attestation succeeds, the resource is refused.
    let wrong = SimAttester {
        chip: b.chip.clone(),
        measurement: measurement_for("console=hvc0 init=/bin/sh"),
    };
    let mut c2 = client(&b, b.cert_der.clone().unwrap());
    c2.attest(&wrong).await.unwrap();
    let err = c2.get_resource("default", "key", "disk").await.unwrap_err();
    match err {
        ClientError::Refused { status, detail } => {
            assert_eq!(status, 401);
            assert!(
                detail.contains("not among the reference values"),
                "{detail}"
            );
        }
        e => panic!("{e}"),
    }

    // A different pinned certificate: the TLS handshake fails before any request.
    let mut c3 = client(&b, b"some other certificate".to_vec());
    let err = c3.attest(&attester).await.unwrap_err();
    assert!(matches!(err, ClientError::Tls(_)), "{err}");
    assert_eq!(b.releases(), 1);

    // Pinning by the certificate's SHA-256 (what a guest's measured command line carries).
    use sha2::Digest;
    let digest: [u8; 32] = sha2::Sha256::digest(b.cert_der.clone().unwrap()).into();
    let by_digest = |cert_sha256| {
        KbsClient::new(
            Box::new(TcpConnector {
                addr: b.addr.to_string(),
            }),
            Transport::TlsSha256 {
                cert_sha256,
                server_name: "kbs".into(),
            },
            "kbs",
        )
        .unwrap()
    };
    let mut c4 = by_digest(digest);
    c4.attest(&attester).await.unwrap();
    assert_eq!(
        c4.get_resource("default", "key", "disk")
            .await
            .unwrap()
            .as_slice(),
        SECRET
    );
    let mut flipped = digest;
    flipped[31] ^= 1;
    let err = by_digest(flipped).attest(&attester).await.unwrap_err();
    assert!(matches!(err, ClientError::Tls(_)), "{err}");
    assert_eq!(b.releases(), 2);
}

const QUOTE: &[u8] = include_bytes!("../../testdata/tdx/tdx_quote");
const COLLATERAL: &[u8] = include_bytes!("../../testdata/tdx/tdx_quote_collateral.json");

/// Unix seconds of an RFC 3339 UTC timestamp `YYYY-MM-DDTHH:MM:SSZ`.
fn unix(ts: &str) -> u64 {
    let n = |a: usize, b: usize| ts[a..b].parse::<i64>().unwrap();
    let (y, m, d) = (n(0, 4), n(5, 7), n(8, 10));
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    (days * 86_400 + n(11, 13) * 3600 + n(14, 16) * 60 + n(17, 19)) as u64
}

fn trust() -> (TdxTrust, u64) {
    let collateral: dcap_qvl::QuoteCollateralV3 = serde_json::from_slice(COLLATERAL).unwrap();
    let tcb: serde_json::Value = serde_json::from_str(&collateral.tcb_info).unwrap();
    let qe: serde_json::Value = serde_json::from_str(&collateral.qe_identity).unwrap();
    let now =
        unix(tcb["issueDate"].as_str().unwrap()).max(unix(qe["issueDate"].as_str().unwrap())) + 60;
    (
        TdxTrust {
            collateral: Some(collateral),
            accepted_statuses: vec![],
        },
        now,
    )
}

fn tdx_evidence(raw: &[u8]) -> veil_attestation::evidence::TdxEvidence {
    match Evidence::from_primary(Tee::Tdx, &tdx_evidence_json(raw, None)).unwrap() {
        Evidence::Tdx(t) => *t,
        _ => unreachable!(),
    }
}

#[test]
fn tdx_sample_quote_verifies_offline_and_binds_report_data() {
    let ev = tdx_evidence(QUOTE);
    assert_eq!(ev.quote.version, 4);
    let (trust, now) = trust();
    let rd = ev.quote.report.report_data;
    let v = verify_tdx(&ev, &rd, &trust, now).unwrap();
    assert_eq!(v.tcb_status, "UpToDate");
    let mut other = rd;
    other[0] ^= 1;
    assert!(matches!(
        verify_tdx(&ev, &other, &trust, now),
        Err(TdxVerifyError::ReportDataMismatch)
    ));
    let none = TdxTrust::default();
    assert!(matches!(
        verify_tdx(&ev, &rd, &none, now),
        Err(TdxVerifyError::NoCollateral)
    ));
}

#[test]
fn tdx_quote_with_one_flipped_bit_is_rejected() {
    let (trust, now) = trust();
    // In the TD report (MRTD) and in the signature data.
    for pos in [48 + 136, 48 + 520, QUOTE.len() - 100] {
        let mut q = QUOTE.to_vec();
        q[pos] ^= 0x01;
        let ev = match Evidence::from_primary(Tee::Tdx, &tdx_evidence_json(&q, None)) {
            Ok(Evidence::Tdx(t)) => *t,
            _ => continue, // rejected by the parser already
        };
        let rd = ev.quote.report.report_data;
        assert!(
            matches!(
                verify_tdx(&ev, &rd, &trust, now),
                Err(TdxVerifyError::Signature(_))
            ),
            "flip at {pos} accepted"
        );
    }
    // Truncated quotes never parse (the sample carries 70 bytes of zero padding after its
    // 4936 bytes of quote, which the parser accepts; cutting into the signature data is not).
    for cut in [0usize, 47, 631, 700, 4935] {
        assert!(Evidence::from_primary(Tee::Tdx, &tdx_evidence_json(&QUOTE[..cut], None)).is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trustee_shaped_tdx_evidence_through_the_broker() {
    let (trust, now) = trust();
    let b = start_broker(BrokerOptions {
        tdx: Some((trust, now)),
        ..Default::default()
    })
    .await;
    let addr = b.addr;
    let run = move |body: serde_json::Value, cookie: Option<String>| {
        tokio::task::spawn_blocking(move || {
            let c = cookie.map(|c| format!("kbs-session-id={c}"));
            let headers: Vec<(&str, &str)> = c
                .as_deref()
                .map(|c| vec![("Cookie", c)])
                .unwrap_or_default();
            let path = if c.is_some() {
                "/kbs/v0/attest"
            } else {
                "/kbs/v0/auth"
            };
            raw_full(addr, "POST", path, &headers, body.to_string().as_bytes())
        })
    };
    let (s, h, body) = run(
        serde_json::json!({"version": "0.4.0", "tee": "tdx", "extra-params": {}}),
        None,
    )
    .await
    .unwrap();
    assert_eq!(s, 200);
    let nonce = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["nonce"].clone();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    // The way Trustee's TDX attester wraps it: {cc_eventlog, quote}, as primary evidence.
    let primary = serde_json::json!({"cc_eventlog": null, "quote": b64.encode(QUOTE)});
    let key = veil_attestation::client::TeeKey::generate().public_jwk();
    let attestation = serde_json::json!({
        "runtime-data": {"nonce": nonce, "tee-pubkey": key},
        "tee-evidence": {"primary_evidence": primary, "additional_evidence": ""},
    });
    let (s, _, body) = run(attestation, Some(cookie_of(&h))).await.unwrap();
    let e: serde_json::Value = serde_json::from_slice(&body).unwrap();
    // dcap-qvl accepted the quote and its collateral; the sample cannot carry this session's
    // binding, which is the check that refuses.
    assert_eq!(s, 401, "{e}");
    assert!(
        e["detail"]
            .as_str()
            .unwrap()
            .contains("TDX REPORTDATA is not bound to this session"),
        "{e}"
    );
    assert_eq!(b.releases(), 0);
}
