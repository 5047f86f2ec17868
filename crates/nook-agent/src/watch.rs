//! Watching a directory for changes with inotify, streamed to the client as [`WatchEvent`] frames.
//!
//! One inotify instance per watch request, read through the runtime (no polling). A recursive watch adds every
//! existing subdirectory at the start and every directory created later as its `create` event arrives, up to
//! [`MAX_WATCHES`] directories; what a new directory already holds when its watch is added is reported as created,
//! so `mkdir d && touch d/f` never loses `d/f`. When the client disconnects the instance is closed and every watch goes with it. A
//! kernel queue overflow is reported as an `overflow` event so the client knows to re-list.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nook_agent_proto::{write_json, FrameKind, ProtocolError, WatchEvent, WatchEventKind};
use tokio::io::unix::AsyncFd;
use tokio::io::AsyncReadExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::files::FileError;

/// Most directories one recursive watch follows.
const MAX_WATCHES: usize = 8192;

const MASK: u32 = libc::IN_CREATE
    | libc::IN_CLOSE_WRITE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_ONLYDIR;

struct Inotify {
    fd: AsyncFd<OwnedFd>,
    /// Watch descriptor → directory.
    dirs: HashMap<i32, PathBuf>,
}

impl Inotify {
    fn new() -> std::io::Result<Self> {
        // SAFETY: inotify_init1 with valid flags returns a new descriptor or -1.
        let raw = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an `OwnedFd` stays open and keeps its number until it is dropped with the `AsyncFd`.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        Ok(Self {
            fd,
            dirs: HashMap::new(),
        })
    }

    fn add(&mut self, dir: &Path) -> std::io::Result<()> {
        if self.dirs.len() >= MAX_WATCHES {
            return Err(std::io::Error::other(format!(
                "more than {MAX_WATCHES} directories to watch"
            )));
        }
        let path = CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        // SAFETY: valid descriptor and NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.get_ref().as_raw_fd(), path.as_ptr(), MASK) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.dirs.insert(wd, dir.to_path_buf());
        Ok(())
    }

    /// Adds `dir` and, recursively, its subdirectories (not following symlinks). Returns every entry found under
    /// `dir` with whether it is a directory: for a directory that appeared while the watch runs, those entries were
    /// made before its watch existed, so their events were never queued.
    fn add_tree(&mut self, dir: &Path) -> std::io::Result<Vec<(PathBuf, bool)>> {
        self.add(dir)?;
        let mut found = Vec::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(dir) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let is_dir = entry.file_type().is_ok_and(|kind| kind.is_dir());
                if is_dir {
                    self.add(&entry.path())?;
                    pending.push(entry.path());
                }
                found.push((entry.path(), is_dir));
            }
        }
        Ok(found)
    }

    /// Reads the next batch of raw events.
    async fn read(&self, buffer: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            // SAFETY: reading into a buffer of the given length from a descriptor we own.
            let n = unsafe { libc::read(self.fd.get_ref().as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::WouldBlock {
                guard.clear_ready();
                continue;
            }
            return Err(error);
        }
    }
}

/// Parses one batch of `struct inotify_event` records.
fn parse(buffer: &[u8]) -> Vec<(i32, u32, Vec<u8>)> {
    const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
    let mut events = Vec::new();
    let mut at = 0;
    while at + HEADER <= buffer.len() {
        let field =
            |offset: usize| u32::from_ne_bytes(buffer[at + offset..at + offset + 4].try_into().expect("4 bytes"));
        let wd = field(0) as i32;
        let mask = field(4);
        let len = field(12) as usize;
        let name_end = (at + HEADER + len).min(buffer.len());
        let name: Vec<u8> = buffer[at + HEADER..name_end]
            .iter()
            .copied()
            .take_while(|b| *b != 0)
            .collect();
        events.push((wd, mask, name));
        at += HEADER + len;
    }
    events
}

/// Serves one watch request until the client disconnects.
pub async fn serve(
    path: &Path,
    recursive: bool,
    mut reader: OwnedReadHalf,
    writer: &mut OwnedWriteHalf,
) -> Result<Result<(), FileError>, ProtocolError> {
    if !std::fs::symlink_metadata(path).is_ok_and(|metadata| metadata.is_dir()) {
        return Ok(Err(FileError {
            code: "not_a_directory",
            message: format!("{} is not a directory", path.display()),
        }));
    }
    let mut inotify = match Inotify::new() {
        Ok(inotify) => inotify,
        Err(error) => return Ok(Err(crate::files::io_error("watching", path, error))),
    };
    let added = if recursive {
        inotify.add_tree(path).map(drop)
    } else {
        inotify.add(path)
    };
    if let Err(error) = added {
        return Ok(Err(crate::files::io_error("watching", path, error)));
    }
    write_json(writer, FrameKind::Reply, &serde_json::json!({})).await?;

    let mut buffer = vec![0u8; 64 * 1024];
    let mut probe = [0u8; 1];
    loop {
        let n = tokio::select! {
            read = inotify.read(&mut buffer) => read?,
            // The client never sends after the request: any readiness means it left.
            _ = reader.read(&mut probe) => return Ok(Ok(())),
        };
        for (wd, mask, name) in parse(&buffer[..n]) {
            if mask & libc::IN_Q_OVERFLOW != 0 {
                let event = WatchEvent {
                    kind: WatchEventKind::Overflow,
                    path: path.display().to_string(),
                    is_dir: true,
                };
                write_json(writer, FrameKind::WatchEvent, &event).await?;
                continue;
            }
            if mask & libc::IN_IGNORED != 0 {
                inotify.dirs.remove(&wd);
                continue;
            }
            let Some(dir) = inotify.dirs.get(&wd).cloned() else {
                continue;
            };
            if mask & libc::IN_DELETE_SELF != 0 {
                continue;
            }
            let target = if name.is_empty() {
                dir.clone()
            } else {
                dir.join(std::ffi::OsStr::from_bytes(&name))
            };
            let is_dir = mask & libc::IN_ISDIR != 0;
            let kind = if mask & libc::IN_CREATE != 0 {
                WatchEventKind::Create
            } else if mask & libc::IN_CLOSE_WRITE != 0 {
                WatchEventKind::Write
            } else if mask & libc::IN_DELETE != 0 {
                WatchEventKind::Remove
            } else if mask & libc::IN_MOVED_FROM != 0 {
                WatchEventKind::RenameFrom
            } else if mask & libc::IN_MOVED_TO != 0 {
                WatchEventKind::RenameTo
            } else {
                WatchEventKind::Metadata
            };
            // A new subdirectory of a recursive watch: watch it (and anything already inside it) too. What was
            // made in it before its watch existed is reported as created, after the directory itself (a file made
            // between the watch and the scan may be reported twice; none is missed).
            let missed = if recursive && is_dir && matches!(kind, WatchEventKind::Create | WatchEventKind::RenameTo) {
                inotify.add_tree(&target).unwrap_or_default()
            } else {
                Vec::new()
            };
            let event = WatchEvent {
                kind,
                path: target.display().to_string(),
                is_dir,
            };
            write_json(writer, FrameKind::WatchEvent, &event).await?;
            for (path, is_dir) in missed {
                let event = WatchEvent {
                    kind: WatchEventKind::Create,
                    path: path.display().to_string(),
                    is_dir,
                };
                write_json(writer, FrameKind::WatchEvent, &event).await?;
            }
        }
    }
}
