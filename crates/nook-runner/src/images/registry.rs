//! Pulling images from registries that speak the OCI distribution API (Docker Registry HTTP API v2).
//!
//! A pull resolves the reference to a manifest (through an index, choosing this host's platform), fetches the config,
//! and then streams each layer that the store does not already hold straight into the unpacker: the blob is never
//! written to disk or held in memory as a whole. Every document and blob is verified against its digest, and every
//! unpacked layer against the config's `diff_ids`, before the image is committed; a failed pull leaves nothing.
//!
//! Downloads resume: when a connection breaks mid-blob, the next attempt asks for the rest with a `Range` header
//! (or skips what it already had when the registry ignores ranges), so the unpacker upstream never notices.
//! Authentication follows the registry's `WWW-Authenticate` challenge: anonymous, HTTP basic, or a bearer token from
//! the registry's token service (with the configured credentials, when there are any); tokens are cached per
//! repository. Credentials come from the server's configuration and never appear in logs or errors. Two pulls of
//! images that share a layer download it once: the second waits for the first and then finds it in the store.

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use nook_api::{Image, TransferEvent, TransferLayer};
use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, RANGE, WWW_AUTHENTICATE};
use reqwest::StatusCode;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::oci::{self, ConfigFile, Descriptor, Index, Manifest};
use super::unpack::HashingReader;
use super::{ImageError, ImageStore, LayerPin, TempLayer};

/// The largest manifest, index or config accepted.
const MAX_DOCUMENT_BYTES: usize = 4 << 20;
/// How many layers download at once.
const PARALLEL_LAYERS: usize = 3;
/// Attempts per request before a pull gives up.
const ATTEMPTS: u32 = 5;
/// How often progress is reported per layer, at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// What manifests nook can read, in the order it prefers them.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Why talking to a registry failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference cannot be parsed.
    #[error("{0}")]
    InvalidReference(String),
    /// The registry could not be reached.
    #[error("cannot reach registry {registry}")]
    Unreachable {
        /// Host of the registry.
        registry: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The registry refused access.
    #[error("registry {registry} refused access to {repository}{hint}")]
    Unauthorized {
        /// Host of the registry.
        registry: String,
        /// The repository.
        repository: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// The image or blob is not there.
    #[error("{what} does not exist in registry {registry}")]
    NotFound {
        /// Host of the registry.
        registry: String,
        /// What was asked for.
        what: String,
    },
    /// Any other answer that is not success.
    #[error("registry {registry} answered {status} for {what}{message}")]
    Status {
        /// Host of the registry.
        registry: String,
        /// What was asked for.
        what: String,
        /// The HTTP status.
        status: StatusCode,
        /// The registry's own explanation, when it gave one.
        message: String,
    },
    /// A document is larger than nook accepts.
    #[error("the {what} from registry {registry} is larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge {
        /// Host of the registry.
        registry: String,
        /// Which document.
        what: String,
    },
    /// What the registry served is malformed or does not verify; nothing of it was stored.
    #[error("the image from registry {registry} is malformed or corrupt; nothing was stored")]
    BadImage {
        /// Host of the registry.
        registry: String,
        /// What is wrong with it.
        #[source]
        source: Box<ImageError>,
    },
    /// A configured CA certificate file cannot be used.
    #[error("the registry CA certificate file {path} cannot be used: {reason}")]
    CaCertificate {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// A blob's download broke and could not be resumed.
    #[error("downloading {what} from registry {registry} failed after {ATTEMPTS} attempts")]
    Download {
        /// Host of the registry.
        registry: String,
        /// Which blob.
        what: String,
        /// The last error.
        #[source]
        source: io::Error,
    },
}

/// A parsed image reference: `registry/repository[:tag][@digest]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry host, with its port if any.
    pub registry: String,
    /// Repository path.
    pub repository: String,
    /// Tag (defaults to `latest` when neither tag nor digest is given).
    pub tag: Option<String>,
    /// Manifest digest.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses `text`. A reference whose first component is not a host (it has no `.` or `:` and is not
    /// `localhost`) is in `default_registry`, when one is configured.
    pub fn parse(text: &str, default_registry: Option<&str>) -> Result<Self, RegistryError> {
        let invalid =
            |why: &str| RegistryError::InvalidReference(format!("image reference {text:?} is invalid: {why}"));
        if text.is_empty() || text.len() > 255 {
            return Err(invalid("it must be 1 to 255 characters"));
        }
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => {
                oci::digest_hex(digest).map_err(|_| invalid("the digest must be sha256: and 64 hex digits"))?;
                (rest, Some(digest.to_string()))
            }
            None => (text, None),
        };
        let (path, tag) = match rest.rsplit_once(':') {
            Some((path, tag)) if !tag.contains('/') => (path, Some(tag.to_string())),
            _ => (rest, None),
        };
        let (registry, repository) =
            match path.split_once('/') {
                Some((first, repository)) if first.contains(['.', ':']) || first == "localhost" => {
                    (first.to_string(), repository.to_string())
                }
                _ => match default_registry {
                    Some(registry) => (registry.to_string(), path.to_string()),
                    None => return Err(invalid(
                        "it names no registry; write host[:port]/repository[:tag] (or configure a default registry)",
                    )),
                },
            };
        let valid_repository = !repository.is_empty()
            && repository.split('/').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
                    && part.as_bytes()[0].is_ascii_alphanumeric()
            });
        if !valid_repository {
            return Err(invalid(
                "the repository must be lowercase letters, digits and . _ - separated by /",
            ));
        }
        let valid_registry = registry
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
        if !valid_registry {
            return Err(invalid("the registry host has characters a host cannot have"));
        }
        if let Some(tag) = &tag {
            let valid = tag.len() <= 128
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
                && !tag.starts_with(['.', '-']);
            if !valid {
                return Err(invalid("the tag must be up to 128 letters, digits and _ . -"));
            }
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// What to ask the manifest endpoint for: the digest when there is one, else the tag.
    fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .expect("a parsed reference has a tag or a digest")
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Credentials for one registry host.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryCredentials {
    /// Registry host, with its port if any.
    pub host: String,
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("host", &self.host)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// How the runner reaches registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// Credentials by host.
    pub credentials: Vec<RegistryCredentials>,
    /// Hosts that may be spoken to over plain HTTP when they do not answer HTTPS (loopback hosts always may).
    pub insecure: Vec<String>,
    /// Registry of references that name none.
    pub default_registry: Option<String>,
    /// PEM files of extra CA certificates to trust (registries with a private CA), besides the system's roots.
    pub ca_certificates: Vec<std::path::PathBuf>,
}

/// What a request does to a repository (token services scope tokens by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Access {
    Pull,
    Push,
}

impl Access {
    fn scope(self) -> &'static str {
        match self {
            Self::Pull => "pull",
            Self::Push => "pull,push",
        }
    }
}

/// The registry client of one runner.
pub struct Registries {
    http: reqwest::Client,
    config: RegistryConfig,
    /// `Authorization` header values per (registry, repository, access), learned from challenges.
    authorizations: Mutex<HashMap<(String, String, Access), String>>,
    /// One lock per layer being fetched, so concurrent pulls download a shared layer once.
    layer_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The scheme each loopback or insecure registry answered on.
    schemes: Mutex<HashMap<String, &'static str>>,
}

impl Registries {
    /// A client with these settings.
    pub fn new(config: RegistryConfig) -> Result<Self, RegistryError> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("nook/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(60));
        // The system's roots are always trusted; these are added for registries with a private CA.
        for path in &config.ca_certificates {
            let pem = std::fs::read(path).map_err(|error| RegistryError::CaCertificate {
                path: path.clone(),
                reason: error.to_string(),
            })?;
            let certificates =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|error| RegistryError::CaCertificate {
                    path: path.clone(),
                    reason: error.to_string(),
                })?;
            if certificates.is_empty() {
                return Err(RegistryError::CaCertificate {
                    path: path.clone(),
                    reason: "it holds no PEM certificate".into(),
                });
            }
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let http = builder.build().expect("the HTTP client's settings are valid");
        Ok(Self {
            http,
            config,
            authorizations: Mutex::new(HashMap::new()),
            layer_locks: Mutex::new(HashMap::new()),
            schemes: Mutex::new(HashMap::new()),
        })
    }

    /// Parses a reference with the configured default registry.
    pub fn parse_reference(&self, text: &str) -> Result<Reference, RegistryError> {
        Reference::parse(text, self.config.default_registry.as_deref())
    }

    /// The API root of a registry. Registries are spoken to over HTTPS; a loopback registry or one listed as
    /// insecure is probed once with HTTPS and spoken to over plain HTTP when that fails, as Docker does.
    pub(super) async fn base_url(&self, registry: &str) -> String {
        let host = registry.rsplit_once(':').map_or(registry, |(host, _)| host);
        let loopback = host == "localhost" || host.starts_with("127.") || host == "[::1]";
        if !loopback && !self.config.insecure.iter().any(|insecure| insecure == registry) {
            return format!("https://{registry}/v2");
        }
        let known = self.schemes.lock().expect("schemes").get(registry).copied();
        let scheme = match known {
            Some(scheme) => scheme,
            None => {
                let probe = self
                    .http
                    .get(format!("https://{registry}/v2/"))
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                let scheme = if probe.is_ok() { "https" } else { "http" };
                self.schemes
                    .lock()
                    .expect("schemes")
                    .insert(registry.to_string(), scheme);
                scheme
            }
        };
        format!("{scheme}://{registry}/v2")
    }

    /// Pulls `reference` into `store` as image `name`, reporting progress on `events`.
    pub async fn pull(
        self: &Arc<Self>,
        store: &Arc<ImageStore>,
        reference: &Reference,
        name: &str,
        events: &mpsc::Sender<TransferEvent>,
    ) -> Result<Image, ImageError> {
        // What the registry served and does not verify or unpack is the registry's failure, not the caller's.
        self.pull_verified(store, reference, name, events)
            .await
            .map_err(|error| match error {
                ImageError::Format(_) | ImageError::Unpack(_) => RegistryError::BadImage {
                    registry: reference.registry.clone(),
                    source: Box::new(error),
                }
                .into(),
                other => other,
            })
    }

    async fn pull_verified(
        self: &Arc<Self>,
        store: &Arc<ImageStore>,
        reference: &Reference,
        name: &str,
        events: &mpsc::Sender<TransferEvent>,
    ) -> Result<Image, ImageError> {
        let (manifest_digest, manifest) = self.resolve(reference).await?;
        let config_bytes = self.document(reference, &manifest.config.digest, "config").await?;
        oci::verify("config", &manifest.config.digest, &config_bytes)?;
        let config: ConfigFile = oci::parse("config", &config_bytes)?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(oci::FormatError::Invalid(format!(
                "the image config lists {} layers but the manifest has {}",
                config.rootfs.diff_ids.len(),
                manifest.layers.len()
            ))
            .into());
        }
        let layers: Vec<(Descriptor, String)> = manifest
            .layers
            .iter()
            .cloned()
            .zip(config.rootfs.diff_ids.iter().cloned())
            .collect();
        let _ = events
            .send(TransferEvent::Resolved {
                reference: reference.to_string(),
                digest: manifest_digest.clone(),
                layers: layers
                    .iter()
                    .map(|(descriptor, diff_id)| TransferLayer {
                        digest: descriptor.digest.clone(),
                        size: descriptor.size,
                        present: store.layer_dir(diff_id).exists(),
                    })
                    .collect(),
            })
            .await;
        let fetches = layers.into_iter().map(|(descriptor, diff_id)| {
            let (registries, store, reference, events) =
                (self.clone(), store.clone(), reference.clone(), events.clone());
            async move {
                registries
                    .fetch_layer(&store, &reference, &descriptor, &diff_id, &events)
                    .await
            }
        });
        let fetched: Vec<Result<(u64, LayerPin), ImageError>> =
            futures::stream::iter(fetches).buffered(PARALLEL_LAYERS).collect().await;
        let mut size_bytes = 0;
        // The layers stay pinned against garbage collection until the image that names them is committed.
        let mut pins = Vec::new();
        for result in fetched {
            let (size, pin) = result?;
            size_bytes += size;
            pins.push(pin);
        }
        let diff_ids = config.rootfs.diff_ids.clone();
        let store = store.clone();
        let name = name.to_string();
        let image_config = oci::image_config(&config);
        let committed = tokio::task::spawn_blocking(move || {
            store.commit(&name, &manifest_digest, diff_ids, size_bytes, image_config)
        })
        .await
        .expect("committing an image does not panic");
        drop(pins);
        committed
    }

    /// Fetches the manifest for this host's platform, following an index; returns its digest and the manifest.
    async fn resolve(&self, reference: &Reference) -> Result<(String, Manifest), ImageError> {
        let mut wanted = reference.manifest_reference().to_string();
        for _ in 0..4 {
            let (bytes, media_type) = self.manifest(reference, &wanted).await?;
            let digest = oci::sha256_digest(&bytes);
            if wanted.starts_with("sha256:") {
                oci::verify("manifest", &wanted, &bytes)?;
            }
            let is_index = oci::is_index(&media_type) || {
                // Some registries omit the content type; an index has `manifests`, a manifest has `layers`.
                media_type.is_empty() && serde_json::from_slice::<Index>(&bytes).is_ok()
            };
            if is_index {
                let index: Index = oci::parse("index", &bytes)?;
                wanted = oci::select_manifest(&index, &oci::host_platform())?.digest.clone();
                continue;
            }
            let manifest: Manifest = oci::parse("manifest", &bytes)?;
            oci::check_manifest(&manifest)?;
            return Ok((digest, manifest));
        }
        Err(oci::FormatError::Invalid(format!("the indexes of {reference} nest too deep")).into())
    }

    async fn manifest(&self, reference: &Reference, wanted: &str) -> Result<(Vec<u8>, String), RegistryError> {
        let url = format!(
            "{}/{}/manifests/{wanted}",
            self.base_url(&reference.registry).await,
            reference.repository
        );
        let what = format!("manifest {}:{wanted}", reference.repository);
        let response = self.get(reference, &url, Some(MANIFEST_ACCEPT), None, &what).await?;
        let media_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(|value| value.split(';').next().unwrap_or_default().trim().to_string())
            .unwrap_or_default();
        let bytes = read_bounded(response, &reference.registry, &what).await?;
        Ok((bytes, media_type))
    }

    async fn document(&self, reference: &Reference, digest: &str, what: &str) -> Result<Vec<u8>, ImageError> {
        oci::digest_hex(digest)?;
        let url = format!(
            "{}/{}/blobs/{digest}",
            self.base_url(&reference.registry).await,
            reference.repository
        );
        let what = format!("{what} {digest}");
        let response = self.get(reference, &url, None, None, &what).await?;
        Ok(read_bounded(response, &reference.registry, &what).await?)
    }

    /// Downloads, verifies and unpacks one layer into the store unless the store has it; returns its size and a pin
    /// that keeps it from garbage collection until the image is committed.
    async fn fetch_layer(
        self: &Arc<Self>,
        store: &Arc<ImageStore>,
        reference: &Reference,
        descriptor: &Descriptor,
        diff_id: &str,
        events: &mpsc::Sender<TransferEvent>,
    ) -> Result<(u64, LayerPin), ImageError> {
        oci::digest_hex(diff_id)?;
        let lock = {
            let mut locks = self.layer_locks.lock().expect("layer locks");
            locks.entry(diff_id.to_string()).or_default().clone()
        };
        let _only_one_download = lock.lock().await;
        if store.layer_dir(diff_id).exists() {
            let pin = store.pin(diff_id);
            let size = store.layer_size(diff_id);
            let _ = events
                .send(TransferEvent::LayerDone {
                    layer: descriptor.digest.clone(),
                })
                .await;
            return Ok((size, pin));
        }
        let (chunks, receiver) = mpsc::channel::<io::Result<Bytes>>(16);
        let download = {
            let registries = self.clone();
            let reference = reference.clone();
            let descriptor = descriptor.clone();
            let events = events.clone();
            tokio::spawn(async move { registries.download(&reference, &descriptor, chunks, &events).await })
        };
        let unpacking = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || -> Result<(TempLayer, String), ImageError> {
                let mut reader = HashingReader::new(ChannelReader::new(receiver));
                let layer = store.unpack_temp_layer(&mut reader)?;
                io::copy(&mut reader, &mut io::sink())
                    .map_err(|error| ImageError::Unpack(super::tar_stream::TarError::Io(error).into()))?;
                Ok((layer, reader.finish()))
            })
        };
        let unpacked = unpacking.await.expect("unpacking a layer does not panic");
        let downloaded = download.await.expect("downloading a layer does not panic");
        // A broken download explains a broken unpack better than the unpacker's view of a cut stream.
        downloaded?;
        let (layer, blob_digest) = unpacked?;
        if blob_digest != descriptor.digest {
            return Err(oci::FormatError::DigestMismatch {
                what: format!("layer blob from {reference}"),
                expected: descriptor.digest.clone(),
                actual: blob_digest,
            }
            .into());
        }
        if layer.diff_id != diff_id {
            return Err(oci::FormatError::DigestMismatch {
                what: format!("uncompressed layer {}", descriptor.digest),
                expected: diff_id.to_string(),
                actual: layer.diff_id.clone(),
            }
            .into());
        }
        let size = layer.size_bytes;
        // Adopted while the layer's lock is held, so a pull waiting for it finds it in the store.
        let pin = store.adopt(layer)?;
        let _ = events
            .send(TransferEvent::LayerDone {
                layer: descriptor.digest.clone(),
            })
            .await;
        Ok((size, pin))
    }

    /// Streams a blob into `chunks`, resuming after broken connections; never more than the descriptor's size.
    async fn download(
        &self,
        reference: &Reference,
        descriptor: &Descriptor,
        chunks: mpsc::Sender<io::Result<Bytes>>,
        events: &mpsc::Sender<TransferEvent>,
    ) -> Result<(), RegistryError> {
        let url = format!(
            "{}/{}/blobs/{}",
            self.base_url(&reference.registry).await,
            reference.repository,
            descriptor.digest
        );
        let what = format!("layer {}", descriptor.digest);
        let mut received: u64 = 0;
        let mut last_report = Instant::now();
        let mut failures = 0;
        loop {
            let range = (received > 0).then(|| format!("bytes={received}-"));
            let result: Result<(), io::Error> = async {
                let response = self
                    .get(reference, &url, None, range.as_deref(), &what)
                    .await
                    .map_err(io::Error::other)?;
                // A registry that ignores the range sends the blob from its start: skip what was already passed on.
                let mut skip = if response.status() == StatusCode::PARTIAL_CONTENT {
                    0
                } else {
                    received
                };
                let mut body = response.bytes_stream();
                while let Some(chunk) = body.next().await {
                    let mut chunk = chunk.map_err(io::Error::other)?;
                    if skip > 0 {
                        let dropped = skip.min(chunk.len() as u64);
                        chunk = chunk.slice(dropped as usize..);
                        skip -= dropped;
                    }
                    if chunk.is_empty() {
                        continue;
                    }
                    received += chunk.len() as u64;
                    if received > descriptor.size {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "the blob is longer than the {} bytes its descriptor says",
                                descriptor.size
                            ),
                        ));
                    }
                    if chunks.send(Ok(chunk)).await.is_err() {
                        // The unpacker stopped (and says why); nothing more to fetch.
                        return Ok(());
                    }
                    if last_report.elapsed() >= PROGRESS_EVERY {
                        last_report = Instant::now();
                        let _ = events.try_send(TransferEvent::Progress {
                            layer: descriptor.digest.clone(),
                            transferred: received,
                            size: descriptor.size,
                        });
                    }
                }
                Ok(())
            }
            .await;
            match result {
                Ok(()) if received < descriptor.size && !chunks.is_closed() => {
                    failures += 1;
                    if failures >= ATTEMPTS {
                        let error = io::Error::new(io::ErrorKind::UnexpectedEof, "the registry ended the blob early");
                        return Err(self.give_up(reference, &what, error, &chunks).await);
                    }
                }
                Ok(()) => return Ok(()),
                Err(error) if error.kind() == io::ErrorKind::InvalidData => {
                    return Err(self.give_up(reference, &what, error, &chunks).await);
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(registry = %reference.registry, %what, received, %error, "a download broke; resuming");
                    if failures >= ATTEMPTS {
                        return Err(self.give_up(reference, &what, error, &chunks).await);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250 << failures.min(5))).await;
        }
    }

    async fn give_up(
        &self,
        reference: &Reference,
        what: &str,
        error: io::Error,
        chunks: &mpsc::Sender<io::Result<Bytes>>,
    ) -> RegistryError {
        let _ = chunks
            .send(Err(io::Error::other(format!("the download of {what} failed"))))
            .await;
        RegistryError::Download {
            registry: reference.registry.clone(),
            what: what.to_string(),
            source: error,
        }
    }

    /// A GET with the repository's pull authorization.
    async fn get(
        &self,
        reference: &Reference,
        url: &str,
        accept: Option<&str>,
        range: Option<&str>,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        self.send(reference, Access::Pull, what, |http| {
            let mut request = http.get(url);
            if let Some(accept) = accept {
                request = request.header(ACCEPT, accept);
            }
            if let Some(range) = range {
                request = request.header(RANGE, range);
            }
            request
        })
        .await
    }

    /// Sends the request `build` makes with the repository's authorization for `access`, answering one
    /// authentication challenge (so `build` may be called twice). Anything but success is an error.
    pub(super) async fn send(
        &self,
        reference: &Reference,
        access: Access,
        what: &str,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, RegistryError> {
        let key = (reference.registry.clone(), reference.repository.clone(), access);
        let mut challenged = false;
        loop {
            let authorization = self.authorizations.lock().expect("authorizations").get(&key).cloned();
            let mut request = build(&self.http);
            if let Some(value) = &authorization {
                request = request.header(AUTHORIZATION, value);
            }
            let response = request.send().await.map_err(unreachable(&reference.registry))?;
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            if status == StatusCode::UNAUTHORIZED && !challenged {
                challenged = true;
                let authorization = self.answer_challenge(reference, access, response.headers()).await?;
                self.authorizations
                    .lock()
                    .expect("authorizations")
                    .insert(key.clone(), authorization);
                continue;
            }
            return Err(self.failure(reference, what, response).await);
        }
    }

    /// Works out how to authenticate from a 401's `WWW-Authenticate`.
    async fn answer_challenge(
        &self,
        reference: &Reference,
        access: Access,
        headers: &HeaderMap,
    ) -> Result<String, RegistryError> {
        let credentials = self
            .config
            .credentials
            .iter()
            .find(|credentials| credentials.host == reference.registry);
        let unauthorized = |hint| RegistryError::Unauthorized {
            registry: reference.registry.clone(),
            repository: reference.repository.clone(),
            hint,
        };
        let challenge = headers
            .get(WWW_AUTHENTICATE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        let (scheme, parameters) = challenge.split_once(' ').unwrap_or((challenge, ""));
        let basic = credentials.map(|credentials| {
            use base64::Engine;
            let pair = format!("{}:{}", credentials.username, credentials.password);
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
        });
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => {
                basic.ok_or_else(|| unauthorized("; it asks for credentials, and the server config has none for it"))
            }
            "bearer" => {
                let parameters = challenge_parameters(parameters);
                let realm = parameters
                    .get("realm")
                    .ok_or_else(|| unauthorized("; its token challenge names no realm"))?;
                let scope = format!("repository:{}:{}", reference.repository, access.scope());
                let mut request = self.http.get(realm.as_str()).query(&[("scope", scope.as_str())]);
                if let Some(service) = parameters.get("service") {
                    request = request.query(&[("service", service.as_str())]);
                }
                if let Some(basic) = &basic {
                    request = request.header(AUTHORIZATION, basic);
                }
                let response = request.send().await.map_err(unreachable(&reference.registry))?;
                if !response.status().is_success() {
                    return Err(unauthorized(if credentials.is_some() {
                        "; its token service refused the configured credentials"
                    } else {
                        "; its token service wants credentials, and the server config has none for it"
                    }));
                }
                #[derive(Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let bytes = read_bounded(response, &reference.registry, "token").await?;
                let token: Token = serde_json::from_slice(&bytes)
                    .map_err(|_| unauthorized("; its token service answered something that is not a token"))?;
                let token = token
                    .token
                    .or(token.access_token)
                    .ok_or_else(|| unauthorized("; its token service answered without a token"))?;
                Ok(format!("Bearer {token}"))
            }
            _ => Err(unauthorized(
                "; it asks for an authentication scheme nook does not speak",
            )),
        }
    }

    /// Turns an unsuccessful answer into an error, with the registry's own message when it sent one.
    async fn failure(&self, reference: &Reference, what: &str, response: reqwest::Response) -> RegistryError {
        let status = response.status();
        if status == StatusCode::NOT_FOUND {
            return RegistryError::NotFound {
                registry: reference.registry.clone(),
                what: what.to_string(),
            };
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return RegistryError::Unauthorized {
                registry: reference.registry.clone(),
                repository: reference.repository.clone(),
                hint: if self.config.credentials.iter().any(|c| c.host == reference.registry) {
                    "; check the credentials in the server config"
                } else {
                    "; add credentials for it to the server config"
                },
            };
        }
        #[derive(Deserialize)]
        struct Errors {
            errors: Vec<ErrorItem>,
        }
        #[derive(Deserialize)]
        struct ErrorItem {
            #[serde(default)]
            message: String,
        }
        let body = read_bounded(response, &reference.registry, what)
            .await
            .unwrap_or_default();
        let message = serde_json::from_slice::<Errors>(&body)
            .ok()
            .and_then(|errors| errors.errors.into_iter().next())
            .map(|item| format!(": {}", item.message))
            .unwrap_or_default();
        RegistryError::Status {
            registry: reference.registry.clone(),
            what: what.to_string(),
            status,
            message,
        }
    }
}

fn unreachable(registry: &str) -> impl FnOnce(reqwest::Error) -> RegistryError + '_ {
    move |source| RegistryError::Unreachable {
        registry: registry.to_string(),
        source,
    }
}

/// Parses `key="value", key=value` pairs of an authentication challenge.
fn challenge_parameters(text: &str) -> HashMap<String, String> {
    let mut parameters = HashMap::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.split_once('"') {
                Some((value, after)) => (value.to_string(), after),
                None => (quoted.to_string(), ""),
            }
        } else {
            match after.split_once(',') {
                Some((value, after)) => (value.trim().to_string(), after),
                None => (after.trim().to_string(), ""),
            }
        };
        parameters.insert(key, value);
        rest = after.trim_start_matches([',', ' ']);
    }
    parameters
}

/// Reads a small response body, refusing more than [`MAX_DOCUMENT_BYTES`].
async fn read_bounded(response: reqwest::Response, registry: &str, what: &str) -> Result<Vec<u8>, RegistryError> {
    let too_large = || RegistryError::TooLarge {
        registry: registry.to_string(),
        what: what.to_string(),
    };
    if response
        .content_length()
        .is_some_and(|length| length > MAX_DOCUMENT_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = response.bytes_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(unreachable(registry))?;
        if bytes.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// A blocking reader over chunks sent by an async task.
struct ChannelReader {
    receiver: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl ChannelReader {
    fn new(receiver: mpsc::Receiver<io::Result<Bytes>>) -> Self {
        Self {
            receiver,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(error)) => return Err(error),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_with_registry_tag_and_digest() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let parsed = Reference::parse("localhost:5000/team/app:1.2", None).unwrap();
        assert_eq!(
            (
                parsed.registry.as_str(),
                parsed.repository.as_str(),
                parsed.tag.as_deref()
            ),
            ("localhost:5000", "team/app", Some("1.2"))
        );
        let by_digest = Reference::parse(&format!("registry.test/app@{digest}"), None).unwrap();
        assert_eq!(
            (by_digest.tag, by_digest.digest.as_deref()),
            (None, Some(digest.as_str()))
        );
        let latest = Reference::parse("localhost/app", None).unwrap();
        assert_eq!(latest.tag.as_deref(), Some("latest"));
        assert_eq!(latest.to_string(), "localhost/app:latest");
        let defaulted = Reference::parse("library/app:2", Some("mirror.test")).unwrap();
        assert_eq!(defaulted.to_string(), "mirror.test/library/app:2");
        for bad in [
            "app:1",
            "localhost:5000/App",
            "localhost:5000/app:-x",
            "localhost:5000/a//b",
            "x.test/app@sha256:12",
        ] {
            assert!(Reference::parse(bad, None).is_err(), "{bad} should be refused");
        }
        assert!(Reference::parse("app:1", None)
            .unwrap_err()
            .to_string()
            .contains("names no registry"));
    }

    #[test]
    fn challenges_parse() {
        let parameters = challenge_parameters(
            r#"realm="http://127.0.0.1:1/token",service="registry.test",scope="repository:a:pull""#,
        );
        assert_eq!(parameters["realm"], "http://127.0.0.1:1/token");
        assert_eq!(parameters["service"], "registry.test");
        assert_eq!(parameters["scope"], "repository:a:pull");
    }

    #[tokio::test]
    async fn registries_get_https_and_loopback_ones_fall_back_to_http() {
        let registries = Registries::new(RegistryConfig::default()).unwrap();
        // Not probed: a registry that is neither loopback nor insecure is HTTPS, always.
        assert_eq!(registries.base_url("registry.test").await, "https://registry.test/v2");
        // A loopback port that does not answer HTTPS (nothing listens there): plain HTTP, remembered.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let host = format!("127.0.0.1:{port}");
        assert_eq!(registries.base_url(&host).await, format!("http://{host}/v2"));
        assert_eq!(registries.schemes.lock().unwrap().get(&host), Some(&"http"));
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate").unwrap();
        let error = Registries::new(RegistryConfig {
            ca_certificates: vec![empty],
            ..Default::default()
        })
        .err()
        .expect("refused");
        assert!(error.to_string().contains("cannot be used"), "{error}");
    }

    #[test]
    fn credentials_never_print_their_password() {
        let credentials = RegistryCredentials {
            host: "h".into(),
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{credentials:?}").contains("hunter2"));
    }
}

/// A registry on loopback that behaves like the big ones: a bearer-token service behind a `WWW-Authenticate`
/// challenge, and a blob download that breaks halfway once.
#[cfg(test)]
mod mock_registry_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::body::Body;
    use axum::extract::{Path, Query, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use axum::Router;

    use super::*;
    use crate::images::test_support::{gzip, tar_of};

    struct Mock {
        host: String,
        manifest: Vec<u8>,
        config: Vec<u8>,
        layer: Vec<u8>,
        blob_requests: AtomicUsize,
        ranges: Mutex<Vec<String>>,
    }

    fn authorized(headers: &HeaderMap) -> bool {
        headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer good-token")
    }

    fn challenge(mock: &Mock) -> Response {
        (
            StatusCode::UNAUTHORIZED,
            [(
                "www-authenticate",
                format!(r#"Bearer realm="http://{}/token",service="mock""#, mock.host),
            )],
        )
            .into_response()
    }

    async fn serve_token(headers: HeaderMap, Query(query): Query<HashMap<String, String>>) -> Response {
        use base64::Engine;
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("agent:s3cret")
        );
        let scoped = query.get("scope").map(String::as_str) == Some("repository:team/app:pull")
            && query.get("service").map(String::as_str) == Some("mock");
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) || !scoped {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        r#"{"token":"good-token"}"#.into_response()
    }

    async fn serve_manifest(State(mock): State<Arc<Mock>>, headers: HeaderMap) -> Response {
        if !authorized(&headers) {
            return challenge(&mock);
        }
        ([("content-type", oci::MEDIA_OCI_MANIFEST)], mock.manifest.clone()).into_response()
    }

    async fn serve_blob(State(mock): State<Arc<Mock>>, headers: HeaderMap, Path(digest): Path<String>) -> Response {
        if !authorized(&headers) {
            return challenge(&mock);
        }
        if digest == oci::sha256_digest(&mock.config) {
            return mock.config.clone().into_response();
        }
        let first = mock.blob_requests.fetch_add(1, Ordering::SeqCst) == 0;
        if let Some(range) = headers.get("range").and_then(|v| v.to_str().ok()) {
            mock.ranges.lock().unwrap().push(range.to_string());
            let start: usize = range
                .trim_start_matches("bytes=")
                .trim_end_matches('-')
                .parse()
                .unwrap();
            return (StatusCode::PARTIAL_CONTENT, mock.layer[start..].to_vec()).into_response();
        }
        if !first {
            return mock.layer.clone().into_response();
        }
        // Half the blob, then a broken connection.
        let half = Bytes::from(mock.layer[..mock.layer.len() / 2].to_vec());
        let chunks: Vec<Result<Bytes, io::Error>> = vec![Ok(half), Err(io::Error::other("connection reset"))];
        Response::builder()
            .header("content-length", mock.layer.len())
            // The error comes a moment later, once the first half is surely on the wire.
            .body(Body::from_stream(futures::stream::iter(chunks).then(
                |chunk| async move {
                    if chunk.is_err() {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    chunk
                },
            )))
            .unwrap()
    }

    #[tokio::test]
    async fn a_bearer_token_is_fetched_and_a_broken_download_resumes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        // Incompressible data, so that the gzip blob is large enough to break in the middle.
        let noise: Vec<u8> = (0..400_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let layer_tar = tar_of(&[("data/noise", &noise)]);
        let layer = gzip(&layer_tar);
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": {"Env": ["A=1"]},
            "rootfs": {"type": "layers", "diff_ids": [oci::sha256_digest(&layer_tar)]},
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": oci::MEDIA_OCI_MANIFEST,
            "config": {"mediaType": oci::MEDIA_OCI_CONFIG, "digest": oci::sha256_digest(&config), "size": config.len()},
            "layers": [{"mediaType": oci::MEDIA_OCI_LAYER_GZIP, "digest": oci::sha256_digest(&layer), "size": layer.len()}],
        }))
        .unwrap();
        let mock = Arc::new(Mock {
            host: host.clone(),
            manifest,
            config,
            layer,
            blob_requests: AtomicUsize::new(0),
            ranges: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/token", get(serve_token))
            .route("/v2/team/app/manifests/{reference}", get(serve_manifest))
            .route("/v2/team/app/blobs/{digest}", get(serve_blob))
            .with_state(mock.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ImageStore::open(dir.path()).unwrap());
        let registries = Arc::new(
            Registries::new(RegistryConfig {
                credentials: vec![RegistryCredentials {
                    host: host.clone(),
                    username: "agent".into(),
                    password: "s3cret".into(),
                }],
                ..Default::default()
            })
            .unwrap(),
        );
        let reference = registries.parse_reference(&format!("{host}/team/app:1")).unwrap();
        let (events, mut received) = mpsc::channel(64);
        let image = registries
            .pull(&store, &reference, "app", &events)
            .await
            .expect("the pull succeeds");
        drop(events);
        assert_eq!(image.layers, [oci::sha256_digest(&layer_tar)]);
        assert_eq!(image.config.env, ["A=1"]);
        assert_eq!(
            std::fs::read(store.layer_dir(&image.layers[0]).join("data/noise")).unwrap(),
            noise
        );
        // The first download broke halfway; the second asked for the rest only.
        let ranges = mock.ranges.lock().unwrap().clone();
        assert_eq!(ranges.len(), 1, "{ranges:?}");
        assert_ne!(ranges[0], "bytes=0-");
        let mut kinds = Vec::new();
        while let Some(event) = received.recv().await {
            kinds.push(match event {
                TransferEvent::Resolved { .. } => "resolved",
                TransferEvent::Progress { .. } => "progress",
                TransferEvent::LayerDone { .. } => "layer_done",
                _ => "other",
            });
        }
        assert_eq!(kinds.first(), Some(&"resolved"));
        assert_eq!(kinds.last(), Some(&"layer_done"));

        // Wrong credentials: the token service refuses, and the error says so without the password.
        let wrong = Registries::new(RegistryConfig {
            credentials: vec![RegistryCredentials {
                host: host.clone(),
                username: "agent".into(),
                password: "wrong-password".into(),
            }],
            ..Default::default()
        })
        .unwrap();
        let (events, _received) = mpsc::channel(64);
        let error = Arc::new(wrong)
            .pull(&store, &reference, "denied", &events)
            .await
            .unwrap_err();
        let text = error.to_string();
        assert!(text.contains("refused the configured credentials"), "{text}");
        assert!(!text.contains("wrong-password"));
    }
}
