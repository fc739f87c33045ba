//! `containerd-shim-veil-v2 -info`: what containerd 2.x asks a shim binary
//! before it uses it (and on every create).
//!
//! containerd writes the runtime's options (a protobuf `Any`, possibly empty)
//! to the shim's stdin and reads a protobuf `containerd.types.RuntimeInfo`
//! from its stdout: the runtime's name, version, the options echoed back and
//! the OCI runtime features (`features.Features` JSON under its typeurl),
//! and in its annotations the sandbox API calls the shim serves.
//! containerd 1.6 never asks.

use containerd_shim_protos::{
    protobuf::{well_known_types::any::Any, Message, MessageField},
    types::introspection::{RuntimeInfo, RuntimeVersion},
};

/// The runtime type containerd maps to this binary.
pub const RUNTIME_NAME: &str = "io.containerd.veil.v2";

/// typeurl under which containerd reads the OCI runtime features.
pub const FEATURES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// The OCI runtime features veil offers (runtime-spec `features.md`): the
/// spec versions the agent reads and the mount options it knows. Kept to
/// what is true for every handler.
fn features_json() -> String {
    serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.0",
        "mountOptions": ["ro", "rw", "bind", "rbind", "nosuid", "nodev", "noexec", "relatime"],
    })
    .to_string()
}

/// The `RuntimeInfo` annotation that names the sandbox API calls the shim
/// serves (for `sandboxer = "shim"`), as `SERVICE: Call,Call,...`.
pub const SANDBOX_API_ANNOTATION: &str = "io.veil.sandbox-api";

/// The value of [`SANDBOX_API_ANNOTATION`].
pub fn sandbox_api_calls() -> String {
    format!(
        "containerd.runtime.sandbox.v1.Sandbox: {}",
        crate::task::sandbox_api::SUPPORTED_CALLS.join(",")
    )
}

/// Errors of the `-info` exchange.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// stdin held bytes that are not a protobuf `Any`.
    #[error("runtime options on stdin are not a protobuf Any")]
    Options(#[source] protobuf::Error),
    /// Encoding the answer failed.
    #[error("encoding RuntimeInfo")]
    Encode(#[source] protobuf::Error),
}

/// Answers `-info`: `stdin` is what containerd wrote (the options `Any`, or
/// nothing); the result is the encoded `RuntimeInfo` for stdout.
pub fn runtime_info(stdin: &[u8]) -> Result<Vec<u8>, HandshakeError> {
    let options = if stdin.is_empty() {
        MessageField::none()
    } else {
        MessageField::some(Any::parse_from_bytes(stdin).map_err(HandshakeError::Options)?)
    };
    let info = RuntimeInfo {
        name: RUNTIME_NAME.to_string(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_string(),
            revision: String::new(),
            ..Default::default()
        }),
        options,
        features: MessageField::some(Any {
            type_url: FEATURES_TYPE_URL.to_string(),
            value: features_json().into_bytes(),
            ..Default::default()
        }),
        annotations: [(SANDBOX_API_ANNOTATION.to_string(), sandbox_api_calls())].into(),
        ..Default::default()
    };
    info.write_to_bytes().map_err(HandshakeError::Encode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigSource;

    #[test]
    fn answers_with_runtime_info_and_echoes_options() {
        // What containerd 2.x writes: the handler's options as an Any
        // (`runtimeoptions.v1.Options`, field 2 `config_path`).
        let path = "/etc/veil/config.toml#veil-sim";
        let mut value = vec![0x12, path.len() as u8];
        value.extend_from_slice(path.as_bytes());
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value,
            ..Default::default()
        };
        let out = runtime_info(&any.write_to_bytes().unwrap()).unwrap();
        let info = RuntimeInfo::parse_from_bytes(&out).unwrap();
        assert_eq!(info.name, RUNTIME_NAME);
        assert_eq!(info.version.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(info.options.type_url, "runtimeoptions.v1.Options");
        let back = ConfigSource::from_options(info.options.as_ref()).unwrap();
        assert_eq!(back.handler.as_deref(), Some("veil-sim"));
        assert_eq!(info.features.type_url, FEATURES_TYPE_URL);
        let f: serde_json::Value = serde_json::from_slice(&info.features.value).unwrap();
        assert_eq!(f["ociVersionMin"], "1.0.0");
        assert_eq!(
            info.annotations[SANDBOX_API_ANNOTATION],
            "containerd.runtime.sandbox.v1.Sandbox: CreateSandbox,StartSandbox,Platform,StopSandbox,WaitSandbox,SandboxStatus,PingSandbox,ShutdownSandbox"
        );
    }

    #[test]
    fn empty_stdin_means_no_options_and_garbage_is_refused() {
        let info = RuntimeInfo::parse_from_bytes(&runtime_info(&[]).unwrap()).unwrap();
        assert!(info.options.is_none());
        assert!(matches!(
            runtime_info(&[0xff, 0xff, 0xff]),
            Err(HandshakeError::Options(_))
        ));
    }
}
