//! Every variant of every shim error type, with the kind (and so the ttrpc
//! code) containerd gets for it: the one table to read and to extend when a
//! variant is added (a match without `_` makes the compiler ask for it).

use std::{path::PathBuf, time::Duration};

use veil_common::{Classify, Kind};

use crate::{
    attest::AttestSetupError,
    config::ConfigError,
    process::ProcessError,
    rootfs::RootfsError,
    sandbox::{images::ImageError, BootError, SandboxError},
    spec::{MountRefusal, SpecError},
    state::StateError,
    stdio::StdioError,
    storage::verity::VerityError,
    vmm::{qmp::QmpError, VmmError},
    volumes::{block::BlockError, shared::SharedError, AcquireError, VolumeError},
    vsock::{ReadyError, VsockError},
};

fn io() -> std::io::Error {
    std::io::Error::other("cause")
}

fn p() -> PathBuf {
    PathBuf::from("/x")
}

fn json() -> serde_json::Error {
    serde_json::from_str::<serde_json::Value>("{").unwrap_err()
}

fn check(cases: Vec<(Box<dyn Classify>, Kind)>) {
    for (e, want) in cases {
        assert_eq!(e.kind(), want, "{}", veil_common::error_chain(&*e));
        match veil_protocol::status::to_ttrpc(&*e) {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), veil_protocol::status::code(want));
                assert!(!s.message.contains("Status {"), "{}", s.message);
            }
            other => panic!("{other:?}"),
        }
    }
}

macro_rules! cases {
    ($( $e:expr => $k:ident ),* $(,)?) => {
        vec![ $( (Box::new($e) as Box<dyn Classify>, Kind::$k) ),* ]
    };
}

#[test]
fn config_spec_state_stdio() {
    check(cases![
        ConfigError::Read { path: p(), source: io() } => FailedPrecondition,
        ConfigError::Parse { path: p(), source: toml::from_str::<toml::Table>("=").unwrap_err() } => FailedPrecondition,
        ConfigError::UnknownHandler("h".into()) => InvalidArgument,
        ConfigError::Options(protobuf::Error::from(io())) => InvalidArgument,
        SpecError::Read { path: p(), source: io() } => NotFound,
        SpecError::Json(json()) => InvalidArgument,
        SpecError::NotObject => InvalidArgument,
        SpecError::Mount { destination: "/d".into(), source_path: "/s".into(), reason: MountRefusal::NotShared { handler: "veil-sim".into(), volume: "v".into() } } => FailedPrecondition,
        SpecError::Mount { destination: "/d".into(), source_path: "/s".into(), reason: MountRefusal::EmptyDirWithoutScratch } => FailedPrecondition,
        SpecError::Mount { destination: "/d".into(), source_path: "/s".into(), reason: MountRefusal::EmptyDirSubPath } => FailedPrecondition,
        SpecError::Mount { destination: "/d".into(), source_path: "".into(), reason: MountRefusal::NoSource } => InvalidArgument,
        SpecError::Device { path: "/dev/sdb".into() } => InvalidArgument,
        BlockError::NoDevice { path: "/dev/xvda".into(), major: 7, minor: 3, source: io() } => NotFound,
        BlockError::NoSlot("/dev/xvda".into()) => ResourceExhausted,
        VolumeError::Read { path: p(), source: io() } => Internal,
        VolumeError::Read { path: p(), source: std::io::ErrorKind::NotFound.into() } => NotFound,
        VolumeError::NotAtomic { path: p(), source: io() } => InvalidArgument,
        VolumeError::Layout { path: p(), reason: "x".into() } => InvalidArgument,
        VolumeError::TooLarge { path: p(), max_bytes: 1, max_entries: 1 } => ResourceExhausted,
        VolumeError::Watch { path: p(), source: nix::Error::EMFILE } => Internal,
        VolumeError::NoShare => FailedPrecondition,
        VolumeError::Shared(SharedError::NoDaemon(p())) => FailedPrecondition,
        SharedError::NotReady { socket: p(), timeout: Duration::from_secs(1), log: p() } => Internal,
        SharedError::Mount { what: "bind", path: p(), source: io() } => Internal,
        AcquireError { destination: "/etc/config".into(), source: VolumeError::Layout { path: p(), reason: "x".into() } } => InvalidArgument,
        StateError::Io { what: "write", path: p(), source: io() } => Internal,
        StateError::BadId("..".into()) => InvalidArgument,
        StdioError::Open { path: p(), source: io() } => InvalidArgument,
        StdioError::Unsupported("binary://x".into()) => Unimplemented,
        StdioError::Agent(crate::agent::AgentError::NotReady(Duration::from_secs(1))) => DeadlineExceeded,
        SandboxError::Config(ConfigError::UnknownHandler("h".into())) => InvalidArgument,
        SandboxError::Spec(SpecError::NotObject) => InvalidArgument,
        SandboxError::NoRelay("c/e".into()) => NotFound,
    ]);
}

#[test]
fn images_and_rootfs() {
    check(cases![
        RootfsError::Unsupported("3 mounts".into()) => InvalidArgument,
        RootfsError::Io { what: "read", path: p(), source: io() } => Internal,
        RootfsError::Mount { path: p(), source: nix::Error::EINVAL } => Internal,
        RootfsError::Tool { tool: "mkfs.erofs".into(), status: "1".into(), stderr: String::new() } => Internal,
        RootfsError::Verity(VerityError::Record(p(), json())) => Internal,
        VerityError::Io { what: "read", path: p(), source: io() } => Internal,
        ImageError::Rootfs(RootfsError::Unsupported("x".into())) => InvalidArgument,
        ImageError::Qmp(QmpError::Closed) => Unavailable,
        ImageError::Agent(crate::agent::AgentError::NotReady(Duration::from_secs(1))) => DeadlineExceeded,
        ImageError::NoSlot => ResourceExhausted,
    ]);
}

#[tokio::test]
async fn a_dead_build_task_is_internal() {
    let join = tokio::spawn(async { panic!("build task died") })
        .await
        .unwrap_err();
    check(cases![ImageError::Task(join) => Internal]);
}

#[test]
fn vm_vsock_qmp_boot() {
    let spawn = || ProcessError::Spawn {
        program: "qemu".into(),
        source: io(),
    };
    check(cases![
        spawn() => Internal,
        ProcessError::Log { path: p(), source: io() } => Internal,
        VsockError::Spawn(spawn()) => Internal,
        VsockError::BackendNotReady { path: p(), timeout: Duration::from_secs(1), log: p() } => Internal,
        VsockError::VhostDevice { what: "open", source: io() } => Internal,
        VsockError::NoFreeCid { first: 3, last: 4 } => ResourceExhausted,
        ReadyError::Bind { path: p(), source: io() } => Internal,
        ReadyError::Timeout(Duration::from_secs(1)) => DeadlineExceeded,
        ReadyError::Io(io()) => Internal,
        ReadyError::BadLine("HELLO".into()) => Internal,
        QmpError::Connect { path: p(), timeout: Duration::from_secs(1) } => Unavailable,
        QmpError::Io(io()) => Unavailable,
        QmpError::Closed => Unavailable,
        QmpError::Json(json()) => Internal,
        QmpError::Command { command: "device_add".into(), class: "GenericError".into(), desc: "no".into() } => Internal,
        QmpError::EventTimeout("DEVICE_DELETED".into()) => DeadlineExceeded,
        VmmError::Spawn(spawn()) => Internal,
        VmmError::MissingFile { what: "kernel", path: p() } => FailedPrecondition,
        VmmError::InvalidSpec("x".into()) => InvalidArgument,
        VmmError::Qmp(QmpError::Closed) => Unavailable,
        BootError::State(StateError::BadId("..".into())) => InvalidArgument,
        BootError::Vsock(VsockError::NoFreeCid { first: 3, last: 4 }) => ResourceExhausted,
        BootError::Ready(ReadyError::Timeout(Duration::from_secs(1))) => DeadlineExceeded,
        BootError::Vmm(VmmError::InvalidSpec("x".into())) => InvalidArgument,
        BootError::Qmp(QmpError::Closed) => Unavailable,
        BootError::Agent(crate::agent::AgentError::NotReady(Duration::from_secs(1))) => DeadlineExceeded,
        BootError::File { path: p(), source: io() } => Internal,
        BootError::Died("qemu: bad".into(), String::new()) => Internal,
        BootError::Attest(AttestSetupError::NoTee) => FailedPrecondition,
    ]);
}

#[test]
fn attestation_set_up() {
    let sim_keys = veil_verifier::sim_ca::SimChip::load(std::path::Path::new("/nonexistent"))
        .map(|_| ())
        .expect_err("no keys there");
    check(cases![
        AttestSetupError::Cert { path: p(), source: io() } => FailedPrecondition,
        AttestSetupError::CertFormat(p()) => FailedPrecondition,
        AttestSetupError::NoTee => FailedPrecondition,
        AttestSetupError::Incomplete => FailedPrecondition,
        AttestSetupError::Resource { name: "k".into(), path: "../x".into() } => FailedPrecondition,
        AttestSetupError::SimKeys { dir: p(), source: sim_keys } => FailedPrecondition,
    ]);
}
