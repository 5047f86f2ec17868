//! A template's start command and readiness check, run on every start of a sandbox made from the template.
//!
//! E2B templates (and nook images built with a start command) name a process that must be running when a sandbox
//! starts — a dev server, a Jupyter server — and a shell command that says when it is ready. After the sandbox
//! boots, [`start_and_wait`] starts the start command as a background process (so that clients can list it, read
//! its output and signal it like any other), then runs the readiness check until it exits 0. The sandbox is reported
//! running only then. The check is retried with a short, growing pause (it asks the sandbox a question no event
//! answers); the whole wait is bounded by the template's `ready_timeout_s`, and ends at once when the start command
//! exits. Either failure names the command and ends with its last output lines, so a broken template explains itself.

use std::time::{Duration, Instant};

use nook_api::{TemplateStart, DEFAULT_READY_TIMEOUT_S, MAX_READY_TIMEOUT_S};

use crate::{ExecOptions, ExecOutput, LocalRunner, Runner, RunnerError};

/// Bytes of the start command's output kept for replay (as for any background process started without a size).
const START_OUTPUT_BUFFER: u64 = 1 << 20;
/// The first pause between two readiness checks; it doubles up to [`MAX_CHECK_PAUSE`].
const FIRST_CHECK_PAUSE: Duration = Duration::from_millis(20);
/// The longest pause between two readiness checks.
const MAX_CHECK_PAUSE: Duration = Duration::from_millis(500);
/// Bytes of output quoted in a failure message.
const QUOTED_OUTPUT: usize = 2048;

/// The shell command line `command` as the argv the agent runs.
fn shell(command: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), command.into()]
}

/// Starts the template's start command in the running sandbox `id` and waits until its readiness check passes.
pub(crate) async fn start_and_wait(runner: &LocalRunner, id: &str, start: &TemplateStart) -> Result<(), RunnerError> {
    let timeout_s = start
        .ready_timeout_s
        .unwrap_or(DEFAULT_READY_TIMEOUT_S)
        .min(MAX_READY_TIMEOUT_S);
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    let options = ExecOptions {
        argv: shell(&start.command),
        output_buffer: Some(START_OUTPUT_BUFFER),
        ..ExecOptions::default()
    };
    let pid = runner
        .spawn(id, options)
        .await
        .map_err(|error| not_ready(id, start, error.to_string()))?;
    let Some(ready_command) = &start.ready_command else {
        return Ok(());
    };
    let checks = wait_for_check(runner, id, ready_command, deadline);
    let exited = runner.wait(id, pid);
    tokio::select! {
        checked = checks => match checked {
            Ok(()) => Ok(()),
            Err(last) => {
                let output = output_tail(runner, id, pid).await;
                Err(not_ready(
                    id,
                    start,
                    format!("its readiness check `{ready_command}` did not pass within {timeout_s} s ({last}){output}"),
                ))
            }
        },
        exit = exited => {
            let how = match exit {
                Ok(exit) => match (exit.code, exit.signal) {
                    (Some(code), _) => format!("exited with code {code}"),
                    (None, Some(signal)) => format!("was killed by signal {signal}"),
                    _ => "ended".to_string(),
                },
                Err(error) => format!("could not be watched ({error})"),
            };
            let output = output_tail(runner, id, pid).await;
            Err(not_ready(id, start, format!("it {how} before its readiness check passed{output}")))
        }
    }
}

/// Runs the readiness check until it exits 0 (`Ok`) or the deadline passes (`Err` with how the last check ended).
async fn wait_for_check(runner: &LocalRunner, id: &str, command: &str, deadline: Instant) -> Result<(), String> {
    let mut pause = FIRST_CHECK_PAUSE;
    let mut last = "it never ran".to_string();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(last);
        }
        let options = ExecOptions {
            argv: shell(command),
            timeout_ms: Some(left.as_millis().max(1) as u64),
            ..ExecOptions::default()
        };
        match run_to_exit(runner, id, options).await {
            Ok(Some(0)) => return Ok(()),
            Ok(Some(code)) => last = format!("the last check exited with code {code}"),
            Ok(None) => last = "the last check was killed".to_string(),
            Err(error) => last = format!("the last check could not run: {error}"),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(pause.min(left)).await;
        pause = (pause * 2).min(MAX_CHECK_PAUSE);
    }
}

/// Runs a command to its end, dropping its output; its exit code (`None`: killed by a signal).
async fn run_to_exit(runner: &LocalRunner, id: &str, options: ExecOptions) -> Result<Option<i32>, RunnerError> {
    let mut stream = runner.exec(id, options).await?;
    drop(stream.input);
    while let Some(event) = stream.events.recv().await {
        match event {
            ExecOutput::Exit(exit) => return Ok(exit.code),
            ExecOutput::Error { code, message } => return Err(RunnerError::Process { code, message }),
            _ => {}
        }
    }
    Err(RunnerError::Process {
        code: "agent_disconnected".into(),
        message: "the check's output ended before it did".into(),
    })
}

/// The end of a background process's output so far, as `: last output:\n…` (empty when it wrote nothing).
async fn output_tail(runner: &LocalRunner, id: &str, pid: u32) -> String {
    let Ok(mut stream) = runner.attach(id, pid, 0, false, false).await else {
        return String::new();
    };
    let mut output: Vec<u8> = Vec::new();
    while let Some(event) = stream.events.recv().await {
        match event {
            ExecOutput::Stdout(bytes) | ExecOutput::Stderr(bytes) => {
                output.extend_from_slice(&bytes);
                if output.len() > 2 * QUOTED_OUTPUT {
                    output.drain(..output.len() - QUOTED_OUTPUT);
                }
            }
            ExecOutput::End { .. } | ExecOutput::Exit(_) | ExecOutput::Error { .. } => break,
            _ => {}
        }
    }
    let start = output.len().saturating_sub(QUOTED_OUTPUT);
    let text = String::from_utf8_lossy(&output[start..]);
    let text = text.trim_end();
    if text.is_empty() {
        String::new()
    } else {
        format!("; its last output:\n{text}")
    }
}

fn not_ready(id: &str, start: &TemplateStart, why: String) -> RunnerError {
    RunnerError::NotReady {
        sandbox_id: id.to_string(),
        message: format!(
            "the template's start command `{}` did not become ready: {why}",
            start.command
        ),
    }
}
