//! A registry for the tests: Debian's `docker-registry` (the CNCF distribution server) started on a loopback port
//! with its storage in a scratch directory and, optionally, htpasswd authentication; and a minimal client that pushes
//! a fixture image into it over the distribution API, as `docker push` would.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::fixture_image::{digest, Blobs, FixtureImage};

/// The test user and password, and the password's bcrypt hash (what htpasswd files hold).
pub const USER: &str = "nook-test";
pub const PASSWORD: &str = "nook-test-password";
const PASSWORD_BCRYPT: &str = "$2b$04$9K.30Z47NZwDA1pe2pQgeuom/repPHrNZLLMa2oWcJGNoXv9jhmqe";

/// A running registry.
pub struct TestRegistry {
    /// `127.0.0.1:<port>`.
    pub host: String,
    pub dir: PathBuf,
    child: Child,
    http: reqwest::Client,
}

impl TestRegistry {
    /// Starts a registry that requires [`USER`]/[`PASSWORD`].
    pub fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("nook-registry-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("storage")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let host = format!("127.0.0.1:{port}");
        std::fs::write(dir.join("htpasswd"), format!("{USER}:{PASSWORD_BCRYPT}\n")).unwrap();
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    \
             rootdirectory: {storage}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\nauth:\n  htpasswd:\n    \
             realm: nook-test\n    path: {htpasswd}\n",
            storage = dir.join("storage").display(),
            htpasswd = dir.join("htpasswd").display(),
        );
        std::fs::write(dir.join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting docker-registry (Debian's docker-registry package; scripts/setup.sh installs it)");
        let registry = Self {
            host,
            dir,
            child,
            http: reqwest::Client::new(),
        };
        registry.wait_ready();
        registry
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&self.host).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The registry's log (its access log counts requests).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }

    /// How many times a blob was fetched.
    pub fn blob_fetches(&self, blob_digest: &str) -> usize {
        self.log()
            .lines()
            .filter(|line| line.contains("\"GET ") && line.contains(&format!("/blobs/{blob_digest}")))
            .count()
    }

    /// Where the registry keeps a blob's bytes.
    pub fn blob_path(&self, blob_digest: &str) -> PathBuf {
        let hex = &blob_digest["sha256:".len()..];
        self.dir
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Pushes `image` as `repository:tag` (monolithic blob uploads, then the manifest); returns the manifest digest.
    pub async fn push(&self, repository: &str, tag: &str, image: &FixtureImage) -> String {
        self.push_blobs(repository, tag, &image.blobs()).await
    }

    /// Pushes an image's blobs as `repository:tag`; returns the manifest digest.
    pub async fn push_blobs(&self, repository: &str, tag: &str, blobs: &Blobs) -> String {
        let base = format!("http://{}/v2/{repository}", self.host);
        for blob in blobs.layers.iter().chain([&blobs.config]) {
            let started = self
                .http
                .post(format!("{base}/blobs/uploads/"))
                .basic_auth(USER, Some(PASSWORD))
                .send()
                .await
                .unwrap();
            assert_eq!(
                started.status().as_u16(),
                202,
                "starting an upload: {}",
                started.text().await.unwrap()
            );
            let location = started.headers()["location"].to_str().unwrap().to_string();
            let location = if location.starts_with("http") {
                location
            } else {
                format!("http://{}{location}", self.host)
            };
            let separator = if location.contains('?') { '&' } else { '?' };
            let finished = self
                .http
                .put(format!("{location}{separator}digest={}", digest(blob)))
                .basic_auth(USER, Some(PASSWORD))
                .header("content-type", "application/octet-stream")
                .body(blob.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(
                finished.status().as_u16(),
                201,
                "finishing an upload: {}",
                finished.text().await.unwrap()
            );
        }
        let stored = self
            .http
            .put(format!("{base}/manifests/{tag}"))
            .basic_auth(USER, Some(PASSWORD))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(blobs.manifest.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            stored.status().as_u16(),
            201,
            "storing the manifest: {}",
            stored.text().await.unwrap()
        );
        digest(&blobs.manifest)
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
