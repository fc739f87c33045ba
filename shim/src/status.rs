//! The one place where the shim's errors become ttrpc status codes for
//! containerd: by error kind, never by message. An error from the agent keeps
//! the code the agent answered with.

use ttrpc::Code;

use crate::{
    config::ConfigError, rootfs::RootfsError, sandbox::SandboxError, spec::SpecError,
    stdio::StdioError, task::TaskError,
};

/// The ttrpc code for `e`.
pub fn code(e: &TaskError) -> Code {
    match e {
        TaskError::NotFound(_) => Code::NOT_FOUND,
        TaskError::AlreadyExists(_) => Code::ALREADY_EXISTS,
        TaskError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
        TaskError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
        TaskError::Unimplemented(_) => Code::UNIMPLEMENTED,
        TaskError::Config(ConfigError::UnknownHandler(_)) => Code::INVALID_ARGUMENT,
        TaskError::Config(ConfigError::Options(_)) => Code::INVALID_ARGUMENT,
        TaskError::Config(_) => Code::FAILED_PRECONDITION,
        TaskError::Spec(SpecError::Read { .. }) => Code::NOT_FOUND,
        TaskError::Spec(_) => Code::INVALID_ARGUMENT,
        TaskError::Rootfs(RootfsError::Unsupported(_)) => Code::INVALID_ARGUMENT,
        TaskError::Rootfs(_) => Code::INTERNAL,
        TaskError::Agent(a) | TaskError::Stdio(StdioError::Agent(a)) => {
            a.status_code().unwrap_or(Code::INTERNAL)
        }
        TaskError::Stdio(StdioError::Unsupported(_)) => Code::UNIMPLEMENTED,
        TaskError::Stdio(StdioError::Open { .. }) => Code::INVALID_ARGUMENT,
        TaskError::Sandbox(SandboxError::Agent(a)) => a.status_code().unwrap_or(Code::INTERNAL),
        TaskError::Sandbox(SandboxError::Rootfs(RootfsError::Unsupported(_))) => {
            Code::INVALID_ARGUMENT
        }
        TaskError::Sandbox(SandboxError::NoSlot) => Code::RESOURCE_EXHAUSTED,
        TaskError::Sandbox(SandboxError::Attest(_)) => Code::FAILED_PRECONDITION,
        TaskError::Sandbox(_) => Code::INTERNAL,
    }
}

/// `e` as a ttrpc error carrying its code and whole cause chain.
pub fn to_ttrpc(e: &TaskError) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code(e), crate::error_chain(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{rpc, AgentError};

    fn agent_err(c: Code) -> AgentError {
        rpc::<()>("X", Err(ttrpc::Error::RpcStatus(ttrpc::get_status(c, "m")))).unwrap_err()
    }

    #[test]
    fn kinds_map_to_codes() {
        let cases: Vec<(TaskError, Code)> = vec![
            (TaskError::NotFound("c".into()), Code::NOT_FOUND),
            (TaskError::AlreadyExists("c".into()), Code::ALREADY_EXISTS),
            (
                TaskError::InvalidArgument("x".into()),
                Code::INVALID_ARGUMENT,
            ),
            (
                TaskError::FailedPrecondition("x".into()),
                Code::FAILED_PRECONDITION,
            ),
            (TaskError::Unimplemented("checkpoint"), Code::UNIMPLEMENTED),
            (
                TaskError::Config(ConfigError::UnknownHandler("h".into())),
                Code::INVALID_ARGUMENT,
            ),
            (
                TaskError::Spec(SpecError::NotObject),
                Code::INVALID_ARGUMENT,
            ),
            (
                TaskError::Rootfs(RootfsError::Unsupported("x".into())),
                Code::INVALID_ARGUMENT,
            ),
            (
                TaskError::Agent(agent_err(Code::NOT_FOUND)),
                Code::NOT_FOUND,
            ),
            (
                TaskError::Agent(agent_err(Code::FAILED_PRECONDITION)),
                Code::FAILED_PRECONDITION,
            ),
            (
                TaskError::Agent(rpc::<()>("X", Err(ttrpc::Error::LocalClosed)).unwrap_err()),
                Code::INTERNAL,
            ),
            (
                TaskError::Stdio(StdioError::Unsupported("binary://x".into())),
                Code::UNIMPLEMENTED,
            ),
            (
                TaskError::Sandbox(SandboxError::NoSlot),
                Code::RESOURCE_EXHAUSTED,
            ),
            (
                TaskError::Sandbox(SandboxError::Died("x".into(), "y".into())),
                Code::INTERNAL,
            ),
            (
                TaskError::Sandbox(SandboxError::Attest(
                    crate::attest::AttestSetupError::Incomplete,
                )),
                Code::FAILED_PRECONDITION,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(code(&e), want, "{e}");
        }
    }

    #[test]
    fn the_message_carries_the_cause_chain() {
        let e = TaskError::Agent(agent_err(Code::NOT_FOUND));
        match to_ttrpc(&e) {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::NOT_FOUND);
                assert!(s.message.contains("agent X failed"), "{}", s.message);
            }
            other => panic!("{other:?}"),
        }
    }
}
