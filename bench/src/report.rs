//! The markdown report printed at the end: one table of all latency series, nook's file throughput and the server's
//! peak memory, the ratios between nook and its peers, the targets stated as facts, how each figure was
//! taken, and the machine it was taken on.
//!
//! The report never judges: it prints figures and ratios, never pass or fail.

use std::fmt::Write as _;

use crate::builds::BuildFigures;
use crate::images::{ImageFigures, Transfer};
use crate::interpreter::InterpreterFigures;
use crate::machine::MachineFacts;
use crate::nook::{mebibytes_per_s, megabytes_per_s, CreateFigures, FileFigures, PauseFigures};
use crate::peers::{Outcome, PeerFigures};
use crate::server::MemoryAroundFiles;
use crate::stats::Summary;

/// Everything the report shows.
#[derive(Debug)]
pub struct Report<'a> {
    /// The machine.
    pub machine: &'a MachineFacts,
    /// nook's version, as its health endpoint states it.
    pub nook_version: &'a str,
    /// nook create→first exec (with the default network: an interface, NAT, the resolver).
    pub create: &'a CreateFigures,
    /// The same with network `none` (loopback only), to show what networking costs.
    pub create_no_network: &'a CreateFigures,
    /// nook exec round trip.
    pub exec: &'a Summary,
    /// nook pause and resume.
    pub pauses: &'a PauseFigures,
    /// nook background process start→first output line.
    pub processes: &'a Summary,
    /// nook terminal keystroke → echo over the WebSocket.
    pub keystrokes: &'a Summary,
    /// The E2B code interpreter.
    pub interpreter: &'a InterpreterFigures,
    /// nook file upload and download.
    pub files: &'a FileFigures,
    /// The server's memory around the file transfers.
    pub server_memory: &'a MemoryAroundFiles,
    /// Image push and pull through a registry on loopback.
    pub images: &'a ImageFigures,
    /// Dockerfile builds.
    pub builds: &'a BuildFigures,
    /// Forks, snapshots and resizes.
    pub stateful: &'a crate::stateful::StatefulFigures,
    /// The preview proxy.
    pub preview: &'a crate::preview::PreviewFigures,
    /// The egress proxy.
    pub egress: &'a crate::egress::EgressFigures,
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
    row(
        out,
        "nook create→first exec, no network interface",
        Some(&r.create_no_network.total),
        None,
    )?;
    row(out, "nook exec round trip", Some(r.exec), None)?;
    row(out, "nook pause (every process frozen)", Some(&r.pauses.pause), None)?;
    row(out, "nook resume (every process thawed)", Some(&r.pauses.resume), None)?;
    row(
        out,
        "nook background process → first output line",
        Some(r.processes),
        None,
    )?;
    row(
        out,
        "nook terminal keystroke → echo (WebSocket)",
        Some(r.keystrokes),
        None,
    )?;
    row(
        out,
        "E2B code interpreter: create → first `1+1` result",
        Some(&r.interpreter.cold),
        None,
    )?;
    row(
        out,
        "E2B code interpreter: `1+1` round trip (warm kernel)",
        Some(&r.interpreter.round_trip),
        None,
    )?;
    outcome_row(out, "runc run", &peers.runc_run)?;
    outcome_row(out, "runc exec", &peers.runc_exec)?;
    outcome_row(out, "runsc run (systrap)", &peers.runsc_run)?;
    writeln!(out)?;
    writeln!(
        out,
        "nook create alone: p50 {:.2} ms (p95 {:.2}); first exec alone: p50 {:.2} ms (p95 {:.2}).\n",
        r.create.create.p50, r.create.create.p95, r.create.first_exec.p50, r.create.first_exec.p95
    )?;

    let files = r.files;
    writeln!(out, "## nook file throughput (loopback)\n")?;
    writeln!(
        out,
        "| direction | runs | size | best MB/s | best MiB/s | median MB/s | median MiB/s |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|")?;
    throughput_row(out, "upload", files.bytes, &files.upload)?;
    throughput_row(out, "download", files.bytes, &files.download)?;
    writeln!(out)?;
    let memory = r.server_memory;
    writeln!(
        out,
        "nook serve peak RSS (VmHWM): {} before the file transfers, {} after them (RSS after them: {}).\n",
        mib(memory.before.peak_kib),
        mib(memory.after.peak_kib),
        mib(memory.after.current_kib)
    )?;

    writeln!(out, "## nook image push and pull (registry on loopback)\n")?;
    match r.images {
        ImageFigures::Measured {
            push,
            pull,
            pull_to_first_exec_ms,
        } => {
            writeln!(
                out,
                "| transfer | seconds | blobs (gzip) | blob MB/s | files | file MB/s |"
            )?;
            writeln!(out, "|---|---:|---:|---:|---:|---:|")?;
            transfer_row(out, "push `base` (export + gzip + upload)", push)?;
            transfer_row(out, "pull it back (download + gunzip + verify + unpack)", pull)?;
            writeln!(out)?;
            writeln!(
                out,
                "Pull finished → first exec in a sandbox of the pulled image: {pull_to_first_exec_ms:.1} ms.\n"
            )?;
        }
        ImageFigures::Unavailable(why) => writeln!(out, "Not measured: {why}.\n")?,
    }

    let builds = r.builds;
    writeln!(out, "## nook Dockerfile builds\n")?;
    writeln!(
        out,
        "On `base`: WORKDIR, COPY of {} files ({}), RUN, ENV, COPY of one file, RUN; from the start request to the \
         `done` event.\n",
        builds.context_files,
        mib(builds.context_bytes / 1024)
    )?;
    writeln!(
        out,
        "| build | n | p50 ms | p95 ms | p99 ms | mean ms | min ms | max ms |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
    writeln!(
        out,
        "| first build (every step runs) | 1 | {:.2} | – | – | – | – | – |",
        builds.first_ms
    )?;
    row(
        out,
        "unchanged rebuild (every layer cached)",
        Some(&builds.unchanged),
        None,
    )?;
    writeln!(
        out,
        "| the last COPY's file changed (2 of 4 layer steps run) | 1 | {:.2} | – | – | – | – | – |",
        builds.last_copy_changed_ms
    )?;
    writeln!(out)?;

    writeln!(out, "## nook forks, snapshots and live resizes (btrfs storage image)\n")?;
    writeln!(
        out,
        "| data the source wrote | fork ×1 ms | source frozen ms | fork ×10 ms | snapshot ms | archive ms | restore + start ms |"
    )?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|")?;
    for size in &r.stateful.sizes {
        writeln!(
            out,
            "| {} MB | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            size.written_mb,
            size.fork_one_ms,
            size.frozen_ms,
            size.fork_ten_ms,
            size.snapshot_ms,
            size.archive_ms,
            size.restore_start_ms
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "| measurement | n | p50 ms | p95 ms | p99 ms | mean ms | min ms | max ms |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
    row(
        out,
        "live resize (CPU and memory, running sandbox)",
        Some(&r.stateful.resize),
        None,
    )?;
    writeln!(out)?;

    let preview = r.preview;
    writeln!(out, "## Preview proxy (HTTP to a Node.js server in a sandbox)\n")?;
    writeln!(
        out,
        "| measurement | n | p50 ms | p95 ms | p99 ms | mean ms | min ms | max ms |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
    row(
        out,
        "GET straight to the sandbox's address",
        preview.direct.as_ref(),
        None,
    )?;
    row(
        out,
        "GET through the preview proxy (path, token)",
        Some(&preview.proxied),
        None,
    )?;
    writeln!(out)?;
    if let Some(direct) = &preview.direct {
        writeln!(
            out,
            "The proxy adds {:.2} ms at the median, one request at a time.\n",
            preview.proxied.p50 - direct.p50
        )?;
    }
    writeln!(
        out,
        "| under load ({}) | requests/s | p50 ms | p99 ms |",
        preview.load_settings
    )?;
    writeln!(out, "|---|---:|---:|---:|")?;
    for (what, load) in [
        ("straight to the sandbox", &preview.direct_load),
        ("through the preview proxy", &preview.proxied_load),
    ] {
        match load {
            Ok(load) => writeln!(
                out,
                "| {what} | {:.0} | {:.2} | {:.2} |",
                load.requests_per_s, load.p50_ms, load.p99_ms
            )?,
            Err(why) => writeln!(
                out,
                "| {what} | not measured: {} | | |",
                why.lines().next().unwrap_or("")
            )?,
        }
    }
    writeln!(out)?;

    let egress = r.egress;
    writeln!(
        out,
        "## Egress proxy (HTTP from a sandbox to a test host; Node.js client in the sandbox)\n"
    )?;
    writeln!(
        out,
        "| measurement | n | p50 ms | p95 ms | p99 ms | mean ms | min ms | max ms |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
    row(
        out,
        "new connection per request, through NAT",
        Some(&egress.direct.fresh),
        None,
    )?;
    row(
        out,
        "new connection per request, through the proxy",
        Some(&egress.proxied.fresh),
        None,
    )?;
    row(
        out,
        "kept-alive connection, through NAT",
        Some(&egress.direct.kept),
        None,
    )?;
    row(
        out,
        "kept-alive connection, through the proxy",
        Some(&egress.proxied.kept),
        None,
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "16 kept-alive connections for 5 s: {:.0} requests/s through NAT, {:.0} through the proxy. The proxy adds \
         {:.2} ms to a new connection (it reads the Host, judges it, resolves and dials) and {:.2} ms to a request on \
         a kept-alive one (it relays).\n",
        egress.direct.per_s,
        egress.proxied.per_s,
        egress.proxied.fresh.p50 - egress.direct.fresh.p50,
        egress.proxied.kept.p50 - egress.direct.kept.p50
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
        "- nook exec round trip p50 ≤ 5 ms; measured here: {:.2} ms.",
        r.exec.p50
    )?;
    writeln!(
        out,
        "- nook pause and resume ≤ 10 ms each; measured here: p50 {:.2} ms and {:.2} ms.",
        r.pauses.pause.p50, r.pauses.resume.p50
    )?;
    writeln!(
        out,
        "- nook file upload and download ≥ 500 MB/s each way on loopback; measured here (median of {} runs of {}): \
         upload {:.0} MB/s, download {:.0} MB/s.\n",
        files.upload.n,
        size(files.bytes),
        megabytes_per_s(files.bytes, files.upload.p50),
        megabytes_per_s(files.bytes, files.download.p50)
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
        "- image push and pull: one run each against Debian's `docker-registry` on loopback (no TLS, no auth). The \
         push writes every layer of `base` out as a gzip tar (fast level) and uploads it; the pull downloads what was \
         pushed (new digests, so nothing is cached), verifies and unpacks it. MB/s of blobs is the wire rate; MB/s \
         of files is the rate of file data written into the layer store."
    )?;
    writeln!(
        out,
        "- Dockerfile builds: each build sends the whole context (an uncompressed tar) with `POST /v1/builds` and \
         follows the log to `done`; the server unpacks the context, parses the Dockerfile and, for each COPY, \
         hashes the files it takes, so an unchanged rebuild still costs the upload, the unpacking and the hashing \
         of the context, but runs no step sandbox. Runs one after another."
    )?;
    writeln!(
        out,
        "- nook exec round trip: one sandbox, `exec [\"true\"]` repeatedly."
    )?;
    writeln!(
        out,
        "- nook pause and resume: one sandbox running a busy shell loop, paused and resumed repeatedly; each call \
         timed through the API to its answer, which comes once the kernel reports the whole cgroup frozen or thawed."
    )?;
    writeln!(
        out,
        "- nook background process → first output line: one sandbox; start `echo ready` as a background process, then \
         follow its output from offset 0; timed from before the start call to the first `stdout` event. The rest of \
         the stream, up to the process's exit, is read untimed before the next start."
    )?;
    writeln!(
        out,
        "- E2B code interpreter: through nook's E2B API as the SDKs use it (`POST /sandboxes` with the \
         `code-interpreter-v1` template, then `POST /execute` addressed by the `E2b-Sandbox-Id` / `E2b-Sandbox-Port: \
         49999` headers, read to `end_of_execution`). Create → first result includes starting the Jupyter kernel in \
         the sandbox; the round trip runs `1+1` in that warm kernel."
    )?;
    writeln!(
        out,
        "- nook file throughput: one sandbox; upload {} to `/tmp/bench.bin` with a streamed body generated in 1 MiB \
         chunks as it is sent, then download it counting the bytes (both sizes checked). Each transfer is timed from \
         before the call to its last byte (for the upload, the server's answer), so the sandbox's disk write is in the \
         upload figure. MB = 10^6 bytes, MiB = 2^20 bytes; best is the fastest run, median the nearest-rank median.",
        size(files.bytes)
    )?;
    writeln!(
        out,
        "- nook serve peak RSS: `VmHWM` of the server process in `/proc/<pid>/status`, the high-water mark over its \
         whole life (base image import and every earlier series included), read just before the first file transfer \
         and just after the last; memory of the in-sandbox agent is not included."
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

fn throughput_row(out: &mut String, direction: &str, bytes: u64, durations: &Summary) -> std::fmt::Result {
    writeln!(
        out,
        "| {direction} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
        durations.n,
        size(bytes),
        megabytes_per_s(bytes, durations.min),
        mebibytes_per_s(bytes, durations.min),
        megabytes_per_s(bytes, durations.p50),
        mebibytes_per_s(bytes, durations.p50)
    )
}

/// `bytes` in MiB, e.g. "1024 MiB".
fn size(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

/// KiB as MiB with one decimal, e.g. "45.2 MiB".
fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
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

fn transfer_row(out: &mut String, what: &str, transfer: &Transfer) -> std::fmt::Result {
    writeln!(
        out,
        "| {what} | {:.1} | {} | {:.0} | {} | {:.0} |",
        transfer.took_ms / 1000.0,
        mib(transfer.blob_bytes / 1024),
        megabytes_per_s(transfer.blob_bytes, transfer.took_ms),
        mib(transfer.unpacked_bytes / 1024),
        megabytes_per_s(transfer.unpacked_bytes, transfer.took_ms),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::ProcessMemory;

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
        let processes = summary(4.0);
        // 1 GiB: the median upload takes 2 s (537 MB/s), the fastest 1 s; the median download 4 s.
        let files = FileFigures {
            bytes: 1 << 30,
            upload: summary(2000.0),
            download: summary(4000.0),
        };
        let memory = |peak_kib, current_kib| ProcessMemory { peak_kib, current_kib };
        let server_memory = MemoryAroundFiles {
            before: memory(40 * 1024, 30 * 1024),
            after: memory(46_592, 35 * 1024),
        };
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
            create_no_network: &create,
            exec: &exec,
            pauses: &PauseFigures {
                pause: summary(3.0),
                resume: summary(2.0),
            },
            processes: &processes,
            keystrokes: &summary(1.0),
            interpreter: &InterpreterFigures {
                cold: summary(900.0),
                round_trip: summary(9.0),
            },
            files: &files,
            server_memory: &server_memory,
            images: &ImageFigures::Measured {
                push: Transfer {
                    took_ms: 2000.0,
                    blob_bytes: 500_000_000,
                    unpacked_bytes: 1_500_000_000,
                },
                pull: Transfer {
                    took_ms: 5000.0,
                    blob_bytes: 500_000_000,
                    unpacked_bytes: 1_500_000_000,
                },
                pull_to_first_exec_ms: 42.0,
            },
            builds: &BuildFigures {
                context_files: 503,
                context_bytes: 17 << 20,
                first_ms: 2500.0,
                unchanged: summary(12.0),
                last_copy_changed_ms: 400.0,
            },
            stateful: &crate::stateful::StatefulFigures {
                sizes: vec![crate::stateful::SizeFigures {
                    written_mb: 200,
                    fork_one_ms: 45.0,
                    frozen_ms: 12.5,
                    fork_ten_ms: 300.0,
                    snapshot_ms: 700.0,
                    archive_ms: 900.0,
                    restore_start_ms: 1100.0,
                }],
                resize: summary(1.5),
            },
            preview: &crate::preview::PreviewFigures {
                direct: Some(summary(0.2)),
                proxied: summary(0.5),
                direct_load: Ok(crate::preview::Load {
                    requests_per_s: 9000.0,
                    p50_ms: 1.0,
                    p99_ms: 3.0,
                }),
                proxied_load: Err("wrk could not run".into()),
                load_settings: "wrk".into(),
            },
            egress: &crate::egress::EgressFigures {
                direct: crate::egress::Way {
                    fresh: summary(0.5),
                    kept: summary(0.2),
                    per_s: 9000.0,
                },
                proxied: crate::egress::Way {
                    fresh: summary(0.9),
                    kept: summary(0.3),
                    per_s: 7000.0,
                },
            },
            peers: &peers,
        });
        assert!(
            text.contains("| 200 MB | 45.0 | 12.5 | 300.0 | 700.0 | 900.0 | 1100.0 |"),
            "{text}"
        );
        assert!(text.contains("| nook create→first exec | 3 | 50.00 |"), "{text}");
        assert!(
            text.contains(
                "| pull it back (download + gunzip + verify + unpack) | 5.0 | 476.8 MiB | 100 | 1430.5 MiB | 300 |"
            ),
            "{text}"
        );
        assert!(
            text.contains("first exec in a sandbox of the pulled image: 42.0 ms"),
            "{text}"
        );
        assert!(
            text.contains("| unchanged rebuild (every layer cached) | 3 | 12.00 |"),
            "{text}"
        );
        assert!(
            text.contains("| nook pause (every process frozen) | 3 | 3.00 |"),
            "{text}"
        );
        assert!(text.contains("COPY of 503 files (17.0 MiB)"), "{text}");
        assert!(
            text.contains("| E2B code interpreter: `1+1` round trip (warm kernel) | 3 | 9.00 |"),
            "{text}"
        );
        assert!(
            text.contains("| nook background process → first output line | 3 | 4.00 |"),
            "{text}"
        );
        assert!(
            text.contains("| upload | 3 | 1024 MiB | 1074 | 1024 | 537 | 512 |"),
            "{text}"
        );
        assert!(
            text.contains("| download | 3 | 1024 MiB | 537 | 512 | 268 | 256 |"),
            "{text}"
        );
        assert!(
            text.contains("peak RSS (VmHWM): 40.0 MiB before the file transfers, 45.5 MiB after them"),
            "{text}"
        );
        assert!(text.contains("upload 537 MB/s, download 268 MB/s"), "{text}");
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
