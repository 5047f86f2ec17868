//! `nook serve`: settings from flags, environment (`NOOK_*`) and an optional TOML config file, in that order of
//! precedence, then `nook_control::Server`. On a first start it prints the generated admin key once and writes the
//! client config for the local user, so `nook create` in another terminal works with no flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use nook_control::{RegistryConfig, RegistryCredentials};
use nook_control::{Server, ServerConfig};
use nook_runner::network::{NetworkConfig, Subnet};
use serde::Deserialize;

use crate::client_config::{self, ClientConfig};

/// Default listen address (loopback only: exposing the API is a deliberate choice).
const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// Default data directory.
const DEFAULT_DATA_DIR: &str = "/var/lib/nook";
/// Size of a new storage image, in GiB.
const DEFAULT_STORAGE_SIZE_GB: u64 = 64;
/// Config file read when it exists and `--config` is not given.
const DEFAULT_CONFIG: &str = "/etc/nook/config.toml";

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:7070].
    #[arg(long, env = "NOOK_LISTEN")]
    listen: Option<SocketAddr>,
    /// Directory for the database, images and sandboxes [default: /var/lib/nook].
    #[arg(long, env = "NOOK_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The static nook-agent binary [default: next to this binary, or the static build in target/].
    #[arg(long, env = "NOOK_AGENT_BINARY")]
    agent_binary: Option<PathBuf>,
    /// Rootfs tarball imported as image `base` when it is missing.
    #[arg(long, env = "NOOK_BASE_IMAGE_TAR")]
    base_image_tar: Option<PathBuf>,
    /// Keep sandboxes and images on btrfs, in this image file mounted at DATA_DIR/runner (made on first use): gives
    /// copy-on-write forks and snapshots and disk quotas on hosts whose own filesystem has no subvolumes.
    #[arg(long, env = "NOOK_STORAGE_IMAGE")]
    storage_image: Option<PathBuf>,
    /// Size of a new storage image, in GiB (sparse: disk is used as data is written) [default: 64].
    #[arg(long, env = "NOOK_STORAGE_SIZE_GB")]
    storage_size_gb: Option<u64>,
    /// The block sandboxes get their addresses from; its first address is their gateway and resolver
    /// [default: 10.89.0.0/16].
    #[arg(long, env = "NOOK_NETWORK_SUBNET")]
    network_subnet: Option<String>,
    /// Give sandboxes no network at all (loopback only), and touch neither nftables nor forwarding.
    #[arg(long)]
    no_network: bool,
    /// DNS suffix whose names `{port}-{sandbox}.DOMAIN` reach sandboxes' ports (point a wildcard record of it at
    /// nook; `*.localhost` reaches loopback without one). Ports are always reachable by path, /preview/{sandbox}/{port}/.
    #[arg(long, env = "NOOK_PREVIEW_DOMAIN")]
    preview_domain: Option<String>,
    /// How many days the audit log keeps API calls and egress decisions [default: 30].
    #[arg(long, env = "NOOK_AUDIT_RETENTION_DAYS", value_parser = clap::value_parser!(u32).range(1..))]
    audit_retention_days: Option<u32>,
    /// TOML config file with the same keys as the flags (listen, data_dir, agent_binary, base_image_tar,
    /// storage_image, storage_size_gb, preview_domain, audit_retention_days), the registry settings: default_registry, insecure_registries,
    /// registry_ca_certificates, [[registry_credentials]] host/username/password; and `[network]` with subnet,
    /// upstream_dns (resolvers the sandboxes' resolver asks; the host's by default) and `[network.dns_records]`
    /// (names the resolver answers itself: `"db.internal" = ["10.0.0.5"]`).
    #[arg(long, env = "NOOK_CONFIG")]
    config: Option<PathBuf>,
    /// Do not write the client config file for the local user.
    #[arg(long)]
    no_client_config: bool,
}

/// The config file's keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    agent_binary: Option<PathBuf>,
    base_image_tar: Option<PathBuf>,
    storage_image: Option<PathBuf>,
    storage_size_gb: Option<u64>,
    preview_domain: Option<String>,
    audit_retention_days: Option<u32>,
    /// Archive archived sandboxes' writable layers to S3-compatible storage instead of DATA_DIR/archive
    /// (`[archive_s3]` with endpoint, bucket, region, access_key_id, secret_access_key; only in the file).
    archive_s3: Option<nook_runner::archive::S3Config>,
    /// Registry of image references that name none.
    default_registry: Option<String>,
    /// Registry hosts spoken to over plain HTTP (loopback hosts always are).
    #[serde(default)]
    insecure_registries: Vec<String>,
    /// Credentials per registry host (only ever read from this file, never from flags that `ps` would show).
    #[serde(default)]
    registry_credentials: Vec<RegistryCredentials>,
    /// PEM files of CA certificates to trust for registries, besides the system's.
    #[serde(default)]
    registry_ca_certificates: Vec<PathBuf>,
    /// Sandbox networking.
    #[serde(default)]
    network: FileNetworkConfig,
}

/// The config file's `[network]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNetworkConfig {
    /// As `--network-subnet`.
    subnet: Option<String>,
    /// Resolvers asked for names the runner does not answer itself (`"192.0.2.53:53"` or an address).
    upstream_dns: Option<Vec<String>>,
    /// Names answered by the runner's resolver itself.
    #[serde(default)]
    dns_records: std::collections::BTreeMap<String, Vec<std::net::Ipv4Addr>>,
}

/// The network configuration from the flags and the file.
fn network_config(
    no_network: bool,
    subnet: Option<String>,
    file: FileNetworkConfig,
) -> anyhow::Result<Option<NetworkConfig>> {
    if no_network {
        return Ok(None);
    }
    let mut config = NetworkConfig::with_defaults();
    if let Some(subnet) = subnet.as_ref().or(file.subnet.as_ref()) {
        config.subnet = Subnet::parse(subnet).map_err(|why| anyhow::anyhow!("network subnet {subnet}: {why}"))?;
    }
    if let Some(servers) = file.upstream_dns {
        config.upstream_dns = servers
            .iter()
            .map(|server| {
                server
                    .parse::<SocketAddr>()
                    .or_else(|_| {
                        server
                            .parse::<std::net::IpAddr>()
                            .map(|address| SocketAddr::new(address, 53))
                    })
                    .with_context(|| format!("network.upstream_dns: {server:?} is not an address"))
            })
            .collect::<anyhow::Result<_>>()?;
    }
    config.dns_records = file.dns_records;
    Ok(Some(config))
}

fn read_file_config(explicit: Option<&Path>) -> anyhow::Result<FileConfig> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None if Path::new(DEFAULT_CONFIG).exists() => PathBuf::from(DEFAULT_CONFIG),
        None => return Ok(FileConfig::default()),
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Finds the agent: next to this binary, or the static build that scripts/build.sh makes in `target/`.
fn default_agent_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the nook binary")?;
    let dir = exe.parent().context("the nook binary has no directory")?;
    let mut candidates = vec![dir.join("nook-agent")];
    if let (Some(profile), Some(target)) = (dir.file_name(), dir.parent()) {
        candidates.insert(
            0,
            target.join("x86_64-unknown-linux-gnu").join(profile).join("nook-agent"),
        );
    }
    candidates.into_iter().find(|path| path.is_file()).with_context(|| {
        format!(
            "no static nook-agent found next to {} (build it with scripts/build.sh or pass --agent-binary)",
            exe.display()
        )
    })
}

pub async fn run(args: ServeArgs) -> anyhow::Result<u8> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NOOK_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let file = read_file_config(args.config.as_deref())?;
    let listen = match args.listen.or(file.listen) {
        Some(listen) => listen,
        None => DEFAULT_LISTEN.parse().expect("valid default"),
    };
    let agent_binary = match args.agent_binary.or(file.agent_binary) {
        Some(path) => path,
        None => default_agent_binary()?,
    };
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    if let Some(image) = args.storage_image.or(file.storage_image) {
        let size_gb = args
            .storage_size_gb
            .or(file.storage_size_gb)
            .unwrap_or(DEFAULT_STORAGE_SIZE_GB);
        let runner_dir = data_dir.join("runner");
        tokio::task::spawn_blocking(move || nook_runner::storage::mount_image(&image, size_gb << 30, &runner_dir))
            .await
            .expect("mounting does not panic")
            .context("nook serve could not prepare its storage image")?;
    }
    let admin_key = std::env::var("NOOK_ADMIN_KEY").ok().filter(|key| !key.is_empty());
    let network = network_config(args.no_network, args.network_subnet, file.network)?;
    let config = ServerConfig {
        listen,
        data_dir,
        agent_binary,
        base_image_tar: args.base_image_tar.or(file.base_image_tar),
        admin_key: admin_key.clone(),
        registries: RegistryConfig {
            credentials: file.registry_credentials,
            insecure: file.insecure_registries,
            default_registry: file.default_registry,
            ca_certificates: file.registry_ca_certificates,
        },
        archive_s3: file.archive_s3,
        network,
        preview_domain: args
            .preview_domain
            .or(file.preview_domain)
            .map(|domain| preview_domain(&domain))
            .transpose()?,
        audit_retention_days: args
            .audit_retention_days
            .or(file.audit_retention_days)
            .unwrap_or(nook_control::audit::DEFAULT_RETENTION_DAYS),
    };
    let server = Server::start(config.clone())
        .await
        .context("nook serve could not start")?;
    // E2B's REST API and sandbox protocol, on the same address.
    let e2b = nook_e2b::E2b::new(server.control(), server.previews(), &config.data_dir)
        .context("nook serve could not start")?;
    let server = server.wrap_router(|router| e2b.wrap(router));
    let url = format!("http://{}", client_address(server.local_addr));
    tracing::info!(%url, data_dir = %config.data_dir.display(), "nook is serving");

    let key_to_save = server.generated_admin_key.clone().or(admin_key);
    if let Some(key) = &server.generated_admin_key {
        eprintln!("\nAdmin API key (shown once; only its hash is stored):\n\n    {key}\n");
    }
    if let (Some(api_key), false) = (key_to_save, args.no_client_config) {
        match client_config::save(&ClientConfig {
            url: url.clone(),
            api_key,
        }) {
            Ok(path) => eprintln!("Client config written to {} (the nook CLI uses it).\n", path.display()),
            Err(error) => tracing::warn!(error = %format!("{error:#}"), "could not write the client config"),
        }
    }
    server.run(shutdown_signal()).await.context("serving failed")?;
    tracing::info!("stopped serving; sandboxes keep running and are adopted on the next start");
    Ok(0)
}

/// A preview domain, checked: DNS labels of letters, digits and hyphens, lowercased, no port.
fn preview_domain(text: &str) -> anyhow::Result<String> {
    let domain = text.trim_matches('.').to_ascii_lowercase();
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
    };
    if domain.is_empty() || domain.len() > 200 || !domain.split('.').all(valid_label) {
        anyhow::bail!(
            "--preview-domain {text:?} is not a DNS name: give a suffix such as preview.example.com (no scheme, no port)"
        );
    }
    Ok(domain)
}

/// The address a local client should use: loopback when listening on all interfaces.
fn client_address(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
}
