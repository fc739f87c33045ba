//! Logging: `tracing` to stderr, which is the console when the agent is PID 1.
//!
//! Under software emulation every byte on the serial console costs a VM exit, so
//! the default level is `info` and the agent logs little on the hot path.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. As PID 1 the filter may be refined later by
/// the `veil.log=` kernel parameter, which is only readable once `/proc` is mounted.
pub fn init(config: &crate::config::Config) {
    let filter = EnvFilter::try_new(&config.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .try_init();
}
