//! cgroup v2 for containers: one cgroup per container under the agent's
//! parent cgroup. Resources, freezer, kill, PIDs, statistics and OOM counts.
//!
//! The cgroup root is a path, so tests use any cgroup2 mount (or a temp dir
//! for the pure file-format parts). A resource whose controller is missing is
//! an error, never silently ignored.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use oci_spec::runtime::LinuxResources;
use veil_protocol::agent::{ContainerStats, CpuStats, IoDeviceStats, MemoryStats, PidsStats};

use crate::status::{Classify, Kind};

/// Errors of cgroup operations.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A file could not be read or written.
    #[error("cgroup file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A resource whose controller this kernel or hierarchy does not offer.
    #[error("cgroup controller '{0}' is not available here")]
    NoController(&'static str),
    /// A resource value the kernel cannot take.
    #[error("invalid resource: {0}")]
    Invalid(String),
    /// No cgroup2 hierarchy is mounted.
    #[error("no cgroup2 hierarchy is mounted")]
    NoHierarchy,
    /// Freezing did not complete in time.
    #[error("the cgroup did not reach the {0} state in time")]
    Timeout(&'static str),
}

impl Classify for CgroupError {
    fn kind(&self) -> Kind {
        match self {
            CgroupError::Invalid(_) => Kind::InvalidArgument,
            CgroupError::NoController(_) => Kind::FailedPrecondition,
            CgroupError::Io { .. } | CgroupError::NoHierarchy | CgroupError::Timeout(_) => {
                Kind::Internal
            }
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Finds the cgroup2 mount point from `/proc/self/mountinfo`.
pub fn find_cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err(Path::new("/proc/self/mountinfo")))?;
    for line in info.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        if post.split_whitespace().next() == Some("cgroup2") {
            if let Some(mp) = pre.split_whitespace().nth(4) {
                return Ok(PathBuf::from(mp));
            }
        }
    }
    Err(CgroupError::NoHierarchy)
}

/// The parent cgroup under which container cgroups are made.
#[derive(Debug, Clone)]
pub struct CgroupParent {
    path: PathBuf,
}

impl CgroupParent {
    /// Creates (if needed) `parent` and enables every controller its own parent
    /// delegates to it, for its children.
    pub fn create(path: PathBuf) -> Result<Self, CgroupError> {
        fs::create_dir_all(&path).map_err(io_err(&path))?;
        if let Some(up) = path.parent() {
            delegate(up);
        }
        delegate(&path);
        Ok(CgroupParent { path })
    }

    /// The parent's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the cgroup of one container (the name is a validated id).
    pub fn child(&self, name: &str) -> Result<Cgroup, CgroupError> {
        let path = self.path.join(name);
        fs::create_dir_all(&path).map_err(io_err(&path))?;
        Ok(Cgroup { path })
    }

    /// Removes the parent if empty (best effort).
    pub fn remove(&self) {
        let _ = fs::remove_dir(&self.path);
    }
}

/// The CPU weight of the agent's own cgroup (the maximum): against the
/// containers' parent at the default 100, the agent gets the CPU whenever it
/// wants it, however busy the pod is.
pub const AGENT_CPU_WEIGHT: u32 = 10_000;

/// What [`protect_agent`] set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentShare {
    /// The agent's cgroup.
    pub cgroup: PathBuf,
    /// The most tasks the containers may have together, if limited.
    pub container_tasks: Option<u64>,
}

/// The most tasks (processes and threads) the containers may have together,
/// out of the `max` the kernel allows in all: the rest is kept for the agent
/// (its threads, the helpers that start processes), so that a fork bomb in a
/// pod without a PIDs limit cannot leave the agent unable to answer.
pub fn container_task_limit(max: u64) -> u64 {
    max.saturating_sub((max / 8).max(256))
}

/// Puts the agent (this process) into a cgroup of its own under `root`,
/// `agent`, with [`AGENT_CPU_WEIGHT`], and limits the containers' `parent`
/// to [`container_task_limit`] of the kernel's task limit. Only in a VM,
/// where the agent is PID 1 and the cgroup tree is its own.
pub fn protect_agent(root: &Path, parent: &Path) -> Result<AgentShare, CgroupError> {
    let cgroup = root.join("agent");
    fs::create_dir_all(&cgroup).map_err(io_err(&cgroup))?;
    let enabled = fs::read_to_string(root.join("cgroup.subtree_control")).unwrap_or_default();
    let has = |c: &str| enabled.split_whitespace().any(|e| e == c);
    if has("cpu") {
        let w = cgroup.join("cpu.weight");
        fs::write(&w, AGENT_CPU_WEIGHT.to_string()).map_err(io_err(&w))?;
    }
    let procs = cgroup.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string()).map_err(io_err(&procs))?;
    let mut container_tasks = None;
    if has("pids") {
        let read = |p: &str| -> Option<u64> { fs::read_to_string(p).ok()?.trim().parse().ok() };
        let max = [
            read("/proc/sys/kernel/threads-max"),
            read("/proc/sys/kernel/pid_max"),
        ]
        .into_iter()
        .flatten()
        .min();
        if let Some(max) = max {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
            let limit = container_task_limit(max);
            let f = parent.join("pids.max");
            fs::write(&f, limit.to_string()).map_err(io_err(&f))?;
            container_tasks = Some(limit);
        }
    }
    Ok(AgentShare {
        cgroup,
        container_tasks,
    })
}

/// Enables for `dir`'s children every controller `dir` has (best effort).
fn delegate(dir: &Path) {
    let Ok(avail) = fs::read_to_string(dir.join("cgroup.controllers")) else {
        return;
    };
    for c in avail.split_whitespace() {
        let _ = fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"));
    }
}

/// One container's cgroup.
#[derive(Debug, Clone)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// A cgroup at an existing path.
    pub fn at(path: PathBuf) -> Self {
        Cgroup { path }
    }

    /// Its directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&self, file: &str, value: &str, controller: &'static str) -> Result<(), CgroupError> {
        let p = self.path.join(file);
        if !p.exists() {
            return Err(CgroupError::NoController(controller));
        }
        fs::write(&p, value).map_err(|e| {
            if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::ERANGE) {
                CgroupError::Invalid(format!("{file} = {value}"))
            } else {
                CgroupError::Io {
                    path: p.clone(),
                    source: e,
                }
            }
        })
    }

    fn read(&self, file: &str) -> Option<String> {
        fs::read_to_string(self.path.join(file)).ok()
    }

    /// Applies OCI resources (cgroup v2 semantics, as runc maps them).
    pub fn apply(&self, r: &LinuxResources) -> Result<(), CgroupError> {
        if let Some(m) = r.memory() {
            if let Some(l) = m.limit() {
                self.write("memory.max", &limit(l), "memory")?;
            }
            if let Some(l) = m.reservation() {
                self.write("memory.low", &limit(l), "memory")?;
            }
            if let Some(s) = m.swap() {
                // OCI swap is memory+swap; v2 counts swap alone.
                let v = match (s, m.limit()) {
                    (s, _) if s < 0 => "max".to_string(),
                    (s, Some(l)) if l > 0 => s.saturating_sub(l).max(0).to_string(),
                    (s, _) => s.to_string(),
                };
                if self.path.join("memory.swap.max").exists() {
                    self.write("memory.swap.max", &v, "memory")?;
                }
            }
        }
        if let Some(c) = r.cpu() {
            if let Some(shares) = c.shares() {
                if shares > 0 {
                    let weight = 1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142;
                    self.write("cpu.weight", &weight.to_string(), "cpu")?;
                }
            }
            if c.quota().is_some() || c.period().is_some() {
                let quota = match c.quota() {
                    Some(q) if q > 0 => q.to_string(),
                    _ => "max".to_string(),
                };
                let period = c.period().unwrap_or(100_000);
                self.write("cpu.max", &format!("{quota} {period}"), "cpu")?;
            }
            if let Some(cpus) = c.cpus().as_deref().filter(|s| !s.is_empty()) {
                self.write("cpuset.cpus", cpus, "cpuset")?;
            }
            if let Some(mems) = c.mems().as_deref().filter(|s| !s.is_empty()) {
                self.write("cpuset.mems", mems, "cpuset")?;
            }
        }
        if let Some(p) = r.pids() {
            self.write("pids.max", &limit(p.limit()), "pids")?;
        }
        if let Some(b) = r.block_io() {
            if let Some(w) = b.weight() {
                self.write(
                    "io.weight",
                    &format!("default {}", bfq_to_io_weight(w)),
                    "io",
                )?;
            }
            let throttles = [
                (b.throttle_read_bps_device(), "rbps"),
                (b.throttle_write_bps_device(), "wbps"),
                (b.throttle_read_iops_device(), "riops"),
                (b.throttle_write_iops_device(), "wiops"),
            ];
            for (list, key) in throttles {
                for d in list.iter().flatten() {
                    let v = format!("{}:{} {key}={}", d.major(), d.minor(), d.rate());
                    self.write("io.max", &v, "io")?;
                }
            }
        }
        for (k, v) in r.unified().iter().flatten() {
            let ok = k.contains('.')
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                && !k.starts_with("cgroup.");
            if !ok || v.contains('\0') {
                return Err(CgroupError::Invalid(format!("unified key {k}")));
            }
            let controller = k.split('.').next().unwrap_or_default();
            self.write(
                k,
                v,
                if controller == "memory" {
                    "memory"
                } else {
                    "unified"
                },
            )?;
        }
        Ok(())
    }

    /// Freezes (true) or thaws (false) every process, waiting until done.
    pub async fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        self.write("cgroup.freeze", if frozen { "1" } else { "0" }, "freezer")?;
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        for _ in 0..200 {
            if self
                .read("cgroup.events")
                .is_some_and(|e| e.lines().any(|l| l == want))
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(CgroupError::Timeout(if frozen {
            "frozen"
        } else {
            "thawed"
        }))
    }

    /// True while frozen.
    pub fn is_frozen(&self) -> bool {
        self.read("cgroup.freeze").is_some_and(|v| v.trim() == "1")
    }

    /// PIDs of every process in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        self.read("cgroup.procs")
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Sends `signal` to every process (SIGKILL uses `cgroup.kill`).
    pub fn signal_all(&self, signal: i32) -> Result<(), CgroupError> {
        if signal == libc::SIGKILL && self.path.join("cgroup.kill").exists() {
            return self.write("cgroup.kill", "1", "kill");
        }
        for pid in self.pids() {
            // SAFETY: kill(2) with integer arguments.
            unsafe { libc::kill(pid as i32, signal) };
        }
        Ok(())
    }

    /// OOM kills so far (`memory.events` `oom_kill`); 0 without the controller.
    pub fn oom_kills(&self) -> u64 {
        self.read("memory.events")
            .map(|s| kv(&s).get("oom_kill").copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Statistics from the cgroup's files; missing files give zeros.
    pub fn stats(&self) -> ContainerStats {
        let mut st = ContainerStats::new();
        let mut cpu = CpuStats::new();
        if let Some(s) = self.read("cpu.stat") {
            let m = kv(&s);
            let g = |k: &str| m.get(k).copied().unwrap_or(0);
            cpu.usage_usec = g("usage_usec");
            cpu.user_usec = g("user_usec");
            cpu.system_usec = g("system_usec");
            cpu.nr_periods = g("nr_periods");
            cpu.nr_throttled = g("nr_throttled");
            cpu.throttled_usec = g("throttled_usec");
        }
        st.cpu = Some(cpu).into();
        let mut mem = MemoryStats::new();
        let num = |f: &str| {
            self.read(f)
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        mem.usage = num("memory.current");
        mem.limit = num("memory.max");
        mem.max_usage = num("memory.peak");
        mem.swap_usage = num("memory.swap.current");
        if let Some(s) = self.read("memory.events") {
            let m = kv(&s);
            mem.max_events = m.get("max").copied().unwrap_or(0);
            mem.oom_kills = m.get("oom_kill").copied().unwrap_or(0);
        }
        if let Some(s) = self.read("memory.stat") {
            mem.stat = kv(&s)
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
        }
        st.memory = Some(mem).into();
        let mut pids = PidsStats::new();
        pids.current = num("pids.current");
        pids.limit = num("pids.max");
        st.pids = Some(pids).into();
        if let Some(s) = self.read("io.stat") {
            st.io = parse_io_stat(&s);
        }
        st
    }

    /// Removes the cgroup, killing what is left and waiting for it to empty.
    pub async fn remove(&self) -> Result<(), CgroupError> {
        if !self.path.exists() {
            return Ok(());
        }
        if self.is_frozen() {
            let _ = self.write("cgroup.freeze", "0", "freezer");
        }
        let mut last = None;
        for _ in 0..300 {
            if !self.pids().is_empty() {
                let _ = self.signal_all(libc::SIGKILL);
            }
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(CgroupError::Io {
            path: self.path.clone(),
            source: last.unwrap_or_else(|| std::io::Error::other("cgroup not empty")),
        })
    }
}

fn limit(v: i64) -> String {
    if v < 0 {
        "max".into()
    } else {
        v.to_string()
    }
}

/// blkio weight (10..1000) to io.weight (1..10000), as runc converts it.
fn bfq_to_io_weight(w: u16) -> u64 {
    let w = u64::from(w.clamp(10, 1000));
    1 + (w - 10) * 9999 / 990
}

fn kv(s: &str) -> HashMap<&str, u64> {
    s.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k, v.trim().parse().ok()?))
        })
        .collect()
}

fn parse_io_stat(s: &str) -> Vec<IoDeviceStats> {
    let mut out = Vec::new();
    for line in s.lines() {
        let mut words = line.split_whitespace();
        let Some((maj, min)) = words.next().and_then(|d| d.split_once(':')) else {
            continue;
        };
        let mut d = IoDeviceStats::new();
        d.major = maj.parse().unwrap_or(0);
        d.minor = min.parse().unwrap_or(0);
        for w in words {
            let Some((k, v)) = w.split_once('=') else {
                continue;
            };
            let v = v.parse().unwrap_or(0);
            match k {
                "rbytes" => d.rbytes = v,
                "wbytes" => d.wbytes = v,
                "rios" => d.rios = v,
                "wios" => d.wios = v,
                _ => {}
            }
        }
        out.push(d);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_agent_keeps_an_eighth_of_the_task_limit_and_at_least_256() {
        assert_eq!(container_task_limit(2048), 1792);
        assert_eq!(container_task_limit(32768), 28672);
        assert_eq!(container_task_limit(1000), 744);
        assert_eq!(container_task_limit(100), 0);
    }

    use super::*;

    #[test]
    fn applies_resources_as_cgroup_v2_files() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "memory.max",
            "memory.swap.max",
            "cpu.weight",
            "cpu.max",
            "pids.max",
            "io.weight",
        ] {
            fs::write(d.path().join(f), "").unwrap();
        }
        let cg = Cgroup::at(d.path().to_path_buf());
        let r: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":67108864,"swap":134217728},"cpu":{"shares":1024,"quota":50000,"period":100000},
                "pids":{"limit":-1},"blockIO":{"weight":500}}"#,
        )
        .unwrap();
        cg.apply(&r).unwrap();
        let rd = |f: &str| fs::read_to_string(d.path().join(f)).unwrap();
        assert_eq!(rd("memory.max"), "67108864");
        assert_eq!(rd("memory.swap.max"), "67108864");
        assert_eq!(rd("cpu.weight"), "39");
        assert_eq!(rd("cpu.max"), "50000 100000");
        assert_eq!(rd("pids.max"), "max");
        assert_eq!(rd("io.weight"), "default 4950");
    }

    #[test]
    fn a_missing_controller_is_an_error_not_ignored() {
        let d = tempfile::tempdir().unwrap();
        let cg = Cgroup::at(d.path().to_path_buf());
        let r: LinuxResources = serde_json::from_str(r#"{"memory":{"limit":1048576}}"#).unwrap();
        let e = cg.apply(&r).unwrap_err();
        assert!(matches!(e, CgroupError::NoController("memory")));
        assert_eq!(e.kind(), Kind::FailedPrecondition);
    }

    #[test]
    fn parses_stat_files() {
        let d = tempfile::tempdir().unwrap();
        fs::write(
            d.path().join("cpu.stat"),
            "usage_usec 10\nuser_usec 7\nsystem_usec 3\n",
        )
        .unwrap();
        fs::write(d.path().join("memory.current"), "4096\n").unwrap();
        fs::write(d.path().join("memory.max"), "max\n").unwrap();
        fs::write(
            d.path().join("memory.events"),
            "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n",
        )
        .unwrap();
        fs::write(
            d.path().join("io.stat"),
            "254:0 rbytes=512 wbytes=1024 rios=1 wios=2 dbytes=0 dios=0\n",
        )
        .unwrap();
        let cg = Cgroup::at(d.path().to_path_buf());
        let s = cg.stats();
        assert_eq!(s.cpu.usage_usec, 10);
        assert_eq!(s.memory.usage, 4096);
        assert_eq!(s.memory.limit, 0);
        assert_eq!(s.memory.oom_kills, 1);
        assert_eq!(s.io[0].major, 254);
        assert_eq!(s.io[0].wbytes, 1024);
        assert_eq!(cg.oom_kills(), 1);
    }
}
