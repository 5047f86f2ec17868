//! Test harness for end-to-end tests: starts the real `nook serve` binary (built by cargo for this package) on a
//! loopback port with its own data directory, and talks to it with the real Rust client.
//!
//! Needs root (namespaces, mounts, cgroups), the static agent (`NOOK_AGENT_BINARY`, or the debug static build in
//! `target/`) and the base image tarball (`NOOK_BASE_IMAGE_TAR`, or the cache `scripts/build-base-image.sh` fills).
//! `scripts/test.sh` provides all of it.

#![allow(dead_code)]

pub mod fixture_image;
pub mod registry;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nook_api::{CreateSandboxRequest, ExecRequest, ExecResult, ResourceRequest, Sandbox};
use nook_client::Client;

/// One running `nook serve`.
pub struct TestServer {
    pub url: String,
    pub key: String,
    pub data_dir: PathBuf,
    child: Option<Child>,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// The static agent to use.
pub fn agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NOOK_AGENT_BINARY") {
        return PathBuf::from(path);
    }
    let path = workspace_root().join("target/x86_64-unknown-linux-gnu/debug/nook-agent");
    assert!(
        path.is_file(),
        "no static agent at {}: run scripts/build.sh --debug or set NOOK_AGENT_BINARY",
        path.display()
    );
    path
}

/// The base image tarball to use.
pub fn base_image_tar() -> PathBuf {
    if let Some(path) = std::env::var_os("NOOK_BASE_IMAGE_TAR") {
        return PathBuf::from(path);
    }
    let path = PathBuf::from("/var/cache/nook/images/base.tar");
    assert!(
        path.exists(),
        "no base image at {}: run scripts/build-base-image.sh or set NOOK_BASE_IMAGE_TAR",
        path.display()
    );
    path
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl TestServer {
    /// Starts a server with a fresh data directory named after `name`.
    pub fn start(name: &str) -> Self {
        let data_dir = std::env::temp_dir().join(format!("nook-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        std::fs::create_dir_all(&data_dir).unwrap();
        let key = format!("nook_test_{}", rand_suffix());
        Self::start_in(data_dir, key)
    }

    /// Starts a server with a fresh data directory and this TOML config file.
    pub fn start_with_config(name: &str, config: &str) -> Self {
        let data_dir = std::env::temp_dir().join(format!("nook-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        std::fs::create_dir_all(&data_dir).unwrap();
        std::fs::write(data_dir.join("config.toml"), config).unwrap();
        Self::start_in(data_dir, format!("nook_test_{}", rand_suffix()))
    }

    /// Starts a server on an existing data directory (to test restarts); a `config.toml` there is its config.
    pub fn start_in(data_dir: PathBuf, key: String) -> Self {
        let url = format!("http://127.0.0.1:{}", free_port());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("server.log"))
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_nook"));
        command.arg("serve");
        let config = data_dir.join("config.toml");
        let configured_subnet = std::fs::read_to_string(&config).is_ok_and(|text| text.contains("subnet"));
        if config.exists() {
            command.arg("--config").arg(config);
        }
        if !configured_subnet {
            // Servers run side by side: each gets a subnet of its own, the same again for the same data directory
            // (a restart test adopts its sandboxes' addresses).
            command.arg("--network-subnet").arg(test_subnet(&data_dir));
        }
        let child = command
            .arg("--listen")
            .arg(url.trim_start_matches("http://"))
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--no-client-config")
            .env("NOOK_AGENT_BINARY", agent_binary())
            .env("NOOK_BASE_IMAGE_TAR", base_image_tar())
            .env("NOOK_ADMIN_KEY", &key)
            .env("NOOK_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting nook serve");
        let mut server = Self {
            url,
            key,
            data_dir,
            child: Some(child),
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(180);
        let health = format!("{}/v1/health", self.url);
        loop {
            if let Ok(response) = blocking_get(&health) {
                if response == 200 {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "nook serve exited with {status} before it was ready; log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nook serve was not ready in time; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("server.log")).unwrap_or_default()
    }

    /// A client with the admin key.
    pub fn client(&self) -> Client {
        Client::new(&self.url, &self.key).unwrap()
    }

    /// Stops the server with SIGTERM and waits for it (sandboxes keep running).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: sending a signal to our own child has no memory-safety preconditions.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let _ = child.wait();
        }
    }

    /// The server process's pid.
    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .map(|child| child.id() as i32)
            .expect("the server is running")
    }

    /// Host pid of a running sandbox's init (its agent), from the runner's record.
    pub fn agent_pid(&self, id: &str) -> i32 {
        let record = std::fs::read_to_string(self.sandbox_dir(id).join("state.json")).unwrap();
        let record: serde_json::Value = serde_json::from_str(&record).unwrap();
        record["init"]["pid"].as_i64().expect("the sandbox is running") as i32
    }

    /// The directory where the runner keeps sandbox `id`.
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("runner/sandboxes").join(id)
    }

    /// The writable layer of sandbox `id` (in its volume).
    pub fn upper_dir(&self, id: &str) -> PathBuf {
        self.sandbox_dir(id).join("fs/upper")
    }
}

/// The sandbox subnet of the test server with this data directory: a /24 in 10.100.0.0/14 picked by a hash of the
/// path.
pub fn test_subnet(data_dir: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    data_dir.hash(&mut hasher);
    let hash = hasher.finish();
    format!("10.{}.{}.0/24", 100 + (hash % 4), (hash >> 8) % 256)
}

/// Removes what a server's network left on the host (its table and gateway interface), once its sandboxes are gone.
fn remove_network(data_dir: &Path) {
    let Ok(subnet) = nook_runner::network::Subnet::parse(&test_subnet(data_dir)) else {
        return;
    };
    let _ = std::process::Command::new("nft")
        .args(["delete", "table", "inet", &subnet.table_name()])
        .stderr(Stdio::null())
        .status();
    let _ = std::process::Command::new("ip")
        .args(["link", "delete", &subnet.gateway_interface()])
        .stderr(Stdio::null())
        .status();
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
        // Sandboxes outlive their server by design; a test that failed before deleting its sandboxes must not leave
        // them running on the machine.
        kill_leftover_sandboxes(&self.data_dir);
        remove_network(&self.data_dir);
        // The data directory holds a copy of the base image (over a GiB): kept only to explain a failing test.
        if !std::thread::panicking() {
            remove_data_dir(&self.data_dir);
        }
    }
}

/// Removes a stopped server's data directory, without crossing into other filesystems. The btrfs subvolumes in it
/// (sandboxes' volumes, layers made from them), which `rm --one-file-system` would not enter, are dropped first.
fn remove_data_dir(dir: &Path) {
    let runner = dir.join("runner");
    let mut volumes: Vec<PathBuf> = Vec::new();
    for parent in ["sandboxes", "layers/sha256", "layers/tmp"] {
        for entry in std::fs::read_dir(runner.join(parent)).into_iter().flatten().flatten() {
            volumes.push(entry.path());
            volumes.push(entry.path().join("fs"));
        }
    }
    for volume in volumes {
        if nook_runner::storage::is_subvolume(&volume) {
            let _ = std::process::Command::new("btrfs")
                .args(["subvolume", "delete"])
                .arg(&volume)
                .stdout(std::process::Stdio::null())
                .status();
        }
    }
    let _ = std::process::Command::new("rm")
        .args(["-rf", "--one-file-system"])
        .arg(dir)
        .status();
}

/// Kills every sandbox init recorded under a data directory (same pid and start time only) and removes the emptied
/// cgroups. For after the server is gone.
pub fn kill_leftover_sandboxes(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir.join("runner/sandboxes")) else {
        return;
    };
    for entry in entries.flatten() {
        let id = entry.file_name().to_string_lossy().into_owned();
        let record = std::fs::read_to_string(entry.path().join("state.json")).unwrap_or_default();
        let record: serde_json::Value = serde_json::from_str(&record).unwrap_or_default();
        let (Some(pid), Some(start)) = (record["init"]["pid"].as_i64(), record["init"]["start_time"].as_u64()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let started = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').nth(19))
            .and_then(|t| t.parse().ok());
        if started == Some(start) {
            // SAFETY: signalling a process whose identity was just checked; no memory is shared.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        for _ in 0..100 {
            let mut left = false;
            for hierarchy in ["memory", "cpu", "cpuacct", "pids", "freezer", "devices", "unified", ""] {
                let dir = Path::new("/sys/fs/cgroup").join(hierarchy).join("nook").join(&id);
                if dir.exists() && std::fs::remove_dir(&dir).is_err() {
                    left = true;
                }
            }
            if !left {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Minimal HTTP GET for readiness checks, so that waiting needs no async runtime.
fn blocking_get(url: &str) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = std::net::TcpStream::connect(host)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Ok(status)
}

pub fn rand_suffix() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..16).map(|_| char::from(b'a' + rng.gen_range(0..26u8))).collect()
}

/// One server shared by the tests of a test binary; killed when the binary exits.
pub fn shared_server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let server = TestServer::start("shared");
        let pid = server.child.as_ref().unwrap().id() as i32;
        SHARED_PID.store(pid, std::sync::atomic::Ordering::SeqCst);
        SHARED_DATA_DIR.get_or_init(|| server.data_dir.clone());
        extern "C" fn stop_shared() {
            let pid = SHARED_PID.load(std::sync::atomic::Ordering::SeqCst);
            if pid > 0 {
                // SAFETY: signalling and waiting for our own child; no memory is shared.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
            }
            if let Some(dir) = SHARED_DATA_DIR.get() {
                kill_leftover_sandboxes(dir);
                remove_data_dir(dir);
            }
        }
        // SAFETY: registering a plain extern "C" function without arguments.
        unsafe {
            libc::atexit(stop_shared);
        }
        server
    })
}

static SHARED_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
static SHARED_DATA_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Creates a sandbox with a unique name (prefix + random) and small limits.
pub async fn create(client: &Client, prefix: &str) -> Sandbox {
    create_with(
        client,
        prefix,
        ResourceRequest {
            cpu: Some(1.0),
            memory_mb: Some(256),
            memory_max_mb: None,
            pids: Some(256),
            disk_mb: None,
        },
    )
    .await
}

pub async fn create_with(client: &Client, prefix: &str, resources: ResourceRequest) -> Sandbox {
    let request = CreateSandboxRequest {
        name: Some(format!("{prefix}-{}", &rand_suffix()[..8])),
        resources: Some(resources),
        ..Default::default()
    };
    client.create_sandbox(&request).await.expect("create sandbox")
}

/// Runs a shell command line.
pub async fn sh(client: &Client, sandbox: &str, script: &str) -> ExecResult {
    client
        .exec(
            sandbox,
            &ExecRequest {
                shell: Some(script.into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|error| panic!("exec {script:?} failed: {error}"))
}

/// Everything the host holds for a sandbox, to prove that nothing is left after it is gone.
pub fn leftovers(server: &TestServer, id: &str) -> Vec<String> {
    let mut found = Vec::new();
    if server.sandbox_dir(id).exists() {
        found.push(format!("directory {}", server.sandbox_dir(id).display()));
    }
    for hierarchy in ["memory", "cpu", "cpuacct", "pids", "freezer", "unified", ""] {
        let dir = Path::new("/sys/fs/cgroup").join(hierarchy).join("nook").join(id);
        if dir.exists() {
            found.push(format!("cgroup {}", dir.display()));
        }
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in mountinfo.lines().filter(|line| line.contains(id)) {
        found.push(format!("mount {line}"));
    }
    // Processes: anything whose cgroup or root lives in the sandbox.
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let root = std::fs::read_link(format!("/proc/{pid}/root"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let zombie = status
            .lines()
            .any(|line| line.starts_with("State:") && line.contains('Z'));
        if !zombie && (cgroup.contains(id) || root.contains(id)) {
            found.push(format!("process {pid}"));
        }
    }
    found
}

/// Peak resident memory (`VmHWM`) of a process, in MiB.
pub fn peak_rss_mib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/<pid>/status");
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

/// Waits (bounded) until `check` holds, re-reading every 50 ms.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
