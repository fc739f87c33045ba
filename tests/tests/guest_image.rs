//! The guest image build: the kernel script refuses a configuration that lost a
//! requested option, and the initrd is reproducible.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is the test failing"
)]

use std::process::Command;

use veil_tests::{workspace_root, Artefacts};

#[test]
fn kernel_script_fails_loudly_when_an_option_cannot_be_enabled() {
    let dir = tempfile::tempdir().unwrap();
    // SEV_GUEST depends on AMD_MEM_ENCRYPT, which the base fragment alone does
    // not enable: Kconfig drops it silently, the script must not.
    let extra = dir.path().join("needs-sev.config");
    std::fs::write(&extra, "CONFIG_SEV_GUEST=y\n").unwrap();
    let out = Command::new(workspace_root().join("kernel-config/build.sh"))
        .args(["--fragments", "base", "--check-only", "--extra"])
        .arg(&extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "build.sh accepted a config that lost CONFIG_SEV_GUEST:\n{stderr}"
    );
    assert!(
        stderr.contains("requested CONFIG_SEV_GUEST=y") && stderr.contains("did not land"),
        "the error does not name the dropped option:\n{stderr}"
    );
}

#[test]
fn kernel_script_accepts_the_shipped_fragments() {
    let out = Command::new(workspace_root().join("kernel-config/build.sh"))
        .arg("--check-only")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn build_initrd(init: &std::path::Path, out: &std::path::Path) {
    let st = Command::new(workspace_root().join("rootfs/build.sh"))
        .arg("--init")
        .arg(init)
        .arg("--out")
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn initrd_is_reproducible_and_tracks_its_inputs() {
    let a = Artefacts::locate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A private copy of the agent, so its timestamp can be changed between builds.
    let agent = dir.path().join("veil-agent");
    std::fs::copy(&a.agent, &agent).unwrap();

    let first = dir.path().join("one.cpio");
    build_initrd(&agent, &first);
    let st = Command::new("touch")
        .args(["-d", "2001-02-03 04:05:06"])
        .arg(&agent)
        .status()
        .unwrap();
    assert!(st.success());
    let second = dir.path().join("two.cpio");
    build_initrd(&agent, &second);
    let (one, two) = (
        std::fs::read(&first).unwrap(),
        std::fs::read(&second).unwrap(),
    );
    assert!(one == two, "two builds from the same inputs differ");

    // Different content must give different bytes (the comparison can fail).
    let mut bytes = std::fs::read(&agent).unwrap();
    bytes.extend_from_slice(b"one more byte");
    std::fs::write(&agent, bytes).unwrap();
    let third = dir.path().join("three.cpio");
    build_initrd(&agent, &third);
    assert_ne!(one, std::fs::read(&third).unwrap());
}
