#![allow(clippy::unwrap_used, reason = "tests")]
use super::{eval::*, gate::*, *};
use veil_attestation::Tee;

const DOC: &str = r#"
version = 1
[api]
signals = ["TERM", "9"]
[[container]]
name = "app"
root_hash = ["AA"]
args = ["/bin/sleep", "3600"]
env = ["PATH=/bin"]
env_names = ["HOSTNAME", "KUBERNETES_*"]
mounts = ["/data"]
[[container.exec]]
args = ["cat", "/proc/loadavg"]
"#;

fn doc() -> String {
    DOC.replace("\"AA\"", &format!("\"{}\"", "ab".repeat(32)))
}

fn view() -> ContainerView {
    ContainerView {
        args: vec!["/bin/sleep".into(), "3600".into()],
        env: vec![
            "PATH=/bin".into(),
            "HOSTNAME=x".into(),
            "KUBERNETES_PORT=1".into(),
        ],
        cwd: "/".into(),
        capabilities: ["CAP_CHOWN".to_string()].into(),
        mounts: vec![
            MountView {
                destination: "/proc".into(),
                kind: "proc".into(),
                source: "proc".into(),
                bind: false,
            },
            MountView {
                destination: "/data".into(),
                kind: "bind".into(),
                source: "storage:scratch/data".into(),
                bind: true,
            },
            MountView {
                destination: "/etc/hosts".into(),
                kind: "bind".into(),
                source: "sandbox:hosts".into(),
                bind: true,
            },
        ],
        namespaces: ["mount", "pid", "ipc", "uts", "network"]
            .map(String::from)
            .into(),
        root_hash: Some("ab".repeat(32)),
        ..Default::default()
    }
}

#[test]
fn a_matching_container_gets_its_rule_and_a_differing_one_is_named() {
    let p = Policy::parse(doc().as_bytes()).unwrap();
    assert_eq!(p.check_container(&view()).unwrap(), Some(0));
    type Change = Box<dyn Fn(&mut ContainerView)>;
    let cases: Vec<(Change, &str)> = vec![
        (Box::new(|v| v.args[1] = "1".into()), "process.args"),
        (
            Box::new(|v| v.env.push("LD_PRELOAD=/x.so".into())),
            "process.env",
        ),
        (Box::new(|v| v.env[0] = "PATH=/evil".into()), "process.env"),
        (
            Box::new(|v| v.root_hash = Some("cd".repeat(32))),
            "rootfs image",
        ),
        (Box::new(|v| v.root_hash = None), "rootfs image"),
        (
            Box::new(|v| v.mounts[1].destination = "/etc".into()),
            "mounts",
        ),
        (
            Box::new(|v| v.mounts[2].source = "storage:x".into()),
            "mounts",
        ),
        (
            Box::new(|v| {
                v.capabilities.insert("CAP_SYS_ADMIN".into());
            }),
            "process.capabilities",
        ),
        (
            Box::new(|v| v.devices.push("/dev/kvm".into())),
            "linux.devices",
        ),
        (
            Box::new(|v| {
                v.namespaces.remove("pid");
            }),
            "linux.namespaces",
        ),
        (Box::new(|v| v.terminal = true), "process.terminal"),
        (Box::new(|v| v.stdin = true), "stdio.stdin"),
    ];
    for (change, field) in cases {
        let mut v = view();
        change(&mut v);
        let d = p.check_container(&v).unwrap_err();
        assert_eq!(d.field, field, "{d}");
        assert_eq!(d.rule.as_deref(), Some("app"));
        let msg = d.to_string();
        assert!(
            msg.starts_with("CreateContainer denied by the init-data policy"),
            "{msg}"
        );
        assert!(
            !msg.contains("/evil") && !msg.contains("/x.so"),
            "env values leak: {msg}"
        );
    }
}

#[test]
fn exec_is_an_exact_allowlist() {
    let p = Policy::parse(doc().as_bytes()).unwrap();
    let exec = |args: &[&str]| ExecView {
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/bin".into()],
        ..Default::default()
    };
    p.check_exec(Some(0), &exec(&["cat", "/proc/loadavg"]))
        .unwrap();
    let d = p
        .check_exec(Some(0), &exec(&["cat", "/data/secret"]))
        .unwrap_err();
    assert_eq!(d.field, "process.args");
    assert!(d.to_string().contains("exec allowlist"), "{d}");
    let mut e = exec(&["cat", "/proc/loadavg"]);
    e.terminal = true;
    assert_eq!(
        p.check_exec(Some(0), &e).unwrap_err().field,
        "process.terminal"
    );
    let mut e = exec(&["cat", "/proc/loadavg"]);
    e.env.push("LD_PRELOAD=x".into());
    assert_eq!(p.check_exec(Some(0), &e).unwrap_err().field, "process.env");
    assert!(p
        .check_exec(None, &exec(&["cat", "/proc/loadavg"]))
        .is_err());
    // Built-ins: plain allows, the confidential default refuses.
    Policy::allow_all()
        .check_exec(None, &exec(&["sh"]))
        .unwrap();
    let d = Policy::confidential_default()
        .check_exec(None, &exec(&["sh"]))
        .unwrap_err();
    assert!(
        d.to_string().contains("built-in confidential default"),
        "{d}"
    );
    assert_eq!(
        veil_common::Classify::kind(&d),
        veil_common::Kind::PermissionDenied
    );
}

#[test]
fn signals_and_calls() {
    let p = Policy::parse(doc().as_bytes()).unwrap();
    p.check_signal(15).unwrap();
    p.check_signal(9).unwrap();
    assert_eq!(
        p.check_signal(10).unwrap_err().rule.as_deref(),
        Some("api.signals")
    );
    let p = Policy::parse(b"version = 1\n[api]\nread_output = false\n").unwrap();
    assert!(!p.api.read_output);
    assert!(p.api.read_volume_file);
    assert!(
        p.check_container(&view()).is_err(),
        "no rules: no containers"
    );
}

#[test]
fn malformed_and_oversized_policies_are_refused() {
    let big = format!("version = 1\n# {}\n", "x".repeat(MAX_POLICY_BYTES));
    assert!(matches!(
        Policy::parse(big.as_bytes()),
        Err(PolicyDocError::TooLarge(_))
    ));
    for bad in [
        "",
        "version = 2",
        "version = 1\nextra = 1",
        "version = 1\n[[container]]\nname = \"a\"\nargs = []",
        "version = 1\n[[container]]\nname = \"a\"\nargs = [\"x\"]\nroot_hash = [\"zz\"]",
        "version = 1\n[[container]]\nname = \"a\"\nargs = [\"x\"]\nenv = [\"NOVALUE\"]",
        "version = 1\n[[container]]\nname = \"a\"\nargs = [\"x\"]\nenv_names = [\"A*B*\"]",
        "version = 1\n[[container]]\nname = \"a\"\nargs = [\"x\"]\nmounts = [\"rel\"]",
        "version = 1\n[[container]]\nname = \"a\"\nargs = [\"x\"]\nguest_namespaces = [\"mount\"]",
        "version = 1\n[[container]]\nname = \"a\"\nargs = [\"x\"]\n[[container]]\nname = \"a\"\nargs = [\"y\"]",
        "version = 1\n[api]\nsignals = [\"NOPE\"]",
        "\u{0}",
    ] {
        assert!(Policy::parse(bad.as_bytes()).is_err(), "{bad:?} accepted");
    }
    let many = format!(
        "version = 1\n{}",
        (0..=MAX_CONTAINERS)
            .map(|i| format!("[[container]]\nname = \"c{i}\"\nargs = [\"x\"]\n"))
            .collect::<String>()
    );
    assert!(matches!(
        Policy::parse(many.as_bytes()),
        Err(PolicyDocError::Limit { .. })
    ));
}

#[test]
fn the_gate_binds_the_policy_to_the_launch_host_data() {
    let d = doc();
    // Plain: enforced as given, no binding.
    let g = Gate::plain();
    g.policy("ExecProcess").unwrap();
    g.deliver(d.as_bytes(), None).unwrap();
    assert_eq!(g.policy("x").unwrap().source, "init-data policy");

    // Confidential: nothing before delivery.
    let g = Gate::confidential(Tee::VeilSim);
    let e = g.policy("CreateContainer").unwrap_err();
    assert!(
        e.to_string().contains("no policy has been delivered"),
        "{e}"
    );
    let hd = init_data_digest(Tee::VeilSim, d.as_bytes());
    assert_eq!(hd.len(), 32);
    g.deliver(d.as_bytes(), Some(&hd)).unwrap();
    g.policy("CreateContainer").unwrap();
    assert!(matches!(
        g.deliver(d.as_bytes(), Some(&hd)),
        Err(GateError::AlreadySet(_))
    ));

    // One changed byte: refused, and so is everything after.
    let g = Gate::confidential(Tee::VeilSim);
    let tampered = d.replace("3600", "3601");
    let e = g.deliver(tampered.as_bytes(), Some(&hd)).unwrap_err();
    assert!(matches!(e, GateError::Mismatch { .. }), "{e}");
    assert_eq!(
        veil_common::Classify::kind(&e),
        veil_common::Kind::PermissionDenied
    );
    let e = g.policy("CreateContainer").unwrap_err();
    assert!(e.to_string().contains("differs from the host data"), "{e}");

    // No policy: host data must be zero; then the confidential default.
    let g = Gate::confidential(Tee::Tdx);
    assert!(g.deliver(b"", Some(&hd)).is_err());
    let g = Gate::confidential(Tee::Tdx);
    g.deliver(b"", Some(&[0u8; 48])).unwrap();
    assert_eq!(
        g.policy("x").unwrap().source,
        "built-in confidential default policy"
    );
    assert_eq!(init_data_digest(Tee::Tdx, b"x").len(), 48);

    // The TEE cannot report yet: only the built-in default goes in force
    // unverified (the attestation checks its binding before any secret).
    let g = Gate::confidential(Tee::VeilSim);
    assert!(matches!(
        g.deliver(d.as_bytes(), None),
        Err(GateError::HostData(_))
    ));
    let g = Gate::confidential(Tee::VeilSim);
    g.deliver(b"", None).unwrap();
    assert_eq!(
        g.policy("x").unwrap().source,
        "built-in confidential default policy"
    );
}

#[test]
fn a_container_named_like_a_rule_is_held_to_that_rule() {
    let two = "version = 1\n[[container]]\nname = \"a\"\nargs = [\"/bin/sleep\", \"3600\"]\nenv_names = [\"PATH\", \"HOSTNAME\", \"KUBERNETES_*\"]\nmounts = [\"/data\"]\n[[container.exec]]\nargs = [\"ls\"]\n\
         [[container]]\nname = \"b\"\nargs = [\"/bin/sleep\", \"3600\"]\nenv_names = [\"PATH\", \"HOSTNAME\", \"KUBERNETES_*\"]\nmounts = [\"/data\"]\n[[container.exec]]\nargs = [\"cat\", \"/b\"]\n";
    let p = Policy::parse(two.as_bytes()).unwrap();
    // Unnamed: the first rule that matches.
    assert_eq!(p.check_container(&view()).unwrap(), Some(0));
    let named = |n: &str| ContainerView {
        name: Some(n.into()),
        ..view()
    };
    assert_eq!(p.check_container(&named("b")).unwrap(), Some(1));
    // A name no rule has: any rule.
    assert_eq!(p.check_container(&named("c")).unwrap(), Some(0));
    // Named, but not what its rule says: denied under that rule.
    let e = p
        .check_container(&ContainerView {
            args: vec!["/bin/sh".into()],
            ..named("b")
        })
        .unwrap_err();
    assert_eq!(e.rule.as_deref(), Some("b"));
}

#[test]
fn port_forward_needs_the_policy_in_a_confidential_pod() {
    use veil_protocol::agent::StreamKind;
    let plain = Gate::plain();
    plain.check_stream(StreamKind::PORT_FORWARD).unwrap();
    let g = Gate::confidential(Tee::VeilSim);
    g.deliver(b"", Some(&[0u8; 32])).unwrap();
    let e = g.check_stream(StreamKind::PORT_FORWARD).unwrap_err();
    assert_eq!(e.rule.as_deref(), Some("api.port_forward"), "{e}");
    g.check_stream(StreamKind::STDOUT).unwrap();
    let p = Policy::parse(b"version = 1\n[api]\nport_forward = true\n").unwrap();
    assert!(p.api.port_forward);
}
