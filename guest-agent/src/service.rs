//! The ttrpc services `Sandbox`, `Containers` and `Events`: request decoding,
//! the pod's policy check before acting ([`crate::policy::gate`]), and error
//! mapping; the work is done by [`crate::pod::Pod`].

use std::sync::Arc;

use async_trait::async_trait;
use ttrpc::r#async::TtrpcContext;
use veil_protocol::{agent::*, agent_ttrpc};

use crate::{
    attest::Attestation,
    pod::Pod,
    policy::{eval::Denied, gate::Gate},
    status::to_ttrpc,
};

/// The services, sharing one pod and its policy gate.
#[derive(Clone)]
pub struct Services {
    pod: Arc<Pod>,
    gate: Arc<Gate>,
    attestation: Arc<Attestation>,
}

impl Services {
    /// Services over `pod`, checked by `gate`; `attestation` reads the
    /// launch's host data and carries the verified policy to the broker.
    pub fn new(pod: Arc<Pod>, gate: Arc<Gate>, attestation: Arc<Attestation>) -> Self {
        Services {
            pod,
            gate,
            attestation,
        }
    }

    /// Verifies and puts a delivered policy in force.
    pub async fn set_policy(&self, doc: &[u8]) -> Result<(), crate::policy::gate::GateError> {
        use crate::policy::gate::GateError;
        let host_data = match self.gate.tee() {
            Some(_) => match self.attestation.launch_host_data().await {
                Ok(hd) => Some(hd),
                // Without a report now (no simulated firmware keys on the
                // node, say) only the built-in default can go in force; the
                // attestation checks its binding before fetching secrets.
                Err(e) if doc.is_empty() => {
                    tracing::info!(
                        reason = %crate::error_chain(&e),
                        "launch host data unreadable now; the built-in default policy is checked against it at attestation"
                    );
                    None
                }
                Err(e) => return Err(GateError::HostData(crate::error_chain(&e))),
            },
            None => None,
        };
        let source = self.gate.deliver(doc, host_data.as_deref())?;
        if self.gate.tee().is_some() {
            self.attestation.bind_policy(doc);
            if !doc.is_empty() {
                self.attestation
                    .set_init_data(String::from_utf8_lossy(doc).into_owned());
            }
        }
        tracing::info!(policy = source, bytes = doc.len(), "policy in force");
        Ok(())
    }
}

type R<T> = ttrpc::Result<T>;

fn err(e: crate::pod::PodError) -> ttrpc::Error {
    to_ttrpc(&e)
}

fn denied(e: Denied) -> ttrpc::Error {
    tracing::warn!(denial = %e, "request denied by policy");
    to_ttrpc(&e)
}

fn start_response(pid: u32) -> StartResponse {
    let mut r = StartResponse::new();
    r.pid = pid;
    r
}

#[async_trait]
impl agent_ttrpc::Sandbox for Services {
    async fn create_sandbox(&self, _c: &TtrpcContext, req: CreateSandboxRequest) -> R<Empty> {
        self.gate.policy("CreateSandbox").map_err(denied)?;
        self.pod.create_sandbox(&req).await.map_err(err)?;
        Ok(Empty::new())
    }

    async fn destroy_sandbox(&self, _c: &TtrpcContext, _req: DestroySandboxRequest) -> R<Empty> {
        self.pod.destroy_sandbox().await.map_err(err)?;
        Ok(Empty::new())
    }

    async fn add_storage(
        &self,
        _c: &TtrpcContext,
        req: AddStorageRequest,
    ) -> R<AddStorageResponse> {
        self.gate.policy("AddStorage").map_err(denied)?;
        let p = self.pod.add_storage(&req).await.map_err(err)?;
        let root_hash = req.verity.as_ref().map(|v| v.root_hash.as_str());
        self.gate.record_storage(&req.storage_id, root_hash);
        let mut r = AddStorageResponse::new();
        r.mount_point = p.to_string_lossy().into_owned();
        Ok(r)
    }

    async fn remove_storage(&self, _c: &TtrpcContext, req: RemoveStorageRequest) -> R<Empty> {
        self.pod
            .remove_storage(&req.storage_id)
            .await
            .map_err(err)?;
        self.gate.forget_storage(&req.storage_id);
        Ok(Empty::new())
    }

    async fn put_volume(&self, _c: &TtrpcContext, req: PutVolumeRequest) -> R<Empty> {
        self.gate
            .check_call("PutVolume", |a| a.put_volume)
            .map_err(denied)?;
        self.pod.put_volume(&req).await.map_err(err)?;
        Ok(Empty::new())
    }

    async fn remove_volume(&self, _c: &TtrpcContext, req: RemoveVolumeRequest) -> R<Empty> {
        self.pod.remove_volume(&req.volume_id).await.map_err(err)?;
        Ok(Empty::new())
    }

    async fn read_volume_file(
        &self,
        _c: &TtrpcContext,
        req: ReadVolumeFileRequest,
    ) -> R<ReadVolumeFileResponse> {
        self.gate
            .check_call("ReadVolumeFile", |a| a.read_volume_file)
            .map_err(denied)?;
        let mut r = ReadVolumeFileResponse::new();
        r.content = self
            .pod
            .read_volume_file(&req.volume_id, &req.path, req.max_bytes)
            .await
            .map_err(err)?;
        Ok(r)
    }

    async fn set_policy(&self, _c: &TtrpcContext, req: SetPolicyRequest) -> R<Empty> {
        self.set_policy(&req.policy).await.map_err(|e| {
            tracing::warn!(error = %crate::error_chain(&e), "policy not put in force");
            to_ttrpc(&e)
        })?;
        Ok(Empty::new())
    }
}

#[async_trait]
impl agent_ttrpc::Containers for Services {
    async fn create_container(
        &self,
        _c: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> R<CreateContainerResponse> {
        let rule = self.gate.check_create(&req).map_err(denied)?;
        let pid = self.pod.create_container(&req).await.map_err(err)?;
        self.gate.record_container(&req.container_id, rule);
        let mut r = CreateContainerResponse::new();
        r.pid = pid;
        Ok(r)
    }

    async fn start_container(&self, _c: &TtrpcContext, req: ContainerRequest) -> R<StartResponse> {
        self.gate.policy("StartContainer").map_err(denied)?;
        Ok(start_response(
            self.pod
                .start_container(&req.container_id)
                .await
                .map_err(err)?,
        ))
    }

    async fn remove_container(&self, _c: &TtrpcContext, req: ContainerRequest) -> R<Empty> {
        self.pod
            .remove_container(&req.container_id)
            .await
            .map_err(err)?;
        self.gate.forget_container(&req.container_id);
        Ok(Empty::new())
    }

    async fn pause_container(&self, _c: &TtrpcContext, req: ContainerRequest) -> R<Empty> {
        self.gate
            .check_call("PauseContainer", |a| a.pause)
            .map_err(denied)?;
        self.pod.pause(&req.container_id).await.map_err(err)?;
        Ok(Empty::new())
    }

    async fn resume_container(&self, _c: &TtrpcContext, req: ContainerRequest) -> R<Empty> {
        self.gate
            .check_call("ResumeContainer", |a| a.pause)
            .map_err(denied)?;
        self.pod.resume(&req.container_id).await.map_err(err)?;
        Ok(Empty::new())
    }

    async fn update_container(&self, _c: &TtrpcContext, req: UpdateContainerRequest) -> R<Empty> {
        self.gate
            .check_call("UpdateContainer", |a| a.update)
            .map_err(denied)?;
        self.pod
            .update(&req.container_id, &req.resources)
            .await
            .map_err(err)?;
        Ok(Empty::new())
    }

    async fn stats_container(&self, _c: &TtrpcContext, req: ContainerRequest) -> R<ContainerStats> {
        self.gate
            .check_call("StatsContainer", |a| a.stats)
            .map_err(denied)?;
        self.pod.stats(&req.container_id).await.map_err(err)
    }

    async fn list_pids(&self, _c: &TtrpcContext, req: ContainerRequest) -> R<ListPidsResponse> {
        self.gate
            .check_call("ListPids", |a| a.stats)
            .map_err(denied)?;
        let mut r = ListPidsResponse::new();
        r.pids = self.pod.pids(&req.container_id).await.map_err(err)?;
        Ok(r)
    }

    async fn exec_process(&self, _c: &TtrpcContext, req: ExecProcessRequest) -> R<Empty> {
        self.gate.check_exec(&req).map_err(denied)?;
        self.pod.exec(&req).await.map_err(err)?;
        Ok(Empty::new())
    }

    async fn start_process(&self, _c: &TtrpcContext, req: ProcessRequest) -> R<StartResponse> {
        self.gate.policy("StartProcess").map_err(denied)?;
        let pid = if req.exec_id.is_empty() {
            self.pod.start_container(&req.container_id).await
        } else {
            self.pod.start_exec(&req.container_id, &req.exec_id).await
        };
        Ok(start_response(pid.map_err(err)?))
    }

    async fn state_process(&self, _c: &TtrpcContext, req: ProcessRequest) -> R<ProcessState> {
        self.pod
            .state(&req.container_id, &req.exec_id)
            .await
            .map_err(err)
    }

    async fn signal_process(&self, _c: &TtrpcContext, req: SignalProcessRequest) -> R<Empty> {
        self.gate.check_signal(req.signal).map_err(denied)?;
        self.pod
            .signal(&req.container_id, &req.exec_id, req.signal, req.all)
            .await
            .map_err(err)?;
        Ok(Empty::new())
    }

    async fn wait_process(&self, _c: &TtrpcContext, req: ProcessRequest) -> R<WaitProcessResponse> {
        let (status, at, written) = self
            .pod
            .wait(&req.container_id, &req.exec_id)
            .await
            .map_err(err)?;
        let mut r = WaitProcessResponse::new();
        r.exit_status = status;
        r.exited_at_ns = at;
        r.stdout_bytes = written.stdout;
        r.stderr_bytes = written.stderr;
        r.output_pending = written.pending;
        Ok(r)
    }

    async fn resize_terminal(&self, _c: &TtrpcContext, req: ResizeTerminalRequest) -> R<Empty> {
        self.pod
            .resize(&req.container_id, &req.exec_id, req.rows, req.cols)
            .await
            .map_err(err)?;
        Ok(Empty::new())
    }

    async fn close_stdin(&self, _c: &TtrpcContext, req: CloseStdinRequest) -> R<Empty> {
        let after = req.counted.then_some(req.stdin_bytes);
        self.pod
            .close_stdin(&req.container_id, &req.exec_id, after)
            .await
            .map_err(err)?;
        Ok(Empty::new())
    }

    async fn delete_process(&self, _c: &TtrpcContext, req: ProcessRequest) -> R<Empty> {
        self.pod
            .delete_exec(&req.container_id, &req.exec_id)
            .await
            .map_err(err)?;
        Ok(Empty::new())
    }
}

#[async_trait]
impl agent_ttrpc::Events for Services {
    async fn get_event(&self, _c: &TtrpcContext, _req: GetEventRequest) -> R<Event> {
        Ok(self.pod.events.next().await)
    }
}
