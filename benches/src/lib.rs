//! Shared helpers for veil's benchmarks: repeated measurement and reporting.
//!
//! Every benchmark measures its baseline in the same run, so that results are
//! comparable on whatever machine they run on, and reports medians.

pub mod plot;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use veil_test_support::{Artefacts, TestVm, VmOptions};

/// What the floor initrd's `/init` prints (`rootfs/floor-init.c`).
pub const FLOOR_MARK: &str = "veil-floor: init reached";

/// The bare-boot floor, once: QEMU spawn → the floor init's line on the
/// console (same kernel and VM shape as an agent boot).
pub fn floor_once(a: &Artefacts) -> Result<Duration> {
    let mut opts = VmOptions::agent(a);
    opts.initrd = a.floor_initrd.clone();
    let vm = TestVm::boot(a, &opts)?;
    let deadline = vm.started + Duration::from_secs(60);
    loop {
        if vm.console().contains(FLOOR_MARK) {
            return Ok(vm.started.elapsed());
        }
        if Instant::now() > deadline {
            bail!("floor init never printed; console:\n{}", vm.console());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Summary of a series of timings.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Median.
    pub median: Duration,
    /// Fastest.
    pub min: Duration,
    /// Slowest.
    pub max: Duration,
}

/// Summarises `samples` (which must not be empty).
pub fn summarize(samples: &[Duration]) -> Summary {
    let mut s = samples.to_vec();
    s.sort();
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2
    };
    Summary {
        n,
        median,
        min: s[0],
        max: s[n - 1],
    }
}

/// Formats a duration in milliseconds with one decimal.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Prints one result row.
pub fn report(name: &str, s: &Summary) {
    println!(
        "{name:<44} median {:>10}   min {:>10}   max {:>10}   (n={})",
        ms(s.median),
        ms(s.min),
        ms(s.max),
        s.n
    );
}

/// The accelerator a pod's VM gets here with `accel = "auto"` (what the
/// shim's canary decides), for the results' record.
pub fn accel_name() -> String {
    format!(
        "{:?}",
        veil_shim::vmm::accel::resolve(veil_shim::vmm::AccelChoice::Auto)
    )
}

/// Number of runs: `VEIL_BENCH_RUNS` or `default`.
pub fn runs(default: usize) -> usize {
    std::env::var("VEIL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_series() {
        let d = |ms| Duration::from_millis(ms);
        assert_eq!(summarize(&[d(3), d(1), d(2)]).median, d(2));
        assert_eq!(
            summarize(&[d(4), d(1), d(2), d(3)]).median,
            Duration::from_micros(2500)
        );
    }
}
