//! The Health service: liveness and version.

use async_trait::async_trait;
use veil_protocol::agent::{
    check_response::ServingStatus, CheckRequest, CheckResponse, VersionRequest, VersionResponse,
};

/// Implements `veil.agent.v1.Health`.
pub struct HealthService;

#[async_trait]
impl veil_protocol::agent_ttrpc::Health for HealthService {
    async fn check(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        _req: CheckRequest,
    ) -> ttrpc::Result<CheckResponse> {
        let mut r = CheckResponse::new();
        r.status = ServingStatus::SERVING.into();
        Ok(r)
    }

    async fn version(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        _req: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
        let mut r = VersionResponse::new();
        r.agent_version = env!("CARGO_PKG_VERSION").to_string();
        r.api_version = veil_protocol::API_VERSION;
        Ok(r)
    }
}
