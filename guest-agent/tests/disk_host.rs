//! The agent's own LUKS2 and ext4 code against the reference tools, on the
//! host (no device-mapper needed): a header we write opens with `cryptsetup`
//! to the same volume key, headers `cryptsetup luksFormat` writes (PBKDF2 and
//! Argon2id, 512- and 4096-byte sectors) open with our code, and the ext4 we
//! make passes `e2fsck -fn` before and after the host kernel used it.
//! Needs root (loop mounts) and Debian's `cryptsetup-bin` and `e2fsprogs`.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is the test failing"
)]

use std::{
    fs::{File, OpenOptions},
    path::Path,
    process::Command,
};

use veil_agent::disk::{ext4, luks2};

fn tool(name: &str) -> String {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p.to_string_lossy().into_owned();
        }
    }
    panic!("{name} is missing: install it (ci/setup.sh installs cryptsetup-bin and e2fsprogs)");
}

fn disk(dir: &Path, name: &str, size: u64) -> (std::path::PathBuf, File) {
    let p = dir.join(name);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.set_len(size).unwrap();
    (p, f)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The volume key `cryptsetup luksDump --dump-volume-key` prints.
fn cryptsetup_volume_key(img: &Path, keyfile: &Path) -> Vec<u8> {
    let out = run(Command::new(tool("cryptsetup"))
        .args([
            "luksDump",
            "--dump-volume-key",
            "--batch-mode",
            "--key-file",
        ])
        .arg(keyfile)
        .arg(img));
    let start = out.find("MK dump:").expect("no MK dump in luksDump output");
    let hex: String = out[start + 8..]
        .split_whitespace()
        .take_while(|w| w.len() == 2 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .collect();
    hex::decode(hex).unwrap()
}

#[test]
fn a_header_we_format_opens_with_cryptsetup_to_the_same_key() {
    let d = tempfile::tempdir().unwrap();
    let (img, f) = disk(d.path(), "ours.img", 32 << 20);
    let keyfile = d.path().join("key");
    std::fs::write(&keyfile, b"0123456789abcdef0123456789abcdef").unwrap();
    let ours = luks2::format(&f, 32 << 20, b"0123456789abcdef0123456789abcdef", 4096).unwrap();
    run(Command::new(tool("cryptsetup"))
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(&keyfile)
        .arg(&img));
    assert_eq!(cryptsetup_volume_key(&img, &keyfile), &ours.volume_key[..]);
    let dump = run(Command::new(tool("cryptsetup")).arg("luksDump").arg(&img));
    assert!(dump.contains("sector: 4096"), "{dump}");
    assert!(dump.contains("aes-xts-plain64"), "{dump}");
    // A wrong key is refused by cryptsetup too.
    std::fs::write(&keyfile, b"wrong").unwrap();
    let st = Command::new(tool("cryptsetup"))
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(&keyfile)
        .arg(&img)
        .output()
        .unwrap();
    assert!(!st.status.success());
}

#[test]
fn headers_cryptsetup_formats_open_with_our_code() {
    let d = tempfile::tempdir().unwrap();
    let keyfile = d.path().join("key");
    std::fs::write(&keyfile, b"a broker-released secret").unwrap();
    let cases: [(&str, &[&str]); 4] = [
        (
            "pbkdf2-4k",
            &[
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--sector-size",
                "4096",
            ],
        ),
        (
            "pbkdf2-512-sha512",
            &[
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--hash",
                "sha512",
                "--sector-size",
                "512",
            ],
        ),
        (
            "argon2id",
            &[
                "--pbkdf",
                "argon2id",
                "--pbkdf-memory",
                "32768",
                "--pbkdf-force-iterations",
                "4",
                "--pbkdf-parallel",
                "1",
            ],
        ),
        (
            "argon2i-aes128",
            &[
                "--pbkdf",
                "argon2i",
                "--pbkdf-memory",
                "16384",
                "--pbkdf-force-iterations",
                "4",
                "--pbkdf-parallel",
                "2",
                "--key-size",
                "256",
            ],
        ),
    ];
    for (name, args) in cases {
        let (img, _) = disk(d.path(), name, 32 << 20);
        run(Command::new(tool("cryptsetup"))
            .args([
                "luksFormat",
                "--batch-mode",
                "--type",
                "luks2",
                "--key-file",
            ])
            .arg(&keyfile)
            .args(args)
            .arg(&img));
        let f = File::open(&img).unwrap();
        let got = luks2::unlock(&f, b"a broker-released secret", &luks2::Limits::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            &got.volume_key[..],
            cryptsetup_volume_key(&img, &keyfile),
            "{name}"
        );
        assert_eq!(got.segment.offset, 16 << 20, "{name}");
        assert!(matches!(
            luks2::unlock(&f, b"wrong", &luks2::Limits::default()),
            Err(luks2::Luks2Error::WrongKey)
        ));
    }
    // An Argon2 cost above the guest's limit is refused, not allocated.
    let (img, _) = disk(d.path(), "argon2-big", 32 << 20);
    run(Command::new(tool("cryptsetup"))
        .args([
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--key-file",
        ])
        .arg(&keyfile)
        .args([
            "--pbkdf",
            "argon2id",
            "--pbkdf-memory",
            "131072",
            "--pbkdf-force-iterations",
            "4",
        ])
        .arg(&img));
    let f = File::open(&img).unwrap();
    assert!(matches!(
        luks2::unlock(&f, b"a broker-released secret", &luks2::Limits::default()),
        Err(luks2::Luks2Error::Limit(_))
    ));
}

/// Unmounts (lazily) and detaches the loop device when dropped.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn fsck(img: &Path) {
    let out = Command::new(tool("e2fsck"))
        .args(["-fn"])
        .arg(img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn {}: {}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn our_ext4_passes_e2fsck_and_the_kernel_uses_it() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (loop mounts)"
    );
    let d = tempfile::tempdir().unwrap();
    // One group; several groups with sparse backups and a short last group.
    for (name, size) in [("small", 64u64 << 20), ("large", (1300u64 << 20) + 12345)] {
        let (img, f) = disk(d.path(), name, size);
        ext4::format(&f, size, ext4::Options::default()).unwrap();
        drop(f);
        fsck(&img);
        let mnt = d.path().join(format!("{name}.mnt"));
        std::fs::create_dir(&mnt).unwrap();
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        let m = Mounted(mnt.clone());
        assert!(mnt.join("lost+found").is_dir());
        for i in 0..300 {
            std::fs::write(mnt.join(format!("f{i}")), vec![i as u8; 5000]).unwrap();
        }
        std::fs::create_dir_all(mnt.join("a/b/c")).unwrap();
        std::fs::write(mnt.join("a/b/c/big"), vec![7u8; 40 << 20]).unwrap();
        assert_eq!(std::fs::read(mnt.join("f42")).unwrap(), vec![42u8; 5000]);
        drop(m);
        fsck(&img);
    }
    // The zeroed-inode-table variant too.
    let (img, f) = disk(d.path(), "zeroed", 96 << 20);
    ext4::format(
        &f,
        96 << 20,
        ext4::Options {
            zero_inode_tables: true,
        },
    )
    .unwrap();
    drop(f);
    fsck(&img);
}
