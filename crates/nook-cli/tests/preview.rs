//! The preview proxy end to end: a Python app inside a sandbox reached from the test through nook, by host and by
//! path; private ports refused without their token, tokens in header, query and cookie, signed links that expire
//! and are revoked, rotated tokens, public ports; server-sent events streamed, a WebSocket spliced with the same
//! Host as plain requests, HTTP/2 from the client, and a paused sandbox woken by a request.

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use futures::{SinkExt as _, StreamExt as _};
use nook_api::{ExecRequest, PreviewSettingsRequest, Sandbox};
use nook_client::Client;
use serde_json::Value;

const DOMAIN: &str = "preview.test";
const PORT: u16 = 8000;

/// The app: echoes each request's path and headers as JSON; `/events` sends three events a second apart; `/ws` is
/// a WebSocket that answers each text message with the Host it was opened with and the message.
const APP: &str = r#"
import base64, hashlib, json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        if self.path == "/events":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for i in range(3):
                self.wfile.write(f"data: {i}\n\n".encode())
                self.wfile.flush()
                time.sleep(1)
            self.close_connection = True
            return
        if self.path == "/ws":
            key = self.headers["Sec-WebSocket-Key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", base64.b64encode(hashlib.sha1(key.encode()).digest()).decode())
            self.end_headers()
            self.wfile.flush()
            host = self.headers["Host"]
            while True:
                head = self.rfile.read(2)
                if len(head) < 2:
                    return
                length = head[1] & 0x7F
                if length == 126:
                    length = int.from_bytes(self.rfile.read(2), "big")
                mask = self.rfile.read(4) if head[1] & 0x80 else bytes(4)
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
                if head[0] & 0x0F == 8:
                    self.wfile.write(b"\x88\x00")
                    self.wfile.flush()
                    self.close_connection = True
                    return
                reply = f"{host} {data.decode()}".encode()
                self.wfile.write(bytes([0x81, len(reply)]) + reply)
                self.wfile.flush()
        body = json.dumps({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), App).serve_forever()
"#;

fn server(name: &str) -> TestServer {
    TestServer::start_with_config(name, &format!("preview_domain = \"{DOMAIN}\"\n"))
}

/// A sandbox running the app on `PORT`, and the app answering through nook.
async fn sandbox_with_app(server: &TestServer, client: &Client, prefix: &str) -> Sandbox {
    let sandbox = common::create(client, prefix).await;
    let written = common::sh(client, &sandbox.id, &format!("cat > /tmp/app.py <<'EOF'\n{APP}\nEOF")).await;
    assert_eq!(written.exit_code, Some(0), "{written:?}");
    client
        .start_process(
            &sandbox.id,
            &ExecRequest {
                command: vec!["python3".into(), "/tmp/app.py".into(), PORT.to_string()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let token = client.port_access(&sandbox.id, PORT).await.unwrap().token;
    let http = reqwest::Client::new();
    let url = format!("{}/preview/{}/{PORT}/", server.url, sandbox.id);
    common::eventually(
        "the app answers through the preview proxy",
        Duration::from_secs(20),
        || {
            let request = http.get(&url).header("nook-preview-token", &token).send();
            async move { request.await.is_ok_and(|response| response.status() == 200) }
        },
    )
    .await;
    sandbox
}

/// A request to `path` of the sandbox's port by host.
fn by_host(server: &TestServer, http: &reqwest::Client, sandbox: &str, path: &str) -> reqwest::RequestBuilder {
    http.get(format!("{}{path}", server.url))
        .header("host", format!("{PORT}-{sandbox}.{DOMAIN}"))
}

/// A request to `path` of the sandbox's port by host, with the port's token.
fn with_token(
    server: &TestServer,
    http: &reqwest::Client,
    sandbox: &str,
    path: &str,
    token: &str,
) -> reqwest::RequestBuilder {
    by_host(server, http, sandbox, path).header("nook-preview-token", token)
}

/// Changes the sandbox's preview settings.
async fn configure(client: &Client, sandbox: &str, request: PreviewSettingsRequest) -> Sandbox {
    client.set_preview(sandbox, &request).await.unwrap()
}

async fn json_of(response: reqwest::Response) -> Value {
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

async fn refused(response: reqwest::Response) -> String {
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, 401, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["code"], "preview_unauthorized");
    body["message"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_ports_need_a_token_or_a_live_signed_link() {
    let server = server("preview-auth");
    let client = server.client();
    let sandbox = sandbox_with_app(&server, &client, "pv-auth").await;
    let id = &sandbox.id;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let access = client.port_access(id, PORT).await.unwrap();
    assert!(!access.public);
    let host_url = access.url.clone().expect("a host URL with a preview domain");
    assert!(
        host_url.starts_with(&format!("http://{PORT}-{id}.{DOMAIN}:")),
        "{host_url}"
    );
    assert_eq!(access.path_url, format!("{}/preview/{id}/{PORT}/", server.url));

    // Without a credential, by host and by path, the port is closed; nothing reached the app.
    let message = refused(by_host(&server, &http, id, "/").send().await.unwrap()).await;
    assert!(
        message.contains("private") && message.contains("Nook-Preview-Token"),
        "{message}"
    );
    refused(http.get(&access.path_url).send().await.unwrap()).await;
    // A wrong token, and another port's token, are refused.
    refused(
        by_host(&server, &http, id, "/")
            .header("nook-preview-token", "0".repeat(64))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let other_port = client.port_access(id, PORT + 1).await.unwrap().token;
    refused(with_token(&server, &http, id, "/", &other_port).send().await.unwrap()).await;

    // The token in a header: the app sees the client's Host and path, and no trace of the token.
    let seen = json_of(
        with_token(&server, &http, id, "/hello?x=1", &access.token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(seen["path"], "/hello?x=1");
    assert_eq!(seen["headers"]["host"], format!("{PORT}-{id}.{DOMAIN}"));
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1");
    assert!(
        !seen.to_string().contains(&access.token),
        "the token reached the sandbox: {seen}"
    );

    // The token in the query: taken off, and kept in a cookie for the page's later requests.
    let response = by_host(&server, &http, id, &format!("/page?nook_token={}&y=2", access.token))
        .send()
        .await
        .unwrap();
    let cookie = response.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.starts_with("nook_preview=") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let seen = json_of(response).await;
    assert_eq!(seen["path"], "/page?y=2");
    let cookie_pair = cookie.split(';').next().unwrap().to_string();
    let seen = json_of(
        by_host(&server, &http, id, "/next")
            .header("cookie", format!("theme=dark; {cookie_pair}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        seen["headers"]["cookie"], "theme=dark",
        "the app sees its own cookies only"
    );

    // By path: the prefix is removed and passed on.
    let seen = json_of(
        http.get(format!("{}sub/dir?nook_token={}", access.path_url, access.token))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(seen["path"], "/sub/dir");
    assert_eq!(seen["headers"]["x-forwarded-prefix"], format!("/preview/{id}/{PORT}"));
    // By name under the preview domain.
    let seen = json_of(
        http.get(format!("{}/by-name", server.url))
            .header("host", format!("{PORT}-{}.{DOMAIN}", sandbox.name))
            .header("nook-preview-token", &access.token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(seen["path"], "/by-name");

    // A signed link works until it expires.
    let link = client.make_preview_link(id, PORT, 2).await.unwrap();
    let link_url = link.url.clone().unwrap();
    let link_query = &link_url[link_url.find('?').unwrap()..];
    json_of(
        by_host(&server, &http, id, &format!("/{link_query}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    json_of(http.get(link.path_url.clone().unwrap()).send().await.unwrap()).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let message = refused(
        by_host(&server, &http, id, &format!("/{link_query}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(message.contains("expired"), "{message}");
    // A link for another port, or with its expiry changed, does not pass.
    let long = client.make_preview_link(id, PORT, 3600).await.unwrap();
    let long_url = long.path_url.clone().unwrap();
    let other = long_url.replace(&format!("/{PORT}/"), &format!("/{}/", PORT + 1));
    refused(http.get(&other).send().await.unwrap()).await;
    let expires = long.expires_at.timestamp().to_string();
    let stretched = long_url.replace(&expires, &(long.expires_at.timestamp() + 86400).to_string());
    refused(http.get(&stretched).send().await.unwrap()).await;
    // Revoked: refused at once, and listed as revoked.
    json_of(http.get(&long_url).send().await.unwrap()).await;
    let revoked = client.revoke_preview_link(id, &long.id).await.unwrap();
    assert!(revoked.revoked_at.is_some());
    let message = refused(http.get(&long_url).send().await.unwrap()).await;
    assert!(message.contains("revoked"), "{message}");
    let links = client.preview_links(id).await.unwrap().links;
    assert_eq!(links.len(), 2);
    assert!(links
        .iter()
        .any(|listed| listed.id == long.id && listed.revoked_at.is_some()));

    // Rotating revokes every token and link at once; the new token works.
    let fresh = client.make_preview_link(id, PORT, 3600).await.unwrap();
    let rotated = configure(
        &client,
        id,
        PreviewSettingsRequest {
            rotate_tokens: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(rotated.preview.token_generation, 1);
    refused(with_token(&server, &http, id, "/", &access.token).send().await.unwrap()).await;
    refused(http.get(fresh.path_url.clone().unwrap()).send().await.unwrap()).await;
    let new_token = client.port_access(id, PORT).await.unwrap().token;
    assert_ne!(new_token, access.token);
    json_of(with_token(&server, &http, id, "/", &new_token).send().await.unwrap()).await;

    // A masked Host: the app sees the mask, and the client's Host as X-Forwarded-Host.
    configure(
        &client,
        id,
        PreviewSettingsRequest {
            upstream_host: Some("localhost:${PORT}".into()),
            ..Default::default()
        },
    )
    .await;
    let seen = json_of(with_token(&server, &http, id, "/", &new_token).send().await.unwrap()).await;
    assert_eq!(seen["headers"]["host"], format!("localhost:{PORT}"));
    assert_eq!(seen["headers"]["x-forwarded-host"], format!("{PORT}-{id}.{DOMAIN}"));
    configure(
        &client,
        id,
        PreviewSettingsRequest {
            upstream_host: Some(String::new()),
            ..Default::default()
        },
    )
    .await;

    // A public port needs nothing; the others stay private.
    let public = configure(
        &client,
        id,
        PreviewSettingsRequest {
            public_ports: Some(vec![PORT]),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(public.preview.public_ports, vec![PORT]);
    assert!(client.port_access(id, PORT).await.unwrap().public);
    json_of(by_host(&server, &http, id, "/open").send().await.unwrap()).await;
    refused(
        http.get(format!("{}/preview/{id}/{}/", server.url, PORT + 1))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let events = client.sandbox_events(id).await.unwrap();
    assert!(events
        .iter()
        .any(|event| event.reason == nook_api::StateReason::PreviewChanged && event.message.contains("rotated")));

    // A port nothing listens on, and a sandbox that does not exist, say so.
    let response = http
        .get(format!("{}/preview/{id}/{}/", server.url, PORT + 1))
        .header(
            "nook-preview-token",
            client.port_access(id, PORT + 1).await.unwrap().token,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "port_closed", "{body}");
    let response = http
        .get(format!("{}/preview/sb-00000000000000000000/{PORT}/", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    // Bad link lives are refused.
    for seconds in [0, 86401] {
        let error = client
            .make_preview_link(id, PORT, seconds)
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("1 s to 86400 s"), "{error}");
    }
    client.delete_sandbox(id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_websockets_http2_and_wake_on_request_pass_through() {
    let server = server("preview-stream");
    let client = server.client();
    let sandbox = sandbox_with_app(&server, &client, "pv-stream").await;
    let id = &sandbox.id;
    let token = client.port_access(id, PORT).await.unwrap().token;
    let http = reqwest::Client::new();
    let host = format!("{PORT}-{id}.{DOMAIN}");

    // Server-sent events arrive as they are written, not when the response ends (about 3 s later).
    let started = Instant::now();
    let mut events = with_token(&server, &http, id, "/events", &token).send().await.unwrap();
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let first = events.chunk().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert_eq!(&first[..], b"data: 0\n\n");
    assert!(
        first_at < Duration::from_millis(900),
        "the first event took {first_at:?}"
    );
    let mut rest = Vec::new();
    while let Some(chunk) = events.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"data: 1\n\ndata: 2\n\n");
    assert!(started.elapsed() >= Duration::from_secs(2));

    // A WebSocket through the proxy, opened with the same Host as plain requests.
    let address = server.url.trim_start_matches("http://");
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{address}/ws"))
            .unwrap();
    request.headers_mut().insert("host", host.parse().unwrap());
    request
        .headers_mut()
        .insert("nook-preview-token", token.parse().unwrap());
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.status(), 101);
    for message in ["hello", "again"] {
        socket
            .send(tokio_tungstenite::tungstenite::Message::text(message))
            .await
            .unwrap();
        let answer = socket.next().await.unwrap().unwrap();
        assert_eq!(answer.into_text().unwrap().as_str(), format!("{host} {message}"));
    }
    socket.close(None).await.unwrap();
    // Without a token the upgrade is refused like any request.
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{address}/ws"))
            .unwrap();
    request.headers_mut().insert("host", host.parse().unwrap());
    let refused = tokio_tungstenite::connect_async(request).await.unwrap_err().to_string();
    assert!(refused.contains("401"), "{refused}");

    // HTTP/2 from the client (curl with prior knowledge); HTTP/1.1 to the app, with the authority as Host.
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", "-w", "\n%{http_version}", "-H"])
        .arg(format!("nook-preview-token: {token}"))
        .arg("-H")
        .arg(format!("host: {host}"))
        .arg(format!("{}/h2", server.url))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let (body, version) = text.rsplit_once('\n').unwrap();
    assert_eq!(version, "2", "{text} {}", String::from_utf8_lossy(&output.stderr));
    let seen: Value = serde_json::from_str(body).unwrap();
    assert_eq!(seen["path"], "/h2");
    assert_eq!(seen["headers"]["host"], host);

    // Paused: refused while wake on request is off; with it on, a request resumes the sandbox and is answered.
    client.pause_sandbox(id).await.unwrap();
    let response = with_token(&server, &http, id, "/", &token).send().await.unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("wake_on_request"), "{body}");
    configure(
        &client,
        id,
        PreviewSettingsRequest {
            wake_on_request: Some(true),
            ..Default::default()
        },
    )
    .await;
    let seen = json_of(with_token(&server, &http, id, "/woken", &token).send().await.unwrap()).await;
    assert_eq!(seen["path"], "/woken");
    let woken = client.sandbox(id).await.unwrap();
    assert_eq!(woken.state, nook_api::SandboxState::Running);
    let events = client.sandbox_events(id).await.unwrap();
    assert!(events
        .iter()
        .any(|event| event.reason == nook_api::StateReason::WokenByRequest));
    client.delete_sandbox(id).await.unwrap();
}
