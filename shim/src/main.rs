//! `containerd-shim-veil-v2`: parses containerd's command line, sets up
//! logging and hands over to the library (`veil_shim::bootstrap`).

use std::process::ExitCode;

use veil_shim::{
    args::{Action, Args},
    bootstrap, handshake,
};

/// Exit code for a bad command line.
const EXIT_USAGE: u8 = 2;
/// Exit code for a failed action.
const EXIT_FAILED: u8 = 1;

/// `-info`: options from stdin, `RuntimeInfo` to stdout.
fn info() -> ExitCode {
    use std::io::{Read, Write};
    let mut input = Vec::new();
    let answer = std::io::stdin()
        .read_to_end(&mut input)
        .map_err(|e| e.to_string())
        .and_then(|_| handshake::runtime_info(&input).map_err(|e| veil_shim::error_chain(&e)))
        .and_then(|out| std::io::stdout().write_all(&out).map_err(|e| e.to_string()));
    match answer {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("containerd-shim-veil-v2 -info: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

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
        Action::Info => return info(),
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
                Ok(rt) => {
                    let r = rt.block_on(bootstrap::serve(&args));
                    // Once the pod is torn down, do not wait for blocking
                    // threads: one may sit in a FIFO open or write that no
                    // client will ever answer (an exec whose start failed,
                    // a stream nobody reads), and the shim must exit.
                    rt.shutdown_timeout(std::time::Duration::from_millis(200));
                    r
                }
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
