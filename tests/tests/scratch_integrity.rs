//! The scratch disk's integrity, end to end: a `veil` pod under a private
//! containerd (real QEMU, guest kernel, agent, dm-crypt and dm-integrity)
//! writes a file to its root filesystem, which lives on the scratch disk;
//! the test, as a hostile host, then changes the disk's file under the
//! running VM and the container reads the file back, the guest's page cache
//! emptied first (the container is privileged for that).
//!
//! - One flipped ciphertext byte: with `scratch_integrity` the read fails
//!   with an I/O error; without it the read succeeds with other data.
//! - One 4 KiB block put back as it was before the file was rewritten (a
//!   rollback): with integrity an I/O error; without it the container reads
//!   the old content and nothing tells it so.
//!
//! The file's blocks are found on the host by comparing snapshots of the
//! scratch file before and after each write: the one run of 256 changed
//! blocks is the 1 MiB file (ext4 gives a fresh file one extent).

use std::{
    fs::OpenOptions,
    os::unix::fs::FileExt,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};
use veil_tests::{
    containerd::{output_text, Containerd},
    oci,
    storage::scratch_file,
    Artefacts,
};

const NS: &str = "veil-test";
const BLOCK: usize = 4096;
/// The file: 256 blocks.
const BLOCKS: usize = 256;

/// `yes WORD | head -c 1 MiB`, as the container makes it.
fn content(word: &str) -> Vec<u8> {
    let line = format!("{word}\n");
    line.as_bytes()
        .iter()
        .copied()
        .cycle()
        .take(BLOCK * BLOCKS)
        .collect()
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// The longest run of 4 KiB blocks that differ between `a` and `b`: (first
/// block, length).
fn changed_run(a: &[u8], b: &[u8]) -> (usize, usize) {
    let (mut best, mut start, mut len) = ((0, 0), 0, 0);
    for (i, (x, y)) in a.chunks(BLOCK).zip(b.chunks(BLOCK)).enumerate() {
        if x != y {
            if len == 0 {
                start = i;
            }
            len += 1;
            if len > best.1 {
                best = (start, len);
            }
        } else {
            len = 0;
        }
    }
    best
}

struct Pod<'a> {
    c: &'a Containerd,
    id: String,
}

impl Pod<'_> {
    /// Runs `script` in the pod; returns (success, stdout, stderr).
    fn sh(&self, exec_id: &str, script: &str) -> Result<(bool, String, String)> {
        let o = self
            .c
            .ctr(NS)
            .args([
                "task",
                "exec",
                "--exec-id",
                exec_id,
                &self.id,
                "sh",
                "-c",
                script,
            ])
            .output()?;
        Ok((
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ))
    }

    fn sh_ok(&self, exec_id: &str, script: &str) -> Result<String> {
        let (ok, out, err) = self.sh(exec_id, script)?;
        ensure!(ok, "{script}: failed: {out}{err}");
        Ok(out)
    }

    /// Writes the file as `yes WORD`, in place over the same blocks if it
    /// exists, and flushes it to the disk.
    fn write(&self, exec_id: &str, word: &str) -> Result<()> {
        self.sh_ok(
            exec_id,
            &format!(
                "yes {word} | head -c {} | dd of=/f bs={BLOCK} iflag=fullblock conv=notrunc,fsync 2>/dev/null && sync",
                BLOCK * BLOCKS
            ),
        )?;
        Ok(())
    }

    /// Reads block `k` of the file as an application would, through the
    /// page cache, emptied first: its SHA-256, or what dd said when it
    /// failed. (An `O_DIRECT` read fails too, with EILSEQ: the block layer's
    /// "protection error".)
    fn read_block(&self, exec_id: &str, k: usize) -> Result<std::result::Result<String, String>> {
        let (ok, out, err) = self.sh(
            exec_id,
            &format!(
                "sync && echo 3 > /proc/sys/vm/drop_caches \
                 && dd if=/f of=/b bs={BLOCK} skip={k} count=1 2>/dd.err && sha256sum /b \
                 || {{ cat /dd.err; exit 1; }}"
            ),
        )?;
        if ok {
            let hash = out
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            return Ok(Ok(hash));
        }
        Ok(Err(format!("{out}{err}")))
    }
}

/// What the pod read after each attack.
struct Seen {
    flipped: std::result::Result<String, String>,
    rolled_back: std::result::Result<String, String>,
}

fn attack(c: &Containerd, a: &Artefacts, integrity: bool) -> Result<Seen> {
    c.configure(
        a,
        &[(
            "veil",
            &format!("scratch_disk_mib = 64\nscratch_integrity = {integrity}\n"),
        )],
    )?;
    let id = format!("integrity-{integrity}");
    let rt = c.runtime_config("veil");
    let out = c
        .ctr_run(NS, &rt)
        // Privileged: to empty the guest's page cache (/proc/sys/vm).
        .args([
            "-d",
            "--privileged",
            oci::BUSYBOX_IMAGE,
            &id,
            "sleep",
            "600",
        ])
        .output()?;
    if !out.status.success() {
        bail!("ctr run -d {id}: {}", output_text(&out));
    }
    let pod = Pod { c, id: id.clone() };
    let result = (|| -> Result<Seen> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while c.task_status(NS, &id)? != "RUNNING" {
            ensure!(Instant::now() < deadline, "{id} is not RUNNING");
            std::thread::sleep(Duration::from_millis(100));
        }
        let disk_path = scratch_file(c, &id);
        pod.sh_ok("sync0", "sync")?;
        let s0 = std::fs::read(&disk_path).context("reading the scratch file")?;
        let two = content("second");

        // A flipped byte in block 100 of the file.
        pod.write("w1", "first")?;
        let s1 = std::fs::read(&disk_path)?;
        let (at, len) = changed_run(&s0, &s1);
        ensure!(
            len == BLOCKS,
            "the file's write changed a longest run of {len} blocks, not {BLOCKS}"
        );
        let disk = OpenOptions::new().read(true).write(true).open(&disk_path)?;
        let k = 100;
        let off = ((at + k) * BLOCK + 1234) as u64;
        let mut b = [0u8; 1];
        disk.read_exact_at(&mut b, off)?;
        disk.write_all_at(&[b[0] ^ 0x40], off)?;
        disk.sync_all()?;
        eprintln!("{id}: flipped a bit of host byte {off} (file block {k})");
        let flipped = pod.read_block("r1", k)?;
        eprintln!("{id}: after the flip, block {k} reads {flipped:?}");

        // Block 50 rolled back to its ciphertext of the first version.
        pod.write("w2", "second")?;
        let s2 = std::fs::read(&disk_path)?;
        // (Blocks after the file may change too: the reads' own files.)
        let range = at * BLOCK..(at + BLOCKS) * BLOCK;
        let same = s1[range.clone()]
            .chunks(BLOCK)
            .zip(s2[range].chunks(BLOCK))
            .filter(|(x, y)| x == y)
            .count();
        ensure!(
            same == 0,
            "the rewrite left {same} of the file's blocks {at}+{BLOCKS} as they were: not in place"
        );
        let k = 50;
        let old = &s1[(at + k) * BLOCK..(at + k + 1) * BLOCK];
        disk.write_all_at(old, ((at + k) * BLOCK) as u64)?;
        disk.sync_all()?;
        let rolled_back = pod.read_block("r2", k)?;
        eprintln!("{id}: after the rollback, block {k} reads {rolled_back:?}");
        // Blocks nobody touched read as written.
        let untouched = pod.read_block("r3", 7)?;
        ensure!(
            untouched.as_ref() == Ok(&sha(&two[7 * BLOCK..8 * BLOCK])),
            "block 7, not tampered with, reads {untouched:?}"
        );
        Ok(Seen {
            flipped,
            rolled_back,
        })
    })();
    let removed = c
        .kill_and_remove(NS, &id)
        .and_then(|()| c.wait_clean(&[&id]));
    let seen = result?;
    removed?;
    Ok(seen)
}

#[test]
fn a_tampered_or_rolled_back_scratch_block_reads_as_an_io_error_with_integrity() -> Result<()> {
    let a = Artefacts::locate()?;
    let c = Containerd::start(&a)?;
    let work = tempfile::tempdir()?;
    c.import(NS, &oci::busybox_archive(work.path())?)?;
    let one = content("first");
    let result = (|| -> Result<()> {
        // Without integrity the host's changes go unnoticed: this shows the
        // attacks hit the file.
        let plain = attack(&c, &a, false)?;
        let flipped = plain.flipped.map_err(|e| {
            anyhow::anyhow!("without integrity the flipped block failed to read: {e}")
        })?;
        ensure!(
            flipped != sha(&one[100 * BLOCK..101 * BLOCK]),
            "without integrity the flipped block still reads as written: the flip missed the file"
        );
        ensure!(
            plain.rolled_back.as_ref() == Ok(&sha(&one[50 * BLOCK..51 * BLOCK])),
            "without integrity the rolled-back block should read as its first version, got {:?}",
            plain.rolled_back
        );

        let checked = attack(&c, &a, true)?;
        for (what, r) in [
            ("flipped", &checked.flipped),
            ("rolled-back", &checked.rolled_back),
        ] {
            match r {
                Err(e) if e.contains("Input/output error") => {}
                other => bail!("with integrity the {what} block read {other:?}, not an I/O error"),
            }
        }
        Ok(())
    })();
    if result.is_err() {
        eprintln!("containerd log:\n{}", c.log_text());
    }
    result
}
