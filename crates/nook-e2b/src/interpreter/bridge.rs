//! The in-sandbox half of the code interpreter: one `jupyter_bridge.py` process per sandbox, started over nook's
//! agent as a background process and spoken to through its stdin (written with `Control::input`) and its stdout
//! (followed by one attach stream), one JSON object per line; the protocol is described at the top of the script.
//!
//! [`Bridges`] starts a sandbox's bridge on first use (once, however many requests race for it) or adopts the one
//! already running after `nook serve` restarted, so kernels and their state outlive nook itself. A reader task
//! splits the bridge's output into lines and hands each to the request it answers; when the bridge ends, every
//! pending request is told and the next request starts a new one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nook_api::ExecRequest;
use nook_runner::ExecOutput;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, OnceCell};

use crate::E2b;

/// The bridge program, written into each sandbox before it is started.
const BRIDGE_SOURCE: &str = include_str!("jupyter_bridge.py");
/// Where bridges live inside a sandbox; the file name carries the source's hash, so a newer nook starts its own
/// bridge instead of adopting an older one.
const BRIDGE_DIR: &str = "/run/nook-e2b";
/// Output the agent keeps for a bridge (results with images are large lines).
const BRIDGE_OUTPUT_BUFFER: u64 = 8 << 20;
/// How long a new bridge may take to start its first kernel.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest piece of a request line sent in one input call.
const INPUT_PIECE: usize = 256 << 10;
/// Reply lines queued for one request before its reader is judged too slow and cut off.
const QUEUED_REPLIES: usize = 4096;
/// Stops a bridge whose output can no longer be followed.
const SIGKILL: i32 = 9;

/// A failure the HTTP layer answers with its status and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeFailure {
    /// The HTTP status.
    pub status: u16,
    /// What went wrong.
    pub message: String,
}

impl BridgeFailure {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// The running bridges, by sandbox id.
#[derive(Default)]
pub struct Bridges {
    slots: Mutex<HashMap<String, Arc<OnceCell<Arc<Bridge>>>>>,
}

impl Bridges {
    /// The sandbox's bridge, started or adopted if need be.
    pub async fn get(&self, e2b: &E2b, sandbox_id: &str) -> Result<Arc<Bridge>, BridgeFailure> {
        let slot = self
            .slots
            .lock()
            .expect("bridge table lock")
            .entry(sandbox_id.to_string())
            .or_default()
            .clone();
        let bridge = slot.get_or_try_init(|| Bridge::start(e2b, sandbox_id)).await?.clone();
        if bridge.is_alive() {
            return Ok(bridge);
        }
        // It ended since: forget it (unless a newer one replaced it already) and start another.
        self.forget(sandbox_id, &slot);
        Box::pin(self.get(e2b, sandbox_id)).await
    }

    /// Drops the table's entry for a bridge that ended (its sandbox was deleted or stopped, or it died), unless a
    /// newer bridge has taken its place.
    fn forget_ended(&self, sandbox_id: &str, bridge: &Arc<Bridge>) {
        let mut slots = self.slots.lock().expect("bridge table lock");
        if slots
            .get(sandbox_id)
            .and_then(|slot| slot.get())
            .is_some_and(|current| Arc::ptr_eq(current, bridge))
        {
            slots.remove(sandbox_id);
        }
    }

    fn forget(&self, sandbox_id: &str, slot: &Arc<OnceCell<Arc<Bridge>>>) {
        let mut slots = self.slots.lock().expect("bridge table lock");
        if slots.get(sandbox_id).is_some_and(|current| Arc::ptr_eq(current, slot)) {
            slots.remove(sandbox_id);
        }
    }

    /// Starts the sandbox's bridge in the background, so that its first kernel is up before the first request.
    pub fn prestart(self: &Arc<Self>, e2b: &E2b, sandbox_id: &str) {
        let (bridges, e2b, sandbox_id) = (self.clone(), e2b.clone(), sandbox_id.to_string());
        tokio::spawn(async move {
            if let Err(failure) = bridges.get(&e2b, &sandbox_id).await {
                tracing::warn!(sandbox = %sandbox_id, "the code interpreter did not start: {}", failure.message);
            }
        });
    }
}

/// Where one request's replies go.
type ReplySender = mpsc::Sender<Value>;

/// One sandbox's bridge process.
pub struct Bridge {
    control: Arc<nook_control::control::Control>,
    sandbox_id: String,
    pid: u32,
    /// Serialises writers, so that the pieces of one request line are never interleaved with another's.
    write_lock: tokio::sync::Mutex<()>,
    pending: Mutex<HashMap<u64, ReplySender>>,
    next_id: AtomicU64,
    /// Dropped by the reader task when the bridge's output ends.
    alive: mpsc::Sender<()>,
}

/// The bridge's program and arguments inside the sandbox.
fn bridge_argv() -> Vec<String> {
    let hash = hex::encode(&Sha256::digest(BRIDGE_SOURCE.as_bytes())[..8]);
    vec![
        "python3".into(),
        "-u".into(),
        format!("{BRIDGE_DIR}/jupyter-bridge-{hash}.py"),
    ]
}

impl Bridge {
    async fn start(e2b: &E2b, sandbox_id: &str) -> Result<Arc<Bridge>, BridgeFailure> {
        let control = &e2b.control;
        let unavailable = |failure: nook_control::error::ApiFailure| {
            BridgeFailure::new(
                502,
                format!("the sandbox's code interpreter is unreachable: {}", failure.message),
            )
        };
        let argv = bridge_argv();
        let running = control.processes(sandbox_id).await.map_err(unavailable)?;
        let (pid, offset, adopted) = match running
            .iter()
            .find(|process| process.running && process.command == argv)
        {
            Some(process) => (process.pid, process.output_bytes, true),
            None => {
                let source: nook_runner::ByteStream = Box::pin(std::io::Cursor::new(BRIDGE_SOURCE.as_bytes()));
                control
                    .write_file(sandbox_id, &argv[2], Some(0o644), true, Some((0, 0)), source)
                    .await
                    .map_err(|failure| {
                        BridgeFailure::new(500, format!("cannot install the code interpreter: {}", failure.message))
                    })?;
                let request = ExecRequest {
                    command: argv.clone(),
                    user: Some("root".into()),
                    cwd: Some("/".into()),
                    output_buffer_bytes: Some(BRIDGE_OUTPUT_BUFFER),
                    ..Default::default()
                };
                let process = control.spawn(sandbox_id, request).await.map_err(|failure| {
                    BridgeFailure::new(
                        500,
                        format!(
                            "cannot start the code interpreter (it needs python3 with jupyter_client and ipykernel): {}",
                            failure.message
                        ),
                    )
                })?;
                (process.pid, 0, false)
            }
        };
        // Held: the bridge waits on its pipe rather than have a reply line dropped from the replay buffer.
        let stream = control
            .follow_held(sandbox_id, pid, offset)
            .await
            .map_err(unavailable)?;
        let (alive, alive_rx) = mpsc::channel(1);
        let bridge = Arc::new(Bridge {
            control: control.clone(),
            sandbox_id: sandbox_id.to_string(),
            pid,
            write_lock: tokio::sync::Mutex::new(()),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            alive,
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        let ready_tx = if adopted { None } else { Some(ready_tx) };
        tokio::spawn(read_replies(
            Arc::downgrade(&e2b.interpreters),
            Arc::downgrade(&bridge),
            stream.events,
            ready_tx,
            alive_rx,
            sandbox_id.to_string(),
        ));
        if !adopted {
            match tokio::time::timeout(START_TIMEOUT, ready_rx).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(message))) => return Err(BridgeFailure::new(500, message)),
                Ok(Err(_)) => {
                    return Err(BridgeFailure::new(
                        500,
                        "the code interpreter ended while it started; see its output with `nook logs`",
                    ))
                }
                Err(_) => {
                    bridge.kill().await;
                    return Err(BridgeFailure::new(
                        500,
                        format!("the code interpreter did not start in {} s", START_TIMEOUT.as_secs()),
                    ));
                }
            }
        }
        Ok(bridge)
    }

    fn is_alive(&self) -> bool {
        !self.alive.is_closed()
    }

    /// Sends a request; replies (every line naming its id) arrive on the returned receiver, which ends when the
    /// request is answered for good or the bridge is gone.
    pub async fn call(&self, mut request: Value) -> Result<(u64, mpsc::Receiver<Value>), BridgeFailure> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        request["id"] = json!(id);
        let (sender, replies) = mpsc::channel(QUEUED_REPLIES);
        self.pending.lock().expect("pending lock").insert(id, sender);
        if let Err(failure) = self.send_line(&request).await {
            self.pending.lock().expect("pending lock").remove(&id);
            return Err(failure);
        }
        Ok((id, replies))
    }

    /// Sends a request that expects no reply.
    pub async fn notify(&self, request: &Value) {
        let _ = self.send_line(request).await;
    }

    async fn send_line(&self, request: &Value) -> Result<(), BridgeFailure> {
        let mut line = serde_json::to_vec(request).expect("JSON values serialise");
        line.push(b'\n');
        let _writer = self.write_lock.lock().await;
        for piece in line.chunks(INPUT_PIECE) {
            self.control
                .input(&self.sandbox_id, self.pid, piece.to_vec(), false)
                .await
                .map_err(|failure| {
                    BridgeFailure::new(502, format!("the code interpreter is gone: {}", failure.message))
                })?;
        }
        Ok(())
    }

    /// Stops the bridge process (its kernels end with it).
    async fn kill(&self) {
        let _ = self.control.signal(&self.sandbox_id, self.pid, SIGKILL).await;
    }

    /// Hands a reply line to its request; a request that stopped reading is dropped, a final reply ends it.
    fn dispatch(&self, reply: Value) {
        let Some(id) = reply.get("id").and_then(Value::as_u64) else {
            return;
        };
        let last = reply.get("done").is_some() || reply.get("ok").is_some() || reply.get("error").is_some();
        let mut pending = self.pending.lock().expect("pending lock");
        let Some(sender) = pending.get(&id) else {
            return;
        };
        let delivered = sender.try_send(reply).is_ok();
        if last || !delivered {
            // Not delivered: the reader is gone or too slow; dropping the sender ends its stream.
            pending.remove(&id);
        }
    }

    /// Ends every pending request with `message`.
    fn fail_all(&self, message: &str) {
        let pending = std::mem::take(&mut *self.pending.lock().expect("pending lock"));
        for (id, sender) in pending {
            let _ = sender.try_send(json!({"id": id, "error": {"status": 502, "message": message}}));
        }
    }
}

/// Reads the bridge's output until it ends: reply lines go to their requests, the start line to the starter.
async fn read_replies(
    bridges: std::sync::Weak<Bridges>,
    bridge: std::sync::Weak<Bridge>,
    mut events: mpsc::Receiver<ExecOutput>,
    mut ready: Option<oneshot::Sender<Result<(), String>>>,
    _alive: mpsc::Receiver<()>,
    sandbox_id: String,
) {
    let mut buffer: Vec<u8> = Vec::new();
    let mut diagnostics: Vec<u8> = Vec::new();
    let end = loop {
        let Some(event) = events.recv().await else {
            break "the code interpreter's output ended".to_string();
        };
        let Some(bridge) = bridge.upgrade() else {
            return;
        };
        match event {
            ExecOutput::Stdout(bytes) => {
                buffer.extend_from_slice(&bytes);
                while let Some(newline) = buffer.iter().position(|byte| *byte == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=newline).collect();
                    let Ok(reply) = serde_json::from_slice::<Value>(&line) else {
                        tracing::warn!(sandbox = %sandbox_id, "the code interpreter wrote a line that is not JSON");
                        continue;
                    };
                    if reply.get("ready").is_some() {
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(Ok(()));
                        }
                    } else if let Some(fatal) = reply.get("fatal").and_then(Value::as_str) {
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(Err(fatal.to_string()));
                        }
                    } else {
                        bridge.dispatch(reply);
                    }
                }
            }
            ExecOutput::Stderr(bytes) => {
                // Kept (bounded) to explain a bridge that dies while it starts.
                diagnostics.extend_from_slice(&bytes);
                let excess = diagnostics.len().saturating_sub(4096);
                diagnostics.drain(..excess);
            }
            ExecOutput::Attached { missed, .. } if missed > 0 => {
                break format!("{missed} bytes of the code interpreter's output were lost");
            }
            ExecOutput::Exit(_) => break "the code interpreter exited".to_string(),
            ExecOutput::Error { message, .. } => break format!("the code interpreter is unreachable: {message}"),
            _ => {}
        }
    };
    let detail = String::from_utf8_lossy(&diagnostics).trim().to_string();
    let message = if detail.is_empty() {
        end
    } else {
        format!("{end}: {detail}")
    };
    if let Some(ready) = ready.take() {
        let _ = ready.send(Err(message.clone()));
    }
    if let Some(bridge) = bridge.upgrade() {
        bridge.fail_all(&message);
        if let Some(bridges) = bridges.upgrade() {
            bridges.forget_ended(&sandbox_id, &bridge);
        }
        // Stop the process if it still runs: its output can no longer be read in order.
        bridge.kill().await;
    }
}
