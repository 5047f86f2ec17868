//! The bench's own `nook serve`: started as a child process on a free loopback port with a fresh data directory and
//! a random admin key, and stopped again at the end.
//!
//! [`NookServer::spawn`] starts the process in its own process group (so a Ctrl-C in the terminal reaches only the
//! bench, which then cleans up in order), with its log written to a file; [`NookServer::wait_ready`] polls
//! `GET /v1/health` until it answers, failing early with the log's tail if the process exits. [`NookServer::stop`]
//! sends SIGTERM and waits, then SIGKILL; dropping a server that was not stopped does the same. nook leaves sandboxes
//! running when it stops, so the caller deletes its sandboxes first. [`NookServer::memory`] reads the process's peak
//! and current resident memory from `/proc`.

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use nook_client::Client;
use rand::Rng as _;

use crate::interrupt::Interrupt;

/// How long the server has to exit after SIGTERM before it gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// What the server is started with.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The `nook` binary.
    pub nook: PathBuf,
    /// The static `nook-agent` binary.
    pub agent: PathBuf,
    /// The base rootfs tar, imported as image `base` on first start.
    pub base_image_tar: PathBuf,
    /// The data directory (created by the server).
    pub data_dir: PathBuf,
    /// Where the server's stdout and stderr go.
    pub log: PathBuf,
    /// The btrfs image file the server keeps its runner's data in (`--storage-image`).
    pub storage_image: PathBuf,
    /// A config file (`--config`).
    pub config: PathBuf,
}

/// A running `nook serve` child process.
#[derive(Debug)]
pub struct NookServer {
    child: Option<Child>,
    /// The server's base URL (`http://127.0.0.1:PORT`).
    pub url: String,
    /// The admin key it accepts.
    pub key: String,
    log: PathBuf,
}

impl NookServer {
    /// Starts `nook serve` on a free loopback port.
    pub fn spawn(options: &ServerOptions) -> anyhow::Result<Self> {
        let port = free_loopback_port()?;
        let key = format!("nook-bench-{:032x}", rand::thread_rng().gen::<u128>());
        let log = File::create(&options.log).with_context(|| format!("creating {}", options.log.display()))?;
        let log_err = log.try_clone().context("duplicating the server log's file handle")?;
        let listen = format!("{}:{port}", Ipv4Addr::LOCALHOST);
        let child = Command::new(&options.nook)
            .arg("serve")
            .arg("--listen")
            .arg(&listen)
            .arg("--data-dir")
            .arg(&options.data_dir)
            .arg("--no-client-config")
            .arg("--storage-image")
            .arg(&options.storage_image)
            .arg("--config")
            .arg(&options.config)
            .env("NOOK_ADMIN_KEY", &key)
            .env("NOOK_AGENT_BINARY", &options.agent)
            .env("NOOK_BASE_IMAGE_TAR", &options.base_image_tar)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {} serve", options.nook.display()))?;
        Ok(Self {
            child: Some(child),
            url: format!("http://{listen}"),
            key,
            log: options.log.clone(),
        })
    }

    /// Waits until `GET /v1/health` answers, the process exits, `timeout` passes or the user interrupts.
    pub async fn wait_ready(
        &mut self,
        client: &Client,
        timeout: Duration,
        interrupt: &Interrupt,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            interrupt.check()?;
            if client.health().await.is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().context("checking on nook serve")? {
                    self.child = None;
                    bail!(
                        "nook serve exited ({status}) before it was ready; its log ends with:\n{}",
                        self.log_tail(30)
                    );
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "nook serve did not answer GET /v1/health within {} s; its log ends with:\n{}",
                    timeout.as_secs(),
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The server process's memory as `/proc/<pid>/status` states it now.
    pub fn memory(&self) -> anyhow::Result<ProcessMemory> {
        let child = self.child.as_ref().context("nook serve is not running")?;
        let path = format!("/proc/{}/status", child.id());
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        ProcessMemory::parse(&status).with_context(|| format!("{path} has no VmHWM or VmRSS line"))
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Stops the server: SIGTERM, then SIGKILL after a grace period. Does nothing when it already stopped.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if child.try_wait().context("checking on nook serve")?.is_some() {
            return Ok(());
        }
        let pid = Pid::from_raw(i32::try_from(child.id()).context("the server's pid does not fit an i32")?);
        kill(pid, Signal::SIGTERM).context("sending SIGTERM to nook serve")?;
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if child.try_wait().context("waiting for nook serve")?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "nook serve did not stop within {} s of SIGTERM; killing it",
            STOP_GRACE.as_secs()
        );
        child.kill().context("killing nook serve")?;
        child.wait().context("reaping nook serve")?;
        Ok(())
    }
}

impl Drop for NookServer {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            eprintln!("could not stop nook serve: {error:#}");
        }
    }
}

/// A process's resident memory, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessMemory {
    /// The peak resident set size so far (`VmHWM`), in KiB.
    pub peak_kib: u64,
    /// The resident set size now (`VmRSS`), in KiB.
    pub current_kib: u64,
}

impl ProcessMemory {
    /// Reads `VmHWM` and `VmRSS` from the text of a `/proc/<pid>/status` file.
    fn parse(status: &str) -> Option<Self> {
        let field = |name: &str| {
            status.lines().find_map(|line| {
                let value = line.strip_prefix(name)?.strip_prefix(':')?.trim();
                value.strip_suffix("kB")?.trim().parse::<u64>().ok()
            })
        };
        Some(Self {
            peak_kib: field("VmHWM")?,
            current_kib: field("VmRSS")?,
        })
    }
}

/// The server's memory sampled just before the file transfers and just after them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryAroundFiles {
    /// Before the first transfer (after every other nook series).
    pub before: ProcessMemory,
    /// After the last transfer.
    pub after: ProcessMemory,
}

/// A loopback TCP port that was free a moment ago (bound, then released for the server to take).
fn free_loopback_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free loopback port")?;
    Ok(listener.local_addr().context("reading the bound port")?.port())
}

/// The last `lines` lines of the file at `path`, or a note saying it could not be read.
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_read_from_proc_status() {
        let status = "Name:\tnook\nVmPeak:\t  900 kB\nVmHWM:\t   51200 kB\nVmRSS:\t   40960 kB\nThreads:\t4\n";
        assert_eq!(
            ProcessMemory::parse(status),
            Some(ProcessMemory {
                peak_kib: 51200,
                current_kib: 40960
            })
        );
        assert_eq!(ProcessMemory::parse("Name:\tnook\n"), None);
    }

    #[test]
    fn own_memory_can_be_read() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let memory = ProcessMemory::parse(&status).unwrap();
        assert!(memory.peak_kib >= memory.current_kib && memory.current_kib > 0);
    }
}
