//! Key-broker request bodies: auth Request, Attestation (with its evidence for every TEE),
//! JWE responses, the TOML policy and reference values, all from arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use veil_attestation::evidence::Evidence;
use veil_attestation::jwe::Jwe;
use veil_kbs::policy::Policy;
use veil_attestation::protocol::{self, Attestation, HashAlgorithm, Request};
use veil_verifier::reference::ReferenceValues;
use veil_attestation::Tee;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<Request>(data);
    if let Ok(a) = serde_json::from_slice::<Attestation>(data) {
        let _ = protocol::runtime_data_report_data(&a.runtime_data, HashAlgorithm::Sha384);
        let _ = veil_attestation::jwe::public_key_from_jwk(&a.runtime_data.tee_pubkey);
        for tee in [Tee::Snp, Tee::Tdx, Tee::VeilSim] {
            let _ = Evidence::from_value(tee, &a.tee_evidence);
        }
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = protocol::jcs(&v);
    }
    if let Ok(j) = serde_json::from_slice::<Jwe>(data) {
        let _ = veil_attestation::client::TeeKey::generate().decrypt(&j);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Policy::from_toml(text);
    }
    let _ = ReferenceValues::from_json(data);
});

