//! veil-node against a private node root and the real Debian containerd:
//! install registers the handlers this machine can run in a config
//! containerd reads, a second install changes nothing, uninstall gives
//! containerd's config back byte for byte and removes what install added;
//! `check` reports this machine's KVM and TEE state with its exit code.

use std::process::Command;

use veil_tests::{containerd::output_text, node::NodeRoot, Artefacts};

/// An operator's containerd config: comments, no trailing newline.
const OPERATOR_CONFIG: &str = "version = 2\n# the operator's own settings\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\"\n  default_runtime_name = \"runc\"";

#[test]
fn install_twice_then_uninstall_restores_containerd_config() {
    let a = Artefacts::locate().unwrap();
    let node = NodeRoot::new(&a, Some(OPERATOR_CONFIG)).unwrap();
    let out = node
        .veil_node(&["install", "--from", &node.from.display().to_string()])
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("enabled handlers: veil veil-sim\n"), "{text}");
    assert_eq!(node.restarts(), 1);
    for f in [
        "opt/veil/bin/containerd-shim-veil-v2",
        "opt/veil/share/vmlinux",
        "etc/veil/config.toml",
    ] {
        assert!(node.path(f).is_file(), "{f} not installed");
    }
    // The real containerd reads the config and has the two runtimes, run by
    // the installed shim with the installed veil config.
    let cfg = node.path("etc/containerd/config.toml");
    let dump = Command::new("containerd")
        .arg("--config")
        .arg(&cfg)
        .args(["config", "dump"])
        .output()
        .unwrap();
    assert!(dump.status.success(), "{}", output_text(&dump));
    let dump = String::from_utf8_lossy(&dump.stdout);
    let shim = node
        .path("opt/veil/bin/containerd-shim-veil-v2")
        .display()
        .to_string();
    for h in ["veil", "veil-sim"] {
        assert!(
            dump.contains(&format!("runtimes.{h}]")),
            "{h} missing:\n{dump}"
        );
        let cp = format!("{}#{h}", node.path("etc/veil/config.toml").display());
        assert!(dump.contains(&cp), "{cp} missing:\n{dump}");
    }
    assert!(dump.contains(&shim), "runtime_path missing:\n{dump}");
    assert!(
        !dump.contains("veil-snp"),
        "veil-snp enabled on a node without SNP:\n{dump}"
    );
    // The shim reads the installed veil config.
    let v = veil_shim::config::Config::load(&node.path("etc/veil/config.toml")).unwrap();
    assert_eq!(
        v.handlers["veil-sim"].kernel,
        node.path("opt/veil/share/vmlinux")
    );

    // Again: nothing written, containerd not restarted.
    let out = node
        .veil_node(&["install", "--from", &node.from.display().to_string()])
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("wrote"),
        "{}",
        output_text(&out)
    );
    assert_eq!(node.restarts(), 1);

    let out = node.veil_node(&["uninstall"]).unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), OPERATOR_CONFIG);
    assert_eq!(node.restarts(), 2);
    assert!(!node.path("opt/veil").exists());
    assert!(!node.path("etc/veil").exists());
}

#[test]
fn operator_veil_config_kept_and_missing_containerd_config_removed_again() {
    let a = Artefacts::locate().unwrap();
    let node = NodeRoot::new(&a, None).unwrap();
    std::fs::create_dir_all(node.path("etc/veil")).unwrap();
    let mine = "log_level = \"debug\"\n";
    std::fs::write(node.path("etc/veil/config.toml"), mine).unwrap();
    let out = node
        .veil_node(&["install", "--from", &node.from.display().to_string()])
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(
        std::fs::read_to_string(node.path("etc/veil/config.toml")).unwrap(),
        mine
    );
    let out = node.veil_node(&["uninstall"]).unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(!node.path("etc/containerd/config.toml").exists());
    assert_eq!(
        std::fs::read_to_string(node.path("etc/veil/config.toml")).unwrap(),
        mine
    );
}

#[test]
fn check_reports_this_machine() {
    let a = Artefacts::locate().unwrap();
    let node = NodeRoot::new(&a, None).unwrap();
    let out = node.veil_node(&["check"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let kvm_ok = veil_shim::vmm::accel::kvm_canary(std::time::Duration::from_secs(2)).is_ok();
    if kvm_ok {
        assert!(text.contains("the canary guest ran under KVM"), "{text}");
    } else {
        // This machine: KVM cannot run guests, no TEE, no vhost-vsock.
        assert!(text.contains("fall back to TCG"), "{text}");
        assert_eq!(out.status.code(), Some(11), "{}", output_text(&out));
        let snp = text.lines().find(|l| l.starts_with("veil-snp ")).unwrap();
        assert!(
            snp.contains("KVM usable for guests") && snp.contains("SEV-SNP host support"),
            "{snp}"
        );
        if !std::path::Path::new("/dev/vhost-vsock").exists() {
            assert!(snp.contains("/dev/vhost-vsock"), "{snp}");
        }
    }
    let sim = text.lines().find(|l| l.starts_with("veil-sim ")).unwrap();
    assert!(sim.contains(" yes "), "{sim}");
}
