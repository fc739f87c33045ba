//! The LUKS2 header of the scratch disk: the host writes every byte of it.
//!
//! Input: one flag byte, then the start of the disk. Bit 0 of the flag set: the
//! harness re-seals the SHA-256 checksum of every header copy whose magic is in
//! the input, so mutations reach the JSON metadata and the keyslot code instead
//! of stopping at the checksum. The disk is the input followed by zeros up to
//! 32 MiB (the keyslot material a real disk holds reads as zeros), then ends.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use veil_agent::disk::luks2::{self, Limits, Luks2Error, ReadAt};

/// What the seed corpus was formatted with (`veil-fuzz-seeds`).
const PASSPHRASE: &[u8] = b"veil-fuzz-passphrase";
const DISK_SIZE: u64 = 32 << 20;

/// The input, then zeros, then the end of the device.
struct Disk(Vec<u8>);

impl ReadAt for Disk {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > DISK_SIZE) {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.fill(0);
        let start = offset as usize;
        if start < self.0.len() {
            let n = buf.len().min(self.0.len() - start);
            buf[..n].copy_from_slice(&self.0[start..start + n]);
        }
        Ok(())
    }
}

/// Writes the checksum a valid copy at `at` would carry (its own `hdr_size`
/// bytes, checksum field zeroed), growing the input to hold the whole copy.
fn seal(disk: &mut Vec<u8>, at: usize) {
    if disk.len() < at + 4096 || !matches!(&disk[at..at + 4], b"LUKS" | b"SKUL") {
        return;
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&disk[at + 8..at + 16]);
    let hdr_size = u64::from_be_bytes(size);
    if !luks2::HDR_SIZES.contains(&hdr_size) {
        return;
    }
    let end = at + hdr_size as usize;
    if disk.len() < end {
        disk.resize(end, 0);
    }
    disk[at + 448..at + 512].fill(0);
    let sum = Sha256::digest(&disk[at..end]);
    disk[at + 448..at + 480].copy_from_slice(&sum);
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut disk = rest.to_vec();
    if flags & 1 == 1 {
        // The primary header at 0, a secondary at one of the header sizes.
        for at in std::iter::once(0).chain(luks2::HDR_SIZES) {
            seal(&mut disk, at as usize);
        }
    }
    let disk = Disk(disk);
    // Small bounds: the seed's own PBKDF2 counts (1000) pass, anything costlier
    // is refused before it is spent, as the agent's defaults refuse worse.
    let limits = Limits {
        max_argon2_kib: 256,
        max_iterations: 1000,
    };
    let unlocked = luks2::unlock(&disk, PASSPHRASE, &limits);
    let is_luks = luks2::is_luks(&disk);
    match &unlocked {
        Err(Luks2Error::NotLuks) => assert!(matches!(is_luks, Ok(false))),
        Err(Luks2Error::Io(..)) => {}
        _ => assert!(matches!(is_luks, Ok(true)), "unlockable but not LUKS"),
    }
    if let Ok(u) = unlocked {
        let s = &u.segment;
        assert!(matches!(s.sector_size, 512 | 1024 | 2048 | 4096));
        assert_eq!(s.offset % u64::from(s.sector_size), 0);
        assert!(s.size.is_none_or(|n| n % u64::from(s.sector_size) == 0));
        assert!(!u.volume_key.is_empty() && u.volume_key.len() <= 64);
    }
});
