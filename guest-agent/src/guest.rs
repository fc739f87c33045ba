//! The Guest service: lifecycle of the VM as a whole.

use async_trait::async_trait;
use tokio::sync::mpsc;
use veil_protocol::agent::{Empty, ShutdownRequest};

/// Implements `veil.agent.v1.Guest`. A shutdown request is forwarded to the
/// server loop, which powers off after the reply has been sent.
pub struct GuestService {
    /// Signals the server loop to shut down.
    pub shutdown: mpsc::Sender<()>,
}

#[async_trait]
impl veil_protocol::agent_ttrpc::Guest for GuestService {
    async fn shutdown(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        _req: ShutdownRequest,
    ) -> ttrpc::Result<Empty> {
        tracing::info!("shutdown requested");
        let _ = self.shutdown.try_send(());
        Ok(Empty::new())
    }
}
