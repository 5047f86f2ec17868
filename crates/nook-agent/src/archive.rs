//! Tar streams of file trees, both ways: what `nook cp` of a directory moves.
//!
//! Packing walks the tree without following symlinks (a link is archived as a link) and skips sockets, which tar
//! cannot hold. Unpacking refuses any entry that would land outside the destination (`..`, absolute names, a path
//! through a symlink the archive planted) with an error naming it, and ignores the owners recorded in the archive:
//! everything belongs to the owner the request names, or root. Both run on a blocking thread over a bounded channel,
//! so a tree of any size moves with a few chunks in memory.
//!
//! As with every file operation, all of this happens inside the sandbox's root (see `files`), so even a path the
//! checks missed could only reach the sandbox's own files.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use nook_agent_proto::{
    read_frame, write_frame, write_json, ArchiveWritten, End, FileKind, FrameKind, ProtocolError, MAX_FRAME_LEN,
};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

use crate::files::{io_error, stat, FileError};

/// Size of the archive chunks sent to the client.
const CHUNK: usize = 256 * 1024;

/// Streams `path` (a file, link or directory tree) to the client as a tar archive.
pub async fn read_archive(path: &Path, writer: &mut OwnedWriteHalf) -> Result<Result<(), FileError>, ProtocolError> {
    let info = match stat(path) {
        Ok(info) => info,
        Err(error) => return Ok(Err(error)),
    };
    let name = match path.file_name() {
        Some(name) => PathBuf::from(name),
        None => PathBuf::from("."),
    };
    write_json(writer, FrameKind::Reply, &info).await?;
    let (sender, mut chunks) = mpsc::channel::<Vec<u8>>(4);
    let root = path.to_path_buf();
    let packing = tokio::task::spawn_blocking(move || -> Result<(), FileError> {
        let mut builder = tar::Builder::new(ChunkWriter::new(sender));
        builder.follow_symlinks(false);
        builder.mode(tar::HeaderMode::Complete);
        pack(&mut builder, &root, &name, info.kind)?;
        let mut out = builder
            .into_inner()
            .map_err(|error| io_error("finishing the archive of", &root, error))?;
        out.flush()
            .map_err(|error| io_error("sending the archive of", &root, error))
    });
    let mut sent = 0u64;
    while let Some(chunk) = chunks.recv().await {
        write_frame(writer, FrameKind::FileData, &chunk).await?;
        sent += chunk.len() as u64;
    }
    match packing.await {
        Ok(Ok(())) => {
            write_json(writer, FrameKind::End, &End { offset: sent }).await?;
            Ok(Ok(()))
        }
        Ok(Err(error)) => Ok(Err(error)),
        Err(panic) => Ok(Err(FileError {
            code: "io_error",
            message: format!("packing {} failed: {panic}", path.display()),
        })),
    }
}

/// Appends `path` as `name`, and for a directory everything under it, depth first in name order.
fn pack(builder: &mut tar::Builder<ChunkWriter>, path: &Path, name: &Path, kind: FileKind) -> Result<(), FileError> {
    let mut pending = vec![(path.to_path_buf(), name.to_path_buf(), kind == FileKind::Dir)];
    while let Some((path, name, is_dir)) = pending.pop() {
        if is_dir {
            builder
                .append_dir(&name, &path)
                .map_err(|error| io_error("archiving", &path, error))?;
            let mut children = Vec::new();
            for entry in std::fs::read_dir(&path).map_err(|error| io_error("listing", &path, error))? {
                let entry = entry.map_err(|error| io_error("listing", &path, error))?;
                let file_type = entry
                    .file_type()
                    .map_err(|error| io_error("reading", &entry.path(), error))?;
                if std::os::unix::fs::FileTypeExt::is_socket(&file_type) {
                    continue;
                }
                children.push((entry.path(), name.join(entry.file_name()), file_type.is_dir()));
            }
            // Pushed in reverse so that they pop in name order.
            children.sort_by(|a, b| b.1.cmp(&a.1));
            pending.extend(children);
        } else {
            let metadata = std::fs::symlink_metadata(&path).map_err(|error| io_error("reading", &path, error))?;
            let file_type = metadata.file_type();
            if file_type.is_file() || file_type.is_symlink() {
                builder.append_path_with_name(&path, &name)
            } else {
                // FIFOs and device nodes: a header only. (The tar crate names these by their source path, which
                // is absolute here, so the header is built from the metadata instead.)
                let mut header = tar::Header::new_gnu();
                header.set_metadata_in_mode(&metadata, tar::HeaderMode::Complete);
                header.set_size(0);
                builder.append_data(&mut header, &name, std::io::empty())
            }
            .map_err(|error| io_error("archiving", &path, error))?;
        }
    }
    Ok(())
}

/// Unpacks the tar stream of the client's input frames into the directory `path`.
pub async fn write_archive(
    path: &Path,
    parents: bool,
    owner: Option<(u32, u32)>,
    reader: &mut OwnedReadHalf,
) -> Result<Result<ArchiveWritten, FileError>, ProtocolError> {
    if parents {
        if let Err(error) = std::fs::create_dir_all(path) {
            return Ok(Err(io_error("creating the directory", path, error)));
        }
    }
    match stat(path) {
        Ok(info) if info.kind == FileKind::Dir => {}
        Ok(_) => {
            return Ok(Err(FileError {
                code: "not_a_directory",
                message: format!("{} is not a directory to unpack into", path.display()),
            }))
        }
        Err(error) => return Ok(Err(error)),
    }
    let (sender, chunks) = mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    let destination = path.to_path_buf();
    let unpacking = tokio::task::spawn_blocking(move || unpack(&destination, owner, ChunkReader::new(chunks)));
    loop {
        let frame = read_frame(reader).await?;
        let chunk = match frame {
            Some(frame) if frame.kind == FrameKind::Stdin => Ok(frame.payload),
            Some(frame) if frame.kind == FrameKind::StdinClose => break,
            Some(frame) => return Err(ProtocolError::Unexpected(frame.kind)),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the client went away before the end of the archive",
            )),
        };
        let vanished = chunk.is_err();
        // A send fails once unpacking stopped early (a refused entry): its result says why.
        if sender.send(chunk).await.is_err() || vanished {
            break;
        }
    }
    drop(sender);
    Ok(match unpacking.await {
        Ok(result) => result,
        Err(panic) => Err(FileError {
            code: "io_error",
            message: format!("unpacking into {} failed: {panic}", path.display()),
        }),
    })
}

/// Unpacks entry by entry, refusing any that would land outside `destination`.
fn unpack(destination: &Path, owner: Option<(u32, u32)>, input: ChunkReader) -> Result<ArchiveWritten, FileError> {
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let mut written = ArchiveWritten { entries: 0, bytes: 0 };
    let invalid = |error: std::io::Error| FileError {
        code: "invalid_archive",
        message: format!(
            "the archive for {} is not a valid tar stream: {error}",
            destination.display()
        ),
    };
    for entry in archive.entries().map_err(invalid)? {
        let mut entry = entry.map_err(invalid)?;
        let name = entry.path().map_err(invalid)?.into_owned();
        let size = entry.header().entry_size().unwrap_or(0);
        let unpacked = entry.unpack_in(destination).map_err(|error| FileError {
            // The tar crate refuses a path through a symlink that leads out of the destination with this wording.
            code: if error.to_string().contains("outside of") {
                "invalid_archive"
            } else {
                "io_error"
            },
            message: format!(
                "unpacking {} into {} failed: {error}",
                name.display(),
                destination.display()
            ),
        })?;
        if !unpacked {
            return Err(FileError {
                code: "invalid_archive",
                message: format!(
                    "the archive entry {} would land outside {}; nothing after it was unpacked",
                    name.display(),
                    destination.display()
                ),
            });
        }
        if let Some((uid, gid)) = owner {
            let target = destination.join(name.strip_prefix("/").unwrap_or(&name));
            std::os::unix::fs::lchown(&target, Some(uid), Some(gid))
                .map_err(|error| io_error("changing the owner of", &target, error))?;
        }
        written.entries += 1;
        if entry.header().entry_type().is_file() {
            written.bytes += size;
        }
    }
    Ok(written)
}

/// A `Write` that hands full chunks to the async side.
struct ChunkWriter {
    sender: mpsc::Sender<Vec<u8>>,
    buffer: Vec<u8>,
}

impl ChunkWriter {
    fn new(sender: mpsc::Sender<Vec<u8>>) -> Self {
        Self {
            sender,
            buffer: Vec::with_capacity(CHUNK),
        }
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK));
        self.sender
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = CHUNK.min(MAX_FRAME_LEN) - self.buffer.len();
        let taken = data.len().min(room);
        self.buffer.extend_from_slice(&data[..taken]);
        if self.buffer.len() == CHUNK.min(MAX_FRAME_LEN) {
            self.send()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// A `Read` over the chunks the async side receives.
struct ChunkReader {
    chunks: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    current: Vec<u8>,
    position: usize,
}

impl ChunkReader {
    fn new(chunks: mpsc::Receiver<std::io::Result<Vec<u8>>>) -> Self {
        Self {
            chunks,
            current: Vec::new(),
            position: 0,
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.position == self.current.len() {
            match self.chunks.blocking_recv() {
                Some(chunk) => {
                    self.current = chunk?;
                    self.position = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len() - self.position);
        out[..n].copy_from_slice(&self.current[self.position..self.position + n]);
        self.position += n;
        Ok(n)
    }
}
