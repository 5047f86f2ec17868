//! Registry pulls end to end, against Debian's `docker-registry` on loopback with htpasswd authentication: a
//! two-layer image with a whiteout and an opaque directory is pushed, then pulled by tag and by digest with the
//! credentials from the server's config; a sandbox from it sees exactly the expected files and config. Concurrent
//! pulls of one image download each layer once; a tampered blob, a missing image and a registry without credentials
//! are refused with their reason, and a refused pull names nothing and leaves nothing in the store. A pulled image
//! pushed back to the registry by nook and pulled again runs the same.

mod common;

use common::fixture_image::{busybox_layer, digest, layer, layered_image, FixtureImage, Member, LAYERED_CHECK};
use common::registry::{TestRegistry, PASSWORD, USER};
use common::{sh, TestServer};
use nook_api::{CreateSandboxRequest, PullRequest, PushRequest, ResourceRequest, TransferEvent};
use nook_client::{Client, ClientError};

async fn pull(
    client: &Client,
    reference: &str,
    name: Option<&str>,
) -> Result<(nook_api::Image, Vec<TransferEvent>), ClientError> {
    let mut events = Vec::new();
    let request = PullRequest {
        reference: reference.into(),
        name: name.map(str::to_string),
    };
    let image = client.pull_image(&request, |event| events.push(event.clone())).await?;
    Ok((image, events))
}

/// A sandbox of `image` (the layered fixture, however it got here) sees the merged layers and runs with the image's
/// config; it is deleted afterwards.
async fn sees_the_layered_files(client: &Client, image: &str) {
    let sandbox = client
        .create_sandbox(&CreateSandboxRequest {
            image: Some(image.into()),
            resources: Some(ResourceRequest {
                cpu: Some(1.0),
                memory_mb: Some(128),
                memory_max_mb: None,
                pids: Some(64),
                disk_mb: None,
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|error| panic!("create a sandbox from {image}: {error}"));
    let (check, expected) = LAYERED_CHECK;
    let seen = sh(client, &sandbox.id, check).await;
    assert_eq!(
        (seen.exit_code, seen.stdout.as_str()),
        (Some(0), expected),
        "{image}: {seen:?}"
    );
    client.delete_sandbox(&sandbox.id).await.unwrap();
}

fn api_error(error: &ClientError) -> (u16, String, String) {
    match error {
        ClientError::Api { status, error } => (
            status.as_u16(),
            error.code.clone(),
            format!("{} {}", error.message, error.reason.clone().unwrap_or_default()),
        ),
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn images_are_pulled_by_tag_and_digest_with_auth_verified_and_deduplicated() {
    let registry = TestRegistry::start("pulls");
    let config = format!(
        "[[registry_credentials]]\nhost = \"{}\"\nusername = \"{USER}\"\npassword = \"{PASSWORD}\"\n",
        registry.host
    );
    let server = TestServer::start_with_config("pulls", &config);
    let client = server.client();

    let image = layered_image();
    let manifest_digest = registry.push("fixture/layered", "1", &image).await;
    let diff_ids: Vec<String> = image.layers.iter().map(|layer| digest(layer)).collect();
    let blobs = image.blobs();

    // By tag: both layers are downloaded, with progress events, and verified.
    let reference = format!("{}/fixture/layered:1", registry.host);
    let (pulled, events) = pull(&client, &reference, None).await.expect("pull by tag");
    assert_eq!(pulled.name, reference);
    assert_eq!(pulled.digest, manifest_digest);
    assert_eq!(pulled.layers, diff_ids);
    assert_eq!(pulled.config.working_dir.as_deref(), Some("/srv"));
    match &events[0] {
        TransferEvent::Resolved { digest, layers, .. } => {
            assert_eq!(digest, &manifest_digest);
            assert_eq!(layers.len(), 2);
            assert!(layers.iter().all(|layer| !layer.present));
        }
        other => panic!("the first event should be `resolved`, got {other:?}"),
    }
    let done = events
        .iter()
        .filter(|event| matches!(event, TransferEvent::LayerDone { .. }))
        .count();
    assert_eq!(done, 2, "{events:?}");
    assert!(matches!(events.last(), Some(TransferEvent::Done { .. })));

    // By digest, under another name: nothing is downloaded again.
    let by_digest = format!("{}/fixture/layered@{manifest_digest}", registry.host);
    let (again, events) = pull(&client, &by_digest, Some("layered-by-digest"))
        .await
        .expect("pull by digest");
    assert_eq!(
        (again.digest.as_str(), again.layers.as_slice()),
        (manifest_digest.as_str(), diff_ids.as_slice())
    );
    let TransferEvent::Resolved { layers, .. } = &events[0] else {
        panic!("{events:?}")
    };
    assert!(layers.iter().all(|layer| layer.present), "{layers:?}");
    for blob in &blobs.layers {
        assert_eq!(
            registry.blob_fetches(&digest(blob)),
            1,
            "layer {} fetched more than once",
            digest(blob)
        );
    }

    // A sandbox from the pulled image sees the merged layers and runs with the image's config.
    sees_the_layered_files(&client, "layered-by-digest").await;

    // Push it back under another repository (layers written out again, whiteouts and opaque directory included),
    // pull that, and a sandbox from the round trip sees the same files. A second push finds every layer present.
    let pushed = format!("{}/pushed/layered:1", registry.host);
    let push = PushRequest {
        name: "layered-by-digest".into(),
        reference: pushed.clone(),
    };
    client.push_image(&push, |_| {}).await.expect("push");
    let (round_trip, _) = pull(&client, &pushed, Some("round-trip"))
        .await
        .expect("pull what was pushed");
    assert_eq!(round_trip.config, pulled.config);
    assert_eq!(round_trip.layers.len(), 2);
    sees_the_layered_files(&client, "round-trip").await;
    let mut second_push = Vec::new();
    client
        .push_image(&push, |event| second_push.push(event.clone()))
        .await
        .expect("second push");
    let resolved = second_push.iter().find_map(|event| match event {
        TransferEvent::Resolved { layers, .. } => Some(layers.clone()),
        _ => None,
    });
    assert!(resolved.unwrap().iter().all(|layer| layer.present), "{second_push:?}");

    // Two concurrent pulls of a new image download its new layer once.
    let second = FixtureImage {
        layers: vec![busybox_layer(), layer(&[Member::File("opt/tool", b"v2\n", 0o755)])],
        run_config: serde_json::json!({"Env": ["PATH=/bin"]}),
    };
    registry.push("fixture/second", "2", &second).await;
    let new_blob = digest(&second.blobs().layers[1]);
    let reference = format!("{}/fixture/second:2", registry.host);
    let (one, two) = tokio::join!(
        pull(&client, &reference, Some("second-a")),
        pull(&client, &reference, Some("second-b"))
    );
    assert_eq!(one.unwrap().0.layers, two.unwrap().0.layers);
    assert_eq!(
        registry.blob_fetches(&new_blob),
        1,
        "the shared layer was downloaded twice"
    );

    // Refusals: a missing image (404), a registry host the server has no credentials for (403), and a blob
    // tampered with in the registry's storage (the digest check fails; nothing is named, nothing is left).
    let missing = pull(&client, &format!("{}/fixture/missing:1", registry.host), None)
        .await
        .unwrap_err();
    let (status, code, _) = api_error(&missing);
    assert_eq!((status, code.as_str()), (404, "not_found"), "{missing}");
    let port = registry.host.rsplit_once(':').unwrap().1;
    let no_credentials = pull(&client, &format!("localhost:{port}/fixture/layered:1"), None)
        .await
        .unwrap_err();
    let (status, code, text) = api_error(&no_credentials);
    assert_eq!((status, code.as_str()), (403, "registry_denied"), "{no_credentials}");
    assert!(text.contains("has none for it"), "{text}");

    let tampered = FixtureImage {
        layers: vec![layer(&[Member::File("etc/tampered", b"original", 0o644)])],
        run_config: serde_json::json!({}),
    };
    // An uncompressed layer, so that the tampered blob is still a valid tar and only its digest gives it away.
    let tampered_blobs = tampered.blobs_compressed(false);
    registry.push_blobs("fixture/tampered", "1", &tampered_blobs).await;
    let blob = &tampered_blobs.layers[0];
    let mut evil = blob.clone();
    // The first member's data starts after its 512-byte header: "original" becomes "Original".
    assert_eq!(&evil[512..520], b"original");
    evil[512] = b'O';
    std::fs::write(registry.blob_path(&digest(blob)), &evil).unwrap();
    let refused = pull(
        &client,
        &format!("{}/fixture/tampered:1", registry.host),
        Some("tampered"),
    )
    .await
    .unwrap_err();
    let (status, code, text) = api_error(&refused);
    assert_eq!(status, 502, "{refused}");
    assert_eq!(code, "bad_image", "{refused}");
    assert!(
        text.contains("layer blob from") && text.contains("does not match its digest"),
        "{text}"
    );
    assert!(client.image("tampered").await.is_err());
    let scratch = std::fs::read_dir(server.data_dir.join("runner/layers/tmp"))
        .unwrap()
        .count();
    assert_eq!(scratch, 0, "a refused pull left scratch layers");
}

#[tokio::test]
async fn registries_with_a_private_ca_are_spoken_to_over_https() {
    let registry = TestRegistry::start_tls("pulls-tls");
    let config = format!(
        "registry_ca_certificates = [\"{}\"]\n[[registry_credentials]]\nhost = \"{}\"\nusername = \"{USER}\"\n\
         password = \"{PASSWORD}\"\n",
        registry.ca_path().display(),
        registry.host
    );
    let server = TestServer::start_with_config("pulls-tls", &config);
    let client = server.client();
    let (archive, _) = layered_image().oci_archive();
    client
        .import_image("fixture/tls:1", reqwest::Body::from(archive))
        .await
        .expect("import the fixture");
    let reference = format!("{}/fixture/tls:1", registry.host);
    let push = PushRequest {
        name: "fixture/tls:1".into(),
        reference: reference.clone(),
    };
    client.push_image(&push, |_| {}).await.expect("push over HTTPS");
    let (pulled, _) = pull(&client, &reference, Some("tls-pulled"))
        .await
        .expect("pull over HTTPS");
    assert_eq!(pulled.layers.len(), 2);
    // The registry speaks only HTTPS (a plain request gets a 400), so the push and the pull went over TLS, trusting
    // the private CA from the config; the pulled image runs.
    sees_the_layered_files(&client, "tls-pulled").await;
}
