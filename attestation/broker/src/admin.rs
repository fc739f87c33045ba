//! The admin API: register resources, replace the release policy, add reference values.
//! Every route needs `Authorization: Bearer <admin token>`; the token is compared in constant
//! time against the digest the broker holds. Missing and wrong tokens are refused and audited.
//!
//! | route | body |
//! |---|---|
//! | `POST /kbs/v0/resource/<repo>/<type>/<tag>` | the resource bytes (stored 0600) |
//! | `DELETE /kbs/v0/resource/<repo>/<type>/<tag>` | — (404 when there is no such resource) |
//! | `POST /kbs/v0/resource-policy` | the whole policy, TOML ([`crate::policy`]) |
//! | `POST /kbs/v0/reference-value` | reference values JSON, merged by name ([`veil_verifier::reference`]) |

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use veil_attestation::ResourcePath;
use veil_common::error_chain;
use veil_verifier::reference::ReferenceValues;

use crate::audit::Outcome;
use crate::policy::Policy;
use crate::server::{bearer, Kbs, POLICY_FILE, REFERENCE_FILE};
use crate::KbsError;

impl Kbs {
    /// Checks the admin bearer token.
    pub fn check_admin(&self, headers: &HeaderMap) -> Result<(), KbsError> {
        let want = self.admin_digest.ok_or(KbsError::AdminAuth(
            "admin API is disabled (no admin token configured)",
        ))?;
        let got = bearer(headers).ok_or(KbsError::AdminAuth("missing admin token"))?;
        let got: [u8; 32] = Sha256::digest(got.as_bytes()).into();
        if bool::from(got.ct_eq(&want)) {
            Ok(())
        } else {
            Err(KbsError::AdminAuth("wrong admin token"))
        }
    }

    fn write_state_file(&self, name: &str, data: &[u8]) -> Result<(), KbsError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = self.state_dir.join(format!(".{name}.tmp"));
        let failed = |path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| KbsError::StateFile { path, source }
        };
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(failed(&tmp))?;
        f.write_all(data)
            .and_then(|_| f.sync_all())
            .map_err(failed(&tmp))?;
        let dest = self.state_dir.join(name);
        std::fs::rename(&tmp, &dest).map_err(failed(&dest))
    }

    /// Stores a resource.
    pub fn admin_put_resource(
        &self,
        headers: &HeaderMap,
        path: (String, String, String),
        body: &[u8],
    ) -> Result<(), KbsError> {
        self.check_admin(headers)?;
        let rp = ResourcePath::new(&path.0, &path.1, &path.2).map_err(KbsError::ResourcePath)?;
        self.store.put(&rp, body).map_err(KbsError::Store)
    }

    /// Deletes a resource.
    pub fn admin_delete_resource(
        &self,
        headers: &HeaderMap,
        path: (String, String, String),
    ) -> Result<(), KbsError> {
        self.check_admin(headers)?;
        let rp = ResourcePath::new(&path.0, &path.1, &path.2).map_err(KbsError::ResourcePath)?;
        if self.store.delete(&rp).map_err(KbsError::Store)? {
            Ok(())
        } else {
            Err(KbsError::ResourceNotFound)
        }
    }

    /// Replaces the policy.
    pub fn admin_set_policy(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), KbsError> {
        self.check_admin(headers)?;
        let text = std::str::from_utf8(body).map_err(KbsError::PolicyEncoding)?;
        let p = Policy::from_toml(text).map_err(KbsError::PolicyInvalid)?;
        self.write_state_file(POLICY_FILE, body)?;
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = p;
        Ok(())
    }

    /// Merges reference values.
    pub fn admin_add_reference(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), KbsError> {
        self.check_admin(headers)?;
        let add = ReferenceValues::from_json(body).map_err(KbsError::Reference)?;
        let mut refs = self.refs.write().unwrap_or_else(|e| e.into_inner());
        let mut merged = refs.clone();
        merged.merge(add);
        self.write_state_file(REFERENCE_FILE, merged.to_json().as_bytes())?;
        *refs = merged;
        Ok(())
    }

    fn admin_outcome(&self, what: String, r: Result<(), KbsError>) -> Response {
        let mut ev = self.event(Outcome::Admin, "admin");
        ev.resource = Some(what);
        match r {
            Ok(()) => {
                self.audit.record(ev);
                StatusCode::OK.into_response()
            }
            Err(e) => {
                ev.outcome = Outcome::Refusal;
                ev.reason = Some(error_chain(&e));
                self.audit.record(ev);
                e.into_response()
            }
        }
    }
}

pub(crate) async fn h_put_resource(
    State(kbs): State<Arc<Kbs>>,
    headers: HeaderMap,
    UrlPath(path): UrlPath<(String, String, String)>,
    body: Bytes,
) -> Response {
    let what = format!("{}/{}/{}", path.0, path.1, path.2);
    let r = kbs.admin_put_resource(&headers, path, &body);
    kbs.admin_outcome(what, r)
}

pub(crate) async fn h_delete_resource(
    State(kbs): State<Arc<Kbs>>,
    headers: HeaderMap,
    UrlPath(path): UrlPath<(String, String, String)>,
) -> Response {
    let what = format!("delete {}/{}/{}", path.0, path.1, path.2);
    let r = kbs.admin_delete_resource(&headers, path);
    kbs.admin_outcome(what, r)
}

pub(crate) async fn h_set_policy(
    State(kbs): State<Arc<Kbs>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let r = kbs.admin_set_policy(&headers, &body);
    kbs.admin_outcome("resource-policy".into(), r)
}

pub(crate) async fn h_add_reference(
    State(kbs): State<Arc<Kbs>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let r = kbs.admin_add_reference(&headers, &body);
    kbs.admin_outcome("reference-value".into(), r)
}
