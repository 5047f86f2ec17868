//! The audit log end to end: API calls (native and E2B) recorded with who, what, which sandbox and the result;
//! refused calls recorded as such; filters, paging both ways and the JSON-lines export. Egress decisions are
//! checked in `network.rs`, where the test hosts are.

mod common;

use std::time::Duration;

use common::TestServer;
use nook_api::audit::{AuditEvent, AuditKind, AuditQuery};
use nook_api::ExecRequest;
use nook_client::Client;

async fn events(client: &Client, query: AuditQuery) -> Vec<AuditEvent> {
    client.audit(&query).await.unwrap().events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_calls_are_recorded_with_who_what_which_sandbox_and_the_result() {
    let server = TestServer::start("audit");
    let client = server.client();
    let sandbox = common::create(&client, "audited").await;
    client
        .exec(
            &sandbox.name,
            &ExecRequest {
                command: vec!["true".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // Refused and failed calls: a wrong key, a sandbox that does not exist.
    let stranger = Client::new(&server.url, "nook_not_a_key").unwrap();
    assert!(stranger.list_sandboxes(None, &Default::default()).await.is_err());
    assert!(client.sandbox("no-such-sandbox").await.is_err());
    // An E2B call, with the same key in X-API-Key.
    let e2b = reqwest::Client::new()
        .get(format!("{}/sandboxes", server.url))
        .header("x-api-key", &server.key)
        .send()
        .await
        .unwrap();
    assert_eq!(e2b.status(), 200);
    // Not API calls: the health check.
    reqwest::get(format!("{}/v1/health", server.url)).await.unwrap();

    // The writer stores in the background: wait for the last call.
    let query = AuditQuery {
        kind: Some(AuditKind::Api),
        ..Default::default()
    };
    common::eventually("the E2B call is recorded", Duration::from_secs(10), || {
        let client = client.clone();
        let query = query.clone();
        async move {
            events(&client, query)
                .await
                .iter()
                .any(|event| event.action == "GET /sandboxes")
        }
    })
    .await;
    let all = events(&client, query.clone()).await;
    let find = |action: &str| {
        all.iter()
            .find(|event| event.action == action)
            .unwrap_or_else(|| panic!("no {action} in {all:#?}"))
    };
    let created = find("POST /v1/sandboxes");
    assert_eq!(created.outcome, "201");
    assert!(created.allowed);
    assert!(created.actor.as_deref().unwrap().contains("(admin)"), "{created:?}");
    assert_eq!(created.client.as_deref(), Some("127.0.0.1"));
    assert!(created.duration_ms.unwrap() > 0.0);
    let exec = find("POST /v1/sandboxes/{sandbox}/exec");
    assert_eq!(
        (exec.outcome.as_str(), exec.sandbox.as_deref()),
        ("200", Some(sandbox.name.as_str()))
    );
    let refused = find("GET /v1/sandboxes");
    let refused = if refused.outcome == "401" {
        refused
    } else {
        all.iter()
            .find(|event| event.action == "GET /v1/sandboxes" && event.outcome == "401")
            .expect("the refused list")
    };
    assert_eq!(refused.actor.as_deref(), Some("unauthenticated"));
    assert!(!refused.allowed);
    let missing = find("GET /v1/sandboxes/{sandbox}");
    assert_eq!(
        (missing.outcome.as_str(), missing.sandbox.as_deref()),
        ("404", Some("no-such-sandbox"))
    );
    let e2b = find("GET /sandboxes");
    assert!(e2b.actor.as_deref().unwrap().contains("(admin)"));
    assert!(!all.iter().any(|event| event.action.contains("health")));

    // Filters: refused only; one sandbox only; numbered in order.
    let failed = events(
        &client,
        AuditQuery {
            allowed: Some(false),
            ..query.clone()
        },
    )
    .await;
    assert!(
        failed.len() >= 2 && failed.iter().all(|event| !event.allowed),
        "{failed:#?}"
    );
    let about = events(
        &client,
        AuditQuery {
            sandbox: Some(sandbox.name.clone()),
            ..Default::default()
        },
    )
    .await;
    assert!(
        !about.is_empty()
            && about
                .iter()
                .all(|event| event.sandbox.as_deref() == Some(sandbox.name.as_str()))
    );
    assert!(all.windows(2).all(|pair| pair[0].seq < pair[1].seq));

    // Pages forwards and backwards cover the same events as the export.
    let mut forwards = Vec::new();
    let mut page_query = AuditQuery {
        limit: Some(2),
        ..Default::default()
    };
    loop {
        let page = client.audit(&page_query).await.unwrap();
        forwards.extend(page.events.iter().map(|event| event.seq));
        match page.next {
            Some(next) => page_query.after = Some(next),
            None => break,
        }
    }
    let newest = client
        .audit(&AuditQuery {
            newest_first: true,
            limit: Some(3),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(newest.events.windows(2).all(|pair| pair[0].seq > pair[1].seq));
    let mut exported = Vec::new();
    let mut stream = client.export_audit(&AuditQuery::default()).await.unwrap();
    while let Some(event) = futures::StreamExt::next(&mut stream).await {
        exported.push(event.unwrap().seq);
    }
    // Calls made while paging (the pages themselves) may follow; what was paged is a prefix of the export.
    assert!(exported.len() >= forwards.len() && exported[..forwards.len()] == forwards[..]);
    assert!(forwards.contains(&newest.events[2].seq));

    // A malformed filter is a JSON error.
    let response = reqwest::Client::new()
        .get(format!("{}/v1/audit?kind=everything", server.url))
        .bearer_auth(&server.key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], "invalid_request", "{body}");
    client.delete_sandbox(&sandbox.id).await.unwrap();
}
