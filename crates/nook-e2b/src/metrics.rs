//! E2B sandbox metrics (`GET /sandboxes/{id}/metrics`, the SDKs' `get_metrics`): a series of samples per sandbox.
//!
//! Sandboxes become known to this module when they are created or connected through the E2B API, or when their
//! metrics are first asked for. One background task (started with the first such sandbox) reads every known
//! sandbox's usage from the runner every [`SAMPLE_INTERVAL`] and keeps the last [`HISTORY`] samples of each (an
//! hour). A stopped sandbox keeps its series and gets no samples; a deleted one is forgotten at the next round.
//!
//! Figures, in E2B's fields: `cpuUsedPct` is the CPU time used since the previous sample over the wall time between
//! them, as a share of the sandbox's CPU allowance (its quota in cores; the first sample of a run averages over the
//! run so far); `cpuCount` is that allowance rounded up; `memUsed` the working set (memory charged less the
//! inactive file cache), `memCache` the page cache, `memTotal` the limit; `diskUsed` what the sandbox's writable
//! layer takes on disk and `diskTotal` the size of the host filesystem holding it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use nook_api::{SandboxState, SandboxStats};
use nook_runner::{Runner, RunnerError};
use serde::Serialize;

use crate::rest::{error, not_found_or};
use crate::E2b;

/// Time between two samples of a sandbox.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept per sandbox: one hour.
pub const HISTORY: usize = 720;
/// Sandboxes read at the same time in one round.
const CONCURRENT_READS: usize = 8;

/// One sample, in E2B's `SandboxMetric` shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sample {
    /// When it was taken.
    pub timestamp: DateTime<Utc>,
    /// The same, in Unix seconds.
    pub timestamp_unix: i64,
    /// CPU allowance in whole cores.
    pub cpu_count: u64,
    /// CPU used since the previous sample, in percent of the allowance.
    pub cpu_used_pct: f64,
    /// Working set in bytes.
    pub mem_used: u64,
    /// Memory limit in bytes.
    pub mem_total: u64,
    /// Page cache in bytes.
    pub mem_cache: u64,
    /// Bytes the writable layer takes on disk.
    pub disk_used: u64,
    /// Size of the filesystem holding it.
    pub disk_total: u64,
}

/// The CPU reading a sample's rate is computed from.
#[derive(Debug, Clone, Copy)]
struct Reading {
    at: DateTime<Utc>,
    started_at: DateTime<Utc>,
    cpu_ns: u64,
}

#[derive(Debug, Default)]
struct Series {
    samples: VecDeque<Sample>,
    last: Option<Reading>,
}

/// Sample series of the sandboxes known to the E2B layer.
pub struct Metrics {
    runner: Arc<dyn Runner>,
    series: Mutex<HashMap<String, Series>>,
    sampler: OnceLock<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Series of sandboxes on `runner`.
    pub fn new(runner: Arc<dyn Runner>) -> Self {
        Self {
            runner,
            series: Mutex::default(),
            sampler: OnceLock::new(),
        }
    }

    /// Starts sampling a sandbox (and the sampler task, the first time).
    pub fn track(self: &Arc<Self>, id: &str) {
        self.series
            .lock()
            .expect("metrics lock")
            .entry(id.to_string())
            .or_default();
        self.sampler.get_or_init(|| {
            let metrics = Arc::downgrade(self);
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(SAMPLE_INTERVAL);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    let Some(metrics) = metrics.upgrade() else { return };
                    metrics.sample_all().await;
                }
            })
        });
    }

    /// Forgets a sandbox and its samples.
    pub fn forget(&self, id: &str) {
        self.series.lock().expect("metrics lock").remove(id);
    }

    /// One round: a sample of every known sandbox that runs.
    async fn sample_all(&self) {
        let ids: Vec<String> = self.series.lock().expect("metrics lock").keys().cloned().collect();
        futures::stream::iter(ids)
            .for_each_concurrent(CONCURRENT_READS, |id| async move {
                if let Err(error) = self.sample(&id).await {
                    tracing::debug!(sandbox = %id, %error, "no metrics sample");
                }
            })
            .await;
    }

    /// Reads a sandbox's usage now and records it. A stopped sandbox records nothing; a deleted one is forgotten.
    pub async fn sample(&self, id: &str) -> Result<(), RunnerError> {
        match self.runner.stats(id).await {
            Ok(stats) => {
                if let Some(series) = self.series.lock().expect("metrics lock").get_mut(id) {
                    let sample = sample_of(&stats, series.last);
                    series.last = Some(Reading {
                        at: stats.at,
                        started_at: stats.started_at,
                        cpu_ns: stats.cpu_used_ns,
                    });
                    if series.samples.len() == HISTORY {
                        series.samples.pop_front();
                    }
                    series.samples.push_back(sample);
                }
                Ok(())
            }
            Err(error) => {
                match error {
                    RunnerError::NoSuchSandbox(_) => self.forget(id),
                    RunnerError::NotRunning(_) => {
                        if let Some(series) = self.series.lock().expect("metrics lock").get_mut(id) {
                            series.last = None;
                        }
                    }
                    _ => {}
                }
                Err(error)
            }
        }
    }

    /// The samples of a sandbox taken from `start` to `end` (Unix seconds, both included), oldest first.
    pub fn samples(&self, id: &str, start: Option<i64>, end: Option<i64>) -> Vec<Sample> {
        let series = self.series.lock().expect("metrics lock");
        let Some(series) = series.get(id) else {
            return Vec::new();
        };
        series
            .samples
            .iter()
            .filter(|sample| start.is_none_or(|start| sample.timestamp_unix >= start))
            .filter(|sample| end.is_none_or(|end| sample.timestamp_unix <= end))
            .cloned()
            .collect()
    }

    fn has_samples(&self, id: &str) -> bool {
        self.series
            .lock()
            .expect("metrics lock")
            .get(id)
            .is_some_and(|series| !series.samples.is_empty())
    }
}

/// A sample from a reading and the previous reading of the same sandbox, if any.
fn sample_of(stats: &SandboxStats, previous: Option<Reading>) -> Sample {
    let (cpu_ns, since) = match previous {
        Some(last) if last.started_at == stats.started_at && last.cpu_ns <= stats.cpu_used_ns && last.at < stats.at => {
            (stats.cpu_used_ns - last.cpu_ns, last.at)
        }
        // The first reading of this run: the average since the run began.
        _ => (stats.cpu_used_ns, stats.started_at),
    };
    let wall_ns = (stats.at - since).num_nanoseconds().unwrap_or(i64::MAX).max(1) as f64;
    let allowance = if stats.cpu_limit > 0.0 { stats.cpu_limit } else { 1.0 };
    let pct = (cpu_ns as f64 / wall_ns / allowance * 100.0).clamp(0.0, 100.0);
    Sample {
        timestamp: stats.at,
        timestamp_unix: stats.at.timestamp(),
        cpu_count: stats.cpu_limit.ceil().max(1.0) as u64,
        cpu_used_pct: (pct * 100.0).round() / 100.0,
        mem_used: stats.memory_used_bytes,
        mem_total: stats.memory_limit_bytes,
        mem_cache: stats.memory_cache_bytes,
        disk_used: stats.disk_used_bytes,
        disk_total: stats.disk_total_bytes,
    }
}

/// Query of `GET /sandboxes/{id}/metrics`: Unix seconds.
#[derive(Debug, Default, serde::Deserialize)]
pub struct MetricsQuery {
    start: Option<String>,
    end: Option<String>,
}

fn seconds(name: &str, value: Option<&str>) -> Result<Option<i64>, String> {
    value
        .map(|text| {
            text.parse::<i64>()
                .map_err(|_| format!("{name} {text:?} is not a Unix time in seconds"))
        })
        .transpose()
}

/// `GET /sandboxes/{id}/metrics?start=&end=`: the samples in the interval (all that are kept when none is given).
/// A running sandbox without a sample yet gets one at once.
pub async fn metrics(State(e2b): State<E2b>, Path(id): Path<String>, Query(query): Query<MetricsQuery>) -> Response {
    let (start, end) = match (
        seconds("start", query.start.as_deref()),
        seconds("end", query.end.as_deref()),
    ) {
        (Ok(start), Ok(end)) => (start, end),
        (Err(message), _) | (_, Err(message)) => return error(StatusCode::BAD_REQUEST, message),
    };
    if let (Some(start), Some(end)) = (start, end) {
        if start > end {
            return error(StatusCode::BAD_REQUEST, "start must not be after end");
        }
    }
    let sandbox = match e2b.control.resolve(&id).await {
        Ok(sandbox) => sandbox,
        Err(failure) => return not_found_or(failure, &id),
    };
    e2b.metrics.track(&sandbox.id);
    if sandbox.state == SandboxState::Running && !e2b.metrics.has_samples(&sandbox.id) {
        if let Err(error) = e2b.metrics.sample(&sandbox.id).await {
            tracing::debug!(sandbox = %sandbox.id, %error, "no metrics sample on demand");
        }
    }
    Json(e2b.metrics.samples(&sandbox.id, start, end)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(at_s: i64, cpu_ns: u64) -> SandboxStats {
        SandboxStats {
            at: DateTime::from_timestamp(at_s, 0).unwrap(),
            started_at: DateTime::from_timestamp(1000, 0).unwrap(),
            cpu_used_ns: cpu_ns,
            cpu_limit: 0.5,
            memory_used_bytes: 1,
            memory_cache_bytes: 2,
            memory_peak_bytes: 3,
            memory_average_bytes: 1,
            network_rx_bytes: 0,
            network_tx_bytes: 0,
            memory_limit_bytes: 3,
            pids: 1,
            disk_used_bytes: 4,
            disk_used_complete: true,
            disk_total_bytes: 5,
        }
    }

    #[test]
    fn cpu_percent_is_of_the_allowance_between_readings() {
        // First reading: 1 s of CPU over the 10 s since the start, of half a core: 20 %.
        let first = sample_of(&stats(1010, 1_000_000_000), None);
        assert_eq!((first.cpu_used_pct, first.cpu_count), (20.0, 1));
        // Then 2.5 s of CPU in 5 s of half a core: saturated.
        let last = Reading {
            at: first.timestamp,
            started_at: DateTime::from_timestamp(1000, 0).unwrap(),
            cpu_ns: 1_000_000_000,
        };
        assert_eq!(sample_of(&stats(1015, 3_500_000_000), Some(last)).cpu_used_pct, 100.0);
        assert_eq!(sample_of(&stats(1015, 1_250_000_000), Some(last)).cpu_used_pct, 10.0);
        // A new run (CPU time went back): averaged over the new run.
        let restarted = Reading {
            cpu_ns: 9_000_000_000,
            ..last
        };
        assert_eq!(
            sample_of(&stats(1020, 1_000_000_000), Some(restarted)).cpu_used_pct,
            10.0
        );
    }

    #[test]
    fn samples_serialize_in_e2b_shape() {
        let sample = sample_of(&stats(1010, 0), None);
        let json = serde_json::to_value(&sample).unwrap();
        for field in [
            "timestamp",
            "timestampUnix",
            "cpuCount",
            "cpuUsedPct",
            "memUsed",
            "memTotal",
            "memCache",
            "diskUsed",
            "diskTotal",
        ] {
            assert!(json.get(field).is_some(), "{field} missing in {json}");
        }
        assert_eq!(json["timestampUnix"], 1010);
    }
}
