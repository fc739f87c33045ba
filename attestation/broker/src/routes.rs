//! The broker's HTTP routes: the KBS protocol's (in `server`) and the
//! admin API's (in `admin`), on one router.

use std::sync::Arc;

use axum::{
    extract::DefaultBodyLimit,
    routing::{get, post},
    Router,
};

use veil_attestation::protocol::MAX_BODY_LEN;

use crate::{
    admin,
    server::{h_attest, h_auth, h_method_not_allowed, h_not_found, h_resource, Kbs},
};

impl Kbs {
    /// The axum router with the protocol and admin routes.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/kbs/v0/auth", post(h_auth).fallback(h_method_not_allowed))
            .route(
                "/kbs/v0/attest",
                post(h_attest).fallback(h_method_not_allowed),
            )
            .route(
                "/kbs/v0/resource/{repo}/{kind}/{tag}",
                get(h_resource)
                    .post(admin::h_put_resource)
                    .delete(admin::h_delete_resource)
                    .fallback(h_method_not_allowed),
            )
            .route(
                "/kbs/v0/resource-policy",
                post(admin::h_set_policy).fallback(h_method_not_allowed),
            )
            .route(
                "/kbs/v0/reference-value",
                post(admin::h_add_reference).fallback(h_method_not_allowed),
            )
            .fallback(h_not_found)
            .layer(DefaultBodyLimit::max(MAX_BODY_LEN))
            .with_state(self)
    }
}
