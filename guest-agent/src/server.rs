//! The agent API server: binds the transport (vsock or unix socket), registers
//! the services and runs until shutdown.

use std::{sync::Arc, time::Duration};

use tokio::sync::mpsc;

use crate::{config::Listen, reaper::Reaper};

/// Errors of the API server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding or serving failed in ttrpc.
    #[error("ttrpc server error on {addr}")]
    Ttrpc {
        /// The address served.
        addr: String,
        /// The ttrpc error.
        #[source]
        source: ttrpc::Error,
    },
    /// Other I/O failure.
    #[error("I/O error")]
    Io(#[source] std::io::Error),
}

/// The ttrpc address for a listen configuration.
pub fn ttrpc_address(listen: &Listen) -> String {
    match listen {
        // VMADDR_CID_ANY, written as -1 in ttrpc's vsock address form.
        Listen::Vsock(port) => format!("vsock://-1:{port}"),
        Listen::Unix(path) => format!("unix://{}", path.display()),
    }
}

/// Serves the agent API until a shutdown request arrives, then powers off (in a VM).
pub async fn serve(config: &crate::config::Config, reaper: Reaper) -> Result<(), ServerError> {
    let addr = ttrpc_address(&config.listen);
    if let Listen::Unix(path) = &config.listen {
        let _ = std::fs::remove_file(path);
    }
    let cgroup_parent = match &config.cgroup_parent {
        Some(p) => p.clone(),
        None => crate::cgroup::find_cgroup2_mount()
            .map_err(|e| ServerError::Io(std::io::Error::other(e)))?
            .join("veil"),
    };
    let attestation = Arc::new(if config.kernel_cmdline.is_empty() {
        crate::attest::Attestation::disabled()
    } else {
        crate::attest::Attestation::from_cmdline(&config.kernel_cmdline)
    });
    let pod = Arc::new(
        crate::pod::Pod::new(
            crate::pod::PodConfig {
                state_dir: config.state_dir.clone(),
                cgroup_parent,
                host_mode: config.host_mode(),
            },
            reaper,
        )
        .with_key_source(Arc::new(crate::attest::keys::BrokerKeys::new(Arc::clone(
            &attestation,
        )))),
    );
    // A pod whose measured command line names a TEE is confidential: its
    // policy comes only as verified init-data.
    let gate = Arc::new(match attestation.config() {
        Some(c) => crate::policy::gate::Gate::confidential(c.tee),
        None => crate::policy::gate::Gate::plain(),
    });
    let services = crate::service::Services::new(
        Arc::clone(&pod),
        Arc::clone(&gate),
        Arc::clone(&attestation),
    );
    let (shutdown_tx, mut shutdown_rx) = mpsc::channel(1);
    let health = veil_protocol::agent_ttrpc::create_health(Arc::new(crate::health::HealthService));
    let guest = veil_protocol::agent_ttrpc::create_guest(Arc::new(crate::guest::GuestService {
        shutdown: shutdown_tx,
    }));
    let ttrpc_err = |source| ServerError::Ttrpc {
        addr: addr.clone(),
        source,
    };
    let mut server = ttrpc::r#async::Server::new()
        .bind(&addr)
        .map_err(ttrpc_err)?
        .register_service(health)
        .register_service(guest)
        .register_service(veil_protocol::agent_ttrpc::create_sandbox(Arc::new(
            services.clone(),
        )))
        .register_service(veil_protocol::agent_ttrpc::create_containers(Arc::new(
            services.clone(),
        )))
        .register_service(veil_protocol::agent_ttrpc::create_events(Arc::new(
            services,
        )))
        .register_service(veil_protocol::agent_ttrpc::create_attestation(Arc::new(
            crate::attest::service::AttestationService::new(attestation),
        )));
    server.start().await.map_err(ttrpc_err)?;
    let streams = match &config.listen {
        Listen::Unix(path) => {
            let sp = veil_protocol::stream::host_stream_socket(path);
            let pod = Arc::clone(&pod);
            let gate = Arc::clone(&gate);
            tokio::spawn(async move {
                if let Err(e) = crate::streams::serve_unix(&sp, pod, gate).await {
                    tracing::error!(error = %e, "stream listener failed");
                }
            })
        }
        Listen::Vsock(_) => {
            let pod = Arc::clone(&pod);
            let gate = Arc::clone(&gate);
            tokio::spawn(async move {
                if let Err(e) =
                    crate::streams::serve_vsock(veil_protocol::STREAM_VSOCK_PORT, pod, gate).await
                {
                    tracing::error!(error = %e, "stream listener failed");
                }
            })
        }
    };
    tracing::info!(%addr, "{}", veil_protocol::AGENT_SERVING_MARK);
    if matches!(config.listen, Listen::Vsock(_)) {
        crate::ready::announce();
    }

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ServerError::Io)?;
    tokio::select! {
        _ = shutdown_rx.recv() => {}
        _ = sigterm.recv() => tracing::info!("SIGTERM"),
    }
    // Let the shutdown reply reach the caller before the VM goes away.
    tokio::time::sleep(Duration::from_millis(20)).await;
    streams.abort();
    let _ = tokio::time::timeout(Duration::from_secs(1), server.shutdown()).await;
    if let Err(e) = pod.destroy_sandbox().await {
        tracing::warn!(error = %crate::error_chain(&e), "sandbox teardown failed");
    }
    if let Listen::Unix(path) = &config.listen {
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(veil_protocol::stream::host_stream_socket(path));
    }
    crate::power::power_off();
    Ok(())
}
