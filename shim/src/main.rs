//! `containerd-shim-veil-v2`: parses containerd's command line, sets up
//! logging and hands over to the library (`veil_shim::bootstrap`).

use std::process::ExitCode;

use veil_shim::{
    args::{Action, Args},
    bootstrap,
};

/// Exit code for a bad command line.
const EXIT_USAGE: u8 = 2;
/// Exit code for a failed action.
const EXIT_FAILED: u8 = 1;

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("containerd-shim-veil-v2: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let result = match args.action {
        Action::Version => {
            println!("containerd-shim-veil-v2 {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Action::Start => bootstrap::start(&args),
        Action::Delete => bootstrap::delete(&args),
        Action::Serve => {
            bootstrap::init_logging(&args);
            // One thread: the shim's footprint stays small, and the VMM it
            // spawns from this thread dies with it (PR_SET_PDEATHSIG).
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(bootstrap::serve(&args)),
                Err(e) => {
                    eprintln!("containerd-shim-veil-v2: cannot start the runtime: {e}");
                    return ExitCode::from(EXIT_FAILED);
                }
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain = veil_shim::error_chain(&e);
            tracing::error!(error = %chain, "shim failed");
            eprintln!("containerd-shim-veil-v2: {chain}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}
