//! Lifecycle policies: a sandbox stops on its own after a time without activity (API calls working on it, or its
//! processes using CPU), recorded with the reason `idle`; a sandbox stopped long enough is archived, then deleted;
//! policies are set at create or later, and checked.

mod common;

use std::time::{Duration, Instant};

use common::{eventually, sh, shared_server};
use nook_api::{CreateSandboxRequest, ExecRequest, Lifecycle, ResourceRequest, SandboxState, StateReason};

#[tokio::test]
async fn an_idle_sandbox_stops_on_its_own_and_a_busy_one_does_not() {
    let server = shared_server();
    let client = server.client();
    let request = CreateSandboxRequest {
        name: Some(format!("idle-{}", &common::rand_suffix()[..8])),
        resources: Some(ResourceRequest {
            cpu: Some(0.1),
            ..Default::default()
        }),
        lifecycle: Some(Lifecycle {
            idle_stop_s: Some(2),
            stopped_delete_s: None,
            stopped_archive_s: None,
        }),
        ..Default::default()
    };
    let sandbox = client.create_sandbox(&request).await.unwrap();
    assert_eq!(sandbox.lifecycle.idle_stop_s, Some(2));

    // Calls keep it running well past its idle time.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        assert_eq!(sh(&client, &sandbox.id, "true").await.exit_code, Some(0));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // So does a process working without any call (10% of a core here).
    let busy = client
        .start_process(
            &sandbox.id,
            &ExecRequest {
                shell: Some("while :; do :; done".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(
        client.sandbox(&sandbox.id).await.unwrap().state,
        SandboxState::Running,
        "a sandbox whose process works was stopped as idle"
    );
    // Once nothing happens, it stops, with the reason on record.
    client.signal_process(&sandbox.id, busy.pid, 9).await.unwrap();
    let quiet_since = Instant::now();
    eventually("the idle sandbox stops", Duration::from_secs(20), || async {
        client.sandbox(&sandbox.id).await.unwrap().state == SandboxState::Stopped
    })
    .await;
    eprintln!("stopped {:?} after the last activity", quiet_since.elapsed());
    let stopped = client.sandbox(&sandbox.id).await.unwrap();
    assert_eq!(stopped.state_reason, StateReason::Idle);
    assert!(
        stopped.state_message.contains("without activity"),
        "{}",
        stopped.state_message
    );
    // Its files are kept: it starts again where it was.
    client.start_sandbox(&sandbox.id).await.unwrap();
    client.delete_sandbox(&sandbox.id).await.unwrap();
}

#[tokio::test]
async fn a_sandbox_stopped_long_enough_is_archived_then_deleted_and_policies_are_checked() {
    let server = shared_server();
    let client = server.client();
    let sandbox = common::create(&client, "reaped").await;
    assert_eq!(sandbox.lifecycle, Lifecycle::default());
    let set = client
        .set_lifecycle(
            &sandbox.id,
            &Lifecycle {
                idle_stop_s: None,
                stopped_delete_s: Some(5),
                stopped_archive_s: Some(1),
            },
        )
        .await
        .unwrap();
    assert_eq!(set.lifecycle.stopped_delete_s, Some(5));
    // Running, it stays.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(client.sandbox(&sandbox.id).await.unwrap().state, SandboxState::Running);
    // Stopped: archived a second later, with the reason on record, then deleted with its archive.
    client.stop_sandbox(&sandbox.id).await.unwrap();
    eventually("the stopped sandbox is archived", Duration::from_secs(15), || async {
        client.sandbox(&sandbox.id).await.unwrap().state == SandboxState::Archived
    })
    .await;
    let archived = client.sandbox(&sandbox.id).await.unwrap();
    assert_eq!(archived.state_reason, StateReason::AutoArchived);
    assert!(
        archived.state_message.contains("archived after 1 s stopped"),
        "{}",
        archived.state_message
    );
    let archive_dir = server.data_dir.join("archive/sandboxes").join(&sandbox.id);
    assert_eq!(std::fs::read_dir(&archive_dir).unwrap().count(), 1);
    eventually("the archived sandbox is deleted", Duration::from_secs(20), || async {
        client.sandbox(&sandbox.id).await.is_err()
    })
    .await;
    assert!(!server.sandbox_dir(&sandbox.id).exists());
    assert_eq!(std::fs::read_dir(&archive_dir).map_or(0, |entries| entries.count()), 0);

    // 0 turns a policy off; out-of-range values are refused.
    let other = common::create(&client, "policy").await;
    let error = client
        .set_lifecycle(
            &other.id,
            &Lifecycle {
                idle_stop_s: Some(u64::MAX),
                stopped_delete_s: None,
                stopped_archive_s: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("invalid_request"), "{error}");
    let on = Lifecycle {
        idle_stop_s: Some(3600),
        stopped_delete_s: Some(60),
        stopped_archive_s: None,
    };
    assert_eq!(client.set_lifecycle(&other.id, &on).await.unwrap().lifecycle, on);
    let off = Lifecycle {
        idle_stop_s: Some(0),
        stopped_delete_s: None,
        stopped_archive_s: None,
    };
    let now = client.set_lifecycle(&other.id, &off).await.unwrap().lifecycle;
    assert_eq!((now.idle_stop_s, now.stopped_delete_s), (None, Some(60)));
    client.delete_sandbox(&other.id).await.unwrap();
}
