//! Live resizing, observed from inside the sandbox: a CPU quota raised lets a busy loop use more CPU per second, a
//! memory limit raised lets an allocation that was killed succeed, and lowering below what is in use is refused. A
//! disk quota stops a writer inside the sandbox with "Disk quota exceeded" while other sandboxes write on, and can be
//! raised. Every resize is an event, and the limits survive a stop and start.

mod common;

use common::{create_with, sh, shared_server};
use nook_api::{ResourceRequest, SandboxState, StateReason};

/// CPU seconds a busy loop gets in one second of wall-clock time, as the sandbox's own process sees it.
const CPU_PER_SECOND: &str = "python3 -c 'import time
end = time.time() + 1.0
while time.time() < end: pass
print(round(time.process_time(), 3))'";

/// Allocates and touches 200 MiB; prints `ok` when it got it.
const ALLOCATE_200_MIB: &str =
    "python3 -c 'b = bytearray(200 * 2**20); b[::4096] = b\"x\" * len(b[::4096]); print(\"ok\")'";

async fn cpu_per_second(client: &nook_client::Client, sandbox: &str) -> f64 {
    let result = sh(client, sandbox, CPU_PER_SECOND).await;
    assert_eq!(result.exit_code, Some(0), "{result:?}");
    result.stdout.trim().parse().unwrap()
}

#[tokio::test]
async fn cpu_and_memory_change_live() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create_with(
        &client,
        "resize",
        ResourceRequest {
            cpu: Some(0.2),
            memory_mb: Some(128),
            memory_max_mb: None,
            pids: Some(256),
            disk_mb: None,
        },
    )
    .await;
    // The process that will still be there after the resizes: nothing restarts.
    let survivor = client
        .start_process(
            &sandbox.id,
            &nook_api::ExecRequest {
                shell: Some("sleep 600".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    let slow = cpu_per_second(&client, &sandbox.id).await;
    let killed = sh(&client, &sandbox.id, ALLOCATE_200_MIB).await;
    assert_ne!(
        killed.stdout.trim(),
        "ok",
        "200 MiB fit under a 128 MiB limit: {killed:?}"
    );

    let resized = client
        .update_resources(
            &sandbox.id,
            &ResourceRequest {
                cpu: Some(1.0),
                memory_mb: Some(512),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((resized.resources.cpu, resized.resources.memory_mb), (1.0, 512));
    assert_eq!(resized.state, SandboxState::Running);
    assert_eq!(resized.state_reason, StateReason::Resized);
    assert!(
        resized.state_message.contains("memory 128 → 512 MiB"),
        "{}",
        resized.state_message
    );

    let fast = cpu_per_second(&client, &sandbox.id).await;
    eprintln!("a busy loop got {slow} CPU s/s at 0.2 cores and {fast} at 1 core");
    assert!(slow < 0.35, "a 0.2-core quota let a loop use {slow} CPU s per second");
    assert!(
        fast > 2.0 * slow,
        "raising the quota to 1 core did not help: {slow} → {fast}"
    );
    let allocated = sh(&client, &sandbox.id, ALLOCATE_200_MIB).await;
    assert_eq!(allocated.stdout.trim(), "ok", "{allocated:?}");
    let stats = client.sandbox_stats(&sandbox.id).await.unwrap();
    assert_eq!(stats.memory_limit_bytes, 512 << 20);
    assert_eq!(stats.cpu_limit, 1.0);

    // Down again, with a process holding 100 MiB: below that is refused, above it works.
    let holder = client
        .start_process(
            &sandbox.id,
            &nook_api::ExecRequest {
                shell: Some(
                    "python3 -c 'import time; b = bytearray(100 * 2**20); b[::4096] = b\"x\" * len(b[::4096]); \
                     print(\"held\", flush=True); time.sleep(600)'"
                        .into(),
                ),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    common::eventually(
        "the holder holds its memory",
        std::time::Duration::from_secs(20),
        || async { client.sandbox_stats(&sandbox.id).await.unwrap().memory_used_bytes > 100 << 20 },
    )
    .await;
    let refused = client
        .update_resources(
            &sandbox.id,
            &ResourceRequest {
                memory_mb: Some(64),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("below_usage"), "{refused}");
    assert!(refused.to_string().contains("MiB the sandbox uses now"), "{refused}");
    let lowered = client
        .update_resources(
            &sandbox.id,
            &ResourceRequest {
                memory_mb: Some(256),
                cpu: Some(0.5),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(lowered.resources.memory_mb, 256);
    let processes = client.processes(&sandbox.id).await.unwrap();
    for pid in [survivor.pid, holder.pid] {
        assert!(
            processes.iter().any(|process| process.pid == pid && process.running),
            "process {pid} did not survive the resizes: {processes:?}"
        );
    }

    // Out-of-range limits are refused before anything changes; limits survive a stop and start.
    let error = client
        .update_resources(
            &sandbox.id,
            &ResourceRequest {
                cpu: Some(1000.0),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("invalid_request"), "{error}");
    client.stop_sandbox(&sandbox.id).await.unwrap();
    client.start_sandbox(&sandbox.id).await.unwrap();
    let stats = client.sandbox_stats(&sandbox.id).await.unwrap();
    assert_eq!((stats.cpu_limit, stats.memory_limit_bytes), (0.5, 256 << 20));
    let events = client.sandbox_events(&sandbox.id).await.unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|event| event.reason == StateReason::Resized)
            .count(),
        2
    );
    client.delete_sandbox(&sandbox.id).await.unwrap();
}

#[tokio::test]
async fn a_disk_quota_stops_only_its_own_writer_and_can_grow() {
    let server = shared_server();
    let client = server.client();
    let limited = create_with(
        &client,
        "quota",
        ResourceRequest {
            disk_mb: Some(64),
            ..Default::default()
        },
    )
    .await;
    let neighbour = create_with(&client, "quota-free", ResourceRequest::default()).await;
    assert_eq!(limited.resources.disk_mb, Some(64));

    let write_100_mb = "dd if=/dev/zero of=/big bs=1M count=100 2>&1; echo status=$?";
    let stopped = sh(&client, &limited.id, write_100_mb).await;
    assert!(
        stopped.stdout.contains("Disk quota exceeded") && stopped.stdout.contains("status=1"),
        "{stopped:?}"
    );
    // Nothing else is touched: another sandbox writes the same 100 MB, and the limited one still works.
    let free = sh(&client, &neighbour.id, write_100_mb).await;
    assert!(free.stdout.contains("status=0"), "{free:?}");
    assert_eq!(sh(&client, &limited.id, "rm /big && echo fine").await.stdout, "fine\n");
    let stats = client.sandbox_stats(&limited.id).await.unwrap();
    assert_eq!(stats.disk_total_bytes, 64 << 20);

    // Grown live, the same write succeeds; a quota below what the files take is refused; 0 removes it.
    let grown = client
        .update_resources(
            &limited.id,
            &ResourceRequest {
                disk_mb: Some(256),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(grown.resources.disk_mb, Some(256));
    let wrote = sh(&client, &limited.id, write_100_mb).await;
    assert!(wrote.stdout.contains("status=0"), "{wrote:?}");
    let refused = client
        .update_resources(
            &limited.id,
            &ResourceRequest {
                disk_mb: Some(32),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("below_usage"), "{refused}");
    let removed = client
        .update_resources(
            &limited.id,
            &ResourceRequest {
                disk_mb: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(removed.resources.disk_mb, None);
    let wrote = sh(
        &client,
        &limited.id,
        "dd if=/dev/zero of=/big2 bs=1M count=300 2>&1; echo status=$?",
    )
    .await;
    assert!(wrote.stdout.contains("status=0"), "{wrote:?}");

    for sandbox in [&limited.id, &neighbour.id] {
        client.delete_sandbox(sandbox).await.unwrap();
    }
}

/// Allocates and touches 300 MiB in 10 MiB steps; prints `done` when it has it all.
const ALLOCATE_300_MIB: &str = "python3 -c 'chunks = []
for _ in range(30):
    b = bytearray(10 * 2**20); b[::4096] = b\"x\" * len(b[::4096]); chunks.append(b)
print(\"done\")'";

#[tokio::test]
async fn memory_grows_instead_of_an_oom_kill_up_to_its_ceiling() {
    let server = shared_server();
    let client = server.client();
    let growing = create_with(
        &client,
        "grow",
        ResourceRequest {
            memory_mb: Some(128),
            memory_max_mb: Some(512),
            ..Default::default()
        },
    )
    .await;
    let result = sh(&client, &growing.id, ALLOCATE_300_MIB).await;
    assert_eq!(
        result.stdout.trim(),
        "done",
        "the workload did not complete: {result:?}"
    );
    let now = client.sandbox(&growing.id).await.unwrap();
    assert_eq!(now.oom_kills, 0, "{now:?}");
    assert!(
        (320..=512).contains(&now.resources.memory_mb),
        "the limit is {} MiB",
        now.resources.memory_mb
    );
    let events = client.sandbox_events(&growing.id).await.unwrap();
    let grown: Vec<_> = events
        .iter()
        .filter(|event| event.reason == StateReason::MemoryGrown)
        .collect();
    assert!(!grown.is_empty(), "{events:?}");
    assert!(
        grown[0]
            .message
            .contains("reached its 128 MiB memory limit; raised to 192 MiB"),
        "{}",
        grown[0].message
    );
    let stats = client.sandbox_stats(&growing.id).await.unwrap();
    assert_eq!(stats.memory_limit_bytes, now.resources.memory_mb << 20);

    // At the ceiling, the kernel's OOM killer acts again, and the message says the ceiling was reached.
    let capped = create_with(
        &client,
        "grow-capped",
        ResourceRequest {
            memory_mb: Some(64),
            memory_max_mb: Some(128),
            ..Default::default()
        },
    )
    .await;
    let killed = sh(&client, &capped.id, ALLOCATE_300_MIB).await;
    // The shell running python reports its SIGKILL as 137.
    assert!(killed.exit_code == Some(137) && killed.stdout.is_empty(), "{killed:?}");
    common::eventually(
        "the OOM kill is recorded",
        std::time::Duration::from_secs(10),
        || async { client.sandbox(&capped.id).await.unwrap().oom_kills >= 1 },
    )
    .await;
    let now = client.sandbox(&capped.id).await.unwrap();
    assert_eq!(now.resources.memory_mb, 128);
    assert!(
        now.state_message.contains("the most its memory_max_mb lets it grow to"),
        "{}",
        now.state_message
    );
    // A ceiling below the limit is refused.
    let error = client
        .update_resources(
            &capped.id,
            &ResourceRequest {
                memory_max_mb: Some(100),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("invalid_request"), "{error}");
    for sandbox in [&growing.id, &capped.id] {
        client.delete_sandbox(sandbox).await.unwrap();
    }
}
