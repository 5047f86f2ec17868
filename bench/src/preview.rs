//! The preview proxy's cost: a small Node.js server in a sandbox, asked from the host directly (the sandbox's
//! address) and through nook's preview proxy (path routing, with the port's token), one request at a time for
//! latency and under load from `wrk` for throughput, when wrk is installed (bench/run.sh installs it).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use nook_api::ExecRequest;
use nook_client::Client;

use crate::interrupt::Interrupt;
use crate::nook::Sandboxes;
use crate::stats::Summary;

/// The port the server listens on inside the sandbox.
const PORT: u16 = 8000;
/// A server that answers `ok` to everything, on every address.
const SERVER: &str = "require('http').createServer((q, s) => { s.writeHead(200, {'content-type': 'text/plain', \
                      'content-length': 2}); s.end('ok'); }).listen(8000, '0.0.0.0')";

/// One load run of wrk.
#[derive(Debug, Clone)]
pub struct Load {
    /// Requests answered per second.
    pub requests_per_s: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
}

/// The preview proxy's figures.
#[derive(Debug, Clone)]
pub struct PreviewFigures {
    /// One request at a time straight to the sandbox's address (keep-alive); `None` without an address.
    pub direct: Option<Summary>,
    /// One request at a time through the proxy (keep-alive).
    pub proxied: Summary,
    /// wrk straight to the sandbox, or why there is no figure.
    pub direct_load: Result<Load, String>,
    /// wrk through the proxy, or why there is no figure.
    pub proxied_load: Result<Load, String>,
    /// wrk's settings, for the report.
    pub load_settings: String,
}

/// Runs the series: `n` sequential requests each way, then 5 s of wrk each way.
pub async fn preview_series(
    client: &Client,
    server_url: &str,
    n: usize,
    sandboxes: &mut Sandboxes,
    interrupt: &Interrupt,
) -> anyhow::Result<PreviewFigures> {
    eprintln!("creating the sandbox for the preview proxy series...");
    let id = sandboxes.create(client).await?;
    client
        .start_process(
            &id,
            &ExecRequest {
                command: vec!["node".into(), "-e".into(), SERVER.into()],
                ..Default::default()
            },
        )
        .await
        .context("starting the Node.js server in the sandbox")?;
    let access = client.port_access(&id, PORT).await?;
    let proxied_url = format!("{server_url}/preview/{id}/{PORT}/");
    let http = reqwest::Client::new();
    let ask = |url: String| {
        let request = http.get(url).header("nook-preview-token", &access.token);
        async move {
            let response = request.send().await?;
            anyhow::ensure!(response.status() == 200, "answered {}", response.status());
            response.bytes().await?;
            anyhow::Ok(())
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while ask(proxied_url.clone()).await.is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the sandbox's server did not answer within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sandbox = client.sandbox(&id).await?;
    let direct_url = sandbox
        .address
        .as_ref()
        .map(|address| format!("http://{address}:{PORT}/"));

    let time = |url: String, what: &'static str| {
        let ask = &ask;
        async move {
            let mut samples = Vec::with_capacity(n);
            for _ in 0..n {
                interrupt.check()?;
                let started = Instant::now();
                ask(url.clone()).await.with_context(|| format!("a request {what}"))?;
                samples.push(started.elapsed());
            }
            Summary::of(&samples).context("no samples: pass --preview-requests 1 or more")
        }
    };
    eprintln!("{n} requests through the preview proxy...");
    let proxied = time(proxied_url.clone(), "through the preview proxy").await?;
    let direct = match &direct_url {
        Some(url) => {
            eprintln!("{n} requests straight to the sandbox...");
            Some(time(url.clone(), "straight to the sandbox").await?)
        }
        None => None,
    };
    let load_settings = "wrk -t2 -c16 -d5s --latency".to_string();
    let direct_load = match &direct_url {
        Some(url) => wrk(url, None).await,
        None => Err("the sandbox has no address".into()),
    };
    let proxied_load = wrk(&proxied_url, Some(&access.token)).await;
    sandboxes.delete(client, &id).await?;
    Ok(PreviewFigures {
        direct,
        proxied,
        direct_load,
        proxied_load,
        load_settings,
    })
}

/// Five seconds of wrk against `url`.
async fn wrk(url: &str, token: Option<&str>) -> Result<Load, String> {
    eprintln!("wrk against {url}...");
    let mut command = tokio::process::Command::new("wrk");
    command.args(["-t2", "-c16", "-d5s", "--latency"]);
    if let Some(token) = token {
        command.arg("-H").arg(format!("nook-preview-token: {token}"));
    }
    let output = command
        .arg(url)
        .output()
        .await
        .map_err(|error| format!("wrk could not run ({error}); bench/run.sh installs it"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "wrk failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    if text.contains("Non-2xx") {
        return Err(format!("some answers were errors:\n{text}"));
    }
    parse_wrk(&text).ok_or_else(|| format!("wrk's output was not understood:\n{text}"))
}

/// Requests/s and the 50% and 99% latencies of wrk's `--latency` output.
fn parse_wrk(text: &str) -> Option<Load> {
    let value = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|line| line.strip_prefix(prefix))
            .map(str::trim)
    };
    let requests_per_s = value("Requests/sec:")?.parse().ok()?;
    Some(Load {
        requests_per_s,
        p50_ms: milliseconds(value("50%")?)?,
        p99_ms: milliseconds(value("99%")?)?,
    })
}

/// `812.00us`, `1.23ms`, `1.05s` in milliseconds.
fn milliseconds(text: &str) -> Option<f64> {
    let (number, scale) = if let Some(number) = text.strip_suffix("us") {
        (number, 0.001)
    } else if let Some(number) = text.strip_suffix("ms") {
        (number, 1.0)
    } else if let Some(number) = text.strip_suffix('s') {
        (number, 1000.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|value| value * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read() {
        let text = "Running 5s test @ http://127.0.0.1:1/\n  2 threads and 16 connections\n  Latency Distribution\n     \
                    50%  812.00us\n     75%    1.10ms\n     90%    1.50ms\n     99%    3.05ms\n  52011 requests in 5.00s, \
                    4.22MB read\nRequests/sec:  10401.86\nTransfer/sec:    864.00KB\n";
        let load = parse_wrk(text).unwrap();
        assert_eq!(load.requests_per_s, 10401.86);
        assert!((load.p50_ms - 0.812).abs() < 1e-9);
        assert_eq!(load.p99_ms, 3.05);
        assert_eq!(milliseconds("1.5s"), Some(1500.0));
    }
}
