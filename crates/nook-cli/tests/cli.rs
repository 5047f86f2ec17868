//! The `nook` CLI against a real server: verbs, table and JSON output, exit codes that scripts can trust, image
//! import of a directory, and finding the server through the client config that `nook serve` writes.

mod common;

use std::process::{Command, Output};

use common::{shared_server, TestServer};
use nook_api::{Image, Sandbox, SandboxState};

fn nook(server: &TestServer, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nook"))
        .args(args)
        .env("NOOK_URL", &server.url)
        .env("NOOK_API_KEY", &server.key)
        .output()
        .expect("running nook")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn ok(server: &TestServer, args: &[&str]) -> String {
    let output = nook(server, args);
    assert!(
        output.status.success(),
        "nook {args:?} failed: {}{}",
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout(&output)
}

#[test]
fn verbs_tables_json_and_exit_codes() {
    let server = shared_server();
    let name = format!("cli-{}", &common::rand_suffix()[..8]);
    let created: Sandbox = serde_json::from_str(&ok(
        server,
        &[
            "create", "--name", &name, "--label", "via=cli", "--memory", "128", "--json",
        ],
    ))
    .unwrap();
    assert_eq!(
        (created.state, created.resources.memory_mb),
        (SandboxState::Running, 128)
    );

    let table = ok(server, &["ls", "--label", "via=cli"]);
    let header = table.lines().next().unwrap();
    assert!(header.starts_with("ID") && header.contains("STATE"), "{table}");
    assert!(table.contains(&name) && table.contains("running"), "{table}");
    assert!(ok(server, &["inspect", &name]).contains(&format!("name       {name}")));

    let echo = nook(
        server,
        &["exec", &name, "--", "sh", "-c", "echo out; echo err >&2; exit 3"],
    );
    assert_eq!(echo.status.code(), Some(3));
    assert_eq!(stdout(&echo), "out\n");
    assert_eq!(String::from_utf8_lossy(&echo.stderr), "err\n");
    assert_eq!(
        nook(server, &["exec", &name, "--", "sh", "-c", "kill -TERM $$"])
            .status
            .code(),
        Some(143)
    );
    assert_eq!(
        nook(server, &["exec", &name, "--", "no-such-command"]).status.code(),
        Some(127)
    );
    let env = ok(
        server,
        &[
            "exec",
            "-e",
            "A=1",
            "-w",
            "/tmp",
            "-u",
            "user",
            &name,
            "--",
            "sh",
            "-c",
            "echo $A $(pwd) $(id -un)",
        ],
    );
    assert_eq!(env, "1 /tmp user\n");

    assert!(ok(server, &["stop", &name]).contains(&name));
    let stopped: Sandbox = serde_json::from_str(&ok(server, &["inspect", &name, "--json"])).unwrap();
    assert_eq!(stopped.state, SandboxState::Stopped);
    assert_eq!(nook(server, &["exec", &name, "--", "true"]).status.code(), Some(125));
    ok(server, &["start", &name]);
    ok(server, &["rm", &name]);
    let missing = nook(server, &["inspect", &name]);
    assert_eq!(missing.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no sandbox"),
        "{missing:?}"
    );
}

#[test]
fn image_import_of_a_directory_is_usable_and_reproducible() {
    let server = shared_server();
    // A minimal root filesystem: one static program (the agent binary itself answers `--version`), a file and a
    // symlink that points outside the directory.
    let rootfs = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(rootfs.path().join("bin")).unwrap();
    std::fs::create_dir_all(rootfs.path().join("etc")).unwrap();
    std::fs::copy(common::agent_binary(), rootfs.path().join("bin/tool")).unwrap();
    std::fs::write(rootfs.path().join("etc/motd"), "from a directory\n").unwrap();
    std::os::unix::fs::symlink("/etc/shadow", rootfs.path().join("etc/escape")).unwrap();
    let name = format!("dir-{}", &common::rand_suffix()[..6]);
    let path = rootfs.path().to_str().unwrap();
    let first: Image = serde_json::from_str(&ok(server, &["image", "import", &name, path, "--json"])).unwrap();
    let again: Image = serde_json::from_str(&ok(server, &["image", "import", &name, path, "--json"])).unwrap();
    assert_eq!(
        first.layers, again.layers,
        "packing the same directory twice gave different layers"
    );
    let layer = server
        .data_dir
        .join("runner/layers/sha256")
        .join(first.layers[0].trim_start_matches("sha256:"));
    assert_eq!(
        std::fs::read_to_string(layer.join("etc/motd")).unwrap(),
        "from a directory\n"
    );
    // Symlinks are stored as links, never followed.
    assert_eq!(
        std::fs::read_link(layer.join("etc/escape")).unwrap(),
        std::path::Path::new("/etc/shadow")
    );
    assert!(ok(server, &["image", "ls"]).contains(&name));

    let sandbox = format!("from-dir-{}", &common::rand_suffix()[..6]);
    ok(server, &["create", "--name", &sandbox, "--image", &name]);
    assert!(ok(server, &["exec", &sandbox, "--", "/bin/tool", "--version"]).starts_with("nook-agent "));
    ok(server, &["rm", &sandbox]);
    ok(server, &["image", "rm", &name]);
    assert!(!ok(server, &["image", "ls"]).contains(&name));
}

#[test]
fn the_client_finds_the_server_through_the_config_serve_writes() {
    let home = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_nook"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(data.path())
        .env("HOME", home.path())
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("NOOK_ADMIN_KEY")
        .env("NOOK_AGENT_BINARY", common::agent_binary())
        .env_remove("NOOK_BASE_IMAGE_TAR")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let config = home.path().join(".config/nook/client.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !config.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "nook serve wrote no client config"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&config).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the client config holds a key and must be private");
    let ls = Command::new(env!("CARGO_BIN_EXE_nook"))
        .args(["ls", "--json"])
        .env("HOME", home.path())
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("NOOK_URL")
        .env_remove("NOOK_API_KEY")
        .output()
        .unwrap();
    assert!(ls.status.success(), "{}", String::from_utf8_lossy(&ls.stderr));
    assert_eq!(stdout(&ls).trim(), "[]");
    // The generated key is stored only as a hash.
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    let key = saved["api_key"].as_str().unwrap();
    for file in ["nook.db", "nook.db-wal"] {
        let bytes = std::fs::read(data.path().join(file)).unwrap_or_default();
        assert!(
            !bytes.windows(key.len()).any(|window| window == key.as_bytes()),
            "the plain key is in {file}"
        );
    }
    // SAFETY: signalling our own child has no memory-safety preconditions.
    unsafe {
        libc::kill(serve.id() as i32, libc::SIGTERM);
    }
    assert!(serve.wait().unwrap().success());
}

#[test]
fn cp_files_and_background_process_verbs() {
    let server = shared_server();
    let name = format!("cli-cp-{}", &common::rand_suffix()[..8]);
    ok(server, &["create", "--name", &name]);
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("payload.bin");
    let payload: Vec<u8> = (0..(3 << 20))
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&source, &payload).unwrap();
    ok(server, &["cp", source.to_str().unwrap(), &format!("{name}:/data/in/")]);
    let listing = ok(server, &["files", "ls", &name, "/data/in"]);
    assert!(
        listing.contains("/data/in/payload.bin") && listing.contains(&payload.len().to_string()),
        "{listing}"
    );
    let back = dir.path().join("back");
    std::fs::create_dir(&back).unwrap();
    ok(
        server,
        &["cp", &format!("{name}:/data/in/payload.bin"), back.to_str().unwrap()],
    );
    assert!(
        std::fs::read(back.join("payload.bin")).unwrap() == payload,
        "the copy back differs"
    );
    let cat = nook(server, &["files", "cat", &name, "/data/in/payload.bin"]);
    assert!(cat.status.success() && cat.stdout == payload);

    let pid = ok(
        server,
        &[
            "exec",
            "-d",
            &name,
            "--",
            "sh",
            "-c",
            "echo hi; sleep 0.3; echo bye >&2; exit 4",
        ],
    );
    let pid = pid.trim();
    let logs = nook(server, &["logs", "-f", &name, pid]);
    assert_eq!((logs.status.code(), stdout(&logs).as_str()), (Some(4), "hi\n"));
    assert_eq!(String::from_utf8_lossy(&logs.stderr), "bye\n");
    let ps = ok(server, &["ps", &name]);
    assert!(ps.contains(pid) && ps.contains("exited 4"), "{ps}");
    ok(server, &["rm", &name]);
}

#[test]
fn cp_copies_directory_trees_both_ways() {
    use std::os::unix::fs::PermissionsExt;
    let server = shared_server();
    let name = format!("cli-cptree-{}", &common::rand_suffix()[..8]);
    ok(server, &["create", "--name", &name]);
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("src");
    std::fs::create_dir_all(source.join("sub/empty")).unwrap();
    std::fs::write(source.join("a.txt"), "alpha\n").unwrap();
    let big: Vec<u8> = (0..(2 << 20))
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(source.join("sub/big.bin"), &big).unwrap();
    std::os::unix::fs::symlink("../a.txt", source.join("sub/link")).unwrap();
    std::fs::write(source.join("run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(source.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let src = source.to_str().unwrap();

    // To a path that does not exist: it becomes that path; to an existing directory: the tree lands inside.
    ok(server, &["cp", src, &format!("{name}:/work")]);
    ok(server, &["cp", src, &format!("{name}:/work")]);
    let inside = ok(
        server,
        &[
            "exec",
            &name,
            "--",
            "sh",
            "-c",
            "cat /work/a.txt; readlink /work/sub/link; /work/run.sh; test -d /work/sub/empty && echo empty-dir; \
             cmp /work/sub/big.bin /work/src/sub/big.bin && echo same; cat /work/src/sub/link",
        ],
    );
    assert_eq!(inside, "alpha\n../a.txt\nran\nempty-dir\nsame\nalpha\n");

    // Back out, with the same two rules; setuid bits from the sandbox are dropped on the host.
    ok(
        server,
        &[
            "exec",
            &name,
            "--",
            "sh",
            "-c",
            "cp /bin/true /work/suid && chmod 4755 /work/suid",
        ],
    );
    let back = dir.path().join("back");
    ok(server, &["cp", &format!("{name}:/work"), back.to_str().unwrap()]);
    assert_eq!(std::fs::read(back.join("sub/big.bin")).unwrap(), big);
    assert_eq!(
        std::fs::read_link(back.join("sub/link")).unwrap().to_str(),
        Some("../a.txt")
    );
    assert_eq!(std::fs::read_to_string(back.join("src/a.txt")).unwrap(), "alpha\n");
    let suid = std::fs::metadata(back.join("suid")).unwrap().permissions().mode();
    assert_eq!(suid & 0o7000, 0, "setuid kept on the host: {suid:o}");
    assert_eq!(
        std::fs::metadata(back.join("run.sh")).unwrap().permissions().mode() & 0o111,
        0o111
    );
    let existing = dir.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    ok(
        server,
        &["cp", &format!("{name}:/work/sub"), existing.to_str().unwrap()],
    );
    assert_eq!(std::fs::read(existing.join("sub/big.bin")).unwrap(), big);
    // No staging directories are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".nook-cp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let missing = nook(server, &["cp", &format!("{name}:/no/such/dir"), back.to_str().unwrap()]);
    assert_eq!(missing.status.code(), Some(125));
    ok(server, &["rm", &name]);
}

#[test]
fn image_build_packs_the_context_without_what_dockerignore_excludes_and_exits_by_result() {
    let server = shared_server();
    let context = tempfile::tempdir().unwrap();
    let root = context.path();
    std::fs::create_dir_all(root.join("docker")).unwrap();
    std::fs::create_dir_all(root.join("target/debug")).unwrap();
    std::fs::create_dir_all(root.join("app")).unwrap();
    // A large file the upload must leave out: .dockerignore excludes it (the server never sees it).
    std::fs::write(root.join("target/debug/big.bin"), vec![7u8; 8 << 20]).unwrap();
    std::fs::write(root.join("app/run.sh"), "echo running\n").unwrap();
    std::os::unix::fs::symlink("run.sh", root.join("app/start")).unwrap();
    std::fs::write(root.join(".dockerignore"), "target\ndocker\n").unwrap();
    std::fs::write(
        root.join("docker/app.Dockerfile"),
        "FROM base\nCOPY app /opt/app\nRUN test -L /opt/app/start && sh /opt/app/start > /opt/app/out.txt\n",
    )
    .unwrap();
    let name = format!("cli-built-{}", &common::rand_suffix()[..8]);
    let dir = root.to_str().unwrap();
    let dockerfile = root.join("docker/app.Dockerfile");
    let built = nook(
        server,
        &["image", "build", "-t", &name, "-f", dockerfile.to_str().unwrap(), dir],
    );
    let log = String::from_utf8_lossy(&built.stderr).into_owned();
    assert!(built.status.success(), "{log}");
    assert!(stdout(&built).starts_with("sha256:"), "{}", stdout(&built));
    // The Dockerfile travels although .dockerignore names its directory; the 8 MiB under target does not.
    let sent: &str = log
        .lines()
        .find(|line| line.starts_with("sent the build context"))
        .unwrap();
    assert!(sent.contains("KiB"), "{sent}");
    assert!(log.contains("step 3/3: RUN"), "{log}");

    let sandbox = format!("{name}-box");
    ok(server, &["create", "--name", &sandbox, "--image", &name]);
    assert_eq!(
        ok(server, &["exec", &sandbox, "--", "cat", "/opt/app/out.txt"]),
        "running\n"
    );
    ok(server, &["rm", &sandbox]);

    // A failing build exits 1 and says why; a Dockerfile outside the context is refused before anything is sent.
    std::fs::write(root.join("Dockerfile"), "FROM base\nRUN exit 7\n").unwrap();
    let failed = nook(server, &["image", "build", "-t", &name, dir]);
    assert_eq!(failed.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&failed.stderr).contains("exit code 7"));
    let outside = tempfile::NamedTempFile::new().unwrap();
    let refused = nook(
        server,
        &[
            "image",
            "build",
            "-t",
            &name,
            "-f",
            outside.path().to_str().unwrap(),
            dir,
        ],
    );
    assert_eq!(refused.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not inside the build context"));
}

#[test]
fn stateful_verbs_fork_snapshot_resize_lifecycle_events_and_top() {
    let server = shared_server();
    let name = format!("cli-state-{}", &common::rand_suffix()[..8]);
    ok(
        server,
        &["create", "--name", &name, "--memory", "256", "--memory-max", "512"],
    );
    ok(server, &["exec", &name, "--", "sh", "-c", "echo kept > /kept"]);

    // fork prints the forks' ids, one per line.
    let fork_name = format!("{name}-f");
    let forked = ok(server, &["fork", &name, "--name", &fork_name]);
    assert_eq!(forked.lines().count(), 1, "{forked}");
    assert_eq!(ok(server, &["exec", &fork_name, "--", "cat", "/kept"]), "kept\n");
    let fork: Sandbox = serde_json::from_str(&ok(server, &["inspect", &fork_name, "--json"])).unwrap();
    let source: Sandbox = serde_json::from_str(&ok(server, &["inspect", &name, "--json"])).unwrap();
    assert_eq!(fork.parent.as_deref(), Some(source.id.as_str()));

    // snapshot prints the image name; the image makes sandboxes with the files.
    let image_name = format!("{name}-img");
    assert_eq!(ok(server, &["snapshot", &name, &image_name]).trim(), image_name);
    let image: Image = serde_json::from_str(&ok(server, &["image", "inspect", &image_name])).unwrap();
    assert_eq!(image.name, image_name);

    // resize says what changed; nothing to change is a usage error.
    let resized = nook(server, &["resize", &name, "--cpu", "0.5", "--memory", "384"]);
    assert!(resized.status.success());
    let said = String::from_utf8_lossy(&resized.stderr);
    assert!(said.contains("memory 256 → 384 MiB") && said.contains("cpu"), "{said}");
    assert!(!nook(server, &["resize", &name]).status.success());
    let describe = ok(server, &["inspect", &name]);
    assert!(describe.contains("384 MiB (grows up to 512 MiB)"), "{describe}");

    // lifecycle, then events with the reasons.
    ok(server, &["lifecycle", &name, "--idle-stop", "3600"]);
    assert!(ok(server, &["inspect", &name]).contains("stops after 3600 s idle"));
    let events = ok(server, &["events", &name]);
    assert!(
        events.contains("forked") && events.contains("snapshotted") && events.contains("resized"),
        "{events}"
    );

    // top --once --json lists the running sandboxes with their figures.
    let rows: Vec<serde_json::Value> = serde_json::from_str(&ok(server, &["top", "--once", "--json"])).unwrap();
    let row = rows
        .iter()
        .find(|row| row["name"] == name.as_str())
        .expect("the sandbox in top");
    assert_eq!(row["memory_limit_bytes"], 384u64 << 20);
    assert!(row["cpu_percent"].as_f64().is_some());
    let table = ok(server, &["top", "--once"]);
    assert!(table.lines().next().unwrap().starts_with("NAME"), "{table}");

    ok(server, &["rm", &name, &fork_name]);
    ok(server, &["image", "rm", &image_name]);
}

#[test]
fn preview_verbs_show_urls_make_and_revoke_links_and_set_access() {
    let server = shared_server();
    let name = format!("cli-preview-{}", &common::rand_suffix()[..8]);
    ok(server, &["create", "--name", &name, "--public-port", "3000"]);

    // url: a table with the path URL, then the token.
    let url = ok(server, &["preview", "url", &name, "8080"]);
    assert!(url.lines().next().unwrap().starts_with("PORT"), "{url}");
    assert!(url.contains("/preview/sb-") && url.contains("token: "), "{url}");
    let access: nook_api::PortAccess =
        serde_json::from_str(&ok(server, &["preview", "url", &name, "3000", "--json"])).unwrap();
    assert!(access.public);

    // link prints the URL; links lists it; revoke marks it.
    let link_url = ok(server, &["preview", "link", &name, "8080", "--expires", "10m"]);
    assert!(link_url.contains("nook_link=lnk-"), "{link_url}");
    let links: nook_api::PreviewLinkList =
        serde_json::from_str(&ok(server, &["preview", "links", &name, "--json"])).unwrap();
    assert_eq!(links.links.len(), 1);
    let lifetime = links.links[0].expires_at - links.links[0].created_at;
    assert!((599..=601).contains(&lifetime.num_seconds()), "{lifetime}");
    ok(server, &["preview", "revoke", &name, &links.links[0].id]);
    let table = ok(server, &["preview", "links", &name]);
    assert!(table.contains("revoked"), "{table}");
    assert!(!nook(server, &["preview", "link", &name, "8080", "--expires", "2d"])
        .status
        .success());

    // set: ports made public and private, wake on request, rotation; each change is an event.
    ok(
        server,
        &[
            "preview",
            "set",
            &name,
            "--public",
            "8080",
            "--private",
            "3000",
            "--wake-on-request",
            "true",
            "--rotate",
        ],
    );
    let sandbox: Sandbox = serde_json::from_str(&ok(server, &["inspect", &name, "--json"])).unwrap();
    assert_eq!(sandbox.preview.public_ports, vec![8080]);
    assert!(sandbox.preview.wake_on_request);
    assert_eq!(sandbox.preview.token_generation, 1);
    assert!(ok(server, &["events", &name]).contains("preview_changed"));

    // audit: the calls above, as a table and as JSON lines.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let table = loop {
        let table = ok(server, &["audit", "--sandbox", &name, "--kind", "api"]);
        if table.contains("PUT /v1/sandboxes/{sandbox}/preview") || std::time::Instant::now() > deadline {
            break table;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(
        table.starts_with("TIME") && table.contains("PUT /v1/sandboxes/{sandbox}/preview"),
        "{table}"
    );
    let lines = ok(server, &["audit", "--sandbox", &name, "--jsonl"]);
    let exported: Vec<nook_api::audit::AuditEvent> =
        lines.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert!(exported
        .iter()
        .any(|event| event.action == "POST /v1/sandboxes/{sandbox}/ports/{port}/links" && event.outcome == "201"));
    ok(server, &["rm", &name]);
}

#[test]
fn tenant_key_and_token_verbs() {
    let server = shared_server();
    let tenant = format!("cli-{}", &common::rand_suffix()[..8]);
    ok(server, &["tenant", "create", &tenant, "--max-sandboxes", "3"]);
    let table = ok(server, &["tenant", "ls"]);
    assert!(table.contains(&tenant) && table.contains("3 sandboxes"), "{table}");
    ok(server, &["tenant", "quota", &tenant, "--max-memory", "512"]);
    assert!(ok(server, &["tenant", "ls"]).contains("512 MiB"));

    // key create prints the key once; ls lists it (never the key); revoke marks it.
    let key = ok(
        server,
        &[
            "key",
            "create",
            "ci-reader",
            "--scope",
            "read",
            "--tenant",
            &tenant,
            "--expires",
            "1d",
        ],
    );
    assert!(key.trim().starts_with("nook_"), "{key}");
    let keys: nook_api::tenancy::KeyList = serde_json::from_str(&ok(server, &["key", "ls", "--json"])).unwrap();
    let made = keys
        .keys
        .iter()
        .find(|listed| listed.tenant == tenant)
        .expect("the new key");
    assert_eq!(made.scope, nook_api::tenancy::Scope::Read);
    assert!(!ok(server, &["key", "ls"]).contains(key.trim()));
    ok(server, &["key", "revoke", &made.id]);
    assert!(ok(server, &["key", "ls"]).contains("revoked"));

    // token: a capability token used as the CLI's key inspects but cannot exec.
    let name = format!("cli-token-{}", &common::rand_suffix()[..8]);
    ok(server, &["create", "--name", &name]);
    let token = ok(server, &["token", &name, "--verb", "read", "--expires", "10m"]);
    let token = token.trim();
    assert!(token.starts_with("nkc_"), "{token}");
    let as_token = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_nook"))
            .args(args)
            .env("NOOK_URL", &server.url)
            .env("NOOK_API_KEY", token)
            .output()
            .expect("running nook")
    };
    assert!(as_token(&["inspect", &name]).status.success());
    let refused = as_token(&["exec", &name, "--", "true"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("does not grant exec"));
    ok(server, &["rm", &name]);
}
