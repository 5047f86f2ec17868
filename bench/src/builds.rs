//! Dockerfile build figures: a context of many small files and one larger one, built on `base` with two COPYs and
//! two RUNs. Timed through the API from the start request to the build's `done` event: the first build (every step
//! runs), rebuilds of the unchanged context (every layer from the cache: the figure users feel when they rebuild
//! without changes), and a rebuild after a change to the file the last COPY takes (that COPY and the RUN after it
//! run again, the rest comes from the cache).

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::StreamExt;
use nook_api::{BuildEvent, BuildRequest};
use nook_client::Client;

use crate::interrupt::Interrupt;
use crate::stats::Summary;

/// Files in the generated `app/` directory.
const APP_FILES: usize = 500;
/// Bytes of the one larger file in the context.
const LARGE_FILE_BYTES: usize = 16 << 20;

const DOCKERFILE: &str = "FROM base
WORKDIR /app
COPY app/ ./
RUN find . -type f | wc -l > /app/count.txt && python3 -c 'import sys; print(sys.version)'
ENV MODE=bench
COPY config.txt /etc/bench.txt
RUN cat /etc/bench.txt && ls -l /app/count.txt
";

/// The build series.
#[derive(Debug, Clone)]
pub struct BuildFigures {
    /// Files in the context.
    pub context_files: usize,
    /// Bytes in the context.
    pub context_bytes: u64,
    /// The first build, every step run, milliseconds.
    pub first_ms: f64,
    /// Rebuilds of the unchanged context.
    pub unchanged: Summary,
    /// A rebuild after the last COPY's file changed, milliseconds.
    pub last_copy_changed_ms: f64,
}

/// The context as a tar: the Dockerfile, `app/` with [`APP_FILES`] small files and one large one, and `config.txt`.
fn context(config: &str) -> (Vec<u8>, usize, u64) {
    let mut builder = tar::Builder::new(Vec::new());
    let mut files = 0;
    let mut bytes = 0u64;
    let mut add = |builder: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        header.set_cksum();
        builder
            .append_data(&mut header, path, data)
            .expect("appending to a tar in memory");
        files += 1;
        bytes += data.len() as u64;
    };
    add(&mut builder, "Dockerfile", DOCKERFILE.as_bytes());
    for n in 0..APP_FILES {
        let body = format!("# module {n}\nVALUE = {n}\n").repeat(20);
        add(
            &mut builder,
            &format!("app/pkg{}/module{n}.py", n % 10),
            body.as_bytes(),
        );
    }
    let large: Vec<u8> = (0..LARGE_FILE_BYTES).map(|i| (i * 7 % 251) as u8).collect();
    add(&mut builder, "app/data.bin", &large);
    add(&mut builder, "config.txt", config.as_bytes());
    (builder.into_inner().expect("a tar in memory"), files, bytes)
}

/// Builds `context` as `name` and follows it to its end; the time from the request to the `done` event.
async fn timed_build(client: &Client, name: &str, context: Vec<u8>) -> anyhow::Result<Duration> {
    let request = BuildRequest {
        name: name.into(),
        ..BuildRequest::default()
    };
    let started = Instant::now();
    let build = client
        .start_build(&request, reqwest::Body::from(context))
        .await
        .context("starting a build")?;
    let mut events = client
        .build_events(&build.id, 0, true)
        .await
        .context("following a build")?;
    while let Some(event) = events.next().await {
        match event.context("reading a build's events")? {
            BuildEvent::Done { .. } => return Ok(started.elapsed()),
            BuildEvent::Error { error, .. } => bail!("the bench build failed: {}", error.message),
            _ => {}
        }
    }
    bail!("the build's events ended without a result")
}

/// Runs the build series: a first build, `runs` unchanged rebuilds, and one rebuild after a change.
pub async fn build_series(client: &Client, runs: usize, interrupt: &Interrupt) -> anyhow::Result<BuildFigures> {
    let name = "bench-built:1";
    let (first_context, context_files, context_bytes) = context("first\n");
    eprintln!(
        "building a Dockerfile ({context_files} files, {} MiB of context)...",
        context_bytes >> 20
    );
    let first = timed_build(client, name, first_context.clone()).await?;
    let mut unchanged = Vec::with_capacity(runs);
    for _ in 0..runs {
        interrupt.check()?;
        unchanged.push(timed_build(client, name, first_context.clone()).await?);
    }
    let (changed_context, ..) = context("second\n");
    let changed = timed_build(client, name, changed_context).await?;
    let _ = client.remove_image(name).await;
    Ok(BuildFigures {
        context_files,
        context_bytes,
        first_ms: first.as_secs_f64() * 1000.0,
        unchanged: Summary::of(&unchanged).context("no rebuilds ran")?,
        last_copy_changed_ms: changed.as_secs_f64() * 1000.0,
    })
}
