//! Background processes: they outlive the request that started them, their output is replayed from a bounded
//! buffer by offset (so a client that reconnects misses nothing and sees nothing twice), and a stream never reports
//! an exit that did not happen nor is cut for being quiet.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{create, eventually, shared_server};
use futures::StreamExt;
use nook_api::{ExecEvent, ExecRequest};
use nook_client::Client;

fn shell(script: &str) -> ExecRequest {
    ExecRequest {
        command: vec!["bash".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

fn decode(data: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(data).unwrap()
}

/// Reads a whole output stream: the bytes, the final event, and the offsets as reported.
async fn collect(client: &Client, sandbox: &str, pid: u32, offset: u64, follow: bool) -> (Vec<u8>, ExecEvent) {
    let mut events = client.process_output(sandbox, pid, offset, follow).await.unwrap();
    let mut output = Vec::new();
    let mut expected = None;
    while let Some(event) = events.next().await {
        match event.unwrap() {
            ExecEvent::Attached { offset, .. } => expected = Some(offset),
            ExecEvent::Stdout { data, offset } | ExecEvent::Stderr { data, offset } => {
                assert_eq!(offset, expected, "output offsets must be contiguous");
                let bytes = decode(&data);
                expected = expected.map(|at| at + bytes.len() as u64);
                output.extend(bytes);
            }
            ExecEvent::Keepalive => {}
            last @ (ExecEvent::Exit { .. } | ExecEvent::End { .. } | ExecEvent::Error { .. }) => return (output, last),
            other => panic!("unexpected event {other:?}"),
        }
    }
    panic!("the stream ended without a final event");
}

#[tokio::test]
async fn background_processes_run_list_wait_and_replay() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "bg").await;
    let process = client
        .start_process(
            &sandbox.id,
            &shell("echo a; sleep 0.1; echo oops >&2; sleep 0.5; echo b; exit 7"),
        )
        .await
        .unwrap();
    assert!(process.running);
    let listed = client.processes(&sandbox.id).await.unwrap();
    assert!(
        listed.iter().any(|p| p.pid == process.pid && p.command[0] == "bash"),
        "{listed:?}"
    );

    let exit = client.wait_process(&sandbox.id, process.pid).await.unwrap();
    assert_eq!(exit.exit_code, Some(7));
    let info = client.process(&sandbox.id, process.pid).await.unwrap();
    assert!(!info.running && info.output_bytes == 9, "{info:?}");
    // The whole output is replayed after the end, ending with the real exit.
    let (output, last) = collect(&client, &sandbox.id, process.pid, 0, false).await;
    assert_eq!(output, b"a\noops\nb\n");
    assert!(
        matches!(last, ExecEvent::Exit { status, .. } if status.exit_code == Some(7)),
        "{last:?}"
    );
    // From an offset, only the rest.
    let (rest, _) = collect(&client, &sandbox.id, process.pid, 7, false).await;
    assert_eq!(rest, b"b\n");

    let missing = client.wait_process(&sandbox.id, 999_999).await.unwrap_err();
    assert_eq!(missing.code(), Some("not_found"));
    client.delete_sandbox(&sandbox.id).await.unwrap();
}

#[tokio::test]
async fn stdin_and_signals_reach_background_processes() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "stdin").await;
    let cat = client
        .start_process(
            &sandbox.id,
            &ExecRequest {
                command: vec!["cat".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    client
        .process_stdin(&sandbox.id, cat.pid, b"hello ".to_vec(), false)
        .await
        .unwrap();
    client
        .process_stdin(&sandbox.id, cat.pid, b"world\n".to_vec(), true)
        .await
        .unwrap();
    assert_eq!(
        client.wait_process(&sandbox.id, cat.pid).await.unwrap().exit_code,
        Some(0)
    );
    assert_eq!(
        collect(&client, &sandbox.id, cat.pid, 0, false).await.0,
        b"hello world\n"
    );
    let closed = client
        .process_stdin(&sandbox.id, cat.pid, b"late".to_vec(), false)
        .await
        .unwrap_err();
    assert_eq!(closed.code(), Some("stdin_closed"));

    let sleeper = client
        .start_process(&sandbox.id, &shell("exec sleep 300"))
        .await
        .unwrap();
    client.signal_process(&sandbox.id, sleeper.pid, 15).await.unwrap();
    let exit = client.wait_process(&sandbox.id, sleeper.pid).await.unwrap();
    assert_eq!((exit.exit_code, exit.signal), (None, Some(15)));
    client.delete_sandbox(&sandbox.id).await.unwrap();
}

#[tokio::test]
async fn a_client_that_reconnects_gets_what_it_missed_exactly_once() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "reattach").await;
    let script = "for i in $(seq 1 40); do echo line-$i; sleep 0.05; done; exit 3";
    let process = client.start_process(&sandbox.id, &shell(script)).await.unwrap();

    // First connection: read a few lines, then drop it mid-stream.
    let mut received = Vec::new();
    let mut offset = 0;
    {
        let mut events = client.process_output(&sandbox.id, process.pid, 0, true).await.unwrap();
        while let Some(event) = events.next().await {
            if let ExecEvent::Stdout { data, offset: Some(at) } = event.unwrap() {
                let bytes = decode(&data);
                offset = at + bytes.len() as u64;
                received.extend(bytes);
                if received.iter().filter(|b| **b == b'\n').count() >= 5 {
                    break;
                }
            }
        }
    }
    // The process keeps running without any client.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(client.process(&sandbox.id, process.pid).await.unwrap().running);
    // Second connection from the last offset: the rest, once, then the real exit.
    let (rest, last) = collect(&client, &sandbox.id, process.pid, offset, true).await;
    received.extend(rest);
    let expected: String = (1..=40).map(|i| format!("line-{i}\n")).collect();
    assert_eq!(String::from_utf8(received).unwrap(), expected);
    assert!(
        matches!(last, ExecEvent::Exit { status, .. } if status.exit_code == Some(3)),
        "{last:?}"
    );
    client.delete_sandbox(&sandbox.id).await.unwrap();
}

#[tokio::test]
async fn the_replay_buffer_is_bounded_and_says_what_was_dropped() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "bounded").await;
    // 3 MiB of output against a 1 MiB buffer.
    let process = client
        .start_process(&sandbox.id, &shell("head -c 3145728 /dev/zero | tr '\\0' x"))
        .await
        .unwrap();
    client.wait_process(&sandbox.id, process.pid).await.unwrap();
    let mut events = client.process_output(&sandbox.id, process.pid, 0, false).await.unwrap();
    let Some(Ok(ExecEvent::Attached { offset, missed })) = events.next().await else {
        panic!("no attached event")
    };
    assert_eq!((offset, missed), (2 << 20, 2 << 20));
    let mut kept = 0;
    while let Some(event) = events.next().await {
        if let ExecEvent::Stdout { data, .. } = event.unwrap() {
            kept += decode(&data).len();
        }
    }
    assert_eq!(kept, 1 << 20);
    client.delete_sandbox(&sandbox.id).await.unwrap();
}

#[tokio::test]
async fn a_quiet_process_is_streamed_to_its_real_end() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "quiet").await;
    // Silent for two minutes between two lines: the stream must survive it (keepalives) and end with exit 7.
    let process = client
        .start_process(&sandbox.id, &shell("echo one; sleep 120; echo two; exit 7"))
        .await
        .unwrap();
    let mut events = client.process_output(&sandbox.id, process.pid, 0, true).await.unwrap();
    let mut output = Vec::new();
    let mut keepalives = 0;
    let last = loop {
        match events.next().await.expect("the stream ended early").unwrap() {
            ExecEvent::Stdout { data, .. } => output.extend(decode(&data)),
            ExecEvent::Keepalive => keepalives += 1,
            ExecEvent::Attached { .. } => {}
            last => break last,
        }
    };
    assert_eq!(output, b"one\ntwo\n");
    assert!(keepalives >= 5, "only {keepalives} keepalives in two quiet minutes");
    assert!(
        matches!(last, ExecEvent::Exit { status, .. } if status.exit_code == Some(7)),
        "{last:?}"
    );
    client.delete_sandbox(&sandbox.id).await.unwrap();
}

#[tokio::test]
async fn processes_outlive_the_request_and_stop_with_the_sandbox() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "outlive").await;
    let process = client.start_process(&sandbox.id, &shell("sleep 300")).await.unwrap();
    drop(client);
    let client = server.client();
    eventually("the process is listed as running", Duration::from_secs(5), || async {
        client
            .processes(&sandbox.id)
            .await
            .unwrap()
            .iter()
            .any(|p| p.pid == process.pid && p.running)
    })
    .await;
    client.stop_sandbox(&sandbox.id).await.unwrap();
    let refused = client.processes(&sandbox.id).await.unwrap_err();
    assert_eq!(refused.code(), Some("not_running"));
    client.delete_sandbox(&sandbox.id).await.unwrap();
}

#[tokio::test]
async fn processes_can_run_on_a_resizable_terminal() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "pty").await;
    let shell_on_terminal = ExecRequest {
        command: vec!["bash".into(), "--noprofile".into(), "--norc".into()],
        pty: Some(nook_api::PtySize { cols: 80, rows: 24 }),
        ..Default::default()
    };
    let first = client.start_process(&sandbox.id, &shell_on_terminal).await.unwrap();
    client
        .process_stdin(
            &sandbox.id,
            first.pid,
            b"test -t 0 && echo is-a-tty; stty size; echo $((6*7)); exit 5\n".to_vec(),
            false,
        )
        .await
        .unwrap();
    assert_eq!(
        client.wait_process(&sandbox.id, first.pid).await.unwrap().exit_code,
        Some(5)
    );
    let text = String::from_utf8_lossy(&collect(&client, &sandbox.id, first.pid, 0, false).await.0).into_owned();
    for expected in ["is-a-tty", "24 80", "42"] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from the terminal output: {text:?}"
        );
    }

    let second = client.start_process(&sandbox.id, &shell_on_terminal).await.unwrap();
    // Resize once bash is at its prompt: while it starts, bash reads the terminal's size and writes it back
    // (TIOCGWINSZ, then TIOCSWINSZ), so a resize in between would be undone by bash itself.
    eventually("bash shows its prompt", Duration::from_secs(20), || async {
        let (output, _) = collect(&client, &sandbox.id, second.pid, 0, false).await;
        String::from_utf8_lossy(&output).contains("# ")
    })
    .await;
    client.resize_process(&sandbox.id, second.pid, 132, 40).await.unwrap();
    client
        .process_stdin(&sandbox.id, second.pid, b"stty size; exit\n".to_vec(), false)
        .await
        .unwrap();
    client.wait_process(&sandbox.id, second.pid).await.unwrap();
    let text = String::from_utf8_lossy(&collect(&client, &sandbox.id, second.pid, 0, false).await.0).into_owned();
    assert!(
        text.contains("40 132"),
        "the resize did not reach the terminal: {text:?}"
    );

    let plain = client.start_process(&sandbox.id, &shell("sleep 30")).await.unwrap();
    let refused = client
        .resize_process(&sandbox.id, plain.pid, 100, 30)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("no_terminal"));
    let sync = client
        .exec(
            &sandbox.id,
            &ExecRequest {
                pty: Some(nook_api::PtySize { cols: 80, rows: 24 }),
                ..shell("true")
            },
        )
        .await;
    assert_eq!(sync.unwrap_err().code(), Some("invalid_request"));
    client.delete_sandbox(&sandbox.id).await.unwrap();
}
