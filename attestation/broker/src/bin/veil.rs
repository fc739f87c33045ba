//! `veil`: operator tools. `veil measure` computes reference values; `veil sim-ca init` creates
//! the simulated TEE's keys; `veil sim-report` signs a simulated report (the simulated firmware,
//! as a command, for tests and external clients); `veil policy` writes, digests and explains pod
//! request policies.

#[path = "veil/policy.rs"]
mod policy;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use veil_attestation::Tee;
use veil_common::error_chain;
use veil_verifier::measure::sim::sim_measurement_files;
use veil_verifier::measure::snp::{
    parse_guest_features, snp_launch_measurement_traced, MeasuredPages, SnpMeasureInput,
};
use veil_verifier::reference::{ReferenceValue, ReferenceValues, REFERENCE_VALUES_VERSION};
use veil_verifier::sim_ca::{init_sim_ca, SimChip};

const EXIT_FAILED: u8 = 1;
/// `veil policy check` found the request denied.
const EXIT_DENIED: u8 = 3;

#[derive(Parser)]
#[command(name = "veil", about = "veil operator tools")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// AMD SEV-SNP launch digest (QEMU + OVMF).
    Snp,
    /// veil's simulated TEE.
    Sim,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// The measurement in hex.
    Hex,
    /// Reference-values JSON for the broker.
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pod request policies: generate from a manifest, digest, check a request.
    Policy {
        #[command(subcommand)]
        cmd: policy::PolicyCmd,
    },
    /// Compute the expected launch measurement.
    Measure {
        /// Which TEE.
        #[arg(long, value_enum)]
        mode: Mode,
        /// OVMF image (snp; optional firmware for sim).
        #[arg(long)]
        ovmf: Option<PathBuf>,
        /// Kernel.
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initrd.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[arg(long)]
        append: Option<String>,
        /// vCPU count.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// vCPU type (snp; default EPYC-v4), e.g. EPYC-v4, EPYC-Milan, EPYC-Genoa.
        #[arg(long)]
        vcpu_type: Option<String>,
        /// Guest features (snp; default 0x1): decimal, or hex with 0x, as sev-snp-measure
        /// reads it (`21` is twenty-one, `0x21` thirty-three).
        #[arg(long)]
        guest_features: Option<String>,
        /// Print each run of measured pages (type, GPA, count, what) to stderr (snp).
        #[arg(long)]
        verbose: bool,
        /// Reference value name (json output).
        #[arg(long, default_value = "default")]
        name: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Hex)]
        output_format: Format,
        /// Write to this file instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// The simulated TEE's CA.
    SimCa {
        #[command(subcommand)]
        cmd: SimCaCmd,
    },
    /// Sign a simulated report and print its evidence JSON (the simulated firmware).
    SimReport {
        /// Directory with chip.key.pem and chip.cert.json.
        #[arg(long)]
        dir: PathBuf,
        /// 64 bytes of report data, hex.
        #[arg(long)]
        report_data: String,
        /// 48-byte measurement, hex.
        #[arg(long)]
        measurement: String,
        /// 32-byte host data, hex.
        #[arg(long)]
        host_data: Option<String>,
    },
}

#[derive(Subcommand)]
enum SimCaCmd {
    /// Generate root and chip keys into a directory.
    Init {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

fn hex_array<const N: usize>(what: &str, s: &str) -> Result<[u8; N], String> {
    let v = hex::decode(s.trim()).map_err(|_| format!("{what} is not hex"))?;
    v.try_into()
        .map_err(|_| format!("{what} must be {N} bytes"))
}

fn run(cmd: Cmd) -> Result<(), String> {
    match cmd {
        Cmd::Policy { cmd } => policy::run(cmd).map(|_| ()),
        Cmd::Measure {
            mode,
            ovmf,
            kernel,
            initrd,
            append,
            vcpus,
            vcpu_type,
            guest_features,
            verbose,
            name,
            output_format,
            output,
        } => {
            let mut inputs: BTreeMap<String, serde_json::Value> = BTreeMap::new();
            inputs.insert("vcpus".into(), vcpus.into());
            if let Some(a) = &append {
                inputs.insert("cmdline".into(), a.clone().into());
            }
            let (tee, m) = match mode {
                Mode::Snp => {
                    let ovmf = ovmf.ok_or("--ovmf is required for --mode snp")?;
                    let vcpu_type = vcpu_type.unwrap_or_else(|| "EPYC-v4".to_string());
                    inputs.insert("vcpu_type".into(), vcpu_type.clone().into());
                    let guest_features = guest_features
                        .as_deref()
                        .map(parse_guest_features)
                        .transpose()
                        .map_err(|e| error_chain(&e))?;
                    if let Some(g) = guest_features {
                        inputs.insert("guest_features".into(), g.into());
                    }
                    let input = SnpMeasureInput {
                        ovmf,
                        kernel,
                        initrd,
                        cmdline: append,
                        vcpus,
                        vcpu_type,
                        guest_features,
                    };
                    let mut show = |p: MeasuredPages| {
                        if verbose {
                            eprintln!(
                                "{:<8} gpa={:#014x} pages={:<5} {}",
                                p.page_type, p.gpa, p.pages, p.source
                            );
                        }
                    };
                    (
                        Tee::Snp,
                        snp_launch_measurement_traced(&input, &mut show)
                            .map_err(|e| error_chain(&e))?,
                    )
                }
                Mode::Sim => {
                    // Refuse what the simulated measurement would silently ignore.
                    for (given, flag) in [
                        (vcpu_type.is_some(), "--vcpu-type"),
                        (guest_features.is_some(), "--guest-features"),
                        (verbose, "--verbose"),
                    ] {
                        if given {
                            return Err(format!("{flag} applies to --mode snp only"));
                        }
                    }
                    let kernel = kernel.ok_or("--kernel is required for --mode sim")?;
                    let initrd = initrd.ok_or("--initrd is required for --mode sim")?;
                    let m = sim_measurement_files(
                        &kernel,
                        &initrd,
                        append.as_deref().unwrap_or(""),
                        vcpus,
                        ovmf.as_deref(),
                    )
                    .map_err(|e| e.to_string())?;
                    (Tee::VeilSim, m)
                }
            };
            let text = match output_format {
                Format::Hex => format!("{}\n", hex::encode(m)),
                Format::Json => {
                    let rv = ReferenceValues {
                        version: REFERENCE_VALUES_VERSION,
                        reference_values: vec![ReferenceValue {
                            name,
                            tee,
                            measurement: hex::encode(m),
                            inputs,
                        }],
                    };
                    format!("{}\n", rv.to_json())
                }
            };
            match output {
                Some(p) => std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display())),
                None => {
                    print!("{text}");
                    Ok(())
                }
            }
        }
        Cmd::SimCa {
            cmd: SimCaCmd::Init { dir, force },
        } => {
            let files = init_sim_ca(&dir, force).map_err(|e| error_chain(&e))?;
            println!("{}", files.root_pub().display());
            Ok(())
        }
        Cmd::SimReport {
            dir,
            report_data,
            measurement,
            host_data,
        } => {
            let chip = SimChip::load(&dir).map_err(|e| error_chain(&e))?;
            let rd: [u8; 64] = hex_array("--report-data", &report_data)?;
            let m: [u8; 48] = hex_array("--measurement", &measurement)?;
            let hd: Option<[u8; 32]> = host_data
                .map(|h| hex_array("--host-data", &h))
                .transpose()?;
            println!("{}", chip.evidence(&rd, &m, hd.as_ref()));
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let result = match Cli::parse().cmd {
        Cmd::Policy { cmd } => policy::run(cmd),
        other => run(other).map(|()| true),
    };
    match result {
        Ok(false) => ExitCode::from(EXIT_DENIED),
        Ok(true) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("veil: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}
