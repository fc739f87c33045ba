//! The `Attestation` ttrpc service: request decoding and error mapping only;
//! the work is [`super::Attestation`]'s. The reply names the resources the
//! guest now holds, never their contents.

use std::sync::Arc;

use async_trait::async_trait;
use ttrpc::r#async::TtrpcContext;
use veil_protocol::agent::{AttestRequest, AttestResponse};

use super::Attestation;
use crate::status::to_ttrpc;

/// Implements `veil.agent.v1.Attestation`.
pub struct AttestationService {
    attestation: Arc<Attestation>,
}

impl AttestationService {
    /// The service over the guest's attestation.
    pub fn new(attestation: Arc<Attestation>) -> Self {
        AttestationService { attestation }
    }
}

#[async_trait]
impl veil_protocol::agent_ttrpc::Attestation for AttestationService {
    async fn attest(
        &self,
        _ctx: &TtrpcContext,
        req: AttestRequest,
    ) -> ttrpc::Result<AttestResponse> {
        let s = self
            .attestation
            .attest(req.refresh)
            .await
            .map_err(|e| to_ttrpc(&e))?;
        let mut r = AttestResponse::new();
        r.tee = s.tee.as_str().to_string();
        r.measurement = s.measurement;
        r.resources = s.resources;
        r.duration_us = u64::try_from(s.duration.as_micros()).unwrap_or(u64::MAX);
        Ok(r)
    }
}
