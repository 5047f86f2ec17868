//! Terminals: the WebSocket to a process on a pseudo-terminal (input, output, resize, signals, several viewers,
//! detach and reattach with replay), and the interactive CLI (`nook shell`) driven through a real tmux window.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{create, eventually, shared_server};
use nook_api::{ExecEvent, ExecRequest, PtySize};
use nook_client::{TerminalOutput, TerminalReader};

/// A shell on an 80x24 terminal.
fn terminal_shell() -> ExecRequest {
    ExecRequest {
        command: vec!["bash".into(), "--norc".into(), "-i".into()],
        env: [("PS1".to_string(), "$ ".to_string())].into(),
        pty: Some(PtySize { cols: 80, rows: 24 }),
        ..Default::default()
    }
}

/// Reads from a terminal until the output seen so far contains `needle`; returns that output.
async fn read_until(reader: &mut TerminalReader, seen: &mut Vec<u8>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = String::from_utf8_lossy(seen).into_owned();
        if text.contains(needle) {
            return text;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let output = tokio::time::timeout(remaining, reader.next())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in the terminal's output; saw {text:?}"))
            .expect("the terminal closed early")
            .unwrap();
        match output {
            TerminalOutput::Stdout(bytes) => seen.extend_from_slice(&bytes),
            TerminalOutput::Event(ExecEvent::Attached { .. }) => {}
            TerminalOutput::Event(other) => panic!("unexpected event {other:?} while waiting for {needle:?}"),
        }
    }
}

/// Reads until the final event.
async fn read_to_end(reader: &mut TerminalReader) -> ExecEvent {
    loop {
        let output = tokio::time::timeout(Duration::from_secs(20), reader.next())
            .await
            .expect("the process should end")
            .expect("a final event before the socket closes")
            .unwrap();
        if let TerminalOutput::Event(event @ (ExecEvent::Exit { .. } | ExecEvent::Error { .. })) = output {
            assert!(reader.next().await.is_none(), "the server closes after the final event");
            return event;
        }
    }
}

#[tokio::test]
async fn terminal_websocket_types_resizes_detaches_and_replays() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "term").await;
    let process = client.start_process(&sandbox.id, &terminal_shell()).await.unwrap();
    assert!(process.terminal);

    let (mut writer, mut reader) = client.terminal(&sandbox.id, process.pid, 0).await.unwrap().split();
    let mut seen = Vec::new();
    read_until(&mut reader, &mut seen, "$ ").await;
    writer.input("echo $((6 * 7))-$(tty)\n").await.unwrap();
    read_until(&mut reader, &mut seen, "42-/dev/pts/").await;

    // A second viewer sees everything from the start, and then the same live output as the first.
    let (_viewer_writer, mut viewer) = client.terminal(&sandbox.id, process.pid, 0).await.unwrap().split();
    let mut viewer_seen = Vec::new();
    read_until(&mut viewer, &mut viewer_seen, "42-/dev/pts/").await;

    // Resize over the socket: the shell's terminal has the new size.
    writer.resize(132, 43).await.unwrap();
    writer.input("stty size\n").await.unwrap();
    read_until(&mut reader, &mut seen, "43 132").await;
    read_until(&mut viewer, &mut viewer_seen, "43 132").await;

    // Detach; output produced meanwhile is replayed on reattach from the offset where the first viewer stopped.
    let offset_at_detach = client.process(&sandbox.id, process.pid).await.unwrap().output_bytes;
    writer.detach().await.unwrap();
    drop(reader);
    client
        .process_stdin(&sandbox.id, process.pid, b"echo while-away\n".to_vec(), false)
        .await
        .unwrap();
    read_until(&mut viewer, &mut viewer_seen, "\nwhile-away").await;
    let (mut writer, mut reader) = client
        .terminal(&sandbox.id, process.pid, offset_at_detach)
        .await
        .unwrap()
        .split();
    let mut replayed = Vec::new();
    let text = read_until(&mut reader, &mut replayed, "\nwhile-away").await;
    assert!(
        !text.contains("43 132"),
        "replay starts at the offset asked for: {text:?}"
    );

    // Ctrl-C reaches the foreground program as SIGINT (the terminal's line discipline), not the shell.
    writer.input("sleep 300\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    writer.input(vec![0x03]).await.unwrap();
    writer.input("echo after-$?\n").await.unwrap();
    read_until(&mut reader, &mut replayed, "after-130").await;

    // The process ends: every viewer gets the exit, then the socket closes.
    writer.input("exit 7\n").await.unwrap();
    for reader in [&mut reader, &mut viewer] {
        match read_to_end(reader).await {
            ExecEvent::Exit { status, .. } => assert_eq!(status.exit_code, Some(7)),
            other => panic!("expected the exit, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn terminal_websocket_reports_bad_requests() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "term-bad").await;

    // Unknown process: a plain HTTP error before any upgrade.
    let error = client.terminal(&sandbox.id, 999_999, 0).await.unwrap_err();
    assert_eq!(error.code(), Some("not_found"), "{error}");
    let error = client.terminal("no-such-sandbox", 1, 0).await.unwrap_err();
    assert_eq!(error.code(), Some("not_found"), "{error}");

    // A process without a terminal: stdout is binary, stderr arrives as events, a resize is a notice (the socket
    // stays open), and closing stdin ends `cat`.
    let request = ExecRequest {
        command: vec!["sh".into(), "-c".into(), "cat; echo done >&2; exit 3".into()],
        ..Default::default()
    };
    let process = client.start_process(&sandbox.id, &request).await.unwrap();
    assert!(!process.terminal);
    let (mut writer, mut reader) = client.terminal(&sandbox.id, process.pid, 0).await.unwrap().split();
    writer.resize(100, 30).await.unwrap();
    writer.input("ping\n").await.unwrap();
    writer.close_stdin().await.unwrap();
    let (mut stdout, mut stderr, mut notices) = (Vec::new(), Vec::new(), Vec::new());
    let exit = loop {
        match reader.next().await.expect("a final event").unwrap() {
            TerminalOutput::Stdout(bytes) => stdout.extend_from_slice(&bytes),
            TerminalOutput::Event(ExecEvent::Stderr { data, .. }) => {
                use base64::Engine as _;
                stderr.extend(base64::engine::general_purpose::STANDARD.decode(data).unwrap())
            }
            TerminalOutput::Event(ExecEvent::Notice { code, message }) => notices.push((code, message)),
            TerminalOutput::Event(ExecEvent::Attached { .. }) => {}
            TerminalOutput::Event(last) => break last,
        }
    };
    assert_eq!(stdout, b"ping\n");
    assert_eq!(stderr, b"done\n");
    assert!(
        matches!(exit, ExecEvent::Exit { status, .. } if status.exit_code == Some(3)),
        "{exit:?}"
    );
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(notices[0].1.contains("no terminal"), "{notices:?}");
}

/// A tmux session on a private socket, removed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let output = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux is installed (scripts/setup.sh)");
        assert!(
            output.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "nook"])
    }

    fn keys(&self, keys: &str) {
        self.run(&["send-keys", "-t", "nook", "-l", keys]);
        self.run(&["send-keys", "-t", "nook", "Enter"]);
    }

    async fn wait_for(&self, text: &str) -> String {
        let mut screen = String::new();
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                screen = self.screen();
                if screen.contains(text) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(found.is_ok(), "{text:?} never appeared in the tmux window:\n{screen}");
        screen
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["-L", &self.socket, "kill-server"]).status();
    }
}

#[tokio::test]
async fn nook_shell_in_tmux_runs_python_resizes_and_exits() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "shell").await;
    let tmux = Tmux {
        socket: format!("nook-test-{}", common::rand_suffix()),
    };
    let nook = env!("CARGO_BIN_EXE_nook");
    // After nook exits, the window reports how it ended and whether the local terminal was restored, then
    // becomes a local shell (to run `nook attach` from).
    let script = format!(
        "export NOOK_URL='{}' NOOK_API_KEY='{}'; '{nook}' shell {}; echo \"nook exited $?\"; \
         stty -a | grep -q -- -icanon && echo 'terminal: raw' || echo 'terminal: cooked'; PS1='local$ ' exec sh",
        server.url, server.key, sandbox.id
    );
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "nook",
        "-x",
        "80",
        "-y",
        "24",
        "sh",
        "-c",
        &script,
    ]);

    // A login shell: bash as root shows `#`. Set a prompt to look for that no output contains by accident.
    tmux.wait_for("#").await;
    tmux.keys("PS1='shell> '");
    tmux.wait_for("shell>").await;
    tmux.keys("python3");
    tmux.wait_for(">>>").await;
    tmux.keys("print(12345 * 6789)");
    tmux.wait_for("83810205").await;

    // The window grows: nook passes SIGWINCH on as a resize, and Python sees the new size.
    tmux.run(&["resize-window", "-t", "nook", "-x", "100", "-y", "30"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        tmux.keys("import os; print('size', tuple(os.get_terminal_size()))");
        tokio::time::sleep(Duration::from_millis(300)).await;
        if tmux.screen().contains("size (100, 30)") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the resize never reached Python:\n{}",
            tmux.screen()
        );
    }

    tmux.keys("exit()");
    tmux.wait_for("shell>").await;

    // Ctrl-P Ctrl-Q detaches: nook exits 0, the terminal is cooked again, and the shell keeps running.
    tmux.keys("echo marker-$((40 + 2))");
    tmux.wait_for("marker-42").await;
    tmux.run(&["send-keys", "-t", "nook", "C-p", "C-q"]);
    tmux.wait_for("nook exited 0").await;
    tmux.wait_for("terminal: cooked").await;
    let shells = client.processes(&sandbox.id).await.unwrap();
    let shell = shells
        .iter()
        .find(|process| process.running && process.terminal)
        .expect("the shell still runs");

    // `nook attach` brings it back with its recent output replayed; exiting the shell ends attach with its code.
    tmux.run(&["send-keys", "-t", "nook", "clear", "Enter"]);
    tmux.wait_for("local$").await;
    tmux.keys(&format!(
        "'{nook}' attach {} {}; echo \"attach exited $?\"",
        sandbox.id, shell.pid
    ));
    tmux.wait_for("marker-42").await;
    tmux.keys("exit 5");
    tmux.wait_for("attach exited 5").await;
    eventually("the shell process is gone", Duration::from_secs(10), || async {
        client
            .processes(&sandbox.id)
            .await
            .unwrap()
            .iter()
            .all(|process| !process.running)
    })
    .await;
}
