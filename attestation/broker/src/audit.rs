//! The audit trail: one JSON line per release and per refusal (with the reason and the
//! measurement), appended to a file and mirrored to `tracing` (target `veil_kbs::audit`).
//!
//! Never records secrets: no resource bytes, no tokens, no session ids (only a short digest).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;
use sha2::{Digest, Sha256};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// A resource was released.
    Release,
    /// A request was refused.
    Refusal,
    /// An attestation succeeded (no resource yet).
    Attested,
    /// An admin change was applied.
    Admin,
}

/// One audit record.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    /// Unix seconds.
    pub ts: u64,
    /// What happened.
    pub outcome: Outcome,
    /// Protocol step: `auth`, `attest`, `resource`, `admin`.
    pub step: &'static str,
    /// The resource path, when one was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// The TEE type, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tee: Option<String>,
    /// The launch measurement (hex), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measurement: Option<String>,
    /// Why it was refused (the full error chain).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// First 16 hex digits of SHA-256(session id), to correlate lines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// A short, non-reversible label for a session id.
pub fn session_label(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))[..16].to_string()
}

/// The audit sink.
#[derive(Debug, Default)]
pub struct AuditLog {
    file: Option<Mutex<std::fs::File>>,
    memory: Option<Mutex<Vec<AuditEvent>>>,
}

impl AuditLog {
    /// Appends to `path` (created 0600).
    pub fn to_file(path: &Path) -> std::io::Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(AuditLog {
            file: Some(Mutex::new(f)),
            memory: None,
        })
    }

    /// Keeps events in memory (tests).
    pub fn in_memory() -> Self {
        AuditLog {
            file: None,
            memory: Some(Mutex::new(Vec::new())),
        }
    }

    /// Records an event.
    pub fn record(&self, ev: AuditEvent) {
        let line = serde_json::to_string(&ev).unwrap_or_default();
        tracing::info!(target: "veil_kbs::audit", "{line}");
        if let Some(f) = &self.file {
            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = writeln!(f, "{line}").and_then(|_| f.flush()) {
                tracing::error!(error = %e, "cannot write audit log");
            }
        }
        if let Some(m) = &self.memory {
            m.lock().unwrap_or_else(|e| e.into_inner()).push(ev);
        }
    }

    /// Events recorded in memory.
    pub fn events(&self) -> Vec<AuditEvent> {
        self.memory
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
    }
}
