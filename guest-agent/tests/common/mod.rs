//! Shared helpers for the agent's host-mode tests: a started agent with a
//! sandbox and a busybox storage, and short calls for the common requests.
#![allow(
    dead_code,
    missing_docs,
    clippy::unwrap_used,
    reason = "test helpers: a failure is the test failing"
)]

use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncReadExt;
use ttrpc::context::Context;
use veil_protocol::{
    agent::*,
    agent_ttrpc::{ContainersClient, EventsClient, SandboxClient},
};
use veil_test_support::{agent::HostAgent, rootfs};

pub fn ctx() -> Context {
    ttrpc::context::with_timeout(Duration::from_secs(30).as_nanos() as i64)
}

pub struct Pod {
    pub agent: HostAgent,
    pub sandbox: SandboxClient,
    pub containers: ContainersClient,
    pub events: EventsClient,
}

/// Starts an agent, creates the sandbox and adds storage "bb" (a busybox tree).
pub async fn pod() -> Pod {
    let agent = HostAgent::start(std::path::Path::new(env!("CARGO_BIN_EXE_veil-agent"))).unwrap();
    let rootfs_dir = agent.scratch().join("busybox");
    rootfs::busybox_rootfs(&rootfs_dir).unwrap();
    let client = agent.client().unwrap();
    let pod = Pod {
        sandbox: SandboxClient::new(client.clone()),
        containers: ContainersClient::new(client.clone()),
        events: EventsClient::new(client),
        agent,
    };
    let mut sb = CreateSandboxRequest::new();
    sb.sandbox_id = "pod".into();
    sb.hostname = "podhost".into();
    sb.hosts = b"127.0.0.1 localhost\n".to_vec();
    sb.resolv_conf = b"nameserver 10.0.0.53\n".to_vec();
    pod.sandbox.create_sandbox(ctx(), &sb).await.unwrap();
    let mut st = AddStorageRequest::new();
    st.storage_id = "bb".into();
    st.source = StorageSource::DIRECTORY.into();
    st.locator = rootfs_dir.to_string_lossy().into_owned();
    pod.sandbox.add_storage(ctx(), &st).await.unwrap();
    pod
}

pub fn stdio(stdin: bool, stdout: bool, stderr: bool) -> Stdio {
    let mut s = Stdio::new();
    s.stdin = stdin;
    s.stdout = stdout;
    s.stderr = stderr;
    s
}

pub fn create_req(id: &str, spec: &Value, io: Stdio) -> CreateContainerRequest {
    let mut r = CreateContainerRequest::new();
    r.container_id = id.into();
    r.oci_spec = serde_json::to_vec(spec).unwrap();
    let mut root = Rootfs::new();
    root.storage_id = "bb".into();
    r.rootfs = Some(root).into();
    r.stdio = Some(io).into();
    r
}

pub fn creq(id: &str) -> ContainerRequest {
    let mut r = ContainerRequest::new();
    r.container_id = id.into();
    r
}

pub fn preq(id: &str, exec: &str) -> ProcessRequest {
    let mut r = ProcessRequest::new();
    r.container_id = id.into();
    r.exec_id = exec.into();
    r
}

impl Pod {
    /// Creates `id` with stdout attached, starts it, returns (stdout, exit status).
    pub async fn run(&self, id: &str, spec: &Value) -> (String, i32) {
        self.containers
            .create_container(ctx(), &create_req(id, spec, stdio(false, true, false)))
            .await
            .unwrap();
        let mut out = self
            .agent
            .open_stream(id, "", StreamKind::STDOUT)
            .await
            .unwrap();
        self.containers
            .start_container(ctx(), &creq(id))
            .await
            .unwrap();
        let w = self
            .containers
            .wait_process(ctx(), &preq(id, ""))
            .await
            .unwrap();
        let mut s = String::new();
        out.read_to_string(&mut s).await.unwrap();
        self.containers
            .remove_container(ctx(), &creq(id))
            .await
            .unwrap();
        (s, w.exit_status)
    }

    pub async fn signal(&self, id: &str, exec: &str, sig: i32, all: bool) -> ttrpc::Result<Empty> {
        let mut r = SignalProcessRequest::new();
        r.container_id = id.into();
        r.exec_id = exec.into();
        r.signal = sig as u32;
        r.all = all;
        self.containers.signal_process(ctx(), &r).await
    }
}

pub fn code_of<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> ttrpc::Code {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => s.code(),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

pub fn message_of<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> String {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => s.message().to_string(),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}
