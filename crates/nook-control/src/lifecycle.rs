//! Lifecycle policies: what a sandbox does on its own as time passes (besides its deadline, see `deadlines`).
//!
//! - **Idle stop** (`idle_stop_s`): a running sandbox is stopped, its files kept, once it has gone that long without
//!   activity. Activity is an API call working on it (exec, processes, terminal input, files: everything that goes
//!   through [`crate::control::Control`]'s running-sandbox check), noted in memory as it happens, or CPU use: a
//!   sandbox whose processes used 1% of a core or more since the last look is busy even if nobody calls it.
//! - **Archive once stopped** (`stopped_archive_s`): a sandbox stopped that long has its files moved to the archive
//!   store (reason `auto_archived`); starting it brings them back.
//! - **Delete once stopped** (`stopped_delete_s`): a sandbox stopped (or archived) that long (by a client, its
//!   deadline, idleness or its init exiting) is deleted.
//!
//! One timer ([`DeadlineTimer`]) holds each sandbox's next check; the control plane re-plans a sandbox's check
//! whenever the store says its record changed, so no transition has to remember to. A check re-reads the sandbox and
//! either acts or plans the next one: nothing is polled, and a restart plans every sandbox again from the store.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};

use crate::deadlines::DeadlineTimer;

/// CPU use (in cores) at or above which a sandbox counts as busy.
pub const BUSY_CPU: f64 = 0.01;
/// Longest window over which CPU use is measured before an idle stop.
pub const CPU_WINDOW: Duration = Duration::seconds(30);

/// The lifecycle timer and what it knows of sandboxes' activity.
#[derive(Debug, Default)]
pub struct Lifecycles {
    /// Each sandbox's next check.
    pub timer: DeadlineTimer,
    activity: Mutex<HashMap<String, Activity>>,
}

#[derive(Debug, Clone, Copy)]
struct Activity {
    /// The last API call that worked on the sandbox.
    last_call: Option<DateTime<Utc>>,
    /// A reading of its CPU time, to measure its use from.
    cpu: Option<(DateTime<Utc>, u64)>,
}

impl Lifecycles {
    /// Notes an API call working on a sandbox.
    pub fn touch(&self, id: &str) {
        let mut activity = self.activity.lock().expect("activity");
        activity
            .entry(id.to_string())
            .or_insert(Activity {
                last_call: None,
                cpu: None,
            })
            .last_call = Some(Utc::now());
    }

    /// The last API call that worked on a sandbox since this server started.
    pub fn last_call(&self, id: &str) -> Option<DateTime<Utc>> {
        self.activity
            .lock()
            .expect("activity")
            .get(id)
            .and_then(|activity| activity.last_call)
    }

    /// Records a reading of a sandbox's CPU time and returns its use in cores since the previous reading, if there
    /// was one and it is recent enough to stand for the idle window.
    pub fn cpu_since_last(&self, id: &str, now: DateTime<Utc>, cpu_ns: u64) -> Option<f64> {
        let mut activity = self.activity.lock().expect("activity");
        let entry = activity.entry(id.to_string()).or_insert(Activity {
            last_call: None,
            cpu: None,
        });
        let previous = entry.cpu.replace((now, cpu_ns));
        let (at, before) = previous?;
        // A reading from long ago says nothing of the last window, and one above the counter now is from an earlier
        // run (the kernel's count starts again with the sandbox's cgroup): either way, measure from this one.
        if now - at > CPU_WINDOW * 2 || cpu_ns < before {
            return None;
        }
        let wall_ns = (now - at).num_nanoseconds()?.max(1) as f64;
        Some((cpu_ns - before) as f64 / wall_ns)
    }

    /// Forgets a deleted sandbox.
    pub fn forget(&self, id: &str) {
        self.activity.lock().expect("activity").remove(id);
        self.timer.schedule(id, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_use_is_measured_between_readings() {
        let lifecycles = Lifecycles::default();
        let start = Utc::now();
        assert_eq!(lifecycles.cpu_since_last("sb-x", start, 1_000), None);
        let busy = lifecycles
            .cpu_since_last("sb-x", start + Duration::seconds(2), 1_000 + 1_000_000_000)
            .unwrap();
        assert!((busy - 0.5).abs() < 1e-6, "{busy}");
        let idle = lifecycles
            .cpu_since_last("sb-x", start + Duration::seconds(12), 1_000 + 1_000_000_000 + 1_000_000)
            .unwrap();
        assert!(idle < BUSY_CPU, "{idle}");
        // Stale or from an earlier run: no figure, and the next one measures from the new reading.
        let later = start + Duration::seconds(12) + CPU_WINDOW * 3;
        assert_eq!(lifecycles.cpu_since_last("sb-x", later, 2_000_000_000), None);
        let restarted = later + Duration::seconds(1);
        assert_eq!(lifecycles.cpu_since_last("sb-x", restarted, 5_000), None);
        let measured = lifecycles
            .cpu_since_last("sb-x", restarted + Duration::seconds(1), 5_000 + 100_000_000)
            .unwrap();
        assert!((measured - 0.1).abs() < 1e-6, "{measured}");
        assert_eq!(lifecycles.last_call("sb-x"), None);
        lifecycles.touch("sb-x");
        assert!(lifecycles.last_call("sb-x").is_some());
        lifecycles.forget("sb-x");
        assert_eq!(lifecycles.last_call("sb-x"), None);
    }
}
