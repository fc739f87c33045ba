//! Tests against independent tools, run here (never skipped: a missing prerequisite fails the test
//! and says what is missing):
//! - `veil measure` agrees with `sev-snp-measure` (PyPI) on several firmware / vCPU-count /
//!   CPU-type / guest-feature combinations, using Debian's `ovmf` images;
//! - `veil measure` hashes the kernel command line as QEMU does (leading/trailing spaces and
//!   newlines included) and refuses inputs it would otherwise ignore;
//! - a Python Trustee-protocol client (`attestation/testdata/kbs_client.py`, `cryptography` for
//!   the JWE) gets a key from the real `veil-kbs` binary over TLS with a pinned certificate, and
//!   over plain HTTP keeping the session in Python's own cookie jar (which honours `Secure`),
//!   using the real `veil` binary as simulated firmware; the broker's audit log shows the
//!   release;
//! - the `report_data` of a known nonce and key is the value the Python client computes with
//!   Trustee's current formula.
//!
//! Both need a Python venv with `sev-snp-measure` (which brings `cryptography`); it is created
//! once under the target directory with `pip install`.

#![allow(
    clippy::unwrap_used,
    reason = "integration-test helpers panic on setup failures"
)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

const OVMF: &str = "/usr/share/ovmf/OVMF.fd";
const OVMF_CODE_2M: &str = "/usr/share/OVMF/OVMF_CODE.fd";

fn venv() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("veil-attestation-pyvenv");
        let ready = dir.join(".veil-ready");
        if !ready.exists() {
            let st = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&dir)
                .status()
                .expect(
                    "python3 is missing (needed for sev-snp-measure and the Python KBS client)",
                );
            assert!(st.success(), "python3 -m venv {} failed", dir.display());
            let out = Command::new(dir.join("bin/pip"))
                .args(["install", "--quiet", "sev-snp-measure", "cryptography"])
                .output()
                .expect("run pip");
            assert!(
                out.status.success(),
                "pip install sev-snp-measure cryptography failed (PyPI unreachable?): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::write(&ready, b"").unwrap();
        }
        dir
    })
}

fn require_file(p: &str, package: &str) {
    assert!(
        Path::new(p).exists(),
        "{p} is missing: install Debian's `{package}` package"
    );
}

fn sev_snp_measure(args: &[&str]) -> String {
    let out = Command::new(venv().join("bin/sev-snp-measure"))
        .args(["--mode", "snp"])
        .args(args)
        .output()
        .expect("run sev-snp-measure");
    assert!(
        out.status.success(),
        "sev-snp-measure {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn veil(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_veil"))
        .args(args)
        .output()
        .expect("run veil")
}

/// `veil measure --mode snp ARGS` and `sev-snp-measure --mode snp ARGS`, in that order.
fn measure_both(args: &[&str]) -> (String, String) {
    let theirs = sev_snp_measure(args);
    let mut ours_args = vec!["measure", "--mode", "snp"];
    ours_args.extend(args);
    let out = veil(&ours_args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap().trim().to_string(),
        theirs,
    )
}

#[test]
fn veil_measure_agrees_with_sev_snp_measure() {
    require_file(OVMF, "ovmf");
    require_file(OVMF_CODE_2M, "ovmf");
    let combos: &[(&str, &str, &str, Option<&str>)] = &[
        (OVMF, "1", "EPYC-v4", None),
        (OVMF, "2", "EPYC-Milan", None),
        (OVMF, "4", "EPYC-Genoa", Some("0x21")),
        (OVMF, "3", "EPYC-Rome", None),
        (OVMF, "8", "EPYC-Turin", None),
        (OVMF_CODE_2M, "2", "EPYC-Milan", None),
        (OVMF_CODE_2M, "1", "EPYC-v4", Some("0x1")),
        // Decimal, as sev-snp-measure reads it: 33 is 0x21.
        (OVMF, "4", "EPYC-Genoa", Some("33")),
    ];
    for (fw, vcpus, cpu, features) in combos {
        let mut args = vec!["--ovmf", fw, "--vcpus", vcpus, "--vcpu-type", cpu];
        if let Some(f) = features {
            args.extend(["--guest-features", f]);
        }
        let (ours, theirs) = measure_both(&args);
        assert_eq!(ours, theirs, "disagreement for {args:?}");
        if *fw == OVMF && *vcpus == "1" && *cpu == "EPYC-v4" {
            assert!(
                ours.starts_with("11570979") && ours.ends_with("a97e3"),
                "{ours}"
            );
        }
    }
}

#[test]
fn veil_measure_refuses_direct_boot_without_kernel_hashes_section() {
    require_file(OVMF, "ovmf");
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("vmlinuz");
    std::fs::write(&k, b"kernel").unwrap();
    let out = veil(&[
        "measure",
        "--mode",
        "snp",
        "--ovmf",
        OVMF,
        "--kernel",
        k.to_str().unwrap(),
        "--append",
        "console=ttyS0",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SNP_KERNEL_HASHES"), "{err}");
}

#[test]
fn veil_measure_hashes_the_command_line_as_given_like_sev_snp_measure() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    // Debian's OVMF cannot measure direct boot; a firmware-shaped image with the SEV metadata
    // (SNP_KERNEL_HASHES included) stands in, read by both tools.
    std::fs::write(p("ovmf.fd"), veil_verifier::measure::snp::synthetic_ovmf()).unwrap();
    std::fs::write(p("vmlinuz"), b"a kernel image").unwrap();
    std::fs::write(p("initrd"), b"an initrd").unwrap();
    let mut seen = std::collections::HashSet::new();
    for cmdline in [
        "console=ttyS0 quiet",
        " console=ttyS0 quiet",
        "console=ttyS0 quiet ",
        "console=ttyS0 quiet\n",
        "\n  console=ttyS0   quiet \n\n",
    ] {
        let args = [
            "--ovmf",
            &p("ovmf.fd"),
            "--kernel",
            &p("vmlinuz"),
            "--initrd",
            &p("initrd"),
            "--append",
            cmdline,
            "--vcpus",
            "2",
            "--vcpu-type",
            "EPYC-Milan",
        ];
        let (ours, theirs) = measure_both(&args);
        assert_eq!(ours, theirs, "disagreement for command line {cmdline:?}");
        assert!(
            seen.insert(ours),
            "{cmdline:?} measured like another command line"
        );
    }
    // --verbose shows the page walk.
    let out = veil(&[
        "measure",
        "--mode",
        "snp",
        "--ovmf",
        &p("ovmf.fd"),
        "--kernel",
        &p("vmlinuz"),
        "--vcpus",
        "1",
        "--verbose",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let walk = String::from_utf8_lossy(&out.stderr);
    for line in [
        "Normal",
        "Zero",
        "Secrets",
        "Cpuid",
        "SNP_KERNEL_HASHES",
        "VMSA of vCPU 0",
    ] {
        assert!(walk.contains(line), "{walk}");
    }
}

#[test]
fn veil_measure_refuses_inputs_it_would_ignore() {
    require_file(OVMF, "ovmf");
    let dir = tempfile::tempdir().unwrap();
    let i = dir.path().join("initrd");
    std::fs::write(&i, b"initrd").unwrap();
    let i = i.to_str().unwrap();
    for (args, want) in [
        (
            vec!["--initrd", i],
            "--initrd is only measured with --kernel",
        ),
        (
            vec!["--append", "console=ttyS0"],
            "--append is only measured with --kernel",
        ),
        (vec!["--guest-features", "0x"], "is not a number"),
    ] {
        let mut all = vec!["measure", "--mode", "snp", "--ovmf", OVMF];
        all.extend(args);
        let out = veil(&all);
        assert!(!out.status.success(), "{all:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{err}");
    }
    let out = veil(&[
        "measure",
        "--mode",
        "sim",
        "--kernel",
        i,
        "--initrd",
        i,
        "--vcpu-type",
        "EPYC-v4",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vcpu-type applies to --mode snp only"));
}

/// Starts the real `veil-kbs` binary; returns the child and its address.
fn spawn_kbs(args: &[&str]) -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_veil-kbs"))
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn veil-kbs");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("veil-kbs exited before listening")
            .unwrap();
        if let Some(a) = line.strip_prefix("veil-kbs: listening on ") {
            break a.to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

/// Runs the Python Trustee client against the broker at `base` (pinning `cert`, or `-` for
/// plain HTTP) for `default/key/disk`, with `veil sim-report` as its firmware.
fn python_client(base: &str, cert: &str, sim_dir: &str, measurement: &str) -> std::process::Output {
    Command::new(venv().join("bin/python"))
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../testdata/kbs_client.py"
        ))
        .args([
            base,
            cert,
            env!("CARGO_BIN_EXE_veil"),
            sim_dir,
            measurement,
            "default/key/disk",
        ])
        .output()
        .unwrap()
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn python_trustee_client_gets_key_from_veil_kbs_over_pinned_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p);
    let s = |p: PathBuf| p.to_str().unwrap().to_string();

    // Install-time material, made with the real CLIs.
    let out = veil(&["sim-ca", "init", "--dir", &s(d("sim"))]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = Command::new(env!("CARGO_BIN_EXE_veil-kbs"))
        .args(["init-tls", "--out-dir", &s(d("tls")), "--san", "127.0.0.1"])
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::write(d("admin-token"), "0123456789abcdef-admin\n").unwrap();

    // Reference value from `veil measure --mode sim`, policy and resource on disk.
    std::fs::write(d("vmlinux"), b"kernel image").unwrap();
    std::fs::write(d("initrd"), b"initrd image").unwrap();
    let out = veil(&[
        "measure",
        "--mode",
        "sim",
        "--kernel",
        &s(d("vmlinux")),
        "--initrd",
        &s(d("initrd")),
        "--append",
        "console=hvc0",
        "--vcpus",
        "2",
        "--name",
        "pod-sim",
        "--output-format",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let measurement = refs["reference_values"][0]["measurement"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        measurement,
        hex::encode(veil_verifier::sim_measurement(
            b"kernel image",
            b"initrd image",
            "console=hvc0",
            2,
            None
        ))
    );
    std::fs::create_dir_all(d("state/resources/default/key")).unwrap();
    std::fs::write(d("state/reference-values.json"), &out.stdout).unwrap();
    std::fs::write(
        d("state/policy.toml"),
        "[[resource]]\npath = \"default/key/disk\"\ntee = [\"veil-sim\"]\nreference_values = [\"pod-sim\"]\nallow_simulated = true\n",
    )
    .unwrap();
    std::fs::write(d("state/resources/default/key/disk"), b"the disk key").unwrap();

    let (child, addr) = spawn_kbs(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        &s(d("state")),
        "--tls-cert",
        &s(d("tls/cert.pem")),
        "--tls-key",
        &s(d("tls/key.pem")),
        "--admin-token-file",
        &s(d("admin-token")),
        "--audit-log",
        &s(d("audit.log")),
        "--sim-root",
        &s(d("sim/root.pub.pem")),
    ]);
    let _kill = Kill(child);
    assert!(addr.starts_with("https://127.0.0.1:"), "{addr}");

    let out = python_client(&addr, &s(d("tls/cert.der")), &s(d("sim")), &measurement);
    assert!(
        out.status.success(),
        "python client failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["cookie"], hex::encode(b"the disk key"));
    assert_eq!(got["bearer"], hex::encode(b"the disk key"));

    let audit = std::fs::read_to_string(d("audit.log")).unwrap();
    let releases: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["outcome"] == "release")
        .collect();
    assert_eq!(releases.len(), 2, "{audit}");
    assert_eq!(releases[0]["measurement"], measurement);
    assert!(!audit.contains("the disk key"));

    // The same over plain HTTP, the session kept by Python's cookie jar (which would not send
    // a cookie marked Secure back over HTTP).
    let (child, http_addr) = spawn_kbs(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        &s(d("state")),
        "--insecure-http",
        "--audit-log",
        &s(d("audit-http.log")),
        "--sim-root",
        &s(d("sim/root.pub.pem")),
    ]);
    let _kill_http = Kill(child);
    assert!(http_addr.starts_with("http://127.0.0.1:"), "{http_addr}");
    let out = python_client(&http_addr, "-", &s(d("sim")), &measurement);
    assert!(
        out.status.success(),
        "python client over plain HTTP failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["cookie"], hex::encode(b"the disk key"));

    // A client pinning another certificate never talks to this broker.
    let other = dir.path().join("other.der");
    std::fs::write(&other, b"not the broker certificate").unwrap();
    let out = python_client(&addr, &s(other), &s(d("sim")), &measurement);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not the pinned one"));
}

#[test]
fn report_data_of_a_known_nonce_and_key_is_trustees() {
    use veil_attestation::protocol::{HashAlgorithm, TeePubKey};
    let python = venv().join("bin/python");
    let nonce = "cGVyLXNlc3Npb24gbm9uY2UsIDMyIGJ5dGVzIGxvbmcuLg==";
    let key = TeePubKey::EC {
        crv: "P-256".into(),
        alg: "ECDH-ES+A256KW".into(),
        x: "WbbLv0Ns8rTsxBRcnQNrNJmKNgVbM5D4ko6tDg2fBwc".into(),
        y: "rjJ3m1FQG2iNpVHlEnDH7jW8p5L6Ax2PuUnRzNvQcbM".into(),
    };
    for (alg, name) in [
        (HashAlgorithm::Sha384, "sha384"),
        (HashAlgorithm::Sha512, "sha512"),
    ] {
        let out = Command::new(&python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../testdata/kbs_client.py"
            ))
            .args([
                "report-data",
                nonce,
                &serde_json::to_string(&key).unwrap(),
                name,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let ours = veil_attestation::client::report_data_for(nonce, &key, alg).unwrap();
        assert_eq!(hex::encode(ours), theirs, "{name}");
    }
}
