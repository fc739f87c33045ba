//! SEV-SNP report and certificate-table parsers on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use veil_attestation::evidence::snp::{CertTable, SnpReport};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = SnpReport::parse(data) {
        let _ = (r.generation(), r.reported_tcb(), r.debug_allowed(), r.chip_id());
    }
    if let Ok(t) = CertTable::parse(data) {
        let _ = CertTable::parse(&t.encode());
    }
});
