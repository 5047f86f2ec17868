//! The runner's content-addressed image store.
//!
//! Layers are unpacked once into `layers/sha256/<hex>/`, where `<hex>` is the sha256 of the layer's uncompressed
//! tar stream (the OCI "diff id"), and shared read-only by every sandbox made from any image that contains them.
//! Images are small records (`images/<digest hex>.json`) naming their layers and config; `names.json` maps image
//! names to image digests. An import streams the tar through a hasher while unpacking it into a temporary directory,
//! so nothing is buffered in memory and nothing is unpacked twice: a layer whose digest is already present is
//! discarded and the existing one is used.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::Utc;
use nook_api::{Image, ImageConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No image has this name.
    #[error("image {0:?} does not exist")]
    NotFound(String),
    /// The image name is malformed.
    #[error("{0}")]
    InvalidName(String),
    /// The archive could not be read or unpacked.
    #[error("unpacking the image archive failed")]
    Unpack(#[source] std::io::Error),
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
    /// Serialises updates of the name index.
    names_lock: Mutex<()>,
}

impl ImageStore {
    /// Opens (and creates) the store under `root`.
    pub fn open(root: &Path) -> Result<Self, ImageError> {
        for dir in ["layers/sha256", "layers/tmp", "images"] {
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

    /// Removes a name; the layers stay for other images (garbage collection is a later concern).
    pub fn remove(&self, name: &str) -> Result<(), ImageError> {
        let _guard = self.names_lock.lock().expect("names lock");
        let mut names = self.read_names()?;
        if names.remove(name).is_none() {
            return Err(ImageError::NotFound(name.to_string()));
        }
        self.write_names(&names)
    }

    /// Imports a single-layer image from a tar stream (plain or gzip-compressed, detected from its first bytes),
    /// and names it `name`, replacing what the name pointed to. Blocking: call from a blocking thread.
    pub fn import_tar(&self, name: &str, reader: impl Read, config: ImageConfig) -> Result<Image, ImageError> {
        nook_api::names::check_image_name(name).map_err(ImageError::InvalidName)?;
        let (layer, size_bytes) = self.import_layer(reader)?;
        let created_at = Utc::now();
        let manifest = serde_json::json!({ "layers": [&layer], "config": &config });
        let digest = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(manifest.to_string().as_bytes()))
        );
        let record = ImageRecord {
            digest: digest.clone(),
            layers: vec![layer],
            size_bytes,
            config,
            created_at,
        };
        write_atomically(
            &self.record_path(&digest),
            &serde_json::to_vec_pretty(&record).expect("serializable"),
        )?;
        let _guard = self.names_lock.lock().expect("names lock");
        let mut names = self.read_names()?;
        names.insert(name.to_string(), digest);
        self.write_names(&names)?;
        Ok(to_image(name, record))
    }

    /// Unpacks one layer, returning its digest and unpacked size.
    fn import_layer(&self, reader: impl Read) -> Result<(String, u64), ImageError> {
        let tmp = self.root.join("layers/tmp").join(random_suffix());
        std::fs::create_dir_all(&tmp).map_err(io_error("creating", &tmp))?;
        let result = unpack_hashed(reader, &tmp);
        let (digest, size) = match result {
            Ok(done) => done,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(error);
            }
        };
        let final_dir = self.layer_dir(&digest);
        if final_dir.exists() {
            let _ = std::fs::remove_dir_all(&tmp);
        } else if let Err(error) = std::fs::rename(&tmp, &final_dir) {
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
        Ok((digest, size))
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

/// A reader that hashes and counts everything read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Unpacks a (possibly gzip-compressed) tar into `dest`, returning the digest of the uncompressed stream and the
/// total size of the regular files.
fn unpack_hashed(reader: impl Read, dest: &Path) -> Result<(String, u64), ImageError> {
    let mut reader = std::io::BufReader::with_capacity(1 << 20, reader);
    let is_gzip = {
        use std::io::BufRead;
        let head = reader.fill_buf().map_err(ImageError::Unpack)?;
        head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b
    };
    let source: Box<dyn Read> = if is_gzip {
        Box::new(flate2::read::GzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let mut hashing = HashingReader {
        inner: source,
        hasher: Sha256::new(),
    };
    let mut size = 0u64;
    {
        let mut archive = tar::Archive::new(&mut hashing);
        archive.set_preserve_permissions(true);
        archive.set_preserve_ownerships(true);
        archive.set_preserve_mtime(true);
        archive.set_unpack_xattrs(true);
        archive.set_overwrite(true);
        for entry in archive.entries().map_err(ImageError::Unpack)? {
            let mut entry = entry.map_err(ImageError::Unpack)?;
            if entry.header().entry_type().is_file() {
                size += entry.size();
            }
            // `unpack_in` refuses entries whose path would leave `dest`.
            entry.unpack_in(dest).map_err(ImageError::Unpack)?;
        }
    }
    // The tar reader stops at the end-of-archive marker; hash the rest so the digest covers the whole stream.
    std::io::copy(&mut hashing, &mut std::io::sink()).map_err(ImageError::Unpack)?;
    Ok((format!("sha256:{}", hex::encode(hashing.hasher.finalize())), size))
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
    use super::*;

    fn tar_with(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_cksum();
            builder.append_data(&mut header, path, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn import_is_content_addressed_and_shared() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let tar = tar_with(&[("etc/hello", b"hi\n")]);
        let first = store.import_tar("one", tar.as_slice(), ImageConfig::default()).unwrap();
        let second = store.import_tar("two", tar.as_slice(), ImageConfig::default()).unwrap();
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
        let tar = tar_with(&[("a", b"x")]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let plain = store
            .import_tar("plain", tar.as_slice(), ImageConfig::default())
            .unwrap();
        let zipped = store
            .import_tar("zipped", gz.as_slice(), ImageConfig::default())
            .unwrap();
        assert_eq!(plain.layers, zipped.layers);
    }

    #[test]
    fn garbage_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let garbage = vec![7u8; 1500];
        assert!(store
            .import_tar("bad", garbage.as_slice(), ImageConfig::default())
            .is_err());
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
    fn bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let tar = tar_with(&[("a", b"x")]);
        assert!(matches!(
            store.import_tar("../x", tar.as_slice(), ImageConfig::default()),
            Err(ImageError::InvalidName(_))
        ));
    }
}
