//! Every variant of the agent's request-path error types, with the kind (and
//! so the status code) the host gets for it: the one table to read and to
//! extend when a variant is added.

use std::path::PathBuf;

use veil_protocol::agent::StreamKind;

use crate::{
    cgroup::CgroupError,
    disk::{
        dm::DmError,
        loopdev::LoopError,
        luks2::Luks2Error,
        scratch::{IntegrityError, ScratchError},
        verity::VerityError,
        DiskError, KeyError, PolicyError,
    },
    engine::{plan::PlanError, EngineError},
    pod::PodError,
    status::{Classify, Kind},
    stdio::StdioError,
    storage::StorageError,
    validate::ValidationError,
    volumes::VolumeError,
};

fn io() -> std::io::Error {
    std::io::Error::other("cause")
}

fn p() -> PathBuf {
    PathBuf::from("/dev/vdb")
}

fn check(cases: Vec<(Box<dyn Classify>, Kind)>) {
    for (e, want) in cases {
        assert_eq!(e.kind(), want, "{}", crate::error_chain(&*e));
        match crate::status::to_ttrpc(&*e) {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), crate::status::code(want));
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

fn bad_id() -> ValidationError {
    ValidationError::Id(veil_common::validate_id("container_id", "-x").unwrap_err())
}

#[test]
fn requests_containers_and_stdio() {
    check(cases![
        PodError::Invalid(bad_id()) => InvalidArgument,
        PodError::NotFound { what: "container", id: "c".into() } => NotFound,
        PodError::Exists { what: "container", id: "c".into() } => AlreadyExists,
        PodError::State("running".into()) => FailedPrecondition,
        PodError::BadRequest("x".into()) => InvalidArgument,
        PodError::Plan(PlanError::Unsupported("x".into())) => Unimplemented,
        PodError::Storage(StorageError::InUse("s".into())) => FailedPrecondition,
        PodError::Volume(VolumeError::NotFound("v".into())) => NotFound,
        VolumeError::Invalid(bad_id()) => InvalidArgument,
        VolumeError::Refused { volume: "v".into(), reason: "x".into() } => InvalidArgument,
        VolumeError::TooLarge { volume: "v".into(), size: 2, entries: 1, max_bytes: 1, max_entries: 1 } => ResourceExhausted,
        VolumeError::NotFound("v".into()) => NotFound,
        VolumeError::Os { what: "write", path: p(), source: io() } => Internal,
        PodError::Cgroup(CgroupError::NoController("memory")) => FailedPrecondition,
        PodError::Engine(EngineError::Child("x".into())) => Internal,
        PodError::Engine(EngineError::Program("x: not found".into())) => NotFound,
        PodError::Engine(EngineError::Exhausted("cannot start another process".into())) => ResourceExhausted,
        PodError::Plan(PlanError::NoPodNamespace("pid")) => FailedPrecondition,
        PodError::Stdio(StdioError::NoTerminal) => FailedPrecondition,
        PodError::Io { what: "x".into(), source: io() } => Internal,
        ValidationError::HostName { field: "hostname", value: "a b".into() } => InvalidArgument,
        StdioError::Create(io()) => Internal,
        StdioError::NoSuchStream(StreamKind::STDIN) => FailedPrecondition,
        StdioError::AlreadyAttached(StreamKind::STDOUT) => AlreadyExists,
        StdioError::Resize(nix::Error::EINVAL) => Internal,
        StdioError::NoTerminal => FailedPrecondition,
        CgroupError::Io { path: p(), source: io() } => Internal,
        CgroupError::NoController("memory") => FailedPrecondition,
        CgroupError::Invalid("x".into()) => InvalidArgument,
        CgroupError::NoHierarchy => Internal,
        CgroupError::Timeout("frozen") => Internal,
        PlanError::Invalid("x".into()) => InvalidArgument,
        PlanError::Unsupported("x".into()) => Unimplemented,
        PlanError::BindSource { source_name: "s".into(), destination: "/d".into(), cause: Box::new(io()) } => InvalidArgument,
    ]);
}

#[test]
fn storage_and_disks() {
    check(cases![
        StorageError::Invalid(bad_id()) => InvalidArgument,
        StorageError::Refused("x".into()) => InvalidArgument,
        StorageError::Exists("s".into()) => AlreadyExists,
        StorageError::NotFound("s".into()) => NotFound,
        StorageError::InUse("s".into()) => FailedPrecondition,
        StorageError::NoDevice("veil-img0".into()) => NotFound,
        StorageError::NoSource(p()) => NotFound,
        StorageError::Disk(DiskError::Invalid("x".into())) => InvalidArgument,
        StorageError::Os { what: "mount", path: p(), source: io() } => Internal,
        DiskError::Key(KeyError::NotAttested("disk-key".into())) => PermissionDenied,
        DiskError::Policy(PolicyError::UnknownImage("busybox".into())) => PermissionDenied,
        DiskError::Verity(VerityError::Invalid("x".into())) => InvalidArgument,
        DiskError::Scratch(ScratchError::Io { path: p(), source: io() }) => Internal,
        DiskError::Dm(DmError::Unavailable) => FailedPrecondition,
        DiskError::Invalid("x".into()) => InvalidArgument,
        DiskError::Loop(LoopError::NoneFree) => ResourceExhausted,
        ScratchError::Integrity { device: p(), source: IntegrityError::TagStore(1, io()) } => ResourceExhausted,
        KeyError::Refused { resource: "disk-key".into(), reason: "policy".into() } => PermissionDenied,
        KeyError::NotAttested("disk-key".into()) => PermissionDenied,
        KeyError::Malformed { resource: "image-policy".into(), reason: "not JSON".into() } => Internal,
        KeyError::Failed { resource: "disk-key".into(), source: Box::new(io()) } => Internal,
        PolicyError::UnknownImage("busybox".into()) => PermissionDenied,
        PolicyError::WrongRootHash { image: "busybox".into(), root_hash: "00".into() } => PermissionDenied,
        PolicyError::VerityRequired("busybox".into()) => PermissionDenied,
        PolicyError::Malformed("x".into()) => Internal,
        VerityError::Invalid("x".into()) => InvalidArgument,
        VerityError::TooSmall { device: p(), size: 1, hash_offset: 2 } => InvalidArgument,
        VerityError::Mismatch { device: p(), source: io() } => DataLoss,
        VerityError::Dm(DmError::Invalid("x".into())) => InvalidArgument,
        VerityError::Io { path: p(), source: io() } => Internal,
        ScratchError::Luks2 { device: p(), source: Luks2Error::WrongKey } => PermissionDenied,
        ScratchError::Dm { device: p(), source: DmError::Unavailable } => Internal,
        ScratchError::Io { path: p(), source: io() } => Internal,
        Luks2Error::NotLuks => Internal,
        Luks2Error::Corrupt("x".into()) => DataLoss,
        Luks2Error::Unsupported("x".into()) => InvalidArgument,
        Luks2Error::Limit("x".into()) => InvalidArgument,
        Luks2Error::WrongKey => PermissionDenied,
        Luks2Error::TooSmall(1) => InvalidArgument,
        Luks2Error::Io("read", io()) => Internal,
        DmError::Unavailable => FailedPrecondition,
        DmError::Invalid("x".into()) => InvalidArgument,
        DmError::Ioctl { op: "create", name: "x".into(), source: io() } => Internal,
        DmError::Io { what: "open", path: p(), source: io() } => Internal,
    ]);
}
