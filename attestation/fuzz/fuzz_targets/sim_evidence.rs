//! Primary evidence of every TEE (Trustee's SNP and TDX shapes, veil's simulated one) and the
//! simulated chip certificate, on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use veil_attestation::evidence::Evidence;
use veil_attestation::Tee;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(Evidence::Sim { chip_cert, .. }) = Evidence::from_primary(Tee::VeilSim, &v) {
        let _ = veil_verifier::sim_report::chip_public_key(&chip_cert);
        let _ = veil_verifier::sim_report::chip_cert_signature(&chip_cert);
    }
    let _ = Evidence::from_primary(Tee::Snp, &v);
    let _ = Evidence::from_primary(Tee::Tdx, &v);
});
