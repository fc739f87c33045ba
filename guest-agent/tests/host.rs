//! The container engine in host mode: veil-agent on a unix socket on this
//! machine (as root), containers from a busybox rootfs. Needs root and cgroup v2
//! (v1 controllers are fine: memory limits and OOM are tested in the VM).

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use veil_protocol::agent::*;
use veil_test_support::rootfs::default_spec;

#[tokio::test]
async fn first_process_is_pid_1_with_the_specs_hostname_mounts_cwd_env_and_uid() {
    let pod = pod().await;
    let mut spec = default_spec(&[
        "sh",
        "-c",
        "echo pid=$$; echo host=$(hostname); echo uid=$(id -u) gid=$(id -g) groups=$(id -G); echo cwd=$(pwd); \
         echo foo=$FOO; awk '$5 == \"/proc\"' /proc/self/mountinfo | wc -l; cat /etc/resolv.conf; \
         echo secret=$(cat /etc/secret 2>&1 | wc -c); touch /proc/sys/x 2>/dev/null || echo sys-ro",
    ]);
    std::fs::write(pod.agent.scratch().join("busybox/etc/secret"), "s3cret").unwrap();
    spec["linux"]["maskedPaths"]
        .as_array_mut()
        .unwrap()
        .push(json!("/etc/secret"));
    spec["process"]["cwd"] = json!("/tmp");
    spec["process"]["env"] = json!(["PATH=/bin", "FOO=bar"]);
    spec["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [65534]});
    spec["mounts"].as_array_mut().unwrap().push(json!(
        {"destination": "/etc/resolv.conf", "type": "bind", "source": "sandbox:resolv.conf", "options": ["rbind", "ro"]}
    ));
    let (out, status) = pod.run("c1", &spec).await;
    assert_eq!(status, 0, "output: {out}\nlog: {}", pod.agent.log());
    assert!(out.contains("pid=1\n"), "{out}");
    assert!(out.contains("host=veil-test\n"), "{out}");
    assert!(
        out.contains("uid=1000 gid=1000 groups=1000 65534\n"),
        "{out}"
    );
    assert!(out.contains("cwd=/tmp\n"), "{out}");
    assert!(out.contains("foo=bar\n"), "{out}");
    assert!(out.contains("\n1\n"), "one proc mount: {out}");
    assert!(out.contains("nameserver 10.0.0.53"), "{out}");
    assert!(out.contains("secret=0\n"), "masked /etc/secret: {out}");
    assert!(out.contains("sys-ro"), "read-only /proc/sys: {out}");

    // Without a hostname in the spec, the sandbox's is used.
    let mut spec = default_spec(&["hostname"]);
    spec.as_object_mut().unwrap().remove("hostname");
    let (out, _) = pod.run("c2", &spec).await;
    assert_eq!(out, "podhost\n");
}

#[tokio::test]
async fn exit_codes_come_back_exactly_and_sigkill_gives_137() {
    let pod = pod().await;
    for code in [0, 1, 42] {
        let (_, status) = pod
            .run(
                &format!("exit{code}"),
                &default_spec(&["sh", "-c", &format!("exit {code}")]),
            )
            .await;
        assert_eq!(status, code);
    }
    let c = &pod.containers;
    c.create_container(
        ctx(),
        &create_req(
            "k",
            &default_spec(&["sleep", "1000"]),
            stdio(false, false, false),
        ),
    )
    .await
    .unwrap();
    c.start_container(ctx(), &creq("k")).await.unwrap();
    pod.signal("k", "", libc::SIGKILL, false).await.unwrap();
    let w = c.wait_process(ctx(), &preq("k", "")).await.unwrap();
    assert_eq!(w.exit_status, 137);
    let st = c.state_process(ctx(), &preq("k", "")).await.unwrap();
    assert_eq!(st.status.enum_value(), Ok(ProcessStatus::STOPPED));
    assert_eq!(st.exit_status, 137);
    // The exit events arrive, in order, after the output.
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let e = pod
            .events
            .get_event(ctx(), &GetEventRequest::new())
            .await
            .unwrap();
        if e.has_exit() {
            seen.push((e.exit().container_id.clone(), e.exit().exit_status));
        }
    }
    assert_eq!(
        seen,
        [
            ("exit0".into(), 0),
            ("exit1".into(), 1),
            ("exit42".into(), 42),
            ("k".into(), 137)
        ]
    );
    c.remove_container(ctx(), &creq("k")).await.unwrap();
}

#[tokio::test]
async fn cat_echoes_stdin_and_10_mib_arrive_byte_exact_before_the_exit() {
    let pod = pod().await;
    let c = &pod.containers;
    c.create_container(
        ctx(),
        &create_req("cat", &default_spec(&["cat"]), stdio(true, true, false)),
    )
    .await
    .unwrap();
    let mut input = pod
        .agent
        .open_stream("cat", "", StreamKind::STDIN)
        .await
        .unwrap();
    let mut out = pod
        .agent
        .open_stream("cat", "", StreamKind::STDOUT)
        .await
        .unwrap();
    c.start_container(ctx(), &creq("cat")).await.unwrap();
    input.write_all(b"hello veil\n").await.unwrap();
    input.shutdown().await.unwrap();
    let mut s = String::new();
    out.read_to_string(&mut s).await.unwrap();
    assert_eq!(s, "hello veil\n");
    assert_eq!(
        c.wait_process(ctx(), &preq("cat", ""))
            .await
            .unwrap()
            .exit_status,
        0
    );

    // 10 MiB: the exit is reported only once all of it was delivered; the
    // reader is slow on purpose.
    const N: usize = 10 * 1024 * 1024;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let expected: Vec<u8> = (0..N)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(pod.agent.scratch().join("busybox/data"), &expected).unwrap();
    let spec = default_spec(&["cat", "/data"]);
    c.create_container(ctx(), &create_req("big", &spec, stdio(false, true, false)))
        .await
        .unwrap();
    let out = pod
        .agent
        .open_stream("big", "", StreamKind::STDOUT)
        .await
        .unwrap();
    c.start_container(ctx(), &creq("big")).await.unwrap();
    let reader = tokio::spawn(async move {
        let mut out = out;
        let mut got = Vec::with_capacity(N);
        let mut buf = vec![0u8; 64 * 1024];
        let mut next_pause = 0;
        loop {
            let n = out.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.len() >= next_pause && got.len() < N / 2 {
                next_pause += 256 * 1024;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        got
    });
    let w = c.wait_process(ctx(), &preq("big", "")).await.unwrap();
    assert_eq!(w.exit_status, 0);
    // When the exit is known, every byte is already in the connection: the
    // reader reaches EOF without the process.
    let got = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), N);
    assert!(got == expected, "output differs from what was written");
}

#[tokio::test]
async fn stty_size_sees_resizes_on_a_terminal() {
    let pod = pod().await;
    let c = &pod.containers;
    let mut spec = default_spec(&["sh", "-c", "stty size; read x; stty size"]);
    spec["process"]["terminal"] = json!(true);
    c.create_container(ctx(), &create_req("tty", &spec, stdio(true, true, false)))
        .await
        .unwrap();
    let mut term = pod
        .agent
        .open_stream("tty", "", StreamKind::TERMINAL)
        .await
        .unwrap();
    let resize = |rows, cols| {
        let mut r = ResizeTerminalRequest::new();
        r.container_id = "tty".into();
        r.rows = rows;
        r.cols = cols;
        r
    };
    c.resize_terminal(ctx(), &resize(40, 100)).await.unwrap();
    c.start_container(ctx(), &creq("tty")).await.unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 1024];
    while !seen.contains("40 100") {
        let n = tokio::time::timeout(Duration::from_secs(10), term.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "terminal closed early: {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    c.resize_terminal(ctx(), &resize(50, 120)).await.unwrap();
    term.write_all(b"go\n").await.unwrap();
    while !seen.contains("50 120") {
        let n = tokio::time::timeout(Duration::from_secs(10), term.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "terminal closed early: {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert_eq!(
        c.wait_process(ctx(), &preq("tty", ""))
            .await
            .unwrap()
            .exit_status,
        0
    );
    let st = c.state_process(ctx(), &preq("tty", "")).await.unwrap();
    assert!(st.terminal);
}

#[tokio::test]
async fn capabilities_and_seccomp_hold() {
    let pod = pod().await;
    // CAP_SYS_TIME is not in the default set: setting the clock fails.
    // (busybox date reports the failure but exits 0: check the message.)
    let (out, _) = pod
        .run(
            "time",
            &default_spec(&["sh", "-c", "date -s 2001-01-01 2>&1 >/dev/null"]),
        )
        .await;
    assert_eq!(out, "date: can't set date: Operation not permitted\n");
    let mut spec = default_spec(&["sh", "-c", "grep CapEff /proc/self/status"]);
    spec["process"]["capabilities"] =
        json!({"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]});
    let (out, _) = pod.run("caps", &spec).await;
    assert_eq!(out, "CapEff:\t0000000000000020\n", "only CAP_KILL (bit 5)");

    // A profile denying mkdir/mkdirat makes them fail with EPERM.
    let mut spec = default_spec(&[
        "sh",
        "-c",
        "mkdir /tmp/d 2>&1; echo rc=$?; touch /tmp/f && echo touch-ok",
    ]);
    spec["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat", "no_such_syscall"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let (out, _) = pod.run("seccomp", &spec).await;
    assert!(out.contains("Operation not permitted"), "{out}");
    assert!(out.contains("rc=1\n"), "{out}");
    assert!(out.contains("touch-ok"), "{out}");
}

#[tokio::test]
async fn exec_signals_pause_resume_and_stats() {
    let pod = pod().await;
    let c = &pod.containers;
    let spec = default_spec(&[
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.02; done",
    ]);
    c.create_container(ctx(), &create_req("w", &spec, stdio(false, false, false)))
        .await
        .unwrap();
    c.start_container(ctx(), &creq("w")).await.unwrap();
    let count_file = pod.agent.state_dir.join("containers/w/upper/tmp/count");
    // The file is rewritten all the time: retry a read that caught it empty.
    let count = || {
        (0..50)
            .find_map(|_| {
                let v = std::fs::read_to_string(&count_file)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok());
                if v.is_none() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                v
            })
            .unwrap_or(0)
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // exec sees the container's world.
    let mut ex = ExecProcessRequest::new();
    ex.container_id = "w".into();
    ex.exec_id = "e1".into();
    ex.process = serde_json::to_vec(
        &default_spec(&[
            "sh",
            "-c",
            "cat /tmp/count; echo pid1=$(cat /proc/1/cmdline | tr '\\0' ' ')",
        ])["process"],
    )
    .unwrap();
    ex.stdio = Some(stdio(false, true, false)).into();
    c.exec_process(ctx(), &ex).await.unwrap();
    let mut out = pod
        .agent
        .open_stream("w", "e1", StreamKind::STDOUT)
        .await
        .unwrap();
    let pid = c.start_process(ctx(), &preq("w", "e1")).await.unwrap().pid;
    assert!(pid > 0);
    let w = c.wait_process(ctx(), &preq("w", "e1")).await.unwrap();
    let mut s = String::new();
    out.read_to_string(&mut s).await.unwrap();
    assert_eq!(w.exit_status, 0, "{s}");
    assert!(s.contains("pid1=sh -c i=0"), "{s}");
    c.delete_process(ctx(), &preq("w", "e1")).await.unwrap();

    // A signal reaches its target exec'd process.
    ex.exec_id = "e2".into();
    ex.process = serde_json::to_vec(&default_spec(&["sleep", "1000"])["process"]).unwrap();
    ex.stdio = Some(stdio(false, false, false)).into();
    c.exec_process(ctx(), &ex).await.unwrap();
    c.start_process(ctx(), &preq("w", "e2")).await.unwrap();
    pod.signal("w", "e2", libc::SIGTERM, false).await.unwrap();
    assert_eq!(
        c.wait_process(ctx(), &preq("w", "e2"))
            .await
            .unwrap()
            .exit_status,
        128 + libc::SIGTERM
    );
    assert!(!c
        .list_pids(ctx(), &creq("w"))
        .await
        .unwrap()
        .pids
        .is_empty());

    // Pause stops progress; resume continues it.
    c.pause_container(ctx(), &creq("w")).await.unwrap();
    let st = c.state_process(ctx(), &preq("w", "")).await.unwrap();
    assert_eq!(st.status.enum_value(), Ok(ProcessStatus::PAUSED));
    // An exec into a paused container is refused at start.
    ex.exec_id = "e3".into();
    c.exec_process(ctx(), &ex).await.unwrap();
    let r = c.start_process(ctx(), &preq("w", "e3")).await;
    assert_eq!(code_of(r), ttrpc::Code::FAILED_PRECONDITION);
    c.delete_process(ctx(), &preq("w", "e3")).await.unwrap();
    let a = count();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(), a, "the counter moved while paused");
    c.resume_container(ctx(), &creq("w")).await.unwrap();
    let mut moved = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if count() > a {
            moved = true;
            break;
        }
    }
    assert!(moved, "the counter did not move after resume");

    let stats = c.stats_container(ctx(), &creq("w")).await.unwrap();
    assert!(stats.cpu.usage_usec > 0, "{stats:?}");

    // Signal all: SIGKILL ends the container.
    pod.signal("w", "", libc::SIGKILL, true).await.unwrap();
    assert_eq!(
        c.wait_process(ctx(), &preq("w", ""))
            .await
            .unwrap()
            .exit_status,
        137
    );
    c.remove_container(ctx(), &creq("w")).await.unwrap();
    assert!(!pod.agent.state_dir.join("containers/w").exists());
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_a_valid_request_still_works() {
    let pod = pod().await;
    let c = &pod.containers;
    let spec = default_spec(&["true"]);

    let mut bad = create_req("bad", &spec, stdio(false, false, false));
    bad.oci_spec = b"{\"ociVersion\": 12".to_vec();
    let r = c.create_container(ctx(), &bad).await;
    assert!(
        message_of(r.clone()).contains("malformed OCI spec"),
        "{r:?}"
    );
    assert_eq!(code_of(r), ttrpc::Code::INVALID_ARGUMENT);

    let mut missing = create_req("bad", &spec, stdio(false, false, false));
    missing.rootfs.as_mut().unwrap().storage_id = "nope".into();
    let r = c.create_container(ctx(), &missing).await;
    assert!(
        message_of(r.clone()).contains("rootfs storage 'nope' not found"),
        "{r:?}"
    );
    assert_eq!(code_of(r), ttrpc::Code::NOT_FOUND);
    missing.rootfs.as_mut().unwrap().storage_id = "bb".into();
    missing.rootfs.as_mut().unwrap().subpath = "no/such/dir".into();
    assert_eq!(
        code_of(c.create_container(ctx(), &missing).await),
        ttrpc::Code::NOT_FOUND
    );
    missing.rootfs.as_mut().unwrap().subpath = "../../etc".into();
    assert_eq!(
        code_of(c.create_container(ctx(), &missing).await),
        ttrpc::Code::INVALID_ARGUMENT
    );

    assert_eq!(
        code_of(c.start_container(ctx(), &creq("ghost")).await),
        ttrpc::Code::NOT_FOUND
    );
    // A program that is not there fails the create, as with runc, naming it.
    for (prog, says) in [
        (
            "no-such-program",
            "no-such-program: executable file not found in PATH",
        ),
        (
            "/bin/no-such-program",
            "/bin/no-such-program: no such executable file",
        ),
    ] {
        let r = c
            .create_container(
                ctx(),
                &create_req("noprog", &default_spec(&[prog]), stdio(false, false, false)),
            )
            .await;
        assert!(message_of(r.clone()).contains(says), "{r:?}");
        assert_eq!(code_of(r), ttrpc::Code::NOT_FOUND);
    }
    assert_eq!(
        code_of(
            c.create_container(
                ctx(),
                &create_req("../x", &spec, stdio(false, false, false))
            )
            .await
        ),
        ttrpc::Code::INVALID_ARGUMENT
    );

    c.create_container(
        ctx(),
        &create_req(
            "dup",
            &default_spec(&["sleep", "1000"]),
            stdio(false, false, false),
        ),
    )
    .await
    .unwrap();
    let r = c
        .create_container(ctx(), &create_req("dup", &spec, stdio(false, false, false)))
        .await;
    assert_eq!(code_of(r), ttrpc::Code::ALREADY_EXISTS);

    // exec into a stopped container.
    let (_, status) = pod.run("stopped", &spec).await;
    assert_eq!(status, 0);
    c.create_container(
        ctx(),
        &create_req("stopped", &spec, stdio(false, false, false)),
    )
    .await
    .unwrap();
    c.start_container(ctx(), &creq("stopped")).await.unwrap();
    c.wait_process(ctx(), &preq("stopped", "")).await.unwrap();
    let mut ex = ExecProcessRequest::new();
    ex.container_id = "stopped".into();
    ex.exec_id = "e".into();
    ex.process = serde_json::to_vec(&spec["process"]).unwrap();
    let r = c.exec_process(ctx(), &ex).await;
    assert!(message_of(r.clone()).contains("not running"), "{r:?}");
    assert_eq!(code_of(r), ttrpc::Code::FAILED_PRECONDITION);
    // Removing a running container is refused.
    c.start_container(ctx(), &creq("dup")).await.unwrap();
    assert_eq!(
        code_of(c.remove_container(ctx(), &creq("dup")).await),
        ttrpc::Code::FAILED_PRECONDITION
    );
    assert_eq!(
        code_of(pod.signal("dup", "", 0, false).await),
        ttrpc::Code::INVALID_ARGUMENT
    );

    // A created container whose output was never attached can be removed.
    c.create_container(
        ctx(),
        &create_req("unstarted", &spec, stdio(true, true, true)),
    )
    .await
    .unwrap();
    c.remove_container(ctx(), &creq("unstarted")).await.unwrap();
    assert_eq!(
        code_of(c.state_process(ctx(), &preq("unstarted", "")).await),
        ttrpc::Code::NOT_FOUND
    );

    // ... and a valid request right after all that works.
    let (out, status) = pod
        .run("good", &default_spec(&["echo", "still fine"]))
        .await;
    assert_eq!((out.as_str(), status), ("still fine\n", 0));
}

#[tokio::test]
async fn shared_pid_namespace_and_teardown_leave_nothing_behind() {
    let agent_bin = std::path::Path::new(env!("CARGO_BIN_EXE_veil-agent"));
    let agent = veil_test_support::agent::HostAgent::start(agent_bin).unwrap();
    let rootfs_dir = agent.scratch().join("busybox");
    veil_test_support::rootfs::busybox_rootfs(&rootfs_dir).unwrap();
    let client = agent.client().unwrap();
    let sandbox = veil_protocol::agent_ttrpc::SandboxClient::new(client.clone());
    let containers = veil_protocol::agent_ttrpc::ContainersClient::new(client);
    let mut sb = CreateSandboxRequest::new();
    sb.sandbox_id = "shared".into();
    sb.shared_pid_namespace = true;
    sandbox.create_sandbox(ctx(), &sb).await.unwrap();
    assert_eq!(
        code_of(sandbox.create_sandbox(ctx(), &sb).await),
        ttrpc::Code::ALREADY_EXISTS
    );
    let mut st = AddStorageRequest::new();
    st.storage_id = "bb".into();
    st.source = StorageSource::DIRECTORY.into();
    st.locator = rootfs_dir.to_string_lossy().into_owned();
    sandbox.add_storage(ctx(), &st).await.unwrap();
    containers
        .create_container(
            ctx(),
            &create_req(
                "a",
                &default_spec(&["sleep", "1000"]),
                stdio(false, false, false),
            ),
        )
        .await
        .unwrap();
    containers.start_container(ctx(), &creq("a")).await.unwrap();
    containers
        .create_container(
            ctx(),
            &create_req(
                "b",
                &default_spec(&["sh", "-c", "ps -o comm"]),
                stdio(false, true, false),
            ),
        )
        .await
        .unwrap();
    let mut out = agent
        .open_stream("b", "", StreamKind::STDOUT)
        .await
        .unwrap();
    containers.start_container(ctx(), &creq("b")).await.unwrap();
    let mut s = String::new();
    out.read_to_string(&mut s).await.unwrap();
    assert!(s.contains("sleep"), "b should see a's sleep: {s}");

    sandbox
        .destroy_sandbox(ctx(), &DestroySandboxRequest::new())
        .await
        .unwrap();
    assert!(
        !agent.cgroup_parent.exists()
            || std::fs::read_dir(&agent.cgroup_parent)
                .unwrap()
                .flatten()
                .all(|e| !e.path().is_dir())
    );
    assert!(!agent.state_dir.join("containers/a").exists());
}

#[tokio::test]
async fn an_ext4_image_file_is_a_read_only_lower_layer_with_a_writable_upper() {
    let pod = pod().await;
    let img = pod.agent.scratch().join("bb.img");
    veil_test_support::rootfs::ext4_image(&pod.agent.scratch().join("busybox"), &img, 16).unwrap();
    let mut st = AddStorageRequest::new();
    st.storage_id = "img".into();
    st.source = StorageSource::IMAGE_FILE.into();
    st.locator = img.to_string_lossy().into_owned();
    st.fstype = "ext4".into();
    st.read_only = true;
    let mp = pod
        .sandbox
        .add_storage(ctx(), &st)
        .await
        .unwrap()
        .mount_point;
    assert!(mp.ends_with("/storage/img"), "{mp}");
    let spec = default_spec(&[
        "sh",
        "-c",
        "echo hi > /etc/new && cat /etc/new && grep -c root /etc/passwd",
    ]);
    let mut req = create_req("c", &spec, stdio(false, true, false));
    req.rootfs.as_mut().unwrap().storage_id = "img".into();
    pod.containers.create_container(ctx(), &req).await.unwrap();
    let mut out = pod
        .agent
        .open_stream("c", "", StreamKind::STDOUT)
        .await
        .unwrap();
    pod.containers
        .start_container(ctx(), &creq("c"))
        .await
        .unwrap();
    let mut s = String::new();
    out.read_to_string(&mut s).await.unwrap();
    assert_eq!(
        pod.containers
            .wait_process(ctx(), &preq("c", ""))
            .await
            .unwrap()
            .exit_status,
        0,
        "{s}"
    );
    assert_eq!(s, "hi\n1\n");
    // In use: cannot be removed; after the container is gone it can.
    let mut rm = RemoveStorageRequest::new();
    rm.storage_id = "img".into();
    assert_eq!(
        code_of(pod.sandbox.remove_storage(ctx(), &rm).await),
        ttrpc::Code::FAILED_PRECONDITION
    );
    pod.containers
        .remove_container(ctx(), &creq("c"))
        .await
        .unwrap();
    pod.sandbox.remove_storage(ctx(), &rm).await.unwrap();
}

fn volume_entry(path: &str, kind: VolumeEntryType, content: &str, target: &str) -> VolumeEntry {
    let mut e = VolumeEntry::new();
    e.path = path.into();
    e.type_ = kind.into();
    e.mode = 0o644;
    e.content = content.as_bytes().to_vec();
    e.target = target.into();
    e
}

#[tokio::test]
async fn a_file_volume_is_its_own_tmpfs_swapped_whole_and_checked() {
    let pod = pod().await;
    let put = |version: &str, value: &str| {
        let mut r = PutVolumeRequest::new();
        r.volume_id = "cfg".into();
        r.version = version.into();
        r.root_mode = 0o755;
        r.entries = vec![volume_entry("key", VolumeEntryType::FILE, value, "")];
        r.root = vec![volume_entry(
            "key",
            VolumeEntryType::SYMLINK,
            "",
            "..data/key",
        )];
        r
    };
    pod.sandbox
        .put_volume(ctx(), &put("..v1", "one"))
        .await
        .unwrap();
    let mut spec = default_spec(&[
        "sh",
        "-c",
        "cat /etc/config/key; echo; awk '$5 == \"/etc/config\" {print $9}' /proc/self/mountinfo; \
         sleep 0.5; cat /etc/config/key",
    ]);
    spec["mounts"].as_array_mut().unwrap().push(json!(
        {"destination": "/etc/config", "type": "bind", "source": "volume:cfg", "options": ["rbind", "ro"]}
    ));
    let runner = pod.run("vol", &spec);
    let swap = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        pod.sandbox.put_volume(ctx(), &put("..v2", "two")).await
    };
    let ((out, status), swapped) = tokio::join!(runner, swap);
    swapped.unwrap();
    assert_eq!(status, 0, "{out}\n{}", pod.agent.log());
    assert_eq!(out, "one\ntmpfs\ntwo", "{}", pod.agent.log());

    // Checked before anything is written.
    let mut bad = put("..v3", "x");
    bad.entries.push(volume_entry(
        "l",
        VolumeEntryType::SYMLINK,
        "",
        "/etc/shadow",
    ));
    assert_eq!(
        code_of(pod.sandbox.put_volume(ctx(), &bad).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    let big = put("..v4", &"x".repeat(3 * 1024 * 1024 + 1));
    assert_eq!(
        code_of(pod.sandbox.put_volume(ctx(), &big).await),
        ttrpc::Code::RESOURCE_EXHAUSTED
    );
    let mut rr = ReadVolumeFileRequest::new();
    rr.volume_id = "cfg".into();
    rr.path = "key".into();
    rr.max_bytes = 16;
    let read = pod.sandbox.read_volume_file(ctx(), &rr).await.unwrap();
    assert_eq!(read.content, b"two");
    let mut rm = RemoveVolumeRequest::new();
    rm.volume_id = "cfg".into();
    pod.sandbox.remove_volume(ctx(), &rm).await.unwrap();
    assert_eq!(
        code_of(pod.sandbox.read_volume_file(ctx(), &rr).await),
        ttrpc::Code::NOT_FOUND
    );
}
