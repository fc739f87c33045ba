//! A key broker for attestation tests: the real `veil-kbs` binary on
//! 127.0.0.1 with TLS, a simulated TEE CA and reference values made with the
//! real `veil` CLI — the operator's flow — in a temp dir, plus the host
//! services (the shim's simulated firmware and broker relay) for a
//! [`TestVm`].
//!
//! The broker runs as a child process, stopped by PID when dropped (also
//! when a test panics); the temp dir goes with the fixture.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use veil_shim::{
    attest::{firmware::SimFirmware, relay::KbsRelay},
    config::{Config, HandlerConfig},
    process::{ManagedChild, SpawnOptions},
    sandbox::{HostService, LaunchInfo},
};

use crate::{Artefacts, TestVm};

/// The simulated TEE's keys, the broker's TLS identity and its state
/// directory, made with the real CLIs.
pub struct KbsSetup {
    /// Everything lives here.
    pub dir: tempfile::TempDir,
    veil: PathBuf,
    kbs: PathBuf,
}

impl KbsSetup {
    /// Runs `veil sim-ca init` and `veil-kbs init-tls` in a fresh temp dir.
    pub fn new(a: &Artefacts) -> Result<Self> {
        let (veil, kbs) = (
            a.require_veil_cli()?.to_path_buf(),
            a.require_kbs()?.to_path_buf(),
        );
        let dir = tempfile::Builder::new()
            .prefix("veil-test-kbs.")
            .tempdir()?;
        let s = KbsSetup { dir, veil, kbs };
        s.run(&s.veil, &["sim-ca", "init", "--dir", &s.path("sim-ca")])?;
        s.run(
            &s.kbs,
            &["init-tls", "--out-dir", &s.path("tls"), "--san", "kbs"],
        )?;
        std::fs::create_dir_all(s.dir.path().join("state/resources"))?;
        Ok(s)
    }

    fn path(&self, rel: &str) -> String {
        self.dir.path().join(rel).to_string_lossy().into_owned()
    }

    fn run(&self, bin: &Path, args: &[&str]) -> Result<Vec<u8>> {
        let out = Command::new(bin)
            .args(args)
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "{} {args:?} failed: {}",
                bin.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out.stdout)
    }

    /// The simulated CA directory (`chip.key.pem`, `root.pub.pem`, ...).
    pub fn sim_ca(&self) -> PathBuf {
        self.dir.path().join("sim-ca")
    }

    /// The broker certificate the guest pins.
    pub fn cert_der(&self) -> PathBuf {
        self.dir.path().join("tls/cert.der")
    }

    /// The `veil-sim` handler configured for this broker, fetching
    /// `resources` (name, `repo/type/tag`). Its `kbs_address` is a
    /// placeholder: the address is not part of the guest's measured words,
    /// and the relay is pointed at the running broker by [`Self::serve_vm`].
    pub fn handler(&self, resources: &[(&str, &str)]) -> HandlerConfig {
        let mut h = Config::default()
            .handler("veil-sim")
            .cloned()
            .unwrap_or_else(|_| unreachable!("veil-sim is a built-in handler"));
        h.kbs_cert = self.cert_der();
        h.kbs_address = "127.0.0.1:0".into();
        h.sim_ca_dir = self.sim_ca();
        h.kbs_resources = resources
            .iter()
            .map(|(n, p)| (n.to_string(), p.to_string()))
            .collect();
        h
    }

    /// The guest's attestation words for `h` (what the shim puts on the
    /// kernel command line).
    pub fn words(&self, h: &HandlerConfig) -> Result<String> {
        Ok(veil_shim::attest::guest_cmdline(h)?)
    }

    /// `veil measure --mode sim` of `launch`: registers it as reference value
    /// `name` in the broker's state and returns the hex measurement.
    pub fn add_reference(&self, name: &str, launch: &LaunchInfo) -> Result<String> {
        let out = self.run(
            &self.veil,
            &[
                "measure",
                "--mode",
                "sim",
                "--kernel",
                &launch.kernel.to_string_lossy(),
                "--initrd",
                &launch.initrd.to_string_lossy(),
                "--append",
                &launch.cmdline,
                "--vcpus",
                &launch.vcpus.to_string(),
                "--name",
                name,
                "--output-format",
                "json",
            ],
        )?;
        let new: serde_json::Value = serde_json::from_slice(&out)?;
        let m = new["reference_values"][0]["measurement"]
            .as_str()
            .context("veil measure printed no measurement")?
            .to_string();
        let path = self.dir.path().join("state/reference-values.json");
        let mut all = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice::<serde_json::Value>(&b)?,
            Err(_) => serde_json::json!({"version": 1, "reference_values": []}),
        };
        if let Some(list) = all["reference_values"].as_array_mut() {
            list.push(new["reference_values"][0].clone());
        }
        std::fs::write(&path, serde_json::to_vec_pretty(&all)?)?;
        Ok(m)
    }

    /// Stores resource `path` (`repo/type/tag`) with `data`.
    pub fn add_resource(&self, path: &str, data: &[u8]) -> Result<()> {
        let p = self.dir.path().join("state/resources").join(path);
        std::fs::create_dir_all(p.parent().context("resource path")?)?;
        std::fs::write(p, data)?;
        Ok(())
    }

    /// Writes the broker's `policy.toml`.
    pub fn set_policy(&self, toml: &str) -> Result<()> {
        Ok(std::fs::write(
            self.dir.path().join("state/policy.toml"),
            toml,
        )?)
    }

    /// Starts `veil-kbs serve` on 127.0.0.1 (a free port) with TLS, the
    /// simulated root and an audit log.
    pub fn start(&self) -> Result<Broker> {
        let log = self.dir.path().join("veil-kbs.log");
        let audit = self.dir.path().join("audit.log");
        let mut cmd = Command::new(&self.kbs);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(self.path("state"))
            .args(["--tls-cert", &self.path("tls/cert.pem")])
            .args(["--tls-key", &self.path("tls/key.pem")])
            .args(["--sim-root", &self.path("sim-ca/root.pub.pem")])
            .arg("--audit-log")
            .arg(&audit);
        let child = ManagedChild::spawn(
            "veil-kbs",
            cmd,
            &log,
            SpawnOptions {
                die_with_parent_thread: true,
                ..Default::default()
            },
        )?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(a) = text
                .lines()
                .find_map(|l| l.strip_prefix("veil-kbs: listening on https://"))
            {
                break a.trim().to_string();
            }
            if Instant::now() > deadline {
                bail!("veil-kbs did not start listening; its log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Broker { addr, audit, child })
    }

    /// Serves the simulated firmware and the broker relay for `vm` (which must
    /// not have attested yet): what the shim starts for a `veil-sim` pod.
    pub fn serve_vm(&self, vm: &TestVm, broker: &Broker) -> Result<HostServices> {
        self.serve_vm_bound(vm, broker, None)
    }

    /// [`Self::serve_vm`] for a VM launched with `host_data` (the init-data
    /// digest the simulated firmware signs into every report).
    pub fn serve_vm_bound(
        &self,
        vm: &TestVm,
        broker: &Broker,
        host_data: Option<Vec<u8>>,
    ) -> Result<HostServices> {
        let mut launch = vm.launch_info(veil_shim::config::TeeKind::Sim);
        launch.host_data = host_data;
        let services: Vec<Arc<dyn HostService>> = vec![
            Arc::new(SimFirmware::load(&self.sim_ca())?),
            Arc::new(KbsRelay::new(broker.addr.clone())),
        ];
        let mut tasks = Vec::new();
        for s in services {
            let path = vm.host_listener_path(s.port());
            let l = tokio::net::UnixListener::bind(&path)
                .with_context(|| format!("binding {}", path.display()))?;
            tasks.push(s.serve(l, launch.clone()));
        }
        Ok(HostServices { tasks })
    }
}

/// The host services of one VM; stopped when dropped.
pub struct HostServices {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for HostServices {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A running `veil-kbs`; killed by PID when dropped.
pub struct Broker {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Its audit log (JSON lines).
    pub audit: PathBuf,
    child: ManagedChild,
}

impl Broker {
    /// The broker's PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// The audit lines so far.
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The raw audit log.
    pub fn audit_text(&self) -> String {
        std::fs::read_to_string(&self.audit).unwrap_or_default()
    }
}
