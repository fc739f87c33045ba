//! SEV-SNP report and certificate-table parsers, and the report's round trip through its
//! Trustee JSON form, on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use veil_attestation::evidence::snp::{CertTable, SnpReport};
use veil_attestation::evidence::snp_json::ReportJson;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = SnpReport::parse(data) {
        let _ = (r.generation(), r.reported_tcb(), r.debug_allowed(), r.chip_id());
        if let Ok(j) = ReportJson::from_report(&r) {
            let _ = j.to_report();
        }
    }
    if let Ok(t) = CertTable::parse(data) {
        let _ = CertTable::parse(&t.encode());
    }
});
