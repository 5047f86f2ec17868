//! Prometheus metrics (`GET /metrics`): how many sandboxes are in each state, and each live sandbox's metered usage
//! (CPU seconds, memory now, peak and average, disk, network, processes), in the text exposition format.
//!
//! Figures come from [`nook_runner::Runner::meters`], which reads cgroup counters when scraped but takes disk use
//! from the runner's background measurement, so a scrape costs a few file reads per sandbox however many files they
//! hold.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use nook_api::{Sandbox, SandboxState, SandboxStats};

/// One metric family: its name, type, help line, and how to read it from a sandbox's figures.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&SandboxStats) -> f64,
}

const FAMILIES: &[Family] = &[
    Family {
        name: "nook_sandbox_cpu_seconds_total",
        kind: "counter",
        help: "CPU time used by the sandbox's processes during its current run.",
        value: |stats| stats.cpu_used_ns as f64 / 1e9,
    },
    Family {
        name: "nook_sandbox_cpu_limit_cores",
        kind: "gauge",
        help: "The sandbox's CPU allowance in cores.",
        value: |stats| stats.cpu_limit,
    },
    Family {
        name: "nook_sandbox_memory_bytes",
        kind: "gauge",
        help: "Memory in use, without the page cache the kernel can drop.",
        value: |stats| stats.memory_used_bytes as f64,
    },
    Family {
        name: "nook_sandbox_memory_peak_bytes",
        kind: "gauge",
        help: "The most memory charged to the sandbox during its current run (page cache included).",
        value: |stats| stats.memory_peak_bytes as f64,
    },
    Family {
        name: "nook_sandbox_memory_average_bytes",
        kind: "gauge",
        help: "Memory in use on average over the current run (a reading every 10 s).",
        value: |stats| stats.memory_average_bytes as f64,
    },
    Family {
        name: "nook_sandbox_memory_limit_bytes",
        kind: "gauge",
        help: "The sandbox's memory limit.",
        value: |stats| stats.memory_limit_bytes as f64,
    },
    Family {
        name: "nook_sandbox_disk_bytes",
        kind: "gauge",
        help: "Disk taken by the sandbox's writable layer, as last measured (at most a minute old).",
        value: |stats| stats.disk_used_bytes as f64,
    },
    Family {
        name: "nook_sandbox_network_receive_bytes_total",
        kind: "counter",
        help: "Bytes received by the sandbox's network interfaces during its current run (loopback excluded).",
        value: |stats| stats.network_rx_bytes as f64,
    },
    Family {
        name: "nook_sandbox_network_transmit_bytes_total",
        kind: "counter",
        help: "Bytes sent by the sandbox's network interfaces during its current run (loopback excluded).",
        value: |stats| stats.network_tx_bytes as f64,
    },
    Family {
        name: "nook_sandbox_processes",
        kind: "gauge",
        help: "Processes and threads in the sandbox.",
        value: |stats| stats.pids as f64,
    },
];

/// The exposition text for these sandboxes (all of them, for the state counts) and the live ones' figures.
pub fn render(sandboxes: &[Sandbox], meters: &[(String, SandboxStats)]) -> String {
    let mut text = String::new();
    let mut by_state: BTreeMap<&'static str, usize> = [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Paused,
        SandboxState::Stopped,
        SandboxState::Archived,
        SandboxState::Error,
    ]
    .into_iter()
    .map(|state| (state.as_str(), 0))
    .collect();
    for sandbox in sandboxes {
        *by_state.entry(sandbox.state.as_str()).or_default() += 1;
    }
    let _ = writeln!(
        text,
        "# HELP nook_sandboxes Sandboxes by state.\n# TYPE nook_sandboxes gauge"
    );
    for (state, count) in by_state {
        let _ = writeln!(text, "nook_sandboxes{{state=\"{state}\"}} {count}");
    }
    let names: BTreeMap<&str, &str> = sandboxes
        .iter()
        .map(|sandbox| (sandbox.id.as_str(), sandbox.name.as_str()))
        .collect();
    for family in FAMILIES {
        let _ = writeln!(
            text,
            "# HELP {} {}\n# TYPE {} {}",
            family.name, family.help, family.name, family.kind
        );
        for (id, stats) in meters {
            // A sandbox the store no longer knows (deleted between the two reads) is left out.
            let Some(name) = names.get(id.as_str()) else { continue };
            let _ = writeln!(
                text,
                "{}{{sandbox=\"{}\",name=\"{}\"}} {}",
                family.name,
                escape(id),
                escape(name),
                (family.value)(stats)
            );
        }
    }
    text
}

/// A label value as the exposition format writes it.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_have_help_type_and_one_line_per_live_sandbox() {
        let now = chrono::Utc::now();
        let stats = SandboxStats {
            at: now,
            started_at: now,
            cpu_used_ns: 1_500_000_000,
            cpu_limit: 1.0,
            memory_used_bytes: 10,
            memory_cache_bytes: 0,
            memory_limit_bytes: 100,
            memory_peak_bytes: 20,
            memory_average_bytes: 8,
            network_rx_bytes: 0,
            network_tx_bytes: 0,
            pids: 3,
            disk_used_bytes: 4096,
            disk_used_complete: true,
            disk_total_bytes: 1 << 30,
        };
        let sandbox: Sandbox = serde_json::from_value(serde_json::json!({
            "id": "sb-1", "name": "one", "image": "base", "image_digest": "sha256:0", "isolation": "container",
            "state": "running", "state_reason": "requested", "state_message": "", "labels": {}, "env": {},
            "resources": {"cpu": 1.0, "memory_mb": 1, "pids": 8}, "oom_kills": 0,
            "created_at": now, "updated_at": now
        }))
        .unwrap();
        let text = render(&[sandbox], &[("sb-1".into(), stats.clone()), ("sb-gone".into(), stats)]);
        assert!(text.contains("nook_sandboxes{state=\"running\"} 1\n"), "{text}");
        assert!(text.contains("nook_sandboxes{state=\"stopped\"} 0\n"));
        assert!(text.contains("# TYPE nook_sandbox_cpu_seconds_total counter\n"));
        assert!(text.contains("nook_sandbox_cpu_seconds_total{sandbox=\"sb-1\",name=\"one\"} 1.5\n"));
        assert!(text.contains("nook_sandbox_memory_peak_bytes{sandbox=\"sb-1\",name=\"one\"} 20\n"));
        assert!(!text.contains("sb-gone"));
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
