//! End-to-end tests of container sandboxes against a real `nook serve`: exec semantics, isolation seen from
//! inside, resource limits, bad input, and cleanup. They share one server per test binary.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{create, create_with, eventually, leftovers, sh, shared_server};
use futures::StreamExt;
use nook_api::{CreateSandboxRequest, ExecEvent, ExecRequest, ResourceRequest, SandboxState, StateReason};

#[tokio::test]
async fn exec_reports_output_exit_codes_and_signals() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "exec").await;
    assert_eq!(sandbox.state, SandboxState::Running);

    let hi = client
        .exec(
            &sandbox.id,
            &ExecRequest {
                command: vec!["echo".into(), "hi".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (hi.stdout.as_str(), hi.stderr.as_str(), hi.exit_code, hi.signal),
        ("hi\n", "", Some(0), None)
    );

    let split = sh(&client, &sandbox.name, "echo out; echo err >&2").await;
    assert_eq!((split.stdout.as_str(), split.stderr.as_str()), ("out\n", "err\n"));

    assert_eq!(sh(&client, &sandbox.id, "exit 3").await.exit_code, Some(3));

    let killed = sh(&client, &sandbox.id, "kill -KILL $$").await;
    assert_eq!((killed.exit_code, killed.signal), (None, Some(9)));

    let timed = client
        .exec(
            &sandbox.id,
            &ExecRequest {
                shell: Some("sleep 30".into()),
                timeout_ms: Some(300),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(timed.timed_out && timed.signal == Some(9), "{timed:?}");

    let stdin = client
        .exec(
            &sandbox.id,
            &ExecRequest {
                command: vec!["cat".into()],
                stdin: Some("fed\n".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(stdin.stdout, "fed\n");
    // Input and output flowing at once, both far beyond the socket and pipe buffers, must not deadlock.
    let big = "x".repeat(4 << 20);
    let echoed = client
        .exec(
            &sandbox.id,
            &ExecRequest {
                command: vec!["cat".into()],
                stdin: Some(big.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((echoed.stdout.len(), echoed.exit_code), (big.len(), Some(0)));

    let missing = client
        .exec(
            &sandbox.id,
            &ExecRequest {
                command: vec!["no-such-program".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Some("spawn_failed"), "{missing}");

    client.delete_sandbox(&sandbox.id).await.unwrap();
}

#[tokio::test]
async fn exec_applies_env_cwd_and_user() {
    let server = shared_server();
    let client = server.client();
    let request = CreateSandboxRequest {
        name: Some(format!("env-{}", &common::rand_suffix()[..8])),
        env: BTreeMap::from([("SANDBOX_WIDE".into(), "yes".into())]),
        ..Default::default()
    };
    let sandbox = client.create_sandbox(&request).await.unwrap();
    let result = client
        .exec(
            &sandbox.id,
            &ExecRequest {
                shell: Some("echo $SANDBOX_WIDE $PER_CALL; pwd; id -un; id -u; echo $HOME".into()),
                env: BTreeMap::from([("PER_CALL".into(), "also".into())]),
                cwd: Some("/tmp".into()),
                user: Some("user".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(result.stdout, "yes also\n/tmp\nuser\n1000\n/home/user\n", "{result:?}");

    let root = sh(&client, &sandbox.id, "id -u; pwd").await;
    assert_eq!(root.stdout, "0\n/root\n");

    let bad_user = client
        .exec(
            &sandbox.id,
            &ExecRequest {
                command: vec!["true".into()],
                user: Some("ghost".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(bad_user.code(), Some("no_such_user"));
    let bad_cwd = client
        .exec(
            &sandbox.id,
            &ExecRequest {
                command: vec!["true".into()],
                cwd: Some("/nope".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(bad_cwd.code(), Some("bad_cwd"));
    client.delete_sandbox(&sandbox.id).await.unwrap();
}

#[tokio::test]
async fn exec_stream_delivers_chunks_then_exactly_one_exit() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "stream").await;
    let mut events = client
        .exec_stream(
            &sandbox.id,
            &ExecRequest {
                shell: Some("echo one; sleep 0.2; echo two >&2; exit 5".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    while let Some(event) = events.next().await {
        seen.push(event.unwrap());
    }
    assert!(matches!(seen.first(), Some(ExecEvent::Started { .. })), "{seen:?}");
    let decode = |data: &str| {
        use base64::Engine as _;
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(data).unwrap()).unwrap()
    };
    let stdout: String = seen
        .iter()
        .filter_map(|e| {
            if let ExecEvent::Stdout { data, .. } = e {
                Some(decode(data))
            } else {
                None
            }
        })
        .collect();
    let stderr: String = seen
        .iter()
        .filter_map(|e| {
            if let ExecEvent::Stderr { data, .. } = e {
                Some(decode(data))
            } else {
                None
            }
        })
        .collect();
    assert_eq!((stdout.as_str(), stderr.as_str()), ("one\n", "two\n"));
    let exits: Vec<_> = seen.iter().filter(|e| matches!(e, ExecEvent::Exit { .. })).collect();
    assert_eq!(exits.len(), 1);
    assert!(matches!(seen.last(), Some(ExecEvent::Exit { status, .. }) if status.exit_code == Some(5)));
    client.delete_sandbox(&sandbox.id).await.unwrap();
}

#[tokio::test]
async fn isolation_holds_from_inside() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "iso").await;
    let other = create(&client, "iso-other").await;
    sh(
        &client,
        &other.id,
        "echo secret > /root/other-file; setsid sleep 600 > /dev/null 2>&1 &",
    )
    .await;

    // Host processes are invisible: only the agent and the command itself are in the PID namespace.
    let ps = sh(&client, &sandbox.id, "ps -e -o pid=,comm=").await;
    let pids: Vec<&str> = ps.stdout.lines().collect();
    assert!(pids.len() <= 3, "unexpected processes: {pids:?}");
    assert!(ps.stdout.contains("nook-agent"), "{}", ps.stdout);
    assert!(
        !ps.stdout.contains("sleep"),
        "another sandbox's process is visible: {}",
        ps.stdout
    );
    // The other sandbox's files are invisible too.
    assert_eq!(
        sh(&client, &sandbox.id, "test -e /root/other-file").await.exit_code,
        Some(1)
    );
    let hostname = sh(&client, &sandbox.id, "hostname").await;
    assert_eq!(hostname.stdout.trim(), sandbox.name);

    for (what, script) in [
        ("mount", "mount -t tmpfs none /mnt"),
        (
            "reboot",
            "python3 -c 'import ctypes,sys; sys.exit(0 if ctypes.CDLL(None).reboot(0x1234567) == 0 else 1)'",
        ),
        ("user namespace", "unshare -U true"),
        ("mount namespace", "unshare -m true"),
        ("write to /proc/sys", "echo 1 > /proc/sys/kernel/sysrq"),
        ("write to /sys", "echo x > /sys/kernel/uevent_helper"),
        ("raw kernel log", "dmesg"),
        (
            "load a module",
            "python3 -c 'import ctypes,sys; sys.exit(0 if ctypes.CDLL(None).init_module(0,0,b\"\") == 0 else 1)'",
        ),
        (
            "io_uring",
            // A valid io_uring_setup (4 entries, zeroed 120-byte params): it succeeds wherever io_uring is allowed.
            "python3 -c 'import ctypes,sys; p=ctypes.create_string_buffer(120); \
             sys.exit(0 if ctypes.CDLL(None).syscall(425, 4, p) >= 0 else 1)'",
        ),
    ]
    .into_iter()
    .map(|(what, script)| (what, script.to_string()))
    .chain(host_disk_attempts())
    {
        let result = sh(&client, &sandbox.id, &script).await;
        assert_ne!(
            result.exit_code,
            Some(0),
            "{what} succeeded inside the sandbox: {result:?}"
        );
    }
    let status = sh(
        &client,
        &sandbox.id,
        "grep -E '^(CapBnd|NoNewPrivs|Seccomp):' /proc/self/status",
    )
    .await;
    assert!(status.stdout.contains("CapBnd:\t00000000a00425fb"), "{}", status.stdout);
    assert!(status.stdout.contains("Seccomp:\t2"), "{}", status.stdout);
    // setuid programs work as under Docker's defaults, but root reached through sudo keeps the same bounded set.
    assert!(status.stdout.contains("NoNewPrivs:\t0"), "{}", status.stdout);
    // The `user` account's passwordless sudo works, and the root it reaches is the same bounded root.
    let sudo = client
        .exec(
            &sandbox.id,
            &ExecRequest {
                shell: Some("id -un; sudo -n id -un; sudo -n grep CapBnd /proc/self/status; sudo -n mount -t tmpfs none /mnt || echo refused".into()),
                user: Some("user".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        sudo.stdout, "user\nroot\nCapBnd:\t00000000a00425fb\nrefused\n",
        "{sudo:?}"
    );
    let mounts = sh(&client, &sandbox.id, "grep -E ' /sys | /proc/sys ' /proc/self/mounts").await;
    assert!(
        mounts
            .stdout
            .lines()
            .all(|line| line.contains(" ro,") || line.contains(" ro ")),
        "{}",
        mounts.stdout
    );

    for id in [&sandbox.id, &other.id] {
        client.delete_sandbox(id).await.unwrap();
    }
}

/// Ways to reach the host's root disk by device number (the real major:minor of the disk under `/`).
fn host_disk_attempts() -> Vec<(&'static str, String)> {
    use std::os::unix::fs::MetadataExt as _;
    let dev = std::fs::metadata("/").unwrap().dev();
    let (major, minor) = (
        ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff),
        (dev & 0xff) | ((dev >> 12) & !0xff),
    );
    vec![
        ("mknod of the host disk", format!("mknod /tmp/disk b {major} {minor} && head -c 512 /tmp/disk | wc -c")),
        ("mknod in /dev", format!("mknod /dev/disk b {major} {minor} && head -c 512 /dev/disk | wc -c")),
        ("python mknod", format!("python3 -c 'import os; os.mknod(\"/root/d\", 0o600 | 0o60000, os.makedev({major}, {minor})); open(\"/root/d\", \"rb\").read(1)'")),
    ]
}

#[tokio::test]
async fn fork_bomb_is_contained_by_the_pids_limit() {
    let server = shared_server();
    let client = server.client();
    let bomb = create_with(
        &client,
        "bomb",
        ResourceRequest {
            pids: Some(64),
            disk_mb: None,
            ..Default::default()
        },
    )
    .await;
    let bystander = create(&client, "bystander").await;

    // The bomb runs in the background of its sandbox until the sandbox is stopped.
    let started = client
        .exec(
            &bomb.id,
            &ExecRequest {
                command: vec!["bash".into(), "-c".into(), ":(){ :|:& };: ; sleep 1".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(
        started.stderr.contains("Resource temporarily unavailable"),
        "{started:?}"
    );
    let hits = pids_limit_hits(&bomb.id);
    assert!(hits > 0, "the pids limit was never hit");

    // The host and the other sandbox are unharmed.
    assert!(std::process::Command::new("true").status().unwrap().success());
    assert_eq!(sh(&client, &bystander.id, "echo ok").await.stdout, "ok\n");
    // Stopping kills the whole bomb; after a start the sandbox works again.
    client.stop_sandbox(&bomb.id).await.unwrap();
    assert!(leftovers(server, &bomb.id)
        .iter()
        .all(|item| item.starts_with("directory")));
    client.start_sandbox(&bomb.id).await.unwrap();
    assert_eq!(sh(&client, &bomb.id, "echo ok").await.stdout, "ok\n");
    for id in [&bomb.id, &bystander.id] {
        client.delete_sandbox(id).await.unwrap();
    }
}

/// How often the kernel refused a fork for the sandbox's pids limit (`max` in `pids.events`).
fn pids_limit_hits(id: &str) -> u64 {
    let events = ["/sys/fs/cgroup/pids/nook", "/sys/fs/cgroup/nook"]
        .iter()
        .find_map(|dir| std::fs::read_to_string(format!("{dir}/{id}/pids.events")).ok())
        .unwrap_or_default();
    events
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn memory_hog_is_oom_killed_and_the_reason_recorded() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create_with(
        &client,
        "hog",
        ResourceRequest {
            memory_mb: Some(64),
            ..Default::default()
        },
    )
    .await;
    let hog = client
        .exec(
            &sandbox.id,
            &ExecRequest {
                command: vec![
                    "python3".into(),
                    "-c".into(),
                    "x = bytearray(512 * 1024 * 1024); print(len(x))".into(),
                ],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(hog.signal, Some(9), "the hog was not killed: {hog:?}");
    eventually("the sandbox records the OOM kill", Duration::from_secs(10), || async {
        let current = client.sandbox(&sandbox.id).await.unwrap();
        current.state_reason == StateReason::Oom && current.oom_kills >= 1
    })
    .await;
    let current = client.sandbox(&sandbox.id).await.unwrap();
    assert_eq!(current.state, SandboxState::Running);
    assert!(current.state_message.contains("64 MiB"), "{}", current.state_message);
    // The kernel's log names the victim.
    assert!(
        current.state_message.contains("the process \"python3\""),
        "{}",
        current.state_message
    );
    let events = client.sandbox_events(&sandbox.id).await.unwrap();
    assert!(events.iter().any(|event| event.reason == StateReason::Oom));
    // The sandbox itself survives: the agent is never the OOM victim.
    assert_eq!(sh(&client, &sandbox.id, "echo alive").await.stdout, "alive\n");
    client.delete_sandbox(&sandbox.id).await.unwrap();
}

#[tokio::test]
async fn files_survive_stop_and_start_and_delete_leaves_nothing() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "persist").await;
    sh(
        &client,
        &sandbox.id,
        "mkdir -p /data && echo kept > /data/file && echo gone > /tmp/x",
    )
    .await;
    let stopped = client.stop_sandbox(&sandbox.name).await.unwrap();
    assert_eq!(stopped.state, SandboxState::Stopped);
    let refused = client
        .exec(
            &sandbox.id,
            &ExecRequest {
                command: vec!["true".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("not_running"));
    // Stopping leaves only files: no processes, cgroups or mounts.
    let left: Vec<String> = leftovers(server, &sandbox.id)
        .into_iter()
        .filter(|item| !item.starts_with("directory"))
        .collect();
    assert!(left.is_empty(), "a stopped sandbox left {left:?}");

    let started = client.start_sandbox(&sandbox.name).await.unwrap();
    assert_eq!(
        (started.state, started.id.as_str()),
        (SandboxState::Running, sandbox.id.as_str())
    );
    assert_eq!(sh(&client, &sandbox.id, "cat /data/file").await.stdout, "kept\n");

    let events = client.sandbox_events(&sandbox.id).await.unwrap();
    let states: Vec<SandboxState> = events.iter().map(|event| event.to_state).collect();
    assert_eq!(
        states,
        [
            SandboxState::Creating,
            SandboxState::Running,
            SandboxState::Stopped,
            SandboxState::Running
        ]
    );

    // Sandboxes' files (root-owned, possibly setuid) are out of reach of other host users.
    use std::os::unix::fs::PermissionsExt as _;
    for dir in [server.data_dir.clone(), server.data_dir.join("runner")] {
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} is open to other users ({mode:o})", dir.display());
    }

    client.delete_sandbox(&sandbox.id).await.unwrap();
    assert_eq!(client.sandbox(&sandbox.id).await.unwrap_err().code(), Some("not_found"));
    assert_eq!(leftovers(server, &sandbox.id), Vec::<String>::new());
}

#[tokio::test]
async fn bad_requests_are_refused_clearly_and_create_nothing() {
    let server = shared_server();
    let client = server.client();
    let taken = create(&client, "taken").await;
    let before = std::fs::read_dir(server.data_dir.join("runner/sandboxes"))
        .unwrap()
        .count();

    let cases: Vec<(&str, CreateSandboxRequest, &str)> = vec![
        (
            "unknown image",
            CreateSandboxRequest {
                image: Some("no-such-image".into()),
                ..Default::default()
            },
            "not_found",
        ),
        (
            "duplicate name",
            CreateSandboxRequest {
                name: Some(taken.name.clone()),
                ..Default::default()
            },
            "conflict",
        ),
        (
            "bad name",
            CreateSandboxRequest {
                name: Some("Not A Hostname".into()),
                ..Default::default()
            },
            "invalid_request",
        ),
        (
            "absurd memory",
            CreateSandboxRequest {
                resources: Some(ResourceRequest {
                    memory_mb: Some(1 << 40),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "invalid_request",
        ),
        (
            "absurd cpu",
            CreateSandboxRequest {
                resources: Some(ResourceRequest {
                    cpu: Some(10_000.0),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "invalid_request",
        ),
        (
            "too few pids",
            CreateSandboxRequest {
                resources: Some(ResourceRequest {
                    pids: Some(1),
                    disk_mb: None,
                    ..Default::default()
                }),
                ..Default::default()
            },
            "invalid_request",
        ),
        (
            "bad env name",
            CreateSandboxRequest {
                env: BTreeMap::from([("A=B".into(), "x".into())]),
                ..Default::default()
            },
            "invalid_request",
        ),
    ];
    for (what, request, code) in cases {
        let error = client.create_sandbox(&request).await.expect_err(what);
        assert_eq!(error.code(), Some(code), "{what}: {error}");
        assert!(error.status().unwrap().is_client_error(), "{what}: {error}");
    }

    let http = reqwest::Client::new();
    let url = format!("{}/v1/sandboxes", server.url);
    let raw = |body: &'static str, key: Option<&str>| {
        let mut request = http.post(&url).header("content-type", "application/json").body(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    for (what, body, key, status, code) in [
        (
            "malformed JSON",
            "{\"name\": ",
            Some(server.key.as_str()),
            400,
            "invalid_request",
        ),
        (
            "unknown field",
            "{\"nmae\": \"x\"}",
            Some(server.key.as_str()),
            400,
            "invalid_request",
        ),
        (
            "wrong type",
            "{\"labels\": 3}",
            Some(server.key.as_str()),
            400,
            "invalid_request",
        ),
        ("missing key", "{}", None, 401, "unauthenticated"),
        ("wrong key", "{}", Some("nook_wrong"), 401, "unauthenticated"),
    ] {
        let response = raw(body, key).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{what}");
        let error: nook_api::ApiError = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
        assert_eq!(error.code, code, "{what}");
        assert!(!error.message.is_empty(), "{what}");
    }

    let after = std::fs::read_dir(server.data_dir.join("runner/sandboxes"))
        .unwrap()
        .count();
    assert!(after <= before, "a refused request created a sandbox directory");
    assert!(client
        .list_sandboxes(None, &BTreeMap::new())
        .await
        .unwrap()
        .iter()
        .all(|s| s.name != "not-a-hostname"));
    client.delete_sandbox(&taken.id).await.unwrap();
}

#[tokio::test]
async fn a_failed_boot_leaves_nothing_behind() {
    let server = shared_server();
    let client = server.client();
    // An image whose /proc is a regular file: mounting procfs there fails during boot.
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(0);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    builder.append_data(&mut header, "proc", std::io::empty()).unwrap();
    let broken = builder.into_inner().unwrap();
    let image = format!("broken-{}", &common::rand_suffix()[..6]);
    client.import_image(&image, broken.into()).await.unwrap();

    let request = CreateSandboxRequest {
        image: Some(image.clone()),
        ..Default::default()
    };
    let error = client.create_sandbox(&request).await.unwrap_err();
    assert!(
        error.to_string().contains("proc"),
        "the error does not name the failed step: {error}"
    );
    let failed = client
        .list_sandboxes(Some(SandboxState::Error), &BTreeMap::new())
        .await
        .unwrap()
        .into_iter()
        .find(|sandbox| sandbox.image == image)
        .expect("the failed sandbox is recorded with its reason");
    assert_eq!(failed.state_reason, StateReason::CreateFailed);
    assert_eq!(leftovers(server, &failed.id), Vec::<String>::new());
    client.delete_sandbox(&failed.id).await.unwrap();
    client.remove_image(&image).await.unwrap();
}

#[tokio::test]
async fn fifty_concurrent_sandboxes_work_and_leave_nothing() {
    let server = shared_server();
    let client = server.client();
    let label = common::rand_suffix();
    let creates = (0..50).map(|index| {
        let client = client.clone();
        let label = label.clone();
        async move {
            let request = CreateSandboxRequest {
                name: Some(format!("many-{}-{index}", &label[..6])),
                labels: BTreeMap::from([("batch".into(), label)]),
                resources: Some(ResourceRequest {
                    memory_mb: Some(64),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let sandbox = client.create_sandbox(&request).await.expect("concurrent create");
            let echo = sh(&client, &sandbox.id, &format!("echo {index}")).await;
            assert_eq!(echo.stdout, format!("{index}\n"));
            sandbox.id
        }
    });
    let ids = futures::future::join_all(creates).await;
    let listed = client
        .list_sandboxes(Some(SandboxState::Running), &BTreeMap::from([("batch".into(), label)]))
        .await;
    assert_eq!(listed.unwrap().len(), 50);
    let deletes = ids.iter().map(|id| client.delete_sandbox(id));
    for result in futures::future::join_all(deletes).await {
        result.unwrap();
    }
    for id in &ids {
        assert_eq!(leftovers(server, id), Vec::<String>::new());
    }
}

#[tokio::test]
async fn the_event_stream_follows_live_and_resumes_after_a_number() {
    use nook_api::SandboxEventLine;

    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "events").await;
    let mut stream = client.follow_sandbox_events(&sandbox.id, 0).await.unwrap();
    // The history first: created, then running.
    let SandboxEventLine::Event { event, .. } = next_line(&mut stream).await else {
        panic!()
    };
    assert_eq!(event.to_state, SandboxState::Creating);
    let SandboxEventLine::Event {
        seq: running_seq,
        event,
    } = next_line(&mut stream).await
    else {
        panic!()
    };
    assert_eq!(event.to_state, SandboxState::Running);
    // Then what happens, as it happens.
    client.stop_sandbox(&sandbox.id).await.unwrap();
    let SandboxEventLine::Event {
        seq: stopped_seq,
        event,
    } = next_line(&mut stream).await
    else {
        panic!()
    };
    assert_eq!(
        (event.to_state, event.reason),
        (SandboxState::Stopped, StateReason::Requested)
    );
    assert!(stopped_seq > running_seq);

    // A reconnect from a number sees only what followed it.
    let mut resumed = client.follow_sandbox_events(&sandbox.id, running_seq).await.unwrap();
    let first = next_line(&mut resumed).await;
    assert!(
        matches!(first, SandboxEventLine::Event { seq, .. } if seq == stopped_seq),
        "{first:?}"
    );

    client.delete_sandbox(&sandbox.id).await.unwrap();
    assert_eq!(next_line(&mut stream).await, SandboxEventLine::Deleted);
    drop(stream);
}

/// The next line of an event stream that is not a keepalive.
async fn next_line(
    stream: &mut (impl futures::Stream<Item = Result<nook_api::SandboxEventLine, nook_client::ClientError>> + Unpin),
) -> nook_api::SandboxEventLine {
    loop {
        let line = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("an event within 20 s")
            .expect("the stream goes on")
            .unwrap();
        if line != nook_api::SandboxEventLine::Keepalive {
            return line;
        }
    }
}
