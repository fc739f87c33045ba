//! Broker sessions: a challenge nonce per `/auth`, consumed by exactly one `/attest`, then the
//! attestation result for resource requests until the session expires.
//!
//! Owns the session table and the clock seam ([`Clock`]); knows nothing about HTTP or policy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use rand_core::RngCore;
use thiserror::Error;

use veil_attestation::protocol::{HashAlgorithm, TeePubKey};
use veil_attestation::Tee;
use veil_common::{Classify, Kind};
use veil_verifier::Claims;

/// Time source in Unix seconds; tests substitute [`ManualClock`].
pub trait Clock: Send + Sync {
    /// Now, in seconds since the Unix epoch.
    fn now_secs(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_secs(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// A clock tests move by hand.
#[derive(Debug, Default, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock at `secs`.
    pub fn new(secs: u64) -> Self {
        ManualClock(Arc::new(AtomicU64::new(secs)))
    }
    /// Moves the clock forward.
    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_secs(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Why a session operation failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SessionError {
    /// No session with this id (never existed or already removed).
    #[error("unknown session")]
    Unknown,
    /// The session expired.
    #[error("session expired")]
    Expired,
    /// The session's nonce was already used by an `/attest` (replay).
    #[error("session has no pending challenge (nonce already used)")]
    NoPendingChallenge,
    /// The session has not attested successfully.
    #[error("session has not attested")]
    NotAttested,
    /// Too many live sessions.
    #[error("too many sessions")]
    Full,
}

impl Classify for SessionError {
    fn kind(&self) -> Kind {
        match self {
            SessionError::Unknown
            | SessionError::Expired
            | SessionError::NoPendingChallenge
            | SessionError::NotAttested => Kind::PermissionDenied,
            SessionError::Full => Kind::ResourceExhausted,
        }
    }
}

/// A pending challenge.
#[derive(Debug, Clone)]
pub struct PendingChallenge {
    /// The nonce sent.
    pub nonce: String,
    /// The TEE the client declared.
    pub tee: Tee,
    /// The hash algorithm selected.
    pub hash: HashAlgorithm,
}

/// A successful attestation.
#[derive(Debug, Clone)]
pub struct Attested {
    /// What the evidence established.
    pub claims: Claims,
    /// The TEE key resources are encrypted to.
    pub tee_pubkey: TeePubKey,
}

#[derive(Debug)]
enum State {
    Challenged(PendingChallenge),
    Consumed,
    Attested(Attested),
}

#[derive(Debug)]
struct Session {
    state: State,
    expires_at: u64,
}

/// The session table.
pub struct SessionStore {
    map: Mutex<HashMap<String, Session>>,
    ttl_secs: u64,
    max_sessions: usize,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore")
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

fn random_b64(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand_core::OsRng.fill_bytes(&mut b);
    base64::engine::general_purpose::STANDARD.encode(b)
}

impl SessionStore {
    /// A store whose sessions live `ttl_secs`.
    pub fn new(ttl_secs: u64, max_sessions: usize, clock: Arc<dyn Clock>) -> Self {
        SessionStore {
            map: Mutex::new(HashMap::new()),
            ttl_secs,
            max_sessions,
            clock,
        }
    }

    /// The clock in use.
    pub fn now_secs(&self) -> u64 {
        self.clock.now_secs()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A poisoned lock only means a panic elsewhere; the map itself stays consistent.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a session: returns `(session id, nonce)`.
    pub fn challenge(
        &self,
        tee: Tee,
        hash: HashAlgorithm,
    ) -> Result<(String, String), SessionError> {
        let now = self.now_secs();
        let mut map = self.lock();
        map.retain(|_, s| s.expires_at > now);
        if map.len() >= self.max_sessions {
            return Err(SessionError::Full);
        }
        let mut idb = [0u8; 24];
        rand_core::OsRng.fill_bytes(&mut idb);
        let id = hex::encode(idb);
        let nonce = random_b64(32);
        map.insert(
            id.clone(),
            Session {
                state: State::Challenged(PendingChallenge {
                    nonce: nonce.clone(),
                    tee,
                    hash,
                }),
                expires_at: now.saturating_add(self.ttl_secs),
            },
        );
        Ok((id, nonce))
    }

    /// Takes the pending challenge (single use: a second call is a replay).
    pub fn take_challenge(&self, id: &str) -> Result<PendingChallenge, SessionError> {
        let now = self.now_secs();
        let mut map = self.lock();
        let s = map.get_mut(id).ok_or(SessionError::Unknown)?;
        if s.expires_at <= now {
            map.remove(id);
            return Err(SessionError::Expired);
        }
        match std::mem::replace(&mut s.state, State::Consumed) {
            State::Challenged(c) => Ok(c),
            other => {
                s.state = other;
                Err(SessionError::NoPendingChallenge)
            }
        }
    }

    /// Records a successful attestation on the session.
    pub fn set_attested(&self, id: &str, attested: Attested) -> Result<(), SessionError> {
        let mut map = self.lock();
        let s = map.get_mut(id).ok_or(SessionError::Unknown)?;
        s.state = State::Attested(attested);
        Ok(())
    }

    /// The attestation result of a live session.
    pub fn attested(&self, id: &str) -> Result<Attested, SessionError> {
        let now = self.now_secs();
        let mut map = self.lock();
        let s = map.get(id).ok_or(SessionError::Unknown)?;
        if s.expires_at <= now {
            map.remove(id);
            return Err(SessionError::Expired);
        }
        match &s.state {
            State::Attested(a) => Ok(a.clone()),
            _ => Err(SessionError::NotAttested),
        }
    }

    /// When the session expires (Unix seconds).
    pub fn expires_at(&self, id: &str) -> Option<u64> {
        self.lock().get(id).map(|s| s.expires_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds() {
        for (e, k) in [
            (SessionError::Unknown, Kind::PermissionDenied),
            (SessionError::Expired, Kind::PermissionDenied),
            (SessionError::NoPendingChallenge, Kind::PermissionDenied),
            (SessionError::NotAttested, Kind::PermissionDenied),
            (SessionError::Full, Kind::ResourceExhausted),
        ] {
            assert_eq!(e.kind(), k, "{e}");
        }
    }

    #[test]
    fn nonce_is_single_use_and_sessions_expire() {
        let clock = ManualClock::new(1000);
        let store = SessionStore::new(60, 10, Arc::new(clock.clone()));
        let (id, nonce) = store
            .challenge(Tee::VeilSim, HashAlgorithm::Sha384)
            .unwrap();
        assert_eq!(store.take_challenge(&id).unwrap().nonce, nonce);
        assert_eq!(
            store.take_challenge(&id).unwrap_err(),
            SessionError::NoPendingChallenge
        );
        let (id2, _) = store
            .challenge(Tee::VeilSim, HashAlgorithm::Sha384)
            .unwrap();
        clock.advance(61);
        assert_eq!(
            store.take_challenge(&id2).unwrap_err(),
            SessionError::Expired
        );
        assert_eq!(
            store.take_challenge("nope").unwrap_err(),
            SessionError::Unknown
        );
    }
}
