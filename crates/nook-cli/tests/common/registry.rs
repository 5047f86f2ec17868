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
    /// Starts a registry that requires [`USER`]/[`PASSWORD`], over plain HTTP.
    pub fn start(name: &str) -> Self {
        Self::start_with(name, false)
    }

    /// Starts a registry that requires [`USER`]/[`PASSWORD`], over HTTPS with a certificate for 127.0.0.1 from a CA
    /// made for the test (its PEM is [`TestRegistry::ca_path`]).
    pub fn start_tls(name: &str) -> Self {
        Self::start_with(name, true)
    }

    /// The test CA's certificate (HTTPS registries only).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn start_with(name: &str, tls: bool) -> Self {
        let dir = std::env::temp_dir().join(format!("nook-registry-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("storage")).unwrap();
        let host = format!("127.0.0.1:{}", super::free_port());
        std::fs::write(dir.join("htpasswd"), format!("{USER}:{PASSWORD_BCRYPT}\n")).unwrap();
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    \
             rootdirectory: {storage}\n  delete:\n    enabled: true\nauth:\n  htpasswd:\n    realm: nook-test\n    \
             path: {htpasswd}\nhttp:\n  addr: {host}\n",
            storage = dir.join("storage").display(),
            htpasswd = dir.join("htpasswd").display(),
        );
        let config = if tls {
            make_certificates(&dir);
            format!(
                "{config}  tls:\n    certificate: {}\n    key: {}\n",
                dir.join("server.pem").display(),
                dir.join("server.key").display()
            )
        } else {
            config
        };
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
                .expect(
                    self.http.post(format!("{base}/blobs/uploads/")),
                    202,
                    "starting an upload",
                )
                .await;
            let location = started.headers()["location"].to_str().unwrap().to_string();
            let location = if location.starts_with("http") {
                location
            } else {
                format!("http://{}{location}", self.host)
            };
            let separator = if location.contains('?') { '&' } else { '?' };
            let finish = self
                .http
                .put(format!("{location}{separator}digest={}", digest(blob)))
                .header("content-type", "application/octet-stream")
                .body(blob.clone());
            self.expect(finish, 201, "finishing an upload").await;
        }
        let manifest = self
            .http
            .put(format!("{base}/manifests/{tag}"))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(blobs.manifest.clone());
        self.expect(manifest, 201, "storing the manifest").await;
        digest(&blobs.manifest)
    }

    /// Sends `request` with the test credentials and checks the status.
    async fn expect(&self, request: reqwest::RequestBuilder, status: u16, what: &str) -> reqwest::Response {
        let response = request.basic_auth(USER, Some(PASSWORD)).send().await.unwrap();
        if response.status().as_u16() != status {
            panic!(
                "{what}: {} {}",
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
        response
    }
}

/// A CA and a server certificate for 127.0.0.1 signed by it, made with the openssl command.
fn make_certificates(dir: &std::path::Path) {
    let openssl = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("running openssl (Debian's openssl package)");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        &[
            &["req", "-x509"],
            &ec[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=nook test CA",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"],
            &ec[..],
            &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
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
