//! TDX quote parser on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use veil_attestation::evidence::tdx::TdxQuote;

fuzz_target!(|data: &[u8]| {
    if let Ok(q) = TdxQuote::parse(data) {
        let _ = q.report.debug();
    }
});
