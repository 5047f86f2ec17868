//! Preview access: how people and programs outside a sandbox reach the servers it runs.
//!
//! Every TCP port a sandbox listens on can be reached through nook's preview proxy, either by host
//! (`{port}-{sandbox}.{preview domain}`) or by path (`/preview/{sandbox}/{port}/…`). Ports are private unless
//! listed in [`PreviewSettings::public_ports`] (or all are public): a request needs the port's token (header
//! `Nook-Preview-Token` or query `nook_token`) or a signed link that has not expired and was not revoked.
//! Rotating the sandbox's tokens ([`PreviewSettings::token_generation`]) invalidates every token and link at once.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The header a preview token may be sent in.
pub const TOKEN_HEADER: &str = "nook-preview-token";
/// The query parameter a preview token may be sent in.
pub const TOKEN_QUERY: &str = "nook_token";
/// The shortest life of a signed link, in seconds.
pub const MIN_LINK_S: u64 = 1;
/// The longest life of a signed link, in seconds (24 hours).
pub const MAX_LINK_S: u64 = 24 * 3600;
/// The most ports a sandbox may list as public.
pub const MAX_PUBLIC_PORTS: usize = 64;

/// Who may reach a sandbox's ports, and what a request to a stopped one does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PreviewSettings {
    /// Ports anyone may reach without a token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub public_ports: Vec<u16>,
    /// Every port is public (E2B's `allowPublicTraffic`).
    #[serde(default)]
    pub all_ports_public: bool,
    /// A preview request to a paused or stopped sandbox resumes or starts it instead of failing.
    #[serde(default)]
    pub wake_on_request: bool,
    /// Tokens and signed links are made for one generation; rotating moves to the next, so every earlier token
    /// and link stops working.
    #[serde(default)]
    pub token_generation: u32,
    /// The Host header the sandbox's servers receive instead of the client's, `${PORT}` standing for the port
    /// (`localhost:${PORT}` for dev servers that accept only their own name; E2B's `maskRequestHost`). The
    /// client's Host is still passed on as `X-Forwarded-Host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_host: Option<String>,
}

impl PreviewSettings {
    /// Whether `port` is reachable without a token.
    pub fn is_public(&self, port: u16) -> bool {
        self.all_ports_public || self.public_ports.contains(&port)
    }

    /// Checks the settings a client sent.
    pub fn check(&self) -> Result<(), String> {
        if self.public_ports.len() > MAX_PUBLIC_PORTS {
            return Err(format!(
                "public_ports lists {} ports; at most {MAX_PUBLIC_PORTS} may be listed (or set all_ports_public)",
                self.public_ports.len()
            ));
        }
        if self.public_ports.contains(&0) {
            return Err("public_ports holds port 0, which no server listens on".into());
        }
        if let Some(host) = &self.upstream_host {
            let printable = host.bytes().all(|b| b.is_ascii_graphic());
            if host.is_empty() || host.len() > 255 || !printable {
                return Err(format!(
                    "upstream_host {host:?} is not a Host header: 1 to 255 visible ASCII characters, such as \
                     localhost:${{PORT}}"
                ));
            }
        }
        Ok(())
    }
}

/// Body of `PUT /v1/sandboxes/{sandbox}/preview`: fields left out stay as they are.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PreviewSettingsRequest {
    /// Ports anyone may reach without a token (replaces the list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ports: Option<Vec<u16>>,
    /// Every port is public.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all_ports_public: Option<bool>,
    /// Wake a paused or stopped sandbox on a preview request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_on_request: Option<bool>,
    /// Revoke every token and signed link made so far (new tokens are made for the next generation).
    #[serde(default)]
    pub rotate_tokens: bool,
    /// The Host header the sandbox's servers receive (`${PORT}` stands for the port); an empty string goes back to
    /// the client's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_host: Option<String>,
}

/// How to reach one port of a sandbox (`GET /v1/sandboxes/{sandbox}/ports/{port}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PortAccess {
    /// The port inside the sandbox.
    pub port: u16,
    /// Whether it is reachable without a token.
    pub public: bool,
    /// The preview URL by host, when the server has a preview domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The preview URL by path on the server's own address.
    pub path_url: String,
    /// The port's token, for the `Nook-Preview-Token` header or the `nook_token` query parameter. It lasts until
    /// the sandbox's tokens are rotated.
    pub token: String,
}

/// Body of `POST /v1/sandboxes/{sandbox}/ports/{port}/links`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PreviewLinkRequest {
    /// Seconds until the link stops working: 1 to 86400 (24 h).
    pub expires_in_s: u64,
}

/// A signed link to a sandbox's port: anyone holding it may reach the port until it expires or is revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PreviewLink {
    /// The link's id (to revoke it).
    pub id: String,
    /// The sandbox's id.
    pub sandbox: String,
    /// The port inside the sandbox.
    pub port: u16,
    /// The link by host, when the server has a preview domain (present only when the link is made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The link by path on the server's own address (present only when the link is made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_url: Option<String>,
    /// When it stops working.
    pub expires_at: DateTime<Utc>,
    /// When it was revoked, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
    /// When it was made.
    pub created_at: DateTime<Utc>,
}

/// Answer of `GET /v1/sandboxes/{sandbox}/links`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PreviewLinkList {
    /// The sandbox's links, newest first (expired ones are dropped after a day).
    pub links: Vec<PreviewLink>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_private_unless_listed_or_all_public() {
        let mut settings = PreviewSettings {
            public_ports: vec![8080],
            ..Default::default()
        };
        assert!(settings.is_public(8080) && !settings.is_public(3000));
        settings.all_ports_public = true;
        assert!(settings.is_public(3000));
        assert!(settings.check().is_ok());
        settings.public_ports.push(0);
        assert!(settings.check().unwrap_err().contains("port 0"));
        settings.public_ports = (1..=65).collect();
        assert!(settings.check().unwrap_err().contains("at most 64"));
        settings.public_ports.clear();
        settings.upstream_host = Some("local host".into());
        assert!(settings.check().unwrap_err().contains("upstream_host"));
        settings.upstream_host = Some("localhost:${PORT}".into());
        assert!(settings.check().is_ok());
    }
}
