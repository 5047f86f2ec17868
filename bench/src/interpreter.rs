//! E2B's code interpreter, measured the way the `e2b-code-interpreter` SDKs reach it: nook's E2B REST API at the
//! server's root and sandbox traffic routed by the `E2b-Sandbox-Id` / `E2b-Sandbox-Port: 49999` headers, with real
//! Jupyter kernels in the sandbox.
//!
//! * [`InterpreterFigures::cold`]: create a sandbox from the `code-interpreter-v1` template, then `POST /execute`
//!   `1+1` and read the answer to its `end_of_execution` line; one sample per sandbox, from before the create call
//!   (the kernel starts with the sandbox). The sandbox is deleted afterwards, untimed.
//! * [`InterpreterFigures::round_trip`]: one sandbox, `/execute` `1+1` repeatedly (after one untimed warm-up).

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use crate::interrupt::Interrupt;
use crate::nook::Sandboxes;
use crate::stats::Summary;

/// The port the code interpreter is addressed as.
const INTERPRETER_PORT: &str = "49999";

/// The figures of the code-interpreter series.
#[derive(Debug, Clone, Copy)]
pub struct InterpreterFigures {
    /// Create (code-interpreter template) → first `1+1` result.
    pub cold: Summary,
    /// `/execute` `1+1` round trip in a warm kernel.
    pub round_trip: Summary,
}

/// A sandbox as the E2B API describes it: what `/execute` needs.
struct E2bSandbox {
    id: String,
    access_token: String,
}

/// Talks to nook's E2B surfaces over plain HTTP, as the SDKs do.
struct E2bClient {
    http: reqwest::Client,
    url: String,
    key: String,
}

impl E2bClient {
    async fn create(&self, sandboxes: &mut Sandboxes) -> anyhow::Result<E2bSandbox> {
        let answer: Value = self
            .http
            .post(format!("{}/sandboxes", self.url))
            .header("X-API-Key", &self.key)
            .json(&json!({"templateID": "code-interpreter-v1", "timeout": 3600}))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .context("creating a code-interpreter sandbox through the E2B API")?
            .json()
            .await
            .context("reading the E2B create answer")?;
        let field = |name: &str| {
            answer[name]
                .as_str()
                .map(str::to_string)
                .with_context(|| format!("the E2B create answer has no {name}: {answer}"))
        };
        let sandbox = E2bSandbox {
            id: field("sandboxID")?,
            access_token: field("envdAccessToken")?,
        };
        sandboxes.record(&sandbox.id);
        Ok(sandbox)
    }

    /// Runs `1+1` and reads the whole answer, failing unless its main result is `2`.
    async fn one_plus_one(&self, sandbox: &E2bSandbox) -> anyhow::Result<()> {
        let body = self
            .http
            .post(format!("{}/execute", self.url))
            .header("E2b-Sandbox-Id", &sandbox.id)
            .header("E2b-Sandbox-Port", INTERPRETER_PORT)
            .header("X-Access-Token", &sandbox.access_token)
            .json(&json!({"code": "1+1"}))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| format!("POST /execute in sandbox {}", sandbox.id))?
            .text()
            .await
            .context("reading the execution's lines")?;
        let lines: Vec<Value> = body
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .with_context(|| format!("an execution line is not JSON: {body}"))?;
        let answered = lines
            .iter()
            .any(|line| line["type"] == "result" && line["text"] == "2" && line["is_main_result"] == true);
        if !answered || lines.last().map(|line| &line["type"]) != Some(&json!("end_of_execution")) {
            bail!("1+1 did not answer 2 then end_of_execution: {body}");
        }
        Ok(())
    }
}

/// Runs both series; `cold` sandboxes are created one after another.
pub async fn code_interpreter(
    native: &nook_client::Client,
    url: &str,
    key: &str,
    cold: usize,
    runs: usize,
    sandboxes: &mut Sandboxes,
    interrupt: &Interrupt,
) -> anyhow::Result<InterpreterFigures> {
    let client = E2bClient {
        http: reqwest::Client::new(),
        url: url.to_string(),
        key: key.to_string(),
    };
    let mut cold_samples = Vec::with_capacity(cold);
    for i in 1..=cold {
        interrupt.check()?;
        eprintln!("code interpreter: create → first result {i}/{cold}...");
        let t0 = Instant::now();
        let sandbox = client.create(sandboxes).await?;
        client.one_plus_one(&sandbox).await?;
        cold_samples.push(t0.elapsed());
        sandboxes.delete(native, &sandbox.id).await?;
    }

    eprintln!("code interpreter: creating the sandbox for the round trips...");
    let sandbox = client.create(sandboxes).await?;
    client.one_plus_one(&sandbox).await?;
    let mut samples: Vec<Duration> = Vec::with_capacity(runs);
    for i in 1..=runs {
        interrupt.check()?;
        if i % 50 == 0 || i == runs {
            eprintln!("code interpreter: run_code {i}/{runs}...");
        }
        let t0 = Instant::now();
        client.one_plus_one(&sandbox).await?;
        samples.push(t0.elapsed());
    }
    sandboxes.delete(native, &sandbox.id).await?;
    Ok(InterpreterFigures {
        cold: Summary::of(&cold_samples).context("no samples: pass --interpreter-sandboxes 1 or more")?,
        round_trip: Summary::of(&samples).context("no samples: pass --interpreter-runs 1 or more")?,
    })
}
