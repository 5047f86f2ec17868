//! The nook side of the comparison, measured through the Rust client over loopback HTTP, so every figure includes
//! the API, the control plane, the runner and the in-sandbox agent.
//!
//! * [`create_to_first_exec`]: create a sandbox with the defaults, then exec `true` in it; the time from before the
//!   create call to after the exec answer is one sample (create alone and first exec alone are kept too). The
//!   sandbox is deleted after each sample, outside the timed span.
//! * [`exec_round_trip`]: one sandbox, `exec ["true"]` repeatedly.
//!
//! Each series starts with one untimed warm-up iteration. Every sandbox made is recorded in [`Sandboxes`] until it
//! is deleted, so the caller can delete what is left when a run stops early.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use nook_api::{CreateSandboxRequest, ExecRequest};
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

/// Sandboxes this bench created and has not deleted yet.
#[derive(Debug, Default)]
pub struct Sandboxes {
    live: Vec<String>,
}

impl Sandboxes {
    async fn create(&mut self, client: &Client) -> anyhow::Result<String> {
        let sandbox = client
            .create_sandbox(&CreateSandboxRequest::default())
            .await
            .context("creating a sandbox")?;
        self.live.push(sandbox.id.clone());
        Ok(sandbox.id)
    }

    async fn delete(&mut self, client: &Client, id: &str) -> anyhow::Result<()> {
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
async fn exec_true(client: &Client, id: &str) -> anyhow::Result<()> {
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

/// `n` times (after one warm-up): create a sandbox, exec `true`, delete it (not timed).
pub async fn create_to_first_exec(
    client: &Client,
    n: usize,
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
        let id = sandboxes.create(client).await?;
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
