//! Importing image archives — OCI image layouts and `docker save` tarballs — in one streaming pass.
//!
//! An archive is itself a tar of blobs whose order no tool promises: the index may come first or last. Rather than
//! spooling the archive to disk to read it in the right order, the importer looks at each member as it passes:
//! small JSON documents (index, manifests, configs) are kept in memory, bounded; anything else is treated as a
//! candidate layer and unpacked at once into a temporary directory of the layer store while its compressed digest
//! is computed. At the end the documents say which candidates make up the image: those are verified (blob digest
//! against the manifest, uncompressed digest against the config's `diff_ids`) and moved into the store; the rest
//! are removed when the importer is dropped. Nothing is unpacked twice and nothing but the documents is buffered.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nook_api::Image;

use super::oci::{self, ConfigFile, DockerArchiveEntry, FormatError, Index, Manifest};
use super::tar_stream::{EntryKind, TarEntry, TarError, TarStream};
use super::unpack::{normalise, HashingReader, UnpackError};
use super::{ImageError, ImageStore, TempLayer};

/// The largest JSON document an archive may carry.
const MAX_DOCUMENT_BYTES: u64 = 4 << 20;

/// How deep indexes may nest.
const MAX_INDEX_DEPTH: usize = 4;

/// Whether an archive's first member says it is an image archive rather than a root file system.
pub fn looks_like_image_archive(first_path: &[u8]) -> bool {
    let Ok(path) = normalise(first_path) else {
        return false;
    };
    let Some(first) = path.components().next() else {
        return false;
    };
    let first = first.as_os_str().as_bytes();
    let hex_named = |name: &[u8]| name.len() == 64 && name.iter().all(u8::is_ascii_hexdigit);
    matches!(
        first,
        b"oci-layout" | b"index.json" | b"manifest.json" | b"repositories" | b"blobs"
    ) || hex_named(first)
        || first.strip_suffix(b".json").is_some_and(hex_named)
}

/// A layer candidate: unpacked, with the digests it was found under. `layer` is taken by the first position of the
/// image that uses it; a later position that names the same blob gets `None` and the same digests.
struct Candidate {
    layer: Option<TempLayer>,
    diff_id: String,
    size_bytes: u64,
    blob_digest: String,
}

/// What the pass over the archive collected.
#[derive(Default)]
struct Contents {
    /// JSON members by path; `None` for one too large to keep.
    documents: HashMap<PathBuf, Option<Vec<u8>>>,
    candidates: HashMap<PathBuf, Candidate>,
    /// Members that were neither a document nor an unpackable layer, with why they could not be unpacked.
    unusable: HashMap<PathBuf, UnpackError>,
    /// Symlinks and hard links between members (`docker save` links repeated layers).
    links: HashMap<PathBuf, PathBuf>,
}

impl Contents {
    /// Follows member links to the member that holds the data.
    fn resolve(&self, path: &Path) -> PathBuf {
        let mut path = path.to_path_buf();
        for _ in 0..16 {
            match self.links.get(&path) {
                Some(target) => path = target.clone(),
                None => break,
            }
        }
        path
    }

    fn document(&self, path: &Path, what: &str) -> Result<&[u8], ImageError> {
        let path = self.resolve(path);
        match self.documents.get(&path) {
            Some(Some(bytes)) => Ok(bytes),
            Some(None) => Err(archive_error(format!(
                "the {what} at {} is larger than {MAX_DOCUMENT_BYTES} bytes",
                path.display()
            ))),
            None => Err(archive_error(format!(
                "the archive has no {what} at {}",
                path.display()
            ))),
        }
    }

    fn take_layer(&mut self, path: &Path) -> Result<Candidate, ImageError> {
        let path = self.resolve(path);
        if let Some(candidate) = self.candidates.get_mut(&path) {
            return Ok(Candidate {
                layer: candidate.layer.take(),
                diff_id: candidate.diff_id.clone(),
                size_bytes: candidate.size_bytes,
                blob_digest: candidate.blob_digest.clone(),
            });
        }
        if let Some(source) = self.unusable.remove(&path) {
            return Err(ImageError::UnusableLayer {
                layer: path.display().to_string(),
                source,
            });
        }
        Err(archive_error(if self.documents.contains_key(&path) {
            format!("layer {} is not a tar archive", path.display())
        } else {
            format!("the archive lacks layer {}", path.display())
        }))
    }
}

fn archive_error(message: String) -> ImageError {
    ImageError::Format(FormatError::Invalid(message))
}

/// Imports the image archive whose first member is `first`, naming it `name`.
pub fn import<R: Read>(
    store: &ImageStore,
    name: &str,
    tar: &mut TarStream<R>,
    first: TarEntry,
) -> Result<Image, ImageError> {
    let mut contents = Contents::default();
    let mut next = Some(first);
    while let Some(entry) = next {
        collect(store, &mut contents, &entry, tar)?;
        next = tar.next_entry().map_err(archive_read_error)?;
    }
    if contents.documents.contains_key(Path::new("index.json")) {
        import_oci_layout(store, name, contents)
    } else if contents.documents.contains_key(Path::new("manifest.json")) {
        import_docker_archive(store, name, contents)
    } else {
        Err(archive_error(
            "the archive is neither an OCI image layout (no index.json) nor a `docker save` archive (no manifest.json)"
                .into(),
        ))
    }
}

fn archive_read_error(error: TarError) -> ImageError {
    ImageError::Unpack(error.into())
}

fn read_failed(error: std::io::Error) -> ImageError {
    archive_read_error(TarError::Io(error))
}

/// Files one member of the archive as a document, a layer candidate or a link.
fn collect<R: Read>(
    store: &ImageStore,
    contents: &mut Contents,
    entry: &TarEntry,
    tar: &mut TarStream<R>,
) -> Result<(), ImageError> {
    let Ok(path) = normalise(&entry.path) else {
        return Err(archive_error(format!(
            "the archive member {:?} has a path outside the archive",
            entry.display_path()
        )));
    };
    match entry.kind {
        EntryKind::File => {}
        EntryKind::Symlink | EntryKind::HardLink => {
            let target = entry.link_target.as_deref().unwrap_or_default();
            let joined = if entry.kind == EntryKind::Symlink {
                // Relative to the link's directory, and never outside the archive.
                let mut base = path.parent().map(Path::to_path_buf).unwrap_or_default();
                for part in Path::new(OsStr::from_bytes(target)).components() {
                    match part {
                        std::path::Component::ParentDir => {
                            base.pop();
                        }
                        std::path::Component::Normal(part) => base.push(part),
                        _ => {}
                    }
                }
                base
            } else {
                normalise(target).unwrap_or_default()
            };
            contents.links.insert(path, joined);
            return Ok(());
        }
        _ => return Ok(()),
    }
    let mut data = BufReader::with_capacity(64 * 1024, tar.data());
    let head = data.fill_buf().map_err(read_failed)?;
    let is_json = matches!(head.first(), Some(b'{' | b'['));
    if entry.size == 0 {
        return Ok(());
    }
    if is_json {
        let bytes = if entry.size <= MAX_DOCUMENT_BYTES {
            let mut bytes = Vec::with_capacity(entry.size as usize);
            data.read_to_end(&mut bytes).map_err(read_failed)?;
            Some(bytes)
        } else {
            None
        };
        contents.documents.insert(path, bytes);
        return Ok(());
    }
    let mut hashing = HashingReader::new(data);
    match store.unpack_temp_layer(&mut hashing) {
        Ok(layer) => {
            // Whatever followed the compressed stream still belongs to the blob's digest.
            std::io::copy(&mut hashing, &mut std::io::sink()).map_err(read_failed)?;
            let candidate = Candidate {
                diff_id: layer.diff_id.clone(),
                size_bytes: layer.size_bytes,
                layer: Some(layer),
                blob_digest: hashing.finish(),
            };
            contents.candidates.insert(path, candidate);
        }
        // A member that is not a layer matters only if the image names it; the error is kept for then.
        Err(ImageError::Unpack(error)) => {
            contents.unusable.insert(path, error);
        }
        Err(other) => return Err(other),
    }
    Ok(())
}

fn blob_path(digest: &str) -> Result<PathBuf, ImageError> {
    let hex = oci::digest_hex(digest)?;
    Ok(Path::new("blobs/sha256").join(hex))
}

fn import_oci_layout(store: &ImageStore, name: &str, mut contents: Contents) -> Result<Image, ImageError> {
    let mut index: Index = oci::parse("index.json", contents.document(Path::new("index.json"), "index")?)?;
    let wanted = oci::host_platform();
    for _ in 0..MAX_INDEX_DEPTH {
        let chosen = choose(&index, name, &wanted)?.clone();
        let bytes = contents.document(&blob_path(&chosen.digest)?, "manifest")?;
        oci::verify("manifest", &chosen.digest, bytes)?;
        if oci::is_index(&chosen.media_type) {
            index = oci::parse("nested index", bytes)?;
            continue;
        }
        let manifest: Manifest = oci::parse("manifest", bytes)?;
        oci::check_manifest(&manifest)?;
        let config_bytes = contents.document(&blob_path(&manifest.config.digest)?, "config")?;
        oci::verify("config", &manifest.config.digest, config_bytes)?;
        let config: ConfigFile = oci::parse("config", config_bytes)?;
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for descriptor in &manifest.layers {
            let candidate = contents.take_layer(&blob_path(&descriptor.digest)?)?;
            if candidate.blob_digest != descriptor.digest {
                return Err(FormatError::DigestMismatch {
                    what: "layer blob".into(),
                    expected: descriptor.digest.clone(),
                    actual: candidate.blob_digest,
                }
                .into());
            }
            layers.push(candidate);
        }
        return finish(store, name, &chosen.digest, &config, layers);
    }
    Err(archive_error(format!(
        "the archive's indexes nest deeper than {MAX_INDEX_DEPTH}"
    )))
}

/// Picks the manifest of an OCI layout's index: the one whose ref name is the image's tag when there is such a
/// one, else the one for this host's platform.
fn choose<'a>(index: &'a Index, name: &str, wanted: &oci::Platform) -> Result<&'a oci::Descriptor, ImageError> {
    let tag = name.rsplit_once(':').map(|(_, tag)| tag);
    let by_name = index.manifests.iter().find(|descriptor| {
        descriptor
            .annotations
            .get("org.opencontainers.image.ref.name")
            .is_some_and(|reference| Some(reference.as_str()) == tag || reference == name)
    });
    match by_name {
        Some(found) => Ok(found),
        None => Ok(oci::select_manifest(index, wanted)?),
    }
}

fn import_docker_archive(store: &ImageStore, name: &str, mut contents: Contents) -> Result<Image, ImageError> {
    let entries: Vec<DockerArchiveEntry> = oci::parse(
        "manifest.json",
        contents.document(Path::new("manifest.json"), "manifest")?,
    )?;
    let entry = match entries.as_slice() {
        [only] => only.clone(),
        [] => return Err(archive_error("the archive's manifest.json lists no image".into())),
        many => many
            .iter()
            .find(|entry| entry.repo_tags.iter().flatten().any(|tag| tag == name))
            .cloned()
            .ok_or_else(|| {
                let tags: Vec<String> = many
                    .iter()
                    .map(|entry| entry.repo_tags.clone().unwrap_or_default().join(" "))
                    .collect();
                archive_error(format!(
                    "the archive holds {} images ({}); import it under one of those names",
                    many.len(),
                    tags.join(", ")
                ))
            })?,
    };
    if entry.layers.len() > oci::MAX_LAYERS {
        return Err(archive_error(format!(
            "the image has {} layers; nook mounts at most {}",
            entry.layers.len(),
            oci::MAX_LAYERS
        )));
    }
    let config_path = normalise(entry.config.as_bytes()).map_err(archive_error)?;
    let config_bytes = contents.document(&config_path, "config")?.to_vec();
    let config: ConfigFile = oci::parse("config", &config_bytes)?;
    let mut layers = Vec::with_capacity(entry.layers.len());
    for layer in &entry.layers {
        let path = normalise(layer.as_bytes()).map_err(archive_error)?;
        layers.push(contents.take_layer(&path)?);
    }
    // Docker names an image by its config's digest.
    finish(store, name, &oci::sha256_digest(&config_bytes), &config, layers)
}

/// Verifies the layers against the config and commits the image.
fn finish(
    store: &ImageStore,
    name: &str,
    digest: &str,
    config: &ConfigFile,
    layers: Vec<Candidate>,
) -> Result<Image, ImageError> {
    let diff_ids: Vec<String> = layers.iter().map(|layer| layer.diff_id.clone()).collect();
    oci::check_diff_ids(config, &diff_ids)?;
    let size_bytes = layers.iter().map(|layer| layer.size_bytes).sum();
    let mut pins = Vec::new();
    for layer in layers.into_iter().filter_map(|candidate| candidate.layer) {
        pins.push(store.adopt(layer)?);
    }
    let committed = store.commit(name, digest, diff_ids, size_bytes, oci::image_config(config));
    drop(pins);
    committed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::oci::sha256_digest;
    use crate::images::test_support::{gzip, tar_of};
    use nook_api::ImageConfig;

    fn config_json(diff_ids: &[String]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/bin", "GREETING=hi"], "WorkingDir": "/srv", "User": "1000",
                       "Cmd": ["serve"], "ExposedPorts": {"80/tcp": {}}, "Labels": {"a": "b"}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap()
    }

    /// An OCI layout of `layers` (uncompressed tars), blobs first and the index last, as tools often write it.
    fn oci_layout(layers: &[Vec<u8>]) -> (Vec<u8>, String) {
        let blobs: Vec<Vec<u8>> = layers.iter().map(|layer| gzip(layer)).collect();
        let diff_ids: Vec<String> = layers.iter().map(|layer| sha256_digest(layer)).collect();
        let config = config_json(&diff_ids);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": oci::MEDIA_OCI_MANIFEST,
            "config": {"mediaType": oci::MEDIA_OCI_CONFIG, "digest": sha256_digest(&config), "size": config.len()},
            "layers": blobs.iter().map(|blob| serde_json::json!({
                "mediaType": oci::MEDIA_OCI_LAYER_GZIP, "digest": sha256_digest(blob), "size": blob.len()})).collect::<Vec<_>>(),
        }))
        .unwrap();
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": oci::MEDIA_OCI_MANIFEST, "digest": sha256_digest(&manifest),
                           "size": manifest.len(), "platform": {"os": "linux", "architecture": "amd64"}}],
        }))
        .unwrap();
        let mut members: Vec<(String, Vec<u8>)> =
            vec![("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec())];
        for blob in blobs.iter().chain([&config, &manifest]) {
            members.push((format!("blobs/sha256/{}", &sha256_digest(blob)[7..]), blob.clone()));
        }
        members.push(("index.json".into(), index));
        let refs: Vec<(&str, &[u8])> = members.iter().map(|(p, d)| (p.as_str(), d.as_slice())).collect();
        (tar_of(&refs), sha256_digest(&manifest))
    }

    fn leftovers(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("layers/tmp")).unwrap().count()
    }

    #[test]
    fn an_oci_layout_imports_with_its_layers_whiteouts_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let lower = tar_of(&[("etc/motd", b"hello"), ("etc/gone", b"x"), ("var/cache/old", b"o")]);
        let upper = tar_of(&[
            ("etc/.wh.gone", b""),
            ("var/cache/.wh..wh..opq", b""),
            ("var/cache/new", b"n"),
        ]);
        let (archive, manifest_digest) = oci_layout(&[lower.clone(), upper.clone()]);
        let image = store
            .import("app:1", archive.as_slice(), ImageConfig::default())
            .unwrap();
        assert_eq!(image.digest, manifest_digest);
        assert_eq!(image.layers, [sha256_digest(&lower), sha256_digest(&upper)]);
        assert_eq!(image.config.env, ["PATH=/bin", "GREETING=hi"]);
        assert_eq!(image.config.working_dir.as_deref(), Some("/srv"));
        assert_eq!(image.config.user.as_deref(), Some("1000"));
        assert_eq!(image.config.cmd, ["serve"]);
        assert_eq!(image.config.exposed_ports, ["80/tcp"]);
        let upper_dir = store.layer_dir(&image.layers[1]);
        assert!(std::fs::symlink_metadata(upper_dir.join("etc/gone"))
            .unwrap()
            .file_type()
            .is_char_device());
        assert_eq!(
            std::fs::read(store.layer_dir(&image.layers[0]).join("etc/motd")).unwrap(),
            b"hello"
        );
        assert_eq!(leftovers(dir.path()), 0);
        // The same layers again are not unpacked into a second copy.
        let again = store
            .import("app:2", oci_layout(&[lower]).0.as_slice(), ImageConfig::default())
            .unwrap();
        assert_eq!(again.layers[0], image.layers[0]);
        assert_eq!(std::fs::read_dir(dir.path().join("layers/sha256")).unwrap().count(), 2);
    }

    use std::os::unix::fs::FileTypeExt;

    #[test]
    fn a_docker_save_archive_with_a_linked_layer_imports() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let layer = tar_of(&[("bin/tool", b"#!")]);
        let diff_id = sha256_digest(&layer);
        // The same layer twice: docker save links the second copy to the first.
        let config = config_json(&[diff_id.clone(), diff_id.clone()]);
        let config_name = format!("{}.json", &sha256_digest(&config)[7..]);
        let manifest = serde_json::to_vec(&serde_json::json!([{
            "Config": config_name, "RepoTags": ["tool:latest"], "Layers": ["aaa/layer.tar", "bbb/layer.tar"]}]))
        .unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in [
            ("aaa/layer.tar", &layer),
            (&config_name, &config),
            ("manifest.json", &manifest),
        ] {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, path, data.as_slice()).unwrap();
        }
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        builder
            .append_link(&mut link, "bbb/layer.tar", "../aaa/layer.tar")
            .unwrap();
        let mut bytes = builder.into_inner().unwrap();
        // Put a hex-named directory first, as docker does, so the archive is recognised.
        let mut first = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_size(0);
        header.set_mode(0o755);
        header.set_cksum();
        first
            .append_data(&mut header, format!("{}/", "a".repeat(64)), std::io::empty())
            .unwrap();
        let mut archive = first.into_inner().unwrap();
        archive.truncate(archive.len() - 1024);
        archive.append(&mut bytes);
        let image = store
            .import("tool:latest", gzip(&archive).as_slice(), ImageConfig::default())
            .unwrap();
        assert_eq!(image.layers, [diff_id.clone(), diff_id]);
        assert_eq!(image.digest, sha256_digest(&config));
        assert_eq!(leftovers(dir.path()), 0);
    }

    #[test]
    fn a_layer_that_does_not_match_its_digest_is_refused_and_nothing_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let layer = tar_of(&[("a", b"1")]);
        let (archive, _) = oci_layout(&[layer]);
        // Swap the layer blob's content for another tar of the same length.
        let evil = gzip(&tar_of(&[("a", b"2")]));
        let mut archive_members = Vec::new();
        let mut stream = TarStream::new(archive.as_slice());
        while let Some(entry) = stream.next_entry().unwrap() {
            let mut data = Vec::new();
            stream.data().read_to_end(&mut data).unwrap();
            let is_layer = data.starts_with(&[0x1f, 0x8b]);
            archive_members.push((entry.display_path(), if is_layer { evil.clone() } else { data }));
        }
        let refs: Vec<(&str, &[u8])> = archive_members
            .iter()
            .map(|(p, d)| (p.as_str(), d.as_slice()))
            .collect();
        let error = store
            .import("evil", tar_of(&refs).as_slice(), ImageConfig::default())
            .unwrap_err();
        assert!(
            matches!(&error, ImageError::Format(FormatError::DigestMismatch { what, .. }) if what == "layer blob"),
            "{error:?}"
        );
        assert_eq!(leftovers(dir.path()), 0);
        assert_eq!(std::fs::read_dir(dir.path().join("layers/sha256")).unwrap().count(), 0);
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn a_hostile_layer_in_an_archive_is_refused_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let mut hostile = tar_of(&[("placeholder", b"x")]);
        hostile[..11].copy_from_slice(b"../../x\0\0\0\0");
        let mut header = tar::Header::from_byte_slice(&hostile[..512]).clone();
        header.set_cksum();
        hostile[..512].copy_from_slice(header.as_bytes());
        let (archive, _) = oci_layout(&[hostile]);
        let error = store
            .import("hostile", archive.as_slice(), ImageConfig::default())
            .unwrap_err();
        match &error {
            ImageError::UnusableLayer {
                source: UnpackError::Refused { reason, .. },
                ..
            } => assert!(reason.contains("'..'"), "{reason}"),
            other => panic!("expected the refused layer, got {other:?}"),
        }
        assert_eq!(leftovers(dir.path()), 0);
    }

    #[test]
    fn an_archive_without_an_index_or_manifest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let archive = tar_of(&[("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)]);
        let error = store
            .import("x", archive.as_slice(), ImageConfig::default())
            .unwrap_err();
        assert!(
            matches!(&error, ImageError::Format(FormatError::Invalid(message)) if message.contains("neither an OCI image layout")),
            "{error:?}"
        );
    }

    #[test]
    fn archives_are_told_from_root_file_systems_by_their_first_member() {
        assert!(looks_like_image_archive(b"oci-layout"));
        assert!(looks_like_image_archive(b"./blobs/sha256/"));
        assert!(looks_like_image_archive(b"manifest.json"));
        assert!(looks_like_image_archive(format!("{}.json", "0".repeat(64)).as_bytes()));
        assert!(!looks_like_image_archive(b"./"));
        assert!(!looks_like_image_archive(b"bin/"));
        assert!(!looks_like_image_archive(b"etc/manifest.json"));
    }
}
