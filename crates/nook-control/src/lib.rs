//! The nook control plane: what `nook serve` runs.
//!
//! Start-up, in order: open the store (SQLite under the data directory), make sure an admin API key exists (from
//! `admin_key`, or generated once and returned to the caller to show), open the runner (an in-process
//! [`LocalRunner`], which re-adopts sandboxes that kept running), import the built-in `base` image if a tarball is
//! configured and the image is missing, reconcile the store with what the runner runs, start listening. Shutting
//! the server down stops serving but leaves every sandbox running; the next start adopts them again.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub use nook_runner::images::registry::{RegistryConfig, RegistryCredentials};
use nook_runner::{LocalRunner, LocalRunnerConfig, Runner};

pub mod api;
pub mod audit;
pub mod builds;
pub mod control;
pub mod deadlines;
pub mod error;
pub mod ids;
pub mod images;
pub mod lifecycle;
pub mod metrics;
pub mod preview;
pub mod store;
pub mod tenancy;

use control::Control;
use store::sqlite::SqliteStore;
use store::Store;

/// Name of the image built into every installation.
pub const BASE_IMAGE: &str = "base";

/// Settings of `nook serve`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Directory for the database, images and sandboxes.
    pub data_dir: PathBuf,
    /// The static agent binary.
    pub agent_binary: PathBuf,
    /// A rootfs tarball imported as `base` when that image is missing.
    pub base_image_tar: Option<PathBuf>,
    /// An admin key to accept (stored hashed); when unset and no key exists, one is generated.
    pub admin_key: Option<String>,
    /// How the runner reaches image registries (credentials, plain-HTTP hosts, the default registry).
    pub registries: RegistryConfig,
    /// Where archived sandboxes' writable layers go: S3-compatible storage, or (when `None`) the directory
    /// `archive` under the data directory.
    pub archive_s3: Option<nook_runner::archive::S3Config>,
    /// How sandboxes are networked; `None`: loopback only.
    pub network: Option<nook_runner::network::NetworkConfig>,
    /// The DNS suffix under which `{port}-{sandbox}.{domain}` reaches a sandbox's port (a wildcard record of it
    /// points at nook); without it, ports are reached by path, or by host with a sandbox id under any domain.
    pub preview_domain: Option<String>,
    /// How many days audit events are kept.
    pub audit_retention_days: u32,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory is unusable.
    #[error("cannot use the data directory {path}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The database failed.
    #[error("cannot open the database")]
    Store(#[from] store::StoreError),
    /// The archive store cannot be used.
    #[error("cannot use the archive store")]
    Archive(#[from] nook_runner::archive::ArchiveError),
    /// The runner failed.
    #[error("cannot start the runner")]
    Runner(#[from] nook_runner::RunnerError),
    /// Reconciling with the runner failed.
    #[error("cannot reconcile the store with the runner: {0}")]
    Reconcile(String),
    /// The signing secret could not be read or made.
    #[error("cannot read or create the secret {path}")]
    Secret {
        /// The file.
        path: PathBuf,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The address could not be bound.
    #[error("cannot listen on {address}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
}

/// A started server, listening but not yet serving.
pub struct Server {
    listener: tokio::net::TcpListener,
    router: axum::Router,
    control: Arc<Control>,
    previews: Arc<preview::Previews>,
    /// The admin key generated on this start, if one was (show it once; only its hash is stored).
    pub generated_admin_key: Option<String>,
    /// Where it listens.
    pub local_addr: SocketAddr,
}

impl Server {
    /// Runs the start-up sequence.
    pub async fn start(config: ServerConfig) -> Result<Self, StartError> {
        let data_error = |source| StartError::DataDir {
            path: config.data_dir.clone(),
            source,
        };
        std::fs::create_dir_all(&config.data_dir).map_err(data_error)?;
        // The database holds key hashes and the runner's tree holds sandboxes' root-owned files: owner only.
        std::fs::set_permissions(&config.data_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(
            |source| StartError::DataDir {
                path: config.data_dir.clone(),
                source,
            },
        )?;
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&config.data_dir.join("nook.db"))?);
        let generated_admin_key = ensure_admin_key(store.as_ref(), config.admin_key.as_deref()).await?;

        let runner = LocalRunner::open(LocalRunnerConfig {
            dir: config.data_dir.join("runner"),
            agent_binary: config.agent_binary.clone(),
            registries: config.registries.clone(),
            archive: match &config.archive_s3 {
                Some(s3) => nook_runner::archive::ArchiveStore::s3(s3)?,
                None => nook_runner::archive::ArchiveStore::local(&config.data_dir.join("archive"))?,
            },
            network: config.network.clone(),
        })
        .await?;
        tracing::info!("{}", runner.describe());
        if let Some(tar) = &config.base_image_tar {
            if runner.image(BASE_IMAGE).await.is_err() {
                tracing::info!(path = %tar.display(), "importing the base image");
                let started = std::time::Instant::now();
                let image_config = nook_api::ImageConfig {
                    env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
                    ..Default::default()
                };
                let image = runner.import_image_file(BASE_IMAGE, tar, image_config).await?;
                tracing::info!(digest = %image.digest, seconds = started.elapsed().as_secs_f64(), "imported base");
            }
        }

        let control = Arc::new(Control::new(store, Arc::new(runner)));
        control
            .reconcile()
            .await
            .map_err(|failure| StartError::Reconcile(failure.message))?;
        control.watch_runner();
        control.start_audit(config.audit_retention_days);
        control
            .keep_deadlines()
            .await
            .map_err(|failure| StartError::Reconcile(failure.message))?;
        control
            .keep_lifecycles()
            .await
            .map_err(|failure| StartError::Reconcile(failure.message))?;

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Listen {
                address: config.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Listen {
            address: config.listen,
            source,
        })?;
        // Signs preview tokens and links and capability tokens (each under a purpose of its own).
        let secret_path = config.data_dir.join("signing-secret");
        let secret = ids::load_or_create_secret(&secret_path).map_err(|source| StartError::Secret {
            path: secret_path,
            source,
        })?;
        let previews = Arc::new(preview::Previews::new(
            control.clone(),
            secret,
            config.preview_domain.clone(),
        ));
        let router = api::router(api::AppState {
            control: control.clone(),
            previews: previews.clone(),
            tokens: Arc::new(tenancy::Tokens::new(secret)),
        });
        Ok(Self {
            listener,
            router,
            control,
            previews,
            generated_admin_key,
            local_addr,
        })
    }

    /// The control plane's operations, for API surfaces layered on top (E2B compatibility).
    pub fn control(&self) -> Arc<Control> {
        self.control.clone()
    }

    /// The preview proxy, for API surfaces that route sandbox traffic themselves (E2B's sandbox hosts).
    pub fn previews(&self) -> Arc<preview::Previews> {
        self.previews.clone()
    }

    /// Replaces the router with `wrap(router)`: how other API surfaces add their routes and layers.
    pub fn wrap_router(mut self, wrap: impl FnOnce(axum::Router) -> axum::Router) -> Self {
        self.router = wrap(self.router);
        self
    }

    /// Serves until `shutdown` completes, then finishes in-flight requests.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        use axum::serve::ListenerExt as _;
        // Small writes (stream lines, exec answers) go out at once instead of waiting for the peer's delayed ACK.
        let listener = self.listener.tap_io(|stream| {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::warn!(%error, "could not set TCP_NODELAY on a connection");
            }
        });
        // Outermost, so that every API surface's calls are recorded (each marks its responses when it authenticates).
        let router = self.router.layer(axum::middleware::from_fn_with_state(
            self.control.audit().clone(),
            audit::record_calls,
        ));
        let service = router.into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(listener, service).with_graceful_shutdown(shutdown).await
    }
}

/// The operator's key: `configured` (stored if new), or one made on the first start.
async fn ensure_admin_key(store: &dyn Store, configured: Option<&str>) -> Result<Option<String>, StartError> {
    let operator = |hash: String| store::NewApiKey {
        name: "admin".into(),
        hash,
        tenant: nook_api::tenancy::DEFAULT_TENANT.into(),
        scope: nook_api::tenancy::Scope::Admin,
        expires_at: None,
    };
    if let Some(key) = configured {
        let hash = ids::hash_key(key);
        if store.api_key_by_hash(&hash).await?.is_none() {
            store.insert_api_key(&operator(hash)).await?;
        }
        return Ok(None);
    }
    if store.api_key_count().await? > 0 {
        return Ok(None);
    }
    let key = ids::api_key();
    store.insert_api_key(&operator(ids::hash_key(&key))).await?;
    Ok(Some(key))
}
