//! The node's Prometheus / OpenMetrics endpoint (`veil-node run`,
//! `veil-node metrics`): pods per handler, pod start phases, attestation
//! outcomes, each pod's guest size and VMM CPU time, and the host memory of
//! every pod's shim, VMM and vsock backend.
//!
//! Shims are never blocked on this service: each writes small files (see
//! `veil_shim::report`) that are read here when Prometheus scrapes — the
//! running pods' `pod.json` every time, the one-off events (a start, an
//! attestation) once, after which they are removed and counted.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{atomic::AtomicU64, Mutex},
    time::Duration,
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use veil_shim::report::{METRICS_DIR, POD_FILE};

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Largest report file read, bytes.
const MAX_REPORT: u64 = 64 * 1024;
/// Most event files taken per scrape (the rest wait for the next).
const MAX_EVENTS: usize = 4096;
/// The start phases in order (as the shim marks them).
const PHASES: &[&str] = veil_shim::phases::MARKS;
/// The teardown marks in order.
const TEARDOWN: &[&str] = veil_shim::phases::TEARDOWN_MARKS;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Observes each step between consecutive `order` marks present in
/// `phases` (unix ns), and `total` from `span.0` to `span.1`.
fn observe(
    family: &Family<Labels, Histogram, fn() -> Histogram>,
    order: &[&str],
    span: (&str, &str),
    handler: &str,
    phases: &serde_json::Value,
) {
    let marks: Vec<(&str, u64)> = order
        .iter()
        .filter_map(|p| phases[*p].as_u64().map(|t| (*p, t)))
        .collect();
    for w in marks.windows(2) {
        let secs = w[1].1.saturating_sub(w[0].1) as f64 / 1e9;
        family
            .get_or_create(&labels(&[("handler", handler), ("phase", w[1].0)]))
            .observe(secs);
    }
    let at = |p: &str| marks.iter().find(|(n, _)| *n == p).map(|(_, t)| *t);
    if let (Some(a), Some(b)) = (at(span.0), at(span.1)) {
        family
            .get_or_create(&labels(&[("handler", handler), ("phase", "total")]))
            .observe(b.saturating_sub(a) as f64 / 1e9);
    }
}

fn start_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 16))
}

/// The node's metrics, kept between scrapes.
pub struct Metrics {
    state_dir: PathBuf,
    registry: Registry,
    pods: Family<Labels, Gauge>,
    guest_memory: Family<Labels, Gauge>,
    vmm_cpu: Family<Labels, FloatGauge>,
    rss: Family<Labels, Gauge>,
    phases: Family<Labels, Histogram, fn() -> Histogram>,
    teardown: Family<Labels, Histogram, fn() -> Histogram>,
    attestations: Family<Labels, Counter>,
    bad_reports: Counter,
}

impl Metrics {
    /// Metrics over the pods under `state_dir` (the shims' state dir);
    /// creates `<state_dir>/metrics`, which tells the shims to report.
    pub fn new(state_dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(state_dir.join(METRICS_DIR))?;
        let mut registry = Registry::with_prefix("veil");
        let pods = Family::<Labels, Gauge>::default();
        registry.register("pods", "Running veil pods per handler", pods.clone());
        let guest_memory = Family::<Labels, Gauge>::default();
        registry.register(
            "pod_guest_memory_bytes",
            "Guest RAM of each running pod",
            guest_memory.clone(),
        );
        let vmm_cpu = Family::<Labels, FloatGauge>::default();
        registry.register(
            "pod_vmm_cpu_seconds",
            "CPU time of each running pod's VMM (its guest's vCPUs and device emulation)",
            vmm_cpu.clone(),
        );
        let rss = Family::<Labels, Gauge>::default();
        registry.register(
            "pod_host_rss_bytes",
            "Resident memory on the host of each pod's shim, VMM and vsock backend",
            rss.clone(),
        );
        let phases: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(start_histogram);
        registry.register(
            "pod_start_phase_seconds",
            "Time of each pod start phase since the one before it; phase total: task create to container started",
            phases.clone(),
        );
        let teardown: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(start_histogram);
        registry.register(
            "pod_teardown_phase_seconds",
            "Time of each pod teardown step since the one before it; phase total: the pod's exit to its state removed",
            teardown.clone(),
        );
        let attestations = Family::<Labels, Counter>::default();
        registry.register(
            "attestations",
            "Pod attestations by handler, outcome and reason",
            attestations.clone(),
        );
        let bad_reports = Counter::default();
        registry.register(
            "node_bad_reports",
            "Report files from shims that could not be read",
            bad_reports.clone(),
        );
        Ok(Metrics {
            state_dir: state_dir.to_path_buf(),
            registry,
            pods,
            guest_memory,
            vmm_cpu,
            rss,
            phases,
            teardown,
            attestations,
            bad_reports,
        })
    }

    fn read_json(&self, path: &Path) -> Option<serde_json::Value> {
        let f = std::fs::File::open(path).ok()?;
        let mut text = String::new();
        if f.take(MAX_REPORT).read_to_string(&mut text).is_err() {
            self.bad_reports.inc();
            return None;
        }
        match serde_json::from_str(&text) {
            Ok(v) => Some(v),
            Err(_) => {
                self.bad_reports.inc();
                None
            }
        }
    }

    fn take_events(&self) {
        let Ok(dir) = std::fs::read_dir(self.state_dir.join(METRICS_DIR)) else {
            return;
        };
        for entry in dir.flatten().take(MAX_EVENTS) {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                continue;
            }
            let v = self.read_json(&path);
            let _ = std::fs::remove_file(&path);
            let Some(v) = v else { continue };
            let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
            if name.ends_with(".attest.json") {
                self.attestations
                    .get_or_create(&labels(&[
                        ("handler", &s("handler")),
                        ("outcome", &s("outcome")),
                        ("reason", &reason_class(&s("reason"))),
                    ]))
                    .inc();
            } else if name.ends_with(".start.json") {
                self.observe_start(&s("handler"), &v["phases"]);
            } else if name.ends_with(".teardown.json") {
                observe(
                    &self.teardown,
                    TEARDOWN,
                    ("exited", "state_removed"),
                    &s("handler"),
                    &v["phases"],
                );
            } else {
                self.bad_reports.inc();
            }
        }
    }

    fn observe_start(&self, handler: &str, phases: &serde_json::Value) {
        observe(
            &self.phases,
            PHASES,
            ("create", "container_started"),
            handler,
            phases,
        );
    }

    fn running(&self) {
        self.pods.clear();
        self.guest_memory.clear();
        self.vmm_cpu.clear();
        self.rss.clear();
        let Ok(dir) = std::fs::read_dir(&self.state_dir) else {
            return;
        };
        for entry in dir.flatten() {
            let file = entry.path().join(POD_FILE);
            if !file.is_file() {
                continue;
            }
            let Some(v) = self.read_json(&file) else {
                continue;
            };
            let pod = v["pod"].as_str().unwrap_or("").to_string();
            let handler = v["handler"].as_str().unwrap_or("").to_string();
            let pid = |k: &str| v[k].as_u64().and_then(|p| u32::try_from(p).ok());
            // A pod whose shim is gone is not running (its directory waits
            // for cleanup).
            let Some(shim) = pid("shim_pid").filter(|p| alive(*p)) else {
                continue;
            };
            self.pods
                .get_or_create(&labels(&[("handler", &handler)]))
                .inc();
            let mib = v["memory_mib"].as_i64().unwrap_or(0);
            self.guest_memory
                .get_or_create(&labels(&[("pod", &pod), ("handler", &handler)]))
                .set(mib * 1024 * 1024);
            for (component, p) in [
                ("shim", Some(shim)),
                ("vmm", pid("vmm_pid")),
                ("vsock_backend", pid("backend_pid")),
            ] {
                let Some(p) = p else { continue };
                if let Some(bytes) = rss_bytes(p) {
                    self.rss
                        .get_or_create(&labels(&[("pod", &pod), ("component", component)]))
                        .set(bytes);
                }
                if component == "vmm" {
                    if let Some(cpu) = cpu_seconds(p) {
                        self.vmm_cpu
                            .get_or_create(&labels(&[("pod", &pod), ("handler", &handler)]))
                            .set(cpu);
                    }
                }
            }
        }
    }

    /// Reads what the shims reported and renders the metrics (OpenMetrics
    /// text).
    pub fn render(&self) -> String {
        self.take_events();
        self.running();
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// A bounded label for a reason: its first 120 characters up to the first
/// colon-separated detail, so each distinct refusal does not become its own
/// series.
fn reason_class(reason: &str) -> String {
    if reason.is_empty() {
        return String::new();
    }
    let r = reason
        .split(": ")
        .find(|p| p.contains("refused") || p.contains("denied") || p.contains("mismatch"))
        .unwrap_or(reason);
    r.chars().take(120).collect()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn rss_bytes(pid: u32) -> Option<i64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: i64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after ") ".
    let rest = &stat[stat.rfind(") ")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions and only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| (utime + stime) / hz as f64)
}

fn answer(mut s: TcpStream, metrics: &Mutex<Metrics>) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, ctype, body) =
        if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
            let m = metrics.lock().unwrap_or_else(|p| p.into_inner());
            (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                m.render(),
            )
        } else if method == "GET" {
            (
                "404 Not Found",
                "text/plain",
                "only /metrics is served\n".to_string(),
            )
        } else {
            (
                "405 Method Not Allowed",
                "text/plain",
                "only GET is served\n".to_string(),
            )
        };
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Serves the metrics of the pods under `state_dir` on `listener`, one
/// connection at a time, until the process ends.
pub fn serve(listener: TcpListener, state_dir: &Path) -> std::io::Result<()> {
    let metrics = Mutex::new(Metrics::new(state_dir)?);
    for conn in listener.incoming() {
        match conn {
            Ok(s) => answer(s, &metrics),
            Err(e) => eprintln!("veil-node metrics: accept: {e}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn events_are_counted_once_and_running_pods_read_each_scrape() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new(dir.path()).unwrap();
        let ev = dir.path().join(METRICS_DIR);
        std::fs::write(
            ev.join("p1.attest.json"),
            r#"{"pod":"p1","handler":"veil-sim","outcome":"refused","reason":"agent Attest failed: the key broker refused disk-key (HTTP 401): host data mismatch: x"}"#,
        )
        .unwrap();
        std::fs::write(
            ev.join("p1.start.json"),
            r#"{"pod":"p1","handler":"veil-sim","phases":{"create":1000000000,"vmm_spawned":1100000000,"container_started":3000000000}}"#,
        )
        .unwrap();
        std::fs::write(
            ev.join("p0.teardown.json"),
            r#"{"pod":"p0","handler":"veil","phases":{"exited":1000000000,"deleted":1200000000,"vm_stopped":1500000000,"state_removed":1600000000}}"#,
        )
        .unwrap();
        std::fs::write(ev.join("junk.attest.json"), "{").unwrap();
        let pod = dir.path().join("p1");
        std::fs::create_dir(&pod).unwrap();
        std::fs::write(
            pod.join(POD_FILE),
            format!(
                r#"{{"pod":"p1","handler":"veil-sim","memory_mib":256,"vcpus":1,"shim_pid":{},"vmm_pid":{},"backend_pid":null}}"#,
                std::process::id(),
                std::process::id()
            ),
        )
        .unwrap();
        let text = m.render();
        assert!(
            text.contains(r#"veil_pods{handler="veil-sim"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"veil_pod_guest_memory_bytes{pod="p1",handler="veil-sim"} 268435456"#),
            "{text}"
        );
        assert!(
            text.contains(r#"veil_pod_host_rss_bytes{pod="p1",component="shim"}"#),
            "{text}"
        );
        assert!(
            text.contains(r#"veil_attestations_total{handler="veil-sim",outcome="refused",reason="the key broker refused disk-key (HTTP 401)"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"veil_pod_start_phase_seconds_count{handler="veil-sim",phase="total"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"veil_pod_teardown_phase_seconds_sum{handler="veil",phase="total"} 0.6"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"veil_pod_teardown_phase_seconds_count{handler="veil",phase="vm_stopped"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("veil_node_bad_reports_total 1"), "{text}");
        assert_eq!(std::fs::read_dir(&ev).unwrap().count(), 0);
        // The pod goes: the gauges go; the counters stay.
        std::fs::remove_dir_all(&pod).unwrap();
        let text = m.render();
        assert!(!text.contains("veil_pods{"), "{text}");
        assert!(text.contains(r#"outcome="refused""#), "{text}");
    }
}
