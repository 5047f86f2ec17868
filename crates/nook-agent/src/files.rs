//! File operations inside the sandbox: streaming read and write, stat, list, mkdir, move, remove.
//!
//! They run in the agent, whose root is the sandbox's root after `pivot_root`: every path, however many `..` or
//! symlinks it holds, resolves inside the sandbox, because nothing of the host is mounted there. Paths must still be
//! absolute and reasonable (no NUL, bounded length), and are normalised lexically so messages name what was meant.
//! Data moves in bounded chunks in both directions; a written file appears whole or not at all (it is written to a
//! hidden sibling and renamed over the target once the client's input ended cleanly, carrying its user metadata
//! from the start: [`crate::metadata`]).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nook_agent_proto::{
    read_frame, write_frame, write_json, End, FileKind, FileStat, FileWrite, FrameKind, ProtocolError, MAX_FRAME_LEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Longest path accepted.
const MAX_PATH: usize = 4096;
/// Most entries one listing returns.
const MAX_LIST_ENTRIES: usize = 100_000;
/// Size of one read from a file being downloaded.
const READ_CHUNK: usize = 256 * 1024;

/// A file operation's failure: a stable code and a sentence.
#[derive(Debug)]
pub struct FileError {
    pub code: &'static str,
    pub message: String,
}

impl FileError {
    fn io(action: &str, path: &Path, error: std::io::Error) -> Self {
        let code = match error.kind() {
            std::io::ErrorKind::NotFound => "not_found",
            std::io::ErrorKind::AlreadyExists => "already_exists",
            std::io::ErrorKind::PermissionDenied => "permission_denied",
            _ if error.raw_os_error() == Some(libc::ENOTDIR) => "not_a_directory",
            _ if error.raw_os_error() == Some(libc::EISDIR) => "is_a_directory",
            _ if error.raw_os_error() == Some(libc::ENOTEMPTY) => "not_empty",
            _ => "io_error",
        };
        Self {
            code,
            message: format!("{action} {} failed: {error}", path.display()),
        }
    }

    fn invalid(message: String) -> Self {
        Self {
            code: "invalid_path",
            message,
        }
    }
}

/// A failed I/O operation on a path, with a stable code.
pub fn io_error(action: &str, path: &Path, error: std::io::Error) -> FileError {
    FileError::io(action, path, error)
}

/// Sets permission bits (a final symlink is followed, as chmod(1) does).
pub fn chmod(path: &Path, mode: u32) -> Result<FileStat, FileError> {
    if mode > 0o7777 {
        return Err(FileError::invalid(format!("mode {mode:o} has bits beyond 7777")));
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| FileError::io("changing the mode of", path, e))?;
    stat(path)
}

/// Sets owner and group (of a symlink itself, never of what it points to).
pub fn chown(path: &Path, uid: u32, gid: u32) -> Result<FileStat, FileError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .map_err(|e| FileError::io("changing the owner of", path, e))?;
    stat(path)
}

/// Checks and normalises a client's path: absolute, no NUL, bounded; `.` and `..` resolved lexically (`..` at the
/// root stays at the root, as the kernel does).
pub fn clean_path(path: &str) -> Result<PathBuf, FileError> {
    if path.is_empty() || path.len() > MAX_PATH || path.contains('\0') {
        return Err(FileError::invalid(format!(
            "path {path:?} is empty, too long or contains NUL"
        )));
    }
    if !path.starts_with('/') {
        return Err(FileError::invalid(format!("path {path:?} must be absolute")));
    }
    let mut clean = PathBuf::from("/");
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::ParentDir => {
                clean.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(clean)
}

/// Metadata of a path, without following a final symlink.
pub fn stat(path: &Path) -> Result<FileStat, FileError> {
    let metadata = std::fs::symlink_metadata(path).map_err(|e| FileError::io("reading the metadata of", path, e))?;
    let file_type = metadata.file_type();
    let kind = if file_type.is_symlink() {
        FileKind::Symlink
    } else if file_type.is_dir() {
        FileKind::Dir
    } else if file_type.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    let symlink_target = (kind == FileKind::Symlink)
        .then(|| {
            std::fs::read_link(path)
                .ok()
                .map(|target| target.to_string_lossy().into_owned())
        })
        .flatten();
    Ok(FileStat {
        path: path.to_string_lossy().into_owned(),
        name: path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        kind,
        size: metadata.len(),
        mode: metadata.permissions().mode() & 0o7777,
        uid: metadata.uid(),
        gid: metadata.gid(),
        modified_ms: metadata.mtime() * 1000 + metadata.mtime_nsec() / 1_000_000,
        symlink_target,
        metadata: crate::metadata::read(path),
    })
}

/// Lists a directory `depth` levels deep, sorted by path, at most [`MAX_LIST_ENTRIES`] entries. Symlinked
/// directories are listed as symlinks, not descended into.
pub fn list(path: &Path, depth: u32) -> Result<Vec<FileStat>, FileError> {
    let root = stat(path)?;
    if root.kind != FileKind::Dir {
        return Err(FileError {
            code: "not_a_directory",
            message: format!("{} is not a directory", path.display()),
        });
    }
    let mut out = Vec::new();
    let mut pending = vec![(path.to_path_buf(), 1u32)];
    while let Some((dir, level)) = pending.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| FileError::io("listing", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| FileError::io("listing", &dir, e))?;
            let entry_stat = match stat(&entry.path()) {
                Ok(entry_stat) => entry_stat,
                // Vanished between readdir and stat: skip it.
                Err(_) => continue,
            };
            if entry_stat.kind == FileKind::Dir && level < depth {
                pending.push((entry.path(), level + 1));
            }
            out.push(entry_stat);
            if out.len() > MAX_LIST_ENTRIES {
                return Err(FileError {
                    code: "too_many_entries",
                    message: format!(
                        "{} holds more than {MAX_LIST_ENTRIES} entries at this depth",
                        path.display()
                    ),
                });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// `mkdir -p`.
pub fn make_dir(path: &Path, owner: Option<(u32, u32)>) -> Result<FileStat, FileError> {
    create_dirs(path, owner)?;
    stat(path)
}

/// `mkdir -p`, giving every directory it creates (not those that existed) to `owner`.
pub fn create_dirs(path: &Path, owner: Option<(u32, u32)>) -> Result<(), FileError> {
    let Some((uid, gid)) = owner else {
        return std::fs::create_dir_all(path).map_err(|e| FileError::io("creating the directory", path, e));
    };
    let missing: Vec<&Path> = path.ancestors().take_while(|dir| !dir.exists()).collect();
    std::fs::create_dir_all(path).map_err(|e| FileError::io("creating the directory", path, e))?;
    for dir in missing {
        std::os::unix::fs::lchown(dir, Some(uid), Some(gid))
            .map_err(|e| FileError::io("changing the owner of", dir, e))?;
    }
    Ok(())
}

/// Renames `from` to `to` (both inside the sandbox).
pub fn move_path(from: &Path, to: &Path) -> Result<FileStat, FileError> {
    std::fs::rename(from, to).map_err(|e| FileError::io(&format!("moving {} to", from.display()), to, e))?;
    stat(to)
}

/// Removes a file or symlink, or a directory (its contents too with `recursive`; symlinks inside are removed, not
/// followed).
pub fn remove(path: &Path, recursive: bool) -> Result<(), FileError> {
    if path == Path::new("/") {
        return Err(FileError::invalid(
            "refusing to remove the sandbox's root directory".into(),
        ));
    }
    let info = stat(path)?;
    let result = match (info.kind, recursive) {
        (FileKind::Dir, true) => std::fs::remove_dir_all(path),
        (FileKind::Dir, false) => std::fs::remove_dir(path),
        _ => std::fs::remove_file(path),
    };
    result.map_err(|e| FileError::io("removing", path, e))
}

/// Streams a file to the client: its stat, its bytes, then an `End` with the count.
pub async fn read_file(path: &Path, writer: &mut OwnedWriteHalf) -> Result<Result<(), FileError>, ProtocolError> {
    let info = match stat(path) {
        Ok(info) if info.kind == FileKind::Dir => {
            return Ok(Err(FileError {
                code: "is_a_directory",
                message: format!("{} is a directory", path.display()),
            }))
        }
        Ok(info) => info,
        Err(error) => return Ok(Err(error)),
    };
    let mut file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        Err(error) => return Ok(Err(FileError::io("opening", path, error))),
    };
    write_json(writer, FrameKind::Reply, &info).await?;
    let mut buffer = vec![0u8; READ_CHUNK.min(MAX_FRAME_LEN)];
    let mut sent = 0u64;
    loop {
        let n = file.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        write_frame(writer, FrameKind::FileData, &buffer[..n]).await?;
        sent += n as u64;
    }
    write_json(writer, FrameKind::End, &End { offset: sent }).await?;
    Ok(Ok(()))
}

/// Receives a file from the client's input frames into a hidden sibling, gives it its owner, mode and metadata,
/// then renames it over `path`. If the client disconnects before closing its input, nothing is left behind.
pub async fn write_file(
    path: &Path,
    write: &FileWrite,
    reader: &mut OwnedReadHalf,
) -> Result<Result<FileStat, FileError>, ProtocolError> {
    let (mode, parents, owner) = (write.mode, write.parents, write.owner);
    if let Some(Err(message)) = write.metadata.as_ref().map(nook_agent_proto::check_metadata) {
        return Ok(Err(FileError {
            code: "invalid_metadata",
            message,
        }));
    }
    let Some(parent) = path.parent() else {
        return Ok(Err(FileError::invalid("cannot write to the root directory".into())));
    };
    if parents {
        if let Err(error) = create_dirs(parent, owner) {
            return Ok(Err(error));
        }
    }
    if std::fs::symlink_metadata(path).is_ok_and(|metadata| metadata.is_dir()) {
        return Ok(Err(FileError {
            code: "is_a_directory",
            message: format!("{} is a directory", path.display()),
        }));
    }
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = parent.join(format!(".{name}.nook-upload-{}", std::process::id() ^ rand_u32()));
    let mut options = tokio::fs::OpenOptions::new();
    options
        .write(true)
        .create_new(true)
        .mode(mode.unwrap_or(0o644) & 0o7777);
    let mut file = match options.open(&temporary).await {
        Ok(file) => file,
        Err(error) => return Ok(Err(FileError::io("creating", path, error))),
    };
    let received = receive_into(&mut file, reader).await;
    let finished = match received {
        Ok(true) => match file.flush().await {
            // A file system without user extended attributes keeps the file without its metadata, as envd does;
            // the answer's stat, read back from the file, shows what was kept.
            Ok(()) => match &write.metadata {
                Some(metadata) => match crate::metadata::write(std::os::fd::AsFd::as_fd(&file), metadata) {
                    Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
                    result => result.map_err(|e| FileError::io("setting the metadata of", path, e)),
                },
                None => Ok(()),
            },
            Err(error) => Err(FileError::io("writing", path, error)),
        },
        Ok(false) => Err(FileError {
            code: "incomplete",
            message: format!("the upload of {} ended before its input was complete", path.display()),
        }),
        Err(error) => {
            let _ = tokio::fs::remove_file(&temporary).await;
            return Err(error);
        }
    };
    drop(file);
    if let Err(error) = finished {
        let _ = tokio::fs::remove_file(&temporary).await;
        return Ok(Err(error));
    }
    if let Some((uid, gid)) = owner {
        if let Err(error) = std::os::unix::fs::lchown(&temporary, Some(uid), Some(gid)) {
            let _ = tokio::fs::remove_file(&temporary).await;
            return Ok(Err(FileError::io("changing the owner of", path, error)));
        }
    }
    if let Some(mode) = mode {
        // The umask may have narrowed the mode at creation (and chown clears setuid bits).
        let _ = std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode & 0o7777));
    }
    if let Err(error) = tokio::fs::rename(&temporary, path).await {
        let _ = tokio::fs::remove_file(&temporary).await;
        return Ok(Err(FileError::io("replacing", path, error)));
    }
    Ok(stat(path))
}

/// Copies input frames into the file; `Ok(true)` when the client closed its input, `Ok(false)` when it vanished.
async fn receive_into(file: &mut tokio::fs::File, reader: &mut OwnedReadHalf) -> Result<bool, ProtocolError> {
    loop {
        let Some(frame) = read_frame(reader).await? else {
            return Ok(false);
        };
        match frame.kind {
            FrameKind::Stdin => file.write_all(&frame.payload).await?,
            FrameKind::StdinClose => return Ok(true),
            other => return Err(ProtocolError::Unexpected(other)),
        }
    }
}

fn rand_u32() -> u32 {
    let mut bytes = [0u8; 4];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
    unsafe {
        libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0);
    }
    u32::from_ne_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_absolute_and_normalised() {
        assert_eq!(clean_path("/a/./b/../c").unwrap(), Path::new("/a/c"));
        assert_eq!(clean_path("/../../etc/passwd").unwrap(), Path::new("/etc/passwd"));
        assert_eq!(clean_path("/").unwrap(), Path::new("/"));
        assert!(clean_path("relative/path").is_err());
        assert!(clean_path("").is_err());
        assert!(clean_path("/a\0b").is_err());
        assert!(clean_path(&format!("/{}", "a".repeat(5000))).is_err());
    }

    #[test]
    fn listing_is_sorted_and_depth_bounded() {
        let dir = std::env::temp_dir().join(format!("nook-files-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a/b/c")).unwrap();
        std::fs::write(dir.join("a/file"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc", dir.join("link")).unwrap();
        let one = list(&dir, 1).unwrap();
        let names: Vec<&str> = one.iter().map(|entry| entry.name.as_str()).collect();
        assert_eq!(names, ["a", "link"]);
        assert_eq!(one[1].kind, FileKind::Symlink);
        assert_eq!(one[1].symlink_target.as_deref(), Some("/etc"));
        let two = list(&dir, 2).unwrap();
        assert_eq!(two.len(), 4);
        assert!(remove(&dir.join("a"), false).is_err());
        remove(&dir, true).unwrap();
        assert!(!dir.exists());
    }
}
