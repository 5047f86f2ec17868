//! Dockerfile builds end to end, through the API of a real `nook serve` on the `base` image: a build whose COPY
//! honours `.dockerignore` gives sandboxes the files and config the Dockerfile says; an unchanged rebuild runs
//! nothing and takes every layer from the cache, while a changed file rebuilds only from its COPY on; a failing RUN
//! is reported with its exit code and output and names nothing; builds can be cancelled and time out, leaving no
//! step sandbox; a template's start command is running (and answering) when a sandbox from it starts, and a
//! template whose start command never becomes ready fails the create with its reason.

mod common;

use std::time::{Duration, Instant};

use common::fixture_image::{busybox_layer, FixtureImage};
use common::{sh, shared_server, TestServer};
use futures::StreamExt;
use nook_api::{Build, BuildEvent, BuildRequest, BuildState, CreateSandboxRequest, OutputStream};
use nook_client::{Client, ClientError};

/// A build context: a tar of (path, contents) files.
fn context(files: &[(&str, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, body) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        header.set_cksum();
        builder.append_data(&mut header, path, body.as_bytes()).unwrap();
    }
    builder.into_inner().unwrap()
}

/// A build context with a symbolic link `link` → `target` besides the files.
fn context_with_link(files: &[(&str, &str)], link: &str, target: &str) -> Vec<u8> {
    let mut bytes = context(files);
    // Over the two zero blocks that end the files' tar.
    bytes.truncate(bytes.len() - 1024);
    let mut builder = tar::Builder::new(bytes);
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_size(0);
    header.set_mode(0o777);
    builder.append_link(&mut header, link, target).unwrap();
    builder.into_inner().unwrap()
}

fn request(name: &str) -> BuildRequest {
    BuildRequest {
        name: name.into(),
        ..BuildRequest::default()
    }
}

/// Starts a build and follows its log to the end: the build as it ended and every event.
async fn build(client: &Client, request: &BuildRequest, files: &[(&str, &str)]) -> (Build, Vec<BuildEvent>) {
    let started = client
        .start_build(request, reqwest::Body::from(context(files)))
        .await
        .unwrap_or_else(|error| panic!("starting the build of {} failed: {error}", request.name));
    // An unchanged rebuild is all cache hits: it may be over (milliseconds) before the answer is written.
    assert!(
        matches!(started.state, BuildState::Building | BuildState::Succeeded),
        "{:?}",
        started.state
    );
    let events = follow(client, &started.id).await;
    (client.build(&started.id).await.unwrap(), events)
}

async fn follow(client: &Client, id: &str) -> Vec<BuildEvent> {
    let mut stream = client.build_events(id, 0, true).await.unwrap();
    let mut events = Vec::new();
    while let Some(event) = stream.next().await {
        let event = event.unwrap();
        if event != BuildEvent::Keepalive {
            events.push(event);
        }
    }
    events
}

fn output(events: &[BuildEvent]) -> String {
    events
        .iter()
        .filter_map(|event| match event {
            BuildEvent::Output { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

/// (step, cached, added a layer) of every finished step.
fn steps(events: &[BuildEvent]) -> Vec<(u32, bool, bool)> {
    events
        .iter()
        .filter_map(|event| match event {
            BuildEvent::StepDone {
                step, cached, layer, ..
            } => Some((*step, *cached, layer.is_some())),
            _ => None,
        })
        .collect()
}

/// Step sandboxes left in the runner's directory.
/// The step sandboxes of the build `build_id` still on the runner (other tests' builds run beside this one).
fn step_sandboxes(server: &TestServer, build_id: &str) -> Vec<String> {
    let prefix = format!("build-{build_id}-");
    std::fs::read_dir(server.data_dir.join("runner/sandboxes"))
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(&prefix))
        .collect()
}

const APP_DOCKERFILE: &str = r#"# an application image
FROM base
ARG GREETING=hello
ENV APP_HOME=/srv/app \
    MODE=test
LABEL org.example.team="agents"
WORKDIR $APP_HOME
COPY --chown=user src/ ./src/
COPY config.toml .
RUN echo "$GREETING from $MODE" > built.txt && cat built.txt && echo to-stderr >&2
USER user
EXPOSE 8000
CMD ["python3", "-m", "http.server"]
"#;

fn app_files(main: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("Dockerfile", APP_DOCKERFILE),
        (
            ".dockerignore",
            "node_modules\n**/*.secret\nsrc/generated\n!src/generated/keep.txt\n",
        ),
        ("src/main.py", main),
        ("src/util.py", "X = 1\n"),
        ("src/token.secret", "do-not-ship\n"),
        ("src/generated/junk.txt", "junk\n"),
        ("src/generated/keep.txt", "kept\n"),
        ("node_modules/left/index.js", "module.exports = 1\n"),
        ("config.toml", "mode = 'test'\n"),
    ]
}

#[tokio::test]
async fn builds_honour_dockerignore_give_their_config_and_rebuild_from_the_cache() {
    let server = shared_server();
    let client = server.client();
    let (built, events) = build(&client, &request("built/app:1"), &app_files("print('v1')\n")).await;
    assert_eq!(built.state, BuildState::Succeeded, "{events:#?}");
    let image = built.image.clone().expect("the built image");
    assert!(
        matches!(events.first(), Some(BuildEvent::Started { steps: 11, .. })),
        "{events:#?}"
    );
    assert!(matches!(events.last(), Some(BuildEvent::Done { .. })));
    // The RUN's output streamed, stdout and stderr apart.
    assert!(output(&events).contains("hello from test\n"), "{events:#?}");
    assert!(events.iter().any(|event| matches!(
        event,
        BuildEvent::Output { stream: OutputStream::Stderr, text, .. } if text.contains("to-stderr")
    )));
    // Three steps add layers (two COPYs and the RUN), on top of base's.
    let base = client.image("base").await.unwrap();
    assert_eq!(image.layers.len(), base.layers.len() + 3);
    assert_eq!(image.layers[..base.layers.len()], base.layers[..]);
    assert_eq!(image.config.working_dir.as_deref(), Some("/srv/app"));
    assert_eq!(image.config.user.as_deref(), Some("user"));
    assert_eq!(image.config.cmd, ["python3", "-m", "http.server"]);
    assert_eq!(image.config.exposed_ports, ["8000/tcp"]);
    assert_eq!(image.config.labels["org.example.team"], "agents");
    assert!(image.config.env.contains(&"APP_HOME=/srv/app".to_string()));
    assert!(image.config.env.contains(&"MODE=test".to_string()));

    let sandbox = client
        .create_sandbox(&CreateSandboxRequest {
            image: Some("built/app:1".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let seen = sh(
        &client,
        &sandbox.id,
        "id -un; pwd; echo $MODE; cat built.txt; find . -type f | sort; stat -c %U src/main.py; ls -d /srv/app/node_modules 2>&1",
    )
    .await;
    assert_eq!(
        seen.stdout,
        "user\n/srv/app\ntest\nhello from test\n./built.txt\n./config.toml\n./src/generated/keep.txt\n./src/main.py\n\
         ./src/util.py\nuser\nls: cannot access '/srv/app/node_modules': No such file or directory\n",
        "{seen:?}"
    );

    // Unchanged: nothing runs, every layer step comes from the cache, the image is the same.
    let started = Instant::now();
    let (again, events) = build(&client, &request("built/app:1"), &app_files("print('v1')\n")).await;
    let rebuild = started.elapsed();
    assert_eq!(again.image.as_ref().unwrap().digest, image.digest);
    assert_eq!(output(&events), "", "a cached build runs nothing");
    let layer_steps: Vec<_> = steps(&events).into_iter().filter(|(_, _, layer)| *layer).collect();
    assert_eq!(layer_steps.len(), 3);
    assert!(layer_steps.iter().all(|(_, cached, _)| *cached), "{events:#?}");
    assert!(matches!(events.last(), Some(BuildEvent::Done { cached_steps: 3, .. })));
    eprintln!("unchanged rebuild: {} ms", rebuild.as_millis());

    // A file the first COPY takes changed: that COPY and everything after it run again, the rest is cached.
    let (changed, events) = build(&client, &request("built/app:2"), &app_files("print('v2')\n")).await;
    assert_eq!(changed.state, BuildState::Succeeded);
    let by_step: Vec<(u32, bool)> = steps(&events)
        .into_iter()
        .filter(|(_, _, layer)| *layer)
        .map(|(step, cached, _)| (step, cached))
        .collect();
    assert_eq!(by_step, [(6, false), (7, false), (8, false)], "{events:#?}");
    // A file .dockerignore leaves out changes nothing.
    let mut files = app_files("print('v2')\n");
    files.push(("src/another.secret", "changed\n"));
    let (ignored, events) = build(&client, &request("built/app:2"), &files).await;
    assert_eq!(
        ignored.image.as_ref().unwrap().digest,
        changed.image.as_ref().unwrap().digest
    );
    assert_eq!(output(&events), "");

    // A build argument is part of the RUN's key: a new value runs it again and the sandbox sees it.
    let mut with_arg = request("built/app:3");
    with_arg.build_args = Some(r#"{"GREETING":"hi"}"#.into());
    let (argued, events) = build(&client, &with_arg, &app_files("print('v2')\n")).await;
    assert_eq!(argued.state, BuildState::Succeeded);
    assert!(output(&events).contains("hi from test"), "{events:#?}");
    client.delete_sandbox(&sandbox.id).await.unwrap();
    for build in [&built, &again, &changed, &ignored, &argued] {
        assert!(step_sandboxes(server, &build.id).is_empty());
    }
}

#[tokio::test]
async fn a_failing_run_is_reported_with_its_output_and_names_nothing() {
    let server = shared_server();
    let client = server.client();
    let dockerfile = "FROM base\nRUN echo compiling; echo 'error: missing semicolon' >&2; exit 3\nRUN echo never\n";
    let (failed, events) = build(&client, &request("built/broken:1"), &[("Dockerfile", dockerfile)]).await;
    assert_eq!(failed.state, BuildState::Failed);
    assert!(failed.image.is_none());
    let Some(BuildEvent::Error { error, step, exit_code }) = events.last() else {
        panic!("no error event: {events:#?}");
    };
    assert_eq!((*step, *exit_code), (Some(2), Some(3)));
    assert_eq!(error.code, "build_step_failed");
    assert!(
        error.message.contains("exit code 3") && error.message.contains("error: missing semicolon"),
        "{error:?}"
    );
    assert_eq!(failed.error.as_ref(), Some(error));
    assert!(!output(&events).contains("never"));
    let missing = client.image("built/broken:1").await.unwrap_err();
    assert_eq!(missing.status(), Some(reqwest::StatusCode::NOT_FOUND));
    assert!(step_sandboxes(server, &failed.id).is_empty());

    // Mistakes found before anything runs fail the request itself, with the line.
    let refused = client
        .start_build(
            &request("built/typo:1"),
            reqwest::Body::from(context(&[("Dockerfile", "FROM base\nRUNN echo\n")])),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("invalid_dockerfile"), "{refused}");
    assert!(refused.to_string().contains("line 2"), "{refused}");
    let missing = client
        .start_build(
            &request("built/none:1"),
            reqwest::Body::from(context(&[("README", "x")])),
        )
        .await
        .unwrap_err();
    assert!(missing.to_string().contains("has no Dockerfile"), "{missing}");
    let hostile = client
        .start_build(
            &request("built/hostile:1"),
            reqwest::Body::from(context(&[("Dockerfile", "FROM base\nCOPY ../../etc/passwd /x\n")])),
        )
        .await
        .expect("the Dockerfile parses");
    let events = follow(&client, &hostile.id).await;
    let Some(BuildEvent::Error { error, .. }) = events.last() else {
        panic!("{events:#?}")
    };
    assert!(error.message.contains("leaves the build context"), "{error:?}");
}

#[tokio::test]
async fn builds_can_be_cancelled_and_time_out_leaving_nothing() {
    let server = shared_server();
    let client = server.client();
    let context_bytes = context(&[("Dockerfile", "FROM base\nRUN echo waiting; sleep 300\n")]);
    let started = client
        .start_build(
            &request("built/cancelled:1"),
            reqwest::Body::from(context_bytes.clone()),
        )
        .await
        .unwrap();
    // Cancel once the step is running.
    let mut stream = client.build_events(&started.id, 0, true).await.unwrap();
    while let Some(event) = stream.next().await {
        if matches!(event.unwrap(), BuildEvent::Output { .. }) {
            break;
        }
    }
    let cancelled = client.cancel_build(&started.id).await.unwrap();
    assert_eq!(cancelled.state, BuildState::Cancelled);
    assert_eq!(
        cancelled.error.as_ref().map(|e| e.code.as_str()),
        Some("build_cancelled")
    );
    let left = step_sandboxes(server, &started.id);
    assert!(left.is_empty(), "{left:?}");
    assert!(client.image("built/cancelled:1").await.is_err());

    let mut timed = request("built/timed:1");
    timed.timeout_s = Some(2);
    let started = Instant::now();
    let (timed_out, _) = build(&client, &timed, &[("Dockerfile", "FROM base\nRUN sleep 300\n")]).await;
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(timed_out.state, BuildState::Failed);
    assert_eq!(timed_out.error.map(|e| e.code), Some("build_timed_out".to_string()));
    assert!(step_sandboxes(server, &timed_out.id).is_empty());
    let listed = client.builds().await.unwrap();
    assert!(listed
        .iter()
        .any(|build| build.id == cancelled.id && build.state == BuildState::Cancelled));
}

#[tokio::test]
async fn a_template_start_command_is_running_when_its_sandbox_starts() {
    let server = shared_server();
    let client = server.client();
    let dockerfile = "FROM base\nRUN mkdir -p /srv/www && echo 'served by the template' > /srv/www/index.html\n";
    let mut template = request("built/web-template:1");
    template.start_command = Some("cd /srv/www && exec python3 -m http.server 8000".into());
    template.ready_command =
        Some("python3 -c 'import urllib.request; urllib.request.urlopen(\"http://127.0.0.1:8000/\")'".into());
    let (built, events) = build(&client, &template, &[("Dockerfile", dockerfile)]).await;
    assert_eq!(built.state, BuildState::Succeeded, "{events:#?}");
    let start = built.image.unwrap().config.start.expect("the template's start command");
    assert_eq!(start.command, "cd /srv/www && exec python3 -m http.server 8000");

    let fetch = "python3 -c 'import urllib.request; print(urllib.request.urlopen(\"http://127.0.0.1:8000/index.html\").read().decode(), end=\"\")'";
    let sandbox = client
        .create_sandbox(&CreateSandboxRequest {
            image: Some("built/web-template:1".into()),
            ..Default::default()
        })
        .await
        // Displayed, not debugged: the server's message holds the start command's last output lines.
        .unwrap_or_else(|error| panic!("{error}"));
    // The server answers the first request after the create returns: no wait, no retry.
    let first = sh(&client, &sandbox.id, fetch).await;
    assert_eq!(first.stdout, "served by the template\n", "{first:?}");
    let processes = client.processes(&sandbox.id).await.unwrap();
    assert!(
        processes
            .iter()
            .any(|p| p.command.iter().any(|arg| arg.contains("http.server"))),
        "{processes:?}"
    );
    // And again after a stop and a start.
    client.stop_sandbox(&sandbox.id).await.unwrap();
    client.start_sandbox(&sandbox.id).await.unwrap();
    assert_eq!(sh(&client, &sandbox.id, fetch).await.stdout, "served by the template\n");
    client.delete_sandbox(&sandbox.id).await.unwrap();

    // The start command travels with the image: exported and imported again, it is still a template (built on a
    // small image, so that the export stays small).
    let busybox = FixtureImage {
        layers: vec![busybox_layer()],
        run_config: serde_json::json!({}),
    };
    client
        .import_image("built/busybox:1", reqwest::Body::from(busybox.oci_archive().0))
        .await
        .unwrap();
    let mut small = request("built/small-template:1");
    small.start_command = Some("sleep 1000".into());
    small.ready_command = Some("true".into());
    let dockerfile = "FROM built/busybox:1\nRUN echo small > /small.txt\n";
    let (built, _) = build(&client, &small, &[("Dockerfile", dockerfile)]).await;
    let start = built.image.unwrap().config.start.expect("a template");
    let mut layout = Vec::new();
    let mut chunks = client.export_image("built/small-template:1").await.unwrap();
    while let Some(chunk) = chunks.next().await {
        layout.extend_from_slice(&chunk.unwrap());
    }
    let moved = client
        .import_image("built/small-template-moved:1", reqwest::Body::from(layout))
        .await
        .unwrap();
    assert_eq!(moved.config.start.as_ref(), Some(&start));

    // A start command that never becomes ready fails the create with its reason and its output.
    let mut broken = request("built/never-ready:1");
    broken.start_command = Some("echo 'listening soon'; sleep 600".into());
    broken.ready_command = Some("test -e /ready".into());
    broken.ready_timeout_s = Some(2);
    let (built, _) = build(&client, &broken, &[("Dockerfile", "FROM base\n")]).await;
    assert_eq!(built.state, BuildState::Succeeded);
    let failure = client
        .create_sandbox(&CreateSandboxRequest {
            image: Some("built/never-ready:1".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let ClientError::Api { error, .. } = &failure else {
        panic!("{failure}")
    };
    assert_eq!(error.code, "template_not_ready");
    assert!(
        error.message.contains("test -e /ready") && error.message.contains("listening soon"),
        "{error:?}"
    );
}

#[tokio::test]
async fn links_in_the_context_stay_links_and_arguments_before_from_are_scoped() {
    let server = shared_server();
    let client = server.client();
    // A link named like an archive: ADD copies the link, it never reads the host file it points at.
    let dockerfile = "FROM base\nADD evil.tar.gz /added/\nRUN readlink /added/evil.tar.gz\n";
    let context = context_with_link(&[("Dockerfile", dockerfile)], "evil.tar.gz", "/etc/hostname");
    let started = client
        .start_build(&request("built/links:1"), reqwest::Body::from(context))
        .await
        .unwrap();
    let events = follow(&client, &started.id).await;
    assert!(matches!(events.last(), Some(BuildEvent::Done { .. })), "{events:#?}");
    assert_eq!(output(&events), "/etc/hostname\n");

    // An ARG before FROM is seen by FROM alone; declared again after it, it takes its value, and a new value runs
    // the step again instead of coming from the cache.
    let dockerfile = "ARG V=one\nFROM base\nRUN echo \"before: [$V]\"\nARG V\nRUN echo \"after: $V\"\n";
    let (first, events) = build(&client, &request("built/args:1"), &[("Dockerfile", dockerfile)]).await;
    assert_eq!(first.state, BuildState::Succeeded, "{events:#?}");
    assert_eq!(output(&events), "before: []\nafter: one\n");
    let mut again = request("built/args:2");
    again.build_args = Some(r#"{"V":"two"}"#.into());
    let (_, events) = build(&client, &again, &[("Dockerfile", dockerfile)]).await;
    assert_eq!(output(&events), "after: two\n", "{events:#?}");
}
