//! Stateful operations against the data a sandbox wrote: fork (one and ten copies), snapshot, archive and restore
//! time for 0, 50 and 200 MB written, how long the source was frozen for each fork, and live resize latency.
//!
//! The bench's server keeps its data on btrfs (`--storage-image`), where forks and snapshots are copy-on-write; each
//! size gets a fresh source that writes random data (so nothing is deduplicated or compressible) before it is
//! measured. Forks and snapshots are deleted as soon as they are timed.

use std::time::Instant;

use anyhow::Context as _;
use nook_api::{ExecRequest, ForkRequest, ResourceRequest};
use nook_client::Client;

use crate::interrupt::Interrupt;
use crate::nook::Sandboxes;
use crate::stats::Summary;

/// Data sizes written before forks and snapshots, in MB.
pub const SIZES_MB: [u64; 3] = [0, 50, 200];

/// One size's figures.
#[derive(Debug, Clone)]
pub struct SizeFigures {
    /// MB the source wrote.
    pub written_mb: u64,
    /// `POST …/fork` of one copy, until it answered with the fork running, in ms.
    pub fork_one_ms: f64,
    /// How long the source was frozen for that fork, in ms.
    pub frozen_ms: f64,
    /// `POST …/fork` of ten copies, in ms.
    pub fork_ten_ms: f64,
    /// `POST …/snapshot`, until the image was stored (its new layer hashed), in ms.
    pub snapshot_ms: f64,
    /// `POST …/archive` of the stopped source (to the local archive directory), in ms.
    pub archive_ms: f64,
    /// `POST …/start` of the archived source: restored, hash checked, booted, in ms.
    pub restore_start_ms: f64,
}

/// Everything this series measured.
#[derive(Debug, Clone)]
pub struct StatefulFigures {
    /// Per size written.
    pub sizes: Vec<SizeFigures>,
    /// `PATCH …/resources` (CPU and memory, alternately up and down) on a running sandbox.
    pub resize: Summary,
}

/// Runs the series.
pub async fn stateful_series(
    client: &Client,
    resizes: usize,
    sandboxes: &mut Sandboxes,
    interrupt: &Interrupt,
) -> anyhow::Result<StatefulFigures> {
    let mut sizes = Vec::new();
    for written_mb in SIZES_MB {
        interrupt.check()?;
        eprintln!("fork and snapshot of a sandbox that wrote {written_mb} MB...");
        let source = sandboxes.create(client).await?;
        let write = ExecRequest {
            shell: Some(format!(
                "mkdir -p /data && head -c {} /dev/urandom > /data/blob && sync",
                written_mb * 1_000_000
            )),
            ..Default::default()
        };
        let wrote = client.exec(&source, &write).await.context("writing the data")?;
        anyhow::ensure!(wrote.exit_code == Some(0), "writing the data failed: {wrote:?}");

        let t0 = Instant::now();
        let one = client
            .fork_sandbox(&source, &ForkRequest::default())
            .await
            .context("forking one copy")?;
        let fork_one_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let t0 = Instant::now();
        let ten = client
            .fork_sandbox(
                &source,
                &ForkRequest {
                    count: Some(10),
                    ..Default::default()
                },
            )
            .await
            .context("forking ten copies")?;
        let fork_ten_ms = t0.elapsed().as_secs_f64() * 1000.0;
        for fork in one.sandboxes.iter().chain(&ten.sandboxes) {
            sandboxes.record(&fork.id);
            sandboxes.delete(client, &fork.id).await?;
        }
        let image = format!("bench-snapshot-{written_mb}");
        let t0 = Instant::now();
        client.snapshot_sandbox(&source, &image).await.context("snapshotting")?;
        let snapshot_ms = t0.elapsed().as_secs_f64() * 1000.0;
        client.remove_image(&image).await.context("removing the snapshot")?;
        client
            .stop_sandbox(&source)
            .await
            .context("stopping before the archive")?;
        let t0 = Instant::now();
        client.archive_sandbox(&source).await.context("archiving")?;
        let archive_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let t0 = Instant::now();
        client.start_sandbox(&source).await.context("restoring and starting")?;
        let restore_start_ms = t0.elapsed().as_secs_f64() * 1000.0;
        sandboxes.delete(client, &source).await?;
        sizes.push(SizeFigures {
            written_mb,
            fork_one_ms,
            frozen_ms: one.frozen_us as f64 / 1000.0,
            fork_ten_ms,
            snapshot_ms,
            archive_ms,
            restore_start_ms,
        });
    }

    eprintln!("live resizes...");
    let id = sandboxes.create(client).await?;
    let mut samples = Vec::with_capacity(resizes);
    for i in 0..resizes {
        interrupt.check()?;
        let up = i % 2 == 0;
        let request = ResourceRequest {
            cpu: Some(if up { 1.0 } else { 0.5 }),
            memory_mb: Some(if up { 1024 } else { 512 }),
            ..Default::default()
        };
        let t0 = Instant::now();
        client.update_resources(&id, &request).await.context("resizing")?;
        samples.push(t0.elapsed());
    }
    sandboxes.delete(client, &id).await?;
    Ok(StatefulFigures {
        sizes,
        resize: Summary::of(&samples).context("no samples: pass --resizes 1 or more")?,
    })
}
