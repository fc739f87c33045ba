//! veil-agent: PID 1 of a veil pod VM.
//!
//! It prepares the guest (mounts `/proc`, `/sys`, `/dev`, `/run`, cgroup2),
//! reaps orphaned children, and serves the agent API (see `veil-protocol`) with
//! ttrpc on vsock port 1024 — or, in host mode, on a unix socket so the engine can
//! be tested without a VM. It powers the VM off on request and on fatal error.
//!
//! Module map: [`config`] (command line and kernel parameters), [`init`] (PID 1
//! duties), [`reaper`] (child exit collection), [`server`] (transport and service
//! registration), [`health`], [`guest`] and [`service`] (the ttrpc services),
//! [`streams`] (stdio stream connections), [`pod`] (the use cases: sandbox,
//! storage, containers, processes), [`sandbox`], [`storage`], [`container`],
//! [`process`], [`stdio`], [`cgroup`], [`events`], [`disk`] (dm-verity images
//! and the encrypted scratch disk), [`engine`] (building container
//! processes in a helper process), [`validate`] and [`status`] (request checks
//! and the one error-to-status mapping), [`power`], [`attest`] (remote
//! attestation to the key broker; the released secrets stay in the guest),
//! [`policy`] (the pod's request policy, checked before every request).

pub mod attest;
pub mod cgroup;
pub mod config;
pub mod container;
pub mod disk;
pub mod engine;
pub mod events;
pub mod garp;
pub mod guest;
pub mod health;
pub mod init;
pub mod logging;
pub mod network;
pub mod pod;
pub mod policy;
pub mod power;
pub mod process;
pub mod ready;
pub mod reaper;
pub mod sandbox;
pub mod server;
pub mod service;
pub mod status;
pub mod stdio;
pub mod storage;
pub mod streams;
pub mod validate;
pub mod volumes;

/// Exit code for a bad command line.
pub const EXIT_USAGE: u8 = 2;
/// Exit code for a fatal runtime error.
pub const EXIT_FATAL: u8 = 1;

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// PID 1 set-up (mounts) failed.
    #[error("guest initialisation failed")]
    Init(#[source] init::InitError),
    /// The async runtime could not be built.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    /// The API server failed.
    #[error("agent API server failed")]
    Server(#[source] server::ServerError),
}

/// PID 1 set-up, done before logging starts: the base mounts, then the
/// `veil.*` kernel parameters (readable only once `/proc` is mounted).
pub fn prepare(config: &mut config::Config) -> Result<(), AgentError> {
    if config.host_mode() && !config.init {
        // On a host, keep every mount the agent makes (storages, container
        // roots) in a mount namespace of its own: they vanish with the agent,
        // whatever happens to it. Done while still single-threaded.
        init::private_mount_namespace().map_err(AgentError::Init)?;
    }
    if config.init {
        init::setup_guest().map_err(AgentError::Init)?;
        if let Ok(cmdline) = std::fs::read_to_string("/proc/cmdline") {
            config.apply_kernel_cmdline(&cmdline);
        }
    }
    Ok(())
}

/// Runs the agent until it is asked to stop or a fatal error happens.
pub fn run(config: config::Config) -> Result<(), AgentError> {
    init::become_subreaper();
    if config.init {
        // Priority over the containers, and tasks kept for the agent.
        let root = std::path::Path::new("/sys/fs/cgroup");
        let parent = config
            .cgroup_parent
            .clone()
            .unwrap_or_else(|| root.join("veil"));
        match cgroup::protect_agent(root, &parent) {
            Ok(share) => tracing::info!(
                cgroup = %share.cgroup.display(),
                cpu_weight = cgroup::AGENT_CPU_WEIGHT,
                container_tasks = ?share.container_tasks,
                "agent cgroup set up"
            ),
            Err(e) => tracing::warn!(
                error = %error_chain(&e),
                "the agent runs without priority over the containers"
            ),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    rt.block_on(async move {
        let reaper =
            reaper::Reaper::start().map_err(|e| AgentError::Server(server::ServerError::Io(e)))?;
        server::serve(&config, reaper)
            .await
            .map_err(AgentError::Server)
    })
}

pub use veil_common::error_chain;

#[cfg(test)]
mod kinds_tests;
