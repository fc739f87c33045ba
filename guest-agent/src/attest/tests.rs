//! The guest's attestation against a real broker (the `veil-kbs`
//! library's, in process, over TLS on 127.0.0.1) with a simulated attester
//! that speaks the firmware protocol over an in-memory pipe.

use std::sync::Arc;

use veil_attestation::client::{Connector, TcpConnector};
use veil_kbs::{
    audit::{AuditLog, Outcome},
    server::{load_tls_config, serve, Kbs, KbsConfig},
};
use veil_verifier::{
    sim_ca::{init_sim_ca, load_verifying_key, SimChip},
    TrustAnchors,
};

use super::{sim::FirmwareConn, *};

const KEY: &[u8] = b"scratch disk key: 32 bytes long!";
const POLICY: &[u8] = br#"{"images":{}}"#;

fn cmdline(pin: &[u8; 32]) -> String {
    format!(
        "console=ttyS0 veil.tee=sim veil.kbs.pin={} veil.kbs.res.disk-key=default/key/disk veil.kbs.res.image-policy=default/policy/images",
        hex::encode(pin)
    )
}

struct Broker {
    kbs: Arc<Kbs>,
    addr: std::net::SocketAddr,
    pin: [u8; 32],
    chip: SimChip,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Broker {
    fn refusals(&self) -> Vec<String> {
        self.kbs
            .audit()
            .events()
            .into_iter()
            .filter(|e| e.outcome == Outcome::Refusal)
            .filter_map(|e| e.reason)
            .collect()
    }

    fn releases(&self) -> usize {
        self.kbs
            .audit()
            .events()
            .iter()
            .filter(|e| e.outcome == Outcome::Release)
            .count()
    }
}

/// A broker releasing the key and the policy to simulated evidence of
/// `measurement` (`allow_simulated` as given).
async fn broker(measurement: [u8; 48], allow_simulated: bool) -> Broker {
    let dir = tempfile::tempdir().unwrap();
    let ca = init_sim_ca(&dir.path().join("ca"), false).unwrap();
    let state = dir.path().join("state");
    for (path, data) in [("default/key/disk", KEY), ("default/policy/images", POLICY)] {
        let p = state.join("resources").join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    let mut policy = String::new();
    for path in ["default/key/disk", "default/policy/images"] {
        policy += &format!(
            "[[resource]]\npath = \"{path}\"\ntee = [\"veil-sim\"]\nmeasurements = [\"{}\"]\nallow_simulated = {allow_simulated}\n",
            hex::encode(measurement)
        );
    }
    std::fs::write(state.join("policy.toml"), policy).unwrap();
    let mut cfg = KbsConfig::new(&state);
    cfg.audit = AuditLog::in_memory();
    cfg.anchors = TrustAnchors {
        sim_root: Some(load_verifying_key(&ca.root_pub()).unwrap()),
        ..Default::default()
    };
    let kbs = Kbs::new(cfg).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["kbs".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cp, kp) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cp, cert.pem()).unwrap();
    std::fs::write(&kp, key.serialize_pem()).unwrap();
    let tls = load_tls_config(&cp, &kp).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let router = kbs.clone().router();
    tokio::spawn(async move {
        let _ = serve(listener, Some(tls), router, async {
            let _ = rx.await;
        })
        .await;
    });
    use sha2::Digest;
    Broker {
        kbs,
        addr,
        pin: sha2::Sha256::digest(cert.der()).into(),
        chip: SimChip::load(&dir.path().join("ca")).unwrap(),
        _dir: dir,
        _stop: tx,
    }
}

/// A simulated firmware on an in-memory pipe signing over `measurement`.
fn firmware(chip: SimChip, measurement: [u8; 48]) -> Arc<dyn Attester> {
    Arc::new(sim::SimAttester::with_dial(Arc::new(move || {
        let chip = chip.clone();
        Box::pin(async move {
            let (a, mut b) = tokio::io::duplex(16 * 1024);
            tokio::spawn(async move {
                let rd = veil_protocol::simfw::read_request(&mut b).await.unwrap();
                let ev = serde_json::to_vec(&chip.evidence(&rd, &measurement, None)).unwrap();
                veil_protocol::simfw::write_response(&mut b, Ok(&ev))
                    .await
                    .unwrap();
            });
            Ok(Box::new(a) as Box<dyn FirmwareConn>)
        })
    })))
}

fn attestation(b: &Broker, cmd: &str, measurement: [u8; 48]) -> Attestation {
    let addr = b.addr.to_string();
    Attestation::new(
        GuestAttestConfig::from_cmdline(cmd),
        Ok(firmware(b.chip.clone(), measurement)),
        Arc::new(move || Box::new(TcpConnector { addr: addr.clone() }) as Box<dyn Connector>),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attests_fetches_every_resource_once_and_keeps_them_in_the_guest() {
    let m = [0x11; 48];
    let b = broker(m, true).await;
    let a = attestation(&b, &cmdline(&b.pin), m);
    assert!(a.has_broker());
    let s = a.attest(false).await.unwrap();
    assert_eq!(s.tee, Tee::VeilSim);
    assert_eq!(s.measurement, hex::encode(m));
    assert_eq!(s.resources, ["disk-key", "image-policy"]);
    assert_eq!(b.releases(), 2);
    assert_eq!(a.resource("disk-key").await.unwrap().as_slice(), KEY);
    assert_eq!(a.resource("image-policy").await.unwrap().as_slice(), POLICY);
    // Cached: no new release; refresh attests again.
    assert_eq!(a.attest(false).await.unwrap(), s);
    assert_eq!(b.releases(), 2);
    a.attest(true).await.unwrap();
    assert_eq!(b.releases(), 4);
    assert!(matches!(
        a.resource("other").await,
        Err(AttestError::UnknownResource(_))
    ));
    // The summary (what the API returns) carries no secret.
    assert!(!format!("{s:?}").contains("scratch disk key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_refuses_another_measurement_and_default_policy_simulated_evidence() {
    let b = broker([0x11; 48], true).await;
    let a = attestation(&b, &cmdline(&b.pin), [0x22; 48]);
    let e = a.resource("disk-key").await.unwrap_err();
    match &e {
        AttestError::Refused {
            what,
            status,
            reason,
        } => {
            assert_eq!((what.as_str(), *status), ("disk-key", 401));
            assert!(
                reason.contains("not among the reference values"),
                "{reason}"
            );
        }
        other => panic!("{other}"),
    }
    assert_eq!(e.kind(), Kind::FailedPrecondition);
    assert_eq!(b.releases(), 0);

    let b = broker([0x11; 48], false).await;
    let a = attestation(&b, &cmdline(&b.pin), [0x11; 48]);
    assert!(matches!(
        a.attest(false).await,
        Err(AttestError::Refused { .. })
    ));
    assert_eq!(b.releases(), 0);
    assert!(
        b.refusals().iter().any(|r| r.contains("simulated")),
        "{:?}",
        b.refusals()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_with_another_certificate_is_never_spoken_to() {
    let b = broker([0x11; 48], true).await;
    let mut pin = b.pin;
    pin[0] ^= 1;
    let a = attestation(&b, &cmdline(&pin), [0x11; 48]);
    let e = a.attest(false).await.unwrap_err();
    assert!(
        matches!(&e, AttestError::Broker(ClientError::Tls(_))),
        "{e}"
    );
    assert_eq!(e.kind(), Kind::Internal);
    assert!(
        b.kbs.audit().events().is_empty(),
        "no request reached the broker"
    );
}

#[tokio::test]
async fn unconfigured_and_misconfigured_guests_say_why() {
    let a = Attestation::disabled();
    assert!(matches!(
        a.attest(false).await,
        Err(AttestError::NotConfigured)
    ));
    assert_eq!(AttestError::NotConfigured.kind(), Kind::FailedPrecondition);
    let a = Attestation::new(
        GuestAttestConfig::from_cmdline("veil.tee=sim"),
        Err("x".into()),
        Arc::new(|| {
            Box::new(TcpConnector {
                addr: "127.0.0.1:1".into(),
            }) as Box<dyn Connector>
        }),
    );
    assert!(!a.has_broker());
    assert!(matches!(a.attest(false).await, Err(AttestError::NoBroker)));
    let a = Attestation::from_cmdline("veil.tee=sim veil.kbs.bogus=1");
    assert!(matches!(
        a.attest(false).await,
        Err(AttestError::Config(AttestConfigError::Unknown(_)))
    ));
}

#[test]
fn kernel_command_line_parsing_is_strict() {
    let pin = "ab".repeat(32);
    assert_eq!(
        GuestAttestConfig::from_cmdline("console=ttyS0 quiet"),
        Ok(None)
    );
    let c = GuestAttestConfig::from_cmdline(&format!(
        "quiet veil.tee=tdx veil.kbs.pin={pin} veil.kbs.res.disk-key=default/key/disk"
    ))
    .unwrap()
    .unwrap();
    assert_eq!(c.tee, Tee::Tdx);
    assert_eq!(c.pin, Some([0xab; 32]));
    assert_eq!(c.resources["disk-key"].to_string(), "default/key/disk");
    assert!(!c.scratch_integrity);
    let with = |s: &str| GuestAttestConfig::from_cmdline(s).unwrap().unwrap();
    assert!(with("veil.tee=sim veil.scratch=integrity").scratch_integrity);
    let err = |s: &str| GuestAttestConfig::from_cmdline(s).unwrap_err();
    assert_eq!(
        err("veil.tee=sim veil.scratch=none"),
        AttestConfigError::BadValue {
            key: "veil.scratch".into(),
            value: "none".into()
        }
    );
    assert!(matches!(
        err("veil.tee=sim veil.scratch"),
        AttestConfigError::BadValue { .. }
    ));
    assert_eq!(
        err("veil.tee=sim veil.scratch=integrity veil.scratch=integrity"),
        AttestConfigError::Duplicate("veil.scratch".into())
    );
    assert_eq!(err("veil.scratch=integrity"), AttestConfigError::NoTee);
    assert_eq!(
        err("veil.tee=sgx"),
        AttestConfigError::BadValue {
            key: "veil.tee".into(),
            value: "sgx".into()
        }
    );
    assert_eq!(
        err("veil.tee=sim veil.tee=snp"),
        AttestConfigError::Duplicate("veil.tee".into())
    );
    assert_eq!(
        err(&format!("veil.kbs.pin={pin}")),
        AttestConfigError::NoTee
    );
    assert_eq!(
        err("veil.tee=sim veil.kbs.res.k=a/b/c"),
        AttestConfigError::NoPin
    );
    assert!(matches!(
        err("veil.tee=sim veil.kbs.pin=abc"),
        AttestConfigError::BadValue { .. }
    ));
    for bad in ["a/b", "a/b/c/d", "a/../c", "a//c", "a/b/$", "a/b/c\u{e9}"] {
        assert!(
            matches!(
                err(&format!(
                    "veil.tee=sim veil.kbs.pin={pin} veil.kbs.res.k={bad}"
                )),
                AttestConfigError::BadValue { .. }
            ),
            "{bad}"
        );
    }
    assert!(matches!(
        err(&format!(
            "veil.tee=sim veil.kbs.pin={pin} veil.kbs.res.K=a/b/c"
        )),
        AttestConfigError::BadValue { .. }
    ));
    assert_eq!(
        err(&format!(
            "veil.tee=sim veil.kbs.pin={pin} veil.kbs.res.k=a/b/c veil.kbs.res.k=a/b/d"
        )),
        AttestConfigError::Duplicate("veil.kbs.res.k".into())
    );
    assert_eq!(
        err("veil.tee=sim veil.kbs.url=x"),
        AttestConfigError::Unknown("veil.kbs.url".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_is_fetched_when_the_launch_does_not_bind_the_policy_in_force() {
    let m = [0x11; 48];
    let b = broker(m, true).await;
    let a = attestation(&b, &cmdline(&b.pin), m);
    // The simulated firmware here reports zero host data: a delivered
    // document does not match it.
    a.bind_policy(b"version = 1\n");
    let e = a.attest(false).await.unwrap_err();
    assert!(matches!(e, AttestError::PolicyBinding(_)), "{e}");
    assert!(
        e.to_string().contains("does not bind the pod's policy"),
        "{e}"
    );
    assert_eq!(b.releases(), 0);
    // The built-in default (zeros) attests.
    a.bind_policy(b"");
    a.attest(false).await.unwrap();
}
