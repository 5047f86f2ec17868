//! The nook side of the comparison, measured through the Rust client over loopback HTTP, so every figure includes
//! the API, the control plane, the runner and the in-sandbox agent.
//!
//! * [`create_to_first_exec`]: create a sandbox with the defaults, then exec `true` in it; the time from before the
//!   create call to after the exec answer is one sample (create alone and first exec alone are kept too). The
//!   sandbox is deleted after each sample, outside the timed span.
//! * [`exec_round_trip`]: one sandbox, `exec ["true"]` repeatedly.
//! * [`background_first_output`]: one sandbox; start `echo ready` as a background process and follow its output
//!   from offset 0; the time from before the start call to the first `stdout` event is one sample. The rest of the
//!   stream (to the process's exit) is read untimed before the next sample.
//! * [`file_throughput`]: one sandbox; upload a file generated on the fly in 1 MiB chunks (the whole file is never
//!   held in memory), then download it counting the bytes; each transfer is timed from before the call to its last
//!   byte (upload: the server's answer).
//!
//! Each series starts with one untimed warm-up iteration (for the file series, a 1 MiB upload and download). Every sandbox made is recorded in [`Sandboxes`] until it
//! is deleted, so the caller can delete what is left when a run stops early.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use futures::StreamExt as _;
use nook_api::{CreateSandboxRequest, ExecEvent, ExecRequest};
use nook_client::Client;

use crate::interrupt::Interrupt;
use crate::stats::Summary;

/// The figures of the create→first exec series.
#[derive(Debug, Clone, Copy)]
pub struct CreateFigures {
    /// Create call plus first exec.
    pub total: Summary,
    /// The create call alone.
    pub create: Summary,
    /// The first exec alone.
    pub first_exec: Summary,
}

/// The figures of the file throughput series.
#[derive(Debug, Clone, Copy)]
pub struct FileFigures {
    /// Bytes per transfer.
    pub bytes: u64,
    /// Upload durations.
    pub upload: Summary,
    /// Download durations.
    pub download: Summary,
}

/// One MiB: the size of the chunks an upload body is made of.
const MIB: u64 = 1 << 20;

/// Where the file series writes in its sandbox.
const FILE_PATH: &str = "/tmp/bench.bin";

/// Sandboxes this bench created and has not deleted yet.
#[derive(Debug, Default)]
pub struct Sandboxes {
    live: Vec<String>,
}

impl Sandboxes {
    pub async fn create(&mut self, client: &Client) -> anyhow::Result<String> {
        self.create_with(client, &CreateSandboxRequest::default()).await
    }

    /// Creates a sandbox from this request.
    pub async fn create_with(&mut self, client: &Client, request: &CreateSandboxRequest) -> anyhow::Result<String> {
        let sandbox = client.create_sandbox(request).await.context("creating a sandbox")?;
        self.live.push(sandbox.id.clone());
        Ok(sandbox.id)
    }

    /// Records a sandbox made another way (through the E2B API), so that it is deleted at the end too.
    pub fn record(&mut self, id: &str) {
        self.live.push(id.to_string());
    }

    /// Deletes one of this bench's sandboxes.
    pub async fn delete(&mut self, client: &Client, id: &str) -> anyhow::Result<()> {
        client
            .delete_sandbox(id)
            .await
            .with_context(|| format!("deleting sandbox {id}"))?;
        self.live.retain(|live| live != id);
        Ok(())
    }

    /// Deletes every sandbox the server knows (they are all this bench's: the server is its own). Returns a line
    /// per sandbox that could not be deleted.
    pub async fn delete_all(&mut self, client: &Client) -> Vec<String> {
        let mut ids = std::mem::take(&mut self.live);
        match client.list_sandboxes(None, &Default::default()).await {
            Ok(listed) => {
                for sandbox in listed {
                    if !ids.contains(&sandbox.id) {
                        ids.push(sandbox.id);
                    }
                }
            }
            Err(error) => eprintln!("could not list the server's sandboxes: {error}"),
        }
        let mut failures = Vec::new();
        for id in ids {
            eprintln!("deleting sandbox {id}...");
            if let Err(error) = client.delete_sandbox(&id).await {
                if error.code() != Some("not_found") {
                    failures.push(format!("{id}: {error}"));
                }
            }
        }
        failures
    }
}

/// `exec ["true"]` in `id`, failing unless it exits 0.
pub async fn exec_true(client: &Client, id: &str) -> anyhow::Result<()> {
    let request = ExecRequest {
        command: vec!["true".into()],
        ..Default::default()
    };
    let result = client
        .exec(id, &request)
        .await
        .with_context(|| format!("exec `true` in sandbox {id}"))?;
    if result.exit_code != Some(0) {
        bail!(
            "exec `true` in sandbox {id} did not exit 0 (exit code {:?}, signal {:?}); stderr: {}",
            result.exit_code,
            result.signal,
            result.stderr.trim()
        );
    }
    Ok(())
}

/// `n` times (after one warm-up): create a sandbox with this network policy (the default when `None`: an interface
/// and any public address), exec `true`, delete it (not timed).
pub async fn create_to_first_exec(
    client: &Client,
    n: usize,
    network: Option<nook_api::NetworkPolicy>,
    sandboxes: &mut Sandboxes,
    interrupt: &Interrupt,
) -> anyhow::Result<CreateFigures> {
    let mut total = Vec::with_capacity(n);
    let mut create = Vec::with_capacity(n);
    let mut first_exec = Vec::with_capacity(n);
    for i in 0..=n {
        interrupt.check()?;
        if i == 0 {
            eprintln!("creating warm-up sandbox (not timed)...");
        } else {
            eprintln!("creating sandbox {i}/{n}...");
        }
        let t0 = Instant::now();
        let request = CreateSandboxRequest {
            network: network.clone(),
            ..Default::default()
        };
        let id = sandboxes.create_with(client, &request).await?;
        let created = Instant::now();
        exec_true(client, &id).await?;
        let t1 = Instant::now();
        sandboxes.delete(client, &id).await?;
        if i > 0 {
            total.push(t1 - t0);
            create.push(created - t0);
            first_exec.push(t1 - created);
        }
    }
    let summary = |samples: &[Duration]| Summary::of(samples).context("no samples: pass --sandboxes 1 or more");
    Ok(CreateFigures {
        total: summary(&total)?,
        create: summary(&create)?,
        first_exec: summary(&first_exec)?,
    })
}

/// One sandbox, `n` timed `exec ["true"]` calls (after one warm-up exec); the sandbox is deleted afterwards.
pub async fn exec_round_trip(
    client: &Client,
    n: usize,
    sandboxes: &mut Sandboxes,
    interrupt: &Interrupt,
) -> anyhow::Result<Summary> {
    eprintln!("creating the sandbox for the exec round trips...");
    let id = sandboxes.create(client).await?;
    exec_true(client, &id).await?;
    let mut samples = Vec::with_capacity(n);
    for i in 1..=n {
        interrupt.check()?;
        if i % 50 == 0 || i == n {
            eprintln!("exec {i}/{n}...");
        }
        let t0 = Instant::now();
        exec_true(client, &id).await?;
        samples.push(t0.elapsed());
    }
    sandboxes.delete(client, &id).await?;
    Summary::of(&samples).context("no samples: pass --execs 1 or more")
}

/// Pause and resume latencies.
#[derive(Debug, Clone)]
pub struct PauseFigures {
    /// `POST …/pause` until its answer (every process frozen).
    pub pause: Summary,
    /// `POST …/resume` until its answer (every process thawed).
    pub resume: Summary,
}

/// One sandbox running a busy shell loop, paused and resumed `n` times; each call timed through the API.
pub async fn pause_resume(
    client: &Client,
    n: usize,
    sandboxes: &mut Sandboxes,
    interrupt: &Interrupt,
) -> anyhow::Result<PauseFigures> {
    eprintln!("creating the sandbox for pause and resume...");
    let id = sandboxes.create(client).await?;
    let busy = ExecRequest {
        shell: Some("while true; do :; done".into()),
        ..Default::default()
    };
    client
        .start_process(&id, &busy)
        .await
        .context("starting a busy loop to pause")?;
    let (mut pauses, mut resumes) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 1..=n {
        interrupt.check()?;
        if i % 50 == 0 || i == n {
            eprintln!("pause and resume {i}/{n}...");
        }
        let t0 = Instant::now();
        client.pause_sandbox(&id).await.context("pausing")?;
        pauses.push(t0.elapsed());
        let t0 = Instant::now();
        client.resume_sandbox(&id).await.context("resuming")?;
        resumes.push(t0.elapsed());
    }
    sandboxes.delete(client, &id).await?;
    Ok(PauseFigures {
        pause: Summary::of(&pauses).context("no samples: pass --pauses 1 or more")?,
        resume: Summary::of(&resumes).context("no samples")?,
    })
}

/// One sandbox, `n` timed starts of the background process `echo ready` (after one warm-up), each timed to the
/// first `stdout` event of its followed output; the sandbox is deleted afterwards.
pub async fn background_first_output(
    client: &Client,
    n: usize,
    sandboxes: &mut Sandboxes,
    interrupt: &Interrupt,
) -> anyhow::Result<Summary> {
    eprintln!("creating the sandbox for the background processes...");
    let id = sandboxes.create(client).await?;
    exec_true(client, &id).await?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..=n {
        interrupt.check()?;
        if i == 0 {
            eprintln!("background process warm-up (not timed)...");
        } else if i % 25 == 0 || i == n {
            eprintln!("background process {i}/{n}...");
        }
        let elapsed = echo_to_first_output(client, &id).await?;
        if i > 0 {
            samples.push(elapsed);
        }
    }
    sandboxes.delete(client, &id).await?;
    Summary::of(&samples).context("no samples: pass --processes 1 or more")
}

/// Starts `echo ready` in the background in `id` and follows its output: returns the time from before the start
/// call to the first `stdout` event, after reading the rest of the stream (untimed) up to an exit with code 0.
async fn echo_to_first_output(client: &Client, id: &str) -> anyhow::Result<Duration> {
    let request = ExecRequest {
        command: vec!["echo".into(), "ready".into()],
        ..Default::default()
    };
    let t0 = Instant::now();
    let process = client
        .start_process(id, &request)
        .await
        .with_context(|| format!("starting `echo ready` in the background in sandbox {id}"))?;
    let pid = process.pid;
    let what = || format!("the output of background process {pid} (`echo ready`) in sandbox {id}");
    let mut events = client
        .process_output(id, pid, 0, true)
        .await
        .with_context(|| format!("following {}", what()))?;
    let mut elapsed = None;
    while let Some(event) = events.next().await {
        match event.with_context(|| format!("reading {}", what()))? {
            ExecEvent::Stdout { data, .. } if elapsed.is_none() && !data.is_empty() => elapsed = Some(t0.elapsed()),
            ExecEvent::Exit { status, .. } => {
                let Some(elapsed) = elapsed else {
                    bail!("{} ended ({status:?}) before any standard output", what());
                };
                if status.exit_code != Some(0) {
                    bail!("background process {pid} (`echo ready`) in sandbox {id} did not exit 0: {status:?}");
                }
                return Ok(elapsed);
            }
            ExecEvent::Error { code, message } => bail!("{} failed: {message} ({code})", what()),
            _ => {}
        }
    }
    bail!("{} ended without an exit event", what())
}

/// One sandbox with `cat` on a pseudo-terminal, attached over the terminal WebSocket: `n` timed keystrokes, each
/// from sending one byte to seeing the terminal echo it (after one warm-up); the sandbox is deleted afterwards.
pub async fn terminal_echo(
    client: &Client,
    n: usize,
    sandboxes: &mut Sandboxes,
    interrupt: &Interrupt,
) -> anyhow::Result<Summary> {
    eprintln!("creating the sandbox for the terminal keystrokes...");
    let id = sandboxes.create(client).await?;
    let request = ExecRequest {
        command: vec!["cat".into()],
        pty: Some(nook_api::PtySize { cols: 80, rows: 24 }),
        ..Default::default()
    };
    let process = client
        .start_process(&id, &request)
        .await
        .with_context(|| format!("starting `cat` on a terminal in sandbox {id}"))?;
    let (mut writer, mut reader) = client
        .terminal(&id, process.pid, 0)
        .await
        .with_context(|| format!("attaching to the terminal of `cat` in sandbox {id}"))?
        .split();
    let mut samples = Vec::with_capacity(n);
    for i in 0..=n {
        interrupt.check()?;
        if i % 50 == 0 && i > 0 {
            eprintln!("keystroke {i}/{n}...");
        }
        // Letters in turn, so that each echo is told apart from the last.
        let key = b'a' + (i % 26) as u8;
        let t0 = Instant::now();
        writer.input(vec![key]).await.context("typing into the terminal")?;
        loop {
            match reader.next().await {
                Some(Ok(nook_client::TerminalOutput::Stdout(bytes))) if bytes.contains(&key) => break,
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error).context("reading the terminal"),
                None => bail!("the terminal of `cat` in sandbox {id} closed"),
            }
        }
        if i > 0 {
            samples.push(t0.elapsed());
        }
    }
    sandboxes.delete(client, &id).await?;
    Summary::of(&samples).context("no samples: pass --keystrokes 1 or more")
}

/// One sandbox, `runs` timed uploads of a `mib` MiB file each followed by a timed download of it (after a 1 MiB
/// warm-up of each); the sandbox is deleted afterwards.
pub async fn file_throughput(
    client: &Client,
    mib: u64,
    runs: usize,
    sandboxes: &mut Sandboxes,
    interrupt: &Interrupt,
) -> anyhow::Result<FileFigures> {
    eprintln!("creating the sandbox for the file transfers...");
    let id = sandboxes.create(client).await?;
    exec_true(client, &id).await?;
    eprintln!("file transfer warm-up: 1 MiB up and down (not timed)...");
    upload(client, &id, 1).await?;
    download(client, &id, MIB).await?;
    let bytes = mib * MIB;
    let mut uploads = Vec::with_capacity(runs);
    let mut downloads = Vec::with_capacity(runs);
    for i in 1..=runs {
        interrupt.check()?;
        eprint!("file run {i}/{runs}: uploading {mib} MiB...");
        let took = upload(client, &id, mib).await?;
        eprint!(" {}; downloading...", rate(bytes, took));
        uploads.push(took);
        interrupt.check()?;
        let took = download(client, &id, bytes).await?;
        eprintln!(" {}", rate(bytes, took));
        downloads.push(took);
    }
    sandboxes.delete(client, &id).await?;
    let summary = |samples: &[Duration]| Summary::of(samples).context("no samples: pass --file-runs 1 or more");
    Ok(FileFigures {
        bytes,
        upload: summary(&uploads)?,
        download: summary(&downloads)?,
    })
}

/// Uploads a `mib` MiB file to [`FILE_PATH`] in `id`, generating its body in 1 MiB chunks as it is sent, and checks
/// the size the server reports. Returns the time from before the call to the server's answer.
async fn upload(client: &Client, id: &str, mib: u64) -> anyhow::Result<Duration> {
    // One 1 MiB chunk of cheap deterministic bytes, sent `mib` times (cloning `Bytes` shares it, copying nothing).
    let chunk = Bytes::from((0..MIB).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let body = futures::stream::iter((0..mib).map(move |_| Ok::<_, Infallible>(chunk.clone())));
    let t0 = Instant::now();
    let info = client
        .upload_file(id, FILE_PATH, reqwest::Body::wrap_stream(body), None, false)
        .await
        .with_context(|| format!("uploading {mib} MiB to {FILE_PATH} in sandbox {id}"))?;
    let took = t0.elapsed();
    if info.size != mib * MIB {
        bail!(
            "uploaded {} bytes to {FILE_PATH} in sandbox {id} but the server reports {}",
            mib * MIB,
            info.size
        );
    }
    Ok(took)
}

/// Downloads [`FILE_PATH`] from `id`, counting its bytes, and checks there are `expected`. Returns the time from
/// before the call to the last byte.
async fn download(client: &Client, id: &str, expected: u64) -> anyhow::Result<Duration> {
    let what = || format!("downloading {FILE_PATH} from sandbox {id}");
    let t0 = Instant::now();
    let mut chunks = client.download_file(id, FILE_PATH).await.with_context(what)?;
    let mut received = 0u64;
    while let Some(chunk) = chunks.next().await {
        received += chunk.with_context(what)?.len() as u64;
    }
    let took = t0.elapsed();
    if received != expected {
        bail!("{}: received {received} bytes, expected {expected}", what());
    }
    Ok(took)
}

/// Megabytes (10^6 bytes) per second of `bytes` moved in `took_ms` milliseconds.
pub fn megabytes_per_s(bytes: u64, took_ms: f64) -> f64 {
    bytes as f64 / (took_ms / 1000.0) / 1e6
}

/// Mebibytes (2^20 bytes) per second of `bytes` moved in `took_ms` milliseconds.
pub fn mebibytes_per_s(bytes: u64, took_ms: f64) -> f64 {
    bytes as f64 / (took_ms / 1000.0) / MIB as f64
}

/// "1.23 s, 873 MB/s" for a progress line.
fn rate(bytes: u64, took: Duration) -> String {
    let ms = took.as_secs_f64() * 1000.0;
    format!("{:.2} s, {:.0} MB/s", ms / 1000.0, megabytes_per_s(bytes, ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_units() {
        // 1 GiB in 2 s.
        let bytes = 1024 * MIB;
        assert!((megabytes_per_s(bytes, 2000.0) - 536.870_912).abs() < 1e-6);
        assert!((mebibytes_per_s(bytes, 2000.0) - 512.0).abs() < 1e-9);
        assert_eq!(rate(bytes, Duration::from_secs(2)), "2.00 s, 537 MB/s");
    }
}
