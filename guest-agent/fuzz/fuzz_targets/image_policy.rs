//! The image policy document (JSON) a confidential pod gets from the broker.

#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_agent::disk::ImagePolicy;

fuzz_target!(|data: &[u8]| {
    let Ok(p) = ImagePolicy::parse(data) else {
        return;
    };
    // Lookups never panic, whatever the names; a name the policy does not
    // list is refused.
    let text = String::from_utf8_lossy(data);
    assert!(p.check("\u{0}not an image\u{0}", &"ab".repeat(32)).is_err());
    for word in text.split('"').take(64) {
        let _ = p.check(word, word);
    }
});
