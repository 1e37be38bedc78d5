//! What each running instance uses: CPU time, memory, open files, processes. Read when asked
//! (a scrape of `/metrics`, `GET /v1/instances`), from the instance's cgroup (v2) where it has
//! one — every process it started counted, daemons included — else from `/proc` for its main
//! process. Nothing is sampled in the background, so an instance that is gone has no series.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use serde::{Deserialize, Serialize};

use crate::process::Cgroups;
use crate::status::{InstanceState, InstanceStatus, StatusBoard};

/// An instance's use of the machine, now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    /// CPU time used since it started (user + system), in seconds.
    pub cpu_seconds: f64,
    /// Memory in use, in bytes: the cgroup's `memory.current` where the memory controller is
    /// on, else the resident set of its processes.
    pub memory_bytes: u64,
    /// Open file descriptors (sockets included) of its processes.
    pub open_fds: u64,
    /// Its processes.
    pub processes: u64,
    pub source: UsageSource,
}

/// Where the figures come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// The instance's cgroup: all its processes.
    Cgroup,
    /// `/proc` for its main process only (no cgroup here).
    Proc,
}

/// Read an instance's usage: from `cgroup` when given, else from its main process `pid`.
pub fn read(cgroup: Option<&Path>, pid: u32) -> Option<Usage> {
    if let Some(dir) = cgroup {
        if let Some(u) = from_cgroup(dir) {
            return Some(u);
        }
    }
    let p = proc_usage(pid)?;
    Some(Usage {
        cpu_seconds: p.cpu_seconds,
        memory_bytes: p.rss_bytes,
        open_fds: p.fds,
        processes: 1,
        source: UsageSource::Proc,
    })
}

fn from_cgroup(dir: &Path) -> Option<Usage> {
    let pids: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .ok()?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let procs: Vec<ProcUsage> = pids.iter().filter_map(|&p| proc_usage(p)).collect();
    // `cpu.stat` is part of every v2 cgroup; `memory.current` only with the memory controller.
    let cpu = std::fs::read_to_string(dir.join("cpu.stat"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .map(|us| us as f64 / 1e6);
    let memory = std::fs::read_to_string(dir.join("memory.current"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    Some(Usage {
        cpu_seconds: cpu.unwrap_or_else(|| procs.iter().map(|p| p.cpu_seconds).sum()),
        memory_bytes: memory.unwrap_or_else(|| procs.iter().map(|p| p.rss_bytes).sum()),
        open_fds: procs.iter().map(|p| p.fds).sum(),
        processes: pids.len() as u64,
        source: UsageSource::Cgroup,
    })
}

struct ProcUsage {
    cpu_seconds: f64,
    rss_bytes: u64,
    fds: u64,
}

fn proc_usage(pid: u32) -> Option<ProcUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command (which may hold spaces and parentheses).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // state is field 3 of the whole line: index 0 here; utime 14 and stime 15 (11 and 12);
    // rss 24 (21), in pages.
    let ticks = clock_ticks();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let rss_pages: u64 = f.get(21)?.parse().ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    Some(ProcUsage {
        cpu_seconds: (utime + stime) as f64 / ticks,
        rss_bytes: rss_pages * page_size(),
        fds,
    })
}

fn clock_ticks() -> f64 {
    rustix::param::clock_ticks_per_second() as f64
}

fn page_size() -> u64 {
    rustix::param::page_size() as u64
}

/// The usage of an instance as the board has it: only in states with a live process (an
/// exited one's pid may be another process's by now).
pub(crate) fn of(s: &InstanceStatus, cgroups: Option<&Cgroups>) -> Option<Usage> {
    let live = matches!(
        s.state,
        InstanceState::Starting
            | InstanceState::Healthy
            | InstanceState::Unhealthy
            | InstanceState::Draining
            | InstanceState::Stopping
    );
    let pid = s.pid.filter(|_| live)?;
    let dir = cgroups.map(|c| c.base().join(&s.id)).filter(|d| d.exists());
    read(dir.as_deref(), pid)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    service: String,
    version: String,
    instance: String,
}

/// The per-instance families, read at each scrape.
pub(crate) struct UsageCollector {
    pub board: Arc<StatusBoard>,
    pub cgroups: Option<Cgroups>,
}

impl std::fmt::Debug for UsageCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UsageCollector")
    }
}

struct Value<T>(T, MetricType);

impl EncodeMetric for Value<f64> {
    fn encode(
        &self,
        mut e: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        match self.1 {
            MetricType::Counter => {
                e.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&self.0, None)
            }
            _ => e.encode_gauge(&self.0),
        }
    }
    fn metric_type(&self) -> MetricType {
        self.1
    }
}

impl Collector for UsageCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut rows: BTreeMap<String, (InstanceLabels, Option<Usage>, u32)> = BTreeMap::new();
        for s in self.board.list() {
            let usage = of(&s, self.cgroups.as_ref());
            let labels = InstanceLabels {
                service: s.service.clone(),
                version: s.version.clone(),
                instance: s.id.clone(),
            };
            rows.insert(s.id.clone(), (labels, usage, s.restarts));
        }
        type Pick = fn(&Usage) -> f64;
        let families: [(&str, &str, MetricType, Pick); 4] = [
            (
                "instance_cpu_seconds",
                "CPU time used by an instance's processes since it started (user and system)",
                MetricType::Counter,
                |u| u.cpu_seconds,
            ),
            (
                "instance_memory_bytes",
                "Memory an instance uses (its cgroup's, else its main process's resident set)",
                MetricType::Gauge,
                |u| u.memory_bytes as f64,
            ),
            (
                "instance_open_fds",
                "Open file descriptors of an instance's processes",
                MetricType::Gauge,
                |u| u.open_fds as f64,
            ),
            (
                "instance_processes",
                "Processes an instance runs",
                MetricType::Gauge,
                |u| u.processes as f64,
            ),
        ];
        for (name, help, kind, pick) in families {
            let mut m = encoder.encode_descriptor(name, help, None, kind)?;
            for (labels, usage, _) in rows.values() {
                if let Some(u) = usage {
                    Value(pick(u), kind).encode(m.encode_family(labels)?)?;
                }
            }
        }
        let mut m = encoder.encode_descriptor(
            "instance_restarts",
            "Restarts of an instance since gantry started",
            None,
            MetricType::Counter,
        )?;
        for (labels, _, restarts) in rows.values() {
            Value(f64::from(*restarts), MetricType::Counter).encode(m.encode_family(labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_a_live_process() {
        // Burn a little CPU so that the figure is above zero.
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        let u = read(None, std::process::id()).unwrap();
        assert_eq!((u.source, u.processes), (UsageSource::Proc, 1));
        assert!(u.cpu_seconds > 0.0, "{u:?}");
        assert!(u.memory_bytes > 1 << 20, "{u:?}");
        assert!(u.open_fds >= 3, "{u:?}");
        assert!(read(None, u32::MAX).is_none());
    }
}
