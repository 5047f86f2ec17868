//! Background processes: started by one request, they outlive it and any client connection.
//!
//! Each process's output (stdout and stderr, in the order written) is appended by a pump task to a bounded
//! [`OutputLog`]; every byte has an offset in that combined stream, so a client that reconnects asks for the offset
//! after the last byte it saw and gets the rest exactly once. When the log is full the oldest bytes are dropped and a
//! late attach is told how many it missed. A `watch` channel carries a version number that changes on every new chunk
//! and on exit, so attached clients and waiters sleep until something happens (no polling). The exit status comes
//! only from the reaper: an attach never reports an exit that did not happen.
//!
//! A reader that must see every byte (a [`Hold`], taken by a held attach) changes the bound into back-pressure: while
//! the log cannot take more without dropping bytes that reader has not been sent, the pump stops reading, so the
//! process blocks on its full pipe until the reader catches up (as a process under E2B's envd does).

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::wait::WaitStatus;
use nook_agent_proto::{Exit, ProcessInfo};
use tokio::io::AsyncReadExt;
use tokio::sync::{oneshot, watch, Notify};

/// Output kept per process for replay, unless the request asks for another size.
pub const OUTPUT_CAPACITY: usize = 1 << 20;
/// Largest replay buffer a request may ask for.
pub const MAX_OUTPUT_CAPACITY: usize = 64 << 20;
/// Ended processes kept for their output and status; older ones are forgotten first.
const KEEP_ENDED: usize = 256;
/// How long output is still collected after the process exited, for descendants holding its pipes.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(250);

/// Which stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A process's combined output, bounded; offsets count every byte ever written.
#[derive(Debug)]
pub struct OutputLog {
    chunks: VecDeque<(u64, Stream, Vec<u8>)>,
    /// Offset of the first byte still held.
    start: u64,
    /// Offset just past the last byte written.
    end: u64,
    capacity: usize,
}

impl OutputLog {
    pub fn new(capacity: usize) -> Self {
        Self {
            chunks: VecDeque::new(),
            start: 0,
            end: 0,
            capacity,
        }
    }

    pub fn append(&mut self, stream: Stream, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.chunks.push_back((self.end, stream, bytes.to_vec()));
        self.end += bytes.len() as u64;
        while self.end - self.start > self.capacity as u64 {
            let Some((offset, stream, chunk)) = self.chunks.pop_front() else {
                break;
            };
            let excess = (self.end - self.start - self.capacity as u64) as usize;
            if excess < chunk.len() {
                // Keep the tail of a chunk that straddles the limit.
                self.chunks
                    .push_front((offset + excess as u64, stream, chunk[excess..].to_vec()));
                self.start += excess as u64;
            } else {
                self.start += chunk.len() as u64;
            }
        }
    }

    /// Chunks from `offset` on (the first one cut to start there), the offset actually served, and how many bytes
    /// before it are gone.
    pub fn read_from(&self, offset: u64) -> (Vec<(Stream, Vec<u8>)>, u64, u64) {
        let served = offset.clamp(self.start, self.end);
        let missed = served.saturating_sub(offset);
        let mut out = Vec::new();
        for (chunk_offset, stream, chunk) in &self.chunks {
            let chunk_end = chunk_offset + chunk.len() as u64;
            if chunk_end <= served {
                continue;
            }
            let skip = served.saturating_sub(*chunk_offset) as usize;
            out.push((*stream, chunk[skip..].to_vec()));
        }
        (out, served, missed)
    }

    pub fn end(&self) -> u64 {
        self.end
    }

    /// The offset of the first byte still held.
    pub fn start(&self) -> u64 {
        self.start
    }
}

/// Mutable state of one process.
#[derive(Debug)]
pub struct ProcessState {
    pub log: OutputLog,
    pub exit: Option<Exit>,
    /// Readers that must not lose output, by hold id: the offset of the next byte each still needs.
    holds: BTreeMap<u64, u64>,
    next_hold: u64,
}

impl ProcessState {
    /// How many bytes the log can take without dropping any a held reader still needs (`usize::MAX` when no reader
    /// holds the process).
    fn room(&self) -> usize {
        match self.holds.values().min() {
            None => usize::MAX,
            Some(&oldest) => {
                let unread = self.log.end().saturating_sub(oldest);
                (self.log.capacity as u64).saturating_sub(unread) as usize
            }
        }
    }
}

/// One background process.
pub struct Managed {
    pub pid: u32,
    pub argv: Vec<String>,
    started_at_ms: u64,
    pub state: Mutex<ProcessState>,
    /// Bumped on every change; attached clients wait on it.
    version: watch::Sender<u64>,
    /// Standard input, while open (a pipe, or the terminal's master side).
    pub stdin: tokio::sync::Mutex<Option<Input>>,
    /// The pseudo-terminal's master side, for resizing.
    pub pty: Option<OwnedFd>,
    /// Woken when a held reader advances or leaves, so a held-back pump reads again.
    released: Notify,
}

/// A reader's claim on a process's output from some offset on: the pump never drops a byte the reader has not been
/// sent. Released when dropped.
pub struct Hold {
    process: Arc<Managed>,
    id: u64,
}

impl Hold {
    /// The reader has been sent everything before `offset`.
    pub fn advance(&self, offset: u64) {
        if let Some(held) = self
            .process
            .state
            .lock()
            .expect("process state lock")
            .holds
            .get_mut(&self.id)
        {
            *held = offset.max(*held);
        }
        self.process.released.notify_one();
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.process
            .state
            .lock()
            .expect("process state lock")
            .holds
            .remove(&self.id);
        self.process.released.notify_one();
    }
}

/// Where a process's input goes.
pub type Input = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;
/// Where a process's output comes from.
type Output = Box<dyn tokio::io::AsyncRead + Send + Unpin>;

impl Managed {
    /// A receiver that wakes on every change from now on.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn changed(&self) {
        self.version.send_modify(|version| *version += 1);
    }

    /// Holds the process's output for a reader starting at `offset` (or the oldest byte still held, if later).
    pub fn hold(self: &Arc<Self>, offset: u64) -> Hold {
        let mut state = self.state.lock().expect("process state lock");
        let offset = offset.clamp(state.log.start(), state.log.end());
        let id = state.next_hold;
        state.next_hold += 1;
        state.holds.insert(id, offset);
        Hold {
            process: self.clone(),
            id,
        }
    }

    pub fn info(&self) -> ProcessInfo {
        let state = self.state.lock().expect("process state lock");
        ProcessInfo {
            pid: self.pid,
            argv: self.argv.clone(),
            started_at_ms: self.started_at_ms,
            output_bytes: state.log.end(),
            terminal: self.pty.is_some(),
            exit: state.exit,
        }
    }

    /// Sets the terminal size; the kernel sends SIGWINCH to the terminal's foreground process group.
    pub fn resize(&self, cols: u16, rows: u16) -> Result<(), String> {
        let Some(master) = &self.pty else {
            return Err(format!("process {} has no terminal", self.pid));
        };
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a `winsize` from the pointer, which is valid for the call.
        let result = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(master), libc::TIOCSWINSZ, &size) };
        if result < 0 {
            return Err(format!(
                "resizing the terminal failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    pub fn exited(&self) -> bool {
        self.state.lock().expect("process state lock").exit.is_some()
    }
}

/// All background processes of the sandbox.
#[derive(Default)]
pub struct Registry {
    processes: Mutex<BTreeMap<u32, Arc<Managed>>>,
}

impl Registry {
    pub fn get(&self, pid: u32) -> Option<Arc<Managed>> {
        self.processes.lock().expect("registry lock").get(&pid).cloned()
    }

    pub fn list(&self) -> Vec<ProcessInfo> {
        let processes: Vec<Arc<Managed>> = self
            .processes
            .lock()
            .expect("registry lock")
            .values()
            .cloned()
            .collect();
        processes.iter().map(|process| process.info()).collect()
    }

    /// Registers a started process and starts pumping its output. A pid reused by the kernel replaces the ended
    /// process that had it.
    pub fn adopt(
        self: &Arc<Self>,
        child: &mut std::process::Child,
        pty: Option<OwnedFd>,
        argv: Vec<String>,
        output_capacity: usize,
        exit: oneshot::Receiver<WaitStatus>,
        started: std::time::Instant,
    ) -> Arc<Managed> {
        let pid = child.id();
        let (stdin, stdout, stderr): (Option<Input>, Option<Output>, Option<Output>) = match &pty {
            // A terminal: one master side for both directions (reads and writes on their own duplicates).
            Some(master) => (
                master
                    .try_clone()
                    .ok()
                    .map(|fd| Box::new(tokio::fs::File::from_std(fd.into())) as Input),
                master
                    .try_clone()
                    .ok()
                    .map(|fd| Box::new(tokio::fs::File::from_std(fd.into())) as Output),
                None,
            ),
            None => (
                child.stdin.take().and_then(|pipe| {
                    tokio::net::unix::pipe::Sender::from_owned_fd(OwnedFd::from(pipe))
                        .ok()
                        .map(|p| Box::new(p) as Input)
                }),
                child.stdout.take().and_then(|pipe| {
                    tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(pipe))
                        .ok()
                        .map(|p| Box::new(p) as Output)
                }),
                child.stderr.take().and_then(|pipe| {
                    tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(pipe))
                        .ok()
                        .map(|p| Box::new(p) as Output)
                }),
            ),
        };
        let started_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let (version, _) = watch::channel(0);
        let managed = Arc::new(Managed {
            pid,
            argv,
            started_at_ms,
            state: Mutex::new(ProcessState {
                log: OutputLog::new(output_capacity.clamp(4096, MAX_OUTPUT_CAPACITY)),
                exit: None,
                holds: BTreeMap::new(),
                next_hold: 0,
            }),
            version,
            stdin: tokio::sync::Mutex::new(stdin),
            pty,
            released: Notify::new(),
        });
        {
            let mut processes = self.processes.lock().expect("registry lock");
            processes.insert(pid, managed.clone());
            let ended: Vec<u32> = processes
                .iter()
                .filter(|(_, process)| process.exited())
                .map(|(pid, _)| *pid)
                .collect();
            if ended.len() > KEEP_ENDED {
                let mut by_age: Vec<(u64, u32)> =
                    ended.iter().map(|pid| (processes[pid].started_at_ms, *pid)).collect();
                by_age.sort_unstable();
                for (_, pid) in by_age.into_iter().take(ended.len() - KEEP_ENDED) {
                    processes.remove(&pid);
                }
            }
        }
        tokio::spawn(pump(managed.clone(), stdout, stderr, exit, started));
        managed
    }
}

/// Moves a process's output into its log until it has exited and its pipes are drained, then records the exit. While
/// a held reader lags a whole log behind, nothing is read (see [`Hold`]); the drain window after the exit restarts
/// whenever that reader takes output.
async fn pump(
    managed: Arc<Managed>,
    mut stdout: Option<Output>,
    mut stderr: Option<Output>,
    mut exit: oneshot::Receiver<WaitStatus>,
    started: std::time::Instant,
) {
    let mut out_buf = vec![0u8; 64 * 1024];
    let mut err_buf = vec![0u8; 64 * 1024];
    let mut status: Option<WaitStatus> = None;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    while status.is_none() || stdout.is_some() || stderr.is_some() {
        let room = managed.state.lock().expect("process state lock").room();
        let held = room == 0;
        let out_limit = room.min(out_buf.len());
        let err_limit = room.min(err_buf.len());
        tokio::select! {
            read = read_some(&mut stdout, &mut out_buf[..out_limit]), if !held => match read {
                Some(n) => append(&managed, Stream::Stdout, &out_buf[..n]),
                None => stdout = None,
            },
            read = read_some(&mut stderr, &mut err_buf[..err_limit]), if !held => match read {
                Some(n) => append(&managed, Stream::Stderr, &err_buf[..n]),
                None => stderr = None,
            },
            exited = &mut exit, if status.is_none() => {
                status = Some(exited.unwrap_or(WaitStatus::StillAlive));
                drain_deadline = Some(tokio::time::Instant::now() + DRAIN_AFTER_EXIT);
            },
            _ = sleep_until(drain_deadline), if !held => {
                stdout = None;
                stderr = None;
            },
            _ = managed.released.notified(), if held => {
                if drain_deadline.is_some() {
                    drain_deadline = Some(tokio::time::Instant::now() + DRAIN_AFTER_EXIT);
                }
            },
        }
    }
    let (code, signal) = match status {
        Some(WaitStatus::Exited(_, code)) => (Some(code), None),
        Some(WaitStatus::Signaled(_, signal, _)) => (None, Some(signal as i32)),
        // The reaper dropped the status (cannot happen while the table holds the sender): report nothing false.
        _ => return,
    };
    let exit = Exit {
        code,
        signal,
        timed_out: false,
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
    };
    managed.state.lock().expect("process state lock").exit = Some(exit);
    *managed.stdin.lock().await = None;
    managed.changed();
}

fn append(managed: &Managed, stream: Stream, bytes: &[u8]) {
    managed
        .state
        .lock()
        .expect("process state lock")
        .log
        .append(stream, bytes);
    managed.changed();
}

/// Reads once; `None` at end of file or error. Pends forever when the stream is already closed, so a closed stream
/// drops out of `select!`.
pub(crate) async fn read_some<R: tokio::io::AsyncRead + Unpin>(pipe: &mut Option<R>, buf: &mut [u8]) -> Option<usize> {
    match pipe {
        Some(pipe) => match pipe.read(buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(n),
        },
        None => std::future::pending().await,
    }
}

/// Sleeps until the deadline, or forever without one.
pub(crate) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_serves_from_any_offset_once() {
        let mut log = OutputLog::new(100);
        log.append(Stream::Stdout, b"hello ");
        log.append(Stream::Stderr, b"world");
        let (chunks, served, missed) = log.read_from(3);
        assert_eq!((served, missed), (3, 0));
        assert_eq!(
            chunks,
            vec![(Stream::Stdout, b"lo ".to_vec()), (Stream::Stderr, b"world".to_vec())]
        );
        let (chunks, served, _) = log.read_from(11);
        assert!(chunks.is_empty());
        assert_eq!(served, 11);
    }

    #[test]
    fn a_hold_leaves_room_only_for_what_its_reader_was_sent() {
        let mut state = ProcessState {
            log: OutputLog::new(10),
            exit: None,
            holds: BTreeMap::new(),
            next_hold: 0,
        };
        state.log.append(Stream::Stdout, b"0123");
        assert_eq!(state.room(), usize::MAX);
        state.holds.insert(0, 0);
        assert_eq!(state.room(), 6);
        state.holds.insert(1, 4);
        assert_eq!(state.room(), 6, "the slowest reader counts");
        state.holds.insert(0, 4);
        assert_eq!(state.room(), 10);
        state.log.append(Stream::Stdout, b"456789abcd");
        assert_eq!(state.room(), 0);
    }

    #[test]
    fn log_is_bounded_and_reports_what_was_dropped() {
        let mut log = OutputLog::new(10);
        log.append(Stream::Stdout, b"0123456789");
        log.append(Stream::Stdout, b"abcd");
        let (chunks, served, missed) = log.read_from(0);
        assert_eq!((served, missed), (4, 4));
        let text: Vec<u8> = chunks.into_iter().flat_map(|(_, bytes)| bytes).collect();
        assert_eq!(text, b"456789abcd");
        assert_eq!(log.end(), 14);
    }
}
