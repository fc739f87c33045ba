//! Every [`KbsError`] variant: its kind, its HTTP status and its `type`.

use super::*;

fn json() -> serde_json::Error {
    serde_json::from_slice::<serde_json::Value>(b"{").unwrap_err()
}

#[test]
fn every_error_has_a_kind_a_status_and_a_type() {
    let not_utf8 = vec![0xffu8];
    let utf8 = std::str::from_utf8(&not_utf8).unwrap_err();
    let reference = veil_verifier::reference::ReferenceValues::from_json(b"{").unwrap_err();
    let cases: Vec<(KbsError, Kind, u16, &str)> = vec![
        (
            KbsError::Payload(ProtocolError::Json {
                what: "Request",
                source: json(),
            }),
            Kind::InvalidArgument,
            400,
            "InvalidRequest",
        ),
        (
            KbsError::Payload(ProtocolError::UnsupportedTee("sgx".into())),
            Kind::Unimplemented,
            400,
            "UnsupportedTee",
        ),
        (
            KbsError::MethodNotAllowed("PUT".into()),
            Kind::Unimplemented,
            405,
            "MethodNotAllowed",
        ),
        (KbsError::NoSuchEndpoint, Kind::NotFound, 404, "NotFound"),
        (
            KbsError::ProtocolVersion("9".into()),
            Kind::InvalidArgument,
            400,
            "ProtocolVersion",
        ),
        (
            KbsError::ResourcePath(ResourcePathError::Shape("a".into())),
            Kind::InvalidArgument,
            400,
            "InvalidRequest",
        ),
        (
            KbsError::NoCredentials,
            Kind::PermissionDenied,
            401,
            "UnAuthenticated",
        ),
        (
            KbsError::Token(token::TokenError::Expired),
            Kind::PermissionDenied,
            401,
            "UnAuthenticated",
        ),
        (
            KbsError::Session(session::SessionError::Expired),
            Kind::PermissionDenied,
            401,
            "UnAuthenticated",
        ),
        (
            KbsError::Session(session::SessionError::Full),
            Kind::ResourceExhausted,
            503,
            "UnAuthenticated",
        ),
        (
            KbsError::NonceMismatch,
            Kind::PermissionDenied,
            401,
            "AttestationFailed",
        ),
        (
            KbsError::TeeKey(JweError::UnsupportedKeyType("RSA")),
            Kind::Unimplemented,
            401,
            "AttestationFailed",
        ),
        (
            KbsError::Evidence(EvidenceError::TooLong(1)),
            Kind::InvalidArgument,
            401,
            "AttestationFailed",
        ),
        (
            KbsError::Verify(VerifyError::Sim(
                veil_verifier::verify::sim::SimVerifyError::ChipIdMismatch,
            )),
            Kind::PermissionDenied,
            401,
            "AttestationFailed",
        ),
        (
            KbsError::InitDataMismatch {
                digest: "a".into(),
                host_data: "b".into(),
            },
            Kind::PermissionDenied,
            401,
            "AttestationFailed",
        ),
        (
            KbsError::PolicyDenied(policy::PolicyError::NoPolicy),
            Kind::PermissionDenied,
            401,
            "PolicyDeny",
        ),
        (
            KbsError::ResourceNotFound,
            Kind::NotFound,
            404,
            "ResourceNotFound",
        ),
        (
            KbsError::AdminAuth("wrong admin token"),
            Kind::PermissionDenied,
            401,
            "AdminAuthFailed",
        ),
        (
            KbsError::PolicyEncoding(utf8),
            Kind::InvalidArgument,
            400,
            "InvalidRequest",
        ),
        (
            KbsError::PolicyInvalid(policy::PolicyError::BadPath("x".into())),
            Kind::InvalidArgument,
            400,
            "InvalidRequest",
        ),
        (
            KbsError::Reference(reference),
            Kind::InvalidArgument,
            400,
            "InvalidRequest",
        ),
        (
            KbsError::Store(store::StoreError::TooLarge(1)),
            Kind::InvalidArgument,
            413,
            "InvalidRequest",
        ),
        (
            KbsError::StateFile {
                path: "p".into(),
                source: std::io::Error::other("x"),
            },
            Kind::Internal,
            500,
            "InternalError",
        ),
        (
            KbsError::Encrypt(JweError::Encrypt),
            Kind::Internal,
            500,
            "InternalError",
        ),
    ];
    for (e, kind, status, ty) in cases {
        assert_eq!(e.kind(), kind, "{e}");
        assert_eq!(e.status().as_u16(), status, "{e}");
        assert_eq!(e.error_type(), ty, "{e}");
    }
}

#[test]
fn a_policy_denial_names_its_reason_once() {
    let e = KbsError::PolicyDenied(policy::PolicyError::SimulatedNotAllowed);
    assert_eq!(
        error_chain(&e),
        "policy denied the resource: simulated evidence is not allowed by this resource's policy"
    );
}
