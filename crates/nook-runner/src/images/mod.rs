//! The runner's content-addressed image store.
//!
//! Layers are unpacked once into `layers/sha256/<hex>/`, where `<hex>` is the sha256 of the layer's uncompressed
//! tar stream (the OCI "diff id"), and shared read-only by every sandbox made from any image that contains them.
//! Images are small records (`images/<digest hex>.json`) naming their layers and config; `names.json` maps image
//! names to image digests; `layers/sizes/<hex>` holds each layer's size and `layers/exports/<hex>.json` what its last
//! export for a push produced. An import streams the tar through a hasher while unpacking it into `layers/tmp/`, so
//! nothing is buffered in memory and a layer whose digest is already present is discarded for the existing one.
//!
//! Submodules: [`tar_stream`] (bounded tar reader), [`unpack`] (safe unpacking, OCI → overlayfs whiteouts),
//! [`archive`] (OCI layouts and `docker save`), [`oci`] (image documents), [`registry`] (pulls), [`push`] (layer
//! export and pushes). Layers adopted by an import or pull are pinned until its image is committed, so [`prune`]
//! (which removes unnamed images and layers no named image, sandbox or pin uses) never races one.
//!
//! [`prune`]: ImageStore::prune

pub mod archive;
pub mod oci;
pub mod push;
pub mod registry;
pub mod tar_stream;
#[cfg(test)]
mod test_support;
pub mod unpack;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::Utc;
use nook_api::{Image, ImageConfig};
use serde::{Deserialize, Serialize};

use tar_stream::{TarError, TarStream};
use unpack::HashingReader;

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No image has this name.
    #[error("image {0:?} does not exist")]
    NotFound(String),
    /// The image name is malformed.
    #[error("{0}")]
    InvalidName(String),
    /// A layer could not be read or unpacked.
    #[error("unpacking a layer of the image failed")]
    Unpack(#[from] unpack::UnpackError),
    /// The store's files could not be read or written.
    #[error("{action} {path} failed")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// A store record is corrupt.
    #[error("image record {path} is corrupt")]
    Corrupt {
        /// The record.
        path: PathBuf,
        /// The parser error.
        #[source]
        source: serde_json::Error,
    },
    /// A layer an image archive names is a member that could not be unpacked.
    #[error("layer {layer} of the archive cannot be used")]
    UnusableLayer {
        /// The member's path in the archive.
        layer: String,
        /// Why it could not be unpacked.
        #[source]
        source: unpack::UnpackError,
    },
    /// An image archive or registry document is malformed or does not verify.
    #[error("the image is malformed")]
    Format(#[from] oci::FormatError),
    /// A registry could not be reached, refused, or answered something unusable.
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    /// The image is used by sandboxes and cannot be removed.
    #[error("image {name:?} is used by {count} sandbox(es)")]
    InUse {
        /// Image name.
        name: String,
        /// How many sandboxes use it.
        count: usize,
    },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The stored record of one image (its name lives in the name index).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ImageRecord {
    digest: String,
    layers: Vec<String>,
    size_bytes: u64,
    config: ImageConfig,
    created_at: chrono::DateTime<Utc>,
}

/// The image store under one directory.
pub struct ImageStore {
    root: PathBuf,
    /// Serialises updates of the name index (and garbage collection against them).
    names_lock: Mutex<()>,
    /// Layers in use by imports and pulls that have not committed their image yet: never collected.
    pins: Arc<Mutex<HashMap<String, usize>>>,
}

/// Keeps a layer from garbage collection while an import or pull that uses it has not committed its image.
pub struct LayerPin {
    pins: Arc<Mutex<HashMap<String, usize>>>,
    diff_id: String,
}

impl Drop for LayerPin {
    fn drop(&mut self) {
        let mut pins = self.pins.lock().expect("layer pins");
        if let Some(count) = pins.get_mut(&self.diff_id) {
            *count -= 1;
            if *count == 0 {
                pins.remove(&self.diff_id);
            }
        }
    }
}

/// What a garbage collection removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Image records no name pointed to.
    pub images_removed: u64,
    /// Layers no image, sandbox or running import used.
    pub layers_removed: u64,
    /// Bytes of file data those layers held.
    pub bytes_freed: u64,
}

impl ImageStore {
    /// Opens (and creates) the store under `root`.
    pub fn open(root: &Path) -> Result<Self, ImageError> {
        for dir in ["layers/sha256", "layers/sizes", "layers/tmp", "images"] {
            let path = root.join(dir);
            std::fs::create_dir_all(&path).map_err(io_error("creating", &path))?;
        }
        // Leftovers of imports interrupted by a crash.
        let tmp = root.join("layers/tmp");
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            names_lock: Mutex::new(()),
            pins: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    fn names_path(&self) -> PathBuf {
        self.root.join("names.json")
    }

    fn read_names(&self) -> Result<BTreeMap<String, String>, ImageError> {
        let path = self.names_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| ImageError::Corrupt { path, source }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(source) => Err(ImageError::Io {
                action: "reading",
                path,
                source,
            }),
        }
    }

    fn write_names(&self, names: &BTreeMap<String, String>) -> Result<(), ImageError> {
        write_atomically(
            &self.names_path(),
            &serde_json::to_vec_pretty(names).expect("serializable"),
        )
    }

    fn record_path(&self, digest: &str) -> PathBuf {
        self.root.join("images").join(format!("{}.json", hex_of(digest)))
    }

    fn read_record(&self, digest: &str) -> Result<ImageRecord, ImageError> {
        let path = self.record_path(digest);
        let bytes = std::fs::read(&path).map_err(io_error("reading", &path))?;
        serde_json::from_slice(&bytes).map_err(|source| ImageError::Corrupt { path, source })
    }

    /// Directory holding an unpacked layer.
    pub fn layer_dir(&self, digest: &str) -> PathBuf {
        self.root.join("layers/sha256").join(hex_of(digest))
    }

    /// Looks an image up by name.
    pub fn get(&self, name: &str) -> Result<Image, ImageError> {
        let names = self.read_names()?;
        let digest = names.get(name).ok_or_else(|| ImageError::NotFound(name.to_string()))?;
        let record = self.read_record(digest)?;
        Ok(to_image(name, record))
    }

    /// All images, by name.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let names = self.read_names()?;
        names
            .iter()
            .map(|(name, digest)| self.read_record(digest).map(|record| to_image(name, record)))
            .collect()
    }

    /// Gives the image named `source` a second name `target` (replacing what `target` named).
    pub fn tag(&self, source: &str, target: &str) -> Result<Image, ImageError> {
        nook_api::names::check_image_name(target).map_err(ImageError::InvalidName)?;
        let _guard = self.names_lock.lock().expect("names lock");
        let mut names = self.read_names()?;
        let digest = names
            .get(source)
            .cloned()
            .ok_or_else(|| ImageError::NotFound(source.to_string()))?;
        let record = self.read_record(&digest)?;
        names.insert(target.to_string(), digest);
        self.write_names(&names)?;
        Ok(to_image(target, record))
    }

    /// Removes a name; the layers stay for other names and sandboxes until `prune`.
    pub fn remove(&self, name: &str) -> Result<(), ImageError> {
        let _guard = self.names_lock.lock().expect("names lock");
        let mut names = self.read_names()?;
        if names.remove(name).is_none() {
            return Err(ImageError::NotFound(name.to_string()));
        }
        self.write_names(&names)
    }

    /// Imports an image from a tar stream (plain, gzip or zstd) and names it `name`, replacing what the name pointed
    /// to. The stream is an image archive (an OCI image layout or a `docker save` tarball, recognised by its first
    /// member) or else a root file system, imported as a one-layer image configured with `rootfs_config`.
    /// Blocking: call from a blocking thread.
    pub fn import(&self, name: &str, reader: impl Read, rootfs_config: ImageConfig) -> Result<Image, ImageError> {
        nook_api::names::check_image_name(name).map_err(ImageError::InvalidName)?;
        let decompressed =
            unpack::decompressed(reader).map_err(|error| ImageError::Unpack(TarError::Io(error).into()))?;
        let mut hashing = HashingReader::new(decompressed);
        let mut tar = TarStream::new(&mut hashing);
        let first = tar.next_entry().map_err(|error| ImageError::Unpack(error.into()))?;
        if let Some(first) = first
            .as_ref()
            .filter(|entry| archive::looks_like_image_archive(&entry.path))
        {
            return archive::import(self, name, &mut tar, first.clone());
        }
        let mut layer = self.temp_layer()?;
        layer.size_bytes = unpack::unpack_entries(&mut tar, first, layer.dir())?;
        layer.diff_id = unpack::finish_digest(hashing)?;
        let diff_id = layer.diff_id.clone();
        let pin = self.adopt(layer)?;
        let committed = self.commit_layers(name, vec![diff_id], rootfs_config);
        drop(pin);
        committed
    }

    /// Records an image made of stored layers (lowest first) and a config, identified by the digest of both, and
    /// points `name` at it (an import of a root filesystem, a build).
    pub(crate) fn commit_layers(
        &self,
        name: &str,
        layers: Vec<String>,
        config: ImageConfig,
    ) -> Result<Image, ImageError> {
        nook_api::names::check_image_name(name).map_err(ImageError::InvalidName)?;
        let manifest = serde_json::json!({ "layers": &layers, "config": &config });
        let digest = oci::sha256_digest(manifest.to_string().as_bytes());
        let size_bytes = layers.iter().map(|layer| self.layer_size(layer)).sum();
        self.commit(name, &digest, layers, size_bytes, config)
    }

    /// A fresh path in the store's scratch area (on the layers' filesystem, so a directory there becomes a layer by a
    /// rename); nothing is created.
    pub(crate) fn scratch_path(&self) -> PathBuf {
        self.root.join("layers/tmp").join(random_suffix())
    }

    /// Makes `dir`, a directory of the scratch area ([`Self::scratch_path`]) in overlayfs form (a sandbox's writable
    /// layer), a layer of the store; `None` when it is empty. Overlayfs's own bookkeeping attributes (all but opaque
    /// markers) are removed first, so the layer is the same whatever kernel wrote it. `dir` is gone afterwards (moved
    /// into the store, or removed); the layer stays pinned while the pin lives.
    pub(crate) fn adopt_directory(&self, dir: PathBuf) -> Result<Option<(String, LayerPin)>, ImageError> {
        let mut layer = TempLayer {
            dir: Some(dir.clone()),
            diff_id: String::new(),
            size_bytes: 0,
        };
        let empty = std::fs::read_dir(&dir)
            .map_err(io_error("reading", &dir))?
            .next()
            .is_none();
        if empty {
            return Ok(None);
        }
        unpack::strip_overlay_bookkeeping(&dir).map_err(io_error("cleaning overlayfs attributes in", &dir))?;
        let (diff_id, size_bytes) = push::layer_digest(&dir).map_err(io_error("hashing the layer", &dir))?;
        layer.diff_id = diff_id.clone();
        layer.size_bytes = size_bytes;
        let pin = self.adopt(layer)?;
        Ok(Some((diff_id, pin)))
    }

    /// Records an image whose layers are in the store and points `name` at it.
    fn commit(
        &self,
        name: &str,
        digest: &str,
        layers: Vec<String>,
        size_bytes: u64,
        config: ImageConfig,
    ) -> Result<Image, ImageError> {
        let record = ImageRecord {
            digest: digest.to_string(),
            layers,
            size_bytes,
            config,
            created_at: Utc::now(),
        };
        write_atomically(
            &self.record_path(digest),
            &serde_json::to_vec_pretty(&record).expect("serializable"),
        )?;
        let _guard = self.names_lock.lock().expect("names lock");
        let mut names = self.read_names()?;
        names.insert(name.to_string(), digest.to_string());
        self.write_names(&names)?;
        Ok(to_image(name, record))
    }

    /// A fresh, empty directory for unpacking a layer, removed unless adopted.
    fn temp_layer(&self) -> Result<TempLayer, ImageError> {
        let dir = self.scratch_path();
        std::fs::create_dir_all(&dir).map_err(io_error("creating", &dir))?;
        Ok(TempLayer {
            dir: Some(dir),
            diff_id: String::new(),
            size_bytes: 0,
        })
    }

    /// Unpacks one layer blob (plain, gzip or zstd) into a temporary directory.
    pub(crate) fn unpack_temp_layer(&self, reader: impl Read) -> Result<TempLayer, ImageError> {
        let mut layer = self.temp_layer()?;
        let unpacked = unpack::unpack_layer(reader, layer.dir())?;
        layer.diff_id = unpacked.diff_id;
        layer.size_bytes = unpacked.size_bytes;
        Ok(layer)
    }

    /// Size of the regular files' data of a stored layer (0 when the store does not know it).
    pub fn layer_size(&self, diff_id: &str) -> u64 {
        std::fs::read_to_string(self.layer_size_path(diff_id))
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0)
    }

    fn layer_size_path(&self, diff_id: &str) -> PathBuf {
        self.root.join("layers/sizes").join(hex_of(diff_id))
    }

    /// Keeps the layer `diff_id` from garbage collection until the pin is dropped.
    pub(crate) fn pin(&self, diff_id: &str) -> LayerPin {
        *self
            .pins
            .lock()
            .expect("layer pins")
            .entry(diff_id.to_string())
            .or_default() += 1;
        LayerPin {
            pins: self.pins.clone(),
            diff_id: diff_id.to_string(),
        }
    }

    /// Moves an unpacked layer into the store under its diff id (when the store has it already, the copy is
    /// dropped); the layer stays pinned until the image that uses it is committed.
    pub(crate) fn adopt(&self, mut layer: TempLayer) -> Result<LayerPin, ImageError> {
        let pin = self.pin(&layer.diff_id);
        let final_dir = self.layer_dir(&layer.diff_id);
        if final_dir.exists() {
            return Ok(pin);
        }
        // The size is recorded first: a layer directory in place always has its size beside it.
        write_atomically(
            &self.layer_size_path(&layer.diff_id),
            layer.size_bytes.to_string().as_bytes(),
        )?;
        let tmp = layer
            .dir
            .take()
            .expect("a temporary layer has its directory until adopted");
        if let Err(error) = std::fs::rename(&tmp, &final_dir) {
            let _ = std::fs::remove_dir_all(&tmp);
            // A concurrent import of the same layer won the race: its copy is identical.
            let lost_race = matches!(error.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST));
            if !lost_race {
                return Err(ImageError::Io {
                    action: "moving layer into",
                    path: final_dir,
                    source: error,
                });
            }
        }
        Ok(pin)
    }

    /// Removes image records no name points to, and layers that no named image uses, no running import or pull has
    /// pinned, and that are not in `in_use` (the diff ids the runner's sandboxes are built on).
    pub fn prune(&self, in_use: &HashSet<String>) -> Result<PruneReport, ImageError> {
        let _guard = self.names_lock.lock().expect("names lock");
        let mut report = PruneReport::default();
        let named: HashSet<String> = self.read_names()?.into_values().collect();
        let mut keep: HashSet<String> = in_use.iter().map(|diff_id| hex_of(diff_id).to_string()).collect();
        keep.extend(
            self.pins
                .lock()
                .expect("layer pins")
                .keys()
                .map(|d| hex_of(d).to_string()),
        );
        let images = self.root.join("images");
        for entry in std::fs::read_dir(&images)
            .map_err(io_error("listing", &images))?
            .flatten()
        {
            let path = entry.path();
            let Some(hex) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            let digest = format!("sha256:{hex}");
            if named.contains(&digest) {
                let record = self.read_record(&digest)?;
                keep.extend(record.layers.iter().map(|diff_id| hex_of(diff_id).to_string()));
            } else {
                std::fs::remove_file(&path).map_err(io_error("removing", &path))?;
                report.images_removed += 1;
            }
        }
        let layers = self.root.join("layers/sha256");
        for entry in std::fs::read_dir(&layers)
            .map_err(io_error("listing", &layers))?
            .flatten()
        {
            let hex = entry.file_name().to_string_lossy().into_owned();
            if keep.contains(&hex) {
                continue;
            }
            let size = self.layer_size(&hex);
            // Renamed away first, so a half-removed layer is never mistaken for a whole one.
            let doomed = self.root.join("layers/tmp").join(format!("gc-{hex}"));
            std::fs::rename(entry.path(), &doomed).map_err(io_error("removing layer", &entry.path()))?;
            std::fs::remove_dir_all(&doomed).map_err(io_error("removing", &doomed))?;
            for leftover in [
                self.layer_size_path(&hex),
                self.root.join("layers/exports").join(format!("{hex}.json")),
            ] {
                let _ = std::fs::remove_file(leftover);
            }
            report.layers_removed += 1;
            report.bytes_freed += size;
        }
        Ok(report)
    }
}

/// A layer unpacked into the store's temporary directory and not yet part of the store; dropping it removes it.
pub(crate) struct TempLayer {
    dir: Option<PathBuf>,
    /// sha256 of the uncompressed tar stream.
    pub diff_id: String,
    /// Size of the regular files' data.
    pub size_bytes: u64,
}

impl TempLayer {
    fn dir(&self) -> &Path {
        self.dir
            .as_deref()
            .expect("a temporary layer has its directory until adopted")
    }
}

impl Drop for TempLayer {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn to_image(name: &str, record: ImageRecord) -> Image {
    Image {
        name: name.to_string(),
        digest: record.digest,
        layers: record.layers,
        size_bytes: record.size_bytes,
        config: record.config,
        created_at: record.created_at,
    }
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

fn random_suffix() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..12).map(|_| char::from(b'a' + rng.gen_range(0..26u8))).collect()
}

/// Writes a file by writing a sibling and renaming it over, so readers never see half a file.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let tmp = path.with_extension(format!("tmp-{}", random_suffix()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        ImageError::Io {
            action: "writing",
            path: path.to_path_buf(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::test_support::{gzip, tar_of};
    use super::*;

    #[test]
    fn import_is_content_addressed_and_shared() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let tar = tar_of(&[("etc/hello", b"hi\n")]);
        let first = store.import("one", tar.as_slice(), ImageConfig::default()).unwrap();
        let second = store.import("two", tar.as_slice(), ImageConfig::default()).unwrap();
        assert_eq!(first.layers, second.layers);
        assert_eq!(first.size_bytes, 3);
        let layer = store.layer_dir(&first.layers[0]);
        assert_eq!(std::fs::read(layer.join("etc/hello")).unwrap(), b"hi\n");
        let names: Vec<_> = store.list().unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["one", "two"]);
        assert!(std::fs::read_dir(dir.path().join("layers/tmp"))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn gzip_and_plain_give_the_same_layer() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let tar = tar_of(&[("a", b"x")]);
        let gz = gzip(&tar);
        let plain = store.import("plain", tar.as_slice(), ImageConfig::default()).unwrap();
        let zipped = store.import("zipped", gz.as_slice(), ImageConfig::default()).unwrap();
        assert_eq!(plain.layers, zipped.layers);
    }

    #[test]
    fn garbage_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let garbage = vec![7u8; 1500];
        assert!(store.import("bad", garbage.as_slice(), ImageConfig::default()).is_err());
        assert!(matches!(store.get("bad"), Err(ImageError::NotFound(_))));
        assert!(std::fs::read_dir(dir.path().join("layers/tmp"))
            .unwrap()
            .next()
            .is_none());
        assert!(std::fs::read_dir(dir.path().join("layers/sha256"))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn prune_removes_what_no_name_sandbox_or_import_uses() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let shared = store
            .import("shared", tar_of(&[("a", b"1")]).as_slice(), ImageConfig::default())
            .unwrap();
        let alias = store
            .import("alias", tar_of(&[("a", b"1")]).as_slice(), ImageConfig::default())
            .unwrap();
        let gone = store
            .import("gone", tar_of(&[("b", b"22")]).as_slice(), ImageConfig::default())
            .unwrap();
        let used = store
            .import("used", tar_of(&[("c", b"333")]).as_slice(), ImageConfig::default())
            .unwrap();
        let pinned = store
            .import("pinned", tar_of(&[("d", b"4444")]).as_slice(), ImageConfig::default())
            .unwrap();
        assert_eq!(shared.layers, alias.layers);
        for name in ["alias", "gone", "used", "pinned"] {
            store.remove(name).unwrap();
        }
        let in_use: HashSet<String> = used.layers.iter().cloned().collect();
        let pin = store.pin(&pinned.layers[0]);
        let report = store.prune(&in_use).unwrap();
        // Three records lost their names ("alias" is the same image as "shared"); the shared layer, the sandbox's
        // and the pinned one stay.
        assert_eq!(report.images_removed, 3);
        assert_eq!((report.layers_removed, report.bytes_freed), (1, 2));
        assert!(!store.layer_dir(&gone.layers[0]).exists());
        for kept in [&shared.layers[0], &used.layers[0], &pinned.layers[0]] {
            assert!(store.layer_dir(kept).exists());
        }
        assert_eq!(store.get("shared").unwrap().layers, shared.layers);
        drop(pin);
        let report = store.prune(&HashSet::new()).unwrap();
        assert_eq!((report.images_removed, report.layers_removed), (0, 2));
        assert!(std::fs::read_dir(dir.path().join("layers/tmp"))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn a_tag_is_a_second_name_for_the_same_image() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let image = store
            .import("app", tar_of(&[("a", b"1")]).as_slice(), ImageConfig::default())
            .unwrap();
        let tagged = store.tag("app", "app:stable").unwrap();
        assert_eq!(
            (tagged.name.as_str(), tagged.digest.as_str()),
            ("app:stable", image.digest.as_str())
        );
        store.remove("app").unwrap();
        assert_eq!(store.get("app:stable").unwrap().digest, image.digest);
        assert!(matches!(store.tag("missing", "x"), Err(ImageError::NotFound(_))));
        assert!(matches!(
            store.tag("app:stable", "../x"),
            Err(ImageError::InvalidName(_))
        ));
    }

    #[test]
    fn bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let tar = tar_of(&[("a", b"x")]);
        assert!(matches!(
            store.import("../x", tar.as_slice(), ImageConfig::default()),
            Err(ImageError::InvalidName(_))
        ));
    }
}
