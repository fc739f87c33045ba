//! `veil-agent`: the agent that runs as PID 1 inside a veil pod VM.
//!
//! This binary only parses arguments, sets up logging and hands over to the
//! library; see `lib.rs` for what the agent does.

use std::process::ExitCode;

fn main() -> ExitCode {
    // The engine helper: a fresh single-threaded process that builds one
    // container process (see `veil_agent::engine`).
    if std::env::args().nth(1).as_deref() == Some(veil_agent::engine::HELPER_ARG) {
        veil_agent::engine::helper_main();
    }
    let mut config = match veil_agent::config::Config::from_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("veil-agent: {e}");
            return ExitCode::from(veil_agent::EXIT_USAGE);
        }
    };
    let result = veil_agent::prepare(&mut config).and_then(|()| {
        veil_agent::logging::init(&config);
        veil_agent::run(config)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Print the whole chain once, here at the top.
            eprintln!("veil-agent: fatal: {}", veil_agent::error_chain(&e));
            if veil_agent::init::is_pid1() {
                veil_agent::power::power_off();
            }
            ExitCode::from(veil_agent::EXIT_FATAL)
        }
    }
}
