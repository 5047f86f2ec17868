//! `nook-agent serve`: PID 1 of a sandbox.
//!
//! It inherits a listening socket on fd 3, accepts one connection per request and answers it (see
//! `nook_agent_proto`). It is also the sandbox's init: every process that loses its parent is re-parented to it, so
//! it reaps all children on SIGCHLD. Processes it started itself are registered in the [`ProcessTable`] before the
//! reaper can see them exit (spawning holds the table's lock), so their exit status is delivered to the request that
//! started them and never lost; unknown pids are orphans and are simply reaped.
//!
//! Data flow of an exec: request frame → resolve user, cwd, env → fork/exec with pipes → `Started` → output frames
//! as the pipes yield data, input frames to the process → exit status from the reaper → remaining output drained →
//! exactly one `Exit` frame.

use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use nook_agent_proto::{
    boot::LISTEN_FD, read_frame, write_frame, write_json, AgentError, Attached, End, ExecSpec, Exit, FrameKind, Pong,
    Request, SignalRequest, Spawned, Started, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::archive;
use crate::files;
use crate::processes::{read_some, sleep_until, Registry, Stream};
use crate::search;
use crate::users;
use crate::watch;

/// How long output is still collected after the process exited, for descendants that keep its pipes open.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(250);

/// Size of one read from a process's output pipe (and so the largest output frame).
const READ_CHUNK: usize = 64 * 1024;

/// Default `PATH` for processes whose environment has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Entry point of `nook-agent serve`; returns only if the runtime cannot start.
pub fn run() -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("nook-agent: cannot start the runtime: {error}");
            return 1;
        }
    };
    match runtime.block_on(serve()) {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("nook-agent: {error}");
            1
        }
    }
}

/// Exit statuses are delivered to whoever registered the pid.
#[derive(Default)]
struct ProcessTable {
    waiting: Mutex<HashMap<i32, oneshot::Sender<WaitStatus>>>,
}

impl ProcessTable {
    /// Reaps every exited child; called on each SIGCHLD (signals coalesce, so it loops until none is left).
    fn reap(&self) {
        let mut waiting = self.waiting.lock().expect("process table lock");
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => {
                    if let Some(pid) = status.pid() {
                        if let Some(sender) = waiting.remove(&pid.as_raw()) {
                            let _ = sender.send(status);
                        }
                    }
                }
            }
        }
    }
}

async fn serve() -> std::io::Result<()> {
    // SAFETY: fd 3 is the listening socket the boot process left open for us (LISTEN_FD); nothing else owns it.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(LISTEN_FD) };
    set_cloexec(LISTEN_FD);
    listener.set_nonblocking(true)?;
    let listener = UnixListener::from_std(listener)?;

    let table = Arc::new(ProcessTable::default());
    let registry = Arc::new(Registry::default());
    let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
    let reaper_table = table.clone();
    tokio::spawn(async move {
        // Reap anything that exited before the handler was installed, then on every signal.
        reaper_table.reap();
        while sigchld.recv().await.is_some() {
            reaper_table.reap();
        }
    });

    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                eprintln!("nook-agent: accept failed: {error}");
                continue;
            }
        };
        let table = table.clone();
        let registry = registry.clone();
        tokio::spawn(async move {
            if let Err(error) = handle(stream, table, registry).await {
                eprintln!("nook-agent: connection failed: {error}");
            }
        });
    }
}

fn set_cloexec(fd: i32) {
    // SAFETY: fcntl on an fd we own with valid flag arguments has no memory-safety preconditions.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
    }
}

async fn handle(
    stream: UnixStream,
    table: Arc<ProcessTable>,
    registry: Arc<Registry>,
) -> Result<(), nook_agent_proto::ProtocolError> {
    let (mut reader, mut writer) = stream.into_split();
    let Some(first) = read_frame(&mut reader).await? else {
        return Ok(());
    };
    if first.kind != FrameKind::Request {
        return Err(nook_agent_proto::ProtocolError::Unexpected(first.kind));
    }
    match first.parse::<Request>()? {
        Request::Ping => {
            write_json(
                &mut writer,
                FrameKind::Pong,
                &Pong {
                    protocol: PROTOCOL_VERSION,
                },
            )
            .await
        }
        Request::Exec(spec) => exec(spec, reader, writer, table).await,
        Request::Spawn(spec) => spawn_background(spec, writer, table, registry).await,
        Request::Attach {
            pid,
            offset,
            follow,
            hold,
        } => attach(&registry, pid, offset, follow, hold, reader, writer).await,
        Request::Wait { pid } => wait(&registry, pid, reader, writer).await,
        Request::Input { pid, data, close } => input(&registry, pid, data, close, writer).await,
        Request::Signal { pid, signal } => {
            let Some(process) = registry.get(pid) else {
                return no_such_process(&mut writer, pid).await;
            };
            // An ended process's pid may belong to another process by now: never signal it.
            if !process.exited() {
                if let Ok(signal) = Signal::try_from(signal) {
                    let _ = kill(Pid::from_raw(pid as i32), signal);
                }
            }
            write_json(&mut writer, FrameKind::Reply, &serde_json::json!({})).await
        }
        Request::List => write_json(&mut writer, FrameKind::Reply, &registry.list()).await,
        Request::Resize { pid, size } => {
            let Some(process) = registry.get(pid) else {
                return no_such_process(&mut writer, pid).await;
            };
            match process.resize(size.cols, size.rows) {
                Ok(()) => write_json(&mut writer, FrameKind::Reply, &serde_json::json!({})).await,
                Err(message) => send_error(&mut writer, "no_terminal", message).await,
            }
        }
        Request::ReadFile { path } => match files::clean_path(&path) {
            Ok(path) => match files::read_file(&path, &mut writer).await? {
                Ok(()) => Ok(()),
                Err(error) => send_error(&mut writer, error.code, error.message).await,
            },
            Err(error) => send_error(&mut writer, error.code, error.message).await,
        },
        Request::WriteFile(write) => {
            let result = match files::clean_path(&write.path) {
                Ok(path) => files::write_file(&path, &write, &mut reader).await?,
                Err(error) => Err(error),
            };
            reply(&mut writer, result).await
        }
        Request::ReadArchive { path } => match files::clean_path(&path) {
            Ok(path) => match archive::read_archive(&path, &mut writer).await? {
                Ok(()) => Ok(()),
                Err(error) => send_error(&mut writer, error.code, error.message).await,
            },
            Err(error) => send_error(&mut writer, error.code, error.message).await,
        },
        Request::WriteArchive { path, parents, owner } => {
            let result = match files::clean_path(&path) {
                Ok(path) => archive::write_archive(&path, parents, owner, &mut reader).await?,
                Err(error) => Err(error),
            };
            reply(&mut writer, result).await
        }
        Request::Stat { path } => reply(&mut writer, files::clean_path(&path).and_then(|p| files::stat(&p))).await,
        Request::ListDir { path, depth } => {
            let depth = depth.clamp(1, 32);
            reply(
                &mut writer,
                files::clean_path(&path).and_then(|p| files::list(&p, depth)),
            )
            .await
        }
        Request::MakeDir { path, owner } => {
            reply(
                &mut writer,
                files::clean_path(&path).and_then(|p| files::make_dir(&p, owner)),
            )
            .await
        }
        Request::Account { user } => {
            let result = users::resolve(Path::new("/"), &user)
                .map(|account| nook_agent_proto::AccountInfo {
                    name: account.name,
                    uid: account.uid,
                    gid: account.gid,
                    home: account.home,
                })
                .map_err(|error| files::FileError {
                    code: "no_such_user",
                    message: error.to_string(),
                });
            reply(&mut writer, result).await
        }
        Request::Names { uids, gids } => reply::<_>(&mut writer, Ok(users::names(Path::new("/"), &uids, &gids))).await,
        Request::Move { from, to } => {
            let result = files::clean_path(&from)
                .and_then(|from| files::clean_path(&to).and_then(|to| files::move_path(&from, &to)));
            reply(&mut writer, result).await
        }
        Request::Find {
            path,
            pattern,
            max_results,
        } => {
            let result = files::clean_path(&path).and_then(|p| search::find(&p, &pattern, max_results));
            reply(&mut writer, result).await
        }
        Request::Search {
            path,
            regex,
            include,
            max_results,
            timeout_ms,
        } => {
            let timeout = Duration::from_millis(timeout_ms.clamp(1, 600_000));
            let result = match files::clean_path(&path) {
                // A search can take a while: keep it off the agent's only runtime thread.
                Ok(path) => tokio::task::spawn_blocking(move || {
                    search::search(&path, &regex, include.as_deref(), max_results, timeout)
                })
                .await
                .unwrap_or_else(|_| {
                    Err(files::FileError {
                        code: "io_error",
                        message: "the search failed".into(),
                    })
                }),
                Err(error) => Err(error),
            };
            reply(&mut writer, result).await
        }
        Request::Replace {
            paths,
            regex,
            replacement,
        } => {
            let result = paths
                .iter()
                .map(|path| files::clean_path(path))
                .collect::<Result<Vec<_>, _>>()
                .and_then(|paths| search::replace(&paths, &regex, &replacement));
            reply(&mut writer, result).await
        }
        Request::Watch { path, recursive } => match files::clean_path(&path) {
            Ok(path) => match watch::serve(&path, recursive, reader, &mut writer).await? {
                Ok(()) => Ok(()),
                Err(error) => send_error(&mut writer, error.code, error.message).await,
            },
            Err(error) => send_error(&mut writer, error.code, error.message).await,
        },
        Request::Chmod { path, mode } => {
            reply(
                &mut writer,
                files::clean_path(&path).and_then(|p| files::chmod(&p, mode)),
            )
            .await
        }
        Request::Chown { path, uid, gid } => {
            reply(
                &mut writer,
                files::clean_path(&path).and_then(|p| files::chown(&p, uid, gid)),
            )
            .await
        }
        Request::Remove { path, recursive } => {
            let result = files::clean_path(&path)
                .and_then(|p| files::remove(&p, recursive))
                .map(|()| serde_json::json!({}));
            reply(&mut writer, result).await
        }
    }
}

/// Answers a file request with its result or its error.
async fn reply<T: serde::Serialize>(
    writer: &mut tokio::net::unix::OwnedWriteHalf,
    result: Result<T, files::FileError>,
) -> Result<(), nook_agent_proto::ProtocolError> {
    match result {
        Ok(value) => write_json(writer, FrameKind::Reply, &value).await,
        Err(error) => send_error(writer, error.code, error.message).await,
    }
}

async fn no_such_process(
    writer: &mut tokio::net::unix::OwnedWriteHalf,
    pid: u32,
) -> Result<(), nook_agent_proto::ProtocolError> {
    send_error(
        writer,
        "no_such_process",
        format!("no background process with pid {pid} in this sandbox"),
    )
    .await
}

/// Starts a process owned by the registry (not by this connection) and answers with its pid.
async fn spawn_background(
    spec: ExecSpec,
    mut writer: tokio::net::unix::OwnedWriteHalf,
    table: Arc<ProcessTable>,
    registry: Arc<Registry>,
) -> Result<(), nook_agent_proto::ProtocolError> {
    let mut prepared = match prepare(&spec) {
        Ok(prepared) => prepared,
        Err((code, message)) => return send_error(&mut writer, code, message).await,
    };
    let started = Instant::now();
    let (mut child, exit) = match start(&mut prepared, &table, &spec.argv[0]) {
        Ok(started) => started,
        Err(message) => return send_error(&mut writer, "spawn_failed", message).await,
    };
    let capacity = spec
        .output_buffer
        .map_or(crate::processes::OUTPUT_CAPACITY, |bytes| bytes as usize);
    let process = registry.adopt(
        &mut child,
        prepared.pty_master.take(),
        spec.argv.clone(),
        capacity,
        exit,
        started,
    );
    // The slave side's copies held by the command must go, or the terminal never reports end of file.
    drop(prepared);
    write_json(&mut writer, FrameKind::Reply, &Spawned { pid: process.pid }).await
}

/// Streams a background process's output from `offset`; see [`Request::Attach`].
async fn attach(
    registry: &Registry,
    pid: u32,
    offset: u64,
    follow: bool,
    hold: bool,
    mut reader: tokio::net::unix::OwnedReadHalf,
    mut writer: tokio::net::unix::OwnedWriteHalf,
) -> Result<(), nook_agent_proto::ProtocolError> {
    let Some(process) = registry.get(pid) else {
        return no_such_process(&mut writer, pid).await;
    };
    let mut changes = process.subscribe();
    // Released when this attach ends, however it ends.
    let hold = (hold && follow).then(|| process.hold(offset));
    let mut offset = offset;
    let mut first = true;
    loop {
        // Mark the current version seen before reading, so a change after the read wakes us.
        changes.borrow_and_update();
        let (chunks, served, missed, exit) = {
            let state = process.state.lock().expect("process state lock");
            let (chunks, served, missed) = state.log.read_from(offset);
            (chunks, served, missed, state.exit)
        };
        if first {
            write_json(&mut writer, FrameKind::Attached, &Attached { offset: served, missed }).await?;
            first = false;
        }
        offset = served;
        for (stream, bytes) in chunks {
            let kind = match stream {
                Stream::Stdout => FrameKind::Stdout,
                Stream::Stderr => FrameKind::Stderr,
            };
            for piece in bytes.chunks(nook_agent_proto::MAX_FRAME_LEN) {
                write_frame(&mut writer, kind, piece).await?;
            }
            offset += bytes.len() as u64;
        }
        if let Some(hold) = &hold {
            hold.advance(offset);
        }
        if let Some(exit) = exit {
            return write_json(&mut writer, FrameKind::Exit, &exit).await;
        }
        if !follow {
            return write_json(&mut writer, FrameKind::End, &End { offset }).await;
        }
        let mut probe = [0u8; 1];
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return Ok(()) },
            // The client never sends after an attach: any readiness means it left.
            _ = reader.read(&mut probe) => return Ok(()),
        }
    }
}

/// Answers with the process's exit once it has one.
async fn wait(
    registry: &Registry,
    pid: u32,
    mut reader: tokio::net::unix::OwnedReadHalf,
    mut writer: tokio::net::unix::OwnedWriteHalf,
) -> Result<(), nook_agent_proto::ProtocolError> {
    let Some(process) = registry.get(pid) else {
        return no_such_process(&mut writer, pid).await;
    };
    let mut changes = process.subscribe();
    loop {
        changes.borrow_and_update();
        let exit = process.state.lock().expect("process state lock").exit;
        if let Some(exit) = exit {
            return write_json(&mut writer, FrameKind::Exit, &exit).await;
        }
        let mut probe = [0u8; 1];
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return Ok(()) },
            _ = reader.read(&mut probe) => return Ok(()),
        }
    }
}

/// Writes to a background process's standard input.
async fn input(
    registry: &Registry,
    pid: u32,
    data: Vec<u8>,
    close: bool,
    mut writer: tokio::net::unix::OwnedWriteHalf,
) -> Result<(), nook_agent_proto::ProtocolError> {
    let Some(process) = registry.get(pid) else {
        return no_such_process(&mut writer, pid).await;
    };
    let mut stdin = process.stdin.lock().await;
    let Some(pipe) = stdin.as_mut() else {
        // Closing what is already closed (or ended with the process) is done; only data has nowhere to go.
        if data.is_empty() && close {
            drop(stdin);
            return write_json(&mut writer, FrameKind::Reply, &serde_json::json!({})).await;
        }
        return send_error(
            &mut writer,
            "stdin_closed",
            format!("process {pid} has no open standard input"),
        )
        .await;
    };
    if !data.is_empty() {
        if let Err(error) = pipe.write_all(&data).await {
            *stdin = None;
            return send_error(
                &mut writer,
                "stdin_closed",
                format!("writing to process {pid} failed: {error}"),
            )
            .await;
        }
    }
    if close {
        *stdin = None;
    }
    drop(stdin);
    write_json(&mut writer, FrameKind::Reply, &serde_json::json!({})).await
}

/// Forks and execs a prepared command with the reaper's table locked, so its exit status is never lost.
fn start(
    prepared: &mut Prepared,
    table: &ProcessTable,
    program: &str,
) -> Result<(std::process::Child, oneshot::Receiver<WaitStatus>), String> {
    let (exit_sender, exit_receiver) = oneshot::channel();
    let spawned = {
        let mut waiting = table.waiting.lock().expect("process table lock");
        prepared.command.spawn().inspect(|child| {
            waiting.insert(child.id() as i32, exit_sender);
        })
    };
    match spawned {
        Ok(child) => Ok((child, exit_receiver)),
        Err(error) => Err(match error.kind() {
            std::io::ErrorKind::NotFound => format!("{program:?} was not found in the sandbox"),
            std::io::ErrorKind::PermissionDenied => format!("{program:?} is not executable: {error}"),
            _ => format!("starting {program:?} failed: {error}"),
        }),
    }
}

async fn send_error(
    writer: &mut tokio::net::unix::OwnedWriteHalf,
    code: &str,
    message: String,
) -> Result<(), nook_agent_proto::ProtocolError> {
    write_json(
        writer,
        FrameKind::Error,
        &AgentError {
            code: code.into(),
            message,
        },
    )
    .await
}

/// Everything needed to start a process, resolved before forking so that the child does no allocation.
struct Prepared {
    command: std::process::Command,
    /// The master side of the process's terminal, when it has one.
    pty_master: Option<OwnedFd>,
}

fn prepare(spec: &ExecSpec) -> Result<Prepared, (&'static str, String)> {
    let Some(program) = spec.argv.first() else {
        return Err(("bad_request", "the command is empty".into()));
    };
    let account = users::resolve(Path::new("/"), spec.user.as_deref().unwrap_or("root"))
        .map_err(|error| ("no_such_user", error.to_string()))?;

    let mut env: Vec<(String, String)> = spec
        .env
        .iter()
        .filter_map(|entry| entry.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    let mut add_default = |key: &str, value: &str| {
        if !env.iter().any(|(k, _)| k == key) {
            env.push((key.to_string(), value.to_string()));
        }
    };
    add_default("PATH", DEFAULT_PATH);
    add_default("HOME", &account.home);
    add_default("USER", &account.name);
    add_default("LOGNAME", &account.name);

    // `~` and relative directories are the user's home and paths under it.
    let cwd = spec.cwd.as_ref().map(|cwd| {
        if cwd == "~" {
            account.home.clone()
        } else if let Some(rest) = cwd.strip_prefix("~/") {
            format!("{}/{rest}", account.home.trim_end_matches('/'))
        } else if !cwd.starts_with('/') {
            format!("{}/{cwd}", account.home.trim_end_matches('/'))
        } else {
            cwd.clone()
        }
    });
    let cwd = match &cwd {
        Some(cwd) => {
            if !Path::new(cwd).is_dir() {
                return Err((
                    "bad_cwd",
                    format!("working directory {cwd:?} does not exist in the sandbox"),
                ));
            }
            cwd.clone()
        }
        None if Path::new(&account.home).is_dir() => account.home.clone(),
        None => "/".to_string(),
    };

    let mut command = std::process::Command::new(program);
    command.args(&spec.argv[1..]).env_clear().envs(env).current_dir(cwd);
    let pty_master = match spec.pty {
        Some(size) => {
            let winsize = nix::pty::Winsize {
                ws_row: size.rows,
                ws_col: size.cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let pty = nix::pty::openpty(Some(&winsize), None)
                .map_err(|error| ("spawn_failed", format!("opening a pseudo-terminal failed: {error}")))?;
            let slave = |fd: &OwnedFd| {
                fd.try_clone()
                    .map_err(|error| ("spawn_failed", format!("duplicating the terminal failed: {error}")))
            };
            command
                .stdin(Stdio::from(slave(&pty.slave)?))
                .stdout(Stdio::from(slave(&pty.slave)?))
                .stderr(Stdio::from(pty.slave));
            set_cloexec(std::os::fd::AsRawFd::as_raw_fd(&pty.master));
            Some(pty.master)
        }
        None => {
            command
                .stdin(if spec.stdin { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        }
    };
    let (uid, gid, groups) = (account.uid, account.gid, account.groups.clone());
    let controlling_terminal = pty_master.is_some();
    // SAFETY: the closure runs in the forked child before exec; it only makes async-signal-safe system calls on
    // data prepared before the fork (no allocation, no locks).
    unsafe {
        command.pre_exec(move || child_setup(uid, gid, &groups, controlling_terminal));
    }
    Ok(Prepared { command, pty_master })
}

/// Runs in the child between fork and exec: new session, normal OOM score, then drop to the target user.
fn child_setup(uid: u32, gid: u32, groups: &[u32], controlling_terminal: bool) -> std::io::Result<()> {
    fn check(result: libc::c_int) -> std::io::Result<()> {
        if result < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
    // SAFETY: plain system calls with valid arguments; `groups` outlives the call and the path is a static C string.
    unsafe {
        check(libc::setsid())?;
        if controlling_terminal {
            // Standard input is the terminal's slave side: make it the new session's controlling terminal.
            check(libc::ioctl(0, libc::TIOCSCTTY, 0))?;
        }
        // The agent runs with -1000 so the kernel never picks it; its children start from the neutral score.
        let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
        }
        check(libc::setgroups(groups.len(), groups.as_ptr()))?;
        check(libc::setgid(gid))?;
        check(libc::setuid(uid))?;
    }
    Ok(())
}

async fn exec(
    spec: ExecSpec,
    reader: tokio::net::unix::OwnedReadHalf,
    mut writer: tokio::net::unix::OwnedWriteHalf,
    table: Arc<ProcessTable>,
) -> Result<(), nook_agent_proto::ProtocolError> {
    if spec.pty.is_some() {
        let message = "a terminal needs a background process (Spawn), which can be attached to and resized";
        return send_error(&mut writer, "bad_request", message.into()).await;
    }
    let mut prepared = match prepare(&spec) {
        Ok(prepared) => prepared,
        Err((code, message)) => return send_error(&mut writer, code, message).await,
    };

    let started_at = Instant::now();
    let (mut child, mut exit_receiver) = match start(&mut prepared, &table, &spec.argv[0]) {
        Ok(started) => started,
        Err(message) => return send_error(&mut writer, "spawn_failed", message).await,
    };
    let pid = child.id() as i32;
    // From here on, any way out of this function that did not see the exit kills the process group.
    let mut guard = ProcessGuard { pid, reaped: false };
    write_json(&mut writer, FrameKind::Started, &Started { pid: pid as u32 }).await?;

    let mut stdout = pipe_receiver(child.stdout.take().map(OwnedFd::from));
    let mut stderr = pipe_receiver(child.stderr.take().map(OwnedFd::from));
    let stdin = child.stdin.take().map(|stdin| spawn_stdin_writer(OwnedFd::from(stdin)));
    // Frames from the client are read by their own task: reading a frame is not cancel-safe, and input must keep
    // flowing while this loop is busy writing output (or the two directions could wait on each other).
    let (control_sender, mut control) = mpsc::channel(16);
    let client_reader = tokio::spawn(read_client_frames(reader, stdin, control_sender));
    let timed_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let timer = spec.timeout_ms.map(|ms| {
        let timed_out = timed_out.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            timed_out.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
        })
    });

    let mut status: Option<WaitStatus> = None;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let mut out_buf = vec![0u8; READ_CHUNK];
    let mut err_buf = vec![0u8; READ_CHUNK];
    let result = loop {
        if status.is_some() && stdout.is_none() && stderr.is_none() {
            break Ok(());
        }
        let written = tokio::select! {
            read = read_some(&mut stdout, &mut out_buf) => match read {
                Some(n) => write_frame(&mut writer, FrameKind::Stdout, &out_buf[..n]).await,
                None => { stdout = None; Ok(()) }
            },
            read = read_some(&mut stderr, &mut err_buf) => match read {
                Some(n) => write_frame(&mut writer, FrameKind::Stderr, &err_buf[..n]).await,
                None => { stderr = None; Ok(()) }
            },
            exited = &mut exit_receiver, if status.is_none() => {
                status = Some(exited.unwrap_or(WaitStatus::StillAlive));
                guard.reaped = true;
                drain_deadline = Some(tokio::time::Instant::now() + DRAIN_AFTER_EXIT);
                Ok(())
            },
            event = control.recv() => {
                match event {
                    // Signals go only to a process not yet reaped, never to a recycled pid.
                    Some(ClientEvent::Signal(signal)) if status.is_none() => {
                        let _ = kill(Pid::from_raw(pid), signal);
                        Ok(())
                    }
                    Some(ClientEvent::Signal(_)) => Ok(()),
                    // The client went away: nobody can receive the result.
                    None => break Err(nook_agent_proto::ProtocolError::Io(std::io::ErrorKind::BrokenPipe.into())),
                }
            },
            _ = sleep_until(drain_deadline) => {
                // Descendants still hold the pipes open; the process itself has ended.
                stdout = None;
                stderr = None;
                Ok(())
            },
        };
        if let Err(error) = written {
            break Err(error);
        }
    };
    client_reader.abort();
    if let Some(timer) = timer {
        timer.abort();
    }
    result?;

    let (code, signal) = match status {
        Some(WaitStatus::Exited(_, code)) => (Some(code), None),
        Some(WaitStatus::Signaled(_, signal, _)) => (None, Some(signal as i32)),
        _ => {
            return send_error(
                &mut writer,
                "lost_exit",
                "the process's exit status could not be observed".into(),
            )
            .await
        }
    };
    let exit = Exit {
        code,
        signal,
        timed_out: timed_out.load(std::sync::atomic::Ordering::SeqCst),
        duration_ms: started_at.elapsed().as_secs_f64() * 1000.0,
    };
    write_json(&mut writer, FrameKind::Exit, &exit).await?;
    writer.shutdown().await?;
    Ok(())
}

/// Kills a started process's group unless its exit was observed, whatever way the request ends.
struct ProcessGuard {
    pid: i32,
    reaped: bool,
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = kill(Pid::from_raw(-self.pid), Signal::SIGKILL);
        }
    }
}

/// What the client's frames mean to the exec loop (input bytes bypass it and go straight to the process).
enum ClientEvent {
    Signal(Signal),
}

/// Reads the client's frames for the whole exec: input goes to the process's stdin writer, signals to the exec
/// loop. When the client disconnects (or breaks the protocol) the channel closes, which the loop sees.
async fn read_client_frames(
    mut reader: tokio::net::unix::OwnedReadHalf,
    mut stdin: Option<mpsc::Sender<Vec<u8>>>,
    control: mpsc::Sender<ClientEvent>,
) {
    loop {
        let frame = match read_frame(&mut reader).await {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(_) => return,
        };
        match frame.kind {
            FrameKind::Stdin => {
                if let Some(sender) = &stdin {
                    if sender.send(frame.payload).await.is_err() {
                        stdin = None;
                    }
                }
            }
            FrameKind::StdinClose => stdin = None,
            FrameKind::Signal => {
                let signal = frame
                    .parse::<SignalRequest>()
                    .ok()
                    .and_then(|r| Signal::try_from(r.signal).ok());
                if let Some(signal) = signal {
                    if control.send(ClientEvent::Signal(signal)).await.is_err() {
                        return;
                    }
                }
            }
            other => eprintln!("nook-agent: ignoring unexpected {other:?} frame"),
        }
    }
}

fn pipe_receiver(fd: Option<OwnedFd>) -> Option<tokio::net::unix::pipe::Receiver> {
    fd.and_then(|fd| tokio::net::unix::pipe::Receiver::from_owned_fd(fd).ok())
}

/// Feeds a process's standard input from a channel so that a slow reader never blocks the connection's loop;
/// dropping the sender closes the pipe.
fn spawn_stdin_writer(fd: OwnedFd) -> mpsc::Sender<Vec<u8>> {
    let (sender, mut receiver) = mpsc::channel::<Vec<u8>>(16);
    tokio::spawn(async move {
        let Ok(mut pipe) = tokio::net::unix::pipe::Sender::from_owned_fd(fd) else {
            return;
        };
        while let Some(chunk) = receiver.recv().await {
            if pipe.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    sender
}
