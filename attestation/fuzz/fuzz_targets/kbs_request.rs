//! Key-broker request bodies: the auth Request, the Attestation (with its composite evidence
//! for every TEE and its runtime-data binding), JWE responses, the TOML policy and reference
//! values, all from arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use veil_attestation::evidence::Evidence;
use veil_attestation::jwe::Jwe;
use veil_attestation::protocol::{self, AuthRequest, HashAlgorithm};
use veil_attestation::Tee;
use veil_kbs::policy::Policy;
use veil_verifier::reference::ReferenceValues;

fuzz_target!(|data: &[u8]| {
    let _ = AuthRequest::parse(data);
    if let Ok(a) = protocol::parse_attestation(data) {
        let _ = protocol::report_data(
            &a.runtime_data,
            &a.tee_evidence.additional_evidence,
            HashAlgorithm::Sha384,
        );
        let _ = veil_attestation::jwe::public_key_from_jwk(&a.runtime_data.tee_pubkey);
        for tee in [Tee::Snp, Tee::Tdx, Tee::VeilSim] {
            let _ = Evidence::from_composite(tee, &a.tee_evidence);
        }
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = protocol::jcs(&v);
        let _ = protocol::selected_hash(&v);
    }
    if let Ok(j) = serde_json::from_slice::<Jwe>(data) {
        let _ = veil_attestation::client::TeeKey::generate().decrypt(&j);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Policy::from_toml(text);
    }
    let _ = ReferenceValues::from_json(data);
});
