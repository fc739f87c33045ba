//! The simulated TEE's launch measurement: what the shim computes from what it actually launched,
//! and what `veil measure --mode sim` computes for reference values. Same function, both sides.
//!
//! Definition (all integers little-endian):
//!
//! ```text
//! SHA-384( "veil-sim-launch-measurement-v1\0"
//!          || SHA-384(kernel) || SHA-384(initrd)
//!          || u64(len(cmdline)) || cmdline
//!          || u32(vcpus)
//!          || u8(0)                         -- no firmware
//!           | u8(1) || SHA-384(firmware) )  -- firmware given
//! ```
//!
//! Changing any input (one byte of the kernel, one word of the command line, the vCPU count, the
//! firmware) changes the measurement.

use std::path::Path;

use sha2::{Digest, Sha384};

/// Domain separator of the simulated measurement.
pub const SIM_MEASUREMENT_DOMAIN: &[u8] = b"veil-sim-launch-measurement-v1\0";

/// The simulated launch measurement of `kernel`, `initrd`, `cmdline`, `vcpus` and the optional
/// firmware image. Pure: no I/O, no randomness.
pub fn sim_measurement(
    kernel: &[u8],
    initrd: &[u8],
    cmdline: &str,
    vcpus: u32,
    firmware: Option<&[u8]>,
) -> [u8; 48] {
    let mut h = Sha384::new();
    h.update(SIM_MEASUREMENT_DOMAIN);
    h.update(Sha384::digest(kernel));
    h.update(Sha384::digest(initrd));
    h.update((cmdline.len() as u64).to_le_bytes());
    h.update(cmdline.as_bytes());
    h.update(vcpus.to_le_bytes());
    match firmware {
        None => h.update([0u8]),
        Some(fw) => {
            h.update([1u8]);
            h.update(Sha384::digest(fw));
        }
    }
    let mut out = [0u8; 48];
    out.copy_from_slice(&h.finalize());
    out
}

/// [`sim_measurement`] over files (reads each file once).
pub fn sim_measurement_files(
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    vcpus: u32,
    firmware: Option<&Path>,
) -> std::io::Result<[u8; 48]> {
    let k = std::fs::read(kernel)?;
    let i = std::fs::read(initrd)?;
    let f = firmware.map(std::fs::read).transpose()?;
    Ok(sim_measurement(&k, &i, cmdline, vcpus, f.as_deref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_input_changes_the_measurement() {
        let base = sim_measurement(b"kernel", b"initrd", "console=hvc0 quiet", 1, None);
        assert_eq!(
            base,
            sim_measurement(b"kernel", b"initrd", "console=hvc0 quiet", 1, None)
        );
        let variants = [
            sim_measurement(b"kernel!", b"initrd", "console=hvc0 quiet", 1, None),
            sim_measurement(b"kernel", b"initrd!", "console=hvc0 quiet", 1, None),
            sim_measurement(b"kernel", b"initrd", "console=hvc0 loud", 1, None),
            sim_measurement(b"kernel", b"initrd", "console=hvc0 quiet", 2, None),
            sim_measurement(b"kernel", b"initrd", "console=hvc0 quiet", 1, Some(b"fw")),
            sim_measurement(b"kernel", b"initrd", "console=hvc0 quiet", 1, Some(b"")),
        ];
        for v in variants {
            assert_ne!(v, base);
        }
    }
}
