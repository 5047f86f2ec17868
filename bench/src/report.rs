//! The markdown report printed at the end: one table of all series, the ratios between nook and its peers, the
//! issue's targets stated as facts, how each figure was taken, and the machine it was taken on.
//!
//! The report never judges: it prints figures and ratios, never pass or fail.

use std::fmt::Write as _;

use crate::machine::MachineFacts;
use crate::nook::CreateFigures;
use crate::peers::{Outcome, PeerFigures};
use crate::stats::Summary;

/// Everything the report shows.
#[derive(Debug)]
pub struct Report<'a> {
    /// The machine.
    pub machine: &'a MachineFacts,
    /// nook's version, as its health endpoint states it.
    pub nook_version: &'a str,
    /// nook create→first exec.
    pub create: &'a CreateFigures,
    /// nook exec round trip.
    pub exec: &'a Summary,
    /// The peers.
    pub peers: &'a PeerFigures,
}

/// Renders the report as markdown.
pub fn render(report: &Report<'_>) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_report(&mut out, report);
    out
}

fn write_report(out: &mut String, r: &Report<'_>) -> std::fmt::Result {
    let peers = r.peers;
    writeln!(out, "# nook-bench: nook against runc and runsc on the same machine\n")?;
    writeln!(
        out,
        "| measurement | n | p50 ms | p95 ms | p99 ms | mean ms | min ms | max ms |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
    row(out, "nook create→first exec", Some(&r.create.total), None)?;
    row(out, "nook exec round trip", Some(r.exec), None)?;
    outcome_row(out, "runc run", &peers.runc_run)?;
    outcome_row(out, "runc exec", &peers.runc_exec)?;
    outcome_row(out, "runsc run (systrap)", &peers.runsc_run)?;
    writeln!(out)?;
    writeln!(
        out,
        "nook create alone: p50 {:.2} ms (p95 {:.2}); first exec alone: p50 {:.2} ms (p95 {:.2}).\n",
        r.create.create.p50, r.create.create.p95, r.create.first_exec.p50, r.create.first_exec.p95
    )?;

    writeln!(out, "## Ratios (p50)\n")?;
    ratio(
        out,
        "runc run",
        peers.runc_run.summary(),
        "nook create→first exec",
        Some(&r.create.total),
    )?;
    ratio(
        out,
        "runsc run",
        peers.runsc_run.summary(),
        "nook create→first exec",
        Some(&r.create.total),
    )?;
    ratio(
        out,
        "runc exec",
        peers.runc_exec.summary(),
        "nook exec round trip",
        Some(r.exec),
    )?;
    writeln!(out)?;

    writeln!(out, "## Targets in the issue (for context)\n")?;
    writeln!(
        out,
        "- nook create→first exec p50 ≤ 100 ms; measured here: {:.1} ms.",
        r.create.total.p50
    )?;
    writeln!(
        out,
        "- nook exec round trip p50 ≤ 5 ms; measured here: {:.2} ms.\n",
        r.exec.p50
    )?;

    writeln!(out, "## How the figures were taken\n")?;
    writeln!(
        out,
        "- nook {}: its own `nook serve` on loopback; the Rust client (`nook-client`) over HTTP, so every nook figure \
         includes the API, control plane, runner and in-sandbox agent.",
        r.nook_version
    )?;
    writeln!(
        out,
        "- nook create→first exec: create a sandbox with the defaults, then exec `true`; timed from before the create \
         call to the exec answer. The sandbox is deleted after each sample, untimed. Runs one after another."
    )?;
    writeln!(
        out,
        "- nook exec round trip: one sandbox, `exec [\"true\"]` repeatedly."
    )?;
    writeln!(
        out,
        "- Peers run `/bin/true` from the same root filesystem (nook's unpacked base layer, as the read-only lower \
         layer of an overlay), with a `runc spec` config edited for no terminal and a read-only root. `runc run` and \
         `runsc run` are the whole create+start+wait+delete, timed from spawning the runtime to reaping it. `runc \
         exec` runs `/bin/true` in one detached `sleep infinity` container (the docker-exec-like path)."
    )?;
    writeln!(out, "- {}", peers.runc_version)?;
    match (&peers.runsc_version, &peers.runsc_flags) {
        (Some(version), Some(flags)) => writeln!(out, "- {version}; global flags: `{flags}`")?,
        (Some(version), None) => writeln!(out, "- {version}; no flag set worked (see below)")?,
        _ => writeln!(out, "- runsc: not installed")?,
    }
    writeln!(
        out,
        "- Every series starts with one untimed warm-up iteration. Percentiles are nearest-rank, so each is a measured \
         sample: with fewer than 100 samples p99 is the maximum, with fewer than 20 p95 is too."
    )?;
    for (name, outcome) in [
        ("runc run", &peers.runc_run),
        ("runc exec", &peers.runc_exec),
        ("runsc run", &peers.runsc_run),
    ] {
        if let Outcome::Unavailable(reason) = outcome {
            writeln!(out, "- {name} unavailable: {}", reason.replace('\n', " "))?;
        }
    }
    writeln!(out)?;

    let m = r.machine;
    writeln!(out, "## Machine\n")?;
    writeln!(out, "- nproc: {}; CPU: {}; memory: {}", m.nproc, m.cpu_model, m.memory)?;
    writeln!(out, "- kernel: {}; OS: {}", m.kernel, m.os)?;
    writeln!(out, "- cgroups: {}", m.cgroups)?;
    writeln!(
        out,
        "- load average when the bench started: {} (other work on the machine shows up in the figures)",
        m.load_at_start
    )?;
    Ok(())
}

fn row(out: &mut String, name: &str, summary: Option<&Summary>, note: Option<&str>) -> std::fmt::Result {
    match summary {
        Some(s) => writeln!(
            out,
            "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            s.n, s.p50, s.p95, s.p99, s.mean, s.min, s.max
        ),
        None => writeln!(
            out,
            "| {name} | – | {} | – | – | – | – | – |",
            note.unwrap_or("unavailable")
        ),
    }
}

fn outcome_row(out: &mut String, name: &str, outcome: &Outcome) -> std::fmt::Result {
    row(out, name, outcome.summary(), Some("unavailable (see below)"))
}

fn ratio(
    out: &mut String,
    name: &str,
    summary: Option<&Summary>,
    base_name: &str,
    base: Option<&Summary>,
) -> std::fmt::Result {
    match (summary, base) {
        (Some(s), Some(b)) if b.p50 > 0.0 => writeln!(
            out,
            "- {name} p50 / {base_name} p50 = {:.2}x ({:.2} ms / {:.2} ms)",
            s.p50 / b.p50,
            s.p50,
            b.p50
        ),
        _ => writeln!(
            out,
            "- {name} p50 / {base_name} p50: not available ({name} did not run)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(p50: f64) -> Summary {
        Summary {
            n: 3,
            p50,
            p95: p50 * 2.0,
            p99: p50 * 3.0,
            mean: p50,
            min: p50 / 2.0,
            max: p50 * 3.0,
        }
    }

    #[test]
    fn report_has_rows_ratios_targets_and_no_verdicts() {
        let machine = MachineFacts {
            nproc: 2,
            cpu_model: "cpu".into(),
            memory: "1 kB".into(),
            kernel: "Linux 6.1 x86_64".into(),
            os: "Debian".into(),
            cgroups: "hybrid".into(),
            load_at_start: "1 1 1".into(),
        };
        let create = CreateFigures {
            total: summary(50.0),
            create: summary(40.0),
            first_exec: summary(10.0),
        };
        let exec = summary(2.0);
        let peers = PeerFigures {
            runc_run: Outcome::Measured(summary(155.0)),
            runc_exec: Outcome::Measured(summary(30.0)),
            runsc_run: Outcome::Unavailable("runsc is not installed".into()),
            runc_version: "runc version 1".into(),
            runsc_version: None,
            runsc_flags: None,
        };
        let text = render(&Report {
            machine: &machine,
            nook_version: "0.1.0",
            create: &create,
            exec: &exec,
            peers: &peers,
        });
        assert!(text.contains("| nook create→first exec | 3 | 50.00 |"), "{text}");
        assert!(
            text.contains("| runsc run (systrap) | – | unavailable (see below) |"),
            "{text}"
        );
        assert!(
            text.contains("runc run p50 / nook create→first exec p50 = 3.10x"),
            "{text}"
        );
        assert!(
            text.contains("runc exec p50 / nook exec round trip p50 = 15.00x"),
            "{text}"
        );
        assert!(
            text.contains("runsc run p50 / nook create→first exec p50: not available"),
            "{text}"
        );
        assert!(text.contains("p50 ≤ 100 ms"), "{text}");
        assert!(text.contains("runsc run unavailable: runsc is not installed"), "{text}");
        let lower = text.to_lowercase();
        assert!(!lower.contains("pass") && !lower.contains("fail"), "{text}");
    }
}
