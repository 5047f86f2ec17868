//! Sandbox networking end to end: addresses and NAT, the restricted blocks (private, metadata), sandboxes kept apart
//! and away from the host, policies changed on running sandboxes, the resolver and the egress proxy judging names.
//!
//! Every destination is a test host these tests make: a network namespace of their own joined to the host by a veth
//! pair, running a small Python server. Nothing else is ever contacted.

mod common;

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestServer;
use nook_api::{CreateSandboxRequest, EgressAction, EgressMode, EgressRule, NetworkPolicy};
use nook_client::Client;

/// A host on a /31 of its own: `address` in namespace `name`, the host's end at the other address of the pair.
struct TestHost {
    name: String,
    /// The routing table its route is in, when it is reachable only from one server's sandboxes.
    table: Option<(u32, String)>,
    servers: Vec<Child>,
}

impl TestHost {
    /// Makes the host; `only_from` puts its route in a table of its own used only by traffic from that subnet, so
    /// that an address such as 169.254.169.254 changes nothing for the machine itself.
    fn new(name: &str, address: Ipv4Addr, only_from: Option<&str>) -> Self {
        let peer = Ipv4Addr::from(u32::from(address) ^ 1);
        let namespace = format!("nt-{name}");
        let link = format!("nth-{name}");
        let _ = Command::new("ip")
            .args(["netns", "delete", &namespace])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["link", "delete", &link])
            .stderr(Stdio::null())
            .status();
        run(&["ip", "netns", "add", &namespace]);
        run(&[
            "ip", "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &namespace,
        ]);
        run(&[
            "ip",
            "-n",
            &namespace,
            "addr",
            "add",
            &format!("{address}/31"),
            "dev",
            "eth0",
        ]);
        run(&["ip", "-n", &namespace, "link", "set", "eth0", "up"]);
        run(&["ip", "-n", &namespace, "link", "set", "lo", "up"]);
        run(&[
            "ip",
            "-n",
            &namespace,
            "route",
            "add",
            "default",
            "via",
            &peer.to_string(),
        ]);
        run(&["ip", "link", "set", &link, "up"]);
        let table = match only_from {
            None => {
                run(&["ip", "addr", "add", &format!("{peer}/31"), "dev", &link]);
                None
            }
            Some(subnet) => {
                run(&["ip", "addr", "add", &format!("{peer}/32"), "dev", &link]);
                let table = 1000 + (u32::from(address) % 1000);
                run(&[
                    "ip",
                    "route",
                    "add",
                    &format!("{address}/32"),
                    "dev",
                    &link,
                    "table",
                    &table.to_string(),
                ]);
                run(&[
                    "ip",
                    "rule",
                    "add",
                    "from",
                    subnet,
                    "lookup",
                    &table.to_string(),
                    "priority",
                    "900",
                ]);
                Some((table, subnet.to_string()))
            }
        };
        Self {
            name: namespace,
            table,
            servers: Vec::new(),
        }
    }

    /// Serves HTTP on `port`, answering every path with `text`.
    fn serve_http(&mut self, port: u16, text: &str) {
        let script = format!(
            "import http.server\n\
             class H(http.server.BaseHTTPRequestHandler):\n\
             \x20   def do_GET(self):\n\
             \x20       body = {text:?}.encode()\n\
             \x20       self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()\n\
             \x20       self.wfile.write(body)\n\
             \x20   def log_message(self, *args): pass\n\
             http.server.ThreadingHTTPServer(('0.0.0.0', {port}), H).serve_forever()\n"
        );
        self.spawn(&["python3", "-c", &script]);
        self.wait_listening(port);
    }

    /// Serves TLS on `port` with a self-signed certificate for `common_name`, writing `text` to each client.
    fn serve_tls(&mut self, port: u16, common_name: &str, text: &str, dir: &std::path::Path) {
        let key = dir.join(format!("{}.key", self.name));
        let cert = dir.join(format!("{}.crt", self.name));
        run(&[
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={common_name}"),
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ]);
        let script = format!(
            "import socket, ssl, threading\n\
             context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
             context.load_cert_chain({cert:?}, {key:?})\n\
             server = socket.create_server(('0.0.0.0', {port}))\n\
             def handle(connection):\n\
             \x20   try:\n\
             \x20       with context.wrap_socket(connection, server_side=True) as tls: tls.sendall({text:?}.encode())\n\
             \x20   except Exception: pass\n\
             while True:\n\
             \x20   connection, _ = server.accept()\n\
             \x20   threading.Thread(target=handle, args=(connection,)).start()\n",
            cert = cert.to_str().unwrap(),
            key = key.to_str().unwrap(),
        );
        self.spawn(&["python3", "-c", &script]);
        self.wait_listening(port);
    }

    fn spawn(&mut self, command: &[&str]) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(command)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.servers.push(child);
    }

    fn wait_listening(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let output = Command::new("ip")
                .args(["netns", "exec", &self.name, "ss", "-Hltn", &format!("sport = :{port}")])
                .output()
                .unwrap();
            if !output.stdout.is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the test host {} never listened on port {port}", self.name);
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        if let Some((table, subnet)) = &self.table {
            let _ = Command::new("ip")
                .args([
                    "rule",
                    "delete",
                    "from",
                    subnet,
                    "lookup",
                    &table.to_string(),
                    "priority",
                    "900",
                ])
                .status();
            let _ = Command::new("ip")
                .args(["route", "flush", "table", &table.to_string()])
                .status();
        }
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).status();
    }
}

fn run(command: &[&str]) {
    let output = Command::new(command[0]).args(&command[1..]).output().unwrap();
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn rule(action: EgressAction, to: &str) -> EgressRule {
    EgressRule {
        action,
        to: to.into(),
        ports: Vec::new(),
    }
}

/// Runs a shell command in a sandbox; (exit code, stdout, stderr).
async fn sh(client: &Client, sandbox: &str, script: &str) -> (i32, String, String) {
    let result = common::sh(client, sandbox, script).await;
    (result.exit_code.unwrap_or(-1), result.stdout, result.stderr)
}

/// Fetches a URL from inside a sandbox with curl (3 s at most); (curl's exit code, body).
async fn fetch(client: &Client, sandbox: &str, extra: &str, url: &str) -> (i32, String) {
    let (code, stdout, _) = sh(client, sandbox, &format!("curl -sS -m 3 {extra} {url}")).await;
    (code, stdout)
}

async fn create(client: &Client, network: Option<NetworkPolicy>) -> nook_api::Sandbox {
    client
        .create_sandbox(&CreateSandboxRequest {
            network,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|error| panic!("{error}"))
}

#[tokio::test]
async fn sandboxes_reach_public_hosts_but_not_private_ones_the_host_or_each_other() {
    let server = TestServer::start_with_config(
        "net-basics",
        "[network.dns_records]\n\"public.test\" = [\"198.51.100.10\"]\n",
    );
    let client = server.client();
    let mut public = TestHost::new("pub", Ipv4Addr::new(198, 51, 100, 10), None);
    public.serve_http(80, "the public host");
    let mut private = TestHost::new("priv", Ipv4Addr::new(10, 201, 0, 10), None);
    private.serve_http(80, "the private host");

    let sandbox = create(&client, None).await;
    let address: Ipv4Addr = sandbox
        .address
        .as_deref()
        .expect("a networked sandbox has an address")
        .parse()
        .unwrap();
    let (_, interfaces, _) = sh(&client, &sandbox.id, "ls /sys/class/net | tr '\\n' ' '").await;
    assert_eq!(interfaces.trim(), "eth0 lo");
    // By name through the runner's resolver, and by address.
    assert_eq!(
        fetch(&client, &sandbox.id, "", "http://public.test/").await,
        (0, "the public host".into())
    );
    assert_eq!(
        fetch(&client, &sandbox.id, "", "http://198.51.100.10/").await.1,
        "the public host"
    );
    // Private blocks are refused at once (no hang), like the host's own addresses.
    let started = Instant::now();
    let (code, _) = fetch(&client, &sandbox.id, "", "http://10.201.0.10/").await;
    assert_eq!(code, 7, "curl's 'could not connect'");
    assert!(started.elapsed() < Duration::from_secs(2));
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = listener.local_addr().unwrap().port();
    let gateway = Ipv4Addr::from(u32::from(address) & 0xffff_ff00 | 1);
    let (code, _) = fetch(&client, &sandbox.id, "", &format!("http://{gateway}:{host_port}/")).await;
    // Refused at once: a listener that was reached would hold curl until its time limit (exit 28).
    assert_eq!(code, 7, "a sandbox reaches no host service");

    // Another sandbox is out of reach, even with a server listening on all addresses.
    let other = create(&client, None).await;
    sh(
        &client,
        &other.id,
        "nohup python3 -m http.server 8000 >/dev/null 2>&1 & sleep 1",
    )
    .await;
    let other_address = other.address.clone().unwrap();
    assert_eq!(fetch(&client, &other.id, "", "http://127.0.0.1:8000/").await.0, 0);
    let (code, _) = fetch(&client, &sandbox.id, "", &format!("http://{other_address}:8000/")).await;
    assert_eq!(code, 7);

    // A rule inside a private block opens it; a new policy works on the running sandbox at once, and cuts off
    // what it no longer allows.
    let opened = NetworkPolicy {
        egress: EgressMode::AllowAll,
        rules: vec![
            rule(EgressAction::Allow, "10.201.0.10/32"),
            rule(EgressAction::Deny, "198.51.100.0/24"),
        ],
        default: None,
    };
    let changed = client.set_network(&sandbox.id, &opened).await.unwrap();
    assert_eq!(changed.network, opened);
    assert_eq!(changed.address, sandbox.address, "a policy change keeps the address");
    assert_eq!(
        fetch(&client, &sandbox.id, "", "http://10.201.0.10/").await,
        (0, "the private host".into())
    );
    assert_eq!(fetch(&client, &sandbox.id, "", "http://198.51.100.10/").await.0, 7);
    let events = client.sandbox_events(&sandbox.id).await.unwrap();
    assert!(events
        .iter()
        .any(|event| event.reason == nook_api::StateReason::NetworkChanged
            && event.message.contains("allow 10.201.0.10/32")));

    // Traffic is metered.
    let stats = client.sandbox_stats(&sandbox.id).await.unwrap();
    assert!(stats.network_rx_bytes > 0 && stats.network_tx_bytes > 0, "{stats:?}");

    // `none` takes the interface away (and gives it back); a sandbox can also start without one.
    let cut = client.set_network(&sandbox.id, &NetworkPolicy::none()).await.unwrap();
    assert_eq!(cut.address, None);
    let (_, interfaces, _) = sh(&client, &sandbox.id, "ls /sys/class/net | tr '\\n' ' '").await;
    assert_eq!(interfaces.trim(), "lo");
    let back = client
        .set_network(&sandbox.id, &NetworkPolicy::default())
        .await
        .unwrap();
    assert!(back.address.is_some());
    assert_eq!(
        fetch(&client, &sandbox.id, "", "http://public.test/").await.1,
        "the public host"
    );
    let isolated = create(&client, Some(NetworkPolicy::none())).await;
    assert_eq!(isolated.address, None);
    let (_, interfaces, _) = sh(&client, &isolated.id, "ls /sys/class/net | tr '\\n' ' '").await;
    assert_eq!(interfaces.trim(), "lo");

    // A malformed rule is refused with the rule named.
    let bad = NetworkPolicy {
        egress: EgressMode::Rules,
        rules: vec![rule(EgressAction::Allow, "10.0.0.1/8")],
        default: None,
    };
    let error = client.set_network(&sandbox.id, &bad).await.unwrap_err().to_string();
    assert!(error.contains("rule 1") && error.contains("10.0.0.0/8"), "{error}");

    // Stopped and started, a sandbox keeps its policy.
    client.stop_sandbox(&other.id).await.unwrap();
    let restarted = client.start_sandbox(&other.id).await.unwrap();
    assert!(restarted.address.is_some());
    for id in [&sandbox.id, &other.id, &isolated.id] {
        client.delete_sandbox(id).await.unwrap();
    }
}

#[tokio::test]
async fn the_metadata_address_is_blocked_unless_a_rule_names_it() {
    let server = TestServer::start("net-metadata");
    let client = server.client();
    let subnet = common::test_subnet(&server.data_dir);
    let mut metadata = TestHost::new("meta", Ipv4Addr::new(169, 254, 169, 254), Some(&subnet));
    metadata.serve_http(80, "instance credentials");

    let sandbox = create(&client, None).await;
    assert_eq!(fetch(&client, &sandbox.id, "", "http://169.254.169.254/").await.0, 7);
    // Allowing everything is not naming it.
    let everything = NetworkPolicy {
        egress: EgressMode::Rules,
        rules: vec![rule(EgressAction::Allow, "0.0.0.0/0")],
        default: None,
    };
    client.set_network(&sandbox.id, &everything).await.unwrap();
    assert_eq!(fetch(&client, &sandbox.id, "", "http://169.254.169.254/").await.0, 7);
    let named = NetworkPolicy {
        egress: EgressMode::Rules,
        rules: vec![rule(EgressAction::Allow, "169.254.169.254")],
        default: None,
    };
    client.set_network(&sandbox.id, &named).await.unwrap();
    assert_eq!(
        fetch(&client, &sandbox.id, "", "http://169.254.169.254/").await,
        (0, "instance credentials".into())
    );
    client.delete_sandbox(&sandbox.id).await.unwrap();
}

#[tokio::test]
async fn domain_rules_judge_the_name_asked_for_not_the_address_dialled() {
    let server = TestServer::start_with_config(
        "net-domains",
        "[network.dns_records]\n\"good.test\" = [\"198.51.100.20\"]\n\"evil.test\" = [\"198.51.100.30\"]\n",
    );
    let client = server.client();
    let scratch = tempfile::tempdir().unwrap();
    let mut good = TestHost::new("good", Ipv4Addr::new(198, 51, 100, 20), None);
    good.serve_http(80, "good");
    good.serve_tls(443, "good.test", "good over tls", scratch.path());
    let mut evil = TestHost::new("evil", Ipv4Addr::new(198, 51, 100, 30), None);
    evil.serve_http(80, "evil");
    evil.serve_tls(443, "evil.test", "evil over tls", scratch.path());

    let policy = NetworkPolicy {
        egress: EgressMode::Rules,
        rules: vec![rule(EgressAction::Allow, "good.test")],
        default: None,
    };
    let sandbox = create(&client, Some(policy)).await;
    assert_eq!(
        fetch(&client, &sandbox.id, "", "http://good.test/").await,
        (0, "good".into())
    );
    // The resolver does not even name the other host.
    let (code, _, stderr) = sh(&client, &sandbox.id, "curl -sS -m 3 http://evil.test/").await;
    assert_eq!(code, 6, "could not resolve: {stderr}");
    // Dialling the allowed host's address while asking for the other name gets nothing...
    let (code, body) = fetch(
        &client,
        &sandbox.id,
        "--resolve evil.test:80:198.51.100.20",
        "http://evil.test/",
    )
    .await;
    assert_ne!(code, 0, "{body}");
    // ...and asking for the allowed name while dialling the other host reaches the allowed one.
    let (code, body) = fetch(
        &client,
        &sandbox.id,
        "--resolve good.test:80:198.51.100.30",
        "http://good.test/",
    )
    .await;
    assert_eq!((code, body.as_str()), (0, "good"));
    // The same for TLS, by the server name in the ClientHello.
    let tls = |name: &str, address: &str| {
        format!(
            "python3 -c \"import socket, ssl; c = ssl.create_default_context(); c.check_hostname = False; \
             c.verify_mode = ssl.CERT_NONE; s = c.wrap_socket(socket.create_connection(('{address}', 443), 3), \
             server_hostname='{name}'); print(s.recv(100).decode())\""
        )
    };
    let (code, stdout, _) = sh(&client, &sandbox.id, &tls("good.test", "198.51.100.30")).await;
    assert_eq!((code, stdout.trim()), (0, "good over tls"));
    let (code, stdout, _) = sh(&client, &sandbox.id, &tls("evil.test", "198.51.100.20")).await;
    assert_ne!(code, 0, "{stdout}");
    // Without a name (a raw address) nothing gets through.
    assert_ne!(fetch(&client, &sandbox.id, "", "http://198.51.100.20/").await.0, 0);

    // Each decision is in the audit log: the resolver's and the proxy's, allowed and denied, with rule and reason.
    let query = nook_api::audit::AuditQuery {
        kind: Some(nook_api::audit::AuditKind::Egress),
        sandbox: Some(sandbox.id.clone()),
        ..Default::default()
    };
    let decided =
        |by: &'static str, target: &'static str, allowed: bool| {
            let (client, query) = (client.clone(), query.clone());
            async move {
                client.audit(&query).await.unwrap().events.iter().any(|event| {
                    event.action == by && event.target.as_deref() == Some(target) && event.allowed == allowed
                })
            }
        };
    common::eventually("the decisions are recorded", Duration::from_secs(10), || {
        decided("proxy", "good.test:80", true)
    })
    .await;
    assert!(decided("dns", "good.test", true).await);
    assert!(decided("dns", "evil.test", false).await);
    assert!(decided("proxy", "evil.test:80", false).await);
    let events = client.audit(&query).await.unwrap().events;
    let denied = events
        .iter()
        .find(|event| event.action == "dns" && event.target.as_deref() == Some("evil.test"))
        .unwrap();
    assert_eq!(denied.outcome, "denied");
    assert!(
        denied.reason.as_deref().unwrap().contains("no rule allows"),
        "{denied:?}"
    );
    let allowed = events
        .iter()
        .find(|event| event.action == "dns" && event.target.as_deref() == Some("good.test"))
        .unwrap();
    assert_eq!(allowed.rule, Some(1));
    client.delete_sandbox(&sandbox.id).await.unwrap();
}
