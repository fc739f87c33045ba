//! Simulated evidence (JSON envelope + SNP-layout report + chip certificate) on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use veil_attestation::evidence::Evidence;
use veil_attestation::Tee;

fuzz_target!(|data: &[u8]| {
    if let Ok(Evidence::Sim { chip_cert, .. }) = Evidence::from_json(Tee::VeilSim, data) {
        let _ = veil_verifier::sim_report::chip_public_key(&chip_cert);
        let _ = veil_verifier::sim_report::chip_cert_signature(&chip_cert);
    }
    let _ = Evidence::from_json(Tee::Snp, data);
    let _ = Evidence::from_json(Tee::Tdx, data);
});
