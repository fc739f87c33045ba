//! The shim's client of the agent API inside the pod VM (ttrpc over vsock
//! port 1024, stdio streams over port 1025).
//!
//! This module owns the connection and the call conventions (timeouts,
//! error wrapping). What to ask the agent is the sandbox's and task's business.

use std::time::{Duration, Instant};

use veil_protocol::{
    agent::{self, CheckRequest, StreamKind},
    agent_ttrpc::{
        AttestationClient, ContainersClient, EventsClient, GuestClient, HealthClient, SandboxClient,
    },
};

use veil_common::{Classify, Kind};
use veil_protocol::{
    status::RemoteError,
    vsock::{Connection, GuestTransport, VsockError},
};

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent's port could not be reached.
    #[error("cannot reach the agent")]
    Connect(#[source] VsockError),
    /// A call failed: the agent's own answer, or the connection's failure.
    #[error("agent {call} failed")]
    Rpc {
        /// The RPC.
        call: &'static str,
        /// What it failed with, classified and readable.
        #[source]
        source: RemoteError,
    },
    /// A stdio stream could not be opened.
    #[error("cannot open the {kind:?} stream of {container}/{exec}")]
    Stream {
        /// Container id.
        container: String,
        /// Exec id.
        exec: String,
        /// Which stream.
        kind: StreamKind,
        /// Why.
        #[source]
        source: veil_protocol::stream::FrameError,
    },
    /// The agent did not answer its health check in time.
    #[error("the agent did not become ready within {0:?}")]
    NotReady(Duration),
    /// A guest port did not accept a connection within its deadline,
    /// stretched for the node's load.
    #[error("guest vsock port {port} did not accept a connection within {expired}")]
    Slow {
        /// Guest port.
        port: u32,
        /// How long, and under what load.
        expired: crate::patience::Expired,
    },
}

/// How long a stream connection to the agent may take on an idle node.
const STREAM_CONNECT: Duration = Duration::from_secs(10);

/// Connects to guest `port`, within `base` stretched for the node's load.
pub async fn connect_port(
    transport: &GuestTransport,
    port: u32,
    base: Duration,
) -> Result<veil_protocol::vsock::Connection, AgentError> {
    match crate::patience::wait(
        base,
        transport.connect(port, crate::patience::ceiling(base)),
    )
    .await
    {
        Ok(r) => r.map_err(AgentError::Connect),
        Err(expired) => Err(AgentError::Slow { port, expired }),
    }
}

impl Classify for AgentError {
    fn kind(&self) -> Kind {
        match self {
            AgentError::Connect(e) => e.kind(),
            AgentError::Rpc { source, .. } => source.kind,
            AgentError::Stream { source, .. } => source.kind(),
            AgentError::NotReady(_) => Kind::DeadlineExceeded,
            AgentError::Slow { .. } => Kind::Unavailable,
        }
    }
}

/// Context for a short call: 60 s on an idle node, stretched for the
/// node's load when the call is made.
pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(crate::patience::scaled(Duration::from_secs(60)).as_nanos() as i64)
}

/// Context for a call that blocks as long as a process runs (no timeout).
pub fn ctx_unbounded() -> ttrpc::context::Context {
    ttrpc::context::Context::default()
}

/// A connected agent.
#[derive(Clone)]
pub struct Agent {
    transport: GuestTransport,
    /// Sandbox service.
    pub sandbox: SandboxClient,
    /// Containers service.
    pub containers: ContainersClient,
    /// Events service.
    pub events: EventsClient,
    /// Guest service.
    pub guest: GuestClient,
    /// Attestation service.
    pub attestation: AttestationClient,
}

fn client_from(conn: Connection) -> std::io::Result<ttrpc::asynchronous::Client> {
    // ttrpc's client owns the (non-blocking) descriptor from here on.
    let fd = conn.into_fd()?;
    Ok(ttrpc::asynchronous::Client::new(
        std::os::fd::IntoRawFd::into_raw_fd(fd),
    ))
}

impl Agent {
    /// Connects to the agent and waits until it answers its health check,
    /// for at most `timeout`.
    pub async fn connect(transport: GuestTransport, timeout: Duration) -> Result<Self, AgentError> {
        let deadline = Instant::now() + timeout;
        let stream = transport
            .connect(veil_protocol::AGENT_VSOCK_PORT, timeout)
            .await
            .map_err(AgentError::Connect)?;
        let client = client_from(stream).map_err(|source| {
            AgentError::Connect(VsockError::Io {
                port: veil_protocol::AGENT_VSOCK_PORT,
                source,
            })
        })?;
        let health = HealthClient::new(client.clone());
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let c = ttrpc::context::with_timeout(
                left.max(Duration::from_millis(100)).as_nanos() as i64
            );
            match health.check(c, &CheckRequest::new()).await {
                Ok(r)
                    if r.status.enum_value_or_default()
                        == agent::check_response::ServingStatus::SERVING =>
                {
                    break
                }
                Ok(_) | Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                _ => return Err(AgentError::NotReady(timeout)),
            }
        }
        Ok(Agent {
            transport,
            sandbox: SandboxClient::new(client.clone()),
            containers: ContainersClient::new(client.clone()),
            events: EventsClient::new(client.clone()),
            attestation: AttestationClient::new(client.clone()),
            guest: GuestClient::new(client),
        })
    }

    /// Opens the `kind` stdio stream of process (`container`, `exec`).
    pub async fn open_stream(
        &self,
        container: &str,
        exec: &str,
        kind: StreamKind,
    ) -> Result<Connection, AgentError> {
        let wrap = |source| AgentError::Stream {
            container: container.to_string(),
            exec: exec.to_string(),
            kind,
            source,
        };
        let mut conn = connect_port(
            &self.transport,
            veil_protocol::STREAM_VSOCK_PORT,
            STREAM_CONNECT,
        )
        .await?;
        veil_protocol::stream::open(&mut conn, container, exec, kind)
            .await
            .map_err(wrap)?;
        Ok(conn)
    }
}

/// Wraps a ttrpc result of the RPC `call`.
pub fn rpc<T>(call: &'static str, r: ttrpc::Result<T>) -> Result<T, AgentError> {
    r.map_err(|e| AgentError::Rpc {
        call,
        source: RemoteError::from(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_answer_keeps_its_kind_and_reads_plainly() {
        let e = rpc::<()>(
            "RemoveContainer",
            Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::FAILED_PRECONDITION,
                "container 'c1' is running; kill it first",
            ))),
        )
        .unwrap_err();
        assert_eq!(e.kind(), Kind::FailedPrecondition);
        assert_eq!(
            veil_common::error_chain(&e),
            "agent RemoveContainer failed: container 'c1' is running; kill it first"
        );
        let closed = rpc::<()>("X", Err(ttrpc::Error::LocalClosed)).unwrap_err();
        assert_eq!(closed.kind(), Kind::Unavailable);
        assert!(!veil_common::error_chain(&closed).contains("Status"));
    }

    #[test]
    fn every_variant_has_its_kind() {
        let cases = [
            (
                AgentError::Connect(VsockError::ConnectTimeout {
                    port: 1024,
                    timeout: Duration::from_secs(1),
                }),
                Kind::Unavailable,
            ),
            (
                AgentError::Stream {
                    container: "c".into(),
                    exec: String::new(),
                    kind: StreamKind::STDOUT,
                    source: veil_protocol::stream::FrameError::Refused {
                        code: veil_protocol::status::code_number(Kind::NotFound),
                        message: "no such process".into(),
                    },
                },
                Kind::NotFound,
            ),
            (
                AgentError::NotReady(Duration::from_secs(1)),
                Kind::DeadlineExceeded,
            ),
        ];
        for (e, kind) in cases {
            assert_eq!(e.kind(), kind, "{e}");
        }
    }
}
