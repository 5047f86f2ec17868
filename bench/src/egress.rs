//! The egress proxy's cost: HTTP from a sandbox to a test host the bench makes (a network namespace of its own,
//! joined by a veth pair, running a small Node.js server), straight through NAT (the default policy) and through the
//! egress proxy (a policy with a domain rule, which sends the sandbox's TCP to the proxy to be judged by its Host).
//!
//! A Node.js client inside the sandbox times requests one at a time, on a new connection each (what the proxy
//! judges) and on one kept-alive connection (what it relays), then counts the requests 16 kept-alive connections
//! complete in 5 s. The test host and its namespace are removed at the end, whatever happened.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use nook_api::{CreateSandboxRequest, EgressAction, EgressMode, EgressRule, ExecRequest, NetworkPolicy};
use nook_client::Client;

use crate::nook::Sandboxes;
use crate::stats::Summary;

/// The test host's name, as the bench server's resolver answers it.
pub const HOST_NAME: &str = "egress-bench.test";
/// The test host's address (a documentation block that nook treats as public), and the host side of its /31.
pub const HOST_ADDRESS: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 41);
const PEER_ADDRESS: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 40);
const NAMESPACE: &str = "nook-bench-egress";
const LINK: &str = "nbe-host";

/// The server on the test host: answers `ok` to everything.
const SERVER: &str = "require('http').createServer((q, s) => { s.writeHead(200, {'content-type': 'text/plain', \
                      'content-length': 2}); s.end('ok'); }).listen(80, '0.0.0.0')";

/// The client in the sandbox: prints one JSON line of figures for `URL` (argv[1]) and `N` (argv[2]).
const CLIENT: &str = r#"
const http = require('http');
const [url, n] = [process.argv[2], Number(process.argv[3])];
const get = (agent) => new Promise((resolve, reject) => {
  const started = process.hrtime.bigint();
  http.get(url, { agent }, (res) => {
    res.resume();
    res.on('end', () => resolve(Number(process.hrtime.bigint() - started) / 1e6));
  }).on('error', reject);
});
(async () => {
  const fresh = [], kept = [];
  for (let i = 0; i < n; i++) fresh.push(await get(new http.Agent({ keepAlive: false })));
  const agent = new http.Agent({ keepAlive: true, maxSockets: 16 });
  for (let i = 0; i < n; i++) kept.push(await get(agent));
  let done = 0;
  const until = Date.now() + 5000;
  const worker = async () => { while (Date.now() < until) { await get(agent); done++; } };
  await Promise.all(Array.from({ length: 16 }, worker));
  console.log(JSON.stringify({ fresh, kept, per_s: done / 5 }));
})().catch((error) => { console.error(String(error)); process.exit(1); });
"#;

/// One way out: the timings of one sandbox's client.
#[derive(Debug, Clone)]
pub struct Way {
    /// One request at a time, a new connection each.
    pub fresh: Summary,
    /// One request at a time on a kept-alive connection.
    pub kept: Summary,
    /// Requests per second over 16 kept-alive connections.
    pub per_s: f64,
}

/// The egress series' figures.
#[derive(Debug, Clone)]
pub struct EgressFigures {
    /// Through NAT, judged in the kernel only.
    pub direct: Way,
    /// Through the egress proxy.
    pub proxied: Way,
}

/// The test host, removed when dropped.
struct TestHost {
    server: std::process::Child,
}

impl TestHost {
    fn start() -> anyhow::Result<Self> {
        remove_host();
        let ip = |args: &[&str]| -> anyhow::Result<()> {
            let status = Command::new("ip").args(args).status().context("running ip")?;
            if !status.success() {
                bail!("ip {} failed", args.join(" "));
            }
            Ok(())
        };
        ip(&["netns", "add", NAMESPACE])?;
        ip(&[
            "link", "add", LINK, "type", "veth", "peer", "name", "eth0", "netns", NAMESPACE,
        ])?;
        ip(&["addr", "add", &format!("{PEER_ADDRESS}/31"), "dev", LINK])?;
        ip(&["link", "set", LINK, "up"])?;
        ip(&[
            "-n",
            NAMESPACE,
            "addr",
            "add",
            &format!("{HOST_ADDRESS}/31"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", NAMESPACE, "link", "set", "eth0", "up"])?;
        ip(&["-n", NAMESPACE, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            NAMESPACE,
            "route",
            "add",
            "default",
            "via",
            &PEER_ADDRESS.to_string(),
        ])?;
        let server = Command::new("ip")
            .args(["netns", "exec", NAMESPACE, "node", "-e", SERVER])
            .spawn()
            .context("starting the test host's Node.js server (is node installed?)")?;
        Ok(Self { server })
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        remove_host();
    }
}

fn remove_host() {
    let quiet = |args: &[&str]| {
        let _ = Command::new("ip")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status();
    };
    quiet(&["link", "delete", LINK]);
    quiet(&["netns", "delete", NAMESPACE]);
}

/// The bench server's config: its resolver answers the test host's name.
pub fn server_config() -> String {
    format!("[network.dns_records]\n\"{HOST_NAME}\" = [\"{HOST_ADDRESS}\"]\n")
}

/// Runs the series with `n` timed requests each way.
pub async fn egress_series(client: &Client, n: usize, sandboxes: &mut Sandboxes) -> anyhow::Result<EgressFigures> {
    eprintln!("starting the egress test host...");
    let _host = TestHost::start()?;
    let judged = NetworkPolicy {
        egress: EgressMode::Rules,
        rules: vec![EgressRule {
            action: EgressAction::Allow,
            to: HOST_NAME.into(),
            ports: Vec::new(),
        }],
        default: None,
    };
    eprintln!("egress straight through NAT...");
    let direct = run_client(client, sandboxes, None, &format!("http://{HOST_ADDRESS}/"), n).await?;
    eprintln!("egress through the proxy...");
    let proxied = run_client(client, sandboxes, Some(judged), &format!("http://{HOST_NAME}/"), n).await?;
    Ok(EgressFigures { direct, proxied })
}

async fn run_client(
    client: &Client,
    sandboxes: &mut Sandboxes,
    network: Option<NetworkPolicy>,
    url: &str,
    n: usize,
) -> anyhow::Result<Way> {
    let id = sandboxes
        .create_with(
            client,
            &CreateSandboxRequest {
                network,
                ..Default::default()
            },
        )
        .await?;
    let wrote = client
        .exec(
            &id,
            &ExecRequest {
                shell: Some(format!("cat > /tmp/client.js <<'EOF'\n{CLIENT}\nEOF")),
                ..Default::default()
            },
        )
        .await?;
    anyhow::ensure!(wrote.exit_code == Some(0), "writing the client failed: {wrote:?}");
    // The server may take a moment to listen: the first request is retried for a few seconds.
    let mut last = String::new();
    for _ in 0..50 {
        let result = client
            .exec(
                &id,
                &ExecRequest {
                    command: vec!["node".into(), "/tmp/client.js".into(), url.into(), n.to_string()],
                    ..Default::default()
                },
            )
            .await?;
        if result.exit_code == Some(0) {
            let figures: serde_json::Value =
                serde_json::from_str(result.stdout.trim()).context("reading the client's figures")?;
            let series = |name: &str| -> anyhow::Result<Summary> {
                let samples: Vec<Duration> = figures[name]
                    .as_array()
                    .context("a series of timings")?
                    .iter()
                    .filter_map(serde_json::Value::as_f64)
                    .map(|ms| Duration::from_secs_f64(ms / 1000.0))
                    .collect();
                Summary::of(&samples).context("no samples")
            };
            let way = Way {
                fresh: series("fresh")?,
                kept: series("kept")?,
                per_s: figures["per_s"].as_f64().unwrap_or_default(),
            };
            sandboxes.delete(client, &id).await?;
            return Ok(way);
        }
        last = format!("{}{}", result.stdout, result.stderr);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("the client in the sandbox could not reach {url}: {last}")
}
