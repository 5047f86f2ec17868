//! Tenants, scoped keys, quotas and capability tokens end to end: two tenants made by the operator cannot see or
//! touch each other's sandboxes by id or by name (native API and E2B), read-only and expired or revoked keys are
//! refused what they may not do, quotas refuse with a clear error, and a capability token does only its verbs on
//! its own sandbox.

mod common;

use common::TestServer;
use nook_api::tenancy::{CapabilityRequest, CreateKeyRequest, CreateTenantRequest, Scope, TenantQuota, Verb};
use nook_api::{CreateSandboxRequest, ExecRequest, ResourceRequest};
use nook_client::{Client, ClientError};
use reqwest::StatusCode;

/// The status and stable code of a refused call.
fn refusal<T: std::fmt::Debug>(result: Result<T, ClientError>) -> (StatusCode, String) {
    match result {
        Err(ClientError::Api { status, error }) => (status, error.code),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn tenant_key(operator: &Client, url: &str, tenant: &str, scope: Scope, quota: TenantQuota) -> Client {
    tenant_key_text(operator, url, tenant, scope, quota).await.0
}

/// A new key of `tenant` (made with the tenant if need be): its client and the key itself.
async fn tenant_key_text(
    operator: &Client,
    url: &str,
    tenant: &str,
    scope: Scope,
    quota: TenantQuota,
) -> (Client, String) {
    if operator
        .tenants()
        .await
        .unwrap()
        .tenants
        .iter()
        .all(|known| known.name != tenant)
    {
        operator
            .create_tenant(&CreateTenantRequest {
                name: tenant.into(),
                quota,
            })
            .await
            .unwrap();
    }
    let created = operator
        .create_key(&CreateKeyRequest {
            name: format!("{tenant}-{}", scope.as_str()),
            scope,
            tenant: Some(tenant.into()),
            expires_in_s: None,
        })
        .await
        .unwrap();
    assert_eq!(created.info.tenant, tenant);
    (Client::new(url, &created.key).unwrap(), created.key)
}

fn small(name: &str) -> CreateSandboxRequest {
    CreateSandboxRequest {
        name: Some(name.into()),
        resources: Some(ResourceRequest {
            cpu: Some(0.5),
            memory_mb: Some(128),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A file's bytes, downloaded.
async fn read(client: &Client, sandbox: &str, path: &str) -> Result<Vec<u8>, ClientError> {
    use futures::StreamExt as _;
    let mut chunks = client.download_file(sandbox, path).await?;
    let mut bytes = Vec::new();
    while let Some(chunk) = chunks.next().await {
        bytes.extend_from_slice(&chunk?);
    }
    Ok(bytes)
}

fn true_command() -> ExecRequest {
    ExecRequest {
        command: vec!["true".into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_apart_and_keys_and_tokens_do_only_what_they_grant() {
    let server = TestServer::start("tenants");
    let operator = server.client();
    let acme = tenant_key(&operator, &server.url, "acme", Scope::Write, TenantQuota::default()).await;
    let (globex, globex_key) =
        tenant_key_text(&operator, &server.url, "globex", Scope::Write, TenantQuota::default()).await;

    // The same name in two tenants: two sandboxes.
    let mine = acme.create_sandbox(&small("web")).await.unwrap();
    let theirs = globex.create_sandbox(&small("web")).await.unwrap();
    assert_ne!(mine.id, theirs.id);
    assert_eq!((mine.tenant.as_str(), theirs.tenant.as_str()), ("acme", "globex"));
    assert_eq!(acme.sandbox("web").await.unwrap().id, mine.id);

    // Globex cannot see or touch acme's sandbox, by id or by name: the same answer as for no sandbox at all.
    assert_eq!(globex.sandbox("web").await.unwrap().id, theirs.id);
    assert_eq!(
        refusal(globex.sandbox(&mine.id).await.map(|_| ())).0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        refusal(globex.exec(&mine.id, &true_command()).await).0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(refusal(globex.delete_sandbox(&mine.id).await).0, StatusCode::NOT_FOUND);
    assert_eq!(refusal(globex.stop_sandbox(&mine.id).await).0, StatusCode::NOT_FOUND);
    let listed = globex.list_sandboxes(None, &Default::default()).await.unwrap();
    assert_eq!(
        listed.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        vec![theirs.id.as_str()]
    );
    // Nor through E2B's API, with the same key.
    let http = reqwest::Client::new();
    let e2b = http
        .get(format!("{}/sandboxes/{}", server.url, mine.id))
        .header("x-api-key", &globex_key)
        .send()
        .await
        .unwrap();
    assert_eq!(e2b.status(), StatusCode::NOT_FOUND);
    // The operator's own tenant (default) does not see them either; tenants and keys are the operator's.
    assert!(operator
        .list_sandboxes(None, &Default::default())
        .await
        .unwrap()
        .iter()
        .all(|s| s.tenant == "default"));
    assert_eq!(refusal(acme.tenants().await).0, StatusCode::FORBIDDEN);

    // A read-only key looks but does not change, nor gets what would let it act (a terminal, a port's token, E2B's
    // access tokens).
    let (reader, reader_key) =
        tenant_key_text(&operator, &server.url, "acme", Scope::Read, TenantQuota::default()).await;
    assert_eq!(refusal(reader.port_access("web", 8080).await).0, StatusCode::FORBIDDEN);
    let seen: serde_json::Value = http
        .get(format!("{}/sandboxes/{}", server.url, mine.id))
        .header("x-api-key", &reader_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["sandboxID"], mine.id.as_str());
    assert!(
        seen.get("envdAccessToken").is_none() && seen.get("trafficAccessToken").is_none(),
        "{seen}"
    );
    let terminal = http
        .get(format!("{}/v1/sandboxes/web/processes/1/terminal", server.url))
        .bearer_auth(&reader_key)
        .send()
        .await
        .unwrap();
    assert_eq!(terminal.status(), StatusCode::FORBIDDEN);
    // Images: a tenant's own are invisible to the others; the catalogue (base) is everyone's and the default
    // tenant's to change.
    let snapshot = acme.snapshot_sandbox("web", "acme-snapshot").await.unwrap();
    assert_eq!(acme.image("acme-snapshot").await.unwrap().digest, snapshot.digest);
    assert!(acme
        .list_images()
        .await
        .unwrap()
        .iter()
        .any(|image| image.name == "acme-snapshot"));
    assert_eq!(refusal(globex.image("acme-snapshot").await).0, StatusCode::NOT_FOUND);
    assert!(globex
        .list_images()
        .await
        .unwrap()
        .iter()
        .all(|image| image.name != "acme-snapshot"));
    assert!(globex
        .list_images()
        .await
        .unwrap()
        .iter()
        .any(|image| image.name == "base"));
    let from_theirs = CreateSandboxRequest {
        image: Some("acme-snapshot".into()),
        ..small("copy")
    };
    assert_eq!(
        refusal(globex.create_sandbox(&from_theirs).await).0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        refusal(globex.remove_image("acme-snapshot").await).0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        refusal(globex.tag_image("acme-snapshot", "stolen").await).0,
        StatusCode::NOT_FOUND
    );
    let (status, code) = refusal(globex.snapshot_sandbox("web", "acme-snapshot").await);
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "name_taken"));
    assert_eq!(refusal(acme.remove_image("base").await).0, StatusCode::FORBIDDEN);
    assert_eq!(
        refusal(acme.tag_image("acme-snapshot", "base").await).0,
        StatusCode::CONFLICT
    );
    let copy = acme.create_sandbox(&from_theirs).await.unwrap();
    acme.delete_sandbox(&copy.id).await.unwrap();
    acme.tag_image("base", "acme-base").await.unwrap();
    assert_eq!(refusal(globex.image("acme-base").await).0, StatusCode::NOT_FOUND);
    acme.remove_image("acme-base").await.unwrap();
    acme.remove_image("acme-snapshot").await.unwrap();
    assert_eq!(reader.sandbox("web").await.unwrap().id, mine.id);
    let (status, code) = refusal(reader.exec("web", &true_command()).await);
    assert_eq!((status, code.as_str()), (StatusCode::FORBIDDEN, "forbidden"));
    assert_eq!(
        refusal(reader.create_sandbox(&small("other")).await).0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(refusal(reader.keys().await).0, StatusCode::FORBIDDEN);

    // Revoked and expired keys are refused.
    let created = operator
        .create_key(&CreateKeyRequest {
            name: "short".into(),
            scope: Scope::Write,
            tenant: Some("acme".into()),
            expires_in_s: Some(1),
        })
        .await
        .unwrap();
    let short = Client::new(&server.url, &created.key).unwrap();
    assert!(short.sandbox("web").await.is_ok());
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(refusal(short.sandbox("web").await).0, StatusCode::UNAUTHORIZED);
    let created = operator
        .create_key(&CreateKeyRequest {
            name: "revoked".into(),
            scope: Scope::Admin,
            tenant: Some("acme".into()),
            expires_in_s: None,
        })
        .await
        .unwrap();
    let acme_admin = Client::new(&server.url, &created.key).unwrap();
    // An admin of acme lists acme's keys only, and cannot make keys for others.
    let keys = acme_admin.keys().await.unwrap().keys;
    assert!(!keys.is_empty() && keys.iter().all(|key| key.tenant == "acme"));
    let other_tenant = acme_admin
        .create_key(&CreateKeyRequest {
            name: "sneaky".into(),
            scope: Scope::Admin,
            tenant: Some("globex".into()),
            expires_in_s: None,
        })
        .await;
    assert_eq!(refusal(other_tenant).0, StatusCode::FORBIDDEN);
    operator.revoke_key(&created.info.id).await.unwrap();
    assert_eq!(refusal(acme_admin.keys().await).0, StatusCode::UNAUTHORIZED);

    // A capability token: files:read on acme's web only.
    acme.exec(
        "web",
        &ExecRequest {
            shell: Some("echo secret-plan > /tmp/plan.txt".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let token = acme
        .capability_token(
            "web",
            &CapabilityRequest {
                verbs: vec![Verb::FilesRead],
                expires_in_s: 600,
            },
        )
        .await
        .unwrap();
    assert_eq!(token.sandbox, mine.id);
    let agent = Client::new(&server.url, &token.token).unwrap();
    let bytes = read(&agent, &mine.id, "/tmp/plan.txt").await.unwrap();
    assert_eq!(&bytes[..], b"secret-plan\n");
    let by_name = read(&agent, "web", "/tmp/plan.txt").await.unwrap();
    assert_eq!(&by_name[..], b"secret-plan\n");
    let (status, code) = refusal(agent.exec(&mine.id, &true_command()).await);
    assert_eq!((status, code.as_str()), (StatusCode::FORBIDDEN, "forbidden"));
    assert_eq!(refusal(agent.delete_sandbox(&mine.id).await).0, StatusCode::FORBIDDEN);
    assert_eq!(
        refusal(agent.list_sandboxes(None, &Default::default()).await).0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        refusal(read(&agent, &theirs.id, "/etc/hostname").await).0,
        StatusCode::NOT_FOUND
    );
    // An altered token is no token.
    let forged = Client::new(&server.url, &format!("{}0", token.token)).unwrap();
    assert_eq!(
        refusal(read(&forged, &mine.id, "/tmp/plan.txt").await).0,
        StatusCode::UNAUTHORIZED
    );

    // Quotas: one sandbox, then two; memory.
    operator
        .set_tenant_quota(
            "globex",
            &TenantQuota {
                sandboxes: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let (status, code) = refusal(globex.create_sandbox(&small("second")).await);
    assert_eq!((status, code.as_str()), (StatusCode::FORBIDDEN, "quota_exceeded"));
    let message = globex.create_sandbox(&small("second")).await.unwrap_err().to_string();
    assert!(message.contains("may have 1 sandboxes, has 1"), "{message}");
    operator
        .set_tenant_quota(
            "globex",
            &TenantQuota {
                sandboxes: Some(2),
                memory_mb: Some(200),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let message = globex.create_sandbox(&small("second")).await.unwrap_err().to_string();
    assert!(message.contains("200 MiB"), "{message}");
    globex.stop_sandbox("web").await.unwrap();
    let second = globex.create_sandbox(&small("second")).await.unwrap();
    // Starting the first again would pass 200 MiB.
    let (status, code) = refusal(globex.start_sandbox("web").await);
    assert_eq!((status, code.as_str()), (StatusCode::FORBIDDEN, "quota_exceeded"));

    // The audit log: each tenant's admin sees its own calls only.
    let audit = operator.audit(&Default::default()).await.unwrap();
    assert!(audit
        .events
        .iter()
        .any(|event| event.tenant.as_deref() == Some("globex")));
    acme.delete_sandbox(&mine.id).await.unwrap();
    for sandbox in [&theirs.id, &second.id] {
        globex.delete_sandbox(sandbox).await.unwrap();
    }
}
