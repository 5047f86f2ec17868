//! Forks and snapshots. A fork copies a sandbox's files as they are now into new sandboxes, copy-on-write: with 200 MB
//! written, the forks see the same bytes, diverge independently afterwards, and the disk grows only by what each one
//! writes. A snapshot makes an image of a sandbox's files that later sandboxes start from, sharing its layer.
//!
//! The tests' servers keep their data on btrfs (`scripts/test.sh` puts TMPDIR there), the storage forks are made for.

mod common;

use std::time::{Duration, Instant};

use common::{create, eventually, sh, shared_server};
use nook_api::{ForkRequest, SandboxState, StateReason};

/// What a sandbox's volume holds on its own (its exclusive extents) and shares with other volumes, in bytes, as
/// `btrfs filesystem du` counts them from the extents themselves (other tests writing beside this one do not count).
fn exclusive_and_shared(server: &common::TestServer, id: &str) -> (u64, u64) {
    nix::unistd::sync();
    let output = std::process::Command::new("btrfs")
        .args(["filesystem", "du", "-s", "--raw"])
        .arg(server.sandbox_dir(id).join("fs"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let fields: Vec<u64> = text
        .lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .filter_map(|field| field.parse().ok())
        .collect();
    assert_eq!(
        fields.len(),
        3,
        "btrfs filesystem du said: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (fields[1], fields[2])
}

const MB: u64 = 1_000_000;

#[tokio::test]
async fn a_fork_of_200_mb_diverges_and_shares_its_disk() {
    let server = shared_server();
    let client = server.client();
    let source = create(&client, "fork-src").await;
    // 200 MB of random data in four files, and a checksum of it.
    let written = sh(
        &client,
        &source.id,
        "mkdir -p /data && for i in 1 2 3 4; do head -c 50000000 /dev/urandom > /data/part$i; done && \
         cat /data/part* | sha256sum | cut -d' ' -f1",
    )
    .await;
    assert_eq!(written.exit_code, Some(0), "{written:?}");
    let checksum = written.stdout.trim().to_string();

    let started = Instant::now();
    let result = client
        .fork_sandbox(
            &source.id,
            &ForkRequest {
                count: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let took = started.elapsed();
    eprintln!(
        "fork of 200 MB into 2: {took:?} (source frozen {} µs)",
        result.frozen_us
    );
    assert_eq!(result.sandboxes.len(), 2);
    // Every copy shares the 200 MB; none holds more than a little metadata of its own.
    for sandbox in [&source.id, &result.sandboxes[0].id, &result.sandboxes[1].id] {
        let (exclusive, shared) = exclusive_and_shared(server, sandbox);
        eprintln!("{sandbox}: {exclusive} bytes of its own, {shared} shared");
        assert!(
            exclusive < 2 * MB && shared >= 200 * MB,
            "{sandbox} holds {exclusive} bytes of its own and shares {shared}: the files were copied, not shared"
        );
    }
    assert!(
        result.frozen_us < 2_000_000,
        "the source was frozen {} µs",
        result.frozen_us
    );

    for fork in &result.sandboxes {
        assert_eq!(fork.state, SandboxState::Running);
        assert_eq!(fork.parent.as_deref(), Some(source.id.as_str()));
        assert_eq!(fork.state_reason, StateReason::Forked);
        assert_eq!(fork.resources, source.resources);
        let seen = sh(
            &client,
            &fork.id,
            "cat /data/part* | sha256sum | cut -d' ' -f1; hostname",
        )
        .await;
        let mut lines = seen.stdout.lines();
        assert_eq!(lines.next(), Some(checksum.as_str()), "a fork sees other bytes");
        assert_eq!(
            lines.next(),
            Some(fork.name.as_str()),
            "a fork keeps the source's hostname"
        );
    }

    // The source goes on and every copy diverges on its own: each writes 10 MB of its own.
    let (first, second) = (&result.sandboxes[0], &result.sandboxes[1]);
    for (sandbox, text) in [(&source.id, "source"), (&first.id, "first"), (&second.id, "second")] {
        let wrote = sh(
            &client,
            sandbox,
            &format!("echo {text} > /data/who && head -c 10000000 /dev/urandom > /data/own"),
        )
        .await;
        assert_eq!(wrote.exit_code, Some(0), "{wrote:?}");
    }
    for sandbox in [&source.id, &first.id, &second.id] {
        let (exclusive, shared) = exclusive_and_shared(server, sandbox);
        assert!(
            (10 * MB..12 * MB).contains(&exclusive) && shared >= 200 * MB,
            "{sandbox} wrote 10 MB and holds {exclusive} bytes of its own, sharing {shared}"
        );
    }
    for (sandbox, text) in [(&source.id, "source"), (&first.id, "first"), (&second.id, "second")] {
        let seen = sh(&client, sandbox, "cat /data/who; ls /data | tr '\\n' ' '").await;
        assert_eq!(
            seen.stdout,
            format!("{text}\nown part1 part2 part3 part4 who "),
            "in {sandbox}"
        );
    }

    // The fork tree is on record: the forks name their parent, the source's history names its forks.
    let events = client.sandbox_events(&source.id).await.unwrap();
    let forked = events
        .iter()
        .find(|event| event.reason == StateReason::Forked)
        .expect("the source records its forks");
    assert!(forked.message.contains(&first.name) && forked.message.contains(&second.name));
    assert_eq!(client.sandbox(&source.id).await.unwrap().state, SandboxState::Running);

    // A file one copy deletes stays in the others.
    sh(&client, &second.id, "rm /data/part1").await;
    assert_eq!(
        sh(&client, &first.id, "wc -c < /data/part1").await.stdout.trim(),
        "50000000"
    );

    // Forks are independent: deleting the source leaves them running with their files.
    client.delete_sandbox(&source.id).await.unwrap();
    let seen = sh(&client, &first.id, "cat /data/who /data/part2 | wc -c").await;
    assert_eq!(seen.stdout.trim(), "50000006");
    for fork in &result.sandboxes {
        client.delete_sandbox(&fork.id).await.unwrap();
    }
}

#[tokio::test]
async fn forks_of_a_stopped_or_paused_sandbox_and_bad_requests() {
    let server = shared_server();
    let client = server.client();
    let source = create(&client, "fork-state").await;
    sh(&client, &source.id, "echo kept > /kept").await;

    let paused = client.pause_sandbox(&source.id).await.unwrap();
    assert_eq!(paused.state, SandboxState::Paused);
    let name = format!("fork-of-paused-{}", &common::rand_suffix()[..6]);
    let request = ForkRequest {
        names: vec![name.clone()],
        ..Default::default()
    };
    let forked = client.fork_sandbox(&source.id, &request).await.unwrap();
    assert_eq!(forked.sandboxes[0].name, name);
    assert_eq!(forked.frozen_us, 0, "a paused source is still already");
    assert_eq!(sh(&client, &name, "cat /kept").await.stdout, "kept\n");
    // The source stays paused.
    assert_eq!(client.sandbox(&source.id).await.unwrap().state, SandboxState::Paused);
    client.resume_sandbox(&source.id).await.unwrap();

    client.stop_sandbox(&source.id).await.unwrap();
    let from_stopped = client.fork_sandbox(&source.id, &ForkRequest::default()).await.unwrap();
    let fork = &from_stopped.sandboxes[0];
    assert_eq!(sh(&client, &fork.id, "cat /kept").await.stdout, "kept\n");

    // A taken name makes no fork at all; counts and names are checked before anything is made.
    let taken = client.fork_sandbox(&source.id, &request).await.unwrap_err();
    assert_eq!(taken.code(), Some("conflict"), "{taken}");
    let too_many = ForkRequest {
        count: Some(65),
        ..Default::default()
    };
    let error = client.fork_sandbox(&source.id, &too_many).await.unwrap_err();
    assert_eq!(error.code(), Some("invalid_request"), "{error}");
    let mismatched = ForkRequest {
        count: Some(2),
        names: vec!["only-one".into()],
        ..Default::default()
    };
    let error = client.fork_sandbox(&source.id, &mismatched).await.unwrap_err();
    assert_eq!(error.code(), Some("invalid_request"), "{error}");

    for sandbox in [&source.id, &name, &fork.id] {
        client.delete_sandbox(sandbox).await.unwrap();
    }
}

#[tokio::test]
async fn a_snapshot_is_an_image_that_new_sandboxes_share() {
    let server = shared_server();
    let client = server.client();
    let source = create(&client, "snap-src").await;
    sh(
        &client,
        &source.id,
        "mkdir -p /work && echo one > /work/state && rm /etc/motd",
    )
    .await;
    let image_name = format!("snap-{}", &common::rand_suffix()[..8]);
    let image = client.snapshot_sandbox(&source.id, &image_name).await.unwrap();
    assert_eq!(image.name, image_name);
    let base = client.image("base").await.unwrap();
    assert_eq!(image.layers.len(), base.layers.len() + 1, "{image:?}");
    assert_eq!(image.layers[..base.layers.len()], base.layers[..]);

    // The source goes on; what it changes later is not in the snapshot.
    sh(&client, &source.id, "echo two > /work/state").await;
    let events = client.sandbox_events(&source.id).await.unwrap();
    assert!(events
        .iter()
        .any(|event| event.reason == StateReason::Snapshotted && event.message.contains(&image_name)));

    let mut made = Vec::new();
    for _ in 0..2 {
        let request = nook_api::CreateSandboxRequest {
            image: Some(image_name.clone()),
            ..Default::default()
        };
        let sandbox = client.create_sandbox(&request).await.unwrap();
        let seen = sh(&client, &sandbox.id, "cat /work/state; test -e /etc/motd && echo motd").await;
        assert_eq!(seen.stdout, "one\n", "a deleted file came back, or the state is wrong");
        // Started from the shared layer: nothing of it is copied into the sandbox's own writable layer.
        let upper: Vec<_> = std::fs::read_dir(server.upper_dir(&sandbox.id)).unwrap().collect();
        assert!(upper.is_empty(), "the snapshot's files were copied: {upper:?}");
        made.push(sandbox.id);
    }
    assert_eq!(sh(&client, &source.id, "cat /work/state").await.stdout, "two\n");

    // The name can go while sandboxes use the image: a prune keeps the layers they are built on.
    client.remove_image(&image_name).await.unwrap();
    client.prune_images().await.unwrap();
    assert_eq!(sh(&client, &made[0], "cat /work/state").await.stdout, "one\n");
    for sandbox in made.iter().chain([&source.id]) {
        client.delete_sandbox(sandbox).await.unwrap();
    }
    eventually("the snapshot's name is gone", Duration::from_secs(5), || async {
        client.image(&image_name).await.is_err()
    })
    .await;
}

/// Unmounts a directory when dropped (also when the test fails), so no mount outlives the test.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn serve_keeps_its_storage_in_an_image_file_where_asked() {
    let image_dir = tempfile::tempdir().unwrap();
    let image = image_dir.path().join("storage.img");
    let config = format!(
        "storage_image = {:?}\nstorage_size_gb = 8\n",
        image.display().to_string()
    );
    let mut server = common::TestServer::start_with_config("storage-image", &config);
    let runner_dir = server.data_dir.join("runner");
    let unmount = Unmount(runner_dir.clone());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        mounts
            .lines()
            .any(|line| line.contains(&format!(" {} btrfs ", runner_dir.display()))),
        "the runner's directory is not the image's btrfs: {mounts}"
    );
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 8 << 30);
    let client = server.client();
    let sandbox = create(&client, "in-image").await;
    sh(&client, &sandbox.id, "echo inside > /file").await;
    let forked = client.fork_sandbox(&sandbox.id, &ForkRequest::default()).await.unwrap();
    assert_eq!(
        sh(&client, &forked.sandboxes[0].id, "cat /file").await.stdout,
        "inside\n"
    );
    for id in [&sandbox.id, &forked.sandboxes[0].id] {
        client.delete_sandbox(id).await.unwrap();
    }

    // A restart finds it mounted and uses it as it is.
    server.stop();
    let key = format!("nook_test_{}", common::rand_suffix());
    let mut server = common::TestServer::start_in(server.data_dir.clone(), key);
    assert!(server.client().image("base").await.is_ok());
    server.stop();
    drop(unmount);
}
