//! The dm-verity parameters of an image the host attaches: decoded from the
//! protobuf bytes the agent receives (`VerityParams`), then checked.

#![no_main]

use libfuzzer_sys::fuzz_target;
use protobuf::Message;
use veil_agent::disk::verity::Verity;
use veil_protocol::agent::VerityParams;

fuzz_target!(|data: &[u8]| {
    let Ok(p) = VerityParams::parse_from_bytes(data) else {
        return;
    };
    let Ok(v) = Verity::from_request(&p) else {
        return;
    };
    // What was accepted is a table the kernel can take: whole sectors, whole
    // blocks, hex of the algorithm's length, a salt within the kernel's limit.
    let digest_len = if v.algorithm == "sha256" { 32 } else { 64 };
    assert_eq!(v.root_hash.len(), 2 * digest_len);
    assert!(v.salt.len() <= 512);
    assert!(v.data_block_size.is_power_of_two() && v.hash_block_size.is_power_of_two());
    assert_eq!(v.hash_offset % u64::from(v.data_block_size), 0);
    assert_eq!(v.hash_offset % u64::from(v.hash_block_size), 0);
    let t = v.table("254:1");
    assert_eq!(t.length * 512, v.hash_offset);
    assert!(!t.params.contains('\n') && !t.params.contains('\0'));
    assert_eq!(t.params.split(' ').count(), 10);
    // Checking the normalised parameters again gives the same result.
    let mut again = VerityParams::new();
    again.root_hash = v.root_hash.clone();
    again.hash_offset = v.hash_offset;
    again.data_block_size = v.data_block_size;
    again.hash_block_size = v.hash_block_size;
    again.salt = v.salt.clone();
    again.hash_algorithm = v.algorithm.clone();
    assert_eq!(Verity::from_request(&again).ok(), Some(v));
});
