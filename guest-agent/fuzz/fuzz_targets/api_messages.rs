//! Agent API requests as the host sends them (protobuf), through the checks
//! the agent applies before acting: ids, paths, sizes, stream handshakes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use protobuf::Message;
use veil_agent::{sandbox, validate, volumes};
use veil_protocol::agent::*;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = CreateSandboxRequest::parse_from_bytes(data) {
        let _ = sandbox::validate(&r);
    }
    if let Ok(r) = AddStorageRequest::parse_from_bytes(data) {
        let _ = validate::id("storage_id", &r.storage_id);
        let _ = validate::absolute_path("locator", &r.locator);
    }
    if let Ok(r) = CreateContainerRequest::parse_from_bytes(data) {
        let _ = validate::id("container_id", &r.container_id);
        if let Some(root) = r.rootfs.as_ref() {
            let _ = validate::relative_path("subpath", &root.subpath);
        }
    }
    if let Ok(r) = ExecProcessRequest::parse_from_bytes(data) {
        let _ = validate::exec_id(&r.exec_id);
    }
    if let Ok(r) = PutVolumeRequest::parse_from_bytes(data) {
        if let Ok((entries, _)) = volumes::check_request(&r) {
            // What passes has plain relative paths only.
            for e in entries {
                assert!(e
                    .path
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_))));
            }
        }
    }
    if let Ok(r) = ReadVolumeFileRequest::parse_from_bytes(data) {
        let _ = validate::id("volume_id", &r.volume_id);
        let _ = validate::relative_path("volume file", &r.path);
    }
    if let Ok(r) = StreamOpen::parse_from_bytes(data) {
        let _ = validate::id("container_id", &r.container_id);
        let _ = validate::exec_id(&r.exec_id);
        let _ = r.kind.enum_value();
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(p) = validate::relative_path("p", s) {
            assert!(!p
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir)));
        }
    }
});
