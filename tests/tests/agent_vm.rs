//! The container engine inside the pod VM: the agent as PID 1 runs busybox
//! containers from an ext4 image carried in the (test) initrd, with the
//! guest's cgroup v2 memory controller — memory limits, OOM kills and OOM
//! events, and memory statistics — and stdout over a vsock stream connection.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is the test failing"
)]

use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncReadExt;
use veil_protocol::{
    agent::*,
    agent_ttrpc::{ContainersClient, EventsClient, SandboxClient},
};
use veil_tests::{rootfs, Artefacts, TestVm, VmOptions};

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(120).as_nanos() as i64)
}

fn create(id: &str, spec: &serde_json::Value, stdout: bool) -> CreateContainerRequest {
    let mut r = CreateContainerRequest::new();
    r.container_id = id.into();
    r.oci_spec = serde_json::to_vec(spec).unwrap();
    let mut root = Rootfs::new();
    root.storage_id = "bb".into();
    r.rootfs = Some(root).into();
    let mut io = veil_protocol::agent::Stdio::new();
    io.stdout = stdout;
    r.stdio = Some(io).into();
    r
}

fn creq(id: &str) -> ContainerRequest {
    let mut r = ContainerRequest::new();
    r.container_id = id.into();
    r
}

fn preq(id: &str, exec: &str) -> ProcessRequest {
    let mut r = ProcessRequest::new();
    r.container_id = id.into();
    r.exec_id = exec.into();
    r
}

#[tokio::test]
async fn containers_in_the_vm_have_memory_limits_oom_events_stats_and_vsock_streams() {
    let a = Artefacts::locate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut opts = VmOptions::agent(&a);
    opts.initrd = rootfs::agent_initrd_with_busybox(&a, dir.path()).unwrap();
    opts.extra_cmdline = "veil.log=veil_agent=debug".into();
    let vm = TestVm::boot(&a, &opts).unwrap();
    let client = vm.agent_client(Duration::from_secs(60)).await.unwrap();
    let sandbox = SandboxClient::new(client.clone());
    let c = ContainersClient::new(client.clone());
    let events = EventsClient::new(client);

    let mut sb = CreateSandboxRequest::new();
    sb.sandbox_id = "vm-pod".into();
    sb.hostname = "vmpod".into();
    sandbox.create_sandbox(ctx(), &sb).await.unwrap();
    let mut st = AddStorageRequest::new();
    st.storage_id = "bb".into();
    st.source = StorageSource::IMAGE_FILE.into();
    st.locator = "/images/busybox.img".into();
    st.fstype = "ext4".into();
    st.read_only = true;
    sandbox
        .add_storage(ctx(), &st)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", vm.console()));

    // PID 1, hostname and output over a vsock stream connection.
    let mut spec = rootfs::default_spec(&["sh", "-c", "echo pid=$$ host=$(hostname); exit 42"]);
    spec.as_object_mut().unwrap().remove("hostname");
    c.create_container(ctx(), &create("hello", &spec, true))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", vm.console()));
    let mut out = vm
        .connect(veil_protocol::STREAM_VSOCK_PORT, Duration::from_secs(10))
        .await
        .unwrap();
    veil_protocol::stream::open(&mut out, "hello", "", StreamKind::STDOUT)
        .await
        .unwrap();
    c.start_container(ctx(), &creq("hello")).await.unwrap();
    let w = c.wait_process(ctx(), &preq("hello", "")).await.unwrap();
    let mut s = String::new();
    out.read_to_string(&mut s).await.unwrap();
    assert_eq!((s.as_str(), w.exit_status), ("pid=1 host=vmpod\n", 42));
    c.remove_container(ctx(), &creq("hello")).await.unwrap();

    // Memory statistics grow when the process allocates (40 MiB into /dev/shm).
    c.create_container(
        ctx(),
        &create("mem", &rootfs::default_spec(&["sleep", "1000"]), false),
    )
    .await
    .unwrap();
    c.start_container(ctx(), &creq("mem")).await.unwrap();
    let before = c
        .stats_container(ctx(), &creq("mem"))
        .await
        .unwrap()
        .memory
        .usage;
    let mut ex = ExecProcessRequest::new();
    ex.container_id = "mem".into();
    ex.exec_id = "alloc".into();
    ex.process = serde_json::to_vec(
        &rootfs::default_spec(&[
            "dd",
            "if=/dev/zero",
            "of=/dev/shm/fill",
            "bs=1M",
            "count=40",
        ])["process"],
    )
    .unwrap();
    c.exec_process(ctx(), &ex).await.unwrap();
    c.start_process(ctx(), &preq("mem", "alloc")).await.unwrap();
    assert_eq!(
        c.wait_process(ctx(), &preq("mem", "alloc"))
            .await
            .unwrap()
            .exit_status,
        0
    );
    let after = c
        .stats_container(ctx(), &creq("mem"))
        .await
        .unwrap()
        .memory
        .usage;
    assert!(
        after >= before + 40 * 1024 * 1024,
        "memory usage {before} -> {after}"
    );
    c.signal_process(ctx(), &{
        let mut r = SignalProcessRequest::new();
        r.container_id = "mem".into();
        r.signal = 9;
        r
    })
    .await
    .unwrap();
    assert_eq!(
        c.wait_process(ctx(), &preq("mem", ""))
            .await
            .unwrap()
            .exit_status,
        137
    );
    c.remove_container(ctx(), &creq("mem")).await.unwrap();

    // A 32 MiB limit: buffering 200 MiB gets the process OOM-killed, and the
    // OOM is reported before the exit.
    let mut spec = rootfs::default_spec(&["sh", "-c", "head -c 200m /dev/zero | tail; exit $?"]);
    spec["linux"]["resources"] = json!({"memory": {"limit": 32 * 1024 * 1024}});
    c.create_container(ctx(), &create("oom", &spec, false))
        .await
        .unwrap();
    c.start_container(ctx(), &creq("oom")).await.unwrap();
    let w = c.wait_process(ctx(), &preq("oom", "")).await.unwrap();
    assert_eq!(w.exit_status, 137, "console:\n{}", vm.console());
    let stats = c.stats_container(ctx(), &creq("oom")).await.unwrap();
    assert!(stats.memory.oom_kills >= 1, "{stats:?}");
    assert_eq!(stats.memory.limit, 32 * 1024 * 1024);
    let mut saw_oom = false;
    loop {
        let e = events
            .get_event(ctx(), &GetEventRequest::new())
            .await
            .unwrap();
        if e.has_oom() && e.oom().container_id == "oom" {
            saw_oom = true;
        }
        if e.has_exit() && e.exit().container_id == "oom" {
            break;
        }
    }
    assert!(saw_oom, "no OOM event before the exit event");
    c.remove_container(ctx(), &creq("oom")).await.unwrap();
    sandbox
        .destroy_sandbox(ctx(), &DestroySandboxRequest::new())
        .await
        .unwrap();
}
