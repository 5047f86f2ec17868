//! Images end to end: an OCI image layout with two layers (a whiteout, an opaque directory) imported through the
//! API becomes sandboxes that see exactly the merged files and run with the image's env, working directory and user;
//! the image's layers are shared and never written (a hundred sandboxes use one copy, measured). Hostile and corrupt
//! archives are refused with their reason and leave nothing in the store. Garbage collection keeps what sandboxes
//! use and removes the rest.

mod common;

use common::fixture_image::{busybox_layer, digest, layer, layered_image, FixtureImage, Member, LAYERED_CHECK};
use common::{sh, TestServer};
use futures::StreamExt;
use nook_api::{CreateSandboxRequest, ResourceRequest, Sandbox};
use nook_client::{Client, ClientError};

async fn create_from(client: &Client, image: &str, name: &str) -> Sandbox {
    let request = CreateSandboxRequest {
        image: Some(image.into()),
        name: Some(name.into()),
        resources: Some(ResourceRequest {
            cpu: Some(1.0),
            memory_mb: Some(128),
            memory_max_mb: None,
            pids: Some(64),
            disk_mb: None,
        }),
        ..Default::default()
    };
    client
        .create_sandbox(&request)
        .await
        .expect("create a sandbox from the fixture image")
}

fn store_leftovers(server: &TestServer) -> Vec<String> {
    let tmp = server.data_dir.join("runner/layers/tmp");
    std::fs::read_dir(tmp)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn layered_images_import_run_with_their_config_and_refuse_hostile_archives() {
    let server = TestServer::start("images");
    let client = server.client();

    let image = layered_image();
    let (archive, manifest_digest) = image.oci_archive();
    let imported = client
        .import_image("fixture/layered:1", reqwest::Body::from(archive))
        .await
        .expect("import the OCI layout");
    assert_eq!(imported.digest, manifest_digest);
    let diff_ids: Vec<String> = image.layers.iter().map(|layer| digest(layer)).collect();
    assert_eq!(imported.layers, diff_ids);
    assert_eq!(imported.config.cmd, ["sh"]);
    assert_eq!(imported.config.exposed_ports, ["8080/tcp"]);
    assert_eq!(imported.config.labels["org.example.team"], "agents");

    let first = create_from(&client, "fixture/layered:1", "layered-one").await;
    let (check, expected) = LAYERED_CHECK;
    let seen = sh(&client, &first.id, check).await;
    assert_eq!(seen.exit_code, Some(0), "{seen:?}");
    assert_eq!(seen.stdout, expected);

    // Writes land in the sandbox's own layer (`app` owns /srv, so it may replace the file root left there): the
    // image's layers and a second sandbox see the original.
    let root = sh(
        &client,
        &first.id,
        "rm /srv/index.html && echo changed > /srv/index.html && cat /srv/index.html",
    )
    .await;
    assert_eq!(root.stdout, "changed\n", "{root:?}");
    let second = create_from(&client, "fixture/layered:1", "layered-two").await;
    assert_eq!(
        sh(&client, &second.id, "cat /srv/index.html").await.stdout,
        "<h1>hi</h1>\n"
    );
    let layer_dir = server.data_dir.join("runner/layers/sha256").join(&diff_ids[1][7..]);
    assert_eq!(
        std::fs::read(layer_dir.join("srv/index.html")).unwrap(),
        b"<h1>hi</h1>\n"
    );

    // Exported as an OCI layout and imported again under another name: the same files and config (whiteouts and
    // opaque directories written back out and read again), though its layers are blobs of nook's own making.
    let mut exported = Vec::new();
    let mut chunks = client.export_image("fixture/layered:1").await.expect("export");
    while let Some(chunk) = chunks.next().await {
        exported.extend_from_slice(&chunk.expect("an export chunk"));
    }
    assert!(tar::Archive::new(exported.as_slice())
        .entries()
        .unwrap()
        .any(|entry| entry.unwrap().path().unwrap().to_str() == Some("index.json")));
    let reimported = client
        .import_image("fixture/layered-again:1", reqwest::Body::from(exported))
        .await
        .expect("import what nook exported");
    assert_eq!(reimported.config, imported.config);
    assert_eq!(reimported.layers.len(), imported.layers.len());
    let again = create_from(&client, "fixture/layered-again:1", "layered-again").await;
    assert_eq!(sh(&client, &again.id, check).await.stdout, expected);
    client.delete_sandbox(&again.id).await.unwrap();
    let missing = client
        .export_image("fixture/none:1")
        .await
        .err()
        .expect("no such image");
    assert_eq!(missing.status(), Some(reqwest::StatusCode::NOT_FOUND));

    // Hostile archives: a layer escaping with `..`, and a symlink planted to write through. Each is refused with the
    // member and the reason, no image is named, and nothing is left in the store's scratch space or outside it.
    let outside = std::env::temp_dir().join(format!("nook-images-escape-{}", std::process::id()));
    let _ = std::fs::remove_file(&outside);
    let escape_path = format!("../../../../../../../..{}", outside.display());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("dotdot", layer(&[Member::RawFile(&escape_path, b"pwned")]), "'..'"),
        (
            "symlink",
            layer(&[
                Member::Symlink("planted", "/tmp"),
                Member::File("planted/pwned", b"pwned", 0o644),
            ]),
            "passes through the symlink",
        ),
    ];
    for (name, hostile, reason) in cases {
        let evil = FixtureImage {
            layers: vec![busybox_layer(), hostile],
            run_config: serde_json::json!({}),
        };
        let error = client
            .import_image(&format!("hostile/{name}"), reqwest::Body::from(evil.oci_archive().0))
            .await
            .expect_err("a hostile archive must be refused");
        let ClientError::Api { status, error: body } = &error else {
            panic!("expected an API error, got {error}");
        };
        assert_eq!(status.as_u16(), 400, "{error}");
        let explained = body.reason.clone().unwrap_or_default();
        assert!(explained.contains(reason), "{name}: {explained}");
        assert!(client.image(&format!("hostile/{name}")).await.is_err());
    }
    assert!(!outside.exists(), "a hostile layer wrote outside the store");
    assert!(!std::path::Path::new("/tmp/pwned").exists());
    assert_eq!(store_leftovers(&server), Vec::<String>::new());

    // A corrupt archive: one cut off in the middle of a layer blob.
    let (archive, _) = layered_image().oci_archive();
    let truncated = &archive[..archive.len() / 2];
    let error = client
        .import_image("hostile/truncated", reqwest::Body::from(truncated.to_vec()))
        .await
        .expect_err("a truncated archive must be refused");
    assert!(
        matches!(&error, ClientError::Api { status, .. } if status.as_u16() == 400),
        "{error}"
    );
    assert_eq!(store_leftovers(&server), Vec::<String>::new());

    // A hundred sandboxes from the image share its one copy of the layers: the store gains no layer, the layers'
    // disk use does not change, and each sandbox costs only its own (nearly empty) writable layer.
    let layers_before = du(&server.data_dir.join("runner/layers/sha256"));
    let layer_count = std::fs::read_dir(server.data_dir.join("runner/layers/sha256"))
        .unwrap()
        .count();
    let started = std::time::Instant::now();
    let many: Vec<Sandbox> = futures::stream::iter(0..100)
        .map(|i| {
            let client = &client;
            async move { create_from(client, "fixture/layered:1", &format!("many-{i}")).await }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    let created_in = started.elapsed();
    let uppers: u64 = many.iter().map(|sandbox| du(&server.upper_dir(&sandbox.id))).sum();
    let layers_after = du(&server.data_dir.join("runner/layers/sha256"));
    eprintln!(
        "100 sandboxes from one image: created in {created_in:?}; layers {layers_before} -> {layers_after} bytes; \
         writable layers {uppers} bytes in all"
    );
    assert_eq!(layers_after, layers_before, "sandboxes must not copy image layers");
    assert_eq!(
        std::fs::read_dir(server.data_dir.join("runner/layers/sha256"))
            .unwrap()
            .count(),
        layer_count
    );
    assert!(uppers < 100 * 64 * 1024, "the writable layers hold {uppers} bytes");
    let probe = sh(&client, &many[99].id, "cat /srv/index.html").await;
    assert_eq!(probe.stdout, "<h1>hi</h1>\n");
    futures::stream::iter(many)
        .for_each_concurrent(4, |sandbox| {
            let client = &client;
            async move { client.delete_sandbox(&sandbox.id).await.unwrap() }
        })
        .await;

    // Garbage collection: with the name gone, layers that sandboxes still use stay; once they are deleted too,
    // the image's layers go (the base image's do not).
    let tagged = client
        .tag_image("fixture/layered:1", "fixture/layered:stable")
        .await
        .unwrap();
    assert_eq!(tagged.digest, imported.digest);
    client.remove_image("fixture/layered:stable").await.unwrap();
    client.remove_image("fixture/layered:1").await.unwrap();
    let kept = client.prune_images().await.unwrap();
    assert_eq!((kept.images_removed, kept.layers_removed), (1, 0), "{kept:?}");
    assert_eq!(sh(&client, &first.id, "cat /etc/motd").await.stdout, "welcome\n");
    for sandbox in [first, second] {
        client.delete_sandbox(&sandbox.id).await.unwrap();
    }
    let pruned = client.prune_images().await.unwrap();
    assert_eq!((pruned.images_removed, pruned.layers_removed), (0, 2), "{pruned:?}");
    assert!(pruned.bytes_freed > 1_000_000, "{pruned:?}");
    assert!(!layer_dir.exists());
    assert!(client.image("base").await.is_ok());
}

/// Bytes allocated under `path`, as `du` counts them (hard links once).
fn du(path: &std::path::Path) -> u64 {
    let output = std::process::Command::new("du")
        .args(["-s", "--block-size=1"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .and_then(|bytes| bytes.parse().ok())
        .unwrap_or(0)
}
