//! The ttrpc adapter of the task service: each method calls
//! [`TaskService`] and turns its error into a status once, by the error's
//! kind (`veil_protocol::status`), with the whole cause chain as the
//! message.

use std::sync::Arc;

use containerd_shim_protos::{
    api::{self, Empty},
    sandbox_api as sb,
};

use super::TaskService;

/// Requests the pod's policy denied so far (one shim serves one pod), logged
/// with each denial.
static DENIALS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The number of requests the pod's policy has denied in this shim.
pub fn denials() -> u64 {
    DENIALS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The task service as containerd's ttrpc `Task` service.
pub struct TaskServer(pub Arc<TaskService>);

macro_rules! relay {
    ($( $name:ident : $req:ty => $resp:ty ),* $(,)?) => {
        #[async_trait::async_trait]
        impl containerd_shim_protos::shim_async::Task for TaskServer {
            $(
                async fn $name(
                    &self,
                    _ctx: &ttrpc::asynchronous::TtrpcContext,
                    req: $req,
                ) -> ttrpc::Result<$resp> {
                    tracing::debug!(method = stringify!($name), "task request");
                    self.0.$name(req).await.map_err(|e| {
                        use veil_common::Classify;
                        if e.kind() == veil_common::Kind::PermissionDenied {
                            let n = DENIALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                            tracing::warn!(method = stringify!($name), denials = n, error = %veil_common::error_chain(&e), "request denied by the pod's policy");
                        } else {
                            tracing::warn!(method = stringify!($name), error = %veil_common::error_chain(&e), "task request failed");
                        }
                        veil_protocol::status::to_ttrpc(&e)
                    })
                }
            )*
        }
    };
}

relay! {
    state: api::StateRequest => api::StateResponse,
    create: api::CreateTaskRequest => api::CreateTaskResponse,
    start: api::StartRequest => api::StartResponse,
    delete: api::DeleteRequest => api::DeleteResponse,
    pids: api::PidsRequest => api::PidsResponse,
    pause: api::PauseRequest => Empty,
    resume: api::ResumeRequest => Empty,
    checkpoint: api::CheckpointTaskRequest => Empty,
    kill: api::KillRequest => Empty,
    exec: api::ExecProcessRequest => Empty,
    resize_pty: api::ResizePtyRequest => Empty,
    close_io: api::CloseIORequest => Empty,
    update: api::UpdateTaskRequest => Empty,
    wait: api::WaitRequest => api::WaitResponse,
    stats: api::StatsRequest => api::StatsResponse,
    connect: api::ConnectRequest => api::ConnectResponse,
    shutdown: api::ShutdownRequest => Empty,
}

/// The task service as containerd's ttrpc sandbox API
/// (`containerd.runtime.sandbox.v1.Sandbox`), on the same server.
pub struct SandboxServer(pub Arc<TaskService>);

macro_rules! relay_sandbox {
    ($( $name:ident : $req:ty => $resp:ty ),* $(,)?) => {
        #[async_trait::async_trait]
        impl containerd_shim_protos::sandbox_async::Sandbox for SandboxServer {
            $(
                async fn $name(
                    &self,
                    _ctx: &ttrpc::asynchronous::TtrpcContext,
                    req: $req,
                ) -> ttrpc::Result<$resp> {
                    tracing::debug!(method = stringify!($name), "sandbox request");
                    self.0.$name(req).await.map_err(|e| {
                        tracing::warn!(method = stringify!($name), error = %veil_common::error_chain(&e), "sandbox request failed");
                        veil_protocol::status::to_ttrpc(&e)
                    })
                }
            )*
        }
    };
}

relay_sandbox! {
    create_sandbox: sb::CreateSandboxRequest => sb::CreateSandboxResponse,
    start_sandbox: sb::StartSandboxRequest => sb::StartSandboxResponse,
    platform: sb::PlatformRequest => sb::PlatformResponse,
    stop_sandbox: sb::StopSandboxRequest => sb::StopSandboxResponse,
    wait_sandbox: sb::WaitSandboxRequest => sb::WaitSandboxResponse,
    sandbox_status: sb::SandboxStatusRequest => sb::SandboxStatusResponse,
    ping_sandbox: sb::PingRequest => sb::PingResponse,
    shutdown_sandbox: sb::ShutdownSandboxRequest => sb::ShutdownSandboxResponse,
}
