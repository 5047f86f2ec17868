//! Interactive sessions: `nook exec -it`, `nook shell` and `nook attach`.
//!
//! The command runs as a background process (on a pseudo-terminal with `-t`) and this side connects to it over the
//! terminal WebSocket: the local terminal is put in raw mode, keystrokes go out as they are typed, output is
//! written as it arrives, and SIGWINCH becomes a resize. Ctrl-P Ctrl-Q detaches, like docker's: the process keeps
//! running and `nook attach SANDBOX PID` continues it with its recent output replayed. When the process ends, this
//! command exits with its exit code (128 + signal when a signal killed it).

use std::io::Write;
use std::os::fd::AsFd;

use anyhow::{bail, Context};
use nix::sys::termios::{self, SetArg, Termios};
use nook_api::{ExecEvent, ExecRequest, PtySize};
use nook_client::{Client, TerminalOutput};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// Ctrl-P then Ctrl-Q detaches.
const DETACH_FIRST: u8 = 0x10;
const DETACH_SECOND: u8 = 0x11;
/// Ctrl-D: end of file for a terminal's reader.
const EOT: u8 = 0x04;

/// How much of a terminal's recent output `nook attach` replays by default.
pub const DEFAULT_REPLAY_BYTES: u64 = 64 * 1024;

/// Starts `request` as a background process and runs it interactively; with `tty`, on a pseudo-terminal the size of
/// this one.
pub async fn run_interactive(
    client: &Client,
    sandbox: &str,
    mut request: ExecRequest,
    tty: bool,
) -> anyhow::Result<u8> {
    if tty {
        request.pty = Some(local_size().unwrap_or(PtySize { cols: 80, rows: 24 }));
        let term = std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into());
        request.env.entry("TERM".into()).or_insert(term);
    }
    let process = client.start_process(sandbox, &request).await?;
    attach(client, sandbox, process.pid, 0, tty).await
}

/// Attaches to background process `pid` from output offset `offset` until it ends or the user detaches.
pub async fn attach(client: &Client, sandbox: &str, pid: u32, offset: u64, tty: bool) -> anyhow::Result<u8> {
    let terminal = client.terminal(sandbox, pid, offset).await?;
    let (mut writer, mut reader) = terminal.split();
    let raw = if tty { RawMode::enable()? } else { None };
    let interactive = raw.is_some();
    if tty {
        // The terminal may have changed size since the process started.
        if let Some(size) = local_size() {
            writer.resize(size.cols, size.rows).await?;
        }
    }
    let mut keys = read_stdin();
    let mut resized = signal(SignalKind::window_change()).context("cannot watch for terminal resizes")?;
    let mut detach_keys = DetachKeys::default();
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        tokio::select! {
            output = reader.next() => {
                let Some(output) = output else {
                    drop(raw);
                    bail!("the server closed the terminal before the process ended");
                };
                match output? {
                    TerminalOutput::Stdout(bytes) => {
                        stdout.write_all(&bytes)?;
                        stdout.flush()?;
                    }
                    TerminalOutput::Event(event) => match event {
                        ExecEvent::Stderr { data, .. } => {
                            stderr.write_all(&crate::commands::decode_chunk(&data)?)?;
                            stderr.flush()?;
                        }
                        ExecEvent::Attached { missed, .. } if missed > 0 && offset == 0 => {
                            eprint!("nook: {missed} bytes of earlier output are no longer buffered\r\n");
                        }
                        ExecEvent::Notice { message, .. } => eprint!("nook: {message}\r\n"),
                        ExecEvent::Exit { status, .. } => {
                            drop(raw);
                            return Ok(crate::commands::exit_code(status));
                        }
                        ExecEvent::Error { message, .. } => {
                            drop(raw);
                            bail!("{message}");
                        }
                        _ => {}
                    },
                }
            }
            keys_in = keys.recv() => match keys_in {
                Some(bytes) => {
                    let (bytes, detach) = if interactive { detach_keys.feed(&bytes) } else { (bytes, false) };
                    if !bytes.is_empty() {
                        writer.input(bytes).await?;
                    }
                    if detach {
                        drop(raw);
                        eprintln!("nook: detached; the process keeps running (`nook attach {sandbox} {pid}`)");
                        let _ = writer.detach().await;
                        return Ok(0);
                    }
                }
                // End of local input (piped into `-t`, or `-i`): pass it on. A terminal's reader sees end of file
                // when the line discipline gets Ctrl-D; a pipe is closed.
                None => {
                    if tty {
                        writer.input(vec![EOT]).await?;
                    } else {
                        writer.close_stdin().await?;
                    }
                    keys = closed_channel();
                }
            },
            _ = resized.recv() => {
                if let Some(size) = local_size() {
                    writer.resize(size.cols, size.rows).await?;
                }
            }
        }
    }
}

/// Spots Ctrl-P Ctrl-Q in what is typed, even across reads; a Ctrl-P followed by anything else is passed on.
#[derive(Debug, Default)]
struct DetachKeys {
    /// The last read ended with a Ctrl-P that is held back until the next key.
    holding: bool,
}

impl DetachKeys {
    /// The bytes to send on, and whether the detach sequence was typed (bytes after it are dropped).
    fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len() + 1);
        for &byte in input {
            if self.holding {
                self.holding = false;
                if byte == DETACH_SECOND {
                    return (out, true);
                }
                out.push(DETACH_FIRST);
            }
            if byte == DETACH_FIRST {
                self.holding = true;
            } else {
                out.push(byte);
            }
        }
        (out, false)
    }
}

/// Standard input as a channel of chunks, read by a plain thread: a blocked read must never keep the runtime from
/// shutting down when the session ends.
fn read_stdin() -> mpsc::Receiver<Vec<u8>> {
    let (sender, receiver) = mpsc::channel(16);
    std::thread::spawn(move || {
        let mut buffer = vec![0u8; 8192];
        loop {
            // SAFETY: reads into a buffer we own, of the length given; fd 0 stays open for the process's life.
            let read = unsafe { libc::read(0, buffer.as_mut_ptr().cast(), buffer.len()) };
            if read < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if read <= 0 || sender.blocking_send(buffer[..read as usize].to_vec()).is_err() {
                return;
            }
        }
    });
    receiver
}

/// A channel that never yields, for after standard input ended.
fn closed_channel() -> mpsc::Receiver<Vec<u8>> {
    let (sender, receiver) = mpsc::channel(1);
    std::mem::forget(sender);
    receiver
}

/// The size of the terminal on standard output (or input), if there is one.
fn local_size() -> Option<PtySize> {
    [libc::STDOUT_FILENO, libc::STDIN_FILENO].into_iter().find_map(|fd| {
        let mut size = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we pass; a non-terminal fd fails with ENOTTY.
        let result = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) };
        (result == 0 && size.ws_col > 0 && size.ws_row > 0).then_some(PtySize {
            cols: size.ws_col.min(1000),
            rows: size.ws_row.min(1000),
        })
    })
}

/// The local terminal in raw mode for as long as this lives; restored on drop (also on errors and panics).
struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Raw mode on standard input, or `None` when standard input is not a terminal.
    fn enable() -> anyhow::Result<Option<Self>> {
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(stdin.as_fd()) else {
            return Ok(None);
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).context("cannot put the terminal in raw mode")?;
        Ok(Some(Self { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_keys_are_found_in_one_read_or_across_reads() {
        let mut keys = DetachKeys::default();
        assert_eq!(keys.feed(b"ls\x10\x11rest"), (b"ls".to_vec(), true));

        let mut keys = DetachKeys::default();
        assert_eq!(keys.feed(b"a\x10"), (b"a".to_vec(), false));
        assert_eq!(keys.feed(b"\x11"), (Vec::new(), true));

        // Ctrl-P alone (shell history) still reaches the program, once the next key shows it is not a detach.
        let mut keys = DetachKeys::default();
        assert_eq!(keys.feed(b"\x10"), (Vec::new(), false));
        assert_eq!(keys.feed(b"\x10x"), (b"\x10\x10x".to_vec(), false));
        assert_eq!(keys.feed(b"\x10\x10\x11"), (b"\x10".to_vec(), true));
    }
}
