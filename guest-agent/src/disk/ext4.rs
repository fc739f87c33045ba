//! A small ext4 formatter: an empty filesystem (root directory and
//! `lost+found`) on a block device, so the guest needs no `mke2fs`.
//!
//! What it makes: 4 KiB blocks, 32768 blocks per group, 256-byte inodes, one
//! inode per 16 KiB, sparse superblock backups, extents, directory index, file
//! types, huge files, no journal (the scratch disk lives and dies with the
//! pod: there is nothing to recover after a crash), no reserved blocks.
//! Everything `e2fsck -fn` checks is consistent (a test runs it).
//!
//! It writes only metadata: superblocks, group descriptors, bitmaps, the
//! first inode-table block and the two directory blocks. Unused inode tables
//! are left as they are (on an encrypted disk: random-looking), which the
//! kernel tolerates because it zeroes a new inode before use and consults the
//! bitmaps, not the tables, for free inodes. With `zero_inode_tables` they are
//! written as zeros too (needed under dm-integrity, where reading a block
//! never written is an I/O error). Every write is of whole blocks, so none
//! needs a read first.

use std::{fs::File, os::unix::fs::FileExt};

const BLOCK: u64 = 4096;
/// Blocks zeroed per write (`zero_inode_tables`).
const ZERO_RUN: u64 = 64;
const BLOCKS_PER_GROUP: u64 = 32768;
const INODE_SIZE: u64 = 256;
const INODES_PER_BLOCK: u64 = BLOCK / INODE_SIZE;
const BYTES_PER_INODE: u64 = 16384;
const DESC_SIZE: u64 = 32;
const FIRST_INO: u32 = 11;
const ROOT_INO: u32 = 2;
const LPF_INO: u32 = 11;

const COMPAT_EXT_ATTR: u32 = 0x8;
const COMPAT_DIR_INDEX: u32 = 0x20;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_EXTENTS: u32 = 0x40;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_LARGE_FILE: u32 = 0x2;
const RO_COMPAT_HUGE_FILE: u32 = 0x8;
const RO_COMPAT_DIR_NLINK: u32 = 0x20;
const RO_COMPAT_EXTRA_ISIZE: u32 = 0x40;
const EXTENTS_FL: u32 = 0x80000;

/// Errors of formatting.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    /// The device is too small (or too large) for this formatter.
    #[error("cannot make ext4 on {0} bytes (from 1 MiB to 16 TiB)")]
    Size(u64),
    /// Writing the device failed.
    #[error("cannot write the filesystem")]
    Io(#[source] std::io::Error),
}

/// Options of [`format`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Write zeros over every inode table (see the module doc).
    pub zero_inode_tables: bool,
}

/// The computed layout.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    blocks: u64,
    groups: u64,
    inodes_per_group: u64,
    itable_blocks: u64,
    gdt_blocks: u64,
}

fn is_power_of(mut n: u64, b: u64) -> bool {
    while n > 1 && n % b == 0 {
        n /= b;
    }
    n == 1
}

/// Whether group `g` holds a superblock and descriptor backup (sparse_super).
fn has_super(g: u64) -> bool {
    g <= 1 || is_power_of(g, 3) || is_power_of(g, 5) || is_power_of(g, 7)
}

impl Layout {
    fn new(size: u64) -> Result<Self, Ext4Error> {
        let mut blocks = size / BLOCK;
        if !(256..=u64::from(u32::MAX)).contains(&blocks) {
            return Err(Ext4Error::Size(size));
        }
        loop {
            let groups = blocks.div_ceil(BLOCKS_PER_GROUP);
            let inodes_per_group = (blocks * BLOCK / BYTES_PER_INODE)
                .div_ceil(groups)
                .next_multiple_of(INODES_PER_BLOCK)
                .clamp(INODES_PER_BLOCK, 8192);
            let l = Layout {
                blocks,
                groups,
                inodes_per_group,
                itable_blocks: inodes_per_group / INODES_PER_BLOCK,
                gdt_blocks: (groups * DESC_SIZE).div_ceil(BLOCK),
            };
            // A last group too small for its own metadata is dropped.
            let last = l.blocks_in(groups - 1);
            if groups > 1 && last < l.overhead(groups - 1) + 64 {
                blocks -= last;
                continue;
            }
            if l.overhead(0) + 2 > l.blocks_in(0) {
                return Err(Ext4Error::Size(size));
            }
            return Ok(l);
        }
    }

    fn blocks_in(&self, g: u64) -> u64 {
        (self.blocks - g * BLOCKS_PER_GROUP).min(BLOCKS_PER_GROUP)
    }

    fn start(&self, g: u64) -> u64 {
        g * BLOCKS_PER_GROUP
    }

    /// Blocks of group `g` taken by metadata.
    fn overhead(&self, g: u64) -> u64 {
        let sb = if has_super(g) { 1 + self.gdt_blocks } else { 0 };
        sb + 2 + self.itable_blocks
    }

    fn block_bitmap(&self, g: u64) -> u64 {
        self.start(g) + if has_super(g) { 1 + self.gdt_blocks } else { 0 }
    }

    fn inode_bitmap(&self, g: u64) -> u64 {
        self.block_bitmap(g) + 1
    }

    fn inode_table(&self, g: u64) -> u64 {
        self.block_bitmap(g) + 2
    }

    fn inodes(&self) -> u64 {
        self.inodes_per_group * self.groups
    }
}

struct Buf(Vec<u8>);

impl Buf {
    fn new(n: usize) -> Self {
        Buf(vec![0; n])
    }
    fn u16(&mut self, at: usize, v: u16) {
        self.0[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, at: usize, v: &[u8]) {
        self.0[at..at + v.len()].copy_from_slice(v);
    }
}

fn set_bits(bitmap: &mut [u8], from: u64, to: u64) {
    for i in from..to {
        bitmap[(i / 8) as usize] |= 1 << (i % 8);
    }
}

/// Formats `dev` (of `size` bytes) as an empty ext4 filesystem.
pub fn format(dev: &File, size: u64, opts: Options) -> Result<(), Ext4Error> {
    let l = Layout::new(size)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0);
    let mut uuid = [0u8; 16];
    let mut seed = [0u8; 16];
    {
        use rand_core::RngCore;
        rand_core::OsRng.fill_bytes(&mut uuid);
        rand_core::OsRng.fill_bytes(&mut seed);
    }
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    let write = |buf: &[u8], block: u64, offset: u64| {
        dev.write_all_at(buf, block * BLOCK + offset)
            .map_err(Ext4Error::Io)
    };

    // Group 0 holds the root directory and lost+found, one block each, right
    // after its inode table.
    let root_block = l.inode_table(0) + l.itable_blocks;
    let lpf_block = root_block + 1;

    let mut free_blocks = Vec::new();
    let mut free_inodes = Vec::new();
    for g in 0..l.groups {
        let used = l.overhead(g) + if g == 0 { 2 } else { 0 };
        free_blocks.push(l.blocks_in(g) - used);
        let used_inodes = if g == 0 { u64::from(FIRST_INO) } else { 0 };
        free_inodes.push(l.inodes_per_group - used_inodes);
    }

    // Group descriptors.
    let mut gdt = Buf::new((l.gdt_blocks * BLOCK) as usize);
    for g in 0..l.groups {
        let at = (g * DESC_SIZE) as usize;
        gdt.u32(at, l.block_bitmap(g) as u32);
        gdt.u32(at + 4, l.inode_bitmap(g) as u32);
        gdt.u32(at + 8, l.inode_table(g) as u32);
        gdt.u16(at + 12, free_blocks[g as usize] as u16);
        gdt.u16(at + 14, free_inodes[g as usize] as u16);
        gdt.u16(at + 16, if g == 0 { 2 } else { 0 });
    }

    for g in 0..l.groups {
        // Block bitmap: metadata (and group 0's two directory blocks) used;
        // bits past the group's end set.
        let mut bb = vec![0u8; BLOCK as usize];
        let used = l.overhead(g) + if g == 0 { 2 } else { 0 };
        set_bits(&mut bb, 0, used);
        set_bits(&mut bb, l.blocks_in(g), BLOCK * 8);
        write(&bb, l.block_bitmap(g), 0)?;
        // Inode bitmap: the reserved inodes in group 0; bits past the group's
        // inodes set.
        let mut ib = vec![0u8; BLOCK as usize];
        if g == 0 {
            set_bits(&mut ib, 0, u64::from(FIRST_INO));
        }
        set_bits(&mut ib, l.inodes_per_group, BLOCK * 8);
        write(&ib, l.inode_bitmap(g), 0)?;
        if opts.zero_inode_tables {
            // In runs of up to 64 blocks: one write each, not one per block.
            let zeros = vec![0u8; (BLOCK * ZERO_RUN) as usize];
            let mut b = 0;
            while b < l.itable_blocks {
                let n = ZERO_RUN.min(l.itable_blocks - b);
                write(&zeros[..(n * BLOCK) as usize], l.inode_table(g) + b, 0)?;
                b += n;
            }
        }
    }

    // Inode table block 0 of group 0: inodes 1..=16.
    let mut it = Buf::new(BLOCK as usize);
    let dir_inode = |it: &mut Buf, ino: u32, mode: u16, links: u16, block: u64| {
        let at = ((ino - 1) as u64 * INODE_SIZE) as usize;
        it.u16(at, mode);
        it.u32(at + 0x04, BLOCK as u32);
        for t in [0x08, 0x0C, 0x10] {
            it.u32(at + t, now);
        }
        it.u16(at + 0x1A, links);
        it.u32(at + 0x1C, (BLOCK / 512) as u32);
        it.u32(at + 0x20, EXTENTS_FL);
        // Extent header (magic, 1 entry, room for 4, depth 0), then the extent.
        let eb = at + 0x28;
        it.u16(eb, 0xF30A);
        it.u16(eb + 2, 1);
        it.u16(eb + 4, 4);
        it.u32(eb + 12, 0);
        it.u16(eb + 16, 1);
        it.u32(eb + 20, block as u32);
        it.u16(at + 0x80, 32); // i_extra_isize
    };
    dir_inode(&mut it, ROOT_INO, 0o040755, 3, root_block);
    dir_inode(&mut it, LPF_INO, 0o040700, 2, lpf_block);
    write(&it.0, l.inode_table(0), 0)?;

    // Directory blocks.
    let dirent = |d: &mut Buf, at: usize, ino: u32, rec: u16, name: &[u8]| {
        d.u32(at, ino);
        d.u16(at + 4, rec);
        d.0[at + 6] = name.len() as u8;
        d.0[at + 7] = 2; // directory
        d.bytes(at + 8, name);
    };
    let mut root = Buf::new(BLOCK as usize);
    dirent(&mut root, 0, ROOT_INO, 12, b".");
    dirent(&mut root, 12, ROOT_INO, 12, b"..");
    dirent(&mut root, 24, LPF_INO, (BLOCK - 24) as u16, b"lost+found");
    write(&root.0, root_block, 0)?;
    let mut lpf = Buf::new(BLOCK as usize);
    dirent(&mut lpf, 0, LPF_INO, 12, b".");
    dirent(&mut lpf, 12, ROOT_INO, (BLOCK - 12) as u16, b"..");
    write(&lpf.0, lpf_block, 0)?;

    // Superblock and its backups, each with its group number.
    let mut sb = Buf::new(1024);
    sb.u32(0x00, l.inodes() as u32);
    sb.u32(0x04, l.blocks as u32);
    sb.u32(0x0C, free_blocks.iter().sum::<u64>() as u32);
    sb.u32(0x10, free_inodes.iter().sum::<u64>() as u32);
    sb.u32(0x14, 0); // first data block
    sb.u32(0x18, 2); // 1024 << 2 = 4096
    sb.u32(0x1C, 2);
    sb.u32(0x20, BLOCKS_PER_GROUP as u32);
    sb.u32(0x24, BLOCKS_PER_GROUP as u32);
    sb.u32(0x28, l.inodes_per_group as u32);
    sb.u32(0x30, now);
    sb.u16(0x36, 0xFFFF); // max mount count: no forced checks
    sb.u16(0x38, 0xEF53);
    sb.u16(0x3A, 1); // clean
    sb.u16(0x3C, 1); // errors: continue
    sb.u32(0x40, now);
    sb.u32(0x4C, 1); // dynamic revision
    sb.u32(0x54, FIRST_INO);
    sb.u16(0x58, INODE_SIZE as u16);
    sb.u32(0x5C, COMPAT_EXT_ATTR | COMPAT_DIR_INDEX);
    sb.u32(0x60, INCOMPAT_FILETYPE | INCOMPAT_EXTENTS);
    sb.u32(
        0x64,
        RO_COMPAT_SPARSE_SUPER
            | RO_COMPAT_LARGE_FILE
            | RO_COMPAT_HUGE_FILE
            | RO_COMPAT_DIR_NLINK
            | RO_COMPAT_EXTRA_ISIZE,
    );
    sb.bytes(0x68, &uuid);
    sb.bytes(0x78, b"veil-scratch");
    sb.bytes(0xEC, &seed);
    sb.0[0xFC] = 1; // default directory hash: half_md4
    sb.u32(0x108, now);
    sb.u16(0x15C, 32);
    sb.u16(0x15E, 32);
    sb.u32(0x160, 1); // signed directory hash (x86)
    for g in (0..l.groups).filter(|&g| has_super(g)) {
        sb.u16(0x5A, g as u16);
        write(&gdt.0, l.start(g) + 1, 0)?;
        // Whole blocks only: a partial one would be read first, and under
        // dm-integrity a block never written does not read.
        let mut block = vec![0u8; BLOCK as usize];
        let at = if g == 0 { 1024 } else { 0 };
        block[at..at + 1024].copy_from_slice(&sb.0);
        write(&block, l.start(g), 0)?;
    }
    dev.sync_all().map_err(Ext4Error::Io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_super_groups() {
        let with: Vec<u64> = (0..60).filter(|&g| has_super(g)).collect();
        assert_eq!(with, [0, 1, 3, 5, 7, 9, 25, 27, 49]);
    }

    #[test]
    fn layouts() {
        let l = Layout::new(64 << 20).unwrap();
        assert_eq!((l.blocks, l.groups, l.gdt_blocks), (16384, 1, 1));
        assert_eq!(l.inodes_per_group, 4096);
        let l = Layout::new(1 << 30).unwrap();
        assert_eq!(
            (l.groups, l.inodes_per_group, l.itable_blocks),
            (8, 8192, 512)
        );
        // A last group of 100 blocks cannot hold its metadata: dropped.
        let l = Layout::new((32768 + 100) * 4096).unwrap();
        assert_eq!((l.blocks, l.groups), (32768, 1));
        assert!(Layout::new(100 * 4096).is_err());
    }
}
