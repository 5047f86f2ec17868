//! Sandbox deadlines end to end: a passed deadline deletes a sandbox or stops it with its files kept (recorded as
//! `deadline_passed`), deadlines move and clear, they are stored so a restart of `nook serve` keeps them, and one
//! that passed while the server was down acts as soon as it is back. The CLI's `create --timeout` and `deadline`.

mod common;

use std::process::Command;
use std::time::Duration;

use chrono::Utc;
use common::{eventually, sh, TestServer};
use nook_api::{CreateSandboxRequest, DeadlineAction, Sandbox, SandboxState, SetDeadlineRequest, StateReason};
use nook_client::Client;

async fn create(client: &Client, name: &str, timeout_s: u64, on_deadline: Option<DeadlineAction>) -> Sandbox {
    let request = CreateSandboxRequest {
        name: Some(name.into()),
        timeout_s: Some(timeout_s),
        on_deadline,
        ..Default::default()
    };
    client.create_sandbox(&request).await.expect("create sandbox")
}

fn deadline_request(timeout_s: Option<u64>, on_deadline: Option<DeadlineAction>) -> SetDeadlineRequest {
    SetDeadlineRequest { timeout_s, on_deadline }
}

#[tokio::test]
async fn deadlines_delete_or_stop_move_clear_and_outlive_restarts() {
    let mut server = TestServer::start("deadlines");
    let (data_dir, key) = (server.data_dir.clone(), server.key.clone());
    let client = server.client();

    let while_down = create(&client, "while-down", 10, None).await;
    let kept = create(&client, "kept-across", 3600, Some(DeadlineAction::Stop)).await;
    let stops = create(&client, "stops", 2, Some(DeadlineAction::Stop)).await;
    let deletes = create(&client, "deletes", 2, None).await;
    let moved = create(&client, "moved", 2, None).await;
    let cleared = create(&client, "cleared", 2, None).await;
    let deadline = stops.deadline.expect("a deadline was set");
    assert!((deadline - Utc::now()).num_milliseconds() <= 2000 && stops.on_deadline == DeadlineAction::Stop);
    assert_eq!(deletes.on_deadline, DeadlineAction::Delete);
    sh(&client, &stops.id, "echo kept > /root/file").await;

    let moved_now = client
        .set_deadline(&moved.id, &deadline_request(Some(3600), None))
        .await
        .unwrap();
    assert!(moved_now.deadline.unwrap() > Utc::now() + chrono::Duration::seconds(3590));
    let cleared_now = client
        .set_deadline(&cleared.id, &deadline_request(None, None))
        .await
        .unwrap();
    assert_eq!(cleared_now.deadline, None);

    eventually("the deadlines act", Duration::from_secs(20), || async {
        let stopped = client.sandbox(&stops.id).await.unwrap();
        stopped.state == SandboxState::Stopped && client.sandbox(&deletes.id).await.is_err()
    })
    .await;
    let stopped = client.sandbox(&stops.id).await.unwrap();
    assert_eq!(
        (stopped.state_reason, stopped.deadline),
        (StateReason::DeadlinePassed, None)
    );
    let events = client.sandbox_events(&stops.id).await.unwrap();
    assert!(
        events
            .iter()
            .any(|event| event.reason == StateReason::DeadlinePassed && event.to_state == SandboxState::Stopped),
        "{events:?}"
    );
    // Stopped by its deadline, it starts again with its files, and no deadline stops it again.
    client.start_sandbox(&stops.id).await.unwrap();
    assert_eq!(sh(&client, &stops.id, "cat /root/file").await.stdout, "kept\n");
    for name in ["moved", "cleared"] {
        assert_eq!(client.sandbox(name).await.unwrap().state, SandboxState::Running);
    }

    // Out of range, and unknown sandboxes.
    let too_long = deadline_request(Some(nook_api::MAX_TIMEOUT_S + 1), None);
    let refused = client.set_deadline(&moved.id, &too_long).await.unwrap_err();
    assert!(refused.to_string().contains("ten years"), "{refused}");
    assert!(client
        .set_deadline("no-such-sandbox", &deadline_request(Some(5), None))
        .await
        .is_err());

    // The CLI: `deadline` moves one and shows it.
    let cli = Command::new(env!("CARGO_BIN_EXE_nook"))
        .args(["deadline", "cleared", "--timeout", "7200", "--on-deadline", "stop"])
        .env("NOOK_URL", &server.url)
        .env("NOOK_API_KEY", &server.key)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&cli.stdout);
    assert!(
        cli.status.success() && printed.starts_with("cleared: stop at "),
        "{printed}"
    );
    let by_cli = client.sandbox("cleared").await.unwrap();
    assert_eq!(by_cli.on_deadline, DeadlineAction::Stop);
    assert!(by_cli.deadline.unwrap() > Utc::now() + chrono::Duration::seconds(7100));

    // Down across `while-down`'s deadline: it acts when the server is back; others are kept as they were.
    drop(client);
    server.stop();
    let wait = (while_down.deadline.unwrap() - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_secs(1)).await;
    let server = TestServer::start_in(data_dir, key);
    let client = server.client();
    eventually(
        "the deadline that passed while the server was down acts",
        Duration::from_secs(20),
        || async { client.sandbox(&while_down.id).await.is_err() },
    )
    .await;
    let kept_now = client.sandbox(&kept.id).await.unwrap();
    assert_eq!(
        (kept_now.deadline, kept_now.on_deadline, kept_now.state),
        (kept.deadline, DeadlineAction::Stop, SandboxState::Running)
    );
    for sandbox in ["kept-across", "stops", "moved", "cleared"] {
        client.delete_sandbox(sandbox).await.unwrap();
    }
}
