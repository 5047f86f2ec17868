//! Pause and resume: a paused sandbox's processes are frozen where they are (a counter does not advance and uses no
//! CPU), requests that need its agent are refused with `paused`, and after resume the same process continues from
//! the same value. A paused sandbox can be stopped and deleted, and it stays paused across a restart of the server.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{create, eventually, sh, shared_server, TestServer};
use nook_api::{ExecRequest, SandboxState};
use nook_client::{Client, ClientError};

/// A process that counts up every 20 ms into `/counter`, and where the host can read that file.
async fn start_counter(client: &Client, server: &TestServer, sandbox: &str) -> (u32, PathBuf) {
    let counter = ExecRequest {
        shell: Some(
            "i=0; while true; do i=$((i+1)); echo $i > /dev/shm/counter.new; mv /dev/shm/counter.new /dev/shm/counter; \
             sleep 0.02; done"
                .into(),
        ),
        ..Default::default()
    };
    let process = client.start_process(sandbox, &counter).await.unwrap();
    // On the sandbox's tmpfs, read through its init's root: the loop touches no disk, so a freeze never waits on a
    // filesystem busy with other tests' work (a btrfs commit can hold a writer in uninterruptible sleep).
    let file = PathBuf::from(format!("/proc/{}/root/dev/shm/counter", server.agent_pid(sandbox)));
    (process.pid, file)
}

fn count(file: &PathBuf) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_paused_sandbox_is_frozen_and_continues_where_it_was() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "pause").await;
    let (pid, file) = start_counter(&client, server, &sandbox.id).await;
    eventually("the counter counts", Duration::from_secs(10), || async {
        count(&file) > 5
    })
    .await;

    let paused = client.pause_sandbox(&sandbox.id).await.unwrap();
    assert_eq!(paused.state, SandboxState::Paused);
    let at_pause = count(&file);
    let cpu_at_pause = client.sandbox_stats(&sandbox.id).await.unwrap().cpu_used_ns;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(count(&file), at_pause, "the counter advanced while paused");
    let stats = client.sandbox_stats(&sandbox.id).await.unwrap();
    assert_eq!(stats.cpu_used_ns, cpu_at_pause, "a paused sandbox used CPU");
    assert!(stats.memory_used_bytes > 0);

    // Requests that need the (frozen) agent are refused at once with the reason; pausing again changes nothing.
    let refused = client
        .exec(
            &sandbox.id,
            &ExecRequest {
                shell: Some("true".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("paused"), "{refused}");
    let ClientError::Api { status, .. } = &refused else {
        panic!("{refused}")
    };
    assert_eq!(status.as_u16(), 409);
    assert_eq!(
        client.pause_sandbox(&sandbox.id).await.unwrap().state,
        SandboxState::Paused
    );
    let listed = client.sandbox(&sandbox.id).await.unwrap();
    assert_eq!(listed.state, SandboxState::Paused);

    // Resumed: the same process goes on from the same value. It ticks at most every 20 ms once thawed, and it is
    // thawed before the resume answers (the record is written after the thaw, which a loaded disk can make slow),
    // so the ticks since the resume was asked for are bounded by the time since.
    let resume_asked = std::time::Instant::now();
    let resumed = client.resume_sandbox(&sandbox.id).await.unwrap();
    assert_eq!(resumed.state, SandboxState::Running);
    eventually("the counter continues", Duration::from_secs(10), || async {
        count(&file) > at_pause
    })
    .await;
    let after = count(&file);
    let elapsed_ms = resume_asked.elapsed().as_millis() as u64;
    assert!(
        after <= at_pause + 3 + elapsed_ms / 20,
        "the counter jumped from {at_pause} to {after} within {elapsed_ms} ms of asking for the resume: it ran while \
         paused"
    );
    let process = client.process(&sandbox.id, pid).await.unwrap();
    assert!(process.running, "the counter is not the process it was");
    assert_eq!(sh(&client, &sandbox.id, "echo alive").await.stdout, "alive\n");

    let events = client.sandbox_events(&sandbox.id).await.unwrap();
    let states: Vec<SandboxState> = events.iter().map(|event| event.to_state).collect();
    assert!(
        states
            .windows(2)
            .any(|pair| pair == [SandboxState::Paused, SandboxState::Running]),
        "{states:?}"
    );

    // A paused sandbox stops and deletes cleanly.
    client.pause_sandbox(&sandbox.id).await.unwrap();
    assert_eq!(
        client.stop_sandbox(&sandbox.id).await.unwrap().state,
        SandboxState::Stopped
    );
    let not_paused = client.resume_sandbox(&sandbox.id).await.unwrap_err();
    assert!(not_paused.to_string().contains("only a paused sandbox"), "{not_paused}");
    client.start_sandbox(&sandbox.id).await.unwrap();
    client.pause_sandbox(&sandbox.id).await.unwrap();
    client.delete_sandbox(&sandbox.id).await.unwrap();
    assert_eq!(common::leftovers(server, &sandbox.id), Vec::<String>::new());
}

#[tokio::test]
async fn a_paused_sandbox_stays_paused_across_a_server_restart() {
    let mut server = TestServer::start("pause-restart");
    let (data_dir, key) = (server.data_dir.clone(), server.key.clone());
    let client = server.client();
    let sandbox = create(&client, "paused-restart").await;
    let (pid, file) = start_counter(&client, &server, &sandbox.id).await;
    eventually("the counter counts", Duration::from_secs(10), || async {
        count(&file) > 3
    })
    .await;
    client.pause_sandbox(&sandbox.id).await.unwrap();
    let at_pause = count(&file);
    drop(client);
    server.stop();

    let server = TestServer::start_in(data_dir, key);
    let client = server.client();
    assert_eq!(client.sandbox(&sandbox.id).await.unwrap().state, SandboxState::Paused);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&file), at_pause, "the counter ran while the sandbox was paused");
    client.resume_sandbox(&sandbox.id).await.unwrap();
    eventually("the counter continues", Duration::from_secs(10), || async {
        count(&file) > at_pause
    })
    .await;
    assert!(client.process(&sandbox.id, pid).await.unwrap().running);
    client.delete_sandbox(&sandbox.id).await.unwrap();
}
