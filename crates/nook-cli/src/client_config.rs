//! Where the CLI finds its server: `NOOK_URL` and `NOOK_API_KEY`, else the file `nook serve` writes for the local
//! user (`$XDG_CONFIG_HOME/nook/client.json`, by default `~/.config/nook/client.json`, mode 0600).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

/// Server URL and API key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientConfig {
    /// Server URL.
    pub url: String,
    /// API key.
    pub api_key: String,
}

/// The per-user config file's path.
pub fn path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(base.join("nook").join("client.json"))
}

/// Loads the settings, environment first.
pub fn load() -> anyhow::Result<ClientConfig> {
    let from_file = path()
        .and_then(|path| std::fs::read(&path).ok())
        .and_then(|bytes| serde_json::from_slice::<ClientConfig>(&bytes).ok());
    let url = std::env::var("NOOK_URL")
        .ok()
        .or_else(|| from_file.as_ref().map(|c| c.url.clone()));
    let key = std::env::var("NOOK_API_KEY")
        .ok()
        .or_else(|| from_file.as_ref().map(|c| c.api_key.clone()));
    match (url, key) {
        (Some(url), Some(api_key)) => Ok(ClientConfig { url, api_key }),
        _ => bail!(
            "no server configured: start `nook serve` (it writes {}), or set NOOK_URL and NOOK_API_KEY",
            path()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "a client config".into())
        ),
    }
}

/// Writes the settings for the local user, readable only by them.
pub fn save(config: &ClientConfig) -> anyhow::Result<PathBuf> {
    let path = path().context("neither XDG_CONFIG_HOME nor HOME is set")?;
    let dir = path.parent().expect("a file in a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(&serde_json::to_vec_pretty(config)?)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
