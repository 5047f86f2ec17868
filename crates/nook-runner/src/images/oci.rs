//! The OCI image format's JSON documents, as far as nook reads and writes them, and the rules for choosing among
//! them.
//!
//! An image is reached through a chain of content-addressed documents: an *index* (a list of manifests, one per
//! platform), a *manifest* (one config blob and the layer blobs, lowest first), and the *config* (what a container
//! runs with, and the `diff_ids` — the digests of the uncompressed layers). Docker's v2 schema 2 types are the same
//! shapes under other media types, and `docker save` writes a `manifest.json` of its own; all of them are parsed
//! here into the same structs. Everything here is pure: verifying digests and choosing a platform are functions over
//! bytes, used by archive imports and registry pulls alike.

use std::collections::BTreeMap;

use nook_api::ImageConfig;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// OCI image index.
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image config.
pub const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI gzip-compressed layer.
pub const MEDIA_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Docker manifest list.
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The most layers an image may have (overlayfs stacks at most 500, and mount options are one page long).
pub const MAX_LAYERS: usize = 128;

/// Why an image document was refused.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The document is not the JSON it should be.
    #[error("the {what} is not valid JSON of its kind")]
    Json {
        /// Which document.
        what: &'static str,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// A digest is not `sha256:` and 64 lowercase hex digits.
    #[error("{0:?} is not a sha256 digest (nook verifies sha256 only)")]
    BadDigest(String),
    /// Content does not hash to the digest that names it.
    #[error("the {what} does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch {
        /// Which content.
        what: String,
        /// The digest that named it.
        expected: String,
        /// What it hashed to.
        actual: String,
    },
    /// Nothing in an index runs on this host.
    #[error("the image has no manifest for {wanted}; it has: {available}")]
    NoPlatform {
        /// The platform looked for.
        wanted: String,
        /// What the index offers.
        available: String,
    },
    /// Something else about the documents is wrong.
    #[error("{0}")]
    Invalid(String),
}

/// A reference to a blob.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Descriptor {
    /// What the blob is.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// Its digest.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// The platform a manifest in an index is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Free-form annotations (`org.opencontainers.image.ref.name` names a manifest in a layout).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Operating system and architecture of an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture, in Go's names (`amd64`, `arm64`).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// Architecture variant (`v8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An OCI index or a Docker manifest list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Index {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// Its media type, when it says.
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The manifests.
    pub manifests: Vec<Descriptor>,
}

/// An OCI or Docker image manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// Its media type, when it says.
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// The layer blobs, lowest first.
    pub layers: Vec<Descriptor>,
}

/// The image config blob.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigFile {
    /// CPU architecture.
    #[serde(default)]
    pub architecture: String,
    /// Operating system.
    #[serde(default)]
    pub os: String,
    /// How containers run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<RunConfig>,
    /// The layers' uncompressed digests.
    pub rootfs: RootFs,
}

/// `rootfs` of a config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RootFs {
    /// Always `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// sha256 of each uncompressed layer, lowest first.
    pub diff_ids: Vec<String>,
}

/// The `config` object of an image config (Docker's field names).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    /// User (name, uid, or `user:group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `KEY=value` entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// Entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Default arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// `port/proto` keys with empty objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    /// Labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
}

/// One image in a `docker save` archive's `manifest.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DockerArchiveEntry {
    /// Path of the config JSON in the archive.
    pub config: String,
    /// Names the image was saved under.
    #[serde(default)]
    pub repo_tags: Option<Vec<String>>,
    /// Paths of the layer tars, lowest first.
    pub layers: Vec<String>,
}

/// Parses a JSON document, naming it in the error.
pub fn parse<T: serde::de::DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, FormatError> {
    serde_json::from_slice(bytes).map_err(|source| FormatError::Json { what, source })
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Checks that `digest` is `sha256:` and 64 lowercase hex digits, and returns the hex part.
pub fn digest_hex(digest: &str) -> Result<&str, FormatError> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) => {
            Ok(hex)
        }
        _ => Err(FormatError::BadDigest(digest.to_string())),
    }
}

/// Checks that `bytes` hash to `digest`.
pub fn verify(what: &str, digest: &str, bytes: &[u8]) -> Result<(), FormatError> {
    digest_hex(digest)?;
    let actual = sha256_digest(bytes);
    if actual != digest {
        return Err(FormatError::DigestMismatch {
            what: what.to_string(),
            expected: digest.to_string(),
            actual,
        });
    }
    Ok(())
}

/// Whether a media type names an index (OCI index or Docker manifest list).
pub fn is_index(media_type: &str) -> bool {
    media_type == MEDIA_OCI_INDEX || media_type == MEDIA_DOCKER_LIST
}

/// The platform this host runs, in OCI's names.
pub fn host_platform() -> Platform {
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    Platform {
        architecture: architecture.to_string(),
        os: "linux".to_string(),
        variant: None,
    }
}

/// Chooses the manifest for `wanted` from an index. Entries without a platform count only when they are the one
/// manifest of the index; attestations and other artifacts (`unknown/unknown`) never match.
pub fn select_manifest<'a>(index: &'a Index, wanted: &Platform) -> Result<&'a Descriptor, FormatError> {
    let matches = |platform: &Platform| platform.os == wanted.os && platform.architecture == wanted.architecture;
    if let Some(found) = index
        .manifests
        .iter()
        .find(|descriptor| descriptor.platform.as_ref().is_some_and(matches))
    {
        return Ok(found);
    }
    let unplatformed: Vec<&Descriptor> = index.manifests.iter().filter(|d| d.platform.is_none()).collect();
    if let [only] = unplatformed.as_slice() {
        return Ok(only);
    }
    let available: Vec<String> = index
        .manifests
        .iter()
        .map(|d| match &d.platform {
            Some(p) => format!("{}/{}", p.os, p.architecture),
            None => "no platform".to_string(),
        })
        .collect();
    Err(FormatError::NoPlatform {
        wanted: format!("{}/{}", wanted.os, wanted.architecture),
        available: if available.is_empty() {
            "nothing".into()
        } else {
            available.join(", ")
        },
    })
}

/// Checks a manifest's shape: a sane number of layers, sha256 digests everywhere, layers that are tar archives.
pub fn check_manifest(manifest: &Manifest) -> Result<(), FormatError> {
    if manifest.layers.len() > MAX_LAYERS {
        return Err(FormatError::Invalid(format!(
            "the image has {} layers; nook mounts at most {MAX_LAYERS}",
            manifest.layers.len()
        )));
    }
    digest_hex(&manifest.config.digest)?;
    for layer in &manifest.layers {
        digest_hex(&layer.digest)?;
        let media = layer.media_type.as_str();
        let is_tar = media.is_empty()
            || media.starts_with("application/vnd.oci.image.layer.")
            || media.starts_with("application/vnd.docker.image.rootfs.");
        if !is_tar {
            return Err(FormatError::Invalid(format!(
                "layer {} has media type {media:?}, which is not a file system layer (is this a container image?)",
                layer.digest
            )));
        }
    }
    Ok(())
}

/// Checks that the unpacked layers are the ones the config describes.
pub fn check_diff_ids(config: &ConfigFile, diff_ids: &[String]) -> Result<(), FormatError> {
    if config.rootfs.diff_ids.len() != diff_ids.len() {
        return Err(FormatError::Invalid(format!(
            "the image config lists {} layers but the manifest has {}",
            config.rootfs.diff_ids.len(),
            diff_ids.len()
        )));
    }
    for (position, (expected, actual)) in config.rootfs.diff_ids.iter().zip(diff_ids).enumerate() {
        if expected != actual {
            return Err(FormatError::DigestMismatch {
                what: format!("uncompressed content of layer {}", position + 1),
                expected: expected.clone(),
                actual: actual.clone(),
            });
        }
    }
    Ok(())
}

/// The label under which an image's template start command travels in OCI configs (as JSON), so that a template
/// pushed to a registry or exported keeps it.
pub const TEMPLATE_START_LABEL: &str = "dev.nook.template.start";

/// What a sandbox takes from an image config.
pub fn image_config(config: &ConfigFile) -> ImageConfig {
    let run = config.config.clone().unwrap_or_default();
    let non_empty = |value: Option<String>| value.filter(|text| !text.is_empty());
    let mut labels = run.labels.unwrap_or_default();
    // A label that does not parse stays a label: it is someone else's, or nothing nook can run.
    let start = labels
        .get(TEMPLATE_START_LABEL)
        .and_then(|text| serde_json::from_str::<nook_api::TemplateStart>(text).ok());
    if start.is_some() {
        labels.remove(TEMPLATE_START_LABEL);
    }
    ImageConfig {
        env: run.env.unwrap_or_default(),
        working_dir: non_empty(run.working_dir),
        user: non_empty(run.user),
        entrypoint: run.entrypoint.unwrap_or_default(),
        cmd: run.cmd.unwrap_or_default(),
        exposed_ports: run.exposed_ports.unwrap_or_default().into_keys().collect(),
        labels,
        start,
    }
}

/// The config blob of an image with this config and these layers (the inverse of [`image_config`]).
pub fn config_file(config: &ImageConfig, diff_ids: Vec<String>) -> ConfigFile {
    let platform = host_platform();
    let non_empty = |values: &Vec<String>| (!values.is_empty()).then(|| values.clone());
    ConfigFile {
        architecture: platform.architecture,
        os: platform.os,
        config: Some(RunConfig {
            user: config.user.clone(),
            env: non_empty(&config.env),
            entrypoint: non_empty(&config.entrypoint),
            cmd: non_empty(&config.cmd),
            working_dir: config.working_dir.clone(),
            exposed_ports: (!config.exposed_ports.is_empty()).then(|| {
                config
                    .exposed_ports
                    .iter()
                    .map(|port| (port.clone(), serde_json::json!({})))
                    .collect()
            }),
            labels: {
                let mut labels = config.labels.clone();
                if let Some(start) = &config.start {
                    labels.insert(
                        TEMPLATE_START_LABEL.into(),
                        serde_json::to_string(start).expect("serializable"),
                    );
                }
                (!labels.is_empty()).then_some(labels)
            },
        }),
        rootfs: RootFs {
            kind: "layers".into(),
            diff_ids,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(digest: &str, platform: Option<(&str, &str)>) -> Descriptor {
        Descriptor {
            media_type: MEDIA_OCI_MANIFEST.into(),
            digest: digest.into(),
            size: 1,
            platform: platform.map(|(os, architecture)| Platform {
                os: os.into(),
                architecture: architecture.into(),
                variant: None,
            }),
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn a_template_start_command_survives_the_config_blob() {
        let config = ImageConfig {
            labels: [("team".to_string(), "agents".to_string())].into(),
            start: Some(nook_api::TemplateStart {
                command: "python3 -m http.server".into(),
                ready_command: Some("curl -sf localhost:8000".into()),
                ready_timeout_s: Some(30),
            }),
            ..ImageConfig::default()
        };
        let blob = config_file(&config, vec![]);
        assert!(blob
            .config
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap()
            .contains_key(TEMPLATE_START_LABEL));
        assert_eq!(image_config(&blob), config);
        // Someone else's label of that name that is not nook's JSON stays a label.
        let mut foreign = blob.clone();
        let labels = foreign.config.as_mut().unwrap().labels.as_mut().unwrap();
        labels.insert(TEMPLATE_START_LABEL.into(), "not json".into());
        let read = image_config(&foreign);
        assert_eq!(
            (read.start, read.labels[TEMPLATE_START_LABEL].as_str()),
            (None, "not json")
        );
    }

    #[test]
    fn the_host_platform_is_chosen_from_an_index() {
        let amd64 = Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        };
        let index = Index {
            schema_version: 2,
            media_type: None,
            manifests: vec![
                descriptor("arm", Some(("linux", "arm64"))),
                descriptor("attestation", Some(("unknown", "unknown"))),
                descriptor("x86", Some(("linux", "amd64"))),
            ],
        };
        assert_eq!(select_manifest(&index, &amd64).unwrap().digest, "x86");
        let only = Index {
            manifests: vec![descriptor("one", None)],
            ..index.clone()
        };
        assert_eq!(select_manifest(&only, &amd64).unwrap().digest, "one");
        let arm_only = Index {
            manifests: vec![descriptor("arm", Some(("linux", "arm64")))],
            ..index
        };
        let error = select_manifest(&arm_only, &amd64).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the image has no manifest for linux/amd64; it has: linux/arm64"
        );
    }

    #[test]
    fn digests_are_checked() {
        let digest = sha256_digest(b"x");
        assert!(verify("blob", &digest, b"x").is_ok());
        assert!(matches!(
            verify("blob", &digest, b"y"),
            Err(FormatError::DigestMismatch { .. })
        ));
        assert!(matches!(digest_hex("sha512:00"), Err(FormatError::BadDigest(_))));
        assert!(matches!(
            digest_hex(&digest.to_uppercase()),
            Err(FormatError::BadDigest(_))
        ));
    }

    #[test]
    fn config_fields_reach_the_image_config() {
        let config: ConfigFile = parse(
            "config",
            br#"{"architecture":"amd64","os":"linux",
                "config":{"User":"app:app","Env":["A=1"],"Entrypoint":["/entry"],"Cmd":["serve"],
                          "WorkingDir":"/srv","ExposedPorts":{"8080/tcp":{}},"Labels":{"team":"x"}},
                "rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap();
        let image = image_config(&config);
        assert_eq!(image.user.as_deref(), Some("app:app"));
        assert_eq!(image.env, ["A=1"]);
        assert_eq!(
            (image.entrypoint.clone(), image.cmd.clone()),
            (vec!["/entry".to_string()], vec!["serve".to_string()])
        );
        assert_eq!(image.working_dir.as_deref(), Some("/srv"));
        assert_eq!(image.exposed_ports, ["8080/tcp"]);
        assert_eq!(image.labels.get("team").map(String::as_str), Some("x"));
        let back = config_file(&image, config.rootfs.diff_ids.clone());
        assert_eq!(image_config(&back), image);
    }

    #[test]
    fn non_layer_blobs_and_too_many_layers_are_refused() {
        let layer = |media: &str| Descriptor {
            media_type: media.into(),
            digest: sha256_digest(b"l"),
            size: 1,
            platform: None,
            annotations: BTreeMap::new(),
        };
        let manifest = Manifest {
            schema_version: 2,
            media_type: None,
            config: layer(MEDIA_OCI_CONFIG),
            layers: vec![layer("application/vnd.cncf.helm.chart.content.v1.tar+gzip")],
        };
        assert!(check_manifest(&manifest)
            .unwrap_err()
            .to_string()
            .contains("not a file system layer"));
        let many = Manifest {
            layers: vec![layer(MEDIA_OCI_LAYER_GZIP); MAX_LAYERS + 1],
            ..manifest
        };
        assert!(check_manifest(&many).unwrap_err().to_string().contains("at most"));
    }
}
