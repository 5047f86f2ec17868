//! Facts about the machine the figures were taken on, for the report: CPU count and model, memory, kernel (`uname`),
//! distribution, cgroup layout (from `/proc/self/mountinfo`) and the load average when the bench started, since other
//! work on the machine shows up in the figures.

use std::process::{Command, Stdio};

/// What the report says about the machine.
#[derive(Debug, Clone)]
pub struct MachineFacts {
    /// Usable CPUs.
    pub nproc: usize,
    /// CPU model name.
    pub cpu_model: String,
    /// Total memory (GiB, from `/proc/meminfo`).
    pub memory: String,
    /// `uname -srm`.
    pub kernel: String,
    /// `PRETTY_NAME` from `/etc/os-release`.
    pub os: String,
    /// The cgroup layout in words.
    pub cgroups: String,
    /// `/proc/loadavg`'s three load averages when the bench started.
    pub load_at_start: String,
}

impl MachineFacts {
    /// Gathers the facts; anything unreadable is reported as unknown.
    pub fn gather() -> Self {
        let unknown = || "unknown".to_string();
        let read = |path: &str| std::fs::read_to_string(path).ok();
        Self {
            nproc: std::thread::available_parallelism().map(usize::from).unwrap_or(0),
            cpu_model: read("/proc/cpuinfo")
                .and_then(|text| field(&text, "model name", ':'))
                .unwrap_or_else(unknown),
            memory: read("/proc/meminfo")
                .and_then(|text| field(&text, "MemTotal", ':'))
                .map(|total| gib(&total).unwrap_or(total))
                .unwrap_or_else(unknown),
            kernel: uname().unwrap_or_else(unknown),
            os: read("/etc/os-release")
                .and_then(|text| field(&text, "PRETTY_NAME", '='))
                .map(|name| name.trim_matches('"').to_string())
                .unwrap_or_else(unknown),
            cgroups: read("/proc/self/mountinfo")
                .map(|text| cgroup_layout(&text))
                .unwrap_or_else(unknown),
            load_at_start: read("/proc/loadavg")
                .map(|text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_else(unknown),
        }
    }
}

/// The value of the first `key<sep>value` line in `text`.
fn field(text: &str, key: &str, separator: char) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(separator)?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

/// `/proc/meminfo`'s `NNN kB` as `N.N GiB`.
fn gib(kb: &str) -> Option<String> {
    let kb: f64 = kb.strip_suffix(" kB")?.trim().parse().ok()?;
    Some(format!("{:.1} GiB", kb / (1024.0 * 1024.0)))
}

fn uname() -> Option<String> {
    let output = Command::new("uname").arg("-srm").stdin(Stdio::null()).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// Describes the cgroup mounts in `mountinfo`: unified (v2 only), legacy (v1 only) or hybrid (v1 controllers plus a
/// v2 hierarchy), with the mount points.
fn cgroup_layout(mountinfo: &str) -> String {
    let mut v1 = Vec::new();
    let mut v2 = Vec::new();
    for line in mountinfo.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = before.split_whitespace().nth(4) else {
            continue;
        };
        match after.split_whitespace().next() {
            Some("cgroup") => v1.push(mount_point.to_string()),
            Some("cgroup2") => v2.push(mount_point.to_string()),
            _ => {}
        }
    }
    let v1_names = || {
        v1.iter()
            .map(|path| path.rsplit('/').next().unwrap_or(path))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (v1.is_empty(), v2.is_empty()) {
        (true, true) => "no cgroup filesystem mounted".into(),
        (true, false) => format!("unified (cgroup v2 only) at {}", v2.join(", ")),
        (false, true) => format!("legacy (cgroup v1 only): {}", v1_names()),
        (false, false) => format!(
            "hybrid: cgroup v1 controllers ({}) plus cgroup2 at {}",
            v1_names(),
            v2.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_layout_names_v1_controllers_and_the_v2_mount() {
        let mountinfo = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 1 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup_layout(mountinfo),
            "hybrid: cgroup v1 controllers (cpu, memory) plus cgroup2 at /sys/fs/cgroup/unified"
        );
    }

    #[test]
    fn unified_layout() {
        let mountinfo = "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup_layout(mountinfo), "unified (cgroup v2 only) at /sys/fs/cgroup");
    }

    #[test]
    fn fields_are_found_by_key() {
        assert_eq!(
            field("a: 1\nmodel name\t: X Y\n", "model name", ':').as_deref(),
            Some("X Y")
        );
        assert_eq!(field("NAME=\"x\"\n", "PRETTY_NAME", '='), None);
    }

    #[test]
    fn memory_is_shown_in_gib() {
        assert_eq!(gib("24683656 kB").as_deref(), Some("23.5 GiB"));
        assert_eq!(gib("lots"), None);
    }
}
