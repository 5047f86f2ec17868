//! Restarting `nook serve` does not touch running sandboxes: the runner re-adopts them, with the same id, name,
//! files and processes; stopped sandboxes keep their files.

mod common;

use common::{sh, TestServer};
use nook_api::{CreateSandboxRequest, SandboxState};

#[tokio::test]
async fn sandboxes_survive_a_server_restart() {
    let mut server = TestServer::start("restart");
    let (data_dir, key) = (server.data_dir.clone(), server.key.clone());
    let client = server.client();
    let running = client
        .create_sandbox(&CreateSandboxRequest {
            name: Some("keeps-running".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let stopped = client
        .create_sandbox(&CreateSandboxRequest {
            name: Some("was-stopped".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    sh(
        &client,
        &running.id,
        "echo before > /root/file; setsid sleep 1000 > /dev/null 2>&1 < /dev/null &",
    )
    .await;
    sh(&client, &stopped.id, "echo kept > /root/file").await;
    client.stop_sandbox(&stopped.id).await.unwrap();
    let sleeper = sh(&client, &running.id, "pgrep -x sleep").await.stdout;
    assert!(!sleeper.trim().is_empty(), "the background process did not start");
    drop(client);

    server.stop();
    // While the server is down the sandbox's processes keep running.
    let init = std::fs::read_to_string(data_dir.join("runner/sandboxes").join(&running.id).join("state.json")).unwrap();
    let init: serde_json::Value = serde_json::from_str(&init).unwrap();
    let pid = init["init"]["pid"]
        .as_i64()
        .expect("the running sandbox has an init pid");
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the sandbox died with the server"
    );

    let server = TestServer::start_in(data_dir, key);
    let client = server.client();
    let again = client.sandbox("keeps-running").await.unwrap();
    assert_eq!(
        (again.id.as_str(), again.state),
        (running.id.as_str(), SandboxState::Running)
    );
    assert_eq!(sh(&client, &running.id, "cat /root/file").await.stdout, "before\n");
    assert_eq!(
        sh(&client, &running.id, "pgrep -x sleep").await.stdout,
        sleeper,
        "the background process was lost"
    );

    let was_stopped = client.sandbox("was-stopped").await.unwrap();
    assert_eq!(was_stopped.state, SandboxState::Stopped);
    client.start_sandbox("was-stopped").await.unwrap();
    assert_eq!(sh(&client, "was-stopped", "cat /root/file").await.stdout, "kept\n");

    // The re-adopted sandbox can still be stopped and deleted cleanly.
    for sandbox in [&running, &stopped] {
        client.delete_sandbox(&sandbox.id).await.unwrap();
        let left: Vec<String> = common::leftovers(&server, &sandbox.id)
            .into_iter()
            .filter(|item| !item.contains("zombie"))
            .collect();
        assert_eq!(left, Vec::<String>::new());
    }
}
