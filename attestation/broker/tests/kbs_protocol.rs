//! The broker over real HTTP on 127.0.0.1, driven with hand-built JSON in Trustee's shapes (not
//! our client): the release path, every refusal (each asserting that no key was released and
//! that the audit line names the reason once), Trustee-shaped SNP evidence from the genuine
//! fixture, the admin API's DELETE, and the error bodies.

#![allow(
    clippy::unwrap_used,
    reason = "integration-test helpers panic on setup failures"
)]

mod support;

use base64::Engine;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use serde_json::{json, Value};
use sha2::{Digest, Sha384};
use support::*;
use veil_attestation::jwe::{self, Jwe};
use veil_kbs::audit::Outcome;

fn broker(opts: BrokerOptions) -> (tokio::runtime::Runtime, Broker) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let b = rt.block_on(start_broker(opts));
    (rt, b)
}

struct Key {
    secret: p256::SecretKey,
    jwk: Value,
}

fn new_key() -> Key {
    let secret = p256::SecretKey::random(&mut rand_core::OsRng);
    let p = secret.public_key().to_encoded_point(false);
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW",
        "x": b.encode(p.x().unwrap()), "y": b.encode(p.y().unwrap()),
    });
    Key { secret, jwk }
}

/// SHA-384 of the canonical primary runtime data, zero-padded: computed here independently of
/// the library, by writing the JCS form of Trustee's `{"tee-pubkey", "nonce",
/// "additional-evidence"}` out by hand (members sorted, no whitespace; all values are plain
/// base64 strings that need no escaping, and there is no additional evidence).
fn report_data(nonce: &str, jwk: &Value) -> [u8; 64] {
    let f = |k: &str| jwk[k].as_str().unwrap().to_string();
    let canonical = format!(
        r#"{{"additional-evidence":"","nonce":"{nonce}","tee-pubkey":{{"alg":"{}","crv":"{}","kty":"{}","x":"{}","y":"{}"}}}}"#,
        f("alg"),
        f("crv"),
        f("kty"),
        f("x"),
        f("y")
    );
    let mut out = [0u8; 64];
    out[..48].copy_from_slice(&Sha384::digest(canonical.as_bytes()));
    out
}

fn auth(b: &Broker, tee: &str) -> (String, String) {
    let body = json!({"version": "0.4.0", "tee": tee, "extra-params": {}}).to_string();
    let (s, h, body) = raw_full(b.addr, "POST", "/kbs/v0/auth", &[], body.as_bytes());
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    let ch: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(ch["extra-params"]["selected-hash-algorithm"], "sha384");
    (cookie_of(&h), ch["nonce"].as_str().unwrap().to_string())
}

/// `/attest` with `evidence` as the primary evidence of Trustee's composite `tee-evidence`.
fn attest(b: &Broker, cookie: &str, nonce: &str, jwk: &Value, evidence: Value) -> (u16, Value) {
    let body = json!({
        "runtime-data": {"nonce": nonce, "tee-pubkey": jwk},
        "tee-evidence": {"primary_evidence": evidence, "additional_evidence": ""},
    });
    attest_body(b, cookie, body)
}

fn attest_body(b: &Broker, cookie: &str, body: Value) -> (u16, Value) {
    let body = body.to_string();
    let c = format!("kbs-session-id={cookie}");
    let (s, r) = raw(
        b.addr,
        "POST",
        "/kbs/v0/attest",
        &[("Cookie", &c)],
        body.as_bytes(),
    );
    (s, serde_json::from_slice(&r).unwrap_or(Value::Null))
}

fn get(b: &Broker, cookie: &str, path: &str) -> (u16, Value) {
    let c = format!("kbs-session-id={cookie}");
    let (s, r) = raw(b.addr, "GET", path, &[("Cookie", &c)], b"");
    (s, serde_json::from_slice(&r).unwrap_or(Value::Null))
}

const DISK: &str = "/kbs/v0/resource/default/key/disk";

/// Attests with good simulated evidence; returns the session cookie and key.
fn good_session(b: &Broker) -> (String, Key) {
    let (cookie, nonce) = auth(b, "veil-sim");
    let key = new_key();
    let ev = b.sim_evidence(
        report_data(&nonce, &key.jwk),
        measurement_for(CMDLINE),
        |_| {},
    );
    let (s, r) = attest(b, &cookie, &nonce, &key.jwk, ev);
    assert_eq!(s, 200, "{r}");
    assert!(r["token"].as_str().unwrap().split('.').count() == 3);
    (cookie, key)
}

fn assert_refused(b: &Broker, status: u16, body: &Value, want_status: u16, reason: &str) {
    assert_eq!(status, want_status, "body: {body}");
    assert_eq!(b.releases(), 0, "a key was released");
    let last = b.last_refusal();
    assert!(
        last.contains(reason),
        "audit reason {last:?} does not mention {reason:?}"
    );
    assert!(body["detail"].as_str().unwrap_or("").contains(reason) || want_status == 404);
}

#[test]
fn simulated_guest_with_reference_measurement_gets_the_key() {
    let (_rt, b) = broker(BrokerOptions::default());
    b.provision(true, &measurement_for(CMDLINE));
    let (cookie, key) = good_session(&b);
    let (s, r) = get(&b, &cookie, DISK);
    assert_eq!(s, 200, "{r}");
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(r["protected"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "ECDH-ES+A256KW");
    assert_eq!(header["enc"], "A256GCM");
    assert_eq!(header["epk"]["crv"], "P-256");
    let jwe: Jwe = serde_json::from_value(r).unwrap();
    assert_eq!(jwe::decrypt(&key.secret, &jwe).unwrap().as_slice(), SECRET);
    let release = b
        .audit()
        .into_iter()
        .find(|e| e.outcome == Outcome::Release)
        .unwrap();
    assert_eq!(
        release.measurement,
        Some(hex::encode(measurement_for(CMDLINE)))
    );
    assert_eq!(release.resource.as_deref(), Some("default/key/disk"));
}

#[test]
fn measurement_not_in_reference_values_is_refused() {
    let (_rt, b) = broker(BrokerOptions::default());
    b.provision(true, &measurement_for(CMDLINE));
    let (cookie, nonce) = auth(&b, "veil-sim");
    let key = new_key();
    // One changed command-line word.
    let other = measurement_for("console=hvc0 quiet veil.sandbox=0");
    let ev = b.sim_evidence(report_data(&nonce, &key.jwk), other, |_| {});
    assert_eq!(attest(&b, &cookie, &nonce, &key.jwk, ev).0, 200);
    let (s, r) = get(&b, &cookie, DISK);
    assert_refused(&b, s, &r, 401, "is not among the reference values");
    assert!(b.last_refusal().contains(&hex::encode(other)));
}

#[test]
fn replayed_evidence_with_old_nonce_is_refused() {
    let (_rt, b) = broker(BrokerOptions::default());
    b.provision(true, &measurement_for(CMDLINE));
    let (c1, n1) = auth(&b, "veil-sim");
    let key = new_key();
    let ev = b.sim_evidence(report_data(&n1, &key.jwk), measurement_for(CMDLINE), |_| {});
    assert_eq!(attest(&b, &c1, &n1, &key.jwk, ev.clone()).0, 200);
    // Same session again: its nonce is spent.
    let (s, r) = attest(&b, &c1, &n1, &key.jwk, ev.clone());
    assert_eq!(s, 401, "{r}");
    assert!(b.last_refusal().contains("nonce already used"));
    // New session, old runtime data and evidence.
    let (c2, n2) = auth(&b, "veil-sim");
    let (s, r) = attest(&b, &c2, &n1, &key.jwk, ev.clone());
    assert_eq!(s, 401, "{r}");
    assert!(b.last_refusal().contains("not this session's challenge"));
    // New session, new nonce claimed, evidence still bound to the old one.
    let (c3, n3) = auth(&b, "veil-sim");
    let (s, r) = attest(&b, &c3, &n3, &key.jwk, ev);
    assert_refused(&b, s, &r, 401, "report_data is not bound");
    let _ = n2;
    let (s, r) = get(&b, &c3, DISK);
    assert_refused(&b, s, &r, 401, "session has not attested");
}

#[test]
fn report_data_not_bound_to_presented_key_is_refused() {
    let (_rt, b) = broker(BrokerOptions::default());
    b.provision(true, &measurement_for(CMDLINE));
    let (cookie, nonce) = auth(&b, "veil-sim");
    let honest = new_key();
    let attacker = new_key();
    let ev = b.sim_evidence(
        report_data(&nonce, &honest.jwk),
        measurement_for(CMDLINE),
        |_| {},
    );
    let (s, r) = attest(&b, &cookie, &nonce, &attacker.jwk, ev);
    assert_refused(&b, s, &r, 401, "report_data is not bound");
}

#[test]
fn flipped_signature_bit_is_refused() {
    let (_rt, b) = broker(BrokerOptions::default());
    b.provision(true, &measurement_for(CMDLINE));
    let (cookie, nonce) = auth(&b, "veil-sim");
    let key = new_key();
    let mut ev = b.sim_evidence(
        report_data(&nonce, &key.jwk),
        measurement_for(CMDLINE),
        |_| {},
    );
    let std = base64::engine::general_purpose::STANDARD;
    let mut report = std.decode(ev["report"].as_str().unwrap()).unwrap();
    report[0x2A0 + 3] ^= 0x01;
    ev["report"] = json!(std.encode(report));
    let (s, r) = attest(&b, &cookie, &nonce, &key.jwk, ev);
    assert_refused(&b, s, &r, 401, "report signature does not verify");
}

#[test]
fn simulated_evidence_under_default_policy_is_refused() {
    let (_rt, b) = broker(BrokerOptions::default());
    b.provision(false, &measurement_for(CMDLINE));
    let (cookie, _key) = good_session(&b);
    let (s, r) = get(&b, &cookie, DISK);
    assert_refused(&b, s, &r, 401, "simulated evidence is not allowed");
    // The reason is printed once, in the audit line and in the error body.
    let reason = b.last_refusal();
    assert_eq!(
        reason,
        "policy denied the resource: simulated evidence is not allowed by this resource's policy"
    );
    assert_eq!(r["detail"], reason.as_str());
    assert_eq!(r["type"], "https://veil.invalid/kbs/errors/PolicyDeny");
}

#[test]
fn simulated_evidence_without_configured_sim_root_is_refused() {
    let (_rt, b) = broker(BrokerOptions {
        sim_root: false,
        ..Default::default()
    });
    b.provision(true, &measurement_for(CMDLINE));
    let (cookie, nonce) = auth(&b, "veil-sim");
    let key = new_key();
    let ev = b.sim_evidence(
        report_data(&nonce, &key.jwk),
        measurement_for(CMDLINE),
        |_| {},
    );
    let (s, r) = attest(&b, &cookie, &nonce, &key.jwk, ev);
    assert_refused(&b, s, &r, 401, "no simulated root is configured");
}

#[test]
fn debug_bit_is_refused() {
    let (_rt, b) = broker(BrokerOptions::default());
    b.provision(true, &measurement_for(CMDLINE));
    let (cookie, nonce) = auth(&b, "veil-sim");
    let key = new_key();
    let ev = b.sim_evidence(
        report_data(&nonce, &key.jwk),
        measurement_for(CMDLINE),
        |p| p.policy |= 1 << 19,
    );
    let (s, r) = attest(&b, &cookie, &nonce, &key.jwk, ev);
    assert_refused(&b, s, &r, 401, "debug bit");
    let refusal = b
        .audit()
        .into_iter()
        .rev()
        .find(|e| e.outcome == Outcome::Refusal)
        .unwrap();
    assert_eq!(refusal.step, "attest");
    assert_eq!(refusal.tee.as_deref(), Some("veil-sim"));
    assert_eq!(
        refusal.measurement,
        Some(hex::encode(measurement_for(CMDLINE)))
    );
}

#[test]
fn truncated_or_garbage_evidence_is_refused() {
    let (_rt, b) = broker(BrokerOptions::default());
    b.provision(true, &measurement_for(CMDLINE));
    let std = base64::engine::general_purpose::STANDARD;
    let key = new_key();
    // Truncated report.
    let (cookie, nonce) = auth(&b, "veil-sim");
    let mut ev = b.sim_evidence(
        report_data(&nonce, &key.jwk),
        measurement_for(CMDLINE),
        |_| {},
    );
    let report = std.decode(ev["report"].as_str().unwrap()).unwrap();
    ev["report"] = json!(std.encode(&report[..0x2A0]));
    let (s, r) = attest(&b, &cookie, &nonce, &key.jwk, ev);
    assert_refused(&b, s, &r, 401, "expected 0x4A0");
    // Garbage evidence.
    for garbage in [
        json!("garbage"),
        json!({"report": "!!!", "chip_cert": 1}),
        json!([1, 2]),
    ] {
        let (cookie, nonce) = auth(&b, "veil-sim");
        let (s, r) = attest(&b, &cookie, &nonce, &key.jwk, garbage);
        assert_refused(&b, s, &r, 401, "evidence");
    }
    // Garbage body.
    let (cookie, _) = auth(&b, "veil-sim");
    let c = format!("kbs-session-id={cookie}");
    let (s, _) = raw(
        b.addr,
        "POST",
        "/kbs/v0/attest",
        &[("Cookie", &c)],
        b"\x00\xffnot json",
    );
    assert_eq!(s, 400);
    assert_eq!(b.releases(), 0);
    // veil's former raw SNP shape is not Trustee's: refused, naming the missing field.
    let (cookie, nonce) = auth(&b, "snp");
    let ev = json!({"report": std.encode([0u8; 100])});
    let (s, r) = attest(&b, &cookie, &nonce, &key.jwk, ev);
    assert_refused(&b, s, &r, 401, "missing field `attestation_report`");
}

#[test]
fn expired_session_is_refused() {
    let (_rt, b) = broker(BrokerOptions {
        session_ttl_secs: 60,
        ..Default::default()
    });
    b.provision(true, &measurement_for(CMDLINE));
    // Expired before attesting.
    let (cookie, nonce) = auth(&b, "veil-sim");
    let key = new_key();
    let ev = b.sim_evidence(
        report_data(&nonce, &key.jwk),
        measurement_for(CMDLINE),
        |_| {},
    );
    b.clock.advance(61);
    let (s, r) = attest(&b, &cookie, &nonce, &key.jwk, ev);
    assert_refused(&b, s, &r, 401, "session expired");
    // Expired after attesting.
    let (cookie, _key) = good_session(&b);
    b.clock.advance(61);
    let (s, r) = get(&b, &cookie, DISK);
    assert_refused(&b, s, &r, 401, "session");
    assert!(b.last_refusal().contains("unknown session") || b.last_refusal().contains("expired"));
}

#[test]
fn unknown_resource_is_refused() {
    let (_rt, b) = broker(BrokerOptions::default());
    b.provision(true, &measurement_for(CMDLINE));
    let (cookie, _key) = good_session(&b);
    let (s, r) = get(&b, &cookie, "/kbs/v0/resource/default/key/nope");
    assert_refused(&b, s, &r, 404, "unknown resource");
    let (s, _) = get(&b, &cookie, "/kbs/v0/resource/default/key/..");
    assert_ne!(s, 200);
    assert_eq!(b.releases(), 0);
}

#[test]
fn resource_without_session_is_refused() {
    let (_rt, b) = broker(BrokerOptions::default());
    b.provision(true, &measurement_for(CMDLINE));
    let (s, r) = raw(b.addr, "GET", DISK, &[], b"");
    assert_eq!(s, 401);
    let r: Value = serde_json::from_slice(&r).unwrap();
    assert!(r["detail"]
        .as_str()
        .unwrap()
        .contains("no kbs-session-id cookie"));
    let (s, _) = raw(
        b.addr,
        "GET",
        DISK,
        &[("Authorization", "Bearer a.b.c")],
        b"",
    );
    assert_eq!(s, 401);
    assert_eq!(b.releases(), 0);
}

#[test]
fn missing_or_wrong_admin_token_is_refused() {
    let (_rt, b) = broker(BrokerOptions::default());
    for (headers, reason) in [
        (vec![], "missing admin token"),
        (
            vec![("Authorization", "Bearer not-the-admin-token")],
            "wrong admin token",
        ),
    ] {
        let (s, r) = raw(
            b.addr,
            "POST",
            "/kbs/v0/resource/default/key/evil",
            &headers,
            b"x",
        );
        assert_eq!(s, 401, "{}", String::from_utf8_lossy(&r));
        assert!(b.last_refusal().contains(reason), "{}", b.last_refusal());
        let (s, _) = raw(b.addr, "POST", "/kbs/v0/resource-policy", &headers, b"");
        assert_eq!(s, 401);
        let (s, _) = raw(b.addr, "POST", "/kbs/v0/reference-value", &headers, b"{}");
        assert_eq!(s, 401);
    }
    assert!(!b
        .dir
        .path()
        .join("state/resources/default/key/evil")
        .exists());
    // And the right token works, writing the file 0600.
    b.provision(true, &measurement_for(CMDLINE));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(b.dir.path().join("state/resources/default/key/disk"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn reference_values_registered_by_name_unlock_the_resource() {
    let (_rt, b) = broker(BrokerOptions::default());
    b.provision(true, &[0u8; 48]);
    let admin = format!("Bearer {ADMIN_TOKEN}");
    let refs = json!({"version": 1, "reference_values": [
        {"name": "veil-sim-test", "tee": "veil-sim", "measurement": hex::encode(measurement_for(CMDLINE))}
    ]});
    let (s, _) = raw(
        b.addr,
        "POST",
        "/kbs/v0/reference-value",
        &[("Authorization", &admin)],
        refs.to_string().as_bytes(),
    );
    assert_eq!(s, 200);
    let policy = "[[resource]]\npath = \"default/key/*\"\ntee = [\"veil-sim\"]\nreference_values = [\"veil-sim-test\"]\nallow_simulated = true\n";
    let (s, _) = raw(
        b.addr,
        "POST",
        "/kbs/v0/resource-policy",
        &[("Authorization", &admin)],
        policy.as_bytes(),
    );
    assert_eq!(s, 200);
    let (cookie, key) = good_session(&b);
    let (s, r) = get(&b, &cookie, DISK);
    assert_eq!(s, 200, "{r}");
    let jwe: Jwe = serde_json::from_value(r).unwrap();
    assert_eq!(jwe::decrypt(&key.secret, &jwe).unwrap().as_slice(), SECRET);
}

fn genuine_milan() -> (Vec<u8>, Vec<u8>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/snp");
    let hex_text = std::fs::read_to_string(dir.join("report_milan.hex")).unwrap();
    let clean: String = hex_text.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    (
        hex::decode(clean).unwrap(),
        std::fs::read(dir.join("vcek_milan.der")).unwrap(),
    )
}

/// The genuine fixture as Trustee's SNP attester sends it: built with the `sev` crate's own
/// types and serde, not ours.
fn trustee_snp_evidence(report: &[u8], vcek: &[u8]) -> Value {
    use sev::parser::ByteParser;
    let report = sev::firmware::guest::AttestationReport::from_bytes(report).unwrap();
    let chain = vec![sev::firmware::host::CertTableEntry::new(
        sev::firmware::host::CertType::VCEK,
        vcek.to_vec(),
    )];
    json!({"attestation_report": report, "cert_chain": chain})
}

#[test]
fn trustee_shaped_snp_evidence_is_verified_up_to_the_session_binding() {
    let (_rt, b) = broker(BrokerOptions::default());
    b.provision(true, &measurement_for(CMDLINE));
    let (raw, vcek) = genuine_milan();
    let key = new_key();
    let (cookie, nonce) = auth(&b, "snp");
    // Chain, VCEK signature and extensions verify; the genuine report cannot carry this
    // session's binding, which is the one check left.
    let (s, r) = attest(
        &b,
        &cookie,
        &nonce,
        &key.jwk,
        trustee_snp_evidence(&raw, &vcek),
    );
    assert_refused(&b, s, &r, 401, "report_data is not bound to this session");
    let refusal = b
        .audit()
        .into_iter()
        .rev()
        .find(|e| e.outcome == Outcome::Refusal)
        .unwrap();
    assert_eq!(refusal.tee.as_deref(), Some("snp"));
    let report = veil_attestation::evidence::snp::SnpReport::parse(&raw).unwrap();
    assert_eq!(refusal.measurement, Some(hex::encode(report.measurement())));
    // One flipped report bit in the same shape: the signature check names it.
    let mut flipped = raw.clone();
    flipped[0x90] ^= 1;
    let (cookie, nonce) = auth(&b, "snp");
    let (s, r) = attest(
        &b,
        &cookie,
        &nonce,
        &key.jwk,
        trustee_snp_evidence(&flipped, &vcek),
    );
    assert_refused(&b, s, &r, 401, "report signature does not verify");
}

#[test]
fn malformed_fields_get_clear_errors() {
    let (_rt, b) = broker(BrokerOptions::default());
    b.provision(true, &measurement_for(CMDLINE));
    let key = new_key();
    // An RSA tee-pubkey parses as Trustee's, and is refused by name.
    let (cookie, nonce) = auth(&b, "veil-sim");
    let rsa = json!({"kty": "RSA", "alg": "RSA1_5", "n": "AQAB", "e": "AQAB"});
    let ev = b.sim_evidence(
        report_data(&nonce, &key.jwk),
        measurement_for(CMDLINE),
        |_| {},
    );
    let (s, r) = attest(&b, &cookie, &nonce, &rsa, ev.clone());
    assert_refused(&b, s, &r, 401, "TEE public key type RSA is not supported");
    // An EC key on another curve.
    let (cookie, nonce) = auth(&b, "veil-sim");
    let mut p384 = key.jwk.clone();
    p384["crv"] = json!("P-384");
    let (s, r) = attest(&b, &cookie, &nonce, &p384, ev.clone());
    assert_refused(&b, s, &r, 401, "curve \"P-384\"");
    // Device evidence veil does not verify.
    let (cookie, nonce) = auth(&b, "veil-sim");
    let body = json!({
        "runtime-data": {"nonce": nonce, "tee-pubkey": key.jwk},
        "tee-evidence": {"primary_evidence": ev, "additional_evidence": "{\"nvidia\":1}"},
    });
    let (s, r) = attest_body(&b, &cookie, body);
    assert_refused(
        &b,
        s,
        &r,
        401,
        "additional (device) evidence is not supported",
    );
    // Missing members are named, in words.
    let (cookie, nonce) = auth(&b, "veil-sim");
    let body = json!({"runtime-data": {"nonce": nonce, "tee-pubkey": key.jwk}});
    let (s, r) = attest_body(&b, &cookie, body);
    assert_eq!(s, 400, "{r}");
    assert!(
        r["detail"]
            .as_str()
            .unwrap()
            .starts_with("invalid request: Attestation is not a KBS Attestation payload: missing field `tee-evidence`"),
        "{r}"
    );
    // Unknown and unsupported TEEs.
    for (tee, want) in [
        ("sgx", "TEE type \"sgx\" is not supported"),
        ("bogus", "unknown variant `bogus`"),
    ] {
        let body = json!({"version": "0.4.0", "tee": tee, "extra-params": {}}).to_string();
        let (s, r) = raw(b.addr, "POST", "/kbs/v0/auth", &[], body.as_bytes());
        let r: Value = serde_json::from_slice(&r).unwrap();
        assert_eq!(s, 400, "{r}");
        assert!(r["detail"].as_str().unwrap().contains(want), "{r}");
    }
    assert_eq!(b.releases(), 0);
}

#[test]
fn resources_can_be_deleted_and_other_methods_answer_with_a_body() {
    let (_rt, b) = broker(BrokerOptions::default());
    b.provision(true, &measurement_for(CMDLINE));
    let (s, body) = b.admin("DELETE", DISK, b"");
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    assert!(!b
        .dir
        .path()
        .join("state/resources/default/key/disk")
        .exists());
    let (s, body) = b.admin("DELETE", DISK, b"");
    assert_eq!(s, 404);
    let e: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        e["type"],
        "https://veil.invalid/kbs/errors/ResourceNotFound"
    );
    // Without the admin token, nothing is deleted.
    b.provision(true, &measurement_for(CMDLINE));
    let (s, _) = raw(b.addr, "DELETE", DISK, &[], b"");
    assert_eq!(s, 401);
    assert!(b
        .dir
        .path()
        .join("state/resources/default/key/disk")
        .exists());
    // A method an endpoint does not take, and an endpoint that does not exist: JSON bodies.
    let (s, body) = raw(b.addr, "PUT", DISK, &[], b"x");
    assert_eq!(s, 405);
    let e: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        e["type"],
        "https://veil.invalid/kbs/errors/MethodNotAllowed"
    );
    assert_eq!(e["detail"], "method PUT is not allowed on this endpoint");
    let (s, body) = raw(b.addr, "GET", "/kbs/v0/auth", &[], b"");
    assert_eq!(s, 405, "{}", String::from_utf8_lossy(&body));
    let (s, body) = raw(b.addr, "GET", "/kbs/v0/nothing", &[], b"");
    assert_eq!(s, 404);
    let e: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(e["type"], "https://veil.invalid/kbs/errors/NotFound");
}

#[test]
fn the_session_cookie_is_not_secure_on_plain_http() {
    let (_rt, b) = broker(BrokerOptions::default());
    let body = json!({"version": "0.4.0", "tee": "veil-sim", "extra-params": {}}).to_string();
    let (s, h, _) = raw_full(b.addr, "POST", "/kbs/v0/auth", &[], body.as_bytes());
    assert_eq!(s, 200);
    let cookie = h.iter().find(|(k, _)| k == "set-cookie").unwrap().1.clone();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(!cookie.contains("Secure"), "{cookie}");
}
