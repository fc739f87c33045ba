//! The ttrpc services `Sandbox`, `Containers` and `Events`: request decoding
//! and error mapping only; the work is done by [`crate::pod::Pod`].

use std::sync::Arc;

use async_trait::async_trait;
use ttrpc::r#async::TtrpcContext;
use veil_protocol::{agent::*, agent_ttrpc};

use crate::{pod::Pod, status::to_ttrpc};

/// The services, sharing one pod.
#[derive(Clone)]
pub struct Services {
    pod: Arc<Pod>,
}

impl Services {
    /// Services over `pod`.
    pub fn new(pod: Arc<Pod>) -> Self {
        Services { pod }
    }
}

type R<T> = ttrpc::Result<T>;

fn err(e: crate::pod::PodError) -> ttrpc::Error {
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
        let p = self.pod.add_storage(&req).await.map_err(err)?;
        let mut r = AddStorageResponse::new();
        r.mount_point = p.to_string_lossy().into_owned();
        Ok(r)
    }

    async fn remove_storage(&self, _c: &TtrpcContext, req: RemoveStorageRequest) -> R<Empty> {
        self.pod
            .remove_storage(&req.storage_id)
            .await
            .map_err(err)?;
        Ok(Empty::new())
    }

    async fn put_volume(&self, _c: &TtrpcContext, req: PutVolumeRequest) -> R<Empty> {
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
        let mut r = ReadVolumeFileResponse::new();
        r.content = self
            .pod
            .read_volume_file(&req.volume_id, &req.path, req.max_bytes)
            .await
            .map_err(err)?;
        Ok(r)
    }
}

#[async_trait]
impl agent_ttrpc::Containers for Services {
    async fn create_container(
        &self,
        _c: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> R<CreateContainerResponse> {
        let pid = self.pod.create_container(&req).await.map_err(err)?;
        let mut r = CreateContainerResponse::new();
        r.pid = pid;
        Ok(r)
    }

    async fn start_container(&self, _c: &TtrpcContext, req: ContainerRequest) -> R<StartResponse> {
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
        Ok(Empty::new())
    }

    async fn pause_container(&self, _c: &TtrpcContext, req: ContainerRequest) -> R<Empty> {
        self.pod.pause(&req.container_id).await.map_err(err)?;
        Ok(Empty::new())
    }

    async fn resume_container(&self, _c: &TtrpcContext, req: ContainerRequest) -> R<Empty> {
        self.pod.resume(&req.container_id).await.map_err(err)?;
        Ok(Empty::new())
    }

    async fn update_container(&self, _c: &TtrpcContext, req: UpdateContainerRequest) -> R<Empty> {
        self.pod
            .update(&req.container_id, &req.resources)
            .await
            .map_err(err)?;
        Ok(Empty::new())
    }

    async fn stats_container(&self, _c: &TtrpcContext, req: ContainerRequest) -> R<ContainerStats> {
        self.pod.stats(&req.container_id).await.map_err(err)
    }

    async fn list_pids(&self, _c: &TtrpcContext, req: ContainerRequest) -> R<ListPidsResponse> {
        let mut r = ListPidsResponse::new();
        r.pids = self.pod.pids(&req.container_id).await.map_err(err)?;
        Ok(r)
    }

    async fn exec_process(&self, _c: &TtrpcContext, req: ExecProcessRequest) -> R<Empty> {
        self.pod.exec(&req).await.map_err(err)?;
        Ok(Empty::new())
    }

    async fn start_process(&self, _c: &TtrpcContext, req: ProcessRequest) -> R<StartResponse> {
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
        self.pod
            .signal(&req.container_id, &req.exec_id, req.signal, req.all)
            .await
            .map_err(err)?;
        Ok(Empty::new())
    }

    async fn wait_process(&self, _c: &TtrpcContext, req: ProcessRequest) -> R<WaitProcessResponse> {
        let (status, at) = self
            .pod
            .wait(&req.container_id, &req.exec_id)
            .await
            .map_err(err)?;
        let mut r = WaitProcessResponse::new();
        r.exit_status = status;
        r.exited_at_ns = at;
        Ok(r)
    }

    async fn resize_terminal(&self, _c: &TtrpcContext, req: ResizeTerminalRequest) -> R<Empty> {
        self.pod
            .resize(&req.container_id, &req.exec_id, req.rows, req.cols)
            .await
            .map_err(err)?;
        Ok(Empty::new())
    }

    async fn close_stdin(&self, _c: &TtrpcContext, req: ProcessRequest) -> R<Empty> {
        self.pod
            .close_stdin(&req.container_id, &req.exec_id)
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
