//! Sandbox stats (`GET /v1/sandboxes/{sandbox}/stats`) and metering (`/metrics`) on the real runner: CPU time, memory and disk move when a
//! sandbox burns CPU, holds memory and writes files, and fall back when it lets go.

mod common;

use std::time::Duration;

use common::{create, eventually, sh, shared_server};
use nook_api::ExecRequest;

const MIB: u64 = 1024 * 1024;

#[tokio::test]
async fn stats_follow_cpu_memory_and_disk() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "stats").await;

    let idle = client.sandbox_stats(&sandbox.id).await.unwrap();
    assert_eq!(idle.memory_limit_bytes, 256 * MIB);
    assert_eq!(idle.cpu_limit, 1.0);
    assert!(idle.pids >= 1, "{idle:?}");
    assert!(idle.started_at <= idle.at, "{idle:?}");
    assert!(idle.at - idle.started_at < chrono::Duration::minutes(2), "{idle:?}");
    assert!(
        idle.memory_used_bytes > 0 && idle.memory_used_bytes < 64 * MIB,
        "{idle:?}"
    );
    assert!(
        idle.disk_total_bytes > idle.disk_used_bytes && idle.disk_used_complete,
        "{idle:?}"
    );

    // Two seconds of a busy loop on a one-core allowance.
    let burn = sh(&client, &sandbox.id, "timeout 2 sh -c 'while :; do :; done'; echo done").await;
    assert_eq!(burn.stdout.trim(), "done", "{burn:?}");
    let burnt = client.sandbox_stats(&sandbox.id).await.unwrap();
    let cpu_s = (burnt.cpu_used_ns - idle.cpu_used_ns) as f64 / 1e9;
    assert!((1.2..=3.0).contains(&cpu_s), "a 2 s burn used {cpu_s} s of CPU");

    // 96 MiB held by a background process, then released.
    let holder = client
        .start_process(
            &sandbox.id,
            &ExecRequest {
                command: vec![
                    "python3".into(),
                    "-c".into(),
                    "import sys, time\nb = b'x' * (96 << 20)\nprint('held', flush=True)\ntime.sleep(120)".into(),
                ],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let held = loop {
        let stats = client.sandbox_stats(&sandbox.id).await.unwrap();
        if stats.memory_used_bytes >= burnt.memory_used_bytes + 90 * MIB {
            break stats;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the memory did not grow by the held 96 MiB: {} -> {}",
            burnt.memory_used_bytes,
            stats.memory_used_bytes
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(held.pids > burnt.pids, "{held:?}");
    client.signal_process(&sandbox.id, holder.pid, 9).await.unwrap();
    eventually("the memory is released", Duration::from_secs(20), || async {
        let stats = client.sandbox_stats(&sandbox.id).await.unwrap();
        stats.memory_used_bytes + 64 * MIB <= held.memory_used_bytes
    })
    .await;

    // 24 MiB written to the writable layer, then removed.
    let written = sh(
        &client,
        &sandbox.id,
        "head -c 25165824 /dev/urandom > /root/blob && sync && echo ok",
    )
    .await;
    assert_eq!(written.stdout.trim(), "ok", "{written:?}");
    let full = client.sandbox_stats(&sandbox.id).await.unwrap();
    assert!(
        full.disk_used_bytes >= idle.disk_used_bytes + 24 * MIB,
        "disk {} -> {}",
        idle.disk_used_bytes,
        full.disk_used_bytes
    );
    assert!(full.memory_cache_bytes > 0, "{full:?}");
    sh(&client, &sandbox.id, "rm /root/blob").await;
    let emptied = client.sandbox_stats(&sandbox.id).await.unwrap();
    assert!(
        emptied.disk_used_bytes + 20 * MIB <= full.disk_used_bytes,
        "{emptied:?}"
    );

    // The CLI shows the same figures.
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_nook"))
            .args(args)
            .env("NOOK_URL", &server.url)
            .env("NOOK_API_KEY", &server.key)
            .output()
            .expect("running nook")
    };
    let shown = cli(&["stats", &sandbox.name]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.status.success() && text.contains("cpu time") && text.contains("of 256.0 MiB"),
        "{text}"
    );
    let json = cli(&["stats", &sandbox.name, "--json"]);
    let parsed: nook_api::SandboxStats = serde_json::from_slice(&json.stdout).expect("nook stats --json");
    assert!(parsed.cpu_used_ns >= burnt.cpu_used_ns);

    // Only running sandboxes have stats.
    client.stop_sandbox(&sandbox.id).await.unwrap();
    let stopped = client.sandbox_stats(&sandbox.id).await.unwrap_err();
    assert_eq!(stopped.code(), Some("not_running"), "{stopped}");
    client.delete_sandbox(&sandbox.id).await.unwrap();
    let gone = client.sandbox_stats(&sandbox.id).await.unwrap_err();
    assert_eq!(gone.status().map(|s| s.as_u16()), Some(404), "{gone}");
}

#[tokio::test]
async fn metering_reports_peak_average_and_prometheus_metrics() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "metered").await;
    // 120 MiB held for a moment, then let go: the peak remembers it, the figure now does not.
    let held = sh(
        &client,
        &sandbox.id,
        "python3 -c 'b = bytearray(120 * 2**20); b[::4096] = b\"x\" * len(b[::4096]); del b; sum(range(10**6))'",
    )
    .await;
    assert_eq!(held.exit_code, Some(0), "{held:?}");
    let stats = client.sandbox_stats(&sandbox.id).await.unwrap();
    assert!(stats.memory_peak_bytes >= 120 << 20, "{stats:?}");
    assert!(stats.memory_used_bytes < 60 << 20, "{stats:?}");
    assert!(stats.memory_average_bytes > 0 && stats.memory_average_bytes < stats.memory_peak_bytes);
    assert!(stats.cpu_used_ns > 20_000_000, "{stats:?}");
    // It used no network: its interface carries only the kernel's own few packets (tests/network.rs meters real
    // traffic).
    assert!(stats.network_tx_bytes < 1 << 16, "{stats:?}");

    let response = reqwest::Client::new()
        .get(format!("{}/metrics", server.url))
        .bearer_auth(&server.key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = response.text().await.unwrap();
    let line = |family: &str| {
        let prefix = format!("{family}{{sandbox=\"{}\",name=\"{}\"}} ", sandbox.id, sandbox.name);
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {family} for the sandbox in:\n{text}"))
            .parse::<f64>()
            .unwrap()
    };
    assert!(line("nook_sandbox_cpu_seconds_total") > 0.02);
    assert!(line("nook_sandbox_memory_peak_bytes") >= (120u64 << 20) as f64);
    assert_eq!(line("nook_sandbox_memory_limit_bytes"), (256u64 << 20) as f64);
    assert!(text.contains("# TYPE nook_sandboxes gauge"));
    let running: f64 = text
        .lines()
        .find_map(|line| line.strip_prefix("nook_sandboxes{state=\"running\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(running >= 1.0);
    // Without the key, nothing.
    let anonymous = reqwest::get(format!("{}/metrics", server.url)).await.unwrap();
    assert_eq!(anonymous.status(), 401);
    client.delete_sandbox(&sandbox.id).await.unwrap();
}
