//! Container statistics for containerd: the guest cgroup v2 figures the agent
//! reports, as containerd's cgroup v1 `Metrics` message (what `ctr task
//! metrics` and the CRI stats decode for Linux tasks).

use containerd_shim_protos::{
    cgroups::metrics::{CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat},
    protobuf::{Message, MessageField},
};
use veil_protocol::agent::ContainerStats;

/// The `Any` type URL of [`cgroup_v1`]'s message.
pub const TYPE_URL: &str = "io.containerd.cgroups.v1.Metrics";

/// Encodes `s` as containerd's cgroup v1 `Metrics`.
pub fn cgroup_v1(s: &ContainerStats) -> Result<Vec<u8>, protobuf::Error> {
    let mut m = Metrics::new();
    if let Some(cpu) = s.cpu.as_ref() {
        m.cpu = MessageField::some(CPUStat {
            usage: MessageField::some(CPUUsage {
                total: cpu.usage_usec.saturating_mul(1000),
                user: cpu.user_usec.saturating_mul(1000),
                kernel: cpu.system_usec.saturating_mul(1000),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if let Some(mem) = s.memory.as_ref() {
        m.memory = MessageField::some(MemoryStat {
            usage: MessageField::some(MemoryEntry {
                usage: mem.usage,
                limit: if mem.limit == 0 { u64::MAX } else { mem.limit },
                max: mem.max_usage,
                failcnt: mem.max_events,
                ..Default::default()
            }),
            rss: mem.stat.get("anon").copied().unwrap_or(0),
            cache: mem.stat.get("file").copied().unwrap_or(0),
            ..Default::default()
        });
    }
    if let Some(pids) = s.pids.as_ref() {
        m.pids = MessageField::some(PidsStat {
            current: pids.current,
            limit: pids.limit,
            ..Default::default()
        });
    }
    m.write_to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_stats_become_v1_metrics() {
        let mut s = ContainerStats::new();
        let mut mem = veil_protocol::agent::MemoryStats::new();
        mem.usage = 4096;
        mem.stat.insert("anon".into(), 1024);
        s.memory = MessageField::some(mem);
        let mut cpu = veil_protocol::agent::CpuStats::new();
        cpu.usage_usec = 3;
        s.cpu = MessageField::some(cpu);
        let m = Metrics::parse_from_bytes(&cgroup_v1(&s).unwrap()).unwrap();
        assert_eq!(m.memory.usage.usage, 4096);
        assert_eq!(m.memory.usage.limit, u64::MAX, "no limit");
        assert_eq!(m.memory.rss, 1024);
        assert_eq!(m.cpu.usage.total, 3000, "nanoseconds");
    }
}
