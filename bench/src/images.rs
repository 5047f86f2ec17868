//! Image transfer figures: nook pushes the `base` image to a registry on loopback (Debian's `docker-registry`, no
//! authentication, storage in the bench's work directory), pulls it back under another name — every layer is new to
//! the store, because a pushed layer is written out afresh and has its own digest — and then times pull finished →
//! first exec in a sandbox of the pulled image.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nook_api::{CreateSandboxRequest, PullRequest, PushRequest, TransferEvent};
use nook_client::Client;

use crate::interrupt::Interrupt;
use crate::nook::{exec_true, Sandboxes};

/// One timed transfer.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    /// Wall time, milliseconds.
    pub took_ms: f64,
    /// Bytes of (gzip) blobs moved.
    pub blob_bytes: u64,
    /// Bytes of file data in the image.
    pub unpacked_bytes: u64,
}

/// The image series, or why it could not run.
#[derive(Debug, Clone)]
pub enum ImageFigures {
    /// It ran.
    Measured {
        /// Push of `base` (export, gzip and upload of every layer).
        push: Transfer,
        /// Pull of what was pushed (download, gunzip, verify and unpack of every layer).
        pull: Transfer,
        /// From the pull's end to the first exec in a sandbox of the pulled image, milliseconds.
        pull_to_first_exec_ms: f64,
    },
    /// It could not run.
    Unavailable(String),
}

struct Registry(Child);

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_registry(work: &Path) -> anyhow::Result<(Registry, String)> {
    let dir = work.join("registry");
    std::fs::create_dir_all(dir.join("storage")).context("making the registry's directory")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let host = format!("127.0.0.1:{port}");
    let config = format!(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    \
         rootdirectory: {}\nhttp:\n  addr: {host}\n",
        dir.join("storage").display()
    );
    std::fs::write(dir.join("config.yml"), config)?;
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("registry.log"))?)
        .spawn()
        .context("starting docker-registry")?;
    let registry = Registry(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&host).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "docker-registry did not listen on {host}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((registry, host))
}

fn blob_bytes(events: &[TransferEvent]) -> u64 {
    events
        .iter()
        .find_map(|event| match event {
            TransferEvent::Resolved { layers, .. } => Some(layers.iter().map(|layer| layer.size).sum()),
            _ => None,
        })
        .unwrap_or(0)
}

/// Push `base`, pull it back, then create a sandbox of it and run `true`.
pub async fn image_transfers(
    client: &Client,
    work: &Path,
    sandboxes: &mut Sandboxes,
    interrupt: &Interrupt,
) -> anyhow::Result<ImageFigures> {
    if Command::new("docker-registry").arg("--version").output().is_err() {
        return Ok(ImageFigures::Unavailable(
            "docker-registry is not installed (scripts/setup.sh installs it)".into(),
        ));
    }
    let (_registry, host) = start_registry(work)?;
    let reference = format!("{host}/bench/base:1");
    interrupt.check()?;
    eprintln!("pushing the base image to {reference}...");
    let base = client.image("base").await.context("looking up the base image")?;
    let mut events = Vec::new();
    let started = Instant::now();
    client
        .push_image(
            &PushRequest {
                name: "base".into(),
                reference: reference.clone(),
            },
            |event| events.push(event.clone()),
        )
        .await
        .context("pushing the base image")?;
    let push = Transfer {
        took_ms: started.elapsed().as_secs_f64() * 1000.0,
        blob_bytes: blob_bytes(&events),
        unpacked_bytes: base.size_bytes,
    };
    interrupt.check()?;
    eprintln!("pulling it back...");
    let mut events = Vec::new();
    let started = Instant::now();
    let pulled = client
        .pull_image(
            &PullRequest {
                reference,
                name: Some("bench-pulled".into()),
            },
            |event| events.push(event.clone()),
        )
        .await
        .context("pulling the pushed image")?;
    let pulled_at = Instant::now();
    let pull = Transfer {
        took_ms: (pulled_at - started).as_secs_f64() * 1000.0,
        blob_bytes: blob_bytes(&events),
        unpacked_bytes: pulled.size_bytes,
    };
    let sandbox = client
        .create_sandbox(&CreateSandboxRequest {
            image: Some("bench-pulled".into()),
            ..Default::default()
        })
        .await
        .context("creating a sandbox of the pulled image")?;
    sandboxes.record(&sandbox.id);
    exec_true(client, &sandbox.id).await?;
    let pull_to_first_exec_ms = pulled_at.elapsed().as_secs_f64() * 1000.0;
    sandboxes.delete(client, &sandbox.id).await?;
    let _ = client.remove_image("bench-pulled").await;
    let _ = client.prune_images().await;
    Ok(ImageFigures::Measured {
        push,
        pull,
        pull_to_first_exec_ms,
    })
}
