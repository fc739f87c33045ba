//! Shared helpers for veil's benchmarks: repeated measurement and reporting.
//!
//! Every benchmark measures its baseline in the same run, so that results are
//! comparable on whatever machine they run on, and reports medians.

pub mod plot;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use veil_test_support::{containerd::Containerd, oci, Artefacts, TestVm, VmOptions};

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

/// A private containerd with the busybox test image imported into `ns`,
/// for the benches that go through containerd: the artefacts, containerd,
/// the directory the image was built in (kept while it runs) and the
/// `--runtime-config-path` of the `veil` handler.
pub fn bench_containerd(ns: &str) -> Result<(Artefacts, Containerd, tempfile::TempDir, String)> {
    let a = Artefacts::locate()?;
    let c = Containerd::start(&a)?;
    let work = tempfile::tempdir()?;
    c.import(ns, &oci::busybox_archive(work.path())?)?;
    let rt = c.runtime_config("veil");
    Ok((a, c, work, rt))
}

/// `ctr run EXTRA… IMAGE ID` of the busybox image in `ns`, under the veil
/// runtime with config `rt`, or runc when `rt` is `None`; the caller adds
/// the command.
pub fn ctr_run(c: &Containerd, ns: &str, rt: Option<&str>, extra: &[&str], id: &str) -> Command {
    let mut cmd = c.ctr(ns);
    cmd.arg("run").args(extra);
    if let Some(rt) = rt {
        cmd.args([
            "--runtime",
            "io.containerd.veil.v2",
            "--runtime-config-path",
            rt,
        ]);
    }
    cmd.args([oci::BUSYBOX_IMAGE, id]);
    cmd
}

/// The shims' report files (`veil_shim::report`), which they write only
/// while `<state_dir>/metrics` exists: created here if the node has none
/// (and removed again with whatever is left in it when dropped).
pub struct ShimReports {
    dir: std::path::PathBuf,
    created: bool,
}

impl ShimReports {
    /// Reports of the shims that `c` starts.
    pub fn open(c: &Containerd) -> Result<Self> {
        let dir = c
            .veil_settings()?
            .state_dir
            .join(veil_shim::report::METRICS_DIR);
        let created = !dir.is_dir();
        std::fs::create_dir_all(&dir)?;
        Ok(ShimReports { dir, created })
    }

    /// Pod `pod`'s `kind` report (`start`, `teardown`, `attest`), waiting up
    /// to `wait` for it; taken (removed) once read.
    pub fn take(&self, pod: &str, kind: &str, wait: Duration) -> Result<serde_json::Value> {
        let path = self.dir.join(format!("{pod}.{kind}.json"));
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(text) = std::fs::read_to_string(&path) {
                let _ = std::fs::remove_file(&path);
                return Ok(serde_json::from_str(&text)?);
            }
            if Instant::now() > deadline {
                bail!(
                    "no {kind} report from the shim of {pod} in {}",
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes pod `pod`'s reports of every kind.
    pub fn discard(&self, pod: &str) {
        for kind in ["start", "teardown", "attest"] {
            let _ = std::fs::remove_file(self.dir.join(format!("{pod}.{kind}.json")));
        }
    }
}

impl Drop for ShimReports {
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
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
