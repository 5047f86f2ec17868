//! `nook cp`: files and directory trees between the host and a sandbox, with `docker cp`'s naming rules.
//!
//! A file moves as a raw byte stream; a directory as a tar stream, packed and unpacked on the fly (nothing is held
//! whole on either side). Naming, as `docker cp`: copying `dir` to a destination that is an existing directory puts
//! it inside (`dest/dir`, merged with what is there); to a path that does not exist creates that path with the
//! directory's contents. Archives coming out of a sandbox are treated as hostile when unpacked on the host: entries
//! that would land outside the destination are refused, and setuid/setgid bits and owners are dropped.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::Bytes;
use futures::StreamExt;
use nook_api::FileKind;
use nook_client::Client;
use tokio::sync::mpsc;

use crate::table;

/// Size of the chunks a packed directory is sent in.
const CHUNK: usize = 1 << 20;

/// `SANDBOX:/path` → (sandbox, path); a host path → None.
fn sandbox_path(text: &str) -> Option<(&str, &str)> {
    let (sandbox, path) = text.split_once(':')?;
    (!sandbox.is_empty() && !sandbox.contains('/') && path.starts_with('/')).then_some((sandbox, path))
}

/// Runs `nook cp SOURCE DESTINATION`.
pub async fn copy(client: &Client, source: &str, destination: &str) -> anyhow::Result<u8> {
    match (sandbox_path(source), sandbox_path(destination)) {
        (None, Some((sandbox, path))) => {
            let source = PathBuf::from(source);
            let metadata =
                std::fs::symlink_metadata(&source).with_context(|| format!("reading {}", source.display()))?;
            if metadata.is_dir() {
                upload_tree(client, &source, sandbox, path).await
            } else {
                upload_file(client, &source, &metadata, sandbox, path).await
            }
        }
        (Some((sandbox, path)), None) => {
            let info = client.stat_file(sandbox, path).await?;
            if info.kind == FileKind::Dir {
                download_tree(client, sandbox, path, Path::new(destination)).await
            } else {
                download_file(client, sandbox, path, Path::new(destination)).await
            }
        }
        (Some(_), Some(_)) => bail!("copy between two sandboxes through the host: cp to a local path first"),
        (None, None) => bail!("one side must be SANDBOX:/absolute/path"),
    }
}

/// Last component of a path, for naming what is copied.
fn base_name(path: &Path) -> anyhow::Result<String> {
    Ok(path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?
        .to_string_lossy()
        .into_owned())
}

async fn upload_file(
    client: &Client,
    source: &Path,
    metadata: &std::fs::Metadata,
    sandbox: &str,
    path: &str,
) -> anyhow::Result<u8> {
    let remote_dir = path.ends_with('/') || remote_is_dir(client, sandbox, path).await?;
    let path = if remote_dir {
        format!("{}/{}", path.trim_end_matches('/'), base_name(source)?)
    } else {
        path.to_string()
    };
    let file = tokio::fs::File::open(source)
        .await
        .with_context(|| format!("opening {}", source.display()))?;
    let mode = std::os::unix::fs::PermissionsExt::mode(&metadata.permissions()) & 0o7777;
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(file, CHUNK));
    let info = client.upload_file(sandbox, &path, body, Some(mode), true).await?;
    eprintln!("copied {} to {sandbox}:{}", table::bytes(info.size), info.path);
    Ok(0)
}

async fn remote_is_dir(client: &Client, sandbox: &str, path: &str) -> anyhow::Result<bool> {
    match client.stat_file(sandbox, path).await {
        Ok(info) => Ok(info.kind == FileKind::Dir),
        Err(error) if error.code() == Some("not_found") => Ok(false),
        Err(error) => Err(error.into()),
    }
}

/// Packs the host directory `source` on a blocking thread and streams it into the sandbox.
async fn upload_tree(client: &Client, source: &Path, sandbox: &str, path: &str) -> anyhow::Result<u8> {
    // Into an existing directory as `dir/…`; otherwise as the new path itself, unpacked in its parent.
    let (directory, name) = if path.ends_with('/') || remote_is_dir(client, sandbox, path).await? {
        (path.trim_end_matches('/').to_string(), base_name(source)?)
    } else {
        let remote = Path::new(path);
        let parent = remote.parent().context("cannot replace the sandbox's root directory")?;
        (parent.to_string_lossy().into_owned(), base_name(remote)?)
    };
    let (sender, receiver) = mpsc::channel::<std::io::Result<Bytes>>(4);
    let root = source.to_path_buf();
    let packing = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut builder = tar::Builder::new(ChunkWriter::new(sender.clone()));
        builder.follow_symlinks(false);
        builder.mode(tar::HeaderMode::Complete);
        let result = builder
            .append_dir_all(&name, &root)
            .and_then(|()| builder.into_inner())
            .and_then(|mut writer| writer.flush());
        if let Err(error) = &result {
            // Break the upload, so that the server sees an incomplete archive rather than a short one.
            let _ = sender.blocking_send(Err(std::io::Error::other(error.to_string())));
        }
        result.with_context(|| format!("packing {}", root.display()))
    });
    let chunks = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    });
    let uploaded = client
        .upload_archive(sandbox, &directory, reqwest::Body::wrap_stream(chunks), true, None)
        .await;
    packing.await.context("the packing thread failed")??;
    let result = uploaded?;
    eprintln!(
        "copied {} entries ({}) to {sandbox}:{directory}",
        result.entries,
        table::bytes(result.bytes)
    );
    Ok(0)
}

async fn download_file(client: &Client, sandbox: &str, path: &str, destination: &Path) -> anyhow::Result<u8> {
    let mut destination = destination.to_path_buf();
    if destination.is_dir() {
        destination.push(base_name(Path::new(path))?);
    }
    let mut stream = client.download_file(sandbox, path).await?;
    let partial = destination.with_extension("nook-partial");
    let mut file = tokio::fs::File::create(&partial)
        .await
        .with_context(|| format!("creating {}", partial.display()))?;
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(error) => {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(error.into());
            }
        };
        total += chunk.len() as u64;
        tokio::io::AsyncWriteExt::write_all(&mut file, &chunk).await?;
    }
    tokio::io::AsyncWriteExt::flush(&mut file).await?;
    tokio::fs::rename(&partial, &destination).await?;
    eprintln!("copied {} to {}", table::bytes(total), destination.display());
    Ok(0)
}

/// Streams a sandbox directory's archive and unpacks it on a blocking thread as it arrives.
async fn download_tree(client: &Client, sandbox: &str, path: &str, destination: &Path) -> anyhow::Result<u8> {
    let name = match Path::new(path).file_name() {
        Some(name) => name.to_owned(),
        None => bail!("copy the sandbox's root directory by naming what is in it"),
    };
    // Into an existing directory (merged), or as a new path: unpacked beside it first, then renamed into place.
    let (unpack_into, rename_to) = if destination.is_dir() {
        (destination.to_path_buf(), None)
    } else if destination.exists() {
        bail!("{} exists and is not a directory", destination.display());
    } else {
        let parent = match destination.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let staging = parent.join(format!(".nook-cp-{}", std::process::id()));
        std::fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
        (staging, Some(destination.to_path_buf()))
    };
    let (_, mut stream) = client.download_archive(sandbox, path).await?;
    let (sender, receiver) = mpsc::channel::<std::io::Result<Bytes>>(4);
    let target = unpack_into.clone();
    let unpacking = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        let mut archive = tar::Archive::new(ChunkReader::new(receiver));
        // What comes out of a sandbox is hostile: no setuid/setgid bits, no owners, nothing outside the target.
        archive.set_preserve_permissions(false);
        archive.set_preserve_ownerships(false);
        archive.set_preserve_mtime(true);
        archive.set_unpack_xattrs(false);
        archive.set_overwrite(true);
        let mut entries = 0;
        for entry in archive.entries()? {
            let mut entry = entry?;
            if !entry.unpack_in(&target)? {
                let name = entry.path().map(|p| p.display().to_string()).unwrap_or_default();
                return Err(std::io::Error::other(format!(
                    "the archive entry {name} would land outside {}",
                    target.display()
                )));
            }
            entries += 1;
        }
        Ok(entries)
    });
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(std::io::Error::other);
        total += chunk.as_ref().map_or(0, |chunk| chunk.len() as u64);
        let broken = chunk.is_err();
        if sender.send(chunk).await.is_err() || broken {
            break;
        }
    }
    drop(sender);
    let unpacked = unpacking.await.context("the unpacking thread failed")?;
    let entries = match unpacked {
        Ok(entries) => entries,
        Err(error) => {
            if rename_to.is_some() {
                let _ = std::fs::remove_dir_all(&unpack_into);
            }
            return Err(anyhow::Error::from(error).context(format!("copying {sandbox}:{path}")));
        }
    };
    let final_path = match rename_to {
        Some(final_path) => {
            let renamed = std::fs::rename(unpack_into.join(&name), &final_path);
            let _ = std::fs::remove_dir_all(&unpack_into);
            renamed.with_context(|| format!("moving the copy into place at {}", final_path.display()))?;
            final_path
        }
        None => unpack_into.join(&name),
    };
    eprintln!(
        "copied {entries} entries ({} archived) to {}",
        table::bytes(total),
        final_path.display()
    );
    Ok(0)
}

/// A `Write` that hands full chunks to the async side.
pub(crate) struct ChunkWriter {
    sender: mpsc::Sender<std::io::Result<Bytes>>,
    buffer: Vec<u8>,
    sent: Option<Arc<AtomicU64>>,
}

impl ChunkWriter {
    fn new(sender: mpsc::Sender<std::io::Result<Bytes>>) -> Self {
        Self {
            sender,
            buffer: Vec::with_capacity(CHUNK),
            sent: None,
        }
    }

    /// A writer that adds the bytes it hands on to `sent` (for progress).
    pub(crate) fn counted(sender: mpsc::Sender<std::io::Result<Bytes>>, sent: Arc<AtomicU64>) -> Self {
        Self {
            sent: Some(sent),
            ..Self::new(sender)
        }
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let taken = data.len().min(CHUNK - self.buffer.len());
        self.buffer.extend_from_slice(&data[..taken]);
        if self.buffer.len() == CHUNK {
            self.flush()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK)));
        if let Some(sent) = &self.sent {
            sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        self.sender
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the upload ended"))
    }
}

/// A `Read` over the chunks the async side receives.
struct ChunkReader {
    chunks: mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
}

impl ChunkReader {
    fn new(chunks: mpsc::Receiver<std::io::Result<Bytes>>) -> Self {
        Self {
            chunks,
            current: Bytes::new(),
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}
